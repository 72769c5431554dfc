//! Sample packing and pre-tokenized data on the tiny fixture model.
//!
//! - Packed rows give the loss and the LoRA gradients of the same examples one per row (closed form: packing only
//!   moves examples into shared rows; attention is block-diagonal, positions restart, no target crosses a
//!   boundary), through the model directly, through the trainer's optimizer step and with checkpointing.
//! - `format: tokens`: the loss is transformers' (mean over predicted tokens after the one-position shift, checked
//!   against log-softmax of the logits), and the oracle's recorded batches written as a tokens file come back out of
//!   the data pipeline as the same batches, whose optimizer steps reproduce PEFT's losses.
//! - The binary: a packed run on a tokens file reports its padding; bad ids exit 2 naming file, line and key.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use peftkit::adapter::{AdapterConfig, LoraConfig, LoraInit, TargetModules};
use peftkit::data::{self, make_batch, make_packed_batch, pack, Batch, EncodeOptions, Example, Format};
use peftkit::linear::ForwardCtx;
use peftkit::model::{load_llama, Llama};
use peftkit::ops::Segments;
use peftkit::peft_model;
use peftkit::recipe::LrScheduler;
use peftkit::train::optim::AdamW;
use peftkit::train::step::{optimizer_step, StepOutcome};
use peftkit::train::TrainConfig;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn tiny(dtype: DType) -> Llama {
    let dir = fixtures().join("tiny-llama");
    load_llama(&dir.join("config.json"), &[dir.join("model.safetensors")], &Device::Cpu, dtype).unwrap()
}

/// Examples of lengths 5..=16 with a supervised tail, ids within the tiny vocabulary (384).
fn examples(n: usize) -> Vec<Example> {
    (0..n)
        .map(|i| {
            let len = 5 + (i * 7) % 12;
            let ids: Vec<u32> = (0..len).map(|j| ((i * 31 + j * 17) % 370 + 3) as u32).collect();
            let labels = ids.iter().enumerate().map(|(j, &t)| if j < len / 3 { -100 } else { t as i32 }).collect();
            Example { input_ids: ids, labels }
        })
        .collect()
}

/// LoRA with A and B both random, so every adapter tensor gets a gradient.
fn lora_model(seed: u64) -> Llama {
    let mut model = tiny(DType::F32);
    let cfg = AdapterConfig::Lora(LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        target_modules: TargetModules::AllLinear,
        init: LoraInit::Random,
        ..Default::default()
    });
    peft_model::attach(&mut model, &cfg, seed).unwrap();
    model
}

/// The batch's loss (mean over its predicted tokens) and the gradient of every adapter variable.
fn loss_and_grads(model: &Llama, batch: &Batch, segments: bool) -> (f64, Vec<Vec<f32>>) {
    let ctx = ForwardCtx { dropout_seed: None, no_grad: false };
    let ids = Tensor::from_vec(batch.input_ids.clone(), (batch.batch, batch.seq), &Device::Cpu).unwrap();
    let hidden = if segments {
        let seg = Segments::new(batch.boundaries(), batch.seq).unwrap();
        model.forward_hidden_segments(&ids, &seg, &ctx).unwrap()
    } else {
        model.forward_hidden(&ids, &ctx, None).unwrap()
    };
    let denom = Llama::count_targets(&batch.labels, batch.batch, batch.seq) as f64;
    let loss = model.loss(&hidden, &batch.labels, denom).unwrap();
    let grads = loss.backward().unwrap();
    let g = peft_model::trainable(model)
        .iter()
        .map(|(name, var)| grads.get(var.as_tensor()).expect(name).flatten_all().unwrap().to_vec1().unwrap())
        .collect();
    (loss.to_scalar::<f32>().unwrap() as f64, g)
}

/// max over tensors of ‖a − b‖ / ‖b‖ (f64).
fn max_rel(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let num: f64 = x.iter().zip(y).map(|(p, q)| (*p as f64 - *q as f64).powi(2)).sum();
            let den: f64 = y.iter().map(|q| (*q as f64).powi(2)).sum();
            num.sqrt() / den.sqrt().max(1e-30)
        })
        .fold(0.0, f64::max)
}

