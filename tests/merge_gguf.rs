//! `peftkit merge --format gguf`: the file against llama.cpp's own conversion of the same model (byte for byte),
//! read back by peftkit against the merged safetensors folder (logits within each type's precision), llama-quantize's
//! type mix, a GGUF base's own types kept, and the command line's errors.

mod common;

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use common::{fixture, write_tiny_gguf};
use peftkit::hub::HubOptions;
use peftkit::model::{load_llama, BaseQuant, Llama};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_peftkit"));
    c.env("HF_HUB_OFFLINE", "1").env("NO_COLOR", "1").env_remove("HF_TOKEN");
    c
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("peftkit-merge-gguf-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn merge(base: &Path, adapter: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut c = bin();
    c.arg("merge").arg("--base").arg(base).arg("--adapter").arg(adapter).arg("--out").arg(out).args(extra);
    c.output().unwrap()
}

fn merge_ok(base: &Path, adapter: &Path, out: &Path, extra: &[&str]) -> String {
    let o = merge(base, adapter, out, extra);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{err}");
    err
}

/// The fixture's LoRA adapter with every B set to zero: merging it changes nothing.
fn zero_adapter(name: &str, dir: &Path) -> PathBuf {
    zero_adapter_for(&fixture(name).join("peft-lora"), &dir.join(name))
}

fn read_gguf(path: &Path) -> Content {
    Content::read(&mut std::fs::File::open(path).unwrap()).unwrap()
}

fn logits(model: &Llama) -> Tensor {
    let exp = candle_core::safetensors::load(fixture("tiny-llama").join("expected.safetensors"), &Device::Cpu).unwrap();
    model.forward(&exp["input_ids"].to_dtype(DType::U32).unwrap()).unwrap()
}

/// max |a − b| / max |b|
fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    d / b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

fn gguf_logits(path: &Path) -> Tensor {
    logits(&peftkit::gguf::load(path, &Device::Cpu, DType::F32, BaseQuant::None).unwrap().model)
}

fn folder_logits(dir: &Path) -> Tensor {
    let files = peftkit::hub::resolve_model(dir.to_str().unwrap(), None, &HubOptions::default()).unwrap();
    logits(&load_llama(&dir.join("config.json"), &files.weights, &Device::Cpu, DType::F32).unwrap())
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.contains(".tmp-"))
        .collect()
}

#[test]
fn f32_gguf_of_the_unchanged_model_is_llama_cpps_conversion_byte_for_byte() {
    let d = tmp("llamacpp");
    for name in ["tiny-llama", "tiny-qwen2"] {
        let out = d.join(format!("{name}.gguf"));
        merge_ok(&fixture(name), &zero_adapter(name, &d), &out, &["--format", "gguf", "--quant", "f32"]);
        let reference = fixture("llamacpp").join(format!("{name}-f32.gguf"));
        // Key for key and tensor for tensor first, for a readable failure; then every byte.
        let (ours, theirs) = (read_gguf(&out), read_gguf(&reference));
        let mut keys: Vec<&String> = theirs.metadata.keys().collect();
        keys.sort();
        let mut our_keys: Vec<&String> = ours.metadata.keys().collect();
        our_keys.sort();
        assert_eq!(our_keys, keys, "{name}: metadata keys");
        for k in keys {
            assert_eq!(format!("{:?}", ours.metadata[k]), format!("{:?}", theirs.metadata[k]), "{name}: {k}");
        }
        assert_eq!(ours.tensor_infos.len(), theirs.tensor_infos.len(), "{name}: tensor count");
        for (t, info) in &theirs.tensor_infos {
            let mine = &ours.tensor_infos[t];
            assert_eq!(mine.shape, info.shape, "{name}: {t}");
            assert_eq!(mine.ggml_dtype, info.ggml_dtype, "{name}: {t}");
            assert_eq!(mine.offset, info.offset, "{name}: {t}");
        }
        assert!(std::fs::read(&out).unwrap() == std::fs::read(&reference).unwrap(), "{name}: bytes differ");
    }
    assert!(leftovers(&d).is_empty());
}

