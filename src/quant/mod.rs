//! Quantized storage for frozen base weights (QLoRA).
//!
//! - [`nf4`]: bitsandbytes' 4-bit NormalFloat format, byte for byte — blockwise absmax scaling (blocksize 64), the
//!   16-value NF4 code, two codes per byte with the first element in the high nibble, and optional double
//!   quantization of the block scales (mean-centred, 8-bit dynamic map, blocksize 256). CPU quantize/dequantize.
//!
//! Reference: Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs" (2023), and bitsandbytes'
//! `functional.quantize_4bit` / `dequantize_4bit` (0.50), whose outputs `tests/fixtures/nf4/` holds.

pub mod block_matmul;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod nf4;

pub use nf4::{
    dequant_gbps, dynamic_map_signed, Absmax, Nf4Tensor, QuantError, NESTED_BLOCKSIZE, NF4_BLOCKSIZE, NF4_CODE,
};
