//! Checkpoints: the parameter store saved as a [safetensors] file that PyTorch loads.
//!
//! A file is an 8-byte little-endian header length `N`, `N` bytes of JSON header (padded
//! with spaces to a multiple of 8), then the data buffer: every tensor's little-endian
//! f32 values, contiguous, in header order, with no gaps. Tensor names are the store's
//! dotted names; shapes follow PyTorch's layout (see [`file_shape`]). The header's
//! `__metadata__` holds `masnet.format_version`, `masnet.checksum` (FNV-1a 64 of the data
//! buffer, so a flipped byte anywhere in the data is detected) and whatever the caller
//! adds (the model code stores its configuration as JSON under `masnet.config`).
//!
//! Why by hand: the format is small, and a reader that checks every length against the
//! file size before allocating never panics or allocates absurd amounts on a damaged or
//! hostile file. Writes go to `<path>.tmp`, are fsynced and renamed over the target, so
//! a crash never leaves a half-written checkpoint at `path`. The layout is described for
//! PyTorch users in `docs/checkpoint-format.md`.
//!
//! [safetensors]: https://github.com/huggingface/safetensors

use crate::autograd::{ParamKind, ParamStore};
use crate::error::{Error, Result};
use crate::gpu::GpuContext;
use crate::tensor::Shape5;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// Metadata key of the format version.
pub const KEY_FORMAT_VERSION: &str = "masnet.format_version";
/// The format version this module writes and reads.
pub const FORMAT_VERSION: &str = "1";
/// Metadata key of the data checksum (FNV-1a 64 of the data buffer, 16 lowercase hex digits).
pub const KEY_CHECKSUM: &str = "masnet.checksum";
/// Metadata key under which the model code stores its configuration as JSON.
pub const KEY_CONFIG: &str = "masnet.config";
/// Name prefix reserved for optimiser state (`optimizer.adam_m.<param>`).
pub const OPTIMIZER_PREFIX: &str = "optimizer.";
/// Largest JSON header accepted (the limit of the reference implementation).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

const METADATA_KEY: &str = "__metadata__";

/// One tensor of a checkpoint, on the CPU.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointTensor {
    /// Dotted name (`dense1.layers.0.bn.weight`).
    pub name: String,
    /// Shape in the file (PyTorch layout, see [`file_shape`]).
    pub shape: Vec<usize>,
    /// Row-major values; `data.len()` is the product of `shape`.
    pub data: Vec<f32>,
}

/// A checkpoint on the CPU: tensors in file order plus string metadata.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Checkpoint {
    /// Tensors in data order.
    pub tensors: Vec<CheckpointTensor>,
    /// `__metadata__` of the header.
    pub metadata: BTreeMap<String, String>,
}

/// The shape a store tensor has in the file (PyTorch layout).
///
/// Convolution kernels (`ParamKind::ConvWeight`) keep their 5-D shape: `[Cout, Cin, kd,
/// kh, kw]` for convolutions, `[Cin, Cout, k, k, k]` for transposed convolutions, exactly
/// as PyTorch's `Conv3d`/`ConvTranspose3d` store them — even a `[1, Cin, 1, 1, 1]` kernel.
/// Any other tensor of shape `[1, C, 1, 1, 1]` (biases, BN weight, bias, running mean
/// and variance) becomes 1-D `[C]`; everything else keeps its 5 dimensions.
pub fn file_shape(shape: Shape5, kind: ParamKind) -> Vec<usize> {
    let [n, c, d, h, w] = shape.0;
    if kind != ParamKind::ConvWeight && n == 1 && d == 1 && h == 1 && w == 1 {
        vec![c]
    } else {
        shape.0.to_vec()
    }
}

/// Whether a file shape fits a store tensor of `shape`: its 5-D shape, or `[C]` for
/// `[1, C, 1, 1, 1]` (whatever the kind, so files written either way load).
fn shape_fits(file: &[usize], shape: Shape5) -> bool {
    let [n, c, d, h, w] = shape.0;
    file == shape.0 || (n == 1 && d == 1 && h == 1 && w == 1 && file == [c])
}

/// FNV-1a 64 of a byte stream, fed in pieces.
#[derive(Clone, Copy, Debug)]
pub struct Fnv1a64(u64);

