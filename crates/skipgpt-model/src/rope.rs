//! Rotary position embeddings in the Hugging Face ("rotate half") layout.
//!
//! HF permutes q/k projection weights at conversion time so that the two halves of each head,
//! not interleaved pairs, form the rotated 2-D planes. We follow that layout so HF weights load
//! unchanged. Frequencies are computed in f32 the way transformers does, so long contexts match
//! the reference to the last bits rather than being "more exact" than it.

use burn::tensor::{backend::Backend, Tensor, TensorData};

use crate::config::{LlamaConfig, RopeScaling};

/// Produces the cos/sin tables for a range of positions.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    head_dim: usize,
    theta: f64,
    scaling: RopeScaling,
    max_position_embeddings: usize,
    /// Frequencies for every sequence that does not trigger dynamic NTK rescaling.
    base_inv_freq: Vec<f32>,
}

impl RotaryEmbedding {
    pub fn new(config: &LlamaConfig) -> Self {
        let mut rope = RotaryEmbedding {
            head_dim: config.head_dim,
            theta: config.rope_theta,
            scaling: config.rope_scaling.clone(),
            max_position_embeddings: config.max_position_embeddings,
            base_inv_freq: Vec::new(),
        };
        rope.base_inv_freq = rope.inv_freq(0);
        rope
    }

