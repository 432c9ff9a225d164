//! Pooled shadows: a class with `[class.X.pool]` keeps one generic shadow per
//! `primaries_per_shadow` of its primaries on this host instead of shadows per primary. Each is
//! cloned from the class's golden template domain, its NICs on placeholder MACs; the first
//! primary of the class to fail takes one, and the promotion gives it that primary's identity
//! (NICs with its MACs, addresses, host name, configuration files, data disks, vCPUs and memory:
//! see [`crate::failover::identity`]). Then the pool provisions a new one.
//!
//! A [`Pool`] is owned by the [`super::ServiceTable`] like the services are, and changes only
//! through its transitions. Which primaries it covers is not stored: it is every running service
//! of its class here (and every down one that may still be retried), so it follows protection,
//! stops and failovers without bookkeeping of its own.

use std::time::Instant;

use crate::failover::record::Tier;
use crate::failover::shadow::{shadow_generation, shadow_name};
use crate::failover::{Shadow, ShadowState};

/// The name under which a class's pooled shadows are recorded (their metadata's `service`) and
/// named (`<class>-pool-shadow-<n>`).
pub fn pool_name(class: &str) -> String {
    format!("{class}-pool")
}

/// The pooled shadows of one class on this host.
#[derive(Debug, Clone)]
pub struct Pool {
    /// The class.
    pub class: String,
    /// [`pool_name`] of the class: the owner name of its shadows.
    pub name: String,
    /// Primaries one pooled shadow covers.
    pub primaries_per_shadow: u32,
    /// Its shadows, oldest first (a promoted one leaves the pool for its service).
    pub shadows: Vec<Shadow>,
    /// Highest generation ever used, so a new pooled shadow never reuses a name.
    pub last_generation: u64,
    /// Consecutive failed provisionings.
    pub provision_failures: u32,
    /// No provisioning before this instant (backoff after failures).
    pub provision_not_before: Option<Instant>,
}

impl Pool {
    /// An empty pool of `class`.
    pub fn new(class: &str, primaries_per_shadow: u32) -> Self {
        Pool {
            class: class.to_string(),
            name: pool_name(class),
            primaries_per_shadow: primaries_per_shadow.max(1),
            shadows: Vec::new(),
            last_generation: 0,
            provision_failures: 0,
            provision_not_before: None,
        }
    }

    /// Pooled shadows wanted for `covered` primaries: one per `primaries_per_shadow`, rounded
    /// up, so every covered primary has one as long as they fail one at a time.
    pub fn wanted(&self, covered: usize) -> usize {
        covered.div_ceil(self.primaries_per_shadow as usize)
    }

    /// Shadows standing by or on their way (booting): what counts against [`Self::wanted`].
    pub fn counted(&self) -> usize {
        self.shadows
            .iter()
            .filter(|s| matches!(s.state, ShadowState::Booting | ShadowState::Standby(_)))
            .count()
    }

    /// The oldest pooled shadow standing by, paused.
    pub fn ready(&self) -> Option<&Shadow> {
        self.shadows
            .iter()
            .find(|s| s.state == ShadowState::Standby(Tier::Paused))
    }

    /// Whether `domain` is one of this pool's shadows.
    pub fn has(&self, domain: &str) -> bool {
        self.shadows.iter().any(|s| s.name == domain)
    }

    pub(super) fn shadow_mut(&mut self, domain: &str) -> Option<&mut Shadow> {
        self.shadows.iter_mut().find(|s| s.name == domain)
    }

    /// Takes the ready shadow out of the pool, Promoting, for a service's failover.
    pub(super) fn take_ready(&mut self) -> Option<Shadow> {
        let i = self
            .shadows
            .iter()
            .position(|s| s.state == ShadowState::Standby(Tier::Paused))?;
        let mut s = self.shadows.remove(i);
        s.state = ShadowState::Promoting;
        Some(s)
    }

    /// Reserves the next shadow name (Booting) and returns it with its generation.
    pub(super) fn reserve(&mut self) -> (String, u64) {
        let next = self
            .shadows
            .iter()
            .filter_map(|s| shadow_generation(&self.name, &s.name))
            .chain([self.last_generation])
            .max()
            .unwrap_or(0)
            + 1;
        self.last_generation = next;
        let name = shadow_name(&self.name, next);
        self.shadows.push(Shadow {
            name: name.clone(),
            state: ShadowState::Booting,
            taps: Vec::new(),
            data_disks: None,
        });
        (name, next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_pooled_shadow_per_n_primaries_rounded_up() {
        let p = Pool::new("web", 4);
        assert_eq!(
            [0, 1, 2, 4, 5, 8, 9].map(|n| p.wanted(n)),
            [0, 1, 1, 1, 2, 2, 3]
        );
        assert_eq!(
            Pool::new("web", 0).wanted(3),
            3,
            "a ratio of 0 is read as 1"
        );
    }

    #[test]
    fn names_never_repeat_and_only_a_paused_one_is_taken() {
        let mut p = Pool::new("web", 2);
        assert_eq!(p.reserve(), ("web-pool-shadow-1".to_string(), 1));
        assert_eq!(p.take_ready(), None, "a booting shadow is not ready");
        p.shadows[0].state = ShadowState::PAUSED;
        let taken = p.take_ready().unwrap();
        assert_eq!(
            (taken.name.as_str(), taken.state),
            ("web-pool-shadow-1", ShadowState::Promoting)
        );
        assert!(p.shadows.is_empty());
        assert!(!p.has("web-pool-shadow-1"));
        assert_eq!(p.reserve().0, "web-pool-shadow-2");
        assert!(p.has("web-pool-shadow-2"));
    }
}
