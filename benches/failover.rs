//! `make bench-failover`: client-observed outage of crash failovers on a real lab guest, and
//! the same outage for two baselines on the same guest in the same run:
//! - cold restart of the crashed domain (what restart-based HA does; detection excluded),
//! - restore of a managed-saved standby (detection excluded).
//!
//! A client inside the lab namespace starts a request for the guest's page every 5 ms (each
//! allowed 1 s; requests overlap, like independent clients). Outage = first good answer after the kill minus last good answer before it.
//! Writes build/bench/failover.json and build/bench/failover.svg.
//!
//! Also: the outage after SIGSTOP of the primary's QEMU (hang detection with the default
//! heartbeat settings, then fencing and promotion).
//!
//! Environment: BENCH_TRIALS (default 50: enough for a p99 that means something), BENCH_SIGSTOP_TRIALS (default 3),
//! BENCH_BASELINE_TRIALS (default 3).

#[path = "../integration/common.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use understudy::libvirt::Hypervisor;
use understudy::probe::{outage_around, Prober};

const NAME: &str = "bench-web";
const IP: &str = "10.77.0.30";

/// Outage around `kill`: last answer completed before it to the first answer after it that
/// names `new_uuid`. Waits up to `limit` for that answer.
fn outage(probe: &Prober, kill: Instant, new_uuid: &str, limit: Duration) -> Option<f64> {
    let deadline = Instant::now() + limit;
    loop {
        let answers = probe.answers();
        if let Some(d) = outage_around(&answers, kill, |b| page_uuid(b) == new_uuid) {
            return Some(d.as_secs_f64() * 1000.0);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kill_qemu(name: &str) {
    let pid = qemu_pid(name);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

fn active_of(daemon: &DaemonProc) -> String {
    daemon.service(NAME).unwrap()["active"]
        .as_str()
        .unwrap()
        .to_string()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    require_lab();
    let trials: usize = std::env::var("BENCH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let base_trials: usize = std::env::var("BENCH_BASELINE_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let _cleanup = Cleanup {
        prefixes: vec![NAME.to_string()],
    };
    let hv = hypervisor();
    let daemon = DaemonProc::start("bench", NAME, 1);
    start_guest(&hv, NAME, &format!("{IP}/24"), &[]);
    // A new request every 5 ms, each allowed 1 s; requests overlap like independent clients.
    let probe = Prober::start(
        format!("{IP}:80").parse().unwrap(),
        "/",
        Duration::from_millis(5),
        Duration::from_secs(1),
    )
    .unwrap();

    let mut understudy_ms = Vec::new();
    let mut daemon_steps = Vec::new();
    for i in 0..trials {
        let shadow = daemon
            .wait_paused_shadows(NAME, 1, Duration::from_secs(300))
            .remove(0);
        let active = active_of(&daemon);
        wait_for(
            "page served before the kill",
            Duration::from_secs(60),
            || http_get(IP, Duration::from_millis(200)),
        );
        std::thread::sleep(Duration::from_millis(300));
        let shadow_uuid = domain_uuid(&hv, &shadow);
        let kill = Instant::now();
        kill_qemu(&active);
        match outage(&probe, kill, &shadow_uuid, Duration::from_secs(30)) {
            Some(ms) => {
                println!("understudy trial {i}: {active} -> {shadow}: client outage {ms:.1} ms");
                understudy_ms.push(ms);
            }
            None => println!("understudy trial {i}: {active} -> {shadow}: NOT served within 30 s"),
        }
        let svc = wait_for("failover record", Duration::from_secs(30), || {
            let s = daemon.service(NAME)?;
            (s["active"] == shadow.as_str()).then_some(s)
        });
        daemon_steps.push(svc["last_failover"].clone());
    }

    // Hangs: SIGSTOP of the active primary's QEMU, with the default heartbeat settings.
    let stop_trials: usize = std::env::var("BENCH_SIGSTOP_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let mut sigstop_ms = Vec::new();
    for i in 0..stop_trials {
        let shadow = daemon
            .wait_paused_shadows(NAME, 1, Duration::from_secs(300))
            .remove(0);
        let active = active_of(&daemon);
        wait_for(
            "page served before SIGSTOP",
            Duration::from_secs(60),
            || http_get(IP, Duration::from_millis(200)),
        );
        std::thread::sleep(Duration::from_millis(300));
        let shadow_uuid = domain_uuid(&hv, &shadow);
        let stop = Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(qemu_pid(&active)),
            nix::sys::signal::Signal::SIGSTOP,
        )
        .unwrap();
        match outage(&probe, stop, &shadow_uuid, Duration::from_secs(30)) {
            Some(ms) => {
                println!("SIGSTOP trial {i}: {active} -> {shadow}: client outage {ms:.1} ms");
                sigstop_ms.push(ms);
            }
            None => println!("SIGSTOP trial {i}: {active} -> {shadow}: NOT served within 30 s"),
        }
        wait_for("failover record", Duration::from_secs(30), || {
            (daemon.service(NAME)?["active"] == shadow.as_str()).then_some(())
        });
    }

    // Baselines run without the daemon so nothing fails over behind our back.
    let standby = daemon
        .wait_paused_shadows(NAME, 1, Duration::from_secs(300))
        .remove(0);
    let mut active = active_of(&daemon);
    drop(daemon);

    let mut cold_ms = Vec::new();
    for i in 0..base_trials {
        let uuid = domain_uuid(&hv, &active);
        wait_for("page before cold restart", Duration::from_secs(120), || {
            http_get(IP, Duration::from_millis(200))
        });
        std::thread::sleep(Duration::from_millis(300));
        let kill = Instant::now();
        kill_qemu(&active);
        // Restart-based HA: start the same domain again as soon as it is known dead.
        wait_for("domain shut off", Duration::from_secs(10), || {
            (!hv.state(&active).ok()?.is_active()).then_some(())
        });
        hv.start(&active, false).unwrap();
        match outage(&probe, kill, &uuid, Duration::from_secs(120)) {
            Some(ms) => {
                println!("cold restart trial {i}: client outage {ms:.1} ms");
                cold_ms.push(ms);
            }
            None => println!("cold restart trial {i}: NOT served within 120 s"),
        }
    }

    let mut restore_ms = Vec::new();
    let mut standby_name = standby;
    for i in 0..base_trials {
        // Prepare: the standby (isolated, link down) is saved to disk while the active serves.
        let net = tokio_netlink();
        hv.managed_save(&standby_name).unwrap();
        wait_for(
            "page before restore trial",
            Duration::from_secs(120),
            || http_get(IP, Duration::from_millis(200)),
        );
        std::thread::sleep(Duration::from_millis(300));
        let uuid = domain_uuid(&hv, &standby_name);
        let kill = Instant::now();
        kill_qemu(&active);
        hv.start(&standby_name, false).unwrap(); // restores the managed save
                                                 // A standby saved while paused comes back paused.
        if hv.state(&standby_name).unwrap() == understudy::libvirt::RunState::Paused {
            hv.resume(&standby_name).unwrap();
        }
        bring_online(&hv, &net, &standby_name);
        match outage(&probe, kill, &uuid, Duration::from_secs(60)) {
            Some(ms) => {
                println!("managed-save restore trial {i}: client outage {ms:.1} ms");
                restore_ms.push(ms);
            }
            None => println!("managed-save restore trial {i}: NOT served within 60 s"),
        }
        // The restored standby now serves; make a new standby from it for the next trial.
        let old = std::mem::replace(&mut active, standby_name.clone());
        if i + 1 < base_trials {
            let _ = hv.destroy(&old);
            standby_name = make_standby(&hv, &net, &active, i as u64 + 100);
        }
    }
    let sent = probe.sent();
    let answered = probe.finish().len();
    println!("client: {sent} requests, {answered} answered");

    let (u50, u95, umax) = stats(&understudy_ms);
    let (c50, c95, cmax) = stats(&cold_ms);
    let (r50, r95, rmax) = stats(&restore_ms);
    println!();
    println!("method                  trials   median_ms     p95_ms     max_ms");
    println!(
        "understudy failover     {:>6} {:>11.1} {:>10.1} {:>10.1}",
        understudy_ms.len(),
        u50,
        u95,
        umax
    );
    println!(
        "cold restart            {:>6} {:>11.1} {:>10.1} {:>10.1}",
        cold_ms.len(),
        c50,
        c95,
        cmax
    );
    println!(
        "managed-save restore    {:>6} {:>11.1} {:>10.1} {:>10.1}",
        restore_ms.len(),
        r50,
        r95,
        rmax
    );
    let (s50, s95, smax) = stats(&sigstop_ms);
    println!(
        "understudy after SIGSTOP{:>6} {:>11.1} {:>10.1} {:>10.1}",
        sigstop_ms.len(),
        s50,
        s95,
        smax
    );
    let u99 = percentile(&understudy_ms, 0.99);
    println!(
        "understudy failover p99 over {} trials: {u99:.1} ms (target <= 150 ms: {})",
        understudy_ms.len(),
        verdict(u99 <= 150.0)
    );
    println!("ratio cold/understudy (median): {:.1}x", c50 / u50);
    println!("ratio restore/understudy (median): {:.1}x", r50 / u50);
    println!(
        "target: median <= 100 ms: {}, p95 <= 250 ms: {}, >= 50x shorter than cold restart: {}, SIGSTOP to serving <= 1500 ms (max): {}",
        verdict(u50 <= 100.0),
        verdict(u95 <= 250.0),
        verdict(c50 / u50 >= 50.0),
        verdict(smax <= 1500.0)
    );

    let out = repo().join("build/bench");
    std::fs::create_dir_all(&out).unwrap();
    let json = serde_json::json!({
        "trials": trials,
        "understudy_ms": understudy_ms,
        "cold_restart_ms": cold_ms,
        "managed_save_restore_ms": restore_ms,
        "sigstop_ms": sigstop_ms,
        "summary": {
            "understudy": {"median": u50, "p95": u95, "p99": u99, "max": umax},
            "cold_restart": {"median": c50, "p95": c95, "max": cmax},
            "managed_save_restore": {"median": r50, "p95": r95, "max": rmax},
            "sigstop": {"median": s50, "p95": s95, "max": smax},
            "ratio_cold_over_understudy": c50 / u50,
            "ratio_restore_over_understudy": r50 / u50,
        },
        "daemon_failover_records": daemon_steps,
    });
    std::fs::write(
        out.join("failover.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
    let chart = understudy::plot::dots_log(
        "Client-observed outage per trial (log scale)",
        "outage (ms)",
        &[
            ("understudy", &understudy_ms),
            ("cold restart", &cold_ms),
            ("managed-save restore", &restore_ms),
        ],
    )
    .expect("outage chart");
    std::fs::write(out.join("failover.svg"), chart).unwrap();
    println!(
        "wrote {} and {}",
        out.join("failover.json").display(),
        out.join("failover.svg").display()
    );
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}

struct NetRt {
    rt: tokio::runtime::Runtime,
    net: understudy::net::Netlink,
}

fn tokio_netlink() -> NetRt {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let net = rt.block_on(async { understudy::net::Netlink::new().unwrap() });
    NetRt { rt, net }
}

/// Puts a just-restored standby on the bridge with its link up, as a restore-based HA would.
fn bring_online(hv: &Hypervisor, n: &NetRt, name: &str) {
    let xml = understudy::domain_xml::DomainXml::parse(&hv.xml(name, false).unwrap()).unwrap();
    for (mac, tap) in xml.live_interface_taps() {
        n.rt.block_on(n.net.enslave_and_up(&tap, "usbr0")).unwrap();
        if let Some(x) = xml.interface_xml_with_link(&mac, true) {
            hv.update_device(name, &x, false).unwrap();
        }
    }
    let _ = hv.qmp(
        name,
        r#"{"execute":"announce-self","arguments":{"initial":50,"max":550,"rounds":5,"step":100}}"#,
    );
}

/// A new standby cloned from `from` through understudy's own provisioning (booted, isolated,
/// paused), for the restore baseline.
fn make_standby(hv: &Hypervisor, n: &NetRt, from: &str, generation: u64) -> String {
    let req = understudy::failover::shadow::ShadowRequest {
        service: NAME.to_string(),
        class: "default".into(),
        primary: from.to_string(),
        primary_xml: None,
        name: format!("{NAME}-shadow-{generation}"),
        generation,
        state_dir: std::env::temp_dir().join("understudy-bench-standby"),
        boot_timeout: Duration::from_secs(300),
        agent_timeout: Duration::from_secs(1),
        agent_max_reply: 1 << 20,
        // The same warm-up as the daemon's shadows get (integration/common.rs), for fairness.
        warmup: vec![vec![
            "/bin/busybox".into(),
            "sh".into(),
            "-c".into(),
            "for i in $(seq 30); do wget -q -O /dev/null http://127.0.0.1/; done".into(),
        ]],
        disks: understudy::failover::plan::DiskPolicy::default(),
        standby: Default::default(),
        tier: understudy::failover::record::Tier::Paused,
    };
    n.rt.block_on(understudy::failover::shadow::provision(hv, &n.net, req))
        .unwrap()
        .name
}
