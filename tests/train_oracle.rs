//! peftkit's optimizer step against PEFT + torch: three AdamW steps of LoRA on tiny-llama (lr 1e-2, weight decay
//! 0.01, clipping to global norm 0.5, active at every step), from the same initial adapter on the same batches
//! (`tests/fixtures/train-oracle`, made by transformers + PEFT + torch.optim.AdamW in f32). The trainer's own
//! [`optimizer_step`] is fed the recorded batches; the losses, gradient norms and every LoRA tensor after every
//! step must match: to 1e-5 in f32, and within bf16 tolerance with the base and activations in bf16 (adapter,
//! gradients and optimizer in f32, as mixed precision holds them).

use candle_core::{DType, Device, Tensor};
use peftkit::adapter::peft_format;
use peftkit::data::Batch;
use peftkit::model::load_llama;
use peftkit::peft_model;
use peftkit::train::optim::AdamW;
use peftkit::train::step::{optimizer_step, StepOutcome};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

struct Oracle {
    losses: Vec<(f64, f64)>,
    tensors: HashMap<String, Tensor>,
}

fn oracle() -> Oracle {
    let dir = fixtures().join("train-oracle");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("oracle.json")).unwrap()).unwrap();
    let losses = json["losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["loss"].as_f64().unwrap(), s["grad_norm_before_clip"].as_f64().unwrap()))
        .collect();
    let tensors = candle_core::safetensors::load(dir.join("trajectory.safetensors"), &Device::Cpu).unwrap();
    Oracle { losses, tensors }
}

fn batch(o: &Oracle, step: usize) -> Batch {
    let ids = &o.tensors[&format!("step{step}.input_ids")];
    let labels = &o.tensors[&format!("step{step}.labels")];
    let (b, t) = ids.dims2().unwrap();
    let ids: Vec<u32> = ids.flatten_all().unwrap().to_vec1::<i64>().unwrap().iter().map(|&v| v as u32).collect();
    let labels: Vec<i32> = labels.flatten_all().unwrap().to_vec1::<i64>().unwrap().iter().map(|&v| v as i32).collect();
    Batch { input_ids: ids, labels, lengths: vec![t; b], batch: b, seq: t, segments: Vec::new() }
}

/// Per step: the loss, the gradient norm before clipping, the largest absolute difference of any LoRA element from
/// PEFT's, and ‖(W − W₀) − (W_peft − W₀)‖ / ‖W_peft − W₀‖ over all LoRA tensors (the relative error of the
/// accumulated update).
struct StepResult {
    loss: f64,
    grad_norm: f64,
    max_abs: f64,
    update_rel: f64,
}

/// Runs the three steps in `dtype`.
fn run(dtype: DType) -> Vec<StepResult> {
    let o = oracle();
    let tiny = fixtures().join("tiny-llama");
    let mut model =
        load_llama(&tiny.join("config.json"), &[tiny.join("model.safetensors")], &Device::Cpu, dtype).unwrap();
    peft_model::load_adapter(&mut model, &fixtures().join("train-oracle/init")).unwrap();
    let named = peft_model::trainable(&model);
    assert_eq!(named.len(), 28, "2 layers × 7 projections × (A, B)");
    for (_, v) in &named {
        assert_eq!(v.dtype(), DType::F32, "adapter weights stay f32 in every compute dtype");
    }
    let init: Vec<Tensor> = named.iter().map(|(_, v)| v.as_tensor().copy().unwrap()).collect();
    let vars = named.iter().map(|(_, v)| v.clone()).collect();
    let mut opt = AdamW::new(vars, 0.9, 0.999, 1e-8, 0.01).unwrap();
    let mut out = Vec::new();
    for step in 1..=3 {
        let outcome = optimizer_step(&model, &mut opt, &[batch(&o, step)], |_| None, 0.5, 1e-2).unwrap();
        let StepOutcome::Updated { loss, grad_norm, .. } = outcome else { panic!("step {step}: {outcome:?}") };
        let (mut max_abs, mut num, mut den) = (0f64, 0f64, 0f64);
        for ((name, var), w0) in named.iter().zip(&init) {
            let want: Vec<f32> = o.tensors[&format!("step{step}.{name}")].flatten_all().unwrap().to_vec1().unwrap();
            let got: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            let w0: Vec<f32> = w0.flatten_all().unwrap().to_vec1().unwrap();
            for ((g, w), z) in got.iter().zip(&want).zip(&w0) {
                max_abs = max_abs.max((g - w).abs() as f64);
                num += ((g - w) as f64).powi(2);
                den += ((w - z) as f64).powi(2);
            }
        }
        out.push(StepResult { loss, grad_norm, max_abs, update_rel: num.sqrt() / den.sqrt() });
    }
    out
}

