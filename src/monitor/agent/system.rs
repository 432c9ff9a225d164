//! What the guest reports about itself: `guest-ping`, `guest-info` (agent version, supported
//! commands), `guest-get-osinfo`, and the counters of `guest-get-cpustats`,
//! `guest-get-diskstats` and `guest-network-get-interfaces`.

use std::net::IpAddr;

use super::reply::{join, parse_reply, Ctx};
use super::{AgentError, AgentLimits, Command};

/// Parses a `guest-ping` reply (`{"return": {}}`).
pub fn parse_ping(text: &str, limits: &AgentLimits) -> Result<(), AgentError> {
    let ret = parse_reply(Command::Ping, text, limits)?;
    Ctx {
        command: Command::Ping,
        limits,
    }
    .object(&ret, "return")?;
    Ok(())
}

/// One entry of `guest-info`'s `supported_commands`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupportedCommand {
    /// Command name, e.g. `guest-exec`.
    pub name: String,
    /// Whether the agent allows it (it may be disabled by `--block-rpcs` or an allow list).
    pub enabled: bool,
    /// Whether the command sends a reply on success (`guest-shutdown` does not).
    pub success_response: bool,
}

/// A `guest-info` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInfo {
    /// Agent version, e.g. `7.2.0`.
    pub version: String,
    /// Commands the agent knows.
    pub supported_commands: Vec<SupportedCommand>,
}

impl AgentInfo {
    /// Whether `name` is known and enabled.
    pub fn is_enabled(&self, name: &str) -> bool {
        self.supported_commands
            .iter()
            .any(|c| c.name == name && c.enabled)
    }
}

/// Parses a `guest-info` reply.
pub fn parse_info(text: &str, limits: &AgentLimits) -> Result<AgentInfo, AgentError> {
    let ctx = Ctx {
        command: Command::Info,
        limits,
    };
    let ret = parse_reply(ctx.command, text, limits)?;
    let obj = ctx.object(&ret, "return")?;
    let version = ctx.string(ctx.required(obj, "return", "version")?, "return.version")?;
    let list = ctx.array(
        ctx.required(obj, "return", "supported_commands")?,
        "return.supported_commands",
    )?;
    let mut supported_commands = Vec::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        let path = format!("return.supported_commands[{i}]");
        let o = ctx.object(item, &path)?;
        supported_commands.push(SupportedCommand {
            name: ctx.string(ctx.required(o, &path, "name")?, &join(&path, "name"))?,
            enabled: ctx.boolean(ctx.required(o, &path, "enabled")?, &join(&path, "enabled"))?,
            success_response: match o.get("success-response") {
                Some(v) => ctx.boolean(v, &join(&path, "success-response"))?,
                None => true,
            },
        });
    }
    Ok(AgentInfo {
        version,
        supported_commands,
    })
}

/// A `guest-get-osinfo` reply. Every field is optional in the QAPI schema.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OsInfo {
    /// `id`, e.g. `debian` (os-release ID).
    pub id: Option<String>,
    /// `name`, e.g. `Debian GNU/Linux`.
    pub name: Option<String>,
    /// `pretty-name`.
    pub pretty_name: Option<String>,
    /// `version`, e.g. `12 (bookworm)`.
    pub version: Option<String>,
    /// `version-id`, e.g. `12`.
    pub version_id: Option<String>,
    /// `variant`.
    pub variant: Option<String>,
    /// `variant-id`.
    pub variant_id: Option<String>,
    /// `kernel-release` (uname -r).
    pub kernel_release: Option<String>,
    /// `kernel-version` (uname -v).
    pub kernel_version: Option<String>,
    /// `machine` (uname -m).
    pub machine: Option<String>,
}

