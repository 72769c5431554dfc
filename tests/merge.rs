//! `peftkit merge`: the merged folder against outside references — PEFT's `merge_and_unload()` logits and PEFT +
//! bitsandbytes logits (tests/fixtures, made by the Python stack), the closed form W + s·B·A, bf16's
//! round-to-nearest-even — and its format (what transformers' `from_pretrained` reads), the card, and the errors.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{fixture, hf_cache, write_tiny_gguf};
use peftkit::hub::HubOptions;
use peftkit::model::{load_llama, Llama};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_peftkit"));
    // Never reach for a real Hub or a user's cache from tests.
    c.env("HF_HUB_OFFLINE", "1").env("NO_COLOR", "1").env_remove("HF_TOKEN");
    c
}

/// A fresh folder for one test.
fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("peftkit-merge-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// Runs `peftkit merge --base BASE --adapter ADAPTER --out OUT EXTRA…`.
fn merge(base: &Path, adapter: &Path, out: &Path, extra: &[&str]) -> Output {
    bin()
        .arg("merge")
        .arg("--base")
        .arg(base)
        .arg("--adapter")
        .arg(adapter)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

fn merge_ok(base: &Path, adapter: &Path, out: &Path, extra: &[&str]) {
    let o = merge(base, adapter, out, extra);
    assert!(o.status.success(), "{}", stderr(&o));
    let line = String::from_utf8_lossy(&o.stdout);
    assert!(line.contains("peak RSS"), "{line}");
}

/// Hidden temporary or set-aside folders left in `dir`.
fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.contains(".tmp-") || n.contains(".old-"))
        .collect()
}

/// The weight files of a model folder (single file or the shards of its index).
fn weight_files(dir: &Path) -> Vec<PathBuf> {
    peftkit::hub::resolve_model(dir.to_str().unwrap(), None, &HubOptions::default()).unwrap().weights
}

/// A model folder loaded by peftkit (f32), without needing a tokenizer.
fn load_model(dir: &Path) -> Llama {
    load_llama(&dir.join("config.json"), &weight_files(dir), &Device::Cpu, DType::F32).unwrap()
}

/// Every tensor of a model folder, as stored.
fn tensors(dir: &Path) -> HashMap<String, Tensor> {
    let mut all = HashMap::new();
    for f in weight_files(dir) {
        all.extend(candle_core::safetensors::load(f, &Device::Cpu).unwrap());
    }
    all
}

fn expected(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name).join("expected.safetensors"), &Device::Cpu).unwrap()
}

fn logits(model: &Llama, ids: &Tensor) -> Tensor {
    model.forward(&ids.to_dtype(DType::U32).unwrap()).unwrap()
}

/// max |a − b| / max |b|
fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    let d = (&a - &b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    d / b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

// ---------------------------------------------------------------------------------------------
// 1. The math against PEFT
// ---------------------------------------------------------------------------------------------

#[test]
fn lora_merged_at_f32_gives_peft_merged_and_unmerged_logits() {
    let d = tmp("f32");
    for name in ["tiny-llama", "tiny-qwen2"] {
        let out = d.join(name);
        merge_ok(&fixture(name), &fixture(name).join("peft-lora"), &out, &["--dtype", "f32"]);
        let exp = expected(name);
        let got = logits(&load_model(&out), &exp["input_ids"]);
        for key in ["logits_lora_merged", "logits_lora"] {
            let r = rel_diff(&got, &exp[key]);
            println!("{name}: merged folder vs PEFT {key}: max rel diff {r:e}");
            assert!(r <= 1e-4, "{name}: {key}: {r}");
        }
        // The adapter changes the model (so agreeing with PEFT is not trivial).
        assert!(rel_diff(&got, &exp["logits_base"]) > 1e-2);
        assert!(leftovers(&d).is_empty());
    }
}

// ---------------------------------------------------------------------------------------------
// 2. The folder is a transformers checkpoint
// ---------------------------------------------------------------------------------------------

#[test]
fn ia3_merged_at_f32_gives_peft_logits() {
    let d = tmp("ia3");
    // PEFT's IA3 fixtures: output scaling of k/v (with tiny-qwen2's biases) and input scaling of down_proj.
    for name in ["tiny-llama", "tiny-qwen2"] {
        let out = d.join(name);
        merge_ok(&fixture(name), &fixture(name).join("peft-ia3"), &out, &["--dtype", "f32"]);
        let exp = expected(name);
        let r = rel_diff(&logits(&load_model(&out), &exp["input_ids"]), &exp["logits_ia3"]);
        println!("{name}: IA3-merged folder vs PEFT logits_ia3: max rel diff {r:e}");
        assert!(r <= 1e-4, "{name}: {r}");
    }
    // A peftkit-trained IA3 adapter against PEFT's own merge_and_unload() of it.
    let out = d.join("peftkit-ia3");
    merge_ok(&fixture("tiny-qwen2"), &fixture("tiny-qwen2-ia3-peftkit"), &out, &["--dtype", "f32"]);
    let want =
        candle_core::safetensors::load(fixture("tiny-qwen2-ia3-peftkit").join("peft_logits.safetensors"), &Device::Cpu)
            .unwrap();
    let ids = Tensor::new(&[[5u32, 17, 42, 99, 3, 250, 7, 8]], &Device::Cpu).unwrap();
    let r = rel_diff(&logits(&load_model(&out), &ids), &want["merged_logits"]);
    println!("peftkit IA3 adapter merged vs PEFT merge_and_unload: max rel diff {r:e}");
    assert!(r <= 1e-4, "{r}");
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.contains("- ia3\n"), "{card}");
    assert!(leftovers(&d).is_empty());
}

