//! Traffic and dependency map: which peers a protected service talks to, how much and since when.
//!
//! Fed with successive snapshots of outbound peers from socket tables ([`super::sockets`]) and,
//! optionally, conntrack records (which also carry byte counts). Snapshots are cumulative views,
//! so the map remembers the previous snapshot to count a connection or a flow's bytes once,
//! not once per snapshot. The map is bounded: past `max_entries` the least recently seen peer is
//! evicted.
//!
//! Feed connection counts from one source per service (sockets or conntrack): the same TCP
//! connection seen by both is counted by both.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

use thiserror::Error;

use super::sockets::{OutboundPeer, Proto};

/// Errors in conntrack text.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DepsError {
    /// A conntrack line lacks a required part.
    #[error("conntrack line {line}: {reason}")]
    Malformed {
        /// 1-based line number.
        line: usize,
        /// What is missing or wrong.
        reason: &'static str,
    },
    /// A `key=value` field has an invalid value.
    #[error("conntrack line {line}: invalid {key}={value:?}")]
    BadValue {
        /// 1-based line number.
        line: usize,
        /// The key.
        key: &'static str,
        /// The value (cut to 64 bytes).
        value: String,
    },
}

/// Identity of a peer.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct PeerKey {
    /// Peer address (IPv4-mapped IPv6 normalised to IPv4).
    pub addr: IpAddr,
    /// Peer port.
    pub port: u16,
    /// Protocol.
    pub proto: Proto,
}

/// What is known about one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PeerStats {
    /// Bytes exchanged (both directions), from conntrack accounting; 0 when only sockets are fed.
    pub bytes: u64,
    /// Distinct connections (or flows) seen.
    pub connections: u64,
    /// First observation, Unix milliseconds.
    pub first_seen_ms: u64,
    /// Latest observation, Unix milliseconds.
    pub last_seen_ms: u64,
}

/// One conntrack entry (tcp or udp), original direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConntrackRecord {
    /// Protocol.
    pub proto: Proto,
    /// Initiator address.
    pub src: IpAddr,
    /// Responder address.
    pub dst: IpAddr,
    /// Initiator port.
    pub sport: u16,
    /// Responder port.
    pub dport: u16,
    /// Bytes sent by the initiator, when accounting (`nf_conntrack_acct`) is on.
    pub bytes_orig: Option<u64>,
    /// Bytes sent by the responder, when accounting is on.
    pub bytes_reply: Option<u64>,
}

impl ConntrackRecord {
    /// Both directions, or `None` without accounting.
    pub fn total_bytes(&self) -> Option<u64> {
        match (self.bytes_orig, self.bytes_reply) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0).saturating_add(b.unwrap_or(0))),
        }
    }
}

/// A parsed conntrack table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConntrackTable {
    /// tcp and udp records.
    pub records: Vec<ConntrackRecord>,
    /// Lines for other protocols (icmp, sctp, ...), ignored.
    pub skipped: usize,
    /// Whether lines beyond the bound (or a cut final line) were dropped.
    pub truncated: bool,
}

fn cut(s: &str) -> String {
    s.chars().take(64).collect()
}

/// Parses `/proc/net/nf_conntrack` text (lines starting `ipv4 2 tcp 6 ...`; the older
/// `ip_conntrack` form without the family prefix is accepted too), keeping at most `max_lines`
/// records.
pub fn parse_conntrack(text: &str, max_lines: usize) -> Result<ConntrackTable, DepsError> {
    let mut table = ConntrackTable::default();
    let body = match text.rfind('\n') {
        Some(i) if i + 1 < text.len() => {
            table.truncated = true;
            &text[..=i]
        }
        None if !text.is_empty() => {
            table.truncated = true;
            ""
        }
        _ => text,
    };
    for (i, line) in body.lines().enumerate() {
        let n = i + 1;
        let mut tokens = line.split_whitespace().peekable();
        if tokens.peek().is_none() {
            continue;
        }
        if table.records.len() >= max_lines {
            table.truncated = true;
            break;
        }
        if matches!(tokens.peek(), Some(&"ipv4") | Some(&"ipv6")) {
            tokens.next();
            tokens.next(); // numeric family
        }
        let proto = match tokens.next() {
            Some("tcp") => Proto::Tcp,
            Some("udp") => Proto::Udp,
            Some(_) => {
                table.skipped += 1;
                continue;
            }
            None => {
                return Err(DepsError::Malformed {
                    line: n,
                    reason: "no protocol",
                })
            }
        };
        let (mut src, mut dst, mut sport, mut dport) = (None, None, None, None);
        let (mut bytes_orig, mut bytes_reply) = (None, None);
        let mut reply_dir = false;
        for tok in tokens {
            let Some((k, v)) = tok.split_once('=') else {
                continue;
            };
            let bad = |key: &'static str| DepsError::BadValue {
                line: n,
                key,
                value: cut(v),
            };
            match k {
                "src" if src.is_some() => reply_dir = true,
                "src" if !reply_dir => src = Some(v.parse::<IpAddr>().map_err(|_| bad("src"))?),
                "dst" if !reply_dir => dst = Some(v.parse::<IpAddr>().map_err(|_| bad("dst"))?),
                "sport" if !reply_dir => sport = Some(v.parse::<u16>().map_err(|_| bad("sport"))?),
                "dport" if !reply_dir => dport = Some(v.parse::<u16>().map_err(|_| bad("dport"))?),
                "bytes" => {
                    let b = v.parse::<u64>().map_err(|_| bad("bytes"))?;
                    if reply_dir {
                        bytes_reply = Some(b);
                    } else {
                        bytes_orig = Some(b);
                    }
                }
                _ => {}
            }
        }
        let missing = |reason| DepsError::Malformed { line: n, reason };
        table.records.push(ConntrackRecord {
            proto,
            src: src.ok_or_else(|| missing("no src="))?.to_canonical(),
            dst: dst.ok_or_else(|| missing("no dst="))?.to_canonical(),
            sport: sport.ok_or_else(|| missing("no sport="))?,
            dport: dport.ok_or_else(|| missing("no dport="))?,
            bytes_orig,
            bytes_reply,
        });
    }
    Ok(table)
}

