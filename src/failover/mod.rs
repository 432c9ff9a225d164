//! Shadows, crash detection, fencing and the promotion pipeline.
//!
//! A *service* is what a protected primary domain provides. Its members are domains tagged in
//! their libvirt `<metadata>` (see [`crate::domain_xml::UnderstudyMeta`]): one active domain
//! and N paused shadows. Everything here can be rebuilt from libvirt alone after a restart.

pub mod apply_profile;
pub mod plan;
pub mod promote;
pub mod shadow;
pub mod tpm;

use std::time::Duration;

use serde::Serialize;

use crate::api::protocol::{FailoverRecord, ShadowState, StepTiming};
use crate::libvirt::LibvirtError;

/// Errors of shadow provisioning and promotion.
#[derive(Debug, thiserror::Error)]
pub enum FailoverError {
    /// A libvirt call failed.
    #[error("libvirt call failed during {step}")]
    Libvirt {
        /// The pipeline step.
        step: &'static str,
        /// The libvirt error.
        #[source]
        source: LibvirtError,
    },
    /// The primary's domain XML could not be read or cloned.
    #[error("cannot clone the spec of '{domain}'")]
    Clone {
        /// The primary domain.
        domain: String,
        /// Why.
        #[source]
        source: crate::domain_xml::CloneError,
    },
    /// The primary's disks cannot be planned (roles that do not fit the disks).
    #[error("cannot plan the disks of '{domain}'")]
    Plan {
        /// The primary domain.
        domain: String,
        /// Why.
        #[source]
        source: plan::PlanError,
    },
    /// The primary's emulated TPM state could not be given to the shadow.
    #[error("cannot give the shadow the emulated TPM state of '{domain}'")]
    Tpm {
        /// The primary domain.
        domain: String,
        /// Why.
        #[source]
        source: tpm::TpmError,
    },
    /// The domain XML libvirt gave us did not parse.
    #[error("domain XML of '{domain}' is not understood")]
    Xml {
        /// The domain.
        domain: String,
        /// Why.
        #[source]
        source: crate::domain_xml::XmlError,
    },
    /// qemu-img failed to create or inspect a disk image.
    #[error("qemu-img {action} for '{path}' failed: {stderr}")]
    QemuImg {
        /// What we asked qemu-img to do.
        action: &'static str,
        /// The image path.
        path: String,
        /// qemu-img's own message (bounded).
        stderr: String,
    },
    /// Running a helper program failed to start at all.
    #[error("cannot run {program}")]
    Spawn {
        /// The program.
        program: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A netlink operation of the rewiring step failed.
    #[error("network rewiring failed during {step}")]
    Net {
        /// The pipeline step.
        step: &'static str,
        /// The netlink error.
        #[source]
        source: crate::net::NetError,
    },
    /// A shadow did not reach the state we waited for in time.
    #[error("shadow '{shadow}' did not {what} within {timeout:?}")]
    Timeout {
        /// The shadow domain.
        shadow: String,
        /// What we waited for.
        what: &'static str,
        /// The limit.
        timeout: Duration,
    },
    /// The live XML of a running domain has no tap for its interface.
    #[error("domain '{domain}' has no tap device for MAC {mac}")]
    NoTap {
        /// The domain.
        domain: String,
        /// The interface MAC.
        mac: String,
    },
    /// No paused shadow is available to promote.
    #[error("service '{service}' has no paused shadow to promote")]
    NoShadow {
        /// The service.
        service: String,
    },
    /// Fencing of the old primary could not be confirmed, so nothing was promoted.
    #[error("fencing of '{domain}' could not be confirmed: {why}")]
    FenceUnconfirmed {
        /// The old primary.
        domain: String,
        /// What we saw.
        why: String,
    },
}

/// A service's lifecycle, as the daemon tracks it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "detail")]
pub enum ServiceState {
    /// Active primary running, but fewer paused shadows than the class asks for.
    Provisioning,
    /// Active primary running and every shadow paused and ready.
    Protected,
    /// A failover is in progress.
    FailingOver,
    /// The primary is gone and no shadow could take over; the reason says why.
    Down(String),
    /// Stopped deliberately by an operator through understudy; not a failure.
    Stopped,
    /// Shadows cannot be made for this primary (e.g. a device that cannot be cloned).
    Unprotectable(String),
}

impl ServiceState {
    /// Short lowercase name for status output and metrics labels.
    pub fn label(&self) -> &'static str {
        match self {
            ServiceState::Provisioning => "provisioning",
            ServiceState::Protected => "protected",
            ServiceState::FailingOver => "failing_over",
            ServiceState::Down(_) => "down",
            ServiceState::Stopped => "stopped",
            ServiceState::Unprotectable(_) => "unprotectable",
        }
    }
}

