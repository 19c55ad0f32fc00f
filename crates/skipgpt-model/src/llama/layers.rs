//! The modules of a LLaMA decoder layer, named like the Hugging Face weight keys: RMSNorm,
//! grouped-query attention with rotary positions, and the SwiGLU MLP. How they are loaded and
//! saved is in [`super::weights`]; how a layer gates them, in [`super::block`].

use burn::module::{Module, Param};
use burn::tensor::{activation, backend::Backend, Bool, Tensor};

use crate::config::LlamaConfig;
use crate::linear::init_linear;
use crate::lora::LoraLinear;
use crate::rope::{apply_rotary_rows, repeat_for_heads};

/// Root-mean-square layer norm: `x / sqrt(mean(x²) + eps) * weight`.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    pub fn new(dim: usize, eps: f64, device: &B::Device) -> Self {
        RmsNorm {
            weight: Param::from_tensor(Tensor::ones([dim], device)),
            eps,
        }
    }

    /// # Shapes
    /// - x: `[..., dim]`
    /// - output: like x
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        crate::dispatch::rms_norm(x, self.weight.val(), self.eps)
    }
}

/// Added to an attention score to hide a key. Finite, so that two masks can be summed and a
/// row with every key hidden still gives a finite (and then gated-off) output.
pub const MASKED: f32 = -1e9;

/// Per-forward inputs every layer shares: rotary tables and the additive attention mask.
pub struct AttentionContext<B: Backend> {
    pub cos: Tensor<B, 2>,
    pub sin: Tensor<B, 2>,
    /// `[query, key]`: 0 where a query may look, [`MASKED`] where it may not.
    pub mask: Tensor<B, 2>,
}

impl<B: Backend> AttentionContext<B> {
    /// `x` (`[batch, seq, heads * head_dim]`, a projection's output) rotated, as
    /// `[batch, heads, seq, head_dim]`. The rotation runs token-major on tables of x's own
    /// size ([`repeat_for_heads`], then once per batch row; a copy as large as `x`, cheap
    /// next to the projection), where it is plain elementwise arithmetic: tables broadcast
    /// over a head-major view would send some backends (burn-flex) down their
    /// element-by-element strided path.
    fn rotate(&self, x: Tensor<B, 3>, heads: usize) -> Tensor<B, 4> {
        let [b, t, width] = x.dims();
        let hd = width / heads;
        let table =
            |per_position: &Tensor<B, 2>| repeat_for_heads(per_position, heads).repeat_dim(0, b);
        apply_rotary_rows(
            x.reshape([b * t, heads, hd]),
            table(&self.cos),
            table(&self.sin),
        )
        .reshape([b, t, heads, hd])
        .swap_dims(1, 2)
    }
}

