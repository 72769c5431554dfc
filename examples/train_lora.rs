//! Train a LoRA adapter from Rust code, without a recipe file, and save it in PEFT's format.
//!
//!     cargo run --release --example train_lora -- [BASE] [TRAIN.jsonl] [OUT]
//!
//! BASE is a Hub id, a model folder or a .gguf file (default: the tiny test model in tests/fixtures, so the
//! example runs in seconds; try `~/.cache/peftkit-models/SmolLM2-135M-Instruct.Q4_1.gguf` from
//! scripts/fetch-smollm2.sh for a real one). TRAIN is a chat/alpaca/completion JSONL file (default: the Sprigbox
//! support chats). OUT defaults to target/examples/train_lora.

use anyhow::Result;
use candle_core::Device;
use peftkit::adapter::{AdapterConfig, LoraConfig, TargetModules};
use peftkit::data::{self, EncodeOptions};
use peftkit::hub::HubOptions;
use peftkit::peft_model;
use peftkit::recipe::LrScheduler;
use peftkit::train::{self, TrainConfig, TrainOptions};
use std::path::PathBuf;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let base_name = args.next().unwrap_or_else(|| "tests/fixtures/tiny-llama".into());
    let train_file = PathBuf::from(args.next().unwrap_or_else(|| "datasets/sprigbox-support/train.jsonl".into()));
    let out = PathBuf::from(args.next().unwrap_or_else(|| "target/examples/train_lora".into()));

    // 1. The frozen base model, its tokenizer and chat template.
    let mut base = peftkit::base::load_base(&base_name, None, None, &HubOptions::from_env(), &Device::Cpu)?;

    // 2. The data: chats rendered with the model's template; loss on the assistant turns only.
    let opts = EncodeOptions { sequence_len: 512, train_on_inputs: false, vocab_size: None };
    let dataset = data::load_dataset(
        &train_file,
        None, // detect the format from the first record
        &base.tokenizer,
        base.template.as_ref(),
        base.eos_token.as_deref(),
        &opts,
    )?;
    println!(
        "{}: {} examples, {} supervised tokens",
        train_file.display(),
        dataset.stats.examples,
        dataset.stats.supervised_tokens
    );

    // 3. A LoRA adapter on every linear projection (B = 0: the model is unchanged until trained).
    let lora = AdapterConfig::Lora(LoraConfig {
        r: 8,
        lora_alpha: 16.0,
        lora_dropout: 0.05,
        target_modules: TargetModules::AllLinear,
        ..Default::default()
    });
    let n = peft_model::attach(&mut base.model, &lora, 42)?;
    let params: usize = peft_model::trainable(&base.model).iter().map(|(_, v)| v.elem_count()).sum();
    println!("LoRA on {n} projections: {params} trainable parameters");

    // 4. Train: a few steps of AdamW with a cosine schedule; the first 16 examples double as a validation set.
    let cfg = TrainConfig {
        micro_batch_size: 4,
        gradient_accumulation_steps: 1,
        max_steps: Some(8),
        epochs: 1,
        learning_rate: 1e-3,
        lr_scheduler: LrScheduler::Cosine,
        warmup_steps: 1,
        weight_decay: 0.0,
        adam_beta1: 0.9,
        adam_beta2: 0.999,
        adam_epsilon: 1e-8,
        max_grad_norm: 1.0,
        seed: 42,
        shuffle: true,
        eval_every: None,
        save_every: None,
        logging_every: 1,
        pad_id: base.pad_id,
        packing: None,
        group_by_length: false,
        init_from: None,
        loraplus: None,
    };
    let valid = &dataset.examples[..dataset.examples.len().min(16)];
    let summary = train::train(
        &mut base.model,
        &lora,
        &dataset.examples,
        Some(valid),
        &cfg,
        &base.name,
        &out,
        &TrainOptions::default(),
    )?;
    if let (Some(before), Some(after)) = (summary.initial_eval, summary.final_eval) {
        println!("validation loss {:.4} → {:.4} after {} steps", before.loss, after.loss, summary.steps);
    }

    // 5. Save in PEFT's format: PeftModel.from_pretrained(base, OUT) loads it.
    peft_model::save_adapter(&base.model, &lora, &base.name, None, &out)?;
    println!("adapter written to {}", out.display());
    Ok(())
}