#[test]
fn sharded_folder_is_a_transformers_checkpoint() {
    let d = tmp("shards");
    let out = d.join("merged");
    let base = fixture("tiny-llama");
    // tiny-llama is 0.27 MB in bf16 (the default for a float32 base): several shards of at most 100 kB.
    let max = 100_000u64;
    merge_ok(&base, &base.join("peft-lora"), &out, &["--max-shard-size", "100KB"]);
    assert!(!out.join("model.safetensors").exists());

    let index = json(&out.join("model.safetensors.index.json"));
    let weight_map = index["weight_map"].as_object().unwrap();
    let shards: BTreeSet<String> = weight_map.values().map(|v| v.as_str().unwrap().to_string()).collect();
    let n = shards.len();
    assert!(n >= 2, "{n} shards");
    let want: BTreeSet<String> = (1..=n).map(|i| format!("model-{i:05}-of-{n:05}.safetensors")).collect();
    assert_eq!(shards, want);

    let base_st = candle_core::safetensors::load(base.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut total = 0u64;
    let mut seen = BTreeMap::new();
    for shard in &shards {
        let bytes = std::fs::read(out.join(shard)).unwrap();
        let (header_len, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        // The data starts 8-aligned, so every tensor of this single dtype is aligned to its element size.
        assert_eq!((8 + header_len) % 8, 0);
        let format = meta.metadata().as_ref().and_then(|m| m.get("format").cloned());
        assert_eq!(format.as_deref(), Some("pt"), "{shard}");
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut shard_bytes = 0u64;
        for (name, view) in st.tensors() {
            assert_eq!(view.dtype(), safetensors::Dtype::BF16, "{name}");
            assert_eq!(view.shape(), base_st[&name].dims(), "{name}");
            shard_bytes += view.data().len() as u64;
            seen.insert(name.clone(), shard.clone());
        }
        assert!(shard_bytes <= max || st.len() == 1, "{shard}: {shard_bytes} bytes in {} tensors", st.len());
        total += shard_bytes;
    }
    assert_eq!(index["metadata"]["total_size"].as_u64(), Some(total));
    // The weight map names exactly the base's tensors, each in the shard that holds it.
    let base_names: BTreeSet<&String> = base_st.keys().collect();
    assert_eq!(seen.keys().collect::<BTreeSet<_>>(), base_names);
    for (name, shard) in &seen {
        assert_eq!(weight_map[name].as_str(), Some(shard.as_str()));
    }

    // config.json: the base's, with the dtype set and no quantization_config.
    let (mut cfg, mut base_cfg) = (json(&out.join("config.json")), json(&base.join("config.json")));
    assert_eq!(cfg["torch_dtype"], "bfloat16");
    assert_eq!(cfg["dtype"], "bfloat16");
    assert!(cfg.get("quantization_config").is_none());
    for key in ["torch_dtype", "dtype"] {
        cfg.as_object_mut().unwrap().remove(key);
        base_cfg.as_object_mut().unwrap().remove(key);
    }
    assert_eq!(cfg, base_cfg);
    // Tokenizer files and the generation config, byte for byte.
    for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"] {
        assert_eq!(std::fs::read(out.join(f)).unwrap(), std::fs::read(base.join(f)).unwrap(), "{f}");
    }
    assert!(out.join("README.md").is_file());
    assert!(leftovers(&d).is_empty());
}

// ---------------------------------------------------------------------------------------------
// 3. 16-bit output
// ---------------------------------------------------------------------------------------------

/// f32 → bf16 bits, rounding to nearest, ties to even (finite values).
fn bf16_rne(x: f32) -> u16 {
    let b = x.to_bits();
    let round = 0x7fff + ((b >> 16) & 1);
    (b.wrapping_add(round) >> 16) as u16
}

#[test]
fn bf16_output_is_the_f32_merge_rounded_to_nearest_even() {
    let d = tmp("bf16");
    let base = fixture("tiny-qwen2");
    let (f32_dir, bf16_dir, f16_dir) = (d.join("f32"), d.join("bf16"), d.join("f16"));
    merge_ok(&base, &base.join("peft-lora"), &f32_dir, &["--dtype", "f32"]);
    merge_ok(&base, &base.join("peft-lora"), &bf16_dir, &["--dtype", "bf16"]);
    merge_ok(&base, &base.join("peft-lora"), &f16_dir, &["--dtype", "f16"]);
    let (full, half) = (tensors(&f32_dir), tensors(&bf16_dir));
    assert_eq!(full.len(), half.len());
    for (name, t) in &half {
        assert_eq!(t.dtype(), DType::BF16, "{name}");
        let want: Vec<u16> = f32s(&full[name]).into_iter().map(bf16_rne).collect();
        let got: Vec<u16> =
            t.flatten_all().unwrap().to_vec1::<half::bf16>().unwrap().into_iter().map(|x| x.to_bits()).collect();
        assert_eq!(got, want, "{name}: not the f32 merge rounded to nearest even");
    }
    assert!(tensors(&f16_dir).values().all(|t| t.dtype() == DType::F16));
    assert_eq!(json(&f16_dir.join("config.json"))["torch_dtype"], "float16");
    // bf16 keeps 8 bits of mantissa: the logits stay close to the f32 merge's.
    let exp = expected("tiny-qwen2");
    let r =
        rel_diff(&logits(&load_model(&bf16_dir), &exp["input_ids"]), &logits(&load_model(&f32_dir), &exp["input_ids"]));
    println!("bf16 merge vs f32 merge: logits max rel diff {r:e}");
    assert!(r <= 3e-2, "{r}");
}

// ---------------------------------------------------------------------------------------------
// 4. QLoRA
// ---------------------------------------------------------------------------------------------

#[test]
fn qlora_from_quantized_on_bnb4_base_gives_peft_bitsandbytes_logits() {
    // The reference: PEFT + bitsandbytes (Linear4bit, float32 compute on CPU) with this adapter on the pre-quantized
    // tiny-llama-bnb4 (make_peft_logits.py), i.e. x·dequant(W)ᵀ + s·x·Aᵀ·Bᵀ in f32.
    let d = tmp("qlora-bnb4");
    let out = d.join("merged");
    let adapter = fixture("tiny-llama-bnb4-qlora");
    merge_ok(&fixture("tiny-llama-bnb4"), &adapter, &out, &["--from-quantized", "--dtype", "f32"]);
    let ids = Tensor::new(&[[5u32, 17, 42, 99, 3, 250, 7, 8]], &Device::Cpu).unwrap();
    let want = candle_core::safetensors::load(adapter.join("peft_logits.safetensors"), &Device::Cpu).unwrap();
    let r = rel_diff(&logits(&load_model(&out), &ids), &want["logits"]);
    println!("QLoRA merged --from-quantized onto tiny-llama-bnb4 vs PEFT + bitsandbytes: max rel diff {r:e}");
    assert!(r <= 1e-4, "{r}");
    // Dense weights only: no quantization config, no bitsandbytes parts, projections at their (out, in) shape.
    assert!(json(&out.join("config.json")).get("quantization_config").is_none());
    let t = tensors(&out);
    assert!(t.keys().all(|k| !k.contains("absmax") && !k.contains("quant_")), "{:?}", t.keys());
    assert_eq!(t["model.layers.0.mlp.down_proj.weight"].dims(), &[64, 160]);
    assert_eq!(t.len(), 21);
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.contains("- qlora") && card.contains("pre-quantized"), "{card}");
}

