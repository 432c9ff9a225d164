//! Tests against `virsh dumpxml`-style fixtures in `fixtures/`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use xot::{Node, Xot};

use super::shadow::BRIDGE_ONLY_CHILDREN;
use super::tree;
use super::*;

const FULL: &str = include_str!("fixtures/full.xml");
const LIVE: &str = include_str!("fixtures/live.xml");
const HOSTDEV: &str = include_str!("fixtures/hostdev.xml");
const DIRECT: &str = include_str!("fixtures/direct.xml");
const BLOCK_DISK: &str = include_str!("fixtures/block_disk.xml");
const MALFORMED: &str = include_str!("fixtures/malformed.xml");
const NETWORK: &str = include_str!("fixtures/network.xml");

const QEMU_NS: &str = "http://libvirt.org/schemas/domain/qemu/1.0";
const NOVA_NS: &str = "http://openstack.org/xmlns/libvirt/nova/1.1";

fn parse(xml: &str) -> DomainXml {
    DomainXml::parse(xml).expect("fixture parses")
}

/// Canonical form of a subtree: names with namespace URIs (prefixes and where namespaces are
/// declared do not matter), attributes sorted, whitespace-only text dropped, other text trimmed,
/// comments kept.
fn canon(xot: &Xot, node: Node, out: &mut String) {
    if let Some((local, ns)) = tree::element_name(xot, node) {
        out.push_str(&format!("<{{{ns}}}{local}"));
        let mut attrs: Vec<(String, String, String)> = xot
            .attributes(node)
            .iter()
            .map(|(name, value)| {
                let (l, n) = xot.name_ns_str(name);
                (n.to_string(), l.to_string(), value.clone())
            })
            .collect();
        attrs.sort();
        for (n, l, v) in attrs {
            out.push_str(&format!(" {{{n}}}{l}={v:?}"));
        }
        out.push('>');
        for c in xot.children(node) {
            canon(xot, c, out);
        }
        out.push_str("</>");
    } else if let Some(t) = xot.text_str(node) {
        if !t.trim().is_empty() {
            out.push_str(&format!("T({:?})", t.trim()));
        }
    } else if let Some(c) = xot.comment_str(node) {
        out.push_str(&format!("C({c:?})"));
    } else {
        for c in xot.children(node) {
            canon(xot, c, out);
        }
    }
}

fn canonical(dom: &DomainXml) -> String {
    let mut s = String::new();
    canon(&dom.xot, dom.doc, &mut s);
    s
}

/// First element with this namespace and local name anywhere in the document.
fn find(dom: &DomainXml, ns: &str, local: &str) -> Option<Node> {
    dom.xot
        .descendants(dom.root)
        .find(|n| tree::element_name(&dom.xot, *n) == Some((local, ns)))
}

fn canonical_of(dom: &DomainXml, node: Node) -> String {
    let mut s = String::new();
    canon(&dom.xot, node, &mut s);
    s
}

/// The exact fixture text from `start` up to and including `end`.
fn slice<'a>(text: &'a str, start: &str, end: &str) -> &'a str {
    let a = text.find(start).expect("start marker");
    let b = text[a..].find(end).expect("end marker") + a + end.len();
    &text[a..b]
}

fn meta(role: Role, state: MemberState, generation: u64) -> UnderstudyMeta {
    UnderstudyMeta {
        service: "web".to_string(),
        class: "frontend".to_string(),
        role,
        generation,
        state,
        journal: None,
    }
}

// ---------------------------------------------------------------- parsing and accessors

#[test]
fn full_fixture_accessors() {
    let d = parse(FULL);
    assert_eq!(d.name().as_deref(), Some("web1"));
    assert_eq!(
        d.uuid().as_deref(),
        Some("4dea22b3-1d52-d8f3-2516-782e98ab3fa0")
    );
    assert_eq!(d.domain_type().as_deref(), Some("kvm"));
    assert_eq!(d.live_id(), None);
    assert_eq!(d.vcpus(), VcpuSpec { max: 4, current: 2 });
    assert_eq!(
        d.memory_kib(),
        MemorySpec {
            max_kib: 4 * 1024 * 1024,
            current_kib: 2048 * 1024
        }
    );

    let ifaces = d.interfaces();
    assert_eq!(
        ifaces,
        vec![
            InterfaceSpec {
                kind: InterfaceKind::Bridge,
                mac: Some("52:54:00:6b:3c:58".to_string()),
                bridge: Some("br0".to_string()),
                network: None,
                target_dev: None,
                model: Some("virtio".to_string()),
                link_up: true,
                filtered: false,
            },
            InterfaceSpec {
                kind: InterfaceKind::Network,
                mac: Some("52:54:00:1a:2b:3c".to_string()),
                bridge: None,
                network: Some("default".to_string()),
                target_dev: None,
                model: Some("e1000e".to_string()),
                link_up: true,
                filtered: false,
            },
        ]
    );
    assert!(d.live_interface_taps().is_empty());

    let disks = d.disks();
    assert_eq!(disks.len(), 3);
    assert_eq!(
        disks[0],
        DiskSpec {
            kind: DiskKind::File,
            device: DiskDevice::Disk,
            driver_type: Some("qcow2".to_string()),
            source: Some("/var/lib/libvirt/images/web1.qcow2".to_string()),
            target_dev: "vda".to_string(),
            readonly: false,
            shareable: false,
        }
    );
    assert!(disks[0].needs_overlay());
    assert_eq!(disks[1].target_dev, "vdb");
    assert_eq!(disks[1].driver_type.as_deref(), Some("raw"));
    assert!(disks[1].readonly && !disks[1].needs_overlay());
    assert_eq!(disks[2].device, DiskDevice::Cdrom);
    assert!(disks[2].readonly && !disks[2].needs_overlay());

    // Existing metadata written with a different prefix is found by namespace.
    let m = d
        .understudy_meta()
        .unwrap()
        .expect("member element present");
    assert_eq!(m.service, "web");
    assert_eq!(m.role, Role::Primary);
    assert_eq!(m.state, MemberState::Active);
    assert_eq!(m.generation, 4);
    assert_eq!(m.journal.as_deref(), Some("promoted from web1-shadow-3"));
}

#[test]
fn live_fixture_accessors() {
    let d = parse(LIVE);
    assert_eq!(d.live_id().as_deref(), Some("7"));
    assert_eq!(d.vcpus(), VcpuSpec { max: 4, current: 4 });
    assert_eq!(
        d.memory_kib(),
        MemorySpec {
            max_kib: 8388608,
            current_kib: 8388608
        }
    );
    assert_eq!(
        d.live_interface_taps(),
        vec![
            ("52:54:00:de:ad:01".to_string(), "vnet12".to_string()),
            ("52:54:00:DE:AD:02".to_string(), "vnet13".to_string()),
        ]
    );
    let ifaces = d.interfaces();
    assert_eq!(ifaces[1].network.as_deref(), Some("backend"));
    assert_eq!(ifaces[1].bridge.as_deref(), Some("virbr1"));
    let disks = d.disks();
    assert_eq!(disks[1].driver_type, None);
    assert!(disks[1].needs_overlay());
}

#[test]
fn malformed_xml_is_a_parse_error() {
    let err = DomainXml::parse(MALFORMED).unwrap_err();
    assert!(matches!(err, XmlError::Parse { .. }), "{err:?}");
    assert!(
        std::error::Error::source(&err).is_some(),
        "xot error chained"
    );
    assert!(matches!(
        DomainXml::parse("").unwrap_err(),
        XmlError::Parse { .. }
    ));
}

#[test]
fn non_domain_root_is_named() {
    let err = DomainXml::parse(NETWORK).unwrap_err();
    assert!(matches!(err, XmlError::NotDomain { .. }), "{err:?}");
    assert!(err.to_string().contains("<network>"), "{err}");

    // A <domain> in some other namespace is not libvirt's.
    let err = DomainXml::parse("<x:domain xmlns:x='urn:other'/>").unwrap_err();
    assert!(err.to_string().contains("urn:other"), "{err}");
}

#[test]
fn invalid_numbers_are_rejected_at_parse() {
    let bad_vcpu = FULL.replace("current='2'>4</vcpu>", "current='5'>4</vcpu>");
    assert!(matches!(
        DomainXml::parse(&bad_vcpu).unwrap_err(),
        XmlError::InvalidVcpus { max: 4, current: 5 }
    ));
    let bad_vcpu = FULL.replace("current='2'>4</vcpu>", "current='2'>four</vcpu>");
    assert!(matches!(
        DomainXml::parse(&bad_vcpu).unwrap_err(),
        XmlError::InvalidNumber { .. }
    ));
    let bad_unit = FULL.replace("<memory unit='GiB'>", "<memory unit='GiG'>");
    let err = DomainXml::parse(&bad_unit).unwrap_err();
    assert!(matches!(err, XmlError::InvalidUnit { .. }), "{err:?}");
    assert!(err.to_string().contains("GiG"));
    let no_target = DIRECT.replace("<target dev='vda' bus='virtio'/>", "");
    let err = DomainXml::parse(&no_target).unwrap_err();
    assert!(
        matches!(err, XmlError::MissingDiskTarget { index: 0, .. }),
        "{err:?}"
    );
}

