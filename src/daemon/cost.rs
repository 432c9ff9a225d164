//! What standing by costs each service: the host memory its primary and each of its shadows
//! hold (see [`crate::monitor::memcost`]), and the standing-by shadows' share of the primary's.
//! Read for `status` and for the metrics, from the QEMU processes libvirt runs.

use std::path::Path;

use crate::failover::{Shadow, ShadowState};
use crate::monitor::memcost::{self, MemoryHeld};

use super::Service;

/// One shadow's figures.
#[derive(Debug, Clone)]
pub(super) struct ShadowCost {
    /// The shadow's domain name.
    pub name: String,
    /// Its state when measured.
    pub state: ShadowState,
    /// What it holds; `None` when it has no QEMU process (or its figures could not be read).
    pub memory: Option<MemoryHeld>,
}

/// One service's figures.
#[derive(Debug, Clone)]
pub(super) struct ServiceCost {
    /// The service.
    pub service: String,
    /// Its active primary.
    pub active: String,
    /// The active primary's figures.
    pub primary: Option<MemoryHeld>,
    /// Every shadow's.
    pub shadows: Vec<ShadowCost>,
}

impl ServiceCost {
    /// Host memory held by the shadows standing by (paused), by [`MemoryHeld::held_bytes`].
    pub fn standby_bytes(&self) -> u64 {
        self.shadows
            .iter()
            .filter(|s| s.state.is_standby())
            .filter_map(|s| s.memory.map(|m| m.held_bytes()))
            .sum()
    }

    /// The standing-by shadows' memory as a percentage of the primary's.
    pub fn standby_share_pct(&self) -> Option<f64> {
        memcost::share_pct(self.standby_bytes(), self.primary?.held_bytes())
    }

    /// One shadow's memory as a percentage of the primary's.
    pub fn shadow_share_pct(&self, shadow: &ShadowCost) -> Option<f64> {
        memcost::share_pct(shadow.memory?.held_bytes(), self.primary?.held_bytes())
    }
}

/// Reads every member's figures. Blocking (procfs and cgroupfs reads), cheap: a few small
/// files per domain.
pub(super) fn measure(services: &[Service]) -> Vec<ServiceCost> {
    services
        .iter()
        .map(|s| ServiceCost {
            service: s.name.clone(),
            active: s.active.clone(),
            primary: s.state.is_running().then(|| held(&s.active)).flatten(),
            shadows: measure_shadows(&s.shadows),
        })
        .collect()
}

/// Each shadow's figures (a service's, or a pool's).
pub(super) fn measure_shadows(shadows: &[Shadow]) -> Vec<ShadowCost> {
    shadows
        .iter()
        .map(|x| ShadowCost {
            name: x.name.clone(),
            state: x.state,
            memory: held(&x.name),
        })
        .collect()
}

/// What `domain`'s QEMU process holds, if it runs and its figures can be read.
fn held(domain: &str) -> Option<MemoryHeld> {
    let run = Path::new(crate::libvirt::QEMU_RUN_DIR);
    let pid = crate::libvirt::qemu_pid(run, domain).ok()?;
    let pid = u32::try_from(pid).ok()?;
    memcost::read(Path::new("/"), pid)
        .map_err(|e| {
            tracing::debug!(%domain, error = %crate::error::report(&e), "memory figures unreadable");
        })
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(bytes: u64) -> Option<MemoryHeld> {
        Some(MemoryHeld {
            cgroup_bytes: Some(bytes),
            cgroup_anon_bytes: None,
            rss_bytes: bytes,
            pss_bytes: Some(bytes),
            private_bytes: Some(bytes),
        })
    }

    #[test]
    fn only_paused_shadows_count_as_standing_by() {
        let c = ServiceCost {
            service: "web".into(),
            active: "web".into(),
            primary: held(200),
            shadows: vec![
                ShadowCost {
                    name: "web-shadow-1".into(),
                    state: ShadowState::PAUSED,
                    memory: held(50),
                },
                ShadowCost {
                    name: "web-shadow-2".into(),
                    state: ShadowState::Booting,
                    memory: held(120),
                },
            ],
        };
        assert_eq!(c.standby_bytes(), 50);
        assert_eq!(c.standby_share_pct(), Some(25.0));
        assert_eq!(c.shadow_share_pct(&c.shadows[1]), Some(60.0));
        let no_primary = ServiceCost {
            primary: None,
            ..c.clone()
        };
        assert_eq!(no_primary.standby_share_pct(), None);
    }
}
