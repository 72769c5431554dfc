//! Build script. Always: exports the locked versions of the numerics crates (`PEFTKIT_<CRATE>_VERSION`, read from
//! Cargo.lock) for the model cards' "Framework versions". With the `cuda` feature it also compiles the NF4 CUDA kernels (`src/quant/cuda/nf4.cu`) to PTX with nvcc.
//!
//! The PTX targets the virtual architecture `compute_80` (override: `PEFTKIT_CUDA_ARCH`), so one file runs on every
//! GPU from Ampere (sm_80) on: the driver JIT-compiles it for the actual device (H100/H200: sm_90) when the module
//! is first loaded. The output is `$OUT_DIR/nf4.ptx`, embedded by `src/quant/cuda/kernels.rs` with `include_str!`.
//!
//! nvcc is looked up as `$NVCC`, then `$CUDA_ROOT/bin/nvcc`, `$CUDA_PATH/bin/nvcc`, `$CUDA_HOME/bin/nvcc`, then on
//! `PATH`. A missing nvcc or a kernel that does not compile fails the build with nvcc's own message. Without the
//! `cuda` feature this script does nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

const KERNEL_SRC: &str = "src/quant/cuda/nf4.cu";
const ENV_VARS: [&str; 5] = ["NVCC", "CUDA_ROOT", "CUDA_PATH", "CUDA_HOME", "PEFTKIT_CUDA_ARCH"];

/// Crates whose versions the model cards state, and the variable each is exported as.
const VERSIONED: [(&str, &str); 3] = [
    ("candle-core", "PEFTKIT_CANDLE_VERSION"),
    ("tokenizers", "PEFTKIT_TOKENIZERS_VERSION"),
    ("hf-hub", "PEFTKIT_HF_HUB_VERSION"),
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={KERNEL_SRC}");
    println!("cargo:rerun-if-changed=Cargo.lock");
    export_versions();
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    for var in ENV_VARS {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if let Err(msg) = compile_ptx() {
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

fn compile_ptx() -> Result<(), String> {
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").ok_or("OUT_DIR is not set (not run by cargo?)")?);
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").ok_or("CARGO_MANIFEST_DIR is not set")?);
    let src = manifest_dir.join(KERNEL_SRC);
    let ptx = out_dir.join("nf4.ptx");
    let nvcc = find_nvcc()?;
    let arch = std::env::var("PEFTKIT_CUDA_ARCH").unwrap_or_else(|_| "compute_80".to_string());

    let output = Command::new(&nvcc)
        .arg("--ptx")
        .arg(format!("-arch={arch}"))
        // No --use_fast_math: the kernels must reproduce the CPU codec's f32 roundings exactly (they also use the
        // explicit __fmul_rn/__fadd_rn where a fused multiply-add would change a result).
        .args(["-O3", "-std=c++17", "-lineinfo"])
        .arg("-o")
        .arg(&ptx)
        .arg(&src)
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
    let text = std::fs::read_to_string(&ptx).map_err(|e| format!("nvcc wrote no readable {}: {e}", ptx.display()))?;
    if !text.contains(".entry nf4_dequant_bf16_double") {
        return Err(format!("{} lacks the expected kernel entry points", ptx.display()));
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
