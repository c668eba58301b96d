// Segmentation losses over NCDHW logits with C classes (softmax over channels).
//
// labels: [N, 1, D, H, W], class ids stored as f32 holding exact integers. A label that
// is not an integer in 0..C (NaN included) is never used as an index: it is counted in a
// "bad" row and the loss (and gradient) become NaN, written from `p.nan_bits` (a plain
// store of a quiet-NaN bit pattern, so no arithmetic can fold it away).
//
// Every entry point shares one binding layout (unused bindings are bound to a dummy):
//   0 logits (read)  1 labels (read)  2 aux (read: per-row sums)  3 upstream (read, 1 value)
//   4 out (read_write)  5 params
//
// Voxel index i in 0..total (total = N*V, V = D*H*W): n = i / V, v = i % V; the logit of
// class c is logits[n*C*V + c*V + v]; the label is labels[i].
//
// Split reductions (deterministic, no atomics): `lanes` = L invocations, lane j owns the
// voxels j, j + L, j + 2L, ... (coalesced) and writes one partial per row to
// out[row * L + j]; the launcher then sums rows with reduce::sum_rows and a final
// one-invocation kernel combines the row sums.

struct LossParams {
    n: u32, c: u32, vox: u32, total: u32,
    lanes: u32, chunks: u32, eps_bits: u32, nan_bits: u32,
}

@group(0) @binding(0) var<storage, read> logits: array<f32>;
@group(0) @binding(1) var<storage, read> labels: array<f32>;
@group(0) @binding(2) var<storage, read> aux: array<f32>;
@group(0) @binding(3) var<storage, read> upstream: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@group(0) @binding(5) var<uniform> p: LossParams;

fn linear_id(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + nwg.x * (wid.y + nwg.y * wid.z)) * 64u + lid;
}

// Offset of class 0 of voxel i in the logits; class c is at base + c * V.
fn voxel_base(i: u32) -> u32 {
    let n = i / p.vox;
    return n * p.c * p.vox + (i - n * p.vox);
}

// Whether labels[i] is an exact integer in 0..C (false for NaN).
fn label_ok(lab: f32) -> bool {
    return lab >= 0.0 && lab < f32(p.c) && floor(lab) == lab;
}

fn max_logit(base: u32) -> f32 {
    var m = logits[base];
    for (var c = 1u; c < p.c; c++) {
        m = max(m, logits[base + c * p.vox]);
    }
    return m;
}

// sum_c exp(x_c - m)
fn sum_exp(base: u32, m: f32) -> f32 {
    var s = 0.0;
    for (var c = 0u; c < p.c; c++) {
        s += exp(logits[base + c * p.vox] - m);
    }
    return s;
}

fn nan() -> f32 {
    return bitcast<f32>(p.nan_bits);
}

// probs = softmax over channels, one invocation per voxel.
@compute @workgroup_size(64)
fn softmax_channels(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_id(wid, nwg, lid);
    if (i >= p.total) {
        return;
    }
    let base = voxel_base(i);
    let m = max_logit(base);
    let inv = 1.0 / sum_exp(base, m);
    for (var c = 0u; c < p.c; c++) {
        let k = base + c * p.vox;
        out[k] = exp(logits[k] - m) * inv;
    }
}

// Cross-entropy partials: row 0 = sum of -log softmax[label] over the lane's voxels
// (log-sum-exp form: (m - x_label) + log(sum exp(x - m))), row 1 = count of bad labels.
@compute @workgroup_size(64)
fn ce_partial(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let j = linear_id(wid, nwg, lid);
    if (j >= p.lanes) {
        return;
    }
    var s = 0.0;
    var bad = 0.0;
    for (var k = 0u; k < p.chunks; k++) {
        let i = k * p.lanes + j;
        if (i >= p.total) {
            break;
        }
        let lab = labels[i];
        if (!label_ok(lab)) {
            bad += 1.0;
            continue;
        }
        let base = voxel_base(i);
        let m = max_logit(base);
        let xl = logits[base + u32(lab) * p.vox];
        s += (m - xl) + log(sum_exp(base, m));
    }
    out[j] = s;
    out[p.lanes + j] = bad;
}

// loss = aux[0] / total, or NaN when aux[1] (bad labels) > 0.
@compute @workgroup_size(64)
fn ce_final(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_id(wid, nwg, lid);
    if (i >= 1u) {
        return;
    }
    if (aux[1] > 0.0) {
        out[0] = nan();
    } else {
        out[0] = aux[0] / f32(p.total);
    }
}

