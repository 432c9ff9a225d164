//! The promotion pipeline: fence the old primary, then resume a shadow and rewire the network
//! so the service's MAC and address are answered by the shadow.
//!
//! Order matters only where safety needs it: the old primary is fenced (its QEMU confirmed
//! gone, or its taps cut off the bridge and read back) before anything of the shadow is
//! touched. After that only two things stand between the client and the shadow, and they run
//! at once: resume (libvirt) and rewiring (netlink). The shadow's links were raised while it
//! stood by paused and off the bridge, so no libvirt call is needed for them. Everything else
//! (announce-self, metadata, retiring the old primary) happens after service is restored.
//! Once the service is restored and the roles are recorded, `apply_profile` sizes and
//! configures the new primary from its profile ([`super::apply_profile`]).

use std::time::Instant;

use crate::api::protocol::FailoverRecord;
use crate::domain_xml::{MemberState, Role};
use crate::libvirt::{Hypervisor, LibvirtError};
use crate::net::{NetError, Netlink};

use super::apply_profile::ProfileApply;
use super::shadow::{member_meta, raise_links, write_meta};
use super::{now_unix_ms, FailoverError, Shadow, StepClock, TapBinding};

/// What set the failover off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The primary's QEMU process exited (pidfd).
    Pidfd,
    /// libvirt reported the primary crashed or failed.
    Lifecycle,
    /// Heartbeats stopped and the guest is hung.
    Heartbeat,
    /// An operator asked for a switchover.
    Manual,
    /// Found at daemon start: the primary was already gone.
    Recovery,
}

/// Every step the pipeline records, in pipeline order (`link_up` only when a shadow's links
/// were not raised while it stood by; `apply_profile` only with a profile).
pub const STEPS: [&str; 7] = [
    "fence",
    "resume",
    "rewire",
    "link_up",
    "announce",
    "metadata",
    "apply_profile",
];

impl Trigger {
    /// Every trigger, for metrics that export each one from the start.
    pub const ALL: [Trigger; 5] = [
        Trigger::Pidfd,
        Trigger::Lifecycle,
        Trigger::Heartbeat,
        Trigger::Manual,
        Trigger::Recovery,
    ];

    /// Label for status and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Trigger::Pidfd => "pidfd",
            Trigger::Lifecycle => "lifecycle",
            Trigger::Heartbeat => "heartbeat",
            Trigger::Manual => "manual",
            Trigger::Recovery => "recovery",
        }
    }

    /// Whether the old primary's QEMU is already known to be gone.
    fn primary_known_dead(self) -> bool {
        matches!(
            self,
            Trigger::Pidfd | Trigger::Lifecycle | Trigger::Recovery
        )
    }
}

/// Input of one promotion.
#[derive(Debug, Clone)]
pub struct Promotion {
    /// Service name.
    pub service: String,
    /// Service class.
    pub class: String,
    /// The domain being replaced.
    pub old_primary: String,
    /// Its taps and bridges, as last seen.
    pub old_taps: Vec<TapBinding>,
    /// The shadow to promote.
    pub shadow: Shadow,
    /// The shadow's generation number.
    pub shadow_generation: u64,
    /// What set it off.
    pub trigger: Trigger,
    /// When the failure was detected (start of the outage as far as we can know).
    pub detected_at: Instant,
    /// What the service's profile asks of the promoted shadow (`apply_profile` step, after
    /// traffic is restored); `None` without a profile.
    pub profile: Option<ProfileApply>,
}

/// Result of a promotion: the record (always) and the new primary's taps on success.
pub struct Promoted {
    /// Timeline for status and metrics.
    pub record: FailoverRecord,
    /// The new active domain's taps.
    pub taps: Vec<TapBinding>,
}

fn ignore_missing_link(r: Result<(), NetError>) -> Result<(), NetError> {
    match r {
        Err(NetError::NoSuchLink { .. }) => Ok(()),
        other => other,
    }
}

