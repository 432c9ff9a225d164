//! Rebuilding the service table from libvirt and keeping every service's shadows provisioned:
//! what a (re)started daemon does first, and what housekeeping repeats.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::config::NetworkMode;
use crate::domain_xml::{MemberState, Role, UnderstudyMeta, META_NS};
use crate::failover::record::Tier;
use crate::failover::shadow::{
    isolate_tap, live_taps, member_meta, provision, read_routed_sides, shadow_generation,
    write_meta, ShadowRequest,
};
use crate::failover::standby::StandbyMemory;
use crate::failover::{FailoverError, Shadow, ShadowState, Trigger};
use crate::libvirt::{
    lock_connections, qemu_pid, reaped, DomainSummary, LibvirtError, QemuProcess, RunState,
};

use super::checks::repair_taps;
use super::table::{Action, ShadowToProvision};
use super::{launch_promotion, start_failover, Note, Service, ServiceState, Shared};
use crate::cluster::{Claim, OwnerRecord};

/// What libvirt's domains say about the services, before anything is changed.
#[derive(Debug, Default)]
struct Census {
    /// Services by name, with their shadows.
    services: BTreeMap<String, Service>,
    /// Stale primaries to retire: (service, class, domain).
    retire: Vec<(String, String, String)>,
    /// Domains without our metadata.
    untagged: Vec<DomainSummary>,
    /// Shadows of services whose primary is not here (with a cluster: on another host).
    orphans: Vec<(String, Shadow)>,
    /// Verification copies an interrupted run left: (service, domain).
    stale_copies: Vec<(String, String)>,
}

/// Reads the services out of libvirt's domains and their metadata (`None`: untagged).
fn census(listing: Vec<(DomainSummary, Option<String>)>) -> Census {
    let mut c = Census::default();
    let all_names: Vec<String> = listing.iter().map(|(d, _)| d.name.clone()).collect();
    // The rank of each service's primary so far: running beats stopped, then the newer.
    let mut ranks: BTreeMap<String, (bool, u64)> = BTreeMap::new();
    let mut shadows = Vec::new();
    for (dom, meta) in listing {
        let meta = match meta.map(|m| UnderstudyMeta::from_libvirt_xml(&m)) {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                tracing::warn!(domain = %dom.name, error = %crate::error::report(&e), "unreadable understudy metadata; domain ignored");
                continue;
            }
            None => {
                c.untagged.push(dom);
                continue;
            }
        };
        match meta.role {
            Role::Primary => {
                let running = dom.state.is_active();
                let state = match (running, meta.state) {
                    // Started by someone while we were away after an `understudy stop`: it
                    // runs, so it is protected again.
                    (true, _) => ServiceState::Provisioning,
                    (false, MemberState::Stopped) => ServiceState::Stopped,
                    (false, _) => ServiceState::Down {
                        reason: "primary not running at daemon start".into(),
                    },
                };
                // Two primaries of one service: we died between promoting a shadow and
                // retiring the old primary. The running one (else the newer one) is the
                // primary; the other is retired now.
                let rank = (running, meta.generation);
                if let Some(prev) = ranks.get(&meta.service) {
                    let prev_dom = c.services[&meta.service].active.clone();
                    let retire = if rank > *prev {
                        prev_dom
                    } else {
                        dom.name.clone()
                    };
                    tracing::warn!(service = %meta.service, retired = %retire, "two primaries found; retiring the stale one");
                    c.retire
                        .push((meta.service.clone(), meta.class.clone(), retire));
                    if rank <= *prev {
                        continue;
                    }
                }
                ranks.insert(meta.service.clone(), rank);
                c.services.insert(
                    meta.service.clone(),
                    Service::new(&meta.service, &meta.class, &dom.name, state),
                );
            }
            Role::Shadow => shadows.push((meta, dom)),
            // A verification copy outlives only the run that made it.
            Role::Isolated if crate::canary::verify::is_copy(&dom.name) => c
                .stale_copies
                .push((meta.service.clone(), dom.name.clone())),
            // Canary clones belong to `canary`, which cleans them up.
            Role::Retired | Role::Isolated => {}
        }
    }
    for (meta, dom) in shadows {
        let state = match (meta.state, dom.state) {
            (MemberState::Paused, RunState::Paused) => ShadowState::PAUSED,
            // Saved and cold shadows stand by shut off; one found running was being promoted.
            (MemberState::Saved, RunState::Shutoff) => ShadowState::Standby(Tier::Saved),
            (MemberState::Cold, RunState::Shutoff) => ShadowState::Standby(Tier::Cold),
            (MemberState::Saved | MemberState::Cold, RunState::Running) => ShadowState::Promoting,
            (MemberState::Promoting, _) => ShadowState::Promoting,
            // Running with a standby record: we died between resuming it and writing the
            // journal. Treated as an interrupted promotion: finished or undone.
            (MemberState::Paused, RunState::Running) => ShadowState::Promoting,
            _ => ShadowState::Failed,
        };
        let shadow = Shadow {
            name: dom.name.clone(),
            state,
            taps: Vec::new(),
            data_disks: None,
        };
        match c.services.get_mut(&meta.service) {
            Some(svc) => svc.shadows.push(shadow),
            None => c.orphans.push((meta.service.clone(), shadow)),
        }
    }
    // Every generation ever used for a service, retired domains included.
    for svc in c.services.values_mut() {
        svc.last_generation = all_names
            .iter()
            .filter_map(|n| shadow_generation(&svc.name, n))
            .max()
            .unwrap_or(0);
    }
    c
}

