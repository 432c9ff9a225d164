//! Linux socket tables (`/proc/net/tcp`, `tcp6`, `udp`, `udp6`), read from inside the guest
//! through the agent, turned into connections, listening ports and outbound peers.
//!
//! Addresses in these files are the kernel's in-memory words printed as host-order hex, so the
//! byte order depends on the guest CPU; little-endian guests (x86, arm64) are assumed.
//! The text is untrusted guest output: the line count is bounded and every field is validated.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use thiserror::Error;

/// Errors in a socket table.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SocketError {
    /// A line has too few fields or a bad slot number.
    #[error("{proto} table line {line}: {reason}")]
    Malformed {
        /// Table being parsed.
        proto: Proto,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// An `address:port` field does not decode.
    #[error("{proto} table line {line}: bad address {value:?}")]
    BadAddress {
        /// Table being parsed.
        proto: Proto,
        /// 1-based line number.
        line: usize,
        /// The field (cut to 64 bytes).
        value: String,
    },
    /// The state code is not a known TCP state.
    #[error("{proto} table line {line}: unknown socket state {value:?}")]
    UnknownState {
        /// Table being parsed.
        proto: Proto,
        /// 1-based line number.
        line: usize,
        /// The state field (cut to 64 bytes).
        value: String,
    },
}

/// Transport protocol.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// Kernel socket state (`include/net/tcp_states.h`). UDP sockets reuse it: `Close` means
/// unconnected (bound, receiving), `Established` means `connect()`ed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SocketState {
    /// 0x01
    Established,
    /// 0x02: connecting.
    SynSent,
    /// 0x03
    SynRecv,
    /// 0x04
    FinWait1,
    /// 0x05
    FinWait2,
    /// 0x06
    TimeWait,
    /// 0x07 (for UDP: unconnected).
    Close,
    /// 0x08
    CloseWait,
    /// 0x09
    LastAck,
    /// 0x0A
    Listen,
    /// 0x0B
    Closing,
    /// 0x0C
    NewSynRecv,
}

impl SocketState {
    /// Decodes the hex state code of the `st` column.
    pub fn from_code(code: u8) -> Option<Self> {
        use SocketState::*;
        Some(match code {
            0x01 => Established,
            0x02 => SynSent,
            0x03 => SynRecv,
            0x04 => FinWait1,
            0x05 => FinWait2,
            0x06 => TimeWait,
            0x07 => Close,
            0x08 => CloseWait,
            0x09 => LastAck,
            0x0A => Listen,
            0x0B => Closing,
            0x0C => NewSynRecv,
            _ => return None,
        })
    }
}

/// One socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Connection {
    /// Protocol of the table it came from.
    pub proto: Proto,
    /// Local address and port.
    pub local: SocketAddr,
    /// Remote address and port (unspecified, port 0, when not connected).
    pub remote: SocketAddr,
    /// State.
    pub state: SocketState,
}

/// A parsed table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SocketTable {
    /// Sockets, in file order.
    pub connections: Vec<Connection>,
    /// Whether lines were dropped: over the line bound, or a final line cut short (the file was
    /// read with a byte bound).
    pub truncated: bool,
}

fn decode_ip(hex: &str) -> Option<IpAddr> {
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    // Each 32-bit word holds network-order bytes, printed as a (little-endian) host integer.
    let word = |i: usize| {
        u32::from_str_radix(&hex[i * 8..i * 8 + 8], 16)
            .ok()
            .map(u32::to_le_bytes)
    };
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(0)?))),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

fn decode_endpoint(field: &str) -> Option<SocketAddr> {
    let (ip, port) = field.split_once(':')?;
    if port.len() != 4 {
        return None;
    }
    Some(SocketAddr::new(
        decode_ip(ip)?,
        u16::from_str_radix(port, 16).ok()?,
    ))
}

fn cut(s: &str) -> String {
    s.chars().take(64).collect()
}

