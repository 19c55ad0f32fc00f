//! Attaching SkipGPT routers to a model: fresh ones (the paper's start or the execute-biased
//! one), constant ones for static pruning, or trained ones from `routers.safetensors`; saving
//! them; freezing everything else for stage 1.

use std::collections::BTreeMap;

use burn::module::Module;
use burn::tensor::backend::Backend;

use super::{LayerRouting, LlamaForCausalLM};
use crate::error::{ModelError, Result};
use crate::io::safetensors_io::{OwnedTensor, WeightSet};
use crate::router::{
    router_names, KvPolicy, MlpRouterInput, Router, RouterInit, Routing, RoutingConfig,
};

impl<B: Backend> LlamaForCausalLM<B> {
    /// Adds freshly initialised routers (replacing any; the paper's start, [`RouterInit::Paper`])
    /// and switches to deterministic routing.
    pub fn with_new_routers(self, routing: RoutingConfig) -> Self {
        self.with_new_routers_from(routing, RouterInit::Paper)
    }

    /// New routers for every layer, started as `init` says.
    pub fn with_new_routers_from(mut self, routing: RoutingConfig, init: RouterInit) -> Self {
        let device = self.device();
        let h = self.config.hidden_size;
        let (_, mlp_slot) = router_names(routing.granularity);
        for layer in self.model.layers.iter_mut() {
            layer.attn_router = Some(Router::init(routing.router, h, init, &device));
            layer.mlp_router = mlp_slot.map(|_| Router::init(routing.router, h, init, &device));
        }
        self.routing_config = Some(routing);
        self.routing = Routing::Deterministic;
        self
    }

    /// Static pruning as routing: layer `i` runs attention iff `attn_exec[i]` and its MLP iff
    /// `mlp_exec[i]`, for every token (constant routers). Skipped attention leaves no keys or
    /// values (`kv_policy = drop`): nothing reads them, so nothing computes or caches them.
    pub fn with_static_routes(mut self, attn_exec: &[bool], mlp_exec: &[bool]) -> Result<Self> {
        let layers = self.config.num_hidden_layers;
        if attn_exec.len() != layers || mlp_exec.len() != layers {
            return Err(ModelError::InvalidInput(format!(
                "static routes for {} attention and {} MLP modules, the model has {layers} layers",
                attn_exec.len(),
                mlp_exec.len()
            )));
        }
        let device = self.device();
        let h = self.config.hidden_size;
        for (i, layer) in self.model.layers.iter_mut().enumerate() {
            layer.attn_router = Some(Router::constant(attn_exec[i], h, &device));
            layer.mlp_router = Some(Router::constant(mlp_exec[i], h, &device));
        }
        let (pa, pm) = (self.config.attention_params(), self.config.mlp_params());
        let skipped: usize = attn_exec.iter().filter(|&&e| !e).count() * pa
            + mlp_exec.iter().filter(|&&e| !e).count() * pm;
        self.routing_config = Some(
            RoutingConfig::new()
                .with_kv_policy(KvPolicy::Drop)
                .with_mlp_router_input(MlpRouterInput::BlockInput)
                .with_target_sparsity(skipped as f64 / (layers * (pa + pm)) as f64),
        );
        self.routing = Routing::Deterministic;
        Ok(self)
    }

    /// Loads routers saved by [`LlamaForCausalLM::export_routers`] (`routers.safetensors`).
    /// Routers made for another model (another layer count or hidden size) are refused with
    /// the mismatch named.
    pub fn load_routers(mut self, routing: RoutingConfig, w: &WeightSet) -> Result<Self> {
        self.check_routers_fit(w)?;
        let device = self.device();
        let h = self.config.hidden_size;
        let (attn_slot, mlp_slot) = router_names(routing.granularity);
        for (i, layer) in self.model.layers.iter_mut().enumerate() {
            let load = |name: &str| {
                Router::load(
                    routing.router,
                    h,
                    w,
                    &format!("model.layers.{i}.{name}"),
                    &device,
                )
            };
            layer.attn_router = Some(load(attn_slot)?);
            layer.mlp_router = mlp_slot.map(load).transpose()?;
        }
        self.routing_config = Some(routing);
        self.routing = Routing::Deterministic;
        Ok(self)
    }

