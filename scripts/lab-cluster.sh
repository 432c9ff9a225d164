# shellcheck shell=bash
# The several-host lab (`make lab-up HOSTS=3`): settings and helpers shared by lab-up, lab-down,
# lab-host-exec, lab-cut, fence_lab and lab-verify-down. Sourced by lab-common.sh; not executed.
# shellcheck disable=SC2034 # the variables are used by the scripts sourcing this
#
# Layout (hN = h1, h2, h3; N its number):
#
#   network namespace      what is in it
#   understudy-hN          host hN: bridge usbr0 (10.77.0.20N/24, service network) with the uplink
#                          veth `uplink`; `mgmt0` (10.78.0.N/24, management network); libvirtd,
#                          virtlockd, etcd, its guests' taps and QEMUs. Its processes also share a
#                          private mount namespace (tmpfs on /run/libvirt; /etc/libvirt,
#                          /var/lib/libvirt, /var/log/libvirt bound from $LAB_STATE/hosts/hN/)
#                          and a UTS namespace (hostname hN), kept alive by a holder process.
#   understudy-switch      bridge swbr0: one port per host uplink (up-hN), one for the client
#                          (up-client). `bridge fdb show br swbr0` says behind which port a MAC is.
#   understudy-mgmt        bridge mgbr0: ports mg-hN (hosts' mgmt0) and mg-client.
#   understudy-client      the test client: svc0 10.77.0.1/24 on the switch (the guests' gateway
#                          address, as in the one-host lab) and mgmt0 10.78.0.254/24.
#
# Shared storage (stands for NFS): $LAB_SHARED (/run/understudy-lab/shared), the same directory
# at the same path in every host; lockd/ is libvirt's lockspace (every host's virtlockd locks
# its files there, so a disk leased on one host is refused on another), disks/ holds the
# cluster guests' disks.

CLUSTER_ENV=$LAB_STATE/cluster.env
CLUSTER_HOSTS_DIR=$LAB_STATE/hosts
# The QEMU capabilities cache, bound over /var/cache/libvirt in every host: the first libvirtd
# probes QEMU once, the others (and every power-on) reuse it.
CLUSTER_CACHE=$LAB_STATE/cluster-cache
LAB_SHARED=$LAB_STATE/shared
LAB_SHARED_LOCKSPACE=$LAB_SHARED/lockd
LAB_SHARED_DISKS=$LAB_SHARED/disks

CLUSTER_NS_PREFIX=understudy-
SWITCH_NS=understudy-switch
SWITCH_BRIDGE=swbr0
SWITCH_BRIDGE_MAC=02:75:73:00:02:00
MGMT_NS=understudy-mgmt
MGMT_BRIDGE=mgbr0
CLIENT_NS=understudy-client
CLIENT_SERVICE_ADDR=10.77.0.1
CLIENT_MGMT_ADDR=10.78.0.254
CLIENT_MAC=02:75:73:00:03:01
SERVICE_PREFIX=10.77.0
MGMT_PREFIX=10.78.0
ETCD_CLIENT_PORT=2379
ETCD_PEER_PORT=2380
# Short etcd timings (LAB-NOTES): leases of 1 s are granted.
ETCD_HEARTBEAT_MS=50
ETCD_ELECTION_MS=500
# Argument 0 of every host's holder process, followed by the host's name.
HOST_HOLDER_TAG=understudy-lab-host-

# A host's name is h1..h9.
cluster_valid_host() { [[ ${1:-} =~ ^h[1-9]$ ]]; }
cluster_host_num() { echo "${1#h}"; }
host_ns() { echo "${CLUSTER_NS_PREFIX}$1"; }
host_dir() { echo "$CLUSTER_HOSTS_DIR/$1"; }
host_mgmt_addr() { echo "$MGMT_PREFIX.$(cluster_host_num "$1")"; }
host_service_addr() { echo "$SERVICE_PREFIX.$((200 + $(cluster_host_num "$1")))"; }
host_bridge_mac() { printf '02:75:73:00:01:%02x\n' "$(cluster_host_num "$1")"; }

