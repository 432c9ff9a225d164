//! Creating a shadow: clone the primary's spec, give each writable disk its own overlay, boot
//! it with its NICs held down and off the bridge, wait for its guest agent, pause it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::domain_xml::{
    shadow_spec, standby_boot_spec, DomainXml, InterfaceKind, InterfaceSpec, MemberState, Role,
    ShadowPlan, UnderstudyMeta, META_NS, META_PREFIX,
};
use crate::libvirt::{Hypervisor, LibvirtAgent, LibvirtError};
use crate::monitor::agent::{
    AgentError, AgentLimits, AgentOptions, AgentTransportError, Command as AgentCommand,
    ExecOutput, GuestAgent,
};
use crate::net::Netlink;

use super::plan::{
    clone_plan, data_disks, overlay_path, plan_disks, DataDisk, DiskHandling, DiskLayout,
    DiskPolicy,
};
use super::record::Tier;
use super::standby::{self, StandbyMemory};
use super::{tpm, FailoverError, RoutedSide, Shadow, ShadowState, TapBinding};

/// Everything needed to create one shadow.
#[derive(Debug, Clone)]
pub struct ShadowRequest {
    /// The service it stands in for.
    pub service: String,
    /// The service's class.
    pub class: String,
    /// The domain whose spec is cloned (the active primary).
    pub primary: String,
    /// The primary's definition when it runs on another host (its published spec); `None`:
    /// read from this host's libvirt.
    pub primary_xml: Option<String>,
    /// The new shadow's domain name.
    pub name: String,
    /// Its generation number (the `n` in `<service>-shadow-<n>`).
    pub generation: u64,
    /// Where overlays and consoles go.
    pub state_dir: PathBuf,
    /// How long the shadow may take to boot to a working guest agent.
    pub boot_timeout: Duration,
    /// Per-ping agent timeout while waiting.
    pub agent_timeout: Duration,
    /// Bound on agent replies.
    pub agent_max_reply: usize,
    /// Commands run in the shadow (guest-exec, argument vectors) before it is paused.
    pub warmup: Vec<Vec<String>>,
    /// Disk roles and the golden image (whose overlay the first system image disk boots
    /// when `shadow reinit --golden` chose it).
    pub disks: DiskPolicy,
    /// How its memory is made smaller before it stands by.
    pub standby: StandbyMemory,
    /// How it stands by.
    pub tier: Tier,
    /// A pooled shadow: `primary` is the class's golden template, and the shadow stands by
    /// with the template's NICs on placeholder MACs (a promotion gives them the failed
    /// primary's MACs, and plugs any NIC of the primary that none of them matches).
    pub pooled: bool,
}

/// The shadow name for generation `n` of `service`.
pub fn shadow_name(service: &str, generation: u64) -> String {
    format!("{service}-shadow-{generation}")
}

/// Parses the generation out of a shadow name of `service`.
pub fn shadow_generation(service: &str, name: &str) -> Option<u64> {
    name.strip_prefix(service)?
        .strip_prefix("-shadow-")?
        .parse()
        .ok()
}

/// Metadata for `domain` as the primary of `service`, in `state`; its generation is read from
/// its name (0 for the domain first protected).
pub fn primary_meta(
    service: &str,
    class: &str,
    domain: &str,
    state: MemberState,
) -> UnderstudyMeta {
    let generation = shadow_generation(service, domain).unwrap_or(0);
    member_meta(service, class, Role::Primary, generation, state)
}

/// Metadata for a member of a service.
pub fn member_meta(
    service: &str,
    class: &str,
    role: Role,
    generation: u64,
    state: MemberState,
) -> UnderstudyMeta {
    UnderstudyMeta {
        service: service.to_string(),
        class: class.to_string(),
        role,
        generation,
        state,
        journal: None,
    }
}

/// Writes `meta` into a domain's libvirt metadata (live and persistent).
pub fn write_meta(
    hv: &Hypervisor,
    domain: &str,
    meta: &UnderstudyMeta,
) -> Result<(), LibvirtError> {
    hv.set_metadata(domain, &meta.to_libvirt_xml(), META_PREFIX, META_NS)
}

