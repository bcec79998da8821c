#!/usr/bin/env bash
# Creates bench/reference/.venv with the reference stack from PyPI
# (PyTorch, transformers, PEFT, gguf, bitsandbytes) and prints its python's path.
set -euo pipefail
cd "$(dirname "$0")"
if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check torch transformers peft gguf accelerate bitsandbytes >&2
fi
echo "$PWD/.venv/bin/python"
