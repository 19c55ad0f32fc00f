//! What the engine did, next to what the dense model would have done: floating-point work and
//! weight bytes read, counted apart from the compute by a [`Ledger`] the layer steps report to.

use crate::config::LlamaConfig;

/// Work done by the engine, next to what the dense model would have done for the same tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineStats {
    /// Token positions processed.
    pub tokens: usize,
    /// (token, layer) attention executions, and how many there were in all.
    pub attn_executed: usize,
    pub attn_total: usize,
    pub mlp_executed: usize,
    pub mlp_total: usize,
    /// Floating-point operations (2 per multiply-add) of the decoder and head.
    pub flops: f64,
    pub dense_flops: f64,
    /// Weight bytes read: a module's weights are read once per forward call if any token uses
    /// them (4 bytes per parameter, 2 for half-precision weights).
    pub weight_bytes: f64,
    pub dense_weight_bytes: f64,
}

impl EngineStats {
    /// Dense cost / routed cost in FLOPs: the speedup perfect skipping would give.
    pub fn ideal_speedup(&self) -> f64 {
        self.dense_flops / self.flops.max(1.0)
    }

    /// Dense weight bytes / weight bytes read: the speedup perfect skipping would give where
    /// reading the weights, not arithmetic, bounds the time (decoding a batch on most hardware).
    /// A module's weights are saved only when no token of the call executes it.
    pub fn weight_ideal_speedup(&self) -> f64 {
        self.dense_weight_bytes / self.weight_bytes.max(1.0)
    }

    pub fn attn_skip(&self) -> f64 {
        1.0 - self.attn_executed as f64 / self.attn_total.max(1) as f64
    }

    pub fn mlp_skip(&self) -> f64 {
        1.0 - self.mlp_executed as f64 / self.mlp_total.max(1) as f64
    }

    pub fn add(&mut self, o: &EngineStats) {
        self.tokens += o.tokens;
        self.attn_executed += o.attn_executed;
        self.attn_total += o.attn_total;
        self.mlp_executed += o.mlp_executed;
        self.mlp_total += o.mlp_total;
        self.flops += o.flops;
        self.dense_flops += o.dense_flops;
        self.weight_bytes += o.weight_bytes;
        self.dense_weight_bytes += o.dense_weight_bytes;
    }
}

/// FLOPs and bytes of the pieces of one layer, per token.
struct Costs {
    kv_proj: f64,
    q_o_proj: f64,
    /// Per (query, visible key): scores and weighted values over all heads.
    attn_per_key: f64,
    mlp: f64,
    router: f64,
    head: f64,
    kv_bytes: f64,
    attn_bytes: f64,
    mlp_bytes: f64,
    head_bytes: f64,
}

impl Costs {
    fn new(c: &LlamaConfig, weight_size: f64) -> Self {
        let h = c.hidden_size as f64;
        let q = (c.num_attention_heads * c.head_dim) as f64;
        let kv = (c.num_key_value_heads * c.head_dim) as f64;
        let i = c.intermediate_size as f64;
        let v = c.vocab_size as f64;
        let kv_bias = if c.qkv_bias { 2.0 * kv } else { 0.0 };
        Costs {
            kv_proj: 2.0 * 2.0 * h * kv,
            q_o_proj: 2.0 * 2.0 * h * q,
            attn_per_key: 2.0 * 2.0 * q,
            mlp: 2.0 * 3.0 * h * i,
            router: 2.0 * 2.0 * h,
            head: 2.0 * h * v,
            kv_bytes: weight_size * (2.0 * h * kv + kv_bias),
            attn_bytes: weight_size * c.attention_params() as f64,
            mlp_bytes: weight_size * c.mlp_params() as f64,
            head_bytes: weight_size * h * v,
        }
    }
}

/// Counts one engine call's work into its [`EngineStats`], one line per step: the layer loop
/// reports what executed, the ledger knows what each piece costs.
pub(super) struct Ledger {
    cost: Costs,
    /// The dense model's attention over the call's keys: every token attends to every earlier
    /// position (within the window).
    dense_attn_flops: f64,
    pub(super) stats: EngineStats,
}

impl Ledger {
    /// A ledger for tokens at `positions`, with weights of `weight_size` bytes each.
    pub(super) fn new(config: &LlamaConfig, weight_size: f64, positions: &[usize]) -> Self {
        let cost = Costs::new(config, weight_size);
        let window = config.sliding_window.unwrap_or(usize::MAX);
        let dense_attn_flops = positions
            .iter()
            .map(|&p| (p + 1).min(window) as f64 * cost.attn_per_key)
            .sum();
        Ledger {
            cost,
            dense_attn_flops,
            stats: EngineStats {
                tokens: positions.len(),
                ..Default::default()
            },
        }
    }

    /// One layer's attention: `n` rows, `kv_rows` of them projected to keys and values,
    /// `executed` of them with a query and the output projection.
    pub(super) fn attention(&mut self, n: usize, kv_rows: usize, executed: usize) {
        let (c, s) = (&self.cost, &mut self.stats);
        s.attn_total += n;
        s.attn_executed += executed;
        s.flops += kv_rows as f64 * c.kv_proj + executed as f64 * c.q_o_proj;
        s.dense_flops += n as f64 * (c.kv_proj + c.q_o_proj) + self.dense_attn_flops;
        s.dense_weight_bytes += c.attn_bytes;
        if kv_rows > 0 {
            s.weight_bytes += c.kv_bytes;
        }
        if executed > 0 {
            s.weight_bytes += c.attn_bytes - c.kv_bytes;
        }
    }

    /// Scores and weighted values over `visible` (query, key) pairs.
    pub(super) fn attended(&mut self, visible: usize) {
        self.stats.flops += visible as f64 * self.cost.attn_per_key;
    }

    /// One layer's MLP: `n` rows, `executed` of them through it.
    pub(super) fn mlp(&mut self, n: usize, executed: usize) {
        let (c, s) = (&self.cost, &mut self.stats);
        s.mlp_total += n;
        s.mlp_executed += executed;
        s.flops += executed as f64 * c.mlp;
        s.dense_flops += n as f64 * c.mlp;
        s.dense_weight_bytes += c.mlp_bytes;
        if executed > 0 {
            s.weight_bytes += c.mlp_bytes;
        }
    }

    /// `routers` routers deciding for `n` rows.
    pub(super) fn routers(&mut self, n: usize, routers: usize) {
        self.stats.flops += (n * routers) as f64 * self.cost.router;
    }

    /// The output head over `rows` rows.
    pub(super) fn head(&mut self, rows: usize) {
        let (c, s) = (&self.cost, &mut self.stats);
        s.flops += rows as f64 * c.head;
        s.dense_flops += rows as f64 * c.head;
        s.weight_bytes += c.head_bytes;
        s.dense_weight_bytes += c.head_bytes;
    }
}
