//! Whether the primaries of other hosts answer on the service network, as this host's class
//! probes see them, and the rule that turns that into "a host cut off from the switch"
//! (README "Losing a host").
//!
//! A host cut off from the switch only keeps its daemon, its heartbeats over the management
//! network and its lease: nothing of [`super::liveness`] sees it. Its VMs still run and answer
//! on its own bridge, but no client reaches them. Every other host runs the class probe of
//! each primary it follows from its own network ([`Reach`]), and says in its heartbeats which
//! of them it has not reached for `unreachable_after`; the primary's own host says which of
//! its primaries its own probe reaches. A host is **cut** when, from here, none of its probed
//! primaries has answered for `unreachable_after`, and for one of them another host finds the
//! same while the primary's own host still reaches it: two vantage points on the switch agree,
//! and the service itself works. [`judge_cut`] says what to do about it: fence it through its
//! fence device, then move its services. Everything here is pure: the daemon's `hostloss`
//! task runs the probes and the fencing.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::liveness::{Judgement, LostHow};
use super::{LeaseStatus, Mode};

/// One primary elsewhere, as probed from here.
#[derive(Debug, Clone)]
struct Probe {
    host: String,
    domain: String,
    last_run: Option<Instant>,
    in_flight: bool,
    /// Since when every probe failed; `None`: the last one answered, or none ended yet.
    failing_since: Option<Instant>,
}

/// The probes of the primaries that run on other hosts, by service.
#[derive(Debug, Clone)]
pub struct Reach {
    after: Duration,
    probes: BTreeMap<String, Probe>,
}

/// The primary a probe was started for: its result counts only while it is still the one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeTicket {
    /// The service.
    pub service: String,
    /// Its primary's host.
    pub host: String,
    /// Its primary.
    pub domain: String,
}

impl Reach {
    /// Nothing probed yet; a primary is unreachable after failing for `after`.
    pub fn new(after: Duration) -> Self {
        Reach {
            after,
            probes: BTreeMap::new(),
        }
    }

    /// The primaries elsewhere with a probe, as `(service, host, domain)`: the others are
    /// forgotten, and a primary that moved (another host or domain) starts afresh.
    pub fn follow(&mut self, remote: impl IntoIterator<Item = (String, String, String)>) {
        let mut next = BTreeMap::new();
        for (service, host, domain) in remote {
            let probe = match self.probes.remove(&service) {
                Some(p) if p.host == host && p.domain == domain => p,
                _ => Probe {
                    host,
                    domain,
                    last_run: None,
                    in_flight: false,
                    failing_since: None,
                },
            };
            next.insert(service, probe);
        }
        self.probes = next;
    }

    /// Whether the probe of `service` is due (`interval` since its last run, none in flight);
    /// a due probe is marked in flight, and its ticket given back with the result.
    pub fn due(&mut self, service: &str, interval: Duration, now: Instant) -> Option<ProbeTicket> {
        let p = self.probes.get_mut(service)?;
        if p.in_flight
            || p.last_run
                .is_some_and(|t| now.saturating_duration_since(t) < interval)
        {
            return None;
        }
        p.in_flight = true;
        p.last_run = Some(now);
        Some(ProbeTicket {
            service: service.to_string(),
            host: p.host.clone(),
            domain: p.domain.clone(),
        })
    }

    /// A probe ended (`ok`: the service answered). Ignored when the primary changed since.
    pub fn done(&mut self, ticket: &ProbeTicket, ok: bool, now: Instant) {
        let Some(p) = self
            .probes
            .get_mut(&ticket.service)
            .filter(|p| p.host == ticket.host && p.domain == ticket.domain)
        else {
            return;
        };
        p.in_flight = false;
        if ok {
            p.failing_since = None;
        } else {
            p.failing_since.get_or_insert(now);
        }
    }

    fn failed(&self, p: &Probe, now: Instant) -> bool {
        p.failing_since
            .is_some_and(|t| now.saturating_duration_since(t) >= self.after)
    }

    /// The services whose primary elsewhere has not answered from here for `after`: what
    /// this host's heartbeats report as unreachable.
    pub fn unreachable(&self, now: Instant) -> Vec<String> {
        self.probes
            .iter()
            .filter(|(_, p)| self.failed(p, now))
            .map(|(s, _)| s.clone())
            .collect()
    }

    /// The hosts none of whose probed primaries has answered from here for `after`, each with
    /// those services.
    pub fn unreachable_hosts(&self, now: Instant) -> BTreeMap<String, Vec<String>> {
        let mut by_host: BTreeMap<String, (bool, Vec<String>)> = BTreeMap::new();
        for (service, p) in &self.probes {
            let (all, services) = by_host.entry(p.host.clone()).or_insert((true, Vec::new()));
            *all &= self.failed(p, now);
            services.push(service.clone());
        }
        by_host
            .into_iter()
            .filter(|(_, (all, _))| *all)
            .map(|(h, (_, s))| (h, s))
            .collect()
    }
}

/// What is known about a host whose primaries this host cannot reach, for [`judge_cut`].
#[derive(Debug, Clone, Copy)]
pub struct Cut {
    /// Another host finds one of its primaries unreachable too, while the host itself reaches
    /// it: the host's link to the switch is gone, not this host's, and not the service.
    pub confirmed: bool,
    /// A fence device is configured for it.
    pub fence_device: bool,
    /// Its fence device confirmed it off (for this incident).
    pub fenced: bool,
}

