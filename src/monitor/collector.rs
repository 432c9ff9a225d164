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

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

use super::agent::{
    AgentError, AgentLimits, AgentOptions, AgentTransport, CpuStats, DiskStats, ExitStatus,
    GuestAgent, NetInterface, OsInfo,
};
use super::cgroup::{read_counters, CgroupCounters, CgroupError, CgroupLocation, CgroupReader};
use super::configtrack::{self, ConfigError, ConfigSnapshot, ConfigSource};
use super::deps::{DependencyMap, PeerKey, PeerStats};
use super::history::{History, HistoryCaps, HistoryError};
use super::sample::{
    GuestCpuTotals, NetCounters, RateCalculator, RawCounters, Sample, SampleError,
};
use super::sockets::{self, Connection, OutboundPeer, SocketError, SocketState};
use crate::config::{ClassConfig, MonitorConfig};
use crate::libvirt::{qemu_pid, DomainStats, Hypervisor, LibvirtAgent, LibvirtError, QEMU_RUN_DIR};
use crate::profile::synthetic::SplitMix64;
use crate::profile::{Observation, PeerUse};

/// Largest configuration file kept (and delivered at promotion), bytes.
pub const MAX_CONFIG_FILE_BYTES: usize = 64 * 1024;
/// Largest socket table read from the guest, bytes (about 1700 sockets of `/proc/net/tcp`).
pub const MAX_SOCKET_TABLE_BYTES: usize = 256 * 1024;
/// Most sockets parsed per table.
pub const MAX_SOCKETS_PER_TABLE: usize = 4096;
/// Most peers in the dependency map.
pub const MAX_DEPENDENCY_PEERS: usize = 1024;
/// Most configuration items (files plus commands) tracked per service.
pub const MAX_CONFIG_ITEMS: usize = 32;
/// Longest pause of the agent round after repeated transport failures, in ticks.
pub const MAX_AGENT_BACKOFF_TICKS: u64 = 32;
/// Ticks between two reads of the configuration items (30 s at the default 1 Hz).
pub const CONFIG_EVERY_TICKS: u64 = 30;
/// Ticks between two reads of the socket tables (10 s at the default 1 Hz).
pub const SOCKETS_EVERY_TICKS: u64 = 10;
/// Ticks a collector waits for the guest's memory statistics before it settles for the QEMU
/// cgroup's memory (a guest without a balloon driver never sends them; a booting one takes a
/// while).
pub const GUEST_MEMORY_GRACE_TICKS: u64 = 60;

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

/// How a collector works; derived from the configuration by [`CollectorSettings::new`].
#[derive(Debug, Clone, PartialEq)]
pub struct CollectorSettings {
    /// Guest agent timeouts and reply bounds.
    pub agent: AgentOptions,
    /// Guest socket tables read for the dependency map.
    pub socket_tables: Vec<(String, sockets::Proto)>,
    /// Ticks between two reads of the socket tables.
    pub sockets_every: u64,
    /// Guest files tracked as configuration (absolute paths).
    pub config_files: Vec<String>,
    /// Guest commands whose output is tracked as configuration (argv, no shell).
    pub config_commands: Vec<Vec<String>>,
    /// Ticks between two reads of the configuration items.
    pub config_every: u64,
    /// Largest configuration file or command output kept, bytes.
    pub max_config_bytes: usize,
    /// How long a configuration command may run.
    pub exec_timeout: Duration,
    /// Ticks to wait for the guest's memory statistics (see [`GUEST_MEMORY_GRACE_TICKS`]).
    pub guest_memory_grace: u64,
    /// Bounds of the sample history.
    pub history: HistoryCaps,
}

impl CollectorSettings {
    /// Settings for a primary of `class` under the `[monitor]` section.
    pub fn new(monitor: &MonitorConfig, class: &ClassConfig) -> Self {
        let config_files = class
            .config_files
            .iter()
            .filter_map(|p| match p.to_str() {
                Some(s) => Some(s.to_string()),
                None => {
                    tracing::warn!(path = %p.display(), "config file path is not UTF-8; not tracked");
                    None
                }
            })
            .collect();
        CollectorSettings {
            agent: AgentOptions {
                limits: AgentLimits {
                    max_reply_bytes: monitor.agent_max_reply_bytes,
                    ..AgentLimits::default()
                },
                command_timeout: monitor.agent_timeout(),
                exec_poll_interval: Duration::from_millis(50),
                ..AgentOptions::default()
            },
            socket_tables: vec![
                ("/proc/net/tcp".into(), sockets::Proto::Tcp),
                ("/proc/net/tcp6".into(), sockets::Proto::Tcp),
                ("/proc/net/udp".into(), sockets::Proto::Udp),
            ],
            sockets_every: SOCKETS_EVERY_TICKS,
            config_files,
            config_commands: class.config_commands.clone(),
            config_every: CONFIG_EVERY_TICKS,
            max_config_bytes: MAX_CONFIG_FILE_BYTES,
            exec_timeout: Duration::from_secs(5),
            guest_memory_grace: GUEST_MEMORY_GRACE_TICKS,
            history: HistoryCaps {
                ring_capacity: monitor.history_samples,
                max_disk_bytes: monitor.history_max_bytes,
            },
        }
    }
}

