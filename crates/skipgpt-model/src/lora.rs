//! LoRA (low-rank adaptation) for the decoder's linear layers, and its exchange format.
//!
//! A projection with an adapter computes `y = x·W + b + (α/r)·dropout(x)·A·B`, where the base
//! `W` (`[in, out]`, the Burn layout) is frozen, `A` is `[in, r]` (small random values) and
//! `B` is `[r, out]` (zeros, so a fresh adapter leaves the model unchanged). Stage 2 of SkipGPT
//! trains only `A` and `B` while the routers stay frozen.
//!
//! Adapters are saved in the PEFT layout, so Hugging Face users can load them with `peft`:
//! `adapter_config.json` and `adapter_model.safetensors` with keys
//! `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` (`[r, in]`) and
//! `...lora_B.weight` (`[out, r]`), the PyTorch `[out, in]` orientation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig, Linear};
use burn::tensor::{backend::Backend, module::linear, Distribution, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::io::atomic_write::atomic_write;
use crate::io::safetensors_io::{write_safetensors, OwnedTensor, StoreDtype, WeightSet};
use crate::io::weight_source::WeightSource;
use crate::linear::{load_bias, load_linear};
use crate::precision::linear_forward;
use crate::quantized::QuantWeight;

/// Adapter settings: which projections get one, their rank, scale and dropout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Rank r of `A·B`.
    pub rank: usize,
    /// α: the update is scaled by α / r.
    pub alpha: f64,
    /// Dropout on the adapter's input during training.
    pub dropout: f64,
    /// Projections that get an adapter, by their HF names (`q_proj`, ..., `down_proj`).
    pub targets: Vec<String>,
}

/// The projections of a decoder layer an adapter can attach to.
pub const LORA_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

impl Default for LoraConfig {
    /// SkipGPT's stage 2: r 16, α 32, dropout 0.1 on q, v and gate.
    fn default() -> Self {
        LoraConfig {
            rank: 16,
            alpha: 32.0,
            dropout: 0.1,
            targets: vec!["q_proj".into(), "v_proj".into(), "gate_proj".into()],
        }
    }
}

impl LoraConfig {
    /// α / r.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// Checks every setting; the error names the one at fault.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(ModelError::InvalidInput(what));
        if self.rank == 0 {
            return bad("LoRA rank 0: expected at least 1".into());
        }
        if !(self.alpha > 0.0 && self.alpha.is_finite()) {
            return bad(format!(
                "LoRA alpha {}: expected a positive number",
                self.alpha
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!(
                "LoRA dropout {}: expected a probability in [0, 1)",
                self.dropout
            ));
        }
        if self.targets.is_empty() {
            return bad("no LoRA targets: name at least one projection".into());
        }
        for t in &self.targets {
            if !LORA_TARGETS.contains(&t.as_str()) {
                return bad(format!(
                    "unknown LoRA target `{t}`: expected some of {}",
                    LORA_TARGETS.join(", ")
                ));
            }
        }
        Ok(())
    }

    /// Whether the projection named `name` (`q_proj`, ...) gets an adapter.
    pub fn applies_to(&self, name: &str) -> bool {
        self.targets.iter().any(|t| t == name)
    }
}

/// A trainable low-rank update of one projection.
#[derive(Module, Debug)]
pub struct LoraAdapter<B: Backend> {
    /// `[in, r]`
    pub lora_a: Param<Tensor<B, 2>>,
    /// `[r, out]`
    pub lora_b: Param<Tensor<B, 2>>,
    pub dropout: Dropout,
    /// α / r
    pub scale: f64,
}

impl<B: Backend> LoraAdapter<B> {
    /// A fresh adapter: `A` uniform in ±1/√in (Kaiming-uniform with a = √5, as PEFT), `B` zero.
    pub fn init(d_in: usize, d_out: usize, cfg: &LoraConfig, device: &B::Device) -> Self {
        let bound = 1.0 / (d_in as f64).sqrt();
        Self::from_matrices(
            Tensor::random(
                [d_in, cfg.rank],
                Distribution::Uniform(-bound, bound),
                device,
            ),
            Tensor::zeros([cfg.rank, d_out], device),
            cfg,
        )
    }

    /// An adapter with the given `A` (`[in, r]`) and `B` (`[r, out]`).
    pub fn from_matrices(a: Tensor<B, 2>, b: Tensor<B, 2>, cfg: &LoraConfig) -> Self {
        LoraAdapter {
            lora_a: Param::from_tensor(a),
            lora_b: Param::from_tensor(b),
            dropout: DropoutConfig::new(cfg.dropout).init(),
            scale: cfg.scale(),
        }
    }

