//! Trainable embeddings and heads (`modules_to_save`), trainable token rows (`trainable_token_indices`) and added
//! tokens, against PEFT + transformers (fixtures made by the Python stack, see tests/fixtures/README.md): unmerged
//! and merged logits, in memory and through `peftkit merge`, on untied and tied models.

use candle_core::{DType, Device, Tensor};
use peftkit::adapter::{self, peft_format};
use peftkit::merge::{MergeOptions, OutDtype};
use peftkit::model::{load_llama, Llama};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn load_dir(dir: &Path) -> Llama {
    load_llama(&dir.join("config.json"), &[dir.join("model.safetensors")], &Device::Cpu, DType::F32).unwrap()
}

fn expected_v2(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name).join("expected-v2.safetensors"), &Device::Cpu).unwrap()
}

/// max |a − b| / max |b|
fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let m = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    d / m
}

/// A fresh folder for one test.
fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("peftkit-vocab-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `peftkit merge` (the library call) of `adapter` into `base`, in f32, into `out`; the merged model loaded.
fn merged_folder(base: &Path, adapter: &Path, out: &Path) -> Llama {
    let mut opts = MergeOptions::new(base.display().to_string(), adapter, out);
    opts.dtype = Some(OutDtype::F32);
    opts.overwrite = true;
    peftkit::merge::merge(&opts).unwrap();
    load_dir(out)
}

#[test]
fn peft_modules_to_save_fixture_matches_unmerged_and_merged_logits() {
    for name in ["tiny-llama", "tiny-qwen2"] {
        let expected = expected_v2(name);
        let ids = expected["input_ids"].to_dtype(DType::U32).unwrap();
        let mut model = load_dir(&fixture(name));
        let dir = fixture(name).join("peft-lora-mts");
        let cfg = peft_format::load_adapter(&mut model, &dir).unwrap();
        assert_eq!(cfg.vocab.modules_to_save.len(), 2);
        assert!(model.vocab.embed.is_some() && model.vocab.head.is_some());
        // The copies are trainable parameters under PEFT's names.
        let names: Vec<String> = adapter::trainable(&model).into_iter().map(|(n, _)| n).collect();
        assert!(names.contains(&"base_model.model.model.embed_tokens.weight".to_string()), "{names:?}");
        assert!(names.contains(&"base_model.model.lm_head.weight".to_string()), "{names:?}");
        let d = rel_diff(&model.forward(&ids).unwrap(), &expected["logits_mts"]);
        println!("{name}: LoRA + modules_to_save, unmerged: max rel diff {d:e}");
        assert!(d <= 1e-4, "{name}: {d}");

        adapter::merge_and_unload(&mut model).unwrap();
        assert!(model.vocab.is_empty());
        let d = rel_diff(&model.forward(&ids).unwrap(), &expected["logits_mts_merged"]);
        println!("{name}: LoRA + modules_to_save, merged in memory: max rel diff {d:e}");
        assert!(d <= 1e-4, "{name}: {d}");

        let out = tmp(&format!("mts-merge-{name}"));
        let merged = merged_folder(&fixture(name), &dir, &out.join("merged"));
        let d = rel_diff(&merged.forward(&ids).unwrap(), &expected["logits_mts_merged"]);
        println!("{name}: LoRA + modules_to_save, peftkit merge: max rel diff {d:e}");
        assert!(d <= 1e-4, "{name}: {d}");
        let _ = std::fs::remove_dir_all(&out);
    }
}

/// tiny-llama made tied, as `tests/fixtures/tiny-llama-tokens-peft/make.py` makes it: `lm_head.weight` dropped,
/// `tie_word_embeddings: true`.
fn make_tied(dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    let src = fixture("tiny-llama");
    for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    let mut sd = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    sd.remove("lm_head.weight").unwrap();
    candle_core::safetensors::save(&sd, dst.join("model.safetensors")).unwrap();
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    c["tie_word_embeddings"] = serde_json::json!(true);
    std::fs::write(dst.join("config.json"), c.to_string()).unwrap();
}

#[test]
fn peft_trainable_tokens_and_tied_modules_to_save_match_peft() {
    let root = fixture("tiny-llama-tokens-peft");
    let want = candle_core::safetensors::load(root.join("logits.safetensors"), &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[5u32, 17, 42, 99, 3, 250, 7, 8]], &Device::Cpu).unwrap();
    let work = tmp("tokens-peft");
    let tied = work.join("tiny-llama-tied");
    make_tied(&tied);
    // (case, base, the merged model is tied)
    let cases = [
        ("untied", fixture("tiny-llama"), false),
        ("tied-tokens", tied.clone(), true),
        ("tied-mts-embed", tied.clone(), false),
        ("tied-mts-head", tied.clone(), false),
    ];
    for (case, base, stays_tied) in cases {
        let dir = root.join(case);
        let mut model = load_dir(&base);
        peft_format::load_adapter(&mut model, &dir).unwrap();
        let d = rel_diff(&model.forward(&ids).unwrap(), &want[&format!("{case}.logits")]);
        println!("{case}: unmerged vs PEFT: max rel diff {d:e}");
        assert!(d <= 1e-4, "{case}: {d}");
        let merged_want = &want[&format!("{case}.merged_logits")];
        adapter::merge_and_unload(&mut model).unwrap();
        assert_eq!(model.config.tie_word_embeddings, stays_tied, "{case}");
        let d = rel_diff(&model.forward(&ids).unwrap(), merged_want);
        println!("{case}: merged in memory vs PEFT merge_and_unload: max rel diff {d:e}");
        assert!(d <= 1e-4, "{case}: {d}");
        let out = work.join(format!("merged-{case}"));
        let merged = merged_folder(&base, &dir, &out);
        let d = rel_diff(&merged.forward(&ids).unwrap(), merged_want);
        println!("{case}: peftkit merge vs PEFT merge_and_unload: max rel diff {d:e}");
        assert!(d <= 1e-4, "{case}: {d}");
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
        let tie = cfg["tie_word_embeddings"].as_bool().unwrap_or(false);
        assert_eq!(tie, stays_tied && base == tied, "{case}: {cfg}");
    }
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn peftkit_modules_to_save_adapter_loads_in_peft() {
    // PEFT computed these logits with this peftkit-trained LoRA + modules_to_save adapter on transformers'
    // tiny-llama, unmerged and after merge_and_unload() (tests/fixtures/tiny-llama-mts-peftkit/make_peft_logits.py).
    let dir = fixture("tiny-llama-mts-peftkit");
    let want = candle_core::safetensors::load(dir.join("peft_logits.safetensors"), &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[5u32, 17, 42, 99, 3, 250, 7, 8]], &Device::Cpu).unwrap();
    let mut model = load_dir(&fixture("tiny-llama"));
    let base_logits = model.forward(&ids).unwrap();
    peft_format::load_adapter(&mut model, &dir).unwrap();
    // Training moved the copies.
    assert!(rel_diff(&base_logits, &want["logits"]) > 0.1);
    let d = rel_diff(&model.forward(&ids).unwrap(), &want["logits"]);
    println!("peftkit LoRA + modules_to_save adapter in PEFT: max rel diff {d:e}");
    assert!(d <= 1e-4, "{d}");
    adapter::merge_and_unload(&mut model).unwrap();
    let d = rel_diff(&model.forward(&ids).unwrap(), &want["merged_logits"]);
    println!("merged vs PEFT merge_and_unload: max rel diff {d:e}");
    assert!(d <= 1e-4, "{d}");
}

