// Elementwise f32 kernels: ReLU / ReLU6 forward and backward, add, scale, axpy, fill,
// channel-range copy/add (DenseNet concatenation and its backward) and seeded dropout.
//
// Three binding layouts share this module. Each entry point statically uses exactly one
// of them, so the aliased @binding numbers never meet in one entry point (WGSL and naga
// check binding collisions per entry point):
//
//   U (one input, one output):  @0 x_u  read        @1 y_u  read_write  @2 p_u uniform
//   B (two inputs, one output): @0 a_b  read        @1 b_b  read        @2 y_b read_write
//                               @3 p_b  uniform
//   I (in place):               @0 y_i  read_write  @1 p_i  uniform
//
// A buffer may not be bound as read and read_write in one dispatch, so when the launcher
// sees the output is the input (same tensor) it picks the in-place (I or U) form.
//
// Dropout hash (the Rust side in src/ops/elementwise.rs is identical):
//   pcg(v)   = PCG-RXS-M-XS 32-bit output hash (Jarzynski & Olano 2020, "pcg_hash")
//   h(s, i)  = pcg(pcg(i) ^ pcg(s))
//   element i is kept iff (h >> 8) >= threshold, threshold = ceil(p * 2^24); this is
//   exactly "uniform u = (h >> 8) / 2^24 in [0, 1) is >= p", decided in integers.

struct Params {
    total: u32,     // elements (or threads) to process
    alpha: u32,     // f32 bits: scale / fill value / dropout 1/(1-p)
    seed: u32,      // dropout seed
    threshold: u32, // dropout keep threshold on 24-bit hash values
    vox: u32,       // channel ops: D*H*W
    count: u32,     // channel ops: channels copied
    src_c: u32,     // channel ops: channels of the source tensor
    src_off: u32,   // channel ops: first source channel
    dst_c: u32,     // channel ops: channels of the destination tensor
    dst_off: u32,   // channel ops: first destination channel
    pad0: u32,
    pad1: u32,
}

// Layout U.
@group(0) @binding(0) var<storage, read> x_u: array<f32>;
@group(0) @binding(1) var<storage, read_write> y_u: array<f32>;
@group(0) @binding(2) var<uniform> p_u: Params;
// Layout B.
@group(0) @binding(0) var<storage, read> a_b: array<f32>;
@group(0) @binding(1) var<storage, read> b_b: array<f32>;
@group(0) @binding(2) var<storage, read_write> y_b: array<f32>;
@group(0) @binding(3) var<uniform> p_b: Params;
// Layout I.
@group(0) @binding(0) var<storage, read_write> y_i: array<f32>;
@group(0) @binding(1) var<uniform> p_i: Params;

fn linear_id(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + nwg.x * (wid.y + nwg.y * wid.z)) * 64u + lid;
}

// Written with select so NaN propagates (max(NaN, 0) may return 0 on some drivers,
// which would hide a diverging run).
fn relu(v: f32) -> f32 {
    return select(v, 0.0, v < 0.0);
}

fn relu6(v: f32) -> f32 {
    return select(select(v, 6.0, v > 6.0), 0.0, v < 0.0);
}

// Gradient of relu: pass `g` where the forward input (or output) is positive.
fn relu_grad(gate: f32, g: f32) -> f32 {
    return select(0.0, g, gate > 0.0);
}

// Gradient of relu6 from the forward input: pass `g` where 0 < x < 6.
fn relu6_grad(x: f32, g: f32) -> f32 {
    return select(0.0, g, x > 0.0 && x < 6.0);
}

fn pcg(v: u32) -> u32 {
    let state = v * 747796405u + 2891336453u;
    let word = ((state >> ((state >> 28u) + 4u)) ^ state) * 277803737u;
    return (word >> 22u) ^ word;
}

fn dropout_hash(seed: u32, i: u32) -> u32 {
    return pcg(pcg(i) ^ pcg(seed));
}

// Multiplier of element i: 1/(1-p) when kept, 0 when dropped.
fn dropout_factor(p: Params, i: u32) -> f32 {
    let keep = (dropout_hash(p.seed, i) >> 8u) >= p.threshold;
    return select(0.0, bitcast<f32>(p.alpha), keep);
}

// Flat (source, destination) indices of channel-op element i (n, c, voxel).
fn channel_indices(p: Params, i: u32) -> vec2<u32> {
    let v = i % p.vox;
    let t = i / p.vox;
    let c = t % p.count;
    let n = t / p.count;
    let s = (n * p.src_c + p.src_off + c) * p.vox + v;
    let d = (n * p.dst_c + p.dst_off + c) * p.vox + v;
    return vec2<u32>(s, d);
}

