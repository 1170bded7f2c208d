#!/usr/bin/env bash
# tests/guest/build.sh: build (or find cached) the test guest: a Debian kernel and an initramfs
# with busybox, a static fio, iperf3, mkfs.ext4, cdctl (CD ioctls), the virtio modules and vback's guest init.
#
#   tests/guest/build.sh [--rebuild]
#
# Prints one line on stdout: "KERNEL INITRAMFS" (absolute paths). Everything is cached under
# $VBACK_CACHE/guest (default: <repo>/.cache/guest); a second call returns at once.
# Env: KERNEL_FLAVOR = cloud-amd64 (default; no USB) | amd64 (generic; has xhci/usb-storage),
#      EXTRA_MODULES = more guest modules to load at boot (dependencies are resolved).
# Needs (scripts/setup.sh installs them): busybox-static, lz4, gcc, make, dpkg-dev, libaio-dev,
# zlib1g-dev, iperf3, and apt access to Debian's main archive (binary and source).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CACHE=${VBACK_CACHE:-$ROOT/.cache}/guest
FLAVOR=${KERNEL_FLAVOR:-cloud-amd64}
MODULES="virtio_pci virtio_blk virtio_net virtio_scsi sd_mod sr_mod sg isofs ${EXTRA_MODULES:-}"
REBUILD=${1:-}

log() { echo "guest-build: $*" >&2; }
die() { echo "guest-build: error: $*" >&2; exit 1; }

