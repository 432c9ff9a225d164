//! The `adaptive` standby tier: which tier a service's shadows should be in now (from its
//! profile's predicted busy hours and the class's `busy_hours_utc`), and the switches that
//! move them there ahead of each change. The table owns the shadows' states
//! ([`super::ServiceTable::begin_tier_switch`], [`super::ServiceTable::tier_switched`]); this
//! module decides and carries the switches out.

use crate::config::ClassConfig;
use crate::domain_xml::{MemberState, Role};
use crate::failover::record::Tier;
use crate::failover::shadow::{isolate_tap, live_taps, member_meta, shadow_generation, write_meta};
use crate::failover::standby::{adaptive_plan, in_busy_hours, TierPlan, TierPolicy};
use crate::failover::{FailoverError, ShadowState, TapBinding};
use crate::profile::manager::OPEN_LIMITS;

use super::{ServiceState, Shared};

/// Test hook: a file holding the Unix ms the adaptive policy takes as "now", so a test can
/// drive the profile's clock through busy and idle hours. Unset (or unreadable): the real
/// clock.
pub const PROFILE_CLOCK_FILE_ENV: &str = "UNDERSTUDY_PROFILE_CLOCK_FILE";

/// A profile counts an hour busy when its predicted CPU limit is at least this share of its
/// highest over the coming day.
const BUSY_SHARE_OF_PEAK: f64 = 0.5;

const HOUR_MS: u64 = 3_600_000;

/// "Now" for the adaptive policy (see [`PROFILE_CLOCK_FILE_ENV`]).
pub(super) fn policy_now() -> u64 {
    std::env::var_os(PROFILE_CLOCK_FILE_ENV)
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or_else(crate::clock::now_unix_ms)
}

/// The adaptive plan of `service` now; `None` for a class with a fixed tier.
pub(super) fn plan(d: &Shared, service: &str, class: &ClassConfig) -> Option<TierPlan> {
    if class.standby_tier != TierPolicy::Adaptive {
        return None;
    }
    let now = policy_now();
    let start = now - now % HOUR_MS;
    // The profile's CPU forecast per hour over the horizon; empty while it is too young.
    let forecast: Vec<f64> = d
        .prof
        .manager()
        .map(|m| {
            (0..27)
                .map_while(|h| m.resource_plan(service, start + h * HOUR_MS, OPEN_LIMITS))
                .map(|p| p.cpu.limit)
                .filter(|l| l.is_finite())
                .collect()
        })
        .unwrap_or_default();
    let peak = forecast.iter().copied().fold(0.0, f64::max);
    let profile_busy = |t: u64| {
        let h = (t.saturating_sub(start) / HOUR_MS) as usize;
        peak > 0.0
            && forecast
                .get(h)
                .is_some_and(|l| *l >= BUSY_SHARE_OF_PEAK * peak)
    };
    Some(adaptive_plan(now, class.adaptive_lead_s * 1000, |t| {
        in_busy_hours(&class.busy_hours_utc, t) || profile_busy(t)
    }))
}

/// The tier a new shadow of `service` is made in.
pub(super) fn provision_tier(d: &Shared, service: &str, class: &ClassConfig) -> Tier {
    class
        .standby_tier
        .fixed()
        .or_else(|| plan(d, service, class).map(|p| p.tier))
        .unwrap_or(Tier::Paused)
}

/// Starts the switches adaptive services need now: each shadow standing by paused or saved
/// that the plan wants in the other tier. Called every housekeeping round.
pub(super) fn switch_tiers(d: &Shared) {
    // Per service: its name, class, and the shadows that could switch with their tiers.
    type Candidates = (String, String, Vec<(String, Tier)>);
    let services: Vec<Candidates> = d
        .table()
        .iter()
        .filter(|s| {
            matches!(
                s.state,
                ServiceState::Protected | ServiceState::Provisioning
            )
        })
        .map(|s| {
            let shadows = s
                .shadows
                .iter()
                .filter_map(|x| match x.state {
                    ShadowState::Standby(t @ (Tier::Paused | Tier::Saved)) => {
                        Some((x.name.clone(), t))
                    }
                    _ => None,
                })
                .collect();
            (s.name.clone(), s.class.clone(), shadows)
        })
        .collect();
    for (service, class_name, shadows) in services {
        let class = d.class(&class_name);
        let Some(p) = plan(d, &service, &class) else {
            continue;
        };
        for (shadow, tier) in shadows {
            if tier == p.tier
                || d.table()
                    .begin_tier_switch(&service, &shadow, p.tier)
                    .is_err()
            {
                continue;
            }
            tracing::info!(%service, %shadow, from = tier.as_str(), to = p.tier.as_str(), "adaptive: switching the shadow's tier");
            let (d, service, class_name, to) =
                (d.clone(), service.clone(), class_name.clone(), p.tier);
            tokio::spawn(async move {
                let done = switch(&d, &service, &class_name, &shadow, to).await;
                let answer = match done {
                    Ok(taps) => d.table().tier_switched(&service, &shadow, to, taps),
                    Err(e) => {
                        tracing::warn!(%service, %shadow, error = %crate::error::report(&e), "tier switch failed; the shadow is replaced");
                        d.table().shadow_lost(&service, &shadow)
                    }
                };
                if let Ok(actions) = answer {
                    super::execute(&d, actions).await;
                }
            });
        }
    }
}

/// Moves one shadow: paused to saved (record, then managed save), or saved to paused (restore
/// paused, taps off any bridge, record). Returns its taps.
async fn switch(
    d: &Shared,
    service: &str,
    class: &str,
    shadow: &str,
    to: Tier,
) -> Result<Vec<TapBinding>, FailoverError> {
    let hv = d.hv();
    let meta = member_meta(
        service,
        class,
        Role::Shadow,
        shadow_generation(service, shadow).unwrap_or(0),
        if to == Tier::Saved {
            MemberState::Saved
        } else {
            MemberState::Paused
        },
    );
    let lv = |step| move |source| FailoverError::Libvirt { step, source };
    let name = shadow.to_string();
    if to == Tier::Saved {
        hv.run("save shadow", move |hv| {
            write_meta(hv, &name, &meta)?;
            hv.managed_save(&name)
        })
        .await
        .map_err(lv("adaptive: save shadow"))?;
        return Ok(Vec::new());
    }
    let n = name.clone();
    hv.run("restore shadow", move |hv| hv.start(&n, true))
        .await
        .map_err(lv("adaptive: restore shadow"))?;
    let taps = live_taps(&hv, shadow).await?;
    for b in &taps {
        isolate_tap(&d.net, &b.tap).await?;
    }
    hv.run("record shadow", move |hv| write_meta(hv, &name, &meta))
        .await
        .map_err(lv("adaptive: record shadow"))?;
    Ok(taps)
}
