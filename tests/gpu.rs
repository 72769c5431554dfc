//! The whole model on a GPU against the CPU: one QLoRA (and one LoRA) optimizer step on tiny-llama, same batch,
//! same adapter weights. Without a GPU (or a build without the `cuda` feature) each test prints SKIPPED and
//! passes; with `PEFTKIT_REQUIRE_GPU=1` (what `scripts/gpu-check.sh` sets) it fails instead.
//!
//! Tolerances (issue 13's): loss within 1e-3 relative, cosine of the gradients and of the updated adapter weights
//! ≥ 0.999, for f32 and bf16 on the GPU against f32 on the CPU. The CPU's own bf16 path, checked against PEFT +
//! torch autocast in tests/train_oracle.rs, meets them by a wide margin (1.6e-5 and 0.99997 on this step), so a
//! GPU run outside them is an error of the GPU path, not bf16 rounding.

mod common;

use candle_core::{DType, Device, Tensor};
use common::fixture;
use peftkit::adapter::{AdapterConfig, LoraConfig, TargetModules};
use peftkit::data::Batch;
use peftkit::model::{self, BaseQuant, Llama};
use peftkit::peft_model;
use peftkit::train::optim::AdamW;
use peftkit::train::step::{optimizer_step, StepOutcome};
use rand::{Rng, SeedableRng};

/// Loss, flattened gradients (adapter order) and flattened updated adapter weights after one step.
struct StepResult {
    loss: f64,
    grads: Vec<f32>,
    updated: Vec<f32>,
}

fn tiny(device: &Device, dtype: DType, quant: BaseQuant) -> Llama {
    let dir = fixture("tiny-llama");
    let mut m =
        model::load_llama_quant(&dir.join("config.json"), &[dir.join("model.safetensors")], device, dtype, quant)
            .unwrap();
    let cfg = AdapterConfig::Lora(LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.1,
        target_modules: TargetModules::AllLinear,
        ..Default::default()
    });
    peft_model::attach(&mut m, &cfg, 7).unwrap();
    // B starts at zero, which would make every dA zero: give all adapter weights the same random values on
    // every device (drawn on the CPU), so that both factors get gradients.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    for (_, var) in peft_model::trainable(&m) {
        let v: Vec<f32> = (0..var.elem_count()).map(|_| rng.random_range(-0.1f32..0.1)).collect();
        let t = Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap().to_device(device).unwrap();
        var.set(&t).unwrap();
    }
    m
}

