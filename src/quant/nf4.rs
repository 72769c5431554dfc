//! NF4 (4-bit NormalFloat) quantization, byte-identical to bitsandbytes (`quantize_4bit(quant_type="nf4")`).
//!
//! The flat (row-major) weight `w` of `n` elements is cut into blocks of `blocksize` (64) elements; the last block
//! may be partial. For block `b`:
//!
//! ```text
//! absmax[b] = max |w_i|                       (i in block b)
//! q_i       = bucket(clamp(w_i / absmax[b], -1, 1))   index of the nearest NF4 code value (a tie goes to the lower)
//! w_i      ≈ NF4_CODE[q_i] · absmax[b]
//! ```
//!
//! Two codes share a byte, the first element in the high nibble; for odd `n` the last low nibble encodes 0.0
//! (bitsandbytes pads the scaled input with a zero, code 7 for NF4).
//!
//! **Double quantization** (`compress_statistics=True`, QLoRA's default) stores the block scales themselves in
//! 8 bits: `offset = mean(absmax)`, then `absmax − offset` is quantized blockwise (blocksize 256) with the signed
//! 8-bit dynamic map ([`dynamic_map_signed`]), giving one byte per block plus one f32 `absmax2` per 256 blocks:
//!
//! ```text
//! absmax[b] ≈ DYNAMIC[q8[b]] · absmax2[b / 256] + offset
//! ```
//!
//! Bit-exactness notes (the fixtures from bitsandbytes 0.50 / torch on x86-64 CPU check all of them but the last
//! point's cascade levels, which start at 512 blocks):
//! - full blocks scale by the reciprocal (`w · (1/max(absmax, 1e-38))`), the partial last block divides
//!   (`w / max(absmax, 1e-38)`), and only the partial block *stores* the clamped absmax — as bitsandbytes' torch
//!   code does. An all-zero block therefore stores 0 (or 1e-38 when partial), codes 7, and dequantizes to exact 0s.
//! - the 8-bit step reproduces bitsandbytes' CPU kernel, which rounds through a 65 536-bin lookup table rather
//!   than an exact nearest-value search, with the bin index computed by a fused multiply-add as its x86-64 build
//!   does (its aarch64 build rounds the bin index slightly differently; rare ties may land one code apart).
//! - `offset` is computed in PyTorch's CPU summation order (8-lane vectors, 4 accumulators, cascaded levels), which
//!   differs from a correctly rounded mean by an ulp at times. Above 32 768 blocks PyTorch splits the sum across
//!   its threads (the result depends on the thread count), so there `offset` may differ from a given bitsandbytes
//!   run by an ulp; the stored checkpoint value is used verbatim by [`Nf4Tensor::from_bnb_parts`].
//!
//! Reference: Dettmers et al., "QLoRA" (2023), §3 (NF4, double quantization); bitsandbytes 0.50
//! `functional.py` (`quantize_4bit`, `create_dynamic_map`), `backends/default/ops.py`, `csrc/cpu_ops.cpp`.

use rayon::prelude::*;

/// bitsandbytes' `get_4bit_type("nf4")`: the 16 NF4 code values, sorted (each literal is the shortest one that
/// rounds to bitsandbytes' exact f32; the fixture test compares the bits).
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// Elements per 4-bit block (bitsandbytes' and QLoRA's default).
pub const NF4_BLOCKSIZE: usize = 64;

/// Blocks per second-level block when the absmax values are double-quantized.
pub const NESTED_BLOCKSIZE: usize = 256;

/// The 4-bit blocksizes bitsandbytes accepts (all even, so every block starts on a byte boundary).
const BNB_BLOCKSIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// Lower bound of a block's scale (bitsandbytes' `absmax.clamp(min=1e-38)`): all-zero blocks give 0, not NaN.
const ABSMAX_FLOOR: f32 = 1e-38;

/// Elements per rayon task for quantize/dequantize: a multiple of every blocksize, 64 KiB of f32 output.
const CHUNK: usize = 16 * 1024;

/// Errors building or using an [`Nf4Tensor`]. Every variant carries the tensor's shape.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error("NF4 tensor of shape {shape:?}: {len} values given, the shape holds {expected}")]
    DataLen { shape: Vec<usize>, len: usize, expected: usize },
    #[error("NF4 tensor of shape {shape:?}: an empty tensor cannot be quantized")]
    Empty { shape: Vec<usize> },
    #[error("NF4 tensor of shape {shape:?}: blocksize {blocksize} is not one bitsandbytes uses ({BNB_BLOCKSIZES:?})")]
    Blocksize { shape: Vec<usize>, blocksize: usize },
    #[error("NF4 tensor of shape {shape:?}: nested blocksize must be positive")]
    NestedBlocksize { shape: Vec<usize> },
    #[error("NF4 tensor of shape {shape:?}: {what} has {got} entries, expected {expected}")]
    PartLen { shape: Vec<usize>, what: &'static str, got: usize, expected: usize },
    #[error("NF4 tensor of shape {shape:?}: output buffer of {got} values, expected {expected}")]
    OutLen { shape: Vec<usize>, got: usize, expected: usize },
    #[error("NF4 tensor of shape {shape:?}: element range {start}..{end} is out of bounds (n = {n})")]
    Range { shape: Vec<usize>, start: usize, end: usize, n: usize },
}

/// The block scales: plain f32, or double-quantized as bitsandbytes stores them.
#[derive(Clone, Debug, PartialEq)]
pub enum Absmax {
    /// One f32 absmax per block.
    Plain(Vec<f32>),
    /// `absmax[b] = code[q[b]] · absmax2[b / blocksize2] + offset`.
    Double {
        /// One byte per block: index into `code` (bitsandbytes' `….weight.absmax`, u8).
        q: Vec<u8>,
        /// The mean subtracted before quantizing (`nested_offset` in the quant state).
        offset: f32,
        /// One f32 per `blocksize2` blocks (`….weight.nested_absmax`).
        absmax2: Vec<f32>,
        /// The 256-value 8-bit map (`….weight.nested_quant_map`; [`dynamic_map_signed`] when we quantize).
        code: Vec<f32>,
        /// Blocks per second-level block (`nested_blocksize`, 256).
        blocksize2: usize,
    },
}

