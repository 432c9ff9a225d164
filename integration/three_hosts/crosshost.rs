//! The daemon on several hosts (issue 10): one daemon per lab host, each inside its host's
//! namespaces and talking to its own libvirtd only, coordinated through the lab's etcd. A
//! primary on h1 whose shadows stand by on other hosts (`placement = "other-host"`).

use std::time::{Duration, Instant};

use super::*;
use crate::common::{domain_uuid, guest_xml, http_get, page_uuid, wait_for, DaemonProc};

const SHADOW_WAIT: Duration = Duration::from_secs(300);

/// A daemon on `host` protecting `name`, `shadows` shadows placed by `placement`, its records
/// under `prefix` in the lab's etcd.
pub fn daemon(
    cluster: &Cluster,
    host: &str,
    name: &str,
    shadows: u32,
    placement: &str,
    prefix: &str,
) -> DaemonProc {
    daemon_with(cluster, host, name, shadows, placement, prefix, "")
}

/// [`daemon`], with `more` (TOML: further rules and classes) at the end of its configuration.
pub fn daemon_with(
    cluster: &Cluster,
    host: &str,
    name: &str,
    shadows: u32,
    placement: &str,
    prefix: &str,
    more: &str,
) -> DaemonProc {
    let endpoints: Vec<String> = cluster
        .hosts()
        .iter()
        .map(|h| format!("\"{}\"", cluster.host(h, "ETCD_ENDPOINT")))
        .collect();
    let extra = format!(
        "placement = \"{placement}\"\n\n[cluster]\nendpoints = [{}]\nhost = \"{host}\"\nkey_prefix = \"{prefix}\"\nlease_ttl_s = 3\nlibvirt_uri = \"{}\"\n\n{more}",
        endpoints.join(", "),
        cluster.libvirt_uri(host)
    );
    DaemonProc::start_on_host(host, &format!("{name}-{host}"), name, shadows, &extra)
}

/// Removes what an earlier run left under `prefix` in etcd (an owner record of the same
/// service would make the new primary look stale).
pub fn clear_prefix(cluster: &Cluster, prefix: &str) {
    let out = run(std::process::Command::new("etcdctl").args([
        &format!("--endpoints={}", cluster.etcd_endpoints()),
        "del",
        "--prefix",
        prefix,
    ]));
    assert!(out.status.success(), "etcdctl del: {}", text(&out.stderr));
}

/// SIGKILLs the QEMU of `domain` on `host`.
pub fn kill_qemu(host: &str, domain: &str) {
    let out = host_exec(host, &["cat", &format!("/run/libvirt/qemu/{domain}.pid")]);
    let pid: i32 = text(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no QEMU pid of {domain} on {host}"));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill QEMU");
}