fn report(what: &str, o: &Oracle, r: &[StepResult]) {
    for (i, s) in r.iter().enumerate() {
        let (want_loss, want_norm) = o.losses[i];
        eprintln!(
            "{what} step {}: loss {:.7} (PEFT {want_loss:.7}), grad norm {:.7} (PEFT {want_norm:.7}), LoRA tensors: max \
             |Δ| {:.2e}, update rel. error {:.2e}",
            i + 1,
            s.loss,
            s.grad_norm,
            s.max_abs,
            s.update_rel
        );
    }
}

/// f32: losses and gradient norms to 1e-5 relative, every LoRA element to 1e-5 absolute (the elements are
/// O(0.1); one step moves each by at most ≈ lr = 1e-2). Not a per-element relative bound: AdamW's first steps
/// normalise each gradient element, u = m̂/(√v̂ + ε), so an element whose gradient is only a few ε (a few 1e-8)
/// turns float32 summation noise (≈ 1e-10 there, in torch as here) into ≈ 5e-6 of weight change.
#[test]
fn three_adamw_steps_reproduce_peft_in_f32() {
    let o = oracle();
    let r = run(DType::F32);
    report("f32", &o, &r);
    for (i, s) in r.iter().enumerate() {
        let (want_loss, want_norm) = o.losses[i];
        assert!((s.loss - want_loss).abs() <= 1e-5 * want_loss.abs(), "step {}: loss {} vs {want_loss}", i + 1, s.loss);
        assert!((s.grad_norm - want_norm).abs() <= 1e-5 * want_norm, "step {}: grad norm {}", i + 1, s.grad_norm);
        assert!(s.max_abs <= 1e-5, "step {}: a LoRA element differs by {:e}", i + 1, s.max_abs);
        assert!(s.update_rel <= 1e-4, "step {}: update relative error {:e}", i + 1, s.update_rel);
    }
}

/// bf16 base weights and activations (adapter, gradients and AdamW in f32): the loss within 0.5% of PEFT's f32
/// loss, the gradient norm within 3%, and the accumulated update within 13% relative L2 error. The yardstick is
/// PEFT itself under `torch.autocast("cpu", bfloat16)` on the same three steps
/// (`scripts/train-oracle-autocast.py tests/fixtures bf16`, torch 2.15): update relative errors 1.15e-1, 8.08e-2,
/// 6.66e-2 against its own f32 trajectory, gradient norms within 0.6%. Per element, bf16 may flip the sign of a
/// first AdamW step where the gradient is near zero (a change of 2·lr for that element; torch's autocast run shows
/// max |Δ| 2.0e-2 too), so no per-element bound is asserted.
#[test]
fn three_adamw_steps_in_bf16_stay_within_bf16_tolerance() {
    let o = oracle();
    let r = run(DType::BF16);
    report("bf16", &o, &r);
    for (i, s) in r.iter().enumerate() {
        let (want_loss, want_norm) = o.losses[i];
        assert!((s.loss - want_loss).abs() <= 5e-3 * want_loss.abs(), "step {}: loss {} vs {want_loss}", i + 1, s.loss);
        assert!((s.grad_norm - want_norm).abs() <= 3e-2 * want_norm, "step {}: grad norm {}", i + 1, s.grad_norm);
        assert!(s.update_rel <= 0.13, "step {}: update relative error {:e}", i + 1, s.update_rel);
    }
}

/// The oracle's three batches as a `format: tokens` file: six rows of 16 tokens, in step order.
fn oracle_tokens_file(o: &Oracle, path: &Path) {
    let rows = |name: &str| -> Vec<Vec<i64>> { o.tensors[name].to_vec2::<i64>().unwrap() };
    let mut jsonl = String::new();
    for step in 1..=3 {
        let (ids, labels) = (rows(&format!("step{step}.input_ids")), rows(&format!("step{step}.labels")));
        for (i, l) in ids.iter().zip(&labels) {
            jsonl.push_str(&serde_json::json!({"input_ids": i, "labels": l}).to_string());
            jsonl.push('\n');
        }
    }
    std::fs::write(path, jsonl).unwrap();
}

