// 3-D max and average pooling over NCDHW volumes, forward and backward.
//
// Windows: output o along an axis covers padded coordinates [o*s, o*s + k), i.e. input
// coordinates [o*s - pad, o*s - pad + k) clipped to [0, n). Padded positions never win a
// max and are not counted in averages (count_include_pad = false). The launcher
// guarantees pad <= k / 2, so every window holds at least one real voxel.
//
// Backward passes are gathers: one invocation per input voxel loops over the windows
// that contain it, in a fixed order, so results are deterministic and race-free.
//
// The file is split into sections (`// @section NAME` lines); the launcher compiles
// the common part (up to the first section) followed by one section, so that entry
// points with different binding layouts never share a module.

struct PoolParams {
    total: u32, id: u32, ih: u32, iw: u32,
    od: u32, oh: u32, ow: u32, kd: u32,
    kh: u32, kw: u32, sd: u32, sh: u32,
    sw: u32, pd: u32, ph: u32, pw: u32,
}

fn linear_id(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + nwg.x * (wid.y + nwg.y * wid.z)) * 64u + lid;
}

// NaN test on the bits (WGSL compilers may assume float NaNs never occur).
fn is_nan(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7fffffffu) > 0x7f800000u;
}

// Input range [x, y) covered by window `o` along an axis of length `n`.
fn window(o: u32, k: u32, s: u32, pad: u32, n: u32) -> vec2<u32> {
    let start = o * s;
    let lo = max(start, pad) - pad;
    let hi = min(start + k, n + pad) - pad;
    return vec2<u32>(lo, hi);
}

// Output windows [x, y] (inclusive; empty when x > y) that contain input coordinate `i`
// along an axis with `o_n` outputs.
fn windows_of(i: u32, k: u32, s: u32, pad: u32, o_n: u32) -> vec2<u32> {
    let q = i + pad;
    var lo = 0u;
    if (q >= k) {
        lo = (q - k) / s + 1u;
    }
    let hi = min(q / s, o_n - 1u);
    return vec2<u32>(lo, hi);
}

// Number of real voxels in output window (od, oh, ow).
fn window_count(od: u32, oh: u32, ow: u32) -> u32 {
    let wd = window(od, p.kd, p.sd, p.pd, p.id);
    let wh = window(oh, p.kh, p.sh, p.ph, p.ih);
    let ww = window(ow, p.kw, p.sw, p.pw, p.iw);
    return (wd.y - wd.x) * (wh.y - wh.x) * (ww.y - ww.x);
}

// @section maxpool_forward

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<storage, read_write> argmax: array<f32>;
@group(0) @binding(3) var<uniform> p: PoolParams;

// One invocation per output element. Scan order d, h, w; a later value wins only if
// strictly greater, so ties keep the first index. NaN beats every number and the first
// NaN wins. `argmax` holds d*H*W + h*W + w within the (n, c) volume as an exact f32.
@compute @workgroup_size(64)
fn maxpool_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_id(wid, nwg, lid);
    if (i >= p.total) {
        return;
    }
    let ow = i % p.ow;
    var t = i / p.ow;
    let oh = t % p.oh;
    t = t / p.oh;
    let od = t % p.od;
    let nc = t / p.od;
    let wd = window(od, p.kd, p.sd, p.pd, p.id);
    let wh = window(oh, p.kh, p.sh, p.ph, p.ih);
    let ww = window(ow, p.kw, p.sw, p.pw, p.iw);
    let base = nc * p.id * p.ih * p.iw;
    var best_idx = (wd.x * p.ih + wh.x) * p.iw + ww.x;
    var best = x[base + best_idx];
    for (var d = wd.x; d < wd.y; d++) {
        for (var h = wh.x; h < wh.y; h++) {
            for (var w = ww.x; w < ww.y; w++) {
                let idx = (d * p.ih + h) * p.iw + w;
                let v = x[base + idx];
                if (!is_nan(best) && (is_nan(v) || v > best)) {
                    best = v;
                    best_idx = idx;
                }
            }
        }
    }
    y[i] = best;
    argmax[i] = f32(best_idx);
}

// @section maxpool_backward

@group(0) @binding(0) var<storage, read> dy: array<f32>;
@group(0) @binding(1) var<storage, read> argmax: array<f32>;
@group(0) @binding(2) var<storage, read_write> dx: array<f32>;
@group(0) @binding(3) var<uniform> p: PoolParams;

// One invocation per input voxel: dx = sum of dy over the windows whose argmax is it.
@compute @workgroup_size(64)
fn maxpool_backward(
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
    let me = (d * p.ih + h) * p.iw + w;
    let rd = windows_of(d, p.kd, p.sd, p.pd, p.od);
    let rh = windows_of(h, p.kh, p.sh, p.ph, p.oh);
    let rw = windows_of(w, p.kw, p.sw, p.pw, p.ow);
    var s = 0.0;
    for (var od = rd.x; od <= rd.y; od++) {
        for (var oh = rh.x; oh <= rh.y; oh++) {
            for (var ow = rw.x; ow <= rw.y; ow++) {
                let o = ((nc * p.od + od) * p.oh + oh) * p.ow + ow;
                if (u32(argmax[o]) == me) {
                    s += dy[o];
                }
            }
        }
    }
    dx[i] = s;
}

// @section avgpool

@group(0) @binding(0) var<storage, read> src: array<f32>;
@group(0) @binding(1) var<storage, read_write> dst: array<f32>;
@group(0) @binding(2) var<uniform> p: PoolParams;

// One invocation per output element: mean of the real voxels of its window.
@compute @workgroup_size(64)
fn avgpool_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_id(wid, nwg, lid);
    if (i >= p.total) {
        return;
    }
    let ow = i % p.ow;
    var t = i / p.ow;
    let oh = t % p.oh;
    t = t / p.oh;
    let od = t % p.od;
    let nc = t / p.od;
    let wd = window(od, p.kd, p.sd, p.pd, p.id);
    let wh = window(oh, p.kh, p.sh, p.ph, p.ih);
    let ww = window(ow, p.kw, p.sw, p.pw, p.iw);
    let base = nc * p.id * p.ih * p.iw;
    var s = 0.0;
    for (var d = wd.x; d < wd.y; d++) {
        for (var h = wh.x; h < wh.y; h++) {
            for (var w = ww.x; w < ww.y; w++) {
                s += src[base + (d * p.ih + h) * p.iw + w];
            }
        }
    }
    dst[i] = s / f32((wd.y - wd.x) * (wh.y - wh.x) * (ww.y - ww.x));
}

// One invocation per input voxel (src = dy, dst = dx): sum of dy / count over the
// windows that contain it.
@compute @workgroup_size(64)
fn avgpool_backward(
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
    let rd = windows_of(d, p.kd, p.sd, p.pd, p.od);
    let rh = windows_of(h, p.kh, p.sh, p.ph, p.oh);
    let rw = windows_of(w, p.kw, p.sw, p.pw, p.ow);
    var s = 0.0;
    for (var od = rd.x; od <= rd.y; od++) {
        for (var oh = rh.x; oh <= rh.y; oh++) {
            for (var ow = rw.x; ow <= rw.y; ow++) {
                let o = ((nc * p.od + od) * p.oh + oh) * p.ow + ow;
                s += dy_over_count(o, od, oh, ow);
            }
        }
    }
    dst[i] = s;
}

fn dy_over_count(o: u32, od: u32, oh: u32, ow: u32) -> f32 {
    return src[o] / f32(window_count(od, oh, ow));
}
