//! Health: heartbeats into the hang detector, the external probe (missed failovers), the fence
//! grace period (false failovers), and repair of taps that drifted off or onto a bridge.

use std::time::{Duration, Instant};

use crate::api::protocol::ShadowState;
use crate::config::ClassConfig;
use crate::failover::promote::Trigger;
use crate::failover::shadow::isolate_tap;
use crate::failover::{now_unix_ms, ServiceState};
use crate::libvirt::LibvirtError;
use crate::monitor::heartbeat::PingFailure;
use crate::monitor::{Health, HeartbeatConfig, HeartbeatEvent};

use super::*;

/// Per-service state of the external probe.
#[derive(Debug, Default, Clone)]
pub(super) struct ProbeState {
    last_run: Option<Instant>,
    failing_since: Option<Instant>,
    counted: bool,
    in_flight: bool,
}

pub(super) fn heartbeat_config(class: &ClassConfig) -> HeartbeatConfig {
    HeartbeatConfig {
        interval: Duration::from_millis(class.heartbeat_interval_ms),
        timeout: Duration::from_millis(class.heartbeat_timeout_ms),
        misses: class.heartbeat_misses,
        ..HeartbeatConfig::default()
    }
}

/// Turns the tracker's verdict into status and, for a hang, a failover.
pub(super) fn judge_health(d: &Shared, service: &str, domain: &str) {
    let Some(health) = d.health(domain) else {
        return;
    };
    let label = match &health {
        Health::Unknown => "unknown".to_string(),
        Health::Healthy => "healthy".to_string(),
        Health::Degraded { reason } => format!("degraded: {reason}"),
        Health::Suspect { reason } => format!("suspect: {reason}"),
        Health::Hung { evidence, .. } => format!("hung: {evidence:?}"),
    };
    let changed = {
        let mut services = d.services();
        let Some(svc) = services.get_mut(service) else {
            return;
        };
        let changed = svc.health != label;
        svc.health = label.clone();
        changed
    };
    if changed {
        tracing::info!(service, domain, health = %label, "health changed");
    }
    if let Health::Hung { since, .. } = health {
        let at = d.mono_origin + Duration::from_millis(since.0);
        tracing::warn!(service, domain, "primary hung; failing over");
        start_failover(
            d,
            service,
            domain,
            Trigger::Heartbeat,
            at.min(Instant::now()),
        );
    }
}

pub(super) fn send_heartbeats(d: &Shared) {
    let cfg = d.cfg();
    let targets: Vec<(String, String, ClassConfig)> = d
        .services()
        .values()
        .filter(|s| {
            matches!(
                s.state,
                ServiceState::Provisioning | ServiceState::Protected
            )
        })
        .map(|s| (s.name.clone(), s.active.clone(), d.class(&s.class)))
        .collect();
    let max_reply = cfg.monitor.agent_max_reply_bytes;
    for (service, domain, class) in targets {
        // vCPU time straight from /proc: answers even when QEMU or its monitor is stuck.
        let pid = d
            .pids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&domain)
            .copied();
        if let Some(pid) = pid {
            if let Ok(total_ns) = crate::libvirt::vcpu_time_ns(std::path::Path::new("/proc"), pid) {
                d.observe(
                    &domain,
                    &class,
                    HeartbeatEvent::VcpuTime {
                        at: d.now_mono(),
                        total_ns,
                    },
                );
            }
        }
        // A ping still outstanding is not doubled; the tracker counts the silence itself.
        let fresh = d
            .pinging
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(domain.clone());
        if fresh {
            // Pings and other guest probes use their own libvirt connection: a stuck agent
            // call occupies one of libvirtd's per-client request slots for up to a second,
            // and the promotion path must never queue behind those.
            let hv = d.probe_hv();
            let timeout = Duration::from_millis(class.heartbeat_timeout_ms);
            let d2 = d.clone();
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
                    Ok(Ok(Err(LibvirtError::AgentTimeout { .. }))) | Err(_) => {
                        Err(PingFailure::Timeout)
                    }
                    Ok(Ok(Err(LibvirtError::Domain { source, .. })))
                        if source
                            .code()
                            .is(virt::error::ErrorNumber::AgentUnresponsive) =>
                    {
                        Err(PingFailure::NotConnected)
                    }
                    Ok(_) => Err(PingFailure::TransportError),
                };
                let at = d2.now_mono();
                let _ = d2.notes.send(Note::Heartbeat {
                    domain: domain.clone(),
                    ping,
                    at,
                    at_unix_ms: now_unix_ms(),
                });
                // The next ping for this domain waits until libvirt has given up on this one,
                // so stuck calls never pile up.
                if timed_out {
                    let _ = call.await;
                }
                d2.pinging
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&domain);
            });
        } else {
            judge_health(d, &service, &domain);
        }
        if let Some(probe) = class.probe.clone() {
            run_probe(d, &service, &class, probe);
        }
        repair_taps(d, &service);
    }
}