#[test]
fn qlora_from_quantized_on_16bit_base_equals_the_bnb4_merge() {
    // tiny-llama-bnb4 is tiny-llama quantized by bitsandbytes (tests/model.rs checks the bytes): quantizing
    // tiny-llama's projections as QLoRA training does gives the same NF4 weights, hence the same merged model.
    let d = tmp("qlora-16");
    let adapter = fixture("tiny-llama-bnb4-qlora");
    let (from_16, from_4) = (d.join("from-16bit"), d.join("from-bnb4"));
    merge_ok(&fixture("tiny-llama"), &adapter, &from_16, &["--from-quantized", "--dtype", "f32"]);
    merge_ok(&fixture("tiny-llama-bnb4"), &adapter, &from_4, &["--from-quantized", "--dtype", "f32"]);
    let (a, b) = (tensors(&from_16), tensors(&from_4));
    assert_eq!(a.keys().collect::<BTreeSet<_>>(), b.keys().collect::<BTreeSet<_>>());
    for (name, t) in &a {
        assert_eq!(f32s(t), f32s(&b[name]), "{name}");
    }
    let card = std::fs::read_to_string(from_16.join("README.md")).unwrap();
    assert!(card.contains("quantized to NF4 (with double quantization) and dequantized"), "{card}");
}

