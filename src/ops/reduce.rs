//! Deterministic f32 reductions (fixed order, no atomics): the second pass of split
//! reductions (`sum_chunks`) and per-row sums (`sum_rows`).

use crate::error::{Error, Result};
use crate::gpu::{Binding, GpuContext, PipelineKey, Recorder};
use crate::ops::conv3d::{grid_for, u32s};
use crate::ops::params::{dispatch, uniform_u32};
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
    let params = uniform_u32(ctx, &u32s(&[len, count, 0, 0])?);
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

/// Every shader of this family (for the portability test).
pub fn shader_variants() -> Vec<(String, String)> {
    vec![("reduce".to_string(), REDUCE_SRC.to_string())]
}
