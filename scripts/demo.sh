#!/usr/bin/env bash
# The main job, for now: fetch SmolLM2-135M-Instruct (Q4_1 GGUF), build
# skillet, show what the model is, and chat with it (streamed; greedy for
# factual prompts, seeded sampling for an open-ended one).
# Later, this becomes: fine-tune on the bundled example, show before/after.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL="$(scripts/fetch-model.sh)"
cargo build --release --locked --quiet
SKILLET=target/release/skillet

"$SKILLET" inspect "$MODEL"

ask() {
  echo
  echo ">>> $1    [${*:2}]"
  "$SKILLET" generate --model "$MODEL" --chat --prompt "$1" --max-tokens 96 "${@:2}"
}
ask "What is the capital of France?" --temperature 0
ask "Give me three tips for writing clear code." --temperature 0
# Small models loop under greedy decoding on open-ended prompts; sample instead.
ask "Write a haiku about autumn." --temperature 0.7 --top-p 0.9 --seed 1
