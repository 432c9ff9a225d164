//! Rebuilding the service table from libvirt and keeping every service's shadows provisioned:
//! what a (re)started daemon does first, and what housekeeping repeats.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::api::protocol::ShadowState;
use crate::domain_xml::{MemberState, Role, UnderstudyMeta, META_NS};
use crate::failover::promote::Trigger;
use crate::failover::shadow::{
    isolate_tap, live_taps, member_meta, provision, shadow_generation, shadow_name, write_meta,
    ShadowRequest,
};
use crate::failover::{FailoverError, Service, ServiceState, Shadow};
use crate::libvirt::{qemu_pid, LibvirtError, QemuProcess, RunState};

use super::*;

/// Rebuilds the service table from libvirt: metadata first, then protection rules for
/// domains we have not tagged yet. Safe to run at any time.
pub(super) async fn reconcile(d: &Shared) {
    let hv = d.hv();
    let listing = hv
        .run("reconcile", |hv| {
            let mut out = Vec::new();
            for dom in hv.list()? {
                let meta = hv.metadata(&dom.name, META_NS).ok().flatten();
                out.push((dom, meta));
            }
            Ok(out)
        })
        .await;
    let listing = match listing {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, cause = %crate::error_chain(&e), "cannot list domains");
            return;
        }
    };
    let cfg = d.cfg();
    let mut found: BTreeMap<String, Service> = BTreeMap::new();
    let mut shadows: Vec<(UnderstudyMeta, crate::libvirt::DomainSummary)> = Vec::new();
    let mut untagged = Vec::new();
    let all_names: Vec<String> = listing.iter().map(|(d, _)| d.name.clone()).collect();
    let mut primaries: BTreeMap<String, (String, (bool, u64))> = BTreeMap::new();
    let mut to_retire: Vec<(String, String, String)> = Vec::new();
    for (dom, meta) in listing {
        let meta = match meta.map(|m| UnderstudyMeta::from_libvirt_xml(&m)) {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                tracing::warn!(domain = %dom.name, error = %e, "unreadable understudy metadata; domain ignored");
                continue;
            }
            None => {
                untagged.push(dom);
                continue;
            }
        };
        match meta.role {
            Role::Primary => {
                let state = match (dom.state.is_active(), meta.state) {
                    // Started by someone while we were away after an `understudy stop`: it
                    // runs, so it is protected again.
                    (true, _) => ServiceState::Provisioning,
                    (false, MemberState::Stopped) => ServiceState::Stopped,
                    (false, _) => ServiceState::Down("primary not running at daemon start".into()),
                };
                // Two primaries of one service: we died between promoting a shadow and
                // retiring the old primary. The running one (else the newer one) is the
                // primary; the other is retired now.
                let candidate = (dom.state.is_active(), meta.generation);
                if let Some((prev_dom, prev_rank)) = primaries.get(&meta.service).cloned() {
                    let (keep, retire) = if candidate > prev_rank {
                        (dom.name.clone(), prev_dom)
                    } else {
                        (prev_dom, dom.name.clone())
                    };
                    tracing::warn!(service = %meta.service, primary = %keep, retired = %retire, "two primaries found; retiring the stale one");
                    to_retire.push((meta.service.clone(), meta.class.clone(), retire));
                    if keep != dom.name {
                        continue;
                    }
                }
                primaries.insert(meta.service.clone(), (dom.name.clone(), candidate));
                found.insert(
                    meta.service.clone(),
                    new_service(&meta.service, &meta.class, &dom.name, state),
                );
            }
            Role::Shadow => shadows.push((meta, dom)),
            Role::Retired => {}
        }
    }
    for (meta, dom) in shadows {
        let Some(svc) = found.get_mut(&meta.service) else {
            tracing::warn!(shadow = %dom.name, service = %meta.service, "shadow of a service without primary; left alone");
            continue;
        };
        let state = match (meta.state, dom.state) {
            (MemberState::Paused, RunState::Paused) => ShadowState::Paused,
            (MemberState::Promoting, _) => ShadowState::Promoting,
            // Running with a standby record: we died between resuming it and writing the
            // journal. Treated as an interrupted promotion: finished or undone below.
            (MemberState::Paused, RunState::Running) => ShadowState::Promoting,
            _ => ShadowState::Failed,
        };
        svc.shadows.push(Shadow {
            name: dom.name.clone(),
            state,
            taps: Vec::new(),
        });
    }
    for (service, class, domain) in to_retire {
        let meta = member_meta(&service, &class, Role::Retired, 0, MemberState::Fenced);
        let r = d
            .hv()
            .run("retire stale primary", move |hv| {
                hv.destroy(&domain)?;
                write_meta(hv, &domain, &meta)
            })
            .await;
        if let Err(e) = r {
            tracing::error!(%service, error = %e, "cannot retire a stale primary");
        }
    }
    // Every generation ever used for a service, retired domains included.
    for svc in found.values_mut() {
        svc.last_generation = all_names
            .iter()
            .filter_map(|n| shadow_generation(&svc.name, n))
            .max()
            .unwrap_or(0);
    }
    {
        let mut services = d.services();
        for (name, svc) in found {
            services.entry(name).or_insert(svc);
        }
    }
    // Finish what a previous run left behind, per service.
    let names: Vec<String> = d.services().keys().cloned().collect();
    for name in names {
        recover_service(d, &name).await;
    }
    for dom in untagged {
        if let Some((class, _)) = cfg.class_for(&dom.name) {
            protect_new(d, &dom.name, class, dom.state.is_active()).await;
        }
    }
    ensure_all_shadows(d);
}

