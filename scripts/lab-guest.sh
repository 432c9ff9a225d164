#!/usr/bin/env bash
# Domain XML for a lab test guest (build/guest/), and starting one.
#
# usage:
#   scripts/lab-guest.sh xml   NAME IP [--disk PATH] [DATA] [--mem MIB] [--role R] [--accel tcg|kvm] [--kernel elf|bzimage] [--mac MAC]
#   scripts/lab-guest.sh start NAME IP [--host H] [--disk PATH [--create-disk]] [DATA [--create-data]] [--mem MIB] [--role R] [--accel tcg|kvm] [--kernel elf|bzimage] [--mac MAC]
#
# DATA, a data disk (ext4, label usdata: the ledger's, see images/us-data), one of:
#   --data PATH                 a raw image file
#   --data-block DEV            a host block device (the lab's loop devices: scripts/lab-data.sh)
#   --data-nbd HOST:PORT[/NAME] an NBD export (the lab's qemu-nbd: scripts/lab-data.sh)
# and where the guest sees it: --data-bus virtio (default: virtio-blk, target vdb) or scsi (a
# LUN, target sdb, on a virtio-scsi controller the guest then has, so a shadow can get the
# disk without a PCI hot-plug).
#
# `xml` only prints the domain XML on stdout (integration tests define guests
# from it themselves); `start` defines the domain in the lab's libvirtd and
# starts it. IP is the guest's a.b.c.d/prefix on the lab bridge usbr0.
# --create-disk makes PATH a new 64 MiB qcow2 image first if it does not exist;
# --create-data makes the --data PATH a new formatted data disk if it does not exist.
# --host H (start): define and start it on host H of the several-host lab (make lab-up HOSTS=3)
# instead of the one-host lab; give it disks on the shared storage
# (/run/understudy-lab/shared/disks/) so that another host can take them over.
# --mac: the guest's MAC (default: 52:54:00 + 3 bytes of md5(NAME)); the same MAC under another
# name, on another host, is the same service moved there.
# --kernel: `elf` boots build/guest/vmlinux (decompressed, PVH entry; about
# 10 s faster under TCG) and is the default when that file exists; `bzimage`
# boots build/guest/vmlinuz, the unmodified copy of /boot/vmlinuz-*.
set -euo pipefail
# shellcheck source=scripts/lab-common.sh
. "$(dirname "$0")/lab-common.sh"

usage() {
    sed -n 's/^#   \(scripts\/lab-guest.sh .*\)/\1/p' "$0" | sed 's/^/usage: /' >&2
    exit 2
}

[ $# -ge 3 ] || usage
mode=$1 name=$2 ip=$3
shift 3
case "$mode" in xml | start) ;; *) usage ;; esac

disk="" mem=192 role=primary accel=tcg create_disk="" kernel_kind="" host="" mac=""
data_kind="" data="" data_bus=virtio create_data=""
while [ $# -gt 0 ]; do
    case "$1" in
        --disk) [ $# -ge 2 ] || usage; disk=$2; shift 2 ;;
        --data) [ $# -ge 2 ] || usage; data_kind=file data=$2; shift 2 ;;
        --data-block) [ $# -ge 2 ] || usage; data_kind=block data=$2; shift 2 ;;
        --data-nbd) [ $# -ge 2 ] || usage; data_kind=nbd data=$2; shift 2 ;;
        --data-bus) [ $# -ge 2 ] || usage; data_bus=$2; shift 2 ;;
        --create-data) create_data=1; shift ;;
        --mem) [ $# -ge 2 ] || usage; mem=$2; shift 2 ;;
        --role) [ $# -ge 2 ] || usage; role=$2; shift 2 ;;
        --accel) [ $# -ge 2 ] || usage; accel=$2; shift 2 ;;
        --kernel) [ $# -ge 2 ] || usage; kernel_kind=$2; shift 2 ;;
        --create-disk) create_disk=1; shift ;;
        --host) [ $# -ge 2 ] || usage; host=$2; shift 2 ;;
        --mac) [ $# -ge 2 ] || usage; mac=$2; shift 2 ;;
        *) lab_die "unknown option $1" ;;
    esac
