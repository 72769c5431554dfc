#!/usr/bin/env bash
# peftkit against HF PEFT on this machine, side by side: ROUNDS rounds (default 3), each running every
# configuration once in turn (alternating, so slow phases of a shared machine hit every side alike), then the
# median of each configuration's tokens/s and peak RSS, as a Markdown table with the CPU named.
#
#   usage: scripts/bench-vs-peft.sh [ROUNDS]
#   needs: a release build (target/release/peftkit); a Python venv with torch, transformers, peft, safetensors
#          (PEFT_PY, default .venv-ref/bin/python; see ../shared/bench/README.md); the PEFT benchmark script
#          (PEFT_BENCH, default ../shared/bench/peft_cpu_bench.py).
#   workload: SmolLM2-135M's shape (tests/fixtures/smollm2-135m-config.json) with random weights, batch 4 x 256,
#          LoRA r=16 all-linear (QLoRA: the same on an NF4 base; IA3: k,v,down), 5 timed steps after a warm-up.
# Raw JSON lines go to $OUT (default target/bench-vs-peft.jsonl). SKIP="peft-bf16 …" leaves configurations out (torch's
# autocast bf16 takes minutes per step on a CPU without bf16 units).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
py=${PEFT_PY:-.venv-ref/bin/python}
bench=${PEFT_BENCH:-../shared/bench/peft_cpu_bench.py}
out=${OUT:-target/bench-vs-peft.jsonl}
cfg=tests/fixtures/smollm2-135m-config.json
bin=target/release/peftkit
[[ -x $bin ]] || { echo "build first: cargo build --release" >&2; exit 2; }
[[ -x $py ]] || { echo "no Python with PEFT at $py (set PEFT_PY)" >&2; exit 2; }
model=$(mktemp -d)
trap 'rm -rf "$model"' EXIT
# The PEFT side needs a model folder: random weights of the same shape, saved by transformers.
"$py" - "$cfg" "$model" <<'EOF'
import sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
torch.manual_seed(0)
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(sys.argv[1]), dtype=torch.float32).save_pretrained(sys.argv[2])
EOF
configs=(
  "peft-f32|$py $bench $model --batch 4 --seq 256 --rank 16 --steps 5"
  "peft-bf16|$py $bench $model --batch 4 --seq 256 --rank 16 --steps 5 --bf16"
  "peftkit-lora-f32|$bin bench --config $cfg --steps 5 --json --dtype f32"
  "peftkit-lora-bf16|$bin bench --config $cfg --steps 5 --json --dtype bf16"
  "peftkit-qlora-f32|$bin bench --config $cfg --steps 5 --json --dtype f32 --qlora"
  "peftkit-qlora-bf16|$bin bench --config $cfg --steps 5 --json --dtype bf16 --qlora"
  "peftkit-ia3-f32|$bin bench --config $cfg --steps 5 --json --dtype f32 --ia3"
  "peftkit-ia3-bf16|$bin bench --config $cfg --steps 5 --json --dtype bf16 --ia3"
)
: > "$out"
for r in $(seq 1 "$rounds"); do
  for c in "${configs[@]}"; do
    name=${c%%|*}; cmd=${c#*|}
    [[ " ${SKIP:-} " == *" $name "* ]] && continue
    line=$($cmd 2>/dev/null | tail -1)
    echo "{\"round\": $r, \"config\": \"$name\", \"result\": $line}" | tee -a "$out"
  done
done
python3 - "$out" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
cpu = next((r["result"].get("cpu") for r in rows if "cpu" in r["result"]), "?")
flags = next((r["result"].get("cpu_flags") for r in rows if "cpu_flags" in r["result"]), "?")
print(f"\nCPU: {cpu} [{flags}]; {max(r['round'] for r in rows)} rounds, medians\n")
print("| configuration | tokens/s (per round) | median tokens/s | median peak RSS MB |")
print("|---|---|---|---|")
med = {}
for name in dict.fromkeys(r["config"] for r in rows):
    rs = [r["result"] for r in rows if r["config"] == name]
    tps = [x["tokens_per_s"] for x in rs]
    med[name] = statistics.median(tps)
    print(f"| {name} | {', '.join(f'{t:.1f}' for t in tps)} | {med[name]:.1f} | {statistics.median(x['peak_rss_mb'] for x in rs):.0f} |")
best_peft = max(med.get("peft-f32", 0), med.get("peft-bf16", 0)) or float("nan")
if med.get("peft-f32"):
    print(f"\npeftkit f32 / PEFT f32: {med['peftkit-lora-f32'] / med['peft-f32']:.2f}x; "
          f"peftkit bf16 / best PEFT: {med['peftkit-lora-bf16'] / best_peft:.2f}x")
EOF