#[test]
fn packed_and_unpacked_batches_give_equal_loss_and_lora_gradients() {
    let exs = examples(9);
    let lengths: Vec<usize> = exs.iter().map(Example::len).collect();
    let rows = pack(&lengths, 32, 3);
    assert!(rows.len() < exs.len(), "packing put several examples in a row: {rows:?}");
    let packed_rows: Vec<Vec<&Example>> = rows.iter().map(|r| r.iter().map(|&i| &exs[i]).collect()).collect();
    let packed = make_packed_batch(&packed_rows, 0);
    // The same examples, one per row, in the packed order (the loss is a sum: the order does not matter).
    let unpacked = make_batch(&rows.concat().iter().map(|&i| &exs[i]).collect::<Vec<_>>(), 0);
    assert_eq!(
        Llama::count_targets(&packed.labels, packed.batch, packed.seq),
        Llama::count_targets(&unpacked.labels, unpacked.batch, unpacked.seq)
    );
    let padding = |b: &Batch| b.padding() as f64 / (b.batch * b.seq) as f64;
    eprintln!(
        "{} examples: unpacked {}×{} (padding {:.1}%), packed {}×{} (padding {:.1}%)",
        exs.len(),
        unpacked.batch,
        unpacked.seq,
        100.0 * padding(&unpacked),
        packed.batch,
        packed.seq,
        100.0 * padding(&packed)
    );
    assert!(padding(&packed) < padding(&unpacked));

    let mut model = lora_model(11);
    let (loss_plain, grads_plain) = loss_and_grads(&model, &unpacked, false);
    let (loss_seg, grads_seg) = loss_and_grads(&model, &unpacked, true);
    let (loss_packed, grads_packed) = loss_and_grads(&model, &packed, true);
    model.gradient_checkpointing = true;
    let (loss_ckpt, grads_ckpt) = loss_and_grads(&model, &packed, true);
    model.gradient_checkpointing = false;
    let rel = |a: f64, b: f64| (a - b).abs() / b.abs();
    eprintln!(
        "loss: unpacked {loss_plain:.9}, packed {loss_packed:.9} (rel. diff {:.2e}); LoRA gradients: max rel. diff \
         {:.2e} packed, {:.2e} packed + checkpointing, {:.2e} unpacked with segments",
        rel(loss_packed, loss_plain),
        max_rel(&grads_packed, &grads_plain),
        max_rel(&grads_ckpt, &grads_plain),
        max_rel(&grads_seg, &grads_plain)
    );
    for (what, loss, grads) in [
        ("unpacked with segments", loss_seg, &grads_seg),
        ("packed", loss_packed, &grads_packed),
        ("packed, checkpointed", loss_ckpt, &grads_ckpt),
    ] {
        assert!(rel(loss, loss_plain) <= 1e-5, "{what}: loss {loss} vs {loss_plain}");
        assert!(max_rel(grads, &grads_plain) <= 1e-5, "{what}: gradients differ by {:e}", max_rel(grads, &grads_plain));
    }
    assert!(grads_plain.iter().all(|g| g.iter().any(|&x| x != 0.0)), "every adapter tensor has a gradient");
    // Control: the packed rows read as one sequence each (attention across examples, positions running on) give
    // another loss, so the equality above is the segments' doing.
    let crossing = Batch { segments: Vec::new(), ..packed.clone() };
    let ids = Tensor::from_vec(crossing.input_ids.clone(), (crossing.batch, crossing.seq), &Device::Cpu).unwrap();
    let hidden = model.forward_hidden(&ids, &ForwardCtx::default(), None).unwrap();
    let n = Llama::count_targets(&crossing.labels, crossing.batch, crossing.seq) as f64;
    let loss_crossing = model.loss(&hidden, &crossing.labels, n).unwrap().to_scalar::<f32>().unwrap() as f64;
    assert!(rel(loss_crossing, loss_plain) > 1e-4, "{loss_crossing} vs {loss_plain}");

    // Through the trainer's step (two micro-batches of each layout): the same loss and gradient norm.
    let step = |batches: &[Batch]| {
        let model = lora_model(11);
        let vars: Vec<Var> = peft_model::trainable(&model).into_iter().map(|(_, v)| v).collect();
        let mut opt = AdamW::new(vars, 0.9, 0.999, 1e-8, 0.0).unwrap();
        match optimizer_step(&model, &mut opt, batches, |_| None, 1e9, 1e-3).unwrap() {
            StepOutcome::Updated { loss, grad_norm, tokens } => (loss, grad_norm, tokens),
            other => panic!("{other:?}"),
        }
    };
    let half = packed_rows.len() / 2;
    let unpacked_half = |rows: &[Vec<&Example>]| make_batch(&rows.concat(), 0);
    let a = step(&[make_packed_batch(&packed_rows[..half], 0), make_packed_batch(&packed_rows[half..], 0)]);
    let b = step(&[unpacked_half(&packed_rows[..half]), unpacked_half(&packed_rows[half..])]);
    eprintln!("optimizer step: packed loss {:.9} grad norm {:.9}; unpacked {:.9} {:.9}", a.0, a.1, b.0, b.1);
    assert!(rel(a.0, b.0) <= 1e-5 && rel(a.1, b.1) <= 1e-5, "{a:?} vs {b:?}");
    assert_eq!(a.2, b.2, "tokens (padding excluded)");
}

