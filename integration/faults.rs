//! Fault injection on real guests. Every case ends by checking the invariants that matter:
//! exactly one domain serves the service, its MAC sits on at most one bridge port, status agrees
//! with libvirt, and the state directory lost nothing.

use std::process::Command;
use std::time::{Duration, Instant};

use understudy::libvirt::RunState;

use crate::common::*;

const SHADOW_WAIT: Duration = Duration::from_secs(240);

fn signal_qemu(name: &str, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(qemu_pid(name)), sig).expect("signal qemu");
}

/// True once `pid` has exited: no such process, or a zombie not yet reaped (it holds no
/// files or sockets any more; the state letter follows the last `)` of `/proc/<pid>/stat`).
fn exited(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
        stat.rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z'))
    })
}

/// A protected guest with one paused shadow: (daemon, hypervisor, primary uuid, mac).
fn protected(
    tag: &str,
    name: &str,
    ip: &str,
    env: &[(&str, &str)],
) -> (DaemonProc, understudy::libvirt::Hypervisor, String, String) {
    let daemon = DaemonProc::start_with_env(tag, name, 1, env);
    let hv = hypervisor();
    start_guest(&hv, name, &format!("{ip}/24"), &[]);
    let mac = taps(&hv, name)[0].0.clone();
    daemon.wait_paused_shadows_watching_bridge(name, 1, SHADOW_WAIT, &mac);
    wait_for("primary page", Duration::from_secs(60), || {
        http_get(ip, Duration::from_secs(1))
    });
    let uuid = domain_uuid(&hv, name);
    (daemon, hv, uuid, mac)
}

/// status agrees with libvirt: the active domain runs, every listed shadow is paused.
fn assert_status_matches_libvirt(
    daemon: &DaemonProc,
    hv: &understudy::libvirt::Hypervisor,
    service: &str,
) {
    let svc = daemon.service(service).expect("service in status");
    let active = svc["active"].as_str().unwrap();
    assert_eq!(
        hv.state(active).unwrap(),
        RunState::Running,
        "status says {active} is active"
    );
    for sh in svc["shadows"].as_array().unwrap() {
        if sh["state"] == "paused" {
            assert_eq!(
                hv.state(sh["name"].as_str().unwrap()).unwrap(),
                RunState::Paused,
                "{sh}"
            );
        }
    }
}

/// The daemon's own outage estimate of the service's last failover, if its record lands
/// within a few seconds (for the report only: the test asserts nothing on it).
fn outage_ms(daemon: &DaemonProc, service: &str) -> Option<f64> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(ms) = daemon
            .service(service)
            .and_then(|s| s["last_failover"]["outage_ms"].as_f64())
        {
            return Some(ms);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

fn state_files(daemon: &DaemonProc) -> Vec<String> {
    let mut v: Vec<String> = walk(&daemon.dir.join("state"));
    v.sort();
    v
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p.display().to_string());
            }
        }
    }
    out
}

#[test]
fn sigstopped_primary_is_fenced_and_replaced() {
    require_lab();
    let (name, ip) = ("it-stop2", "10.77.0.31");
    let _cleanup = Cleanup {
        prefixes: vec![name.to_string()],
    };
    let (daemon, hv, _uuid, mac) = protected("sigstop", name, ip, &[]);
    let shadow = format!("{name}-shadow-1");
    let shadow_uuid = domain_uuid(&hv, &shadow);
    let t = Instant::now();
    signal_qemu(name, nix::sys::signal::Signal::SIGSTOP);
    wait_for_every(
        "shadow serving after SIGSTOP",
        Duration::from_secs(30),
        RECOVERY_POLL,
        || http_get(ip, Duration::from_millis(200)).filter(|p| page_uuid(p) == shadow_uuid),
    );
    let served = t.elapsed();
    // The record lands when the whole pipeline (incl. apply_profile) is done, after serving.
    let record = wait_for("failover record", Duration::from_secs(30), || {
        let s = daemon.service(name)?;
        (s["last_failover"]["trigger"] == "heartbeat").then(|| s["last_failover"].clone())
    });
    report_recovery(
        "sigstopped_primary_is_fenced_and_replaced",
        "sigstop",
        served,
        record["outage_ms"].as_f64(),
    );
    assert_single_server(ip, &shadow_uuid, &mac);
    // After the grace period the stopped primary is destroyed, and it never counted as false.
    wait_for("old primary destroyed", Duration::from_secs(40), || {
        (!hv.state(name).ok()?.is_active()).then_some(())
    });
    assert_eq!(daemon.status()["false_failovers"], 0);
    daemon.wait_paused_shadows_watching_bridge(name, 1, SHADOW_WAIT, &mac);
    assert_status_matches_libvirt(&daemon, &hv, name);
}

