//! f32 tensors in NCDHW layout on the GPU, and their shapes.

use crate::error::{Error, Result};
use crate::gpu::{GpuContext, PooledBuffer, Recorder};
use ndarray::Array5;
use std::cell::RefCell;
use std::fmt;
use std::rc::Rc;

/// A 5-D shape `(N, C, D, H, W)`; weights use `(Cout, Cin, kd, kh, kw)`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Shape5(pub [usize; 5]);

impl fmt::Debug for Shape5 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [n, c, d, h, w] = self.0;
        write!(f, "[{n}, {c}, {d}, {h}, {w}]")
    }
}

impl fmt::Display for Shape5 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl Shape5 {
    /// `(n, c, d, h, w)`.
    pub fn new(n: usize, c: usize, d: usize, h: usize, w: usize) -> Self {
        Self([n, c, d, h, w])
    }
    /// Batch size.
    pub fn n(&self) -> usize {
        self.0[0]
    }
    /// Channels.
    pub fn c(&self) -> usize {
        self.0[1]
    }
    /// Spatial extents `(D, H, W)`.
    pub fn spatial(&self) -> [usize; 3] {
        [self.0[2], self.0[3], self.0[4]]
    }
    /// Number of elements (checked: an overflow is an error).
    pub fn numel(&self) -> Result<usize> {
        self.0
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| Error::Shape(format!("shape {self} has too many elements")))
    }
    /// Number of elements of one spatial volume `D*H*W`.
    pub fn voxels(&self) -> usize {
        self.0[2] * self.0[3] * self.0[4]
    }
    /// Whether any dimension is zero.
    pub fn has_zero(&self) -> bool {
        self.0.contains(&0)
    }
}

/// Layouts derived from a frozen tensor, by key.
type DerivedLayouts = Vec<(String, Rc<Tensor>)>;

/// An f32 tensor living in a GPU buffer.
pub struct Tensor {
    shape: Shape5,
    buf: PooledBuffer,
    /// Name used in error messages.
    pub name: String,
    /// `Some` once frozen ([`Tensor::freeze`]): layouts derived from the contents (packed
    /// weights), computed once and reused.
    derived: RefCell<Option<DerivedLayouts>>,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tensor('{}', {})", self.name, self.shape)
    }
}

impl Tensor {
    /// An uninitialised tensor (contents are whatever the pooled buffer held).
    pub fn empty(ctx: &GpuContext, shape: Shape5, name: &str) -> Result<Self> {
        Self::alloc(ctx, shape, name, false)
    }

    fn alloc(ctx: &GpuContext, shape: Shape5, name: &str, settled: bool) -> Result<Self> {
        ctx.alive()?;
        if shape.has_zero() {
            return Err(Error::Shape(format!(
                "tensor '{name}' has a zero-sized dimension: {shape}"
            )));
        }
        let bytes = (shape.numel()? as u64)
            .checked_mul(4)
            .ok_or_else(|| Error::Shape(format!("tensor '{name}' {shape} is too large")))?;
        let max = ctx.max_binding_bytes();
        if bytes > max {
            return Err(Error::Limit(format!(
                "tensor '{name}' {shape} needs {bytes} bytes but the adapter binds at most {max} \
                 bytes per storage buffer; use a smaller batch, patch or tile"
            )));
        }
        Ok(Self {
            shape,
            buf: if settled {
                ctx.pool.take_settled(&ctx.device, bytes)
            } else {
                ctx.pool.take(&ctx.device, bytes)
            },
            name: name.to_string(),
            derived: RefCell::new(None),
        })
    }

    /// Marks the contents as fixed (an inference-form parameter), so derived layouts
    /// such as packed convolution weights are computed once and cached with it.
    pub fn freeze(&self) {
        let mut d = self.derived.borrow_mut();
        if d.is_none() {
            *d = Some(Vec::new());
        }
    }

