//! The model as burn-train sees it: a forward pass that returns the loss and the statistics
//! the metrics show.

use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use burn::train::metric::ItemLazy;
use burn::train::{InferenceStep, TrainOutput, TrainStep};
use skipgpt_model::{LlamaForCausalLM, RouterNoise, Routing};

use crate::data::mix;
use crate::loader::LmBatch;
use crate::loss::{skipgpt_loss, Distillation, LossParts, SparsityLossConfig};

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
    /// Gradient checkpointing per decoder layer (see [`LmTrainer::checkpointed_step`]).
    #[module(skip)]
    pub checkpoint_layers: bool,
    /// What the model matches token by token: the corpus, the dense teacher, or both.
    #[module(skip)]
    pub distill: Distillation,
}

impl<B: Backend> LmTrainer<B> {
    pub fn new(model: LlamaForCausalLM<B>, objective: Objective) -> Self {
        LmTrainer {
            model,
            objective,
            checkpoint_layers: false,
            distill: Distillation::default(),
        }
    }

    pub fn with_distillation(self, distill: Distillation) -> Self {
        LmTrainer { distill, ..self }
    }

    pub fn with_checkpoint_layers(self, checkpoint_layers: bool) -> Self {
        LmTrainer {
            checkpoint_layers,
            ..self
        }
    }

    /// The routing a batch trains (or validates) with.
    fn routing_for(&self, batch: &LmBatch<B>, training: bool) -> Routing {
        match (&self.objective, training) {
            (Objective::Sparsity(_), true) => Routing::Gumbel {
                temperature: batch.temperature,
            },
            (Objective::Sparsity(_), false) => Routing::Deterministic,
            (Objective::Lm, _) => self.model.routing,
        }
    }

    /// The Gumbel noise of a batch: a function of its seed, so a resumed run draws the same.
    fn noise_for(&self, batch: &LmBatch<B>, routing: Routing) -> Option<RouterNoise<B>> {
        matches!(routing, Routing::Gumbel { .. } | Routing::Sample).then(|| {
            let [b, t] = batch.inputs.dims();
            RouterNoise::from_seed(
                batch.noise_seed,
                self.model.config.num_hidden_layers,
                b,
                t,
                &batch.inputs.device(),
            )
        })
    }

    /// The teacher's logits when the objective distils: the same weights with every module
    /// executing and no adapter, outside the graph (no gradient can reach it).
    ///
    /// # Shapes
    /// - output: `[batch, seq, vocab]`
    pub fn teacher_logits(&self, batch: &LmBatch<B>) -> Option<Tensor<B, 3>> {
        self.distill.needs_teacher().then(|| {
            self.model
                .without_lora()
                .no_grad()
                .forward_routed(batch.inputs.clone(), Routing::Dense, false)
                .logits
                .detach()
        })
    }

    /// The objective's loss over every position of the batch.
    fn loss(
        &self,
        logits: Tensor<B, 3>,
        batch: &LmBatch<B>,
        attn_gates: &[Tensor<B, 2>],
        mlp_gates: &[Tensor<B, 2>],
    ) -> LossParts<B> {
        let mask = Tensor::ones(batch.inputs.dims(), &batch.inputs.device());
        skipgpt_loss(
            &self.objective.loss_config(),
            &self.distill,
            logits,
            self.teacher_logits(batch),
            batch.targets.clone(),
            mask,
            attn_gates,
            mlp_gates,
        )
    }

    fn stats(&self, parts: &LossParts<B>, routing: Routing, batch: &LmBatch<B>) -> StepOutput<B> {
        let stats = Tensor::cat(
            vec![
                parts.total.clone(),
                parts.lm.clone(),
                parts.attn_skip.clone(),
                parts.mlp_skip.clone(),
                parts.skip.clone(),
                parts.kl.clone(),
            ],
            0,
        )
        .detach();
        let temperature = match routing {
            Routing::Gumbel { temperature } => temperature,
            _ => f64::NAN,
        };
        StepOutput {
            stats,
            temperature,
            tokens: batch.num_tokens(),
        }
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
        let routing = self.routing_for(batch, training);
        let noise = self.noise_for(batch, routing);
        let out =
            self.model
                .forward_with_noise(batch.inputs.clone(), routing, false, noise.as_ref());
        let parts = self.loss(out.logits, batch, &out.attn_gates, &out.mlp_gates);
        let output = self.stats(&parts, routing, batch);
        (parts.total, output)
    }
}

