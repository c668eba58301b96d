//! Operations: each has a WGSL kernel, a launcher that validates its inputs, and a
//! plain-loop CPU reference used by tests (and by users who want to compare).

pub mod adam;
pub mod batchnorm;
pub mod conv3d;
pub mod conv3d_backward;
pub mod conv3d_chain;
pub mod conv3d_gemm;
pub mod conv3d_pointwise;
pub mod conv_transpose3d;
pub mod elementwise;
pub mod loss;
pub mod matmul;
pub(crate) mod params;
pub mod pool;
pub mod reduce;
pub mod tune;
pub mod upsample;

pub use conv3d::{conv3d, conv3d_forward, Conv3dSpec, Conv3dVariant, ConvKernel};

/// Every shader the engine compiles, in its specialised forms (name, WGSL source).
pub fn shader_variants() -> Vec<(String, String)> {
    let mut v = conv3d::shader_variants();
    v.extend(conv3d_backward::shader_variants());
    v.extend(conv3d_gemm::shader_variants());
    v.extend(conv3d_pointwise::shader_variants());
    v.extend(reduce::shader_variants());
    v.extend(elementwise::shader_variants());
    v.extend(batchnorm::shader_variants());
    v.extend(pool::shader_variants());
    v.extend(upsample::shader_variants());
    v.extend(loss::shader_variants());
    v.extend(matmul::shader_variants());
    v.extend(adam::shader_variants());
    v.extend(conv_transpose3d::shader_variants());
    v
}