# Names of the lab hosts whose network namespace exists, sorted (h1 h2 h3).
cluster_hosts() {
    local ns
    for ns in /run/netns/"${CLUSTER_NS_PREFIX}"h[1-9]; do
        [ -e "$ns" ] && echo "${ns##*/"$CLUSTER_NS_PREFIX"}"
    done
    return 0
}

# Every network namespace of the several-host lab that exists now.
cluster_namespaces() {
    local ns
    for ns in /run/netns/"${CLUSTER_NS_PREFIX}"h[1-9] /run/netns/"$SWITCH_NS" /run/netns/"$MGMT_NS" /run/netns/"$CLIENT_NS"; do
        [ -e "$ns" ] && echo "${ns##*/}"
    done
    return 0
}

# Succeeds when any part of a several-host lab is there.
cluster_exists() { [ -n "$(cluster_namespaces)" ] || [ -e "$CLUSTER_HOSTS_DIR" ] || [ -e "$CLUSTER_ENV" ]; }

# The pid of host $1's holder process (its namespaces' anchor), if it is alive.
host_holder_pid() {
    local pid
    pid=$(cat "$(host_dir "$1")/holder.pid" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] && pid_alive "$pid" || return 1
    # Guard against a recycled pid: the holder's argument 0 names its host.
    [ "$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | cut -d' ' -f1)" = "$HOST_HOLDER_TAG$1" ] || return 1
    echo "$pid"
}

# Succeeds when host $1 is powered on (its holder lives).
host_is_on() { host_holder_pid "$1" >/dev/null; }

# Every live process of host $1: in its network namespace or in its holder's mount namespace.
host_pids() {
    local netns mntns="" holder
    netns=$(stat -L -c %i "/run/netns/$(host_ns "$1")" 2>/dev/null) || return 0
    if holder=$(host_holder_pid "$1"); then
        mntns=$(stat -L -c %i "/proc/$holder/ns/mnt" 2>/dev/null || true)
    fi
    find /proc -mindepth 3 -maxdepth 3 -path '/proc/[0-9]*/ns/*' \( -name net -o -name mnt \) \
        -printf '%h %f %l\n' 2>/dev/null |
        awk -v net="net:[$netns]" -v mnt="mnt:[$mntns]" -v self="$$" '
            ($2 == "net" && $3 == net) || ($2 == "mnt" && $3 == mnt) {
                split($1, p, "/"); if (p[3] != self) print p[3]
            }' | sort -un
}

# Runs a command in host $1's network, mount and UTS namespaces, in the caller's directory.
host_exec() {
    local h=$1 pid
    shift
    pid=$(host_holder_pid "$h") || lab_die "lab host $h is not running (powered off, or no lab: make lab-up HOSTS=3)"
    exec nsenter --target "$pid" --net --mount --uts --wd="$PWD" -- "$@"
}

# Builds build/lab-reaper (scripts/lab-reaper.c) when it is missing or older than its source.
lab_build_reaper() {
    LAB_REAPER=$REPO_ROOT/build/lab-reaper
    if [ ! -x "$LAB_REAPER" ] || [ "$REPO_ROOT/scripts/lab-reaper.c" -nt "$LAB_REAPER" ]; then
        command -v gcc >/dev/null || lab_die "gcc not found; run make deps"
        mkdir -p "$REPO_ROOT/build"
        gcc -O2 -Wall -Wextra -o "$LAB_REAPER.tmp" "$REPO_ROOT/scripts/lab-reaper.c"
        mv -f "$LAB_REAPER.tmp" "$LAB_REAPER"
    fi
}

