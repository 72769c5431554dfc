//! The compute choice — a device and a dtype — made once, from the recipe (`training.device`, `training.dtype`) or
//! the `--device` / `--dtype` flags, and passed down to base loading, the model, the adapters and the loop.
//!
//! Mixed precision (`dtype: bf16`) means: the frozen base weights and the activations are bf16 (NF4 weights
//! dequantize to bf16), products accumulate in f32, norms / softmax / loss statistics are computed in f32, and the
//! adapter weights, their gradients and the AdamW state stay f32 — as `torch.autocast(dtype=torch.bfloat16)` with
//! an f32 PEFT adapter does. `f32` runs everything in f32.
//!
//! `auto`: the device is the first CUDA GPU when this build has the `cuda` feature and the machine a usable GPU,
//! else the CPU; the dtype is bf16 on a CUDA GPU and f32 on the CPU. bf16 on the CPU works everywhere (the values are widened to f32
//! for arithmetic, so results match f32 within bf16 rounding) and halves the frozen weights' memory, but the
//! products still run as f32 GEMMs, so it is slower than f32 today, also on CPUs with AVX512-BF16 or AMX-BF16.
//! Once the CPU GEMM uses those units, `auto` is to pick bf16 where [`crate::cpu::Features::has_bf16_compute`].

use candle_core::{DType, Device};
use std::fmt;
use std::str::FromStr;

/// Where to compute, as a user asks for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceRequest {
    #[default]
    Auto,
    Cpu,
    /// `cuda` (= `cuda:0`) or `cuda:N`.
    Cuda(usize),
}

/// The activation / frozen-weight dtype, as a user asks for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DtypeRequest {
    #[default]
    Auto,
    F32,
    Bf16,
}

impl FromStr for DeviceRequest {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(i)) => Ok(Self::Cuda(i)),
                _ => Err(format!("unknown device {s:?}: expected auto, cpu, cuda or cuda:N")),
            },
        }
    }
}

impl FromStr for DtypeRequest {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "f32" | "float32" | "fp32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "f16" | "float16" | "fp16" => {
                Err("dtype f16 is not supported for training (its range overflows without loss scaling): use bf16 \
                     or f32"
                    .into())
            }
            other => Err(format!("unknown dtype {other:?}: expected auto, f32 or bf16")),
        }
    }
}

impl fmt::Display for DeviceRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl fmt::Display for DtypeRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        })
    }
}

macro_rules! serde_by_str {
    ($t:ty) => {
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
    };
}
serde_by_str!(DeviceRequest);
serde_by_str!(DtypeRequest);

/// Why a compute request cannot be met. All are the user's to fix (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum ComputeError {
    #[error(
        "device {0} was asked for, but this peftkit was built without CUDA support: rebuild with \
         `cargo build --release --features cuda` (needs the CUDA toolkit's nvcc; scripts/cuda-toolkit.sh in the \
         repository installs one), or use --device cpu"
    )]
    CudaNotBuilt(DeviceRequest),
    #[error(
        "device cuda:{index} is not usable: {msg} (check nvidia-smi and CUDA_VISIBLE_DEVICES, or use --device cpu)"
    )]
    NoGpu { index: usize, msg: String },
}

/// A resolved compute choice: where tensors live and the dtype of frozen weights and activations. Adapter
/// parameters, gradients and optimizer state are always f32 ([`Compute::PARAM_DTYPE`]).
#[derive(Debug, Clone)]
pub struct Compute {
    pub device: Device,
    pub dtype: DType,
}

impl Compute {
    /// The dtype of trainable parameters, their gradients and the optimizer state, whatever the compute dtype.
    pub const PARAM_DTYPE: DType = DType::F32;

    /// Resolves a request against this build and machine.
    pub fn resolve(device: DeviceRequest, dtype: DtypeRequest) -> Result<Self, ComputeError> {
        let device = match device {
            DeviceRequest::Cpu => Device::Cpu,
            // A GPU when there is one (a build without `cuda` has none); anything else is the CPU.
            DeviceRequest::Auto => cuda_device(0).unwrap_or(Device::Cpu),
            DeviceRequest::Cuda(index) => cuda_device(index)?,
        };
        let dtype = match dtype {
            DtypeRequest::F32 => DType::F32,
            DtypeRequest::Bf16 => DType::BF16,
            DtypeRequest::Auto => {
                if device.is_cuda() {
                    DType::BF16
                } else {
                    DType::F32
                }
            }
        };
        Ok(Self { device, dtype })
    }

