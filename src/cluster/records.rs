//! What hosts tell each other: the records a [`super::Coordinator`] stores, its events and the
//! state of this host's lease. Fields a reader does not know are ignored, so that hosts running
//! different versions during an upgrade still read each other's records.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{CoordError, HostCapacity, HostId};
use crate::failover::Trigger;

/// Longest host, service or domain name accepted in a key.
pub const MAX_NAME_BYTES: usize = 253;

/// Checks that `name` can be one segment of a key: not empty, at most [`MAX_NAME_BYTES`],
/// no `/`, no control character, not `.` or `..`.
pub fn check_name(what: &'static str, name: &str) -> Result<(), CoordError> {
    let why = if name.is_empty() {
        Some("empty")
    } else if name.len() > MAX_NAME_BYTES {
        Some("longer than 253 bytes")
    } else if name.contains('/') {
        Some("contains '/'")
    } else if name.chars().any(char::is_control) {
        Some("contains a control character")
    } else if name == "." || name == ".." {
        Some("is a relative path segment")
    } else {
        None
    };
    match why {
        None => Ok(()),
        Some(why) => Err(CoordError::InvalidName {
            what,
            name: name.to_string(),
            why,
        }),
    }
}

/// Who serves a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerRecord {
    /// The service.
    pub service: String,
    /// The domain serving it.
    pub domain: String,
    /// The host running that domain.
    pub host: HostId,
    /// Grows by one with every change of owner; a claim names the generation it saw.
    pub generation: u64,
}

/// What a host tells the others about itself when it registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFacts {
    /// The host.
    pub host: HostId,
    /// The libvirt URI other hosts reach its libvirtd at (to check a suspect host's VMs).
    pub libvirt_uri: String,
    /// Memory and CPUs when registered or last refreshed; `None` where unknown.
    pub capacity: Option<HostCapacity>,
    /// When its daemon started (Unix ms).
    pub started_unix_ms: u64,
    /// When these facts were written (Unix ms).
    pub updated_unix_ms: u64,
    /// The daemon's version.
    pub version: String,
}

impl HostFacts {
    /// This host's facts now: `libvirt_uri` as others reach it, capacity read with sysinfo.
    pub fn now(host: HostId, libvirt_uri: &str, started_unix_ms: u64) -> Self {
        HostFacts {
            host,
            libvirt_uri: libvirt_uri.to_string(),
            capacity: HostCapacity::read(),
            started_unix_ms,
            updated_unix_ms: crate::clock::now_unix_ms(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

/// Whether a host takes part in placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostState {
    /// Takes shadows and primaries.
    Active,
    /// Being emptied: no new shadows; its primaries move to other hosts.
    Draining,
}

/// A host as the cluster knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    /// What it registered.
    pub facts: HostFacts,
    /// Its lease is alive (false: lost, or deregistered).
    pub alive: bool,
    /// Active or draining.
    pub state: HostState,
}

/// A protected primary's definition, published by its host so that another host can
/// provision a shadow of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrimarySpec {
    /// The service.
    pub service: String,
    /// Its protection class.
    pub class: String,
    /// The primary's domain name.
    pub domain: String,
    /// The host running it.
    pub host: HostId,
    /// The owner generation the primary serves under when published.
    pub generation: u64,
    /// The primary's inactive domain XML, as libvirt gives it.
    pub xml: String,
    /// When published (Unix ms).
    pub published_unix_ms: u64,
}

/// Where a registered shadow is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShadowStatus {
    /// Being defined and booted.
    Provisioning,
    /// Booted and paused: promotable.
    Ready,
}

/// A shadow of a service running on a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShadowRecord {
    /// The service.
    pub service: String,
    /// The shadow's domain name.
    pub shadow: String,
    /// The host running it.
    pub host: HostId,
    /// Provisioning or ready.
    pub status: ShadowStatus,
    /// Memory it holds, KiB (for placement).
    pub mem_kib: u64,
    /// When written (Unix ms).
    pub updated_unix_ms: u64,
}

/// "The primary of a service died": written by the primary's host, acted on by a shadow's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureReport {
    /// The service.
    pub service: String,
    /// The domain that died.
    pub domain: String,
    /// The host it ran on.
    pub host: HostId,
    /// The owner generation it served under: a report about an older generation is stale.
    pub generation: u64,
    /// What was seen.
    pub trigger: Trigger,
    /// When (Unix ms, the reporting host's clock).
    pub at_unix_ms: u64,
    /// The host that is to take over (a planned switchover `--to-host`, a drain); `None`: any
    /// host with a ready shadow (a crash).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<HostId>,
}

