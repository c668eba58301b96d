// Batched matrix product and row softmax (the non-local attention family).
//
// Every entry point shares one binding layout:
//   0 in0 (read)  1 in1 (read)  2 out0 (read_write)  3 params
//
// batched_matmul: out0[b] = op(A[b]) · op(B[b]), A = in0, B = in1, C = out0 row-major
// [batch, M, N]. op(A)[m, k] = in0[b * sa_batch + m * sam + k * sak] and
// op(B)[k, n] = in1[b * sb_batch + k * sbk + n * sbn]: the strides encode the transposes,
// so one kernel serves all four cases and the backward products.
// One workgroup of 64 (8 x 8 invocations) computes a 32 x 32 block of C; each invocation a
// 4 x 4 register tile. K advances in steps of 8 through workgroup tiles of op(A) (32 x 8)
// and op(B) (8 x 32), zero-filled past the edges. The block id comes from the workgroup
// id only, so the early return is uniform and the barriers are legal.
//
// softmax_rows_forward / softmax_rows_backward: one workgroup per row of `cols` values
// (rows = `rows`), strided lane loops and a fixed-order tree reduction in workgroup memory
// (deterministic). Forward: in0 = x, out0 = y (in1 unused). Backward: in0 = y, in1 = dy,
// out0 = dx = y * (dy - sum(dy * y)).

struct MatmulParams {
    batch: u32, m: u32, n: u32, k: u32,
    sam: u32, sak: u32, sbk: u32, sbn: u32,
    sa_batch: u32, sb_batch: u32, tiles_m: u32, tiles_n: u32,
    rows: u32, cols: u32, pad0: u32, pad1: u32,
}

@group(0) @binding(0) var<storage, read> in0: array<f32>;
@group(0) @binding(1) var<storage, read> in1: array<f32>;
@group(0) @binding(2) var<storage, read_write> out0: array<f32>;
@group(0) @binding(3) var<uniform> p: MatmulParams;

const BM: u32 = 32u;
const BN: u32 = 32u;
const BK: u32 = 8u;

var<workgroup> a_tile: array<f32, 256>; // [BM][BK]
var<workgroup> b_tile: array<f32, 256>; // [BK][BN]
var<workgroup> red: array<f32, 64>;

fn group_id(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + nwg.x * (wid.y + nwg.y * wid.z);
}

@compute @workgroup_size(64)
fn batched_matmul(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let blk = group_id(wid, nwg);
    let per_batch = p.tiles_m * p.tiles_n;
    if (blk >= p.batch * per_batch) {
        return;
    }
    let b = blk / per_batch;
    let r = blk - b * per_batch;
    let bm = r / p.tiles_n;
    let m0 = bm * BM;
    let n0 = (r - bm * p.tiles_n) * BN;
    let ty = lid / 8u;
    let tx = lid % 8u;
    let a_base = b * p.sa_batch;
    let b_base = b * p.sb_batch;
    // Load order follows the contiguous axis of each operand (coalesced reads).
    let a_k_fast = p.sak == 1u;
    let b_n_fast = p.sbn == 1u;
    var acc: array<vec4<f32>, 4>;
    for (var r4 = 0u; r4 < 4u; r4++) {
        acc[r4] = vec4<f32>(0.0);
    }
    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        for (var q = 0u; q < 4u; q++) {
            let t = lid + 64u * q;
            // A tile element (mm, kk), stored at a_tile[mm * BK + kk].
            var mm = t / BK;
            var kk = t % BK;
            if (!a_k_fast) {
                mm = t % BM;
                kk = t / BM;
            }
            let gm = m0 + mm;
            let gk = k0 + kk;
            var av = 0.0;
            if (gm < p.m && gk < p.k) {
                av = in0[a_base + gm * p.sam + gk * p.sak];
            }
            a_tile[mm * BK + kk] = av;
            // B tile element (kb, nn), stored at b_tile[kb * BN + nn].
            var kb = t / BN;
            var nn = t % BN;
            if (!b_n_fast) {
                kb = t % BK;
                nn = t / BK;
            }
            let gkb = k0 + kb;
            let gn = n0 + nn;
            var bv = 0.0;
            if (gkb < p.k && gn < p.n) {
                bv = in1[b_base + gkb * p.sbk + gn * p.sbn];
            }
            b_tile[kb * BN + nn] = bv;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            let c0 = kk * BN + tx * 4u;
            let bv = vec4<f32>(b_tile[c0], b_tile[c0 + 1u], b_tile[c0 + 2u], b_tile[c0 + 3u]);
            for (var r4 = 0u; r4 < 4u; r4++) {
                acc[r4] += a_tile[(ty * 4u + r4) * BK + kk] * bv;
            }
        }
        workgroupBarrier();
    }
    let c_base = b * p.m * p.n;
    for (var r4 = 0u; r4 < 4u; r4++) {
        let gm = m0 + ty * 4u + r4;
        if (gm >= p.m) {
            break;
        }
        for (var c4 = 0u; c4 < 4u; c4++) {
            let gn = n0 + tx * 4u + c4;
            if (gn < p.n) {
                out0[c_base + gm * p.n + gn] = acc[r4][c4];
            }
        }
    }
}

// Fixed-order tree reduction of red[0..64] (max when `take_max`, else sum); all 64
// invocations must call it (uniform control flow). Returns the result to every lane.
fn reduce64(v: f32, take_max: bool, lid: u32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s >>= 1u) {
        if (lid < s) {
            if (take_max) {
                red[lid] = max(red[lid], red[lid + s]);
            } else {
                red[lid] = red[lid] + red[lid + s];
            }
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(64)
fn softmax_rows_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = group_id(wid, nwg);
    if (row >= p.rows) {
        return;
    }
    let base = row * p.cols;
    var m = in0[base];
    for (var j = lid; j < p.cols; j += 64u) {
        m = max(m, in0[base + j]);
    }
    m = reduce64(m, true, lid);
    var s = 0.0;
    for (var j = lid; j < p.cols; j += 64u) {
        s += exp(in0[base + j] - m);
    }
    s = reduce64(s, false, lid);
    let inv = 1.0 / s;
    for (var j = lid; j < p.cols; j += 64u) {
        out0[base + j] = exp(in0[base + j] - m) * inv;
    }
}

@compute @workgroup_size(64)
fn softmax_rows_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = group_id(wid, nwg);
    if (row >= p.rows) {
        return;
    }
    let base = row * p.cols;
    var d = 0.0;
    for (var j = lid; j < p.cols; j += 64u) {
        d += in0[base + j] * in1[base + j];
    }
    d = reduce64(d, false, lid);
    for (var j = lid; j < p.cols; j += 64u) {
        let y = in0[base + j];
        out0[base + j] = y * (in1[base + j] - d);
    }
}
