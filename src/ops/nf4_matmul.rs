//! Frozen NF4 projection (QLoRA): y = x·dequant(W)ᵀ, backward dx = dy·dequant(W) only.
//!
//! The weight stays in bitsandbytes' NF4 layout (4-bit codes, blocksize 64, absmax double-quantized); each product
//! dequantizes it into the thread's reused buffer just before the GEMM, so the full-precision weight is never
//! kept (see [`crate::weight`]). The op is [`fn@super::frozen_matmul`]'s with an NF4 weight: on the CPU into the
//! thread's f32 buffer and the gemm crate; on CUDA (`FrozenWeight::Nf4Cuda`) peftkit's dequantization kernel
//! (`src/quant/cuda/`) into the device's scratch buffer in the activations' dtype, then cuBLAS; for generation
//! (≤ 64 rows, no graph) the fused dequantize + GEMM kernel.

use crate::quant::nf4::Nf4Tensor;
use crate::weight::FrozenWeight;
use candle_core::{Result, Tensor};
use std::sync::Arc;

/// y = x·dequant(W)ᵀ for a frozen NF4 weight (out, in): x (…, in) → y (…, out). The backward yields
/// dx = dy·dequant(W) only.
pub fn nf4_matmul(x: &Tensor, w: &Arc<Nf4Tensor>) -> Result<Tensor> {
    super::frozen_product(x, &FrozenWeight::Nf4(w.clone()))
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::{frozen_matmul, lora_linear, LoraLinearOp};
    use super::*;
    use candle_core::{DType, Var};

    #[test]
    fn nf4_matmul_is_the_dense_product_of_the_dequantized_weight() {
        // 7 × 100 = 700 elements: a partial last block.
        let (q, dense) = nf4_weight(7, 100, 31);
        let x = rand(&[2, 3, 100], 32);
        let d = max_abs_diff(&nf4_matmul(&x, &q).unwrap(), &frozen_matmul(&x, &dense).unwrap());
        assert!(d < 1e-5, "{d}");
        check_grad(&[2, 3, 100], |x| nf4_matmul(x, &q).unwrap(), 1e-2);
        // dx equals the dense op's; the NF4 weight is not a tensor, so nothing else can get a gradient.
        let xv = Var::from_tensor(&x).unwrap();
        let p = rand(&[2, 3, 7], 33);
        let g_nf4 = (nf4_matmul(xv.as_tensor(), &q).unwrap() * &p).unwrap().sum_all().unwrap().backward().unwrap();
        let g_dense =
            (frozen_matmul(xv.as_tensor(), &dense).unwrap() * &p).unwrap().sum_all().unwrap().backward().unwrap();
        let d = max_abs_diff(g_nf4.get(xv.as_tensor()).unwrap(), g_dense.get(xv.as_tensor()).unwrap());
        assert!(d < 1e-5, "{d}");
    }

    #[test]
    fn kernel_matches_reference_and_bf16_matches_f32() {
        let (q, _) = nf4_weight(24, 128, 34);
        let x = rand(&[3, 128], 35);
        let fw = FrozenWeight::Nf4(q.clone());
        compare_with_reference(
            std::slice::from_ref(&x),
            |t| nf4_matmul(&t[0], &q).unwrap(),
            |t| super::super::reference::frozen_product(&t[0], &fw).unwrap(),
            1e-5,
        );
        compare_bf16_with_f32(&[x], |t| nf4_matmul(&t[0], &q).unwrap(), BF16_TOL);
    }

    /// The GPU path (the weight uploaded, dequantized per product into the scratch buffer, cuBLAS) against the
    /// CPU op, forward and dx, f32 and bf16; then the fused small-M kernel generation uses.
    #[test]
    fn gpu_nf4_product_matches_the_cpu() {
        let Some(gpu) = crate::compute::test_gpu("gpu_nf4_product_matches_the_cpu") else { return };
        let (q, _) = nf4_weight(96, 256, 41);
        let (w_cpu, w_gpu) = (FrozenWeight::Nf4(q.clone()), FrozenWeight::Nf4(q).to_device(&gpu).unwrap());
        assert!(w_gpu.device().same_device(&gpu));
        // Two weights of different sizes in turn: the shared scratch buffer is reused and regrown.
        let (q2, _) = nf4_weight(300, 64, 43);
        let w2_gpu = FrozenWeight::Nf4(q2.clone()).to_device(&gpu).unwrap();
        let x = rand(&[3, 5, 256], 42);
        let pick = |t: &Tensor| if t.device().is_cpu() { &w_cpu } else { &w_gpu };
        compare_gpu_with_cpu(
            &gpu,
            std::slice::from_ref(&x),
            |t| super::super::frozen_product(&t[0], pick(&t[0])).unwrap(),
            1e-5,
        );
        compare_gpu_with_cpu(
            &gpu,
            &[x.to_dtype(DType::BF16).unwrap()],
            |t| super::super::frozen_product(&t[0], pick(&t[0])).unwrap(),
            BF16_TOL,
        );
        let x2 = rand(&[7, 64], 44);
        let y2 = super::super::frozen_product(&x2.to_device(&gpu).unwrap(), &w2_gpu).unwrap();
        let d = rel_l2(&y2, &super::super::frozen_product(&x2, &FrozenWeight::Nf4(q2)).unwrap());
        assert!(d <= 1e-5, "{d}");
        // Generation: no graph, bf16, M ≤ 64 rows → the fused kernel.
        for m in [1, 4, 64] {
            let xb = rand(&[m, 256], 45).to_dtype(DType::BF16).unwrap();
            let want = super::super::frozen_product(&xb, &w_cpu).unwrap();
            let got = super::super::frozen_product(&xb.to_device(&gpu).unwrap(), &w_gpu).unwrap();
            let d = rel_l2(&got, &want);
            assert!(d <= BF16_TOL, "M = {m}: {d}");
        }
    }

    #[test]
    fn qlora_gradients_equal_lora_gradients_on_the_dequantized_base() {
        let (out, inp, r) = (24, 40, 4);
        let (q, dense) = nf4_weight(out, inp, 41);
        let x0 = rand(&[3, 5, inp], 42);
        let a0 = rand(&[r, inp], 43);
        let b0 = rand(&[out, r], 44);
        let p = rand(&[3, 5, out], 45);
        let bias = Some(rand(&[out], 46));
        let run = |w: FrozenWeight, dropout: Option<(f64, u64)>| {
            let (x, a, b) =
                (Var::from_tensor(&x0).unwrap(), Var::from_tensor(&a0).unwrap(), Var::from_tensor(&b0).unwrap());
            let op = LoraLinearOp { w, bias: bias.clone(), scaling: 0.5, dropout };
            let y = lora_linear(x.as_tensor(), a.as_tensor(), b.as_tensor(), op).unwrap();
            let g = (&y * &p).unwrap().sum_all().unwrap().backward().unwrap();
            let get = |v: &Var| g.get(v.as_tensor()).unwrap().clone();
            (y, get(&x), get(&a), get(&b))
        };
        for dropout in [None, Some((0.1, 7))] {
            let qlora = run(FrozenWeight::Nf4(q.clone()), dropout);
            let lora = run(FrozenWeight::Dense(dense.clone()), dropout);
            for (name, a, b) in [
                ("y", &qlora.0, &lora.0),
                ("dx", &qlora.1, &lora.1),
                ("dA", &qlora.2, &lora.2),
                ("dB", &qlora.3, &lora.3),
            ] {
                let d = max_abs_diff(a, b);
                assert!(d <= 1e-5, "{name} (dropout {dropout:?}): {d}");
            }
        }
        let _ = DType::F32;
    }
}