impl<B: AutodiffBackend> LmTrainer<B> {
    /// LoRA dropout draws from the backend's generator: seed it from the step (and, when
    /// checkpointing, the layer), so that a run, a resumed run and a recomputed layer draw the
    /// same masks.
    fn seed_dropout(&self, batch: &LmBatch<B>, layer: Option<usize>) {
        if self
            .model
            .lora_config
            .as_ref()
            .is_some_and(|c| c.dropout > 0.0)
        {
            let salt = layer.map_or(0, |l| mix(0x1a7e, l as u64));
            B::seed(
                &batch.inputs.device(),
                batch.noise_seed ^ 0x5eed_d20f ^ salt,
            );
        }
    }

    /// One training step's gradients with the whole graph in memory.
    fn full_step(&self, batch: &LmBatch<B>) -> (GradientsParams, StepOutput<B>) {
        self.seed_dropout(batch, None);
        let (loss, output) = self.forward_loss(batch, true);
        let grads = (loss * batch.loss_scale).backward();
        (GradientsParams::from_grads(grads, self), output)
    }

    /// One training step's gradients with gradient checkpointing per decoder layer: the
    /// forward pass keeps only each layer's input (no graph); the backward pass then rebuilds
    /// one layer's graph at a time, from the last layer down, and pushes the gradient through
    /// it. Activation memory is that of one layer plus `layers × batch × seq × hidden` values,
    /// instead of every layer's; the price is a second forward pass.
    ///
    /// The loss is the same function: the head's backward gives ∂L/∂(last hidden state) and
    /// ∂L/∂(every gate) (the sparsity term couples all gates, so it is differentiated once, on
    /// all of them); layer `l` is then differentiated through
    /// `Σ out_l·∂L/∂out_l + Σ gate_l·∂L/∂gate_l`, whose gradient with respect to the layer's
    /// parameters and input is the chain rule's.
    pub fn checkpointed_step(&self, batch: &LmBatch<B>) -> (GradientsParams, StepOutput<B>) {
        let routing = self.routing_for(batch, true);
        let noise = self.noise_for(batch, routing);
        let [_, t] = batch.inputs.dims();
        let layers = &self.model.model.layers;
        let ctx = self.model.attention_context(t);
        let layer_routing = self.model.layer_routing(routing);
        let mut acc = GradientsAccumulator::<LlamaForCausalLM<B>>::new();

        // forward without a graph: the same backend (so LoRA dropout is live), nothing tracked
        let untracked = self.model.clone().no_grad();
        let mut x = untracked
            .model
            .embed_tokens
            .forward(batch.inputs.clone())
            .detach();
        let mut inputs = Vec::with_capacity(layers.len());
        let (mut attn_gates, mut mlp_gates) = (Vec::new(), Vec::new());
        for (i, layer) in untracked.model.layers.iter().enumerate() {
            self.seed_dropout(batch, Some(i));
            inputs.push(x.clone());
            let out = layer.forward(
                x,
                &ctx,
                &layer_routing,
                noise.as_ref().map(|n| &n.layers[i]),
            );
            x = out.hidden.detach();
            attn_gates.push(out.attn_gate.map(|g| g.detach().require_grad()));
            mlp_gates.push(out.mlp_gate.map(|g| g.detach().require_grad()));
        }

        // the head and the loss, with the last hidden state and every gate as leaves
        let last = x.require_grad();
        let logits = self.model.head(self.model.model.norm.forward(last.clone()));
        let flat = |g: &[Option<Tensor<B, 2>>]| g.iter().flatten().cloned().collect::<Vec<_>>();
        let parts = self.loss(logits, batch, &flat(&attn_gates), &flat(&mlp_gates));
        let output = self.stats(&parts, routing, batch);
        let grads = (parts.total * batch.loss_scale).backward();
        let mut upstream = last
            .grad(&grads)
            .expect("the loss depends on the last layer");
        let gate_grad = |g: &Option<Tensor<B, 2>>| g.as_ref().and_then(|g| g.grad(&grads));
        let attn_up: Vec<_> = attn_gates.iter().map(gate_grad).collect();
        let mlp_up: Vec<_> = mlp_gates.iter().map(gate_grad).collect();
        acc.accumulate(&self.model, GradientsParams::from_grads(grads, &self.model));

        // the layers, last first, one graph at a time
        let embed_trains = self.model.model.embed_tokens.weight.is_require_grad();
        for (i, layer) in layers.iter().enumerate().rev() {
            self.seed_dropout(batch, Some(i));
            let input = inputs[i].clone().require_grad();
            let out = layer.forward(
                input.clone(),
                &ctx,
                &layer_routing,
                noise.as_ref().map(|n| &n.layers[i]),
            );
            let mut surrogate = (out.hidden * Tensor::from_inner(upstream.clone())).sum();
            for (gate, up) in [(out.attn_gate, &attn_up[i]), (out.mlp_gate, &mlp_up[i])] {
                if let (Some(g), Some(up)) = (gate, up) {
                    surrogate = surrogate + (g * Tensor::from_inner(up.clone())).sum();
                }
            }
            let grads = surrogate.backward();
            if i > 0 || embed_trains {
                upstream = input
                    .grad(&grads)
                    .expect("a layer's output depends on its input");
            }
            acc.accumulate(&self.model, GradientsParams::from_grads(grads, &self.model));
        }
        if embed_trains {
            let embedded = skipgpt_model::precision::embed(
                &self.model.model.embed_tokens,
                batch.inputs.clone(),
            );
            let grads = (embedded * Tensor::from_inner(upstream)).sum().backward();
            acc.accumulate(&self.model, GradientsParams::from_grads(grads, &self.model));
        }
        (acc.grads(), output)
    }
}

