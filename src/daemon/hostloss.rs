//! Losing a host, with a `[cluster]` (README "Losing a host"): the direct heartbeats between
//! daemons, the decision that another host is lost, fencing it, promoting its services here,
//! and fencing this host itself when it cannot renew its lease.
//!
//! One task ([`start`]) owns the heartbeat socket and the [`Peers`] it fills, follows this
//! host's lease and the other hosts' records, and every heartbeat period:
//! - sends a beat to every registered host;
//! - checks whether this host must fence itself ([`liveness::self_fence_due`]) and does so:
//!   every primary's taps cut and its QEMU killed through a pidfd, then no promotion here until
//!   the lease is renewed again;
//! - judges each suspect host whose primaries have a ready shadow here ([`liveness::judge`]):
//!   asks its libvirtd (a TCP connection to the port its URI names), runs its fence device,
//!   and once it is lost and safe, promotes the shadows here (the owner record's
//!   compare-and-swap lets one host win each service, as for a crash);
//! - probes the primaries of the other hosts with their class probes ([`Reach`]) and says in
//!   its beats which it cannot reach, and which of its own its probe reaches; a host cut off
//!   the switch only ([`reach::judge_cut`]) is powered off through its fence device, then its
//!   services are promoted here (trigger `host_unreachable`).
//!
//! Slow work (libvirtd checks, fence agents) runs in tasks of its own and reports back, so
//! the task's own clock (self-fencing) never waits on it.
//!
//! [`HostLoss`] is the part the rest of the daemon sees: whether a failover may start now
//! (not while this host is self-fenced or out of touch with etcd: those are deferred and made
//! once etcd answers again), and the peers' view for `hosts`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use crate::cluster::fence::{FenceDevice, FenceError, Fenced};
use crate::cluster::liveness::{
    self, libvirt_endpoint, Beat, Judgement, LostHow, PeerView, Peers, Suspect, BEAT_VERSION,
    MAX_BEAT_BYTES,
};
use crate::cluster::reach::{self, Cut, ProbeTicket, Reach};
use crate::cluster::watchdog::Watchdog;
use crate::cluster::{ClusterEvent, HostId, Mode};
use crate::config::ClusterConfig;
use crate::events::EventKind;
use crate::failover::shadow::isolate_tap;
use crate::failover::Trigger;

use super::{start_failover, ServiceState, Shared};

/// Bound on a connection attempt to a suspect host's libvirtd.
const LIBVIRT_CHECK_TIMEOUT: Duration = Duration::from_millis(300);
/// Bound on its answer once connected (a busy libvirtd is not a lost one).
const LIBVIRT_REPLY_TIMEOUT: Duration = Duration::from_millis(500);
/// A libvirtd check is repeated this long after the last one ended, while its host stays
/// suspect.
const LIBVIRT_CHECK_EVERY: Duration = Duration::from_millis(200);
/// A check's result stands until the next one has had time to end.
const LIBVIRT_RESULT_VALID: Duration = Duration::from_secs(2);
/// A peer silent for this many heartbeat periods (beats already missed, before it is suspect)
/// has its libvirtd asked already, so that the answer is in when suspicion comes: a lost host
/// costs the longer of the two, not their sum.
const EARLY_CHECK_BEATS: u32 = 2;
/// How often the registered hosts are read again.
const HOSTS_EVERY: Duration = Duration::from_secs(1);
/// Bound on killing a primary's QEMU when fencing this host.
const SELF_KILL_TIMEOUT: Duration = Duration::from_secs(5);
/// Hosts that would fence the same lost host take turns this far apart (by name among the
/// hosts alive and heard), so one fence agent powers it off and the next finds it off.
const FENCE_STAGGER: Duration = Duration::from_secs(1);

/// What the daemon's other parts see of host-loss handling.
#[derive(Default)]
pub(super) struct HostLoss {
    /// This host fenced itself: no promotion here until its lease is renewed again.
    self_fenced: AtomicBool,
    /// Failovers asked while this host could not promote, by service: (from, trigger).
    deferred: Mutex<BTreeMap<String, (String, Trigger)>>,
    /// The peers as last seen, for `hosts`.
    view: Mutex<Vec<PeerView>>,
}

impl HostLoss {
    /// Whether a failover of `service` may start now. In a cluster, not while this host is
    /// self-fenced or its lease is not renewed (a promotion must claim the owner record in
    /// etcd, and an isolated host must not serve): the request is kept and made once the
    /// lease is renewed again.
    pub(super) fn may_fail_over(
        &self,
        d: &Shared,
        service: &str,
        from: &str,
        trigger: Trigger,
    ) -> bool {
        let mode = d.coord.lease().borrow().mode;
        let fenced = self.self_fenced.load(Ordering::SeqCst);
        if mode == Mode::Standalone || (mode == Mode::Connected && !fenced) {
            return true;
        }
        tracing::warn!(service, from, %trigger, mode = mode.label(), self_fenced = fenced, "failover deferred until etcd answers again");
        self.lock_deferred()
            .insert(service.to_string(), (from.to_string(), trigger));
        false
    }

    /// Whether this host fenced itself and has not renewed its lease since.
    pub(super) fn self_fenced(&self) -> bool {
        self.self_fenced.load(Ordering::SeqCst)
    }

