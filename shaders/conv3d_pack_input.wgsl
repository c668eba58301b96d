// Input layout for conv3d.wgsl.
//
// pack_input: a channel range of an NCDHW tensor -> [N][ceil(C/4)][Dp][Hp][Wp] of
// vec4 (4 channels per load), zero padding written explicitly so the convolution's
// inner loop has no bounds checks. Wp also covers the overhang of the last W tile.
// With dilation s (the input gradient of a strided conv) source voxel u sits at packed
// position pad + u * s and the positions between are zero; pads are signed.

struct PackInputParams {
    n: u32, cin: u32, c_total: u32, c_off: u32,
    id: u32, ih: u32, iw: u32, c4: u32,
    dp: u32, hp: u32, wp: u32, total: u32,
    pd: i32, ph: i32, pw: i32, pad0: u32,
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
    let i = (wid.x + nwg.x * (wid.y + nwg.y * wid.z)) * 64u + lid;
    if (i >= p.total) {
        return;
    }
    let x = i % p.wp;
    let r1 = i / p.wp;
    let y = r1 % p.hp;
    let r2 = r1 / p.hp;
    let z = r2 % p.dp;
    let r3 = r2 / p.dp;
    let c4 = r3 % p.c4;
    let n = r3 / p.c4;
    let ux = i32(x) - p.pw;
    let uy = i32(y) - p.ph;
    let uz = i32(z) - p.pd;
    let ix = ux / i32(p.sw);
    let iy = uy / i32(p.sh);
    let iz = uz / i32(p.sd);
    let on_grid = ux >= 0 && uy >= 0 && uz >= 0
        && ux % i32(p.sw) == 0 && uy % i32(p.sh) == 0 && uz % i32(p.sd) == 0;
    var v = vec4<f32>(0.0);
    if (on_grid && ix < i32(p.iw) && iy < i32(p.ih) && iz < i32(p.id)) {
        let vox = (u32(iz) * p.ih + u32(iy)) * p.iw + u32(ix);
        let vol = p.id * p.ih * p.iw;
        for (var k = 0u; k < 4u; k++) {
            let c = c4 * 4u + k;
            if (c < p.cin) {
                v[k] = src[(n * p.c_total + p.c_off + c) * vol + vox];
            }
        }
    }
    dst[i] = v;
}
