//! libvirt domain XML that round-trips, and the shadow clone of a spec.
//!
//! [`DomainXml`] keeps the whole document in a `xot` tree: unknown elements and attributes,
//! namespaces and their prefixes, comments, and other tools' `<metadata>` children are carried
//! through untouched; only the parts understudy edits change. Typed views ([`VcpuSpec`],
//! [`MemorySpec`], [`InterfaceSpec`], [`DiskSpec`]) are read on demand from the tree.
//!
//! [`shadow_spec`] turns a primary's spec into a shadow's (see [`shadow`] for the rules), and
//! [`UnderstudyMeta`] is understudy's own metadata element.

mod meta;
pub mod shadow;
mod tree;
mod units;

#[cfg(test)]
mod tests;

use std::fmt;
use std::num::ParseIntError;

use xot::{Node, Xot};

pub use meta::{
    MemberState, Role, UnderstudyMeta, META_JOURNAL_MAX, META_NAME_MAX, META_NS, META_PREFIX,
};
pub use shadow::{
    shadow_spec, standby_boot_spec, verify_copy_spec, CloneError, CopyPlan, ShadowPlan,
};

/// Largest domain XML accepted by [`DomainXml::parse`]. Real ones are a few KiB; this bounds
/// memory use on hostile input.
pub const DOMAIN_XML_MAX: usize = 4 * 1024 * 1024;

/// Most vCPUs a domain may have (`<vcpu>`, its maximum): KVM's limit on x86 (`KVM_MAX_VCPUS`)
/// and the most any QEMU machine type accepts. A shadow's `<vcpus>` list gets one element per
/// possible vCPU, so an unbounded count would let a domain definition make the daemon write
/// billions of elements.
pub const DOMAIN_VCPUS_MAX: u32 = 4096;

