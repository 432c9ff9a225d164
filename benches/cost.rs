//! `make bench-cost`: what each way of standing by costs in host memory, and what it costs in
//! outage. One table from one run.
//!
//! For each way (paused; paused and shrunk, with free page reporting; saved; cold) a daemon
//! protects one lab guest with one shadow of that way. Once the shadow stands by (and 5 s more,
//! for the figures to settle), the daemon's `status` gives the primary's and the standing-by
//! shadow's host memory (cgroup charge, RSS, PSS; `integration/standby.rs` checks those against
//! the cgroups). Then BENCH_TRIALS times (default 3): SIGKILL of the active primary's QEMU while
//! an independent client, inside the lab, opens a new HTTP connection every 5 ms; the outage is
//! from the kill to the first page served by the promoted shadow. The next trial waits for the
//! replacement shadow.
//!
//! Writes build/bench/cost.json. Not asserted anywhere: the targets are read off the
//! table.

#[path = "../integration/common.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const IP: &str = "10.77.0.74";

/// The ways, as class options.
const WAYS: [(&str, &str); 4] = [
    ("paused", ""),
    (
        "paused+shrunk",
        "standby_shrink = true\nfree_page_reporting = true",
    ),
    ("saved", "standby_tier = \"saved\""),
    ("cold", "standby_tier = \"cold\""),
];

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

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    require_lab();
    let trials = env_usize("BENCH_TRIALS", 3);
    let hv = hypervisor();
    let mut rows = Vec::new();
    for (i, (way, class)) in WAYS.iter().enumerate() {
        let name = format!("bench-cost{i}");
        let _cleanup = Cleanup {
            prefixes: vec![name.clone()],
        };
        let d = DaemonProc::start_configured(&format!("bench-cost{i}"), &name, 1, class, &[]);
        start_guest(&hv, &name, &format!("{IP}/24"), &[]);
        wait_for("primary page", Duration::from_secs(300), || {
            http_get(IP, Duration::from_secs(1))
        });
        standing_by(&d, &name, Duration::from_secs(600));
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
        let standby_bytes = svc["standby_memory_bytes"].as_u64().unwrap_or(0);
        let share = svc["standby_share_pct"].as_f64().unwrap_or(0.0);
        println!(
            "{way}: primary cgroup {:.1} MiB (rss {:.1}, pss {:.1}); standing by {:.1} MiB = {share:.1}% (shadow rss {:.1}, pss {:.1})",
            mib(&primary["cgroup_bytes"]),
            mib(&primary["rss_bytes"]),
            mib(&primary["pss_bytes"]),
            standby_bytes as f64 / 1048576.0,
            mib(&shadow_mem["rss_bytes"]),
            mib(&shadow_mem["pss_bytes"]),
        );

        let mut outages = Vec::new();
        let mut steps = Vec::new();
        for t in 0..trials {
            let (shadow, svc) = standing_by(&d, &name, Duration::from_secs(600));
            let active = svc["active"].as_str().unwrap().to_string();
            let shadow_uuid = domain_uuid(&hv, &shadow);
            wait_for("the primary serves", Duration::from_secs(60), || {
                http_get(IP, Duration::from_secs(1))
            });
            let kill = Instant::now();
            kill_qemu(&active);
            let mut served = None;
            while kill.elapsed() < Duration::from_secs(300) {
                if let Some(p) = http_get(IP, Duration::from_millis(25)) {
                    if page_uuid(&p) == shadow_uuid {
                        served = Some(kill.elapsed().as_secs_f64() * 1000.0);
                        break;
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let Some(ms) = served else {
                println!("{way} trial {t}: {active} -> {shadow}: NOT served within 300 s");
                continue;
            };
            let rec = wait_for("failover record", Duration::from_secs(60), || {
                let s = d.service(&name)?;
                (s["active"] == shadow.as_str()).then(|| s["last_failover"].clone())
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
                "{way} trial {t}: {active} -> {shadow}: outage {ms:.0} ms; steps (ms): {}",
                timeline.join(", ")
            );
            outages.push(ms);
            steps.push(rec["steps"].clone());
        }
        let (median, p95, max) = stats(&outages);
        rows.push(json!({
            "way": way,
            "class_options": class,
            "primary_memory": primary,
            "shadow_memory": shadow_mem,
            "standby_bytes": standby_bytes,
            "standby_share_pct": share,
            "outage_ms": outages,
            "outage": {"median": median, "p95": p95, "max": max},
            "steps": steps,
        }));
        drop(d);
    }

    println!();
    println!(
        "{:<15} {:>16} {:>14} {:>10} {:>12} {:>12}",
        "way", "primary (MiB)", "standby (MiB)", "share", "outage p50", "outage max"
    );
    for r in &rows {
        println!(
            "{:<15} {:>16.1} {:>14.1} {:>9.1}% {:>10.0}ms {:>10.0}ms",
            r["way"].as_str().unwrap(),
            mib(&r["primary_memory"]["cgroup_bytes"]),
            r["standby_bytes"].as_f64().unwrap() / 1048576.0,
            r["standby_share_pct"].as_f64().unwrap(),
            r["outage"]["median"].as_f64().unwrap_or(f64::NAN),
            r["outage"]["max"].as_f64().unwrap_or(f64::NAN),
        );
    }
    println!("(memory: cgroup charge; share: standing-by memory / the primary's; outage: SIGKILL to the first page the promoted shadow serves, {trials} trials each)");
    let out = repo().join("build/bench");
    std::fs::create_dir_all(&out).unwrap();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    std::fs::write(
        out.join("cost.json"),
        serde_json::to_string_pretty(
            &json!({"trials": trials, "loadavg_at_end": load.trim(), "ways": rows}),
        )
        .unwrap(),
    )
    .unwrap();
    println!("wrote {}", out.join("cost.json").display());
}