#[test]
fn oversized_input_is_rejected_before_parsing() {
    let huge = format!("<domain>{}</domain>", " ".repeat(DOMAIN_XML_MAX));
    assert!(matches!(
        DomainXml::parse(&huge).unwrap_err(),
        XmlError::TooLarge { .. }
    ));
}

#[test]
fn memory_defaults_and_numa() {
    // No <currentMemory>: current is the maximum. No <vcpu current>: current is the maximum.
    let d = parse(DIRECT);
    assert_eq!(
        d.memory_kib(),
        MemorySpec {
            max_kib: 2048 * 1024,
            current_kib: 2048 * 1024
        }
    );
    assert_eq!(d.vcpus(), VcpuSpec { max: 2, current: 2 });

    // NUMA cells define the maximum; currentMemory is clamped to it, as libvirt does.
    let numa = FULL.replace(
        "<topology sockets='4' dies='1' cores='1' threads='1'/>",
        "<topology sockets='4' dies='1' cores='1' threads='1'/>\n    <numa>\n      \
         <cell id='0' cpus='0-1' memory='1' unit='GiB'/>\n      \
         <cell id='1' cpus='2-3' memory='512' unit='MiB'/>\n    </numa>",
    );
    let d = parse(&numa);
    assert_eq!(
        d.memory_kib(),
        MemorySpec {
            max_kib: 1536 * 1024,
            current_kib: 1536 * 1024
        }
    );
}

// ---------------------------------------------------------------- round trip

#[test]
fn round_trip_keeps_semantic_content() {
    let original = parse(FULL);
    let text = original.to_xml();
    let reparsed = parse(&text);
    assert_eq!(canonical(&original), canonical(&reparsed));
    // Serialization is a fixed point after one pass.
    assert_eq!(reparsed.to_xml(), text);
    // All accessors agree.
    assert_eq!(original.interfaces(), reparsed.interfaces());
    assert_eq!(original.disks(), reparsed.disks());
    assert_eq!(original.vcpus(), reparsed.vcpus());
    assert_eq!(original.memory_kib(), reparsed.memory_kib());

    let live = parse(LIVE);
    assert_eq!(canonical(&live), canonical(&parse(&live.to_xml())));
}

#[test]
fn round_trip_keeps_foreign_metadata_bytes_and_comments() {
    let text = parse(FULL).to_xml();
    // libvirt prints <metadata> children with double quotes, so they survive byte for byte.
    let nova = slice(FULL, "<nova:instance", "</nova:instance>");
    assert!(text.contains(nova), "nova metadata changed:\n{text}");
    let osinfo = slice(FULL, "<libosinfo:libosinfo", "</libosinfo:libosinfo>");
    assert!(text.contains(osinfo));
    assert!(text.contains("<!-- public uplink; the firewall keys on this MAC -->"));
    assert!(text.contains("virsh edit web1"));
    assert!(text.contains("<!-- trailing comment kept by round trip -->"));
    assert!(text.contains("Public web tier &amp; TLS termination"));
}

#[test]
fn round_trip_keeps_qemu_commandline_subtree() {
    let original = parse(FULL);
    let reparsed = parse(&original.to_xml());
    let a = find(&original, QEMU_NS, "commandline").expect("qemu:commandline in fixture");
    let b = find(&reparsed, QEMU_NS, "commandline").expect("qemu:commandline kept");
    let ca = canonical_of(&original, a);
    assert_eq!(ca, canonical_of(&reparsed, b));
    assert!(ca.contains("name=opt/com.example/role,string=web"));
    // Still written with the qemu prefix declared on <domain>.
    assert!(original.to_xml().contains("<qemu:arg value=\"-fw_cfg\"/>"));
}

// ---------------------------------------------------------------- metadata