fn batch(vocab: u32) -> Batch {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let (b, t) = (2, 24);
    let input_ids: Vec<u32> = (0..b * t).map(|_| rng.random_range(0..vocab)).collect();
    let mut labels: Vec<i32> = input_ids.iter().map(|&i| i as i32).collect();
    labels[..5].fill(-100); // a prompt that is not supervised
    Batch { input_ids, labels, lengths: vec![t; b], batch: b, seq: t, segments: Vec::new() }
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn step(device: &Device, dtype: DType, quant: BaseQuant) -> StepResult {
    let m = tiny(device, dtype, quant);
    let b = batch(m.config.vocab_size as u32);
    let vars: Vec<_> = peft_model::trainable(&m).into_iter().map(|(_, v)| v).collect();
    // The gradients, from a forward/backward of their own (optimizer_step does not return them).
    let ids = Tensor::from_vec(b.input_ids.clone(), (b.batch, b.seq), device).unwrap();
    let ctx = peftkit::linear::ForwardCtx { dropout_seed: Some(5), no_grad: false };
    let hidden = m.forward_hidden(&ids, &ctx, None).unwrap();
    let denom = Llama::count_targets(&b.labels, b.batch, b.seq) as f64;
    let store = m.loss(&hidden, &b.labels, denom).unwrap().backward().unwrap();
    let grads: Vec<f32> = vars.iter().flat_map(|v| flat(store.get(v.as_tensor()).expect("a gradient"))).collect();
    let mut opt = AdamW::new(vars.clone(), 0.9, 0.999, 1e-8, 0.01).unwrap();
    let loss = match optimizer_step(&m, &mut opt, std::slice::from_ref(&b), |_| Some(5), 1.0, 1e-3).unwrap() {
        StepOutcome::Updated { loss, .. } => loss,
        other => panic!("step did not update: {other:?}"),
    };
    let updated = vars.iter().flat_map(|v| flat(v.as_tensor())).collect();
    StepResult { loss, grads, updated }
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn compare(gpu: &StepResult, cpu: &StepResult, loss_tol: f64, min_cos: f64, what: &str) {
    let rel = (gpu.loss - cpu.loss).abs() / cpu.loss.abs();
    let cos_g = cosine(&gpu.grads, &cpu.grads);
    let cos_u = cosine(&gpu.updated, &cpu.updated);
    eprintln!("{what}: loss gpu {:.6} cpu {:.6} (rel {rel:.2e}); gradient cosine {cos_g:.6}; updated weights cosine {cos_u:.6}", gpu.loss, cpu.loss);
    assert!(rel <= loss_tol, "{what}: loss differs by {rel:.2e} relative (> {loss_tol:e})");
    assert!(cos_g >= min_cos, "{what}: gradient cosine {cos_g} < {min_cos}");
    assert!(cos_u >= min_cos, "{what}: updated-weight cosine {cos_u} < {min_cos}");
}

const NF4: BaseQuant = BaseQuant::Nf4 { double_quant: true };

#[test]
fn qlora_step_on_the_gpu_matches_the_cpu() {
    let Some(gpu) = peftkit::compute::test_gpu("qlora_step_on_the_gpu_matches_the_cpu") else { return };
    let cpu = step(&Device::Cpu, DType::F32, NF4);
    compare(&step(&gpu, DType::F32, NF4), &cpu, 1e-3, 0.999, "QLoRA f32");
    compare(&step(&gpu, DType::BF16, NF4), &cpu, 1e-3, 0.999, "QLoRA bf16");
}

#[test]
fn lora_step_on_the_gpu_matches_the_cpu() {
    let Some(gpu) = peftkit::compute::test_gpu("lora_step_on_the_gpu_matches_the_cpu") else { return };
    let cpu = step(&Device::Cpu, DType::F32, BaseQuant::None);
    compare(&step(&gpu, DType::F32, BaseQuant::None), &cpu, 1e-3, 0.999, "LoRA f32");
    compare(&step(&gpu, DType::BF16, BaseQuant::None), &cpu, 1e-3, 0.999, "LoRA bf16");
}

/// The same step twice on the CPU gives the same numbers: the comparison above is between devices, not noise.
#[test]
fn the_cpu_step_is_deterministic() {
    let (a, b) = (step(&Device::Cpu, DType::F32, NF4), step(&Device::Cpu, DType::F32, NF4));
    assert_eq!(a.loss, b.loss);
    assert_eq!(a.grads, b.grads);
}

/// The tolerances are met by the CPU's own bf16 path: a GPU bf16 run outside them is an error of the GPU path.
#[test]
fn bf16_on_the_cpu_is_within_the_bf16_tolerances() {
    let cpu = step(&Device::Cpu, DType::F32, NF4);
    compare(&step(&Device::Cpu, DType::BF16, NF4), &cpu, 1e-3, 0.999, "QLoRA bf16 on the CPU");
}

/// Where the weights live: a QLoRA base in bf16 keeps its projections as NF4 codes and scales (no dense copy, no
/// f32 anywhere) and everything else in bf16 — on the CPU here, and on the GPU (uploaded codes, `Nf4Cuda`) there.
#[test]
fn a_bf16_qlora_base_holds_nf4_and_bf16_only() {
    let check = |device: &Device| {
        let m = tiny(device, DType::BF16, NF4);
        for l in m.linears() {
            assert!(l.weight.is_nf4(), "{} is not NF4", l.path);
            assert!(l.weight.device().same_device(device), "{} is on {:?}", l.path, l.weight.device().location());
            // NF4 with double quantization: half a byte per weight plus about 1/64 of a byte of scales.
            let (out, inp) = l.weight.dims().unwrap();
            assert!(l.weight.bytes() * 8 < out * inp * 5, "{}: {} bytes", l.path, l.weight.bytes());
        }
        for t in [&m.embed_tokens, &m.lm_head, &m.norm] {
            assert_eq!((t.dtype(), t.device().same_device(device)), (DType::BF16, true));
        }
    };
    check(&Device::Cpu);
    if let Some(gpu) = peftkit::compute::test_gpu("a_bf16_qlora_base_holds_nf4_and_bf16_only (GPU half)") {
        check(&gpu);
    }
}
