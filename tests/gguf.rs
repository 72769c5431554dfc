//! A real model from a GGUF file (SmolLM2-135M-Instruct, Q4_1) against transformers' reading of the same file
//! (tests/fixtures/smollm2/). The model is fetched by `scripts/fetch-smollm2.sh` (run by `.ci/run`); without it
//! these tests say that they skipped.

mod common;

use candle_core::{DType, Device, IndexOp, Tensor};
use peftkit::base::{load_base, BaseModel};
use peftkit::data::Message;
use peftkit::hub::HubOptions;
use peftkit::linear::ForwardCtx;
use peftkit::model::KvCache;
use std::io::Write;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2").join(name)
}

/// The model, or `None` after saying plainly (on the real stderr, not the captured one) that the test skipped.
fn load(test: &str) -> Option<BaseModel> {
    let path = common::smollm2_gguf(test)?;
    Some(load_base(path.to_str().unwrap(), None, None, &HubOptions::from_env(), &Device::Cpu).unwrap())
}

fn reference() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("reference.json")).unwrap()).unwrap()
}

fn expected(name: &str) -> Tensor {
    let all = candle_core::safetensors::load(fixture("expected.safetensors"), &Device::Cpu).unwrap();
    all[name].clone()
}

fn ids_of(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_dtype(DType::U32).unwrap().to_vec1().unwrap()
}

#[test]
fn gguf_tokenizer_and_chat_template_match_transformers() {
    let Some(base) = load("gguf_tokenizer_and_chat_template_match_transformers") else {
        return;
    };
    let r = reference();
    for case in r["tokenizer_cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let got = base.tokenizer.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(got, want, "tokenizing {text:?}");
        // Decoding gives the text back (byte-level BPE is lossless).
        assert_eq!(base.tokenizer.decode(&got, false).unwrap(), text);
    }
    let template = base.template.as_ref().expect("the GGUF has a chat template");
    let prompt = template.render(&[Message::new("user", "What is the capital of France?")], true).unwrap();
    assert_eq!(prompt, r["chat_prompt"].as_str().unwrap());
    let ids = base.tokenizer.encode(prompt.as_str(), false).unwrap().get_ids().to_vec();
    assert_eq!(ids, ids_of(&expected("input_ids")));
    assert_eq!(base.model.config.bos_token_id, Some(r["bos_token_id"].as_u64().unwrap() as u32));
    assert_eq!(base.model.config.eos_token_ids, vec![r["eos_token_id"].as_u64().unwrap() as u32]);
    assert_eq!(base.model.config.vocab_size, r["vocab_size"].as_u64().unwrap() as usize);
    assert!(base.stop_ids.contains(&2), "<|im_end|> ends a generation");
}

