#!/usr/bin/env bash
# A headless browser for the web page's test: Debian's chromium and its
# driver, and a Python environment with selenium to drive them. Prints the
# environment's python on stdout. Idempotent: what is installed is reused.
#
#   SKILLET_CACHE   cache root (default: ~/.cache/skillet)
#   PYTHON          python interpreter with venv and pip (default: python3)
set -euo pipefail

PACKAGE="selenium==4.27.1"
CACHE="${SKILLET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/skillet}"
VENV="$CACHE/venv-browser"
PY="${PYTHON:-python3}"

say() { echo "browser-env: $*" >&2; }

if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  SUDO=""
  if [[ "$(id -u)" != 0 ]]; then SUDO="sudo"; fi
  say "installing chromium and chromium-driver (apt-get)"
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >&2
fi
if [[ -x "$VENV/bin/python" ]] && [[ "$(cat "$VENV/.installed" 2>/dev/null)" == "$PACKAGE" ]]; then
  echo "$VENV/bin/python"
  exit 0
fi
say "installing $PACKAGE into $VENV"
rm -rf "$VENV"
mkdir -p "$CACHE"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$PACKAGE" >&2
echo "$PACKAGE" > "$VENV/.installed"
echo "$VENV/bin/python"
