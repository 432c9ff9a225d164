#!/usr/bin/env bash
# Starts the several-host lab: `make lab-up HOSTS=3` (scripts/lab-up.sh runs this when HOSTS is
# not 1). HOSTS libvirt hosts h1..hN (2 to 9; the tests use 3), a switch joining their service
# bridges, a management network, a test client, shared storage and a one-member-per-host etcd
# cluster; scripts/lab-cluster.sh describes the layout. Running it again while that lab is up
# changes nothing. Anything that fails takes the whole lab down again.
#
# When it returns, $LAB_STATE/cluster.env (/run/understudy-lab/cluster.env) describes the lab,
# one KEY=value a line (no quotes, no spaces: `. cluster.env` in a shell, or split at the first
# `=`):
#   LAB_HOSTS=h1,h2,h3           ETCD_ENDPOINTS=http://10.78.0.1:2379,http://10.78.0.2:2379,...
#   LAB_SHARED=/run/understudy-lab/shared   LAB_LOCKSPACE=.../shared/lockd   LAB_SHARED_DISKS=.../shared/disks
#   LAB_CLIENT_NS=understudy-client   LAB_CLIENT_ADDR=10.77.0.1   LAB_CLIENT_MGMT_ADDR=10.78.0.254
#   LAB_SWITCH_NS=understudy-switch   LAB_SWITCH_BRIDGE=swbr0   LAB_MGMT_NS=understudy-mgmt
#   LAB_SERVICE_SUBNET=10.77.0.0/24   LAB_MGMT_SUBNET=10.78.0.0/24   LAB_HOST_BRIDGE=usbr0
# and for each host (H1_, H2_, H3_ ...):
#   H2_NETNS=understudy-h2   H2_MGMT_ADDR=10.78.0.2   H2_SERVICE_ADDR=10.77.0.202
#   H2_LIBVIRT_URI=qemu+tcp://10.78.0.2/system   H2_ETCD_ENDPOINT=http://10.78.0.2:2379
#   H2_SWITCH_PORT=up-h2   H2_MGMT_PORT=mg-h2   H2_DIR=/run/understudy-lab/hosts/h2
#
# usage: HOSTS=3 scripts/lab-up.sh     (or: make lab-up HOSTS=3)
set -euo pipefail
# shellcheck source=scripts/lab-common.sh
. "$(dirname "$0")/lab-common.sh"

[ "$(id -u)" -eq 0 ] || lab_die "must run as root"
lab_take_lock "$@"
HOSTS=${HOSTS:-3}
[[ $HOSTS =~ ^[2-9]$ ]] || lab_die "HOSTS=$HOSTS: the several-host lab has 2 to 9 hosts"
for tool in ip virsh libvirtd virtlockd etcd etcdctl nsenter unshare findmnt; do
    command -v "$tool" >/dev/null || lab_die "$tool not found; run make deps"
done
hosts=()
for n in $(seq 1 "$HOSTS"); do hosts+=("h$n"); done

# --- already up? -----------------------------------------------------------------------
if [ -f "$CLUSTER_ENV" ]; then
    want=$(IFS=,; echo "${hosts[*]}")
    have=$(sed -n 's/^LAB_HOSTS=//p' "$CLUSTER_ENV")
    [ "$have" = "$want" ] || lab_die "a lab with hosts $have is up; run make lab-down first"
    for h in "${hosts[@]}"; do
        host_libvirt_answers "$h" || lab_die "the lab is up but $h's libvirtd does not answer (powered off? scripts/fence_lab -o on -n $h), or run make lab-down"
    done
    lab_log "lab already up (hosts $have)"
    exit 0
fi
if lab_ns_exists || cluster_exists; then
    lab_die "parts of a lab are up (namespaces: $(ip netns list | awk '/^understudy-/ {print $1}' | tr '\n' ' ')); run make lab-down first"
fi
for pid in $(libvirt_daemon_pids) $(virtlockd_pids); do
    lab_die "a libvirt daemon ($(cat "/proc/$pid/comm" 2>/dev/null), pid $pid) is already running; the lab starts its own, one per host. Stop it first. Nothing was changed."
done

undo_on_failure() {
    local status=$?
    if [ "$status" -ne 0 ]; then
        lab_log "failed; taking the lab down again" >&2
        "$REPO_ROOT/scripts/lab-down.sh" >&2 || true
    fi
}
trap undo_on_failure EXIT
started=$(date +%s.%N)

# --- what libvirtd needs of the machine (as in the one-host lab) ------------------------
mkdir -p "$LAB_STATE" "$CLUSTER_HOSTS_DIR" "$CLUSTER_CACHE" "$LAB_SHARED_LOCKSPACE" "$LAB_SHARED_DISKS"
if ! getent group libvirt-qemu >/dev/null; then
    groupadd --system libvirt-qemu
    echo "group libvirt-qemu" >>"$LAB_CREATED"
fi
if ! getent passwd libvirt-qemu >/dev/null; then
    useradd --system --gid libvirt-qemu --home-dir /var/lib/libvirt --no-create-home \
        --shell /usr/sbin/nologin libvirt-qemu
    echo "user libvirt-qemu" >>"$LAB_CREATED"
