//! TOML configuration: typed, with built-in defaults, and validated as a whole.
//!
//! Every problem found in a file is reported with the file, the 1-based line and the dotted key
//! path (`configs/x.toml:12: class.web.shadows: 12 is out of range 0..=8`), and all problems that
//! can be found in one pass are reported together rather than one per run:
//!
//! 1. Syntax errors (including duplicate keys and tables) stop parsing at the first one.
//! 2. Each section (`[daemon]`, `[monitor]`, `[profile]`, every `[[protect]]` rule and every
//!    `[class.X]`) is then deserialized on its own, so an unknown key or a wrong type is reported
//!    once per section (serde stops at the first one inside a section; a class's `probe` table
//!    is part of its class).
//! 3. Ranges and cross-field rules are checked on everything that deserialized; each violation
//!    is its own problem.
//!
//! Relative paths in the file (`state_dir`, `control_socket`, `profile.repository`,
//! `golden_image`) are kept as written and so are relative to the daemon's current working
//! directory, not to the configuration file.

mod document;
mod replay;
mod validate;

pub use replay::{CaptureConfig, CaptureProtocol, ReplayConfig};

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use toml::de::{DeValue, ValueDeserializer};
use toml::Spanned;

use document::{Document, KeyPath};

/// Largest configuration file accepted; real ones are a few KiB.
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// Name of the class that always exists, with built-in defaults unless `[class.default]`
/// overrides them.
pub const DEFAULT_CLASS: &str = "default";

/// The whole daemon configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// `[daemon]`: process-wide settings.
    pub daemon: DaemonConfig,
    /// `[monitor]`: resource sampling.
    pub monitor: MonitorConfig,
    /// `[profile]`: predictive deployment profiles.
    pub profile: ProfileConfig,
    /// `[[protect]]`: which domains are protected, in file order; the first match wins.
    pub protect: Vec<ProtectRule>,
    /// `[class.X]`: protection classes by name; always holds [`DEFAULT_CLASS`].
    pub class: BTreeMap<String, ClassConfig>,
    /// `[cluster]`: several hosts through etcd; `None` runs this host alone.
    pub cluster: Option<ClusterConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            daemon: DaemonConfig::default(),
            monitor: MonitorConfig::default(),
            profile: ProfileConfig::default(),
            protect: Vec::new(),
            class: BTreeMap::from([(DEFAULT_CLASS.to_owned(), ClassConfig::default())]),
            cluster: None,
        }
    }
}

/// Hardware acceleration for shadow domains.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when `/dev/kvm` is usable, otherwise TCG.
    #[default]
    Auto,
    /// Always KVM; defining a domain fails on a host without it, which is what asking for KVM
    /// explicitly should do.
    Kvm,
    /// Always TCG (software emulation), e.g. in a nested lab.
    Tcg,
}

impl Accel {
    /// The libvirt `<domain type=...>` to use.
    pub fn domain_type(&self, kvm_usable: bool) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "qemu",
            Accel::Auto if kvm_usable => "kvm",
            Accel::Auto => "qemu",
        }
    }
}

/// Format of the daemon's log lines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[daemon]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DaemonConfig {
    /// libvirt connection URI.
    pub libvirt_uri: String,
    /// Acceleration of shadow domains.
    pub accel: Accel,
    /// Directory for persistent daemon state.
    pub state_dir: PathBuf,
    /// Unix socket of the control API.
    pub control_socket: PathBuf,
    /// Address of the Prometheus endpoint.
    pub metrics_listen: SocketAddr,
    /// Allows `metrics_listen` on a non-loopback address.
    pub metrics_allow_remote: bool,
    /// Log line format.
    pub log_format: LogFormat,
    /// `tracing` filter directives, e.g. `info` or `understudy=debug,warn`.
    pub log_level: String,
    /// libvirt keepalive interval in seconds (1..=60).
    pub keepalive_interval_s: u32,
    /// Unanswered keepalives before libvirt closes the connection (1..=20).
    pub keepalive_count: u32,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            libvirt_uri: "qemu:///system".to_owned(),
            accel: Accel::Auto,
            state_dir: PathBuf::from("/var/lib/understudy"),
            control_socket: PathBuf::from("/run/understudy/understudy.sock"),
            metrics_listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9464),
            metrics_allow_remote: false,
            log_format: LogFormat::Text,
            log_level: "info".to_owned(),
            keepalive_interval_s: 5,
            keepalive_count: 3,
        }
    }
}