    /// Whether [`Tensor::freeze`] was called.
    pub fn is_frozen(&self) -> bool {
        self.derived.borrow().is_some()
    }

    /// Forgets cached derived layouts (the contents were overwritten); stays frozen.
    pub fn clear_derived(&self) {
        if let Some(d) = self.derived.borrow_mut().as_mut() {
            d.clear();
        }
    }

    /// The layout `key` derived from this tensor by `make` (which records its GPU work):
    /// computed on every call, or once if the tensor is frozen.
    /// `key` is only built for a frozen tensor (no allocation per op otherwise).
    pub(crate) fn derived(
        &self,
        key: impl FnOnce() -> String,
        make: impl FnOnce() -> Result<Tensor>,
    ) -> Result<Rc<Tensor>> {
        if !self.is_frozen() {
            return Ok(Rc::new(make()?));
        }
        let key = key();
        if let Some(d) = self.derived.borrow().as_ref() {
            if let Some((_, t)) = d.iter().find(|(k, _)| *k == key) {
                return Ok(t.clone());
            }
        }
        let t = Rc::new(make()?);
        if let Some(d) = self.derived.borrow_mut().as_mut() {
            d.push((key, t.clone()));
        }
        Ok(t)
    }

    /// A tensor filled with zeros.
    pub fn zeros(ctx: &GpuContext, shape: Shape5, name: &str) -> Result<Self> {
        let t = Self::alloc(ctx, shape, name, true)?;
        let mut rec = ctx.recorder();
        rec.encoder.clear_buffer(t.buffer(), 0, Some(t.bytes()));
        ctx.submit(rec);
        Ok(t)
    }

    /// A zero tensor whose clearing is recorded into `rec`, so it is ordered after the
    /// commands already recorded there (pooled buffers freed during a recording may be
    /// reused; an immediate clear would run before those commands read them).
    pub fn zeros_recorded(
        ctx: &GpuContext,
        rec: &mut Recorder,
        shape: Shape5,
        name: &str,
    ) -> Result<Self> {
        let t = Self::empty(ctx, shape, name)?;
        rec.encoder.clear_buffer(t.buffer(), 0, Some(t.bytes()));
        Ok(t)
    }

    /// Uploads `data` through a staging copy recorded into `rec` (ordered like
    /// [`Tensor::zeros_recorded`]).
    pub fn from_slice_recorded(
        ctx: &GpuContext,
        rec: &mut Recorder,
        shape: Shape5,
        data: &[f32],
        name: &str,
    ) -> Result<Self> {
        let n = shape.numel()?;
        if data.len() != n {
            return Err(Error::Shape(format!(
                "tensor '{name}': {} values given for shape {shape} ({n} needed)",
                data.len()
            )));
        }
        let t = Self::empty(ctx, shape, name)?;
        let staging = ctx.buffer_with(
            "upload",
            bytemuck::cast_slice(data),
            wgpu::BufferUsages::COPY_SRC,
        )?;
        rec.encoder
            .copy_buffer_to_buffer(&staging, 0, t.buffer(), 0, t.bytes());
        Ok(t)
    }

    /// A copy of this tensor recorded into `rec`.
    pub fn duplicate(&self, ctx: &GpuContext, rec: &mut Recorder, name: &str) -> Result<Self> {
        let t = Self::empty(ctx, self.shape, name)?;
        rec.encoder
            .copy_buffer_to_buffer(self.buffer(), 0, t.buffer(), 0, self.bytes());
        Ok(t)
    }

    /// The same storage under another shape with the same element count (a reshape).
    pub fn reshaped(self, shape: Shape5) -> Result<Self> {
        if shape.numel()? != self.shape.numel()? {
            return Err(Error::Shape(format!(
                "cannot reshape '{}' {} to {shape}: element counts differ",
                self.name, self.shape
            )));
        }
        Ok(Self {
            shape,
            derived: RefCell::new(None),
            ..self
        })
    }

