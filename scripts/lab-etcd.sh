#!/usr/bin/env bash
# Stops or starts one etcd member of the several-host lab (make lab-up HOSTS=3), the host
# itself staying up: what an etcd upgrade, a crash of the member or its restart look like to
# the daemons. The member rejoins with its data directory.
#
# usage: scripts/lab-etcd.sh <host> stop     the member gets SIGTERM; waits until it is gone
#        scripts/lab-etcd.sh <host> start    starts it again; waits up to 10 s until it is healthy
#        scripts/lab-etcd.sh <host> lead     makes it the cluster's leader (etcdctl move-leader)
#        scripts/lab-etcd.sh <host> status   prints "stopped", "started" or "leader"
# Takes no lock: run it under scripts/lab-run.sh, which holds the lab for you.
set -euo pipefail
# shellcheck source=scripts/lab-common.sh
. "$(dirname "$0")/lab-common.sh"

usage() { lab_die "usage: $0 <host> stop|start|lead|status"; }
[ $# -eq 2 ] || usage
h=$1 action=$2
cluster_valid_host "$h" || lab_die "invalid host '$h' (h1, h2, h3, ...)"
host_is_on "$h" || lab_die "lab host $h is not running (powered off, or no lab: make lab-up HOSTS=3)"
all=$(grep '^ETCD_ENDPOINTS=' "$CLUSTER_ENV" | cut -d= -f2)

# etcdctl from inside the host (it reaches its member on 127.0.0.1 and the others over its
# management interface), wherever this script runs.
ctl() { "$REPO_ROOT/scripts/lab-host-exec.sh" "$h" etcdctl --dial-timeout=1s "$@"; }

# The host's etcd process, if it runs.
member_pid() {
    local pid
    for pid in $(host_pids "$h"); do
        [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = etcd ] && { echo "$pid"; return 0; }
    done
    return 1
}

# "<member id> <is leader>" from the member's own status.
member_status() {
    ctl --endpoints="http://127.0.0.1:$ETCD_CLIENT_PORT" --command-timeout=2s endpoint status 2>/dev/null |
        awk -F', ' '{ print $2, $5 }'
}

case "$action" in
    stop)
        pid=$(member_pid) || { lab_log "$h: etcd member not running"; exit 0; }
        stop_pid "$pid" 100
        lab_log "$h: etcd member stopped (pid $pid)"
        ;;
    start)
        member_pid >/dev/null && { lab_log "$h: etcd member already running"; exit 0; }
        host_etcd_start "$h"
        for _ in $(seq 1 100); do
            if ctl --endpoints="http://127.0.0.1:$ETCD_CLIENT_PORT" --command-timeout=1s endpoint health >/dev/null 2>&1; then
                lab_log "$h: etcd member started and healthy"
                exit 0
            fi
            sleep 0.1
        done
        lab_die "$h: etcd member started, but not healthy after 10 s (see $(host_dir "$h")/etcd.log)"
        ;;
    lead)
        read -r id leader < <(member_status) || lab_die "$h: etcd member does not answer"
        if [ "$leader" != true ]; then
            ctl --endpoints="$all" --command-timeout=5s move-leader "$id" >/dev/null
        fi
        read -r _ leader < <(member_status) || true
        [ "$leader" = true ] || lab_die "$h: etcd member did not become the leader"
        lab_log "$h: etcd member $id leads"
        ;;
    status)
        if ! member_pid >/dev/null; then
            echo stopped
        elif [ "$(member_status | cut -d' ' -f2)" = true ]; then
            echo leader
        else
            echo started
        fi
        ;;
    *) usage ;;
esac