/// Parses a `guest-get-osinfo` reply.
pub fn parse_osinfo(text: &str, limits: &AgentLimits) -> Result<OsInfo, AgentError> {
    let ctx = Ctx {
        command: Command::OsInfo,
        limits,
    };
    let ret = parse_reply(ctx.command, text, limits)?;
    let o = ctx.object(&ret, "return")?;
    let p = "return";
    Ok(OsInfo {
        id: ctx.opt_string(o, p, "id")?,
        name: ctx.opt_string(o, p, "name")?,
        pretty_name: ctx.opt_string(o, p, "pretty-name")?,
        version: ctx.opt_string(o, p, "version")?,
        version_id: ctx.opt_string(o, p, "version-id")?,
        variant: ctx.opt_string(o, p, "variant")?,
        variant_id: ctx.opt_string(o, p, "variant-id")?,
        kernel_release: ctx.opt_string(o, p, "kernel-release")?,
        kernel_version: ctx.opt_string(o, p, "kernel-version")?,
        machine: ctx.opt_string(o, p, "machine")?,
    })
}

/// Per-CPU times from `guest-get-cpustats` (type `linux`), in milliseconds (qemu-ga converts
/// `/proc/stat` ticks with `CLK_TCK`). Optional fields are absent on old guest kernels.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuStats {
    /// CPU number.
    pub cpu: u32,
    /// Time in user mode (includes guest time on Linux).
    pub user_ms: u64,
    /// Time in user mode at low priority.
    pub nice_ms: u64,
    /// Time in kernel mode.
    pub system_ms: u64,
    /// Idle time.
    pub idle_ms: u64,
    /// Time waiting for I/O.
    pub iowait_ms: Option<u64>,
    /// Time servicing interrupts.
    pub irq_ms: Option<u64>,
    /// Time servicing softirqs.
    pub softirq_ms: Option<u64>,
    /// Time stolen by the hypervisor.
    pub steal_ms: Option<u64>,
    /// Time running nested guests.
    pub guest_ms: Option<u64>,
    /// Time running niced nested guests.
    pub guestnice_ms: Option<u64>,
}

impl CpuStats {
    /// Time the CPU did work for the guest: user + nice + system + irq + softirq (guest time is
    /// already inside user/nice on Linux).
    pub fn busy_ms(&self) -> u64 {
        [
            self.user_ms,
            self.nice_ms,
            self.system_ms,
            self.irq_ms.unwrap_or(0),
            self.softirq_ms.unwrap_or(0),
        ]
        .iter()
        .fold(0u64, |a, &b| a.saturating_add(b))
    }
}

/// Parses a `guest-get-cpustats` reply.
pub fn parse_cpustats(text: &str, limits: &AgentLimits) -> Result<Vec<CpuStats>, AgentError> {
    let ctx = Ctx {
        command: Command::CpuStats,
        limits,
    };
    let ret = parse_reply(ctx.command, text, limits)?;
    let list = ctx.array(&ret, "return")?;
    let mut out = Vec::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        let p = format!("return[{i}]");
        let o = ctx.object(item, &p)?;
        let ty = ctx.string(ctx.required(o, &p, "type")?, &join(&p, "type"))?;
        if ty != "linux" {
            return Err(ctx.invalid(&join(&p, "type"), &ty, "\"linux\""));
        }
        let req = |key: &str| -> Result<u64, AgentError> {
            ctx.counter(ctx.required(o, &p, key)?, &join(&p, key))
        };
        out.push(CpuStats {
            cpu: ctx.uint(
                ctx.required(o, &p, "cpu")?,
                &join(&p, "cpu"),
                u64::from(u32::MAX),
            )? as u32,
            user_ms: req("user")?,
            nice_ms: req("nice")?,
            system_ms: req("system")?,
            idle_ms: req("idle")?,
            iowait_ms: ctx.opt_counter(o, &p, "iowait")?,
            irq_ms: ctx.opt_counter(o, &p, "irq")?,
            softirq_ms: ctx.opt_counter(o, &p, "softirq")?,
            steal_ms: ctx.opt_counter(o, &p, "steal")?,
            guest_ms: ctx.opt_counter(o, &p, "guest")?,
            guestnice_ms: ctx.opt_counter(o, &p, "guestnice")?,
        });
    }
    Ok(out)
}

