//! Whether the other hosts are alive, and whether this one may go on serving: the direct
//! heartbeats between daemons, and the rules that turn them, the etcd lease and a reachability
//! check of a host's libvirtd into a decision (README "Losing a host").
//!
//! Each daemon sends every other host a small UDP datagram ([`Beat`]) every heartbeat period
//! over the management network. A beat says who sends it, how the sender stands with etcd and
//! which hosts it hears itself. [`Peers`] keeps what was heard:
//!
//! - a peer is **silent** when nothing came from it for `suspect_after`;
//! - it is **vouched for** when another peer that this host hears reports hearing it (this host
//!   alone lost its path to it);
//! - it is **suspect** when silent and not vouched for.
//!
//! [`judge`] says what to do about a suspect; [`self_fence_due`] says when this host must destroy
//! its own primaries. Everything here is pure: the daemon's `hostloss` task owns the sockets,
//! the clocks and the actions.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{check_name, HostId, LeaseStatus, Mode};

/// Largest datagram read or written; a beat of 64 hosts of 253-byte names fits.
pub const MAX_BEAT_BYTES: usize = 32 * 1024;
/// Most hosts a beat may list as heard.
pub const MAX_HEARD: usize = 64;
/// Most services a beat may list as answering or as unreachable, each.
pub const MAX_SERVICES: usize = 1024;
/// The wire format's version.
pub const BEAT_VERSION: u32 = 1;

