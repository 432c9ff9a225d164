//! Control-socket requests: status, switchover, stop/start, shadow rebuild, reload; profile
//! requests and `shadow reinit --golden` are answered in `profiles`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::api::protocol::{
    DaemonInfo, DomainStatus, ErrorKind, PoolStatus, Request, Response, ServiceStatus,
    ShadowStatus, StatusReport,
};
use crate::cluster::HostId;
use crate::domain_xml::MemberState;
use crate::events::EventKind;
use crate::failover::plan::{plan_disks, DiskPlan, DiskPolicy};
use crate::failover::shadow::{primary_meta, write_meta};
use crate::failover::{FailoverRecord, Trigger};

use super::recover::{ensure_all_shadows, refresh_active, remove_shadow};
use super::{launch_promotion, load_config, Refused, ServiceState, Shared};

/// How long a switchover request waits for its promotion.
const SWITCHOVER_WAIT: Duration = Duration::from_secs(60);

/// The answer to a refused transition, with the kind a script can act on.
pub(super) fn refused(e: Refused) -> Response {
    let kind = match e {
        Refused::UnknownService { .. } | Refused::NoSuchShadow { .. } => ErrorKind::NotFound,
        Refused::NotActive { .. }
        | Refused::WrongState { .. }
        | Refused::NoShadow { .. }
        | Refused::NoShadowOnHost { .. } => ErrorKind::Conflict,
    };
    Response::error(kind, e.to_string())
}

/// Answers one control request.
pub(super) async fn handle(d: &Shared, req: Request) -> Response {
    match req {
        Request::Status => Response::Status(status(d).await),
        Request::Failover {
            service,
            to_host: None,
        } => switchover(d, &service).await,
        Request::Failover {
            service,
            to_host: Some(host),
        } => match super::crosshost::handover(d, &service, &HostId(host)).await {
            Ok(msg) => Response::ok(msg),
            Err(why) => Response::error(ErrorKind::Failed, why),
        },
        Request::HostDrain {
            host,
            drain,
            wait_s,
        } => {
            let wait = Duration::from_secs(wait_s);
            match super::crosshost::set_drain(d, &HostId(host), drain, wait).await {
                Ok(msg) => Response::ok(msg),
                Err(why) => Response::error(ErrorKind::Failed, why),
            }
        }
        Request::Stop { service } => stop(d, &service).await,
        Request::Start { service } => start(d, &service).await,
        Request::ShadowReinit {
            service,
            golden: true,
        } => super::profiles::reinit_golden(d, &service).await,
        Request::ShadowRebuild { service } | Request::ShadowReinit { service, .. } => {
            super::profiles::forget_golden(d, &service);
            match rebuild(d, &service).await {
                Ok(n) => Response::ok(format!(
                    "service '{service}': {n} shadow(s) removed; new ones are being provisioned"
                )),
                Err(e) => refused(e),
            }
        }
        Request::ProfileShow { .. }
        | Request::ProfileHistory { .. }
        | Request::ProfileDiff { .. }
        | Request::ProfileRollback { .. }
        | Request::ProfileAccuracy { .. }
        | Request::ProfileSave { .. }
        | Request::ProfileSeries { .. } => super::profiles::handle_request(d, req).await,
        Request::ReloadConfig => reload(d),
        Request::Hosts => match super::cluster::hosts(d).await {
            Ok(r) => Response::Hosts(r),
            Err(e) => Response::error(ErrorKind::Failed, crate::error::report(&e)),
        },
        Request::CanaryStart { service, change } => {
            super::canary::start(d, &service, &change).await
        }
        Request::CanaryReport { service } => super::canary::report(d, &service),
        Request::ShadowVerify { service } => super::canary::verify(d, &service).await,
        Request::CanaryAbort { service } => super::canary::abort(d, &service).await,
        Request::CanaryPromote { service, wait_s } => {
            super::canary::promote(d, &service, Duration::from_secs(wait_s.clamp(10, 3600))).await
        }
        // The control socket streams events itself; it never forwards this request.
        Request::Events { .. } => Response::error(
            ErrorKind::Internal,
            "events are served by the control socket, not the daemon loop",
        ),
    }
}

