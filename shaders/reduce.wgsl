// Reusable f32 reductions, deterministic (fixed summation order, no atomics).
//
// sum_chunks: dst[i] = sum over c < chunks of src[c * len + i]   (second pass of split
//             reductions: partial results of `chunks` slices summed per element)
// sum_rows:   dst[r] = sum over j < len of src[r * len + j]
// max_rows:   dst[r] = max over j < len of src[r * len + j]   (len >= 1; NaN inputs give
//             an unspecified result: WGSL lets implementations assume no NaNs)
// mean_rows:  dst[r] = (sum over j < len of src[r * len + j]) / len
// sum_blocks: dst[b] = sum of src[b * SUM_BLOCK ..] (the last block stops at `len`
//             elements); one workgroup per block, fixed-order tree, used by sum_all.

struct ReduceParams {
    len: u32, count: u32, pad0: u32, pad1: u32,
}

@group(0) @binding(0) var<storage, read> src: array<f32>;
@group(0) @binding(1) var<storage, read_write> dst: array<f32>;
@group(0) @binding(2) var<uniform> p: ReduceParams;

fn linear_id(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + nwg.x * (wid.y + nwg.y * wid.z)) * 64u + lid;
}

// `count` = chunks.
@compute @workgroup_size(64)
fn sum_chunks(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_id(wid, nwg, lid);
    if (i >= p.len) {
        return;
    }
    var s = 0.0;
    for (var c = 0u; c < p.count; c++) {
        s += src[c * p.len + i];
    }
    dst[i] = s;
}

// `count` = rows.
@compute @workgroup_size(64)
fn sum_rows(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let r = linear_id(wid, nwg, lid);
    if (r >= p.count) {
        return;
    }
    var s = 0.0;
    for (var j = 0u; j < p.len; j++) {
        s += src[r * p.len + j];
    }
    dst[r] = s;
}

// `count` = rows, len >= 1.
@compute @workgroup_size(64)
fn max_rows(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let r = linear_id(wid, nwg, lid);
    if (r >= p.count) {
        return;
    }
    var m = src[r * p.len];
    for (var j = 1u; j < p.len; j++) {
        m = max(m, src[r * p.len + j]);
    }
    dst[r] = m;
}

// `count` = rows, len >= 1.
@compute @workgroup_size(64)
fn mean_rows(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let r = linear_id(wid, nwg, lid);
    if (r >= p.count) {
        return;
    }
    var s = 0.0;
    for (var j = 0u; j < p.len; j++) {
        s += src[r * p.len + j];
    }
    dst[r] = s / f32(p.len);
}

// Elements per block of sum_blocks (= SUM_ALL_BLOCK in src/ops/reduce.rs): 64 threads
// each add 16 strided values, then a 6-level tree in workgroup memory.
const SUM_BLOCK: u32 = 1024u;

var<workgroup> block_part: array<f32, 64>;

// `len` = elements, `count` = blocks = ceil(len / SUM_BLOCK). Launched with one workgroup
// per block, so the early return is uniform across the workgroup.
@compute @workgroup_size(64)
fn sum_blocks(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let b = wid.x + nwg.x * (wid.y + nwg.y * wid.z);
    if (b >= p.count) {
        return;
    }
    let base = b * SUM_BLOCK;
    var s = 0.0;
    for (var k = 0u; k < SUM_BLOCK / 64u; k++) {
        let i = base + k * 64u + lid;
        if (i < p.len) {
            s += src[i];
        }
    }
    block_part[lid] = s;
    workgroupBarrier();
    for (var stride = 32u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            block_part[lid] = block_part[lid] + block_part[lid + stride];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        dst[b] = block_part[0];
    }
}

// Like sum_blocks, but counts the elements that are NaN or infinite, decided on the bits
// (exponent all ones) because compilers may assume floats are never NaN.
@compute @workgroup_size(64)
fn non_finite_blocks(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let b = wid.x + nwg.x * (wid.y + nwg.y * wid.z);
    if (b >= p.count) {
        return;
    }
    let base = b * SUM_BLOCK;
    var s = 0.0;
    for (var k = 0u; k < SUM_BLOCK / 64u; k++) {
        let i = base + k * 64u + lid;
        if (i < p.len && (bitcast<u32>(src[i]) & 0x7f800000u) == 0x7f800000u) {
            s += 1.0;
        }
    }
    block_part[lid] = s;
    workgroupBarrier();
    for (var stride = 32u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            block_part[lid] = block_part[lid] + block_part[lid + stride];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        dst[b] = block_part[0];
    }
}
