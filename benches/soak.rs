//! `make bench-soak`: a protected lab guest with its vCPU saturated for SOAK_SECONDS (default
//! 600) under the default heartbeat settings. A busy guest is healthy, so every failover in
//! that time is a false one. Reports failovers seen, the daemon's own false-failover count,
//! heartbeat health over time, and whether the guest kept serving.

#[path = "../integration/common.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;

const NAME: &str = "soak-web";
const IP: &str = "10.77.0.36";

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    require_lab();
    let seconds: u64 = std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    let _cleanup = Cleanup {
        prefixes: vec![NAME.to_string()],
    };
    let hv = hypervisor();
    let daemon = DaemonProc::start("soak", NAME, 1);
    start_guest(&hv, NAME, &format!("{IP}/24"), &[]);
    daemon.wait_paused_shadows(NAME, 1, Duration::from_secs(300));
    wait_for("page", Duration::from_secs(60), || {
        http_get(IP, Duration::from_secs(1))
    });

    // Saturate every vCPU (the lab guest has one online) for the whole soak, plus memory.
    let exec = format!(
        r#"{{"execute":"guest-exec","arguments":{{"path":"/bin/us-workload","arg":["pattern","100","32","{}"]}}}}"#,
        seconds + 30
    );
    assert!(
        agent(&hv, NAME, &exec).is_some(),
        "cannot start the CPU workload in the guest"
    );
    println!("soak: {NAME} saturated for {seconds} s with default heartbeat settings");

    let start = Instant::now();
    let mut health_counts = std::collections::BTreeMap::<String, u64>::new();
    let (mut served, mut polled) = (0u64, 0u64);
    let mut failovers = 0u64;
    let mut last_at = serde_json::Value::Null;
    while start.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_secs(5));
        let svc = daemon.service(NAME).expect("service in status");
        let health = svc["health"]
            .as_str()
            .unwrap_or("?")
            .split(':')
            .next()
            .unwrap_or("?")
            .to_string();
        *health_counts.entry(health).or_default() += 1;
        if svc["last_failover"]["at_unix_ms"] != last_at && !svc["last_failover"].is_null() {
            failovers += 1;
            last_at = svc["last_failover"]["at_unix_ms"].clone();
            println!(
                "soak: FAILOVER at {:?}: {}",
                start.elapsed(),
                svc["last_failover"]
            );
        }
        polled += 1;
        if http_get(IP, Duration::from_secs(2)).is_some() {
            served += 1;
        }
    }
    let status = daemon.status();
    println!();
    println!("soak duration: {seconds} s, guest CPU saturated throughout");
    println!("failovers during soak: {failovers} (every one is false: the guest was only busy)");
    println!(
        "daemon-counted false failovers: {}",
        status["false_failovers"]
    );
    println!("health samples: {health_counts:?}");
    println!("page served at {served} of {polled} checks");
    println!(
        "target: zero false failovers: {}",
        if failovers == 0 { "met" } else { "NOT met" }
    );
    let out = repo().join("build/bench");
    std::fs::create_dir_all(&out).unwrap();
    let json = serde_json::json!({
        "seconds": seconds,
        "failovers": failovers,
        "daemon_false_failovers": status["false_failovers"],
        "health_samples": health_counts,
        "served": served,
        "polled": polled,
    });
    std::fs::write(
        out.join("soak.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
}
