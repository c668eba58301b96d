// conv3d forward on packed operands (see conv3d_pack_input.wgsl), register-tiled.
//
// Each invocation computes TC output channels x TX consecutive output voxels along W.
// One step (4 input channels, kz, ky) loads a row of ROW input vec4s once and uses it
// for every kx and output channel. The multiply-add block is generated unrolled by the
// launcher (ops/conv3d.rs) into MAC_BLOCK: CPU-type drivers do not unroll WGSL loops
// over private arrays, and those arrays then live in memory (measured 1 GFLOP/s).
//
// Prelude consts: TC, TX, KD, KH, KW, SD, SH, SW, NW (= TC * KW weight vec4 per step).

override HAS_BIAS: bool = false;
override RELU: bool = false;

struct Conv3dParams {
    n: u32, c4: u32, cout: u32, out_c_total: u32,
    out_c_off: u32, dp: u32, hp: u32, wp: u32,
    od: u32, oh: u32, ow: u32, x_tiles: u32,
    spatial_tiles: u32, co_tiles: u32, total_wg: u32, sblocks: u32,
}

@group(0) @binding(0) var<storage, read> inp: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> wts: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> bias: array<f32>;
@group(0) @binding(3) var<storage, read_write> output: array<f32>;
@group(0) @binding(4) var<uniform> p: Conv3dParams;

const WG: u32 = 64u;

@compute @workgroup_size(64)
fn conv3d_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    //{{ENTRY_ARGS}}
) {
    // Workgroups are spread over x/y/z to respect the 65535-per-dimension limit.
    let wg = wid.x + nwg.x * (wid.y + nwg.y * wid.z);
    if (wg >= p.total_wg) {
        return;
    }
    // A workgroup never straddles output-channel tiles or batch items, so all its
    // lanes read the same weights.
    let sblock = wg % p.sblocks;
    let rest = wg / p.sblocks;
    let cot = rest % p.co_tiles;
    let n = rest / p.co_tiles;
    let s = sblock * WG + lid;
    let sc = min(s, p.spatial_tiles - 1u);
    let xt = sc % p.x_tiles;
    let t2 = sc / p.x_tiles;
    let oy = t2 % p.oh;
    let oz = t2 / p.oh;
    let ox0 = xt * TX;
    let co0 = cot * TC;
    let n_base = n * p.c4 * p.dp;
    let w_tile = cot * p.c4 * KD * KH * NW;
    //{{SETUP}}
    //{{ACC_DECL}}
    for (var ci = 0u; ci < p.c4; ci++) {
        for (var kz = 0u; kz < KD; kz++) {
            let zrow = (n_base + ci * p.dp + oz * SD + kz) * p.hp + oy * SH;
            for (var ky = 0u; ky < KH; ky++) {
                let rb = (zrow + ky) * p.wp + ox0 * SW;
                let wb = w_tile + ((ci * KD + kz) * KH + ky) * NW;
                //{{MAC_BLOCK}}
            }
        }
    }
    if (s >= p.spatial_tiles) {
        return;
    }
    let ostride = p.od * p.oh * p.ow;
    let obase = ((n * p.out_c_total + p.out_c_off + co0) * p.od + oz) * p.oh * p.ow + oy * p.ow + ox0;
    //{{EPILOGUE}}
}

// Writes one output value: bias, ReLU, bounds on channel and W.
fn store(base: u32, ostride: u32, c: u32, t: u32, co0: u32, ox0: u32, v: f32) {
    if (co0 + c >= p.cout || ox0 + t >= p.ow) {
        return;
    }
    var r = v;
    if (HAS_BIAS) {
        r += bias[co0 + c];
    }
    if (RELU) {
        // select, not max: NaN must propagate (see elementwise.wgsl).
        r = select(r, 0.0, r < 0.0);
    }
    output[base + c * ostride + t] = r;
}
