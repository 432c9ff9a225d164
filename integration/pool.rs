//! Pooled shadows on real guests: two ledger primaries share one shadow cloned from the class's
//! golden template; the first to fail gets it with its own MAC, address, host name,
//! configuration file and data disk; a new pooled shadow follows, and the second primary, still
//! protected, gets that one with its own identity in turn.

use std::time::{Duration, Instant};

use serde_json::Value;
use understudy::domain_xml::DomainXml;
use understudy::libvirt::Hypervisor;

use crate::common::*;
use crate::stateful::data_image;

const POOL_WAIT: Duration = Duration::from_secs(300);
const TEMPLATE: &str = "golden-it-pl";
/// The template's address: what a pooled shadow's guest sets at its boot, until its promotion.
const TEMPLATE_IP: &str = "10.77.0.89";
/// The pool of class `default` (the tests' daemon protects with that class).
const POOL: &str = "default-pool";
const CONF: &str = "/etc/us-service.conf";

fn class() -> String {
    format!(
        "{DATA_CLASS}config_files = [\"{CONF}\"]\n\n[class.default.pool]\nprimaries_per_shadow = 4\ntemplate = \"{TEMPLATE}\"\n"
    )
}

/// The pool's entry in status.
fn pool(d: &DaemonProc) -> Option<Value> {
    d.status()["pools"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == POOL)
        .cloned()
}

/// The pool's paused shadow once every service in `services` is protected by it and its
/// identity has been read; the shadow must not be one of `taken`.
fn pool_ready(d: &DaemonProc, services: &[&str], taken: &[String]) -> String {
    wait_for("a pooled shadow covering the primaries", POOL_WAIT, || {
        let p = pool(d)?;
        let shadow = p["shadows"]
            .as_array()?
            .iter()
            .find(|s| s["state"] == "paused")?["name"]
            .as_str()?
            .to_string();
        if taken.contains(&shadow) {
            return None;
        }
        for s in services {
            let svc = d.service(s)?;
            if svc["state"] != "protected" || svc["identity"].is_null() {
                return None;
            }
            if !p["covers"].as_array()?.iter().any(|c| c == s) {
                return None;
            }
        }
        Some(shadow)
    })
}

fn mac_of(hv: &Hypervisor, domain: &str) -> String {
    DomainXml::parse(&hv.xml(domain, true).unwrap())
        .unwrap()
        .interfaces()[0]
        .mac
        .clone()
        .expect("a MAC")
}

fn guest_text(hv: &Hypervisor, domain: &str, argv: &[&str]) -> String {
    let (code, out) = guest_output(hv, domain, argv[0], &argv[1..]);
    assert_eq!(code, 0, "{argv:?} in {domain}: {out}");
    out.trim().to_string()
}