/// One block device from `guest-get-diskstats` (the guest's `/proc/diskstats`). Sectors are 512
/// bytes; ticks are milliseconds. Fields are absent when the guest kernel does not report them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskStats {
    /// Device name, e.g. `vda`.
    pub name: String,
    /// Major device number.
    pub major: u32,
    /// Minor device number.
    pub minor: u32,
    /// Completed reads.
    pub read_ios: Option<u64>,
    /// Merged reads.
    pub read_merges: Option<u64>,
    /// Sectors read.
    pub read_sectors: Option<u64>,
    /// Time spent reading.
    pub read_ticks: Option<u64>,
    /// Completed writes.
    pub write_ios: Option<u64>,
    /// Merged writes.
    pub write_merges: Option<u64>,
    /// Sectors written.
    pub write_sectors: Option<u64>,
    /// Time spent writing.
    pub write_ticks: Option<u64>,
    /// Completed discards.
    pub discard_ios: Option<u64>,
    /// Merged discards.
    pub discard_merges: Option<u64>,
    /// Sectors discarded.
    pub discard_sectors: Option<u64>,
    /// Time spent discarding.
    pub discard_ticks: Option<u64>,
    /// Completed flushes.
    pub flush_ios: Option<u64>,
    /// Time spent flushing.
    pub flush_ticks: Option<u64>,
    /// I/Os currently in progress.
    pub ios_pgr: Option<u64>,
    /// Time the device was busy.
    pub total_ticks: Option<u64>,
    /// Weighted time spent doing I/O.
    pub weight_ticks: Option<u64>,
}

/// Parses a `guest-get-diskstats` reply.
pub fn parse_diskstats(text: &str, limits: &AgentLimits) -> Result<Vec<DiskStats>, AgentError> {
    let ctx = Ctx {
        command: Command::DiskStats,
        limits,
    };
    let ret = parse_reply(ctx.command, text, limits)?;
    let list = ctx.array(&ret, "return")?;
    let mut out = Vec::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        let p = format!("return[{i}]");
        let o = ctx.object(item, &p)?;
        let dev = |key: &str| -> Result<u32, AgentError> {
            Ok(ctx.uint(
                ctx.required(o, &p, key)?,
                &join(&p, key),
                u64::from(u32::MAX),
            )? as u32)
        };
        let mut d = DiskStats {
            name: ctx.string(ctx.required(o, &p, "name")?, &join(&p, "name"))?,
            major: dev("major")?,
            minor: dev("minor")?,
            ..DiskStats::default()
        };
        let sp = join(&p, "stats");
        let s = ctx.object(ctx.required(o, &p, "stats")?, &sp)?;
        let fields: [(&str, &mut Option<u64>); 17] = [
            ("read-ios", &mut d.read_ios),
            ("read-merges", &mut d.read_merges),
            ("read-sectors", &mut d.read_sectors),
            ("read-ticks", &mut d.read_ticks),
            ("write-ios", &mut d.write_ios),
            ("write-merges", &mut d.write_merges),
            ("write-sectors", &mut d.write_sectors),
            ("write-ticks", &mut d.write_ticks),
            ("discard-ios", &mut d.discard_ios),
            ("discard-merges", &mut d.discard_merges),
            ("discard-sectors", &mut d.discard_sectors),
            ("discard-ticks", &mut d.discard_ticks),
            ("flush-ios", &mut d.flush_ios),
            ("flush-ticks", &mut d.flush_ticks),
            ("ios-pgr", &mut d.ios_pgr),
            ("total-ticks", &mut d.total_ticks),
            ("weight-ticks", &mut d.weight_ticks),
        ];
        for (key, slot) in fields {
            *slot = ctx.opt_counter(s, &sp, key)?;
        }
        out.push(d);
    }
    Ok(out)
}

/// One address of a guest interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InterfaceAddress {
    /// The address; its family matches the reply's `ip-address-type`.
    pub addr: IpAddr,
    /// Prefix length (at most 32 for IPv4, 128 for IPv6).
    pub prefix: u8,
}

