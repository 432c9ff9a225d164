//! What the daemon does, as it happens: typed events (protection, shadows, failovers and their
//! steps, fencing, drift, profile versions, configuration reloads) in a journal bounded in count
//! and age, so that `understudy events` shows the recent past and `--follow` what comes next.
//!
//! [`EventLog`] owns the journal. [`EventLog::emit`] numbers each event; a follower gets the
//! backlog and a live feed from one [`EventLog::subscribe`] call, with no gap and no duplicate
//! between them.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::failover::StepTiming;

/// Events kept at most.
pub const MAX_EVENTS: usize = 2000;
/// Events older than this are dropped (one hour).
pub const MAX_AGE_MS: u64 = 3_600_000;
/// Live events a slow follower may fall behind by before it is told it lost some.
const FOLLOW_BUFFER: usize = 1024;

/// One thing that happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Position in the journal, from 1, never reused while the daemon runs.
    pub seq: u64,
    /// When, in Unix ms.
    pub at_unix_ms: u64,
    /// The service concerned, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// What happened, serialized with a snake_case `kind` tag next to its fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventKind {
    /// A domain became the primary of a protected service.
    Protected {
        /// The primary domain.
        domain: String,
        /// Its protection class.
        class: String,
    },
    /// A shadow is booted, paused and ready to take over.
    ShadowReady {
        /// The shadow domain.
        shadow: String,
    },
    /// A shadow could not be provisioned.
    ShadowFailed {
        /// The shadow domain.
        shadow: String,
        /// Why.
        error: String,
    },
    /// A failover began.
    FailoverStarted {
        /// The primary being replaced.
        from: String,
        /// The shadow being promoted.
        to: String,
        /// What set it off (`pidfd`, `lifecycle`, `heartbeat`, `manual`, `recovery`).
        trigger: String,
    },
    /// One step of a failover's promotion pipeline finished.
    FailoverStep {
        /// The shadow being promoted.
        to: String,
        /// The step (`fence`, `resume`, `rewire`, ...).
        step: String,
        /// Milliseconds from detection to the step's start, when known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        start_ms: Option<f64>,
        /// How long it took, in ms.
        ms: f64,
    },
    /// A failover ended.
    FailoverFinished {
        /// The replaced primary.
        from: String,
        /// The promoted shadow.
        to: String,
        /// Whether the shadow now serves.
        ok: bool,
        /// Detection to traffic restored, in ms.
        outage_ms: f64,
        /// Why it failed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// A primary was fenced off (cut from its bridge, paused, or destroyed).
    Fenced {
        /// The fenced domain.
        domain: String,
        /// What was done to it.
        action: String,
    },
    /// A heartbeat-fenced primary answered during its grace period: the failover was false.
    FalseFailover {
        /// The fenced primary.
        domain: String,
    },
    /// The service's primary drifted from its profile.
    Drift {
        /// `coverage_drop`, `level_shift`, `new_dependency` or `config_change`.
        drift: String,
        /// What drifted.
        detail: String,
    },
    /// A profile version was stored.
    ProfileVersion {
        /// Its number.
        version: u64,
        /// Why (`initial`, `scheduled`, `drift: ...`, `manual`, `rollback to N`).
        reason: String,
    },
    /// An operator stopped the service (never a failover).
    Stopped {
        /// The stopped primary.
        domain: String,
    },
    /// An operator started the service again.
    Started {
        /// The started primary.
        domain: String,
    },
    /// A canary or a standby verification moved on (`canary_started`, `canary_finished`,
    /// `canary_failed`, `canary_aborted`, `canary_promoted`, `verify_passed`, `verify_failed`).
    Replay {
        /// What happened.
        what: String,
        /// Details: the verdict, the differing requests, the error.
        detail: String,
    },
    /// Another host was found lost and made safe (its fence device powered it off, or its
    /// lease expired), or fencing it failed.
    HostFenced {
        /// The lost host.
        host: String,
        /// `fence_device` or `lease_expired`.
        how: String,
        /// Whether it is confirmed fenced.
        ok: bool,
        /// Timings, or why it failed.
        detail: String,
    },
    /// The configuration file was read again.
    ConfigReloaded {
        /// Whether the new configuration is in force.
        ok: bool,
        /// Why it was refused (the old one stays).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
}

impl EventKind {
    /// The serialized `kind` tag.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::Protected { .. } => "protected",
            EventKind::ShadowReady { .. } => "shadow_ready",
            EventKind::ShadowFailed { .. } => "shadow_failed",
            EventKind::FailoverStarted { .. } => "failover_started",
            EventKind::FailoverStep { .. } => "failover_step",
            EventKind::FailoverFinished { .. } => "failover_finished",
            EventKind::Fenced { .. } => "fenced",
            EventKind::FalseFailover { .. } => "false_failover",
            EventKind::Drift { .. } => "drift",
            EventKind::ProfileVersion { .. } => "profile_version",
            EventKind::Stopped { .. } => "stopped",
            EventKind::Started { .. } => "started",
            EventKind::HostFenced { .. } => "host_fenced",
            EventKind::ConfigReloaded { .. } => "config_reloaded",
            EventKind::Replay { .. } => "replay",
        }
    }

    /// The step events of a finished failover's record, in pipeline order.
    pub fn steps(to: &str, steps: &[StepTiming]) -> Vec<EventKind> {
        steps
            .iter()
            .map(|s| EventKind::FailoverStep {
                to: to.to_string(),
                step: s.name.clone(),
                start_ms: s.start_ms,
                ms: s.ms,
            })
            .collect()
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.name();
        match self {
            EventKind::Protected { domain, class } => write!(f, "{name} {domain} (class {class})"),
            EventKind::ShadowReady { shadow } => write!(f, "{name} {shadow}"),
            EventKind::ShadowFailed { shadow, error } => write!(f, "{name} {shadow}: {error}"),
            EventKind::FailoverStarted { from, to, trigger } => {
                write!(f, "{name} {from} -> {to} (trigger {trigger})")
            }
            EventKind::FailoverStep {
                to,
                step,
                start_ms,
                ms,
            } => match start_ms {
                Some(s) => write!(f, "{name} {to} {step} {ms:.1} ms (at +{s:.1} ms)"),
                None => write!(f, "{name} {to} {step} {ms:.1} ms"),
            },
            EventKind::FailoverFinished {
                from,
                to,
                ok,
                outage_ms,
                error,
            } => {
                write!(
                    f,
                    "{name} {from} -> {to} {} outage {outage_ms:.1} ms",
                    if *ok { "ok" } else { "FAILED" }
                )?;
                match error {
                    Some(e) => write!(f, ": {e}"),
                    None => Ok(()),
                }
            }
            EventKind::Fenced { domain, action } => write!(f, "{name} {domain}: {action}"),
            EventKind::FalseFailover { domain } => {
                write!(f, "{name}: {domain} answered while fenced")
            }
            EventKind::Drift { drift, detail } => write!(f, "{name} {drift}: {detail}"),
            EventKind::Replay { what, detail } => write!(f, "{what}: {detail}"),
            EventKind::ProfileVersion { version, reason } => {
                write!(f, "{name} v{version} ({reason})")
            }
            EventKind::Stopped { domain } | EventKind::Started { domain } => {
                write!(f, "{name} {domain}")
            }
            EventKind::HostFenced {
                host,
                how,
                ok,
                detail,
            } => write!(
                f,
                "{name} {host} ({how}){}: {detail}",
                if *ok { "" } else { " FAILED" }
            ),
            EventKind::ConfigReloaded { ok: true, .. } => write!(f, "{name}"),
            EventKind::ConfigReloaded { error, .. } => write!(
                f,
                "{name} REFUSED, the old configuration stays: {}",
                error.as_deref().unwrap_or("")
            ),
        }
    }
}

