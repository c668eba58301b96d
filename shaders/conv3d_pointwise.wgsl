// 1x1x1 convolution (stride 1, no padding) straight from NCDHW: no input packing.
//
// A 1x1x1 conv is a matrix product over channels at every voxel, so the input needs no
// zero borders; packing it (as conv3d.wgsl needs) cost as much as the convolution for
// DenseNet bottlenecks on lavapipe. Each invocation computes TC output channels x XV
// vec4 of consecutive voxels (the voxel count is a multiple of 4, so every channel
// starts on a vec4). One step reads 4 input channels (4 x XV vec4 loads) and the packed
// weight vec4 of each output channel (conv3d_pack_weight.wgsl, kernel 1x1x1), then
// does TC x XV x 16 multiply-adds. MAC_BLOCK / EPILOGUE are generated unrolled by the
// launcher (ops/conv3d.rs) as for conv3d.wgsl.
//
// Packed output (ops/conv3d_chain.rs): the result goes straight into conv3d.wgsl's
// packed input layout ([N][C/4][Dp][Hp][Wp] vec4 of 4 channels, zero borders that the
// caller cleared), for convolutions reading it: no NCDHW intermediate, no packing pass.
// The epilogue then transposes each 4 channels x 4 voxels block (needs TC a multiple
// of 4 and W a multiple of 4, so a voxel vec4 lies in one row).
//
// Pairs (ops/conv_transpose3d.rs): a k = s = 2 transposed conv as one product over 8
// Cout channels, ordered j = (q * Cout + co) * 2 + pw for class (pd, ph, pw), q = pd * 2
// + ph (conv_transpose3d_interleave.wgsl, pack_pair_weights). A tile holds both W
// classes of TC / 2 channels of one q (Cout a multiple of TC / 2), so a voxel vec4's
// 8 outputs along the doubled W leave as two vec4 stores (W a multiple of 4).
//
// Prelude consts: TC, XV (and SG with subgroups).

override HAS_BIAS: bool = false;
override RELU: bool = false;

struct PointwiseParams {
    n: u32, cin: u32, c4: u32, cout: u32,
    in_c_total: u32, in_c_off: u32, out_c_total: u32, out_c_off: u32,
    vol4: u32, v_tiles: u32, co_tiles: u32, sblocks: u32,
    total_wg: u32, pad0: u32, pad1: u32, pad2: u32,
    // Packed output only: spatial W and H, the packing's 4-channel groups per batch
    // item, its extents and where voxel (0, 0, 0) sits in it.
    w: u32, h: u32, pc4: u32, pdp: u32,
    php: u32, pwp: u32, ppd: u32, pph: u32,
    ppw: u32,
    // Pairs only: input D and the transposed conv's Cout.
    d: u32, cb: u32, pad5: u32,
}

@group(0) @binding(0) var<storage, read> inp: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> wts: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> bias: array<f32>;
@group(0) @binding(3) var<storage, read_write> output: array<vec4<f32>>;
@group(0) @binding(4) var<uniform> p: PointwiseParams;

const WG: u32 = 64u;

// Input vec4 `v` of channel `c` (clamped to a real channel and voxel), zero past Cin so
// padding lanes of the packed weight never meet a NaN of another channel.
fn load_in(n: u32, c: u32, v: u32) -> vec4<f32> {
    let cc = min(c, p.cin - 1u);
    let x = inp[(n * p.in_c_total + p.in_c_off + cc) * p.vol4 + min(v, p.vol4 - 1u)];
    return select(vec4<f32>(0.0), x, c < p.cin);
}

// Bias and ReLU of channel `co`'s values; zero past Cout (packed padding channels).
fn finish(co: u32, a: vec4<f32>) -> vec4<f32> {
    if (co >= p.cout) {
        return vec4<f32>(0.0);
    }
    var r = a;
    if (HAS_BIAS) {
        r += vec4<f32>(bias[co]);
    }
    if (RELU) {
        // select, not max: NaN must propagate (see elementwise.wgsl).
        r = select(r, vec4<f32>(0.0), r < vec4<f32>(0.0));
    }
    return r;
}

// Writes output vec4 `v` of channel `co`: bias, ReLU, bounds.
fn put(n: u32, co: u32, v: u32, a: vec4<f32>) {
    if (co >= p.cout || v >= p.vol4) {
        return;
    }
    output[(n * p.out_c_total + p.out_c_off + co) * p.vol4 + v] = finish(co, a);
}

