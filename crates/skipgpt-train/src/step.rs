//! The model as burn-train sees it: a forward pass that returns the loss and the statistics
//! the metrics show.

use burn::module::Module;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use burn::train::metric::ItemLazy;
use burn::train::{InferenceStep, TrainOutput, TrainStep};
use skipgpt_model::{LlamaForCausalLM, RouterNoise, Routing};

use crate::loader::LmBatch;
use crate::loss::{skipgpt_loss, SparsityLossConfig};

/// What a run optimises.
#[derive(Debug, Clone, PartialEq)]
pub enum Objective {
    /// Next-token cross-entropy with the model's own routing (pretraining: no routers).
    Lm,
    /// Stage 1: cross-entropy + α·|T − skip_rate| through hard Gumbel straight-through gates;
    /// validation uses the deterministic gates a user will serve with.
    Sparsity(SparsityLossConfig),
}

impl Objective {
    fn loss_config(&self) -> SparsityLossConfig {
        match self {
            Objective::Lm => SparsityLossConfig::new().with_alpha(0.0),
            Objective::Sparsity(cfg) => cfg.clone(),
        }
    }
}

/// A causal LM and its objective: the module burn-train trains.
#[derive(Module, Debug)]
pub struct LmTrainer<B: Backend> {
    pub model: LlamaForCausalLM<B>,
    #[module(skip)]
    pub objective: Objective,
}

impl<B: Backend> LmTrainer<B> {
    pub fn new(model: LlamaForCausalLM<B>, objective: Objective) -> Self {
        LmTrainer { model, objective }
    }

    /// The loss of one batch and its statistics.
    ///
    /// # Shapes
    /// - batch.inputs, batch.targets: `[batch, seq]`
    pub fn forward_loss(
        &self,
        batch: &LmBatch<B>,
        training: bool,
    ) -> (Tensor<B, 1>, StepOutput<B>) {
        let routing = match (&self.objective, training) {
            (Objective::Sparsity(_), true) => Routing::Gumbel {
                temperature: batch.temperature,
            },
            (Objective::Sparsity(_), false) => Routing::Deterministic,
            (Objective::Lm, _) => self.model.routing,
        };
        // the noise of a step is a function of its seed, so a resumed run draws the same
        let noise = matches!(routing, Routing::Gumbel { .. } | Routing::Sample).then(|| {
            let [b, t] = batch.inputs.dims();
            RouterNoise::from_seed(
                batch.noise_seed,
                self.model.config.num_hidden_layers,
                b,
                t,
                &batch.inputs.device(),
            )
        });
        let out = self.model.forward_with_noise(
            batch.inputs.clone(),
            None,
            routing,
            false,
            noise.as_ref(),
        );
        let mask = Tensor::ones(batch.inputs.dims(), &batch.inputs.device());
        let parts = skipgpt_loss(
            &self.objective.loss_config(),
            out.logits,
            batch.targets.clone(),
            mask,
            &out.attn_gates,
            &out.mlp_gates,
        );
        let stats = Tensor::cat(
            vec![
                parts.total.clone(),
                parts.lm,
                parts.attn_skip,
                parts.mlp_skip,
            ],
            0,
        )
        .detach();
        let temperature = match routing {
            Routing::Gumbel { temperature } => temperature,
            _ => f64::NAN,
        };
        let output = StepOutput {
            stats,
            temperature,
            tokens: batch.num_tokens(),
        };
        (parts.total, output)
    }
}

impl<B: AutodiffBackend> TrainStep for LmTrainer<B> {
    type Input = LmBatch<B>;
    type Output = StepOutput<B>;

    fn step(&self, batch: LmBatch<B>) -> TrainOutput<StepOutput<B>> {
        if self
            .model
            .lora_config
            .as_ref()
            .is_some_and(|c| c.dropout > 0.0)
        {
            // LoRA dropout draws from the backend's generator: seed it from the step, so a
            // run (and a resumed run) draws the same masks
            B::seed(&batch.inputs.device(), batch.noise_seed ^ 0x5eed_d20f);
        }
        let (loss, output) = self.forward_loss(&batch, true);
        let grads = (loss * batch.loss_scale).backward();
        TrainOutput::new(self, grads, output)
    }
}

impl<B: Backend> InferenceStep for LmTrainer<B> {
    type Input = LmBatch<B>;
    type Output = StepOutput<B>;

    fn step(&self, batch: LmBatch<B>) -> StepOutput<B> {
        self.forward_loss(&batch, false).1
    }
}

/// A step's statistics, still on the device (read back by the metrics thread).
pub struct StepOutput<B: Backend> {
    /// `[loss, lm_loss, attn_skip, mlp_skip]`
    stats: Tensor<B, 1>,
    temperature: f64,
    tokens: usize,
}

/// A step's statistics as numbers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    pub loss: f64,
    pub lm_loss: f64,
    pub attn_skip: f64,
    pub mlp_skip: f64,
    /// NaN when the step did not use Gumbel gates.
    pub temperature: f64,
    pub tokens: usize,
}

impl<B: Backend> ItemLazy for StepOutput<B> {
    type ItemSync = StepStats;

    fn sync(self) -> StepStats {
        let v = read_f64(self.stats.into_data());
        StepStats {
            loss: v[0],
            lm_loss: v[1],
            attn_skip: v[2],
            mlp_skip: v[3],
            temperature: self.temperature,
            tokens: self.tokens,
        }
    }
}

fn read_f64(data: TensorData) -> Vec<f64> {
    data.convert::<f64>()
        .into_vec::<f64>()
        .expect("converted to f64")
}