/// A socket-level connection identity, to count each connection once across snapshots.
type ConnKey = (Proto, SocketAddr, SocketAddr);
/// A conntrack flow identity (proto, src, sport, dst, dport).
type FlowKey = (Proto, IpAddr, u16, IpAddr, u16);

/// Peers aggregated over time.
#[derive(Debug, Clone)]
pub struct DependencyMap {
    max_entries: usize,
    peers: HashMap<PeerKey, PeerStats>,
    /// Connections present in the previous socket snapshot.
    prev_conns: HashSet<ConnKey>,
    /// Byte totals of flows present in the previous conntrack snapshot.
    prev_flows: HashMap<FlowKey, u64>,
}

impl DependencyMap {
    /// An empty map holding at most `max_entries` peers.
    pub fn new(max_entries: usize) -> Self {
        DependencyMap {
            max_entries,
            peers: HashMap::new(),
            prev_conns: HashSet::new(),
            prev_flows: HashMap::new(),
        }
    }

    /// Number of peers held.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Whether no peer is held.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Stats of one peer.
    pub fn get(&self, key: &PeerKey) -> Option<&PeerStats> {
        self.peers.get(key)
    }

    /// All peers, most recently seen first (ties by key, for a stable order).
    pub fn entries(&self) -> Vec<(PeerKey, PeerStats)> {
        let mut v: Vec<_> = self.peers.iter().map(|(k, s)| (*k, *s)).collect();
        v.sort_by(|a, b| b.1.last_seen_ms.cmp(&a.1.last_seen_ms).then(a.0.cmp(&b.0)));
        v
    }

    /// Returns the entry for `key`, creating it (and evicting the least recently seen peer if
    /// full); `None` only when `max_entries` is 0.
    fn touch(&mut self, key: PeerKey, at_ms: u64) -> Option<&mut PeerStats> {
        if !self.peers.contains_key(&key) {
            if self.max_entries == 0 {
                return None;
            }
            if self.peers.len() >= self.max_entries {
                let oldest = self
                    .peers
                    .iter()
                    .min_by(|a, b| a.1.last_seen_ms.cmp(&b.1.last_seen_ms).then(a.0.cmp(b.0)));
                if let Some(k) = oldest.map(|(k, _)| *k) {
                    self.peers.remove(&k);
                }
            }
            self.peers.insert(
                key,
                PeerStats {
                    bytes: 0,
                    connections: 0,
                    first_seen_ms: at_ms,
                    last_seen_ms: at_ms,
                },
            );
        }
        let s = self.peers.get_mut(&key)?;
        s.last_seen_ms = s.last_seen_ms.max(at_ms);
        Some(s)
    }

    /// Records a socket-table snapshot of outbound peers taken at `at_ms`. A connection is counted
    /// when it first appears; one still open in the next snapshot is not counted again.
    /// Loopback peers are kept (a local database is a dependency too); filter them with
    /// [`OutboundPeer::is_loopback`] if unwanted.
    pub fn observe_sockets(&mut self, at_ms: u64, peers: &[OutboundPeer]) {
        let mut current = HashSet::with_capacity(peers.len());
        for p in peers {
            let conn = (p.proto, p.local, p.remote);
            let is_new = !self.prev_conns.contains(&conn) && !current.contains(&conn);
            current.insert(conn);
            let key = PeerKey {
                addr: p.remote.ip().to_canonical(),
                port: p.remote.port(),
                proto: p.proto,
            };
            if let Some(s) = self.touch(key, at_ms) {
                if is_new {
                    s.connections += 1;
                }
            }
        }
        self.prev_conns = current;
    }

