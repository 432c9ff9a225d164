//! Socket tables (`/proc/net/{tcp,tcp6,udp,udp6}`), read out of a guest, and the dependency
//! map they feed.
//!
//! Properties: at most `max_lines` records are kept, and all of them when the table is not
//! reported truncated; records keep their table's protocol and one address family per
//! socket; outbound peers and listening ports come from the table; the dependency map never
//! holds more than its bound; an error points at a line of the input and quotes at most 64
//! characters of it.

use understudy::monitor::deps::DependencyMap;
use understudy::monitor::sockets::{
    listening_ports, outbound_peers, parse_proc_net, Proto, SocketError, SocketState,
};

const MAX_LINES: usize = 16;
const MAX_PEERS: usize = 4;

/// Runs one input.
pub fn check(data: &[u8]) {
    let text = crate::text(data);
    let text = text.as_ref();
    let mut map = DependencyMap::new(MAX_PEERS);
    for (at, proto) in [(1_000, Proto::Tcp), (2_000, Proto::Udp)] {
        match parse_proc_net(text, proto, MAX_LINES) {
            Ok(table) => {
                let conns = &table.connections;
                assert!(conns.len() <= MAX_LINES, "{} sockets kept", conns.len());
                if !table.truncated {
                    let data_lines = text
                        .lines()
                        .filter(|l| {
                            !l.trim().is_empty() && l.split_whitespace().next() != Some("sl")
                        })
                        .count();
                    assert_eq!(conns.len(), data_lines, "lines lost without truncation");
                }
                for c in conns {
                    assert_eq!(c.proto, proto);
                    assert_eq!(c.local.is_ipv4(), c.remote.is_ipv4(), "{c:?}");
                }
                for (p, port) in listening_ports(conns) {
                    assert!(conns.iter().any(|c| c.proto == p && c.local.port() == port));
                }
                let peers = outbound_peers(conns);
                for p in &peers {
                    assert!(matches!(
                        p.state,
                        SocketState::Established | SocketState::SynSent
                    ));
                    assert!(
                        conns.iter().any(|c| c.remote.port() == p.remote.port()
                            && c.remote.ip().to_canonical() == p.remote.ip()),
                        "peer {p:?} is not in the table"
                    );
                }
                map.observe_sockets(at, &peers);
                assert!(map.len() <= MAX_PEERS, "map holds {} peers", map.len());
            }
            Err(e) => check_socket_error(text, proto, &e),
        }
    }
}

fn check_socket_error(text: &str, proto: Proto, e: &SocketError) {
    let (line, value) = match e {
        SocketError::Malformed { line, .. } => (*line, None),
        SocketError::BadAddress { line, value, .. }
        | SocketError::UnknownState { line, value, .. } => (*line, Some(value)),
    };
    assert!((1..=crate::line_bound(text)).contains(&line), "{e}");
    assert!(e.to_string().starts_with(&proto.to_string()), "{e}");
    if let Some(v) = value {
        assert!(v.chars().count() <= 64, "{e}");
        assert!(
            text.contains(v.as_str()),
            "{e} quotes what is not in the input"
        );
    }
}
