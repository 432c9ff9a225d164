//! Bridge and route rewiring over rtnetlink.
//!
//! Everything here acts on the network namespace the netlink socket was opened in, which is
//! the namespace of the thread that called [`Netlink::new`] (the daemon runs inside the lab's
//! namespace). Links are addressed by name; only the operations that need another link's
//! index (a bridge to enslave to) resolve it first.

mod netlink;
#[cfg(test)]
mod tests;

use std::fmt;

use thiserror::Error;

pub use self::netlink::{FdbEntry, FdbEntryKind, Netlink};

/// A change made to a link, named in errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkChange {
    /// Enslave to a bridge.
    SetMaster {
        /// The bridge.
        bridge: String,
    },
    /// Release from its bridge.
    NoMaster,
    /// Bring administratively up.
    Up,
    /// Bring administratively down.
    Down,
    /// Enslave to a bridge and bring up in one message.
    EnslaveAndUp {
        /// The bridge.
        bridge: String,
    },
}

impl fmt::Display for LinkChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkChange::SetMaster { bridge } => write!(f, "enslave to {bridge}"),
            LinkChange::NoMaster => f.write_str("release from its bridge"),
            LinkChange::Up => f.write_str("set up"),
            LinkChange::Down => f.write_str("set down"),
            LinkChange::EnslaveAndUp { bridge } => write!(f, "enslave to {bridge} and set up"),
        }
    }
}

/// What a failed dump was listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DumpKind {
    /// The link table.
    Links,
    /// The bridge forwarding database.
    Fdb,
    /// The IPv4 routes.
    Routes,
    /// A link's addresses.
    Addresses,
}

impl fmt::Display for DumpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DumpKind::Links => "links",
            DumpKind::Fdb => "bridge fdb",
            DumpKind::Routes => "IPv4 routes",
            DumpKind::Addresses => "addresses",
        })
    }
}

/// Errors of the netlink helpers.
#[derive(Debug, Error)]
pub enum NetError {
    /// [`Netlink::new`] was called outside a tokio runtime.
    #[error("rtnetlink needs a tokio runtime to run its connection task")]
    NoRuntime(#[source] tokio::runtime::TryCurrentError),
    /// The rtnetlink socket could not be opened.
    #[error("cannot open rtnetlink socket")]
    Connect(#[source] std::io::Error),
    /// The name cannot be a Linux interface name (empty, longer than 15 bytes, or containing
    /// `/`, whitespace or NUL).
    #[error("invalid link name {name:?}")]
    InvalidLinkName {
        /// The offending name.
        name: String,
    },
    /// No link with this name exists in the current network namespace.
    #[error("no link named {name} in this network namespace")]
    NoSuchLink {
        /// The missing link.
        name: String,
    },
    /// Looking a link up failed for another reason than its absence.
    #[error("cannot look up link {name}")]
    LinkLookup {
        /// The link looked up (a name, or `#index`).
        name: String,
        /// The netlink error (boxed: it carries a whole netlink message).
        #[source]
        source: Box<rtnetlink::Error>,
    },
    /// The kernel answered a link query without the expected attribute.
    #[error("kernel reply for link {name} lacks its {attribute}")]
    IncompleteReply {
        /// The link queried.
        name: String,
        /// The missing attribute.
        attribute: &'static str,
    },
    /// Changing a link failed.
    #[error("cannot {change} link {link}")]
    LinkChange {
        /// The link changed.
        link: String,
        /// What was attempted.
        change: LinkChange,
        /// The netlink error (boxed: it carries a whole netlink message).
        #[source]
        source: Box<rtnetlink::Error>,
    },
    /// Dumping a kernel table failed.
    #[error("cannot list {what}")]
    Dump {
        /// The table being dumped.
        what: DumpKind,
        /// The netlink error (boxed: it carries a whole netlink message).
        #[source]
        source: Box<rtnetlink::Error>,
    },
    /// Installing or replacing a host route failed.
    #[error("cannot route {dest}/32 via {link}")]
    RouteReplace {
        /// Route destination.
        dest: std::net::Ipv4Addr,
        /// Output device.
        link: String,
        /// The netlink error (boxed: it carries a whole netlink message).
        #[source]
        source: Box<rtnetlink::Error>,
    },
    /// Adding an address to a link failed.
    #[error("cannot add {address}/{prefix} to {link}")]
    AddressAdd {
        /// The address.
        address: std::net::Ipv4Addr,
        /// Its prefix length.
        prefix: u8,
        /// The link.
        link: String,
        /// The netlink error (boxed: it carries a whole netlink message).
        #[source]
        source: Box<rtnetlink::Error>,
    },
}

/// How a link's MAC address was assigned, from `/sys/class/net/<link>/addr_assign_type`
/// (under `sys_root`): `Some(true)` when it was set explicitly (NET_ADDR_SET), so it will
/// not change as ports come and go.
pub fn mac_is_fixed(sys_root: &std::path::Path, link: &str) -> Option<bool> {
    let text = std::fs::read_to_string(
        sys_root
            .join("class/net")
            .join(link)
            .join("addr_assign_type"),
    )
    .ok()?;
    // 0 permanent (hardware), 1 random, 2 stolen from a port, 3 set by userspace.
    Some(matches!(text.trim(), "0" | "3"))
}

#[cfg(test)]
mod mac_tests {
    use super::*;

    #[test]
    fn assign_type_decides_fixed_or_not() {
        let root = tempfile::tempdir().unwrap();
        for (link, kind) in [
            ("br-set", "3\n"),
            ("br-stolen", "2\n"),
            ("eth0", "0\n"),
            ("br-rand", "1\n"),
        ] {
            let d = root.path().join("class/net").join(link);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("addr_assign_type"), kind).unwrap();
        }
        assert_eq!(mac_is_fixed(root.path(), "br-set"), Some(true));
        assert_eq!(mac_is_fixed(root.path(), "eth0"), Some(true));
        assert_eq!(mac_is_fixed(root.path(), "br-stolen"), Some(false));
        assert_eq!(mac_is_fixed(root.path(), "br-rand"), Some(false));
        assert_eq!(mac_is_fixed(root.path(), "missing"), None);
    }
}
