//! NF4 on CUDA (feature `cuda`): an [`Nf4Tensor`] uploaded to the GPU, dequantized by one fused kernel, and
//! multiplied by small activations (M ≤ 64) with a fused dequantize + tensor-core GEMM.
//!
//! ```text
//! w[e]     = code[nibble(e)] · scale[e / blocksize]   (blocksize 64)   nibble(e): high nibble of packed[e/2] if e even
//! scale[b] = absmax[b]                       (plain)
//! scale[b] = code2[q[b]] · absmax2[b / 256] + offset   (double quantization; two f32 roundings, no FMA)
//! dequantize: out = w (bf16 = the f32 value rounded to nearest even; f32 = bit-identical to the CPU codec)
//! gemv:       y (M × N, bf16) = x (M × K, bf16) · bf16(w)ᵀ (N × K),  f32 accumulation,  M ≤ 64
//! ```
//!
//! The kernels (`nf4.cu`, compiled to PTX for `compute_80` by `build.rs`, JIT-compiled by the driver on sm_80+) run
//! on candle's stream for the device, so they order with candle's own ops; their outputs are ordinary candle
//! tensors. [`Nf4Cuda::dequantize_into`] writes into a caller-owned [`DequantBuffer`] reused across weights (the
//! training path: dequantize, then cuBLAS); [`Nf4Cuda::gemv`] is the generation path (reads each packed weight byte
//! once for all M rows). [`dequant_gbps`], [`copy_gbps`] and [`gemv_vs_cublas`] are the measurements for
//! `peftkit bench`.
//!
//! Reference: Dettmers et al., "QLoRA" (2023); bitsandbytes 0.50 `csrc/kernels.cu` (`kDequantizeBlockwise`,
//! `kgemm_4bit_inference_naive`); the PTX ISA's `mma.m16n8k16` fragment layouts.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda::CudaDType;
use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, CudaDevice, CudaStorage, DType, Device, InplaceOp1, Layout, Storage, Tensor};
use cudarc::driver::sys::{CUdevice_attribute, CUevent_flags};
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, DriverError, LaunchConfig, PushKernelArg};
use half::bf16;

use crate::quant::nf4::{Absmax, Nf4Tensor};

/// The kernels' PTX, compiled by build.rs from `nf4.cu`.
pub const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/nf4.ptx"));

/// The module name under which the PTX is registered with candle's device (`get_or_load_custom_func`).
const MODULE: &str = "peftkit_nf4";

/// Threads per block of every kernel (`NF4_THREADS` in nf4.cu).
const THREADS: u32 = 256;

/// The largest M (rows of x) [`Nf4Cuda::gemv`] accepts.
pub const GEMV_MAX_M: usize = 64;

/// The M values [`gemv_vs_cublas`] is meant to be run at.
pub const GEMV_BENCH_MS: [usize; 7] = [1, 2, 4, 8, 16, 32, 64];

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

type Result<T> = std::result::Result<T, Nf4CudaError>;

/// The block scales on the device.
enum Scales {
    Plain { absmax: CudaSlice<f32> },
    Double { q: CudaSlice<u8>, code2: CudaSlice<f32>, absmax2: CudaSlice<f32>, offset: f32, blocksize2: u32 },
}

/// The kernels one tensor uses (plain or double-quantized scales), loaded from candle's module cache.
struct Kernels {
    dequant_bf16: CudaFunction,
    dequant_f32: CudaFunction,
    /// `gemm[mt - 1]`: M ≤ 16·mt, K % 32 == 0.
    gemm: [CudaFunction; 4],
    gemm_generic: CudaFunction,
    splitk_reduce: CudaFunction,
}

impl Kernels {
    fn load(dev: &CudaDevice, double: bool) -> Result<Self> {
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

/// An NF4 weight on a CUDA device: packed codes, block scales (plain or double-quantized) and the code tables, as
/// the CPU [`Nf4Tensor`] holds them.
pub struct Nf4Cuda {
    shape: Vec<usize>,
    n: usize,
    blocksize: usize,
    log2_bs: u32,
    bytes: usize,
    device: Device,
    cuda: CudaDevice,
    stream: Arc<CudaStream>,
    sms: u32,
    kernels: Kernels,
    packed: CudaSlice<u8>,
    code: CudaSlice<f32>,
    scales: Scales,
}

impl std::fmt::Debug for Nf4Cuda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nf4Cuda")
            .field("shape", &self.shape)
            .field("blocksize", &self.blocksize)
            .field("double_quant", &matches!(self.scales, Scales::Double { .. }))
            .field("device", &self.device)
            .finish()
    }
}

/// How [`Nf4Cuda::gemv`] runs a product (chosen from M, N, K and the number of SMs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GemmPlan {
    /// Tensor-core kernel with `mt` m16 tiles; K is cut into `splits` ranges of `tiles_per_split` 128-wide tiles
    /// (`splits > 1`: f32 partials, then a fixed-order reduction).
    TensorCore { mt: usize, tiles_per_split: usize, splits: usize },
    /// K % 32 != 0: the generic kernel (one warp per output column).
    Generic,
}

