#!/usr/bin/env bash
# Runs every AFL target (fuzz/targets) for FUZZ_SECONDS each, one after the other, under
# nice, and reports per target: executions, paths (AFL's corpus_count), crashes and hangs,
# read from AFL's fuzzer_stats. Inputs that crash or hang a target are copied to
# build/fuzz/findings/<target>/; turn each into a fixture under fuzz/crashes/<target>/ with
# the fix. Exits non-zero if any target crashed, hung or could not run.
#
# usage: scripts/fuzz.sh [target...]
#   FUZZ_SECONDS  seconds per target (default 60)
#   FUZZ_OUT      work directory (default build/fuzz)
#   FUZZ_BUILD    0 to reuse the targets as built (default: cargo afl build first)
#   FUZZ_EXAMPLES 1 to build fuzz/examples too (the CPU-cost tools, built as the targets are)
#   FUZZ_QUICK    1 for a build without optimisation (AFL_OPT_LEVEL=0, in fuzz/target/check):
#                 a quarter of the build time, several times fewer executions a second; for
#                 the brief runs of make test
#   FUZZ_RESUME   1 to continue each target's previous run in FUZZ_OUT (AFL's `-i -`: its queue,
#                 not only the kept corpus), so that long runs add up; a target without one
#                 starts from its seeds. A resumed queue was calibrated and searched with
#                 cmplog in its earlier runs: they run again briefly (AFL_FAST_CAL,
#                 AFL_CMPLOG_ONLY_NEW), not for the first minutes of the run. Seeds added
#                 since its first run join the queue. Crashes and hangs are the run's own
#                 (AFL's stats count those of the runs before it too)
#   FUZZ_LEDGER   a file to append one Markdown row per target run to (see fuzz/RUNS.md)
#   FUZZ_EXECS    also stop a target once its AFL output has about this many executions (`-E`;
#                 a resumed run counts those of the runs before it)
#   FUZZ_TIMEOUT  AFL's limit per input in ms (`-t`; default: AFL's own, from the queue's speed,
#                 or a resumed run's). On a loaded machine at `nice -n 19` a resumed queue's
#                 slower inputs go over AFL's limit at calibration and are skipped for the run
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${FUZZ_SECONDS:-60}
out=${FUZZ_OUT:-build/fuzz}
[[ $seconds =~ ^[0-9]+$ ]] && [ "$seconds" -gt 0 ] || { echo "fuzz: FUZZ_SECONDS must be a positive integer" >&2; exit 2; }

