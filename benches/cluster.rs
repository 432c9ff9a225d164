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
//! Environment: BENCH_TRIALS (default 10) cross-host trials, BENCH_LOCAL_TRIALS (default 5).

#[path = "../integration/common.rs"]
mod common;
// Its tests are not compiled here, so some of its imports go unused.
#[allow(unused_imports)]
#[path = "../integration/three_hosts/mod.rs"]
mod three_hosts;

use std::time::{Duration, Instant};

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