#[test]
fn dead_guest_agent_or_busy_cpus_are_not_failures() {
    require_lab();
    let (name, ip) = ("it-busy1", "10.77.0.32");
    let _cleanup = Cleanup {
        prefixes: vec![name.to_string()],
    };
    let (daemon, hv, uuid, mac) = protected("busy", name, ip, &[]);

    // Saturate the guest's only vCPU for 25 s: pings slow down, but vCPU time advances.
    let exec = r#"{"execute":"guest-exec","arguments":{"path":"/bin/us-workload","arg":["cpu","100","25"]}}"#;
    assert!(
        agent(&hv, name, exec).is_some(),
        "guest-exec of the workload failed"
    );
    std::thread::sleep(Duration::from_secs(20));
    let svc = daemon.service(name).unwrap();
    assert!(
        svc["last_failover"].is_null(),
        "a busy guest was failed over: {svc}"
    );
    assert_single_server(ip, &uuid, &mac);

    // Kill the guest agent itself: reported as degraded, never failed over.
    let kill = r#"{"execute":"guest-exec","arguments":{"path":"/bin/busybox","arg":["killall","qemu-ga"]}}"#;
    let _ = agent(&hv, name, kill);
    let svc = wait_for("degraded health", Duration::from_secs(20), || {
        let s = daemon.service(name)?;
        s["health"].as_str()?.starts_with("degraded").then_some(s)
    });
    std::thread::sleep(Duration::from_secs(5));
    let svc2 = daemon.service(name).unwrap();
    assert!(
        svc2["last_failover"].is_null(),
        "agent death caused a failover: {svc}"
    );
    assert_eq!(svc2["active"], name);
    assert_single_server(ip, &uuid, &mac);
    assert_eq!(daemon.status()["false_failovers"], 0);
    assert_status_matches_libvirt(&daemon, &hv, name);
}

#[test]
fn detached_primary_tap_is_reattached_not_failed_over() {
    require_lab();
    let (name, ip) = ("it-tap1", "10.77.0.33");
    let _cleanup = Cleanup {
        prefixes: vec![name.to_string()],
    };
    let (daemon, hv, uuid, mac) = protected("tap", name, ip, &[]);
    let tap = taps(&hv, name)[0].1.clone();
    let t = Instant::now();
    let st = Command::new("ip")
        .args(["link", "set", "dev", &tap, "nomaster"])
        .status()
        .unwrap();
    assert!(st.success());
    wait_for_every(
        "tap re-attached",
        Duration::from_secs(10),
        RECOVERY_POLL,
        || (master_of(&tap).as_deref() == Some("usbr0")).then_some(()),
    );
    wait_for_every(
        "page served again",
        Duration::from_secs(10),
        RECOVERY_POLL,
        || http_get(ip, Duration::from_millis(500)),
    );
    report_recovery(
        "detached_primary_tap_is_reattached_not_failed_over",
        "tap-nomaster",
        t.elapsed(),
        None,
    );
    assert!(daemon.service(name).unwrap()["last_failover"].is_null());
    assert_single_server(ip, &uuid, &mac);
    assert_status_matches_libvirt(&daemon, &hv, name);
}

#[test]
fn libvirtd_restart_under_the_daemon_reconnects_without_failover() {
    require_lab();
    let (name, ip) = ("it-lvd1", "10.77.0.34");
    let _cleanup = Cleanup {
        prefixes: vec![name.to_string()],
    };
    let (daemon, hv, uuid, mac) = protected("libvirtd", name, ip, &[]);
    drop(hv);
    let pid: i32 = std::fs::read_to_string("/run/libvirtd.pid")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let t = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    wait_for("libvirtd gone", Duration::from_secs(20), || {
        exited(pid).then_some(())
    });
    // We run inside the lab namespace with its mounts, as lab-up starts it.
    let st = Command::new("libvirtd").arg("-d").status().unwrap();
    assert!(st.success(), "libvirtd did not restart");
    let hv = wait_for("libvirtd answering", Duration::from_secs(30), || {
        let events = understudy::libvirt::EventLoop::start().ok()?;
        understudy::libvirt::Hypervisor::open(&events, URI, 5, 3).ok()
    });
    wait_for_every(
        "daemon reconnected",
        Duration::from_secs(30),
        RECOVERY_POLL,
        || (daemon.status()["daemon"]["connected"] == true).then_some(()),
    );
    report_recovery(
        "libvirtd_restart_under_the_daemon_reconnects_without_failover",
        "libvirtd-restart",
        t.elapsed(),
        None,
    );
    std::thread::sleep(Duration::from_secs(5));
    let svc = daemon.service(name).unwrap();
    assert!(
        svc["last_failover"].is_null(),
        "libvirtd restart caused a failover: {svc}"
    );
    assert_single_server(ip, &uuid, &mac);
    assert_status_matches_libvirt(&daemon, &hv, name);
    // Events still arrive after the reconnect: a crash now is still failed over.
    let shadow_uuid = domain_uuid(&hv, &format!("{name}-shadow-1"));
    let t = Instant::now();
    signal_qemu(name, nix::sys::signal::Signal::SIGKILL);
    wait_for_every(
        "shadow serving after reconnect",
        Duration::from_secs(30),
        RECOVERY_POLL,
        || http_get(ip, Duration::from_millis(200)).filter(|p| page_uuid(p) == shadow_uuid),
    );
    let served = t.elapsed();
    assert_single_server(ip, &shadow_uuid, &mac);
    report_recovery(
        "libvirtd_restart_under_the_daemon_reconnects_without_failover",
        "sigkill-after-reconnect",
        served,
        outage_ms(&daemon, name),
    );
}

