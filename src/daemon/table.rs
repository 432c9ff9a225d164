//! The service table: every protected service, its state and its shadows, owned by one type.
//!
//! [`ServiceTable`] is the only place where a service's state changes. Each transition checks
//! the state it starts from, refuses with a [`Refused`] when it does not fit, and otherwise
//! returns the [`Action`]s the daemon must carry out next (promote, watch a primary, remove a
//! shadow, ...). The table itself does no I/O, so every transition is tested without libvirt.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::cluster::{HostId, OwnerRecord};
use crate::failover::record::Tier;
use crate::failover::shadow::{shadow_generation, shadow_name};
use crate::failover::{FailoverRecord, Shadow, ShadowState, TapBinding, Trigger};

use super::pool::Pool;

/// Pause between a completed promotion and provisioning the replacement shadow: booting it
/// competes for CPU with the guest that has just taken over, in the very seconds its clients
/// reconnect. Service first, redundancy right after.
pub const REPLACEMENT_DELAY: Duration = Duration::from_secs(2);

/// First wait after a failed shadow provisioning; it doubles per failure up to
/// [`PROVISION_BACKOFF_MAX`], so a failing host is not hammered every housekeeping round.
pub const PROVISION_BACKOFF_START: Duration = Duration::from_secs(10);
/// Longest wait between provisioning attempts.
pub const PROVISION_BACKOFF_MAX: Duration = Duration::from_secs(300);

/// A service's lifecycle. Each variant carries what is true only in that state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceState {
    /// Active primary running, but fewer paused shadows than the class asks for.
    Provisioning,
    /// Active primary running and every shadow paused and ready.
    Protected,
    /// A failover to `shadow` is in progress.
    FailingOver {
        /// The shadow being promoted.
        shadow: String,
        /// What set it off.
        trigger: Trigger,
        /// The old primary's host when it is another one (a promotion here of a primary that
        /// died there).
        from_host: Option<HostId>,
        /// How the shadow stood by, to return to when another host's claim wins (the claim
        /// comes before anything of the shadow is touched).
        standby: ShadowState,
    },
    /// The primary is gone and no shadow could take over yet.
    Down {
        /// Why, for status.
        reason: String,
    },
    /// Stopped deliberately by an operator through understudy; not a failure.
    Stopped,
    /// Shadows cannot be made for this primary (e.g. a device that cannot be cloned).
    Unprotectable {
        /// Why, naming the device.
        reason: String,
    },
    /// The active primary runs on another host (known through the cluster); this host may
    /// hold shadows of it, and promotes one when that host reports the primary dead.
    Elsewhere {
        /// The primary's host.
        host: HostId,
    },
    /// A planned switchover to a shadow on another host: the primary here is fenced (paused,
    /// taps cut) until that host has claimed the service and resumed its shadow.
    HandingOver {
        /// The host taking over.
        to: HostId,
        /// Its shadow that takes over.
        shadow: String,
    },
}

impl ServiceState {
    /// Short lowercase name for status output and metrics labels.
    pub fn label(&self) -> &'static str {
        match self {
            ServiceState::Provisioning => "provisioning",
            ServiceState::Protected => "protected",
            ServiceState::FailingOver { .. } => "failing_over",
            ServiceState::Down { .. } => "down",
            ServiceState::Stopped => "stopped",
            ServiceState::Unprotectable { .. } => "unprotectable",
            ServiceState::Elsewhere { .. } => "elsewhere",
            ServiceState::HandingOver { .. } => "handing_over",
        }
    }

    /// The label with the reason where there is one, for status.
    pub fn describe(&self) -> String {
        match self {
            ServiceState::Down { reason } | ServiceState::Unprotectable { reason } => {
                format!("{}: {reason}", self.label())
            }
            ServiceState::Elsewhere { host } => format!("elsewhere: on host {host}"),
            ServiceState::HandingOver { to, shadow } => {
                format!("handing_over: to {shadow} on host {to}")
            }
            other => other.label().to_string(),
        }
    }

    /// The active primary runs and is watched (heartbeats, probes, collectors).
    pub fn is_running(&self) -> bool {
        matches!(self, ServiceState::Provisioning | ServiceState::Protected)
    }
}

/// What the daemon knows of one protected service. Read-only outside this module: the
/// table's transitions are the only writers.
#[derive(Debug, Clone)]
pub struct Service {
    /// Service name: the name of the domain first protected.
    pub name: String,
    /// The class from the protection rule.
    pub class: String,
    /// Lifecycle.
    pub state: ServiceState,
    /// The domain serving now.
    pub active: String,
    /// Taps of the active domain by MAC, with the bridge each was on.
    pub active_taps: Vec<TapBinding>,
    /// Shadows, oldest first.
    pub shadows: Vec<Shadow>,
    /// Last completed failover.
    pub last_failover: Option<FailoverRecord>,
    /// Unix ms of the last answered heartbeat.
    pub last_heartbeat_unix_ms: Option<u64>,
    /// Last health verdict, for status.
    pub health: String,
    /// Failed promotions since the service last ran: retries stop at the class's
    /// `promote_retry_limit`.
    pub promote_attempts: u32,
    /// Highest shadow generation ever used, so new shadows never reuse a name.
    pub last_generation: u64,
    /// Consecutive failed shadow provisionings.
    pub provision_failures: u32,
    /// Shadows of this service on other hosts, as the cluster registers them.
    pub remote_shadows: Vec<RemoteShadow>,
    /// No provisioning before this instant (backoff after failures).
    pub provision_not_before: Option<Instant>,
    /// The shadow a standby verification is copying: still standing by and promotable, but
    /// while its memory is written a resume of it waits, so a failover takes another first.
    pub verifying: Option<String>,
}

impl Service {
    /// A service as found or first protected; `state` is where it starts.
    pub fn new(name: &str, class: &str, active: &str, state: ServiceState) -> Self {
        Service {
            name: name.to_string(),
            class: class.to_string(),
            state,
            active: active.to_string(),
            active_taps: Vec::new(),
            shadows: Vec::new(),
            last_failover: None,
            last_heartbeat_unix_ms: None,
            health: "unknown".into(),
            promote_attempts: 0,
            last_generation: 0,
            provision_failures: 0,
            provision_not_before: None,
            remote_shadows: Vec::new(),
            verifying: None,
        }
    }

    /// The host of the active primary: `None` for this host.
    pub fn primary_host(&self) -> Option<&HostId> {
        match &self.state {
            ServiceState::Elsewhere { host } => Some(host),
            _ => None,
        }
    }

    /// The shadow to promote: the fastest tier standing by (paused, then saved, then cold),
    /// oldest first; within a tier, the one being verified last (its resume may wait for its
    /// memory to be written, well under a saved shadow's restore).
    pub fn ready_shadow(&self) -> Option<&Shadow> {
        Tier::ALL.iter().find_map(|t| {
            let mut tier = self
                .shadows
                .iter()
                .filter(|s| s.state == ShadowState::Standby(*t));
            let first = tier.next()?;
            if self.verifying.as_deref() != Some(first.name.as_str()) {
                return Some(first);
            }
            tier.next().or(Some(first))
        })
    }

    /// Refuses `what` while the service fails over: its shadows are the promotion's then.
    fn refuse_while_failing_over(&self, service: &str, what: &'static str) -> Result<(), Refused> {
        if matches!(self.state, ServiceState::FailingOver { .. }) {
            return Err(Refused::WrongState {
                service: service.to_string(),
                state: self.state.label(),
                what,
            });
        }
        Ok(())
    }

    fn shadow_mut(&mut self, name: &str) -> Option<&mut Shadow> {
        self.shadows.iter_mut().find(|s| s.name == name)
    }

    /// Provisioning becomes Protected once every shadow stands by.
    fn settle(&mut self) {
        if self.state == ServiceState::Provisioning
            && !self.shadows.is_empty()
            && self.shadows.iter().all(|s| s.state.is_standby())
        {
            self.state = ServiceState::Protected;
        }
    }
}

/// A shadow of a service registered by another host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteShadow {
    /// Its domain name.
    pub name: String,
    /// The host running it.
    pub host: HostId,
    /// Booted and paused: promotable.
    pub ready: bool,
}

/// Which member of a service a domain is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Member {
    /// The service's active primary.
    Active {
        /// The service.
        service: String,
    },
    /// One of its shadows.
    Shadow {
        /// The service.
        service: String,
        /// The shadow's state.
        state: ShadowState,
    },
}

/// What the daemon must do after a transition, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Watch `domain`, now the active primary of `service` (pidfd, collector, taps).
    WatchPrimary {
        /// The service.
        service: String,
        /// Its new active domain.
        domain: String,
    },
    /// Destroy and undefine a shadow, then drop it from the table.
    RemoveShadow {
        /// The service.
        service: String,
        /// The shadow.
        shadow: String,
    },
    /// Provision shadows wherever a service has fewer than its class asks for.
    EnsureShadows,
    /// The same, after `REPLACEMENT_DELAY`.
    EnsureShadowsLater,
    /// Begin a failover of `service` away from `from`.
    Failover {
        /// The service.
        service: String,
        /// The primary being replaced.
        from: String,
        /// Why.
        trigger: Trigger,
    },
    /// The service is served from another host now: destroy the primary `old` here (dead or
    /// fenced) and mark it retired, so it is never started again.
    RetirePrimary {
        /// The service.
        service: String,
        /// The old primary here.
        old: String,
    },
    /// A handover to another host did not complete: resume the fenced primary and put its
    /// taps back on their bridges.
    Unfence {
        /// The service.
        service: String,
        /// The primary here.
        domain: String,
    },
    /// An owner record names a domain here that this host does not run as the service's
    /// primary, while the table follows the service elsewhere: another host's promotion
    /// failed past its claim and gave the service back to its old primary here. The daemon
    /// asks libvirt whether `domain` was this service's primary; if so, the service is down
    /// here ([`ServiceTable::given_back`]) and its failure is reported again, for the
    /// shadows on other hosts.
    GivenBack {
        /// The service.
        service: String,
        /// The domain the record names.
        domain: String,
    },
    /// Watch the primary fenced for a hang through the grace period, then destroy it.
    FenceGrace {
        /// The service.
        service: String,
        /// The fenced primary.
        old: String,
    },
}

/// Why a transition was refused. The table is unchanged unless the variant says otherwise.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// No service of that name.
    #[error("no service named '{service}'; known services: {known}")]
    UnknownService {
        /// The name asked for.
        service: String,
        /// The services there are, comma-separated, or `(none)`.
        known: String,
    },
    /// The domain named is no longer the service's active primary (a failover already moved
    /// it, or the event is stale).
    #[error("'{domain}' is not the active primary of service '{service}' (that is '{active}')")]
    NotActive {
        /// The service.
        service: String,
        /// The domain named.
        domain: String,
        /// The actual active primary.
        active: String,
    },
    /// The service is in a state where the transition makes no sense.
    #[error("service '{service}' is {state}; cannot {what}")]
    WrongState {
        /// The service.
        service: String,
        /// Its state label.
        state: &'static str,
        /// What was asked.
        what: &'static str,
    },
    /// No paused shadow is ready. For a failover the service is now Down: this is the
    /// one refusal that changes the table.
    #[error("service '{service}' has no paused shadow ready")]
    NoShadow {
        /// The service.
        service: String,
    },
    /// No ready shadow of the service on the host named.
    #[error("service '{service}' has no ready shadow on host '{host}' (ready on: {ready_on})")]
    NoShadowOnHost {
        /// The service.
        service: String,
        /// The host named.
        host: HostId,
        /// Hosts with a ready shadow, comma-separated, or `(none)`.
        ready_on: String,
    },
    /// The shadow named is not a member of the service (or not in the state needed).
    #[error("'{shadow}' is not a {what} shadow of service '{service}'")]
    NoSuchShadow {
        /// The service.
        service: String,
        /// The shadow named.
        shadow: String,
        /// The state it needed to be in.
        what: &'static str,
    },
}

/// What a started failover needs from the table.
#[derive(Debug, Clone)]
pub struct FailoverStart {
    /// The service's class.
    pub class: String,
    /// The primary being replaced.
    pub old_primary: String,
    /// Its host when that is another one (whose report says it is dead or fenced): this
    /// host cannot and need not fence it.
    pub old_host: Option<HostId>,
    /// The old primary's taps, as last seen.
    pub old_taps: Vec<TapBinding>,
    /// The shadow to promote (its state is now Promoting).
    pub shadow: Shadow,
    /// The shadow's generation number.
    pub shadow_generation: u64,
    /// The shadow came from the class's pool: it has no identity of its own yet, and the
    /// promotion gives it the old primary's.
    pub pooled: bool,
}

