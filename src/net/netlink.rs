//! The rtnetlink handle and its link and bridge operations.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::neighbour::{NeighbourAttribute, NeighbourState};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteScope, RouteType,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use super::{DumpKind, LinkChange, NetError};

/// Linux `IFNAMSIZ` minus the terminating NUL.
const MAX_LINK_NAME: usize = 15;

/// How a forwarding entry got into a bridge's FDB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FdbEntryKind {
    /// Learned from traffic; ages out.
    Learned,
    /// Added by hand (`bridge fdb add ... static`); never ages out.
    Static,
}

/// A station MAC the bridge forwards to one of its ports.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FdbEntry {
    /// Station address, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// Name of the bridge port the address is behind.
    pub port: String,
    /// Learned or static.
    pub kind: FdbEntryKind,
}

/// An rtnetlink connection in the network namespace of the thread that created it.
#[derive(Debug, Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens an rtnetlink socket in the calling thread's network namespace and spawns its
    /// connection task on the current tokio runtime (the task ends when the last clone of
    /// this handle is dropped).
    pub fn new() -> Result<Self, NetError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(NetError::NoRuntime)?;
        let (connection, handle, _) = rtnetlink::new_connection().map_err(NetError::Connect)?;
        runtime.spawn(connection);
        Ok(Netlink { handle })
    }

    /// Index of the link called `name`.
    pub async fn link_index(&self, name: &str) -> Result<u32, NetError> {
        Ok(self.link_by_name(name).await?.header.index)
    }

    /// Enslaves `link` to `bridge`.
    pub async fn set_master(&self, link: &str, bridge: &str) -> Result<(), NetError> {
        validate_name(link)?;
        let bridge_index = self.link_index(bridge).await?;
        let msg = LinkUnspec::new_with_name(link)
            .controller(bridge_index)
            .build();
        self.set_link(
            link,
            LinkChange::SetMaster {
                bridge: bridge.to_string(),
            },
            msg,
        )
        .await
    }

    /// Releases `link` from whatever bridge it is a port of (no-op if none).
    pub async fn set_nomaster(&self, link: &str) -> Result<(), NetError> {
        validate_name(link)?;
        let msg = LinkUnspec::new_with_name(link).nocontroller().build();
        self.set_link(link, LinkChange::NoMaster, msg).await
    }

    /// Brings `link` administratively up.
    pub async fn set_up(&self, link: &str) -> Result<(), NetError> {
        validate_name(link)?;
        let msg = LinkUnspec::new_with_name(link).up().build();
        self.set_link(link, LinkChange::Up, msg).await
    }

    /// Brings `link` administratively down.
    pub async fn set_down(&self, link: &str) -> Result<(), NetError> {
        validate_name(link)?;
        let msg = LinkUnspec::new_with_name(link).down().build();
        self.set_link(link, LinkChange::Down, msg).await
    }

    /// Enslaves `link` to `bridge` and brings it up: one lookup for the bridge index, then a
    /// single `RTM_SETLINK` carrying both (the kernel applies the master before the flags).
    pub async fn enslave_and_up(&self, link: &str, bridge: &str) -> Result<(), NetError> {
        validate_name(link)?;
        let bridge_index = self.link_index(bridge).await?;
        let msg = LinkUnspec::new_with_name(link)
            .controller(bridge_index)
            .up()
            .build();
        self.set_link(
            link,
            LinkChange::EnslaveAndUp {
                bridge: bridge.to_string(),
            },
            msg,
        )
        .await
    }

    /// Name of the bridge (or other master) `link` is enslaved to, if any.
    pub async fn master_of(&self, link: &str) -> Result<Option<String>, NetError> {
        let msg = self.link_by_name(link).await?;
        match controller(&msg) {
            Some(index) => Ok(Some(self.link_name(index).await?)),
            None => Ok(None),
        }
    }

    /// Station MACs in `bridge`'s forwarding database, one entry per (MAC, port), sorted.
    ///
    /// Only entries the bridge forwards to a port are listed: the bridge's own local
    /// (permanent) addresses and the ports' `self` entries (their own multicast filters) are
    /// left out, so a MAC listed on two ports really is reachable through two ports.
    pub async fn bridge_fdb(&self, bridge: &str) -> Result<Vec<FdbEntry>, NetError> {
        let bridge_index = self.link_index(bridge).await?;
        let ports: HashMap<u32, String> = self
            .dump_links()
            .await?
            .iter()
            .filter(|l| controller(l) == Some(bridge_index))
            .filter_map(|l| Some((l.header.index, link_name_attr(l)?.to_string())))
            .collect();
        let neighbours: Vec<_> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute()
            .try_collect()
            .await
            .map_err(|source| NetError::Dump {
                what: DumpKind::Fdb,
                source: Box::new(source),
            })?;
        let mut entries = BTreeSet::new();
        for n in &neighbours {
            let master = n.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Controller(i) => Some(*i),
                _ => None,
            });
            if master != Some(bridge_index) || n.header.ifindex == bridge_index {
                continue;
            }
            let kind = match n.header.state {
                NeighbourState::Permanent => continue,
                NeighbourState::Noarp => FdbEntryKind::Static,
                _ => FdbEntryKind::Learned,
            };
            let Some(port) = ports.get(&n.header.ifindex) else {
                // The port left the bridge between the two dumps.
                continue;
            };
            let Some(mac) = n.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::LinkLayerAddress(bytes) => Some(format_mac(bytes)),
                _ => None,
            }) else {
                continue;
            };
            entries.insert(FdbEntry {
                mac,
                port: port.clone(),
                kind,
            });
        }
        Ok(entries.into_iter().collect())
    }

    /// Installs the host route `dest/32 dev link` in the main table, replacing any route to
    /// `dest/32` there (`NLM_F_REPLACE`): traffic moves to the new device in one atomic step.
    pub async fn replace_host_route(&self, dest: Ipv4Addr, link: &str) -> Result<(), NetError> {
        let index = self.link_index(link).await?;
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dest, 32)
            .output_interface(index)
            .scope(RouteScope::Link)
            .build();
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(|source| NetError::RouteReplace {
                dest,
                link: link.to_string(),
                source: Box::new(source),
            })
    }

    /// Destinations of the IPv4 host routes (`/32`, main table, no gateway) that go out
    /// through `link`, sorted: what points traffic for a routed VM's address at its tap.
    pub async fn host_routes_via(&self, link: &str) -> Result<Vec<Ipv4Addr>, NetError> {
        let index = self.link_index(link).await?;
        let routes: Vec<RouteMessage> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(|source| NetError::Dump {
                what: DumpKind::Routes,
                source: Box::new(source),
            })?;
        let mut out: Vec<Ipv4Addr> = routes
            .iter()
            .filter(|r| {
                r.header.destination_prefix_length == 32
                    && r.header.kind == RouteType::Unicast
                    && route_table(r) == u32::from(RouteHeader::RT_TABLE_MAIN)
                    && r.attributes.contains(&RouteAttribute::Oif(index))
                    && !r
                        .attributes
                        .iter()
                        .any(|a| matches!(a, RouteAttribute::Gateway(_)))
            })
            .filter_map(|r| {
                r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Destination(RouteAddress::Inet(d)) => Some(*d),
                    _ => None,
                })
            })
            .collect();
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// The IPv4 addresses configured on `link`, with their prefix lengths, sorted.
    pub async fn ipv4_addresses(&self, link: &str) -> Result<Vec<(Ipv4Addr, u8)>, NetError> {
        let index = self.link_index(link).await?;
        let addrs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(|source| NetError::Dump {
                what: DumpKind::Addresses,
                source: Box::new(source),
            })?;
        let mut out: Vec<(Ipv4Addr, u8)> = addrs
            .iter()
            .filter(|a| a.header.index == index && a.header.family == AddressFamily::Inet)
            .filter_map(|a| {
                a.attributes.iter().find_map(|attr| match attr {
                    AddressAttribute::Local(IpAddr::V4(ip)) => Some((*ip, a.header.prefix_len)),
                    _ => None,
                })
            })
            .collect();
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Adds `address/prefix` to `link`, or keeps it if it is there already (`NLM_F_REPLACE`).
    pub async fn ensure_ipv4_address(
        &self,
        link: &str,
        address: Ipv4Addr,
        prefix: u8,
    ) -> Result<(), NetError> {
        let index = self.link_index(link).await?;
        self.handle
            .address()
            .add(index, IpAddr::V4(address), prefix)
            .replace()
            .execute()
            .await
            .map_err(|source| NetError::AddressAdd {
                address,
                prefix,
                link: link.to_string(),
                source: Box::new(source),
            })
    }

    async fn set_link(
        &self,
        link: &str,
        change: LinkChange,
        msg: LinkMessage,
    ) -> Result<(), NetError> {
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(|source| {
                // The link is addressed by name: ENODEV can only mean it is missing.
                if errno(&source) == Some(libc::ENODEV) {
                    NetError::NoSuchLink {
                        name: link.to_string(),
                    }
                } else {
                    NetError::LinkChange {
                        link: link.to_string(),
                        change,
                        source: Box::new(source),
                    }
                }
            })
    }

    async fn link_by_name(&self, name: &str) -> Result<LinkMessage, NetError> {
        validate_name(name)?;
        let reply = self
            .handle
            .link()
            .get()
            .match_name(name)
            .execute()
            .try_next()
            .await;
        match reply {
            Ok(Some(msg)) => Ok(msg),
            Ok(None) => Err(NetError::NoSuchLink {
                name: name.to_string(),
            }),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Err(NetError::NoSuchLink {
                name: name.to_string(),
            }),
            Err(source) => Err(NetError::LinkLookup {
                name: name.to_string(),
                source: Box::new(source),
            }),
        }
    }

    async fn link_name(&self, index: u32) -> Result<String, NetError> {
        let shown = || format!("#{index}");
        let reply = self
            .handle
            .link()
            .get()
            .match_index(index)
            .execute()
            .try_next()
            .await;
        let msg = match reply {
            Ok(Some(msg)) => msg,
            Ok(None) => return Err(NetError::NoSuchLink { name: shown() }),
            Err(e) if errno(&e) == Some(libc::ENODEV) => {
                return Err(NetError::NoSuchLink { name: shown() })
            }
            Err(source) => {
                return Err(NetError::LinkLookup {
                    name: shown(),
                    source: Box::new(source),
                })
            }
        };
        link_name_attr(&msg)
            .map(str::to_string)
            .ok_or(NetError::IncompleteReply {
                name: shown(),
                attribute: "name",
            })
    }

    async fn dump_links(&self) -> Result<Vec<LinkMessage>, NetError> {
        self.handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|source| NetError::Dump {
                what: DumpKind::Links,
                source: Box::new(source),
            })
    }
}

