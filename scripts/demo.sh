#!/usr/bin/env bash
# The main job: fetch SmolLM2-135M-Instruct (Q4_1 GGUF), build skillet, and
# fine-tune a LoRA adapter on the bundled example task (extract name, age
# and city from a sentence as JSON; examples/contacts). Prints the report:
# held-out exact match, loss and perplexity, and general-text perplexity
# (the forgetting check), base vs tuned. Then answers one held-out
# question with the base model and with the adapter.
#
# Output: runs/contacts/ (adapter/ in PEFT format, report.md, loss.svg,
# metrics.jsonl, checkpoints/). About 10 minutes on 2 CPU cores.
#
#   scripts/demo.sh --model gemma3     the same on Gemma 3 270M (a name
#                                      scripts/fetch-model.sh knows, or a
#                                      model path); output in runs/contacts-<name>/
set -euo pipefail
cd "$(dirname "$0")/.."

NAME=""
if [[ "${1:-}" == "--model" ]]; then
  NAME="${2:?--model needs a model name or path}"
fi
case "$NAME" in
  "") MODEL="$(scripts/fetch-model.sh)"; OUT=runs/contacts ;;
  smollm2 | gemma3) MODEL="$(scripts/fetch-model.sh "$NAME")"; OUT="runs/contacts-$NAME" ;;
  *) MODEL="$NAME"; OUT="runs/contacts-$(basename "$NAME" .gguf)" ;;
esac
cargo build --release --locked --quiet
SKILLET=target/release/skillet

"$SKILLET" train examples/contacts/config.toml --set model="\"$MODEL\"" \
  --set output_dir="\"$OUT\"" --overwrite

QUESTION="Please welcome Grace Nasser, 31, who joins us from Seoul."
SYSTEM="Extract the person's name, age and city as JSON."
echo
echo ">>> $QUESTION"
echo "--- base model:"
"$SKILLET" generate --model "$MODEL" --chat --system "$SYSTEM" --prompt "$QUESTION" --max-tokens 48
echo "--- with the adapter:"
"$SKILLET" generate --model "$MODEL" --adapter "$OUT/adapter" --chat --system "$SYSTEM" --prompt "$QUESTION" --max-tokens 48
