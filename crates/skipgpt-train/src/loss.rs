//! The SkipGPT objective: `D + α·|T − skip_rate|`, where `D` is what the routed model is
//! trained to match token by token ([`TokenObjective`]): the corpus's next tokens (`CE`, the
//! paper's), the dense model's next-token distributions (`KL(dense ‖ routed)`, distillation
//! from the same frozen base with routing off), or both.
//!
//! `skip_rate` is the fraction of (token, module) executions skipped, averaged over real
//! (non-padding) tokens, layers and both module kinds, every module weighted equally — one
//! global constraint, so routers may trade attention sparsity against MLP sparsity (the
//! reference code's `|(1 − T) − exec_rate|`, which is the same thing). With separate targets
//! for attention and MLP, each kind gets its own term and the two are averaged.
//!
//! With `attn_share` set, the global rate weighs each kind by its parameters instead, so T is
//! the fraction of parameters skipped (the paper's "Param skip" column). On LLaMA shapes an
//! MLP holds 2–4× an attention's parameters, and the routers skip attention more readily, so
//! a module-count target of 25% lands near 21% of parameters (SmolLM2-135M).

use burn::config::Config;
use burn::tensor::{activation, backend::Backend, Int, Tensor};
use serde::{Deserialize, Serialize};
use skipgpt_data::DataError;

use crate::error::Result;

/// Weights and targets of the sparsity term.
#[derive(Config, Debug, PartialEq)]
pub struct SparsityLossConfig {
    /// Weight α of the sparsity term (the paper: 8; the reference code: 20).
    #[config(default = 8.0)]
    pub alpha: f64,
    /// Target fraction T skipped: of (token, module) executions, or of parameters with
    /// `attn_share`.
    #[config(default = 0.25)]
    pub target: f64,
    /// Separate target for attention (then `mlp_target` is required too).
    #[config(default = "None")]
    pub attn_target: Option<f64>,
    /// Separate target for the MLPs.
    #[config(default = "None")]
    pub mlp_target: Option<f64>,
    /// Count parameters, not modules: the share of one layer's routed parameters that sit in
    /// attention (`attention / (attention + MLP)`). `None` weighs the two kinds equally, as the
    /// reference code does.
    #[config(default = "None")]
    pub attn_share: Option<f64>,
}

impl SparsityLossConfig {
    /// Rejects targets outside [0, 1) and negative weights.
    pub fn validate(&self) -> Result<()> {
        let check_target = |name: &'static str, t: f64| {
            if (0.0..1.0).contains(&t) {
                Ok(())
            } else {
                Err(DataError::InvalidSetting {
                    name,
                    value: t.to_string(),
                    expected: "a skip fraction in [0, 1)",
                }
                .into())
            }
        };
        check_target("target_sparsity", self.target)?;
        if !(self.alpha >= 0.0 && self.alpha.is_finite()) {
            return Err(DataError::InvalidSetting {
                name: "alpha",
                value: self.alpha.to_string(),
                expected: "a weight >= 0",
            }
            .into());
        }
        if let Some(share) = self.attn_share {
            if !(share > 0.0 && share < 1.0) {
                return Err(DataError::InvalidSetting {
                    name: "attn_share",
                    value: share.to_string(),
                    expected: "a fraction in (0, 1)",
                }
                .into());
            }
        }
        match (self.attn_target, self.mlp_target) {
            (None, None) => Ok(()),
            (Some(a), Some(m)) => {
                check_target("attn_target", a)?;
                check_target("mlp_target", m)
            }
            (a, m) => Err(DataError::InvalidSetting {
                name: "attn_target/mlp_target",
                value: format!("{a:?}/{m:?}"),
                expected: "both or neither",
            }
            .into()),
        }
    }
}

/// What the routed model is trained to match at every position.
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum TokenObjective {
    /// Cross-entropy with the corpus's next token (the paper's).
    #[default]
    #[serde(rename = "lm")]
    #[cfg_attr(feature = "clap", value(name = "lm"))]
    Lm,
    /// KL(dense ‖ routed) on the next-token distributions: the teacher is the same frozen
    /// base with every module executing and no adapter, so the corpus only supplies contexts.
    #[serde(rename = "kl")]
    #[cfg_attr(feature = "clap", value(name = "kl"))]
    Kl,
    /// The sum of the two.
    #[serde(rename = "lm+kl")]
    #[cfg_attr(feature = "clap", value(name = "lm+kl"))]
    LmKl,
}