#[test]
fn merged_gguf_reads_back_with_the_merged_folders_logits_within_each_types_precision() {
    let d = tmp("logits");
    for name in ["tiny-llama", "tiny-qwen2"] {
        let adapter = fixture(name).join("peft-lora");
        let folder = d.join(format!("{name}-folder"));
        merge_ok(&fixture(name), &adapter, &folder, &["--dtype", "f32"]);
        let reference = folder_logits(&folder);
        // (type, bound on max |Δlogit| / max |logit|). Measured: f16 7e-4 / 1.2e-3 (tiny-llama / tiny-qwen2), bf16
        // 6e-3 / 9e-3, q8_0 4e-2 / 2e-2, q5_k_m 0.17 / 0.17, q4_k_m 0.21 / 0.13 (Q5_0 and Q8_0: rows of 64 and 160
        // are not multiples of 256). Random tiny models amplify weight error into the logits; the weights themselves
        // are checked against ggml's rounding bound in quantized_weights_are_within_ggmls_rounding_of_the_f32_merge.
        for (quant, bound) in [
            ("f32", 1e-6),
            ("f16", 3e-3),
            ("bf16", 2e-2),
            ("q8_0", 6e-2),
            ("q6_k", 6e-2),
            ("q5_k_m", 0.3),
            ("q4_k_m", 0.3),
        ] {
            let out = d.join(format!("{name}-{quant}.gguf"));
            merge_ok(&fixture(name), &adapter, &out, &["--format", "gguf", "--quant", quant]);
            let r = rel_diff(&gguf_logits(&out), &reference);
            println!("{name} {quant}: GGUF read back vs merged folder: max rel diff {r:e}");
            assert!(r <= bound, "{name} {quant}: {r} > {bound}");
            if quant == "f32" {
                assert!(
                    rel_diff(&reference, &gguf_logits(&fixture("llamacpp").join(format!("{name}-f32.gguf")))) > 1e-2
                );
            }
        }
        // The GGUF's tokenizer tokenizes as the original tokenizer.json does.
        let m = peftkit::gguf::load(&d.join(format!("{name}-f32.gguf")), &Device::Cpu, DType::F32, BaseQuant::None)
            .unwrap();
        let original = tokenizers::Tokenizer::from_file(fixture(name).join("tokenizer.json")).unwrap();
        for text in
            ["Hello world", "  two  spaces\tand\nnewlines", "digits 12345, café", "<|im_start|>user\nhi<|im_end|>"]
        {
            let (a, b) = (m.tokenizer.encode(text, true).unwrap(), original.encode(text, true).unwrap());
            assert_eq!(a.get_ids(), b.get_ids(), "{name}: {text:?}");
        }
        assert!(m.chat_template.is_some_and(|t| t.contains("<|im_start|>")));
    }
    assert!(leftovers(&d).is_empty());
}

#[test]
fn q4_k_m_mixes_types_as_llama_quantize_and_falls_back_for_short_rows() {
    let d = tmp("q4km");
    let out = d.join("m.gguf");
    let err = merge_ok(
        &fixture("tiny-llama"),
        &fixture("tiny-llama").join("peft-lora"),
        &out,
        &["--format", "gguf", "--quant", "q4_k_m"],
    );
    let c = read_gguf(&out);
    let ty = |n: &str| c.tensor_infos[n].ggml_dtype;
    // Rows of 64 and 160 are not multiples of 256: Q4_K falls back to Q5_0, Q6_K to Q8_0 (llama-quantize's rule).
    assert_eq!(ty("blk.0.attn_q.weight"), GgmlDType::Q5_0);
    assert_eq!(ty("blk.0.attn_v.weight"), GgmlDType::Q5_0);
    // use_more_bits(1, 2): the last eighth of the layers → Q6_K → Q8_0 for rows of 64 / 160.
    assert_eq!(ty("blk.1.attn_v.weight"), GgmlDType::Q8_0);
    assert_eq!(ty("blk.1.ffn_down.weight"), GgmlDType::Q8_0);
    assert_eq!(ty("blk.0.ffn_down.weight"), GgmlDType::Q5_0);
    assert_eq!(ty("output.weight"), GgmlDType::Q8_0);
    assert_eq!(ty("blk.0.attn_norm.weight"), GgmlDType::F32);
    assert!(format!("{:?}", c.metadata["general.file_type"]).contains("15"));
    assert!(err.contains("Q5_0 instead"), "{err}");
}

