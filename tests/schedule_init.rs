//! Learning-rate schedules (values at known epochs, string and serde round trips, bad
//! strings) and weight initialisers (sample statistics with tolerances from the sample
//! size, truncation bound, fans, seeding).

use masnet_wgpu::init::{
    fans, fans_transposed, glorot_uniform, he_normal_truncated, ones, zeros, Init,
    TRUNCATED_NORMAL_STD,
};
use masnet_wgpu::rng::Rng;
use masnet_wgpu::schedule::LrSchedule;

/// f64 evaluation of closed forms: only rounding of a few operations.
const LR_TOL: f64 = 1e-15;

fn close(a: f64, b: f64, what: &str) {
    assert!(
        (a - b).abs() <= LR_TOL * b.abs().max(1e-12),
        "{what}: {a} vs {b}"
    );
}

fn paper_cosine() -> LrSchedule {
    LrSchedule::CosineRestarts {
        max: 3e-4,
        min: 1e-6,
        period_epochs: 50,
    }
}

#[test]
fn cosine_restarts_values() {
    let s = paper_cosine();
    let (max, min) = (3e-4, 1e-6);
    close(s.lr_at(0, 0, 100), max, "start");
    close(s.lr_at(25, 0, 100), (max + min) / 2.0, "half period");
    close(s.lr_at(50, 0, 100), max, "restart");
    close(
        s.lr_at(75, 0, 100),
        (max + min) / 2.0,
        "half of second period",
    );
    close(s.lr_at(100, 0, 7), max, "second restart");
    // Quarter period: (1 + cos(π/4))/2.
    let q = min + (max - min) * (1.0 + std::f64::consts::FRAC_1_SQRT_2) / 2.0;
    close(
        s.lr_at(12, 50, 100),
        q,
        "quarter period at a fractional epoch",
    );
    close(s.at_epoch(12.5), q, "at_epoch");
    // Per step: strictly decreasing within a period, just above min at its end.
    let mut prev = f64::INFINITY;
    for e in 0..50 {
        for st in 0..4 {
            let lr = s.lr_at(e, st, 4);
            assert!(lr < prev && lr >= min, "epoch {e} step {st}: {lr}");
            prev = lr;
        }
    }
    let last = s.lr_at(49, 3, 4);
    assert!(last - min < 1e-3 * (max - min), "end of period {last}");
    // Zero steps per epoch counts as one.
    close(s.lr_at(25, 0, 0), (max + min) / 2.0, "steps_per_epoch = 0");
}

#[test]
fn step_and_constant_values() {
    let s: LrSchedule = "step:3e-4,1e-4,1e-5,1e-6:20".parse().unwrap();
    for (e, want) in [
        (0, 3e-4),
        (19, 3e-4),
        (20, 1e-4),
        (39, 1e-4),
        (40, 1e-5),
        (59, 1e-5),
        (60, 1e-6),
        (79, 1e-6),
        (80, 1e-6),
        (1000, 1e-6),
    ] {
        assert_eq!(s.lr_at(e, 0, 10), want, "epoch {e}");
    }
    // Changes only at epoch boundaries.
    assert_eq!(s.lr_at(19, 9, 10), 3e-4);
    let c = LrSchedule::Constant(1e-3);
    assert_eq!(c.lr_at(0, 0, 1), 1e-3);
    assert_eq!(c.lr_at(12345, 3, 4), 1e-3);
}

#[test]
fn parse_display_round_trip() {
    let cases = [
        ("constant:1e-3", LrSchedule::Constant(1e-3)),
        ("cosine:3e-4:1e-6:50", paper_cosine()),
        (
            "step:3e-4,1e-4,1e-5,1e-6:20",
            LrSchedule::Step {
                values: vec![3e-4, 1e-4, 1e-5, 1e-6],
                every_epochs: 20,
            },
        ),
        (" Cosine:0.0003:0:10 ", {
            LrSchedule::CosineRestarts {
                max: 3e-4,
                min: 0.0,
                period_epochs: 10,
            }
        }),
        (
            "constant:0.1234567890123",
            LrSchedule::Constant(0.1234567890123),
        ),
    ];
    for (text, want) in cases {
        let s: LrSchedule = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(s, want, "{text}");
        let shown = s.to_string();
        let back: LrSchedule = shown.parse().unwrap();
        assert_eq!(back, s, "{text} -> {shown}");
        // serde (JSON) round trip.
        let json = serde_json::to_string(&s).unwrap();
        let from_json: LrSchedule = serde_json::from_str(&json).unwrap();
        assert_eq!(from_json, s, "{json}");
    }
    assert_eq!(paper_cosine().to_string(), "cosine:3e-4:1e-6:50");
    assert_eq!(
        "step:3e-4,1e-4,1e-5,1e-6:20"
            .parse::<LrSchedule>()
            .unwrap()
            .to_string(),
        "step:3e-4,1e-4,1e-5,1e-6:20"
    );
}

