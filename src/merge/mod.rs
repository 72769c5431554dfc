//! `peftkit merge`: fold a PEFT adapter into its base model and write a plain Hugging Face model folder.
//!
//! For every base tensor `<module>.weight` of a module the adapter adapts, W' = merge_weight(W) is computed in f32
//! (LoRA: W + s·B·A; see [`crate::linear::LayerAdapter`]) and `<module>.bias` becomes merge_bias(b); then every
//! floating-point tensor is cast to the output dtype (bf16 and f16 round to nearest even). Nothing else changes: the
//! names and shapes are the base's, so transformers' `from_pretrained` and peftkit load the folder as the base
//! architecture, with no PEFT and no adapter involved.
//!
//! Which weights W are depends on the base and on `from_quantized` ([`MergeOptions`]):
//! - a 16-bit safetensors model: the stored weights; with `from_quantized`, each projection is first quantized to
//!   NF4 and dequantized exactly as QLoRA training held it, so the merged model is the one that was trained;
//! - a pre-quantized bitsandbytes checkpoint: only NF4 weights exist in it, so only `from_quantized` is possible;
//! - a GGUF file: its tensors dequantized to f32 under their transformers names (see [`crate::gguf`]).
//!
//! The output folder is laid out as transformers' `save_pretrained` lays it out:
//! - `model.safetensors`, or shards `model-0000i-of-0000N.safetensors` of at most `max_shard_size` bytes of tensor
//!   data each (a larger tensor gets a shard to itself) listed in `model.safetensors.index.json`
//!   (`{"metadata": {"total_size": bytes}, "weight_map": {tensor: shard}}`); safetensors metadata `{"format": "pt"}`;
//!   bitsandbytes' auxiliary tensors (`….weight.absmax`, `….weight.quant_state.*`, …) are gone, their weights dense;
//! - `config.json`: the base's, without `quantization_config`, with `torch_dtype` and `dtype` set to the output's;
//! - the tokenizer files and `generation_config.json`, copied (rebuilt from the metadata for a GGUF base);
//! - `README.md`, the model card ([`crate::card::merged_card`]), and the adapter's `peftkit_recipe.yaml` if any.
//!
//! Memory: a shard's header needs only the names, shapes and dtypes, all known before any value is computed, so
//! each shard's header is written first and its tensors are then computed and streamed to disk one at a time. The
//! base is read with positioned reads, not a memory map: the pages of a map stay resident once touched and would
//! make the process as large as the model. Peak memory is a few copies of the largest tensor, whatever the model.
//!
//! With `format: Gguf` ([`OutFormat`]) the same tensors, computed in f32, go into one GGUF file for llama.cpp
//! instead (names, layout, metadata and per-tensor types as llama.cpp's converter and llama-quantize write them;
//! see `gguf_out`, `gguf_meta`, `gguf_quant`); no folder, card or tokenizer files.
//!
//! Everything is written into a hidden sibling folder `.<out>.tmp-<pid>` that is renamed into place at the end; an
//! existing non-empty `out` is replaced (only with `overwrite`) once the new folder is complete.
//!
//! References: the safetensors format (github.com/huggingface/safetensors, "Format"); transformers' sharded
//! checkpoints (`model.safetensors.index.json`, `max_shard_size`); Hu et al. 2021, "LoRA", §4 (merging W + BA).

mod base;
mod compute;
mod gguf_meta;
mod gguf_out;
mod gguf_quant;
mod options;
mod output;
mod plan;
mod shard;
mod st_reader;
mod training;
mod vocab;

pub use gguf_quant::{GgufQuant, GGUF_QUANT_NAMES};
pub use options::{parse_size, MergeError, MergeOptions, MergeReport, OutDtype, OutFormat};

use crate::adapter::peft_format;
use crate::card::{self, MergedFacts};
use crate::gguf::GgufTensors;
use crate::hub::{self, ModelSource};
use crate::model::TensorSource;
use base::{describe_weights, Base, Reader};
use candle_core::Device;
use options::io_err;
use output::{check_not_an_input, check_out_folder, merged_config, write_file, write_gguf_tokenizer, write_json};
use plan::{assign_shards, plan_tensors, Part, Planned};
use serde_json::json;
use shard::{write_shard, Progress};
use std::collections::BTreeMap;
use training::{warn_if_trained_on_another_base, TrainingInfo};

/// transformers' default `max_shard_size` (5 GB).
pub const DEFAULT_MAX_SHARD_SIZE: u64 = 5_000_000_000;
/// The resolved recipe peftkit writes beside a trained adapter.
pub const RECIPE_FILE: &str = "peftkit_recipe.yaml";

