//! The kernels' PTX (compiled from `nf4.cu` by build.rs) and the functions one weight uses, loaded through
//! candle's per-device module cache.

use candle_core::CudaDevice;
use cudarc::driver::CudaFunction;

use super::error::Result;

/// The kernels' PTX, compiled by build.rs from `nf4.cu`.
pub const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/nf4.ptx"));

/// The module name under which the PTX is registered with candle's device (`get_or_load_custom_func`).
const MODULE: &str = "peftkit_nf4";

/// The kernels one tensor uses (plain or double-quantized scales), loaded from candle's module cache.
pub(super) struct Kernels {
    pub(super) dequant_bf16: CudaFunction,
    pub(super) dequant_f32: CudaFunction,
    /// `gemm[mt - 1]`: M ≤ 16·mt, K % 32 == 0.
    pub(super) gemm: [CudaFunction; 4],
    pub(super) gemm_generic: CudaFunction,
    pub(super) splitk_reduce: CudaFunction,
}

impl Kernels {
    pub(super) fn load(dev: &CudaDevice, double: bool) -> Result<Self> {
        let v = if double { "double" } else { "plain" };
        let f = |name: String| -> Result<CudaFunction> {
            Ok(dev.get_or_load_custom_func(&name, MODULE, PTX)?.into_cuda_function())
        };
        Ok(Self {
            dequant_bf16: f(format!("nf4_dequant_bf16_{v}"))?,
            dequant_f32: f(format!("nf4_dequant_f32_{v}"))?,
            gemm: [
                f(format!("nf4_gemm_{v}_mt1"))?,
                f(format!("nf4_gemm_{v}_mt2"))?,
                f(format!("nf4_gemm_{v}_mt3"))?,
                f(format!("nf4_gemm_{v}_mt4"))?,
            ],
            gemm_generic: f(format!("nf4_gemm_generic_{v}"))?,
            splitk_reduce: f("nf4_splitk_reduce".to_string())?,
        })
    }
}
