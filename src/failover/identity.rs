//! A pooled shadow becomes the primary it replaces.
//!
//! A pooled shadow (see `crate::daemon::pool`) is a clone of its class's golden template: the
//! template's NICs on placeholder MACs ([`placeholder_mac`]; taps off the bridge, as every
//! shadow's), no data disk, the template's host name. Its promotion gives it the failed primary's identity,
//! from two sources:
//!
//! - what the primary's guest agent last said while it ran ([`GuestIdentity`], read with the
//!   configuration items): its host name (`/etc/hostname`) and each NIC's addresses, by MAC;
//! - the primary's libvirt definition, read at promotion ([`PrimaryShape`]): its NICs and its
//!   vCPUs and memory. Each NIC of the primary takes a standing-by NIC of the shadow on the same
//!   bridge with the same model: the guest gives it the primary's MAC itself (virtio-net's
//!   control queue; `ip link set address`), since libvirt cannot change a live NIC's MAC, and
//!   the shadow's persistent definition gets the primary's MAC (a restart keeps it). Only a NIC
//!   with no such match is hot-plugged with the primary's MAC, model and bridge, link down:
//!   under TCG the guest takes about a second to show a hot-plugged NIC, against tens of ms for
//!   the MAC change. Either way the switch, the bridge and ARP caches see the very same MAC.
//!
//! The guest-side changes are argument vectors run through `guest-exec` by `/bin/sh` with the
//! values as positional parameters, never spliced into the script, and each value is checked
//! first (a host name is letters, digits, `-` and `.`; addresses are typed).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use crate::domain_xml::{without_children, DomainXml, InterfaceKind, InterfaceSpec, XmlError};
use crate::monitor::agent::{AgentError, AgentTransport, GuestAgent};
use crate::monitor::collector::ConfigFileContent;

/// Longest host name accepted (RFC 1123).
pub const MAX_HOSTNAME: usize = 253;
/// Most addresses restored per NIC.
pub const MAX_ADDRESSES_PER_NIC: usize = 16;
/// Longest the guest may take to show a plugged NIC (ACPI PCI hot-plug: about half a second
/// under TCG).
pub const NIC_APPEAR_TIMEOUT: Duration = Duration::from_secs(10);

/// The guest side of a primary's identity, as its agent last reported it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestIdentity {
    /// Its host name, when `/etc/hostname` held a valid one.
    pub hostname: Option<String>,
    /// Addresses (with prefix lengths) by lower-case MAC; link-local IPv6 left out (the guest
    /// makes its own).
    pub addresses: BTreeMap<String, Vec<(IpAddr, u8)>>,
}

impl GuestIdentity {
    /// One line for status: host name and addresses.
    pub fn describe(&self) -> String {
        let addrs: Vec<String> = self
            .addresses
            .iter()
            .flat_map(|(mac, a)| a.iter().map(move |(ip, p)| format!("{ip}/{p} on {mac}")))
            .collect();
        format!(
            "host name {}, {}",
            self.hostname.as_deref().unwrap_or("(unknown)"),
            if addrs.is_empty() {
                "no address known".to_string()
            } else {
                addrs.join(", ")
            }
        )
    }
}

/// What a pooled promotion gives the shadow besides the data disks.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    /// The primary's guest side, if it was ever read.
    pub guest: Option<GuestIdentity>,
    /// Its configuration files as last collected, written before the network comes up.
    pub config_files: Vec<ConfigFileContent>,
    /// Bound on guest agent replies.
    pub agent_max_reply: usize,
    /// The NICs the shadow stood by with that now carry the primary's MACs: the primary's
    /// (lower-case) MAC -> the placeholder MAC the guest's NIC has until `address` changes it.
    /// Filled at `plug_nic`.
    pub guest_macs: BTreeMap<String, String>,
}

/// Whether `s` is a host name we write into a guest: RFC 1123 labels.
pub fn valid_hostname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_HOSTNAME
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// The MAC a pooled shadow's NIC number `index` stands by with: locally administered (first
/// octet `0a`), never a primary's, derived from the shadow's name so that two pooled shadows do
/// not share one (QEMU's `announce-self` still sends from it after the guest changed its MAC).
pub fn placeholder_mac(shadow: &str, index: usize) -> String {
    // FNV-1a: stable across runs and builds, unlike the standard library's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in shadow.bytes().chain(index.to_le_bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let b = h.to_be_bytes();
    format!(
        "0a:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        b[0], b[1], b[2], b[3], b[4]
    )
}

