//! `make bench-cost`: what each way of standing by costs in host memory, and what it costs in
//! outage. One table from one run.
//!
//! For each way with one shadow per primary (paused; paused and shrunk, with free page
//! reporting; the same with the guest's reclaim first; saved; cold; paused with KSM; shrunk,
//! reclaimed and KSM) a daemon protects one lab guest with one shadow of that way. Once the
//! shadow stands by (and 5 s more, for the figures to settle; with KSM, until `ksmd` has
//! scanned everything twice), the daemon's `status` gives the primary's and the standing-by
//! shadow's host memory (cgroup charge, RSS, PSS, private; `integration/standby.rs` checks
//! those against the cgroups), and the bench reads where each QEMU process's memory is from
//! `/proc/<pid>/smaps`. Then BENCH_TRIALS times (default 3): SIGKILL of the active primary's
//! QEMU while an independent client, inside the lab, opens a new HTTP connection every 5 ms;
//! the outage is from the kill to the first page served by the promoted shadow. The next
//! trial waits for the replacement shadow.
//!
//! What a shadow costs is its *private* memory (pages no other process maps: what the host
//! gets back when it goes), per protected VM, as a share of the primary's *configured* memory
//! (what the operator sized the VM at). Private, not the cgroup charge, because KSM charges a
//! merged page to one cgroup only (the process whose copy it kept), so charges move between a
//! primary and its shadow as pages merge; configured, not the primary's own charge, because
//! that moves too (with KSM, and with TCG's translated code under this lab's emulation). The
//! cgroup charges and the share of the primary's charge (the measure of earlier runs) are
//! printed beside it, and the share without TCG's translated code (which exists only without
//! KVM: what applies on a KVM host).
//!
//! `pooled 1:4`: four primaries of one class share one pooled shadow (cloned from a golden
//! template domain). The memory per protected VM is the pooled shadow's divided by the four
//! primaries it covers; each trial kills the next primary, and the pooled shadow takes its
//! identity (its NIC with the primary's MAC, its address, host name); the next trial waits for
//! the pool to refill.
//!
//! The KSM rows come last: `ksm = true` turns the host's `/sys/kernel/mm/ksm/run` on (the
//! daemon does) and the bench reports what `ksmd` saved host-wide (`pages_sharing`) and the CPU
//! it used meanwhile; at the end the bench sets `run` back to what it was (unmerging first if
//! it was off).
//!
//! A larger primary whose service uses its memory (`BENCH_GUEST_MIB`, `BENCH_GUEST_USE_MIB`):
//! the ways with one shadow per primary then run with primaries (and so shadows) of
//! `BENCH_GUEST_MIB` MiB (default 192), and each primary's service holds `BENCH_GUEST_USE_MIB`
//! MiB of anonymous memory (`us-workload mem`, touched once, held until the way ends; default
//! 0: none) from before its shadow is measured. Three more ways, run only when BENCH_WAYS
//! names them (`paused+warm`, `paused+warm+shrunk`, `paused+warm+shrunk+reclaim`), give each
//! shadow a warm-up that runs the same service start (`us-workload mem` of the same size for
//! 2 s: its pages touched, then freed), the case where shrinking can win something back. Every
//! row also gives the shadow's private memory as a share of the primary's own private
//! memory, and what the service's profile plans for it now (`profile show`; a shrink takes the
//! lowest plan of the next day; a young profile plans nothing) beside what the shrink took;
//! and the shadow made after the trials, when the profile may plan.
//!
//! `paused+tb-cache` (a lab note, TCG only; run only when BENCH_WAYS names it): `paused` with
//! libvirt's `<tcg><tb-cache>` cap on QEMU's translated code (`BENCH_TB_CACHE_MIB`, default
//! 32) in the primary's definition, and so in its shadows'.
//!
//! Writes build/bench/cost.json. Not asserted anywhere: the targets are read off the
//! table.

#[path = "../integration/common.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const IP: &str = "10.77.0.74";

/// The ways with one shadow per primary, as class options, in the order they run. The KSM
/// ones last: KSM stays on until the end of the run.
const WAYS: [(&str, &str); 7] = [
    ("paused", ""),
    (
        "paused+shrunk",
        "standby_shrink = true\nfree_page_reporting = true",
    ),
    (
        "paused+shrunk+reclaim",
        "standby_shrink = true\nfree_page_reporting = true\nstandby_reclaim = true",
    ),
    ("saved", "standby_tier = \"saved\""),
    ("cold", "standby_tier = \"cold\""),
    ("paused+ksm", "ksm = true"),
    (
        "paused+shrunk+reclaim+ksm",
        "standby_shrink = true\nfree_page_reporting = true\nstandby_reclaim = true\nksm = true",
    ),
];