/// k-tiles (of 128) per shared-memory stage of the tensor-core kernel for `mt` m16 tiles (KC / 128 in nf4.cu).
fn gemm_chunk_tiles(mt: usize) -> usize {
    if mt <= 2 {
        4
    } else {
        2
    }
}

/// Picks the kernel and the split of K: enough blocks (about 4 per SM) to keep every SM's memory pipe busy even
/// when N alone gives few, each split a whole number of shared-memory stages.
fn gemm_plan(m: usize, n: usize, k: usize, sms: usize) -> GemmPlan {
    if !k.is_multiple_of(32) {
        return GemmPlan::Generic;
    }
    let mt = m.div_ceil(16).clamp(1, 4);
    let ct = gemm_chunk_tiles(mt);
    let k_tiles = k.div_ceil(128);
    let blocks_n = n.div_ceil(64);
    let target = (4 * sms.max(1)).max(1);
    let want = target.div_ceil(blocks_n).clamp(1, k_tiles);
    let tiles_per_split = k_tiles.div_ceil(want).next_multiple_of(ct);
    let splits = k_tiles.div_ceil(tiles_per_split);
    GemmPlan::TensorCore { mt, tiles_per_split, splits }
}

/// Launch grid of the dequantization kernel: one 32-element chunk per thread, at most 32 blocks per SM (then the
/// kernel's grid-stride loop takes over).
fn dequant_grid(n: usize, sms: u32, max_blocks: Option<u32>) -> u32 {
    let chunks = (n / 32).max(1);
    let blocks = chunks.div_ceil(THREADS as usize).min(32 * sms.max(1) as usize).max(1) as u32;
    max_blocks.map_or(blocks, |m| blocks.min(m.max(1)))
}