impl fmt::Display for Event {
    /// `2026-12-01 15:20:01.123 UTC  #42  web1  failover_step web1-shadow-2 resume 4.2 ms`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}  #{}  {}  {}",
            format_unix_ms(self.at_unix_ms),
            self.seq,
            self.service.as_deref().unwrap_or("-"),
            self.kind
        )
    }
}

/// `YYYY-MM-DD HH:MM:SS.mmm UTC` of a Unix time in ms.
pub fn format_unix_ms(ms: u64) -> String {
    crate::profile::manager::format_unix_ms(ms).replace(" UTC", &format!(".{:03} UTC", ms % 1000))
}

struct Journal {
    events: VecDeque<Event>,
    next_seq: u64,
}

/// The daemon's event journal; cheap to clone, shared by every producer and follower.
#[derive(Clone)]
pub struct EventLog {
    journal: Arc<Mutex<Journal>>,
    live: broadcast::Sender<Event>,
    max_events: usize,
    max_age_ms: u64,
}

impl fmt::Debug for EventLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventLog")
            .field("max_events", &self.max_events)
            .field("max_age_ms", &self.max_age_ms)
            .finish()
    }
}

impl Default for EventLog {
    fn default() -> Self {
        Self::new()
    }
}

impl EventLog {
    /// A journal of at most [`MAX_EVENTS`] events no older than [`MAX_AGE_MS`].
    pub fn new() -> Self {
        Self::with_bounds(MAX_EVENTS, MAX_AGE_MS)
    }

