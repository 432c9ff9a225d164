//! The guest's outbound peers, from its socket tables: what the dependency map and the profile's
//! peers are made of.

use std::collections::BTreeSet;

use crate::monitor::sockets::{self, Connection, OutboundPeer, SocketState};
use crate::profile::PeerUse;

/// Peers the guest connected to: outbound sockets (local port not a listening one), including
/// ones closing or just closed, so short requests between two ticks are still seen; loopback
/// peers are left out (they move with the guest).
pub fn dependency_peers(conns: &[Connection]) -> Vec<OutboundPeer> {
    let listening = sockets::listening_ports(conns);
    conns
        .iter()
        .filter(|c| {
            matches!(
                c.state,
                SocketState::Established
                    | SocketState::SynSent
                    | SocketState::FinWait1
                    | SocketState::FinWait2
                    | SocketState::TimeWait
                    | SocketState::CloseWait
                    | SocketState::LastAck
                    | SocketState::Closing
            )
        })
        .filter(|c| c.remote.port() != 0 && !c.remote.ip().is_unspecified())
        .filter(|c| !listening.contains(&(c.proto, c.local.port())))
        .map(|c| OutboundPeer {
            proto: c.proto,
            remote: std::net::SocketAddr::new(c.remote.ip().to_canonical(), c.remote.port()),
            local: std::net::SocketAddr::new(c.local.ip().to_canonical(), c.local.port()),
            state: c.state,
        })
        .filter(|p| !p.is_loopback())
        .collect()
}

/// One [`PeerUse`] per distinct endpoint (socket tables carry no byte counts).
pub(super) fn peer_uses(peers: &[OutboundPeer]) -> Vec<PeerUse> {
    let endpoints: BTreeSet<(sockets::Proto, std::net::SocketAddr)> =
        peers.iter().map(|p| (p.proto, p.remote)).collect();
    endpoints
        .into_iter()
        .map(|(proto, remote)| PeerUse {
            addr: remote.ip().to_string(),
            port: remote.port(),
            proto: match proto {
                sockets::Proto::Tcp => crate::profile::Proto::Tcp,
                sockets::Proto::Udp => crate::profile::Proto::Udp,
            },
            bytes: 0,
        })
        .collect()
}