    /// Records a conntrack snapshot taken at `at_ms`. Flows initiated from one of `local`
    /// addresses to a non-local address are outbound; their responder is the peer. Bytes are
    /// added as the growth since the previous snapshot (a flow whose counter went down was
    /// replaced by a new flow with the same tuple, so its whole count is new).
    pub fn observe_conntrack(
        &mut self,
        at_ms: u64,
        records: &[ConntrackRecord],
        local: &BTreeSet<IpAddr>,
    ) {
        let mut current = HashMap::with_capacity(records.len());
        for r in records {
            if !local.contains(&r.src) || local.contains(&r.dst) {
                continue;
            }
            let flow = (r.proto, r.src, r.sport, r.dst, r.dport);
            let total = r.total_bytes().unwrap_or(0);
            let prev = self.prev_flows.get(&flow).copied();
            let added = match prev {
                Some(p) if total >= p => total - p,
                _ => total,
            };
            let is_new = prev.is_none() && !current.contains_key(&flow);
            current.insert(flow, total);
            if let Some(s) = self.touch(
                PeerKey {
                    addr: r.dst,
                    port: r.dport,
                    proto: r.proto,
                },
                at_ms,
            ) {
                s.bytes = s.bytes.saturating_add(added);
                if is_new {
                    s.connections += 1;
                }
            }
        }
        self.prev_flows = current;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::sockets::SocketState;
    use std::fs;
    use std::path::Path;

    const FIX: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/monitor/fixtures/conntrack"
    );

