//! Several adapters on one base, and their weighted combination, against PEFT (fixtures made by
//! tests/fixtures/tiny-llama-weighted-peft/make.py): `set_adapter` logits for each loaded adapter, and
//! `add_weighted_adapter` (linear, cat, svd) tensors, updates B·A and logits, through the library and `peftkit merge`.

use candle_core::{DType, Device, Tensor};
use peftkit::adapter::combine::{self, Combination};
use peftkit::adapter::peft_format;
use peftkit::model::{load_llama, Llama};
use peftkit::peft_model;
use peftkit::peft_model::multi::AdapterSet;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn weighted(name: &str) -> PathBuf {
    fixture("tiny-llama-weighted-peft").join(name)
}

/// a, b, c: the fixture's input adapters.
fn input(name: &str) -> PathBuf {
    match name {
        "a" => fixture("tiny-llama/peft-lora"),
        n => weighted(n),
    }
}

fn load_dir(dir: &Path) -> Llama {
    load_llama(&dir.join("config.json"), &[dir.join("model.safetensors")], &Device::Cpu, DType::F32).unwrap()
}

fn logits() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(weighted("logits.safetensors"), &Device::Cpu).unwrap()
}

fn ids() -> Tensor {
    Tensor::new(&[[5u32, 17, 42, 99, 3, 250, 7, 8]], &Device::Cpu).unwrap()
}

/// max |a − b| / max |b|
fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let m = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    d / m
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("peftkit-weighted-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// One PEFT case: (folder, inputs, weights, combination, svd rank).
type Case = (&'static str, Vec<&'static str>, Vec<f64>, Combination, Option<usize>);

fn cases() -> Vec<Case> {
    vec![
        ("linear", vec!["a", "b"], vec![0.7, 0.3], Combination::Linear, None),
        ("linear-neg", vec!["a", "b"], vec![1.0, -0.5], Combination::Linear, None),
        ("cat", vec!["a", "b", "c"], vec![0.7, -0.3, 0.5], Combination::Cat, None),
        ("svd", vec!["a", "b", "c"], vec![0.7, 0.3, 0.5], Combination::Svd, Some(6)),
        ("svd-default", vec!["a", "b"], vec![0.5, 0.5], Combination::Svd, None),
    ]
}

fn read_tensors(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join(peft_format::WEIGHTS_FILE), &Device::Cpu).unwrap()
}

fn config(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join(peft_format::CONFIG_FILE)).unwrap()).unwrap()
}

fn sorted_targets(v: &serde_json::Value) -> Vec<String> {
    let mut t: Vec<String> =
        v["target_modules"].as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect();
    t.sort();
    t
}

#[test]
fn several_adapters_on_one_base_switch_like_peft_set_adapter() {
    let expected = logits();
    let mut model = load_dir(&fixture("tiny-llama"));
    let base_logits = model.forward(&ids()).unwrap();
    let specs: Vec<(String, PathBuf)> = ["a", "b", "c"].iter().map(|n| (n.to_string(), input(n))).collect();
    let mut set = AdapterSet::load(&mut model, &specs).unwrap();
    assert_eq!(set.active(), Some("a"));
    // In an order that switches back and forth.
    for name in ["a", "c", "b", "a", "c"] {
        set.activate(&mut model, Some(name)).unwrap();
        let d = rel_diff(&model.forward(&ids()).unwrap(), &expected[&format!("{name}.logits")]);
        println!("adapter {name} active: max rel diff to PEFT's set_adapter logits {d:e}");
        assert!(d <= 1e-4, "{name}: {d}");
    }
    // None: the base alone, exactly.
    set.activate(&mut model, None).unwrap();
    assert_eq!(rel_diff(&model.forward(&ids()).unwrap(), &base_logits), 0.0);
    let e = set.activate(&mut model, Some("zz")).unwrap_err().to_string();
    assert!(e.contains("`zz`") && e.contains("a, b, c"), "{e}");
}

