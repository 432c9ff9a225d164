//! `make bench-hostloss`: client-observed outage when a host is lost (powered off through its
//! fence agent, a cut power cord), on the three-host lab; and, in the same run, the
//! restart-based baseline: a cold start of the same guest on a surviving host (detection
//! excluded).
//!
//! A daemon runs on each of h1, h2, h3 (each inside its host's namespaces). The protected guest
//! has one shadow on another host (`placement = "other-host"`). Each trial powers off the
//! host of the primary (`scripts/fence_lab -o off`): the others find it silent (direct
//! heartbeats) with its libvirtd unreachable, and either
//! - **fence device** (`[cluster.fence]`: `scripts/fence_lab -n <host>`): power it off
//!   through its device (it reports off), then promote at once; or
//! - **lease-only** (no fence device): wait until its lease expired plus the margin, then
//!   promote.
//!
//! The host is powered on again and its daemon restarted; the next trial loses the host the
//! service moved to. Timings: keepalives every 200 ms, heartbeats every 50 ms, suspect after
//! 300 ms, promotion margin 500 ms after a lease expired, self-fencing 500 ms before it can,
//! etcd calls bounded to 1 s (800 ms at TTL 1 s); lease TTL 2 s with a fence device, each of
//! `BENCH_LEASE_TTLS` lease-only. The etcd leader before each loss is recorded: losing the
//! leader's host costs an election, and the new leader extends every lease.
//!
//! A client on the switch (the lab's client namespace) starts a request every 5 ms (each allowed
//! 1 s). Outage = first answer from the shadow after the power-off call minus the last answer
//! before that call (the `fence_lab -o off` script's own start, about 0.1-0.2 s before the
//! power is cut, counts as outage); the client's gap (from the old primary's last answer to
//! the shadow's first) is reported beside it. Two copies are counted per trial: an answer
//! from another domain after the new primary's first (the client), or a frame from the
//! service's MAC on another port than the new host's after its first there, or the
//! forwarding table moving back (the switch: a capture on every host's uplink port and the
//! table read every 50 ms). Writes build/bench/hostloss.json and
//! build/bench/hostloss.svg.
//!
//! Environment: BENCH_TRIALS (default 5) per phase, BENCH_COLD_TRIALS (default 3),
//! BENCH_LEASE_TTLS (default "2,1": one lease-only phase per TTL, in seconds).

#[path = "../integration/common.rs"]
mod common;
// Its tests are not compiled here, so some of its imports go unused.
#[allow(unused_imports)]
#[path = "../integration/three_hosts/mod.rs"]
mod three_hosts;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use three_hosts::crosshost::{clear_prefix, owner, state_of};
use three_hosts::hostloss::{event_at, events, hostloss_daemon, Restore, SwitchWatch, Timing};
use three_hosts::{fence_lab, guest_mac, Cluster, ClusterCleanup};
use understudy::probe::{outage_around, Answer, Prober};

const HOSTS: [&str; 3] = ["h1", "h2", "h3"];
const SHADOW_WAIT: Duration = Duration::from_secs(300);
const TIMING: Timing = Timing {
    lease_ttl_s: 2,
    keepalive_ms: 200,
    heartbeat_ms: 50,
    suspect_ms: 300,
    margin_ms: 500,
    op_timeout_ms: 1000,
};

/// A lease-only phase's timings: [`TIMING`] with a TTL of `ttl_s`, etcd calls bounded below it.
fn lease_timing(ttl_s: u64) -> Timing {
    Timing {
        lease_ttl_s: ttl_s,
        op_timeout_ms: TIMING.op_timeout_ms.min(ttl_s * 1000 - 200),
        ..TIMING
    }
}

/// The client's gap around a loss: from the last answer not from the new primary before its
/// first answer after `event`, to that first answer.
fn client_gap(answers: &[Answer], event: Instant, is_new: impl Fn(&str) -> bool) -> Option<f64> {
    let first = answers
        .iter()
        .filter(|a| a.at > event && is_new(&a.body))
        .map(|a| a.at)
        .min()?;
    let last_old = answers
        .iter()
        .filter(|a| a.at < first && !is_new(&a.body))
        .map(|a| a.at)
        .max()?;
    Some((first - last_old).as_secs_f64() * 1000.0)
}

/// One lease-only phase's timings and results.
struct LeaseRun {
    timing: Timing,
    ms: Vec<f64>,
    gaps: Vec<f64>,
    two: usize,
    notes: Vec<serde_json::Value>,
}