/// Host-side readings of one tick.
#[derive(Debug, Default)]
pub struct HostReading {
    /// The QEMU process's cgroup counters.
    pub cgroup: Option<CgroupCounters>,
    /// libvirt's bulk statistics.
    pub stats: Option<DomainStats>,
    /// Why either is missing.
    pub errors: Vec<CollectorError>,
}

/// What the guest agent contributed to a tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestStatus {
    /// Every command of the round answered.
    Answered,
    /// Some commands answered, others failed (see the tick's errors).
    Partial,
    /// The agent failed at once: host-only data.
    Failed,
    /// Left alone after earlier transport failures: host-only data.
    BackingOff,
}

/// The latest content of one tracked guest file, for delivery to a promoted shadow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigFileContent {
    /// Absolute guest path.
    pub path: String,
    /// The whole file (files larger than the bound are never offered).
    pub content: Vec<u8>,
    /// FNV-1a 64 of `content`.
    pub hash: u64,
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

/// Which counter a rate came from; rates are never computed across two sources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CounterSource {
    Cgroup,
    Libvirt,
    Guest,
}

/// Where the profile's memory figure comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MemSource {
    /// Waiting for the guest's statistics; this many ticks went by without them.
    Undecided { waited: u64 },
    /// The guest's own view (balloon statistics).
    Guest,
    /// The QEMU cgroup's charge.
    Host,
}

/// One tracked configuration item: its last content (bounded) and whether that was cut.
#[derive(Debug, Clone)]
struct TrackedContent {
    content: Vec<u8>,
    truncated: bool,
}

/// Caches the QEMU pid and its cgroup directories between ticks.
#[derive(Debug)]
struct HostSource {
    reader: CgroupReader,
    run_dir: PathBuf,
    pid: Option<i32>,
    location: Option<CgroupLocation>,
}

impl HostSource {
    fn read(&mut self, hv: &Hypervisor, domain: &str) -> HostReading {
        let mut errors = Vec::new();
        let cgroup = self.cgroup(domain, &mut errors);
        let stats = match hv.stats(domain) {
            Ok(s) => Some(s),
            Err(source) => {
                errors.push(CollectorError::Stats {
                    domain: domain.to_string(),
                    source,
                });
                None
            }
        };
        HostReading {
            cgroup,
            stats,
            errors,
        }
    }

    fn cgroup(&mut self, domain: &str, errors: &mut Vec<CollectorError>) -> Option<CgroupCounters> {
        let usable = |c: &CgroupCounters| c.cpu_usage_ns.is_some() || c.mem_bytes.is_some();
        if let Some(loc) = &self.location {
            match read_counters(loc) {
                Ok(c) if usable(&c) => return Some(c),
                // QEMU restarted or gone: look the process up again.
                _ => {
                    self.location = None;
                    self.pid = None;
                }
            }
        }
        let pid = match self.pid {
            Some(p) => p,
            None => match qemu_pid(&self.run_dir, domain) {
                Ok(p) => p,
                Err(source) => {
                    errors.push(CollectorError::Pid {
                        domain: domain.to_string(),
                        source,
                    });
                    return None;
                }
            },
        };
        // `qemu_pid` only returns pids above 1.
        let found = self
            .reader
            .locate(pid.unsigned_abs())
            .and_then(|loc| read_counters(&loc).map(|c| (loc, c)));
        match found {
            Ok((loc, c)) if usable(&c) => {
                self.pid = Some(pid);
                self.location = Some(loc);
                Some(c)
            }
            Ok(_) => {
                errors.push(CollectorError::CgroupEmpty {
                    domain: domain.to_string(),
                    pid,
                });
                None
            }
            Err(source) => {
                errors.push(CollectorError::Cgroup {
                    domain: domain.to_string(),
                    pid,
                    source,
                });
                None
            }
        }
    }
}

/// What one agent round asks besides the CPU times.
#[derive(Debug, Clone, Copy)]
struct GuestRound {
    interfaces: bool,
    disks: bool,
    sockets: bool,
    config: bool,
}

/// The guest agent's answers of one round.
#[derive(Debug, Default)]
struct GuestReading {
    cpustats: Option<Vec<CpuStats>>,
    interfaces: Option<Vec<NetInterface>>,
    disks: Option<Vec<DiskStats>>,
    /// Sockets of every table that could be read (`None` when none could).
    connections: Option<Vec<Connection>>,
    /// New content per configuration item, when this was a configuration round. Items whose
    /// read failed transiently are absent (their previous content stays); items the guest
    /// reported missing map to `None`.
    config: Option<BTreeMap<ConfigSource, Option<TrackedContent>>>,
    answered: usize,
    failed: usize,
    transport_failed: bool,
}

/// One agent round: stops at the first transport failure (timeout, not connected, oversized),
/// records every failure, and remembers commands the agent does not know.
struct Round<'a, T: AgentTransport> {
    agent: &'a GuestAgent<T>,
    domain: &'a str,
    unsupported: &'a mut BTreeSet<String>,
    errors: &'a mut Vec<CollectorError>,
    reading: GuestReading,
}