/// `[monitor]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MonitorConfig {
    /// Sampling period in milliseconds (100..=60000).
    pub sample_interval_ms: u64,
    /// Guest agent command timeout in milliseconds (50..=30000, at most `sample_interval_ms`).
    pub agent_timeout_ms: u64,
    /// Largest guest agent reply accepted, in bytes (1 KiB..=16 MiB).
    pub agent_max_reply_bytes: usize,
    /// In-memory sample ring size per service (10..=1000000).
    pub history_samples: usize,
    /// On-disk history cap per service, in bytes (at least 64 KiB).
    pub history_max_bytes: u64,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        Self {
            sample_interval_ms: 1000,
            agent_timeout_ms: 1000,
            agent_max_reply_bytes: 1024 * 1024,
            history_samples: 3600,
            history_max_bytes: 16 * 1024 * 1024,
        }
    }
}

impl MonitorConfig {
    /// `sample_interval_ms` as a duration.
    pub fn sample_interval(&self) -> Duration {
        Duration::from_millis(self.sample_interval_ms)
    }

    /// `agent_timeout_ms` as a duration.
    pub fn agent_timeout(&self) -> Duration {
        Duration::from_millis(self.agent_timeout_ms)
    }
}

/// `[cluster]`: this host is one of several, coordinated through etcd.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// etcd client URLs, `http://host:port`, at least one.
    pub endpoints: Vec<String>,
    /// This host's name in the cluster; the operating system's host name when absent.
    pub host: Option<String>,
    /// Every key lives under this prefix (absolute, no trailing `/`).
    pub key_prefix: String,
    /// The libvirt URI other hosts reach this host's libvirtd at; `daemon.libvirt_uri` when
    /// absent.
    pub libvirt_uri: Option<String>,
    /// Time to live of this host's lease, in seconds (1..=300): how long after its last
    /// renewal a silent host counts as lost.
    pub lease_ttl_s: u64,
    /// Period of keepalives, in milliseconds (50..=lease_ttl_s*1000/3); a quarter of the TTL
    /// when absent.
    pub keepalive_interval_ms: Option<u64>,
    /// Bound on each etcd call, in milliseconds (50..=30000, below the lease TTL).
    pub op_timeout_ms: u64,
    /// Bound on connecting to etcd, in milliseconds (50..=30000).
    pub connect_timeout_ms: u64,
    /// Memory this host keeps out of placement, in MiB (other workloads, the host's own
    /// growth): subtracted from the available memory it publishes, so other hosts place no
    /// shadow here that would eat into it. 0 by default.
    pub reserved_memory_mib: u64,
    /// UDP port of the direct heartbeats between the daemons, on the management network (the
    /// address each host's `libvirt_uri` names); 0 turns them off (then no host is ever
    /// declared lost and none fences itself: see README "Losing a host").
    pub heartbeat_port: u16,
    /// Period of the direct heartbeats, in milliseconds (20..=1000).
    pub heartbeat_interval_ms: u64,
    /// Silence after which a peer is suspected, in milliseconds (at least three heartbeat
    /// periods, below the lease TTL).
    pub suspect_after_ms: u64,
    /// A host that cannot renew its lease destroys its primaries this long before the lease
    /// can expire, in milliseconds (100..TTL).
    pub self_fence_guard_ms: u64,
    /// Without a confirmed fence, the other hosts promote this long after they saw the lost
    /// host's lease expire, in milliseconds (0..=60000).
    pub promote_margin_ms: u64,
    /// Bound on each call of a fence agent, in milliseconds (100..=120000).
    pub fence_timeout_ms: u64,
    /// A primary on another host whose class probe has not answered from here for this
    /// long, in milliseconds, is unreachable from here (200..=600000; README "Losing a
    /// host": a host cut off from the switch).
    pub unreachable_after_ms: u64,
    /// Fence device per host: host name -> fence agent argument vector (fence-agents calling
    /// convention; `-o off` and `-o status` are appended). A host without one is fenced by its
    /// own daemon (self-fencing) and taken over only after its lease expired.
    pub fence: std::collections::BTreeMap<String, Vec<String>>,
    /// A watchdog device (e.g. `/dev/watchdog` of softdog) armed while the daemon runs and fed
    /// only while its lease is safe, so that a frozen daemon's host resets.
    pub watchdog: Option<PathBuf>,
    /// The watchdog's timeout, in seconds (1..=60; at most the lease TTL).
    pub watchdog_timeout_s: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            host: None,
            key_prefix: "/understudy/default".to_owned(),
            libvirt_uri: None,
            lease_ttl_s: 5,
            keepalive_interval_ms: None,
            op_timeout_ms: 1000,
            connect_timeout_ms: 1000,
            reserved_memory_mib: 0,
            heartbeat_port: 7946,
            heartbeat_interval_ms: 100,
            suspect_after_ms: 500,
            self_fence_guard_ms: 500,
            promote_margin_ms: 1000,
            fence_timeout_ms: 20_000,
            unreachable_after_ms: 2000,
            fence: std::collections::BTreeMap::new(),
            watchdog: None,
            watchdog_timeout_s: 2,
        }
    }
}