/// What a started handover to another host needs from the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandoverStart {
    /// The service's class.
    pub class: String,
    /// The primary here, to fence.
    pub primary: String,
    /// The old primary's taps, as last seen.
    pub taps: Vec<TapBinding>,
    /// The host taking over.
    pub to: HostId,
    /// Its shadow that takes over.
    pub shadow: String,
}

/// A shadow the table has reserved a name for; the daemon provisions it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShadowToProvision {
    /// The service.
    pub service: String,
    /// Its class.
    pub class: String,
    /// The primary whose spec is cloned.
    pub primary: String,
    /// The new shadow's name.
    pub name: String,
    /// Its generation.
    pub generation: u64,
    /// A pooled shadow (`service` is the pool's name): cloned from the class's template, not
    /// from `primary`.
    pub pooled: bool,
}

/// Per-class numbers the table needs to plan shadows and retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClassLimits {
    /// Shadows per primary.
    pub shadows: u32,
    /// Failed promotions tolerated before the service stays down.
    pub promote_retry_limit: u32,
    /// Primaries per pooled shadow, for a pooled class.
    pub pool: Option<u32>,
}

/// Every protected service, by name, and the pools of pooled classes, by class.
#[derive(Debug, Default)]
pub struct ServiceTable {
    services: BTreeMap<String, Service>,
    pools: BTreeMap<String, Pool>,
}

/// A shadow that stands by or is on its way there (booting, or switching tiers): one the
/// service counts on.
fn standing_by(s: &Shadow) -> bool {
    matches!(
        s.state,
        ShadowState::Booting | ShadowState::Standby(_) | ShadowState::Switching(_)
    )
}

/// The promotion `svc` is in, which must be of `shadow`: its trigger, the old primary's host
/// when another, and how the shadow stood by. `what` names the refused transition.
fn promoting(
    svc: &Service,
    service: &str,
    shadow: &str,
    what: &'static str,
) -> Result<(Trigger, Option<HostId>, ShadowState), Refused> {
    let ServiceState::FailingOver {
        shadow: s,
        trigger,
        from_host,
        standby,
    } = &svc.state
    else {
        return Err(Refused::WrongState {
            service: service.to_string(),
            state: svc.state.label(),
            what,
        });
    };
    if s != shadow {
        return Err(Refused::NoSuchShadow {
            service: service.to_string(),
            shadow: shadow.to_string(),
            what: "promoting",
        });
    }
    Ok((*trigger, from_host.clone(), *standby))
}