#[test]
fn weighted_combinations_match_peft_add_weighted_adapter() {
    let expected = logits();
    let base = fixture("tiny-llama");
    for (name, inputs, weights, how, svd_rank) in cases() {
        let dirs: Vec<PathBuf> = inputs.iter().map(|n| input(n)).collect();
        let c = combine::combine(&dirs, &weights, how, svd_rank).unwrap();
        let out = tmp(name);
        combine::save(&c, &out).unwrap();
        let (ours, peft) = (read_tensors(&out), read_tensors(&weighted(name)));
        let mut keys: Vec<&String> = peft.keys().collect();
        keys.sort();
        let mut ours_keys: Vec<&String> = ours.keys().collect();
        ours_keys.sort();
        assert_eq!(ours_keys, keys, "{name}");
        // The config: r = lora_alpha = the new rank, targets the union.
        let (oc, pc) = (config(&out), config(&weighted(name)));
        assert_eq!(oc["r"], pc["r"], "{name}");
        assert_eq!(oc["lora_alpha"].as_f64(), pc["lora_alpha"].as_f64(), "{name}");
        assert_eq!(sorted_targets(&oc), sorted_targets(&pc), "{name}");
        let (mut tensor_diff, mut delta_diff) = (0f32, 0f32);
        for k in keys.iter().filter(|k| k.ends_with("lora_A.weight")) {
            let kb = k.replace("lora_A", "lora_B");
            if how != Combination::Svd {
                tensor_diff = tensor_diff.max(rel_diff(&ours[*k], &peft[*k])).max(rel_diff(&ours[&kb], &peft[&kb]));
            }
            let delta = |t: &HashMap<String, Tensor>| t[&kb].matmul(&t[*k]).unwrap();
            delta_diff = delta_diff.max(rel_diff(&delta(&ours), &delta(&peft)));
        }
        let mut model = load_dir(&base);
        peft_model::load_adapter(&mut model, &out).unwrap();
        let logit_diff = rel_diff(&model.forward(&ids()).unwrap(), &expected[&format!("{name}.logits")]);
        println!(
            "{name}: max rel diff to PEFT: tensors {tensor_diff:e}{}, B·A {delta_diff:e}, logits {logit_diff:e}",
            if how == Combination::Svd { " (not compared: SVD signs)" } else { "" }
        );
        assert!(tensor_diff <= 1e-4 && delta_diff <= 1e-4 && logit_diff <= 1e-4, "{name}");
    }
}

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_peftkit"));
    c.env("HF_HUB_OFFLINE", "1").env("NO_COLOR", "1").env_remove("HF_TOKEN");
    c
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

fn spec(name: &str) -> String {
    format!("{name}={}", input(name).display())
}

