// conv3d forward on packed operands (see conv3d_pack_input.wgsl), register-tiled.
//
// Each invocation computes TC output channels x TX consecutive output voxels along W.
// One step (4 input channels, kz, ky) loads a row of ROW input vec4s once and uses it
// for every kx and output channel. The multiply-add block is generated unrolled by the
// launcher (ops/conv3d.rs) into MAC_BLOCK: CPU-type drivers do not unroll WGSL loops
// over private arrays, and those arrays then live in memory (measured 1 GFLOP/s).
//
// Prelude consts: TC, TX, KD, KH, KW, SD, SH, SW, NW (= TC * KW weight vec4 per step).
//
// The transposed conv (ops/conv_transpose3d.rs) runs its phase convolutions through this
// kernel too: all of them read one packed input at per-phase offsets (in_off), and the
// generated epilogue calls phase_store, which writes each value straight to its strided
// output position (no phase tensor, no interleave pass).

override HAS_BIAS: bool = false;
override RELU: bool = false;

struct Conv3dParams {
    n: u32, c4: u32, cout: u32, out_c_total: u32,
    out_c_off: u32, dp: u32, hp: u32, wp: u32,
    od: u32, oh: u32, ow: u32, x_tiles: u32,
    spatial_tiles: u32, co_tiles: u32, total_wg: u32, sblocks: u32,
    // Where the packed input is read from (phase convolutions share one packing).
    in_off_d: u32, in_off_h: u32, in_off_w: u32, cb: u32,
    // Phase stores only: output extents, classes per block along H and W (channel c is
    // class block c / cb, channel c % cb), output strides and offsets (first class minus
    // the transposed conv's cropping).
    out_d: u32, out_h: u32, out_w: u32, cls_h: u32,
    cls_w: u32, osd: u32, osh: u32, osw: u32,
    off_d: i32, off_h: i32, off_w: i32,
    // First vec4 of this convolution's packed weight (phase groups share one buffer).
    w_off: u32,
    // The packed input's 4-channel groups per batch item and the first one read (convs
    // reading a channel range of one packing, ops/conv3d_chain.rs).
    in_c4_total: u32, in_c4_off: u32,
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
    let n_base = (n * p.in_c4_total + p.in_c4_off) * p.dp + p.in_off_d;
    let w_tile = p.w_off + cot * p.c4 * KD * KH * NW;
    //{{SETUP}}
    //{{ACC_DECL}}
    for (var ci = 0u; ci < p.c4; ci++) {
        for (var kz = 0u; kz < KD; kz++) {
            let zrow = (n_base + ci * p.dp + oz * SD + kz) * p.hp + oy * SH + p.in_off_h;
            for (var ky = 0u; ky < KH; ky++) {
                let rb = (zrow + ky) * p.wp + ox0 * SW + p.in_off_w;
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

// a / b for a + b < 2^22 (channel counts), in f32: CPU-type drivers have no vector
// integer division and run it lane by lane (lavapipe: the phase convolutions took twice
// as long with u32 division here).
fn small_div(a: u32, b: u32) -> u32 {
    return u32((f32(a) + 0.5) / f32(b));
}

// Output channel c of a phase convolution: its output row base, whether the row lies
// inside the output (cropping), its W offset and bias (computed once per channel).
struct PhaseChan {
    base: u32,
    ok: bool,
    xoff: i32,
    bias: f32,
}

fn phase_chan(n: u32, oz: u32, oy: u32, co: u32) -> PhaseChan {
    var pc: PhaseChan;
    let b = small_div(co, p.cb);
    let cc = co - b * p.cb;
    let bh = small_div(b, p.cls_w);
    let lw = b - bh * p.cls_w;
    let ld = small_div(bh, p.cls_h);
    let lh = bh - ld * p.cls_h;
    let z = i32(oz * p.osd + ld) + p.off_d;
    let y = i32(oy * p.osh + lh) + p.off_h;
    pc.ok = co < p.cout && z >= 0 && y >= 0 && u32(z) < p.out_d && u32(y) < p.out_h;
    pc.base = ((n * p.out_c_total + p.out_c_off + cc) * p.out_d + u32(max(z, 0))) * p.out_h * p.out_w
        + u32(max(y, 0)) * p.out_w;
    pc.xoff = i32(lw) + p.off_w;
    pc.bias = 0.0;
    if (HAS_BIAS && pc.ok) {
        pc.bias = bias[cc];
    }
    return pc;
}

// Writes value v of phase position ox0 + t of channel pc: bias, ReLU, bounds.
fn phase_store(pc: PhaseChan, ox0: u32, t: u32, v: f32) {
    let x = i32((ox0 + t) * p.osw) + pc.xoff;
    if (!pc.ok || ox0 + t >= p.ow || x < 0 || u32(x) >= p.out_w) {
        return;
    }
    var r = v + pc.bias;
    if (RELU) {
        r = select(r, 0.0, r < 0.0);
    }
    output[pc.base + u32(x)] = r;
}