impl ServiceTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// The service named, if any.
    pub fn get(&self, service: &str) -> Option<&Service> {
        self.services.get(service)
    }

    /// The service named, or the refusal naming the known ones.
    pub fn require(&self, service: &str) -> Result<&Service, Refused> {
        self.services
            .get(service)
            .ok_or_else(|| self.unknown(service))
    }

    /// Every service, by name.
    pub fn iter(&self) -> impl Iterator<Item = &Service> {
        self.services.values()
    }

    /// The names of every service.
    pub fn names(&self) -> Vec<String> {
        self.services.keys().cloned().collect()
    }

    /// Whether `service` exists.
    pub fn contains(&self, service: &str) -> bool {
        self.services.contains_key(service)
    }

    /// Every pool, by class.
    pub fn pools(&self) -> impl Iterator<Item = &Pool> {
        self.pools.values()
    }

    /// The services a class's pool stands in for: its running primaries here, and those down
    /// that may still be retried.
    pub fn covered_by_pool(&self, class: &str, limits: ClassLimits) -> Vec<&Service> {
        self.services
            .values()
            .filter(|s| s.class == class && s.primary_host().is_none())
            .filter(|s| {
                s.state.is_running()
                    || matches!(s.state, ServiceState::FailingOver { .. })
                    || (matches!(s.state, ServiceState::Down { .. })
                        && s.promote_attempts <= limits.promote_retry_limit)
            })
            .collect()
    }

    fn pool_named_mut(&mut self, name: &str) -> Option<&mut Pool> {
        self.pools.values_mut().find(|p| p.name == name)
    }

    /// Which member `domain` is, if it belongs to a service (a pooled shadow belongs to its
    /// pool, named as the service).
    pub fn member(&self, domain: &str) -> Option<Member> {
        if let Some(p) = self.pools.values().find(|p| p.has(domain)) {
            let state = p.shadows.iter().find(|s| s.name == domain)?.state;
            return Some(Member::Shadow {
                service: p.name.clone(),
                state,
            });
        }
        self.services.values().find_map(|s| {
            if s.active == domain {
                Some(Member::Active {
                    service: s.name.clone(),
                })
            } else {
                s.shadows
                    .iter()
                    .find(|x| x.name == domain)
                    .map(|x| Member::Shadow {
                        service: s.name.clone(),
                        state: x.state,
                    })
            }
        })
    }

    /// The service whose active primary is `domain`.
    pub fn service_of_active(&self, domain: &str) -> Option<&Service> {
        self.services.values().find(|s| s.active == domain)
    }

    fn unknown(&self, service: &str) -> Refused {
        let known: Vec<&str> = self.services.keys().map(String::as_str).collect();
        Refused::UnknownService {
            service: service.to_string(),
            known: if known.is_empty() {
                "(none)".into()
            } else {
                known.join(", ")
            },
        }
    }

    fn svc_mut(&mut self, service: &str) -> Result<&mut Service, Refused> {
        if !self.services.contains_key(service) {
            return Err(self.unknown(service));
        }
        Ok(self.services.get_mut(service).expect("checked above"))
    }

    // ---- adoption ------------------------------------------------------------------------

    /// Adds services rebuilt from libvirt; a service already known is kept as it is.
    pub fn adopt(&mut self, found: impl IntoIterator<Item = Service>) {
        for svc in found {
            self.services.entry(svc.name.clone()).or_insert(svc);
        }
    }

    /// Registers a newly tagged primary: provisioning when it runs, stopped when only defined.
    pub fn protect(&mut self, domain: &str, class: &str, running: bool) -> Result<(), Refused> {
        if let Some(s) = self.services.get(domain) {
            return Err(Refused::WrongState {
                service: domain.to_string(),
                state: s.state.label(),
                what: "protect it again",
            });
        }
        let state = if running {
            ServiceState::Provisioning
        } else {
            ServiceState::Stopped
        };
        self.services.insert(
            domain.to_string(),
            Service::new(domain, class, domain, state),
        );
        Ok(())
    }

    // ---- failover ------------------------------------------------------------------------

    /// Begins a failover of `service` away from `from`: the first paused shadow becomes
    /// Promoting and the service FailingOver. Without a ready shadow the service is Down
    /// (the refusal says so) and the next ready shadow takes over ([`Self::shadow_ready`]).
    pub fn begin_failover(
        &mut self,
        service: &str,
        from: &str,
        trigger: Trigger,
    ) -> Result<FailoverStart, Refused> {
        self.begin_failover_with(service, from, trigger, None)
    }

    /// Begins a failover to the standing-by `shadow` named: the owner record names it on this
    /// host already (a promotion claimed it, then the daemon restarted before it served), so
    /// no other shadow may be promoted in its place.
    pub fn begin_claimed_failover(
        &mut self,
        service: &str,
        from: &str,
        shadow: &str,
    ) -> Result<FailoverStart, Refused> {
        self.begin_failover_with(service, from, Trigger::Recovery, Some(shadow))
    }

    fn begin_failover_with(
        &mut self,
        service: &str,
        from: &str,
        trigger: Trigger,
        pick: Option<&str>,
    ) -> Result<FailoverStart, Refused> {
        let svc = self.svc_mut(service)?;
        if svc.active != from {
            return Err(Refused::NotActive {
                service: service.to_string(),
                domain: from.to_string(),
                active: svc.active.clone(),
            });
        }
        if matches!(
            svc.state,
            ServiceState::FailingOver { .. }
                | ServiceState::Stopped
                | ServiceState::HandingOver { .. }
        ) {
            return Err(Refused::WrongState {
                service: service.to_string(),
                state: svc.state.label(),
                what: "fail over",
            });
        }
        let from_host = svc.primary_host().cloned();
        // A pooled class's primary takes the pool's ready shadow when it has none of its own
        // (never for a promotion of a named shadow).
        let wants_pool = pick.is_none() && svc.ready_shadow().is_none() && from_host.is_none();
        let class = svc.class.clone();
        let pooled = if wants_pool {
            self.pools.get_mut(&class).and_then(Pool::take_ready)
        } else {
            None
        };
        let svc = self.services.get_mut(service).expect("checked above");
        let is_pooled = pooled.is_some();
        if let Some(p) = pooled {
            svc.last_generation += 1;
            svc.shadows.push(Shadow {
                state: ShadowState::PAUSED,
                ..p
            });
        }
        let shadow = match pick {
            None => svc.ready_shadow().cloned(),
            Some(name) => {
                let named = svc
                    .shadows
                    .iter()
                    .find(|s| s.name == name && s.state.is_standby());
                let Some(named) = named.cloned() else {
                    return Err(Refused::NoSuchShadow {
                        service: service.to_string(),
                        shadow: name.to_string(),
                        what: "standing-by",
                    });
                };
                Some(named)
            }
        };
        let Some(shadow) = shadow else {
            // A primary elsewhere may have shadows on other hosts: not down for this host.
            if from_host.is_none() {
                svc.state = ServiceState::Down {
                    reason: "primary failed; no paused shadow".into(),
                };
            }
            return Err(Refused::NoShadow {
                service: service.to_string(),
            });
        };
        svc.state = ServiceState::FailingOver {
            shadow: shadow.name.clone(),
            trigger,
            from_host: from_host.clone(),
            standby: shadow.state,
        };
        if let Some(s) = svc.shadow_mut(&shadow.name) {
            s.state = ShadowState::Promoting;
        }
        let start = FailoverStart {
            class: svc.class.clone(),
            old_primary: svc.active.clone(),
            old_host: from_host,
            old_taps: svc.active_taps.clone(),
            // A pooled shadow's name is not the service's: its generation is the next one.
            shadow_generation: if is_pooled {
                svc.last_generation
            } else {
                shadow_generation(service, &shadow.name).unwrap_or(0)
            },
            pooled: is_pooled,
            shadow,
        };
        if is_pooled {
            // The other primaries of the class stand unprotected until the pool refills.
            self.settle_pool(&class);
        }
        Ok(start)
    }

    /// A planned switchover asked by an operator: refused unless the service runs and has a
    /// paused shadow, so a refusal never marks the service Down.
    pub fn begin_switchover(&mut self, service: &str) -> Result<FailoverStart, Refused> {
        let svc = self.require(service)?;
        if !svc.state.is_running() {
            return Err(Refused::WrongState {
                service: service.to_string(),
                state: svc.state.label(),
                what: "switch over",
            });
        }
        let pooled = self.pools.get(&svc.class).and_then(Pool::ready).is_some();
        if svc.ready_shadow().is_none() && !pooled {
            return Err(Refused::NoShadow {
                service: service.to_string(),
            });
        }
        let active = svc.active.clone();
        self.begin_failover(service, &active, Trigger::Manual)
    }

    /// The promotion of `shadow` succeeded: it is the active primary now, with `taps`.
    pub fn failover_succeeded(
        &mut self,
        service: &str,
        shadow: &str,
        record: FailoverRecord,
        taps: Vec<TapBinding>,
    ) -> Result<Vec<Action>, Refused> {
        let svc = self.svc_mut(service)?;
        let (trigger, from_host, _) = promoting(svc, service, shadow, "complete a failover")?;
        let remote_old = from_host.is_some();
        let old = std::mem::replace(&mut svc.active, shadow.to_string());
        svc.shadows.retain(|s| s.name != shadow);
        svc.active_taps = taps;
        svc.state = ServiceState::Provisioning;
        svc.promote_attempts = 0;
        svc.last_failover = Some(record);
        let mut actions = Vec::new();
        // A hung primary elsewhere is its own host's to destroy (it retires it when it sees
        // the new owner).
        if trigger == Trigger::Heartbeat && !remote_old {
            actions.push(Action::FenceGrace {
                service: service.to_string(),
                old,
            });
        }
        actions.push(Action::WatchPrimary {
            service: service.to_string(),
            domain: shadow.to_string(),
        });
        actions.push(Action::EnsureShadowsLater);
        Ok(actions)
    }

    /// The promotion of `shadow` failed: the shadow is removed (it may be half promoted) and,
    /// within the class's retry limit, another failover follows.
    pub fn failover_failed(
        &mut self,
        service: &str,
        shadow: &str,
        record: FailoverRecord,
        limits: ClassLimits,
    ) -> Result<Vec<Action>, Refused> {
        let svc = self.svc_mut(service)?;
        if !matches!(&svc.state, ServiceState::FailingOver { shadow: s, .. } if s == shadow) {
            return Err(Refused::WrongState {
                service: service.to_string(),
                state: svc.state.label(),
                what: "fail a failover to that shadow",
            });
        }
        if let Some(s) = svc.shadow_mut(shadow) {
            s.state = ShadowState::Failed;
        }
        if let ServiceState::FailingOver {
            from_host: Some(host),
            ..
        } = &svc.state
        {
            // The primary's host reported it dead; the other hosts' shadows may still take
            // over: this one stands aside rather than declare the service down.
            svc.state = ServiceState::Elsewhere { host: host.clone() };
            svc.last_failover = Some(record);
            return Ok(vec![Action::RemoveShadow {
                service: service.to_string(),
                shadow: shadow.to_string(),
            }]);
        }
        svc.promote_attempts += 1;
        svc.state = ServiceState::Down {
            reason: format!(
                "failover failed (attempt {}): {}",
                svc.promote_attempts,
                record.error.as_deref().unwrap_or("unknown error")
            ),
        };
        svc.last_failover = Some(record);
        let mut actions = vec![Action::RemoveShadow {
            service: service.to_string(),
            shadow: shadow.to_string(),
        }];
        if svc.promote_attempts <= limits.promote_retry_limit {
            actions.push(Action::Failover {
                service: service.to_string(),
                from: svc.active.clone(),
                trigger: Trigger::Recovery,
            });
            actions.push(Action::EnsureShadows);
        }
        Ok(actions)
    }

    // ---- shadows -------------------------------------------------------------------------

    /// Reserves names for the shadows each service lacks, marking them Booting. A service that
    /// is down still gets one (within its retry limit): a new shadow is how it comes back.
    pub fn plan_shadows(
        &mut self,
        limits: impl Fn(&str) -> ClassLimits,
        now: Instant,
    ) -> Vec<ShadowToProvision> {
        let mut out = Vec::new();
        for svc in self.services.values_mut() {
            let lim = limits(&svc.class);
            if lim.pool.is_some() {
                continue;
            }
            let down_retry = matches!(svc.state, ServiceState::Down { .. })
                && svc.promote_attempts <= lim.promote_retry_limit;
            if !(svc.state.is_running() || down_retry) {
                continue;
            }
            if svc.provision_not_before.is_some_and(|t| now < t) {
                continue;
            }
            let want = (lim.shadows as usize).max(usize::from(down_retry));
            let have = svc.shadows.iter().filter(|s| standing_by(s)).count();
            if have >= want {
                if svc.state == ServiceState::Provisioning
                    && svc.shadows.iter().all(|s| s.state.is_standby())
                {
                    svc.state = ServiceState::Protected;
                }
                continue;
            }
            if !down_retry {
                svc.state = ServiceState::Provisioning;
            }
            // Generations only grow: a rebuilt or replaced shadow never reuses a name.
            let next = svc
                .shadows
                .iter()
                .filter_map(|s| shadow_generation(&svc.name, &s.name))
                .chain(shadow_generation(&svc.name, &svc.active))
                .chain([svc.last_generation])
                .max()
                .unwrap_or(0)
                + 1;
            svc.last_generation = next;
            let name = shadow_name(&svc.name, next);
            svc.shadows.push(Shadow {
                name: name.clone(),
                state: ShadowState::Booting,
                taps: Vec::new(),
                data_disks: None,
            });
            out.push(ShadowToProvision {
                service: svc.name.clone(),
                class: svc.class.clone(),
                primary: svc.active.clone(),
                name,
                generation: next,
                pooled: false,
            });
        }
        out.extend(self.plan_pools(&limits, now));
        out
    }

    /// The pool pass of [`Self::plan_shadows`]: each pooled class gets its pool, the pool the
    /// shadows its covered primaries want, and each covered primary is Protected exactly while
    /// the pool has a shadow ready for it.
    fn plan_pools(
        &mut self,
        limits: &impl Fn(&str) -> ClassLimits,
        now: Instant,
    ) -> Vec<ShadowToProvision> {
        let mut classes: Vec<(String, ClassLimits)> = self
            .services
            .values()
            .map(|s| (s.class.clone(), limits(&s.class)))
            .filter(|(_, l)| l.pool.is_some())
            .collect();
        classes.sort_by(|a, b| a.0.cmp(&b.0));
        classes.dedup_by(|a, b| a.0 == b.0);
        let mut out = Vec::new();
        for (class, lim) in classes {
            let per = lim.pool.expect("filtered above");
            let covered = self.covered_by_pool(&class, lim).len();
            let pool = self
                .pools
                .entry(class.clone())
                .or_insert_with(|| Pool::new(&class, per));
            pool.primaries_per_shadow = per.max(1);
            let backing_off = pool.provision_not_before.is_some_and(|t| now < t);
            // Service first: no pooled shadow boots while one of the class is being promoted
            // (the promotion's guest commands would compete with its boot for the CPU); the
            // promotion asks again when it is done.
            let promoting = self
                .services
                .values()
                .any(|s| s.class == class && matches!(s.state, ServiceState::FailingOver { .. }));
            let pool = self.pools.get_mut(&class).expect("inserted above");
            while !backing_off && !promoting && pool.counted() < pool.wanted(covered) {
                let (name, generation) = pool.reserve();
                out.push(ShadowToProvision {
                    service: pool.name.clone(),
                    class: class.clone(),
                    primary: String::new(),
                    name,
                    generation,
                    pooled: true,
                });
            }
            self.settle_pool(&class);
        }
        out
    }

    /// Shadows standing by that the configuration no longer asks for, marked Failed (no longer
    /// promotable nor counted) and returned as removals. After a class change: every pooled
    /// shadow of a class that is no longer pooled (and then its pool), the pooled shadows
    /// beyond one per `primaries_per_shadow` covered primaries, a pooled class's services'
    /// own shadows (once its pool has one ready), and a service's shadows beyond its class's
    /// `shadows`; newest first. Only
    /// standing-by shadows go (booting ones are counted, and go once ready, at the next pass),
    /// and nothing of a class while one of its services is failing over or down (its next
    /// shadow is on its way or being taken). Local services only: with a cluster, placement
    /// decides. A class no longer pooled keeps its pool until its primaries are protected by
    /// shadows of their own.
    pub fn surplus_shadows(&mut self, limits: impl Fn(&str) -> ClassLimits) -> Vec<Action> {
        let unsettled: std::collections::BTreeSet<String> = self
            .services
            .values()
            .filter(|s| {
                matches!(
                    s.state,
                    ServiceState::FailingOver { .. } | ServiceState::Down { .. }
                )
            })
            .map(|s| s.class.clone())
            .collect();
        let mut out = Vec::new();
        let remove =
            |owner: &str, shadows: &mut Vec<Shadow>, keep: usize, out: &mut Vec<Action>| {
                let have = shadows.iter().filter(|s| standing_by(s)).count();
                let mut extra = have.saturating_sub(keep);
                for s in shadows.iter_mut().rev() {
                    if extra == 0 {
                        break;
                    }
                    if s.state.is_standby() {
                        s.state = ShadowState::Failed;
                        out.push(Action::RemoveShadow {
                            service: owner.to_string(),
                            shadow: s.name.clone(),
                        });
                        extra -= 1;
                    }
                }
            };
        let classes: Vec<String> = self.pools.keys().cloned().collect();
        for class in classes {
            if unsettled.contains(&class) {
                continue;
            }
            let lim = limits(&class);
            // A class no longer pooled keeps its pool until its primaries stand by with their
            // own shadows: until then the pool still serves them.
            if lim.pool.is_none()
                && self
                    .services
                    .values()
                    .any(|s| s.class == class && s.state != ServiceState::Protected)
            {
                continue;
            }
            let keep = lim.pool.map_or(0, |per| {
                self.covered_by_pool(&class, lim)
                    .len()
                    .div_ceil(per.max(1) as usize)
            });
            let pool = self.pools.get_mut(&class).expect("listed above");
            let name = pool.name.clone();
            remove(&name, &mut pool.shadows, keep, &mut out);
            if lim.pool.is_none() && pool.shadows.is_empty() {
                self.pools.remove(&class);
            }
        }
        for svc in self.services.values_mut() {
            if unsettled.contains(&svc.class)
                || svc.primary_host().is_some()
                || svc.state != ServiceState::Protected
            {
                continue;
            }
            let lim = limits(&svc.class);
            let keep = match lim.pool {
                // Its own shadows go once its pool can stand in.
                Some(_) if self.pools.get(&svc.class).and_then(Pool::ready).is_none() => continue,
                Some(_) => 0,
                None => lim.shadows as usize,
            };
            remove(&svc.name, &mut svc.shadows, keep, &mut out);
        }
        out
    }

    /// Covered primaries are Protected while their pool has a ready shadow, Provisioning
    /// otherwise.
    fn settle_pool(&mut self, class: &str) {
        let ready = self.pools.get(class).and_then(Pool::ready).is_some();
        for svc in self.services.values_mut() {
            if svc.class != class || svc.primary_host().is_some() {
                continue;
            }
            match svc.state {
                ServiceState::Provisioning if ready => svc.state = ServiceState::Protected,
                ServiceState::Protected if !ready => svc.state = ServiceState::Provisioning,
                _ => {}
            }
        }
    }

    /// A pooled shadow is ready: covered primaries are protected again, and the first one that
    /// is down takes it at once.
    fn pool_shadow_ready(&mut self, pool: &str, shadow: Shadow) -> Result<Vec<Action>, Refused> {
        let Some(p) = self.pool_named_mut(pool) else {
            return Err(self.unknown(pool));
        };
        let Some(slot) = p
            .shadow_mut(&shadow.name)
            .filter(|s| s.state == ShadowState::Booting)
        else {
            return Err(Refused::NoSuchShadow {
                service: pool.to_string(),
                shadow: shadow.name,
                what: "booting",
            });
        };
        *slot = shadow;
        p.provision_failures = 0;
        p.provision_not_before = None;
        let class = p.class.clone();
        self.settle_pool(&class);
        Ok(self
            .services
            .values()
            .find(|s| s.class == class && matches!(s.state, ServiceState::Down { .. }))
            .map(|s| Action::Failover {
                service: s.name.clone(),
                from: s.active.clone(),
                trigger: Trigger::Recovery,
            })
            .into_iter()
            .collect())
    }

    /// After a restart: no pooled shadow of `class` may reuse the name of a domain that
    /// exists, in the pool or not (a promoted pooled shadow keeps its name as a primary).
    pub fn pool_generations_used<'a>(
        &mut self,
        class: &str,
        per: u32,
        domains: impl IntoIterator<Item = &'a str>,
    ) {
        let pool = self
            .pools
            .entry(class.to_string())
            .or_insert_with(|| Pool::new(class, per));
        let used = domains
            .into_iter()
            .filter_map(|n| shadow_generation(&pool.name, n))
            .max()
            .unwrap_or(0);
        pool.last_generation = pool.last_generation.max(used);
    }

    /// A pooled shadow found after a restart (from its metadata) joins its class's pool.
    pub fn pool_shadow_found(&mut self, class: &str, per: u32, shadow: Shadow) {
        let pool = self
            .pools
            .entry(class.to_string())
            .or_insert_with(|| Pool::new(class, per));
        if let Some(g) = shadow_generation(&pool.name, &shadow.name) {
            pool.last_generation = pool.last_generation.max(g);
        }
        match pool.shadow_mut(&shadow.name) {
            Some(s) => *s = shadow,
            None => pool.shadows.push(shadow),
        }
    }

    /// A booting shadow is paused and ready. A service that is down promotes it at once.
    pub fn shadow_ready(&mut self, service: &str, shadow: Shadow) -> Result<Vec<Action>, Refused> {
        if self.pool_named_mut(service).is_some() {
            return self.pool_shadow_ready(service, shadow);
        }
        let svc = self.svc_mut(service)?;
        let Some(slot) = svc
            .shadows
            .iter_mut()
            .find(|s| s.name == shadow.name && s.state == ShadowState::Booting)
        else {
            return Err(Refused::NoSuchShadow {
                service: service.to_string(),
                shadow: shadow.name,
                what: "booting",
            });
        };
        *slot = shadow;
        svc.provision_failures = 0;
        svc.provision_not_before = None;
        svc.settle();
        Ok(match svc.state {
            ServiceState::Down { .. } => vec![Action::Failover {
                service: service.to_string(),
                from: svc.active.clone(),
                trigger: Trigger::Recovery,
            }],
            _ => Vec::new(),
        })
    }

    /// Provisioning a shadow failed: it is removed, and the next attempt waits (doubling up
    /// to `PROVISION_BACKOFF_MAX`). `unprotectable` marks a primary that can never have a
    /// shadow (its spec cannot be cloned).
    pub fn shadow_failed(
        &mut self,
        service: &str,
        shadow: &str,
        reason: &str,
        unprotectable: bool,
        now: Instant,
    ) -> Result<(Vec<Action>, Duration), Refused> {
        if let Some(pool) = self.pool_named_mut(service) {
            // A template that cannot be cloned fails every pooled shadow alike: the pool backs
            // off like a service does, and the covered primaries stay unprotected meanwhile.
            if let Some(s) = pool.shadow_mut(shadow) {
                s.state = ShadowState::Failed;
            }
            pool.provision_failures += 1;
            let wait = PROVISION_BACKOFF_START
                .saturating_mul(1 << pool.provision_failures.min(6).saturating_sub(1))
                .min(PROVISION_BACKOFF_MAX);
            pool.provision_not_before = Some(now + wait);
            return Ok((
                vec![Action::RemoveShadow {
                    service: service.to_string(),
                    shadow: shadow.to_string(),
                }],
                wait,
            ));
        }
        let svc = self.svc_mut(service)?;
        if let Some(s) = svc.shadow_mut(shadow) {
            s.state = ShadowState::Failed;
        }
        svc.provision_failures += 1;
        let wait = PROVISION_BACKOFF_START
            .saturating_mul(1 << svc.provision_failures.min(6).saturating_sub(1))
            .min(PROVISION_BACKOFF_MAX);
        svc.provision_not_before = Some(now + wait);
        if unprotectable && svc.state.is_running() {
            svc.state = ServiceState::Unprotectable {
                reason: reason.to_string(),
            };
        }
        Ok((
            vec![Action::RemoveShadow {
                service: service.to_string(),
                shadow: shadow.to_string(),
            }],
            wait,
        ))
    }

    /// A shadow stopped or crashed outside a promotion: it is removed and replaced.
    pub fn shadow_lost(&mut self, service: &str, shadow: &str) -> Result<Vec<Action>, Refused> {
        let shadows = match self.pools.values().find(|p| p.name == service) {
            Some(pool) => &pool.shadows,
            None => &self.require(service)?.shadows,
        };
        match shadows.iter().find(|s| s.name == shadow) {
            Some(s) if s.state != ShadowState::Promoting => Ok(replace_shadow(service, shadow)),
            _ => Err(Refused::NoSuchShadow {
                service: service.to_string(),
                shadow: shadow.to_string(),
                what: "standing-by or booting",
            }),
        }
    }

    /// A standby verification of `service` begins: its oldest paused shadow is copied. The
    /// shadow stays a member, standing by and promotable throughout; only while it is being
    /// verified a failover prefers another one. Only while the service is protected, one
    /// verification at a time.
    pub fn begin_verify(&mut self, service: &str) -> Result<String, Refused> {
        let svc = self.svc_mut(service)?;
        if !matches!(svc.state, ServiceState::Protected) || svc.verifying.is_some() {
            return Err(Refused::WrongState {
                service: service.to_string(),
                state: if svc.verifying.is_some() {
                    "verifying"
                } else {
                    svc.state.label()
                },
                what: "verify a shadow",
            });
        }
        let Some(s) = svc.shadows.iter().find(|s| s.state == ShadowState::PAUSED) else {
            return Err(Refused::NoShadow {
                service: service.to_string(),
            });
        };
        let name = s.name.clone();
        svc.verifying = Some(name.clone());
        Ok(name)
    }

    /// The verification of `shadow` ended. A shadow whose copy answered wrongly (`broken`) is
    /// taken out of the service and a replacement is provisioned, if it still stands by; if it
    /// was promoted or removed meanwhile, the refusal says so and nothing changes.
    pub fn end_verify(
        &mut self,
        service: &str,
        shadow: &str,
        broken: bool,
    ) -> Result<Vec<Action>, Refused> {
        let svc = self.svc_mut(service)?;
        if svc.verifying.as_deref() == Some(shadow) {
            svc.verifying = None;
        }
        if !broken {
            return Ok(Vec::new());
        }
        match svc.shadow_mut(shadow) {
            Some(s) if s.state.is_standby() => {
                // Not promotable from now on, and no longer counted: the next pass replaces it.
                s.state = ShadowState::Failed;
                Ok(replace_shadow(service, shadow))
            }
            _ => Err(Refused::NoSuchShadow {
                service: service.to_string(),
                shadow: shadow.to_string(),
                what: "standing-by",
            }),
        }
    }

    /// The paused shadow being verified must run for a moment (its memory was written out, and
    /// QEMU refuses to write it out again, as a later verification or a move to the saved tier
    /// does, until it has run): it is not promotable meanwhile. Refused during a failover and
    /// unless it stands by paused.
    pub fn begin_settle(&mut self, service: &str, shadow: &str) -> Result<(), Refused> {
        let svc = self.svc_mut(service)?;
        svc.refuse_while_failing_over(service, "run a shadow for a moment")?;
        match svc.shadow_mut(shadow) {
            Some(s) if s.state == ShadowState::PAUSED => {
                s.state = ShadowState::Switching(Tier::Paused);
                Ok(())
            }
            _ => Err(Refused::NoSuchShadow {
                service: service.to_string(),
                shadow: shadow.to_string(),
                what: "paused",
            }),
        }
    }

    /// The shadow of [`Self::begin_settle`] is paused again; a service that went down
    /// meanwhile promotes it at once.
    pub fn settled(&mut self, service: &str, shadow: &str) -> Result<Vec<Action>, Refused> {
        let taps = self
            .require(service)?
            .shadows
            .iter()
            .find(|s| s.name == shadow)
            .map(|s| s.taps.clone())
            .unwrap_or_default();
        self.tier_switched(service, shadow, Tier::Paused, taps)
    }

    /// A shadow is gone from libvirt: it leaves the table.
    pub fn shadow_removed(&mut self, service: &str, shadow: &str) {
        if let Some(svc) = self.services.get_mut(service) {
            svc.shadows.retain(|x| x.name != shadow);
        }
        if let Some(pool) = self.pool_named_mut(service) {
            pool.shadows.retain(|x| x.name != shadow);
        }
    }

    /// A shadow found after a restart (from its metadata) joins its service.
    pub fn shadow_found(&mut self, service: &str, shadow: Shadow) -> Result<(), Refused> {
        let svc = self.svc_mut(service)?;
        match svc.shadow_mut(&shadow.name) {
            Some(s) => *s = shadow,
            None => svc.shadows.push(shadow),
        }
        Ok(())
    }

    /// A shadow went back on standby (interrupted promotion undone): paused, with `taps`.
    pub fn shadow_reparked(
        &mut self,
        service: &str,
        shadow: &str,
        taps: Vec<TapBinding>,
    ) -> Result<(), Refused> {
        let svc = self.svc_mut(service)?;
        let Some(s) = svc.shadow_mut(shadow) else {
            return Err(Refused::NoSuchShadow {
                service: service.to_string(),
                shadow: shadow.to_string(),
                what: "known",
            });
        };
        s.state = ShadowState::PAUSED;
        s.taps = taps;
        Ok(())
    }

    /// A shadow standing by starts moving to tier `to` (the `adaptive` policy); it cannot be
    /// promoted until [`Self::tier_switched`]. Refused during a failover.
    pub fn begin_tier_switch(
        &mut self,
        service: &str,
        shadow: &str,
        to: Tier,
    ) -> Result<(), Refused> {
        let svc = self.svc_mut(service)?;
        svc.refuse_while_failing_over(service, "switch a shadow's tier")?;
        match svc.shadow_mut(shadow) {
            Some(s) if matches!(s.state, ShadowState::Standby(t) if t != to) => {
                s.state = ShadowState::Switching(to);
                Ok(())
            }
            _ => Err(Refused::NoSuchShadow {
                service: service.to_string(),
                shadow: shadow.to_string(),
                what: "standing-by (in another tier)",
            }),
        }
    }

    /// A switching shadow stands by in `tier` now, with `taps` (a restored shadow has new
    /// ones). A service that went down meanwhile promotes it at once.
    pub fn tier_switched(
        &mut self,
        service: &str,
        shadow: &str,
        tier: Tier,
        taps: Vec<TapBinding>,
    ) -> Result<Vec<Action>, Refused> {
        let svc = self.svc_mut(service)?;
        let Some(s) = svc
            .shadow_mut(shadow)
            .filter(|s| s.state == ShadowState::Switching(tier))
        else {
            return Err(Refused::NoSuchShadow {
                service: service.to_string(),
                shadow: shadow.to_string(),
                what: "switching",
            });
        };
        s.state = ShadowState::Standby(tier);
        s.taps = taps;
        svc.settle();
        Ok(match svc.state {
            ServiceState::Down { .. } => vec![Action::Failover {
                service: service.to_string(),
                from: svc.active.clone(),
                trigger: Trigger::Recovery,
            }],
            _ => Vec::new(),
        })
    }

    /// The taps of a shadow, read from libvirt.
    pub fn set_shadow_taps(&mut self, service: &str, shadow: &str, taps: Vec<TapBinding>) {
        if let Some(s) = self
            .services
            .get_mut(service)
            .and_then(|v| v.shadow_mut(shadow))
        {
            s.taps = taps;
        }
    }

    /// The taps of the active primary, read from libvirt.
    pub fn set_active_taps(&mut self, service: &str, taps: Vec<TapBinding>) {
        if let Some(s) = self.services.get_mut(service) {
            s.active_taps = taps;
        }
    }

    /// Operator rebuild or reinit: every shadow is to be removed and a service that was
    /// protected (or unprotectable) provisions again. Returns the shadows to remove.
    pub fn rebuild(&mut self, service: &str) -> Result<Vec<String>, Refused> {
        let svc = self.svc_mut(service)?;
        if matches!(
            svc.state,
            ServiceState::FailingOver { .. }
                | ServiceState::Elsewhere { .. }
                | ServiceState::HandingOver { .. }
        ) {
            return Err(Refused::WrongState {
                service: service.to_string(),
                state: svc.state.label(),
                what: "rebuild its shadows",
            });
        }
        if matches!(
            svc.state,
            ServiceState::Protected | ServiceState::Unprotectable { .. }
        ) {
            svc.state = ServiceState::Provisioning;
        }
        Ok(svc.shadows.iter().map(|s| s.name.clone()).collect())
    }

    // ---- stop and start ------------------------------------------------------------------

    /// `understudy stop`: the primary is shut off on purpose, never a failure.
    pub fn stop(&mut self, service: &str) -> Result<&Service, Refused> {
        let svc = self.svc_mut(service)?;
        if matches!(
            svc.state,
            ServiceState::FailingOver { .. }
                | ServiceState::Elsewhere { .. }
                | ServiceState::HandingOver { .. }
        ) {
            return Err(Refused::WrongState {
                service: service.to_string(),
                state: svc.state.label(),
                what: "stop",
            });
        }
        svc.state = ServiceState::Stopped;
        Ok(svc)
    }

    /// `understudy start`, or a stopped primary started by someone: protected again.
    pub fn start(&mut self, service: &str) -> Result<&Service, Refused> {
        let svc = self.svc_mut(service)?;
        if matches!(
            svc.state,
            ServiceState::FailingOver { .. }
                | ServiceState::Elsewhere { .. }
                | ServiceState::HandingOver { .. }
        ) {
            return Err(Refused::WrongState {
                service: service.to_string(),
                state: svc.state.label(),
                what: "start",
            });
        }
        svc.state = ServiceState::Provisioning;
        Ok(svc)
    }

    /// libvirt reports the primary of a stopped service started: it is protected again.
    /// Refused (and nothing changes) unless the service was stopped.
    pub fn primary_started(&mut self, service: &str) -> Result<&Service, Refused> {
        match self.require(service)?.state {
            ServiceState::Stopped => self.start(service),
            ref other => Err(Refused::WrongState {
                service: service.to_string(),
                state: other.label(),
                what: "restart a primary that was not stopped",
            }),
        }
    }

    // ---- other hosts ---------------------------------------------------------------------

    /// A primary published by another host: this host follows it (Elsewhere), to hold
    /// shadows of it and take over when its host reports it dead. Refused for a service whose
    /// primary runs here (the owner record decides that: [`Self::owner_changed`]).
    pub fn follow(
        &mut self,
        service: &str,
        class: &str,
        domain: &str,
        host: &HostId,
    ) -> Result<(), Refused> {
        let Some(svc) = self.services.get_mut(service) else {
            self.services.insert(
                service.to_string(),
                Service::new(
                    service,
                    class,
                    domain,
                    ServiceState::Elsewhere { host: host.clone() },
                ),
            );
            return Ok(());
        };
        if !matches!(svc.state, ServiceState::Elsewhere { .. }) {
            return Err(Refused::WrongState {
                service: service.to_string(),
                state: svc.state.label(),
                what: "follow a primary on another host",
            });
        }
        svc.class = class.to_string();
        svc.active = domain.to_string();
        svc.state = ServiceState::Elsewhere { host: host.clone() };
        Ok(())
    }

    /// A primary elsewhere is no longer published (unprotected there): the service leaves
    /// the table. Returns the shadows here to remove.
    pub fn unfollow(&mut self, service: &str) -> Result<Vec<String>, Refused> {
        let svc = self.require(service)?;
        if !matches!(svc.state, ServiceState::Elsewhere { .. }) {
            return Err(Refused::WrongState {
                service: service.to_string(),
                state: svc.state.label(),
                what: "forget it (its primary runs here)",
            });
        }
        let shadows = svc.shadows.iter().map(|s| s.name.clone()).collect();
        self.services.remove(service);
        Ok(shadows)
    }

    /// A service's owner record was written (by any host; `me` is this one). When another
    /// host now serves a service whose primary ran here, that primary is retired (it is
    /// dead, or fenced by a handover); a service elsewhere follows its new owner. This
    /// host's own claims are answered through the promotion ([`Self::failover_succeeded`],
    /// [`Self::failover_lost`]).
    pub fn owner_changed(&mut self, record: &OwnerRecord, me: &HostId) -> Vec<Action> {
        let Some(svc) = self.services.get_mut(&record.service) else {
            return Vec::new();
        };
        if matches!(svc.state, ServiceState::FailingOver { .. }) {
            return Vec::new();
        }
        if &record.host == me {
            // Followed elsewhere, yet the record names a domain here that is neither the one
            // followed nor a shadow here (a shadow here is this host's own claim, which the
            // promotion, or a restarted daemon's recovery, answers).
            let given_back = matches!(svc.state, ServiceState::Elsewhere { .. })
                && record.domain != svc.active
                && !svc.shadows.iter().any(|s| s.name == record.domain);
            return if given_back {
                vec![Action::GivenBack {
                    service: record.service.clone(),
                    domain: record.domain.clone(),
                }]
            } else {
                Vec::new()
            };
        }
        svc.remote_shadows
            .retain(|r| !(r.name == record.domain && r.host == record.host));
        let moved_here = svc.primary_host().is_none();
        let old = std::mem::replace(&mut svc.active, record.domain.clone());
        svc.state = ServiceState::Elsewhere {
            host: record.host.clone(),
        };
        if moved_here && old != record.domain {
            vec![Action::RetirePrimary {
                service: record.service.clone(),
                old,
            }]
        } else {
            Vec::new()
        }
    }

    /// The owner record names `domain`, a former primary of the service here that is not
    /// running (retired when another host claimed the service, or dead), after that host's
    /// promotion failed and gave the service back: the service is down here until a shadow
    /// (here or elsewhere) takes over.
    pub fn given_back(&mut self, service: &str, domain: &str) -> Result<(), Refused> {
        let svc = self.svc_mut(service)?;
        let ServiceState::Elsewhere { host } = &svc.state else {
            return Err(Refused::WrongState {
                service: service.to_string(),
                state: svc.state.label(),
                what: "take back a service given back",
            });
        };
        svc.state = ServiceState::Down {
            reason: format!(
                "host {host} gave the service back after its promotion failed; {domain} does not run"
            ),
        };
        svc.active = domain.to_string();
        svc.remote_shadows.retain(|r| r.name != domain);
        Ok(())
    }

    /// This host's claim for `shadow` lost: `winner` serves the service. The shadow goes
    /// back on standby, untouched (it was never resumed); a primary that was here is retired.
    pub fn failover_lost(
        &mut self,
        service: &str,
        shadow: &str,
        winner: &OwnerRecord,
    ) -> Result<Vec<Action>, Refused> {
        let svc = self.svc_mut(service)?;
        let (_, from_host, standby) = promoting(svc, service, shadow, "lose a claim")?;
        let primary_was_here = from_host.is_none();
        if let Some(x) = svc.shadow_mut(shadow) {
            x.state = standby;
        }
        let old = std::mem::replace(&mut svc.active, winner.domain.clone());
        svc.state = ServiceState::Elsewhere {
            host: winner.host.clone(),
        };
        Ok(if primary_was_here && old != winner.domain {
            vec![Action::RetirePrimary {
                service: service.to_string(),
                old,
            }]
        } else {
            Vec::new()
        })
    }

    /// A planned switchover of the primary here to the ready shadow on host `to`: the
    /// service is HandingOver until that host claims it ([`Self::owner_changed`]) or the
    /// handover is given up ([`Self::handover_failed`]).
    pub fn begin_handover(&mut self, service: &str, to: &HostId) -> Result<HandoverStart, Refused> {
        let svc = self.svc_mut(service)?;
        if !svc.state.is_running() {
            return Err(Refused::WrongState {
                service: service.to_string(),
                state: svc.state.label(),
                what: "hand over to another host",
            });
        }
        let Some(shadow) = svc
            .remote_shadows
            .iter()
            .find(|r| &r.host == to && r.ready)
            .map(|r| r.name.clone())
        else {
            let mut hosts: Vec<String> = svc
                .remote_shadows
                .iter()
                .filter(|r| r.ready)
                .map(|r| r.host.to_string())
                .collect();
            hosts.dedup();
            return Err(Refused::NoShadowOnHost {
                service: service.to_string(),
                host: to.clone(),
                ready_on: if hosts.is_empty() {
                    "(none)".into()
                } else {
                    hosts.join(", ")
                },
            });
        };
        svc.state = ServiceState::HandingOver {
            to: to.clone(),
            shadow: shadow.clone(),
        };
        Ok(HandoverStart {
            class: svc.class.clone(),
            primary: svc.active.clone(),
            taps: svc.active_taps.clone(),
            to: to.clone(),
            shadow,
        })
    }

    /// The other host did not take over: the primary here serves again.
    pub fn handover_failed(&mut self, service: &str) -> Result<Vec<Action>, Refused> {
        let svc = self.svc_mut(service)?;
        if !matches!(svc.state, ServiceState::HandingOver { .. }) {
            return Err(Refused::WrongState {
                service: service.to_string(),
                state: svc.state.label(),
                what: "give up a handover",
            });
        }
        svc.state = ServiceState::Provisioning;
        svc.settle();
        Ok(vec![Action::Unfence {
            service: service.to_string(),
            domain: svc.active.clone(),
        }])
    }

    /// A shadow of the service registered by another host, new or changed.
    pub fn remote_shadow(&mut self, service: &str, shadow: RemoteShadow) {
        if let Some(svc) = self.services.get_mut(service) {
            match svc
                .remote_shadows
                .iter_mut()
                .find(|r| r.name == shadow.name && r.host == shadow.host)
            {
                Some(r) => *r = shadow,
                None => svc.remote_shadows.push(shadow),
            }
        }
    }

    /// A shadow registration of another host is gone (removed, or expired with its lease).
    pub fn remote_shadow_gone(&mut self, service: &str, shadow: &str, host: &HostId) {
        if let Some(svc) = self.services.get_mut(service) {
            svc.remote_shadows
                .retain(|r| !(r.name == shadow && &r.host == host));
        }
    }

    /// Reserves the name of one more shadow here, where placement put it (with a cluster):
    /// of a running primary here, of one that is down within its retry limit, or of a primary
    /// elsewhere (then provisioned from its published spec). Names are above every generation
    /// seen on any host, plus `slot`: the place of this host among the hosts that placement
    /// gave a new shadow in the same round (every host computes the same list), so two hosts
    /// provisioning at once never pick the same name.
    pub fn reserve_shadow(
        &mut self,
        service: &str,
        limits: ClassLimits,
        slot: u64,
    ) -> Result<ShadowToProvision, Refused> {
        let svc = self.svc_mut(service)?;
        let down_retry = matches!(svc.state, ServiceState::Down { .. })
            && svc.promote_attempts <= limits.promote_retry_limit;
        let elsewhere = matches!(svc.state, ServiceState::Elsewhere { .. });
        if !(svc.state.is_running() || down_retry || elsewhere) {
            return Err(Refused::WrongState {
                service: service.to_string(),
                state: svc.state.label(),
                what: "provision a shadow",
            });
        }
        if svc.state == ServiceState::Protected {
            svc.state = ServiceState::Provisioning;
        }
        let next = svc
            .shadows
            .iter()
            .map(|s| s.name.as_str())
            .chain(svc.remote_shadows.iter().map(|r| r.name.as_str()))
            .chain([svc.active.as_str()])
            .filter_map(|n| shadow_generation(&svc.name, n))
            .chain([svc.last_generation])
            .max()
            .unwrap_or(0)
            + 1
            + slot;
        svc.last_generation = next;
        let name = shadow_name(&svc.name, next);
        svc.shadows.push(Shadow {
            name: name.clone(),
            state: ShadowState::Booting,
            taps: Vec::new(),
            data_disks: None,
        });
        Ok(ShadowToProvision {
            service: svc.name.clone(),
            class: svc.class.clone(),
            primary: svc.active.clone(),
            name,
            generation: next,
            pooled: false,
        })
    }

    // ---- health --------------------------------------------------------------------------

    /// Records the health verdict; returns whether it changed.
    pub fn set_health(&mut self, service: &str, label: &str) -> bool {
        match self.services.get_mut(service) {
            Some(s) if s.health != label => {
                s.health = label.to_string();
                true
            }
            _ => false,
        }
    }

    /// Records an answered heartbeat.
    pub fn heartbeat(&mut self, service: &str, at_unix_ms: u64) {
        if let Some(s) = self.services.get_mut(service) {
            s.last_heartbeat_unix_ms = Some(at_unix_ms);
        }
    }
}