    /// Whether the routers of `w` were made for a model of this one's layer count and hidden
    /// size: every router reads the hidden state, so a matrix's input width is the hidden size.
    fn check_routers_fit(&self, w: &WeightSet) -> Result<()> {
        let file = w
            .paths()
            .first()
            .map_or(String::new(), |p| format!("{}: ", p.display()));
        let layer_of = |name: &str| {
            let rest = name.strip_prefix("model.layers.")?;
            rest.split('.').next()?.parse::<usize>().ok()
        };
        let layers = w.names().filter_map(layer_of).max().map_or(0, |l| l + 1);
        let expected = self.config.num_hidden_layers;
        if layers != expected {
            return Err(ModelError::InvalidInput(format!(
                "{file}routers for {layers} layers, but the model has {expected}: these routers were made for another model"
            )));
        }
        let h = self.config.hidden_size;
        for name in w.names().filter(|n| n.ends_with(".weight")) {
            let shape = w.shape(name)?;
            if shape.len() == 2 && !name.contains(".fc2.") && shape[1] != h {
                return Err(ModelError::InvalidInput(format!(
                    "{file}router `{name}` reads {} values, but the model's hidden size is {h}: these routers were made for another model",
                    shape[1]
                )));
            }
        }
        Ok(())
    }

    /// The router weights under their checkpoint names (f32).
    pub fn export_routers(&self) -> BTreeMap<String, OwnedTensor> {
        let mut out = BTreeMap::new();
        let Some(routing) = &self.routing_config else {
            return out;
        };
        let (attn_slot, mlp_slot) = router_names(routing.granularity);
        for (i, layer) in self.model.layers.iter().enumerate() {
            let slots = [
                (&layer.attn_router, Some(attn_slot)),
                (&layer.mlp_router, mlp_slot),
            ];
            for (router, name) in slots {
                if let (Some(r), Some(name)) = (router, name) {
                    r.export(&mut out, &format!("model.layers.{i}.{name}"));
                }
            }
        }
        out
    }

    /// Stage 1 (router tuning): every base weight stops requiring gradients; routers keep
    /// theirs, so an optimizer can only move the routers.
    pub fn freeze_base(mut self) -> Self {
        let routers: Vec<_> = self
            .model
            .layers
            .iter_mut()
            .map(|l| (l.attn_router.take(), l.mlp_router.take()))
            .collect();
        self = self.no_grad();
        for (layer, (a, m)) in self.model.layers.iter_mut().zip(routers) {
            layer.attn_router = a;
            layer.mlp_router = m;
        }
        self
    }

    /// Shifts every router's SKIP bias by `delta` ([`Router::shift_skip_bias`]).
    pub fn shift_router_biases(mut self, delta: f64) -> Self {
        for layer in self.model.layers.iter_mut() {
            for router in [&mut layer.attn_router, &mut layer.mlp_router]
                .into_iter()
                .flatten()
            {
                router.shift_skip_bias(delta);
            }
        }
        self
    }

    /// Number of router parameters.
    pub fn router_params(&self) -> usize {
        self.model
            .layers
            .iter()
            .flat_map(|l| [&l.attn_router, &l.mlp_router])
            .flatten()
            .map(|r| r.num_params())
            .sum()
    }

    /// What every layer needs to know to route with `routing` (dense without routers).
    pub fn layer_routing(&self, routing: Routing) -> LayerRouting {
        match &self.routing_config {
            Some(rc) => LayerRouting {
                routing,
                mlp_router_input: rc.mlp_router_input,
                kv_policy: rc.kv_policy,
            },
            None => LayerRouting {
                routing: Routing::Dense,
                mlp_router_input: MlpRouterInput::default(),
                kv_policy: KvPolicy::default(),
            },
        }
    }
}
