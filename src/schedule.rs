//! Learning-rate schedules (CPU only): constant, cosine annealing with warm restarts
//! (SGDR) and step decay, evaluated at a fractional epoch, parsed from and printed as
//! short strings for the CLI and (de)serialised with serde for config files.
//!
//! String forms (numbers in any f64 syntax; `Display` prints them back in this form):
//!
//! ```text
//! constant:1e-3
//! cosine:3e-4:1e-6:50          max, min, period in epochs (3D-MASNet's setting)
//! step:3e-4,1e-4,1e-5,1e-6:20  values, epochs per value (3D-UNet recipe)
//! ```

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A learning-rate schedule; build it with the variants, [`str::parse`] or serde, and
/// query it with [`LrSchedule::lr_at`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", try_from = "RawSchedule")]
pub enum LrSchedule {
    /// The same rate throughout.
    Constant(f64),
    /// SGDR (Loshchilov & Hutter, 2017) with a fixed period:
    /// `lr = min + (max − min)·(1 + cos(π·t/period))/2`, `t` the (fractional) epoch
    /// position inside the current period; restarts at `max` every `period_epochs`.
    CosineRestarts {
        /// Rate at the start of every period.
        max: f64,
        /// Rate approached at the end of every period.
        min: f64,
        /// Period length in epochs (>= 1).
        period_epochs: usize,
    },
    /// `values[k]` during epochs `[k·every, (k+1)·every)`, then the last value forever.
    Step {
        /// The successive rates (non-empty).
        values: Vec<f64>,
        /// Epochs per value (>= 1).
        every_epochs: usize,
    },
}

/// Mirror of [`LrSchedule`] that serde fills before validation.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum RawSchedule {
    Constant(f64),
    CosineRestarts {
        max: f64,
        min: f64,
        period_epochs: usize,
    },
    Step {
        values: Vec<f64>,
        every_epochs: usize,
    },
}

impl TryFrom<RawSchedule> for LrSchedule {
    type Error = Error;
    fn try_from(r: RawSchedule) -> Result<Self> {
        let s = match r {
            RawSchedule::Constant(lr) => LrSchedule::Constant(lr),
            RawSchedule::CosineRestarts {
                max,
                min,
                period_epochs,
            } => LrSchedule::CosineRestarts {
                max,
                min,
                period_epochs,
            },
            RawSchedule::Step {
                values,
                every_epochs,
            } => LrSchedule::Step {
                values,
                every_epochs,
            },
        };
        s.validate()?;
        Ok(s)
    }
}

fn bad(msg: String) -> Error {
    Error::InvalidArgument(format!("learning-rate schedule: {msg}"))
}

fn check_rate(what: &str, v: f64) -> Result<()> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(bad(format!("{what} = {v} must be a finite number > 0")))
    }
}

impl LrSchedule {
    /// Checks the ranges: rates finite and > 0 (`min` may be 0 but not above `max`),
    /// periods >= 1, step values non-empty.
    pub fn validate(&self) -> Result<()> {
        match self {
            LrSchedule::Constant(lr) => check_rate("lr", *lr),
            LrSchedule::CosineRestarts {
                max,
                min,
                period_epochs,
            } => {
                check_rate("cosine max", *max)?;
                if !(min.is_finite() && *min >= 0.0 && min <= max) {
                    return Err(bad(format!(
                        "cosine min = {min} must be finite, >= 0 and <= max ({max})"
                    )));
                }
                if *period_epochs == 0 {
                    return Err(bad("cosine period must be at least 1 epoch".into()));
                }
                Ok(())
            }
            LrSchedule::Step {
                values,
                every_epochs,
            } => {
                if values.is_empty() {
                    return Err(bad("step schedule needs at least one value".into()));
                }
                for (k, v) in values.iter().enumerate() {
                    check_rate(&format!("step value {k}"), *v)?;
                }
                if *every_epochs == 0 {
                    return Err(bad("step interval must be at least 1 epoch".into()));
                }
                Ok(())
            }
        }
    }