/// A weight stored in NF4, exactly as bitsandbytes lays it out.
///
/// Invariants (checked by every constructor): `n = Π shape > 0`, `packed.len() = ⌈n/2⌉`, one absmax entry per block
/// (`⌈n / blocksize⌉`), `⌈blocks / blocksize2⌉` second-level scales, a 16-value code and a 256-value nested code.
#[derive(Clone, Debug, PartialEq)]
pub struct Nf4Tensor {
    shape: Vec<usize>,
    n: usize,
    packed: Vec<u8>,
    absmax: Absmax,
    blocksize: usize,
    code: [f32; 16],
}

impl Nf4Tensor {
    /// Quantizes `data` (row-major, `shape`) with blocksize 64, like bitsandbytes'
    /// `quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)`.
    pub fn quantize(data: &[f32], shape: &[usize], double_quant: bool) -> Result<Self, QuantError> {
        Self::quantize_with_blocksize(data, shape, NF4_BLOCKSIZE, double_quant)
    }

    /// [`Nf4Tensor::quantize`] with another of bitsandbytes' blocksizes (32 … 4096).
    pub fn quantize_with_blocksize(
        data: &[f32],
        shape: &[usize],
        blocksize: usize,
        double_quant: bool,
    ) -> Result<Self, QuantError> {
        let n = checked_numel(shape)?;
        if data.len() != n {
            return Err(QuantError::DataLen { shape: shape.to_vec(), len: data.len(), expected: n });
        }
        check_blocksize(shape, blocksize)?;

        let bounds = code_midpoints(&NF4_CODE);
        let blocks = n.div_ceil(blocksize);
        let mut packed = vec![0u8; n.div_ceil(2)];
        let mut absmax = vec![0f32; blocks];
        // CHUNK is a multiple of the (even) blocksize, so each task owns whole blocks and whole bytes.
        data.par_chunks(CHUNK)
            .zip(packed.par_chunks_mut(CHUNK / 2))
            .zip(absmax.par_chunks_mut(CHUNK / blocksize))
            .for_each(|((x, p), a)| {
                for ((xb, pb), ab) in x.chunks(blocksize).zip(p.chunks_mut(blocksize / 2)).zip(a.iter_mut()) {
                    *ab = quantize_block(xb, xb.len() == blocksize, &bounds, pb);
                }
            });

        let absmax = if double_quant { double_quantize(&absmax) } else { Absmax::Plain(absmax) };
        Ok(Self { shape: shape.to_vec(), n, packed, absmax, blocksize, code: NF4_CODE })
    }

    /// Builds a tensor from the parts bitsandbytes saves for a `Linear4bit` weight (what the Hub's "-bnb-4bit"
    /// checkpoints hold): `packed` = `….weight` (u8, `⌈n/2⌉` bytes, any tensor shape, flattened), `absmax` =
    /// [`Absmax::Plain`] (`….weight.absmax`, f32) or [`Absmax::Double`] (`….weight.absmax` u8,
    /// `….weight.nested_absmax`, `….weight.nested_quant_map`, and `nested_offset` / `nested_blocksize` from the
    /// quant-state JSON), `quant_map` = `….weight.quant_map` (16 values, used as given), and `blocksize` / `shape`
    /// from the quant state. Every size is checked against the others.
    pub fn from_bnb_parts(
        packed: Vec<u8>,
        absmax: Absmax,
        quant_map: &[f32],
        blocksize: usize,
        shape: &[usize],
    ) -> Result<Self, QuantError> {
        let n = checked_numel(shape)?;
        check_blocksize(shape, blocksize)?;
        let part = |what, got: usize, expected: usize| {
            if got == expected {
                Ok(())
            } else {
                Err(QuantError::PartLen { shape: shape.to_vec(), what, got, expected })
            }
        };
        part("packed weight (bytes)", packed.len(), n.div_ceil(2))?;
        part("quant_map", quant_map.len(), 16)?;
        let blocks = n.div_ceil(blocksize);
        match &absmax {
            Absmax::Plain(a) => part("absmax", a.len(), blocks)?,
            Absmax::Double { q, absmax2, code, blocksize2, .. } => {
                if *blocksize2 == 0 {
                    return Err(QuantError::NestedBlocksize { shape: shape.to_vec() });
                }
                part("absmax (double-quantized, bytes)", q.len(), blocks)?;
                part("nested_absmax", absmax2.len(), blocks.div_ceil(*blocksize2))?;
                part("nested_quant_map", code.len(), 256)?;
            }
        }
        let mut code = [0f32; 16];
        code.copy_from_slice(quant_map);
        Ok(Self { shape: shape.to_vec(), n, packed, absmax, blocksize, code })
    }

    /// The logical shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Rows of the 2-D view: the product of all dimensions but the last.
    pub fn rows(&self) -> usize {
        self.n / self.cols()
    }

    /// Columns of the 2-D view: the last dimension.
    pub fn cols(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }

    /// Elements per 4-bit block.
    pub fn blocksize(&self) -> usize {
        self.blocksize
    }

    /// Packed codes, two per byte, first element in the high nibble.
    pub fn packed(&self) -> &[u8] {
        &self.packed
    }

    /// The block scales as stored.
    pub fn absmax(&self) -> &Absmax {
        &self.absmax
    }

    /// The 16-value 4-bit code.
    pub fn code(&self) -> &[f32; 16] {
        &self.code
    }

    /// The f32 scale of every block (double quantization undone), as the dequantization uses them.
    pub fn absmax_f32(&self) -> Vec<f32> {
        (0..self.n.div_ceil(self.blocksize)).map(|b| self.block_scale(b)).collect()
    }

    /// Storage in bytes: the packed codes plus the block scales (plain: 4 per block; double: 1 per block, 4 per
    /// second-level block and the 4-byte offset). The constant code tables (64 B + 1 KiB) are not counted.
    pub fn bytes(&self) -> usize {
        self.packed.len()
            + match &self.absmax {
                Absmax::Plain(a) => 4 * a.len(),
                Absmax::Double { q, absmax2, .. } => q.len() + 4 * absmax2.len() + 4,
            }
    }

