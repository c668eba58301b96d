//! Shared test helpers: the GPU context (a missing adapter fails the test, never
//! skips it), random tensors and tolerance checks.
#![allow(dead_code)]

use masnet_wgpu::ops::Conv3dVariant;
use masnet_wgpu::rng::Rng;
use masnet_wgpu::{GpuContext, GpuOptions};
use ndarray::Array5;

/// Opens the default adapter; panics with the engine's message if there is none.
pub fn gpu() -> GpuContext {
    let opts = GpuOptions::from_env().expect("GPU options");
    match GpuContext::new(&opts) {
        Ok(c) => c,
        Err(e) => panic!("GPU tests need an adapter: {e}"),
    }
}

/// Random array uniform in [-1, 1).
pub fn random(shape: [usize; 5], seed: u64) -> Array5<f32> {
    let mut rng = Rng::new(seed);
    let n: usize = shape.iter().product();
    Array5::from_shape_vec(shape, rng.vec_f32(n, -1.0, 1.0)).unwrap()
}

/// Asserts `|a - b| <= atol + rtol * |b|` everywhere, reporting the worst element.
pub fn assert_close(a: &[f32], b: &[f32], rtol: f32, atol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    let mut worst = (0usize, 0f32);
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        assert!(x.is_finite(), "{what}: non-finite value {x} at {i}");
        let excess = (x - y).abs() - (atol + rtol * y.abs());
        if excess > worst.1 {
            worst = (i, excess);
        }
    }
    let i = worst.0;
    assert!(
        worst.1 <= 0.0,
        "{what}: element {i} differs: gpu {} vs cpu {} (rtol {rtol}, atol {atol})",
        a[i],
        b[i]
    );
}

/// The conv3d kernel variants this adapter can run (the subgroup one needs fixed
/// subgroups of 8 or more).
pub fn variants(ctx: &GpuContext) -> Vec<Conv3dVariant> {
    let mut v = vec![Conv3dVariant::Tiled];
    if ctx.subgroup_size.is_some_and(|s| s >= 8) {
        v.push(Conv3dVariant::Subgroup);
    }
    v
}