/// Errors of reading a beat (datagrams are untrusted: anything may arrive on the port).
#[derive(Debug, thiserror::Error)]
pub enum LivenessError {
    /// The datagram is larger than any beat.
    #[error("heartbeat datagram of {bytes} bytes; at most {MAX_BEAT_BYTES} are accepted")]
    TooLarge {
        /// Its size.
        bytes: usize,
    },
    /// Not a beat (not JSON, fields missing or of the wrong type).
    #[error("malformed heartbeat datagram")]
    Malformed(#[source] serde_json::Error),
    /// A beat of another wire version.
    #[error("heartbeat of version {0}; this daemon reads version {BEAT_VERSION}")]
    Version(u32),
    /// A beat of another cluster (another key prefix) on the same port.
    #[error("heartbeat of another cluster (key prefix {0:?})")]
    OtherCluster(String),
    /// A host name that cannot be one (empty, `/`, control characters, too long).
    #[error("heartbeat names an invalid host")]
    Name(#[source] super::CoordError),
    /// More hosts listed as heard than a cluster has.
    #[error("heartbeat lists {0} hosts as heard; at most {MAX_HEARD} are accepted")]
    TooManyHeard(usize),
    /// More services listed as answering or unreachable than a beat may carry.
    #[error("heartbeat lists {0} services; at most {MAX_SERVICES} are accepted per list")]
    TooManyServices(usize),
    /// A service name that cannot be one.
    #[error("heartbeat names an invalid service")]
    Service(#[source] super::CoordError),
}

/// One heartbeat datagram.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Beat {
    /// [`BEAT_VERSION`].
    pub v: u32,
    /// The cluster's key prefix: beats of another cluster on the same port are ignored.
    pub prefix: String,
    /// The sender.
    pub host: String,
    /// Grows by one per beat of one daemon process.
    pub seq: u64,
    /// How the sender stands with etcd.
    pub mode: Mode,
    /// The hosts the sender hears (within its `suspect_after`).
    pub hears: Vec<String>,
    /// Services whose primary runs on the sender and whose class probe, run by the sender,
    /// answered within `unreachable_after` (see [`super::reach`]). Absent from older senders.
    #[serde(default)]
    pub answering: Vec<String>,
    /// Services whose primary runs on another host and whose class probe, run by the sender,
    /// has not answered for `unreachable_after`. Absent from older senders.
    #[serde(default)]
    pub unreachable: Vec<String>,
}

impl Beat {
    /// The datagram, at most [`MAX_BEAT_BYTES`]: service lists that do not fit are cut
    /// (the hosts heard always fit; a service left out is simply not vouched for).
    pub fn encode(&self) -> Vec<u8> {
        let mut beat = self.clone();
        beat.answering.truncate(MAX_SERVICES);
        beat.unreachable.truncate(MAX_SERVICES);
        loop {
            let bytes = serde_json::to_vec(&beat).expect("a beat always serializes");
            if bytes.len() <= MAX_BEAT_BYTES
                || (beat.answering.is_empty() && beat.unreachable.is_empty())
            {
                return bytes;
            }
            let longer = if beat.answering.len() >= beat.unreachable.len() {
                &mut beat.answering
            } else {
                &mut beat.unreachable
            };
            longer.truncate(longer.len() / 2);
        }
    }

    /// Reads a datagram of the cluster under `prefix`.
    pub fn decode(bytes: &[u8], prefix: &str) -> Result<Beat, LivenessError> {
        if bytes.len() > MAX_BEAT_BYTES {
            return Err(LivenessError::TooLarge { bytes: bytes.len() });
        }
        let beat: Beat = serde_json::from_slice(bytes).map_err(LivenessError::Malformed)?;
        if beat.v != BEAT_VERSION {
            return Err(LivenessError::Version(beat.v));
        }
        if beat.prefix != prefix {
            return Err(LivenessError::OtherCluster(beat.prefix));
        }
        if beat.hears.len() > MAX_HEARD {
            return Err(LivenessError::TooManyHeard(beat.hears.len()));
        }
        check_name("host", &beat.host).map_err(LivenessError::Name)?;
        for h in &beat.hears {
            check_name("host", h).map_err(LivenessError::Name)?;
        }
        for list in [&beat.answering, &beat.unreachable] {
            if list.len() > MAX_SERVICES {
                return Err(LivenessError::TooManyServices(list.len()));
            }
            for s in list {
                check_name("service", s).map_err(LivenessError::Service)?;
            }
        }
        Ok(beat)
    }
}

/// What this host knows of one peer.
#[derive(Debug, Clone)]
struct Peer {
    /// Since when it is tracked: a peer never heard counts as heard then (a grace period at
    /// start, and for a host that just registered).
    tracked_since: Instant,
    last_heard: Option<Instant>,
    mode: Option<Mode>,
    hears: BTreeSet<String>,
    answering: BTreeSet<String>,
    unreachable: BTreeSet<String>,
}

/// How one peer looks from here, for status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerView {
    /// The peer.
    pub host: String,
    /// Milliseconds since its last beat; `None`: never heard.
    pub heard_ms_ago: Option<u64>,
    /// Its etcd mode, as its last beat said.
    pub mode: Option<Mode>,
    /// Silent and vouched for by nobody this host hears.
    pub suspect: bool,
}

/// The peers' heartbeats as heard here.
#[derive(Debug, Clone)]
pub struct Peers {
    me: HostId,
    suspect_after: Duration,
    peers: BTreeMap<String, Peer>,
}

impl Peers {
    /// No peer yet.
    pub fn new(me: HostId, suspect_after: Duration) -> Self {
        Peers {
            me,
            suspect_after,
            peers: BTreeMap::new(),
        }
    }

    /// Tracks `hosts` (this host and hosts already tracked are skipped): a new peer is given
    /// `suspect_after` from `now` to be heard.
    pub fn track<'h>(&mut self, hosts: impl IntoIterator<Item = &'h HostId>, now: Instant) {
        for h in hosts {
            if *h != self.me && !self.peers.contains_key(&h.0) {
                self.peers.insert(
                    h.0.clone(),
                    Peer {
                        tracked_since: now,
                        last_heard: None,
                        mode: None,
                        hears: BTreeSet::new(),
                        answering: BTreeSet::new(),
                        unreachable: BTreeSet::new(),
                    },
                );
            }
        }
    }

    /// The peers tracked, by name.
    pub fn hosts(&self) -> impl Iterator<Item = &str> {
        self.peers.keys().map(String::as_str)
    }