#[test]
fn qlora_without_flag_on_16bit_base_is_w_plus_s_b_a_of_the_original_weights() {
    let d = tmp("qlora-default");
    let out = d.join("merged");
    let adapter = fixture("tiny-llama-bnb4-qlora");
    merge_ok(&fixture("tiny-llama"), &adapter, &out, &["--dtype", "f32"]);
    // The closed form, in f64, from the files: s = lora_alpha / r.
    let cfg = json(&adapter.join("adapter_config.json"));
    let s = cfg["lora_alpha"].as_f64().unwrap() / cfg["r"].as_f64().unwrap();
    let ad = candle_core::safetensors::load(adapter.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let base = candle_core::safetensors::load(fixture("tiny-llama").join("model.safetensors"), &Device::Cpu).unwrap();
    let merged = tensors(&out);
    let mut adapted = 0;
    for (name, w) in &base {
        let got = f32s(&merged[name]);
        let module = name.strip_suffix(".weight").unwrap_or(name);
        let Some(a) = ad.get(&format!("base_model.model.{module}.lora_A.weight")) else {
            assert_eq!(got, f32s(w), "{name} should be the base's");
            continue;
        };
        adapted += 1;
        let b = &ad[&format!("base_model.model.{module}.lora_B.weight")];
        let (a, b, w) = (a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        let (out_f, in_f, r) = (w.len(), w[0].len(), a.len());
        for o in 0..out_f {
            for i in 0..in_f {
                let ba: f64 = (0..r).map(|k| b[o][k] as f64 * a[k][i] as f64).sum();
                let want = w[o][i] as f64 + s * ba;
                assert!((got[o * in_f + i] as f64 - want).abs() <= 1e-6, "{name}[{o}, {i}]");
            }
        }
    }
    assert_eq!(adapted, 14);
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.contains("original (unquantized) weights"), "{card}");
}

#[test]
fn qlora_recipe_in_the_adapter_folder_sets_method_and_double_quantization() {
    // A QLoRA adapter folder whose recipe turned double quantization off: --from-quantized rounds each projection
    // through NF4 with plain f32 block scales, as that training did.
    let d = tmp("qlora-recipe");
    let adapter = d.join("adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(fixture("tiny-llama-bnb4-qlora").join(f), adapter.join(f)).unwrap();
    }
    std::fs::write(
        adapter.join("peftkit_recipe.yaml"),
        "adapter:\n  type: qlora\n  bnb_4bit_use_double_quant: false\n",
    )
    .unwrap();
    let out = d.join("merged");
    merge_ok(&fixture("tiny-llama"), &adapter, &out, &["--from-quantized", "--dtype", "f32"]);
    let cfg = json(&adapter.join("adapter_config.json"));
    let s = cfg["lora_alpha"].as_f64().unwrap() / cfg["r"].as_f64().unwrap();
    let ad = candle_core::safetensors::load(adapter.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let base = candle_core::safetensors::load(fixture("tiny-llama").join("model.safetensors"), &Device::Cpu).unwrap();
    let merged = tensors(&out);
    let name = "model.layers.1.self_attn.k_proj";
    let w = &base[&format!("{name}.weight")];
    // (With double quantization the block scales, hence the weights, differ: this check fails for `true`.)
    let nf4 = peftkit::quant::nf4::Nf4Tensor::quantize(&f32s(w), w.dims(), false).unwrap().dequantize();
    let a: Vec<Vec<f32>> = ad[&format!("base_model.model.{name}.lora_A.weight")].to_vec2().unwrap();
    let b: Vec<Vec<f32>> = ad[&format!("base_model.model.{name}.lora_B.weight")].to_vec2().unwrap();
    let got = f32s(&merged[&format!("{name}.weight")]);
    let (out_f, in_f) = (w.dims()[0], w.dims()[1]);
    for o in 0..out_f {
        for i in 0..in_f {
            let ba: f64 = (0..a.len()).map(|k| b[o][k] as f64 * a[k][i] as f64).sum();
            let want = nf4[o * in_f + i] as f64 + s * ba;
            assert!((got[o * in_f + i] as f64 - want).abs() <= 1e-6, "{name}[{o}, {i}]");
        }
    }
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.contains("- qlora") && card.contains("without double quantization"), "{card}");
    assert!(card.contains("## Training procedure") && card.contains("bnb_4bit_use_double_quant: false"), "{card}");
    assert_eq!(
        std::fs::read(out.join("peftkit_recipe.yaml")).unwrap(),
        std::fs::read(adapter.join("peftkit_recipe.yaml")).unwrap()
    );
}

#[test]
fn prequantized_base_without_from_quantized_exits_2() {
    let d = tmp("qlora-noflag");
    let out = d.join("merged");
    let o = merge(&fixture("tiny-llama-bnb4"), &fixture("tiny-llama-bnb4-qlora"), &out, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("pre-quantized") && e.contains("--from-quantized") && e.contains("16-bit"), "{e}");
    assert!(!out.exists());
    assert!(leftovers(&d).is_empty());
}

// ---------------------------------------------------------------------------------------------
// 5. The card
// ---------------------------------------------------------------------------------------------

/// The front matter of a card, parsed.
fn front_matter(card: &str) -> serde_yaml::Mapping {
    let rest = card.strip_prefix("---\n").expect("front matter");
    let end = rest.find("\n---\n").expect("end of front matter");
    serde_yaml::from_str(&rest[..end]).unwrap()
}

#[test]
fn card_of_a_trained_adapter_has_hub_metadata_and_training_sections() {
    let d = tmp("card");
    let cache = hf_cache(&d.join("hub"));
    let data = d.join("train.jsonl");
    let lines: String = (0..8)
        .map(|i| serde_json::json!({"text": format!("line {i}: the quick brown fox {}", i * 13)}).to_string() + "\n")
        .collect();
    std::fs::write(&data, lines).unwrap();
    let adapter = d.join("adapter");
    let recipe = d.join("recipe.yaml");
    std::fs::write(
        &recipe,
        format!(
            "base_model: peftkit-test/tiny-llama\nadapter: {{type: lora, r: 2}}\ndata: {{train: {}, sequence_len: 32}}\n\
             training: {{max_steps: 2, micro_batch_size: 2}}\noutput: {{dir: {}}}\n",
            data.display(),
            adapter.display()
        ),
    )
    .unwrap();
    let o = bin().env("HF_HUB_CACHE", &cache).arg("train").arg(&recipe).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));

    let out = d.join("merged");
    let o = bin()
        .env("HF_HUB_CACHE", &cache)
        .args(["merge", "--base", "peftkit-test/tiny-llama", "--adapter"])
        .arg(&adapter)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    let fm = front_matter(&card);
    let keys: Vec<&str> = fm.keys().map(|k| k.as_str().unwrap()).collect();
    assert_eq!(keys, ["base_model", "base_model_relation", "library_name", "pipeline_tag", "license", "tags"]);
    assert_eq!(fm["base_model"].as_str(), Some("peftkit-test/tiny-llama"));
    assert_eq!(fm["base_model_relation"].as_str(), Some("merge"));
    assert_eq!(fm["library_name"].as_str(), Some("transformers"));
    assert_eq!(fm["pipeline_tag"].as_str(), Some("text-generation"));
    assert_eq!(fm["license"].as_str(), Some("apache-2.0"));
    let tags: Vec<&str> = fm["tags"].as_sequence().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(tags, ["peftkit", "lora", "base_model:merge:peftkit-test/tiny-llama"]);
    for section in
        ["## How to use", "## Merge", "## Training data", "## Training procedure", "## Results", "## Compute"]
    {
        assert!(card.contains(section), "{section} missing:\n{card}");
    }
    assert!(card.contains(&format!("peftkit chat --base {}", out.display())), "{card}");
    assert!(card.contains(&format!("AutoModelForCausalLM.from_pretrained(\"{}\")", out.display())), "{card}");
    assert!(card.contains("0123456789abcdef0123456789abcdef01234567"), "the revision: {card}");
    assert!(card.contains("Optimizer steps: 2 of 2."), "{card}");
    // The recipe travels with the model.
    assert_eq!(
        std::fs::read(out.join("peftkit_recipe.yaml")).unwrap(),
        std::fs::read(adapter.join("peftkit_recipe.yaml")).unwrap()
    );
}