/// Ways run only when BENCH_WAYS names them: a shadow whose warm-up touches the primary's
/// working set and frees it again (`{warm}`: the warm-up command, filled in with
/// BENCH_GUEST_USE_MIB).
const WARM_WAYS: [(&str, &str); 3] = [
    ("paused+warm", "{warm}"),
    (
        "paused+warm+shrunk",
        "{warm}\nstandby_shrink = true\nfree_page_reporting = true",
    ),
    (
        "paused+warm+shrunk+reclaim",
        "{warm}\nstandby_shrink = true\nfree_page_reporting = true\nstandby_reclaim = true",
    ),
];

/// Run only when BENCH_WAYS names it: `paused` with QEMU's translated code capped.
const TB_CACHE_WAY: &str = "paused+tb-cache";

/// The pooled way runs before the first KSM way.
const POOLED: &str = "pooled";

/// The pooled way: primaries per pooled shadow, their addresses, the template.
const POOL_PER: usize = 4;
const POOL_IPS: [&str; POOL_PER] = ["10.77.0.75", "10.77.0.76", "10.77.0.77", "10.77.0.78"];
const POOL_TEMPLATE: &str = "bench-costgolden";

/// Clock ticks per second of /proc/<pid>/stat (USER_HZ: 100 on Linux).
const TICKS_PER_S: f64 = 100.0;

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn kill_qemu(name: &str) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(qemu_pid(name)),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("SIGKILL qemu");
}

/// The standing-by shadow of `name` (any tier) once the service is protected.
fn standing_by(d: &DaemonProc, name: &str, limit: Duration) -> (String, Value) {
    wait_for("a shadow standing by", limit, || {
        let svc = d.service(name)?;
        if svc["state"] != "protected" {
            return None;
        }
        let shadow = svc["shadows"]
            .as_array()?
            .iter()
            .find(|s| ["paused", "saved", "cold"].contains(&s["state"].as_str().unwrap_or("")))?
            .clone();
        Some((shadow["name"].as_str()?.to_string(), svc))
    })
}

fn mib(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0) / 1048576.0
}

