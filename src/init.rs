//! Weight initialisers (CPU only, seeded with [`Rng`] so runs are reproducible), matching
//! Keras' definitions because 3D-MASNet was trained with Keras:
//!
//! - `he_normal` = `VarianceScaling(scale=2, mode="fan_in", distribution="truncated_normal")`:
//!   a normal truncated at ±2σ, redrawn outside. Truncation at 2σ shrinks the standard
//!   deviation by the factor 0.87962566103423978 (the std of a standard normal
//!   truncated to [−2, 2]), so Keras divides σ by it: the samples then have exactly the
//!   intended std `sqrt(2/fan_in)`, while the cut sits at `2·sqrt(2/fan_in)/0.8796…`.
//! - `glorot_uniform`: uniform on `[−l, l)`, `l = sqrt(6/(fan_in + fan_out))`.
//!
//! Fans follow Keras (and PyTorch): a conv weight `[Cout, Cin, kd, kh, kw]` has
//! `fan_in = Cin·kd·kh·kw`, `fan_out = Cout·kd·kh·kw`; see [`fans_transposed`] for
//! transposed-conv weights.

use crate::error::{Error, Result};
use crate::rng::Rng;

/// Standard deviation of a standard normal truncated to `[−2, 2]` (Keras' correction).
pub const TRUNCATED_NORMAL_STD: f64 = 0.879_625_661_034_239_8; // Keras: .87962566103423978

/// `(fan_in, fan_out)` of a conv weight `[Cout, Cin, kd, kh, kw]`:
/// `(Cin·kd·kh·kw, Cout·kd·kh·kw)`.
pub fn fans(shape: [usize; 5]) -> (usize, usize) {
    let [cout, cin, kd, kh, kw] = shape;
    let rf = kd * kh * kw;
    (cin * rf, cout * rf)
}

/// `(fan_in, fan_out)` of a transposed-conv weight in PyTorch layout
/// `[Cin, Cout, kd, kh, kw]`: `(Cout·kd·kh·kw, Cin·kd·kh·kw)`.
///
/// This is what both Keras (`Conv3DTranspose` kernel `[k, k, k, Cout, Cin]`, fans read
/// from the last two axes) and PyTorch (`fan_in` from dimension 1) compute: the fans of
/// the forward conv whose adjoint the transposed conv is, i.e. `fan_in` counts the
/// layer's *output* channels.
pub fn fans_transposed(shape: [usize; 5]) -> (usize, usize) {
    let [cin, cout, kd, kh, kw] = shape;
    let rf = kd * kh * kw;
    (cout * rf, cin * rf)
}

/// `len` samples of Keras' `he_normal`: normal with `σ = sqrt(2/fan_in)/0.8796…`,
/// redrawn until `|x| <= 2σ` (see the module docs); sample std is `sqrt(2/fan_in)`.
pub fn he_normal_truncated(rng: &mut Rng, fan_in: usize, len: usize) -> Result<Vec<f32>> {
    if fan_in == 0 {
        return Err(Error::InvalidArgument(
            "he_normal_truncated: fan_in must be > 0".into(),
        ));
    }
    let sigma = (2.0 / fan_in as f64).sqrt() / TRUNCATED_NORMAL_STD;
    Ok((0..len)
        .map(|_| loop {
            let z = rng.normal();
            if z.abs() <= 2.0 {
                break (z * sigma) as f32;
            }
        })
        .collect())
}

/// `len` samples uniform on `[−l, l)` with `l = sqrt(6/(fan_in + fan_out))` (Glorot).
pub fn glorot_uniform(
    rng: &mut Rng,
    fan_in: usize,
    fan_out: usize,
    len: usize,
) -> Result<Vec<f32>> {
    let sum = fan_in.saturating_add(fan_out);
    if sum == 0 {
        return Err(Error::InvalidArgument(
            "glorot_uniform: fan_in + fan_out must be > 0".into(),
        ));
    }
    let limit = (6.0 / sum as f64).sqrt();
    Ok((0..len)
        .map(|_| (limit * (2.0 * rng.uniform() - 1.0)) as f32)
        .collect())
}

/// `len` zeros.
pub fn zeros(len: usize) -> Vec<f32> {
    vec![0.0; len]
}

/// `len` ones.
pub fn ones(len: usize) -> Vec<f32> {
    vec![1.0; len]
}

/// An initialiser, chosen per tensor by the model builder.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// All zeros (biases, batch-norm shift).
    Zeros,
    /// All ones (batch-norm scale).
    Ones,
    /// Keras `he_normal` (truncated), the conv default of 3D-MASNet.
    HeNormalTruncated,
    /// Keras `glorot_uniform`.
    GlorotUniform,
}

impl Init {
    /// Values for a conv weight `[Cout, Cin, kd, kh, kw]` (fans from [`fans`]); for
    /// other layouts use [`Init::fill_with_fans`].
    pub fn fill(&self, rng: &mut Rng, shape: [usize; 5]) -> Result<Vec<f32>> {
        self.fill_with_fans(rng, fans(shape), numel(shape)?)
    }

    /// Values for a transposed-conv weight `[Cin, Cout, kd, kh, kw]` (fans from
    /// [`fans_transposed`]).
    pub fn fill_transposed(&self, rng: &mut Rng, shape: [usize; 5]) -> Result<Vec<f32>> {
        self.fill_with_fans(rng, fans_transposed(shape), numel(shape)?)
    }

    /// `len` values with the given `(fan_in, fan_out)`.
    pub fn fill_with_fans(
        &self,
        rng: &mut Rng,
        (fan_in, fan_out): (usize, usize),
        len: usize,
    ) -> Result<Vec<f32>> {
        match self {
            Init::Zeros => Ok(zeros(len)),
            Init::Ones => Ok(ones(len)),
            Init::HeNormalTruncated => he_normal_truncated(rng, fan_in, len),
            Init::GlorotUniform => glorot_uniform(rng, fan_in, fan_out, len),
        }
    }
}

fn numel(shape: [usize; 5]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| Error::Shape(format!("init: shape {shape:?} has too many elements")))
}
