//! What the other hosts' records ask of this one, with a `[cluster]` (without one, nothing
//! here runs and the daemon is the single-host daemon it always was).
//!
//! - **Following**: a primary published by another host ([`ClusterEvent::Spec`]) becomes a
//!   service [`ServiceState::Elsewhere`] here; other hosts' shadow registrations are its
//!   remote shadows; a new owner record retires a primary here that no longer serves
//!   ([`ServiceTable::owner_changed`](super::ServiceTable::owner_changed)).
//! - **Taking over**: a failure report from a primary's host ([`ClusterEvent::Failure`]) about
//!   the owner in force makes a host with a ready shadow promote it. Every such host may try;
//!   the owner record's compare-and-swap lets exactly one win, the others keep their shadows
//!   paused. The primary's own host reports only when it cannot recover locally (no ready
//!   shadow here), so a crash under `spread` is still served by the local shadow.
//! - **Placement**: every host computes the same [`placement::place`] over the same records
//!   (hosts, specs, shadow registrations) and provisions only what falls to itself, one shadow
//!   per service and round; misplaced shadows here are removed once nothing is missing.
//! - **Handover and drain**: `failover --to-host H` on the primary's host fences the primary
//!   here (cut off its bridge, paused; with data disks, stopped), then reports it for host H,
//!   which claims and promotes; if H has not claimed within [`HANDOVER_WAIT`] the primary here
//!   serves again. A draining host hands every primary it runs to a ready shadow elsewhere.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tokio::sync::broadcast;

use crate::cluster::placement::{self, ExistingShadow, HostView, Ledger, ServiceLayout};
use crate::cluster::{
    ClusterEvent, FailureReport, HostCapacity, HostId, HostState, Mode, PrimarySpec, ShadowStatus,
};
use crate::domain_xml::DomainXml;
use crate::failover::plan::DiskPolicy;
use crate::failover::shadow::{isolate_tap, shadow_generation};
use crate::failover::{ShadowState, Trigger};
use crate::libvirt::RunState;

use super::table::{HandoverStart, RemoteShadow};
use super::{execute, recover, start_failover, ServiceState, Shared};

/// How long a handover waits for the other host to claim the service.
pub(super) const HANDOVER_WAIT: Duration = Duration::from_secs(30);

/// One placement round at a time: two at once would both count a shadow as missing.
static PLACING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
/// One drain at a time; a drain that left primaries behind (no ready shadow elsewhere yet)
/// is tried again by later placement rounds.
static DRAINING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Whether this host is one of several (a coordinator other than the standalone one).
pub(super) fn clustered(d: &Shared) -> bool {
    d.coord.lease().borrow().mode != Mode::Standalone
}

fn me(d: &Shared) -> HostId {
    d.coord.host().clone()
}

/// Subscribes to the cluster's changes and reads what is there now; `None` alone.
pub(super) async fn join(d: &Shared) -> Option<broadcast::Receiver<ClusterEvent>> {
    if !clustered(d) {
        return None;
    }
    let rx = d.coord.watch();
    resync(d).await;
    Some(rx)
}

/// The next change; a receiver that lagged re-reads everything. Never resolves alone.
pub(super) async fn next(rx: &mut Option<broadcast::Receiver<ClusterEvent>>) -> ClusterEvent {
    let Some(r) = rx else {
        return std::future::pending().await;
    };
    match r.recv().await {
        Ok(ev) => ev,
        Err(broadcast::error::RecvError::Lagged(_)) => ClusterEvent::Resync,
        Err(broadcast::error::RecvError::Closed) => {
            *rx = None;
            std::future::pending().await
        }
    }
}

/// Applies one change of the cluster.
pub(super) async fn on_event(d: &Shared, ev: ClusterEvent) {
    let me = me(d);
    match ev {
        ClusterEvent::Spec(spec) if spec.host != me => {
            follow(d, &spec);
            place_all(d).await;
        }
        ClusterEvent::SpecWithdrawn { service } => unfollow(d, &service).await,
        ClusterEvent::Shadow(r) if r.host != me => d.table().remote_shadow(
            &r.service,
            RemoteShadow {
                name: r.shadow,
                host: r.host,
                ready: r.status == ShadowStatus::Ready,
            },
        ),
        ClusterEvent::ShadowGone {
            service,
            host,
            shadow,
        } if host != me => {
            d.table().remote_shadow_gone(&service, &shadow, &host);
            place_all(d).await;
        }
        ClusterEvent::Owner(rec) => {
            let actions = d.table().owner_changed(&rec, &me);
            if !actions.is_empty() {
                tracing::warn!(service = %rec.service, domain = %rec.domain, host = %rec.host, "service now served from another host");
            }
            execute(d, actions).await;
        }
        ClusterEvent::Failure(report) if report.host != me => take_over(d, &report).await,
        ClusterEvent::Drain {
            host,
            draining: true,
        } if host == me => {
            // Handovers wait for other hosts: not on the main loop.
            let d = d.clone();
            tokio::spawn(async move {
                drain_here(&d).await;
                place_all(&d).await;
            });
        }
        ClusterEvent::Resync => resync(d).await,
        ClusterEvent::HostUp(_) | ClusterEvent::HostLost(_) | ClusterEvent::Drain { .. } => {
            place_all(d).await
        }
        _ => {}
    }
}

