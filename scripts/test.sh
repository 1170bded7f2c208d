#!/usr/bin/env bash
# scripts/test.sh: run vback's whole test suite on a fresh machine (this is what .ci/run runs).
#
#   scripts/test.sh            setup (idempotent), format and lint checks, build, all tests
#   scripts/test.sh -- ARGS    extra arguments for `cargo test` (e.g. -- -p vback-common)
#
# Tests that boot guests need QEMU 10 and the cached guest image: scripts/setup.sh provides both
# and a test fails (never skips) when they are missing.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
EXTRA=()
if [ "${1:-}" = "--" ]; then shift; EXTRA=("$@"); fi

T0=$SECONDS
step() { echo "== $* ($((SECONDS - T0)) s)" >&2; }

step "setup: host packages and the guest image"
scripts/setup.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo build (the binaries the end-to-end tests start)"
cargo build --workspace --bins --locked

step "fuzz targets: build and a smoke run"
scripts/fuzz.sh smoke 200000

step "cargo test"
cargo test --workspace --locked "${EXTRA[@]}"

step "done"
