//! Autotuning of the conv3d kernel family: `Conv3dVariant::Auto` resolves, per
//! (adapter, op, shape class), to the candidate kernel that ran fastest when timed once
//! on that shape. Choices are cached in memory and on disk as JSON
//! (`$MASNET_TUNE_CACHE`, else `$XDG_CACHE_HOME/masnet-wgpu/tune.json`, else
//! `$HOME/.cache/masnet-wgpu/tune.json`), so a model is tuned a handful of times per
//! adapter, not per call. `MASNET_NO_TUNE=1` or [`set_enabled`]`(false)` turns tuning
//! off: the fixed heuristic (subgroup kernel where usable, else tiled) runs instead.
//!
//! Timing happens with the caller's recording still open: the tuner submits its own
//! recorder on its own temporaries (allocated through `BufferPool::settled_only`, so
//! they never alias buffers the open recording may still read) and waits for it. See
//! docs/engine.md, "Kernel families and autotuning".

use crate::error::{Error, Result};
use crate::gpu::GpuContext;
use crate::ops::conv3d::ConvKernel;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

/// Where an `Auto` choice came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TuneSource {
    /// Timed just now on this shape.
    Measured,
    /// Found in the in-memory or on-disk cache (no timing).
    Cache,
    /// Tuning is off: the fixed heuristic.
    Disabled,
    /// `MASNET_CONV_VARIANT` names the kernel family.
    Forced,
}

/// One cached choice with the timings that made it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TuneEntry {
    /// The chosen kernel.
    pub kernel: ConvKernel,
    /// Median milliseconds of each candidate (label, ms).
    pub timings_ms: Vec<(String, f64)>,
}

#[derive(Default, Serialize, Deserialize)]
struct CacheFile {
    version: u32,
    entries: BTreeMap<String, TuneEntry>,
}

const FILE_VERSION: u32 = 1;

#[derive(Default)]
struct State {
    enabled: Option<bool>,
    path: Option<PathBuf>,
    /// The file the entries were loaded from (outer `None`: not loaded yet).
    loaded: Option<Option<PathBuf>>,
    entries: BTreeMap<String, TuneEntry>,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);
static MEASUREMENTS: AtomicUsize = AtomicUsize::new(0);

fn state() -> MutexGuard<'static, Option<State>> {
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

fn with_state<R>(f: impl FnOnce(&mut State) -> R) -> R {
    f(state().get_or_insert_with(State::default))
}

/// Turns autotuning on or off for this process (overrides `MASNET_NO_TUNE`).
pub fn set_enabled(on: bool) {
    with_state(|s| s.enabled = Some(on));
}

/// Whether `Auto` tunes: [`set_enabled`] if called, else not `MASNET_NO_TUNE=1`.
pub fn enabled() -> bool {
    with_state(|s| s.enabled).unwrap_or_else(|| {
        !std::env::var("MASNET_NO_TUNE").is_ok_and(|v| matches!(v.trim(), "1" | "true" | "yes"))
    })
}

/// Uses `path` as the cache file (overrides the environment); `None` restores the default.
/// Forgets the in-memory entries so the next lookup reads the new file.
pub fn set_cache_path(path: Option<PathBuf>) {
    with_state(|s| {
        s.path = path;
        s.loaded = None;
        s.entries.clear();
    });
}

/// Drops the in-memory cache; the next lookup re-reads the file (as a new process would).
pub fn forget() {
    with_state(|s| {
        s.loaded = None;
        s.entries.clear();
    });
}

/// How many shape classes were timed in this process (tests use it to see that a cache
/// hit did not time anything).
pub fn measurement_count() -> usize {
    MEASUREMENTS.load(Ordering::SeqCst)
}

/// The cache file: [`set_cache_path`], else `$MASNET_TUNE_CACHE`, else
/// `$XDG_CACHE_HOME/masnet-wgpu/tune.json`, else `$HOME/.cache/masnet-wgpu/tune.json`.
pub fn cache_path() -> Option<PathBuf> {
    if let Some(p) = with_state(|s| s.path.clone()) {
        return Some(p);
    }
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(p) = var("MASNET_TUNE_CACHE") {
        return Some(PathBuf::from(p));
    }
    let base = var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("masnet-wgpu").join("tune.json"))
}

/// The file's entries; an unreadable or corrupt file counts as empty (one warning line
/// when `warn`).
fn read_file(path: &PathBuf, warn: bool) -> BTreeMap<String, TuneEntry> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return BTreeMap::new(),
        Err(_) if !warn => return BTreeMap::new(),
        Err(e) => {
            eprintln!(
                "warning: ignoring unreadable tuning cache {}: {e}",
                path.display()
            );
            return BTreeMap::new();
        }
    };
    match serde_json::from_str::<CacheFile>(&text) {
        Ok(f) if f.version == FILE_VERSION => f.entries,
        Ok(_) | Err(_) if !warn => BTreeMap::new(),
        Ok(f) => {
            eprintln!(
                "warning: ignoring tuning cache {} of version {} (expected {FILE_VERSION})",
                path.display(),
                f.version
            );
            BTreeMap::new()
        }
        Err(e) => {
            eprintln!(
                "warning: ignoring corrupt tuning cache {}: {e}",
                path.display()
            );
            BTreeMap::new()
        }
    }
}