    /// `cpu/f32`, `cuda:0/bf16`.
    pub fn describe(&self) -> String {
        let dev = match &self.device {
            Device::Cpu => "cpu".to_string(),
            Device::Cuda(_) => match self.device.location() {
                candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
                _ => "cuda".into(),
            },
            Device::Metal(_) => "metal".into(),
        };
        format!("{dev}/{}", dtype_name(self.dtype))
    }
}

/// `f32`, `bf16`, `f16` (as recipes spell them).
pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::F64 => "f64",
        _ => "other",
    }
}

/// The GPU a test runs on: `cuda:0`, or `None` after a `SKIPPED <test>: …` line on stderr when this build has no
/// `cuda` feature or the machine no usable GPU. With `PEFTKIT_REQUIRE_GPU=1` (the GPU check script sets it) a
/// missing GPU fails the test instead: a check that cannot fail proves nothing.
#[doc(hidden)]
pub fn test_gpu(test: &str) -> Option<Device> {
    let why = match cuda_device(0) {
        Ok(d) => return Some(d),
        // The first line only: candle appends a backtrace when RUST_BACKTRACE is set.
        Err(e) => e.to_string().lines().next().unwrap_or_default().to_string(),
    };
    if std::env::var("PEFTKIT_REQUIRE_GPU").is_ok_and(|v| v == "1") {
        panic!("{test}: PEFTKIT_REQUIRE_GPU=1 but no GPU: {why}");
    }
    eprintln!("SKIPPED {test}: no GPU ({why})");
    None
}

#[cfg(feature = "cuda")]
fn cuda_device(index: usize) -> Result<Device, ComputeError> {
    Device::new_cuda(index).map_err(|e| ComputeError::NoGpu { index, msg: e.to_string() })
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(index: usize) -> Result<Device, ComputeError> {
    Err(ComputeError::CudaNotBuilt(DeviceRequest::Cuda(index)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_print() {
        assert_eq!("cuda".parse::<DeviceRequest>(), Ok(DeviceRequest::Cuda(0)));
        assert_eq!("CUDA:3".parse::<DeviceRequest>(), Ok(DeviceRequest::Cuda(3)));
        assert_eq!("cpu".parse::<DeviceRequest>(), Ok(DeviceRequest::Cpu));
        assert!("cuda:x".parse::<DeviceRequest>().is_err());
        assert!("tpu".parse::<DeviceRequest>().unwrap_err().contains("auto, cpu, cuda"));
        assert_eq!("bfloat16".parse::<DtypeRequest>(), Ok(DtypeRequest::Bf16));
        assert!("f16".parse::<DtypeRequest>().unwrap_err().contains("bf16 or f32"));
        assert_eq!(DeviceRequest::Cuda(1).to_string(), "cuda:1");
        assert_eq!(DtypeRequest::Bf16.to_string(), "bf16");
    }

    #[test]
    fn cpu_requests_resolve() {
        let c = Compute::resolve(DeviceRequest::Cpu, DtypeRequest::Bf16).unwrap();
        assert!(c.device.is_cpu());
        assert_eq!(c.dtype, DType::BF16);
        assert_eq!(c.describe(), "cpu/bf16");
        let auto = Compute::resolve(DeviceRequest::Auto, DtypeRequest::Auto).unwrap();
        // The CPU in f32, or (a `cuda` build on a GPU machine) the GPU in bf16.
        let want = if auto.device.is_cpu() { DType::F32 } else { DType::BF16 };
        assert_eq!(auto.dtype, want);
        #[cfg(not(feature = "cuda"))]
        assert!(auto.device.is_cpu());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_build() {
        let e = Compute::resolve(DeviceRequest::Cuda(0), DtypeRequest::Auto).unwrap_err().to_string();
        assert!(e.contains("--features cuda") && e.contains("--device cpu"), "{e}");
    }
}
