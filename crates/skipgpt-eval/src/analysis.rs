//! Where the routers spend compute: skip rates per layer, by token position and by token
//! frequency, and a per-token map for one text, written as JSON and drawn as SVG pictures.
//!
//! It makes the paper's observations checkable on any model: is attention skipped more than
//! the MLP? Do later positions use more attention and less MLP?

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use skipgpt_data::PackedDataset;
use skipgpt_model::{LlamaForCausalLM, Tokenizer};

use crate::charts::{self, RGBColor, Series};
use crate::error::{EvalError, Result};
use crate::{batch_ids, host_f64};

/// Compute spent on the tokens of one frequency class.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FrequencyClass {
    /// E.g. "most frequent 20% of ids".
    pub label: String,
    /// Occurrences of these ids in the data.
    pub occurrences: usize,
    /// Fraction of their (token, module) executions that ran.
    pub executed: f64,
}

/// One token id's average compute.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenCompute {
    pub id: u32,
    pub text: String,
    pub count: usize,
    /// Fraction of (layer, module) executions that ran at its positions.
    pub executed: f64,
}

/// The paper's observations, as measured here.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Observations {
    pub attention_skipped_more_than_mlp: bool,
    /// Attention / MLP execution rate over the first and the second half of the positions.
    pub attn_executed_early_late: (f64, f64),
    pub mlp_executed_early_late: (f64, f64),
    pub later_positions_use_more_attention: bool,
    pub later_positions_use_less_mlp: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RoutingAnalysis {
    pub tokens: usize,
    pub attn_skip: f64,
    pub mlp_skip: f64,
    pub attn_skip_per_layer: Vec<f64>,
    pub mlp_skip_per_layer: Vec<f64>,
    /// Per position in the sequence, averaged over sequences and layers.
    pub attn_skip_by_position: Vec<f64>,
    pub mlp_skip_by_position: Vec<f64>,
    /// Token ids in five classes by frequency rank, most frequent first.
    pub by_frequency: Vec<FrequencyClass>,
    /// Token ids seen at least 20 times: the 10 given the most compute, then the 10 given
    /// the least.
    pub most_compute: Vec<TokenCompute>,
    pub least_compute: Vec<TokenCompute>,
    pub observations: Observations,
}

