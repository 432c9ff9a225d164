//! Samples: rates computed from two consecutive sets of cumulative counters.
//!
//! Counters come from the host (cgroup CPU, memory, block I/O; tap interface bytes) and, when
//! the guest agent answers, from the guest (per-CPU times, interface bytes). A counter that goes
//! backwards (QEMU restarted, interface recreated, 32-bit wrap) yields no rate for that metric
//! rather than a negative or huge one, and the reason is recorded in the sample.

use std::collections::BTreeMap;
use std::fmt;

use thiserror::Error;

use super::agent::{CpuStats, NetInterface};
use super::cgroup::CgroupCounters;

/// Errors computing a sample.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SampleError {
    /// The monotonic clock of the newer counters is not after the older one's.
    #[error("counters at monotonic {current_ms} ms are not newer than the previous ones at {previous_ms} ms")]
    NonIncreasingTime {
        /// Monotonic time of the previous counters.
        previous_ms: u64,
        /// Monotonic time of the current counters.
        current_ms: u64,
    },
}

/// Cumulative bytes of one interface.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetCounters {
    /// Bytes received.
    pub rx_bytes: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
}

/// Guest CPU time summed over all CPUs, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestCpuTotals {
    /// Busy time (see [`CpuStats::busy_ms`]).
    pub busy_ms: u64,
    /// Number of CPUs reported.
    pub cpus: u32,
}

impl GuestCpuTotals {
    /// Sums `guest-get-cpustats` entries.
    pub fn from_cpustats(stats: &[CpuStats]) -> Self {
        GuestCpuTotals {
            busy_ms: stats
                .iter()
                .fold(0u64, |a, s| a.saturating_add(s.busy_ms())),
            cpus: u32::try_from(stats.len()).unwrap_or(u32::MAX),
        }
    }
}

/// Cumulative counters of one service at one instant.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawCounters {
    /// Wall-clock time, Unix milliseconds (labels the sample).
    pub ts_unix_ms: u64,
    /// Monotonic time in milliseconds (measures the interval; immune to clock steps).
    pub mono_ms: u64,
    /// Host CPU time of the QEMU process, nanoseconds.
    pub cpu_ns: Option<u64>,
    /// Memory in use, bytes (a gauge, not a counter).
    pub mem_bytes: Option<u64>,
    /// Bytes read from disk.
    pub io_read_bytes: Option<u64>,
    /// Bytes written to disk.
    pub io_write_bytes: Option<u64>,
    /// Interface byte counters by interface name (host taps or guest interfaces).
    pub net: BTreeMap<String, NetCounters>,
    /// Guest CPU totals, when the agent answered.
    pub guest_cpu: Option<GuestCpuTotals>,
}

impl RawCounters {
    /// Counters from the host cgroup only.
    pub fn from_host(ts_unix_ms: u64, mono_ms: u64, cg: &CgroupCounters) -> Self {
        RawCounters {
            ts_unix_ms,
            mono_ms,
            cpu_ns: cg.cpu_usage_ns,
            mem_bytes: cg.mem_bytes,
            io_read_bytes: cg.io_read_bytes,
            io_write_bytes: cg.io_write_bytes,
            ..RawCounters::default()
        }
    }

    /// Adds the guest's CPU times.
    pub fn with_guest_cpustats(mut self, stats: &[CpuStats]) -> Self {
        self.guest_cpu = Some(GuestCpuTotals::from_cpustats(stats));
        self
    }

    /// Adds the guest's interface counters, skipping loopback (its traffic never leaves the guest)
    /// and interfaces without statistics.
    pub fn with_guest_interfaces(mut self, interfaces: &[NetInterface]) -> Self {
        for i in interfaces.iter().filter(|i| !i.is_loopback()) {
            if let Some(s) = i.statistics {
                self.net.insert(
                    i.name.clone(),
                    NetCounters {
                        rx_bytes: s.rx_bytes,
                        tx_bytes: s.tx_bytes,
                    },
                );
            }
        }
        self
    }
}

/// Where a sample's data came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SampleSource {
    /// Host counters only (no guest agent data in one of the two counter sets).
    HostOnly,
    /// Host counters plus guest agent data.
    HostAndGuest,
}

