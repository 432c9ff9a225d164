//! Turning a primary's domain spec into its shadow's.
//!
//! A shadow is a faithful clone: every device is kept, so the guest sees the same machine and
//! the same PCI layout. Only what would make two domains collide, or let a standing-by shadow
//! act for the primary, changes:
//!
//! - identity: `<name>`, `<uuid>`; `<domain id=>` of live XML is dropped;
//! - interfaces: `<target dev>` removed (libvirt creates a fresh tap), network `portid=`
//!   removed (it names the primary's network port), `<link state='down'/>` on every NIC; MAC,
//!   bridge/network and model are kept so promotion only has to bring the link up. The shadow
//!   is *started* from [`standby_boot_spec`], whose NICs are plain `ethernet` taps, so its tap
//!   joins no bridge until promotion enslaves it;
//! - writable *system* disks: `<source file>` becomes the plan's overlay (which the
//!   coordinator creates with `qemu-img` on top of the primary's image, or of the class's
//!   golden image), `<driver type='qcow2'>`, any `<backingStore>` (which describes the
//!   primary's chain, not the overlay's) and live `index=` removed. A block, network or volume
//!   system disk has no image file to lay an overlay on: it becomes a `type='file'` disk on
//!   the plan's overlay (of the golden image), or is refused. Read-only disks and CD-ROMs are
//!   shared as they are;
//! - writable *data* disks (the plan's `data_disks`) are left out: the shadow is defined and
//!   booted without them, and promotion attaches the primary's very disk (any source type,
//!   shareable or not) once the primary's QEMU is gone;
//! - sizes: `<vcpu>` maximum and `<memory>` raised to the plan's (never lowered), keeping the
//!   primary's current vCPUs, `placement`, and `<currentMemory>`, so a promoted shadow can
//!   hot-plug up. A `<cpu><topology>` gets more sockets to match; a `<vcpus>` list gets
//!   disabled hot-pluggable entries; `<maxMemory>` is raised if below the new maximum;
//! - character devices (`<serial>`, `<console>`, `<channel>`, `<parallel>`): explicit `file`
//!   paths, `bind`-mode `unix` socket paths and `<log file>` move to
//!   `console_dir/<shadow name>.<original file name>`; for virtio `<channel>`s in `bind` mode
//!   the path is instead removed so libvirt generates one in the shadow's own channel
//!   directory (that is where it looks for the guest agent). `connect`-mode sockets are kept:
//!   they point at someone else's server. Live-only `pty` paths and `tty=` are dropped;
//! - `<graphics>`: fixed `port`/`tlsPort` removed with `autoport='yes'`, `websocket` set to
//!   auto, socket paths moved into `console_dir`;
//! - `<vsock>`: a fixed guest CID becomes `auto='yes'` (CIDs are host-unique);
//! - an emulated `<tpm>` (swtpm) is kept: libvirt keeps its state per domain UUID, and
//!   provisioning gives the shadow a copy of the primary's state before it starts;
//! - `<os><nvram>`: the primary's variable store is per-domain writable state. The element is
//!   removed so libvirt creates `<name>_VARS.fd` for the shadow from the firmware's template
//!   (an empty `<nvram template=..>` is not safe: some libvirt versions then use the template
//!   file itself). The primary's UEFI variables and a custom `template=` are therefore not
//!   carried over; a custom loader without a firmware descriptor makes the shadow fail to
//!   start rather than share the store;
//! - top-level dynamic `<seclabel>`s lose their generated `<label>`/`<imagelabel>` (the
//!   primary's sVirt category must not be reused); static labels are the user's choice and
//!   kept;
//! - `<metadata>`: any understudy element replaced with the plan's; other tools' kept.
//!
//! Refused (with the device and the reason named): `<hostdev>`, `<interface>` of type
//! `hostdev`, `direct` (macvtap cannot move between bridges), `vhostuser`, `vdpa` or
//! `ethernet` with an unmanaged tap; writable system disks that are shareable, or that have
//! no image file and no overlay in the plan (block, network, volume without a golden image;
//! dir, ...); a writable image file without an overlay in the plan; writable `<filesystem>`;
//! passthrough and external `<tpm>`s (they belong to the primary), and an emulated one whose
//! state sits at a fixed path; host `<smartcard>`s and non-SPICE `<redirdev>`s;
//! `<shmem>` (shared guest memory); `nvdimm`/`virtio-pmem` `<memory>` devices (writable backing
//! file); character devices that pass a host device or named pipe through or listen on a fixed
//! TCP/UDP port.
//!
//! Not rewritten: paths inside `<qemu:commandline>` (opaque to us), `connect`-mode sockets,
//! `<genid>`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use xot::{Node, Xot};

use super::tree::{self, attr, child_attr, child_named, children_named, clip};
use super::{DiskKind, DomainXml, InterfaceKind, UnderstudyMeta, XmlError, DOMAIN_VCPUS_MAX};