/// The plan for the shadow `req` asks for, from the primary's parsed spec: each disk planned
/// under the request's roles ([`plan_disks`]), an overlay under `<state_dir>/disks` for every
/// system disk that gets one, consoles under `<state_dir>/consoles`, headroom above the
/// primary's sizes. Pure: nothing on disk is touched, so a spec can be planned and cloned as a
/// dry run.
pub fn shadow_plan(
    primary: &DomainXml,
    req: &ShadowRequest,
    uuid: &str,
) -> Result<(ShadowPlan, DiskLayout), FailoverError> {
    let layout = plan_disks(primary, &req.disks).map_err(|source| FailoverError::Plan {
        domain: req.primary.clone(),
        source,
    })?;
    let meta = member_meta(
        &req.service,
        &req.class,
        Role::Shadow,
        req.generation,
        MemberState::Booting,
    );
    let plan = clone_plan(primary, &layout, &req.state_dir, &req.name, uuid, meta);
    Ok((plan, layout))
}

/// Builds the shadow's XML from the primary's persistent definition. Creates the disk
/// overlays as a side effect, and logs what happens to each disk (and so whether a failover
/// keeps its data). Pure enough to be called from a blocking thread. Returns the spec and the
/// data disks it was made without.
pub fn build_shadow_xml(
    hv: &Hypervisor,
    req: &ShadowRequest,
) -> Result<(String, Vec<DataDisk>), FailoverError> {
    let xml = match &req.primary_xml {
        Some(xml) => xml.clone(),
        None => hv
            .xml(&req.primary, true)
            .map_err(|source| FailoverError::Libvirt {
                step: "read primary XML",
                source,
            })?,
    };
    let primary = DomainXml::parse(&xml).map_err(|source| FailoverError::Xml {
        domain: req.primary.clone(),
        source,
    })?;
    let (plan, layout) = shadow_plan(&primary, req, &new_uuid())?;
    let disk_dir = req.state_dir.join("disks");
    for dir in [&disk_dir, &plan.console_dir] {
        std::fs::create_dir_all(dir).map_err(|source| FailoverError::Spawn {
            program: "mkdir",
            source,
        })?;
    }
    // Validate the clone before touching any disk, so a refused spec leaves nothing behind.
    let mut shadow = shadow_spec(&primary, &plan).map_err(|source| FailoverError::Clone {
        domain: req.primary.clone(),
        source,
    })?;
    if req.pooled {
        let name = req.name.clone();
        let n = shadow.set_interface_macs(|i| super::identity::placeholder_mac(&name, i));
        tracing::info!(pool = %req.service, shadow = %req.name, template = %req.primary, nics = n, "pooled shadow: the template's NICs on placeholder MACs, off the bridge until a promotion gives them a primary's MAC");
    }
    if req.standby.ksm && shadow.allow_page_sharing() {
        tracing::info!(service = %req.service, shadow = %req.name, "ksm: the primary's <nosharepages/> left out of the shadow");
    }
    if req.standby.free_page_reporting && !shadow.enable_free_page_reporting() {
        tracing::warn!(service = %req.service, shadow = %req.name, "free_page_reporting: the primary has no virtio <memballoon>; not enabled");
    }
    for disk in &layout.disks {
        tracing::info!(
            service = %req.service,
            shadow = %req.name,
            disk = %disk.target,
            role = disk.role.map_or("-", |r| r.as_str()),
            handling = ?disk.handling,
            keeps_data = ?disk.keeps_data,
            "{disk}"
        );
    }
    if tpm::has_emulated_tpm(&primary) {
        give_tpm_state(&primary, req, &plan.uuid, &disk_dir)?;
    }
    for disk in &layout.disks {
        let Some(base) = &disk.overlay_base else {
            continue;
        };
        let base = match disk.handling {
            DiskHandling::GoldenOverlay => base.clone(),
            _ => backing_for_shadows(base, &disk_dir, &req.service, &disk.target)?,
        };
        create_overlay(&base, &overlay_path(&disk_dir, &req.name, &disk.target))?;
    }
    let data = data_disks(&primary, &req.disks).map_err(|source| FailoverError::Plan {
        domain: req.primary.clone(),
        source,
    })?;
    Ok((shadow.to_xml(), data))
}