/// Reads everything again: specs, shadows, owners, standing failure reports, drain.
async fn resync(d: &Shared) {
    let me = me(d);
    let c = d.coord.as_ref();
    let (specs, shadows, owners, failures, hosts) = match (
        c.specs().await,
        c.shadows().await,
        c.owners().await,
        c.failures().await,
        c.hosts().await,
    ) {
        (Ok(a), Ok(b), Ok(o), Ok(f), Ok(h)) => (a, b, o, f, h),
        _ => {
            tracing::warn!("cluster records unreadable; next resync on the next change");
            return;
        }
    };
    for spec in specs.iter().filter(|s| s.host != me) {
        follow(d, spec);
    }
    {
        let mut t = d.table();
        for r in shadows.into_iter().filter(|r| r.host != me) {
            t.remote_shadow(
                &r.service,
                RemoteShadow {
                    name: r.shadow,
                    host: r.host,
                    ready: r.status == ShadowStatus::Ready,
                },
            );
        }
    }
    for rec in owners {
        let actions = d.table().owner_changed(&rec, &me);
        execute(d, actions).await;
    }
    for report in failures.iter().filter(|r| r.host != me) {
        take_over(d, report).await;
    }
    if hosts
        .iter()
        .any(|h| h.facts.host == me && h.state == HostState::Draining)
    {
        let d = d.clone();
        tokio::spawn(async move { drain_here(&d).await });
    }
    place_all(d).await;
}

fn follow(d: &Shared, spec: &PrimarySpec) {
    if let Err(e) = d
        .table()
        .follow(&spec.service, &spec.class, &spec.domain, &spec.host)
    {
        tracing::debug!(service = %spec.service, host = %spec.host, "spec not followed: {e}");
    }
}

async fn unfollow(d: &Shared, service: &str) {
    let shadows = match d.table().unfollow(service) {
        Ok(s) => s,
        Err(_) => return,
    };
    tracing::info!(
        service,
        "primary elsewhere no longer protected; its shadows here go"
    );
    for s in shadows {
        recover::remove_shadow(d, service, &s).await;
    }
}

/// A primary here failed and no shadow here can take over: the hosts with one are told.
pub(super) fn report_failure(d: &Shared, service: &str, domain: &str, trigger: Trigger) {
    if !clustered(d) {
        return;
    }
    let (d, service, domain) = (d.clone(), service.to_string(), domain.to_string());
    tokio::spawn(async move {
        let generation = match d.coord.owner(&service).await {
            Ok(Some(o)) if o.domain == domain => o.generation,
            Ok(_) => return,
            Err(e) => {
                tracing::error!(%service, error = %crate::error::report(&e), "cannot read the owner to report the failure");
                return;
            }
        };
        let report = FailureReport {
            service: service.clone(),
            domain,
            host: me(&d),
            generation,
            trigger,
            at_unix_ms: crate::clock::now_unix_ms(),
            to: None,
        };
        match d.coord.report_failure(report).await {
            Ok(()) => {
                tracing::warn!(%service, "primary failure reported for a shadow on another host")
            }
            Err(e) => {
                tracing::error!(%service, error = %crate::error::report(&e), "cannot report the primary's failure")
            }
        }
    });
}

/// A primary elsewhere was reported dead (or handed over): promote the ready shadow here,
/// if the report is about the owner in force and names no other host.
async fn take_over(d: &Shared, report: &FailureReport) {
    if report.to.as_ref().is_some_and(|h| *h != me(d)) {
        return;
    }
    let ready = d.table().get(&report.service).is_some_and(|s| {
        s.primary_host() == Some(&report.host)
            && s.active == report.domain
            && s.ready_shadow().is_some()
    });
    if !ready {
        return;
    }
    match d.coord.owner(&report.service).await {
        Ok(Some(o)) if o.domain == report.domain && o.generation == report.generation => {}
        Ok(_) => {
            tracing::debug!(service = %report.service, "stale failure report ignored");
            return;
        }
        Err(e) => {
            tracing::warn!(service = %report.service, error = %crate::error::report(&e), "owner unreadable; failure report not acted on");
            return;
        }
    }
    tracing::warn!(service = %report.service, from = %report.domain, host = %report.host, trigger = %report.trigger, "primary on another host reported failed; promoting the shadow here");
    start_failover(
        d,
        &report.service,
        &report.domain,
        report.trigger,
        Instant::now(),
    );
}

