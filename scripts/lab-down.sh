#!/usr/bin/env bash
# Takes the understudy lab down completely, whichever was up (one host, or
# HOSTS=3: see the first section below). One host: every domain of the lab's libvirtd
# (destroyed and undefined), the lab's libvirtd, leftover understudy daemons in
# the namespace, the namespace itself (with its bridge and taps), build/lab/
# and the lab's qemu.conf (the original comes back). Safe to run at any time;
# does nothing when the lab is already down.
#
# Console and QEMU logs of the lab's guests are kept in build/lab-logs/ (the
# previous run's are replaced) for post-mortems.
#
# usage: scripts/lab-down.sh
set -euo pipefail
# shellcheck source=scripts/lab-common.sh
. "$(dirname "$0")/lab-common.sh"

[ "$(id -u)" -eq 0 ] || lab_die "must run as root"
lab_take_lock "$@"

# --- the several-host lab (make lab-up HOSTS=3), if that is what is up --------------------
# Every host is powered off (all its processes killed: QEMU, libvirtd, virtlockd, etcd, daemons;
# its mount namespace goes with its holder), then every lab namespace is deleted and the hosts'
# disks, the shared storage and cluster.env are removed. The hosts' logs (libvirtd, virtlockd,
# etcd, QEMU) are kept in build/lab-logs/<host>/.
if cluster_exists; then
    rm -rf "$LAB_LOGS"
    for h in $( (cluster_hosts; ls "$CLUSTER_HOSTS_DIR" 2>/dev/null) | sort -u); do
        cluster_valid_host "$h" || continue
        if [ -e "/run/netns/$(host_ns "$h")" ]; then
            (host_power_off "$h") || lab_log "could not power off host $h" >&2
        fi
        dir=$(host_dir "$h")
        mkdir -p "$LAB_LOGS/$h"
        for log in "$dir"/*.log "$dir/libvirtd.out" "$dir"/log/qemu/*.log; do
            [ -f "$log" ] && mv -f "$log" "$LAB_LOGS/$h/"
        done
        lab_log "host $h powered off (logs in $LAB_LOGS/$h)"
    done
    for ns in $(cluster_namespaces); do
        # Test clients and anything else still inside (the hosts' processes are gone already).
        for pid in $(ip netns pids "$ns" 2>/dev/null); do
            lab_log "stopping $(cat "/proc/$pid/comm" 2>/dev/null) (pid $pid) in $ns"
            stop_pid "$pid" 50
        done
        ip netns del "$ns"
        lab_log "deleted network namespace $ns"
    done
    rm -rf "$CLUSTER_HOSTS_DIR" "$CLUSTER_CACHE" "$LAB_SHARED" "$CLUSTER_ENV"
    lab_log "removed the hosts' state, the shared storage and $CLUSTER_ENV"
fi

lab_pid=""
foreign_pid=""
for pid in $(libvirt_daemon_pids); do
    if [ "$(pid_netns "$pid")" = "$LAB_NS" ]; then
        lab_pid=$pid
    else
        foreign_pid=$pid
    fi
done

# A lab whose libvirtd died may still have QEMU processes and persistent
# definitions: start a libvirtd in the namespace once more to clean them up.
started_for_cleanup=""
if [ -z "$lab_pid" ] && [ -z "$foreign_pid" ] && lab_ns_exists && lab_conf_is_ours; then
    lab_log "lab namespace exists without its libvirtd; starting one to clean up domains"
    mkdir -p "$LAB_STATE"
    rm -f "$LIBVIRTD_PIDFILE"
    LIBVIRT_LOG_OUTPUTS="3:file:$LAB_LIBVIRTD_LOG" \
        "$REPO_ROOT/scripts/lab-exec.sh" libvirtd -d || true
    for _ in $(seq 1 300); do
        libvirt_answers && break
        sleep 0.1
    done
    lab_pid=$(cat "$LIBVIRTD_PIDFILE" 2>/dev/null || true)
    started_for_cleanup=$lab_pid
fi

# Moves a log file into build/lab-logs/ if it exists.
keep_log() {
    if [ -f "$1" ]; then
        mkdir -p "$LAB_LOGS"
        mv -f "$1" "$LAB_LOGS/${2:-${1##*/}}"
    fi
}

# --- domains -------------------------------------------------------------------------
if [ -n "$lab_pid" ] && libvirt_answers; then
    if [ -d "$LAB_LOGS" ]; then
        rm -rf "$LAB_LOGS"
    fi
    virsh -c "$LAB_URI" list --all --name | while read -r dom; do
        [ -n "$dom" ] || continue
        virsh -c "$LAB_URI" destroy "$dom" >/dev/null 2>&1 || true
        # Transient domains are gone once destroyed; persistent ones lose their
        # definition, managed save image, snapshot/checkpoint metadata and NVRAM.
        # Their disks are not touched here (only files under build/lab are ours).
        if virsh -c "$LAB_URI" dominfo "$dom" >/dev/null 2>&1; then
            virsh -c "$LAB_URI" undefine "$dom" --managed-save --snapshots-metadata \
                --checkpoints-metadata --nvram >/dev/null ||
                lab_log "could not undefine domain $dom" >&2
        fi
        keep_log "/var/log/libvirt/qemu/$dom.log" "$dom.qemu.log"
        lab_log "removed domain $dom"
    done
elif [ -n "$foreign_pid" ]; then
    lab_log "libvirtd pid $foreign_pid is not the lab's (not in $LAB_NS); its domains are left alone"
