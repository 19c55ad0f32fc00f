//! The check's one table: `gpu-check.md` from the sections' JSON.

use std::process::Command;

use serde_json::{json, Value};

pub(crate) fn date() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

pub(crate) fn f(v: &Value, digits: usize) -> String {
    v.as_f64()
        .map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "-".into())
}

pub(crate) fn mib(v: &Value) -> String {
    match (v["peak_gpu_mib"].as_u64(), v["baseline_gpu_mib"].as_u64()) {
        (Some(p), Some(b)) => format!(
            "{:.2} GiB ({:.2} GiB above idle)",
            p as f64 / 1024.0,
            p.saturating_sub(b) as f64 / 1024.0
        ),
        _ => "-".into(),
    }
}

/// The report as markdown: parity checks, engine table, training table.
pub(crate) fn markdown(r: &Value) -> String {
    let s = &r["sections"];
    let mut m = format!(
        "# gpu_check, {}\n\nBackend {}; GPU: {}. Compared with {} GB/s memory bandwidth and {} / {} TFLOP/s peak f32 / bf16.\n\n",
        r["date"].as_str().unwrap_or(""),
        r["backend"].as_str().unwrap_or(""),
        r["gpu"].as_str().unwrap_or(""),
        r["limits"]["bandwidth_gbs"],
        r["limits"]["peak_tflops_f32"],
        r["limits"]["peak_tflops_bf16"],
    );
    for (name, v) in s.as_object().into_iter().flatten() {
        if let Some(e) = v["error"].as_str().or(v["skipped"].as_str()) {
            m += &format!("- `{name}`: {e}\n");
        }
    }
    if let Some(checks) = s["parity"]["checks"].as_array() {
        m += "\n## Parity (f32, tiny HF fixtures)\n\n| check | value | tolerance | |\n| --- | --- | --- | --- |\n";
        for c in checks {
            m += &format!(
                "| {} | {:.2e} | {:.0e} | {} |\n",
                c["name"].as_str().unwrap_or(""),
                c["value"].as_f64().unwrap_or(f64::NAN),
                c["tolerance"].as_f64().unwrap_or(f64::NAN),
                if c["pass"] == json!(true) {
                    "pass"
                } else {
                    "**FAIL**"
                }
            );
        }
    }
    let mut engine_header = false;
    for key in ["engine-f32", "engine-bf16"] {
        let e = &s[key];
        let Some(points) = e["points"].as_array() else {
            continue;
        };
        if !engine_header {
            m += &format!(
                "\n## Sparse engine, random LLaMA-1B shape ({} layers, hidden {}, {:.2}B parameters), 25% target skip\n\nPrefill {} tokens per sequence; decode {} steps; medians of {} runs.\n\n| dtype | batch | attn/mlp skip | prefill tok/s dense | routed | speedup (ideal) | dense TFLOP/s (% of peak) | decode tok/s dense | routed | speedup (ideal FLOPs / weight bytes) | dense weight GB/s (% of bandwidth) | peak GPU memory |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
                e["layers"], e["hidden"], e["params"].as_f64().unwrap_or(0.0) / 1e9, e["prefill_tokens"], e["decode_steps"], e["repeats"]
            );
            engine_header = true;
        }
        for p in points {
            let ratio = |a: &str, b: &str| {
                p[a].as_f64().unwrap_or(f64::NAN) / p[b].as_f64().unwrap_or(f64::NAN)
            };
            m += &format!(
                "| {} | {} | {}/{} | {} | {} | {:.2}x ({}x) | {} ({:.1}%) | {} | {} | {:.2}x ({}x / {}x) | {} ({:.1}%) | {} |\n",
                e["dtype"].as_str().unwrap_or(""),
                p["batch"],
                f(&p["attn_skip"], 2),
                f(&p["mlp_skip"], 2),
                f(&p["prefill_dense"], 0),
                f(&p["prefill_routed"], 0),
                ratio("prefill_routed", "prefill_dense"),
                f(&p["prefill_ideal"], 2),
                f(&p["prefill_dense_tflops"], 2),
                100.0 * p["prefill_dense_peak_fraction"].as_f64().unwrap_or(f64::NAN),
                f(&p["decode_dense"], 1),
                f(&p["decode_routed"], 1),
                ratio("decode_routed", "decode_dense"),
                f(&p["decode_ideal"], 2),
                f(&p["decode_weight_ideal"], 2),
                f(&p["decode_dense_weight_gbs"], 0),
                100.0 * p["decode_dense_bandwidth_fraction"].as_f64().unwrap_or(f64::NAN),
                mib(e),
            );
        }
    }
    let mut train_header = false;
    for key in ["train", "train-ckpt"] {
        let t = &s[key];
        if t["tokens_per_s"].is_null() {
            continue;
        }
        if !train_header {
            m += "\n## Router tuning (stage 1, f32, frozen base), same model\n\n| checkpoint layers | batch x seq | tokens/s | s/step | ~TFLOP/s | peak GPU memory |\n| --- | --- | --- | --- | --- | --- |\n";
            train_header = true;
        }
        m += &format!(
            "| {} | {}x{} | {} | {} | {} | {} |\n",
            t["checkpoint_layers"],
            t["batch"],
            t["seq"],
            f(&t["tokens_per_s"], 0),
            f(&t["median_step_s"], 3),
            f(&t["approx_tflops"], 1),
            mib(t)
        );
    }
    m
}