/// Runs the pipeline. On error the record says how far it got.
pub async fn promote(
    hv: &Hypervisor,
    net: &Netlink,
    p: Promotion,
) -> Result<Promoted, (FailoverRecord, FailoverError)> {
    let mut clock = StepClock::starting_at(p.detected_at);
    let at_unix_ms = now_unix_ms();
    let span = tracing::info_span!("promote", service = %p.service, from = %p.old_primary, to = %p.shadow.name, trigger = p.trigger.label());
    let _enter = span.enter();
    let mut notes = Vec::new();
    let result = run_steps(hv, net, &p, &mut clock, &mut notes).await;
    let outage_ms = clock.restored_ms().unwrap_or_else(|| clock.total_ms());
    let (ok, error) = match &result {
        Ok(_) => (true, None),
        Err(e) => (false, Some(format!("{e}: {}", crate::error_chain(e)))),
    };
    let record = FailoverRecord {
        at_unix_ms,
        from: p.old_primary.clone(),
        to: p.shadow.name.clone(),
        trigger: p.trigger.label().to_string(),
        outage_ms,
        steps: clock.into_steps(),
        ok,
        error,
        notes,
    };
    match result {
        Ok(taps) => {
            tracing::info!(outage_ms, "promotion complete");
            Ok(Promoted { record, taps })
        }
        Err(e) => {
            tracing::error!(error = %e, "promotion failed");
            Err((record, e))
        }
    }
}

