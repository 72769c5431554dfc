//! SwiGLU, the gated MLP activation of Llama-family models: y = silu(a)·b, silu(a) = a·σ(a).
//! Backward: da = g·b·σ(a)·(1 + a·(1 − σ(a))), db = g·silu(a).
//! One pass over the data instead of candle's four ops (and their four saved tensors). Computed in f32 whatever
//! the storage dtype; a and b share one dtype (b is cast to a's when they differ). The backward is an op of its own
//! (`SwiGluBwd`, CPU and CUDA kernels) whose one output holds da and db stacked, (2, …), in that dtype. CUDA:
//! `src/ops/cuda/swiglu.cu`. Reference: Shazeer, "GLU Variants Improve Transformer" (2020); transformers' `LlamaMLP`.

use crate::host::{exp_f32, f32_view, isa_variants, storage_from_f32};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
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

/// Checks that a and b have one shape and one dtype.
fn same(l1: &Layout, l2: &Layout, d1: candle_core::DType, d2: candle_core::DType) -> Result<()> {
    if l1.shape() != l2.shape() || d1 != d2 {
        candle_core::bail!("swiglu: {:?} {d1:?} and {:?} {d2:?} differ", l1.dims(), l2.dims());
    }
    Ok(())
}

/// (2, …shape): the stacked (da, db) of the backward op.
fn stacked(shape: &Shape) -> Shape {
    let mut dims = vec![2];
    dims.extend_from_slice(shape.dims());
    Shape::from(dims)
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        same(l1, l2, s1.dtype(), s2.dtype())?;
        let a = f32_view(s1, l1, "swiglu")?;
        let b = f32_view(s2, l2, "swiglu")?;
        let mut out = vec![0f32; a.len()];
        out.par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
            .for_each(|(o, (a, b))| forward_chunk(a, b, o));
        Ok((storage_from_f32(out, s1.dtype())?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        same(l1, l2, s1.dtype(), s2.dtype())?;
        Ok((cuda::launch((s1, l1), (s2, l2), None)?, l1.shape().clone()))
    }

    fn bwd(&self, a: &Tensor, b: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.to_dtype(a.dtype())?.contiguous()?;
        // (2, …): da, then db
        let dab = a.apply_op3_no_bwd(b, &g, &SwiGluBwd)?;
        Ok((Some(dab.get(0)?), Some(dab.get(1)?)))
    }
}

/// The backward pass as an op of (a, b, g) → (2, …) holding da then db, in a's (= b's) dtype.
struct SwiGluBwd;

impl CustomOp3 for SwiGluBwd {
    fn name(&self) -> &'static str {
        "swiglu-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        same(l1, l2, s1.dtype(), s2.dtype())?;
        same(l1, l3, s1.dtype(), s3.dtype())?;
        let a = f32_view(s1, l1, "swiglu backward")?;
        let b = f32_view(s2, l2, "swiglu backward")?;
        let g = f32_view(s3, l3, "swiglu backward")?;
        let mut dab = vec![0f32; 2 * a.len()];
        let (da, db) = dab.split_at_mut(a.len());
        da.par_chunks_mut(CHUNK)
            .zip(db.par_chunks_mut(CHUNK))
            .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)).zip(g.par_chunks(CHUNK)))
            .for_each(|((da, db), ((a, b), g))| backward_chunk(a, b, g, da, db));
        Ok((storage_from_f32(dab, s1.dtype())?, stacked(l1.shape())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        same(l1, l2, s1.dtype(), s2.dtype())?;
        same(l1, l3, s1.dtype(), s3.dtype())?;
        Ok((cuda::launch((s1, l1), (s2, l2), Some((s3, l3)))?, stacked(l1.shape())))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::super::cuda::{self as k, alloc, elementwise, launched, suffix, view};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda::cudarc::driver::{DeviceRepr, PushKernelArg};
    use candle_core::cuda::CudaDType;
    use candle_core::{CudaStorage, DType, Layout, Result};

    /// Forward (`g` None: y, n elements) or backward ((da, db), 2n elements), element-wise.
    pub(super) fn launch(
        a: (&CudaStorage, &Layout),
        b: (&CudaStorage, &Layout),
        g: Option<(&CudaStorage, &Layout)>,
    ) -> Result<CudaStorage> {
        match a.0.dtype() {
            DType::F32 => typed::<f32>(a, b, g),
            DType::BF16 => typed::<half::bf16>(a, b, g),
            other => candle_core::bail!("swiglu: the CUDA kernels take f32 or bf16, not {other:?}"),
        }
    }

    fn typed<T: CudaDType + DeviceRepr>(
        (sa, la): (&CudaStorage, &Layout),
        (sb, lb): (&CudaStorage, &Layout),
        g: Option<(&CudaStorage, &Layout)>,
    ) -> Result<CudaStorage> {
        let dev = sa.device();
        let a = view::<T>(sa, la, "swiglu")?;
        let b = view::<T>(sb, lb, "swiglu")?;
        let n = a.len();
        let g = match g {
            Some((sg, lg)) => Some(view::<T>(sg, lg, "swiglu backward")?),
            None => None,
        };
        let mut out = alloc::<T>(dev, if g.is_some() { 2 * n } else { n })?;
        if n > 0 {
            let which = if g.is_some() { "bwd" } else { "fwd" };
            let f = k::func(dev, &k::SWIGLU, &format!("swiglu_{which}_{}", suffix(sa.dtype(), "swiglu")?))?;
            let stream = dev.cuda_stream();
            let mut l = stream.launch_builder(&f);
            l.arg(&a).arg(&b);
            if let Some(g) = &g {
                l.arg(g);
            }
            let n64 = n as u64;
            l.arg(&mut out).arg(&n64);
            // SAFETY: the arguments match swiglu.cu's signatures; a, b, g hold n elements, out n (fwd) or 2n (bwd).
            launched(unsafe { l.launch(elementwise(n)) })?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}

/// silu(a) ⊙ b, the gated MLP activation of Llama-family models.
pub fn swiglu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !super::use_kernel(a, true) {
        return super::reference::swiglu(a, b);
    }
    // One dtype for both (a no-op when they agree; the cast is differentiable, so db reaches b in b's dtype).
    a.contiguous()?.apply_op2(&b.to_dtype(a.dtype())?.contiguous()?, SwiGlu)
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
    fn mixed_dtypes_give_each_input_a_gradient_in_its_own_dtype() {
        use candle_core::DType;
        let a = rand(&[3, 8], 14).to_dtype(DType::BF16).unwrap();
        let b = rand(&[3, 8], 15);
        let (y, g) = forward_backward(&[a.clone(), b.clone()], &|t| swiglu(&t[0], &t[1]).unwrap());
        assert_eq!((y.dtype(), g[0].dtype(), g[1].dtype()), (DType::BF16, DType::BF16, DType::F32));
        let want = swiglu(&a, &b.to_dtype(DType::BF16).unwrap()).unwrap();
        assert_eq!(max_abs_diff(&y, &want), 0.0);
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
