#!/bin/bash
# Installs vback for operators (docs/operations.md lists every file it installs):
#   PREFIX/bin                 blkback netback cdrom usbback bridge vmm-min vbctl vbimg, stripped
#   PREFIX/lib/systemd/system  vback-{blk,net,cd}@.service and their vhost-user and control sockets
#   PREFIX/lib/sysusers.d      vback.conf (the user the blk and cd units run as)
#   PREFIX/share/man           man pages, generated from the binaries' options
#   PREFIX/share/{bash-completion,zsh,fish}  shell completions, generated likewise
#   PREFIX/share/doc/vback     operations.md and example unit configurations
#   QEMU_DIR                   vhost-user descriptors for QEMU/libvirt (/usr/share/qemu/vhost-user
#                              with --prefix /usr, else /etc/qemu/vhost-user: both are searched)
#   SCRIPT_DIR                 hotplug scripts (/etc/vback/scripts): vif-* and block*
#   /etc/vback/{blk,net,cd}    where the units' instance configurations go (left empty)
# Options and environment:
#   --prefix DIR (or PREFIX=DIR)  default /usr/local
#   DESTDIR=DIR                   stage the whole tree under DIR (packaging, tests)
#   --no-build                    install what target/PROFILE has; PROFILE=debug for target/debug
# Running it again is safe and gives the same tree; a hotplug script you changed is kept as
# NAME.orig before it is replaced.
#   scripts/install.sh                                   # build (release) and install
#   DESTDIR=/tmp/stage scripts/install.sh --prefix /usr --no-build

set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=${PREFIX:-/usr/local}
SCRIPT_DIR=${SCRIPT_DIR:-/etc/vback/scripts}
DESTDIR=${DESTDIR:-}
PROFILE=${PROFILE:-release}   # which target/<profile> to install from
BUILD=1
while [ $# -gt 0 ]; do
  case "$1" in
    --no-build) BUILD=0 ;;
    --prefix) [ $# -ge 2 ] || { echo "install.sh: --prefix needs a directory" >&2; exit 2; }; PREFIX=$2; shift ;;
    --prefix=*) PREFIX=${1#--prefix=} ;;
    -h|--help) sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$PREFIX" in /*) ;; *) echo "install.sh: --prefix must be an absolute path, not $PREFIX" >&2; exit 2 ;; esac
PREFIX=${PREFIX%/}
BINDIR=$PREFIX/bin
UNITDIR=$PREFIX/lib/systemd/system
SYSUSERSDIR=$PREFIX/lib/sysusers.d
MANDIR=$PREFIX/share/man
DOCDIR=$PREFIX/share/doc/vback
if [ "$PREFIX" = /usr ]; then QEMU_DIR=${QEMU_DIR:-/usr/share/qemu/vhost-user}; else QEMU_DIR=${QEMU_DIR:-/etc/qemu/vhost-user}; fi
BASH_DIR=$PREFIX/share/bash-completion/completions
ZSH_DIR=$PREFIX/share/zsh/vendor-completions
FISH_DIR=$PREFIX/share/fish/vendor_completions.d

BINS=(blkback netback cdrom usbback bridge vmm-min vbctl vbimg)
if [ "$BUILD" = 1 ]; then
  (cd "$ROOT" && cargo build --profile "${PROFILE/debug/dev}" --locked $(printf -- '-p %s ' "${BINS[@]}"))
fi
for b in "${BINS[@]}"; do
  [ -x "$ROOT/target/$PROFILE/$b" ] || { echo "install.sh: $ROOT/target/$PROFILE/$b is missing; run without --no-build" >&2; exit 1; }
done

D() { echo "$DESTDIR$1"; }
install -d "$(D "$BINDIR")" "$(D "$SCRIPT_DIR")" "$(D "$UNITDIR")" "$(D "$SYSUSERSDIR")" \
  "$(D "$MANDIR/man1")" "$(D "$MANDIR/man8")" "$(D "$DOCDIR/examples")" "$(D "$QEMU_DIR")" \
  "$(D "$BASH_DIR")" "$(D "$ZSH_DIR")" "$(D "$FISH_DIR")" \
  "$(D /etc/vback/blk)" "$(D /etc/vback/net)" "$(D /etc/vback/cd)" \
  "$(D "$SCRIPT_DIR/block-pre.d")" "$(D "$SCRIPT_DIR/block-post.d")" "$(D "$SCRIPT_DIR/vif-post.d")"

# Binaries, stripped: the debug information is most of an unstripped binary's size.
for b in "${BINS[@]}"; do
  install -s -m 0755 "$ROOT/target/$PROFILE/$b" "$(D "$BINDIR/$b")"
done

# Man pages and completions, from each binary's own option definitions.
gen=$(mktemp -d)
trap 'rm -rf "$gen"' EXIT
for b in "${BINS[@]}"; do
  VBACK_GENERATE_DOCS="$gen" "$ROOT/target/$PROFILE/$b" >/dev/null
done
for s in 1 8; do
  for f in "$gen/man/man$s"/*."$s"; do
    [ -e "$f" ] && install -m 0644 "$f" "$(D "$MANDIR/man$s")/"
  done
done
install -m 0644 "$gen"/completions/bash/* "$(D "$BASH_DIR")/"
install -m 0644 "$gen"/completions/zsh/* "$(D "$ZSH_DIR")/"
install -m 0644 "$gen"/completions/fish/* "$(D "$FISH_DIR")/"

# Files with the installation's paths filled in.
subst() { # SRC DST MODE
  sed -e "s|@BINDIR@|$BINDIR|g" -e "s|@SCRIPTDIR@|$SCRIPT_DIR|g" -e "s|@DOCDIR@|$DOCDIR|g" "$1" > "$gen/subst"
  install -m "$3" "$gen/subst" "$2"
}
for u in "$ROOT"/packaging/systemd/*; do
  subst "$u" "$(D "$UNITDIR/$(basename "$u")")" 0644
done
install -m 0644 "$ROOT/packaging/sysusers.d/vback.conf" "$(D "$SYSUSERSDIR/vback.conf")"
for j in "$ROOT"/packaging/qemu/vhost-user/*.json; do
  subst "$j" "$(D "$QEMU_DIR/$(basename "$j")")" 0644
done
install -m 0644 "$ROOT/docs/operations.md" "$(D "$DOCDIR/operations.md")"
install -m 0644 "$ROOT"/packaging/conf/*.conf "$(D "$DOCDIR/examples")/"

# Hotplug scripts: netback's vif scripts and blkback's vbd scripts.
for s in "$ROOT"/netback/scripts/* "$ROOT"/scripts/hotplug/*; do
  dst=$(D "$SCRIPT_DIR/$(basename "$s")")
  if [ -e "$dst" ] && ! cmp -s "$s" "$dst"; then
    cp -p "$dst" "$dst.orig"
    echo "install.sh: kept your $dst as $dst.orig" >&2
  fi
  mode=0755; case "$s" in *.sh) mode=0644 ;; esac
  install -m "$mode" "$s" "$dst"
done
echo "installed vback into ${DESTDIR:-/} (prefix $PREFIX, hotplug scripts in $SCRIPT_DIR, QEMU descriptors in $QEMU_DIR)"
if [ -z "$DESTDIR" ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  systemd-sysusers "$SYSUSERSDIR/vback.conf" || echo "install.sh: systemd-sysusers failed: create the user vback by hand" >&2
  systemctl daemon-reload || true
fi
