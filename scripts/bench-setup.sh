#!/usr/bin/env bash
# scripts/bench-setup.sh: install what `vback-bench net` needs: dpdk-testpmd (DPDK 22.11 from
# Debian bookworm) with its virtio_user and vhost PMDs, into $DPDK_DIR (default
# /var/tmp/vback-dpdk, shared by every checkout on the machine). Not part of scripts/test.sh.
#
#   scripts/bench-setup.sh          install (idempotent: a second run checks and returns)
#   scripts/bench-setup.sh --check  only check; exit 1 with a message if something is missing
#
# Debian's `dpdk` package has no testpmd; it is in `dpdk-dev`, whose dependencies
# (librte-net-mlx5-23 -> rdma-core -> udev) would upgrade systemd. So this installs `dpdk` and
# testpmd's runtime libraries, then extracts the testpmd binary from dpdk-dev's .deb and
# librte_net_mlx5 from its .deb into $DPDK_DIR, without installing either package.
# Afterwards: LD_LIBRARY_PATH=$DPDK_DIR/lib $DPDK_DIR/dpdk-testpmd ...
set -euo pipefail
DPDK_DIR=${DPDK_DIR:-/var/tmp/vback-dpdk}
export DEBIAN_FRONTEND=noninteractive

# testpmd's runtime libraries (its DT_NEEDED closure in DPDK 22.11), mlx5 excepted.
PKGS=(dpdk librte-ethdev23 librte-eal23 librte-kvargs23 librte-telemetry23 librte-net23
      librte-mbuf23 librte-mempool23 librte-ring23 librte-meter23 librte-cmdline23
      librte-crypto-scheduler23 librte-cryptodev23 librte-rcu23 librte-bus-vdev23
      librte-reorder23 librte-bitratestats23 librte-metrics23 librte-bpf23 librte-gro23
      librte-gso23 librte-latencystats23 librte-pdump23 librte-pcapng23 librte-net-bnxt23
      librte-bus-pci23 librte-pci23 librte-net-i40e23 librte-hash23 librte-net-ixgbe23
      librte-security23 librte-bus-dpaa23 librte-common-dpaax23 librte-eventdev23
      librte-timer23 librte-mempool-dpaa23 librte-net-dpaa23 librte-net-bond23 librte-sched23
      librte-ip-frag23 librte-net-ice23 librte-common-iavf23 librte-common-mlx5-23
      librte-bus-auxiliary23 librte-net-vhost23 librte-net-virtio23 librte-mempool-ring23
      librte-vhost23 libnuma1 libfdt1 libjansson4 libbsd0 libelf1 libpcap0.8 libibverbs1)

log() { echo "bench-setup: $*" >&2; }
die() { echo "bench-setup: error: $*" >&2; exit 1; }

testpmd_ok() {
  [ -x "$DPDK_DIR/dpdk-testpmd" ] &&
    LD_LIBRARY_PATH=$DPDK_DIR/lib ldd "$DPDK_DIR/dpdk-testpmd" >/dev/null 2>&1 &&
    ! LD_LIBRARY_PATH=$DPDK_DIR/lib ldd "$DPDK_DIR/dpdk-testpmd" | grep -q 'not found'
}

apt_retry() {
  local i
  for i in $(seq 1 30); do
    if apt-get "$@"; then return 0; fi
    log "apt-get $* failed (attempt $i), retrying in 10 s (another process may hold the dpkg lock)"
    sleep 10
  done
  die "apt-get $* kept failing"
}

if testpmd_ok; then
  log "dpdk-testpmd ready in $DPDK_DIR"
  exit 0
fi
if [ "${1:-}" = --check ]; then
  die "dpdk-testpmd is missing or cannot load its libraries in $DPDK_DIR: run scripts/bench-setup.sh"
fi
[ "$(id -u)" = 0 ] || die "installing packages needs root (run as root or with sudo)"
mkdir -p "$DPDK_DIR/lib"
cd "$DPDK_DIR"
log "installing dpdk and testpmd's runtime libraries"
apt_retry update -qq
apt_retry install -y -qq --no-install-recommends --no-upgrade "${PKGS[@]}"
work=$(mktemp -d "$DPDK_DIR/debs.XXXXXX")
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt_retry -o APT::Sandbox::User=root download dpdk-dev librte-net-mlx5-23)
dpkg-deb -x "$work"/dpdk-dev_*.deb "$work/dev"
dpkg-deb -x "$work"/librte-net-mlx5-23_*.deb "$work/mlx5"
install -m 0755 "$work/dev/usr/bin/dpdk-testpmd" "$DPDK_DIR/dpdk-testpmd"
cp -L "$work"/mlx5/usr/lib/x86_64-linux-gnu/librte_net_mlx5.so.23.* "$DPDK_DIR/lib/librte_net_mlx5.so.23"
if LD_LIBRARY_PATH=$DPDK_DIR/lib ldd "$DPDK_DIR/dpdk-testpmd" | grep 'not found'; then
  die "dpdk-testpmd still misses the libraries above"
fi
log "dpdk-testpmd ready in $DPDK_DIR"