    /// Records a beat (from this host itself: ignored). A beat from a host not yet tracked
    /// starts tracking it.
    pub fn heard(&mut self, beat: Beat, now: Instant) {
        if beat.host == self.me.0 {
            return;
        }
        let p = self.peers.entry(beat.host).or_insert(Peer {
            tracked_since: now,
            last_heard: None,
            mode: None,
            hears: BTreeSet::new(),
            answering: BTreeSet::new(),
            unreachable: BTreeSet::new(),
        });
        p.last_heard = Some(now);
        p.mode = Some(beat.mode);
        p.hears = beat.hears.into_iter().collect();
        p.answering = beat.answering.into_iter().collect();
        p.unreachable = beat.unreachable.into_iter().collect();
    }

    fn fresh(&self, p: &Peer, now: Instant) -> bool {
        p.last_heard
            .is_some_and(|t| now.saturating_duration_since(t) < self.suspect_after)
    }

    /// The peers heard within `suspect_after`, by name: what this host's beats say it hears.
    pub fn hears(&self, now: Instant) -> Vec<String> {
        self.peers
            .iter()
            .filter(|(_, p)| self.fresh(p, now))
            .map(|(h, _)| h.clone())
            .collect()
    }

    /// Since when `host` has been silent: its last beat, or when it was first tracked.
    pub fn silent_since(&self, host: &str) -> Option<Instant> {
        self.peers
            .get(host)
            .map(|p| p.last_heard.unwrap_or(p.tracked_since))
    }

    /// Nothing from `host` for `suspect_after` (an untracked host is not silent: it is not
    /// known to be anything).
    pub fn silent(&self, host: &str, now: Instant) -> bool {
        self.silent_since(host)
            .is_some_and(|t| now.saturating_duration_since(t) >= self.suspect_after)
    }

    /// Another peer this host hears reports hearing `host`.
    pub fn vouched(&self, host: &str, now: Instant) -> bool {
        self.peers
            .iter()
            .any(|(h, p)| h != host && self.fresh(p, now) && p.hears.contains(host))
    }

    /// Silent, and vouched for by nobody this host hears.
    pub fn suspect(&self, host: &str, now: Instant) -> bool {
        self.silent(host, now) && !self.vouched(host, now)
    }

    /// Nothing from `host` for `after` (shorter than `suspect_after`: beats already missed),
    /// and vouched for by nobody this host hears: it may be on its way to suspect.
    pub fn quiet(&self, host: &str, after: Duration, now: Instant) -> bool {
        self.silent_since(host)
            .is_some_and(|t| now.saturating_duration_since(t) >= after)
            && !self.vouched(host, now)
    }

    /// Some peer this host hears also hears this host: the two can still tell each other
    /// apart from a lost host, so neither is isolated.
    pub fn mutual(&self, now: Instant) -> bool {
        self.peers
            .values()
            .any(|p| self.fresh(p, now) && p.hears.contains(&self.me.0))
    }

    /// Whether `host` confirms that it is cut off the switch, as far as `service` shows: its
    /// own fresh beat says its probe reaches `service` there, and another peer heard here
    /// says it cannot reach `service` (README "Losing a host", [`super::reach`]).
    pub fn confirms_cut(&self, host: &str, service: &str, now: Instant) -> bool {
        let answers_there = self
            .peers
            .get(host)
            .is_some_and(|p| self.fresh(p, now) && p.answering.contains(service));
        answers_there
            && self
                .peers
                .iter()
                .any(|(h, p)| h != host && self.fresh(p, now) && p.unreachable.contains(service))
    }

    /// Every peer as seen from here.
    pub fn view(&self, now: Instant) -> Vec<PeerView> {
        self.peers
            .iter()
            .map(|(h, p)| PeerView {
                host: h.clone(),
                heard_ms_ago: p
                    .last_heard
                    .map(|t| u64::try_from(now.saturating_duration_since(t).as_millis()))
                    .map(|r| r.unwrap_or(u64::MAX)),
                mode: p.mode,
                suspect: self.suspect(h, now),
            })
            .collect()
    }
}

