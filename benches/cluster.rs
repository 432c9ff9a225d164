//! `make bench-cluster`: client-observed outage of cross-host crash failovers on the
//! three-host lab, and of local crash failovers in the same run.
//!
//! Daemons run on h1 and h2 (each inside its host's namespaces, coordinated through the lab's
//! etcd). `bc-web` is protected with `placement = "other-host"`: its shadow stands by on the
//! other host, so each SIGKILL of its primary's QEMU is reported by the primary's host and
//! served by the other host's shadow (the switch learns the MAC's new port from QMP
//! announce-self); the replacement is then placed on the first host, and the next trial
//! kills on the other side. `bl-web` is protected with `placement = "local"` on h1: the
//! single-host path, for comparison.
//!
//! A client on the switch (the lab's client namespace) starts a request for the guest's page
//! every 5 ms (each allowed 1 s; requests overlap). Outage = first good answer from the new
//! domain after the kill minus the last good answer before it. Writes build/bench/cluster.json
//! and build/bench/cluster.svg.
//!
//! Where a cross-host failover's time goes is read per trial from the two daemons' logs (the
//! primary's host seeing its QEMU exit and writing the failure report; the shadow's host taking
//! it over) and from the shadow host's failover record (claim, resume and rewire, announce),
//! all as milliseconds after the kill on the machine's one clock, next to the client's first
//! answer from the shadow: `cross_host_breakdown` in the JSON, medians printed.
//!
//! Environment: BENCH_TRIALS (default 10) cross-host trials, BENCH_LOCAL_TRIALS (default 5).

#[path = "../integration/common.rs"]
mod common;
// Its tests are not compiled here, so some of its imports go unused.
#[allow(unused_imports)]
#[path = "../integration/three_hosts/mod.rs"]
mod three_hosts;

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use three_hosts::crosshost::{clear_prefix, daemon_with, kill_qemu, owner};
use three_hosts::{Cluster, ClusterCleanup};
use understudy::probe::{outage_around, Prober};

const CROSS: &str = "bc-web";
const CROSS_IP: &str = "10.77.0.91";
const LOCAL: &str = "bl-web";
const LOCAL_IP: &str = "10.77.0.92";
const PREFIX: &str = "/understudy/bench-cluster";
const SHADOW_WAIT: Duration = Duration::from_secs(300);

