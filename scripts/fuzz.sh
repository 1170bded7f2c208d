#!/usr/bin/env bash
# scripts/fuzz.sh: vback's fuzz targets (fuzz/, its own cargo workspace).
#
#   scripts/fuzz.sh build              build every target (a plain build; CI does this)
#   scripts/fuzz.sh smoke [RUNS]       build, then run each target on its seed corpus plus RUNS
#                                      random inputs (default 20000; no coverage guidance)
#   scripts/fuzz.sh run TARGET [SECS]  coverage-guided fuzzing with cargo-fuzz (installs it if
#                                      missing; works on stable with -s none)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT/fuzz"
targets() { sed -n 's/^name = "\(.*\)"/\1/p' Cargo.toml | grep -v '^vback-fuzz$'; }
case ${1:-build} in
  build) cargo build -q --bins ;;
  smoke)
    cargo build -q --bins
    for t in $(targets); do
      mkdir -p "corpus/$t"
      echo "fuzz smoke: $t" >&2
      "target/debug/$t" -runs="${2:-20000}" -seed=1 "corpus/$t" "corpus-seed/$t" 2>&1 | tail -2
    done ;;
  run)
    t=${2:?usage: scripts/fuzz.sh run TARGET [SECONDS]}
    command -v cargo-fuzz >/dev/null || cargo install -q cargo-fuzz
    mkdir -p "corpus/$t"
    cargo fuzz run -s none "$t" "corpus/$t" "corpus-seed/$t" -- -max_total_time="${3:-60}" ;;
  *) echo "usage: scripts/fuzz.sh build|smoke [RUNS]|run TARGET [SECONDS]" >&2; exit 2 ;;
esac