/// Errors reading or editing domain XML and understudy's metadata element.
#[derive(Debug, thiserror::Error)]
pub enum XmlError {
    /// The text is not well-formed XML.
    #[error("XML is not well-formed (near byte {offset})")]
    Parse {
        /// Byte offset of the problem in the input.
        offset: usize,
        /// What the parser objected to.
        #[source]
        source: xot::ParseError,
    },
    /// A xot tree operation failed.
    #[error("XML tree operation failed")]
    Tree(#[source] xot::Error),
    /// The input is larger than we are willing to parse.
    #[error("{what} is {len} bytes, more than the {limit} byte limit")]
    TooLarge {
        /// What was being parsed.
        what: &'static str,
        /// Its size.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The document element is not libvirt's `<domain>`.
    #[error("expected a libvirt <domain> document, found root element {found}")]
    NotDomain {
        /// Start tag of the root element that was found.
        found: String,
    },
    /// A libvirt status file's document element is not `<domstatus>`, or it holds no
    /// `<domain>`.
    #[error("expected a libvirt <domstatus> with a <domain> inside, found {found}")]
    NotStatus {
        /// Start tag of the element that was found instead.
        found: String,
    },
    /// A number in the document does not parse.
    #[error("{what}: {value:?} is not a valid number")]
    InvalidNumber {
        /// Which element or attribute holds it.
        what: String,
        /// The offending text (clipped).
        value: String,
        /// Why it does not parse.
        #[source]
        source: ParseIntError,
    },
    /// A size has a `unit=` libvirt does not know.
    #[error("<{element}> has unknown unit {unit:?}")]
    InvalidUnit {
        /// Element carrying the unit.
        element: String,
        /// The unit text (clipped).
        unit: String,
    },
    /// A size does not fit in 64 bits of bytes.
    #[error("<{element}> size {value} {unit} overflows")]
    SizeOverflow {
        /// Element carrying the size.
        element: String,
        /// The number.
        value: u64,
        /// Its unit.
        unit: String,
    },
    /// `<vcpu current=...>` is zero or larger than the maximum, or the maximum is zero.
    #[error("<vcpu> current={current} is not within 1..={max}")]
    InvalidVcpus {
        /// Maximum vCPUs (element text).
        max: u32,
        /// Current vCPUs (attribute).
        current: u32,
    },
    /// `<vcpu>` asks for more vCPUs than [`DOMAIN_VCPUS_MAX`].
    #[error("<vcpu> maximum {max} is more than {limit}, the most vCPUs KVM and QEMU support")]
    TooManyVcpus {
        /// Maximum vCPUs (element text).
        max: u32,
        /// [`DOMAIN_VCPUS_MAX`].
        limit: u32,
    },
    /// A `<disk>` has no `<target dev=...>`, which libvirt requires and which identifies disks.
    #[error("disk #{index} ({device}) has no <target dev=...>")]
    MissingDiskTarget {
        /// Position among the domain's disks, from 0.
        index: usize,
        /// Start tag of the disk.
        device: String,
    },
    /// Two `<disk>`s have the same `<target dev=...>`. libvirt refuses such a domain, and the
    /// target is what tells disks apart: a shadow's overlays are planned per target, so both
    /// disks would be given the same overlay.
    #[error("disks #{first} and #{second} both have <target dev='{target}'>")]
    DuplicateDiskTarget {
        /// The shared target (clipped).
        target: String,
        /// Position of the first disk among the domain's disks, from 0.
        first: usize,
        /// Position of the second.
        second: usize,
    },
    /// An element given as understudy metadata is something else.
    #[error("expected <member> in namespace {ns}, found {found}", ns = META_NS)]
    NotMemberElement {
        /// Start tag of what was found.
        found: String,
    },
    /// A required attribute of understudy metadata is missing.
    #[error("understudy metadata lacks the {attribute} attribute")]
    MissingMetaAttribute {
        /// The attribute name.
        attribute: &'static str,
    },
    /// An attribute of understudy metadata has an unacceptable value.
    #[error("understudy metadata {attribute}={value:?} is invalid: expected {expected}")]
    InvalidMetaValue {
        /// The attribute name.
        attribute: &'static str,
        /// The value (clipped).
        value: String,
        /// What would have been accepted.
        expected: &'static str,
    },
    /// An attribute of understudy metadata is longer than allowed.
    #[error("understudy metadata {attribute} is {len} bytes, more than the {limit} byte limit")]
    MetaValueTooLong {
        /// The attribute name.
        attribute: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// A namespace URI holds a `"`, legal in a single-quoted declaration but not where the XML
    /// library writes it back (verbatim, in double quotes): the shadow's XML would not be
    /// well-formed.
    #[error("namespace {prefix:?} has URI {uri:?}, which cannot be written back as XML")]
    UnwritableNamespace {
        /// The declared prefix (empty for a default namespace).
        prefix: String,
        /// The URI (clipped).
        uri: String,
    },
    /// `<metadata>` holds more than one understudy element; libvirt keeps one per namespace, so
    /// the document was edited by hand or corrupted.
    #[error("<metadata> holds {count} understudy member elements, expected at most one")]
    DuplicateMeta {
        /// How many there are.
        count: usize,
    },
}

/// vCPU counts from `<vcpu current='x'>max</vcpu>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuSpec {
    /// Maximum (hot-pluggable up to) vCPUs: the element text. libvirt's default is 1.
    pub max: u32,
    /// vCPUs online at boot: `current=`, defaulting to `max`.
    pub current: u32,
}

/// Memory sizes in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemorySpec {
    /// Boot-time maximum: `<memory>`, or the sum of NUMA cells when the domain has them (libvirt
    /// ignores `<memory>` then). 0 if neither is given.
    pub max_kib: u64,
    /// Balloon target: `<currentMemory>`, defaulting to and clamped at `max_kib` as libvirt does.
    pub current_kib: u64,
}

/// How an `<interface>` is backed (`type=`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InterfaceKind {
    /// A host bridge (`<source bridge=>`).
    Bridge,
    /// A libvirt virtual network (`<source network=>`).
    Network,
    /// macvtap on a host NIC (`<source dev=>`).
    Direct,
    /// A host PCI network function passed through.
    Hostdev,
    /// A vhost-user socket.
    VhostUser,
    /// A vDPA device.
    Vdpa,
    /// A tap device not attached by libvirt.
    Ethernet,
    /// QEMU user-mode networking.
    User,
    /// Anything else, verbatim.
    Other(String),
}

impl InterfaceKind {
    fn parse(s: &str) -> Self {
        match s {
            "bridge" => Self::Bridge,
            "network" => Self::Network,
            "direct" => Self::Direct,
            "hostdev" => Self::Hostdev,
            "vhostuser" => Self::VhostUser,
            "vdpa" => Self::Vdpa,
            "ethernet" => Self::Ethernet,
            "user" => Self::User,
            other => Self::Other(other.to_string()),
        }
    }

    /// The libvirt `type=` string.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Bridge => "bridge",
            Self::Network => "network",
            Self::Direct => "direct",
            Self::Hostdev => "hostdev",
            Self::VhostUser => "vhostuser",
            Self::Vdpa => "vdpa",
            Self::Ethernet => "ethernet",
            Self::User => "user",
            Self::Other(s) => s,
        }
    }
}

