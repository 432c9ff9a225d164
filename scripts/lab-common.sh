# shellcheck shell=bash
# Shared settings and helpers of the lab scripts (sourced, not executed).
# shellcheck disable=SC2034 # the variables are used by the scripts sourcing this

LAB_NS=understudy-lab
LAB_BRIDGE=usbr0
LAB_BRIDGE_ADDR=10.77.0.1/24
LAB_BRIDGE_MAC=02:75:73:00:00:01
LAB_URI=qemu:///system

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LAB_DIR=$REPO_ROOT/build/lab
LAB_LOGS=$REPO_ROOT/build/lab-logs
# The lab is one per machine, whichever worktree started it: its machine-wide
# state lives in /run, and one lock serialises everything that changes or uses
# it (lab-up, lab-down, make test, lab-smoke).
LAB_STATE=/run/understudy-lab
LAB_LOCK=/run/understudy-lab.lock

QEMU_CONF=/etc/libvirt/qemu.conf
QEMU_CONF_ORIG=/etc/libvirt/qemu.conf.understudy-orig
# First line of every qemu.conf the lab writes; tells ours from anybody else's.
LAB_CONF_MARK="# understudy-lab qemu.conf"
# Where libvirtd -d writes its pid.
LIBVIRTD_PIDFILE=/run/libvirtd.pid
# libvirt's lock manager: virtlockd holds a lease on every disk a running domain uses, so
# libvirt itself refuses a second domain on a disk in use (a second guard besides understudy's
# fencing). Its configuration for the QEMU driver, and where its file leases live.
QEMU_LOCKD_CONF=/etc/libvirt/qemu-lockd.conf
QEMU_LOCKD_CONF_ORIG=/etc/libvirt/qemu-lockd.conf.understudy-orig
LOCKD_LOCKSPACE=/var/lib/libvirt/lockd/files
VIRTLOCKD_PIDFILE=$LAB_STATE/virtlockd.pid
VIRTLOCKD_LOG=$LAB_STATE/virtlockd.log
# What lab-up created outside build/ (so lab-down removes exactly that).
LAB_CREATED=$LAB_STATE/created
LAB_LIBVIRTD_LOG=$LAB_STATE/libvirtd.log
# State directories libvirtd fills; removed by lab-down if lab-up created them.
LIBVIRT_STATE_DIRS="/var/lib/libvirt /var/log/libvirt /run/libvirt /var/cache/libvirt /etc/libvirt"

lab_log() { echo "${0##*/}: $*"; }
lab_die() { echo "${0##*/}: $*" >&2; exit 1; }

# Re-runs the calling script under the machine-wide lab lock unless this
# process tree already holds it (make test takes it once for its whole run).
# `flock -o`: the lock stays with flock itself, so daemons started by the
# script (libvirtd) do not inherit it.
lab_take_lock() {
    if [ -n "${UNDERSTUDY_LAB_LOCKED:-}" ]; then
        if [ -n "${UNDERSTUDY_LAB_JUST_LOCKED:-}" ]; then
            unset UNDERSTUDY_LAB_JUST_LOCKED
            echo "$UNDERSTUDY_LAB_LOCKED" >"$LAB_LOCK.holder"
        fi
        return 0
    fi
    local args="$*"
    if ! flock -n "$LAB_LOCK" true; then
        lab_log "waiting for the lab lock $LAB_LOCK; held by: $(cat "$LAB_LOCK.holder" 2>/dev/null || echo unknown)" >&2
    fi
    UNDERSTUDY_LAB_LOCKED="${0##*/} ${args:0:60} in $REPO_ROOT (pid $$, since $(date +%T))" UNDERSTUDY_LAB_JUST_LOCKED=1 \
        exec flock -o "$LAB_LOCK" "$0" "$@"
}

lab_ns_exists() { [ -e "/run/netns/$LAB_NS" ]; }

lab_conf_is_ours() { [ -f "$QEMU_CONF" ] && [[ $(head -n1 "$QEMU_CONF") == "$LAB_CONF_MARK"* ]]; }
lab_lockd_conf_is_ours() { [ -f "$QEMU_LOCKD_CONF" ] && [[ $(head -n1 "$QEMU_LOCKD_CONF") == "$LAB_CONF_MARK"* ]]; }

# Prints the pids of every running virtlockd.
virtlockd_pids() {
    ps -eo pid=,stat=,comm= | awk '$2 !~ /^Z/ && $3 == "virtlockd" { print $1 }'
}

# Prints the pids of every running libvirt daemon (monolithic or modular QEMU).
# Zombies do not count: this machine's pid 1 reaps orphans only lazily.
libvirt_daemon_pids() {
    ps -eo pid=,stat=,comm= | awk '$2 !~ /^Z/ && ($3 == "libvirtd" || $3 == "virtqemud") { print $1 }'
}

# Prints the name of the network namespace of a pid ("" for the host's own).
pid_netns() { ip netns identify "$1" 2>/dev/null || true; }

# Succeeds when the libvirt daemon answers.
libvirt_answers() { timeout 5 virsh -c "$LAB_URI" version >/dev/null 2>&1; }

# Succeeds when a pid is alive (a zombie is not).
pid_alive() { [ -d "/proc/$1" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; }

# Live (non-zombie) QEMU processes booting a lab guest image (any worktree's:
# there is one lab per machine), one "pid args" line each.
lab_guest_qemus() {
    ps -eo pid=,stat=,args= | awk '$2 !~ /^Z/ && $3 ~ /qemu-system/ && /\/build\/guest\// { $2 = ""; print }'
}

# Waits until a pid is gone; SIGKILL after the given number of tenths of a second.
stop_pid() {
    local pid=$1 tenths=${2:-100} i=0
    kill -TERM "$pid" 2>/dev/null || return 0
    while pid_alive "$pid"; do
        i=$((i + 1))
        if [ "$i" -ge "$tenths" ]; then
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.2
            break
        fi
        sleep 0.1
    done
}

# shellcheck source=scripts/lab-cluster.sh
. "$REPO_ROOT/scripts/lab-cluster.sh"