/// Kills `primary` while its ledger holds `keys`, waits for the pooled `shadow` to serve
/// `ip`, and checks that it is the primary in every respect: MAC on the bridge, address,
/// host name, configuration file, every key of the ledger, and the steps that made it so.
fn fail_into_pooled_shadow(
    d: &DaemonProc,
    hv: &Hypervisor,
    primary: &str,
    ip: &str,
    shadow: &str,
    round: &str,
) {
    let mac = mac_of(hv, primary);
    let mut keys = Vec::new();
    for i in 0..10 {
        let key = format!("{round}-{i}");
        assert!(append(ip, &key), "append {key} to {primary}");
        keys.push(key);
    }
    // Standing by: the template's NIC on a placeholder MAC, its tap on no bridge; no data
    // disk, the template's host name.
    let standby = hv.xml(shadow, false).unwrap();
    let standby_nics = DomainXml::parse(&standby).unwrap().interfaces();
    assert_eq!(standby_nics.len(), 1, "{shadow}: the template's one NIC");
    let placeholder = standby_nics[0].mac.clone().expect("a MAC");
    assert!(
        placeholder.starts_with("0a:"),
        "{shadow} stands by on {placeholder}"
    );
    let standby_tap = standby_nics[0].target_dev.clone().expect("a tap");
    assert_eq!(
        master_of(&standby_tap),
        None,
        "{shadow}'s tap is on a bridge"
    );
    assert!(
        !standby.contains("data.raw"),
        "{shadow} stands by with a data disk"
    );

    let shadow_uuid = domain_uuid(hv, shadow);
    let kill = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(qemu_pid(primary)),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_for_every(
        "the pooled shadow serves the primary's address",
        Duration::from_secs(120),
        RECOVERY_POLL,
        || http_get(ip, Duration::from_millis(200)).filter(|p| page_uuid(p) == shadow_uuid),
    );
    let client = kill.elapsed();
    let svc = wait_for("status shows the failover", Duration::from_secs(60), || {
        let s = d.service(primary)?;
        (s["active"] == shadow && s["last_failover"]["ok"] == true).then_some(s)
    });
    let steps: Vec<String> = svc["last_failover"]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            format!(
                "{} {:.0}",
                s["name"].as_str().unwrap_or("?"),
                s["ms"].as_f64().unwrap_or(0.0)
            )
        })
        .collect();
    eprintln!(
        "pool {round}: {primary} -> {shadow}: served after {client:?} (client); daemon outage {:.0} ms; steps (ms): {}; notes: {}",
        svc["last_failover"]["outage_ms"].as_f64().unwrap_or(0.0),
        steps.join(", "),
        svc["last_failover"]["notes"]
    );
    report_recovery(
        "pool",
        round,
        client,
        svc["last_failover"]["outage_ms"].as_f64(),
    );
    let names: Vec<&str> = steps.iter().map(|s| s.split(' ').next().unwrap()).collect();
    let at = |n: &str| {
        names
            .iter()
            .position(|x| *x == n)
            .unwrap_or_else(|| panic!("step {n} missing: {names:?}"))
    };
    // The standing-by NIC takes the primary's MAC: no hot-plug, no link change; the network
    // only once the data is mounted, and the tap on the bridge only once the guest has the
    // primary's MAC and address.
    assert!(at("plug_nic") < at("resume"), "{names:?}");
    assert!(at("resume") < at("identity"));
    assert!(at("identity") < at("attach"));
    assert!(at("promote_commands") < at("address"), "{names:?}");
    assert!(at("address") < at("rewire"), "{names:?}");
    assert!(!names.contains(&"link_up"), "{names:?}");

    // The primary's MAC: in the guest, in QEMU's receive filter, in the definition (a restart
    // keeps it) and on the bridge, learned on the promoted shadow's one port. libvirt's live
    // XML keeps the MAC the NIC was started with (it cannot change a running NIC's MAC).
    let live = DomainXml::parse(&hv.xml(shadow, false).unwrap()).unwrap();
    let nic = &live.interfaces()[0];
    assert_eq!(nic.mac.as_deref(), Some(placeholder.as_str()));
    let persistent = DomainXml::parse(&hv.xml(shadow, true).unwrap()).unwrap();
    assert_eq!(
        persistent.interfaces()[0].mac.as_deref(),
        Some(mac.as_str())
    );
    let in_guest = guest_text(
        hv,
        shadow,
        &["/bin/busybox", "cat", "/sys/class/net/eth0/address"],
    );
    assert_eq!(in_guest, mac);
    let filter: Value =
        serde_json::from_str(&hv.qmp(shadow, r#"{"execute":"query-rx-filter"}"#).unwrap()).unwrap();
    assert_eq!(filter["return"][0]["main-mac"], mac.as_str(), "{filter}");
    let tap = nic.target_dev.clone().expect("a tap");
    assert_eq!(tap, standby_tap);
    assert_eq!(master_of(&tap).as_deref(), Some("usbr0"));
    assert_single_server(ip, &shadow_uuid, &mac);
    assert_eq!(
        fdb_ports_of(&mac),
        std::slice::from_ref(&tap),
        "the bridge learned {mac} on {tap} only"
    );
    // Address, host name, configuration file, data: the primary's.
    let addrs = guest_text(
        hv,
        shadow,
        &["/bin/busybox", "ip", "-o", "-4", "addr", "show"],
    );
    assert!(addrs.contains(&format!("{ip}/24")), "{addrs}");
    assert!(
        !addrs.contains(TEMPLATE_IP),
        "the template's address, set at the pooled shadow's boot, is gone: {addrs}"
    );
    assert_eq!(
        guest_text(hv, shadow, &["/bin/busybox", "hostname"]),
        primary
    );
    assert_eq!(
        guest_text(hv, shadow, &["/bin/busybox", "cat", CONF]),
        format!("service {primary}")
    );
    let have = ledger(ip).expect("the promoted pooled shadow serves the ledger");
    for k in &keys {
        assert!(have.contains(k), "key {k} lost: {have:?}");
    }
}

#[test]
fn two_primaries_share_one_pooled_shadow_and_each_gets_it_with_its_identity() {
    require_lab();
    let (a, b) = ("it-pla", "it-plb");
    let (ip_a, ip_b) = ("10.77.0.81", "10.77.0.82");
    let _cleanup = Cleanup {
        prefixes: vec![a.into(), b.into(), TEMPLATE.into(), POOL.into()],
    };
    let hv = hypervisor();
    // The class's golden VM: defined, never started.
    hv.define(&guest_xml(TEMPLATE, &format!("{TEMPLATE_IP}/24"), &[]))
        .expect("define the template");
    let d = DaemonProc::start_configured("pool", "it-pl*", 0, &class(), &[]);
    for (name, ip) in [(a, ip_a), (b, ip_b)] {
        let image = data_image(&d, name);
        start_guest(
            &hv,
            name,
            &format!("{ip}/24"),
            &["--data", image.to_str().unwrap()],
        );
    }
    let written = Instant::now();
    for name in [a, b] {
        wait_agent(&hv, name);
        guest_text(
            &hv,
            name,
            &["/bin/sh", "-c", &format!("echo 'service {name}' >{CONF}")],
        );
    }
    let first = pool_ready(&d, &[a, b], &[]);
    let p = pool(&d).unwrap();
    assert_eq!(
        p["shadows"].as_array().unwrap().len(),
        1,
        "one shadow for two: {p}"
    );
    let svc = d.service(a).unwrap();
    assert!(svc["shadows"].as_array().unwrap().is_empty());
    assert!(
        svc["identity"]
            .as_str()
            .unwrap()
            .contains(&format!("host name {a}, {ip_a}/24")),
        "{svc}"
    );
    wait_for("both ledgers", Duration::from_secs(60), || {
        ledger(ip_a).and(ledger(ip_b))
    });
    // The configuration files are collected every 30 s: let one round see the file.
    std::thread::sleep(Duration::from_secs(35).saturating_sub(written.elapsed()));

    fail_into_pooled_shadow(&d, &hv, a, ip_a, &first, "a");
    // b stood unprotected only until the pool refilled: a new pooled shadow, covering both.
    let second = pool_ready(&d, &[a, b], std::slice::from_ref(&first));
    assert_ne!(second, first);
    assert_eq!(d.service(a).unwrap()["active"], first.as_str());
    fail_into_pooled_shadow(&d, &hv, b, ip_b, &second, "b");
    // a still serves as itself on the first pooled shadow.
    assert_eq!(guest_text(&hv, &first, &["/bin/busybox", "hostname"]), a);
    assert!(ledger(ip_a).is_some());
}

/// A class that stops being pooled (a reload without its `[class.X.pool]` table) leaves no
/// pooled shadow behind: the pool's standing-by shadow is destroyed and undefined, and the
/// primary gets a shadow of its own instead.
#[test]
fn pooled_shadow_goes_when_the_class_is_no_longer_pooled() {
    require_lab();
    let name = "it-plc";
    let ip = "10.77.0.83";
    let template = "golden-it-plc";
    let _cleanup = Cleanup {
        prefixes: vec![name.into(), template.into(), POOL.into()],
    };
    let hv = hypervisor();
    hv.define(&guest_xml(template, "10.77.0.88/24", &[]))
        .expect("define the template");
    let d = DaemonProc::start_configured(
        "poolc",
        name,
        0,
        &format!("\n[class.default.pool]\nprimaries_per_shadow = 4\ntemplate = \"{template}\"\n"),
        &[],
    );
    start_guest(&hv, name, &format!("{ip}/24"), &[]);
    let pooled = pool_ready(&d, &[name], &[]);
    assert!(hv.state(&pooled).unwrap().is_active());

    // The same configuration, with one shadow per primary and no pool.
    let text = std::fs::read_to_string(&d.config).unwrap();
    let unpooled = text
        .split("\n[class.default.pool]")
        .next()
        .unwrap()
        .replace("shadows = 0", "shadows = 1");
    std::fs::write(&d.config, unpooled).unwrap();
    let (code, out, err) = d.cli(&["reload"]);
    assert_eq!(code, 0, "{out}{err}");

    let own = wait_for("a shadow of its own", POOL_WAIT, || {
        let svc = d.service(name)?;
        let s = svc["shadows"].as_array()?.first()?.clone();
        (svc["state"] == "protected" && s["state"] == "paused")
            .then(|| s["name"].as_str().unwrap().to_string())
    });
    wait_for("the pooled shadow gone", Duration::from_secs(60), || {
        (!hv.list().ok()?.iter().any(|x| x.name == pooled)).then_some(())
    });
    let p = pool(&d);
    assert!(
        p.as_ref()
            .is_none_or(|p| p["shadows"].as_array().is_none_or(|s| s.is_empty())),
        "{p:?}"
    );
    assert!(
        d.log_text()
            .contains("shadow no longer wanted by the configuration; removed"),
        "no removal in the log"
    );
    eprintln!("pooled shadow {pooled} removed; own shadow {own}");
}
