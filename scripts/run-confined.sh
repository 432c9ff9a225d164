#!/usr/bin/env bash
# Runs a command confined the way packaging/understudy.service confines the daemon, on a
# machine without systemd as PID 1 (the lab): NoNewPrivileges=yes, the unit's
# CapabilityBoundingSet=, and ProtectSystem=strict (every mount read-only but /proc, /sys and
# /dev) with the unit's ReadWritePaths= plus each --rw DIR (stand-ins for StateDirectory= and
# RuntimeDirectory=). The tests run a daemon this way to prove the unit leaves it enough.
#
# usage: scripts/run-confined.sh [--rw DIR]... -- command [args...]
set -euo pipefail

unit="$(dirname "$0")/../packaging/understudy.service"
rw=()
while [ $# -gt 0 ]; do
    case "$1" in
        --rw) rw+=("$2"); shift 2 ;;
        --) shift; break ;;
        *) echo "usage: $0 [--rw DIR]... -- command [args...]" >&2; exit 2 ;;
    esac
done
[ $# -ge 1 ] || { echo "usage: $0 [--rw DIR]... -- command [args...]" >&2; exit 2; }

setting() { sed -n "s/^$1=//p" "$unit" | tail -1; }
caps="-all"
for c in $(setting CapabilityBoundingSet); do
    c="${c#CAP_}"
    caps="$caps,+${c,,}"
done
[ "$(setting NoNewPrivileges)" = yes ] || { echo "$unit: NoNewPrivileges=yes expected" >&2; exit 1; }
[ "$(setting ProtectSystem)" = strict ] || { echo "$unit: ProtectSystem=strict expected" >&2; exit 1; }
for p in $(setting ReadWritePaths); do
    optional=""
    [ "${p#-}" != "$p" ] && optional=1 && p="${p#-}"
    if [ -e "$p" ]; then rw+=("$p"); elif [ -z "$optional" ]; then
        echo "ReadWritePaths=$p does not exist" >&2; exit 1
    fi
done

# In a private mount namespace: the writable paths become mounts of their own, then every
# other mount is made read-only.
exec unshare --mount --propagation private -- bash -c '
set -euo pipefail
caps="$1"; shift
n="$1"; shift
rw=("${@:1:$n}"); shift "$n"
for d in "${rw[@]}"; do mount --bind "$d" "$d"; done
is_rw() { local m="$1" d; for d in "${rw[@]}"; do [ "$m" = "$d" ] && return 0; done; return 1; }
while read -r _ mnt _; do
    case "$mnt" in /proc|/proc/*|/sys|/sys/*|/dev|/dev/*) continue ;; esac
    is_rw "$mnt" && continue
    mount -o remount,bind,ro "$mnt" 2>/dev/null || true
done < <(tac /proc/self/mounts)
exec setpriv --nnp --bounding-set "$caps" --inh-caps -all --ambient-caps -all -- "$@"
' confined "$caps" "${#rw[@]}" "${rw[@]}" "$@"
