#!/usr/bin/env bash
# scripts/demo.sh: on a fresh machine, install what is needed, then boot a throw-away Linux guest
# with a vhost-user-blk disk served by a backend daemon and show the guest using it (fio with
# crc32c verification, and the guest's data read back on the host).
#
# Until blkback serves disks, the backend is qemu-storage-daemon (the reference).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
scripts/setup.sh
cargo build --workspace --bins --locked -q
exec cargo run -q --locked -p vback-tests --bin vback-demo -- "$@"