fi
# Mount points of the hosts' private directories; nothing is written into them outside a host.
for dir in $LIBVIRT_STATE_DIRS; do
    [ -e "$dir" ] || { echo "dir $dir" >>"$LAB_CREATED"; mkdir -p "$dir"; }
done
lab_build_reaper

# --- networks --------------------------------------------------------------------------
# An L2 device namespace: no IPv6 of its own (no router solicitations or DAD in the captures).
new_ns() {
    ip netns add "$1"
    ip netns exec "$1" sysctl -q -w net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
    ip -n "$1" link set lo up
}
# STP off and no forward delay: a port forwards as soon as it is up.
new_bridge() {
    ip -n "$1" link add "$2" type bridge stp_state 0 forward_delay 0
    [ -z "${3:-}" ] || ip -n "$1" link set "$2" address "$3"
    ip -n "$1" link set "$2" up
}
new_ns "$SWITCH_NS"
new_bridge "$SWITCH_NS" "$SWITCH_BRIDGE" "$SWITCH_BRIDGE_MAC"
new_ns "$MGMT_NS"
new_bridge "$MGMT_NS" "$MGMT_BRIDGE"

ip netns add "$CLIENT_NS"
ip -n "$CLIENT_NS" link set lo up
ip -n "$CLIENT_NS" link add svc0 type veth peer name up-client netns "$SWITCH_NS"
ip -n "$CLIENT_NS" link set svc0 address "$CLIENT_MAC"
ip -n "$CLIENT_NS" addr add "$CLIENT_SERVICE_ADDR/24" dev svc0
ip -n "$CLIENT_NS" link add mgmt0 type veth peer name mg-client netns "$MGMT_NS"
ip -n "$CLIENT_NS" addr add "$CLIENT_MGMT_ADDR/24" dev mgmt0
ip -n "$SWITCH_NS" link set up-client master "$SWITCH_BRIDGE" up
ip -n "$MGMT_NS" link set mg-client master "$MGMT_BRIDGE" up
ip -n "$CLIENT_NS" link set svc0 up
ip -n "$CLIENT_NS" link set mgmt0 up

etcd_cluster=""
etcd_endpoints=""
for h in "${hosts[@]}"; do
    mgmt=$(host_mgmt_addr "$h")
    etcd_cluster+="${etcd_cluster:+,}$h=http://$mgmt:$ETCD_PEER_PORT"
    etcd_endpoints+="${etcd_endpoints:+,}http://$mgmt:$ETCD_CLIENT_PORT"
done

for h in "${hosts[@]}"; do
    ns=$(host_ns "$h")
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    # The service bridge, with a fixed MAC (see lab-up.sh) and the host's service address.
    ip -n "$ns" link add usbr0 type bridge stp_state 0 forward_delay 0
    ip -n "$ns" link set usbr0 address "$(host_bridge_mac "$h")"
    ip -n "$ns" addr add "$(host_service_addr "$h")/24" dev usbr0
    ip -n "$ns" link add uplink type veth peer name "up-$h" netns "$SWITCH_NS"
    ip -n "$ns" link set uplink master usbr0
    ip -n "$SWITCH_NS" link set "up-$h" master "$SWITCH_BRIDGE" up
    ip -n "$ns" link add mgmt0 type veth peer name "mg-$h" netns "$MGMT_NS"
    ip -n "$ns" addr add "$(host_mgmt_addr "$h")/24" dev mgmt0
    ip -n "$MGMT_NS" link set "mg-$h" master "$MGMT_BRIDGE" up
    for link in usbr0 uplink mgmt0; do ip -n "$ns" link set "$link" up; done
done
lab_log "networks up: switch $SWITCH_NS/$SWITCH_BRIDGE, management $MGMT_NS/$MGMT_BRIDGE ($MGMT_PREFIX.0/24), client $CLIENT_NS ($CLIENT_SERVICE_ADDR, $CLIENT_MGMT_ADDR)"

# --- each host's disk: libvirt's configuration and state, etcd's data ---------------------
for h in "${hosts[@]}"; do
    dir=$(host_dir "$h")
    mgmt=$(host_mgmt_addr "$h")
    mkdir -p "$dir/etc" "$dir/lib" "$dir/log" "$dir/etcd"
    chmod 700 "$dir/etcd"
    cat >"$dir/etc/libvirtd.conf" <<EOF
# Lab host $h (written by scripts/lab-cluster-up.sh): reached as qemu+tcp://$mgmt/system from the
# management network, without authentication (a lab on private namespaces only).
listen_tls = 0
listen_tcp = 1
listen_addr = "$mgmt"
auth_tcp = "none"
host_uuid = "75737461-6200-4000-8000-00000000000$(cluster_host_num "$h")"
EOF
    cat >"$dir/etc/qemu.conf" <<EOF
