//! Batched matrix products and row softmax, forward and backward: the building blocks of
//! the non-local (self-attention) block. f64 CPU references included.
//!
//! Matrix view of a tensor: a `Shape5` `[s0, s1, s2, rows, cols]` is `s0·s1·s2` row-major
//! `rows x cols` matrices (normally `[1, 1, batch, rows, cols]`; leading dims other than 1
//! simply fold into the batch). [`batched_matmul`] computes, per batch item,
//! `C = op(A) · op(B)` with `A [batch, M, K]` (`[batch, K, M]` if `trans_a`),
//! `B [batch, K, N]` (`[batch, N, K]` if `trans_b`) and `C [batch, M, N]`. The shader is
//! register-tiled (4x4 outputs per invocation, 32x32 per workgroup, K staged through
//! workgroup memory); transposes are strides, so the backward products reuse it.
//! Row softmax works along the last axis (`cols`), one workgroup per row.

use crate::error::{Error, Result};
use crate::gpu::{GpuContext, PipelineKey, Recorder};
use crate::ops::conv3d::u32s;
use crate::ops::params::{launch, Arg};
use crate::tensor::{Shape5, Tensor};
use ndarray::Array5;

const SRC: &str = include_str!("../../shaders/matmul.wgsl");
/// Output block of one workgroup (must match `BM`/`BN` in the shader).
const BLOCK: usize = 32;

/// `(batch, rows, cols)` of a shape's matrix view.
fn view(s: Shape5) -> (usize, usize, usize) {
    (s.0[0] * s.0[1] * s.0[2], s.0[3], s.0[4])
}

fn check_distinct(op: &str, out: &Tensor, inputs: &[&Tensor]) -> Result<()> {
    if let Some(t) = inputs.iter().find(|t| t.buffer() == out.buffer()) {
        return Err(Error::InvalidArgument(format!(
            "{op}: output '{}' must not alias input '{}'",
            out.name, t.name
        )));
    }
    Ok(())
}

/// Checks `C = op(A) · op(B)` shapes; returns `(batch, M, K, N)`.
fn check_matmul(
    op: &str,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    trans_a: bool,
    trans_b: bool,
) -> Result<(usize, usize, usize, usize)> {
    for t in [a, b, c] {
        if t.shape().has_zero() {
            return Err(Error::Shape(format!(
                "{op}: '{}' {} has a zero-sized dimension",
                t.name,
                t.shape()
            )));
        }
    }
    let (ba, ra, ca) = view(a.shape());
    let (bb, rb, cb) = view(b.shape());
    let (bc, rc, cc) = view(c.shape());
    let (m, k) = if trans_a { (ca, ra) } else { (ra, ca) };
    let (kb, n) = if trans_b { (cb, rb) } else { (rb, cb) };
    if ba != bb || ba != bc {
        return Err(Error::Shape(format!(
            "{op}: batch counts differ: '{}' {} has {ba}, '{}' {} has {bb}, '{}' {} has {bc} \
             (batch = product of the first three dims)",
            a.name,
            a.shape(),
            b.name,
            b.shape(),
            c.name,
            c.shape()
        )));
    }
    if k != kb {
        return Err(Error::Shape(format!(
            "{op}: inner dimensions do not match: op('{}' {}) is {m}x{k} (trans_a = {trans_a}) \
             but op('{}' {}) is {kb}x{n} (trans_b = {trans_b})",
            a.name,
            a.shape(),
            b.name,
            b.shape()
        )));
    }
    if (rc, cc) != (m, n) {
        return Err(Error::Shape(format!(
            "{op}: output '{}' {} is {rc}x{cc} per batch item but op('{}') · op('{}') is {m}x{n}",
            c.name,
            c.shape(),
            a.name,
            b.name
        )));
    }
    check_distinct(op, c, &[a, b])?;
    Ok((ba, m, k, n))
}

