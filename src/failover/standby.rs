//! Making a standing-by shadow cheaper in host memory: balloon it down to what the service
//! needs when idle before it is paused, and grow it back at promotion.
//!
//! A paused guest cannot inflate its balloon, so the shrink happens while the shadow still
//! runs (after its warm-up, before the pause), and waits until the guest has given the pages
//! up: QEMU then discards them, and the host gets them back. At promotion the `apply_profile`
//! step sizes the shadow from the profile's plan; without a plan it grows the balloon back to
//! the shadow's defined size ([`grow_back`]), so a shrunk shadow never serves small by
//! accident.
//!
//! Two more measures work on pages the guest has touched and no longer needs, which the
//! balloon alone does not reach (it takes free pages, and a freshly booted guest's free pages
//! are mostly ones it never touched, which cost the host nothing): [`reclaim`] has the guest
//! drop its page cache and compact its free memory, and with free page reporting the guest
//! then reports the freed blocks to QEMU, which gives them back; [`settle_reported`] waits for
//! that before the pause (a paused guest reports nothing).

use std::time::{Duration, Instant};

use crate::domain_xml::DomainXml;
use crate::libvirt::{DomainStats, Hypervisor, LibvirtError};
use crate::monitor::agent::{AgentError, AgentTransport, GuestAgent};
use crate::profile::manager::MEM_FLOOR_KIB;

use super::apply_profile::balloon_target;
use super::record::Tier;

/// How a new shadow's memory is made smaller before it stands by (class options).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StandbyMemory {
    /// Balloon the shadow down before pausing it (`standby_shrink`).
    pub shrink: bool,
    /// What the service uses when idle, KiB, per its profile; `None` while the profile cannot
    /// say: the shadow's own use after its warm-up is taken instead.
    pub idle_use_kib: Option<u64>,
    /// Have the guest drop its page cache and compact its free memory first
    /// (`standby_reclaim`).
    pub reclaim: bool,
    /// The guest reports the pages it frees to the host (`free_page_reporting`).
    pub free_page_reporting: bool,
    /// Its memory stays mergeable by the host's KSM (`ksm`).
    pub ksm: bool,
}

/// How long the guest may take to give up the pages the balloon asks for (TCG guests are slow).
const INFLATE_WAIT: Duration = Duration::from_secs(20);
/// How long to wait for the guest's first balloon statistics.
const STATS_WAIT: Duration = Duration::from_secs(5);
/// Close enough to the target: the guest driver works in pages and may stop a little short.
const TARGET_SLACK_KIB: u64 = 2048;

/// What a shrink did, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shrunk {
    /// Balloon size before, KiB.
    pub from_kib: u64,
    /// Target set, KiB.
    pub target_kib: u64,
    /// Balloon size reached when the wait ended, KiB.
    pub reached_kib: u64,
    /// The use the target was derived from, KiB, and where it came from.
    pub use_kib: u64,
    /// `profile` or `measured`.
    pub use_source: &'static str,
}

/// Why a shadow was not shrunk. Never fatal: the shadow stands by at full size.
#[derive(Debug, thiserror::Error)]
pub enum ShrinkError {
    /// The guest reports no balloon statistics, so its overhead and use are unknown.
    #[error("'{shadow}' reports no balloon statistics (a <memballoon> with <stats period>), so it cannot be sized")]
    NoStats {
        /// The shadow.
        shadow: String,
    },
    /// libvirt refused a call.
    #[error("'{shadow}': {what}")]
    Libvirt {
        /// The shadow.
        shadow: String,
        /// The call.
        what: &'static str,
        /// Why.
        #[source]
        source: Box<LibvirtError>,
    },
}

/// The guest's own use, KiB: MemTotal minus MemAvailable, from the balloon's statistics.
fn measured_use_kib(stats: &DomainStats) -> Option<u64> {
    Some(
        stats
            .balloon_available_kib?
            .saturating_sub(stats.balloon_usable_kib?),
    )
}

