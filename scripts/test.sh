#!/usr/bin/env bash
# The full test suite, as CI runs it: fetch the default model (the real-model
# tests need it), then build in release (tensor math is ~20x slower
# unoptimized) and run every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== default model" >&2
scripts/fetch-model.sh >/dev/null
echo "== tests (release build)" >&2
cargo test --release --workspace --locked --no-fail-fast "$@"
