//! The periodic checks of every running service, on each heartbeat tick: vCPU time and a ping
//! into the hang detector, the external probe (missed failovers), repair of taps that drifted
//! off or onto a bridge; and the fence grace period after a hang failover (false failovers).
//! What they learn goes to the [`super::HealthMonitor`] and the service table.

use std::time::{Duration, Instant};

use crate::api::metrics::StandbyCost;
use crate::config::{ClassConfig, ProbeCheck, ProbeConfig};
use crate::domain_xml::DomainXml;
use crate::failover::shadow::isolate_tap;
use crate::failover::tpm;
use crate::failover::{ShadowState, Trigger};
use crate::libvirt::LibvirtError;
use crate::monitor::heartbeat::PingFailure;
use crate::monitor::HeartbeatEvent;

use super::health::probe_bound;
use super::{start_failover, Note, ServiceState, Shared};

/// How long a primary fenced for a hang is kept (isolated, off the bridge) to see whether it
/// was really dead: an agent answer in this window makes the failover count as false.
pub(super) const FENCE_GRACE: Duration = Duration::from_secs(10);

/// Turns the tracker's verdict into status and, for a hang, a failover.
pub(super) fn judge_health(d: &Shared, service: &str, domain: &str) {
    let Some(verdict) = d.health().judge(domain) else {
        return;
    };
    if d.table().set_health(service, &verdict.label) {
        tracing::info!(service, domain, health = %verdict.label, "health changed");
    }
    if let Some(since) = verdict.hung_since {
        tracing::warn!(service, domain, "primary hung; failing over");
        start_failover(d, service, domain, Trigger::Heartbeat, since);
    }
}

/// One heartbeat round over every running service.
pub(super) fn send_heartbeats(d: &Shared) {
    let max_reply = d.cfg().monitor.agent_max_reply_bytes;
    let targets: Vec<(String, String, ClassConfig)> = d
        .table()
        .iter()
        .filter(|s| s.state.is_running())
        .map(|s| (s.name.clone(), s.active.clone(), d.class(&s.class)))
        .collect();
    for (service, domain, class) in targets {
        // vCPU time straight from /proc: answers even when QEMU or its monitor is stuck.
        let pid = d.health().pid(&domain);
        if let Some(pid) = pid {
            if let Ok(t) = crate::libvirt::vcpu_sched(std::path::Path::new("/proc"), pid) {
                let at = d.health().now();
                let event = HeartbeatEvent::VcpuTime {
                    at,
                    total_ns: t.run_ns,
                    wait_ns: t.wait_ns,
                };
                d.observe(&domain, &class, event);
            }
        }
        // A ping still outstanding is not doubled; the tracker counts the silence itself.
        let fresh = d.health().begin_ping(&domain);
        if fresh {
            spawn_ping(d, domain, &class, max_reply);
        } else {
            judge_health(d, &service, &domain);
        }
        if let Some(probe) = class.probe.clone() {
            run_probe(d, &service, &class, probe);
        }
        repair_taps(d, &service);
    }
}

