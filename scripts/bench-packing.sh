#!/usr/bin/env bash
# Sample packing against one chat per row, on the quickstart recipe (recipes/smollm2-135m-lora.yaml) and its packed
# copy (recipes/smollm2-135m-lora-packed.yaml): ROUNDS rounds, each running the unpacked then the packed recipe for a
# few optimizer steps (about the same number of tokens: a packed step holds ~3 times the chats), without the
# validation set. Prints each run's summary line: tokens/s over the optimizer steps (supervised + context tokens,
# padding excluded) and the padding fraction.
#
#   usage: scripts/bench-packing.sh [ROUNDS=3]   (PLAIN_STEPS=9 PACKED_STEPS=3 MODEL=<the GGUF of fetch-smollm2.sh>)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
PLAIN_STEPS=${PLAIN_STEPS:-9}
PACKED_STEPS=${PACKED_STEPS:-3}
MODEL=${MODEL:-$(scripts/fetch-smollm2.sh)}
PEFTKIT=${PEFTKIT:-target/release/peftkit}
for round in $(seq 1 "$ROUNDS"); do
  for kind in plain packed; do
    if [[ $kind == plain ]]; then recipe=recipes/smollm2-135m-lora.yaml steps=$PLAIN_STEPS
    else recipe=recipes/smollm2-135m-lora-packed.yaml steps=$PACKED_STEPS; fi
    line=$($PEFTKIT train "$recipe" --overwrite --set base_model="$MODEL" --set data.validation=null \
      --set training.max_steps="$steps" --set output.dir="target/bench-packing/$kind" 2>/dev/null | grep '^training steps:')
    echo "round $round $kind ($steps steps): $line"
  done
done
