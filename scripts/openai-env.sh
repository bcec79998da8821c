#!/usr/bin/env bash
# A Python environment with the official `openai` client, for the server
# tests that drive `skillet serve` the way users do. Prints the
# environment's python on stdout. Idempotent: an environment with the
# pinned version is reused.
#
#   SKILLET_CACHE   cache root (default: ~/.cache/skillet)
#   PYTHON          python interpreter with venv and pip (default: python3)
set -euo pipefail

PACKAGE="openai==3.54.0"
CACHE="${SKILLET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/skillet}"
VENV="$CACHE/venv-openai"
PY="${PYTHON:-python3}"

say() { echo "openai-env: $*" >&2; }

if [[ -x "$VENV/bin/python" ]] && [[ "$(cat "$VENV/.installed" 2>/dev/null)" == "$PACKAGE" ]]; then
  echo "$VENV/bin/python"
  exit 0
fi
if ! command -v "$PY" >/dev/null 2>&1; then
  say "error: '$PY' not found; install Python 3 with pip (or set PYTHON=/path/to/python)"
  exit 1
fi
say "installing $PACKAGE into $VENV"
rm -rf "$VENV"
mkdir -p "$CACHE"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$PACKAGE" >&2
echo "$PACKAGE" > "$VENV/.installed"
echo "$VENV/bin/python"
