//! The forward pass against transformers + PEFT (fixtures made by the Python stack, see tests/fixtures/README.md).

use candle_core::{DType, Device, Tensor};
use peftkit::model::{load_llama, Llama};
use peftkit::peft_model;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn load(name: &str) -> (Llama, HashMap<String, Tensor>) {
    let dir = fixture(name);
    let model =
        load_llama(&dir.join("config.json"), &[dir.join("model.safetensors")], &Device::Cpu, DType::F32).unwrap();
    let expected = candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    (model, expected)
}

/// max |a − b| / max |b|
fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let m = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    d / m
}

fn logits(model: &Llama, expected: &HashMap<String, Tensor>) -> Tensor {
    let ids = expected["input_ids"].to_dtype(DType::U32).unwrap();
    model.forward(&ids).unwrap()
}

#[test]
fn base_logits_match_transformers() {
    for name in ["tiny-llama", "tiny-qwen2"] {
        let (model, expected) = load(name);
        let d = rel_diff(&logits(&model, &expected), &expected["logits_base"]);
        println!("{name}: base logits max rel diff {d:e}");
        assert!(d <= 1e-4, "{name}: {d}");
    }
}

#[test]
fn peft_lora_fixture_matches_unmerged_logits() {
    for name in ["tiny-llama", "tiny-qwen2"] {
        let (mut model, expected) = load(name);
        let cfg = peft_model::load_adapter(&mut model, &fixture(name).join("peft-lora")).unwrap();
        assert_eq!(cfg.adapter.peft_type(), "LORA");
        assert_eq!(model.linears().filter(|l| l.adapter.is_some()).count(), 14);
        let d = rel_diff(&logits(&model, &expected), &expected["logits_lora"]);
        println!("{name}: LoRA logits max rel diff {d:e}");
        assert!(d <= 1e-4, "{name}: {d}");
        // The adapter really changes the output.
        assert!(rel_diff(&expected["logits_base"], &expected["logits_lora"]) > 1e-2);
    }
}

#[test]
fn peft_ia3_fixture_matches_logits() {
    for name in ["tiny-llama", "tiny-qwen2"] {
        let (mut model, expected) = load(name);
        let cfg = peft_model::load_adapter(&mut model, &fixture(name).join("peft-ia3")).unwrap();
        assert_eq!(cfg.adapter.peft_type(), "IA3");
        // k_proj, v_proj (output scaled) and down_proj (input scaled) in each of the 2 layers.
        assert_eq!(model.linears().filter(|l| l.adapter.is_some()).count(), 6);
        let d = rel_diff(&logits(&model, &expected), &expected["logits_ia3"]);
        println!("{name}: IA3 logits max rel diff {d:e}");
        assert!(d <= 1e-4, "{name}: {d}");
        assert!(rel_diff(&expected["logits_base"], &expected["logits_ia3"]) > 1e-2);
    }
}

#[test]
fn peftkit_ia3_adapter_loads_in_peft_and_merges_like_peft() {
    // PEFT computed these logits with this peftkit-trained IA3 adapter on transformers' tiny-qwen2, unmerged and
    // after merge_and_unload() (tests/fixtures/tiny-qwen2-ia3-peftkit/make_peft_logits.py).
    let (mut model, _) = load("tiny-qwen2");
    let dir = fixture("tiny-qwen2-ia3-peftkit");
    peft_model::load_adapter(&mut model, &dir).unwrap();
    let ids = Tensor::new(&[[5u32, 17, 42, 99, 3, 250, 7, 8]], &Device::Cpu).unwrap();
    let want = candle_core::safetensors::load(dir.join("peft_logits.safetensors"), &Device::Cpu).unwrap();
    let d = rel_diff(&model.forward(&ids).unwrap(), &want["logits"]);
    println!("peftkit IA3 adapter in PEFT: max rel diff {d:e}");
    assert!(d <= 1e-4, "{d}");
    peftkit::peft_model::merge_and_unload(&mut model).unwrap();
    assert!(model.linears().all(|l| l.adapter.is_none()));
    let d = rel_diff(&model.forward(&ids).unwrap(), &want["merged_logits"]);
    println!("merged IA3 vs PEFT merge_and_unload: max rel diff {d:e}");
    assert!(d <= 1e-4, "{d}");
}