#[test]
fn a_gguf_base_keeps_its_types_and_copies_untouched_tensors_byte_for_byte() {
    let d = tmp("gguf-base");
    // A Q8_0 GGUF base: tiny-llama written by peftkit itself (the adapter with B = 0 changes nothing).
    let f32_base = d.join("base-f32.gguf");
    write_tiny_gguf("tiny-llama", &f32_base, false);
    let base = d.join("base-q8_0.gguf");
    merge_ok(&f32_base, &zero_adapter("tiny-llama", &d), &base, &["--format", "gguf", "--quant", "q8_0"]);
    let adapter = fixture("tiny-llama").join("peft-lora");
    let out = d.join("merged.gguf");
    merge_ok(&base, &adapter, &out, &["--format", "gguf"]);
    let (b, m) = (read_gguf(&base), read_gguf(&out));
    let (mut fb, mut fm) = (std::fs::File::open(&base).unwrap(), std::fs::File::open(&out).unwrap());
    for (name, info) in &b.tensor_infos {
        assert_eq!(m.tensor_infos[name].ggml_dtype, info.ggml_dtype, "{name}");
        let (x, y) = (b.tensor(&mut fb, name, &Device::Cpu).unwrap(), m.tensor(&mut fm, name, &Device::Cpu).unwrap());
        // LoRA targets every projection: those change; embeddings, head and norms are copied as stored.
        let projection = name.starts_with("blk.") && !name.ends_with("_norm.weight");
        assert_eq!(x.data().unwrap() == y.data().unwrap(), !projection, "{name}");
    }
    assert_eq!(format!("{:?}", m.metadata["general.file_type"]), "U32(7)");
    assert_eq!(format!("{:?}", m.metadata["general.license"]), format!("{:?}", b.metadata["general.license"]));
    // The merged file computes what the merged folder (from the same base) computes, to Q8_0's precision.
    let folder = d.join("folder");
    merge_ok(&base, &adapter, &folder, &["--dtype", "f32"]);
    let r = rel_diff(&gguf_logits(&out), &folder_logits(&folder));
    println!("Q8_0 GGUF base merged to GGUF vs to a folder: max rel diff {r:e}");
    assert!(r <= 6e-2, "{r}");
    // --quant overrides the base's types.
    let f16 = d.join("merged-f16.gguf");
    merge_ok(&base, &adapter, &f16, &["--format", "gguf", "--quant", "f16"]);
    assert_eq!(read_gguf(&f16).tensor_infos["token_embd.weight"].ggml_dtype, GgmlDType::F16);
}

