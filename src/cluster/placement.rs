//! Where a service's shadows go: a pure function of the hosts (state, drain flag, free memory)
//! and the service's members (where its primary and shadows are now).
//!
//! A class's [`Placement`] says what a good layout is:
//! - `local`: every shadow on the primary's host (the single-host behaviour): a crash of the VM
//!   is covered, the loss of the host is not;
//! - `other-host`: every shadow on another host, no two members of the service on one host:
//!   the loss of any one host is covered;
//! - `spread`: the first shadow on the primary's host (the fastest crash recovery: no switch
//!   has to learn anything), every further one on a distinct other host (host loss).
//!
//! [`place`] answers, for one service, which new shadows go where and which existing ones are
//! misplaced (on a host that is lost or drained, or breaking the class's rule since the primary
//! moved). New shadows only go to hosts that are up, not drained, and have the memory (a
//! paused shadow holds its memory); among those the one with the most memory free wins, then
//! the name (so every daemon computes the same answer). [`Ledger`] carries what earlier
//! answers of a round have already taken from each host, so several services placed in one
//! round do not all count the same free memory. Re-placement is the same call on new facts:
//! a host that joins is a new candidate, one that leaves takes its shadows with it (they are
//! missing, so replaced), one that fills up is no longer a candidate. A misplaced shadow is
//! retired only once its replacement is ready, so protection never dips ([`PlacementPlan`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{HostCapacity, HostId};

/// Where a class's shadows go.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Placement {
    /// Every shadow on the primary's host.
    #[default]
    Local,
    /// Every shadow on another host; no two members of the service on one host.
    OtherHost,
    /// One shadow on the primary's host, every further one on a distinct other host.
    Spread,
}

impl Placement {
    /// The name used in the configuration and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Placement::Local => "local",
            Placement::OtherHost => "other-host",
            Placement::Spread => "spread",
        }
    }
}

impl std::fmt::Display for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One host as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostView {
    /// The host.
    pub id: HostId,
    /// Its lease is alive (false: lost).
    pub alive: bool,
    /// Drained by an operator: it gets nothing new and its shadows move away.
    pub draining: bool,
    /// Its capacity as last published.
    pub capacity: HostCapacity,
}

impl HostView {
    fn usable(&self) -> bool {
        self.alive && !self.draining
    }
}

/// Memory already promised to shadows placed in this round, per host (KiB).
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    taken_kib: BTreeMap<HostId, u64>,
}

impl Ledger {
    /// Nothing promised yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn free_kib(&self, host: &HostView) -> u64 {
        let taken = self.taken_kib.get(&host.id).copied().unwrap_or(0);
        host.capacity.mem_available_kib.saturating_sub(taken)
    }

    fn fits(&self, host: &HostView, mem_kib: u64) -> bool {
        HostCapacity {
            mem_available_kib: self.free_kib(host),
            ..host.capacity
        }
        .fits(mem_kib)
    }

    fn take(&mut self, host: &HostId, mem_kib: u64) {
        *self.taken_kib.entry(host.clone()).or_default() += mem_kib;
    }
}

/// A shadow that exists (booting or paused), and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExistingShadow {
    /// Its domain name.
    pub name: String,
    /// The host it is defined on.
    pub host: HostId,
}

/// What placement needs to know of one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceLayout {
    /// The class's rule.
    pub placement: Placement,
    /// Shadows the class asks for.
    pub want: u32,
    /// Memory one shadow holds (the primary's), KiB.
    pub mem_kib: u64,
    /// The host of the active primary.
    pub primary: HostId,
    /// The shadows there are, oldest first.
    pub shadows: Vec<ExistingShadow>,
}

/// Why a shadow the class asks for has no host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unplaced {
    /// Every host the rule allows is already used by a member of the service (or drained,
    /// or lost): more hosts are needed.
    NoHostLeft {
        /// Which slot: 0 is the first shadow.
        slot: u32,
    },
    /// Hosts are allowed but none has the memory.
    NoCapacity {
        /// Which slot.
        slot: u32,
        /// The memory asked for, KiB.
        mem_kib: u64,
    },
}