    /// The peers' heartbeats as last seen.
    pub(super) fn view(&self) -> Vec<PeerView> {
        self.view.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn lock_deferred(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, (String, Trigger)>> {
        self.deferred.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Where a registered host is reached.
#[derive(Debug, Clone)]
struct Peer {
    /// Its heartbeat address (its libvirt URI's host, the cluster's heartbeat port).
    beat: Option<SocketAddr>,
    /// Its libvirtd's host and port.
    libvirt: Option<(String, u16)>,
    /// Its lease is alive, per etcd.
    alive: bool,
}

/// What this host knows about one suspect's current silence.
#[derive(Debug, Default)]
struct Incident {
    /// The silence it is about (the peer's last beat): a new silence is a new incident.
    since: Option<Instant>,
    /// The silence has lasted `suspect_after` (before that, only its libvirtd is asked).
    suspected: bool,
    libvirt: Option<(bool, Instant)>,
    checking: bool,
    lease_gone_at: Option<Instant>,
    fencing: bool,
    /// When this host's turn to fence comes.
    fence_at: Option<Instant>,
    fenced: bool,
    /// Fencing failed: not tried again for this silence (a fence storm helps nobody).
    fence_failed: bool,
    /// Its libvirtd answered during this silence.
    answered: bool,
    /// Promotions were started for this silence.
    acted: bool,
    /// The last judgement logged, so each change is logged once.
    logged: Option<String>,
}

/// What this host knows about another host whose primaries it cannot reach on the service
/// network while that host is heard (cut off the switch).
#[derive(Debug)]
struct CutIncident {
    /// When this host found none of its probed primaries reachable: names the incident.
    began: Instant,
    /// Confirmed once (another host cannot reach them either, the host itself can): it stays
    /// confirmed while the primaries stay unreachable from here, also once the host is off.
    confirmed: bool,
    fencing: bool,
    fence_at: Option<Instant>,
    fenced: bool,
    /// Fencing failed: not tried again for this incident.
    fence_failed: bool,
    /// Promotions were started.
    acted: bool,
    logged: Option<String>,
}

/// Which incident a fence device was run for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FencedFor {
    /// The silence that began then.
    Silence(Instant),
    /// The cut found then.
    Cut(Instant),
}

/// What slow work reports back.
enum Done {
    Libvirt {
        host: String,
        since: Instant,
        reachable: bool,
    },
    Fence {
        host: String,
        of: FencedFor,
        result: Result<Fenced, FenceError>,
    },
    Probe {
        ticket: ProbeTicket,
        ok: bool,
    },
}

/// What the task owns besides its socket and clocks: the peers heard, the registered hosts,
/// the fence devices, and what it knows about other hosts' troubles.
struct Watch {
    peers: Peers,
    hosts: BTreeMap<String, Peer>,
    fences: BTreeMap<String, FenceDevice>,
    /// Silent hosts, by name.
    incidents: BTreeMap<String, Incident>,
    /// Hosts cut off the switch, by name.
    cuts: BTreeMap<String, CutIncident>,
    /// The probes of other hosts' primaries.
    reach: Reach,
    done: mpsc::UnboundedSender<Done>,
}

/// The services a ready shadow here could take over, by their primary's host, and the other
/// hosts with a ready shadow of them (they would fence that host too).
#[derive(Default)]
struct Takeable {
    services: BTreeMap<String, Vec<(String, String)>>,
    rivals: BTreeMap<String, BTreeSet<String>>,
}

impl Takeable {
    fn of(d: &Shared) -> Self {
        let mut t = Takeable::default();
        for s in d.table().iter() {
            if let (Some(h), Some(_)) = (s.primary_host(), s.ready_shadow()) {
                t.services
                    .entry(h.0.clone())
                    .or_default()
                    .push((s.name.clone(), s.active.clone()));
                t.rivals.entry(h.0.clone()).or_default().extend(
                    s.remote_shadows
                        .iter()
                        .filter(|r| r.ready && r.host != *h)
                        .map(|r| r.host.0.clone()),
                );
            }
        }
        t
    }
}

/// Starts host-loss handling (with a `[cluster]` only).
pub(super) fn start(d: &Shared) {
    let Some(c) = d.cfg().cluster.clone() else {
        return;
    };
    let d = d.clone();
    tokio::spawn(async move { run(d, c).await });
}

async fn run(d: Shared, c: ClusterConfig) {
    let me = d.coord.host().clone();
    let socket = if c.heartbeat_port == 0 {
        tracing::warn!("cluster.heartbeat_port = 0: no direct heartbeats; no host is declared lost, and this host fences itself whenever its lease lapses");
        None
    } else {
        match UdpSocket::bind(("0.0.0.0", c.heartbeat_port)).await {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(port = c.heartbeat_port, error = %e, "heartbeat port unusable; no host is declared lost, and this host fences itself whenever its lease lapses");
                None
            }
        }
    };
    let mut watchdog = c.watchdog.as_deref().and_then(|p| {
        match Watchdog::arm(p, Duration::from_secs(c.watchdog_timeout_s)) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::error!(error = %crate::error::report(&e), "watchdog not armed");
                None
            }
        }
    });
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
    let mut w = Watch {
        peers: Peers::new(me.clone(), c.suspect_after()),
        hosts: BTreeMap::new(),
        fences: c
            .fence
            .iter()
            .filter_map(|(h, argv)| {
                FenceDevice::new(argv.clone(), c.fence_timeout()).map(|f| (h.clone(), f))
            })
            .collect(),
        incidents: BTreeMap::new(),
        cuts: BTreeMap::new(),
        reach: Reach::new(c.unreachable_after()),
        done: done_tx,
    };
    let mut events = d.coord.watch();
    let mut lease_rx = d.coord.lease();
    let mut tick = tokio::time::interval(c.heartbeat_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut registered = watch_hosts(&d, &c);
    let mut buf = vec![0u8; MAX_BEAT_BYTES + 1];
    let mut seq = 0u64;
    let mut bad_beats = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                // Beats that queued while this task was starved of CPU are read before
                // anything is judged: a daemon that ran late must not find itself alone.
                if let Some(s) = &socket {
                    for _ in 0..MAX_QUEUED_BEATS {
                        let Ok((n, from)) = s.try_recv_from(&mut buf) else {
                            break;
                        };
                        take_beat(&mut w.peers, &w.hosts, &buf[..n], from, &c.key_prefix, &mut bad_beats);
                    }
                }
                let now = Instant::now();
                let lease = *d.coord.lease().borrow();
                w.probe_remote(&d, now);
                if let Some(s) = &socket {
                    seq += 1;
                    let beat = Beat {
                        v: BEAT_VERSION,
                        prefix: c.key_prefix.clone(),
                        host: me.0.clone(),
                        seq,
                        mode: lease.mode,
                        hears: w.peers.hears(now),
                        answering: answering_here(&d, c.unreachable_after(), now),
                        unreachable: w.reach.unreachable(now),
                    }
                    .encode();
                    for p in w.hosts.values() {
                        if let Some(a) = p.beat {
                            // Never waits: to a peer cut off, datagrams queue behind its
                            // neighbour resolution until the socket's buffer is full, and an
                            // awaited send would then hold this loop (and self-fencing) for
                            // seconds. A datagram dropped is what heartbeats are for.
                            let _ = s.try_send_to(&beat, a);
                        }
                    }
                }
                let mutual = w.peers.mutual(now);
                // A host with no other host registered has nobody its services could move to.
                let alone = w.peers.hosts().next().is_none();
                if !d.hostloss.self_fenced()
                    && !alone
                    && liveness::self_fence_due(&lease, c.self_fence_guard(), mutual, now)
                {
                    fence_self(&d, &lease).await;
                }
                if let Some(wd) = &mut watchdog {
                    feed(wd, &d, &lease, &c, mutual, now);
                }
                let takeable = Takeable::of(&d);
                w.judge_cuts(&d, &takeable, now);
                w.judge_all(&d, &c, &takeable, now);
                *d.hostloss.view.lock().unwrap_or_else(|e| e.into_inner()) = w.peers.view(now);
            }
            got = recv(socket.as_ref(), &mut buf) => {
                if let Some((n, from)) = got {
                    take_beat(&mut w.peers, &w.hosts, &buf[..n], from, &c.key_prefix, &mut bad_beats);
                }
            }
            Some(list) = registered.recv() => w.apply_hosts(list),
            ev = events.recv() => match ev {
                Ok(ClusterEvent::HostLost(h)) => {
                    tracing::warn!(host = %h, "host's lease expired");
                    w.incidents.entry(h.0.clone()).or_default().lease_gone_at.get_or_insert_with(Instant::now);
                    if let Some(p) = w.hosts.get_mut(&h.0) { p.alive = false; }
                    w.judge_all(&d, &c, &Takeable::of(&d), Instant::now());
                }
                Ok(ClusterEvent::HostUp(f)) => {
                    if let Some(i) = w.incidents.get_mut(&f.host.0) { i.lease_gone_at = None; }
                    if let Some(p) = w.hosts.get_mut(&f.host.0) { p.alive = true; }
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => events = d.coord.watch(),
            },
            Some(done) = done_rx.recv() => {
                // A libvirtd's answer or a fence's outcome may settle a judgement: acted on
                // now, not at the next heartbeat period.
                if w.on_done(&d, done) {
                    w.judge_all(&d, &c, &Takeable::of(&d), Instant::now());
                }
            }
            changed = lease_rx.changed() => {
                if changed.is_err() {
                    return;
                }
                let lease = *lease_rx.borrow_and_update();
                // Connected with a keepalive acknowledged within the deadline: a session that
                // says connected while still retrying is not renewing (see self_fence_due).
                let renewing = lease.mode == Mode::Connected
                    && liveness::self_fence_deadline(&lease, c.self_fence_guard())
                        .is_some_and(|t| Instant::now() < t);
                if renewing {
                    renewed(&d).await;
                }
            }
        }
    }
}

