#!/usr/bin/env bash
# The main job, for now: fetch SmolLM2-135M-Instruct (Q4_1 GGUF), build
# skillet, show what the model is, and chat with it (streamed, greedy).
# Later, this becomes: fine-tune on the bundled example, show before/after.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL="$(scripts/fetch-model.sh)"
cargo build --release --locked --quiet
SKILLET=target/release/skillet

"$SKILLET" inspect "$MODEL"
for prompt in "What is the capital of France?" "Write a haiku about autumn." "Give me three tips for writing clear code."; do
  echo
  echo ">>> $prompt"
  "$SKILLET" generate --model "$MODEL" --chat --prompt "$prompt" --max-tokens 96
done