/// Rebuilds the service table from libvirt: metadata first, then protection rules for
/// domains we have not tagged yet. Run once at start.
pub(super) async fn reconcile(d: &Shared) {
    let listing = d
        .hv()
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
            tracing::error!(error = %crate::error::report(&e), "cannot list domains");
            return;
        }
    };
    let names: Vec<String> = listing.iter().map(|(d, _)| d.name.clone()).collect();
    let census = census(listing);
    let state_dir = d.cfg().daemon.state_dir.clone();
    for (service, copy) in &census.stale_copies {
        tracing::warn!(%service, %copy, "verification copy left by an interrupted run; removed");
        crate::canary::verify::remove_copy(&d.hv(), &d.net, service, copy, &state_dir).await;
    }
    for (service, class, domain) in census.retire {
        retire_primary(d, &service, &class, &domain).await;
    }
    // The owner records follow what libvirt says runs here, unless another host took the
    // service over while we were away: then the primary here is stale and is retired.
    let me = d.coord.host().clone();
    let mut services = census.services;
    let mut moved = Vec::new();
    for svc in services.values() {
        match d.coord.adopt(&svc.name, &svc.active).await {
            Ok(rec) if rec.host != me => moved.push((svc.class.clone(), rec)),
            Ok(_) => {}
            Err(e) => {
                tracing::error!(service = %svc.name, error = %crate::error::report(&e), "cannot record the service's owner")
            }
        }
    }
    let mut stale = Vec::new();
    for (class, rec) in moved {
        if let Some(svc) = services.remove(&rec.service) {
            tracing::warn!(service = %rec.service, domain = %svc.active, owner = %rec.domain, host = %rec.host, "service is served from another host now; retiring the primary here");
            stale.push((svc, class, rec));
        }
    }
    d.table().adopt(services.into_values());
    for (svc, class, rec) in stale {
        retire_primary(d, &svc.name, &class, &svc.active).await;
        let _ = d
            .table()
            .follow(&rec.service, &class, &rec.domain, &rec.host);
        for s in svc.shadows {
            let _ = d.table().shadow_found(&rec.service, s);
        }
    }
    // Pooled shadows rejoin their class's pool; one found other than paused was being
    // promoted into a service it no longer names (its primary's identity half given): it is
    // destroyed, and the pool provisions a new one. No new pooled shadow reuses the name of a
    // domain there is (promoted ones keep theirs).
    let cfg = d.cfg();
    for (class, c) in &cfg.class {
        if let Some(p) = &c.pool {
            d.table().pool_generations_used(
                class,
                p.primaries_per_shadow,
                names.iter().map(String::as_str),
            );
        }
    }
    let mut orphans = Vec::new();
    for (service, shadow) in census.orphans {
        let pooled = cfg.class.iter().find_map(|(class, c)| {
            c.pool
                .as_ref()
                .filter(|_| super::pool::pool_name(class) == service)
                .map(|p| (class.clone(), p.primaries_per_shadow))
        });
        match pooled {
            Some((class, per)) if shadow.state == ShadowState::PAUSED => {
                tracing::info!(shadow = %shadow.name, pool = %service, "pooled shadow found");
                d.table().pool_shadow_found(&class, per, shadow);
            }
            Some((class, per)) => {
                tracing::warn!(shadow = %shadow.name, pool = %service, state = shadow.state.as_str(), "pooled shadow found mid-promotion; destroyed");
                let name = shadow.name.clone();
                d.table().pool_shadow_found(&class, per, shadow);
                remove_shadow(d, &service, &name).await;
            }
            None => orphans.push((service, shadow)),
        }
    }
    // Shadows of primaries elsewhere join the service they stand in for.
    for (service, shadow) in orphans {
        let spec = match d.coord.spec(&service).await {
            Ok(Some(spec)) if spec.host != me => spec,
            _ => {
                tracing::warn!(shadow = %shadow.name, %service, "shadow of a service without primary; left alone");
                continue;
            }
        };
        let mut t = d.table();
        if t.follow(&service, &spec.class, &spec.domain, &spec.host)
            .is_ok()
        {
            tracing::info!(shadow = %shadow.name, %service, host = %spec.host, "shadow of a primary on another host found");
            let _ = t.shadow_found(&service, shadow);
        }
    }
    // Finish what a previous run left behind, per service.
    let names = d.table().names();
    for name in names {
        recover_service(d, &name).await;
    }
    for dom in census.untagged {
        if let Some((class, _)) = cfg.class_for(&dom.name) {
            protect_new(d, &dom.name, class, dom.state.is_active()).await;
        }
    }
    ensure_all_shadows(d);
}