impl fmt::Display for InterfaceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One `<interface>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceSpec {
    /// `type=`.
    pub kind: InterfaceKind,
    /// `<mac address=>`, as written.
    pub mac: Option<String>,
    /// `<source bridge=>` (in live XML of a network interface: the network's bridge).
    pub bridge: Option<String>,
    /// `<source network=>`.
    pub network: Option<String>,
    /// `<target dev=>`: the host tap (live XML) or a requested name.
    pub target_dev: Option<String>,
    /// `<model type=>`.
    pub model: Option<String>,
    /// `<link state=>` is not `down` (libvirt's default is up).
    pub link_up: bool,
    /// It has a `<filterref>`: libvirt's nwfilter rules (e.g. `clean-traffic`'s
    /// `no-mac-spoofing`), built for its MAC.
    pub filtered: bool,
}

/// How a `<disk>` is backed (`type=`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskKind {
    /// An image file (`<source file=>`).
    File,
    /// A host block device (`<source dev=>`).
    Block,
    /// A network volume (`<source protocol= name=>`).
    Network,
    /// A storage pool volume (`<source pool= volume=>`).
    Volume,
    /// A host directory as a virtual FAT disk (`<source dir=>`).
    Dir,
    /// Anything else (nvme, vhostuser, ...), verbatim.
    Other(String),
}

impl DiskKind {
    fn parse(s: &str) -> Self {
        match s {
            "file" => Self::File,
            "block" => Self::Block,
            "network" => Self::Network,
            "volume" => Self::Volume,
            "dir" => Self::Dir,
            other => Self::Other(other.to_string()),
        }
    }

    /// The libvirt `type=` string.
    pub fn as_str(&self) -> &str {
        match self {
            Self::File => "file",
            Self::Block => "block",
            Self::Network => "network",
            Self::Volume => "volume",
            Self::Dir => "dir",
            Self::Other(s) => s,
        }
    }
}

impl fmt::Display for DiskKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a `<disk>` appears as in the guest (`device=`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskDevice {
    /// A hard disk (libvirt's default).
    Disk,
    /// A CD-ROM; always read-only.
    Cdrom,
    /// A floppy; writable unless `<readonly/>`.
    Floppy,
    /// A SCSI LUN passed through.
    Lun,
    /// Anything else, verbatim.
    Other(String),
}

impl DiskDevice {
    fn parse(s: &str) -> Self {
        match s {
            "disk" => Self::Disk,
            "cdrom" => Self::Cdrom,
            "floppy" => Self::Floppy,
            "lun" => Self::Lun,
            other => Self::Other(other.to_string()),
        }
    }

    /// The libvirt `device=` string.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Disk => "disk",
            Self::Cdrom => "cdrom",
            Self::Floppy => "floppy",
            Self::Lun => "lun",
            Self::Other(s) => s,
        }
    }
}

impl fmt::Display for DiskDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One `<disk>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// `type=` (default file).
    pub kind: DiskKind,
    /// `device=` (default disk).
    pub device: DiskDevice,
    /// `<driver type=>`: image format such as qcow2 or raw.
    pub driver_type: Option<String>,
    /// Where the data lives: the file, block device or directory path; `protocol:name` for a
    /// network disk; `pool/volume` for a volume. `None` for an empty drive.
    pub source: Option<String>,
    /// `<target dev=>` (guest device name, e.g. `vda`); unique within a domain.
    pub target_dev: String,
    /// `<readonly/>`, or a CD-ROM (which libvirt always makes read-only).
    pub readonly: bool,
    /// `<shareable/>`: meant to be used by several domains at once.
    pub shareable: bool,
}

impl DiskSpec {
    /// A writable image file: what a shadow needs an overlay for (see [`ShadowPlan`]).
    pub fn needs_overlay(&self) -> bool {
        !self.readonly && self.kind == DiskKind::File && self.source.is_some()
    }
}

/// A libvirt domain definition as a round-tripping XML tree.
#[derive(Debug, Clone)]
pub struct DomainXml {
    xot: Xot,
    /// The document node (holds comments before and after `<domain>`).
    doc: Node,
    /// The `<domain>` element.
    root: Node,
}

