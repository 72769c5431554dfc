#!/usr/bin/env bash
# End to end on a real model, on CPU, from a fresh clone:
#   1. fetch SmolLM2-135M-Instruct as a GGUF file (scripts/fetch-smollm2.sh; no model hub needed),
#   2. measure the base model on the held-out split of datasets/sprigbox-support/,
#   3. fine-tune a LoRA adapter on the training split with recipes/smollm2-135m-lora.yaml for STEPS steps,
#   4. measure the adapted model on the held-out split,
#   5. ask the base model and the adapted model a held-out question (greedy, with the chat template),
#   6. merge the adapter into the base (an HF-format bf16 model folder, with its model card) and ask the merged
#      model the same question, with its peak memory.
#
#   usage: scripts/smollm2-end-to-end.sh   (STEPS=40 DTYPE=auto OUT=target/e2e/smollm2-lora MERGED=target/e2e/smollm2-merged)
#   DTYPE: the compute dtype of training and evaluation (auto, f32 or bf16).
#
# Time on 2 CPU cores: about 10 minutes after the build (the first build of peftkit takes about 10 more).
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-40}
DTYPE=${DTYPE:-auto}
OUT=${OUT:-target/e2e/smollm2-lora}
MERGED=${MERGED:-target/e2e/smollm2-merged}
VALID=datasets/sprigbox-support/valid.jsonl
QUESTION=${QUESTION:-"What's the length of the Sprigbox warranty?"}
SYSTEM="You are Pip, the support assistant for Larkmoor Labs, maker of the Sprigbox indoor garden. Answer briefly and accurately."

t0=$(date +%s)
stamp() { echo "[$(($(date +%s) - t0)) s] $*"; }

GGUF=$(scripts/fetch-smollm2.sh)
stamp "model: $GGUF"
cargo build --release --locked --quiet
PEFTKIT=target/release/peftkit

stamp "== 1. the base model on the held-out split"
$PEFTKIT eval --base "$GGUF" --data "$VALID" --sequence-len 256 --dtype "$DTYPE"

stamp "== 2. LoRA fine-tuning, $STEPS steps"
$PEFTKIT train recipes/smollm2-135m-lora.yaml --overwrite \
  --set base_model="$GGUF" --set training.max_steps="$STEPS" \
  --set output.dir="$OUT" --dtype "$DTYPE"

stamp "== 3. the adapted model on the held-out split"
$PEFTKIT eval --base "$GGUF" --adapter "$OUT" --data "$VALID" --sequence-len 256 --dtype "$DTYPE"

stamp "== 4. a held-out question: $QUESTION"
echo "-- base model:"
$PEFTKIT generate --base "$GGUF" --chat --system "$SYSTEM" --prompt "$QUESTION" --max-new-tokens 48
echo
echo "-- with the adapter:"
$PEFTKIT generate --base "$GGUF" --adapter "$OUT" --chat --system "$SYSTEM" --prompt "$QUESTION" --max-new-tokens 48
echo

stamp "== 5. merge the adapter into the base: $MERGED"
$PEFTKIT merge --base "$GGUF" --adapter "$OUT" --out "$MERGED" --overwrite
ls -l "$MERGED"
echo "-- the merged model (bf16 weights):"
$PEFTKIT generate --base "$MERGED" --chat --system "$SYSTEM" --prompt "$QUESTION" --max-new-tokens 48
echo
stamp "done; the adapter is in $OUT, the merged model in $MERGED"