fi

# --- daemons -------------------------------------------------------------------------
if [ -n "$lab_pid" ]; then
    stop_pid "$lab_pid" 100
    rm -f "$LIBVIRTD_PIDFILE"
    if [ -n "$started_for_cleanup" ]; then
        lab_log "stopped the clean-up libvirtd (pid $lab_pid)"
    else
        lab_log "stopped libvirtd (pid $lab_pid)"
    fi
fi

if lab_ns_exists; then
    # understudy daemons (and any QEMU the lab's libvirtd left behind) hold the
    # namespace's taps open; stop them before the namespace goes.
    for pid in $(ip netns pids "$LAB_NS" 2>/dev/null); do
        comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
        case "$comm" in
            understudy | qemu-system-* | qemu-nbd | lab-reaper)
                lab_log "stopping leftover $comm (pid $pid) in $LAB_NS"
                stop_pid "$pid" 50
                ;;
        esac
    done
    left=$(ip netns pids "$LAB_NS" 2>/dev/null | tr '\n' ' ')
    if [ -n "${left// /}" ]; then
        lab_log "warning: processes still in $LAB_NS (pids: $left); its interfaces live until they exit" >&2
    fi
    ip netns del "$LAB_NS"
    lab_log "deleted network namespace $LAB_NS"
fi

# A QEMU that libvirt no longer tracks (its libvirtd died, or a destroy was still
# tearing it down) would keep the guest's memory and taps; the lab owns every
# QEMU running a lab guest image.
lab_guest_qemus | while read -r pid args; do
    lab_log "stopping leftover QEMU (pid $pid): ${args:0:120}"
    stop_pid "$pid" 50
done

# virtlockd goes after libvirtd and every QEMU (it holds their disk leases).
for pid in $(virtlockd_pids); do
    stop_pid "$pid" 50
    lab_log "stopped virtlockd (pid $pid)"
done
rm -f "$VIRTLOCKD_PIDFILE"

# Loop devices over the lab's data disk images (scripts/lab-data.sh loop).
if [ -d "$LAB_DIR" ]; then
    losetup --list --noheadings --output NAME,BACK-FILE 2>/dev/null | while read -r dev file; do
        case "$file" in
            "$LAB_DIR"/*)
                losetup -d "$dev" && lab_log "detached $dev ($file)"
                ;;
        esac
    done
fi

# --- what lab-up created outside build/ ---------------------------------------------
if [ -f "$LAB_CREATED" ] && [ -n "$(libvirt_daemon_pids)" ]; then
    lab_log "a libvirt daemon still runs; leaving libvirt's directories, user and group in place" >&2
elif [ -f "$LAB_CREATED" ]; then
    # The QEMU logs of domains the tests created and removed themselves.
    if grep -qx 'dir /var/log/libvirt' "$LAB_CREATED"; then
        for log in /var/log/libvirt/qemu/*.log; do
            name=${log##*/}
            keep_log "$log" "${name%.log}.qemu.log"
        done
    fi
    while read -r kind what; do
        case "$kind" in
            dir)
                # Only ever the known libvirt state directories.
                case " $LIBVIRT_STATE_DIRS " in
                    *" $what "*) rm -rf "$what" && lab_log "removed $what" ;;
                esac
                ;;
            etc-before)
                [ -d /etc/libvirt ] || continue
                for path in /etc/libvirt/* /etc/libvirt/.[!.]*; do
                    [ -e "$path" ] || continue
                    entry=${path##*/}
                    case " $what qemu.conf qemu.conf.understudy-orig qemu-lockd.conf qemu-lockd.conf.understudy-orig " in
                        *" $entry "*) ;;
                        *) rm -rf "/etc/libvirt/$entry" && lab_log "removed /etc/libvirt/$entry" ;;
                    esac
                done
                ;;
            user) userdel "$what" 2>/dev/null && lab_log "removed user $what" ;;
            group) groupdel "$what" 2>/dev/null && lab_log "removed group $what" ;;
        esac
    done < <(sort -u "$LAB_CREATED" | sort -k1,1r)
fi

# --- files ---------------------------------------------------------------------------
if [ -d "$LAB_DIR" ]; then
    for log in "$LAB_DIR"/*.console.log; do
        keep_log "$log"
    done
    rm -rf "$LAB_DIR"
    lab_log "removed $LAB_DIR (logs kept in $LAB_LOGS)"
fi
if [ -d "$LAB_STATE" ]; then
    keep_log "$LAB_LIBVIRTD_LOG"
    keep_log "$VIRTLOCKD_LOG"
    keep_log "$LAB_STATE/libvirtd.out"
    rm -rf "$LAB_STATE"
fi

if lab_lockd_conf_is_ours; then
    if [ -e "$QEMU_LOCKD_CONF_ORIG" ]; then
        mv -f "$QEMU_LOCKD_CONF_ORIG" "$QEMU_LOCKD_CONF"
        lab_log "restored the original $QEMU_LOCKD_CONF"
    else
        rm -f "$QEMU_LOCKD_CONF"
        lab_log "removed the lab $QEMU_LOCKD_CONF"
    fi
fi

if lab_conf_is_ours; then
    if [ -e "$QEMU_CONF_ORIG" ]; then
        mv -f "$QEMU_CONF_ORIG" "$QEMU_CONF"
        lab_log "restored the original $QEMU_CONF"
    else
        rm -f "$QEMU_CONF"
        lab_log "removed the lab $QEMU_CONF"
    fi
fi
