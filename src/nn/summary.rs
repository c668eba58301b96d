//! Parameter counts per layer, as `masnet-wgpu summary` prints them.

use crate::autograd::ParamStore;

/// One row: module path, trainable scalars, buffer scalars (BN running statistics).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SummaryRow {
    /// Module path, e.g. `dense1.layers.0` or `down2.strided`.
    pub module: String,
    /// Trainable scalars.
    pub trainable: usize,
    /// Non-trainable scalars (running statistics).
    pub buffers: usize,
}

/// The module a parameter belongs to for the table: `denseN.layers.L`, `downN.slot`,
/// or the first path component.
fn module_of(name: &str) -> String {
    let parts: Vec<&str> = name.split('.').collect();
    let depth = if parts[0].starts_with("dense") {
        3
    } else if parts[0].starts_with("down") {
        2
    } else {
        1
    };
    parts[..depth.min(parts.len())].join(".")
}

/// Rows in creation order, one per module.
pub fn summary_rows(store: &ParamStore) -> Vec<SummaryRow> {
    let mut rows: Vec<SummaryRow> = Vec::new();
    for (_, e) in store.iter() {
        let module = module_of(&e.name);
        let n = e.value.shape().numel().unwrap_or(0);
        if rows.last().is_none_or(|r| r.module != module) {
            rows.push(SummaryRow {
                module,
                trainable: 0,
                buffers: 0,
            });
        }
        if let Some(r) = rows.last_mut() {
            if e.kind.trainable() {
                r.trainable += n;
            } else {
                r.buffers += n;
            }
        }
    }
    rows
}

/// Formats a count with thousands separators (`3,109,521`).
pub fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}
