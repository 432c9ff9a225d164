#!/usr/bin/env bash
# Prefixes each line of standard input with the time of day and the whole seconds since the
# line before it, so that a log says where the time went: a build phase's first line after a
# long compile, or a test runner's `test name ... ok` (printed when the test ends) shows how
# long that step took. Used by .ci/run on make test's output.
last=$SECONDS
while IFS= read -r line || [ -n "$line" ]; do
    printf '%(%T)T +%ss %s\n' -1 "$((SECONDS - last))" "$line"
    last=$SECONDS
done