fn cfg(blocks: (u32, u32), threads: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (blocks.0, blocks.1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

impl Nf4Cuda {
    /// Copies `t` (codes, scales, code tables) to the CUDA `device`.
    pub fn upload(t: &Nf4Tensor, device: &Device) -> Result<Self> {
        let Device::Cuda(cuda) = device else {
            return Err(Nf4CudaError::NotCuda(device.location()));
        };
        let stream = cuda.cuda_stream();
        let sms =
            stream.context().attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?.max(1) as u32;
        let scales = match t.absmax() {
            Absmax::Plain(a) => Scales::Plain { absmax: stream.clone_htod(a.as_slice())? },
            Absmax::Double { q, offset, absmax2, code, blocksize2 } => Scales::Double {
                q: stream.clone_htod(q.as_slice())?,
                code2: stream.clone_htod(code.as_slice())?,
                absmax2: stream.clone_htod(absmax2.as_slice())?,
                offset: *offset,
                blocksize2: u32::try_from(*blocksize2).map_err(|_| Nf4CudaError::TooLarge {
                    shape: t.shape().to_vec(),
                    what: "nested blocksize",
                    value: *blocksize2,
                })?,
            },
        };
        let kernels = Kernels::load(cuda, matches!(scales, Scales::Double { .. }))?;
        Ok(Self {
            shape: t.shape().to_vec(),
            n: t.n(),
            blocksize: t.blocksize(),
            // Nf4Tensor only holds bitsandbytes' blocksizes: powers of two from 32 to 4096.
            log2_bs: t.blocksize().trailing_zeros(),
            bytes: t.bytes(),
            device: device.clone(),
            cuda: cuda.clone(),
            sms,
            kernels,
            packed: stream.clone_htod(t.packed())?,
            code: stream.clone_htod(t.code().as_slice())?,
            scales,
            stream,
        })
    }

    /// The logical shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Rows of the 2-D view (N of the product): all dimensions but the last.
    pub fn rows(&self) -> usize {
        self.n / self.cols()
    }

    /// Columns of the 2-D view (K of the product): the last dimension.
    pub fn cols(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }

    /// Elements per 4-bit block.
    pub fn blocksize(&self) -> usize {
        self.blocksize
    }

    /// Whether the block scales are double-quantized.
    pub fn double_quant(&self) -> bool {
        matches!(self.scales, Scales::Double { .. })
    }

    /// Device storage in bytes, as [`Nf4Tensor::bytes`] counts it (codes + scales, not the code tables).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The device the weight lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Dequantizes the whole weight into a new bf16 tensor of the weight's shape.
    pub fn dequantize_bf16(&self) -> Result<Tensor> {
        let mut out = unsafe { self.stream.alloc::<bf16>(self.n) }?;
        self.launch_dequant(&self.kernels.dequant_bf16, &mut out, None)?;
        Ok(self.wrap(out, &self.shape))
    }

    /// Dequantizes the whole weight into a new f32 tensor of the weight's shape (bit-identical to
    /// [`Nf4Tensor::dequantize`]).
    pub fn dequantize_f32(&self) -> Result<Tensor> {
        let mut out = unsafe { self.stream.alloc::<f32>(self.n) }?;
        self.launch_dequant(&self.kernels.dequant_f32, &mut out, None)?;
        Ok(self.wrap(out, &self.shape))
    }

    /// Dequantizes into `buf` (grown when too small, reused otherwise) and returns the weight-shaped view of it.
    ///
    /// The view shares the buffer's memory: it holds this weight until the next `dequantize_into` on the same
    /// buffer, which overwrites it (stream order makes that safe for work already queued that reads the view, e.g.
    /// a matmul). Keep one buffer per device and dtype, sized by the largest weight.
    pub fn dequantize_into(&self, buf: &mut DequantBuffer) -> Result<Tensor> {
        if !buf.device.same_device(&self.device) {
            return Err(Nf4CudaError::WrongDevice {
                shape: self.shape.clone(),
                what: "the dequantization buffer",
                got: buf.device.location(),
                expected: self.device.location(),
            });
        }
        let storage = match &buf.storage {
            Some(t) if t.elem_count() >= self.n => t.clone(),
            _ => {
                // Grow: the old allocation is freed once no view of it is left.
                let t = match buf.dtype {
                    DType::BF16 => self.wrap(unsafe { self.stream.alloc::<bf16>(self.n) }?, &[self.n]),
                    DType::F32 => self.wrap(unsafe { self.stream.alloc::<f32>(self.n) }?, &[self.n]),
                    other => return Err(Nf4CudaError::BufferDType(other)),
                };
                buf.storage = Some(t.clone());
                t
            }
        };
        storage.inplace_op1(&DequantInto { w: self })?;
        Ok(storage.narrow(0, 0, self.n)?.reshape(self.shape.as_slice())?)
    }

    /// Dequantizes into the first [`n`](Self::n) elements of `out` (bf16 or f32: `T` = `half::bf16` | `f32`), for
    /// callers that hold raw device storage, e.g. inside a candle `CustomOp`'s `cuda_fwd`. `out` must be a whole
    /// allocation (its start is 16-byte aligned) on this weight's device.
    pub fn dequantize_into_slice<T: DequantOut>(&self, out: &mut CudaSlice<T>) -> Result<()> {
        if out.len() < self.n {
            return Err(Nf4CudaError::OutLen { shape: self.shape.clone(), got: out.len(), expected: self.n });
        }
        let f = if T::BF16 { &self.kernels.dequant_bf16 } else { &self.kernels.dequant_f32 };
        self.launch_dequant(f, out, None)
    }

    /// `y = x · Wᵀ` with the dequantized weight, for x of shape (…, K) in bf16 whose leading dimensions hold M ≤ 64
    /// rows; y is bf16 of shape (…, N), accumulated in f32. W is the 2-D view (N = [`rows`](Self::rows),
    /// K = [`cols`](Self::cols)). Each packed weight byte is read once for all M rows.
    pub fn gemv(&self, x: &Tensor) -> Result<Tensor> {
        let (n, k) = (self.rows(), self.cols());
        let dims = x.dims().to_vec();
        let m: usize = dims[..dims.len().saturating_sub(1)].iter().product();
        if dims.last() != Some(&k) || m == 0 || m > GEMV_MAX_M {
            return Err(Nf4CudaError::XShape { weight: self.shape.clone(), n, k, x: dims });
        }
        if x.dtype() != DType::BF16 {
            return Err(Nf4CudaError::XDType { weight: self.shape.clone(), got: x.dtype() });
        }
        if !x.device().same_device(&self.device) {
            return Err(Nf4CudaError::WrongDevice {
                shape: self.shape.clone(),
                what: "x",
                got: x.device().location(),
                expected: self.device.location(),
            });
        }
        for (what, value) in [("N (weight rows)", n), ("K (weight columns)", k), ("M·N", m * n)] {
            if value > (u32::MAX - 256) as usize {
                return Err(Nf4CudaError::TooLarge { shape: self.shape.clone(), what, value });
            }
        }
        // The kernels read x as a dense (M, K) array with 16-byte loads from its start.
        let x = if x.is_contiguous() && x.layout().start_offset().is_multiple_of(8) {
            x.clone()
        } else {
            x.force_contiguous()?
        };
        let (x_storage, x_layout) = x.storage_and_layout();
        let Storage::Cuda(x_cuda) = &*x_storage else {
            return Err(Nf4CudaError::NotCuda(x.device().location()));
        };
        let x_off = x_layout.start_offset();
        let x_view = x_cuda.as_cuda_slice::<bf16>()?.slice(x_off..x_off + m * k);

        let mut y = unsafe { self.stream.alloc::<bf16>(m * n) }?;
        let (m32, n32, k32) = (m as u32, n as u32, k as u32);
        match gemm_plan(m, n, k, self.sms as usize) {
            GemmPlan::Generic => {
                let blocks = n.div_ceil((THREADS / 32) as usize).min(8 * self.sms as usize).max(1) as u32;
                let mut b = self.stream.launch_builder(&self.kernels.gemm_generic);
                b.arg(&x_view).arg(&self.packed);
                self.push_scales(&mut b);
                b.arg(&self.code).arg(&mut y).arg(&m32).arg(&n32).arg(&k32).arg(&self.log2_bs);
                unsafe { b.launch(cfg((blocks, 1), THREADS)) }?;
            }
            GemmPlan::TensorCore { mt, tiles_per_split, splits } => {
                let grid = (n.div_ceil(64) as u32, splits as u32);
                let tps = tiles_per_split as u32;
                let f = &self.kernels.gemm[mt - 1];
                if splits == 1 {
                    let null_ws: u64 = 0;
                    let mut b = self.stream.launch_builder(f);
                    b.arg(&x_view).arg(&self.packed);
                    self.push_scales(&mut b);
                    b.arg(&self.code).arg(&mut y).arg(&null_ws);
                    b.arg(&m32).arg(&n32).arg(&k32).arg(&self.log2_bs).arg(&tps);
                    unsafe { b.launch(cfg(grid, THREADS)) }?;
                } else {
                    let mut ws = unsafe { self.stream.alloc::<f32>(splits * m * n) }?;
                    let mut b = self.stream.launch_builder(f);
                    b.arg(&x_view).arg(&self.packed);
                    self.push_scales(&mut b);
                    b.arg(&self.code).arg(&mut y).arg(&mut ws);
                    b.arg(&m32).arg(&n32).arg(&k32).arg(&self.log2_bs).arg(&tps);
                    unsafe { b.launch(cfg(grid, THREADS)) }?;
                    let mn = (m * n) as u32;
                    let s32 = splits as u32;
                    let blocks = (m * n).div_ceil(THREADS as usize).min(32 * self.sms as usize).max(1) as u32;
                    let mut b = self.stream.launch_builder(&self.kernels.splitk_reduce);
                    b.arg(&ws).arg(&mut y).arg(&mn).arg(&s32);
                    unsafe { b.launch(cfg((blocks, 1), THREADS)) }?;
                }
            }
        }
        drop(x_storage);
        let mut out_dims = dims;
        if let Some(last) = out_dims.last_mut() {
            *last = n;
        }
        Ok(self.wrap(y, &out_dims))
    }

    /// Pushes the scale arguments in the order of the kernels' signatures (`absmax` | `q, code2, absmax2, offset,
    /// blocksize2`).
    fn push_scales<'a>(&'a self, b: &mut cudarc::driver::LaunchArgs<'a>) {
        match &self.scales {
            Scales::Plain { absmax } => {
                b.arg(absmax);
            }
            Scales::Double { q, code2, absmax2, offset, blocksize2 } => {
                b.arg(q).arg(code2).arg(absmax2).arg(offset).arg(blocksize2);
            }
        }
    }

    /// Launches a dequantization kernel writing `self.n` elements at the start of `out` (16-byte aligned: an
    /// allocation's start). `max_blocks` caps the grid (tests use it to exercise the grid-stride loop).
    fn launch_dequant<T>(&self, f: &CudaFunction, out: &mut CudaSlice<T>, max_blocks: Option<u32>) -> Result<()> {
        let n64 = self.n as u64;
        let mut out = out.slice_mut(0..self.n);
        let mut b = self.stream.launch_builder(f);
        b.arg(&self.packed);
        self.push_scales(&mut b);
        b.arg(&self.code).arg(&mut out).arg(&n64).arg(&self.log2_bs);
        unsafe { b.launch(cfg((dequant_grid(self.n, self.sms, max_blocks), 1), THREADS)) }?;
        Ok(())
    }

    /// A candle tensor (no gradient history) owning `slice`.
    fn wrap<T: CudaDType>(&self, slice: CudaSlice<T>, shape: &[usize]) -> Tensor {
        let storage = CudaStorage::wrap_cuda_slice(slice, self.cuda.clone());
        Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false)
    }
}