/// Cumulative interface counters (the guest's `/proc/net/dev`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InterfaceStats {
    /// Bytes received.
    pub rx_bytes: u64,
    /// Packets received.
    pub rx_packets: u64,
    /// Receive errors.
    pub rx_errs: u64,
    /// Received packets dropped.
    pub rx_dropped: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Packets sent.
    pub tx_packets: u64,
    /// Transmit errors.
    pub tx_errs: u64,
    /// Transmitted packets dropped.
    pub tx_dropped: u64,
}

/// One interface from `guest-network-get-interfaces`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetInterface {
    /// Interface name, e.g. `eth0`.
    pub name: String,
    /// MAC address (`aa:bb:cc:dd:ee:ff`), absent for interfaces without one.
    pub hardware_address: Option<String>,
    /// Configured addresses.
    pub addresses: Vec<InterfaceAddress>,
    /// Counters, absent when the agent could not read them.
    pub statistics: Option<InterfaceStats>,
}

impl NetInterface {
    /// Whether this is the loopback interface, whose traffic never leaves the guest.
    pub fn is_loopback(&self) -> bool {
        self.name == "lo"
            || (!self.addresses.is_empty() && self.addresses.iter().all(|a| a.addr.is_loopback()))
    }
}

fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Parses a `guest-network-get-interfaces` reply.
pub fn parse_interfaces(text: &str, limits: &AgentLimits) -> Result<Vec<NetInterface>, AgentError> {
    let ctx = Ctx {
        command: Command::NetworkInterfaces,
        limits,
    };
    let ret = parse_reply(ctx.command, text, limits)?;
    let list = ctx.array(&ret, "return")?;
    let mut out = Vec::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        let p = format!("return[{i}]");
        let o = ctx.object(item, &p)?;
        let name = ctx.string(ctx.required(o, &p, "name")?, &join(&p, "name"))?;
        let hardware_address = ctx.opt_string(o, &p, "hardware-address")?;
        if let Some(mac) = &hardware_address {
            if !is_mac(mac) {
                return Err(ctx.invalid(&join(&p, "hardware-address"), mac, "a MAC address"));
            }
        }
        let mut addresses = Vec::new();
        if let Some(v) = o.get("ip-addresses") {
            let ap = join(&p, "ip-addresses");
            for (j, a) in ctx.array(v, &ap)?.iter().enumerate() {
                let q = format!("{ap}[{j}]");
                let ao = ctx.object(a, &q)?;
                let ty = ctx.string(
                    ctx.required(ao, &q, "ip-address-type")?,
                    &join(&q, "ip-address-type"),
                )?;
                let text =
                    ctx.string(ctx.required(ao, &q, "ip-address")?, &join(&q, "ip-address"))?;
                let addr: IpAddr = text
                    .parse()
                    .map_err(|_| ctx.invalid(&join(&q, "ip-address"), &text, "an IP address"))?;
                let max_prefix = match (ty.as_str(), addr) {
                    ("ipv4", IpAddr::V4(_)) => 32,
                    ("ipv6", IpAddr::V6(_)) => 128,
                    _ => {
                        return Err(ctx.invalid(
                            &join(&q, "ip-address-type"),
                            &ty,
                            "the family of ip-address",
                        ))
                    }
                };
                let prefix = ctx.uint(
                    ctx.required(ao, &q, "prefix")?,
                    &join(&q, "prefix"),
                    max_prefix,
                )? as u8;
                addresses.push(InterfaceAddress { addr, prefix });
            }
        }
        let statistics = match o.get("statistics") {
            None => None,
            Some(v) => {
                let sp = join(&p, "statistics");
                let s = ctx.object(v, &sp)?;
                let c = |key: &str| -> Result<u64, AgentError> {
                    ctx.counter(ctx.required(s, &sp, key)?, &join(&sp, key))
                };
                Some(InterfaceStats {
                    rx_bytes: c("rx-bytes")?,
                    rx_packets: c("rx-packets")?,
                    rx_errs: c("rx-errs")?,
                    rx_dropped: c("rx-dropped")?,
                    tx_bytes: c("tx-bytes")?,
                    tx_packets: c("tx-packets")?,
                    tx_errs: c("tx-errs")?,
                    tx_dropped: c("tx-dropped")?,
                })
            }
        };
        out.push(NetInterface {
            name,
            hardware_address,
            addresses,
            statistics,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::agent::test_support::{fixture, limits};

    #[test]
    fn ping_and_info_fixtures() {
        let d = tempfile::tempdir().unwrap();
        parse_ping(&fixture(d.path(), "ping.json"), &limits()).unwrap();
        let info = parse_info(&fixture(d.path(), "info.json"), &limits()).unwrap();
        assert_eq!(info.version, "7.2.0");
        assert!(info.is_enabled("guest-exec"));
        assert!(!info.is_enabled("guest-file-write"), "disabled in fixture");
        assert!(!info.is_enabled("guest-no-such"));
        let shutdown = info
            .supported_commands
            .iter()
            .find(|c| c.name == "guest-shutdown")
            .unwrap();
        assert!(!shutdown.success_response);
    }

    #[test]
    fn osinfo_fixture() {
        let d = tempfile::tempdir().unwrap();
        let os = parse_osinfo(&fixture(d.path(), "osinfo.json"), &limits()).unwrap();
        assert_eq!(os.id.as_deref(), Some("debian"));
        assert_eq!(os.version_id.as_deref(), Some("12"));
        assert_eq!(os.kernel_release.as_deref(), Some("6.1.0-18-amd64"));
        assert_eq!(os.machine.as_deref(), Some("x86_64"));
        assert_eq!(os.variant, None);
    }

    #[test]
    fn cpustats_fixture() {
        let d = tempfile::tempdir().unwrap();
        let cpus = parse_cpustats(&fixture(d.path(), "cpustats.json"), &limits()).unwrap();
        assert_eq!(cpus.len(), 2);
        assert_eq!(cpus[1].cpu, 1);
        assert_eq!(cpus[0].user_ms, 1_532_140);
        assert_eq!(cpus[0].steal_ms, Some(3_210));
        assert_eq!(
            cpus[0].busy_ms(),
            1_532_140 + 2_030 + 401_220 + 18_550,
            "irq is 0"
        );
    }

    #[test]
    fn diskstats_fixture() {
        let d = tempfile::tempdir().unwrap();
        let disks = parse_diskstats(&fixture(d.path(), "diskstats.json"), &limits()).unwrap();
        assert_eq!(disks.len(), 2);
        assert_eq!(disks[0].name, "vda");
        assert_eq!((disks[0].major, disks[0].minor), (254, 0));
        assert_eq!(disks[0].read_sectors, Some(4_551_214));
        assert_eq!(disks[0].flush_ios, Some(90_211));
        assert_eq!(
            disks[1].discard_ios, None,
            "old-kernel entry has no discard fields"
        );
    }

    #[test]
    fn interfaces_fixture() {
        let d = tempfile::tempdir().unwrap();
        let ifs = parse_interfaces(&fixture(d.path(), "interfaces.json"), &limits()).unwrap();
        assert_eq!(ifs.len(), 2);
        assert!(ifs[0].is_loopback());
        let eth = &ifs[1];
        assert!(!eth.is_loopback());
        assert_eq!(eth.hardware_address.as_deref(), Some("52:54:00:6b:3c:58"));
        assert_eq!(
            eth.addresses[0],
            InterfaceAddress {
                addr: "10.20.0.15".parse().unwrap(),
                prefix: 24
            }
        );
        assert_eq!(eth.addresses[1].prefix, 64);
        let st = eth.statistics.unwrap();
        assert_eq!((st.rx_bytes, st.tx_bytes), (918_273_645, 123_456_789));
    }
}