#[test]
fn daemon_killed_at_each_promotion_step_finishes_on_restart() {
    require_lab();
    let (name, ip) = ("it-jr1", "10.77.0.35");
    let _cleanup = Cleanup {
        prefixes: vec![name.to_string()],
    };
    let (mut daemon, hv, _uuid, mac) = protected("journal", name, ip, &[]);
    for step in ["fence", "claim", "resume", "rewire", "announce", "metadata"] {
        let svc = daemon.service(name).unwrap();
        let active = svc["active"].as_str().unwrap().to_string();
        let shadow = daemon.wait_paused_shadows(name, 1, SHADOW_WAIT).remove(0);
        let shadow_uuid = domain_uuid(&hv, &shadow);
        let files_before = state_files(&daemon);
        // Restart the daemon armed to abort right after `step`, then crash the primary.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(daemon.child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = daemon.child.wait();
        daemon.child = respawn_with_fault(&daemon, step);
        wait_for(
            "armed daemon up with its paused shadow",
            Duration::from_secs(60),
            || {
                let s =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| daemon.service(name)))
                        .ok()
                        .flatten()?;
                s["shadows"]
                    .as_array()?
                    .iter()
                    .any(|x| x["state"] == "paused")
                    .then_some(())
            },
        );
        let t = Instant::now();
        signal_qemu(&active, nix::sys::signal::Signal::SIGKILL);
        wait_exit(&mut daemon, Duration::from_secs(30));
        // A normal restart must finish the promotion.
        daemon.restart();
        wait_for_every(
            &format!("shadow serving after abort at {step}"),
            Duration::from_secs(60),
            RECOVERY_POLL,
            || http_get(ip, Duration::from_millis(300)).filter(|p| page_uuid(p) == shadow_uuid),
        );
        report_recovery(
            "daemon_killed_at_each_promotion_step_finishes_on_restart",
            &format!("sigkill-with-abort-after-{step}"),
            t.elapsed(),
            None,
        );
        let svc = wait_for(
            "status shows the promoted shadow",
            Duration::from_secs(30),
            || {
                let s = daemon.service(name)?;
                (s["active"] == shadow.as_str()).then_some(s)
            },
        );
        assert_single_server(ip, &shadow_uuid, &mac);
        assert_status_matches_libvirt(&daemon, &hv, name);
        let files_after = state_files(&daemon);
        for f in files_before.iter().filter(|f| !f.contains(&active)) {
            assert!(
                files_after.contains(f),
                "state file {f} lost after abort at {step}"
            );
        }
        eprintln!("abort after {step}: recovered; {svc}");
    }
}