/// When this host must have destroyed its primaries if it cannot renew its lease: the last
/// acknowledged keepalive's send time plus the TTL (the earliest moment etcd may expire the
/// lease), less `guard`. `None` without an acknowledged keepalive (nothing was ever promised).
pub fn self_fence_deadline(lease: &LeaseStatus, guard: Duration) -> Option<Instant> {
    let sent = lease.last_ack_sent?;
    Some(sent + lease.ttl.saturating_sub(guard))
}

/// Whether this host must fence itself now: in a cluster, the deadline has come (no keepalive
/// acknowledged for the TTL less the guard), and no peer it hears hears it too (a host that
/// still reaches a peer is not isolated: an etcd outage that all hosts share stops no VM). The
/// lease session's mode is not asked: a session still retrying its keepalives says `Connected`
/// until it gives up, which can be after etcd expired the lease and another host promoted.
pub fn self_fence_due(lease: &LeaseStatus, guard: Duration, mutual: bool, now: Instant) -> bool {
    if lease.mode == Mode::Standalone || mutual {
        return false;
    }
    self_fence_deadline(lease, guard).is_some_and(|t| now >= t)
}

/// What is known about a suspect host, for [`judge`].
#[derive(Debug, Clone)]
pub struct Suspect {
    /// Since when it is silent (its last beat).
    pub silent_since: Instant,
    /// Its libvirtd answered (`Some(true)`), did not (`Some(false)`), or was not asked yet.
    pub libvirt_reachable: Option<bool>,
    /// When this host saw its lease gone (its liveness key deleted by etcd).
    pub lease_gone_at: Option<Instant>,
    /// A fence device is configured for it.
    pub fence_device: bool,
    /// Its fence device confirmed it off (for this silence).
    pub fenced: bool,
    /// Its libvirtd answered during this silence: its daemon died while the host ran, so
    /// nothing fenced it when its lease lapsed; only a fence device can make it safe.
    pub answered_while_silent: bool,
}

/// How a lost host was made safe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostHow {
    /// Its fence device powered it off and reported it off.
    Fenced,
    /// Its lease expired, and the safety margin after it passed: it fenced itself before.
    LeaseExpired,
}

impl LostHow {
    /// Label for logs, events and metrics.
    pub fn label(self) -> &'static str {
        match self {
            LostHow::Fenced => "fence_device",
            LostHow::LeaseExpired => "lease_expired",
        }
    }
}

/// What to do about a peer whose primaries this host could take over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Judgement {
    /// Heard (directly, or through a peer that hears it): alive.
    Alive,
    /// Suspect, but this host is in no position to judge: it is not connected to etcd, or no
    /// keepalive it sent since the suspect went silent was acknowledged yet (it might be the
    /// isolated one).
    NotEligible(&'static str),
    /// Suspect: ask its libvirtd.
    CheckLibvirt,
    /// Silent, but its libvirtd answers: its daemon is down or cut off, its VMs run. Not lost.
    DaemonDown,
    /// Lost for sure enough to power it off: run its fence device.
    Fence,
    /// No fence device: wait for its lease to expire and the margin to pass (`None`: the lease
    /// is still there).
    WaitLease(Option<Instant>),
    /// No fence device, and its daemon died before it went dark: nothing fenced it, so its
    /// VMs may still run. Not taken over (an operator must fence it).
    NoSafeWay,
    /// Lost and safe: its services may be promoted elsewhere.
    Lost(LostHow),
}

