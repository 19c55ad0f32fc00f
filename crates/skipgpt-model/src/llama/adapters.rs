//! Attaching LoRA adapters to a model's projections: fresh ones for stage 2, trained ones from
//! a PEFT directory; saving them under PEFT names, and merging them into the base weights.

use burn::module::Module;
use burn::tensor::backend::Backend;

use super::LlamaForCausalLM;
use crate::error::{ModelError, Result};
use crate::lora::{
    export_adapter, load_adapter, AdapterTensors, LoraAdapter, LoraConfig, PeftAdapter,
};

impl<B: Backend> LlamaForCausalLM<B> {
    /// Attaches fresh LoRA adapters (A small and random, B zero: the function is unchanged)
    /// to the projections `cfg` targets, replacing any adapters there were.
    ///
    /// The adapters require gradients whatever the rest does: freeze first (`no_grad()` for
    /// stage 2, [`LlamaForCausalLM::freeze_base`] for the joint variant), then attach.
    pub fn with_lora(mut self, cfg: LoraConfig) -> Result<Self> {
        cfg.validate()?;
        let device = self.device();
        for layer in self.model.layers.iter_mut() {
            for (_, name, proj) in layer.projections_mut() {
                proj.lora = cfg.applies_to(name).then(|| {
                    let [d_in, d_out] = proj.dims();
                    LoraAdapter::init(d_in, d_out, &cfg, &device)
                });
            }
        }
        self.lora_config = Some(cfg);
        Ok(self)
    }

    /// Attaches the adapters of a PEFT directory (see [`crate::lora::load_peft_adapter`]).
    /// Every targeted projection of every layer must be there with the right shape, and the
    /// file may hold nothing else.
    pub fn load_lora(mut self, adapter: &PeftAdapter) -> Result<Self> {
        let cfg = adapter.config.clone();
        let device = self.device();
        let mut expected = 0;
        for (i, layer) in self.model.layers.iter_mut().enumerate() {
            for (block, name, proj) in layer.projections_mut() {
                proj.lora = if cfg.applies_to(name) {
                    expected += 2;
                    let module = format!("model.layers.{i}.{block}.{name}");
                    Some(load_adapter(
                        &adapter.weights,
                        &module,
                        proj.dims(),
                        &cfg,
                        &device,
                    )?)
                } else {
                    None
                };
            }
        }
        let found: Vec<&str> = adapter.weights.names().collect();
        if found.len() != expected {
            let first_unknown = found
                .iter()
                .find(|n| {
                    !(0..self.config.num_hidden_layers)
                        .any(|i| n.starts_with(&format!("base_model.model.model.layers.{i}.")))
                })
                .map_or(String::new(), |n| format!(", e.g. `{n}`"));
            return Err(ModelError::InvalidInput(format!(
                "{}: {} adapter tensors, expected {expected} ({} layers × {} targets × A and B){first_unknown}",
                adapter.dir.display(),
                found.len(),
                self.config.num_hidden_layers,
                cfg.targets.len()
            )));
        }
        self.lora_config = Some(cfg);
        Ok(self)
    }

    /// The adapters under their PEFT names (`[r, in]` and `[out, r]`, f32).
    pub fn export_lora(&self) -> AdapterTensors {
        let mut out = AdapterTensors::new();
        for (i, layer) in self.model.layers.iter().enumerate() {
            for (block, name, proj) in layer.projections() {
                if let Some(adapter) = &proj.lora {
                    export_adapter(
                        &mut out,
                        &format!("model.layers.{i}.{block}.{name}"),
                        adapter,
                    );
                }
            }
        }
        out
    }

    /// Folds every adapter into its base weight: a plain model computing the same function.
    pub fn merge_lora(mut self) -> Self {
        for layer in self.model.layers.iter_mut() {
            for (_, _, proj) in layer.projections_mut() {
                proj.merge();
            }
        }
        self.lora_config = None;
        self
    }

    /// The same model without its adapters (the weights are shared, not copied): the base
    /// a distilled stage 2 is compared with.
    pub fn without_lora(&self) -> Self {
        let mut base = self.clone();
        for layer in base.model.layers.iter_mut() {
            for (_, _, proj) in layer.projections_mut() {
                proj.lora = None;
            }
        }
        base.lora_config = None;
        base
    }

    /// Number of adapter parameters.
    pub fn lora_params(&self) -> usize {
        self.model
            .layers
            .iter()
            .flat_map(|l| l.projections())
            .filter_map(|(_, _, p)| p.lora.as_ref())
            .map(|a| a.num_params())
            .sum()
    }
}
