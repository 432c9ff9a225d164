//! Heartbeat: decides whether a protected primary is healthy, degraded, suspect or hung from
//! three independent signals, as a pure state machine (no I/O, no clock: the caller passes
//! monotonic timestamps).
//!
//! Signals:
//! - guest agent pings (`guest-ping`): an answer proves the guest kernel schedules userspace;
//! - vCPU time (the vCPU threads' cumulative CPU time, e.g. libvirt `vcpu.N.time` or the
//!   cgroup `vcpuN` groups; not whole-process time, whose I/O threads run regardless): proves
//!   the guest executes instructions;
//! - QEMU monitor responsiveness (libvirt/QMP calls answering): proves QEMU itself is alive.
//!
//! Decision, with `W = interval × misses`:
//! - pings answered → [`Health::Healthy`] (or [`Health::Degraded`] if the monitor is stuck);
//! - fewer than `misses` consecutive misses → [`Health::Suspect`];
//! - pings lost (`misses` consecutive misses, or no ping result at all for `W + timeout`) and
//!   either vCPU time has not advanced for `W` or the monitor is unresponsive → [`Health::Hung`];
//! - pings lost while vCPU time advances and the monitor is not unresponsive →
//!   [`Health::Degraded`]: the agent alone is dead, or the guest is busy;
//! - pings lost while the vCPUs wait on the host's run queues instead of running →
//!   [`Health::Degraded`] too: the host is starving the guest, which is not hung.
//!
//! Why a CPU-saturated guest is not declared hung: when every vCPU is busy, qemu-ga (an
//! ordinary userspace process) may not be scheduled in time, so pings time out exactly as if the
//! guest were hung. But a saturated guest's vCPU threads consume host CPU continuously, so vCPU
//! time keeps advancing; a halted or crashed guest's vCPUs sit in HLT or are stopped and their
//! time stands still. Failing over a guest that is merely busy would lose its in-flight work and
//! probably repeat the overload on the shadow, so vCPU progress vetoes the hung verdict. The
//! price: a guest whose kernel spins in a deadlock also advances vCPU time and is reported
//! Degraded, not Hung; policy on how long to tolerate Degraded belongs to the caller.
//!
//! Why a starved guest is not declared hung: on an overloaded host (a boot storm, a build)
//! a vCPU thread may wait for a CPU longer than `W`, and its time stands still exactly as a
//! stopped one's. The scheduler tells them apart: a starved thread is runnable and its
//! run-queue wait (`schedstat`'s second field) grows; a stopped QEMU, or a guest halted for
//! good, waits on nothing. Failing the guest over would not cure the host, and the promoted
//! shadow would compete for the same CPUs; once the host lets it run, the verdict follows what
//! the guest does.
//!
//! Any reply from the agent, even an error reply, should be reported as [`HeartbeatEvent::PingOk`]:
//! it proves the guest is running userspace.

use std::fmt;
use std::time::Duration;

use thiserror::Error;

/// Monotonic time in milliseconds from an origin chosen by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MonoMs(pub u64);

impl MonoMs {
    fn since(self, earlier: MonoMs) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

/// Invalid heartbeat configuration.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum HeartbeatError {
    /// `interval` is zero.
    #[error("heartbeat interval must be positive")]
    ZeroInterval,
    /// `misses` is zero.
    #[error("heartbeat misses must be at least 1")]
    ZeroMisses,
}

/// Heartbeat parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatConfig {
    /// Time between pings.
    pub interval: Duration,
    /// How long a ping may take before it counts as missed.
    pub timeout: Duration,
    /// Consecutive missed pings before the agent is considered lost.
    pub misses: u32,
    /// vCPU time growth (nanoseconds per second of wall time, all vCPUs together) below which
    /// the guest counts as not advancing. Low by default: an idle guest still handles timer
    /// interrupts, a halted or stopped one shows exactly nothing.
    pub min_vcpu_ns_per_sec: u64,
}

/// A vCPU that did not advance but waited on the host's run queues for at least this share
/// (one in `STARVED_WAIT_SHARE`) of the time between two samples was starved, not stalled.
const STARVED_WAIT_SHARE: u64 = 4;

impl Default for HeartbeatConfig {
    fn default() -> Self {
        HeartbeatConfig {
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            misses: 3,
            min_vcpu_ns_per_sec: 10_000,
        }
    }
}