/// One shadow of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shadow {
    /// Domain name (`<service>-shadow-<n>`).
    pub name: String,
    /// Where it is in its life.
    pub state: ShadowState,
    /// Its tap devices by MAC, known once it has started.
    pub taps: Vec<TapBinding>,
}

/// What the daemon knows of one protected service.
#[derive(Debug, Clone)]
pub struct Service {
    /// Service name: the name of the domain first protected.
    pub name: String,
    /// The class from the protection rule.
    pub class: String,
    /// Lifecycle.
    pub state: ServiceState,
    /// The domain serving now.
    pub active: String,
    /// Taps of the active domain by MAC, with the bridge each was on.
    pub active_taps: Vec<TapBinding>,
    /// Shadows, oldest first.
    pub shadows: Vec<Shadow>,
    /// Last completed failover.
    pub last_failover: Option<FailoverRecord>,
    /// Unix ms of the last answered heartbeat.
    pub last_heartbeat_unix_ms: Option<u64>,
    /// Last health verdict, for status.
    pub health: String,
    /// Failed promotions since the service last ran: retries stop at the class's
    /// `promote_retry_limit`.
    pub promote_attempts: u32,
    /// Highest shadow generation ever used, so new shadows never reuse a name.
    pub last_generation: u64,
    /// Consecutive failed shadow provisionings, and when the next attempt may start: a
    /// failing host is not hammered every housekeeping round.
    pub provision_failures: u32,
    /// See `provision_failures`.
    pub provision_not_before: Option<std::time::Instant>,
}

/// A tap device and the bridge it belongs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapBinding {
    /// Interface MAC (shared by primary and shadows).
    pub mac: String,
    /// Tap device name on the host.
    pub tap: String,
    /// Bridge the service's traffic arrives on.
    pub bridge: Option<String>,
    /// Whether the NIC's link is up in the guest's view (`<link state>`).
    pub link_up: bool,
}

impl Shadow {
    /// True when every NIC's link is already up, so promotion needs no link change.
    pub fn link_ready(&self) -> bool {
        !self.taps.is_empty() && self.taps.iter().all(|b| b.link_up)
    }
}

impl Service {
    /// The first paused shadow, if any.
    pub fn ready_shadow(&self) -> Option<&Shadow> {
        self.shadows.iter().find(|s| s.state == ShadowState::Paused)
    }
}

/// Times the steps of a pipeline.
#[derive(Debug)]
pub struct StepClock {
    start: std::time::Instant,
    steps: Vec<StepTiming>,
    restored_ms: Option<f64>,
}

impl StepClock {
    /// Starts the clock at `start` (e.g. the moment the failure was detected).
    pub fn starting_at(start: std::time::Instant) -> Self {
        StepClock {
            start,
            steps: Vec::new(),
            restored_ms: None,
        }
    }

    /// Records a step that took `elapsed`.
    pub fn record(&mut self, name: &str, elapsed: Duration) {
        fault_point(name);
        self.steps.push(StepTiming {
            name: name.to_string(),
            ms: elapsed.as_secs_f64() * 1000.0,
        });
    }

    /// Notes that service is restored now (the outage estimate ends here).
    pub fn mark_restored(&mut self) {
        self.restored_ms = Some(self.total_ms());
    }

    /// Milliseconds from the start to [`StepClock::mark_restored`], if it was called.
    pub fn restored_ms(&self) -> Option<f64> {
        self.restored_ms
    }

    /// Milliseconds since the start.
    pub fn total_ms(&self) -> f64 {
        self.start.elapsed().as_secs_f64() * 1000.0
    }

    /// The recorded steps.
    pub fn into_steps(self) -> Vec<StepTiming> {
        self.steps
    }
}

/// Current wall-clock time in Unix milliseconds.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Environment variable naming a promotion step after which the daemon aborts: the fault
/// suite uses it to kill the daemon at every step and check that a restart finishes or undoes
/// the promotion. Unset in production; read once.
pub const FAULT_ABORT_AFTER_ENV: &str = "UNDERSTUDY_FAULT_ABORT_AFTER";

fn fault_point(step: &str) {
    static TARGET: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let target = TARGET.get_or_init(|| {
        std::env::var(FAULT_ABORT_AFTER_ENV)
            .ok()
            .filter(|s| !s.is_empty())
    });
    if target.as_deref() == Some(step) {
        tracing::error!(
            step,
            "fault injection: aborting after this step ({FAULT_ABORT_AFTER_ENV})"
        );
        std::process::abort();
    }
}
