//! `peftkit export --to gguf` against llama.cpp's own conversion of the same adapters
//! (tests/fixtures/llamacpp/*-peft-lora-f32.gguf: `convert_lora_to_gguf.py <model>/peft-lora --base <model>
//! --outtype f32`), the refusals of what llama.cpp's format cannot hold, and the CLI's exit codes.

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use peftkit::gguf_adapter::{build, export, BaseFacts, ExportError, ExportOptions, OutType};
use peftkit::hub::HubOptions;
use peftkit::model::ModelConfig;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("peftkit-export-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn offline() -> HubOptions {
    let mut o = HubOptions::from_env();
    o.offline = true;
    o.token = None;
    o
}

fn opts(model: &str, out: &Path, outtype: OutType) -> ExportOptions {
    ExportOptions {
        adapter: fixtures().join(model).join("peft-lora"),
        base: Some(fixtures().join(model).display().to_string()),
        revision: None,
        out: out.to_path_buf(),
        outtype,
        overwrite: true,
        hub: offline(),
    }
}

/// A GGUF file read back: metadata by key, and tensors (name → (shape, type, bytes)) in the file's order.
struct Read {
    version: String,
    meta: BTreeMap<String, String>,
    tensors: Vec<(String, Vec<usize>, GgmlDType, Vec<u8>)>,
}

fn read(path: &Path) -> Read {
    let mut f = std::fs::File::open(path).unwrap();
    let c = Content::read(&mut f).unwrap();
    let meta = c.metadata.iter().map(|(k, v)| (k.clone(), format!("{v:?}"))).collect();
    let mut infos: Vec<_> = c.tensor_infos.iter().collect();
    infos.sort_by_key(|(_, i)| i.offset);
    let tensors = infos
        .iter()
        .map(|(n, i)| {
            let q = c.tensor(&mut f, n, &Device::Cpu).unwrap();
            (n.to_string(), i.shape.dims().to_vec(), i.ggml_dtype, q.data().unwrap().to_vec())
        })
        .collect();
    Read { version: format!("{:?}", c.magic), meta, tensors }
}

fn dequantized(path: &Path) -> BTreeMap<String, (GgmlDType, Vec<f32>)> {
    let mut f = std::fs::File::open(path).unwrap();
    let c = Content::read(&mut f).unwrap();
    let names: Vec<String> = c.tensor_infos.keys().cloned().collect();
    names
        .into_iter()
        .map(|n| {
            let q: QTensor = c.tensor(&mut f, &n, &Device::Cpu).unwrap();
            let v = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (n, (q.dtype(), v))
        })
        .collect()
}

fn same_as_llama_cpp(model: &str) {
    let d = tmp(&format!("same-{model}"));
    let out = d.join("adapter.gguf");
    let report = export(&opts(model, &out, OutType::F32)).unwrap();
    assert_eq!(report.tensors, 28);
    let reference = fixtures().join(format!("llamacpp/{model}-peft-lora-f32.gguf"));
    let (ours, theirs) = (read(&out), read(&reference));
    assert_eq!(ours.version, theirs.version);
    // Metadata key for key (no key differs).
    assert_eq!(ours.meta, theirs.meta);
    // Tensors: names, order, shapes, types and bytes.
    assert_eq!(ours.tensors.len(), theirs.tensors.len());
    for (a, b) in ours.tensors.iter().zip(&theirs.tensors) {
        assert_eq!((&a.0, &a.1, a.2), (&b.0, &b.1, b.2));
        assert!(a.3 == b.3, "{}: bytes differ", a.0);
    }
    // And so the whole file, padding included.
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&reference).unwrap(), "files differ");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn llama_export_equals_llama_cpp_conversion() {
    // Q and K lora_b rows permuted as llama.cpp permutes the base's Q and K.
    same_as_llama_cpp("tiny-llama");
}

#[test]
fn qwen2_export_equals_llama_cpp_conversion() {
    same_as_llama_cpp("tiny-qwen2");
}

