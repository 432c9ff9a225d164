//! A pooled shadow becomes the primary it replaces.
//!
//! A pooled shadow (see `crate::daemon::pool`) is a clone of its class's golden template: no NIC,
//! no data disk, the template's host name. Its promotion gives it the failed primary's identity,
//! from two sources:
//!
//! - what the primary's guest agent last said while it ran ([`GuestIdentity`], read with the
//!   configuration items): its host name (`/etc/hostname`) and each NIC's addresses, by MAC;
//! - the primary's libvirt definition, read at promotion ([`PrimaryShape`]): its NICs, each
//!   plugged into the shadow with the primary's MAC, model and bridge (so the switch, the bridge
//!   and ARP caches see the very same MAC, and libvirt's definition of the promoted domain says
//!   so: a restart keeps it), links down until the shadow is ready to serve, and its vCPUs and
//!   memory.
//!
//! The guest-side changes are argument vectors run through `guest-exec` by `/bin/sh` with the
//! values as positional parameters, never spliced into the script, and each value is checked
//! first (a host name is letters, digits, `-` and `.`; addresses are typed).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use crate::domain_xml::{without_children, DomainXml, XmlError};
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

/// Waits for the NIC with MAC `$1` to appear (a hot-plugged device), brings it up, waits (at
/// most 2 s) until the kernel says it is operational (carrier on: before that its queue drops
/// what it sends, and a first ARP request lost costs the clients a one-second retransmission),
/// and gives it the addresses `$2...`. Exit 3: the NIC never appeared.
const ADDRESS_SCRIPT: &str = r#"PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH
mac=$1; shift; i=0; dev=
while [ -z "$dev" ]; do
  for d in /sys/class/net/*; do
    [ "$(cat "$d/address" 2>/dev/null)" = "$mac" ] && dev=${d##*/}
  done
  [ -n "$dev" ] && break
  i=$((i+1)); [ "$i" -gt "$TRIES" ] && { echo "no NIC with MAC $mac" >&2; exit 3; }
  sleep 0.01
done
ip link set "$dev" up || exit 4
i=0
while [ "$(cat "/sys/class/net/$dev/operstate" 2>/dev/null)" != up ] && [ "$i" -lt 200 ]; do
  i=$((i+1)); sleep 0.01
done
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

/// The argument vector that configures the NIC with `mac` (checked) with `addresses`, waiting
/// up to [`NIC_APPEAR_TIMEOUT`] for it to appear.
pub fn address_argv(mac: &str, addresses: &[(IpAddr, u8)]) -> Option<Vec<String>> {
    if !valid_mac(mac) {
        return None;
    }
    let tries = NIC_APPEAR_TIMEOUT.as_millis() / 10;
    let script = format!("TRIES={tries}\n{ADDRESS_SCRIPT}");
    let mut argv: Vec<String> = vec!["/bin/sh".into(), "-c".into(), script, "sh".into()];
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
    fn addresses_are_positional_and_the_mac_is_checked() {
        let argv = address_argv(
            "52:54:00:AB:cd:01",
            &[
                ("10.77.0.21".parse().unwrap(), 24),
                ("fd00::5".parse().unwrap(), 64),
            ],
        )
        .unwrap();
        assert_eq!(
            &argv[3..],
            ["sh", "52:54:00:ab:cd:01", "10.77.0.21/24", "fd00::5/64"]
        );
        assert!(argv[2].starts_with("TRIES=1000\n"));
        assert!(address_argv("52:54:00:ab:cd", &[]).is_none());
        assert!(address_argv("52:54:00:ab:cd:0g", &[]).is_none());
        assert!(address_argv("$(reboot)", &[]).is_none());
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