#[test]
fn training_with_packing_and_length_grouping_runs_and_reports_padding() {
    let exs = examples(24);
    let cfg = |packing: Option<usize>, group_by_length: bool| TrainConfig {
        micro_batch_size: 2,
        max_steps: Some(3),
        learning_rate: 1e-2,
        lr_scheduler: LrScheduler::Constant,
        seed: 5,
        packing,
        group_by_length,
        ..Default::default()
    };
    let mut padding = Vec::new();
    for (name, c) in [("plain", cfg(None, false)), ("grouped", cfg(None, true)), ("packed", cfg(Some(32), false))] {
        let mut model = lora_model(2);
        let out = std::env::temp_dir().join(format!("peftkit-test-packing-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let cfg_a = AdapterConfig::Lora(LoraConfig {
            r: 4,
            lora_alpha: 8.0,
            target_modules: TargetModules::AllLinear,
            init: LoraInit::Random,
            ..Default::default()
        });
        let opts = peftkit::train::TrainOptions::default();
        let summary = peftkit::train::train(&mut model, &cfg_a, &exs, None, &c, "tiny", &out, &opts).unwrap();
        assert!(summary.last_train_loss.unwrap().is_finite());
        assert!(summary.tokens_per_s() > 0.0);
        let metrics = std::fs::read_to_string(out.join(peftkit::train::METRICS_FILE)).unwrap();
        let first: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
        assert!(first["padding_fraction"].as_f64().is_some(), "{first}");
        padding.push(summary.padding_fraction());
        let _ = std::fs::remove_dir_all(&out);
    }
    eprintln!("padding fraction: plain {:.3}, grouped {:.3}, packed {:.3}", padding[0], padding[1], padding[2]);
    assert!(padding[2] < padding[0] && padding[1] <= padding[0], "{padding:?}");
}

fn tokenizer() -> tokenizers::Tokenizer {
    tokenizers::Tokenizer::from_file(fixtures().join("tiny-llama/tokenizer.json")).unwrap()
}

fn load_tokens(path: &Path, sequence_len: usize) -> Result<data::Dataset, data::DataError> {
    let opts = EncodeOptions { sequence_len, train_on_inputs: false, vocab_size: Some(384) };
    data::load_dataset(path, Some(Format::Tokens), &tokenizer(), None, None, &opts)
}