/// The rule (README "Losing a host"): a host is lost when it is suspect, this host reached
/// etcd after the suspect went silent, and the suspect's libvirtd does not answer; it is safe
/// to promote its services once its fence device confirmed it off, or, without one, once its
/// lease expired and `margin` passed (it fenced itself `self_fence_guard` before its lease
/// could expire), unless its libvirtd answered during this silence (its daemon was dead, so
/// it fenced nothing).
pub fn judge(
    suspect: Option<&Suspect>,
    lease: &LeaseStatus,
    margin: Duration,
    now: Instant,
) -> Judgement {
    let Some(s) = suspect else {
        return Judgement::Alive;
    };
    if lease.mode != Mode::Connected {
        return Judgement::NotEligible("etcd unreachable from this host");
    }
    if lease.last_ack_sent.is_none_or(|t| t <= s.silent_since) {
        return Judgement::NotEligible("no keepalive acknowledged since the host went silent");
    }
    match s.libvirt_reachable {
        None => Judgement::CheckLibvirt,
        Some(true) => Judgement::DaemonDown,
        Some(false) if s.fenced => Judgement::Lost(LostHow::Fenced),
        Some(false) if s.fence_device => Judgement::Fence,
        Some(false) if s.answered_while_silent => Judgement::NoSafeWay,
        Some(false) => match s.lease_gone_at {
            Some(t) if now >= t + margin => Judgement::Lost(LostHow::LeaseExpired),
            Some(t) => Judgement::WaitLease(Some(t + margin)),
            None => Judgement::WaitLease(None),
        },
    }
}

