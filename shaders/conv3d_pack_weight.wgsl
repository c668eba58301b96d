// Weight layout for conv3d.wgsl: [Cout][Cin][KD][KH][KW] -> [co_tile][ci4][KD][KH][TC][KW]
// of vec4 over 4 input channels, zero past Cout and Cin (see conv3d_pack_input.wgsl).
// With `flip` set it packs the weight of the input gradient instead: input and output
// channels swapped and the kernel mirrored on every axis (a transposed convolution).

struct PackWeightParams {
    cout: u32, cin: u32, c4: u32, tc: u32,
    kd: u32, kh: u32, kw: u32, total: u32,
    flip: u32, pad0: u32, pad1: u32, pad2: u32,
}

@group(0) @binding(0) var<storage, read> src: array<f32>;
@group(0) @binding(1) var<storage, read_write> dst: array<vec4<f32>>;
@group(0) @binding(2) var<uniform> p: PackWeightParams;

@compute @workgroup_size(64)
fn pack_weight(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = (wid.x + nwg.x * (wid.y + nwg.y * wid.z)) * 64u + lid;
    if (i >= p.total) {
        return;
    }
    let kx = i % p.kw;
    let r1 = i / p.kw;
    let c = r1 % p.tc;
    let r2 = r1 / p.tc;
    let ky = r2 % p.kh;
    let r3 = r2 / p.kh;
    let kz = r3 % p.kd;
    let r4 = r3 / p.kd;
    let ci4 = r4 % p.c4;
    let cot = r4 / p.c4;
    let co = cot * p.tc + c;
    var v = vec4<f32>(0.0);
    if (co < p.cout) {
        for (var k = 0u; k < 4u; k++) {
            let ci = ci4 * 4u + k;
            if (ci < p.cin) {
                if (p.flip == 0u) {
                    v[k] = src[(((co * p.cin + ci) * p.kd + kz) * p.kh + ky) * p.kw + kx];
                } else {
                    // Source is [cin][cout][...] here: this pass's cout is the forward's cin.
                    let fz = p.kd - 1u - kz;
                    let fy = p.kh - 1u - ky;
                    let fx = p.kw - 1u - kx;
                    v[k] = src[(((ci * p.cout + co) * p.kd + fz) * p.kh + fy) * p.kw + fx];
                }
            }
        }
    }
    dst[i] = v;
}