/// Removes every shadow of `service` so new ones are provisioned; returns how many.
pub(super) async fn rebuild(d: &Shared, service: &str) -> Result<usize, Refused> {
    let shadows = d.table().rebuild(service)?;
    for s in &shadows {
        remove_shadow(d, service, s).await;
    }
    ensure_all_shadows(d);
    Ok(shadows.len())
}

/// A planned switchover: the healthy primary is fenced (paused, cut) and a shadow promoted.
pub(super) async fn switchover(d: &Shared, service: &str) -> Response {
    let previous = match d.table().require(service) {
        Ok(s) => s.last_failover.as_ref().map(|r| r.at_unix_ms),
        Err(e) => return refused(e),
    };
    // Refused unless it runs with a shadow ready: a refused switchover never marks it down.
    let begun = d.table().begin_switchover(service);
    match begun {
        Ok(start) => launch_promotion(d, service, Trigger::Manual, Instant::now(), start, None),
        Err(e) => return refused(e),
    }
    match wait_failover(d, service, previous).await {
        Some(r) if r.ok => Response::Failover(r),
        Some(r) => Response::error(ErrorKind::Failed, r.error.unwrap_or_default()),
        None => Response::error(
            ErrorKind::Timeout,
            format!(
                "switchover of '{service}' did not finish within {} s",
                SWITCHOVER_WAIT.as_secs()
            ),
        ),
    }
}

/// Waits until the service's failover record changes and no failover runs, then returns it.
async fn wait_failover(d: &Shared, service: &str, previous: Option<u64>) -> Option<FailoverRecord> {
    let deadline = Instant::now() + SWITCHOVER_WAIT;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let table = d.table();
        let svc = table.get(service)?;
        if matches!(svc.state, ServiceState::FailingOver { .. }) {
            continue;
        }
        if let Some(r) = svc
            .last_failover
            .as_ref()
            .filter(|r| Some(r.at_unix_ms) != previous)
        {
            return Some(r.clone());
        }
    }
    None
}

/// `understudy stop`: the primary is shut off on purpose; its shadows keep standing by.
async fn stop(d: &Shared, service: &str) -> Response {
    let stopped = d
        .table()
        .stop(service)
        .map(|s| (s.class.clone(), s.active.clone()));
    let (class, active) = match stopped {
        Ok(x) => x,
        Err(e) => return refused(e),
    };
    let meta = primary_meta(service, &class, &active, MemberState::Stopped);
    let a = active.clone();
    match d
        .hv()
        .run("stop", move |hv| {
            write_meta(hv, &a, &meta)?;
            hv.destroy(&a)
        })
        .await
    {
        Ok(()) => {
            d.events.emit(
                Some(service),
                EventKind::Stopped {
                    domain: active.clone(),
                },
            );
            Response::ok(format!(
                "service '{service}' stopped ({active} shut off); shadows keep standing by"
            ))
        }
        Err(e) => Response::error(ErrorKind::Failed, crate::error::report(&e)),
    }
}

/// `understudy start`: the primary runs again and is protected.
async fn start(d: &Shared, service: &str) -> Response {
    let started = d
        .table()
        .start(service)
        .map(|s| (s.class.clone(), s.active.clone()));
    let (class, active) = match started {
        Ok(x) => x,
        Err(e) => return refused(e),
    };
    let meta = primary_meta(service, &class, &active, MemberState::Active);
    let a = active.clone();
    let r = d
        .hv()
        .run("start", move |hv| {
            write_meta(hv, &a, &meta)?;
            if !hv.state(&a)?.is_active() {
                hv.start(&a, false)?;
            }
            Ok(())
        })
        .await;
    match r {
        Ok(()) => {
            refresh_active(d, service).await;
            d.events.emit(
                Some(service),
                EventKind::Started {
                    domain: active.clone(),
                },
            );
            Response::ok(format!("service '{service}' started on {active}"))
        }
        Err(e) => Response::error(ErrorKind::Failed, crate::error::report(&e)),
    }
}