#[test]
fn merge_and_unload_reproduces_peft_lora_merged_logits() {
    for name in ["tiny-llama", "tiny-qwen2"] {
        let (mut model, expected) = load(name);
        peft_model::load_adapter(&mut model, &fixture(name).join("peft-lora")).unwrap();
        peftkit::peft_model::merge_and_unload(&mut model).unwrap();
        let d = rel_diff(&logits(&model, &expected), &expected["logits_lora_merged"]);
        println!("{name}: merged LoRA vs PEFT merge_and_unload: max rel diff {d:e}");
        assert!(d <= 1e-4, "{name}: {d}");
    }
}

#[test]
fn ia3_with_all_ones_vectors_is_the_identity() {
    use peftkit::adapter::{AdapterConfig, Ia3Config, TargetModules};
    use peftkit::peft_model::attach;
    for name in ["tiny-llama", "tiny-qwen2"] {
        let (mut model, expected) = load(name);
        let base = logits(&model, &expected);
        // Every projection, so that output scaling (with Qwen2's biases) and input scaling are both covered.
        let cfg = Ia3Config {
            target_modules: TargetModules::AllLinear,
            feedforward_modules: peftkit::adapter::FeedforwardModules::List(vec!["down_proj".into(), "up_proj".into()]),
            init_ia3_weights: true,
            exclude_modules: None,
        };
        assert_eq!(attach(&mut model, &AdapterConfig::Ia3(cfg), 0).unwrap(), 14);
        let d =
            (logits(&model, &expected) - base).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(d, 0.0, "{name}");
    }
}

#[test]
fn prequantized_bnb4_checkpoint_matches_bitsandbytes_logits() {
    use peftkit::linear::FrozenWeight;
    let (model, expected) = load("tiny-llama-bnb4");
    assert!(model.config.prequantized_nf4);
    // Every projection is NF4 as stored (not re-quantized); norms, embeddings and lm_head stay f32.
    assert!(model.linears().all(|l| matches!(l.weight, FrozenWeight::Nf4(_))));
    let d = rel_diff(&logits(&model, &expected), &expected["logits"]);
    println!("tiny-llama-bnb4: logits max rel diff {d:e}");
    assert!(d <= 1e-4, "{d}");
}

#[test]
fn load_in_4bit_quantizes_every_projection_like_bitsandbytes() {
    use peftkit::linear::FrozenWeight;
    use peftkit::model::{load_llama_quant, BaseQuant};
    // tiny-llama-bnb4 is tiny-llama quantized by bitsandbytes: quantizing tiny-llama at load gives the same bytes,
    // hence the same logits.
    let dir = fixture("tiny-llama");
    let q = load_llama_quant(
        &dir.join("config.json"),
        &[dir.join("model.safetensors")],
        &Device::Cpu,
        DType::F32,
        BaseQuant::Nf4 { double_quant: true },
    )
    .unwrap();
    let (bnb, expected) = load("tiny-llama-bnb4");
    for (a, b) in q.linears().zip(bnb.linears()) {
        let (FrozenWeight::Nf4(x), FrozenWeight::Nf4(y)) = (&a.weight, &b.weight) else {
            panic!("{} is not NF4", a.path)
        };
        assert_eq!(x.packed(), y.packed(), "{}: packed codes", a.path);
        assert_eq!(x.absmax(), y.absmax(), "{}: block scales", a.path);
    }
    let d = rel_diff(&logits(&q, &expected), &expected["logits"]);
    assert!(d <= 1e-4, "{d}");
}

#[test]
fn peftkit_qlora_adapter_loads_in_peft_on_a_bnb4_base() {
    // PEFT + bitsandbytes computed these logits with this peftkit-trained adapter: both sides read the adapter and
    // the 4-bit base the same way.
    let (mut model, _) = load("tiny-llama-bnb4");
    let dir = fixture("tiny-llama-bnb4-qlora");
    peft_model::load_adapter(&mut model, &dir).unwrap();
    let ids = Tensor::new(&[[5u32, 17, 42, 99, 3, 250, 7, 8]], &Device::Cpu).unwrap();
    let want = candle_core::safetensors::load(dir.join("peft_logits.safetensors"), &Device::Cpu).unwrap();
    let d = rel_diff(&model.forward(&ids).unwrap(), &want["logits"]);
    println!("QLoRA adapter on the bnb-4bit base vs PEFT + bitsandbytes: max rel diff {d:e}");
    assert!(d <= 1e-4, "{d}");
}