/// An output element type of the dequantization kernels: `half::bf16` or `f32`.
pub trait DequantOut: cudarc::driver::DeviceRepr + private::Sealed {
    #[doc(hidden)]
    const BF16: bool;
}

impl DequantOut for bf16 {
    const BF16: bool = true;
}

impl DequantOut for f32 {
    const BF16: bool = false;
}

mod private {
    pub trait Sealed {}
    impl Sealed for half::bf16 {}
    impl Sealed for f32 {}
}

/// A device buffer that [`Nf4Cuda::dequantize_into`] reuses across weights: one per device and dtype, grown to
/// the largest weight it has held.
#[derive(Debug)]
pub struct DequantBuffer {
    device: Device,
    dtype: DType,
    storage: Option<Tensor>,
}

impl DequantBuffer {
    /// An empty buffer for `device` that will hold `dtype` (bf16 or f32) values.
    pub fn new(device: &Device, dtype: DType) -> Result<Self> {
        if !device.is_cuda() {
            return Err(Nf4CudaError::NotCuda(device.location()));
        }
        if !matches!(dtype, DType::BF16 | DType::F32) {
            return Err(Nf4CudaError::BufferDType(dtype));
        }
        Ok(Self { device: device.clone(), dtype, storage: None })
    }

    /// Elements the buffer holds now.
    pub fn capacity(&self) -> usize {
        self.storage.as_ref().map_or(0, |t| t.elem_count())
    }

    /// The dtype of the values it holds.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
}

/// The in-place op that writes a weight into a [`DequantBuffer`]'s storage (under candle's storage lock).
struct DequantInto<'a> {
    w: &'a Nf4Cuda,
}