/// Merges `key` into the file (re-read first: another process may have added entries)
/// and replaces it atomically (temporary file + rename). Failures warn, never fail.
fn write_entry(path: &PathBuf, key: &str, entry: &TuneEntry) {
    let mut entries = read_file(path, false);
    entries.insert(key.to_string(), entry.clone());
    let file = CacheFile {
        version: FILE_VERSION,
        entries,
    };
    let result = (|| -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let text = serde_json::to_string_pretty(&file).map_err(std::io::Error::other)?;
        let tmp = path.with_extension(format!("json.tmp{}", std::process::id()));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, path).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
    })();
    if let Err(e) = result {
        eprintln!("warning: cannot write tuning cache {}: {e}", path.display());
    }
}

/// The adapter part of a cache key: name, backend, driver, and the subgroup size the
/// kernels may use (`--no-subgroups` changes the candidates).
pub fn adapter_key(ctx: &GpuContext) -> String {
    format!(
        "{} | {:?} | {} {} | sg {}",
        ctx.info.name,
        ctx.info.backend,
        ctx.info.driver,
        ctx.info.driver_info,
        ctx.subgroup_size.filter(|&s| s >= 8).unwrap_or(0)
    )
}

/// A coarse shape class: kernel, stride, channels rounded up to powers of two, and the
/// output voxel count (N·D·H·W) rounded up to a power of two.
pub fn shape_class(
    kernel: [usize; 3],
    stride: [usize; 3],
    cin: usize,
    cout: usize,
    voxels: usize,
) -> String {
    let [kd, kh, kw] = kernel;
    let [sd, sh, sw] = stride;
    format!(
        "k{kd}x{kh}x{kw} s{sd}x{sh}x{sw} ci{} co{} m{}",
        cin.next_power_of_two(),
        cout.next_power_of_two(),
        voxels.next_power_of_two()
    )
}

/// Looks up `op`/`class` for this adapter, or times every candidate with
/// `time(kernel, give_up_ms)` (which submits and waits, and returns median milliseconds,
/// stopping early once a run exceeds `give_up_ms`) and caches the fastest.
/// Candidates that fail (e.g. too much workgroup memory) are skipped; if all fail, the
/// first error is returned.
pub(crate) fn resolve(
    ctx: &GpuContext,
    op: &str,
    class: &str,
    candidates: &[ConvKernel],
    mut time: impl FnMut(ConvKernel, f64) -> Result<f64>,
) -> Result<(ConvKernel, TuneSource)> {
    let key = format!("{} || {op} | {class}", adapter_key(ctx));
    let path = cache_path();
    let cached = with_state(|s| {
        if s.loaded.as_ref() != Some(&path) {
            s.entries = path
                .as_ref()
                .map(|p| read_file(p, true))
                .unwrap_or_default();
            s.loaded = Some(path.clone());
        }
        s.entries.get(&key).map(|e| e.kernel)
    });
    if let Some(k) = cached.filter(|k| candidates.contains(k)) {
        return Ok((k, TuneSource::Cache));
    }
    // Errors of work recorded before belong to the caller, not to a candidate.
    ctx.check("GPU work before conv3d autotuning")?;
    let (best, timings, first_err) = pick(candidates, |k, give_up| {
        time(k, give_up).and_then(|ms| ctx.check("conv3d autotuning").map(|_| ms))
    });
    let Some((kernel, _)) = best else {
        return Err(first_err.unwrap_or_else(|| {
            Error::InvalidArgument(format!("conv3d autotuning: no candidate for {op} {class}"))
        }));
    };
    MEASUREMENTS.fetch_add(1, Ordering::SeqCst);
    let entry = TuneEntry {
        kernel,
        timings_ms: timings,
    };
    if let Some(p) = &path {
        write_entry(p, &key, &entry);
    }
    with_state(|s| {
        s.entries.insert(key, entry);
    });
    Ok((kernel, TuneSource::Measured))
}

/// What [`pick`] found: the fastest (kernel, ms), every timing and the first error.
type Picked = (Option<(ConvKernel, f64)>, Vec<(String, f64)>, Option<Error>);

/// A close second is timed again (see [`pick`]) when within this factor of the best.
const CLOSE: f64 = 1.3;

