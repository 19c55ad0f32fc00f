//! A long call as consecutive pieces of rows, each attending to the cache the pieces before it
//! filled (as llama.cpp splits a prompt into micro-batches).

use burn::tensor::{backend::Backend, Tensor};

use super::forward::forward_rows;
use super::rows::gather_rows;
use super::{EngineStats, LogitRows, SparseCache, SparseOutput};
use crate::error::Result;
use crate::llama::LlamaForCausalLM;
use crate::router::Routing;

/// [`super::sparse_forward_shifted`] as consecutive pieces of at most `piece` rows
/// (sequence-major, as the call's rows are ordered), their outputs joined: the same rows, gates
/// and statistics, and for [`LogitRows::Last`] the row of each sequence's last token, from the
/// piece that holds it.
pub(super) fn forward_in_pieces<B: Backend>(
    model: &LlamaForCausalLM<B>,
    tokens: &[Vec<u32>],
    cache: &mut SparseCache<B>,
    routing: (Routing, Option<&[f64]>),
    logit_rows: LogitRows,
    piece: usize,
) -> Result<SparseOutput<B>> {
    cache.check_batch(tokens.len())?;
    // each sequence's length once all its tokens are in
    let ends: Vec<usize> = tokens
        .iter()
        .zip(&cache.lens)
        .map(|(t, len)| len + t.len())
        .collect();
    let pieces = split_rows(tokens, piece);
    let (mut logits, mut attn_gates, mut mlp_gates) = (Vec::new(), Vec::new(), Vec::new());
    let mut stats = EngineStats::default();
    for part in &pieces {
        let rows = part.iter().map(Vec::len).sum();
        let out = crate::dispatch::in_pool::<B, _>(rows, || {
            forward_rows(model, part, cache, routing, logit_rows)
        })?;
        let out_logits = match logit_rows {
            LogitRows::All => Some(out.logits),
            LogitRows::Last => {
                // one row per sequence present, in sequence order: keep those whose last
                // token this piece held
                let ended: Vec<usize> = (0..part.len())
                    .filter(|&s| !part[s].is_empty())
                    .enumerate()
                    .filter(|&(_, s)| cache.lens[s] == ends[s])
                    .map(|(row, _)| row)
                    .collect();
                (!ended.is_empty()).then(|| gather_rows(out.logits, &ended))
            }
        };
        logits.extend(out_logits);
        if attn_gates.is_empty() {
            (attn_gates, mlp_gates) = (out.attn_gates, out.mlp_gates);
        } else {
            for (all, more) in attn_gates.iter_mut().zip(out.attn_gates) {
                all.extend(more);
            }
            for (all, more) in mlp_gates.iter_mut().zip(out.mlp_gates) {
                all.extend(more);
            }
        }
        stats.add(&out.stats);
    }
    Ok(SparseOutput {
        logits: Tensor::cat(logits, 0),
        attn_gates,
        mlp_gates,
        stats,
    })
}

/// `tokens` cut into consecutive pieces of at most `piece` rows, in the order of the rows
/// (sequence-major); each piece holds, per sequence, its stretch of that sequence's tokens.
fn split_rows(tokens: &[Vec<u32>], piece: usize) -> Vec<Vec<Vec<u32>>> {
    let mut pieces: Vec<Vec<Vec<u32>>> = Vec::new();
    let mut current = vec![Vec::new(); tokens.len()];
    let mut count = 0;
    for (s, t) in tokens.iter().enumerate() {
        for &id in t {
            current[s].push(id);
            count += 1;
            if count == piece {
                pieces.push(std::mem::replace(
                    &mut current,
                    vec![Vec::new(); tokens.len()],
                ));
                count = 0;
            }
        }
    }
    if count > 0 {
        pieces.push(current);
    }
    pieces
}
