//! The profiler: a valid Chrome trace with a span per attention call, and a top-ops table.

use attn_op::profile::Profiler;
use attn_op::{scaled_dot_product_attention, sdpa_kernel, Backend, SdpaOptions};
use candle_core::{Device, Result, Var};

#[test]
fn trace_is_valid_json_with_attention_spans() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("attn-op-profile-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("trace.json");
    let profiler = Profiler::start(Some(&path))?;
    let q = Var::randn(0f32, 1., (2, 2, 16, 8), &Device::Cpu)?;
    for _ in 0..3 {
        let y = scaled_dot_product_attention(
            &q,
            &q,
            &q,
            &SdpaOptions {
                is_causal: true,
                ..Default::default()
            },
        )?;
        y.sum_all()?.backward()?;
    }
    {
        let _math = sdpa_kernel(&[Backend::Math]);
        scaled_dot_product_attention(&q, &q, &q, &SdpaOptions::default())?;
    }
    let report = profiler.finish();

    let text = std::fs::read_to_string(&path)?;
    let json: serde_json::Value = serde_json::from_str(&text).expect("the trace is valid JSON");
    let events = json.as_array().expect("a JSON array of trace events");
    let names: Vec<&str> = events.iter().filter_map(|e| e["name"].as_str()).collect();
    for want in [
        "sdpa.flash",
        "flash_attention.forward",
        "flash_attention.backward",
        "sdpa.math",
    ] {
        assert!(names.contains(&want), "no {want} span in {names:?}");
    }
    let flash = report.ops["sdpa.flash"];
    assert_eq!(flash.calls, 3);
    assert_eq!(report.ops["flash_attention.backward"].calls, 3);
    assert_eq!(report.ops["sdpa.math"].calls, 1);
    // The op's forward runs inside the sdpa span: its time is the parent's total, not self.
    let fwd = report.ops["flash_attention.forward"];
    assert!(flash.self_time <= flash.total && fwd.total <= flash.total);
    assert!(flash.self_time + fwd.total <= flash.total + std::time::Duration::from_micros(50));
    let table = report.to_string();
    assert!(
        table.starts_with("Name") && table.contains("sdpa.flash") && table.contains("wall time"),
        "{table}"
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn unwritable_trace_path_is_an_error() {
    let e = Profiler::start(Some(std::path::Path::new("/nonexistent-dir/trace.json")))
        .err()
        .unwrap();
    assert!(
        e.to_string()
            .contains("profile: cannot write /nonexistent-dir/trace.json"),
        "{e}"
    );
}