#[test]
fn tokens_format_loss_is_transformers_shifted_mean() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokens.jsonl");
    std::fs::write(
        &path,
        "{\"input_ids\": [5, 9, 14, 200, 7, 31], \"labels\": [-100, -100, 14, 200, -100, 31]}\n\
         {\"input_ids\": [17, 3, 88]}\n",
    )
    .unwrap();
    let ds = data::load_dataset(
        &path,
        None,
        &tokenizer(),
        None,
        None,
        &EncodeOptions { sequence_len: 64, train_on_inputs: false, vocab_size: None },
    )
    .unwrap();
    assert_eq!(ds.format, Format::Tokens, "detected from `input_ids`");
    assert_eq!(ds.examples[1].labels, vec![17, 3, 88], "labels default to the ids");
    let model = tiny(DType::F32);
    let refs: Vec<&Example> = ds.examples.iter().collect();
    for packed in [false, true] {
        let batch = if packed { make_packed_batch(std::slice::from_ref(&refs), 0) } else { make_batch(&refs, 0) };
        let ids = Tensor::from_vec(batch.input_ids.clone(), (batch.batch, batch.seq), &Device::Cpu).unwrap();
        let seg = Segments::new(batch.boundaries(), batch.seq).unwrap();
        let hidden = model.forward_hidden_segments(&ids, &seg, &ForwardCtx::default()).unwrap();
        let n = Llama::count_targets(&batch.labels, batch.batch, batch.seq);
        assert_eq!(n, 3 + 2, "14, 200, 31 predicted in the first; 3, 88 in the second");
        let loss = model.loss(&hidden, &batch.labels, n as f64).unwrap().to_scalar::<f32>().unwrap() as f64;
        // transformers: logits[..., :-1] against labels[..., 1:], mean over labels ≠ -100 — from the logits here,
        // each example alone.
        let mut nll = 0f64;
        for ex in &ds.examples {
            let ids = Tensor::new(ex.input_ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            let logp = candle_nn::ops::log_softmax(&model.forward(&ids).unwrap().squeeze(0).unwrap(), 1).unwrap();
            let logp: Vec<Vec<f32>> = logp.to_vec2().unwrap();
            for j in 0..ex.len() - 1 {
                if ex.labels[j + 1] >= 0 {
                    nll -= logp[j][ex.labels[j + 1] as usize] as f64;
                }
            }
        }
        let want = nll / n as f64;
        assert!((loss - want).abs() <= 1e-5 * want, "packed {packed}: loss {loss} vs {want}");
    }
}

#[test]
fn tokens_format_errors_name_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("{\"input_ids\": [1, 2], \"labels\": [1]}", "labels", "equally long"),
        ("{\"input_ids\": [1, 384]}", "input_ids[1]", "outside the vocabulary (token ids 0..384)"),
        ("{\"input_ids\": [1, 2], \"labels\": [-100, 999]}", "labels[1]", "outside the vocabulary"),
        ("{\"input_ids\": [1, 2], \"labels\": [-1, 2]}", "labels[0]", "neither a token id nor -100"),
        ("{\"input_ids\": [1, -2]}", "input_ids[1]", "not a token id"),
        ("{\"input_ids\": [1, \"a\"]}", "input_ids[1]", "expected an integer, found a string"),
        ("{\"input_ids\": []}", "input_ids", "is empty"),
        ("{\"input_ids\": 3}", "input_ids", "expected an array of integers"),
        ("{\"labels\": [1]}", "input_ids", "missing"),
    ];
    for (line, key, needle) in cases {
        let path = dir.path().join("bad.jsonl");
        std::fs::write(&path, format!("{{\"input_ids\": [1, 2, 3]}}\n\n{line}\n")).unwrap();
        let err = load_tokens(&path, 64).unwrap_err();
        let message = err.to_string();
        assert!(
            message.starts_with(&format!("{}:3: `{key}`: ", path.display())) && message.contains(needle),
            "{line}: {message}"
        );
    }
    // Nothing predicted at all: every record dropped, said as for the other formats.
    let path = dir.path().join("none.jsonl");
    std::fs::write(&path, "{\"input_ids\": [1, 2], \"labels\": [-100, -100]}\n").unwrap();
    assert!(matches!(load_tokens(&path, 64), Err(data::DataError::NoExamples { .. })));
}

