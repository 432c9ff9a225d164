//! The collector of one protected primary: once per `monitor.sample_interval_ms` it reads the
//! QEMU process's cgroup counters, libvirt's bulk statistics and, through the guest agent, the
//! guest's CPU times (and its interface and disk counters when the host has none); every
//! [`SOCKETS_EVERY_TICKS`] ticks the guest's socket tables for the dependency map, and every
//! [`CONFIG_EVERY_TICKS`] ticks the class's `config_files` and `config_commands` and the guest's
//! OS and kernel (`guest-get-osinfo`, configuration item `os`). Each tick yields
//! a [`Sample`] (appended to the service's [`History`]) and a profile [`Observation`].
//!
//! Cost: every guest agent command is a libvirt round trip (about a quarter of a millisecond of
//! daemon CPU each), and a file read takes three (open, read, close). A tick therefore makes two
//! round trips (bulk statistics, CPU times), a socket round nine more: reading the tables every
//! tenth tick keeps the collectors under 1% of a core per ten domains (`make bench-profile`;
//! every fifth tick measured 1.2%). Long-lived connections (pools, sessions) are always seen;
//! short ones are caught while open or while they linger in `TIME_WAIT` (60 s, on the side
//! that closed first).
//!
//! Host data never depends on the guest. Everything the agent returns is untrusted and bounded
//! (replies by [`AgentLimits`](super::AgentLimits), files by
//! [`CollectorSettings::max_config_bytes`], socket tables by [`MAX_SOCKET_TABLE_BYTES`]). An
//! agent that times out, is not connected or answers too much ends the tick's agent round: the
//! tick degrades to host-only data, the reason is returned in [`Tick::errors`] (the daemon logs
//! it and counts it in `collector_errors_total`), and the agent is left alone for a doubling
//! number of ticks (at most [`MAX_AGENT_BACKOFF_TICKS`]) so a hung agent costs one timeout per
//! backoff period, not one per command per tick. Garbage in one reply only loses that reply.
//!
//! Which numbers feed the profile: memory is the guest's own view (MemTotal − MemAvailable, from
//! the balloon statistics) because that is what a shadow's balloon target must cover; the QEMU
//! cgroup's charge (guest RAM touched plus QEMU's own overhead, about twice as much on a small
//! guest) is the fallback for guests that never send those statistics. The choice is made once
//! per collector ([`GUEST_MEMORY_GRACE_TICKS`]) and observations without a figure from the chosen
//! source are skipped, so a profile never mixes the two. CPU is the
//! guest's busy time when the agent answers two ticks in a row, because vCPU sizing is in guest
//! CPUs and host time includes emulation overhead and loses time under host contention; the
//! cgroup's CPU time is the fallback. The [`Sample`] in the history keeps the monitor's own rule
//! (host CPU first), so it shows what the host paid.
//!
//! The parts:
//! - this file: [`Collector`] (its state, and [`Collector::tick`], which decides what a tick
//!   asks, applies the agent's backoff, turns counters into a [`Sample`] and an [`Observation`]
//!   and appends the sample to the history), [`Tick`] and [`CollectorError`];
//! - `settings`: [`CollectorSettings`], the bounds and the schedules in ticks;
//! - `host`: the host side of a tick ([`HostReading`]): cgroup counters of the QEMU process
//!   (pid and cgroup cached between ticks) and libvirt's bulk statistics;
//! - `guest`: one guest agent round (CPU times, interface and disk counters, socket tables,
//!   configuration items), stopped by the first transport failure, and [`GuestStatus`];
//! - `counters`: which counter feeds each figure (cgroup, libvirt or guest; guest or host
//!   memory) without ever mixing two sources, [`guest_disk_bytes`], [`guest_used_bytes`];
//! - `config`: the tracked configuration items, their changes, and the files delivered at
//!   promotion ([`ConfigFileContent`]);
//! - `peers`: outbound peers from the socket tables ([`dependency_peers`]);
//! - `jitter`: [`TickJitter`], the jittered delay between ticks;
//! - `cpu_time`: [`thread_cpu_ns`], what a tick costs the thread that runs it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use thiserror::Error;