    /// Dequantizes the whole tensor (row-major) into a new vector.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.n];
        self.dequant_par(0, &mut out);
        out
    }

    /// Dequantizes the whole tensor into `out` (length `n`), multi-threaded.
    pub fn dequantize_into(&self, out: &mut [f32]) -> Result<(), QuantError> {
        self.dequantize_range_into(0, self.n, out)
    }

    /// Dequantizes rows `row_start..row_end` of the 2-D view (`rows × cols`) into `out`
    /// (length `(row_end − row_start) · cols`): for chunked dequantize-then-matmul.
    pub fn dequantize_rows_into(&self, row_start: usize, row_end: usize, out: &mut [f32]) -> Result<(), QuantError> {
        let cols = self.cols();
        let (start, end) = (row_start.saturating_mul(cols), row_end.saturating_mul(cols));
        self.dequantize_range_into(start, end, out)
    }

    /// Dequantizes the flat elements `start..end` into `out` (length `end − start`); any alignment.
    pub fn dequantize_range_into(&self, start: usize, end: usize, out: &mut [f32]) -> Result<(), QuantError> {
        if start > end || end > self.n {
            return Err(QuantError::Range { shape: self.shape.clone(), start, end, n: self.n });
        }
        if out.len() != end - start {
            return Err(QuantError::OutLen { shape: self.shape.clone(), got: out.len(), expected: end - start });
        }
        self.dequant_par(start, out);
        Ok(())
    }

    /// Parallel dequantization of elements `start..start + out.len()` (bounds already checked): the part before
    /// the first CHUNK boundary serially, then one rayon task per CHUNK-aligned chunk.
    fn dequant_par(&self, start: usize, out: &mut [f32]) {
        let head = (start.next_multiple_of(CHUNK) - start).min(out.len());
        let (head_out, body) = out.split_at_mut(head);
        self.dequant_span(start, head_out);
        let body_start = start + head;
        body.par_chunks_mut(CHUNK).enumerate().for_each(|(k, chunk)| self.dequant_span(body_start + k * CHUNK, chunk));
    }

    /// Serial dequantization of elements `start..start + out.len()`, block by block: the block's scale is loaded
    /// once, and each byte becomes two outputs through the byte → (high, low) code-pair table.
    fn dequant_span(&self, start: usize, out: &mut [f32]) {
        let pairs = code_pairs(&self.code);
        let bs = self.blocksize;
        let mut i = start;
        let mut rest = out;
        while !rest.is_empty() {
            let block = i / bs;
            let len = ((block + 1) * bs - i).min(rest.len());
            let (seg, tail) = rest.split_at_mut(len);
            dequant_segment(&self.packed, i, seg, &pairs, self.block_scale(block));
            i += len;
            rest = tail;
        }
    }

    /// The f32 scale of block `b`: `absmax[b]`, or for double quantization `code[q[b]] · absmax2[b/256] + offset`
    /// (two roundings, as bitsandbytes' dequantize-then-add).
    #[inline]
    fn block_scale(&self, b: usize) -> f32 {
        match &self.absmax {
            Absmax::Plain(a) => a[b],
            Absmax::Double { q, offset, absmax2, code, blocksize2 } => {
                code[q[b] as usize] * absmax2[b / blocksize2] + offset
            }
        }
    }
}

/// The (high-nibble, low-nibble) code values of every byte.
fn code_pairs(code: &[f32; 16]) -> [[f32; 2]; 256] {
    std::array::from_fn(|b| [code[b >> 4], code[b & 0x0f]])
}

/// Writes `out[k] = code(element start + k) · scale` for a run of elements inside one block.
#[inline]
fn dequant_segment(packed: &[u8], start: usize, mut out: &mut [f32], pairs: &[[f32; 2]; 256], scale: f32) {
    let mut i = start;
    // An odd start: the first element is the low nibble of its byte.
    if i % 2 == 1 {
        if let Some((first, tail)) = std::mem::take(&mut out).split_first_mut() {
            *first = pairs[packed[i / 2] as usize][1] * scale;
            out = tail;
            i += 1;
        }
    }
    let n_pairs = out.len() / 2;
    let (body, last) = out.split_at_mut(n_pairs * 2);
    let bytes = &packed[i / 2..i / 2 + n_pairs];
    for (o, &byte) in body.chunks_exact_mut(2).zip(bytes) {
        let [hi, lo] = pairs[byte as usize];
        o[0] = hi * scale;
        o[1] = lo * scale;
    }
    // An odd end: the last element is the high nibble of its byte.
    if let [last] = last {
        *last = pairs[packed[i / 2 + n_pairs] as usize][0] * scale;
    }
}

/// Quantizes one block (`x.len() ≤ blocksize`) into `out` (`⌈x.len()/2⌉` bytes) and returns the absmax to store.
/// `full` tells a whole block (scaled by the reciprocal) from the partial last one (divided), as bitsandbytes.
#[inline]
fn quantize_block(x: &[f32], full: bool, bounds: &[f32; 15], out: &mut [u8]) -> f32 {
    let absmax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let clamped = absmax.max(ABSMAX_FLOOR);
    let inv = 1.0 / clamped;
    let nibble = |v: f32| {
        let s = if full { v * inv } else { v / clamped };
        bucket(s.clamp(-1.0, 1.0), bounds)
    };
    // Odd length: bitsandbytes pads the scaled values with 0.0 before packing.
    let pad = bucket(0.0, bounds);
    for (o, pair) in out.iter_mut().zip(x.chunks(2)) {
        let hi = nibble(pair[0]);
        let lo = pair.get(1).map_or(pad, |&v| nibble(v));
        *o = (hi << 4) | lo;
    }
    if full {
        absmax
    } else {
        clamped
    }
}

/// torch.bucketize(s, bounds) with sorted `bounds`: the number of midpoints strictly below `s`, i.e. the index of
/// the nearest code value with ties going to the lower one.
#[inline]
fn bucket(s: f32, bounds: &[f32; 15]) -> u8 {
    bounds.iter().map(|&b| (b < s) as u8).sum()
}

