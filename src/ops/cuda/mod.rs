//! The CUDA side of the training primitives (feature `cuda`): the PTX of `rms_norm.cu`, `rope.cu`, `swiglu.cu`,
//! `dropout.cu` and `adamw.cu` (compiled by build.rs for `compute_80`, JIT-compiled by the driver on sm_80+), the
//! loading of their functions through candle's per-device module cache, and what every launch shares: input
//! slices at their layout's offset, launch shapes, the kernel-name suffix of a dtype.
//!
//! Each op's `cuda_fwd` lives in its own file next to its `cpu_fwd` (`super::rms_norm`, …); the kernels read f32 or
//! bf16 and compute in f32, as the CPU kernels do ([`crate::host`]). They run on candle's stream for the device, so
//! they order with candle's own ops. `common.cuh` holds the loads/stores and block sums the `.cu` files share.

use candle_core::cuda::cudarc::driver::{CudaFunction, CudaView, DeviceRepr, LaunchConfig};
use candle_core::cuda::{CudaDType, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result};

/// One kernel source's PTX and the module name it is registered under with candle's device.
pub(crate) struct Module {
    pub name: &'static str,
    pub ptx: &'static str,
    /// The entry points the Rust side loads (checked against the PTX by a test).
    pub entries: &'static [&'static str],
}

pub(crate) const RMS_NORM: Module = Module {
    name: "peftkit_rms_norm",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/rms_norm.ptx")),
    entries: &[
        "rms_norm_fwd_f32_f32",
        "rms_norm_fwd_f32_bf16",
        "rms_norm_fwd_bf16_f32",
        "rms_norm_fwd_bf16_bf16",
        "rms_norm_bwd_f32_f32",
        "rms_norm_bwd_f32_bf16",
        "rms_norm_bwd_bf16_f32",
        "rms_norm_bwd_bf16_bf16",
    ],
};

pub(crate) const ROPE: Module = Module {
    name: "peftkit_rope",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/rope.ptx")),
    entries: &["rope_f32", "rope_bf16"],
};

pub(crate) const SWIGLU: Module = Module {
    name: "peftkit_swiglu",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/swiglu.ptx")),
    entries: &["swiglu_fwd_f32", "swiglu_fwd_bf16", "swiglu_bwd_f32", "swiglu_bwd_bf16"],
};

pub(crate) const DROPOUT: Module = Module {
    name: "peftkit_dropout",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/dropout.ptx")),
    entries: &["dropout_f32", "dropout_bf16"],
};

pub(crate) const ADAMW: Module = Module {
    name: "peftkit_adamw",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/adamw.ptx")),
    entries: &["adamw_step_f32"],
};

/// Every module, for the test that their PTX defines what the Rust side loads.
#[cfg(test)]
pub(crate) const MODULES: [&Module; 5] = [&RMS_NORM, &ROPE, &SWIGLU, &DROPOUT, &ADAMW];

/// Threads per block of the element-wise kernels (`PEFTKIT_THREADS` in common.cuh).
pub(crate) const THREADS: u32 = 256;

/// Blocks of an element-wise grid-stride launch are capped here (enough to fill any GPU many times over).
const MAX_BLOCKS: u64 = 65_535;

/// The function `name` of `module` on `dev` (the module is loaded once per device, then cached by candle).
pub(crate) fn func(dev: &CudaDevice, module: &Module, name: &str) -> Result<CudaFunction> {
    debug_assert!(module.entries.contains(&name), "{name} is not listed in {}", module.name);
    Ok(dev.get_or_load_custom_func(name, module.name, module.ptx)?.into_cuda_function())
}

/// The element-wise launch shape for `n` items: ⌈n/256⌉ blocks of 256 threads, at most [`MAX_BLOCKS`] (the kernels
/// loop with a grid stride).
pub(crate) fn elementwise(n: usize) -> LaunchConfig {
    let blocks = (n as u64).div_ceil(THREADS as u64).clamp(1, MAX_BLOCKS) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// The kernel-name suffix of a storage dtype: `f32` or `bf16`.
pub(crate) fn suffix(dtype: DType, op: &str) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        other => candle_core::bail!("{op}: the CUDA kernels take f32 or bf16, not {other:?}"),
    }
}

/// The (start, end) element offsets of a contiguous layout.
pub(crate) fn offsets(l: &Layout, op: &str) -> Result<(usize, usize)> {
    l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("{op}: input must be contiguous")))
}

/// The elements of `s` that `l` (contiguous) covers, as a device view starting at the layout's offset.
pub(crate) fn view<'a, T: CudaDType + DeviceRepr>(s: &'a CudaStorage, l: &Layout, op: &str) -> Result<CudaView<'a, T>> {
    let (start, end) = offsets(l, op)?;
    Ok(s.as_cuda_slice::<T>()?.slice(start..end))
}

/// A new uninitialised device buffer of `n` elements (every kernel writes all of its output).
pub(crate) fn alloc<T: DeviceRepr>(
    dev: &CudaDevice,
    n: usize,
) -> Result<candle_core::cuda::cudarc::driver::CudaSlice<T>> {
    // SAFETY: the launch that follows writes every element before anyone reads the buffer.
    unsafe { dev.alloc::<T>(n.max(1)) }
}

/// Converts a launch result into candle's error.
pub(crate) fn launched<O>(r: std::result::Result<O, candle_core::cuda::cudarc::driver::DriverError>) -> Result<()> {
    r.map(|_| ()).w()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptx_has_every_kernel() {
        for m in MODULES {
            for name in m.entries {
                assert!(m.ptx.contains(&format!(".entry {name}(")), "{name} missing from the PTX of {}", m.name);
            }
        }
    }
}

#[cfg(test)]
mod gpu_tests;