    fn load(dir: &Path, name: &str) -> String {
        let dst = dir.join(name);
        fs::copy(Path::new(FIX).join(name), &dst).unwrap();
        fs::read_to_string(dst).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn peer(local: &str, remote: &str) -> OutboundPeer {
        OutboundPeer {
            proto: Proto::Tcp,
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            state: SocketState::Established,
        }
    }

    fn key(addr: &str, port: u16, proto: Proto) -> PeerKey {
        PeerKey {
            addr: ip(addr),
            port,
            proto,
        }
    }

    #[test]
    fn parses_conntrack_fixture() {
        let d = tempfile::tempdir().unwrap();
        let t = parse_conntrack(&load(d.path(), "nf_conntrack.txt"), 100).unwrap();
        assert_eq!(t.records.len(), 6);
        assert_eq!(t.skipped, 1, "icmp line");
        assert!(!t.truncated);
        let r = t.records[0];
        assert_eq!(
            (r.proto, r.src, r.dst, r.sport, r.dport),
            (Proto::Tcp, ip("10.20.0.15"), ip("10.20.0.30"), 45986, 5432)
        );
        assert_eq!(
            (r.bytes_orig, r.bytes_reply, r.total_bytes()),
            (Some(1840), Some(5210), Some(7050))
        );
        assert_eq!(t.records[3].proto, Proto::Udp);
        assert_eq!(t.records[5].dst, ip("2001:db8::50"));
        assert_eq!(t.records[4].bytes_reply, Some(0), "[UNREPLIED] flow");

        let t = parse_conntrack(&load(d.path(), "nf_conntrack-noacct.txt"), 100).unwrap();
        assert_eq!(t.records[0].total_bytes(), None);

        // Older ip_conntrack / `conntrack -L` form without the family prefix.
        let t = parse_conntrack(
            "udp      17 28 src=10.0.0.1 dst=10.0.0.2 sport=1 dport=53\n",
            10,
        )
        .unwrap();
        assert_eq!(t.records[0].dport, 53);
    }

    #[test]
    fn conntrack_errors_and_bounds() {
        let d = tempfile::tempdir().unwrap();
        let e = parse_conntrack(&load(d.path(), "nf_conntrack-bad-port.txt"), 100).unwrap_err();
        assert_eq!(
            e,
            DepsError::BadValue {
                line: 2,
                key: "dport",
                value: "70000".into()
            }
        );
        let e = parse_conntrack(&load(d.path(), "nf_conntrack-bad-addr.txt"), 100).unwrap_err();
        assert!(matches!(e, DepsError::BadValue { key: "src", .. }), "{e}");
        let e =
            parse_conntrack(&load(d.path(), "nf_conntrack-missing-dport.txt"), 100).unwrap_err();
        assert_eq!(
            e,
            DepsError::Malformed {
                line: 1,
                reason: "no dport="
            }
        );
        let t = parse_conntrack(&load(d.path(), "nf_conntrack.txt"), 2).unwrap();
        assert_eq!(t.records.len(), 2);
        assert!(t.truncated);
        let text = load(d.path(), "nf_conntrack.txt");
        let t = parse_conntrack(&text[..text.len() - 20], 100).unwrap();
        assert_eq!(t.records.len(), 5, "cut last line dropped");
        assert!(t.truncated);
    }

    #[test]
    fn socket_snapshots_count_each_connection_once() {
        let mut m = DependencyMap::new(10);
        m.observe_sockets(
            1_000,
            &[
                peer("10.0.0.5:40000", "10.0.0.9:5432"),
                peer("10.0.0.5:40001", "10.0.0.9:5432"),
            ],
        );
        // Same two connections still open, plus a new one.
        m.observe_sockets(
            2_000,
            &[
                peer("10.0.0.5:40000", "10.0.0.9:5432"),
                peer("10.0.0.5:40001", "10.0.0.9:5432"),
                peer("10.0.0.5:40002", "10.0.0.9:5432"),
            ],
        );
        let s = m.get(&key("10.0.0.9", 5432, Proto::Tcp)).unwrap();
        assert_eq!(s.connections, 3);
        assert_eq!((s.first_seen_ms, s.last_seen_ms), (1_000, 2_000));
        // Closed then reopened with the same tuple counts again.
        m.observe_sockets(3_000, &[]);
        m.observe_sockets(4_000, &[peer("10.0.0.5:40000", "10.0.0.9:5432")]);
        assert_eq!(
            m.get(&key("10.0.0.9", 5432, Proto::Tcp))
                .unwrap()
                .connections,
            4
        );
        // IPv4-mapped peers share the IPv4 key.
        m.observe_sockets(
            5_000,
            &[peer("[::ffff:10.0.0.5]:40100", "[::ffff:10.0.0.9]:5432")],
        );
        assert_eq!(m.len(), 1);
    }

    #[test]
    fn conntrack_bytes_are_deltas_and_direction_matters() {
        let d = tempfile::tempdir().unwrap();
        let t = parse_conntrack(&load(d.path(), "nf_conntrack.txt"), 100).unwrap();
        let local: BTreeSet<IpAddr> = [ip("10.20.0.15"), ip("2001:db8::15")].into();
        let mut m = DependencyMap::new(10);
        m.observe_conntrack(1_000, &t.records, &local);
        let pg = key("10.20.0.30", 5432, Proto::Tcp);
        assert_eq!(m.get(&pg).unwrap().bytes, 7050 + 2000);
        assert_eq!(m.get(&pg).unwrap().connections, 2);
        assert!(m.get(&key("10.20.0.1", 53, Proto::Udp)).is_some());
        assert!(m.get(&key("2001:db8::50", 443, Proto::Tcp)).is_some());
        // The inbound ssh flow (initiated by 10.20.0.1) is not a dependency.
        assert!(m.get(&key("10.20.0.15", 22, Proto::Tcp)).is_none());
        assert!(m.get(&key("10.20.0.1", 53936, Proto::Tcp)).is_none());
        assert_eq!(m.len(), 4);

        // Next snapshot: first flow grew by 100 bytes; second flow was replaced (counter reset).
        let mut recs = t.records.clone();
        recs[0].bytes_orig = Some(1940);
        recs[1].bytes_orig = Some(10);
        recs[1].bytes_reply = Some(0);
        m.observe_conntrack(2_000, &recs, &local);
        let s = m.get(&pg).unwrap();
        assert_eq!(s.bytes, 9050 + 100 + 10);
        assert_eq!(s.connections, 2, "same tuples: no new connection");
        assert_eq!(s.last_seen_ms, 2_000);
    }

    #[test]
    fn eviction_drops_least_recently_seen() {
        let mut m = DependencyMap::new(2);
        m.observe_sockets(1_000, &[peer("10.0.0.5:1", "10.0.0.1:80")]);
        m.observe_sockets(2_000, &[peer("10.0.0.5:2", "10.0.0.2:80")]);
        m.observe_sockets(3_000, &[peer("10.0.0.5:1", "10.0.0.1:80")]); // refresh .1
        m.observe_sockets(4_000, &[peer("10.0.0.5:3", "10.0.0.3:80")]);
        assert_eq!(m.len(), 2);
        assert!(
            m.get(&key("10.0.0.2", 80, Proto::Tcp)).is_none(),
            "oldest evicted"
        );
        let order: Vec<IpAddr> = m.entries().iter().map(|(k, _)| k.addr).collect();
        assert_eq!(order, [ip("10.0.0.3"), ip("10.0.0.1")]);

        let mut none = DependencyMap::new(0);
        none.observe_sockets(1, &[peer("10.0.0.5:1", "10.0.0.1:80")]);
        assert!(none.is_empty());
    }
}