/// A promotion here of a primary reported from elsewhere is done: the report is settled.
pub(super) async fn promoted(d: &Shared, service: &str, from_elsewhere: bool) {
    if !clustered(d) {
        return;
    }
    if from_elsewhere {
        if let Err(e) = d.coord.clear_failure(service).await {
            tracing::warn!(service, error = %crate::error::report(&e), "failure report not cleared");
        }
    }
    place_all(d).await;
}

/// The memory a shadow of the primary in `xml` holds, KiB (0 when unreadable: placed as if
/// free, and the host's own checks refuse what does not fit).
fn memory_kib(xml: &str) -> u64 {
    DomainXml::parse(xml).map_or(0, |x| x.memory_kib().max_kib)
}

/// One placement round over every service this host knows (see the module's comment).
pub(super) async fn place_all(d: &Shared) {
    if !clustered(d) {
        return;
    }
    let Ok(_one) = PLACING.try_lock() else {
        return;
    };
    let (hosts, specs) = match (d.coord.hosts().await, d.coord.specs().await) {
        (Ok(h), Ok(s)) => (h, s),
        _ => return,
    };
    let none = HostCapacity {
        mem_total_kib: 0,
        mem_available_kib: 0,
        cpus: 0,
    };
    let views: Vec<HostView> = hosts
        .iter()
        .map(|h| HostView {
            id: h.facts.host.clone(),
            alive: h.alive,
            draining: h.state == HostState::Draining,
            capacity: h.facts.capacity.unwrap_or(none),
        })
        .collect();
    let specs: BTreeMap<String, PrimarySpec> =
        specs.into_iter().map(|s| (s.service.clone(), s)).collect();
    let me = me(d);
    let draining_here = views.iter().any(|h| h.id == me && h.draining);
    if draining_here && d.table().iter().any(|s| s.state.is_running()) {
        let d = d.clone();
        tokio::spawn(async move { drain_here(&d).await });
    }
    let cfg = d.cfg();
    let services: Vec<_> = d.table().iter().cloned().collect();
    let mut ledger = Ledger::new();
    let mut provision = Vec::new();
    let mut retire = Vec::new();
    for svc in services {
        let primary = match &svc.state {
            ServiceState::Elsewhere { host } => host.clone(),
            s if s.is_running() || matches!(s, ServiceState::Down { .. }) => me.clone(),
            _ => continue,
        };
        // Placed once its spec is published: it gives the memory, and the XML elsewhere.
        let Some(spec) = specs.get(&svc.name) else {
            continue;
        };
        let class = cfg.class.get(&svc.class).cloned().unwrap_or_default();
        let mut shadows: Vec<ExistingShadow> = svc
            .shadows
            .iter()
            .filter(|s| matches!(s.state, ShadowState::Booting | ShadowState::Standby(_)))
            .map(|s| ExistingShadow {
                name: s.name.clone(),
                host: me.clone(),
            })
            .chain(svc.remote_shadows.iter().map(|r| ExistingShadow {
                name: r.name.clone(),
                host: r.host.clone(),
            }))
            .collect();
        // Oldest first, the same order on every host.
        shadows.sort_by_key(|s| (shadow_generation(&svc.name, &s.name), s.host.clone()));
        let layout = ServiceLayout {
            placement: class.placement,
            want: class.shadows,
            mem_kib: memory_kib(&spec.xml),
            primary,
            shadows,
        };
        let plan = placement::place(&layout, &views, &mut ledger);
        for why in &plan.unplaced {
            tracing::debug!(service = %svc.name, "{why}");
        }
        // Hosts given a new shadow of the service this round, each once: this host's place
        // among them keeps the names apart.
        let mut given: Vec<&HostId> = Vec::new();
        for h in &plan.add {
            if !given.contains(&h) {
                given.push(h);
            }
        }
        if let Some(slot) = given.iter().position(|h| **h == me) {
            let elsewhere = svc.primary_host().is_some();
            provision.push((
                svc.name.clone(),
                slot as u64,
                elsewhere.then(|| spec.xml.clone()),
            ));
        }
        if plan.add.is_empty() {
            for name in plan.retire {
                if svc.shadows.iter().any(|s| s.name == name) {
                    retire.push((svc.name.clone(), name));
                }
            }
        }
    }
    let limits = d.limits();
    for (service, slot, xml) in provision {
        let class = d.table().get(&service).map(|s| s.class.clone());
        let reserved = d
            .table()
            .reserve_shadow(&service, limits(&class.unwrap_or_default()), slot);
        match reserved {
            Ok(plan) => {
                tracing::info!(%service, shadow = %plan.name, "placement: a shadow goes on this host");
                recover::spawn_provision(d, plan, xml);
            }
            Err(e) => tracing::debug!(%service, "no shadow reserved: {e}"),
        }
    }
    for (service, shadow) in retire {
        tracing::info!(%service, %shadow, "placement: shadow no longer belongs on this host; removing it");
        recover::remove_shadow(d, &service, &shadow).await;
    }
}