/// Destroys a primary that no longer serves its service and marks it retired, so that
/// neither we nor a restarted daemon ever run it again.
pub(super) async fn retire_primary(d: &Shared, service: &str, class: &str, domain: &str) {
    let meta = member_meta(service, class, Role::Retired, 0, MemberState::Fenced);
    let dn = domain.to_string();
    let r = d
        .hv()
        .run("retire stale primary", move |hv| {
            if hv.state(&dn)?.is_active() {
                hv.destroy(&dn)?;
            }
            write_meta(hv, &dn, &meta)
        })
        .await;
    match r {
        Ok(()) => tracing::info!(service, domain, "old primary retired"),
        Err(e) => {
            tracing::error!(service, domain, error = %crate::error::report(&e), "cannot retire a stale primary")
        }
    }
}

/// After a restart: settle half-done work of one service.
async fn recover_service(d: &Shared, name: &str) {
    let Some(svc) = d.table().get(name).cloned() else {
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
        if s.state == ShadowState::PAUSED {
            for b in &taps {
                // Belt and braces: a standing-by shadow is never on the bridge.
                let _ = isolate_tap(&d.net, &b.tap).await;
            }
        }
        d.table().set_shadow_taps(name, &s.name, taps);
    }
    let promoting: Vec<String> = svc
        .shadows
        .iter()
        .filter(|s| s.state == ShadowState::Promoting)
        .map(|s| s.name.clone())
        .collect();
    // The owner record (in etcd, with a cluster) may name a shadow here already: a promotion
    // claimed the service, then the daemon died before that shadow served.
    let claimed = claimed_here(d, &svc).await;
    let claimed_shadow = claimed.as_ref().and_then(|r| {
        svc.shadows
            .iter()
            .find(|s| s.name == r.domain && s.state != ShadowState::Failed)
            .map(|s| s.name.clone())
    });
    match svc.state {
        ServiceState::Provisioning => {
            refresh_active(d, name).await;
            // A promotion interrupted by our own death: the primary lives, so undo it.
            for s in &promoting {
                tracing::warn!(service = name, shadow = %s, "interrupted promotion found while primary runs; returning shadow to standby");
                if let Err(e) = repark_shadow(d, name, s).await {
                    tracing::error!(service = name, shadow = %s, error = %crate::error::report(&e), "cannot return shadow to standby; removing it");
                    remove_shadow(d, name, s).await;
                }
            }
            // Undone with its claim: the record names the primary again.
            if let Some(r) = &claimed {
                give_back_here(d, name, &svc.active, r.generation).await;
            }
            if !promoting.is_empty() || claimed.is_some() {
                unfence_primary(d, name, &svc.active).await;
            }
        }
        // The service is this host's already: the claimed shadow, and no other, serves.
        ServiceState::Down { .. } | ServiceState::Elsewhere { .. } if claimed_shadow.is_some() => {
            let shadow = claimed_shadow.expect("checked above");
            finish_claimed(d, name, &svc.active, &shadow).await;
        }
        // Claimed for a domain here that is neither the primary nor a shadow (gone meanwhile):
        // nothing serves, as when a service is given back to a primary here that is gone.
        ServiceState::Elsewhere { .. } if claimed.is_some() => {
            let r = claimed.expect("checked above");
            given_back(d, name, &r.domain).await;
        }
        ServiceState::Down { .. } => {
            // The primary died while we were away (or mid-promotion): promote now, the
            // interrupted shadow first (it stands ready again). The promotion runs every step
            // again: a shadow already running is fine for `resume`, a data disk it already
            // holds is not attached twice (`attach`), and `promote_commands` run again before
            // the network comes up, so a daemon killed between the attach and the network
            // still finishes the hand-over.
            if let Some(s) = promoting.first() {
                // The taps just read from libvirt (`svc` is from before): with none, the
                // promotion would bring no network up, as when the daemon died after the
                // data disk's attach, before `rewire`.
                let taps = d
                    .table()
                    .get(name)
                    .and_then(|v| v.shadows.iter().find(|x| &x.name == s).cloned())
                    .map(|x| x.taps)
                    .unwrap_or_default();
                let _ = d.table().shadow_reparked(name, s, taps);
            }
            start_failover(d, name, &svc.active, Trigger::Recovery, Instant::now());
        }
        _ => {}
    }
}

