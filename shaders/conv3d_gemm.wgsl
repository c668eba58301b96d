// conv3d forward as a workgroup-shared tiled implicit GEMM (no subgroups: runs on GL too).
//
//   M = output voxels (N·D·H·W), N = output channels, K = ceil(Cin/4)·KD·KH·KW vec4
//   (4 input channels per vec4, the packed layouts of conv3d_pack_input.wgsl and
//   conv3d_pack_weight.wgsl with TC = BN).
//
// A workgroup of 64 invocations computes a BM x BN output tile. It walks K in slices of
// BK vec4: all invocations gather the A slice (im2col of the packed input, which has
// zero borders, so no bounds checks) and the B slice (packed weights) into workgroup
// arrays, barrier, then each invocation accumulates its TM x TN register tile (rows
// tm + i·(BM/TM), columns tn + j·(BN/TN): consecutive invocations take consecutive
// output voxels, so shared reads and output stores are contiguous). Every output sums
// its K terms in the same order whatever the tile, so all tiles give identical results.
// The register tile is generated unrolled by ops/conv3d_gemm.rs into ACC_DECL,
// MAC_BLOCK and EPILOGUE (see conv3d.wgsl for why).
//
// Prelude consts: BM, BN, BK, TM, TN (BM and BN divide 64, (BM/TM)·(BN/TN) = 64),
// KD, KH, KW.

override HAS_BIAS: bool = false;
override RELU: bool = false;

struct GemmParams {
    m: u32, k4: u32, cout: u32, c4: u32,
    dp: u32, hp: u32, wp: u32, sd: u32,
    sh: u32, sw: u32, od: u32, oh: u32,
    ow: u32, out_c_total: u32, out_c_off: u32, n_tiles: u32,
    total_wg: u32, w_tile: u32, pad0: u32, pad1: u32,
}

@group(0) @binding(0) var<storage, read> inp: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> wts: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> bias: array<f32>;
@group(0) @binding(3) var<storage, read_write> output: array<f32>;
@group(0) @binding(4) var<uniform> p: GemmParams;

const SM: u32 = BM / TM;
const SN: u32 = BN / TN;

var<workgroup> a_tile: array<vec4<f32>, BK * BM>;
var<workgroup> b_tile: array<vec4<f32>, BK * BN>;

// Offset of K index k (= ((ci4·KD + kz)·KH + ky)·KW + kx) in the packed input.
fn k_offset(k: u32) -> u32 {
    let kx = k % KW;
    let t = k / KW;
    let ky = t % KH;
    let t2 = t / KH;
    let kz = t2 % KD;
    let ci4 = t2 / KD;
    return ((ci4 * p.dp + kz) * p.hp + ky) * p.wp + kx;
}

@compute @workgroup_size(64)
fn conv3d_gemm(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    // Uniform per workgroup, so the barriers below stay in uniform control flow.
    let wg = wid.x + nwg.x * (wid.y + nwg.y * wid.z);
    if (wg >= p.total_wg) {
        return;
    }
    let nt = wg % p.n_tiles;
    let mt = wg / p.n_tiles;
    let m0 = mt * BM;
    let c0 = nt * BN;

    // The A row this invocation gathers (BM divides 64, so it is fixed); rows past M
    // read the last voxel and are never stored.
    let ml = lid % BM;
    let mg = min(m0 + ml, p.m - 1u);
    let ox = mg % p.ow;
    let r1 = mg / p.ow;
    let oy = r1 % p.oh;
    let r2 = r1 / p.oh;
    let oz = r2 % p.od;
    let nb = r2 / p.od;
    let a_base = ((nb * p.c4 * p.dp + oz * p.sd) * p.hp + oy * p.sh) * p.wp + ox * p.sw;
    // The B column this invocation loads (BN divides 64).
    let nl = lid % BN;
    let b_base = nt * p.w_tile + nl * KW;

    let tm = lid % SM;
    let tn = lid / SM;
    //{{ACC_DECL}}
    for (var k0 = 0u; k0 < p.k4; k0 += BK) {
        for (var e = lid; e < BK * BM; e += 64u) {
            let k = k0 + e / BM;
            var v = vec4<f32>(0.0);
            if (k < p.k4) {
                v = inp[a_base + k_offset(k)];
            }
            a_tile[e] = v;
        }
        for (var e = lid; e < BK * BN; e += 64u) {
            let k = k0 + e / BN;
            var v = vec4<f32>(0.0);
            if (k < p.k4) {
                // Packed weight: [co_tile][ci4][KD][KH][BN][KW].
                v = wts[b_base + (k / KW) * (BN * KW) + k % KW];
            }
            b_tile[e] = v;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            let ar = kk * BM + tm;
            let br = kk * BN + tn;
            //{{MAC_BLOCK}}
        }
        workgroupBarrier();
    }
    let ovol = p.od * p.oh * p.ow;
    //{{EPILOGUE}}
}

// Writes output voxel m0 + tm + i·SM of channel c0 + tn + j·SN: bias, ReLU, bounds.
fn store(m: u32, c: u32, ovol: u32, v: f32) {
    if (m >= p.m || c >= p.cout) {
        return;
    }
    var r = v;
    if (HAS_BIAS) {
        r += bias[c];
    }
    if (RELU) {
        // select, not max: NaN must propagate (see elementwise.wgsl).
        r = select(r, 0.0, r < 0.0);
    }
    let nb = m / ovol;
    output[(nb * p.out_c_total + p.out_c_off + c) * ovol + m % ovol] = r;
}