/// How to turn a primary's spec into a shadow's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShadowPlan {
    /// The shadow's domain name; must differ from the primary's and contain no `/`.
    pub name: String,
    /// The shadow's UUID; must differ from the primary's.
    pub uuid: String,
    /// Overlay image per `<target dev>` of every writable system disk with a source
    /// ([`DiskSpec::needs_overlay`](super::DiskSpec::needs_overlay), or a block, network or
    /// volume disk started from a golden image). Absolute paths.
    pub disk_overlays: BTreeMap<String, PathBuf>,
    /// `<target dev>` of every writable data disk: left out of the shadow, handed over at
    /// promotion.
    pub data_disks: BTreeSet<String>,
    /// vCPU maximum for the shadow (raised to, never below the primary's).
    pub vcpu_max: u32,
    /// `<memory>` for the shadow in KiB (raised to, never below the primary's).
    pub memory_max_kib: u64,
    /// Absolute directory for the shadow's console logs and sockets.
    pub console_dir: PathBuf,
    /// understudy metadata to record in the shadow.
    pub meta: UnderstudyMeta,
}

/// Why a shadow spec cannot be made from a primary's spec.
#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    /// A field of the plan is unusable.
    #[error("shadow plan {field} {value:?} is invalid: {reason}")]
    InvalidPlan {
        /// The plan field.
        field: &'static str,
        /// Its value (clipped).
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The primary has a device that cannot exist in two domains at once.
    #[error("cannot clone {device}: {reason}")]
    Unclonable {
        /// The device: its start tag plus identifying details (MAC, target, address, alias).
        device: String,
        /// Why it cannot be cloned.
        reason: String,
    },
    /// A writable image file has no overlay in the plan, so primary and shadow would share it.
    #[error(
        "writable disk {target} ({image}) has no overlay in the shadow plan; \
         primary and shadow would write the same image"
    )]
    MissingOverlay {
        /// `<target dev>` of the disk.
        target: String,
        /// Its image path.
        image: String,
    },
    /// The plan has an overlay for a disk that does not need one; the plan was made from a
    /// different view of the primary than this spec.
    #[error("shadow plan has an overlay for disk {target}, but {reason}")]
    UnexpectedOverlay {
        /// `<target dev>` named in the plan.
        target: String,
        /// Why the overlay does not apply.
        reason: &'static str,
    },
    /// The vCPU maximum cannot be expressed by adding sockets to `<cpu><topology>`.
    #[error(
        "vCPU maximum {vcpu_max} is not a multiple of the {per_socket} vCPUs per socket \
         in <cpu><topology>"
    )]
    CpuTopology {
        /// The requested maximum.
        vcpu_max: u32,
        /// dies × clusters × cores × threads.
        per_socket: u64,
    },
    /// A data disk named in the plan is missing or is not a writable disk with a source.
    #[error("shadow plan hands over disk {target}, but {reason}")]
    UnexpectedDataDisk {
        /// `<target dev>` named in the plan.
        target: String,
        /// Why it cannot be handed over.
        reason: &'static str,
    },
    /// A writable system disk has no image file to lay an overlay on and the plan gives it
    /// none (no golden image).
    #[error(
        "writable {kind} disk {target} ({disk_source}) is a system disk, and a {kind} disk has no \
         image file to lay the shadow's overlay on; fix: make it a data disk \
         (class.<name>.disk_roles.{target} = \"data\": handed over at failover) or give the \
         class a golden_image to boot shadows from"
    )]
    NoImageForSystemDisk {
        /// `<target dev>` of the disk.
        target: String,
        /// Its `type=` (block, network, volume).
        kind: String,
        /// Its source, as far as it can be named.
        disk_source: String,
    },
    /// The domain's memory is defined by NUMA cells, so raising `<memory>` would be ignored.
    #[error(
        "memory maximum cannot be raised from {max_kib} KiB to {planned_kib} KiB: \
         the domain sizes memory by <numa> cells"
    )]
    NumaMemory {
        /// Current maximum (sum of NUMA cells).
        max_kib: u64,
        /// The plan's maximum.
        planned_kib: u64,
    },
    /// The primary's spec or the plan's metadata is invalid XML-wise.
    #[error("invalid domain XML for cloning")]
    Xml(#[from] XmlError),
}

fn invalid(field: &'static str, value: &str, reason: &'static str) -> CloneError {
    CloneError::InvalidPlan {
        field,
        value: clip(value, 80),
        reason,
    }
}

fn unclonable(xot: &Xot, node: Node, reason: impl Into<String>) -> CloneError {
    CloneError::Unclonable {
        device: device_label(xot, node),
        reason: reason.into(),
    }
}

/// Start tag plus what identifies the device to an operator.
fn device_label(xot: &Xot, node: Node) -> String {
    let mut label = tree::start_tag(xot, node);
    if let Some(mac) = child_attr(xot, node, "mac", "address") {
        label.push_str(&format!(" mac {mac}"));
    }
    if let Some(dev) = child_attr(xot, node, "target", "dev") {
        label.push_str(&format!(" target {dev}"));
    }
    if let Some(source) = child_named(xot, node, "source") {
        for key in ["file", "dev", "dir", "path", "name", "bridge", "network"] {
            if let Some(v) = attr(xot, source, key) {
                label.push_str(&format!(" {key} {}", clip(v, 120)));
            }
        }
        // hostdev: <source><address domain bus slot function/> or <vendor id>/<product id>.
        if let Some(addr) = child_named(xot, source, "address") {
            let part = |k: &str| attr(xot, addr, k).unwrap_or("?").trim_start_matches("0x");
            if attr(xot, addr, "bus").is_some() && attr(xot, addr, "slot").is_some() {
                label.push_str(&format!(
                    " pci {}:{}:{}.{}",
                    part("domain"),
                    part("bus"),
                    part("slot"),
                    part("function")
                ));
            }
        }
        if let (Some(v), Some(p)) = (
            child_attr(xot, source, "vendor", "id"),
            child_attr(xot, source, "product", "id"),
        ) {
            label.push_str(&format!(" usb {v}:{p}"));
        }
    }
    if let Some(alias) = child_attr(xot, node, "alias", "name") {
        label.push_str(&format!(" alias {alias}"));
    }
    label
}