impl HeartbeatConfig {
    /// Checks the configuration.
    pub fn validate(&self) -> Result<(), HeartbeatError> {
        if self.interval.is_zero() {
            return Err(HeartbeatError::ZeroInterval);
        }
        if self.misses == 0 {
            return Err(HeartbeatError::ZeroMisses);
        }
        Ok(())
    }

    /// `W`: how long pings must fail, or vCPU time stand still, before it counts.
    fn window_ms(&self) -> u64 {
        (self.interval.as_millis() as u64).saturating_mul(u64::from(self.misses))
    }
}

/// Why a ping got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PingFailure {
    /// No reply within the timeout.
    Timeout,
    /// The agent channel is not connected.
    NotConnected,
    /// The transport failed otherwise.
    TransportError,
}

/// An observation fed to the tracker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeartbeatEvent {
    /// The agent answered a ping.
    PingOk {
        /// When.
        at: MonoMs,
    },
    /// A ping got no answer.
    PingFailed {
        /// When the failure was known.
        at: MonoMs,
        /// Why.
        failure: PingFailure,
    },
    /// Cumulative vCPU time, all vCPUs together.
    VcpuTime {
        /// When it was read.
        at: MonoMs,
        /// Nanoseconds run.
        total_ns: u64,
        /// Nanoseconds spent runnable, waiting for a host CPU.
        wait_ns: u64,
    },
    /// The agent channel connected (libvirt agent lifecycle event).
    AgentConnected {
        /// When.
        at: MonoMs,
    },
    /// The agent channel disconnected.
    AgentDisconnected {
        /// When.
        at: MonoMs,
    },
    /// A QEMU monitor call answered.
    MonitorResponsive {
        /// When.
        at: MonoMs,
    },
    /// A QEMU monitor call timed out.
    MonitorUnresponsive {
        /// When.
        at: MonoMs,
    },
}

/// What vCPU time says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuProgress {
    /// Not enough recent samples to tell.
    Unknown,
    /// Advanced within the window.
    Advancing {
        /// Last sample that showed progress.
        last_advance: MonoMs,
    },
    /// No progress for at least the window.
    Stalled {
        /// Last time progress was seen (or tracking started).
        since: MonoMs,
    },
    /// No progress, but the vCPUs waited for a host CPU within the window: the host starves
    /// the guest.
    Starved {
        /// Last sample that showed the wait.
        last_wait: MonoMs,
    },
}

/// What the QEMU monitor says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MonitorState {
    /// No report yet.
    Unknown,
    /// Last call answered.
    Responsive,
    /// Calls time out.
    Unresponsive {
        /// Since when.
        since: MonoMs,
    },
}

/// Agent channel state from lifecycle events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentLink {
    /// No lifecycle event yet.
    Unknown,
    /// Connected.
    Connected,
    /// Disconnected.
    Disconnected {
        /// Since when.
        since: MonoMs,
    },
}

/// Why the guest is degraded but not hung.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DegradedReason {
    /// Pings are lost but vCPUs advance: agent dead, or guest too busy to answer.
    AgentUnresponsive {
        /// Consecutive missed pings.
        missed: u32,
    },
    /// The agent channel is disconnected but vCPUs advance.
    AgentDisconnected {
        /// Since when.
        since: MonoMs,
    },
    /// The guest answers pings but QEMU's monitor does not.
    MonitorUnresponsive {
        /// Since when.
        since: MonoMs,
    },
    /// Pings are lost and vCPUs do not advance, but they wait for a host CPU: the host is
    /// overloaded, the guest is not hung.
    HostStarved {
        /// Consecutive missed pings.
        missed: u32,
    },
}

impl fmt::Display for DegradedReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DegradedReason::AgentUnresponsive { missed } => {
                write!(f, "guest agent missed {missed} pings while vCPU time advances (agent dead or guest saturated)")
            }
            DegradedReason::AgentDisconnected { since } => {
                write!(
                    f,
                    "guest agent disconnected at {} ms while vCPU time advances",
                    since.0
                )
            }
            DegradedReason::MonitorUnresponsive { since } => {
                write!(
                    f,
                    "QEMU monitor unresponsive since {} ms while the guest answers pings",
                    since.0
                )
            }
            DegradedReason::HostStarved { missed } => {
                write!(f, "guest agent missed {missed} pings while the vCPUs wait for a host CPU (host overloaded)")
            }
        }
    }
}