    /// The rate for step `step_in_epoch` of `epoch` (both 0-based) with
    /// `steps_per_epoch` steps per epoch: evaluated at the fractional epoch
    /// `epoch + step_in_epoch / steps_per_epoch` (0 steps per epoch counts as 1).
    ///
    /// Cosine is therefore annealed per step, as in SGDR (which updates `T_cur` every
    /// batch); call it with `step_in_epoch = 0` for a per-epoch schedule. Step decay
    /// changes only at epoch boundaries.
    pub fn lr_at(&self, epoch: usize, step_in_epoch: usize, steps_per_epoch: usize) -> f64 {
        let frac = step_in_epoch as f64 / steps_per_epoch.max(1) as f64;
        self.at_epoch(epoch as f64 + frac)
    }

    /// The rate at fractional epoch `e >= 0` (negative values count as 0).
    pub fn at_epoch(&self, e: f64) -> f64 {
        let e = if e.is_finite() { e.max(0.0) } else { 0.0 };
        match self {
            LrSchedule::Constant(lr) => *lr,
            LrSchedule::CosineRestarts {
                max,
                min,
                period_epochs,
            } => {
                let p = (*period_epochs).max(1) as f64;
                let t = e - p * (e / p).floor();
                min + (max - min) * (1.0 + (std::f64::consts::PI * t / p).cos()) / 2.0
            }
            LrSchedule::Step {
                values,
                every_epochs,
            } => {
                let k = (e.floor() as usize) / (*every_epochs).max(1);
                values
                    .get(k.min(values.len().saturating_sub(1)))
                    .copied()
                    .unwrap_or(0.0)
            }
        }
    }
}

fn parse_f64(what: &str, s: &str) -> Result<f64> {
    s.trim()
        .parse::<f64>()
        .map_err(|_| bad(format!("{what} '{s}' is not a number")))
}

fn parse_usize(what: &str, s: &str) -> Result<usize> {
    s.trim()
        .parse::<usize>()
        .map_err(|_| bad(format!("{what} '{s}' is not a whole number of epochs")))
}

impl FromStr for LrSchedule {
    type Err = Error;

    /// Parses `constant:LR`, `cosine:MAX:MIN:PERIOD` or `step:V1,V2,..:EVERY`.
    fn from_str(s: &str) -> Result<Self> {
        let parts: Vec<&str> = s.trim().split(':').collect();
        let kind = parts[0].trim().to_ascii_lowercase();
        let want = |n: usize, form: &str| -> Result<()> {
            if parts.len() == n {
                Ok(())
            } else {
                Err(bad(format!(
                    "'{s}' has {} field(s) after '{kind}', expected {form}",
                    parts.len() - 1
                )))
            }
        };
        let sched = match kind.as_str() {
            "constant" => {
                want(2, "constant:LR")?;
                LrSchedule::Constant(parse_f64("lr", parts[1])?)
            }
            "cosine" => {
                want(4, "cosine:MAX:MIN:PERIOD_EPOCHS")?;
                LrSchedule::CosineRestarts {
                    max: parse_f64("cosine max", parts[1])?,
                    min: parse_f64("cosine min", parts[2])?,
                    period_epochs: parse_usize("cosine period", parts[3])?,
                }
            }
            "step" => {
                want(3, "step:V1,V2,...:EVERY_EPOCHS")?;
                let values = parts[1]
                    .split(',')
                    .enumerate()
                    .map(|(k, v)| parse_f64(&format!("step value {k}"), v))
                    .collect::<Result<Vec<f64>>>()?;
                LrSchedule::Step {
                    values,
                    every_epochs: parse_usize("step interval", parts[2])?,
                }
            }
            _ => {
                return Err(bad(format!(
                    "unknown kind '{}' in '{s}' (expected constant, cosine or step)",
                    parts[0]
                )))
            }
        };
        sched.validate()?;
        Ok(sched)
    }
}

impl fmt::Display for LrSchedule {
    /// The string form [`FromStr`] reads (shortest exact exponent form of each number,
    /// so parsing the output gives back the same schedule).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LrSchedule::Constant(lr) => write!(f, "constant:{lr:e}"),
            LrSchedule::CosineRestarts {
                max,
                min,
                period_epochs,
            } => write!(f, "cosine:{max:e}:{min:e}:{period_epochs}"),
            LrSchedule::Step {
                values,
                every_epochs,
            } => {
                write!(f, "step:")?;
                for (k, v) in values.iter().enumerate() {
                    if k > 0 {
                        write!(f, ",")?;
                    }
                    write!(f, "{v:e}")?;
                }
                write!(f, ":{every_epochs}")
            }
        }
    }
}