// Packed output: index of voxel vec4 `v`'s first voxel in 4-channel group 0.
fn packed_base(n: u32, v: u32) -> u32 {
    let vox = min(v, p.vol4 - 1u) * 4u;
    let row = vox / p.w;
    let y = row % p.h;
    let z = row / p.h;
    return ((n * p.pc4 * p.pdp + z + p.ppd) * p.php + y + p.pph) * p.pwp + vox % p.w + p.ppw;
}

// Pairs: channel `co` (< Cout) of class q = pd * 2 + ph at voxel vec4 `v`: `a0` the
// values of W class 0, `a1` of class 1, interleaved into 8 consecutive outputs.
fn put_pairs(n: u32, q: u32, co: u32, v: u32, a0: vec4<f32>, a1: vec4<f32>) {
    if (co >= p.cb || v >= p.vol4) {
        return;
    }
    let vox = v * 4u;
    let x = vox % p.w;
    let row = vox / p.w;
    let y = row % p.h;
    let z = row / p.h;
    let oz = 2u * z + q / 2u;
    let oy = 2u * y + q % 2u;
    let o = (((n * p.out_c_total + p.out_c_off + co) * 2u * p.d + oz) * 2u * p.h + oy) * (p.w / 2u) + x / 2u;
    let r0 = finish(co, a0);
    let r1 = finish(co, a1);
    output[o] = vec4<f32>(r0.x, r1.x, r0.y, r1.y);
    output[o + 1u] = vec4<f32>(r0.z, r1.z, r0.w, r1.w);
}

// Packed output: channels co..co+3 (co a multiple of 4) of voxel vec4 `v` as four
// channel vec4s.
fn put_packed(base: u32, co: u32, v: u32, a0: vec4<f32>, a1: vec4<f32>, a2: vec4<f32>, a3: vec4<f32>) {
    if (co >= p.cout || v >= p.vol4) {
        return;
    }
    let r0 = finish(co, a0);
    let r1 = finish(co + 1u, a1);
    let r2 = finish(co + 2u, a2);
    let r3 = finish(co + 3u, a3);
    let o = base + (co / 4u) * p.pdp * p.php * p.pwp;
    output[o] = vec4<f32>(r0.x, r1.x, r2.x, r3.x);
    output[o + 1u] = vec4<f32>(r0.y, r1.y, r2.y, r3.y);
    output[o + 2u] = vec4<f32>(r0.z, r1.z, r2.z, r3.z);
    output[o + 3u] = vec4<f32>(r0.w, r1.w, r2.w, r3.w);
}

@compute @workgroup_size(64)
fn conv3d_pointwise(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    //{{ENTRY_ARGS}}
) {
    let wg = wid.x + nwg.x * (wid.y + nwg.y * wid.z);
    if (wg >= p.total_wg) {
        return;
    }
    // A workgroup never straddles output-channel tiles or batch items: all its lanes
    // read the same weights. The channel tile varies fastest, so the workgroups that
    // read the same input voxels run back to back and find them in cache (lavapipe,
    // N2 C194->64 32^3: 54-63 ms with the spatial block fastest, 46-48 ms this way).
    let cot = wg % p.co_tiles;
    let rest = wg / p.co_tiles;
    let sblock = rest % p.sblocks;
    let n = rest / p.sblocks;
    let vt = sblock * WG + lid;
    let v0 = min(vt, p.v_tiles - 1u) * XV;
    let co0 = cot * TC;
    //{{SETUP}}
    //{{ACC_DECL}}
    //{{VOXELS}}
    // Whole steps of 4 input channels read without checks; a last partial step (Cin not
    // a multiple of 4) reads through load_in.
    let full = p.cin / 4u;
    var cb = (n * p.in_c_total + p.in_c_off) * p.vol4;
    for (var ci4 = 0u; ci4 < full; ci4++) {
        let wb = (cot * p.c4 + ci4) * TC;
        //{{LOADS_FULL}}
        //{{MAC_BLOCK}}
        cb += 4u * p.vol4;
    }
    if (full < p.c4) {
        let ci4 = full;
        let c = ci4 * 4u;
        let wb = (cot * p.c4 + ci4) * TC;
        //{{LOADS_TAIL}}
        //{{MAC_BLOCK}}
    }
    if (vt >= p.v_tiles) {
        return;
    }
    //{{EPILOGUE}}
}
