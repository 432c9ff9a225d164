//! The promotion pipeline: fence the old primary, claim the service, then resume a shadow and
//! rewire the network so the service's MAC and address are answered by the shadow.
//!
//! Order matters only where safety needs it: the old primary is fenced (its QEMU confirmed
//! gone, or its taps cut off the bridge and read back) and the service's owner record is
//! claimed before anything of the shadow is touched. After that only two things stand between
//! the client and the shadow, and they run at once: resume (libvirt) and rewiring (netlink).
//! The shadow's links were raised while it stood by paused and off the bridge, so no libvirt
//! call is needed for them. Everything else (announce-self, metadata, retiring the old
//! primary) happens after service is restored. Once the service is restored and the roles are
//! recorded, `apply_profile` sizes and configures the new primary from its profile
//! ([`super::apply_profile`]).
//!
//! A service with data disks (see [`super::plan`]) changes hands differently. Its disks must
//! never have two writers, so fencing means the old primary's QEMU is confirmed gone: a hung
//! or healthy one is killed through a pidfd and its exit awaited, and libvirt is made to
//! finish stopping the domain (which also releases its disk leases when libvirt's lock manager
//! runs). Then the shadow is resumed (still off the network); each data disk is attached to
//! it, live and persistently (to a running domain: libvirt's lock manager refuses to resume a
//! domain that was given a disk while paused); the class's `promote_commands` run in the
//! guest (find the disk, mount it, start the service); and only then is the network rewired,
//! so no client reaches a service whose data is not there. Any failure after the resume
//! destroys the shadow again, so the disk is left on no domain for the retry.
//!
//! The order lives in `run_steps`, generic over [`PromotionSteps`]; [`LiveSteps`] carries
//! the steps out on libvirt, netlink and the coordinator, and the unit tests check the order
//! with a recording implementation.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::cluster::{Claim, CoordError, Coordinator, HostId};
use crate::config::NetworkMode;
use crate::domain_xml::{DomainXml, MemberState, Role};
use crate::libvirt::{kill_qemu, Hypervisor, LeaseHandbacks, LibvirtError, RunState, QEMU_RUN_DIR};
use crate::monitor::agent::{AgentError, ExitStatus};
use crate::net::{NetError, Netlink};

use super::apply_profile::ProfileApply;
use super::identity::{
    address_argv, hostname_argv, plan_nics, primary_shape, Identity, NicPlan, PluggedNics,
    PrimaryShape,
};
use super::plan::{data_disks, disk_holders, DataDisk, DiskPolicy};
use super::record::Tier;
use super::shadow::{clip_tail, guest_exec, member_meta, raise_links, write_meta};
use super::{FailoverError, FailoverRecord, Shadow, ShadowState, StepClock, TapBinding, Trigger};

/// Input of one promotion.
#[derive(Debug, Clone)]
pub struct Promotion {
    /// Service name.
    pub service: String,
    /// Service class.
    pub class: String,
    /// The domain being replaced.
    pub old_primary: String,
    /// Its host when that is another one. Its host reported it dead (its QEMU gone: crash)
    /// or fenced it before asking for this promotion (handover; with data disks, its QEMU
    /// stopped): this host cannot reach it and does not fence it again.
    pub old_host: Option<HostId>,
    /// Its taps and bridges, as last seen (empty when it runs elsewhere).
    pub old_taps: Vec<TapBinding>,
    /// The owner generation the old primary served under, when its host's failure report
    /// said so: the claim requires the record still at it (a stale report claims nothing).
    pub owner_generation: Option<u64>,
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
    /// How data disks change hands; `None` for a class that can have none.
    pub handover: Option<Handover>,
    /// Bridged (the shadow's tap joins the bridge) or routed (the host routes move to it).
    pub network: NetworkMode,
    /// A pooled shadow takes the old primary's identity (see [`super::identity`]): `Some` for
    /// a pooled promotion.
    pub identity: Option<Identity>,
}

/// What a class hands over at promotion besides the network.
#[derive(Debug, Clone)]
pub struct Handover {
    /// Which disks of the old primary are data disks.
    pub disks: DiskPolicy,
    /// Run in the guest once the disks are attached, before the network comes up.
    pub commands: Vec<Vec<String>>,
    /// Longest one command may run.
    pub command_timeout: Duration,
    /// Bound on guest agent replies.
    pub agent_max_reply: usize,
}

/// Longest the old primary's QEMU may take to die after SIGKILL before fencing gives up.
const QEMU_EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long libvirt is given to stop a domain whose QEMU is gone before we destroy it, and how
/// often we look meanwhile.
const LIBVIRT_CATCH_UP: Duration = Duration::from_secs(2);
const LIBVIRT_CATCH_UP_POLL: Duration = Duration::from_millis(5);
/// How often a promote command is asked whether it has exited.
const COMMAND_POLL: Duration = Duration::from_millis(20);
/// Longest a pooled shadow's host name or configuration change may take in the guest.
const IDENTITY_COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs `argv` in the guest and waits for it to exit 0; otherwise says what happened (exit
/// status and the tail of its stderr, a timeout, or why it could not run).
async fn run_in_guest(
    hv: &Hypervisor,
    domain: &str,
    argv: &[String],
    timeout: Duration,
    max_reply: usize,
) -> Result<(), String> {
    let out = match guest_exec(hv, domain, argv, timeout, COMMAND_POLL, max_reply).await {
        Ok(out) => out,
        Err(AgentError::ExecTimeout { .. }) => {
            return Err(format!("still running after {timeout:?}"))
        }
        Err(e) => return Err(format!("could not run: {}", crate::error::report(&e))),
    };
    let stderr = clip_tail(&String::from_utf8_lossy(&out.stderr.data), 512);
    match out.status {
        ExitStatus::Code(0) => {
            let stdout = clip_tail(&String::from_utf8_lossy(&out.stdout.data), 512);
            tracing::info!(%domain, ?argv, %stdout, "guest command succeeded");
            Ok(())
        }
        ExitStatus::Code(code) => Err(format!("exited with {code}; stderr: {stderr:?}")),
        ExitStatus::Signal(sig) => Err(format!("killed by signal {sig}; stderr: {stderr:?}")),
        ExitStatus::Unknown => Err(format!("ended without an exit status; stderr: {stderr:?}")),
    }
}

/// Result of a successful promotion: the record and the new primary's taps.
#[derive(Debug)]
pub struct Promoted {
    /// Timeline for status and metrics.
    pub record: FailoverRecord,
    /// The new active domain's taps.
    pub taps: Vec<TapBinding>,
}

/// A failed promotion: how far it got, and why it stopped.
#[derive(Debug)]
pub struct PromotionFailed {
    /// Timeline up to the failing step.
    pub record: FailoverRecord,
    /// What failed.
    pub error: FailoverError,
}

/// The steps of a promotion. `run_steps` decides their order; an implementation only
/// carries each one out.
pub trait PromotionSteps: Sync {
    /// The old primary's data disks, from its definition and the class's roles.
    fn data_disks(
        &self,
        p: &Promotion,
    ) -> impl Future<Output = Result<Vec<DataDisk>, FailoverError>> + Send;
    /// Isolates the old primary; an error means it may still be reachable.
    fn fence(&self, p: &Promotion) -> impl Future<Output = Result<(), FailoverError>> + Send;
    /// Makes sure the old primary's QEMU is gone (killing it if needed), so nothing else
    /// writes its data disks; an error means it may still run.
    fn stop_old_qemu(
        &self,
        p: &Promotion,
    ) -> impl Future<Output = Result<(), FailoverError>> + Send;
    /// Attaches the data disks to the shadow, live and persistently.
    fn attach(
        &self,
        p: &Promotion,
        disks: &[DataDisk],
    ) -> impl Future<Output = Result<(), FailoverError>> + Send;
    /// Runs the class's promote commands in the shadow; an error names the failing one.
    fn promote_commands(
        &self,
        p: &Promotion,
    ) -> impl Future<Output = Result<(), FailoverError>> + Send;
    /// After a failed hand-over: destroys the shadow, so the data disks are held by no domain.
    fn release(&self, p: &Promotion) -> impl Future<Output = ()> + Send;
    /// After a failure past the claim: gives the service back to the old primary, so the
    /// retry (on another shadow) can claim it; best effort.
    fn unclaim(&self, p: &Promotion) -> impl Future<Output = ()> + Send;
    /// Becomes the service's owner; an error means another promotion owns it.
    fn claim(&self, p: &Promotion) -> impl Future<Output = Result<(), FailoverError>> + Send;
    /// Brings a shadow standing by shut off (`saved` or `cold` tier) up: a saved one restored
    /// paused, a cold one booted. Returns its taps, which exist only now.
    fn wake(
        &self,
        p: &Promotion,
        tier: Tier,
    ) -> impl Future<Output = Result<Vec<TapBinding>, FailoverError>> + Send;
    /// Resumes the paused shadow.
    fn resume(&self, p: &Promotion) -> impl Future<Output = Result<(), FailoverError>> + Send;
    /// Puts the shadow's taps on their bridges (bridged) or brings them up (routed).
    fn rewire(&self, p: &Promotion) -> impl Future<Output = Result<(), FailoverError>> + Send;
    /// Routed networks: gives each shadow tap the old tap's host addresses and points the old
    /// tap's `/32` host routes at it.
    fn reroute(&self, p: &Promotion) -> impl Future<Output = Result<(), FailoverError>> + Send;
    /// Raises the shadow's NIC links (only for a shadow whose links were not raised at
    /// provisioning).
    fn link_up(&self, p: &Promotion) -> impl Future<Output = Result<(), FailoverError>> + Send;
    /// Tells switches and ARP caches where the MAC lives now; best effort.
    fn announce(&self, p: &Promotion) -> impl Future<Output = ()> + Send;
    /// Records the shadow as primary and retires the old one.
    fn record_roles(&self, p: &Promotion)
        -> impl Future<Output = Result<(), FailoverError>> + Send;
    /// Sizes and configures the new primary from its profile; returns notes, never fails.
    fn apply_profile(&self, p: &Promotion) -> impl Future<Output = Vec<String>> + Send;
    /// Pooled: reads the old primary's definition (its NICs and size) and gives each of its
    /// NICs to the shadow: a standing-by NIC of the same bridge and model takes its MAC in the
    /// shadow's definition (the guest takes it at `address`); any other is plugged (its MAC,
    /// model and bridge), link down, live and persistently. Returns the shape, the shadow's
    /// taps of the primary's NICs and the MACs the guest has until `address`.
    fn plug_nics(
        &self,
        p: &Promotion,
    ) -> impl Future<Output = Result<PluggedNics, FailoverError>> + Send;
    /// Pooled: gives the running shadow the old primary's host name and configuration files;
    /// returns notes.
    fn assume_identity(
        &self,
        p: &Promotion,
    ) -> impl Future<Output = Result<Vec<String>, FailoverError>> + Send;
    /// Pooled: in the guest, gives each of the primary's NICs its MAC (a standing-by NIC) and
    /// addresses and brings it up.
    fn address(&self, p: &Promotion) -> impl Future<Output = Result<(), FailoverError>> + Send;
    /// Pooled, without a profile to size it: the old primary's vCPUs and memory; notes.
    fn size_like(
        &self,
        p: &Promotion,
        shape: &PrimaryShape,
    ) -> impl Future<Output = Vec<String>> + Send;
}

/// Runs a promotion with the live steps. On error the record says how far it got.
pub async fn promote(
    hv: &Hypervisor,
    net: &Netlink,
    coord: &dyn Coordinator,
    leases: &LeaseHandbacks,
    p: Promotion,
) -> Result<Promoted, PromotionFailed> {
    run(&LiveSteps::new(hv, net, coord, leases), p).await
}

/// Runs the pipeline over `steps` and builds the record.
pub async fn run<S: PromotionSteps>(steps: &S, p: Promotion) -> Result<Promoted, PromotionFailed> {
    let mut clock = StepClock::starting_at(p.detected_at);
    let at_unix_ms = crate::clock::now_unix_ms();
    let span = tracing::info_span!("promote", service = %p.service, from = %p.old_primary, to = %p.shadow.name, trigger = p.trigger.label());
    let _enter = span.enter();
    let mut notes = Vec::new();
    let mut p = p;
    let result = run_steps(steps, &mut p, &mut clock, &mut notes).await;
    let outage_ms = clock.restored_ms().unwrap_or_else(|| clock.total_ms());
    let record = FailoverRecord {
        at_unix_ms,
        from: p.old_primary.clone(),
        to: p.shadow.name.clone(),
        trigger: p.trigger,
        outage_ms,
        steps: clock.into_steps(),
        ok: result.is_ok(),
        error: result.as_ref().err().map(|e| crate::error::report(e)),
        notes,
    };
    match result {
        Ok(()) => {
            tracing::info!(outage_ms, "promotion complete");
            Ok(Promoted {
                record,
                taps: promoted_taps(&p),
            })
        }
        Err(error) => {
            tracing::error!(error = %crate::error::report(&error), "promotion failed");
            Err(PromotionFailed { record, error })
        }
    }
}

/// The new primary's taps: the shadow's, each with the host side (routes, addresses) it took
/// over from the old tap of the same MAC.
fn promoted_taps(p: &Promotion) -> Vec<TapBinding> {
    p.shadow
        .taps
        .iter()
        .map(|b| TapBinding {
            routed: match p.network {
                NetworkMode::Routed => old_tap_of(p, &b.mac)
                    .map(|o| o.routed.clone())
                    .unwrap_or_default(),
                NetworkMode::Bridged => Default::default(),
            },
            ..b.clone()
        })
        .collect()
}

/// The old primary's tap with MAC `mac`.
fn old_tap_of<'a>(p: &'a Promotion, mac: &str) -> Option<&'a TapBinding> {
    p.old_taps.iter().find(|o| o.mac.eq_ignore_ascii_case(mac))
}