pub(super) fn new_service(name: &str, class: &str, active: &str, state: ServiceState) -> Service {
    Service {
        name: name.to_string(),
        class: class.to_string(),
        state,
        active: active.to_string(),
        active_taps: Vec::new(),
        shadows: Vec::new(),
        last_failover: None,
        last_heartbeat_unix_ms: None,
        health: "unknown".into(),
        promote_attempts: 0,
        last_generation: 0,
        provision_failures: 0,
        provision_not_before: None,
    }
}

/// After a restart: settle half-done work of one service.
pub(super) async fn recover_service(d: &Shared, name: &str) {
    let Some(svc) = d.services().get(name).cloned() else {
        return;
    };
    // Shadows that were mid-provisioning or broken are removed and will be made again.
    for s in svc
        .shadows
        .iter()
        .filter(|s| s.state == ShadowState::Failed)
    {
        tracing::warn!(service = name, shadow = %s.name, "shadow found incomplete after restart; recreating");
        remove_shadow(d, name, &s.name).await;
    }
    // Refresh taps of paused shadows and of the active primary.
    for s in svc
        .shadows
        .iter()
        .filter(|s| s.state != ShadowState::Failed)
    {
        let taps = live_taps(&d.hv(), &s.name).await.unwrap_or_default();
        for b in &taps {
            if s.state == ShadowState::Paused {
                // Belt and braces: a standing-by shadow is never on the bridge.
                let _ = isolate_tap(&d.net, &b.tap).await;
            }
        }
        if let Some(x) = d
            .services()
            .get_mut(name)
            .and_then(|v| v.shadows.iter_mut().find(|x| x.name == s.name))
        {
            x.taps = taps;
        }
    }
    match svc.state {
        ServiceState::Provisioning => {
            refresh_active(d, name).await;
            // A promotion interrupted by our own death: the primary lives, so undo it.
            let promoting: Vec<String> = svc
                .shadows
                .iter()
                .filter(|s| s.state == ShadowState::Promoting)
                .map(|s| s.name.clone())
                .collect();
            let interrupted = !promoting.is_empty();
            for s in promoting {
                tracing::warn!(service = name, shadow = %s, "interrupted promotion found while primary runs; returning shadow to standby");
                if let Err(e) = repark_shadow(d, name, &s).await {
                    tracing::error!(service = name, shadow = %s, error = %e, "cannot return shadow to standby; removing it");
                    remove_shadow(d, name, &s).await;
                }
            }
            if interrupted {
                // An interrupted switchover may have fenced the primary (paused, taps cut):
                // with the shadow back on standby, the primary serves again.
                let active = svc.active.clone();
                let r = d
                    .hv()
                    .run("unfence primary", move |hv| {
                        if hv.state(&active)? == RunState::Paused {
                            hv.resume(&active)?;
                        }
                        Ok(())
                    })
                    .await;
                if let Err(e) = r {
                    tracing::error!(service = name, error = %e, "cannot resume the primary after an interrupted switchover");
                }
                repair_taps(d, name);
            }
        }
        ServiceState::Down(_) => {
            // The primary died while we were away (or mid-promotion): promote now.
            let pending = svc
                .shadows
                .iter()
                .find(|s| s.state == ShadowState::Promoting)
                .map(|s| s.name.clone());
            if let Some(s) = pending {
                if let Some(x) = d
                    .services()
                    .get_mut(name)
                    .and_then(|v| v.shadows.iter_mut().find(|x| x.name == s))
                {
                    x.state = ShadowState::Paused;
                }
            }
            start_failover(d, name, &svc.active, Trigger::Recovery, Instant::now());
        }
        _ => {}
    }
}