/// `understudy reload`: a configuration that does not load leaves the running one in force.
fn reload(d: &Shared) -> Response {
    match load_config(&d.config_path) {
        Ok(mut c) => {
            // The coordinator and the profile repository are made at start.
            let running = d.cfg();
            let kept = c.cluster != running.cluster
                || c.profile.repository_backend != running.profile.repository_backend;
            if kept {
                c.cluster = running.cluster.clone();
                c.profile.repository_backend = running.profile.repository_backend;
                tracing::warn!("[cluster] and profile.repository_backend changed: they take effect at the next start");
            }
            super::apply_ksm(&c);
            *d.cfg.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(c);
            d.events.emit(
                None,
                EventKind::ConfigReloaded {
                    ok: true,
                    error: None,
                },
            );
            ensure_all_shadows(d);
            Response::ok(format!(
                "configuration reloaded from {}{}",
                d.config_path.display(),
                if kept {
                    " ([cluster] and profile.repository_backend take effect at the next start)"
                } else {
                    ""
                }
            ))
        }
        Err(e) => {
            let why = crate::error::report(&e);
            d.events.emit(
                None,
                EventKind::ConfigReloaded {
                    ok: false,
                    error: Some(why.clone()),
                },
            );
            Response::error(
                ErrorKind::BadRequest,
                format!("configuration NOT reloaded, the running one stays:\n{why}"),
            )
        }
    }
}

/// Each service's active domain's disks under its class's roles, by service; services whose
/// active domain cannot be read are left out.
async fn active_disks(
    d: &Shared,
    services: &[super::Service],
) -> std::collections::BTreeMap<String, Vec<DiskPlan>> {
    let wanted: Vec<(String, String, DiskPolicy)> = services
        .iter()
        .map(|s| {
            (
                s.name.clone(),
                s.active.clone(),
                super::profiles::shadow_disks(d, &s.name, &d.class(&s.class)),
            )
        })
        .collect();
    d.hv()
        .run("status: disks", move |hv| {
            let mut out = std::collections::BTreeMap::new();
            for (service, active, policy) in wanted {
                let Ok(xml) = hv.xml(&active, true) else {
                    continue;
                };
                let Ok(dom) = crate::domain_xml::DomainXml::parse(&xml) else {
                    continue;
                };
                if let Ok(layout) = plan_disks(&dom, &policy) {
                    out.insert(service, layout.disks);
                }
            }
            Ok(out)
        })
        .await
        .unwrap_or_default()
}

