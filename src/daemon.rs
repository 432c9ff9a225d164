//! The long-running orchestrator: watches libvirt, keeps every protected service's shadows
//! ready, fails over when a primary dies, and answers the control socket.
//!
//! One loop owns the decisions; slow work (provisioning, promotion, pings) runs in tasks that
//! report back over a channel. The truth lives in libvirt (domain metadata), so a restarted
//! daemon rebuilds everything in [`Daemon::reconcile`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::api::control::ControlServer;
use crate::api::metrics::Metrics;
use crate::api::protocol::{
    DaemonInfo, DomainStatus, ErrorKind, Request, Response, ServiceStatus, ShadowState,
    ShadowStatus, StatusReport,
};
use crate::config::{ClassConfig, Config};
use crate::domain_xml::{MemberState, Role, UnderstudyMeta, META_NS};
use crate::failover::promote::{promote, Promoted, Promotion, Trigger};
use crate::failover::shadow::{
    isolate_tap, live_taps, member_meta, provision, shadow_generation, shadow_name, write_meta,
    ShadowRequest,
};
use crate::failover::{now_unix_ms, FailoverError, Service, ServiceState, Shadow};
use crate::libvirt::{
    qemu_pid, AgentState, DomainEvent, EventLoop, Hypervisor, LibvirtError, LifecycleEvent,
    QemuProcess, RunState,
};
use crate::monitor::heartbeat::PingFailure;
use crate::monitor::{Health, HeartbeatConfig, HeartbeatEvent, HeartbeatTracker, MonoMs};
use crate::net::Netlink;

/// How long a primary fenced for a hang is kept (isolated, off the bridge) to see whether it
/// was really dead: an agent answer in this window makes the failover count as false.
const FENCE_GRACE: Duration = Duration::from_secs(10);

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
        result: Result<Promoted, String>,
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
}

type Shared = Arc<Daemon>;

impl Daemon {
    fn cfg(&self) -> Arc<Config> {
        self.cfg.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn hv(&self) -> Hypervisor {
        self.hv.read().unwrap_or_else(|e| e.into_inner()).clone()
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

/// Per-service state of the external probe.
#[derive(Debug, Default, Clone)]
struct ProbeState {
    last_run: Option<Instant>,
    failing_since: Option<Instant>,
    counted: bool,
    in_flight: bool,
}

fn heartbeat_config(class: &ClassConfig) -> HeartbeatConfig {
    HeartbeatConfig {
        interval: Duration::from_millis(class.heartbeat_interval_ms),
        timeout: Duration::from_millis(class.heartbeat_timeout_ms),
        misses: class.heartbeat_misses,
        ..HeartbeatConfig::default()
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

    let d: Shared = Arc::new(Daemon {
        cfg: RwLock::new(cfg.clone()),
        config_path,
        hv: RwLock::new(hv),
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
    });
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
    let mut housekeeping = tokio::time::interval(Duration::from_secs(5));
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
            _ = housekeeping.tick() => ensure_all_shadows(&d),
            _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT: stopping; shadows stay as they are"); break; }
            _ = sigterm.recv() => { tracing::info!("SIGTERM: stopping; shadows stay as they are"); break; }
        }
    }
    Ok(())
}

/// Rebuilds the service table from libvirt: metadata first, then protection rules for
/// domains we have not tagged yet. Safe to run at any time.
async fn reconcile(d: &Shared) {
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
                    (_, MemberState::Stopped) => ServiceState::Stopped,
                    (true, _) => ServiceState::Provisioning,
                    (false, _) => ServiceState::Down("primary not running at daemon start".into()),
                };
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
            if dom.state.is_active() {
                protect_new(d, &dom.name, class).await;
            }
        }
    }
    ensure_all_shadows(d);
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

fn new_service(name: &str, class: &str, active: &str, state: ServiceState) -> Service {
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
    }
}

