// Optimiser kernels: one Adam/AdamW step per parameter tensor, and a deterministic
// two-pass sum of squares (for the L2 term of the loss).
//
// All entry points share one binding plan so no two variables share a binding:
//   0: src  (read)        adam: gradient          sumsq: values to reduce
//   1: dst  (read_write)  adam: parameter         sumsq: partial sums / output
//   2: p    (uniform)     AdamParams (sumsq uses total, len, rows, index)
//   3: m    (read_write)  adam only: first moment
//   4: v    (read_write)  adam only: second moment
//
// adam_step, per element i (f32 scalars arrive as bits, see the launcher):
//   g  = src[i] + l2x2 * w                   (l2x2 = 2*l2, or 0 when L2 is off)
//   m  = beta1 * m + (1 - beta1) * g
//   v  = beta2 * v + (1 - beta2) * g*g
//   w -= decay * w_old + lr * (m * inv_bc1) / (sqrt(v * inv_bc2) + eps)
// with decay = lr * weight_decay (AdamW, decoupled) and inv_bc = 1 / (1 - beta^t)
// computed on the CPU in f64.
//
// sumsq_rows:   dst[r] = sum_{j < len, r*len + j < total} src[r*len + j]^2   (r < rows)
// sumsq_finish: dst[index] = sum_{r < rows} src[r]                           (one thread)

struct AdamParams {
    total: u32, lr: u32, beta1: u32, beta2: u32,
    eps: u32, l2x2: u32, decay: u32, inv_bc1: u32,
    inv_bc2: u32, len: u32, rows: u32, index: u32,
}

@group(0) @binding(0) var<storage, read> src: array<f32>;
@group(0) @binding(1) var<storage, read_write> dst: array<f32>;
@group(0) @binding(2) var<uniform> p: AdamParams;
@group(0) @binding(3) var<storage, read_write> m: array<f32>;
@group(0) @binding(4) var<storage, read_write> v: array<f32>;

fn linear_id(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + nwg.x * (wid.y + nwg.y * wid.z)) * 64u + lid;
}

@compute @workgroup_size(64)
fn adam_step(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_id(wid, nwg, lid);
    if (i >= p.total) {
        return;
    }
    let lr = bitcast<f32>(p.lr);
    let b1 = bitcast<f32>(p.beta1);
    let b2 = bitcast<f32>(p.beta2);
    let eps = bitcast<f32>(p.eps);
    let l2x2 = bitcast<f32>(p.l2x2);
    let decay = bitcast<f32>(p.decay);
    let inv_bc1 = bitcast<f32>(p.inv_bc1);
    let inv_bc2 = bitcast<f32>(p.inv_bc2);

    let w = dst[i];
    let g = src[i] + l2x2 * w;
    let mi = b1 * m[i] + (1.0 - b1) * g;
    let vi = b2 * v[i] + (1.0 - b2) * g * g;
    m[i] = mi;
    v[i] = vi;
    let update = (mi * inv_bc1) / (sqrt(vi * inv_bc2) + eps);
    dst[i] = w - decay * w - lr * update;
}

// `len` = values per row, `rows` = ceil(total / len); the last row may be short.
@compute @workgroup_size(64)
fn sumsq_rows(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let r = linear_id(wid, nwg, lid);
    if (r >= p.rows) {
        return;
    }
    let start = r * p.len;
    let end = min(start + p.len, p.total);
    var s = 0.0;
    for (var j = start; j < end; j++) {
        let x = src[j];
        s += x * x;
    }
    dst[r] = s;
}

// One invocation sums the `rows` partial sums in order.
@compute @workgroup_size(64)
fn sumsq_finish(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_id(wid, nwg, lid);
    if (i >= 1u) {
        return;
    }
    var s = 0.0;
    for (var r = 0u; r < p.rows; r++) {
        s += src[r];
    }
    dst[p.index] = s;
}
