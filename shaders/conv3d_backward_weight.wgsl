// conv3d weight gradient, first pass of a split reduction (no float atomics):
// partial[chunk][co][ci][kz][ky][kx] = sum over chunk (n, ZC output planes oz) of
//     dy[n][co][oz][oy][ox] * x[n][ci][oz*SD + kz - pd][oy*SH + ky - ph][ox*SW + kx - pw]
// with x packed by pack_input (4 channels per vec4, zero borders, W covering whole
// blocks of 8 outputs). reduce.wgsl's sum_chunks then adds the chunk partials.
//
// Each invocation owns TCO output channels x 4 input channels x KW taps for one (kz, ky)
// and walks the output rows 8 voxels at a time: it loads the (7*SW + KW) input vec4s the
// 8 positions touch once (a sliding window, instead of KW loads per position) and the
// TCO x 8 gradients. In the subgroup variant the 8 lanes of a block share (chunk, output
// channels), so lane j loads the gradients of position j and shuffles them to the others
// (one load per lane instead of eight). The block is generated unrolled
// (ops/conv3d_backward.rs) into GRAD_ROWS, MAC_BLOCK and EPILOGUE, as in conv3d.wgsl.
//
// Prelude consts: KD, KH, KW, SD, SH, SW, TCO (and SG for the subgroup variant).

struct WeightGradParams {
    n: u32, c4: u32, cout: u32, cin: u32,
    dy_c_total: u32, dy_c_off: u32, dp: u32, hp: u32,
    wp: u32, od: u32, oh: u32, ow: u32,
    co_tiles: u32, total: u32, zc: u32, zblocks: u32,
    inner: u32, inner_pad: u32, pad0: u32, pad1: u32,
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
    //{{ENTRY_ARGS}}
) {
    // No early return: every lane of an 8-lane block takes part in the shuffles.
    let i = (wid.x + nwg.x * (wid.y + nwg.y * wid.z)) * 64u + lid;
    let live = i < p.total;
    let ic = min(i, p.total - 1u);
    // (ci4, kz, ky) is padded to a multiple of 8 so a block never straddles
    // (chunk, output-channel tile).
    let r = ic % p.inner_pad;
    let rest = ic / p.inner_pad;
    let rr = min(r, p.inner - 1u);
    let ky = rr % KH;
    let kz = (rr / KH) % KD;
    let ci4 = rr / (KH * KD);
    let cot = rest % p.co_tiles;
    let chunk = rest / p.co_tiles;
    let zb = chunk % p.zblocks;
    let n = chunk / p.zblocks;
    //{{SETUP}}
    let co0 = cot * TCO;
    // Gradient rows of the TCO output channels (clamped; extra ones are never stored).
    let plane = p.oh * p.ow;
    let vol = p.od * plane;
    let gc = n * p.dy_c_total + p.dy_c_off;
    //{{GRAD_ROWS}}
    //{{ACC_DECL}}
    for (var oz = zb * p.zc; oz < min(p.od, (zb + 1u) * p.zc); oz++) {
        let xz = ((n * p.c4 + ci4) * p.dp + oz * SD + kz) * p.hp;
        for (var oy = 0u; oy < p.oh; oy++) {
            let xrow = (xz + oy * SH + ky) * p.wp;
            let grow = oz * plane + oy * p.ow;
            for (var ox0 = 0u; ox0 < p.ow; ox0 += 8u) {
                let xb = xrow + ox0 * SW;
                //{{MAC_BLOCK}}
            }
        }
    }
    if (!live || r >= p.inner) {
        return;
    }
    let kvol = KD * KH * KW;
    let kbase = (kz * KH + ky) * KW;
    //{{EPILOGUE}}
}

// Gradient of output channel row `g` at position ox0 + t, zero past the row's end.
fn grad_at(g: u32, ox0: u32, t: u32) -> f32 {
    let o = ox0 + t;
    return select(0.0, dy[g + min(o, p.ow - 1u)], o < p.ow);
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
