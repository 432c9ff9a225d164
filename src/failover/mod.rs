//! Shadows, crash detection, fencing and the promotion pipeline.
//!
//! A *service* is what a protected primary domain provides. Its members are domains tagged in
//! their libvirt `<metadata>` (see [`crate::domain_xml::UnderstudyMeta`]): one active domain
//! and N paused shadows. Everything here can be rebuilt from libvirt alone after a restart;
//! the daemon's service table (`crate::daemon`) tracks which member is which.

pub mod apply_profile;
pub mod plan;
pub mod promote;
pub mod record;
pub mod shadow;
pub mod standby;
pub mod tpm;

use std::time::Duration;

use crate::libvirt::LibvirtError;
pub use record::{FailoverRecord, ShadowState, StepTiming, Trigger};

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
    /// A data disk could not be attached to the promoted shadow.
    #[error("attach: data disk {target} ({disk_source}) could not be attached to '{shadow}'")]
    Attach {
        /// The shadow.
        shadow: String,
        /// `<target dev>` of the disk.
        target: String,
        /// Its source.
        disk_source: String,
        /// libvirt's refusal (the lock manager's "resource busy" among others).
        #[source]
        source: Box<LibvirtError>,
    },
    /// Another running domain holds the data disk: attaching it would make two writers.
    /// libvirt's lock manager does not cover every disk (network disks such as NBD or RBD
    /// have no lease), so understudy checks the live definitions itself before the attach.
    #[error("attach: data disk {target} ({disk_source}) is still attached to running domain(s) {holders:?}; not attached to '{shadow}'")]
    DiskHeld {
        /// The shadow.
        shadow: String,
        /// `<target dev>` of the disk.
        target: String,
        /// Its source.
        disk_source: String,
        /// The running domains whose live definition has it.
        holders: Vec<String>,
    },
    /// A promote command failed, timed out or could not be run.
    #[error("promote_commands: {argv:?} in '{shadow}' {outcome}")]
    PromoteCommand {
        /// The shadow.
        shadow: String,
        /// The command.
        argv: Vec<String>,
        /// What happened: exit status and its output, or why it could not run.
        outcome: String,
    },
    /// A step failed on purpose ([`FAULT_FAIL_ONCE_ENV`], a test hook).
    #[error("{step}: failed by fault injection ({FAULT_FAIL_ONCE_ENV})")]
    Injected {
        /// The step.
        step: &'static str,
    },
    /// Fencing of the old primary could not be confirmed, so nothing was promoted.
    #[error("fencing of '{domain}' could not be confirmed: {why}")]
    FenceUnconfirmed {
        /// The old primary.
        domain: String,
        /// What we saw.
        why: String,
    },
    /// The host lacks the memory a shadow would hold (it keeps a reserve for itself).
    #[error("shadow '{shadow}' needs {need_kib} KiB; the host has {available_kib} KiB available and keeps {} KiB in reserve", crate::cluster::HOST_RESERVE_KIB)]
    HostFull {
        /// The shadow.
        shadow: String,
        /// Its memory.
        need_kib: u64,
        /// The host's available memory.
        available_kib: u64,
    },
    /// Another promotion owns the service now (the owner record changed since it was read):
    /// this shadow stays paused.
    #[error("service '{service}' could not be claimed")]
    ClaimLost {
        /// The service.
        service: String,
        /// The coordinator's answer.
        #[source]
        source: Box<crate::cluster::CoordError>,
    },
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
    /// The primary's data disks this shadow was made without (and gets at promotion), as
    /// planned when it was provisioned; `None` when not known (a shadow found after a
    /// restart): promotion then reads them from the old primary's definition.
    pub data_disks: Option<Vec<plan::DataDisk>>,
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
    /// For a routed class, what on the host points traffic at this tap.
    pub routed: RoutedSide,
}

/// The host side of a routed NIC (class `network = "routed"`): what points the VM's traffic at
/// its tap, read while the primary runs (its tap, and every route through it, vanish with its
/// QEMU).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutedSide {
    /// Destinations of the `/32` host routes through the tap.
    pub routes: Vec<std::net::Ipv4Addr>,
    /// The host's own IPv4 addresses on the tap (the guest's gateway), with prefix lengths.
    pub addresses: Vec<(std::net::Ipv4Addr, u8)>,
}

impl Shadow {
    /// True when every NIC's link is already up, so promotion needs no link change.
    pub fn link_ready(&self) -> bool {
        !self.taps.is_empty() && self.taps.iter().all(|b| b.link_up)
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

    /// Records a step that began at `started` and took `elapsed` (given apart: concurrent
    /// steps are recorded after all of them ended).
    pub fn record(&mut self, name: &str, started: std::time::Instant, elapsed: Duration) {
        debug_assert!(promote::STEPS.contains(&name), "unlisted step {name}");
        fault_point(name);
        let since_start = started.saturating_duration_since(self.start);
        self.steps.push(StepTiming {
            name: name.to_string(),
            ms: elapsed.as_secs_f64() * 1000.0,
            start_ms: Some(since_start.as_secs_f64() * 1000.0),
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

/// Environment variable naming a promotion step that fails once, after doing its work, in
/// this daemon process: the stateful suite uses it to check that a failed hand-over leaves
/// its disk on no domain and that the retry runs. Unset in production; read once.
pub const FAULT_FAIL_ONCE_ENV: &str = "UNDERSTUDY_FAULT_FAIL_ONCE";

/// Whether step `step` is to fail now (at most once per process).
fn fault_fail_once(step: &str) -> bool {
    static TARGET: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    static FIRED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let target = TARGET.get_or_init(|| {
        std::env::var(FAULT_FAIL_ONCE_ENV)
            .ok()
            .filter(|s| !s.is_empty())
    });
    target.as_deref() == Some(step) && !FIRED.swap(true, std::sync::atomic::Ordering::SeqCst)
}
