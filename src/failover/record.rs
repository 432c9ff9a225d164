//! What the failover machinery reports: why a failover started, how each step went, and where
//! each shadow is in its life. Shared by the daemon, the control socket and the metrics.

use serde::{Deserialize, Serialize};

/// What set a failover off. Serialized lowercase (`pidfd`, `heartbeat`, ...), the label used
/// in status, logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    /// The primary's QEMU process exited (pidfd).
    Pidfd,
    /// libvirt reported the primary crashed or failed.
    Lifecycle,
    /// Heartbeats stopped and the guest is hung.
    Heartbeat,
    /// An operator asked for a switchover.
    Manual,
    /// Found at daemon start, or after a failed promotion: the primary was already gone.
    Recovery,
}

impl Trigger {
    /// Label for status and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Trigger::Pidfd => "pidfd",
            Trigger::Lifecycle => "lifecycle",
            Trigger::Heartbeat => "heartbeat",
            Trigger::Manual => "manual",
            Trigger::Recovery => "recovery",
        }
    }

    /// Whether the old primary's QEMU is already known to be gone.
    pub fn primary_known_dead(self) -> bool {
        matches!(
            self,
            Trigger::Pidfd | Trigger::Lifecycle | Trigger::Recovery
        )
    }
}

impl std::fmt::Display for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// Life cycle of a shadow, serialized lowercase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShadowState {
    /// Created and starting; not yet ready to take over.
    Booting,
    /// Booted and paused: ready for promotion.
    Paused,
    /// Being promoted to active right now.
    Promoting,
    /// Could not be brought up; needs a rebuild.
    Failed,
}

impl ShadowState {
    /// Every state, for exporting a complete gauge family.
    pub const ALL: [ShadowState; 4] = [
        ShadowState::Booting,
        ShadowState::Paused,
        ShadowState::Promoting,
        ShadowState::Failed,
    ];

    /// The serialized name.
    pub fn as_str(self) -> &'static str {
        match self {
            ShadowState::Booting => "booting",
            ShadowState::Paused => "paused",
            ShadowState::Promoting => "promoting",
            ShadowState::Failed => "failed",
        }
    }
}

/// What happened during one failover.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailoverRecord {
    /// When the failure was detected, Unix epoch milliseconds.
    pub at_unix_ms: u64,
    /// Domain that failed.
    pub from: String,
    /// Domain promoted in its place.
    pub to: String,
    /// What detected the failure: `pidfd`, `lifecycle`, `heartbeat` or `manual`.
    pub trigger: Trigger,
    /// Estimated outage: from detection of the failure to traffic restored.
    pub outage_ms: f64,
    /// Duration of each pipeline step, in order.
    pub steps: Vec<StepTiming>,
    /// Whether the promotion completed.
    pub ok: bool,
    /// Why it failed, when `ok` is false.
    pub error: Option<String>,
    /// What happened besides the steps, e.g. how the profile resized the new primary or which
    /// of its dependencies were unreachable; none of it failed the promotion.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// Duration of one failover step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepTiming {
    /// Step name, e.g. `fence`, `resume`, `network`.
    pub name: String,
    /// Duration in milliseconds.
    pub ms: f64,
}