#[test]
fn merge_command_combines_adapters_and_merges_the_combination() {
    let expected = logits();
    let out = tmp("cli");
    // --to adapter: the PEFT folder, no base needed.
    let o = bin()
        .args(["merge", "--adapter", &spec("a"), "--adapter", &spec("b"), "--adapter", &spec("c")])
        .args(["--weights", "0.7,-0.3,0.5", "--combination", "cat", "--to", "adapter", "--out"])
        .arg(out.join("cat"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("cat, r=10"), "{}", text(&o.stdout));
    let (ours, peft) = (read_tensors(&out.join("cat")), read_tensors(&weighted("cat")));
    for (k, t) in &peft {
        assert!(rel_diff(&ours[k], t) <= 1e-4, "{k}");
    }
    // --to model: the svd combination merged into the base, in f32.
    let o = bin()
        .args(["merge", "--base"])
        .arg(fixture("tiny-llama"))
        .args(["--adapter", &spec("a"), "--adapter", &spec("b"), "--adapter", &spec("c")])
        .args(["--weights", "0.7,0.3,0.5", "--combination", "svd", "--svd-rank", "6", "--dtype", "f32", "--out"])
        .arg(out.join("merged"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let merged = load_dir(&out.join("merged"));
    let d = rel_diff(&merged.forward(&ids()).unwrap(), &expected["svd.logits"]);
    println!("merge --combination svd --svd-rank 6 into the base: max rel diff to PEFT's logits {d:e}");
    assert!(d <= 1e-4, "{d}");
    // No leftover combined folder beside --out.
    let left: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 2, "{left:?}");
    // What a killed combination left beside --out (its temporary adapter, the combined folder of a killed merge
    // into a model) goes at the next one; --overwrite swaps the old adapter for the new one whole.
    let dead = {
        let mut c = Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        pid
    };
    for left in [format!(".cat.tmp-{dead}"), format!(".cat.combined-{dead}")] {
        std::fs::create_dir_all(out.join(&left).join("x")).unwrap();
    }
    let o = bin()
        .args(["merge", "--adapter", &spec("a"), "--adapter", &spec("b"), "--weights", "0.5,0.5"])
        .args(["--combination", "cat", "--to", "adapter", "--overwrite", "--out"])
        .arg(out.join("cat"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let mut left: Vec<_> =
        std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    left.sort();
    assert_eq!(left, ["cat", "merged"]);
    assert_eq!(config(&out.join("cat"))["r"], 8, "the new adapter (a + b, cat) replaced the old one");
}

#[test]
fn merge_command_refuses_bad_combinations() {
    let out = tmp("bad");
    let cases: Vec<(Vec<String>, &str)> = vec![
        // linear needs one rank: a has r=4, c r=2
        (
            vec!["--adapter".into(), spec("a"), "--adapter".into(), spec("c"), "--combination".into(), "linear".into()],
            "r=2",
        ),
        (
            vec!["--adapter".into(), spec("a"), "--adapter".into(), spec("b"), "--weights".into(), "1".into()],
            "--weights",
        ),
        (vec!["--adapter".into(), spec("a"), "--adapter".into(), spec("a")], "given twice"),
        (vec!["--adapter".into(), format!("bad name={}", input("a").display())], "not valid"),
        (
            vec!["--adapter".into(), spec("a"), "--adapter".into(), spec("b"), "--combination".into(), "ties".into()],
            "not supported",
        ),
        (
            vec![
                "--adapter".into(),
                spec("a"),
                "--adapter".into(),
                fixture("tiny-llama/peft-ia3").display().to_string(),
            ],
            "only LoRA",
        ),
        (
            vec![
                "--adapter".into(),
                spec("a"),
                "--adapter".into(),
                fixture("tiny-llama/peft-lora-mts").display().to_string(),
            ],
            "modules_to_save",
        ),
    ];
    for (args, needle) in cases {
        let o = bin().arg("merge").args(&args).args(["--to", "adapter", "--out"]).arg(out.join("x")).output().unwrap();
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!out.join("x").exists(), "{args:?}");
    }
    // An existing --out is replaced only with --overwrite, and never when it is an input adapter.
    let both = ["--adapter".to_string(), spec("a"), "--adapter".to_string(), spec("b")];
    let run = |extra: &[&str], to: &Path| {
        let o = bin().arg("merge").args(&both).args(["--to", "adapter"]).args(extra).arg("--out").arg(to).output();
        let o = o.unwrap();
        (o.status.code(), text(&o.stderr))
    };
    std::fs::create_dir_all(out.join("full")).unwrap();
    std::fs::write(out.join("full/keep"), "x").unwrap();
    let (code, err) = run(&[], &out.join("full"));
    assert!(code == Some(2) && err.contains("not empty"), "{err}");
    let (code, err) = run(&["--overwrite"], &out.join("full"));
    assert_eq!(code, Some(0), "{err}");
    assert!(out.join("full/adapter_model.safetensors").is_file() && !out.join("full/keep").exists());
    let (code, err) = run(&["--overwrite"], &input("b"));
    assert!(code == Some(2) && err.contains("is the folder of --adapter b"), "{err}");
    let (code, err) = run(&["--dtype", "f32"], &out.join("y"));
    assert!(code == Some(2) && err.contains("--dtype"), "{err}");
}
