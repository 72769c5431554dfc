//! Training on the tiny fixture model: the loss goes down, the saved adapter reloads to identical logits, and a run
//! interrupted and resumed writes the same adapter bytes as an uninterrupted one.

use candle_core::{DType, Device, Tensor};
use peftkit::adapter::{AdapterConfig, Ia3Config, LoraConfig, LoraInit, TargetModules};
use peftkit::data::Example;
use peftkit::model::{load_llama, Llama};
use peftkit::peft_model;
use peftkit::recipe::LrScheduler;
use peftkit::train::{self, TrainConfig, TrainOptions};
use std::path::{Path, PathBuf};

fn tiny() -> Llama {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
    load_llama(&dir.join("config.json"), &[dir.join("model.safetensors")], &Device::Cpu, DType::F32).unwrap()
}

/// Sequences with a learnable pattern (arithmetic progressions of token ids), prompt half unsupervised.
fn examples(n: usize) -> Vec<Example> {
    (0..n)
        .map(|i| {
            let len = 12 + i % 5;
            let ids: Vec<u32> = (0..len).map(|j| ((i * 7 + j * 3) % 300 + 10) as u32).collect();
            let labels = ids.iter().enumerate().map(|(j, &t)| if j < 4 { -100 } else { t as i32 }).collect();
            Example { input_ids: ids, labels }
        })
        .collect()
}

fn lora(dropout: f64) -> AdapterConfig {
    AdapterConfig::Lora(LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: dropout,
        target_modules: TargetModules::AllLinear,
        ..Default::default()
    })
}

