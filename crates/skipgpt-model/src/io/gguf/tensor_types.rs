//! Which type each tensor of a quantized GGUF gets, as `llama-quantize` chooses it for the
//! LLaMA family (`llama_tensor_get_type` in llama.cpp's `llama-quant.cpp`, without an
//! importance matrix):
//!
//! - only matrices named `*weight` are quantized (norms and other vectors keep their type);
//! - the output matrix, and the embedding where it doubles as the output (tied embeddings), get
//!   Q6_K for every block type but Q8_0;
//! - the K mixes (Q4_K_M, Q5_K_M) give Q6_K to the value projections and down projections
//!   of the layers `use_more_bits` picks (the first and last eighth, and every third between);
//! - a matrix whose rows are no whole number of the chosen type's blocks falls back: Q4_K to
//!   Q5_0, Q5_K to Q5_1, Q6_K to Q8_0, and to F16 where even 32 values do not divide the rows
//!   (SmolLM2's 576-value rows take the fallbacks).

use super::quant::GgmlType;
use super::reader::TensorInfo;

/// A file type `skipgpt quantize` writes: one tensor type for every matrix, or a mix.
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantizeTarget {
    #[cfg_attr(feature = "clap", value(name = "q8_0"))]
    Q8_0,
    #[cfg_attr(feature = "clap", value(name = "q6_k"))]
    Q6K,
    #[cfg_attr(feature = "clap", value(name = "q5_k_m"))]
    Q5KM,
    #[cfg_attr(feature = "clap", value(name = "q5_0"))]
    Q5_0,
    #[cfg_attr(feature = "clap", value(name = "q5_1"))]
    Q5_1,
    #[cfg_attr(feature = "clap", value(name = "q4_k_m"))]
    Q4KM,
    #[cfg_attr(feature = "clap", value(name = "q4_0"))]
    Q4_0,
    #[cfg_attr(feature = "clap", value(name = "q4_1"))]
    Q4_1,
    F16,
    F32,
}

impl QuantizeTarget {
    /// The type most matrices get (llama.cpp's `llama_ftype_get_default_type`).
    pub fn tensor_type(self) -> GgmlType {
        match self {
            QuantizeTarget::Q8_0 => GgmlType::Q8_0,
            QuantizeTarget::Q6K => GgmlType::Q6K,
            QuantizeTarget::Q5KM => GgmlType::Q5K,
            QuantizeTarget::Q5_0 => GgmlType::Q5_0,
            QuantizeTarget::Q5_1 => GgmlType::Q5_1,
            QuantizeTarget::Q4KM => GgmlType::Q4K,
            QuantizeTarget::Q4_0 => GgmlType::Q4_0,
            QuantizeTarget::Q4_1 => GgmlType::Q4_1,
            QuantizeTarget::F16 => GgmlType::F16,
            QuantizeTarget::F32 => GgmlType::F32,
        }
    }

    /// llama.cpp's `llama_ftype` for `general.file_type` (`LLAMA_FTYPE_MOSTLY_*`).
    pub fn file_type(self) -> u32 {
        match self {
            QuantizeTarget::F32 => 0,
            QuantizeTarget::F16 => 1,
            QuantizeTarget::Q4_0 => 2,
            QuantizeTarget::Q4_1 => 3,
            QuantizeTarget::Q8_0 => 7,
            QuantizeTarget::Q5_0 => 8,
            QuantizeTarget::Q5_1 => 9,
            QuantizeTarget::Q4KM => 15,
            QuantizeTarget::Q5KM => 17,
            QuantizeTarget::Q6K => 18,
        }
    }

    /// Whether this is a K mix, which spends more bits on some value and down projections.
    fn is_mix(self) -> bool {
        matches!(self, QuantizeTarget::Q4KM | QuantizeTarget::Q5KM)
    }
}

/// What a tensor is to the choice of its type (llama.cpp's `tensor_category`, the parts of it
/// a LLaMA model has).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Output,
    Embedding,
    Value,
    Down,
    Other,
}

