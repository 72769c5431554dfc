//! The merge arithmetic for one output tensor: read it from the base (dequantized, or round-tripped through NF4),
//! fold the adapter in (in f32), cast to the output dtype.

use super::options::MergeError;
use super::plan::{Fetch, Part, Planned};
use crate::adapter::peft_format::LoadedAdapter;
use crate::model::{ModelError, TensorSource};
use crate::quant::nf4::{Nf4Tensor, QuantError};
use candle_core::{DType, Device, Tensor};

/// Computes one output tensor: read (dequantize, or round-trip through NF4), fold the adapter in, cast.
pub(super) fn compute(p: &Planned, src: &dyn TensorSource, adapters: &[LoadedAdapter]) -> Result<Tensor, MergeError> {
    let cpu = Device::Cpu;
    if let Some(op) = &p.vocab {
        let t = op.compute(src, p.shape[0])?;
        return t.to_dtype(p.dtype).map_err(|source| MergeError::Tensor { name: p.name.clone(), source });
    }
    let terr = |source: candle_core::Error| MergeError::Tensor { name: p.name.clone(), source };
    let qerr = |source: QuantError| MergeError::Quant { name: p.name.clone(), source };
    // A merged tensor is read in f32 (merge_weight works in f32); any other straight into the output dtype.
    let read_dtype = if p.merge.is_some() || p.fetch != Fetch::Stored { DType::F32 } else { p.dtype };
    let t = match p.fetch {
        Fetch::Stored => src.get(&p.name, &p.shape, read_dtype, &cpu)?,
        Fetch::StoredNf4 => {
            let q = src.nf4_weight(&p.name, &p.shape)?.ok_or_else(|| ModelError::Quantized {
                name: p.name.clone(),
                files: src.describe(),
                msg: "expected a bitsandbytes NF4 weight".into(),
            })?;
            Tensor::from_vec(q.dequantize(), p.shape.as_slice(), &cpu).map_err(terr)?
        }
        Fetch::Nf4RoundTrip { double_quant } => {
            let w = src.get(&p.name, &p.shape, DType::F32, &cpu)?;
            let w = w.flatten_all().and_then(|w| w.to_vec1::<f32>()).map_err(terr)?;
            let q = Nf4Tensor::quantize(&w, &p.shape, double_quant).map_err(qerr)?;
            Tensor::from_vec(q.dequantize(), p.shape.as_slice(), &cpu).map_err(terr)?
        }
    };
    let t = match p.merge {
        Some((i, Part::Weight)) => adapters[i].adapter.merge_weight(&t),
        Some((i, Part::Bias)) => adapters[i].adapter.merge_bias(&t),
        None => Ok(t),
    }
    .map_err(terr)?;
    // candle's f32 → bf16/f16 conversion rounds to nearest even (half's from_f32).
    t.to_dtype(p.dtype).map_err(terr)
}