/// Parses `xml` (at most [`DOMAIN_XML_MAX`] bytes) into a tree: the tree, its document node and
/// its document element.
fn parse_document(xml: &str, what: &'static str) -> Result<(Xot, Node, Node), XmlError> {
    if xml.len() > DOMAIN_XML_MAX {
        return Err(XmlError::TooLarge {
            what,
            len: xml.len(),
            limit: DOMAIN_XML_MAX,
        });
    }
    let mut xot = Xot::new();
    let doc = xot.parse(xml).map_err(|source| XmlError::Parse {
        offset: source.span().start,
        source,
    })?;
    let root = xot.document_element(doc).map_err(XmlError::Tree)?;
    Ok((xot, doc, root))
}

impl DomainXml {
    /// Parses a domain XML document; the root element must be `<domain>`. Numbers that the
    /// typed accessors report (vCPUs, memory sizes), disk targets (present and unique) and
    /// namespace URIs (writable back) are validated here, so the accessors need not fail later.
    pub fn parse(xml: &str) -> Result<Self, XmlError> {
        let (xot, doc, root) = parse_document(xml, "domain XML")?;
        if !tree::is_plain(&xot, root, "domain") {
            return Err(XmlError::NotDomain {
                found: tree::start_tag(&xot, root),
            });
        }
        check_namespaces(&xot, doc)?;
        let dom = DomainXml { xot, doc, root };
        dom.try_vcpus()?;
        dom.try_memory_kib()?;
        let mut targets = std::collections::BTreeMap::new();
        for (index, disk) in dom.disk_nodes().enumerate() {
            let Some(target) = dom.disk_target(disk) else {
                return Err(XmlError::MissingDiskTarget {
                    index,
                    device: tree::start_tag(&dom.xot, disk),
                });
            };
            if let Some(first) = targets.insert(target, index) {
                return Err(XmlError::DuplicateDiskTarget {
                    target: tree::clip(target, 40),
                    first,
                    second: index,
                });
            }
        }
        Ok(dom)
    }

    /// The live definition inside one of libvirt's status files (`<domstatus>` around the
    /// `<domain>` it runs), checked as [`DomainXml::parse`] checks a definition.
    pub fn parse_status(xml: &str) -> Result<Self, XmlError> {
        let (xot, _, root) = parse_document(xml, "domain status XML")?;
        if !tree::is_plain(&xot, root, "domstatus") {
            return Err(XmlError::NotStatus {
                found: tree::start_tag(&xot, root),
            });
        }
        let Some(domain) = tree::child_named(&xot, root, "domain") else {
            return Err(XmlError::NotStatus {
                found: "a <domstatus> without <domain>".into(),
            });
        };
        let text = xot.to_string(domain).map_err(XmlError::Tree)?;
        Self::parse(&text)
    }

    /// The parsed tree and its `<domain>` element, read-only: for a check that must walk the
    /// document without the typed views (the fuzz target counts devices this way, and so needs
    /// no second parse of a document it already holds).
    pub fn tree(&self) -> (&Xot, Node) {
        (&self.xot, self.root)
    }

    /// Serializes the whole document, including comments around `<domain>`.
    pub fn to_xml(&self) -> String {
        // Serialization only fails on an element whose namespace has no prefix in scope. Parsed
        // nodes keep their declarations, and the only namespaced element we create (our
        // metadata) declares its own prefix.
        self.xot
            .to_string(self.doc)
            .expect("BUG: every namespace in a DomainXml tree has a declared prefix")
    }

    /// `<name>`, trimmed.
    pub fn name(&self) -> Option<String> {
        self.child_text("name")
    }

    /// Sets `<name>`, creating it as the first child if missing.
    pub fn set_name(&mut self, n: &str) {
        self.set_child_text("name", n, &[]);
    }

    /// `<uuid>`, trimmed.
    pub fn uuid(&self) -> Option<String> {
        self.child_text("uuid")
    }

    /// Sets `<uuid>`, creating it after `<name>` if missing.
    pub fn set_uuid(&mut self, u: &str) {
        self.set_child_text("uuid", u, &["name"]);
    }

    /// `<domain type=>`: the hypervisor driver, e.g. `kvm` or `qemu`.
    pub fn domain_type(&self) -> Option<String> {
        tree::attr(&self.xot, self.root, "type").map(str::to_string)
    }

    /// `<domain id=>`: present only in live XML.
    pub fn live_id(&self) -> Option<String> {
        tree::attr(&self.xot, self.root, "id").map(str::to_string)
    }