#[test]
fn f16_bf16_and_q8_0_round_trip_within_their_precision() {
    let d = tmp("types");
    let f32_path = d.join("f32.gguf");
    export(&opts("tiny-llama", &f32_path, OutType::F32)).unwrap();
    let exact = dequantized(&f32_path);
    for (out, rel) in [(OutType::F16, 2f32.powi(-11)), (OutType::Bf16, 2f32.powi(-8)), (OutType::Q8_0, 0.0)] {
        let p = d.join(format!("{}.gguf", out.name()));
        export(&opts("tiny-llama", &p, out)).unwrap();
        let got = dequantized(&p);
        assert_eq!(got.keys().collect::<Vec<_>>(), exact.keys().collect::<Vec<_>>());
        for (name, (dtype, v)) in &got {
            let x = &exact[name].1;
            // The converter's types: q8_0 where a row (ne0) is a multiple of 32 (lora_a: rows of 64 or 160),
            // else f16 (lora_b: rows of r = 4).
            let expected = match out {
                OutType::F16 => GgmlDType::F16,
                OutType::Bf16 => GgmlDType::BF16,
                OutType::Q8_0 if name.ends_with(".lora_a") => GgmlDType::Q8_0,
                _ => GgmlDType::F16,
            };
            assert_eq!(*dtype, expected, "{name}");
            if *dtype == GgmlDType::Q8_0 {
                // Per block of 32: |error| ≤ d/2 with d = max|x|/127, plus |q|·Δd ≤ 127·d·2⁻¹¹ from storing d as f16.
                for (bx, bv) in x.chunks(32).zip(v.chunks(32)) {
                    let amax = bx.iter().fold(0f32, |m, a| m.max(a.abs()));
                    for (a, b) in bx.iter().zip(bv) {
                        assert!((a - b).abs() <= amax / 127.0 * (0.5 + 127.0 / 2048.0) + 1e-7, "{name}: {a} vs {b}");
                    }
                }
            } else {
                let rel = if *dtype == GgmlDType::F16 { 2f32.powi(-11) } else { rel };
                for (a, b) in x.iter().zip(v) {
                    assert!((a - b).abs() <= a.abs() * rel + 1e-7, "{}: {name}: {a} vs {b}", out.name());
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&d);
}

/// A copy of tiny-llama's peft-lora with its config edited by `edit`.
fn edited_adapter(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let src = fixtures().join("tiny-llama/peft-lora");
    let d = tmp(name).join("peft-lora");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(src.join("adapter_model.safetensors"), d.join("adapter_model.safetensors")).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(d.join("adapter_config.json"), serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    d
}

fn llama_facts() -> BaseFacts {
    BaseFacts::from_config(&ModelConfig::from_file(&fixtures().join("tiny-llama/config.json")).unwrap())
}

fn tensor(g: &peftkit::gguf_adapter::GgufAdapter, name: &str) -> Tensor {
    let t = &g.tensors.iter().find(|(n, _)| n == name).unwrap().1;
    t.dequantize(&Device::Cpu).unwrap()
}

fn alpha(g: &peftkit::gguf_adapter::GgufAdapter) -> f32 {
    match g.metadata.iter().find(|(k, _)| k == "adapter.lora.alpha") {
        Some((_, Value::F32(a))) => *a,
        other => panic!("{other:?}"),
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn alpha_pattern_is_folded_into_lora_b_and_rslora_alpha_gives_the_same_scale() {
    let plain = build(&fixtures().join("tiny-llama/peft-lora"), &llama_facts(), OutType::F32).unwrap();
    assert!(plain.folded.is_empty());
    // alpha_pattern q_proj: 16 → PEFT's scale for q_proj is 16/4 = 4, llama.cpp's is 8/4 = 2: B·2 in the file.
    let d = edited_adapter("alpha-pattern", |c| c["alpha_pattern"] = serde_json::json!({"q_proj": 16}));
    let g = build(&d, &llama_facts(), OutType::F32).unwrap();
    assert_eq!(alpha(&g), 8.0);
    assert_eq!(g.folded, vec!["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]);
    for l in 0..2 {
        let q = format!("blk.{l}.attn_q.weight.lora_b");
        let doubled = (tensor(&plain, &q) * 2.0).unwrap();
        assert!(max_abs_diff(&tensor(&g, &q), &doubled) == 0.0, "{q}");
        let k = format!("blk.{l}.attn_k.weight.lora_b");
        assert!(max_abs_diff(&tensor(&g, &k), &tensor(&plain, &k)) == 0.0, "{k}");
    }
    // rsLoRA: PEFT's scale is 8/sqrt(4) = 4; the file's alpha is 8·sqrt(4) = 16, so that llama.cpp's 16/4 = 4.
    let d = edited_adapter("rslora", |c| c["use_rslora"] = serde_json::json!(true));
    let g = build(&d, &llama_facts(), OutType::F32).unwrap();
    assert_eq!(alpha(&g), 16.0);
    assert!(g.folded.is_empty());
    let _ = std::fs::remove_dir_all(d.parent().unwrap());
}

fn refused(dir: &Path) -> String {
    match build(dir, &llama_facts(), OutType::F32) {
        Err(e @ ExportError::Unrepresentable { .. }) => {
            assert!(e.is_user_error());
            e.to_string()
        }
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("{} was exported", dir.display()),
    }
}

#[test]
fn refuses_what_llama_cpp_cannot_represent() {
    let e = refused(&fixtures().join("tiny-llama/peft-ia3"));
    assert!(e.contains("peft-ia3") && e.contains("IA3"), "{e}");
    let d = edited_adapter("dora", |c| c["use_dora"] = serde_json::json!(true));
    let e = refused(&d);
    assert!(e.contains(&d.display().to_string()) && e.contains("DoRA"), "{e}");
    let d = edited_adapter("mts", |c| c["modules_to_save"] = serde_json::json!(["lm_head"]));
    let e = refused(&d);
    assert!(e.contains(&d.display().to_string()) && e.contains("modules_to_save [lm_head]"), "{e}");
    let d = edited_adapter("bias", |c| c["lora_bias"] = serde_json::json!(true));
    assert!(refused(&d).contains("bias"));
    // A target llama.cpp has no tensor for.
    let d = edited_adapter("target", |c| c["target_modules"] = serde_json::json!(["rotary_proj"]));
    let a = Tensor::zeros((4, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
    let b = Tensor::zeros((64, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
    peftkit::adapter::peft_format::save_safetensors(
        &d.join("adapter_model.safetensors"),
        &[
            ("base_model.model.model.layers.0.self_attn.rotary_proj.lora_A.weight".into(), a),
            ("base_model.model.model.layers.0.self_attn.rotary_proj.lora_B.weight".into(), b),
        ],
    )
    .unwrap();
    let e = refused(&d);
    assert!(e.contains("self_attn.rotary_proj") && e.contains("no tensor"), "{e}");
}

#[test]
fn a_base_that_cannot_be_read_is_named() {
    let d = tmp("nobase");
    // base_model_name_or_path is `./tiny-llama`, which does not exist from the crate root.
    let mut o = opts("tiny-llama", &d.join("a.gguf"), OutType::F32);
    o.base = None;
    let e = export(&o).unwrap_err();
    assert!(matches!(e, ExportError::BaseUnresolved { .. }) && e.is_user_error(), "{e}");
    let m = e.to_string();
    assert!(m.contains("peft-lora") && m.contains("./tiny-llama") && m.contains("--base"), "{m}");
    // No base_model_name_or_path at all.
    let a = edited_adapter("nobase-key", |c| {
        c.as_object_mut().unwrap().remove("base_model_name_or_path");
    });
    o.adapter = a;
    assert!(matches!(export(&o), Err(ExportError::NoBase { .. })));
    // A --base that does not exist.
    o.base = Some("/nonexistent/model".into());
    let m = export(&o).unwrap_err().to_string();
    assert!(m.contains("/nonexistent/model"), "{m}");
    assert!(!d.join("a.gguf").exists());
}

// ---------------------------------------------------------------------------------------------
// The binary
// ---------------------------------------------------------------------------------------------

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_peftkit"));
    c.env("HF_HUB_OFFLINE", "1").env("NO_COLOR", "1").env_remove("HF_TOKEN");
    c
}

#[test]
fn cli_exports_refuses_with_exit_2_and_inspects() {
    let d = tmp("cli");
    let out = d.join("adapter.gguf");
    // The base from base_model_name_or_path (`./tiny-llama`, relative to the working directory).
    let o = bin()
        .current_dir(fixtures())
        .args(["export", "--adapter", "tiny-llama/peft-lora", "--to", "gguf", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        std::fs::read(&out).unwrap()
            == std::fs::read(fixtures().join("llamacpp/tiny-llama-peft-lora-f32.gguf")).unwrap()
    );
    // Not overwritten without --overwrite.
    let o = bin()
        .current_dir(fixtures())
        .args(["export", "--adapter", "tiny-llama/peft-lora", "--to", "gguf", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--overwrite"));
    // IA3: exit 2, the folder and the reason.
    let o = bin()
        .args(["export", "--to", "gguf", "--adapter"])
        .arg(fixtures().join("tiny-llama/peft-ia3"))
        .arg("--base")
        .arg(fixtures().join("tiny-llama"))
        .arg("--out")
        .arg(d.join("ia3.gguf"))
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("tiny-llama/peft-ia3") && e.contains("IA3") && !e.contains("panicked"), "{e}");
    assert!(!d.join("ia3.gguf").exists());
    // A base that cannot be found: exit 2, naming it and --base.
    let o = bin()
        .args(["export", "--to", "gguf", "--adapter"])
        .arg(fixtures().join("tiny-llama/peft-lora"))
        .arg("--out")
        .arg(d.join("x.gguf"))
        .current_dir(&d)
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("./tiny-llama") && e.contains("--base"), "{e}");
    // An output type llama.cpp's converter does not write.
    let o = bin()
        .args(["export", "--to", "gguf", "--outtype", "q4_0", "--adapter", "x", "--out", "y.gguf"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    // inspect says what the file is.
    let o = bin().arg("inspect").arg(&out).output().unwrap();
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(s.contains("GGUF adapter") && s.contains("lora") && s.contains("architecture: llama"), "{s}");
    assert!(s.contains("lora alpha: 8") && s.contains("pairs: 14") && s.contains("rank [4]"), "{s}");
    let _ = std::fs::remove_dir_all(&d);
}

/// llama.cpp running base + adapter GGUF against peftkit's unmerged adapter. The fixture holds llama.cpp's logits
/// for the base GGUF plus *its own* conversion of the PEFT adapter, and peftkit's export is byte-identical to that
/// conversion (above), so these are llama.cpp's logits for peftkit's file: within 2e-3 of peftkit's unmerged
/// forward (relative to max |logit|), as the issue asks; llama.cpp's own conversion is within 9e-4 of PEFT.
#[test]
fn llama_cpp_logits_with_the_adapter_match_peftkits_unmerged_forward() {
    use candle_core::DType;
    for model in ["tiny-llama", "tiny-qwen2"] {
        let dir = fixtures().join(model);
        let mut m = peftkit::model::load_llama(
            &dir.join("config.json"),
            &[dir.join("model.safetensors")],
            &Device::Cpu,
            DType::F32,
        )
        .unwrap();
        peftkit::peft_model::load_adapter(&mut m, &dir.join("peft-lora")).unwrap();
        let lc = candle_core::safetensors::load(
            fixtures().join(format!("llamacpp/{model}-llamacpp-logits.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        let ids = lc["input_ids"].to_dtype(DType::U32).unwrap();
        let ours = m.forward(&ids).unwrap();
        let theirs = &lc["logits_lora"];
        let d = (&ours - theirs).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
            / theirs.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        eprintln!("{model}: llama.cpp base + adapter GGUF vs peftkit unmerged: {d:.2e}");
        assert!(d <= 2e-3, "{model}: {d}");
    }
}
