#!/usr/bin/env bash
# Runs a command inside the lab network namespace, like `ip netns exec`, but
# with the host's cgroup file systems still visible. In the several-host lab
# (make lab-up HOSTS=3) it runs the command in the test client's namespace
# understudy-client instead: 10.77.0.1 on the switch (it reaches every guest),
# 10.78.0.254 on the management network (every libvirtd over qemu+tcp, etcd).
# To run a command on a lab host, use scripts/lab-host-exec.sh.
#
# usage: scripts/lab-exec.sh <command> [args...]
#
# `ip netns exec` gives the command a private mount namespace with a fresh
# sysfs on /sys (so /sys/class/net shows the lab's interfaces), which also
# hides every mount below /sys, notably /sys/fs/cgroup. libvirtd needs the
# cgroup hierarchies to place QEMU processes, and the daemon under test reads
# them, so they are mounted again (same hierarchies, same options) inside.
set -euo pipefail
# shellcheck source=scripts/lab-common.sh
. "$(dirname "$0")/lab-common.sh"

[ $# -ge 1 ] || lab_die "usage: $0 <command> [args...]"
ns=$LAB_NS
if ! lab_ns_exists; then
    # The several-host lab: the test client's namespace (on the switch and the management network).
    [ -e "/run/netns/$CLIENT_NS" ] ||
        lab_die "network namespace $LAB_NS does not exist; run make lab-up first"
    ns=$CLIENT_NS
fi

# Mounts below /sys of the caller, parents before children (findmnt order).
sys_mounts=$(findmnt -rn -o TARGET,FSTYPE,OPTIONS | awk '$1 ~ "^/sys/."')

# shellcheck disable=SC2016 # the script is for the inner bash, not this one
exec ip netns exec "$ns" /bin/bash -c '
    while read -r target fstype options; do
        [ -n "$target" ] || continue
        mkdir -p "$target" 2>/dev/null || true
        mount -t "$fstype" -o "$options" "$fstype" "$target" 2>/dev/null ||
            echo "lab-exec: could not mount $fstype on $target; continuing without it" >&2
    done <<<"$1"
    shift
    exec "$@"
' lab-exec "$sys_mounts" "$@"