    /// Uploads `data` (row-major NCDHW) as a tensor of `shape`.
    pub fn from_slice(ctx: &GpuContext, shape: Shape5, data: &[f32], name: &str) -> Result<Self> {
        let n = shape.numel()?;
        if data.len() != n {
            return Err(Error::Shape(format!(
                "tensor '{name}': {} values given for shape {shape} ({n} needed)",
                data.len()
            )));
        }
        let t = Self::alloc(ctx, shape, name, true)?;
        ctx.queue
            .write_buffer(t.buffer(), 0, bytemuck::cast_slice(data));
        Ok(t)
    }

    /// Uploads an ndarray.
    pub fn from_array(ctx: &GpuContext, a: &Array5<f32>, name: &str) -> Result<Self> {
        let s = a.shape();
        let shape = Shape5::new(s[0], s[1], s[2], s[3], s[4]);
        let data: Vec<f32> = a.iter().copied().collect();
        Self::from_slice(ctx, shape, &data, name)
    }

    /// The shape.
    pub fn shape(&self) -> Shape5 {
        self.shape
    }

    /// The GPU buffer (may be larger than the tensor: pooled size class).
    pub fn buffer(&self) -> &wgpu::Buffer {
        self.buf.buffer()
    }

    /// Bytes the tensor occupies.
    pub fn bytes(&self) -> u64 {
        self.shape.numel().unwrap_or(0) as u64 * 4
    }

    /// Reads the tensor back: one copy, one submit, one blocking poll.
    pub fn to_vec(&self, ctx: &GpuContext) -> Result<Vec<f32>> {
        let bytes = self.bytes();
        let staging = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut rec = ctx.recorder();
        rec.encoder
            .copy_buffer_to_buffer(self.buffer(), 0, &staging, 0, bytes);
        ctx.submit(rec);
        let (tx, rx) = std::sync::mpsc::channel();
        staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        ctx.wait()?;
        rx.recv()
            .map_err(|_| Error::Device(format!("readback of '{}' never completed", self.name)))?
            .map_err(|e| Error::Device(format!("readback of '{}' failed: {e}", self.name)))?;
        let out = {
            let view = staging
                .get_mapped_range(..)
                .map_err(|e| Error::Device(format!("mapping '{}': {e}", self.name)))?;
            bytemuck::cast_slice::<u8, f32>(&view).to_vec()
        };
        staging.unmap();
        Ok(out)
    }

    /// Reads the tensor back as an ndarray.
    pub fn to_array(&self, ctx: &GpuContext) -> Result<Array5<f32>> {
        let v = self.to_vec(ctx)?;
        Array5::from_shape_vec(self.shape.0, v)
            .map_err(|e| Error::Shape(format!("tensor '{}': {e}", self.name)))
    }
}

/// A channel range `[offset, offset + count)` of a tensor: how MixACB groups and
/// DenseNet concatenation read and write parts of one buffer without copies.
#[derive(Clone, Copy)]
pub struct ChannelSlice<'a> {
    /// The whole tensor.
    pub tensor: &'a Tensor,
    /// First channel.
    pub offset: usize,
    /// Number of channels.
    pub count: usize,
}

impl Tensor {
    /// All channels.
    pub fn all(&self) -> ChannelSlice<'_> {
        ChannelSlice {
            tensor: self,
            offset: 0,
            count: self.shape.c(),
        }
    }

    /// Channels `offset .. offset + count`, checked against the tensor's shape.
    pub fn channels(&self, offset: usize, count: usize) -> Result<ChannelSlice<'_>> {
        if count == 0 || offset.checked_add(count).is_none_or(|e| e > self.shape.c()) {
            return Err(Error::Shape(format!(
                "channel range {offset}..{} is outside tensor '{}' {} ({} channels)",
                offset.saturating_add(count),
                self.name,
                self.shape,
                self.shape.c()
            )));
        }
        Ok(ChannelSlice {
            tensor: self,
            offset,
            count,
        })
    }
}
