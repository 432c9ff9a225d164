//! What a shadow of a primary would be, decided before anything is created: each disk's role
//! and what happens to it (and so whether a failover keeps its data), each NIC's handling, and
//! the shadow spec itself. Provisioning ([`super::shadow`]) builds shadows from this, and
//! `understudy shadow plan` prints it as a dry run.
//!
//! Disk roles come from the class ([`ClassConfig::disk_role`]): a writable *system* disk gets a
//! per-shadow qcow2 overlay (of the primary's image, or of the class's golden image for a
//! block, network or volume disk, which has no image file to lay one on); a writable *data*
//! disk is left out of the shadow and handed over at promotion. Read-only disks, CD-ROMs and
//! empty drives are shared as they are: nothing is written to them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{ClassConfig, DiskRole, NetworkMode};
use crate::domain_xml::{
    shadow_spec, CloneError, DiskKind, DiskSpec, DomainXml, InterfaceKind, ShadowPlan,
    DOMAIN_VCPUS_MAX,
};

/// How a class treats the disks of its primaries, as provisioning needs it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskPolicy {
    /// Role per `<target dev>`.
    pub roles: BTreeMap<String, DiskRole>,
    /// Role of disks not in `roles`.
    pub default_role: DiskRole,
    /// The class's golden image: what block, network and volume system disks boot from.
    pub golden_image: Option<PathBuf>,
    /// Start the first system image disk from the golden image too (`shadow reinit
    /// --golden`).
    pub golden_for_images: bool,
}

impl DiskPolicy {
    /// The policy of `class`; `golden_for_images` as chosen by `shadow reinit --golden`.
    pub fn of_class(class: &ClassConfig, golden_for_images: bool) -> Self {
        DiskPolicy {
            roles: class.disk_roles.clone(),
            default_role: class.default_disk_role,
            golden_image: class.golden_image.clone(),
            golden_for_images,
        }
    }

    /// This policy with the first system disk booting an overlay of `image` (a golden image a
    /// canary tries, or one promoted from a canary), whatever the class's golden image is.
    pub fn booting_from(mut self, image: PathBuf) -> Self {
        self.golden_image = Some(image);
        self.golden_for_images = true;
        self
    }

    /// The system disk that boots from the golden image under this policy, if any.
    pub fn golden_disk(&self, primary: &DomainXml) -> Result<Option<String>, PlanError> {
        Ok(plan_disks(primary, self)?
            .disks
            .into_iter()
            .find(|d| d.handling == DiskHandling::GoldenOverlay)
            .map(|d| d.target))
    }

    fn role(&self, target: &str) -> DiskRole {
        self.roles.get(target).copied().unwrap_or(self.default_role)
    }

    /// Whether a primary can have a data disk under this policy at all; promotions of a
    /// class where none can skip the hand-over entirely.
    pub fn may_hand_over(&self) -> bool {
        self.default_role == DiskRole::Data || self.roles.values().any(|r| *r == DiskRole::Data)
    }
}

/// A data disk as promotion attaches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataDisk {
    /// `<target dev>`.
    pub target: String,
    /// Its source, for messages.
    pub source: String,
    /// The `<disk>` element from the old primary's definition.
    pub xml: String,
}

/// The data disks of `primary` under `policy`, each with the `<disk>` to attach to its
/// shadow.
pub fn data_disks(primary: &DomainXml, policy: &DiskPolicy) -> Result<Vec<DataDisk>, PlanError> {
    let layout = plan_disks(primary, policy)?;
    Ok(layout
        .with(DiskHandling::HandedOver)
        .filter_map(|d| {
            Some(DataDisk {
                target: d.target.clone(),
                source: d.source.clone().unwrap_or_default(),
                xml: primary.disk_xml(&d.target)?,
            })
        })
        .collect())
}

/// Which of `running` (name and live definition of each running domain) have a writable disk
/// on `source`, and at which target: understudy's own single-writer check before a data disk
/// is attached, for the disks libvirt's lock manager does not lease (network disks).
pub fn disk_holders<'a>(
    running: &'a [(String, DomainXml)],
    source: &str,
) -> Vec<(&'a str, String)> {
    running
        .iter()
        .flat_map(|(name, xml)| {
            xml.disks()
                .into_iter()
                .filter(|d| !d.readonly && d.source.as_deref() == Some(source))
                .map(move |d| (name.as_str(), d.target_dev))
        })
        .collect()
}