impl std::fmt::Display for Unplaced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unplaced::NoHostLeft { slot } => write!(
                f,
                "shadow {}: no host left that the placement allows (up, not drained, not holding a member of the service)",
                slot + 1
            ),
            Unplaced::NoCapacity { slot, mem_kib } => write!(
                f,
                "shadow {}: no allowed host has {} MiB free beyond its reserve",
                slot + 1,
                mem_kib / 1024
            ),
        }
    }
}

/// The answer for one service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlacementPlan {
    /// Hosts that get one new shadow each, in slot order.
    pub add: Vec<HostId>,
    /// Existing shadows on hosts where they should not be (lost, drained, breaking the rule)
    /// or beyond what the class asks for. Retire them once the shadows in `add` are ready;
    /// a shadow on a lost host is already gone.
    pub retire: Vec<String>,
    /// Shadows the class asks for that have no host, and why.
    pub unplaced: Vec<Unplaced>,
}

/// Places one service's shadows. Memory of new shadows is taken from `ledger`.
pub fn place(layout: &ServiceLayout, hosts: &[HostView], ledger: &mut Ledger) -> PlacementPlan {
    let by_id: BTreeMap<&HostId, &HostView> = hosts.iter().map(|h| (&h.id, h)).collect();
    // A drained host keeps the shadows of a primary still running on it (they cover it until
    // it moves) but gets no new ones.
    let keepable = |id: &HostId| {
        by_id
            .get(id)
            .is_some_and(|h| h.usable() || (h.alive && *id == layout.primary))
    };
    let mut plan = PlacementPlan::default();
    // Hosts holding a member the layout keeps; the primary's always counts.
    let mut used: Vec<HostId> = vec![layout.primary.clone()];
    let mut local_kept = 0u32;
    let mut kept = 0u32;
    for s in &layout.shadows {
        let local = s.host == layout.primary;
        let allowed = keepable(&s.host)
            && match layout.placement {
                Placement::Local => local,
                Placement::OtherHost => !local && !used.contains(&s.host),
                Placement::Spread => {
                    if local {
                        local_kept == 0
                    } else {
                        !used.contains(&s.host)
                    }
                }
            };
        if allowed && kept < layout.want {
            kept += 1;
            if local {
                local_kept += 1;
            } else {
                used.push(s.host.clone());
            }
        } else {
            plan.retire.push(s.name.clone());
        }
    }
    for slot in kept..layout.want {
        let local_ok = match layout.placement {
            Placement::Local => true,
            Placement::OtherHost => false,
            Placement::Spread => local_kept == 0,
        };
        let mut candidates: Vec<&HostView> = hosts
            .iter()
            .filter(|h| h.usable())
            .filter(|h| {
                if h.id == layout.primary {
                    local_ok
                } else {
                    layout.placement != Placement::Local && !used.contains(&h.id)
                }
            })
            .collect();
        if candidates.is_empty() {
            plan.unplaced.push(Unplaced::NoHostLeft { slot });
            continue;
        }
        candidates.retain(|h| ledger.fits(h, layout.mem_kib));
        // Spread's first shadow belongs on the primary's host when it fits there; otherwise
        // the most free memory wins, then the name.
        let pick = candidates
            .iter()
            .find(|h| layout.placement == Placement::Spread && local_ok && h.id == layout.primary)
            .or_else(|| {
                candidates.iter().max_by(|a, b| {
                    ledger
                        .free_kib(a)
                        .cmp(&ledger.free_kib(b))
                        .then_with(|| b.id.cmp(&a.id))
                })
            })
            .map(|h| h.id.clone());
        let Some(host) = pick else {
            plan.unplaced.push(Unplaced::NoCapacity {
                slot,
                mem_kib: layout.mem_kib,
            });
            continue;
        };
        ledger.take(&host, layout.mem_kib);
        if host == layout.primary {
            local_kept += 1;
        } else {
            used.push(host.clone());
        }
        plan.add.push(host);
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 20;

    fn host(name: &str, free_gib: u64) -> HostView {
        HostView {
            id: HostId(name.into()),
            alive: true,
            draining: false,
            capacity: HostCapacity {
                mem_total_kib: 16 * GIB,
                mem_available_kib: free_gib * GIB,
                cpus: 4,
            },
        }
    }

    fn h(name: &str) -> HostId {
        HostId(name.into())
    }

    fn layout(placement: Placement, want: u32, shadows: &[(&str, &str)]) -> ServiceLayout {
        ServiceLayout {
            placement,
            want,
            mem_kib: GIB,
            primary: h("h1"),
            shadows: shadows
                .iter()
                .map(|(n, host)| ExistingShadow {
                    name: n.to_string(),
                    host: h(host),
                })
                .collect(),
        }
    }

    fn three() -> Vec<HostView> {
        vec![host("h1", 8), host("h2", 6), host("h3", 4)]
    }

    #[test]
    fn local_keeps_every_shadow_on_the_primary_host() {
        let p = place(
            &layout(Placement::Local, 2, &[]),
            &three(),
            &mut Ledger::new(),
        );
        assert_eq!(p.add, [h("h1"), h("h1")]);
        assert!(p.retire.is_empty() && p.unplaced.is_empty());
    }

    #[test]
    fn other_host_uses_distinct_hosts_most_free_first() {
        let p = place(
            &layout(Placement::OtherHost, 2, &[]),
            &three(),
            &mut Ledger::new(),
        );
        assert_eq!(p.add, [h("h2"), h("h3")]);
        // A third shadow would need a fourth host: never two members on one host.
        let p = place(
            &layout(Placement::OtherHost, 3, &[]),
            &three(),
            &mut Ledger::new(),
        );
        assert_eq!(p.add.len(), 2);
        assert_eq!(p.unplaced, [Unplaced::NoHostLeft { slot: 2 }]);
    }

    #[test]
    fn spread_puts_one_shadow_local_and_the_others_elsewhere() {
        let p = place(
            &layout(Placement::Spread, 2, &[]),
            &three(),
            &mut Ledger::new(),
        );
        assert_eq!(p.add, [h("h1"), h("h2")]);
        let p = place(
            &layout(Placement::Spread, 3, &[]),
            &three(),
            &mut Ledger::new(),
        );
        assert_eq!(p.add, [h("h1"), h("h2"), h("h3")]);
        // Alone, spread still gets its local shadow and says what it lacks.
        let p = place(
            &layout(Placement::Spread, 2, &[]),
            &[host("h1", 8)],
            &mut Ledger::new(),
        );
        assert_eq!(p.add, [h("h1")]);
        assert_eq!(p.unplaced, [Unplaced::NoHostLeft { slot: 1 }]);
    }

    #[test]
    fn spread_falls_back_to_another_host_when_the_local_one_is_full() {
        let hosts = vec![host("h1", 1), host("h2", 6), host("h3", 4)];
        let p = place(
            &layout(Placement::Spread, 2, &[]),
            &hosts,
            &mut Ledger::new(),
        );
        assert_eq!(p.add, [h("h2"), h("h3")]);
    }

    #[test]
    fn full_drained_and_lost_hosts_get_nothing() {
        let mut hosts = three();
        hosts[1].draining = true;
        hosts[2].capacity.mem_available_kib = GIB; // 1 GiB: not with the 512 MiB reserve
        let p = place(
            &layout(Placement::OtherHost, 1, &[]),
            &hosts,
            &mut Ledger::new(),
        );
        assert!(p.add.is_empty());
        assert_eq!(
            p.unplaced,
            [Unplaced::NoCapacity {
                slot: 0,
                mem_kib: GIB
            }]
        );
        assert!(p.unplaced[0].to_string().contains("1024 MiB"));
        hosts[2].alive = false;
        let p = place(
            &layout(Placement::OtherHost, 1, &[]),
            &hosts,
            &mut Ledger::new(),
        );
        assert_eq!(p.unplaced, [Unplaced::NoHostLeft { slot: 0 }]);
    }

    #[test]
    fn a_round_does_not_count_the_same_free_memory_twice() {
        // h2 has room for exactly one shadow of 1 GiB beyond its reserve.
        let hosts = vec![host("h1", 8), {
            let mut x = host("h2", 0);
            x.capacity.mem_available_kib = GIB + 600 * 1024;
            x
        }];
        let mut ledger = Ledger::new();
        let a = place(&layout(Placement::OtherHost, 1, &[]), &hosts, &mut ledger);
        let b = place(&layout(Placement::OtherHost, 1, &[]), &hosts, &mut ledger);
        assert_eq!(a.add, [h("h2")]);
        assert!(b.add.is_empty());
        assert!(matches!(b.unplaced[..], [Unplaced::NoCapacity { .. }]));
    }

    #[test]
    fn shadows_in_place_are_kept_and_only_the_missing_ones_added() {
        let p = place(
            &layout(Placement::Spread, 2, &[("web-shadow-1", "h1")]),
            &three(),
            &mut Ledger::new(),
        );
        assert_eq!(p.add, [h("h2")]);
        assert!(p.retire.is_empty());
        let p = place(
            &layout(
                Placement::Spread,
                2,
                &[("web-shadow-1", "h1"), ("web-shadow-2", "h3")],
            ),
            &three(),
            &mut Ledger::new(),
        );
        assert_eq!(p, PlacementPlan::default());
    }

    #[test]
    fn a_lost_host_s_shadow_is_replaced_elsewhere() {
        let mut hosts = three();
        hosts[1].alive = false;
        let p = place(
            &layout(Placement::OtherHost, 1, &[("web-shadow-1", "h2")]),
            &hosts,
            &mut Ledger::new(),
        );
        assert_eq!(p.retire, ["web-shadow-1"]);
        assert_eq!(p.add, [h("h3")]);
    }

    #[test]
    fn a_drained_host_s_shadows_move_away() {
        let mut hosts = three();
        hosts[1].draining = true;
        let p = place(
            &layout(
                Placement::Spread,
                2,
                &[("web-shadow-1", "h1"), ("web-shadow-2", "h2")],
            ),
            &hosts,
            &mut Ledger::new(),
        );
        assert_eq!(p.retire, ["web-shadow-2"]);
        assert_eq!(p.add, [h("h3")]);
    }

    #[test]
    fn after_the_primary_moves_a_shadow_on_its_new_host_is_retired() {
        // other-host: the primary moved to h2, where a shadow of the service still stands by.
        let mut l = layout(
            Placement::OtherHost,
            2,
            &[("web-shadow-2", "h2"), ("web-shadow-3", "h3")],
        );
        l.primary = h("h2");
        let p = place(&l, &three(), &mut Ledger::new());
        assert_eq!(p.retire, ["web-shadow-2"]);
        assert_eq!(p.add, [h("h1")]);
        // Two shadows on one other host: the second is retired.
        let p = place(
            &layout(
                Placement::OtherHost,
                2,
                &[("web-shadow-1", "h2"), ("web-shadow-2", "h2")],
            ),
            &three(),
            &mut Ledger::new(),
        );
        assert_eq!(p.retire, ["web-shadow-2"]);
        assert_eq!(p.add, [h("h3")]);
    }

    #[test]
    fn a_primary_on_a_drained_host_keeps_its_local_shadow_until_it_moves() {
        let mut hosts = three();
        hosts[0].draining = true;
        let p = place(
            &layout(Placement::Local, 2, &[("web-shadow-1", "h1")]),
            &hosts,
            &mut Ledger::new(),
        );
        assert!(p.retire.is_empty());
        assert!(p.add.is_empty(), "nothing new on a drained host");
        assert_eq!(p.unplaced, [Unplaced::NoHostLeft { slot: 1 }]);
    }

    #[test]
    fn a_joining_host_gets_the_shadow_that_had_no_host() {
        let l = layout(Placement::OtherHost, 1, &[]);
        let alone = place(&l, &[host("h1", 8)], &mut Ledger::new());
        assert_eq!(alone.unplaced.len(), 1);
        let joined = place(&l, &[host("h1", 8), host("h4", 2)], &mut Ledger::new());
        assert_eq!(joined.add, [h("h4")]);
    }

    #[test]
    fn surplus_shadows_are_retired_newest_last() {
        let p = place(
            &layout(
                Placement::Local,
                1,
                &[("web-shadow-1", "h1"), ("web-shadow-2", "h1")],
            ),
            &three(),
            &mut Ledger::new(),
        );
        assert_eq!(p.retire, ["web-shadow-2"]);
        assert!(p.add.is_empty());
    }

    #[test]
    fn the_policy_reads_and_prints_in_kebab_case() {
        #[derive(Deserialize)]
        struct W {
            p: Placement,
        }
        let w: W = toml::from_str("p = \"other-host\"").unwrap();
        assert_eq!(w.p, Placement::OtherHost);
        assert_eq!(Placement::Spread.to_string(), "spread");
        assert!(toml::from_str::<W>("p = \"anywhere\"").is_err());
    }
}