/// The services whose primary runs here and whose class probe, run here, answered within
/// `within`: what this host's beats report as answering.
fn answering_here(d: &Shared, within: Duration, now: Instant) -> Vec<String> {
    let answered = d.health().answering(within, now);
    let table = d.table();
    answered
        .into_iter()
        .filter(|s| table.get(s).is_some_and(|x| x.state.is_running()))
        .collect()
}

/// Most datagrams read at once before a heartbeat period's judgements (a peer beats once per
/// period, so a few periods' worth of every peer's; the rest wait for the loop).
const MAX_QUEUED_BEATS: usize = 256;

/// Takes in one heartbeat datagram from `from`, heard now. Only registered hosts are heard:
/// names nobody registered would otherwise be tracked (and kept) without bound.
fn take_beat(
    peers: &mut Peers,
    registered: &BTreeMap<String, Peer>,
    datagram: &[u8],
    from: SocketAddr,
    prefix: &str,
    bad: &mut u64,
) {
    let why = match Beat::decode(datagram, prefix) {
        Ok(beat) if registered.contains_key(&beat.host) => {
            peers.heard(beat, Instant::now());
            return;
        }
        Ok(beat) => format!(
            "heartbeat from host {:?}, which is not registered in the cluster",
            beat.host.chars().take(64).collect::<String>()
        ),
        Err(e) => crate::error::report(&e),
    };
    *bad += 1;
    // Logged at a bounded rate: anything may arrive on the port.
    if bad.is_power_of_two() {
        tracing::warn!(%from, count = *bad, error = %why, "heartbeat datagram ignored");
    }
}