/// What happens to one disk when a shadow is made and promoted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskHandling {
    /// System disk: the shadow boots a qcow2 overlay of the primary's image.
    Overlay,
    /// System disk: the shadow boots a qcow2 overlay of the class's golden image.
    GoldenOverlay,
    /// Data disk: left out of the shadow; the same disk is attached to it at promotion.
    HandedOver,
    /// Read-only (or a CD-ROM): shared by primary and shadows as it is.
    Shared,
    /// An empty drive: nothing to share or hand over.
    Empty,
    /// A system disk that can have no overlay (a block, network or volume disk without a
    /// golden image; a directory disk): the clone is refused.
    NoOverlay,
}

impl DiskHandling {
    /// Whether what the primary wrote to the disk is there after a failover; `None` for disks
    /// nobody writes.
    pub fn keeps_data(self) -> Option<bool> {
        match self {
            DiskHandling::HandedOver => Some(true),
            DiskHandling::Overlay | DiskHandling::GoldenOverlay => Some(false),
            DiskHandling::Shared | DiskHandling::Empty | DiskHandling::NoOverlay => None,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            DiskHandling::Overlay => {
                "shadow boots its own overlay of the primary's image; a failover LOSES what \
                 the primary wrote since the shadow was made"
            }
            DiskHandling::GoldenOverlay => {
                "shadow boots its own overlay of the class's golden image; a failover LOSES \
                 what the primary wrote to this disk"
            }
            DiskHandling::HandedOver => {
                "left out of the shadow and attached to it at promotion once the primary's \
                 QEMU is gone; a failover KEEPS its data"
            }
            DiskHandling::Shared => "read-only, shared as is",
            DiskHandling::Empty => "no medium",
            DiskHandling::NoOverlay => {
                "REFUSED: a system disk without an image file to lay an overlay on; make it a \
                 data disk or give the class a golden_image"
            }
        }
    }
}

/// One disk of the primary, as planned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskPlan {
    /// `<target dev>`.
    pub target: String,
    /// `type=`: file, block, network, volume, ...
    pub kind: String,
    /// `device=`: disk, cdrom, lun, floppy.
    pub device: String,
    /// The source, as far as it can be named.
    pub source: Option<String>,
    /// The role from the class, for writable disks with a medium.
    pub role: Option<DiskRole>,
    /// What happens to it.
    pub handling: DiskHandling,
    /// Whether a failover keeps what the primary wrote (`None`: nobody writes it).
    pub keeps_data: Option<bool>,
    /// Base of the overlay, for the two overlay handlings: the primary's image (which
    /// provisioning resolves to its backing file or a per-service copy) or the golden image.
    pub overlay_base: Option<PathBuf>,
}

impl fmt::Display for DiskPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let role = self.role.map_or("-", DiskRole::as_str);
        write!(
            f,
            "{} ({} {} {}): role {role}: {}",
            self.target,
            self.kind,
            self.device,
            self.source.as_deref().unwrap_or("no source"),
            self.handling.describe()
        )
    }
}

/// One NIC of the primary, as planned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NicPlan {
    /// MAC address (kept by every shadow).
    pub mac: Option<String>,
    /// `type=`.
    pub kind: String,
    /// Bridge or libvirt network it serves on.
    pub on: Option<String>,
    /// What happens to it.
    pub handling: String,
}

/// The disks of a primary, planned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskLayout {
    /// Every disk in document order.
    pub disks: Vec<DiskPlan>,
}

impl DiskLayout {
    /// `<target dev>` of the disks handed over at promotion.
    pub fn data_disks(&self) -> BTreeSet<String> {
        self.with(DiskHandling::HandedOver)
            .map(|d| d.target.clone())
            .collect()
    }

    /// `(target, base)` of the disks that get an overlay.
    pub fn overlays(&self) -> impl Iterator<Item = (&str, &Path)> {
        self.disks
            .iter()
            .filter_map(|d| Some((d.target.as_str(), d.overlay_base.as_deref()?)))
    }

    /// Whether any disk is handed over at promotion.
    pub fn has_data_disks(&self) -> bool {
        self.with(DiskHandling::HandedOver).next().is_some()
    }

    fn with(&self, h: DiskHandling) -> impl Iterator<Item = &DiskPlan> {
        self.disks.iter().filter(move |d| d.handling == h)
    }
}