/// The `host[:port]` of a libvirt URI (`qemu+tcp://10.78.0.2/system`, `qemu+ssh://root@kvm/system`),
/// with the port its transport listens on when the URI names none; `None` for a local URI.
pub fn libvirt_endpoint(uri: &str) -> Option<(String, u16)> {
    let (scheme, rest) = uri.split_once("://")?;
    let authority = rest.split('/').next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    if authority.is_empty() {
        return None;
    }
    let transport = scheme.split_once('+').map_or("tls", |(_, t)| t);
    let default = match transport {
        "tcp" => 16509,
        "ssh" | "libssh" | "libssh2" => 22,
        "tls" => 16514,
        _ => return None,
    };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, tail) = v6.split_once(']')?;
        let port = tail.strip_prefix(':').map(str::parse).transpose().ok()?;
        (h.to_string(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p.parse().ok()?)),
            None => (authority.to_string(), None),
        }
    };
    Some((host, port.unwrap_or(default)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(host: &str, hears: &[&str]) -> Beat {
        Beat {
            v: BEAT_VERSION,
            prefix: "/u".into(),
            host: host.into(),
            seq: 1,
            mode: Mode::Connected,
            hears: hears.iter().map(|h| h.to_string()).collect(),
            answering: Vec::new(),
            unreachable: Vec::new(),
        }
    }

    fn with_services(mut b: Beat, answering: &[&str], unreachable: &[&str]) -> Beat {
        b.answering = answering.iter().map(|s| s.to_string()).collect();
        b.unreachable = unreachable.iter().map(|s| s.to_string()).collect();
        b
    }

    fn hosts(names: &[&str]) -> Vec<HostId> {
        names.iter().map(|n| HostId(n.to_string())).collect()
    }

    const AFTER: Duration = Duration::from_millis(500);

    #[test]
    fn a_beat_round_trips_and_bad_datagrams_are_refused_with_a_reason() {
        let b = beat("h1", &["h2"]);
        assert_eq!(Beat::decode(&b.encode(), "/u").unwrap(), b);
        assert!(matches!(
            Beat::decode(&b.encode(), "/other"),
            Err(LivenessError::OtherCluster(p)) if p == "/u"
        ));
        assert!(matches!(
            Beat::decode(b"garbage", "/u"),
            Err(LivenessError::Malformed(_))
        ));
        assert!(matches!(
            Beat::decode(&vec![b' '; MAX_BEAT_BYTES + 1], "/u"),
            Err(LivenessError::TooLarge { .. })
        ));
        let mut v2 = b.clone();
        v2.v = 2;
        assert!(matches!(
            Beat::decode(&v2.encode(), "/u"),
            Err(LivenessError::Version(2))
        ));
        let bad = beat("h/1", &[]);
        assert!(matches!(
            Beat::decode(&bad.encode(), "/u"),
            Err(LivenessError::Name(_))
        ));
        let names: Vec<String> = (0..=MAX_HEARD).map(|i| format!("h{i}")).collect();
        let many = Beat {
            hears: names,
            ..b.clone()
        };
        assert!(matches!(
            Beat::decode(&many.encode(), "/u"),
            Err(LivenessError::TooManyHeard(65))
        ));
    }

    #[test]
    fn service_lists_are_bounded_checked_and_optional_on_the_wire() {
        let b = with_services(beat("h1", &["h2"]), &["web"], &["db"]);
        assert_eq!(Beat::decode(&b.encode(), "/u").unwrap(), b);
        // A sender of before the lists.
        let old = br#"{"v":1,"prefix":"/u","host":"h1","seq":3,"mode":"connected","hears":["h2"]}"#;
        let got = Beat::decode(old, "/u").unwrap();
        assert!(got.answering.is_empty() && got.unreachable.is_empty());
        let bad = with_services(beat("h1", &[]), &["a/b"], &[]);
        assert!(matches!(
            Beat::decode(&bad.encode(), "/u"),
            Err(LivenessError::Service(_))
        ));
        let many: Vec<String> = (0..=MAX_SERVICES).map(|i| format!("s{i}")).collect();
        let json = serde_json::json!({"v":1,"prefix":"/u","host":"h1","seq":1,"mode":"connected",
            "hears":[], "unreachable": many});
        assert!(matches!(
            Beat::decode(json.to_string().as_bytes(), "/u"),
            Err(LivenessError::TooManyServices(1025))
        ));
        // Long lists are cut to fit one datagram; what is sent still reads.
        let long: Vec<String> = (0..2000).map(|i| format!("{i:0>200}")).collect();
        let huge = Beat {
            answering: long.clone(),
            unreachable: long,
            ..beat("h1", &["h2"])
        };
        let bytes = huge.encode();
        assert!(bytes.len() <= MAX_BEAT_BYTES, "{}", bytes.len());
        let got = Beat::decode(&bytes, "/u").unwrap();
        assert_eq!(got.hears, ["h2"]);
        assert!(!got.answering.is_empty() && !got.unreachable.is_empty());
    }

    #[test]
    fn a_cut_is_confirmed_by_the_host_itself_and_another_peer() {
        let t0 = Instant::now();
        let mut p = Peers::new(HostId("h2".into()), AFTER);
        // h1 reaches web on its own bridge; h3 cannot reach it over the switch.
        p.heard(with_services(beat("h1", &["h2", "h3"]), &["web"], &[]), t0);
        p.heard(with_services(beat("h3", &["h1", "h2"]), &[], &["web"]), t0);
        assert!(p.confirms_cut("h1", "web", t0));
        assert!(!p.confirms_cut("h1", "db", t0));
        // h1's own word does not count as the second vantage point.
        p.heard(
            with_services(beat("h1", &["h2", "h3"]), &["web"], &["web"]),
            t0,
        );
        p.heard(beat("h3", &["h1", "h2"]), t0);
        assert!(!p.confirms_cut("h1", "web", t0), "h3 reaches it");
        // h1 does not reach it either: the service is down, not the link.
        p.heard(with_services(beat("h3", &["h1", "h2"]), &[], &["web"]), t0);
        p.heard(beat("h1", &["h2", "h3"]), t0);
        assert!(!p.confirms_cut("h1", "web", t0));
        // Stale beats confirm nothing.
        p.heard(with_services(beat("h1", &["h2", "h3"]), &["web"], &[]), t0);
        assert!(p.confirms_cut("h1", "web", t0));
        assert!(!p.confirms_cut("h1", "web", t0 + AFTER));
    }

    #[test]
    fn a_peer_is_suspect_only_when_silent_and_not_vouched_for() {
        let t0 = Instant::now();
        let mut p = Peers::new(HostId("h1".into()), AFTER);
        p.track(&hosts(&["h1", "h2", "h3"]), t0);
        // Grace from tracking.
        assert!(!p.suspect("h2", t0 + Duration::from_millis(400)));
        assert!(p.suspect("h2", t0 + AFTER));
        assert_eq!(p.hosts().collect::<Vec<_>>(), ["h2", "h3"]);

        let t1 = t0 + Duration::from_secs(1);
        p.heard(beat("h2", &["h1", "h3"]), t1);
        p.heard(beat("h3", &["h1"]), t1);
        assert!(!p.suspect("h2", t1) && !p.suspect("h3", t1));
        assert_eq!(p.hears(t1), ["h2", "h3"]);
        assert!(p.mutual(t1));

        // h2 falls silent here, but h3 still hears it: vouched for.
        let t2 = t1 + Duration::from_millis(600);
        p.heard(beat("h3", &["h1", "h2"]), t2);
        assert!(p.silent("h2", t2));
        assert!(p.vouched("h2", t2));
        assert!(!p.suspect("h2", t2));
        // h3 stops hearing it too: suspect.
        p.heard(beat("h3", &["h1"]), t2);
        assert!(p.suspect("h2", t2));
        assert_eq!(p.silent_since("h2"), Some(t1));
        // Nobody heard for long: h3's old vouching counts no more.
        let t3 = t2 + AFTER;
        assert!(p.suspect("h2", t3) && p.suspect("h3", t3));
        assert!(!p.mutual(t3));
        let view = p.view(t3);
        assert_eq!(view.len(), 2);
        assert!(view
            .iter()
            .all(|v| v.suspect && v.mode == Some(Mode::Connected)));
        // Its own beats are not a peer's.
        p.heard(beat("h1", &[]), t3);
        assert_eq!(p.hosts().count(), 2);
    }

    #[test]
    fn a_peer_that_does_not_hear_this_host_is_not_mutual() {
        let t0 = Instant::now();
        let mut p = Peers::new(HostId("h1".into()), AFTER);
        p.heard(beat("h2", &["h3"]), t0);
        assert_eq!(p.hears(t0), ["h2"]);
        assert!(!p.mutual(t0), "h2 does not hear h1");
    }

    fn lease(mode: Mode, ack: Option<Instant>) -> LeaseStatus {
        LeaseStatus {
            mode,
            since: Instant::now(),
            lease_id: Some(1),
            ttl: Duration::from_secs(2),
            last_ack_sent: ack,
        }
    }

    #[test]
    fn self_fencing_is_due_before_the_lease_can_expire_and_only_when_isolated() {
        let t0 = Instant::now();
        let guard = Duration::from_millis(500);
        let l = lease(Mode::Unreachable, Some(t0));
        assert_eq!(
            self_fence_deadline(&l, guard),
            Some(t0 + Duration::from_millis(1500))
        );
        assert!(!self_fence_due(
            &l,
            guard,
            false,
            t0 + Duration::from_millis(1499)
        ));
        assert!(self_fence_due(
            &l,
            guard,
            false,
            t0 + Duration::from_millis(1500)
        ));
        // Still reaching a peer that hears it: an outage shared by all hosts stops no VM.
        assert!(!self_fence_due(
            &l,
            guard,
            true,
            t0 + Duration::from_secs(60)
        ));
        // Renewing: never while keepalives are acknowledged...
        let c = lease(Mode::Connected, Some(t0));
        assert!(!self_fence_due(
            &c,
            guard,
            false,
            t0 + Duration::from_millis(1499)
        ));
        // ...but a session that still says connected while its keepalives go unanswered
        // (retrying, not yet given up) is past the deadline all the same.
        assert!(self_fence_due(
            &c,
            guard,
            false,
            t0 + Duration::from_millis(1500)
        ));
        // Standalone: no lease, no cluster to hand services to.
        assert!(!self_fence_due(
            &lease(Mode::Standalone, Some(t0)),
            guard,
            false,
            t0 + Duration::from_secs(60)
        ));
        // A guard above the TTL fences at the last acknowledged send itself.
        assert_eq!(self_fence_deadline(&l, Duration::from_secs(5)), Some(t0));
        // Never granted: nothing promised, nothing to fence on.
        assert!(!self_fence_due(
            &lease(Mode::Starting, None),
            guard,
            false,
            t0 + Duration::from_secs(60)
        ));
    }

    #[test]
    fn judgement_follows_the_documented_rule() {
        let t0 = Instant::now();
        let margin = Duration::from_secs(1);
        let connected = lease(Mode::Connected, Some(t0 + Duration::from_millis(100)));
        let s = Suspect {
            silent_since: t0,
            libvirt_reachable: None,
            lease_gone_at: None,
            fence_device: true,
            fenced: false,
            answered_while_silent: false,
        };
        let now = t0 + Duration::from_secs(1);
        assert_eq!(judge(None, &connected, margin, now), Judgement::Alive);
        assert!(matches!(
            judge(Some(&s), &lease(Mode::Unreachable, Some(now)), margin, now),
            Judgement::NotEligible(_)
        ));
        // The last acknowledged keepalive was sent before the silence began.
        assert!(matches!(
            judge(Some(&s), &lease(Mode::Connected, Some(t0)), margin, now),
            Judgement::NotEligible(_)
        ));
        assert_eq!(
            judge(Some(&s), &connected, margin, now),
            Judgement::CheckLibvirt
        );
        let reachable = Suspect {
            libvirt_reachable: Some(true),
            ..s.clone()
        };
        assert_eq!(
            judge(Some(&reachable), &connected, margin, now),
            Judgement::DaemonDown
        );
        let gone = Suspect {
            libvirt_reachable: Some(false),
            ..s.clone()
        };
        assert_eq!(
            judge(Some(&gone), &connected, margin, now),
            Judgement::Fence
        );
        let fenced = Suspect {
            fenced: true,
            ..gone.clone()
        };
        assert_eq!(
            judge(Some(&fenced), &connected, margin, now),
            Judgement::Lost(LostHow::Fenced)
        );
        let lease_only = Suspect {
            fence_device: false,
            ..gone.clone()
        };
        assert_eq!(
            judge(Some(&lease_only), &connected, margin, now),
            Judgement::WaitLease(None)
        );
        let expired = Suspect {
            lease_gone_at: Some(now),
            ..lease_only.clone()
        };
        assert_eq!(
            judge(Some(&expired), &connected, margin, now),
            Judgement::WaitLease(Some(now + margin))
        );
        assert_eq!(
            judge(Some(&expired), &connected, margin, now + margin),
            Judgement::Lost(LostHow::LeaseExpired)
        );
        // Its daemon died while its VMs ran, then it went dark: no self-fence happened.
        let orphaned = Suspect {
            answered_while_silent: true,
            ..expired.clone()
        };
        assert_eq!(
            judge(Some(&orphaned), &connected, margin, now + margin),
            Judgement::NoSafeWay
        );
        let orphaned_with_device = Suspect {
            fence_device: true,
            ..orphaned
        };
        assert_eq!(
            judge(Some(&orphaned_with_device), &connected, margin, now),
            Judgement::Fence
        );
    }

    #[test]
    fn libvirt_endpoints_come_from_the_uri() {
        assert_eq!(
            libvirt_endpoint("qemu+tcp://10.78.0.2/system"),
            Some(("10.78.0.2".into(), 16509))
        );
        assert_eq!(
            libvirt_endpoint("qemu+tls://kvm-01.mgmt:1234/system"),
            Some(("kvm-01.mgmt".into(), 1234))
        );
        assert_eq!(
            libvirt_endpoint("qemu+ssh://root@kvm-02/system"),
            Some(("kvm-02".into(), 22))
        );
        assert_eq!(
            libvirt_endpoint("qemu://kvm-03/system"),
            Some(("kvm-03".into(), 16514))
        );
        assert_eq!(
            libvirt_endpoint("qemu+tcp://[fd00::2]:16509/system"),
            Some(("fd00::2".into(), 16509))
        );
        assert_eq!(libvirt_endpoint("qemu:///system"), None);
        assert_eq!(libvirt_endpoint("qemu+unix:///system"), None);
        assert_eq!(libvirt_endpoint("qemu+tcp://h:notaport/system"), None);
    }
}