/// Multi-head attention with grouped key/value heads and rotary positions.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q_proj: LoraLinear<B>,
    pub k_proj: LoraLinear<B>,
    pub v_proj: LoraLinear<B>,
    pub o_proj: LoraLinear<B>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl<B: Backend> Attention<B> {
    pub(super) fn init(c: &LlamaConfig, device: &B::Device) -> Self {
        let (h, q, kv) = (
            c.hidden_size,
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        Attention {
            q_proj: init_linear(h, q, c.qkv_bias, device).into(),
            k_proj: init_linear(h, kv, c.qkv_bias, device).into(),
            v_proj: init_linear(h, kv, c.qkv_bias, device).into(),
            o_proj: init_linear(q, h, c.o_bias, device).into(),
            num_heads: c.num_attention_heads,
            num_kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
        }
    }

    /// Keys and values of `x`, rotated.
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]`
    /// - output: `[batch, kv_heads, seq, head_dim]` twice
    fn project_kv(
        &self,
        x: Tensor<B, 3>,
        ctx: &AttentionContext<B>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [b, t, _] = x.dims();
        let k = ctx.rotate(self.k_proj.forward(x.clone()), self.num_kv_heads);
        let v = self
            .v_proj
            .forward(x)
            .reshape([b, t, self.num_kv_heads, self.head_dim])
            .swap_dims(1, 2);
        (k, v)
    }

    /// # Shapes
    /// - x: `[batch, seq, hidden]` (already normed)
    /// - output: `[batch, seq, hidden]`
    ///
    /// Every query attends over the whole sequence `x` (as the mask allows): this path keeps
    /// no cache. Incremental decoding is the sparse engine's ([`crate::sparse`]).
    ///
    /// `visible` (`[batch, seq]`, 1 or 0) hides the keys of the tokens marked 0 from every
    /// query (`kv_policy = drop`).
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        ctx: &AttentionContext<B>,
        visible: Option<Tensor<B, 2>>,
    ) -> Tensor<B, 3> {
        let [b, t, _] = x.dims();
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = ctx.rotate(self.q_proj.forward(x.clone()), nh);
        let (k, v) = self.project_kv(x, ctx);
        let n_rep = nh / nkv;
        let q = q.reshape([b, nkv, n_rep * t, hd]);
        let mut mask = ctx.mask.clone().repeat_dim(0, n_rep).unsqueeze::<4>();
        if let Some(visible) = visible {
            let hidden_keys = (visible.neg() + 1.0) * MASKED;
            mask = mask + hidden_keys.reshape([b, 1, 1, t]);
        }
        let out = grouped_query_attention(q, k, v, Some(KeyMask::Additive(mask)), nh);
        self.o_proj.forward(out)
    }
}

/// Which keys each query row of [`grouped_query_attention`] may not look at.
pub(crate) enum KeyMask<B: Backend> {
    /// Added to the scores: 0 where a query may look, [`MASKED`] where it may not. A row
    /// with every key hidden stays finite (the gated path's `kv_policy = drop` can hide every
    /// key of a token whose attention is gated off).
    Additive(Tensor<B, 4>),
    /// `true` where a query may not look. The backend's kernel skips hidden keys instead of
    /// adding to their scores and exponentiating (an additive mask sends every hidden score
    /// through `exp`'s underflow path). Every row must see at least one key: backends differ
    /// on a row with none.
    Hidden(Tensor<B, 4, Bool>),
}

/// The attention of both forward passes, the gated one above and the sparse engine's.
///
/// Grouped-query attention without copying K/V: the `n_rep` query heads that share a
/// key/value head come stacked along the query axis.
///
/// Inference is one call of the backend's attention op (scaled by 1/√hd): burn-flex runs it
/// as two gemms per head or tiled with an online softmax, the CubeCL GPU backends with their
/// own kernels (a flash kernel when there is no mask). Under autodiff the same op would run
/// burn's decomposition, which differentiates through the softmax's row maximum; the gradient
/// is the same in exact arithmetic but not in floats (it moved the demo's trained routers),
/// so training spells the decomposition out with the maximum detached, as
/// `activation::softmax` does.
///
/// # Shapes
/// - q: `[b, kv_heads, n_rep * t, hd]`
/// - k, v: `[b, kv_heads, s, hd]`
/// - mask: `[b or 1, 1, n_rep * t, s]` (one row per stacked query row, shared by every
///   key/value head); `None` when every query sees every key
/// - output: `[b, t, heads * hd]`, `heads = kv_heads * n_rep`
pub(crate) fn grouped_query_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<KeyMask<B>>,
    heads: usize,
) -> Tensor<B, 3> {
    let [b, kv_heads, rows, hd] = q.dims();
    let t = rows * kv_heads / heads;
    let out = if B::ad_enabled(&q.device()) {
        let scores = q.matmul(k.swap_dims(2, 3)) * (hd as f64).powf(-0.5);
        let scores = match mask {
            Some(KeyMask::Additive(mask)) => scores + mask,
            Some(KeyMask::Hidden(hidden)) => scores.mask_fill(hidden, MASKED),
            None => scores,
        };
        activation::softmax(scores, 3).matmul(v)
    } else {
        let (hidden, additive) = match mask {
            Some(KeyMask::Additive(mask)) => (None, Some(mask)),
            Some(KeyMask::Hidden(hidden)) => (Some(hidden), None),
            None => (None, None),
        };
        burn::tensor::module::attention(q, k, v, hidden, additive, Default::default())
    };
    out.reshape([b, heads, t, hd])
        .swap_dims(1, 2)
        .reshape([b, t, heads * hd])
}

/// SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub gate_proj: LoraLinear<B>,
    pub up_proj: LoraLinear<B>,
    pub down_proj: LoraLinear<B>,
}

impl<B: Backend> Mlp<B> {
    pub(super) fn init(c: &LlamaConfig, device: &B::Device) -> Self {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        Mlp {
            gate_proj: init_linear(h, i, c.mlp_bias, device).into(),
            up_proj: init_linear(h, i, c.mlp_bias, device).into(),
            down_proj: init_linear(i, h, c.mlp_bias, device).into(),
        }
    }

    /// # Shapes
    /// - x: `[..., hidden]`
    /// - output: `[..., hidden]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let [gate, up]: [Tensor<B, D>; 2] =
            LoraLinear::forward_many(&[&self.gate_proj, &self.up_proj], x)
                .try_into()
                .expect("two projections");
        self.down_proj.forward(crate::dispatch::swiglu(gate, up))
    }
}
