//! The error type of the CUDA NF4 path.

use candle_core::DType;
use cudarc::driver::DriverError;

use super::GEMV_MAX_M;

/// Errors of the CUDA NF4 path. Shapes are carried where a caller's tensor was rejected.
#[derive(Debug, thiserror::Error)]
pub enum Nf4CudaError {
    #[error("NF4 on CUDA needs a CUDA device, got {0:?}")]
    NotCuda(candle_core::DeviceLocation),
    #[error("NF4 weight of shape {shape:?}: {what} is on {got:?}, the weight on {expected:?}")]
    WrongDevice {
        shape: Vec<usize>,
        what: &'static str,
        got: candle_core::DeviceLocation,
        expected: candle_core::DeviceLocation,
    },
    #[error("NF4 gemv with a weight of shape {weight:?} (N = {n}, K = {k}): x has shape {x:?}, expected (M, {k}) with 1 ≤ M ≤ {GEMV_MAX_M}")]
    XShape { weight: Vec<usize>, n: usize, k: usize, x: Vec<usize> },
    #[error("NF4 gemv with a weight of shape {weight:?}: x has dtype {got:?}, expected bf16")]
    XDType { weight: Vec<usize>, got: DType },
    #[error("NF4 weight of shape {shape:?}: {what} = {value} exceeds the kernels' 32-bit index range")]
    TooLarge { shape: Vec<usize>, what: &'static str, value: usize },
    #[error("NF4 weight of shape {shape:?}: output of {got} elements, expected at least {expected}")]
    OutLen { shape: Vec<usize>, got: usize, expected: usize },
    #[error("NF4 dequantization buffer: dtype {0:?} is not supported (bf16 or f32)")]
    BufferDType(DType),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("CUDA driver: {0}")]
    Driver(#[from] DriverError),
}

pub(super) type Result<T> = std::result::Result<T, Nf4CudaError>;