/// Puts a shadow back on standby: taps off the bridge, paused, metadata paused.
pub(super) async fn repark_shadow(
    d: &Shared,
    service: &str,
    shadow: &str,
) -> Result<(), FailoverError> {
    let taps = live_taps(&d.hv(), shadow).await?;
    for b in &taps {
        isolate_tap(&d.net, &b.tap).await?;
    }
    let (svc_class, gen) = {
        let services = d.services();
        let class = services
            .get(service)
            .map(|s| s.class.clone())
            .unwrap_or_default();
        (class, shadow_generation(service, shadow).unwrap_or(0))
    };
    let s = shadow.to_string();
    let meta = member_meta(service, &svc_class, Role::Shadow, gen, MemberState::Paused);
    d.hv()
        .run("repark", move |hv| {
            if hv.state(&s)? == RunState::Running {
                hv.suspend(&s)?;
            }
            write_meta(hv, &s, &meta)
        })
        .await
        .map_err(|source| FailoverError::Libvirt {
            step: "repark shadow",
            source,
        })?;
    if let Some(x) = d
        .services()
        .get_mut(service)
        .and_then(|v| v.shadows.iter_mut().find(|x| x.name == shadow))
    {
        x.state = ShadowState::Paused;
        x.taps = taps;
    }
    Ok(())
}

/// Reads the active primary's taps and starts watching its QEMU process.
pub(super) async fn refresh_active(d: &Shared, service: &str) {
    let Some(active) = d.services().get(service).map(|s| s.active.clone()) else {
        return;
    };
    let bridges = live_taps(&d.hv(), &active).await.unwrap_or_default();
    if let Some(s) = d.services().get_mut(service) {
        for bridge in bridges.iter().filter_map(|b| b.bridge.as_deref()) {
            if crate::net::mac_is_fixed(std::path::Path::new("/sys"), bridge) == Some(false) {
                // Not fatal, but it costs every failover an ARP round trip with each client.
                tracing::warn!(service, bridge, "bridge has no fixed MAC: it changes as ports come and go, flushing clients' ARP caches during failovers; set one (ip link set {bridge} address ...)");
            }
        }
        s.active_taps = bridges;
    }
    watch_primary(d, service, &active);
}

/// Opens a pidfd on the primary's QEMU and reports its exit.
pub(super) fn watch_primary(d: &Shared, service: &str, domain: &str) {
    super::profiles::start_collector(d, service, domain);
    let pid = match qemu_pid(std::path::Path::new(crate::libvirt::QEMU_RUN_DIR), domain) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(service, domain, error = %crate::error_chain(&e), "no QEMU pid; relying on libvirt events");
            return;
        }
    };
    let proc = match QemuProcess::open(domain, pid) {
        Ok(p) => p,
        Err(crate::libvirt::LibvirtError::Process { source, .. })
            if source.raw_os_error() == Some(libc::ESRCH) =>
        {
            // The pid libvirt recorded is gone already: libvirt has not caught up with a
            // death (e.g. we restarted right after a crash). That is an exit, seen now.
            tracing::warn!(service, domain, pid, "primary QEMU already gone");
            let _ = d.notes.send(Note::PrimaryExited {
                service: service.to_string(),
                domain: domain.to_string(),
                at: Instant::now(),
            });
            return;
        }
        Err(e) => {
            tracing::warn!(service, domain, pid, error = %crate::error_chain(&e), "no pidfd; relying on libvirt events");
            return;
        }
    };
    d.pids
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(domain.to_string(), pid);
    // A (re)started primary gets a fresh health history.
    d.trackers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(domain);
    let notes = d.notes.clone();
    let (service, domain) = (service.to_string(), domain.to_string());
    tracing::debug!(%service, %domain, pid, "watching QEMU process");
    tokio::spawn(async move {
        proc.exited().await;
        let _ = notes.send(Note::PrimaryExited {
            service,
            domain,
            at: Instant::now(),
        });
    });
}

/// Tags a newly seen matching domain as a service primary and starts protecting it.
/// A domain that is only defined (not running) is registered as a stopped service: it gets
/// shadows once it starts.
pub(super) async fn protect_new(d: &Shared, domain: &str, class: &str, running: bool) {
    if d.services().contains_key(domain) {
        return;
    }
    let state = if running {
        MemberState::Active
    } else {
        MemberState::Stopped
    };
    let meta = member_meta(domain, class, Role::Primary, 0, state);
    let dn = domain.to_string();
    if let Err(e) = d
        .hv()
        .run("tag primary", move |hv| write_meta(hv, &dn, &meta))
        .await
    {
        tracing::error!(domain, error = %e, cause = %crate::error_chain(&e), "cannot tag primary; not protected");
        return;
    }
    if !running {
        tracing::info!(
            domain,
            class,
            "protecting newly defined primary; shadows follow when it starts"
        );
        d.services().insert(
            domain.to_string(),
            new_service(domain, class, domain, ServiceState::Stopped),
        );
        return;
    }
    tracing::info!(domain, class, "protecting new primary");
    d.services().insert(
        domain.to_string(),
        new_service(domain, class, domain, ServiceState::Provisioning),
    );
    refresh_active(d, domain).await;
    ensure_all_shadows(d);
}

