//! Health state of the active primaries, owned by [`HealthMonitor`]: one hang detector per
//! domain, the pings in flight, the QEMU pids read for vCPU time, the external probe of each
//! service, and the false and missed failover counts. No I/O happens here; the periodic checks
//! that feed it live in `checks`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::config::ClassConfig;
use crate::monitor::heartbeat::PingFailure;
use crate::monitor::{Health, HeartbeatConfig, HeartbeatEvent, HeartbeatTracker, MonoMs};

/// What [`HealthMonitor::judge`] concluded for a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Status label (`healthy`, `degraded: ...`, `hung: ...`).
    pub label: String,
    /// When the domain is hung: the instant the hang began (first unanswered ping).
    pub hung_since: Option<Instant>,
}

/// State of the external probe of one service.
#[derive(Debug, Default, Clone)]
struct ProbeState {
    last_run: Option<Instant>,
    /// The last answer, while the last probe answered (a failure clears it).
    last_ok: Option<Instant>,
    failing_since: Option<Instant>,
    counted: bool,
    in_flight: bool,
}

/// A missed failover: the service was unreachable past its detection bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MissedFailover {
    /// How long the probe has failed.
    pub unreachable: Duration,
}

/// Everything health knows, by primary domain (trackers, pids, pings, heartbeats) or by
/// service (probes).
#[derive(Debug)]
pub struct HealthMonitor {
    /// Origin of the monotonic clock the trackers use.
    origin: Instant,
    trackers: BTreeMap<String, HeartbeatTracker>,
    pids: BTreeMap<String, i32>,
    /// Domains with a ping in flight: no second ping is queued behind a stuck one.
    pinging: BTreeSet<String>,
    /// Last answered heartbeat per domain, Unix ms.
    beats: BTreeMap<String, u64>,
    probes: BTreeMap<String, ProbeState>,
    false_failovers: u64,
    missed_failovers: u64,
}

/// The hang detector's settings for a class.
pub fn heartbeat_config(class: &ClassConfig) -> HeartbeatConfig {
    HeartbeatConfig {
        interval: Duration::from_millis(class.heartbeat_interval_ms),
        timeout: Duration::from_millis(class.heartbeat_timeout_ms),
        misses: class.heartbeat_misses,
        ..HeartbeatConfig::default()
    }
}

/// How long a service may stay unreachable before the probe counts a missed failover: the
/// class's hang detection time plus 2 s for the promotion.
pub fn probe_bound(class: &ClassConfig) -> Duration {
    Duration::from_millis(
        class.heartbeat_interval_ms * u64::from(class.heartbeat_misses)
            + class.heartbeat_timeout_ms,
    ) + Duration::from_secs(2)
}

/// The status label of a verdict.
pub fn health_label(h: &Health) -> String {
    match h {
        Health::Unknown => "unknown".to_string(),
        Health::Healthy => "healthy".to_string(),
        Health::Degraded { reason } => format!("degraded: {reason}"),
        Health::Suspect { reason } => format!("suspect: {reason}"),
        Health::Hung { evidence, .. } => format!("hung: {evidence:?}"),
    }
}

impl HealthMonitor {
    /// Empty; its clock starts at `origin`.
    pub fn new(origin: Instant) -> Self {
        HealthMonitor {
            origin,
            trackers: BTreeMap::new(),
            pids: BTreeMap::new(),
            pinging: BTreeSet::new(),
            beats: BTreeMap::new(),
            probes: BTreeMap::new(),
            false_failovers: 0,
            missed_failovers: 0,
        }
    }

    /// Now on the trackers' clock.
    pub fn now(&self) -> MonoMs {
        self.at(Instant::now())
    }

    fn at(&self, t: Instant) -> MonoMs {
        MonoMs(t.saturating_duration_since(self.origin).as_millis() as u64)
    }

    /// Feeds one observation to the domain's tracker (created on first use).
    pub fn observe(&mut self, domain: &str, class: &ClassConfig, event: HeartbeatEvent) {
        let now = self.now();
        let tracker = self.trackers.entry(domain.to_string()).or_insert_with(|| {
            HeartbeatTracker::new(heartbeat_config(class), now).unwrap_or_else(|_| {
                HeartbeatTracker::new(HeartbeatConfig::default(), now)
                    .expect("default heartbeat config is valid")
            })
        });
        tracker.observe(event);
    }

    /// A ping's outcome: fed to the tracker, and an answer remembered for status.
    pub fn ping_done(
        &mut self,
        domain: &str,
        class: &ClassConfig,
        at: MonoMs,
        at_unix_ms: u64,
        ping: Result<(), PingFailure>,
    ) {
        match ping {
            Ok(()) => {
                self.observe(domain, class, HeartbeatEvent::PingOk { at });
                self.beats.insert(domain.to_string(), at_unix_ms);
            }
            Err(failure) => self.observe(domain, class, HeartbeatEvent::PingFailed { at, failure }),
        }
    }

