#!/usr/bin/env bash
# scripts/setup.sh: make a fresh Debian 12 machine ready to build and test vback.
#
#   scripts/setup.sh            install host packages (once), then build the cached guest image
#   scripts/setup.sh --packages only the host packages
#   scripts/setup.sh --guest    only the guest kernel + initramfs (tests/guest/build.sh)
#
# Host packages come from Debian; QEMU 10 comes from bookworm-backports through a private apt
# sources list (a plain `apt-get install qemu-system-x86` pulls 7.2 and removes the preinstalled
# qemu-utils 10). Idempotent: a second run finds everything and returns in about a second.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${VBACK_CACHE:-$ROOT/.cache}
export DEBIAN_FRONTEND=noninteractive

# Debian packages the build and the tests use (the guest image build needs the first line).
PKGS=(busybox-static lz4 cpio gcc make dpkg-dev libaio-dev zlib1g-dev
      iperf3 iproute2 fio e2fsprogs util-linux systemd genisoimage nftables iputils-ping
      acpica-tools libvirt-clients libxml2-utils tmux)
# From bookworm-backports, matching the preinstalled qemu-utils 10.0.
BPO_PKGS=(qemu-system-x86 qemu-utils)

log() { echo "setup: $*" >&2; }
die() { echo "setup: error: $*" >&2; exit 1; }

debian_mirror() {
  local uri
  uri=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [ -n "$uri" ] || uri=$(awk '$1=="deb"{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  [ -n "$uri" ] || die "cannot find the Debian mirror in /etc/apt/sources.list.d/debian.sources"
  echo "$uri"
}

# apt-get with retries: another process may hold the dpkg lock for a while.
apt_retry() {
  local i
  for i in $(seq 1 30); do
    if apt-get "$@"; then return 0; fi
    log "apt-get $* failed (attempt $i), retrying in 10 s"
    sleep 10
  done
  die "apt-get $* kept failing"
}

qemu_ok() {
  command -v qemu-system-x86_64 >/dev/null &&
    qemu-system-x86_64 --version | grep -q 'version 10\.' &&
    command -v qemu-storage-daemon >/dev/null &&
    qemu-img --version | grep -q 'version 10\.'
}

packages_ok() {
  local p
  for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q 'install ok installed' || return 1
  done
  qemu_ok
}

install_packages() {
  if packages_ok; then log "host packages present"; return 0; fi
  [ "$(id -u)" = 0 ] || die "installing packages needs root (run as root or with sudo)"
  log "installing Debian packages: ${PKGS[*]}"
  apt_retry update -qq
  apt_retry install -y -qq --no-install-recommends "${PKGS[@]}"
  if ! qemu_ok; then
    local d=$CACHE/apt
    mkdir -p "$d/lists/partial" "$d/archives/partial"
    echo "deb $(debian_mirror) bookworm-backports main" > "$d/sources.list"
    local o=(-o "Dir::Etc::sourcelist=$d/sources.list" -o Dir::Etc::sourceparts=/etc/apt/sources.list.d
             -o "Dir::State::lists=$d/lists" -o "Dir::Cache::archives=$d/archives"
             -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache= -o APT::Sandbox::User=root)
    log "installing QEMU 10 from bookworm-backports: ${BPO_PKGS[*]}"
    apt_retry "${o[@]}" update -qq
    apt_retry "${o[@]}" install -y -qq --no-install-recommends --no-remove --no-upgrade \
      -t bookworm-backports "${BPO_PKGS[@]}"
    rm -rf "$d/archives"
  fi
  qemu_ok || die "QEMU 10 is still missing after the install (qemu-system-x86_64 --version: $(qemu-system-x86_64 --version 2>&1 | head -1))"
  log "host packages installed"
}

guest_image() {
  local paths
  paths=$("$ROOT/tests/guest/build.sh")
  log "guest image: $paths"
}

case ${1:-all} in
  --packages) install_packages ;;
  --guest) guest_image ;;
  all) install_packages; guest_image ;;
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' ;;
  *) die "unknown option $1 (see --help)" ;;
esac