/// Whether `stats` were received after the second `since_unix_s` ended: the guest's use in
/// them is from after whatever ran before that second (a warm-up that just freed its memory).
/// Without a timestamp they cannot be shown fresh.
fn fresh(stats: &DomainStats, since_unix_s: u64) -> bool {
    stats
        .balloon_last_update_s
        .is_some_and(|t| t > since_unix_s)
}

/// Statistics that carry the balloon's sizes and the guest's use, received after this call
/// began (the guest sends them once per stats period: figures from before would still count
/// what a warm-up that just ended used); at the end of [`STATS_WAIT`], the last complete ones
/// (a stats period longer than that), or `None`.
fn wait_stats(hv: &Hypervisor, shadow: &str) -> Option<DomainStats> {
    let since = crate::clock::now_unix_ms() / 1000;
    let deadline = Instant::now() + STATS_WAIT;
    let mut complete = None;
    loop {
        if let Ok(s) = hv.stats(shadow) {
            if s.balloon_current_kib.is_some() && measured_use_kib(&s).is_some() {
                if fresh(&s, since) {
                    return Some(s);
                }
                complete = Some(s);
            }
        }
        if Instant::now() >= deadline {
            return complete;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Balloons the running `shadow` down to `idle_use_kib` (or its measured use) plus the free
/// reserve ([`super::apply_profile::GUEST_FREE_RESERVE_KIB`]) and the balloon's overhead, never
/// below [`MEM_FLOOR_KIB`] nor above its current size, and waits until the guest has given the
/// pages up. Blocking.
pub fn shrink(
    hv: &Hypervisor,
    shadow: &str,
    idle_use_kib: Option<u64>,
) -> Result<Shrunk, ShrinkError> {
    let lv = |what, source| ShrinkError::Libvirt {
        shadow: shadow.to_string(),
        what,
        source: Box::new(source),
    };
    let stats = wait_stats(hv, shadow).ok_or_else(|| ShrinkError::NoStats {
        shadow: shadow.to_string(),
    })?;
    let (_, cur_kib) = hv
        .live_resources(shadow)
        .map_err(|e| lv("read its size", e))?;
    let (use_kib, use_source) = match idle_use_kib {
        Some(u) => (u, "profile"),
        None => (measured_use_kib(&stats).unwrap_or(0), "measured"),
    };
    let target_kib = balloon_target(use_kib, cur_kib, Some(&stats))
        .kib
        .clamp(MEM_FLOOR_KIB.min(cur_kib), cur_kib);
    let mut shrunk = Shrunk {
        from_kib: cur_kib,
        target_kib,
        reached_kib: cur_kib,
        use_kib,
        use_source,
    };
    if target_kib + TARGET_SLACK_KIB >= cur_kib {
        return Ok(shrunk);
    }
    hv.set_memory_live(shadow, target_kib)
        .map_err(|e| lv("set its balloon", e))?;
    let deadline = Instant::now() + INFLATE_WAIT;
    loop {
        let (_, now_kib) = hv
            .live_resources(shadow)
            .map_err(|e| lv("read its size", e))?;
        shrunk.reached_kib = now_kib;
        if now_kib <= target_kib + TARGET_SLACK_KIB || Instant::now() >= deadline {
            return Ok(shrunk);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Grows a promoted shadow's balloon back to its defined size (`<currentMemory>` of its
/// persistent definition) when it runs below it; returns a note for the failover record when
/// it did something. Blocking.
pub fn grow_back(hv: &Hypervisor, shadow: &str) -> Option<String> {
    let defined = hv
        .xml(shadow, true)
        .ok()
        .and_then(|x| DomainXml::parse(&x).ok())
        .map(|d| d.memory_kib().current_kib)?;
    let (_, live) = hv.live_resources(shadow).ok()?;
    if live + TARGET_SLACK_KIB >= defined {
        return None;
    }
    Some(match hv.set_memory_live(shadow, defined) {
        Ok(()) => {
            format!("standby shrink undone: memory {live} -> {defined} KiB (its defined size)")
        }
        Err(e) => format!(
            "standby shrink NOT undone: memory stays {live} KiB: {}",
            crate::error::report(&e)
        ),
    })
}

/// What [`reclaim`] writes, in order: drop the clean page cache and reclaimable slab, then
/// compact free memory into large blocks (free page reporting reports only free blocks of at
/// least 2 MiB on x86). Linux sysctl files; the write to `compact_memory` returns when the
/// compaction is done.
pub const RECLAIM_WRITES: [(&str, &[u8]); 2] = [
    ("/proc/sys/vm/drop_caches", b"3\n"),
    ("/proc/sys/vm/compact_memory", b"1\n"),
];

/// One reclaim write the guest refused.
#[derive(Debug, thiserror::Error)]
#[error("'{shadow}': cannot write {path} in the guest")]
pub struct ReclaimError {
    /// The shadow.
    pub shadow: String,
    /// The guest file.
    pub path: &'static str,
    /// Why.
    #[source]
    pub source: AgentError,
}

/// Has the guest of `shadow` drop its page cache and compact its free memory through its
/// agent ([`RECLAIM_WRITES`]). Every write is tried; the errors are returned (never fatal: the
/// shadow then stands by with what it holds). Blocking.
pub fn reclaim<T: AgentTransport>(agent: &GuestAgent<T>, shadow: &str) -> Vec<ReclaimError> {
    RECLAIM_WRITES
        .iter()
        .filter_map(|&(path, data)| {
            agent
                .write_file(path, data, data.len())
                .err()
                .map(|source| ReclaimError {
                    shadow: shadow.to_string(),
                    path,
                    source,
                })
        })
        .collect()
}

/// How often [`settle_reported`] samples the QEMU process's RSS.
const SETTLE_SAMPLE: Duration = Duration::from_millis(500);
/// The window in which the RSS must have stopped falling: Linux reports freed pages 2 s after
/// the first free (`page_reporting_delay`), in batches.
const SETTLE_WINDOW: usize = 6;
/// Falling by less than this over the window counts as settled.
const SETTLE_SLACK_BYTES: u64 = 1 << 20;
/// The longest wait.
const SETTLE_MAX: Duration = Duration::from_secs(15);

/// Whether RSS `samples` (oldest first, one per [`SETTLE_SAMPLE`]) have stopped falling: the
/// last [`SETTLE_WINDOW`] intervals fell by less than [`SETTLE_SLACK_BYTES`].
fn rss_settled(samples: &[u64]) -> bool {
    samples.len() > SETTLE_WINDOW
        && samples[samples.len() - 1 - SETTLE_WINDOW].saturating_sub(samples[samples.len() - 1])
            < SETTLE_SLACK_BYTES
}

/// Waits, at most [`SETTLE_MAX`], until the running `shadow`'s QEMU process stops shrinking:
/// the guest has reported the pages it freed and QEMU has given them back. Returns the RSS at
/// the start and at the end, bytes, or `None` when its process cannot be read. Blocking.
pub fn settle_reported(shadow: &str) -> Option<(u64, u64)> {
    let run = std::path::Path::new(crate::libvirt::QEMU_RUN_DIR);
    let pid = crate::libvirt::qemu_pid(run, shadow).ok()?;
    let proc_root = std::path::Path::new("/proc");
    let deadline = Instant::now() + SETTLE_MAX;
    let mut samples = vec![crate::libvirt::rss_bytes(proc_root, pid).ok()?];
    while !rss_settled(&samples) && Instant::now() < deadline {
        std::thread::sleep(SETTLE_SAMPLE);
        samples.push(crate::libvirt::rss_bytes(proc_root, pid).ok()?);
    }
    Some((samples[0], *samples.last()?))
}

/// A class's `standby_tier`: one tier for good, or `adaptive` (the tier follows the predicted
/// busy hours, see [`adaptive_plan`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TierPolicy {
    /// Always paused.
    Paused,
    /// Always saved.
    Saved,
    /// Always cold.
    Cold,
    /// Paused while the service is predicted busy (and from `adaptive_lead_s` before), saved
    /// otherwise.
    Adaptive,
}

impl TierPolicy {
    /// The fixed tier, `None` for `adaptive`.
    pub fn fixed(self) -> Option<Tier> {
        match self {
            TierPolicy::Paused => Some(Tier::Paused),
            TierPolicy::Saved => Some(Tier::Saved),
            TierPolicy::Cold => Some(Tier::Cold),
            TierPolicy::Adaptive => None,
        }
    }
}

/// What the adaptive policy wants now, and its next planned change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TierPlan {
    /// The tier wanted now.
    pub tier: Tier,
    /// When the wanted tier changes next (Unix ms), within the next day.
    pub next_switch_unix_ms: Option<u64>,
    /// What it changes to then.
    pub next_tier: Option<Tier>,
}

/// Granularity of the adaptive plan.
const PLAN_STEP_MS: u64 = 60_000;
/// How far ahead the plan looks for its next change.
const PLAN_HORIZON_MS: u64 = 24 * 3_600_000;

/// The adaptive plan at `now_unix_ms`: paused at any instant from which a busy instant is at
/// most `lead_ms` ahead (the switch happens ahead of the busy time), saved otherwise. `busy`
/// is asked on a one-minute grid, `now` rounded down to the minute.
pub fn adaptive_plan(now_unix_ms: u64, lead_ms: u64, busy: impl Fn(u64) -> bool) -> TierPlan {
    let start = now_unix_ms - now_unix_ms % PLAN_STEP_MS;
    let lead_steps = lead_ms.div_ceil(PLAN_STEP_MS) as usize;
    let steps = (PLAN_HORIZON_MS / PLAN_STEP_MS) as usize;
    let grid: Vec<bool> = (0..=steps + lead_steps)
        .map(|i| busy(start + i as u64 * PLAN_STEP_MS))
        .collect();
    let wanted = |i: usize| {
        if grid[i..=i + lead_steps].iter().any(|b| *b) {
            Tier::Paused
        } else {
            Tier::Saved
        }
    };
    let tier = wanted(0);
    let next = (1..=steps).find(|&i| wanted(i) != tier);
    TierPlan {
        tier,
        next_switch_unix_ms: next.map(|i| start + i as u64 * PLAN_STEP_MS),
        next_tier: next.map(wanted),
    }
}

/// Whether `at_unix_ms` falls in one of the `[start, end)` UTC hour ranges.
pub fn in_busy_hours(busy_hours_utc: &[[u8; 2]], at_unix_ms: u64) -> bool {
    let hour = (at_unix_ms / 3_600_000 % 24) as u8;
    busy_hours_utc.iter().any(|[s, e]| (*s..*e).contains(&hour))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: u64 = 3_600_000;

    #[test]
    fn adaptive_is_paused_ahead_of_and_during_busy_hours_saved_otherwise() {
        let day = 20_000 * 24 * HOUR; // a midnight, UTC
        let busy = |t: u64| in_busy_hours(&[[10, 12]], t);
        let lead = 10 * 60_000;
        let p = adaptive_plan(day, lead, busy);
        assert_eq!(p.tier, Tier::Saved);
        assert_eq!(p.next_switch_unix_ms, Some(day + 10 * HOUR - lead));
        assert_eq!(p.next_tier, Some(Tier::Paused));
        let p = adaptive_plan(day + 10 * HOUR + 30 * 60_000, lead, busy);
        assert_eq!(p.tier, Tier::Paused);
        assert_eq!(p.next_switch_unix_ms, Some(day + 12 * HOUR));
        assert_eq!(p.next_tier, Some(Tier::Saved));
        // Never busy: saved, no switch planned.
        let p = adaptive_plan(day, lead, |_| false);
        assert_eq!((p.tier, p.next_switch_unix_ms), (Tier::Saved, None));
        assert!(in_busy_hours(&[[22, 24]], day + 23 * HOUR));
        assert!(!in_busy_hours(&[[22, 24]], day + 24 * HOUR));
    }

    /// A guest agent that accepts file writes, except to `refuse`, and records them.
    #[derive(Default)]
    struct Sysctls {
        written: std::sync::Mutex<Vec<(String, String)>>,
        refuse: &'static str,
    }

    impl AgentTransport for Sysctls {
        fn command(
            &self,
            json: &str,
            _: Duration,
        ) -> Result<String, crate::monitor::agent::AgentTransportError> {
            let v: serde_json::Value = serde_json::from_str(json).unwrap();
            let a = &v["arguments"];
            let mut w = self.written.lock().unwrap();
            let reply = match v["execute"].as_str().unwrap() {
                "guest-file-open" if a["path"] == self.refuse => serde_json::json!(
                    {"error": {"class": "GenericError", "desc": "Permission denied"}}
                ),
                "guest-file-open" => {
                    w.push((a["path"].as_str().unwrap().to_string(), String::new()));
                    serde_json::json!({"return": w.len()})
                }
                "guest-file-write" => {
                    let data =
                        crate::monitor::base64::decode(a["buf-b64"].as_str().unwrap()).unwrap();
                    let i = a["handle"].as_u64().unwrap() as usize - 1;
                    w[i].1.push_str(std::str::from_utf8(&data).unwrap());
                    serde_json::json!({"return": {"count": data.len(), "eof": false}})
                }
                "guest-file-close" => serde_json::json!({"return": {}}),
                other => panic!("unexpected {other}"),
            };
            Ok(reply.to_string())
        }
    }

    #[test]
    fn reclaim_drops_caches_then_compacts_and_names_what_failed() {
        let guest = Sysctls::default();
        let agent = GuestAgent::new(&guest, crate::monitor::agent::AgentOptions::default());
        assert!(reclaim(&agent, "s").is_empty());
        assert_eq!(
            *guest.written.lock().unwrap(),
            [
                ("/proc/sys/vm/drop_caches".to_string(), "3\n".to_string()),
                ("/proc/sys/vm/compact_memory".to_string(), "1\n".to_string())
            ]
        );
        let guest = Sysctls {
            refuse: "/proc/sys/vm/drop_caches",
            ..Sysctls::default()
        };
        let agent = GuestAgent::new(&guest, crate::monitor::agent::AgentOptions::default());
        let errors = reclaim(&agent, "web-shadow-1");
        assert_eq!(errors.len(), 1);
        let e = crate::error::report(&errors[0]);
        assert!(
            e.contains("web-shadow-1") && e.contains("/proc/sys/vm/drop_caches"),
            "{e}"
        );
        assert_eq!(
            guest.written.lock().unwrap().len(),
            1,
            "compaction is still asked for"
        );
    }

    #[test]
    fn rss_is_settled_once_it_stops_falling_over_the_window() {
        const MIB: u64 = 1 << 20;
        let falling: Vec<u64> = (0..10).map(|i| (200 - 4 * i) * MIB).collect();
        assert!(!rss_settled(&falling));
        assert!(!rss_settled(&[100 * MIB; SETTLE_WINDOW]), "too few samples");
        assert!(rss_settled(&[100 * MIB; SETTLE_WINDOW + 1]));
        let mut then_flat = falling.clone();
        then_flat.extend([164 * MIB; SETTLE_WINDOW]);
        assert!(rss_settled(&then_flat));
        // Growing (the guest touching pages) is not falling.
        let growing: Vec<u64> = (0..8).map(|i| (100 + i) * MIB).collect();
        assert!(rss_settled(&growing));
    }

    #[test]
    fn measured_use_is_total_minus_available() {
        let s = DomainStats {
            balloon_available_kib: Some(150_000),
            balloon_usable_kib: Some(110_000),
            ..Default::default()
        };
        assert_eq!(measured_use_kib(&s), Some(40_000));
        assert_eq!(measured_use_kib(&DomainStats::default()), None);
    }

    #[test]
    fn stats_are_fresh_only_when_received_after_the_second_the_wait_began() {
        let at = |t| DomainStats {
            balloon_last_update_s: Some(t),
            ..Default::default()
        };
        assert!(
            !fresh(&at(1_000), 1_000),
            "the same second may be before the warm-up ended"
        );
        assert!(!fresh(&at(999), 1_000));
        assert!(fresh(&at(1_001), 1_000));
        assert!(
            !fresh(&DomainStats::default(), 1_000),
            "no timestamp, not shown fresh"
        );
    }
}