/// Copies the primary's emulated TPM state to the shadow's UUID before the shadow first
/// starts, and records which state it got (see [`tpm`]).
fn give_tpm_state(
    primary: &DomainXml,
    req: &ShadowRequest,
    shadow_uuid: &str,
    disk_dir: &Path,
) -> Result<(), FailoverError> {
    let tpm_err = |source| FailoverError::Tpm {
        domain: req.primary.clone(),
        source,
    };
    let root = Path::new(tpm::SWTPM_STATE_DIR);
    let given = match primary.uuid() {
        Some(uuid) => tpm::copy_state(root, &uuid, shadow_uuid).map_err(tpm_err)?,
        None => None,
    };
    tracing::info!(
        service = %req.service,
        shadow = %req.name,
        copied = given.is_some(),
        "emulated TPM: the shadow gets the primary's state"
    );
    tpm::record(disk_dir, &req.name, given.as_deref()).map_err(tpm_err)
}

/// Creates, boots, isolates and pauses one shadow.
pub async fn provision(
    hv: &Hypervisor,
    net: &Netlink,
    req: ShadowRequest,
) -> Result<Shadow, FailoverError> {
    let started = Instant::now();
    if req.tier == Tier::Cold {
        return define_cold(hv, req).await;
    }
    let r = req.clone();
    let (name, data_disks) = hv
        .blocking("define shadow", move |hv| {
            let (xml, data) = build_shadow_xml(hv, &r)?;
            ensure_room(&r.name, &xml)?;
            // Boot from the off-bridge variant, then make the spec the persistent definition
            // (see `standby_boot_spec`): the tap never joins a bridge before promotion.
            let boot_xml = DomainXml::parse(&xml)
                .map(|spec| standby_boot_spec(&spec).to_xml())
                .map_err(|source| FailoverError::Xml {
                    domain: r.name.clone(),
                    source,
                })?;
            let name = hv
                .define(&boot_xml)
                .map_err(|source| FailoverError::Libvirt {
                    step: "define shadow",
                    source,
                })?;
            hv.start(&name, false)
                .map_err(|source| FailoverError::Libvirt {
                    step: "start shadow",
                    source,
                })?;
            hv.define(&xml).map_err(|source| FailoverError::Libvirt {
                step: "define shadow spec",
                source,
            })?;
            Ok::<_, FailoverError>((name, data))
        })
        .await
        .map_err(|source| FailoverError::Libvirt {
            step: "define shadow",
            source,
        })??;
    // The NICs start with link down (no frames in or out) and on no bridge; also set the taps
    // down, and off any bridge in case the shadow was made another way.
    let taps = live_taps(hv, &name).await?;
    for b in &taps {
        isolate_tap(net, &b.tap).await?;
    }
    wait_for_agent(
        hv,
        &name,
        req.boot_timeout,
        req.agent_timeout,
        req.agent_max_reply,
    )
    .await?;
    // Raise the NICs' links now, while the guest runs with its taps down and off the bridge
    // (whatever it sends goes nowhere), so that it has handled the link-up before it is
    // paused. A guest that first sees its link come up when it is resumed at promotion handles
    // that event on a workqueue, after the softirq of the first client SYNs: its first ARP
    // request (for the client, needed by its first SYN-ACK) leaves while its carrier is still
    // off, is dropped, and every client waits for the ARP retransmission, a second later.
    let macs: Vec<String> = taps.iter().map(|b| b.mac.clone()).collect();
    {
        let (n, macs) = (name.clone(), macs.clone());
        hv.run("raise shadow links", move |hv| raise_links(hv, &n, &macs))
            .await
            .map_err(|source| FailoverError::Libvirt {
                step: "raise shadow links",
                source,
            })?;
    }
    for argv in &req.warmup {
        // A warm-up that fails leaves a colder shadow, not a broken one.
        match guest_exec(
            hv,
            &name,
            argv,
            WARMUP_TIMEOUT,
            WARMUP_POLL,
            req.agent_max_reply,
        )
        .await
        {
            Ok(out) => {
                tracing::debug!(shadow = %name, ?argv, status = ?out.status, "warm-up command done")
            }
            Err(e) => {
                tracing::warn!(shadow = %name, ?argv, error = %crate::error::report(&e), "warm-up command failed")
            }
        }
    }
    if req.standby.reclaim {
        let (n, max_reply) = (name.clone(), req.agent_max_reply);
        let done = hv
            .blocking("reclaim shadow memory", move |hv| {
                let agent = GuestAgent::new(
                    LibvirtAgent {
                        hv: hv.clone(),
                        domain: n.clone(),
                        max_reply,
                    },
                    AgentOptions {
                        limits: AgentLimits {
                            max_reply_bytes: max_reply,
                            ..AgentLimits::default()
                        },
                        command_timeout: RECLAIM_CALL_TIMEOUT,
                        ..AgentOptions::default()
                    },
                );
                standby::reclaim(&agent, &n)
            })
            .await;
        match done {
            Ok(errors) if errors.is_empty() => {
                tracing::info!(service = %req.service, shadow = %name, "guest page cache dropped and free memory compacted before standing by")
            }
            // A guest that cannot reclaim stands by with what it holds.
            Ok(errors) => {
                for e in errors {
                    tracing::warn!(service = %req.service, shadow = %name, error = %crate::error::report(&e), "standby reclaim")
                }
            }
            Err(e) => {
                tracing::warn!(service = %req.service, shadow = %name, error = %crate::error::report(&e), "standby reclaim")
            }
        }
    }
    // The pages the warm-up and the reclaim freed reach the host only while the guest runs (it
    // reports free blocks of 2 MiB and more a couple of seconds after they are freed), and
    // before the balloon inflates: it takes free pages one at a time, splitting those blocks,
    // and a touched page left free in a split block is never reported (measured by
    // `make bench-cost`: 50 MiB of a 320 MiB warm-up stayed resident when the balloon came
    // first).
    if req.standby.free_page_reporting {
        settle_reported(&req.service, &name, "after the warm-up").await;
    }
    if req.standby.shrink {
        let (n, idle) = (name.clone(), req.standby.idle_use_kib);
        match hv
            .blocking("shrink shadow", move |hv| standby::shrink(hv, &n, idle))
            .await
        {
            Ok(Ok(s)) => tracing::info!(
                service = %req.service, shadow = %name, from_kib = s.from_kib, target_kib = s.target_kib,
                reached_kib = s.reached_kib, use_kib = s.use_kib, use_source = s.use_source,
                "shadow ballooned down before standing by"
            ),
            // A shadow that could not be shrunk stands by at full size.
            Ok(Err(e)) => {
                tracing::warn!(service = %req.service, shadow = %name, error = %crate::error::report(&e), "shadow not shrunk")
            }
            Err(e) => {
                tracing::warn!(service = %req.service, shadow = %name, error = %crate::error::report(&e), "shadow not shrunk")
            }
        }
    }
    // What the balloon took, and any page freed meanwhile, reported too before the pause.
    if req.standby.free_page_reporting && req.standby.shrink {
        settle_reported(&req.service, &name, "after the shrink").await;
    }
    let n = name.clone();
    let meta = member_meta(
        &req.service,
        &req.class,
        Role::Shadow,
        req.generation,
        match req.tier {
            Tier::Saved => MemberState::Saved,
            _ => MemberState::Paused,
        },
    );
    // The guest has answered the agent since its link came up (after the warm-up, or now):
    // it has run its link-up handling.
    wait_for_agent(
        hv,
        &name,
        req.agent_timeout * 5,
        req.agent_timeout,
        req.agent_max_reply,
    )
    .await?;
    let tier = req.tier;
    hv.run("pause shadow", move |hv| {
        hv.suspend(&n)?;
        write_meta(hv, &n, &meta)?;
        if tier == Tier::Saved {
            // The image keeps the paused guest, its off-bridge taps and raised links: a
            // restore brings back exactly this standby, without its memory held meanwhile.
            hv.managed_save(&n)?;
        }
        Ok(())
    })
    .await
    .map_err(|source| FailoverError::Libvirt {
        step: "pause shadow",
        source,
    })?;
    let taps = taps
        .into_iter()
        .map(|b| TapBinding { link_up: true, ..b })
        .collect();
    tracing::info!(service = %req.service, shadow = %name, tier = req.tier.as_str(), ms = started.elapsed().as_millis() as u64, "shadow ready");
    Ok(Shadow {
        name,
        state: ShadowState::Standby(req.tier),
        taps,
        data_disks: Some(data_disks),
    })
}