fn role(name: &str) -> Role {
    if name == "output.weight" {
        Role::Output
    } else if name == "token_embd.weight" {
        Role::Embedding
    } else if name.contains("attn_v.weight") || name.contains("attn_qkv.weight") {
        Role::Value
    } else if name.contains("ffn_down") {
        Role::Down
    } else {
        Role::Other
    }
}

/// The layers a K mix gives more bits: the first and last eighth, and every third between.
fn use_more_bits(layer: usize, layers: usize) -> bool {
    layer < layers / 8 || layer >= 7 * layers / 8 || (layer as i64 - (layers / 8) as i64) % 3 == 2
}

/// The layer of a tensor named `blk.N.…`.
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// The type of every tensor of `tensors` for `target`. The value and down projections are
/// told apart by their layer (`blk.N.`; in file order where a name has none), whatever the
/// order of the file: llama.cpp walks them layer by layer.
pub fn tensor_types(tensors: &[TensorInfo], target: QuantizeTarget) -> Vec<GgmlType> {
    let count = |r: Role| tensors.iter().filter(|t| role(&t.name) == r).count();
    let (values, downs) = (count(Role::Value), count(Role::Down));
    let tied = !tensors.iter().any(|t| role(&t.name) == Role::Output);
    let (mut value, mut down) = (0, 0);
    let next = |counter: &mut usize, name: &str| {
        *counter += 1;
        layer_of(name).unwrap_or(*counter - 1)
    };
    tensors
        .iter()
        .map(|t| {
            if !quantizable(t) {
                return t.kind;
            }
            let default = target.tensor_type();
            if default.block_format().is_none() {
                return default;
            }
            let chosen = match role(&t.name) {
                Role::Output => output_type(t, default),
                Role::Embedding if tied => output_type(t, default),
                Role::Value => more_bits(target, next(&mut value, &t.name), values, default),
                Role::Down => more_bits(target, next(&mut down, &t.name), downs, default),
                _ => default,
            };
            fall_back(t, chosen)
        })
        .collect()
}

/// Matrices named `*weight`, norms excepted (`tensor_allows_quantization`).
fn quantizable(t: &TensorInfo) -> bool {
    t.dims.len() >= 2 && t.name.ends_with("weight") && !t.name.contains("_norm.weight")
}

/// The output matrix's type: Q6_K unless the file is Q8_0 (or its rows are no whole number of
/// the default's blocks, when llama.cpp takes Q8_0).
fn output_type(t: &TensorInfo, default: GgmlType) -> GgmlType {
    if !whole_blocks(t, default) {
        GgmlType::Q8_0
    } else if default != GgmlType::Q8_0 {
        GgmlType::Q6K
    } else {
        default
    }
}

fn more_bits(target: QuantizeTarget, i: usize, n: usize, default: GgmlType) -> GgmlType {
    if target.is_mix() && use_more_bits(i, n) {
        GgmlType::Q6K
    } else {
        default
    }
}

/// `chosen`, or the 32-value type llama.cpp takes when the rows are no whole number of K
/// blocks (F16 when they are no whole number of 32 values either).
fn fall_back(t: &TensorInfo, chosen: GgmlType) -> GgmlType {
    if whole_blocks(t, chosen) {
        return chosen;
    }
    let smaller = match chosen {
        GgmlType::Q4K => GgmlType::Q5_0,
        GgmlType::Q5K => GgmlType::Q5_1,
        GgmlType::Q6K => GgmlType::Q8_0,
        other => other,
    };
    if whole_blocks(t, smaller) {
        smaller
    } else {
        GgmlType::F16
    }
}

