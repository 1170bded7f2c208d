# Shared by vback's vif-bridge, vif-route and vif-nat (sourced, not run).
#
# netback runs `SCRIPT online` after it has created the tap and `SCRIPT offline` before it
# removes it. The interface is in $vif; the other parameters come in the environment: bridge,
# ip (space separated), mac, domain, domid (when the domain is a number), devid, mode, mtu.
# Exit status 0 means connected (Xen's hotplug-status); anything else is an error, and the last
# line on stderr is the message netback reports (Xen's hotplug-error). Everything printed on
# stderr goes to netback's log.
set -u
export PATH=/usr/sbin:/sbin:/usr/bin:/bin:$PATH

command=${1:-${command:-}}

fatal() {
    echo "$*" >&2
    exit 1
}

log() {
    echo "$*" >&2
}

# sysctl keys spell the '.' of interface names as '/'.
sysctl_if() { # FAMILY KIND IFNAME KEY VALUE
    sysctl -qw "net.$1.$2.$(echo "$3" | tr . /).$4=$5" || fatal "cannot set net.$1.$2.$3.$4"
}

case "$command" in
    online | offline | add | remove) ;;
    *) fatal "unknown action '$command': $(basename "$0") takes online or offline" ;;
esac
[ -n "${vif:-}" ] || fatal "\$vif is not set (netback sets it; by hand: vif=NAME $0 $command)"
if [ "$command" = online ] || [ "$command" = add ]; then
    ip link show dev "$vif" >/dev/null 2>&1 || fatal "interface $vif does not exist"
fi
ip=${ip:-}
devid=${devid:-0}

set_mtu() {
    if [ -n "${mtu:-}" ]; then
        ip link set dev "$vif" mtu "$mtu" || fatal "cannot set the MTU of $vif to $mtu"
    fi
}

# Xen's hook directories: every executable <dir>/vif-post.d/*.hook runs after a successful
# action, with the same environment.
call_hooks() {
    local h
    for h in "$(dirname "$0")"/vif-post.d/*.hook; do
        [ -x "$h" ] && "$h" "$command"
    done
    return 0
}