use super::agent::{AgentError, AgentTransport, GuestAgent};
use super::cgroup::CgroupError;
use super::configtrack::{ConfigError, ConfigSnapshot, ConfigSource};
use super::deps::{DependencyMap, PeerKey, PeerStats};
use super::history::{History, HistoryError};
use super::sample::{GuestCpuTotals, RateCalculator, Sample, SampleError};
use super::sockets::SocketError;
use crate::libvirt::{Hypervisor, LibvirtAgent, LibvirtError};
use crate::profile::Observation;

mod config;
mod counters;
mod cpu_time;
mod guest;
mod host;
mod jitter;
mod peers;
mod settings;
#[cfg(test)]
mod test_support;

use config::TrackedContent;
pub use config::{config_item_name, ConfigFileContent};
pub use counters::{guest_disk_bytes, guest_used_bytes};
use counters::{CounterSource, MemSource};
pub use cpu_time::thread_cpu_ns;
pub use guest::GuestStatus;
use guest::{GuestReading, GuestRound};
pub use host::HostReading;
use host::HostSource;
pub use jitter::TickJitter;
pub use peers::dependency_peers;
use peers::peer_uses;
pub use settings::{
    CollectorSettings, CONFIG_EVERY_TICKS, GUEST_MEMORY_GRACE_TICKS, MAX_AGENT_BACKOFF_TICKS,
    MAX_CONFIG_FILE_BYTES, MAX_CONFIG_ITEMS, MAX_DEPENDENCY_PEERS, MAX_SOCKETS_PER_TABLE,
    MAX_SOCKET_TABLE_BYTES, SOCKETS_EVERY_TICKS,
};

/// A failure while collecting; each one degrades a tick, none stops the collector.
#[derive(Debug, Error)]
pub enum CollectorError {
    /// The QEMU pid of the domain is unknown (domain not running, pid file unreadable).
    #[error("no QEMU pid for domain '{domain}'")]
    Pid {
        /// The domain.
        domain: String,
        /// Why.
        #[source]
        source: LibvirtError,
    },
    /// The cgroup counters of the QEMU process could not be read.
    #[error("cgroup counters of domain '{domain}' (QEMU pid {pid}) unreadable")]
    Cgroup {
        /// The domain.
        domain: String,
        /// Its QEMU pid.
        pid: i32,
        /// Why.
        #[source]
        source: CgroupError,
    },
    /// The cgroup was found but holds neither CPU nor memory counters (QEMU gone).
    #[error("cgroup of domain '{domain}' (QEMU pid {pid}) has no CPU or memory counter")]
    CgroupEmpty {
        /// The domain.
        domain: String,
        /// Its QEMU pid.
        pid: i32,
    },
    /// libvirt's bulk statistics could not be read.
    #[error("libvirt statistics of domain '{domain}' unreadable")]
    Stats {
        /// The domain.
        domain: String,
        /// Why.
        #[source]
        source: LibvirtError,
    },
    /// A guest agent command failed or its reply was refused.
    #[error("guest agent of domain '{domain}': {what} failed")]
    Agent {
        /// The domain.
        domain: String,
        /// What was asked (e.g. `cpustats`, `socket table /proc/net/tcp`, `config file /etc/x`).
        what: String,
        /// Why.
        #[source]
        source: AgentError,
    },
    /// A guest socket table did not parse.
    #[error("socket table {path} of domain '{domain}' is malformed")]
    SocketTable {
        /// The domain.
        domain: String,
        /// The guest file.
        path: String,
        /// Why.
        #[source]
        source: SocketError,
    },
    /// A configuration item could not be tracked.
    #[error("configuration item of domain '{domain}' not tracked")]
    Config {
        /// The domain.
        domain: String,
        /// Why.
        #[source]
        source: ConfigError,
    },
    /// Two consecutive counter sets could not be turned into rates.
    #[error("rates of domain '{domain}' not computed")]
    Rates {
        /// The domain.
        domain: String,
        /// Why.
        #[source]
        source: SampleError,
    },
    /// The sample history could not be opened or written.
    #[error("history of service '{service}' failed")]
    History {
        /// The service.
        service: String,
        /// Why.
        #[source]
        source: HistoryError,
    },
}

