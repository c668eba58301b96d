//! GPU context: instance, adapter choice, device with the adapter's real limits,
//! captured wgpu errors, and the pipeline cache and buffer pool every op uses.

mod buffer_pool;
mod dispatch;
mod pipeline;

pub use buffer_pool::{BufferPool, MemoryReport, PooledBuffer, SettledOnly};
pub use dispatch::{workgroup_grid, WorkgroupGrid};
pub use pipeline::{Binding, CachedPipeline, PipelineCache, PipelineKey};

/// A borrowed compiled pipeline.
pub type CachedPipelineRef<'a> = &'a CachedPipeline;

use crate::error::{Error, Result};
use std::sync::{Arc, Mutex};

/// Which graphics API to open an adapter on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// Every native backend; the best adapter wins.
    #[default]
    Auto,
    /// Vulkan (Linux, Windows, Android; lavapipe on headless Linux).
    Vulkan,
    /// Metal (macOS, iOS).
    Metal,
    /// Direct3D 12 (Windows).
    Dx12,
    /// OpenGL / GLES, the last resort.
    Gl,
}

impl BackendChoice {
    /// Parses `auto|vulkan|metal|dx12|gl` (case-insensitive).
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(Self::Auto),
            "vulkan" | "vk" => Ok(Self::Vulkan),
            "metal" | "mtl" => Ok(Self::Metal),
            "dx12" | "d3d12" => Ok(Self::Dx12),
            "gl" | "gles" | "opengl" => Ok(Self::Gl),
            other => Err(Error::InvalidArgument(format!(
                "unknown backend '{other}' (expected auto, vulkan, metal, dx12 or gl)"
            ))),
        }
    }

    fn backends(self) -> wgpu::Backends {
        match self {
            Self::Auto => {
                wgpu::Backends::VULKAN
                    | wgpu::Backends::METAL
                    | wgpu::Backends::DX12
                    | wgpu::Backends::GL
            }
            Self::Vulkan => wgpu::Backends::VULKAN,
            Self::Metal => wgpu::Backends::METAL,
            Self::Dx12 => wgpu::Backends::DX12,
            Self::Gl => wgpu::Backends::GL,
        }
    }
}

/// How to pick the adapter; `from_env` fills unset fields from `MASNET_BACKEND`/`MASNET_ADAPTER`.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// Backend filter.
    pub backend: BackendChoice,
    /// Index into the list printed by `masnet-wgpu info` (after the backend filter).
    pub adapter: Option<usize>,
    /// Disable the subgroup kernels even where the adapter supports them.
    pub no_subgroups: bool,
    /// Bind at most this many bytes per storage buffer even if the adapter allows more
    /// (`MASNET_MAX_BINDING`, e.g. `64MiB`): to leave headroom or to test big-volume paths.
    pub max_binding: Option<u64>,
}

/// Parses a byte count: a plain number or one with a `KiB`/`MiB`/`GiB` suffix.
pub fn parse_bytes(s: &str) -> Result<u64> {
    let t = s.trim();
    let (num, mul) = [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)]
        .iter()
        .find_map(|(suf, m)| t.strip_suffix(suf).map(|n| (n.trim(), *m)))
        .unwrap_or((t, 1));
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .filter(|&n| n > 0)
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "'{s}' is not a positive byte count (e.g. 134217728 or 128MiB)"
            ))
        })
}

impl GpuOptions {
    /// Options from `MASNET_BACKEND` and `MASNET_ADAPTER`.
    pub fn from_env() -> Result<Self> {
        let mut o = Self::default();
        if let Ok(b) = std::env::var("MASNET_BACKEND") {
            o.backend = BackendChoice::parse(&b)?;
        }
        if let Ok(a) = std::env::var("MASNET_ADAPTER") {
            o.adapter = Some(a.trim().parse().map_err(|_| {
                Error::InvalidArgument(format!("MASNET_ADAPTER='{a}' is not an adapter index"))
            })?);
        }
        if let Ok(b) = std::env::var("MASNET_MAX_BINDING") {
            o.max_binding = Some(
                parse_bytes(&b)
                    .map_err(|e| Error::InvalidArgument(format!("MASNET_MAX_BINDING: {e}")))?,
            );
        }
        Ok(o)
    }
}

/// One adapter as listed by `masnet-wgpu info`.
#[derive(Clone, Debug)]
pub struct AdapterSummary {
    /// Position in the enumeration (what `--adapter` takes).
    pub index: usize,
    /// wgpu's adapter info (name, backend, device type, driver).
    pub info: wgpu::AdapterInfo,
    /// The adapter's real limits.
    pub limits: wgpu::Limits,
    /// Whether compute subgroup operations are available.
    pub subgroups: bool,
}

const NO_ADAPTER_HINT: &str = "no Vulkan, Metal, DX12 or GL adapter was found. On headless Linux \
install Mesa's software Vulkan driver (lavapipe): `apt-get install -y mesa-vulkan-drivers libvulkan1`";