/// The state line of `service` in a daemon's status.
pub fn state_of(d: &DaemonProc, service: &str) -> String {
    d.service(service)
        .and_then(|s| s["state"].as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The service's owner per `understudy hosts --json`: (host, domain).
pub fn owner(d: &DaemonProc, service: &str) -> Option<(String, String)> {
    let (code, out, _) = d.cli(&["hosts", "--json"]);
    if code != 0 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&out).ok()?;
    v["hosts"].as_array()?.iter().find_map(|h| {
        h["primaries"].as_array()?.iter().find_map(|p| {
            (p["service"] == service).then(|| {
                (
                    h["name"].as_str().unwrap_or_default().to_string(),
                    p["domain"].as_str().unwrap_or_default().to_string(),
                )
            })
        })
    })
}

/// Waits until `shadow` of `service` is registered ready on `host` in etcd (per `hosts
/// --json`): what an operator checks before a switchover to that host.
pub fn wait_registered_ready(d: &DaemonProc, service: &str, host: &str, shadow: &str) {
    wait_for(
        &format!("{shadow} registered ready on {host}"),
        Duration::from_secs(30),
        || {
            let (code, out, _) = d.cli(&["hosts", "--json"]);
            let v: serde_json::Value = serde_json::from_str(&out).ok()?;
            let ready = v["hosts"].as_array()?.iter().any(|h| {
                h["name"] == host
                    && h["shadows"].as_array().is_some_and(|l| {
                        l.iter().any(|x| {
                            x["service"] == service
                                && x["shadow"] == shadow
                                && x["status"] == "ready"
                        })
                    })
            });
            (code == 0 && ready).then_some(())
        },
    );
}

/// Waits until the service answers at `ip` from the domain with `uuid`; how long it took.
pub fn wait_served_by(ip: &str, uuid: &str, what: &str) -> Duration {
    let began = Instant::now();
    wait_for(what, Duration::from_secs(60), || {
        http_get(ip, Duration::from_millis(200)).filter(|p| page_uuid(p) == uuid)
    });
    began.elapsed()
}

/// A crash of a primary on h1 whose shadows stand by on h2 and h3 (`other-host`, two
/// shadows): h1 reports it, both shadow hosts act on the report at once, the owner record's
/// compare-and-swap lets exactly one promote; the service answers with its address and MAC
/// from that host, the switch forwards the MAC to that host's uplink, the other host's shadow
/// stays paused, h1 retires its dead primary, and a replacement shadow is placed on h1 (the
/// only host without a member).
#[test]
fn a_crash_is_served_by_the_shadow_on_another_host_and_a_replacement_is_placed() {
    let cluster = Cluster::require();
    let (name, ip) = ("xh1-web", "10.77.0.81");
    let prefix = "/understudy/it-xh1";
    let _cleanup = ClusterCleanup::new(
        &cluster,
        &(0..8)
            .map(|n| {
                if n == 0 {
                    name.to_string()
                } else {
                    format!("{name}-shadow-{n}")
                }
            })
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    clear_prefix(&cluster, prefix);
    let d1 = daemon(&cluster, "h1", name, 2, "other-host", prefix);
    let d2 = daemon(&cluster, "h2", name, 2, "other-host", prefix);
    let d3 = daemon(&cluster, "h3", name, 2, "other-host", prefix);
    let mac = guest_mac(name);

    let h1 = cluster.hypervisor("h1");
    h1.define(&guest_xml(name, &format!("{ip}/24"), &[]))
        .expect("define on h1");
    h1.start(name, false).expect("start on h1");
    wait_for("the guest on h1 serving", Duration::from_secs(180), || {
        http_get(ip, Duration::from_secs(1))
    });
    // One shadow on each other host, none on h1.
    let s2 = d2.wait_paused_shadows(name, 1, SHADOW_WAIT)[0].clone();
    let s3 = d3.wait_paused_shadows(name, 1, SHADOW_WAIT)[0].clone();
    assert_ne!(s2, s3, "shadow names are unique across hosts");
    assert!(
        d1.paused_shadows(name).unwrap_or_default().is_empty(),
        "other-host placed a shadow on the primary's host"
    );
    assert_eq!(state_of(&d2, name), "elsewhere: on host h1");
    assert_eq!(owner(&d1, name), Some(("h1".to_string(), name.to_string())));
    assert_eq!(
        cluster.switch_port_of(&mac).as_deref(),
        Some(cluster.host("h1", "SWITCH_PORT"))
    );

    kill_qemu("h1", name);
    let (winner, loser, won, lost) = wait_for(
        "a shadow host owning the service",
        Duration::from_secs(60),
        || match owner(&d1, name) {
            Some((h, dom)) if h == "h2" && dom == s2 => Some(("h2", "h3", &d2, &d3)),
            Some((h, dom)) if h == "h3" && dom == s3 => Some(("h3", "h2", &d3, &d2)),
            _ => None,
        },
    );
    let (new, standby) = if winner == "h2" {
        (&s2, &s3)
    } else {
        (&s3, &s2)
    };
    let took = wait_served_by(
        ip,
        &domain_uuid(&cluster.hypervisor(winner), new),
        "the service served by the promoted shadow",
    );
    eprintln!("served from {winner} ({new}) {took:?} after its owner changed");
    // Same MAC, now behind the winner's uplink.
    assert_eq!(
        cluster.switch_port_of(&mac).as_deref(),
        Some(cluster.host(winner, "SWITCH_PORT")),
        "the switch forwards {mac} to {winner}"
    );
    assert!(won.service(name).unwrap()["state"]
        .as_str()
        .unwrap()
        .starts_with("pro"));
    // The other shadow host did not promote: its shadow is paused, it follows the winner.
    assert_eq!(
        lost.paused_shadows(name).unwrap(),
        std::slice::from_ref(standby)
    );
    assert_eq!(
        cluster.hypervisor(loser).state(standby).unwrap(),
        understudy::libvirt::RunState::Paused
    );
    wait_for(
        "the loser following the winner",
        Duration::from_secs(10),
        || (state_of(lost, name) == format!("elsewhere: on host {winner}")).then_some(()),
    );
    // h1 retired its dead primary and gets the replacement shadow.
    wait_for("h1 following the winner", Duration::from_secs(30), || {
        (state_of(&d1, name) == format!("elsewhere: on host {winner}")).then_some(())
    });
    let replacement = d1.wait_paused_shadows(name, 1, SHADOW_WAIT)[0].clone();
    assert!(
        ![&s2, &s3].contains(&&replacement),
        "replacement {replacement}"
    );
    assert!(
        !h1.state(name).unwrap().is_active(),
        "the dead primary stays down"
    );
    // Exactly one domain of the service runs unpaused, on the winner.
    let mut running = Vec::new();
    for h in cluster.hosts() {
        for dom in cluster.hypervisor(h).list().unwrap() {
            if dom.name.starts_with(name) && dom.state == understudy::libvirt::RunState::Running {
                running.push(format!("{h}/{}", dom.name));
            }
        }
    }
    assert_eq!(running, [format!("{winner}/{new}")]);
}

/// A planned switchover to a named host and back: the primary here is fenced, the named
/// host's shadow claims and serves, the old primary is retired, a replacement takes its
/// place on the old host; then the same back the other way. Then both daemons are
/// restarted: they rebuild from libvirt and etcd without duplicating or moving anything.
#[test]
fn switchover_to_a_named_host_and_back() {
    let cluster = Cluster::require();
    let (name, ip) = ("xh2-web", "10.77.0.82");
    let prefix = "/understudy/it-xh2";
    let names: Vec<String> = std::iter::once(name.to_string())
        .chain((1..8).map(|n| format!("{name}-shadow-{n}")))
        .collect();
    let _cleanup = ClusterCleanup::new(
        &cluster,
        &names.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    clear_prefix(&cluster, prefix);
    let d1 = daemon(&cluster, "h1", name, 1, "other-host", prefix);
    let d2 = daemon(&cluster, "h2", name, 1, "other-host", prefix);
    let mac = guest_mac(name);
    let h1 = cluster.hypervisor("h1");
    h1.define(&guest_xml(name, &format!("{ip}/24"), &[]))
        .expect("define on h1");
    h1.start(name, false).expect("start on h1");
    wait_for("the guest on h1 serving", Duration::from_secs(180), || {
        http_get(ip, Duration::from_secs(1))
    });
    let s2 = d2.wait_paused_shadows(name, 1, SHADOW_WAIT)[0].clone();
    wait_registered_ready(&d1, name, "h2", &s2);

    // A host without a ready shadow is refused, naming where one is.
    let (code, _, err) = d1.cli(&["failover", name, "--to-host", "h3"]);
    assert_ne!(code, 0);
    assert!(err.contains("no ready shadow on host 'h3'"), "{err}");
    assert!(err.contains("ready on: h2"), "{err}");

    let (code, _, err) = d1.cli(&["failover", name, "--to-host", "h2"]);
    assert_eq!(code, 0, "switchover to h2: {err}");
    assert!(
        err.contains(&format!("switched over to {s2} on host h2")),
        "{err}"
    );
    wait_served_by(
        ip,
        &domain_uuid(&cluster.hypervisor("h2"), &s2),
        "the service served from h2",
    );
    assert_eq!(
        cluster.switch_port_of(&mac).as_deref(),
        Some(cluster.host("h2", "SWITCH_PORT"))
    );
    assert_eq!(owner(&d1, name), Some(("h2".to_string(), s2.clone())));
    wait_for("the old primary retired", Duration::from_secs(30), || {
        (!h1.state(name).unwrap().is_active()).then_some(())
    });
    let back = d1.wait_paused_shadows(name, 1, SHADOW_WAIT)[0].clone();
    wait_registered_ready(&d2, name, "h1", &back);

    // And back, asked on h2 now.
    let (code, _, err) = d2.cli(&["failover", name, "--to-host", "h1"]);
    assert_eq!(code, 0, "switchover back to h1: {err}");
    wait_served_by(
        ip,
        &domain_uuid(&h1, &back),
        "the service served from h1 again",
    );
    assert_eq!(
        cluster.switch_port_of(&mac).as_deref(),
        Some(cluster.host("h1", "SWITCH_PORT"))
    );
    assert_eq!(owner(&d2, name), Some(("h1".to_string(), back.clone())));
    wait_for("h2's primary retired", Duration::from_secs(30), || {
        (!cluster.hypervisor("h2").state(&s2).unwrap().is_active()).then_some(())
    });
    let standby = d2.wait_paused_shadows(name, 1, SHADOW_WAIT)[0].clone();
    wait_registered_ready(&d1, name, "h2", &standby);

    // Both daemons restarted: each rebuilds from its libvirt and etcd, duplicates nothing
    // and changes no owner.
    let domains = |h: &str| -> Vec<(String, understudy::libvirt::RunState)> {
        let mut v: Vec<_> = cluster
            .hypervisor(h)
            .list()
            .unwrap()
            .into_iter()
            .filter(|d| d.name.starts_with(name))
            .map(|d| (d.name, d.state))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let before = (domains("h1"), domains("h2"));
    let (mut d1, mut d2) = (d1, d2);
    d1.restart();
    d2.restart();
    wait_for(
        "h1's daemon protecting its primary again",
        Duration::from_secs(30),
        || state_of(&d1, name).starts_with("pro").then_some(()),
    );
    wait_for(
        "h2's daemon following h1 again",
        Duration::from_secs(30),
        || (state_of(&d2, name) == "elsewhere: on host h1").then_some(()),
    );
    std::thread::sleep(Duration::from_secs(10));
    assert_eq!(
        (domains("h1"), domains("h2")),
        before,
        "domains after the restarts"
    );
    assert_eq!(owner(&d1, name), Some(("h1".to_string(), back.clone())));
    assert_eq!(
        d2.paused_shadows(name).unwrap(),
        std::slice::from_ref(&standby)
    );
    wait_served_by(
        ip,
        &domain_uuid(&h1, &back),
        "the service still served from h1",
    );
}

/// A drain of a host with two primaries: both move to their shadows on another host, the
/// drained host gets no new shadow (the replacements go to the third host), and an undrain
/// lets it take shadows again.
#[test]
fn drain_and_undrain_of_a_host_with_two_primaries() {
    let cluster = Cluster::require();
    let guests = [("xh3-a", "10.77.0.83"), ("xh3-b", "10.77.0.84")];
    let prefix = "/understudy/it-xh3";
    let names: Vec<String> = guests
        .iter()
        .flat_map(|(g, _)| {
            std::iter::once(g.to_string()).chain((1..8).map(move |n| format!("{g}-shadow-{n}")))
        })
        .collect();
    let _cleanup = ClusterCleanup::new(
        &cluster,
        &names.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    clear_prefix(&cluster, prefix);
    let ds: Vec<DaemonProc> = ["h1", "h2", "h3"]
        .iter()
        .map(|h| daemon(&cluster, h, "xh3-*", 1, "other-host", prefix))
        .collect();
    let h1 = cluster.hypervisor("h1");
    for (g, ip) in guests {
        h1.define(&guest_xml(g, &format!("{ip}/24"), &[]))
            .expect("define on h1");
        h1.start(g, false).expect("start on h1");
    }
    for (g, _) in guests {
        wait_for(&format!("a paused shadow of {g}"), SHADOW_WAIT, || {
            ds[1..]
                .iter()
                .any(|d| !d.paused_shadows(g).unwrap_or_default().is_empty())
                .then_some(())
        });
    }
    let (code, _, err) = ds[0].cli(&["host", "drain", "h1", "--timeout", "3m"]);
    assert_eq!(code, 0, "drain: {err}");
    assert!(err.contains("host h1 drained: 2 primaries moved"), "{err}");
    for (g, ip) in guests {
        let (host, domain) = owner(&ds[0], g).expect("an owner");
        assert_ne!(host, "h1", "{g} still on the drained host");
        wait_served_by(
            ip,
            &domain_uuid(&cluster.hypervisor(&host), &domain),
            "the service served from its new host",
        );
        assert!(!h1.state(g).unwrap().is_active(), "{g}'s old primary runs");
        // Its replacement shadow is on the host that is neither the drained one nor its own.
        let third = if host == "h2" { 2 } else { 1 };
        ds[third].wait_paused_shadows(g, 1, SHADOW_WAIT);
    }
    std::thread::sleep(Duration::from_secs(5));
    for (g, _) in guests {
        assert!(
            ds[0].paused_shadows(g).unwrap_or_default().is_empty(),
            "a shadow of {g} was placed on the drained host"
        );
    }
    let (code, _, err) = ds[0].cli(&["host", "undrain", "h1"]);
    assert_eq!(code, 0, "undrain: {err}");
    assert!(err.contains("host h1 undrained"), "{err}");
}
