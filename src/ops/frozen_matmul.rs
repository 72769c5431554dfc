//! Frozen projection: y = x·Wᵀ for a frozen weight W (out, in); backward dx = dy·W only, never dW.
//!
//! candle's matmul backward computes both operands' gradients, a frozen weight's included (a third of the FLOPs
//! wasted and a weight-sized buffer per layer kept alive through the backward pass): this op's backward is the
//! transposed product and nothing else. The weight is a [`FrozenWeight`], dense (f32/bf16) or NF4; the CPU kernel
//! reads it as f32 (in place, widened or dequantized into a reused buffer) and multiplies with the gemm crate.
//! CUDA: cuBLAS through candle's matmul, on the weight as a dense device tensor of x's dtype — itself, or for NF4
//! the device's dequantization scratch buffer just filled by peftkit's kernel ([`FrozenWeight::gpu_dense`]). An
//! NF4 product of at most 64 rows outside training (generation) takes the fused dequantize + GEMM kernel instead.
//! A block-quantized (GGUF) weight outside training is candle's quantized matmul.

use super::gemm::sgemm;
use crate::host::{f32_view, storage_from_f32};
use crate::weight::FrozenWeight;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

/// The frozen product as a candle op.
pub(crate) struct FrozenMatmul {
    pub w: FrozenWeight,
    /// false: y = x·Wᵀ (x has `in` features); true: y = x·W (x has `out` features: the backward product).
    pub transposed: bool,
}

impl FrozenMatmul {
    /// (m, k, n): rows of x, its features, output features.
    fn dims(&self, x: &Layout) -> Result<(usize, usize, usize)> {
        let (out, inp) = self.w.dims()?;
        let (k, n) = if self.transposed { (out, inp) } else { (inp, out) };
        if x.dims().last() != Some(&k) {
            candle_core::bail!("frozen_matmul: x has shape {:?}, the weight is {out}×{inp}", x.dims());
        }
        Ok((x.shape().elem_count() / k.max(1), k, n))
    }