impl CollectorError {
    /// The `source` label of `collector_errors_total`.
    pub fn source_label(&self) -> &'static str {
        match self {
            CollectorError::Pid { .. } => "pid",
            CollectorError::Cgroup { .. } | CollectorError::CgroupEmpty { .. } => "cgroup",
            CollectorError::Stats { .. } => "libvirt",
            CollectorError::Agent { .. } => "agent",
            CollectorError::SocketTable { .. } => "sockets",
            CollectorError::Config { .. } => "config",
            CollectorError::Rates { .. } => "rates",
            CollectorError::History { .. } => "history",
        }
    }
}

/// The result of one tick.
#[derive(Debug)]
pub struct Tick {
    /// Rates over the interval since the previous tick (none on the first tick).
    pub sample: Option<Sample>,
    /// What the profile learns from this tick (none without CPU and memory figures).
    pub observation: Option<Observation>,
    /// What the guest agent contributed.
    pub guest: GuestStatus,
    /// Whether the configuration items were read in this tick.
    pub config_read: bool,
    /// Whether they were read and differ from the previous read.
    pub config_changed: bool,
    /// Everything that went wrong; the tick is still usable.
    pub errors: Vec<CollectorError>,
}

/// The collector of one service's active primary. Blocking: call [`Collector::collect`] from a
/// blocking thread.
#[derive(Debug)]
pub struct Collector {
    service: String,
    domain: String,
    settings: CollectorSettings,
    host: HostSource,
    rates: RateCalculator,
    cpu_source: Option<CounterSource>,
    io_source: Option<CounterSource>,
    mem_source: MemSource,
    prev_guest_cpu: Option<(u64, GuestCpuTotals)>,
    deps: DependencyMap,
    /// Tick of the last socket round that read a table.
    sockets_tick: Option<u64>,
    /// The tick before which the guest's disk counters are not asked again: set when the guest
    /// reported no whole disk (a diskless guest would otherwise cost a round trip per tick).
    guest_disks_after_tick: u64,
    config: Option<ConfigSnapshot>,
    contents: BTreeMap<ConfigSource, TrackedContent>,
    ticks: u64,
    agent_failures: u32,
    agent_resume_tick: u64,
    unsupported: BTreeSet<String>,
    history: Option<History>,
}

impl Collector {
    /// A collector of `domain`, the active primary of `service`. With `history_dir`, samples
    /// are also kept in `<history_dir>/<service>/`; if that history cannot be opened the
    /// collector works without it and the error is returned alongside.
    pub fn new(
        service: &str,
        domain: &str,
        settings: CollectorSettings,
        history_dir: Option<&Path>,
    ) -> (Self, Option<CollectorError>) {
        let (history, error) =
            match history_dir.map(|d| History::open(d, service, settings.history)) {
                None => (None, None),
                Some(Ok(h)) => (Some(h), None),
                Some(Err(source)) => (
                    None,
                    Some(CollectorError::History {
                        service: service.to_string(),
                        source,
                    }),
                ),
            };
        let c = Collector {
            service: service.to_string(),
            domain: domain.to_string(),
            settings,
            host: HostSource::new(),
            rates: RateCalculator::new(),
            cpu_source: None,
            io_source: None,
            mem_source: MemSource::Undecided { waited: 0 },
            prev_guest_cpu: None,
            deps: DependencyMap::new(MAX_DEPENDENCY_PEERS),
            sockets_tick: None,
            guest_disks_after_tick: 0,
            config: None,
            contents: BTreeMap::new(),
            ticks: 0,
            agent_failures: 0,
            agent_resume_tick: 0,
            unsupported: BTreeSet::new(),
            history,
        };
        (c, error)
    }

    /// The service collected for.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The domain collected from.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The sample history, when one is kept.
    pub fn history(&self) -> Option<&History> {
        self.history.as_ref()
    }

    /// Peers seen so far, most recently seen first.
    pub fn dependencies(&self) -> Vec<(PeerKey, PeerStats)> {
        self.deps.entries()
    }