/// Whether `mac` is a MAC address as libvirt writes it (`aa:bb:cc:dd:ee:ff`, any case).
pub fn valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Reads the guest side of an identity through the agent: `/etc/hostname` (bounded) and
/// `guest-network-get-interfaces`. Garbage is dropped, not trusted: an invalid host name is
/// `None`, an interface without a valid MAC is skipped.
pub fn read_guest_identity<T: AgentTransport>(
    agent: &GuestAgent<T>,
) -> Result<GuestIdentity, AgentError> {
    let hostname = match agent.read_file("/etc/hostname", MAX_HOSTNAME + 2) {
        Ok(f) if !f.truncated => std::str::from_utf8(&f.data)
            .ok()
            .map(str::trim)
            .filter(|h| valid_hostname(h))
            .map(str::to_string),
        Ok(_) | Err(AgentError::Guest { .. }) => None,
        Err(e) => return Err(e),
    };
    let mut addresses = BTreeMap::new();
    for nic in agent.interfaces()? {
        let Some(mac) = nic.hardware_address.filter(|m| valid_mac(m)) else {
            continue;
        };
        if nic.name == "lo" {
            continue;
        }
        let list: Vec<(IpAddr, u8)> = nic
            .addresses
            .iter()
            .filter(|a| !matches!(a.addr, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80))
            .take(MAX_ADDRESSES_PER_NIC)
            .map(|a| (a.addr, a.prefix))
            .collect();
        addresses.insert(mac.to_ascii_lowercase(), list);
    }
    Ok(GuestIdentity {
        hostname,
        addresses,
    })
}

/// Sets the running host name and `/etc/hostname`.
const HOSTNAME_SCRIPT: &str = r#"PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH
hostname "$1" && printf '%s\n' "$1" >/etc/hostname"#;

/// Waits for the NIC with MAC `$1` (or already `$2`) to appear (a hot-plugged device), gives it
/// MAC `$2` (a pooled shadow's NIC standing by on a placeholder MAC), brings it up, waits (at
/// most 2 s) until the kernel says it is operational (carrier on: before that its queue drops
/// what it sends, and a first ARP request lost costs the clients a one-second retransmission),
/// removes any other global address (a template's, set at its boot: first, since removing a
/// subnet's primary address removes its secondaries too) and gives it the addresses `$3...`.
/// Exit 3: the NIC never appeared; 6: its MAC could not be changed.
const ADDRESS_SCRIPT: &str = r#"PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH
from=$1; mac=$2; shift 2; i=0; dev=
while [ -z "$dev" ]; do
  for d in /sys/class/net/*; do
    a=$(cat "$d/address" 2>/dev/null)
    { [ "$a" = "$from" ] || [ "$a" = "$mac" ]; } && dev=${d##*/}
  done
  [ -n "$dev" ] && break
  i=$((i+1)); [ "$i" -gt "$TRIES" ] && { echo "no NIC with MAC $from" >&2; exit 3; }
  sleep 0.01
done
[ "$(cat "/sys/class/net/$dev/address")" = "$mac" ] || ip link set "$dev" address "$mac" || exit 6
ip link set "$dev" up || exit 4
i=0
while [ "$(cat "/sys/class/net/$dev/operstate" 2>/dev/null)" != up ] && [ "$i" -lt 200 ]; do
  i=$((i+1)); sleep 0.01
done
ip -o addr show dev "$dev" scope global | while read -r _ _ _ have _; do
  keep=; for a in "$@"; do [ "$a" = "$have" ] && keep=1; done
  [ -n "$keep" ] || ip addr del "$have" dev "$dev" || exit 5
done || exit 5
for a in "$@"; do ip addr replace "$a" dev "$dev" || exit 5; done
echo "$dev""#;

/// The argument vector that sets host name `name` (checked: `None` if it is not valid).
pub fn hostname_argv(name: &str) -> Option<Vec<String>> {
    valid_hostname(name).then(|| {
        ["/bin/sh", "-c", HOSTNAME_SCRIPT, "sh", name]
            .map(String::from)
            .to_vec()
    })
}

