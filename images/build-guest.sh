#!/usr/bin/env bash
# Builds the understudy lab test guest from Debian packages:
#   <out>/vmlinuz            copy of the kernel
#   <out>/vmlinux            the same kernel, decompressed (ELF with a PVH entry)
#   <out>/initramfs.cpio.gz  busybox + qemu-ga + virtio, SCSI and ext4 modules + e2fsprogs
#                            + /init + us-workload + us-httpd + us-data
#
# usage: images/build-guest.sh <kernel image> <output dir>
# The Makefile passes the newest /boot/vmlinuz-* and build/guest.
set -euo pipefail

die() { echo "build-guest: $*" >&2; exit 1; }

[ $# -eq 2 ] || die "usage: $0 <kernel image> <output dir>"
kernel=$1
out=$2
here=$(cd "$(dirname "$0")" && pwd)

[ -f "$kernel" ] || die "kernel image $kernel not found (install linux-image-amd64: make deps)"
kver=${kernel##*/vmlinuz-}
moddir=/lib/modules/$kver
[ -d "$moddir" ] || die "modules for kernel $kver not found in $moddir"
qemu_ga=/usr/sbin/qemu-ga
[ -x "$qemu_ga" ] || die "$qemu_ga not found (install qemu-guest-agent: make deps)"
busybox=$(command -v busybox) || die "busybox not found (install busybox-static: make deps)"
# busybox-static is the one without shared libraries; the initramfs has no libc for it.
if ldd "$busybox" >/dev/null 2>&1; then
    die "$busybox is dynamically linked; install busybox-static"
fi
for tool in gcc cpio gzip xz modprobe ldd readelf; do
    command -v "$tool" >/dev/null || die "$tool not found (make deps)"
done

mkdir -p "$out"
stage=$(mktemp -d "$out/.stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT
root=$stage/root

echo "build-guest: kernel $kver"

# --- directory skeleton ---------------------------------------------------------
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,run,tmp,var/lib,var/log,www,lib64}
mkdir -p "$root"/lib/modules
ln -s ../run "$root/var/run"
chmod 1777 "$root/tmp"
# The kernel opens /dev/console for /init before devtmpfs is mounted.
mknod -m 0600 "$root/dev/console" c 5 1
mknod -m 0666 "$root/dev/null" c 1 3

# --- busybox and its applets ----------------------------------------------------
cp "$busybox" "$root/bin/busybox"
"$busybox" --list-full | while read -r applet; do
    [ "$applet" = bin/busybox ] && continue
    [ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
done

# --- qemu-ga with every library ldd lists, plus the dynamic loader ----------------
copy_with_path() {
    mkdir -p "$root$(dirname "$1")"
    # Never through a busybox applet link already there: it points at the host's /bin/busybox.
    rm -f "$root$1"
    cp -L "$1" "$root$1"
}
copy_with_libs() {
    copy_with_path "$1"
    ldd "$1" | awk '
        $2 == "=>" && $3 ~ /^\// { print $3 }   # libfoo.so => /path (0x...)
        $1 ~ /^\//               { print $1 }   # /lib64/ld-linux-x86-64.so.2 (0x...)
    ' | sort -u | while read -r lib; do
        [ -e "$root$lib" ] || copy_with_path "$lib"
    done
}
copy_with_libs "$qemu_ga"

# --- ext4 tools for the data disk (busybox cannot make or check a journal) ------------
for tool in /sbin/mke2fs /sbin/e2fsck; do
    [ -x "$tool" ] || die "$tool not found (install e2fsprogs: make deps)"
    copy_with_libs "$tool"
done
ln -sf mke2fs "$root/sbin/mkfs.ext4"
ln -sf e2fsck "$root/sbin/fsck.ext4"
[ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$root/etc/mke2fs.conf"

# --- virtio modules in dependency order -----------------------------------------
# `modprobe -a --show-depends` prints one `insmod <path>` per module (and its
# dependencies first); keep the first occurrence of each.
: >"$root/lib/modules/load-order"
# ext4 (with jbd2, mbcache, crc16) for the data disk; crc32c_generic because ext4 and jbd2 ask
# the crypto API for crc32c at mount time, which without a usable modprobe in the guest only
# finds what is already loaded (crc32c-intel needs SSE4.2, which TCG's CPU may lack).
# virtio_scsi and sd_mod for data disks attached as SCSI LUNs; t10-pi (under sd_mod) needs the
# crc64-rocksoft and crct10dif algorithms loaded first for the same reason.
modprobe -a -S "$kver" --show-depends \
    virtio_pci virtio_console virtio_net virtio_blk virtio_balloon \
    crc32c_generic ext4 crct10dif_generic crc64_rocksoft_generic virtio_scsi sd_mod |
    awk '$1 == "insmod" && !seen[$2]++ { print $2 }' |
    while read -r path; do
        name=${path##*/}
        case "$name" in
            *.ko) cp "$path" "$root/lib/modules/$name" ;;
            *.ko.xz) xz -dc "$path" >"$root/lib/modules/${name%.xz}" ;;
            *.ko.zst) zstd -qdc "$path" >"$root/lib/modules/${name%.zst}" ;;
            *.ko.gz) gzip -dc "$path" >"$root/lib/modules/${name%.gz}" ;;
            *) die "unexpected module file $path" ;;
        esac
        echo "${name%.ko*}.ko" >>"$root/lib/modules/load-order"
    done
