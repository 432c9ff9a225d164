//! `make bench-profile` (part 2): what the collectors cost the daemon on real lab guests.
//!
//! Three lab guests are protected with `shadows = 0` (watched, no shadow) and the daemon samples
//! them at the default 1 Hz. Over a window:
//! - the collectors' own CPU time, from `understudy_collector_cpu_seconds_total` (each tick's
//!   work measured on the thread that runs it: host counters, every guest agent round trip,
//!   history, learning) — the headline figure, per domain, scaled to 10 domains;
//! - the whole daemon's CPU time (`utime + stime` of `/proc/<pid>/stat`), and again with the
//!   collectors idle (one sample a minute): the difference is a cross-check that also counts
//!   what the collectors cost outside their own thread, but it is noisy (heartbeats at 4 Hz per
//!   domain and tap checks dominate the daemon's CPU and vary from run to run).
//!
//! The daemon's resident memory (VmRSS) is reported as well. Writes build/bench/collector.json.
//!
//! Environment: BENCH_COLLECTOR_SECONDS (default 60).

#[path = "../integration/common.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;

const GUESTS: [(&str, &str); 3] = [
    ("bench-col1", "10.77.0.51/24"),
    ("bench-col2", "10.77.0.52/24"),
    ("bench-col3", "10.77.0.53/24"),
];

/// CPU time of a process (user + system), from `/proc/<pid>/stat`.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("daemon stat");
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_nanos(ticks * 1_000_000_000 / clock_ticks())
}

/// `CLK_TCK`, the unit of utime and stime (100 on every Linux this runs on; asked anyway).
fn clock_ticks() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .filter(|hz| *hz > 0)
        .unwrap_or(100)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Daemon CPU, as a fraction of one core, over `window`.
fn measure(daemon: &DaemonProc, window: Duration) -> f64 {
    let pid = daemon.child.id();
    let (c0, t0) = (cpu_time(pid), Instant::now());
    std::thread::sleep(window);
    let (c1, t1) = (cpu_time(pid), Instant::now());
    (c1 - c0).as_secs_f64() / (t1 - t0).as_secs_f64()
}

/// Sum of `understudy_collector_cpu_seconds_total` over every service.
fn collector_cpu(daemon: &DaemonProc) -> f64 {
    daemon
        .metrics()
        .lines()
        .filter(|l| l.starts_with("understudy_collector_cpu_seconds_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn observations(daemon: &DaemonProc, service: &str) -> u64 {
    let (code, out, _) = daemon.cli(&["profile", "show", service, "--json"]);
    if code != 0 {
        return 0;
    }
    serde_json::from_str::<serde_json::Value>(&out)
        .ok()
        .and_then(|v| v["observations"].as_u64())
        .unwrap_or(0)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    require_lab();
    let seconds: u64 = std::env::var("BENCH_COLLECTOR_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let window = Duration::from_secs(seconds);
    let _cleanup = Cleanup {
        prefixes: GUESTS.iter().map(|(n, _)| n.to_string()).collect(),
    };
    let hv = hypervisor();
    let mut daemon = DaemonProc::start("collector-bench", "bench-col*", 0);
    for (name, ip) in GUESTS {
        start_guest(&hv, name, ip, &["--mem", "128"]);
    }
    for (name, _) in GUESTS {
        wait_agent(&hv, name);
    }
    // Every collector has been running a while (and its first config round is behind it).
    for (name, _) in GUESTS {
        wait_for(
            &format!("collector of {name}"),
            Duration::from_secs(120),
            || (observations(&daemon, name) >= 40).then_some(()),
        );
    }
    let n = GUESTS.len() as f64;
    let cpu0 = collector_cpu(&daemon);
    let started = Instant::now();
    let busy = measure(&daemon, window);
    let own = (collector_cpu(&daemon) - cpu0) / started.elapsed().as_secs_f64();
    let rss = rss_kib(daemon.child.id());
    println!(
        "daemon with 1 Hz collectors on {} domains: {:.3}% of one core over {seconds} s \
         (collectors' own work {:.3}%), RSS {} KiB",
        GUESTS.len(),
        busy * 100.0,
        own * 100.0,
        rss
    );

    // Same guests, collectors idle (one sample a minute): heartbeats and the loop remain.
    let mut cfg = std::fs::read_to_string(&daemon.config).unwrap();
    cfg.push_str("\n[monitor]\nsample_interval_ms = 60000\n");
    std::fs::write(&daemon.config, cfg).unwrap();
    daemon.restart();
    for (name, _) in GUESTS {
        wait_for(
            &format!("{name} watched again"),
            Duration::from_secs(60),
            || {
                let s = daemon.service(name)?;
                (s["state"] == "protected").then_some(())
            },
        );
    }
    // Let the first (immediate) tick of each collector pass.
    std::thread::sleep(Duration::from_secs(5));
    let idle = measure(&daemon, window);
    println!(
        "daemon with idle collectors on {} domains: {:.3}% of one core over {seconds} s",
        GUESTS.len(),
        idle * 100.0
    );

    let per_domain = own / n;
    let per_10 = per_domain * 10.0 * 100.0;
    let diff_per_10 = (busy - idle) / n * 10.0 * 100.0;
    let total_per_10 = busy / n * 10.0 * 100.0;
    println!(
        "collector cost: {per_10:.2}% of one core per 10 domains (target <= 1%); \
         cross-check from whole-daemon CPU with and without collectors: {diff_per_10:.2}% \
         (noisy); whole daemon with collectors: {total_per_10:.2}% per 10 domains; RSS {rss} KiB"
    );
    let out = repo().join("build/bench");
    std::fs::create_dir_all(&out).unwrap();
    let json = serde_json::json!({
        "domains": GUESTS.len(),
        "window_s": seconds,
        "daemon_core_fraction_with_collectors": busy,
        "daemon_core_fraction_collectors_idle": idle,
        "collector_core_fraction_per_domain": per_domain,
        "collector_pct_of_core_per_10_domains": per_10,
        "collector_pct_per_10_domains_from_daemon_diff": diff_per_10,
        "daemon_pct_of_core_per_10_domains": total_per_10,
        "daemon_rss_kib": rss,
        "target_pct_per_10_domains": 1.0,
    });
    std::fs::write(
        out.join("collector.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
    println!("wrote {}", out.join("collector.json").display());
}
