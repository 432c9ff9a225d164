#!/bin/sh
# RUSTC_WRAPPER for the optimised fuzz build (scripts/fuzz.sh): `$1` is rustc, the rest its
# arguments. cargo-afl compiles every crate with `-C debug-assertions`; for indextree (the node
# arena under xot) that means a walk re-checking its own sibling and parent links around every
# node xot appends, 7% of the domain_xml target's CPU. Those checks test indextree's
# bookkeeping, which understudy cannot reach but through xot's safe API; every other crate,
# understudy's and the fuzz targets' own included, keeps its debug assertions, and overflow
# checks stay on everywhere. A later `-C` flag wins, so this one is appended.
case " $* " in
*" --crate-name indextree "*) exec "$@" -C debug-assertions=off ;;
esac
exec "$@"
