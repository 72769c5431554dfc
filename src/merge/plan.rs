//! The plan: every output tensor, how its values are obtained from the base and which adapter is folded into it;
//! and how the tensors are split into shards.

use super::base::Base;
use super::options::{MergeError, MergeOptions, OutDtype};
use super::st_reader::is_float;
use crate::adapter::peft_format::{self, LoadedAdapter};
use candle_core::DType;
use std::collections::HashMap;
use std::ops::Range;

/// How an output tensor's values are obtained from the base.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Fetch {
    /// As stored (dequantized, for a GGUF base).
    Stored,
    /// A bitsandbytes NF4 weight of a pre-quantized checkpoint, dequantized.
    StoredNf4,
    /// A projection quantized to NF4 and dequantized again, as QLoRA training held it.
    Nf4RoundTrip { double_quant: bool },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Part {
    Weight,
    Bias,
}

/// One tensor of the output and how to compute it.
pub(super) struct Planned {
    pub(super) name: String,
    pub(super) shape: Vec<usize>,
    /// The dtype written: the output dtype for floating-point tensors, the stored one otherwise.
    pub(super) dtype: DType,
    pub(super) fetch: Fetch,
    /// The adapter to fold in (an index into the adapter list), into the weight or the bias.
    pub(super) merge: Option<(usize, Part)>,
    /// An embedding / head computed from a `modules_to_save` copy or trained rows ([`super::vocab`]).
    pub(super) vocab: Option<super::vocab::VocabOp>,
}

impl Planned {
    pub(super) fn bytes(&self) -> u64 {
        (self.shape.iter().product::<usize>() * self.dtype.size_in_bytes()) as u64
    }
}

/// Whether `name` is a projection weight that QLoRA holds in NF4.
fn is_projection(name: &str) -> bool {
    name.starts_with("model.layers.")
        && crate::model::LAYER_PROJECTIONS
            .iter()
            .any(|p| name.strip_suffix(".weight").is_some_and(|m| m.ends_with(&format!(".{}", p.name))))
}

/// Every output tensor, with the adapter of its module; checks that every adapter module is in the base with a
/// shape it fits. `requantize`: round-trip the projections through NF4 with this double-quantization setting.
pub(super) fn plan_tensors(
    base: &Base,
    adapters: &[LoadedAdapter],
    dtype: OutDtype,
    requantize: Option<bool>,
    opts: &MergeOptions,
) -> Result<Vec<Planned>, MergeError> {
    let file = opts.adapter.join(peft_format::WEIGHTS_FILE);
    let peft_name = |path: &str| format!("base_model.model.{path}");
    let by_path: HashMap<&str, usize> = adapters.iter().enumerate().map(|(i, a)| (a.path.as_str(), i)).collect();
    let mut used = vec![false; adapters.len()];
    let mut plan = Vec::with_capacity(base.tensors.len());
    for t in &base.tensors {
        let fetch = match requantize {
            _ if t.nf4 => Fetch::StoredNf4,
            Some(double_quant) if is_projection(&t.name) => Fetch::Nf4RoundTrip { double_quant },
            _ => Fetch::Stored,
        };
        let module_of = |suffix: &str| t.name.strip_suffix(suffix).and_then(|m| by_path.get(m).copied());
        let merge = match (module_of(".weight"), module_of(".bias")) {
            (Some(i), _) => Some((i, Part::Weight)),
            (None, Some(i)) => Some((i, Part::Bias)),
            (None, None) => None,
        };
        if let Some((i, part)) = merge {
            let tensor = peft_name(&adapters[i].path);
            let mismatch = |msg: String| MergeError::Mismatch { file: file.clone(), tensor: tensor.clone(), msg };
            if !is_float(t.dtype) {
                return Err(mismatch(format!("the base's `{}` is not a floating-point tensor", t.name)));
            }
            if part == Part::Weight {
                let [out_f, in_f] = t.shape[..] else {
                    return Err(mismatch(format!("the base's `{}` has shape {:?}, not a matrix", t.name, t.shape)));
                };
                adapters[i]
                    .adapter
                    .check_fits(out_f, in_f)
                    .map_err(|msg| mismatch(format!("{msg}; the base's `{}` is {:?}", t.name, t.shape)))?;
                used[i] = true;
            }
        }
        let out_dtype = if is_float(t.dtype) { dtype.dtype() } else { t.dtype };
        plan.push(Planned {
            name: t.name.clone(),
            shape: t.shape.clone(),
            dtype: out_dtype,
            fetch,
            merge,
            vocab: None,
        });
    }
    if let Some(i) = used.iter().position(|u| !u) {
        return Err(MergeError::Mismatch {
            file,
            tensor: peft_name(&adapters[i].path),
            msg: format!(
                "the base {} has no tensor `{}.weight` (is the adapter for another model?)",
                base.name, adapters[i].path
            ),
        });
    }
    Ok(plan)
}

/// Splits tensors of `sizes` bytes, in order, into shards of at most `max` bytes; a tensor larger than `max` gets a
/// shard to itself (transformers' rule). Returns index ranges; at least one (empty when there are no tensors).
pub(super) fn assign_shards(sizes: &[u64], max: u64) -> Vec<Range<usize>> {
    let mut shards = Vec::new();
    let (mut start, mut bytes) = (0, 0u64);
    for (i, &s) in sizes.iter().enumerate() {
        if i > start && bytes + s > max {
            shards.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes += s;
    }
    shards.push(start..sizes.len());
    shards
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_follow_transformers_rule() {
        // Greedy in order; a tensor larger than the limit is alone.
        assert_eq!(assign_shards(&[4, 4, 4], 8), vec![0..2, 2..3]);
        assert_eq!(assign_shards(&[3, 20, 3, 3], 8), vec![0..1, 1..2, 2..4]);
        assert_eq!(assign_shards(&[20], 8), vec![0..1]);
        assert_eq!(assign_shards(&[1, 1, 1], 100), vec![0..3]);
        assert_eq!(assign_shards(&[], 100), vec![0..0]);
    }

    #[test]
    fn projections_are_the_seven_llama_linears() {
        assert!(is_projection("model.layers.0.self_attn.q_proj.weight"));
        assert!(is_projection("model.layers.11.mlp.down_proj.weight"));
        assert!(!is_projection("model.layers.0.self_attn.q_proj.bias"));
        assert!(!is_projection("model.layers.0.input_layernorm.weight"));
        assert!(!is_projection("lm_head.weight"));
        assert!(!is_projection("model.embed_tokens.weight"));
    }
}
