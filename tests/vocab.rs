//! Trainable embeddings and heads (`modules_to_save`), trainable token rows (`trainable_token_indices`) and added
//! tokens, against PEFT + transformers (fixtures made by the Python stack, see tests/fixtures/README.md): unmerged
//! and merged logits, in memory and through `peftkit merge`, on untied and tied models.

use candle_core::{DType, Device, Tensor};
use peftkit::adapter::{self};
use peftkit::merge::{MergeOptions, OutDtype};
use peftkit::model::{load_llama, Llama};
use peftkit::peft_model;
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
        let cfg = peft_model::load_adapter(&mut model, &dir).unwrap();
        assert_eq!(cfg.vocab.modules_to_save.len(), 2);
        assert!(model.vocab.embed.is_some() && model.vocab.head.is_some());
        // The copies are trainable parameters under PEFT's names.
        let names: Vec<String> = peft_model::trainable(&model).into_iter().map(|(n, _)| n).collect();
        assert!(names.contains(&"base_model.model.model.embed_tokens.weight".to_string()), "{names:?}");
        assert!(names.contains(&"base_model.model.lm_head.weight".to_string()), "{names:?}");
        let d = rel_diff(&model.forward(&ids).unwrap(), &expected["logits_mts"]);
        println!("{name}: LoRA + modules_to_save, unmerged: max rel diff {d:e}");
        assert!(d <= 1e-4, "{name}: {d}");

        peft_model::merge_and_unload(&mut model).unwrap();
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
        peft_model::load_adapter(&mut model, &dir).unwrap();
        let d = rel_diff(&model.forward(&ids).unwrap(), &want[&format!("{case}.logits")]);
        println!("{case}: unmerged vs PEFT: max rel diff {d:e}");
        assert!(d <= 1e-4, "{case}: {d}");
        let merged_want = &want[&format!("{case}.merged_logits")];
        peft_model::merge_and_unload(&mut model).unwrap();
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
    peft_model::load_adapter(&mut model, &dir).unwrap();
    // Training moved the copies.
    assert!(rel_diff(&base_logits, &want["logits"]) > 0.1);
    let d = rel_diff(&model.forward(&ids).unwrap(), &want["logits"]);
    println!("peftkit LoRA + modules_to_save adapter in PEFT: max rel diff {d:e}");
    assert!(d <= 1e-4, "{d}");
    peft_model::merge_and_unload(&mut model).unwrap();
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
    let cfg = peft_model::load_adapter(&mut model, &dir).unwrap();
    assert_eq!(model.config.vocab_size, 386);
    assert_eq!(cfg.vocab.trainable_tokens.len(), 2);
    let d = rel_diff(&model.forward(&ids).unwrap(), &want["logits"]);
    println!("peftkit new-tokens adapter in PEFT: max rel diff {d:e}");
    assert!(d <= 1e-4, "{d}");
    peft_model::merge_and_unload(&mut model).unwrap();
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
    peft_model::vocab::resize_vocab(&mut model, 387).unwrap();
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
    let load = |d: &Path| peft_model::load_adapter(&mut load_dir(&fixture("tiny-llama")), d).unwrap_err().to_string();
    let d = copy("norm", &|c| c["modules_to_save"] = serde_json::json!(["embed_tokens", "lm_head", "norm"]));
    let e = load(&d);
    assert!(e.contains("adapter_config.json") && e.contains("modules_to_save: `norm` is not supported"), "{e}");
    let d = copy("unannounced", &|c| c["modules_to_save"] = serde_json::json!(["embed_tokens"]));
    let e = load(&d);
    assert!(e.contains("base_model.model.lm_head.weight") && e.contains("not announced by modules_to_save"), "{e}");
    // peftkit merge says the same.
    let opts = MergeOptions::new(fixture("tiny-llama").display().to_string(), &d, work.join("merged"));
    let e = peftkit::merge::merge(&opts).unwrap_err().to_string();
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

fn bin() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_peftkit"));
    c.env("HF_HUB_OFFLINE", "1").env("NO_COLOR", "1").env_remove("HF_TOKEN");
    c.current_dir(env!("CARGO_MANIFEST_DIR"));
    c
}

