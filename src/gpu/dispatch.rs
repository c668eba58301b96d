//! Spreading a 1-D count of workgroups over the 3-D dispatch grid, so no dimension
//! exceeds the adapter's per-dimension limit (65535 on most).

use crate::error::{Error, Result};

/// A dispatch grid for `total` workgroups; shaders rebuild the linear id
/// `x + y * nx + z * nx * ny` and ignore ids `>= total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkgroupGrid {
    /// Workgroups per dimension.
    pub dims: [u32; 3],
    /// The linear count the shader must respect.
    pub total: u32,
}

/// Grid for `total` workgroups with at most `max_per_dim` per dimension.
pub fn workgroup_grid(total: u64, max_per_dim: u32) -> Result<WorkgroupGrid> {
    let m = max_per_dim.max(1) as u64;
    if total == 0 {
        return Ok(WorkgroupGrid {
            dims: [0, 1, 1],
            total: 0,
        });
    }
    if total > u32::MAX as u64 || total > m * m * m {
        return Err(Error::Limit(format!(
            "{total} workgroups exceed the dispatch limit ({m} per dimension)"
        )));
    }
    let x = total.min(m);
    let rest = total.div_ceil(x);
    let y = rest.min(m);
    let z = rest.div_ceil(y);
    Ok(WorkgroupGrid {
        dims: [x as u32, y as u32, z as u32],
        total: total as u32,
    })
}

#[cfg(test)]
mod tests {
    use super::workgroup_grid;

    #[test]
    fn grid_covers_total_within_limits() {
        for total in [1u64, 7, 65535, 65536, 200_000, 65535 * 65535 + 3] {
            let g = workgroup_grid(total, 65535).unwrap();
            let cap: u64 = g.dims.iter().map(|&d| d as u64).product();
            assert!(
                cap >= total && g.dims.iter().all(|&d| d <= 65535),
                "{total}: {g:?}"
            );
        }
        assert!(workgroup_grid(u64::MAX, 65535).is_err());
    }
}