# `target seed-dir...` lines of fuzz/targets.
declare -A seeds=()
order=()
while read -r name dirs; do
    [[ -z $name || $name == \#* ]] && continue
    seeds[$name]=$dirs
    order+=("$name")
done <fuzz/targets
if [ $# -gt 0 ]; then
    for t in "$@"; do [ -n "${seeds[$t]+x}" ] || { echo "fuzz: unknown target $t (see fuzz/targets)" >&2; exit 2; }; done
    order=("$@")
fi

command -v cargo-afl >/dev/null || { echo "fuzz: cargo-afl is missing: run make fuzz-deps" >&2; exit 2; }
target_dir=fuzz/target
# cargo-afl builds at opt-level 3 in either profile (AFL_OPT_LEVEL); the release profile only
# drops the debug info, which makes the build cheaper.
profile=release
profile_flag=(--release)
# The brief runs of `make test` (FUZZ_QUICK) use an unoptimised build on a machine that may be
# busy: an input over AFL's few-ms timeout there is load, not a bug. They give every input a
# second and report hangs without failing; crashes fail them as always. They calibrate each
# seed in three runs, not eight (AFL_FAST_CAL): the seeds are most of their time.
hang_timeout=()
hangs_fail=1
if [ "${FUZZ_QUICK:-0}" = 1 ]; then
    export AFL_OPT_LEVEL=0 AFL_FAST_CAL=1
    target_dir=fuzz/target/check
    profile=debug
    profile_flag=()
    hang_timeout=(-t 1000)
    hangs_fail=0
fi
if [ -n "${FUZZ_TIMEOUT:-}" ]; then
    [[ $FUZZ_TIMEOUT =~ ^[0-9]+$ ]] || { echo "fuzz: FUZZ_TIMEOUT must be milliseconds" >&2; exit 2; }
    hang_timeout=(-t "$FUZZ_TIMEOUT")
fi
# cargo-afl (stable Rust, no AFL++ LLVM plugins) instruments with LLVM's sancov pass and turns
# its block pruning off, so every basic block calls AFL's callback: 42% of domain_xml's CPU.
# AFL++'s own pass prunes (blocks whose coverage another block implies, as libFuzzer does);
# cargo-afl appends RUSTFLAGS after its own, so ours wins. Changing it rebuilds every crate.
export RUSTFLAGS="-C llvm-args=-sanitizer-coverage-prune-blocks=1 ${RUSTFLAGS:-}"
# The optimised build compiles indextree without debug assertions (see scripts/fuzz-rustc.sh).
# cargo does not rebuild for a changed wrapper: a build directory from before it needs
# `rm -r fuzz/target/release/.fingerprint/indextree-*` once.
[ "${FUZZ_QUICK:-0}" = 1 ] || export RUSTC_WRAPPER="$PWD/scripts/fuzz-rustc.sh"
# FUZZ_EXAMPLES=1 also builds fuzz/examples (time_inputs, domain_xml_phases) as the targets are.
selection=()
[ "${FUZZ_EXAMPLES:-0}" = 1 ] && selection=(--lib --bins --examples)
if [ "${FUZZ_BUILD:-1}" != 0 ]; then
    echo "fuzz: cargo afl build (fuzz/, into $target_dir)"
    nice -n 19 cargo afl build "${profile_flag[@]}" "${selection[@]}" --features afl \
        --manifest-path fuzz/Cargo.toml --offline --target-dir "$target_dir"
fi

export AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_SKIP_CPUFREQ=1 AFL_NO_UI=1
# The machine is shared: do not pin a core, and leave it to the others when they need it.
export AFL_NO_AFFINITY=1

rows=()
status=0
for t in "${order[@]}"; do
    dir=$out/$t
    stats=$dir/out/default/fuzzer_stats
    stat() { awk -F' *: *' -v k="$1" '$1 == k { print $2 }' "$stats"; }
    input=("$dir/in")
    execs_before=0
    time_before=0
    crashes_before=0
    hangs_before=0
    resume_env=()
    if [ "${FUZZ_RESUME:-0}" = 1 ] && [ -d "$dir/out/default/queue" ] && [ -f "$stats" ]; then
        input=(-)
        resume_env=(AFL_FAST_CAL=1 AFL_CMPLOG_ONLY_NEW=1)
        execs_before=$(stat execs_done)
        time_before=$(stat run_time)
        crashes_before=$(stat saved_crashes)
        hangs_before=$(stat saved_hangs)
    else
        rm -rf "$dir"
    fi
    mkdir -p "$dir/in" "$out/findings/$t"
    # Seeds: the fixtures in the tree, the corpus kept from earlier runs, past crashes.
    # AFL skips inputs over 1 MiB; none of ours comes close.
    for s in ${seeds[$t]} fuzz/corpus/$t fuzz/crashes/$t; do
        [ -d "$s" ] || continue
        for f in "$s"/*; do
            [ -f "$f" ] && cp "$f" "$dir/in/$(echo "$s" | tr / _)__$(basename "$f")"
        done
    done
    # A resumed queue does not read the seeds again: add those it has neither by name (AFL
    # trims queued inputs in place, so a seed's content may have changed there) nor by content
    # (the kept corpus comes from queues) as the next queue entries, named as AFL names a seed
    # so that its in-place resume takes them as they are.
    added=0
    if [ "${input[0]}" = - ]; then
        queue=$dir/out/default/queue
        next=$(find "$queue" -maxdepth 1 -name 'id:*' | wc -l)
        declare -A queued=()
        while read -r sum _; do queued[$sum]=1; done < <(find "$queue" -maxdepth 1 -type f -exec md5sum {} +)
        for f in "$dir/in"/*; do
            name=$(basename "$f")
            # AFL skips empty inputs.
            [ -s "$f" ] || continue
            compgen -G "$queue/id:*,orig:$name" >/dev/null && continue
            sum=$(md5sum <"$f")
            [ -n "${queued[${sum%% *}]+x}" ] && continue
            cp "$f" "$queue/$(printf 'id:%06d' "$next"),time:0,execs:0,orig:$name"
            next=$((next + 1))
            added=$((added + 1))
        done
        unset queued
    fi
    if [ "${input[0]}" != - ] && [ -z "$(ls -A "$dir/in")" ]; then
        echo "fuzz: $t has no seed input" >&2
        status=1
        continue
    fi
    # A dictionary of the parser's own tokens (fuzz/dict/, from its string literals and field
    # names) lets AFL build keys and elements it would rarely guess.
    dict=()
    [ -f "fuzz/dict/$t.dict" ] && dict=(-x "fuzz/dict/$t.dict")
    until_execs=()
    [ -n "${FUZZ_EXECS:-}" ] && until_execs=(-E "$FUZZ_EXECS")
    if [ "${input[0]}" = - ]; then
        echo "fuzz: $t for ${seconds}s (resuming $dir/out, $execs_before executions so far, $added new seeds)"
    else
        echo "fuzz: $t for ${seconds}s ($(ls "$dir/in" | wc -l) seeds)"
    fi
    started=$(date -u '+%Y-%m-%d %H:%M')
    if ! env "${resume_env[@]}" nice -n 19 cargo afl fuzz -i "${input[0]}" -o "$dir/out" -V "$seconds" "${until_execs[@]}" \
        "${dict[@]}" "${hang_timeout[@]}" "$target_dir/$profile/$t" >>"$dir/afl.log" 2>&1; then
        echo "fuzz: afl-fuzz failed on $t; the end of $dir/afl.log:" >&2
        tail -20 "$dir/afl.log" >&2
        rows+=("$t - - - - - - - - failed")
        status=1
        continue
    fi
    # A resumed run's stats count from the start of its first run: the crashes and hangs of
    # the runs before it were reported (and fixed) then, so only this run's own count.
    crashes=$(($(stat saved_crashes) - crashes_before))
    hangs=$(($(stat saved_hangs) - hangs_before))
    for f in "$dir"/out/default/crashes/id:* "$dir"/out/default/hangs/id:*; do
        [ -f "$f" ] && cp "$f" "$out/findings/$t/$(basename "$(dirname "$f")")-$(basename "$f" | tr ':,' '__')"
    done
    verdict=ok
    if [ "$crashes" != 0 ] || { [ "$hangs" != 0 ] && [ "$hangs_fail" = 1 ]; }; then
        verdict="findings:$out/findings/$t"
        status=1
    elif [ "$hangs" != 0 ]; then
        verdict="hangs-reported:$out/findings/$t"
    fi
    execs=$(($(stat execs_done) - execs_before))
    run_time=$(($(stat run_time) - time_before))
    rows+=("$t $run_time $execs $(stat execs_done) $(stat execs_per_sec) $(stat corpus_count) $(stat stability) $crashes $hangs $verdict")
    if [ -n "${FUZZ_LEDGER:-}" ]; then
        printf '| %s | `%s` | %s s | %s | %s | %s | %s | %s / %s | %s |\n' "$started" "$t" "$run_time" \
            "$execs" "$(stat execs_done)" "$(stat corpus_count)" "$(stat stability)" "$crashes" "$hangs" \
            "$([ "${input[0]}" = - ] && echo resumed || echo seeds)" >>"$FUZZ_LEDGER"
    fi
done

printf '\n%-11s %8s %11s %11s %9s %6s %9s %7s %5s  %s\n' target seconds executions "all runs" execs/s paths stability crashes hangs result
for r in "${rows[@]}"; do
    # shellcheck disable=SC2086 # rows are space-separated fields
    printf '%-11s %8s %11s %11s %9s %6s %9s %7s %5s  %s\n' $r
done
exit "$status"