    /// The update `scale·dropout(x)·A·B`.
    ///
    /// # Shapes
    /// - x: `[..., in]`
    /// - output: `[..., out]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let x = self.dropout.forward(x);
        linear(linear(x, self.lora_a.val(), None), self.lora_b.val(), None) * self.scale
    }

    /// `scale·A·B`, `[in, out]`: what merging adds to the base weight.
    pub fn delta(&self) -> Tensor<B, 2> {
        self.lora_a.val().matmul(self.lora_b.val()) * self.scale
    }

    pub fn rank(&self) -> usize {
        self.lora_a.dims()[1]
    }
}

/// A linear projection with an optional LoRA adapter. Without one it is exactly `Linear`.
///
/// Its base weight is `base_layer`'s, or, for a model run from a quantized GGUF on the CPU
/// backend, `quantized` (llama.cpp's blocks, read in place; `base_layer` then keeps only the
/// bias and an empty `[in, 0]` weight). An adapter on a quantized base stays unmerged, as in
/// QLoRA: its term is added to the quantized product.
#[derive(Module, Debug)]
pub struct LoraLinear<B: Backend> {
    /// The base projection (PEFT's `base_layer`); frozen while an adapter trains.
    pub base_layer: Linear<B>,
    /// The base weight in a block format, in place of `base_layer`'s.
    pub quantized: Option<QuantWeight>,
    pub lora: Option<LoraAdapter<B>>,
}

impl<B: Backend> From<Linear<B>> for LoraLinear<B> {
    fn from(base_layer: Linear<B>) -> Self {
        LoraLinear {
            base_layer,
            quantized: None,
            lora: None,
        }
    }
}

impl<B: Backend> LoraLinear<B> {
    /// Loads HF `{name}.weight` `[d_out, d_in]` (and `{name}.bias`): kept in its block format
    /// where the source stores it so and the backend computes with it
    /// ([`crate::quantized::keeps_quantized`]), else as [`load_linear`] holds it.
    pub(crate) fn load(
        w: &impl WeightSource,
        name: &str,
        [d_in, d_out]: [usize; 2],
        bias: bool,
        device: &B::Device,
    ) -> Result<Self> {
        if crate::quantized::keeps_quantized::<B>() {
            if let Some(q) = w.quantized(&format!("{name}.weight"), [d_out, d_in])? {
                let base_layer = Linear {
                    weight: Param::from_tensor(Tensor::zeros([d_in, 0], device)),
                    bias: load_bias(w, name, d_out, bias, device)?,
                };
                return Ok(LoraLinear {
                    base_layer,
                    quantized: Some(q),
                    lora: None,
                });
            }
        }
        Ok(load_linear(w, name, d_in, d_out, bias, device)?.into())
    }