/// The owner record of `svc` when it names this host and a domain other than the service's
/// active one (a shadow here that a promotion claimed, or a domain given back).
async fn claimed_here(d: &Shared, svc: &Service) -> Option<OwnerRecord> {
    match d.coord.owner(&svc.name).await {
        Ok(Some(r)) if r.host == *d.coord.host() && r.domain != svc.active => Some(r),
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(service = %svc.name, error = %crate::error::report(&e), "owner record unreadable; an interrupted claim is not looked for");
            None
        }
    }
}

/// Gives the service back to `primary` here after a promotion claimed it and was undone.
async fn give_back_here(d: &Shared, service: &str, primary: &str, generation: u64) {
    let claim = Claim {
        service: service.to_string(),
        domain: primary.to_string(),
        expected: generation,
    };
    match d.coord.give_back(claim, d.coord.host()).await {
        Ok(r) => {
            tracing::info!(
                service,
                primary,
                generation = r.generation,
                "interrupted promotion undone: the owner record names the primary again"
            )
        }
        Err(e) => {
            tracing::error!(service, primary, error = %crate::error::report(&e), "cannot give the owner record back to the primary")
        }
    }
}

/// Finishes a promotion that claimed `shadow` before the daemon died: the shadow (back on
/// standby if it was found running) is promoted again from `from`. The claim is not made
/// again (the record names the shadow here already); every other step runs again.
async fn finish_claimed(d: &Shared, service: &str, from: &str, shadow: &str) {
    tracing::warn!(
        service,
        shadow,
        "promotion interrupted after its claim; finishing it"
    );
    let taps = d
        .table()
        .get(service)
        .and_then(|v| v.shadows.iter().find(|x| x.name == shadow).cloned())
        .map(|x| x.taps)
        .unwrap_or_default();
    let _ = d.table().shadow_reparked(service, shadow, taps);
    let start = d.table().begin_claimed_failover(service, from, shadow);
    match start {
        Ok(start) => launch_promotion(d, service, Trigger::Recovery, Instant::now(), start, None),
        Err(e) => {
            tracing::error!(service, shadow, "cannot finish the claimed promotion: {e}")
        }
    }
}