impl InplaceOp1 for DequantInto<'_> {
    fn name(&self) -> &'static str {
        "nf4-dequantize-into"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("nf4-dequantize-into: the buffer is on the CPU, the weight on a CUDA device")
    }

    fn cuda_fwd(&self, storage: &mut CudaStorage, layout: &Layout) -> candle_core::Result<()> {
        if layout.start_offset() != 0 || !layout.is_contiguous() || layout.shape().elem_count() < self.w.n {
            candle_core::bail!("nf4-dequantize-into: the buffer is not a dense array of ≥ {} elements", self.w.n)
        }
        let r = match storage.dtype() {
            DType::BF16 => self.w.dequantize_into_slice(storage.as_cuda_slice_mut::<bf16>()?),
            DType::F32 => self.w.dequantize_into_slice(storage.as_cuda_slice_mut::<f32>()?),
            other => candle_core::bail!("nf4-dequantize-into: buffer dtype {other:?}, expected bf16 or f32"),
        };
        r.map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Measurements for `peftkit bench`
// ---------------------------------------------------------------------------------------------------------------

/// A random NF4 weight of the given shape: random codes and scales (throughput does not depend on the values).
fn random_nf4(rows: usize, cols: usize, double_quant: bool, seed: u64) -> std::result::Result<Nf4Tensor, String> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n = rows * cols;
    let blocks = n.div_ceil(crate::quant::NF4_BLOCKSIZE);
    let packed: Vec<u8> = (0..n.div_ceil(2)).map(|_| rng.random()).collect();
    let absmax = if double_quant {
        Absmax::Double {
            q: (0..blocks).map(|_| rng.random()).collect(),
            offset: 0.02,
            absmax2: (0..blocks.div_ceil(crate::quant::NESTED_BLOCKSIZE)).map(|_| rng.random::<f32>() * 0.01).collect(),
            code: crate::quant::dynamic_map_signed().to_vec(),
            blocksize2: crate::quant::NESTED_BLOCKSIZE,
        }
    } else {
        Absmax::Plain((0..blocks).map(|_| rng.random::<f32>() * 0.05).collect())
    };
    Nf4Tensor::from_bnb_parts(packed, absmax, &crate::quant::NF4_CODE, crate::quant::NF4_BLOCKSIZE, &[rows, cols])
        .map_err(|e| e.to_string())
}

/// Mean microseconds per call of `f` over `reps` calls (after one warm-up call), timed with CUDA events on
/// `stream`.
fn time_us(stream: &Arc<CudaStream>, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let reps = reps.max(1);
    f()?;
    stream.synchronize()?;
    let start = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    for _ in 0..reps {
        f()?;
    }
    let end = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    let ms = start.elapsed_ms(&end)?;
    Ok(f64::from(ms) * 1000.0 / reps as f64)
}

/// One dequantization measurement.
#[derive(Clone, Debug)]
pub struct DequantBench {
    pub rows: usize,
    pub cols: usize,
    pub dtype: DType,
    pub double_quant: bool,
    /// Bytes moved per pass: codes + scales read ([`Nf4Tensor::bytes`]) plus the output written.
    pub bytes: usize,
    /// Mean time per pass.
    pub micros: f64,
    /// `bytes / time`, in 10⁹ bytes per second.
    pub gbps: f64,
}

/// Dequantization throughput of a random (rows × cols) NF4 weight into a reused `dtype` (bf16 or f32) buffer,
/// as (bytes read + bytes written) / time. Compare with [`copy_gbps`]`(device, bench.bytes / 2, reps)`, which moves
/// the same number of bytes.
pub fn dequant_gbps(
    device: &Device,
    rows: usize,
    cols: usize,
    dtype: DType,
    double_quant: bool,
    reps: usize,
) -> Result<DequantBench> {
    let t = random_nf4(rows, cols, double_quant, 0).map_err(candle_core::Error::Msg)?;
    let w = Nf4Cuda::upload(&t, device)?;
    let mut buf = DequantBuffer::new(device, dtype)?;
    let micros = time_us(&w.stream, reps, || w.dequantize_into(&mut buf).map(|_| ()))?;
    let bytes = w.bytes() + w.n() * dtype.size_in_bytes();
    Ok(DequantBench { rows, cols, dtype, double_quant, bytes, micros, gbps: bytes as f64 / micros / 1e3 })
}

/// Device-to-device copy bandwidth for a copy of `bytes` bytes, as (bytes read + bytes written) / time =
/// 2·bytes / time, in 10⁹ bytes per second: the ceiling the dequantization kernel is measured against.
pub fn copy_gbps(device: &Device, bytes: usize, reps: usize) -> Result<f64> {
    let Device::Cuda(cuda) = device else {
        return Err(Nf4CudaError::NotCuda(device.location()));
    };
    let stream = cuda.cuda_stream();
    let src = stream.alloc_zeros::<u8>(bytes.max(1))?;
    let mut dst = unsafe { stream.alloc::<u8>(bytes.max(1)) }?;
    let micros = time_us(&stream, reps, || Ok(stream.memcpy_dtod(&src, &mut dst)?))?;
    Ok(2.0 * bytes as f64 / micros / 1e3)
}

/// One row of [`gemv_vs_cublas`].
#[derive(Clone, Debug)]
pub struct GemvTiming {
    pub m: usize,
    /// Fused dequantize + GEMM ([`Nf4Cuda::gemv`]), µs per product.
    pub fused_us: f64,
    /// Dequantize into a reused bf16 buffer, then candle's bf16 matmul (cuBLAS), µs per product.
    pub dequant_cublas_us: f64,
    /// `dequant_cublas_us / fused_us`.
    pub speedup: f64,
    /// max |fused − dequantize-then-matmul| over the output, relative to max |dequantize-then-matmul|.
    pub rel_diff: f32,
}