/// The TTLs of the lease-only phases: `BENCH_LEASE_TTLS` (comma-separated seconds), default
/// 2 s (the least etcd grants at its default election timeout) and 1 s (the least the lab's
/// etcd grants, with its 500 ms election timeout).
fn lease_ttls() -> Vec<u64> {
    let spec = std::env::var("BENCH_LEASE_TTLS").unwrap_or_else(|_| "2,1".into());
    spec.split(',')
        .map(|t| {
            t.trim()
                .parse()
                .ok()
                .filter(|t| (1..=30).contains(t))
                .unwrap_or_else(|| panic!("BENCH_LEASE_TTLS: {t:?} is not a TTL of 1..=30 s"))
        })
        .collect()
}

fn lease_name(ttl_s: u64) -> String {
    format!("bhl{ttl_s}-web")
}

fn env_or(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn names(service: &str) -> Vec<String> {
    std::iter::once(service.to_string())
        .chain((1..64).map(|n| format!("{service}-shadow-{n}")))
        .collect()
}

/// Answers from another domain than the new primary after the new primary's first answer
/// after `event`: a second copy serving (the lost host's old primary still answering).
fn late_old_answers(answers: &[Answer], event: Instant, is_new: impl Fn(&str) -> bool) -> usize {
    let Some(first) = answers
        .iter()
        .filter(|a| a.at > event && is_new(&a.body))
        .map(|a| a.at)
        .min()
    else {
        return 0;
    };
    answers
        .iter()
        .filter(|a| a.at > first && !is_new(&a.body))
        .count()
}

/// One phase: `trials` host power-offs with (or without) fence devices. Client outages in ms,
/// the number of trials with two copies seen (by the client or on the switch), and what the
/// promoting host's events said about each loss.
fn phase(
    cluster: &Cluster,
    fence: bool,
    timing: &Timing,
    name: &str,
    ip: &str,
    trials: usize,
) -> (Vec<f64>, Vec<f64>, usize, Vec<serde_json::Value>) {
    let label = if fence { "fence device" } else { "lease-only" };
    let prefix = format!("/understudy/bench-{name}");
    clear_prefix(cluster, &prefix);
    let mut ds: BTreeMap<&str, DaemonProc> = HOSTS
        .iter()
        .map(|h| {
            (
                *h,
                hostloss_daemon(cluster, h, name, name, &prefix, fence, timing),
            )
        })
        .collect();
    let hv = |h: &str| cluster.hypervisor(h);
    hv("h1")
        .define(&guest_xml(name, &format!("{ip}/24"), &[]))
        .expect("define on h1");
    hv("h1").start(name, false).expect("start on h1");
    let probe = Prober::start(
        format!("{ip}:80").parse().unwrap(),
        "/",
        Duration::from_millis(5),
        Duration::from_secs(1),
    )
    .unwrap();
    let mut restore = Restore::default();
    let (mut ms, mut gaps, mut notes) = (Vec::new(), Vec::new(), Vec::new());
    let mut two_copy_trials = 0;
    let mac = guest_mac(name);
    for i in 0..trials {
        let (at, domain) = wait_for("the service's owner", SHADOW_WAIT, || {
            ds.values().find_map(|d| owner(d, name))
        });
        let (b, shadow) = wait_for("a paused shadow on another host", SHADOW_WAIT, || {
            HOSTS.iter().filter(|h| **h != at).find_map(|h| {
                ds[h]
                    .paused_shadows(name)
                    .and_then(|v| v.first().cloned())
                    .map(|s| (*h, s))
            })
        });
        let a: &str = HOSTS
            .iter()
            .copied()
            .find(|h| *h == at)
            .expect("owner on a lab host");
        wait_for(
            "page served before the loss",
            Duration::from_secs(60),
            || http_get(ip, Duration::from_millis(200)),
        );
        // Every daemon hears the others before the loss.
        std::thread::sleep(Duration::from_secs(2));
        let uuid = domain_uuid(&hv(b), &shadow);
        let leader = cluster.etcd_leader();
        let switch = SwitchWatch::start(cluster, &mac);
        restore.powered_off = vec![a.to_string()];
        let off = Instant::now();
        let (code, _) = fence_lab(&["-o", "off", "-n", a], None);
        assert_eq!(code, 0, "power {a} off");
        let deadline = Instant::now() + Duration::from_secs(60);
        let outage = loop {
            if let Some(d) = outage_around(&probe.answers(), off, |body| page_uuid(body) == uuid) {
                break Some(d.as_secs_f64() * 1000.0);
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // Long enough after the first answer to see an old copy answer again.
        std::thread::sleep(Duration::from_secs(1));
        let gap = client_gap(&probe.answers(), off, |body| page_uuid(body) == uuid);
        let late = late_old_answers(&probe.answers(), off, |body| page_uuid(body) == uuid);
        let seen = switch.verdict(
            cluster.host(a, "SWITCH_PORT"),
            cluster.host(b, "SWITCH_PORT"),
        );
        println!("{label} trial {i}: {seen}; the client had {late} answers from another domain after the new primary's first");
        let two_copies = late > 0 || !seen.two_copies.is_empty();
        two_copy_trials += usize::from(two_copies);
        match outage {
            Some(o) => {
                let gap_ms = gap.unwrap_or(f64::NAN);
                println!(
                    "{label} trial {i}: {domain}@{a} -> {shadow}@{b}: client outage {o:.1} ms (client's gap {gap_ms:.1} ms); etcd leader before: {leader:?}"
                );
                ms.push(o);
                gaps.extend(gap);
            }
            None => {
                println!("{label} trial {i}: {domain}@{a} -> {shadow}@{b}: NOT served within 60 s")
            }
        }
        let winner = &ds[b];
        let fenced = events(winner)
            .into_iter()
            .rev()
            .find(|e| e["kind"] == "host_fenced");
        let record = wait_for("the failover record", Duration::from_secs(30), || {
            let s = winner.service(name)?;
            (s["active"] == shadow.as_str()).then_some(s["last_failover"].clone())
        });
        notes.push(serde_json::json!({
            "lost": a, "to": b, "etcd_leader_before": leader, "outage_ms": outage, "gap_ms": gap, "host_fenced": fenced, "failover": record,
            "two_copies": two_copies, "late_old_answers": late, "switch_two_copies": seen.two_copies,
            "switch_frames_old": seen.frames_old, "switch_frames_new": seen.frames_new,
            "host_lost_failover": event_at(winner, "failover_started", "host_lost").is_some(),
        }));
        // The host comes back, its daemon too; it follows the new owner.
        let (code, _) = fence_lab(&["-o", "on", "-n", a], None);
        assert_eq!(code, 0, "power {a} on");
        restore.powered_off.clear();
        ds.get_mut(a).expect("a daemon per host").restart();
        let on = format!("elsewhere: on host {b}");
        wait_for(
            &format!("{a} following the new owner"),
            Duration::from_secs(60),
            || (state_of(&ds[a], name) == on).then_some(()),
        );
        assert!(
            !hv(a).state(&domain).unwrap().is_active(),
            "{a} started its old primary {domain} again"
        );
    }
    drop(probe);
    drop(ds);
    (ms, gaps, two_copy_trials, notes)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let cluster = Cluster::require();
    let trials = env_or("BENCH_TRIALS", 5);
    let cold_trials = env_or("BENCH_COLD_TRIALS", 3);
    let (fenced, cold) = ("bhf-web", "bhc-web");
    let all: Vec<String> = [fenced.to_string(), cold.to_string()]
        .into_iter()
        .chain(lease_ttls().into_iter().map(lease_name))
        .flat_map(|n| names(&n))
        .collect();
    let _cleanup = ClusterCleanup::new(
        &cluster,
        &all.iter().map(String::as_str).collect::<Vec<_>>(),
    );

    let (fence_ms, fence_gaps, fence_two, fence_notes) =
        phase(&cluster, true, &TIMING, fenced, "10.77.0.95", trials);
    let mut lease_runs = Vec::new();
    for (n, ttl_s) in lease_ttls().into_iter().enumerate() {
        let t = lease_timing(ttl_s);
        let name = lease_name(ttl_s);
        let ip = format!("10.77.0.{}", 96 + 2 * n);
        let (ms, gaps, two, notes) = phase(&cluster, false, &t, &name, &ip, trials);
        lease_runs.push(LeaseRun {
            timing: t,
            ms,
            gaps,
            two,
            notes,
        });
    }

    // The restart-based baseline: the same guest cold-started on a surviving host, from the
    // request to its first answer (detecting the loss, which takes the peers' tools seconds to
    // minutes, is not counted).
    let mut cold_ms = Vec::new();
    let (cold_ip, hv) = ("10.77.0.97", cluster.hypervisor("h2"));
    hv.define(&guest_xml(cold, &format!("{cold_ip}/24"), &[]))
        .expect("define the cold guest on h2");
    for i in 0..cold_trials {
        let began = Instant::now();
        hv.start(cold, false).expect("cold start");
        wait_for(
            "the cold-started guest serving",
            Duration::from_secs(180),
            || http_get(cold_ip, Duration::from_millis(200)),
        );
        let ms = began.elapsed().as_secs_f64() * 1000.0;
        println!("cold start {i} on h2: first answer after {ms:.0} ms");
        cold_ms.push(ms);
        hv.destroy(cold).expect("stop the cold guest");
    }

    let (f50, f95, fmax) = stats(&fence_ms);
    let (fg50, fg95, fgmax) = stats(&fence_gaps);
    let (c50, c95, cmax) = stats(&cold_ms);
    println!(
        "host power-off, fence device (TTL {} s): {} of {trials} served; median {f50:.0} ms, p95 {f95:.0} ms, max {fmax:.0} ms; client's gap median {fg50:.0} ms, p95 {fg95:.0} ms, max {fgmax:.0} ms; two copies in {fence_two} trials",
        TIMING.lease_ttl_s,
        fence_ms.len()
    );
    for r in &lease_runs {
        let (l50, l95, lmax) = stats(&r.ms);
        let (lg50, lg95, lgmax) = stats(&r.gaps);
        println!(
            "host power-off, lease-only (TTL {} s, margin {} ms): {} of {trials} served; median {l50:.0} ms, p95 {l95:.0} ms, max {lmax:.0} ms; client's gap median {lg50:.0} ms, p95 {lg95:.0} ms, max {lgmax:.0} ms; two copies in {} trials; target (median <= 3 s) {}",
            r.timing.lease_ttl_s,
            r.timing.margin_ms,
            r.ms.len(),
            r.two,
            if l50 <= 3000.0 { "met" } else { "NOT met" }
        );
    }
    println!(
        "cold start on a surviving host (detection excluded): median {c50:.0} ms, p95 {c95:.0} ms, max {cmax:.0} ms"
    );
    let two_copies: usize = fence_two + lease_runs.iter().map(|r| r.two).sum::<usize>();
    println!(
        "targets: fence device median <= 1 s: {}; zero cases of two copies: {} ({two_copies} trials with two copies)",
        if f50 <= 1000.0 { "met" } else { "NOT met" },
        if two_copies == 0 { "met" } else { "NOT met" }
    );
    let out = repo().join("build/bench");
    std::fs::create_dir_all(&out).unwrap();
    let lease_json: Vec<serde_json::Value> = lease_runs
        .iter()
        .map(|r| {
            let (l50, l95, lmax) = stats(&r.ms);
            let (lg50, lg95, lgmax) = stats(&r.gaps);
            serde_json::json!({
                "lease_ttl_s": r.timing.lease_ttl_s,
                "op_timeout_ms": r.timing.op_timeout_ms,
                "promote_margin_ms": r.timing.margin_ms,
                "outage_ms": r.ms,
                "gap_ms": r.gaps,
                "two_copy_trials": r.two,
                "summary": {
                    "outage": {"median": l50, "p95": l95, "max": lmax},
                    "gap": {"median": lg50, "p95": lg95, "max": lgmax},
                },
                "trials": r.notes,
            })
        })
        .collect();
    let json = serde_json::json!({
        "trials": trials,
        "cold_trials": cold_trials,
        "timing": {
            "lease_ttl_s": TIMING.lease_ttl_s,
            "op_timeout_ms": TIMING.op_timeout_ms,
            "keepalive_ms": TIMING.keepalive_ms,
            "heartbeat_ms": TIMING.heartbeat_ms,
            "suspect_after_ms": TIMING.suspect_ms,
            "promote_margin_ms": TIMING.margin_ms,
            "self_fence_guard_ms": 500,
        },
        "fence_device_ms": fence_ms,
        "fence_device_gap_ms": fence_gaps,
        "cold_start_ms": cold_ms,
        "summary": {
            "fence_device": {"median": f50, "p95": f95, "max": fmax},
            "fence_device_gap": {"median": fg50, "p95": fg95, "max": fgmax},
            "cold_start": {"median": c50, "p95": c95, "max": cmax},
        },
        "two_copy_trials": {"fence_device": fence_two, "lease_only": lease_runs.iter().map(|r| r.two).collect::<Vec<_>>()},
        "fence_device_trials": fence_notes,
        "lease_only": lease_json,
    });
    std::fs::write(
        out.join("hostloss.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
    let lease_labels: Vec<String> = lease_runs
        .iter()
        .map(|r| format!("lease-only, TTL {} s", r.timing.lease_ttl_s))
        .collect();
    let series: Vec<(&str, &[f64])> = std::iter::once(("fence device", fence_ms.as_slice()))
        .chain(
            lease_labels
                .iter()
                .zip(&lease_runs)
                .map(|(l, r)| (l.as_str(), r.ms.as_slice())),
        )
        .chain(std::iter::once(("cold start", cold_ms.as_slice())))
        .collect();
    let chart = understudy::plot::dots_log(
        "Client-observed outage per lost host (log scale)",
        "outage (ms)",
        &series,
    )
    .expect("outage chart");
    std::fs::write(out.join("hostloss.svg"), chart).unwrap();
    println!(
        "wrote {} and {}",
        out.join("hostloss.json").display(),
        out.join("hostloss.svg").display()
    );
}
