//! What the failover machinery reports: why a failover started, how each step went, and where
//! each shadow is in its life. Shared by the daemon, the control socket and the metrics.

use serde::{Deserialize, Serialize};

/// What set a failover off. Serialized lowercase (`pidfd`, `heartbeat`, ...), the label used
/// in status, logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    /// The primary's QEMU process is exiting or exited (thread and process pidfds).
    Pidfd,
    /// libvirt reported the primary crashed or failed.
    Lifecycle,
    /// Heartbeats stopped and the guest is hung.
    Heartbeat,
    /// An operator asked for a switchover.
    Manual,
    /// Found at daemon start, or after a failed promotion: the primary was already gone.
    Recovery,
    /// The primary's host was lost and fenced (powered off by its fence device, or its lease
    /// expired after it fenced itself): serialized `host_lost`.
    #[serde(rename = "host_lost")]
    HostLost,
    /// The primary's host was cut off the switch (its primaries answered on its own bridge
    /// only) and powered off by its fence device: serialized `host_unreachable`.
    #[serde(rename = "host_unreachable")]
    HostUnreachable,
}

impl Trigger {
    /// Every trigger, for metrics that export each one from the start.
    pub const ALL: [Trigger; 7] = [
        Trigger::Pidfd,
        Trigger::Lifecycle,
        Trigger::Heartbeat,
        Trigger::Manual,
        Trigger::Recovery,
        Trigger::HostLost,
        Trigger::HostUnreachable,
    ];

    /// Label for status and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Trigger::Pidfd => "pidfd",
            Trigger::Lifecycle => "lifecycle",
            Trigger::Heartbeat => "heartbeat",
            Trigger::Manual => "manual",
            Trigger::Recovery => "recovery",
            Trigger::HostLost => "host_lost",
            Trigger::HostUnreachable => "host_unreachable",
        }
    }

    /// Whether the old primary's QEMU is already known to be gone.
    pub fn primary_known_dead(self) -> bool {
        matches!(
            self,
            Trigger::Pidfd
                | Trigger::Lifecycle
                | Trigger::Recovery
                | Trigger::HostLost
                | Trigger::HostUnreachable
        )
    }
}

impl std::fmt::Display for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// How a ready shadow stands by (a class's `standby_tier`): what it holds of the host, and what
/// its promotion has to do first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// Booted and paused: all its memory, promoted in tens of ms.
    Paused,
    /// A managed-save image on disk: no memory, restored at promotion (about a second).
    Saved,
    /// Defined only: no memory, booted at promotion (seconds).
    Cold,
}

impl Tier {
    /// Every tier.
    pub const ALL: [Tier; 3] = [Tier::Paused, Tier::Saved, Tier::Cold];

    /// The lowercase name (configuration, status, metrics).
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Paused => "paused",
            Tier::Saved => "saved",
            Tier::Cold => "cold",
        }
    }
}

/// Life cycle of a shadow, serialized lowercase; a shadow standing by is named by its tier
/// (`paused`, `saved`, `cold`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "&'static str", try_from = "String")]
pub enum ShadowState {
    /// Created and starting; not yet ready to take over.
    Booting,
    /// Ready for promotion, standing by in a tier.
    Standby(Tier),
    /// Moving to another tier (the `adaptive` policy); not promotable until it is there.
    Switching(Tier),
    /// Being promoted to active right now.
    Promoting,
    /// Could not be brought up; needs a rebuild.
    Failed,
}

impl ShadowState {
    /// Standing by booted and paused, the classic shadow.
    pub const PAUSED: ShadowState = ShadowState::Standby(Tier::Paused);

    /// Every state, for exporting a complete gauge family.
    /// (`Switching` appears once: every target tier has the one name `switching`.)
    pub const ALL: [ShadowState; 7] = [
        ShadowState::Booting,
        ShadowState::PAUSED,
        ShadowState::Standby(Tier::Saved),
        ShadowState::Standby(Tier::Cold),
        ShadowState::Switching(Tier::Paused),
        ShadowState::Promoting,
        ShadowState::Failed,
    ];

    /// The serialized name.
    pub fn as_str(self) -> &'static str {
        match self {
            ShadowState::Booting => "booting",
            ShadowState::Standby(t) => t.as_str(),
            ShadowState::Switching(_) => "switching",
            ShadowState::Promoting => "promoting",
            ShadowState::Failed => "failed",
        }
    }

    /// Ready to be promoted, in any tier.
    pub fn is_standby(self) -> bool {
        matches!(self, ShadowState::Standby(_))
    }
}

impl From<ShadowState> for &'static str {
    fn from(s: ShadowState) -> Self {
        s.as_str()
    }
}

impl TryFrom<String> for ShadowState {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        ShadowState::ALL
            .into_iter()
            .find(|x| x.as_str() == s)
            .ok_or_else(|| format!("unknown shadow state {s:?}"))
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
    /// When it started, in ms after the failure was detected (steps may overlap: `resume` and
    /// `rewire` run concurrently). Absent in records of older daemons.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_ms: Option<f64>,
}