/// The argument vector that gives the NIC the guest knows by `guest_mac` the MAC `mac` and the
/// `addresses` (both MACs checked: `None` if one is not valid), waiting up to
/// [`NIC_APPEAR_TIMEOUT`] for it to appear.
pub fn address_argv(guest_mac: &str, mac: &str, addresses: &[(IpAddr, u8)]) -> Option<Vec<String>> {
    if !valid_mac(guest_mac) || !valid_mac(mac) {
        return None;
    }
    let tries = NIC_APPEAR_TIMEOUT.as_millis() / 10;
    let script = format!("TRIES={tries}\n{ADDRESS_SCRIPT}");
    let mut argv: Vec<String> = vec!["/bin/sh".into(), "-c".into(), script, "sh".into()];
    argv.push(guest_mac.to_ascii_lowercase());
    argv.push(mac.to_ascii_lowercase());
    argv.extend(addresses.iter().map(|(a, p)| format!("{a}/{p}")));
    Some(argv)
}

/// What the primary's definition says a pooled shadow must become: its NICs (ready to plug)
/// and its size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrimaryShape {
    /// `(mac, <interface> XML)` of each NIC with a MAC: link down (raised once the shadow is
    /// ready to serve), without the primary's PCI address, alias and tap name (the shadow's own
    /// are assigned when it is plugged).
    pub nics: Vec<(String, String)>,
    /// vCPUs it ran with.
    pub vcpus: u32,
    /// Memory it ran with, KiB.
    pub mem_kib: u64,
}

/// Reads the shape out of the primary's (persistent) definition.
pub fn primary_shape(primary: &DomainXml) -> Result<PrimaryShape, XmlError> {
    let mut nics = Vec::new();
    for mac in primary.interfaces().into_iter().filter_map(|i| i.mac) {
        if let Some(xml) = primary.interface_xml_with_link(&mac, false) {
            nics.push((
                mac.to_ascii_lowercase(),
                without_children(&xml, &["address", "alias", "target"])?,
            ));
        }
    }
    Ok(PrimaryShape {
        nics,
        vcpus: primary.vcpus().current,
        mem_kib: primary.memory_kib().current_kib,
    })
}

/// What `plug_nic` did (see `promote::PromotionSteps::plug_nics`).
#[derive(Debug, Clone)]
pub struct PluggedNics {
    /// The old primary's NICs and size.
    pub shape: PrimaryShape,
    /// The shadow's taps of the primary's NICs, each under the primary's MAC.
    pub taps: Vec<super::TapBinding>,
    /// Standing-by NICs that took a primary's NIC: its MAC -> the placeholder the guest's NIC
    /// has until `address`.
    pub guest_macs: BTreeMap<String, String>,
}

/// How one of the primary's NICs gets onto a pooled shadow (see [`plan_nics`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NicPlan {
    /// The shadow has a NIC with this MAC already (hot-plugged by an earlier try).
    Present,
    /// The shadow's standing-by NIC with MAC `placeholder` takes it: the guest is given the
    /// primary's MAC; `renamed` when its persistent definition says so already (an earlier
    /// try).
    Take {
        /// The MAC the guest's NIC has until `address`.
        placeholder: String,
        /// The persistent definition names the primary's MAC already.
        renamed: bool,
    },
    /// No standing-by NIC matches (another bridge or model, or none left): hot-plugged.
    Plug,
}

