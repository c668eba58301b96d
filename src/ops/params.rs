//! Small helpers shared by op launchers: uniform buffers and bind groups.

use crate::gpu::{Binding, CachedPipelineRef, GpuContext, PipelineKey, Recorder, WorkgroupGrid};
use crate::tensor::Tensor;

/// Uploads a `u32` parameter block as a uniform buffer (padded to 16 bytes).
pub(crate) fn uniform_u32(ctx: &GpuContext, values: &[u32]) -> crate::Result<wgpu::Buffer> {
    let mut v = values.to_vec();
    while !v.len().is_multiple_of(4) {
        v.push(0);
    }
    ctx.buffer_with(
        "params",
        bytemuck::cast_slice(&v),
        wgpu::BufferUsages::UNIFORM,
    )
}

/// Binds `buffers` (buffer, bytes) in order to group 0 and records one dispatch of `grid`.
pub(crate) fn dispatch(
    ctx: &GpuContext,
    rec: &mut Recorder,
    pipe: CachedPipelineRef<'_>,
    buffers: &[(&wgpu::Buffer, u64)],
    grid: WorkgroupGrid,
) -> crate::Result<()> {
    if grid.total == 0 {
        return Ok(());
    }
    let max = ctx.max_binding_bytes();
    if let Some((_, b)) = buffers.iter().find(|(_, b)| *b > max) {
        return Err(crate::Error::Limit(format!(
            "a {b}-byte operand exceeds the adapter's {max}-byte storage binding limit; \
             use a smaller batch, patch or tile"
        )));
    }
    let entries: Vec<wgpu::BindGroupEntry> = buffers
        .iter()
        .enumerate()
        .map(|(i, (b, bytes))| wgpu::BindGroupEntry {
            binding: i as u32,
            // Bind only the tensor's bytes: pooled buffers are rounded up.
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: b,
                offset: 0,
                size: std::num::NonZeroU64::new(*bytes),
            }),
        })
        .collect();
    let bg = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout: &pipe.layout,
        entries: &entries,
    });
    let mut pass = rec
        .encoder
        .begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: None,
            timestamp_writes: None,
        });
    pass.set_pipeline(&pipe.pipeline);
    pass.set_bind_group(0, &bg, &[]);
    pass.dispatch_workgroups(grid.dims[0], grid.dims[1], grid.dims[2]);
    drop(pass);
    ctx.profile_dispatch(rec, &pipe.name)
}

/// One storage operand of [`launch`].
pub(crate) enum Arg<'a> {
    /// Bound `var<storage, read>`.
    Read(&'a Tensor),
    /// Bound `var<storage, read_write>`.
    Write(&'a Tensor),
}

/// Records one dispatch of `entry` in `src` (shader file stem `shader`) over `threads`
/// invocations in workgroups of 64: binds `args` in order as group 0 bindings 0.., then
/// `params` (u32 words; pass f32 as `to_bits()`) as a uniform at the next binding.
/// Shaders compute `i = (wid.x + nwg.x * (wid.y + nwg.y * wid.z)) * 64 + lid` and
/// return when `i` is past the end.
pub(crate) fn launch(
    ctx: &GpuContext,
    rec: &mut Recorder,
    key: PipelineKey,
    src: &str,
    args: &[Arg<'_>],
    params: &[u32],
    threads: usize,
) -> crate::Result<()> {
    let mut bindings: Vec<Binding> = args
        .iter()
        .map(|a| match a {
            Arg::Read(_) => Binding::ReadOnly,
            Arg::Write(_) => Binding::ReadWrite,
        })
        .collect();
    bindings.push(Binding::Uniform);
    let pipe = ctx.pipelines.get(&ctx.device, &key, src, &bindings)?;
    let uniform = uniform_u32(ctx, params)?;
    let mut buffers: Vec<(&wgpu::Buffer, u64)> = args
        .iter()
        .map(|a| match a {
            Arg::Read(t) | Arg::Write(t) => (t.buffer(), t.bytes()),
        })
        .collect();
    buffers.push((&uniform, uniform.size()));
    let grid = crate::gpu::workgroup_grid(
        threads.div_ceil(64) as u64,
        ctx.limits.max_compute_workgroups_per_dimension,
    )?;
    dispatch(ctx, rec, &pipe, &buffers, grid)
}