// ---- Layout U -------------------------------------------------------------------------

@compute @workgroup_size(64)
fn relu_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_id(wid, nwg, lid);
    if (i >= p_u.total) { return; }
    y_u[i] = relu(x_u[i]);
}

@compute @workgroup_size(64)
fn relu6_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_id(wid, nwg, lid);
    if (i >= p_u.total) { return; }
    y_u[i] = relu6(x_u[i]);
}

// y = alpha * x
@compute @workgroup_size(64)
fn scale(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_id(wid, nwg, lid);
    if (i >= p_u.total) { return; }
    y_u[i] = bitcast<f32>(p_u.alpha) * x_u[i];
}

// y += alpha * x (add_assign is alpha = 1)
@compute @workgroup_size(64)
fn axpy(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_id(wid, nwg, lid);
    if (i >= p_u.total) { return; }
    y_u[i] = y_u[i] + bitcast<f32>(p_u.alpha) * x_u[i];
}

// y = x * mask / (1 - p); forward on x and backward on dy are the same kernel.
@compute @workgroup_size(64)
fn dropout(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_id(wid, nwg, lid);
    if (i >= p_u.total) { return; }
    y_u[i] = x_u[i] * dropout_factor(p_u, i);
}

// dst[:, dst_off + c] = src[:, src_off + c] for c < count; total = N * count * vox.
@compute @workgroup_size(64)
fn copy_channels(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_id(wid, nwg, lid);
    if (i >= p_u.total) { return; }
    let sd = channel_indices(p_u, i);
    y_u[sd.y] = x_u[sd.x];
}

// dst[:, dst_off + c] += src[:, src_off + c] for c < count.
@compute @workgroup_size(64)
fn add_channels(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_id(wid, nwg, lid);
    if (i >= p_u.total) { return; }
    let sd = channel_indices(p_u, i);
    y_u[sd.y] = y_u[sd.y] + x_u[sd.x];
}

// In-place backward: x_u is the saved tensor, y_u holds dy and receives dx.
@compute @workgroup_size(64)
fn relu_backward_inplace(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_id(wid, nwg, lid);
    if (i >= p_u.total) { return; }
    y_u[i] = relu_grad(x_u[i], y_u[i]);
}

@compute @workgroup_size(64)
fn relu6_backward_inplace(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_id(wid, nwg, lid);
    if (i >= p_u.total) { return; }
    y_u[i] = relu6_grad(x_u[i], y_u[i]);
}

// ---- Layout B -------------------------------------------------------------------------

// a_b = saved y (or x), b_b = dy, y_b = dx.
@compute @workgroup_size(64)
fn relu_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_id(wid, nwg, lid);
    if (i >= p_b.total) { return; }
    y_b[i] = relu_grad(a_b[i], b_b[i]);
}

// a_b = saved x, b_b = dy, y_b = dx.
@compute @workgroup_size(64)
fn relu6_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_id(wid, nwg, lid);
    if (i >= p_b.total) { return; }
    y_b[i] = relu6_grad(a_b[i], b_b[i]);
}

@compute @workgroup_size(64)
fn add(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_id(wid, nwg, lid);
    if (i >= p_b.total) { return; }
    y_b[i] = a_b[i] + b_b[i];
}

// ---- Layout I -------------------------------------------------------------------------

@compute @workgroup_size(64)
fn relu_forward_inplace(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_id(wid, nwg, lid);
    if (i >= p_i.total) { return; }
    y_i[i] = relu(y_i[i]);
}

@compute @workgroup_size(64)
fn relu6_forward_inplace(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_id(wid, nwg, lid);
    if (i >= p_i.total) { return; }
    y_i[i] = relu6(y_i[i]);
}

@compute @workgroup_size(64)
fn scale_inplace(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_id(wid, nwg, lid);
    if (i >= p_i.total) { return; }
    y_i[i] = bitcast<f32>(p_i.alpha) * y_i[i];
}

@compute @workgroup_size(64)
fn dropout_inplace(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_id(wid, nwg, lid);
    if (i >= p_i.total) { return; }
    y_i[i] = y_i[i] * dropout_factor(p_i, i);
}

// Stores the bits of `alpha` unchanged (so +-inf and NaN fills are exact).
@compute @workgroup_size(64)
fn fill(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_id(wid, nwg, lid);
    if (i >= p_i.total) { return; }
    y_i[i] = bitcast<f32>(p_i.alpha);
}
