//! Domain XML written by other tools: parse, plan and clone a shadow (a dry run: the plan is
//! made as `failover::shadow` makes it, nothing is written), the standby boot variant, and
//! understudy's metadata element. An input whose document element is `<domstatus>` is read as
//! libvirt's status file (`DomainXml::parse_status`, which the attach's single-writer check
//! reads), and the definition it wraps goes through the same checks.
//!
//! Properties: a parsed document reserializes to one that parses to the same typed views; the
//! typed views stay within libvirt's rules (1 <= current <= max vCPUs, balloon <= maximum); a
//! clone keeps every device it does not refuse, in order, never shares a writable image with
//! the primary or between two of its disks, and carries the plan's identity, sizes and
//! metadata; a refusal names a device element that is in the input.
//!
//! Parsing costs most of an input's CPU (instrumented as AFL runs it), so no document is
//! parsed twice for one property: when the clone succeeds, the shadow's text is the input's
//! tree serialized with the clone's edits, and its parse is compared with the input's views
//! field by field (every field the clone does not rewrite must be equal), which is the round
//! trip's check; only an input the clone refuses gets a round trip of its own. The boot
//! variant is parsed only when it differs from the shadow (a bridge or network NIC).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use understudy::domain_xml::{
    shadow_spec, standby_boot_spec, CloneError, DiskKind, DomainXml, InterfaceKind, InterfaceSpec,
    UnderstudyMeta, XmlError,
};
use understudy::failover::plan::DiskPolicy;
use understudy::failover::record::Tier;
use understudy::failover::shadow::{shadow_plan, ShadowRequest};
use understudy::failover::standby::StandbyMemory;

/// A request as the daemon makes one for generation 7 of service `svc`.
pub fn request(primary: &str) -> ShadowRequest {
    ShadowRequest {
        service: "svc".to_string(),
        class: "default".to_string(),
        primary: primary.to_string(),
        name: "svc-shadow-7".to_string(),
        generation: 7,
        state_dir: PathBuf::from("/var/lib/understudy-fuzz"),
        boot_timeout: Duration::from_secs(180),
        agent_timeout: Duration::from_secs(1),
        agent_max_reply: 1 << 20,
        warmup: Vec::new(),
        disks: DiskPolicy::default(),
        primary_xml: None,
        standby: StandbyMemory::default(),
        tier: Tier::Paused,
        pooled: false,
    }
}

/// The shadow's UUID in every plan.
pub const UUID: &str = "6f1d3a52-0c8e-4b7e-9d55-0123456789ab";

/// Runs one input.
pub fn check(data: &[u8]) {
    let xml = crate::text(data);
    let dom = match DomainXml::parse(&xml) {
        Ok(d) => d,
        // A libvirt status file: its own mode, chosen by the document element so that the
        // queue's definitions cost no extra parse.
        Err(XmlError::NotDomain { found }) if found.starts_with("<domstatus") => {
            match DomainXml::parse_status(&xml) {
                Ok(d) => d,
                Err(e) => return check_status_error(&xml, &e),
            }
        }
        Err(e) => {
            check_meta(&xml);
            return check_parse_error(&xml, &e);
        }
    };
    check_views(&dom);

    for iface in dom.interfaces() {
        if let Some(mac) = &iface.mac {
            let one = dom
                .interface_xml_with_link(mac, true)
                .unwrap_or_else(|| panic!("interface with MAC {mac:?} not found by its MAC"));
            assert!(one.contains("<interface"), "not an interface: {one}");
        }
    }

    let primary_name = dom.name().unwrap_or_else(|| "primary".to_string());
    // Every writable disk is a system disk under the default roles: planning cannot fail.
    let (plan, _) = shadow_plan(&dom, &request(&primary_name), UUID)
        .unwrap_or_else(|e| panic!("default disk roles refused: {e}"));
    assert!(plan.vcpu_max >= dom.vcpus().max, "plan lowers vCPUs");
    assert!(
        plan.memory_max_kib >= dom.memory_kib().max_kib,
        "plan lowers memory"
    );
    match shadow_spec(&dom, &plan) {
        Ok(shadow) => check_clone(&dom, &plan, &shadow),
        Err(e) => {
            check_clone_error(&xml, &dom, &e);
            check_round_trip(&dom);
        }
    }
}

/// The input serialized and parsed again has the same typed views. For an input the clone
/// refuses: otherwise [`check_clone`] checks the same on the shadow's text.
fn check_round_trip(dom: &DomainXml) {
    let again = DomainXml::parse(&dom.to_xml())
        .unwrap_or_else(|e| panic!("serialized domain does not parse again: {e}"));
    assert_eq!(again.vcpus(), dom.vcpus(), "vCPUs change on a round trip");
    assert_eq!(
        again.memory_kib(),
        dom.memory_kib(),
        "memory changes on a round trip"
    );
    assert_eq!(
        again.interfaces(),
        dom.interfaces(),
        "interfaces change on a round trip"
    );
    assert_eq!(again.disks(), dom.disks(), "disks change on a round trip");
    assert_eq!(again.name(), dom.name(), "name changes on a round trip");
}

