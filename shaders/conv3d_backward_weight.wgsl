// conv3d weight gradient, first pass of a split reduction (no float atomics):
// partial[chunk][co][ci][kz][ky][kx] = sum over chunk (n, ZC output planes oz) of
//     dy[n][co][oz][oy][ox] * x[n][ci][oz*SD + kz - pd][oy*SH + ky - ph][ox*SW + kx - pw]
// with x packed by pack_input (4 channels per vec4, zero borders). reduce.wgsl's
// sum_chunks then adds the chunk partials (ZC is chosen so the partials fit a binding).
//
// Each invocation owns 4 output channels x 4 input channels x KW taps for one (kz, ky):
// per output voxel it loads 4 gradients and KW input vec4s for 16*KW multiply-adds. The
// block is generated unrolled (ops/conv3d.rs) into MAC_BLOCK, as in conv3d.wgsl.
//
// Prelude consts: KD, KH, KW, SD, SH, SW.

struct WeightGradParams {
    n: u32, c4: u32, cout: u32, cin: u32,
    dy_c_total: u32, dy_c_off: u32, dp: u32, hp: u32,
    wp: u32, od: u32, oh: u32, ow: u32,
    co_tiles: u32, total: u32, zc: u32, zblocks: u32,
}

@group(0) @binding(0) var<storage, read> xp: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> dy: array<f32>;
@group(0) @binding(2) var<storage, read_write> partial: array<f32>;
@group(0) @binding(3) var<uniform> p: WeightGradParams;

@compute @workgroup_size(64)
fn conv3d_backward_weight(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = (wid.x + nwg.x * (wid.y + nwg.y * wid.z)) * 64u + lid;
    if (i >= p.total) {
        return;
    }
    let ky = i % KH;
    let r1 = i / KH;
    let kz = r1 % KD;
    let r2 = r1 / KD;
    let ci4 = r2 % p.c4;
    let r3 = r2 / p.c4;
    let cot = r3 % p.co_tiles;
    let chunk = r3 / p.co_tiles;
    let zb = chunk % p.zblocks;
    let n = chunk / p.zblocks;
    let co0 = cot * 4u;
    // Gradient rows of the 4 output channels (clamped; extra ones are never stored).
    let plane = p.oh * p.ow;
    let vol = p.od * plane;
    let gc = n * p.dy_c_total + p.dy_c_off;
    let g0 = (gc + min(co0, p.cout - 1u)) * vol;
    let g1 = (gc + min(co0 + 1u, p.cout - 1u)) * vol;
    let g2 = (gc + min(co0 + 2u, p.cout - 1u)) * vol;
    let g3 = (gc + min(co0 + 3u, p.cout - 1u)) * vol;
    //{{ACC_DECL}}
    for (var oz = zb * p.zc; oz < min(p.od, (zb + 1u) * p.zc); oz++) {
        let xz = ((n * p.c4 + ci4) * p.dp + oz * SD + kz) * p.hp;
        for (var oy = 0u; oy < p.oh; oy++) {
            let xrow = (xz + oy * SH + ky) * p.wp;
            let grow = oz * plane + oy * p.ow;
            for (var ox = 0u; ox < p.ow; ox++) {
                let xb = xrow + ox * SW;
                let gv = vec4<f32>(dy[g0 + grow + ox], dy[g1 + grow + ox], dy[g2 + grow + ox], dy[g3 + grow + ox]);
                //{{MAC_BLOCK}}
            }
        }
    }
    let kvol = KD * KH * KW;
    let kbase = (kz * KH + ky) * KW;
    //{{EPILOGUE}}
}

// Stores one accumulated vec4 (4 input channels) for output channel co0 + c, tap kx.
fn store(chunk: u32, co0: u32, c: u32, ci4: u32, kbase: u32, kx: u32, kvol: u32, v: vec4<f32>) {
    let co = co0 + c;
    if (co >= p.cout) {
        return;
    }
    for (var k = 0u; k < 4u; k++) {
        let ci = ci4 * 4u + k;
        if (ci < p.cin) {
            partial[((chunk * p.cout + co) * p.cin + ci) * kvol + kbase + kx] = v[k];
        }
    }
}
