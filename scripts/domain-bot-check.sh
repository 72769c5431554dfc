#!/usr/bin/env bash
# The domain-bot check (BENCHMARKS.md, "The demo adapter"): does the adapter in adapters/ know the Sprigbox facts
# that its base model cannot know? On the held-out split of datasets/sprigbox-support it measures, for the base
# model and for base + adapter:
#   - perplexity on valid.jsonl (assistant tokens, as training scores them);
#   - greedy answers to eval_questions.jsonl, each checked for the fact it must contain.
# It passes (exit 0) when the adapter's perplexity is at most 0.5x the base's, the adapter answers >= 70% of the
# questions with the expected fact and the base <= 20%; otherwise it exits 1. Every reply is written to
# $OUT/answers-{base,adapter}.jsonl.
#
#   scripts/domain-bot-check.sh [BASE [ADAPTER]]
#
# BASE defaults to the SmolLM2-135M-Instruct GGUF that scripts/fetch-smollm2.sh downloads (the demo adapter was
# trained on it); ADAPTER to adapters/smollm2-135m-lora. About 10 minutes on 2 cores after the release build.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${1:-$HOME/.cache/peftkit-models/SmolLM2-135M-Instruct.Q4_1.gguf}
# The default GGUF is a copy of this Hub model, which the demo adapter names as its base.
BASE_ID=()
[[ $# -eq 0 ]] && BASE_ID=(--base-model-id HuggingFaceTB/SmolLM2-135M-Instruct)
ADAPTER=${2:-adapters/smollm2-135m-lora}
DATA=datasets/sprigbox-support
OUT=${OUT:-target/domain-bot-check}
mkdir -p "$OUT"
if [[ "$BASE" == *.gguf && ! -f "$BASE" ]]; then
  echo "fetching SmolLM2-135M-Instruct (GGUF) with scripts/fetch-smollm2.sh" >&2
  scripts/fetch-smollm2.sh >&2
fi
cargo build --release --quiet
PEFTKIT=target/release/peftkit

measure() { # name, extra flags…
  local name=$1; shift
  "$PEFTKIT" eval --base "$BASE" "${BASE_ID[@]}" "$@" --data "$DATA/valid.jsonl" --sequence-len 256 \
    --questions "$DATA/eval_questions.jsonl" --answers "$OUT/answers-$name.jsonl" --json | tail -n 1
}
field() { # json, key → number
  sed -E "s/.*\"$2\":([-0-9.eE+]+).*/\1/" <<<"$1"
}

echo "base:    $BASE" >&2
base=$(measure base)
echo "adapter: $ADAPTER" >&2
adapted=$(measure adapter --adapter "$ADAPTER")

awk -v bp="$(field "$base" perplexity)" -v ap="$(field "$adapted" perplexity)" \
    -v bc="$(field "$base" correct)" -v ac="$(field "$adapted" correct)" -v n="$(field "$adapted" total)" '
BEGIN {
  ratio = ap / bp; bacc = bc / n; aacc = ac / n
  printf "held-out perplexity: base %.3f, adapter %.3f, ratio %.3f (needs <= 0.5)\n", bp, ap, ratio
  printf "questions answered with the expected fact: base %d/%d (%.1f%%, needs <= 20%%), adapter %d/%d (%.1f%%, needs >= 70%%)\n", bc, n, 100 * bacc, ac, n, 100 * aacc
  ok = ratio <= 0.5 && aacc >= 0.70 && bacc <= 0.20 && n >= 20
  print (ok ? "PASS" : "FAIL")
  exit (ok ? 0 : 1)
}'