/// An owner record gives `service` to `domain` on this host while the table followed it
/// elsewhere ([`super::Action::GivenBack`]), e.g. another host's promotion failed past its
/// claim and gave it back to the primary this host retired when that claim landed. Acted on
/// only while that record is still in force and `domain` is not running here as a shadow of
/// the service or its primary: then nothing serves, and the service fails over as after a
/// crash (to a shadow here, or through a failure report to the shadows on other hosts).
pub(super) async fn given_back(d: &Shared, service: &str, domain: &str) {
    let me = d.coord.host().clone();
    match d.coord.owner(service).await {
        Ok(Some(r)) if r.domain == domain && r.host == me => {}
        Ok(_) => {
            tracing::debug!(service, domain, "owner record moved on; not a give-back");
            return;
        }
        Err(e) => {
            tracing::warn!(service, domain, error = %crate::error::report(&e), "owner record unreadable; a give-back is not acted on");
            return;
        }
    }
    let dn = domain.to_string();
    let found = d
        .hv()
        .run("read a given-back domain", move |hv| {
            let state = hv.state(&dn)?;
            Ok((state, hv.metadata(&dn, META_NS)?))
        })
        .await;
    match found {
        Err(LibvirtError::NoSuchDomain { .. }) => {}
        Err(e) => {
            tracing::warn!(service, domain, error = %crate::error::report(&e), "given-back domain unreadable; not acted on");
            return;
        }
        Ok((state, meta)) => {
            let meta = meta.and_then(|m| UnderstudyMeta::from_libvirt_xml(&m).ok());
            let role = meta.filter(|m| m.service == service).map(|m| m.role);
            if role == Some(Role::Shadow) || state.is_active() {
                tracing::error!(service, domain, state = state.as_str(), ?role, "the owner record names this domain here, which this host does not run as the service's primary; left as it is");
                return;
            }
        }
    }
    if let Err(e) = d.table().given_back(service, domain) {
        tracing::debug!(service, domain, "give-back not applied: {e}");
        return;
    }
    tracing::warn!(
        service,
        domain,
        "the service was given back to a primary here that does not run; failing over"
    );
    start_failover(d, service, domain, Trigger::Recovery, Instant::now());
}

/// An interrupted switchover may have fenced the primary (paused, taps cut): with the shadow
/// back on standby, the primary serves again.
pub(super) async fn unfence_primary(d: &Shared, service: &str, active: &str) {
    let a = active.to_string();
    let r = d
        .hv()
        .run("unfence primary", move |hv| {
            if hv.state(&a)? == RunState::Paused {
                hv.resume(&a)?;
            }
            Ok(())
        })
        .await;
    if let Err(e) = r {
        tracing::error!(service, error = %crate::error::report(&e), "cannot resume the primary after an interrupted switchover");
    }
    repair_taps(d, service);
}

/// Puts a shadow back on standby: taps off the bridge, paused, metadata paused.
async fn repark_shadow(d: &Shared, service: &str, shadow: &str) -> Result<(), FailoverError> {
    let taps = live_taps(&d.hv(), shadow).await?;
    for b in &taps {
        isolate_tap(&d.net, &b.tap).await?;
    }
    let class = d
        .table()
        .get(service)
        .map(|s| s.class.clone())
        .unwrap_or_default();
    let gen = shadow_generation(service, shadow).unwrap_or(0);
    let s = shadow.to_string();
    let meta = member_meta(service, &class, Role::Shadow, gen, MemberState::Paused);
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
    let _ = d.table().shadow_reparked(service, shadow, taps);
    Ok(())
}