impl Default for Fnv1a64 {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a64 {
    /// Feeds `bytes`.
    pub fn update(&mut self, bytes: &[u8]) {
        let mut h = self.0;
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.0 = h;
    }
    /// The hash of everything fed so far.
    pub fn finish(&self) -> u64 {
        self.0
    }
    /// The hash as stored under [`KEY_CHECKSUM`]: 16 lowercase hex digits.
    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

fn le_bytes(data: &[f32]) -> Vec<u8> {
    data.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn format_err(origin: &str, msg: impl fmt::Display) -> Error {
    Error::InvalidArgument(format!("checkpoint {origin}: {msg}"))
}

fn numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
}

fn json_str(s: &str) -> Result<String> {
    serde_json::to_string(s)
        .map_err(|e| Error::InvalidArgument(format!("cannot encode '{s}' as JSON: {e}")))
}

impl Checkpoint {
    /// An empty checkpoint.
    pub fn new() -> Self {
        Self::default()
    }

    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Option<&CheckpointTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Reads every tensor of `store` back (in creation order) with shapes from
    /// [`file_shape`]; `metadata` goes to the header as is.
    pub fn from_store(
        ctx: &GpuContext,
        store: &ParamStore,
        metadata: BTreeMap<String, String>,
    ) -> Result<Checkpoint> {
        let mut tensors = Vec::with_capacity(store.len());
        for (id, e) in store.iter() {
            tensors.push(CheckpointTensor {
                name: e.name.clone(),
                shape: file_shape(e.value.shape(), e.kind),
                data: store.read(ctx, id)?,
            });
        }
        Ok(Checkpoint { tensors, metadata })
    }

    /// Loads every tensor into `store` (see [`Checkpoint::load_into_filtered`]).
    pub fn load_into(&self, ctx: &GpuContext, store: &ParamStore) -> Result<()> {
        self.load_into_filtered(ctx, store, &[])
    }

    /// Checks that the checkpoint's tensors (minus those whose names start with one of
    /// `ignore_prefixes`, e.g. [`OPTIMIZER_PREFIX`]) are exactly the store's, with
    /// fitting shapes; reports every missing, unexpected and misshapen tensor in one
    /// error and changes nothing if there is any; otherwise uploads all of them.
    pub fn load_into_filtered(
        &self,
        ctx: &GpuContext,
        store: &ParamStore,
        ignore_prefixes: &[&str],
    ) -> Result<()> {
        let mut by_name: HashMap<&str, &CheckpointTensor> = HashMap::new();
        let mut problems = Vec::new();
        for t in &self.tensors {
            if ignore_prefixes.iter().any(|p| t.name.starts_with(p)) {
                continue;
            }
            if by_name.insert(t.name.as_str(), t).is_some() {
                problems.push(format!("duplicate tensor '{}' in the checkpoint", t.name));
            }
        }
        let mut plan = Vec::with_capacity(store.len());
        for (id, e) in store.iter() {
            let shape = e.value.shape();
            match by_name.get(e.name.as_str()) {
                None => problems.push(format!(
                    "missing tensor '{}' (model shape {:?})",
                    e.name,
                    file_shape(shape, e.kind)
                )),
                Some(t) if !shape_fits(&t.shape, shape) => problems.push(format!(
                    "shape mismatch for '{}': checkpoint {:?}, model {:?}",
                    e.name,
                    t.shape,
                    file_shape(shape, e.kind)
                )),
                Some(t) if Some(t.data.len()) != shape.numel().ok() => problems.push(format!(
                    "tensor '{}' has {} values, its shape {:?} needs {}",
                    e.name,
                    t.data.len(),
                    t.shape,
                    numel(&t.shape).map_or("too many".to_string(), |n| n.to_string())
                )),
                Some(t) => plan.push((id, *t)),
            }
        }
        for t in &self.tensors {
            if !ignore_prefixes.iter().any(|p| t.name.starts_with(p)) && store.id(&t.name).is_err()
            {
                problems.push(format!(
                    "unexpected tensor '{}' {:?} (not in the model)",
                    t.name, t.shape
                ));
            }
        }
        if !problems.is_empty() {
            return Err(Error::Shape(format!(
                "checkpoint does not match the model ({} problem{}; nothing was loaded):\n  {}",
                problems.len(),
                if problems.len() == 1 { "" } else { "s" },
                problems.join("\n  ")
            )));
        }
        for (id, t) in plan {
            store.set(ctx, id, &t.data)?;
        }
        Ok(())
    }