    /// vCPU counts. A missing `<vcpu>` means 1, libvirt's default.
    pub fn vcpus(&self) -> VcpuSpec {
        // Validated in `parse`, and edits only ever write valid values.
        self.try_vcpus().unwrap_or(VcpuSpec { max: 1, current: 1 })
    }

    /// Memory sizes in KiB, honouring `unit=` and NUMA cells (see [`MemorySpec`]).
    pub fn memory_kib(&self) -> MemorySpec {
        // Validated in `parse`, and edits only ever write valid values.
        self.try_memory_kib().unwrap_or(MemorySpec {
            max_kib: 0,
            current_kib: 0,
        })
    }

    /// All `<devices><interface>`s in document order.
    pub fn interfaces(&self) -> Vec<InterfaceSpec> {
        self.device_nodes("interface")
            .map(|n| self.interface_spec(n))
            .collect()
    }

    /// All `<devices><disk>`s in document order.
    pub fn disks(&self) -> Vec<DiskSpec> {
        self.disk_nodes()
            .filter_map(|n| self.disk_spec(n))
            .collect()
    }

    /// The `<disk>` with `<target dev=target>`, serialized on its own for
    /// `virDomainAttachDeviceFlags`: live-only details (`<alias>` names libvirt generated,
    /// `<source index=>`) are dropped; its address is kept, so the guest finds it where it was.
    pub fn disk_xml(&self, target: &str) -> Option<String> {
        let disk = self
            .disk_nodes()
            .find(|n| self.disk_target(*n) == Some(target))?;
        // A detached copy in a scratch tree: serializing an attached element would also emit
        // every namespace declared on <domain>.
        let mut xot = self.xot.clone();
        let copy = xot.clone_node(disk);
        let generated: Vec<Node> = tree::children_named(&xot, copy, "alias")
            .filter(|a| !tree::attr(&xot, *a, "name").is_some_and(|n| n.starts_with("ua-")))
            .collect();
        for a in generated {
            tree::remove(&mut xot, a);
        }
        if let Some(source) = tree::child_named(&xot, copy, "source") {
            tree::remove_attr(&mut xot, source, "index");
        }
        xot.to_string(copy).ok()
    }

    /// `<backend type=>` of every `<tpm>` (`emulator`, `passthrough`, `external`).
    pub fn tpm_backends(&self) -> Vec<String> {
        self.device_nodes("tpm")
            .map(|n| {
                tree::child_attr(&self.xot, n, "backend", "type")
                    .unwrap_or("")
                    .to_string()
            })
            .collect()
    }

    /// `(mac, target dev)` of every interface that has both, i.e. the host taps of a running
    /// domain as its live XML reports them.
    pub fn live_interface_taps(&self) -> Vec<(String, String)> {
        self.interfaces()
            .into_iter()
            .filter_map(|i| Some((i.mac?, i.target_dev?)))
            .collect()
    }

    /// Drops `<memoryBacking><nosharepages/>`, so QEMU leaves guest memory mergeable by the
    /// host's KSM. Returns whether there was one.
    pub fn allow_page_sharing(&mut self) -> bool {
        let Some(backing) = tree::child_named(&self.xot, self.root, "memoryBacking") else {
            return false;
        };
        let Some(nosharing) = tree::child_named(&self.xot, backing, "nosharepages") else {
            return false;
        };
        tree::remove(&mut self.xot, nosharing);
        if tree::is_bare(&self.xot, backing) {
            tree::remove(&mut self.xot, backing);
        }
        true
    }

    /// Gives interface number `i` (document order) the MAC `mac_of(i)` and drops any `<target>`
    /// it asks for: a pooled shadow stands by with the template's NICs on placeholder MACs (see
    /// `failover::identity::placeholder_mac`). Returns how many there were.
    pub fn set_interface_macs(&mut self, mac_of: impl Fn(usize) -> String) -> usize {
        let ifaces: Vec<Node> = self.device_nodes("interface").collect();
        for (i, iface) in ifaces.iter().enumerate() {
            let mac = tree::ensure_child(&mut self.xot, *iface, "mac");
            tree::set_attr(&mut self.xot, mac, "address", &mac_of(i));
            let targets: Vec<Node> = tree::children_named(&self.xot, *iface, "target").collect();
            for t in targets {
                tree::remove(&mut self.xot, t);
            }
        }
        ifaces.len()
    }