/// A `cold` shadow: defined (its overlays made) but never started, links up in its
/// definition, so the promotion that boots it needs nothing else before it serves. Its taps
/// exist only once it runs.
async fn define_cold(hv: &Hypervisor, req: ShadowRequest) -> Result<Shadow, FailoverError> {
    let r = req.clone();
    let data_disks = hv
        .blocking("define cold shadow", move |hv| {
            let (xml, data) = build_shadow_xml(hv, &r)?;
            let mut spec = DomainXml::parse(&xml).map_err(|source| FailoverError::Xml {
                domain: r.name.clone(),
                source,
            })?;
            spec.set_interfaces_link(true);
            let lv = |step| move |source| FailoverError::Libvirt { step, source };
            hv.define(&spec.to_xml()).map_err(lv("define shadow"))?;
            let meta = member_meta(
                &r.service,
                &r.class,
                Role::Shadow,
                r.generation,
                MemberState::Cold,
            );
            write_meta(hv, &r.name, &meta).map_err(lv("write shadow metadata"))?;
            Ok::<_, FailoverError>(data)
        })
        .await
        .map_err(|source| FailoverError::Libvirt {
            step: "define cold shadow",
            source,
        })??;
    tracing::info!(service = %req.service, shadow = %req.name, tier = "cold", "shadow defined and ready");
    Ok(Shadow {
        name: req.name,
        state: ShadowState::Standby(Tier::Cold),
        taps: Vec::new(),
        data_disks: Some(data_disks),
    })
}