/// Reads the active primary's taps and starts watching its QEMU process.
pub(super) async fn refresh_active(d: &Shared, service: &str) {
    // A primary on another host is its host's to watch.
    let Some(active) = d
        .table()
        .get(service)
        .filter(|s| s.primary_host().is_none())
        .map(|s| s.active.clone())
    else {
        return;
    };
    let mut taps = live_taps(&d.hv(), &active).await.unwrap_or_default();
    if d.class(&svc_class(d, service)).network == NetworkMode::Routed {
        read_routed_sides(&d.net, &active, &mut taps).await;
    }
    for bridge in taps.iter().filter_map(|b| b.bridge.as_deref()) {
        if crate::net::mac_is_fixed(std::path::Path::new("/sys"), bridge) == Some(false) {
            // Not fatal, but it costs every failover an ARP round trip with each client.
            tracing::warn!(service, bridge, "bridge has no fixed MAC: it changes as ports come and go, flushing clients' ARP caches during failovers; set one (ip link set {bridge} address ...)");
        }
    }
    d.table().set_active_taps(service, taps);
    watch_primary(d, service, &active);
}

/// The class of `service` (empty when it is unknown: the default class).
pub(super) fn svc_class(d: &Shared, service: &str) -> String {
    d.table()
        .get(service)
        .map(|s| s.class.clone())
        .unwrap_or_default()
}

/// Opens a pidfd on the primary's QEMU and reports its exit.
pub(super) fn watch_primary(d: &Shared, service: &str, domain: &str) {
    super::profiles::start_collector(d, service, domain);
    let pid = match qemu_pid(std::path::Path::new(crate::libvirt::QEMU_RUN_DIR), domain) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(service, domain, error = %crate::error::report(&e), "no QEMU pid; relying on libvirt events");
            return;
        }
    };
    let proc = match QemuProcess::open(domain, pid) {
        Ok(p) => p,
        Err(LibvirtError::Process { source, .. }) if source.raw_os_error() == Some(libc::ESRCH) => {
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
            tracing::warn!(service, domain, pid, error = %crate::error::report(&e), "no pidfd; relying on libvirt events");
            return;
        }
    };
    // A (re)started primary gets a fresh health history.
    d.health().watch(domain, pid);
    // Its disk leases are handed back at its reap, not after libvirt's and virtlockd's polls.
    let held = match lock_connections(std::path::Path::new("/proc"), proc.pidfd(), pid) {
        Ok(held) if !held.is_empty() => Some((held, d.leases.hold(domain))),
        Ok(_) => None,
        Err(e) => {
            tracing::debug!(service, domain, pid, error = %e, "virtlockd connection not held (needs CAP_SYS_PTRACE); a data disk's handover waits for libvirt");
            None
        }
    };
    tracing::debug!(
        service,
        domain,
        pid,
        leases_held = held.is_some(),
        "watching QEMU process"
    );
    let d = d.clone();
    let (service, domain) = (service.to_string(), domain.to_string());
    tokio::spawn(async move {
        // Heard at the first thread's exit: the process runs no more code from there.
        let how = proc.ended().await;
        tracing::debug!(%service, %domain, pid, ?how, "primary QEMU ending");
        let _ = d.notes.send(Note::PrimaryExited {
            service,
            domain: domain.clone(),
            at: Instant::now(),
        });
        if let Some((conns, report)) = held {
            let gone = reaped(proc.pidfd(), LEASE_REAP_LIMIT).await;
            drop(conns);
            if gone {
                report.released();
            } else {
                tracing::warn!(%domain, pid, "QEMU not reaped within {LEASE_REAP_LIMIT:?}; its virtlockd connection is let go unconfirmed");
            }
        }
    });
}