impl ClusterConfig {
    /// `lease_ttl_s` as a duration.
    pub fn lease_ttl(&self) -> Duration {
        Duration::from_secs(self.lease_ttl_s)
    }

    /// The keepalive period: as configured, or a quarter of the TTL.
    pub fn keepalive_interval(&self) -> Duration {
        Duration::from_millis(
            self.keepalive_interval_ms
                .unwrap_or(self.lease_ttl_s * 1000 / 4),
        )
    }

    /// `op_timeout_ms` as a duration.
    pub fn op_timeout(&self) -> Duration {
        Duration::from_millis(self.op_timeout_ms)
    }

    /// `connect_timeout_ms` as a duration.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// `heartbeat_interval_ms` as a duration.
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }

    /// `suspect_after_ms` as a duration.
    pub fn suspect_after(&self) -> Duration {
        Duration::from_millis(self.suspect_after_ms)
    }

    /// `self_fence_guard_ms` as a duration.
    pub fn self_fence_guard(&self) -> Duration {
        Duration::from_millis(self.self_fence_guard_ms)
    }

    /// `promote_margin_ms` as a duration.
    pub fn promote_margin(&self) -> Duration {
        Duration::from_millis(self.promote_margin_ms)
    }

    /// `fence_timeout_ms` as a duration.
    pub fn fence_timeout(&self) -> Duration {
        Duration::from_millis(self.fence_timeout_ms)
    }

    /// `unreachable_after_ms` as a duration.
    pub fn unreachable_after(&self) -> Duration {
        Duration::from_millis(self.unreachable_after_ms)
    }
}

/// Where the central profile repository lives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RepositoryBackend {
    /// The directory `repository` (local, or a shared mount).
    #[default]
    Directory,
    /// etcd, under the cluster's key prefix (needs `[cluster]`).
    Etcd,
}

/// `[profile]`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProfileConfig {
    /// Where the central profile repository lives.
    pub repository_backend: RepositoryBackend,
    /// Directory of the central profile repository (with `repository_backend = "directory"`).
    pub repository: PathBuf,
    /// Extra capacity added on top of the calibrated envelope, in percent (0..=200). 0 lets each
    /// service's coverage converge on its class's `coverage_target`.
    pub headroom_pct: u32,
    /// Samples a time bucket needs before it is trusted (at least 1).
    pub min_samples_per_bucket: u32,
    /// Samples compared when checking a profile for drift (at least 10).
    pub drift_window: u32,
    /// Fraction of the drift window a profile must cover to stay valid (0 < x <= 1).
    pub drift_coverage_threshold: f64,
    /// Versions kept per service on this host; older ones are deleted at each commit (at least
    /// 2, so there is always one to roll back to; 0 keeps every version).
    pub keep_versions: u32,
}