/// Pings `domain`'s guest agent and reports the outcome as a [`Note::Heartbeat`].
fn spawn_ping(d: &Shared, domain: String, class: &ClassConfig, max_reply: usize) {
    // Pings and other guest probes use their own libvirt connection: a stuck agent call
    // occupies one of libvirtd's per-client request slots for up to a second, and the
    // promotion path must never queue behind those.
    let hv = d.probe_hv();
    let timeout = Duration::from_millis(class.heartbeat_timeout_ms);
    let d = d.clone();
    tokio::spawn(async move {
        let dn = domain.clone();
        let mut call = tokio::spawn(async move {
            hv.run("heartbeat", move |hv| {
                hv.agent_command(&dn, r#"{"execute":"guest-ping"}"#, timeout, max_reply)
            })
            .await
        });
        let outcome = tokio::time::timeout(timeout, &mut call).await;
        let timed_out = outcome.is_err();
        let ping = match outcome {
            Ok(Ok(Ok(_))) => Ok(()),
            Ok(Ok(Err(LibvirtError::AgentTimeout { .. }))) | Err(_) => Err(PingFailure::Timeout),
            Ok(_) => Err(PingFailure::TransportError),
        };
        let at = d.health().now();
        let _ = d.notes.send(Note::Heartbeat {
            domain: domain.clone(),
            ping,
            at,
            at_unix_ms: crate::clock::now_unix_ms(),
        });
        // The next ping for this domain waits until libvirt has given up on this one, so
        // stuck calls never pile up.
        if timed_out {
            let _ = call.await;
        }
        d.health().end_ping(&domain);
    });
}

/// Puts an active primary's taps back on their bridge if something took them off (an
/// operator's mistake, a script): the primary is healthy, so repairing beats failing over.
pub(super) fn repair_taps(d: &Shared, service: &str) {
    isolate_standby_taps(d, service);
    let taps = match d.table().get(service) {
        Some(s) if s.state.is_running() => s.active_taps.clone(),
        _ => return,
    };
    if taps.is_empty() {
        return;
    }
    let d = d.clone();
    let service = service.to_string();
    tokio::spawn(async move {
        for b in taps {
            let Some(bridge) = &b.bridge else { continue };
            match d.net.master_of(&b.tap).await {
                Ok(Some(m)) if &m == bridge => {}
                Ok(_) => {
                    // Only while this is still the active primary's tap: a failover may have
                    // started since the list was read.
                    let still_active = d.table().get(&service).is_some_and(|s| {
                        s.state.is_running() && s.active_taps.iter().any(|x| x.tap == b.tap)
                    });
                    if !still_active {
                        return;
                    }
                    match d.net.enslave_and_up(&b.tap, bridge).await {
                        Ok(()) => {
                            tracing::warn!(%service, tap = %b.tap, %bridge, "active primary's tap was off its bridge; re-attached")
                        }
                        Err(e) => {
                            tracing::error!(%service, tap = %b.tap, error = %crate::error::report(&e), "cannot re-attach the active primary's tap")
                        }
                    }
                }
                Err(_) => {}
            }
        }
    });
}

/// Whether `shadow` still stands by for `service` (not picked for promotion meanwhile).
fn standing_by(d: &Shared, service: &str, shadow: &str) -> bool {
    d.table().get(service).is_some_and(|s| {
        !matches!(s.state, ServiceState::FailingOver { .. })
            && s.shadows
                .iter()
                .any(|x| x.name == shadow && x.state == ShadowState::PAUSED)
    })
}

/// Takes any paused shadow's tap back off its bridge. libvirtd re-attaches every tap to its
/// configured bridge when it restarts, and a standing-by shadow must never be reachable.
pub(super) fn isolate_standby_taps(d: &Shared, service: &str) {
    let taps: Vec<(String, String)> = match d.table().get(service) {
        Some(s) if !matches!(s.state, ServiceState::FailingOver { .. }) => s
            .shadows
            .iter()
            .filter(|x| x.state == ShadowState::PAUSED)
            .flat_map(|x| x.taps.iter().map(move |b| (x.name.clone(), b.tap.clone())))
            .collect(),
        _ => return,
    };
    if taps.is_empty() {
        return;
    }
    let d = d.clone();
    let service = service.to_string();
    tokio::spawn(async move {
        for (shadow, tap) in taps {
            let Ok(Some(master)) = d.net.master_of(&tap).await else {
                continue;
            };
            if !standing_by(&d, &service, &shadow) {
                continue;
            }
            match isolate_tap(&d.net, &tap).await {
                Ok(()) => {
                    tracing::warn!(%service, %shadow, %tap, %master, "standing-by shadow's tap was on a bridge; isolated again")
                }
                Err(e) => {
                    tracing::error!(%service, %shadow, %tap, error = %crate::error::report(&e), "cannot isolate standing-by shadow's tap")
                }
            }
        }
    });
}

/// Re-reads the host side of every routed service's active taps (routes and addresses may be
/// set up by a hook after the VM started), so that a crash finds them known: they vanish with
/// the tap.
pub(super) fn refresh_routed(d: &Shared) {
    let cfg = d.cfg();
    let services: Vec<(String, String, Vec<crate::failover::TapBinding>)> = d
        .table()
        .iter()
        .filter(|s| s.state.is_running())
        .filter(|s| {
            cfg.class.get(&s.class).map(|c| c.network) == Some(crate::config::NetworkMode::Routed)
        })
        .map(|s| (s.name.clone(), s.active.clone(), s.active_taps.clone()))
        .collect();
    if services.is_empty() {
        return;
    }
    let d = d.clone();
    tokio::spawn(async move {
        for (service, active, mut taps) in services {
            crate::failover::shadow::read_routed_sides(&d.net, &active, &mut taps).await;
            let mut table = d.table();
            // Only if nothing changed the active domain meanwhile.
            if table.get(&service).is_some_and(|s| {
                s.state.is_running()
                    && s.active == active
                    && s.active_taps
                        .iter()
                        .map(|b| &b.tap)
                        .eq(taps.iter().map(|b| &b.tap))
            }) {
                table.set_active_taps(&service, taps);
            }
        }
    });
}

/// Audits every running service's bridges: its MAC must be learned behind the active
/// primary's tap only. Another port carrying it (a standby tap that something re-attached, a
/// copy of the VM started by hand) means two copies could answer for the service: reported
/// (log and metric) for an operator, since the port may belong to a VM that is not ours.
pub(super) fn audit_bridges(d: &Shared) {
    let services: Vec<(String, Vec<crate::failover::TapBinding>)> = d
        .table()
        .iter()
        .filter(|s| s.state.is_running())
        .map(|s| (s.name.clone(), s.active_taps.clone()))
        .collect();
    if services.is_empty() {
        return;
    }
    let d = d.clone();
    tokio::spawn(async move {
        for (service, taps) in services {
            for b in &taps {
                let Some(bridge) = &b.bridge else { continue };
                let Ok(fdb) = d.net.bridge_fdb(bridge).await else {
                    continue;
                };
                for e in fdb.iter().filter(|e| e.mac.eq_ignore_ascii_case(&b.mac)) {
                    // Re-read: a failover may have moved the service since the list was taken.
                    let still = d.table().get(&service).is_some_and(|s| {
                        s.state.is_running() && s.active_taps.iter().any(|x| x.tap == b.tap)
                    });
                    if still && e.port != b.tap {
                        d.metrics.inc_foreign_mac_port(&service);
                        tracing::error!(%service, mac = %b.mac, %bridge, port = %e.port, active_tap = %b.tap,
                            "the service MAC is learned behind a port that is not the active primary's: two copies may answer");
                    }
                }
            }
        }
    });
}

/// Whether the service answers `probe` from this host's network, within its timeout.
pub(super) async fn probe_answers(probe: &ProbeConfig) -> bool {
    let timeout = probe.timeout();
    match &probe.check {
        ProbeCheck::Http { path } => crate::probe::http_get_async(probe.address, path, timeout)
            .await
            .is_some(),
        ProbeCheck::Tcp => matches!(
            tokio::time::timeout(timeout, tokio::net::TcpStream::connect(probe.address)).await,
            Ok(Ok(_))
        ),
    }
}

/// The external probe: a client's check from the host namespace. A service that stays
/// unreachable longer than its detection bound without a failover counts as a missed one.
fn run_probe(d: &Shared, service: &str, class: &ClassConfig, probe: ProbeConfig) {
    let interval = Duration::from_millis(probe.interval_ms);
    if !d.health().probe_due(service, interval, Instant::now()) {
        return;
    }
    let bound = probe_bound(class);
    let d = d.clone();
    let service = service.to_string();
    tokio::spawn(async move {
        let ok = probe_answers(&probe).await;
        // Failing over or stopped: unreachable is expected, not missed.
        let acting = d.table().get(&service).is_none_or(|s| {
            matches!(
                s.state,
                ServiceState::FailingOver { .. } | ServiceState::Stopped
            )
        });
        let missed = d
            .health()
            .probe_done(&service, ok, acting, bound, Instant::now());
        if let Some(m) = missed {
            d.metrics.inc_missed_failover(&service);
            tracing::error!(%service, unreachable_ms = m.unreachable.as_millis() as u64, bound_ms = bound.as_millis() as u64,
                "MISSED FAILOVER: the external probe cannot reach the service and no failover was started within the detection bound");
        }
    });
}

/// Watches a primary fenced for a hang: if its agent answers during [`FENCE_GRACE`] it was
/// alive after all (a false failover); either way it is destroyed afterwards.
pub(super) fn spawn_fence_grace(d: &Shared, service: &str, old: &str) {
    let (hv, notes) = (d.probe_hv(), d.notes.clone());
    let (service, old) = (service.to_string(), old.to_string());
    tokio::spawn(async move {
        let deadline = Instant::now() + FENCE_GRACE;
        let mut answered = false;
        while Instant::now() < deadline && !answered {
            let o = old.clone();
            let ping = hv.run("grace ping", move |hv| {
                hv.agent_command(
                    &o,
                    r#"{"execute":"guest-ping"}"#,
                    Duration::from_secs(1),
                    4096,
                )
            });
            answered = matches!(
                tokio::time::timeout(Duration::from_secs(2), ping).await,
                Ok(Ok(_))
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let _ = notes.send(Note::FenceGraceOver {
            service,
            old,
            answered,
        });
    });
}

/// Refreshes the gauges that describe the services: shadows and services by state, and what
/// standing by costs each service (see [`super::cost`]). Every service's counters exist from
/// its first round, at 0.
pub(super) fn publish_gauges(d: &Shared) {
    let services: Vec<super::Service> = d.table().iter().cloned().collect();
    publish_cost(d, &super::cost::measure(&services));
    publish_states(d);
}

/// Shadows and services by state.
pub(super) fn publish_states(d: &Shared) {
    let (shadow_states, service_states): (Vec<ShadowState>, Vec<&'static str>) = {
        let table = d.table();
        (
            // Pooled shadows count like any other: they stand by for the class's primaries.
            table
                .iter()
                .flat_map(|s| s.shadows.iter().map(|x| x.state))
                .chain(
                    table
                        .pools()
                        .flat_map(|p| p.shadows.iter().map(|x| x.state)),
                )
                .collect(),
            table.iter().map(|s| s.state.label()).collect(),
        )
    };
    d.metrics.set_shadow_states(shadow_states);
    d.metrics.set_service_states(service_states);
}

/// The memory figures of every service's members, as measured.
pub(super) fn publish_cost(d: &Shared, costs: &[super::cost::ServiceCost]) {
    let exported = costs.iter().map(|c| {
        d.metrics.initialize_service(&c.service);
        StandbyCost {
            service: c.service.clone(),
            standby_bytes: c.standby_bytes(),
            standby_share: c.standby_share_pct().map(|p| p / 100.0),
            members: c
                .primary
                .map(|m| (c.active.clone(), "primary", m))
                .into_iter()
                .chain(
                    c.shadows
                        .iter()
                        .filter_map(|x| x.memory.map(|m| (x.name.clone(), x.state.as_str(), m))),
                )
                .collect(),
        }
    });
    d.metrics.set_standby_cost(exported.collect());
}

/// Replaces standing-by shadows whose emulated TPM state is older than their primary's: a
/// shadow's swtpm has read its copy already and cannot take a newer one (see
/// [`crate::failover::tpm`]). Only shadows that were given TPM state are looked at.
pub(super) fn replace_stale_tpm_shadows(d: &Shared) {
    let disk_dir = d.cfg().daemon.state_dir.join("disks");
    let candidates: Vec<(String, String, Vec<String>)> = d
        .table()
        .iter()
        .filter(|s| s.state.is_running())
        .map(|s| {
            let shadows = s
                .shadows
                .iter()
                .filter(|x| x.state == ShadowState::PAUSED)
                .filter(|x| tpm::record_path(&disk_dir, &x.name).exists())
                .map(|x| x.name.clone())
                .collect();
            (s.name.clone(), s.active.clone(), shadows)
        })
        .filter(|(_, _, shadows): &(String, String, Vec<String>)| !shadows.is_empty())
        .collect();
    if candidates.is_empty() {
        return;
    }
    let d = d.clone();
    tokio::spawn(async move {
        for (service, active, shadows) in candidates {
            let a = active.clone();
            let Ok(xml) = d
                .hv()
                .run("tpm: primary XML", move |hv| hv.xml(&a, true))
                .await
            else {
                continue;
            };
            let Some(uuid) = DomainXml::parse(&xml).ok().and_then(|x| x.uuid()) else {
                continue;
            };
            let root = std::path::Path::new(tpm::SWTPM_STATE_DIR);
            for shadow in shadows {
                if !tpm::is_stale(root, &uuid, &disk_dir, &shadow) {
                    continue;
                }
                tracing::info!(%service, %shadow, primary = %active, "the primary's emulated TPM state changed: replacing the shadow that holds the old one");
                let answer = d.table().shadow_lost(&service, &shadow);
                if let Ok(actions) = answer {
                    super::execute(&d, actions).await;
                }
            }
        }
    });
}