/// Sets the link of each NIC (by MAC) up, live and in the persistent definition. Each is
/// updated from its own XML: a shadow's live NICs are `ethernet` taps while its definition
/// names the bridge (see `standby_boot_spec`), and libvirt refuses a type change.
pub fn raise_links(hv: &Hypervisor, domain: &str, macs: &[String]) -> Result<(), LibvirtError> {
    let mut views = vec![false];
    if hv.is_persistent(domain)? {
        views.push(true);
    }
    for config in views {
        let xml = hv.xml(domain, config)?;
        let Ok(parsed) = DomainXml::parse(&xml) else {
            continue;
        };
        for mac in macs {
            if let Some(iface) = parsed.interface_xml_with_link(mac, true) {
                hv.update_device(domain, &iface, config)?;
            }
        }
    }
    Ok(())
}

/// Waits until the running shadow's freed pages are reported to the host
/// ([`standby::settle_reported`]) and logs what it gave back.
async fn settle_reported(service: &str, shadow: &str, when: &'static str) {
    let n = shadow.to_string();
    if let Ok(Some((from, to))) =
        tokio::task::spawn_blocking(move || standby::settle_reported(&n)).await
    {
        tracing::info!(%service, %shadow, rss_from_kib = from / 1024, rss_to_kib = to / 1024, when, "freed pages reported to the host before standing by");
    }
}

/// Longest a single warm-up command may run.
const WARMUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a warm-up command is asked whether it has exited.
const WARMUP_POLL: Duration = Duration::from_millis(100);

/// Runs `argv` in the guest through guest-exec (an argument vector, never a shell string), its
/// output captured, and polls `guest-exec-status` every `poll` until it exits or `limit`
/// passes. The guest is untrusted: this goes through the typed agent client, so every reply is
/// bounded by `max_reply` and validated by the agent parsers, and at most
/// [`EXEC_MAX_OUTPUT`] bytes of each stream are kept.
pub async fn guest_exec(
    hv: &Hypervisor,
    domain: &str,
    argv: &[String],
    limit: Duration,
    poll: Duration,
    max_reply: usize,
) -> Result<ExecOutput, AgentError> {
    let (domain, argv) = (domain.to_string(), argv.to_vec());
    hv.blocking("guest-exec", move |hv| {
        let agent = GuestAgent::new(
            LibvirtAgent {
                hv: hv.clone(),
                domain,
                max_reply,
            },
            AgentOptions {
                limits: AgentLimits {
                    max_reply_bytes: max_reply,
                    ..AgentLimits::default()
                },
                command_timeout: EXEC_CALL_TIMEOUT,
                exec_poll_interval: poll,
                ..AgentOptions::default()
            },
        );
        agent.exec(&argv, EXEC_MAX_OUTPUT, limit)
    })
    .await
    .map_err(|e| AgentError::Transport {
        command: AgentCommand::Exec,
        source: AgentTransportError::Other(crate::error::report(&e)),
    })?
}