#[allow(clippy::too_many_arguments)]
fn record_matmul(
    ctx: &GpuContext,
    rec: &mut Recorder,
    op: &str,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    trans_a: bool,
    trans_b: bool,
) -> Result<()> {
    let (batch, m, k, n) = check_matmul(op, a, b, c, trans_a, trans_b)?;
    let (sam, sak) = if trans_a { (1, m) } else { (k, 1) };
    let (sbk, sbn) = if trans_b { (1, k) } else { (n, 1) };
    let (tiles_m, tiles_n) = (m.div_ceil(BLOCK), n.div_ceil(BLOCK));
    let blocks = batch
        .checked_mul(tiles_m * tiles_n)
        .ok_or_else(|| Error::Limit(format!("{op}: too many output blocks")))?;
    // Every flat index must fit in u32.
    u32s(&[
        a.shape().numel()?,
        b.shape().numel()?,
        c.shape().numel()?,
        blocks.saturating_mul(64),
    ])?;
    let params = u32s(&[
        batch,
        m,
        n,
        k,
        sam,
        sak,
        sbk,
        sbn,
        m * k,
        k * n,
        tiles_m,
        tiles_n,
        0,
        0,
        0,
        0,
    ])?;
    launch(
        ctx,
        rec,
        PipelineKey::new("matmul", "batched_matmul"),
        SRC,
        &[Arg::Read(a), Arg::Read(b), Arg::Write(c)],
        &params,
        blocks * 64,
    )
}

/// Records `c[i] = op(a[i]) · op(b[i])` for every batch item `i` (op = transpose when
/// asked); see the module docs for the matrix view of a `Shape5`.
pub fn batched_matmul(
    ctx: &GpuContext,
    rec: &mut Recorder,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    trans_a: bool,
    trans_b: bool,
) -> Result<()> {
    record_matmul(ctx, rec, "batched_matmul", a, b, c, trans_a, trans_b)
}

/// Records the gradients of [`batched_matmul`] given `dc`: `da` (shape of `a`) and `db`
/// (shape of `b`), each optional and overwritten (not accumulated). Uses the same kernel:
/// `d op(A) = dC · op(B)ᵀ`, `d op(B) = op(A)ᵀ · dC`, transposed back where `a`/`b` are
/// stored transposed.
#[allow(clippy::too_many_arguments)]
pub fn batched_matmul_backward(
    ctx: &GpuContext,
    rec: &mut Recorder,
    a: &Tensor,
    b: &Tensor,
    dc: &Tensor,
    da: Option<&Tensor>,
    db: Option<&Tensor>,
    trans_a: bool,
    trans_b: bool,
) -> Result<()> {
    let op = "batched_matmul_backward";
    check_matmul(op, a, b, dc, trans_a, trans_b)?;
    for (g, x, what) in [(da, a, "da"), (db, b, "db")] {
        if let Some(g) = g {
            if g.shape() != x.shape() {
                return Err(Error::Shape(format!(
                    "{op}: {what} '{}' {} must have the shape of '{}' {}",
                    g.name,
                    g.shape(),
                    x.name,
                    x.shape()
                )));
            }
            check_distinct(op, g, &[a, b, dc])?;
        }
    }
    if let (Some(ga), Some(gb)) = (da, db) {
        if ga.buffer() == gb.buffer() {
            return Err(Error::InvalidArgument(format!(
                "{op}: da '{}' and db '{}' are the same tensor",
                ga.name, gb.name
            )));
        }
    }
    if let Some(da) = da {
        match (trans_a, trans_b) {
            (false, false) => record_matmul(ctx, rec, op, dc, b, da, false, true)?,
            (false, true) => record_matmul(ctx, rec, op, dc, b, da, false, false)?,
            (true, false) => record_matmul(ctx, rec, op, b, dc, da, false, true)?,
            (true, true) => record_matmul(ctx, rec, op, b, dc, da, true, true)?,
        }
    }
    if let Some(db) = db {
        match (trans_a, trans_b) {
            (false, false) => record_matmul(ctx, rec, op, a, dc, db, true, false)?,
            (true, false) => record_matmul(ctx, rec, op, a, dc, db, false, false)?,
            (false, true) => record_matmul(ctx, rec, op, dc, a, db, true, false)?,
            (true, true) => record_matmul(ctx, rec, op, dc, a, db, true, true)?,
        }
    }
    Ok(())
}

