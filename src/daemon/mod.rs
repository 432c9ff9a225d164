//! The long-running orchestrator: watches libvirt, keeps every protected service's shadows
//! ready, fails over when a primary dies, and answers the control socket.
//!
//! One loop owns the decisions; slow work (provisioning, promotion, pings) runs in tasks that
//! report back over a channel. The truth lives in libvirt (domain metadata), so a restarted
//! daemon rebuilds everything (see `recover`). Submodules: `recover` (reconcile from libvirt,
//! shadow provisioning), `health` (heartbeats, hang detection, probes, tap repair),
//! `requests` (the control socket) and `profiles` (collectors, profile requests, golden shadows).

mod health;
mod profiles;
mod recover;
mod requests;

use health::*;
use recover::*;
use requests::*;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::api::control::ControlServer;
use crate::api::metrics::Metrics;
use crate::api::protocol::{Request, Response, ShadowState};
use crate::config::{ClassConfig, Config};
use crate::domain_xml::{MemberState, Role, META_NS};
use crate::failover::promote::{promote, Promoted, Promotion, Trigger};
use crate::failover::shadow::{member_meta, shadow_generation, write_meta};
use crate::failover::{now_unix_ms, Service, ServiceState, Shadow};
use crate::libvirt::{
    AgentState, DomainEvent, EventLoop, Hypervisor, LibvirtError, LifecycleEvent,
};
use crate::monitor::heartbeat::PingFailure;
use crate::monitor::{Health, HeartbeatConfig, HeartbeatEvent, HeartbeatTracker, MonoMs};
use crate::net::Netlink;

/// Pause between a completed promotion and provisioning the replacement shadow.
const REPLACEMENT_DELAY: Duration = Duration::from_secs(2);

