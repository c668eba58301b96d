// Input layout for conv3d.wgsl.
//
// pack_input: a channel range of an NCDHW tensor -> [N][ceil(C/4)][Dp][Hp][Wp] of
// vec4 (4 channels per load), zero padding written explicitly so the convolution's
// inner loop has no bounds checks. Wp also covers the overhang of the last W tile.
// With dilation s (the input gradient of a strided conv) source voxel u sits at packed
// position pad + u * s and the positions between are zero; pads are signed.
//
// Each invocation fills XV consecutive positions of one packed row, so the index
// arithmetic (integer division, slow on CPU-type drivers: lavapipe packed at about
// 1 GB/s with one position per invocation) is done once per XV positions; the
// dilation arithmetic is compiled in only when DILATED.

override DILATED: bool = true;
const XV: u32 = 4u;

struct PackInputParams {
    n: u32, cin: u32, c_total: u32, c_off: u32,
    id: u32, ih: u32, iw: u32, c4: u32,
    dp: u32, hp: u32, wp: u32, total: u32,
    pd: i32, ph: i32, pw: i32, x_chunks: u32,
    sd: u32, sh: u32, sw: u32, pad1: u32,
}

@group(0) @binding(0) var<storage, read> src: array<f32>;
@group(0) @binding(1) var<storage, read_write> dst: array<vec4<f32>>;
@group(0) @binding(2) var<uniform> p: PackInputParams;

@compute @workgroup_size(64)
fn pack_input(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    // `total` counts invocations: rows x x_chunks.
    let i = (wid.x + nwg.x * (wid.y + nwg.y * wid.z)) * 64u + lid;
    if (i >= p.total) {
        return;
    }
    let x0 = (i % p.x_chunks) * XV;
    let row = i / p.x_chunks;
    let y = row % p.hp;
    let r2 = row / p.hp;
    let z = r2 % p.dp;
    let r3 = r2 / p.dp;
    let c4 = r3 % p.c4;
    let n = r3 / p.c4;
    let uy = i32(y) - p.ph;
    let uz = i32(z) - p.pd;
    var iy = uy;
    var iz = uz;
    var row_ok = uy >= 0 && uz >= 0;
    if (DILATED) {
        iy = uy / i32(p.sh);
        iz = uz / i32(p.sd);
        row_ok = row_ok && uy % i32(p.sh) == 0 && uz % i32(p.sd) == 0;
    }
    row_ok = row_ok && iy < i32(p.ih) && iz < i32(p.id);
    let vol = p.id * p.ih * p.iw;
    let src_row = (n * p.c_total + p.c_off + c4 * 4u) * vol + (u32(max(iz, 0)) * p.ih + u32(max(iy, 0))) * p.iw;
    let dst_row = row * p.wp;
    for (var t = 0u; t < XV; t++) {
        let x = x0 + t;
        if (x >= p.wp) {
            return;
        }
        let ux = i32(x) - p.pw;
        var ix = ux;
        var ok = row_ok && ux >= 0;
        if (DILATED) {
            ix = ux / i32(p.sw);
            ok = ok && ux % i32(p.sw) == 0;
        }
        var v = vec4<f32>(0.0);
        if (ok && ix < i32(p.iw)) {
            for (var k = 0u; k < 4u; k++) {
                if (c4 * 4u + k < p.cin) {
                    v[k] = src[src_row + k * vol + u32(ix)];
                }
            }
        }
        dst[dst_row + x] = v;
    }
}
