//! Which counter feeds each figure of a tick. CPU and disk come from the cgroup, else libvirt,
//! else (disk) the guest; a change of source skips one interval rather than mix two counters.
//! The profile's memory is the guest's own view or the QEMU cgroup's charge, chosen once per
//! collector; its CPU is the guest's busy time when the agent answers two ticks in a row.

use super::guest::GuestReading;
use super::Collector;
use crate::libvirt::DomainStats;
use crate::monitor::agent::DiskStats;
use crate::monitor::cgroup::CgroupCounters;
use crate::monitor::sample::{GuestCpuTotals, NetCounters, RawCounters};

/// Which counter a rate came from; rates are never computed across two sources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CounterSource {
    Cgroup,
    Libvirt,
    Guest,
}

/// Where the profile's memory figure comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum MemSource {
    /// Waiting for the guest's statistics; this many ticks went by without them.
    Undecided { waited: u64 },
    /// The guest's own view (balloon statistics).
    Guest,
    /// The QEMU cgroup's charge.
    Host,
}

impl Collector {
    pub(super) fn raw_counters(
        &mut self,
        cgroup: &Option<CgroupCounters>,
        stats: &Option<DomainStats>,
        guest: &GuestReading,
        ts_unix_ms: u64,
        mono_ms: u64,
    ) -> RawCounters {
        let mut raw = match cgroup {
            Some(cg) => RawCounters::from_host(ts_unix_ms, mono_ms, cg),
            None => RawCounters {
                ts_unix_ms,
                mono_ms,
                ..RawCounters::default()
            },
        };
        let stats = stats.as_ref();
        // CPU and disk: the cgroup when it answers, libvirt otherwise. The two count different
        // things (all QEMU threads vs vCPUs only), so a change of source skips one interval.
        let cpu_source = match (raw.cpu_ns, stats.and_then(|s| s.cpu_time_ns)) {
            (Some(_), _) => Some(CounterSource::Cgroup),
            (None, Some(v)) => {
                raw.cpu_ns = Some(v);
                Some(CounterSource::Libvirt)
            }
            (None, None) => None,
        };
        let prev = std::mem::replace(&mut self.cpu_source, cpu_source);
        if matches!((prev, cpu_source), (Some(a), Some(b)) if a != b) {
            raw.cpu_ns = None;
        }
        let io_source = match (
            raw.io_read_bytes.zip(raw.io_write_bytes),
            stats.and_then(|s| s.block_rd_bytes.zip(s.block_wr_bytes)),
        ) {
            (Some(_), _) => Some(CounterSource::Cgroup),
            (None, Some((r, w))) => {
                raw.io_read_bytes = Some(r);
                raw.io_write_bytes = Some(w);
                Some(CounterSource::Libvirt)
            }
            (None, None) => guest
                .disks
                .as_deref()
                .and_then(guest_disk_bytes)
                .map(|(r, w)| {
                    raw.io_read_bytes = Some(r);
                    raw.io_write_bytes = Some(w);
                    CounterSource::Guest
                }),
        };
        let prev = std::mem::replace(&mut self.io_source, io_source);
        if matches!((prev, io_source), (Some(a), Some(b)) if a != b) {
            raw.io_read_bytes = None;
            raw.io_write_bytes = None;
        }
        if let Some(used) = stats.and_then(guest_used_bytes) {
            raw.mem_bytes = Some(used);
        }
        // Network: the host side of the taps sees all of the guest's traffic without asking
        // the guest; the guest's own counters are the fallback.
        match stats.and_then(|s| s.net_rx_bytes.zip(s.net_tx_bytes)) {
            Some((rx_bytes, tx_bytes)) => {
                raw.net
                    .insert("host-taps".into(), NetCounters { rx_bytes, tx_bytes });
            }
            None => {
                if let Some(ifs) = &guest.interfaces {
                    raw = raw.with_guest_interfaces(ifs);
                }
            }
        }
        if let Some(cpus) = &guest.cpustats {
            raw = raw.with_guest_cpustats(cpus);
        }
        raw
    }

    /// The memory figure for the profile, from the source chosen for this collector.
    pub(super) fn profile_memory(
        &mut self,
        cgroup: &Option<CgroupCounters>,
        stats: &Option<DomainStats>,
    ) -> Option<u64> {
        let guest = stats.as_ref().and_then(guest_used_bytes);
        let host = cgroup.as_ref().and_then(|c| c.mem_bytes);
        match (self.mem_source, guest) {
            (MemSource::Guest, g) => g,
            (MemSource::Host, _) => host,
            (MemSource::Undecided { .. }, Some(g)) => {
                self.mem_source = MemSource::Guest;
                Some(g)
            }
            (MemSource::Undecided { waited }, None) => {
                let waited = waited + 1;
                if waited < self.settings.guest_memory_grace {
                    self.mem_source = MemSource::Undecided { waited };
                    return None;
                }
                tracing::info!(service = %self.service, domain = %self.domain, ticks = waited, "no guest memory statistics; the profile uses the QEMU cgroup's memory");
                self.mem_source = MemSource::Host;
                host
            }
        }
    }

