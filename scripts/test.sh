#!/usr/bin/env bash
# The whole test suite: Rust tests (unit, property, and end-to-end tests that start the real
# `switchyard serve`), then the official `openai` Python client against the same binary.
# Exits non-zero on any failure. Respects CARGO_TARGET_DIR; the Python environment lives in
# SWITCHYARD_TEST_VENV (created on first use, packages pinned).
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
VENV="${SWITCHYARD_TEST_VENV:-$HOME/.cache/switchyard/test-venv}"
REQUIREMENTS=tests/openai/requirements.txt

cargo test --workspace --locked

# The CUDA backend cannot run here, but it must keep compiling (nothing CUDA is needed to
# build it: cudarc loads the libraries at run time).
cargo check --locked -p switchyard --features cuda

# `cargo test` already built the debug binary for the end-to-end tests; this only makes
# sure of it (a no-op when up to date).
cargo build --locked -p switchyard
export SWITCHYARD_BIN="$TARGET_DIR/debug/switchyard"

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# Installs only what is missing or at another version than pinned.
if ! "$VENV/bin/python" - "$REQUIREMENTS" <<'PY' >/dev/null 2>&1
import sys
from importlib.metadata import version
for line in open(sys.argv[1]):
    name, want = line.strip().split("==")
    assert version(name) == want, line
PY
then
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$REQUIREMENTS"
fi

"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/openai