/// Distillation from the dense model: which token objective, at which softmax temperature.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Distillation {
    pub objective: TokenObjective,
    /// Both distributions are softened by this temperature, and the KL scaled by its square
    /// so that its gradients keep their size (Hinton et al.); 1 compares them as they are.
    pub temperature: f64,
}

impl Default for Distillation {
    fn default() -> Self {
        Distillation {
            objective: TokenObjective::Lm,
            temperature: 1.0,
        }
    }
}

impl Distillation {
    /// Whether a step needs the dense teacher's logits.
    pub fn needs_teacher(&self) -> bool {
        self.objective != TokenObjective::Lm
    }

    pub fn validate(&self) -> Result<()> {
        if self.temperature > 0.0 && self.temperature.is_finite() {
            Ok(())
        } else {
            Err(DataError::InvalidSetting {
                name: "kl_temperature",
                value: self.temperature.to_string(),
                expected: "a temperature > 0",
            }
            .into())
        }
    }
}

/// The loss and what it is made of; scalars as 1-element tensors (they carry gradients).
pub struct LossParts<B: Backend> {
    pub total: Tensor<B, 1>,
    pub lm: Tensor<B, 1>,
    /// KL(dense ‖ routed) per token; zero when the step had no teacher.
    pub kl: Tensor<B, 1>,
    pub attn_skip: Tensor<B, 1>,
    pub mlp_skip: Tensor<B, 1>,
    /// The global skip rate the target is compared with: attention weighted by `attn_share`.
    pub skip: Tensor<B, 1>,
}

/// Mean next-token cross-entropy over the positions where `mask` is 1.
///
/// # Shapes
/// - logits: `[batch, seq, vocab]`; targets: `[batch, seq]`; mask: `[batch, seq]` (1 = real)
pub fn lm_loss<B: Backend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
    mask: Tensor<B, 2>,
) -> Tensor<B, 1> {
    let [b, t, _] = logits.dims();
    let log_probs = activation::log_softmax(logits, 2);
    let picked = log_probs
        .gather(2, targets.reshape([b, t, 1]))
        .reshape([b, t]);
    let count = mask.clone().sum().clamp_min(1.0);
    (picked * mask).sum().neg() / count
}

/// Mean `T²·KL(softmax(teacher/T) ‖ softmax(student/T))` over the positions where `mask` is
/// 1. The teacher is detached: no gradient reaches it, whatever it was computed from.
///
/// # Shapes
/// - student, teacher: `[batch, seq, vocab]`; mask: `[batch, seq]` (1 = real)
pub fn kl_to_teacher<B: Backend>(
    student: Tensor<B, 3>,
    teacher: Tensor<B, 3>,
    mask: Tensor<B, 2>,
    temperature: f64,
) -> Tensor<B, 1> {
    let [b, t, _] = student.dims();
    let log_p = activation::log_softmax(teacher.detach() / temperature, 2);
    let log_q = activation::log_softmax(student / temperature, 2);
    let per_token = (log_p.clone().exp() * (log_p - log_q))
        .sum_dim(2)
        .reshape([b, t]);
    let count = mask.clone().sum().clamp_min(1.0);
    (per_token * mask).sum() / count * (temperature * temperature)
}

/// Fraction of skipped executions over real tokens and the given layers' gates.
///
/// # Shapes
/// - gates: `[batch, seq]` each (1 = executed); mask: `[batch, seq]`
pub fn skip_rate<B: Backend>(gates: &[Tensor<B, 2>], mask: Tensor<B, 2>) -> Tensor<B, 1> {
    let device = mask.device();
    if gates.is_empty() {
        return Tensor::zeros([1], &device);
    }
    let count = mask.clone().sum().clamp_min(1.0) * gates.len() as f64;
    let skipped = gates
        .iter()
        .map(|g| ((g.clone().neg() + 1.0) * mask.clone()).sum())
        .reduce(|a, b| a + b)
        .expect("non-empty");
    skipped / count
}

