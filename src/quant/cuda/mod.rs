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
//!
//! Files: `kernels.rs` loads the PTX module and its functions; `dequant.rs` dequantizes (to a new tensor, into a
//! reused [`DequantBuffer`], into raw device storage); `gemv.rs` is the fused small-M product and its launch plan;
//! `bench.rs` holds the measurements; `error.rs` the error type. This file holds the weight itself: upload, accessors
//! and what every launch shares.

mod bench;
mod dequant;
mod error;
mod gemv;
mod kernels;

pub use bench::{copy_gbps, dequant_gbps, gemv_vs_cublas, DequantBench, GemvTiming};
pub use dequant::{DequantBuffer, DequantOut};
pub use error::Nf4CudaError;
pub use kernels::PTX;

use std::sync::Arc;

use candle_core::cuda::CudaDType;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, Device, Storage, Tensor};
use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaSlice, CudaStream, LaunchConfig, PushKernelArg};

use crate::quant::nf4::{Absmax, Nf4Tensor};
use error::Result;
use kernels::Kernels;

/// Threads per block of every kernel (`NF4_THREADS` in nf4.cu).
const THREADS: u32 = 256;

/// The largest M (rows of x) [`Nf4Cuda::gemv`] accepts.
pub const GEMV_MAX_M: usize = 64;

/// The M values [`gemv_vs_cublas`] is meant to be run at.
pub const GEMV_BENCH_MS: [usize; 7] = [1, 2, 4, 8, 16, 32, 64];

/// The block scales on the device.
enum Scales {
    Plain { absmax: CudaSlice<f32> },
    Double { q: CudaSlice<u8>, code2: CudaSlice<f32>, absmax2: CudaSlice<f32>, offset: f32, blocksize2: u32 },
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

    /// A candle tensor (no gradient history) owning `slice`.
    fn wrap<T: CudaDType>(&self, slice: CudaSlice<T>, shape: &[usize]) -> Tensor {
        let storage = CudaStorage::wrap_cuda_slice(slice, self.cuda.clone());
        Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false)
    }
}

#[cfg(all(test, feature = "cuda"))]
mod tests {
    use super::gemv::{gemm_chunk_tiles, gemm_plan, GemmPlan};
    use super::*;
    use candle_core::DType;
    use half::bf16;
    use rand::{Rng, SeedableRng};

    /// The GPU, or None after a SKIPPED line (a failure under `PEFTKIT_REQUIRE_GPU=1`).
    fn gpu(test: &str) -> Option<Device> {
        crate::compute::test_gpu(test)
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
