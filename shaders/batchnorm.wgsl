// BatchNorm3d over NCDHW tensors: per-channel statistics over N*D*H*W values.
//
// Deterministic split reductions (fixed order, no atomics):
//   bn_partial / bn_grad_partial: one workgroup of 64 per (n, c, chunk) of `chunk`
//     contiguous voxels; each invocation sums a strided slice (coalesced reads), then a
//     fixed shared-memory tree combines the 64 values; the result goes to
//     part[c * P + n * nchunk + k] with P = n * nchunk partials per channel.
//   bn_mean / bn_var / bn_grad_finalize: one invocation per channel sums its P partials
//     in order.
//   bn_apply / bn_grad_input: elementwise, one invocation per value.
//
// Each entry point has its own bindings (0.. in the order the launcher passes them,
// then the uniform); globals are prefixed by the entry they belong to.
//
// `flag`: bn_partial: 1 = sum (x - mean)^2, 0 = sum x.
//         bn_apply / bn_grad_finalize: 1 = eval mode (`stat` holds the running variance,
//         invstd = 1 / sqrt(stat + eps)), 0 = training mode (`stat` holds invstd).
// `relu`: BN followed by ReLU in the same passes: bn_apply clamps its output, and the
//         backward entries read that output `y` and use dy only where y > 0 (no ReLU
//         pass or tensor of its own in either direction).

struct BnParams {
    n: u32, c: u32, vox: u32, chunk: u32,
    nchunk: u32, total: u32, flag: u32, eps: u32,
    momentum: u32, var_scale: u32, count: u32, relu: u32,
}

var<workgroup> sh0: array<f32, 64>;
var<workgroup> sh1: array<f32, 64>;

fn group_id(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + nwg.x * (wid.y + nwg.y * wid.z);
}

fn inv_std(stat: f32, flag: u32, eps: f32) -> f32 {
    if (flag == 1u) {
        return 1.0 / sqrt(stat + eps);
    }
    return stat;
}

// ---- bn_partial: x, mean (read only when flag = 1), part; one workgroup per item.
@group(0) @binding(0) var<storage, read> partial_x: array<f32>;
@group(0) @binding(1) var<storage, read> partial_mean: array<f32>;
@group(0) @binding(2) var<storage, read_write> partial_out: array<f32>;
@group(0) @binding(3) var<uniform> partial_p: BnParams;