#[test]
fn command_line_errors_exit_2_and_overwrite_replaces_the_file() {
    let d = tmp("cli");
    let (base, adapter) = (fixture("tiny-llama"), fixture("tiny-llama").join("peft-lora"));
    let out = d.join("m.gguf");
    let o = merge(&base, &adapter, &out, &["--format", "gguf", "--quant", "q3_k_s"]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("q3_k_s") && err.contains("q4_k_m"), "{err}");
    let o = merge(&base, &adapter, &d.join("folder"), &["--quant", "q8_0"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--format gguf"));
    let o = merge(&base, &adapter, &d, &["--format", "gguf"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("is a folder"));

    merge_ok(&base, &adapter, &out, &["--format", "gguf", "--quant", "q8_0"]);
    let o = merge(&base, &adapter, &out, &["--format", "gguf", "--quant", "f16"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--overwrite"));
    assert_eq!(read_gguf(&out).tensor_infos["token_embd.weight"].ggml_dtype, GgmlDType::Q8_0);
    merge_ok(&base, &adapter, &out, &["--format", "gguf", "--quant", "f16", "--overwrite"]);
    assert_eq!(read_gguf(&out).tensor_infos["token_embd.weight"].ggml_dtype, GgmlDType::F16);
    assert!(leftovers(&d).is_empty());
}

/// Largest error a block of `type` may have, for a block whose largest magnitude is `amax` (ggml's
/// `quantize_row_*_ref`): Q8_0 stores round(x / d) with d = amax / 127: half a step. Q4_0 (Q5_0) stores
/// min(15 (31), round(x / d) + 8 (16)) with d = −max / 8 (/ 16), the signed value of largest magnitude, so that
/// `max` is exact and a value near −max is clipped to 7/8 (15/16) of it: one step. d is stored in f16, which adds
/// at most its rounding (2⁻¹¹ relative) times the largest code.
fn block_bound(t: GgmlDType, amax: f32) -> f32 {
    let (d, steps, codes) = match t {
        GgmlDType::Q8_0 => (amax / 127.0, 0.5, 127.0),
        GgmlDType::Q4_0 => (amax / 8.0, 1.0, 8.0),
        GgmlDType::Q5_0 => (amax / 16.0, 1.0, 16.0),
        _ => unreachable!("{t:?}"),
    };
    steps * d + codes * d * 2f32.powi(-11) + 1e-7
}

#[test]
fn quantized_weights_are_within_ggmls_rounding_of_the_f32_merge() {
    let d = tmp("blocks");
    let (base, adapter) = (fixture("tiny-llama"), fixture("tiny-llama").join("peft-lora"));
    let f32_file = d.join("f32.gguf");
    merge_ok(&base, &adapter, &f32_file, &["--format", "gguf", "--quant", "f32"]);
    let reference = read_gguf(&f32_file);
    let mut fr = std::fs::File::open(&f32_file).unwrap();
    for quant in ["q8_0", "q4_0", "q4_k_m"] {
        let out = d.join(format!("{quant}.gguf"));
        merge_ok(&base, &adapter, &out, &["--format", "gguf", "--quant", quant]);
        let c = read_gguf(&out);
        let mut f = std::fs::File::open(&out).unwrap();
        let mut checked = 0;
        for (name, info) in &c.tensor_infos {
            if !matches!(info.ggml_dtype, GgmlDType::Q8_0 | GgmlDType::Q4_0 | GgmlDType::Q5_0) {
                continue;
            }
            let q = c.tensor(&mut f, name, &Device::Cpu).unwrap().dequantize(&Device::Cpu).unwrap();
            let w = reference.tensor(&mut fr, name, &Device::Cpu).unwrap().dequantize(&Device::Cpu).unwrap();
            let (q, w): (Vec<f32>, Vec<f32>) =
                (q.flatten_all().unwrap().to_vec1().unwrap(), w.flatten_all().unwrap().to_vec1().unwrap());
            for (i, (qb, wb)) in q.chunks(32).zip(w.chunks(32)).enumerate() {
                let amax = wb.iter().fold(0f32, |m, x| m.max(x.abs()));
                let err = qb.iter().zip(wb).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                let bound = block_bound(info.ggml_dtype, amax);
                assert!(err <= bound, "{quant} {name} block {i}: {err} > {bound} ({:?})", info.ggml_dtype);
            }
            checked += 1;
        }
        assert!(checked >= 7, "{quant}: {checked} quantized tensors");
    }
}

#[test]
fn smollm2_q4_1_gguf_merged_to_gguf_computes_the_unmerged_adapter() {
    let Some(gguf) = common::smollm2_gguf("smollm2_q4_1_gguf_merged_to_gguf_computes_the_unmerged_adapter") else {
        return;
    };
    let d = tmp("smollm2");
    // A LoRA adapter (r = 2, q_proj and down_proj of every layer) with random A and B, in PEFT's format.
    let adapter = d.join("adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    std::fs::write(
        adapter.join("adapter_config.json"),
        r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "down_proj"]}"#,
    )
    .unwrap();
    let mut ad = std::collections::HashMap::new();
    for l in 0..30 {
        for (m, out_f, in_f) in [("self_attn.q_proj", 576, 576), ("mlp.down_proj", 576, 1536)] {
            let p = format!("base_model.model.model.layers.{l}.{m}");
            ad.insert(format!("{p}.lora_A.weight"), Tensor::randn(0f32, 0.05, (2, in_f), &Device::Cpu).unwrap());
            ad.insert(format!("{p}.lora_B.weight"), Tensor::randn(0f32, 0.05, (out_f, 2), &Device::Cpu).unwrap());
        }
    }
    candle_core::safetensors::save(&ad, adapter.join("adapter_model.safetensors")).unwrap();
    let ids = Tensor::new(&[[1u32, 504, 3458, 282, 4649, 314, 16, 2]], &Device::Cpu).unwrap();
    let run = |m: &Llama| m.forward(&ids).unwrap();
    let mut unmerged =
        peftkit::base::load_base(gguf.to_str().unwrap(), None, None, &HubOptions::default(), &Device::Cpu).unwrap();
    peftkit::peft_model::load_adapter(&mut unmerged.model, &adapter).unwrap();
    let want = run(&unmerged.model);
    let base = read_gguf(&gguf);
    // (--quant, bound on max |Δlogit| / max |logit| against the unmerged adapter on the Q4_1 base). Measured over
    // two random adapters: the base's types (Q4_1; 60 merged tensors re-quantized) 0.10–0.12, f32 2e-6, q8_0
    // 2.0e-2–2.6e-2, q4_k_m 0.17 (rows of 576: Q5_0 and Q8_0, quantizing values already on Q4_1's grid).
    for (quant, bound) in [(None, 0.25), (Some("f32"), 1e-4), (Some("q8_0"), 5e-2), (Some("q4_k_m"), 0.3)] {
        let out = d.join(format!("merged-{}.gguf", quant.unwrap_or("keep")));
        let mut args = vec!["--format", "gguf"];
        args.extend(quant.iter().flat_map(|q| ["--quant", *q]));
        let o = merge(&gguf, &adapter, &out, &args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        println!("{}", String::from_utf8_lossy(&o.stdout).trim());
        let r =
            rel_diff(&run(&peftkit::gguf::load(&out, &Device::Cpu, DType::F32, BaseQuant::None).unwrap().model), &want);
        println!(
            "smollm2 --quant {}: merged GGUF vs GGUF base + unmerged adapter: max rel diff {r:e}",
            quant.unwrap_or("(base's)")
        );
        assert!(r <= bound, "{quant:?}: {r} > {bound}");
        let c = read_gguf(&out);
        assert_eq!(
            format!("{:?}", c.metadata["tokenizer.ggml.pre"]),
            format!("{:?}", base.metadata["tokenizer.ggml.pre"])
        );
        if quant.is_none() {
            let (mut fb, mut fo) = (std::fs::File::open(&gguf).unwrap(), std::fs::File::open(&out).unwrap());
            for (name, info) in &base.tensor_infos {
                assert_eq!(c.tensor_infos[name].ggml_dtype, info.ggml_dtype, "{name}");
                let merged = name.ends_with("attn_q.weight") || name.ends_with("ffn_down.weight");
                let same = base.tensor(&mut fb, name, &Device::Cpu).unwrap().data().unwrap().into_owned()
                    == c.tensor(&mut fo, name, &Device::Cpu).unwrap().data().unwrap().into_owned();
                assert_eq!(same, !merged, "{name}");
            }
        }
    }
    let _ = std::fs::remove_dir_all(&d);
}

/// A random Llama model with rows of 256 and 512 (what k-quants need), tiny-llama's tokenizer, and a LoRA adapter on
/// its q_proj and down_proj.
fn k_quant_model(d: &Path, rope_scaling: Option<serde_json::Value>) -> (PathBuf, PathBuf) {
    let dir = d.join("k-model");
    std::fs::create_dir_all(&dir).unwrap();
    let mut config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
        "vocab_size": 384, "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"
    });
    if let Some(r) = rope_scaling {
        config["rope_scaling"] = r;
    }
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"] {
        std::fs::copy(fixture("tiny-llama").join(f), dir.join(f)).unwrap();
    }
    let r = |shape: &[usize], s: f64| Tensor::randn(0f32, s as f32, shape, &Device::Cpu).unwrap();
    let mut w = std::collections::HashMap::new();
    w.insert("model.embed_tokens.weight".to_string(), r(&[384, 256], 1.0));
    w.insert("lm_head.weight".to_string(), r(&[384, 256], 0.05));
    w.insert("model.norm.weight".to_string(), Tensor::ones(256, DType::F32, &Device::Cpu).unwrap());
    let mut ad = std::collections::HashMap::new();
    for l in 0..2 {
        let p = format!("model.layers.{l}");
        for (m, o, i) in [
            ("self_attn.q_proj", 256, 256),
            ("self_attn.k_proj", 128, 256),
            ("self_attn.v_proj", 128, 256),
            ("self_attn.o_proj", 256, 256),
            ("mlp.gate_proj", 512, 256),
            ("mlp.up_proj", 512, 256),
            ("mlp.down_proj", 256, 512),
        ] {
            w.insert(format!("{p}.{m}.weight"), r(&[o, i], 0.06));
            if m.ends_with("q_proj") || m.ends_with("down_proj") {
                let a = format!("base_model.model.{p}.{m}");
                ad.insert(format!("{a}.lora_A.weight"), r(&[2, i], 0.05));
                ad.insert(format!("{a}.lora_B.weight"), r(&[o, 2], 0.05));
            }
        }
        for n in ["input_layernorm", "post_attention_layernorm"] {
            w.insert(format!("{p}.{n}.weight"), Tensor::ones(256, DType::F32, &Device::Cpu).unwrap());
        }
    }
    candle_core::safetensors::save(&w, dir.join("model.safetensors")).unwrap();
    let adapter = d.join("k-adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    std::fs::write(
        adapter.join("adapter_config.json"),
        r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "down_proj"]}"#,
    )
    .unwrap();
    candle_core::safetensors::save(&ad, adapter.join("adapter_model.safetensors")).unwrap();
    (dir, adapter)
}

