# Shared by vback's vbd hotplug scripts (block, block-lvm; sourced, not run).
#
# blkback runs `SCRIPT add` before it opens the disk and `SCRIPT remove` after it has closed it,
# as Xen's toolstack runs /etc/xen/scripts/block. The disk comes in the environment:
#   params  the path (phy:/dev/vg0/alice -> /dev/vg0/alice), or what follows the uname's prefix
#   type    phy, file, qcow2, vmdk, null, ...
#   uname   the whole uname (phy:/dev/vg0/alice)
#   mode    r, w or w! (w! : writable without the sharing check)
#   vdev    the guest's device name (xvda), when the entry names one
#   domain  the guest, when blkback was given --domain
# Status, as Xen's hotplug-status: exit status 0 is `connected`; `fatal` prints the message on
# stderr (blkback's error message is the last stderr line) and exits 1 (`error`); `ebusy` also
# prints `hotplug-status=busy` on stdout (the device is in use elsewhere). Everything printed on
# stderr goes to blkback's log.
#
# Hooks, as Xen's <devtype>-<hook>.d: every executable block-pre.d/*.hook next to the script
# runs before the action and block-post.d/*.hook after a successful one, with the same
# environment and the action as $1; a failing pre hook fails the action.
set -u
export PATH=/usr/sbin:/sbin:/usr/bin:/bin:$PATH

command=${1:-${command:-}}

log() {
    echo "$*" >&2
}

fatal() {
    echo "$*" >&2
    exit 1
}

ebusy() {
    echo "hotplug-status=busy"
    echo "$*" >&2
    exit 1
}

call_hooks() { # pre|post
    local h
    for h in "$(dirname "$0")/block-$1.d"/*.hook; do
        [ -x "$h" ] || continue
        "$h" "$command" || fatal "hook $h $command failed"
    done
    return 0
}

case "$command" in
    add | remove) ;;
    *) fatal "unknown action '$command': $(basename "$0") takes add or remove" ;;
esac
[ -n "${params:-}" ] || fatal "\$params is not set (blkback sets it; by hand: type=phy params=/dev/DEVICE mode=w $0 $command)"
type=${type:-phy}
mode=${mode:-w}
