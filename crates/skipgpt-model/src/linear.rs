//! One linear layer's weights in Hugging Face layout: the normal initialisation transformers
//! uses, and loading and saving `{name}.weight` (`[d_out, d_in]`, seen as Burn's `[d_in, d_out]`:
//! a transposed view of the stored matrix on the CPU backend, a copy transposed once on the way
//! in elsewhere) and `{name}.bias`. The decoder and the routers both build on it.

use std::collections::BTreeMap;

use burn::module::Param;
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::tensor::{backend::Backend, Tensor};

use crate::error::Result;
use crate::io::safetensors_io::{OwnedTensor, StoreDtype};
use crate::io::weight_source::WeightSource;

/// Standard deviation of the normal initialisation (transformers' `initializer_range`).
pub(crate) const INIT_STD: f64 = 0.02;

pub(crate) fn init_linear<B: Backend>(
    d_in: usize,
    d_out: usize,
    bias: bool,
    device: &B::Device,
) -> Linear<B> {
    LinearConfig::new(d_in, d_out)
        .with_bias(bias)
        .with_initializer(Initializer::Normal {
            mean: 0.0,
            std: INIT_STD,
        })
        .init(device)
}

/// Loads HF `{name}.weight` `[d_out, d_in]` (and `{name}.bias`) into a Burn linear layer, its
/// weight held the way the backend multiplies fastest ([`crate::dispatch::holds_weights_out_in`]):
/// on the CPU backend as stored, seen as `[d_in, d_out]` through a transposed view; elsewhere
/// transposed on the host into a contiguous `[d_in, d_out]`.
pub(crate) fn load_linear<B: Backend>(
    w: &impl WeightSource,
    name: &str,
    d_in: usize,
    d_out: usize,
    bias: bool,
    device: &B::Device,
) -> Result<Linear<B>> {
    let key = format!("{name}.weight");
    let weight = if crate::dispatch::holds_weights_out_in::<B>(device) {
        w.matrix::<B>(&key, [d_out, d_in], device)?.transpose()
    } else {
        w.tensor_transposed::<B>(&key, [d_out, d_in], device)?
    };
    Ok(Linear {
        weight: Param::from_tensor(weight),
        bias: load_bias(w, name, d_out, bias, device)?,
    })
}

/// HF `{name}.bias` (`[d_out]`) where the layer has one.
pub(crate) fn load_bias<B: Backend>(
    w: &impl WeightSource,
    name: &str,
    d_out: usize,
    bias: bool,
    device: &B::Device,
) -> Result<Option<Param<Tensor<B, 1>>>> {
    if !bias {
        return Ok(None);
    }
    let b = w.tensor::<B, 1>(&format!("{name}.bias"), [d_out], device)?;
    Ok(Some(Param::from_tensor(b)))
}

/// Writes HF `{name}.weight` and `{name}.bias`.
pub(crate) fn export_linear<B: Backend>(
    out: &mut BTreeMap<String, OwnedTensor>,
    name: &str,
    linear: &Linear<B>,
    dtype: StoreDtype,
) {
    export_with_weight(out, name, linear.weight.val(), linear, dtype);
}

/// Writes HF `{name}.weight` from `weight` (`[in, out]`, e.g. a quantized weight dequantized)
/// and `linear`'s bias.
pub(crate) fn export_with_weight<B: Backend>(
    out: &mut BTreeMap<String, OwnedTensor>,
    name: &str,
    weight: Tensor<B, 2>,
    linear: &Linear<B>,
    dtype: StoreDtype,
) {
    out.insert(
        format!("{name}.weight"),
        OwnedTensor::from_tensor(weight.transpose(), dtype),
    );
    if let Some(b) = &linear.bias {
        out.insert(
            format!("{name}.bias"),
            OwnedTensor::from_tensor(b.val(), dtype),
        );
    }
}
