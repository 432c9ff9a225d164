#!/usr/bin/env bash
# Smoke test of a running lab: starts guest NAME (default us-smoke) at IP
# (default 10.77.0.10/24), waits for its agent, checks its page, runs the
# workload tool through guest-exec, then removes the guest again.
# Prints the boot-to-agent time.
#
# usage: scripts/lab-smoke.sh [NAME [IP]]      (the lab must be up)
set -euo pipefail
# shellcheck source=scripts/lab-common.sh
. "$(dirname "$0")/lab-common.sh"
lab_take_lock "$@"

name=${1:-us-smoke}
ip=${2:-10.77.0.10/24}
addr=${ip%/*}
virsh_() { virsh -c "$LAB_URI" "$@"; }
agent() { virsh_ qemu-agent-command "$name" "$1"; }
ms_since() { echo $((($(date +%s%N) - $1) / 1000000)); }
# Reads a JSON value from stdin: json_get <python expression on r>.
json_get() { python3 -c "import json,sys,base64; r=json.load(sys.stdin)['return']; print($1)"; }

cleanup() {
    virsh_ destroy "$name" >/dev/null 2>&1 || true
    virsh_ undefine "$name" >/dev/null 2>&1 || true
}
trap cleanup EXIT
fail() { echo "lab-smoke: FAIL: $*" >&2; exit 1; }

libvirt_answers || fail "the lab is not up (make lab-up)"
virsh_ dominfo "$name" >/dev/null 2>&1 && fail "a domain named $name already exists"

start=$(date +%s%N)
"$REPO_ROOT/scripts/lab-guest.sh" start "$name" "$ip"
until agent '{"execute":"guest-ping"}' >/dev/null 2>&1; do
    [ "$(ms_since "$start")" -lt 60000 ] || fail "no guest-ping answer within 60 s"
    sleep 0.1
done
echo "lab-smoke: boot-to-agent $(ms_since "$start") ms"

until page=$(ip netns exec "$LAB_NS" curl -s -m 2 "http://$addr/") && [ -n "$page" ]; do
    [ "$(ms_since "$start")" -lt 60000 ] || fail "no page from http://$addr/ within 60 s"
    sleep 0.1
done
echo "lab-smoke: boot-to-http $(ms_since "$start") ms"
uuid=$(virsh_ domuuid "$name" | tr -d '[:space:]')
[[ $page =~ ^understudy-lab-guest\ host=$name\ uuid=$uuid\ boot=[0-9a-f-]{36}\ role=primary$ ]] ||
    fail "unexpected page: $page"
echo "lab-smoke: page ok: $page"

pid=$(agent '{"execute":"guest-exec","arguments":{"path":"/bin/us-workload","arg":["cpu","50","3"],"capture-output":true}}' |
    json_get 'r["pid"]')
exec_start=$(date +%s%N)
while :; do
    status=$(agent "{\"execute\":\"guest-exec-status\",\"arguments\":{\"pid\":$pid}}")
    [ "$(echo "$status" | json_get 'r["exited"]')" = True ] && break
    [ "$(ms_since "$exec_start")" -lt 30000 ] || fail "us-workload cpu 50 3 did not finish within 30 s"
    sleep 0.5
done
code=$(echo "$status" | json_get 'r["exitcode"]')
out=$(echo "$status" | json_get 'base64.b64decode(r.get("out-data","")).decode()')
[ "$code" = 0 ] || fail "us-workload exited with $code"
echo "lab-smoke: guest-exec ok after $(ms_since "$exec_start") ms: $out"
echo "lab-smoke: PASS"