/// The rule for a host whose primaries this host cannot reach (`None`: it reaches them). Its
/// daemon runs and renews its lease, so it fences nothing itself: its services move only once
/// its fence device has powered it off. Without one they stay (an operator must fence it).
pub fn judge_cut(cut: Option<&Cut>, lease: &LeaseStatus) -> Judgement {
    let Some(c) = cut else {
        return Judgement::Alive;
    };
    if lease.mode != Mode::Connected {
        return Judgement::NotEligible("etcd unreachable from this host");
    }
    if c.fenced {
        return Judgement::Lost(LostHow::Fenced);
    }
    if !c.confirmed {
        return Judgement::NotEligible(
            "not confirmed: no other host finds it unreachable, or its own host does not reach its primaries either",
        );
    }
    if c.fence_device {
        Judgement::Fence
    } else {
        Judgement::NoSafeWay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AFTER: Duration = Duration::from_secs(2);
    const EVERY: Duration = Duration::from_millis(200);

    fn ms(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    fn remote(list: &[(&str, &str, &str)]) -> Vec<(String, String, String)> {
        list.iter()
            .map(|(s, h, d)| (s.to_string(), h.to_string(), d.to_string()))
            .collect()
    }

    /// Runs one probe of `service` at `at` with result `ok`.
    fn probe(r: &mut Reach, service: &str, at: Instant, ok: bool) {
        let t = r.due(service, EVERY, at).expect("probe due");
        r.done(&t, ok, at);
    }

    #[test]
    fn a_primary_is_unreachable_after_failing_for_the_whole_bound() {
        let t0 = Instant::now();
        let mut r = Reach::new(AFTER);
        r.follow(remote(&[("web", "h1", "web"), ("db", "h1", "db")]));
        probe(&mut r, "web", t0, true);
        probe(&mut r, "db", t0, false);
        // One in flight at a time, one per interval.
        let t = r.due("web", EVERY, ms(t0, 200)).unwrap();
        assert_eq!(r.due("web", EVERY, ms(t0, 500)), None);
        r.done(&t, false, ms(t0, 300));
        assert_eq!(r.due("web", EVERY, ms(t0, 350)), None);
        assert!(r.unreachable(ms(t0, 1999)).is_empty());
        assert_eq!(r.unreachable(ms(t0, 2000)), ["db"]);
        // web has failed only since 300 ms: h1 still has a primary that may answer.
        assert!(r.unreachable_hosts(ms(t0, 2000)).is_empty());
        assert_eq!(
            r.unreachable_hosts(ms(t0, 2300)),
            BTreeMap::from([("h1".to_string(), vec!["db".to_string(), "web".to_string()])])
        );
        // One answer clears it.
        probe(&mut r, "web", ms(t0, 2400), true);
        assert!(r.unreachable_hosts(ms(t0, 2500)).is_empty());
        assert_eq!(r.unreachable(ms(t0, 2500)), ["db"]);
    }

    #[test]
    fn a_primary_that_moved_starts_afresh_and_late_results_are_dropped() {
        let t0 = Instant::now();
        let mut r = Reach::new(AFTER);
        r.follow(remote(&[("web", "h1", "web")]));
        probe(&mut r, "web", t0, false);
        let late = r.due("web", EVERY, ms(t0, 200)).unwrap();
        assert_eq!(r.unreachable(ms(t0, 2000)), ["web"]);
        // Taken over by h2's shadow.
        r.follow(remote(&[("web", "h2", "web-shadow-1")]));
        assert!(r.unreachable(ms(t0, 2000)).is_empty());
        r.done(&late, false, ms(t0, 2100));
        assert!(r.unreachable(ms(t0, 5000)).is_empty());
        // A new probe of the new primary runs at once.
        assert!(r.due("web", EVERY, ms(t0, 2100)).is_some());
        // A service no longer followed (unprotected, or its primary now here) is forgotten.
        r.follow(Vec::new());
        assert_eq!(r.due("web", EVERY, ms(t0, 9000)), None);
        assert!(r.unreachable_hosts(ms(t0, 9000)).is_empty());
    }

    fn lease(mode: Mode) -> LeaseStatus {
        LeaseStatus {
            mode,
            since: Instant::now(),
            lease_id: Some(1),
            ttl: Duration::from_secs(2),
            last_ack_sent: Some(Instant::now()),
        }
    }

    #[test]
    fn a_cut_host_is_fenced_only_when_confirmed_and_moved_only_once_fenced() {
        let connected = lease(Mode::Connected);
        assert_eq!(judge_cut(None, &connected), Judgement::Alive);
        let c = Cut {
            confirmed: true,
            fence_device: true,
            fenced: false,
        };
        assert!(matches!(
            judge_cut(Some(&c), &lease(Mode::Unreachable)),
            Judgement::NotEligible(_)
        ));
        assert_eq!(judge_cut(Some(&c), &connected), Judgement::Fence);
        let unconfirmed = Cut {
            confirmed: false,
            ..c
        };
        assert!(matches!(
            judge_cut(Some(&unconfirmed), &connected),
            Judgement::NotEligible(_)
        ));
        // Once powered off, it stays lost although its heartbeats (and so the confirmation)
        // are gone.
        let fenced = Cut {
            fenced: true,
            ..unconfirmed
        };
        assert_eq!(
            judge_cut(Some(&fenced), &connected),
            Judgement::Lost(LostHow::Fenced)
        );
        // Its daemon renews its lease: without a device nothing makes it safe.
        let no_device = Cut {
            fence_device: false,
            ..c
        };
        assert_eq!(
            judge_cut(Some(&no_device), &connected),
            Judgement::NoSafeWay
        );
    }
}
