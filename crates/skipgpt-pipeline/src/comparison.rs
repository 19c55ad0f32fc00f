//! The demo's comparison as data: what `skipgpt demo` writes as `summary-tNN.json` and
//! `cargo xtask experiment` reads back to write `docs/results.md`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use skipgpt_eval::RoutingAnalysis;

/// One model of the comparison, scored the same way as every other.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComparisonRow {
    pub name: String,
    pub dir: PathBuf,
    pub perplexity: f64,
    /// Mean accuracy over the multiple-choice tasks, with the model's routing.
    pub mc_acc: f64,
    pub mc_acc_per_task: Vec<(String, f64)>,
    pub attn_skip: f64,
    pub mlp_skip: f64,
    pub param_skip: f64,
    /// Sparse-engine prefill time dense / routed, measured; and dense / routed FLOPs.
    pub speedup: f64,
    pub ideal_speedup: f64,
}

/// Every model of one demo run at one target, with the run's settings and the routing
/// analysis of SkipGPT-RT.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    pub target_sparsity: f64,
    pub model_params: usize,
    pub layers: usize,
    pub hidden_size: usize,
    pub pretrain_steps: usize,
    pub tune_steps: usize,
    pub lora_steps: usize,
    pub heldout_tokens: usize,
    pub rows: Vec<ComparisonRow>,
    pub analysis: RoutingAnalysis,
}

impl Comparison {
    /// `summary-t25.json` for a target of 0.25: where a run in `out` keeps it.
    pub fn path(out: &Path, target_sparsity: f64) -> PathBuf {
        let t = (100.0 * target_sparsity).round() as u32;
        out.join(format!("summary-t{t}.json"))
    }

    /// The first row whose name starts with `name` ("SkipGPT-RT" finds "SkipGPT-RT (ours)").
    pub fn row(&self, name: &str) -> Option<&ComparisonRow> {
        self.rows.iter().find(|r| r.name.starts_with(name))
    }

    /// Writes it (pretty JSON, atomically) to `path`.
    pub fn write(&self, path: &Path) -> crate::Result<()> {
        let text = serde_json::to_string_pretty(self).expect("plain data serializes");
        skipgpt_model::io::atomic_write::atomic_write(path, text.as_bytes())?;
        Ok(())
    }

    /// Reads a comparison a demo wrote.
    pub fn read(path: &Path) -> crate::Result<Comparison> {
        let text = std::fs::read_to_string(path).map_err(crate::error::io(path))?;
        serde_json::from_str(&text).map_err(|source| crate::PipelineError::Json {
            path: path.to_path_buf(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn comparison() -> Comparison {
        let row = |name: &str, perplexity: f64| {
            serde_json::json!({
                "name": name, "dir": "/x", "perplexity": perplexity, "mc_acc": 1.0,
                "mc_acc_per_task": [["count-next", 1.0]], "attn_skip": 0.2, "mlp_skip": 0.3,
                "param_skip": 0.25, "speedup": 1.1, "ideal_speedup": 1.3
            })
        };
        serde_json::from_value(serde_json::json!({
            "target_sparsity": 0.25, "model_params": 1000, "layers": 4, "hidden_size": 128,
            "pretrain_steps": 400, "tune_steps": 200, "lora_steps": 200, "heldout_tokens": 64,
            "rows": [row("dense", 1.745), row("SkipGPT-RT", 1.76), row("SkipGPT-RT + LoRA", 1.748)],
            "analysis": {
                "tokens": 64, "attn_skip": 0.2, "mlp_skip": 0.3,
                "attn_skip_per_layer": [0.0, 0.4], "mlp_skip_per_layer": [0.1, 0.5],
                "attn_skip_by_position": [0.2], "mlp_skip_by_position": [0.3],
                "by_frequency": [], "most_compute": [], "least_compute": [],
                "observations": {
                    "attention_skipped_more_than_mlp": false,
                    "attn_executed_early_late": [0.81, 0.8],
                    "mlp_executed_early_late": [0.73, 0.74],
                    "later_positions_use_more_attention": false,
                    "later_positions_use_less_mlp": false
                }
            }
        }))
        .unwrap()
    }

    #[test]
    fn a_written_comparison_reads_back_equal_and_finds_rows_by_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let c = comparison();
        let path = Comparison::path(dir.path(), 0.25);
        assert_eq!(path.file_name().unwrap(), "summary-t25.json");
        c.write(&path).unwrap();
        let back = Comparison::read(&path).unwrap();
        assert_eq!(back, c);
        // "SkipGPT-RT" is the first row starting so, not the LoRA one
        assert_eq!(back.row("SkipGPT-RT").unwrap().perplexity, 1.76);
        assert_eq!(back.row("SkipGPT-RT + LoRA").unwrap().perplexity, 1.748);
        assert!(back.row("ShortGPT").is_none());
    }

    #[test]
    fn a_file_that_is_not_a_comparison_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("summary-t40.json");
        std::fs::write(&path, r#"{"rows": []}"#).unwrap();
        let e = Comparison::read(&path).unwrap_err().to_string();
        assert!(
            e.contains("summary-t40.json") && e.contains("missing field"),
            "{e}"
        );
        let e = Comparison::read(&dir.path().join("none.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("none.json"), "{e}");
    }
}
