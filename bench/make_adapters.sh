#!/usr/bin/env bash
# Trains N small LoRA adapters for the serving benchmark (a few steps each
# on the bundled example, different seeds and targets, so each one is a
# real adapter with its own weights) into DIR/a1 ... DIR/aN.
#
#   bench/make_adapters.sh DIR [N=4] [SKILLET=target/release/skillet]
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:?usage: bench/make_adapters.sh DIR [N] [SKILLET]}
N=${2:-4}
SKILLET=${3:-target/release/skillet}
MODEL="$(scripts/fetch-model.sh)"
TARGETS=('["q_proj","v_proj"]' '["q_proj","k_proj","v_proj","o_proj"]' '"all-linear"' '["o_proj","down_proj"]')
mkdir -p "$DIR"
for i in $(seq 1 "$N"); do
  out="$DIR/run-a$i"
  cat > "$DIR/a$i.toml" <<TOML
model = "$MODEL"
output_dir = "$out"
seed = $i
[data]
train = "examples/contacts/train.jsonl"
validation = "examples/contacts/valid.jsonl"
max_seq_len = 128
[lora]
r = 8
alpha = 16
targets = ${TARGETS[$(( (i - 1) % 4 ))]}
[train]
max_steps = 3
batch_size = 8
lr = 2e-3
[eval]
generate = false
TOML
  "$SKILLET" train "$DIR/a$i.toml" --overwrite >/dev/null 2>&1
  rm -rf "$DIR/a$i"
  mv "$out/adapter" "$DIR/a$i"
  rm -rf "$out" "$DIR/a$i.toml"
  echo "$DIR/a$i"
done