# The body of a host's holder process, run by `ip netns exec <host ns> unshare --uts`, which gives
# it the host's network namespace, a fresh mount namespace (a slave of the machine's, with /sys
# showing the host's interfaces) and its own UTS namespace. It mounts the host's private
# directories, writes its pid and becomes the holder; the mount namespace lives as long as it.
# shellcheck disable=SC2016 # the script is for the inner bash
HOST_HOLDER_SCRIPT='
set -e
h=$1 dir=$2
# `ip netns exec` mounted a new sysfs on /sys, hiding the cgroup hierarchies libvirtd and the
# daemons need: mount them again (same hierarchies, same options), parents first.
while read -r target fstype options; do
    [ -n "$target" ] || continue
    mkdir -p "$target" 2>/dev/null || true
    mount -t "$fstype" -o "$options" "$fstype" "$target" 2>/dev/null ||
        echo "host $h: could not mount $fstype on $target; continuing without it" >&2
done <<<"$3"
mount -t tmpfs -o mode=0755 tmpfs /run/libvirt
mount --bind "$dir/etc" /etc/libvirt
mount --bind "$dir/lib" /var/lib/libvirt
mount --bind "$dir/log" /var/log/libvirt
mount --bind "$4" /var/cache/libvirt
hostname "$h"
echo $$ >"$dir/holder.pid.tmp"
mv -f "$dir/holder.pid.tmp" "$dir/holder.pid"
exec -a "$5$h" sleep infinity
'

# Powers host $1 on: its holder (namespaces and private mounts), virtlockd, libvirtd (under
# lab-reaper, listening on TCP on its management address) and its etcd member (rejoining with
# its data directory). Waits until libvirtd answers; etcd's health is the caller's to wait for.
# Does nothing to a host that is on.
host_power_on() {
    local h=$1 dir ns holder sys_mounts i
    dir=$(host_dir "$h")
    ns=$(host_ns "$h")
    host_is_on "$h" && return 0
    [ -e "/run/netns/$ns" ] || lab_die "no network namespace $ns: the lab is not up (make lab-up HOSTS=3)"
    [ -d "$dir/etc" ] || lab_die "$dir/etc is missing: the lab is not up (make lab-up HOSTS=3)"
    lab_build_reaper
    # The host's NICs come back with its power.
    for link in lo usbr0 uplink mgmt0; do
        ip -n "$ns" link set "$link" up
    done
    rm -f "$dir/holder.pid" "$dir/libvirtd.pid" "$dir/virtlockd.pid"
    sys_mounts=$(findmnt --task 1 -rn -o TARGET,FSTYPE,OPTIONS | awk '$1 ~ "^/sys/."')
    # From the machine's own mount namespace where allowed (the caller may be inside another
    # host, e.g. a daemon's fence command), so that no other host's mounts lie under this
    # one's. Where pid 1 is out of reach (it may hold capabilities we lack), from the caller's:
    # the host's own mounts cover whatever lies below them.
    local root_mnt=()
    if nsenter --mount=/proc/1/ns/mnt true 2>/dev/null; then
        root_mnt=(nsenter --mount=/proc/1/ns/mnt --)
    fi
    setsid "${root_mnt[@]}" ip netns exec "$ns" unshare --uts -- /bin/bash -c "$HOST_HOLDER_SCRIPT" host-holder \
        "$h" "$dir" "$sys_mounts" "$CLUSTER_CACHE" "$HOST_HOLDER_TAG" </dev/null >>"$dir/host.log" 2>&1 &
    for i in $(seq 1 50); do
        holder=$(host_holder_pid "$h") && break
        sleep 0.1
    done
    [ -n "${holder:-}" ] || lab_die "host $h: its holder did not start (see $dir/host.log)"

    # virtlockd before libvirtd, which connects to it when it starts.
    LIBVIRT_LOG_OUTPUTS="3:file:$dir/virtlockd.log" \
        "$REPO_ROOT/scripts/lab-host-exec.sh" "$h" virtlockd -d -p "$dir/virtlockd.pid" </dev/null >>"$dir/host.log" 2>&1
    for i in $(seq 1 50); do
        [ -S "/proc/$holder/root/run/libvirt/virtlockd-sock" ] && break
        sleep 0.1
    done
    [ -S "/proc/$holder/root/run/libvirt/virtlockd-sock" ] || lab_die "host $h: virtlockd did not start (see $dir/virtlockd.log)"

    # Under lab-reaper, like the one-host lab's libvirtd (see scripts/lab-reaper.c).
    LIBVIRT_LOG_OUTPUTS="3:file:$dir/libvirtd.log" setsid \
        "$REPO_ROOT/scripts/lab-host-exec.sh" "$h" "$LAB_REAPER" libvirtd --listen --pid-file "$dir/libvirtd.pid" \
        </dev/null >>"$dir/libvirtd.out" 2>&1 &
    for i in $(seq 1 300); do
        [ -s "$dir/libvirtd.pid" ] && host_libvirt_answers "$h" && break
        sleep 0.1
    done
    host_libvirt_answers "$h" || lab_die "host $h: libvirtd did not answer within 30 s (see $dir/libvirtd.log)"

    host_etcd_start "$h"
}