/// The next datagram; never resolves without a socket.
async fn recv(socket: Option<&UdpSocket>, buf: &mut [u8]) -> Option<(usize, SocketAddr)> {
    match socket {
        Some(s) => s.recv_from(buf).await.ok(),
        None => std::future::pending().await,
    }
}

/// Reads the registered hosts every [`HOSTS_EVERY`], off the task's loop (an etcd call may
/// take its whole bound while etcd is away, and self-fencing must not wait on it): where to
/// send beats, where their libvirtd is, whose lease is alive.
fn watch_hosts(d: &Shared, c: &ClusterConfig) -> mpsc::Receiver<Vec<(String, Peer)>> {
    let (tx, rx) = mpsc::channel(1);
    let (d, port) = (d.clone(), c.heartbeat_port);
    tokio::spawn(async move {
        let mut every = tokio::time::interval(HOSTS_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let Ok(list) = d.coord.hosts().await else {
                continue;
            };
            let me = d.coord.host().clone();
            let mut peers = Vec::new();
            for h in list.into_iter().filter(|h| h.facts.host != me) {
                let libvirt = libvirt_endpoint(&h.facts.libvirt_uri);
                let beat = match (&libvirt, port) {
                    (_, 0) | (None, _) => None,
                    (Some((host, _)), port) => tokio::net::lookup_host((host.as_str(), port))
                        .await
                        .ok()
                        .and_then(|mut a| a.next()),
                };
                peers.push((
                    h.facts.host.0,
                    Peer {
                        beat,
                        libvirt,
                        alive: h.alive,
                    },
                ));
            }
            if tx.send(peers).await.is_err() {
                return;
            }
        }
    });
    rx
}

impl Watch {
    /// Takes in the registered hosts read by [`watch_hosts`].
    fn apply_hosts(&mut self, list: Vec<(String, Peer)>) {
        let now = Instant::now();
        let mut seen = BTreeSet::new();
        for (name, p) in list {
            let lease = &mut self
                .incidents
                .entry(name.clone())
                .or_default()
                .lease_gone_at;
            if p.alive {
                *lease = None;
            } else {
                lease.get_or_insert(now);
            }
            seen.insert(HostId(name.clone()));
            self.hosts.insert(name, p);
        }
        self.peers.track(&seen, now);
    }

    /// Runs the class probe of every primary elsewhere that is due; results come back as
    /// [`Done::Probe`].
    fn probe_remote(&mut self, d: &Shared, now: Instant) {
        let remote: Vec<(String, String, String, crate::config::ProbeConfig)> = d
            .table()
            .iter()
            .filter_map(|s| {
                let host = s.primary_host()?;
                let probe = d.class(&s.class).probe?;
                Some((s.name.clone(), host.0.clone(), s.active.clone(), probe))
            })
            .collect();
        self.reach.follow(
            remote
                .iter()
                .map(|(s, h, a, _)| (s.clone(), h.clone(), a.clone())),
        );
        for (service, _, _, probe) in remote {
            let Some(ticket) = self.reach.due(&service, probe.interval(), now) else {
                continue;
            };
            let done = self.done.clone();
            tokio::spawn(async move {
                let ok = super::checks::probe_answers(&probe).await;
                let _ = done.send(Done::Probe { ticket, ok });
            });
        }
    }

    /// When this host's turn to fence `host` comes: hosts that would fence it too (a ready
    /// shadow of its services, alive and heard) take turns by name, [`FENCE_STAGGER`] apart.
    fn fence_turn(&self, d: &Shared, t: &Takeable, host: &str, now: Instant) -> Instant {
        let me = d.coord.host().0.as_str();
        let mut fencers: Vec<&str> = t
            .rivals
            .get(host)
            .into_iter()
            .flatten()
            .map(String::as_str)
            .filter(|h| !self.peers.suspect(h, now) && self.hosts.get(*h).is_some_and(|p| p.alive))
            .chain(std::iter::once(me))
            .collect();
        fencers.sort_unstable();
        fencers.dedup();
        let rank = fencers.iter().position(|h| *h == me).unwrap_or(0);
        now + FENCE_STAGGER * u32::try_from(rank).unwrap_or(u32::MAX)
    }