$LAB_CONF_MARK (lab host $h, written by scripts/lab-cluster-up.sh)
# As in the one-host lab: QEMU as root without a security driver, stdio to files, and libvirt's
# lock manager (virtlockd) with its lockspace on the shared storage.
user = "root"
group = "root"
swtpm_user = "root"
swtpm_group = "root"
security_driver = "none"
stdio_handler = "file"
lock_manager = "lockd"
EOF
    cat >"$dir/etc/qemu-lockd.conf" <<EOF
$LAB_CONF_MARK (lab host $h, written by scripts/lab-cluster-up.sh)
# Every disk of a running domain gets a lease, a lock file in the shared lockspace named by the
# sha256 of its path. Every host's virtlockd locks the same files, so a disk that a domain on
# one host uses is refused ("resource busy") to a domain on any other host.
auto_disk_leases = 1
require_lease_for_disks = 1
file_lockspace_dir = "$LAB_SHARED_LOCKSPACE"
EOF
    printf '%s\n' \
        --name "$h" --data-dir "$dir/etcd" \
        --listen-client-urls "http://$mgmt:$ETCD_CLIENT_PORT,http://127.0.0.1:$ETCD_CLIENT_PORT" \
        --advertise-client-urls "http://$mgmt:$ETCD_CLIENT_PORT" \
        --listen-peer-urls "http://$mgmt:$ETCD_PEER_PORT" \
        --initial-advertise-peer-urls "http://$mgmt:$ETCD_PEER_PORT" \
        --initial-cluster "$etcd_cluster" --initial-cluster-state new \
        --initial-cluster-token understudy-lab \
        --heartbeat-interval "$ETCD_HEARTBEAT_MS" --election-timeout "$ETCD_ELECTION_MS" \
        --logger zap --log-outputs stderr >"$dir/etcd.args"
done

# --- power the hosts on, one after the other (the first fills the QEMU capabilities cache) --
for h in "${hosts[@]}"; do
    host_power_on "$h"
    lab_log "host $h on: libvirtd qemu+tcp://$(host_mgmt_addr "$h")/system, virtlockd, etcd member (holder pid $(host_holder_pid "$h"))"
done

# --- the etcd cluster -----------------------------------------------------------------------
for _ in $(seq 1 300); do
    healthy=$("$REPO_ROOT/scripts/lab-host-exec.sh" h1 etcdctl --endpoints="$etcd_endpoints" \
        --dial-timeout=1s --command-timeout=2s endpoint health 2>&1 | grep -c 'is healthy' || true)
    [ "$healthy" -eq "$HOSTS" ] && break
    sleep 0.1
done
[ "$healthy" -eq "$HOSTS" ] || lab_die "etcd: $healthy of $HOSTS members healthy after 30 s (see $CLUSTER_HOSTS_DIR/h*/etcd.log)"
lab_log "etcd cluster of $HOSTS members healthy: $etcd_endpoints"

# --- what scripts and tests read --------------------------------------------------------------
{
    echo "# The several-host lab (scripts/lab-cluster-up.sh); removed by scripts/lab-down.sh."
    echo "LAB_HOSTS=$(IFS=,; echo "${hosts[*]}")"
    echo "ETCD_ENDPOINTS=$etcd_endpoints"
    echo "LAB_SHARED=$LAB_SHARED"
    echo "LAB_LOCKSPACE=$LAB_SHARED_LOCKSPACE"
    echo "LAB_SHARED_DISKS=$LAB_SHARED_DISKS"
    echo "LAB_CLIENT_NS=$CLIENT_NS"
    echo "LAB_CLIENT_ADDR=$CLIENT_SERVICE_ADDR"
    echo "LAB_CLIENT_MGMT_ADDR=$CLIENT_MGMT_ADDR"
    echo "LAB_SWITCH_NS=$SWITCH_NS"
    echo "LAB_SWITCH_BRIDGE=$SWITCH_BRIDGE"
    echo "LAB_MGMT_NS=$MGMT_NS"
    echo "LAB_MGMT_BRIDGE=$MGMT_BRIDGE"
    echo "LAB_SERVICE_SUBNET=$SERVICE_PREFIX.0/24"
    echo "LAB_MGMT_SUBNET=$MGMT_PREFIX.0/24"
    echo "LAB_HOST_BRIDGE=usbr0"
    for h in "${hosts[@]}"; do
        p=H$(cluster_host_num "$h")_
        mgmt=$(host_mgmt_addr "$h")
        echo "${p}NETNS=$(host_ns "$h")"
        echo "${p}MGMT_ADDR=$mgmt"
        echo "${p}SERVICE_ADDR=$(host_service_addr "$h")"
        echo "${p}LIBVIRT_URI=qemu+tcp://$mgmt/system"
        echo "${p}ETCD_ENDPOINT=http://$mgmt:$ETCD_CLIENT_PORT"
        echo "${p}SWITCH_PORT=up-$h"
        echo "${p}MGMT_PORT=mg-$h"
        echo "${p}DIR=$(host_dir "$h")"
    done
} >"$CLUSTER_ENV.tmp"
mv -f "$CLUSTER_ENV.tmp" "$CLUSTER_ENV"
lab_log "lab of $HOSTS hosts up in $(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s; see $CLUSTER_ENV"
