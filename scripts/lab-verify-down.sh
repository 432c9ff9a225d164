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
# Zombies do not count (see libvirt_daemon_pids).
live() { ps -eo pid=,stat=,args= | awk '$2 !~ /^Z/'; }
live | grep -q "qemu-system-x86_64 .*/build/guest/" && left+=("QEMU processes of lab guests")
daemons=$(ps -eo pid=,stat=,comm= | awk '$2 !~ /^Z/ && $3 == "understudy" { print $1 }' | tr '\n' ' ')
[ -n "$daemons" ] && left+=("understudy daemons: $daemons")
libvirtd=$(libvirt_daemon_pids | tr '\n' ' ')
[ -n "$libvirtd" ] && left+=("libvirt daemons: $libvirtd")
lab_conf_is_ours && left+=("the lab's $QEMU_CONF")
if [ ${#left[@]} -gt 0 ]; then
    printf 'lab-verify-down: left behind: %s\n' "${left[@]}" >&2
    exit 1
fi
echo "lab-verify-down: nothing of the lab is left"