/// `(rows, cols)` of a row-softmax operand, checking the others have its shape.
fn check_rows(op: &str, x: &Tensor, others: &[&Tensor]) -> Result<(usize, usize)> {
    let s = x.shape();
    if s.has_zero() {
        return Err(Error::Shape(format!(
            "{op}: '{}' {s} has a zero-sized dimension",
            x.name
        )));
    }
    if let Some(t) = others.iter().find(|t| t.shape() != s) {
        return Err(Error::Shape(format!(
            "{op}: '{}' {} must have the shape of '{}' {s}",
            t.name,
            t.shape(),
            x.name
        )));
    }
    let cols = s.0[4];
    let numel = s.numel()?;
    u32s(&[numel])?;
    Ok((numel / cols, cols))
}

#[allow(clippy::too_many_arguments)]
fn record_rows(
    ctx: &GpuContext,
    rec: &mut Recorder,
    entry: &'static str,
    in0: &Tensor,
    in1: &Tensor,
    out: &Tensor,
    rows: usize,
    cols: usize,
) -> Result<()> {
    let mut params = vec![0u32; 12];
    params.extend(u32s(&[rows, cols, 0, 0])?);
    launch(
        ctx,
        rec,
        PipelineKey::new("matmul", entry),
        SRC,
        &[Arg::Read(in0), Arg::Read(in1), Arg::Write(out)],
        &params,
        rows.saturating_mul(64),
    )
}

/// Records `y = softmax(x)` along the last axis (rows of `W` = `shape[4]` values),
/// max-subtracted.
pub fn softmax_rows_forward(
    ctx: &GpuContext,
    rec: &mut Recorder,
    x: &Tensor,
    y: &Tensor,
) -> Result<()> {
    let op = "softmax_rows_forward";
    let (rows, cols) = check_rows(op, x, &[y])?;
    check_distinct(op, y, &[x])?;
    record_rows(ctx, rec, "softmax_rows_forward", x, x, y, rows, cols)
}

/// Records `dx = y ⊙ (dy − Σ_row dy ⊙ y)`, the gradient of [`softmax_rows_forward`] given
/// its output `y` and the upstream gradient `dy`.
pub fn softmax_rows_backward(
    ctx: &GpuContext,
    rec: &mut Recorder,
    y: &Tensor,
    dy: &Tensor,
    dx: &Tensor,
) -> Result<()> {
    let op = "softmax_rows_backward";
    let (rows, cols) = check_rows(op, y, &[dy, dx])?;
    check_distinct(op, dx, &[y, dy])?;
    record_rows(ctx, rec, "softmax_rows_backward", y, dy, dx, rows, cols)
}

// ---------------------------------------------------------------- CPU references (f64)

/// A row-major copy of an array with its matrix view `(batch, rows, cols)`.
fn matrices(a: &Array5<f64>) -> (usize, usize, usize, Vec<f64>) {
    let s = a.shape();
    let data: Vec<f64> = a.iter().copied().collect();
    (s[0] * s[1] * s[2], s[3], s[4], data)
}

/// `op(X)[i, j]` of batch item `bi` of a `(rows, cols)` matrix stored row-major.
fn at(x: &[f64], rows: usize, cols: usize, bi: usize, i: usize, j: usize, trans: bool) -> f64 {
    if trans {
        x[bi * rows * cols + j * cols + i]
    } else {
        x[bi * rows * cols + i * cols + j]
    }
}

/// `(batch, M, K, N)` of `op(A) · op(B)` for arrays, or Err.
fn dims_f64(
    a: &Array5<f64>,
    b: &Array5<f64>,
    trans_a: bool,
    trans_b: bool,
) -> Result<(usize, usize, usize, usize)> {
    let (sa, sb) = (a.shape(), b.shape());
    let (ba, bb) = (sa[0] * sa[1] * sa[2], sb[0] * sb[1] * sb[2]);
    let (m, k) = if trans_a {
        (sa[4], sa[3])
    } else {
        (sa[3], sa[4])
    };
    let (kb, n) = if trans_b {
        (sb[4], sb[3])
    } else {
        (sb[3], sb[4])
    };
    if ba != bb || k != kb || ba * m * k * n == 0 {
        return Err(Error::Shape(format!(
            "batched_matmul_f64: op(A) {sa:?} (trans {trans_a}) and op(B) {sb:?} \
             (trans {trans_b}) do not multiply"
        )));
    }
    Ok((ba, m, k, n))
}