/// The fused small-M product against dequantize-then-cuBLAS for a random double-quantized (n × k) weight at each
/// M in `ms` (≤ 64; [`GEMV_BENCH_MS`] is the usual list).
pub fn gemv_vs_cublas(device: &Device, n: usize, k: usize, ms: &[usize], reps: usize) -> Result<Vec<GemvTiming>> {
    let t = random_nf4(n, k, true, 1).map_err(candle_core::Error::Msg)?;
    let w = Nf4Cuda::upload(&t, device)?;
    let mut buf = DequantBuffer::new(device, DType::BF16)?;
    let mut rows = Vec::with_capacity(ms.len());
    for &m in ms {
        let x = Tensor::randn(0f32, 1.0, (m, k), device)?.to_dtype(DType::BF16)?;
        let fused_us = time_us(&w.stream, reps, || w.gemv(&x).map(|_| ()))?;
        let dequant_cublas_us = time_us(&w.stream, reps, || {
            let wd = w.dequantize_into(&mut buf)?; // (n, k)
            x.matmul(&wd.t()?)?; // (m, k)·(k, n) → (m, n)
            Ok(())
        })?;
        let fused = w.gemv(&x)?.to_dtype(DType::F32)?;
        let reference = x.matmul(&w.dequantize_into(&mut buf)?.t()?)?.to_dtype(DType::F32)?;
        let scale = reference.abs()?.max_all()?.to_scalar::<f32>()?.max(f32::MIN_POSITIVE);
        let rel_diff = (fused - &reference)?.abs()?.max_all()?.to_scalar::<f32>()? / scale;
        rows.push(GemvTiming { m, fused_us, dequant_cublas_us, speedup: dequant_cublas_us / fused_us, rel_diff });
    }
    Ok(rows)
}

