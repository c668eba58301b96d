// Transposed convolution as phase-decomposed stride-1 convolutions (ops/conv_transpose3d.rs).
//
// Along one axis (stride s, kernel K, cropping pad_lo) output position o receives the
// taps k = c + s*m of input voxels i = u - m, where q = o + pad_lo, u = q div s and the
// tap class c = q mod s. Class c thus uses the sub-kernel w[c + s*m] of
// M_c = ceil((K - c) / s) taps, and its values over u form a stride-1 convolution of the
// input (run by conv3d_forward with that sub-kernel mirrored and M_c - 1 voxels of zero
// padding in front). The phase tensor holds one block of Cout channels per class
// (cd, ch, cw) that has taps, over the extents (TD, TH, TW) of u.
//
// Per axis the classes split in two sets: [0, e) with ceil(K/s) taps and [e, s) with
// floor(K/s) taps (e = K mod s). The classes of one set triple (gd, gh, gw) share a
// kernel extent and so one convolution; their blocks are consecutive, in lexicographic
// class order, from block g{gd*4 + gh*2 + gw}. NONE marks a triple without taps (K < s):
// those output positions get the bias only.
//
// The file is split into sections (`// @section NAME` lines); the launcher compiles the
// common part (up to the first section) followed by `phase_weight`, `pack_phase_weights`
// or `pack_pair_weights`, or by `interleave` and then `scalar` or `vec4`, so entry points
// whose bindings differ never share a module.

const NONE: u32 = 0xffffffffu;

fn linear_id(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + nwg.x * (wid.y + nwg.y * wid.z)) * 64u + lid;
}

// @section phase_weight

// One group's weight for conv3d_forward: [classes * Cout, Cin, MD, MH, MW] from the
// transposed conv's [Cin, Cout, KD, KH, KW]. Output channel b * Cout + co is class
// (fd + ld, fh + lh, fw + lw) with b = (ld * NH + lh) * NW + lw; tap t reads kernel
// position c + s * (M - 1 - t) (mirrored: the convolution walks the input forwards).
struct PhaseWeightParams {
    cin: u32, cout: u32, kd: u32, kh: u32,
    kw: u32, md: u32, mh: u32, mw: u32,
    sd: u32, sh: u32, sw: u32, total: u32,
    fd: u32, fh: u32, fw: u32, pad0: u32,
    nd: u32, nh: u32, nw: u32, pad1: u32,
}

@group(0) @binding(0) var<storage, read> src: array<f32>;
@group(0) @binding(1) var<storage, read_write> dst: array<f32>;
@group(0) @binding(2) var<uniform> p: PhaseWeightParams;

@compute @workgroup_size(64)
fn phase_weight(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_id(wid, nwg, lid);
    if (i >= p.total) {
        return;
    }
    let tw = i % p.mw;
    var r = i / p.mw;
    let th = r % p.mh;
    r = r / p.mh;
    let td = r % p.md;
    r = r / p.md;
    let ci = r % p.cin;
    r = r / p.cin;
    let co = r % p.cout;
    let b = r / p.cout;
    let lw = b % p.nw;
    let lh = (b / p.nw) % p.nh;
    let ld = b / (p.nw * p.nh);
    let kz = p.fd + ld + p.sd * (p.md - 1u - td);
    let ky = p.fh + lh + p.sh * (p.mh - 1u - th);
    let kx = p.fw + lw + p.sw * (p.mw - 1u - tw);
    dst[i] = src[(((ci * p.cout + co) * p.kd + kz) * p.kh + ky) * p.kw + kx];
}

// @section pack_phase_weights

// Every group's weight already in conv3d_forward's packed layout, in one pass (one
// dispatch instead of phase_weight + pack_weight per group: sixteen small dispatches for
// k=3 s=2, a fifth of the transposed conv's time on lavapipe). Group g occupies vec4s
// [off, end) as [co_tile][ci4][MD][MH][TC][MW] (see conv3d_pack_weight.wgsl) of its
// convolution's weight, whose output channel b * Cout + co is class block b (as in
// phase_weight above); zero past the group's channels and past Cin.
struct PackPhaseParams {
    cin: u32, cout: u32, c4: u32, groups: u32,
    kd: u32, kh: u32, kw: u32, total: u32,
    sd: u32, sh: u32, sw: u32, pad0: u32,
    // Per group: (off, end, tc, -), (md, mh, mw, -), (fd, fh, fw, -), (nd, nh, nw, -).
    g: array<vec4<u32>, 32>,
}

@group(0) @binding(0) var<storage, read> src: array<f32>;
@group(0) @binding(1) var<storage, read_write> dst: array<vec4<f32>>;
@group(0) @binding(2) var<uniform> p: PackPhaseParams;