/// Errors that stop the daemon from starting.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The configuration could not be loaded.
    #[error("configuration rejected")]
    Config(#[from] crate::config::ConfigError),
    /// libvirt could not be reached.
    #[error("libvirt unavailable")]
    Libvirt(#[from] LibvirtError),
    /// The control socket could not be bound.
    #[error("control socket unavailable")]
    Control(#[from] crate::api::control::ControlError),
    /// Netlink could not be opened.
    #[error("netlink unavailable")]
    Net(#[from] crate::net::NetError),
    /// The metrics listener could not be bound.
    #[error("metrics listener on {addr} unavailable")]
    Metrics {
        /// The configured address.
        addr: std::net::SocketAddr,
        /// The bind error.
        #[source]
        source: crate::api::metrics::MetricsError,
    },
    /// The state directory could not be created.
    #[error("state directory {path} unusable")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Things the loop learns from its tasks and from libvirt.
#[derive(Debug)]
enum Note {
    PrimaryExited {
        service: String,
        domain: String,
        at: Instant,
    },
    ShadowDone {
        service: String,
        name: String,
        result: Result<Shadow, String>,
        unprotectable: bool,
    },
    FailoverDone {
        service: String,
        shadow: String,
        result: Result<Box<Promoted>, String>,
        record: crate::api::protocol::FailoverRecord,
    },
    Heartbeat {
        domain: String,
        ping: Result<(), PingFailure>,
        at: MonoMs,
        at_unix_ms: u64,
    },
    /// The grace period after a heartbeat failover ended; `answered` if the old primary's
    /// agent answered while fenced, which makes the failover a false one.
    FenceGraceOver {
        service: String,
        old: String,
        answered: bool,
    },
}

impl std::fmt::Debug for Promoted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Promoted")
            .field("to", &self.record.to)
            .finish()
    }
}

/// The daemon's shared state.
pub struct Daemon {
    cfg: RwLock<Arc<Config>>,
    config_path: PathBuf,
    hv: RwLock<Hypervisor>,
    /// A second connection for guest probes, so stuck agent calls never delay a promotion.
    probe_hv: RwLock<Hypervisor>,
    events: EventLoop,
    net: Netlink,
    metrics: Arc<Metrics>,
    services: Mutex<BTreeMap<String, Service>>,
    heartbeats: Mutex<BTreeMap<String, u64>>,
    /// Health state machines per active primary domain.
    trackers: Mutex<BTreeMap<String, HeartbeatTracker>>,
    /// QEMU pid per watched primary domain, for vCPU time.
    pids: Mutex<BTreeMap<String, i32>>,
    /// Domains with a ping in flight: no second ping is queued behind a stuck one.
    pinging: Mutex<std::collections::BTreeSet<String>>,
    /// External probe state per service: when it started failing, and whether counted.
    probes: Mutex<BTreeMap<String, ProbeState>>,
    false_failovers: std::sync::atomic::AtomicU64,
    missed_failovers: std::sync::atomic::AtomicU64,
    /// Origin of the monotonic clock the trackers use.
    mono_origin: Instant,
    notes: mpsc::UnboundedSender<Note>,
    started_unix_ms: u64,
    /// Collectors, profile manager, golden-image choices.
    prof: profiles::Profiling,
}

type Shared = Arc<Daemon>;

impl Daemon {
    fn cfg(&self) -> Arc<Config> {
        self.cfg.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn hv(&self) -> Hypervisor {
        self.hv.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The connection for guest probes (pings, grace checks), kept apart from [`Self::hv`].
    fn probe_hv(&self) -> Hypervisor {
        self.probe_hv
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn class(&self, name: &str) -> ClassConfig {
        let cfg = self.cfg();
        cfg.class.get(name).cloned().unwrap_or_default()
    }

    fn services(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Service>> {
        self.services.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now_mono(&self) -> MonoMs {
        MonoMs(self.mono_origin.elapsed().as_millis() as u64)
    }

    /// Feeds one observation to the domain's tracker (created on first use).
    fn observe(&self, domain: &str, class: &ClassConfig, event: HeartbeatEvent) {
        let now = self.now_mono();
        let mut trackers = self.trackers.lock().unwrap_or_else(|e| e.into_inner());
        let tracker = trackers.entry(domain.to_string()).or_insert_with(|| {
            HeartbeatTracker::new(heartbeat_config(class), now).unwrap_or_else(|_| {
                HeartbeatTracker::new(HeartbeatConfig::default(), now)
                    .expect("default heartbeat config is valid")
            })
        });
        tracker.observe(event);
    }

    fn health(&self, domain: &str) -> Option<Health> {
        let now = self.now_mono();
        self.trackers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(domain)
            .map(|t| t.health(now))
    }
}

/// Runs the daemon until SIGINT/SIGTERM.
pub async fn run(config_path: PathBuf) -> Result<(), DaemonError> {
    let cfg = Arc::new(load_config(&config_path)?);
    let events = EventLoop::start()?;
    let hv = Hypervisor::open(
        &events,
        &cfg.daemon.libvirt_uri,
        cfg.daemon.keepalive_interval_s,
        cfg.daemon.keepalive_count,
    )?;
    let probe_hv = Hypervisor::open(
        &events,
        &cfg.daemon.libvirt_uri,
        cfg.daemon.keepalive_interval_s,
        cfg.daemon.keepalive_count,
    )?;
    let (note_tx, mut notes) = mpsc::unbounded_channel();
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    hv.subscribe(ev_tx.clone())?;
    let net = Netlink::new()?;
    let metrics = Arc::new(Metrics::new());
    let metrics_server = crate::api::metrics::MetricsServer::bind(cfg.daemon.metrics_listen)
        .await
        .map_err(|source| DaemonError::Metrics {
            addr: cfg.daemon.metrics_listen,
            source,
        })?;
    tokio::spawn(metrics_server.serve(metrics.clone()));
    let control = ControlServer::bind(&cfg.daemon.control_socket)?;
    let (req_tx, mut requests) = mpsc::channel::<(Request, oneshot::Sender<Response>)>(64);
    tokio::spawn(control.serve(req_tx));
    tracing::info!(uri = %cfg.daemon.libvirt_uri, socket = %cfg.daemon.control_socket.display(), metrics = %cfg.daemon.metrics_listen, "understudy daemon started");

    let prof = profiles::Profiling::open(&cfg, metrics.clone());
    let d: Shared = Arc::new(Daemon {
        cfg: RwLock::new(cfg.clone()),
        config_path,
        hv: RwLock::new(hv),
        probe_hv: RwLock::new(probe_hv),
        events,
        net,
        metrics,
        services: Mutex::new(BTreeMap::new()),
        heartbeats: Mutex::new(BTreeMap::new()),
        trackers: Mutex::new(BTreeMap::new()),
        pids: Mutex::new(BTreeMap::new()),
        pinging: Mutex::new(Default::default()),
        probes: Mutex::new(BTreeMap::new()),
        false_failovers: Default::default(),
        missed_failovers: Default::default(),
        mono_origin: Instant::now(),
        notes: note_tx,
        started_unix_ms: now_unix_ms(),
        prof,
    });
    profiles::start(&d);
    reconcile(&d).await;

    let hb_interval = cfg
        .class
        .values()
        .map(|c| c.heartbeat_interval_ms)
        .min()
        .unwrap_or(500)
        .max(50);
    let mut heartbeat = tokio::time::interval(Duration::from_millis(hb_interval));
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut housekeeping = tokio::time::interval(crate::systemd::KEEPALIVE_PERIOD);
    crate::systemd::ready(&crate::systemd::status_line(d.services().values()));
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler cannot fail in a tokio runtime");
    loop {
        tokio::select! {
            Some(ev) = ev_rx.recv() => on_libvirt_event(&d, ev, &ev_tx).await,
            Some(note) = notes.recv() => on_note(&d, note).await,
            Some((req, reply)) = requests.recv() => {
                let d = d.clone();
                tokio::spawn(async move {
                    let resp = handle_request(&d, req).await;
                    let _ = reply.send(resp);
                });
            }
            _ = heartbeat.tick() => send_heartbeats(&d),
            _ = housekeeping.tick() => {
                ensure_all_shadows(&d);
                d.metrics.observe_services(d.services().values());
                crate::systemd::alive(&crate::systemd::status_line(d.services().values()));
            }
            _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT: stopping; shadows stay as they are"); break; }
            _ = sigterm.recv() => { tracing::info!("SIGTERM: stopping; shadows stay as they are"); break; }
        }
    }
    crate::systemd::stopping();
    Ok(())
}

/// Loads the configuration and makes the state directory absolute: libvirt resolves the
/// overlay and console paths we hand it in its own working directory, not ours.
fn load_config(path: &std::path::Path) -> Result<Config, DaemonError> {
    let mut cfg = Config::load(path)?;
    let dir = &cfg.daemon.state_dir;
    std::fs::create_dir_all(dir).map_err(|source| DaemonError::StateDir {
        path: dir.clone(),
        source,
    })?;
    cfg.daemon.state_dir = std::fs::canonicalize(dir).map_err(|source| DaemonError::StateDir {
        path: dir.clone(),
        source,
    })?;
    Ok(cfg)
}

/// Begins a failover of `service` away from `from`, unless one is running or pointless.
fn start_failover(d: &Shared, service: &str, from: &str, trigger: Trigger, at: Instant) {
    let mut promotion = {
        let mut services = d.services();
        let Some(svc) = services.get_mut(service) else {
            return;
        };
        if svc.active != from
            || matches!(svc.state, ServiceState::FailingOver | ServiceState::Stopped)
        {
            return;
        }
        let Some(shadow) = svc.ready_shadow().cloned() else {
            tracing::error!(
                service,
                from,
                "primary failed and no paused shadow is ready"
            );
            svc.state = ServiceState::Down("primary failed; no paused shadow".into());
            return;
        };
        svc.state = ServiceState::FailingOver;
        if let Some(s) = svc.shadows.iter_mut().find(|s| s.name == shadow.name) {
            s.state = ShadowState::Promoting;
        }
        Promotion {
            service: service.to_string(),
            class: svc.class.clone(),
            old_primary: from.to_string(),
            old_taps: svc.active_taps.clone(),
            shadow_generation: shadow_generation(service, &shadow.name).unwrap_or(0),
            shadow,
            trigger,
            detected_at: at,
            profile: None,
        }
    };
    // Outside the service table's lock; cheap, and applied only once traffic is restored.
    promotion.profile = profiles::promotion_profile(d, service);
    profiles::stop_collector(d, service);
    d.metrics.inc_detection(trigger.label());
    let d2 = d.clone();
    let service = service.to_string();
    tokio::spawn(async move {
        let shadow = promotion.shadow.name.clone();
        let (result, record) = match promote(&d2.hv(), &d2.net, promotion).await {
            Ok(p) => {
                let r = p.record.clone();
                (Ok(Box::new(p)), r)
            }
            Err((record, e)) => (Err(format!("{e}: {}", crate::error_chain(&e))), record),
        };
        let _ = d2.notes.send(Note::FailoverDone {
            service,
            shadow,
            result,
            record,
        });
    });
}

async fn on_note(d: &Shared, note: Note) {
    match note {
        Note::PrimaryExited {
            service,
            domain,
            at,
        } => {
            tracing::warn!(%service, %domain, "primary QEMU exited");
            start_failover(d, &service, &domain, Trigger::Pidfd, at);
        }
        Note::ShadowDone {
            service,
            name,
            result,
            unprotectable,
        } => match result {
            Ok(shadow) => {
                let mut services = d.services();
                if let Some(svc) = services.get_mut(&service) {
                    svc.provision_failures = 0;
                    svc.provision_not_before = None;
                    if let Some(s) = svc.shadows.iter_mut().find(|s| s.name == name) {
                        *s = shadow;
                    }
                    if svc.state == ServiceState::Provisioning
                        && svc.shadows.iter().all(|s| s.state == ShadowState::Paused)
                    {
                        svc.state = ServiceState::Protected;
                    }
                }
                // The primary died while no shadow was ready: this one takes over now.
                let waiting = services
                    .get(&service)
                    .filter(|s| matches!(s.state, ServiceState::Down(_)))
                    .map(|s| s.active.clone());
                drop(services);
                if let Some(active) = waiting {
                    tracing::warn!(%service, shadow = %name, "shadow ready for a service that is down; promoting it");
                    start_failover(d, &service, &active, Trigger::Recovery, Instant::now());
                }
            }
            Err(e) => {
                tracing::error!(%service, shadow = %name, error = %e, "shadow provisioning failed");
                remove_shadow(d, &service, &name).await;
                if let Some(svc) = d.services().get_mut(&service) {
                    // 10 s, 20 s, 40 s ... up to 5 minutes between attempts.
                    svc.provision_failures += 1;
                    let wait = Duration::from_secs(10)
                        .saturating_mul(1 << svc.provision_failures.min(5).saturating_sub(1));
                    let wait = wait.min(Duration::from_secs(300));
                    svc.provision_not_before = Some(Instant::now() + wait);
                    tracing::warn!(%service, failures = svc.provision_failures, retry_in_s = wait.as_secs(), "next shadow provisioning attempt delayed");
                }
                if unprotectable {
                    if let Some(svc) = d.services().get_mut(&service) {
                        svc.state = ServiceState::Unprotectable(e);
                    }
                }
            }
        },
        Note::FailoverDone {
            service,
            shadow,
            result,
            record,
        } => {
            let ok = result.is_ok();
            if ok && record.trigger == Trigger::Heartbeat.label() {
                spawn_fence_grace(d, &service, &record.from);
            }
            d.metrics.record_failover(
                &service,
                &record.trigger,
                ok,
                &record.steps,
                record.outage_ms,
            );
            let new_active = {
                let mut services = d.services();
                let Some(svc) = services.get_mut(&service) else {
                    return;
                };
                svc.last_failover = Some(record);
                match result {
                    Ok(p) => {
                        svc.shadows.retain(|s| s.name != shadow);
                        svc.active = shadow.clone();
                        svc.active_taps = p.taps;
                        svc.state = ServiceState::Provisioning;
                        Some(shadow.clone())
                    }
                    Err(e) => {
                        if let Some(s) = svc.shadows.iter_mut().find(|s| s.name == shadow) {
                            s.state = ShadowState::Failed;
                        }
                        svc.promote_attempts += 1;
                        svc.state = ServiceState::Down(format!(
                            "failover failed (attempt {}): {e}",
                            svc.promote_attempts
                        ));
                        None
                    }
                }
            };
            match new_active {
                Some(active) => {
                    if let Some(svc) = d.services().get_mut(&service) {
                        svc.promote_attempts = 0;
                    }
                    watch_primary(d, &service, &active);
                    // The replacement shadow waits a moment: booting it competes for CPU with
                    // the guest that has just taken over, in the very seconds its clients
                    // reconnect. Service first, redundancy right after.
                    let d2 = d.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(REPLACEMENT_DELAY).await;
                        ensure_all_shadows(&d2);
                    });
                }
                None => {
                    // The failed shadow may be half promoted: destroy it, then try again with
                    // another (ready, or newly provisioned) within the retry limit.
                    remove_shadow(d, &service, &shadow).await;
                    let retry = d.services().get(&service).and_then(|s| {
                        let limit = d.class(&s.class).promote_retry_limit;
                        (s.promote_attempts <= limit).then(|| s.active.clone())
                    });
                    match retry {
                        Some(active) => {
                            start_failover(d, &service, &active, Trigger::Recovery, Instant::now());
                            ensure_all_shadows(d);
                        }
                        None => {
                            tracing::error!(%service, "promotion retries exhausted; service stays down")
                        }
                    }
                }
            }
        }
        Note::Heartbeat {
            domain,
            ping,
            at,
            at_unix_ms,
        } => {
            let found = d
                .services()
                .values()
                .find(|s| s.active == domain)
                .map(|s| (s.name.clone(), s.class.clone()));
            let Some((service, class)) = found else {
                return;
            };
            let class = d.class(&class);
            match ping {
                Ok(()) => {
                    d.observe(&domain, &class, HeartbeatEvent::PingOk { at });
                    d.heartbeats
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(domain.clone(), at_unix_ms);
                    if let Some(svc) = d.services().get_mut(&service) {
                        svc.last_heartbeat_unix_ms = Some(at_unix_ms);
                    }
                }
                Err(failure) => {
                    d.observe(&domain, &class, HeartbeatEvent::PingFailed { at, failure });
                    d.metrics.inc_heartbeat_failure(&service);
                }
            }
            judge_health(d, &service, &domain);
        }
        Note::FenceGraceOver {
            service,
            old,
            answered,
        } => {
            if answered {
                d.false_failovers
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                d.metrics.inc_false_failover(&service);
                tracing::error!(%service, old_primary = %old, "FALSE FAILOVER: the fenced primary's agent answered after it was declared hung");
            } else {
                tracing::info!(%service, old_primary = %old, "fenced primary stayed silent through the grace period; destroying it");
            }
            let o = old.clone();
            if let Err(e) = d
                .hv()
                .run("destroy fenced primary", move |hv| hv.destroy(&o))
                .await
            {
                tracing::warn!(%service, old_primary = %old, error = %e, "cannot destroy fenced primary");
            }
        }
    }
}

async fn on_libvirt_event(d: &Shared, ev: DomainEvent, ev_tx: &mpsc::UnboundedSender<DomainEvent>) {
    tracing::info!(event = ?ev, "libvirt event");
    match ev {
        DomainEvent::Lifecycle { domain, event } => {
            let owner = {
                let services = d.services();
                services.values().find_map(|s| {
                    if s.active == domain {
                        Some((s.name.clone(), true))
                    } else if s.shadows.iter().any(|x| x.name == domain) {
                        Some((s.name.clone(), false))
                    } else {
                        None
                    }
                })
            };
            match (owner, event) {
                (Some((service, true)), e) if e.is_failure() => {
                    start_failover(d, &service, &domain, Trigger::Lifecycle, Instant::now());
                }
                (Some((service, false)), e)
                    if e.is_failure()
                        || e == LifecycleEvent::StoppedDestroyed
                        || e == LifecycleEvent::StoppedShutdown =>
                {
                    let promoting = d
                        .services()
                        .get(&service)
                        .and_then(|s| {
                            s.shadows
                                .iter()
                                .find(|x| x.name == domain)
                                .map(|x| x.state == ShadowState::Promoting)
                        })
                        .unwrap_or(false);
                    if !promoting {
                        tracing::warn!(%service, shadow = %domain, ?e, "shadow stopped; it will be recreated");
                        remove_shadow(d, &service, &domain).await;
                        ensure_all_shadows(d);
                    }
                }
                (None, LifecycleEvent::Started | LifecycleEvent::Defined) => {
                    if let Some((class, _)) = d.cfg().class_for(&domain) {
                        let tagged = {
                            let dn = domain.clone();
                            d.hv()
                                .run("read metadata", move |hv| hv.metadata(&dn, META_NS))
                                .await
                                .ok()
                                .flatten()
                        };
                        if tagged.is_none() {
                            let class = class.to_string();
                            let running = event == LifecycleEvent::Started;
                            protect_new(d, &domain, &class, running).await;
                        }
                    }
                }
                (Some((service, true)), LifecycleEvent::Started) => {
                    let stopped = d
                        .services()
                        .get(&service)
                        .map(|s| s.state == ServiceState::Stopped)
                        .unwrap_or(false);
                    if stopped {
                        let class = d.services().get_mut(&service).map(|s| {
                            s.state = ServiceState::Provisioning;
                            s.class.clone()
                        });
                        // The record in libvirt must say it runs: a restarted daemon that
                        // read "stopped" would not fail it over.
                        if let Some(class) = class {
                            let gen = shadow_generation(&service, &domain).unwrap_or(0);
                            let meta = member_meta(
                                &service,
                                &class,
                                Role::Primary,
                                gen,
                                MemberState::Active,
                            );
                            let dn = domain.clone();
                            if let Err(e) = d
                                .hv()
                                .run("mark primary active", move |hv| write_meta(hv, &dn, &meta))
                                .await
                            {
                                tracing::error!(%service, error = %e, "cannot mark the started primary active");
                            }
                        }
                        refresh_active(d, &service).await;
                    }
                }
                _ => {}
            }
        }
        DomainEvent::Agent { domain, state } => {
            if state == AgentState::Disconnected {
                tracing::warn!(%domain, "guest agent disconnected");
            }
            let class = d
                .services()
                .values()
                .find(|s| s.active == domain)
                .map(|s| s.class.clone());
            if let Some(class) = class {
                let at = d.now_mono();
                let ev = match state {
                    AgentState::Connected => HeartbeatEvent::AgentConnected { at },
                    AgentState::Disconnected => HeartbeatEvent::AgentDisconnected { at },
                };
                d.observe(&domain, &d.class(&class), ev);
            }
        }
        DomainEvent::ConnectionClosed { reason } => {
            tracing::error!(reason, "libvirt connection closed; reconnecting");
            reconnect(d, ev_tx).await;
        }
    }
}

/// Reopens the libvirt connection until it works, resubscribes and re-reads state.
async fn reconnect(d: &Shared, ev_tx: &mpsc::UnboundedSender<DomainEvent>) {
    let cfg = d.cfg();
    let mut wait = Duration::from_millis(200);
    loop {
        let (uri, ki, kc, events) = (
            cfg.daemon.libvirt_uri.clone(),
            cfg.daemon.keepalive_interval_s,
            cfg.daemon.keepalive_count,
            d.events,
        );
        let opened =
            tokio::task::spawn_blocking(move || Hypervisor::open(&events, &uri, ki, kc)).await;
        match opened {
            Ok(Ok(hv)) => {
                if let Err(e) = hv.subscribe(ev_tx.clone()) {
                    tracing::error!(error = %e, "resubscribe failed");
                } else {
                    *d.hv.write().unwrap_or_else(|e| e.into_inner()) = hv;
                    let (uri, ki, kc, events) = (
                        cfg.daemon.libvirt_uri.clone(),
                        cfg.daemon.keepalive_interval_s,
                        cfg.daemon.keepalive_count,
                        d.events,
                    );
                    match tokio::task::spawn_blocking(move || {
                        Hypervisor::open(&events, &uri, ki, kc)
                    })
                    .await
                    {
                        Ok(Ok(p)) => *d.probe_hv.write().unwrap_or_else(|e| e.into_inner()) = p,
                        _ => {
                            tracing::warn!(
                                "probe connection not reopened; probes share the main connection"
                            );
                            *d.probe_hv.write().unwrap_or_else(|e| e.into_inner()) = d.hv();
                        }
                    }
                    d.metrics.inc_libvirt_reconnect();
                    tracing::info!("reconnected to libvirt");
                    break;
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "libvirt still unavailable"),
            Err(e) => tracing::warn!(error = %e, "reconnect worker failed"),
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(5));
    }
    // Domains may have changed while we were blind; rebuild from libvirt without failing over
    // anything that is merely unknown to us.
    let names: Vec<String> = d.services().keys().cloned().collect();
    for name in names {
        refresh_active(d, &name).await;
    }
}