#[test]
fn bad_schedules_are_rejected() {
    // (input, text the message must contain)
    let cases = [
        ("", "unknown kind"),
        ("linear:1e-3", "linear"),
        ("constant", "expected constant:LR"),
        ("constant:abc", "'abc'"),
        ("constant:0", "lr"),
        ("constant:-1e-3", "lr"),
        ("constant:inf", "lr"),
        ("constant:1e-3:5", "field"),
        ("cosine:3e-4:1e-6", "cosine:MAX:MIN:PERIOD_EPOCHS"),
        ("cosine:3e-4:1e-6:0", "period"),
        ("cosine:3e-4:1e-6:2.5", "'2.5'"),
        ("cosine:1e-6:3e-4:50", "min"),
        ("cosine:x:1e-6:50", "cosine max 'x'"),
        ("cosine:3e-4:-1:50", "min"),
        ("step:3e-4,,1e-5:20", "step value 1"),
        ("step:3e-4,1e-4:0", "interval"),
        ("step:3e-4,-1e-4:20", "step value 1"),
        ("step::20", "step value 0"),
        ("step:3e-4", "expected step"),
    ];
    for (text, needle) in cases {
        match text.parse::<LrSchedule>() {
            Ok(s) => panic!("'{text}' parsed as {s:?}"),
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains(needle), "'{text}': {msg}");
            }
        }
    }
    // Deserialisation validates too.
    let bad = r#"{"cosine_restarts":{"max":1e-3,"min":0.0,"period_epochs":0}}"#;
    let e = serde_json::from_str::<LrSchedule>(bad).unwrap_err();
    assert!(e.to_string().contains("period"), "{e}");
    assert!(
        serde_json::from_str::<LrSchedule>(r#"{"step":{"values":[],"every_epochs":3}}"#).is_err()
    );
}

/// Mean and (population) standard deviation in f64.
fn stats(x: &[f32]) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = x
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n;
    (mean, var.sqrt())
}

/// Samples per statistics test; 5 standard errors below bound every check, so a
/// correct sampler fails with probability < 1e-6 per check (and the seed is fixed).
const N: usize = 200_000;
const Z: f64 = 5.0;

#[test]
fn he_normal_truncated_statistics() {
    let (fan_in, _) = fans([16, 16, 3, 3, 3]);
    assert_eq!(fan_in, 432);
    let target = (2.0 / fan_in as f64).sqrt();
    let x = he_normal_truncated(&mut Rng::new(1), fan_in, N).unwrap();
    assert_eq!(x.len(), N);
    let (mean, std) = stats(&x);
    // SE(mean) = std/sqrt(N); SE(std) <= std/sqrt(2N) (a truncated normal has lighter
    // tails than a normal, so its sample std varies less).
    assert!(mean.abs() < Z * target / (N as f64).sqrt(), "mean {mean}");
    assert!(
        (std - target).abs() < Z * target / (2.0 * N as f64).sqrt(),
        "std {std} vs sqrt(2/fan_in) = {target} (without the truncation correction it \
         would be {})",
        target * TRUNCATED_NORMAL_STD
    );
    // Cut at 2σ of the corrected normal, and the tail is populated up to it
    // (P(1.9σ < |z| < 2σ) ≈ 1.2%, so thousands of samples lie there).
    let sigma = target / TRUNCATED_NORMAL_STD;
    let max = x.iter().fold(0f64, |a, &v| a.max(f64::from(v).abs()));
    assert!(
        max <= (2.0 * sigma) as f32 as f64,
        "max {max} > 2σ = {}",
        2.0 * sigma
    );
    assert!(max > 1.99 * sigma, "max {max} well inside 2σ");
}

