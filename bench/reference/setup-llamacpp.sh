#!/usr/bin/env bash
# Creates bench/reference/.venv-llamacpp with llama-cpp-python from PyPI,
# which compiles llama.cpp from source (several minutes on 2 cores) with
# the explicit CPU options of cpu-flags.sh, and prints its python's path.
# A venv built with other options (an older GGML_NATIVE=ON build, which
# can die with SIGILL on a VM) is rebuilt.
set -euo pipefail
cd "$(dirname "$0")"
source ./cpu-flags.sh
STAMP="${CPU_FLAGS[*]}"
if [[ ! -x .venv-llamacpp/bin/python || "$(cat .venv-llamacpp/skillet-stamp 2>/dev/null)" != "$STAMP" ]]; then
  rm -rf .venv-llamacpp
  python3 -m venv .venv-llamacpp
  CMAKE_ARGS="${CPU_FLAGS[*]}" .venv-llamacpp/bin/pip install --quiet --disable-pip-version-check \
    --no-cache-dir llama-cpp-python==0.3.36 numpy >&2
  echo "$STAMP" > .venv-llamacpp/skillet-stamp
fi
echo "$PWD/.venv-llamacpp/bin/python"