/// The metadata reader on the input. Only for inputs that are not a domain: a text that parses
/// as a `<domain>` document is, to the same XML parser, a document whose root is not
/// `<member>` in understudy's namespace, which the reader refuses (and a refusal has no
/// property to check here), so running it on such a text would only cost one more parse.
fn check_meta(xml: &str) {
    if let Ok(m) = UnderstudyMeta::from_libvirt_xml(xml) {
        let back = UnderstudyMeta::from_libvirt_xml(&m.to_libvirt_xml())
            .unwrap_or_else(|e| panic!("metadata {m:?} does not read back: {e}"));
        assert_eq!(back, m, "metadata changes on a round trip");
    }
}

fn check_parse_error(xml: &str, e: &XmlError) {
    let msg = e.to_string();
    assert!(!msg.is_empty());
    match e {
        XmlError::Parse { offset, .. } => assert!(*offset <= xml.len(), "offset past the input"),
        XmlError::NotDomain { found } => assert!(found.starts_with('<'), "{found}"),
        XmlError::InvalidNumber { value, .. } => {
            assert!(value.chars().count() <= 41, "unclipped value in {msg}")
        }
        XmlError::TooManyVcpus { max, limit } => assert!(max > limit, "{msg}"),
        XmlError::MissingDiskTarget { device, .. } => {
            assert!(device.starts_with("<disk"), "{device}")
        }
        _ => {}
    }
}

/// `parse_status` on a well-formed document (the plain parse got as far as its document
/// element) whose element is named `domstatus`: the outer parse cannot fail, and the inner
/// `<domain>` is xot's own serialization of an element of the input, which must parse again
/// as XML and as a `<domain>`; what is left is a refusal of the wrapper or of the definition.
fn check_status_error(xml: &str, e: &XmlError) {
    let msg = e.to_string();
    match e {
        XmlError::NotStatus { found } => assert!(
            found.starts_with('<') || found == "a <domstatus> without <domain>",
            "{msg}"
        ),
        XmlError::Parse { .. } | XmlError::NotDomain { .. } | XmlError::Tree(_) => {
            panic!("the <domain> of a well-formed status file does not parse again: {msg}")
        }
        _ => check_parse_error(xml, e),
    }
}

fn check_views(dom: &DomainXml) {
    let v = dom.vcpus();
    assert!(v.current >= 1 && v.current <= v.max, "vCPUs {v:?}");
    let m = dom.memory_kib();
    assert!(m.current_kib <= m.max_kib, "memory {m:?}");
    let mut targets = BTreeSet::new();
    for d in dom.disks() {
        assert!(!d.target_dev.is_empty(), "disk without target: {d:?}");
        targets.insert(d.target_dev.clone());
    }
    for (mac, tap) in dom.live_interface_taps() {
        assert!(!mac.is_empty() || !tap.is_empty());
    }
}

/// Element children of `<devices>` by local name (namespace-less ones, which the clone
/// handles), read with xot's own calls, independently of understudy's tree helpers. The tree
/// is the one `DomainXml::parse` built from the text (a plain xot parse, unchanged by the
/// checks it runs), so a second parse of the same text would read the same tree; skipping
/// it saves two of the seven parses an input used to cost here.
fn device_counts(dom: &DomainXml) -> BTreeMap<String, usize> {
    let (xot, root) = dom.tree();
    let mut counts = BTreeMap::new();
    let devices = xot.children(root).find(|n| {
        xot.element(*n)
            .is_some_and(|e| xot.name_ns_str(e.name()) == ("devices", ""))
    });
    if let Some(devices) = devices {
        for n in xot.children(devices) {
            if let Some(e) = xot.element(n) {
                let (local, ns) = xot.name_ns_str(e.name());
                if ns.is_empty() {
                    *counts.entry(local.to_string()).or_insert(0) += 1;
                }
            }
        }
    }
    counts
}