#[test]
fn meta_element_round_trips() {
    let mut m = meta(Role::Shadow, MemberState::Promoting, 17);
    m.journal = Some(r#"step=3 fence "db1" & <rewire> 'br0' ✓"#.to_string());
    let xml = m.to_element_xml();
    assert!(xml.starts_with(&format!(
        "<{META_PREFIX}:member xmlns:{META_PREFIX}=\"{META_NS}\""
    )));
    assert_eq!(UnderstudyMeta::from_element_xml(&xml).unwrap(), m);

    let plain = meta(Role::Retired, MemberState::Fenced, u64::MAX);
    assert_eq!(
        UnderstudyMeta::from_element_xml(&plain.to_element_xml()).unwrap(),
        plain
    );
}

#[test]
fn meta_accepts_any_prefix() {
    let other = format!(
        "<x:member xmlns:x=\"{META_NS}\" service=\"s\" class=\"c\" role=\"shadow\" \
         generation=\"2\" state=\"paused\" extra=\"ignored\"/>"
    );
    let m = UnderstudyMeta::from_element_xml(&other).unwrap();
    assert_eq!(m.role, Role::Shadow);
    assert_eq!(m.state, MemberState::Paused);
    assert_eq!(m.journal, None);
    let default_ns = format!(
        "<member xmlns=\"{META_NS}\" service=\"s\" class=\"c\" role=\"primary\" \
         generation=\"0\" state=\"booting\"/>"
    );
    assert_eq!(
        UnderstudyMeta::from_element_xml(&default_ns).unwrap().state,
        MemberState::Booting
    );
}

#[test]
fn meta_garbage_errors() {
    let ok = meta(Role::Primary, MemberState::Active, 1).to_element_xml();
    let cases: Vec<(String, &str)> = vec![
        ("not xml at all".to_string(), "Parse"),
        ("<member service='s'/>".to_string(), "NotMemberElement"),
        (
            ok.replace(META_NS, "https://example.invalid/other"),
            "NotMemberElement",
        ),
        (ok.replace("role=\"primary\"", ""), "MissingMetaAttribute"),
        (
            ok.replace("role=\"primary\"", "role=\"boss\""),
            "InvalidMetaValue",
        ),
        (
            ok.replace("state=\"active\"", "state=\"ACTIVE\""),
            "InvalidMetaValue",
        ),
        (
            ok.replace("generation=\"1\"", "generation=\"-1\""),
            "InvalidNumber",
        ),
        (
            ok.replace("service=\"web\"", "service=\"\""),
            "InvalidMetaValue",
        ),
        (
            ok.replace(
                "/>",
                &format!(" journal=\"{}\"/>", "j".repeat(META_JOURNAL_MAX + 1)),
            ),
            "MetaValueTooLong",
        ),
    ];
    for (xml, want) in cases {
        let err = UnderstudyMeta::from_element_xml(&xml).unwrap_err();
        assert!(format!("{err:?}").starts_with(want), "{xml}: got {err:?}");
    }
}

#[test]
fn meta_control_characters_are_replaced_and_flagged() {
    let mut m = meta(Role::Shadow, MemberState::Paused, 1);
    m.journal = Some("line1\nline2\u{1}".to_string());
    assert!(matches!(
        m.validate(),
        Err(XmlError::InvalidMetaValue {
            attribute: "journal",
            ..
        })
    ));
    let back = UnderstudyMeta::from_element_xml(&m.to_element_xml()).unwrap();
    assert_eq!(back.journal.as_deref(), Some("line1\u{FFFD}line2\u{FFFD}"));

    let mut d = parse(DIRECT);
    d.set_understudy_meta(&m);
    let reparsed = parse(&d.to_xml());
    assert_eq!(
        reparsed.understudy_meta().unwrap().unwrap().journal,
        back.journal
    );
}

#[test]
fn set_meta_replaces_and_leaves_foreign_metadata() {
    let mut d = parse(FULL);
    let first = meta(Role::Shadow, MemberState::Booting, 5);
    let mut second = meta(Role::Shadow, MemberState::Paused, 6);
    second.journal = Some("ready".to_string());
    d.set_understudy_meta(&first);
    d.set_understudy_meta(&second);
    assert_eq!(d.meta_nodes().len(), 1);
    assert_eq!(d.understudy_meta().unwrap(), Some(second.clone()));

    let text = d.to_xml();
    assert_eq!(text.matches(META_NS).count(), 1, "{text}");
    assert!(text.contains(slice(FULL, "<nova:instance", "</nova:instance>")));
    let reparsed = parse(&text);
    assert_eq!(reparsed.understudy_meta().unwrap(), Some(second));
    assert!(find(&reparsed, NOVA_NS, "instance").is_some());
}

#[test]
fn set_meta_creates_metadata_after_uuid() {
    let mut d = parse(HOSTDEV);
    assert_eq!(d.understudy_meta().unwrap(), None);
    let m = meta(Role::Primary, MemberState::Active, 1);
    d.set_understudy_meta(&m);
    let text = d.to_xml();
    let uuid_at = text.find("<uuid>").unwrap();
    let md_at = text.find("<metadata>").unwrap();
    let mem_at = text.find("<memory").unwrap();
    assert!(uuid_at < md_at && md_at < mem_at, "{text}");
    assert_eq!(parse(&text).understudy_meta().unwrap(), Some(m));
}

#[test]
fn duplicate_meta_is_an_error() {
    let m = meta(Role::Primary, MemberState::Active, 1).to_element_xml();
    let dup = FULL.replace("  </metadata>", &format!("    {m}\n  </metadata>"));
    let d = parse(&dup);
    assert!(matches!(
        d.understudy_meta(),
        Err(XmlError::DuplicateMeta { count: 2 })
    ));
}

#[test]
fn name_and_uuid_setters() {
    let mut d = parse(FULL);
    d.set_name("web1-shadow");
    d.set_uuid("11111111-2222-4333-8444-555555555555");
    let r = parse(&d.to_xml());
    assert_eq!(r.name().as_deref(), Some("web1-shadow"));
    assert_eq!(
        r.uuid().as_deref(),
        Some("11111111-2222-4333-8444-555555555555")
    );

    let mut bare =
        DomainXml::parse("<domain type='qemu'>\n  <memory>1024</memory>\n</domain>").unwrap();
    assert_eq!(bare.name(), None);
    bare.set_uuid("11111111-2222-4333-8444-555555555555");
    bare.set_name("n & m");
    let text = bare.to_xml();
    assert!(
        text.find("<name>").unwrap() < text.find("<uuid>").unwrap(),
        "{text}"
    );
    assert_eq!(parse(&text).name().as_deref(), Some("n & m"));
}

// ---------------------------------------------------------------- links

#[test]
fn set_interfaces_link_sets_every_nic_once() {
    let mut d = parse(FULL);
    d.set_interfaces_link(false);
    assert!(d.interfaces().iter().all(|i| !i.link_up));
    for iface in d.device_nodes("interface") {
        assert_eq!(tree::children_named(&d.xot, iface, "link").count(), 1);
    }
    d.set_interfaces_link(true);
    let r = parse(&d.to_xml());
    assert!(r.interfaces().iter().all(|i| i.link_up));
}

#[test]
fn interface_xml_with_link_is_one_standalone_element() {
    let d = parse(LIVE);
    let xml = d
        .interface_xml_with_link("52:54:00:de:ad:02", false)
        .expect("MAC matches case-insensitively");
    assert!(xml.starts_with("<interface type=\"network\">"), "{xml}");
    assert!(xml.contains("<link state=\"down\"/>"));
    assert!(xml.contains("<target dev=\"vnet13\"/>"), "live target kept");
    assert!(!xml.contains("xmlns"), "{xml}");
    // The domain itself is untouched.
    assert!(d.interfaces()[1].link_up);

    let mut x = Xot::new();
    let doc = x.parse(&xml).unwrap();
    let root = x.document_element(doc).unwrap();
    assert_eq!(tree::child_attr(&x, root, "link", "state"), Some("down"));

    let up = parse(FULL)
        .interface_xml_with_link("52:54:00:1a:2b:3c", true)
        .unwrap();
    assert_eq!(up.matches("<link").count(), 1);
    assert!(up.contains("<link state=\"up\"/>"));
    assert_eq!(d.interface_xml_with_link("52:54:00:00:00:00", true), None);
}

/// What `interface_xml_with_link` made before it copied only the NIC: a copy of the whole tree,
/// in which the NIC was cloned and serialized.
fn interface_xml_by_whole_tree_clone(d: &DomainXml, iface: Node, up: bool) -> Option<String> {
    let mut x = d.xot.clone();
    let copy = x.clone_node(iface);
    set_link(&mut x, copy, up);
    x.to_string(copy).ok()
}

#[test]
fn interface_xml_is_the_nic_as_a_whole_tree_clone_serialized_it() {
    // Every fixture's NICs, and NICs with comments, a processing instruction, namespaced
    // children declared on the NIC, and ones using a prefix declared on <domain> (which the
    // whole-tree clone could not write; the copy declares it on the NIC).
    let odd = r#"<domain type="kvm" xmlns:q="urn:q"><name>odd</name><devices>
  <interface type="bridge"><!-- c --><?pi data?><mac address="52:54:00:00:00:01"/>
    <x:ext xmlns:x="urn:x" x:a="1" b="&amp;&lt;">t&#x9;</x:ext><link state="up"/></interface>
  <interface type="user"><mac address="52:54:00:00:00:02"/><q:opt/></interface>
  <interface type="user" xmlns:q="urn:q2"><mac address="52:54:00:00:00:03"/><q:opt/></interface>
</devices></domain>"#;
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/domain_xml/fixtures");
    let mut texts: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "xml"))
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    texts.push(odd.to_string());
    let mut compared = 0;
    let mut declared = 0;
    for text in &texts {
        let Ok(d) = DomainXml::parse(text) else {
            continue;
        };
        for iface in d.device_nodes("interface") {
            let Some(mac) = tree::child_attr(&d.xot, iface, "mac", "address") else {
                continue;
            };
            for up in [false, true] {
                let expected = interface_xml_by_whole_tree_clone(&d, iface, up);
                let ours = d.interface_xml_with_link(mac, up);
                match expected {
                    Some(_) => assert_eq!(ours, expected, "{mac}"),
                    // The whole-tree clone could not write it; the copy declares the prefix.
                    None => {
                        let xml = ours.expect("a NIC using <domain>'s prefix is written");
                        assert!(xml.starts_with("<interface xmlns:"), "{xml}");
                        declared += 1;
                    }
                }
                compared += 1;
            }
        }
    }
    assert!(compared >= 18, "only {compared} NICs compared");
    assert_eq!(
        declared, 4,
        "the two NICs using <domain>'s prefixes, up and down"
    );
}

// ---------------------------------------------------------------- shadow_spec

fn plan(name: &str, overlays: &[(&str, &str)]) -> ShadowPlan {
    ShadowPlan {
        name: name.to_string(),
        uuid: "9b3f7c2e-1a4d-4e5f-8a6b-7c8d9e0f1a2b".to_string(),
        disk_overlays: overlays
            .iter()
            .map(|(t, p)| (t.to_string(), PathBuf::from(p)))
            .collect::<BTreeMap<_, _>>(),
        data_disks: BTreeSet::new(),
        vcpu_max: 8,
        memory_max_kib: 8 * 1024 * 1024,
        console_dir: PathBuf::from("/run/understudy/console"),
        meta: UnderstudyMeta {
            service: "web".to_string(),
            class: "frontend".to_string(),
            role: Role::Shadow,
            generation: 5,
            state: MemberState::Booting,
            journal: None,
        },
    }
}

fn attr_of(d: &DomainXml, node: Node, name: &str) -> Option<String> {
    tree::attr(&d.xot, node, name).map(str::to_string)
}

#[test]
fn standby_boot_spec_puts_no_nic_on_a_bridge() {
    let mut primary = parse(FULL);
    // A bridge NIC with the children libvirt accepts only with a bridge behind it.
    let iface = primary.device_nodes("interface").next().unwrap();
    for local in ["virtualport", "vlan", "port"] {
        let n = tree::new_element(&mut primary.xot, local);
        tree::append_element(&mut primary.xot, iface, n);
    }
    let spec = shadow_spec(&primary, &plan("web1-shadow", &[("vda", "/o/vda.qcow2")])).unwrap();
    let before = spec.to_xml();
    let boot = parse(&standby_boot_spec(&spec).to_xml());
    assert_eq!(spec.to_xml(), before, "the spec itself must not change");

    let (si, bi) = (spec.interfaces(), boot.interfaces());
    assert_eq!(si.len(), 2);
    assert_eq!(bi.len(), 2);
    for (a, b) in si.iter().zip(&bi) {
        assert_eq!(b.kind, InterfaceKind::Ethernet);
        assert_eq!((&a.mac, &a.model), (&b.mac, &b.model));
        assert_eq!((b.bridge.as_deref(), b.network.as_deref()), (None, None));
        assert!(!b.link_up, "booting NICs stay link-down");
    }
    for iface in boot.device_nodes("interface") {
        for local in BRIDGE_ONLY_CHILDREN {
            assert_eq!(tree::children_named(&boot.xot, iface, local).count(), 0);
        }
        // The guest keeps its PCI layout.
        assert_eq!(tree::children_named(&boot.xot, iface, "address").count(), 1);
    }
    // Everything but the NICs is the spec's.
    assert_eq!(boot.name(), spec.name());
    assert_eq!(boot.disks(), spec.disks());
    assert_eq!(
        boot.understudy_meta().unwrap(),
        spec.understudy_meta().unwrap()
    );
}

