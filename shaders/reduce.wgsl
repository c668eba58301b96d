// Reusable f32 reductions, deterministic (fixed summation order, no atomics).
//
// sum_chunks: dst[i] = sum over c < chunks of src[c * len + i]   (second pass of split
//             reductions: partial results of `chunks` slices summed per element)
// sum_rows:   dst[r] = sum over j < len of src[r * len + j]

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
