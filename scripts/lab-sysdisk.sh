#!/usr/bin/env bash
# A system disk for lab guests: a qcow2 image of an ext4 file system labelled ussys whose www/
# holds the site the guest's page server answers under /site/ (see images/README.md). Two
# images that differ in one file make a golden image for a canary.
#
# usage:
#   scripts/lab-sysdisk.sh PATH [NAME=CONTENT ...]   creates PATH (16 MiB qcow2) with www/NAME
#                                                    holding CONTENT and a newline; replaces PATH
#
# NAME is 1-64 of [A-Za-z0-9_.-] (what the page server accepts), not starting with a dot.
set -euo pipefail
# shellcheck source=scripts/lab-common.sh
. "$(dirname "$0")/lab-common.sh"

usage() {
    sed -n 's/^#   \(scripts\/lab-sysdisk.sh .*\)/\1/p' "$0" | sed 's/^/usage: /' >&2
    exit 2
}

[ $# -ge 1 ] || usage
path=$(realpath -m -- "$1")
shift
[[ $path =~ ^[A-Za-z0-9_./+-]+$ ]] || lab_die "system disk path '$path' has characters not allowed here"

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/root/www"
for kv in "$@"; do
    name=${kv%%=*}
    [[ $kv == *=* && $name =~ ^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$ ]] ||
        lab_die "invalid NAME=CONTENT '$kv' (NAME: 1-64 of A-Z a-z 0-9 _ . -, no leading dot)"
    printf '%s\n' "${kv#*=}" >"$stage/root/www/$name"
done
truncate -s 16M "$stage/disk.raw"
# -d fills the file system from the staged tree; everything initialised now (no lazy init).
mkfs.ext4 -q -F -L ussys -d "$stage/root" -E lazy_itable_init=0,lazy_journal_init=0 "$stage/disk.raw"
mkdir -p "$(dirname "$path")"
qemu-img convert -q -f raw -O qcow2 "$stage/disk.raw" "$path.partial"
mv "$path.partial" "$path"
lab_log "created system disk $path (qcow2, ext4 ussys, www: ${*:-empty})" >&2
