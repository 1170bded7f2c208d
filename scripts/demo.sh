#!/usr/bin/env bash
# scripts/demo.sh: on a fresh machine, install what is needed, then boot a throw-away Linux guest
# with a disk served by blkback and a NIC served by netback (bridged, in network namespaces), and
# show the guest using them: fio with crc32c verification, ext4, an online resize, ping and
# iperf3 to a "LAN host"; then the guest's data read back on the host and both daemons' counters.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
scripts/setup.sh
cargo build --workspace --bins --locked -q
exec cargo run -q --locked -p vback-tests --bin vback-demo -- "$@"
