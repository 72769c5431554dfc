//! SwiGLU, the gated MLP activation of Llama-family models: y = silu(a)·b, silu(a) = a·σ(a).
//! Backward: da = g·b·σ(a)·(1 + a·(1 − σ(a))), db = g·silu(a).
//! One pass over the data instead of candle's four ops (and their four saved tensors). Computed in f32 whatever
//! the storage dtype. Reference: Shazeer, "GLU Variants Improve Transformer" (2020); transformers' `LlamaMLP`.

use crate::host::{exp_f32, f32_view, isa_variants, storage_from_f32, tensor_from_f32, with_f32};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Elements per rayon task.
const CHUNK: usize = 4096;

isa_variants! {
    /// out = silu(a)·b, element-wise.
    pub fn forward_chunk / forward_chunk_at(a: &[f32], b: &[f32], out: &mut [f32]) {
        for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
            *o = a / (1.0 + exp_f32(-a)) * b;
        }
    }
}

isa_variants! {
    /// da = g·b·σ(a)·(1 + a·(1 − σ(a))), db = g·silu(a), element-wise.
    pub fn backward_chunk / backward_chunk_at(a: &[f32], b: &[f32], g: &[f32], da: &mut [f32], db: &mut [f32]) {
        for ((((da, db), &a), &b), &g) in da.iter_mut().zip(db.iter_mut()).zip(a).zip(b).zip(g) {
            let sig = 1.0 / (1.0 + exp_f32(-a));
            *da = g * b * sig * (1.0 + a * (1.0 - sig));
            *db = g * a * sig;
        }
    }
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let a = f32_view(s1, l1, "swiglu")?;
        let b = f32_view(s2, l2, "swiglu")?;
        if l1.shape() != l2.shape() {
            candle_core::bail!("swiglu: shapes {:?} and {:?} differ", l1.dims(), l2.dims());
        }
        let mut out = vec![0f32; a.len()];
        out.par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
            .for_each(|(o, (a, b))| forward_chunk(a, b, o));
        Ok((storage_from_f32(out, s1.dtype())?, l1.shape().clone()))
    }

    fn bwd(&self, a: &Tensor, b: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (da, db) = with_f32(a, |a| {
            with_f32(b, |b| {
                with_f32(g, |g| {
                    let (mut da, mut db) = (vec![0f32; a.len()], vec![0f32; a.len()]);
                    da.par_chunks_mut(CHUNK)
                        .zip(db.par_chunks_mut(CHUNK))
                        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)).zip(g.par_chunks(CHUNK)))
                        .for_each(|((da, db), ((a, b), g))| backward_chunk(a, b, g, da, db));
                    (da, db)
                })
            })
        })???;
        Ok((Some(tensor_from_f32(da, a.shape(), a.dtype())?), Some(tensor_from_f32(db, b.shape(), b.dtype())?)))
    }
}

/// silu(a) ⊙ b, the gated MLP activation of Llama-family models.
pub fn swiglu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !super::use_kernel(a, false) {
        return super::reference::swiglu(a, b);
    }
    a.contiguous()?.apply_op2(&b.contiguous()?, SwiGlu)
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn swiglu_gradient() {
        let b = rand(&[3, 8], 10);
        check_grad(&[3, 8], |a| swiglu(a, &b).unwrap(), 1e-2);
        let a = rand(&[3, 8], 11);
        check_grad(&[3, 8], |b| swiglu(&a, b).unwrap(), 1e-2);
    }

    #[test]
    fn kernel_matches_reference_and_bf16_matches_f32() {
        let (a, b) = ((rand(&[5, 9], 12) * 4.0).unwrap(), rand(&[5, 9], 13));
        compare_with_reference(
            &[a.clone(), b.clone()],
            |t| swiglu(&t[0], &t[1]).unwrap(),
            |t| super::super::reference::swiglu(&t[0], &t[1]).unwrap(),
            1e-5,
        );
        compare_bf16_with_f32(&[a, b], |t| swiglu(&t[0], &t[1]).unwrap(), BF16_TOL);
    }
}