/// Kills `active` (of `service`) and times the outage until `shadow` serves `ip`: the
/// client-observed outage and the daemon's failover record.
fn trial(
    d: &DaemonProc,
    hv: &understudy::libvirt::Hypervisor,
    (service, ip, active, shadow): (&str, &str, &str, &str),
    label: &str,
) -> Option<(f64, Value)> {
    let shadow_uuid = domain_uuid(hv, shadow);
    wait_for("the primary serves", Duration::from_secs(60), || {
        http_get(ip, Duration::from_secs(1))
    });
    let kill = Instant::now();
    kill_qemu(active);
    let mut served = None;
    while kill.elapsed() < Duration::from_secs(300) {
        if let Some(p) = http_get(ip, Duration::from_millis(25)) {
            if page_uuid(&p) == shadow_uuid {
                served = Some(kill.elapsed().as_secs_f64() * 1000.0);
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let Some(ms) = served else {
        println!("{label}: {active} -> {shadow}: NOT served within 300 s");
        return None;
    };
    let rec = wait_for("failover record", Duration::from_secs(60), || {
        let s = d.service(service)?;
        (s["active"] == shadow).then(|| s["last_failover"].clone())
    });
    let timeline: Vec<String> = rec["steps"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    format!(
                        "{} {:.0}",
                        s["name"].as_str().unwrap_or("?"),
                        s["ms"].as_f64().unwrap_or(0.0)
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    println!(
        "{label}: {active} -> {shadow}: outage {ms:.0} ms; steps (ms): {}",
        timeline.join(", ")
    );
    Some((ms, rec["steps"].clone()))
}

/// One mapping of /proc/<pid>/smaps: size (KiB), permissions, path, resident (KiB).
type Mapping = (u64, String, String, u64);

/// Where a QEMU process's resident memory is (`/proc/<pid>/smaps`), MiB: guest RAM (the
/// largest private anonymous read-write mapping), TCG's translated code (anonymous mappings
/// that are executable), the rest of QEMU's anonymous memory, and files.
fn smaps_breakdown(domain: &str) -> Value {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{}/smaps", qemu_pid(domain))) else {
        return Value::Null;
    };
    let mut maps: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.first()
            .is_some_and(|a| a.contains('-') && !a.ends_with(':'))
            && f.len() >= 5
        {
            let (a, b) = f[0].split_once('-').unwrap();
            let size = (u64::from_str_radix(b, 16).unwrap_or(0)
                - u64::from_str_radix(a, 16).unwrap_or(0))
                / 1024;
            maps.push((
                size,
                f[1].to_string(),
                f.get(5).unwrap_or(&"").to_string(),
                0,
            ));
        } else if let (Some(&"Rss:"), Some(v)) = (f.first(), f.get(1)) {
            if let Some(m) = maps.last_mut() {
                m.3 = v.parse().unwrap_or(0);
            }
        }
    }
    let ram = maps
        .iter()
        .filter(|m| m.2.is_empty() && m.1.starts_with("rw") && !m.1.contains('x'))
        .max_by_key(|m| m.0)
        .map(|m| (m.0, m.3))
        .unwrap_or((0, 0));
    let sum =
        |f: &dyn Fn(&Mapping) -> bool| -> u64 { maps.iter().filter(|m| f(m)).map(|m| m.3).sum() };
    let code = sum(&|m| m.2.is_empty() && m.1.contains('x'));
    let anon = sum(&|m| m.2.is_empty() || m.2.starts_with('['));
    let files = sum(&|m| !m.2.is_empty() && !m.2.starts_with('['));
    let mib = |k: u64| (k as f64 / 1024.0 * 10.0).round() / 10.0;
    json!({
        "guest_ram_mapped_mib": mib(ram.0),
        "guest_ram_rss_mib": mib(ram.1),
        "tcg_code_rss_mib": mib(code),
        "other_anon_rss_mib": mib(anon.saturating_sub(ram.1 + code)),
        "file_rss_mib": mib(files),
    })
}

/// Runs `script` with the guest's /bin/sh through its agent; its output, or `None` (never
/// panics: a guest that does not answer leaves a figure out, not the run).
fn guest_sh(hv: &understudy::libvirt::Hypervisor, domain: &str, script: &str) -> Option<String> {
    let cmd = json!({"execute": "guest-exec", "arguments": {"path": "/bin/sh", "arg": ["-c", script], "capture-output": true}});
    let pid = agent(hv, domain, &cmd.to_string())?["return"]["pid"].as_i64()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let st = agent(
            hv,
            domain,
            &json!({"execute": "guest-exec-status", "arguments": {"pid": pid}}).to_string(),
        )?;
        if st["return"]["exited"] == true {
            let data = understudy::monitor::base64::decode(st["return"]["out-data"].as_str()?);
            return Some(String::from_utf8_lossy(&data.ok()?).into_owned());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

/// What the guest itself says about its memory: the kernel's boot-time `Memory:` line (what is
/// reserved outside MemTotal: kernel image, page structures) and /proc/meminfo's main lines.
fn guest_memory(hv: &understudy::libvirt::Hypervisor, domain: &str) -> Value {
    let out = guest_sh(
        hv,
        domain,
        "dmesg | grep -m1 'Memory:'; grep -E '^(MemTotal|MemFree|MemAvailable|Buffers|Cached|Shmem|Slab|SReclaimable|AnonPages|Unevictable|PageTables|KernelStack|Percpu):' /proc/meminfo",
    );
    match out {
        Some(t) => Value::String(t.split_whitespace().collect::<Vec<_>>().join(" ")),
        None => Value::Null,
    }
}

/// The primary's configured memory (`<currentMemory>` of its definition), KiB.
fn configured_kib(hv: &understudy::libvirt::Hypervisor, domain: &str) -> u64 {
    hv.xml(domain, true)
        .ok()
        .and_then(|x| understudy::domain_xml::DomainXml::parse(&x).ok())
        .map(|d| d.memory_kib().current_kib)
        .unwrap_or(0)
}

/// A row's memory figures. `shadow`: the standing-by shadow's `memory` from `status` (`null`
/// when it holds no process), `shadow_smaps` its [`smaps_breakdown`]; `per_vm`: protected VMs
/// it stands in for; `primary`: the primary's `memory`; `configured_kib`: its configured size.
fn shares(
    shadow: &Value,
    shadow_smaps: &Value,
    per_vm: usize,
    primary: &Value,
    configured_kib: u64,
) -> Value {
    let n = per_vm.max(1) as f64;
    let private = shadow["private_bytes"].as_f64().unwrap_or(0.0) / n;
    let cgroup = shadow["cgroup_bytes"].as_f64().unwrap_or(0.0) / n;
    let tcg = shadow_smaps["tcg_code_rss_mib"].as_f64().unwrap_or(0.0) * 1048576.0 / n;
    let configured = configured_kib as f64 * 1024.0;
    let primary_cgroup = primary["cgroup_bytes"].as_f64().unwrap_or(f64::NAN);
    let primary_private = primary["private_bytes"].as_f64().unwrap_or(f64::NAN);
    let pct = |a: f64, b: f64| (1000.0 * a / b).round() / 10.0;
    json!({
        "private_per_vm_bytes": private,
        "cgroup_per_vm_bytes": cgroup,
        "tcg_code_per_vm_bytes": tcg,
        "primary_configured_bytes": configured,
        "primary_cgroup_bytes": primary_cgroup,
        "primary_private_bytes": primary_private,
        "share_of_primary_private_pct": pct(private, primary_private),
        "share_of_configured_pct": pct(private, configured),
        "share_without_tcg_pct": pct(private - tcg, configured),
        "cgroup_share_of_primary_cgroup_pct": pct(cgroup, primary_cgroup),
    })
}

/// The daemon's log lines about making `shadow` smaller (shrink, reclaim, reported pages).
fn shrink_log(d: &DaemonProc, shadow: &str) -> Vec<String> {
    d.log_text()
        .lines()
        .filter(|l| {
            l.contains(shadow)
                && [
                    "ballooned down",
                    "reported to the host",
                    "reclaim",
                    "not shrunk",
                ]
                .iter()
                .any(|k| l.contains(k))
        })
        .map(|l| l.chars().take(400).collect())
        .collect()
}

/// KSM's counters and ksmd's CPU ticks now.
fn ksm_now() -> (understudy::monitor::ksm::KsmStats, u64) {
    let root = std::path::Path::new("/");
    (
        understudy::monitor::ksm::stats(root).unwrap_or_default(),
        understudy::monitor::ksm::ksmd_cpu_ticks(root).unwrap_or(0),
    )
}

/// Waits until ksmd has scanned all mergeable memory twice more (merging needs two passes) and
/// what it shares stopped growing, at most 5 minutes; returns what it did meanwhile.
fn ksm_settle(start: (understudy::monitor::ksm::KsmStats, u64), t0: Instant) -> Value {
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut last = start.0.pages_sharing;
    loop {
        std::thread::sleep(Duration::from_secs(10));
        let (now, _) = ksm_now();
        let scanned = now.full_scans >= start.0.full_scans + 2;
        let stable = now.pages_sharing <= last + last / 100;
        last = now.pages_sharing;
        if (scanned && stable) || Instant::now() >= deadline {
            break;
        }
    }
    let (end, ticks) = ksm_now();
    let secs = t0.elapsed().as_secs_f64();
    let cpu_s = ticks.saturating_sub(start.1) as f64 / TICKS_PER_S;
    let v = json!({
        "run": end.run,
        "full_scans": end.full_scans - start.0.full_scans,
        "pages_sharing": end.pages_sharing,
        "saved_bytes": end.saved_bytes(),
        "ksmd_cpu_s": cpu_s,
        "window_s": secs,
        "ksmd_cpu_pct_of_a_core": 100.0 * cpu_s / secs,
    });
    println!(
        "ksm: {} full scans, {:.1} MiB saved host-wide ({} pages sharing), ksmd {:.1} s of CPU in {:.0} s ({:.1}% of a core)",
        v["full_scans"],
        end.saved_bytes() as f64 / 1048576.0,
        end.pages_sharing,
        cpu_s,
        secs,
        v["ksmd_cpu_pct_of_a_core"].as_f64().unwrap_or(0.0)
    );
    v
}

/// The one-shadow ways' primaries: configured memory and what their service holds, MiB, and
/// their TCG translation cache.
#[derive(Debug, Clone, Copy)]
struct GuestSize {
    mib: usize,
    use_mib: usize,
    /// `<tcg><tb-cache>` of the primary (and so of its shadows), MiB; 0: QEMU's default.
    tb_cache_mib: usize,
}

/// Has `domain`'s service hold `mib` MiB (`us-workload mem`, in the background for a day) and
/// waits until the guest shows it used; what the guest says then.
fn hold_memory(hv: &understudy::libvirt::Hypervisor, domain: &str, mib: usize) -> Value {
    let free_kib = |hv: &understudy::libvirt::Hypervisor| -> Option<u64> {
        guest_sh(hv, domain, "grep MemAvailable /proc/meminfo")?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let before = wait_for("the primary's agent", Duration::from_secs(120), || {
        free_kib(hv)
    });
    let cmd = json!({"execute": "guest-exec", "arguments": {"path": "/bin/us-workload", "arg": ["mem", mib.to_string(), "86400"]}});
    let started = agent(hv, domain, &cmd.to_string());
    assert!(
        started
            .as_ref()
            .is_some_and(|r| r["return"]["pid"].is_i64()),
        "us-workload did not start in {domain}: {started:?}"
    );
    let want = (mib as u64 * 1024) * 9 / 10;
    let after = wait_for(
        "the primary's service to hold its memory",
        Duration::from_secs(300),
        || free_kib(hv).filter(|now| before.saturating_sub(*now) >= want),
    );
    println!(
        "{domain}: its service holds {mib} MiB (MemAvailable {:.1} -> {:.1} MiB)",
        before as f64 / 1024.0,
        after as f64 / 1024.0
    );
    json!({"mib": mib, "mem_available_kib_before": before, "mem_available_kib_after": after})
}

/// What `service`'s profile plans for its memory now (`profile show --json`; a shrink takes the
/// lowest hourly plan over the next day, which for a profile of minutes is this one) and what
/// it observed the primary use; `null` figures while the profile is young.
fn profile_idle_need(d: &DaemonProc, service: &str) -> Value {
    let (code, out, _) = d.cli(&["profile", "show", service, "--json"]);
    let report: Value = if code == 0 {
        serde_json::from_str(&out).unwrap_or(Value::Null)
    } else {
        Value::Null
    };
    json!({
        "observations": report["observations"],
        "plan": report["plan"],
        "planned_mem_kib": report["plan"]["mem_kib"],
        "observed_mem_bytes": report["observed"]["mem_bytes"],
    })
}

/// One primary with one shadow standing by in `way` (class options `class`).
fn one_way(
    hv: &understudy::libvirt::Hypervisor,
    i: usize,
    (way, class): (&str, &str),
    guest: GuestSize,
    trials: usize,
) -> Value {
    let name = format!("bench-cost{i}");
    let _cleanup = Cleanup {
        prefixes: vec![name.clone()],
    };
    let ksm_before = (ksm_now(), Instant::now());
    let d = DaemonProc::start_configured(&format!("bench-cost{i}"), &name, 1, class, &[]);
    let mem = guest.mib.to_string();
    let mut xml = guest_xml(&name, &format!("{IP}/24"), &["--mem", &mem]);
    if guest.tb_cache_mib > 0 {
        // TCG only: caps QEMU's translated-code buffer; its shadows are cloned with it.
        xml = xml.replacen(
            "</features>",
            &format!(
                "<tcg><tb-cache unit='MiB'>{}</tb-cache></tcg></features>",
                guest.tb_cache_mib
            ),
            1,
        );
    }
    let n = hv.define(&xml).expect("define the primary");
    hv.start(&n, false).expect("start the primary");
    wait_for("primary page", Duration::from_secs(300), || {
        http_get(IP, Duration::from_secs(1))
    });
    let service_use = (guest.use_mib > 0).then(|| hold_memory(hv, &name, guest.use_mib));
    standing_by(&d, &name, Duration::from_secs(600));
    // ksmd's CPU counts from the daemon's start, which turned it on.
    let ksm = class
        .contains("ksm = true")
        .then(|| ksm_settle(ksm_before.0, ksm_before.1));
    // Let the figures settle (a shrunk guest's freed pages, page cache).
    std::thread::sleep(Duration::from_secs(5));
    let (shadow, svc) = standing_by(&d, &name, Duration::from_secs(60));
    let primary = svc["primary_memory"].clone();
    let shadow_mem = svc["shadows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == shadow.as_str())
        .map(|s| s["memory"].clone())
        .unwrap_or(Value::Null);
    let active = svc["active"].as_str().unwrap_or_default().to_string();
    let breakdown = json!({
        "primary": smaps_breakdown(&active),
        "shadow": if shadow_mem.is_null() { Value::Null } else { smaps_breakdown(&shadow) },
    });
    let balloon_kib = if shadow_mem.is_null() {
        None
    } else {
        hv.live_resources(&shadow).ok().map(|(_, kib)| kib)
    };
    let guest_says = guest_memory(hv, &active);
    let log = shrink_log(&d, &shadow);
    let idle_need = profile_idle_need(&d, &name);
    let fig = shares(
        &shadow_mem,
        &breakdown["shadow"],
        1,
        &primary,
        configured_kib(hv, &active),
    );
    println!("{way}: where the memory is (MiB): {breakdown}");
    println!("{way}: the primary's guest says: {guest_says}");
    for l in &log {
        println!("{way}: daemon: {l}");
    }
    println!(
        "{way}: the service's profile plans {} (a shrink takes the lowest plan of the next day; without a plan, the shadow's own use after its warm-up); observed {}",
        idle_need["planned_mem_kib"]
            .as_u64()
            .map_or("nothing yet (profile young)".to_string(), |k| format!(
                "{:.1} MiB",
                k as f64 / 1024.0
            )),
        idle_need["observed_mem_bytes"]
    );
    println!(
        "{way}: primary configured {:.0} MiB, cgroup {:.1} MiB (rss {:.1}, pss {:.1}, private {:.1}); shadow cgroup {:.1} MiB (rss {:.1}, pss {:.1}, private {:.1}, balloon {}) = {}% of the configured size ({}% without TCG code; {}% of the primary's private memory; cgroup {}% of the primary's cgroup)",
        fig["primary_configured_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
        mib(&primary["cgroup_bytes"]),
        mib(&primary["rss_bytes"]),
        mib(&primary["pss_bytes"]),
        mib(&primary["private_bytes"]),
        mib(&shadow_mem["cgroup_bytes"]),
        mib(&shadow_mem["rss_bytes"]),
        mib(&shadow_mem["pss_bytes"]),
        mib(&shadow_mem["private_bytes"]),
        balloon_kib.map_or("-".to_string(), |k| format!("{} MiB", k / 1024)),
        fig["share_of_configured_pct"],
        fig["share_without_tcg_pct"],
        fig["share_of_primary_private_pct"],
        fig["cgroup_share_of_primary_cgroup_pct"],
    );
    let mut outages = Vec::new();
    let mut steps = Vec::new();
    for t in 0..trials {
        let (shadow, svc) = standing_by(&d, &name, Duration::from_secs(600));
        let active = svc["active"].as_str().unwrap().to_string();
        if let Some((ms, s)) = trial(
            &d,
            hv,
            (&name, IP, &active, &shadow),
            &format!("{way} trial {t}"),
        ) {
            outages.push(ms);
            steps.push(s);
        }
    }
    // With a service that holds memory, the shadow made after the trials too: by then the
    // profile may plan, and a shrink takes its plan instead of the shadow's own use.
    let after_trials = (guest.use_mib > 0).then(|| {
        let (shadow, svc) = standing_by(&d, &name, Duration::from_secs(600));
        std::thread::sleep(Duration::from_secs(5));
        let mem = d.service(&name).and_then(|s| {
            s["shadows"]
                .as_array()?
                .iter()
                .find(|x| x["name"] == shadow.as_str())
                .map(|x| x["memory"].clone())
        });
        let mem = mem.unwrap_or(Value::Null);
        let smaps = smaps_breakdown(&shadow);
        let fig = shares(
            &mem,
            &smaps,
            1,
            &svc["primary_memory"],
            configured_kib(hv, &name),
        );
        let log = shrink_log(&d, &shadow);
        let idle = profile_idle_need(&d, &name);
        for l in &log {
            println!("{way} after the trials: daemon: {l}");
        }
        println!(
            "{way} after the trials: {shadow} private {:.1} MiB = {}% of the configured size ({}% without TCG code); profile plan {}",
            mib(&mem["private_bytes"]),
            fig["share_of_configured_pct"],
            fig["share_without_tcg_pct"],
            idle["plan"]
        );
        json!({"shadow": shadow, "shadow_memory": mem, "figures": fig, "smaps": smaps, "daemon_log": log, "profile_idle_need": idle})
    });
    let (median, p95, max) = stats(&outages);
    json!({
        "way": way,
        "class_options": class,
        "guest": {"mib": guest.mib, "use_mib": guest.use_mib, "tb_cache_mib": guest.tb_cache_mib},
        "after_trials": after_trials,
        "primary_memory": primary,
        "shadow_memory": shadow_mem,
        "shadow_balloon_kib": balloon_kib,
        "protected_vms": 1,
        "figures": fig,
        "smaps": breakdown,
        "primary_guest_memory": guest_says,
        "primary_service_use": service_use,
        "profile_idle_need": idle_need,
        "daemon_log": log,
        "ksm": ksm,
        "outage_ms": outages,
        "outage": {"median": median, "p95": p95, "max": max},
        "steps": steps,
    })
}

/// Four primaries sharing one pooled shadow.
fn pooled(hv: &understudy::libvirt::Hypervisor, trials: usize) -> Value {
    let way = format!("pooled 1:{POOL_PER}");
    let names: Vec<String> = (0..POOL_PER).map(|i| format!("bench-costp{i}")).collect();
    let mut prefixes = names.clone();
    prefixes.extend([POOL_TEMPLATE.to_string(), "default-pool".to_string()]);
    let _cleanup = Cleanup { prefixes };
    hv.define(&guest_xml(POOL_TEMPLATE, "10.77.0.79/24", &[]))
        .expect("define the pool's template");
    let class = format!(
        "\n[class.default.pool]\nprimaries_per_shadow = {POOL_PER}\ntemplate = \"{POOL_TEMPLATE}\"\n"
    );
    let d = DaemonProc::start_configured("bench-costp", "bench-costp*", 0, &class, &[]);
    // One at a time: five TCG guests booting at once on two loaded cores is a load spike of
    // its own (a kernel once panicked in its boot-time timer check under it).
    for (n, ip) in names.iter().zip(POOL_IPS) {
        start_guest(hv, n, &format!("{ip}/24"), &[]);
        wait_for("the primary's page", Duration::from_secs(300), || {
            http_get(ip, Duration::from_secs(1))
        });
    }
    // The pool's paused shadow once every primary is protected by it and its identity known;
    // never one already taken.
    let ready = |taken: &[String]| -> (String, Value) {
        wait_for(
            "a pooled shadow covering every primary",
            Duration::from_secs(900),
            || {
                let st = d.status();
                let pool = st["pools"].as_array()?.first()?.clone();
                let shadow = pool["shadows"]
                    .as_array()?
                    .iter()
                    .find(|s| s["state"] == "paused")?
                    .clone();
                let name = shadow["name"].as_str()?.to_string();
                if taken.contains(&name) || pool["covers"].as_array()?.len() < POOL_PER {
                    return None;
                }
                let all = names.iter().all(|n| {
                    d.service(n)
                        .is_some_and(|s| s["state"] == "protected" && !s["identity"].is_null())
                });
                all.then_some((name, json!({"pool": pool, "services": st["services"]})))
            },
        )
    };
    let (_, _) = ready(&[]);
    std::thread::sleep(Duration::from_secs(5));
    let (_, snap) = ready(&[]);
    let pool_shadow = snap["pool"]["shadows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["state"] == "paused")
        .cloned()
        .unwrap();
    let primaries: Vec<Value> = snap["services"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| names.iter().any(|n| s["name"] == n.as_str()))
        .map(|s| s["primary_memory"].clone())
        .collect();
    let mean = |key: &str| {
        primaries
            .iter()
            .map(|p| p[key].as_f64().unwrap_or(0.0))
            .sum::<f64>()
            / primaries.len().max(1) as f64
    };
    let mean_primary = json!({
        "cgroup_bytes": mean("cgroup_bytes"),
        "rss_bytes": mean("rss_bytes"),
        "pss_bytes": mean("pss_bytes"),
        "private_bytes": mean("private_bytes"),
    });
    let pool_shadow_name = pool_shadow["name"].as_str().unwrap_or_default().to_string();
    let smaps = smaps_breakdown(&pool_shadow_name);
    let fig = shares(
        &pool_shadow["memory"],
        &smaps,
        POOL_PER,
        &mean_primary,
        configured_kib(hv, &names[0]),
    );
    println!("{way}: where the pooled shadow's memory is (MiB): {smaps}");
    println!(
        "{way}: primaries configured {:.0} MiB, mean cgroup {:.1} MiB (private {:.1}); pooled shadow cgroup {:.1} MiB (private {:.1}) for {POOL_PER} primaries = {:.1} MiB private per protected VM = {}% of the configured size ({}% without TCG code; cgroup {}% of a primary's cgroup)",
        fig["primary_configured_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
        mib(&mean_primary["cgroup_bytes"]),
        mib(&mean_primary["private_bytes"]),
        mib(&pool_shadow["memory"]["cgroup_bytes"]),
        mib(&pool_shadow["memory"]["private_bytes"]),
        mib(&fig["private_per_vm_bytes"]),
        fig["share_of_configured_pct"],
        fig["share_without_tcg_pct"],
        fig["cgroup_share_of_primary_cgroup_pct"],
    );
    let mut outages = Vec::new();
    let mut steps = Vec::new();
    let mut taken = Vec::new();
    for t in 0..trials {
        let (shadow, _) = ready(taken.as_slice());
        let service = &names[t % POOL_PER];
        let active = d.service(service).unwrap()["active"]
            .as_str()
            .unwrap()
            .to_string();
        if let Some((ms, s)) = trial(
            &d,
            hv,
            (service, POOL_IPS[t % POOL_PER], &active, &shadow),
            &format!("{way} trial {t}"),
        ) {
            outages.push(ms);
            steps.push(s);
        }
        taken.push(shadow);
    }
    let (median, p95, max) = stats(&outages);
    json!({
        "way": way,
        "class_options": class,
        "primary_memory": mean_primary,
        "primaries_memory": primaries,
        "shadow_memory": pool_shadow["memory"],
        "protected_vms": POOL_PER,
        "figures": fig,
        "smaps": {"shadow": smaps},
        "outage_ms": outages,
        "outage": {"median": median, "p95": p95, "max": max},
        "steps": steps,
    })
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    require_lab();
    let trials = env_usize("BENCH_TRIALS", 3);
    let guest = GuestSize {
        mib: env_usize("BENCH_GUEST_MIB", 192),
        use_mib: env_usize("BENCH_GUEST_USE_MIB", 0),
        tb_cache_mib: 0,
    };
    let hv = hypervisor();
    let only = std::env::var("BENCH_WAYS").ok();
    let wanted = |way: &str| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|w| w == way))
    };
    let ksm_run_before = understudy::monitor::ksm::stats(std::path::Path::new("/"))
        .map(|s| s.run)
        .ok();
    let mut rows = Vec::new();
    let load_start = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let started = Instant::now();
    let mut pooled_done = false;
    for (i, (way, class)) in WAYS.iter().enumerate() {
        // Before KSM merges anything host-wide.
        if way.contains("ksm") && !pooled_done && wanted(POOLED) {
            rows.push(pooled(&hv, trials));
            pooled_done = true;
        }
        if wanted(way) {
            rows.push(one_way(&hv, i, (way, class), guest, trials));
        }
        let named = |w: &str| {
            only.as_deref()
                .is_some_and(|o| o.split(',').any(|x| x == w))
        };
        if *way == "paused" && named(TB_CACHE_WAY) {
            let capped = GuestSize {
                tb_cache_mib: env_usize("BENCH_TB_CACHE_MIB", 32),
                ..guest
            };
            rows.push(one_way(&hv, 20, (TB_CACHE_WAY, class), capped, trials));
        }
        // The warm ways only when named, after the plain ones they compare with.
        if *way == "paused+shrunk+reclaim" {
            for (j, (warm_way, warm_class)) in WARM_WAYS.iter().enumerate() {
                if !named(warm_way) {
                    continue;
                }
                assert!(
                    guest.use_mib > 0,
                    "{warm_way}: the warm-up touches BENCH_GUEST_USE_MIB MiB: set it"
                );
                // The page server exercised as in every way, then the service's memory touched
                // and freed.
                let warmup = format!(
                    "warmup_commands = [[\"/bin/busybox\", \"sh\", \"-c\", \"for i in $(seq 30); do wget -q -O /dev/null http://127.0.0.1/; done\"], [\"/bin/us-workload\", \"mem\", \"{}\", \"2\"]]",
                    guest.use_mib
                );
                let class = warm_class.replace("{warm}", &warmup);
                rows.push(one_way(&hv, 10 + j, (warm_way, &class), guest, trials));
            }
        }
    }
    if !pooled_done && wanted(POOLED) {
        rows.push(pooled(&hv, trials));
    }
    // Leave the host's KSM as it was: unmerge what the bench merged if it was off.
    if let Some(before) = ksm_run_before {
        let root = std::path::Path::new("/");
        let now = understudy::monitor::ksm::stats(root)
            .map(|s| s.run)
            .unwrap_or(before);
        if now != before {
            let r = if before == 0 {
                understudy::monitor::ksm::set_run(root, 2)
            } else {
                understudy::monitor::ksm::set_run(root, before)
            };
            println!(
                "ksm: run set back ({}): {r:?}",
                if before == 0 {
                    "2: unmerge, then stop"
                } else {
                    "as it was"
                }
            );
        }
    }

    println!();
    println!(
        "{:<26} {:>9} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>11} {:>11}",
        "way",
        "primary",
        "private/VM",
        "cgroup/VM",
        "share",
        "no TCG",
        "of prim.",
        "cg share",
        "outage p50",
        "outage max"
    );
    for r in &rows {
        let f = &r["figures"];
        println!(
            "{:<26} {:>5.0} MiB {:>6.1} MiB {:>6.1} MiB {:>8.1}% {:>8.1}% {:>8.1}% {:>8.1}% {:>9.0}ms {:>9.0}ms",
            r["way"].as_str().unwrap(),
            f["primary_configured_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
            mib(&f["private_per_vm_bytes"]),
            mib(&f["cgroup_per_vm_bytes"]),
            f["share_of_configured_pct"].as_f64().unwrap_or(f64::NAN),
            f["share_without_tcg_pct"].as_f64().unwrap_or(f64::NAN),
            f["share_of_primary_private_pct"].as_f64().unwrap_or(f64::NAN),
            f["cgroup_share_of_primary_cgroup_pct"]
                .as_f64()
                .unwrap_or(f64::NAN),
            r["outage"]["median"].as_f64().unwrap_or(f64::NAN),
            r["outage"]["max"].as_f64().unwrap_or(f64::NAN),
        );
    }
    for r in rows.iter().filter(|r| !r["ksm"].is_null()) {
        println!(
            "{}: ksm saved {:.1} MiB host-wide; ksmd {:.1} s of CPU over {:.0} s ({:.1}% of a core)",
            r["way"].as_str().unwrap(),
            mib(&r["ksm"]["saved_bytes"]),
            r["ksm"]["ksmd_cpu_s"].as_f64().unwrap_or(0.0),
            r["ksm"]["window_s"].as_f64().unwrap_or(0.0),
            r["ksm"]["ksmd_cpu_pct_of_a_core"].as_f64().unwrap_or(0.0),
        );
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "(primary: its configured memory; private/VM: the standing-by shadow's private memory \
         (pages no other process maps: what the host gets back without it) per protected VM; \
         cgroup/VM: its cgroup charge per protected VM; share: private/VM / the primary's \
         configured memory; no TCG: the same without TCG's translated code, which a KVM host \
         does not have; of prim.: private/VM / the primary's own private memory; cg share: \
         cgroup/VM / the primary's cgroup charge (earlier runs' measure); outage: SIGKILL to the first page the promoted shadow serves, {trials} \
         trials each; {:.0} s; load average at start {}, at end {})",
        started.elapsed().as_secs_f64(),
        load_start.trim(),
        load.trim()
    );
    let out = repo().join("build/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("cost.json"),
        serde_json::to_string_pretty(&json!({
            "trials": trials,
            "guest_mib": guest.mib,
            "guest_use_mib": guest.use_mib,
            "loadavg_at_start": load_start.trim(),
            "loadavg_at_end": load.trim(),
            "ways": rows
        }))
        .unwrap(),
    )
    .unwrap();
    println!("wrote {}", out.join("cost.json").display());
}
