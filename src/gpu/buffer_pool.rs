//! A pool of storage buffers in size classes, so a training loop reuses buffers
//! instead of allocating every step.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Usage of every tensor buffer: bound as storage, copied to and from.
pub const TENSOR_USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_DST)
    .union(wgpu::BufferUsages::COPY_SRC);

/// Free buffers by size class.
///
/// Buffers released since the last submission are kept apart ("recent"): commands
/// recorded but not yet submitted may still read them. Ops recorded later in the same
/// stream may reuse them (the GPU runs commands in order), but an upload through
/// `queue.write_buffer` runs before the pending commands, so uploads only take buffers
/// released before the last submission ([`BufferPool::take_settled`]).
#[derive(Default, Clone)]
pub struct BufferPool {
    free: Arc<Mutex<HashMap<u64, Vec<wgpu::Buffer>>>>,
    recent: Arc<Mutex<HashMap<u64, Vec<wgpu::Buffer>>>>,
    settled_only: Arc<AtomicUsize>,
    /// Buffers released while a [`SettledOnly`] guard is alive: used only by the guarded
    /// work (the tuner's own submissions), so that work may reuse them in its stream;
    /// they become free when the last guard drops (the tuner has waited by then).
    scratch: Arc<Mutex<HashMap<u64, Vec<wgpu::Buffer>>>>,
    stats: Arc<PoolStats>,
}

/// Byte counters of a pool (size-class bytes, i.e. what the driver allocated).
#[derive(Default)]
struct PoolStats {
    /// Bytes of buffers on loan (live tensors).
    in_use: AtomicU64,
    /// Highest `in_use` since the last [`BufferPool::reset_peak`].
    peak_in_use: AtomicU64,
    /// Bytes of every buffer the pool holds from the driver (on loan or free).
    held: AtomicU64,
    /// Highest `held` since the last reset.
    peak_held: AtomicU64,
}

/// Memory use of the tensors of a context, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryReport {
    /// Live tensors now.
    pub in_use: u64,
    /// Most live tensor bytes at once since the last reset: what the work needs.
    pub peak_in_use: u64,
    /// Bytes the pool holds from the driver now (live + cached for reuse).
    pub held: u64,
    /// Most bytes held at once since the last reset: the GPU memory it took.
    pub peak_held: u64,
}

/// While alive, every [`BufferPool::take`] behaves like [`BufferPool::take_settled`]
/// (see [`BufferPool::settled_only`]).
pub struct SettledOnly(BufferPool);

impl Drop for SettledOnly {
    fn drop(&mut self) {
        let pool = &self.0;
        if pool.settled_only.fetch_sub(1, Ordering::SeqCst) == 1 {
            // Without this, every tuning run's temporaries piled up until the caller's
            // recording was submitted (24 GB for a DU-Net training step on lavapipe).
            if let (Ok(mut scratch), Ok(mut free)) = (pool.scratch.lock(), pool.free.lock()) {
                for (class, mut v) in scratch.drain() {
                    free.entry(class).or_default().append(&mut v);
                }
            }
        }
    }
}

/// Rounds a byte size up to its class: at most 1/8 (12.5 %) larger, multiple of 256.
pub fn size_class(bytes: u64) -> u64 {
    let b = bytes.max(256);
    let top = 63 - b.leading_zeros() as u64;
    let step = if top >= 3 { 1u64 << (top - 3) } else { 1 }.max(256);
    b.div_ceil(step) * step
}

impl BufferPool {
    /// A buffer of at least `bytes`, reused when one of its class is free.
    pub fn take(&self, device: &wgpu::Device, bytes: u64) -> PooledBuffer {
        self.take_from(device, bytes, true)
    }

    /// A buffer safe to fill with `queue.write_buffer` while a recording is open.
    pub fn take_settled(&self, device: &wgpu::Device, bytes: u64) -> PooledBuffer {
        self.take_from(device, bytes, false)
    }

    /// Until the guard drops, hands out only settled buffers: for work submitted on its
    /// own while another recording is open (the autotuner), which runs before that
    /// recording's pending commands and so must not reuse buffers they may still read.
    pub fn settled_only(&self) -> SettledOnly {
        self.settled_only.fetch_add(1, Ordering::SeqCst);
        SettledOnly(self.clone())
    }