    /// Sets the MAC of the interface whose MAC is `from` (case-insensitive) to `to`. Returns
    /// false (and changes nothing) if no interface has MAC `from`.
    pub fn rename_interface_mac(&mut self, from: &str, to: &str) -> bool {
        let found = self.device_nodes("interface").find_map(|n| {
            let mac = tree::child_named(&self.xot, n, "mac")?;
            tree::attr(&self.xot, mac, "address")
                .is_some_and(|m| m.eq_ignore_ascii_case(from))
                .then_some(mac)
        });
        match found {
            Some(mac) => {
                tree::set_attr(&mut self.xot, mac, "address", to);
                true
            }
            None => false,
        }
    }

    /// Sets `<link state='up'|'down'/>` on every interface.
    pub fn set_interfaces_link(&mut self, up: bool) {
        let ifaces: Vec<Node> = self.device_nodes("interface").collect();
        for iface in ifaces {
            set_link(&mut self.xot, iface, up);
        }
    }

    /// The single `<interface>` whose MAC is `mac` (case-insensitive), serialized with its link
    /// state set, for `virDomainUpdateDeviceFlags`. `None` if no interface has that MAC.
    pub fn interface_xml_with_link(&self, mac: &str, up: bool) -> Option<String> {
        let iface = self.device_nodes("interface").find(|n| {
            tree::child_attr(&self.xot, *n, "mac", "address")
                .is_some_and(|m| m.eq_ignore_ascii_case(mac))
        })?;
        // Work on a detached copy in a scratch tree: serializing an attached element would also
        // emit every namespace declared on <domain>.
        let (mut xot, copy) = tree::copy_subtree(&self.xot, iface);
        set_link(&mut xot, copy, up);
        xot.to_string(copy).ok()
    }

    /// Sets `freePageReporting='on'` on the virtio `<memballoon>`: the guest hands the pages it
    /// frees back to the host. Returns false (and changes nothing) without a virtio balloon.
    pub fn enable_free_page_reporting(&mut self) -> bool {
        let balloon = self
            .device_nodes("memballoon")
            .find(|n| tree::attr(&self.xot, *n, "model") == Some("virtio"));
        match balloon {
            Some(b) => {
                tree::set_attr(&mut self.xot, b, "freePageReporting", "on");
                true
            }
            None => false,
        }
    }

    /// understudy's metadata element, if present.
    pub fn understudy_meta(&self) -> Result<Option<UnderstudyMeta>, XmlError> {
        let nodes = self.meta_nodes();
        match nodes.as_slice() {
            [] => Ok(None),
            [one] => UnderstudyMeta::from_node(&self.xot, *one).map(Some),
            more => Err(XmlError::DuplicateMeta { count: more.len() }),
        }
    }

    /// Inserts or replaces understudy's metadata element inside `<metadata>`, creating
    /// `<metadata>` if missing. Other tools' metadata is left as is. Control characters in text
    /// fields are written as U+FFFD (see [`UnderstudyMeta::validate`]).
    pub fn set_understudy_meta(&mut self, m: &UnderstudyMeta) {
        let metadata = match tree::child_named(&self.xot, self.root, "metadata") {
            Some(md) => md,
            None => {
                let md = tree::new_element(&mut self.xot, "metadata");
                self.insert_top_level(md, &["name", "uuid", "genid", "title", "description"]);
                md
            }
        };
        let ours: Vec<Node> = tree::element_children(&self.xot, metadata)
            .filter(|n| matches!(tree::element_name(&self.xot, *n), Some((_, META_NS))))
            .collect();
        for n in ours {
            tree::remove(&mut self.xot, n);
        }
        let el = m.build_node(&mut self.xot);
        tree::append_element(&mut self.xot, metadata, el);
    }

    // ---- internals shared with `shadow` ----

    fn child_text(&self, local: &str) -> Option<String> {
        tree::child_named(&self.xot, self.root, local)
            .map(|n| tree::text(&self.xot, n).trim().to_string())
    }

    /// Sets the text of top-level `<local>`, creating it after the last of `after` present
    /// (or as the first child).
    fn set_child_text(&mut self, local: &str, value: &str, after: &[&str]) {
        let node = match tree::child_named(&self.xot, self.root, local) {
            Some(n) => n,
            None => {
                let n = tree::new_element(&mut self.xot, local);
                self.insert_top_level(n, after);
                n
            }
        };
        tree::set_text(&mut self.xot, node, value);
    }