/// Normalized UUID (32 lowercase hex digits) or `None` if it is not one.
fn normalize_uuid(u: &str) -> Option<String> {
    let hex: String = u.chars().filter(|c| *c != '-').collect();
    (hex.len() == 32 && hex.chars().all(|c| c.is_ascii_hexdigit()))
        .then(|| hex.to_ascii_lowercase())
}

fn utf8_absolute<'a>(field: &'static str, p: &'a Path) -> Result<&'a str, CloneError> {
    let s = p
        .to_str()
        .ok_or_else(|| invalid(field, &p.to_string_lossy(), "path is not UTF-8"))?;
    if !p.is_absolute() {
        return Err(invalid(field, s, "path must be absolute"));
    }
    Ok(s)
}

fn validate_plan(primary: &DomainXml, plan: &ShadowPlan) -> Result<(), CloneError> {
    let name = plan.name.as_str();
    if name.is_empty() || name.len() > 200 {
        return Err(invalid("name", name, "must be 1 to 200 bytes"));
    }
    if name.contains('/') || name.chars().any(char::is_control) {
        return Err(invalid(
            "name",
            name,
            "must not contain '/' or control characters",
        ));
    }
    if primary.name().as_deref() == Some(name) {
        return Err(invalid("name", name, "is the primary's name"));
    }
    let uuid = normalize_uuid(&plan.uuid)
        .ok_or_else(|| invalid("uuid", &plan.uuid, "is not 32 hex digits"))?;
    if primary.uuid().and_then(|u| normalize_uuid(&u)) == Some(uuid) {
        return Err(invalid("uuid", &plan.uuid, "is the primary's UUID"));
    }
    if plan.vcpu_max > DOMAIN_VCPUS_MAX {
        return Err(invalid(
            "vcpu_max",
            &plan.vcpu_max.to_string(),
            "is more vCPUs than a domain may have",
        ));
    }
    utf8_absolute("console_dir", &plan.console_dir)?;
    for path in plan.disk_overlays.values() {
        utf8_absolute("disk_overlays", path)?;
    }
    if let Some(target) = plan
        .data_disks
        .iter()
        .find(|t| plan.disk_overlays.contains_key(*t))
    {
        return Err(invalid(
            "data_disks",
            target,
            "a data disk is handed over and gets no overlay",
        ));
    }
    plan.meta.validate()?;
    Ok(())
}

/// Maps the primary's explicit console/socket paths to per-shadow ones, deterministically, so
/// that a `<console>` mirroring `<serial>` still names the same path.
struct PathRewriter<'a> {
    dir: &'a Path,
    shadow: &'a str,
    /// The primary's name: a primary that was itself a shadow has paths we rewrote before,
    /// `dir/<primary>.<base>`, and its shadows must not stack prefixes on them.
    primary: Option<String>,
    map: BTreeMap<String, String>,
    taken: BTreeSet<String>,
}

impl<'a> PathRewriter<'a> {
    fn new(dir: &'a Path, shadow: &'a str, primary: Option<String>) -> Self {
        PathRewriter {
            dir,
            shadow,
            primary,
            map: BTreeMap::new(),
            taken: BTreeSet::new(),
        }
    }

    /// `dir/<shadow>.<file name of original>`; `fallback` stands in for a path without a
    /// file name, and a numeric suffix separates different originals with the same name.
    fn path_for(&mut self, original: &str, fallback: &str) -> String {
        if let Some(p) = self.map.get(original) {
            return p.clone();
        }
        let original_path = Path::new(original);
        let mut base = original_path
            .file_name()
            .and_then(|f| f.to_str())
            .unwrap_or(fallback);
        if original_path.parent() == Some(self.dir) {
            if let Some(stripped) = self
                .primary
                .as_deref()
                .and_then(|p| base.strip_prefix(p))
                .and_then(|rest| rest.strip_prefix('.'))
                .filter(|rest| !rest.is_empty())
            {
                base = stripped;
            }
        }
        let make = |suffix: &str| {
            // `dir` was checked to be UTF-8 in `validate_plan`.
            self.dir
                .join(format!("{}.{base}{suffix}", self.shadow))
                .to_string_lossy()
                .into_owned()
        };
        let mut candidate = make("");
        let mut n = 1u32;
        while self.taken.contains(&candidate) {
            candidate = make(&format!(".{n}"));
            n += 1;
        }
        self.taken.insert(candidate.clone());
        self.map.insert(original.to_string(), candidate.clone());
        candidate
    }
}