fn env_or(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Outage around `kill` until an answer that names `uuid`; `None` after `limit`.
fn outage(probe: &Prober, kill: Instant, uuid: &str, limit: Duration) -> Option<f64> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(d) = outage_around(&probe.answers(), kill, |b| page_uuid(b) == uuid) {
            return Some(d.as_secs_f64() * 1000.0);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The 1-minute load average (`/proc/loadavg`): the machine is shared, so every figure comes
/// with it.
fn load1() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Unix time in µs.
fn unix_us(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// The time of the first line of the daemon log at `log` at or after `since` (Unix µs) that
/// contains `what` and `service`, in ms after `since`. The log's lines start with an RFC 3339
/// timestamp (colours stripped).
fn log_mark(log: &Path, since: i64, what: &str, service: &str) -> Option<f64> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines().find_map(|raw| {
        let line = strip_ansi(raw);
        if !line.contains(what) || !line.contains(service) {
            return None;
        }
        let stamp = line.split_whitespace().next()?;
        let at = unix_us(humantime::parse_rfc3339_weak(stamp.trim_end_matches('Z')).ok()?);
        (at >= since).then(|| (at - since) as f64 / 1000.0)
    })
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The end of step `name` of a failover record, in ms after the record's start.
fn step_end(record: &serde_json::Value, name: &str) -> Option<f64> {
    record["steps"].as_array()?.iter().find_map(|s| {
        (s["name"] == name)
            .then(|| s["start_ms"].as_f64().unwrap_or(0.0) + s["ms"].as_f64().unwrap_or(0.0))
    })
}

/// Where one cross-host failover's time went, in ms after the kill (see the module's comment).
fn breakdown(
    primary_log: &Path,
    shadow_log: &Path,
    kill_us: i64,
    record: &serde_json::Value,
    client_ms: Option<f64>,
) -> serde_json::Value {
    let exit_seen = log_mark(primary_log, kill_us, "primary QEMU exited", CROSS);
    let reported = log_mark(primary_log, kill_us, "primary failure reported", CROSS);
    let taken = log_mark(shadow_log, kill_us, "promoting the shadow here", CROSS);
    let after_taken = |v: Option<f64>| Some(taken? + v?);
    serde_json::json!({
        "exit_seen": exit_seen,
        "reported": reported,
        "taken_over": taken,
        "claimed": after_taken(step_end(record, "claim")),
        "resumed": after_taken(step_end(record, "resume")),
        "rewired": after_taken(step_end(record, "rewire")),
        "restored": after_taken(record["outage_ms"].as_f64()),
        "announced": after_taken(step_end(record, "announce")),
        "client_served": client_ms,
    })
}

/// The columns of [`breakdown`], in order.
const MARKS: [&str; 9] = [
    "exit_seen",
    "reported",
    "taken_over",
    "claimed",
    "resumed",
    "rewired",
    "restored",
    "announced",
    "client_served",
];

/// The first answer naming `uuid` after `kill`, in ms after it.
fn first_answer_ms(probe: &Prober, kill: Instant, uuid: &str) -> Option<f64> {
    probe
        .answers()
        .iter()
        .filter(|a| a.at > kill && page_uuid(&a.body) == uuid)
        .map(|a| (a.at - kill).as_secs_f64() * 1000.0)
        .reduce(f64::min)
}

fn names(service: &str) -> Vec<String> {
    std::iter::once(service.to_string())
        .chain((1..64).map(|n| format!("{service}-shadow-{n}")))
        .collect()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let cluster = Cluster::require();
    let trials = env_or("BENCH_TRIALS", 10);
    let local_trials = env_or("BENCH_LOCAL_TRIALS", 5);
    let all: Vec<String> = names(CROSS).into_iter().chain(names(LOCAL)).collect();
    let _cleanup = ClusterCleanup::new(
        &cluster,
        &all.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    clear_prefix(&cluster, PREFIX);
    let local_class = format!(
        "[[protect]]\nmatch = \"{LOCAL}\"\nclass = \"local\"\n\n[class.local]\nshadows = 1\nplacement = \"local\"\nshadow_boot_timeout_s = 180\n"
    );
    let daemons = [
        daemon_with(&cluster, "h1", CROSS, 1, "other-host", PREFIX, &local_class),
        daemon_with(&cluster, "h2", CROSS, 1, "other-host", PREFIX, &local_class),
    ];
    let hosts = ["h1", "h2"];
    let hv = |h: &str| cluster.hypervisor(h);
    for (name, ip) in [(CROSS, CROSS_IP), (LOCAL, LOCAL_IP)] {
        hv("h1")
            .define(&guest_xml(name, &format!("{ip}/24"), &[]))
            .expect("define on h1");
        hv("h1").start(name, false).expect("start on h1");
    }

    // Cross-host crashes, alternating sides.
    let probe = Prober::start(
        format!("{CROSS_IP}:80").parse().unwrap(),
        "/",
        Duration::from_millis(5),
        Duration::from_secs(1),
    )
    .unwrap();
    let mut cross_ms = Vec::new();
    let mut records = Vec::new();
    let mut breakdowns = Vec::new();
    let mut loads = vec![load1()];
    for i in 0..trials {
        let (at, domain) = wait_for("the owner of bc-web", SHADOW_WAIT, || {
            owner(&daemons[0], CROSS)
        });
        let a = hosts
            .iter()
            .position(|h| *h == at)
            .expect("owner on h1 or h2");
        let b = 1 - a;
        let shadow = daemons[b]
            .wait_paused_shadows(CROSS, 1, SHADOW_WAIT)
            .remove(0);
        wait_for(
            "page served before the kill",
            Duration::from_secs(60),
            || http_get(CROSS_IP, Duration::from_millis(200)),
        );
        std::thread::sleep(Duration::from_millis(300));
        let uuid = domain_uuid(&hv(hosts[b]), &shadow);
        let kill_us = unix_us(SystemTime::now());
        let kill = Instant::now();
        kill_qemu(hosts[a], &domain);
        match outage(&probe, kill, &uuid, Duration::from_secs(30)) {
            Some(ms) => {
                println!(
                    "cross-host trial {i}: {domain}@{} -> {shadow}@{}: client outage {ms:.1} ms",
                    hosts[a], hosts[b]
                );
                cross_ms.push(ms);
            }
            None => println!(
                "cross-host trial {i}: {domain}@{} -> {shadow}@{}: NOT served within 30 s",
                hosts[a], hosts[b]
            ),
        }
        let svc = wait_for("the failover record", Duration::from_secs(30), || {
            let s = daemons[b].service(CROSS)?;
            (s["active"] == shadow.as_str()).then_some(s)
        });
        let marks = breakdown(
            &daemons[a].log,
            &daemons[b].log,
            kill_us,
            &svc["last_failover"],
            first_answer_ms(&probe, kill, &uuid),
        );
        println!(
            "  ms after the kill: {}",
            MARKS
                .iter()
                .map(|m| format!(
                    "{m} {}",
                    marks[m].as_f64().map_or("-".into(), |v| format!("{v:.1}"))
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
        breakdowns.push(marks);
        loads.push(load1());
        records.push(svc["last_failover"].clone());
    }
    drop(probe);

    // Local crashes on h1, in the same run.
    let probe = Prober::start(
        format!("{LOCAL_IP}:80").parse().unwrap(),
        "/",
        Duration::from_millis(5),
        Duration::from_secs(1),
    )
    .unwrap();
    let mut local_ms = Vec::new();
    for i in 0..local_trials {
        let shadow = daemons[0]
            .wait_paused_shadows(LOCAL, 1, SHADOW_WAIT)
            .remove(0);
        let active = daemons[0].service(LOCAL).unwrap()["active"]
            .as_str()
            .unwrap()
            .to_string();
        wait_for(
            "page served before the kill",
            Duration::from_secs(60),
            || http_get(LOCAL_IP, Duration::from_millis(200)),
        );
        std::thread::sleep(Duration::from_millis(300));
        let uuid = domain_uuid(&hv("h1"), &shadow);
        let kill = Instant::now();
        kill_qemu("h1", &active);
        match outage(&probe, kill, &uuid, Duration::from_secs(30)) {
            Some(ms) => {
                println!("local trial {i}: {active} -> {shadow}: client outage {ms:.1} ms");
                local_ms.push(ms);
            }
            None => println!("local trial {i}: {active} -> {shadow}: NOT served within 30 s"),
        }
        wait_for("the local failover done", Duration::from_secs(30), || {
            let s = daemons[0].service(LOCAL)?;
            (s["active"] == shadow.as_str()).then_some(())
        });
    }

    let (x50, x95, xmax) = stats(&cross_ms);
    let (l50, l95, lmax) = stats(&local_ms);
    println!(
        "cross-host crash failovers: {} of {trials} served; median {x50:.1} ms, p95 {x95:.1} ms, max {xmax:.1} ms",
        cross_ms.len()
    );
    println!(
        "local crash failovers:      {} of {local_trials} served; median {l50:.1} ms, p95 {l95:.1} ms, max {lmax:.1} ms",
        local_ms.len()
    );
    loads.push(load1());
    let (lmin, lmax) = loads
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &l| (a.min(l), b.max(l)));
    println!("load average (1 min) during the run: {lmin:.1} to {lmax:.1}");
    println!("cross-host, median ms after the kill:");
    for m in MARKS {
        let v: Vec<f64> = breakdowns.iter().filter_map(|b| b[m].as_f64()).collect();
        let (median, p95, _) = stats(&v);
        println!(
            "  {m:<14} median {median:7.1}  p95 {p95:7.1}  ({} trials)",
            v.len()
        );
    }
    println!(
        "target (cross-host): median <= 150 ms: {}, p95 <= 300 ms: {}",
        if x50 <= 150.0 { "met" } else { "NOT met" },
        if x95 <= 300.0 { "met" } else { "NOT met" }
    );
    let out = repo().join("build/bench");
    std::fs::create_dir_all(&out).unwrap();
    let json = serde_json::json!({
        "trials": trials,
        "local_trials": local_trials,
        "cross_host_ms": cross_ms,
        "local_ms": local_ms,
        "summary": {
            "cross_host": {"median": x50, "p95": x95, "max": xmax},
            "local": {"median": l50, "p95": l95, "max": lmax},
        },
        "cross_host_failover_records": records,
        "cross_host_breakdown": breakdowns,
        "load_average_1m": loads,
    });
    std::fs::write(
        out.join("cluster.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
    let chart = understudy::plot::dots_log(
        "Client-observed outage per crash failover (log scale)",
        "outage (ms)",
        &[("cross-host", &cross_ms), ("local", &local_ms)],
    )
    .expect("outage chart");
    std::fs::write(out.join("cluster.svg"), chart).unwrap();
    println!(
        "wrote {} and {}",
        out.join("cluster.json").display(),
        out.join("cluster.svg").display()
    );
}
