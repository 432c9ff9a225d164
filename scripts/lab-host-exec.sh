#!/usr/bin/env bash
# Runs a command on a host of the several-host lab (`make lab-up HOSTS=3`): inside host <host>'s
# network, mount and UTS namespaces (its interfaces, its /run/libvirt, /etc/libvirt,
# /var/lib/libvirt and /var/log/libvirt, hostname <host>), in the caller's working directory,
# with the caller's environment. There `virsh` (qemu:///system) reaches the host's own libvirtd,
# `etcdctl` its etcd member on 127.0.0.1:2379, and a daemon started here is one of the host's
# processes (`scripts/fence_lab -o off` kills it with the rest).
#
# usage: scripts/lab-host-exec.sh <host> <command> [args...]       <host>: h1, h2, h3
#   e.g. scripts/lab-host-exec.sh h2 virsh list --all
#        setsid scripts/lab-host-exec.sh h2 target/debug/understudy --config C run &
# Exits with the command's status; fails (1) when the host is powered off or the lab is not up.
# Takes no lock: run it under scripts/lab-run.sh, which holds the lab for you.
set -euo pipefail
# shellcheck source=scripts/lab-common.sh
. "$(dirname "$0")/lab-common.sh"

[ $# -ge 2 ] || lab_die "usage: $0 <host> <command> [args...]"
cluster_valid_host "$1" || lab_die "invalid host '$1' (h1, h2, h3, ...)"
[ -e "/run/netns/$(host_ns "$1")" ] || lab_die "no lab host $1: run make lab-up HOSTS=3"
host_exec "$@"