/// Builds the shadow's spec from the primary's. See the module documentation for the rules.
pub fn shadow_spec(primary: &DomainXml, plan: &ShadowPlan) -> Result<DomainXml, CloneError> {
    validate_plan(primary, plan)?;
    let vcpus = primary.vcpus();
    let memory = primary.memory_kib();
    let numa_sized = primary.numa_memory_kib()?.is_some();

    let mut dom = primary.clone();
    let root = dom.root;
    tree::remove_attr(&mut dom.xot, root, "id");
    dom.set_name(&plan.name);
    dom.set_uuid(&plan.uuid);

    let mut paths = PathRewriter::new(&plan.console_dir, &plan.name, primary.name());
    let mut overlays_used = BTreeSet::new();
    let mut data_used = BTreeSet::new();
    if let Some(devices) = dom.devices() {
        let nodes: Vec<Node> = tree::element_children(&dom.xot, devices).collect();
        for node in nodes {
            let mut used = Used {
                overlays: &mut overlays_used,
                data: &mut data_used,
            };
            clone_device(&mut dom.xot, node, plan, &mut paths, &mut used)?;
        }
    }
    if let Some(target) = plan
        .data_disks
        .iter()
        .find(|t| !data_used.contains(t.as_str()))
    {
        return Err(CloneError::UnexpectedDataDisk {
            target: target.clone(),
            reason: "the domain has no such disk",
        });
    }
    if let Some(target) = plan
        .disk_overlays
        .keys()
        .find(|t| !overlays_used.contains(t.as_str()))
    {
        // Disks that exist but are not writable files were reported while walking them.
        return Err(CloneError::UnexpectedOverlay {
            target: target.clone(),
            reason: "the domain has no such disk",
        });
    }

    raise_vcpus(&mut dom, vcpus.max, vcpus.current, plan.vcpu_max)?;
    let max_kib = memory.max_kib.max(plan.memory_max_kib);
    if numa_sized && max_kib > memory.max_kib {
        return Err(CloneError::NumaMemory {
            max_kib: memory.max_kib,
            planned_kib: plan.memory_max_kib,
        });
    }
    set_memory(&mut dom, max_kib, memory.current_kib)?;
    fresh_nvram(&mut dom);
    strip_dynamic_labels(&mut dom);
    dom.set_understudy_meta(&plan.meta);
    Ok(dom)
}

/// Children of a bridge or network `<interface>` that libvirt only accepts with a bridge or
/// network behind it.
pub(super) const BRIDGE_ONLY_CHILDREN: [&str; 4] = ["source", "virtualport", "vlan", "port"];

/// The definition a shadow is *started* from: its spec with every bridge or network interface
/// turned into a libvirt-managed tap of `type='ethernet'`, which libvirt creates and never puts
/// on a bridge.
///
/// With `type='bridge'` libvirt enslaves the tap while it starts QEMU, so a booting shadow's tap
/// would sit on the primary's bridge, carrying the primary's MAC, until we could detach it; and
/// libvirtd re-enslaves such taps whenever it restarts. A shadow started from this variant
/// never touches a bridge: promotion enslaves its tap itself, over netlink. Its persistent
/// definition stays the spec (same bridge or network as the primary), defined again right
/// after the start, so a promoted shadow that is later restarted comes up like the primary.
pub fn standby_boot_spec(spec: &DomainXml) -> DomainXml {
    let mut dom = spec.clone();
    let ifaces: Vec<Node> = dom.device_nodes("interface").collect();
    for iface in ifaces {
        let kind = InterfaceKind::parse(attr(&dom.xot, iface, "type").unwrap_or(""));
        if !matches!(kind, InterfaceKind::Bridge | InterfaceKind::Network) {
            continue;
        }
        tree::set_attr(&mut dom.xot, iface, "type", "ethernet");
        for local in BRIDGE_ONLY_CHILDREN {
            let nodes: Vec<Node> = children_named(&dom.xot, iface, local).collect();
            for n in nodes {
                tree::remove(&mut dom.xot, n);
            }
        }
    }
    dom
}

/// Disks of the plan met while walking the devices.
struct Used<'a> {
    overlays: &'a mut BTreeSet<String>,
    data: &'a mut BTreeSet<String>,
}