/// Why the guest is suspect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuspectReason {
    /// Some pings missed, fewer than the threshold.
    PingsMissed {
        /// Consecutive misses so far.
        missed: u32,
        /// Threshold.
        threshold: u32,
    },
    /// Pings are lost but there is no recent vCPU evidence either way.
    NoVcpuEvidence {
        /// Consecutive missed pings.
        missed: u32,
    },
}

impl fmt::Display for SuspectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SuspectReason::PingsMissed { missed, threshold } => {
                write!(f, "{missed} of {threshold} pings missed")
            }
            SuspectReason::NoVcpuEvidence { missed } => {
                write!(
                    f,
                    "pings lost ({missed} missed) and no recent vCPU time to tell busy from hung"
                )
            }
        }
    }
}

/// The facts behind a hung verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HungEvidence {
    /// Consecutive missed pings (0 if pings stopped being reported at all).
    pub missed_pings: u32,
    /// Milliseconds since the last answered ping (or since tracking started).
    pub silent_ms: u64,
    /// vCPU progress.
    pub vcpu: VcpuProgress,
    /// QEMU monitor state.
    pub monitor: MonitorState,
    /// Agent channel state.
    pub agent: AgentLink,
}

/// Health verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Nothing observed yet.
    Unknown,
    /// Pings answered.
    Healthy,
    /// Something is wrong, but the guest is running.
    Degraded {
        /// What.
        reason: DegradedReason,
    },
    /// Early signs of trouble, not conclusive.
    Suspect {
        /// What.
        reason: SuspectReason,
    },
    /// The guest is not running: pings lost and vCPUs stalled or QEMU unresponsive.
    Hung {
        /// First unanswered ping (or last answered one, if pings stopped being reported).
        since: MonoMs,
        /// Why.
        evidence: HungEvidence,
    },
}

/// Ping situation at an instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PingLevel {
    NoData,
    Ok,
    Missing(u32),
    Lost {
        missed: u32,
        since: MonoMs,
        silent_ms: u64,
    },
}

/// Feeds on [`HeartbeatEvent`]s and tells the [`Health`] at any instant.
#[derive(Debug, Clone)]
pub struct HeartbeatTracker {
    config: HeartbeatConfig,
    started: MonoMs,
    last_ping_ok: Option<MonoMs>,
    misses: u32,
    first_miss: Option<MonoMs>,
    /// Latest vCPU sample: when, run and run-queue wait nanoseconds.
    vcpu_last: Option<(MonoMs, u64, u64)>,
    /// Start of the current no-progress stretch (first sample, a reset, or the last advance
    /// or wait).
    vcpu_quiet_since: Option<MonoMs>,
    vcpu_last_advance: Option<MonoMs>,
    /// Last sample at which the vCPUs, not advancing, waited for a host CPU.
    vcpu_last_wait: Option<MonoMs>,
    agent: AgentLink,
    monitor: MonitorState,
}