/// `failover <service> --to-host H` on the primary's host: fence here, report for H, wait for
/// H's claim. Returns what happened, for the operator.
pub(super) async fn handover(d: &Shared, service: &str, to: &HostId) -> Result<String, String> {
    if !clustered(d) {
        return Err("--to-host needs a [cluster]; this host runs alone".into());
    }
    if *to == me(d) {
        return Err(format!(
            "host {to} is this host; `failover {service}` switches over here"
        ));
    }
    let owner = d
        .coord
        .owner(service)
        .await
        .map_err(|e| crate::error::report(&e))?;
    // The table's lock is released before the refusal is explained (that reads the table).
    let begun = d.table().begin_handover(service, to);
    let start = begun.map_err(|e| {
        match d
            .table()
            .get(service)
            .and_then(|s| s.primary_host().cloned())
        {
            Some(h) => format!("{e}; its primary runs on host {h}: run this there"),
            None => e.to_string(),
        }
    })?;
    let Some(owner) = owner.filter(|o| o.domain == start.primary && o.host == me(d)) else {
        let actions = d.table().handover_failed(service).unwrap_or_default();
        execute(d, actions).await;
        return Err(format!(
            "the owner record of '{service}' does not name {} on this host",
            start.primary
        ));
    };
    let began = Instant::now();
    let mut changes = d.coord.watch();
    if let Err(why) = fence_for_handover(d, &start).await {
        let actions = d.table().handover_failed(service).unwrap_or_default();
        execute(d, actions).await;
        return Err(format!("primary not fenced, handover abandoned: {why}"));
    }
    let report = FailureReport {
        service: service.to_string(),
        domain: start.primary.clone(),
        host: me(d),
        generation: owner.generation,
        trigger: Trigger::Manual,
        at_unix_ms: crate::clock::now_unix_ms(),
        to: Some(to.clone()),
    };
    let reported = d.coord.report_failure(report).await;
    let claimed = match reported {
        Ok(()) => wait_for_claim(d, &mut changes, service, to, owner.generation).await,
        Err(e) => Err(crate::error::report(&e)),
    };
    match claimed {
        Ok(domain) => {
            // The main loop retires the primary here when it sees the same record.
            Ok(format!(
                "service '{service}': switched over to {domain} on host {to} in {} ms",
                began.elapsed().as_millis()
            ))
        }
        Err(why) => {
            let _ = d.coord.clear_failure(service).await;
            // A claim may have landed just now: only a service still ours is given back.
            if let Ok(Some(o)) = d.coord.owner(service).await {
                if o.generation != owner.generation {
                    return Ok(format!(
                        "service '{service}': switched over to {} on host {} (late)",
                        o.domain, o.host
                    ));
                }
            }
            let actions = d.table().handover_failed(service).unwrap_or_default();
            execute(d, actions).await;
            Err(format!(
                "host {to} did not take over ({why}); {} serves again",
                start.primary
            ))
        }
    }
}

/// Waits until another host owns `service` at a newer generation; its domain.
async fn wait_for_claim(
    d: &Shared,
    changes: &mut broadcast::Receiver<ClusterEvent>,
    service: &str,
    to: &HostId,
    generation: u64,
) -> Result<String, String> {
    let deadline = tokio::time::Instant::now() + HANDOVER_WAIT;
    loop {
        let ev = tokio::time::timeout_at(deadline, changes.recv()).await;
        match ev {
            Err(_) => return Err(format!("no claim within {HANDOVER_WAIT:?}")),
            Ok(Ok(ClusterEvent::Owner(r))) if r.service == service && r.generation > generation => {
                return if r.host == *to {
                    Ok(r.domain)
                } else {
                    Err(format!("host {} claimed it instead", r.host))
                };
            }
            Ok(Ok(_)) => {}
            // Missed changes: read the record itself.
            Ok(Err(_)) => {
                if let Ok(Some(r)) = d.coord.owner(service).await {
                    if r.generation > generation {
                        return Ok(r.domain);
                    }
                }
            }
        }
    }
}