#[test]
fn daemon_killed_between_disk_attach_and_network_finishes_the_hand_over_on_restart() {
    use crate::stateful::data_image;
    require_lab();
    let (name, ip) = ("it-jr2", "10.77.0.36");
    let _cleanup = Cleanup {
        prefixes: vec![name.to_string()],
    };
    let mut daemon = DaemonProc::start_configured("journal-data", name, 1, DATA_CLASS, &[]);
    let hv = hypervisor();
    let image = data_image(&daemon, name);
    let source = image.to_str().unwrap();
    // A LUN on virtio-scsi, as `make lab-guest DATA=1` makes it.
    start_guest(
        &hv,
        name,
        &format!("{ip}/24"),
        &["--data", source, "--data-bus", "scsi"],
    );
    let mac = taps(&hv, name)[0].0.clone();
    // After `attach` the disk is on the running shadow, off the network, not mounted; after
    // `promote_commands` it is mounted too. Either way a restart must run the commands (again)
    // and only then bring the network up.
    for (round, step) in ["attach", "promote_commands"].into_iter().enumerate() {
        let active = daemon.service(name).unwrap()["active"]
            .as_str()
            .unwrap()
            .to_string();
        let shadow = daemon.wait_paused_shadows(name, 1, SHADOW_WAIT).remove(0);
        let shadow_uuid = domain_uuid(&hv, &shadow);
        wait_for("ledger served", Duration::from_secs(60), || ledger(ip));
        let writer = Writer::start(ip, &format!("jr{round}"));
        wait_for("acknowledged appends", Duration::from_secs(20), || {
            (writer.acked() >= 20).then_some(())
        });
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(daemon.child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = daemon.child.wait();
        daemon.child = respawn_with_fault(&daemon, step);
        wait_for(
            "armed daemon up with its paused shadow",
            Duration::from_secs(60),
            || {
                let s =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| daemon.service(name)))
                        .ok()
                        .flatten()?;
                s["shadows"]
                    .as_array()?
                    .iter()
                    .any(|x| x["state"] == "paused")
                    .then_some(())
            },
        );
        let t = Instant::now();
        let old_pid = qemu_pid(&active);
        signal_qemu(&active, nix::sys::signal::Signal::SIGKILL);
        wait_exit(&mut daemon, Duration::from_secs(60));
        // The killed primary's QEMU was gone before the disk moved (the daemon reaps it first);
        // libvirt may list the domain as running a while longer (it learns of the death from
        // the monitor's EOF, and a crashed domain's cleanup holds its lock for up to 200 ms or
        // more on a busy host), so its view is read once it has caught up.
        assert!(
            exited(old_pid),
            "the killed primary's QEMU {old_pid} still runs after the abort at {step}"
        );
        wait_for(
            "libvirt to see the killed primary stopped",
            Duration::from_secs(30),
            || {
                hv.state(&active)
                    .map_or(true, |s| !s.is_active())
                    .then_some(())
            },
        );
        // Aborted with the disk on the shadow and the network still down.
        assert_eq!(
            holders(&hv, source),
            vec![shadow.clone()],
            "after abort at {step}"
        );
        assert_eq!(hv.state(&shadow).unwrap(), RunState::Running);
        assert_eq!(
            master_of(&taps(&hv, &shadow)[0].1),
            None,
            "the shadow's tap joined the bridge before its commands ran (abort at {step})"
        );
        let before = writer.acked();
        daemon.restart();
        wait_for_every(
            &format!("appends acknowledged again after abort at {step}"),
            Duration::from_secs(90),
            RECOVERY_POLL,
            || (writer.acked() >= before + 20).then_some(()),
        );
        report_recovery(
            "daemon_killed_between_disk_attach_and_network_finishes_the_hand_over_on_restart",
            &format!("sigkill-with-abort-after-{step}"),
            t.elapsed(),
            None,
        );
        let acked = writer.finish();
        let svc = wait_for(
            "status shows the promoted shadow",
            Duration::from_secs(30),
            || {
                let s = daemon.service(name)?;
                (s["active"] == shadow.as_str() && s["last_failover"]["ok"] == true).then_some(s)
            },
        );
        // The interrupted shadow itself was promoted (not destroyed for a new one), its
        // commands ran after the restart, and the network came up after them.
        let steps: Vec<&str> = svc["last_failover"]["steps"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|s| s["name"].as_str())
            .collect();
        let at = |want: &str| {
            steps
                .iter()
                .position(|s| *s == want)
                .unwrap_or_else(|| panic!("no {want} step after abort at {step}: {steps:?}"))
        };
        assert!(at("promote_commands") < at("rewire"), "{steps:?}");
        assert_eq!(svc["last_failover"]["trigger"], "recovery", "{svc}");
        let have = ledger(ip).expect("the promoted shadow serves the ledger");
        let missing: Vec<&String> = acked.iter().filter(|k| !have.contains(k)).collect();
        assert!(
            missing.is_empty(),
            "abort at {step}: {} acknowledged keys lost, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
        assert_eq!(holders(&hv, source), vec![shadow.clone()]);
        assert_single_server(ip, &shadow_uuid, &mac);
        assert_status_matches_libvirt(&daemon, &hv, name);
        eprintln!(
            "abort after {step}: finished on restart; {} keys kept; steps {steps:?}",
            acked.len()
        );
    }
}

fn respawn_with_fault(d: &DaemonProc, step: &str) -> std::process::Child {
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&d.log)
        .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_understudy"))
        .arg("--config")
        .arg(&d.config)
        .arg("run")
        .env(understudy::failover::FAULT_ABORT_AFTER_ENV, step)
        .stdout(logf.try_clone().unwrap())
        .stderr(logf)
        .spawn()
        .unwrap();
    wait_for("armed daemon socket", Duration::from_secs(30), || {
        std::os::unix::net::UnixStream::connect(&d.socket).ok()
    });
    child
}