/// Rejects names the kernel could never have given a link (its `dev_valid_name` rules), so
/// a bad name from configuration is reported as such rather than as a netlink error.
fn validate_name(name: &str) -> Result<(), NetError> {
    let valid = !name.is_empty()
        && name.len() <= MAX_LINK_NAME
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c == '\0' || c.is_whitespace());
    if valid {
        Ok(())
    } else {
        Err(NetError::InvalidLinkName {
            name: name.to_string(),
        })
    }
}

/// The positive errno carried by a netlink error reply.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(msg) => msg.code.map(|c| -c.get()),
        _ => None,
    }
}

fn controller(msg: &LinkMessage) -> Option<u32> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::Controller(i) if *i != 0 => Some(*i),
        _ => None,
    })
}

fn link_name_attr(msg: &LinkMessage) -> Option<&str> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

/// Lowercase colon-separated hex, the form `ip` and libvirt use.
pub(super) fn format_mac(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The routing table of a route: the 32-bit attribute when the kernel sent one, else the
/// header's 8-bit field.
fn route_table(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn link_names_follow_kernel_rules() {
        for ok in [
            "br0",
            "vnet12",
            "a",
            "abcdefghijklmno",
            "us-br.10",
            "tap_x@y",
        ] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "abcdefghijklmnop",
            "a/b",
            "a:b",
            "a b",
            "a\tb",
            "a\0",
        ] {
            assert!(
                matches!(validate_name(bad), Err(NetError::InvalidLinkName { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn macs_are_lowercase_colon_hex() {
        assert_eq!(
            format_mac(&[0x52, 0x54, 0x00, 0xAB, 0x0c, 0xff]),
            "52:54:00:ab:0c:ff"
        );
        assert_eq!(format_mac(&[]), "");
    }

    #[test]
    fn new_without_runtime_is_an_error() {
        assert!(matches!(Netlink::new(), Err(NetError::NoRuntime(_))));
    }
}