    /// A journal with other bounds (tests).
    pub fn with_bounds(max_events: usize, max_age_ms: u64) -> Self {
        EventLog {
            journal: Arc::new(Mutex::new(Journal {
                events: VecDeque::new(),
                next_seq: 1,
            })),
            live: broadcast::channel(FOLLOW_BUFFER).0,
            max_events: max_events.max(1),
            max_age_ms,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Journal> {
        self.journal.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records an event now; returns it as recorded.
    pub fn emit(&self, service: Option<&str>, kind: EventKind) -> Event {
        self.emit_at(crate::clock::now_unix_ms(), service, kind)
    }

    /// Records an event with its time given (tests, replays).
    pub fn emit_at(&self, at_unix_ms: u64, service: Option<&str>, kind: EventKind) -> Event {
        let mut j = self.lock();
        let event = Event {
            seq: j.next_seq,
            at_unix_ms,
            service: service.map(str::to_string),
            kind,
        };
        j.next_seq += 1;
        tracing::debug!(event = %event, "event");
        j.events.push_back(event.clone());
        self.prune(&mut j, at_unix_ms);
        // Sent under the lock, so that `subscribe` sees each event exactly once: in the
        // backlog or on the feed. No follower is not an error.
        let _ = self.live.send(event.clone());
        event
    }

    fn prune(&self, j: &mut Journal, now_unix_ms: u64) {
        while j.events.len() > self.max_events {
            j.events.pop_front();
        }
        while j
            .events
            .front()
            .is_some_and(|e| now_unix_ms.saturating_sub(e.at_unix_ms) > self.max_age_ms)
        {
            j.events.pop_front();
        }
    }

    /// The events kept now, oldest first.
    pub fn recent(&self) -> Vec<Event> {
        let mut j = self.lock();
        self.prune(&mut j, crate::clock::now_unix_ms());
        j.events.iter().cloned().collect()
    }

    /// The events kept now and a feed of every later one.
    pub fn subscribe(&self) -> (Vec<Event>, broadcast::Receiver<Event>) {
        let mut j = self.lock();
        self.prune(&mut j, crate::clock::now_unix_ms());
        let rx = self.live.subscribe();
        (j.events.iter().cloned().collect(), rx)
    }
}

/// Whether `event` passes a follower's service filter.
pub fn matches(event: &Event, service: Option<&str>) -> bool {
    service.is_none_or(|s| event.service.as_deref() == Some(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(name: &str, start: f64, ms: f64) -> StepTiming {
        StepTiming {
            name: name.into(),
            ms,
            start_ms: Some(start),
        }
    }

    #[test]
    fn numbered_bounded_in_count_and_age() {
        let log = EventLog::with_bounds(3, 1000);
        for i in 0..5u64 {
            let e = log.emit_at(
                10_000 + i,
                Some("web"),
                EventKind::ShadowReady {
                    shadow: format!("web-shadow-{i}"),
                },
            );
            assert_eq!(e.seq, i + 1);
        }
        let (kept, _) = {
            let j = log.lock();
            (j.events.iter().map(|e| e.seq).collect::<Vec<_>>(), ())
        };
        assert_eq!(kept, [3, 4, 5]);
        // An event 2 s later ages out everything before it.
        log.emit_at(
            12_005,
            None,
            EventKind::ConfigReloaded {
                ok: true,
                error: None,
            },
        );
        let seqs: Vec<u64> = log.lock().events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [6]);
    }

    #[tokio::test]
    async fn subscribe_gives_backlog_then_live_without_gap_or_duplicate() {
        let log = EventLog::new();
        log.emit(
            Some("web"),
            EventKind::Stopped {
                domain: "web".into(),
            },
        );
        let (backlog, mut rx) = log.subscribe();
        log.emit(
            Some("web"),
            EventKind::Started {
                domain: "web".into(),
            },
        );
        assert_eq!(backlog.len(), 1);
        assert_eq!(backlog[0].seq, 1);
        let next = rx.recv().await.unwrap();
        assert_eq!(next.seq, 2);
        assert_eq!(next.kind.name(), "started");
    }

    #[test]
    fn json_is_flat_with_a_kind_tag_and_round_trips() {
        let e = Event {
            seq: 7,
            at_unix_ms: 1_764_601_201_123,
            service: Some("web1".into()),
            kind: EventKind::steps("web1-shadow-2", &[step("resume", 3.5, 4.25)])
                .pop()
                .unwrap(),
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["kind"], "failover_step");
        assert_eq!(v["step"], "resume");
        assert_eq!(v["service"], "web1");
        assert_eq!(v["ms"], 4.25);
        let back: Event = serde_json::from_value(v).unwrap();
        assert_eq!(back, e);
        assert_eq!(
            e.to_string(),
            "2025-12-01 15:00:01.123 UTC  #7  web1  failover_step web1-shadow-2 resume 4.2 ms (at +3.5 ms)"
        );
        // Unknown kinds are errors, not silently something else.
        assert!(
            serde_json::from_str::<Event>(r#"{"seq":1,"at_unix_ms":0,"kind":"exploded"}"#).is_err()
        );
    }

    #[test]
    fn service_filter() {
        let log = EventLog::new();
        let a = log.emit(Some("a"), EventKind::Stopped { domain: "a".into() });
        let r = log.emit(
            None,
            EventKind::ConfigReloaded {
                ok: true,
                error: None,
            },
        );
        assert!(matches(&a, Some("a")) && matches(&a, None));
        assert!(!matches(&a, Some("b")) && !matches(&r, Some("a")));
    }
}