fn run(c: &mut std::process::Command) -> (i32, String, String) {
    let o = c.output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).to_string();
    (o.status.code().unwrap_or(-1), text(&o.stdout), text(&o.stderr))
}

#[test]
fn export_to_gguf_refuses_trained_embeddings_and_rows() {
    let out = tmp("export");
    for (dir, what) in [
        ("tiny-llama/peft-lora-mts", "modules_to_save [embed_tokens, lm_head]"),
        ("tiny-llama-tokens-peftkit", "trainable_token_indices"),
    ] {
        let (code, _, err) = run(bin()
            .args(["export", "--to", "gguf", "--base", "tests/fixtures/tiny-llama", "--adapter"])
            .arg(fixture(dir))
            .arg("--out")
            .arg(out.join("a.gguf")));
        assert_eq!(code, 2, "{err}");
        assert!(err.contains(what) && err.contains("merge"), "{err}");
    }
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn generate_and_eval_use_the_tokenizer_saved_with_the_adapter() {
    let adapter = fixture("tiny-llama-tokens-peftkit");
    // The prompt holds a new token: only the saved tokenizer knows it as one id (384).
    let (code, out, err) = run(bin()
        .args(["generate", "--base", "tests/fixtures/tiny-llama", "--max-new-tokens", "3", "--prompt", "<|tool|>"])
        .arg("--adapter")
        .arg(&adapter));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("using the tokenizer saved with the adapter (386 tokens)"), "{err}\n{out}");
    let (code, out, err) = run(bin()
        .args(["eval", "--base", "tests/fixtures/tiny-llama", "--json", "--data", "datasets/tiny-tools/train.jsonl"])
        .arg("--adapter")
        .arg(&adapter));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("loss"), "{out}");
}

