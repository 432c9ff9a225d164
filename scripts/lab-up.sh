#!/usr/bin/env bash
# Starts the understudy lab: a network namespace `understudy-lab` holding the
# bridge usbr0 (10.77.0.1/24) and a libvirtd whose guests' taps all live there.
# Running it again while the lab is up changes nothing.
#
# With HOSTS=N (2 to 9; the tests use 3) it starts the several-host lab instead:
# scripts/lab-cluster-up.sh (hosts h1..hN, switch, management network, client,
# shared storage, etcd; see scripts/lab-cluster.sh).
#
# usage: [HOSTS=1|3] scripts/lab-up.sh
set -euo pipefail
# shellcheck source=scripts/lab-common.sh
. "$(dirname "$0")/lab-common.sh"

[ "$(id -u)" -eq 0 ] || lab_die "must run as root"
lab_take_lock "$@"
HOSTS=${HOSTS:-1}
if [ "$HOSTS" != 1 ]; then
    exec "$REPO_ROOT/scripts/lab-cluster-up.sh" "$@"
fi
cluster_exists && lab_die "a several-host lab is up (make lab-up HOSTS=3); run make lab-down first"
for tool in ip virsh libvirtd findmnt; do
    command -v "$tool" >/dev/null || lab_die "$tool not found; run make deps"
done

# --- refuse to share the machine with a libvirt daemon that is not ours -----------
lab_daemon=""
for pid in $(libvirt_daemon_pids); do
    ns=$(pid_netns "$pid")
    if [ "$ns" != "$LAB_NS" ]; then
        comm=$(cat "/proc/$pid/comm" 2>/dev/null || echo unknown)
        where=${ns:-"the host's own"}
        cat >&2 <<EOF
