#!/usr/bin/env bash
# make demo: a protected guest, its paused shadow, a crash, and the client's view of it.
#
# Runs on the lab (make lab-up has been done by the Makefile): starts the daemon inside the
# lab namespace with configs/lab.toml, starts web1 on 10.77.0.10, waits for its shadow to
# pause, polls web1's page every 5 ms from inside the lab, SIGKILLs web1's QEMU, prints the
# failover timeline and the outage the client saw, waits for the replacement shadow, and
# cleans up. Bounded: gives up after DEMO_TIMEOUT seconds (default 600).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/understudy}
CONFIG=configs/lab.toml
TIMEOUT=${DEMO_TIMEOUT:-600}
LOG=build/lab/demo-daemon.log
deadline=$((SECONDS + TIMEOUT))
mkdir -p build/lab

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
in_lab() { scripts/lab-exec.sh "$@"; }
us() { "$BIN" --config "$CONFIG" "$@"; }
cleanup() {
    [ -n "${DAEMON_PID:-}" ] && kill "$DAEMON_PID" 2>/dev/null || true
    wait 2>/dev/null || true
    for d in $(virsh -q list --all --name 2>/dev/null | grep -E '^web1(-shadow-[0-9]+)?$' || true); do
        virsh -q destroy "$d" >/dev/null 2>&1 || true
        virsh -q undefine --managed-save "$d" >/dev/null 2>&1 || true
    done
}
trap cleanup EXIT
wait_until() { # description, command...
    local what=$1; shift
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || { echo "demo: timed out waiting for $what" >&2; tail -n 40 "$LOG" >&2; exit 1; }
        sleep 1
    done
}
shadow_paused() { us status --json | python3 -c '
import json,sys
s=[x for x in json.load(sys.stdin)["services"] if x["name"]=="web1"]
want=sys.argv[1]
ok=s and any(sh["state"]=="paused" and (want=="any" or sh["name"]==want) for sh in s[0]["shadows"])
sys.exit(0 if ok else 1)' "$1"; }

cleanup
rm -rf build/lab/state
say "starting the understudy daemon in the lab namespace (log: $LOG)"
in_lab "$BIN" --config "$CONFIG" run >"$LOG" 2>&1 &
DAEMON_PID=$!
wait_until "daemon socket" us status

say "starting protected guest web1 on 10.77.0.10"
scripts/lab-guest.sh start web1 10.77.0.10/24
wait_until "web1's shadow to be booted and paused" shadow_paused web1-shadow-1
us status

say "the client sees web1 (only the primary answers while the shadow stands by)"
in_lab "$BIN" probe 10.77.0.10:80 --seconds 2

say "polling web1 every 5 ms from inside the lab, then SIGKILL of web1's QEMU"
in_lab "$BIN" probe 10.77.0.10:80 --interval-ms 5 --timeout-ms 100 --seconds 8 &
PROBE=$!
sleep 2
QEMU_PID=$(cat /run/libvirt/qemu/web1.pid)
echo "kill -9 $QEMU_PID (web1's QEMU)"
kill -9 "$QEMU_PID"
wait $PROBE || true

say "failover timeline (understudy status)"
us status

say "waiting for the replacement shadow"
wait_until "web1-shadow-2 to be paused" shadow_paused web1-shadow-2
us status
say "demo complete"
