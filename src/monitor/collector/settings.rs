//! How a collector works: [`CollectorSettings`] (from the configuration), the bounds on what
//! is read from the guest, and the schedules in ticks.

use std::time::Duration;

use crate::config::{ClassConfig, MonitorConfig};
use crate::monitor::agent::{AgentLimits, AgentOptions};
use crate::monitor::history::HistoryCaps;
use crate::monitor::sockets;

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
