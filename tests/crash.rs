//! Crash tests: `peftkit train` and `peftkit merge` killed with SIGKILL at many moments (while starting, training,
//! writing a checkpoint, writing the final adapter; while writing or swapping in a merged model), each followed by
//! the next command a user would run (`train --resume`, or `--overwrite` when no checkpoint survived; `merge
//! --overwrite`). After it: no temporary file or lock is left, the adapter (or merged model) is byte-identical to
//! an uninterrupted run's, and `peftkit push` (against the loopback Hub) accepts the folder.
//!
//! Ignored by default (about a minute on 2 cores in a debug build); `.ci/run` runs it:
//! `cargo test --locked --test crash -- --ignored`.

mod common;

use common::fakehub::{FakeHub, TOKEN};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const TRAIN_TRIALS: usize = 20;
const MERGE_TRIALS: usize = 10;
/// The whole test must finish within this (it is a bound, not a benchmark: typically a third of it).
const TIME_BOUND: Duration = Duration::from_secs(180);

fn bin(hub: &FakeHub, home: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_peftkit"));
    c.env("HF_ENDPOINT", hub.endpoint())
        .env("HF_TOKEN", TOKEN)
        .env("HF_HOME", home)
        .env("NO_COLOR", "1")
        .env("PEFTKIT_LOG", "peftkit=info")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_TOKEN_PATH")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("ALL_PROXY");
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    c
}

/// Runs to the end (at most two minutes).
fn run(mut cmd: Command) -> Output {
    let mut child = cmd.spawn().unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("a command ran for more than two minutes");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.wait_with_output().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// When to kill.
#[derive(Clone, Copy, Debug)]
enum Kill {
    /// This long after the start.
    After(Duration),
    /// As soon as an entry of `dir` whose name starts with the prefix and contains `.tmp-` (or, for merge's
    /// swap, `.old-`) appears, plus a delay.
    WhenAppears(&'static str, &'static str, Duration),
    /// As soon as `dir` holds adapter weights without their config (a save caught half way).
    WhenWeightsWithoutConfig,
}

/// Starts `cmd` and kills it with SIGKILL at `when` (unless it has ended by then). Returns whether it was killed.
fn kill9(cmd: Command, when: Kill, dir: &Path) -> bool {
    kill9_then(cmd, when, dir, || ())
}

/// [`kill9`], calling `at_kill` just before the kill (to note what the process was doing).
fn kill9_then(mut cmd: Command, when: Kill, dir: &Path, mut at_kill: impl FnMut()) -> bool {
    let mut child: Child = cmd.spawn().unwrap();
    let started = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        let now = match when {
            Kill::After(t) => started.elapsed() >= t,
            Kill::WhenWeightsWithoutConfig => {
                dir.join("adapter_model.safetensors").exists() && !dir.join("adapter_config.json").exists()
            }
            Kill::WhenAppears(prefix, mark, delay) => {
                let seen = std::fs::read_dir(dir).ok().is_some_and(|entries| {
                    entries.flatten().any(|e| {
                        let n = e.file_name().to_string_lossy().to_string();
                        n.starts_with(prefix) && n.contains(mark)
                    })
                });
                if seen {
                    std::thread::sleep(delay);
                }
                seen
            }
        };
        if now {
            at_kill();
            let killed = child.try_wait().unwrap().is_none();
            let _ = child.kill();
            let _ = child.wait();
            return killed;
        }
        if started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("a command ran for more than two minutes");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Every temporary name or lock under `dir`, recursively.
fn leftovers(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return found };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.contains(".tmp") || name.contains(".old-") || name.ends_with(".lock") {
            found.push(e.path());
        } else if e.path().is_dir() {
            found.extend(leftovers(&e.path()));
        }
    }
    found
}

/// What a training run was doing, from the temporary folders in its output folder.
fn train_phase(out: &Path) -> &'static str {
    let has = |dir: &Path, prefix: &str| {
        std::fs::read_dir(dir).ok().is_some_and(|entries| {
            entries.flatten().any(|e| {
                let n = e.file_name().to_string_lossy().to_string();
                n.starts_with(prefix) && n.contains(".tmp-")
            })
        })
    };
    if has(out, ".save.") {
        "writing the final adapter"
    } else if has(&out.join("checkpoints"), ".step-") {
        "writing a checkpoint"
    } else if out.join("adapter_config.json").exists() {
        "done, or starting over a finished run"
    } else {
        "starting or training"
    }
}