#[test]
fn card_of_a_bare_adapter_on_a_local_base_says_only_what_is_known() {
    let d = tmp("card-bare");
    let out = d.join("merged");
    merge_ok(&fixture("tiny-llama"), &fixture("tiny-llama").join("peft-lora"), &out, &[]);
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    let fm = front_matter(&card);
    let keys: Vec<&str> = fm.keys().map(|k| k.as_str().unwrap()).collect();
    // A local path is not valid `base_model` metadata; tiny-llama declares no license.
    assert_eq!(keys, ["base_model_relation", "library_name", "pipeline_tag", "tags"]);
    let tags: Vec<&str> = fm["tags"].as_sequence().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(tags, ["peftkit", "lora"]);
    assert!(card.contains("neither a training record"), "{card}");
    assert!(card.contains("# tiny-llama with a LoRA adapter merged in"), "{card}");
    assert!(!card.contains("## Training data") && !card.contains("## Results"), "{card}");
    assert!(!out.join("peftkit_recipe.yaml").exists());
}

// ---------------------------------------------------------------------------------------------
// 6. Errors: exit 2, the file and tensor named, nothing written
// ---------------------------------------------------------------------------------------------

/// A copy of tiny-llama's peft-lora whose tensors are replaced by `tensors`.
fn crafted_adapter(dir: &Path, tensors: &[(&str, (usize, usize))]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(fixture("tiny-llama/peft-lora/adapter_config.json"), dir.join("adapter_config.json")).unwrap();
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(name, shape)| (name.to_string(), Tensor::ones(*shape, DType::F32, &Device::Cpu).unwrap()))
        .collect();
    candle_core::safetensors::save(&map, dir.join("adapter_model.safetensors")).unwrap();
    dir.to_path_buf()
}