/// Runs the model with its routing over `data` and aggregates the gates.
pub fn analyze_routing<B: Backend>(
    model: &LlamaForCausalLM<B>,
    data: &PackedDataset,
    tokenizer: Option<&Tokenizer>,
    batch_size: usize,
) -> Result<RoutingAnalysis> {
    if model.routing_config.is_none() {
        return Err(EvalError::Input(
            "the model has no routers to analyse (no routers.safetensors)".into(),
        ));
    }
    if data.is_empty() {
        return Err(EvalError::Input("no sequences to analyse".into()));
    }
    let device = model.device();
    let layers = model.config.num_hidden_layers;
    let t = data.seq_len;
    let mut attn_layer = vec![0.0f64; layers];
    let mut mlp_layer = vec![0.0f64; layers];
    let mut attn_pos = vec![0.0f64; t];
    let mut mlp_pos = vec![0.0f64; t];
    // per token id: (count, executed modules)
    let mut per_id: HashMap<u32, (usize, f64)> = HashMap::new();
    let mut tokens = 0;
    for chunk in data.sequences.chunks(batch_size.max(1)) {
        let b = chunk.len();
        let ids = batch_ids::<B>(chunk, t, &device);
        let out = model.forward_routed(ids, model.routing, false);
        let (attn, mlp) = (host_gates(out.attn_gates), host_gates(out.mlp_gates));
        for s in 0..b {
            for p in 0..t {
                let mut executed = 0.0;
                for l in 0..layers {
                    let (a, m) = (attn[l][s * t + p], mlp[l][s * t + p]);
                    attn_layer[l] += 1.0 - a;
                    mlp_layer[l] += 1.0 - m;
                    attn_pos[p] += 1.0 - a;
                    mlp_pos[p] += 1.0 - m;
                    executed += a + m;
                }
                let e = per_id.entry(chunk[s][p]).or_insert((0, 0.0));
                e.0 += 1;
                e.1 += executed;
            }
        }
        tokens += b * t;
    }
    let n_seq = data.len() as f64;
    let norm = |v: Vec<f64>, by: f64| v.into_iter().map(|x| x / by).collect::<Vec<_>>();
    let attn_skip_per_layer = norm(attn_layer, tokens as f64);
    let mlp_skip_per_layer = norm(mlp_layer, tokens as f64);
    let attn_skip_by_position = norm(attn_pos, n_seq * layers as f64);
    let mlp_skip_by_position = norm(mlp_pos, n_seq * layers as f64);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (attn_skip, mlp_skip) = (mean(&attn_skip_per_layer), mean(&mlp_skip_per_layer));

    // frequency classes: ids sorted by count, cut into five groups of equal size
    let mut ids: Vec<(u32, usize, f64)> = per_id.iter().map(|(&i, &(c, e))| (i, c, e)).collect();
    ids.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let per_module = 2.0 * layers as f64;
    let by_frequency = (0..5)
        .filter_map(|k| {
            let group = &ids[ids.len() * k / 5..ids.len() * (k + 1) / 5];
            let occurrences: usize = group.iter().map(|g| g.1).sum();
            (occurrences > 0).then(|| FrequencyClass {
                label: format!("ids ranked {}-{}% by frequency", 20 * k, 20 * (k + 1)),
                occurrences,
                executed: group.iter().map(|g| g.2).sum::<f64>()
                    / (occurrences as f64 * per_module),
            })
        })
        .collect();
    let text = |id: u32| {
        tokenizer
            .and_then(|t| t.decode(&[id]).ok())
            .unwrap_or_else(|| format!("#{id}"))
    };
    let mut frequent: Vec<TokenCompute> = ids
        .iter()
        .filter(|g| g.1 >= 20)
        .map(|&(id, count, e)| TokenCompute {
            id,
            text: text(id),
            count,
            executed: e / (count as f64 * per_module),
        })
        .collect();
    frequent.sort_by(|a, b| b.executed.total_cmp(&a.executed).then(a.id.cmp(&b.id)));
    let most_compute = frequent.iter().take(10).cloned().collect();
    let least_compute = frequent.iter().rev().take(10).cloned().collect();

    let halves = |v: &[f64]| {
        let h = v.len() / 2;
        (1.0 - mean(&v[..h]), 1.0 - mean(&v[h..]))
    };
    let attn_el = halves(&attn_skip_by_position);
    let mlp_el = halves(&mlp_skip_by_position);
    Ok(RoutingAnalysis {
        tokens,
        attn_skip,
        mlp_skip,
        attn_skip_per_layer,
        mlp_skip_per_layer,
        attn_skip_by_position,
        mlp_skip_by_position,
        by_frequency,
        most_compute,
        least_compute,
        observations: Observations {
            attention_skipped_more_than_mlp: attn_skip > mlp_skip,
            attn_executed_early_late: attn_el,
            mlp_executed_early_late: mlp_el,
            later_positions_use_more_attention: attn_el.1 > attn_el.0,
            later_positions_use_less_mlp: mlp_el.1 < mlp_el.0,
        },
    })
}

/// Per layer, the gates (1 executed, 0 skipped) on the host, flattened `[batch * seq]`.
fn host_gates<B: Backend>(gates: Vec<Tensor<B, 2>>) -> Vec<Vec<f64>> {
    gates.into_iter().map(host_f64).collect()
}

/// Which modules every token of one text executed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenMap {
    pub tokens: Vec<String>,
    /// `[layer][token]`
    pub attn: Vec<Vec<bool>>,
    pub mlp: Vec<Vec<bool>>,
}

/// The per-token routing decisions for `text`.
pub fn token_map<B: Backend>(
    model: &LlamaForCausalLM<B>,
    tokenizer: &Tokenizer,
    text: &str,
) -> Result<TokenMap> {
    let ids = tokenizer.encode(text)?;
    if ids.is_empty() {
        return Err(EvalError::Input("the text has no tokens".into()));
    }
    let n = ids.len().min(model.config.max_position_embeddings);
    let ids = &ids[..n];
    let input = Tensor::<B, 2, Int>::from_data(
        TensorData::new(ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), [1, n]),
        &model.device(),
    );
    let out = model.forward_routed(input, model.routing, false);
    let executed = |g: Vec<Tensor<B, 2>>| -> Vec<Vec<bool>> {
        host_gates(g)
            .into_iter()
            .map(|l| l.into_iter().map(|v| v > 0.5).collect())
            .collect()
    };
    Ok(TokenMap {
        tokens: ids
            .iter()
            .map(|&i| tokenizer.decode(&[i]).unwrap_or_default())
            .collect(),
        attn: executed(out.attn_gates),
        mlp: executed(out.mlp_gates),
    })
}

