//! Profiles in the daemon: one collector task per active primary feeding the profile manager,
//! the `profile` control requests, what a promotion takes from the profile, and shadows rebuilt
//! on the class's golden image (`shadow reinit --golden`).
//!
//! A collector runs while its domain is the active primary of a running service (provisioning
//! or protected); it stops by itself at its next tick once that is no longer true (failover,
//! stop, primary down), and [`stop_collector`] stops it at once when a failover starts. The
//! promoted shadow gets its own collector when it is watched as the new primary.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::api::metrics::Metrics;
use crate::api::protocol::{ErrorKind, Request, Response};
use crate::clock::now_unix_ms;
use crate::config::{ClassConfig, Config};
use crate::events::EventLog;
use crate::failover::apply_profile::ProfileApply;
use crate::failover::identity::{read_guest_identity, GuestIdentity, Identity};
use crate::failover::plan::DiskPolicy;
use crate::libvirt::LibvirtAgent;
use crate::monitor::agent::GuestAgent;
use crate::monitor::agent::{AgentLimits, AgentOptions};
use crate::monitor::collector::{
    thread_cpu_ns, Collector, CollectorSettings, ConfigFileContent, GuestStatus, TickJitter,
};
use crate::profile::manager::{ManagerError, PlanSummary, ProfileManager, OPEN_LIMITS};
use crate::profile::StoreError;

use super::requests::{rebuild, refused};
use super::Shared;

/// How often versions are exchanged with the central repository.
const SYNC_EVERY: Duration = Duration::from_secs(300);
/// Time allowed to each dependency check after a promotion.
const DEPENDENCY_CHECK_TIMEOUT: Duration = Duration::from_millis(500);

/// A running collector.
struct CollectorTask {
    domain: String,
    handle: tokio::task::JoinHandle<()>,
}

/// The daemon's profile state.
pub(super) struct Profiling {
    /// The manager, or why it could not be opened (profiles are then unavailable, nothing else).
    manager: Result<Arc<ProfileManager>, String>,
    /// Collector per service.
    collectors: Mutex<BTreeMap<String, CollectorTask>>,
    /// Latest configuration files of each service's primary, for delivery at promotion.
    configs: Mutex<BTreeMap<String, Vec<ConfigFileContent>>>,
    /// Services whose shadows are built on their class's golden image.
    golden: Mutex<BTreeSet<String>>,
    /// For pooled classes: each service's primary's identity (host name, addresses) as its
    /// agent last reported it, for the pooled shadow that takes over.
    identities: Mutex<BTreeMap<String, GuestIdentity>>,
}

impl Profiling {
    /// Opens the profile store under the state directory and the configured repository.
    pub(super) fn open(cfg: &Config, metrics: Arc<Metrics>, events: EventLog) -> Self {
        let repo = super::cluster::profile_repository(cfg)
            .map_err(|e| tracing::error!(error = %crate::error::report(&e), "profile repository unavailable; versions stay local"))
            .ok();
        let manager = ProfileManager::open(&cfg.daemon.state_dir, &cfg.profile, repo, metrics)
        .map(|m| Arc::new(m.with_events(events)))
        .map_err(|e| {
            tracing::error!(error = %crate::error::report(&e), "profiles unavailable; failover is not affected");
            crate::error::report(&e)
        });
        Profiling {
            manager,
            collectors: Mutex::new(BTreeMap::new()),
            configs: Mutex::new(BTreeMap::new()),
            golden: Mutex::new(BTreeSet::new()),
            identities: Mutex::new(BTreeMap::new()),
        }
    }

    /// Every known primary identity, by service.
    pub(super) fn identities(&self) -> BTreeMap<String, GuestIdentity> {
        self.identities
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(super) fn manager(&self) -> Option<Arc<ProfileManager>> {
        self.manager.as_ref().ok().cloned()
    }
}

/// Starts the periodic repository synchronisation.
pub(super) fn start(d: &Shared) {
    let Some(m) = d.prof.manager() else {
        return;
    };
    tokio::spawn(async move {
        let mut every = tokio::time::interval(SYNC_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let m = m.clone();
            match tokio::task::spawn_blocking(move || m.sync()).await {
                Ok(Ok(Some(r))) => {
                    for s in r.services.iter().filter(|s| {
                        !s.pushed.is_empty() || s.pulled.is_some() || !s.conflicts.is_empty()
                    }) {
                        tracing::info!(service = %s.service, pushed = ?s.pushed, pulled = ?s.pulled, conflicts = ?s.conflicts, "profile repository sync");
                    }
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %crate::error::report(&e), "profile repository sync failed")
                }
                Err(e) => tracing::warn!(error = %e, "profile repository sync worker failed"),
            }
        }
    });
}