    /// The verdict on `domain` now, if it is tracked.
    pub fn judge(&self, domain: &str) -> Option<Verdict> {
        self.judge_at(domain, Instant::now())
    }

    fn judge_at(&self, domain: &str, now: Instant) -> Option<Verdict> {
        let health = self.trackers.get(domain)?.health(self.at(now));
        let hung_since = match health {
            Health::Hung { since, .. } => {
                Some((self.origin + Duration::from_millis(since.0)).min(now))
            }
            _ => None,
        };
        Some(Verdict {
            label: health_label(&health),
            hung_since,
        })
    }

    /// Starts a ping of `domain` unless one is still in flight; true when the caller sends it.
    pub fn begin_ping(&mut self, domain: &str) -> bool {
        self.pinging.insert(domain.to_string())
    }

    /// The ping of `domain` is over (answered, failed, or given up by libvirt).
    pub fn end_ping(&mut self, domain: &str) {
        self.pinging.remove(domain);
    }

    /// `domain` is (again) a watched primary with QEMU `pid`: a fresh health history.
    pub fn watch(&mut self, domain: &str, pid: i32) {
        self.pids.insert(domain.to_string(), pid);
        self.trackers.remove(domain);
    }

    /// The QEMU pid of a watched primary.
    pub fn pid(&self, domain: &str) -> Option<i32> {
        self.pids.get(domain).copied()
    }

    /// Last answered heartbeat of each domain, Unix ms.
    pub fn beats(&self) -> &BTreeMap<String, u64> {
        &self.beats
    }

    /// Whether the probe of `service` is due (`interval` since its last run, none in flight);
    /// a due probe is marked in flight.
    pub fn probe_due(&mut self, service: &str, interval: Duration, now: Instant) -> bool {
        let st = self.probes.entry(service.to_string()).or_default();
        if st.in_flight
            || st
                .last_run
                .is_some_and(|t| now.saturating_duration_since(t) < interval)
        {
            return false;
        }
        st.in_flight = true;
        st.last_run = Some(now);
        true
    }

    /// The probe of `service` answered `ok` (or the service was failing over or stopped, when
    /// an unreachable service is expected: `acting`). A failure that lasts beyond `bound` is a
    /// missed failover, counted once per outage.
    pub fn probe_done(
        &mut self,
        service: &str,
        ok: bool,
        acting: bool,
        bound: Duration,
        now: Instant,
    ) -> Option<MissedFailover> {
        let st = self.probes.entry(service.to_string()).or_default();
        st.in_flight = false;
        st.last_ok = ok.then_some(now);
        if ok || acting {
            st.failing_since = None;
            st.counted = false;
            return None;
        }
        let since = *st.failing_since.get_or_insert(now);
        let unreachable = now.saturating_duration_since(since);
        if unreachable > bound && !st.counted {
            st.counted = true;
            self.missed_failovers += 1;
            return Some(MissedFailover { unreachable });
        }
        None
    }

    /// The services whose last probe, run here, answered, within `within`: what this host's
    /// heartbeats report as answering (the other hosts tell from it a host cut off the
    /// switch from a service that is down, so one failure is enough to stop saying so).
    pub fn answering(&self, within: Duration, now: Instant) -> Vec<String> {
        self.probes
            .iter()
            .filter(|(_, p)| {
                p.last_ok
                    .is_some_and(|t| now.saturating_duration_since(t) < within)
            })
            .map(|(s, _)| s.clone())
            .collect()
    }

    /// A primary fenced for a hang answered during the grace period: the failover was false.
    pub fn false_failover(&mut self) {
        self.false_failovers += 1;
    }