/// `tests/fixtures/<name>/expected-v2.safetensors` (the second set of Python references).
fn expected_v2(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name).join("expected-v2.safetensors"), &Device::Cpu).unwrap()
}

#[test]
fn peft_dora_fixture_matches_unmerged_and_merged_logits() {
    for name in ["tiny-llama", "tiny-qwen2"] {
        let (mut model, _) = load(name);
        let v2 = expected_v2(name);
        let cfg = peft_model::load_adapter(&mut model, &fixture(name).join("peft-dora")).unwrap();
        let peftkit::adapter::AdapterConfig::Lora(l) = &cfg.adapter else { panic!("not LoRA") };
        assert!(l.use_dora);
        assert_eq!(
            model.linears().filter(|l| matches!(l.adapter, Some(peftkit::adapter::LayerAdapter::Dora(_)))).count(),
            14
        );
        let d = rel_diff(&logits(&model, &v2), &v2["logits_dora"]);
        println!("{name}: DoRA logits max rel diff {d:e}");
        assert!(d <= 1e-4, "{name}: {d}");
        peftkit::peft_model::merge_and_unload(&mut model).unwrap();
        assert!(model.linears().all(|l| l.adapter.is_none()));
        let d = rel_diff(&logits(&model, &v2), &v2["logits_dora_merged"]);
        println!("{name}: merged DoRA vs PEFT merge_and_unload: max rel diff {d:e}");
        assert!(d <= 1e-4, "{name}: {d}");
        // The magnitudes matter: the fixture's are ±10% off the norm, so DoRA differs from plain LoRA with its A, B.
        let mut plain = load(name).0;
        peft_model::load_adapter(&mut plain, &fixture(name).join("peft-dora")).unwrap();
        for lin in plain.linears_mut() {
            if let Some(peftkit::adapter::LayerAdapter::Dora(d)) = lin.adapter.take() {
                lin.adapter = Some(peftkit::adapter::LayerAdapter::Lora(d.lora));
            }
        }
        assert!(rel_diff(&logits(&plain, &v2), &v2["logits_dora"]) > 1e-3);
    }
}

#[test]
fn dora_in_bf16_stays_within_bf16_tolerance_of_the_f32_reference() {
    let dir = fixture("tiny-llama");
    let mut model =
        load_llama(&dir.join("config.json"), &[dir.join("model.safetensors")], &Device::Cpu, DType::BF16).unwrap();
    peft_model::load_adapter(&mut model, &dir.join("peft-dora")).unwrap();
    let v2 = expected_v2("tiny-llama");
    let got = logits(&model, &v2).to_dtype(DType::F32).unwrap();
    let d = rel_diff(&got, &v2["logits_dora"]);
    println!("tiny-llama: DoRA in bf16 vs PEFT f32: max rel diff {d:e}");
    assert!(d <= 3e-2, "{d}");
}

#[test]
fn peftkit_dora_adapter_loads_in_peft_and_merges_like_peft() {
    // PEFT computed these logits with this peftkit-trained DoRA adapter on transformers' tiny-llama, unmerged and
    // after merge_and_unload() (tests/fixtures/tiny-llama-dora-peftkit/make_peft_logits.py).
    let (mut model, _) = load("tiny-llama");
    let dir = fixture("tiny-llama-dora-peftkit");
    peft_model::load_adapter(&mut model, &dir).unwrap();
    let ids = Tensor::new(&[[5u32, 17, 42, 99, 3, 250, 7, 8]], &Device::Cpu).unwrap();
    let want = candle_core::safetensors::load(dir.join("peft_logits.safetensors"), &Device::Cpu).unwrap();
    let d = rel_diff(&model.forward(&ids).unwrap(), &want["logits"]);
    println!("peftkit DoRA adapter in PEFT: max rel diff {d:e}");
    assert!(d <= 1e-4, "{d}");
    peftkit::peft_model::merge_and_unload(&mut model).unwrap();
    let d = rel_diff(&model.forward(&ids).unwrap(), &want["merged_logits"]);
    println!("merged DoRA vs PEFT merge_and_unload: max rel diff {d:e}");
    assert!(d <= 1e-4, "{d}");
    // The adapter changes the model.
    let (base, _) = load("tiny-llama");
    assert!(rel_diff(&base.forward(&ids).unwrap(), &want["logits"]) > 1e-2);
}
