#!/bin/bash
# Installs vback for operators: the daemons and tools (blkback, netback, cdrom, usbback, bridge,
# vmm-min, vbctl, vbimg), stripped, into $PREFIX/bin (default /usr/local), and netback's hotplug
# scripts into $SCRIPT_DIR (default /etc/vback/scripts). DESTDIR stages the whole tree elsewhere
# (packaging, tests). Running it again is safe: existing scripts that differ are kept as *.orig.
#   scripts/install.sh                 # build (release) and install
#   DESTDIR=/tmp/stage scripts/install.sh --no-build
# PROFILE=debug installs target/debug's binaries instead of target/release's.

set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=${PREFIX:-/usr/local}
SCRIPT_DIR=${SCRIPT_DIR:-/etc/vback/scripts}
DESTDIR=${DESTDIR:-}
PROFILE=${PROFILE:-release}   # which target/<profile> to install from
BUILD=1
for a in "$@"; do
  case "$a" in
    --no-build) BUILD=0 ;;
    -h|--help) sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $a (see --help)" >&2; exit 2 ;;
  esac
done
BINS=(blkback netback cdrom usbback bridge vmm-min vbctl vbimg)
if [ "$BUILD" = 1 ]; then
  (cd "$ROOT" && cargo build --profile "${PROFILE/debug/dev}" --locked $(printf -- '-p %s ' blkback netback cdrom usbback bridge vmm-min vbctl vbimg))
fi
install -d "$DESTDIR$PREFIX/bin" "$DESTDIR$SCRIPT_DIR"
for b in "${BINS[@]}"; do
  src="$ROOT/target/$PROFILE/$b"
  [ -x "$src" ] || { echo "install.sh: $src is missing; run without --no-build" >&2; exit 1; }
  # Stripped: the debug information is most of an unstripped binary's size.
  install -s -m 0755 "$src" "$DESTDIR$PREFIX/bin/$b"
done
for s in "$ROOT"/netback/scripts/*; do
  dst="$DESTDIR$SCRIPT_DIR/$(basename "$s")"
  if [ -e "$dst" ] && ! cmp -s "$s" "$dst"; then
    cp -p "$dst" "$dst.orig"
    echo "install.sh: kept your $dst as $dst.orig" >&2
  fi
  mode=0755; case "$s" in *.sh) mode=0644 ;; esac
  install -m "$mode" "$s" "$dst"
done
echo "installed ${BINS[*]} into $DESTDIR$PREFIX/bin and the hotplug scripts into $DESTDIR$SCRIPT_DIR"