@compute @workgroup_size(64)
fn pack_phase_weights(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_id(wid, nwg, lid);
    if (i >= p.total) {
        return;
    }
    var g = 0u;
    for (var k = 1u; k < p.groups; k++) {
        if (i >= p.g[4u * k].x) {
            g = k;
        }
    }
    let head = p.g[4u * g];
    let m = p.g[4u * g + 1u].xyz;
    let f = p.g[4u * g + 2u].xyz;
    let nc = p.g[4u * g + 3u].xyz;
    let tc = head.z;
    let j = i - head.x;
    let tw = j % m.z;
    var r = j / m.z;
    let c = r % tc;
    r = r / tc;
    let th = r % m.y;
    r = r / m.y;
    let td = r % m.x;
    r = r / m.x;
    let ci4 = r % p.c4;
    let co_all = (r / p.c4) * tc + c;
    let b = co_all / p.cout;
    var v = vec4<f32>(0.0);
    if (b < nc.x * nc.y * nc.z) {
        let co = co_all % p.cout;
        let lw = b % nc.z;
        let lh = (b / nc.z) % nc.y;
        let ld = b / (nc.z * nc.y);
        let kz = f.x + ld + p.sd * (m.x - 1u - td);
        let ky = f.y + lh + p.sh * (m.y - 1u - th);
        let kx = f.z + lw + p.sw * (m.z - 1u - tw);
        for (var k = 0u; k < 4u; k++) {
            let ci = ci4 * 4u + k;
            if (ci < p.cin) {
                v[k] = src[(((ci * p.cout + co) * p.kd + kz) * p.kh + ky) * p.kw + kx];
            }
        }
    }
    dst[i] = v;
}

// @section pack_pair_weights

// k = s = 2 without cropping as one 1x1x1 product (conv3d_pointwise.wgsl, pairs
// epilogue): the weight in the pointwise kernel's packed layout [co_tile][ci4][TC] of
// vec4 (conv3d_pack_weight.wgsl, kernel 1x1x1), product channel j = (q * Cout + co) * 2
// + pw for class (pd, ph, pw), q = pd * 2 + ph, so a tile holds both W classes of its
// channels and their 8 interleaved outputs leave as two vec4 stores. Zero past 8 Cout
// channels and past Cin.
struct PackPairParams {
    cin: u32, cout: u32, c4: u32, tc: u32,
    total: u32, pad0: u32, pad1: u32, pad2: u32,
}

@group(0) @binding(0) var<storage, read> src: array<f32>;
@group(0) @binding(1) var<storage, read_write> dst: array<vec4<f32>>;
@group(0) @binding(2) var<uniform> p: PackPairParams;

@compute @workgroup_size(64)
fn pack_pair_weights(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_id(wid, nwg, lid);
    if (i >= p.total) {
        return;
    }
    let c = i % p.tc;
    let r = i / p.tc;
    let ci4 = r % p.c4;
    let j = (r / p.c4) * p.tc + c;
    let pair = j / 2u;
    let q = pair / p.cout;
    var v = vec4<f32>(0.0);
    if (q < 4u) {
        let co = pair % p.cout;
        // Kernel position (pd, ph, pw) = (q / 2, q % 2, j % 2).
        let tap = q * 2u + j % 2u;
        for (var k = 0u; k < 4u; k++) {
            let ci = ci4 * 4u + k;
            if (ci < p.cin) {
                v[k] = src[(ci * p.cout + co) * 8u + tap];
            }
        }
    }
    dst[i] = v;
}

// @section interleave

// Shared by the two interleave entry points (sections `scalar` and `vec4`, which add the
// output binding). One invocation per output row (n, co, oz, oy) of the channel range:
// each position takes the phase value of its class (zero for a class without taps) plus
// the bias. Cropping (pad_lo, pad_hi) and output padding need nothing more: the phase
// extents cover every u an output position asks for, and the convolutions' zero padding
// makes positions past the input read zero. Along the row the W class and u advance by
// counting (integer division per element made this kernel 10x slower on lavapipe).
struct InterleaveParams {
    rows: u32, cout: u32, out_c_total: u32, out_c_off: u32,
    od: u32, oh: u32, ow: u32, phase_c: u32,
    td: u32, th: u32, tw: u32, has_bias: u32,
    sd: u32, sh: u32, sw: u32, relu: u32,
    pd: u32, ph: u32, pw: u32, pad1: u32,
    ed: u32, eh: u32, ew: u32, pad2: u32,
    g0: u32, g1: u32, g2: u32, g3: u32,
    g4: u32, g5: u32, g6: u32, g7: u32,
}

@group(0) @binding(0) var<storage, read> phases: array<f32>;
@group(0) @binding(1) var<storage, read> bias: array<f32>;
@group(0) @binding(3) var<uniform> p: InterleaveParams;