impl Default for ProfileConfig {
    fn default() -> Self {
        Self {
            repository_backend: RepositoryBackend::Directory,
            repository: PathBuf::from("/var/lib/understudy/profile-repo"),
            headroom_pct: 0,
            min_samples_per_bucket: 30,
            drift_window: 120,
            drift_coverage_threshold: 0.8,
            keep_versions: 500,
        }
    }
}

/// A shell-style glob over domain names, validated when the file is read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Glob(glob::Pattern);

impl Glob {
    /// Whether the whole of `name` matches.
    pub fn matches(&self, name: &str) -> bool {
        self.0.matches(name)
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl TryFrom<String> for Glob {
    type Error = glob::PatternError;

    fn try_from(pattern: String) -> Result<Self, Self::Error> {
        glob::Pattern::new(&pattern).map(Glob)
    }
}

impl<'de> Deserialize<'de> for Glob {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let pattern = String::deserialize(deserializer)?;
        Glob::try_from(pattern.clone())
            .map_err(|e| serde::de::Error::custom(format_args!("invalid glob {pattern:?}: {e}")))
    }
}

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[[protect]]`: domains whose name matches `pattern` are protected with `class`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtectRule {
    /// Glob over libvirt domain names (key `match`).
    #[serde(rename = "match")]
    pub pattern: Glob,
    /// Name of a `[class.X]`, or [`DEFAULT_CLASS`].
    pub class: String,
}

/// `[class.X]`: how domains of one class are shadowed and failed over.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClassConfig {
    /// Paused shadows kept per protected domain (0..=8).
    pub shadows: u32,
    /// Where the shadows go: `local`, `other-host` or `spread` (see
    /// [`crate::cluster::placement`]). Without a `[cluster]` table every host is alone and only
    /// `local` can be satisfied; the others leave shadows unplaced (status says why).
    pub placement: crate::cluster::Placement,
    /// Period of guest heartbeats in milliseconds (50..=60000).
    pub heartbeat_interval_ms: u64,
    /// Time a heartbeat may take to be answered, in milliseconds (10..=60000). Strictly below
    /// `heartbeat_interval_ms`, so that a heartbeat is settled before the next one is sent.
    pub heartbeat_timeout_ms: u64,
    /// Consecutive missed heartbeats that declare the primary dead (1..=100).
    pub heartbeat_misses: u32,
    /// Time a new shadow may take to boot, in seconds (10..=3600).
    pub shadow_boot_timeout_s: u64,
    /// Promotion attempts on further shadows after the first one fails (0..=100).
    pub promote_retry_limit: u32,
    /// Base image used by `shadow reinit --golden`.
    pub golden_image: Option<PathBuf>,
    /// Absolute paths of guest files read through the guest agent as configuration evidence.
    pub config_files: Vec<PathBuf>,
    /// Argument vectors run through `guest-exec`; `argv[0]` is an absolute path.
    pub config_commands: Vec<Vec<String>>,
    /// Argument vectors run in a new shadow through `guest-exec` before it is paused, to warm
    /// it up (prime caches, JIT, the service's code paths); `argv[0]` is an absolute path.
    pub warmup_commands: Vec<Vec<String>>,
    /// Role of each writable disk by its `<target dev>` (e.g. `vdb`); disks not named here get
    /// `default_disk_role`.
    pub disk_roles: BTreeMap<String, DiskRole>,
    /// Role of writable disks that `disk_roles` does not name.
    pub default_disk_role: DiskRole,
    /// Argument vectors run through `guest-exec`, in order, in a promoted shadow once its data
    /// disks are attached (find the disk, mount it with journal replay, start the service);
    /// `argv[0]` is an absolute path. They run only when the promotion hands over at least one
    /// data disk, and the network comes up only after every one of them exited 0.
    pub promote_commands: Vec<Vec<String>>,
    /// Longest one promote command may run, in milliseconds (100..=600000).
    pub promote_command_timeout_ms: u64,
    /// Optional external probe from the host namespace.
    pub probe: Option<ProbeConfig>,
    /// Share of samples the profile's calibrated envelope should cover (0.5..=0.999): each
    /// service's coverage converges on it (see `src/profile/forecast.rs`).
    pub coverage_target: f64,
    /// How the service's traffic reaches its VM: through a bridge, or routed to its own tap.
    pub network: NetworkMode,
    /// Balloon each new shadow down to what its service needs when idle (its profile's lowest
    /// planned use over the next day, or the shadow's own use after its warm-up) before it is
    /// paused; a promotion grows it back.
    pub standby_shrink: bool,
    /// Before a new shadow stands by, have its guest drop its page cache and compact its free
    /// memory (through the guest agent: `/proc/sys/vm/drop_caches`, `compact_memory`), so the
    /// balloon and free page reporting can give more of it back to the host.
    pub standby_reclaim: bool,
    /// Give shadows' virtio balloons free page reporting, so pages the guest frees go back to
    /// the host.
    pub free_page_reporting: bool,
    /// Let the host merge identical pages of this class's shadows (and their primaries: KSM):
    /// shadows keep their memory mergeable (a primary's `<nosharepages/>` is dropped from
    /// them) and the daemon turns `/sys/kernel/mm/ksm/run` on. `ksmd` costs host CPU.
    pub ksm: bool,
    /// How shadows stand by: `paused` (booted and paused), `saved` (a managed-save image,
    /// restored at promotion), `cold` (defined only, booted at promotion) or `adaptive`
    /// (paused in and ahead of busy hours, saved otherwise).
    pub standby_tier: crate::failover::standby::TierPolicy,
    /// Busy hours for `adaptive`, as `[start, end)` UTC hour pairs (0..=24), on top of the
    /// busy hours the service's profile predicts.
    pub busy_hours_utc: Vec<[u8; 2]>,
    /// How long before a busy time an `adaptive` shadow is switched to paused, in seconds
    /// (0..=86400).
    pub adaptive_lead_s: u64,
    /// Passive recording of the primary's traffic (off by default).
    pub capture: CaptureConfig,
    /// Replay and comparison of recorded traffic (canaries, standby verification).
    pub replay: ReplayConfig,
    /// Pooled shadows (`[class.X.pool]`): one generic shadow per `primaries_per_shadow`
    /// primaries of the class, cloned from a golden template domain, that takes the identity of
    /// whichever primary fails first. Needs `shadows = 0`.
    pub pool: Option<PoolConfig>,
}

/// `[class.X.pool]`: shadows shared by the class's primaries.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// How many primaries one pooled shadow covers (1..=64): the class keeps
    /// ceil(primaries / primaries_per_shadow) pooled shadows on this host.
    pub primaries_per_shadow: u32,
    /// The libvirt domain pooled shadows are cloned from: the class's golden VM, defined and
    /// never started. Its disks are the golden images (each shadow boots an overlay of them);
    /// its NICs are left out (a promotion plugs the failed primary's).
    pub template: String,
}

/// How a protected VM's traffic reaches it, and so what promotion moves to the shadow.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// The VM's tap is a port of a bridge: promotion enslaves the shadow's tap to it.
    #[default]
    Bridged,
    /// The VM hangs off its own tap, reached through host routes (`/32`) to its addresses:
    /// promotion gives the shadow's tap the old tap's host addresses and replaces those routes
    /// so they point at it.
    Routed,
}

impl NetworkMode {
    /// The name used in the configuration and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkMode::Bridged => "bridged",
            NetworkMode::Routed => "routed",
        }
    }
}

impl fmt::Display for NetworkMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happens to a writable disk of a protected primary at failover.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum DiskRole {
    /// The shadow boots its own qcow2 overlay of the disk's image (or of the class's golden
    /// image); what the primary wrote since the shadow was made is not carried over.
    #[default]
    System,
    /// Handed over: the shadow is defined and booted without it, and at promotion the very same
    /// disk source is attached to the shadow, so a failover keeps its data.
    Data,
}

impl DiskRole {
    /// The name used in the configuration and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskRole::System => "system",
            DiskRole::Data => "data",
        }
    }
}

impl fmt::Display for DiskRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Default for ClassConfig {
    fn default() -> Self {
        Self {
            shadows: 1,
            placement: crate::cluster::Placement::Local,
            heartbeat_interval_ms: 250,
            heartbeat_timeout_ms: 200,
            heartbeat_misses: 3,
            shadow_boot_timeout_s: 180,
            promote_retry_limit: 3,
            golden_image: None,
            config_files: Vec::new(),
            config_commands: Vec::new(),
            warmup_commands: Vec::new(),
            disk_roles: BTreeMap::new(),
            default_disk_role: DiskRole::System,
            promote_commands: Vec::new(),
            promote_command_timeout_ms: 30_000,
            probe: None,
            coverage_target: 0.95,
            network: NetworkMode::Bridged,
            standby_shrink: false,
            standby_reclaim: false,
            free_page_reporting: false,
            ksm: false,
            standby_tier: crate::failover::standby::TierPolicy::Paused,
            busy_hours_utc: Vec::new(),
            adaptive_lead_s: 600,
            capture: CaptureConfig::default(),
            replay: ReplayConfig::default(),
            pool: None,
        }
    }
}

impl ClassConfig {
    /// `heartbeat_interval_ms` as a duration.
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }

    /// `heartbeat_timeout_ms` as a duration.
    pub fn heartbeat_timeout(&self) -> Duration {
        Duration::from_millis(self.heartbeat_timeout_ms)
    }

    /// `shadow_boot_timeout_s` as a duration.
    pub fn shadow_boot_timeout(&self) -> Duration {
        Duration::from_secs(self.shadow_boot_timeout_s)
    }

    /// `promote_command_timeout_ms` as a duration.
    pub fn promote_command_timeout(&self) -> Duration {
        Duration::from_millis(self.promote_command_timeout_ms)
    }

    /// The role of the writable disk with `<target dev=target>`.
    pub fn disk_role(&self, target: &str) -> DiskRole {
        self.disk_roles
            .get(target)
            .copied()
            .unwrap_or(self.default_disk_role)
    }
}

/// What an external probe checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeCheck {
    /// An HTTP GET of `path` answers with a non-error status.
    Http {
        /// Request path, starting with `/`.
        path: String,
    },
    /// A TCP connection is accepted.
    Tcp,
}

/// `[class.X.probe]`: a service check from the host namespace.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawProbe")]
pub struct ProbeConfig {
    /// What is checked (key `kind`, plus `path` for HTTP).
    pub check: ProbeCheck,
    /// Address probed.
    pub address: SocketAddr,
    /// Probe period in milliseconds (10..=60000).
    pub interval_ms: u64,
    /// Probe timeout in milliseconds (1..=60000, strictly below `interval_ms`).
    pub timeout_ms: u64,
}

impl ProbeConfig {
    /// `interval_ms` as a duration.
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }

    /// `timeout_ms` as a duration.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

/// The probe table as written, before `kind` and `path` are folded into [`ProbeCheck`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProbe {
    kind: ProbeKind,
    address: SocketAddr,
    path: Option<String>,
    #[serde(default = "default_probe_interval_ms")]
    interval_ms: u64,
    #[serde(default = "default_probe_timeout_ms")]
    timeout_ms: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum ProbeKind {
    Http,
    Tcp,
}

fn default_probe_interval_ms() -> u64 {
    200
}

fn default_probe_timeout_ms() -> u64 {
    100
}

/// A probe table that is well-typed but inconsistent.
#[derive(Debug, thiserror::Error)]
enum ProbeShapeError {
    /// `path` only applies to HTTP probes.
    #[error("`path` is only meaningful with kind = \"http\"; remove it for a tcp probe")]
    PathWithTcp,
}

impl TryFrom<RawProbe> for ProbeConfig {
    type Error = ProbeShapeError;

    fn try_from(raw: RawProbe) -> Result<Self, Self::Error> {
        let check = match (raw.kind, raw.path) {
            (ProbeKind::Http, path) => ProbeCheck::Http {
                path: path.unwrap_or_else(|| "/".to_owned()),
            },
            (ProbeKind::Tcp, None) => ProbeCheck::Tcp,
            (ProbeKind::Tcp, Some(_)) => return Err(ProbeShapeError::PathWithTcp),
        };
        Ok(Self {
            check,
            address: raw.address,
            interval_ms: raw.interval_ms,
            timeout_ms: raw.timeout_ms,
        })
    }
}

/// One thing wrong in a configuration file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line of the offending key (or of its nearest enclosing table when the key is
    /// missing).
    pub line: usize,
    /// Dotted key path, e.g. `class.web.shadows` or `protect[0].match`.
    pub key: String,
    /// What is wrong, including the allowed range where there is one.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}: {}", self.line, self.key, self.message)
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be opened or read.
    #[error("{}: cannot read configuration", path.display())]
    Read {
        /// The configuration file.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_CONFIG_BYTES`].
    #[error("{}: configuration is larger than {limit} bytes", path.display())]
    TooLarge {
        /// The configuration file.
        path: PathBuf,
        /// The size limit in bytes.
        limit: u64,
    },
    /// The file is not UTF-8, which TOML requires.
    #[error("{}: configuration is not valid UTF-8", path.display())]
    NotUtf8 {
        /// The configuration file.
        path: PathBuf,
        /// Where decoding failed.
        #[source]
        source: std::string::FromUtf8Error,
    },
    /// The file is not valid TOML (this includes duplicate keys and tables).
    #[error("{}:{line}:{column}: malformed TOML: {message}", path.display())]
    Syntax {
        /// The configuration file.
        path: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column (in bytes) of the error.
        column: usize,
        /// The parser's one-line description of what it expected.
        message: String,
    },
    /// The file is valid TOML but does not describe a valid configuration.
    #[error("{}", render_invalid(path, problems))]
    Invalid {
        /// The configuration file.
        path: PathBuf,
        /// Every problem found, ordered by line.
        problems: Vec<Problem>,
    },
}