/// Merges `opts.adapter` into `opts.base` and writes the model to `opts.out` (see the module documentation).
pub fn merge(opts: &MergeOptions) -> Result<MergeReport, MergeError> {
    // 1. Cheap checks first: the output folder (or file), then the adapter (before any download).
    let gguf = opts.format == OutFormat::Gguf;
    if gguf {
        gguf_out::check_out_file(&opts.out, opts.overwrite)?;
    } else {
        check_out_folder(&opts.out, opts.overwrite)?;
    }
    let (peft, adapters) = peft_format::read_adapter(&opts.adapter, &Device::Cpu)?;
    let trained = TrainingInfo::read(&opts.adapter);

    // 2. The base: its config, its tensors (names, shapes) and how to read them.
    let mut base = Base::open(opts)?;
    check_not_an_input(&opts.out, &[base.path.clone(), opts.adapter.clone()])?;
    warn_if_trained_on_another_base(&peft, &base, &opts.adapter);

    // 3. Which weights the adapter goes into.
    let peft_method = peft.adapter.peft_type().to_ascii_lowercase();
    let prequantized = base.tensors.iter().any(|t| t.nf4);
    let method = match &trained.method {
        Some(m) => m.clone(),
        // A LoRA adapter meant for NF4 weights is QLoRA, whatever the folder says.
        None if peft_method == "lora" && (prequantized || opts.from_quantized) => "qlora".to_string(),
        None => peft_method.clone(),
    };
    if prequantized && !opts.from_quantized {
        return Err(MergeError::PreQuantized { base: base.name.clone() });
    }
    let requantize = opts.from_quantized && !prequantized;
    if opts.from_quantized && trained.method.as_deref() == Some("lora") {
        tracing::warn!(
            "{} was trained as LoRA on unquantized weights; --from-quantized merges it into NF4-rounded weights anyway",
            opts.adapter.display()
        );
    }
    if method == "qlora" && !opts.from_quantized {
        tracing::info!(
            "{} is a QLoRA adapter: merging it into the base's original weights, not the NF4-rounded ones it was \
             trained against (pass --from-quantized for those)",
            opts.adapter.display()
        );
    }
    let weights = describe_weights(&base, opts.from_quantized, prequantized, trained.double_quant);

    // 4. The plan: every output tensor, how to get it, which adapter to fold in; then the shards.
    // A GGUF file's tensors are computed in f32 and converted per tensor (see gguf_out).
    let dtype = match gguf {
        true => OutDtype::F32,
        false => opts.dtype.or_else(|| OutDtype::from_config(&base.config)).unwrap_or(OutDtype::Bf16),
    };
    let mut plan = plan_tensors(&base, &adapters, dtype, requantize.then_some(trained.double_quant), opts)?;
    // The embedding and the head: `modules_to_save` copies, trained rows, new tokens (see `vocab`).
    let adapter_file = opts.adapter.join(peft_format::WEIGHTS_FILE);
    let base_vocab = base.config.get("vocab_size").and_then(|v| v.as_u64()).unwrap_or(0) as usize;
    let loaded_vocab = crate::adapter::vocab::read_for_merge(&opts.adapter, &peft.vocab, base_vocab)?;
    let new_vocab = crate::adapter::vocab::merged_vocab(&loaded_vocab, base_vocab, &opts.adapter);
    if gguf && new_vocab > base_vocab {
        return Err(MergeError::Mismatch {
            file: opts.adapter.join(peft_format::CONFIG_FILE),
            tensor: "model.embed_tokens.weight".into(),
            msg: format!(
                "the adapter grows the vocabulary from {base_vocab} to {new_vocab} tokens (added tokens); \
                 --format gguf cannot carry the new tokens yet: merge to a safetensors folder instead"
            ),
        });
    }
    let vocab_plan = vocab::plan_vocab(&mut plan, &base, &loaded_vocab, new_vocab, dtype, &adapter_file)?;
    if vocab_plan.untied {
        // The writers (the GGUF one too) then keep the head the plan now has.
        vocab::patch_config(&mut base.config, &vocab_plan);
        if let Reader::Gguf { config, .. } = &mut base.reader {
            config.tie_word_embeddings = false;
        }
    }
    let sizes: Vec<u64> = plan.iter().map(Planned::bytes).collect();
    let shards = assign_shards(&sizes, opts.max_shard_size);
    let shard_names: Vec<String> = if shards.len() == 1 {
        vec![hub::WEIGHTS_FILE.to_string()]
    } else {
        (1..=shards.len()).map(|i| format!("model-{i:05}-of-{:05}.safetensors", shards.len())).collect()
    };
    let total_bytes: u64 = sizes.iter().sum();
    let merged_modules = plan.iter().filter(|p| matches!(p.merge, Some((_, Part::Weight)))).count();
    let layout = match gguf {
        true => "one GGUF file".to_string(),
        false => format!("{:.1} MB in {}, {} shard(s)", total_bytes as f64 / 1e6, dtype.hf_name(), shards.len()),
    };
    tracing::info!(
        "merging {} ({} adapter, {merged_modules} projections) into {}: {} tensors, {layout}",
        opts.adapter.display(),
        card::method_title(&method),
        base.name,
        plan.len(),
    );

    let gguf_tensors;
    let (src, gguf_src): (&dyn TensorSource, Option<&GgufTensors>) = match &base.reader {
        Reader::Safetensors(st) => (st, None),
        Reader::Gguf { file, config, .. } => {
            gguf_tensors = GgufTensors::new(file, config)?;
            (&gguf_tensors, Some(&gguf_tensors))
        }
    };
    if gguf {
        let written = gguf_out::write_gguf(&base, &plan, src, gguf_src, &adapters, opts)?;
        let file_name = opts.out.file_name().unwrap_or_default().to_string_lossy().to_string();
        return Ok(MergeReport {
            out: opts.out.clone(),
            dtype,
            shards: vec![file_name],
            tensors: written.tensors,
            merged_modules,
            total_bytes: written.data_bytes,
            method,
            weights,
            gguf_types: Some(written.types),
        });
    }

    // 5. Everything into a temporary folder beside `out`.
    let tmp = crate::outdir::ReplacementFolder::create(&opts.out)?;
    let progress = Progress::new(opts.progress, plan.len());
    for (range, name) in shards.iter().zip(&shard_names) {
        write_shard(&tmp.path().join(name), &plan[range.clone()], src, &adapters, &progress, opts)?;
        let bytes: u64 = sizes[range.clone()].iter().sum();
        progress.log(format!("wrote {name}: {} tensors, {:.1} MB", range.len(), bytes as f64 / 1e6));
    }
    progress.finish();
    if shards.len() > 1 {
        let mut weight_map = BTreeMap::new();
        for (range, name) in shards.iter().zip(&shard_names) {
            for p in &plan[range.clone()] {
                weight_map.insert(p.name.clone(), name.clone());
            }
        }
        let index = json!({"metadata": {"total_size": total_bytes}, "weight_map": weight_map});
        write_json(&tmp.path().join(hub::WEIGHTS_INDEX_FILE), &index)?;
    }
    let mut config = merged_config(&base.config, dtype);
    vocab::patch_config(&mut config, &vocab_plan);
    write_json(&tmp.path().join(hub::CONFIG_FILE), &config)?;
    let has_tokenizer = match &base.reader {
        Reader::Safetensors(_) => {
            for f in &base.copied_files {
                let to = tmp.path().join(f.file_name().unwrap_or_default());
                std::fs::copy(f, &to).map_err(io_err(f))?;
            }
            // An adapter trained with added tokens carries its tokenizer: it replaces the base's.
            if opts.adapter.join(hub::TOKENIZER_FILE).is_file() {
                for f in [hub::TOKENIZER_FILE, "tokenizer_config.json", "chat_template.jinja"] {
                    let from = opts.adapter.join(f);
                    if from.is_file() {
                        std::fs::copy(&from, tmp.path().join(f)).map_err(io_err(&from))?;
                    }
                }
            }
            base.copied_files.iter().any(|f| f.ends_with(hub::TOKENIZER_FILE))
        }
        Reader::Gguf { file, .. } => {
            write_gguf_tokenizer(file, tmp.path())?;
            true
        }
    };
    if !has_tokenizer {
        tracing::warn!("{} has no tokenizer files: the merged folder has none either", base.name);
    }
    if let Some(yaml) = &trained.recipe_yaml {
        write_file(&tmp.path().join(RECIPE_FILE), yaml.as_bytes())?;
    }
    let facts = MergedFacts {
        base_model: base.name.clone(),
        base_is_hub: matches!(base.source, ModelSource::Hub { .. }),
        revision: match &base.source {
            ModelSource::Hub { revision, commit, .. } => Some(commit.clone().unwrap_or_else(|| revision.clone())),
            ModelSource::Local(_) => None,
        },
        license: base.license.clone(),
        method: method.clone(),
        dora: matches!(&peft.adapter, crate::adapter::AdapterConfig::Lora(l) if l.use_dora),
        peft_type: peft.adapter.peft_type().to_string(),
        adapter_dir: opts.adapter.display().to_string(),
        merged_modules,
        weights: weights.clone(),
        dtype: dtype.hf_name().to_string(),
        out_dir: opts.out.display().to_string(),
        shards: shards.len(),
        total_bytes,
        has_tokenizer,
        vocab: vocab::describe(&loaded_vocab, &vocab_plan, base_vocab),
    };
    let card_text = card::merged_card(&facts, trained.record.as_ref(), trained.recipe_yaml.as_deref());
    write_file(&tmp.path().join("README.md"), card_text.as_bytes())?;

    // 6. Into place.
    tmp.persist(&opts.out)?;
    Ok(MergeReport {
        out: opts.out.clone(),
        dtype,
        shards: shard_names,
        tensors: plan.len(),
        merged_modules,
        total_bytes,
        method,
        weights,
        gguf_types: None,
    })
}
