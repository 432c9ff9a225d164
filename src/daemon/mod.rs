//! The long-running orchestrator: watches libvirt, keeps every protected service's shadows
//! ready, fails over when a primary dies, and answers the control socket.
//!
//! Where things live:
//! - `table`: the [`ServiceTable`], the only place where a service's state changes. Its
//!   transitions return [`Action`]s; `execute` here carries them out.
//! - `health`: the [`HealthMonitor`] (hang detectors, pings in flight, probes, counts), and
//!   `checks`: the periodic work that feeds it (heartbeats, probes, tap repair, fence grace).
//! - `recover`: rebuilding the table from libvirt at start, and provisioning shadows.
//! - `requests`: the control socket; `profiles`: collectors, profile requests, golden shadows.
//! - `cluster`: the coordinator (etcd with `[cluster]`, this host alone without), this host's
//!   registration, its published shadows and primary specs, and `hosts`.
//! - `crosshost`: with a cluster, what other hosts' records ask of this one (primaries
//!   elsewhere, failure reports, placement, handovers and drains).
//! - `hostloss`: with a cluster, heartbeats between daemons, lost hosts (judged, fenced, their
//!   services promoted here) and self-fencing.
//!
//! One loop ([`run`]) receives libvirt events and `Note`s from the tasks that do slow work
//! (provisioning, promotion, pings), asks the table, and carries out what it answers. The
//! truth lives in libvirt (domain metadata), so a restarted daemon rebuilds everything.

mod canary;
mod checks;
mod cluster;
mod cost;
mod crosshost;
mod health;
mod hostloss;
mod pool;
mod profiles;
mod recover;
mod requests;
mod table;
mod tiers;

pub use health::{HealthMonitor, Verdict};
pub use table::{Action, Refused, Service, ServiceState, ServiceTable};

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::api::control::ControlServer;
use crate::api::metrics::Metrics;
use crate::api::protocol::{Request, Response};
use crate::cluster::Coordinator;
use crate::config::{ClassConfig, Config};
use crate::domain_xml::{MemberState, META_NS};
use crate::events::{EventKind, EventLog};
use crate::failover::plan::DiskPolicy;
use crate::failover::promote::{promote, Handover, Promoted, Promotion, PromotionFailed};
use crate::failover::shadow::{primary_meta, write_meta};
use crate::failover::{FailoverError, Shadow, Trigger};
use crate::libvirt::{
    AgentState, DomainEvent, EventLoop, Hypervisor, LibvirtError, LifecycleEvent,
};
use crate::monitor::heartbeat::PingFailure;
use crate::monitor::{HeartbeatEvent, MonoMs};
use crate::net::Netlink;

