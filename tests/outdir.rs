//! The output folder of `peftkit train`: one run at a time (a second exits 2 naming the first's pid), SIGTERM and
//! SIGHUP stop a run with a checkpoint like Ctrl-C (and the resume hint repeats the `--set` overrides), temporary
//! files of killed runs are removed by the next run (`--resume` or `--overwrite`), and an incomplete checkpoint
//! is not resumed from. (tests/crash.rs kills runs at random moments.)

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_peftkit"));
    c.env("HF_HUB_OFFLINE", "1").env("NO_COLOR", "1").env_remove("HF_TOKEN").env("PEFTKIT_LOG", "peftkit=info");
    c
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// A training set and a recipe for the tiny-llama fixture: `max_steps` steps, a checkpoint every `save_every`.
fn setup(d: &Path, max_steps: usize, save_every: usize) -> (PathBuf, PathBuf) {
    let data = d.join("train.jsonl");
    let lines: String = (0..16)
        .map(|i| serde_json::json!({"text": format!("line {i}: the quick brown fox {}", i * 13)}).to_string() + "\n")
        .collect();
    std::fs::write(&data, lines).unwrap();
    let out = d.join("adapter");
    let recipe = d.join("recipe.yaml");
    std::fs::write(
        &recipe,
        format!(
            "base_model: {}\nadapter: {{type: lora, r: 2, lora_dropout: 0.1}}\ndata: {{train: {}, sequence_len: 32}}\n\
             training: {{max_steps: {max_steps}, micro_batch_size: 2, save_every: {save_every}}}\n\
             output: {{dir: {}}}\n",
            common::fixture("tiny-llama").display(),
            data.display(),
            out.display()
        ),
    )
    .unwrap();
    (recipe, out)
}

/// Waits until training is under way (the metrics log has `lines` lines).
fn wait_for_steps(out: &Path, lines: usize, child: &mut Child) {
    let started = Instant::now();
    while std::fs::read_to_string(out.join("metrics.jsonl")).map(|s| s.lines().count() < lines).unwrap_or(true) {
        assert!(child.try_wait().unwrap().is_none(), "training ended before it was interrupted");
        assert!(started.elapsed().as_secs() < 120, "training did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every peftkit temporary name under `dir` (`.NAME.tmp-PID`, `.NAME.tmp`), recursively.
fn temporaries(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return found };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if peftkit::fsutil::tmp_pid(&name).is_some() || name.ends_with(".tmp") || name == ".peftkit.lock" {
            found.push(e.path());
        } else if e.path().is_dir() {
            found.extend(temporaries(&e.path()));
        }
    }
    found
}

/// A process id that is not running.
fn dead_pid() -> u32 {
    let mut c = Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    pid
}

/// The words of a POSIX shell command line (the resume hint).
fn shell_words(line: &str) -> Vec<String> {
    let o = Command::new("sh").arg("-c").arg(format!("printf '%s\\0' {line}")).output().unwrap();
    String::from_utf8(o.stdout).unwrap().split('\0').filter(|w| !w.is_empty()).map(str::to_string).collect()
}

#[test]
fn a_second_run_into_the_folder_exits_2_naming_the_first_and_sigterm_checkpoints_with_the_full_hint() {
    let d = tempfile::tempdir().unwrap();
    let (recipe, out) = setup(d.path(), 150, 1000);
    // Overrides whose values need quoting in a shell.
    let sets = ["training.learning_rate=3e-3", "adapter.target_modules=[q_proj, v_proj]"];
    let with_sets = |c: &mut Command| {
        for s in sets {
            c.arg("--set").arg(s);
        }
    };
    let mut cmd = bin();
    cmd.arg("train").arg(&recipe).stdout(Stdio::piped()).stderr(Stdio::piped());
    with_sets(&mut cmd);
    let mut first = cmd.spawn().unwrap();
    wait_for_steps(&out, 3, &mut first);

    // A second run into the same folder: refused at once, naming the first's pid; the first carries on.
    let started = Instant::now();
    let o = bin().arg("train").arg(&recipe).arg("--overwrite").output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(started.elapsed() < Duration::from_secs(20));
    let msg = stderr(&o);
    assert!(msg.contains(&format!("pid {}", first.id())) && msg.contains("in use"), "{msg}");
    assert!(!msg.contains("panicked"), "{msg}");
    assert!(first.try_wait().unwrap().is_none(), "the first run was disturbed");

    // SIGTERM (what a batch scheduler or container sends) stops it like Ctrl-C: a checkpoint, a message, 130.
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(first.id() as i32, libc::SIGTERM) };
    let o = first.wait_with_output().unwrap();
    let msg = stderr(&o);
    assert_eq!(o.status.code(), Some(130), "{msg}");
    assert!(msg.contains("interrupted") && msg.contains("checkpoint"), "{msg}");
    assert_eq!(peftkit::train::checkpoints(&out).len(), 1, "{msg}");
    assert!(!out.join("adapter_model.safetensors").exists());
    assert!(temporaries(&out).is_empty(), "{:?}", temporaries(&out));
    // The hint repeats the overrides, quoted for a shell; run as printed, it finishes the run.
    let hint = msg.lines().find_map(|l| l.strip_prefix("resume with: ")).unwrap_or_else(|| panic!("{msg}"));
    let words = shell_words(hint);
    let mut want = vec!["peftkit".to_string(), "train".into(), recipe.display().to_string()];
    for s in sets {
        want.extend(["--set".to_string(), s.to_string()]);
    }
    want.push("--resume".into());
    assert_eq!(words, want, "{hint}");
    let o = bin().args(&words[1..]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("resuming from"), "{}", stderr(&o));
    let resumed = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    let cfg = std::fs::read_to_string(out.join("adapter_config.json")).unwrap();
    assert!(cfg.contains("q_proj") && !cfg.contains("k_proj"), "{cfg}");
    assert!(temporaries(&out).is_empty(), "{:?}", temporaries(&out));
    // The same as an uninterrupted run.
    let mut cmd = bin();
    cmd.arg("train").arg(&recipe).arg("--overwrite");
    with_sets(&mut cmd);
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(out.join("adapter_model.safetensors")).unwrap(), resumed);
}