#[test]
fn k_quants_are_used_where_rows_allow_and_stay_within_their_precision() {
    let d = tmp("kquant");
    let (model, adapter) = k_quant_model(&d, None);
    let f32_file = d.join("f32.gguf");
    merge_ok(&model, &adapter, &f32_file, &["--format", "gguf", "--quant", "f32"]);
    let reference = read_gguf(&f32_file);
    let mut fr = std::fs::File::open(&f32_file).unwrap();
    let folder = d.join("folder");
    merge_ok(&model, &adapter, &folder, &["--dtype", "f32"]);
    let want = folder_logits(&folder);
    // (type, expected types of some tensors, bound on ‖Δw‖ / ‖w‖ for every quantized tensor). Closed form for
    // Gaussian weights: rounding error RMS = step / √12; Q4_K (asymmetric, 16 levels over the ~4σ range of 32 values)
    // ≈ 0.077σ, Q5_K ≈ 0.039σ, Q6_K (symmetric, 64 levels over ±amax of 16 values, amax ≈ 2σ) ≈ 0.018σ. Measured:
    // 7.5e-2, 3.7e-2, 1.8e-2; logits 0.19, 0.096, 0.049 of max |logit|.
    type Case<'a> = (&'a str, &'a [(&'a str, GgmlDType)], f32);
    let cases: [Case; 3] = [
        (
            "q4_k_m",
            &[
                ("blk.0.attn_q.weight", GgmlDType::Q4K),
                ("blk.0.attn_v.weight", GgmlDType::Q4K),
                ("blk.1.attn_v.weight", GgmlDType::Q6K),
                ("blk.1.ffn_down.weight", GgmlDType::Q6K),
                ("token_embd.weight", GgmlDType::Q4K),
                ("output.weight", GgmlDType::Q6K),
                ("output_norm.weight", GgmlDType::F32),
            ],
            0.12,
        ),
        ("q5_k_m", &[("blk.0.ffn_up.weight", GgmlDType::Q5K), ("blk.1.attn_v.weight", GgmlDType::Q6K)], 0.06),
        ("q6_k", &[("blk.0.ffn_up.weight", GgmlDType::Q6K), ("output.weight", GgmlDType::Q6K)], 0.03),
    ];
    for (quant, types, bound) in cases {
        let out = d.join(format!("{quant}.gguf"));
        merge_ok(&model, &adapter, &out, &["--format", "gguf", "--quant", quant]);
        let c = read_gguf(&out);
        for (name, ty) in types {
            assert_eq!(c.tensor_infos[*name].ggml_dtype, *ty, "{quant}: {name}");
        }
        let mut f = std::fs::File::open(&out).unwrap();
        let mut worst = 0f32;
        for (name, info) in &c.tensor_infos {
            if info.ggml_dtype == GgmlDType::F32 {
                continue;
            }
            let q = c.tensor(&mut f, name, &Device::Cpu).unwrap().dequantize(&Device::Cpu).unwrap();
            let w = reference.tensor(&mut fr, name, &Device::Cpu).unwrap().dequantize(&Device::Cpu).unwrap();
            let norm = |t: &Tensor| t.sqr().unwrap().sum_all().unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap();
            let e = norm(&(&q - &w).unwrap()) / norm(&w);
            worst = worst.max(e);
            assert!(e <= bound, "{quant} {name} ({:?}): ‖Δw‖/‖w‖ = {e}", info.ggml_dtype);
        }
        let r = rel_diff(&gguf_logits(&out), &want);
        println!("k-quant model {quant}: worst ‖Δw‖/‖w‖ {worst:e}; logits vs merged folder: max rel diff {r:e}");
        assert!(r <= 0.3, "{quant}: {r}");
    }
}