    /// False and missed failovers since start.
    pub fn counts(&self) -> (u64, u64) {
        (self.false_failovers, self.missed_failovers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class() -> ClassConfig {
        ClassConfig {
            heartbeat_interval_ms: 250,
            heartbeat_timeout_ms: 200,
            heartbeat_misses: 3,
            ..ClassConfig::default()
        }
    }

    #[test]
    fn answered_pings_are_healthy_and_remembered() {
        let origin = Instant::now();
        let mut h = HealthMonitor::new(origin);
        assert_eq!(h.judge("web"), None);
        h.ping_done("web", &class(), MonoMs(10), 1234, Ok(()));
        assert_eq!(h.judge("web").unwrap().label, "healthy");
        assert_eq!(h.beats().get("web"), Some(&1234));
    }

    #[test]
    fn lost_pings_and_stalled_vcpus_are_a_hang_that_began_at_the_first_miss() {
        let origin = Instant::now();
        let mut h = HealthMonitor::new(origin);
        let c = class();
        h.ping_done("web", &c, MonoMs(0), 1, Ok(()));
        for i in 0..6u64 {
            let at = MonoMs(250 * (i + 1));
            h.observe(
                "web",
                &c,
                HeartbeatEvent::VcpuTime {
                    at,
                    total_ns: 5_000_000,
                    wait_ns: 0,
                },
            );
            h.ping_done("web", &c, at, 0, Err(PingFailure::Timeout));
        }
        let v = h
            .judge_at("web", origin + Duration::from_millis(1600))
            .unwrap();
        assert!(v.label.starts_with("hung"), "{v:?}");
        let since = v.hung_since.unwrap();
        assert!(since <= origin + Duration::from_millis(1600));
        assert!(since >= origin + Duration::from_millis(250), "{since:?}");
    }

    #[test]
    fn lost_pings_while_vcpus_run_are_not_a_hang() {
        let origin = Instant::now();
        let mut h = HealthMonitor::new(origin);
        let c = class();
        h.ping_done("web", &c, MonoMs(0), 1, Ok(()));
        for i in 0..6u64 {
            let at = MonoMs(250 * (i + 1));
            h.observe(
                "web",
                &c,
                HeartbeatEvent::VcpuTime {
                    at,
                    total_ns: 5_000_000 + i * 200_000_000,
                    wait_ns: 0,
                },
            );
            h.ping_done("web", &c, at, 0, Err(PingFailure::Timeout));
        }
        let v = h
            .judge_at("web", origin + Duration::from_millis(1600))
            .unwrap();
        assert_eq!(v.hung_since, None, "{v:?}");
        assert!(v.label.starts_with("degraded"), "{v:?}");
    }

    #[test]
    fn one_ping_in_flight_per_domain() {
        let mut h = HealthMonitor::new(Instant::now());
        assert!(h.begin_ping("web"));
        assert!(!h.begin_ping("web"));
        assert!(h.begin_ping("db"));
        h.end_ping("web");
        assert!(h.begin_ping("web"));
    }

    #[test]
    fn watching_a_primary_again_forgets_its_history() {
        let mut h = HealthMonitor::new(Instant::now());
        h.ping_done("web", &class(), MonoMs(0), 1, Ok(()));
        h.watch("web", 42);
        assert_eq!(h.pid("web"), Some(42));
        assert_eq!(h.judge("web"), None);
    }

    #[test]
    fn probe_runs_at_its_interval_one_at_a_time() {
        let t0 = Instant::now();
        let mut h = HealthMonitor::new(t0);
        let every = Duration::from_secs(1);
        assert!(h.probe_due("web", every, t0));
        assert!(
            !h.probe_due("web", every, t0 + Duration::from_secs(5)),
            "in flight"
        );
        h.probe_done("web", true, false, Duration::from_secs(3), t0);
        assert!(!h.probe_due("web", every, t0 + Duration::from_millis(500)));
        assert!(h.probe_due("web", every, t0 + Duration::from_secs(1)));
    }

    #[test]
    fn a_service_answers_while_its_last_successful_probe_is_recent() {
        let t0 = Instant::now();
        let mut h = HealthMonitor::new(t0);
        let (bound, within) = (Duration::from_secs(3), Duration::from_secs(2));
        let s = |ms: u64| t0 + Duration::from_millis(ms);
        assert!(h.answering(within, t0).is_empty());
        h.probe_done("web", true, false, bound, s(0));
        h.probe_done("db", false, false, bound, s(0));
        assert_eq!(h.answering(within, s(1999)), ["web"]);
        assert!(h.answering(within, s(2000)).is_empty(), "no probe since");
        h.probe_done("web", true, false, bound, s(2100));
        assert_eq!(h.answering(within, s(2200)), ["web"]);
        // One failure and it no longer answers.
        h.probe_done("web", false, false, bound, s(2300));
        assert!(h.answering(within, s(2300)).is_empty());
    }

    #[test]
    fn a_missed_failover_is_counted_once_per_outage_and_not_while_acting() {
        let t0 = Instant::now();
        let mut h = HealthMonitor::new(t0);
        let bound = Duration::from_secs(3);
        let s = |x: u64| t0 + Duration::from_secs(x);
        assert_eq!(h.probe_done("web", false, false, bound, s(0)), None);
        assert_eq!(h.probe_done("web", false, false, bound, s(2)), None);
        assert_eq!(
            h.probe_done("web", false, false, bound, s(4)),
            Some(MissedFailover {
                unreachable: Duration::from_secs(4)
            })
        );
        assert_eq!(h.probe_done("web", false, false, bound, s(9)), None);
        // Recovered, then a failover in progress: expected to be unreachable.
        h.probe_done("web", true, false, bound, s(10));
        assert_eq!(h.probe_done("web", false, true, bound, s(11)), None);
        assert_eq!(h.probe_done("web", false, true, bound, s(20)), None);
        h.false_failover();
        assert_eq!(h.counts(), (1, 1));
    }

    #[test]
    fn probe_bound_is_detection_time_plus_two_seconds() {
        assert_eq!(
            probe_bound(&class()),
            Duration::from_millis(250 * 3 + 200 + 2000)
        );
    }
}