impl<B: AutodiffBackend> TrainStep for LmTrainer<B> {
    type Input = LmBatch<B>;
    type Output = StepOutput<B>;

    fn step(&self, batch: LmBatch<B>) -> TrainOutput<StepOutput<B>> {
        let (grads, item) = if self.checkpoint_layers {
            self.checkpointed_step(&batch)
        } else {
            self.full_step(&batch)
        };
        TrainOutput { grads, item }
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
    /// `[loss, lm_loss, attn_skip, mlp_skip, skip, kl]`
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
    /// The global rate the sparsity target is compared with (in the target's unit).
    pub skip: f64,
    /// KL(dense ‖ routed) per token; 0 when the objective does not distil.
    pub kl: f64,
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
            skip: v[4],
            kl: v[5],
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::TokenObjective;
    use skipgpt_model::{LlamaConfig, RouterInit, RoutingConfig};

    type A = burn::backend::Autodiff<burn::backend::NdArray<f32>>;

    #[test]
    fn the_teacher_is_the_dense_model_outside_the_graph() {
        let device = Default::default();
        // routers that skip every module (trainable, as in stage 1), so that student and
        // teacher differ
        let model = LlamaConfig::tiny(64)
            .init::<A>(&device)
            .with_new_routers_from(RoutingConfig::new(), RouterInit::Execute { margin: -3.0 });
        let distill = Distillation {
            objective: TokenObjective::Kl,
            temperature: 1.0,
        };
        let seqs: Vec<u32> = (0..9).collect();
        let batch = LmBatch::<A>::from_sequences(&[&seqs], &device);
        // burn initialises parameters lazily, each clone on its own: draw them once first
        let routed = model
            .forward_routed(batch.inputs.clone(), Routing::Deterministic, false)
            .logits;
        let trainer = LmTrainer::new(model.clone(), Objective::Lm).with_distillation(distill);
        let teacher = trainer
            .teacher_logits(&batch)
            .expect("a KL objective has a teacher");
        // no gradient from the teacher reaches any weight; the same pass as the student's does
        let embedding = &model.model.embed_tokens.weight;
        let grads = teacher.clone().sum().backward();
        assert!(embedding.grad(&grads).is_none());
        let dense = model
            .forward_routed(batch.inputs.clone(), Routing::Dense, false)
            .logits;
        let grads = dense.clone().sum().backward();
        assert!(
            embedding.grad(&grads).is_some(),
            "the student's pass is tracked"
        );
        let diff: f32 = (teacher.clone().inner() - dense.inner())
            .abs()
            .max()
            .into_scalar();
        assert!(diff < 1e-6, "the teacher is the model run dense: {diff}");
        let apart: f32 = (teacher.inner() - routed.inner()).abs().max().into_scalar();
        assert!(apart > 1e-4, "skipping every module changes the logits");
        // LM alone needs no teacher
        let lm = LmTrainer::new(model, Objective::Lm);
        assert!(lm.teacher_logits(&batch).is_none());
    }
}