/// Resource usage over one interval.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Sample {
    /// End of the interval, Unix milliseconds.
    pub ts_unix_ms: u64,
    /// CPU used, in cores (1.0 = one core busy); host cgroup time, else guest busy time.
    pub cpu_cores: Option<f64>,
    /// Memory in use at the end of the interval, bytes.
    pub mem_bytes: Option<u64>,
    /// Disk read rate, bytes per second.
    pub disk_read_bps: Option<f64>,
    /// Disk write rate, bytes per second.
    pub disk_write_bps: Option<f64>,
    /// Network receive rate, bytes per second, summed over interfaces.
    pub net_rx_bps: Option<f64>,
    /// Network transmit rate, bytes per second, summed over interfaces.
    pub net_tx_bps: Option<f64>,
    /// Where the data came from.
    pub source: SampleSource,
    /// Why some metric is missing or partial, if one is.
    pub degraded_reason: Option<String>,
}

/// Why a metric has no value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gap {
    Missing(&'static str),
    WentBackwards(&'static str),
    InterfacesReset(usize),
}

impl fmt::Display for Gap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Gap::Missing(m) => write!(f, "{m}: no counter"),
            Gap::WentBackwards(m) => write!(f, "{m}: counter went backwards (reset)"),
            Gap::InterfacesReset(n) => write!(
                f,
                "net: counters of {n} interface(s) went backwards, excluded"
            ),
        }
    }
}

/// Per-second rate of a counter, or why there is none.
fn rate(
    prev: Option<u64>,
    cur: Option<u64>,
    secs: f64,
    name: &'static str,
    gaps: &mut Vec<Gap>,
) -> Option<f64> {
    match (prev, cur) {
        (Some(p), Some(c)) if c >= p => Some((c - p) as f64 / secs),
        (Some(_), Some(_)) => {
            gaps.push(Gap::WentBackwards(name));
            None
        }
        _ => {
            gaps.push(Gap::Missing(name));
            None
        }
    }
}

