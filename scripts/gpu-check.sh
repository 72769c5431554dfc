#!/usr/bin/env bash
# Every GPU check of peftkit, for a GPU machine that has no Rust toolchain (see shared/scripts/gpu-run.md).
#
#   scripts/gpu-check.sh build        here (CUDA toolkit, no GPU needed): builds the release binary and the GPU test
#                                     binaries with `--features cuda` and packs them, compressed, into .gpu/
#                                     (git-ignored; what the device machine's run must carry, < 64 MiB)
#   scripts/gpu-check.sh run [QUICK]  there: the GPU tests with PEFTKIT_REQUIRE_GPU=1 (a missing GPU fails them),
#                                     then the benchmarks; every result is one JSON line on stdout, progress on
#                                     stderr. QUICK=1 skips the 8B-shape training benchmarks. Under 10 minutes.
#
# The JSON lines: {"check": "gpu", …} names the GPU; {"check": "tests", "binary": …, "passed": N, "failed": M};
# then `peftkit bench --json` lines (dequant, gemv, training for QLoRA and LoRA at the Llama-3.1-8B shape) and a
# final {"check": "summary", …} with the issue's targets evaluated.
set -euo pipefail
cd "$(dirname "$0")/.."
GPU_DIR=.gpu

build() {
  local prefix=${PEFTKIT_CUDA_TOOLKIT:-$HOME/.cache/cuda13}
  if ! command -v nvcc >/dev/null 2>&1; then
    scripts/cuda-toolkit.sh "$prefix" >&2
    export CUDA_ROOT=$prefix PATH=$prefix/bin:$PATH LIBRARY_PATH=$prefix/lib64${LIBRARY_PATH:+:$LIBRARY_PATH}
  fi
  export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
  cargo build --locked --release --features cuda >&2
  # The test binaries: the library's unit tests (every op's GPU test) and tests/gpu.rs (the whole model).
  local list
  list=$(cargo test --locked --release --features cuda --no-run --lib --test gpu --message-format=json |
    python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        kind = m["target"]["kind"][0]
        print(("lib" if kind == "lib" else m["target"]["name"]) + " " + m["executable"])
')
  rm -rf "$GPU_DIR"
  mkdir -p "$GPU_DIR"
  strip -o "$GPU_DIR/peftkit" "${CARGO_TARGET_DIR:-target}/release/peftkit"
  while read -r name exe; do
    strip -o "$GPU_DIR/test-$name" "$exe"
  done <<<"$list"
  xz -T2 -6 "$GPU_DIR"/peftkit "$GPU_DIR"/test-*
  cp tests/fixtures/llama-3.1-8b-config.json "$GPU_DIR/"
  git rev-parse HEAD >"$GPU_DIR/commit"
  # The tests find their fixtures under the path the crate was built at (env!("CARGO_MANIFEST_DIR")).
  pwd >"$GPU_DIR/manifest_dir"
  du -ch "$GPU_DIR"/* >&2
  local total
  total=$(du -cb "$GPU_DIR"/* | tail -1 | cut -f1)
  if ((total > 60 * 1024 * 1024)); then
    echo "gpu-check build: $GPU_DIR is $((total / 1024 / 1024)) MiB, over the 64 MiB a device run carries" >&2
    exit 1
  fi
}

run() {
  local quick=${1:-0}
  [[ -d $GPU_DIR ]] || { echo "gpu-check run: no $GPU_DIR; run 'scripts/gpu-check.sh build' on the build machine" >&2; exit 2; }
  local bin=/tmp/peftkit-gpu
  rm -rf "$bin"
  mkdir -p "$bin"
  for f in "$GPU_DIR"/*.xz; do
    xz -dc "$f" >"$bin/$(basename "$f" .xz)"
    chmod +x "$bin/$(basename "$f" .xz)"
  done
  # CUDA 13 runtime libraries: PyTorch's install carries them (gpu-run.md).
  local lib
  lib=$(dirname "$(find / -name 'libcublas.so.13' 2>/dev/null | head -1)" 2>/dev/null || true)
  for extra in libcurand.so.10 libcudart.so.13; do
    local d
    d=$(dirname "$(find / -name "$extra" 2>/dev/null | head -1)" 2>/dev/null || true)
    [[ -n $d && $d != . ]] && lib=$lib:$d
  done
  export LD_LIBRARY_PATH=$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  if ldd "$bin/peftkit" | grep 'not found' >&2; then
    echo "gpu-check run: libraries missing (above); LD_LIBRARY_PATH=$LD_LIBRARY_PATH" >&2
    exit 1
  fi
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader |
    python3 -c 'import json,sys; n,d,m=[s.strip() for s in sys.stdin.readline().split(",")]; print(json.dumps({"check":"gpu","name":n,"driver":d,"memory":m,"commit":open(".gpu/commit").read().strip()}))' ||
    echo '{"check": "gpu", "error": "nvidia-smi failed"}'

  # The test binaries look for tests/fixtures under the build machine's checkout path: point it here.
  local built_at
  built_at=$(cat "$GPU_DIR/manifest_dir")
  if [[ ! -e $built_at/tests/fixtures ]]; then
    mkdir -p "$(dirname "$built_at")" && ln -sfn "$PWD" "$built_at" || echo "gpu-check run: cannot link $built_at to $PWD; fixture tests will fail" >&2
  fi
  export PEFTKIT_REQUIRE_GPU=1
  local failed=0
  for t in "$bin"/test-*; do
    local name log
    name=$(basename "$t")
    log=/tmp/$name.log
    echo "== $name" >&2
    # Test binaries resolve fixtures relative to the repository root (the working directory here).
    if timeout 300 "$t" --test-threads 1 >"$log" 2>&1; then :; else failed=1; fi
    grep -E '^test .* (FAILED|ok)$|panicked|SKIPPED|^(QLoRA|LoRA)' "$log" | grep -v ' ok$' >&2 || true
    python3 - "$name" "$log" <<'EOF'
import json, re, sys
text = open(sys.argv[2]).read()
m = re.findall(r"test result: \w+\. (\d+) passed; (\d+) failed", text)
passed = sum(int(a) for a, _ in m); failed = sum(int(b) for _, b in m)
fails = re.findall(r"^test (\S+) \.\.\. FAILED", text, re.M)
print(json.dumps({"check": "tests", "binary": sys.argv[1], "passed": passed, "failed": failed, "failures": fails,
                  "completed": bool(m)}))
EOF
  done

  local pk="$bin/peftkit"
  timeout 120 "$pk" bench --device cuda --dequant --json || failed=1
  timeout 120 "$pk" bench --device cuda --gemv --json || failed=1
  if [[ $quick != 1 ]]; then
    local cfg=$GPU_DIR/llama-3.1-8b-config.json
    local common=(bench --device cuda --dtype bf16 --config "$cfg" --seq 2048 --batch 1 --rank 16 --steps 3 --json)
    timeout 240 "$pk" "${common[@]}" --qlora --gradient-checkpointing | tee /tmp/qlora.json || failed=1
    timeout 240 "$pk" "${common[@]}" --gradient-checkpointing | tee /tmp/lora.json || failed=1
    python3 - <<'EOF' || true
import json
def last(p):
    try:
        return json.loads(open(p).read().strip().splitlines()[-1])
    except Exception:
        return {}
q, l = last("/tmp/qlora.json"), last("/tmp/lora.json")
out = {"check": "summary"}
if q.get("peak_gpu_mb") is not None:
    out["qlora_8b_peak_gpu_gb"] = q["peak_gpu_mb"] / 1000
    out["qlora_8b_peak_within_12gb"] = q["peak_gpu_mb"] <= 12000
if q.get("tokens_per_s") and l.get("tokens_per_s"):
    out["qlora_overhead_over_lora"] = l["tokens_per_s"] / q["tokens_per_s"] - 1
    out["qlora_overhead_within_15pct"] = out["qlora_overhead_over_lora"] <= 0.15
print(json.dumps(out))
EOF
  fi
  exit $failed
}

case ${1:-} in
  build) build ;;
  run) run "${2:-0}" ;;
  *) echo "usage: scripts/gpu-check.sh build | run [QUICK=1]" >&2; exit 2 ;;
esac