/// An attention and an MLP series, in the colours every picture uses for them.
fn attn_and_mlp<'a>(attn: &'a [f64], mlp: &'a [f64]) -> [Series<'a>; 2] {
    [
        Series {
            label: "attention",
            colour: RGBColor(0x94, 0x67, 0xbd),
            values: attn,
        },
        Series {
            label: "MLP",
            colour: RGBColor(0x2c, 0xa0, 0x2c),
            values: mlp,
        },
    ]
}

/// `routing.json`: the analysis and, when a text was given, its token map.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RoutingFile {
    pub analysis: RoutingAnalysis,
    pub token_map: Option<TokenMap>,
}

impl RoutingFile {
    /// The name [`write_analysis`] gives it.
    pub const NAME: &str = "routing.json";

    /// Reads `dir/routing.json`.
    pub fn read(dir: &Path) -> Result<RoutingFile> {
        let path = dir.join(Self::NAME);
        let text = std::fs::read_to_string(&path).map_err(|source| EvalError::Io {
            path: path.clone(),
            source,
        })?;
        serde_json::from_str(&text)
            .map_err(|e| EvalError::Input(format!("{}: {e}", path.display())))
    }
}

/// Writes `routing.json` and the pictures into `dir`; returns the files written.
pub fn write_analysis(
    analysis: &RoutingAnalysis,
    map: Option<&TokenMap>,
    dir: &Path,
) -> Result<Vec<PathBuf>> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |e| EvalError::Io { path, source: e }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut written = Vec::new();
    let mut put = |name: &str, text: String| -> Result<()> {
        let path = dir.join(name);
        skipgpt_model::io::atomic_write::atomic_write(&path, text.as_bytes())?;
        written.push(path);
        Ok(())
    };
    let file = RoutingFile {
        analysis: analysis.clone(),
        token_map: map.cloned(),
    };
    put(
        RoutingFile::NAME,
        serde_json::to_string_pretty(&file).expect("serialises"),
    )?;
    let layers: Vec<String> = (0..analysis.attn_skip_per_layer.len())
        .map(|l| format!("L{l}"))
        .collect();
    put(
        "skip-per-layer.svg",
        charts::bars(
            "skip rate per layer",
            &layers,
            &attn_and_mlp(&analysis.attn_skip_per_layer, &analysis.mlp_skip_per_layer),
            "skipped",
        )?,
    )?;
    put(
        "skip-by-position.svg",
        charts::lines(
            "skip rate by token position (mean over layers)",
            "position in the sequence",
            &attn_and_mlp(
                &analysis.attn_skip_by_position,
                &analysis.mlp_skip_by_position,
            ),
            "skipped",
        )?,
    )?;
    let classes: Vec<String> = analysis
        .by_frequency
        .iter()
        .enumerate()
        .map(|(k, _)| format!("top {}-{}%", 20 * k, 20 * (k + 1)))
        .collect();
    let executed: Vec<f64> = analysis.by_frequency.iter().map(|c| c.executed).collect();
    put(
        "compute-by-frequency.svg",
        charts::bars(
            "compute by token frequency (ids ranked by count)",
            &classes,
            &[Series {
                label: "modules executed",
                colour: RGBColor(0x1f, 0x77, 0xb4),
                values: &executed,
            }],
            "executed",
        )?,
    )?;
    if let Some(map) = map {
        let rows: Vec<(String, Vec<bool>)> = (0..map.attn.len())
            .flat_map(|l| {
                [
                    (format!("L{l} attn"), map.attn[l].clone()),
                    (format!("L{l} mlp"), map.mlp[l].clone()),
                ]
            })
            .collect();
        put(
            "token-heatmap.svg",
            charts::heatmap("modules each token executed", &map.tokens, &rows)?,
        )?;
    }
    Ok(written)
}
