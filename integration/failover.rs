//! Shadows and crash failover on real guests.

use std::time::{Duration, Instant};

use crate::common::*;

const SHADOW_WAIT: Duration = Duration::from_secs(240);

fn kill_qemu(name: &str) {
    let pid = qemu_pid(name);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("SIGKILL qemu");
}

/// Polls the page every 5 ms until it names `uuid`; returns how long the page was not served
/// by anyone (from the kill to the first good answer).
fn wait_page_uuid(ip: &str, uuid: &str, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if let Some(p) = http_get(ip, Duration::from_millis(100)) {
            if page_uuid(&p) == uuid {
                return start.elapsed();
            }
        }
        assert!(
            start.elapsed() < limit,
            "page of {ip} never named {uuid} within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn crash_of_primary_promotes_its_paused_shadow() {
    require_lab();
    let name = "it-web1";
    let ip = "10.77.0.21";
    let _cleanup = Cleanup {
        prefixes: vec![name.to_string()],
    };
    let daemon = DaemonProc::start("crash", name, 1);
    let hv = hypervisor();
    start_guest(&hv, name, &format!("{ip}/24"), &[]);
    let primary_uuid = domain_uuid(&hv, name);

    // Protected automatically: one shadow, booted and paused.
    let shadows = daemon.wait_paused_shadows(name, 1, SHADOW_WAIT);
    let shadow = shadows[0].clone();
    assert_eq!(shadow, format!("{name}-shadow-1"));
    assert_eq!(
        hv.state(&shadow).unwrap(),
        understudy::libvirt::RunState::Paused
    );
    let shadow_uuid = domain_uuid(&hv, &shadow);
    assert_ne!(shadow_uuid, primary_uuid);

    // Same MAC, but the shadow's tap is off the bridge while it stands by.
    let p_taps = taps(&hv, name);
    let s_taps = taps(&hv, &shadow);
    assert_eq!(p_taps.len(), 1);
    assert_eq!(
        p_taps[0].0, s_taps[0].0,
        "shadow must keep the primary's MAC"
    );
    assert_eq!(master_of(&p_taps[0].1).as_deref(), Some("usbr0"));
    assert_eq!(
        master_of(&s_taps[0].1),
        None,
        "standing-by shadow's tap is on a bridge"
    );

    // Only the primary answers.
    wait_for("primary page", Duration::from_secs(60), || {
        http_get(ip, Duration::from_secs(1))
    });
    for _ in 0..10 {
        let page = http_get(ip, Duration::from_secs(1)).expect("primary serves");
        assert_eq!(
            page_uuid(&page),
            primary_uuid,
            "someone other than the primary answered: {page}"
        );
    }

    // Crash: SIGKILL the primary's QEMU. The shadow takes over address and MAC.
    kill_qemu(name);
    let outage = wait_page_uuid(ip, &shadow_uuid, Duration::from_secs(30));
    eprintln!("client-observed outage after SIGKILL: {outage:?}");
    let s_taps_after = taps(&hv, &shadow);
    assert_eq!(
        master_of(&s_taps_after[0].1).as_deref(),
        Some("usbr0"),
        "promoted shadow's tap not on the bridge"
    );
    assert_eq!(
        hv.state(&shadow).unwrap(),
        understudy::libvirt::RunState::Running
    );

    let svc = wait_for("status shows the failover", Duration::from_secs(30), || {
        let s = daemon.service(name)?;
        (s["active"] == shadow.as_str() && s["last_failover"]["ok"] == true).then_some(s)
    });
    let steps = svc["last_failover"]["steps"].as_array().unwrap();
    let names: Vec<&str> = steps.iter().filter_map(|s| s["name"].as_str()).collect();
    for want in ["fence", "resume", "rewire", "announce", "metadata"] {
        assert!(names.contains(&want), "step {want} missing from {names:?}");
    }
    assert!(svc["last_failover"]["outage_ms"].as_f64().unwrap() > 0.0);

    // A replacement shadow is provisioned from the new primary and reaches paused.
    let replacement = daemon.wait_paused_shadows(name, 1, SHADOW_WAIT);
    assert_eq!(replacement[0], format!("{name}-shadow-2"));
    // Still exactly one server for the address: the promoted shadow.
    for _ in 0..5 {
        let page = http_get(ip, Duration::from_secs(1)).expect("promoted shadow serves");
        assert_eq!(page_uuid(&page), shadow_uuid);
    }
}

#[test]
fn primary_with_qcow2_disk_gets_own_overlays_and_fails_over() {
    require_lab();
    let name = "it-disk1";
    let ip = "10.77.0.22";
    let _cleanup = Cleanup {
        prefixes: vec![name.to_string()],
    };
    let daemon = DaemonProc::start("disk", name, 1);
    let image = daemon.dir.join("it-disk1.qcow2");
    let st = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&image)
        .arg("32M")
        .status()
        .unwrap();
    assert!(st.success());
    let hv = hypervisor();
    start_guest(
        &hv,
        name,
        &format!("{ip}/24"),
        &["--disk", image.to_str().unwrap()],
    );
    let shadow = daemon.wait_paused_shadows(name, 1, SHADOW_WAIT).remove(0);

    let xml = understudy::domain_xml::DomainXml::parse(&hv.xml(&shadow, true).unwrap()).unwrap();
    let disks = xml.disks();
    let vda = disks
        .iter()
        .find(|d| d.target_dev == "vda")
        .expect("shadow keeps the disk");
    let overlay = vda.source.clone().unwrap();
    assert_ne!(
        overlay,
        image.to_str().unwrap(),
        "shadow must not write the primary's image"
    );
    assert!(
        overlay.starts_with(daemon.dir.to_str().unwrap()),
        "overlay {overlay} not in the state dir"
    );
    let info = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json", &overlay])
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    let backing = info["backing-filename"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(!backing.is_empty(), "overlay has no backing file");
    assert_ne!(
        backing,
        image.to_str().unwrap(),
        "a live primary image must never back a shadow"
    );

    let shadow_uuid = domain_uuid(&hv, &shadow);
    wait_for("primary page", Duration::from_secs(60), || {
        http_get(ip, Duration::from_secs(1))
    });
    kill_qemu(name);
    wait_page_uuid(ip, &shadow_uuid, Duration::from_secs(30));
}

#[test]
fn restarted_daemon_rebuilds_state_without_duplicates() {
    require_lab();
    let name = "it-rs1";
    let _cleanup = Cleanup {
        prefixes: vec![name.to_string()],
    };
    let mut daemon = DaemonProc::start("restart", name, 1);
    let hv = hypervisor();
    start_guest(&hv, name, "10.77.0.23/24", &[]);
    let before = daemon.wait_paused_shadows(name, 1, SHADOW_WAIT);

    daemon.restart();
    let after = daemon.wait_paused_shadows(name, 1, Duration::from_secs(30));
    assert_eq!(before, after, "restart changed the shadows");
    // Give housekeeping a few rounds to (wrongly) add shadows, then count in libvirt itself.
    std::thread::sleep(Duration::from_secs(12));
    let shadows: Vec<String> = hv
        .list()
        .unwrap()
        .into_iter()
        .map(|d| d.name)
        .filter(|n| n.starts_with(&format!("{name}-shadow-")))
        .collect();
    assert_eq!(shadows, before, "duplicate shadows after restart");
    let svc = daemon.service(name).unwrap();
    assert_eq!(svc["active"], name);

    // A shadow that crashes is replaced by a new generation; the primary is untouched.
    let pid = qemu_pid(&before[0]);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let replaced = wait_for("crashed shadow replaced", SHADOW_WAIT, || {
        daemon
            .paused_shadows(name)
            .filter(|p| p.len() == 1 && p[0] != before[0])
    });
    assert_eq!(replaced, vec![format!("{name}-shadow-2")]);
    let svc = daemon.service(name).unwrap();
    assert_eq!(
        svc["active"], name,
        "a shadow crash must not move the service"
    );
    assert!(svc["last_failover"].is_null());
    assert_eq!(
        hv.state(name).unwrap(),
        understudy::libvirt::RunState::Running
    );

    // A reload with a broken file is refused with the file and line named; the daemon keeps
    // its running configuration and keeps answering.
    let good = std::fs::read_to_string(&daemon.config).unwrap();
    std::fs::write(
        &daemon.config,
        format!("{good}\n[class.default]\nshadows = \"many\"\n"),
    )
    .unwrap();
    let (code, _, err) = daemon.cli(&["reload"]);
    assert_eq!(code, 1, "a broken reload must fail");
    assert!(
        err.contains("NOT reloaded") && err.contains("understudy.toml:"),
        "{err}"
    );
    std::fs::write(&daemon.config, &good).unwrap();
    let (code, out, err) = daemon.cli(&["reload"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(daemon.service(name).unwrap()["active"], name);
}

#[test]
fn stop_is_not_a_failure_and_bad_requests_change_nothing() {
    require_lab();
    let name = "it-stop1";
    let bad = "it-bad1";
    let _cleanup = Cleanup {
        prefixes: vec![name.to_string(), bad.to_string()],
    };
    let daemon = DaemonProc::start("stop", "it-[sb][ta][od]*", 1);
    let hv = hypervisor();
    start_guest(&hv, name, "10.77.0.24/24", &[]);
    let shadow = daemon.wait_paused_shadows(name, 1, SHADOW_WAIT).remove(0);

    // Unknown service: a clear error, nothing changes.
    let (code, _, err) = daemon.cli(&["failover", "no-such-service"]);
    assert_eq!(code, 1);
    assert!(err.contains("no service named 'no-such-service'"), "{err}");

    // A deliberate stop through understudy does not fail over.
    let (code, out, err) = daemon.cli(&["stop", name]);
    assert_eq!(code, 0, "{out}{err}");
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        hv.state(name).unwrap(),
        understudy::libvirt::RunState::Shutoff
    );
    assert_eq!(
        hv.state(&shadow).unwrap(),
        understudy::libvirt::RunState::Paused,
        "stop promoted the shadow"
    );
    let svc = daemon.service(name).unwrap();
    assert_eq!(svc["state"], "stopped");
    assert_eq!(svc["active"], name);
    assert!(svc["last_failover"].is_null());

    // A primary with a device that cannot be cloned (a writable shareable disk) is refused
    // with an error naming the device, and no shadow domain is left behind.
    let raw = daemon.dir.join("shared.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let xml = guest_xml(bad, "10.77.0.25/24", &[]).replace(
        "</devices>",
        &format!(
            "<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/><target dev='vdb' bus='virtio'/><shareable/></disk></devices>",
            raw.display()
        ),
    );
    let n = hv.define(&xml).unwrap();
    hv.start(&n, false).unwrap();
    let svc = wait_for("unprotectable state", Duration::from_secs(60), || {
        let s = daemon.service(bad)?;
        s["state"]
            .as_str()?
            .starts_with("unprotectable")
            .then_some(s)
    });
    let why = svc["state"].as_str().unwrap();
    assert!(
        why.contains("vdb"),
        "reason does not name the device: {why}"
    );
    assert!(
        hv.list()
            .unwrap()
            .iter()
            .all(|d| !d.name.starts_with(&format!("{bad}-shadow-"))),
        "a shadow of the unclonable primary exists"
    );
    assert_eq!(
        hv.state(bad).unwrap(),
        understudy::libvirt::RunState::Running,
        "the primary itself must be untouched"
    );
}

#[test]
fn planned_switchover_and_shadow_rebuild() {
    require_lab();
    let name = "it-sw1";
    let ip = "10.77.0.26";
    let _cleanup = Cleanup {
        prefixes: vec![name.to_string()],
    };
    let daemon = DaemonProc::start("switch", name, 1);
    let hv = hypervisor();
    start_guest(&hv, name, &format!("{ip}/24"), &[]);
    let first = daemon.wait_paused_shadows(name, 1, SHADOW_WAIT).remove(0);
    let mac = taps(&hv, name)[0].0.clone();

    // Rebuild: the old shadow goes, a new generation comes up paused.
    let (code, out, err) = daemon.cli(&["shadow", "rebuild", name]);
    assert_eq!(code, 0, "{out}{err}");
    let rebuilt = daemon
        .wait_paused_shadows_watching_bridge(name, 1, SHADOW_WAIT, &mac)
        .remove(0);
    assert_ne!(rebuilt, first);
    assert!(
        hv.list().unwrap().iter().all(|d| d.name != first),
        "{first} still defined after rebuild"
    );

    // Planned switchover: fence (pause + cut) the healthy primary, then promote.
    wait_for("primary page", Duration::from_secs(60), || {
        http_get(ip, Duration::from_secs(1))
    });
    let (code, out, err) = daemon.cli(&["failover", name]);
    assert_eq!(code, 0, "{out}{err}");
    let record: serde_json::Value =
        serde_json::from_str(&out).expect("failover prints its record as JSON");
    assert_eq!(record["trigger"], "manual");
    assert_eq!(record["to"], rebuilt.as_str());
    let new_uuid = domain_uuid(&hv, &rebuilt);
    wait_page_uuid(ip, &new_uuid, Duration::from_secs(10));
    wait_for("old primary shut off", Duration::from_secs(30), || {
        (!hv.state(name).ok()?.is_active()).then_some(())
    });
    assert_single_server(ip, &new_uuid, &mac);
    // The replacement boots while the promoted shadow serves: its tap must stay off the bridge.
    let replacement = daemon
        .wait_paused_shadows_watching_bridge(name, 1, SHADOW_WAIT, &mac)
        .remove(0);
    assert_ne!(replacement, rebuilt);
    assert_single_server(ip, &new_uuid, &mac);

    let metrics = daemon.metrics();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("understudy_failovers_total{")
                && l.contains("trigger=\"manual\"")
                && !l.ends_with(" 0")),
        "no manual failover counted in metrics:\n{metrics}"
    );
    assert!(
        metrics.contains("understudy_failover_step_seconds"),
        "no step histogram"
    );
}