impl<T: AgentTransport> Round<'_, T> {
    fn call<R>(
        &mut self,
        what: &str,
        f: impl FnOnce(&GuestAgent<T>) -> Result<R, AgentError>,
    ) -> Result<R, Option<AgentError>> {
        if self.reading.transport_failed || self.unsupported.contains(what) {
            return Err(None);
        }
        match f(self.agent) {
            Ok(r) => {
                self.reading.answered += 1;
                Ok(r)
            }
            Err(e) => {
                match &e {
                    AgentError::Transport { .. } => {
                        self.reading.failed += 1;
                        self.reading.transport_failed = true;
                    }
                    // An error reply still proves a working agent.
                    AgentError::Guest { class, .. } => {
                        self.reading.answered += 1;
                        if class == "CommandNotFound" {
                            tracing::info!(
                                domain = self.domain,
                                what,
                                "guest agent lacks this command; not asked again"
                            );
                            self.unsupported.insert(what.to_string());
                        }
                    }
                    _ => self.reading.failed += 1,
                }
                Err(Some(e))
            }
        }
    }

    /// Like [`Round::call`], recording the failure as an error.
    fn ask<R>(
        &mut self,
        what: &str,
        f: impl FnOnce(&GuestAgent<T>) -> Result<R, AgentError>,
    ) -> Option<R> {
        match self.call(what, f) {
            Ok(r) => Some(r),
            Err(e) => {
                if let Some(source) = e {
                    self.errors.push(CollectorError::Agent {
                        domain: self.domain.to_string(),
                        what: what.to_string(),
                        source,
                    });
                }
                None
            }
        }
    }
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
            host: HostSource {
                reader: CgroupReader::host(),
                run_dir: PathBuf::from(QEMU_RUN_DIR),
                pid: None,
                location: None,
            },
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

    /// The latest complete content of every tracked guest file (cut files are left out: they
    /// cannot be delivered whole).
    pub fn config_files(&self) -> Vec<ConfigFileContent> {
        self.contents
            .iter()
            .filter(|(_, c)| !c.truncated)
            .filter_map(|(source, c)| match source {
                ConfigSource::File(path) => Some(ConfigFileContent {
                    path: path.clone(),
                    hash: configtrack::fnv1a64(&c.content),
                    content: c.content.clone(),
                }),
                ConfigSource::Command(_) | ConfigSource::GuestOs => None,
            })
            .collect()
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

    fn read_guest<T: AgentTransport>(
        &mut self,
        agent: &GuestAgent<T>,
        what: GuestRound,
        errors: &mut Vec<CollectorError>,
    ) -> GuestReading {
        let mut round = Round {
            agent,
            domain: &self.domain,
            unsupported: &mut self.unsupported,
            errors,
            reading: GuestReading::default(),
        };
        round.reading.cpustats = round.ask("cpustats", |a| a.cpustats());
        if what.interfaces {
            round.reading.interfaces = round.ask("interfaces", |a| a.interfaces());
        }
        if what.disks {
            round.reading.disks = round.ask("diskstats", |a| a.diskstats());
        }
        let mut connections: Option<Vec<Connection>> = None;
        let tables: &[(String, sockets::Proto)] = if what.sockets {
            &self.settings.socket_tables
        } else {
            &[]
        };
        for (path, proto) in tables {
            let what = format!("socket table {path}");
            let Some(file) = round.ask(&what, |a| a.read_file(path, MAX_SOCKET_TABLE_BYTES)) else {
                continue;
            };
            let text = String::from_utf8_lossy(&file.data);
            match sockets::parse_proc_net(&text, *proto, MAX_SOCKETS_PER_TABLE) {
                Ok(t) => connections
                    .get_or_insert_with(Vec::new)
                    .extend(t.connections),
                Err(source) => round.errors.push(CollectorError::SocketTable {
                    domain: self.domain.clone(),
                    path: path.clone(),
                    source,
                }),
            }
        }
        round.reading.connections = connections;
        if what.config {
            let mut items = BTreeMap::new();
            let max = self.settings.max_config_bytes;
            for path in &self.settings.config_files {
                let source = ConfigSource::File(path.clone());
                match round.call(&format!("config file {path}"), |a| a.read_file(path, max)) {
                    Ok(f) => {
                        items.insert(
                            source,
                            Some(TrackedContent {
                                content: f.data,
                                truncated: f.truncated,
                            }),
                        );
                    }
                    // The guest itself says no (missing, unreadable): the item is absent.
                    Err(Some(AgentError::Guest { .. })) => {
                        items.insert(source, None);
                    }
                    Err(Some(e)) => round.errors.push(CollectorError::Agent {
                        domain: self.domain.clone(),
                        what: format!("config file {path}"),
                        source: e,
                    }),
                    Err(None) => {}
                }
            }
            for argv in &self.settings.config_commands {
                let what = format!("config command {argv:?}");
                let timeout = self.settings.exec_timeout;
                if let Some(out) = round.ask(&what, |a| a.exec(argv, max, timeout)) {
                    let mut content = out.stdout.data;
                    // A failing command is a different state than its (empty) output says.
                    if out.status != ExitStatus::Code(0) {
                        content.extend_from_slice(format!("\n[{:?}]", out.status).as_bytes());
                    }
                    items.insert(
                        ConfigSource::Command(argv.clone()),
                        Some(TrackedContent {
                            content,
                            truncated: out.stdout.truncated,
                        }),
                    );
                }
            }
            if let Some(os) = round.ask("osinfo", |a| a.osinfo()) {
                items.insert(
                    ConfigSource::GuestOs,
                    Some(TrackedContent {
                        content: os_description(&os).into_bytes(),
                        truncated: false,
                    }),
                );
            }
            // Items a failed read missed keep their previous content; a round that read nothing
            // because the agent failed is retried at the next tick.
            if !round.reading.transport_failed || !items.is_empty() {
                round.reading.config = Some(items);
            }
        }
        round.reading
    }

    fn raw_counters(
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
    fn profile_memory(
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
    fn guest_cores(&mut self, cur: Option<GuestCpuTotals>, mono_ms: u64) -> Option<f64> {
        let prev = std::mem::replace(&mut self.prev_guest_cpu, cur.map(|c| (mono_ms, c)));
        let ((prev_ms, p), c) = prev.zip(cur)?;
        if mono_ms <= prev_ms || c.busy_ms < p.busy_ms || c.cpus != p.cpus || c.cpus == 0 {
            return None;
        }
        let cores = (c.busy_ms - p.busy_ms) as f64 / (mono_ms - prev_ms) as f64;
        // Tick boundaries of the guest and ours do not line up exactly.
        Some(cores.min(f64::from(c.cpus)))
    }

    /// Applies a configuration round; returns whether anything changed.
    fn update_config(
        &mut self,
        items: BTreeMap<ConfigSource, Option<TrackedContent>>,
        errors: &mut Vec<CollectorError>,
    ) -> bool {
        let mut contents = std::mem::take(&mut self.contents);
        for (source, content) in items {
            match content {
                Some(c) => {
                    contents.insert(source, c);
                }
                None => {
                    contents.remove(&source);
                }
            }
        }
        let mut snapshot = ConfigSnapshot::new(MAX_CONFIG_ITEMS);
        let mut kept = BTreeMap::new();
        for (source, c) in contents {
            match snapshot.record(source.clone(), &c.content, 0) {
                Ok(()) => {
                    kept.insert(source, c);
                }
                Err(source) => errors.push(CollectorError::Config {
                    domain: self.domain.clone(),
                    source,
                }),
            }
        }
        self.contents = kept;
        let changed = match &self.config {
            Some(old) => {
                let change = configtrack::diff(old, &snapshot);
                if !change.is_empty() {
                    let names = |items: &[configtrack::ConfigItem]| {
                        items
                            .iter()
                            .map(|i| i.source.to_string())
                            .collect::<Vec<_>>()
                    };
                    tracing::info!(
                        service = %self.service,
                        domain = %self.domain,
                        added = ?names(&change.added),
                        removed = ?names(&change.removed),
                        changed = ?change.changed.iter().map(|c| c.new.source.to_string()).collect::<Vec<_>>(),
                        "guest configuration changed"
                    );
                }
                !change.is_empty()
            }
            None => false,
        };
        self.config = Some(snapshot);
        changed
    }

    /// Item name -> content hash, as the profile records configuration.
    fn config_hashes(&self) -> BTreeMap<String, String> {
        self.config
            .iter()
            .flat_map(|s| s.items())
            .map(|i| (config_item_name(&i.source), format!("{:016x}", i.hash)))
            .collect()
    }
}

/// The `guest-get-osinfo` fields that identify a system, one `key=value` line each (absent
/// fields left out), as the configuration item's content.
fn os_description(os: &OsInfo) -> String {
    [
        ("id", &os.id),
        ("version-id", &os.version_id),
        ("variant-id", &os.variant_id),
        ("kernel-release", &os.kernel_release),
        ("kernel-version", &os.kernel_version),
        ("machine", &os.machine),
    ]
    .iter()
    .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v}\n")))
    .collect()
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

/// Delays between collector ticks: the sampling interval ±20%, pseudo-random, averaging the
/// interval. Sampling at a fixed phase aliases with periodic guest activity: a connection opened
/// every second for 700 ms is seen at every tick or at none, depending on the phase. With jitter
/// the phase drifts by about a tenth of the interval per tick.
#[derive(Debug, Clone)]
pub struct TickJitter {
    rng: SplitMix64,
}

impl TickJitter {
    /// Jitter seeded from `service` and `seed` (e.g. the start time), so collectors started
    /// together do not tick together.
    pub fn new(service: &str, seed: u64) -> Self {
        TickJitter {
            rng: SplitMix64::new(configtrack::fnv1a64(service.as_bytes()) ^ seed.rotate_left(17)),
        }
    }

    /// The delay before the next tick.
    pub fn next_delay(&mut self, interval: Duration) -> Duration {
        // Uniform in [0.8, 1.2).
        interval.mul_f64(0.8 + 0.4 * self.rng.next_f64())
    }
}

/// CPU time the calling thread has used, in nanoseconds (`/proc/thread-self/schedstat`, first
/// field): what a collector's tick costs, measured where it runs. `None` where the kernel does
/// not provide it.
pub fn thread_cpu_ns() -> Option<u64> {
    parse_schedstat(&std::fs::read_to_string("/proc/thread-self/schedstat").ok()?)
}

/// The on-CPU time of a `schedstat` line (`<run ns> <wait ns> <timeslices>`).
fn parse_schedstat(text: &str) -> Option<u64> {
    text.split_whitespace().next()?.parse().ok()
}

/// The profile's name of a configuration item: `file:<path>` or `cmd:<argv joined by spaces>`.
pub fn config_item_name(source: &ConfigSource) -> String {
    match source {
        ConfigSource::File(p) => format!("file:{p}"),
        ConfigSource::Command(argv) => format!("cmd:{}", argv.join(" ")),
        ConfigSource::GuestOs => "os".to_string(),
    }
}

/// The guest's memory in use (MemTotal − MemAvailable) from the balloon statistics, bytes.
pub fn guest_used_bytes(stats: &DomainStats) -> Option<u64> {
    let total = stats.balloon_available_kib?;
    let available = stats.balloon_usable_kib?;
    (total > 0 && available <= total).then(|| (total - available).saturating_mul(1024))
}

/// Peers the guest connected to: outbound sockets (local port not a listening one), including
/// ones closing or just closed, so short requests between two ticks are still seen; loopback
/// peers are left out (they move with the guest).
pub fn dependency_peers(conns: &[Connection]) -> Vec<OutboundPeer> {
    let listening = sockets::listening_ports(conns);
    conns
        .iter()
        .filter(|c| {
            matches!(
                c.state,
                SocketState::Established
                    | SocketState::SynSent
                    | SocketState::FinWait1
                    | SocketState::FinWait2
                    | SocketState::TimeWait
                    | SocketState::CloseWait
                    | SocketState::LastAck
                    | SocketState::Closing
            )
        })
        .filter(|c| c.remote.port() != 0 && !c.remote.ip().is_unspecified())
        .filter(|c| !listening.contains(&(c.proto, c.local.port())))
        .map(|c| OutboundPeer {
            proto: c.proto,
            remote: std::net::SocketAddr::new(c.remote.ip().to_canonical(), c.remote.port()),
            local: std::net::SocketAddr::new(c.local.ip().to_canonical(), c.local.port()),
            state: c.state,
        })
        .filter(|p| !p.is_loopback())
        .collect()
}

/// One [`PeerUse`] per distinct endpoint (socket tables carry no byte counts).
fn peer_uses(peers: &[OutboundPeer]) -> Vec<PeerUse> {
    let endpoints: BTreeSet<(sockets::Proto, std::net::SocketAddr)> =
        peers.iter().map(|p| (p.proto, p.remote)).collect();
    endpoints
        .into_iter()
        .map(|(proto, remote)| PeerUse {
            addr: remote.ip().to_string(),
            port: remote.port(),
            proto: match proto {
                sockets::Proto::Tcp => crate::profile::Proto::Tcp,
                sockets::Proto::Udp => crate::profile::Proto::Udp,
            },
            bytes: 0,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::agent::AgentTransportError;
    use crate::monitor::cgroup::CgroupVersion;
    use serde_json::{json, Value};
    use std::collections::{HashMap, VecDeque};
    use std::sync::Mutex;

    /// A fake agent: replies by command (and by path for file reads), records what was sent.
    #[derive(Default)]
    struct FakeAgent {
        /// Reply per `execute`; a file read is looked up as `guest-file-read <path>`.
        replies: Mutex<HashMap<String, VecDeque<Result<String, AgentTransportError>>>>,
        sticky: Mutex<HashMap<String, Result<String, AgentTransportError>>>,
        /// Handle -> path of open files.
        open: Mutex<HashMap<i64, String>>,
        sent: Mutex<Vec<String>>,
    }

    impl FakeAgent {
        fn always(&self, key: &str, reply: Result<String, AgentTransportError>) {
            self.sticky.lock().unwrap().insert(key.to_string(), reply);
        }
        fn file(&self, path: &str, data: &[u8]) {
            self.always(
                &format!("guest-file-read {path}"),
                Ok(json!({"return": {"count": data.len(), "buf-b64": crate::monitor::base64::encode(data), "eof": true}}).to_string()),
            );
        }
        fn sent(&self) -> Vec<String> {
            self.sent.lock().unwrap().clone()
        }
        fn clear_sent(&self) {
            self.sent.lock().unwrap().clear();
        }
    }

    impl AgentTransport for FakeAgent {
        fn command(&self, json: &str, _t: Duration) -> Result<String, AgentTransportError> {
            let v: Value = serde_json::from_str(json).unwrap();
            let exec = v["execute"].as_str().unwrap().to_string();
            let key = match exec.as_str() {
                "guest-file-open" => {
                    let path = v["arguments"]["path"].as_str().unwrap().to_string();
                    let key = format!("guest-file-open {path}");
                    self.sent.lock().unwrap().push(key.clone());
                    if let Some(r) = self.sticky.lock().unwrap().get(&key) {
                        return r.clone();
                    }
                    let mut open = self.open.lock().unwrap();
                    let h = open.len() as i64 + 1;
                    open.insert(h, path);
                    return Ok(json!({ "return": h }).to_string());
                }
                "guest-file-read" => {
                    let h = v["arguments"]["handle"].as_i64().unwrap();
                    format!("guest-file-read {}", self.open.lock().unwrap()[&h])
                }
                "guest-file-close" => {
                    self.sent.lock().unwrap().push(exec);
                    return Ok(r#"{"return":{}}"#.into());
                }
                _ => exec,
            };
            self.sent.lock().unwrap().push(key.clone());
            if let Some(r) = self
                .replies
                .lock()
                .unwrap()
                .get_mut(&key)
                .and_then(|q| q.pop_front())
            {
                return r;
            }
            self.sticky
                .lock()
                .unwrap()
                .get(&key)
                .cloned()
                .unwrap_or_else(|| Err(AgentTransportError::Other(format!("no reply for {key}"))))
        }
    }

    fn osinfo(kernel: &str) -> String {
        json!({"return": {"id": "debian", "name": "Debian GNU/Linux", "version-id": "12",
            "kernel-release": kernel, "kernel-version": "#1 SMP", "machine": "x86_64"}})
        .to_string()
    }

    fn diskstats(vda_read_sectors: u64) -> String {
        let disk = |name: &str, minor: u32, rd: u64, wr: u64| {
            json!({"name": name, "major": 253, "minor": minor,
                "stats": {"read-sectors": rd, "write-sectors": wr}})
        };
        json!({"return": [
            disk("vda", 0, vda_read_sectors, 8),
            disk("vda1", 1, vda_read_sectors, 8),
            disk("dm-0", 2, 100, 100),
            disk("loop0", 3, 100, 100),
            disk("vdb", 16, 2, 0),
        ]})
        .to_string()
    }

    #[test]
    fn guest_os_is_a_configuration_item() {
        let fake = healthy_agent();
        let mut s = settings();
        s.config_every = 1;
        let agent = GuestAgent::new(&fake, s.agent.clone());
        let (mut c, _) = Collector::new("web", "web-dom", s, None);
        c.tick(host(0, 1, None), &agent, T0, 1_000);
        let t = c.tick(host(1, 1, None), &agent, T0 + 1_000, 2_000);
        assert!(!t.config_changed);
        let expected = "id=debian\nversion-id=12\nkernel-release=6.1.0-28-amd64\nkernel-version=#1 SMP\nmachine=x86_64\n";
        assert_eq!(
            t.observation.unwrap().config["os"],
            format!("{:016x}", configtrack::fnv1a64(expected.as_bytes()))
        );
        // The OS is configuration to compare, not a file to deliver at promotion.
        assert!(c.config_files().iter().all(|f| f.path.starts_with('/')));
        fake.always("guest-get-osinfo", Ok(osinfo("6.1.0-29-amd64")));
        let t = c.tick(host(2, 1, None), &agent, T0 + 2_000, 3_000);
        assert!(
            t.config_changed,
            "a kernel upgrade is a configuration change"
        );
    }

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

    fn cpustats(busy_ms: u64) -> String {
        json!({"return": [
            {"type": "linux", "cpu": 0, "user": busy_ms, "nice": 0, "system": 0, "idle": 100000},
            {"type": "linux", "cpu": 1, "user": 0, "nice": 0, "system": 0, "idle": 100000},
        ]})
        .to_string()
    }

    const IFACES: &str = r#"{"return":[{"name":"lo","ip-addresses":[{"ip-address-type":"ipv4","ip-address":"127.0.0.1","prefix":8}],"statistics":{"rx-bytes":1,"rx-packets":1,"rx-errs":0,"rx-dropped":0,"tx-bytes":1,"tx-packets":1,"tx-errs":0,"tx-dropped":0}},{"name":"eth0","hardware-address":"52:54:00:12:34:56","ip-addresses":[{"ip-address-type":"ipv4","ip-address":"10.77.0.40","prefix":24}],"statistics":{"rx-bytes":1000,"rx-packets":10,"rx-errs":0,"rx-dropped":0,"tx-bytes":2000,"tx-packets":20,"tx-errs":0,"tx-dropped":0}}]}"#;

    /// `/proc/net/tcp`: a listener on :80, an inbound connection to it, an outbound connection
    /// to 10.77.0.1:5432 (established), one to 10.77.0.9:53 closing, and a loopback one.
    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n\
   1: 28004D0A:0050 01004D0A:C350 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0\n\
   2: 28004D0A:A000 01004D0A:1538 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 100 0 0 10 0\n\
   3: 28004D0A:A001 09004D0A:0035 06 00000000:00000000 00:00000000 00000000     0        0 0 1 0 100 0 0 10 0\n\
   4: 0100007F:A002 0100007F:0CEA 01 00000000:00000000 00:00000000 00000000     0        0 4 1 0 100 0 0 10 0\n";

    fn healthy_agent() -> FakeAgent {
        let a = FakeAgent::default();
        a.always("guest-get-cpustats", Ok(cpustats(1000)));
        a.always("guest-network-get-interfaces", Ok(IFACES.into()));
        a.always("guest-get-osinfo", Ok(osinfo("6.1.0-28-amd64")));
        a.file("/proc/net/tcp", TCP.as_bytes());
        a.file("/proc/net/tcp6", b"  sl  local_address\n");
        a.file("/proc/net/udp", b"  sl  local_address\n");
        a.file("/etc/app.conf", b"workers = 4\n");
        a.always(
            "guest-file-open /etc/missing.conf",
            Ok(r#"{"error":{"class":"GenericError","desc":"No such file"}}"#.into()),
        );
        a
    }

    fn settings() -> CollectorSettings {
        let class = ClassConfig {
            config_files: vec!["/etc/app.conf".into(), "/etc/missing.conf".into()],
            ..ClassConfig::default()
        };
        let mut s = CollectorSettings::new(&MonitorConfig::default(), &class);
        s.agent.exec_poll_interval = Duration::from_millis(1);
        // Host memory at once for tests without balloon statistics; sockets every tick.
        s.guest_memory_grace = 0;
        s.sockets_every = 1;
        s
    }

    fn host(cpu_ns: u64, mem: u64, stats: Option<DomainStats>) -> HostReading {
        HostReading {
            cgroup: Some(CgroupCounters {
                cpu_usage_ns: Some(cpu_ns),
                mem_bytes: Some(mem),
                mem_rss_bytes: None,
                mem_cache_bytes: None,
                io_read_bytes: Some(0),
                io_write_bytes: Some(0),
                version: CgroupVersion::V2,
                missing: Vec::new(),
            }),
            stats,
            errors: Vec::new(),
        }
    }

    fn balloon(total_kib: u64, avail_kib: u64) -> DomainStats {
        DomainStats {
            balloon_available_kib: Some(total_kib),
            balloon_usable_kib: Some(avail_kib),
            net_rx_bytes: Some(0),
            net_tx_bytes: Some(0),
            ..DomainStats::default()
        }
    }

    const T0: u64 = 1_700_000_000_000;

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
    fn config_is_reread_on_schedule_and_changes_are_noticed() {
        let fake = healthy_agent();
        let mut s = settings();
        s.config_every = 3;
        let agent = GuestAgent::new(&fake, s.agent.clone());
        let (mut c, _) = Collector::new("web", "web-dom", s, None);
        c.tick(host(0, 1, None), &agent, T0, 1_000);
        fake.clear_sent();
        c.tick(host(1, 1, None), &agent, T0 + 1_000, 2_000);
        assert!(
            !fake.sent().iter().any(|c| c.contains("app.conf")),
            "config read outside its round"
        );
        fake.file("/etc/app.conf", b"workers = 8\n");
        let t = c.tick(host(2, 1, None), &agent, T0 + 2_000, 3_000);
        assert!(t.config_changed);
        assert_eq!(c.config_files()[0].content, b"workers = 8\n");
        assert_eq!(
            t.observation.unwrap().config["file:/etc/app.conf"],
            format!("{:016x}", configtrack::fnv1a64(b"workers = 8\n"))
        );
    }

    #[test]
    fn sockets_are_read_on_their_own_schedule_and_interfaces_only_without_host_counters() {
        let fake = healthy_agent();
        let mut s = settings();
        s.sockets_every = 3;
        let agent = GuestAgent::new(&fake, s.agent.clone());
        let (mut c, _) = Collector::new("web", "web-dom", s, None);
        let stats = || {
            Some(DomainStats {
                net_rx_bytes: Some(0),
                net_tx_bytes: Some(0),
                ..balloon(196_608, 96_608)
            })
        };
        let mut socket_ticks = Vec::new();
        for i in 1..=7u64 {
            fake.clear_sent();
            let t = c.tick(host(i, 1, stats()), &agent, T0 + i * 1000, i * 1000);
            let sent = fake.sent();
            if sent.iter().any(|c| c.contains("/proc/net/tcp")) {
                socket_ticks.push(i);
                if i > 1 {
                    assert!(!t.observation.unwrap().peers.is_empty());
                }
            } else if let Some(o) = t.observation {
                assert!(o.peers.is_empty(), "peers without a socket round");
            }
            assert!(
                !sent.contains(&"guest-network-get-interfaces".to_string()),
                "libvirt has the tap counters; the guest's are not needed"
            );
        }
        assert_eq!(socket_ticks, [1, 4, 7]);
        // Without host counters the guest's interfaces are asked.
        fake.clear_sent();
        c.tick(host(8, 1, None), &agent, T0 + 8000, 8000);
        assert!(fake
            .sent()
            .contains(&"guest-network-get-interfaces".to_string()));
    }

    #[test]
    fn hung_agent_degrades_to_host_only_and_backs_off() {
        let fake = FakeAgent::default();
        fake.always(
            "guest-get-cpustats",
            Err(AgentTransportError::Timeout(Duration::from_secs(1))),
        );
        let agent = GuestAgent::new(&fake, settings().agent);
        let (mut c, _) = Collector::new("web", "web-dom", settings(), None);
        let t = c.tick(host(0, 1 << 30, None), &agent, T0, 1_000);
        assert_eq!(t.guest, GuestStatus::Failed);
        // One timeout ends the round: nothing else was asked.
        assert_eq!(fake.sent(), ["guest-get-cpustats"]);
        assert_eq!(t.errors.len(), 1);
        assert_eq!(t.errors[0].source_label(), "agent");
        fake.clear_sent();
        let t = c.tick(
            host(1_000_000_000, 1 << 30, None),
            &agent,
            T0 + 1_000,
            2_000,
        );
        assert_eq!(t.guest, GuestStatus::BackingOff);
        assert!(fake.sent().is_empty(), "agent asked while backing off");
        // Host-only data still makes a sample and an observation.
        let o = t.observation.unwrap();
        assert!((o.cpu_cores - 1.0).abs() < 1e-9);
        assert_eq!(o.mem_bytes, 1 << 30, "cgroup memory without balloon stats");
        assert!(o.peers.is_empty() && o.config.is_empty());
        // The pause doubles with every failed round, up to the cap.
        let mut asked_at = Vec::new();
        for i in 2..80u64 {
            fake.clear_sent();
            c.tick(host(i, 1, None), &agent, T0 + i * 1000, 1_000 + i * 1000);
            if !fake.sent().is_empty() {
                asked_at.push(i + 1);
            }
        }
        let gaps: Vec<u64> = asked_at.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(gaps[..4], [4, 8, 16, 32]);
        assert!(gaps.iter().all(|g| *g <= MAX_AGENT_BACKOFF_TICKS));
    }

    #[test]
    fn garbage_and_oversized_replies_lose_only_their_part() {
        let fake = healthy_agent();
        fake.always("guest-get-cpustats", Ok("{not json".into()));
        fake.always(
            "guest-network-get-interfaces",
            Ok(format!(
                r#"{{"return":[{}]}}"#,
                vec![r#"{"name":"x"}"#; 300].join(",")
            )),
        );
        fake.file("/proc/net/tcp", b"garbage line\n");
        let agent = GuestAgent::new(&fake, settings().agent);
        let (mut c, _) = Collector::new("web", "web-dom", settings(), None);
        c.tick(host(0, 1 << 20, None), &agent, T0, 1_000);
        let t = c.tick(host(500_000_000, 1 << 20, None), &agent, T0 + 1_000, 2_000);
        let labels: Vec<&str> = t.errors.iter().map(|e| e.source_label()).collect();
        assert!(
            labels.contains(&"agent") && labels.contains(&"sockets"),
            "{labels:?}"
        );
        assert_eq!(t.guest, GuestStatus::Partial);
        // Host CPU stands in for the guest's.
        assert!((t.observation.unwrap().cpu_cores - 0.5).abs() < 1e-9);
        // An oversized transport reply is a transport failure: host-only, back off.
        let fake = FakeAgent::default();
        fake.always(
            "guest-get-cpustats",
            Err(AgentTransportError::Other(
                "reply of 20000000 bytes, more than 1048576".into(),
            )),
        );
        let agent = GuestAgent::new(&fake, settings().agent);
        let (mut c, _) = Collector::new("web", "web-dom", settings(), None);
        let t = c.tick(host(0, 1, None), &agent, T0, 1_000);
        assert_eq!(t.guest, GuestStatus::Failed);
        let t = c.tick(host(1, 1, None), &agent, T0 + 1_000, 2_000);
        assert_eq!(t.guest, GuestStatus::BackingOff);
    }

    #[test]
    fn unknown_commands_are_not_asked_again() {
        let fake = healthy_agent();
        fake.always(
            "guest-get-cpustats",
            Ok(r#"{"error":{"class":"CommandNotFound","desc":"no"}}"#.into()),
        );
        let agent = GuestAgent::new(&fake, settings().agent);
        let (mut c, _) = Collector::new("web", "web-dom", settings(), None);
        c.tick(host(0, 1, None), &agent, T0, 1_000);
        fake.clear_sent();
        let t = c.tick(host(1, 1, None), &agent, T0 + 1_000, 2_000);
        assert!(!fake.sent().contains(&"guest-get-cpustats".to_string()));
        assert!(fake
            .sent()
            .contains(&"guest-network-get-interfaces".to_string()));
        assert_eq!(t.guest, GuestStatus::Answered);
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
    fn tick_delays_are_jittered_around_the_interval() {
        let interval = Duration::from_secs(1);
        let mut j = TickJitter::new("web", 1_700_000_000_000);
        let delays: Vec<Duration> = (0..1000).map(|_| j.next_delay(interval)).collect();
        assert!(delays
            .iter()
            .all(|d| *d >= Duration::from_millis(800) && *d < Duration::from_millis(1200)));
        let mean = delays.iter().sum::<Duration>().as_secs_f64() / 1000.0;
        assert!((mean - 1.0).abs() < 0.02, "mean delay {mean}");
        // Spread over the whole range, not stuck.
        assert!(delays.iter().any(|d| *d < Duration::from_millis(850)));
        assert!(delays.iter().any(|d| *d > Duration::from_millis(1150)));
        // Different services, different sequences; zero seeds still work.
        let mut other = TickJitter::new("db", 1_700_000_000_000);
        let mut same = TickJitter::new("web", 1_700_000_000_000);
        assert_ne!(other.next_delay(interval), same.next_delay(interval));
        let mut empty = TickJitter::new("", 0);
        let firsts: Vec<Duration> = (0..3).map(|_| empty.next_delay(interval)).collect();
        assert!(
            firsts[0] != firsts[1] || firsts[1] != firsts[2],
            "{firsts:?}"
        );
    }

    #[test]
    fn thread_cpu_time_is_read_from_schedstat() {
        assert_eq!(parse_schedstat("1234567 890 12\n"), Some(1_234_567));
        assert_eq!(parse_schedstat("garbage"), None);
        assert_eq!(parse_schedstat(""), None);
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("schedstat");
        std::fs::write(&f, "42 7 1\n").unwrap();
        assert_eq!(
            parse_schedstat(&std::fs::read_to_string(&f).unwrap()),
            Some(42)
        );
        // This thread's own counter only grows.
        if let Some(a) = thread_cpu_ns() {
            let b = thread_cpu_ns().unwrap();
            assert!(b >= a);
        }
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
