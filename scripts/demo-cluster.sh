#!/usr/bin/env bash
# make demo-cluster: three hosts, a protected guest whose shadow stands by on another host, a
# drain of the guest's host, then a crash promoted across hosts, with the timeline.
#
# Runs on the three-host lab (the Makefile runs it under HOSTS=3 scripts/lab-run.sh): starts
# one daemon per host (inside the host's namespaces, talking to its own libvirtd, all through
# the lab's etcd), starts demo-web on h1 (10.77.0.95, placement "other-host"), shows where its
# shadow went, drains h1 (the primary moves to the shadow's host, a replacement shadow goes to
# the third host), SIGKILLs the new primary's QEMU while a client on the switch polls every
# 5 ms, and prints what the client saw and the failover's timeline. Bounded by DEMO_TIMEOUT
# seconds (default 900).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lab-common.sh
. scripts/lab-common.sh
BIN=${BIN:-$PWD/target/debug/understudy}
TIMEOUT=${DEMO_TIMEOUT:-900}
NAME=demo-web
IP=10.77.0.95
DIR=$PWD/build/lab/demo-cluster
PREFIX=/understudy/demo-cluster
deadline=$((SECONDS + TIMEOUT))
# shellcheck disable=SC1090
. "$CLUSTER_ENV"
HOSTS_LIST=(${LAB_HOSTS//,/ })
mkdir -p "$DIR"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
us() { local h=$1; shift; "$BIN" --socket "$DIR/$h/understudy.sock" "$@"; }
in_client() { ip netns exec "$LAB_CLIENT_NS" "$@"; }
cleanup() {
    for pid in "${PIDS[@]:-}"; do [ -n "$pid" ] && kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    for h in "${HOSTS_LIST[@]}"; do
        uri_var=${h^^}_LIBVIRT_URI
        for d in $(virsh -c "${!uri_var}" -q list --all --name 2>/dev/null | grep -E "^$NAME(-shadow-[0-9]+)?\$" || true); do
            virsh -c "${!uri_var}" -q destroy "$d" >/dev/null 2>&1 || true
            virsh -c "${!uri_var}" -q undefine "$d" >/dev/null 2>&1 || true
        done
    done
    etcdctl --endpoints="$ETCD_ENDPOINTS" del --prefix "$PREFIX" >/dev/null 2>&1 || true
}
trap cleanup EXIT
wait_until() { # description, command...
    local what=$1; shift
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || { echo "demo-cluster: timed out waiting for $what" >&2; tail -n 30 "$DIR"/h*/daemon.log >&2; exit 1; }
        sleep 1
    done
}
# Which host runs the primary of demo-web (from any daemon's `hosts --json`).
owner_host() { us h3 hosts --json | python3 -c '
import json,sys
for h in json.load(sys.stdin)["hosts"]:
    for p in h["primaries"]:
        if p["service"]==sys.argv[1]: print(h["name"], p["domain"])' "$NAME"; }
paused_on() { us "$1" status --json | python3 -c '
import json,sys
s=[x for x in json.load(sys.stdin)["services"] if x["name"]==sys.argv[1]]
sys.exit(0 if s and any(sh["state"]=="paused" for sh in s[0]["shadows"]) else 1)' "$NAME"; }

PIDS=()
cleanup
endpoints=$(printf '"%s",' ${ETCD_ENDPOINTS//,/ }); endpoints=${endpoints%,}
say "starting a daemon on each of ${HOSTS_LIST[*]} (logs: $DIR/<host>/daemon.log)"
for h in "${HOSTS_LIST[@]}"; do
    rm -rf "${DIR:?}/$h"; mkdir -p "$DIR/$h"
    uri_var=${h^^}_LIBVIRT_URI
    cat >"$DIR/$h/understudy.toml" <<EOF
[daemon]
libvirt_uri = "qemu:///system"
accel = "tcg"
state_dir = "$DIR/$h/state"
control_socket = "$DIR/$h/understudy.sock"
metrics_listen = "127.0.0.1:9464"

[[protect]]
match = "$NAME"
class = "web"

[class.web]
shadows = 1
placement = "other-host"

[cluster]
endpoints = [$endpoints]
host = "$h"
key_prefix = "$PREFIX"
lease_ttl_s = 3
libvirt_uri = "${!uri_var}"
EOF
    setsid scripts/lab-host-exec.sh "$h" "$BIN" --config "$DIR/$h/understudy.toml" run >"$DIR/$h/daemon.log" 2>&1 &
    PIDS+=($!)
done
for h in "${HOSTS_LIST[@]}"; do wait_until "the daemon on $h" us "$h" status; done
sleep 3
us h1 hosts

say "starting protected guest $NAME on h1 ($IP), shadows placed on other hosts"
scripts/lab-guest.sh start "$NAME" "$IP/24" --host h1 >/dev/null
# A paused shadow on some host other than $1 and $2.
paused_elsewhere() {
    local h
    for h in "${HOSTS_LIST[@]}"; do
        if [ "$h" != "$1" ] && [ "$h" != "${2:-}" ] && paused_on "$h"; then return 0; fi
    done
    return 1
}
wait_until "a paused shadow of $NAME on another host" paused_elsewhere h1
us h1 hosts

say "draining h1: its primary moves to the shadow's host, and h1 gets no shadows"
us h1 host drain h1 --timeout 3m
sleep 2
us h1 hosts
read -r host domain < <(owner_host)
echo "primary of $NAME: $domain on $host"
wait_until "a replacement shadow on the third host" paused_elsewhere "$host" h1
us h1 hosts

say "polling $NAME every 5 ms from the client on the switch, then SIGKILL of its QEMU on $host"
in_client "$BIN" probe "$IP:80" --interval-ms 5 --timeout-ms 100 --seconds 8 &
PROBE=$!
sleep 2
QEMU_PID=$(scripts/lab-host-exec.sh "$host" cat "/run/libvirt/qemu/$domain.pid")
echo "kill -9 $QEMU_PID ($domain's QEMU on $host)"
kill -9 "$QEMU_PID"
wait $PROBE || true
sleep 2
read -r new_host new_domain < <(owner_host)
mac=$(printf '%s' "$NAME" | md5sum | sed -E 's/^(..)(..)(..).*/52:54:00:\1:\2:\3/')
port=$(ip netns exec "$LAB_SWITCH_NS" bridge fdb show br "$LAB_SWITCH_BRIDGE" | awk -v m="$mac" 'tolower($1)==m && !/permanent/ {print $3; exit}')
echo "primary of $NAME now: $new_domain on $new_host; the switch forwards $mac to port $port"

say "the failover's timeline (understudy status on $new_host)"
us "$new_host" status
us h1 host undrain h1
say "demo complete"