    /// Powers `host` off through its fence device, off this task; reported as [`Done::Fence`].
    fn spawn_fence(&self, host: &str, of: FencedFor, why: &str) {
        let device = self
            .fences
            .get(host)
            .cloned()
            .expect("judged with a device");
        let (done, host) = (self.done.clone(), host.to_string());
        tracing::warn!(%host, why, "powering the host off through its fence device");
        tokio::spawn(async move {
            let result = device.power_off().await;
            let _ = done.send(Done::Fence { host, of, result });
        });
    }

    /// Judges every heard host none of whose primaries this host reaches on the service
    /// network ([`reach::judge_cut`]), when a ready shadow here could take one over.
    fn judge_cuts(&mut self, d: &Shared, t: &Takeable, now: Instant) {
        let lease = *d.coord.lease().borrow();
        let unreachable = self.reach.unreachable_hosts(now);
        // Over once its primaries answer again (or moved), unless fencing is under way or
        // done and its services are still to be taken over.
        self.cuts.retain(|host, i| {
            let keep = unreachable.contains_key(host) || i.fencing || (i.fenced && !i.acted);
            if !keep && !i.acted {
                tracing::info!(%host, "its primaries answer again from here");
            }
            keep
        });
        for (host, services) in &unreachable {
            let Some(takeable) = t.services.get(host) else {
                continue;
            };
            // A silent host is judged as such (it may be down altogether), unless this
            // incident has powered it off already.
            if self.peers.suspect(host, now) && !self.cuts.contains_key(host) {
                continue;
            }
            let cut = self.cuts.entry(host.clone()).or_insert_with(|| {
                tracing::warn!(%host, ?services, "none of the host's primaries answers its probe from here");
                CutIncident {
                    began: now,
                    confirmed: false,
                    fencing: false,
                    fence_at: None,
                    fenced: false,
                    fence_failed: false,
                    acted: false,
                    logged: None,
                }
            });
            if cut.acted {
                continue;
            }
            cut.confirmed |= services
                .iter()
                .any(|s| self.peers.confirms_cut(host, s, now));
            let facts = Cut {
                confirmed: cut.confirmed,
                fence_device: self.fences.contains_key(host) && !cut.fence_failed,
                fenced: cut.fenced,
            };
            let judgement = reach::judge_cut(Some(&facts), &lease);
            let label = format!("{judgement:?}");
            if cut.logged.as_deref() != Some(label.as_str()) {
                match &judgement {
                    Judgement::NoSafeWay => {
                        tracing::error!(%host, "host cut off the switch (its primaries answer on its own bridge only) and it has no fence device: its services are NOT taken over (fence it, then `understudy failover`)")
                    }
                    Judgement::NotEligible(why) => {
                        tracing::info!(%host, why, "host's primaries unreachable; not judged from here")
                    }
                    j => tracing::warn!(%host, judgement = ?j, "host cut off the switch"),
                }
                cut.logged = Some(label);
            }
            match judgement {
                Judgement::Fence => {
                    let (began, fencing, fence_at) = (cut.began, cut.fencing, cut.fence_at);
                    let turn = match fence_at {
                        Some(at) => at,
                        None => {
                            let at = self.fence_turn(d, t, host, now);
                            self.cuts.get_mut(host).expect("just seen").fence_at = Some(at);
                            at
                        }
                    };
                    if !fencing && now >= turn {
                        self.cuts.get_mut(host).expect("just seen").fencing = true;
                        self.spawn_fence(host, FencedFor::Cut(began), "cut off the switch");
                    }
                }
                Judgement::Lost(how) => {
                    cut.acted = true;
                    let began = cut.began;
                    take_over(d, host, how, takeable, Trigger::HostUnreachable, began);
                }
                _ => {}
            }
        }
    }