/// The train-oracle's batches (steps 1–3, 2 rows of 16 tokens each, from trajectory.safetensors) written as a
/// `format: tokens` file come back from the data pipeline (no shuffling, micro-batch 2, no packing) as the very
/// same batches, and the trainer's optimizer steps on them reproduce PEFT's recorded losses.
#[test]
fn oracle_batches_round_trip_through_a_tokens_file() {
    let dir = fixtures().join("train-oracle");
    let tensors = candle_core::safetensors::load(dir.join("trajectory.safetensors"), &Device::Cpu).unwrap();
    let oracle: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("oracle.json")).unwrap()).unwrap();
    let rows = |name: &str| -> Vec<Vec<i64>> { tensors[name].to_vec2::<i64>().unwrap() };
    let mut jsonl = String::new();
    for step in 1..=3 {
        let (ids, labels) = (rows(&format!("step{step}.input_ids")), rows(&format!("step{step}.labels")));
        for (i, l) in ids.iter().zip(&labels) {
            jsonl.push_str(&serde_json::json!({"input_ids": i, "labels": l}).to_string());
            jsonl.push('\n');
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("oracle-batches.jsonl");
    std::fs::write(&path, jsonl).unwrap();
    let ds = load_tokens(&path, 16).unwrap();
    assert_eq!(ds.examples.len(), 6);

    let cfg = TrainConfig {
        micro_batch_size: 2,
        max_steps: Some(3),
        learning_rate: 1e-2,
        lr_scheduler: LrScheduler::Constant,
        weight_decay: 0.01,
        max_grad_norm: 0.5,
        seed: 0,
        shuffle: false,
        ..Default::default()
    };
    // The trainer's batching: rows, the epoch's order, windows of micro_batch_size rows.
    let units = cfg.rows(&ds.examples);
    let order = cfg.row_order(&units.iter().map(|r| r.len()).collect::<Vec<_>>(), 0);
    let mut model = tiny(DType::F32);
    peft_model::load_adapter(&mut model, &dir.join("init")).unwrap();
    let vars: Vec<Var> = peft_model::trainable(&model).into_iter().map(|(_, v)| v).collect();
    let mut opt = AdamW::new(vars, 0.9, 0.999, 1e-8, 0.01).unwrap();
    for step in 1..=3 {
        let window = &order[(step - 1) * 2..step * 2];
        let exs: Vec<Vec<&Example>> =
            window.iter().map(|&r| units[r].iter().map(|&i| &ds.examples[i]).collect()).collect();
        let batch = make_packed_batch(&exs, 0);
        let want_ids: Vec<u32> = rows(&format!("step{step}.input_ids")).concat().iter().map(|&v| v as u32).collect();
        let want_labels: Vec<i32> = rows(&format!("step{step}.labels")).concat().iter().map(|&v| v as i32).collect();
        assert_eq!((batch.batch, batch.seq), (2, 16));
        assert_eq!(batch.input_ids, want_ids, "step {step}");
        assert_eq!(batch.labels, want_labels, "step {step}");
        let StepOutcome::Updated { loss, .. } =
            optimizer_step(&model, &mut opt, &[batch], |_| None, 0.5, 1e-2).unwrap()
        else {
            panic!("step {step}: not finite")
        };
        let want = oracle["losses"][step - 1]["loss"].as_f64().unwrap();
        assert!((loss - want).abs() <= 1e-5 * want, "step {step}: loss {loss} vs PEFT {want}");
    }
}

#[test]
fn cli_trains_packed_tokens_and_rejects_bad_ids_with_exit_2() {
    let d = std::env::temp_dir().join(format!("peftkit-cli-packing-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let cache = common::hf_cache(&d.join("hub"));
    let data = d.join("train.jsonl");
    let lines: String = examples(10)
        .iter()
        .map(|e| serde_json::json!({"input_ids": e.input_ids, "labels": e.labels}).to_string() + "\n")
        .collect();
    std::fs::write(&data, &lines).unwrap();
    let out = d.join("out");
    let recipe = d.join("recipe.yaml");
    std::fs::write(
        &recipe,
        format!(
            "base_model: peftkit-test/tiny-llama\nadapter: {{type: lora, r: 4, lora_alpha: 8}}\n\
             data: {{train: {}, format: tokens, sequence_len: 32, packing: true}}\n\
             training: {{max_steps: 2, micro_batch_size: 2}}\noutput: {{dir: {}}}\n",
            data.display(),
            out.display()
        ),
    )
    .unwrap();
    let bin = || {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_peftkit"));
        c.env("HF_HUB_OFFLINE", "1").env("HF_HUB_CACHE", &cache).env("NO_COLOR", "1").env_remove("HF_TOKEN");
        c
    };
    let o = bin().arg("train").arg(&recipe).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{stderr}");
    assert!(
        stdout.contains("tokens/s (supervised + context, padding excluded") && stdout.contains("(packed)"),
        "{stdout}"
    );
    assert!(out.join("adapter_model.safetensors").is_file());

    std::fs::write(&data, format!("{lines}{{\"input_ids\": [1, 2, 4000]}}\n")).unwrap();
    let o = bin().arg("train").arg(&recipe).arg("--overwrite").output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("{}:11: `input_ids[2]`: 4000 is outside the vocabulary", data.display())),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let _ = std::fs::remove_dir_all(&d);
}