#[test]
fn sighup_checkpoints_like_ctrl_c() {
    let d = tempfile::tempdir().unwrap();
    let (recipe, out) = setup(d.path(), 150, 1000);
    let mut child = bin().arg("train").arg(&recipe).stderr(Stdio::piped()).spawn().unwrap();
    wait_for_steps(&out, 3, &mut child);
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    assert!(stderr(&o).contains("--resume"), "{}", stderr(&o));
    assert_eq!(peftkit::train::checkpoints(&out).len(), 1);
    assert!(!out.join(".peftkit.lock").exists(), "the lock is released on the interrupt path");
}

/// Leftovers of killed runs (all with a dead pid): temporary files of the final save and of the metrics log, a
/// temporary checkpoint, an unfinished staging folder, and a half-deleted checkpoint newer than the good one.
fn plant_leftovers(out: &Path) {
    let dead = dead_pid();
    std::fs::write(out.join(format!(".adapter_model.safetensors.tmp-{dead}")), b"half").unwrap();
    std::fs::write(out.join(format!(".metrics.jsonl.tmp-{dead}")), b"{\"step\"").unwrap();
    std::fs::create_dir_all(out.join(format!(".save.tmp-{dead}"))).unwrap();
    std::fs::write(out.join(format!(".save.tmp-{dead}/adapter_model.safetensors")), b"x").unwrap();
    let ck = out.join("checkpoints");
    std::fs::create_dir_all(ck.join(format!(".step-000010.tmp-{dead}"))).unwrap();
    std::fs::create_dir_all(ck.join(".step-000011.tmp")).unwrap();
    // Weights gone, trainer_state.json kept: not a checkpoint.
    let half = ck.join("step-000099");
    std::fs::create_dir_all(&half).unwrap();
    std::fs::write(half.join("trainer_state.json"), b"{\"step\": 99, \"optimizer_t\": 99, \"fingerprint\": \"x\"}")
        .unwrap();
}

#[test]
fn leftovers_of_killed_runs_go_at_the_next_run_and_an_incomplete_checkpoint_is_not_resumed() {
    let d = tempfile::tempdir().unwrap();
    let (recipe, out) = setup(d.path(), 16, 4);
    // The reference: an uninterrupted run.
    let o = bin().arg("train").arg(&recipe).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let want = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    // A run stopped after 6 steps (SIGINT), then leftovers of killed runs.
    std::fs::remove_dir_all(&out).unwrap();
    let mut child = bin().arg("train").arg(&recipe).stderr(Stdio::piped()).spawn().unwrap();
    wait_for_steps(&out, 1, &mut child);
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let o = child.wait_with_output().unwrap();
    if o.status.success() {
        // It finished before the signal: make a resumable state by hand (a checkpoint kept, the rest removed).
        for f in ["adapter_model.safetensors", "adapter_config.json", "README.md"] {
            std::fs::remove_file(out.join(f)).unwrap();
        }
    }
    let good = peftkit::train::latest_checkpoint(&out).expect("a checkpoint");
    plant_leftovers(&out);
    assert_eq!(peftkit::train::latest_checkpoint(&out), Some(good.clone()), "the half checkpoint counts");
    // --resume removes them all, resumes from the complete checkpoint, and finishes as an uninterrupted run.
    let o = bin().arg("train").arg(&recipe).arg("--resume").output().unwrap();
    let msg = stderr(&o);
    assert!(o.status.success(), "{msg}");
    assert!(msg.contains(&format!("resuming from {}", good.display())), "{msg}");
    assert!(temporaries(&out).is_empty(), "{:?}", temporaries(&out));
    assert!(!out.join("checkpoints/step-000099").exists());
    assert_eq!(std::fs::read(out.join("adapter_model.safetensors")).unwrap(), want);
    // --overwrite removes them too.
    plant_leftovers(&out);
    let o = bin().arg("train").arg(&recipe).arg("--overwrite").output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(temporaries(&out).is_empty(), "{:?}", temporaries(&out));
    assert_eq!(std::fs::read(out.join("adapter_model.safetensors")).unwrap(), want);
}