    /// Inserts a new top-level element after the last present of `after`, else first.
    fn insert_top_level(&mut self, new: Node, after: &[&str]) {
        let anchor = tree::element_children(&self.xot, self.root)
            .filter(|n| after.iter().any(|a| tree::is_plain(&self.xot, *n, a)))
            .last();
        let first = tree::element_children(&self.xot, self.root).next();
        match (anchor, first) {
            (Some(a), _) => tree::insert_after(&mut self.xot, a, new),
            (None, Some(first)) => tree::insert_before(&mut self.xot, first, new),
            (None, None) => tree::append_element(&mut self.xot, self.root, new),
        }
    }

    fn devices(&self) -> Option<Node> {
        tree::child_named(&self.xot, self.root, "devices")
    }

    /// `<devices>` children named `local`.
    fn device_nodes<'a>(&'a self, local: &'a str) -> impl Iterator<Item = Node> + 'a {
        self.devices()
            .into_iter()
            .flat_map(move |d| tree::children_named(&self.xot, d, local))
    }

    fn disk_nodes(&self) -> impl Iterator<Item = Node> + '_ {
        self.device_nodes("disk")
    }

    fn disk_target(&self, disk: Node) -> Option<&str> {
        tree::child_attr(&self.xot, disk, "target", "dev").filter(|d| !d.is_empty())
    }

    /// Our metadata elements (normally zero or one).
    fn meta_nodes(&self) -> Vec<Node> {
        let Some(md) = tree::child_named(&self.xot, self.root, "metadata") else {
            return Vec::new();
        };
        tree::element_children(&self.xot, md)
            .filter(|n| tree::element_name(&self.xot, *n) == Some((meta::META_ELEMENT, META_NS)))
            .collect()
    }

    fn try_vcpus(&self) -> Result<VcpuSpec, XmlError> {
        let Some(vcpu) = tree::child_named(&self.xot, self.root, "vcpu") else {
            return Ok(VcpuSpec { max: 1, current: 1 });
        };
        let parse = |what: &str, s: &str| {
            s.trim()
                .parse::<u32>()
                .map_err(|source| XmlError::InvalidNumber {
                    what: what.to_string(),
                    value: tree::clip(s, 40),
                    source,
                })
        };
        let max = parse("<vcpu>", &tree::text(&self.xot, vcpu))?;
        let current = match tree::attr(&self.xot, vcpu, "current") {
            Some(c) => parse("<vcpu current=>", c)?,
            None => max,
        };
        if max == 0 || current == 0 || current > max {
            return Err(XmlError::InvalidVcpus { max, current });
        }
        if max > DOMAIN_VCPUS_MAX {
            return Err(XmlError::TooManyVcpus {
                max,
                limit: DOMAIN_VCPUS_MAX,
            });
        }
        Ok(VcpuSpec { max, current })
    }

    /// Sum of `<cpu><numa><cell memory=>` in KiB, `None` without NUMA cells.
    fn numa_memory_kib(&self) -> Result<Option<u64>, XmlError> {
        let Some(numa) = tree::child_named(&self.xot, self.root, "cpu")
            .and_then(|cpu| tree::child_named(&self.xot, cpu, "numa"))
        else {
            return Ok(None);
        };
        let mut total: Option<u64> = None;
        for cell in tree::children_named(&self.xot, numa, "cell") {
            let Some(mem) = tree::attr(&self.xot, cell, "memory") else {
                continue;
            };
            let kib = units::parse_kib("cell", mem, tree::attr(&self.xot, cell, "unit"))?;
            let sum =
                total
                    .unwrap_or(0)
                    .checked_add(kib)
                    .ok_or_else(|| XmlError::SizeOverflow {
                        element: "cell".to_string(),
                        value: kib,
                        unit: "KiB".to_string(),
                    })?;
            total = Some(sum);
        }
        Ok(total)
    }

    fn try_memory_kib(&self) -> Result<MemorySpec, XmlError> {
        let sized = |local: &str| -> Result<Option<u64>, XmlError> {
            tree::child_named(&self.xot, self.root, local)
                .map(|n| {
                    units::parse_kib(
                        local,
                        &tree::text(&self.xot, n),
                        tree::attr(&self.xot, n, "unit"),
                    )
                })
                .transpose()
        };
        let memory = sized("memory")?;
        let current = sized("currentMemory")?;
        let max_kib = match self.numa_memory_kib()? {
            Some(numa) => numa,
            None => memory.unwrap_or(0),
        };
        let current_kib = current.unwrap_or(max_kib).min(max_kib);
        Ok(MemorySpec {
            max_kib,
            current_kib,
        })
    }

    fn interface_spec(&self, iface: Node) -> InterfaceSpec {
        let x = &self.xot;
        let owned = |s: Option<&str>| s.map(str::to_string);
        InterfaceSpec {
            kind: InterfaceKind::parse(tree::attr(x, iface, "type").unwrap_or("")),
            mac: owned(tree::child_attr(x, iface, "mac", "address")),
            bridge: owned(tree::child_attr(x, iface, "source", "bridge")),
            network: owned(tree::child_attr(x, iface, "source", "network")),
            target_dev: owned(tree::child_attr(x, iface, "target", "dev")),
            model: owned(tree::child_attr(x, iface, "model", "type")),
            link_up: tree::child_attr(x, iface, "link", "state") != Some("down"),
            filtered: tree::child_named(x, iface, "filterref").is_some(),
        }
    }

    fn disk_spec(&self, disk: Node) -> Option<DiskSpec> {
        let x = &self.xot;
        let kind = DiskKind::parse(tree::attr(x, disk, "type").unwrap_or("file"));
        let device = DiskDevice::parse(tree::attr(x, disk, "device").unwrap_or("disk"));
        let source = tree::child_named(x, disk, "source").and_then(|s| {
            let a = |n: &str| tree::attr(x, s, n);
            match &kind {
                DiskKind::File => a("file").map(str::to_string),
                DiskKind::Block => a("dev").map(str::to_string),
                DiskKind::Dir => a("dir").map(str::to_string),
                DiskKind::Network => match (a("protocol"), a("name")) {
                    (Some(p), Some(n)) => Some(format!("{p}:{n}")),
                    (p, n) => p.or(n).map(str::to_string),
                },
                DiskKind::Volume => match (a("pool"), a("volume")) {
                    (Some(p), Some(v)) => Some(format!("{p}/{v}")),
                    (p, v) => p.or(v).map(str::to_string),
                },
                DiskKind::Other(_) => a("file")
                    .or_else(|| a("dev"))
                    .or_else(|| a("path"))
                    .map(str::to_string),
            }
        });
        Some(DiskSpec {
            driver_type: tree::child_attr(x, disk, "driver", "type").map(str::to_string),
            source,
            target_dev: self.disk_target(disk)?.to_string(),
            readonly: device == DiskDevice::Cdrom
                || tree::child_named(x, disk, "readonly").is_some(),
            shareable: tree::child_named(x, disk, "shareable").is_some(),
            kind,
            device,
        })
    }
}