    /// Marks every buffer released so far as settled (call after each submission).
    pub fn settle(&self) {
        let (Ok(mut recent), Ok(mut free)) = (self.recent.lock(), self.free.lock()) else {
            return;
        };
        for (class, mut v) in recent.drain() {
            free.entry(class).or_default().append(&mut v);
        }
    }

    fn take_from(&self, device: &wgpu::Device, bytes: u64, allow_recent: bool) -> PooledBuffer {
        let class = size_class(bytes);
        let pop = |m: &Mutex<HashMap<u64, Vec<wgpu::Buffer>>>| {
            m.lock()
                .ok()
                .and_then(|mut m| m.get_mut(&class).and_then(|v| v.pop()))
        };
        let guarded = self.settled_only.load(Ordering::SeqCst) > 0;
        let allow_recent = allow_recent && !guarded;
        let reused = pop(&self.free).or_else(|| if guarded { pop(&self.scratch) } else { None });
        let reused = reused.or_else(|| {
            if allow_recent {
                pop(&self.recent)
            } else {
                None
            }
        });
        let buffer = reused.unwrap_or_else(|| {
            let held = self.stats.held.fetch_add(class, Ordering::Relaxed) + class;
            self.stats.peak_held.fetch_max(held, Ordering::Relaxed);
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("tensor"),
                size: class,
                usage: TENSOR_USAGE,
                mapped_at_creation: false,
            })
        });
        let used = self.stats.in_use.fetch_add(class, Ordering::Relaxed) + class;
        self.stats.peak_in_use.fetch_max(used, Ordering::Relaxed);
        PooledBuffer {
            buffer: Some(buffer),
            pool: self.clone(),
        }
    }

    /// Bytes currently held free in the pool.
    pub fn free_bytes(&self) -> u64 {
        let bytes = |m: &Mutex<HashMap<u64, Vec<wgpu::Buffer>>>| {
            m.lock()
                .map(|m| m.iter().map(|(c, v)| c * v.len() as u64).sum())
                .unwrap_or(0)
        };
        bytes(&self.free) + bytes(&self.recent) + bytes(&self.scratch)
    }

    /// Releases every free buffer to the driver.
    pub fn trim(&self) {
        let released = self.free_bytes();
        if let Ok(mut m) = self.free.lock() {
            m.clear();
        }
        if let Ok(mut m) = self.recent.lock() {
            m.clear();
        }
        self.stats.held.fetch_sub(
            released.min(self.stats.held.load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
    }

    /// Current and peak memory of the pool's buffers.
    pub fn memory(&self) -> MemoryReport {
        let s = &self.stats;
        MemoryReport {
            in_use: s.in_use.load(Ordering::Relaxed),
            peak_in_use: s.peak_in_use.load(Ordering::Relaxed),
            held: s.held.load(Ordering::Relaxed),
            peak_held: s.peak_held.load(Ordering::Relaxed),
        }
    }

    /// Starts a new peak measurement from the current use.
    pub fn reset_peak(&self) {
        let s = &self.stats;
        s.peak_in_use
            .store(s.in_use.load(Ordering::Relaxed), Ordering::Relaxed);
        s.peak_held
            .store(s.held.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    fn give_back(&self, buffer: wgpu::Buffer) {
        self.stats
            .in_use
            .fetch_sub(buffer.size(), Ordering::Relaxed);
        let list = if self.settled_only.load(Ordering::SeqCst) > 0 {
            &self.scratch
        } else {
            &self.recent
        };
        if let Ok(mut m) = list.lock() {
            m.entry(buffer.size()).or_default().push(buffer);
        }
    }
}

/// A buffer on loan from the pool; returned to it on drop.
pub struct PooledBuffer {
    buffer: Option<wgpu::Buffer>,
    pool: BufferPool,
}

impl PooledBuffer {
    /// The underlying wgpu buffer.
    pub fn buffer(&self) -> &wgpu::Buffer {
        self.buffer.as_ref().expect("buffer present until drop")
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        if let Some(b) = self.buffer.take() {
            self.pool.give_back(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes_cover_and_bound_waste() {
        for bytes in [
            1u64,
            255,
            256,
            257,
            1000,
            4096,
            5000,
            1 << 20,
            (1 << 20) + 1,
            123_456_789,
        ] {
            let c = size_class(bytes);
            assert!(c >= bytes, "{bytes} -> {c}");
            assert_eq!(c % 256, 0);
            assert!(
                c as f64 <= (bytes.max(256) as f64) * 1.125 + 256.0,
                "{bytes} -> {c}"
            );
        }
    }
}