#[test]
fn overwrite_takes_the_old_checkpoints_away_at_once_and_names_what_it_cannot_remove() {
    let d = tempfile::tempdir().unwrap();
    let (recipe, out) = setup(d.path(), 4, 2);
    let o = bin().arg("train").arg(&recipe).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    // An --overwrite killed while deleting the old checkpoints: they were moved aside whole first.
    let ck = out.join("checkpoints");
    let aside = out.join(format!(".checkpoints.tmp-{}", dead_pid()));
    std::fs::rename(&ck, &aside).unwrap();
    assert_eq!(peftkit::train::latest_checkpoint(&out), None, "no old checkpoint is visible once moved aside");
    let o = bin().arg("train").arg(&recipe).arg("--overwrite").output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!aside.exists() && temporaries(&out).is_empty(), "{:?}", temporaries(&out));
    assert!(peftkit::train::latest_checkpoint(&out).is_some());
    // A file of the earlier run that cannot be removed (here a folder under its name) stops the run at once, named,
    // instead of failing at the final save after all the training.
    std::fs::remove_file(out.join("adapter_model.safetensors")).unwrap();
    std::fs::create_dir_all(out.join("adapter_model.safetensors/x")).unwrap();
    let started = Instant::now();
    let o = bin().arg("train").arg(&recipe).arg("--overwrite").output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains(&out.join("adapter_model.safetensors").display().to_string()), "{}", stderr(&o));
    assert!(!stderr(&o).contains("step 1/"), "it trained first: {}", stderr(&o));
    assert!(started.elapsed() < Duration::from_secs(60));
}

#[test]
fn a_save_killed_after_it_was_complete_is_finished_by_the_next_command() {
    // The final save was complete (marker written) and had moved the weights, not yet the config: the next
    // command finishes it, so the adapter's files appear together.
    let d = tempfile::tempdir().unwrap();
    let (recipe, out) = setup(d.path(), 4, 1000);
    let o = bin().arg("train").arg(&recipe).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let cfg = std::fs::read(out.join("adapter_config.json")).unwrap();
    let staging = out.join(format!(".save.tmp-{}", dead_pid()));
    std::fs::create_dir(&staging).unwrap();
    std::fs::rename(out.join("adapter_config.json"), staging.join("adapter_config.json")).unwrap();
    std::fs::write(staging.join(".peftkit-complete"), "adapter_model.safetensors\nadapter_config.json").unwrap();
    // An earlier run is there: a plain `train` refuses, after finishing the save it found.
    let o = bin().arg("train").arg(&recipe).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("adapter_config.json"), "{}", stderr(&o));
    assert_eq!(std::fs::read(out.join("adapter_config.json")).unwrap(), cfg);
    assert!(temporaries(&out).is_empty(), "{:?}", temporaries(&out));
}

#[test]
fn merge_into_an_output_another_process_holds_exits_2_and_cleans_a_killed_merges_leftovers() {
    let d = tempfile::tempdir().unwrap();
    let merged = d.path().join("merged");
    let merge = || {
        let mut c = bin();
        c.arg("merge").arg("--base").arg(common::fixture("tiny-llama"));
        c.arg("--adapter").arg(common::fixture("tiny-llama/peft-lora")).arg("--out").arg(&merged).arg("--overwrite");
        c.output().unwrap()
    };
    // This test process holds the output's lock, as a running merge would.
    let lock = peftkit::outdir::OutputLock::sibling(&merged, "peftkit merge (test)").unwrap();
    let o = merge();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains(&format!("pid {}", std::process::id())), "{}", stderr(&o));
    assert!(!merged.exists());
    drop(lock);
    // A merge killed while swapping an old output for the new one: the old one aside, the new one unfinished.
    let o = merge();
    assert!(o.status.success(), "{}", stderr(&o));
    let want = std::fs::read(merged.join("model.safetensors")).unwrap();
    let dead = dead_pid();
    std::fs::rename(&merged, d.path().join(format!(".merged.old-{dead}"))).unwrap();
    std::fs::create_dir(d.path().join(format!(".merged.tmp-{dead}"))).unwrap();
    std::fs::write(d.path().join(format!(".merged.tmp-{dead}/config.json")), b"{").unwrap();
    let o = merge();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("restored"), "{}", stderr(&o));
    let left: Vec<String> =
        std::fs::read_dir(d.path()).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into()).collect();
    assert_eq!(left, ["merged"]);
    assert_eq!(std::fs::read(merged.join("model.safetensors")).unwrap(), want);
}