// Where output position o of one axis lives: phase index u, class set grp, the class's
// position within its set and the set's length.
struct AxisPhase {
    u: u32,
    grp: u32,
    pos: u32,
    len: u32,
}

fn axis_phase(o: u32, s: u32, pad: u32, e: u32) -> AxisPhase {
    let q = o + pad;
    let c = q % s;
    if (c < e) {
        return AxisPhase(q / s, 0u, c, e);
    }
    return AxisPhase(q / s, 1u, c - e, s - e);
}

fn first_block(g: u32) -> u32 {
    switch g {
        case 0u: { return p.g0; }
        case 1u: { return p.g1; }
        case 2u: { return p.g2; }
        case 3u: { return p.g3; }
        case 4u: { return p.g4; }
        case 5u: { return p.g5; }
        case 6u: { return p.g6; }
        default: { return p.g7; }
    }
}

// One output row: where it starts, the bias, and for each W class set the phase
// index of its first class at u = 0 (NONE without taps); c and u of position 0.
struct Row {
    obase: u32,
    bias: f32,
    base0: u32,
    base1: u32,
    cstride: u32,
    c: u32,
    u: u32,
}

fn row_of(i: u32) -> Row {
    let oy = i % p.oh;
    var r = i / p.oh;
    let oz = r % p.od;
    r = r / p.od;
    let co = r % p.cout;
    let n = r / p.cout;
    let az = axis_phase(oz, p.sd, p.pd, p.ed);
    let ay = axis_phase(oy, p.sh, p.ph, p.eh);
    let g = az.grp * 4u + ay.grp * 2u;
    // Block of the (z, y) classes' first W class in each W set.
    let zy = az.pos * ay.len + ay.pos;
    let first0 = first_block(g);
    let first1 = first_block(g + 1u);
    let vol = p.td * p.th * p.tw;
    let chan = n * p.phase_c + co;
    let plane = (az.u * p.th + ay.u) * p.tw;
    var row: Row;
    row.obase = ((n * p.out_c_total + p.out_c_off + co) * p.od + oz) * p.oh * p.ow + oy * p.ow;
    row.bias = 0.0;
    if (p.has_bias != 0u) {
        row.bias = bias[co];
    }
    row.base0 = NONE;
    if (first0 != NONE) {
        row.base0 = (chan + (first0 + zy * p.ew) * p.cout) * vol + plane;
    }
    row.base1 = NONE;
    if (first1 != NONE) {
        row.base1 = (chan + (first1 + zy * (p.sw - p.ew)) * p.cout) * vol + plane;
    }
    row.cstride = p.cout * vol;
    row.c = p.pw % p.sw;
    row.u = p.pw / p.sw;
    return row;
}

// ReLU when asked (select, not max: NaN must propagate, see elementwise.wgsl).
fn epilogue(v: f32) -> f32 {
    if (p.relu != 0u) {
        return select(v, 0.0, v < 0.0);
    }
    return v;
}

// The phase value at the row's current W position (0 for a class without taps), then
// one position on.
fn take(row: ptr<function, Row>) -> f32 {
    let c = (*row).c;
    var v = 0.0;
    if (c < p.ew) {
        if ((*row).base0 != NONE) {
            v = phases[(*row).base0 + c * (*row).cstride + (*row).u];
        }
    } else if ((*row).base1 != NONE) {
        v = phases[(*row).base1 + (c - p.ew) * (*row).cstride + (*row).u];
    }
    if (c + 1u == p.sw) {
        (*row).c = 0u;
        (*row).u += 1u;
    } else {
        (*row).c = c + 1u;
    }
    return v;
}

// @section scalar

@group(0) @binding(2) var<storage, read_write> dst: array<f32>;

@compute @workgroup_size(64)
fn interleave(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_id(wid, nwg, lid);
    if (i >= p.rows) {
        return;
    }
    var row = row_of(i);
    for (var ox = 0u; ox < p.ow; ox++) {
        dst[row.obase + ox] = epilogue(take(&row) + row.bias);
    }
}

// @section vec4

// Rows of a multiple of 4 positions: one vec4 store per 4 positions (lavapipe: the
// kernel takes 25 % less time than with scalar stores).
@group(0) @binding(2) var<storage, read_write> dst: array<vec4<f32>>;

@compute @workgroup_size(64)
fn interleave_vec4(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_id(wid, nwg, lid);
    if (i >= p.rows) {
        return;
    }
    var row = row_of(i);
    let base = row.obase / 4u;
    for (var x4 = 0u; x4 < p.ow / 4u; x4++) {
        let v0 = take(&row);
        let v1 = take(&row);
        let v2 = take(&row);
        let v3 = take(&row);
        dst[base + x4] = vec4<f32>(
            epilogue(v0 + row.bias),
            epilogue(v1 + row.bias),
            epilogue(v2 + row.bias),
            epilogue(v3 + row.bias),
        );
    }
}
