//! Every shader, specialised as the engine uses it, must validate with naga and
//! translate to SPIR-V (Vulkan), MSL (Metal) and HLSL (DX12); and every file in
//! `shaders/` must be covered, so a new shader cannot skip this check.

use naga::back::{hlsl, msl, spv};
use naga::valid::{Capabilities, ValidationFlags, Validator};

fn translate(name: &str, src: &str) {
    let module = naga::front::wgsl::parse_str(src)
        .unwrap_or_else(|e| panic!("{name}: WGSL parse error:\n{}", e.emit_to_string(src)));
    let info = Validator::new(ValidationFlags::all(), Capabilities::all())
        .validate(&module)
        .unwrap_or_else(|e| panic!("{name}: validation error: {e:?}"));
    let (module, info) = naga::back::pipeline_constants::process_overrides(
        &module,
        &info,
        None,
        &Default::default(),
    )
    .unwrap_or_else(|e| panic!("{name}: overrides: {e:?}"));
    for ep in &module.entry_points {
        let spv_opts = spv::Options::default();
        spv::write_vec(
            &module,
            &info,
            &spv_opts,
            Some(&spv::PipelineOptions {
                shader_stage: ep.stage,
                entry_point: ep.name.clone(),
            }),
        )
        .unwrap_or_else(|e| panic!("{name}/{}: SPIR-V: {e:?}", ep.name));

        let msl_opts = msl::Options {
            lang_version: (2, 4),
            ..Default::default()
        };
        let msl_pipe = msl::PipelineOptions {
            entry_point: Some((ep.stage, ep.name.clone())),
            ..Default::default()
        };
        let (msl_src, _) = msl::write_string(&module, &info, &msl_opts, &msl_pipe)
            .unwrap_or_else(|e| panic!("{name}/{}: MSL: {e:?}", ep.name));
        assert!(msl_src.contains("kernel"), "{name}: MSL has no kernel");

        let hlsl_opts = hlsl::Options {
            shader_model: hlsl::ShaderModel::V6_0,
            ..Default::default()
        };
        let hlsl_pipe = hlsl::PipelineOptions {
            entry_point: Some((ep.stage, ep.name.clone())),
        };
        let mut out = String::new();
        hlsl::Writer::new(&mut out, &hlsl_opts, &hlsl_pipe)
            .write(&module, &info, None)
            .unwrap_or_else(|e| panic!("{name}/{}: HLSL: {e:?}", ep.name));
        assert!(
            out.contains("numthreads"),
            "{name}: HLSL has no compute entry"
        );
    }
}

#[test]
fn every_shader_translates_to_spirv_msl_hlsl() {
    let variants = masnet_wgpu::ops::shader_variants();
    assert!(!variants.is_empty());
    for (name, src) in &variants {
        translate(name, src);
    }
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/shaders");
    for entry in std::fs::read_dir(dir).unwrap() {
        let file = entry.unwrap().file_name().into_string().unwrap();
        let stem = file.trim_end_matches(".wgsl");
        assert!(
            variants
                .iter()
                .any(|(n, _)| n == stem || n.starts_with(&format!("{stem} "))),
            "shaders/{file} is not covered by ops::shader_variants()"
        );
    }
}
