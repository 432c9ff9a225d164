//! The daemons of several hosts under stress (issue 10): two hosts promoting one service at
//! the same moment, a daemon killed between its claim and the shadow serving, daemons
//! restarted while their hosts hold primaries and shadows, an etcd member stopped and started,
//! and placement on a host that joins or is full. Real daemons on the lab's hosts, real
//! guests, the lab's etcd.

use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use understudy::failover::{FAULT_ABORT_AFTER_ENV, FAULT_CLAIM_HOLD_ENV};
use understudy::libvirt::RunState;

use super::crosshost::{
    clear_prefix, daemon, daemon_env, kill_qemu, owner, state_of, wait_registered_ready,
    wait_served_by,
};
use super::*;
use crate::common::{domain_uuid, guest_xml, http_get, wait_for, DaemonProc};

const SHADOW_WAIT: Duration = Duration::from_secs(300);

/// The names a service's members may take: the primary and its shadows.
fn members(name: &str) -> Vec<String> {
    std::iter::once(name.to_string())
        .chain((1..10).map(|n| format!("{name}-shadow-{n}")))
        .collect()
}

fn cleanup(cluster: &Cluster, names: &[&str]) -> ClusterCleanup {
    let all: Vec<String> = names.iter().flat_map(|n| members(n)).collect();
    ClusterCleanup::new(cluster, &all.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Defines and starts lab guest `name` on `host`; waits until it serves its page.
fn start_guest(cluster: &Cluster, host: &str, name: &str, ip: &str) {
    let hv = cluster.hypervisor(host);
    hv.define(&guest_xml(name, &format!("{ip}/24"), &[]))
        .unwrap_or_else(|e| panic!("define {name} on {host}: {e}"));
    hv.start(name, false)
        .unwrap_or_else(|e| panic!("start {name} on {host}: {e}"));
    wait_for(
        &format!("{name} on {host} serving"),
        Duration::from_secs(180),
        || http_get(ip, Duration::from_secs(1)),
    );
}

/// An owner record as etcd holds it: its value, and the key's modification revision and
/// version (any write changes both, even one that writes the same value).
#[derive(Debug, Clone, PartialEq)]
struct Stored {
    value: serde_json::Value,
    mod_revision: i64,
    version: i64,
}

impl Stored {
    fn generation(&self) -> u64 {
        self.value["generation"].as_u64().expect("a generation")
    }

    /// (domain, host) it names.
    fn names(&self) -> (String, String) {
        (
            self.value["domain"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            self.value["host"].as_str().unwrap_or_default().to_string(),
        )
    }
}

/// The owner record of `service` under `prefix`, read from etcd itself (`etcdctl`).
fn stored_owner(cluster: &Cluster, prefix: &str, service: &str) -> Option<Stored> {
    let key = format!("{prefix}/owners/{service}");
    let out = run(Command::new("etcdctl").args([
        &format!("--endpoints={}", cluster.etcd_endpoints()),
        "--command-timeout=3s",
        "get",
        &key,
        "-w",
        "json",
    ]));
    assert!(out.status.success(), "etcdctl get: {}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("etcdctl JSON");
    let kv = v["kvs"].as_array()?.first()?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(kv["value"].as_str()?)
        .expect("base64 value");
    Some(Stored {
        value: serde_json::from_slice(&raw).expect("an owner record is JSON"),
        mod_revision: kv["mod_revision"].as_i64()?,
        version: kv["version"].as_i64()?,
    })
}

/// Whether a key exists under `prefix` (e.g. `specs/web`).
fn key_exists(cluster: &Cluster, prefix: &str, rest: &str) -> bool {
    let out = run(Command::new("etcdctl").args([
        &format!("--endpoints={}", cluster.etcd_endpoints()),
        "get",
        &format!("{prefix}/{rest}"),
        "--keys-only",
    ]));
    !text(&out.stdout).trim().is_empty()
}

/// Every domain of the service on every host: (host, name, state), sorted.
fn domains_of(cluster: &Cluster, name: &str) -> Vec<(String, String, RunState)> {
    let mut v = Vec::new();
    for h in cluster.hosts() {
        for d in cluster.hypervisor(h).list().unwrap() {
            if members(name).contains(&d.name) {
                v.push((h.to_string(), d.name, d.state));
            }
        }
    }
    v.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    v
}

/// The service's domains that can answer, as `host/name`: running unpaused with a tap on
/// their host's bridge (a shadow that boots runs too, but off the bridge).
fn serving(cluster: &Cluster, name: &str) -> Vec<String> {
    domains_of(cluster, name)
        .into_iter()
        .filter(|(h, n, s)| {
            *s == RunState::Running && {
                // A domain may go between the listing and this read (a shadow replaced).
                let xml = cluster.hypervisor(h).xml(n, false).unwrap_or_default();
                understudy::domain_xml::DomainXml::parse(&xml)
                    .map(|x| x.live_interface_taps())
                    .unwrap_or_default()
                    .iter()
                    .any(|(_, tap)| on_bridge(cluster.host(h, "NETNS"), tap))
            }
        })
        .map(|(h, n, _)| format!("{h}/{n}"))
        .collect()
}

/// Whether link `tap` in namespace `ns` is enslaved to a bridge.
fn on_bridge(ns: &str, tap: &str) -> bool {
    let out = run(Command::new("ip").args(["-n", ns, "-o", "link", "show", "dev", tap]));
    text(&out.stdout).contains(" master ")
}

/// The daemon's journal (`events --json`), one object per event.
fn events(d: &DaemonProc) -> Vec<serde_json::Value> {
    let (code, out, err) = d.cli(&["events", "--json"]);
    // An empty journal (a daemon just restarted) is a stream without a line, which the CLI
    // reports as a connection closed without an answer.
    if code != 0 && err.contains("closed the connection without answering") {
        return Vec::new();
    }
    assert_eq!(code, 0, "events: {err}");
    out.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn events_of_kind(d: &DaemonProc, kind: &str) -> Vec<serde_json::Value> {
    events(d)
        .into_iter()
        .filter(|e| e["kind"] == kind)
        .collect()
}

/// `hosts --json` of a daemon.
fn hosts_report(d: &DaemonProc) -> serde_json::Value {
    let (code, out, err) = d.cli(&["hosts", "--json"]);
    assert_eq!(code, 0, "hosts: {err}");
    serde_json::from_str(&out).expect("hosts --json is JSON")
}

/// Two shadow hosts act on one failure report at the same moment: both read the owner record
/// at the same generation before either writes (each daemon holds its claim 1.5 s between
/// the read and the compare-and-swap, `UNDERSTUDY_FAULT_CLAIM_HOLD_MS`), so both really
/// compete for it. Exactly one claim lands (the generation grows by one), the other daemon
/// records a lost claim and leaves its shadow paused; one domain of the service runs.
#[test]
fn two_hosts_promoting_at_once_one_claims_the_other_stays_paused() {
    let cluster = Cluster::require();
    let (name, ip) = ("xr-web", "10.77.0.85");
    let prefix = "/understudy/it-xr";
    let _cleanup = cleanup(&cluster, &[name]);
    clear_prefix(&cluster, prefix);
    let hold = [(FAULT_CLAIM_HOLD_ENV, "1500")];
    let d1 = daemon(&cluster, "h1", name, 2, "other-host", prefix);
    let d2 = daemon_env(&cluster, "h2", name, 2, "other-host", prefix, "", &hold);
    let d3 = daemon_env(&cluster, "h3", name, 2, "other-host", prefix, "", &hold);
    start_guest(&cluster, "h1", name, ip);
    let s2 = d2.wait_paused_shadows(name, 1, SHADOW_WAIT)[0].clone();
    let s3 = d3.wait_paused_shadows(name, 1, SHADOW_WAIT)[0].clone();
    let before = stored_owner(&cluster, prefix, name).expect("an owner record");
    assert_eq!(before.names(), (name.to_string(), "h1".to_string()));

    kill_qemu("h1", name);
    // Both hosts entered the claim, each holding it with the generation it read.
    for (h, d) in [("h2", &d2), ("h3", &d3)] {
        wait_for(
            &format!("{h} holding its claim"),
            Duration::from_secs(60),
            || {
                d.log_text()
                    .contains("fault injection: holding the claim")
                    .then_some(())
            },
        );
    }
    let (winner, new, won, lost, standby, loser) = wait_for(
        "one shadow host owning the service",
        Duration::from_secs(60),
        || match owner(&d1, name) {
            Some((h, dom)) if h == "h2" && dom == s2 => Some(("h2", &s2, &d2, &d3, &s3, "h3")),
            Some((h, dom)) if h == "h3" && dom == s3 => Some(("h3", &s3, &d3, &d2, &s2, "h2")),
            _ => None,
        },
    );
    wait_served_by(
        ip,
        &domain_uuid(&cluster.hypervisor(winner), new),
        "the service served by the winner",
    );
    // The loser's promotion ran and lost the compare-and-swap: a failed failover naming the
    // claim, its shadow paused and still its standby.
    let finished = wait_for(
        &format!("{loser}'s lost claim recorded"),
        Duration::from_secs(30),
        || {
            let f = events_of_kind(lost, "failover_finished");
            (!f.is_empty()).then_some(f)
        },
    );
    assert_eq!(finished.len(), 1, "{finished:?}");
    assert_eq!(finished[0]["ok"], false);
    assert!(
        finished[0]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("could not be claimed"),
        "{finished:?}"
    );
    assert!(lost
        .log_text()
        .contains("another host's promotion won; the shadow here stays paused"));
    assert_eq!(
        cluster.hypervisor(loser).state(standby).unwrap(),
        RunState::Paused
    );
    wait_for(
        &format!("{loser} following {winner}"),
        Duration::from_secs(15),
        || (state_of(lost, name) == format!("elsewhere: on host {winner}")).then_some(()),
    );
    assert_eq!(
        lost.paused_shadows(name).unwrap(),
        std::slice::from_ref(standby)
    );
    assert_eq!(events_of_kind(won, "failover_finished")[0]["ok"], true);
    // One claim landed, and only one.
    std::thread::sleep(Duration::from_secs(3));
    let after = stored_owner(&cluster, prefix, name).unwrap();
    assert_eq!(after.names(), (new.clone(), winner.to_string()));
    assert_eq!(after.generation(), before.generation() + 1, "{after:?}");
    assert_eq!(after.version, before.version + 1, "one write: {after:?}");
    assert_eq!(serving(&cluster, name), [format!("{winner}/{new}")]);
}

/// A daemon killed right after its claim landed (`UNDERSTUDY_FAULT_ABORT_AFTER=claim`: the
/// record names its shadow, which is still paused, and nothing serves) finishes the promotion
/// when it starts again, without claiming again: the same record (same revision) and the
/// shadow serving. Then the same with the daemon killed after `resume` (its shadow running,
/// its metadata still a shadow's), the other way round (h2 to h1).
#[test]
fn a_daemon_killed_after_its_claim_finishes_the_promotion_on_restart() {
    let cluster = Cluster::require();
    let (name, ip) = ("xk-web", "10.77.0.86");
    let prefix = "/understudy/it-xk";
    let _cleanup = cleanup(&cluster, &[name]);
    clear_prefix(&cluster, prefix);
    let mac = guest_mac(name);
    let mut d1 = daemon(&cluster, "h1", name, 1, "other-host", prefix);
    let mut d2 = daemon_env(
        &cluster,
        "h2",
        name,
        1,
        "other-host",
        prefix,
        "",
        &[(FAULT_ABORT_AFTER_ENV, "claim")],
    );
    start_guest(&cluster, "h1", name, ip);
    let s2 = d2.wait_paused_shadows(name, 1, SHADOW_WAIT)[0].clone();
    let first = stored_owner(&cluster, prefix, name).unwrap();

    // h1 -> h2, h2's daemon killed after its claim.
    kill_qemu("h1", name);
    let st = d2.wait_exited(Duration::from_secs(60));
    eprintln!("h2's daemon exited: {st}");
    let claimed = stored_owner(&cluster, prefix, name).unwrap();
    assert_eq!(claimed.names(), (s2.clone(), "h2".to_string()));
    assert_eq!(claimed.generation(), first.generation() + 1);
    assert_eq!(
        cluster.hypervisor("h2").state(&s2).unwrap(),
        RunState::Paused,
        "killed before the resume"
    );
    assert!(serving(&cluster, name).is_empty(), "nothing serves yet");
    assert!(http_get(ip, Duration::from_millis(500)).is_none());
    d2.restart();
    wait_served_by(
        ip,
        &domain_uuid(&cluster.hypervisor("h2"), &s2),
        "the claimed shadow serving after the restart",
    );
    let svc = wait_for(
        "h2's record of the finished promotion",
        Duration::from_secs(30),
        || {
            d2.service(name)
                .filter(|s| s["active"] == s2.as_str() && s["last_failover"]["ok"] == true)
        },
    );
    assert_eq!(svc["last_failover"]["trigger"], "recovery", "{svc}");
    assert_eq!(
        stored_owner(&cluster, prefix, name).unwrap(),
        claimed,
        "the claim was not made again"
    );
    assert_eq!(
        cluster.switch_port_of(&mac).as_deref(),
        Some(cluster.host("h2", "SWITCH_PORT"))
    );
    assert_eq!(serving(&cluster, name), [format!("h2/{s2}")]);

    // h2 -> h1, h1's daemon killed after resuming its shadow.
    let s1 = d1.wait_paused_shadows(name, 1, SHADOW_WAIT)[0].clone();
    d1.restart_with_env(&[(FAULT_ABORT_AFTER_ENV, "resume")]);
    wait_registered_ready(&d2, name, "h1", &s1);
    let before = stored_owner(&cluster, prefix, name).unwrap();
    kill_qemu("h2", &s2);
    let st = d1.wait_exited(Duration::from_secs(60));
    eprintln!("h1's daemon exited: {st}");
    let claimed = stored_owner(&cluster, prefix, name).unwrap();
    assert_eq!(claimed.names(), (s1.clone(), "h1".to_string()));
    assert_eq!(claimed.generation(), before.generation() + 1);
    d1.restart();
    wait_served_by(
        ip,
        &domain_uuid(&cluster.hypervisor("h1"), &s1),
        "the resumed shadow serving after the restart",
    );
    wait_for(
        "h1's record of the finished promotion",
        Duration::from_secs(30),
        || {
            d1.service(name)
                .filter(|s| s["active"] == s1.as_str() && s["last_failover"]["ok"] == true)
        },
    );
    assert_eq!(stored_owner(&cluster, prefix, name).unwrap(), claimed);
    wait_for("h2 following h1", Duration::from_secs(30), || {
        (state_of(&d2, name) == "elsewhere: on host h1").then_some(())
    });
    assert_eq!(
        cluster.switch_port_of(&mac).as_deref(),
        Some(cluster.host("h1", "SWITCH_PORT"))
    );
    assert_eq!(serving(&cluster, name), [format!("h1/{s1}")]);
}

/// Hosts that hold primaries and shadows at once (h1: primary a, shadow of b; h2: primary b,
/// shadow of a): each daemon in turn is killed and started again. It rebuilds from libvirt
/// and etcd: the same domains in the same states on every host, both owner records untouched
/// (same revision), the same shadows registered ready, both services served by their
/// primaries.
#[test]
fn a_restarted_daemon_rebuilds_from_etcd_and_libvirt_and_changes_nothing() {
    let cluster = Cluster::require();
    let guests = [("xs-a", "10.77.0.87", "h1"), ("xs-b", "10.77.0.88", "h2")];
    let prefix = "/understudy/it-xs";
    let _cleanup = cleanup(&cluster, &["xs-a", "xs-b"]);
    clear_prefix(&cluster, prefix);
    let mut ds = [
        daemon(&cluster, "h1", "xs-*", 1, "other-host", prefix),
        daemon(&cluster, "h2", "xs-*", 1, "other-host", prefix),
    ];
    for (g, ip, h) in guests {
        start_guest(&cluster, h, g, ip);
    }
    // a's shadow on h2, b's on h1; both registered ready.
    let sa = ds[1].wait_paused_shadows("xs-a", 1, SHADOW_WAIT)[0].clone();
    let sb = ds[0].wait_paused_shadows("xs-b", 1, SHADOW_WAIT)[0].clone();
    wait_registered_ready(&ds[0], "xs-a", "h2", &sa);
    wait_registered_ready(&ds[0], "xs-b", "h1", &sb);
    let registered = |d: &DaemonProc| -> Vec<(String, String, String)> {
        let mut v: Vec<_> = hosts_report(d)["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|h| {
                let host = h["name"].as_str().unwrap().to_string();
                h["shadows"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .map(move |s| {
                        (
                            host.clone(),
                            s["shadow"].as_str().unwrap().to_string(),
                            s["status"].as_str().unwrap().to_string(),
                        )
                    })
            })
            .collect();
        v.sort();
        v
    };
    let snapshot = |ds: &[DaemonProc; 2]| {
        (
            domains_of(&cluster, "xs-a"),
            domains_of(&cluster, "xs-b"),
            stored_owner(&cluster, prefix, "xs-a"),
            stored_owner(&cluster, prefix, "xs-b"),
            registered(&ds[0]),
        )
    };
    let before = snapshot(&ds);
    assert_eq!(
        before.4,
        [
            ("h1".to_string(), sb.clone(), "ready".to_string()),
            ("h2".to_string(), sa.clone(), "ready".to_string())
        ]
    );
    for i in 0..2 {
        let (h, other) = (["h1", "h2"][i], ["h2", "h1"][i]);
        let (mine, theirs) = (guests[i].0, guests[1 - i].0);
        ds[i].restart();
        wait_for(
            &format!("{h}'s daemon protecting {mine} again"),
            Duration::from_secs(30),
            || state_of(&ds[i], mine).starts_with("pro").then_some(()),
        );
        wait_for(
            &format!("{h}'s daemon following {theirs} on {other}"),
            Duration::from_secs(30),
            || (state_of(&ds[i], theirs) == format!("elsewhere: on host {other}")).then_some(()),
        );
        // Several publishing and placement rounds (every 2 s) and a lease TTL (3 s).
        std::thread::sleep(Duration::from_secs(8));
        assert_eq!(snapshot(&ds), before, "after {h}'s daemon restarted");
        let shadow_here = if i == 0 { &sb } else { &sa };
        assert_eq!(
            ds[i].paused_shadows(theirs).unwrap(),
            std::slice::from_ref(shadow_here)
        );
        assert!(
            events_of_kind(&ds[i], "failover_started").is_empty(),
            "{h} failed over after its restart"
        );
        for (g, ip, gh) in guests {
            wait_served_by(
                ip,
                &domain_uuid(&cluster.hypervisor(gh), g),
                "the primary still serving",
            );
        }
    }
}

/// Starts the lab's etcd member on a host again when dropped (a failed test must not leave
/// the lab's etcd with a member down for the tests after it).
struct MemberBack(&'static str);

impl Drop for MemberBack {
    fn drop(&mut self) {
        let _ = Command::new(crate::common::repo().join("scripts/lab-etcd.sh"))
            .args([self.0, "start"])
            .status();
    }
}

fn lab_etcd(host: &str, action: &str) -> String {
    let out =
        run(Command::new(crate::common::repo().join("scripts/lab-etcd.sh")).args([host, action]));
    assert!(
        out.status.success(),
        "lab-etcd.sh {host} {action}: {}",
        text(&out.stderr)
    );
    text(&out.stdout).trim().to_string()
}

/// One etcd member stopped and started again: h1's, which every daemon talks to first (the
/// first endpoint) and which is made the cluster's leader first, so its loss costs both a
/// reconnection and an election. For longer than two lease TTLs nothing fails over, no host
/// is seen lost, the owner record is not written, the shadow stays paused and the primary
/// serves; after the member is back, the same.
#[test]
fn an_etcd_member_stopped_and_started_causes_no_failover_and_no_owner_change() {
    let cluster = Cluster::require();
    let (name, ip) = ("xe-web", "10.77.0.89");
    let prefix = "/understudy/it-xe";
    let _cleanup = cleanup(&cluster, &[name]);
    clear_prefix(&cluster, prefix);
    let d1 = daemon(&cluster, "h1", name, 1, "other-host", prefix);
    let d2 = daemon(&cluster, "h2", name, 1, "other-host", prefix);
    start_guest(&cluster, "h1", name, ip);
    let s2 = d2.wait_paused_shadows(name, 1, SHADOW_WAIT)[0].clone();
    wait_registered_ready(&d1, name, "h2", &s2);
    let uuid = domain_uuid(&cluster.hypervisor("h1"), name);
    let before = stored_owner(&cluster, prefix, name).unwrap();
    let domains = domains_of(&cluster, name);

    // Checked twice a second: the primary serves, nothing moved, both hosts alive.
    let steady = |phase: &str, seconds: u64| {
        for _ in 0..seconds * 2 {
            wait_served_by(ip, &uuid, &format!("the primary serving ({phase})"));
            assert!(state_of(&d1, name).starts_with("pro"), "{phase}");
            assert_eq!(state_of(&d2, name), "elsewhere: on host h1", "{phase}");
            assert_eq!(
                d2.paused_shadows(name).unwrap(),
                std::slice::from_ref(&s2),
                "{phase}"
            );
            for d in [&d1, &d2] {
                for h in hosts_report(d)["hosts"].as_array().unwrap() {
                    if h["name"] == "h1" || h["name"] == "h2" {
                        assert_eq!(h["alive"], true, "{phase}: {h}");
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        for d in [&d1, &d2] {
            assert!(events_of_kind(d, "failover_started").is_empty(), "{phase}");
        }
    };

    lab_etcd("h1", "lead");
    assert_eq!(lab_etcd("h1", "status"), "leader");
    let _back = MemberBack("h1");
    lab_etcd("h1", "stop");
    assert_eq!(lab_etcd("h1", "status"), "stopped");
    // 8 s: over two lease TTLs (3 s) without the member.
    steady("h1's member stopped", 8);
    assert_eq!(
        stored_owner(&cluster, prefix, name).unwrap(),
        before,
        "owner record written while the member was down"
    );
    lab_etcd("h1", "start");
    wait_for(
        "three healthy etcd members",
        Duration::from_secs(20),
        || (cluster.etcd_healthy() == 3).then_some(()),
    );
    steady("h1's member back", 5);
    assert_eq!(stored_owner(&cluster, prefix, name).unwrap(), before);
    assert_eq!(domains_of(&cluster, name), domains);
    for d in [&d1, &d2] {
        assert_eq!(hosts_report(d)["mode"], "connected");
    }
}

/// Placement as hosts come: h3 runs a daemon with all its memory kept out of placement
/// (`[cluster] reserved_memory_mib`), so it publishes no memory free and gets no shadow,
/// even while the service has none at all. h2 then joins the cluster and gets one; the
/// class's second shadow has no host (h3 is full, h1 runs the primary).
#[test]
fn a_joining_host_gets_shadows_and_a_full_host_none() {
    let cluster = Cluster::require();
    let (name, ip) = ("xj-web", "10.77.0.90");
    let prefix = "/understudy/it-xj";
    let _cleanup = cleanup(&cluster, &[name]);
    clear_prefix(&cluster, prefix);
    let d1 = daemon(&cluster, "h1", name, 2, "other-host", prefix);
    let full = "reserved_memory_mib = 16777216\n";
    let d3 = daemon_env(&cluster, "h3", name, 2, "other-host", prefix, full, &[]);
    start_guest(&cluster, "h1", name, ip);
    wait_for(
        "the primary's spec published",
        Duration::from_secs(30),
        || key_exists(&cluster, prefix, &format!("specs/{name}")).then_some(()),
    );
    let h3 = wait_for("h3 registered", Duration::from_secs(10), || {
        hosts_report(&d1)["hosts"]
            .as_array()?
            .iter()
            .find(|h| h["name"] == "h3")
            .cloned()
    });
    assert_eq!(h3["alive"], true, "{h3}");
    assert_eq!(h3["capacity"]["mem_available_kib"], 0, "{h3}");
    // Placement rounds run on the spec, every host's registration and each change: none gives
    // h3 anything.
    std::thread::sleep(Duration::from_secs(8));
    assert!(
        domains_of(&cluster, name).iter().all(|(h, _, _)| h == "h1"),
        "a shadow was placed on the full host: {:?}",
        domains_of(&cluster, name)
    );
    assert_eq!(
        d3.paused_shadows(name).unwrap_or_default(),
        Vec::<String>::new()
    );

    // h2 joins: it gets a shadow, the only one.
    let d2 = daemon(&cluster, "h2", name, 2, "other-host", prefix);
    let s2 = d2.wait_paused_shadows(name, 1, SHADOW_WAIT)[0].clone();
    wait_registered_ready(&d1, name, "h2", &s2);
    std::thread::sleep(Duration::from_secs(6));
    let hosts_of: Vec<String> = domains_of(&cluster, name)
        .into_iter()
        .map(|(h, n, _)| format!("{h}/{n}"))
        .collect();
    assert_eq!(hosts_of, [format!("h1/{name}"), format!("h2/{s2}")]);
    assert_eq!(d2.paused_shadows(name).unwrap(), std::slice::from_ref(&s2));
    assert!(d3.paused_shadows(name).unwrap_or_default().is_empty());
}