/// Parses one `/proc/net/{tcp,tcp6,udp,udp6}` text, keeping at most `max_lines` sockets. IPv4 and
/// IPv6 tables share the format; the family comes from the address width.
pub fn parse_proc_net(
    text: &str,
    proto: Proto,
    max_lines: usize,
) -> Result<SocketTable, SocketError> {
    let mut table = SocketTable::default();
    // The kernel always ends the file with a newline: a missing one means the read was cut.
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
        let fields: Vec<&str> = line.split_whitespace().take(4).collect();
        match fields.first() {
            None => continue,
            Some(&"sl") => continue, // header
            Some(sl)
                if !(sl.ends_with(':')
                    && sl[..sl.len() - 1].bytes().all(|b| b.is_ascii_digit())) =>
            {
                return Err(SocketError::Malformed {
                    proto,
                    line: n,
                    reason: "slot field should be `N:`",
                })
            }
            _ => {}
        }
        if fields.len() < 4 {
            return Err(SocketError::Malformed {
                proto,
                line: n,
                reason: "fewer than 4 fields",
            });
        }
        if table.connections.len() >= max_lines {
            table.truncated = true;
            break;
        }
        let bad_addr = |v: &str| SocketError::BadAddress {
            proto,
            line: n,
            value: cut(v),
        };
        let local = decode_endpoint(fields[1]).ok_or_else(|| bad_addr(fields[1]))?;
        let remote = decode_endpoint(fields[2]).ok_or_else(|| bad_addr(fields[2]))?;
        if local.is_ipv4() != remote.is_ipv4() {
            return Err(SocketError::Malformed {
                proto,
                line: n,
                reason: "local and remote address families differ",
            });
        }
        let state = (fields[3].len() == 2)
            .then(|| u8::from_str_radix(fields[3], 16).ok())
            .flatten()
            .and_then(SocketState::from_code)
            .ok_or_else(|| SocketError::UnknownState {
                proto,
                line: n,
                value: cut(fields[3]),
            })?;
        table.connections.push(Connection {
            proto,
            local,
            remote,
            state,
        });
    }
    Ok(table)
}

/// Whether `c` is a socket waiting for peers: a TCP listener, or an unconnected bound UDP socket.
pub fn is_listening(c: &Connection) -> bool {
    match c.proto {
        Proto::Tcp => c.state == SocketState::Listen,
        Proto::Udp => c.state == SocketState::Close && c.remote.port() == 0 && c.local.port() != 0,
    }
}

/// Local ports that accept peers, per protocol. A port listened on by any address counts (an
/// IPv6 wildcard listener also serves IPv4).
pub fn listening_ports(conns: &[Connection]) -> BTreeSet<(Proto, u16)> {
    conns
        .iter()
        .filter(|c| is_listening(c))
        .map(|c| (c.proto, c.local.port()))
        .collect()
}

/// A connection this machine opened to a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OutboundPeer {
    /// Protocol.
    pub proto: Proto,
    /// The peer, with IPv4-mapped IPv6 addresses turned back into IPv4.
    pub remote: SocketAddr,
    /// Our end.
    pub local: SocketAddr,
    /// `Established` or `SynSent` (a peer we try to reach but cannot is a dependency too).
    pub state: SocketState,
}