/// Fences the primary here before another host resumes its shadow: off the bridge, then
/// paused; a class with data disks stops it, so its disks have no writer left.
async fn fence_for_handover(d: &Shared, start: &HandoverStart) -> Result<(), String> {
    for b in &start.taps {
        isolate_tap(&d.net, &b.tap)
            .await
            .map_err(|e| crate::error::report(&e))?;
    }
    let stop = DiskPolicy::of_class(&d.class(&start.class), false).may_hand_over();
    let dom = start.primary.clone();
    d.hv()
        .run("fence for handover", move |hv| {
            if stop {
                hv.destroy(&dom)
            } else if hv.state(&dom)? == RunState::Running {
                hv.suspend(&dom)
            } else {
                Ok(())
            }
        })
        .await
        .map_err(|e| crate::error::report(&e))
}

/// `host drain|undrain <host>`: sets the flag (any host may drain any host); a drain is
/// answered once no owner record names the host, or after `wait` with what still runs there.
pub(super) async fn set_drain(
    d: &Shared,
    host: &HostId,
    drain: bool,
    wait: Duration,
) -> Result<String, String> {
    if !clustered(d) {
        return Err("host drain needs a [cluster]; this host runs alone".into());
    }
    let report = |e: crate::cluster::CoordError| crate::error::report(&e);
    let hosts = d.coord.hosts().await.map_err(report)?;
    if !hosts.iter().any(|h| h.facts.host == *host) {
        let known: Vec<&str> = hosts.iter().map(|h| h.facts.host.0.as_str()).collect();
        return Err(format!(
            "no host named '{host}'; known hosts: {}",
            known.join(", ")
        ));
    }
    d.coord.set_drain(host, drain).await.map_err(report)?;
    if !drain {
        return Ok(format!(
            "host {host} undrained: it takes shadows and primaries again"
        ));
    }
    let began = Instant::now();
    let on_host = |owners: &[crate::cluster::OwnerRecord]| -> Vec<String> {
        owners
            .iter()
            .filter(|o| o.host == *host)
            .map(|o| o.service.clone())
            .collect()
    };
    let before = on_host(&d.coord.owners().await.map_err(report)?);
    loop {
        let left = on_host(&d.coord.owners().await.map_err(report)?);
        if left.is_empty() {
            return Ok(format!(
                "host {host} drained: {} primar{} moved in {:.1} s; it runs none and gets no new shadows",
                before.len(),
                if before.len() == 1 { "y" } else { "ies" },
                began.elapsed().as_secs_f64()
            ));
        }
        if began.elapsed() >= wait {
            return Err(format!(
                "host {host} is draining, but after {} s it still runs the primaries of {} (no ready shadow on another host?)",
                began.elapsed().as_secs(),
                left.join(", ")
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// This host is draining: every primary here goes to a ready shadow on a host that is alive
/// and not draining. Services without one stay (and are logged).
pub(super) async fn drain_here(d: &Shared) {
    let Ok(_one) = DRAINING.try_lock() else {
        return;
    };
    let hosts = match d.coord.hosts().await {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(error = %crate::error::report(&e), "drain: hosts unreadable");
            return;
        }
    };
    let fit: Vec<HostId> = hosts
        .iter()
        .filter(|h| h.alive && h.state == HostState::Active && h.facts.host != me(d))
        .map(|h| h.facts.host.clone())
        .collect();
    let moves: Vec<(String, Option<HostId>)> = d
        .table()
        .iter()
        .filter(|s| s.state.is_running())
        .map(|s| {
            let to = s
                .remote_shadows
                .iter()
                .find(|r| r.ready && fit.contains(&r.host))
                .map(|r| r.host.clone());
            (s.name.clone(), to)
        })
        .collect();
    for (service, to) in moves {
        let Some(to) = to else {
            tracing::error!(%service, "drain: no ready shadow on a host that is not draining; the primary stays");
            continue;
        };
        match handover(d, &service, &to).await {
            Ok(msg) => tracing::info!(%service, "drain: {msg}"),
            Err(why) => tracing::error!(%service, "drain: {why}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shadow_holds_the_memory_of_the_primary_s_spec() {
        let xml = "<domain type='qemu'><name>web</name><memory unit='MiB'>256</memory><os><type>hvm</type></os></domain>";
        assert_eq!(memory_kib(xml), 256 * 1024);
        assert_eq!(memory_kib("not xml"), 0);
    }
}