done

# Everything below ends up in XML and on the kernel cmdline: validate strictly
# so no quoting is ever needed.
[[ $name =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$ ]] ||
    lab_die "invalid NAME '$name' (letters, digits, _ . -; at most 63 characters)"
octet='(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])'
[[ $ip =~ ^$octet\.$octet\.$octet\.$octet/([0-9]|[12][0-9]|3[0-2])$ ]] ||
    lab_die "invalid IP '$ip' (expected a.b.c.d/prefix)"
if ! [[ $mem =~ ^[1-9][0-9]{1,5}$ ]] || [ "$mem" -lt 64 ]; then
    lab_die "invalid memory '$mem' MiB (an integer, at least 64)"
fi
[[ $role =~ ^[A-Za-z0-9_.-]{1,32}$ ]] || lab_die "invalid role '$role' (letters, digits, _ . -)"
case "$accel" in
    tcg) domain_type=qemu ;;
    kvm) domain_type=kvm ;;
    *) lab_die "invalid accel '$accel' (tcg or kvm)" ;;
esac
if [ -n "$disk" ]; then
    disk=$(realpath -m -- "$disk")
    [[ $disk =~ ^[A-Za-z0-9_./+-]+$ ]] || lab_die "disk path '$disk' has characters not allowed here"
fi
[ -z "$create_disk" ] || [ -n "$disk" ] || lab_die "--create-disk needs --disk PATH"
[ -z "$host" ] || cluster_valid_host "$host" || lab_die "invalid host '$host' (h1, h2, h3, ...)"
[ -z "$mac" ] || [[ $mac =~ ^([0-9a-f]{2}:){5}[0-9a-f]{2}$ ]] || lab_die "invalid MAC '$mac' (lower-case aa:bb:cc:dd:ee:ff)"
nbd_host="" nbd_port="" nbd_name=""
case "$data_kind" in
    "") ;;
    file | block)
        data=$(realpath -m -- "$data")
        [[ $data =~ ^[A-Za-z0-9_./+-]+$ ]] || lab_die "data disk path '$data' has characters not allowed here"
        ;;
    nbd)
        [[ $data =~ ^([0-9.]{7,15}):([0-9]{1,5})(/([A-Za-z0-9_.-]{1,64}))?$ ]] ||
            lab_die "invalid NBD export '$data' (expected a.b.c.d:port[/name])"
        nbd_host=${BASH_REMATCH[1]} nbd_port=${BASH_REMATCH[2]} nbd_name=${BASH_REMATCH[4]}
        ;;
esac
[ -z "$create_data" ] || [ "$data_kind" = file ] || lab_die "--create-data needs --data PATH"
case "$data_bus" in
    virtio) data_target=vdb ;;
    scsi) data_target=sdb ;;
    *) lab_die "invalid data bus '$data_bus' (virtio or scsi)" ;;
esac

if [ -z "$kernel_kind" ]; then
    if [ -f "$REPO_ROOT/build/guest/vmlinux" ]; then kernel_kind=elf; else kernel_kind=bzimage; fi
fi
case "$kernel_kind" in
    elf) kernel=$REPO_ROOT/build/guest/vmlinux ;;
    bzimage) kernel=$REPO_ROOT/build/guest/vmlinuz ;;
    *) lab_die "invalid kernel '$kernel_kind' (elf or bzimage)" ;;
esac
initrd=$REPO_ROOT/build/guest/initramfs.cpio.gz
console=$LAB_DIR/$name.console.log
# A stable locally administered MAC per name: 52:54:00 + 3 bytes of md5(name).
[ -n "$mac" ] || mac=$(printf '%s' "$name" | md5sum | sed -E 's/^(..)(..)(..).*/52:54:00:\1:\2:\3/')

