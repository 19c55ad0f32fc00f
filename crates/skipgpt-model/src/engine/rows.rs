//! Moving a call's rows around: the routers' decisions, gathering the rows a module runs on,
//! and adding its output back into the residual stream.

use burn::tensor::{backend::Backend, IndexingUpdateOp, Int, Tensor, TensorData};

use crate::router::{gate_from_logits, Router, Routing};

/// The routers' decisions for every row: execute or not. `skip_shifts`, one per row, are added
/// to the router's SKIP logit first (a row's compute budget; `-inf` always executes).
pub(super) fn decide<B: Backend>(
    router: &Router<B>,
    x: Tensor<B, 2>,
    routing: Routing,
    skip_shifts: Option<&[f32]>,
) -> Vec<bool> {
    let [n, h] = x.dims();
    let logits = router.logits(x.reshape([1, n, h]));
    if routing == Routing::Deterministic {
        // execute iff logit 0 > logit 1, compared here (the decisions come here anyway)
        let logits: Vec<f32> = logits
            .into_data()
            .convert::<f32>()
            .into_vec()
            .expect("f32 logits");
        let shift = |row: usize| skip_shifts.map_or(0.0, |s| s[row]);
        return (logits.chunks(2).enumerate())
            .map(|(row, l)| l[0] > l[1] + shift(row))
            .collect();
    }
    let logits = match skip_shifts {
        Some(shifts) => {
            let offsets: Vec<f32> = shifts.iter().flat_map(|&s| [0.0, s]).collect();
            let device = logits.device();
            let offsets = Tensor::<B, 3>::from_data(TensorData::new(offsets, [1, n, 2]), &device);
            let dtype = logits.dtype();
            logits + offsets.cast(dtype)
        }
        None => logits,
    };
    let gates = gate_from_logits(logits, routing, None);
    gates
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32 gates")
        .into_iter()
        .map(|g| g > 0.5)
        .collect()
}

/// Rows `which` (sorted, distinct) of `t`; no copy when that is all of them.
pub(super) fn gather_rows<B: Backend>(t: Tensor<B, 2>, which: &[usize]) -> Tensor<B, 2> {
    if which.len() == t.dims()[0] {
        t
    } else {
        let device = t.device();
        t.select(0, index_tensor::<B>(which, &device))
    }
}

/// `x` with `update`'s rows added to its rows `which` (sorted, distinct): the scatter back
/// into the residual stream.
pub(super) fn add_rows<B: Backend>(
    x: Tensor<B, 2>,
    which: &[usize],
    update: Tensor<B, 2>,
) -> Tensor<B, 2> {
    if which.len() == x.dims()[0] {
        x + update
    } else {
        let device = x.device();
        x.select_assign(
            0,
            index_tensor::<B>(which, &device),
            update,
            IndexingUpdateOp::Add,
        )
    }
}

pub(crate) fn index_tensor<B: Backend>(idx: &[usize], device: &B::Device) -> Tensor<B, 1, Int> {
    let v: Vec<i64> = idx.iter().map(|&i| i as i64).collect();
    Tensor::from_data(TensorData::new(v, [idx.len()]), device)
}