#[test]
fn shadow_of_full_spec() {
    let primary = parse(FULL);
    let before = primary.to_xml();
    let p = plan(
        "web1-shadow",
        &[("vda", "/var/lib/understudy/overlays/web1-shadow-vda.qcow2")],
    );
    let shadow = shadow_spec(&primary, &p).unwrap();
    assert_eq!(primary.to_xml(), before, "primary must not change");

    // Re-parse the serialized form: that is what libvirt gets.
    let s = parse(&shadow.to_xml());
    assert_eq!(s.name().as_deref(), Some("web1-shadow"));
    assert_eq!(s.uuid().as_deref(), Some(p.uuid.as_str()));

    // NICs: same MAC/source/model, no target, link down.
    let (pi, si) = (primary.interfaces(), s.interfaces());
    assert_eq!(pi.len(), si.len());
    for (a, b) in pi.iter().zip(&si) {
        assert_eq!(
            (&a.kind, &a.mac, &a.bridge, &a.network, &a.model),
            (&b.kind, &b.mac, &b.bridge, &b.network, &b.model)
        );
        assert_eq!(b.target_dev, None);
        assert!(!b.link_up);
    }
    for iface in s.device_nodes("interface") {
        assert_eq!(tree::children_named(&s.xot, iface, "link").count(), 1);
    }

    // Disks: only the writable file disk is overlaid.
    let disks = s.disks();
    assert_eq!(disks.len(), 3);
    assert_eq!(
        disks[0].source.as_deref(),
        Some("/var/lib/understudy/overlays/web1-shadow-vda.qcow2")
    );
    assert_eq!(disks[0].driver_type.as_deref(), Some("qcow2"));
    let vda = s.disk_nodes().next().unwrap();
    let driver = tree::child_named(&s.xot, vda, "driver").unwrap();
    assert_eq!(attr_of(&s, driver, "cache").as_deref(), Some("none"));
    assert_eq!(disks[1], primary.disks()[1]);
    assert_eq!(disks[2], primary.disks()[2]);

    // Sizes: maxima raised, current kept, placement kept, topology widened.
    assert_eq!(s.vcpus(), VcpuSpec { max: 8, current: 2 });
    let vcpu = tree::child_named(&s.xot, s.root, "vcpu").unwrap();
    assert_eq!(attr_of(&s, vcpu, "placement").as_deref(), Some("static"));
    assert_eq!(
        s.memory_kib(),
        MemorySpec {
            max_kib: 8 * 1024 * 1024,
            current_kib: 2048 * 1024
        }
    );
    let mem = tree::child_named(&s.xot, s.root, "memory").unwrap();
    assert_eq!(attr_of(&s, mem, "unit").as_deref(), Some("KiB"));
    let topo = find(&s, "", "topology").unwrap();
    assert_eq!(attr_of(&s, topo, "sockets").as_deref(), Some("8"));

    // Consoles: per-shadow paths; the console mirrors the serial port's path.
    let text = shadow.to_xml();
    assert!(
        !text.contains("/var/log/libvirt/qemu/web1-serial0"),
        "{text}"
    );
    let serial_log = "/run/understudy/console/web1-shadow.web1-serial0.log";
    assert_eq!(text.matches(serial_log).count(), 2, "{text}");
    assert_eq!(
        text.matches("/run/understudy/console/web1-shadow.web1-serial0.qemu.log")
            .count(),
        2
    );
    assert!(text.contains("/run/understudy/console/web1-shadow.ttyS1.sock"));
    // Guest agent channel: path left to libvirt.
    let channel = s.device_nodes("channel").next().unwrap();
    let source = tree::child_named(&s.xot, channel, "source").unwrap();
    assert_eq!(attr_of(&s, source, "path"), None);
    assert_eq!(attr_of(&s, source, "mode").as_deref(), Some("bind"));

    // Graphics: automatic port.
    let g = s.device_nodes("graphics").next().unwrap();
    assert_eq!(attr_of(&s, g, "port"), None);
    assert_eq!(attr_of(&s, g, "autoport").as_deref(), Some("yes"));
    assert_eq!(attr_of(&s, g, "listen").as_deref(), Some("127.0.0.1"));

    // NVRAM: libvirt creates the shadow's own store.
    assert!(find(&s, "", "nvram").is_none());
    assert!(!text.contains("web1_VARS.fd"));
    assert!(find(&s, "", "loader").is_some());

    // Metadata: foreign kept byte for byte, ours replaced.
    assert!(text.contains(slice(FULL, "<nova:instance", "</nova:instance>")));
    assert_eq!(s.understudy_meta().unwrap(), Some(p.meta.clone()));
    assert_eq!(s.meta_nodes().len(), 1);

    // Everything else is kept: same device list, qemu:commandline intact.
    let kinds = |d: &DomainXml| -> Vec<String> {
        tree::element_children(&d.xot, d.devices().unwrap())
            .map(|n| tree::start_tag(&d.xot, n))
            .filter(|t| !t.starts_with("<graphics"))
            .collect()
    };
    assert_eq!(kinds(&primary), kinds(&s));
    let a = find(&primary, QEMU_NS, "commandline").unwrap();
    let b = find(&s, QEMU_NS, "commandline").unwrap();
    assert_eq!(canonical_of(&primary, a), canonical_of(&s, b));
    assert!(text.contains("<!-- public uplink; the firewall keys on this MAC -->"));
}

#[test]
fn shadow_of_live_spec() {
    let primary = parse(LIVE);
    let p = plan(
        "db1-shadow",
        &[
            ("vda", "/var/lib/understudy/overlays/db1-shadow-vda.qcow2"),
            ("vdb", "/var/lib/understudy/overlays/db1-shadow-vdb.qcow2"),
        ],
    );
    let s = parse(&shadow_spec(&primary, &p).unwrap().to_xml());
    assert_eq!(s.live_id(), None);
    assert!(s.live_interface_taps().is_empty());
    assert_eq!(s.interfaces()[1].mac.as_deref(), Some("52:54:00:DE:AD:02"));
    let net_source = tree::child_named(
        &s.xot,
        s.device_nodes("interface").nth(1).unwrap(),
        "source",
    )
    .unwrap();
    assert_eq!(attr_of(&s, net_source, "portid"), None);
    assert_eq!(
        attr_of(&s, net_source, "network").as_deref(),
        Some("backend")
    );

    // Overlaid disks: the primary's backing chain and live index are gone; a missing driver
    // element is created.
    for disk in s.disk_nodes() {
        assert_eq!(
            tree::children_named(&s.xot, disk, "backingStore").count(),
            0
        );
        let src = tree::child_named(&s.xot, disk, "source").unwrap();
        assert_eq!(attr_of(&s, src, "index"), None);
    }
    let disks = s.disks();
    assert!(disks
        .iter()
        .all(|d| d.driver_type.as_deref() == Some("qcow2")));
    assert_eq!(
        disks[1].source.as_deref(),
        Some("/var/lib/understudy/overlays/db1-shadow-vdb.qcow2")
    );

    // Live-only terminal paths and the generated channel path are dropped.
    let text = s.to_xml();
    assert!(!text.contains("/dev/pts/4"), "{text}");
    assert!(!text.contains("domain-7-db1"), "{text}");
    assert!(!text.contains("tty="));

    // SPICE ports automatic, vsock CID automatic.
    let g = s.device_nodes("graphics").next().unwrap();
    assert_eq!(attr_of(&s, g, "port"), None);
    assert_eq!(attr_of(&s, g, "tlsPort"), None);
    let cid = tree::child_named(&s.xot, s.device_nodes("vsock").next().unwrap(), "cid").unwrap();
    assert_eq!(attr_of(&s, cid, "auto").as_deref(), Some("yes"));
    assert_eq!(attr_of(&s, cid, "address"), None);

    // Dynamic labels lose the primary's generated labels but stay dynamic.
    let labels: Vec<Node> = tree::children_named(&s.xot, s.root, "seclabel").collect();
    assert_eq!(labels.len(), 2);
    assert!(!text.contains("c392,c662"));
    assert!(!text.contains("+107:+107"));

    // vcpus: no current= before, so current is the old maximum.
    assert_eq!(s.vcpus(), VcpuSpec { max: 8, current: 4 });
    assert_eq!(s.memory_kib().current_kib, 8388608);
    // Our old record (primary, generation 3) is replaced.
    assert_eq!(s.understudy_meta().unwrap(), Some(p.meta));
}