/// Every step the pipeline records, in pipeline order (`wake` only for a `saved` or `cold`
/// shadow; `plan_disks` only for a shadow whose data disks were not planned when it was made;
/// `stop_old_qemu` (the old QEMU stopped for good, beside `resume`), `attach` and
/// `promote_commands` only with data disks; `route` only for a routed class; `link_up` only
/// when a shadow's links were not raised while it stood by; `plug_nic`, `identity`, `address`
/// and `size` only for a pooled shadow; `apply_profile` only with a profile).
pub const STEPS: [&str; 18] = [
    "plan_disks",
    "fence",
    "claim",
    "wake",
    "plug_nic",
    "stop_old_qemu",
    "resume",
    "identity",
    "attach",
    "promote_commands",
    "rewire",
    "route",
    "link_up",
    "address",
    "announce",
    "metadata",
    "size",
    "apply_profile",
];

/// Times `f` as step `name`, success or not.
async fn timed<T>(
    clock: &mut StepClock,
    name: &str,
    f: impl Future<Output = Result<T, FailoverError>>,
) -> Result<T, FailoverError> {
    let t = Instant::now();
    let r = f.await;
    clock.record(name, t, t.elapsed());
    r
}

async fn run_steps<S: PromotionSteps>(
    steps: &S,
    p: &mut Promotion,
    clock: &mut StepClock,
    notes: &mut Vec<String>,
) -> Result<(), FailoverError> {
    // 0. Data disks decide how the rest goes (a class that can have none skips this).
    let disks = match (&p.handover, &p.shadow.data_disks) {
        (None, _) => Vec::new(),
        // Planned when the shadow was made from the same definition: no libvirt call here,
        // where libvirt may still be busy with the old primary's crash.
        (Some(_), Some(known)) => known.clone(),
        (Some(_), None) => timed(clock, "plan_disks", steps.data_disks(p)).await?,
    };
    let stateful = !disks.is_empty();

    // 1. Fence, then claim: nothing of the shadow is touched before both are confirmed. With
    //    data disks, fenced also means the old QEMU is gone (it can write no disk any more),
    //    which the hand-over waits for before it attaches anything. A primary on another host
    //    was fenced there before its host reported it (a dead QEMU, or a paused one cut off
    //    its bridge; with data disks a stopped one).
    match &p.old_host {
        None => timed(clock, "fence", steps.fence(p)).await?,
        Some(host) => notes.push(format!(
            "old primary '{}' ran on host {host}, which fenced it and reported it ({})",
            p.old_primary, p.trigger
        )),
    }
    timed(clock, "claim", steps.claim(p)).await?;
    // 1'. A shadow standing by shut off comes up only now, fenced and claimed: a cold one's
    //     tap joins the bridge as it boots.
    if let ShadowState::Standby(tier @ (Tier::Saved | Tier::Cold)) = p.shadow.state {
        let woken = timed(clock, "wake", steps.wake(p, tier)).await;
        match woken {
            Ok(taps) => p.shadow.taps = taps,
            Err(e) => {
                steps.unclaim(p).await;
                return Err(e);
            }
        }
    }
    if p.identity.is_some() {
        let rest = take_over(steps, p, &disks, clock, notes).await;
        if rest.is_err() {
            // Half a new identity (a NIC with the service's MAC, a data disk) is on no
            // domain once the shadow is gone; the retry claims from the old primary again.
            steps.release(p).await;
            steps.unclaim(p).await;
        }
        return rest;
    }
    let p = &*p;

    let rest = async {
        if stateful {
            // 2'. The hand-over; a failure once a disk may be attached gives the disk back.
            if let Err(e) = hand_over(steps, p, &disks, clock, p.old_host.is_none()).await {
                steps.release(p).await;
                return Err(e);
            }
        } else {
            resume_and_rewire(steps, p, clock).await?;
        }
        finish(steps, p, clock, notes).await
    }
    .await;
    if rest.is_err() {
        // The retry promotes another shadow: its claim expects the old primary as owner.
        steps.unclaim(p).await;
    }
    rest
}

/// A pooled shadow becomes the old primary. Still paused, it gets the old primary's NICs: a
/// standing-by NIC (link up, tap down and off the bridge) takes a primary NIC's MAC in the
/// definition; any other is plugged with the primary's MAC on its bridge, link down (the guest
/// handles the PCI hot-plug, about a second under TCG, while the rest goes on). Then resume,
/// host name and configuration files, the data disks and their commands, and only then the
/// network: links up (plugged NICs), MACs and addresses in the guest, then the taps onto their
/// bridges, so that nothing leaves the shadow before it has the primary's MAC and addresses
/// alone. Then what every promotion does after service is restored, with the old primary's
/// size when no profile sizes it.
async fn take_over<S: PromotionSteps>(
    steps: &S,
    p: &mut Promotion,
    disks: &[DataDisk],
    clock: &mut StepClock,
    notes: &mut Vec<String>,
) -> Result<(), FailoverError> {
    let plugged = timed(clock, "plug_nic", steps.plug_nics(p)).await?;
    p.shadow.taps = plugged.taps;
    if let Some(id) = p.identity.as_mut() {
        id.guest_macs = plugged.guest_macs;
    }
    let shape = plugged.shape;
    let stop_old = !disks.is_empty() && p.old_host.is_none();
    resume_beside_stop(steps, p, clock, stop_old).await?;
    notes.extend(timed(clock, "identity", steps.assume_identity(p)).await?);
    if !disks.is_empty() {
        // The old primary's device addresses mean nothing in the template's layout: libvirt
        // places each disk anew (the guest finds it by label or serial, not by slot).
        let placed: Vec<DataDisk> = disks
            .iter()
            .map(|d| DataDisk {
                xml: crate::domain_xml::without_children(&d.xml, &["address", "alias"])
                    .unwrap_or_else(|_| d.xml.clone()),
                ..d.clone()
            })
            .collect();
        timed(clock, "attach", steps.attach(p, &placed)).await?;
        timed(clock, "promote_commands", steps.promote_commands(p)).await?;
    }
    if !p.shadow.link_ready() {
        timed(clock, "link_up", steps.link_up(p)).await?;
    }
    timed(clock, "address", steps.address(p)).await?;
    timed(clock, "rewire", steps.rewire(p)).await?;
    clock.mark_restored();
    let p = &*p;
    timed(clock, "announce", async {
        steps.announce(p).await;
        Ok(())
    })
    .await?;
    timed(clock, "metadata", steps.record_roles(p)).await?;
    if p.profile.as_ref().is_none_or(|x| x.resources.is_none()) {
        let t = Instant::now();
        notes.extend(steps.size_like(p, &shape).await);
        clock.record("size", t, t.elapsed());
    }
    if p.profile.is_some() {
        let t = Instant::now();
        notes.extend(steps.apply_profile(p).await);
        clock.record("apply_profile", t, t.elapsed());
    }
    Ok(())
}

/// Resume (off the network, without the disks) while the old QEMU is stopped for good, then
/// attach, promote commands, and only then the network.
async fn hand_over<S: PromotionSteps>(
    steps: &S,
    p: &Promotion,
    disks: &[DataDisk],
    clock: &mut StepClock,
    stop_old: bool,
) -> Result<(), FailoverError> {
    resume_beside_stop(steps, p, clock, stop_old).await?;
    timed(clock, "attach", steps.attach(p, disks)).await?;
    timed(clock, "promote_commands", steps.promote_commands(p)).await?;
    timed(clock, "rewire", steps.rewire(p)).await?;
    if p.network == NetworkMode::Routed {
        timed(clock, "route", steps.reroute(p)).await?;
    }
    if !p.shadow.link_ready() {
        timed(clock, "link_up", steps.link_up(p)).await?;
    }
    clock.mark_restored();
    Ok(())
}