impl HeartbeatTracker {
    /// A tracker starting at `now`.
    pub fn new(config: HeartbeatConfig, now: MonoMs) -> Result<Self, HeartbeatError> {
        config.validate()?;
        Ok(HeartbeatTracker {
            config,
            started: now,
            last_ping_ok: None,
            misses: 0,
            first_miss: None,
            vcpu_last: None,
            vcpu_quiet_since: None,
            vcpu_last_advance: None,
            vcpu_last_wait: None,
            agent: AgentLink::Unknown,
            monitor: MonitorState::Unknown,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &HeartbeatConfig {
        &self.config
    }

    /// Records an observation.
    pub fn observe(&mut self, event: HeartbeatEvent) {
        match event {
            HeartbeatEvent::PingOk { at } => {
                self.last_ping_ok = Some(self.last_ping_ok.map_or(at, |t| t.max(at)));
                self.misses = 0;
                self.first_miss = None;
            }
            HeartbeatEvent::PingFailed { at, .. } => {
                self.misses = self.misses.saturating_add(1);
                self.first_miss.get_or_insert(at);
            }
            HeartbeatEvent::VcpuTime {
                at,
                total_ns,
                wait_ns,
            } => self.observe_vcpu(at, total_ns, wait_ns),
            HeartbeatEvent::AgentConnected { .. } => self.agent = AgentLink::Connected,
            HeartbeatEvent::AgentDisconnected { at } => {
                if !matches!(self.agent, AgentLink::Disconnected { .. }) {
                    self.agent = AgentLink::Disconnected { since: at };
                }
            }
            HeartbeatEvent::MonitorResponsive { .. } => self.monitor = MonitorState::Responsive,
            HeartbeatEvent::MonitorUnresponsive { at } => {
                if !matches!(self.monitor, MonitorState::Unresponsive { .. }) {
                    self.monitor = MonitorState::Unresponsive { since: at };
                }
            }
        }
    }

    fn observe_vcpu(&mut self, at: MonoMs, total_ns: u64, wait_ns: u64) {
        let Some((prev_at, prev_ns, prev_wait)) = self.vcpu_last else {
            self.vcpu_last = Some((at, total_ns, wait_ns));
            self.vcpu_quiet_since = Some(at);
            return;
        };
        if at <= prev_at {
            return; // stale or duplicate sample
        }
        if total_ns < prev_ns || wait_ns < prev_wait {
            // A new QEMU process: progress unknown until it is measured again.
            self.vcpu_last = Some((at, total_ns, wait_ns));
            self.vcpu_quiet_since = Some(at);
            self.vcpu_last_advance = None;
            self.vcpu_last_wait = None;
            return;
        }
        let elapsed_ms = at.since(prev_at);
        let ns_per_sec = u128::from(total_ns - prev_ns) * 1000 / u128::from(elapsed_ms);
        if ns_per_sec >= u128::from(self.config.min_vcpu_ns_per_sec) {
            self.vcpu_last_advance = Some(at);
            self.vcpu_quiet_since = Some(at);
        } else if u128::from(wait_ns - prev_wait) * u128::from(STARVED_WAIT_SHARE)
            >= u128::from(elapsed_ms) * 1_000_000
        {
            self.vcpu_last_wait = Some(at);
            self.vcpu_quiet_since = Some(at);
        }
        self.vcpu_last = Some((at, total_ns, wait_ns));
    }

    /// vCPU progress as of `now`.
    pub fn vcpu_progress(&self, now: MonoMs) -> VcpuProgress {
        let w = self.config.window_ms();
        let (Some((last_at, _, _)), Some(quiet_since)) = (self.vcpu_last, self.vcpu_quiet_since)
        else {
            return VcpuProgress::Unknown;
        };
        // Samples older than the window say nothing about now.
        if now.since(last_at) > w {
            return VcpuProgress::Unknown;
        }
        if let Some(adv) = self.vcpu_last_advance.filter(|&a| last_at.since(a) < w) {
            return VcpuProgress::Advancing { last_advance: adv };
        }
        if let Some(last_wait) = self.vcpu_last_wait.filter(|&a| last_at.since(a) < w) {
            return VcpuProgress::Starved { last_wait };
        }
        if last_at.since(quiet_since) >= w {
            return VcpuProgress::Stalled { since: quiet_since };
        }
        VcpuProgress::Unknown
    }

    fn ping_level(&self, now: MonoMs) -> PingLevel {
        let reference = self.last_ping_ok.unwrap_or(self.started);
        let silent_ms = now.since(reference);
        let stale = silent_ms
            >= self
                .config
                .window_ms()
                .saturating_add(self.config.timeout.as_millis() as u64);
        if self.misses >= self.config.misses || stale {
            return PingLevel::Lost {
                missed: self.misses,
                since: self.first_miss.unwrap_or(reference),
                silent_ms,
            };
        }
        match (self.misses, self.last_ping_ok) {
            (0, None) => PingLevel::NoData,
            (0, Some(_)) => PingLevel::Ok,
            (k, _) => PingLevel::Missing(k),
        }
    }

    /// The verdict at `now`.
    pub fn health(&self, now: MonoMs) -> Health {
        let vcpu = self.vcpu_progress(now);
        match self.ping_level(now) {
            PingLevel::NoData => Health::Unknown,
            PingLevel::Ok => match self.monitor {
                MonitorState::Unresponsive { since } => Health::Degraded {
                    reason: DegradedReason::MonitorUnresponsive { since },
                },
                _ => Health::Healthy,
            },
            PingLevel::Missing(missed) => Health::Suspect {
                reason: SuspectReason::PingsMissed {
                    missed,
                    threshold: self.config.misses,
                },
            },
            PingLevel::Lost {
                missed,
                since,
                silent_ms,
            } => {
                let monitor_dead = matches!(self.monitor, MonitorState::Unresponsive { .. });
                match vcpu {
                    // Before the monitor: a starved QEMU answers its monitor late too.
                    VcpuProgress::Starved { .. } => {
                        return Health::Degraded {
                            reason: DegradedReason::HostStarved { missed },
                        };
                    }
                    VcpuProgress::Stalled { .. } => {}
                    _ if monitor_dead => {}
                    VcpuProgress::Advancing { .. } => {
                        let reason = match self.agent {
                            AgentLink::Disconnected { since } => {
                                DegradedReason::AgentDisconnected { since }
                            }
                            _ => DegradedReason::AgentUnresponsive { missed },
                        };
                        return Health::Degraded { reason };
                    }
                    VcpuProgress::Unknown => {
                        return Health::Suspect {
                            reason: SuspectReason::NoVcpuEvidence { missed },
                        };
                    }
                }
                Health::Hung {
                    since,
                    evidence: HungEvidence {
                        missed_pings: missed,
                        silent_ms,
                        vcpu,
                        monitor: self.monitor,
                        agent: self.agent,
                    },
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1000;

    fn cfg() -> HeartbeatConfig {
        // W = 3 s, stale after W + timeout = 4 s.
        HeartbeatConfig {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            misses: 3,
            min_vcpu_ns_per_sec: 10_000,
        }
    }

    fn t(ms: u64) -> MonoMs {
        MonoMs(ms)
    }

    fn tracker() -> HeartbeatTracker {
        HeartbeatTracker::new(cfg(), t(0)).unwrap()
    }

    fn ok(h: &mut HeartbeatTracker, at: u64) {
        h.observe(HeartbeatEvent::PingOk { at: t(at) });
    }

    fn miss(h: &mut HeartbeatTracker, at: u64) {
        h.observe(HeartbeatEvent::PingFailed {
            at: t(at),
            failure: PingFailure::Timeout,
        });
    }

    fn vcpu(h: &mut HeartbeatTracker, at: u64, ns: u64) {
        vcpu_waiting(h, at, ns, 0);
    }

    fn vcpu_waiting(h: &mut HeartbeatTracker, at: u64, ns: u64, wait_ns: u64) {
        h.observe(HeartbeatEvent::VcpuTime {
            at: t(at),
            total_ns: ns,
            wait_ns,
        });
    }

    /// vCPU samples every second from `from` to `to` (inclusive), growing `per_sec` ns/s.
    fn vcpu_run(h: &mut HeartbeatTracker, from: u64, to: u64, start_ns: u64, per_sec: u64) {
        let mut at = from;
        while at <= to {
            vcpu(h, at, start_ns + (at - from) / SEC * per_sec);
            at += SEC;
        }
    }

    #[test]
    fn config_is_validated() {
        let bad = HeartbeatConfig { misses: 0, ..cfg() };
        assert_eq!(
            HeartbeatTracker::new(bad, t(0)).unwrap_err(),
            HeartbeatError::ZeroMisses
        );
        let bad = HeartbeatConfig {
            interval: Duration::ZERO,
            ..cfg()
        };
        assert_eq!(
            HeartbeatTracker::new(bad, t(0)).unwrap_err(),
            HeartbeatError::ZeroInterval
        );
    }

    #[test]
    fn unknown_then_healthy() {
        let mut h = tracker();
        assert_eq!(h.health(t(500)), Health::Unknown);
        ok(&mut h, SEC);
        assert_eq!(h.health(t(SEC)), Health::Healthy);
    }

    #[test]
    fn a_few_misses_are_suspect_and_an_answer_heals() {
        let mut h = tracker();
        ok(&mut h, SEC);
        miss(&mut h, 2 * SEC);
        assert_eq!(
            h.health(t(2 * SEC)),
            Health::Suspect {
                reason: SuspectReason::PingsMissed {
                    missed: 1,
                    threshold: 3
                }
            }
        );
        miss(&mut h, 3 * SEC);
        assert!(matches!(
            h.health(t(3 * SEC)),
            Health::Suspect {
                reason: SuspectReason::PingsMissed { missed: 2, .. }
            }
        ));
        ok(&mut h, 4 * SEC);
        assert_eq!(h.health(t(4 * SEC)), Health::Healthy);
    }

    #[test]
    fn lost_pings_with_stalled_vcpus_is_hung() {
        let mut h = tracker();
        ok(&mut h, SEC);
        // Guest crashed at 1.5 s: vCPU time frozen from then on.
        vcpu_run(&mut h, 0, SEC, 0, 500_000_000);
        vcpu_run(&mut h, 2 * SEC, 6 * SEC, 500_000_000, 0);
        h.observe(HeartbeatEvent::MonitorResponsive { at: t(5 * SEC) });
        miss(&mut h, 2 * SEC);
        miss(&mut h, 3 * SEC);
        miss(&mut h, 4 * SEC);
        match h.health(t(6 * SEC)) {
            Health::Hung { since, evidence } => {
                assert_eq!(since, t(2 * SEC), "first unanswered ping");
                assert_eq!(evidence.missed_pings, 3);
                assert_eq!(evidence.silent_ms, 5 * SEC);
                assert_eq!(evidence.vcpu, VcpuProgress::Stalled { since: t(SEC) });
                assert_eq!(evidence.monitor, MonitorState::Responsive);
            }
            other => panic!("expected hung, got {other:?}"),
        }
        // Recovery: an answered ping makes it healthy again.
        ok(&mut h, 7 * SEC);
        assert_eq!(h.health(t(7 * SEC)), Health::Healthy);
    }

    #[test]
    fn lost_pings_with_unresponsive_monitor_is_hung_even_if_vcpus_advance() {
        let mut h = tracker();
        ok(&mut h, SEC);
        vcpu_run(&mut h, 0, 5 * SEC, 0, 800_000_000);
        h.observe(HeartbeatEvent::MonitorUnresponsive { at: t(3 * SEC) });
        for s in 2..=4 {
            miss(&mut h, s * SEC);
        }
        match h.health(t(5 * SEC)) {
            Health::Hung { evidence, .. } => {
                assert_eq!(
                    evidence.monitor,
                    MonitorState::Unresponsive { since: t(3 * SEC) }
                );
                assert!(matches!(evidence.vcpu, VcpuProgress::Advancing { .. }));
            }
            other => panic!("expected hung, got {other:?}"),
        }
    }

    #[test]
    fn saturated_guest_is_degraded_not_hung() {
        // Every vCPU busy: pings time out, but vCPU time grows at 4 cores' worth per second.
        let mut h = tracker();
        ok(&mut h, SEC);
        h.observe(HeartbeatEvent::MonitorResponsive { at: t(SEC) });
        vcpu_run(&mut h, 0, 10 * SEC, 0, 4_000_000_000);
        for s in 2..=10 {
            miss(&mut h, s * SEC);
        }
        assert_eq!(
            h.health(t(10 * SEC)),
            Health::Degraded {
                reason: DegradedReason::AgentUnresponsive { missed: 9 }
            }
        );
        // Load drops, the agent answers again.
        ok(&mut h, 11 * SEC);
        assert_eq!(h.health(t(11 * SEC)), Health::Healthy);
    }

    #[test]
    fn agent_only_death_is_degraded() {
        // qemu-ga killed in an idle guest: vCPU time grows slowly (timer interrupts only).
        let mut h = tracker();
        h.observe(HeartbeatEvent::AgentConnected { at: t(0) });
        ok(&mut h, SEC);
        h.observe(HeartbeatEvent::AgentDisconnected { at: t(1_500) });
        h.observe(HeartbeatEvent::MonitorResponsive { at: t(2 * SEC) });
        vcpu_run(&mut h, 0, 8 * SEC, 0, 50_000);
        for s in 2..=8 {
            h.observe(HeartbeatEvent::PingFailed {
                at: t(s * SEC),
                failure: PingFailure::NotConnected,
            });
        }
        assert_eq!(
            h.health(t(8 * SEC)),
            Health::Degraded {
                reason: DegradedReason::AgentDisconnected { since: t(1_500) }
            }
        );
        h.observe(HeartbeatEvent::AgentConnected { at: t(9 * SEC) });
        ok(&mut h, 9 * SEC);
        assert_eq!(h.health(t(9 * SEC)), Health::Healthy);
    }

    #[test]
    fn agent_disconnected_and_vcpus_stalled_is_hung() {
        let mut h = tracker();
        ok(&mut h, SEC);
        h.observe(HeartbeatEvent::AgentDisconnected { at: t(1_200) });
        vcpu_run(&mut h, SEC, 6 * SEC, 7_000, 0);
        // Pinger does not ping a disconnected agent: staleness alone makes pings lost.
        assert!(
            matches!(h.health(t(4 * SEC)), Health::Healthy),
            "still within W + timeout"
        );
        match h.health(t(6 * SEC)) {
            Health::Hung { since, evidence } => {
                assert_eq!(since, t(SEC), "last answered ping");
                assert_eq!(evidence.missed_pings, 0);
                assert_eq!(evidence.agent, AgentLink::Disconnected { since: t(1_200) });
            }
            other => panic!("expected hung, got {other:?}"),
        }
    }

    #[test]
    fn lost_pings_without_vcpu_evidence_is_suspect() {
        let mut h = tracker();
        ok(&mut h, SEC);
        for s in 2..=4 {
            miss(&mut h, s * SEC);
        }
        assert_eq!(
            h.health(t(4 * SEC)),
            Health::Suspect {
                reason: SuspectReason::NoVcpuEvidence { missed: 3 }
            }
        );
        // Old vCPU samples do not count as evidence.
        let mut h = tracker();
        ok(&mut h, SEC);
        vcpu_run(&mut h, 0, SEC, 0, 0);
        for s in 2..=10 {
            miss(&mut h, s * SEC);
        }
        assert_eq!(h.vcpu_progress(t(10 * SEC)), VcpuProgress::Unknown);
        assert!(matches!(h.health(t(10 * SEC)), Health::Suspect { .. }));
    }

    #[test]
    fn monitor_stuck_while_guest_answers_is_degraded() {
        let mut h = tracker();
        ok(&mut h, SEC);
        h.observe(HeartbeatEvent::MonitorUnresponsive { at: t(SEC) });
        h.observe(HeartbeatEvent::MonitorUnresponsive { at: t(2 * SEC) }); // keeps the first time
        ok(&mut h, 2 * SEC);
        assert_eq!(
            h.health(t(2 * SEC)),
            Health::Degraded {
                reason: DegradedReason::MonitorUnresponsive { since: t(SEC) }
            }
        );
        h.observe(HeartbeatEvent::MonitorResponsive { at: t(3 * SEC) });
        assert_eq!(h.health(t(3 * SEC)), Health::Healthy);
    }

    #[test]
    fn vcpu_progress_rules() {
        let mut h = tracker();
        assert_eq!(h.vcpu_progress(t(0)), VcpuProgress::Unknown);
        vcpu(&mut h, 0, 1_000);
        assert_eq!(
            h.vcpu_progress(t(0)),
            VcpuProgress::Unknown,
            "one sample says nothing"
        );
        vcpu(&mut h, SEC, 1_000 + 5_000);
        // 5 µs/s is below the 10 µs/s threshold: not progress.
        assert_eq!(h.vcpu_progress(t(SEC)), VcpuProgress::Unknown);
        vcpu(&mut h, 2 * SEC, 1_000 + 5_000 + 20_000);
        assert_eq!(
            h.vcpu_progress(t(2 * SEC)),
            VcpuProgress::Advancing {
                last_advance: t(2 * SEC)
            }
        );
        vcpu(&mut h, 5 * SEC, 26_000);
        assert_eq!(
            h.vcpu_progress(t(5 * SEC)),
            VcpuProgress::Stalled { since: t(2 * SEC) }
        );
        // Counter reset (new QEMU process): back to unknown, not advancing and not stalled.
        vcpu(&mut h, 6 * SEC, 10);
        assert_eq!(h.vcpu_progress(t(6 * SEC)), VcpuProgress::Unknown);
        // Out-of-order samples are ignored.
        vcpu(&mut h, 5 * SEC, 999_999_999);
        assert_eq!(h.vcpu_progress(t(6 * SEC)), VcpuProgress::Unknown);
    }

    #[test]
    fn vcpus_waiting_for_a_host_cpu_are_starved_not_hung_until_the_wait_stops() {
        // Found by the cluster fault soak: a primary booting beside other guests and a build on
        // two cores; its vCPU thread waited on the run queue for a window and it was failed
        // over as hung.
        let mut h = tracker();
        ok(&mut h, SEC);
        vcpu_waiting(&mut h, SEC, 500_000_000, 0);
        // From 2 s no run time, but the thread waits half of each second for a CPU.
        for s in 2..=6 {
            vcpu_waiting(&mut h, s * SEC, 500_000_000, (s - 1) * 500_000_000);
        }
        for s in 2..=5 {
            miss(&mut h, s * SEC);
        }
        h.observe(HeartbeatEvent::MonitorUnresponsive { at: t(5 * SEC) });
        assert_eq!(
            h.vcpu_progress(t(6 * SEC)),
            VcpuProgress::Starved {
                last_wait: t(6 * SEC)
            }
        );
        let starved = h.health(t(6 * SEC));
        assert_eq!(
            starved,
            Health::Degraded {
                reason: DegradedReason::HostStarved { missed: 4 }
            }
        );
        assert!(starved_label(starved).contains("host overloaded"));
        // Then the wait stops too (QEMU stopped): a window later it is hung.
        let wait_total = 5 * 500_000_000;
        for s in 7..=8 {
            vcpu_waiting(&mut h, s * SEC, 500_000_000, wait_total);
        }
        assert!(matches!(h.health(t(8 * SEC)), Health::Degraded { .. }));
        for s in 9..=10 {
            vcpu_waiting(&mut h, s * SEC, 500_000_000, wait_total);
        }
        match h.health(t(10 * SEC)) {
            Health::Hung { evidence, .. } => {
                assert_eq!(evidence.vcpu, VcpuProgress::Stalled { since: t(6 * SEC) });
            }
            other => panic!("expected hung, got {other:?}"),
        }
    }

    fn starved_label(h: Health) -> String {
        match h {
            Health::Degraded { reason } => reason.to_string(),
            other => format!("{other:?}"),
        }
    }

    #[test]
    fn a_short_run_queue_wait_does_not_veto_a_hang() {
        // Woken now and then (a timer) and waiting a little each time: under a quarter of the
        // time between samples is no starvation.
        let mut h = tracker();
        ok(&mut h, SEC);
        vcpu_waiting(&mut h, SEC, 500_000_000, 0);
        for s in 2..=6 {
            vcpu_waiting(&mut h, s * SEC, 500_000_000, (s - 1) * 200_000_000);
        }
        for s in 2..=4 {
            miss(&mut h, s * SEC);
        }
        assert!(
            matches!(h.health(t(6 * SEC)), Health::Hung { .. }),
            "{:?}",
            h.health(t(6 * SEC))
        );
        // A wait counter that goes back is a new process: nothing known.
        vcpu_waiting(&mut h, 7 * SEC, 600_000_000, 1);
        assert_eq!(h.vcpu_progress(t(7 * SEC)), VcpuProgress::Unknown);
    }

    #[test]
    fn pings_never_answered_become_lost_after_window_and_timeout() {
        let mut h = tracker();
        vcpu_run(&mut h, 0, 6 * SEC, 0, 0);
        assert_eq!(h.health(t(3 * SEC)), Health::Unknown);
        match h.health(t(6 * SEC)) {
            Health::Hung { since, evidence } => {
                assert_eq!(since, t(0), "tracking start");
                assert_eq!(evidence.silent_ms, 6 * SEC);
            }
            other => panic!("expected hung, got {other:?}"),
        }
    }

    #[test]
    fn reasons_render() {
        let r = DegradedReason::AgentUnresponsive { missed: 4 }.to_string();
        assert!(r.contains("saturated"), "{r}");
        let s = SuspectReason::PingsMissed {
            missed: 1,
            threshold: 3,
        }
        .to_string();
        assert_eq!(s, "1 of 3 pings missed");
    }
}