/// A final save that was complete and is being moved into place (it is finished by the next command).
fn complete_save_pending(out: &Path) -> bool {
    std::fs::read_dir(out).ok().is_some_and(|entries| {
        entries.flatten().any(|e| {
            let n = e.file_name().to_string_lossy().to_string();
            n.starts_with(".save.") && n.contains(".tmp-") && e.path().join(".peftkit-complete").is_file()
        })
    })
}

/// The files of a folder (not `checkpoints/`), by name.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_file())
        .map(|e| (e.file_name().to_string_lossy().to_string(), std::fs::read(e.path()).unwrap()))
        .collect()
}

#[test]
#[ignore = "crash test, about a minute: cargo test --test crash -- --ignored"]
fn killed_train_and_merge_runs_recover_with_the_next_command() {
    let started = Instant::now();
    let hub = FakeHub::start();
    let d = tempfile::tempdir().unwrap();
    let home = d.path().join("home");
    let data = d.path().join("train.jsonl");
    let lines: String = (0..16)
        .map(|i| serde_json::json!({"text": format!("line {i}: the quick brown fox {}", i * 13)}).to_string() + "\n")
        .collect();
    std::fs::write(&data, lines).unwrap();
    let recipe_for = |out: &Path| {
        let r = out.with_extension("yaml");
        std::fs::create_dir_all(out.parent().unwrap()).unwrap();
        std::fs::write(
            &r,
            format!(
                "base_model: {}\nadapter: {{type: lora, r: 2, lora_dropout: 0.1}}\n\
                 data: {{train: {}, sequence_len: 32}}\n\
                 training: {{max_steps: 24, micro_batch_size: 2, save_every: 4}}\noutput: {{dir: {}}}\n",
                common::fixture("tiny-llama").display(),
                data.display(),
                out.display()
            ),
        )
        .unwrap();
        r
    };

    // The references: an uninterrupted run, and its merge.
    let ref_out = d.path().join("ref/adapter");
    let t0 = Instant::now();
    let o = run({
        let mut c = bin(&hub, &home);
        c.arg("train").arg(recipe_for(&ref_out));
        c
    });
    assert!(o.status.success(), "{}", text(&o));
    let train_time = t0.elapsed();
    let want_adapter = files(&ref_out);
    let merge_cmd = |out: &Path| {
        let mut c = bin(&hub, &home);
        c.arg("merge").arg("--base").arg(common::fixture("tiny-llama")).arg("--adapter").arg(&ref_out);
        c.arg("--out").arg(out).arg("--overwrite");
        c
    };
    let ref_merged = d.path().join("ref/merged");
    let t0 = Instant::now();
    let o = run(merge_cmd(&ref_merged));
    assert!(o.status.success(), "{}", text(&o));
    let merge_time = t0.elapsed();
    let mut want_merged = files(&ref_merged);
    want_merged.remove("README.md");

    // Train: killed at spread-out moments, while writing a checkpoint, and while writing the final adapter.
    let out = d.path().join("trial/adapter");
    let recipe = recipe_for(&out);
    let mut killed = 0;
    let mut phases: BTreeMap<&str, usize> = BTreeMap::new();
    for i in 0..TRAIN_TRIALS {
        let when = match i % 4 {
            0 | 1 => Kill::After(train_time.mul_f64(1.2 * ((i * 7) % TRAIN_TRIALS) as f64 / TRAIN_TRIALS as f64)),
            2 => Kill::WhenAppears(".step-", ".tmp-", Duration::from_micros(300 * (i as u64 % 5))),
            _ if i % 8 == 7 => Kill::WhenWeightsWithoutConfig,
            _ => Kill::WhenAppears(".save.", ".tmp-", Duration::from_micros(500 * (i as u64 % 3))),
        };
        let watch = if matches!(when, Kill::WhenAppears(".step-", ..)) { out.join("checkpoints") } else { out.clone() };
        let mut first = bin(&hub, &home);
        first.arg("train").arg(&recipe).arg("--overwrite");
        let mut phase = "";
        if kill9_then(first, when, &watch, || phase = train_phase(&out)) {
            killed += 1;
            *phases.entry(phase).or_default() += 1;
        }
        // Right after the kill: never adapter weights without their config (unless a complete save is being moved
        // into place, which the next command finishes), and a config only with the finished adapter.
        let (weights, config) = (out.join("adapter_model.safetensors"), out.join("adapter_config.json"));
        if weights.exists() && !config.exists() {
            assert!(complete_save_pending(&out), "trial {i} ({when:?}, {phase}): adapter weights without their config");
        }
        if config.exists() {
            assert!(
                std::fs::read(&weights).ok().as_ref() == want_adapter.get("adapter_model.safetensors"),
                "trial {i} ({when:?}, {phase}): adapter_config.json beside other weights"
            );
        }
        // The next command: resume when a checkpoint survived, else start again.
        let mut next = bin(&hub, &home);
        next.arg("train").arg(&recipe);
        let resumed = peftkit::train::latest_checkpoint(&out).is_some();
        next.arg(if resumed { "--resume" } else { "--overwrite" });
        let o = run(next);
        assert!(o.status.success(), "trial {i} ({when:?}): {}", text(&o));
        assert_eq!(leftovers(&out), Vec::<PathBuf>::new(), "trial {i} ({when:?})");
        let got = files(&out);
        for f in ["adapter_model.safetensors", "adapter_config.json"] {
            assert!(got.get(f) == want_adapter.get(f), "trial {i} ({when:?}, resumed: {resumed}): {f} differs");
        }
        let o = run({
            let mut c = bin(&hub, &home);
            c.arg("push").arg(&out).arg("--repo").arg(format!("alice/crash-{i}"));
            c
        });
        assert!(o.status.success(), "trial {i}: push: {}", text(&o));
    }
    eprintln!(
        "train: {killed} of {TRAIN_TRIALS} runs killed before they ended ({:.0?} per run): {phases:?}",
        train_time
    );
    assert!(killed >= TRAIN_TRIALS / 2, "only {killed} runs were killed");
    for phase in ["writing the final adapter", "writing a checkpoint", "starting or training"] {
        assert!(phases.contains_key(phase), "no run was killed while {phase}: {phases:?}");
    }

    // Merge: killed at spread-out moments, while writing its temporary folder, and while swapping it in.
    let merged = d.path().join("trial/merged");
    let mut killed = 0;
    for i in 0..MERGE_TRIALS {
        let when = match i % 3 {
            0 => Kill::After(merge_time.mul_f64(1.2 * i as f64 / MERGE_TRIALS as f64)),
            1 => Kill::WhenAppears(".merged.", ".tmp-", Duration::from_millis(i as u64 % 4)),
            _ => Kill::WhenAppears(".merged.", ".old-", Duration::ZERO),
        };
        if kill9(merge_cmd(&merged), when, merged.parent().unwrap()) {
            killed += 1;
        }
        let o = run(merge_cmd(&merged));
        assert!(o.status.success(), "merge trial {i} ({when:?}): {}", text(&o));
        assert_eq!(leftovers(merged.parent().unwrap()), Vec::<PathBuf>::new(), "merge trial {i} ({when:?})");
        let mut got = files(&merged);
        assert!(got.remove("README.md").is_some());
        assert!(got == want_merged, "merge trial {i} ({when:?}): the merged model differs");
        let o = run({
            let mut c = bin(&hub, &home);
            c.arg("push").arg(&merged).arg("--repo").arg(format!("alice/merged-{i}"));
            c
        });
        assert!(o.status.success(), "merge trial {i}: push: {}", text(&o));
    }
    eprintln!("merge: {killed} of {MERGE_TRIALS} runs killed before they ended ({:.0?} per run)", merge_time);
    let elapsed = started.elapsed();
    eprintln!("crash test: {elapsed:.1?}");
    assert!(elapsed < TIME_BOUND, "took {elapsed:?}");
}