/// Longest a dead primary's QEMU is waited for to be reaped before its virtlockd connection
/// is let go anyway (libvirt's stop then decides when the disks are free).
const LEASE_REAP_LIMIT: Duration = Duration::from_secs(5);

/// Tags a newly seen matching domain as a service primary and starts protecting it.
/// A domain that is only defined (not running) is registered as a stopped service: it gets
/// shadows once it starts.
pub(super) async fn protect_new(d: &Shared, domain: &str, class: &str, running: bool) {
    if d.table().contains(domain) {
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
        tracing::error!(domain, error = %crate::error::report(&e), "cannot tag primary; not protected");
        return;
    }
    if let Err(e) = d.table().protect(domain, class, running) {
        tracing::debug!(domain, "already protected: {e}");
        return;
    }
    d.events.emit(
        Some(domain),
        crate::events::EventKind::Protected {
            domain: domain.to_string(),
            class: class.to_string(),
        },
    );
    if let Err(e) = d.coord.adopt(domain, domain).await {
        tracing::error!(domain, error = %crate::error::report(&e), "cannot record the service's owner");
    }
    if !running {
        tracing::info!(
            domain,
            class,
            "protecting newly defined primary; shadows follow when it starts"
        );
        return;
    }
    tracing::info!(domain, class, "protecting new primary");
    refresh_active(d, domain).await;
    ensure_all_shadows(d);
}

/// Starts shadow provisioning wherever a service has fewer than its class asks for.
pub(super) fn ensure_all_shadows(d: &Shared) {
    // With a cluster, placement decides which host provisions what.
    if super::crosshost::clustered(d) {
        let d = d.clone();
        tokio::spawn(async move { super::crosshost::place_all(&d).await });
        return;
    }
    // What a class change left behind goes first (pooled shadows of a class no longer
    // pooled, shadows beyond the class's numbers).
    let surplus = d.table().surplus_shadows(d.limits());
    for action in surplus {
        if let Action::RemoveShadow { service, shadow } = action {
            tracing::info!(%service, %shadow, "shadow no longer wanted by the configuration; removed");
            let d = d.clone();
            tokio::spawn(async move { remove_shadow(&d, &service, &shadow).await });
        }
    }
    let planned = d.table().plan_shadows(d.limits(), Instant::now());
    for plan in planned {
        spawn_provision(d, plan, None);
    }
}