#[test]
fn primary_dying_while_its_shadow_boots_is_replaced_when_the_shadow_is_ready() {
    require_lab();
    let name = "it-early1";
    let ip = "10.77.0.27";
    let _cleanup = Cleanup {
        prefixes: vec![name.to_string()],
    };
    let daemon = DaemonProc::start("early", name, 1);
    let hv = hypervisor();
    start_guest(&hv, name, &format!("{ip}/24"), &[]);
    // Kill the primary as soon as its shadow exists but before it is paused.
    wait_for("shadow booting", Duration::from_secs(60), || {
        let s = daemon.service(name)?;
        s["shadows"]
            .as_array()?
            .iter()
            .any(|x| x["state"] == "booting")
            .then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    kill_qemu(name);
    let svc = wait_for(
        "service down with a clear reason",
        Duration::from_secs(30),
        || {
            let s = daemon.service(name)?;
            s["state"].as_str()?.starts_with("down").then_some(s)
        },
    );
    assert!(
        svc["state"].as_str().unwrap().contains("no paused shadow"),
        "{svc}"
    );
    // When the booting shadow is ready it takes over.
    let shadow = format!("{name}-shadow-1");
    wait_for("booting shadow promoted", SHADOW_WAIT, || {
        let s = daemon.service(name)?;
        (s["active"] == shadow.as_str()).then_some(())
    });
    let uuid = domain_uuid(&hv, &shadow);
    wait_page_uuid(ip, &uuid, Duration::from_secs(30));
}

/// The host routes to `dest` in the main table: (destination, device) pairs.
fn routes_to(dest: &str) -> Vec<(String, String)> {
    let out = std::process::Command::new("ip")
        .args(["-j", "-4", "route", "show", "table", "main"])
        .output()
        .expect("ip route");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v.as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["dst"] == dest)
        .map(|r| {
            (
                r["dst"].as_str().unwrap_or("").to_string(),
                r["dev"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn ip(args: &[&str]) {
    let st = std::process::Command::new("ip")
        .args(args)
        .status()
        .unwrap();
    assert!(st.success(), "ip {args:?}");
}

/// A routed VM (class `network = "routed"`): its own tap, on no bridge, the guest's gateway
/// address on the tap and a /32 host route to the guest through it, as a host's VM hook sets
/// them up. Its SIGKILL failover points the route at the shadow's tap; the client (in the lab
/// namespace, through that route) reaches the shadow, and no route to the old tap is left.
/// Then the new primary fails over in turn: what it took over is known for its crash too.
#[test]
fn routed_guest_fails_over_through_the_replaced_host_route() {
    require_lab();
    let (name, ip_addr, gw) = ("it-rt1", "10.77.5.10", "10.77.5.1");
    let _cleanup = Cleanup {
        prefixes: vec![name.to_string()],
    };
    let hv = hypervisor();
    let bridged = guest_xml(name, &format!("{ip_addr}/24"), &[]);
    let xml = bridged
        .replace(
            "<interface type='bridge'>\n      <source bridge='usbr0'/>",
            "<interface type='ethernet'>",
        )
        .replace("us.gw=10.77.0.1", &format!("us.gw={gw}"));
    assert!(
        xml.contains("<interface type='ethernet'>") && xml.contains(&format!("us.gw={gw}")),
        "lab guest XML changed shape: {bridged}"
    );
    hv.define(&xml).unwrap();
    hv.start(name, false).unwrap();
    let (mac, tap) = taps(&hv, name)[0].clone();
    assert_eq!(master_of(&tap), None, "a routed tap is on no bridge");
    ip(&["addr", "add", &format!("{gw}/32"), "dev", &tap]);
    ip(&["route", "add", &format!("{ip_addr}/32"), "dev", &tap]);
    wait_for("routed guest's page", Duration::from_secs(120), || {
        http_get(ip_addr, Duration::from_secs(1))
    });

    // The daemon finds the running primary, reads its tap's host routes and addresses.
    let daemon = DaemonProc::start_configured("routed", name, 1, "network = \"routed\"\n", &[]);
    let mut active = name.to_string();
    let mut active_tap = tap;
    for round in 1..=2 {
        let shadow = daemon.wait_paused_shadows(name, 1, SHADOW_WAIT).remove(0);
        let shadow_uuid = domain_uuid(&hv, &shadow);
        let shadow_tap = taps(&hv, &shadow)[0].1.clone();
        assert_eq!(master_of(&shadow_tap), None);
        assert_eq!(
            routes_to(ip_addr),
            [(ip_addr.to_string(), active_tap.clone())],
            "round {round}: before the crash the route goes to the active primary's tap"
        );
        // The daemon has read the routes by now (at protection, and every 5 s).
        std::thread::sleep(Duration::from_secs(6));
        kill_qemu(&active);
        let took = wait_page_uuid(ip_addr, &shadow_uuid, Duration::from_secs(60));
        eprintln!("routed round {round}: the shadow answered {took:?} after the kill");
        assert_eq!(
            routes_to(ip_addr),
            [(ip_addr.to_string(), shadow_tap.clone())],
            "round {round}: the host route points at the shadow's tap, and only there"
        );
        let addrs = std::process::Command::new("ip")
            .args(["-4", "-o", "addr", "show", "dev", &shadow_tap])
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&addrs.stdout).contains(&format!("{gw}/32")),
            "round {round}: the gateway address moved to the shadow's tap"
        );
        // The old tap went with the old QEMU, and no route is left to it.
        assert!(!routes_to(ip_addr).iter().any(|(_, d)| *d == active_tap));
        let svc = wait_for("failover record", Duration::from_secs(30), || {
            let s = daemon.service(name)?;
            (s["active"] == shadow.as_str() && s["last_failover"]["ok"] == true).then_some(s)
        });
        let steps: Vec<&str> = svc["last_failover"]["steps"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|s| s["name"].as_str())
            .collect();
        assert!(steps.contains(&"route"), "round {round}: {steps:?}");
        assert!(
            daemon
                .metrics()
                .contains("understudy_failover_step_seconds_count{step=\"route\"}"),
            "no route step in the metrics"
        );
        assert_eq!(taps(&hv, &shadow)[0].0, mac);
        active = shadow;
        active_tap = shadow_tap;
    }
}