/// A recipe on tiny-llama in a fresh folder (the data path is absolute).
fn recipe(dir: &Path, adapter: &str, extra: &str) -> PathBuf {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/tiny-tools/train.jsonl");
    let text = format!(
        "base_model: {base}\n{extra}adapter:\n  type: {adapter}\n  r: 4\n  target_modules: [q_proj, v_proj]\n\
         data:\n  train: {data}\n  format: chat\n  sequence_len: 64\n\
         training:\n  max_steps: 2\n  micro_batch_size: 4\n  learning_rate: 0.05\n  dtype: f32\n\
         output:\n  dir: {out}\n",
        base = fixture("tiny-llama").display(),
        data = data.display(),
        out = dir.join("out").display(),
    );
    let path = dir.join("recipe.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn qlora_trains_modules_to_save_beside_an_nf4_base() {
    // Embedding and head are never quantized (bitsandbytes leaves them alone): the copies train as on a dense base.
    let dir = tmp("qlora-mts");
    let r = recipe(&dir, "qlora", "");
    let (code, _, err) = run(bin().arg("train").arg(&r).args(["--set", "adapter.modules_to_save=[embed_tokens]"]));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("of them in embed_tokens (full copy)"), "{err}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("out/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["modules_to_save"], serde_json::json!(["embed_tokens"]));
    let card = std::fs::read_to_string(dir.join("out/README.md")).unwrap();
    assert!(card.contains("## Trained embedding and output head"), "{card}");
    // The trained copy moved, and loads back onto the NF4 base.
    let st = candle_core::safetensors::load(dir.join("out/adapter_model.safetensors"), &Device::Cpu).unwrap();
    let copy = &st["base_model.model.model.embed_tokens.weight"];
    let base = load_dir(&fixture("tiny-llama"));
    assert!(rel_diff(copy, &base.embed_tokens) > 1e-3);
    let mut nf4 = peftkit::model::load_llama_quant(
        &fixture("tiny-llama").join("config.json"),
        &[fixture("tiny-llama").join("model.safetensors")],
        &Device::Cpu,
        DType::F32,
        peftkit::model::BaseQuant::Nf4 { double_quant: true },
    )
    .unwrap();
    peft_model::load_adapter(&mut nf4, &dir.join("out")).unwrap();
    assert!(nf4.vocab.embed.is_some());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn train_names_the_recipe_line_of_an_out_of_range_token_id() {
    let dir = tmp("range");
    let r = recipe(&dir, "lora", "");
    let text = std::fs::read_to_string(&r).unwrap().replace(
        "  target_modules: [q_proj, v_proj]\n",
        "  target_modules: [q_proj, v_proj]\n  trainable_token_indices: [3, 384]\n",
    );
    std::fs::write(&r, text).unwrap();
    let (code, _, err) = run(bin().arg("train").arg(&r));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!(
            "{}:6: adapter.trainable_token_indices[1]: token id 384 is outside the model's vocabulary of 384 tokens",
            r.display()
        )),
        "{err}"
    );
    // With one added token the id exists.
    let text = std::fs::read_to_string(&r).unwrap().replacen(
        "adapter:",
        "tokenizer:\n  add_special_tokens: [\"<|tool|>\"]\nadapter:",
        1,
    );
    std::fs::write(&r, text).unwrap();
    let (code, _, err) = run(bin().arg("train").arg(&r));
    assert_eq!(code, 0, "{err}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("out/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["trainable_token_indices"], serde_json::json!({"embed_tokens": [3, 384], "lm_head": [384]}));
    assert!(dir.join("out/tokenizer.json").is_file());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn optimizer_steps_on_copies_and_rows_match_torch() {
    use peftkit::train::optim::AdamW;
    use peftkit::train::step::{optimizer_step, StepOutcome};
    // Two AdamW steps by PEFT + torch from the same starting adapters on the same batch
    // (tests/fixtures/vocab-train-oracle/make.py): full copies, rows on an untied model, rows on a tied one.
    let root = fixture("vocab-train-oracle");
    let traj = candle_core::safetensors::load(root.join("trajectory.safetensors"), &Device::Cpu).unwrap();
    let oracle: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("oracle.json")).unwrap()).unwrap();
    let ids = &traj["input_ids"];
    let (b, t) = ids.dims2().unwrap();
    let batch = peftkit::data::Batch {
        input_ids: ids.flatten_all().unwrap().to_vec1::<i64>().unwrap().iter().map(|&v| v as u32).collect(),
        labels: traj["labels"].flatten_all().unwrap().to_vec1::<i64>().unwrap().iter().map(|&v| v as i32).collect(),
        lengths: vec![t; b],
        batch: b,
        seq: t,
        segments: Vec::new(),
    };
    let work = tmp("train-oracle");
    let tied = work.join("tied");
    make_tied(&tied);
    for (case, base) in
        [("mts", fixture("tiny-llama")), ("tokens", fixture("tiny-llama")), ("tied-tokens", tied.clone())]
    {
        let mut model = load_dir(&base);
        peft_model::load_adapter(&mut model, &root.join(case).join("init")).unwrap();
        let (names, vars): (Vec<String>, Vec<_>) = peft_model::trainable(&model).into_iter().unzip();
        assert!(names.iter().any(|n| !n.contains("lora_")), "{names:?}");
        let mut opt = AdamW::new(vars.clone(), 0.9, 0.999, 1e-8, 0.01).unwrap();
        for step in 1..=2usize {
            let outcome = optimizer_step(&model, &mut opt, std::slice::from_ref(&batch), |_| None, 1.0, 1e-2).unwrap();
            let StepOutcome::Updated { loss, grad_norm, .. } = outcome else { panic!("{case}: {outcome:?}") };
            let want = &oracle[case][step - 1];
            let (wl, wg) = (want["loss"].as_f64().unwrap(), want["grad_norm_before_clip"].as_f64().unwrap());
            println!("{case} step {step}: loss {loss:.6} (torch {wl:.6}), grad norm {grad_norm:.6} (torch {wg:.6})");
            assert!((loss - wl).abs() <= 1e-5 * wl.abs(), "{case} step {step}: loss {loss} vs {wl}");
            assert!((grad_norm - wg).abs() <= 1e-4 * wg.abs(), "{case} step {step}: grad norm {grad_norm} vs {wg}");
            let mut worst = 0f32;
            for (n, v) in names.iter().zip(&vars) {
                let w = &traj[&format!("{case}.step{step}.{n}")];
                worst = worst.max(rel_diff(v.as_tensor(), w));
            }
            println!("{case} step {step}: trained tensors max rel diff {worst:e}");
            assert!(worst <= 1e-4, "{case} step {step}: {worst}");
        }
    }
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn merge_to_gguf_carries_the_trained_embedding_and_head() {
    // peftkit reads the merged GGUF back (as llama.cpp would: its own names and Q/K order) and must compute PEFT's
    // merge_and_unload() logits, on the untied fixture and on a tied base that the copy unties.
    let work = tmp("gguf");
    let tied = work.join("tied");
    make_tied(&tied);
    let root = fixture("tiny-llama-tokens-peft");
    let want_tied = candle_core::safetensors::load(root.join("logits.safetensors"), &Device::Cpu).unwrap();
    let fixed = Tensor::new(&[[5u32, 17, 42, 99, 3, 250, 7, 8]], &Device::Cpu).unwrap();
    let expected = expected_v2("tiny-llama");
    let cases = [
        (
            fixture("tiny-llama"),
            fixture("tiny-llama/peft-lora-mts"),
            expected["input_ids"].to_dtype(DType::U32).unwrap(),
            expected["logits_mts_merged"].clone(),
        ),
        (tied.clone(), root.join("tied-mts-embed"), fixed.clone(), want_tied["tied-mts-embed.merged_logits"].clone()),
        (tied.clone(), root.join("tied-tokens"), fixed.clone(), want_tied["tied-tokens.merged_logits"].clone()),
    ];
    for (i, (base, adapter, ids, want)) in cases.into_iter().enumerate() {
        let out = work.join(format!("m{i}.gguf"));
        let mut opts = MergeOptions::new(base.display().to_string(), &adapter, &out);
        opts.format = peftkit::merge::OutFormat::Gguf;
        opts.quant = Some(peftkit::merge::GgufQuant::parse("f32").unwrap());
        peftkit::merge::merge(&opts).unwrap();
        let m = peftkit::base::load_base(out.to_str().unwrap(), None, None, &Default::default(), &Device::Cpu).unwrap();
        let d = rel_diff(&m.model.forward(&ids).unwrap(), &want);
        println!("{}: peftkit merge --format gguf vs PEFT merge_and_unload: max rel diff {d:e}", adapter.display());
        assert!(d <= 1e-4, "{}: {d}", adapter.display());
    }
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn fresh_copies_and_rows_are_the_identity_and_resume_restores_them() {
    use adapter::vocab::{VocabConfig, VocabModule};
    use adapter::{AdapterConfig, LoraConfig, TargetModules};
    // Closed form: a copy of the base matrices, or rows equal to the base's, change nothing (B = 0 for LoRA too).
    let ids = Tensor::new(&[[5u32, 17, 42, 99, 3, 250, 7, 8]], &Device::Cpu).unwrap();
    let lora = AdapterConfig::Lora(LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        target_modules: TargetModules::List(vec!["q_proj".into(), "v_proj".into()]),
        ..Default::default()
    });
    let base = load_dir(&fixture("tiny-llama")).forward(&ids).unwrap();
    let configs = [
        VocabConfig { modules_to_save: vec![VocabModule::Embed, VocabModule::Head], trainable_tokens: vec![] },
        VocabConfig {
            modules_to_save: vec![],
            trainable_tokens: vec![(VocabModule::Embed, vec![3, 17, 42]), (VocabModule::Head, vec![17, 99])],
        },
    ];
    let what = Path::new("recipe.yaml");
    for vcfg in &configs {
        let mut m = load_dir(&fixture("tiny-llama"));
        peft_model::attach(&mut m, &lora, 1).unwrap();
        peft_model::vocab::attach(&mut m, vcfg, what).unwrap();
        assert_eq!(rel_diff(&m.forward(&ids).unwrap(), &base), 0.0, "{vcfg:?}");
    }

    // An interrupted run with copies and rows resumes to the bytes of an uninterrupted one.
    let data: Vec<peftkit::data::Example> = (0..12)
        .map(|i| {
            let ids: Vec<u32> = (0..14).map(|j| ((i * 7 + j * 3) % 300 + 10) as u32).chain([17, 42]).collect();
            let labels = ids.iter().enumerate().map(|(j, &t)| if j < 4 { -100 } else { t as i32 }).collect();
            peftkit::data::Example { input_ids: ids, labels }
        })
        .collect();
    let cfg = peftkit::train::TrainConfig {
        max_steps: Some(5),
        learning_rate: 1e-2,
        lr_scheduler: peftkit::recipe::LrScheduler::Constant,
        weight_decay: 0.01,
        seed: 7,
        ..Default::default()
    };
    let work = tmp("resume");
    for (i, vcfg) in configs.iter().enumerate() {
        let run = |name: &str, stop: Option<usize>| -> Vec<u8> {
            let out = work.join(format!("{name}-{i}"));
            let fresh = || {
                let mut m = load_dir(&fixture("tiny-llama"));
                peft_model::attach(&mut m, &lora, 7).unwrap();
                peft_model::vocab::attach(&mut m, vcfg, what).unwrap();
                m
            };
            let mut m = fresh();
            let opts = peftkit::train::TrainOptions { stop_after_step: stop, ..Default::default() };
            peftkit::train::train(&mut m, &lora, &data, None, &cfg, "tiny-llama", &out, &opts).unwrap();
            if stop.is_some() {
                m = fresh();
                let opts = peftkit::train::TrainOptions { resume: true, ..Default::default() };
                peftkit::train::train(&mut m, &lora, &data, None, &cfg, "tiny-llama", &out, &opts).unwrap();
            }
            peft_model::save_adapter(&m, &lora, "tiny-llama", None, &out).unwrap();
            std::fs::read(out.join("adapter_model.safetensors")).unwrap()
        };
        let full = run("full", None);
        assert_eq!(full, run("resumed", Some(2)), "{vcfg:?}");
        // The copies / rows moved.
        let st = safetensors::SafeTensors::deserialize(&full).unwrap();
        assert!(st.names().iter().any(|n| !n.contains("lora_")));
    }
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn merge_refuses_a_copy_of_another_shape_naming_file_and_tensor() {
    let work = tmp("bad-shape");
    let d = work.join("adapter");
    std::fs::create_dir_all(&d).unwrap();
    let src = fixture("tiny-llama/peft-lora-mts");
    std::fs::copy(src.join("adapter_config.json"), d.join("adapter_config.json")).unwrap();
    let mut st = candle_core::safetensors::load(src.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let key = "base_model.model.model.embed_tokens.weight".to_string();
    st.insert(key.clone(), Tensor::zeros((384, 32), DType::F32, &Device::Cpu).unwrap());
    candle_core::safetensors::save(&st, d.join("adapter_model.safetensors")).unwrap();
    let opts = MergeOptions::new(fixture("tiny-llama").display().to_string(), &d, work.join("out"));
    let e = peftkit::merge::merge(&opts).unwrap_err();
    assert!(e.is_user_error());
    let e = e.to_string();
    assert!(e.contains("adapter_model.safetensors") && e.contains(&key) && e.contains("[384, 32]"), "{e}");
    // Loading it for generation says the same.
    let e = peft_model::load_adapter(&mut load_dir(&fixture("tiny-llama")), &d).unwrap_err().to_string();
    assert!(e.contains(&key) && e.contains("[384, 32]"), "{e}");
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn merged_card_says_what_the_embedding_and_head_are() {
    let work = tmp("merged-card");
    let tied = work.join("tied");
    make_tied(&tied);
    let out = work.join("m");
    merged_folder(&tied, &fixture("tiny-llama-tokens-peft/tied-mts-embed"), &out);
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.contains("`model.embed_tokens.weight` is the adapter's trained copy"), "{card}");
    assert!(card.contains("`tie_word_embeddings: false`"), "{card}");
    let out = work.join("t");
    merged_folder(&fixture("tiny-llama"), &fixture("tiny-llama-tokens-peftkit"), &out);
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(
        card.contains("4 rows of `model.embed_tokens.weight`") && card.contains("from 384 to 386 tokens"),
        "{card}"
    );
    let _ = std::fs::remove_dir_all(&work);
}