#[test]
fn llama_3_1_rope_scaling_becomes_rope_freqs_and_survives_a_gguf_to_gguf_merge() {
    let d = tmp("llama3-rope");
    // Scaling that reaches all three regions for head_dim 64, theta 1e4: wavelengths 6.3 … 4.7e4.
    let scaling = serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 2048});
    let (model, adapter) = k_quant_model(&d, Some(scaling));
    let folder = d.join("folder");
    merge_ok(&model, &adapter, &folder, &["--dtype", "f32"]);
    let want = folder_logits(&folder);
    let out = d.join("m.gguf");
    merge_ok(&model, &adapter, &out, &["--format", "gguf", "--quant", "f32"]);
    let c = read_gguf(&out);
    let info = &c.tensor_infos["rope_freqs.weight"];
    assert_eq!((info.ggml_dtype, info.shape.dims()), (GgmlDType::F32, &[32usize][..]));
    let f: Vec<f32> = c
        .tensor(&mut std::fs::File::open(&out).unwrap(), "rope_freqs.weight", &Device::Cpu)
        .unwrap()
        .dequantize(&Device::Cpu)
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!((f[0], f[31]), (1.0, 8.0), "{f:?}");
    assert!(f.iter().any(|&x| x > 1.0 && x < 8.0), "{f:?}");
    // peftkit reads the factors back (as llama.cpp does) and computes the folder's logits, which use the config.
    let r = rel_diff(&gguf_logits(&out), &want);
    println!("llama3 rope scaling via rope_freqs.weight: max rel diff {r:e}");
    assert!(r <= 1e-5, "{r}");
    // A GGUF base with rope_freqs merges into GGUF (a folder has no way to say it), the tensor carried over.
    let base = d.join("base.gguf");
    std::fs::copy(&out, &base).unwrap();
    let again = d.join("again.gguf");
    merge_ok(&base, &zero_adapter_for(&adapter, &d), &again, &["--format", "gguf"]);
    assert!(read_gguf(&again).tensor_infos.contains_key("rope_freqs.weight"));
    assert!(rel_diff(&gguf_logits(&again), &want) <= 1e-5);
}

/// `adapter` with every B set to zero.
fn zero_adapter_for(adapter: &Path, d: &Path) -> PathBuf {
    let out = d.join("zero-adapter");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::copy(adapter.join("adapter_config.json"), out.join("adapter_config.json")).unwrap();
    let mut t = candle_core::safetensors::load(adapter.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    for (k, v) in t.iter_mut() {
        if k.contains("lora_B") {
            *v = v.zeros_like().unwrap();
        }
    }
    candle_core::safetensors::save(&t, out.join("adapter_model.safetensors")).unwrap();
    out
}

#[test]
fn an_interrupted_gguf_merge_leaves_nothing_behind() {
    let d = tmp("interrupt");
    let out = d.join("m.gguf");
    let mut opts = peftkit::merge::MergeOptions::new(
        fixture("tiny-llama").to_str().unwrap(),
        fixture("tiny-llama").join("peft-lora"),
        &out,
    );
    opts.format = peftkit::merge::OutFormat::Gguf;
    opts.interrupt = Some(std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)));
    assert!(matches!(peftkit::merge::merge(&opts), Err(peftkit::merge::MergeError::Interrupted)));
    assert!(!out.exists());
    assert!(leftovers(&d).is_empty(), "{:?}", leftovers(&d));
}