/// The actions that remove `shadow` of `service` and provision its replacement.
fn replace_shadow(service: &str, shadow: &str) -> Vec<Action> {
    vec![
        Action::RemoveShadow {
            service: service.to_string(),
            shadow: shadow.to_string(),
        },
        Action::EnsureShadows,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_label_is_exported_by_the_metrics() {
        let t = Trigger::Pidfd;
        let reason = String::new;
        for state in [
            ServiceState::Provisioning,
            ServiceState::Protected,
            ServiceState::FailingOver {
                shadow: String::new(),
                trigger: t,
                from_host: None,
                standby: ShadowState::PAUSED,
            },
            ServiceState::Down { reason: reason() },
            ServiceState::Stopped,
            ServiceState::Unprotectable { reason: reason() },
            ServiceState::Elsewhere {
                host: HostId(reason()),
            },
            ServiceState::HandingOver {
                to: HostId(reason()),
                shadow: reason(),
            },
        ] {
            assert!(
                crate::api::metrics::KNOWN_SERVICE_STATES.contains(&state.label()),
                "{}",
                state.label()
            );
        }
    }

    const LIMITS: ClassLimits = ClassLimits {
        shadows: 1,
        promote_retry_limit: 2,
        pool: None,
    };

    /// A pooled class: no shadow per primary, one pooled shadow per four primaries.
    const POOLED: ClassLimits = ClassLimits {
        shadows: 0,
        promote_retry_limit: 2,
        pool: Some(4),
    };

    /// Shadow names the actions remove.
    fn removed(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .map(|a| match a {
                Action::RemoveShadow { service, shadow } => format!("{service}/{shadow}"),
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    #[test]
    fn pooled_shadows_the_configuration_no_longer_asks_for_are_removed() {
        let mut t = ServiceTable::new();
        for n in ["a", "b", "c", "d", "e"] {
            t.protect(n, "web", true).unwrap();
        }
        let now = Instant::now();
        let two = ClassLimits {
            pool: Some(2),
            ..POOLED
        };
        for p in t.plan_shadows(|_| two, now) {
            t.shadow_ready("web-pool", paused(&p.name)).unwrap();
        }
        assert_eq!(
            t.pools().next().unwrap().shadows.len(),
            3,
            "five primaries, 1:2"
        );
        assert!(t.surplus_shadows(|_| two).is_empty(), "as configured");
        // A reload makes it 1:4: one of the three goes, the newest.
        assert_eq!(
            removed(&t.surplus_shadows(|_| POOLED)),
            ["web-pool/web-pool-shadow-3"]
        );
        assert!(
            t.surplus_shadows(|_| POOLED).is_empty(),
            "a removal under way is not asked for twice"
        );
        t.shadow_removed("web-pool", "web-pool-shadow-3");
        assert!(t.plan_shadows(|_| POOLED, now).is_empty());
        // Nothing goes while one of the class fails over.
        t.begin_failover("a", "a", Trigger::Pidfd).unwrap();
        assert!(t.surplus_shadows(|_| LIMITS).is_empty());
        t.failover_succeeded("a", "web-pool-shadow-1", record(true), Vec::new())
            .unwrap();
        // The class is no longer pooled: its pool goes once its primaries have shadows of
        // their own, then the pool itself.
        let own = t.plan_shadows(|_| LIMITS, now);
        assert_eq!(own.len(), 5);
        assert!(
            t.surplus_shadows(|_| LIMITS).is_empty(),
            "the pool still stands in meanwhile"
        );
        for p in own {
            t.shadow_ready(&p.service, paused(&p.name)).unwrap();
        }
        assert_eq!(
            removed(&t.surplus_shadows(|_| LIMITS)),
            ["web-pool/web-pool-shadow-2"]
        );
        t.shadow_removed("web-pool", "web-pool-shadow-2");
        assert!(t.surplus_shadows(|_| LIMITS).is_empty());
        assert_eq!(t.pools().count(), 0);
    }

    #[test]
    fn own_shadows_beyond_the_class_go_a_pooled_class_keeps_them_until_its_pool_is_ready() {
        let mut t = ServiceTable::new();
        let two = ClassLimits {
            shadows: 2,
            ..LIMITS
        };
        t.protect("a", "web", true).unwrap();
        // One shadow per pass.
        for _ in 0..2 {
            for p in t.plan_shadows(|_| two, Instant::now()) {
                t.shadow_ready("a", paused(&p.name)).unwrap();
            }
        }
        assert_eq!(t.get("a").unwrap().shadows.len(), 2);
        assert_eq!(t.get("a").unwrap().state, ServiceState::Protected);
        assert!(t.surplus_shadows(|_| two).is_empty());
        assert_eq!(removed(&t.surplus_shadows(|_| LIMITS)), ["a/a-shadow-2"]);
        t.shadow_removed("a", "a-shadow-2");
        // Now pooled: its own shadow stays until the pool has one ready.
        let planned = t.plan_shadows(|_| POOLED, Instant::now());
        assert_eq!(planned.len(), 1);
        assert!(t.surplus_shadows(|_| POOLED).is_empty());
        t.shadow_ready("web-pool", paused(&planned[0].name))
            .unwrap();
        assert_eq!(removed(&t.surplus_shadows(|_| POOLED)), ["a/a-shadow-1"]);
    }

    #[test]
    fn two_primaries_share_one_pooled_shadow_and_the_first_to_fail_takes_it() {
        let mut t = ServiceTable::new();
        t.protect("a", "web", true).unwrap();
        t.protect("b", "web", true).unwrap();
        let planned = t.plan_shadows(|_| POOLED, Instant::now());
        assert_eq!(
            planned.len(),
            1,
            "one pooled shadow covers both: {planned:?}"
        );
        let p = &planned[0];
        assert_eq!(
            (p.service.as_str(), p.name.as_str(), p.pooled),
            ("web-pool", "web-pool-shadow-1", true)
        );
        assert!(t.plan_shadows(|_| POOLED, Instant::now()).is_empty());
        assert_eq!(t.get("a").unwrap().state, ServiceState::Provisioning);
        assert_eq!(
            t.member("web-pool-shadow-1"),
            Some(Member::Shadow {
                service: "web-pool".into(),
                state: ShadowState::Booting
            })
        );
        assert!(t
            .shadow_ready("web-pool", paused("web-pool-shadow-1"))
            .unwrap()
            .is_empty());
        assert_eq!(t.get("a").unwrap().state, ServiceState::Protected);
        assert_eq!(t.get("b").unwrap().state, ServiceState::Protected);

        let start = t.begin_failover("a", "a", Trigger::Pidfd).unwrap();
        assert!(start.pooled);
        assert_eq!(start.shadow.name, "web-pool-shadow-1");
        assert_eq!(start.shadow_generation, 1, "the service's next generation");
        assert_eq!(
            t.member("web-pool-shadow-1"),
            Some(Member::Shadow {
                service: "a".into(),
                state: ShadowState::Promoting
            })
        );
        assert!(t.pools().all(|p| p.shadows.is_empty()));
        assert_eq!(
            t.get("b").unwrap().state,
            ServiceState::Provisioning,
            "b is unprotected until the pool refills"
        );
        // A second failure meanwhile finds no shadow: down, until the pool has one again.
        assert!(matches!(
            t.begin_failover("b", "b", Trigger::Pidfd),
            Err(Refused::NoShadow { .. })
        ));
        t.failover_succeeded("a", "web-pool-shadow-1", record(true), Vec::new())
            .unwrap();
        assert_eq!(t.get("a").unwrap().active, "web-pool-shadow-1");
        let refill = t.plan_shadows(|_| POOLED, Instant::now());
        assert_eq!(refill.len(), 1);
        assert_eq!(refill[0].name, "web-pool-shadow-2");
        let actions = t
            .shadow_ready("web-pool", paused("web-pool-shadow-2"))
            .unwrap();
        assert_eq!(
            actions,
            vec![Action::Failover {
                service: "b".into(),
                from: "b".into(),
                trigger: Trigger::Recovery
            }],
            "the down primary takes the new pooled shadow at once"
        );
        assert_eq!(t.get("a").unwrap().state, ServiceState::Protected);
        let start = t.begin_failover("b", "b", Trigger::Recovery).unwrap();
        assert_eq!(start.shadow.name, "web-pool-shadow-2");
    }

    #[test]
    fn a_pool_grows_with_its_primaries_and_backs_off_after_a_failure() {
        let mut t = ServiceTable::new();
        for n in ["a", "b", "c", "d", "e"] {
            t.protect(n, "web", true).unwrap();
        }
        t.protect("stopped", "web", false).unwrap();
        let now = Instant::now();
        let planned = t.plan_shadows(|_| POOLED, now);
        let names: Vec<_> = planned.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["web-pool-shadow-1", "web-pool-shadow-2"]);
        let (actions, wait) = t
            .shadow_failed("web-pool", "web-pool-shadow-1", "boom", false, now)
            .unwrap();
        assert_eq!(
            actions,
            vec![Action::RemoveShadow {
                service: "web-pool".into(),
                shadow: "web-pool-shadow-1".into()
            }]
        );
        t.shadow_removed("web-pool", "web-pool-shadow-1");
        assert!(t.plan_shadows(|_| POOLED, now).is_empty(), "backing off");
        let later = t.plan_shadows(|_| POOLED, now + wait);
        assert_eq!(later[0].name, "web-pool-shadow-3");
        assert!(
            t.shadow_lost("web-pool", "web-pool-shadow-2").is_ok(),
            "a pooled shadow that crashed is replaced"
        );
    }

    #[test]
    fn after_a_restart_no_pooled_shadow_reuses_a_promoted_one_s_name() {
        let mut t = ServiceTable::new();
        t.protect("a", "web", true).unwrap();
        // web-pool-shadow-3 was promoted before the restart: it is a's primary now.
        t.pool_generations_used("web", 4, ["a", "web-pool-shadow-3", "web-pool-shadow-x"]);
        let planned = t.plan_shadows(|_| POOLED, Instant::now());
        assert_eq!(planned[0].name, "web-pool-shadow-4");
    }

    fn record(ok: bool) -> FailoverRecord {
        FailoverRecord {
            at_unix_ms: 1,
            from: "web".into(),
            to: "web-shadow-1".into(),
            trigger: Trigger::Pidfd,
            outage_ms: 40.0,
            steps: Vec::new(),
            ok,
            error: (!ok).then(|| "resume failed".into()),
            notes: Vec::new(),
        }
    }

    fn paused(name: &str) -> Shadow {
        Shadow {
            name: name.into(),
            state: ShadowState::PAUSED,
            taps: Vec::new(),
            data_disks: None,
        }
    }

    /// A running service `web` with one paused shadow.
    fn protected() -> ServiceTable {
        let mut t = ServiceTable::new();
        t.protect("web", "stateless", true).unwrap();
        let planned = t.plan_shadows(|_| LIMITS, Instant::now());
        assert_eq!(planned.len(), 1);
        assert_eq!(planned[0].name, "web-shadow-1");
        t.shadow_ready("web", paused("web-shadow-1")).unwrap();
        assert_eq!(t.get("web").unwrap().state, ServiceState::Protected);
        t
    }

    #[test]
    fn protect_registers_running_and_defined_primaries() {
        let mut t = ServiceTable::new();
        t.protect("a", "c", true).unwrap();
        t.protect("b", "c", false).unwrap();
        assert_eq!(t.get("a").unwrap().state, ServiceState::Provisioning);
        assert_eq!(t.get("b").unwrap().state, ServiceState::Stopped);
        assert!(matches!(
            t.protect("a", "c", true),
            Err(Refused::WrongState { .. })
        ));
    }

    #[test]
    fn plan_shadows_reserves_growing_generations_and_skips_stopped() {
        let mut t = ServiceTable::new();
        t.protect("web", "c", true).unwrap();
        t.protect("db", "c", false).unwrap();
        let two = ClassLimits {
            shadows: 2,
            promote_retry_limit: 0,
            pool: None,
        };
        let p = t.plan_shadows(|_| two, Instant::now());
        assert_eq!(p.len(), 1, "one shadow per round per service: {p:?}");
        let p2 = t.plan_shadows(|_| two, Instant::now());
        assert_eq!(p2[0].name, "web-shadow-2");
        assert!(t.plan_shadows(|_| two, Instant::now()).is_empty());
        // A removed shadow's generation is never reused.
        t.shadow_removed("web", "web-shadow-2");
        assert_eq!(
            t.plan_shadows(|_| two, Instant::now())[0].name,
            "web-shadow-3"
        );
    }

    #[test]
    fn failover_promotes_the_paused_shadow_and_asks_for_a_replacement() {
        let mut t = protected();
        let start = t.begin_failover("web", "web", Trigger::Pidfd).unwrap();
        assert_eq!(start.shadow.name, "web-shadow-1");
        assert_eq!(start.shadow_generation, 1);
        assert_eq!(
            t.member("web-shadow-1"),
            Some(Member::Shadow {
                service: "web".into(),
                state: ShadowState::Promoting
            })
        );
        let actions = t
            .failover_succeeded("web", "web-shadow-1", record(true), Vec::new())
            .unwrap();
        assert_eq!(
            actions,
            vec![
                Action::WatchPrimary {
                    service: "web".into(),
                    domain: "web-shadow-1".into()
                },
                Action::EnsureShadowsLater
            ]
        );
        let s = t.get("web").unwrap();
        assert_eq!(s.active, "web-shadow-1");
        assert!(s.shadows.is_empty());
        assert_eq!(s.state, ServiceState::Provisioning);
    }

    #[test]
    fn a_hang_failover_watches_the_fenced_primary_through_the_grace_period() {
        let mut t = protected();
        t.begin_failover("web", "web", Trigger::Heartbeat).unwrap();
        let actions = t
            .failover_succeeded("web", "web-shadow-1", record(true), Vec::new())
            .unwrap();
        assert_eq!(
            actions[0],
            Action::FenceGrace {
                service: "web".into(),
                old: "web".into()
            }
        );
    }

    #[test]
    fn failover_is_refused_twice_for_stale_domains_and_when_stopped() {
        let mut t = protected();
        t.begin_failover("web", "web", Trigger::Pidfd).unwrap();
        assert!(matches!(
            t.begin_failover("web", "web", Trigger::Lifecycle),
            Err(Refused::WrongState {
                state: "failing_over",
                ..
            })
        ));
        let mut t = protected();
        assert!(matches!(
            t.begin_failover("web", "old-primary", Trigger::Pidfd),
            Err(Refused::NotActive { .. })
        ));
        t.stop("web").unwrap();
        assert!(matches!(
            t.begin_failover("web", "web", Trigger::Pidfd),
            Err(Refused::WrongState {
                state: "stopped",
                ..
            })
        ));
        assert!(matches!(
            t.begin_failover("nope", "x", Trigger::Pidfd),
            Err(Refused::UnknownService { .. })
        ));
    }

    #[test]
    fn failover_without_a_shadow_marks_down_then_the_next_ready_shadow_takes_over() {
        let mut t = ServiceTable::new();
        t.protect("web", "c", true).unwrap();
        let planned = t.plan_shadows(|_| LIMITS, Instant::now());
        assert_eq!(
            t.begin_failover("web", "web", Trigger::Pidfd).unwrap_err(),
            Refused::NoShadow {
                service: "web".into()
            }
        );
        assert_eq!(t.get("web").unwrap().state.label(), "down");
        let actions = t.shadow_ready("web", paused(&planned[0].name)).unwrap();
        assert_eq!(
            actions,
            vec![Action::Failover {
                service: "web".into(),
                from: "web".into(),
                trigger: Trigger::Recovery
            }]
        );
    }

    #[test]
    fn failed_promotion_retries_within_the_limit_then_stays_down() {
        let mut t = protected();
        for attempt in 1..=3u32 {
            // A down service within its retry limit still gets a shadow.
            if attempt > 1 {
                let p = t.plan_shadows(|_| LIMITS, Instant::now());
                assert_eq!(p.len(), 1, "attempt {attempt}");
                t.shadow_ready("web", paused(&p[0].name)).unwrap();
            }
            let start = t.begin_failover("web", "web", Trigger::Pidfd).unwrap();
            let actions = t
                .failover_failed("web", &start.shadow.name, record(false), LIMITS)
                .unwrap();
            assert_eq!(
                actions[0],
                Action::RemoveShadow {
                    service: "web".into(),
                    shadow: start.shadow.name.clone()
                }
            );
            let retried = actions.iter().any(|a| matches!(a, Action::Failover { .. }));
            assert_eq!(
                retried,
                attempt <= LIMITS.promote_retry_limit,
                "attempt {attempt}"
            );
            t.shadow_removed("web", &start.shadow.name);
            assert!(t
                .get("web")
                .unwrap()
                .state
                .describe()
                .contains("resume failed"));
        }
        // Retries exhausted: no more shadows for it.
        assert!(t.plan_shadows(|_| LIMITS, Instant::now()).is_empty());
    }

    #[test]
    fn completing_a_failover_checks_the_state_and_the_shadow() {
        let mut t = protected();
        assert!(matches!(
            t.failover_succeeded("web", "web-shadow-1", record(true), Vec::new()),
            Err(Refused::WrongState { .. })
        ));
        t.begin_failover("web", "web", Trigger::Pidfd).unwrap();
        assert!(matches!(
            t.failover_succeeded("web", "web-shadow-9", record(true), Vec::new()),
            Err(Refused::NoSuchShadow { .. })
        ));
        assert!(matches!(
            t.failover_failed("web", "web-shadow-9", record(false), LIMITS),
            Err(Refused::WrongState { .. })
        ));
    }

    #[test]
    fn switchover_is_refused_without_changing_state() {
        let mut t = ServiceTable::new();
        t.protect("web", "c", true).unwrap();
        assert!(matches!(
            t.begin_switchover("web"),
            Err(Refused::NoShadow { .. })
        ));
        assert_eq!(t.get("web").unwrap().state, ServiceState::Provisioning);
        let mut t = protected();
        t.stop("web").unwrap();
        assert!(matches!(
            t.begin_switchover("web"),
            Err(Refused::WrongState { .. })
        ));
        let mut t = protected();
        assert_eq!(
            t.begin_switchover("web").unwrap().shadow.name,
            "web-shadow-1"
        );
    }

    #[test]
    fn provisioning_failures_back_off_and_unprotectable_sticks() {
        let mut t = ServiceTable::new();
        t.protect("web", "c", true).unwrap();
        let now = Instant::now();
        let mut waits = Vec::new();
        for _ in 0..8 {
            let p = t.plan_shadows(|_| LIMITS, now + Duration::from_secs(3600));
            let (actions, wait) = t
                .shadow_failed("web", &p[0].name, "qemu-img failed", false, now)
                .unwrap();
            assert!(matches!(actions[0], Action::RemoveShadow { .. }));
            t.shadow_removed("web", &p[0].name);
            waits.push(wait.as_secs());
        }
        assert_eq!(waits, [10, 20, 40, 80, 160, 300, 300, 300]);
        // Not before the backoff ends.
        assert!(t.plan_shadows(|_| LIMITS, now).is_empty());
        let p = t.plan_shadows(|_| LIMITS, now + Duration::from_secs(301));
        t.shadow_failed("web", &p[0].name, "hostdev cannot be cloned", true, now)
            .unwrap();
        assert_eq!(
            t.get("web").unwrap().state.describe(),
            "unprotectable: hostdev cannot be cloned"
        );
        assert!(t
            .plan_shadows(|_| LIMITS, now + Duration::from_secs(3600))
            .is_empty());
        // A rebuild gives it another chance.
        t.rebuild("web").unwrap();
        assert_eq!(t.get("web").unwrap().state, ServiceState::Provisioning);
    }

    #[test]
    fn a_ready_shadow_resets_the_backoff() {
        let mut t = ServiceTable::new();
        t.protect("web", "c", true).unwrap();
        let now = Instant::now();
        let p = t.plan_shadows(|_| LIMITS, now);
        t.shadow_failed("web", &p[0].name, "x", false, now).unwrap();
        t.shadow_removed("web", &p[0].name);
        let p = t.plan_shadows(|_| LIMITS, now + Duration::from_secs(11));
        t.shadow_ready("web", paused(&p[0].name)).unwrap();
        let s = t.get("web").unwrap();
        assert_eq!((s.provision_failures, s.provision_not_before), (0, None));
        // Only a booting shadow can become ready.
        assert!(matches!(
            t.shadow_ready("web", paused(&p[0].name)),
            Err(Refused::NoSuchShadow { .. })
        ));
    }

    #[test]
    fn a_lost_shadow_is_replaced_unless_it_is_being_promoted() {
        let mut t = protected();
        assert_eq!(
            t.shadow_lost("web", "web-shadow-1").unwrap(),
            vec![
                Action::RemoveShadow {
                    service: "web".into(),
                    shadow: "web-shadow-1".into()
                },
                Action::EnsureShadows
            ]
        );
        t.begin_failover("web", "web", Trigger::Pidfd).unwrap();
        assert!(t.shadow_lost("web", "web-shadow-1").is_err());
    }

    #[test]
    fn a_shadow_being_verified_stays_a_standby_and_a_broken_one_is_replaced() {
        let mut t = protected();
        assert_eq!(t.begin_verify("web").unwrap(), "web-shadow-1");
        assert!(t.begin_verify("web").is_err(), "one at a time");
        // Still a member standing by: the service stays protected and a failover finds it.
        let s = t.get("web").unwrap();
        assert_eq!(s.state, ServiceState::Protected);
        assert_eq!(s.ready_shadow().unwrap().name, "web-shadow-1");
        assert!(t.plan_shadows(|_| LIMITS, Instant::now()).is_empty());
        // A healthy copy: nothing changes.
        assert_eq!(t.end_verify("web", "web-shadow-1", false).unwrap(), vec![]);
        assert_eq!(t.get("web").unwrap().verifying, None);
        // A broken one: no longer promotable, removed, a replacement provisioned.
        t.begin_verify("web").unwrap();
        assert_eq!(
            t.end_verify("web", "web-shadow-1", true).unwrap(),
            vec![
                Action::RemoveShadow {
                    service: "web".into(),
                    shadow: "web-shadow-1".into()
                },
                Action::EnsureShadows
            ]
        );
        assert!(t.get("web").unwrap().ready_shadow().is_none());
        t.shadow_removed("web", "web-shadow-1");
        let planned = t.plan_shadows(|_| LIMITS, Instant::now());
        assert_eq!(planned[0].name, "web-shadow-2");
        assert_eq!(t.get("web").unwrap().state, ServiceState::Provisioning);
    }

    #[test]
    fn a_failover_during_a_verification_promotes_the_shadow_and_the_verdict_leaves_it_alone() {
        let mut t = protected();
        t.begin_verify("web").unwrap();
        let start = t.begin_failover("web", "web", Trigger::Pidfd).unwrap();
        assert_eq!(start.shadow.name, "web-shadow-1");
        t.failover_succeeded("web", "web-shadow-1", record(true), Vec::new())
            .unwrap();
        // Its copy's verdict, even a failed one, never removes the new primary.
        assert!(matches!(
            t.end_verify("web", "web-shadow-1", true),
            Err(Refused::NoSuchShadow { .. })
        ));
        let s = t.get("web").unwrap();
        assert_eq!(s.active, "web-shadow-1");
        assert_eq!(s.verifying, None);
    }

    #[test]
    fn a_failover_while_the_shadow_settles_waits_for_it_then_promotes_it() {
        let mut t = protected();
        t.begin_verify("web").unwrap();
        t.begin_settle("web", "web-shadow-1").unwrap();
        assert!(t.get("web").unwrap().ready_shadow().is_none());
        assert_eq!(t.get("web").unwrap().state, ServiceState::Protected);
        assert!(t.begin_failover("web", "web", Trigger::Pidfd).is_err());
        assert!(matches!(
            t.get("web").unwrap().state,
            ServiceState::Down { .. }
        ));
        assert_eq!(
            t.settled("web", "web-shadow-1").unwrap(),
            vec![Action::Failover {
                service: "web".into(),
                from: "web".into(),
                trigger: Trigger::Recovery
            }]
        );
        assert_eq!(
            t.get("web").unwrap().ready_shadow().unwrap().name,
            "web-shadow-1"
        );
        // Without a failover it simply stands by again.
        let mut t = protected();
        t.begin_settle("web", "web-shadow-1").unwrap();
        assert!(t.begin_settle("web", "web-shadow-1").is_err());
        assert_eq!(t.settled("web", "web-shadow-1").unwrap(), vec![]);
        assert_eq!(t.get("web").unwrap().state, ServiceState::Protected);
    }

    #[test]
    fn a_failover_during_a_verification_prefers_another_paused_shadow() {
        let mut t = protected();
        t.shadow_found("web", paused("web-shadow-2")).unwrap();
        assert_eq!(t.begin_verify("web").unwrap(), "web-shadow-1");
        let start = t.begin_failover("web", "web", Trigger::Pidfd).unwrap();
        assert_eq!(start.shadow.name, "web-shadow-2");
    }

    #[test]
    fn stop_and_start_and_a_started_primary() {
        let mut t = protected();
        t.stop("web").unwrap();
        assert!(t.plan_shadows(|_| LIMITS, Instant::now()).is_empty());
        t.primary_started("web").unwrap();
        assert_eq!(t.get("web").unwrap().state, ServiceState::Provisioning);
        // A start event for a running primary changes nothing.
        assert!(t.primary_started("web").is_err());
        t.begin_failover("web", "web", Trigger::Pidfd).unwrap();
        assert!(t.stop("web").is_err());
        assert!(t.start("web").is_err());
        assert!(t.rebuild("web").is_err());
    }

    #[test]
    fn unknown_service_names_the_known_ones() {
        let t = protected();
        assert_eq!(
            t.require("nope").unwrap_err().to_string(),
            "no service named 'nope'; known services: web"
        );
        assert_eq!(
            ServiceTable::new().require("x").unwrap_err().to_string(),
            "no service named 'x'; known services: (none)"
        );
    }

    #[test]
    fn a_switching_shadow_is_not_promoted_until_it_arrives() {
        let mut t = protected();
        let name = "web-shadow-1".to_string();
        assert!(
            t.begin_tier_switch("web", &name, Tier::Paused).is_err(),
            "already paused"
        );
        t.begin_tier_switch("web", &name, Tier::Saved).unwrap();
        // Still counted as a shadow: nothing new is provisioned.
        assert!(t.plan_shadows(|_| LIMITS, Instant::now()).is_empty());
        assert_eq!(
            t.begin_failover("web", "web", Trigger::Pidfd).unwrap_err(),
            Refused::NoShadow {
                service: "web".into()
            }
        );
        // Down meanwhile: arriving promotes it.
        let actions = t
            .tier_switched("web", &name, Tier::Saved, Vec::new())
            .unwrap();
        assert!(
            matches!(actions[..], [Action::Failover { .. }]),
            "{actions:?}"
        );
        assert_eq!(
            t.get("web").unwrap().shadows[0].state,
            ShadowState::Standby(Tier::Saved)
        );
        assert!(t
            .tier_switched("web", &name, Tier::Saved, Vec::new())
            .is_err());
    }

    #[test]
    fn repark_returns_an_interrupted_promotion_to_standby() {
        let mut t = protected();
        t.shadow_found(
            "web",
            Shadow {
                name: "web-shadow-1".into(),
                state: ShadowState::Promoting,
                taps: Vec::new(),
                data_disks: None,
            },
        )
        .unwrap();
        t.shadow_reparked("web", "web-shadow-1", Vec::new())
            .unwrap();
        assert_eq!(
            t.get("web").unwrap().ready_shadow().unwrap().name,
            "web-shadow-1"
        );
        assert!(t.shadow_reparked("web", "nope", Vec::new()).is_err());
    }

    fn host(n: &str) -> HostId {
        HostId(n.into())
    }

    fn owner(domain: &str, h: &str, generation: u64) -> OwnerRecord {
        OwnerRecord {
            service: "web".into(),
            domain: domain.into(),
            host: host(h),
            generation,
        }
    }

    /// This host (h2) follows `web`, whose primary runs on h1, and holds one paused shadow.
    fn following() -> ServiceTable {
        let mut t = ServiceTable::new();
        t.follow("web", "c", "web", &host("h1")).unwrap();
        let p = t.reserve_shadow("web", LIMITS, 0).unwrap();
        assert_eq!(p.name, "web-shadow-1");
        t.shadow_ready("web", paused("web-shadow-1")).unwrap();
        t
    }

    #[test]
    fn a_service_elsewhere_is_followed_and_never_provisioned_as_if_local() {
        let mut t = following();
        let s = t.get("web").unwrap();
        assert_eq!(s.state.describe(), "elsewhere: on host h1");
        assert_eq!(s.primary_host(), Some(&host("h1")));
        assert!(!s.state.is_running());
        // The local planning round leaves it alone: its primary's host places its shadows.
        assert!(t.plan_shadows(|_| LIMITS, Instant::now()).is_empty());
        // Operators act on the primary's host.
        assert!(t.stop("web").is_err());
        assert!(t.begin_switchover("web").is_err());
        // A primary here cannot be followed as if it were elsewhere.
        let mut local = protected();
        assert!(local.follow("web", "c", "web", &host("h1")).is_err());
        assert_eq!(t.unfollow("web").unwrap(), ["web-shadow-1"]);
        assert!(!t.contains("web"));
        assert!(local.unfollow("web").is_err());
    }

    #[test]
    fn a_reported_crash_elsewhere_promotes_the_shadow_here() {
        let mut t = following();
        let start = t.begin_failover("web", "web", Trigger::Pidfd).unwrap();
        assert_eq!(start.old_host, Some(host("h1")));
        assert_eq!(start.shadow.name, "web-shadow-1");
        let actions = t
            .failover_succeeded("web", "web-shadow-1", record(true), Vec::new())
            .unwrap();
        assert_eq!(
            actions,
            vec![
                Action::WatchPrimary {
                    service: "web".into(),
                    domain: "web-shadow-1".into()
                },
                Action::EnsureShadowsLater
            ]
        );
        let s = t.get("web").unwrap();
        assert_eq!(
            (s.active.as_str(), s.primary_host()),
            ("web-shadow-1", None)
        );
        assert!(s.state.is_running());
    }

    #[test]
    fn a_hang_elsewhere_is_not_fenced_from_here() {
        let mut t = following();
        t.begin_failover("web", "web", Trigger::Heartbeat).unwrap();
        let actions = t
            .failover_succeeded("web", "web-shadow-1", record(true), Vec::new())
            .unwrap();
        assert!(!actions
            .iter()
            .any(|a| matches!(a, Action::FenceGrace { .. })));
    }

    #[test]
    fn without_a_shadow_here_a_crash_elsewhere_leaves_the_service_to_the_others() {
        let mut t = ServiceTable::new();
        t.follow("web", "c", "web", &host("h1")).unwrap();
        assert!(matches!(
            t.begin_failover("web", "web", Trigger::Pidfd),
            Err(Refused::NoShadow { .. })
        ));
        assert_eq!(t.get("web").unwrap().state.label(), "elsewhere");
        // A failed promotion of a primary elsewhere stands aside, with no retry from here.
        let mut t = following();
        t.begin_failover("web", "web", Trigger::Pidfd).unwrap();
        let actions = t
            .failover_failed("web", "web-shadow-1", record(false), LIMITS)
            .unwrap();
        assert_eq!(
            actions,
            vec![Action::RemoveShadow {
                service: "web".into(),
                shadow: "web-shadow-1".into()
            }]
        );
        assert_eq!(t.get("web").unwrap().state.label(), "elsewhere");
    }

    #[test]
    fn a_lost_claim_leaves_the_shadow_paused_and_follows_the_winner() {
        let mut t = following();
        t.begin_failover("web", "web", Trigger::Pidfd).unwrap();
        let actions = t
            .failover_lost("web", "web-shadow-1", &owner("web-shadow-7", "h3", 2))
            .unwrap();
        assert!(actions.is_empty(), "the dead primary is h1's to retire");
        let s = t.get("web").unwrap();
        assert_eq!(s.ready_shadow().unwrap().name, "web-shadow-1");
        assert_eq!(
            (s.active.as_str(), s.primary_host()),
            ("web-shadow-7", Some(&host("h3")))
        );
        // A local primary that lost the race is retired here.
        let mut t = protected();
        t.begin_failover("web", "web", Trigger::Pidfd).unwrap();
        assert_eq!(
            t.failover_lost("web", "web-shadow-1", &owner("web-shadow-2", "h2", 2))
                .unwrap(),
            vec![Action::RetirePrimary {
                service: "web".into(),
                old: "web".into()
            }]
        );
        assert!(t
            .failover_lost("web", "web-shadow-1", &owner("x", "h2", 3))
            .is_err());
    }

    #[test]
    fn another_host_taking_over_retires_the_primary_here() {
        let mut t = protected();
        let me = host("h1");
        // Our own claims are answered through the promotion.
        assert!(t.owner_changed(&owner("web", "h1", 1), &me).is_empty());
        assert_eq!(
            t.owner_changed(&owner("web-shadow-2", "h2", 2), &me),
            vec![Action::RetirePrimary {
                service: "web".into(),
                old: "web".into()
            }]
        );
        let s = t.get("web").unwrap();
        assert_eq!(
            (s.active.as_str(), s.primary_host()),
            ("web-shadow-2", Some(&host("h2")))
        );
        // Following along: no action, the new owner is recorded.
        assert!(t
            .owner_changed(&owner("web-shadow-3", "h3", 3), &me)
            .is_empty());
        assert_eq!(t.get("web").unwrap().primary_host(), Some(&host("h3")));
        // Unknown services and promotions in flight are left alone.
        assert!(t
            .owner_changed(
                &OwnerRecord {
                    service: "db".into(),
                    ..owner("db", "h2", 1)
                },
                &me
            )
            .is_empty());
        let mut t = protected();
        t.begin_failover("web", "web", Trigger::Pidfd).unwrap();
        assert!(t
            .owner_changed(&owner("web-shadow-2", "h2", 2), &me)
            .is_empty());
        assert_eq!(t.get("web").unwrap().state.label(), "failing_over");
    }

    #[test]
    fn a_handover_needs_a_ready_shadow_on_the_host_named() {
        let mut t = protected();
        let refused = t.begin_handover("web", &host("h2")).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "service 'web' has no ready shadow on host 'h2' (ready on: (none))"
        );
        t.remote_shadow(
            "web",
            RemoteShadow {
                name: "web-shadow-2".into(),
                host: host("h2"),
                ready: false,
            },
        );
        assert!(t.begin_handover("web", &host("h2")).is_err());
        t.remote_shadow(
            "web",
            RemoteShadow {
                name: "web-shadow-2".into(),
                host: host("h2"),
                ready: true,
            },
        );
        assert_eq!(t.get("web").unwrap().remote_shadows.len(), 1);
        assert!(t
            .begin_handover("web", &host("h3"))
            .unwrap_err()
            .to_string()
            .ends_with("(ready on: h2)"));
        let start = t.begin_handover("web", &host("h2")).unwrap();
        assert_eq!(
            (start.primary.as_str(), start.shadow.as_str()),
            ("web", "web-shadow-2")
        );
        assert_eq!(t.get("web").unwrap().state.label(), "handing_over");
        // Nothing else starts meanwhile.
        assert!(t.begin_handover("web", &host("h2")).is_err());
        assert!(t.begin_switchover("web").is_err());
        // h2 claims: the fenced primary here is retired.
        assert_eq!(
            t.owner_changed(&owner("web-shadow-2", "h2", 2), &host("h1")),
            vec![Action::RetirePrimary {
                service: "web".into(),
                old: "web".into()
            }]
        );
        assert!(t.get("web").unwrap().remote_shadows.is_empty());
    }

    #[test]
    fn a_handover_given_up_unfences_the_primary() {
        let mut t = protected();
        t.remote_shadow(
            "web",
            RemoteShadow {
                name: "web-shadow-2".into(),
                host: host("h2"),
                ready: true,
            },
        );
        t.begin_handover("web", &host("h2")).unwrap();
        assert_eq!(
            t.handover_failed("web").unwrap(),
            vec![Action::Unfence {
                service: "web".into(),
                domain: "web".into()
            }]
        );
        assert_eq!(t.get("web").unwrap().state, ServiceState::Protected);
        assert!(t.handover_failed("web").is_err());
        t.remote_shadow_gone("web", "web-shadow-2", &host("h2"));
        assert!(t.get("web").unwrap().remote_shadows.is_empty());
    }

    #[test]
    fn shadows_here_of_a_primary_elsewhere_get_names_above_every_host_s() {
        let mut t = following();
        t.remote_shadow(
            "web",
            RemoteShadow {
                name: "web-shadow-4".into(),
                host: host("h3"),
                ready: true,
            },
        );
        assert_eq!(
            t.reserve_shadow("web", LIMITS, 0).unwrap().name,
            "web-shadow-5"
        );
        // The second host given a shadow in the same round skips the first one's name.
        let mut other = following();
        assert_eq!(
            other.reserve_shadow("web", LIMITS, 1).unwrap().name,
            "web-shadow-3"
        );
        let mut t = protected();
        assert_eq!(
            t.reserve_shadow("web", LIMITS, 0).unwrap().name,
            "web-shadow-2"
        );
        assert_eq!(t.get("web").unwrap().state, ServiceState::Provisioning);
        t.stop("web").unwrap();
        assert!(t.reserve_shadow("web", LIMITS, 0).is_err());
    }

    #[test]
    fn health_changes_are_reported_once() {
        let mut t = protected();
        assert!(t.set_health("web", "healthy"));
        assert!(!t.set_health("web", "healthy"));
        assert!(!t.set_health("nope", "healthy"));
    }

    #[test]
    fn a_service_given_back_to_the_retired_primary_here_is_down_here() {
        let me = host("h1");
        let mut t = protected();
        // h2 claims: the primary here is retired, the service followed on h2.
        t.owner_changed(&owner("web-shadow-2", "h2", 2), &me);
        // h2's promotion failed and gave the service back to the primary on h1.
        let given = vec![Action::GivenBack {
            service: "web".into(),
            domain: "web".into(),
        }];
        assert_eq!(t.owner_changed(&owner("web", "h1", 3), &me), given);
        t.given_back("web", "web").unwrap();
        let s = t.get("web").unwrap();
        assert_eq!((s.active.as_str(), s.state.label()), ("web", "down"));
        assert!(s.state.describe().contains("host h2 gave the service back"));
        assert!(t.given_back("web", "web").is_err(), "only from elsewhere");
        // The shadow still here takes over from the given-back primary, as after a crash.
        let start = t.begin_failover("web", "web", Trigger::Recovery).unwrap();
        assert_eq!(
            (start.shadow.name.as_str(), start.old_host),
            ("web-shadow-1", None)
        );
    }

    #[test]
    fn this_host_s_own_claim_is_not_taken_for_a_give_back() {
        let me = host("h2");
        // The claim of the shadow here, seen after the promotion ended (or at a restart).
        let mut t = following();
        assert!(t
            .owner_changed(&owner("web-shadow-1", "h2", 2), &me)
            .is_empty());
        assert_eq!(t.get("web").unwrap().state.label(), "elsewhere");
        // Services here, and promotions in flight, are never given back.
        let mut t = protected();
        assert!(t.owner_changed(&owner("web-old", "h2", 3), &me).is_empty());
        let mut t = following();
        t.begin_failover("web", "web", Trigger::Pidfd).unwrap();
        assert!(t.owner_changed(&owner("web", "h2", 3), &me).is_empty());
    }

    #[test]
    fn a_claimed_shadow_is_the_one_promoted() {
        let mut t = following();
        let p = t.reserve_shadow("web", LIMITS, 0).unwrap();
        assert_eq!(p.name, "web-shadow-2");
        t.shadow_ready("web", paused("web-shadow-2")).unwrap();
        // web-shadow-1 would be first; the record names web-shadow-2.
        let start = t
            .begin_claimed_failover("web", "web", "web-shadow-2")
            .unwrap();
        assert_eq!(start.shadow.name, "web-shadow-2");
        assert_eq!(start.old_host, Some(host("h1")));
        let s = t.get("web").unwrap();
        assert!(matches!(
            &s.state,
            ServiceState::FailingOver { shadow, trigger: Trigger::Recovery, .. } if shadow == "web-shadow-2"
        ));
        // Only a shadow standing by can be named.
        let mut t = following();
        let refused = t
            .begin_claimed_failover("web", "web", "web-shadow-9")
            .unwrap_err();
        assert!(matches!(refused, Refused::NoSuchShadow { .. }), "{refused}");
        assert_eq!(t.get("web").unwrap().state.label(), "elsewhere");
    }
}