fn instance(backend: BackendChoice) -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = backend.backends();
    wgpu::Instance::new(desc)
}

fn rank(info: &wgpu::AdapterInfo) -> (u32, u32) {
    let ty = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    };
    // GL lacks subgroups and is slower to drive: last among equals.
    let be = u32::from(info.backend == wgpu::Backend::Gl);
    (ty, be)
}

fn enumerate(backend: BackendChoice) -> Vec<wgpu::Adapter> {
    let inst = instance(backend);
    let mut adapters = pollster::block_on(inst.enumerate_adapters(backend.backends()));
    // Stable order: best first, so index 0 is what Auto picks.
    adapters.sort_by_key(|a| rank(&a.get_info()));
    adapters
}

/// Lists every adapter visible under `backend`, best first.
pub fn list_adapters(backend: BackendChoice) -> Vec<AdapterSummary> {
    enumerate(backend)
        .into_iter()
        .enumerate()
        .map(|(index, a)| AdapterSummary {
            index,
            info: a.get_info(),
            limits: a.limits(),
            subgroups: a.features().contains(wgpu::Features::SUBGROUP),
        })
        .collect()
}

/// The device, queue and shared caches that every op runs on.
pub struct GpuContext {
    /// The wgpu device.
    pub device: wgpu::Device,
    /// Its queue.
    pub queue: wgpu::Queue,
    /// Adapter name, backend, driver.
    pub info: wgpu::AdapterInfo,
    /// The limits the device was opened with (the adapter's own).
    pub limits: wgpu::Limits,
    /// Whether subgroup kernels may be used.
    pub subgroups: bool,
    /// Subgroup size when the adapter has one fixed size.
    pub subgroup_size: Option<u32>,
    /// Compiled pipelines keyed by shader and constants.
    pub pipelines: PipelineCache,
    /// Reusable buffers.
    pub pool: BufferPool,
    errors: Arc<Mutex<Vec<String>>>,
    lost: Arc<Mutex<Option<String>>>,
    open_recorders: Arc<std::sync::atomic::AtomicUsize>,
    max_binding: u64,
    profile: Option<Mutex<Profile>>,
}

/// Per-pipeline dispatch counts and GPU wall time (see [`GpuContext::enable_profiling`]).
pub type Profile = std::collections::BTreeMap<String, (u64, f64)>;

impl GpuContext {
    /// Opens the adapter chosen by `opts` (best one by default).
    pub fn new(opts: &GpuOptions) -> Result<Self> {
        let mut adapters = enumerate(opts.backend);
        if adapters.is_empty() {
            return Err(Error::NoAdapter(NO_ADAPTER_HINT.to_string()));
        }
        let idx = opts.adapter.unwrap_or(0);
        if idx >= adapters.len() {
            return Err(Error::NoAdapter(format!(
                "adapter index {idx} requested but only {} adapter(s) found for backend {:?} \
                 (see `masnet-wgpu info`)",
                adapters.len(),
                opts.backend
            )));
        }
        let adapter = adapters.swap_remove(idx);
        Self::from_adapter(adapter, opts)
    }

    /// Opens the best adapter with options from the environment.
    pub fn from_env() -> Result<Self> {
        Self::new(&GpuOptions::from_env()?)
    }

