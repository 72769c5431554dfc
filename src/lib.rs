//! peftkit: parameter-efficient fine-tuning (LoRA, QLoRA, IA3) of Llama-family models on candle.
//!
//! Data flow: `recipe` (validated YAML) → `hub` (resolve the base model files) → `model` (Llama-family
//! forward whose projections are `linear::AdaptedLinear`) + `adapter` (LoRA / IA3 layers, PEFT format), put on
//! the model by `peft_model` ← `data`
//! (datasets → tokens + label masks → batches) → `train` (the loop) → `adapters/<run>/` in PEFT's format;
//! `merge` folds an adapter into its base and writes a Hugging Face model folder.

pub mod adapter;
pub mod base;
pub mod card;
pub mod compute;
pub mod cpu;
pub mod data;
pub mod fsutil;
pub mod generate;
pub mod gguf;
pub mod gguf_adapter;
pub mod gpu;
pub mod host;
pub mod hub;
pub mod linear;
pub mod memory;
pub mod merge;
pub mod model;
pub mod ops;
pub mod outdir;
pub mod peft_model;
pub mod pool;
pub mod push;
pub mod quant;
pub mod recipe;
pub mod tokens;
pub mod train;
pub mod util;
pub mod weight;
