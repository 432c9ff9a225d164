#!/usr/bin/env bash
# Stops or starts one service of a host of the several-host lab (make lab-up HOSTS=3) while the
# host itself stays on: for tests of what the daemons make of a restarted libvirtd or of etcd
# losing its quorum.
#
# usage: scripts/lab-host-service.sh <host> libvirtd restart   SIGTERM to libvirtd, then started
#                                                               again as lab-up starts it; waits
#                                                               until it answers
#        scripts/lab-host-service.sh <host> etcd stop          SIGKILL to the host's etcd member
#        scripts/lab-host-service.sh <host> etcd start         starts it again (its data kept)
# Takes no lock: run it under scripts/lab-run.sh, which holds the lab for you.
set -euo pipefail
# shellcheck source=scripts/lab-common.sh
. "$(dirname "$(realpath "$0")")/lab-common.sh"

[ $# -eq 3 ] || lab_die "usage: $0 <host> libvirtd restart | <host> etcd stop|start"
h=$1 svc=$2 act=$3
cluster_valid_host "$h" || lab_die "invalid host '$h' (h1, h2, h3, ...)"
host_is_on "$h" || lab_die "host $h is off (scripts/fence_lab -o on -n $h)"
dir=$(host_dir "$h")

# The pids of host $1's processes named $2.
named_pids() {
    local p
    for p in $(host_pids "$1"); do
        [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "$2" ] && echo "$p"
    done
    return 0
}

wait_gone() {
    local i
    for i in $(seq 1 100); do
        [ -z "$(named_pids "$h" "$1")" ] && return 0
        sleep 0.1
    done
    lab_die "host $h: $1 did not exit"
}

case "$svc/$act" in
    libvirtd/restart)
        mapfile -t pids < <(named_pids "$h" libvirtd)
        [ ${#pids[@]} -gt 0 ] || lab_die "host $h runs no libvirtd"
        kill -TERM "${pids[@]}"
        wait_gone libvirtd
        rm -f "$dir/libvirtd.pid"
        lab_build_reaper
        LIBVIRT_LOG_OUTPUTS="3:file:$dir/libvirtd.log" setsid \
            "$REPO_ROOT/scripts/lab-host-exec.sh" "$h" "$LAB_REAPER" libvirtd --listen --pid-file "$dir/libvirtd.pid" \
            </dev/null >>"$dir/libvirtd.out" 2>&1 &
        for i in $(seq 1 300); do
            [ -s "$dir/libvirtd.pid" ] && host_libvirt_answers "$h" && break
            sleep 0.1
        done
        host_libvirt_answers "$h" || lab_die "host $h: libvirtd did not answer within 30 s (see $dir/libvirtd.log)"
        lab_log "$h: libvirtd restarted"
        ;;
    etcd/stop)
        mapfile -t pids < <(named_pids "$h" etcd)
        [ ${#pids[@]} -gt 0 ] || lab_die "host $h runs no etcd member"
        kill -KILL "${pids[@]}"
        wait_gone etcd
        lab_log "$h: etcd member stopped"
        ;;
    etcd/start)
        [ -z "$(named_pids "$h" etcd)" ] || lab_die "host $h's etcd member runs already"
        host_etcd_start "$h"
        lab_log "$h: etcd member started"
        ;;
    *) lab_die "usage: $0 <host> libvirtd restart | <host> etcd stop|start" ;;
esac
