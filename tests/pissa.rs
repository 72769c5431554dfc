//! PiSSA and OLoRA (`init_lora_weights: pissa | pissa_niter_N | olora`) against PEFT: the initial A, B and residual
//! base weights, the conversion of a trained adapter back to a plain LoRA adapter for the original base
//! (tests/fixtures/tiny-llama-pissa/make.py), merging it, and resuming a PiSSA run.

use candle_core::{DType, Device, Tensor};
use peftkit::adapter::{self, AdapterConfig, LayerAdapter, LoraConfig, LoraInit, TargetModules};
use peftkit::data::Example;
use peftkit::model::{load_llama, Llama};
use peftkit::peft_model;
use peftkit::recipe::LrScheduler;
use peftkit::train::{self, TrainConfig, TrainOptions};
use peftkit::weight::FrozenWeight;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn tiny() -> Llama {
    let dir = fixture("tiny-llama");
    load_llama(&dir.join("config.json"), &[dir.join("model.safetensors")], &Device::Cpu, DType::F32).unwrap()
}

fn lora(init: LoraInit) -> AdapterConfig {
    AdapterConfig::Lora(LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        target_modules: TargetModules::AllLinear,
        init,
        ..Default::default()
    })
}

/// max |a − b| / max |b|
fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let m = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    d / m
}

fn dense(w: &FrozenWeight) -> Tensor {
    w.dense().unwrap()
}

fn lora_of(a: &Option<LayerAdapter>) -> &peftkit::adapter::LoraLayer {
    match a {
        Some(LayerAdapter::Lora(l)) => l,
        other => panic!("expected a LoRA adapter, got {other:?}"),
    }
}

/// A (r, in) and B (out, r) with each component's sign flipped to agree with the reference's (`want_a`): singular
/// vectors and QR factors are unique only up to the sign of each component, and torch's LAPACK and faer may choose
/// differently; B·A and the residual do not depend on the choice.
fn align_signs(a: &Tensor, b: &Tensor, want_a: &Tensor) -> (Tensor, Tensor) {
    let dots = (a * want_a).unwrap().sum(1).unwrap(); // (r)
    let signs = dots.ge(0f32).unwrap().to_dtype(DType::F32).unwrap().affine(2.0, -1.0).unwrap(); // ±1
    let a = a.broadcast_mul(&signs.unsqueeze(1).unwrap()).unwrap();
    let b = b.broadcast_mul(&signs.unsqueeze(0).unwrap()).unwrap();
    (a, b)
}

#[test]
fn pissa_and_olora_initialisation_match_peft() {
    // PEFT's A, B and residual base for r=4, lora_alpha=8, all-linear on tiny-llama (make.py). Compared: the
    // residual base W − s·B·A and the product B·A exactly (both sign-free), and A, B up to a sign per component.
    let want = candle_core::safetensors::load(fixture("tiny-llama-pissa/init.safetensors"), &Device::Cpu).unwrap();
    for (name, init) in [("pissa", LoraInit::Pissa), ("olora", LoraInit::Olora)] {
        let mut model = tiny();
        let original: HashMap<String, Tensor> = model.linears().map(|l| (l.path.clone(), dense(&l.weight))).collect();
        assert_eq!(peft_model::attach(&mut model, &lora(init), 3).unwrap(), 14);
        let (mut worst_res, mut worst_ba, mut worst_ab) = (0f32, 0f32, 0f32);
        for lin in model.linears() {
            let l = lora_of(&lin.adapter);
            let key = |k: &str| &want[&format!("{name}.{}.{k}", lin.path)];
            let (a, b) = (l.a.as_tensor(), l.b.as_tensor());
            // Residual base; and W_res + s·B·A is the original weight.
            worst_res = worst_res.max(rel_diff(&dense(&lin.weight), key("base")));
            let back = (dense(&lin.weight) + (b.matmul(a).unwrap() * l.scaling).unwrap()).unwrap();
            assert!(rel_diff(&back, &original[&lin.path]) <= 1e-5, "{name} {}", lin.path);
            worst_ba = worst_ba.max(rel_diff(&b.matmul(a).unwrap(), &key("lora_B").matmul(key("lora_A")).unwrap()));
            let (a, b) = align_signs(a, b, key("lora_A"));
            worst_ab = worst_ab.max(rel_diff(&a, key("lora_A")).max(rel_diff(&b, key("lora_B"))));
            // The starting values are kept for the conversion.
            let i = l.initial.as_ref().unwrap();
            assert_eq!(rel_diff(&i.a, l.a.as_tensor()), 0.0);
        }
        println!("{name} vs PEFT: residual base {worst_res:e}, B·A {worst_ba:e}, A/B up to sign {worst_ab:e}");
        assert!(worst_res <= 1e-4 && worst_ba <= 1e-4 && worst_ab <= 1e-4, "{name}");
        // The model computes what the original computes.
        let ids = Tensor::new(&[[5u32, 17, 42, 99, 3, 250, 7, 8]], &Device::Cpu).unwrap();
        let d = rel_diff(&model.forward(&ids).unwrap(), &tiny().forward(&ids).unwrap());
        assert!(d <= 1e-5, "{name}: a fresh adapter changes the logits by {d}");
    }
}