/// Starts collecting from `domain`, the active primary of `service`, unless a collector already
/// does.
pub(super) fn start_collector(d: &Shared, service: &str, domain: &str) {
    let mut map = d.prof.collectors.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(t) = map.get(service) {
        if t.domain == domain && !t.handle.is_finished() {
            return;
        }
        t.handle.abort();
    }
    let handle = tokio::spawn(run_collector(
        d.clone(),
        service.to_string(),
        domain.to_string(),
    ));
    map.insert(
        service.to_string(),
        CollectorTask {
            domain: domain.to_string(),
            handle,
        },
    );
}

/// Stops the collector of `service` now (a failover is starting).
pub(super) fn stop_collector(d: &Shared, service: &str) {
    if let Some(t) = d
        .prof
        .collectors
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(service)
    {
        t.handle.abort();
    }
}

fn still_active(d: &Shared, service: &str, domain: &str) -> bool {
    d.table()
        .get(service)
        .is_some_and(|s| s.active == domain && s.state.is_running())
}

async fn run_collector(d: Shared, service: String, domain: String) {
    let cfg = d.cfg();
    let Some(class) = d.table().get(&service).map(|s| s.class.clone()) else {
        return;
    };
    let class = d.class(&class);
    if let Some(m) = d.prof.manager() {
        if let Err(e) = m.set_coverage_target(&service, class.coverage_target) {
            tracing::warn!(%service, error = %crate::error::report(&e), "class coverage target not applied");
        }
    }
    let settings = CollectorSettings::new(&cfg.monitor, &class);
    let (collector, err) = Collector::new(
        &service,
        &domain,
        settings,
        Some(&cfg.daemon.state_dir.join("history")),
    );
    if let Some(e) = err {
        d.metrics.inc_collector_error(&service, e.source_label());
        tracing::warn!(%service, error = %crate::error::report(&e), "collecting without an on-disk history");
    }
    tracing::info!(%service, %domain, interval_ms = cfg.monitor.sample_interval_ms, "collector started");
    let mut collector = Some(collector);
    // Jittered ticks: a fixed phase would alias with periodic guest activity (a request every
    // second is then always seen, or never).
    let mut jitter = TickJitter::new(&service, now_unix_ms());
    let interval = cfg.monitor.sample_interval();
    // Sources that failed at the previous tick: a failure is logged when it starts and ends,
    // not at every tick (each one is counted in the metrics).
    let mut failing: BTreeSet<&'static str> = BTreeSet::new();
    let mut learn_failed = false;
    loop {
        tokio::time::sleep(jitter.next_delay(interval)).await;
        if !still_active(&d, &service, &domain) {
            break;
        }
        let Some(mut c) = collector.take() else {
            break;
        };
        let manager = d.prof.manager();
        let (ts, mono) = (now_unix_ms(), d.health().now().0);
        let svc = service.clone();
        // A pooled class's primaries: read the identity a pooled shadow would take with the
        // configuration items, and at every tick until it was read once.
        let want_identity = class.pool.is_some().then(|| {
            let known = d
                .prof
                .identities
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(&service);
            (known, domain.clone(), agent_options(&cfg))
        });
        // The probe connection, like heartbeats: an agent call stuck for its whole timeout
        // must not hold one of libvirtd's request slots that a promotion needs.
        let done = d
            .probe_hv()
            .blocking("collect", move |hv| {
                let cpu_before = thread_cpu_ns();
                let tick = c.collect(hv, ts, mono);
                // The manager writes version files: keep it off the async threads too.
                let learned = match (&tick.observation, manager) {
                    (Some(o), Some(m)) => Some(m.observe(&svc, o)),
                    _ => None,
                };
                let files = tick.config_read.then(|| c.config_files());
                let identity = want_identity
                    .filter(|(known, _, _)| tick.config_read || !known)
                    .map(|(_, domain, options)| {
                        let agent = GuestAgent::new(
                            LibvirtAgent {
                                hv: hv.clone(),
                                domain,
                                max_reply: options.limits.max_reply_bytes,
                            },
                            options,
                        );
                        read_guest_identity(&agent)
                    });
                let cpu_ns = cpu_before
                    .zip(thread_cpu_ns())
                    .map_or(0, |(a, b)| b.saturating_sub(a));
                (c, tick, learned, files, identity, cpu_ns)
            })
            .await;
        let (c, tick, learned, files, identity, cpu_ns) = match done {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(%service, %domain, error = %e, "collector worker lost; collector stopped");
                break;
            }
        };
        collector = Some(c);
        d.metrics.add_collector_cpu(&service, cpu_ns as f64 / 1e9);
        let mut now_failing: BTreeSet<&'static str> =
            tick.errors.iter().map(|e| e.source_label()).collect();
        // Not asking is not recovering.
        if tick.guest == GuestStatus::BackingOff && failing.contains("agent") {
            now_failing.insert("agent");
        }
        for e in &tick.errors {
            d.metrics.inc_collector_error(&service, e.source_label());
            if !failing.contains(e.source_label()) {
                tracing::warn!(%service, %domain, guest = ?tick.guest, error = %crate::error::report(e), "collection degraded");
            } else {
                tracing::debug!(%service, %domain, error = %crate::error::report(e), "collection still degraded");
            }
        }
        for recovered in failing.difference(&now_failing) {
            tracing::info!(%service, %domain, source = recovered, "collection recovered");
        }
        failing = now_failing;
        match learned {
            Some(Ok(outcome)) => {
                learn_failed = false;
                if let Some((version, reason)) = outcome.committed {
                    tracing::info!(%service, version, %reason, "profile version committed");
                }
            }
            Some(Err(e)) => {
                if !learn_failed {
                    tracing::warn!(%service, error = %crate::error::report(&e), "profile not learning");
                }
                learn_failed = true;
            }
            None => {}
        }
        if let Some(files) = files {
            d.prof
                .configs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(service.clone(), files);
        }
        match identity {
            Some(Ok(id)) => {
                let mut map = d.prof.identities.lock().unwrap_or_else(|e| e.into_inner());
                if map.get(&service) != Some(&id) {
                    tracing::info!(%service, %domain, identity = %id.describe(), "identity a pooled shadow would take");
                }
                map.insert(service.clone(), id);
            }
            Some(Err(e)) => {
                tracing::debug!(%service, %domain, error = %crate::error::report(&e), "identity not read")
            }
            None => {}
        }
    }
    tracing::info!(%service, %domain, "collector stopped");
}