    /// For every host with primaries that a ready shadow here could take over: asks its
    /// libvirtd once it has missed beats, and judges it once it is suspect.
    fn judge_all(&mut self, d: &Shared, c: &ClusterConfig, t: &Takeable, now: Instant) {
        let lease = *d.coord.lease().borrow();
        let early = (c.heartbeat_interval() * EARLY_CHECK_BEATS).min(c.suspect_after());
        let hosts: Vec<String> = self.peers.hosts().map(str::to_string).collect();
        for host in &hosts {
            let host = host.as_str();
            let incident = self.incidents.entry(host.to_string()).or_default();
            if !self.peers.quiet(host, early, now) {
                // Heard again: whatever happened is over.
                if incident.suspected {
                    tracing::info!(host, "host heard again");
                }
                let lease_gone_at = incident.lease_gone_at;
                *incident = Incident {
                    lease_gone_at,
                    ..Incident::default()
                };
                continue;
            }
            // Powered off by a cut incident: that one takes its services over.
            if self
                .cuts
                .get(host)
                .is_some_and(|x| x.fencing || x.fenced || x.acted)
            {
                continue;
            }
            let since = self.peers.silent_since(host).unwrap_or(now);
            if incident.since != Some(since) {
                let lease_gone_at = incident.lease_gone_at;
                *incident = Incident {
                    since: Some(since),
                    lease_gone_at,
                    ..Incident::default()
                };
            }
            let suspect = self.peers.suspect(host, now);
            if suspect && !incident.suspected {
                incident.suspected = true;
                tracing::warn!(
                    host,
                    silent_ms = now.saturating_duration_since(since).as_millis() as u64,
                    "host suspect: no heartbeat, and no host heard here hears it"
                );
            }
            let Some(services) = t.services.get(host) else {
                continue;
            };
            if incident.acted {
                continue;
            }
            // Asked from its first missed beats and again while it stays silent, whatever the
            // judgement: its answer is ready when it becomes suspect and this host eligible
            // to judge.
            if !incident.checking
                && incident
                    .libvirt
                    .is_none_or(|(_, at)| now.saturating_duration_since(at) >= LIBVIRT_CHECK_EVERY)
            {
                incident.checking = true;
                let target = self.hosts.get(host).and_then(|p| p.libvirt.clone());
                let (done, host) = (self.done.clone(), host.to_string());
                tokio::spawn(async move {
                    let reachable = match target {
                        Some((h, port)) => libvirt_answers(&h, port).await,
                        // Nowhere to ask: it cannot be shown to run.
                        None => false,
                    };
                    let _ = done.send(Done::Libvirt {
                        host,
                        since,
                        reachable,
                    });
                });
            }
            if !suspect {
                continue;
            }
            let facts = Suspect {
                silent_since: since,
                libvirt_reachable: incident
                    .libvirt
                    .filter(|(_, at)| now.saturating_duration_since(*at) < LIBVIRT_RESULT_VALID)
                    .map(|(r, _)| r),
                lease_gone_at: incident.lease_gone_at,
                fence_device: self.fences.contains_key(host) && !incident.fence_failed,
                fenced: incident.fenced,
                answered_while_silent: incident.answered,
            };
            let judgement = liveness::judge(Some(&facts), &lease, c.promote_margin(), now);
            let label = format!("{judgement:?}");
            if incident.logged.as_deref() != Some(label.as_str()) {
                match &judgement {
                    Judgement::NoSafeWay => tracing::error!(host, "host went dark after its daemon died: nothing fenced it and it has no fence device; its services are NOT taken over (fence it, then `understudy failover`)"),
                    Judgement::DaemonDown => tracing::warn!(host, "host silent, but its libvirtd answers: its daemon is down or cut off and its VMs run; not fenced, nothing moves"),
                    Judgement::NotEligible(why) => tracing::info!(host, why, "host suspect; not judged from here"),
                    j => tracing::info!(host, judgement = ?j, "host suspect"),
                }
                incident.logged = Some(label);
            }
            match judgement {
                Judgement::Alive
                | Judgement::NotEligible(_)
                | Judgement::WaitLease(_)
                | Judgement::CheckLibvirt
                | Judgement::DaemonDown
                | Judgement::NoSafeWay => {}
                Judgement::Fence => {
                    let (fencing, fence_at) = (incident.fencing, incident.fence_at);
                    let turn = match fence_at {
                        Some(at) => at,
                        None => {
                            let at = self.fence_turn(d, t, host, now);
                            self.incidents.get_mut(host).expect("just seen").fence_at = Some(at);
                            at
                        }
                    };
                    if !fencing && now >= turn {
                        self.incidents.get_mut(host).expect("just seen").fencing = true;
                        self.spawn_fence(host, FencedFor::Silence(since), "host lost");
                    }
                }
                Judgement::Lost(how) => {
                    incident.acted = true;
                    take_over(d, host, how, services, Trigger::HostLost, since);
                }
            }
        }
    }

    /// Takes in what slow work reported; whether it bears on a judgement of a silent host.
    fn on_done(&mut self, d: &Shared, done: Done) -> bool {
        match done {
            Done::Libvirt {
                host,
                since,
                reachable,
            } => {
                if let Some(i) = self
                    .incidents
                    .get_mut(&host)
                    .filter(|i| i.since == Some(since))
                {
                    i.checking = false;
                    // After its lease expired: its daemon did not fence it (a host still
                    // going down, or frozen, may answer before).
                    i.answered |= reachable && i.lease_gone_at.is_some();
                    i.libvirt = Some((reachable, Instant::now()));
                }
                true
            }
            Done::Probe { ticket, ok } => {
                self.reach.done(&ticket, ok, Instant::now());
                false
            }
            Done::Fence { host, of, result } => {
                let (fencing, fenced, failed) = match of {
                    FencedFor::Silence(since) => {
                        let Some(i) = self
                            .incidents
                            .get_mut(&host)
                            .filter(|i| i.since == Some(since))
                        else {
                            return false;
                        };
                        (&mut i.fencing, &mut i.fenced, &mut i.fence_failed)
                    }
                    FencedFor::Cut(began) => {
                        let Some(i) = self.cuts.get_mut(&host).filter(|i| i.began == began) else {
                            return false;
                        };
                        (&mut i.fencing, &mut i.fenced, &mut i.fence_failed)
                    }
                };
                *fencing = false;
                if fence_outcome(d, &host, of, result) {
                    *fenced = true;
                } else {
                    *failed = true;
                }
                matches!(of, FencedFor::Silence(_))
            }
        }
    }
}