fn assert_refused(o: &Output, wants: &[&str]) {
    assert_eq!(o.status.code(), Some(2), "{}", stderr(o));
    let e = stderr(o);
    for w in wants {
        assert!(e.contains(w), "`{w}` not in: {e}");
    }
    assert!(!e.contains("panicked"), "{e}");
}

#[test]
fn bad_input_exits_2_naming_what_is_wrong_and_writes_nothing() {
    let d = tmp("errors");
    let base = fixture("tiny-llama");
    let out = d.join("merged");

    // A missing adapter folder.
    let o = merge(&base, &d.join("no-such-adapter"), &out, &[]);
    assert_refused(&o, &["no-such-adapter", "adapter_config.json"]);

    // An adapter for another shape: lora_A of a 32-wide input on a 64-wide q_proj.
    let q = "base_model.model.model.layers.0.self_attn.q_proj";
    let other = crafted_adapter(
        &d.join("other-shape"),
        &[(&format!("{q}.lora_A.weight"), (4, 32)), (&format!("{q}.lora_B.weight"), (64, 4))],
    );
    let o = merge(&base, &other, &out, &[]);
    assert_refused(&o, &["adapter_model.safetensors", q, "lora_A"]);

    // An adapter with tensors for a module its config does not select (the copied config lists layers 0 and 1 by
    // path); a module the base lacks but the config selects is in tests/bad_inputs.rs.
    let l7 = "base_model.model.model.layers.7.self_attn.q_proj";
    let absent = crafted_adapter(
        &d.join("absent"),
        &[(&format!("{l7}.lora_A.weight"), (4, 64)), (&format!("{l7}.lora_B.weight"), (64, 4))],
    );
    let o = merge(&base, &absent, &out, &[]);
    assert_refused(&o, &["adapter_model.safetensors", l7, "do not select"]);

    // Bad flags.
    let adapter = base.join("peft-lora");
    assert_refused(&merge(&base, &adapter, &out, &["--max-shard-size", "5XB"]), &["--max-shard-size", "5XB"]);
    assert_refused(&merge(&base, &adapter, &out, &["--max-shard-size", "0"]), &["--max-shard-size"]);
    assert_refused(&merge(&base, &adapter, &out, &["--dtype", "int8"]), &["--dtype", "int8"]);
    assert!(!out.exists());
    assert!(leftovers(&d).is_empty(), "{:?}", leftovers(&d));

    // An output folder that is not empty: refused without --overwrite and left untouched; replaced with it.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    assert_refused(&merge(&base, &adapter, &out, &[]), &["--out", "not empty", "--overwrite"]);
    assert_eq!(std::fs::read_to_string(out.join("keep.txt")).unwrap(), "mine");
    merge_ok(&base, &adapter, &out, &["--overwrite"]);
    assert!(!out.join("keep.txt").exists() && out.join("model.safetensors").is_file());
    // An empty one is simply used.
    let empty = d.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    merge_ok(&base, &adapter, &empty, &[]);
    assert!(leftovers(&d).is_empty(), "{:?}", leftovers(&d));

    // --out naming the base itself (or a folder holding it) is refused even with --overwrite: it would delete the
    // model being read.
    let copy = d.join("base-copy");
    std::fs::create_dir_all(&copy).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(base.join(f), copy.join(f)).unwrap();
    }
    assert_refused(&merge(&copy, &adapter, &copy, &["--overwrite"]), &["--out", "input"]);
    assert_refused(&merge(&copy, &adapter, &d, &["--overwrite"]), &["--out", "input"]);
    assert!(copy.join("model.safetensors").is_file());
    assert!(leftovers(&d).is_empty(), "{:?}", leftovers(&d));
}

// ---------------------------------------------------------------------------------------------
// 7. GGUF bases
// ---------------------------------------------------------------------------------------------

