//! GPU facts for reports and benchmarks: the device's name and memory, and the peak memory a run used.
//!
//! Peak memory is the high-water mark of the device's default memory pool (`CU_MEMPOOL_ATTR_USED_MEM_HIGH`):
//! cudarc allocates with `cuMemAllocAsync` from that pool when the driver supports it (every driver since CUDA
//! 11.2), so the mark counts every tensor candle and peftkit allocated, weights included — what torch reports as
//! `max_memory_allocated`. [`reset_peak`] restarts it. Where the context has no async allocation the pool is
//! unused and [`peak_bytes`] answers `None`; [`used_bytes`] (total − free, the whole process's use as the driver
//! sees it) is then the figure to sample.
//!
//! Without the `cuda` feature every function answers `None`.

use candle_core::Device;

/// Name and memory of a GPU.
#[derive(Debug, Clone)]
pub struct GpuInfo {
    /// The driver's name for it, e.g. `NVIDIA H200`.
    pub name: String,
    /// Compute capability (major, minor).
    pub capability: (i32, i32),
    /// Device memory in bytes.
    pub total_bytes: usize,
}

/// Dense bf16 tensor-core peak in TFLOP/s for the GPUs peftkit is measured on (datasheet figures, without
/// sparsity), for MFU; `None` for a GPU not in the table.
pub fn peak_bf16_tflops(name: &str) -> Option<f64> {
    const TABLE: [(&str, f64); 7] = [
        ("H200", 989.0),
        ("H100 PCIe", 756.0),
        ("H100", 989.0),
        ("A100", 312.0),
        ("L40S", 362.0),
        ("A10G", 70.0),
        ("RTX 4090", 165.0),
    ];
    TABLE.iter().find(|(n, _)| name.contains(n)).map(|&(_, t)| t)
}

#[cfg(feature = "cuda")]
mod imp {
    use super::GpuInfo;
    use candle_core::Device;
    use cudarc::driver::sys;
    use std::sync::Arc;

    fn context(device: &Device) -> Option<Arc<cudarc::driver::CudaContext>> {
        match device {
            Device::Cuda(c) => Some(c.cuda_stream().context().clone()),
            _ => None,
        }
    }

    pub fn info(device: &Device) -> Option<GpuInfo> {
        let ctx = context(device)?;
        Some(GpuInfo {
            name: ctx.name().ok()?,
            capability: ctx.compute_capability().ok()?,
            total_bytes: ctx.total_mem().ok()?,
        })
    }

    pub fn used_bytes(device: &Device) -> Option<usize> {
        let (free, total) = context(device)?.mem_get_info().ok()?;
        Some(total.saturating_sub(free))
    }

    /// The default memory pool of the context's device, when allocations go through it.
    fn pool(device: &Device) -> Option<sys::CUmemoryPool> {
        let ctx = context(device)?;
        if !ctx.has_async_alloc() {
            return None;
        }
        ctx.bind_to_thread().ok()?;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: a valid device handle and an out-pointer to a pool handle.
        let r = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) };
        (r == sys::CUresult::CUDA_SUCCESS).then_some(pool)
    }

    pub fn peak_bytes(device: &Device) -> Option<usize> {
        let pool = pool(device)?;
        let mut v: u64 = 0;
        // SAFETY: USED_MEM_HIGH is a cuuint64_t attribute; `v` is one.
        let r = unsafe {
            sys::cuMemPoolGetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                &mut v as *mut u64 as *mut std::ffi::c_void,
            )
        };
        (r == sys::CUresult::CUDA_SUCCESS).then_some(v as usize)
    }

    pub fn reset_peak(device: &Device) {
        if let Some(pool) = pool(device) {
            let mut zero: u64 = 0;
            // SAFETY: resetting USED_MEM_HIGH takes a cuuint64_t zero. A failure leaves the old mark (reported).
            let _ = unsafe {
                sys::cuMemPoolSetAttribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                    &mut zero as *mut u64 as *mut std::ffi::c_void,
                )
            };
        }
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use super::GpuInfo;
    use candle_core::Device;
    pub fn info(_: &Device) -> Option<GpuInfo> {
        None
    }
    pub fn used_bytes(_: &Device) -> Option<usize> {
        None
    }
    pub fn peak_bytes(_: &Device) -> Option<usize> {
        None
    }
    pub fn reset_peak(_: &Device) {}
}

/// Name, capability and memory of `device` (None for the CPU).
pub fn info(device: &Device) -> Option<GpuInfo> {
    imp::info(device)
}

/// Device memory in use now (total − free), in bytes.
pub fn used_bytes(device: &Device) -> Option<usize> {
    imp::used_bytes(device)
}

/// Peak bytes allocated from the device's memory pool since the process started or [`reset_peak`].
pub fn peak_bytes(device: &Device) -> Option<usize> {
    imp::peak_bytes(device)
}

/// Restarts [`peak_bytes`]' high-water mark at the memory in use now.
pub fn reset_peak(device: &Device) {
    imp::reset_peak(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_table_and_cpu_answers() {
        assert_eq!(peak_bf16_tflops("NVIDIA H200"), Some(989.0));
        assert_eq!(peak_bf16_tflops("NVIDIA H100 PCIe"), Some(756.0));
        assert_eq!(peak_bf16_tflops("NVIDIA A100-SXM4-80GB"), Some(312.0));
        assert_eq!(peak_bf16_tflops("Tesla T4"), None);
        assert!(info(&Device::Cpu).is_none() && peak_bytes(&Device::Cpu).is_none());
    }
}