# Succeeds when host $1's libvirtd answers on its local socket.
host_libvirt_answers() {
    local holder
    holder=$(host_holder_pid "$1") || return 1
    [ -S "/proc/$holder/root/run/libvirt/libvirt-sock" ] || return 1
    timeout 5 "$REPO_ROOT/scripts/lab-host-exec.sh" "$1" virsh -c qemu:///system version >/dev/null 2>&1
}

# Starts host $1's etcd member from the arguments lab-up wrote ($dir/etcd.args, one a line).
host_etcd_start() {
    local h=$1 dir args
    dir=$(host_dir "$h")
    mapfile -t args <"$dir/etcd.args"
    setsid "$REPO_ROOT/scripts/lab-host-exec.sh" "$h" etcd "${args[@]}" </dev/null >>"$dir/etcd.log" 2>&1 &
}

# Powers host $1 off as a cut power cord would: every process of its namespaces (QEMU, libvirtd,
# virtlockd, etcd, daemons, the holder) is stopped with SIGSTOP, all of them, before any is
# killed, so none of them sees another die and acts on it; its NICs lose their link at the same
# moment (the switch and the management bridge see the port go down); then SIGKILL to all. Waits
# until no process of the host is left.
host_power_off() {
    local h=$1 ns pids round
    ns=$(host_ns "$h")
    [ -e "/run/netns/$ns" ] || lab_die "no lab host $h (no network namespace $ns)"
    for round in $(seq 1 20); do
        mapfile -t pids < <(host_pids "$h")
        [ ${#pids[@]} -gt 0 ] || break
        # A process forked while the list was read is caught in the next round.
        kill -STOP "${pids[@]}" 2>/dev/null || true
        # The NICs die with the power, not after the processes are reaped: a host whose
        # processes are gone but whose links are up still answers (TCP resets, neighbour
        # replies), which no powered-off host does.
        [ "$round" -gt 1 ] || host_links_down "$h"
        mapfile -t more < <(host_pids "$h")
        kill -STOP "${more[@]}" 2>/dev/null || true
        kill -KILL "${pids[@]}" "${more[@]}" 2>/dev/null || true
        sleep 0.05
    done
    for round in $(seq 1 100); do
        [ -z "$(host_pids "$h")" ] && break
        sleep 0.05
    done
    [ -z "$(host_pids "$h")" ] || lab_die "host $h: processes survived SIGKILL: $(host_pids "$h" | tr '\n' ' ')"
    host_links_down "$h"
    rm -f "$(host_dir "$h")/holder.pid"
}

# Host $1's NICs lose their link (its power is cut).
host_links_down() {
    local link ns
    ns=$(host_ns "$1")
    for link in uplink mgmt0; do
        ip -n "$ns" link set "$link" down 2>/dev/null || true
    done
}