#[test]
fn randomized_pissa_reconstructs_the_weight() {
    // `pissa_niter_N` is randomized (torch.svd_lowrank in PEFT): no bitwise reference; the residual plus the
    // update is the weight, and the factors have PiSSA's shape (B·A of rank r, A's rows orthogonal).
    let mut model = tiny();
    let original: HashMap<String, Tensor> = model.linears().map(|l| (l.path.clone(), dense(&l.weight))).collect();
    peft_model::attach(&mut model, &lora(LoraInit::PissaNiter(4)), 3).unwrap();
    for lin in model.linears() {
        let l = lora_of(&lin.adapter);
        let (a, b) = (l.a.as_tensor(), l.b.as_tensor());
        let back = (dense(&lin.weight) + (b.matmul(a).unwrap() * l.scaling).unwrap()).unwrap();
        let d = (back - &original[&lin.path]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d <= 1e-5, "{}: {d}", lin.path);
        let gram = a.matmul(&a.t().unwrap()).unwrap().to_vec2::<f32>().unwrap();
        for (i, row) in gram.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                if i != j {
                    assert!(v.abs() <= 1e-4 * gram[i][i], "{}: A's rows {i}, {j} not orthogonal: {v}", lin.path);
                }
            }
        }
    }
}

/// tiny-llama with PEFT's PiSSA start (residual base, A₀, B₀) and its perturbed ("trained") A, B.
fn peft_trained_pissa() -> Llama {
    let want = candle_core::safetensors::load(fixture("tiny-llama-pissa/init.safetensors"), &Device::Cpu).unwrap();
    let mut model = tiny();
    peft_model::attach(&mut model, &lora(LoraInit::Pissa), 3).unwrap();
    for lin in model.linears_mut() {
        let key = |k: &str| want[&k.replace('@', &lin.path)].clone();
        lin.weight = FrozenWeight::Dense(key("pissa.@.base"));
        let Some(LayerAdapter::Lora(l)) = &mut lin.adapter else { panic!() };
        l.a.set(&key("trained.@.lora_A")).unwrap();
        l.b.set(&key("trained.@.lora_B")).unwrap();
        l.initial = Some(std::sync::Arc::new(adapter::pissa::InitialAdapter {
            a: key("pissa.@.lora_A"),
            b: key("pissa.@.lora_B"),
        }));
    }
    model
}

