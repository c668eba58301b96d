// Upsampling of NCDHW volumes by integer factors (sd, sh, sw): nearest and trilinear,
// forward and backward. Output extents are (D*sd, H*sh, W*sw).
//
// Nearest: output o reads input floor(o / s).
// Trilinear (PyTorch align_corners=False): source coordinate
//   src = max((o + 0.5) / s - 0.5, 0),  i0 = floor(src),  i1 = min(i0 + 1, n - 1),
//   weights (1 - l, l) with l = src - i0, per axis, product over the three axes.
// src is computed exactly from integers: src = (2o + 1 - s) / (2s) when 2o + 1 > s.
//
// Backward passes are gathers: one invocation per input voxel sums over the output
// voxels whose interpolation uses it (fixed order, no atomics, deterministic).

struct UpsampleParams {
    total: u32, id: u32, ih: u32, iw: u32,
    sd: u32, sh: u32, sw: u32, pad0: u32,
}

@group(0) @binding(0) var<storage, read> src: array<f32>;
@group(0) @binding(1) var<storage, read_write> dst: array<f32>;
@group(0) @binding(2) var<uniform> p: UpsampleParams;

fn linear_id(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + nwg.x * (wid.y + nwg.y * wid.z)) * 64u + lid;
}

struct Lerp {
    i0: u32,
    i1: u32,
    l1: f32,
}

// Interpolation of output coordinate `o` along an axis of `n` inputs, factor `s`.
fn lerp_of(o: u32, s: u32, n: u32) -> Lerp {
    var r: Lerp;
    let num2 = 2u * o + 1u;
    if (num2 <= s) {
        r.i0 = 0u;
        r.l1 = 0.0;
    } else {
        let num = num2 - s;
        r.i0 = num / (2u * s);
        r.l1 = f32(num % (2u * s)) / f32(2u * s);
    }
    r.i1 = min(r.i0 + 1u, n - 1u);
    return r;
}

// Weight of input `i` in the interpolation of output `o` along one axis.
fn weight_of(o: u32, i: u32, s: u32, n: u32) -> f32 {
    let r = lerp_of(o, s, n);
    var wt = 0.0;
    if (r.i0 == i) {
        wt += 1.0 - r.l1;
    }
    if (r.i1 == i) {
        wt += r.l1;
    }
    return wt;
}

@compute @workgroup_size(64)
fn nearest_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_id(wid, nwg, lid);
    if (i >= p.total) {
        return;
    }
    let od_n = p.id * p.sd;
    let oh_n = p.ih * p.sh;
    let ow_n = p.iw * p.sw;
    let ow = i % ow_n;
    var t = i / ow_n;
    let oh = t % oh_n;
    t = t / oh_n;
    let od = t % od_n;
    let nc = t / od_n;
    dst[i] = src[((nc * p.id + od / p.sd) * p.ih + oh / p.sh) * p.iw + ow / p.sw];
}

// One invocation per input voxel: sum of dy over its sd x sh x sw output block.
@compute @workgroup_size(64)
fn nearest_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_id(wid, nwg, lid);
    if (i >= p.total) {
        return;
    }
    let w = i % p.iw;
    var t = i / p.iw;
    let h = t % p.ih;
    t = t / p.ih;
    let d = t % p.id;
    let nc = t / p.id;
    let oh_n = p.ih * p.sh;
    let ow_n = p.iw * p.sw;
    var s = 0.0;
    for (var a = 0u; a < p.sd; a++) {
        for (var b = 0u; b < p.sh; b++) {
            let row = ((nc * p.id * p.sd + d * p.sd + a) * oh_n + h * p.sh + b) * ow_n + w * p.sw;
            for (var c = 0u; c < p.sw; c++) {
                s += src[row + c];
            }
        }
    }
    dst[i] = s;
}

@compute @workgroup_size(64)
fn trilinear_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_id(wid, nwg, lid);
    if (i >= p.total) {
        return;
    }
    let od_n = p.id * p.sd;
    let oh_n = p.ih * p.sh;
    let ow_n = p.iw * p.sw;
    let ow = i % ow_n;
    var t = i / ow_n;
    let oh = t % oh_n;
    t = t / oh_n;
    let od = t % od_n;
    let nc = t / od_n;
    let ld = lerp_of(od, p.sd, p.id);
    let lh = lerp_of(oh, p.sh, p.ih);
    let lw = lerp_of(ow, p.sw, p.iw);
    let base = nc * p.id;
    let d0 = (base + ld.i0) * p.ih;
    let d1 = (base + ld.i1) * p.ih;
    let r00 = (d0 + lh.i0) * p.iw;
    let r01 = (d0 + lh.i1) * p.iw;
    let r10 = (d1 + lh.i0) * p.iw;
    let r11 = (d1 + lh.i1) * p.iw;
    let a = 1.0 - lw.l1;
    let b = lw.l1;
    let v00 = a * src[r00 + lw.i0] + b * src[r00 + lw.i1];
    let v01 = a * src[r01 + lw.i0] + b * src[r01 + lw.i1];
    let v10 = a * src[r10 + lw.i0] + b * src[r10 + lw.i1];
    let v11 = a * src[r11 + lw.i0] + b * src[r11 + lw.i1];
    let v0 = (1.0 - lh.l1) * v00 + lh.l1 * v01;
    let v1 = (1.0 - lh.l1) * v10 + lh.l1 * v11;
    dst[i] = (1.0 - ld.l1) * v0 + ld.l1 * v1;
}

// Outputs [x, y) along one axis whose interpolation may use input `i`: those with
// i0 in {i - 1, i}, which lie in [(i - 1) * s, (i + 2) * s).
fn out_range(i: u32, s: u32, n: u32) -> vec2<u32> {
    var lo = 0u;
    if (i >= 1u) {
        lo = (i - 1u) * s;
    }
    return vec2<u32>(lo, min((i + 2u) * s, n * s));
}

// One invocation per input voxel: sum of weight * dy over the outputs that use it.
@compute @workgroup_size(64)
fn trilinear_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_id(wid, nwg, lid);
    if (i >= p.total) {
        return;
    }
    let w = i % p.iw;
    var t = i / p.iw;
    let h = t % p.ih;
    t = t / p.ih;
    let d = t % p.id;
    let nc = t / p.id;
    let od_n = p.id * p.sd;
    let oh_n = p.ih * p.sh;
    let ow_n = p.iw * p.sw;
    let rd = out_range(d, p.sd, p.id);
    let rh = out_range(h, p.sh, p.ih);
    let rw = out_range(w, p.sw, p.iw);
    var s = 0.0;
    for (var od = rd.x; od < rd.y; od++) {
        let wd = weight_of(od, d, p.sd, p.id);
        if (wd == 0.0) {
            continue;
        }
        for (var oh = rh.x; oh < rh.y; oh++) {
            let wh = weight_of(oh, h, p.sh, p.ih);
            if (wh == 0.0) {
                continue;
            }
            let row = ((nc * od_n + od) * oh_n + oh) * ow_n;
            var acc = 0.0;
            for (var ow = rw.x; ow < rw.y; ow++) {
                acc += weight_of(ow, w, p.sw, p.iw) * src[row + ow];
            }
            s += wd * wh * acc;
        }
    }
    dst[i] = s;
}
