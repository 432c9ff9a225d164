//! Control-socket requests: status, switchover, stop/start, shadow rebuild, reload; profile
//! requests and `shadow reinit --golden` are answered in `profiles`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::api::protocol::{
    DaemonInfo, DomainStatus, ErrorKind, Request, Response, ServiceStatus, ShadowStatus,
    StatusReport,
};
use crate::domain_xml::{MemberState, Role};
use crate::failover::promote::Trigger;
use crate::failover::shadow::{member_meta, shadow_generation, write_meta};
use crate::failover::ServiceState;

use super::*;

pub(super) fn unknown_service(d: &Shared, name: &str) -> Response {
    let known: Vec<String> = d.services().keys().cloned().collect();
    Response::Error {
        kind: ErrorKind::NotFound,
        message: format!(
            "no service named '{name}'; known services: {}",
            if known.is_empty() {
                "(none)".to_string()
            } else {
                known.join(", ")
            }
        ),
    }
}

pub(super) async fn handle_request(d: &Shared, req: Request) -> Response {
    match req {
        Request::Status => Response::Status(status(d).await),
        Request::Failover { service } => {
            let Some(svc) = d.services().get(&service).cloned() else {
                return unknown_service(d, &service);
            };
            if svc.ready_shadow().is_none() {
                return Response::Error {
                    kind: ErrorKind::Conflict,
                    message: format!(
                        "service '{service}' has no paused shadow ready (state {})",
                        svc.state.label()
                    ),
                };
            }
            if !matches!(
                svc.state,
                ServiceState::Provisioning | ServiceState::Protected
            ) {
                return Response::Error {
                    kind: ErrorKind::Conflict,
                    message: format!(
                        "service '{service}' is {}; no switchover now",
                        svc.state.label()
                    ),
                };
            }
            start_failover(d, &service, &svc.active, Trigger::Manual, Instant::now());
            wait_failover(
                d,
                &service,
                svc.last_failover.as_ref().map(|r| r.at_unix_ms),
            )
            .await
        }
        Request::Stop { service } => {
            let Some(svc) = d.services().get(&service).cloned() else {
                return unknown_service(d, &service);
            };
            if let Some(s) = d.services().get_mut(&service) {
                s.state = ServiceState::Stopped;
            }
            let meta = member_meta(
                &service,
                &svc.class,
                Role::Primary,
                shadow_generation(&service, &svc.active).unwrap_or(0),
                MemberState::Stopped,
            );
            let a = svc.active.clone();
            match d
                .hv()
                .run("stop", move |hv| {
                    write_meta(hv, &a, &meta)?;
                    hv.destroy(&a)
                })
                .await
            {
                Ok(()) => Response::Ok {
                    message: format!(
                        "service '{service}' stopped ({} shut off); shadows keep standing by",
                        svc.active
                    ),
                },
                Err(e) => Response::Error {
                    kind: ErrorKind::Failed,
                    message: format!("{e}: {}", crate::error_chain(&e)),
                },
            }
        }
        Request::Start { service } => {
            let Some(svc) = d.services().get(&service).cloned() else {
                return unknown_service(d, &service);
            };
            let meta = member_meta(
                &service,
                &svc.class,
                Role::Primary,
                shadow_generation(&service, &svc.active).unwrap_or(0),
                MemberState::Active,
            );
            let a = svc.active.clone();
            if let Some(s) = d.services().get_mut(&service) {
                s.state = ServiceState::Provisioning;
            }
            match d
                .hv()
                .run("start", move |hv| {
                    write_meta(hv, &a, &meta)?;
                    if !hv.state(&a)?.is_active() {
                        hv.start(&a, false)?;
                    }
                    Ok(())
                })
                .await
            {
                Ok(()) => {
                    refresh_active(d, &service).await;
                    Response::Ok {
                        message: format!("service '{service}' started on {}", svc.active),
                    }
                }
                Err(e) => Response::Error {
                    kind: ErrorKind::Failed,
                    message: format!("{e}: {}", crate::error_chain(&e)),
                },
            }
        }
        Request::ShadowReinit {
            service,
            golden: true,
        } => super::profiles::reinit_golden(d, &service).await,
        Request::ShadowRebuild { service } | Request::ShadowReinit { service, .. } => {
            let Some(svc) = d.services().get(&service).cloned() else {
                return unknown_service(d, &service);
            };
            super::profiles::forget_golden(d, &service);
            for s in &svc.shadows {
                remove_shadow(d, &service, &s.name).await;
            }
            if let Some(s) = d.services().get_mut(&service) {
                if matches!(
                    s.state,
                    ServiceState::Protected | ServiceState::Unprotectable(_)
                ) {
                    s.state = ServiceState::Provisioning;
                }
            }
            ensure_all_shadows(d);
            Response::Ok {
                message: format!(
                    "service '{service}': {} shadow(s) removed; new ones are being provisioned",
                    svc.shadows.len()
                ),
            }
        }
        Request::ProfileShow { .. }
        | Request::ProfileHistory { .. }
        | Request::ProfileDiff { .. }
        | Request::ProfileRollback { .. }
        | Request::ProfileAccuracy { .. } => super::profiles::handle_request(d, req).await,
        Request::ReloadConfig => match load_config(&d.config_path) {
            Ok(c) => {
                *d.cfg.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(c);
                ensure_all_shadows(d);
                Response::Ok {
                    message: format!("configuration reloaded from {}", d.config_path.display()),
                }
            }
            Err(e) => Response::Error {
                kind: ErrorKind::BadRequest,
                message: format!(
                    "configuration NOT reloaded, the running one stays:\n{e}: {}",
                    crate::error_chain(&e)
                ),
            },
        },
        other => Response::Error {
            kind: ErrorKind::BadRequest,
            message: format!("{other:?} is not available in this daemon build"),
        },
    }
}