/// What `service` uses when idle, KiB: the lowest memory its profile plans over the next day
/// (hourly). `None` while the profile is too young to plan.
pub(super) fn idle_memory_kib(d: &Shared, service: &str) -> Option<u64> {
    const HOUR_MS: u64 = 3_600_000;
    let m = d.prof.manager()?;
    let now = now_unix_ms();
    (0..24)
        .filter_map(|h| m.resource_plan(service, now + h * HOUR_MS, OPEN_LIMITS))
        .map(|p| p.mem_kib)
        .min()
}

/// The guest agent options of the daemon's configuration.
fn agent_options(cfg: &Config) -> AgentOptions {
    AgentOptions {
        limits: AgentLimits {
            max_reply_bytes: cfg.monitor.agent_max_reply_bytes,
            ..AgentLimits::default()
        },
        command_timeout: cfg.monitor.agent_timeout(),
        ..AgentOptions::default()
    }
}

/// What a pooled shadow takes from `service`'s primary at promotion: its last known identity
/// and configuration files.
pub(super) fn promotion_identity(d: &Shared, service: &str) -> Identity {
    Identity {
        guest: d
            .prof
            .identities
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(service)
            .cloned(),
        config_files: d
            .prof
            .configs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(service)
            .cloned()
            .unwrap_or_default(),
        agent_max_reply: d.cfg().monitor.agent_max_reply_bytes,
        // Known only once `plug_nic` has matched the shadow's NICs.
        guest_macs: Default::default(),
    }
}

/// What the promotion of `service`'s shadow takes from the profile: the sizing planned for now,
/// the primary's configuration files, the dependencies. `None` when there is nothing to apply.
pub(super) fn promotion_profile(d: &Shared, service: &str) -> Option<ProfileApply> {
    let m = d.prof.manager()?;
    let plan = m.resource_plan(service, now_unix_ms(), OPEN_LIMITS);
    let config_files = d
        .prof
        .configs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(service)
        .cloned()
        .unwrap_or_default();
    if plan.is_none() && config_files.is_empty() {
        return None;
    }
    Some(ProfileApply {
        version: m.live_version(service),
        resources: plan.as_ref().map(|p| PlanSummary {
            vcpus: p.vcpus,
            mem_kib: p.mem_kib,
        }),
        dependencies: plan.map(|p| p.expected_deps).unwrap_or_default(),
        config_files,
        agent: agent_options(&d.cfg()),
        dependency_timeout: DEPENDENCY_CHECK_TIMEOUT,
    })
}

fn manager_error(e: ManagerError) -> Response {
    let kind = match &e {
        ManagerError::UnknownService { .. } => ErrorKind::NotFound,
        ManagerError::Store(
            StoreError::NotFound { .. }
            | StoreError::NoVersions { .. }
            | StoreError::InvalidService { .. },
        ) => ErrorKind::NotFound,
        ManagerError::Store(StoreError::NoPrevious { .. }) | ManagerError::NotLive { .. } => {
            ErrorKind::Conflict
        }
        _ => ErrorKind::Failed,
    };
    Response::error(kind, crate::error::report(&e))
}