use table::{ClassLimits, Member, REPLACEMENT_DELAY};

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
    /// The cluster's coordinator could not be started (an invalid host name or key prefix).
    #[error("cluster coordination unavailable")]
    Cluster(#[from] crate::cluster::CoordError),
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

/// What the loop learns from the tasks it started. Errors stay typed.
#[derive(Debug)]
enum Note {
    /// A watched primary's QEMU process exited.
    PrimaryExited {
        service: String,
        domain: String,
        at: Instant,
    },
    /// Provisioning of shadow `name` ended.
    ShadowDone {
        service: String,
        name: String,
        result: Result<Shadow, FailoverError>,
    },
    /// A promotion ended.
    FailoverDone {
        service: String,
        shadow: String,
        result: Result<Promoted, PromotionFailed>,
    },
    /// A heartbeat ping ended.
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

/// The two libvirt connections: the main one, and one for guest probes so that stuck agent
/// calls never delay a promotion (libvirtd serves a client's calls from a few worker slots).
struct Connections {
    events: EventLoop,
    main: RwLock<Hypervisor>,
    probe: RwLock<Hypervisor>,
}

impl Connections {
    fn open_one(events: &EventLoop, cfg: &Config) -> Result<Hypervisor, LibvirtError> {
        Hypervisor::open(
            events,
            &cfg.daemon.libvirt_uri,
            cfg.daemon.keepalive_interval_s,
            cfg.daemon.keepalive_count,
        )
    }

    fn open(events: EventLoop, cfg: &Config) -> Result<Self, LibvirtError> {
        Ok(Connections {
            main: RwLock::new(Self::open_one(&events, cfg)?),
            probe: RwLock::new(Self::open_one(&events, cfg)?),
            events,
        })
    }

    fn main(&self) -> Hypervisor {
        self.main.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn probe(&self) -> Hypervisor {
        self.probe.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reopens both connections until the main one works and is subscribed to events. The
    /// probe connection falls back to sharing the main one.
    async fn reopen(&self, cfg: Arc<Config>, ev_tx: &mpsc::UnboundedSender<DomainEvent>) {
        let mut wait = Duration::from_millis(200);
        loop {
            let (events, c) = (self.events, cfg.clone());
            let opened = tokio::task::spawn_blocking(move || {
                let main = Self::open_one(&events, &c)?;
                Ok::<_, LibvirtError>((main, Self::open_one(&events, &c)))
            })
            .await;
            match opened {
                Ok(Ok((main, probe))) => match main.subscribe(ev_tx.clone()) {
                    Ok(()) => {
                        let probe = probe.unwrap_or_else(|e| {
                            tracing::warn!(error = %crate::error::report(&e), "probe connection not reopened; probes share the main connection");
                            main.clone()
                        });
                        *self.main.write().unwrap_or_else(|e| e.into_inner()) = main;
                        *self.probe.write().unwrap_or_else(|e| e.into_inner()) = probe;
                        return;
                    }
                    Err(e) => {
                        tracing::error!(error = %crate::error::report(&e), "resubscribe failed")
                    }
                },
                Ok(Err(e)) => {
                    tracing::warn!(error = %crate::error::report(&e), "libvirt still unavailable")
                }
                Err(e) => tracing::warn!(error = %e, "reconnect worker failed"),
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(5));
        }
    }
}

/// The daemon's shared state. Each piece of mutable state has one owner: the service table,
/// health, profiling; the configuration and the connections are swapped whole.
pub struct Daemon {
    cfg: RwLock<Arc<Config>>,
    config_path: PathBuf,
    conns: Connections,
    net: Netlink,
    metrics: Arc<Metrics>,
    table: Mutex<ServiceTable>,
    health: Mutex<HealthMonitor>,
    coord: Arc<dyn Coordinator>,
    notes: mpsc::UnboundedSender<Note>,
    started_unix_ms: u64,
    /// Collectors, profile manager, golden-image choices.
    prof: profiles::Profiling,
    /// What happened, for `understudy events`.
    events: EventLog,
    /// Running captures of primaries' traffic.
    captures: crate::capture::Captures,
    /// Every service's canary.
    canaries: Arc<crate::canary::Canaries>,
    /// Standby verifications: running and last outcomes.
    verifications: crate::canary::verify::Verifications,
    /// Lost hosts and self-fencing: whether a failover may start now, the peers' view.
    hostloss: hostloss::HostLoss,
    /// Primaries' virtlockd connections held past their QEMU's death (a data disk's handover
    /// waits for their release instead of libvirt's stop).
    leases: crate::libvirt::LeaseHandbacks,
}

type Shared = Arc<Daemon>;

impl Daemon {
    fn cfg(&self) -> Arc<Config> {
        self.cfg.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn hv(&self) -> Hypervisor {
        self.conns.main()
    }

    /// The connection for guest probes (pings, grace checks), kept apart from [`Self::hv`].
    fn probe_hv(&self) -> Hypervisor {
        self.conns.probe()
    }

    fn class(&self, name: &str) -> ClassConfig {
        self.cfg().class.get(name).cloned().unwrap_or_default()
    }

    fn limits(&self) -> impl Fn(&str) -> ClassLimits {
        let cfg = self.cfg();
        move |class| {
            let c = cfg.class.get(class).cloned().unwrap_or_default();
            ClassLimits {
                shadows: c.shadows,
                promote_retry_limit: c.promote_retry_limit,
                pool: c.pool.map(|p| p.primaries_per_shadow),
            }
        }
    }

    /// The service table. Held only for a transition or a read, never across an await.
    fn table(&self) -> MutexGuard<'_, ServiceTable> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Health state. Held only briefly, never across an await.
    fn health(&self) -> MutexGuard<'_, HealthMonitor> {
        self.health.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Feeds one observation to a domain's hang detector.
    fn observe(&self, domain: &str, class: &ClassConfig, event: HeartbeatEvent) {
        self.health().observe(domain, class, event);
    }
}

/// Turns the host's KSM on when a class asks for it (`ksm = true`). It is never turned off
/// here: it is the host's policy, which other software may rely on too.
fn apply_ksm(cfg: &Config) {
    let wanted: Vec<&str> = cfg
        .class
        .iter()
        .filter(|(_, c)| c.ksm)
        .map(|(n, _)| n.as_str())
        .collect();
    if wanted.is_empty() {
        return;
    }
    match crate::monitor::ksm::set_run(Path::new("/"), 1) {
        Ok(0) => {
            tracing::info!(classes = ?wanted, "ksm: samepage merging turned on (/sys/kernel/mm/ksm/run = 1)")
        }
        Ok(_) => tracing::info!(classes = ?wanted, "ksm: samepage merging already on"),
        Err(e) => {
            tracing::error!(classes = ?wanted, error = %crate::error::report(&e), "ksm: cannot turn samepage merging on; shadows stand by unmerged")
        }
    }
}

/// Loads the configuration and makes the state directory absolute: libvirt resolves the
/// overlay and console paths we hand it in its own working directory, not ours.
pub fn load_config(path: &Path) -> Result<Config, DaemonError> {
    let mut cfg = Config::load(path)?;
    let dir = &cfg.daemon.state_dir;
    let unusable = |source| DaemonError::StateDir {
        path: dir.clone(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(unusable)?;
    cfg.daemon.state_dir = std::fs::canonicalize(dir).map_err(unusable)?;
    Ok(cfg)
}

/// Runs the daemon on `cfg` (loaded from `config_path` by [`load_config`], which `reload`
/// reads again) until SIGINT/SIGTERM.
pub async fn run(config_path: PathBuf, cfg: Config) -> Result<(), DaemonError> {
    let cfg = Arc::new(cfg);
    let conns = Connections::open(EventLoop::start()?, &cfg)?;
    let (note_tx, mut notes) = mpsc::unbounded_channel();
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    conns.main().subscribe(ev_tx.clone())?;
    let net = Netlink::new()?;
    let metrics = Arc::new(Metrics::new());
    let metrics_server = crate::api::metrics::MetricsServer::bind(cfg.daemon.metrics_listen)
        .await
        .map_err(|source| DaemonError::Metrics {
            addr: cfg.daemon.metrics_listen,
            source,
        })?;
    tokio::spawn(metrics_server.serve(metrics.clone()));
    let events = EventLog::new();
    // `canary promote` waits for a shadow carrying the change to boot, then switches over.
    let control = ControlServer::bind(&cfg.daemon.control_socket)?
        .with_events(events.clone())
        .with_reply_timeout(Duration::from_secs(600));
    let (req_tx, mut requests) = mpsc::channel::<(Request, oneshot::Sender<Response>)>(64);
    tokio::spawn(control.serve(req_tx));
    let coord = cluster::coordinator(&cfg)?;
    tracing::info!(uri = %cfg.daemon.libvirt_uri, socket = %cfg.daemon.control_socket.display(), metrics = %cfg.daemon.metrics_listen, host = %coord.host(), cluster = cfg.cluster.is_some(), "understudy daemon started");

    let prof = profiles::Profiling::open(&cfg, metrics.clone(), events.clone());
    let d: Shared = Arc::new(Daemon {
        cfg: RwLock::new(cfg.clone()),
        config_path,
        conns,
        net,
        metrics,
        table: Mutex::new(ServiceTable::new()),
        health: Mutex::new(HealthMonitor::new(Instant::now())),
        coord,
        notes: note_tx,
        started_unix_ms: crate::clock::now_unix_ms(),
        prof,
        events,
        captures: crate::capture::Captures::new(),
        canaries: canary::book(&cfg.daemon.state_dir),
        verifications: crate::canary::verify::Verifications::new(),
        hostloss: hostloss::HostLoss::default(),
        leases: crate::libvirt::LeaseHandbacks::default(),
    });
    profiles::start(&d);
    apply_ksm(&cfg);
    recover::reconcile(&d).await;
    cluster::start(&d);
    hostloss::start(&d);
    let mut cluster_events = crosshost::join(&d).await;

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
    crate::systemd::ready(&crate::systemd::status_line(d.table().iter()));
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler cannot fail in a tokio runtime");
    loop {
        tokio::select! {
            Some(ev) = ev_rx.recv() => on_libvirt_event(&d, ev, &ev_tx).await,
            Some(note) = notes.recv() => on_note(&d, note).await,
            ev = crosshost::next(&mut cluster_events) => crosshost::on_event(&d, ev).await,
            Some((req, reply)) = requests.recv() => {
                let d = d.clone();
                tokio::spawn(async move {
                    let resp = requests::handle(&d, req).await;
                    let _ = reply.send(resp);
                });
            }
            _ = heartbeat.tick() => checks::send_heartbeats(&d),
            _ = housekeeping.tick() => {
                recover::ensure_all_shadows(&d);
                checks::audit_bridges(&d);
                checks::refresh_routed(&d);
                checks::publish_gauges(&d);
                crate::systemd::alive(&crate::systemd::status_line(d.table().iter()));
                checks::replace_stale_tpm_shadows(&d);
                tiers::switch_tiers(&d);
                canary::sync_captures(&d);
                canary::schedule_verifications(&d);
            }
            _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT: stopping; shadows stay as they are"); break; }
            _ = sigterm.recv() => { tracing::info!("SIGTERM: stopping; shadows stay as they are"); break; }
        }
    }
    crate::systemd::stopping();
    Ok(())
}

/// Carries out what a transition of the table asked for, in order.
async fn execute(d: &Shared, actions: Vec<Action>) {
    for action in actions {
        match action {
            Action::WatchPrimary { service, domain } => {
                recover::watch_primary(d, &service, &domain)
            }
            Action::RemoveShadow { service, shadow } => {
                recover::remove_shadow(d, &service, &shadow).await
            }
            Action::EnsureShadows => recover::ensure_all_shadows(d),
            Action::EnsureShadowsLater => {
                let d = d.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(REPLACEMENT_DELAY).await;
                    recover::ensure_all_shadows(&d);
                });
            }
            Action::Failover {
                service,
                from,
                trigger,
            } => start_failover(d, &service, &from, trigger, Instant::now()),
            Action::FenceGrace { service, old } => checks::spawn_fence_grace(d, &service, &old),
            Action::RetirePrimary { service, old } => {
                let class = d.table().get(&service).map(|s| s.class.clone());
                profiles::stop_collector(d, &service);
                recover::retire_primary(d, &service, &class.unwrap_or_default(), &old).await;
            }
            Action::Unfence { service, domain } => {
                recover::unfence_primary(d, &service, &domain).await
            }
            Action::GivenBack { service, domain } => {
                recover::given_back(d, &service, &domain).await
            }
        }
    }
}

/// Begins a failover of `service` away from `from`, unless the table refuses (one is running,
/// the domain is no longer the primary, or no shadow is ready: then the service is down and
/// the next ready shadow takes over).
fn start_failover(d: &Shared, service: &str, from: &str, trigger: Trigger, at: Instant) {
    if !d.hostloss.may_fail_over(d, service, from, trigger) {
        return;
    }
    let start = d.table().begin_failover(service, from, trigger);
    match start {
        Ok(start) => launch_promotion(d, service, trigger, at, start, None),
        Err(e @ Refused::NoShadow { .. }) => {
            let elsewhere = d
                .table()
                .get(service)
                .and_then(|s| s.primary_host().cloned());
            if elsewhere.is_none() {
                tracing::error!(service, from, %trigger, "primary failed: {e}; the next shadow to be ready takes over");
                crosshost::report_failure(d, service, from, trigger);
            }
        }
        Err(e) => tracing::debug!(service, from, %trigger, "no failover: {e}"),
    }
}

/// Runs the promotion the table has begun, and reports back as [`Note::FailoverDone`].
/// `owner_generation`: the one a failure report from the old primary's host names.
fn launch_promotion(
    d: &Shared,
    service: &str,
    trigger: Trigger,
    at: Instant,
    start: table::FailoverStart,
    owner_generation: Option<u64>,
) {
    let class = d.class(&start.class);
    let handover = handover_of(&class, &d.cfg());
    let mut shadow = start.shadow;
    if start.pooled {
        // Planned from the template, which has none of the primary's data disks: the
        // promotion reads them from the old primary's definition.
        shadow.data_disks = None;
    }
    let promotion = Promotion {
        identity: start
            .pooled
            .then(|| profiles::promotion_identity(d, service)),
        handover,
        network: class.network,
        service: service.to_string(),
        class: start.class,
        old_primary: start.old_primary,
        old_host: start.old_host,
        old_taps: start.old_taps,
        owner_generation,
        shadow_generation: start.shadow_generation,
        shadow,
        trigger,
        detected_at: at,
        // Outside the table's lock; cheap, and applied only once traffic is restored.
        profile: profiles::promotion_profile(d, service),
    };
    d.events.emit(
        Some(service),
        EventKind::FailoverStarted {
            from: promotion.old_primary.clone(),
            to: promotion.shadow.name.clone(),
            trigger: trigger.to_string(),
        },
    );
    profiles::stop_collector(d, service);
    d.metrics.inc_detection(trigger);
    let d = d.clone();
    let service = service.to_string();
    tokio::spawn(async move {
        let shadow = promotion.shadow.name.clone();
        let result = promote(&d.hv(), &d.net, d.coord.as_ref(), &d.leases, promotion).await;
        let _ = d.notes.send(Note::FailoverDone {
            service,
            shadow,
            result,
        });
    });
}

/// What a promotion of a service of `class` hands over besides the network; `None` when the
/// class gives no disk the data role.
fn handover_of(class: &ClassConfig, cfg: &Config) -> Option<Handover> {
    let disks = DiskPolicy::of_class(class, false);
    disks.may_hand_over().then(|| Handover {
        disks,
        commands: class.promote_commands.clone(),
        command_timeout: class.promote_command_timeout(),
        agent_max_reply: cfg.monitor.agent_max_reply_bytes,
    })
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
        } => on_shadow_done(d, &service, &name, result).await,
        Note::FailoverDone {
            service,
            shadow,
            result,
        } => on_failover_done(d, &service, &shadow, result).await,
        Note::Heartbeat {
            domain,
            ping,
            at,
            at_unix_ms,
        } => {
            let Some((service, class)) = d
                .table()
                .service_of_active(&domain)
                .map(|s| (s.name.clone(), s.class.clone()))
            else {
                return;
            };
            if ping.is_ok() {
                d.table().heartbeat(&service, at_unix_ms);
            } else {
                d.metrics.inc_heartbeat_failure(&service);
            }
            d.health()
                .ping_done(&domain, &d.class(&class), at, at_unix_ms, ping);
            checks::judge_health(d, &service, &domain);
        }
        Note::FenceGraceOver {
            service,
            old,
            answered,
        } => {
            d.events.emit(
                Some(&service),
                if answered {
                    EventKind::FalseFailover {
                        domain: old.clone(),
                    }
                } else {
                    EventKind::Fenced {
                        domain: old.clone(),
                        action: "silent through the grace period; destroyed".into(),
                    }
                },
            );
            if answered {
                d.health().false_failover();
                d.metrics.inc_false_failover(&service);
                tracing::error!(%service, old_primary = %old, "FALSE FAILOVER: the fenced primary's agent answered after it was declared hung");
            } else {
                tracing::info!(%service, old_primary = %old, "fenced primary stayed silent through the grace period; destroying it");
            }
            // Off the loop: libvirt's destroy of a stopped QEMU would wait out its SIGTERM grace
            // (about 10 s) first, and the loop would judge no other service meanwhile. A SIGKILL
            // through a pidfd ends it at once, stopped or not; destroy then only tidies up.
            let hv = d.hv();
            tokio::spawn(async move {
                let run_dir = std::path::Path::new(crate::libvirt::QEMU_RUN_DIR);
                if let Err(why) =
                    crate::libvirt::kill_qemu(run_dir, &old, Duration::from_secs(10)).await
                {
                    tracing::warn!(%service, old_primary = %old, %why, "cannot kill fenced primary's QEMU; asking libvirt");
                }
                let o = old.clone();
                if let Err(e) = hv
                    .run("destroy fenced primary", move |hv| hv.destroy(&o))
                    .await
                {
                    tracing::warn!(%service, old_primary = %old, error = %crate::error::report(&e), "cannot destroy fenced primary");
                }
            });
        }
    }
}

async fn on_shadow_done(
    d: &Shared,
    service: &str,
    name: &str,
    result: Result<Shadow, FailoverError>,
) {
    let answer = match result {
        Ok(shadow) => {
            d.events.emit(
                Some(service),
                EventKind::ShadowReady {
                    shadow: shadow.name.clone(),
                },
            );
            let ready = d.table().shadow_ready(service, shadow);
            if ready.is_ok() {
                crosshost::shadow_ready(d, service);
            }
            ready
        }
        Err(e) => {
            // A spec that cannot be cloned will not clone next time either.
            let unprotectable = matches!(
                e,
                FailoverError::Clone { .. }
                    | FailoverError::Xml { .. }
                    | FailoverError::Plan { .. }
            );
            let why = crate::error::report(&e);
            tracing::error!(service, shadow = name, error = %why, "shadow provisioning failed");
            d.events.emit(
                Some(service),
                EventKind::ShadowFailed {
                    shadow: name.to_string(),
                    error: why.clone(),
                },
            );
            let answer =
                d.table()
                    .shadow_failed(service, name, &why, unprotectable, Instant::now());
            answer.map(|(actions, wait)| {
                tracing::warn!(
                    service,
                    retry_in_s = wait.as_secs(),
                    "next shadow provisioning attempt delayed"
                );
                actions
            })
        }
    };
    match answer {
        Ok(actions) => {
            if actions.iter().any(|a| matches!(a, Action::Failover { .. })) {
                tracing::warn!(
                    service,
                    shadow = name,
                    "shadow ready for a service that is down; promoting it"
                );
            }
            execute(d, actions).await
        }
        Err(e) => tracing::warn!(service, shadow = name, "provisioning result ignored: {e}"),
    }
}

async fn on_failover_done(
    d: &Shared,
    service: &str,
    shadow: &str,
    result: Result<Promoted, PromotionFailed>,
) {
    let record = match &result {
        Ok(p) => &p.record,
        Err(f) => &f.record,
    };
    for kind in failover_events(record) {
        d.events.emit(Some(service), kind);
    }
    let lost_to = match &result {
        Err(PromotionFailed {
            error: FailoverError::ClaimLost { source, .. },
            ..
        }) => match &**source {
            crate::cluster::CoordError::Conflict { current, .. }
                if current.host != *d.coord.host() =>
            {
                Some(current.clone())
            }
            _ => None,
        },
        _ => None,
    };
    let answer = match result {
        Ok(p) => {
            let r = &p.record;
            d.metrics
                .record_failover(service, r.trigger, true, &r.steps, r.outage_ms);
            let from_elsewhere = d.table().get(service).is_some_and(|s| {
                matches!(
                    s.state,
                    ServiceState::FailingOver {
                        from_host: Some(_),
                        ..
                    }
                )
            });
            let answer = d
                .table()
                .failover_succeeded(service, shadow, p.record, p.taps);
            crosshost::promoted(d, service, from_elsewhere).await;
            answer
        }
        // Another host's claim won: the shadow here was never resumed and stays paused.
        Err(_) if lost_to.is_some() => {
            let winner = lost_to.expect("checked above");
            tracing::warn!(service, shadow, winner = %winner.domain, host = %winner.host, "another host's promotion won; the shadow here stays paused");
            d.table().failover_lost(service, shadow, &winner)
        }
        Err(f) => {
            let r = &f.record;
            d.metrics
                .record_failover(service, r.trigger, false, &r.steps, r.outage_ms);
            let class = d.table().get(service).map(|s| s.class.clone());
            let limits = d.limits()(&class.unwrap_or_default());
            let answer = d.table().failover_failed(service, shadow, f.record, limits);
            if let Ok(actions) = &answer {
                if !actions.iter().any(|a| matches!(a, Action::Failover { .. })) {
                    tracing::error!(service, "promotion retries exhausted; service stays down");
                }
            }
            answer
        }
    };
    match answer {
        Ok(actions) => execute(d, actions).await,
        Err(e) => tracing::error!(service, shadow, "failover result not applied: {e}"),
    }
}

async fn on_libvirt_event(d: &Shared, ev: DomainEvent, ev_tx: &mpsc::UnboundedSender<DomainEvent>) {
    tracing::info!(event = ?ev, "libvirt event");
    match ev {
        DomainEvent::Lifecycle { domain, event } => on_lifecycle(d, &domain, event).await,
        DomainEvent::Agent { domain, state } => {
            if state == AgentState::Disconnected {
                tracing::warn!(%domain, "guest agent disconnected");
            }
            let class = d
                .table()
                .service_of_active(&domain)
                .map(|s| s.class.clone());
            if let Some(class) = class {
                let at = d.health().now();
                let ev = match state {
                    AgentState::Connected => HeartbeatEvent::AgentConnected { at },
                    AgentState::Disconnected => HeartbeatEvent::AgentDisconnected { at },
                };
                d.observe(&domain, &d.class(&class), ev);
            }
        }
        DomainEvent::ConnectionClosed { reason } => {
            tracing::error!(reason, "libvirt connection closed; reconnecting");
            d.conns.reopen(d.cfg(), ev_tx).await;
            d.metrics.inc_libvirt_reconnect();
            tracing::info!("reconnected to libvirt");
            // Domains may have changed while we were blind; rebuild from libvirt without
            // failing over anything that is merely unknown to us.
            let names = d.table().names();
            for name in names {
                recover::refresh_active(d, &name).await;
            }
        }
    }
}

async fn on_lifecycle(d: &Shared, domain: &str, event: LifecycleEvent) {
    let member = d.table().member(domain);
    match (member, event) {
        (Some(Member::Active { service }), e) if e.is_failure() => {
            start_failover(d, &service, domain, Trigger::Lifecycle, Instant::now());
        }
        (Some(Member::Shadow { service, .. }), e)
            if e.is_failure()
                || e == LifecycleEvent::StoppedDestroyed
                || e == LifecycleEvent::StoppedShutdown =>
        {
            // Refused while it is being promoted: the promotion decides its fate.
            let lost = d.table().shadow_lost(&service, domain);
            if let Ok(actions) = lost {
                tracing::warn!(%service, shadow = domain, ?e, "shadow stopped; it will be recreated");
                execute(d, actions).await;
            }
        }
        (None, LifecycleEvent::Started | LifecycleEvent::Defined) => {
            let Some(class) = d.cfg().class_for(domain).map(|(c, _)| c.to_string()) else {
                return;
            };
            let dn = domain.to_string();
            let tagged = d
                .hv()
                .run("read metadata", move |hv| hv.metadata(&dn, META_NS))
                .await
                .ok()
                .flatten();
            if tagged.is_none() {
                let running = event == LifecycleEvent::Started;
                recover::protect_new(d, domain, &class, running).await;
            }
        }
        (Some(Member::Active { service }), LifecycleEvent::Started) => {
            // Only a stopped service changes: someone started its primary again.
            let started = d.table().primary_started(&service).map(|s| s.class.clone());
            let Ok(class) = started else { return };
            // The record in libvirt must say it runs: a restarted daemon that read "stopped"
            // would not fail it over.
            let meta = primary_meta(&service, &class, domain, MemberState::Active);
            let dn = domain.to_string();
            if let Err(e) = d
                .hv()
                .run("mark primary active", move |hv| write_meta(hv, &dn, &meta))
                .await
            {
                tracing::error!(%service, error = %crate::error::report(&e), "cannot mark the started primary active");
            }
            recover::refresh_active(d, &service).await;
        }
        _ => {}
    }
}

/// The events of a finished promotion, from its record: each step in order, the fencing of the
/// old primary once its step is done, and the outcome.
fn failover_events(r: &crate::failover::FailoverRecord) -> Vec<EventKind> {
    let mut out = Vec::new();
    let last = r.steps.len().saturating_sub(1);
    for (i, kind) in EventKind::steps(&r.to, &r.steps).into_iter().enumerate() {
        let fence = r.steps[i].name == "fence";
        out.push(kind);
        // A step recorded last in a failed promotion is the one that failed.
        if fence && (r.ok || i < last) {
            let action = match r.trigger {
                Trigger::Manual => "cut off its bridge and paused",
                Trigger::Heartbeat => "cut off its bridge (hung; watched for a grace period)",
                _ => "its QEMU is gone; taps cut",
            };
            out.push(EventKind::Fenced {
                domain: r.from.clone(),
                action: action.into(),
            });
        }
    }
    out.push(EventKind::FailoverFinished {
        from: r.from.clone(),
        to: r.to.clone(),
        ok: r.ok,
        outage_ms: r.outage_ms,
        error: r.error.clone(),
    });
    out
}