/// Waits until the service's failover record changes, then reports it.
pub(super) async fn wait_failover(d: &Shared, service: &str, previous: Option<u64>) -> Response {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let svc = d.services().get(service).cloned();
        if let Some(svc) = svc {
            if svc.state != ServiceState::FailingOver {
                if let Some(r) = svc.last_failover.filter(|r| Some(r.at_unix_ms) != previous) {
                    return if r.ok {
                        Response::Json(serde_json::to_value(&r).unwrap_or_default())
                    } else {
                        Response::Error {
                            kind: ErrorKind::Failed,
                            message: r.error.unwrap_or_default(),
                        }
                    };
                }
            }
        }
    }
    Response::Error {
        kind: ErrorKind::Failed,
        message: format!("switchover of '{service}' did not finish within 60 s"),
    }
}

pub(super) async fn status(d: &Shared) -> StatusReport {
    let cfg = d.cfg();
    let listing = d.hv().run("status", |hv| hv.list()).await;
    let connected = listing.is_ok();
    let doms = listing.unwrap_or_default();
    let services = d.services().values().cloned().collect::<Vec<_>>();
    let beats = d
        .heartbeats
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let service_status: Vec<ServiceStatus> = services
        .iter()
        .map(|s| ServiceStatus {
            name: s.name.clone(),
            class: s.class.clone(),
            state: match &s.state {
                ServiceState::Down(r) | ServiceState::Unprotectable(r) => {
                    format!("{}: {r}", s.state.label())
                }
                other => other.label().to_string(),
            },
            active: Some(s.active.clone()),
            shadows: s
                .shadows
                .iter()
                .map(|x| ShadowStatus {
                    name: x.name.clone(),
                    state: x.state,
                })
                .collect(),
            last_failover: s.last_failover.clone(),
            health: s.health.clone(),
            last_heartbeat_unix_ms: s.last_heartbeat_unix_ms,
        })
        .collect();
    d.metrics.observe_services(&services);
    let domains = doms
        .into_iter()
        .map(|dom| {
            let (role, service) = services
                .iter()
                .find_map(|s| {
                    if s.active == dom.name {
                        Some(("primary".to_string(), s.name.clone()))
                    } else {
                        s.shadows
                            .iter()
                            .find(|x| x.name == dom.name)
                            .map(|_| ("shadow".to_string(), s.name.clone()))
                    }
                })
                .map(|(r, s)| (Some(r), Some(s)))
                .unwrap_or((None, None));
            // Health is only judged for a service's active domain; a retired one keeps its
            // last heartbeat time but no verdict.
            let active = role.as_deref() == Some("primary");
            let health = services
                .iter()
                .find(|s| s.active == dom.name)
                .map(|s| s.health.clone())
                .filter(|_| active && dom.state.is_active())
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
        },
        services: service_status,
        domains,
        false_failovers: d.false_failovers.load(std::sync::atomic::Ordering::Relaxed),
        missed_failovers: d
            .missed_failovers
            .load(std::sync::atomic::Ordering::Relaxed),
    }
}
