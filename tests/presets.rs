//! The paper's Table 1 training recipes as presets.

use masnet_wgpu::schedule::LrSchedule;
use masnet_wgpu::train::{preset, TrainOptions};

#[test]
fn presets_follow_table_1() {
    let d = preset("dunet").unwrap();
    assert_eq!(
        (d.batch, d.patch, d.epochs, d.steps_per_epoch),
        (16, 32, 500, 62)
    );
    assert_eq!(
        d.schedule,
        LrSchedule::CosineRestarts {
            max: 3e-4,
            min: 1e-6,
            period_epochs: 50
        }
    );
    for name in ["unet3d", "ccfcn"] {
        let u = preset(name).unwrap();
        assert_eq!(
            (u.batch, u.patch, u.epochs, u.batch * u.steps_per_epoch),
            (10, 32, 80, 5000)
        );
        assert_eq!(u.schedule.lr_at(0, 0, 1), 3e-4);
        assert_eq!(u.schedule.lr_at(20, 0, 1), 1e-4);
        assert_eq!(u.schedule.lr_at(79, 0, 1), 1e-6);
    }
    let b = preset("buinet").unwrap();
    assert_eq!(
        (b.batch, b.patch, b.epochs * b.steps_per_epoch),
        (4, 64, 20_000)
    );
    assert!((b.schedule.lr_at(1, 0, 1) - 2e-5).abs() < 1e-12);
    let n = preset("nlunet").unwrap();
    assert_eq!(
        (n.batch, n.patch, n.epochs, n.batch * n.steps_per_epoch),
        (5, 32, 80, 5000)
    );
    assert_eq!(n.schedule, LrSchedule::Constant(1e-3));
    assert!(preset("resnet").unwrap_err().to_string().contains("resnet"));
}

#[test]
fn presets_survive_the_toml_overlay_the_cli_uses() {
    for name in ["dunet", "unet3d", "ccfcn", "buinet", "nlunet"] {
        let p = preset(name).unwrap();
        let v = toml::Value::try_from(&p).unwrap();
        let back: TrainOptions = v.try_into().unwrap();
        assert_eq!(back, p, "{name}");
    }
}