fn whole_blocks(t: &TensorInfo, kind: GgmlType) -> bool {
    t.dims[0].is_multiple_of(kind.block_elements() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(name: &str, dims: &[u64]) -> TensorInfo {
        TensorInfo {
            name: name.into(),
            dims: dims.to_vec(),
            kind: GgmlType::F32,
            offset: 0,
        }
    }

    /// A 30-layer model of SmolLM2's shapes (576-value rows but for the down projections'
    /// 1536), tied embeddings.
    fn smollm2_like() -> Vec<TensorInfo> {
        let mut t = vec![tensor("token_embd.weight", &[576, 49152])];
        for l in 0..30 {
            t.push(tensor(&format!("blk.{l}.attn_norm.weight"), &[576]));
            for m in [
                "attn_q",
                "attn_k",
                "attn_v",
                "attn_output",
                "ffn_gate",
                "ffn_up",
            ] {
                t.push(tensor(&format!("blk.{l}.{m}.weight"), &[576, 192]));
            }
            t.push(tensor(&format!("blk.{l}.ffn_down.weight"), &[1536, 576]));
        }
        t.push(tensor("output_norm.weight", &[576]));
        t
    }

    fn type_of(tensors: &[TensorInfo], types: &[GgmlType], name: &str) -> GgmlType {
        types[tensors.iter().position(|t| t.name == name).unwrap()]
    }

    #[test]
    fn q4_k_m_of_smollm2_takes_llama_quantizes_types_and_fallbacks() {
        let mut t = smollm2_like();
        // in the order llama.cpp's converter writes them: by name, blk.10 before blk.2
        t.sort_by(|a, b| a.name.cmp(&b.name));
        let types = tensor_types(&t, QuantizeTarget::Q4KM);
        // as in the Q4_K_M file llama-quantize writes from SmolLM2's F32 weights
        assert_eq!(type_of(&t, &types, "token_embd.weight"), GgmlType::Q8_0);
        assert_eq!(type_of(&t, &types, "blk.0.attn_norm.weight"), GgmlType::F32);
        let more = [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29];
        for l in 0..30 {
            let (v, d) = if more.contains(&l) {
                (GgmlType::Q8_0, GgmlType::Q6K)
            } else {
                (GgmlType::Q5_0, GgmlType::Q4K)
            };
            assert_eq!(type_of(&t, &types, &format!("blk.{l}.attn_v.weight")), v);
            assert_eq!(type_of(&t, &types, &format!("blk.{l}.ffn_down.weight")), d);
            let q = type_of(&t, &types, &format!("blk.{l}.attn_q.weight"));
            assert_eq!(q, GgmlType::Q5_0, "layer {l}");
        }
    }

    #[test]
    fn the_output_matrix_gets_six_bits_unless_the_file_is_eight_bit() {
        let mut t = smollm2_like();
        t.push(tensor("output.weight", &[1536, 64]));
        for (target, want) in [
            (QuantizeTarget::Q4_0, GgmlType::Q6K),
            (QuantizeTarget::Q5_1, GgmlType::Q6K),
            (QuantizeTarget::Q8_0, GgmlType::Q8_0),
            (QuantizeTarget::F16, GgmlType::F16),
        ] {
            let types = tensor_types(&t, target);
            assert_eq!(type_of(&t, &types, "output.weight"), want, "{target:?}");
            // untied: the embedding is an ordinary matrix
            let embedding = type_of(&t, &types, "token_embd.weight");
            assert_eq!(embedding, target.tensor_type(), "{target:?}");
        }
    }

    #[test]
    fn rows_of_no_whole_block_fall_back_to_smaller_blocks_then_f16() {
        let t = [tensor("blk.0.attn_q.weight", &[48, 8])];
        assert_eq!(tensor_types(&t, QuantizeTarget::Q4KM), [GgmlType::F16]);
        let t = [tensor("blk.0.attn_q.weight", &[96, 8])];
        assert_eq!(tensor_types(&t, QuantizeTarget::Q5KM), [GgmlType::Q5_1]);
        assert_eq!(tensor_types(&t, QuantizeTarget::Q6K), [GgmlType::Q8_0]);
    }
}