${0##*/}: a libvirt daemon ($comm, pid $pid) is already running
outside the lab network namespace $LAB_NS (namespace: $where).
The lab runs its own libvirtd inside $LAB_NS so that every tap and bridge stays
in that namespace; it cannot share /run/libvirt with another daemon. Stop that
daemon first (or run the tests on a machine without one). Nothing was changed.
EOF
        exit 1
    fi
    lab_daemon=$pid
done

if [ -n "$lab_daemon" ] && lab_conf_is_ours && libvirt_answers &&
    ip -n "$LAB_NS" link show "$LAB_BRIDGE" >/dev/null 2>&1; then
    lab_log "lab already up (libvirtd pid $lab_daemon in $LAB_NS)"
    exit 0
fi
if [ -n "$lab_daemon" ]; then
    lab_die "a libvirtd (pid $lab_daemon) runs in $LAB_NS but the lab is incomplete; run make lab-down, then make lab-up"
fi

# From here on anything that fails takes the lab down again: never half a lab.
undo_on_failure() {
    local status=$?
    if [ "$status" -ne 0 ]; then
        lab_log "failed; taking the lab down again" >&2
        "$REPO_ROOT/scripts/lab-down.sh" >&2 || true
    fi
}
trap undo_on_failure EXIT

# --- the user libvirtd resolves before it even reads qemu.conf -------------------
# Everything created outside build/ is noted in $LAB_CREATED for lab-down.
mkdir -p "$LAB_STATE" "$LAB_DIR/disks"
if ! getent group libvirt-qemu >/dev/null; then
    groupadd --system libvirt-qemu
    echo "group libvirt-qemu" >>"$LAB_CREATED"
fi
if ! getent passwd libvirt-qemu >/dev/null; then
    useradd --system --gid libvirt-qemu --home-dir /var/lib/libvirt --no-create-home \
        --shell /usr/sbin/nologin libvirt-qemu
    echo "user libvirt-qemu" >>"$LAB_CREATED"
fi

for dir in $LIBVIRT_STATE_DIRS; do
    [ -e "$dir" ] || echo "dir $dir" >>"$LAB_CREATED"
done
# libvirtd adds qemu/, secrets/, nwfilter/... to /etc/libvirt: note what was there.
if [ -d /etc/libvirt ] && ! grep -q '^etc-before' "$LAB_CREATED" 2>/dev/null; then
    before=""
    for path in /etc/libvirt/* /etc/libvirt/.[!.]*; do
        [ -e "$path" ] || continue
        case "${path##*/}" in qemu.conf | qemu.conf.understudy-orig | qemu-lockd.conf | qemu-lockd.conf.understudy-orig) ;; *) before="$before ${path##*/}" ;; esac
    done
    echo "etc-before$before" >>"$LAB_CREATED"
fi
mkdir -p /var/log/libvirt /var/lib/libvirt /run/libvirt /etc/libvirt

# --- qemu.conf ---------------------------------------------------------------------
if ! lab_conf_is_ours; then
    if [ -e "$QEMU_CONF" ]; then
        [ -e "$QEMU_CONF_ORIG" ] &&
            lab_die "$QEMU_CONF_ORIG already exists and $QEMU_CONF is not the lab's; sort them out by hand"
        mv "$QEMU_CONF" "$QEMU_CONF_ORIG"
        lab_log "kept the original $QEMU_CONF as $QEMU_CONF_ORIG"
    fi
    cat >"$QEMU_CONF" <<EOF
$LAB_CONF_MARK (written by scripts/lab-up.sh, removed by scripts/lab-down.sh)
# No systemd here: QEMU runs as root without a security driver, and QEMU's
# stdout/stderr go straight to files because no virtlogd runs.
user = "root"
group = "root"
swtpm_user = "root"
swtpm_group = "root"
security_driver = "none"
stdio_handler = "file"
# libvirt's lock manager (virtlockd, started below before libvirtd): see $QEMU_LOCKD_CONF.
lock_manager = "lockd"
EOF
    lab_log "wrote lab $QEMU_CONF"
fi
if ! lab_lockd_conf_is_ours; then
    if [ -e "$QEMU_LOCKD_CONF" ]; then
        [ -e "$QEMU_LOCKD_CONF_ORIG" ] &&
            lab_die "$QEMU_LOCKD_CONF_ORIG already exists and $QEMU_LOCKD_CONF is not the lab's; sort them out by hand"
        mv "$QEMU_LOCKD_CONF" "$QEMU_LOCKD_CONF_ORIG"
        lab_log "kept the original $QEMU_LOCKD_CONF as $QEMU_LOCKD_CONF_ORIG"
    fi
    cat >"$QEMU_LOCKD_CONF" <<EOF
$LAB_CONF_MARK (written by scripts/lab-up.sh, removed by scripts/lab-down.sh)
# Every disk of a running domain gets a lease (a lock file named by the sha256 of its path),
# and no domain starts or attaches a disk without one: a second domain on a disk that a running
# one uses is refused with "resource busy". Read-only and shareable disks get shared leases.
auto_disk_leases = 1
require_lease_for_disks = 1
file_lockspace_dir = "$LOCKD_LOCKSPACE"
EOF
    lab_log "wrote lab $QEMU_LOCKD_CONF"
fi
mkdir -p "$LOCKD_LOCKSPACE"

# --- network namespace and bridge ---------------------------------------------------
if ! lab_ns_exists; then
    ip netns add "$LAB_NS"
    lab_log "created network namespace $LAB_NS"
fi
ip -n "$LAB_NS" link set lo up
if ! ip -n "$LAB_NS" link show "$LAB_BRIDGE" >/dev/null 2>&1; then
    # STP off and no forward delay: a tap enslaved later forwards at once.
    ip -n "$LAB_NS" link add "$LAB_BRIDGE" type bridge stp_state 0 forward_delay 0
    # A fixed MAC: a bridge without one takes the lowest MAC of its ports and changes it as
    # taps come and go, which flushes every ARP entry on it (clients then re-ARP during a
    # failover). Real hosts' bridges get their uplink's MAC or a configured one.
    ip -n "$LAB_NS" link set "$LAB_BRIDGE" address "$LAB_BRIDGE_MAC"
    ip -n "$LAB_NS" addr add "$LAB_BRIDGE_ADDR" dev "$LAB_BRIDGE"
    lab_log "created bridge $LAB_BRIDGE ($LAB_BRIDGE_ADDR) in $LAB_NS"
fi
ip -n "$LAB_NS" link set "$LAB_BRIDGE" up

# --- virtlockd, before libvirtd (which connects to it when it starts) ---------------
if [ -z "$(virtlockd_pids)" ]; then
    rm -f "$VIRTLOCKD_PIDFILE"
    LIBVIRT_LOG_OUTPUTS="3:file:$VIRTLOCKD_LOG" virtlockd -d -p "$VIRTLOCKD_PIDFILE"
    for _ in $(seq 1 50); do
        [ -S /run/libvirt/virtlockd-sock ] && break
        sleep 0.1
    done
    [ -S /run/libvirt/virtlockd-sock ] || lab_die "virtlockd did not start (see $VIRTLOCKD_LOG)"
    lab_log "virtlockd (pid $(cat "$VIRTLOCKD_PIDFILE")) up: lock_manager = \"lockd\""
fi

# --- libvirtd inside the namespace ---------------------------------------------------
# Under lab-reaper (scripts/lab-reaper.c), which reaps dead QEMUs at once as a real host's
# init does; this machine's pid 1 leaves them zombies for a second or two, and libvirt waits
# for them before it finishes stopping a domain and releases its disk leases.
lab_build_reaper
reaper=$LAB_REAPER
rm -f "$LIBVIRTD_PIDFILE"
LIBVIRT_LOG_OUTPUTS="3:file:$LAB_LIBVIRTD_LOG" setsid \
    "$REPO_ROOT/scripts/lab-exec.sh" "$reaper" libvirtd --pid-file "$LIBVIRTD_PIDFILE" \
    </dev/null >>"$LAB_STATE/libvirtd.out" 2>&1 &
for _ in $(seq 1 300); do
    libvirt_answers && [ -s "$LIBVIRTD_PIDFILE" ] && break
    sleep 0.1
done
libvirt_answers || lab_die "libvirtd did not answer on $LAB_URI within 30 s (see $LAB_LIBVIRTD_LOG)"
pid=$(cat "$LIBVIRTD_PIDFILE" 2>/dev/null || true)
if [ -z "$pid" ] || [ "$(pid_netns "$pid")" != "$LAB_NS" ]; then
    lab_die "the libvirtd answering on $LAB_URI is not the one started in $LAB_NS"
fi
lab_log "libvirtd (pid $pid) up in $LAB_NS: $(virsh -c "$LAB_URI" version 2>/dev/null | grep -m1 'hypervisor' || true)"