[ -s "$root/lib/modules/load-order" ] || die "no virtio modules found for $kver"
echo "build-guest: modules $(tr '\n' ' ' <"$root/lib/modules/load-order")"

# --- workload tool ----------------------------------------------------------------
gcc -static -O2 -Wall -Wextra -o "$root/bin/us-workload" "$here/workload.c"
# The page server (one process, page in memory: see httpd.c for why not busybox httpd).
gcc -static -O2 -Wall -Wextra -o "$root/bin/us-httpd" "$here/httpd.c"
# Finds and mounts the data disk (used at boot and by the lab's promote_commands).
install -m 0755 "$here/us-data" "$root/bin/us-data"

# --- /init and a few files the agent and busybox look at -------------------------
install -m 0755 "$here/init" "$root/init"
cat >"$root/etc/os-release" <<'EOF'
NAME="understudy lab guest"
ID=understudy-lab
PRETTY_NAME="understudy lab guest (busybox)"
EOF
echo 'root:x:0:0:root:/:/bin/sh' >"$root/etc/passwd"
echo 'root:x:0:' >"$root/etc/group"

# --- decompressed kernel --------------------------------------------------------------
# Under TCG the bzImage spends about 10 s decompressing its xz payload before
# Linux even starts. QEMU can boot the uncompressed ELF directly through its PVH
# entry point instead, which the lab guests use when vmlinux exists.
extract_vmlinux() {
    local image=$1 dest=$2 magic tool offset
    for pair in "fd377a585a00:xz -dc" "1f8b0800:gzip -dc" "28b52ffd:zstd -qdc"; do
        magic=${pair%%:*} tool=${pair#*:}
        command -v "${tool%% *}" >/dev/null || continue
        # Byte offsets of the magic in the image (hex dump, two chars a byte).
        for offset in $(od -An -v -tx1 "$image" | tr -d ' \n' | grep -bo "$magic" | cut -d: -f1); do
            [ $((offset % 2)) -eq 0 ] || continue
            tail -c +$((offset / 2 + 1)) "$image" | $tool >"$dest" 2>/dev/null || true
            if [ "$(head -c 4 "$dest" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] &&
                readelf -n "$dest" 2>/dev/null | grep -q 'Xen.*(0x00000012)'; then
                return 0
            fi
        done
    done
    return 1
}
if extract_vmlinux "$kernel" "$stage/vmlinux"; then
    echo "build-guest: extracted vmlinux with a PVH entry ($(du -h "$stage/vmlinux" | cut -f1))"
else
    rm -f "$stage/vmlinux"
    echo "build-guest: warning: no PVH-bootable vmlinux in $kernel; guests boot the slower bzImage" >&2
fi

# --- pack ---------------------------------------------------------------------------
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet --owner 0:0) |
    gzip -9 -n >"$stage/initramfs.cpio.gz"
cp "$kernel" "$stage/vmlinuz"
mv -f "$stage/initramfs.cpio.gz" "$out/initramfs.cpio.gz"
mv -f "$stage/vmlinuz" "$out/vmlinuz"
if [ -f "$stage/vmlinux" ]; then
    mv -f "$stage/vmlinux" "$out/vmlinux"
else
    rm -f "$out/vmlinux"
fi
echo "build-guest: wrote $out/{vmlinuz,vmlinux,initramfs.cpio.gz}; initramfs ($(du -h "$out/initramfs.cpio.gz" | cut -f1))"