fn check_clone(primary: &DomainXml, plan: &understudy::domain_xml::ShadowPlan, shadow: &DomainXml) {
    let text = shadow.to_xml();
    let reparsed =
        DomainXml::parse(&text).unwrap_or_else(|e| panic!("shadow spec does not parse: {e}"));
    assert_eq!(shadow.name().as_deref(), Some(plan.name.as_str()));
    assert_eq!(shadow.uuid().as_deref(), Some(plan.uuid.as_str()));
    assert_eq!(shadow.live_id(), None, "shadow keeps the primary's live id");
    assert_eq!(
        device_counts(primary),
        device_counts(&reparsed),
        "the clone dropped or added a device"
    );

    // Interfaces: the same NICs in the same order, held down, without the primary's tap, and
    // otherwise as they were (type, MAC, bridge, network, model).
    let (pi, si) = (primary.interfaces(), reparsed.interfaces());
    assert_eq!(pi.len(), si.len());
    for (p, s) in pi.iter().zip(&si) {
        assert!(!s.link_up, "shadow NIC {s:?} is up");
        assert_eq!(s.target_dev, None, "shadow NIC keeps the primary's tap");
        let expected = InterfaceSpec {
            link_up: false,
            target_dev: None,
            ..p.clone()
        };
        assert_eq!(s, &expected, "shadow NIC differs from the primary's");
    }

    // Disks: same targets in the same order; no writable image shared with the primary or
    // between two disks of the shadow.
    let (pd, sd) = (primary.disks(), reparsed.disks());
    assert_eq!(
        pd.iter().map(|d| &d.target_dev).collect::<Vec<_>>(),
        sd.iter().map(|d| &d.target_dev).collect::<Vec<_>>()
    );
    let primary_images: BTreeSet<&String> = pd.iter().filter_map(|d| d.source.as_ref()).collect();
    let mut written = BTreeSet::new();
    for (p, s) in pd.iter().zip(&sd) {
        assert_eq!(
            p.readonly, s.readonly,
            "disk {} changed read-only",
            p.target_dev
        );
        assert_eq!(
            (&p.device, p.shareable),
            (&s.device, s.shareable),
            "disk {} changed",
            p.target_dev
        );
        if !p.needs_overlay() {
            // Read-only or empty: shared as is.
            assert_eq!(p, s, "disk {} changed", p.target_dev);
            continue;
        }
        if let Some(src) = &s.source {
            assert_eq!(s.kind, DiskKind::File, "writable non-file disk kept: {s:?}");
            assert!(
                !primary_images.contains(src),
                "shadow disk {} writes the primary's image {src}",
                s.target_dev
            );
            assert!(
                written.insert(src.clone()),
                "two writable disks of the shadow write {src}"
            );
            assert_eq!(s.driver_type.as_deref(), Some("qcow2"));
        }
    }

    let (pv, sv) = (primary.vcpus(), reparsed.vcpus());
    assert_eq!(sv.max, pv.max.max(plan.vcpu_max), "vCPU maximum");
    assert_eq!(sv.current, pv.current, "current vCPUs");
    let (pm, sm) = (primary.memory_kib(), reparsed.memory_kib());
    assert_eq!(
        sm.max_kib,
        pm.max_kib.max(plan.memory_max_kib),
        "memory maximum"
    );
    assert_eq!(sm.current_kib, pm.current_kib, "balloon");
    assert_eq!(
        reparsed.understudy_meta().expect("metadata reads"),
        Some(plan.meta.clone())
    );

    // The boot variant keeps every NIC, on no bridge. Without a bridge or network NIC it is the
    // shadow unchanged: its text must be the shadow's (parsed above).
    let boot = standby_boot_spec(shadow);
    let boot_text = boot.to_xml();
    if !si
        .iter()
        .any(|s| matches!(s.kind, InterfaceKind::Bridge | InterfaceKind::Network))
    {
        assert_eq!(
            boot_text, text,
            "boot variant differs without a bridged NIC"
        );
        return;
    }
    let boot = DomainXml::parse(&boot_text)
        .unwrap_or_else(|e| panic!("standby boot spec does not parse: {e}"));
    let bi = boot.interfaces();
    assert_eq!(bi.len(), si.len());
    for (b, s) in bi.iter().zip(&si) {
        assert_eq!(b.mac, s.mac);
        if matches!(s.kind, InterfaceKind::Bridge | InterfaceKind::Network) {
            assert_eq!(b.kind, InterfaceKind::Ethernet);
            assert_eq!(
                (&b.bridge, &b.network),
                (&None, &None),
                "boot NIC on a bridge"
            );
        }
    }
}

fn check_clone_error(xml: &str, primary: &DomainXml, e: &CloneError) {
    let msg = e.to_string();
    match e {
        CloneError::Unclonable { device, reason } => {
            assert!(!reason.is_empty());
            let local: String = device
                .strip_prefix('<')
                .unwrap_or_else(|| panic!("refusal names no element: {msg}"))
                .chars()
                .take_while(|c| !c.is_whitespace() && *c != '>')
                .collect();
            assert!(
                xml.contains(&format!("<{local}")) || xml.contains(&format!(":{local}")),
                "refused device {device} is not in the input"
            );
        }
        CloneError::MissingOverlay { target, .. }
        | CloneError::UnexpectedOverlay { target, .. }
        | CloneError::UnexpectedDataDisk { target, .. }
        | CloneError::NoImageForSystemDisk { target, .. } => {
            assert!(
                primary.disks().iter().any(|d| &d.target_dev == target),
                "{msg}: no disk has target {target}"
            );
        }
        CloneError::InvalidPlan { field, .. } => {
            // The plan is made from the primary: only a name or UUID collision can spoil it.
            assert!(matches!(*field, "name" | "uuid"), "{msg}");
        }
        CloneError::CpuTopology { .. } | CloneError::NumaMemory { .. } | CloneError::Xml(_) => {}
    }
}