    fn from_adapter(adapter: wgpu::Adapter, opts: &GpuOptions) -> Result<Self> {
        let info = adapter.get_info();
        let limits = adapter.limits();
        let has_sub = adapter.features().contains(wgpu::Features::SUBGROUP) && !opts.no_subgroups;
        let features = if has_sub {
            wgpu::Features::SUBGROUP
        } else {
            wgpu::Features::empty()
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("masnet-wgpu"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| Error::Device(format!("cannot open '{}': {e}", info.name)))?;
        let errors: Arc<Mutex<Vec<String>>> = Arc::default();
        let sink = errors.clone();
        // wgpu panics on uncaptured errors by default; record them and report as Err instead.
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            if let Ok(mut v) = sink.lock() {
                v.push(e.to_string());
            }
        }));
        let lost: Arc<Mutex<Option<String>>> = Arc::default();
        let lost_sink = lost.clone();
        device.set_device_lost_callback(move |reason, message| {
            if let Ok(mut l) = lost_sink.lock() {
                let why = if message.is_empty() {
                    format!("{reason:?}")
                } else {
                    format!("{reason:?}: {message}")
                };
                l.get_or_insert(why);
            }
        });
        let adapter_max = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        let max_binding = opts.max_binding.map_or(adapter_max, |m| m.min(adapter_max));
        let subgroup_size = (has_sub
            && info.subgroup_min_size == info.subgroup_max_size
            && info.subgroup_min_size.is_power_of_two())
        .then_some(info.subgroup_min_size);
        Ok(Self {
            pipelines: PipelineCache::default(),
            pool: BufferPool::default(),
            device,
            queue,
            info,
            limits,
            subgroups: has_sub,
            subgroup_size,
            errors,
            lost,
            open_recorders: Arc::default(),
            max_binding,
            profile: None,
        })
    }

    /// A one-line description: name, backend, device type.
    pub fn adapter_name(&self) -> String {
        format!(
            "{} ({:?}, {:?})",
            self.info.name, self.info.backend, self.info.device_type
        )
    }

    /// `Err(Error::DeviceLost)` once the device is lost (driver reset, GPU removed,
    /// `device.destroy()`); every later command would fail.
    pub fn alive(&self) -> Result<()> {
        let lost = self
            .lost
            .lock()
            .map_err(|_| Error::Device("device-lost flag poisoned".into()))?;
        match &*lost {
            Some(why) => Err(Error::DeviceLost(why.clone())),
            None => Ok(()),
        }
    }

    /// Profiling mode: every dispatch is submitted and waited for on its own and its time
    /// added to its pipeline's row. Slow (no overlap, one submission per dispatch): for
    /// finding where time goes, not for measuring totals.
    pub fn enable_profiling(&mut self) {
        self.profile = Some(Mutex::default());
    }

    /// The profile so far (empty unless profiling is enabled).
    pub fn profile(&self) -> Profile {
        self.profile
            .as_ref()
            .and_then(|p| p.lock().ok().map(|p| p.clone()))
            .unwrap_or_default()
    }

    /// Runs what `rec` holds so far and times it under `name` (profiling mode only).
    pub(crate) fn profile_dispatch(&self, rec: &mut Recorder, name: &str) -> Result<()> {
        let Some(p) = &self.profile else {
            return Ok(());
        };
        let encoder = std::mem::replace(
            &mut rec.encoder,
            self.device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None }),
        );
        let t = std::time::Instant::now();
        self.queue.submit([encoder.finish()]);
        self.wait()?;
        let secs = t.elapsed().as_secs_f64();
        if let Ok(mut p) = p.lock() {
            let e = p.entry(name.to_string()).or_default();
            e.0 += 1;
            e.1 += secs;
        }
        Ok(())
    }

    /// A buffer holding `contents` (padded to 4 bytes), written through the queue rather
    /// than mapped at creation: mapping panics inside wgpu once the device is lost.
    pub fn buffer_with(
        &self,
        label: &str,
        contents: &[u8],
        usage: wgpu::BufferUsages,
    ) -> Result<wgpu::Buffer> {
        self.alive()?;
        let size = (contents.len() as u64).div_ceil(4).max(1) * 4;
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: usage | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let whole = contents.len() - contents.len() % 4;
        if whole > 0 {
            self.queue.write_buffer(&buffer, 0, &contents[..whole]);
        }
        if whole < contents.len() {
            let mut tail = [0u8; 4];
            tail[..contents.len() - whole].copy_from_slice(&contents[whole..]);
            self.queue.write_buffer(&buffer, whole as u64, &tail);
        }
        Ok(buffer)
    }

    /// Returns the first wgpu error recorded since the last call, naming `context`
    /// (device loss first: it explains every error after it).
    pub fn check(&self, context: &str) -> Result<()> {
        self.alive()?;
        let mut v = self
            .errors
            .lock()
            .map_err(|_| Error::Device("error sink poisoned".into()))?;
        if v.is_empty() {
            return Ok(());
        }
        let message = v.join("; ");
        v.clear();
        Err(Error::Gpu {
            context: context.to_string(),
            message,
        })
    }

    /// Starts recording commands; ops append passes to it, [`GpuContext::submit`] runs them.
    pub fn recorder(&self) -> Recorder {
        self.open_recorders
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Recorder {
            encoder: self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None }),
            _open: OpenRecording(self.open_recorders.clone()),
        }
    }

    /// Submits recorded work (does not wait).
    pub fn submit(&self, rec: Recorder) -> wgpu::SubmissionIndex {
        let Recorder { encoder, _open } = rec;
        let i = self.queue.submit([encoder.finish()]);
        drop(_open);
        // Buffers released during recordings are settled once no recording that may
        // still reference them is open.
        if self
            .open_recorders
            .load(std::sync::atomic::Ordering::SeqCst)
            == 0
        {
            self.pool.settle();
        }
        i
    }

    /// Blocks until all submitted work finished, then reports captured errors.
    pub fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Device(format!("wait failed: {e}")))?;
        self.check("GPU work")
    }

    /// Largest buffer an op may bind as one storage buffer (the adapter's limit, or the
    /// lower cap of [`GpuOptions::max_binding`]).
    pub fn max_binding_bytes(&self) -> u64 {
        self.max_binding
    }
}

/// Commands being recorded for one submission.
pub struct Recorder {
    /// The wgpu encoder; ops add compute passes to it.
    pub encoder: wgpu::CommandEncoder,
    _open: OpenRecording,
}

/// Counts a recording as open until it is submitted or dropped.
struct OpenRecording(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for OpenRecording {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}
