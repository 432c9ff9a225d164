#!/usr/bin/env bash
# How far ballooning shrinks a lab guest's host memory: boots one 192 MiB lab guest, then
# balloons it down step by step, printing QEMU's resident and private memory and the guest's
# own figures at each step (README: "Where the paused shadow's floor is"). Inside the lab:
#   scripts/lab-run.sh scripts/lab-exec.sh scripts/lab-balloon-floor.sh
set -u
cd "$(dirname "$0")/.."
D=balloonfloor
agent() { timeout 10 virsh qemu-agent-command "$D" "$1" 2>/dev/null; }
# Runs a /bin/sh script in the guest; its output on one line, or "(no answer)" after 20 s.
gexec() {
    local args pid st i
    args=$(jq -nc --arg s "$1" '{execute:"guest-exec",arguments:{path:"/bin/sh",arg:["-c",$s],"capture-output":true}}')
    pid=$(agent "$args" | jq -r '.return.pid // empty' 2>/dev/null)
    [ -n "$pid" ] || { echo "(no answer)"; return; }
    for i in $(seq 200); do
        st=$(agent "{\"execute\":\"guest-exec-status\",\"arguments\":{\"pid\":$pid}}")
        if [ "$(jq -r '.return.exited // false' <<<"$st" 2>/dev/null)" = true ]; then
            jq -r '.return["out-data"] // ""' <<<"$st" | base64 -d | tr '\n' ' '
            return
        fi
        sleep 0.1
    done
    echo "(no answer)"
}
qemu_mem() {
    grep -E "^(Rss|Private_Dirty|Private_Clean)" "/proc/$(cat /run/libvirt/qemu/$D.pid)/smaps_rollup" | tr -s ' \n' ' '
    echo
}
trap 'virsh destroy $D >/dev/null 2>&1; virsh undefine $D >/dev/null 2>&1' EXIT
scripts/lab-guest.sh start $D 10.77.0.53/24 >/dev/null || exit 1
until agent '{"execute":"guest-ping"}' | grep -q return; do sleep 0.2; done
sleep 10
uptime
echo "== booted, idle 10 s"; qemu_mem
echo "guest: $(gexec "dmesg | grep -m1 'Memory:'; grep -E '^(MemTotal|MemFree|MemAvailable|Cached|Shmem|Slab|SReclaimable|AnonPages):' /proc/meminfo")"
for mib in 160 128 112 96; do
    virsh setmem $D ${mib}M --live >/dev/null
    sleep 6
    echo "== balloon target ${mib} MiB, actual $(virsh dommemstat $D | awk '/actual/{print int($2/1024)}') MiB"
    qemu_mem
    echo "guest: $(gexec "grep -E '^(MemTotal|MemFree|MemAvailable|Shmem|Slab):' /proc/meminfo")"
done
uptime
