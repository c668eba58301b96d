//! Deterministic f32 reductions (fixed order, no atomics): the second pass of split
//! reductions (`sum_chunks`), per-row sums, maxima and means (`sum_rows`, `max_rows`,
//! `mean_rows`) and a whole-tensor sum in fixed-size blocks (`sum_all`).

use crate::error::{Error, Result};
use crate::gpu::{Binding, GpuContext, PipelineKey, Recorder};
use crate::ops::conv3d::{grid_for, u32s};
use crate::ops::params::{dispatch, launch, uniform_u32, Arg};
use crate::tensor::Tensor;

const REDUCE_SRC: &str = include_str!("../../shaders/reduce.wgsl");

fn record(
    ctx: &GpuContext,
    rec: &mut Recorder,
    entry: &'static str,
    src: &Tensor,
    dst: &Tensor,
    len: usize,
    count: usize,
) -> Result<()> {
    let outputs = if entry == "sum_chunks" { len } else { count };
    let need_src = len.saturating_mul(count);
    if src.shape().numel()? < need_src || dst.shape().numel()? < outputs {
        return Err(Error::Shape(format!(
            "{entry}: '{}' {} or '{}' {} too small for {count} x {len}",
            src.name,
            src.shape(),
            dst.name,
            dst.shape()
        )));
    }
    let key = PipelineKey::new("reduce", entry);
    let pipe = ctx.pipelines.get(
        &ctx.device,
        &key,
        REDUCE_SRC,
        &[Binding::ReadOnly, Binding::ReadWrite, Binding::Uniform],
    )?;
    let params = uniform_u32(ctx, &u32s(&[len, count, 0, 0])?)?;
    dispatch(
        ctx,
        rec,
        &pipe,
        &[
            (src.buffer(), src.bytes()),
            (dst.buffer(), dst.bytes()),
            (&params, params.size()),
        ],
        grid_for(ctx, outputs.div_ceil(64))?,
    )
}

/// Records `dst[i] = sum_{c < chunks} src[c * len + i]` for `i < len`.
pub fn sum_chunks(
    ctx: &GpuContext,
    rec: &mut Recorder,
    src: &Tensor,
    chunks: usize,
    len: usize,
    dst: &Tensor,
) -> Result<()> {
    record(ctx, rec, "sum_chunks", src, dst, len, chunks)
}

/// Records `dst[r] = sum_{j < len} src[r * len + j]` for `r < rows`.
pub fn sum_rows(
    ctx: &GpuContext,
    rec: &mut Recorder,
    src: &Tensor,
    rows: usize,
    len: usize,
    dst: &Tensor,
) -> Result<()> {
    record(ctx, rec, "sum_rows", src, dst, len, rows)
}

/// CPU reference of [`sum_chunks`].
pub fn sum_chunks_cpu(src: &[f32], chunks: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| (0..chunks).map(|c| src[c * len + i] as f64).sum::<f64>() as f32)
        .collect()
}

/// CPU reference of [`sum_rows`].
pub fn sum_rows_cpu(src: &[f32], rows: usize, len: usize) -> Vec<f32> {
    (0..rows)
        .map(|r| {
            src[r * len..(r + 1) * len]
                .iter()
                .map(|&v| v as f64)
                .sum::<f64>() as f32
        })
        .collect()
}

fn check_rows(op: &str, src: &Tensor, rows: usize, len: usize, dst: &Tensor) -> Result<()> {
    if rows == 0 || len == 0 {
        return Err(Error::InvalidArgument(format!(
            "{op}: '{}' -> '{}': {rows} rows of {len} values (both must be >= 1)",
            src.name, dst.name
        )));
    }
    if std::ptr::eq(src, dst) {
        return Err(Error::InvalidArgument(format!(
            "{op}: source and destination are the same tensor '{}'",
            src.name
        )));
    }
    Ok(())
}

/// Records `dst[r] = max_{j < len} src[r * len + j]` for `r < rows` (`len >= 1`).
///
/// NaN: the GPU result for a row holding NaN is unspecified (WGSL implementations may
/// assume no NaNs; most return the max of the other values); [`max_rows_f64`] returns NaN.
pub fn max_rows(
    ctx: &GpuContext,
    rec: &mut Recorder,
    src: &Tensor,
    rows: usize,
    len: usize,
    dst: &Tensor,
) -> Result<()> {
    check_rows("max_rows", src, rows, len, dst)?;
    record(ctx, rec, "max_rows", src, dst, len, rows)
}

/// Records `dst[r] = mean_{j < len} src[r * len + j]` for `r < rows` (`len >= 1`).
pub fn mean_rows(
    ctx: &GpuContext,
    rec: &mut Recorder,
    src: &Tensor,
    rows: usize,
    len: usize,
    dst: &Tensor,
) -> Result<()> {
    check_rows("mean_rows", src, rows, len, dst)?;
    record(ctx, rec, "mean_rows", src, dst, len, rows)
}

/// Elements each workgroup of `sum_all` adds (`SUM_BLOCK` in `shaders/reduce.wgsl`).
pub const SUM_ALL_BLOCK: usize = 1024;