/// Computes the sample for the interval between `prev` and `cur`.
pub fn compute_sample(prev: &RawCounters, cur: &RawCounters) -> Result<Sample, SampleError> {
    if cur.mono_ms <= prev.mono_ms {
        return Err(SampleError::NonIncreasingTime {
            previous_ms: prev.mono_ms,
            current_ms: cur.mono_ms,
        });
    }
    let secs = (cur.mono_ms - prev.mono_ms) as f64 / 1000.0;
    let mut gaps = Vec::new();

    let guest = prev.guest_cpu.zip(cur.guest_cpu);
    let cpu_cores = match (prev.cpu_ns, cur.cpu_ns, guest) {
        (Some(p), Some(c), _) if c >= p => Some((c - p) as f64 / 1e9 / secs),
        // Host CPU counter unusable: fall back to the guest's own accounting.
        (_, _, Some((gp, gc))) if gc.busy_ms >= gp.busy_ms => {
            Some((gc.busy_ms - gp.busy_ms) as f64 / 1e3 / secs)
        }
        (Some(p), Some(c), _) if c < p => {
            gaps.push(Gap::WentBackwards("cpu"));
            None
        }
        (_, _, Some(_)) => {
            gaps.push(Gap::WentBackwards("cpu"));
            None
        }
        _ => {
            gaps.push(Gap::Missing("cpu"));
            None
        }
    };
    if cur.mem_bytes.is_none() {
        gaps.push(Gap::Missing("memory"));
    }
    let disk_read_bps = rate(
        prev.io_read_bytes,
        cur.io_read_bytes,
        secs,
        "disk read",
        &mut gaps,
    );
    let disk_write_bps = rate(
        prev.io_write_bytes,
        cur.io_write_bytes,
        secs,
        "disk write",
        &mut gaps,
    );

    let (mut rx, mut tx, mut counted, mut reset) = (0u64, 0u64, 0usize, 0usize);
    for (name, c) in &cur.net {
        let Some(p) = prev.net.get(name) else {
            continue;
        };
        if c.rx_bytes < p.rx_bytes || c.tx_bytes < p.tx_bytes {
            reset += 1;
            continue;
        }
        rx = rx.saturating_add(c.rx_bytes - p.rx_bytes);
        tx = tx.saturating_add(c.tx_bytes - p.tx_bytes);
        counted += 1;
    }
    if reset > 0 {
        gaps.push(Gap::InterfacesReset(reset));
    }
    let (net_rx_bps, net_tx_bps) = if counted > 0 {
        (Some(rx as f64 / secs), Some(tx as f64 / secs))
    } else {
        if reset == 0 {
            gaps.push(Gap::Missing("net"));
        }
        (None, None)
    };

    let degraded_reason = (!gaps.is_empty()).then(|| {
        gaps.iter()
            .map(Gap::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    });
    Ok(Sample {
        ts_unix_ms: cur.ts_unix_ms,
        cpu_cores,
        mem_bytes: cur.mem_bytes,
        disk_read_bps,
        disk_write_bps,
        net_rx_bps,
        net_tx_bps,
        source: if guest.is_some() {
            SampleSource::HostAndGuest
        } else {
            SampleSource::HostOnly
        },
        degraded_reason,
    })
}

/// Keeps the previous counters and turns each new set into a sample.
#[derive(Debug, Clone, Default)]
pub struct RateCalculator {
    prev: Option<RawCounters>,
}

impl RateCalculator {
    /// A calculator with no previous counters.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next counters; the first call returns `Ok(None)`. On error the new counters
    /// still become the baseline, so one bad interval does not poison the next.
    pub fn push(&mut self, cur: RawCounters) -> Result<Option<Sample>, SampleError> {
        let result = self
            .prev
            .as_ref()
            .map(|p| compute_sample(p, &cur))
            .transpose();
        self.prev = Some(cur);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::agent::{InterfaceStats, NetInterface};
    use crate::monitor::cgroup::CgroupVersion;

    fn host(mono_ms: u64, cpu_ns: u64, rd: u64, wr: u64) -> RawCounters {
        RawCounters {
            ts_unix_ms: 1_700_000_000_000 + mono_ms,
            mono_ms,
            cpu_ns: Some(cpu_ns),
            mem_bytes: Some(1 << 30),
            io_read_bytes: Some(rd),
            io_write_bytes: Some(wr),
            ..RawCounters::default()
        }
    }

    fn with_net(mut r: RawCounters, name: &str, rx: u64, tx: u64) -> RawCounters {
        r.net.insert(
            name.into(),
            NetCounters {
                rx_bytes: rx,
                tx_bytes: tx,
            },
        );
        r
    }

    #[test]
    fn rates_over_an_interval() {
        let a = with_net(host(10_000, 5_000_000_000, 1_000, 2_000), "vnet0", 100, 200);
        let b = with_net(
            host(12_000, 8_000_000_000, 3_000, 2_000),
            "vnet0",
            2_100,
            4_200,
        );
        let s = compute_sample(&a, &b).unwrap();
        assert_eq!(s.ts_unix_ms, 1_700_000_012_000);
        assert_eq!(s.cpu_cores, Some(1.5));
        assert_eq!(s.mem_bytes, Some(1 << 30));
        assert_eq!(s.disk_read_bps, Some(1_000.0));
        assert_eq!(s.disk_write_bps, Some(0.0));
        assert_eq!(s.net_rx_bps, Some(1_000.0));
        assert_eq!(s.net_tx_bps, Some(2_000.0));
        assert_eq!(s.source, SampleSource::HostOnly);
        assert_eq!(s.degraded_reason, None);
    }

    #[test]
    fn counter_going_backwards_gives_no_rate() {
        let a = host(10_000, 5_000_000_000, 9_000, 2_000);
        let b = host(11_000, 1_000_000, 1_000, 3_000); // QEMU restarted: cpu and read reset
        let s = compute_sample(&a, &b).unwrap();
        assert_eq!(s.cpu_cores, None);
        assert_eq!(s.disk_read_bps, None);
        assert_eq!(s.disk_write_bps, Some(1_000.0));
        let reason = s.degraded_reason.unwrap();
        assert!(reason.contains("cpu: counter went backwards"), "{reason}");
        assert!(
            reason.contains("disk read: counter went backwards"),
            "{reason}"
        );
        assert!(reason.contains("net: no counter"), "{reason}");
    }

    #[test]
    fn one_reset_interface_is_excluded_not_subtracted() {
        let a = with_net(
            with_net(host(0, 0, 0, 0), "eth0", 1_000, 1_000),
            "eth1",
            5_000,
            5_000,
        );
        let b = with_net(
            with_net(host(1_000, 0, 0, 0), "eth0", 2_000, 1_500),
            "eth1",
            10,
            10,
        );
        let s = compute_sample(&a, &b).unwrap();
        assert_eq!(s.net_rx_bps, Some(1_000.0));
        assert_eq!(s.net_tx_bps, Some(500.0));
        assert!(s
            .degraded_reason
            .unwrap()
            .contains("1 interface(s) went backwards"));
        // All interfaces reset: no rate at all.
        let b = with_net(host(1_000, 0, 0, 0), "eth0", 1, 1);
        let a = with_net(host(0, 0, 0, 0), "eth0", 1_000, 1_000);
        assert_eq!(compute_sample(&a, &b).unwrap().net_rx_bps, None);
    }

    #[test]
    fn guest_data_sets_source_and_backs_up_cpu() {
        let stats = |user| {
            vec![
                CpuStats {
                    cpu: 0,
                    user_ms: user,
                    ..CpuStats::default()
                },
                CpuStats {
                    cpu: 1,
                    user_ms: user,
                    ..CpuStats::default()
                },
            ]
        };
        let mut a = host(0, 0, 0, 0).with_guest_cpustats(&stats(1_000));
        let mut b = host(2_000, 0, 0, 0).with_guest_cpustats(&stats(2_000));
        a.cpu_ns = None;
        b.cpu_ns = None;
        let s = compute_sample(&a, &b).unwrap();
        assert_eq!(s.source, SampleSource::HostAndGuest);
        assert_eq!(s.cpu_cores, Some(1.0), "2 CPUs x 1000 ms busy over 2 s");
        // Guest data in only one of the two sets: host only.
        let c = host(4_000, 0, 0, 0);
        assert_eq!(
            compute_sample(&b, &c).unwrap().source,
            SampleSource::HostOnly
        );
    }

    #[test]
    fn from_host_and_guest_interfaces() {
        let cg = CgroupCounters {
            cpu_usage_ns: Some(7),
            mem_bytes: Some(8),
            mem_rss_bytes: None,
            mem_cache_bytes: None,
            io_read_bytes: Some(9),
            io_write_bytes: None,
            version: CgroupVersion::V2,
            missing: vec![],
        };
        let stats = InterfaceStats {
            rx_bytes: 10,
            tx_bytes: 20,
            ..InterfaceStats::default()
        };
        let ifs = vec![
            NetInterface {
                name: "lo".into(),
                hardware_address: None,
                addresses: vec![],
                statistics: Some(stats),
            },
            NetInterface {
                name: "eth0".into(),
                hardware_address: None,
                addresses: vec![],
                statistics: Some(stats),
            },
            NetInterface {
                name: "eth1".into(),
                hardware_address: None,
                addresses: vec![],
                statistics: None,
            },
        ];
        let r = RawCounters::from_host(1, 2, &cg).with_guest_interfaces(&ifs);
        assert_eq!(
            (r.cpu_ns, r.mem_bytes, r.io_read_bytes, r.io_write_bytes),
            (Some(7), Some(8), Some(9), None)
        );
        assert_eq!(r.net.keys().collect::<Vec<_>>(), ["eth0"]);
    }

    #[test]
    fn calculator_needs_two_points_and_survives_clock_trouble() {
        let mut c = RateCalculator::new();
        assert_eq!(c.push(host(1_000, 0, 0, 0)).unwrap(), None);
        assert!(c.push(host(2_000, 1_000_000_000, 0, 0)).unwrap().is_some());
        let e = c.push(host(2_000, 2_000_000_000, 0, 0)).unwrap_err();
        assert_eq!(
            e,
            SampleError::NonIncreasingTime {
                previous_ms: 2_000,
                current_ms: 2_000
            }
        );
        let s = c.push(host(3_000, 3_000_000_000, 0, 0)).unwrap().unwrap();
        assert_eq!(s.cpu_cores, Some(1.0));
    }
}