/// libvirt's RPC header for a call without arguments: length, program (`REMOTE_PROGRAM`),
/// version 1, procedure 66 (`REMOTE_PROC_AUTH_LIST`), type call, serial 1, status ok.
const LIBVIRT_PING: [u32; 7] = [28, 0x2000_8086, 1, 66, 0, 1, 0];

/// Whether the host's libvirtd answers: a connection refused within [`LIBVIRT_CHECK_TIMEOUT`]
/// (the host runs, its libvirtd restarts), or accepted and then answered with bytes within
/// [`LIBVIRT_REPLY_TIMEOUT`]. A connection accepted but never answered is a frozen host: its
/// kernel completes handshakes while its processes are stopped.
async fn libvirt_answers(host: &str, port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let connected = tokio::time::timeout(
        LIBVIRT_CHECK_TIMEOUT,
        tokio::net::TcpStream::connect((host, port)),
    )
    .await;
    let mut stream = match connected {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return e.kind() == std::io::ErrorKind::ConnectionRefused,
        Err(_) => return false,
    };
    let ping: Vec<u8> = LIBVIRT_PING.iter().flat_map(|w| w.to_be_bytes()).collect();
    let answered = tokio::time::timeout(LIBVIRT_REPLY_TIMEOUT, async {
        stream.write_all(&ping).await?;
        let mut byte = [0u8; 1];
        stream.read(&mut byte).await
    })
    .await;
    match answered {
        // Bytes: libvirtd's reply, or a TLS alert or SSH banner before the listener closes.
        // A bare end of stream or a reset is no answer: a host being powered off closes the
        // connections of the processes it kills.
        Ok(Ok(n)) => n > 0,
        Ok(Err(_)) | Err(_) => false,
    }
}

/// Reports a fence device's run (log, metric, event); whether it confirmed the host off.
fn fence_outcome(
    d: &Shared,
    host: &str,
    of: FencedFor,
    result: Result<Fenced, FenceError>,
) -> bool {
    let why = match of {
        FencedFor::Silence(_) => "host lost",
        FencedFor::Cut(_) => "cut off the switch",
    };
    match result {
        Ok(f) => {
            tracing::warn!(%host, why, off_ms = f.off.as_millis() as u64, status_ms = f.status.as_millis() as u64, "host fenced: its fence device reports it off");
            d.metrics.inc_host_fence(host, "fence_device", true);
            d.events.emit(
                None,
                EventKind::HostFenced {
                    host: host.to_string(),
                    how: LostHow::Fenced.label().into(),
                    ok: true,
                    detail: format!(
                        "{why}: powered off in {} ms, status off in {} ms",
                        f.off.as_millis(),
                        f.status.as_millis()
                    ),
                },
            );
            true
        }
        Err(e) => {
            let detail = crate::error::report(&e);
            match of {
                FencedFor::Silence(_) => {
                    tracing::error!(%host, error = %detail, "fencing failed; its services move only after its lease expired and the margin passed")
                }
                FencedFor::Cut(_) => {
                    tracing::error!(%host, error = %detail, "fencing failed; the host is cut off the switch but renews its lease: its services are NOT taken over")
                }
            }
            d.metrics.inc_host_fence(host, "fence_device", false);
            d.events.emit(
                None,
                EventKind::HostFenced {
                    host: host.to_string(),
                    how: LostHow::Fenced.label().into(),
                    ok: false,
                    detail: format!("{why}: {detail}"),
                },
            );
            false
        }
    }
}

/// Promotes, here, the services of a lost host that a ready shadow here can take over.
fn take_over(
    d: &Shared,
    host: &str,
    how: LostHow,
    services: &[(String, String)],
    trigger: Trigger,
    since: Instant,
) {
    tracing::warn!(
        host,
        how = how.label(),
        %trigger,
        services = services.len(),
        "host lost and safe; promoting its services' shadows here"
    );
    if how == LostHow::LeaseExpired {
        d.metrics.inc_host_fence(host, "lease_expired", true);
        d.events.emit(
            None,
            EventKind::HostFenced {
                host: host.to_string(),
                how: how.label().into(),
                ok: true,
                detail: "no fence device: its lease expired and the margin passed".into(),
            },
        );
    }
    for (service, domain) in services {
        start_failover(d, service, domain, trigger, since);
    }
}

