//! Traffic and dependency map: which peers a protected service talks to, how much and since when.
//!
//! Fed with successive snapshots of outbound peers from socket tables ([`super::sockets`]).
//! Snapshots are cumulative views, so the map remembers the previous snapshot to count a
//! connection once, not once per snapshot. The map is bounded: past `max_entries` the least
//! recently seen peer is evicted.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use super::sockets::{OutboundPeer, Proto};

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
    /// Bytes exchanged (both directions). Socket tables carry no byte counts, so this stays 0;
    /// it is kept because stored profiles carry it.
    pub bytes: u64,
    /// Distinct connections (or flows) seen.
    pub connections: u64,
    /// First observation, Unix milliseconds.
    pub first_seen_ms: u64,
    /// Latest observation, Unix milliseconds.
    pub last_seen_ms: u64,
}

/// A socket-level connection identity, to count each connection once across snapshots.
type ConnKey = (Proto, SocketAddr, SocketAddr);

/// Peers aggregated over time.
#[derive(Debug, Clone)]
pub struct DependencyMap {
    max_entries: usize,
    /// Ordered maps, not hashed ones: the map's behaviour (iteration, eviction scans) is the
    /// same on every run for the same snapshots, which keeps fuzzing reproducible, and a guest
    /// choosing its peers cannot aim at a hasher's worst case.
    peers: BTreeMap<PeerKey, PeerStats>,
    /// Connections present in the previous socket snapshot.
    prev_conns: BTreeSet<ConnKey>,
}

impl DependencyMap {
    /// An empty map holding at most `max_entries` peers.
    pub fn new(max_entries: usize) -> Self {
        DependencyMap {
            max_entries,
            peers: BTreeMap::new(),
            prev_conns: BTreeSet::new(),
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
        let mut current = BTreeSet::new();
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::sockets::SocketState;

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
