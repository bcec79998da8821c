#!/usr/bin/env bash
# Creates bench/reference/.venv-llamacpp with llama-cpp-python from PyPI,
# which compiles llama.cpp from source for this CPU (several minutes on 2
# cores), and prints its python's path.
set -euo pipefail
cd "$(dirname "$0")"
if [[ ! -x .venv-llamacpp/bin/python ]]; then
  python3 -m venv .venv-llamacpp
  CMAKE_ARGS="-DGGML_NATIVE=ON" .venv-llamacpp/bin/pip install --quiet --disable-pip-version-check llama-cpp-python numpy >&2
fi
echo "$PWD/.venv-llamacpp/bin/python"