/// Midpoints between consecutive (sorted) code values, in f32 as bitsandbytes computes them.
fn code_midpoints(code: &[f32; 16]) -> [f32; 15] {
    std::array::from_fn(|i| (code[i] + code[i + 1]) / 2.0)
}

/// Product of the shape's dimensions, rejecting empty tensors and overflow.
fn checked_numel(shape: &[usize]) -> Result<usize, QuantError> {
    let n = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    match n {
        Some(n) if n > 0 => Ok(n),
        _ => Err(QuantError::Empty { shape: shape.to_vec() }),
    }
}

fn check_blocksize(shape: &[usize], blocksize: usize) -> Result<(), QuantError> {
    if BNB_BLOCKSIZES.contains(&blocksize) {
        Ok(())
    } else {
        Err(QuantError::Blocksize { shape: shape.to_vec(), blocksize })
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Double quantization of the block scales
// ---------------------------------------------------------------------------------------------------------------

/// bitsandbytes' `create_dynamic_map(signed=True)` (max_exponent_bits 7, 8 bits): for each exponent
/// `e = 0..7`, the `2^e` midpoints of `linspace(0.1, 1, 2^e + 1)` scaled by `±10^(e−6)`, plus 0 and 1, sorted.
/// Computed with torch's f32 arithmetic (its CPU `linspace` fills each half from the nearer end with one rounding
/// per element), which reproduces the map bit for bit.
pub fn dynamic_map_signed() -> [f32; 256] {
    const SCALES: [f64; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
    let mut data = Vec::with_capacity(256);
    for (e, &scale) in SCALES.iter().enumerate() {
        let scale = scale as f32;
        let b = torch_linspace_f32(0.1, 1.0, (1 << e) + 1);
        for w in b.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(scale * mean);
            data.push(-scale * mean);
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    let mut map = [0f32; 256];
    map.copy_from_slice(&data);
    map
}

/// torch.linspace(start, end, steps, dtype=float32) on CPU: `step = (end − start)/(steps − 1)` in f32, the first
/// half `start + step·i` and the second half `end − step·(steps−1−i)`, each rounded once.
fn torch_linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| if i < half { step.mul_add(i as f32, start) } else { (-step).mul_add((steps - 1 - i) as f32, end) })
        .collect()
}

/// The dynamic map and bitsandbytes' CPU lookup table for it: 65 536 bins over [−1, 1], each holding the index
/// of the first code value whose upper midpoint is not below the bin's value.
struct DynamicQuantizer {
    code: [f32; 256],
    lut: Vec<u8>,
}

impl DynamicQuantizer {
    const BINS: usize = 65_536;

    fn new(code: [f32; 256]) -> Self {
        let mid: [f32; 255] = std::array::from_fn(|i| 0.5 * (code[i] + code[i + 1]));
        let mut lut = Vec::with_capacity(Self::BINS);
        let mut idx = 0usize;
        for i in 0..Self::BINS {
            let v = -1.0f32 + (2.0 * i as f32) / (Self::BINS - 1) as f32;
            while idx < 255 && mid[idx] < v {
                idx += 1;
            }
            lut.push(idx as u8);
        }
        Self { code, lut }
    }

    /// The shared quantizer for [`dynamic_map_signed`].
    fn signed() -> &'static Self {
        static Q: std::sync::OnceLock<DynamicQuantizer> = std::sync::OnceLock::new();
        Q.get_or_init(|| Self::new(dynamic_map_signed()))
    }

    /// Code index of a value already scaled into [−1, 1]: bin `⌊((v + 1)/2)·65535 + 0.5⌋` (fused multiply-add).
    #[inline]
    fn index(&self, v: f32) -> u8 {
        let t = (v.clamp(-1.0, 1.0) + 1.0) * 0.5;
        let bin = t.mul_add((Self::BINS - 1) as f32, 0.5) as usize;
        self.lut[bin.min(Self::BINS - 1)]
    }

    /// Blockwise 8-bit quantization (bitsandbytes' `quantize_blockwise` on CPU): per block the absmax, then each
    /// value's code index; an all-zero block gives absmax 0 and index 0.
    fn quantize_blockwise(&self, x: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
        let mut q = Vec::with_capacity(x.len());
        let mut absmax = Vec::with_capacity(x.len().div_ceil(blocksize));
        for block in x.chunks(blocksize) {
            let m = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            absmax.push(m);
            if m == 0.0 {
                q.extend(std::iter::repeat_n(0u8, block.len()));
            } else {
                let inv = 1.0 / m;
                q.extend(block.iter().map(|&v| self.index(v * inv)));
            }
        }
        (q, absmax)
    }
}

/// Double-quantizes the block scales: mean-centred, 8-bit dynamic map, blocksize 256.
fn double_quantize(absmax: &[f32]) -> Absmax {
    let offset = torch_mean_f32(absmax);
    let centred: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let dq = DynamicQuantizer::signed();
    let (q, absmax2) = dq.quantize_blockwise(&centred, NESTED_BLOCKSIZE);
    Absmax::Double { q, offset, absmax2, code: dq.code.to_vec(), blocksize2: NESTED_BLOCKSIZE }
}

/// `torch.Tensor.mean()` of a contiguous f32 vector on CPU: PyTorch's cascade sum (single-threaded case), then a
/// division by the length.
fn torch_mean_f32(x: &[f32]) -> f32 {
    torch_sum_f32(x) / x.len() as f32
}

/// PyTorch's CPU sum of a contiguous f32 row (ATen `SumKernel.cpp`, `cascade_sum`). Rows of at least 8 elements
/// are summed as 8-lane vectors — a 4-accumulator cascade over the vectors, then the scalar tail, then the lanes
/// in order; shorter rows run the same cascade on scalars.
fn torch_sum_f32(x: &[f32]) -> f32 {
    const LANES: usize = 8;
    if x.len() < LANES {
        let items: Vec<[f32; 1]> = x.iter().map(|&v| [v]).collect();
        return torch_row_sum(&items)[0];
    }
    let vectors: Vec<[f32; LANES]> = x.chunks_exact(LANES).map(|c| std::array::from_fn(|k| c[k])).collect();
    let lanes = torch_row_sum(&vectors);
    let mut acc = 0f32;
    for &v in &x[vectors.len() * LANES..] {
        acc += v;
    }
    for v in lanes {
        acc += v;
    }
    acc
}

/// ATen's `row_sum` with an ILP factor of 4: the items are read as rows of 4, summed column-wise by
/// [`torch_multi_row_sum`]; leftover items go into column 0; then the 4 columns are added in order.
fn torch_row_sum<const L: usize>(items: &[[f32; L]]) -> [f32; L] {
    const ILP: usize = 4;
    let whole = items.len() / ILP * ILP;
    let mut partial = torch_multi_row_sum(&items[..whole]);
    for item in &items[whole..] {
        add_lanes(&mut partial[0], item);
    }
    for k in 1..ILP {
        let p = partial[k];
        add_lanes(&mut partial[0], &p);
    }
    partial[0]
}

/// ATen's `multi_row_sum` for 4 columns: running sums that are pushed up a 4-level cascade every `2^p` rows
/// (`p = max(4, ⌈log2 rows⌉ / 4)`), so that only partial sums of similar size are added together.
fn torch_multi_row_sum<const L: usize>(items: &[[f32; L]]) -> [[f32; L]; 4] {
    const LEVELS: usize = 4;
    const COLS: usize = 4;
    let rows = items.len() / COLS;
    let ceil_log2 = if rows <= 2 { 1 } else { 64 - (rows as u64 - 1).leading_zeros() as usize };
    let level_power = (ceil_log2 / LEVELS).max(4);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;

    let mut acc = [[[0f32; L]; COLS]; LEVELS];
    let mut i = 0;
    while i + level_step <= rows {
        for row in items[i * COLS..(i + level_step) * COLS].chunks_exact(COLS) {
            add_row(&mut acc[0], row);
        }
        i += level_step;
        // Push the level-(j−1) sums into level j; go up one more level only at multiples of 2^(p·j) rows.
        for j in 1..LEVELS {
            let lower = std::mem::replace(&mut acc[j - 1], [[0.0; L]; COLS]);
            add_row(&mut acc[j], &lower);
            if i & (level_mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    for row in items[i * COLS..rows * COLS].chunks_exact(COLS) {
        add_row(&mut acc[0], row);
    }
    let (total, upper) = acc.split_at_mut(1);
    for level in upper.iter() {
        add_row(&mut total[0], level);
    }
    total[0]
}

/// `acc[k] += row[k]` for each column, lane-wise.
#[inline]
fn add_row<const L: usize>(acc: &mut [[f32; L]], row: &[[f32; L]]) {
    for (a, v) in acc.iter_mut().zip(row) {
        add_lanes(a, v);
    }
}

#[inline]
fn add_lanes<const L: usize>(acc: &mut [f32; L], v: &[f32; L]) {
    for (a, b) in acc.iter_mut().zip(v) {
        *a += b;
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Throughput
// ---------------------------------------------------------------------------------------------------------------

/// Dequantization throughput in GB/s for a `rows × cols` double-quantized NF4 weight (QLoRA's layout): the bytes
/// read (packed codes + scales, [`Nf4Tensor::bytes`]) plus the bytes written (4 per f32 output), over `reps`
/// timed runs into one reused buffer after a warm-up run. The weight is Gaussian noise from a fixed seed.
pub fn dequant_gbps(rows: usize, cols: usize, reps: usize) -> Result<f64, QuantError> {
    use rand::{Rng, SeedableRng};
    let n = rows.saturating_mul(cols);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    // Box–Muller: two uniforms → one standard normal, scaled like an initialised weight.
    let data: Vec<f32> = (0..n)
        .map(|_| {
            let u1: f32 = rng.random::<f32>().max(f32::MIN_POSITIVE);
            let u2: f32 = rng.random();
            0.02 * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
        })
        .collect();
    let t = Nf4Tensor::quantize(&data, &[rows, cols], true)?;
    let mut out = vec![0f32; n];
    t.dequantize_into(&mut out)?;
    let reps = reps.max(1);
    let start = std::time::Instant::now();
    for _ in 0..reps {
        t.dequantize_into(&mut out)?;
        std::hint::black_box(&mut out);
    }
    let secs = start.elapsed().as_secs_f64();
    let bytes = (t.bytes() + 4 * n) as f64 * reps as f64;
    Ok(bytes / secs / 1e9)
}

impl Nf4Tensor {
    /// A (rows × cols) weight of random codes and random double-quantized (or plain) scales, for benchmarks:
    /// speed does not depend on the values, and drawing bytes is far faster than quantizing random floats (an
    /// 8B-parameter base in seconds).
    pub fn random(rows: usize, cols: usize, double_quant: bool, seed: u64) -> Result<Self, QuantError> {
        use rand::{Rng, RngCore, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n = rows * cols;
        let blocks = n.div_ceil(NF4_BLOCKSIZE);
        let mut packed = vec![0u8; n.div_ceil(2)];
        rng.fill_bytes(&mut packed);
        let absmax = if double_quant {
            let mut q = vec![0u8; blocks];
            rng.fill_bytes(&mut q);
            Absmax::Double {
                q,
                offset: 0.02,
                absmax2: (0..blocks.div_ceil(NESTED_BLOCKSIZE)).map(|_| rng.random::<f32>() * 0.01).collect(),
                code: dynamic_map_signed().to_vec(),
                blocksize2: NESTED_BLOCKSIZE,
            }
        } else {
            Absmax::Plain((0..blocks).map(|_| rng.random::<f32>() * 0.05).collect())
        };
        Self::from_bnb_parts(packed, absmax, &NF4_CODE, NF4_BLOCKSIZE, &[rows, cols])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};
    use rand::{Rng, SeedableRng};
    use std::collections::HashMap;

    fn fixture(rel: &str) -> HashMap<String, Tensor> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel);
        candle_core::safetensors::load(&path, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn f32s(t: &HashMap<String, Tensor>, key: &str) -> Vec<f32> {
        t[key].flatten_all().and_then(|x| x.to_vec1::<f32>()).unwrap_or_else(|e| panic!("{key}: {e}"))
    }

    fn u8s(t: &HashMap<String, Tensor>, key: &str) -> Vec<u8> {
        t[key].flatten_all().and_then(|x| x.to_vec1::<u8>()).unwrap_or_else(|e| panic!("{key}: {e}"))
    }

    fn bits(x: &[f32]) -> Vec<u32> {
        x.iter().map(|v| v.to_bits()).collect()
    }

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    fn rel_diff(a: f32, b: f32) -> f32 {
        (a - b).abs() / b.abs().max(f32::MIN_POSITIVE)
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

    /// The 4-bit code of flat element `i`.
    fn nibble(t: &Nf4Tensor, i: usize) -> u8 {
        let byte = t.packed()[i / 2];
        if i.is_multiple_of(2) {
            byte >> 4
        } else {
            byte & 0x0f
        }
    }

    #[test]
    fn nf4_code_matches_bitsandbytes() {
        let fx = fixture("nf4/nf4_reference.safetensors");
        assert_eq!(bits(&NF4_CODE), bits(&f32s(&fx, "nf4_code")));
    }

    #[test]
    fn dynamic_map_matches_bitsandbytes() {
        let fx = fixture("nf4/nf4_reference.safetensors");
        let map = dynamic_map_signed();
        for name in ["w_dq", "w_odd"] {
            assert_eq!(bits(&map), bits(&f32s(&fx, &format!("{name}.absmax_code"))), "{name}.absmax_code");
        }
    }

    #[test]
    fn plain_quantization_matches_bitsandbytes() {
        let fx = fixture("nf4/nf4_reference.safetensors");
        let input = f32s(&fx, "w_small.input");
        let t = Nf4Tensor::quantize(&input, &[64, 128], false).unwrap();
        assert_eq!(t.packed(), &u8s(&fx, "w_small.packed")[..], "w_small.packed");
        let Absmax::Plain(absmax) = t.absmax() else { panic!("expected plain absmax") };
        assert_eq!(bits(absmax), bits(&f32s(&fx, "w_small.absmax")), "w_small.absmax");
        let d = max_abs_diff(&t.dequantize(), &f32s(&fx, "w_small.dequantized"));
        println!("w_small: packed and absmax identical; dequantized max |Δ| = {d:e}");
        assert!(d <= 1e-6);
    }

    #[test]
    fn double_quantization_matches_bitsandbytes() {
        let fx = fixture("nf4/nf4_reference.safetensors");
        for (name, shape) in [("w_dq", [192, 320]), ("w_odd", [3, 100])] {
            let input = f32s(&fx, &format!("{name}.input"));
            let t = Nf4Tensor::quantize(&input, &shape, true).unwrap();
            assert_eq!(t.packed(), &u8s(&fx, &format!("{name}.packed"))[..], "{name}.packed");
            let Absmax::Double { q, offset, absmax2, code, blocksize2 } = t.absmax() else {
                panic!("expected double-quantized absmax")
            };
            assert_eq!(*blocksize2, 256);
            assert_eq!(q, &u8s(&fx, &format!("{name}.absmax_q")), "{name}.absmax_q");
            assert_eq!(bits(code), bits(&f32s(&fx, &format!("{name}.absmax_code"))));
            let ref_offset = f32s(&fx, &format!("{name}.absmax_offset"))[0];
            let d_off = rel_diff(*offset, ref_offset);
            let ref_absmax2 = f32s(&fx, &format!("{name}.absmax2"));
            assert_eq!(absmax2.len(), ref_absmax2.len());
            let d_a2 = absmax2.iter().zip(&ref_absmax2).map(|(a, b)| rel_diff(*a, *b)).fold(0.0, f32::max);
            let d = max_abs_diff(&t.dequantize(), &f32s(&fx, &format!("{name}.dequantized")));
            println!(
                "{name}: packed and absmax_q identical; offset rel Δ = {d_off:e}, absmax2 max rel Δ = {d_a2:e}, \
                 dequantized max |Δ| = {d:e}"
            );
            assert!(d_off <= 1e-7 && d_a2 <= 1e-7 && d <= 1e-6);
        }
    }

    #[test]
    fn from_bnb_parts_of_the_fixture_dequantizes_like_bitsandbytes() {
        let fx = fixture("nf4/nf4_reference.safetensors");
        let code = f32s(&fx, "nf4_code");
        let t = Nf4Tensor::from_bnb_parts(
            u8s(&fx, "w_small.packed"),
            Absmax::Plain(f32s(&fx, "w_small.absmax")),
            &code,
            64,
            &[64, 128],
        )
        .unwrap();
        assert!(max_abs_diff(&t.dequantize(), &f32s(&fx, "w_small.dequantized")) <= 1e-6);
        for (name, shape) in [("w_dq", [192, 320]), ("w_odd", [3, 100])] {
            let absmax = Absmax::Double {
                q: u8s(&fx, &format!("{name}.absmax_q")),
                offset: f32s(&fx, &format!("{name}.absmax_offset"))[0],
                absmax2: f32s(&fx, &format!("{name}.absmax2")),
                code: f32s(&fx, &format!("{name}.absmax_code")),
                blocksize2: 256,
            };
            let t = Nf4Tensor::from_bnb_parts(u8s(&fx, &format!("{name}.packed")), absmax, &code, 64, &shape).unwrap();
            let d = max_abs_diff(&t.dequantize(), &f32s(&fx, &format!("{name}.dequantized")));
            println!("{name} from bnb parts: dequantized max |Δ| = {d:e}");
            assert!(d <= 1e-6);
        }
    }

    /// The pre-quantized tiny-llama checkpoint (transformers + bitsandbytes, double quant) loads through
    /// `from_bnb_parts`, and quantizing tiny-llama's f32 weights ourselves reproduces it byte for byte.
    #[test]
    fn quantizing_tiny_llama_reproduces_the_bnb4_checkpoint() {
        let q = fixture("tiny-llama-bnb4/model.safetensors");
        let f = fixture("tiny-llama/model.safetensors");
        let mut checked = 0;
        for key in q.keys().filter(|k| k.ends_with(".weight") && q[*k].dtype() == candle_core::DType::U8) {
            let state: serde_json::Value =
                serde_json::from_slice(&u8s(&q, &format!("{key}.quant_state.bitsandbytes__nf4"))).unwrap();
            assert_eq!(state["quant_type"], "nf4");
            let shape: Vec<usize> =
                state["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
            let blocksize = state["blocksize"].as_u64().unwrap() as usize;
            let offset = state["nested_offset"].as_f64().unwrap() as f32;
            let absmax = Absmax::Double {
                q: u8s(&q, &format!("{key}.absmax")),
                offset,
                absmax2: f32s(&q, &format!("{key}.nested_absmax")),
                code: f32s(&q, &format!("{key}.nested_quant_map")),
                blocksize2: state["nested_blocksize"].as_u64().unwrap() as usize,
            };
            let loaded = Nf4Tensor::from_bnb_parts(
                u8s(&q, key),
                absmax,
                &f32s(&q, &format!("{key}.quant_map")),
                blocksize,
                &shape,
            )
            .unwrap();
            let ours = Nf4Tensor::quantize(&f32s(&f, key), &shape, true).unwrap();
            assert_eq!(ours.packed(), loaded.packed(), "{key}: packed");
            let (
                Absmax::Double { q: q1, offset: o1, absmax2: a1, .. },
                Absmax::Double { q: q2, offset: o2, absmax2: a2, .. },
            ) = (ours.absmax(), loaded.absmax())
            else {
                panic!("{key}: expected double quantization")
            };
            assert_eq!(q1, q2, "{key}: absmax bytes");
            assert_eq!(o1.to_bits(), o2.to_bits(), "{key}: nested_offset");
            assert_eq!(bits(a1), bits(a2), "{key}: nested_absmax");
            assert_eq!(bits(&ours.dequantize()), bits(&loaded.dequantize()), "{key}: dequantized");
            checked += 1;
        }
        println!("tiny-llama-bnb4: {checked} quantized weights reproduced byte for byte");
        assert_eq!(checked, 14);
    }

    /// Closed-form properties on random data of odd sizes: each code is the nearest NF4 value to `w / absmax`
    /// (ties to the lower), the error is at most half the widest code gap times the block's absmax, and the last
    /// low nibble of an odd-length tensor encodes 0.0.
    #[test]
    fn round_trip_on_random_odd_sizes() {
        let half_gap = NF4_CODE.windows(2).map(|w| w[1] - w[0]).fold(0.0, f32::max) / 2.0;
        for (seed, shape) in
            [(1u64, vec![1usize, 1]), (2, vec![7, 13]), (3, vec![3, 65]), (4, vec![129]), (5, vec![301, 263])]
        {
            let n: usize = shape.iter().product();
            let w = gaussian(n, seed);
            for double in [false, true] {
                let t = Nf4Tensor::quantize(&w, &shape, double).unwrap();
                assert_eq!(t.packed().len(), n.div_ceil(2));
                let scales = t.absmax_f32();
                assert_eq!(scales.len(), n.div_ceil(64));
                let d = t.dequantize();
                assert!(d.iter().all(|v| v.is_finite()));
                let mut worst = 0f32;
                for i in 0..n {
                    let true_absmax =
                        w[i / 64 * 64..((i / 64 + 1) * 64).min(n)].iter().fold(0f32, |m, v| m.max(v.abs()));
                    let err = (w[i] - d[i]).abs();
                    // Double quantization perturbs the scale by up to ~1% (8-bit map); allow for it.
                    let bound = if double {
                        half_gap * true_absmax * 1.02 + 0.01 * true_absmax
                    } else {
                        half_gap * true_absmax * (1.0 + 1e-6)
                    };
                    assert!(err <= bound, "shape {shape:?} double {double} i {i}: |Δ| {err} > {bound}");
                    worst = worst.max(err / true_absmax);
                    if !double {
                        let s = w[i] / true_absmax;
                        let chosen = NF4_CODE[nibble(&t, i) as usize];
                        for &c in &NF4_CODE {
                            assert!((s - chosen).abs() <= (s - c).abs() + 1e-6, "not the nearest code at {i}");
                        }
                    }
                }
                if n % 2 == 1 {
                    assert_eq!(t.packed()[n / 2] & 0x0f, 7, "odd n: last low nibble is the code of 0.0");
                }
                println!("shape {shape:?} double {double}: max |Δ|/absmax = {worst:.4}");
            }
        }
    }

    #[test]
    fn all_zero_blocks_give_zeros_not_nan() {
        // 2 full zero blocks, one random block, then a partial zero block of 5.
        let mut w = vec![0f32; 64 * 3 + 5];
        w[128..192].copy_from_slice(&gaussian(64, 9));
        for double in [false, true] {
            let t = Nf4Tensor::quantize(&w, &[w.len()], double).unwrap();
            let d = t.dequantize();
            assert!(d.iter().all(|v| v.is_finite()));
            assert!(d[..128].iter().chain(&d[192..]).all(|&v| v == 0.0), "zero blocks dequantize to exact zeros");
            assert!((0..128).chain(192..w.len()).all(|i| nibble(&t, i) == 7));
            if let Absmax::Plain(a) = t.absmax() {
                // bitsandbytes stores 0 for a full zero block and the 1e-38 floor for the partial last one.
                assert_eq!(a[0], 0.0);
                assert_eq!(a[3], 1e-38f32);
            }
        }
        // A tensor of zeros only: with double quantization every scale is equal, so absmax − offset is all zero.
        let t = Nf4Tensor::quantize(&[0.0; 100], &[100], true).unwrap();
        assert!(t.dequantize().iter().all(|&v| v == 0.0));
    }

    #[test]
    fn a_single_large_value_is_reproduced_exactly() {
        let mut w: Vec<f32> = gaussian(64 * 2, 11).iter().map(|v| v * 1e-3).collect();
        w[70] = -250.0;
        let t = Nf4Tensor::quantize(&w, &[2, 64], false).unwrap();
        let d = t.dequantize();
        assert_eq!(d[70], -250.0, "code −1 times absmax 250");
        assert!(d[64..128].iter().enumerate().all(|(k, &v)| k == 6 || v == 0.0), "the small values round to 0");
        assert!(max_abs_diff(&d[..64], &w[..64]) <= 0.14 * 4e-3, "the other block is unaffected");
        // With double quantization the scale is stored in 8 bits: close, not exact.
        let t = Nf4Tensor::quantize(&w, &[2, 64], true).unwrap();
        let d = t.dequantize();
        assert!(rel_diff(d[70], -250.0) < 0.02, "{}", d[70]);
    }

    #[test]
    fn row_and_range_dequantization_match_the_whole() {
        // Odd columns: rows start at odd elements and mid-block; more than one CHUNK to exercise the parallel path.
        let (rows, cols) = (301, 117);
        let w = gaussian(rows * cols, 21);
        for double in [false, true] {
            let t = Nf4Tensor::quantize(&w, &[rows, cols], double).unwrap();
            let whole = t.dequantize();
            // Reference: element by element from the definition.
            let scales = t.absmax_f32();
            for (i, &v) in whole.iter().enumerate() {
                assert_eq!(v.to_bits(), (NF4_CODE[nibble(&t, i) as usize] * scales[i / 64]).to_bits(), "element {i}");
            }
            for (r0, r1) in [(0, 1), (1, 2), (3, 200), (150, 301), (5, 5)] {
                let mut out = vec![0f32; (r1 - r0) * cols];
                t.dequantize_rows_into(r0, r1, &mut out).unwrap();
                assert_eq!(bits(&out), bits(&whole[r0 * cols..r1 * cols]), "rows {r0}..{r1}");
            }
            let mut out = vec![0f32; 35_000 - 16_383];
            t.dequantize_range_into(16_383, 35_000, &mut out).unwrap();
            assert_eq!(bits(&out), bits(&whole[16_383..35_000]));
        }
    }

    #[test]
    fn inconsistent_parts_are_rejected() {
        let code = NF4_CODE.to_vec();
        let ok_double = || Absmax::Double {
            q: vec![0; 5],
            offset: 0.1,
            absmax2: vec![1.0],
            code: dynamic_map_signed().to_vec(),
            blocksize2: 256,
        };
        assert!(Nf4Tensor::from_bnb_parts(vec![0; 150], ok_double(), &code, 64, &[3, 100]).is_ok());
        let err = |r: Result<Nf4Tensor, QuantError>| r.unwrap_err().to_string();
        let e = err(Nf4Tensor::from_bnb_parts(vec![0; 149], ok_double(), &code, 64, &[3, 100]));
        assert!(e.contains("packed weight") && e.contains("[3, 100]"), "{e}");
        let e = err(Nf4Tensor::from_bnb_parts(vec![0; 150], Absmax::Plain(vec![1.0; 4]), &code, 64, &[3, 100]));
        assert!(e.contains("absmax has 4 entries, expected 5"), "{e}");
        let mut bad = ok_double();
        if let Absmax::Double { absmax2, .. } = &mut bad {
            absmax2.push(1.0);
        }
        let e = err(Nf4Tensor::from_bnb_parts(vec![0; 150], bad, &code, 64, &[3, 100]));
        assert!(e.contains("nested_absmax"), "{e}");
        let mut bad = ok_double();
        if let Absmax::Double { code, .. } = &mut bad {
            code.truncate(255);
        }
        assert!(err(Nf4Tensor::from_bnb_parts(vec![0; 150], bad, &code, 64, &[3, 100])).contains("nested_quant_map"));
        let mut bad = ok_double();
        if let Absmax::Double { blocksize2, .. } = &mut bad {
            *blocksize2 = 0;
        }
        assert!(err(Nf4Tensor::from_bnb_parts(vec![0; 150], bad, &code, 64, &[3, 100])).contains("nested blocksize"));
        assert!(
            err(Nf4Tensor::from_bnb_parts(vec![0; 150], ok_double(), &code[..15], 64, &[3, 100])).contains("quant_map")
        );
        assert!(
            err(Nf4Tensor::from_bnb_parts(vec![0; 150], ok_double(), &code, 48, &[3, 100])).contains("blocksize 48")
        );
        assert!(err(Nf4Tensor::from_bnb_parts(vec![], ok_double(), &code, 64, &[0, 100])).contains("empty"));
        assert!(err(Nf4Tensor::quantize(&[1.0; 10], &[3, 4], false)).contains("10 values given"));

        let t = Nf4Tensor::quantize(&[1.0; 12], &[3, 4], false).unwrap();
        assert!(matches!(t.dequantize_into(&mut [0.0; 11]), Err(QuantError::OutLen { .. })));
        assert!(matches!(t.dequantize_rows_into(2, 4, &mut [0.0; 8]), Err(QuantError::Range { .. })));
        assert!(matches!(t.dequantize_range_into(5, 4, &mut []), Err(QuantError::Range { .. })));
    }

    #[test]
    fn storage_size_counts_codes_and_scales() {
        let w = gaussian(4096 * 3, 5);
        let plain = Nf4Tensor::quantize(&w, &[3, 4096], false).unwrap();
        assert_eq!(plain.bytes(), 6144 + 4 * 192);
        let double = Nf4Tensor::quantize(&w, &[3, 4096], true).unwrap();
        assert_eq!(double.bytes(), 6144 + 192 + 4 + 4, "codes, one byte per block, one absmax2, the offset");
    }

    #[test]
    fn torch_sum_order_on_short_and_long_rows() {
        // Exact in any order (small integers): checks the bookkeeping of every path, incl. the cascade levels.
        for n in [1usize, 3, 7, 8, 9, 31, 32, 33, 100, 511, 512, 513, 2049, 40_000] {
            let x: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
            let expected: f32 = (0..n).map(|i| (i % 7) as f32).sum();
            assert_eq!(torch_sum_f32(&x), expected, "n = {n}");
        }
    }
}