/// Bytes kept of each output stream of a guest command.
pub const EXEC_MAX_OUTPUT: usize = 4096;
/// Longest one guest-exec or guest-exec-status call may take.
const EXEC_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest one reclaim write may take: compacting a large guest's memory takes seconds.
const RECLAIM_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The last `max` bytes of `s` (on a character boundary), trimmed.
pub fn clip_tail(s: &str, max: usize) -> String {
    let s = s.trim();
    let mut start = s.len().saturating_sub(max);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    s[start..].to_string()
}

/// Takes a tap off its bridge and sets it down.
pub async fn isolate_tap(net: &Netlink, tap: &str) -> Result<(), FailoverError> {
    net.set_nomaster(tap)
        .await
        .map_err(|source| FailoverError::Net {
            step: "detach shadow tap",
            source,
        })?;
    net.set_down(tap)
        .await
        .map_err(|source| FailoverError::Net {
            step: "down shadow tap",
            source,
        })
}

/// The taps of a running domain with their MACs and the bridges they belong on. Taps and link
/// states come from the live XML; the bridge from the live XML too when libvirt put the tap on
/// one, else (a shadow booted off-bridge, see `standby_boot_spec`) from the persistent
/// definition: its `<source bridge>`, or its `<source network>`'s bridge.
pub async fn live_taps(hv: &Hypervisor, domain: &str) -> Result<Vec<TapBinding>, FailoverError> {
    let d = domain.to_string();
    let xmls = hv
        .run("read live XML", move |hv| {
            let live = hv.xml(&d, false)?;
            let spec = hv.xml(&d, true)?;
            Ok((live, spec))
        })
        .await
        .map_err(|source| FailoverError::Libvirt {
            step: "read live XML",
            source,
        })?;
    let parse = |xml: &str| {
        DomainXml::parse(xml).map_err(|source| FailoverError::Xml {
            domain: domain.to_string(),
            source,
        })
    };
    let (live, spec) = (parse(&xmls.0)?, parse(&xmls.1)?);
    let mut out = Vec::new();
    for (mut binding, network) in tap_bindings(&live, &spec) {
        if let Some(network) = network {
            let bridge = hv
                .run("read network bridge", move |hv| hv.network_bridge(&network))
                .await
                .map_err(|source| FailoverError::Libvirt {
                    step: "read network bridge",
                    source,
                })?;
            binding.bridge = Some(bridge);
        }
        out.push(binding);
    }
    Ok(out)
}

/// The bindings of a running domain's taps, from its live XML and its persistent definition
/// (see [`live_taps`]), each with the libvirt network whose bridge is still to be looked up when
/// neither XML names the bridge itself.
pub fn tap_bindings(live: &DomainXml, spec: &DomainXml) -> Vec<(TapBinding, Option<String>)> {
    let (live_ifaces, spec_ifaces) = (live.interfaces(), spec.interfaces());
    let by_mac = |ifaces: &[InterfaceSpec], mac: &str| {
        ifaces
            .iter()
            .find(|i| {
                i.mac
                    .as_deref()
                    .is_some_and(|m| m.eq_ignore_ascii_case(mac))
            })
            .cloned()
    };
    live.live_interface_taps()
        .into_iter()
        .map(|(mac, tap)| {
            let live_iface = by_mac(&live_ifaces, &mac);
            let mut bridge = live_iface.as_ref().and_then(|i| i.bridge.clone());
            let mut network = None;
            if bridge.is_none() {
                match by_mac(&spec_ifaces, &mac) {
                    Some(i) if i.kind == InterfaceKind::Bridge => bridge = i.bridge,
                    Some(i) if i.kind == InterfaceKind::Network => network = i.network,
                    _ => {}
                }
            }
            let binding = TapBinding {
                bridge,
                link_up: live_iface.is_some_and(|i| i.link_up),
                routed: RoutedSide::default(),
                mac,
                tap,
            };
            (binding, network)
        })
        .collect()
}