    /// The whole file as bytes, with [`KEY_FORMAT_VERSION`] and [`KEY_CHECKSUM`] set in
    /// the metadata (overriding any values given).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let header = self.header()?;
        let total = self.tensors.iter().map(|t| t.data.len() * 4).sum::<usize>();
        let mut out = Vec::with_capacity(8 + header.len() + total);
        out.extend_from_slice(&(header.len() as u64).to_le_bytes());
        out.extend_from_slice(&header);
        for t in &self.tensors {
            out.extend_from_slice(&le_bytes(&t.data));
        }
        Ok(out)
    }

    /// Validates the tensors and builds the JSON header, padded with spaces to a
    /// multiple of 8 bytes.
    fn header(&self) -> Result<Vec<u8>> {
        let mut seen = HashSet::new();
        let mut hash = Fnv1a64::default();
        let mut entries = Vec::with_capacity(self.tensors.len());
        let mut offset = 0u64;
        for t in &self.tensors {
            if t.name.is_empty() || t.name == METADATA_KEY {
                return Err(Error::InvalidArgument(format!(
                    "checkpoint tensor name '{}' is not allowed",
                    t.name
                )));
            }
            if !seen.insert(t.name.as_str()) {
                return Err(Error::InvalidArgument(format!(
                    "checkpoint tensor '{}' appears twice",
                    t.name
                )));
            }
            if numel(&t.shape) != Some(t.data.len()) {
                return Err(Error::Shape(format!(
                    "checkpoint tensor '{}': {} values for shape {:?}",
                    t.name,
                    t.data.len(),
                    t.shape
                )));
            }
            hash.update(&le_bytes(&t.data));
            let end = offset + t.data.len() as u64 * 4;
            entries.push(format!(
                "{}:{{\"dtype\":\"F32\",\"shape\":{:?},\"data_offsets\":[{offset},{end}]}}",
                json_str(&t.name)?,
                t.shape
            ));
            offset = end;
        }
        let mut meta = self.metadata.clone();
        meta.insert(KEY_FORMAT_VERSION.to_string(), FORMAT_VERSION.to_string());
        meta.insert(KEY_CHECKSUM.to_string(), hash.hex());
        let meta = serde_json::to_string(&meta)
            .map_err(|e| Error::InvalidArgument(format!("checkpoint metadata: {e}")))?;
        let mut header = format!("{{\"{METADATA_KEY}\":{meta}");
        for e in entries {
            header.push(',');
            header.push_str(&e);
        }
        header.push('}');
        let pad = (8 - header.len() % 8) % 8;
        header.extend(std::iter::repeat_n(' ', pad));
        Ok(header.into_bytes())
    }