/// Refuses namespace URIs that `to_xml` could not write back: xot 0.31 writes declarations
/// verbatim between double quotes. (It also keeps entity references in them unexpanded, so an
/// `&` read is an `&amp;` written, which reads back the same; a raw `<` cannot be read at all.)
fn check_namespaces(xot: &Xot, doc: Node) -> Result<(), XmlError> {
    for node in xot.descendants(doc) {
        for (prefix, ns) in xot.namespace_declarations(node) {
            let uri = xot.namespace_str(ns);
            if uri.contains(['"', '<']) {
                return Err(XmlError::UnwritableNamespace {
                    prefix: xot.prefix_str(prefix).to_string(),
                    uri: tree::clip(uri, 120),
                });
            }
        }
    }
    Ok(())
}

/// Sets `<link state=>` on one interface element, creating `<link>` if needed.
/// A device element (`<interface>`, `<disk>`, ...) as XML again, without its direct children
/// named in `names`: e.g. the `<address>`, `<alias>` and `<target>` one domain's definition gave
/// a NIC, before it is plugged into another domain whose own layout decides them.
pub fn without_children(device_xml: &str, names: &[&str]) -> Result<String, XmlError> {
    if device_xml.len() > DOMAIN_XML_MAX {
        return Err(XmlError::TooLarge {
            what: "device XML",
            len: device_xml.len(),
            limit: DOMAIN_XML_MAX,
        });
    }
    let mut xot = Xot::new();
    let doc = xot.parse(device_xml).map_err(|source| XmlError::Parse {
        offset: source.span().start,
        source,
    })?;
    let root = xot.document_element(doc).map_err(XmlError::Tree)?;
    let drop: Vec<Node> = tree::element_children(&xot, root)
        .filter(|c| names.iter().any(|n| tree::is_plain(&xot, *c, n)))
        .collect();
    for c in drop {
        tree::remove(&mut xot, c);
    }
    xot.to_string(root).map_err(XmlError::Tree)
}

fn set_link(xot: &mut Xot, iface: Node, up: bool) {
    let link = tree::ensure_child(xot, iface, "link");
    tree::set_attr(xot, link, "state", if up { "up" } else { "down" });
}
