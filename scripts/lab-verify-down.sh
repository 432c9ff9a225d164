#!/usr/bin/env bash
# Checks that no trace of the lab is left (run after lab-down, e.g. at the end of make test):
# no lab namespace, no lab bridge anywhere, no libvirtd or understudy daemon from the lab, no
# lab QEMU process, no lab qemu.conf; of the several-host lab (HOSTS=3) no namespace, host
# holder, etcd member, host mount (in any process's mount namespace) or state directory.
# Exits 1 and names what is left otherwise.
set -euo pipefail
# shellcheck source=scripts/lab-common.sh
. "$(dirname "$0")/lab-common.sh"
# Under the lab lock: another worktree's lab run must not count as ours left behind.
lab_take_lock "$@"

left=()
ip netns list 2>/dev/null | grep -qw "$LAB_NS" && left+=("network namespace $LAB_NS")
ip link show "$LAB_BRIDGE" >/dev/null 2>&1 && left+=("bridge $LAB_BRIDGE in the host namespace")
# A QEMU killed a moment ago may still be freeing its guest memory: give it 10 s.
for _ in $(seq 1 100); do
    [ -z "$(lab_guest_qemus)" ] && break
    sleep 0.1
done
qemus=$(lab_guest_qemus | cut -c1-160)
[ -n "$qemus" ] && left+=("QEMU processes of lab guests:
$qemus")
daemons=$(ps -eo pid=,stat=,comm= | awk '$2 !~ /^Z/ && $3 == "understudy" { print $1 }' | tr '\n' ' ')
[ -n "$daemons" ] && left+=("understudy daemons: $daemons")
reapers=$(ps -eo pid=,stat=,comm= | awk '$2 !~ /^Z/ && $3 == "lab-reaper" { print $1 }' | tr '\n' ' ')
[ -n "$reapers" ] && left+=("lab-reaper: $reapers")
libvirtd=$(libvirt_daemon_pids | tr '\n' ' ')
[ -n "$libvirtd" ] && left+=("libvirt daemons: $libvirtd")
lab_conf_is_ours && left+=("the lab's $QEMU_CONF")
lab_lockd_conf_is_ours && left+=("the lab's $QEMU_LOCKD_CONF")
lockds=$(virtlockd_pids | tr '\n' ' ')
[ -n "$lockds" ] && left+=("virtlockd: $lockds")
loops=$(losetup --list --noheadings --output NAME,BACK-FILE 2>/dev/null | awk -v d="$LAB_DIR/" 'index($2, d) == 1 { print $1 }' | tr '\n' ' ')
[ -n "${loops// /}" ] && left+=("loop devices over lab images: $loops")
# The several-host lab (HOSTS=3): its namespaces, hosts' holders, etcd members, the hosts'
# private mounts (held by any process at all) and its state.
for ns in $(cluster_namespaces); do left+=("network namespace $ns"); done
holders=$(ps -eo pid=,args= | awk -v tag="$HOST_HOLDER_TAG" 'index($2, tag) == 1 { print $1 }' | tr '\n' ' ')
[ -n "$holders" ] && left+=("lab host holders: $holders")
etcds=$(ps -eo pid=,stat=,comm=,args= | awk -v d="$LAB_STATE/" '$2 !~ /^Z/ && $3 == "etcd" && index($0, d) { print $1 }' | tr '\n' ' ')
[ -n "$etcds" ] && left+=("lab etcd members: $etcds")
mounts=$(grep -l " $CLUSTER_HOSTS_DIR/" /proc/[0-9]*/mountinfo 2>/dev/null | cut -d/ -f3 | tr '\n' ' ' || true)
[ -n "$mounts" ] && left+=("processes holding a lab host's mounts: $mounts")
for path in "$CLUSTER_ENV" "$CLUSTER_HOSTS_DIR" "$LAB_SHARED" "$CLUSTER_CACHE"; do
    [ -e "$path" ] && left+=("$path")
done
if [ ${#left[@]} -gt 0 ]; then
    printf 'lab-verify-down: left behind: %s\n' "${left[@]}" >&2
    exit 1
fi
echo "lab-verify-down: nothing of the lab is left"