/// Why the disks of a primary cannot be planned.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// A data disk of a kind that cannot be attached to another domain.
    #[error(
        "disk {target} ({kind} {disk_source}) cannot be a data disk: only file, block, network and \
         volume disks can be handed over"
    )]
    UnsupportedDataDisk {
        /// `<target dev>`.
        target: String,
        /// Its `type=`.
        kind: String,
        /// Its source.
        disk_source: String,
    },
    /// More than one disk would boot from the one golden image.
    #[error(
        "disks {first} and {second} would both boot from the class's golden image; only one \
         system disk can: make the other a data disk (class.<name>.disk_roles)"
    )]
    GoldenTwice {
        /// The disk that got the golden image first.
        first: String,
        /// The next one.
        second: String,
    },
}

/// Plans every disk of `primary` under `policy`. Refusals that the clone itself detects
/// (a block system disk without a golden image, a shareable system disk, ...) are left to
/// [`shadow_spec`], which names the device.
pub fn plan_disks(primary: &DomainXml, policy: &DiskPolicy) -> Result<DiskLayout, PlanError> {
    let mut disks = Vec::new();
    let mut golden_taken: Option<String> = None;
    let mut first_image_seen = false;
    for d in primary.disks() {
        let writable = !d.readonly && d.source.is_some();
        let role = writable.then(|| policy.role(&d.target_dev));
        let (handling, base) = match role {
            None if d.source.is_none() => (DiskHandling::Empty, None),
            None => (DiskHandling::Shared, None),
            Some(DiskRole::Data) => {
                if !matches!(
                    d.kind,
                    DiskKind::File | DiskKind::Block | DiskKind::Network | DiskKind::Volume
                ) {
                    return Err(PlanError::UnsupportedDataDisk {
                        target: d.target_dev.clone(),
                        kind: d.kind.to_string(),
                        disk_source: d.source.clone().unwrap_or_default(),
                    });
                }
                (DiskHandling::HandedOver, None)
            }
            Some(DiskRole::System) => system_disk(&d, policy, &mut first_image_seen),
        };
        if handling == DiskHandling::GoldenOverlay {
            if let Some(first) = &golden_taken {
                return Err(PlanError::GoldenTwice {
                    first: first.clone(),
                    second: d.target_dev.clone(),
                });
            }
            golden_taken = Some(d.target_dev.clone());
        }
        disks.push(DiskPlan {
            target: d.target_dev.clone(),
            kind: d.kind.to_string(),
            device: d.device.to_string(),
            source: d.source.clone(),
            role,
            handling,
            keeps_data: handling.keeps_data(),
            overlay_base: base,
        });
    }
    Ok(DiskLayout { disks })
}

/// The handling of a writable system disk: an overlay of its image, or of the golden image
/// when it has no image file or `shadow reinit --golden` chose it. Disks that can have
/// neither get no overlay, which [`shadow_spec`] refuses by name.
fn system_disk(
    d: &DiskSpec,
    policy: &DiskPolicy,
    first_image_seen: &mut bool,
) -> (DiskHandling, Option<PathBuf>) {
    let golden = policy.golden_image.clone();
    match d.kind {
        DiskKind::File => {
            let first = !std::mem::replace(first_image_seen, true);
            match golden {
                Some(g) if first && policy.golden_for_images => {
                    (DiskHandling::GoldenOverlay, Some(g))
                }
                _ => (DiskHandling::Overlay, d.source.clone().map(PathBuf::from)),
            }
        }
        DiskKind::Block | DiskKind::Network | DiskKind::Volume => match golden {
            Some(g) => (DiskHandling::GoldenOverlay, Some(g)),
            None => (DiskHandling::NoOverlay, None),
        },
        _ => (DiskHandling::NoOverlay, None),
    }
}

/// The NICs of `primary`, as a shadow handles them under the class's `network` mode
/// (refusals are [`shadow_spec`]'s).
pub fn plan_nics(primary: &DomainXml, network: NetworkMode) -> Vec<NicPlan> {
    primary
        .interfaces()
        .into_iter()
        .map(|i| {
            let handling = match i.kind {
                InterfaceKind::Ethernet if network == NetworkMode::Routed => {
                    "same MAC; a fresh libvirt-managed tap, down and link held down until \
                     promotion, which brings it up, gives it the primary tap's host addresses \
                     and replaces the /32 host routes through the primary's tap so they point \
                     at it"
                }
                InterfaceKind::Bridge | InterfaceKind::Network => {
                    "same MAC, model and bridge; the shadow boots on a tap that joins no \
                     bridge, link held down, until promotion enslaves it and brings it up"
                }
                InterfaceKind::Ethernet => {
                    "same MAC; a fresh libvirt-managed tap, link down until promotion"
                }
                InterfaceKind::User => "user-mode networking, kept as is (link down)",
                _ => "kept as is, link down",
            };
            NicPlan {
                mac: i.mac,
                kind: i.kind.to_string(),
                on: i.bridge.or(i.network),
                handling: handling.to_string(),
            }
        })
        .collect()
}

