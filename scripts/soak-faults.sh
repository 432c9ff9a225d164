#!/usr/bin/env bash
# Repeats the integration fault suite SOAK_ROUNDS times and reports per test: runs, failures
# and the slowest recovery. Must run inside the lab (make soak-faults runs it through
# scripts/lab-run.sh and scripts/lab-exec.sh, under one lab and its lock); the test binary
# must be built (cargo build --tests).
#
# Each test runs alone (`--exact`), so a failure keeps its own log: every run's output is kept
# in build/soak/<stamp>/round-<n>/<test>.log, and a failed run's log (the daemon's log is in
# it: the tests print it when they fail) plus the QEMU logs and guest consoles it wrote are
# copied to build/soak/<stamp>/failures/. Recovery times come from the tests' `understudy-recovery`
# lines (integration/common.rs, report_recovery) and are collected in recoveries.tsv.
#
#   SOAK_ROUNDS  rounds (default 20)
#   SOAK_FILTER  test name filters, space-separated (default: every faults:: test, so new fault
#                tests join by themselves, and the stateful fault tests: the ledger through a
#                crash, a hang and a switchover, and a failed attach and promote command).
#                The cluster's fault tests need the three-host lab:
#                HOSTS=3 SOAK_FILTER="three_hosts::hostloss:: three_hosts::resilience::"
#   SOAK_OUT     results directory (default build/soak/<stamp>). Given an existing one, the
#                rounds are added to it (numbered on from its last) and the summary covers
#                all of them: a soak split into chunks, each under its own lab lock, adds up.
set -uo pipefail
cd "$(dirname "$0")/.."

rounds=${SOAK_ROUNDS:-20}
filter=${SOAK_FILTER:-faults:: stateful::ledger_keeps_every_acknowledged_key stateful::failed_attach_and_promote_command}
read -ra filters <<<"$filter"
[[ $rounds =~ ^[0-9]+$ ]] && [ "$rounds" -gt 0 ] || { echo "soak: SOAK_ROUNDS must be a positive integer" >&2; exit 2; }
out=${SOAK_OUT:-build/soak/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$out/failures"

mapfile -t tests < <(cargo test --offline --test lab -- --list "${filters[@]}" 2>/dev/null | sed -n 's/: test$//p')
[ ${#tests[@]} -gt 0 ] || { echo "soak: no test matches $filter" >&2; exit 2; }
# Rounds already in $out (an earlier chunk): number on from the last.
first=1
if [ -f "$out/runs.tsv" ]; then
    first=$(($(awk -F'\t' 'NR > 1 && $1 > m { m = $1 } END { print m + 0 }' "$out/runs.tsv") + 1))
else
    printf 'round\ttest\tstatus\tseconds\n' >"$out/runs.tsv"
    printf 'round\ttest\tfault\tclient_ms\tdaemon_outage_ms\n' >"$out/recoveries.tsv"
fi
last=$((first + rounds - 1))
echo "soak: ${#tests[@]} tests x $rounds rounds (rounds $first-$last), logs in $out"

for ((r = first; r <= last; r++)); do
    mkdir -p "$out/round-$r"
    for t in "${tests[@]}"; do
        log=$out/round-$r/${t//::/__}.log
        start=$(date +%s%N)
        cargo test --offline --test lab -- --test-threads=1 --nocapture --exact "$t" >"$log" 2>&1
        rc=$?
        secs=$((($(date +%s%N) - start) / 1000000000))
        if [ $rc -eq 0 ] && grep -q '^test result: ok. 1 passed' "$log"; then
            st=ok
        else
            st=FAILED
            dst=$out/failures/round-$r-${t//::/__}
            mkdir -p "$dst"
            cp "$log" "$dst/"
            # The QEMU logs and guest consoles that this run wrote to.
            find /var/log/libvirt/qemu build/lab -maxdepth 1 -type f -newermt "@$((start / 1000000000))" \
                -exec cp {} "$dst/" \; 2>/dev/null
        fi
        printf '%s\t%s\t%s\t%s\n' "$r" "$t" "$st" "$secs" >>"$out/runs.tsv"
        sed -n 's/.*understudy-recovery test=\([^ ]*\) fault=\([^ ]*\) client_ms=\([0-9]*\) daemon_outage_ms=\([^ ]*\).*/\1\t\2\t\3\t\4/p' "$log" |
            while IFS=$'\t' read -r _ fault ms dms; do
                printf '%s\t%s\t%s\t%s\t%s\n' "$r" "$t" "$fault" "$ms" "$dms" >>"$out/recoveries.tsv"
            done
        echo "soak: round $r/$last $t: $st (${secs} s)"
    done
done

# Per test: runs, failures and the slowest client-observed recovery (with its fault); then
# per fault: how often it was timed, the median and slowest client-observed recovery, and the
# daemon's largest outage estimate.
echo
awk -F'\t' '
    FNR == 1 { next }
    FILENAME ~ /runs.tsv$/ { runs[$2]++; if ($3 != "ok") fail[$2]++; next }
    {
        if (!($2 in slow) || $4 + 0 > slow[$2]) { slow[$2] = $4 + 0; slowf[$2] = $3 }
    }
    END {
        printf "%-72s %5s %8s %11s  %s\n", "test", "runs", "failures", "slowest_ms", "fault"
        for (t in runs)
            printf "%-72s %5d %8d %11s  %s\n", t, runs[t], fail[t] + 0, \
                (t in slow) ? slow[t] : "-", (t in slowf) ? slowf[t] : "-"
    }' "$out/runs.tsv" "$out/recoveries.tsv" | { read -r header; echo "$header"; sort; }
echo
sort -t$'\t' -k2,2 -k3,3 -k4,4n <(tail -n +2 "$out/recoveries.tsv") | awk -F'\t' '
    function flush() {
        if (key == "") return
        printf "%-40s %5d %10d %11d %16s\n", fault, n, ms[int((n + 1) / 2)], ms[n], (d == "") ? "-" : d
    }
    BEGIN { printf "%-40s %5s %10s %11s %16s\n", "fault", "times", "median_ms", "slowest_ms", "daemon_outage_ms" }
    $2 "/" $3 != key { flush(); key = $2 "/" $3; fault = $3; n = 0; d = "" }
    { ms[++n] = $4; if ($5 != "-" && (d == "" || $5 + 0 > d + 0)) d = $5 }
    END { flush() }'
failed=$(awk -F'\t' 'NR > 1 && $3 != "ok"' "$out/runs.tsv" | wc -l)
echo "soak: $failed failed runs; details in $out (runs.tsv, recoveries.tsv, failures/)"
[ "$failed" -eq 0 ]
