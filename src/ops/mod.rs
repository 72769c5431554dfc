//! Training primitives: one file per op, each a candle custom op whose backward pass we own, with its CPU kernels
//! (and the place for its CUDA kernels) side by side, and a composed reference version in [`mod@reference`].
//!
//! candle's fused ops (`softmax_last_dim`, `rms_norm`, `rope`, …) have no backward: a loss computed through them
//! back-propagates nothing and says nothing. And candle's matmul backward computes a gradient for a frozen weight
//! even when nobody asked for it. Every op here is a `CustomOp` with an explicit `bwd`; each file's tests check the
//! backward against central finite differences, the kernel against [`mod@reference`] (forward and backward), and bf16
//! against f32.
//!
//! | op (file) | forward | backward | on CUDA |
//! |---|---|---|---|
//! | [`fn@frozen_matmul`] | y = x·Wᵀ, W dense | dx = dy·W (no dW: the weight is frozen) | cuBLAS (candle's matmul) |
//! | [`fn@nf4_matmul`] | y = x·dequant(W)ᵀ, W in NF4 | dx = dy·dequant(W) | `quant/cuda/nf4.cu` dequantization into a scratch buffer, then cuBLAS; fused dequant + GEMM for ≤ 64 rows without a graph (generation) |
//! | [`fn@lora_linear`] | y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ | dx, dA, dB (recomputes drop(x)·Aᵀ) | composed: frozen product + candle matmuls for the update (`lora_linear::composed`) |
//! | [`fn@rms_norm`] | y = x·r·w, r = (mean(x²)+ε)^-½ | dx = r·u − x·r³·mean(u⊙x), u = dy⊙w | `cuda/rms_norm.cu` fwd, bwd |
//! | [`fn@rope`] | HF "rotate_half" rotary embedding | rope with −sin | `cuda/rope.cu` (both) |
//! | [`causal_softmax`] (softmax.rs) | softmax(s·x) with a causal mask | s·y⊙(g − Σ g⊙y) | — (reference; attention does not use it on CUDA) |
//! | [`fn@attention`] | causal GQA softmax(s·QKᵀ)·V: fused per head (CPU); by query chunks, keeping O and the row log-sum-exp L (CUDA); [`attention_segments`]: block-diagonal over packed rows' examples ([`Segments`]), masked blocks skipped | recomputes P (per chunk: exp(s·QKᵀ − L)); dV = Pᵀ·dO, dS = P⊙(dP − rowsum(dO⊙O)) | chunked tensor ops (cuBLAS), [`graft`]ed |
//! | [`fn@swiglu`] | silu(a)·b | da = g·b·σ(a)(1 + a(1−σ(a))), db = g·silu(a) | `cuda/swiglu.cu` fwd, bwd |
//! | [`linear_cross_entropy`] (cross_entropy.rs) | Σ −log softmax(h·Wᵀ)\[label\] / n, by row chunks | dh computed in the forward | chunked tensor ops (cuBLAS), [`graft`]ed |
//! | [`fn@dropout`] | x ⊙ mask(seed, index) | g ⊙ mask | `cuda/dropout.cu` (both; the CPU's mask bit for bit) |
//!
//! The fused AdamW step of [`crate::train::optim`] has its kernel here too (`cuda/adamw.cu`). Where an op has CUDA
//! kernels its backward is an op of its own with a CPU and a CUDA kernel, so it runs on the device of its inputs.
//!
//! **Dtypes.** Every kernel takes f32 or bf16 storage and computes in f32 (bf16 is widened on the way in and
//! rounded on the way out, see [`crate::host`]); outputs and gradients have their input's dtype, so f32 adapter
//! weights get f32 gradients while bf16 activations get bf16 ones. Matmuls go to the gemm crate
//! ([`gemm`]); element-wise loops are compiled per instruction-set level ([`crate::cpu::Isa`]).
//!
//! **Dispatch** — the one rule, [`use_kernel`]: an op runs its own kernel where the tensor's device and dtype have
//! one (CPU f32/bf16 for all; CUDA f32/bf16 for the ops with CUDA kernels in the table), else its [`mod@reference`]
//! composition. Two exceptions on CUDA, where the reference would hold (t × s) scores per head or the full
//! (tokens × vocab) logits: [`fn@attention`] and [`linear_cross_entropy`] take their chunked paths, written in candle
//! tensor ops (cuBLAS does the products) and attached to the graph with a backward of our own by [`graft`]; tests
//! run the same code on the CPU (`attention_chunked`, `linear_cross_entropy_chunked`). LoRA-linear on CUDA is
//! composed from ops that own their backward (no weight gradient for the frozen base).

mod attention;
mod attention_decode;
mod cross_entropy;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
mod dropout;
mod frozen_matmul;
pub(crate) mod gemm;
pub(crate) mod graft;
mod lora_linear;
mod nf4_matmul;
pub mod reference;
mod rms_norm;
mod rope;
mod segments;
mod softmax;
mod swiglu;
#[cfg(test)]
pub(crate) mod testutil;

pub use attention::{attention, attention_segments};
pub use cross_entropy::linear_cross_entropy;
pub use dropout::{dropout, seed_of};
pub use frozen_matmul::{frozen_matmul, frozen_product};
pub use lora_linear::{lora_linear, LoraLinearOp};
pub use nf4_matmul::nf4_matmul;
pub use rms_norm::rms_norm;
pub use rope::rope;
pub use segments::Segments;
pub use softmax::causal_softmax;
pub use swiglu::swiglu;

use candle_core::{DType, Tensor};

/// Whether an op runs its own kernel for `t` (its main input): on the CPU for f32 and bf16; on CUDA when the op
/// has CUDA kernels (`has_cuda`). Otherwise the op runs its [`mod@reference`] composition.
pub(crate) fn use_kernel(t: &Tensor, has_cuda: bool) -> bool {
    matches!(t.dtype(), DType::F32 | DType::BF16) && (t.device().is_cpu() || (has_cuda && t.device().is_cuda()))
}