    /// Guest busy cores over the interval, when the agent answered at both ends of it.
    pub(super) fn guest_cores(&mut self, cur: Option<GuestCpuTotals>, mono_ms: u64) -> Option<f64> {
        let prev = std::mem::replace(&mut self.prev_guest_cpu, cur.map(|c| (mono_ms, c)));
        let ((prev_ms, p), c) = prev.zip(cur)?;
        if mono_ms <= prev_ms || c.busy_ms < p.busy_ms || c.cpus != p.cpus || c.cpus == 0 {
            return None;
        }
        let cores = (c.busy_ms - p.busy_ms) as f64 / (mono_ms - prev_ms) as f64;
        // Tick boundaries of the guest and ours do not line up exactly.
        Some(cores.min(f64::from(c.cpus)))
    }
}

/// Bytes read and written by the guest's disks, from its `/proc/diskstats` (512-byte sectors);
/// `None` when it has no whole disk. Only whole disks count: partitions (a name extending another
/// listed device's name) and stacked or memory devices (`dm-`, `md`, `loop`, `ram`, `zram`) would
/// count the same I/O twice or count none.
pub fn guest_disk_bytes(disks: &[DiskStats]) -> Option<(u64, u64)> {
    const NOT_DISKS: [&str; 5] = ["dm-", "md", "loop", "ram", "zram"];
    let whole = |d: &&DiskStats| {
        !NOT_DISKS.iter().any(|p| d.name.starts_with(p))
            && !disks
                .iter()
                .any(|o| o.name != d.name && d.name.starts_with(o.name.as_str()))
    };
    let mut whole_disks = disks.iter().filter(whole).peekable();
    whole_disks.peek()?;
    Some(whole_disks.fold((0u64, 0u64), |(r, w), d| {
        (
            r.saturating_add(d.read_sectors.unwrap_or(0).saturating_mul(512)),
            w.saturating_add(d.write_sectors.unwrap_or(0).saturating_mul(512)),
        )
    }))
}