/// `D + α·|T − skip_rate|` (or the per-kind variant with separate targets), `D` as
/// `distill` says; `skip_rate` weighs attention by `attn_share` (½ unless set).
/// `teacher` holds the dense model's logits, required unless `D` is the LM loss alone.
#[allow(clippy::too_many_arguments)]
pub fn skipgpt_loss<B: Backend>(
    cfg: &SparsityLossConfig,
    distill: &Distillation,
    logits: Tensor<B, 3>,
    teacher: Option<Tensor<B, 3>>,
    targets: Tensor<B, 2, Int>,
    mask: Tensor<B, 2>,
    attn_gates: &[Tensor<B, 2>],
    mlp_gates: &[Tensor<B, 2>],
) -> LossParts<B> {
    let kl = match teacher {
        Some(teacher) => kl_to_teacher(logits.clone(), teacher, mask.clone(), distill.temperature),
        None => {
            assert!(
                !distill.needs_teacher(),
                "a KL objective needs the teacher's logits"
            );
            Tensor::zeros([1], &mask.device())
        }
    };
    let lm = lm_loss(logits, targets, mask.clone());
    let token_loss = match distill.objective {
        TokenObjective::Lm => lm.clone(),
        TokenObjective::Kl => kl.clone(),
        TokenObjective::LmKl => lm.clone() + kl.clone(),
    };
    let attn_skip = skip_rate(attn_gates, mask.clone());
    let mlp_skip = skip_rate(mlp_gates, mask);
    let share = cfg.attn_share.unwrap_or(0.5);
    let skip = attn_skip.clone() * share + mlp_skip.clone() * (1.0 - share);
    let penalty = match (cfg.attn_target, cfg.mlp_target) {
        (Some(ta), Some(tm)) => {
            ((attn_skip.clone().neg() + ta).abs() + (mlp_skip.clone().neg() + tm).abs()) / 2.0
        }
        _ => skip.clone().neg().add_scalar(cfg.target).abs(),
    };
    LossParts {
        total: token_loss + penalty * cfg.alpha,
        lm,
        kl,
        attn_skip,
        mlp_skip,
        skip,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    type B = burn::backend::NdArray<f32>;

    fn scalar(t: Tensor<B, 1>) -> f32 {
        t.into_data().convert::<f32>().into_vec::<f32>().unwrap()[0]
    }

    #[test]
    fn validation_rejects_bad_settings() {
        assert!(SparsityLossConfig::new().validate().is_ok());
        for t in [1.0, -0.1, 1.5] {
            let err = SparsityLossConfig::new()
                .with_target(t)
                .validate()
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("target_sparsity") && err.contains(&t.to_string()),
                "{err}"
            );
        }
        let err = SparsityLossConfig::new()
            .with_alpha(-1.0)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("alpha"), "{err}");
        let err = SparsityLossConfig::new()
            .with_attn_target(Some(0.3))
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("both or neither"), "{err}");
        assert!(SparsityLossConfig::new()
            .with_attn_target(Some(0.3))
            .with_mlp_target(Some(1.2))
            .validate()
            .is_err());
        for share in [0.0, 1.0, f64::NAN] {
            let err = SparsityLossConfig::new()
                .with_attn_share(Some(share))
                .validate()
                .unwrap_err()
                .to_string();
            assert!(err.contains("attn_share"), "{err}");
        }
    }

    #[test]
    fn lm_loss_is_masked_cross_entropy() {
        let d = Default::default();
        // uniform logits over 4 classes: CE = ln 4 wherever counted
        let logits = Tensor::<B, 3>::zeros([1, 3, 4], &d);
        let targets = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![0i64, 1, 2], [1, 3]), &d);
        let mask = Tensor::<B, 2>::ones([1, 3], &d);
        assert!((scalar(lm_loss(logits, targets.clone(), mask)) - 4f32.ln()).abs() < 1e-6);
        // a confident right answer at position 0, padding elsewhere with wild logits
        let mut v = vec![0f32; 12];
        v[0] = 20.0;
        v[5] = -30.0;
        v[10] = 50.0;
        let logits = Tensor::<B, 3>::from_data(TensorData::new(v, [1, 3, 4]), &d);
        let mask = Tensor::<B, 2>::from_data(TensorData::new(vec![1f32, 0.0, 0.0], [1, 3]), &d);
        assert!(scalar(lm_loss(logits, targets, mask)) < 1e-6);
    }

    #[test]
    fn skip_rate_counts_real_tokens_over_layers() {
        let d = Default::default();
        let g1 = Tensor::<B, 2>::from_data(TensorData::new(vec![1f32, 0.0, 0.0, 0.0], [2, 2]), &d);
        let g2 = Tensor::<B, 2>::from_data(TensorData::new(vec![1f32, 1.0, 0.0, 1.0], [2, 2]), &d);
        let all = Tensor::<B, 2>::ones([2, 2], &d);
        assert!((scalar(skip_rate(&[g1.clone(), g2.clone()], all)) - 4.0 / 8.0).abs() < 1e-6);
        // padding: the last token of each row does not count
        let mask =
            Tensor::<B, 2>::from_data(TensorData::new(vec![1f32, 0.0, 1.0, 0.0], [2, 2]), &d);
        assert!((scalar(skip_rate(&[g1, g2], mask)) - 2.0 / 4.0).abs() < 1e-6);
    }

    #[test]
    fn penalty_is_alpha_times_distance_to_target() {
        let d = Default::default();
        let logits = Tensor::<B, 3>::zeros([1, 2, 4], &d);
        let targets = Tensor::<B, 2, Int>::zeros([1, 2], &d);
        let mask = Tensor::<B, 2>::ones([1, 2], &d);
        let attn = [Tensor::<B, 2>::from_data(
            TensorData::new(vec![0f32, 0.0], [1, 2]),
            &d,
        )]; // skip 1.0
        let mlp = [Tensor::<B, 2>::ones([1, 2], &d)]; // skip 0.0
        let loss = |cfg: &SparsityLossConfig| {
            skipgpt_loss(
                cfg,
                &Distillation::default(),
                logits.clone(),
                None,
                targets.clone(),
                mask.clone(),
                &attn,
                &mlp,
            )
        };
        let cfg = SparsityLossConfig::new().with_alpha(8.0).with_target(0.25);
        let parts = loss(&cfg);
        assert!((scalar(parts.attn_skip) - 1.0).abs() < 1e-6);
        assert!((scalar(parts.mlp_skip)).abs() < 1e-6);
        // overall skip 0.5: 8 * |0.25 - 0.5| = 2
        assert!((scalar(parts.total) - scalar(parts.lm) - 2.0).abs() < 1e-5);
        let parts = loss(&cfg.with_attn_target(Some(0.9)).with_mlp_target(Some(0.3)));
        // 8 * (|0.9 - 1| + |0.3 - 0|) / 2 = 1.6
        assert!((scalar(parts.total) - scalar(parts.lm) - 1.6).abs() < 1e-5);
        // parameters counted: attention holds 1/5 of them, so skipping every attention and no
        // MLP skips 20%: 8 * |0.25 - 0.2| = 0.4
        let parts = loss(
            &SparsityLossConfig::new()
                .with_target(0.25)
                .with_attn_share(Some(0.2)),
        );
        assert!((scalar(parts.skip) - 0.2).abs() < 1e-6);
        assert!((scalar(parts.total) - scalar(parts.lm) - 0.4).abs() < 1e-5);
    }

    /// KL(p ‖ q) of two 2-way distributions given as logits, in f64, written out by hand.
    fn kl_by_hand(teacher: [f64; 2], student: [f64; 2], temperature: f64) -> f64 {
        let softmax = |l: [f64; 2]| {
            let e = [(l[0] / temperature).exp(), (l[1] / temperature).exp()];
            [e[0] / (e[0] + e[1]), e[1] / (e[0] + e[1])]
        };
        let (p, q) = (softmax(teacher), softmax(student));
        temperature * temperature * (p[0] * (p[0] / q[0]).ln() + p[1] * (p[1] / q[1]).ln())
    }

    #[test]
    fn kl_to_teacher_matches_the_hand_computed_divergence() {
        let d = Default::default();
        // teacher p = (1/4, 3/4), student q = (1/2, 1/2): KL = ¼ln½ + ¾ln(3/2) ≈ 0.1308
        let teacher = [0.0, 3f64.ln()];
        let student = [0.0, 0.0];
        assert!((kl_by_hand(teacher, student, 1.0) - 0.130812).abs() < 1e-6);
        let logits = |l: [f64; 2]| {
            Tensor::<B, 3>::from_data(
                TensorData::new(vec![l[0] as f32, l[1] as f32, 5.0, -5.0], [1, 2, 2]),
                &d,
            )
        };
        // position 1 is padding (and equal in both, which would add nothing anyway)
        let mask = Tensor::<B, 2>::from_data(TensorData::new(vec![1f32, 0.0], [1, 2]), &d);
        for temperature in [1.0, 2.0, 0.5] {
            let kl = scalar(kl_to_teacher(
                logits(student),
                logits(teacher),
                mask.clone(),
                temperature,
            ));
            let expected = kl_by_hand(teacher, student, temperature);
            assert!(
                (kl as f64 - expected).abs() < 1e-5,
                "T {temperature}: {kl} against {expected}"
            );
        }
        // a model against itself diverges by nothing
        let same = scalar(kl_to_teacher(logits(teacher), logits(teacher), mask, 1.0));
        assert!(same.abs() < 1e-6, "{same}");
    }

    #[test]
    fn the_teacher_gets_no_gradient_and_the_student_does() {
        type A = burn::backend::Autodiff<B>;
        let d = Default::default();
        let values = |seed: f32| {
            TensorData::new(
                (0..24)
                    .map(|i| ((i as f32 + seed) * 0.37).sin() * 3.0)
                    .collect::<Vec<f32>>(),
                [1, 3, 8],
            )
        };
        let student = Tensor::<A, 3>::from_data(values(0.0), &d).require_grad();
        let teacher = Tensor::<A, 3>::from_data(values(1.0), &d).require_grad();
        let mask = Tensor::<A, 2>::ones([1, 3], &d);
        let grads = kl_to_teacher(student.clone(), teacher.clone(), mask, 2.0).backward();
        assert!(teacher.grad(&grads).is_none());
        let g = student
            .grad(&grads)
            .expect("the student's logits get a gradient");
        let g: Vec<f32> = g.into_data().into_vec().unwrap();
        assert!(g.iter().any(|x| x.abs() > 1e-4), "{g:?}");
    }

    #[test]
    fn the_token_objective_decides_what_the_total_counts() {
        let d = Default::default();
        let logits = Tensor::<B, 3>::zeros([1, 2, 2], &d);
        let teacher = Tensor::<B, 3>::from_data(
            TensorData::new(vec![0.0f32, 3f32.ln(), 0.0, 3f32.ln()], [1, 2, 2]),
            &d,
        );
        let targets = Tensor::<B, 2, Int>::zeros([1, 2], &d);
        let mask = Tensor::<B, 2>::ones([1, 2], &d);
        let gates = [Tensor::<B, 2>::ones([1, 2], &d)];
        let cfg = SparsityLossConfig::new().with_alpha(0.0);
        let total = |objective| {
            let distill = Distillation {
                objective,
                temperature: 1.0,
            };
            let parts = skipgpt_loss(
                &cfg,
                &distill,
                logits.clone(),
                Some(teacher.clone()),
                targets.clone(),
                mask.clone(),
                &gates,
                &gates,
            );
            (scalar(parts.total), scalar(parts.lm), scalar(parts.kl))
        };
        let (lm_total, lm, kl) = total(TokenObjective::Lm);
        assert!((lm - 2f32.ln()).abs() < 1e-6 && (kl - 0.130812).abs() < 1e-5);
        assert!((lm_total - lm).abs() < 1e-6);
        assert!((total(TokenObjective::Kl).0 - kl).abs() < 1e-6);
        assert!((total(TokenObjective::LmKl).0 - (lm + kl)).abs() < 1e-6);
        assert!(Distillation {
            objective: TokenObjective::Kl,
            temperature: 0.0
        }
        .validate()
        .is_err());
    }
}
