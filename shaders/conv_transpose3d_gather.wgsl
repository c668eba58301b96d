// Transposed convolution in gather form for large strides (BuiNet's x2..x16 up-sampling):
// each output voxel sums only the input voxels whose kernel footprint covers it, instead
// of running a dense convolution over the stride-dilated input (s^3 times the work).
// Grouped: `cin_g` input and `cout_g` output channels per group; no bias.
struct P {
    total: u32, cin_g: u32, cout_g: u32, in_c: u32,
    in_off: u32, out_c: u32, out_off: u32, id: u32,
    ih: u32, iw: u32, od: u32, oh: u32,
    ow: u32, k: u32, s: u32, pad: u32,
}
@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> w: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<uniform> p: P;

// Input positions i with 0 <= o + pad - i*s < k, clipped to [0, n): [lo, hi).
fn taps(o: u32, n: u32) -> vec2<u32> {
    let a = i32(o + p.pad);
    let num = a - i32(p.k) + 1;
    var lo = 0;
    if (num > 0) {
        lo = (num + i32(p.s) - 1) / i32(p.s);
    }
    let hi = min(a / i32(p.s) + 1, i32(n));
    return vec2<u32>(u32(lo), u32(max(hi, lo)));
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + nwg.x * (wid.y + nwg.y * wid.z)) * 64u + lid;
    if (i >= p.total) { return; }
    let ox = i % p.ow;
    var t = i / p.ow;
    let oy = t % p.oh;
    t = t / p.oh;
    let oz = t % p.od;
    t = t / p.od;
    let co = t % p.cout_g;
    let n = t / p.cout_g;
    let rz = taps(oz, p.id);
    let ry = taps(oy, p.ih);
    let rx = taps(ox, p.iw);
    let vol = p.id * p.ih * p.iw;
    let k3 = p.k * p.k * p.k;
    var acc = 0.0;
    for (var ci = 0u; ci < p.cin_g; ci = ci + 1u) {
        let xb = (n * p.in_c + p.in_off + ci) * vol;
        let wb = (ci * p.cout_g + co) * k3;
        for (var z = rz.x; z < rz.y; z = z + 1u) {
            let tz = oz + p.pad - z * p.s;
            for (var yy = ry.x; yy < ry.y; yy = yy + 1u) {
                let ty = oy + p.pad - yy * p.s;
                let xrow = xb + (z * p.ih + yy) * p.iw;
                let wrow = wb + (tz * p.k + ty) * p.k;
                for (var xx = rx.x; xx < rx.y; xx = xx + 1u) {
                    let tx = ox + p.pad - xx * p.s;
                    acc = acc + x[xrow + xx] * w[wrow + tx];
                }
            }
        }
    }
    y[(((n * p.out_c + p.out_off + co) * p.od + oz) * p.oh + oy) * p.ow + ox] = acc;
}
