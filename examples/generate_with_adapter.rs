//! Load a base model and a PEFT adapter, and answer one chat message (greedy decoding with the KV cache).
//!
//!     cargo run --release --example generate_with_adapter -- [BASE] [ADAPTER] [QUESTION]
//!
//! Defaults: the tiny test model and its PEFT LoRA fixture (random weights: the text is gibberish, but the path is
//! the real one). With the real model: BASE = ~/.cache/peftkit-models/SmolLM2-135M-Instruct.Q4_1.gguf (from
//! scripts/fetch-smollm2.sh) and ADAPTER = an adapter trained on it (`peftkit train recipes/smollm2-135m-lora.yaml
//! --set base_model=…gguf`).

use anyhow::Result;
use candle_core::Device;
use peftkit::data::Message;
use peftkit::generate::{generate, SamplingParams};
use std::io::Write;
use std::path::PathBuf;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let base_name = args.next().unwrap_or_else(|| "tests/fixtures/tiny-llama".into());
    let adapter_dir = PathBuf::from(args.next().unwrap_or_else(|| "tests/fixtures/tiny-llama/peft-lora".into()));
    let question = args.next().unwrap_or_else(|| "How long is the Sprigbox warranty?".into());

    let mut base =
        peftkit::base::load_base(&base_name, None, None, &peftkit::hub::HubOptions::from_env(), &Device::Cpu)?;
    let cfg = peftkit::peft_model::load_adapter(&mut base.model, &adapter_dir)?;
    println!("{} adapter from {} on {}", cfg.adapter.peft_type(), adapter_dir.display(), base.name);

    // The chat template turns the conversation into the prompt the model was tuned on.
    let template = base.template.as_ref().ok_or_else(|| anyhow::anyhow!("{} has no chat template", base.name))?;
    let messages = vec![Message { role: "user".into(), content: question.clone() }];
    let prompt = template.render(&messages, true)?;
    let ids = base.tokenizer.encode(prompt.as_str(), false).map_err(anyhow::Error::msg)?.get_ids().to_vec();

    println!("> {question}");
    let params = SamplingParams::greedy(64);
    // The callback sees each new token (return false to stop early); `peftkit generate` streams text from it.
    let result = generate(&base.model, &ids, &params, &base.stop_ids, |_token| Ok::<_, std::io::Error>(true))?;
    let text = base.tokenizer.decode(&result.tokens, true).map_err(anyhow::Error::msg)?;
    writeln!(std::io::stdout(), "{text}")?;
    eprintln!("{} tokens, {:.1} tokens/s", result.tokens.len(), result.tokens_per_sec());
    Ok(())
}