debian_mirror() {
  local uri
  uri=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [ -n "$uri" ] || uri=$(awk '$1=="deb"{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  [ -n "$uri" ] || die "cannot find the Debian mirror in the apt sources"
  echo "$uri"
}

# Download and unpack a Debian source package into $2 (a private deb-src list: the system's
# apt sources stay untouched).
fetch_source() {
  local pkg=$1 dir=$2
  rm -rf "$dir"; mkdir -p "$dir/apt/lists/partial"
  echo "deb-src $(debian_mirror) bookworm main" > "$dir/apt/sources.list"
  local o=(-o "Dir::Etc::sourcelist=$dir/apt/sources.list" -o Dir::Etc::sourceparts=-
           -o "Dir::State::lists=$dir/apt/lists" -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache=
           -o APT::Sandbox::User=root)
  ( cd "$dir" && apt-get "${o[@]}" update -qq && apt-get "${o[@]}" source -qq "$pkg" ) > "$dir/log" 2>&1 ||
    { cat "$dir/log" >&2; die "downloading the source of $pkg failed"; }
  ls -d "$dir/$pkg"-*/ | head -1
}

# Debian's fio links ~60 shared libraries (ceph, gluster, rdma...), which would make the initramfs
# slow to unpack under TCG: build a static one with the libaio and io_uring engines only.
build_fio() {
  local out=$CACHE/bin/fio
  [ -x "$out" ] && return 0
  log "building a static fio from Debian's source"
  local d=$CACHE/src-fio sd; sd=$(fetch_source fio "$d")
  ( cd "$sd" && ./configure --build-static --disable-native --disable-numa --disable-rdma \
      --disable-rados --disable-rbd --disable-http --disable-gfapi --disable-libnfs --disable-pmem \
      --disable-xnvme --disable-libzbc --disable-tcmalloc --disable-dfs --disable-lex &&
    make -j"$(nproc)" fio ) >> "$d/log" 2>&1 || { tail -30 "$d/log" >&2; die "fio build failed (log: $d/log)"; }
  mkdir -p "$CACHE/bin"; strip -o "$out.tmp" "$sd/fio" && mv "$out.tmp" "$out"; rm -rf "$d"
}

# iperf3 is Debian's binary with its shared libraries (libiperf, libcrypto, libsctp) copied
# next to the glibc runtime: the archive does not serve iperf3's source, so no static build.
copy_with_libs() {
  local root=$1 bin=$2 dest=$3 lib
  cp -L "$bin" "$root$dest"
  for lib in $(ldd "$bin" | awk '/=> \//{print $3} /^[ \t]*\/lib/{print $1}'); do
    [ -e "$root$lib" ] && continue
    mkdir -p "$root$(dirname "$lib")"; cp -L "$lib" "$root$lib"
  done
}

# The kernel package behind the linux-image-$FLAVOR metapackage: vmlinuz, config, modules; plus
# the uncompressed ELF vmlinux (QEMU boots it through the PVH entry: ~1 s faster under TCG).
fetch_kernel() {
  local kdir=$CACHE/kernel-$FLAVOR
  [ -f "$kdir/vmlinuz" ] && [ -z "$REBUILD" ] && return 0
  local pkg
  pkg=$(apt-cache depends "linux-image-$FLAVOR" 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')
  if [ -z "$pkg" ]; then
    apt-get update -qq >&2 || true
    pkg=$(apt-cache depends "linux-image-$FLAVOR" 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')
  fi
  [ -n "$pkg" ] || die "cannot resolve the package behind linux-image-$FLAVOR"
  log "downloading $pkg"
  rm -rf "$kdir"; mkdir -p "$kdir/dl"
  (cd "$kdir/dl" && apt-get download -qq "$pkg" >/dev/null) || die "apt-get download $pkg failed"
  dpkg -x "$kdir"/dl/*.deb "$kdir/x"
  cp "$kdir"/x/boot/vmlinuz-* "$kdir/vmlinuz"; cp "$kdir"/x/boot/config-* "$kdir/config"
  local off
  off=$(grep -abo $'\x02\x21\x4c\x18' "$kdir/vmlinuz" 2>/dev/null | head -1 | cut -d: -f1 || true)
  if [ -n "$off" ] && grep -q '^CONFIG_PVH=y' "$kdir/config"; then
    tail -c +$((off + 1)) "$kdir/vmlinuz" | lz4 -dc > "$kdir/vmlinux" 2>/dev/null || true
    [ "$(head -c4 "$kdir/vmlinux" 2>/dev/null)" = $'\x7fELF' ] || rm -f "$kdir/vmlinux"
  fi
  echo "$pkg" > "$kdir/package"; rm -rf "$kdir/dl"
}

# Module load order, dependencies first, from the .modinfo 'depends=' strings (no depmod needed).
resolve_modules() {
  local tree=$1; shift
  local -A seen=()
  local out=()
  visit() {
    local m=$1 p d
    [ -n "${seen[$m]:-}" ] && return 0
    seen[$m]=1
    p=$(find "$tree" \( -name "$m.ko" -o -name "${m//_/-}.ko" \) | head -1)
    [ -n "$p" ] || { log "module $m not found (built in?)"; return 0; }
    for d in $(tr '\0' '\n' < "$p" | sed -n 's/^depends=//p' | tr ',' ' '); do visit "$d"; done
    out+=("$p")
  }
  local m
  for m in "$@"; do visit "$m"; done
  printf '%s\n' "${out[@]}"
}

build_initramfs() {
  local kdir=$CACHE/kernel-$FLAVOR kver
  kver=$(ls "$kdir/x/lib/modules")
  local key
  key=$(cat "$HERE/init" "$HERE/vbcheck" "$HERE/cdctl.c" "$CACHE/bin/fio" /usr/bin/iperf3 /sbin/mke2fs /bin/busybox \
          <(echo "$kver $MODULES") | sha1sum | cut -c1-12)
  INITRAMFS=$CACHE/initramfs-$FLAVOR-$key.cpio
  [ -f "$INITRAMFS" ] && [ -z "$REBUILD" ] && return 0
  log "building $INITRAMFS"
  local r; r=$(mktemp -d "$CACHE/root.XXXXXX")
  mkdir -p "$r"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,run,root,harness,lib/modules,etc}
  cp /bin/busybox "$r/bin/busybox"
  local a
  for a in $(/bin/busybox --list); do [ -e "$r/bin/$a" ] || ln -s busybox "$r/bin/$a"; done
  cp "$CACHE/bin/fio" "$r/usr/bin/fio"
  # cdctl: the CD-ROM ioctls (eject, lock, status) the CD tests drive; busybox has no eject.
  gcc -static -O2 -o "$r/usr/bin/cdctl" "$HERE/cdctl.c" || die "building cdctl failed"
  cp "$HERE/init" "$r/init"; cp "$HERE/vbcheck" "$r/bin/vbcheck"; chmod +x "$r/init" "$r/bin/vbcheck"
  # The glibc runtime, so a dynamically linked test program (a Rust -gnu binary) runs in the guest.
  local lib
  for lib in $(ldd /bin/true | awk '/=> \//{print $3} /^[ \t]*\/lib/{print $1}') \
      /lib/x86_64-linux-gnu/libgcc_s.so.1 /lib/x86_64-linux-gnu/libm.so.6; do
    [ -e "$lib" ] || continue
    mkdir -p "$r$(dirname "$lib")"; cp -L "$lib" "$r$lib"
  done
  copy_with_libs "$r" /usr/bin/iperf3 /usr/bin/iperf3
  # mkfs.ext4 (e2fsprogs; busybox only makes ext2), with its configuration.
  copy_with_libs "$r" /sbin/mke2fs /sbin/mkfs.ext4
  cp /etc/mke2fs.conf "$r/etc/mke2fs.conf"
  : > "$r/lib/modules/load.order"
  local p
  for p in $(resolve_modules "$kdir/x/lib/modules/$kver" $MODULES); do
    cp "$p" "$r/lib/modules/"; basename "$p" >> "$r/lib/modules/load.order"
  done
  echo 'root:x:0:0:root:/root:/bin/sh' > "$r/etc/passwd"; echo 'root:x:0:' > "$r/etc/group"
  (cd "$r" && find . | /bin/busybox cpio -o -H newc -R 0:0 2>/dev/null) > "$INITRAMFS.tmp"
  rm -f "$CACHE"/initramfs-"$FLAVOR"-*.cpio; mv "$INITRAMFS.tmp" "$INITRAMFS"; rm -rf "$r"
}

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"; flock 9     # concurrent test binaries build once
[ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1 || die "/bin/busybox must be busybox-static (scripts/setup.sh)"
for t in lz4 /usr/bin/iperf3 /sbin/mke2fs gcc make; do command -v $t >/dev/null || die "$t is missing (run scripts/setup.sh)"; done
fetch_kernel
build_fio
build_initramfs
KERNEL=$CACHE/kernel-$FLAVOR/vmlinuz
[ -f "$CACHE/kernel-$FLAVOR/vmlinux" ] && KERNEL=$CACHE/kernel-$FLAVOR/vmlinux
echo "$KERNEL $INITRAMFS"
