//! Build script. Always: exports the locked versions of the numerics crates (`PEFTKIT_<CRATE>_VERSION`, read from
//! Cargo.lock) for the model cards' "Framework versions". With the `cuda` feature it also compiles each CUDA kernel
//! source in [`KERNELS`] (the NF4 kernels `src/quant/cuda/nf4.cu`, the training primitives `src/ops/cuda/*.cu`) to
//! one PTX file with nvcc.
//!
//! The PTX targets the virtual architecture `compute_80` (override: `PEFTKIT_CUDA_ARCH`), so one file runs on every
//! GPU from Ampere (sm_80) on: the driver JIT-compiles it for the actual device (H100/H200: sm_90) when the module
//! is first loaded. The outputs are `$OUT_DIR/<stem>.ptx` (`nf4.ptx`, `rms_norm.ptx`, …), embedded with
//! `include_str!` by `src/quant/cuda/kernels.rs` and `src/ops/cuda/mod.rs`.
//!
//! nvcc is looked up as `$NVCC`, then `$CUDA_ROOT/bin/nvcc`, `$CUDA_PATH/bin/nvcc`, `$CUDA_HOME/bin/nvcc`, then on
//! `PATH`. A missing nvcc or a kernel that does not compile fails the build with nvcc's own message. Without the
//! `cuda` feature this script does nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The CUDA kernel sources, each with one entry point its PTX must contain (a quick check that nvcc compiled what
/// the Rust side loads; the tests check every entry point). Each becomes `$OUT_DIR/<file stem>.ptx`.
const KERNELS: [(&str, &str); 6] = [
    ("src/quant/cuda/nf4.cu", "nf4_dequant_bf16_double"),
    ("src/ops/cuda/rms_norm.cu", "rms_norm_bwd_bf16_f32"),
    ("src/ops/cuda/rope.cu", "rope_bf16"),
    ("src/ops/cuda/swiglu.cu", "swiglu_bwd_bf16"),
    ("src/ops/cuda/dropout.cu", "dropout_bf16"),
    ("src/ops/cuda/adamw.cu", "adamw_step_f32"),
];
/// Headers the kernel sources include (rebuild when they change).
const KERNEL_HEADERS: [&str; 1] = ["src/ops/cuda/common.cuh"];
const ENV_VARS: [&str; 5] = ["NVCC", "CUDA_ROOT", "CUDA_PATH", "CUDA_HOME", "PEFTKIT_CUDA_ARCH"];

/// Crates whose versions the model cards state, and the variable each is exported as.
const VERSIONED: [(&str, &str); 3] = [
    ("candle-core", "PEFTKIT_CANDLE_VERSION"),
    ("tokenizers", "PEFTKIT_TOKENIZERS_VERSION"),
    ("hf-hub", "PEFTKIT_HF_HUB_VERSION"),
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    for path in KERNELS.iter().map(|k| k.0).chain(KERNEL_HEADERS) {
        println!("cargo:rerun-if-changed={path}");
    }
    println!("cargo:rerun-if-changed=Cargo.lock");
    export_versions();
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    for var in ENV_VARS {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if let Err(msg) = compile_all() {
        // Cargo prints a failed build script's stderr in full: nvcc's diagnostics, without a Rust backtrace.
        eprintln!("peftkit build.rs (feature `cuda`): {msg}");
        std::process::exit(1);
    }
}

/// Sets `PEFTKIT_<CRATE>_VERSION` from Cargo.lock ("unknown" when the lock file is absent or lacks the crate;
/// with two versions of a crate locked, the newest).
fn export_versions() {
    let lock = std::fs::read_to_string("Cargo.lock").unwrap_or_default();
    for (krate, var) in VERSIONED {
        let mut best: Option<Vec<u64>> = None;
        let mut best_text = String::from("unknown");
        let mut lines = lock.lines();
        while let Some(line) = lines.next() {
            if line.trim() != format!("name = \"{krate}\"") {
                continue;
            }
            let Some(v) =
                lines.next().and_then(|l| l.trim().strip_prefix("version = \"")).map(|v| v.trim_end_matches('"'))
            else {
                continue;
            };
            let key: Vec<u64> = v.split(['.', '-']).map(|p| p.parse().unwrap_or(0)).collect();
            if best.as_ref().is_none_or(|b| key > *b) {
                best = Some(key);
                best_text = v.to_string();
            }
        }
        println!("cargo:rustc-env={var}={best_text}");
    }
}

fn compile_all() -> Result<(), String> {
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").ok_or("OUT_DIR is not set (not run by cargo?)")?);
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").ok_or("CARGO_MANIFEST_DIR is not set")?);
    let nvcc = find_nvcc()?;
    let arch = std::env::var("PEFTKIT_CUDA_ARCH").unwrap_or_else(|_| "compute_80".to_string());
    for (src, entry) in KERNELS {
        let src = manifest_dir.join(src);
        let stem =
            src.file_stem().and_then(|s| s.to_str()).ok_or_else(|| format!("{}: no file stem", src.display()))?;
        compile_ptx(&nvcc, &arch, &src, &out_dir.join(format!("{stem}.ptx")), entry)?;
    }
    Ok(())
}

/// Compiles `src` to `ptx` and checks that it defines `entry`.
fn compile_ptx(nvcc: &Path, arch: &str, src: &Path, ptx: &Path, entry: &str) -> Result<(), String> {
    let output = Command::new(nvcc)
        .arg("--ptx")
        .arg(format!("-arch={arch}"))
        // No --use_fast_math: the kernels must reproduce the CPU kernels' f32 roundings (they also use the explicit
        // __fmul_rn/__fadd_rn where a fused multiply-add would change a result).
        .args(["-O3", "-std=c++17", "-lineinfo"])
        .arg("-o")
        .arg(ptx)
        .arg(src)
        .output()
        .map_err(|e| format!("could not run {}: {e}", nvcc.display()))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(format!(
            "nvcc failed to compile {} ({}):\n{}{}",
            src.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            stderr
        ));
    }
    // nvcc warnings (not errors): surface them in cargo's output.
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        println!("cargo:warning=nvcc: {line}");
    }
    let text = std::fs::read_to_string(ptx).map_err(|e| format!("nvcc wrote no readable {}: {e}", ptx.display()))?;
    if !text.contains(&format!(".entry {entry}(")) {
        return Err(format!("{} lacks the expected kernel entry point {entry}", ptx.display()));
    }
    Ok(())
}

/// `$NVCC`, then `bin/nvcc` under `$CUDA_ROOT` / `$CUDA_PATH` / `$CUDA_HOME`, then the first `nvcc` on `PATH`.
fn find_nvcc() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("NVCC") {
        let p = PathBuf::from(p);
        return if is_file(&p) { Ok(p) } else { Err(format!("NVCC={} is not a file", p.display())) };
    }
    for var in ["CUDA_ROOT", "CUDA_PATH", "CUDA_HOME"] {
        if let Some(root) = std::env::var_os(var) {
            let p = PathBuf::from(root).join("bin").join("nvcc");
            if is_file(&p) {
                return Ok(p);
            }
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("nvcc");
            if is_file(&p) {
                return Ok(p);
            }
        }
    }
    Err("nvcc not found: set CUDA_ROOT (or CUDA_PATH / CUDA_HOME) to a CUDA toolkit, or put nvcc on PATH. \
         Without a system toolkit, scripts/cuda-toolkit.sh installs one (CUDA 13.0 from PyPI wheels) and prints \
         the variables to export."
        .to_string())
}

fn is_file(p: &Path) -> bool {
    p.metadata().map(|m| m.is_file()).unwrap_or(false)
}
