//! Isolated runs: a clone of a service's primary resumed off the service network, on a bridge
//! of its own that carries a host-side copy of the service bridge's addresses, with throwaway
//! copies of the primary's data disks instead of the live ones.
//!
//! Its definition keeps the standby boot variant's plain `ethernet` taps (never the service
//! bridge, even if it is restarted), and its metadata role is `isolated`, so the daemon never
//! counts it as a member. [`check`] verifies, rather than assumes, that it stays isolated: its
//! taps' master is its own bridge, the service bridge has not learned its MAC behind any of
//! them, and its QEMU holds none of the live data disks open.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::CanaryError;
use crate::domain_xml::{standby_boot_spec, DiskKind, DomainXml, MemberState, Role};
use crate::failover::plan::{DataDisk, DiskPolicy};
use crate::failover::record::Tier;
use crate::failover::shadow::{
    build_shadow_xml, guest_exec, member_meta, wait_for_agent, ShadowRequest,
};
use crate::failover::standby::StandbyMemory;
use crate::libvirt::Hypervisor;
use crate::net::Netlink;

/// Everything needed to start one isolated clone.
#[derive(Debug, Clone)]
pub struct IsolatedRequest {
    /// The service.
    pub service: String,
    /// Its class.
    pub class: String,
    /// The active primary cloned.
    pub primary: String,
    /// The clone's domain name.
    pub name: String,
    /// Its own bridge (at most 15 bytes).
    pub bridge: String,
    /// The daemon's state directory (overlays, consoles, data copies).
    pub state_dir: PathBuf,
    /// Longest boot to a working guest agent.
    pub boot_timeout: Duration,
    /// Per-call agent timeout.
    pub agent_timeout: Duration,
    /// Bound on agent replies.
    pub agent_max_reply: usize,
    /// The class's disk roles.
    pub disks: DiskPolicy,
    /// The class's promote commands (mount the data copy, start the service).
    pub promote_commands: Vec<Vec<String>>,
    /// Longest one of them may run.
    pub promote_timeout: Duration,
}

/// A running isolated clone, as recorded (it survives in the canary's state file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IsolatedDomain {
    /// Domain name.
    pub name: String,
    /// Its own bridge.
    pub bridge: String,
    /// Its taps.
    pub taps: Vec<String>,
    /// Its NICs' MACs (the primary's).
    pub macs: Vec<String>,
    /// The bridges the primary's NICs are on.
    pub service_bridges: Vec<String>,
    /// The data disk copies it runs on.
    pub copies: Vec<PathBuf>,
    /// The live data disks' sources it must never open.
    pub live_sources: Vec<String>,
    /// Its QEMU process.
    pub qemu_pid: Option<i32>,
}

impl IsolatedDomain {
    /// `name` on `bridge`, before anything of it is known (no taps, copies or process yet).
    pub fn new(name: String, bridge: String) -> Self {
        IsolatedDomain {
            name,
            bridge,
            taps: Vec::new(),
            macs: Vec::new(),
            service_bridges: Vec::new(),
            copies: Vec::new(),
            live_sources: Vec::new(),
            qemu_pid: None,
        }
    }
}

/// Where data copies go.
pub(super) fn copy_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("isolated")
}