/// Resumes the shadow while, with `stop_old`, the old QEMU is stopped for good: its exit takes
/// the kernel tens of ms and libvirt up to a few hundred more, and the shadow, off the network
/// and holding no data disk, wakes meanwhile. Both must succeed.
async fn resume_beside_stop<S: PromotionSteps>(
    steps: &S,
    p: &Promotion,
    clock: &mut StepClock,
    stop_old: bool,
) -> Result<(), FailoverError> {
    let started = Instant::now();
    let stop = async {
        if !stop_old {
            return None;
        }
        let r = steps.stop_old_qemu(p).await;
        Some((r, started.elapsed()))
    };
    let resume = async {
        let r = steps.resume(p).await;
        (r, started.elapsed())
    };
    let (stopped, (resumed, resume_took)) = tokio::join!(stop, resume);
    if let Some((r, took)) = stopped {
        clock.record("stop_old_qemu", started, took);
        r?;
    }
    clock.record("resume", started, resume_took);
    resumed
}

/// The stateless critical path: resume and rewire at once.
async fn resume_and_rewire<S: PromotionSteps>(
    steps: &S,
    p: &Promotion,
    clock: &mut StepClock,
) -> Result<(), FailoverError> {
    // 2. Resume (libvirt) and rewire (netlink) at once. Nothing else touches libvirt before
    //    service is restored: libvirt runs one job per domain at a time, so a journal write
    //    here would queue in front of the resume. A restart that finds the shadow running
    //    with a standby record treats it as an interrupted promotion (see the daemon's
    //    recovery), so the journal can follow.
    let started = Instant::now();
    let resume = async {
        let r = steps.resume(p).await;
        (r, started.elapsed())
    };
    // A routed class moves its host routes right after the tap is up, still beside the resume.
    let rewire = async {
        let r = steps.rewire(p).await;
        let took = started.elapsed();
        let routed = match (&r, p.network) {
            (Ok(()), NetworkMode::Routed) => {
                let t = Instant::now();
                let rr = steps.reroute(p).await;
                Some((rr, t, t.elapsed()))
            }
            _ => None,
        };
        (r, took, routed)
    };
    let ((resumed, resume_took), (rewired, rewire_took, routed)) = tokio::join!(resume, rewire);
    clock.record("resume", started, resume_took);
    resumed?;
    clock.record("rewire", started, rewire_took);
    rewired?;
    if let Some((rerouted, t, took)) = routed {
        clock.record("route", t, took);
        rerouted?;
    }

    // 3. A standby whose links were not raised at provisioning (made by an older daemon, or
    //    recovered mid-way) gets them raised now, on the critical path.
    if !p.shadow.link_ready() {
        timed(clock, "link_up", steps.link_up(p)).await?;
    }
    // From here on the shadow serves: the end of the outage as far as we can tell. Frames to
    // the MAC reach the new port even before any announcement, since the bridge floods frames
    // for a MAC whose old port is gone.
    clock.mark_restored();
    Ok(())
}

/// After service is restored: announce, roles, profile.
async fn finish<S: PromotionSteps>(
    steps: &S,
    p: &Promotion,
    clock: &mut StepClock,
    notes: &mut Vec<String>,
) -> Result<(), FailoverError> {
    // 4. Tell the network where the MAC lives now (switches beyond the bridge, ARP caches).
    timed(clock, "announce", async {
        steps.announce(p).await;
        Ok(())
    })
    .await?;
    // 5. Roles: the shadow is the primary now; the old one is retired and fenced.
    timed(clock, "metadata", steps.record_roles(p)).await?;
    // 6. Size and configure the promoted shadow from its profile (without one, grow a shadow
    //    shrunk for standby back to its defined size). Traffic already flows, so this cannot
    //    lengthen the outage; what it does or fails to do is a note.
    let t = Instant::now();
    notes.extend(steps.apply_profile(p).await);
    clock.record("apply_profile", t, t.elapsed());
    Ok(())
}

/// The steps on the real host: libvirt, netlink and the coordinator.
pub struct LiveSteps<'a> {
    /// The libvirt connection.
    pub hv: &'a Hypervisor,
    /// Netlink, in the namespace of the taps.
    pub net: &'a Netlink,
    /// Who owns which service.
    pub coord: &'a dyn Coordinator,
    /// Dead primaries' virtlockd connections, handed back at their reap.
    pub leases: &'a LeaseHandbacks,
    /// Domains whose QEMU this promotion saw reaped, leases handed back: libvirt may still
    /// list them running for a moment, but they hold no disk.
    reaped: Mutex<Vec<String>>,
}

impl<'a> LiveSteps<'a> {
    /// The live steps of one promotion.
    pub fn new(
        hv: &'a Hypervisor,
        net: &'a Netlink,
        coord: &'a dyn Coordinator,
        leases: &'a LeaseHandbacks,
    ) -> Self {
        LiveSteps {
            hv,
            net,
            coord,
            leases,
            reaped: Mutex::new(Vec::new()),
        }
    }
}

fn ignore_missing_link(r: Result<(), NetError>) -> Result<(), NetError> {
    match r {
        Err(NetError::NoSuchLink { .. }) => Ok(()),
        other => other,
    }
}

fn libvirt_step(step: &'static str) -> impl FnOnce(LibvirtError) -> FailoverError {
    move |source| FailoverError::Libvirt { step, source }
}

/// Longest a claim waits for an unreachable coordination backend: a lost host often takes an
/// etcd member with it, the leader among them, and the survivors elect a new one within a few
/// seconds. Nothing of the shadow is touched before the claim, so waiting is safe.
const CLAIM_RETRY_FOR: Duration = Duration::from_secs(15);
/// Pause between claim attempts while the backend does not answer.
const CLAIM_RETRY_PAUSE: Duration = Duration::from_millis(100);

/// [`claim_owner_once`], again while the coordination backend is unreachable (unavailable, or
/// no answer in time), for up to [`CLAIM_RETRY_FOR`]. A claim whose answer was lost is found
/// on the next attempt as this promotion's own.
pub async fn claim_owner(coord: &dyn Coordinator, p: &Promotion) -> Result<(), FailoverError> {
    retry_while_unreachable(CLAIM_RETRY_FOR, CLAIM_RETRY_PAUSE, || {
        claim_owner_once(coord, p)
    })
    .await
}

/// Runs `attempt` until it succeeds, fails otherwise than by an unreachable backend, or
/// `limit` has passed.
async fn retry_while_unreachable<F, Fut>(
    limit: Duration,
    pause: Duration,
    mut attempt: F,
) -> Result<(), FailoverError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), FailoverError>>,
{
    let deadline = Instant::now() + limit;
    let mut tries = 0u32;
    loop {
        tries += 1;
        match attempt().await {
            Err(FailoverError::ClaimLost { service, source })
                if matches!(
                    *source,
                    CoordError::Unavailable { .. } | CoordError::Timeout { .. }
                ) && Instant::now() + pause < deadline =>
            {
                tracing::warn!(%service, tries, error = %crate::error::report(&*source), "claim: coordination backend unreachable; trying again");
                tokio::time::sleep(pause).await;
            }
            other => return other,
        }
    }
}

/// Compare-and-swap on the owner record of `p.service`: it must still name the old primary
/// (no record yet counts as generation 0). A record that names this very shadow on this host
/// already is this promotion's own claim, made before a restart interrupted it (or whose
/// answer was lost): the promotion goes on without claiming again (only this host promotes
/// its shadows).
async fn claim_owner_once(coord: &dyn Coordinator, p: &Promotion) -> Result<(), FailoverError> {
    let lost = |source| FailoverError::ClaimLost {
        service: p.service.clone(),
        source: Box::new(source),
    };
    let expected = match coord.owner(&p.service).await.map_err(lost)? {
        None => 0,
        Some(r)
            if r.domain == p.old_primary
                && p.owner_generation.is_none_or(|g| g == r.generation) =>
        {
            r.generation
        }
        Some(r) if r.domain == p.shadow.name && r.host == *coord.host() => {
            tracing::info!(service = %p.service, generation = r.generation, "the owner record names this shadow already (claimed before a restart)");
            return Ok(());
        }
        Some(current) => {
            return Err(lost(CoordError::Conflict {
                service: p.service.clone(),
                expected: 0,
                current,
            }))
        }
    };
    if let Some(hold) = super::fault_claim_hold() {
        tracing::warn!(
            ?hold,
            "fault injection: holding the claim ({})",
            super::FAULT_CLAIM_HOLD_ENV
        );
        tokio::time::sleep(hold).await;
    }
    coord
        .claim(Claim {
            service: p.service.clone(),
            domain: p.shadow.name.clone(),
            expected,
        })
        .await
        .map(drop)
        .map_err(lost)
}

impl LiveSteps<'_> {
    /// Has libvirt finish stopping `name` and confirms it sees the domain inactive: until
    /// then libvirt holds the dead QEMU's disk leases (its lock manager refuses the disks to
    /// anyone else) and may still report it running.
    async fn libvirt_stopped(&self, name: &str) -> Result<(), FailoverError> {
        // libvirt stops a domain whose QEMU died by itself when its monitor hits EOF; a destroy
        // would only queue behind that. (libvirt's own stop often costs about 200 ms here: its
        // kill loop, finding the QEMU not yet reaped, sleeps that long before it looks again.)
        let deadline = Instant::now() + LIBVIRT_CATCH_UP;
        loop {
            let n = name.to_string();
            match self
                .hv
                .run("fence: libvirt state", move |hv| hv.state(&n))
                .await
            {
                Ok(s) if !s.is_active() => return Ok(()),
                Err(LibvirtError::NoSuchDomain { .. }) => return Ok(()),
                _ if Instant::now() >= deadline => break,
                _ => tokio::time::sleep(LIBVIRT_CATCH_UP_POLL).await,
            }
        }
        let n = name.to_string();
        let state = self
            .hv
            .run("fence: libvirt stops the old primary", move |hv| {
                // Waits for libvirt's own processing of the exit; "not running" is success.
                hv.destroy(&n)?;
                hv.state(&n)
            })
            .await;
        match state {
            Ok(s) if !s.is_active() => Ok(()),
            Err(LibvirtError::NoSuchDomain { .. }) => Ok(()),
            Ok(s) => Err(FailoverError::FenceUnconfirmed {
                domain: name.to_string(),
                why: format!("libvirt still reports it {}", s.as_str()),
            }),
            Err(e) => Err(FailoverError::FenceUnconfirmed {
                domain: name.to_string(),
                why: format!(
                    "libvirt cannot confirm it stopped: {}",
                    crate::error::report(&e)
                ),
            }),
        }
    }
}