    /// # Shapes
    /// - x: `[..., in]`
    /// - output: `[..., out]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        match &self.lora {
            None => self.base_forward(x),
            Some(lora) => self.base_forward(x.clone()) + lora.forward(x),
        }
    }

    /// The base projection alone.
    ///
    /// # Shapes
    /// - x: `[..., in]`
    /// - output: `[..., out]`
    pub fn base_forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        match &self.quantized {
            None => linear_forward(&self.base_layer, x),
            Some(q) => add_bias(q.forward(x), &self.base_layer),
        }
    }

    /// The forwards of several projections of the same rows (q, k and v; gate and up): on the
    /// CPU backend, for a decoding step's few rows, their products run as one parallel pass
    /// ([`crate::dispatch::times_weights`]); each adapter's term is added to its own.
    ///
    /// # Shapes
    /// - x: `[..., in]`
    /// - output: `[..., out_k]` per projection
    pub fn forward_many<const D: usize>(
        projections: &[&Self],
        x: Tensor<B, D>,
    ) -> Vec<Tensor<B, D>> {
        let forward_each = || projections.iter().map(|p| p.forward(x.clone())).collect();
        let quantized: Option<Vec<&QuantWeight>> =
            projections.iter().map(|p| p.quantized.as_ref()).collect();
        match quantized {
            Some(weights) => {
                let products = QuantWeight::forward_many(&weights, x.clone());
                return Self::finish_many(projections, products, &x);
            }
            None if projections.iter().any(|p| p.quantized.is_some()) => return forward_each(),
            None => {}
        }
        let weights: Vec<Tensor<B, 2>> = projections
            .iter()
            .map(|p| p.base_layer.weight.val())
            .collect();
        let products = crate::dispatch::times_weights(&x, &weights);
        Self::finish_many(projections, products, &x)
    }

    /// Each projection's bias and adapter term added to its base product.
    fn finish_many<const D: usize>(
        projections: &[&Self],
        products: Vec<Tensor<B, D>>,
        x: &Tensor<B, D>,
    ) -> Vec<Tensor<B, D>> {
        products
            .into_iter()
            .zip(projections)
            .map(|(y, p)| {
                let y = add_bias(y, &p.base_layer);
                match &p.lora {
                    Some(lora) => y + lora.forward(x.clone()),
                    None => y,
                }
            })
            .collect()
    }

    /// `[in, out]` of the base weight.
    pub fn dims(&self) -> [usize; 2] {
        match &self.quantized {
            Some(q) => {
                let [n, d] = q.dims();
                [d, n]
            }
            None => self.base_layer.weight.dims(),
        }
    }

    /// The base weight `[in, out]` as a float tensor (a quantized one dequantized, in f32).
    pub fn dense_weight(&self) -> Tensor<B, 2> {
        match &self.quantized {
            Some(q) => {
                let device = self.base_layer.weight.device();
                let data = TensorData::new(q.dequantize(), q.dims());
                Tensor::<B, 2>::from_data(data, &device).transpose()
            }
            None => self.base_layer.weight.val(),
        }
    }

    /// Folds the adapter into the base weight (`W + scale·A·B`) and drops it: the same
    /// function at inference, at the cost of a plain linear layer. A quantized base keeps its
    /// adapter (folding it in would need the blocks quantized again).
    pub fn merge(&mut self) {
        if self.quantized.is_some() {
            return;
        }
        if let Some(lora) = self.lora.take() {
            // in the base weight's type: merging keeps a half-precision model half
            let base = self.base_layer.weight.val();
            let weight = base.clone() + lora.delta().cast(base.dtype());
            self.base_layer.weight = Param::from_tensor(crate::dispatch::hold_weight(weight));
        }
    }
}

/// `y` plus `linear`'s bias, if it has one.
fn add_bias<B: Backend, const D: usize>(y: Tensor<B, D>, linear: &Linear<B>) -> Tensor<B, D> {
    match &linear.bias {
        Some(b) => y + b.val().unsqueeze(),
        None => y,
    }
}

/// The file names of a PEFT adapter directory.
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// PEFT's name of an adapter matrix: `base_model.model.{module}.lora_A.weight`.
pub fn peft_key(module: &str, which: char) -> String {
    format!("base_model.model.{module}.lora_{which}.weight")
}

/// Adapter matrices keyed by PEFT name, in PEFT's `[out, in]` orientation.
pub type AdapterTensors = BTreeMap<String, OwnedTensor>;

/// Writes `adapter_config.json` and `adapter_model.safetensors` (f32) into `dir`, each
/// atomically. `base_model` is recorded as `base_model_name_or_path`.
pub fn save_peft_adapter(
    dir: &Path,
    cfg: &LoraConfig,
    tensors: &AdapterTensors,
    base_model: &str,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": cfg.targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "use_rslora": false,
        "use_dora": false,
        "revision": null,
    });
    let metadata = [("format".to_string(), "pt".to_string())]
        .into_iter()
        .collect();
    write_safetensors(&dir.join(ADAPTER_WEIGHTS_FILE), tensors, Some(metadata))?;
    let json = serde_json::to_string_pretty(&config).expect("a JSON value serialises");
    atomic_write(&dir.join(ADAPTER_CONFIG_FILE), json.as_bytes())
}

/// A PEFT adapter directory: its settings and its weights.
pub struct PeftAdapter {
    pub config: LoraConfig,
    pub weights: WeightSet,
    pub dir: PathBuf,
}

/// The keys of a PEFT `adapter_config.json` this project reads (every other key is ignored).
/// serde checks their types, and an error names the key's path.
#[derive(serde::Deserialize)]
struct PeftConfigFile {
    peft_type: Option<String>,
    r: Option<u64>,
    lora_alpha: Option<f64>,
    lora_dropout: Option<f64>,
    target_modules: Option<TargetModules>,
    use_rslora: Option<bool>,
    use_dora: Option<bool>,
    fan_in_fan_out: Option<bool>,
    bias: Option<String>,
    rank_pattern: Option<serde_json::Map<String, serde_json::Value>>,
    alpha_pattern: Option<serde_json::Map<String, serde_json::Value>>,
}