// dlogits = (softmax - onehot) * upstream[0] / total; a voxel with a bad label gets NaN.
@compute @workgroup_size(64)
fn ce_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_id(wid, nwg, lid);
    if (i >= p.total) {
        return;
    }
    let base = voxel_base(i);
    let lab = labels[i];
    if (!label_ok(lab)) {
        let q = nan();
        for (var c = 0u; c < p.c; c++) {
            out[base + c * p.vox] = q;
        }
        return;
    }
    let label = u32(lab);
    let scale = upstream[0] / f32(p.total);
    let m = max_logit(base);
    let inv = 1.0 / sum_exp(base, m);
    for (var c = 0u; c < p.c; c++) {
        let k = base + c * p.vox;
        var g = exp(logits[k] - m) * inv;
        if (c == label) {
            g -= 1.0;
        }
        out[k] = g * scale;
    }
}

// Dice partials, one invocation per (class c, lane j), c = id / L: rows
// c = sum p_c g_c, C + c = sum p_c, 2C + c = sum g_c, 3C = bad labels (written by c = 0).
@compute @workgroup_size(64)
fn dice_partial(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let t = linear_id(wid, nwg, lid);
    if (t >= p.lanes * p.c) {
        return;
    }
    let cls = t / p.lanes;
    let j = t - cls * p.lanes;
    var inter = 0.0;
    var psum = 0.0;
    var gsum = 0.0;
    var bad = 0.0;
    for (var k = 0u; k < p.chunks; k++) {
        let i = k * p.lanes + j;
        if (i >= p.total) {
            break;
        }
        let lab = labels[i];
        if (!label_ok(lab)) {
            bad += 1.0;
            continue;
        }
        let base = voxel_base(i);
        let m = max_logit(base);
        let pc = exp(logits[base + cls * p.vox] - m) / sum_exp(base, m);
        psum += pc;
        if (u32(lab) == cls) {
            inter += pc;
            gsum += 1.0;
        }
    }
    out[cls * p.lanes + j] = inter;
    out[(p.c + cls) * p.lanes + j] = psum;
    out[(2u * p.c + cls) * p.lanes + j] = gsum;
    if (cls == 0u) {
        out[3u * p.c * p.lanes + j] = bad;
    }
}

// loss = 1 - mean_c (2 I_c + eps) / (P_c + G_c + eps) from aux = [I, P, G, bad].
@compute @workgroup_size(64)
fn dice_final(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_id(wid, nwg, lid);
    if (i >= 1u) {
        return;
    }
    if (aux[3u * p.c] > 0.0) {
        out[0] = nan();
        return;
    }
    let eps = bitcast<f32>(p.eps_bits);
    var s = 0.0;
    for (var c = 0u; c < p.c; c++) {
        s += (2.0 * aux[c] + eps) / (aux[p.c + c] + aux[2u * p.c + c] + eps);
    }
    out[0] = 1.0 - s / f32(p.c);
}

// Dice gradient per voxel: q_c = dLoss/dp_c = -(2 g_c / den_c - num_c / den_c^2) / C, then
// through the softmax: dx_k = p_k (q_k - sum_c p_c q_c), times upstream[0]. All NaN when
// any label is bad (the class sums are then meaningless).
@compute @workgroup_size(64)
fn dice_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_id(wid, nwg, lid);
    if (i >= p.total) {
        return;
    }
    let base = voxel_base(i);
    let lab = labels[i];
    if (aux[3u * p.c] > 0.0 || !label_ok(lab)) {
        let q = nan();
        for (var c = 0u; c < p.c; c++) {
            out[base + c * p.vox] = q;
        }
        return;
    }
    let label = u32(lab);
    let eps = bitcast<f32>(p.eps_bits);
    let inv_c = 1.0 / f32(p.c);
    let m = max_logit(base);
    let inv = 1.0 / sum_exp(base, m);
    // s = sum_c p_c q_c
    var s = 0.0;
    for (var c = 0u; c < p.c; c++) {
        let pc = exp(logits[base + c * p.vox] - m) * inv;
        s += pc * dice_q(c, label, eps, inv_c);
    }
    let up = upstream[0];
    for (var c = 0u; c < p.c; c++) {
        let k = base + c * p.vox;
        let pc = exp(logits[k] - m) * inv;
        out[k] = pc * (dice_q(c, label, eps, inv_c) - s) * up;
    }
}

fn dice_q(c: u32, label: u32, eps: f32, inv_c: f32) -> f32 {
    let num = 2.0 * aux[c] + eps;
    let den = aux[p.c + c] + aux[2u * p.c + c] + eps;
    var g = 0.0;
    if (c == label) {
        g = 1.0;
    }
    return -(2.0 * g / den - num / (den * den)) * inv_c;
}