/// The whole dry run of one primary: its disks and NICs, and the shadow spec or the reason
/// there can be none.
#[derive(Debug, Clone, Serialize)]
pub struct ShadowPreview {
    /// The primary's name.
    pub domain: Option<String>,
    /// The class planned with.
    pub class: String,
    /// Whether a shadow can be made.
    pub protectable: bool,
    /// Why not, naming the device.
    pub refusal: Option<String>,
    /// Every disk.
    pub disks: Vec<DiskPlan>,
    /// Every NIC.
    pub interfaces: Vec<NicPlan>,
    /// Whether promotion attaches data disks and runs `promote_commands` before the network
    /// comes up.
    pub hands_over_data: bool,
    /// The class's network mode: whether promotion moves a bridge port or host routes.
    pub network: NetworkMode,
    /// The spec the shadow would be defined with.
    pub shadow_xml: Option<String>,
}

/// Everything [`preview`] needs besides the primary.
#[derive(Debug, Clone)]
pub struct PreviewInput<'a> {
    /// Class name.
    pub class_name: &'a str,
    /// Class settings.
    pub class: &'a ClassConfig,
    /// Overlay and console paths go under here, as provisioning would put them.
    pub state_dir: &'a Path,
    /// The shadow's name.
    pub shadow_name: String,
    /// The shadow's UUID.
    pub shadow_uuid: String,
}

/// Plans a shadow of `primary` without creating anything: what `shadow plan` prints.
pub fn preview(primary: &DomainXml, input: &PreviewInput<'_>) -> ShadowPreview {
    let interfaces = plan_nics(primary, input.class.network);
    let policy = DiskPolicy::of_class(input.class, false);
    let mut out = ShadowPreview {
        domain: primary.name(),
        class: input.class_name.to_string(),
        protectable: false,
        refusal: None,
        disks: Vec::new(),
        interfaces,
        hands_over_data: false,
        network: input.class.network,
        shadow_xml: None,
    };
    let layout = match plan_disks(primary, &policy) {
        Ok(l) => l,
        Err(e) => {
            out.refusal = Some(e.to_string());
            return out;
        }
    };
    out.hands_over_data = layout.has_data_disks();
    let plan = clone_plan(
        primary,
        &layout,
        input.state_dir,
        &input.shadow_name,
        &input.shadow_uuid,
        crate::domain_xml::UnderstudyMeta {
            service: primary.name().unwrap_or_default(),
            class: input.class_name.to_string(),
            role: crate::domain_xml::Role::Shadow,
            generation: 1,
            state: crate::domain_xml::MemberState::Booting,
            journal: None,
        },
    );
    out.disks = layout.disks;
    match shadow_spec(primary, &plan) {
        Ok(spec) => {
            out.protectable = true;
            out.shadow_xml = Some(spec.to_xml());
        }
        Err(e) => out.refusal = Some(refusal_text(&e)),
    }
    out
}

/// The [`ShadowPlan`] for `layout`: overlays at `<state_dir>/disks/<shadow>-<target>.qcow2`,
/// consoles under `<state_dir>/consoles`, sizes with headroom for a profile to grow into.
pub fn clone_plan(
    primary: &DomainXml,
    layout: &DiskLayout,
    state_dir: &Path,
    name: &str,
    uuid: &str,
    meta: crate::domain_xml::UnderstudyMeta,
) -> ShadowPlan {
    let vcpus = primary.vcpus();
    let mem = primary.memory_kib();
    let disk_dir = state_dir.join("disks");
    ShadowPlan {
        name: name.to_string(),
        uuid: uuid.to_string(),
        disk_overlays: layout
            .overlays()
            .map(|(t, _)| (t.to_string(), overlay_path(&disk_dir, name, t)))
            .collect(),
        data_disks: layout.data_disks(),
        // Headroom above the primary's current size so a profile can grow the shadow live,
        // within what a domain may have.
        vcpu_max: vcpus
            .max
            .max(vcpus.current.saturating_mul(2).min(DOMAIN_VCPUS_MAX))
            .max(1),
        memory_max_kib: mem.max_kib.max(mem.current_kib.saturating_mul(3) / 2),
        console_dir: state_dir.join("consoles"),
        meta,
    }
}

/// Where the overlay of disk `target` of shadow `shadow` lives.
pub fn overlay_path(disk_dir: &Path, shadow: &str, target: &str) -> PathBuf {
    disk_dir.join(format!("{shadow}-{target}.qcow2"))
}