#[test]
fn shadow_never_lowers_sizes() {
    let primary = parse(LIVE);
    let mut p = plan(
        "db1-shadow",
        &[("vda", "/o/vda.qcow2"), ("vdb", "/o/vdb.qcow2")],
    );
    p.vcpu_max = 2;
    p.memory_max_kib = 1024;
    let s = shadow_spec(&primary, &p).unwrap();
    assert_eq!(s.vcpus(), primary.vcpus());
    assert_eq!(s.memory_kib(), primary.memory_kib());
}

#[test]
fn shadow_extends_vcpus_list() {
    let with_list = LIVE.replace(
        "<vcpu placement='static'>4</vcpu>",
        "<vcpu placement='static' current='2'>4</vcpu>\n  <vcpus>\n    \
         <vcpu id='0' enabled='yes' hotpluggable='no' order='1'/>\n    \
         <vcpu id='1' enabled='yes' hotpluggable='yes' order='2'/>\n    \
         <vcpu id='2' enabled='no' hotpluggable='yes'/>\n    \
         <vcpu id='3' enabled='no' hotpluggable='yes'/>\n  </vcpus>",
    );
    let p = plan(
        "db1-shadow",
        &[("vda", "/o/vda.qcow2"), ("vdb", "/o/vdb.qcow2")],
    );
    let s = parse(&shadow_spec(&parse(&with_list), &p).unwrap().to_xml());
    let list = tree::child_named(&s.xot, s.root, "vcpus").unwrap();
    let ids: Vec<String> = tree::children_named(&s.xot, list, "vcpu")
        .map(|v| attr_of(&s, v, "id").unwrap())
        .collect();
    assert_eq!(ids, ["0", "1", "2", "3", "4", "5", "6", "7"]);
    assert_eq!(s.vcpus(), VcpuSpec { max: 8, current: 2 });
}

fn refusal(xml: &str, p: &ShadowPlan) -> CloneError {
    shadow_spec(&parse(xml), p).expect_err("clone must be refused")
}

#[test]
fn refuses_hostdev() {
    let err = refusal(HOSTDEV, &plan("gpu1-shadow", &[("vda", "/o/vda.qcow2")]));
    let msg = err.to_string();
    assert!(matches!(err, CloneError::Unclonable { .. }), "{err:?}");
    assert!(
        msg.contains("<hostdev mode='subsystem' type='pci'"),
        "{msg}"
    );
    assert!(msg.contains("pci 0000:3b:00.0"), "{msg}");
}

#[test]
fn refuses_direct_interface() {
    let err = refusal(DIRECT, &plan("edge1-shadow", &[("vda", "/o/vda.qcow2")]));
    let msg = err.to_string();
    assert!(msg.contains("<interface type='direct'>"), "{msg}");
    assert!(msg.contains("52:54:00:00:20:01"), "{msg}");
    assert!(msg.contains("macvtap"), "{msg}");
}

#[test]
fn refuses_writable_block_disk() {
    let err = refusal(BLOCK_DISK, &plan("db2-shadow", &[("vda", "/o/vda.qcow2")]));
    let msg = err.to_string();
    assert!(
        matches!(err, CloneError::NoImageForSystemDisk { .. }),
        "{err:?}"
    );
    // Names the disk and both ways out.
    assert!(msg.contains("block disk vdb"), "{msg}");
    assert!(msg.contains("/dev/vg0/db2-data"), "{msg}");
    assert!(msg.contains("disk_roles.vdb = \"data\""), "{msg}");
    assert!(msg.contains("golden_image"), "{msg}");

    // Read-only, the same disk is shared as is.
    let ro = BLOCK_DISK.replace(
        "<target dev='vdb' bus='virtio'/>",
        "<target dev='vdb' bus='virtio'/>\n      <readonly/>",
    );
    shadow_spec(&parse(&ro), &plan("db2-shadow", &[("vda", "/o/vda.qcow2")])).unwrap();
}