async fn status(d: &Shared) -> StatusReport {
    let cfg = d.cfg();
    let listing = d.hv().run("status", |hv| hv.list()).await;
    let connected = listing.is_ok();
    let doms = listing.unwrap_or_default();
    let services: Vec<_> = d.table().iter().cloned().collect();
    let pools: Vec<(super::pool::Pool, Vec<String>)> = {
        let limits = d.limits();
        let t = d.table();
        t.pools()
            .map(|p| {
                let covers = t
                    .covered_by_pool(&p.class, limits(&p.class))
                    .iter()
                    .map(|s| s.name.clone())
                    .collect();
                (p.clone(), covers)
            })
            .collect()
    };
    let (beats, (false_failovers, missed_failovers)) = {
        let h = d.health();
        (h.beats().clone(), h.counts())
    };
    let disks = active_disks(d, &services).await;
    let (costs, pool_costs) = {
        let services = services.clone();
        let shadows: Vec<Vec<crate::failover::Shadow>> =
            pools.iter().map(|(p, _)| p.shadows.clone()).collect();
        tokio::task::spawn_blocking(move || {
            (
                super::cost::measure(&services),
                shadows
                    .iter()
                    .map(|s| super::cost::measure_shadows(s))
                    .collect::<Vec<_>>(),
            )
        })
        .await
        .unwrap_or_default()
    };
    let identities = d.prof.identities();
    let service_status: Vec<ServiceStatus> = services
        .iter()
        .zip(&costs)
        .map(|(s, cost)| ServiceStatus {
            disks: disks.get(&s.name).cloned().unwrap_or_default(),
            name: s.name.clone(),
            class: s.class.clone(),
            state: s.state.describe(),
            active: Some(s.active.clone()),
            shadows: cost
                .shadows
                .iter()
                .map(|x| ShadowStatus {
                    name: x.name.clone(),
                    state: x.state,
                    memory: x.memory,
                    share_of_primary_pct: cost.shadow_share_pct(x),
                })
                .collect(),
            last_failover: s.last_failover.clone(),
            health: s.health.clone(),
            last_heartbeat_unix_ms: s.last_heartbeat_unix_ms,
            primary_memory: cost.primary,
            standby_memory_bytes: cost.standby_bytes(),
            standby_share_pct: cost.standby_share_pct(),
            standby_plan: super::tiers::plan(
                d,
                &s.name,
                &cfg.class.get(&s.class).cloned().unwrap_or_default(),
            ),
            identity: identities.get(&s.name).map(|g| g.describe()),
            last_verify: d.verifications.last(&s.name),
        })
        .collect();
    let pool_members: Vec<(String, String)> = pools
        .iter()
        .flat_map(|(p, _)| p.shadows.iter().map(|x| (x.name.clone(), p.name.clone())))
        .collect();
    let pool_status = pools
        .into_iter()
        .zip(pool_costs)
        .map(|((p, covers), costs)| PoolStatus {
            class: p.class,
            name: p.name,
            primaries_per_shadow: p.primaries_per_shadow,
            covers,
            shadows: costs
                .into_iter()
                .map(|x| ShadowStatus {
                    name: x.name,
                    state: x.state,
                    memory: x.memory,
                    share_of_primary_pct: None,
                })
                .collect(),
        })
        .collect();
    super::checks::publish_cost(d, &costs);
    super::checks::publish_gauges(d);
    let domains = doms
        .into_iter()
        .map(|dom| {
            let active = services.iter().find(|s| s.active == dom.name);
            let shadow_of = services
                .iter()
                .find(|s| s.shadows.iter().any(|x| x.name == dom.name));
            let (role, service) = match (active, shadow_of) {
                (Some(s), _) => (Some("primary".to_string()), Some(s.name.clone())),
                (None, Some(s)) => (Some("shadow".to_string()), Some(s.name.clone())),
                (None, None) => pool_members
                    .iter()
                    .find(|(n, _)| *n == dom.name)
                    .map_or((None, None), |(_, pool)| {
                        (Some("pooled".to_string()), Some(pool.clone()))
                    }),
            };
            // Health is only judged for a service's active domain; a retired one keeps its
            // last heartbeat time but no verdict.
            let health = active
                .filter(|_| dom.state.is_active())
                .map(|s| s.health.clone())
                .unwrap_or_else(|| "-".into());
            DomainStatus {
                last_heartbeat_unix_ms: beats.get(&dom.name).copied(),
                health,
                name: dom.name,
                state: dom.state.as_str().to_string(),
                role,
                service,
            }
        })
        .collect();
    StatusReport {
        daemon: DaemonInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            started_unix_ms: d.started_unix_ms,
            libvirt_uri: cfg.daemon.libvirt_uri.clone(),
            connected,
            host: d.coord.host().to_string(),
            capacity: crate::cluster::HostCapacity::read(),
        },
        services: service_status,
        domains,
        false_failovers,
        missed_failovers,
        pools: pool_status,
    }
}