async fn run_steps(
    hv: &Hypervisor,
    net: &Netlink,
    p: &Promotion,
    clock: &mut StepClock,
    notes: &mut Vec<String>,
) -> Result<Vec<TapBinding>, FailoverError> {
    // 1. Fence. A dead QEMU is already fenced; still cut any tap it left so no stale port
    //    keeps the MAC. A live (hung or switched-over) primary is cut off the bridge, and the
    //    cut is read back before anything else happens.
    let t = Instant::now();
    for b in &p.old_taps {
        ignore_missing_link(net.set_nomaster(&b.tap).await)
            .and(ignore_missing_link(net.set_down(&b.tap).await))
            .map_err(|source| FailoverError::Net {
                step: "fence: cut old primary's tap",
                source,
            })?;
    }
    if !p.trigger.primary_known_dead() {
        for b in &p.old_taps {
            match net.master_of(&b.tap).await {
                Ok(None) | Err(NetError::NoSuchLink { .. }) => {}
                Ok(Some(master)) => {
                    return Err(FailoverError::FenceUnconfirmed {
                        domain: p.old_primary.clone(),
                        why: format!("tap {} is still on {master}", b.tap),
                    })
                }
                Err(source) => {
                    return Err(FailoverError::Net {
                        step: "fence: confirm",
                        source,
                    })
                }
            }
        }
        // A healthy primary handed over on purpose is frozen before its shadow runs. A hung
        // one is not asked anything: its QEMU may not answer, and the cut already isolates it
        // (the daemon watches it for a grace period, then destroys it).
        if p.trigger == Trigger::Manual {
            let old = p.old_primary.clone();
            hv.run("fence: pause", move |hv| hv.suspend(&old))
                .await
                .map_err(|source| FailoverError::Libvirt {
                    step: "fence: pause old primary",
                    source,
                })?;
        }
    }
    clock.record("fence", t, t.elapsed());

    // 2. Resume (libvirt) and rewire (netlink) at once. Nothing else touches libvirt before
    //    service is restored: libvirt runs one job per domain at a time, so a journal write
    //    here would queue in front of the resume. A restart that finds the shadow running
    //    with a standby record treats it as an interrupted promotion (see the daemon's
    //    recovery), so the journal can follow.
    let bindings: Vec<TapBinding> = p.shadow.taps.clone();
    let shadow = p.shadow.name.clone();
    let together = Instant::now();
    let resume = {
        let shadow = shadow.clone();
        let t = Instant::now();
        async move {
            let r = hv
                .run("resume shadow", move |hv| match hv.resume(&shadow) {
                    // Resuming again after an interrupted promotion: already running is fine.
                    Err(e) if hv.state(&shadow).ok() == Some(crate::libvirt::RunState::Running) => {
                        tracing::info!(error = %e, "shadow already running");
                        Ok(())
                    }
                    other => other,
                })
                .await
                .map_err(|source| FailoverError::Libvirt {
                    step: "resume",
                    source,
                });
            (r, t.elapsed())
        }
    };
    let rewire = {
        let t = Instant::now();
        let bindings = bindings.clone();
        async move {
            for b in &bindings {
                // Each shadow tap goes onto the bridge its own definition names.
                let Some(bridge) = &b.bridge else { continue };
                net.enslave_and_up(&b.tap, bridge)
                    .await
                    .map_err(|source| FailoverError::Net {
                        step: "rewire: enslave shadow tap",
                        source,
                    })
                    .map_err(|e| (e, t.elapsed()))?;
            }
            Ok::<_, (FailoverError, std::time::Duration)>(t.elapsed())
        }
    };
    let ((resumed, resume_took), rewired) = tokio::join!(resume, rewire);
    clock.record("resume", together, resume_took);
    resumed?;
    match rewired {
        Ok(took) => clock.record("rewire", together, took),
        Err((e, took)) => {
            clock.record("rewire", together, took);
            return Err(e);
        }
    }

    // 3. A standby whose links were not raised at provisioning (made by an older daemon, or
    //    recovered mid-way) gets them raised now, on the critical path.
    if !p.shadow.link_ready() {
        let t = Instant::now();
        let (s, macs) = (
            shadow.clone(),
            bindings.iter().map(|b| b.mac.clone()).collect::<Vec<_>>(),
        );
        hv.run("link up", move |hv| raise_links(hv, &s, &macs))
            .await
            .map_err(|source| FailoverError::Libvirt {
                step: "link up",
                source,
            })?;
        clock.record("link_up", t, t.elapsed());
    }
    // From here on the shadow serves: the end of the outage as far as we can tell. Frames to
    // the MAC reach the new port even before any announcement, since the bridge floods frames
    // for a MAC whose old port is gone.
    clock.mark_restored();

    // 4. Tell the network where the MAC lives now (switches beyond the bridge, ARP caches).
    let t = Instant::now();
    let s = shadow.clone();
    let announce =
        r#"{"execute":"announce-self","arguments":{"initial":50,"max":550,"rounds":5,"step":100}}"#;
    if let Err(e) = hv.run("announce", move |hv| hv.qmp(&s, announce)).await {
        tracing::warn!(error = %e, "announce-self failed");
    }
    clock.record("announce", t, t.elapsed());

    // 5. Roles: the shadow is the primary now; the old one is retired and fenced.
    let t = Instant::now();
    let new_meta = member_meta(
        &p.service,
        &p.class,
        Role::Primary,
        p.shadow_generation,
        MemberState::Active,
    );
    let old_meta = member_meta(&p.service, &p.class, Role::Retired, 0, MemberState::Fenced);
    let (old, new) = (p.old_primary.clone(), shadow.clone());
    let kill_old = p.trigger == Trigger::Manual;
    hv.run("roles", move |hv| write_meta(hv, &new, &new_meta))
        .await
        .map_err(|source| FailoverError::Libvirt {
            step: "metadata",
            source,
        })?;
    // The old primary is retired off the critical path: after a crash libvirt holds that
    // domain's job until it has processed the QEMU exit, which takes about a second.
    let service = p.service.clone();
    let hv_bg = hv.clone();
    tokio::spawn(async move {
        hv_bg.run("retire old primary", move |hv| {
        if kill_old {
            hv.destroy(&old)?;
        }
        match write_meta(hv, &old, &old_meta) {
            // The retired domain may be gone entirely (transient); that is fine.
            Ok(()) | Err(LibvirtError::NoSuchDomain { .. }) => Ok(()),
            Err(e) => {
                tracing::warn!(service = %service, old = %old, error = %e, "cannot mark the old primary retired");
                Err(e)
            }
        }
    })
        .await
    });
    clock.record("metadata", t, t.elapsed());

    // 5. Size and configure the promoted shadow from its profile. Traffic already flows, so
    //    this cannot lengthen the outage; what it does or fails to do is a note, never an error.
    if let Some(profile) = &p.profile {
        let t = Instant::now();
        notes.extend(super::apply_profile::apply(hv, &shadow, profile).await);
        clock.record("apply_profile", t, t.elapsed());
    }
    Ok(bindings)
}