#[cfg(all(test, feature = "cuda"))]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use std::io::Write;

    /// The first CUDA device, or None after a SKIPPED line when there is none.
    fn gpu(test: &str) -> Option<Device> {
        match Device::new_cuda(0) {
            Ok(d) => Some(d),
            Err(e) => {
                // The first line only: candle appends a backtrace when RUST_BACKTRACE is set.
                let e = e.to_string();
                let e = e.lines().next().unwrap_or_default();
                let _ = writeln!(std::io::stderr(), "SKIPPED {test}: no CUDA device ({e})");
                None
            }
        }
    }

    fn gaussian(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                let u1: f32 = rng.random::<f32>().max(f32::MIN_POSITIVE);
                let u2: f32 = rng.random();
                (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
            })
            .collect()
    }

    /// Odd sizes, partial blocks, rows that start mid-byte, more than one 256-block group of scales.
    const SHAPES: [&[usize]; 9] =
        [&[1], &[1, 1], &[7, 13], &[3, 65], &[129], &[31, 33], &[301, 263], &[64, 128], &[17, 2049]];

    #[test]
    fn ptx_has_every_kernel() {
        for name in [
            "nf4_dequant_bf16_plain",
            "nf4_dequant_bf16_double",
            "nf4_dequant_f32_plain",
            "nf4_dequant_f32_double",
            "nf4_gemm_plain_mt1",
            "nf4_gemm_double_mt4",
            "nf4_splitk_reduce",
            "nf4_gemm_generic_plain",
            "nf4_gemm_generic_double",
        ] {
            assert!(PTX.contains(&format!(".entry {name}(")), "{name} missing from the PTX");
        }
    }

    #[test]
    fn weights_and_buffers_can_be_shared_across_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Nf4Cuda>();
        send_sync::<DequantBuffer>();
        send_sync::<Nf4CudaError>();
    }

    #[test]
    fn plans_cover_k_with_whole_stages() {
        for (m, n, k) in [(1, 4096, 4096), (64, 4096, 14336), (17, 14336, 4096), (3, 8, 96), (1, 64, 4096), (5, 9, 32)]
        {
            match gemm_plan(m, n, k, 132) {
                GemmPlan::TensorCore { mt, tiles_per_split, splits } => {
                    assert_eq!(mt, m.div_ceil(16));
                    let kt = k.div_ceil(128);
                    assert_eq!(tiles_per_split % gemm_chunk_tiles(mt), 0);
                    assert!(splits >= 1 && (splits - 1) * tiles_per_split < kt && splits * tiles_per_split >= kt);
                }
                GemmPlan::Generic => panic!("K % 32 == 0 takes the tensor-core kernel"),
            }
        }
        assert_eq!(gemm_plan(4, 100, 130, 132), GemmPlan::Generic);
        assert_eq!(gemm_plan(4, 100, 63, 132), GemmPlan::Generic);
    }

    #[test]
    fn dequantize_matches_the_cpu_codec() {
        let Some(dev) = gpu("dequantize_matches_the_cpu_codec") else { return };
        for (i, shape) in SHAPES.iter().enumerate() {
            let n: usize = shape.iter().product();
            let data = gaussian(n, 100 + i as u64);
            for double in [false, true] {
                for blocksize in [64, 32, 256] {
                    let t = Nf4Tensor::quantize_with_blocksize(&data, shape, blocksize, double).unwrap();
                    let cpu = t.dequantize();
                    let w = Nf4Cuda::upload(&t, &dev).unwrap();
                    let f32s = w.dequantize_f32().unwrap();
                    assert_eq!(f32s.dims(), *shape);
                    let got = f32s.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    let d = got.iter().zip(&cpu).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                    assert!(d <= 1e-6, "{shape:?} double {double} bs {blocksize}: f32 max |Δ| = {d:e}");
                    let exact = got.iter().zip(&cpu).filter(|(a, b)| a.to_bits() == b.to_bits()).count();
                    let bf = w.dequantize_bf16().unwrap().flatten_all().unwrap().to_vec1::<bf16>().unwrap();
                    for (e, (g, c)) in bf.iter().zip(&cpu).enumerate() {
                        assert_eq!(
                            g.to_bits(),
                            bf16::from_f32(*c).to_bits(),
                            "{shape:?} double {double} bs {blocksize}: bf16 element {e}: {g} vs {c}"
                        );
                    }
                    println!("{shape:?} double {double} bs {blocksize}: f32 {exact}/{n} bit-identical, bf16 exact");
                }
            }
        }
    }

    #[test]
    fn grid_stride_loop_and_tail_cover_every_element() {
        let Some(dev) = gpu("grid_stride_loop_and_tail_cover_every_element") else { return };
        // 1 and 3 blocks of 256 threads for 300 000 elements: many chunks per thread, and a tail of 300000 % 32 = 0
        // ... plus 300 001 (odd n, tail of 1).
        for n in [300_000usize, 300_001, 8_192 * 32 + 31] {
            let data = gaussian(n, 7);
            let t = Nf4Tensor::quantize(&data, &[n], true).unwrap();
            let cpu = t.dequantize();
            let w = Nf4Cuda::upload(&t, &dev).unwrap();
            for max_blocks in [1u32, 3] {
                let mut out = w.stream.alloc_zeros::<f32>(n).unwrap();
                w.launch_dequant(&w.kernels.dequant_f32, &mut out, Some(max_blocks)).unwrap();
                let got = w.stream.clone_dtoh(&out).unwrap();
                assert!(got.iter().zip(&cpu).all(|(a, b)| a.to_bits() == b.to_bits()), "n {n} blocks {max_blocks}");
            }
        }
    }

    #[test]
    fn dequantize_into_reuses_and_grows_the_buffer() {
        let Some(dev) = gpu("dequantize_into_reuses_and_grows_the_buffer") else { return };
        let big = Nf4Tensor::quantize(&gaussian(96 * 200, 1), &[96, 200], true).unwrap();
        let small = Nf4Tensor::quantize(&gaussian(33 * 7, 2), &[33, 7], false).unwrap();
        let (wb, ws) = (Nf4Cuda::upload(&big, &dev).unwrap(), Nf4Cuda::upload(&small, &dev).unwrap());
        for dtype in [DType::BF16, DType::F32] {
            let mut buf = DequantBuffer::new(&dev, dtype).unwrap();
            assert_eq!(buf.capacity(), 0);
            let a = ws.dequantize_into(&mut buf).unwrap();
            assert_eq!((a.dims(), buf.capacity()), (&[33usize, 7][..], 33 * 7));
            let expect_small = small.dequantize();
            let got = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let round = |v: f32| if dtype == DType::BF16 { bf16::from_f32(v).to_f32() } else { v };
            assert!(got.iter().zip(&expect_small).all(|(g, c)| g.to_bits() == round(*c).to_bits()));
            let b = wb.dequantize_into(&mut buf).unwrap(); // grows
            assert_eq!((b.dims(), buf.capacity()), (&[96usize, 200][..], 96 * 200));
            let c = ws.dequantize_into(&mut buf).unwrap(); // reuses the grown buffer
            assert_eq!(buf.capacity(), 96 * 200);
            let got = c.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(got.iter().zip(&expect_small).all(|(g, c)| g.to_bits() == round(*c).to_bits()));
            let full = wb.dequantize_into(&mut buf).unwrap().to_dtype(DType::F32).unwrap();
            let expect_big = big.dequantize();
            let got = full.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(got.iter().zip(&expect_big).all(|(g, c)| g.to_bits() == round(*c).to_bits()));
        }
        assert!(DequantBuffer::new(&dev, DType::U8).is_err());
        assert!(DequantBuffer::new(&Device::Cpu, DType::BF16).is_err());
    }

    /// y = x · Wᵀ against the CPU codec's f32 weights (f64 sums), within bf16 rounding: the weight and the output
    /// are each rounded to bf16 once (relative 2⁻⁹ each), so |y − ref| ≤ 2⁻⁷ · Σ|x·w| holds with room to spare.
    #[test]
    fn gemv_matches_the_f32_reference() {
        let Some(dev) = gpu("gemv_matches_the_f32_reference") else { return };
        // (N, K): K % 128 == 0, K % 32 == 0 only (partial last k-tile), split-K (small N, long K), a single split
        // (large N), K % 32 != 0 (generic kernel) incl. odd K (rows start mid-byte, blocks straddle rows).
        let shapes = [(64, 128), (72, 96), (40, 4096), (2304, 256), (37, 130), (5, 63), (129, 1)];
        let ms = [1usize, 2, 3, 8, 15, 16, 17, 31, 33, 48, 64];
        let mut seed = 0;
        for &(n, k) in &shapes {
            for double in [false, true] {
                seed += 1;
                let t = Nf4Tensor::quantize(&gaussian(n * k, seed), &[n, k], double).unwrap();
                let wf = t.dequantize();
                let w = Nf4Cuda::upload(&t, &dev).unwrap();
                for &m in &ms {
                    let xs: Vec<bf16> = gaussian(m * k, 1000 + seed).into_iter().map(bf16::from_f32).collect();
                    let x = Tensor::from_vec(xs.clone(), (m, k), &dev).unwrap();
                    let y = w.gemv(&x).unwrap();
                    assert_eq!(y.dims(), &[m, n]);
                    let y = y.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
                    let mut worst = 0f64;
                    for r in 0..m {
                        for j in 0..n {
                            let (mut dot, mut mag) = (0f64, 0f64);
                            for kk in 0..k {
                                let p = xs[r * k + kk].to_f64() * wf[j * k + kk] as f64;
                                dot += p;
                                mag += p.abs();
                            }
                            let err = (y[r][j] as f64 - dot).abs();
                            assert!(
                                err <= mag / 128.0 + 1e-30,
                                "(N, K) = ({n}, {k}) double {double} M {m}: y[{r}][{j}] = {} vs {dot} (Σ|xw| = {mag})",
                                y[r][j]
                            );
                            worst = worst.max(err / mag.max(1e-30));
                        }
                    }
                    println!(
                        "(N, K) = ({n}, {k}) double {double} M {m} plan {:?}: max |Δ|/Σ|xw| = {worst:.2e}",
                        gemm_plan(m, n, k, w.sms as usize)
                    );
                }
            }
        }
    }

    #[test]
    fn gemv_takes_leading_dims_strided_and_offset_inputs() {
        let Some(dev) = gpu("gemv_takes_leading_dims_strided_and_offset_inputs") else { return };
        let (n, k) = (48, 256);
        let t = Nf4Tensor::quantize(&gaussian(n * k, 5), &[n, k], true).unwrap();
        let w = Nf4Cuda::upload(&t, &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 3, k), &dev).unwrap().to_dtype(DType::BF16).unwrap();
        let y = w.gemv(&x).unwrap(); // (2, 3, n)
        assert_eq!(y.dims(), &[2, 3, n]);
        let flat = w.gemv(&x.reshape((6, k)).unwrap()).unwrap();
        let same = |a: &Tensor, b: &Tensor| {
            let a = a.flatten_all().unwrap().to_vec1::<bf16>().unwrap();
            let b = b.flatten_all().unwrap().to_vec1::<bf16>().unwrap();
            a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits())
        };
        assert!(same(&y, &flat));
        // A transposed view and a row range starting at an offset that is not 16-byte aligned.
        let xt = x.reshape((6, k)).unwrap().t().unwrap().contiguous().unwrap().t().unwrap();
        assert!(same(&w.gemv(&xt).unwrap(), &flat));
        let big = Tensor::randn(0f32, 1.0, (7, k), &dev).unwrap().to_dtype(DType::BF16).unwrap();
        let tail = big.narrow(0, 1, 6).unwrap().narrow(1, 0, k).unwrap(); // offset k elements: aligned
        assert!(same(&w.gemv(&tail).unwrap(), &w.gemv(&tail.force_contiguous().unwrap()).unwrap()));
        let odd = Tensor::randn(0f32, 1.0, 6 * k + 3, &dev).unwrap().to_dtype(DType::BF16).unwrap();
        let odd = odd.narrow(0, 3, 6 * k).unwrap().reshape((6, k)).unwrap(); // offset 3 elements
        assert!(same(&w.gemv(&odd).unwrap(), &w.gemv(&odd.force_contiguous().unwrap()).unwrap()));
    }

    #[test]
    fn gemv_rejects_bad_inputs() {
        let Some(dev) = gpu("gemv_rejects_bad_inputs") else { return };
        let t = Nf4Tensor::quantize(&gaussian(8 * 64, 3), &[8, 64], true).unwrap();
        let w = Nf4Cuda::upload(&t, &dev).unwrap();
        let x = |m: usize, k: usize| Tensor::zeros((m, k), DType::BF16, &dev).unwrap();
        let e = w.gemv(&x(65, 64)).unwrap_err().to_string();
        assert!(e.contains("M ≤ 64") && e.contains("[65, 64]"), "{e}");
        assert!(matches!(w.gemv(&x(2, 63)), Err(Nf4CudaError::XShape { .. })));
        assert!(matches!(
            w.gemv(&Tensor::zeros((2, 64), DType::F32, &dev).unwrap()),
            Err(Nf4CudaError::XDType { got: DType::F32, .. })
        ));
        assert!(matches!(
            w.gemv(&Tensor::zeros((2, 64), DType::BF16, &Device::Cpu).unwrap()),
            Err(Nf4CudaError::WrongDevice { .. })
        ));
        assert!(matches!(Nf4Cuda::upload(&t, &Device::Cpu), Err(Nf4CudaError::NotCuda(_))));
    }
}