/// A change in the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterEvent {
    /// A service's owner record was written.
    Owner(OwnerRecord),
    /// A service's owner record was removed.
    OwnerReleased {
        /// The service.
        service: String,
    },
    /// A host registered or refreshed its facts, or its lease came alive.
    HostUp(HostFacts),
    /// A host's lease expired or was revoked.
    HostLost(HostId),
    /// A host's drain flag changed.
    Drain {
        /// The host.
        host: HostId,
        /// Whether it is now draining.
        draining: bool,
    },
    /// A primary spec was published or replaced.
    Spec(PrimarySpec),
    /// A primary spec was withdrawn.
    SpecWithdrawn {
        /// The service.
        service: String,
    },
    /// A shadow was registered or changed.
    Shadow(ShadowRecord),
    /// A shadow registration was removed (or expired with its host's lease).
    ShadowGone {
        /// The service.
        service: String,
        /// The host.
        host: HostId,
        /// The shadow.
        shadow: String,
    },
    /// A primary failure was reported.
    Failure(FailureReport),
    /// A failure report was cleared.
    FailureCleared {
        /// The service.
        service: String,
    },
    /// Events may have been missed (the receiver lagged, or the backend re-established its
    /// watch): re-read what you rely on.
    Resync,
}

/// How this host stands with the coordination backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// One host, no backend ([`super::LocalCoordinator`]).
    Standalone,
    /// Not yet registered.
    Starting,
    /// The lease is renewed.
    Connected,
    /// No endpoint answers keepalives: the lease runs out at
    /// [`LeaseStatus::expires_at`] at the latest.
    Unreachable,
}

impl Mode {
    /// Every mode, for a complete gauge family.
    pub const ALL: [Mode; 4] = [
        Mode::Standalone,
        Mode::Starting,
        Mode::Connected,
        Mode::Unreachable,
    ];

    /// Label for status and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Mode::Standalone => "standalone",
            Mode::Starting => "starting",
            Mode::Connected => "connected",
            Mode::Unreachable => "etcd_unreachable",
        }
    }
}

/// The state of this host's lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseStatus {
    /// Connected or not.
    pub mode: Mode,
    /// Since when (this process's monotonic clock).
    pub since: Instant,
    /// The lease, while one is held.
    pub lease_id: Option<i64>,
    /// The lease's time to live.
    pub ttl: Duration,
    /// When the last keepalive (or grant) that the backend acknowledged was SENT, on this
    /// process's monotonic clock. The lease cannot expire before `last_ack_sent + ttl`; issue
    /// 11's self-fencing is timed from here.
    pub last_ack_sent: Option<Instant>,
}

impl LeaseStatus {
    /// A status with no lease, in `mode`, from now.
    pub fn without_lease(mode: Mode, ttl: Duration) -> Self {
        LeaseStatus {
            mode,
            since: Instant::now(),
            lease_id: None,
            ttl,
            last_ack_sent: None,
        }
    }

    /// The earliest moment the backend may consider the lease expired: the last acknowledged
    /// keepalive's send time plus the TTL. `None` without a lease.
    pub fn expires_at(&self) -> Option<Instant> {
        self.last_ack_sent.map(|t| t + self.ttl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_cannot_be_key_segments_are_refused() {
        for ok in ["web1", "h-2.example", "a b", "ünïcode"] {
            check_name("service", ok).unwrap();
        }
        let long = "x".repeat(254);
        for (bad, why) in [
            ("", "empty"),
            ("a/b", "contains '/'"),
            ("a\nb", "contains a control character"),
            ("..", "is a relative path segment"),
            (long.as_str(), "longer than 253 bytes"),
        ] {
            match check_name("host", bad) {
                Err(CoordError::InvalidName { what, why: w, .. }) => {
                    assert_eq!((what, w), ("host", why), "{bad:?}")
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn lease_expiry_is_counted_from_the_acknowledged_send_time() {
        let t = Instant::now();
        let s = LeaseStatus {
            mode: Mode::Connected,
            since: t,
            lease_id: Some(7),
            ttl: Duration::from_secs(3),
            last_ack_sent: Some(t),
        };
        assert_eq!(s.expires_at(), Some(t + Duration::from_secs(3)));
        assert_eq!(
            LeaseStatus::without_lease(Mode::Starting, s.ttl).expires_at(),
            None
        );
    }
}
