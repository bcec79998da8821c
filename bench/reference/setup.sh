#!/usr/bin/env bash
# Creates bench/reference/.venv with the reference stack from PyPI
# (PyTorch, transformers, PEFT, TRL, gguf, bitsandbytes) and prints its python's path.
set -euo pipefail
cd "$(dirname "$0")"
if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
  # Pinned to the versions BENCHMARKS.md's tables were measured with, so a
  # fresh machine compares against the same stack.
  .venv/bin/pip install --quiet --disable-pip-version-check torch==2.15.0 transformers==5.23.0 \
    peft==0.21.2 trl==1.16.0 gguf==0.19.0 accelerate==1.15.0 bitsandbytes==0.50.2 >&2
fi
echo "$PWD/.venv/bin/python"