@compute @workgroup_size(64)
fn bn_partial(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let g = group_id(wid, nwg);
    if (g >= partial_p.total) {
        return;
    }
    let k = g % partial_p.nchunk;
    let nc = g / partial_p.nchunk;
    let c = nc % partial_p.c;
    let n = nc / partial_p.c;
    let start = k * partial_p.chunk;
    let end = min(start + partial_p.chunk, partial_p.vox);
    let base = nc * partial_p.vox;
    var m = 0.0;
    if (partial_p.flag == 1u) {
        m = partial_mean[c];
    }
    var s = 0.0;
    for (var j = start + lid; j < end; j += 64u) {
        let v = partial_x[base + j];
        if (partial_p.flag == 1u) {
            let d = v - m;
            s += d * d;
        } else {
            s += v;
        }
    }
    sh0[lid] = s;
    workgroupBarrier();
    for (var st = 32u; st > 0u; st = st >> 1u) {
        if (lid < st) {
            sh0[lid] += sh0[lid + st];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        let pc = partial_p.n * partial_p.nchunk;
        partial_out[c * pc + n * partial_p.nchunk + k] = sh0[0];
    }
}

// ---- bn_mean: part, mean; one invocation per channel.
@group(0) @binding(0) var<storage, read> mean_part: array<f32>;
@group(0) @binding(1) var<storage, read_write> mean_out: array<f32>;
@group(0) @binding(2) var<uniform> mean_p: BnParams;

@compute @workgroup_size(64)
fn bn_mean(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c = group_id(wid, nwg) * 64u + lid;
    if (c >= mean_p.total) {
        return;
    }
    let pc = mean_p.n * mean_p.nchunk;
    var s = 0.0;
    for (var j = 0u; j < pc; j++) {
        s += mean_part[c * pc + j];
    }
    mean_out[c] = s / bitcast<f32>(mean_p.count);
}

// ---- bn_var: part (sums of squared deviations), mean, invstd, running mean, running var.
@group(0) @binding(0) var<storage, read> var_part: array<f32>;
@group(0) @binding(1) var<storage, read> var_mean: array<f32>;
@group(0) @binding(2) var<storage, read_write> var_invstd: array<f32>;
@group(0) @binding(3) var<storage, read_write> var_rmean: array<f32>;
@group(0) @binding(4) var<storage, read_write> var_rvar: array<f32>;
@group(0) @binding(5) var<uniform> var_p: BnParams;

@compute @workgroup_size(64)
fn bn_var(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c = group_id(wid, nwg) * 64u + lid;
    if (c >= var_p.total) {
        return;
    }
    let pc = var_p.n * var_p.nchunk;
    var s = 0.0;
    for (var j = 0u; j < pc; j++) {
        s += var_part[c * pc + j];
    }
    let v = s / bitcast<f32>(var_p.count);
    var_invstd[c] = 1.0 / sqrt(v + bitcast<f32>(var_p.eps));
    let mom = bitcast<f32>(var_p.momentum);
    var_rmean[c] = mom * var_rmean[c] + (1.0 - mom) * var_mean[c];
    var_rvar[c] = mom * var_rvar[c] + (1.0 - mom) * (v * bitcast<f32>(var_p.var_scale));
}

// ---- bn_apply: x, gamma, beta, mean, stat, y; one invocation per value.
@group(0) @binding(0) var<storage, read> apply_x: array<f32>;
@group(0) @binding(1) var<storage, read> apply_gamma: array<f32>;
@group(0) @binding(2) var<storage, read> apply_beta: array<f32>;
@group(0) @binding(3) var<storage, read> apply_mean: array<f32>;
@group(0) @binding(4) var<storage, read> apply_stat: array<f32>;
@group(0) @binding(5) var<storage, read_write> apply_y: array<f32>;
@group(0) @binding(6) var<uniform> apply_p: BnParams;

@compute @workgroup_size(64)
fn bn_apply(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = group_id(wid, nwg) * 64u + lid;
    if (i >= apply_p.total) {
        return;
    }
    let c = (i / apply_p.vox) % apply_p.c;
    let inv = inv_std(apply_stat[c], apply_p.flag, bitcast<f32>(apply_p.eps));
    var v = apply_gamma[c] * ((apply_x[i] - apply_mean[c]) * inv) + apply_beta[c];
    if (apply_p.relu == 1u) {
        // select, not max: NaN must propagate (see elementwise.wgsl).
        v = select(v, 0.0, v < 0.0);
    }
    apply_y[i] = v;
}

// dy, or with `relu` dy where the fused output y > 0 (ReLU's gradient).
fn masked(relu: u32, y: f32, dy: f32) -> f32 {
    return select(dy, select(0.0, dy, y > 0.0), relu == 1u);
}

// ---- bn_grad_partial: x, dy, mean, part, y (read only with relu). part[c * P + j] =
// sum dy, part[C * P + c * P + j] = sum dy * (x - mean); one workgroup per item.
@group(0) @binding(0) var<storage, read> gpart_x: array<f32>;
@group(0) @binding(1) var<storage, read> gpart_dy: array<f32>;
@group(0) @binding(2) var<storage, read> gpart_mean: array<f32>;
@group(0) @binding(3) var<storage, read_write> gpart_out: array<f32>;
@group(0) @binding(4) var<storage, read> gpart_y: array<f32>;
@group(0) @binding(5) var<uniform> gpart_p: BnParams;

@compute @workgroup_size(64)
fn bn_grad_partial(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let g = group_id(wid, nwg);
    if (g >= gpart_p.total) {
        return;
    }
    let k = g % gpart_p.nchunk;
    let nc = g / gpart_p.nchunk;
    let c = nc % gpart_p.c;
    let n = nc / gpart_p.c;
    let start = k * gpart_p.chunk;
    let end = min(start + gpart_p.chunk, gpart_p.vox);
    let base = nc * gpart_p.vox;
    let m = gpart_mean[c];
    var s0 = 0.0;
    var s1 = 0.0;
    for (var j = start + lid; j < end; j += 64u) {
        let d = masked(gpart_p.relu, gpart_y[base + j], gpart_dy[base + j]);
        s0 += d;
        s1 += d * (gpart_x[base + j] - m);
    }
    sh0[lid] = s0;
    sh1[lid] = s1;
    workgroupBarrier();
    for (var st = 32u; st > 0u; st = st >> 1u) {
        if (lid < st) {
            sh0[lid] += sh0[lid + st];
            sh1[lid] += sh1[lid + st];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        let pc = gpart_p.n * gpart_p.nchunk;
        let o = c * pc + n * gpart_p.nchunk + k;
        gpart_out[o] = sh0[0];
        gpart_out[gpart_p.c * pc + o] = sh1[0];
    }
}

// ---- bn_grad_finalize: part, gamma, mean, stat, dgamma, dbeta, coef. Per channel:
// dbeta = sum dy, dgamma = invstd * sum dy (x - mean), and coef = (a, s, mean, u) so
// that dx = a dy + s (x - mean) + u (training: a = gamma invstd,
// s = -a invstd dgamma / M, u = -a dbeta / M; eval: s = u = 0).
@group(0) @binding(0) var<storage, read> gfin_part: array<f32>;
@group(0) @binding(1) var<storage, read> gfin_gamma: array<f32>;
@group(0) @binding(2) var<storage, read> gfin_mean: array<f32>;
@group(0) @binding(3) var<storage, read> gfin_stat: array<f32>;
@group(0) @binding(4) var<storage, read_write> gfin_dgamma: array<f32>;
@group(0) @binding(5) var<storage, read_write> gfin_dbeta: array<f32>;
@group(0) @binding(6) var<storage, read_write> gfin_coef: array<f32>;
@group(0) @binding(7) var<uniform> gfin_p: BnParams;

@compute @workgroup_size(64)
fn bn_grad_finalize(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c = group_id(wid, nwg) * 64u + lid;
    if (c >= gfin_p.total) {
        return;
    }
    let pc = gfin_p.n * gfin_p.nchunk;
    var s0 = 0.0;
    var s1 = 0.0;
    for (var j = 0u; j < pc; j++) {
        s0 += gfin_part[c * pc + j];
        s1 += gfin_part[gfin_p.c * pc + c * pc + j];
    }
    let inv = inv_std(gfin_stat[c], gfin_p.flag, bitcast<f32>(gfin_p.eps));
    let dgamma = s1 * inv;
    gfin_dgamma[c] = dgamma;
    gfin_dbeta[c] = s0;
    let a = gfin_gamma[c] * inv;
    var s = 0.0;
    var u = 0.0;
    if (gfin_p.flag == 0u) {
        let m = bitcast<f32>(gfin_p.count);
        s = -a * inv * dgamma / m;
        u = -a * s0 / m;
    }
    gfin_coef[4u * c] = a;
    gfin_coef[4u * c + 1u] = s;
    gfin_coef[4u * c + 2u] = gfin_mean[c];
    gfin_coef[4u * c + 3u] = u;
}

// ---- bn_grad_input: x, dy, coef, dx, y (read only with relu); one invocation per value.
@group(0) @binding(0) var<storage, read> gin_x: array<f32>;
@group(0) @binding(1) var<storage, read> gin_dy: array<f32>;
@group(0) @binding(2) var<storage, read> gin_coef: array<f32>;
@group(0) @binding(3) var<storage, read_write> gin_dx: array<f32>;
@group(0) @binding(4) var<storage, read> gin_y: array<f32>;
@group(0) @binding(5) var<uniform> gin_p: BnParams;

@compute @workgroup_size(64)
fn bn_grad_input(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = group_id(wid, nwg) * 64u + lid;
    if (i >= gin_p.total) {
        return;
    }
    let c = (i / gin_p.vox) % gin_p.c;
    let a = gin_coef[4u * c];
    let s = gin_coef[4u * c + 1u];
    let m = gin_coef[4u * c + 2u];
    let u = gin_coef[4u * c + 3u];
    gin_dx[i] = a * masked(gin_p.relu, gin_y[i], gin_dy[i]) + s * (gin_x[i] - m) + u;
}