/// `peftkit train` with `adapter.init_from: tests/fixtures/train-oracle/init` and the oracle's hyper-parameters,
/// fed the oracle's batches through a tokens file (no shuffling, no packing): the logged losses and the saved
/// adapter reproduce PEFT's three steps in f32 (losses to 1e-5 relative; every LoRA element to 1e-5 absolute and
/// each tensor to 1e-5 relative L2 error), and the saved adapter keeps the folder's PEFT config.
#[test]
fn cli_train_init_from_reproduces_peft_in_f32() {
    let o = oracle();
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("oracle-batches.jsonl");
    oracle_tokens_file(&o, &data);
    let out = d.path().join("out");
    let recipe = d.path().join("continue.yaml");
    let text = format!(
        "base_model: {base}\nadapter:\n  type: lora\n  init_from: {init}\n\
         data: {{train: {data}, format: tokens, sequence_len: 16, shuffle: false}}\n\
         training:\n  max_steps: 3\n  micro_batch_size: 2\n  gradient_accumulation_steps: 1\n  learning_rate: 1.0e-2\n  \
         lr_scheduler: constant\n  warmup_steps: 0\n  weight_decay: 0.01\n  adam_beta1: 0.9\n  adam_beta2: 0.999\n  \
         adam_epsilon: 1.0e-8\n  max_grad_norm: 0.5\n  device: cpu\n  dtype: f32\noutput: {{dir: {out}}}\n",
        base = fixtures().join("tiny-llama").display(),
        init = fixtures().join("train-oracle/init").display(),
        data = data.display(),
        out = out.display(),
    );
    std::fs::write(&recipe, &text).unwrap();
    let bin = || {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_peftkit"));
        c.env("HF_HUB_OFFLINE", "1").env("NO_COLOR", "1").env_remove("HF_TOKEN");
        c
    };
    let run = bin().arg("train").arg(&recipe).output().unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");

    // Losses, from metrics.jsonl.
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let losses: Vec<f64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| v["loss"].as_f64())
        .collect();
    assert_eq!(losses.len(), 3, "{metrics}");
    let mut max_loss_rel = 0f64;
    for (i, loss) in losses.iter().enumerate() {
        let want = o.losses[i].0;
        let rel = (loss - want).abs() / want.abs();
        eprintln!("CLI init_from step {}: loss {loss:.7} (PEFT {want:.7}), rel. diff {rel:.2e}", i + 1);
        max_loss_rel = max_loss_rel.max(rel);
    }

    // The saved adapter against PEFT's tensors after step 3.
    let saved = candle_core::safetensors::load(out.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let want: Vec<(&String, &Tensor)> = o.tensors.iter().filter(|(k, _)| k.starts_with("step3.base_model.")).collect();
    assert_eq!(saved.len(), want.len(), "{:?}", saved.keys().collect::<Vec<_>>());
    let (mut max_abs, mut max_rel) = (0f64, 0f64);
    for (key, w) in want {
        let name = key.trim_start_matches("step3.");
        let got = saved.get(name).unwrap_or_else(|| panic!("{name} not in the saved adapter"));
        assert_eq!(got.dims(), w.dims(), "{name}");
        let g: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
        let w: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
        let (mut num, mut den) = (0f64, 0f64);
        for (a, b) in g.iter().zip(&w) {
            max_abs = max_abs.max((a - b).abs() as f64);
            num += ((a - b) as f64).powi(2);
            den += (*b as f64).powi(2);
        }
        max_rel = max_rel.max(num.sqrt() / den.sqrt());
    }
    eprintln!(
        "CLI init_from vs PEFT after step 3: losses max rel. diff {max_loss_rel:.2e}; LoRA tensors max |Δ| {max_abs:.2e}, \
         max per-tensor relative L2 error {max_rel:.2e}"
    );
    assert!(max_loss_rel <= 1e-5, "loss rel. diff {max_loss_rel:e}");
    assert!(max_abs <= 1e-5, "a LoRA element differs by {max_abs:e}");
    assert!(max_rel <= 1e-5, "a LoRA tensor's relative error is {max_rel:e}");

    // The saved config is the folder's (PEFT format, r = 4, alpha 8, the same targets).
    let cfg = peft_format::read_config(&out).unwrap();
    let init = peft_format::read_config(&fixtures().join("train-oracle/init")).unwrap();
    assert_eq!(cfg.adapter, init.adapter);

    // A missing folder: exit 2, naming the key, its line and the folder.
    let missing = d.path().join("no-such-adapter");
    std::fs::write(
        &recipe,
        text.replace(&fixtures().join("train-oracle/init").display().to_string(), &missing.display().to_string()),
    )
    .unwrap();
    let run = bin().arg("train").arg(&recipe).arg("--overwrite").output().unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("{}:4: adapter.init_from: folder not found: {}", recipe.display(), missing.display())),
        "{stderr}"
    );
}