/// The guest's memory in use (MemTotal − MemAvailable) from the balloon statistics, bytes.
pub fn guest_used_bytes(stats: &DomainStats) -> Option<u64> {
    let total = stats.balloon_available_kib?;
    let available = stats.balloon_usable_kib?;
    (total > 0 && available <= total).then(|| (total - available).saturating_mul(1024))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::libvirt::DomainStats;
    use crate::monitor::agent::{AgentTransportError, GuestAgent};
    use crate::monitor::collector::test_support::*;
    use crate::monitor::collector::HostReading;
    use serde_json::json;

    #[test]
    fn guest_disk_counters_are_the_fallback_and_count_whole_disks_once() {
        let fake = healthy_agent();
        fake.always("guest-get-diskstats", Ok(diskstats(1000)));
        let s = settings();
        let agent = GuestAgent::new(&fake, s.agent.clone());
        let (mut c, _) = Collector::new("web", "web-dom", s, None);
        let no_io = |cpu| {
            let mut h = host(cpu, 1, None);
            if let Some(cg) = h.cgroup.as_mut() {
                cg.io_read_bytes = None;
                cg.io_write_bytes = None;
            }
            h
        };
        c.tick(no_io(0), &agent, T0, 1_000);
        assert!(fake.sent().contains(&"guest-get-diskstats".to_string()));
        fake.always("guest-get-diskstats", Ok(diskstats(3000)));
        let t = c.tick(no_io(1), &agent, T0 + 1_000, 2_000);
        // vda: 2000 more sectors in 1 s; vda1, dm-0 and loop0 are not counted again.
        let sample = t.sample.expect("a sample from two readings");
        assert_eq!(sample.disk_read_bps, Some(2000.0 * 512.0));
        assert_eq!(sample.disk_write_bps, Some(0.0));
        // With host counters the guest is not asked.
        fake.clear_sent();
        c.tick(host(2, 1, None), &agent, T0 + 2_000, 3_000);
        assert!(!fake.sent().contains(&"guest-get-diskstats".to_string()));
    }

    #[test]
    fn a_diskless_guest_is_not_asked_for_disk_counters_every_tick() {
        let fake = healthy_agent();
        fake.always(
            "guest-get-diskstats",
            Ok(
                json!({"return": [{"name": "ram0", "major": 1, "minor": 0, "stats": {}}]})
                    .to_string(),
            ),
        );
        let mut s = settings();
        s.config_every = 5;
        let agent = GuestAgent::new(&fake, s.agent.clone());
        let (mut c, _) = Collector::new("web", "web-dom", s, None);
        let mut asked = Vec::new();
        for i in 1..=11u64 {
            fake.clear_sent();
            let mut h = host(i, 1, None);
            if let Some(cg) = h.cgroup.as_mut() {
                cg.io_read_bytes = None;
                cg.io_write_bytes = None;
            }
            let t = c.tick(h, &agent, T0 + i * 1000, i * 1000);
            if fake.sent().contains(&"guest-get-diskstats".to_string()) {
                asked.push(i);
            }
            if let Some(s) = t.sample {
                assert_eq!(s.disk_read_bps, None, "no disk, no disk rate");
            }
        }
        assert_eq!(asked, [1, 6, 11]);
    }

    #[test]
    fn whole_disks_are_summed_once() {
        let d = |name: &str, rd: u64, wr: u64| DiskStats {
            name: name.to_string(),
            read_sectors: Some(rd),
            write_sectors: Some(wr),
            ..DiskStats::default()
        };
        let disks = [
            d("nvme0n1", 1, 2),
            d("nvme0n1p1", 1, 2),
            d("sda", 10, 0),
            d("sda2", 10, 0),
            d("md0", 5, 5),
            d("zram0", 7, 7),
            d("sr0", 3, 0),
        ];
        assert_eq!(guest_disk_bytes(&disks), Some((14 * 512, 2 * 512)));
        assert_eq!(guest_disk_bytes(&[]), None);
        assert_eq!(
            guest_disk_bytes(&[d("loop0", 1, 1), d("zram0", 1, 1)]),
            None
        );
    }

    #[test]
    fn counter_sources_are_not_mixed() {
        let fake = FakeAgent::default();
        fake.always("guest-get-cpustats", Err(AgentTransportError::NotConnected));
        let agent = GuestAgent::new(&fake, settings().agent);
        let (mut c, _) = Collector::new("web", "web-dom", settings(), None);
        let libvirt_only = |cpu: u64| HostReading {
            cgroup: None,
            stats: Some(DomainStats {
                cpu_time_ns: Some(cpu),
                ..DomainStats::default()
            }),
            errors: Vec::new(),
        };
        c.tick(host(50_000_000_000, 1, None), &agent, T0, 1_000);
        // The cgroup disappears; libvirt's vCPU time is a different counter: no CPU rate.
        let t = c.tick(libvirt_only(1_000), &agent, T0 + 1_000, 2_000);
        assert_eq!(t.sample.unwrap().cpu_cores, None);
        let t = c.tick(libvirt_only(1_000), &agent, T0 + 2_000, 3_000);
        assert_eq!(
            t.sample.unwrap().cpu_cores,
            None,
            "previous tick had no CPU"
        );
        let t = c.tick(libvirt_only(500_001_000), &agent, T0 + 3_000, 4_000);
        assert_eq!(t.sample.unwrap().cpu_cores, Some(0.5));
    }

    #[test]
    fn profile_memory_never_mixes_guest_and_host_views() {
        let fake = FakeAgent::default();
        fake.always("guest-get-cpustats", Err(AgentTransportError::NotConnected));
        let mut s = settings();
        s.guest_memory_grace = 3;
        let agent = GuestAgent::new(&fake, s.agent.clone());
        let (mut c, _) = Collector::new("web", "web-dom", s.clone(), None);
        let host_mem = 170 << 20;
        let mut mems = Vec::new();
        for i in 0..6u64 {
            // Balloon statistics arrive from the fifth tick on: too late, the host was chosen.
            let stats = (i >= 4).then(|| balloon(196_608, 96_608));
            let t = c.tick(
                host(i * 1_000_000, host_mem, stats),
                &agent,
                T0 + i * 1000,
                1_000 + i * 1000,
            );
            mems.push(t.observation.map(|o| o.mem_bytes));
        }
        // No observation while waiting (the first tick has no rates anyway).
        assert_eq!(
            mems,
            [
                None,
                None,
                Some(host_mem),
                Some(host_mem),
                Some(host_mem),
                Some(host_mem)
            ]
        );
        // Statistics seen once: the guest's view only, and no observation without it.
        let (mut c, _) = Collector::new("web", "web-dom", s, None);
        let mut mems = Vec::new();
        for i in 0..4u64 {
            let stats = (i != 2).then(|| balloon(196_608, 96_608));
            let t = c.tick(
                host(i * 1_000_000, host_mem, stats),
                &agent,
                T0 + i * 1000,
                1_000 + i * 1000,
            );
            mems.push(t.observation.map(|o| o.mem_bytes));
        }
        assert_eq!(
            mems,
            [None, Some(100_000 * 1024), None, Some(100_000 * 1024)]
        );
    }

    #[test]
    fn guest_memory_from_balloon_stats() {
        assert_eq!(guest_used_bytes(&balloon(1000, 400)), Some(600 * 1024));
        assert_eq!(
            guest_used_bytes(&balloon(1000, 2000)),
            None,
            "usable above total"
        );
        assert_eq!(guest_used_bytes(&DomainStats::default()), None);
    }
}