    fn out_shape(x: &Layout, n: usize) -> Shape {
        let mut dims = x.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = n;
        }
        Shape::from(dims)
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_view(s, l, "frozen_matmul")?;
        let (m, k, n) = self.dims(l)?;
        let mut y = vec![0f32; m * n];
        self.w.with_f32(|w| {
            if self.transposed {
                // y (m×n) = x (m×out) · W (out×in)
                sgemm(m, n, k, &mut y, false, &x, (k, 1), w, (n, 1), 1.0)
            } else {
                // y (m×n) = x (m×in) · Wᵀ (in×out)
                sgemm(m, n, k, &mut y, false, &x, (k, 1), w, (1, k), 1.0)
            }
        })?;
        Ok((storage_from_f32(y, s.dtype())?, Self::out_shape(l, n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let (m, k, n) = self.dims(l)?;
        let Some((x_start, _)) = l.contiguous_offsets() else { candle_core::bail!("frozen_matmul: x not contiguous") };
        // Dense: the weight itself; NF4: the scratch buffer, dequantized now, read by the matmul queued next.
        let w = self.w.gpu_dense(s.dtype())?;
        let (ws, wl) = w.storage_and_layout();
        let candle_core::Storage::Cuda(wc) = &*ws else { candle_core::bail!("frozen_matmul: weight not on the GPU") };
        if !wl.is_contiguous() {
            candle_core::bail!("frozen_matmul: weight not contiguous");
        }
        let lx = Layout::contiguous_with_offset((1, m, k), x_start);
        // W is (out, in) row-major: as (1, k, n) it is Wᵀ (a transposed view) or W itself.
        let lw = if self.transposed {
            Layout::contiguous_with_offset((1, k, n), wl.start_offset())
        } else {
            Layout::new(Shape::from((1, k, n)), vec![n * k, 1, k], wl.start_offset())
        };
        let out = s.matmul(wc, (1, m, n, k), &lx, &lw)?;
        Ok((out, Self::out_shape(l, n)))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = FrozenMatmul { w: self.w.clone(), transposed: !self.transposed };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

/// y = x·Wᵀ for a frozen weight `w` (out, in): x (…, in) → y (…, out). The backward yields dx only.
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    frozen_product(x, &FrozenWeight::Dense(w.clone()))
}

/// [`frozen_matmul`] for any [`FrozenWeight`] (dense or NF4).
pub fn frozen_product(x: &Tensor, w: &FrozenWeight) -> Result<Tensor> {
    // On CUDA: a dense weight of x's dtype (candle's matmul needs one dtype; a mixed pair takes the reference
    // path) or an NF4 weight in GPU memory (dequantized to x's dtype).
    let has_cuda = match w {
        FrozenWeight::Dense(t) => t.dtype() == x.dtype(),
        FrozenWeight::Nf4(_) | FrozenWeight::Ggml(_) => false,
        #[cfg(feature = "cuda")]
        FrozenWeight::Nf4Cuda(_) => matches!(x.dtype(), candle_core::DType::BF16 | candle_core::DType::F32),
    };
    if !super::use_kernel(x, has_cuda) {
        return super::reference::frozen_product(x, w);
    }
    if let FrozenWeight::Ggml(q) = w {
        if !x.track_op() && x.device().is_cpu() {
            // Generation and evaluation on a block-quantized base: candle's quantized matmul reads the blocks
            // directly (activations quantized to 8 bits per block, as llama.cpp does), f32 in and out.
            if crate::quant::block_matmul::supports(q.dtype()) {
                // Q4_1 (no SIMD kernel in candle) and Q8_0: peftkit's own, on rayon (quant::block_matmul).
                return crate::quant::block_matmul::matmul(x, q);
            }
            let qm = candle_core::quantized::QMatMul::from_arc(q.clone())?;
            return candle_core::Module::forward(&qm, &x.to_dtype(candle_core::DType::F32)?)?.to_dtype(x.dtype());
        }
    }
    #[cfg(feature = "cuda")]
    if let FrozenWeight::Nf4Cuda(q) = w {
        // Generation (no graph, few rows): the fused dequantize + GEMM reads each packed byte once for all rows,
        // instead of writing and re-reading a bf16 copy of the weight.
        let rows = x.elem_count() / q.cols().max(1);
        if !x.track_op() && x.dtype() == candle_core::DType::BF16 && rows <= crate::quant::cuda::GEMV_MAX_M {
            return q.gemv(x).map_err(|e| candle_core::Error::Msg(e.to_string()));
        }
    }
    let x = x.contiguous()?;
    let op = FrozenMatmul { w: w.clone(), transposed: false };
    // With no variable upstream there is nothing to differentiate: skip recording the op.
    if x.track_op() {
        x.apply_op1(op)
    } else {
        x.apply_op1_no_bwd(&op)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use candle_core::{DType, Var};

    #[test]
    fn frozen_matmul_matches_and_has_input_gradient_only() {
        let w = rand(&[5, 7], 3);
        check_grad(&[2, 3, 7], |x| frozen_matmul(x, &w).unwrap(), 1e-2);
        let x = rand(&[4, 7], 4);
        let want = x.matmul(&w.t().unwrap()).unwrap();
        assert!(max_abs_diff(&want, &frozen_matmul(&x, &w).unwrap()) < 1e-5);
        // The frozen weight receives no gradient.
        let xv = Var::from_tensor(&x).unwrap();
        let grads = frozen_matmul(xv.as_tensor(), &w).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&w).is_none());
    }

    #[test]
    fn kernel_matches_reference_forward_and_backward() {
        let w = rand(&[9, 70], 5);
        let x = rand(&[2, 3, 70], 6);
        let fw = FrozenWeight::Dense(w.clone());
        compare_with_reference(
            &[x],
            |t| frozen_product(&t[0], &fw).unwrap(),
            |t| super::super::reference::frozen_product(&t[0], &fw).unwrap(),
            1e-5,
        );
    }

    #[test]
    fn bf16_is_f32_within_bf16_rounding() {
        let w = rand(&[33, 64], 7);
        let x = rand(&[4, 64], 8);
        compare_bf16_with_f32(&[x], |t| frozen_matmul(&t[0], &w.to_dtype(t[0].dtype()).unwrap()).unwrap(), BF16_TOL);
        let y = frozen_matmul(&rand(&[2, 64], 9).to_dtype(DType::BF16).unwrap(), &w.to_dtype(DType::BF16).unwrap());
        assert_eq!(y.unwrap().dtype(), DType::BF16);
    }

    #[test]
    fn gpu_dense_product_matches_the_cpu() {
        let Some(gpu) = crate::compute::test_gpu("gpu_dense_product_matches_the_cpu") else { return };
        let w = rand(&[48, 96], 10);
        for (dt, tol) in [(DType::F32, 1e-5), (DType::BF16, BF16_TOL)] {
            let x = rand(&[2, 9, 96], 11).to_dtype(dt).unwrap();
            let w = w.to_dtype(dt).unwrap();
            let wg = w.to_device(&gpu).unwrap();
            let pick = |t: &Tensor| if t.device().is_cpu() { w.clone() } else { wg.clone() };
            compare_gpu_with_cpu(&gpu, &[x], |t| frozen_matmul(&t[0], &pick(&t[0])).unwrap(), tol);
        }
    }
}