/// Records `dst[0] = sum of all elements of src`, deterministically: blocks of
/// [`SUM_ALL_BLOCK`] are summed in a fixed order (16 strided values per thread, then a
/// tree), then the block sums the same way, until one value remains (two passes up to
/// 1024² elements, three up to 1024³). Temporaries are allocated per pass.
pub fn sum_all(ctx: &GpuContext, rec: &mut Recorder, src: &Tensor, dst: &Tensor) -> Result<()> {
    if std::ptr::eq(src, dst) {
        return Err(Error::InvalidArgument(format!(
            "sum_all: source and destination are the same tensor '{}'",
            src.name
        )));
    }
    let mut n = src.shape().numel()?;
    let mut temp: Option<Tensor> = None;
    loop {
        let blocks = n.div_ceil(SUM_ALL_BLOCK);
        let next = if blocks == 1 {
            None
        } else {
            Some(Tensor::empty(
                ctx,
                crate::tensor::Shape5::new(1, 1, 1, 1, blocks),
                "sum_all partials",
            )?)
        };
        let input = temp.as_ref().unwrap_or(src);
        let output = next.as_ref().unwrap_or(dst);
        launch(
            ctx,
            rec,
            PipelineKey::new("reduce", "sum_blocks"),
            REDUCE_SRC,
            &[Arg::Read(input), Arg::Write(output)],
            &u32s(&[n, blocks, 0, 0])?,
            blocks.saturating_mul(64),
        )?;
        match next {
            None => return Ok(()),
            Some(t) => {
                temp = Some(t);
                n = blocks;
            }
        }
    }
}

/// Records `dst[0] = number of NaN or infinite elements of src` (exact up to 2^24),
/// decided on the bit patterns so it holds on drivers that assume no NaNs.
pub fn count_non_finite(
    ctx: &GpuContext,
    rec: &mut Recorder,
    src: &Tensor,
    dst: &Tensor,
) -> Result<()> {
    if std::ptr::eq(src, dst) {
        return Err(Error::InvalidArgument(format!(
            "count_non_finite: source and destination are the same tensor '{}'",
            src.name
        )));
    }
    let n = src.shape().numel()?;
    let blocks = n.div_ceil(SUM_ALL_BLOCK);
    let partial = if blocks == 1 {
        None
    } else {
        Some(Tensor::empty(
            ctx,
            crate::tensor::Shape5::new(1, 1, 1, 1, blocks),
            "non-finite counts",
        )?)
    };
    launch(
        ctx,
        rec,
        PipelineKey::new("reduce", "non_finite_blocks"),
        REDUCE_SRC,
        &[Arg::Read(src), Arg::Write(partial.as_ref().unwrap_or(dst))],
        &u32s(&[n, blocks, 0, 0])?,
        blocks.saturating_mul(64),
    )?;
    match &partial {
        Some(p) => sum_all(ctx, rec, p, dst),
        None => Ok(()),
    }
}

/// CPU reference of [`count_non_finite`].
pub fn count_non_finite_cpu(src: &[f32]) -> usize {
    src.iter().filter(|v| !v.is_finite()).count()
}

/// CPU reference of [`max_rows`] (NaN in a row gives NaN).
pub fn max_rows_f64(src: &[f64], rows: usize, len: usize) -> Vec<f64> {
    (0..rows)
        .map(|r| {
            let mut m = src[r * len];
            for &v in &src[r * len + 1..(r + 1) * len] {
                if v > m || v.is_nan() {
                    m = v;
                }
            }
            m
        })
        .collect()
}

/// [`max_rows_f64`] on f32 data.
pub fn max_rows_cpu(src: &[f32], rows: usize, len: usize) -> Vec<f32> {
    let v: Vec<f64> = src.iter().map(|&x| f64::from(x)).collect();
    max_rows_f64(&v, rows, len)
        .into_iter()
        .map(|x| x as f32)
        .collect()
}

/// CPU reference of [`mean_rows`].
pub fn mean_rows_f64(src: &[f64], rows: usize, len: usize) -> Vec<f64> {
    (0..rows)
        .map(|r| {
            let mut s = 0.0;
            for &v in &src[r * len..(r + 1) * len] {
                s += v;
            }
            s / len as f64
        })
        .collect()
}

/// [`mean_rows_f64`] on f32 data.
pub fn mean_rows_cpu(src: &[f32], rows: usize, len: usize) -> Vec<f32> {
    let v: Vec<f64> = src.iter().map(|&x| f64::from(x)).collect();
    mean_rows_f64(&v, rows, len)
        .into_iter()
        .map(|x| x as f32)
        .collect()
}

/// CPU reference of [`sum_all`].
pub fn sum_all_f64(src: &[f64]) -> f64 {
    let mut s = 0.0;
    for &v in src {
        s += v;
    }
    s
}

/// [`sum_all_f64`] on f32 data.
pub fn sum_all_cpu(src: &[f32]) -> f32 {
    src.iter().map(|&x| f64::from(x)).sum::<f64>() as f32
}

/// Every shader of this family (for the portability test).
pub fn shader_variants() -> Vec<(String, String)> {
    vec![("reduce".to_string(), REDUCE_SRC.to_string())]
}