    /// One tick against the real host and guest: host counters, then the agent round over
    /// libvirt.
    pub fn collect(&mut self, hv: &Hypervisor, ts_unix_ms: u64, mono_ms: u64) -> Tick {
        let host = self.host.read(hv, &self.domain);
        let agent = GuestAgent::new(
            LibvirtAgent {
                hv: hv.clone(),
                domain: self.domain.clone(),
                max_reply: self.settings.agent.limits.max_reply_bytes,
            },
            self.settings.agent.clone(),
        );
        self.tick(host, &agent, ts_unix_ms, mono_ms)
    }

    /// One tick from host readings and an agent (any transport): the testable core.
    pub fn tick<T: AgentTransport>(
        &mut self,
        host: HostReading,
        agent: &GuestAgent<T>,
        ts_unix_ms: u64,
        mono_ms: u64,
    ) -> Tick {
        self.ticks += 1;
        let mut errors = host.errors;
        let (guest, status) = if self.ticks < self.agent_resume_tick {
            (GuestReading::default(), GuestStatus::BackingOff)
        } else {
            let config_round = self.config.is_none()
                || self.ticks.is_multiple_of(self.settings.config_every.max(1));
            let socket_round = self
                .sockets_tick
                .is_none_or(|t| self.ticks - t >= self.settings.sockets_every.max(1));
            // Interface counters only matter when libvirt has none for the taps.
            let want_interfaces = host
                .stats
                .as_ref()
                .is_none_or(|s| s.net_rx_bytes.is_none() || s.net_tx_bytes.is_none());
            // Likewise the guest's disk counters, when neither the cgroup nor libvirt has any.
            let want_disks = self.ticks >= self.guest_disks_after_tick
                && host
                    .cgroup
                    .as_ref()
                    .is_none_or(|c| c.io_read_bytes.is_none() || c.io_write_bytes.is_none())
                && host
                    .stats
                    .as_ref()
                    .is_none_or(|s| s.block_rd_bytes.is_none() || s.block_wr_bytes.is_none());
            let reading = self.read_guest(
                agent,
                GuestRound {
                    interfaces: want_interfaces,
                    disks: want_disks,
                    sockets: socket_round,
                    config: config_round,
                },
                &mut errors,
            );
            if reading.connections.is_some() {
                self.sockets_tick = Some(self.ticks);
            }
            if reading
                .disks
                .as_deref()
                .is_some_and(|d| guest_disk_bytes(d).is_none())
            {
                self.guest_disks_after_tick = self.ticks + self.settings.config_every.max(1);
            }
            let status = match (reading.answered, reading.failed) {
                (_, 0) => GuestStatus::Answered,
                (0, _) => GuestStatus::Failed,
                _ => GuestStatus::Partial,
            };
            if reading.transport_failed {
                self.agent_failures = self.agent_failures.saturating_add(1);
                let pause = (1u64 << self.agent_failures.min(6)).min(MAX_AGENT_BACKOFF_TICKS);
                self.agent_resume_tick = self.ticks + pause;
            } else {
                self.agent_failures = 0;
            }
            (reading, status)
        };

        let profile_mem = self.profile_memory(&host.cgroup, &host.stats);
        let raw = self.raw_counters(&host.cgroup, &host.stats, &guest, ts_unix_ms, mono_ms);
        let guest_cpu = raw.guest_cpu;
        let sample = match self.rates.push(raw) {
            Ok(s) => s,
            Err(source) => {
                errors.push(CollectorError::Rates {
                    domain: self.domain.clone(),
                    source,
                });
                None
            }
        };
        let guest_cores = self.guest_cores(guest_cpu, mono_ms);

        let peers = guest.connections.as_deref().map(dependency_peers);
        if let (Some(p), Some(c)) = (&peers, &guest.connections) {
            tracing::debug!(service = %self.service, domain = %self.domain, sockets = c.len(), peers = p.len(), "socket tables read");
            self.deps.observe_sockets(ts_unix_ms, p);
        }
        let config_read = guest.config.is_some();
        let config_changed = match guest.config {
            Some(items) => self.update_config(items, &mut errors),
            None => false,
        };

        if let (Some(s), Some(h)) = (&sample, self.history.as_mut()) {
            if let Err(source) = h.append(s.clone()) {
                errors.push(CollectorError::History {
                    service: self.service.clone(),
                    source,
                });
            }
        }
        let observation = sample.as_ref().and_then(|s| {
            let cpu = guest_cores.or(s.cpu_cores)?;
            let mem = profile_mem?;
            Some(Observation {
                ts_unix_ms,
                cpu_cores: cpu,
                mem_bytes: mem,
                disk_bytes_per_s: s.disk_read_bps.unwrap_or(0.0) + s.disk_write_bps.unwrap_or(0.0),
                net_bytes_per_s: s.net_rx_bps.unwrap_or(0.0) + s.net_tx_bps.unwrap_or(0.0),
                config: self.config_hashes(),
                peers: peers.as_deref().map(peer_uses).unwrap_or_default(),
            })
        });
        Tick {
            sample,
            observation,
            guest: status,
            config_read,
            config_changed,
            errors,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::agent::AgentTransportError;
    use crate::monitor::collector::test_support::*;
    use crate::monitor::configtrack;

    #[test]
    fn healthy_guest_yields_sample_and_observation() {
        let fake = healthy_agent();
        let agent = GuestAgent::new(&fake, settings().agent);
        let (mut c, err) = Collector::new("web", "web-dom", settings(), None);
        assert!(err.is_none());
        let first = c.tick(
            host(0, 1 << 30, Some(balloon(196_608, 96_608))),
            &agent,
            T0,
            1_000,
        );
        assert!(first.sample.is_none() && first.observation.is_none());
        // The missing config file is the guest's answer, not a collector failure.
        assert_eq!(first.guest, GuestStatus::Answered, "{:?}", first.errors);
        assert!(first.errors.is_empty(), "{:?}", first.errors);
        fake.always("guest-get-cpustats", Ok(cpustats(1500)));
        let t = c.tick(
            host(2_000_000_000, 1 << 30, Some(balloon(196_608, 96_608))),
            &agent,
            T0 + 1_000,
            2_000,
        );
        assert!(t.errors.is_empty(), "{:?}", t.errors);
        assert_eq!(t.guest, GuestStatus::Answered);
        let s = t.sample.unwrap();
        assert_eq!(s.cpu_cores, Some(2.0), "the history keeps host CPU");
        let o = t.observation.unwrap();
        // Profile CPU: guest busy time, 500 ms over 1 s.
        assert!((o.cpu_cores - 0.5).abs() < 1e-9, "{}", o.cpu_cores);
        // Profile memory: the guest's own view, 100000 KiB in use.
        assert_eq!(o.mem_bytes, 100_000 * 1024);
        let peers: Vec<String> = o.peers.iter().map(|p| p.key()).collect();
        assert_eq!(peers, ["tcp://10.77.0.1:5432", "tcp://10.77.0.9:53"]);
        assert_eq!(
            o.config.keys().collect::<Vec<_>>(),
            ["file:/etc/app.conf", "os"],
            "a missing file is absent"
        );
        assert_eq!(
            o.config["file:/etc/app.conf"],
            format!("{:016x}", configtrack::fnv1a64(b"workers = 4\n"))
        );
        let files = c.config_files();
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].content, b"workers = 4\n");
        assert_eq!(c.dependencies().len(), 2);
    }

    #[test]
    fn history_is_appended() {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeAgent::default();
        fake.always("guest-get-cpustats", Err(AgentTransportError::NotConnected));
        let agent = GuestAgent::new(&fake, settings().agent);
        let (mut c, err) = Collector::new("web", "web-dom", settings(), Some(dir.path()));
        assert!(err.is_none());
        for i in 0..3u64 {
            c.tick(
                host(i * 1_000_000, 1, None),
                &agent,
                T0 + i * 1000,
                1_000 + i * 1000,
            );
        }
        assert_eq!(c.history().unwrap().ring().len(), 2);
        let (_, err) = Collector::new("../bad", "d", settings(), Some(dir.path()));
        assert_eq!(err.unwrap().source_label(), "history");
    }
}