/// For each of the primary's NICs (`primary`, its definition; lower-case MAC), which way it gets
/// onto the pooled shadow whose NICs are `live` (live XML) and `spec` (persistent definition). A
/// standing-by NIC is one whose MAC is none of the primary's; it takes a primary's bridge NIC
/// only if its definition names the same bridge and model (the guest changes the MAC, nothing
/// else) and neither has a `<filterref>` (MAC anti-spoofing rules would drop the guest's frames
/// from a MAC libvirt did not start the NIC with). One renamed by an earlier try has the primary's MAC in `spec` and its placeholder,
/// found in no NIC of `spec`, in `live`.
pub fn plan_nics(
    primary: &[InterfaceSpec],
    live: &[InterfaceSpec],
    spec: &[InterfaceSpec],
) -> Vec<(String, NicPlan)> {
    let lower = |i: &InterfaceSpec| i.mac.as_deref().map(str::to_ascii_lowercase);
    let service: Vec<String> = primary.iter().filter_map(lower).collect();
    let has =
        |list: &[InterfaceSpec], mac: &str| list.iter().any(|i| lower(i).as_deref() == Some(mac));
    // Standing-by NICs still on their placeholder in the definition, and those renamed before.
    let mut free: Vec<(String, &InterfaceSpec)> = Vec::new();
    let mut orphans: Vec<String> = Vec::new();
    for l in live {
        let Some(mac) = lower(l) else { continue };
        if service.contains(&mac) {
            continue;
        }
        match spec
            .iter()
            .find(|s| lower(s).as_deref() == Some(mac.as_str()))
        {
            Some(s) => free.push((mac, s)),
            None => orphans.push(mac),
        }
    }
    let mut out = Vec::new();
    for p in primary {
        let Some(mac) = lower(p) else { continue };
        let plan = if has(live, &mac) {
            NicPlan::Present
        } else if has(spec, &mac) && !orphans.is_empty() {
            NicPlan::Take {
                placeholder: orphans.remove(0),
                renamed: true,
            }
        } else {
            let fits = |s: &InterfaceSpec| {
                p.kind == InterfaceKind::Bridge
                    && s.kind == InterfaceKind::Bridge
                    && p.bridge.is_some()
                    && s.bridge == p.bridge
                    && s.model == p.model
                    && !p.filtered
                    && !s.filtered
            };
            match free.iter().position(|(_, s)| fits(s)) {
                Some(i) => NicPlan::Take {
                    placeholder: free.remove(i).0,
                    renamed: false,
                },
                None => NicPlan::Plug,
            }
        };
        out.push((mac, plan));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::agent::{AgentOptions, AgentTransportError};
    use serde_json::{json, Value};

    /// A guest agent answering `/etc/hostname` with `hostname` and the interfaces with `nics`.
    struct Guest {
        hostname: Option<&'static [u8]>,
        nics: Value,
    }

    impl AgentTransport for Guest {
        fn command(&self, j: &str, _: Duration) -> Result<String, AgentTransportError> {
            let v: Value = serde_json::from_str(j).unwrap();
            let reply = match (v["execute"].as_str().unwrap(), self.hostname) {
                ("guest-file-open", Some(_)) => json!({"return": 1}),
                ("guest-file-open", None) => {
                    json!({"error": {"class": "GenericError", "desc": "No such file"}})
                }
                ("guest-file-read", Some(h)) => json!({"return": {"count": h.len(),
                    "buf-b64": crate::monitor::base64::encode(h), "eof": true}}),
                ("guest-file-close", _) => json!({"return": {}}),
                ("guest-network-get-interfaces", _) => json!({"return": self.nics}),
                (other, _) => panic!("unexpected {other}"),
            };
            Ok(reply.to_string())
        }
    }

    fn read(g: Guest) -> Result<GuestIdentity, AgentError> {
        read_guest_identity(&GuestAgent::new(g, AgentOptions::default()))
    }

    #[test]
    fn the_guest_side_is_read_and_garbage_is_dropped() {
        let nics = json!([
            {"name": "lo", "hardware-address": "00:00:00:00:00:00",
             "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "127.0.0.1", "prefix": 8}]},
            {"name": "eth0", "hardware-address": "52:54:00:AB:CD:EF", "ip-addresses": [
                {"ip-address-type": "ipv4", "ip-address": "10.77.0.81", "prefix": 24},
                {"ip-address-type": "ipv6", "ip-address": "fe80::1", "prefix": 64},
                {"ip-address-type": "ipv6", "ip-address": "fd00::81", "prefix": 64}]}
        ]);
        let id = read(Guest {
            hostname: Some(b"it-pla\n"),
            nics: nics.clone(),
        })
        .unwrap();
        assert_eq!(id.hostname.as_deref(), Some("it-pla"));
        assert_eq!(
            id.addresses.keys().collect::<Vec<_>>(),
            ["52:54:00:ab:cd:ef"],
            "loopback is left out"
        );
        assert_eq!(
            id.addresses["52:54:00:ab:cd:ef"],
            [
                ("10.77.0.81".parse().unwrap(), 24),
                ("fd00::81".parse().unwrap(), 64)
            ],
            "link-local addresses are the guest's own"
        );
        for bad in [&b"web;reboot\n"[..], b"\xff\xfe", b""] {
            let id = read(Guest {
                hostname: Some(bad),
                nics: nics.clone(),
            })
            .unwrap();
            assert_eq!(id.hostname, None, "{bad:?}");
        }
        let id = read(Guest {
            hostname: None,
            nics: json!([]),
        })
        .unwrap();
        assert_eq!(id, GuestIdentity::default(), "no /etc/hostname, no NIC");
        // A reply the agent parser refuses (a MAC that is none) is an error, not a guess.
        let garbage = read(Guest {
            hostname: None,
            nics: json!([{"name": "eth0", "hardware-address": "not-a-mac", "ip-addresses": []}]),
        });
        assert!(garbage.is_err());
    }

    #[test]
    fn host_names_are_checked_before_they_reach_a_guest() {
        for ok in ["web1", "it-pa", "a.b-c.example", &"x".repeat(63)] {
            assert!(valid_hostname(ok), "{ok}");
        }
        for bad in [
            "",
            "-web",
            "web-",
            "a..b",
            "web 1",
            "web;rm -rf /",
            "wéb",
            &"x".repeat(64),
        ] {
            assert!(!valid_hostname(bad), "{bad}");
            assert!(hostname_argv(bad).is_none());
        }
        let argv = hostname_argv("it-pa").unwrap();
        assert_eq!(argv[0], "/bin/sh");
        assert_eq!(argv.last().unwrap(), "it-pa", "a positional parameter");
        assert!(!argv[2].contains("it-pa"), "never spliced into the script");
    }

    #[test]
    fn addresses_are_positional_and_both_macs_are_checked() {
        let argv = address_argv(
            "0a:12:34:56:78:9A",
            "52:54:00:AB:cd:01",
            &[
                ("10.77.0.21".parse().unwrap(), 24),
                ("fd00::5".parse().unwrap(), 64),
            ],
        )
        .unwrap();
        assert_eq!(
            &argv[3..],
            [
                "sh",
                "0a:12:34:56:78:9a",
                "52:54:00:ab:cd:01",
                "10.77.0.21/24",
                "fd00::5/64"
            ]
        );
        assert!(argv[2].starts_with("TRIES=1000\n"));
        let ok = "52:54:00:ab:cd:01";
        for bad in ["52:54:00:ab:cd", "52:54:00:ab:cd:0g", "$(reboot)"] {
            assert!(address_argv(bad, ok, &[]).is_none(), "{bad}");
            assert!(address_argv(ok, bad, &[]).is_none(), "{bad}");
        }
    }

    fn nic(mac: &str, bridge: &str, model: &str) -> InterfaceSpec {
        InterfaceSpec {
            kind: InterfaceKind::Bridge,
            mac: Some(mac.into()),
            bridge: Some(bridge.into()),
            network: None,
            target_dev: None,
            model: Some(model.into()),
            link_up: true,
            filtered: false,
        }
    }

    #[test]
    fn a_primary_nic_takes_a_standing_by_nic_of_its_bridge_and_model_or_is_plugged() {
        let primary = [
            nic("52:54:00:00:00:01", "br0", "virtio"),
            nic("52:54:00:00:00:02", "br1", "virtio"),
            nic("52:54:00:00:00:03", "br0", "e1000"),
        ];
        let shadow = [
            nic("0a:00:00:00:00:01", "br1", "virtio"),
            nic("0a:00:00:00:00:02", "br0", "virtio"),
        ];
        let take = |p: &str| NicPlan::Take {
            placeholder: p.into(),
            renamed: false,
        };
        assert_eq!(
            plan_nics(&primary, &shadow, &shadow),
            [
                ("52:54:00:00:00:01".into(), take("0a:00:00:00:00:02")),
                ("52:54:00:00:00:02".into(), take("0a:00:00:00:00:01")),
                ("52:54:00:00:00:03".into(), NicPlan::Plug),
            ]
        );
        // A retry after the first NIC was renamed in the definition and the third plugged.
        let spec = [
            nic("0a:00:00:00:00:01", "br1", "virtio"),
            nic("52:54:00:00:00:01", "br0", "virtio"),
            nic("52:54:00:00:00:03", "br0", "e1000"),
        ];
        let live = [
            nic("0a:00:00:00:00:01", "br1", "virtio"),
            nic("0a:00:00:00:00:02", "br0", "virtio"),
            nic("52:54:00:00:00:03", "br0", "e1000"),
        ];
        assert_eq!(
            plan_nics(&primary, &live, &spec),
            [
                (
                    "52:54:00:00:00:01".into(),
                    NicPlan::Take {
                        placeholder: "0a:00:00:00:00:02".into(),
                        renamed: true
                    }
                ),
                ("52:54:00:00:00:02".into(), take("0a:00:00:00:00:01")),
                ("52:54:00:00:00:03".into(), NicPlan::Present),
            ]
        );
        // Anti-spoofing filters on either side: plugged.
        let filtered = InterfaceSpec {
            filtered: true,
            ..primary[0].clone()
        };
        assert_eq!(
            plan_nics(std::slice::from_ref(&filtered), &shadow, &shadow),
            [("52:54:00:00:00:01".into(), NicPlan::Plug)]
        );
        // A shadow without NICs (a template without any): every NIC is plugged.
        assert!(plan_nics(&primary, &[], &[])
            .iter()
            .all(|(_, p)| *p == NicPlan::Plug));
    }

    #[test]
    fn placeholder_macs_are_local_unicast_valid_and_distinct() {
        let macs: Vec<String> = ["web-pool-shadow-1", "web-pool-shadow-2"]
            .iter()
            .flat_map(|s| (0..3).map(move |i| placeholder_mac(s, i)))
            .collect();
        for m in &macs {
            assert!(valid_mac(m), "{m}");
            assert!(m.starts_with("0a:"), "locally administered unicast: {m}");
        }
        let distinct: std::collections::BTreeSet<&String> = macs.iter().collect();
        assert_eq!(distinct.len(), macs.len(), "{macs:?}");
        assert_eq!(placeholder_mac("a", 0), placeholder_mac("a", 0), "stable");
    }

    #[test]
    fn the_shape_keeps_mac_model_and_bridge_and_drops_the_primary_s_placement() {
        let xml = r#"<domain type='qemu'><name>web</name><memory unit='KiB'>262144</memory>
<currentMemory unit='KiB'>196608</currentMemory><vcpu current='1'>2</vcpu>
<devices><interface type='bridge'><mac address='52:54:00:12:34:56'/><source bridge='usbr0'/>
<target dev='vnet3'/><model type='virtio'/><alias name='net0'/>
<address type='pci' domain='0x0000' bus='0x00' slot='0x03' function='0x0'/></interface>
<interface type='bridge'><source bridge='usbr0'/></interface></devices></domain>"#;
        let shape = primary_shape(&DomainXml::parse(xml).unwrap()).unwrap();
        assert_eq!((shape.vcpus, shape.mem_kib), (1, 196608));
        assert_eq!(
            shape.nics.len(),
            1,
            "a NIC without a MAC has nothing to carry over"
        );
        let (mac, nic) = &shape.nics[0];
        assert_eq!(mac, "52:54:00:12:34:56");
        for kept in ["52:54:00:12:34:56", "usbr0", "virtio", "state=\"down\""] {
            assert!(nic.contains(kept), "{kept} in {nic}");
        }
        for dropped in ["vnet3", "slot=", "net0"] {
            assert!(!nic.contains(dropped), "{dropped} in {nic}");
        }
    }

    #[test]
    fn the_guest_side_is_described_for_status() {
        let g = GuestIdentity {
            hostname: Some("it-pa".into()),
            addresses: [(
                "52:54:00:12:34:56".to_string(),
                vec![("10.77.0.21".parse().unwrap(), 24)],
            )]
            .into(),
        };
        assert_eq!(
            g.describe(),
            "host name it-pa, 10.77.0.21/24 on 52:54:00:12:34:56"
        );
    }
}