/// This host cannot renew its lease and reaches no peer: every primary here is cut off its
/// bridge and its QEMU killed, before the lease can expire and another host promotes.
async fn fence_self(d: &Shared, lease: &crate::cluster::LeaseStatus) {
    // First, so that the deaths about to be seen are not failed over here.
    d.hostloss.self_fenced.store(true, Ordering::SeqCst);
    let began = Instant::now();
    let primaries: Vec<(String, String, Vec<String>)> = d
        .table()
        .iter()
        .filter(|s| {
            !matches!(
                s.state,
                ServiceState::Elsewhere { .. } | ServiceState::Stopped
            )
        })
        .map(|s| {
            (
                s.name.clone(),
                s.active.clone(),
                s.active_taps.iter().map(|t| t.tap.clone()).collect(),
            )
        })
        .collect();
    tracing::error!(
        last_ack_ms_ago = lease.last_ack_sent.map(|t| t.elapsed().as_millis() as u64),
        ttl_ms = lease.ttl.as_millis() as u64,
        primaries = primaries.len(),
        "SELF-FENCING: the lease cannot be renewed and no peer is heard; destroying every primary here before the lease can expire"
    );
    let kills = primaries.iter().map(|(service, domain, taps)| async move {
        for tap in taps {
            if let Err(e) = isolate_tap(&d.net, tap).await {
                tracing::warn!(%service, %tap, error = %crate::error::report(&e), "self-fence: tap not cut");
            }
        }
        let killed = crate::libvirt::kill_qemu(
            Path::new(crate::libvirt::QEMU_RUN_DIR),
            domain,
            SELF_KILL_TIMEOUT,
        )
        .await;
        match &killed {
            // No QEMU ran (a primary already dead): nothing to fence.
            Ok(None) => {}
            Ok(Some(_)) => {
                d.events.emit(
                    Some(service),
                    EventKind::Fenced {
                        domain: domain.clone(),
                        action:
                            "self-fenced (lease not renewed, no peer heard): taps cut, QEMU killed"
                                .into(),
                    },
                );
            }
            Err(why) => {
                tracing::error!(%service, %domain, %why, "self-fence: QEMU not killed");
                d.events.emit(
                    Some(service),
                    EventKind::Fenced {
                        domain: domain.clone(),
                        action: format!("self-fence FAILED: {why}"),
                    },
                );
            }
        }
        killed
    });
    let results = futures::future::join_all(kills).await;
    let failed = results.iter().filter(|r| r.is_err()).count();
    d.metrics.inc_self_fence(failed == 0);
    tracing::error!(
        ms = began.elapsed().as_millis() as u64,
        killed = results.len() - failed,
        failed,
        "self-fenced; no promotion here until the lease is renewed"
    );
    // libvirt tidies up after the kills, off this task's clock.
    for (_, domain, _) in primaries {
        let hv = d.hv();
        tokio::spawn(async move {
            let _ = hv
                .run("destroy self-fenced primary", move |hv| hv.destroy(&domain))
                .await;
        });
    }
}

/// The lease is renewed again: a self-fenced host may promote again, and the failovers
/// deferred meanwhile are made (those whose owner moved elsewhere meanwhile lose their claim).
async fn renewed(d: &Shared) {
    if d.hostloss.self_fenced.swap(false, Ordering::SeqCst) {
        tracing::warn!("lease renewed after self-fencing: promotions here allowed again");
    }
    let deferred = std::mem::take(&mut *d.hostloss.lock_deferred());
    for (service, (from, trigger)) in deferred {
        tracing::info!(%service, %from, %trigger, "deferred failover made now that etcd answers");
        start_failover(d, &service, &from, trigger, Instant::now());
    }
}

/// Feeds the watchdog while this host may keep its primaries until the next feed is due:
/// renewing, or not isolated, or holding none (self-fenced).
fn feed(
    w: &mut Watchdog,
    d: &Shared,
    lease: &crate::cluster::LeaseStatus,
    c: &ClusterConfig,
    mutual: bool,
    now: Instant,
) {
    let timeout = Duration::from_secs(c.watchdog_timeout_s);
    let holds_primaries = d.table().iter().any(|s| {
        !matches!(
            s.state,
            ServiceState::Elsewhere { .. } | ServiceState::Stopped
        )
    });
    let safe = d.hostloss.self_fenced()
        || !holds_primaries
        || mutual
        || liveness::self_fence_deadline(lease, c.self_fence_guard())
            .is_none_or(|t| now + timeout <= t);
    if safe {
        if let Err(e) = w.feed() {
            tracing::error!(error = %crate::error::report(&e), "watchdog not fed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(host: &str) -> Vec<u8> {
        Beat {
            v: BEAT_VERSION,
            prefix: "/understudy/t".into(),
            host: host.into(),
            seq: 1,
            mode: Mode::Connected,
            hears: vec![],
            answering: vec![],
            unreachable: vec![],
        }
        .encode()
    }

    #[test]
    fn only_registered_hosts_are_heard() {
        let mut peers = Peers::new(HostId("h1".into()), Duration::from_millis(300));
        let registered: BTreeMap<String, Peer> = [(
            "h2".to_string(),
            Peer {
                beat: None,
                libvirt: None,
                alive: true,
            },
        )]
        .into();
        let from: SocketAddr = "10.78.0.2:7946".parse().unwrap();
        let mut bad = 0;
        let take = |peers: &mut Peers, b: &[u8], bad: &mut u64| {
            take_beat(peers, &registered, b, from, "/understudy/t", bad)
        };
        take(&mut peers, &beat("h2"), &mut bad);
        take(&mut peers, &beat("intruder"), &mut bad);
        take(&mut peers, b"not a beat", &mut bad);
        assert_eq!(peers.hosts().collect::<Vec<_>>(), ["h2"]);
        assert_eq!(bad, 2);
        assert!(!peers.silent("h2", Instant::now()));
    }
}