impl OutboundPeer {
    /// Whether the peer is on this machine.
    pub fn is_loopback(&self) -> bool {
        self.remote.ip().is_loopback()
    }
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// Connections opened from here: established or connecting, to a real peer, from a local port
/// that is not a listening port (a listening local port means the peer connected to us).
///
/// UDP caveat: only `connect()`ed UDP sockets show a peer; `sendto()` traffic is invisible here.
pub fn outbound_peers(conns: &[Connection]) -> Vec<OutboundPeer> {
    let listening = listening_ports(conns);
    conns
        .iter()
        .filter(|c| matches!(c.state, SocketState::Established | SocketState::SynSent))
        .filter(|c| c.remote.port() != 0 && !c.remote.ip().is_unspecified())
        .filter(|c| !listening.contains(&(c.proto, c.local.port())))
        .map(|c| OutboundPeer {
            proto: c.proto,
            remote: canonical(c.remote),
            local: canonical(c.local),
            state: c.state,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::path::Path;

    const FIX: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/monitor/fixtures/sockets");

    fn load(dir: &Path, name: &str) -> String {
        let dst = dir.join(name);
        fs::copy(Path::new(FIX).join(name), &dst).unwrap();
        fs::read_to_string(dst).unwrap()
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn all(dir: &Path) -> Vec<Connection> {
        let mut v = parse_proc_net(&load(dir, "tcp.txt"), Proto::Tcp, 1000)
            .unwrap()
            .connections;
        v.extend(
            parse_proc_net(&load(dir, "tcp6.txt"), Proto::Tcp, 1000)
                .unwrap()
                .connections,
        );
        v.extend(
            parse_proc_net(&load(dir, "udp.txt"), Proto::Udp, 1000)
                .unwrap()
                .connections,
        );
        v
    }

    #[test]
    fn parses_ipv4_tcp() {
        let d = tempfile::tempdir().unwrap();
        let t = parse_proc_net(&load(d.path(), "tcp.txt"), Proto::Tcp, 1000).unwrap();
        assert!(!t.truncated);
        assert_eq!(t.connections.len(), 10);
        assert_eq!(
            t.connections[1],
            Connection {
                proto: Proto::Tcp,
                local: sa("127.0.0.1:5432"),
                remote: sa("0.0.0.0:0"),
                state: SocketState::Listen
            }
        );
        assert_eq!(t.connections[3].remote, sa("10.20.0.1:53936"));
        assert_eq!(t.connections[5].state, SocketState::SynSent);
        assert_eq!(t.connections[6].state, SocketState::TimeWait);
    }

    #[test]
    fn parses_ipv6_including_mapped_addresses() {
        let d = tempfile::tempdir().unwrap();
        let t = parse_proc_net(&load(d.path(), "tcp6.txt"), Proto::Tcp, 1000).unwrap();
        assert_eq!(t.connections[0].local, sa("[::]:80"));
        assert_eq!(t.connections[1].local, sa("[::ffff:10.20.0.15]:80"));
        assert_eq!(t.connections[2].local, sa("[::1]:631"));
        assert_eq!(t.connections[3].remote, sa("[2001:db8::50]:443"));
    }

    #[test]
    fn listening_ports_cover_tcp_and_unconnected_udp() {
        let d = tempfile::tempdir().unwrap();
        let l = listening_ports(&all(d.path()));
        let expect: BTreeSet<(Proto, u16)> = [
            (Proto::Tcp, 22),
            (Proto::Tcp, 80),
            (Proto::Tcp, 631),
            (Proto::Tcp, 5432),
            (Proto::Udp, 53),
            (Proto::Udp, 68),
            (Proto::Udp, 123),
        ]
        .into();
        assert_eq!(l, expect);
    }

    #[test]
    fn outbound_peers_exclude_inbound_and_closing() {
        let d = tempfile::tempdir().unwrap();
        let peers = outbound_peers(&all(d.path()));
        let remotes: Vec<(Proto, SocketAddr)> = peers.iter().map(|p| (p.proto, p.remote)).collect();
        assert_eq!(
            remotes,
            vec![
                (Proto::Tcp, sa("10.20.0.30:5432")),
                (Proto::Tcp, sa("10.20.0.40:6379")),
                (Proto::Tcp, sa("127.0.0.1:5432")),
                (Proto::Tcp, sa("10.20.0.30:5432")),
                (Proto::Tcp, sa("[2001:db8::50]:443")),
                (Proto::Tcp, sa("10.20.0.50:9200")), // IPv4-mapped turned back into IPv4
                (Proto::Udp, sa("10.20.0.1:53")),
            ]
        );
        assert!(peers[2].is_loopback());
        assert_eq!(peers[1].state, SocketState::SynSent);
    }

    #[test]
    fn bounds_and_truncation() {
        let d = tempfile::tempdir().unwrap();
        let t = parse_proc_net(&load(d.path(), "tcp.txt"), Proto::Tcp, 3).unwrap();
        assert_eq!(t.connections.len(), 3);
        assert!(t.truncated);
        // A final line cut by a bounded read is dropped, not misparsed.
        let t = parse_proc_net(&load(d.path(), "tcp-truncated.txt"), Proto::Tcp, 1000).unwrap();
        assert_eq!(t.connections.len(), 4);
        assert!(t.truncated);
        assert_eq!(
            parse_proc_net("", Proto::Tcp, 10).unwrap(),
            SocketTable::default()
        );
    }

    #[test]
    fn malformed_tables_are_rejected() {
        let d = tempfile::tempdir().unwrap();
        let e =
            parse_proc_net(&load(d.path(), "tcp-bad-address.txt"), Proto::Tcp, 1000).unwrap_err();
        assert_eq!(
            e,
            SocketError::BadAddress {
                proto: Proto::Tcp,
                line: 3,
                value: "0100007G:1538".into()
            }
        );
        let e = parse_proc_net(&load(d.path(), "tcp-bad-state.txt"), Proto::Tcp, 1000).unwrap_err();
        assert_eq!(
            e,
            SocketError::UnknownState {
                proto: Proto::Tcp,
                line: 2,
                value: "1F".into()
            }
        );
        let e =
            parse_proc_net(&load(d.path(), "tcp-short-line.txt"), Proto::Tcp, 1000).unwrap_err();
        assert!(matches!(e, SocketError::Malformed { line: 3, .. }), "{e}");
        let e = parse_proc_net("garbage here and more\n", Proto::Udp, 10).unwrap_err();
        assert!(matches!(e, SocketError::Malformed { line: 1, .. }), "{e}");
        let e = parse_proc_net(
            "0: 0100007F:1538 00000000000000000000000000000000:0000 0A\n",
            Proto::Tcp,
            10,
        )
        .unwrap_err();
        assert!(matches!(e, SocketError::Malformed { .. }), "{e}");
        let e = parse_proc_net("0: 0100007F:15 00000000:0000 0A\n", Proto::Tcp, 10).unwrap_err();
        assert!(matches!(e, SocketError::BadAddress { .. }), "{e}");
    }
}
