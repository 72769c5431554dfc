//! The `peftkit` binary: exit codes and messages for bad input, a model resolved by repo id from an HF cache
//! with HF_HUB_OFFLINE=1, `eval` against transformers' loss, and a short `train` run end to end.

mod common;

use candle_core::{DType, Device, Tensor};
use common::hf_cache;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_peftkit"));
    // Never reach for a real Hub or a user's cache from tests.
    c.env("HF_HUB_OFFLINE", "1").env("NO_COLOR", "1").env_remove("HF_TOKEN");
    c
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("peftkit-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// `peftkit train RECIPE --set output.dir=OUT [extra…]` from the repository root (where the recipes' relative paths
/// point).
fn train_recipe(recipe: &str, out: &Path, extra: &[&str]) -> Output {
    bin()
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["train", recipe, "--set"])
        .arg(format!("output.dir={}", out.display()))
        .args(extra)
        .output()
        .unwrap()
}

fn write_recipe(dir: &Path, body: &str) -> PathBuf {
    let p = dir.join("recipe.yaml");
    std::fs::write(&p, body).unwrap();
    p
}

#[test]
fn bad_recipe_exits_2_naming_line_and_key() {
    let d = tmp("recipe");
    let data = d.join("train.jsonl");
    std::fs::write(&data, "{\"text\": \"hello\"}\n").unwrap();
    let r = write_recipe(
        &d,
        &format!(
            "base_model: x/y\nadapter:\n  type: lora\n  rank: 8\ndata: {{train: {}}}\noutput: {{dir: {}}}\n",
            data.display(),
            d.join("out").display()
        ),
    );
    let o = bin().arg("train").arg(&r).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("recipe.yaml:4") && e.contains("adapter.rank"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
    // A wrong type, through --set: the override is named.
    let o = bin()
        .arg("train")
        .arg(&r)
        .args(["--set", "adapter.rank=", "--set", "training.learning_rate=fast"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    // Nothing was written.
    assert!(!d.join("out").exists());
}

#[test]
fn bad_dataset_line_exits_2_naming_file_and_line() {
    let d = tmp("data");
    let cache = hf_cache(&d.join("hub"));
    let data = d.join("train.jsonl");
    std::fs::write(&data, "{\"text\": \"hello world\"}\n{\"text\": \"fine\"}\n{\"text\": oops}\n").unwrap();
    let o = bin()
        .env("HF_HUB_CACHE", &cache)
        .args(["eval", "--base", "peftkit-test/tiny-llama", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("train.jsonl:3"), "{e}");
}

#[test]
fn offline_repo_id_eval_matches_transformers_loss() {
    let d = tmp("eval");
    let cache = hf_cache(&d.join("hub"));
    // The fixture's input_ids decode to a text whose tokenization gives those ids back; the reference loss is
    // transformers' model(ids, labels=ids).loss, computed here from its logits.
    let exp = candle_core::safetensors::load(fixtures().join("tiny-llama/expected.safetensors"), &Device::Cpu).unwrap();
    let ids: Vec<u32> = exp["input_ids"].to_dtype(DType::U32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let tok = tokenizers::Tokenizer::from_file(fixtures().join("tiny-llama/tokenizer.json")).unwrap();
    let text = tok.decode(&ids, false).unwrap();
    let re = tok.encode(text.as_str(), true).unwrap().get_ids().to_vec();
    assert_eq!(re, ids, "fixture text does not round-trip");
    let logits = exp["logits_base"].squeeze(0).unwrap();
    let lsm: Vec<Vec<f32>> = candle_nn::ops::log_softmax(&logits, 1).unwrap().to_vec2().unwrap();
    let want: f64 =
        -(0..ids.len() - 1).map(|j| lsm[j][ids[j + 1] as usize] as f64).sum::<f64>() / (ids.len() - 1) as f64;

    let data = d.join("eval.jsonl");
    std::fs::write(&data, format!("{}\n", serde_json::json!({"text": text}))).unwrap();
    let o = bin()
        .env("HF_HUB_CACHE", &cache)
        .args(["eval", "--base", "peftkit-test/tiny-llama", "--json", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let got = v["loss"].as_f64().unwrap();
    assert_eq!(v["tokens"].as_u64().unwrap() as usize, ids.len() - 1);
    assert!((got - want).abs() < 1e-4, "loss {got} vs transformers {want}");
    assert!((v["perplexity"].as_f64().unwrap() - want.exp()).abs() < 1e-2);

    // Not in the cache while offline: a clear error, exit 2.
    let o = bin()
        .env("HF_HUB_CACHE", &cache)
        .args(["eval", "--base", "peftkit-test/absent", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("HF_HUB_OFFLINE"), "{}", stderr(&o));
}

#[test]
fn train_end_to_end_from_cache_writes_peft_adapter_and_card() {
    let d = tmp("train");
    let cache = hf_cache(&d.join("hub"));
    let data = d.join("train.jsonl");
    let lines: String = (0..12)
        .map(|i| {
            serde_json::json!({"messages": [{"role": "user", "content": format!("What is code E{i}?")},
                {"role": "assistant", "content": format!("Code E{i} means the tank {} is empty.", i * 7)}]})
            .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(&data, lines).unwrap();
    let out = d.join("adapter");
    let r = write_recipe(
        &d,
        &format!(
            "base_model: peftkit-test/tiny-llama\nadapter: {{type: lora, r: 4, lora_alpha: 8}}\n\
             data: {{train: {0}, validation: {0}, format: chat, sequence_len: 64}}\n\
             training: {{max_steps: 4, micro_batch_size: 4, learning_rate: 1.0e-2, save_every: 2}}\noutput: {{dir: {1}}}\n",
            data.display(),
            out.display()
        ),
    );
    let o = bin().env("HF_HUB_CACHE", &cache).arg("train").arg(&r).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    for f in ["adapter_config.json", "adapter_model.safetensors", "README.md", "metrics.jsonl", "peftkit_recipe.yaml"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["base_model_name_or_path"], "peftkit-test/tiny-llama");
    assert_eq!(cfg["r"], 4);
    let st = candle_core::safetensors::load(out.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let a: &Tensor = &st["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"];
    assert_eq!(a.dims(), &[4, 64]);
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.starts_with("---\nbase_model: peftkit-test/tiny-llama\n"), "{card}");
    // No temporary files left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty());
    // A second run into the same folder is refused without --resume or --overwrite, and nothing is touched.
    let before = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    let o = bin().env("HF_HUB_CACHE", &cache).arg("train").arg(&r).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--overwrite"), "{}", stderr(&o));
    assert_eq!(std::fs::read(out.join("adapter_model.safetensors")).unwrap(), before);
    let o = bin().env("HF_HUB_CACHE", &cache).arg("train").arg(&r).arg("--overwrite").output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    // Same seed, same machine: the same adapter bytes.
    assert_eq!(std::fs::read(out.join("adapter_model.safetensors")).unwrap(), before);
    // Activation checkpointing recomputes the layers in the backward pass: the same gradients, the same bytes.
    let o = bin()
        .env("HF_HUB_CACHE", &cache)
        .arg("train")
        .arg(&r)
        .args(["--overwrite", "--set", "training.gradient_checkpointing=true"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("gradient checkpointing"), "{}", stderr(&o));
    assert_eq!(std::fs::read(out.join("adapter_model.safetensors")).unwrap(), before);
    // The trained adapter is evaluated by `eval --adapter`.
    let o = bin()
        .env("HF_HUB_CACHE", &cache)
        .args(["eval", "--base", "peftkit-test/tiny-llama", "--json", "--adapter"])
        .arg(&out)
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
}

/// Ctrl-C (SIGINT) during training writes a checkpoint and exits with 130; `--resume` then finishes the run.
#[test]
fn sigint_checkpoints_and_resume_finishes() {
    let d = tmp("sigint");
    let cache = hf_cache(&d.join("hub"));
    let data = d.join("train.jsonl");
    let lines: String = (0..16)
        .map(|i| serde_json::json!({"text": format!("line {i}: the quick brown fox {}", i * 13)}).to_string() + "\n")
        .collect();
    std::fs::write(&data, lines).unwrap();
    let out = d.join("adapter");
    let r = write_recipe(
        &d,
        &format!(
            "base_model: peftkit-test/tiny-llama\nadapter: {{type: lora, r: 2}}\ndata: {{train: {}, sequence_len: 32}}\n\
             training: {{max_steps: 150, micro_batch_size: 2}}\noutput: {{dir: {}}}\n",
            data.display(),
            out.display()
        ),
    );
    let child =
        bin().env("HF_HUB_CACHE", &cache).arg("train").arg(&r).stderr(std::process::Stdio::piped()).spawn().unwrap();
    // Wait until training is under way (the metrics log has lines), then interrupt.
    let started = std::time::Instant::now();
    while std::fs::read_to_string(out.join("metrics.jsonl")).map(|s| s.lines().count() < 3).unwrap_or(true) {
        assert!(started.elapsed().as_secs() < 120, "training did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    assert!(stderr(&o).contains("--resume"), "{}", stderr(&o));
    let ckpts = std::fs::read_dir(out.join("checkpoints")).unwrap().filter_map(|e| e.ok()).count();
    assert_eq!(ckpts, 1);
    // The final adapter is not written by an interrupted run.
    assert!(!out.join("adapter_model.safetensors").exists());
    // Resume finishes the run; its adapter is byte-identical to an uninterrupted run's.
    let o = bin().env("HF_HUB_CACHE", &cache).arg("train").arg(&r).arg("--resume").output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let resumed = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    let o = bin().env("HF_HUB_CACHE", &cache).arg("train").arg(&r).arg("--overwrite").output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(out.join("adapter_model.safetensors")).unwrap(), resumed);
}

#[test]
fn every_recipe_in_recipes_validates() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let p = entry.path();
        if p.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        // Paths in recipes are relative to the repository root, where users run them.
        let o = bin().current_dir(env!("CARGO_MANIFEST_DIR")).arg("inspect").arg(&p).output().unwrap();
        assert!(o.status.success(), "{}: {}", p.display(), stderr(&o));
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(
            text.starts_with('#'),
            "{} should open with a comment saying the command, hardware and time",
            p.display()
        );
        n += 1;
    }
    assert!(n >= 2, "found {n} recipes");
}

/// `eval --questions`: each greedy reply (the same text `generate --chat` gives) is checked for its expected fact.
#[test]
fn eval_questions_checks_greedy_replies_for_the_expected_fact() {
    let d = tmp("questions");
    let cache = hf_cache(&d.join("hub"));
    let reply = bin()
        .env("HF_HUB_CACHE", &cache)
        .args(["generate", "--base", "peftkit-test/tiny-llama", "--chat", "--prompt", "Where is it?"])
        .args(["--max-new-tokens", "6"])
        .output()
        .unwrap();
    assert!(reply.status.success(), "{}", stderr(&reply));
    let reply = String::from_utf8_lossy(&reply.stdout).trim().to_string();
    let fact: String = reply.chars().take(6).collect::<String>().to_uppercase();
    assert!(!fact.trim().is_empty(), "empty reply");
    let q = d.join("q.jsonl");
    std::fs::write(
        &q,
        format!(
            "{}\n{}\n",
            serde_json::json!({"question": "Where is it?", "expected": fact}),
            serde_json::json!({"question": "Who made it?", "expected": ["zz-not-a-reply-zz"]})
        ),
    )
    .unwrap();
    let answers = d.join("answers.jsonl");
    let o = bin()
        .env("HF_HUB_CACHE", &cache)
        .args(["eval", "--base", "peftkit-test/tiny-llama", "--max-new-tokens", "6", "--json", "--questions"])
        .arg(&q)
        .arg("--answers")
        .arg(&answers)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["questions"]["total"], 2);
    assert_eq!(v["questions"]["correct"], 1, "{v} (reply was {reply:?})");
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&answers).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines[0]["reply"].as_str(), Some(reply.as_str()));
    assert_eq!(lines[0]["correct"], true);
    assert_eq!(lines[1]["correct"], false);

    // A malformed questions file is refused before the model loads, naming the line.
    std::fs::write(&q, "{\"question\": \"a?\", \"expected\": \"b\"}\n{\"question\": 1}\n").unwrap();
    let o = bin()
        .env("HF_HUB_CACHE", &cache)
        .args(["eval", "--base", "peftkit-test/tiny-llama", "--questions"])
        .arg(&q)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("q.jsonl:2"), "{}", stderr(&o));
}

/// The whole training step with peftkit's own kernels held to baseline x86-64 (`PEFTKIT_CPU_ISA=scalar`) against
/// the default (the widest level this CPU has: AVX-512 or AVX2): the same losses over three steps, in f32 and bf16.
/// The level is read once per process, hence one `peftkit bench` process per level.
#[test]
fn baseline_kernels_give_the_default_losses() {
    let cfg = fixtures().join("tiny-llama/config.json");
    let losses = |isa: Option<&str>, dtype: &str| -> (f64, f64) {
        let mut c = bin();
        c.args(["bench", "--config", cfg.to_str().unwrap(), "--batch", "2", "--seq", "32", "--rank", "4"]);
        c.args(["--steps", "2", "--json", "--dtype", dtype]);
        if let Some(isa) = isa {
            c.env("PEFTKIT_CPU_ISA", isa);
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(o.stdout.trim_ascii()).unwrap();
        let isa_used = v["isa"].as_str().unwrap().to_string();
        if isa.is_some() {
            assert_eq!(isa_used, "scalar");
        }
        (v["loss_first"].as_f64().unwrap(), v["loss_last"].as_f64().unwrap())
    };
    for dtype in ["f32", "bf16"] {
        let (a, b) = (losses(Some("scalar"), dtype), losses(None, dtype));
        let tol = if dtype == "f32" { 1e-5 } else { 1e-3 };
        for (x, y) in [(a.0, b.0), (a.1, b.1)] {
            assert!((x - y).abs() <= tol * y.abs(), "{dtype}: baseline {x} vs default {y}");
        }
    }
}

/// `base_model_id` names the Hub repository a local base is a copy of: the adapter config and the card carry it
/// instead of the local path.
#[test]
fn base_model_id_names_the_hub_repo_of_a_local_base() {
    let d = tmp("base-model-id");
    let data = d.join("train.jsonl");
    let line = serde_json::json!({"messages": [{"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello there."}]});
    std::fs::write(&data, format!("{line}\n{line}\n")).unwrap();
    let out = d.join("adapter");
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
    let r = write_recipe(
        &d,
        &format!(
            "base_model: {}\nbase_model_id: peftkit-test/tiny-llama\nadapter: {{type: lora, r: 2}}\n\
             data: {{train: {}, format: chat, sequence_len: 32}}\ntraining: {{max_steps: 1, micro_batch_size: 2}}\n\
             output: {{dir: {}}}\n",
            base.display(),
            data.display(),
            out.display()
        ),
    );
    let o = bin().arg("train").arg(&r).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["base_model_name_or_path"], "peftkit-test/tiny-llama");
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.starts_with("---\nbase_model: peftkit-test/tiny-llama\n"), "{card}");
    assert!(card.contains("from_pretrained(\"peftkit-test/tiny-llama\")"), "{card}");
    // Generating with the local copy warns that the adapter names another base, unless --base-model-id says
    // which repository the copy is.
    let generate = |extra: &[&str]| {
        let o = bin()
            .args(["generate", "--base"])
            .arg(&base)
            .arg("--adapter")
            .arg(&out)
            .args(["--prompt", "Hi", "--max-new-tokens", "2"])
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        stderr(&o)
    };
    assert!(generate(&[]).contains("was trained on `peftkit-test/tiny-llama`"));
    let quiet = generate(&["--base-model-id", "peftkit-test/tiny-llama"]);
    assert!(!quiet.contains("was trained on"), "{quiet}");
    // Not a Hub id: exit 2 naming the key.
    let bad = std::fs::read_to_string(&r).unwrap().replace("peftkit-test/tiny-llama", "not a repo");
    std::fs::write(&r, bad).unwrap();
    let o = bin().arg("train").arg(&r).arg("--overwrite").output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("base_model_id: must be a Hugging Face Hub id"), "{}", stderr(&o));
}

/// `recipes/tiny-llama-dora.yaml` end to end: `train` says DoRA and writes a DoRA card, `inspect` reports it, and
/// `generate` with the adapter unmerged (norms fixed once) writes the same greedy text as from its merged folder.
#[test]
fn dora_recipe_trains_inspects_and_generates_like_its_merge() {
    let d = tmp("dora");
    let out = d.join("adapter");
    let o = train_recipe("recipes/tiny-llama-dora.yaml", &out, &["--set", "training.max_steps=2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("DoRA"), "{}", stderr(&o));
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.contains("# DoRA adapter for") && card.contains("- dora\n"), "{card}");
    let o = bin().arg("inspect").arg(&out).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("DoRA: yes"), "{}", String::from_utf8_lossy(&o.stdout));
    let base = fixtures().join("tiny-llama");
    let merged = d.join("merged");
    let o = bin()
        .args(["merge", "--dtype", "f32", "--base"])
        .arg(&base)
        .arg("--adapter")
        .arg(&out)
        .arg("--out")
        .arg(&merged)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let card = std::fs::read_to_string(merged.join("README.md")).unwrap();
    assert!(card.contains("with a DoRA adapter merged in"), "{card}");
    let generate = |base: &Path, adapter: Option<&Path>| {
        let mut c = bin();
        c.arg("generate").arg("--base").arg(base).args(["--prompt", "Where is my Sprigbox?", "--max-new-tokens", "12"]);
        if let Some(a) = adapter {
            c.arg("--adapter").arg(a);
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    let unmerged = generate(&base, Some(&out));
    assert_eq!(unmerged, generate(&merged, None));
    assert_ne!(unmerged, generate(&base, None), "the adapter changes nothing");
    let _ = std::fs::remove_dir_all(&d);
}

/// `recipes/tiny-llama-exclude.yaml`: `exclude_modules`, `layers_to_transform` and `layers_pattern` reach
/// `adapter_config.json` as PEFT writes them and leave the excluded projections without tensors; a layer index
/// beyond the model, and a `target_parameters` in an adapter folder, exit 2 naming the key.
#[test]
fn exclude_recipe_trains_and_target_errors_exit_2_naming_the_key() {
    let d = tmp("targets");
    let root = env!("CARGO_MANIFEST_DIR");
    let out = d.join("adapter");
    let o = train_recipe("recipes/tiny-llama-exclude.yaml", &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("lora adapter on 6 projections"), "{}", stderr(&o));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["exclude_modules"], serde_json::json!(["down_proj"]));
    assert_eq!(cfg["layers_to_transform"], serde_json::json!([1]));
    assert_eq!(cfg["layers_pattern"], serde_json::json!("layers"));
    let tensors = candle_core::safetensors::load(out.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(tensors.len(), 12);
    assert!(tensors.keys().all(|k| k.contains(".layers.1.") && !k.contains("down_proj")), "{:?}", tensors.keys());

    let text = std::fs::read_to_string(Path::new(root).join("recipes/tiny-llama-exclude.yaml")).unwrap();
    let line = text.lines().position(|l| l.starts_with("  layers_to_transform:")).unwrap() + 1;
    let recipe = write_recipe(&d, &text.replace("layers_to_transform: [1]", "layers_to_transform: [99]"));
    let o = bin()
        .current_dir(root)
        .arg("train")
        .arg(&recipe)
        .arg("--set")
        .arg(format!("output.dir={}", d.join("never").display()))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let want = format!(
        "{}:{line}: adapter.layers_to_transform[0]: layer 99 is out of range: the model has 2 decoder layers",
        recipe.display()
    );
    assert!(stderr(&o).contains(&want), "{}", stderr(&o));

    let config = out.join("adapter_config.json");
    let mut cfg = cfg;
    cfg["target_parameters"] = serde_json::json!(["feed_forward.experts.down_proj"]);
    std::fs::write(&config, cfg.to_string()).unwrap();
    let o = bin().arg("inspect").arg(&out).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("target_parameters: [\"feed_forward.experts.down_proj\"]"), "{}", stderr(&o));
}

/// `recipes/tiny-pissa.yaml` end to end: the run trains on the residual base and saves the adapter converted for the
/// original base (rank 2r, lora_alpha doubled, `init_lora_weights: true`), which `generate` uses unmerged as
/// `merge` folds it in; PiSSA on an NF4 base and with DoRA exit 2 naming the key and line.
#[test]
fn pissa_recipe_trains_saves_converted_and_merges() {
    let d = tmp("pissa");
    let root = env!("CARGO_MANIFEST_DIR");
    let out = d.join("adapter");
    let o = train_recipe("recipes/tiny-pissa.yaml", &out, &["--set", "training.max_steps=2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("init_lora_weights pissa"), "{}", stderr(&o));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!((cfg["r"].as_u64(), cfg["lora_alpha"].as_f64()), (Some(8), Some(16.0)));
    assert_eq!(cfg["init_lora_weights"], serde_json::json!(true));
    let t = candle_core::safetensors::load(out.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(t["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].dims(), [8, 160]);
    assert_eq!(t["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].dims(), [64, 8]);
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.contains("init_lora_weights: pissa"), "{card}");
    let base = fixtures().join("tiny-llama");
    let merged = d.join("merged");
    let o = bin()
        .args(["merge", "--dtype", "f32", "--base"])
        .arg(&base)
        .arg("--adapter")
        .arg(&out)
        .arg("--out")
        .arg(&merged)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let generate = |base: &Path, adapter: Option<&Path>| {
        let mut c = bin();
        c.arg("generate").arg("--base").arg(base).args(["--prompt", "Where is my Sprigbox?", "--max-new-tokens", "12"]);
        if let Some(a) = adapter {
            c.arg("--adapter").arg(a);
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    let unmerged = generate(&base, Some(&out));
    assert_eq!(unmerged, generate(&merged, None));

    let text = std::fs::read_to_string(Path::new(root).join("recipes/tiny-pissa.yaml")).unwrap();
    let line = text.lines().position(|l| l.starts_with("  init_lora_weights:")).unwrap() + 1;
    for (edit, want) in [
        (
            text.replace("\n  type: lora\n", "\n  type: qlora\n"),
            "adapter.init_lora_weights: pissa rewrites the base weights",
        ),
        (
            text.replace("\n  init_lora_weights: pissa\n", "\n  init_lora_weights: pissa\n  use_dora: true\n"),
            "adapter.init_lora_weights: pissa with adapter.use_dora is not supported",
        ),
    ] {
        let recipe = write_recipe(&d, &edit);
        let o = bin()
            .current_dir(root)
            .arg("train")
            .arg(&recipe)
            .arg("--set")
            .arg(format!("output.dir={}", d.join("never").display()))
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        let want = format!("{}:{line}: {want}", recipe.display());
        assert!(stderr(&o).contains(&want), "{}", stderr(&o));
        assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    }
    // A rank above a projection's smaller dimension (k_proj is 32×64) is refused at adapter.r's line.
    let r_line = text.lines().position(|l| l.starts_with("  r:")).unwrap() + 1;
    let recipe = write_recipe(&d, &text.replace("\n  r: 4\n", "\n  r: 48\n"));
    let o = bin()
        .current_dir(root)
        .arg("train")
        .arg(&recipe)
        .arg("--set")
        .arg(format!("output.dir={}", d.join("never").display()))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let want = format!("{}:{r_line}: adapter.r: rank 48 is above min(in, out) = 32", recipe.display());
    assert!(stderr(&o).contains(&want), "{}", stderr(&o));
    let _ = std::fs::remove_dir_all(&d);
}
