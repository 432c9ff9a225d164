//! Monitoring of protected primaries, host side and guest side.
//!
//! Only [`collector`] talks to libvirt; the guest agent is reached through the [`AgentTransport`]
//! trait (`crate::libvirt::LibvirtAgent` implements it over libvirt), host counters are read
//! from files under a configurable root, and everything else is pure logic fed with
//! observations. That keeps every piece testable without a hypervisor.
//!
//! The pieces:
//! - [`cgroup`]: host-side CPU, memory and block I/O counters of a QEMU process, from its cgroup
//!   (v1, v2 or hybrid), located through `/proc/<pid>/cgroup`.
//! - [`agent`]: typed, bounded, validated parsing of qemu-ga replies, and [`GuestAgent`], a client
//!   with `ping`, `osinfo`, `cpustats`, `diskstats`, `interfaces`, `read_file`, `write_file` and
//!   `exec`. One file per part: the reply walk (`reply`), system information and counters
//!   (`system`), `exec`, `file`, and the client (`client`).
//! - [`sockets`]: the guest's `/proc/net/{tcp,tcp6,udp}` (read through the agent) as
//!   connections, listening ports and outbound peers.
//! - [`deps`]: the dependency map: peers aggregated over time from socket snapshots,
//!   bounded with least-recently-seen eviction.
//! - [`configtrack`]: content hashes and previews of guest configuration items, and their diff.
//! - [`sample`]: rates ([`Sample`]) from two consecutive sets of cumulative counters
//!   ([`RawCounters`]), robust to counter resets.
//! - [`history`]: an in-memory ring of samples plus a bounded append-only on-disk log per
//!   service that survives restarts and torn writes.
//! - [`collector`]: the per-primary collector that ties the above together once per sampling
//!   interval: a [`Sample`] for the history and a profile observation per tick, degrading to
//!   host-only data when the guest agent misbehaves. One file per part: `settings`, the host
//!   side (`host`), the agent round (`guest`), the choice of counters (`counters`),
//!   configuration items (`config`), outbound peers (`peers`), tick `jitter` and `cpu_time`.
//! - [`heartbeat`]: the state machine that turns pings, vCPU progress and QEMU monitor
//!   responsiveness into a [`Health`] verdict (healthy, degraded, suspect, hung).

pub mod agent;
pub mod base64;
pub mod cgroup;
pub mod collector;
pub mod configtrack;
pub mod deps;
pub mod heartbeat;
pub mod history;
pub mod memcost;
pub mod sample;
pub mod sockets;

pub use agent::{
    AgentError, AgentLimits, AgentOptions, AgentTransport, AgentTransportError, GuestAgent,
};
pub use base64::Base64Error;
pub use cgroup::{CgroupCounters, CgroupError, CgroupReader, CgroupVersion};
pub use collector::{
    Collector, CollectorError, CollectorSettings, ConfigFileContent, GuestStatus, Tick, TickJitter,
};
pub use configtrack::{
    diff as config_diff, ConfigChange, ConfigItem, ConfigSnapshot, ConfigSource,
};
pub use deps::{DependencyMap, PeerKey, PeerStats};
pub use heartbeat::{Health, HeartbeatConfig, HeartbeatEvent, HeartbeatTracker, MonoMs};
pub use history::{History, HistoryCaps, SampleRing};
pub use sample::{RateCalculator, RawCounters, Sample, SampleSource};
pub use sockets::{Connection, OutboundPeer, Proto, SocketState};