/// Puts an active primary's taps back on their bridge if something took them off (an
/// operator's mistake, a script): the primary is healthy, so repairing beats failing over.
pub(super) fn repair_taps(d: &Shared, service: &str) {
    isolate_standby_taps(d, service);
    let taps = match d.services().get(service) {
        Some(s)
            if matches!(
                s.state,
                ServiceState::Provisioning | ServiceState::Protected
            ) =>
        {
            s.active_taps.clone()
        }
        _ => return,
    };
    if taps.is_empty() {
        return;
    }
    let d2 = d.clone();
    let service = service.to_string();
    tokio::spawn(async move {
        for b in taps {
            let Some(bridge) = &b.bridge else { continue };
            match d2.net.master_of(&b.tap).await {
                Ok(Some(m)) if &m == bridge => {}
                Ok(_) => {
                    // Only while this is still the active primary's tap: a failover may have
                    // started since the list was read.
                    let still_active = d2.services().get(&service).is_some_and(|s| {
                        s.state != ServiceState::FailingOver
                            && s.active_taps.iter().any(|x| x.tap == b.tap)
                    });
                    if !still_active {
                        return;
                    }
                    match d2.net.enslave_and_up(&b.tap, bridge).await {
                        Ok(()) => {
                            tracing::warn!(%service, tap = %b.tap, %bridge, "active primary's tap was off its bridge; re-attached")
                        }
                        Err(e) => {
                            tracing::error!(%service, tap = %b.tap, error = %e, "cannot re-attach the active primary's tap")
                        }
                    }
                }
                Err(_) => {}
            }
        }
    });
}

/// Takes any paused shadow's tap back off its bridge. libvirtd re-attaches every tap to its
/// configured bridge when it restarts, and a standing-by shadow must never be reachable.
pub(super) fn isolate_standby_taps(d: &Shared, service: &str) {
    let taps: Vec<(String, String)> = match d.services().get(service) {
        Some(s) if s.state != ServiceState::FailingOver => s
            .shadows
            .iter()
            .filter(|x| x.state == ShadowState::Paused)
            .flat_map(|x| x.taps.iter().map(move |b| (x.name.clone(), b.tap.clone())))
            .collect(),
        _ => return,
    };
    if taps.is_empty() {
        return;
    }
    let d2 = d.clone();
    let service = service.to_string();
    tokio::spawn(async move {
        for (shadow, tap) in taps {
            if let Ok(Some(master)) = d2.net.master_of(&tap).await {
                // Re-check: the shadow may have been picked for promotion meanwhile.
                let standing_by = d2.services().get(&service).is_some_and(|s| {
                    s.state != ServiceState::FailingOver
                        && s.shadows
                            .iter()
                            .any(|x| x.name == shadow && x.state == ShadowState::Paused)
                });
                if standing_by {
                    match isolate_tap(&d2.net, &tap).await {
                        Ok(()) => {
                            tracing::warn!(%service, %shadow, %tap, %master, "standing-by shadow's tap was on a bridge; isolated again")
                        }
                        Err(e) => {
                            tracing::error!(%service, %shadow, %tap, error = %e, "cannot isolate standing-by shadow's tap")
                        }
                    }
                }
            }
        }
    });
}

/// The external probe: a client's check from the host namespace. A service that stays
/// unreachable longer than its detection bound without a failover counts as a missed one.
pub(super) fn run_probe(
    d: &Shared,
    service: &str,
    class: &ClassConfig,
    probe: crate::config::ProbeConfig,
) {
    {
        let mut probes = d.probes.lock().unwrap_or_else(|e| e.into_inner());
        let st = probes.entry(service.to_string()).or_default();
        if st.in_flight
            || st
                .last_run
                .is_some_and(|t| t.elapsed() < Duration::from_millis(probe.interval_ms))
        {
            return;
        }
        st.in_flight = true;
        st.last_run = Some(Instant::now());
    }
    let bound = Duration::from_millis(
        class.heartbeat_interval_ms * u64::from(class.heartbeat_misses)
            + class.heartbeat_timeout_ms,
    ) + Duration::from_secs(2);
    let d2 = d.clone();
    let service = service.to_string();
    tokio::task::spawn_blocking(move || {
        let timeout = Duration::from_millis(probe.timeout_ms);
        let ok = match &probe.check {
            crate::config::ProbeCheck::Http { path } => {
                crate::probe::http_get(probe.address, path, timeout).is_some()
            }
            crate::config::ProbeCheck::Tcp => {
                std::net::TcpStream::connect_timeout(&probe.address, timeout).is_ok()
            }
        };
        let acting = d2
            .services()
            .get(&service)
            .map(|s| matches!(s.state, ServiceState::FailingOver | ServiceState::Stopped))
            .unwrap_or(true);
        let mut probes = d2.probes.lock().unwrap_or_else(|e| e.into_inner());
        let st = probes.entry(service.clone()).or_default();
        st.in_flight = false;
        if ok || acting {
            st.failing_since = None;
            st.counted = false;
            return;
        }
        let since = *st.failing_since.get_or_insert_with(Instant::now);
        if since.elapsed() > bound && !st.counted {
            st.counted = true;
            d2.missed_failovers
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            d2.metrics.inc_missed_failover(&service);
            tracing::error!(%service, unreachable_ms = since.elapsed().as_millis() as u64, bound_ms = bound.as_millis() as u64,
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

/// How long a primary fenced for a hang is kept (isolated, off the bridge) to see whether it
/// was really dead: an agent answer in this window makes the failover count as false.
pub(super) const FENCE_GRACE: Duration = Duration::from_secs(10);