    /// `1 / theta^(2i/d)`, rescaled as the config asks. `seq_len` only matters for dynamic NTK.
    pub fn inv_freq(&self, seq_len: usize) -> Vec<f32> {
        let dim = self.head_dim;
        let plain = |theta: f64| -> Vec<f32> {
            (0..dim)
                .step_by(2)
                .map(|i| 1.0f32 / (theta as f32).powf(i as f32 / dim as f32))
                .collect()
        };
        match &self.scaling {
            RopeScaling::Default => plain(self.theta),
            RopeScaling::Linear { factor } => plain(self.theta)
                .into_iter()
                .map(|f| f / *factor as f32)
                .collect(),
            RopeScaling::Dynamic { factor } => {
                // transformers' `_compute_dynamic_ntk_parameters`: the base only grows once the
                // sequence is longer than the pretraining context.
                let max = self.max_position_embeddings as f64;
                let seq = (seq_len as f64).max(max);
                let d = dim as f64;
                let theta =
                    self.theta * ((factor * seq / max) - (factor - 1.0)).powf(d / (d - 2.0));
                plain(theta)
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let (factor, low, high) = (
                    *factor as f32,
                    *low_freq_factor as f32,
                    *high_freq_factor as f32,
                );
                let old_len = *original_max_position_embeddings as f32;
                let low_freq_wavelen = old_len / low;
                let high_freq_wavelen = old_len / high;
                plain(self.theta)
                    .into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen < high_freq_wavelen {
                            f
                        } else if wavelen > low_freq_wavelen {
                            f / factor
                        } else {
                            let smooth = (old_len / wavelen - low) / (high - low);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }

    /// cos and sin for arbitrary positions, as [`RotaryEmbedding::cos_sin`] computes them for a
    /// call that reaches `max(positions) + 1` (what dynamic scaling depends on).
    ///
    /// # Shapes
    /// - output: two tensors `[positions.len(), head_dim]`
    pub fn cos_sin_at<B: Backend>(
        &self,
        positions: &[usize],
        device: &B::Device,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let end = positions.iter().max().map_or(0, |p| p + 1);
        let dynamic;
        let inv_freq = match self.scaling {
            // HF recomputes the frequencies from the largest position in the call.
            RopeScaling::Dynamic { .. } if end > self.max_position_embeddings => {
                dynamic = self.inv_freq(end);
                &dynamic
            }
            _ => &self.base_inv_freq,
        };
        let half = self.head_dim / 2;
        let mut cos = Vec::with_capacity(positions.len() * self.head_dim);
        let mut sin = Vec::with_capacity(positions.len() * self.head_dim);
        for &pos in positions {
            // emb = cat(freqs, freqs): both halves of a head share one frequency per plane.
            for _ in 0..2 {
                for f in inv_freq.iter().take(half) {
                    let angle = pos as f32 * f;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        let shape = [positions.len(), self.head_dim];
        (
            Tensor::from_data(TensorData::new(cos, shape), device),
            Tensor::from_data(TensorData::new(sin, shape), device),
        )
    }

    /// cos and sin for positions `start..start + len`.
    ///
    /// # Shapes
    /// - output: two tensors `[len, head_dim]`
    pub fn cos_sin<B: Backend>(
        &self,
        start: usize,
        len: usize,
        device: &B::Device,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let positions: Vec<usize> = (start..start + len).collect();
        self.cos_sin_at(&positions, device)
    }
}

/// A row-per-token table (`cos` or `sin`, `[rows, head_dim]`) repeated for each of `heads`
/// heads, `[rows, heads * head_dim]`: the layout [`apply_rotary_rows`] takes. Materialised
/// rather than broadcast, because a broadcast operand sends some backends (burn-flex) down
/// their element-by-element strided path. The sparse engine repeats its tables once per
/// forward pass; the gated path once per layer call (a copy as large as the projection's
/// output).
pub fn repeat_for_heads<B: Backend>(table: &Tensor<B, 2>, heads: usize) -> Tensor<B, 2> {
    table.clone().repeat_dim(1, heads)
}

/// Rotates `x` by the given tables, `x * cos + rotate_half(x) * sin`, on a token-major
/// layout, each row at its own position (no transposition to heads-first, so no strided
/// copy).
///
/// # Shapes
/// - x: `[rows, heads, head_dim]`
/// - cos, sin: `[rows, heads * head_dim]` ([`repeat_for_heads`])
/// - output: like x
pub fn apply_rotary_rows<B: Backend>(
    x: Tensor<B, 3>,
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
) -> Tensor<B, 3> {
    let shape = x.dims();
    let half = shape[2] / 2;
    let x1 = x.clone().narrow(2, 0, half);
    let x2 = x.clone().narrow(2, half, half);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 2);
    x * cos.reshape(shape) + rotated * sin.reshape(shape)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(scaling: RopeScaling) -> LlamaConfig {
        let mut c = LlamaConfig::tiny(32);
        c.rope_scaling = scaling;
        c
    }

    #[test]
    fn default_frequencies() {
        let f = RotaryEmbedding::new(&cfg(RopeScaling::Default)).inv_freq(0);
        assert_eq!(f.len(), 8);
        assert_eq!(f[0], 1.0);
        assert!((f[1] - 10000f32.powf(-2.0 / 16.0)).abs() < 1e-7);
    }

    #[test]
    fn linear_divides_every_frequency() {
        let base = RotaryEmbedding::new(&cfg(RopeScaling::Default)).inv_freq(0);
        let lin = RotaryEmbedding::new(&cfg(RopeScaling::Linear { factor: 4.0 })).inv_freq(0);
        for (a, b) in base.iter().zip(&lin) {
            assert!((a / 4.0 - b).abs() < 1e-9);
        }
    }

    #[test]
    fn dynamic_only_changes_past_the_context() {
        let c = cfg(RopeScaling::Dynamic { factor: 2.0 });
        let rope = RotaryEmbedding::new(&c);
        let base = RotaryEmbedding::new(&cfg(RopeScaling::Default)).inv_freq(0);
        assert_eq!(rope.inv_freq(10), base);
        let long = rope.inv_freq(c.max_position_embeddings * 2);
        assert_eq!(long[0], 1.0);
        assert!(long[1] < base[1]);
    }

    #[test]
    fn llama3_keeps_high_and_divides_low_frequencies() {
        let c = cfg(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64,
        });
        let base = RotaryEmbedding::new(&cfg(RopeScaling::Default)).inv_freq(0);
        let l3 = RotaryEmbedding::new(&c).inv_freq(0);
        // wavelength 2π < 64/4: untouched; the lowest frequency's wavelength ≫ 64: divided by 8.
        assert_eq!(l3[0], base[0]);
        assert!((l3[7] - base[7] / 8.0).abs() < 1e-9);
        // the ramp lies in between
        for (b, l) in base.iter().zip(&l3) {
            assert!(*l <= *b && *l >= b / 8.0 - 1e-12);
        }
    }
}