fn config(max_steps: usize) -> TrainConfig {
    TrainConfig {
        gradient_accumulation_steps: 2,
        max_steps: Some(max_steps),
        learning_rate: 1e-2,
        lr_scheduler: LrScheduler::Cosine,
        warmup_steps: 2,
        weight_decay: 0.01,
        seed: 7,
        eval_every: Some(5),
        save_every: Some(4),
        ..Default::default()
    }
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("peftkit-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn training_lowers_loss_and_adapter_round_trips() {
    let data = examples(24);
    // "Lowers the loss" is measured on the training sequences themselves.
    let valid = data[..8].to_vec();
    let mut model = tiny();
    let cfg_a = lora(0.05);
    peft_model::attach(&mut model, &cfg_a, 7).unwrap();
    let before = train::evaluate(&model, &valid, 4, 0).unwrap();
    let out = tmpdir("train");
    let mut cfg = config(30);
    cfg.learning_rate = 3e-2;
    let s = train::train(&mut model, &cfg_a, &data, Some(&valid), &cfg, "tiny-llama", &out, &TrainOptions::default())
        .unwrap();
    let after = s.final_eval.unwrap();
    println!("eval loss {} -> {}", before.loss, after.loss);
    assert_eq!(s.initial_eval.unwrap().loss, before.loss);
    assert!(after.loss < before.loss - 0.15, "loss did not drop: {} -> {}", before.loss, after.loss);
    let metrics = std::fs::read_to_string(out.join(train::METRICS_FILE)).unwrap();
    assert!(metrics.lines().count() >= 30);

    // Save, reload into a fresh model: identical logits.
    peft_model::save_adapter(&model, &cfg_a, "tiny-llama", None, &out).unwrap();
    let ids = Tensor::new(&[[5u32, 17, 42, 99, 3, 250]], &Device::Cpu).unwrap();
    let want = model.forward(&ids).unwrap();
    let mut fresh = tiny();
    let loaded = peft_model::load_adapter(&mut fresh, &out).unwrap();
    // all-linear is saved expanded to module names, as PEFT does.
    let AdapterConfig::Lora(l) = &loaded.adapter else { panic!("not LoRA") };
    assert_eq!((l.r, l.lora_alpha, l.lora_dropout), (4, 8.0, 0.05));
    assert!(matches!(&l.target_modules, TargetModules::List(v) if v.len() == 7));
    let got = fresh.forward(&ids).unwrap();
    let diff = (want - got).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(diff, 0.0);
    // The config is PEFT's: keys and expanded module names.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["target_modules"].as_array().unwrap().len(), 7);
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn ia3_training_lowers_loss_and_adapter_round_trips() {
    let data = examples(24);
    let valid = data[..8].to_vec();
    let mut model = tiny();
    let cfg_a = AdapterConfig::Ia3(Ia3Config::default());
    assert_eq!(peft_model::attach(&mut model, &cfg_a, 7).unwrap(), 6); // k, v, down in 2 layers
    let before = train::evaluate(&model, &valid, 4, 0).unwrap();
    let out = tmpdir("ia3");
    let mut cfg = config(30);
    cfg.learning_rate = 0.2;
    cfg.weight_decay = 0.0;
    let s = train::train(&mut model, &cfg_a, &data, Some(&valid), &cfg, "tiny-llama", &out, &TrainOptions::default())
        .unwrap();
    let after = s.final_eval.unwrap();
    println!("IA3 eval loss {} -> {}", before.loss, after.loss);
    assert!(after.loss < before.loss - 0.05, "loss did not drop: {} -> {}", before.loss, after.loss);

    peft_model::save_adapter(&model, &cfg_a, "tiny-llama", None, &out).unwrap();
    let ids = Tensor::new(&[[5u32, 17, 42, 99, 3, 250]], &Device::Cpu).unwrap();
    let want = model.forward(&ids).unwrap();
    let mut fresh = tiny();
    let loaded = peft_model::load_adapter(&mut fresh, &out).unwrap();
    assert_eq!(loaded.adapter, cfg_a);
    let diff =
        (want - fresh.forward(&ids).unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(diff, 0.0);
    // PEFT's names and shapes: (out, 1) for k/v, (1, in) for the feedforward down_proj.
    let t = candle_core::safetensors::load(out.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(t.len(), 6);
    assert_eq!(t["base_model.model.model.layers.0.self_attn.k_proj.ia3_l"].dims(), [32, 1]);
    assert_eq!(t["base_model.model.model.layers.1.mlp.down_proj.ia3_l"].dims(), [1, 160]);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "IA3");
    assert_eq!(cfg["feedforward_modules"], serde_json::json!(["down_proj"]));
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn interrupted_and_resumed_run_writes_identical_adapter_bytes() {
    let data = examples(20);
    let cfg_a = lora(0.1);
    let run = |name: &str, stop: Option<usize>| -> (PathBuf, Vec<u8>) {
        let out = tmpdir(name);
        let mut model = tiny();
        peft_model::attach(&mut model, &cfg_a, 7).unwrap();
        let opts = TrainOptions { stop_after_step: stop, ..Default::default() };
        let s = train::train(&mut model, &cfg_a, &data, None, &config(9), "tiny-llama", &out, &opts).unwrap();
        if stop.is_some() {
            assert!(s.interrupted_at.is_some());
            // Resume in a fresh process state: a new model, adapters re-initialised, then restored.
            let mut model = tiny();
            peft_model::attach(&mut model, &cfg_a, 7).unwrap();
            let opts = TrainOptions { resume: true, ..Default::default() };
            let s = train::train(&mut model, &cfg_a, &data, None, &config(9), "tiny-llama", &out, &opts).unwrap();
            assert_eq!(s.steps, 9);
            peft_model::save_adapter(&model, &cfg_a, "tiny-llama", None, &out).unwrap();
        } else {
            assert_eq!(s.steps, 9);
            peft_model::save_adapter(&model, &cfg_a, "tiny-llama", None, &out).unwrap();
        }
        let bytes = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
        (out, bytes)
    };
    let (a, full) = run("full", None);
    let (b, resumed) = run("resumed", Some(5));
    assert_eq!(full, resumed, "resumed adapter differs from the uninterrupted one");
    // The metrics log of the resumed run reads as one run.
    let steps: Vec<u64> = std::fs::read_to_string(b.join(train::METRICS_FILE))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=9).collect::<Vec<_>>());
    // A resume with other settings is refused.
    let mut model = tiny();
    peft_model::attach(&mut model, &cfg_a, 7).unwrap();
    let mut other = config(9);
    other.learning_rate = 0.5;
    let err = train::train(
        &mut model,
        &cfg_a,
        &data,
        None,
        &other,
        "t",
        &b,
        &TrainOptions { resume: true, ..Default::default() },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("other training settings"), "{err}");
    let _ = (std::fs::remove_dir_all(a), std::fs::remove_dir_all(b));
}

/// The whole model's LoRA gradients (through attention, RoPE, norms, SwiGLU, the fused loss) against central
/// finite differences of the loss.
#[test]
fn model_lora_gradients_match_finite_differences() {
    let mut cfg = lora(0.0);
    let AdapterConfig::Lora(l) = &mut cfg else { unreachable!() };
    l.init = LoraInit::Random;
    let checked = check_gradients(&cfg, &["layers.0.self_attn.q_proj", "layers.1.mlp.down_proj"]);
    assert!(checked >= 20);
}

/// IA3's gradients, for output-scaled (k_proj, v_proj) and input-scaled (down_proj) vectors, against finite differences.
#[test]
fn model_ia3_gradients_match_finite_differences() {
    // Random vectors (init_ia3_weights: false), so that no gradient vanishes by symmetry.
    let cfg = AdapterConfig::Ia3(Ia3Config { init_ia3_weights: false, ..Default::default() });
    let checked =
        check_gradients(&cfg, &["layers.0.self_attn.k_proj", "layers.0.self_attn.v_proj", "layers.1.mlp.down_proj"]);
    assert!(checked >= 15);
}

/// Compares the backward pass with central finite differences of the loss, for a few entries of every trainable
/// tensor whose name contains one of `modules`; returns how many entries were checked.
fn check_gradients(cfg: &AdapterConfig, modules: &[&str]) -> usize {
    let mut model = tiny();
    peft_model::attach(&mut model, cfg, 3).unwrap();
    let batch = peftkit::data::make_batch(&examples(3).iter().collect::<Vec<_>>(), 0);
    let ids = Tensor::from_vec(batch.input_ids.clone(), (batch.batch, batch.seq), &Device::Cpu).unwrap();
    let ctx = peftkit::linear::ForwardCtx::default();
    let loss_of = |m: &Llama| -> f64 {
        let h = m.forward_hidden(&ids, &ctx, None).unwrap();
        m.loss(&h, &batch.labels, 10.0).unwrap().to_scalar::<f32>().unwrap() as f64
    };
    let h = model.forward_hidden(&ids, &ctx, None).unwrap();
    let grads = model.loss(&h, &batch.labels, 10.0).unwrap().backward().unwrap();
    let params = peft_model::trainable(&model);
    let mut checked = 0;
    for (name, var) in params.iter().filter(|(n, _)| modules.iter().any(|m| n.contains(m))) {
        let g: Vec<f32> = grads.get(var.as_tensor()).expect(name).flatten_all().unwrap().to_vec1().unwrap();
        let base: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        for i in (0..base.len()).step_by(base.len() / 5 + 1) {
            let eps = 1e-2f32;
            let set = |v: f32| {
                let mut w = base.clone();
                w[i] = v;
                var.set(&Tensor::from_vec(w, var.shape(), &Device::Cpu).unwrap()).unwrap();
            };
            set(base[i] + eps);
            let lp = loss_of(&model);
            set(base[i] - eps);
            let lm = loss_of(&model);
            set(base[i]);
            let fd = (lp - lm) / (2.0 * eps as f64);
            let tol = 2e-3 * (1.0 + fd.abs());
            assert!((fd - g[i] as f64).abs() < tol, "{name}[{i}]: finite difference {fd}, backward {}", g[i]);
            checked += 1;
        }
    }
    checked
}

#[test]
fn qlora_training_lowers_loss_and_adapter_reloads_onto_the_nf4_base() {
    use peftkit::linear::FrozenWeight;
    use peftkit::model::{load_llama_quant, BaseQuant};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
    let nf4 = || {
        load_llama_quant(
            &dir.join("config.json"),
            &[dir.join("model.safetensors")],
            &Device::Cpu,
            DType::F32,
            BaseQuant::Nf4 { double_quant: true },
        )
        .unwrap()
    };
    let data = examples(24);
    let valid = data[..8].to_vec();
    let mut model = nf4();
    assert!(model.linears().all(|l| matches!(l.weight, FrozenWeight::Nf4(_))));
    let cfg_a = lora(0.05);
    peft_model::attach(&mut model, &cfg_a, 7).unwrap();
    let before = train::evaluate(&model, &valid, 4, 0).unwrap();
    let out = tmpdir("qlora");
    let mut cfg = config(30);
    cfg.learning_rate = 3e-2;
    let s = train::train(&mut model, &cfg_a, &data, Some(&valid), &cfg, "tiny-llama", &out, &TrainOptions::default())
        .unwrap();
    let after = s.final_eval.unwrap();
    println!("QLoRA eval loss {} -> {}", before.loss, after.loss);
    assert!(after.loss < before.loss - 0.1, "loss did not drop: {} -> {}", before.loss, after.loss);
    peft_model::save_adapter(&model, &cfg_a, "tiny-llama", None, &out).unwrap();
    let ids = Tensor::new(&[[5u32, 17, 42, 99, 3, 250]], &Device::Cpu).unwrap();
    let want = model.forward(&ids).unwrap();
    let mut fresh = nf4();
    peft_model::load_adapter(&mut fresh, &out).unwrap();
    let diff =
        (want - fresh.forward(&ids).unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(diff, 0.0);
    let _ = std::fs::remove_dir_all(&out);
}

/// Per-step (loss, grad_norm) of a run's metrics log.
fn step_metrics(out: &Path) -> Vec<(f64, f64)> {
    std::fs::read_to_string(out.join(train::METRICS_FILE))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("loss").is_some())
        .map(|v| (v["loss"].as_f64().unwrap(), v["grad_norm"].as_f64().unwrap()))
        .collect()
}

#[test]
fn gradient_checkpointing_trains_identically() {
    // LoRA with dropout: the recomputed layers must draw the forward's masks. Runs: plain; checkpointed; and
    // plain for 3 steps, then resumed with checkpointing (the setting is not part of the run's fingerprint).
    let data = examples(20);
    let cfg_a = lora(0.1);
    let run = |name: &str, checkpointing: bool, stop: Option<usize>| -> (PathBuf, Vec<(f64, f64)>, Vec<f32>) {
        let out = tmpdir(name);
        let mut model = tiny();
        peft_model::attach(&mut model, &cfg_a, 7).unwrap();
        model.gradient_checkpointing = checkpointing;
        let opts = TrainOptions { stop_after_step: stop, ..Default::default() };
        let s = train::train(&mut model, &cfg_a, &data, None, &config(6), "tiny-llama", &out, &opts).unwrap();
        if stop.is_some() {
            let mut model = tiny();
            peft_model::attach(&mut model, &cfg_a, 7).unwrap();
            model.gradient_checkpointing = !checkpointing;
            let opts = TrainOptions { resume: true, ..Default::default() };
            let s = train::train(&mut model, &cfg_a, &data, None, &config(6), "tiny-llama", &out, &opts).unwrap();
            assert_eq!(s.steps, 6);
            peft_model::save_adapter(&model, &cfg_a, "tiny-llama", None, &out).unwrap();
        } else {
            assert_eq!(s.steps, 6);
            peft_model::save_adapter(&model, &cfg_a, "tiny-llama", None, &out).unwrap();
        }
        let tensors = candle_core::safetensors::load(out.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
        let mut names: Vec<_> = tensors.keys().cloned().collect();
        names.sort();
        let values = names.iter().flat_map(|n| tensors[n].flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect();
        let metrics = step_metrics(&out);
        (out, metrics, values)
    };
    let (a, plain, w_plain) = run("ckpt-off", false, None);
    let (b, ckpt, w_ckpt) = run("ckpt-on", true, None);
    let (c, switched, w_switched) = run("ckpt-switched", false, Some(3));
    assert_eq!(plain.len(), 6);
    let close = |x: f64, y: f64| (x - y).abs() <= 1e-6 * x.abs().max(y.abs());
    for (other, what) in [(&ckpt, "checkpointed"), (&switched, "switched on at resume")] {
        assert_eq!(other.len(), 6, "{what}");
        for (step, ((l, g), (lo, go))) in plain.iter().zip(other.iter()).enumerate() {
            assert!(
                close(*l, *lo) && close(*g, *go),
                "{what}, step {}: loss {l} vs {lo}, grad norm {g} vs {go}",
                step + 1
            );
        }
    }
    let scale = w_plain.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (other, what) in [(&w_ckpt, "checkpointed"), (&w_switched, "switched on at resume")] {
        assert_eq!(other.len(), w_plain.len());
        let diff = w_plain.iter().zip(other.iter()).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff <= 1e-6 * scale, "{what}: adapter differs by {diff}");
    }
    for d in [a, b, c] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// DoRA training on a dense and on an NF4 base: the loss drops, every magnitude moves off its initial value (the
/// weight norm), the saved adapter (PEFT's `use_dora` + `lora_magnitude_vector`) reloads to identical logits, and
/// merging it into the weights gives the unmerged model's logits.
#[test]
fn dora_training_on_dense_and_nf4_bases_round_trips_and_merges() {
    use peftkit::adapter::LayerAdapter;
    use peftkit::model::{load_llama_quant, BaseQuant};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
    let load = |quant| {
        load_llama_quant(&dir.join("config.json"), &[dir.join("model.safetensors")], &Device::Cpu, DType::F32, quant)
            .unwrap()
    };
    let data = examples(16);
    let valid = data[..8].to_vec();
    for quant in [BaseQuant::None, BaseQuant::Nf4 { double_quant: true }] {
        let mut model = load(quant);
        let cfg_a = match lora(0.05) {
            AdapterConfig::Lora(l) => AdapterConfig::Lora(LoraConfig { use_dora: true, ..l }),
            _ => unreachable!(),
        };
        assert_eq!(peft_model::attach(&mut model, &cfg_a, 7).unwrap(), 14);
        let ids = Tensor::new(&[[5u32, 17, 42, 99, 3, 250]], &Device::Cpu).unwrap();
        // A fresh DoRA adapter (B = 0, m = ‖W‖) leaves the model unchanged.
        let plain = load(quant).forward(&ids).unwrap();
        let fresh = model.forward(&ids).unwrap();
        let d0 = (&plain - &fresh).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d0 <= 1e-5, "{quant:?}: fresh DoRA changes the logits by {d0}");
        let m0: Vec<Tensor> = model
            .linears()
            .filter_map(|l| match &l.adapter {
                Some(LayerAdapter::Dora(d)) => Some(d.magnitude.as_tensor().copy().unwrap()),
                _ => None,
            })
            .collect();
        let before = train::evaluate(&model, &valid, 4, 0).unwrap();
        let out = tmpdir(&format!("dora-{}", quant != BaseQuant::None));
        let mut cfg = config(12);
        cfg.learning_rate = 3e-2;
        let s =
            train::train(&mut model, &cfg_a, &data, Some(&valid), &cfg, "tiny-llama", &out, &TrainOptions::default())
                .unwrap();
        let after = s.final_eval.unwrap();
        println!("DoRA ({quant:?}) eval loss {} -> {}", before.loss, after.loss);
        assert!(after.loss < before.loss - 0.1, "{quant:?}: loss did not drop: {} -> {}", before.loss, after.loss);
        let moved = model
            .linears()
            .filter_map(|l| match &l.adapter {
                Some(LayerAdapter::Dora(d)) => Some(d.magnitude.as_tensor().clone()),
                _ => None,
            })
            .zip(&m0)
            .map(|(m, m0)| (m - m0).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap())
            .fold(f32::INFINITY, f32::min);
        assert!(moved > 1e-3, "{quant:?}: a magnitude vector did not move ({moved})");

        peft_model::save_adapter(&model, &cfg_a, "tiny-llama", None, &out).unwrap();
        let saved: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
        assert_eq!(saved["use_dora"], true);
        let tensors = candle_core::safetensors::load(out.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
        let m = &tensors["base_model.model.model.layers.0.mlp.gate_proj.lora_magnitude_vector"];
        assert_eq!(m.dims(), [160]);
        let want = model.forward(&ids).unwrap();
        let mut reloaded = load(quant);
        peft_model::load_adapter(&mut reloaded, &out).unwrap();
        let got = reloaded.forward(&ids).unwrap();
        assert_eq!((&want - &got).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        peft_model::merge_and_unload(&mut reloaded).unwrap();
        let merged = reloaded.forward(&ids).unwrap();
        let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let d = (&want - &merged).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() / scale;
        println!("DoRA ({quant:?}) merged vs unmerged: max rel diff {d:e}");
        assert!(d <= 1e-5, "{quant:?}: {d}");
        let _ = std::fs::remove_dir_all(&out);
    }
}