#[test]
fn converted_adapter_matches_peft_and_loads_onto_the_original_base() {
    let conv = fixture("tiny-llama-pissa/converted");
    let model = peft_trained_pissa();
    let out = std::env::temp_dir().join(format!("peftkit-pissa-conv-{}", std::process::id()));
    peft_model::save_adapter(&model, &lora(LoraInit::Pissa), "tests/fixtures/tiny-llama", None, &out).unwrap();
    // Tensors: A' = [A; A₀], B' = [B, −B₀] as PEFT wrote them.
    let mine = candle_core::safetensors::load(out.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let peft = candle_core::safetensors::load(conv.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(mine.len(), peft.len());
    let mut worst = 0f32;
    for (k, t) in &peft {
        assert_eq!(mine[k].dims(), t.dims(), "{k}");
        worst = worst.max(rel_diff(&mine[k], t));
    }
    println!("converted tensors vs PEFT's: max rel diff {worst:e}");
    assert!(worst <= 1e-4);
    // Config: r and lora_alpha doubled, a plain LoRA start.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!((cfg["r"].as_u64(), cfg["lora_alpha"].as_f64()), (Some(8), Some(16.0)));
    assert_eq!(cfg["init_lora_weights"], serde_json::json!(true));
    // Logits: the converted adapter on the original base, in peftkit, against PEFT's (and against the trained
    // residual model: the conversion is exact).
    let want = candle_core::safetensors::load(conv.join("peft_logits.safetensors"), &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[5u32, 17, 42, 99, 3, 250, 7, 8]], &Device::Cpu).unwrap();
    let d_trained = rel_diff(&model.forward(&ids).unwrap(), &want["trained_logits"]);
    let mut fresh = tiny();
    peft_model::load_adapter(&mut fresh, &out).unwrap();
    let d = rel_diff(&fresh.forward(&ids).unwrap(), &want["logits"]);
    println!("residual model + PiSSA adapter vs PEFT {d_trained:e}; original base + converted vs PEFT {d:e}");
    assert!(d_trained <= 1e-4 && d <= 1e-4);
    assert!(rel_diff(&tiny().forward(&ids).unwrap(), &want["logits"]) > 1e-3, "the adapter changes nothing");
    // PEFT's own converted adapter loads in peftkit too, to the same logits.
    let mut fresh = tiny();
    peft_model::load_adapter(&mut fresh, &conv).unwrap();
    assert!(rel_diff(&fresh.forward(&ids).unwrap(), &want["logits"]) <= 1e-4);
    // Merging it into the original base gives the trained weights W_res + s·B·A.
    let mut fresh = tiny();
    peft_model::load_adapter(&mut fresh, &out).unwrap();
    peft_model::merge_and_unload(&mut fresh).unwrap();
    let mut worst = 0f32;
    for (lin, merged) in model.linears().zip(fresh.linears()) {
        let l = lora_of(&lin.adapter);
        let trained = (dense(&lin.weight) + l.delta_weight().unwrap()).unwrap();
        worst = worst.max(rel_diff(&dense(&merged.weight), &trained));
    }
    println!("merged converted adapter vs W_res + s·B·A: max rel diff {worst:e}");
    assert!(worst <= 1e-5);
    let _ = std::fs::remove_dir_all(&out);
}

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

fn config(max_steps: usize) -> TrainConfig {
    TrainConfig {
        max_steps: Some(max_steps),
        learning_rate: 1e-2,
        lr_scheduler: LrScheduler::Constant,
        seed: 7,
        save_every: Some(2),
        ..Default::default()
    }
}

#[test]
fn interrupted_pissa_run_resumes_from_the_checkpoints_start() {
    // The checkpoint keeps the adapter as trained (for the residual base) and A₀, B₀; a resumed run rebuilds the
    // residual from them, so it ends with the same converted adapter bytes as an uninterrupted run.
    let data = examples(12);
    for init in [LoraInit::Pissa, LoraInit::PissaNiter(2)] {
        let cfg = lora(init);
        let run = |name: &str, stop: Option<usize>| -> Vec<u8> {
            let out = std::env::temp_dir().join(format!("peftkit-pissa-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&out);
            let mut model = tiny();
            peft_model::attach(&mut model, &cfg, 5).unwrap();
            let opts = TrainOptions { stop_after_step: stop, ..Default::default() };
            train::train(&mut model, &cfg, &data, None, &config(4), "tiny-llama", &out, &opts).unwrap();
            if stop.is_some() {
                let ckpt = train::latest_checkpoint(&out).unwrap();
                let ck = serde_json::from_str::<serde_json::Value>(
                    &std::fs::read_to_string(ckpt.join("adapter_config.json")).unwrap(),
                )
                .unwrap();
                assert_eq!(ck["r"].as_u64(), Some(4), "a checkpoint holds the unconverted adapter");
                // A different seed would give another randomized SVD: the stored start must win.
                let mut model = tiny();
                let initial = train::resume_initial(&out).unwrap().expect("initial_adapter.safetensors");
                peft_model::attach_with_initial(&mut model, &cfg, 99, Some(&initial)).unwrap();
                let opts = TrainOptions { resume: true, ..Default::default() };
                train::train(&mut model, &cfg, &data, None, &config(4), "tiny-llama", &out, &opts).unwrap();
                peft_model::save_adapter(&model, &cfg, "tiny-llama", None, &out).unwrap();
            } else {
                peft_model::save_adapter(&model, &cfg, "tiny-llama", None, &out).unwrap();
            }
            let bytes = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
            let _ = std::fs::remove_dir_all(&out);
            bytes
        };
        assert_eq!(run("full", None), run("resumed", Some(2)), "{init:?}: resumed adapter differs");
    }
}

#[test]
fn peftkit_pissa_adapter_loads_in_peft_onto_the_original_base() {
    // A PiSSA adapter trained by `peftkit train recipes/tiny-pissa.yaml` and saved converted; PEFT loaded it onto
    // transformers' unmodified tiny-llama (tests/fixtures/tiny-llama-pissa-peftkit/make_peft_logits.py).
    let dir = fixture("tiny-llama-pissa-peftkit");
    let mut model = tiny();
    peft_model::load_adapter(&mut model, &dir).unwrap();
    let ids = Tensor::new(&[[5u32, 17, 42, 99, 3, 250, 7, 8]], &Device::Cpu).unwrap();
    let want = candle_core::safetensors::load(dir.join("peft_logits.safetensors"), &Device::Cpu).unwrap();
    let d = rel_diff(&model.forward(&ids).unwrap(), &want["logits"]);
    println!("peftkit-trained PiSSA adapter (converted) in PEFT vs peftkit: max rel diff {d:e}");
    assert!(d <= 1e-4, "{d}");
    peft_model::merge_and_unload(&mut model).unwrap();
    let d = rel_diff(&model.forward(&ids).unwrap(), &want["merged_logits"]);
    println!("merged vs PEFT merge_and_unload: max rel diff {d:e}");
    assert!(d <= 1e-4, "{d}");
    assert!(rel_diff(&tiny().forward(&ids).unwrap(), &want["logits"]) > 1e-2, "the adapter changes nothing");
}

#[test]
fn a_trained_pissa_or_olora_model_and_its_saved_adapter_on_the_original_base_agree() {
    // The model as trained (residual base + A, B) and the converted adapter on the unmodified base compute the same.
    let data = examples(8);
    let ids = Tensor::new(&[[5u32, 17, 42, 99, 3, 250, 7, 8]], &Device::Cpu).unwrap();
    for init in [LoraInit::Pissa, LoraInit::PissaNiter(2), LoraInit::Olora] {
        let cfg = lora(init);
        let out = std::env::temp_dir().join(format!("peftkit-pissa-agree-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let mut model = tiny();
        peft_model::attach(&mut model, &cfg, 5).unwrap();
        let mut tc = config(3);
        tc.save_every = None;
        train::train(&mut model, &cfg, &data, None, &tc, "tiny-llama", &out, &TrainOptions::default()).unwrap();
        peft_model::save_adapter(&model, &cfg, "tiny-llama", None, &out).unwrap();
        let trained = model.forward(&ids).unwrap();
        let mut fresh = tiny();
        peft_model::load_adapter(&mut fresh, &out).unwrap();
        let d = rel_diff(&fresh.forward(&ids).unwrap(), &trained);
        println!("{init:?}: trained model vs original base + converted adapter: max rel diff {d:e}");
        assert!(d <= 1e-5, "{init:?}: {d}");
        assert!(rel_diff(&tiny().forward(&ids).unwrap(), &trained) > 1e-4, "{init:?}: training changed nothing");
        let _ = std::fs::remove_dir_all(&out);
    }
}
