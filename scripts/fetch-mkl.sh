#!/usr/bin/env bash
# Puts Intel's MKL (oneMKL 2026.2.0, Intel Simplified Software License,
# from the PyPI wheel `mkl`, about 220 MB to download, 440 MB unpacked) into
# the cache and prints the path of its libmkl_rt. Optional: Skillet opens it
# at run time where it is there and, shape by shape, lets it multiply the
# f32 products it measures faster than the built-in `gemm` (see
# BENCHMARKS.md); without it nothing changes. Idempotent.
#
#   SKILLET_CACHE   cache root (default: ~/.cache/skillet)
#   PYTHON          python interpreter with pip (default: python3)
set -euo pipefail

PACKAGE="mkl==2026.2.0"
SHA256="eaab1875ce9f47ab3c66d5632cef06baf768c05781f2f28847bdbc4343500ed7"
# The runtime dispatcher, the LP64 interface, the core, the sequential
# layer and the per-CPU kernels it loads (the threaded layers are not used).
LIBS=(rt intel_lp64 core sequential def mc3 avx2 avx512 avx10)
CACHE="${SKILLET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/skillet}"
DEST="$CACHE/mkl/lib"
PY="${PYTHON:-python3}"

say() { echo "fetch-mkl: $*" >&2; }

if [[ -f "$DEST/libmkl_rt.so.3" ]] && [[ -f "$DEST/.complete" ]]; then
  echo "$DEST/libmkl_rt.so.3"
  exit 0
fi
if [[ "$(uname -sm)" != "Linux x86_64" ]]; then
  say "error: MKL's wheel is for Linux on x86-64 only (Skillet keeps its built-in GEMM)"
  exit 1
fi
if ! command -v "$PY" >/dev/null 2>&1; then
  say "error: '$PY' not found; install Python 3 with pip (or set PYTHON=/path/to/python)"
  exit 1
fi
if ! "$PY" -m pip --version >/dev/null 2>&1; then
  say "error: pip is not available for '$PY'; install it (or set PYTHON=/path/to/python)"
  exit 1
fi

mkdir -p "$CACHE/mkl"
TMP="$(mktemp -d "$CACHE/mkl/.fetch.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

say "downloading $PACKAGE with pip (about 220 MB)"
"$PY" -m pip download --quiet --no-deps --no-cache-dir --disable-pip-version-check -d "$TMP" "$PACKAGE" >&2
WHEEL="$(ls "$TMP"/*.whl 2>/dev/null | head -n1 || true)"
if [[ -z "$WHEEL" ]]; then
  say "error: pip did not produce a wheel for $PACKAGE"
  exit 1
fi
GOT="$(sha256sum "$WHEEL" | cut -d' ' -f1)"
if [[ "$GOT" != "$SHA256" ]]; then
  say "error: checksum mismatch for $(basename "$WHEEL") (got $GOT, expected $SHA256)"
  exit 1
fi
mkdir -p "$TMP/lib"
"$PY" - "$WHEEL" "$TMP/lib" "${LIBS[@]}" <<'PY'
import os, shutil, sys, zipfile
wheel, out, *libs = sys.argv[1:]
wanted = {f"libmkl_{l}.so.3" for l in libs}
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        base = os.path.basename(name)
        if base in wanted or name == "mkl-2026.2.0.dist-info/LICENSE.txt":
            with z.open(name) as src, open(os.path.join(out, base), "wb") as dst:
                shutil.copyfileobj(src, dst)
            wanted.discard(base)
if wanted:
    sys.exit(f"fetch-mkl: missing from the wheel: {sorted(wanted)}")
PY
touch "$TMP/lib/.complete"
rm -rf "$DEST"
mv -T "$TMP/lib" "$DEST"
say "saved $DEST"
echo "$DEST/libmkl_rt.so.3"
