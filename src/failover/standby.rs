//! Making a standing-by shadow cheaper in host memory: balloon it down to what the service
//! needs when idle before it is paused, and grow it back at promotion.
//!
//! A paused guest cannot inflate its balloon, so the shrink happens while the shadow still
//! runs (after its warm-up, before the pause), and waits until the guest has given the pages
//! up: QEMU then discards them, and the host gets them back. At promotion the `apply_profile`
//! step sizes the shadow from the profile's plan; without a plan it grows the balloon back to
//! the shadow's defined size ([`grow_back`]), so a shrunk shadow never serves small by
//! accident.

use std::time::{Duration, Instant};

use crate::domain_xml::DomainXml;
use crate::libvirt::{DomainStats, Hypervisor, LibvirtError};
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
    /// The guest reports the pages it frees to the host (`free_page_reporting`).
    pub free_page_reporting: bool,
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

/// Statistics once they carry the balloon's sizes and the guest's use, or `None` at the end of
/// [`STATS_WAIT`].
fn wait_stats(hv: &Hypervisor, shadow: &str) -> Option<DomainStats> {
    let deadline = Instant::now() + STATS_WAIT;
    loop {
        if let Ok(s) = hv.stats(shadow) {
            if s.balloon_current_kib.is_some() && measured_use_kib(&s).is_some() {
                return Some(s);
            }
        }
        if Instant::now() >= deadline {
            return None;
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
}