/// The fastest of `candidates` by `time(kernel, give_up_ms)`, every timing (label, ms;
/// failures as infinity) and the first error. Each candidate is timed once (one 1.5x
/// slower than the best so far is cut short); when the two fastest are within
/// [`CLOSE`], both are timed again in the opposite order and each keeps its faster
/// median, because the machine's speed can drift between two candidates' timings
/// (lavapipe in a shared VM: a fresh cache once chose a kernel 1.2-1.5x slower).
fn pick(candidates: &[ConvKernel], mut time: impl FnMut(ConvKernel, f64) -> Result<f64>) -> Picked {
    let mut ms: Vec<(ConvKernel, Option<f64>)> = Vec::new();
    let mut timings = Vec::new();
    let mut first_err = None;
    let best_of = |ms: &[(ConvKernel, Option<f64>)]| {
        ms.iter()
            .filter_map(|&(k, t)| t.map(|t| (k, t)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
    };
    for &k in candidates {
        let give_up = best_of(&ms).map_or(f64::INFINITY, |(_, b)| 1.5 * b);
        match time(k, give_up) {
            Ok(t) => ms.push((k, Some(t))),
            Err(e) => {
                timings.push((format!("{} failed: {e}", k.label()), f64::INFINITY));
                first_err.get_or_insert(e);
                ms.push((k, None));
            }
        }
    }
    let mut ranked: Vec<(ConvKernel, f64)> =
        ms.iter().filter_map(|&(k, t)| t.map(|t| (k, t))).collect();
    ranked.sort_by(|a, b| a.1.total_cmp(&b.1));
    if ranked.len() >= 2 && ranked[1].1 < CLOSE * ranked[0].1 {
        // Second first: the opposite of the first pass's order for the two.
        let (a, b) = (ranked[0].0, ranked[1].0);
        let (first, second) =
            if candidates.iter().position(|&k| k == a) < candidates.iter().position(|&k| k == b) {
                (b, a)
            } else {
                (a, b)
            };
        for k in [first, second] {
            if let Ok(t) = time(k, f64::INFINITY) {
                for e in ms.iter_mut().filter(|e| e.0 == k) {
                    e.1 = e.1.map(|old| old.min(t));
                }
            }
        }
    }
    for &(k, t) in &ms {
        if let Some(t) = t {
            timings.push((k.label(), t));
        }
    }
    (best_of(&ms), timings, first_err)
}

/// Median wall milliseconds of `reps` runs of `run` (each submits and waits) after one
/// warm-up run (pipeline compilation); stops early once the runs took over a second or
/// one run took over `give_up_ms`.
pub(crate) fn median_ms(
    reps: usize,
    give_up_ms: f64,
    mut run: impl FnMut() -> Result<()>,
) -> Result<f64> {
    run()?;
    let start = Instant::now();
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let s = Instant::now();
        run()?;
        t.push(s.elapsed().as_secs_f64() * 1e3);
        if start.elapsed().as_secs_f64() > 1.0 || t.last().is_some_and(|&ms| ms > give_up_ms) {
            break;
        }
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

/// Every cached entry for this adapter (key without the adapter part, entry), for
/// reports such as `masnet-wgpu info`.
pub fn cached_entries(ctx: &GpuContext) -> Vec<(String, TuneEntry)> {
    let prefix = format!("{} || ", adapter_key(ctx));
    let path = cache_path();
    let mut entries = path
        .as_ref()
        .map(|p| read_file(p, false))
        .unwrap_or_default();
    with_state(|s| {
        for (k, v) in &s.entries {
            entries.insert(k.clone(), v.clone());
        }
    });
    entries
        .into_iter()
        .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|r| (r.to_string(), v)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A close second timed again in the opposite order wins when its second timing
    /// beats the first pass's best; a clear winner is not timed again.
    #[test]
    fn a_close_second_is_timed_again() {
        let (a, b) = (ConvKernel::Subgroup, ConvKernel::Tiled);
        // First pass: a 10 ms, b 12 ms (drift); second pass: b 8 ms, a 11 ms.
        let mut calls = Vec::new();
        let mut plan = vec![10.0, 12.0, 8.0, 11.0].into_iter();
        let (best, timings, err) = pick(&[a, b], |k, _| {
            calls.push(k);
            Ok(plan.next().unwrap())
        });
        assert!(err.is_none());
        assert_eq!(calls, vec![a, b, b, a]);
        assert_eq!(best.map(|x| x.0), Some(b));
        assert_eq!(timings.len(), 2);
        assert!(timings.iter().any(|(l, t)| l == &b.label() && *t == 8.0));

        // A clear winner (2x): two timings only.
        let mut calls = 0;
        let mut plan = vec![10.0, 20.0].into_iter();
        let (best, _, _) = pick(&[a, b], |_, _| {
            calls += 1;
            Ok(plan.next().unwrap())
        });
        assert_eq!((best.map(|x| x.0), calls), (Some(a), 2));

        // A failing candidate is reported and skipped.
        let (best, timings, err) = pick(&[a, b], |k, _| {
            if k == a {
                Err(Error::InvalidArgument("no".into()))
            } else {
                Ok(5.0)
            }
        });
        assert_eq!(best.map(|x| x.0), Some(b));
        assert!(err.is_some());
        assert!(timings
            .iter()
            .any(|(l, t)| l.contains("failed") && t.is_infinite()));
    }
}
