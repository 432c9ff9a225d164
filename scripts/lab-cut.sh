#!/usr/bin/env bash
# Cuts a host of the several-host lab (make lab-up HOSTS=3) off a network, or reconnects it, as a
# pulled cable would: the port on the far side (the management bridge's mg-<host>, or the
# switch's up-<host>) goes down or up. The host keeps running; its own interface shows no
# carrier, and packets to and from it are dropped silently (connections time out, nothing is
# refused). The switch forgets the MACs it learned on a port that goes down.
#
# usage: scripts/lab-cut.sh <host> mgmt|switch down|up
#        scripts/lab-cut.sh <host> mgmt|switch status      prints "down" or "up"
#   mgmt:   the management network (etcd, libvirt over TCP, the daemons' heartbeats)
#   switch: the host's uplink to the switch (its guests' service traffic)
# Takes no lock: run it under scripts/lab-run.sh, which holds the lab for you.
set -euo pipefail
# shellcheck source=scripts/lab-common.sh
. "$(dirname "$0")/lab-common.sh"

usage() { lab_die "usage: $0 <host> mgmt|switch down|up|status"; }
[ $# -eq 3 ] || usage
h=$1 net=$2 state=$3
cluster_valid_host "$h" || lab_die "invalid host '$h' (h1, h2, h3, ...)"
[ -e "/run/netns/$(host_ns "$h")" ] || lab_die "no lab host $h: run make lab-up HOSTS=3"
case "$net" in
    mgmt) ns=$MGMT_NS port=mg-$h ;;
    switch) ns=$SWITCH_NS port=up-$h ;;
    *) usage ;;
esac
case "$state" in
    down | up)
        ip -n "$ns" link set "$port" "$state"
        lab_log "$h $net: $port in $ns is $state"
        ;;
    status)
        if ip -n "$ns" -o link show "$port" | grep -q '[<,]UP[,>]'; then echo up; else echo down; fi
        ;;
    *) usage ;;
esac