#[test]
fn gguf_base_merges_into_a_folder_with_peft_logits_and_the_same_tokenizer() {
    let d = tmp("gguf");
    for name in ["tiny-llama", "tiny-qwen2"] {
        let gguf = d.join(format!("{name}.gguf"));
        write_tiny_gguf(name, &gguf, false);
        let out = d.join(format!("{name}-merged"));
        merge_ok(&gguf, &fixture(name).join("peft-lora"), &out, &["--dtype", "f32"]);
        // The merged folder loads like any model folder (tokenizer included) and computes PEFT's logits.
        let merged =
            peftkit::base::load_base(out.to_str().unwrap(), None, None, &HubOptions::default(), &Device::Cpu).unwrap();
        let exp = expected(name);
        let r = rel_diff(&logits(&merged.model, &exp["input_ids"]), &exp["logits_lora"]);
        println!("{name} via GGUF: merged folder vs PEFT logits_lora: max rel diff {r:e}");
        assert!(r <= 1e-4, "{name}: {r}");
        // Q/K rows are back in transformers' order: the weights are the safetensors merge's.
        let via_st = d.join(format!("{name}-st"));
        merge_ok(&fixture(name), &fixture(name).join("peft-lora"), &via_st, &["--dtype", "f32"]);
        let (a, b) = (tensors(&out), tensors(&via_st));
        assert_eq!(a.keys().collect::<BTreeSet<_>>(), b.keys().collect::<BTreeSet<_>>());
        for (k, t) in &a {
            assert!(rel_diff(t, &b[k]) <= 1e-6, "{name}: {k}");
        }
        // The written tokenizer.json tokenizes as the original one does.
        let original = tokenizers::Tokenizer::from_file(fixture(name).join("tokenizer.json")).unwrap();
        let written = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
        for text in
            ["Hello world", "  two  spaces\tand\nnewlines", "digits 12345, café", "<|im_start|>user\nhi<|im_end|>"]
        {
            assert_eq!(
                written.encode(text, false).unwrap().get_ids(),
                original.encode(text, false).unwrap().get_ids(),
                "{text:?}"
            );
        }
        let tc = json(&out.join("tokenizer_config.json"));
        let orig_tc = json(&fixture(name).join("tokenizer_config.json"));
        assert_eq!(tc["eos_token"], orig_tc["eos_token"]);
        let template = std::fs::read_to_string(fixture(name).join("chat_template.jinja")).unwrap();
        assert_eq!(tc["chat_template"].as_str(), Some(template.as_str()));
        assert_eq!(std::fs::read_to_string(out.join("chat_template.jinja")).unwrap(), template);
        assert_eq!(
            json(&out.join("generation_config.json"))["eos_token_id"],
            json(&fixture(name).join("config.json"))["eos_token_id"]
        );
        assert!(merged.template.is_some());
        let cfg = json(&out.join("config.json"));
        assert_eq!(cfg["torch_dtype"], "float32");
        assert_eq!(cfg["tie_word_embeddings"], false);
        let card = std::fs::read_to_string(out.join("README.md")).unwrap();
        assert!(
            card.contains(&format!("dequantized to f32 from the GGUF file `{name}.gguf` (llama.cpp file type F32)")),
            "{card}"
        );
        assert_eq!(front_matter(&card)["license"].as_str(), Some("mit"));
    }
    assert!(leftovers(&d).is_empty());
}

#[test]
fn gguf_base_with_a_tied_head_writes_no_lm_head() {
    let d = tmp("gguf-tied");
    let gguf = d.join("tied.gguf");
    write_tiny_gguf("tiny-llama", &gguf, true);
    let out = d.join("merged");
    let adapter = fixture("tiny-llama").join("peft-lora");
    merge_ok(&gguf, &adapter, &out, &["--dtype", "f32"]);
    let t = tensors(&out);
    assert!(!t.contains_key("lm_head.weight") && t.contains_key("model.embed_tokens.weight"));
    assert_eq!(json(&out.join("config.json"))["tie_word_embeddings"], true);
    // Merged ≡ unmerged: the folder computes what the GGUF base with the adapter attached computes.
    let mut unmerged =
        peftkit::base::load_base(gguf.to_str().unwrap(), None, None, &HubOptions::default(), &Device::Cpu).unwrap();
    peftkit::peft_model::load_adapter(&mut unmerged.model, &adapter).unwrap();
    let ids = &expected("tiny-llama")["input_ids"];
    let r = rel_diff(&logits(&load_model(&out), ids), &logits(&unmerged.model, ids));
    assert!(r <= 1e-4, "{r}");
}