/// f64 reference of [`batched_matmul`]; the result is `[1, 1, batch, M, N]`.
pub fn batched_matmul_f64(
    a: &Array5<f64>,
    b: &Array5<f64>,
    trans_a: bool,
    trans_b: bool,
) -> Result<Array5<f64>> {
    let (batch, m, k, n) = dims_f64(a, b, trans_a, trans_b)?;
    let (_, ra, ca, av) = matrices(a);
    let (_, rb, cb, bv) = matrices(b);
    let mut c = Array5::<f64>::zeros([1, 1, batch, m, n]);
    for bi in 0..batch {
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0;
                for q in 0..k {
                    s += at(&av, ra, ca, bi, i, q, trans_a) * at(&bv, rb, cb, bi, q, j, trans_b);
                }
                c[[0, 0, bi, i, j]] = s;
            }
        }
    }
    Ok(c)
}

/// f64 reference of [`batched_matmul_backward`]: `(dA, dB)` with the shapes of `a`, `b`,
/// from `dC[m, n]` spread onto every product `op(A)[m, k] · op(B)[k, n]`.
pub fn batched_matmul_backward_f64(
    a: &Array5<f64>,
    b: &Array5<f64>,
    dc: &Array5<f64>,
    trans_a: bool,
    trans_b: bool,
) -> Result<(Array5<f64>, Array5<f64>)> {
    let (batch, m, k, n) = dims_f64(a, b, trans_a, trans_b)?;
    let (bd, rd, cd, dcv) = matrices(dc);
    if (bd, rd, cd) != (batch, m, n) {
        return Err(Error::Shape(format!(
            "batched_matmul_backward_f64: dC {:?} is not {batch} x {m} x {n}",
            dc.shape()
        )));
    }
    let (_, ra, ca, av) = matrices(a);
    let (_, rb, cb, bv) = matrices(b);
    let mut da = vec![0.0; av.len()];
    let mut db = vec![0.0; bv.len()];
    for bi in 0..batch {
        for i in 0..m {
            for j in 0..n {
                let g = dcv[bi * m * n + i * n + j];
                for q in 0..k {
                    // op(A)[i, q] and op(B)[q, j] live at these flat indices.
                    let ia = if trans_a { q * ca + i } else { i * ca + q } + bi * ra * ca;
                    let ib = if trans_b { j * cb + q } else { q * cb + j } + bi * rb * cb;
                    da[ia] += g * bv[ib];
                    db[ib] += g * av[ia];
                }
            }
        }
    }
    let to = |s: &[usize], v: Vec<f64>| {
        Array5::from_shape_vec([s[0], s[1], s[2], s[3], s[4]], v)
            .map_err(|e| Error::Shape(format!("batched_matmul_backward_f64: {e}")))
    };
    Ok((to(a.shape(), da)?, to(b.shape(), db)?))
}

/// f64 reference of [`softmax_rows_forward`] (softmax along the last axis).
pub fn softmax_rows_f64(x: &Array5<f64>) -> Array5<f64> {
    let mut y = x.clone();
    for mut row in y.rows_mut() {
        let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = row.iter().map(|v| (v - m).exp()).sum();
        row.mapv_inplace(|v| (v - m).exp() / s);
    }
    y
}

/// f64 reference of [`softmax_rows_backward`] through the full Jacobian:
/// `dx_j = Σ_i dy_i · y_i (δ_ij − y_j)`.
pub fn softmax_rows_backward_f64(y: &Array5<f64>, dy: &Array5<f64>) -> Result<Array5<f64>> {
    if y.shape() != dy.shape() {
        return Err(Error::Shape(format!(
            "softmax_rows_backward_f64: y {:?} and dy {:?} differ",
            y.shape(),
            dy.shape()
        )));
    }
    let mut dx = Array5::<f64>::zeros(y.raw_dim());
    for ((yr, dyr), mut dxr) in y.rows().into_iter().zip(dy.rows()).zip(dx.rows_mut()) {
        let c = yr.len();
        for j in 0..c {
            let mut s = 0.0;
            for i in 0..c {
                let delta = if i == j { 1.0 } else { 0.0 };
                s += dyr[i] * yr[i] * (delta - yr[j]);
            }
            dxr[j] = s;
        }
    }
    Ok(dx)
}

/// Every shader of this family (for the portability test).
pub fn shader_variants() -> Vec<(String, String)> {
    vec![("matmul".to_string(), SRC.to_string())]
}