#[test]
fn peftkit_new_tokens_adapter_loads_in_peft() {
    // PEFT computed these with this peftkit-trained adapter (two added tokens, trained rows) after
    // resize_token_embeddings(len(tokenizer)) on transformers' tiny-llama, with the tokenizer saved beside it
    // (tests/fixtures/tiny-llama-tokens-peftkit/make_peft_logits.py).
    let dir = fixture("tiny-llama-tokens-peftkit");
    let want = candle_core::safetensors::load(dir.join("peft_logits.safetensors"), &Device::Cpu).unwrap();
    // The saved tokenizer encodes the new tokens as transformers does.
    let tok = peftkit::tokens::load_saved(&dir).unwrap().unwrap();
    let enc = tok.encode("It says <|tool|>weather(\"Oslo\")<|/tool|>", false).unwrap();
    let expected: Vec<u32> = want["encoded"].to_dtype(DType::U32).unwrap().to_vec1().unwrap();
    assert_eq!(enc.get_ids(), expected.as_slice());
    assert_eq!(peftkit::tokens::tokenizer_len(&tok), 386);

    let ids = Tensor::new(&[[5u32, 17, 384, 42, 99, 385, 7, 8]], &Device::Cpu).unwrap();
    let mut model = load_dir(&fixture("tiny-llama"));
    let cfg = peft_format::load_adapter(&mut model, &dir).unwrap();
    assert_eq!(model.config.vocab_size, 386);
    assert_eq!(cfg.vocab.trainable_tokens.len(), 2);
    let d = rel_diff(&model.forward(&ids).unwrap(), &want["logits"]);
    println!("peftkit new-tokens adapter in PEFT: max rel diff {d:e}");
    assert!(d <= 1e-4, "{d}");
    adapter::merge_and_unload(&mut model).unwrap();
    let d = rel_diff(&model.forward(&ids).unwrap(), &want["merged_logits"]);
    println!("merged in memory vs PEFT merge_and_unload: max rel diff {d:e}");
    assert!(d <= 1e-4, "{d}");

    let out = tmp("new-tokens-merge");
    let merged = merged_folder(&fixture("tiny-llama"), &dir, &out.join("m"));
    assert_eq!(merged.config.vocab_size, 386);
    let d = rel_diff(&merged.forward(&ids).unwrap(), &want["merged_logits"]);
    println!("peftkit merge vs PEFT merge_and_unload: max rel diff {d:e}");
    assert!(d <= 1e-4, "{d}");
    // The merged folder carries the adapter's tokenizer.
    assert_eq!(peftkit::tokens::saved_vocab_size(&out.join("m")), Some(386));
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn resized_rows_are_the_mean_of_the_old_ones() {
    // transformers' resize_token_embeddings(mean_resizing=True) up to its 1e-9-covariance draw.
    let mut model = load_dir(&fixture("tiny-llama"));
    let old_embed = model.embed_tokens.clone();
    let old_head = model.lm_head.clone();
    adapter::vocab::resize_vocab(&mut model, 387).unwrap();
    assert_eq!(model.embed_tokens.dims(), [387, 64]);
    assert_eq!(model.lm_head.dims(), [387, 64]);
    assert_eq!(model.config.vocab_size, 387);
    for (new, old) in [(&model.embed_tokens, &old_embed), (&model.lm_head, &old_head)] {
        let mean = old.mean_keepdim(0).unwrap();
        for row in 384..387 {
            let r = new.narrow(0, row, 1).unwrap();
            assert!(rel_diff(&r, &mean) < 1e-6);
        }
        assert!(rel_diff(&new.narrow(0, 0, 384).unwrap(), old) == 0.0);
    }
}

#[test]
fn bad_vocab_adapters_are_refused_with_the_file_and_tensor() {
    let work = tmp("bad-vocab");
    let copy_from = |src: &str, name: &str, edit: &dyn Fn(&mut serde_json::Value)| -> PathBuf {
        let d = work.join(name);
        std::fs::create_dir_all(&d).unwrap();
        let src = fixture(src);
        std::fs::copy(src.join("adapter_model.safetensors"), d.join("adapter_model.safetensors")).unwrap();
        let mut c: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap()).unwrap();
        edit(&mut c);
        std::fs::write(d.join("adapter_config.json"), c.to_string()).unwrap();
        d
    };
    let copy = |name: &str, edit: &dyn Fn(&mut serde_json::Value)| copy_from("tiny-llama/peft-lora-mts", name, edit);
    let tokens =
        |name: &str, edit: &dyn Fn(&mut serde_json::Value)| copy_from("tiny-llama-tokens-peft/untied", name, edit);
    let load = |d: &Path| peft_format::load_adapter(&mut load_dir(&fixture("tiny-llama")), d).unwrap_err().to_string();
    let d = copy("norm", &|c| c["modules_to_save"] = serde_json::json!(["embed_tokens", "lm_head", "norm"]));
    let e = load(&d);
    assert!(e.contains("adapter_config.json") && e.contains("modules_to_save: `norm` is not supported"), "{e}");
    let d = copy("unannounced", &|c| c["modules_to_save"] = serde_json::json!(["embed_tokens"]));
    let e = load(&d);
    assert!(e.contains("base_model.model.lm_head.weight") && e.contains("not announced by modules_to_save"), "{e}");
    let d = copy("both", &|c| c["trainable_token_indices"] = serde_json::json!([1, 2]));
    let e = load(&d);
    assert!(e.contains("embed_tokens is both in modules_to_save and in trainable_token_indices"), "{e}");
    let d = tokens("dup", &|c| c["trainable_token_indices"]["embed_tokens"] = serde_json::json!([3, 3, 42]));
    let e = load(&d);
    assert!(e.contains("adapter_config.json: trainable_token_indices.embed_tokens: token id 3 is listed twice"), "{e}");
    let d = tokens("range", &|c| c["trainable_token_indices"]["embed_tokens"] = serde_json::json!([3, 17, 500]));
    let e = load(&d);
    assert!(e.contains("token id 500 is outside the model's vocabulary of 384 tokens"), "{e}");
    let _ = std::fs::remove_dir_all(&work);
}