fn render_invalid(path: &Path, problems: &[Problem]) -> String {
    let count = problems.len();
    let mut text = format!(
        "{}: invalid configuration ({count} problem{}):",
        path.display(),
        if count == 1 { "" } else { "s" }
    );
    for problem in problems {
        text.push_str(&format!(
            "\n{}:{}: {}: {}",
            path.display(),
            problem.line,
            problem.key,
            problem.message
        ));
    }
    text
}

/// The top-level keys, for the unknown-key message.
const SECTIONS: &str = "`daemon`, `monitor`, `profile`, `protect`, `class`, `cluster`";

impl Config {
    /// Reads, parses and validates the configuration file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let read_error = |source| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read_error)?;
        let mut bytes = Vec::new();
        // Read one byte past the limit to tell "exactly at the limit" from "over it".
        file.take(MAX_CONFIG_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(read_error)?;
        if bytes.len() as u64 > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge {
                path: path.to_owned(),
                limit: MAX_CONFIG_BYTES,
            });
        }
        let text = String::from_utf8(bytes).map_err(|source| ConfigError::NotUtf8 {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates `text`; `origin` names the file in messages.
    pub fn parse(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let doc = Document::parse(text).map_err(|e| {
            let at = Document::position_in(text, e.span().map_or(0, |s| s.start));
            ConfigError::Syntax {
                path: origin.to_owned(),
                line: at.line,
                column: at.column,
                message: e.message().trim_end().to_owned(),
            }
        })?;

        let mut problems = Vec::new();
        let mut config = Config::default();
        // Classes named in the file, including those that failed to deserialize, so that a
        // broken class is not also reported as unknown by the rules using it.
        let mut declared_classes = BTreeSet::from([DEFAULT_CLASS.to_owned()]);

        for (key, value) in doc.root() {
            let path = KeyPath::root().key(key.get_ref());
            match key.get_ref().as_ref() {
                "daemon" => {
                    if let Some(daemon) = section(&doc, value, &path, &mut problems) {
                        config.daemon = daemon;
                    }
                }
                "monitor" => {
                    if let Some(monitor) = section(&doc, value, &path, &mut problems) {
                        config.monitor = monitor;
                    }
                }
                "profile" => {
                    if let Some(profile) = section(&doc, value, &path, &mut problems) {
                        config.profile = profile;
                    }
                }
                "cluster" => {
                    config.cluster = section(&doc, value, &path, &mut problems);
                }
                "protect" => match value.get_ref() {
                    DeValue::Array(rules) => {
                        for (i, rule) in rules.iter().enumerate() {
                            let rule_path = path.index(i);
                            if let Some(rule) = section(&doc, rule, &rule_path, &mut problems) {
                                config.protect.push(rule);
                            }
                        }
                    }
                    _ => problems.push(problem(
                        &doc,
                        &path,
                        "must be an array of tables: write [[protect]], not [protect]".to_owned(),
                    )),
                },
                "class" => match value.get_ref() {
                    DeValue::Table(classes) => {
                        for (name, class) in classes {
                            declared_classes.insert(name.get_ref().to_string());
                            let class_path = path.key(name.get_ref());
                            if let Some(class) = section(&doc, class, &class_path, &mut problems) {
                                config.class.insert(name.get_ref().to_string(), class);
                            }
                        }
                    }
                    _ => problems.push(problem(
                        &doc,
                        &path,
                        "must be a table of classes: write [class.NAME] sections".to_owned(),
                    )),
                },
                other => problems.push(problem(
                    &doc,
                    &path,
                    format!("unknown section `{other}`, expected one of {SECTIONS}"),
                )),
            }
        }

        validate::check(&config, &doc, &declared_classes, &mut problems);

        if problems.is_empty() {
            Ok(config)
        } else {
            // Stable: problems on one line keep their discovery order.
            problems.sort_by_key(|p| p.line);
            Err(ConfigError::Invalid {
                path: origin.to_owned(),
                problems,
            })
        }
    }

    /// First `[[protect]]` rule whose glob matches the domain name -> (class name, class config).
    ///
    /// `None` if no rule matches (the domain is not protected), or if the first matching rule
    /// names a class missing from `class`, which only a hand-built `Config` can do.
    pub fn class_for(&self, domain_name: &str) -> Option<(&str, &ClassConfig)> {
        let rule = self
            .protect
            .iter()
            .find(|rule| rule.pattern.matches(domain_name))?;
        self.class
            .get_key_value(rule.class.as_str())
            .map(|(name, class)| (name.as_str(), class))
    }
}

/// Parses `tracing` filter directives (`[daemon] log_level`, `UNDERSTUDY_LOG`). Non-ASCII text
/// is refused before tracing-subscriber sees it: its directive parser slices at byte offsets
/// and panics inside a multi-byte character (found by the config fuzz target). Field values
/// (`target[{field=value}]`) match literally, not as regular expressions: compiling one into
/// a DFA took seconds for a 60-byte value (also found by the fuzz target), and a pattern can
/// cost far more.
pub fn log_filter(directives: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    if !directives.is_ascii() {
        return Err(format!(
            "{directives:?} is not a valid log filter: only ASCII is allowed"
        ));
    }
    tracing_subscriber::EnvFilter::builder()
        .with_regex(false)
        .parse(directives)
        .map_err(|e| format!("{directives:?} is not a valid log filter: {e}"))
}

/// A problem at `path`, located on the line of that key.
fn problem(doc: &Document<'_>, path: &KeyPath, message: String) -> Problem {
    Problem {
        line: doc.line_for(path),
        key: path.to_string(),
        message,
    }
}

/// Deserializes one section on its own so that errors in other sections are still reported.
fn section<T: DeserializeOwned>(
    doc: &Document<'_>,
    value: &Spanned<DeValue<'_>>,
    path: &KeyPath,
    problems: &mut Vec<Problem>,
) -> Option<T> {
    match T::deserialize(ValueDeserializer::from(value.clone())) {
        Ok(parsed) => Some(parsed),
        Err(e) => {
            // Spans index the whole document since the section was cut out of its parse tree.
            let (line, key) = match e.span() {
                Some(span) => (
                    doc.line_of(span.start),
                    doc.path_at(span.start).unwrap_or_else(|| path.clone()),
                ),
                None => (doc.line_for(path), path.clone()),
            };
            problems.push(Problem {
                line,
                key: key.to_string(),
                message: e.message().trim_end().to_owned(),
            });
            None
        }
    }
}