/// LoRA+ (`training.loraplus_lr_ratio: R`), one step of `peftkit train` from `train-oracle/init` on the oracle's
/// first batch: the A matrices move exactly as with one learning rate (PEFT's step-1 tensors), and each B matrix
/// takes the first AdamW step at lr·R. Closed form of that step: m̂ = g, v̂ = g², so
/// B₁ = B₀·(1 − lr·R·wd) − lr·R·g/(|g| + ε); the direction u = g/(|g| + ε) is read off PEFT's own step at R = 1,
/// u = (B₀·(1 − lr·wd) − B₁ᴾᴱᶠᵀ)/lr. (Elements whose gradient is a few ε carry ≈ 5e-6 of float noise at R = 1,
/// scaled by R here: hence the bound 1e-5·R.)
#[test]
fn cli_loraplus_scales_the_b_step_by_the_ratio() {
    const R: f64 = 4.0;
    let (lr, wd) = (1e-2f64, 0.01f64);
    let o = oracle();
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("oracle-batches.jsonl");
    oracle_tokens_file(&o, &data);
    let out = d.path().join("out");
    let recipe = d.path().join("loraplus.yaml");
    let init_dir = fixtures().join("train-oracle/init");
    std::fs::write(
        &recipe,
        format!(
            "base_model: {base}\nadapter: {{type: lora, init_from: {init}}}\n\
             data: {{train: {data}, format: tokens, sequence_len: 16, shuffle: false}}\n\
             training: {{max_steps: 1, micro_batch_size: 2, learning_rate: {lr}, lr_scheduler: constant, \
             weight_decay: {wd}, max_grad_norm: 0.5, device: cpu, dtype: f32, loraplus_lr_ratio: {R}}}\n\
             output: {{dir: {out}}}\n",
            base = fixtures().join("tiny-llama").display(),
            init = init_dir.display(),
            data = data.display(),
            out = out.display(),
        ),
    )
    .unwrap();
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_peftkit"))
        .env("HF_HUB_OFFLINE", "1")
        .env("NO_COLOR", "1")
        .arg("train")
        .arg(&recipe)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let saved = candle_core::safetensors::load(out.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let init = candle_core::safetensors::load(init_dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let flat = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
    let (mut max_a, mut max_b, mut n_b) = (0f64, 0f64, 0);
    for (name, got) in &saved {
        let (got, b0, peft1) = (flat(got), flat(&init[name]), flat(&o.tensors[&format!("step1.{name}")]));
        if name.contains(".lora_B.") {
            n_b += 1;
            for ((g, b0), p1) in got.iter().zip(&b0).zip(&peft1) {
                let (b0, p1) = (*b0 as f64, *p1 as f64);
                let u = (b0 * (1.0 - lr * wd) - p1) / lr;
                let want = b0 * (1.0 - lr * R * wd) - lr * R * u;
                max_b = max_b.max((*g as f64 - want).abs());
            }
        } else {
            for (g, p1) in got.iter().zip(&peft1) {
                max_a = max_a.max((g - p1).abs() as f64);
            }
        }
    }
    eprintln!("LoRA+ (ratio {R}) one step: A vs PEFT (ratio 1) max |Δ| {max_a:.2e}; B vs the closed form at lr·{R} max |Δ| {max_b:.2e}");
    assert_eq!(n_b, 14);
    assert!(max_a <= 1e-5, "an A element differs from the one-learning-rate step by {max_a:e}");
    assert!(max_b <= 1e-5 * R, "a B element differs from AdamW's first step at lr·R by {max_b:e}");
}