/// A bridge name for `service` and a role letter (`c` canary, `b` baseline, `v` verify):
/// `usi` + 8 hex digits of a hash of the service + the letter, 12 bytes.
pub fn bridge_name(service: &str, role: char) -> String {
    // FNV-1a: stable across runs and versions, unlike std's hasher.
    let mut h: u32 = 0x811c_9dc5;
    for b in service.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("usi{h:08x}{role}")
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// The `<disk>` that attaches `copy` (format `format`) where `original` (a `<disk>` element
/// from libvirt) was: its `<target>` kept, the rest replaced.
fn copy_disk_xml(original: &str, copy: &Path, format: &str) -> Result<String, CanaryError> {
    let start = original
        .find("<target ")
        .ok_or_else(|| CanaryError::Unsupported(format!("disk without <target>: {original}")))?;
    let end = original[start..]
        .find("/>")
        .map(|e| start + e + 2)
        .ok_or_else(|| CanaryError::Unsupported(format!("unreadable <target> in {original}")))?;
    Ok(format!(
        "<disk type='file' device='disk'><driver name='qemu' type='{}'/><source file='{}'/>{}</disk>",
        xml_escape(format),
        xml_escape(&copy.display().to_string()),
        &original[start..end]
    ))
}

/// Copies a data disk's current content (crash-consistent: what a power cut would leave; the
/// file system's journal is replayed when the clone mounts it). The live disk is read by the
/// daemon, never opened by the clone.
fn copy_data(src: &Path, dst: &Path) -> Result<(), CanaryError> {
    let err = |what: &str, p: &Path, source| CanaryError::Io {
        what: format!("{what} {}", p.display()),
        source,
    };
    let mut from = std::fs::File::open(src).map_err(|e| err("open", src, e))?;
    let tmp = dst.with_extension("tmp");
    let mut to = std::fs::File::create(&tmp).map_err(|e| err("create", &tmp, e))?;
    std::io::copy(&mut from, &mut to).map_err(|e| err("copy", src, e))?;
    std::fs::rename(&tmp, dst).map_err(|e| err("rename", &tmp, e))
}

/// Data disks to copy, each with the format of its copy.
pub(super) type CopyPlan = Vec<(DataDisk, String)>;

/// The data disks of `primary` as isolated runs copy them (with their format), and their live
/// sources. Only raw file and block data disks can be copied while the primary writes them.
pub(super) fn data_plan(
    hv: &Hypervisor,
    primary_name: &str,
    data: Vec<DataDisk>,
) -> Result<(CopyPlan, Vec<String>), CanaryError> {
    let primary =
        DomainXml::parse(&hv.xml(primary_name, true)?).map_err(|source| CanaryError::Xml {
            domain: primary_name.to_string(),
            source,
        })?;
    let mut out = Vec::new();
    let mut live = Vec::new();
    for d in data {
        let disk = primary
            .disks()
            .into_iter()
            .find(|s| s.target_dev == d.target)
            .ok_or_else(|| CanaryError::Unsupported(format!("disk {} vanished", d.target)))?;
        let format = match disk.kind {
            DiskKind::File => disk.driver_type.clone().unwrap_or_else(|| "raw".into()),
            DiskKind::Block => "raw".into(),
            _ => {
                return Err(CanaryError::Unsupported(format!(
                "data disk {} ({}) is a {} disk: isolated runs copy file and block data disks only",
                d.target,
                d.source,
                disk.kind.as_str()
            )))
            }
        };
        if format != "raw" {
            return Err(CanaryError::Unsupported(format!(
                "data disk {} ({}) is {format}: a live {format} image cannot be copied consistently; isolated runs copy raw file and block data disks",
                d.target, d.source
            )));
        }
        live.push(d.source.clone());
        out.push((d, format));
    }
    Ok((out, live))
}

/// Copies each data disk and attaches the copy to `name`; the copies' paths.
pub(super) async fn attach_copies(
    hv: &Hypervisor,
    name: &str,
    data: CopyPlan,
    state_dir: &Path,
) -> Result<Vec<PathBuf>, CanaryError> {
    let mut copies = Vec::new();
    if data.is_empty() {
        return Ok(copies);
    }
    std::fs::create_dir_all(copy_dir(state_dir)).map_err(|source| CanaryError::Io {
        what: format!("create {}", copy_dir(state_dir).display()),
        source,
    })?;
    for (d, format) in data {
        let copy = copy_dir(state_dir).join(format!("{name}-{}.{format}", d.target));
        let (src, dst) = (PathBuf::from(&d.source), copy.clone());
        tokio::task::spawn_blocking(move || copy_data(&src, &dst))
            .await
            .map_err(|e| CanaryError::Io {
                what: "copy task".into(),
                source: std::io::Error::other(e.to_string()),
            })??;
        copies.push(copy.clone());
        let xml = copy_disk_xml(&d.xml, &copy, &format)?;
        let n = name.to_string();
        hv.run("attach data copy", move |hv| {
            hv.attach_device_live(&n, &xml)
        })
        .await?;
    }
    Ok(copies)
}

/// Runs argument vectors in `name` through its agent, each within `limit`; the first that
/// fails is the error.
pub(super) async fn run_commands(
    hv: &Hypervisor,
    name: &str,
    commands: &[Vec<String>],
    limit: Duration,
    max_reply: usize,
) -> Result<(), CanaryError> {
    for argv in commands {
        let out = guest_exec(hv, name, argv, limit, Duration::from_millis(50), max_reply)
            .await
            .map_err(|source| CanaryError::Agent {
                domain: name.to_string(),
                source,
            })?;
        if out.status != crate::monitor::agent::ExitStatus::Code(0) {
            return Err(CanaryError::Command {
                domain: name.to_string(),
                argv: argv.clone(),
                detail: format!(
                    "{:?}: {}",
                    out.status,
                    crate::failover::shadow::clip_tail(
                        &String::from_utf8_lossy(&out.stderr.data),
                        512
                    )
                ),
            });
        }
    }
    Ok(())
}

/// Makes `bridge` (deleted first if left over) with the addresses of `service_bridges` but
/// none of their routes.
pub(super) async fn make_bridge(
    net: &Netlink,
    bridge: &str,
    service_bridges: &[String],
) -> Result<(), CanaryError> {
    net.delete_link(bridge).await?;
    net.add_bridge(bridge).await?;
    for sb in service_bridges {
        for (addr, prefix) in net.ipv4_addresses(sb).await.unwrap_or_default() {
            net.add_ipv4_address_unrouted(bridge, addr, prefix).await?;
        }
    }
    // Replies come from the guest's address, which the host routes via the service bridge:
    // strict reverse-path filtering on this bridge would drop them.
    let _ = std::fs::write(format!("/proc/sys/net/ipv4/conf/{bridge}/rp_filter"), "0");
    Ok(())
}

/// Destroys and undefines `name` if it exists (a leftover of an interrupted run).
pub(super) fn remove_domain(hv: &Hypervisor, name: &str) {
    if hv.list().is_ok_and(|l| l.iter().any(|d| d.name == name)) {
        let _ = hv.destroy(name);
        let _ = hv.undefine(name);
    }
}

/// Starts an isolated clone: bridge, boot, taps on the bridge, agent, data copies attached,
/// promote commands run. On failure what was made is removed.
pub async fn start(
    hv: &Hypervisor,
    net: &Netlink,
    req: &IsolatedRequest,
) -> Result<IsolatedDomain, CanaryError> {
    let mut dom = IsolatedDomain::new(req.name.clone(), req.bridge.clone());
    match start_inner(hv, net, req, &mut dom).await {
        Ok(()) => Ok(dom),
        Err(e) => {
            teardown(hv, net, &dom, &req.state_dir).await;
            Err(e)
        }
    }
}

async fn start_inner(
    hv: &Hypervisor,
    net: &Netlink,
    req: &IsolatedRequest,
    dom: &mut IsolatedDomain,
) -> Result<(), CanaryError> {
    let r = req.clone();
    let (boot_xml, data, bridges, live_sources) = hv
        .blocking("define isolated clone", move |hv| {
            remove_domain(hv, &r.name);
            let shadow_req = ShadowRequest {
                service: r.service.clone(),
                class: r.class.clone(),
                primary: r.primary.clone(),
                primary_xml: None,
                name: r.name.clone(),
                generation: 0,
                state_dir: r.state_dir.clone(),
                boot_timeout: r.boot_timeout,
                agent_timeout: r.agent_timeout,
                agent_max_reply: r.agent_max_reply,
                warmup: Vec::new(),
                disks: r.disks.clone(),
                standby: StandbyMemory::default(),
                tier: Tier::Paused,
                pooled: false,
            };
            let (xml, data) = build_shadow_xml(hv, &shadow_req)?;
            let spec = DomainXml::parse(&xml).map_err(|source| CanaryError::Xml {
                domain: r.name.clone(),
                source,
            })?;
            let mut bridges = Vec::new();
            for i in spec.interfaces() {
                let b = match (&i.bridge, &i.network) {
                    (Some(b), _) => Some(b.clone()),
                    (None, Some(n)) => hv.network_bridge(n).ok(),
                    _ => None,
                };
                bridges.extend(b);
            }
            let (data_out, live) = data_plan(hv, &r.primary, data)?;
            let mut boot = standby_boot_spec(&spec);
            boot.set_interfaces_link(true);
            boot.set_understudy_meta(&member_meta(
                &r.service,
                &r.class,
                Role::Isolated,
                0,
                MemberState::Booting,
            ));
            Ok::<_, CanaryError>((boot.to_xml(), data_out, bridges, live))
        })
        .await??;
    dom.service_bridges = bridges;
    dom.live_sources = live_sources;

    make_bridge(net, &req.bridge, &dom.service_bridges).await?;

    let (name, xml) = (req.name.clone(), boot_xml);
    let live_xml = hv
        .run("start isolated clone", move |hv| {
            hv.define(&xml)?;
            hv.start(&name, false)?;
            hv.xml(&name, false)
        })
        .await?;
    let live = DomainXml::parse(&live_xml).map_err(|source| CanaryError::Xml {
        domain: req.name.clone(),
        source,
    })?;
    for (mac, tap) in live.live_interface_taps() {
        net.enslave_and_up(&tap, &req.bridge).await?;
        dom.macs.push(mac);
        dom.taps.push(tap);
    }
    dom.qemu_pid = crate::libvirt::qemu_pid(Path::new("/run/libvirt/qemu"), &req.name).ok();
    wait_for_agent(
        hv,
        &req.name,
        req.boot_timeout,
        req.agent_timeout,
        req.agent_max_reply,
    )
    .await?;

    dom.copies = attach_copies(hv, &req.name, data, &req.state_dir).await?;
    if !dom.copies.is_empty() {
        run_commands(
            hv,
            &req.name,
            &req.promote_commands,
            req.promote_timeout,
            req.agent_max_reply,
        )
        .await?;
    }
    tracing::info!(service = %req.service, domain = %req.name, bridge = %req.bridge, taps = ?dom.taps, copies = ?dom.copies, "isolated clone running");
    Ok(())
}

/// Removes an isolated clone and everything made for it. Best effort: each failure is logged.
pub async fn teardown(hv: &Hypervisor, net: &Netlink, dom: &IsolatedDomain, state_dir: &Path) {
    let name = dom.name.clone();
    let _ = hv
        .blocking("remove isolated clone", move |hv| remove_domain(hv, &name))
        .await;
    if let Err(e) = net.delete_link(&dom.bridge).await {
        tracing::warn!(bridge = %dom.bridge, error = %crate::error::report(&e), "isolated bridge not removed");
    }
    for c in &dom.copies {
        let _ = std::fs::remove_file(c);
    }
    let overlays = state_dir.join("disks");
    if let Ok(entries) = std::fs::read_dir(&overlays) {
        let prefix = format!("{}-", dom.name);
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    tracing::info!(domain = %dom.name, "isolated clone removed");
}

/// What [`check`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IsolationCheck {
    /// Checks made.
    pub checks: u64,
    /// What was wrong (empty: isolated all along).
    pub violations: Vec<String>,
}

/// Verifies that `dom` is isolated: its taps on its own bridge only, its MAC not learned by
/// any service bridge behind its taps, no live data disk open in its QEMU.
pub async fn check(net: &Netlink, dom: &IsolatedDomain, out: &mut IsolationCheck) {
    out.checks += 1;
    let mut bad = |s: String| {
        if out.violations.len() < 20 {
            out.violations.push(s);
        }
    };
    for tap in &dom.taps {
        match net.master_of(tap).await {
            Ok(Some(m)) if m == dom.bridge => {}
            Ok(other) => bad(format!(
                "tap {tap} of {} is on {other:?}, not {}",
                dom.name, dom.bridge
            )),
            // The domain stopped: its tap is gone, which isolates it too.
            Err(_) => {}
        }
    }
    for sb in &dom.service_bridges {
        if let Ok(fdb) = net.bridge_fdb(sb).await {
            for e in fdb {
                if dom.taps.contains(&e.port) {
                    bad(format!(
                        "service bridge {sb} forwards {} to {}'s tap {}",
                        e.mac, dom.name, e.port
                    ));
                }
            }
        }
    }
    if let Some(pid) = dom.qemu_pid {
        if let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
            for e in entries.flatten() {
                let Ok(target) = std::fs::read_link(e.path()) else {
                    continue;
                };
                let t = target.display().to_string();
                if dom.live_sources.contains(&t) {
                    bad(format!(
                        "{} (QEMU pid {pid}) holds the live data disk {t} open",
                        dom.name
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridge_names_fit_and_differ() {
        let a = bridge_name("web1", 'c');
        assert!(a.len() <= 15);
        assert_ne!(a, bridge_name("web1", 'b'));
        assert_ne!(a, bridge_name("web2", 'c'));
        assert_eq!(a, bridge_name("web1", 'c'));
    }

    #[test]
    fn copy_disk_keeps_the_target_only() {
        let x = copy_disk_xml(
            "<disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='/dev/loop3'/><target dev='sdb' bus='scsi'/><address type='drive' unit='1'/></disk>",
            Path::new("/var/lib/u/isolated/web1-canary-sdb.raw"),
            "raw",
        )
        .unwrap();
        assert_eq!(x, "<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/var/lib/u/isolated/web1-canary-sdb.raw'/><target dev='sdb' bus='scsi'/></disk>");
    }
}