/// The typed answer, or the manager's error.
fn answer<T>(v: Result<T, ManagerError>, typed: impl FnOnce(T) -> Response) -> Response {
    v.map_or_else(manager_error, typed)
}

/// Answers the `profile` requests.
pub(super) async fn handle_request(d: &Shared, req: Request) -> Response {
    let m = match &d.prof.manager {
        Ok(m) => m.clone(),
        Err(why) => {
            return Response::error(
                ErrorKind::Failed,
                format!("profiles are unavailable in this daemon: {why}"),
            )
        }
    };
    // Version files are read and written: not on the async threads.
    let answer = tokio::task::spawn_blocking(move || match req {
        Request::ProfileShow { service } => answer(m.show(&service, now_unix_ms()), |r| {
            Response::ProfileShow(Box::new(r))
        }),
        Request::ProfileHistory { service } => {
            answer(m.history(&service), Response::ProfileHistory)
        }
        Request::ProfileDiff { service, a, b } => {
            answer(m.diff(&service, a, b), Response::ProfileDiff)
        }
        Request::ProfileRollback { service, to } => match m.rollback(&service, to) {
            Ok(r) => Response::ok(format!(
                "service '{}': profile v{} restored as new version v{}{}",
                r.service,
                r.to,
                r.version,
                if r.live {
                    "; the live profile continues from it"
                } else {
                    ""
                }
            )),
            Err(e) => manager_error(e),
        },
        Request::ProfileAccuracy { service } => {
            answer(m.accuracy(service.as_deref()), Response::ProfileAccuracy)
        }
        Request::ProfileSave { service } => {
            answer(m.save(&service, now_unix_ms()), Response::ProfileSaved)
        }
        Request::ProfileSeries {
            service,
            since_unix_ms,
        } => answer(m.series(&service, since_unix_ms), Response::ProfileSeries),
        other => Response::error(
            ErrorKind::BadRequest,
            format!("{} is not a profile request", other.name()),
        ),
    })
    .await;
    answer.unwrap_or_else(|e| {
        Response::error(ErrorKind::Internal, format!("profile worker failed: {e}"))
    })
}

/// The golden image shadows of `service` are built on, if `shadow reinit --golden` chose it.
pub(super) fn golden_image(d: &Shared, service: &str, class: &ClassConfig) -> Option<PathBuf> {
    let golden = d.prof.golden.lock().unwrap_or_else(|e| e.into_inner());
    golden
        .contains(service)
        .then(|| class.golden_image.clone())
        .flatten()
}

/// How new shadows of `service` get their disks: the class's roles; the system disk on the
/// golden image promoted from a canary (it replaces the class's for this service), else on the
/// class's golden image if `shadow reinit --golden` chose it, else on the primary's image.
pub(super) fn shadow_disks(d: &Shared, service: &str, class: &ClassConfig) -> DiskPolicy {
    let policy = DiskPolicy::of_class(class, golden_image(d, service, class).is_some());
    match d.canaries.promoted_golden_image(service) {
        Some(image) => policy.booting_from(image),
        None => policy,
    }
}

/// Shadows of `service` go back to the primary's own disks (plain rebuild or reinit).
pub(super) fn forget_golden(d: &Shared, service: &str) {
    d.prof
        .golden
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(service);
}

/// `shadow reinit --golden`: replaces the shadows of `service` with ones whose system disk
/// overlay sits on the class's golden image; replacements provisioned later do too, until a
/// plain rebuild or reinit.
pub(super) async fn reinit_golden(d: &Shared, service: &str) -> Response {
    let svc_class = match d.table().require(service) {
        Ok(s) => s.class.clone(),
        Err(e) => return refused(e),
    };
    let class = d.class(&svc_class);
    let Some(image) = class.golden_image.clone() else {
        return Response::error(
            ErrorKind::BadRequest,
            format!(
                "service '{service}': class '{}' has no golden_image; set class.{}.golden_image to use --golden",
                svc_class, svc_class
            ),
        );
    };
    match std::fs::metadata(&image) {
        Ok(m) if m.is_file() => {}
        Ok(_) => {
            return Response::error(
                ErrorKind::BadRequest,
                format!(
                    "golden image {} of class '{}' is not a file",
                    image.display(),
                    svc_class
                ),
            )
        }
        Err(e) => {
            return Response::error(
                ErrorKind::NotFound,
                format!(
                    "golden image {} of class '{}' is unusable: {e}",
                    image.display(),
                    svc_class
                ),
            )
        }
    }
    d.prof
        .golden
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(service.to_string());
    match rebuild(d, service).await {
        Ok(n) => Response::ok(format!(
            "service '{service}': {n} shadow(s) removed; new ones are being provisioned on golden image {}",
            image.display()
        )),
        Err(e) => refused(e),
    }
}
