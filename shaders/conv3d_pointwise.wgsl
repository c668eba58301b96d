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
// Prelude consts: TC, XV (and SG with subgroups).

override HAS_BIAS: bool = false;
override RELU: bool = false;

struct PointwiseParams {
    n: u32, cin: u32, c4: u32, cout: u32,
    in_c_total: u32, in_c_off: u32, out_c_total: u32, out_c_off: u32,
    vol4: u32, v_tiles: u32, co_tiles: u32, sblocks: u32,
    total_wg: u32, pad0: u32, pad1: u32, pad2: u32,
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

// Writes output vec4 `v` of channel `co`: bias, ReLU, bounds.
fn put(n: u32, co: u32, v: u32, a: vec4<f32>) {
    if (co >= p.cout || v >= p.vol4) {
        return;
    }
    var r = a;
    if (HAS_BIAS) {
        r += vec4<f32>(bias[co]);
    }
    if (RELU) {
        // select, not max: NaN must propagate (see elementwise.wgsl).
        r = select(r, vec4<f32>(0.0), r < vec4<f32>(0.0));
    }
    output[(n * p.out_c_total + p.out_c_off + co) * p.vol4 + v] = r;
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