/// Compare-and-swap back: while the owner record names the shadow of the failed promotion on
/// this host, it names the old primary again, on the old primary's host (another one when the
/// primary ran elsewhere: this host never ran it).
pub async fn unclaim_owner(coord: &dyn Coordinator, p: &Promotion) -> Result<(), FailoverError> {
    let lost = |source| FailoverError::ClaimLost {
        service: p.service.clone(),
        source: Box::new(source),
    };
    match coord.owner(&p.service).await.map_err(lost)? {
        Some(r) if r.domain == p.shadow.name && r.host == *coord.host() => coord
            .give_back(
                Claim {
                    service: p.service.clone(),
                    domain: p.old_primary.clone(),
                    expected: r.generation,
                },
                p.old_host.as_ref().unwrap_or(coord.host()),
            )
            .await
            .map(drop)
            .map_err(lost),
        // Someone else moved it on (or it was never ours): leave it.
        _ => Ok(()),
    }
}

impl PromotionSteps for LiveSteps<'_> {
    async fn data_disks(&self, p: &Promotion) -> Result<Vec<DataDisk>, FailoverError> {
        let Some(handover) = &p.handover else {
            return Ok(Vec::new());
        };
        let old = p.old_primary.clone();
        let xml = self
            .hv
            .run("read old primary XML", move |hv| {
                // The definition names the disks as configured; a transient domain has only
                // its live XML.
                let persistent = hv.is_persistent(&old)?;
                hv.xml(&old, persistent)
            })
            .await
            .map_err(libvirt_step("plan_disks: read old primary XML"))?;
        let primary = DomainXml::parse(&xml).map_err(|source| FailoverError::Xml {
            domain: p.old_primary.clone(),
            source,
        })?;
        data_disks(&primary, &handover.disks).map_err(|source| FailoverError::Plan {
            domain: p.old_primary.clone(),
            source,
        })
    }

    async fn stop_old_qemu(&self, p: &Promotion) -> Result<(), FailoverError> {
        let name = &p.old_primary;
        let unconfirmed = |why: String| FailoverError::FenceUnconfirmed {
            domain: name.clone(),
            why,
        };
        match kill_qemu(Path::new(QEMU_RUN_DIR), name, QEMU_EXIT_TIMEOUT).await {
            // No QEMU: libvirt has already seen it go (or it never ran).
            Ok(None) => {}
            Ok(Some(pid)) => {
                tracing::info!(old_primary = %name, pid, "fence: old primary's QEMU killed and gone")
            }
            Err(why) => return Err(unconfirmed(why)),
        }
        // Gone: it writes no disk any more. Its leases are free once its held virtlockd
        // connection was closed after the reap; otherwise once libvirt has finished stopping
        // the domain, and the attach needs them.
        if self.leases.released(name, LIBVIRT_CATCH_UP).await {
            tracing::info!(old_primary = %name, "fence: old primary's QEMU reaped, its disk leases handed back");
            self.reaped
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(name.clone());
            return Ok(());
        }
        self.libvirt_stopped(name).await
    }

    async fn attach(&self, p: &Promotion, disks: &[DataDisk]) -> Result<(), FailoverError> {
        // understudy's own single-writer check, besides the fencing before it and libvirt's
        // lock manager (which leases no network disk: NBD, RBD, iSCSI): no other running
        // domain may hold a data disk. A disk the shadow itself holds already was attached by
        // a promotion that a daemon restart interrupted; it is not attached twice.
        let sources: Vec<String> = disks.iter().map(|d| d.source.clone()).collect();
        let skip = self
            .reaped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let holders = self
            .hv
            .run("attach: who holds the data disks", move |hv| {
                let running = running_definitions(hv, Path::new(QEMU_RUN_DIR), &skip)?;
                Ok(sources
                    .iter()
                    .map(|s| {
                        disk_holders(&running, s)
                            .into_iter()
                            .map(|(n, t)| (n.to_string(), t))
                            .collect::<Vec<_>>()
                    })
                    .collect::<Vec<_>>())
            })
            .await
            .map_err(libvirt_step("attach: list running domains"))?;
        for (disk, holders) in disks.iter().zip(holders) {
            let (ours, others): (Vec<_>, Vec<_>) =
                holders.into_iter().partition(|(n, _)| *n == p.shadow.name);
            if !others.is_empty() {
                return Err(FailoverError::DiskHeld {
                    shadow: p.shadow.name.clone(),
                    target: disk.target.clone(),
                    disk_source: disk.source.clone(),
                    holders: others.into_iter().map(|(n, _)| n).collect(),
                });
            }
            if ours.iter().any(|(_, t)| *t == disk.target) {
                tracing::info!(shadow = %p.shadow.name, disk = %disk.target, source = %disk.source, "data disk already attached (a hand-over interrupted by a restart); not attached again");
                continue;
            }
            let (shadow, xml) = (p.shadow.name.clone(), disk.xml.clone());
            self.hv
                .run("attach data disk", move |hv| {
                    hv.attach_device(&shadow, &xml)
                })
                .await
                .map_err(|source| FailoverError::Attach {
                    shadow: p.shadow.name.clone(),
                    target: disk.target.clone(),
                    disk_source: disk.source.clone(),
                    source: Box::new(source),
                })?;
            tracing::info!(shadow = %p.shadow.name, disk = %disk.target, source = %disk.source, "data disk attached");
        }
        if super::fault_fail_once("attach") {
            return Err(FailoverError::Injected { step: "attach" });
        }
        Ok(())
    }

    async fn promote_commands(&self, p: &Promotion) -> Result<(), FailoverError> {
        let Some(handover) = &p.handover else {
            return Ok(());
        };
        for argv in &handover.commands {
            run_in_guest(
                self.hv,
                &p.shadow.name,
                argv,
                handover.command_timeout,
                handover.agent_max_reply,
            )
            .await
            .map_err(|outcome| FailoverError::PromoteCommand {
                shadow: p.shadow.name.clone(),
                argv: argv.clone(),
                outcome,
            })?;
        }
        Ok(())
    }

    async fn assume_identity(&self, p: &Promotion) -> Result<Vec<String>, FailoverError> {
        let id = p.identity.clone().unwrap_or_default();
        let mut notes = Vec::new();
        let hostname = id.guest.as_ref().and_then(|g| g.hostname.clone());
        match hostname.as_deref().and_then(hostname_argv) {
            Some(argv) => {
                run_in_guest(
                    self.hv,
                    &p.shadow.name,
                    &argv,
                    IDENTITY_COMMAND_TIMEOUT,
                    id.agent_max_reply,
                )
                .await
                .map_err(|outcome| FailoverError::Identity {
                    shadow: p.shadow.name.clone(),
                    what: "host name".into(),
                    outcome,
                })?;
                notes.push(format!(
                    "identity: host name {}",
                    hostname.clone().unwrap_or_default()
                ));
            }
            None => notes.push(format!(
                "identity: the host name of '{}' was never read; the shadow keeps the template's",
                p.old_primary
            )),
        }
        if !id.config_files.is_empty() {
            let (shadow, files, max_reply) = (
                p.shadow.name.clone(),
                id.config_files.clone(),
                id.agent_max_reply,
            );
            let delivered = self
                .hv
                .blocking("identity: configuration files", move |hv| {
                    let agent = crate::monitor::agent::GuestAgent::new(
                        crate::libvirt::LibvirtAgent {
                            hv: hv.clone(),
                            domain: shadow.clone(),
                            max_reply,
                        },
                        crate::monitor::agent::AgentOptions {
                            limits: crate::monitor::agent::AgentLimits {
                                max_reply_bytes: max_reply,
                                ..Default::default()
                            },
                            command_timeout: IDENTITY_COMMAND_TIMEOUT,
                            ..Default::default()
                        },
                    );
                    super::apply_profile::deliver_config(&agent, &shadow, &files)
                })
                .await
                .map_err(libvirt_step("identity: configuration files"))?;
            notes.extend(delivered.into_iter().map(|n| format!("identity: {n}")));
        }
        Ok(notes)
    }

    async fn plug_nics(&self, p: &Promotion) -> Result<PluggedNics, FailoverError> {
        let old = p.old_primary.clone();
        let xml = self
            .hv
            .run("plug_nic: read old primary XML", move |hv| {
                let persistent = hv.is_persistent(&old)?;
                hv.xml(&old, persistent)
            })
            .await
            .map_err(libvirt_step("plug_nic: read old primary XML"))?;
        let xml_err = |source| FailoverError::Xml {
            domain: p.old_primary.clone(),
            source,
        };
        let primary = DomainXml::parse(&xml).map_err(xml_err)?;
        let shape = primary_shape(&primary).map_err(xml_err)?;
        let primary_nics = primary.interfaces();
        let bridges: BTreeMap<String, Option<String>> = primary_nics
            .iter()
            .filter_map(|i| Some((i.mac.as_deref()?.to_ascii_lowercase(), i.bridge.clone())))
            .collect();
        let (shadow, nics) = (p.shadow.name.clone(), shape.nics.clone());
        let nics_of = |xml: String| {
            DomainXml::parse(&xml)
                .map(|d| d.interfaces())
                .unwrap_or_default()
        };
        let (taken, plans) = self
            .hv
            .run("plug NICs", move |hv| {
                let live = nics_of(hv.xml(&shadow, false)?);
                let mut spec = if hv.is_persistent(&shadow)? {
                    DomainXml::parse(&hv.xml(&shadow, true)?).ok()
                } else {
                    None
                };
                let spec_nics = spec.as_ref().map(|s| s.interfaces()).unwrap_or_default();
                let plans = plan_nics(&primary_nics, &live, &spec_nics);
                let mut taken = BTreeMap::new();
                let mut rename = false;
                for (mac, plan) in &plans {
                    match plan {
                        NicPlan::Present => {}
                        NicPlan::Take {
                            placeholder,
                            renamed,
                        } => {
                            if !renamed {
                                rename |= spec
                                    .as_mut()
                                    .is_some_and(|s| s.rename_interface_mac(placeholder, mac));
                            }
                            taken.insert(mac.clone(), placeholder.clone());
                        }
                        NicPlan::Plug => {
                            let xml = nics.iter().find(|(m, _)| m == mac).map(|(_, x)| x);
                            if let Some(xml) = xml {
                                hv.attach_device(&shadow, xml)?;
                            }
                        }
                    }
                }
                // libvirt cannot change a running NIC's MAC (it finds the NIC by its MAC): the
                // definition says the primary's MAC, so a restart of the domain keeps it.
                if let (true, Some(spec)) = (rename, &spec) {
                    hv.define(&spec.to_xml())?;
                }
                Ok((taken, plans))
            })
            .await
            .map_err(libvirt_step("plug_nic"))?;
        let mut taps = Vec::new();
        for mut b in super::shadow::live_taps(self.hv, &p.shadow.name).await? {
            let lower = b.mac.to_ascii_lowercase();
            if let Some((mac, _)) = taken.iter().find(|(_, ph)| **ph == lower) {
                // A standing-by NIC: the primary's MAC and bridge from now on; its tap is still
                // down and off the bridge, its link up since provisioning.
                b.bridge = bridges.get(mac).cloned().flatten();
                b.mac = mac.clone();
            } else if !plans.iter().any(|(m, _)| *m == lower) {
                // A standing-by NIC no NIC of the primary took: it stays off the bridge.
                continue;
            }
            tracing::info!(shadow = %p.shadow.name, mac = %b.mac, tap = %b.tap, bridge = ?b.bridge, link_up = b.link_up, standing_by = taken.contains_key(&b.mac), "NIC of the old primary on the shadow");
            taps.push(b);
        }
        Ok(PluggedNics {
            shape,
            taps,
            guest_macs: taken,
        })
    }

    async fn address(&self, p: &Promotion) -> Result<(), FailoverError> {
        let id = p.identity.clone().unwrap_or_default();
        let none = Vec::new();
        for b in &p.shadow.taps {
            let addrs = id
                .guest
                .as_ref()
                .and_then(|g| g.addresses.get(&b.mac.to_ascii_lowercase()))
                .unwrap_or(&none);
            let guest_mac = id
                .guest_macs
                .get(&b.mac.to_ascii_lowercase())
                .unwrap_or(&b.mac);
            let Some(argv) = address_argv(guest_mac, &b.mac, addrs) else {
                continue;
            };
            run_in_guest(
                self.hv,
                &p.shadow.name,
                &argv,
                super::identity::NIC_APPEAR_TIMEOUT + IDENTITY_COMMAND_TIMEOUT,
                id.agent_max_reply,
            )
            .await
            .map_err(|outcome| FailoverError::Identity {
                shadow: p.shadow.name.clone(),
                what: format!("addresses of the NIC {}", b.mac),
                outcome,
            })?;
        }
        Ok(())
    }

    async fn size_like(&self, p: &Promotion, shape: &PrimaryShape) -> Vec<String> {
        let (shadow, want) = (p.shadow.name.clone(), shape.clone());
        let r = self
            .hv
            .blocking("size like the old primary", move |hv| {
                let lv = |e: LibvirtError| crate::error::report(&e);
                let live = hv.xml(&shadow, false).map_err(lv)?;
                let live = DomainXml::parse(&live).map_err(|e| crate::error::report(&e))?;
                let (max_vcpus, max_kib) = (live.vcpus().max, live.memory_kib().max_kib);
                let (cur_vcpus, cur_kib) = hv.live_resources(&shadow).map_err(lv)?;
                let vcpus = want.vcpus.clamp(1, max_vcpus.max(1));
                let kib = want.mem_kib.min(max_kib);
                let mut notes = Vec::new();
                if vcpus != cur_vcpus {
                    hv.set_vcpus_live(&shadow, vcpus).map_err(lv)?;
                    notes.push(format!(
                        "size: vCPUs {cur_vcpus} -> {vcpus} (the old primary's {}, shadow maximum {max_vcpus})",
                        want.vcpus
                    ));
                }
                if kib != cur_kib {
                    hv.set_memory_live(&shadow, kib).map_err(lv)?;
                    notes.push(format!(
                        "size: memory {cur_kib} -> {kib} KiB (the old primary's {}, shadow maximum {max_kib})",
                        want.mem_kib
                    ));
                }
                if notes.is_empty() {
                    notes.push(format!(
                        "size: already the old primary's ({vcpus} vCPUs, {kib} KiB)"
                    ));
                }
                Ok::<_, String>(notes)
            })
            .await;
        match r {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => vec![format!("size: unchanged: {e}")],
            Err(e) => vec![format!("size: unchanged: {}", crate::error::report(&e))],
        }
    }

    async fn unclaim(&self, p: &Promotion) {
        if let Err(e) = unclaim_owner(self.coord, p).await {
            tracing::warn!(service = %p.service, error = %crate::error::report(&e), "cannot give the service back to the old primary after a failed promotion");
        }
    }

    async fn release(&self, p: &Promotion) {
        let s = p.shadow.name.clone();
        match self
            .hv
            .run("release data disks", move |hv| hv.destroy(&s))
            .await
        {
            Ok(()) => {
                tracing::warn!(shadow = %p.shadow.name, "hand-over failed: shadow destroyed, its data disks are on no domain")
            }
            Err(e) => {
                tracing::error!(shadow = %p.shadow.name, error = %crate::error::report(&e), "hand-over failed and the shadow could not be destroyed")
            }
        }
    }

    /// A dead QEMU is already fenced; still cut any tap it left so no stale port keeps the
    /// MAC. A live (hung or switched-over) primary is cut off the bridge, and the cut is read
    /// back.
    async fn fence(&self, p: &Promotion) -> Result<(), FailoverError> {
        let net = self.net;
        for b in &p.old_taps {
            ignore_missing_link(net.set_nomaster(&b.tap).await)
                .and(ignore_missing_link(net.set_down(&b.tap).await))
                .map_err(|source| FailoverError::Net {
                    step: "fence: cut old primary's tap",
                    source,
                })?;
        }
        if p.trigger.primary_known_dead() {
            return Ok(());
        }
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
            self.hv
                .run("fence: pause", move |hv| hv.suspend(&old))
                .await
                .map_err(libvirt_step("fence: pause old primary"))?;
        }
        Ok(())
    }

    async fn claim(&self, p: &Promotion) -> Result<(), FailoverError> {
        claim_owner(self.coord, p).await
    }

    async fn wake(&self, p: &Promotion, tier: Tier) -> Result<Vec<TapBinding>, FailoverError> {
        let shadow = p.shadow.name.clone();
        // A saved shadow restores paused (its image holds the off-bridge standby); a cold one
        // boots from its bridged definition.
        let paused = tier == Tier::Saved;
        self.hv
            .run("wake shadow", move |hv| hv.start(&shadow, paused))
            .await
            .map_err(libvirt_step("wake"))?;
        super::shadow::live_taps(self.hv, &p.shadow.name).await
    }

    async fn resume(&self, p: &Promotion) -> Result<(), FailoverError> {
        let shadow = p.shadow.name.clone();
        self.hv
            .run("resume shadow", move |hv| match hv.resume(&shadow) {
                // Resuming again after an interrupted promotion: already running is fine.
                Err(e) if hv.state(&shadow).ok() == Some(RunState::Running) => {
                    tracing::info!(error = %e, "shadow already running");
                    Ok(())
                }
                other => other,
            })
            .await
            .map_err(libvirt_step("resume"))
    }

    async fn rewire(&self, p: &Promotion) -> Result<(), FailoverError> {
        for b in &p.shadow.taps {
            if p.network == NetworkMode::Routed {
                // Its own tap, on no bridge: up, and the routes follow (`reroute`).
                self.net
                    .set_up(&b.tap)
                    .await
                    .map_err(|source| FailoverError::Net {
                        step: "rewire: shadow tap up",
                        source,
                    })?;
                continue;
            }
            // Each shadow tap goes onto the bridge its own definition names.
            let Some(bridge) = &b.bridge else { continue };
            self.net
                .enslave_and_up(&b.tap, bridge)
                .await
                .map_err(|source| FailoverError::Net {
                    step: "rewire: enslave shadow tap",
                    source,
                })?;
        }
        Ok(())
    }

    async fn reroute(&self, p: &Promotion) -> Result<(), FailoverError> {
        for b in &p.shadow.taps {
            let Some(old) = old_tap_of(p, &b.mac) else {
                continue;
            };
            if old.routed.routes.is_empty() {
                tracing::warn!(service = %p.service, tap = %b.tap, mac = %b.mac, "routed class, but no host route to move was known for this MAC");
            }
            for (address, prefix) in &old.routed.addresses {
                self.net
                    .ensure_ipv4_address(&b.tap, *address, *prefix)
                    .await
                    .map_err(|source| FailoverError::Net {
                        step: "route: host address on the shadow's tap",
                        source,
                    })?;
            }
            for dest in &old.routed.routes {
                self.net
                    .replace_host_route(*dest, &b.tap)
                    .await
                    .map_err(|source| FailoverError::Net {
                        step: "route: replace host route",
                        source,
                    })?;
                tracing::info!(service = %p.service, %dest, tap = %b.tap, "host route now points at the shadow's tap");
            }
        }
        Ok(())
    }

    async fn link_up(&self, p: &Promotion) -> Result<(), FailoverError> {
        let s = p.shadow.name.clone();
        let macs: Vec<String> = p.shadow.taps.iter().map(|b| b.mac.clone()).collect();
        self.hv
            .run("link up", move |hv| raise_links(hv, &s, &macs))
            .await
            .map_err(libvirt_step("link up"))
    }

    async fn announce(&self, p: &Promotion) {
        let s = p.shadow.name.clone();
        let announce = r#"{"execute":"announce-self","arguments":{"initial":50,"max":550,"rounds":5,"step":100}}"#;
        if let Err(e) = self
            .hv
            .run("announce", move |hv| hv.qmp(&s, announce))
            .await
        {
            tracing::warn!(error = %crate::error::report(&e), "announce-self failed");
        }
    }

    async fn record_roles(&self, p: &Promotion) -> Result<(), FailoverError> {
        let new_meta = member_meta(
            &p.service,
            &p.class,
            Role::Primary,
            p.shadow_generation,
            MemberState::Active,
        );
        let new = p.shadow.name.clone();
        self.hv
            .run("roles", move |hv| write_meta(hv, &new, &new_meta))
            .await
            .map_err(libvirt_step("metadata"))?;
        if p.old_host.is_some() {
            // Its own host retires it when it sees the new owner.
            return Ok(());
        }
        // The old primary is retired off the critical path: after a crash libvirt holds that
        // domain's job until it has processed the QEMU exit, which takes about a second.
        let old_meta = member_meta(&p.service, &p.class, Role::Retired, 0, MemberState::Fenced);
        let (service, old) = (p.service.clone(), p.old_primary.clone());
        let kill_old = p.trigger == Trigger::Manual;
        let hv = self.hv.clone();
        tokio::spawn(async move {
            let r = hv
                .run("retire old primary", move |hv| {
                    if kill_old {
                        hv.destroy(&old)?;
                    }
                    write_meta(hv, &old, &old_meta)
                })
                .await;
            match r {
                // The retired domain may be gone entirely (transient); that is fine.
                Ok(()) | Err(LibvirtError::NoSuchDomain { .. }) => {}
                Err(e) => {
                    tracing::warn!(%service, error = %crate::error::report(&e), "cannot retire the old primary")
                }
            }
        });
        Ok(())
    }

    async fn apply_profile(&self, p: &Promotion) -> Vec<String> {
        match &p.profile {
            Some(profile) => super::apply_profile::apply(self.hv, &p.shadow.name, profile).await,
            None => {
                let shadow = p.shadow.name.clone();
                self.hv
                    .blocking("grow back", move |hv| {
                        super::standby::grow_back(hv, &shadow)
                    })
                    .await
                    .ok()
                    .flatten()
                    .into_iter()
                    .collect()
            }
        }
    }
}