/// After a restart: settle half-done work of one service.
async fn recover_service(d: &Shared, name: &str) {
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
async fn repark_shadow(d: &Shared, service: &str, shadow: &str) -> Result<(), FailoverError> {
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
async fn refresh_active(d: &Shared, service: &str) {
    let Some(active) = d.services().get(service).map(|s| s.active.clone()) else {
        return;
    };
    let bridges = live_taps(&d.hv(), &active).await.unwrap_or_default();
    if let Some(s) = d.services().get_mut(service) {
        s.active_taps = bridges;
    }
    watch_primary(d, service, &active);
}

/// Opens a pidfd on the primary's QEMU and reports its exit.
fn watch_primary(d: &Shared, service: &str, domain: &str) {
    let pid = match qemu_pid(std::path::Path::new(crate::libvirt::QEMU_RUN_DIR), domain) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(service, domain, error = %crate::error_chain(&e), "no QEMU pid; relying on libvirt events");
            return;
        }
    };
    let proc = match QemuProcess::open(domain, pid) {
        Ok(p) => p,
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
async fn protect_new(d: &Shared, domain: &str, class: &str) {
    if d.services().contains_key(domain) {
        return;
    }
    let meta = member_meta(domain, class, Role::Primary, 0, MemberState::Active);
    let dn = domain.to_string();
    if let Err(e) = d
        .hv()
        .run("tag primary", move |hv| write_meta(hv, &dn, &meta))
        .await
    {
        tracing::error!(domain, error = %e, cause = %crate::error_chain(&e), "cannot tag primary; not protected");
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
fn ensure_all_shadows(d: &Shared) {
    let cfg = d.cfg();
    let mut to_start = Vec::new();
    {
        let mut services = d.services();
        for svc in services.values_mut() {
            if !matches!(
                svc.state,
                ServiceState::Provisioning | ServiceState::Protected
            ) {
                continue;
            }
            let want = cfg.class.get(&svc.class).map(|c| c.shadows).unwrap_or(1) as usize;
            let have = svc
                .shadows
                .iter()
                .filter(|s| matches!(s.state, ShadowState::Booting | ShadowState::Paused))
                .count();
            if have >= want {
                if svc.shadows.iter().all(|s| s.state == ShadowState::Paused) {
                    svc.state = ServiceState::Protected;
                }
                continue;
            }
            svc.state = ServiceState::Provisioning;
            let next = svc
                .shadows
                .iter()
                .filter_map(|s| shadow_generation(&svc.name, &s.name))
                .chain(shadow_generation(&svc.name, &svc.active))
                .max()
                .unwrap_or(0)
                + 1;
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
            agent_max_reply: cfg.monitor.agent_max_reply_bytes as usize,
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
async fn remove_shadow(d: &Shared, service: &str, shadow: &str) {
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

/// Begins a failover of `service` away from `from`, unless one is running or pointless.
fn start_failover(d: &Shared, service: &str, from: &str, trigger: Trigger, at: Instant) {
    let promotion = {
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
        }
    };
    d.metrics.inc_detection(trigger.label());
    let d2 = d.clone();
    let service = service.to_string();
    tokio::spawn(async move {
        let shadow = promotion.shadow.name.clone();
        let (result, record) = match promote(&d2.hv(), &d2.net, promotion).await {
            Ok(p) => {
                let r = p.record.clone();
                (Ok(p), r)
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

/// Watches a primary fenced for a hang: if its agent answers during [`FENCE_GRACE`] it was
/// alive after all (a false failover); either way it is destroyed afterwards.
fn spawn_fence_grace(d: &Shared, service: &str, old: &str) {
    let (hv, notes) = (d.hv(), d.notes.clone());
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
                    if let Some(s) = svc.shadows.iter_mut().find(|s| s.name == name) {
                        *s = shadow;
                    }
                    if svc.state == ServiceState::Provisioning
                        && svc.shadows.iter().all(|s| s.state == ShadowState::Paused)
                    {
                        svc.state = ServiceState::Protected;
                    }
                }
            }
            Err(e) => {
                tracing::error!(%service, shadow = %name, error = %e, "shadow provisioning failed");
                remove_shadow(d, &service, &name).await;
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
                        Some(shadow)
                    }
                    Err(e) => {
                        if let Some(s) = svc.shadows.iter_mut().find(|s| s.name == shadow) {
                            s.state = ShadowState::Failed;
                        }
                        svc.state = ServiceState::Down(format!("failover failed: {e}"));
                        None
                    }
                }
            };
            if let Some(active) = new_active {
                watch_primary(d, &service, &active);
                ensure_all_shadows(d);
            }
        }
        Note::Heartbeat {
            domain,
            ping,
            at,
            at_unix_ms,
        } => {
            d.pinging
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&domain);
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

/// Turns the tracker's verdict into status and, for a hang, a failover.
fn judge_health(d: &Shared, service: &str, domain: &str) {
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
                (None, LifecycleEvent::Started) => {
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
                            protect_new(d, &domain, &class).await;
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
                        if let Some(s) = d.services().get_mut(&service) {
                            s.state = ServiceState::Provisioning;
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

fn send_heartbeats(d: &Shared) {
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
            let hv = d.hv();
            let timeout = Duration::from_millis(class.heartbeat_timeout_ms);
            let d2 = d.clone();
            tokio::spawn(async move {
                let dn = domain.clone();
                let ping = hv.run("heartbeat", move |hv| {
                    hv.agent_command(&dn, r#"{"execute":"guest-ping"}"#, timeout, max_reply)
                });
                let ping = match tokio::time::timeout(timeout, ping).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(LibvirtError::AgentTimeout { .. })) | Err(_) => {
                        Err(PingFailure::Timeout)
                    }
                    Ok(Err(LibvirtError::Domain { source, .. }))
                        if source
                            .code()
                            .is(virt::error::ErrorNumber::AgentUnresponsive) =>
                    {
                        Err(PingFailure::NotConnected)
                    }
                    Ok(Err(_)) => Err(PingFailure::TransportError),
                };
                let at = d2.now_mono();
                let _ = d2.notes.send(Note::Heartbeat {
                    domain,
                    ping,
                    at,
                    at_unix_ms: now_unix_ms(),
                });
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
fn repair_taps(d: &Shared, service: &str) {
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
fn isolate_standby_taps(d: &Shared, service: &str) {
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
fn run_probe(d: &Shared, service: &str, class: &ClassConfig, probe: crate::config::ProbeConfig) {
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

fn unknown_service(d: &Shared, name: &str) -> Response {
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

async fn handle_request(d: &Shared, req: Request) -> Response {
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
        Request::ShadowRebuild { service } | Request::ShadowReinit { service, .. } => {
            let Some(svc) = d.services().get(&service).cloned() else {
                return unknown_service(d, &service);
            };
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
async fn wait_failover(d: &Shared, service: &str, previous: Option<u64>) -> Response {
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

async fn status(d: &Shared) -> StatusReport {
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
    d.metrics.set_shadow_states(
        services
            .iter()
            .flat_map(|s| s.shadows.iter().map(|x| x.state)),
    );
    d.metrics
        .set_service_states(services.iter().map(|s| s.state.label()));
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
            DomainStatus {
                last_heartbeat_unix_ms: beats.get(&dom.name).copied(),
                health: if beats.contains_key(&dom.name) {
                    "answering".into()
                } else {
                    "-".into()
                },
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