#[test]
fn refuses_writable_disk_without_overlay() {
    let err = refusal(FULL, &plan("web1-shadow", &[]));
    match &err {
        CloneError::MissingOverlay { target, image } => {
            assert_eq!(target, "vda");
            assert_eq!(image, "/var/lib/libvirt/images/web1.qcow2");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(err.to_string().contains("vda"));
}

#[test]
fn refuses_overlays_that_do_not_apply() {
    let p = plan(
        "web1-shadow",
        &[("vda", "/o/vda.qcow2"), ("vdb", "/o/vdb.qcow2")],
    );
    assert!(matches!(
        refusal(FULL, &p),
        CloneError::UnexpectedOverlay { ref target, .. } if target == "vdb"
    ));
    let p = plan(
        "web1-shadow",
        &[("vda", "/o/vda.qcow2"), ("vdz", "/o/vdz.qcow2")],
    );
    assert!(matches!(
        refusal(FULL, &p),
        CloneError::UnexpectedOverlay { ref target, .. } if target == "vdz"
    ));
}

#[test]
fn refuses_bad_plans() {
    let ok = plan("web1-shadow", &[("vda", "/o/vda.qcow2")]);
    let mut p = ok.clone();
    p.name = "web1".to_string();
    assert!(matches!(
        refusal(FULL, &p),
        CloneError::InvalidPlan { field: "name", .. }
    ));
    let mut p = ok.clone();
    p.name = "a/b".to_string();
    assert!(matches!(
        refusal(FULL, &p),
        CloneError::InvalidPlan { field: "name", .. }
    ));
    let mut p = ok.clone();
    p.uuid = "4DEA22B3-1D52-D8F3-2516-782E98AB3FA0".to_string();
    assert!(matches!(
        refusal(FULL, &p),
        CloneError::InvalidPlan { field: "uuid", .. }
    ));
    let mut p = ok.clone();
    p.uuid = "not-a-uuid".to_string();
    assert!(matches!(
        refusal(FULL, &p),
        CloneError::InvalidPlan { field: "uuid", .. }
    ));
    let mut p = ok.clone();
    p.console_dir = PathBuf::from("relative/dir");
    assert!(matches!(
        refusal(FULL, &p),
        CloneError::InvalidPlan {
            field: "console_dir",
            ..
        }
    ));
    let mut p = ok;
    p.meta.service = String::new();
    assert!(matches!(refusal(FULL, &p), CloneError::Xml(_)));
}

#[test]
fn refuses_topology_that_cannot_widen() {
    let two_cores = FULL.replace(
        "<topology sockets='4' dies='1' cores='1' threads='1'/>",
        "<topology sockets='2' dies='1' cores='2' threads='1'/>",
    );
    let mut p = plan("web1-shadow", &[("vda", "/o/vda.qcow2")]);
    p.vcpu_max = 7;
    assert!(matches!(
        refusal(&two_cores, &p),
        CloneError::CpuTopology {
            vcpu_max: 7,
            per_socket: 2
        }
    ));
    p.vcpu_max = 6;
    let s = shadow_spec(&parse(&two_cores), &p).unwrap();
    let topo = find(&s, "", "topology").unwrap();
    assert_eq!(attr_of(&s, topo, "sockets").as_deref(), Some("3"));
}

#[test]
fn refuses_raising_numa_sized_memory() {
    let numa = FULL.replace(
        "<topology sockets='4' dies='1' cores='1' threads='1'/>",
        "<topology sockets='4' dies='1' cores='1' threads='1'/>\n    <numa>\n      \
         <cell id='0' cpus='0-3' memory='4' unit='GiB'/>\n    </numa>",
    );
    let p = plan("web1-shadow", &[("vda", "/o/vda.qcow2")]);
    assert!(matches!(refusal(&numa, &p), CloneError::NumaMemory { .. }));
}

/// A minimal valid domain with one extra device, for refusal cases.
fn with_device(device: &str) -> String {
    format!(
        "<domain type='kvm'>\n  <name>t1</name>\n  \
         <uuid>2c1b0a99-8877-4665-9443-322110ffeedd</uuid>\n  <memory>1048576</memory>\n  \
         <devices>\n    {device}\n  </devices>\n</domain>"
    )
}

#[test]
fn refuses_other_unclonable_devices() {
    let p = plan("t1-shadow", &[]);
    let cases = [
        (
            "<disk type='file' device='disk'><source file='/i/shared.img'/>\
             <target dev='vdc'/><shareable/></disk>",
            "shareable",
        ),
        (
            "<filesystem type='mount' accessmode='passthrough'><source dir='/srv/share'/>\
             <target dir='share'/></filesystem>",
            "<filesystem",
        ),
        (
            "<tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/>\
             </backend></tpm>",
            "host TPM",
        ),
        ("<smartcard mode='host'/>", "<smartcard mode='host'>"),
        (
            "<redirdev bus='usb' type='tcp'><source mode='connect' host='localhost' \
             service='4000'/></redirdev>",
            "<redirdev",
        ),
        (
            "<interface type='hostdev' managed='yes'><mac address='52:54:00:00:30:01'/>\
             <source><address type='pci' domain='0x0000' bus='0x81' slot='0x10' \
             function='0x2'/></source></interface>",
            "52:54:00:00:30:01",
        ),
        (
            "<interface type='vhostuser'><mac address='52:54:00:00:30:02'/>\
             <source type='unix' path='/run/ovs/vhu0' mode='server'/></interface>",
            "vhost-user",
        ),
        (
            "<serial type='tcp'><source mode='bind' host='127.0.0.1' service='4555'/>\
             <target port='0'/></serial>",
            "port 4555",
        ),
        (
            "<serial type='dev'><source path='/dev/ttyS0'/><target port='0'/></serial>",
            "/dev/ttyS0",
        ),
        (
            "<memory model='nvdimm'><source><path>/srv/pmem0</path></source>\
             <target><size unit='GiB'>1</size></target></memory>",
            "nvdimm",
        ),
    ];
    for (device, needle) in cases {
        let err = refusal(&with_device(device), &p);
        assert!(
            matches!(err, CloneError::Unclonable { .. }),
            "{device}: {err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains(needle), "{device}: {msg}");
    }
}

#[test]
fn clonable_odd_devices_pass() {
    let p = plan("t1-shadow", &[]);
    for device in [
        "<filesystem type='mount'><source dir='/srv/ro'/><target dir='ro'/><readonly/></filesystem>",
        "<smartcard mode='passthrough' type='spicevmc'/>",
        "<redirdev bus='usb' type='spicevmc'/>",
        "<channel type='unix'><source mode='connect' path='/run/agent.sock'/>\
         <target type='virtio' name='org.example.agent'/></channel>",
        "<disk type='file' device='floppy'><target dev='fda'/></disk>",
    ] {
        let s = shadow_spec(&parse(&with_device(device)), &p)
            .unwrap_or_else(|e| panic!("{device}: {e}"));
        if device.contains("mode='connect'") {
            assert!(s.to_xml().contains("/run/agent.sock"), "connect socket kept");
        }
    }
}

#[test]
fn distinct_paths_with_same_file_name_do_not_collide() {
    let p = plan("t1-shadow", &[]);
    let xml = with_device(
        "<serial type='file'><source path='/a/console.log'/><target port='0'/></serial>\n    \
         <serial type='file'><source path='/b/console.log'/><target port='1'/></serial>",
    );
    let text = shadow_spec(&parse(&xml), &p).unwrap().to_xml();
    assert!(
        text.contains("/run/understudy/console/t1-shadow.console.log\""),
        "{text}"
    );
    assert!(
        text.contains("/run/understudy/console/t1-shadow.console.log.1\""),
        "{text}"
    );
}

#[test]
fn edits_keep_virsh_style_indentation() {
    let p = plan(
        "db1-shadow",
        &[("vda", "/o/vda.qcow2"), ("vdb", "/o/vdb.qcow2")],
    );
    let text = shadow_spec(&parse(LIVE), &p).unwrap().to_xml();
    let member = p.meta.to_element_xml();
    assert!(
        text.contains(&format!("  <metadata>\n    {member}\n  </metadata>\n")),
        "{text}"
    );
    assert!(
        text.contains("      <link state=\"down\"/>\n    </interface>"),
        "{text}"
    );
    // Emptied elements collapse instead of keeping blank lines.
    assert!(
        text.contains("<seclabel type=\"dynamic\" model=\"dac\" relabel=\"yes\"/>"),
        "{text}"
    );
    assert!(!text.contains("<source/>"), "{text}");
    assert!(!text.contains("\n\n"), "{text}");

    let fresh = shadow_spec(
        &parse(&with_device("<input type='tablet' bus='usb'/>")),
        &plan("t1-shadow", &[]),
    )
    .unwrap()
    .to_xml();
    assert!(
        fresh.contains("  <metadata>\n    <understudy:member"),
        "{fresh}"
    );
}

#[test]
fn types_can_cross_tasks() {
    fn send_sync<T: Send + Sync + 'static>() {}
    send_sync::<DomainXml>();
    send_sync::<XmlError>();
    send_sync::<CloneError>();
    send_sync::<UnderstudyMeta>();
}

#[test]
fn libvirt_metadata_form_round_trips() {
    // virDomainSetMetadata takes the element unprefixed and undeclared; virDomainGetMetadata
    // hands it back the same way (observed on libvirt 9.0).
    let m = meta(Role::Shadow, MemberState::Paused, 3);
    let wire = m.to_libvirt_xml();
    assert!(
        wire.starts_with("<member ") && !wire.contains("xmlns"),
        "{wire}"
    );
    assert_eq!(UnderstudyMeta::from_libvirt_xml(&wire).unwrap(), m);
    // The namespaced form is still accepted.
    assert_eq!(
        UnderstudyMeta::from_libvirt_xml(&m.to_element_xml()).unwrap(),
        m
    );
    // Another tool's undeclared element is not ours.
    assert!(UnderstudyMeta::from_libvirt_xml("<membership a='1'/>").is_err());
}

#[test]
fn shadow_of_a_promoted_shadow_does_not_stack_path_prefixes() {
    // A primary that was itself a shadow carries paths we rewrote: the next generation must
    // get `<new>.<base>`, not `<new>.<old>.<base>` (which grew until the name was too long).
    let primary = parse(FULL);
    let g1 = shadow_spec(&primary, &plan("web1-shadow-1", &[("vda", "/o/1.qcow2")])).unwrap();
    let mut g1 = parse(&g1.to_xml());
    g1.set_uuid("11111111-2222-4333-8444-555555555555");
    let g2 = shadow_spec(&g1, &plan("web1-shadow-2", &[("vda", "/o/2.qcow2")])).unwrap();
    let first = g1.to_xml();
    let second = g2.to_xml();
    let paths = |x: &str| -> Vec<String> {
        x.split("/run/understudy/console/")
            .skip(1)
            .map(|r| r.split(['"', '\'']).next().unwrap_or("").to_string())
            .collect()
    };
    let (p1, p2) = (paths(&first), paths(&second));
    assert!(!p1.is_empty(), "fixture has no rewritten paths");
    assert_eq!(p1.len(), p2.len());
    for (a, b) in p1.iter().zip(&p2) {
        assert!(a.starts_with("web1-shadow-1."), "{a}");
        assert_eq!(
            b.strip_prefix("web1-shadow-2."),
            a.strip_prefix("web1-shadow-1."),
            "{a} -> {b}"
        );
    }
}

fn plan_with_data(name: &str, overlays: &[(&str, &str)], data: &[&str]) -> ShadowPlan {
    ShadowPlan {
        data_disks: data.iter().map(|t| t.to_string()).collect(),
        ..plan(name, overlays)
    }
}

#[test]
fn data_disks_are_left_out_whatever_their_source() {
    // Block as a data disk: the shadow boots without it, the system disk gets its overlay.
    let p = plan_with_data("db2-shadow", &[("vda", "/o/vda.qcow2")], &["vdb"]);
    let s = shadow_spec(&parse(BLOCK_DISK), &p).unwrap();
    let targets: Vec<String> = s.disks().into_iter().map(|d| d.target_dev).collect();
    assert_eq!(targets, ["vda"]);
    assert!(!s.to_xml().contains("/dev/vg0/db2-data"));
    // Network and shareable disks too.
    for device in [
        "<disk type='network' device='disk'><driver name='qemu' type='raw'/>\
         <source protocol='nbd' name='export'><host name='10.0.0.5' port='10809'/></source>\
         <target dev='vdc' bus='virtio'/></disk>",
        "<disk type='file' device='disk'><source file='/i/shared.img'/>\
         <target dev='vdc'/><shareable/></disk>",
    ] {
        let xml = BLOCK_DISK.replace("</devices>", &format!("{device}</devices>"));
        let p = plan_with_data("db2-shadow", &[("vda", "/o/vda.qcow2")], &["vdb", "vdc"]);
        let s = shadow_spec(&parse(&xml), &p).unwrap();
        let targets: Vec<String> = s.disks().into_iter().map(|d| d.target_dev).collect();
        assert_eq!(targets, ["vda"], "{device}");
    }
}

#[test]
fn data_disks_must_be_writable_disks_of_the_domain() {
    let p = plan_with_data("db2-shadow", &[("vda", "/o/vda.qcow2")], &["vdb", "vdq"]);
    let err = refusal(BLOCK_DISK, &p);
    assert!(
        matches!(&err, CloneError::UnexpectedDataDisk { target, .. } if target == "vdq"),
        "{err:?}"
    );
    let ro = BLOCK_DISK.replace(
        "<target dev='vdb' bus='virtio'/>",
        "<target dev='vdb' bus='virtio'/>\n      <readonly/>",
    );
    let p = plan_with_data("db2-shadow", &[("vda", "/o/vda.qcow2")], &["vdb"]);
    assert!(matches!(
        refusal(&ro, &p),
        CloneError::UnexpectedDataDisk { .. }
    ));
    // A disk cannot be both handed over and overlaid.
    let p = plan_with_data(
        "db2-shadow",
        &[("vda", "/o/vda.qcow2"), ("vdb", "/o/vdb.qcow2")],
        &["vdb"],
    );
    assert!(matches!(
        refusal(BLOCK_DISK, &p),
        CloneError::InvalidPlan { .. }
    ));
}

#[test]
fn block_and_network_system_disks_boot_from_a_golden_overlay() {
    let xml = BLOCK_DISK.replace(
        "</devices>",
        "<disk type='network' device='disk'><driver name='qemu' type='raw'/>\
         <source protocol='rbd' name='pool/img'><host name='ceph1'/></source>\
         <auth username='admin'><secret type='ceph' uuid='0a81f5b2-8403-7b23-c8d6-21ccc2f80d6f'/></auth>\
         <target dev='vdc' bus='virtio'/></disk></devices>",
    );
    let p = plan(
        "db2-shadow",
        &[
            ("vda", "/o/vda.qcow2"),
            ("vdb", "/o/vdb.qcow2"),
            ("vdc", "/o/vdc.qcow2"),
        ],
    );
    let s = shadow_spec(&parse(&xml), &p).unwrap();
    let disks = s.disks();
    assert_eq!(disks.len(), 3);
    for d in &disks {
        assert_eq!(d.kind, DiskKind::File, "{d:?}");
        assert_eq!(d.driver_type.as_deref(), Some("qcow2"));
        assert_eq!(
            d.source.as_deref(),
            Some(format!("/o/{}.qcow2", d.target_dev).as_str())
        );
    }
    let out = s.to_xml();
    assert!(!out.contains("<auth"), "{out}");
    assert!(!out.contains("ceph1"), "{out}");
}

#[test]
fn emulated_tpm_is_kept_and_a_fixed_state_path_is_refused() {
    let p = plan("t1-shadow", &[]);
    let tpm = "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>";
    let s = shadow_spec(&parse(&with_device(tpm)), &p).unwrap();
    // A network system disk without a golden image is refused by name (see
    // refuses_writable_block_disk for the message).
    let rbd = "<disk type='network' device='disk'><source protocol='rbd' name='pool/img'/>\
               <target dev='vdc'/></disk>";
    assert!(matches!(
        refusal(&with_device(rbd), &p),
        CloneError::NoImageForSystemDisk { .. }
    ));
    assert!(
        s.to_xml().contains("<backend type=\"emulator\""),
        "{}",
        s.to_xml()
    );
    let fixed = "<tpm model='tpm-crb'><backend type='emulator' version='2.0'>\
                 <source type='dir' path='/srv/tpm/web1'/></backend></tpm>";
    let err = refusal(&with_device(fixed), &p);
    assert!(err.to_string().contains("fixed path"), "{err}");
}

#[test]
fn namespace_uris_that_cannot_be_written_back_are_refused() {
    // Found by the domain_xml fuzz target (fuzz/crashes/domain_xml/namespace-quote.xml): the
    // parse succeeded, but `to_xml` wrote `xmlns:qemu="...schem"s/..."`, which is not XML.
    let xml = include_str!("fixtures/fuzz-namespace-quote.xml");
    let err = DomainXml::parse(xml).unwrap_err();
    assert!(
        matches!(&err, XmlError::UnwritableNamespace { prefix, uri }
            if prefix == "qemu" && uri.contains("schem\"s")),
        "{err:?}"
    );
    assert!(err.to_string().contains("qemu"), "{err}");
    // Anywhere in the document, e.g. another tool's metadata.
    let other = xml
        .replace("schem\"s", "schemas")
        .replace("a&amp;b", "a\"b");
    let err = DomainXml::parse(&other).unwrap_err();
    assert!(
        matches!(&err, XmlError::UnwritableNamespace { prefix, uri }
            if prefix == "other" && uri == "urn:x-tool:a\"b"),
        "{err:?}"
    );
    // Without a quote the document round-trips, entity references in URIs included.
    let ok = xml.replace("schem\"s", "schemas");
    let dom = DomainXml::parse(&ok).unwrap();
    DomainXml::parse(&dom.to_xml()).unwrap();
}

#[test]
fn duplicate_disk_targets_are_refused() {
    // The shadow plan gives each target one overlay: with two disks on `vda`, both wrote
    // `<shadow>-vda.qcow2` (fuzz/crashes/domain_xml/duplicate-disk-target.xml).
    let err =
        DomainXml::parse(include_str!("fixtures/fuzz-duplicate-disk-target.xml")).unwrap_err();
    assert!(
        matches!(&err, XmlError::DuplicateDiskTarget { target, first: 0, second: 1 } if target == "vda"),
        "{err:?}"
    );
    assert!(err.to_string().contains("vda"), "{err}");
}

#[test]
fn free_page_reporting_is_set_on_the_virtio_balloon_only() {
    let mut d = parse(FULL);
    assert!(d.enable_free_page_reporting());
    let xml = d.to_xml();
    assert!(
        xml.contains("<memballoon model=\"virtio\" freePageReporting=\"on\">")
            || xml.contains("<memballoon model='virtio' freePageReporting='on'>"),
        "{xml}"
    );
    let mut none = parse(HOSTDEV);
    assert!(!none.enable_free_page_reporting());
    assert!(!none.to_xml().contains("freePageReporting"));
}

#[test]
fn a_pooled_shadow_spec_keeps_its_nics_on_placeholder_macs_and_one_can_be_renamed() {
    let mut d = parse(FULL);
    let before = d.interfaces();
    assert!(!before.is_empty());
    let n = d.set_interface_macs(|i| format!("0a:00:00:00:00:{i:02x}"));
    assert_eq!(n, before.len());
    let after = d.interfaces();
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        assert_eq!(
            a.mac.as_deref(),
            Some(format!("0a:00:00:00:00:{i:02x}").as_str())
        );
        assert_eq!(
            (&a.kind, &a.bridge, &a.model),
            (&b.kind, &b.bridge, &b.model)
        );
        assert_eq!(a.target_dev, None, "no tap name asked for");
    }
    assert!(d.rename_interface_mac("0A:00:00:00:00:00", "52:54:00:00:00:99"));
    assert!(!d.rename_interface_mac("0a:00:00:00:00:00", "52:54:00:00:00:98"));
    let d = DomainXml::parse(&d.to_xml()).expect("still a domain");
    assert_eq!(d.interfaces()[0].mac.as_deref(), Some("52:54:00:00:00:99"));
}

#[test]
fn page_sharing_is_allowed_by_dropping_nosharepages_only() {
    let xml = FULL.replacen(
        "<devices>",
        "<memoryBacking><nosharepages/><locked/></memoryBacking>\n  <devices>",
        1,
    );
    let mut d = parse(&xml);
    assert!(d.allow_page_sharing());
    let out = d.to_xml();
    assert!(
        !out.contains("nosharepages") && out.contains("<locked/>"),
        "{out}"
    );
    assert!(!d.allow_page_sharing(), "nothing left to drop");
    let mut alone = parse(&FULL.replacen(
        "<devices>",
        "<memoryBacking><nosharepages/></memoryBacking>\n  <devices>",
        1,
    ));
    assert!(alone.allow_page_sharing());
    assert!(
        !alone.to_xml().contains("memoryBacking"),
        "an empty one goes too"
    );
}

#[test]
fn a_device_loses_only_the_children_named() {
    let nic = "<interface type='bridge'><mac address='52:54:00:00:00:01'/><source bridge='br0'/><target dev='vnet0'/><alias name='net0'/><address type='pci' slot='0x03'/></interface>";
    let out = without_children(nic, &["address", "alias", "target"]).unwrap();
    assert!(
        out.contains("52:54:00:00:00:01") && out.contains("br0"),
        "{out}"
    );
    for gone in ["vnet0", "net0", "slot"] {
        assert!(!out.contains(gone), "{gone} in {out}");
    }
    assert!(without_children("<interface", &["address"]).is_err());
}

#[test]
fn more_vcpus_than_kvm_supports_are_refused_at_parse() {
    // Cloning this one (a per-vCPU list, 20,000 possible vCPUs) took minutes of CPU.
    let err = DomainXml::parse(include_str!("fixtures/fuzz-vcpus-list-20000.xml")).unwrap_err();
    assert!(
        matches!(
            err,
            XmlError::TooManyVcpus {
                max: 20000,
                limit: DOMAIN_VCPUS_MAX
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("20000"), "{err}");
    let at_limit = include_str!("fixtures/fuzz-vcpus-list-20000.xml")
        .replace(">20000<", &format!(">{DOMAIN_VCPUS_MAX}<"));
    assert_eq!(parse(&at_limit).vcpus().max, DOMAIN_VCPUS_MAX);
}

#[test]
fn shadow_extends_a_long_vcpus_list_up_to_the_limit() {
    let half = DOMAIN_VCPUS_MAX / 2;
    let primary = parse(
        &include_str!("fixtures/fuzz-vcpus-list-20000.xml")
            .replace(">20000<", &format!(">{half}<")),
    );
    let mut p = plan("big-shadow", &[]);
    p.vcpu_max = DOMAIN_VCPUS_MAX;
    let s = parse(&shadow_spec(&primary, &p).unwrap().to_xml());
    let list = tree::child_named(&s.xot, s.root, "vcpus").unwrap();
    let ids: Vec<String> = tree::children_named(&s.xot, list, "vcpu")
        .map(|v| attr_of(&s, v, "id").unwrap())
        .collect();
    // The one entry the primary had, then one disabled entry per added vCPU, in order.
    assert_eq!(ids.len() as u32, 1 + DOMAIN_VCPUS_MAX - half);
    assert_eq!(ids[1], half.to_string());
    assert_eq!(ids.last().unwrap(), &(DOMAIN_VCPUS_MAX - 1).to_string());
    assert_eq!(
        s.vcpus(),
        VcpuSpec {
            max: DOMAIN_VCPUS_MAX,
            current: half
        }
    );

    p.vcpu_max = DOMAIN_VCPUS_MAX + 1;
    let err = shadow_spec(&primary, &p).unwrap_err();
    assert!(
        matches!(
            err,
            CloneError::InvalidPlan {
                field: "vcpu_max",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn status_file_yields_the_live_definition_it_wraps() {
    // A status file libvirtd 9.0 wrote for a running lab primary (its data disk attached).
    let status = include_str!("fixtures/status.xml");
    let x = DomainXml::parse_status(status).unwrap();
    assert_eq!(x.name().as_deref(), Some("it-pro1"));
    let disks = x.disks();
    let vdb = disks.iter().find(|d| d.target_dev == "vdb").unwrap();
    assert_eq!(
        vdb.source.as_deref(),
        Some("/tmp/understudy-it-promote-23093/it-pro1-data.raw")
    );
    // A definition is not a status file, and a status file is not a definition.
    let err = DomainXml::parse_status(LIVE).unwrap_err();
    assert!(matches!(err, XmlError::NotStatus { .. }), "{err:?}");
    assert!(err.to_string().contains("<domain"), "{err}");
    assert!(matches!(
        DomainXml::parse(status).unwrap_err(),
        XmlError::NotDomain { .. }
    ));
    let err =
        DomainXml::parse_status("<domstatus state='running'><monitor/></domstatus>").unwrap_err();
    assert!(err.to_string().contains("without <domain>"), "{err}");
}

// ---------------------------------------------------------------- verification copies

const SAVED_SHADOW: &str = include_str!("fixtures/saved_shadow.xml");

fn copy_plan() -> CopyPlan {
    CopyPlan {
        name: "web1-shadow-3-verify".into(),
        uuid: "0b7c4b8e-3c1a-4a57-9a8e-6f0d2b1c9e11".into(),
        bridge: "usi1234abcdv".into(),
        disks: BTreeMap::from([(
            "vda".to_string(),
            PathBuf::from("/var/lib/understudy/isolated/web1-shadow-3-verify-vda.qcow2"),
        )]),
        console_dir: PathBuf::from("/var/lib/understudy/consoles"),
        meta: meta(Role::Isolated, MemberState::Paused, 0),
    }
}

#[test]
fn verify_copy_is_the_shadows_machine_on_its_own_bridge_and_disk_copies() {
    let saved = parse(SAVED_SHADOW);
    let plan = copy_plan();
    let copy = verify_copy_spec(&saved, &plan).unwrap();
    assert_eq!(copy.name().as_deref(), Some("web1-shadow-3-verify"));
    assert_eq!(copy.uuid().as_deref(), Some(plan.uuid.as_str()));
    // Same NIC (MAC, link raised, model), now a tap on the isolated bridge.
    let nics = copy.interfaces();
    assert_eq!(nics.len(), 1);
    assert_eq!(nics[0].kind, InterfaceKind::Bridge);
    assert_eq!(nics[0].bridge.as_deref(), Some("usi1234abcdv"));
    assert_eq!(nics[0].mac, saved.interfaces()[0].mac);
    assert!(nics[0].link_up);
    assert_eq!(nics[0].target_dev, None);
    // The overlay is the copy's; the CD-ROM is shared as it is; the chain below is kept.
    let disks = copy.disks();
    let vda = disks.iter().find(|d| d.target_dev == "vda").unwrap();
    assert_eq!(
        vda.source.as_deref(),
        Some("/var/lib/understudy/isolated/web1-shadow-3-verify-vda.qcow2")
    );
    assert!(copy.to_xml().contains("web1-base-vda.raw"));
    let cd = disks.iter().find(|d| d.target_dev == "hdc").unwrap();
    assert_eq!(cd.source.as_deref(), Some("/srv/iso/tools.iso"));
    // Its console is its own; the guest agent's socket is libvirt's per-domain one.
    let xml = copy.to_xml();
    assert!(!xml.contains("web1-shadow-3.console.log"), "{xml}");
    assert!(
        xml.contains("/var/lib/understudy/consoles/web1-shadow-3-verify.console.log"),
        "{xml}"
    );
    assert_eq!(
        copy.understudy_meta().unwrap().unwrap().role,
        Role::Isolated
    );
    // Everything else (memory, CPU, addresses) is the saved machine's.
    assert_eq!(copy.memory_kib(), saved.memory_kib());
    assert_eq!(copy.vcpus(), saved.vcpus());
    assert_eq!(
        xml.matches("<address ").count(),
        SAVED_SHADOW.matches("<address ").count()
    );
    assert!(xml.contains("0x05") && xml.contains("0x02"), "{xml}");
}

#[test]
fn verify_copy_never_shares_a_writable_disk_nor_copies_a_tpm() {
    let saved = parse(SAVED_SHADOW);
    let mut plan = copy_plan();
    plan.disks.clear();
    let e = verify_copy_spec(&saved, &plan).unwrap_err();
    assert!(e.to_string().contains("vda"), "{e}");
    let tpm = SAVED_SHADOW.replace(
        "<input type='mouse'",
        "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>\n    <input type='mouse'",
    );
    let e = verify_copy_spec(&parse(&tpm), &copy_plan()).unwrap_err();
    assert!(e.to_string().contains("TPM"), "{e}");
    let direct = SAVED_SHADOW.replace("<interface type='ethernet'>", "<interface type='direct'>");
    assert!(verify_copy_spec(&parse(&direct), &copy_plan()).is_err());
}

#[test]
fn a_nic_with_an_attribute_in_a_namespace_of_domain_is_found_and_serialized() {
    // Found by the domain_xml fuzz target: the NIC's copy lacked <domain>'s `qemu:` prefix.
    let d = parse(include_str!("fixtures/fuzz-nic-foreign-namespace-attr.xml"));
    let xml = d
        .interface_xml_with_link("52:54:00:6b:3c:58", true)
        .expect("the NIC's XML");
    assert!(xml.contains("qemu:commandlinebus"), "{xml}");
    assert!(xml.contains("xmlns:qemu="), "{xml}");
    // The other NIC needs no declaration and gets none.
    let plain = d
        .interface_xml_with_link("52:54:00:1a:2b:3c", false)
        .unwrap();
    assert!(!plain.contains("xmlns"), "{plain}");
}