/// The live definitions of the running domains but `skip`, from libvirt's status files; a
/// domain whose file cannot be read or parsed is asked of libvirtd, and libvirtd lists them all
/// when the files cannot be listed. libvirtd is avoided because listing locks every domain, and
/// a domain libvirtd is still stopping after a crash stays locked while its kill poll sleeps
/// (200 ms steps until the pid is gone): the attach would wait that out.
fn running_definitions(
    hv: &Hypervisor,
    run_dir: &Path,
    skip: &[String],
) -> Result<Vec<(String, DomainXml)>, LibvirtError> {
    let from_libvirt = |name: &str| -> Option<DomainXml> {
        let xml = hv.xml(name, false).ok()?; // gone meanwhile
        DomainXml::parse(&xml)
            .inspect_err(|e| tracing::warn!(domain = %name, error = %crate::error::report(e), "live definition unreadable; its disks are not checked"))
            .ok()
    };
    let names: Vec<(String, Option<String>)> = match crate::libvirt::status_files(run_dir) {
        Ok(files) => files
            .into_iter()
            .map(|(name, text)| (name, text.ok()))
            .collect(),
        Err(e) => {
            tracing::debug!(dir = %run_dir.display(), error = %e, "libvirt status files unreadable; asking libvirtd");
            hv.list()?
                .into_iter()
                .filter(|d| d.state.is_active())
                .map(|d| (d.name, None))
                .collect()
        }
    };
    let mut running = Vec::new();
    for (name, text) in names {
        if skip.contains(&name) {
            continue;
        }
        let parsed = match text.map(|t| DomainXml::parse_status(&t)) {
            Some(Ok(x)) => Some(x),
            Some(Err(e)) => {
                tracing::debug!(domain = %name, error = %crate::error::report(&e), "status file unreadable; asking libvirtd");
                from_libvirt(&name)
            }
            None => from_libvirt(&name),
        };
        if let Some(x) = parsed {
            running.push((name, x));
        }
    }
    Ok(running)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;
    use crate::failover::{RoutedSide, ShadowState};

    /// How long each fake step takes, so concurrent steps really overlap.
    const FAKE_STEP: Duration = Duration::from_millis(1);

    /// Records the order of the steps; fails the one named in `fail`. With `coord`, `claim`
    /// and `unclaim` also do their work on it.
    struct Recorder {
        calls: Mutex<Vec<&'static str>>,
        fail: Option<&'static str>,
        coord: Option<crate::cluster::LocalCoordinator>,
    }

    impl Recorder {
        fn failing(fail: Option<&'static str>) -> Self {
            Recorder {
                calls: Mutex::new(Vec::new()),
                fail,
                coord: None,
            }
        }

        async fn step(&self, name: &'static str) -> Result<(), FailoverError> {
            tokio::time::sleep(FAKE_STEP).await;
            self.calls.lock().unwrap().push(name);
            if self.fail == Some(name) {
                return Err(FailoverError::FenceUnconfirmed {
                    domain: "web".into(),
                    why: format!("{name} failed in the test"),
                });
            }
            Ok(())
        }

        fn calls(&self) -> Vec<&'static str> {
            self.calls.lock().unwrap().clone()
        }
    }

    impl PromotionSteps for Recorder {
        async fn data_disks(&self, p: &Promotion) -> Result<Vec<DataDisk>, FailoverError> {
            self.step("plan_disks").await?;
            // A class that hands over has one data disk in these tests.
            Ok(p.handover
                .iter()
                .map(|_| DataDisk {
                    target: "vdb".into(),
                    source: "/d/web-data.raw".into(),
                    xml: "<disk/>".into(),
                })
                .collect())
        }
        async fn fence(&self, _: &Promotion) -> Result<(), FailoverError> {
            self.step("fence").await
        }
        async fn stop_old_qemu(&self, _: &Promotion) -> Result<(), FailoverError> {
            self.step("stop_old_qemu").await
        }
        async fn attach(&self, _: &Promotion, disks: &[DataDisk]) -> Result<(), FailoverError> {
            assert_eq!(disks.len(), 1);
            self.step("attach").await
        }
        async fn promote_commands(&self, _: &Promotion) -> Result<(), FailoverError> {
            self.step("promote_commands").await
        }
        async fn release(&self, _: &Promotion) {
            let _ = self.step("release").await;
        }
        async fn unclaim(&self, p: &Promotion) {
            let _ = self.step("unclaim").await;
            if let Some(c) = &self.coord {
                unclaim_owner(c, p).await.unwrap();
            }
        }
        async fn claim(&self, p: &Promotion) -> Result<(), FailoverError> {
            self.step("claim").await?;
            match &self.coord {
                Some(c) => claim_owner(c, p).await,
                None => Ok(()),
            }
        }
        async fn wake(&self, _: &Promotion, _: Tier) -> Result<Vec<TapBinding>, FailoverError> {
            self.step("wake").await?;
            Ok(vec![TapBinding {
                mac: "52:54:00:00:00:01".into(),
                tap: "vnet9".into(),
                bridge: Some("br0".into()),
                link_up: true,
                routed: Default::default(),
            }])
        }
        async fn resume(&self, _: &Promotion) -> Result<(), FailoverError> {
            self.step("resume").await
        }
        async fn rewire(&self, _: &Promotion) -> Result<(), FailoverError> {
            self.step("rewire").await
        }
        async fn reroute(&self, _: &Promotion) -> Result<(), FailoverError> {
            self.step("route").await
        }
        async fn link_up(&self, _: &Promotion) -> Result<(), FailoverError> {
            self.step("link_up").await
        }
        async fn announce(&self, _: &Promotion) {
            let _ = self.step("announce").await;
        }
        async fn record_roles(&self, _: &Promotion) -> Result<(), FailoverError> {
            self.step("metadata").await
        }
        async fn apply_profile(&self, _: &Promotion) -> Vec<String> {
            let _ = self.step("apply_profile").await;
            vec!["resized".into()]
        }
        async fn assume_identity(&self, _: &Promotion) -> Result<Vec<String>, FailoverError> {
            self.step("identity").await?;
            Ok(vec!["identity: host name web".into()])
        }
        /// A shadow standing by with a NIC (`p.shadow.taps`) gives it the primary's MAC, link
        /// up; one without gets the NIC plugged, link down.
        async fn plug_nics(&self, p: &Promotion) -> Result<PluggedNics, FailoverError> {
            self.step("plug_nic").await?;
            let shape = PrimaryShape {
                nics: vec![("52:54:00:00:00:07".into(), "<interface/>".into())],
                vcpus: 1,
                mem_kib: 196_608,
            };
            let standing_by = p.shadow.taps.first();
            let taps = shape
                .nics
                .iter()
                .map(|(mac, _)| TapBinding {
                    mac: mac.clone(),
                    tap: "vnet7".into(),
                    bridge: Some("br0".into()),
                    link_up: standing_by.is_some(),
                    routed: Default::default(),
                })
                .collect();
            let guest_macs = standing_by
                .map(|b| ("52:54:00:00:00:07".to_string(), b.mac.clone()))
                .into_iter()
                .collect();
            Ok(PluggedNics {
                shape,
                taps,
                guest_macs,
            })
        }
        async fn address(&self, _: &Promotion) -> Result<(), FailoverError> {
            self.step("address").await
        }
        async fn size_like(&self, _: &Promotion, _: &PrimaryShape) -> Vec<String> {
            let _ = self.step("size").await;
            vec!["size: as the old primary".into()]
        }
    }

    fn pooled_promotion() -> Promotion {
        let mut p = stateful_promotion();
        p.shadow.name = "web-pool-shadow-1".into();
        p.shadow.taps.clear();
        p.shadow.state = ShadowState::PAUSED;
        p.identity = Some(Identity::default());
        p
    }

    #[tokio::test]
    async fn a_pooled_shadow_becomes_the_primary_before_its_network_comes_up() {
        let r = Recorder::failing(None);
        let done = run(&r, pooled_promotion()).await.unwrap();
        let calls = r.calls();
        assert_eq!(calls[..4], ["plan_disks", "fence", "claim", "plug_nic"]);
        // The old QEMU is stopped for good beside the resume, before any disk is attached.
        let mut beside = calls[4..6].to_vec();
        beside.sort_unstable();
        assert_eq!(beside, ["resume", "stop_old_qemu"]);
        assert_eq!(
            calls[6..],
            [
                "identity",
                "attach",
                "promote_commands",
                "link_up",
                "address",
                "rewire",
                "announce",
                "metadata",
                "size",
            ]
        );
        assert_eq!(
            done.taps[0].mac, "52:54:00:00:00:07",
            "the old primary's MAC"
        );
        assert!(done.record.notes.iter().any(|n| n.contains("host name")));
        let steps = step_names(&done.record);
        assert!(steps.contains(&"plug_nic") && steps.contains(&"size"));
        // Without data disks the same order, without the hand-over.
        let r = Recorder::failing(None);
        let p = Promotion {
            handover: None,
            ..pooled_promotion()
        };
        run(&r, p).await.unwrap();
        assert_eq!(
            r.calls(),
            [
                "fence", "claim", "plug_nic", "resume", "identity", "link_up", "address", "rewire",
                "announce", "metadata", "size"
            ]
        );
        // A shadow standing by with a NIC: its link is up already; the guest takes the MAC at
        // `address`, and only then its tap joins the bridge.
        let r = Recorder::failing(None);
        let mut p = Promotion {
            handover: None,
            ..pooled_promotion()
        };
        p.shadow.taps = vec![TapBinding {
            mac: "0a:00:00:00:00:01".into(),
            tap: "vnet7".into(),
            bridge: None,
            link_up: true,
            routed: Default::default(),
        }];
        let done = run(&r, p).await.unwrap();
        assert_eq!(
            r.calls(),
            [
                "fence", "claim", "plug_nic", "resume", "identity", "address", "rewire",
                "announce", "metadata", "size"
            ]
        );
        assert_eq!(done.taps[0].mac, "52:54:00:00:00:07", "the primary's MAC");
    }

    #[tokio::test]
    async fn a_pooled_promotion_that_fails_gives_back_the_shadow_and_the_claim() {
        for failing in ["plug_nic", "identity", "link_up", "address", "rewire"] {
            let r = Recorder::failing(Some(failing));
            let failed = run(&r, pooled_promotion()).await.unwrap_err();
            let calls = r.calls();
            assert_eq!(&calls[calls.len() - 3..], [failing, "release", "unclaim"]);
            assert!(!calls.contains(&"announce"), "{calls:?}");
            assert!(!failed.record.ok);
        }
    }

    fn promotion(links_up: bool) -> Promotion {
        Promotion {
            service: "web".into(),
            class: "stateless".into(),
            old_primary: "web".into(),
            old_host: None,
            old_taps: Vec::new(),
            owner_generation: None,
            shadow: Shadow {
                name: "web-shadow-1".into(),
                state: ShadowState::Promoting,
                taps: vec![TapBinding {
                    mac: "52:54:00:00:00:01".into(),
                    tap: "vnet1".into(),
                    bridge: Some("br0".into()),
                    link_up: links_up,
                    routed: RoutedSide::default(),
                }],
                data_disks: None,
            },
            shadow_generation: 1,
            trigger: Trigger::Pidfd,
            detected_at: Instant::now(),
            profile: None,
            handover: None,
            network: NetworkMode::Bridged,
            identity: None,
        }
    }

    #[tokio::test]
    async fn a_saved_or_cold_shadow_wakes_after_the_claim_and_serves_on_its_new_taps() {
        for tier in [Tier::Saved, Tier::Cold] {
            let r = Recorder::failing(None);
            let mut p = promotion(false);
            p.shadow.state = ShadowState::Standby(tier);
            p.shadow.taps.clear();
            let done = run(&r, p).await.unwrap();
            let calls = r.calls();
            assert_eq!(&calls[..3], ["fence", "claim", "wake"], "{tier:?}");
            assert!(!calls.contains(&"link_up"), "woken links are up: {calls:?}");
            assert_eq!(done.taps[0].tap, "vnet9");
            assert!(step_names(&done.record).contains(&"wake"));
        }
        // A paused shadow does not wake; a failed wake gives the claim back.
        let r = Recorder::failing(None);
        let mut p = promotion(true);
        p.shadow.state = ShadowState::PAUSED;
        run(&r, p).await.unwrap();
        assert!(!r.calls().contains(&"wake"));
        let r = Recorder::failing(Some("wake"));
        let mut p = promotion(true);
        p.shadow.state = ShadowState::Standby(Tier::Saved);
        assert!(run(&r, p).await.is_err());
        assert_eq!(r.calls(), ["fence", "claim", "wake", "unclaim"]);
    }

    fn stateful_promotion() -> Promotion {
        Promotion {
            handover: Some(Handover {
                disks: DiskPolicy::default(),
                commands: vec![vec!["/bin/us-data".into(), "mount".into()]],
                command_timeout: Duration::from_secs(1),
                agent_max_reply: 4096,
            }),
            ..promotion(true)
        }
    }

    fn step_names(record: &FailoverRecord) -> Vec<&str> {
        record.steps.iter().map(|s| s.name.as_str()).collect()
    }

    #[tokio::test]
    async fn data_disks_change_hands_before_the_network_comes_up() {
        let r = Recorder::failing(None);
        let done = run(&r, stateful_promotion()).await.unwrap();
        // The old QEMU is stopped for good while the shadow resumes, in either order.
        let mut calls = r.calls();
        calls[3..5].sort_unstable();
        assert_eq!(
            calls,
            [
                "plan_disks",
                "fence",
                "claim",
                "resume",
                "stop_old_qemu",
                "attach",
                "promote_commands",
                "rewire",
                "announce",
                "metadata",
                "apply_profile"
            ]
        );
        assert_eq!(
            step_names(&done.record),
            [
                "plan_disks",
                "fence",
                "claim",
                "stop_old_qemu",
                "resume",
                "attach",
                "promote_commands",
                "rewire",
                "announce",
                "metadata",
                "apply_profile"
            ]
        );
        // Service counts as restored only once the network is up, after the commands.
        let rewire = &done.record.steps[7];
        assert_eq!(rewire.name, "rewire");
        let rewired_at = rewire.start_ms.unwrap() + rewire.ms;
        assert!(done.record.outage_ms >= rewired_at, "{:?}", done.record);
    }

    #[tokio::test]
    async fn a_failed_hand_over_names_its_step_and_gives_the_disk_back() {
        for failing in [
            "stop_old_qemu",
            "resume",
            "attach",
            "promote_commands",
            "rewire",
        ] {
            let r = Recorder::failing(Some(failing));
            let failed = run(&r, stateful_promotion()).await.unwrap_err();
            let calls = r.calls();
            assert_eq!(
                &calls[calls.len() - 2..],
                ["release", "unclaim"],
                "{failing}: {calls:?}"
            );
            assert!(!calls.contains(&"metadata"), "{failing}: {calls:?}");
            assert_eq!(step_names(&failed.record).last(), Some(&failing));
            assert!(!failed.record.ok);
        }
        // Failing before the shadow is touched has nothing to give back.
        for failing in ["plan_disks", "fence", "claim"] {
            let r = Recorder::failing(Some(failing));
            run(&r, stateful_promotion()).await.unwrap_err();
            let calls = r.calls();
            assert!(!calls.contains(&"release"), "{failing}: {calls:?}");
            assert!(!calls.contains(&"unclaim"), "{failing}: {calls:?}");
            assert!(!calls.contains(&"attach"), "{failing}: {calls:?}");
        }
    }

    #[tokio::test]
    async fn data_disks_planned_with_the_shadow_need_no_plan_step() {
        let mut p = stateful_promotion();
        p.shadow.data_disks = Some(vec![DataDisk {
            target: "sdb".into(),
            source: "/d/web-data.raw".into(),
            xml: "<disk/>".into(),
        }]);
        let r = Recorder::failing(None);
        let done = run(&r, p.clone()).await.unwrap();
        assert!(!r.calls().contains(&"plan_disks"));
        assert!(r.calls().contains(&"attach"));
        assert!(done.record.ok);
        // Known to have none: the stateless path, without even reading the definition.
        p.shadow.data_disks = Some(Vec::new());
        let r = Recorder::failing(None);
        run(&r, p).await.unwrap();
        for absent in ["plan_disks", "stop_old_qemu", "attach", "promote_commands"] {
            assert!(!r.calls().contains(&absent), "{:?}", r.calls());
        }
    }

    #[tokio::test]
    async fn a_primary_on_another_host_is_not_fenced_from_here_but_still_claimed_first() {
        for p in [promotion(true), stateful_promotion()] {
            let mut p = p;
            p.old_host = Some(HostId("h1".into()));
            p.shadow.data_disks = Some(Vec::new());
            let r = Recorder::failing(None);
            let done = run(&r, p).await.unwrap();
            let calls = r.calls();
            assert!(!calls.contains(&"fence") && !calls.contains(&"stop_old_qemu"));
            assert_eq!(calls[0], "claim", "{calls:?}");
            assert!(
                done.record.notes[0].contains("host h1"),
                "{:?}",
                done.record
            );
            // A lost claim touches nothing of the shadow.
            let r = Recorder::failing(Some("claim"));
            let mut p = promotion(true);
            p.old_host = Some(HostId("h1".into()));
            run(&r, p).await.unwrap_err();
            assert_eq!(r.calls(), ["claim"]);
        }
    }

    #[tokio::test]
    async fn a_routed_class_moves_its_routes_right_after_the_tap_is_up() {
        let mut p = promotion(true);
        p.network = NetworkMode::Routed;
        p.old_taps = vec![TapBinding {
            mac: "52:54:00:00:00:01".into(),
            tap: "vnet0".into(),
            bridge: None,
            link_up: true,
            routed: RoutedSide {
                routes: vec!["10.77.5.10".parse().unwrap()],
                addresses: vec![("10.77.5.1".parse().unwrap(), 32)],
            },
        }];
        let r = Recorder::failing(None);
        let done = run(&r, p.clone()).await.unwrap();
        let calls = r.calls();
        assert!(position(&calls, "rewire") < position(&calls, "route"));
        assert!(position(&calls, "route") < position(&calls, "announce"));
        assert!(step_names(&done.record).contains(&"route"));
        // The new primary's tap carries the host side it took over, for the next failover.
        assert_eq!(done.taps[0].routed, p.old_taps[0].routed);
        assert_eq!(done.taps[0].tap, "vnet1");

        // The stateful path moves them after the network-up step too, and a failed move fails
        // the promotion with its step named.
        let mut stateful = stateful_promotion();
        stateful.network = NetworkMode::Routed;
        let r = Recorder::failing(Some("route"));
        let failed = run(&r, stateful).await.unwrap_err();
        assert_eq!(step_names(&failed.record).last(), Some(&"route"));
        assert!(!r.calls().contains(&"metadata"));

        // A bridged class has no route step.
        let r = Recorder::failing(None);
        let done = run(&r, promotion(true)).await.unwrap();
        assert!(!r.calls().contains(&"route"));
        assert_eq!(done.taps[0].routed, RoutedSide::default());
    }

    #[tokio::test]
    async fn a_class_without_data_disks_keeps_the_stateless_path() {
        let r = Recorder::failing(None);
        run(&r, promotion(true)).await.unwrap();
        let calls = r.calls();
        for absent in ["plan_disks", "stop_old_qemu", "attach", "promote_commands"] {
            assert!(!calls.contains(&absent), "{calls:?}");
        }
    }

    fn position(calls: &[&str], step: &str) -> usize {
        calls
            .iter()
            .position(|c| *c == step)
            .unwrap_or_else(|| panic!("{step} not called: {calls:?}"))
    }

    #[tokio::test]
    async fn fence_and_claim_come_before_the_shadow_is_touched() {
        let r = Recorder::failing(None);
        let done = run(&r, promotion(true)).await.unwrap();
        let calls = r.calls();
        assert_eq!(&calls[..2], ["fence", "claim"]);
        for later in ["resume", "rewire"] {
            assert!(
                position(&calls, later) > position(&calls, "claim"),
                "{calls:?}"
            );
        }
        assert_eq!(&calls[4..], ["announce", "metadata", "apply_profile"]);
        assert!(
            !calls.contains(&"link_up"),
            "links were already up: {calls:?}"
        );
        let names: Vec<&str> = done.record.steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "fence",
                "claim",
                "resume",
                "rewire",
                "announce",
                "metadata",
                "apply_profile"
            ]
        );
        assert!(done.record.ok);
        assert_eq!(done.taps.len(), 1);
    }

    #[tokio::test]
    async fn an_unconfirmed_fence_touches_nothing_else() {
        let r = Recorder::failing(Some("fence"));
        let failed = run(&r, promotion(true)).await.unwrap_err();
        assert_eq!(r.calls(), ["fence"]);
        assert!(!failed.record.ok);
        assert!(failed.record.error.unwrap().contains("fence failed"));
    }

    #[tokio::test]
    async fn a_lost_claim_leaves_the_shadow_paused() {
        let r = Recorder::failing(Some("claim"));
        run(&r, promotion(true)).await.unwrap_err();
        assert_eq!(r.calls(), ["fence", "claim"]);
    }

    #[tokio::test]
    async fn a_failed_resume_records_no_roles() {
        let r = Recorder::failing(Some("resume"));
        let failed = run(&r, promotion(true)).await.unwrap_err();
        let calls = r.calls();
        assert!(!calls.contains(&"metadata"), "{calls:?}");
        assert!(!calls.contains(&"announce"), "{calls:?}");
        let names: Vec<&str> = failed
            .record
            .steps
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(names, ["fence", "claim", "resume"]);
    }

    #[tokio::test]
    async fn links_down_are_raised_before_service_counts_as_restored_and_profile_comes_last() {
        let r = Recorder::failing(None);
        let mut p = promotion(false);
        p.profile = Some(ProfileApply {
            version: None,
            resources: None,
            config_files: Vec::new(),
            dependencies: Vec::new(),
            agent: Default::default(),
            dependency_timeout: Duration::from_millis(1),
        });
        let done = run(&r, p).await.unwrap();
        let calls = r.calls();
        assert!(position(&calls, "link_up") < position(&calls, "announce"));
        assert_eq!(calls.last(), Some(&"apply_profile"));
        assert_eq!(done.record.notes, ["resized"]);
    }

    #[tokio::test]
    async fn the_live_claim_loses_to_an_earlier_promotion() {
        use crate::cluster::{HostId, LocalCoordinator};
        let coord = LocalCoordinator::new(HostId("h".into()));
        coord.adopt("web", "web").await.unwrap();
        // Another promotion already moved the service to shadow 2.
        coord
            .claim(Claim {
                service: "web".into(),
                domain: "web-shadow-2".into(),
                expected: 1,
            })
            .await
            .unwrap();
        let p = promotion(true);
        let err = claim_owner(&coord, &p).await.unwrap_err();
        assert!(matches!(err, FailoverError::ClaimLost { .. }), "{err:?}");
        assert_eq!(
            coord.owner("web").await.unwrap().unwrap().domain,
            "web-shadow-2"
        );
    }

    #[tokio::test]
    async fn a_failed_promotion_gives_the_claim_back_so_the_retry_can_claim() {
        use crate::cluster::{HostId, LocalCoordinator};
        let coord = LocalCoordinator::new(HostId("h".into()));
        coord.adopt("web", "web").await.unwrap();
        let first = promotion(true);
        claim_owner(&coord, &first).await.unwrap();
        unclaim_owner(&coord, &first).await.unwrap();
        assert_eq!(coord.owner("web").await.unwrap().unwrap().domain, "web");
        let mut retry = promotion(true);
        retry.shadow.name = "web-shadow-2".into();
        claim_owner(&coord, &retry).await.unwrap();
        assert_eq!(
            coord.owner("web").await.unwrap().unwrap().domain,
            "web-shadow-2"
        );
        // Giving back what another promotion owns now changes nothing.
        unclaim_owner(&coord, &first).await.unwrap();
        assert_eq!(
            coord.owner("web").await.unwrap().unwrap().domain,
            "web-shadow-2"
        );
    }

    #[tokio::test]
    async fn the_live_claim_wins_while_the_record_names_the_old_primary() {
        use crate::cluster::{HostId, LocalCoordinator};
        let coord = LocalCoordinator::new(HostId("h".into()));
        coord.adopt("web", "web").await.unwrap();
        claim_owner(&coord, &promotion(true)).await.unwrap();
        let r = coord.owner("web").await.unwrap().unwrap();
        assert_eq!((r.domain.as_str(), r.generation), ("web-shadow-1", 2));
    }

    /// The promotion here of a primary that ran on host h1: h2's claim, and what a failure
    /// after it leaves in the owner record.
    fn remote_promotion() -> Promotion {
        Promotion {
            old_host: Some(crate::cluster::HostId("h1".into())),
            ..promotion(true)
        }
    }

    /// An owner record naming `web` on h1 (generation 1), in h2's coordinator.
    async fn owned_by_h1() -> crate::cluster::LocalCoordinator {
        use crate::cluster::{HostId, LocalCoordinator};
        let coord = LocalCoordinator::new(HostId("h2".into()));
        let first = Claim {
            service: "web".into(),
            domain: "web".into(),
            expected: 0,
        };
        let r = coord.give_back(first, &HostId("h1".into())).await.unwrap();
        assert_eq!((r.host.0.as_str(), r.generation), ("h1", 1));
        coord
    }

    #[tokio::test]
    async fn a_remote_promotion_failing_past_its_claim_gives_the_service_back_to_the_old_host() {
        for failing in ["resume", "rewire", "metadata"] {
            let r = Recorder {
                coord: Some(owned_by_h1().await),
                ..Recorder::failing(Some(failing))
            };
            assert!(run(&r, remote_promotion()).await.is_err(), "{failing}");
            let calls = r.calls();
            assert_eq!(
                calls[0], "claim",
                "{failing}: not fenced from here: {calls:?}"
            );
            assert_eq!(calls.last(), Some(&"unclaim"), "{failing}: {calls:?}");
            let rec = r
                .coord
                .as_ref()
                .unwrap()
                .owner("web")
                .await
                .unwrap()
                .unwrap();
            // Claimed by h2 (generation 2), then given back: the old primary on ITS host.
            assert_eq!(
                (rec.domain.as_str(), rec.host.0.as_str(), rec.generation),
                ("web", "h1", 3),
                "{failing}"
            );
        }
    }

    #[tokio::test]
    async fn a_local_promotion_failing_past_its_claim_gives_the_service_back_on_this_host() {
        use crate::cluster::{HostId, LocalCoordinator};
        let coord = LocalCoordinator::new(HostId("h2".into()));
        coord.adopt("web", "web").await.unwrap();
        let r = Recorder {
            coord: Some(coord),
            ..Recorder::failing(Some("resume"))
        };
        assert!(run(&r, promotion(true)).await.is_err());
        let rec = r
            .coord
            .as_ref()
            .unwrap()
            .owner("web")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (rec.domain.as_str(), rec.host.0.as_str(), rec.generation),
            ("web", "h2", 3)
        );
    }

    #[tokio::test]
    async fn only_this_host_s_own_claim_is_given_back() {
        use crate::cluster::HostId;
        let coord = owned_by_h1().await;
        // h3's promotion owns the service now (a record naming the same shadow name, but on
        // another host, is not this host's claim).
        let h3 = Claim {
            service: "web".into(),
            domain: "web-shadow-1".into(),
            expected: 1,
        };
        coord.give_back(h3, &HostId("h3".into())).await.unwrap();
        unclaim_owner(&coord, &remote_promotion()).await.unwrap();
        let rec = coord.owner("web").await.unwrap().unwrap();
        assert_eq!((rec.host.0.as_str(), rec.generation), ("h3", 2));
        // Nor is it claimed as if it were ours.
        let err = claim_owner(&coord, &remote_promotion()).await.unwrap_err();
        assert!(matches!(err, FailoverError::ClaimLost { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn a_reported_generation_must_still_be_the_owner_s() {
        let coord = owned_by_h1().await;
        let stale = Promotion {
            owner_generation: Some(0),
            ..remote_promotion()
        };
        assert!(claim_owner(&coord, &stale).await.is_err());
        assert_eq!(coord.owner("web").await.unwrap().unwrap().generation, 1);
        let reported = Promotion {
            owner_generation: Some(1),
            ..remote_promotion()
        };
        claim_owner(&coord, &reported).await.unwrap();
        assert_eq!(coord.owner("web").await.unwrap().unwrap().generation, 2);
    }

    #[tokio::test]
    async fn a_claim_made_before_a_restart_is_not_made_again() {
        let coord = owned_by_h1().await;
        let p = remote_promotion();
        claim_owner(&coord, &p).await.unwrap();
        let claimed = coord.owner("web").await.unwrap().unwrap();
        assert_eq!((claimed.host.0.as_str(), claimed.generation), ("h2", 2));
        // The restarted daemon promotes the same shadow again: the record stays as it is.
        claim_owner(&coord, &p).await.unwrap();
        assert_eq!(coord.owner("web").await.unwrap().unwrap(), claimed);
        // Another shadow of this host cannot ride on it.
        let mut other = remote_promotion();
        other.shadow.name = "web-shadow-2".into();
        assert!(claim_owner(&coord, &other).await.is_err());
    }

    fn unreachable(op: &str) -> FailoverError {
        let why: Box<dyn std::error::Error + Send + Sync> = "no leader".into();
        FailoverError::ClaimLost {
            service: "web".into(),
            source: Box::new(CoordError::Unavailable {
                op: op.into(),
                source: std::sync::Arc::from(why),
            }),
        }
    }

    #[tokio::test]
    async fn a_claim_waits_out_an_unreachable_backend_but_not_a_conflict() {
        let calls = std::sync::atomic::AtomicU32::new(0);
        let r = retry_while_unreachable(Duration::from_secs(5), Duration::from_millis(1), || {
            let n = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move {
                if n < 3 {
                    Err(unreachable("get owner"))
                } else {
                    Ok(())
                }
            }
        })
        .await;
        assert!(r.is_ok());
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 4);

        let calls = std::sync::atomic::AtomicU32::new(0);
        let r = retry_while_unreachable(Duration::from_secs(5), Duration::from_millis(1), || {
            calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async {
                Err(FailoverError::ClaimLost {
                    service: "web".into(),
                    source: Box::new(CoordError::NoRecord {
                        service: "web".into(),
                        expected: 3,
                    }),
                })
            }
        })
        .await;
        assert!(matches!(r, Err(FailoverError::ClaimLost { .. })));
        assert_eq!(
            calls.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "not retried"
        );

        // Unreachable for longer than the limit: the last error is returned.
        let r = retry_while_unreachable(
            Duration::from_millis(20),
            Duration::from_millis(5),
            || async { Err(unreachable("txn claim")) },
        )
        .await;
        assert!(matches!(r, Err(FailoverError::ClaimLost { .. })));
    }
}