/// A clone refusal with its causes, on one line.
fn refusal_text(e: &CloneError) -> String {
    crate::error::report(e)
}

impl fmt::Display for ShadowPreview {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "domain {} (class {}): {}",
            self.domain.as_deref().unwrap_or("?"),
            self.class,
            if self.protectable {
                "protectable"
            } else {
                "REFUSED"
            }
        )?;
        if let Some(r) = &self.refusal {
            writeln!(f, "  refused: {r}")?;
        }
        if !self.disks.is_empty() {
            writeln!(f, "disks:")?;
            for d in &self.disks {
                writeln!(f, "  {d}")?;
            }
        }
        if !self.interfaces.is_empty() {
            writeln!(f, "interfaces:")?;
            for n in &self.interfaces {
                writeln!(
                    f,
                    "  {} {}{}: {}",
                    n.mac.as_deref().unwrap_or("(no mac)"),
                    n.kind,
                    n.on.as_deref()
                        .map(|o| format!(" on {o}"))
                        .unwrap_or_default(),
                    n.handling
                )?;
            }
        }
        match self.network {
            NetworkMode::Bridged => writeln!(
                f,
                "network: bridged (promotion puts the shadow's tap on the primary's bridge)"
            )?,
            NetworkMode::Routed => writeln!(
                f,
                "network: routed (promotion brings the shadow's tap up and points the primary's \
                 /32 host routes at it)"
            )?,
        }
        if self.hands_over_data {
            writeln!(
                f,
                "promotion: fence (the primary's QEMU confirmed gone), attach the data disks, \
                 run promote_commands, then bring the network up"
            )?;
        }
        if let Some(xml) = &self.shadow_xml {
            writeln!(f, "shadow spec:")?;
            writeln!(f, "{xml}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use xot::Xot;

    use super::*;
    use crate::cli::{plan_exit_status, plan_preview, PlanSource};

    const CONFIG: &str = r#"
[daemon]
state_dir = "/var/lib/understudy"

[[protect]]
match = "ledger*"
class = "stateful"

[[protect]]
match = "db*"
class = "db"

[class.stateful]
disk_roles = { vdb = "data", vdc = "data", vdd = "data", vde = "data", sda = "data" }
promote_commands = [["/bin/mount", "LABEL=data", "/data"]]

[class.db]
default_disk_role = "data"
disk_roles = { vda = "system" }

[class.golden]
golden_image = "/var/lib/libvirt/images/golden/db.qcow2"
disk_roles = { vdb = "data" }

[class.routed]
network = "routed"
"#;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/failover/fixtures")
            .join(name)
    }

    struct Setup {
        dir: tempfile::TempDir,
    }

    impl Setup {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("understudy.toml"), CONFIG).unwrap();
            Setup { dir }
        }

        fn config(&self) -> std::path::PathBuf {
            self.dir.path().join("understudy.toml")
        }

        fn plan(&self, xml: &str, class: Option<&str>) -> Result<ShadowPreview, String> {
            plan_preview(&self.config(), PlanSource::File(&fixture(xml)), class)
        }

        fn plan_text(&self, xml: &str, class: Option<&str>) -> Result<ShadowPreview, String> {
            let file = self.dir.path().join("domain.xml");
            std::fs::write(&file, xml).unwrap();
            plan_preview(&self.config(), PlanSource::File(&file), class)
        }
    }

    /// `(element, target dev or MAC or model)` of every device, in order.
    fn devices(xml: &str) -> Vec<(String, String)> {
        let mut xot = Xot::new();
        let doc = xot.parse(xml).expect("output XML parses");
        let root = xot.document_element(doc).unwrap();
        let devices = xot
            .children(root)
            .find(|n| {
                xot.element(*n)
                    .is_some_and(|e| xot.local_name_str(e.name()) == "devices")
            })
            .expect("<devices>");
        let attr_of = |xot: &Xot, node, child: &str, attr: &str| -> Option<String> {
            let c = xot.children(node).find(|n| {
                xot.element(*n)
                    .is_some_and(|e| xot.local_name_str(e.name()) == child)
            })?;
            let name = xot.name(attr)?;
            xot.get_attribute(c, name).map(str::to_string)
        };
        xot.children(devices)
            .filter(|n| xot.is_element(*n))
            .map(|n| {
                let local = xot
                    .local_name_str(xot.element(n).unwrap().name())
                    .to_string();
                let id = attr_of(&xot, n, "target", "dev")
                    .or_else(|| attr_of(&xot, n, "mac", "address"))
                    .or_else(|| attr_of(&xot, n, "target", "name"))
                    .unwrap_or_default();
                (local, id)
            })
            .collect()
    }

    fn disk<'a>(p: &'a ShadowPreview, target: &str) -> &'a DiskPlan {
        p.disks
            .iter()
            .find(|d| d.target == target)
            .unwrap_or_else(|| panic!("no disk {target} in {:?}", p.disks))
    }

    #[test]
    fn a_routed_class_says_its_host_routes_follow_the_shadow() {
        let s = Setup::new();
        let xml = std::fs::read_to_string(fixture("stateful.xml"))
            .unwrap()
            .replace(
                "<interface type='bridge'>\n      <mac address='52:54:00:6d:1f:01'/>\n      <source bridge='br0'/>",
                "<interface type='ethernet'>\n      <mac address='52:54:00:6d:1f:01'/>",
            );
        assert!(xml.contains("<interface type='ethernet'>"));
        let routed = s.plan_text(&xml, Some("routed")).unwrap();
        assert_eq!(routed.network, NetworkMode::Routed);
        let nic = &routed.interfaces[0];
        assert_eq!(nic.kind, "ethernet");
        assert!(nic.handling.contains("/32 host routes"), "{nic:?}");
        let text = routed.to_string();
        assert!(text.contains("network: routed"), "{text}");
        // The same domain in a bridged class: a plain tap, no routes moved.
        let bridged = s.plan_text(&xml, Some("golden")).unwrap();
        assert_eq!(bridged.network, NetworkMode::Bridged);
        assert!(!bridged.interfaces[0].handling.contains("routes"));
        assert!(bridged.to_string().contains("network: bridged"));
    }

    #[test]
    fn stateful_domain_hands_over_every_data_disk_and_keeps_every_other_device() {
        let s = Setup::new();
        let r = s.plan("stateful.xml", None);
        assert_eq!(plan_exit_status(&r), 0, "{r:?}");
        let p = r.unwrap();
        assert_eq!(p.class, "stateful");
        assert!(p.protectable && p.refusal.is_none() && p.hands_over_data);
        for (target, handling, keeps) in [
            ("vda", DiskHandling::Overlay, Some(false)),
            ("vdf", DiskHandling::Overlay, Some(false)),
            ("vdb", DiskHandling::HandedOver, Some(true)),
            ("vdc", DiskHandling::HandedOver, Some(true)),
            ("vdd", DiskHandling::HandedOver, Some(true)),
            ("vde", DiskHandling::HandedOver, Some(true)),
            ("sda", DiskHandling::HandedOver, Some(true)),
            ("vdg", DiskHandling::Shared, None),
            ("sdb", DiskHandling::Shared, None),
            ("sdc", DiskHandling::Empty, None),
        ] {
            let d = disk(&p, target);
            assert_eq!((d.handling, d.keeps_data), (handling, keeps), "{d:?}");
        }
        assert_eq!(
            disk(&p, "vdd").source.as_deref(),
            Some("nbd:ledger1-archive")
        );
        assert_eq!(disk(&p, "vdc").kind, "block");
        // The spec parses, and holds every device of the primary but the handed-over disks.
        let xml = p.shadow_xml.as_deref().unwrap();
        crate::domain_xml::DomainXml::parse(xml).expect("shadow spec parses");
        let primary = std::fs::read_to_string(fixture("stateful.xml")).unwrap();
        let handed: BTreeSet<&str> = ["vdb", "vdc", "vdd", "vde", "sda"].into();
        let expected: Vec<(String, String)> = devices(&primary)
            .into_iter()
            .filter(|(el, id)| !(el == "disk" && handed.contains(id.as_str())))
            .collect();
        assert_eq!(devices(xml), expected);
        assert!(xml.contains("/var/lib/understudy/disks/ledger1-shadow-1-vda.qcow2"));
        assert!(xml.contains("emulator"), "the emulated TPM stays");
        assert!(!xml.contains("ledger1-data.raw") && !xml.contains("ledger1-wal"));
        // The text output says per disk whether a failover keeps its data.
        let text = p.to_string();
        assert!(text.contains("vdb (file disk /var/lib/libvirt/images/ledger1-data.raw): role data: left out of the shadow"), "{text}");
        assert!(
            text.contains("vda (file disk /var/lib/libvirt/images/ledger1.qcow2): role system"),
            "{text}"
        );
        assert!(text.contains("LOSES") && text.contains("KEEPS"), "{text}");
        assert!(text.contains("52:54:00:6d:1f:01 bridge on br0"), "{text}");
        // And so does the JSON.
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["disks"][2]["target"], "vdb");
        assert_eq!(json["disks"][2]["role"], "data");
        assert_eq!(json["disks"][2]["keeps_data"], true);
        assert_eq!(json["disks"][0]["keeps_data"], false);
    }

    #[test]
    fn block_system_disk_needs_a_golden_image_or_is_refused_by_name() {
        let s = Setup::new();
        // As system disks (default class), the first block disk is refused, with both fixes.
        let r = s.plan("stateful.xml", Some("default"));
        assert_eq!(plan_exit_status(&r), 2, "{r:?}");
        let why = r.unwrap().refusal.unwrap();
        assert!(
            why.contains("block disk vdc (/dev/vg0/ledger1-wal)"),
            "{why}"
        );
        assert!(
            why.contains("disk_roles.vdc = \"data\"") && why.contains("golden_image"),
            "{why}"
        );
        // db7: its root is a block device, planned as system: refused.
        let r = s.plan("block_system.xml", None);
        assert_eq!(plan_exit_status(&r), 2, "{r:?}");
        let p = r.unwrap();
        assert!(p.refusal.as_deref().unwrap().contains("vda"), "{p:?}");
        assert_eq!(disk(&p, "vda").handling, DiskHandling::NoOverlay);
        assert!(p
            .to_string()
            .contains("vda (block disk /dev/vg0/db7-root): role system: REFUSED"));
        assert_eq!(disk(&p, "vdb").handling, DiskHandling::HandedOver);
        assert!(p.shadow_xml.is_none());
        // With a golden image the root boots from an overlay of it; the RBD disk is handed over.
        let r = s.plan("block_system.xml", Some("golden"));
        assert_eq!(plan_exit_status(&r), 0, "{r:?}");
        let p = r.unwrap();
        let vda = disk(&p, "vda");
        assert_eq!(vda.handling, DiskHandling::GoldenOverlay);
        assert_eq!(vda.keeps_data, Some(false));
        assert_eq!(
            vda.overlay_base.as_deref(),
            Some(Path::new("/var/lib/libvirt/images/golden/db.qcow2"))
        );
        let spec = crate::domain_xml::DomainXml::parse(p.shadow_xml.as_deref().unwrap()).unwrap();
        let disks = spec.disks();
        assert_eq!(disks.len(), 1);
        assert_eq!(disks[0].kind, DiskKind::File);
        assert!(!p.shadow_xml.unwrap().contains("ceph-mon1"));
    }

    #[test]
    fn passthrough_and_shareable_system_disks_are_refused_naming_the_device() {
        let s = Setup::new();
        let r = s.plan("passthrough.xml", Some("stateful"));
        assert_eq!(plan_exit_status(&r), 2, "{r:?}");
        let why = r.unwrap().refusal.unwrap();
        assert!(
            why.contains("<hostdev") && why.contains("pci 0000:65:00.0"),
            "{why}"
        );

        let r = s.plan("shareable_system.xml", Some("default"));
        assert_eq!(plan_exit_status(&r), 2, "{r:?}");
        let why = r.unwrap().refusal.unwrap();
        assert!(
            why.contains("shareable") && why.contains("target vdb"),
            "{why}"
        );
        // As a data disk the shareable disk is handed over.
        let r = s.plan("shareable_system.xml", Some("golden"));
        assert_eq!(plan_exit_status(&r), 0, "{r:?}");
        assert_eq!(disk(&r.unwrap(), "vdb").handling, DiskHandling::HandedOver);
    }

    #[test]
    fn other_errors_exit_1() {
        let s = Setup::new();
        for bad in [
            "",
            "<domain>",
            "<network><name>x</name></network>",
            "<domain><vcpu>zero</vcpu></domain>",
        ] {
            let r = s.plan_text(bad, None);
            assert_eq!(plan_exit_status(&r), 1, "{bad:?}: {r:?}");
        }
        let r = plan_preview(&s.config(), PlanSource::File(&fixture("nope.xml")), None);
        assert_eq!(plan_exit_status(&r), 1);
        let r = s.plan("stateful.xml", Some("nonesuch"));
        assert!(
            r.as_ref().unwrap_err().contains("no class 'nonesuch'"),
            "{r:?}"
        );
        // A data role on a directory disk cannot be honoured.
        let dir = std::fs::read_to_string(fixture("shareable_system.xml"))
            .unwrap()
            .replace("</devices>", "<disk type='dir' device='disk'><source dir='/srv/x'/><target dev='vdz'/></disk></devices>");
        let r = s.plan_text(&dir, Some("db"));
        assert_eq!(plan_exit_status(&r), 2, "{r:?}");
        assert!(r.unwrap().refusal.unwrap().contains("vdz"));
    }

    /// Every fixture with each element, and each attribute, removed in turn: whatever the
    /// result, planning answers (0, 1 or 2) and never panics.
    #[test]
    fn never_panics_on_mutilated_fixtures() {
        let s = Setup::new();
        let mut runs = 0;
        for name in [
            "stateful.xml",
            "block_system.xml",
            "passthrough.xml",
            "shareable_system.xml",
        ] {
            let text = std::fs::read_to_string(fixture(name)).unwrap();
            let mut xot = Xot::new();
            let doc = xot.parse(&text).unwrap();
            let elements: Vec<_> = xot
                .descendants(doc)
                .filter(|n| xot.is_element(*n))
                .collect();
            for (i, _) in elements.iter().enumerate().skip(1) {
                for drop_attrs in [false, true] {
                    let mut x = Xot::new();
                    let d = x.parse(&text).unwrap();
                    let node = x
                        .descendants(d)
                        .filter(|n| x.is_element(*n))
                        .nth(i)
                        .unwrap();
                    if drop_attrs {
                        let names: Vec<_> = x.attributes(node).keys().collect();
                        for n in names {
                            x.attributes_mut(node).remove(n);
                        }
                    } else {
                        x.remove(node).unwrap();
                    }
                    let out = x.to_string(d).unwrap();
                    for class in [None, Some("stateful"), Some("db"), Some("golden")] {
                        let r = s.plan_text(&out, class);
                        assert!([0, 1, 2].contains(&plan_exit_status(&r)));
                        runs += 1;
                    }
                }
            }
        }
        assert!(runs > 400, "{runs}");
    }

    #[test]
    fn a_data_disk_held_by_a_running_domain_is_found_by_its_source() {
        let xml = std::fs::read_to_string(fixture("stateful.xml")).unwrap();
        let running = vec![
            ("ledger1".to_string(), DomainXml::parse(&xml).unwrap()),
            (
                "other".to_string(),
                DomainXml::parse("<domain type='qemu'><name>other</name><devices/></domain>")
                    .unwrap(),
            ),
        ];
        // File, block and network (NBD, which no lock manager leases) sources.
        assert_eq!(
            disk_holders(&running, "/var/lib/libvirt/images/ledger1-data.raw"),
            [("ledger1", "vdb".to_string())]
        );
        assert_eq!(
            disk_holders(&running, "/dev/vg0/ledger1-wal"),
            [("ledger1", "vdc".to_string())]
        );
        assert_eq!(
            disk_holders(&running, "nbd:ledger1-archive"),
            [("ledger1", "vdd".to_string())]
        );
        // A read-only disk is no writer; an unknown source has no holder.
        assert!(disk_holders(&running, "/var/lib/libvirt/images/tools.raw").is_empty());
        assert!(disk_holders(&running, "nbd:elsewhere").is_empty());
    }

    #[test]
    fn shadow_headroom_stays_within_the_vcpu_limit() {
        let meta = crate::domain_xml::UnderstudyMeta {
            service: "big".to_string(),
            class: "c".to_string(),
            role: crate::domain_xml::Role::Shadow,
            generation: 1,
            state: crate::domain_xml::MemberState::Booting,
            journal: None,
        };
        let plan_for = |max: u32, current: u32| {
            let xml = format!(
                "<domain type='kvm'><name>big</name><vcpu current='{current}'>{max}</vcpu>\
                 <devices/></domain>"
            );
            let primary = DomainXml::parse(&xml).unwrap();
            let layout = plan_disks(&primary, &DiskPolicy::default()).unwrap();
            let uuid = "9b3f7c2e-1a4d-4e5f-8a6b-7c8d9e0f1a2b";
            clone_plan(&primary, &layout, Path::new("/s"), "s", uuid, meta.clone()).vcpu_max
        };
        // Twice the current vCPUs, as long as that stays within what a domain may have.
        assert_eq!(plan_for(8, 2), 8);
        assert_eq!(plan_for(8, 6), 12);
        assert_eq!(plan_for(DOMAIN_VCPUS_MAX, 3000), DOMAIN_VCPUS_MAX);
        assert_eq!(plan_for(3000, 3000), DOMAIN_VCPUS_MAX);
    }
}
