//! Compute pipelines built from `shaders/*.wgsl`, specialised by constants and cached.
//!
//! Two kinds of specialisation: a generated `const` prelude (WGSL sizes private arrays
//! only with const-expressions, so register-tile sizes and kernel extents must be
//! consts) and wgpu pipeline-overridable constants (`override` flags). Both are part
//! of the cache key.

use crate::error::{Error, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// How a shader binding is accessed; binding `i` of group 0 is the i-th entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Binding {
    /// `var<storage, read>`.
    ReadOnly,
    /// `var<storage, read_write>`.
    ReadWrite,
    /// `var<uniform>`.
    Uniform,
}

/// What identifies a compiled pipeline.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PipelineKey {
    /// Shader file name (e.g. `conv3d_tiled`).
    pub shader: &'static str,
    /// Entry point.
    pub entry: &'static str,
    /// `const NAME: u32 = V;` lines prepended to the source.
    pub consts: Vec<(&'static str, u32)>,
    /// Pipeline-overridable constants (stored as bits so the key hashes).
    pub overrides: Vec<(&'static str, u64)>,
}

impl PipelineKey {
    /// A key with no constants.
    pub fn new(shader: &'static str, entry: &'static str) -> Self {
        Self {
            shader,
            entry,
            consts: Vec::new(),
            overrides: Vec::new(),
        }
    }

    /// Adds a `const` prelude item.
    pub fn with_const(mut self, name: &'static str, v: u32) -> Self {
        self.consts.push((name, v));
        self
    }

    /// Adds a pipeline-overridable constant.
    pub fn with_override(mut self, name: &'static str, v: f64) -> Self {
        self.overrides.push((name, v.to_bits()));
        self
    }

    /// `shader/entry` with the specialisation constants (profiles tell shapes apart).
    pub fn label(&self) -> String {
        let consts: Vec<String> = self
            .consts
            .iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect();
        if consts.is_empty() {
            format!("{}/{}", self.shader, self.entry)
        } else {
            format!("{}/{} [{}]", self.shader, self.entry, consts.join(" "))
        }
    }

    /// The WGSL prelude declaring the `const` items.
    pub fn prelude(&self) -> String {
        self.consts
            .iter()
            .map(|(n, v)| format!("const {n}: u32 = {v}u;\n"))
            .collect()
    }
}

/// A compiled pipeline with its bind-group layout.
pub struct CachedPipeline {
    /// The pipeline.
    pub pipeline: wgpu::ComputePipeline,
    /// Its group-0 layout.
    pub layout: wgpu::BindGroupLayout,
    /// `shader/entry`, for profiles.
    pub name: String,
}

/// Cache of compiled pipelines, shared by all ops of a context.
#[derive(Default)]
pub struct PipelineCache {
    map: Mutex<HashMap<PipelineKey, Arc<CachedPipeline>>>,
}

impl PipelineCache {
    /// Number of compiled pipelines.
    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Whether nothing was compiled yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The pipeline for `key`, compiling `source` (prelude prepended) on first use.
    pub fn get(
        &self,
        device: &wgpu::Device,
        key: &PipelineKey,
        source: &str,
        bindings: &[Binding],
    ) -> Result<Arc<CachedPipeline>> {
        if let Some(p) = self.map.lock().ok().and_then(|m| m.get(key).cloned()) {
            return Ok(p);
        }
        let code = format!("{}{}", key.prelude(), source);
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(key.shader),
            source: wgpu::ShaderSource::Wgsl(code.into()),
        });
        let entries: Vec<wgpu::BindGroupLayoutEntry> = bindings
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupLayoutEntry {
                binding: i as u32,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: match b {
                    Binding::Uniform => wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Uniform,
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    Binding::ReadOnly | Binding::ReadWrite => wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Storage {
                            read_only: *b == Binding::ReadOnly,
                        },
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                },
                count: None,
            })
            .collect();
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some(key.shader),
            entries: &entries,
        });
        let pl = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(key.shader),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let constants: Vec<(&str, f64)> = key
            .overrides
            .iter()
            .map(|(n, b)| (*n, f64::from_bits(*b)))
            .collect();
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(key.entry),
            layout: Some(&pl),
            module: &module,
            entry_point: Some(key.entry),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: &constants,
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::Gpu {
                context: format!("compiling shader {} ({})", key.shader, key.entry),
                message: e.to_string(),
            });
        }
        let cached = Arc::new(CachedPipeline {
            pipeline,
            layout,
            name: key.label(),
        });
        if let Ok(mut m) = self.map.lock() {
            m.insert(key.clone(), cached.clone());
        }
        Ok(cached)
    }
}