/// Starts shadow provisioning wherever a service has fewer than its class asks for.
pub(super) fn ensure_all_shadows(d: &Shared) {
    let cfg = d.cfg();
    let mut to_start = Vec::new();
    {
        let mut services = d.services();
        for svc in services.values_mut() {
            // A service that is down still gets shadows: a new one is how it comes back
            // (promoted as soon as it is ready), within the class's retry limit.
            let class = cfg.class.get(&svc.class).cloned().unwrap_or_default();
            let down_retry = matches!(svc.state, ServiceState::Down(_))
                && svc.promote_attempts <= class.promote_retry_limit;
            if !(matches!(
                svc.state,
                ServiceState::Provisioning | ServiceState::Protected
            ) || down_retry)
            {
                continue;
            }
            if svc.provision_not_before.is_some_and(|t| Instant::now() < t) {
                continue;
            }
            let want = (class.shadows as usize).max(usize::from(down_retry));
            let have = svc
                .shadows
                .iter()
                .filter(|s| matches!(s.state, ShadowState::Booting | ShadowState::Paused))
                .count();
            if have >= want {
                if !down_retry && svc.shadows.iter().all(|s| s.state == ShadowState::Paused) {
                    svc.state = ServiceState::Protected;
                }
                continue;
            }
            if !down_retry {
                svc.state = ServiceState::Provisioning;
            }
            // Generations only grow: a rebuilt or replaced shadow never reuses a name.
            let next = svc
                .shadows
                .iter()
                .filter_map(|s| shadow_generation(&svc.name, &s.name))
                .chain(shadow_generation(&svc.name, &svc.active))
                .chain([svc.last_generation])
                .max()
                .unwrap_or(0)
                + 1;
            svc.last_generation = next;
            let name = shadow_name(&svc.name, next);
            svc.shadows.push(Shadow {
                name: name.clone(),
                state: ShadowState::Booting,
                taps: Vec::new(),
            });
            to_start.push((
                svc.name.clone(),
                svc.class.clone(),
                svc.active.clone(),
                name,
                next,
            ));
        }
    }
    for (service, class, primary, name, generation) in to_start {
        let c = d.class(&class);
        let req = ShadowRequest {
            service: service.clone(),
            class,
            primary,
            name: name.clone(),
            generation,
            state_dir: cfg.daemon.state_dir.clone(),
            boot_timeout: Duration::from_secs(c.shadow_boot_timeout_s),
            agent_timeout: Duration::from_millis(cfg.monitor.agent_timeout_ms),
            agent_max_reply: cfg.monitor.agent_max_reply_bytes,
            warmup: c.warmup_commands.clone(),
            golden_image: super::profiles::golden_image(d, &service, &c),
        };
        let d2 = d.clone();
        tokio::spawn(async move {
            tracing::info!(%service, shadow = %name, "provisioning shadow");
            let r = provision(&d2.hv(), &d2.net, req).await;
            let unprotectable = matches!(
                r,
                Err(FailoverError::Clone { .. }) | Err(FailoverError::Xml { .. })
            );
            let result = r.map_err(|e| format!("{e}: {}", crate::error_chain(&e)));
            let _ = d2.notes.send(Note::ShadowDone {
                service,
                name,
                result,
                unprotectable,
            });
        });
    }
}

/// Destroys and undefines a shadow and drops it from the table.
pub(super) async fn remove_shadow(d: &Shared, service: &str, shadow: &str) {
    let s = shadow.to_string();
    let r = d
        .hv()
        .run("remove shadow", move |hv| {
            hv.destroy(&s)?;
            hv.undefine(&s)
        })
        .await;
    match r {
        Ok(()) | Err(LibvirtError::NoSuchDomain { .. }) => {}
        Err(e) => {
            tracing::warn!(service, shadow, error = %e, cause = %crate::error_chain(&e), "cannot remove shadow")
        }
    }
    let disks = d.cfg().daemon.state_dir.join("disks");
    if let Ok(entries) = std::fs::read_dir(&disks) {
        for e in entries.flatten() {
            if e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{shadow}-"))
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    if let Some(svc) = d.services().get_mut(service) {
        svc.shadows.retain(|x| x.name != shadow);
    }
}
