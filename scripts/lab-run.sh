#!/usr/bin/env bash
# Runs a command with the lab up, holding the machine-wide lab lock for the
# whole run: lab-up, the command, then lab-down whatever happened (also after
# Ctrl-C). Exits with the command's status. Other lab users (make test in any
# worktree, lab-up, lab-down, lab-smoke) wait meanwhile.
#
# usage: [HOSTS=1|3] scripts/lab-run.sh <command> [args...]
#   e.g. scripts/lab-run.sh scripts/lab-exec.sh cargo test --offline -- --test-threads=1
#        HOSTS=3 scripts/lab-run.sh scripts/lab-exec.sh cargo test --offline --test lab -- --test-threads=1 three_hosts::
# HOSTS=3 brings up the three-host lab instead (scripts/lab-cluster-up.sh).
# The command runs outside the lab namespace; wrap it in scripts/lab-exec.sh to
# run it inside (with HOSTS=3: inside the test client's namespace).
set -euo pipefail
# shellcheck source=scripts/lab-common.sh
. "$(dirname "$0")/lab-common.sh"

[ "$(id -u)" -eq 0 ] || lab_die "must run as root"
[ $# -ge 1 ] || lab_die "usage: $0 <command> [args...]"
lab_take_lock "$@"

# Holding the lock, any lab that is up now was left by a run that could not
# take it down (killed with SIGKILL, machine reset mid-run). Its domains would
# still run, load the machine and be adopted by the daemons under test: start
# from a clean lab instead.
if lab_ns_exists || cluster_exists; then
    lab_log "a lab from an earlier run is still up; taking it down first"
    "$REPO_ROOT/scripts/lab-down.sh"
fi
"$REPO_ROOT/scripts/lab-up.sh"
status=0
# An interrupt stops the command, not this script: the lab still goes down.
trap 'status=130' INT TERM
"$@" || status=$?
trap - INT TERM
"$REPO_ROOT/scripts/lab-down.sh" || lab_log "lab-down failed" >&2
exit "$status"