#[test]
fn truncated_normal_constant_is_the_truncated_std() {
    // Var of N(0,1) truncated to [-2, 2] = 1 - 2·2·φ(2)/(Φ(2) - Φ(-2)); Φ(2) - Φ(-2) =
    // erf(√2) = 0.954499736103642 (tabulated).
    let phi2 = (-2.0f64).exp() / (2.0 * std::f64::consts::PI).sqrt();
    let var = 1.0 - 4.0 * phi2 / 0.954_499_736_103_642;
    assert!((var.sqrt() - TRUNCATED_NORMAL_STD).abs() < 1e-12);
}

#[test]
fn glorot_uniform_statistics() {
    let (fi, fo) = (27 * 8, 27 * 24);
    let limit = (6.0 / (fi + fo) as f64).sqrt();
    let x = glorot_uniform(&mut Rng::new(2), fi, fo, N).unwrap();
    let (mean, std) = stats(&x);
    let target = limit / 3f64.sqrt();
    // SE(mean) = std/sqrt(N); for a uniform, SE(std)/std ≈ 0.447/sqrt(N).
    assert!(mean.abs() < Z * target / (N as f64).sqrt(), "mean {mean}");
    assert!(
        (std - target).abs() < Z * 0.45 * target / (N as f64).sqrt(),
        "std {std} vs {target}"
    );
    let lim = limit as f32;
    assert!(
        x.iter().all(|&v| (-lim..=lim).contains(&v)),
        "outside ±{limit}"
    );
    let max = x.iter().fold(f32::MIN, |a, &v| a.max(v));
    let min = x.iter().fold(f32::MAX, |a, &v| a.min(v));
    assert!(
        max > 0.999 * lim && min < -0.999 * lim,
        "range [{min}, {max}]"
    );
}

#[test]
fn seeds_and_fans() {
    let a = he_normal_truncated(&mut Rng::new(5), 10, 100).unwrap();
    let b = he_normal_truncated(&mut Rng::new(5), 10, 100).unwrap();
    let c = he_normal_truncated(&mut Rng::new(6), 10, 100).unwrap();
    assert_eq!(a, b, "same seed, same values");
    assert_ne!(a, c, "different seed, different values");
    let a = glorot_uniform(&mut Rng::new(5), 10, 20, 100).unwrap();
    let b = glorot_uniform(&mut Rng::new(5), 10, 20, 100).unwrap();
    let c = glorot_uniform(&mut Rng::new(6), 10, 20, 100).unwrap();
    assert_eq!(a, b);
    assert_ne!(a, c);

    assert_eq!(fans([32, 16, 3, 3, 3]), (16 * 27, 32 * 27));
    assert_eq!(fans([8, 4, 1, 1, 1]), (4, 8));
    // PyTorch transposed layout [Cin, Cout, k..]: Keras/PyTorch fan_in = Cout·k³.
    assert_eq!(fans_transposed([32, 16, 2, 2, 2]), (16 * 8, 32 * 8));

    assert_eq!(zeros(3), vec![0.0; 3]);
    assert_eq!(ones(2), vec![1.0; 2]);
    let shape = [4, 3, 3, 3, 3];
    assert_eq!(
        Init::Zeros.fill(&mut Rng::new(0), shape).unwrap(),
        zeros(324)
    );
    assert_eq!(Init::Ones.fill(&mut Rng::new(0), shape).unwrap(), ones(324));
    let he = Init::HeNormalTruncated
        .fill(&mut Rng::new(9), shape)
        .unwrap();
    assert_eq!(he, he_normal_truncated(&mut Rng::new(9), 81, 324).unwrap());
    let gl = Init::GlorotUniform
        .fill_transposed(&mut Rng::new(9), shape)
        .unwrap();
    assert_eq!(gl, glorot_uniform(&mut Rng::new(9), 81, 108, 324).unwrap());

    assert!(he_normal_truncated(&mut Rng::new(0), 0, 4).is_err());
    assert!(glorot_uniform(&mut Rng::new(0), 0, 0, 4).is_err());
    assert!(Init::HeNormalTruncated
        .fill(&mut Rng::new(0), [4, 0, 3, 3, 3])
        .is_err());
}