#[test]
fn gguf_logits_and_greedy_answer_match_transformers() {
    let Some(base) = load("gguf_logits_and_greedy_answer_match_transformers") else {
        return;
    };
    let input = expected("input_ids").to_dtype(DType::U32).unwrap();
    let logits = base.model.forward(&input).unwrap(); // (1, t, vocab)
    let t = logits.dims()[1];
    let last4 = logits.i((.., t - 4.., ..)).unwrap();
    let want = expected("logits_last4");
    let max_diff = (&last4 - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let rel = max_diff / scale;
    let _ = writeln!(std::io::stderr(), "smollm2 GGUF: last-4 logits max |Δ| / max |logit| = {rel:.3e}");
    assert!(rel <= 1e-3, "logits differ: {rel}");
    let argmax = ids_of(&logits.argmax(2).unwrap());
    assert_eq!(argmax, ids_of(&expected("argmax")), "argmax at every position");

    // Greedy decoding with the KV cache reproduces transformers' continuation.
    let want_ids = ids_of(&expected("generated_ids"));
    let ctx = ForwardCtx { dropout_seed: None, no_grad: true };
    let mut cache = KvCache::new(base.model.layers.len());
    let mut next = input.clone();
    let mut got = Vec::new();
    for _ in 0..want_ids.len() {
        let h = base.model.forward_hidden(&next, &ctx, Some(&mut cache)).unwrap();
        let last = h.i((.., h.dims()[1] - 1.., ..)).unwrap();
        let id =
            base.model.logits(&last).unwrap().flatten_all().unwrap().argmax(0).unwrap().to_scalar::<u32>().unwrap();
        got.push(id);
        if base.stop_ids.contains(&id) {
            break;
        }
        next = Tensor::new(&[[id]], &Device::Cpu).unwrap();
    }
    assert_eq!(got, want_ids);
    let text = base.tokenizer.decode(&got, true).unwrap();
    let answer = reference()["greedy_answer"].as_str().unwrap().trim_end_matches("<|im_end|>").to_string();
    assert_eq!(text, answer);
}

// ---------------------------------------------------------------------------------------------
// Tiny models written as GGUF the way llama.cpp's converter writes them (always run)
// ---------------------------------------------------------------------------------------------

#[test]
fn tiny_models_from_gguf_match_transformers_and_their_tokenizers() {
    let tmp = std::env::temp_dir().join(format!("peftkit-gguf-test-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    for name in ["tiny-llama", "tiny-qwen2"] {
        let path = tmp.join(format!("{name}.gguf"));
        common::write_tiny_gguf(name, &path, false);
        let base = load_base(path.to_str().unwrap(), None, None, &HubOptions::from_env(), &Device::Cpu).unwrap();
        let expected =
            candle_core::safetensors::load(common::fixture(name).join("expected.safetensors"), &Device::Cpu).unwrap();
        let ids = expected["input_ids"].to_dtype(DType::U32).unwrap();
        let logits = base.model.forward(&ids).unwrap();
        let want = &expected["logits_base"];
        let d = (&logits - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
            / want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d <= 1e-4, "{name}: logits from GGUF differ from transformers' by {d}");
        // The rebuilt tokenizer agrees with the model's tokenizer.json, special tokens included.
        let reference = tokenizers::Tokenizer::from_file(common::fixture(name).join("tokenizer.json")).unwrap();
        for text in
            ["Hello world", "  two  spaces\tand\nnewlines", "digits 12345, café", "<|im_start|>user\nhi<|im_end|>"]
        {
            let a = base.tokenizer.encode(text, false).unwrap().get_ids().to_vec();
            let b = reference.encode(text, false).unwrap().get_ids().to_vec();
            assert_eq!(a, b, "{name}: {text:?}");
        }
        assert!(base.template.is_some());
        let adapter_dir = common::fixture(name).join("peft-lora");
        // A PEFT adapter trained on the safetensors model applies unchanged to the GGUF one.
        let mut model = base.model.clone();
        peftkit::peft_model::load_adapter(&mut model, &adapter_dir).unwrap();
        let lora = model.forward(&ids).unwrap();
        let want = &expected["logits_lora"];
        let d = (&lora - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
            / want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d <= 1e-4, "{name}: LoRA logits on the GGUF base differ by {d}");
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

/// A GGUF base in a llama.cpp block format keeps its blocks for generation (`BaseQuant::Ggml { to: None }`: candle's
/// quantized matmul, Q/K rows moved back to transformers' order block-row by block-row), and gives the logits of
/// the same file dequantized, within the 8-bit quantization of the activations that llama.cpp also does; a
/// safetensors base quantized at load (`to: Some(..)`) is within the format's precision of the dense model.
#[test]
fn quantized_bases_generate_through_the_quantized_matmul() {
    use candle_core::quantized::GgmlDType;
    use peftkit::model::BaseQuant;
    use peftkit::weight::FrozenWeight;
    let tmp = std::env::temp_dir().join(format!("peftkit-gguf-q-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let rel = |a: &Tensor, b: &Tensor| {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
            / b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    };
    for name in ["tiny-llama", "tiny-qwen2"] {
        let expected =
            candle_core::safetensors::load(common::fixture(name).join("expected.safetensors"), &Device::Cpu).unwrap();
        let ids = expected["input_ids"].to_dtype(DType::U32).unwrap();
        // Q4_1 is multiplied by peftkit's own kernel (quant::q4_1): candle has no SIMD one.
        for (dtype, tol) in [(GgmlDType::Q8_0, 2e-2), (GgmlDType::Q4_0, 5e-2), (GgmlDType::Q4_1, 2e-2)] {
            let path = tmp.join(format!("{name}-{dtype:?}.gguf"));
            common::write_tiny_gguf_as(name, &path, false, dtype);
            let dense = peftkit::gguf::load(&path, &Device::Cpu, DType::F32, BaseQuant::None).unwrap().model;
            let quant =
                peftkit::gguf::load(&path, &Device::Cpu, DType::F32, BaseQuant::Ggml { to: None }).unwrap().model;
            assert!(quant.linears().all(|l| matches!(l.weight, FrozenWeight::Ggml(_))), "{name}: projections");
            let stored = |l: &peftkit::linear::AdaptedLinear| match &l.weight {
                FrozenWeight::Ggml(q) => q.dtype(),
                _ => unreachable!(),
            };
            assert!(quant.linears().all(|l| stored(l) == dtype), "{name}: {dtype:?} kept");
            assert!(quant.lm_head_q.is_some(), "{name}: output head");
            let d = rel(&quant.forward(&ids).unwrap(), &dense.forward(&ids).unwrap());
            eprintln!("{name} {dtype:?}: quantized matmul vs dequantized weights {d:.2e}");
            assert!(d <= tol, "{name} {dtype:?}: {d}");
        }
        // A safetensors base quantized to Q8_0 at load.
        let dir = common::fixture(name);
        let load = |quant| {
            peftkit::model::load_llama_quant(
                &dir.join("config.json"),
                &[dir.join("model.safetensors")],
                &Device::Cpu,
                DType::F32,
                quant,
            )
            .unwrap()
        };
        let q8 = load(BaseQuant::Ggml { to: Some(GgmlDType::Q8_0) });
        assert!(q8.linears().all(|l| matches!(l.weight, FrozenWeight::Ggml(_))));
        let d = rel(&q8.forward(&ids).unwrap(), &expected["logits_base"]);
        eprintln!("{name} safetensors → Q8_0 at load vs transformers: {d:.2e}");
        assert!(d <= 2e-2, "{name}: {d}");
    }
    let _ = std::fs::remove_dir_all(&tmp);
}