domain_xml() {
    cat <<EOF
<domain type='$domain_type'>
  <name>$name</name>
  <memory unit='MiB'>$mem</memory>
  <currentMemory unit='MiB'>$mem</currentMemory>
  <vcpu placement='static' current='1'>2</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$kernel</kernel>
    <initrd>$initrd</initrd>
    <cmdline>console=ttyS0 quiet us.ip=$ip us.gw=10.77.0.1 us.host=$name us.role=$role</cmdline>
  </os>
  <features>
    <acpi/>
    <apic/>
  </features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
EOF
    if [ -n "$disk" ]; then
        cat <<EOF
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$disk'/>
      <target dev='vda' bus='virtio'/>
    </disk>
EOF
    fi
    if [ -n "$data_kind" ]; then
        case "$data_kind" in
            file) echo "    <disk type='file' device='disk'>" ;;
            block) echo "    <disk type='block' device='disk'>" ;;
            nbd) echo "    <disk type='network' device='disk'>" ;;
        esac
        echo "      <driver name='qemu' type='raw'/>"
        case "$data_kind" in
            file) echo "      <source file='$data'/>" ;;
            block) echo "      <source dev='$data'/>" ;;
            nbd)
                echo "      <source protocol='nbd'${nbd_name:+ name='$nbd_name'}>"
                echo "        <host name='$nbd_host' port='$nbd_port'/>"
                echo "      </source>"
                ;;
        esac
        echo "      <target dev='$data_target' bus='$data_bus'/>"
        echo "      <serial>usdata</serial>"
        echo "    </disk>"
        if [ "$data_bus" = scsi ]; then
            echo "    <controller type='scsi' index='0' model='virtio-scsi'/>"
        fi
    fi
    cat <<EOF
    <interface type='bridge'>
      <source bridge='$LAB_BRIDGE'/>
      <mac address='$mac'/>
      <model type='virtio'/>
    </interface>
    <serial type='file'>
      <source path='$console'/>
      <target port='0'/>
    </serial>
    <console type='file'>
      <source path='$console'/>
      <target type='serial' port='0'/>
    </console>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <memballoon model='virtio'>
      <stats period='1'/>
    </memballoon>
  </devices>
</domain>
EOF
}

case "$mode" in
    xml)
        domain_xml
        ;;
    start)
        if [ ! -f "$kernel" ] || [ ! -f "$initrd" ]; then
            lab_die "guest image missing in build/guest; run make images"
        fi
        virsh=(virsh -c "$LAB_URI")
        if [ -n "$host" ]; then
            host_libvirt_answers "$host" || lab_die "the libvirtd of lab host $host does not answer; run make lab-up HOSTS=3"
            virsh=("$REPO_ROOT/scripts/lab-host-exec.sh" "$host" virsh -c qemu:///system)
        else
            libvirt_answers || lab_die "the lab's libvirtd does not answer on $LAB_URI; run make lab-up"
        fi
        mkdir -p "$LAB_DIR"
        if [ -n "$create_disk" ] && [ ! -e "$disk" ]; then
            mkdir -p "$(dirname "$disk")"
            qemu-img create -q -f qcow2 "$disk" 64M
            lab_log "created disk $disk (qcow2, 64 MiB)"
        fi
        [ -z "$disk" ] || [ -f "$disk" ] || lab_die "disk $disk does not exist"
        if [ -n "$create_data" ]; then
            "$REPO_ROOT/scripts/lab-data.sh" file "$data" >/dev/null
        fi
        [ "$data_kind" != file ] || [ -f "$data" ] || lab_die "data disk $data does not exist"
        xml=$(mktemp)
        trap 'rm -f "$xml"' EXIT
        domain_xml >"$xml"
        "${virsh[@]}" define "$xml" >/dev/null
        "${virsh[@]}" start "$name" >/dev/null
        lab_log "started $name${host:+ on $host} ($ip, mac $mac, ${mem} MiB, role $role${disk:+, disk $disk}${data_kind:+, $data_kind data disk $data})"
        ;;
esac
