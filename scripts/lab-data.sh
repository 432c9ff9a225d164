#!/usr/bin/env bash
# Data disks for lab guests: an ext4 file system labelled usdata (the ledger's, see
# images/us-data) on a raw image, handed to a guest as a file, a block device or an NBD export.
#
# usage:
#   scripts/lab-data.sh file PATH         creates PATH (64 MiB raw, ext4 usdata) unless it exists
#   scripts/lab-data.sh loop PATH         the same, then attaches it to a loop device; prints /dev/loopN
#   scripts/lab-data.sh unloop DEV        detaches a loop device made by `loop`
#   scripts/lab-data.sh nbd PATH PORT     the same image, exported as "usdata" by qemu-nbd inside the
#                                         lab namespace on 10.77.0.1:PORT; prints qemu-nbd's pid
#   scripts/lab-data.sh stop-nbd PORT     stops that export
#
# Images live under build/lab/ and go with it; lab-down detaches the lab's loop devices and
# stops its qemu-nbd servers. qemu-nbd serves one client at a time (--shared=1): the export is
# a second guard against two writers, besides understudy's own fencing.
set -euo pipefail
# shellcheck source=scripts/lab-common.sh
. "$(dirname "$0")/lab-common.sh"

usage() {
    sed -n 's/^#   \(scripts\/lab-data.sh .*\)/\1/p' "$0" | sed 's/^/usage: /' >&2
    exit 2
}

[ "$(id -u)" -eq 0 ] || lab_die "must run as root"
[ $# -ge 2 ] || usage

make_image() {
    local path=$1
    [[ $path =~ ^[A-Za-z0-9_./+-]+$ ]] || lab_die "data disk path '$path' has characters not allowed here"
    if [ ! -e "$path" ]; then
        mkdir -p "$(dirname "$path")"
        local tmp=$path.partial
        rm -f "$tmp"
        truncate -s 64M "$tmp"
        # Everything initialised now: no lazy init writing behind the guest's back later. The
        # smallest journal (1024 blocks, 1 MiB): a shadow taking the disk over after a crash
        # replays at most that much before it mounts (4 MiB, mke2fs's default here, took
        # 200-300 ms to replay under TCG); a cold restart replays the same journal.
        mkfs.ext4 -q -F -L usdata -J size=1 -E lazy_itable_init=0,lazy_journal_init=0 "$tmp"
        mv "$tmp" "$path"
        lab_log "created data disk $path (64 MiB raw, ext4, label usdata)" >&2
    fi
}

nbd_pidfile() { echo "$LAB_STATE/qemu-nbd-$1.pid"; }

case "$1" in
    file)
        make_image "$(realpath -m -- "$2")"
        realpath -- "$2"
        ;;
    loop)
        path=$(realpath -m -- "$2")
        make_image "$path"
        dev=$(losetup --find --show "$path")
        lab_log "attached $path to $dev" >&2
        echo "$dev"
        ;;
    unloop)
        [[ $2 =~ ^/dev/loop[0-9]+$ ]] || lab_die "not a loop device: $2"
        losetup -d "$2"
        ;;
    nbd)
        [ $# -eq 3 ] || usage
        path=$(realpath -m -- "$2") port=$3
        [[ $port =~ ^[0-9]{4,5}$ ]] || lab_die "invalid port '$port'"
        lab_ns_exists || lab_die "the lab is not up"
        make_image "$path"
        mkdir -p "$LAB_STATE"
        pidfile=$(nbd_pidfile "$port")
        ip netns exec "$LAB_NS" qemu-nbd --fork --persistent --shared=1 --format=raw \
            --export-name=usdata --bind=10.77.0.1 --port="$port" --pid-file="$pidfile" "$path"
        lab_log "qemu-nbd serves $path as nbd://10.77.0.1:$port/usdata in $LAB_NS" >&2
        cat "$pidfile"
        ;;
    stop-nbd)
        pidfile=$(nbd_pidfile "$2")
        [ -f "$pidfile" ] || lab_die "no qemu-nbd on port $2"
        stop_pid "$(cat "$pidfile")" 50
        rm -f "$pidfile"
        ;;
    *) usage ;;
esac