/// `target_modules`: PEFT takes a list of names or one regular expression.
#[derive(serde::Deserialize)]
#[serde(untagged, expecting = "a list of module names or a pattern")]
enum TargetModules {
    Names(Vec<String>),
    Pattern(String),
}

/// Reads a PEFT LoRA adapter directory. Only plain LoRA is understood: rsLoRA, DoRA, bias
/// training and per-layer ranks are refused with the key named.
pub fn load_peft_adapter(dir: &Path) -> Result<PeftAdapter> {
    let path = dir.join(ADAPTER_CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    let err = |message: String| ModelError::Config {
        path: path.clone(),
        message,
    };
    let file: PeftConfigFile = crate::error::from_json_text(&text, &path)?;
    let unsupported = |key: &str, value: String, expected: &str| ModelError::Unsupported {
        path: path.clone(),
        key: key.into(),
        value,
        expected: expected.into(),
    };
    if let Some(t) = file.peft_type.as_deref().filter(|&t| t != "LORA") {
        return Err(unsupported("peft_type", format!("{t:?}"), "\"LORA\""));
    }
    for (key, on) in [
        ("use_rslora", file.use_rslora),
        ("use_dora", file.use_dora),
        ("fan_in_fan_out", file.fan_in_fan_out),
    ] {
        if on == Some(true) {
            return Err(unsupported(key, "true".into(), "false"));
        }
    }
    if let Some(b) = file.bias.as_deref().filter(|&b| b != "none") {
        return Err(unsupported("bias", format!("{b:?}"), "\"none\""));
    }
    for (key, pattern) in [
        ("rank_pattern", &file.rank_pattern),
        ("alpha_pattern", &file.alpha_pattern),
    ] {
        if let Some(p) = pattern.as_ref().filter(|p| !p.is_empty()) {
            return Err(unsupported(
                key,
                serde_json::Value::Object(p.clone()).to_string(),
                "none: one rank and α for every module",
            ));
        }
    }
    let rank = match file.r {
        Some(r) if r > 0 => r as usize,
        _ => return Err(err("`r` must be a positive integer".into())),
    };
    let alpha = file
        .lora_alpha
        .ok_or_else(|| err("`lora_alpha` must be a number".into()))?;
    let dropout = file.lora_dropout.unwrap_or(0.0);
    let targets = match file.target_modules {
        Some(TargetModules::Names(names)) => names,
        Some(TargetModules::Pattern(p)) => {
            return Err(unsupported(
                "target_modules",
                format!("{p:?}"),
                "a list of projection names",
            ))
        }
        None => return Err(err("`target_modules` is missing".into())),
    };
    let config = LoraConfig {
        rank,
        alpha,
        dropout,
        targets,
    };
    config.validate().map_err(|e| err(e.to_string()))?;
    let weights = WeightSet::open_files(&[dir.join(ADAPTER_WEIGHTS_FILE)])?;
    Ok(PeftAdapter {
        config,
        weights,
        dir: dir.to_path_buf(),
    })
}

/// The adapter of `module` (e.g. `model.layers.0.self_attn.q_proj`), read from PEFT weights
/// and checked against the base projection's `[in, out]`.
pub(crate) fn load_adapter<B: Backend>(
    w: &WeightSet,
    module: &str,
    [d_in, d_out]: [usize; 2],
    cfg: &LoraConfig,
    device: &B::Device,
) -> Result<LoraAdapter<B>> {
    // transposed on the host: the adapter runs in Burn's `[in, out]` layout, contiguous
    let a = w.tensor_transposed::<B>(&peft_key(module, 'A'), [cfg.rank, d_in], device)?;
    let b = w.tensor_transposed::<B>(&peft_key(module, 'B'), [d_out, cfg.rank], device)?;
    Ok(LoraAdapter::from_matrices(a, b, cfg))
}

/// Adds `module`'s adapter to `out` under PEFT names, `[r, in]` and `[out, r]`.
pub(crate) fn export_adapter<B: Backend>(
    out: &mut AdapterTensors,
    module: &str,
    adapter: &LoraAdapter<B>,
) {
    out.insert(
        peft_key(module, 'A'),
        OwnedTensor::from_tensor(adapter.lora_a.val().transpose(), StoreDtype::F32),
    );
    out.insert(
        peft_key(module, 'B'),
        OwnedTensor::from_tensor(adapter.lora_b.val().transpose(), StoreDtype::F32),
    );
}
