#!/usr/bin/env bash
# Checks that no trace of the lab is left (run after lab-down, e.g. at the end of make test):
# no lab namespace, no lab bridge anywhere, no libvirtd or understudy daemon from the lab, no
# lab QEMU process, no lab qemu.conf. Exits 1 and names what is left otherwise.
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
if [ ${#left[@]} -gt 0 ]; then
    printf 'lab-verify-down: left behind: %s\n' "${left[@]}" >&2
    exit 1
fi
echo "lab-verify-down: nothing of the lab is left"