/// Reads what on the host points traffic at each routed tap (see [`RoutedSide`]): the `/32`
/// host routes through it and its IPv4 addresses. A tap without any host route is named in a
/// warning, since promotion would then have nothing to move.
pub async fn read_routed_sides(net: &Netlink, domain: &str, taps: &mut [TapBinding]) {
    for b in taps.iter_mut() {
        let routes = net.host_routes_via(&b.tap).await;
        let addresses = net.ipv4_addresses(&b.tap).await;
        match (routes, addresses) {
            (Ok(routes), Ok(addresses)) => {
                if routes.is_empty() {
                    tracing::warn!(domain, tap = %b.tap, "routed class, but no /32 host route goes through this tap: a promotion would have no route to move to its shadow");
                }
                b.routed = RoutedSide { routes, addresses };
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(domain, tap = %b.tap, error = %crate::error::report(&e), "cannot read the routed tap's host routes and addresses; keeping what was known")
            }
        }
    }
}

/// Pings the guest agent until it answers or `limit` passes.
pub async fn wait_for_agent(
    hv: &Hypervisor,
    domain: &str,
    limit: Duration,
    per_try: Duration,
    max_reply: usize,
) -> Result<(), FailoverError> {
    let deadline = Instant::now() + limit;
    loop {
        let d = domain.to_string();
        let answered = hv
            .run("guest-ping", move |hv| {
                hv.agent_command(&d, r#"{"execute":"guest-ping"}"#, per_try, max_reply)
            })
            .await
            .is_ok();
        if answered {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(FailoverError::Timeout {
                shadow: domain.to_string(),
                what: "answer guest-ping",
                timeout: limit,
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The image a shadow's overlay should sit on. A primary image that is itself an overlay has
/// a stable backing file, which is what shadows share. A standalone image is written live by
/// the primary and must never back another image, so it is copied once per service into a
/// base (crash-consistent, like a power cut) that the service's shadows then share.
fn backing_for_shadows(
    image: &Path,
    disk_dir: &Path,
    service: &str,
    target: &str,
) -> Result<PathBuf, FailoverError> {
    let info = qemu_img_info(image)?;
    if let Some(backing) = info
        .get("full-backing-filename")
        .or_else(|| info.get("backing-filename"))
        .and_then(|b| b.as_str())
    {
        return Ok(PathBuf::from(backing));
    }
    let base = disk_dir.join(format!("{service}-{target}-base.qcow2"));
    if !base.exists() {
        let tmp = base.with_extension("qcow2.partial");
        run_qemu_img(
            "convert",
            image,
            &[
                "convert",
                "-U",
                "-O",
                "qcow2",
                &image.to_string_lossy(),
                &tmp.to_string_lossy(),
            ],
        )?;
        std::fs::rename(&tmp, &base).map_err(|source| FailoverError::Spawn {
            program: "rename",
            source,
        })?;
    }
    Ok(base)
}

fn qemu_img_info(image: &Path) -> Result<serde_json::Value, FailoverError> {
    let out = run_qemu_img(
        "info",
        image,
        &["info", "-U", "--output=json", &image.to_string_lossy()],
    )?;
    serde_json::from_slice(&out).map_err(|e| FailoverError::QemuImg {
        action: "info",
        path: image.display().to_string(),
        stderr: format!("unparsable JSON: {e}"),
    })
}

fn create_overlay(base: &Path, overlay: &Path) -> Result<(), FailoverError> {
    let fmt = qemu_img_info(base)?
        .get("format")
        .and_then(|f| f.as_str())
        .unwrap_or("qcow2")
        .to_string();
    if overlay.exists() {
        // A leftover from an interrupted provisioning of the same shadow name: start clean.
        std::fs::remove_file(overlay).map_err(|source| FailoverError::Spawn {
            program: "rm",
            source,
        })?;
    }
    run_qemu_img(
        "create",
        overlay,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            &fmt,
            "-b",
            &base.to_string_lossy(),
            &overlay.to_string_lossy(),
        ],
    )?;
    Ok(())
}

fn run_qemu_img(
    action: &'static str,
    path: &Path,
    args: &[&str],
) -> Result<Vec<u8>, FailoverError> {
    let out = std::process::Command::new("qemu-img")
        .args(args)
        .output()
        .map_err(|source| FailoverError::Spawn {
            program: "qemu-img",
            source,
        })?;
    if !out.status.success() {
        let mut stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        stderr.truncate(512);
        return Err(FailoverError::QemuImg {
            action,
            path: path.display().to_string(),
            stderr,
        });
    }
    Ok(out.stdout)
}

/// Refuses a shadow the host cannot hold: a paused shadow keeps its memory.
fn ensure_room(name: &str, xml: &str) -> Result<(), FailoverError> {
    let need_kib = DomainXml::parse(xml)
        .map_err(|source| FailoverError::Xml {
            domain: name.to_string(),
            source,
        })?
        .memory_kib()
        .current_kib;
    let Some(host) = crate::cluster::HostCapacity::read() else {
        tracing::warn!(
            shadow = name,
            "host memory unknown; shadow placed without a check"
        );
        return Ok(());
    };
    if host.fits(need_kib) {
        Ok(())
    } else {
        Err(FailoverError::HostFull {
            shadow: name.to_string(),
            need_kib,
            available_kib: host.mem_available_kib,
        })
    }
}

/// A random (version 4) UUID for a new domain.
pub fn new_uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_names_round_trip_and_reject_others() {
        assert_eq!(shadow_name("web1", 3), "web1-shadow-3");
        assert_eq!(shadow_generation("web1", "web1-shadow-3"), Some(3));
        assert_eq!(shadow_generation("web1", "web10-shadow-3"), None);
        assert_eq!(shadow_generation("web1", "web1-shadow-x"), None);
    }

    #[test]
    fn bindings_take_the_bridge_from_the_definition_when_the_live_nic_has_none() {
        let dom = |ifaces: &str| {
            DomainXml::parse(&format!(
                "<domain type='qemu'><name>s</name><devices>{ifaces}</devices></domain>"
            ))
            .unwrap()
        };
        // A shadow booted off-bridge: ethernet taps live, bridge and network in the definition.
        let live = dom(
            "<interface type='ethernet'><mac address='52:54:00:00:00:01'/><target dev='vnet1' managed='yes'/><link state='up'/></interface>\
             <interface type='ethernet'><mac address='52:54:00:00:00:02'/><target dev='vnet2' managed='yes'/><link state='down'/></interface>\
             <interface type='ethernet'><mac address='52:54:00:00:00:03'/><target dev='vnet3' managed='yes'/></interface>",
        );
        let spec = dom(
            "<interface type='bridge'><mac address='52:54:00:00:00:01'/><source bridge='br0'/></interface>\
             <interface type='network'><mac address='52:54:00:00:00:02'/><source network='backend'/></interface>\
             <interface type='user'><mac address='52:54:00:00:00:03'/></interface>",
        );
        let b = tap_bindings(&live, &spec);
        let got: Vec<_> = b
            .iter()
            .map(|(t, n)| (t.tap.as_str(), t.bridge.as_deref(), t.link_up, n.as_deref()))
            .collect();
        assert_eq!(
            got,
            [
                ("vnet1", Some("br0"), true, None),
                ("vnet2", None, false, Some("backend")),
                ("vnet3", None, true, None),
            ]
        );
        // A primary on its bridge: the live XML decides, and a network's live XML names its
        // bridge, so nothing is looked up.
        let live = dom(
            "<interface type='network'><mac address='52:54:00:00:00:02'/><source network='backend' bridge='virbr1'/><target dev='vnet7'/></interface>",
        );
        let b = tap_bindings(&live, &spec);
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].0.bridge.as_deref(), Some("virbr1"));
        assert_eq!(b[0].1, None);
    }

    #[test]
    fn uuid_has_canonical_shape() {
        let u = new_uuid();
        assert_eq!(u.len(), 36);
        assert_eq!(u.matches('-').count(), 4);
    }

    #[test]
    fn overlay_sits_on_the_backing_of_an_overlay_primary() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        let primary = dir.path().join("primary.qcow2");
        run_qemu_img(
            "create",
            &base,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                &base.to_string_lossy(),
                "16M",
            ],
        )
        .unwrap();
        create_overlay(&base, &primary).unwrap();
        let b = backing_for_shadows(&primary, dir.path(), "svc", "vda").unwrap();
        assert_eq!(b, base);
        // A standalone primary gets a copied base instead of being used as a backing file.
        let b2 = backing_for_shadows(&base, dir.path(), "svc", "vdb").unwrap();
        assert_eq!(b2, dir.path().join("svc-vdb-base.qcow2"));
        assert!(b2.exists());
        let overlay = dir.path().join("shadow.qcow2");
        create_overlay(&b2, &overlay).unwrap();
        let info = qemu_img_info(&overlay).unwrap();
        assert_eq!(
            info["backing-filename"].as_str().unwrap(),
            b2.to_string_lossy()
        );
    }
}
