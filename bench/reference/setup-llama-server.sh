#!/usr/bin/env bash
# Builds llama.cpp's llama-server (CPU only) from the llama.cpp sources that
# ship inside the llama-cpp-python source distribution, and prints the
# binary's absolute path on stdout. Everything else goes to stderr.
#
#     bash bench/reference/setup-llama-server.sh        # ~15 min on 2 cores
#
# The pinned llama-cpp-python version is the one BENCHMARKS.md reports
# (0.3.36, which vendors llama.cpp 0c1e57098); override it with
# LLAMA_CPP_PYTHON_VERSION=x.y.z. The build lives in
# bench/reference/.llama-server/ (ignored by git):
#
#     venv/   cmake from pip, used only when no cmake >= 3.21 is on PATH
#     dl/     llama_cpp_python-VERSION.tar.gz
#     src/    the unpacked sdist
#     build/  cmake build tree; the binary is build/bin/llama-server
#
# Rerunning is cheap: if the binary exists and was configured with the same
# version and flags (see build/skillet-stamp), nothing is rebuilt.
#
# Flags: Release, static, GGML_NATIVE=OFF with an explicit x86-64 AVX-512
# set (GGML_NATIVE=ON picks instructions the VM's hypervisor does not pass
# through and dies with SIGILL), no OpenSSL, no web UI download, no tests or
# examples. Only the llama-server target is built, with -j2 under nice.
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
JOBS="${JOBS:-2}"
cd "$(dirname "$0")"
ROOT="$PWD/.llama-server"
mkdir -p "$ROOT/dl"
log() { echo "setup-llama-server: $*" >&2; }

# x86-64 feature set (shared with setup-llamacpp.sh).
source ./cpu-flags.sh
for f in avx512f avx512vbmi avx512_vnni avx512_bf16; do
  grep -qw "$f" /proc/cpuinfo || log "warning: this CPU lacks $f; the binary will not run here"
done

# --- cmake ---------------------------------------------------------------
cmake_ok() {
  local v
  v="$("$1" --version 2>/dev/null | head -n1 | sed -n 's/^cmake version \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')"
  [[ -n "$v" ]] || return 1
  set -- $v
  (( $1 > 3 || ($1 == 3 && $2 >= 21) ))
}
if command -v cmake >/dev/null && cmake_ok cmake; then
  CMAKE="$(command -v cmake)"
else
  if [[ ! -x "$ROOT/venv/bin/cmake" ]]; then
    log "no cmake >= 3.21 on PATH; installing the cmake package into $ROOT/venv"
    python3 -m venv "$ROOT/venv"
    "$ROOT/venv/bin/pip" install --quiet --disable-pip-version-check cmake >&2
  fi
  CMAKE="$ROOT/venv/bin/cmake"
fi
export PATH="$(dirname "$CMAKE"):$PATH"

# --- sources ---------------------------------------------------------------
TARBALL="$ROOT/dl/llama_cpp_python-$VERSION.tar.gz"
if [[ ! -f "$TARBALL" ]]; then
  log "downloading the llama-cpp-python $VERSION source distribution"
  # --no-binary for this package only: with ':all:' pip would also compile
  # the build backend's own cmake and ninja from source just to read the
  # package metadata.
  python3 -m pip download --quiet --disable-pip-version-check --no-deps \
    --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -d "$ROOT/dl" >&2
fi
SRC="$ROOT/src/llama_cpp_python-$VERSION"
LLAMA="$SRC/vendor/llama.cpp"
if [[ ! -f "$LLAMA/tools/server/CMakeLists.txt" ]]; then
  log "unpacking $TARBALL"
  rm -rf "$SRC"
  mkdir -p "$ROOT/src"
  tar -xzf "$TARBALL" -C "$ROOT/src"
fi
[[ -f "$LLAMA/tools/server/CMakeLists.txt" ]] || { log "no vendor/llama.cpp/tools/server in $TARBALL"; exit 1; }

# The sdist has no git history, so llama.cpp cannot find its own commit;
# take it from the changelog entry of this version
# ("update llama.cpp to ggml-org/llama.cpp@<commit>").
COMMIT="$(awk -v v="[$VERSION]" '$2 == v {on=1; next} /^## / {on=0} on' "$SRC/CHANGELOG.md" 2>/dev/null \
  | sed -n 's/.*llama\.cpp@\([0-9a-f]\{7,40\}\).*/\1/p' | head -n1)"
COMMIT="${COMMIT:-unknown}"

# --- configure and build ------------------------------------------------------
BUILD="$ROOT/build"
BIN="$BUILD/bin/llama-server"
CONFIG=(
  -DCMAKE_BUILD_TYPE=Release
  -DBUILD_SHARED_LIBS=OFF
  "${CPU_FLAGS[@]}"
  -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF -DGGML_RPC=OFF
  -DGGML_OPENMP=ON
  -DLLAMA_OPENSSL=OFF
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF
  -DGGML_BUILD_TESTS=OFF -DGGML_BUILD_EXAMPLES=OFF
  -DLLAMA_BUILD_COMMIT="$COMMIT" -DLLAMA_BUILD_NUMBER=0
)
STAMP="llama-cpp-python $VERSION llama.cpp $COMMIT ${CONFIG[*]}"
if [[ -x "$BIN" && -f "$BUILD/skillet-stamp" && "$(cat "$BUILD/skillet-stamp")" == "$STAMP" ]]; then
  log "up to date ($("$BIN" --version 2>&1 | grep -m1 -i version || true))"
  echo "$BIN"
  exit 0
fi
if [[ -f "$BUILD/skillet-stamp" && "$(cat "$BUILD/skillet-stamp")" != "$STAMP" ]]; then
  log "version or flags changed; starting from a clean build tree"
  rm -rf "$BUILD"
fi
mkdir -p "$BUILD"
log "configuring llama.cpp $COMMIT (llama-cpp-python $VERSION) with $CMAKE"
nice -n 19 "$CMAKE" -S "$LLAMA" -B "$BUILD" "${CONFIG[@]}" >&2
log "building llama-server with -j$JOBS (10-20 minutes on 2 cores)"
nice -n 19 "$CMAKE" --build "$BUILD" --config Release --target llama-server -j "$JOBS" >&2
[[ -x "$BIN" ]] || { log "build finished but $BIN is missing"; exit 1; }
echo "$STAMP" > "$BUILD/skillet-stamp"
log "built: $("$BIN" --version 2>&1 | grep -m1 -i version || true)"
echo "$BIN"