/// Provisions the shadow the table reserved, from the primary's definition here, or from
/// `primary_xml` (the published spec of a primary on another host).
pub(super) fn spawn_provision(d: &Shared, plan: ShadowToProvision, primary_xml: Option<String>) {
    let cfg = d.cfg();
    let c = d.class(&plan.class);
    // A pooled shadow is cloned from the class's golden template, not from a primary.
    let primary = match (&c.pool, plan.pooled) {
        (Some(pool), true) => pool.template.clone(),
        _ => plan.primary,
    };
    let req = ShadowRequest {
        disks: super::profiles::shadow_disks(d, &plan.service, &c),
        service: plan.service.clone(),
        class: plan.class,
        primary,
        primary_xml,
        pooled: plan.pooled,
        name: plan.name.clone(),
        generation: plan.generation,
        state_dir: cfg.daemon.state_dir.clone(),
        boot_timeout: Duration::from_secs(c.shadow_boot_timeout_s),
        agent_timeout: Duration::from_millis(cfg.monitor.agent_timeout_ms),
        agent_max_reply: cfg.monitor.agent_max_reply_bytes,
        // Changes promoted from canaries first: every new shadow carries them.
        warmup: [
            super::canary::promoted_steps(d, &plan.service),
            c.warmup_commands.clone(),
        ]
        .concat(),
        standby: StandbyMemory {
            shrink: c.standby_shrink,
            idle_use_kib: c
                .standby_shrink
                .then(|| super::profiles::idle_memory_kib(d, &plan.service))
                .flatten(),
            reclaim: c.standby_reclaim,
            free_page_reporting: c.free_page_reporting,
            ksm: c.ksm,
        },
        tier: super::tiers::provision_tier(d, &plan.service, &c),
    };
    let d = d.clone();
    tokio::spawn(async move {
        tracing::info!(service = %plan.service, shadow = %plan.name, "provisioning shadow");
        let result = provision(&d.hv(), &d.net, req).await;
        let _ = d.notes.send(Note::ShadowDone {
            service: plan.service,
            name: plan.name,
            result,
        });
    });
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
            tracing::warn!(service, shadow, error = %crate::error::report(&e), "cannot remove shadow")
        }
    }
    let disks = d.cfg().daemon.state_dir.join("disks");
    if let Ok(entries) = std::fs::read_dir(&disks) {
        let prefix = format!("{shadow}-");
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    d.table().shadow_removed(service, shadow);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dom(name: &str, state: RunState) -> DomainSummary {
        DomainSummary {
            name: name.into(),
            uuid: String::new(),
            state,
            persistent: true,
        }
    }

    fn meta(service: &str, role: Role, generation: u64, state: MemberState) -> Option<String> {
        Some(member_meta(service, "c", role, generation, state).to_libvirt_xml())
    }

    #[test]
    fn census_reads_primaries_shadows_and_untagged_domains() {
        let c = census(vec![
            (
                dom("web", RunState::Running),
                meta("web", Role::Primary, 0, MemberState::Active),
            ),
            (
                dom("web-shadow-2", RunState::Paused),
                meta("web", Role::Shadow, 2, MemberState::Paused),
            ),
            (
                dom("web-shadow-3", RunState::Running),
                meta("web", Role::Shadow, 3, MemberState::Paused),
            ),
            (
                dom("web-shadow-1", RunState::Shutoff),
                meta("web", Role::Retired, 0, MemberState::Fenced),
            ),
            (
                dom("db", RunState::Shutoff),
                meta("db", Role::Primary, 0, MemberState::Stopped),
            ),
            (
                dom("mail", RunState::Shutoff),
                meta("mail", Role::Primary, 0, MemberState::Active),
            ),
            (dom("other", RunState::Running), None),
            (
                dom("garbage", RunState::Running),
                Some("<not-ours/>".into()),
            ),
        ]);
        let web = &c.services["web"];
        assert_eq!(web.state, ServiceState::Provisioning);
        let states: Vec<_> = web
            .shadows
            .iter()
            .map(|s| (s.name.as_str(), s.state))
            .collect();
        assert_eq!(
            states,
            [
                ("web-shadow-2", ShadowState::PAUSED),
                // Running with a standby record: an interrupted promotion.
                ("web-shadow-3", ShadowState::Promoting)
            ]
        );
        assert_eq!(web.last_generation, 3);
        assert_eq!(c.services["db"].state, ServiceState::Stopped);
        assert_eq!(c.services["mail"].state.label(), "down");
        let untagged: Vec<_> = c.untagged.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(untagged, ["other"]);
        assert!(c.retire.is_empty());
    }

    #[test]
    fn census_keeps_the_running_or_newer_of_two_primaries() {
        let c = census(vec![
            (
                dom("web-shadow-4", RunState::Running),
                meta("web", Role::Primary, 4, MemberState::Active),
            ),
            (
                dom("web", RunState::Running),
                meta("web", Role::Primary, 0, MemberState::Active),
            ),
        ]);
        assert_eq!(c.services["web"].active, "web-shadow-4");
        assert_eq!(c.retire, [("web".into(), "c".into(), "web".into())]);
        let c = census(vec![
            (
                dom("web", RunState::Running),
                meta("web", Role::Primary, 0, MemberState::Active),
            ),
            (
                dom("web-shadow-4", RunState::Shutoff),
                meta("web", Role::Primary, 4, MemberState::Active),
            ),
        ]);
        assert_eq!(c.services["web"].active, "web");
        assert_eq!(c.retire[0].2, "web-shadow-4");
    }
}