#[test]
fn smollm2_gguf_merged_folder_computes_the_unmerged_adapter() {
    let Some(gguf) = common::smollm2_gguf("smollm2_gguf_merged_folder_computes_the_unmerged_adapter") else { return };
    let d = tmp("smollm2");
    // A LoRA adapter (r = 2, q_proj and down_proj of every layer) with random A and B, in PEFT's format.
    let adapter = d.join("adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    std::fs::write(
        adapter.join("adapter_config.json"),
        r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "down_proj"]}"#,
    )
    .unwrap();
    let mut ad = HashMap::new();
    for l in 0..30 {
        for (m, out_f, in_f) in [("self_attn.q_proj", 576, 576), ("mlp.down_proj", 576, 1536)] {
            let p = format!("base_model.model.model.layers.{l}.{m}");
            ad.insert(format!("{p}.lora_A.weight"), Tensor::randn(0f32, 0.05, (2, in_f), &Device::Cpu).unwrap());
            ad.insert(format!("{p}.lora_B.weight"), Tensor::randn(0f32, 0.05, (out_f, 2), &Device::Cpu).unwrap());
        }
    }
    candle_core::safetensors::save(&ad, adapter.join("adapter_model.safetensors")).unwrap();
    let out = d.join("merged");
    merge_ok(&gguf, &adapter, &out, &["--dtype", "f32"]);
    let mut unmerged =
        peftkit::base::load_base(gguf.to_str().unwrap(), None, None, &HubOptions::default(), &Device::Cpu).unwrap();
    peftkit::peft_model::load_adapter(&mut unmerged.model, &adapter).unwrap();
    let ids = Tensor::new(&[[1u32, 504, 3458, 282, 4649, 314, 16, 2]], &Device::Cpu).unwrap();
    let merged =
        peftkit::base::load_base(out.to_str().unwrap(), None, None, &HubOptions::default(), &Device::Cpu).unwrap();
    let r = rel_diff(&logits(&merged.model, &ids), &logits(&unmerged.model, &ids));
    let _ = writeln!(std::io::stderr(), "smollm2: merged folder vs GGUF + unmerged adapter: max rel diff {r:e}");
    assert!(r <= 1e-4, "{r}");
    assert_eq!(merged.stop_ids.first(), unmerged.stop_ids.first());
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.contains("(llama.cpp file type Q4_1)") && card.contains("license: apache-2.0"), "{card}");
    let _ = std::fs::remove_dir_all(&d);
}

// ---------------------------------------------------------------------------------------------
// 8. DoRA
// ---------------------------------------------------------------------------------------------

#[test]
fn dora_merged_at_f32_gives_peft_merged_logits_and_bad_dora_input_exits_2() {
    let d = tmp("dora");
    for name in ["tiny-llama", "tiny-qwen2"] {
        let out = d.join(name);
        merge_ok(&fixture(name), &fixture(name).join("peft-dora"), &out, &["--dtype", "f32"]);
        let exp = candle_core::safetensors::load(fixture(name).join("expected-v2.safetensors"), &Device::Cpu).unwrap();
        let got = logits(&load_model(&out), &exp["input_ids"]);
        for key in ["logits_dora_merged", "logits_dora"] {
            let r = rel_diff(&got, &exp[key]);
            println!("{name}: DoRA-merged folder vs PEFT {key}: max rel diff {r:e}");
            assert!(r <= 1e-4, "{name}: {key}: {r}");
        }
    }
    assert!(leftovers(&d).is_empty());

    // A copy of tiny-llama's DoRA fixture with one tensor replaced or removed.
    let edited = |dir: &str, key: &str, replace: Option<Tensor>| -> PathBuf {
        let src = fixture("tiny-llama/peft-dora");
        let dir = d.join(dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(src.join("adapter_config.json"), dir.join("adapter_config.json")).unwrap();
        let mut t = candle_core::safetensors::load(src.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
        assert!(t.remove(key).is_some(), "{key}");
        if let Some(r) = replace {
            t.insert(key.to_string(), r);
        }
        candle_core::safetensors::save(&t, dir.join("adapter_model.safetensors")).unwrap();
        dir
    };
    let base = fixture("tiny-llama");
    let out = d.join("merged");
    let m = "base_model.model.model.layers.1.self_attn.k_proj.lora_magnitude_vector";
    let short = edited("short", m, Some(Tensor::ones(31, DType::F32, &Device::Cpu).unwrap()));
    assert_refused(&merge(&base, &short, &out, &[]), &["adapter_model.safetensors", m, "[31]", "expected [32]"]);
    let missing = edited("missing", m, None);
    assert_refused(&merge(&base, &missing, &out, &[]), &["adapter_model.safetensors", m, "missing", "use_dora"]);
    // Magnitude vectors under a config without use_dora.
    let undeclared = edited("undeclared", m, Some(Tensor::ones(32, DType::F32, &Device::Cpu).unwrap()));
    let cfg = std::fs::read_to_string(undeclared.join("adapter_config.json")).unwrap();
    std::fs::write(undeclared.join("adapter_config.json"), cfg.replace("\"use_dora\": true", "\"use_dora\": false"))
        .unwrap();
    assert_refused(
        &merge(&base, &undeclared, &out, &[]),
        &["adapter_model.safetensors", "lora_magnitude_vector", "use_dora"],
    );
    assert!(!out.exists());
}