    /// Writes the file atomically: `<path>.tmp` in the same folder, fsync, rename over
    /// `path`. On failure `path` is untouched and the temporary file is removed.
    pub fn write(&self, path: &Path) -> Result<()> {
        let header = self.header()?;
        let tmp = tmp_path(path);
        let io = |p: &Path| {
            let p = p.display().to_string();
            move |source| Error::Io { path: p, source }
        };
        let result = (|| -> Result<()> {
            let file = File::create(&tmp).map_err(io(&tmp))?;
            let mut w = BufWriter::new(file);
            w.write_all(&(header.len() as u64).to_le_bytes())
                .map_err(io(&tmp))?;
            w.write_all(&header).map_err(io(&tmp))?;
            for t in &self.tensors {
                w.write_all(&le_bytes(&t.data)).map_err(io(&tmp))?;
            }
            let file = w.into_inner().map_err(|e| io(&tmp)(e.into_error()))?;
            file.sync_all().map_err(io(&tmp))?;
            drop(file);
            std::fs::rename(&tmp, path).map_err(io(path))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
            return result;
        }
        sync_parent(path);
        Ok(())
    }

    /// Reads and fully validates a file (see [`Checkpoint::from_reader`]).
    pub fn read(path: &Path) -> Result<Checkpoint> {
        let origin = path.display().to_string();
        let io = |source| Error::Io {
            path: origin.clone(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        Self::from_reader(std::io::BufReader::new(file), len, &origin)
    }

    /// Parses a file held in memory; `origin` names it in errors.
    pub fn from_bytes(bytes: &[u8], origin: &str) -> Result<Checkpoint> {
        Self::from_reader(bytes, bytes.len() as u64, origin)
    }

    /// Parses `len` bytes from `r`. Every length is checked against `len` before
    /// anything is allocated; only F32 tensors are accepted; offsets must cover the data
    /// buffer contiguously; the checksum is verified when present.
    pub fn from_reader<R: Read>(mut r: R, len: u64, origin: &str) -> Result<Checkpoint> {
        let io = |source| Error::Io {
            path: origin.to_string(),
            source,
        };
        if len < 8 {
            return Err(format_err(
                origin,
                format!("file is truncated: {len} bytes, too short for the 8-byte header length"),
            ));
        }
        let mut n8 = [0u8; 8];
        r.read_exact(&mut n8).map_err(io)?;
        let n = u64::from_le_bytes(n8);
        if n > len - 8 {
            return Err(format_err(
                origin,
                format!(
                    "header length {n} exceeds the {} bytes after the length field \
                     (truncated file or not a safetensors file)",
                    len - 8
                ),
            ));
        }
        if n > MAX_HEADER_BYTES {
            return Err(format_err(
                origin,
                format!("header length {n} exceeds the limit of {MAX_HEADER_BYTES} bytes"),
            ));
        }
        let data_len = len - 8 - n;
        let mut header = vec![0u8; n as usize];
        r.read_exact(&mut header).map_err(io)?;
        let (specs, metadata) = parse_header(&header, data_len, origin)?;
        drop(header);

        let mut hash = Fnv1a64::default();
        let mut tensors = Vec::with_capacity(specs.len());
        let mut buf = Vec::new();
        for s in specs {
            // Offsets are contiguous from 0 and end within `data_len`: checked above.
            let bytes = (s.end - s.begin) as usize;
            buf.resize(bytes, 0);
            r.read_exact(&mut buf).map_err(io)?;
            hash.update(&buf);
            let data = buf
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            tensors.push(CheckpointTensor {
                name: s.name,
                shape: s.shape,
                data,
            });
        }
        if let Some(want) = metadata.get(KEY_CHECKSUM) {
            if *want != hash.hex() {
                return Err(format_err(
                    origin,
                    format!(
                        "checksum mismatch: file is corrupted (stored {want}, data hashes to {})",
                        hash.hex()
                    ),
                ));
            }
        }
        Ok(Checkpoint { tensors, metadata })
    }
}

/// `<path>.tmp`.
fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// Makes the rename durable where the platform allows (best effort: the file itself is
/// already complete and synced, so a failure here is not reported).
fn sync_parent(path: &Path) {
    #[cfg(unix)]
    {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

/// One tensor entry of a parsed header.
struct Spec {
    name: String,
    shape: Vec<usize>,
    begin: u64,
    end: u64,
}

/// A JSON object's entries in text order, duplicates kept (serde_json's map would keep
/// only the last of two equal keys).
struct OrderedObject(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for OrderedObject {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OrderedObject;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<OrderedObject, A::Error> {
                let mut v = Vec::new();
                while let Some(entry) = m.next_entry::<String, Value>()? {
                    v.push(entry);
                }
                Ok(OrderedObject(v))
            }
        }
        d.deserialize_map(V)
    }
}

/// Parses and validates the header against a data buffer of `data_len` bytes; returns
/// the tensors sorted by offset (contiguous from 0 to `data_len`) and the metadata.
fn parse_header(
    header: &[u8],
    data_len: u64,
    origin: &str,
) -> Result<(Vec<Spec>, BTreeMap<String, String>)> {
    let text = std::str::from_utf8(header)
        .map_err(|e| format_err(origin, format!("header is not valid UTF-8: {e}")))?;
    if !text.starts_with('{') {
        return Err(format_err(
            origin,
            "header is not a JSON object (does not start with '{'); not a safetensors file",
        ));
    }
    let obj: OrderedObject = serde_json::from_str(text)
        .map_err(|e| format_err(origin, format!("header is not valid JSON: {e}")))?;

    let mut metadata = None;
    let mut seen = HashSet::new();
    let mut specs = Vec::with_capacity(obj.0.len());
    for (name, value) in obj.0 {
        if !seen.insert(name.clone()) {
            return Err(format_err(origin, format!("tensor '{name}' appears twice")));
        }
        if name == METADATA_KEY {
            metadata = Some(parse_metadata(value, origin)?);
        } else {
            specs.push(parse_spec(name, value, origin)?);
        }
    }
    let metadata = metadata.unwrap_or_default();
    if let Some(v) = metadata.get(KEY_FORMAT_VERSION) {
        if v != FORMAT_VERSION {
            return Err(format_err(
                origin,
                format!(
                    "unsupported {KEY_FORMAT_VERSION} '{v}' (this build reads '{FORMAT_VERSION}')"
                ),
            ));
        }
    }

    for s in &specs {
        if s.end > data_len {
            return Err(format_err(
                origin,
                format!(
                    "tensor '{}' data_offsets [{}, {}] extend past the end of the {data_len}-byte \
                     data buffer (file truncated?)",
                    s.name, s.begin, s.end
                ),
            ));
        }
    }
    specs.sort_by_key(|s| (s.begin, s.end));
    let mut pos = 0u64;
    let mut prev: Option<&str> = None;
    for s in &specs {
        if s.begin < pos {
            return Err(format_err(
                origin,
                format!(
                    "tensor '{}' data_offsets [{}, {}] overlap those of '{}' (which end at {pos})",
                    s.name,
                    s.begin,
                    s.end,
                    prev.unwrap_or("?")
                ),
            ));
        }
        if s.begin > pos {
            return Err(format_err(
                origin,
                format!(
                    "gap in the data buffer: bytes {pos}..{} belong to no tensor (before '{}')",
                    s.begin, s.name
                ),
            ));
        }
        pos = s.end;
        prev = Some(&s.name);
    }
    if pos != data_len {
        return Err(format_err(
            origin,
            format!(
                "gap in the data buffer: bytes {pos}..{data_len} at its end belong to no tensor"
            ),
        ));
    }
    Ok((specs, metadata))
}

fn parse_metadata(value: Value, origin: &str) -> Result<BTreeMap<String, String>> {
    let Value::Object(map) = value else {
        return Err(format_err(origin, "__metadata__ is not a JSON object"));
    };
    map.into_iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k, s)),
            other => Err(format_err(
                origin,
                format!("__metadata__ value of '{k}' is not a string: {other}"),
            )),
        })
        .collect()
}

fn parse_spec(name: String, value: Value, origin: &str) -> Result<Spec> {
    let bad = |msg: String| format_err(origin, format!("tensor '{name}': {msg}"));
    let Value::Object(map) = value else {
        return Err(bad(format!("entry is not a JSON object: {value}")));
    };
    for k in map.keys() {
        if !matches!(k.as_str(), "dtype" | "shape" | "data_offsets") {
            return Err(bad(format!("unknown field '{k}'")));
        }
    }
    match map.get("dtype") {
        Some(Value::String(d)) if d == "F32" => {}
        Some(Value::String(d)) => {
            return Err(bad(format!(
                "dtype {d} is not supported (only F32; convert with .float() before saving)"
            )))
        }
        Some(other) => return Err(bad(format!("dtype is not a string: {other}"))),
        None => return Err(bad("dtype is missing".to_string())),
    }
    let shape = match map.get("shape") {
        Some(Value::Array(dims)) => dims
            .iter()
            .map(|d| {
                d.as_u64()
                    .and_then(|v| usize::try_from(v).ok())
                    .ok_or_else(|| {
                        bad(format!(
                            "shape dimension {d} is not a non-negative integer that fits in memory"
                        ))
                    })
            })
            .collect::<Result<Vec<usize>>>()?,
        Some(other) => return Err(bad(format!("shape is not an array: {other}"))),
        None => return Err(bad("shape is missing".to_string())),
    };
    let (begin, end) = match map.get("data_offsets") {
        Some(Value::Array(o)) if o.len() == 2 => match (o[0].as_u64(), o[1].as_u64()) {
            (Some(b), Some(e)) if b <= e => (b, e),
            _ => {
                return Err(bad(format!(
                    "data_offsets [{}, {}] are not two non-negative integers begin <= end",
                    o[0], o[1]
                )))
            }
        },
        Some(other) => {
            return Err(bad(format!(
                "data_offsets is not a [begin, end] pair: {other}"
            )))
        }
        None => return Err(bad("data_offsets is missing".to_string())),
    };
    let bytes = numel(&shape)
        .and_then(|n| n.checked_mul(4))
        .and_then(|b| u64::try_from(b).ok())
        .ok_or_else(|| bad(format!("shape {shape:?} has too many elements")))?;
    if bytes != end - begin {
        return Err(Error::Shape(format!(
            "checkpoint {origin}: tensor '{name}': shape {shape:?} needs {bytes} bytes of F32 \
             but data_offsets [{begin}, {end}] hold {}",
            end - begin
        )));
    }
    Ok(Spec {
        name,
        shape,
        begin,
        end,
    })
}