fn clone_device(
    x: &mut Xot,
    node: Node,
    plan: &ShadowPlan,
    paths: &mut PathRewriter<'_>,
    used: &mut Used<'_>,
) -> Result<(), CloneError> {
    let Some((local, "")) = tree::element_name(x, node) else {
        return Ok(());
    };
    let local = local.to_string();
    match local.as_str() {
        "hostdev" => Err(unclonable(
            x,
            node,
            "a passed-through host device can belong to one domain only",
        )),
        "interface" => clone_interface(x, node),
        "disk" => clone_disk(x, node, plan, used),
        "filesystem" => {
            if child_named(x, node, "readonly").is_some() {
                Ok(())
            } else {
                Err(unclonable(
                    x,
                    node,
                    "a writable shared host directory would be written by both domains",
                ))
            }
        }
        "tpm" => {
            let backend = child_named(x, node, "backend");
            let kind = backend
                .and_then(|b| attr(x, b, "type"))
                .unwrap_or("unknown");
            let fixed_state = backend
                .and_then(|b| child_named(x, b, "source"))
                .is_some_and(|s| attr(x, s, "path").is_some());
            let reason = match kind {
                // libvirt keeps an emulated TPM's state per domain UUID, so the shadow gets
                // its own (a copy of the primary's, made by provisioning).
                "emulator" if !fixed_state => return Ok(()),
                "emulator" => "its state sits at a fixed path that the primary writes",
                "passthrough" => "the host TPM can be passed to one domain only",
                _ => "the TPM backend belongs to the primary",
            };
            Err(unclonable(x, node, reason))
        }
        "smartcard" => match attr(x, node, "mode") {
            Some("host") | Some("host-certificates") => Err(unclonable(
                x,
                node,
                "host smartcard readers are passed to one domain only",
            )),
            _ => Ok(()),
        },
        "redirdev" => match attr(x, node, "type") {
            Some("spicevmc") => Ok(()),
            _ => Err(unclonable(
                x,
                node,
                "USB redirection from a host or server is held by the primary",
            )),
        },
        "shmem" => Err(unclonable(
            x,
            node,
            "shared memory would connect the shadow to the primary's peers",
        )),
        "memory" => match attr(x, node, "model") {
            Some(model @ ("nvdimm" | "virtio-pmem")) => Err(unclonable(
                x,
                node,
                format!("{model} is backed by a writable host file"),
            )),
            _ => Ok(()),
        },
        "serial" | "console" | "channel" | "parallel" => clone_chardev(x, node, &local, paths),
        "graphics" => {
            clone_graphics(x, node, paths);
            Ok(())
        }
        "vsock" => {
            if let Some(cid) = child_named(x, node, "cid") {
                tree::set_attr(x, cid, "auto", "yes");
                tree::remove_attr(x, cid, "address");
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn clone_interface(x: &mut Xot, iface: Node) -> Result<(), CloneError> {
    let kind = InterfaceKind::parse(attr(x, iface, "type").unwrap_or(""));
    let refusal = match kind {
        InterfaceKind::Direct => {
            Some("macvtap is bound to a host NIC and cannot be moved between bridges".to_string())
        }
        InterfaceKind::Hostdev => {
            Some("a passed-through network function can belong to one domain only".to_string())
        }
        InterfaceKind::VhostUser => {
            Some("its vhost-user socket is connected to the primary".to_string())
        }
        InterfaceKind::Vdpa => Some("a vDPA device can belong to one domain only".to_string()),
        InterfaceKind::Ethernet if child_attr(x, iface, "target", "managed") == Some("no") => {
            Some("it uses a pre-created tap device that the primary owns".to_string())
        }
        _ => None,
    };
    if let Some(reason) = refusal {
        return Err(unclonable(x, iface, reason));
    }
    let targets: Vec<Node> = children_named(x, iface, "target").collect();
    for t in targets {
        tree::remove(x, t);
    }
    if let Some(source) = child_named(x, iface, "source") {
        tree::remove_attr(x, source, "portid");
    }
    super::set_link(x, iface, false);
    Ok(())
}

fn clone_disk(
    x: &mut Xot,
    disk: Node,
    plan: &ShadowPlan,
    used: &mut Used<'_>,
) -> Result<(), CloneError> {
    let kind = DiskKind::parse(attr(x, disk, "type").unwrap_or("file"));
    let device = attr(x, disk, "device").unwrap_or("disk");
    // Present: `DomainXml::parse` rejects disks without a target.
    let target = child_attr(x, disk, "target", "dev")
        .unwrap_or_default()
        .to_string();
    let readonly = device == "cdrom" || child_named(x, disk, "readonly").is_some();
    let source = child_named(x, disk, "source").filter(|s| has_medium(x, &kind, *s));
    if plan.data_disks.contains(&target) {
        used.data.insert(target.clone());
        let reason = if readonly {
            Some("that disk is read-only and is shared as is")
        } else if source.is_none() {
            Some("that disk has no medium to hand over")
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(CloneError::UnexpectedDataDisk { target, reason });
        }
        // Handed over at promotion; the shadow boots without it.
        tree::remove(x, disk);
        return Ok(());
    }
    let overlay = plan.disk_overlays.get(&target);
    if overlay.is_some() {
        used.overlays.insert(target.clone());
    }
    if readonly {
        return match overlay {
            Some(_) => Err(CloneError::UnexpectedOverlay {
                target,
                reason: "that disk is read-only and is shared as is",
            }),
            None => Ok(()),
        };
    }
    if child_named(x, disk, "shareable").is_some() {
        return Err(unclonable(
            x,
            disk,
            "a writable shareable system disk would be written by both domains; \
             make it a data disk (class.<name>.disk_roles) to hand it over at failover",
        ));
    }
    let Some(source) = source else {
        // An empty writable drive shares nothing.
        return match overlay {
            Some(_) => Err(CloneError::UnexpectedOverlay {
                target,
                reason: "that disk has no image to put an overlay on",
            }),
            None => Ok(()),
        };
    };
    let Some(overlay) = overlay else {
        return Err(match kind {
            DiskKind::File => CloneError::MissingOverlay {
                target,
                image: attr(x, source, "file").unwrap_or_default().to_string(),
            },
            DiskKind::Block | DiskKind::Network | DiskKind::Volume => {
                CloneError::NoImageForSystemDisk {
                    target,
                    kind: kind.to_string(),
                    disk_source: source_label(x, source),
                }
            }
            _ => unclonable(
                x,
                disk,
                format!(
                    "a writable {kind} disk can neither get a qcow2 overlay nor be handed over"
                ),
            ),
        });
    };
    if !matches!(
        kind,
        DiskKind::File | DiskKind::Block | DiskKind::Network | DiskKind::Volume
    ) {
        return Err(unclonable(
            x,
            disk,
            format!("a writable {kind} disk cannot be given a qcow2 overlay"),
        ));
    }
    // A block, network or volume system disk boots from an overlay file (of the golden
    // image): the shadow's disk becomes a plain file disk with a fresh <source>.
    let source = if kind == DiskKind::File {
        source
    } else {
        tree::set_attr(x, disk, "type", "file");
        let fresh = tree::new_element(x, "source");
        tree::insert_before(x, source, fresh);
        tree::remove(x, source);
        // Network-only settings (auth, hosts, reservations) no longer apply.
        for local in ["auth", "encryption", "reservations"] {
            let nodes: Vec<Node> = children_named(x, disk, local).collect();
            for n in nodes {
                tree::remove(x, n);
            }
        }
        fresh
    };
    // Checked to be UTF-8 in `validate_plan`.
    tree::set_attr(x, source, "file", &overlay.to_string_lossy());
    tree::remove_attr(x, source, "index");
    let chains: Vec<Node> = children_named(x, disk, "backingStore").collect();
    for chain in chains {
        tree::remove(x, chain);
    }
    let driver = match child_named(x, disk, "driver") {
        Some(d) => d,
        None => {
            let d = tree::new_element(x, "driver");
            tree::set_attr(x, d, "name", "qemu");
            // libvirt wants <driver> before <source>; any order parses, but keep it tidy.
            tree::insert_before(x, source, d);
            d
        }
    };
    tree::set_attr(x, driver, "type", "qcow2");
    Ok(())
}

/// Whether a disk's `<source>` names a medium (an empty CD-ROM or floppy has none).
fn has_medium(x: &Xot, kind: &DiskKind, source: Node) -> bool {
    let a = |name: &str| attr(x, source, name).is_some();
    match kind {
        DiskKind::File => a("file"),
        DiskKind::Block => a("dev"),
        DiskKind::Dir => a("dir"),
        DiskKind::Network => a("protocol") || a("name"),
        DiskKind::Volume => a("pool") || a("volume"),
        DiskKind::Other(_) => true,
    }
}

/// A disk source for messages: path, device, `protocol:name` or `pool/volume`.
fn source_label(x: &Xot, source: Node) -> String {
    let a = |name: &str| attr(x, source, name);
    let label = match (a("protocol"), a("name"), a("pool"), a("volume")) {
        (Some(p), Some(n), _, _) => format!("{p}:{n}"),
        (_, _, Some(p), Some(v)) => format!("{p}/{v}"),
        _ => a("file")
            .or_else(|| a("dev"))
            .or_else(|| a("dir"))
            .unwrap_or("?")
            .to_string(),
    };
    clip(&label, 120)
}

fn clone_chardev(
    x: &mut Xot,
    dev: Node,
    local: &str,
    paths: &mut PathRewriter<'_>,
) -> Result<(), CloneError> {
    let kind = attr(x, dev, "type").unwrap_or("pty").to_string();
    let sources: Vec<Node> = children_named(x, dev, "source").collect();
    match kind.as_str() {
        "file" => {
            for s in sources {
                if let Some(p) = attr(x, s, "path").map(str::to_string) {
                    let new = paths.path_for(&p, local);
                    tree::set_attr(x, s, "path", &new);
                }
            }
        }
        "unix" => {
            let virtio_channel =
                local == "channel" && child_attr(x, dev, "target", "type") == Some("virtio");
            for s in sources {
                // libvirt's default mode is connect: a socket someone else serves.
                if attr(x, s, "mode") != Some("bind") {
                    continue;
                }
                let Some(p) = attr(x, s, "path").map(str::to_string) else {
                    continue;
                };
                if virtio_channel {
                    tree::remove_attr(x, s, "path");
                } else {
                    let new = paths.path_for(&p, local);
                    tree::set_attr(x, s, "path", &new);
                }
            }
        }
        "pty" => {
            // The pty path and tty= are live-only output naming the primary's terminal.
            for s in sources {
                tree::remove_attr(x, s, "path");
                if tree::is_bare(x, s) {
                    tree::remove(x, s);
                }
            }
            tree::remove_attr(x, dev, "tty");
        }
        "tcp" | "udp" => {
            for s in sources {
                if attr(x, s, "mode") == Some("bind") {
                    if let Some(port) = attr(x, s, "service").filter(|p| *p != "0") {
                        let reason = format!("it listens on fixed host {kind} port {port}");
                        return Err(unclonable(x, dev, reason));
                    }
                }
            }
        }
        "dev" => {
            return Err(unclonable(
                x,
                dev,
                "a host character device can be opened by one domain only",
            ))
        }
        "pipe" => {
            return Err(unclonable(
                x,
                dev,
                "its named pipe is read and written by the primary",
            ))
        }
        _ => {}
    }
    let logs: Vec<Node> = children_named(x, dev, "log").collect();
    for log in logs {
        if let Some(p) = attr(x, log, "file").map(str::to_string) {
            let new = paths.path_for(&p, "log");
            tree::set_attr(x, log, "file", &new);
        }
    }
    Ok(())
}

fn clone_graphics(x: &mut Xot, g: Node, paths: &mut PathRewriter<'_>) {
    let kind = attr(x, g, "type").unwrap_or("").to_string();
    if matches!(kind.as_str(), "vnc" | "spice" | "rdp") {
        let fixed = |x: &Xot, a: &str| attr(x, g, a).is_some_and(|p| p != "-1");
        if fixed(x, "port") || fixed(x, "tlsPort") || attr(x, g, "autoport") == Some("no") {
            tree::remove_attr(x, g, "port");
            tree::remove_attr(x, g, "tlsPort");
            tree::set_attr(x, g, "autoport", "yes");
        }
        if fixed(x, "websocket") {
            tree::set_attr(x, g, "websocket", "-1");
        }
    }
    let fallback = format!("{kind}.sock");
    if let Some(p) = attr(x, g, "socket").map(str::to_string) {
        let new = paths.path_for(&p, &fallback);
        tree::set_attr(x, g, "socket", &new);
    }
    let listens: Vec<Node> = children_named(x, g, "listen").collect();
    for l in listens {
        if let Some(p) = attr(x, l, "socket").map(str::to_string) {
            let new = paths.path_for(&p, &fallback);
            tree::set_attr(x, l, "socket", &new);
        }
    }
}

fn parse_u64(what: &str, s: &str) -> Result<u64, XmlError> {
    s.trim().parse().map_err(|source| XmlError::InvalidNumber {
        what: what.to_string(),
        value: clip(s, 40),
        source,
    })
}

fn raise_vcpus(
    dom: &mut DomainXml,
    old_max: u32,
    current: u32,
    planned: u32,
) -> Result<(), CloneError> {
    let new_max = old_max.max(planned);
    let root = dom.root;
    let x = &mut dom.xot;
    if new_max != old_max {
        if let Some(topo) = child_named(x, root, "cpu").and_then(|c| child_named(x, c, "topology"))
        {
            let mut per_socket: u64 = 1;
            for key in ["dies", "clusters", "cores", "threads"] {
                if let Some(v) = attr(x, topo, key) {
                    let n = parse_u64(&format!("<topology {key}=>"), v)?;
                    per_socket = per_socket.saturating_mul(n);
                }
            }
            if per_socket == 0 || u64::from(new_max) % per_socket != 0 {
                return Err(CloneError::CpuTopology {
                    vcpu_max: new_max,
                    per_socket,
                });
            }
            let sockets = u64::from(new_max) / per_socket;
            tree::set_attr(x, topo, "sockets", &sockets.to_string());
        }
        // Per-vCPU list: libvirt wants one entry per possible vCPU; extras start unplugged.
        // Each goes right after the one before: appending would look for the list's last
        // element every time, quadratic in a list of thousands.
        if let Some(list) = child_named(x, root, "vcpus") {
            let mut last = None;
            for id in old_max..new_max {
                let v = tree::new_element(x, "vcpu");
                tree::set_attr(x, v, "id", &id.to_string());
                tree::set_attr(x, v, "enabled", "no");
                tree::set_attr(x, v, "hotpluggable", "yes");
                match last {
                    Some(prev) => tree::insert_after(x, prev, v),
                    None => tree::append_element(x, list, v),
                }
                last = Some(v);
            }
        }
    }
    let vcpu = match child_named(x, root, "vcpu") {
        Some(v) => v,
        None => {
            let v = tree::new_element(x, "vcpu");
            dom.insert_top_level(v, &["name", "uuid", "metadata", "memory", "currentMemory"]);
            v
        }
    };
    let x = &mut dom.xot;
    tree::set_attr(x, vcpu, "current", &current.to_string());
    tree::set_text(x, vcpu, &new_max.to_string());
    Ok(())
}

fn set_memory(dom: &mut DomainXml, max_kib: u64, current_kib: u64) -> Result<(), CloneError> {
    let root = dom.root;
    let memory = match child_named(&dom.xot, root, "memory") {
        Some(m) => m,
        None => {
            let m = tree::new_element(&mut dom.xot, "memory");
            dom.insert_top_level(
                m,
                &["name", "uuid", "genid", "title", "description", "metadata"],
            );
            m
        }
    };
    let current = match child_named(&dom.xot, root, "currentMemory") {
        Some(c) => c,
        None => {
            let c = tree::new_element(&mut dom.xot, "currentMemory");
            tree::insert_after(&mut dom.xot, memory, c);
            c
        }
    };
    let x = &mut dom.xot;
    tree::set_attr(x, memory, "unit", "KiB");
    tree::set_text(x, memory, &max_kib.to_string());
    tree::set_attr(x, current, "unit", "KiB");
    tree::set_text(x, current, &current_kib.to_string());
    // The hot-plug ceiling must stay at or above the boot maximum.
    if let Some(mm) = child_named(x, root, "maxMemory") {
        let text = tree::text(x, mm);
        let old = super::units::parse_kib("maxMemory", &text, attr(x, mm, "unit"))?;
        if old < max_kib {
            tree::set_attr(x, mm, "unit", "KiB");
            tree::set_text(x, mm, &max_kib.to_string());
        }
    }
    Ok(())
}

fn fresh_nvram(dom: &mut DomainXml) {
    let root = dom.root;
    let x = &mut dom.xot;
    let Some(nvram) = child_named(x, root, "os").and_then(|os| child_named(x, os, "nvram")) else {
        return;
    };
    // Dropped entirely, not just emptied: some libvirt versions take an empty
    // `<nvram template=T/>` to mean "use T itself", which would write the shared template.
    tree::remove(x, nvram);
}

fn strip_dynamic_labels(dom: &mut DomainXml) {
    let root = dom.root;
    let x = &mut dom.xot;
    let labels: Vec<Node> = children_named(x, root, "seclabel")
        .filter(|s| attr(x, *s, "type") == Some("dynamic"))
        .collect();
    for s in labels {
        let generated: Vec<Node> = tree::element_children(x, s)
            .filter(|c| tree::is_plain(x, *c, "label") || tree::is_plain(x, *c, "imagelabel"))
            .collect();
        for g in generated {
            tree::remove(x, g);
        }
    }
}

/// How a paused shadow's verification copy differs from it (see [`verify_copy_spec`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyPlan {
    /// The copy's domain name.
    pub name: String,
    /// Its UUID.
    pub uuid: String,
    /// The isolated bridge its NICs join.
    pub bridge: String,
    /// A copy per `<target dev>` of every writable disk of the shadow (its overlays).
    pub disks: BTreeMap<String, PathBuf>,
    /// Absolute directory for its console logs and sockets.
    pub console_dir: PathBuf,
    /// understudy metadata to record in it (role `isolated`).
    pub meta: UnderstudyMeta,
}

/// The XML a paused shadow's memory image is restored as, for a copy of it that runs beside
/// it (standby verification): the shadow's saved XML with a new identity, every NIC a tap on
/// the isolated `bridge` (same MAC and PCI address: the guest sees its own NIC), every
/// writable disk on its copy, console and socket paths its own, its metadata role
/// `isolated`. Everything the guest sees stays: it is the shadow's machine, resumed
/// elsewhere. Refused: a writable disk without a copy in the plan (the copy never opens the
/// shadow's), an emulated TPM (its state is kept per UUID; the copy would have none), and NICs
/// that cannot be put on a bridge.
pub fn verify_copy_spec(saved: &DomainXml, plan: &CopyPlan) -> Result<DomainXml, CloneError> {
    let mut dom = saved.clone();
    let root = dom.root;
    tree::remove_attr(&mut dom.xot, root, "id");
    dom.set_name(&plan.name);
    dom.set_uuid(&plan.uuid);
    let shadow = saved.name();
    let mut paths = PathRewriter::new(&plan.console_dir, &plan.name, shadow);
    if let Some(devices) = dom.devices() {
        let nodes: Vec<Node> = tree::element_children(&dom.xot, devices).collect();
        for node in nodes {
            copy_device(&mut dom.xot, node, plan, &mut paths)?;
        }
    }
    strip_dynamic_labels(&mut dom);
    dom.set_understudy_meta(&plan.meta);
    Ok(dom)
}

fn copy_device(
    x: &mut Xot,
    node: Node,
    plan: &CopyPlan,
    paths: &mut PathRewriter<'_>,
) -> Result<(), CloneError> {
    let Some((local, "")) = tree::element_name(x, node) else {
        return Ok(());
    };
    let local = local.to_string();
    match local.as_str() {
        "interface" => {
            let kind = InterfaceKind::parse(attr(x, node, "type").unwrap_or(""));
            if !matches!(
                kind,
                InterfaceKind::Ethernet | InterfaceKind::Bridge | InterfaceKind::Network
            ) {
                return Err(unclonable(
                    x,
                    node,
                    "it cannot be put on an isolated bridge",
                ));
            }
            let drop: Vec<Node> = BRIDGE_ONLY_CHILDREN
                .iter()
                .chain(&["target"])
                .flat_map(|l| children_named(x, node, l).collect::<Vec<_>>())
                .collect();
            for n in drop {
                tree::remove(x, n);
            }
            tree::set_attr(x, node, "type", "bridge");
            let source = tree::new_element(x, "source");
            tree::set_attr(x, source, "bridge", &plan.bridge);
            tree::append_element(x, node, source);
            Ok(())
        }
        "disk" => {
            let target = child_attr(x, node, "target", "dev")
                .unwrap_or_default()
                .to_string();
            let readonly = attr(x, node, "device") == Some("cdrom")
                || child_named(x, node, "readonly").is_some();
            if readonly || child_named(x, node, "shareable").is_some() {
                return Ok(());
            }
            let kind = DiskKind::parse(attr(x, node, "type").unwrap_or("file"));
            let copy = plan.disks.get(&target);
            let source = child_named(x, node, "source");
            match (kind, copy, source) {
                (DiskKind::File, Some(copy), Some(source)) => {
                    let p = utf8_absolute("disk copy", copy)?.to_string();
                    tree::set_attr(x, source, "file", &p);
                    tree::remove_attr(x, source, "index");
                    Ok(())
                }
                _ => Err(unclonable(
                    x,
                    node,
                    "a writable disk of the shadow without a copy: the copy would write the shadow's",
                )),
            }
        }
        "tpm" => Err(unclonable(
            x,
            node,
            "libvirt keeps an emulated TPM's state per UUID: the copy would have none",
        )),
        "serial" | "console" | "channel" | "parallel" => clone_chardev(x, node, &local, paths),
        "graphics" => {
            clone_graphics(x, node, paths);
            Ok(())
        }
        _ => Ok(()),
    }
}
