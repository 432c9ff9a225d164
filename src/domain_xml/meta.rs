//! understudy's own `<metadata>` element: who a domain is in its service.
//!
//! Stored in the domain XML as
//! `<understudy:member xmlns:understudy="https://understudy.dev/xmlns/domain/1" service=".."
//! class=".." role="shadow" generation="3" state="paused" journal=".."/>`, and exchanged with
//! libvirt through `virDomainSetMetadata`/`virDomainGetMetadata` (type ELEMENT, key
//! [`META_PREFIX`], uri [`META_NS`]). Readers match on the namespace, never the prefix: libvirt
//! and other tools may rewrite it.

use std::borrow::Cow;
use std::fmt;

use serde::{Deserialize, Serialize};
use xot::{Node, Xot};

use super::tree::{self, clip};
use super::XmlError;

/// XML namespace of understudy's metadata element.
pub const META_NS: &str = "https://understudy.dev/xmlns/domain/1";
/// Prefix (and libvirt metadata key) used when writing the element.
pub const META_PREFIX: &str = "understudy";
/// Local name of the element.
pub(super) const META_ELEMENT: &str = "member";

/// Longest accepted `service`/`class` value, in bytes.
pub const META_NAME_MAX: usize = 256;
/// Longest accepted `journal` value, in bytes.
pub const META_JOURNAL_MAX: usize = 4096;
/// Longest accepted element text handed to [`UnderstudyMeta::from_element_xml`].
const META_XML_MAX: usize = 64 * 1024;

/// What a domain is for its service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Serving the service.
    Primary,
    /// A paused or standing-by clone ready to take over.
    Shadow,
    /// A former primary that lost its role (fenced or replaced) and must not come back.
    Retired,
}

impl Role {
    /// The lowercase string stored in XML.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Shadow => "shadow",
            Role::Retired => "retired",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "primary" => Role::Primary,
            "shadow" => Role::Shadow,
            "retired" => Role::Retired,
            _ => return None,
        })
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Lifecycle state of a member domain as understudy last recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    /// Started, not yet ready.
    Booting,
    /// Paused, standing by (the normal state of a shadow).
    Paused,
    /// Standing by as a managed-save image (the `saved` tier): shut off, restored at promotion.
    Saved,
    /// Standing by defined only (the `cold` tier): booted at promotion.
    Cold,
    /// In the middle of a promotion; `journal` says how far it got.
    Promoting,
    /// Running and serving (or ready to).
    Active,
    /// Failed; kept for inspection.
    Failed,
    /// Cut off from the network and storage so it cannot interfere.
    Fenced,
    /// Shut off.
    Stopped,
}

impl MemberState {
    /// The lowercase string stored in XML.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Booting => "booting",
            MemberState::Paused => "paused",
            MemberState::Saved => "saved",
            MemberState::Cold => "cold",
            MemberState::Promoting => "promoting",
            MemberState::Active => "active",
            MemberState::Failed => "failed",
            MemberState::Fenced => "fenced",
            MemberState::Stopped => "stopped",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "booting" => MemberState::Booting,
            "paused" => MemberState::Paused,
            "saved" => MemberState::Saved,
            "cold" => MemberState::Cold,
            "promoting" => MemberState::Promoting,
            "active" => MemberState::Active,
            "failed" => MemberState::Failed,
            "fenced" => MemberState::Fenced,
            "stopped" => MemberState::Stopped,
            _ => return None,
        })
    }
}

impl fmt::Display for MemberState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// understudy's record in a domain's `<metadata>`.
///
/// Text fields should hold no control characters: XML attributes cannot carry most of them
/// faithfully, so writers replace each with U+FFFD. [`UnderstudyMeta::validate`] checks this
/// and the length limits; values that pass round-trip exactly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnderstudyMeta {
    /// Protected service this domain belongs to.
    pub service: String,
    /// Deployment class (profile) of the service.
    pub class: String,
    /// Role of this domain.
    pub role: Role,
    /// Promotion generation; bumps on every failover so stale members can be recognised.
    pub generation: u64,
    /// Lifecycle state.
    pub state: MemberState,
    /// Promotion step journal: opaque short text owned by the failover code.
    pub journal: Option<String>,
}

/// Whether `c` can go into an XML attribute and come back unchanged.
fn attr_safe(c: char) -> bool {
    !c.is_control() && c != '\u{FFFE}' && c != '\u{FFFF}'
}

/// Replaces characters that cannot survive an XML attribute round trip.
fn sanitize(s: &str) -> Cow<'_, str> {
    if s.chars().all(attr_safe) {
        Cow::Borrowed(s)
    } else {
        Cow::Owned(
            s.chars()
                .map(|c| if attr_safe(c) { c } else { '\u{FFFD}' })
                .collect(),
        )
    }
}

fn escape_attr(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in sanitize(s).chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

fn check_text(attribute: &'static str, value: &str, limit: usize) -> Result<(), XmlError> {
    if value.len() > limit {
        return Err(XmlError::MetaValueTooLong {
            attribute,
            len: value.len(),
            limit,
        });
    }
    if !value.chars().all(attr_safe) {
        return Err(XmlError::InvalidMetaValue {
            attribute,
            value: clip(value, 64),
            expected: "text without control characters",
        });
    }
    Ok(())
}

impl UnderstudyMeta {
    /// Attribute values in document order (the optional journal last).
    fn attributes(&self) -> Vec<(&'static str, Cow<'_, str>)> {
        let mut attrs = vec![
            ("service", Cow::Borrowed(self.service.as_str())),
            ("class", Cow::Borrowed(self.class.as_str())),
            ("role", Cow::Borrowed(self.role.as_str())),
            ("generation", Cow::Owned(self.generation.to_string())),
            ("state", Cow::Borrowed(self.state.as_str())),
        ];
        if let Some(j) = &self.journal {
            attrs.push(("journal", Cow::Borrowed(j.as_str())));
        }
        attrs
    }

    /// Checks lengths and characters, i.e. that the record round-trips through XML unchanged.
    pub fn validate(&self) -> Result<(), XmlError> {
        for (attribute, value) in [("service", &self.service), ("class", &self.class)] {
            if value.is_empty() {
                return Err(XmlError::InvalidMetaValue {
                    attribute,
                    value: String::new(),
                    expected: "a non-empty name",
                });
            }
            check_text(attribute, value, META_NAME_MAX)?;
        }
        if let Some(j) = &self.journal {
            check_text("journal", j, META_JOURNAL_MAX)?;
        }
        Ok(())
    }

    /// The standalone element, namespace declared on it, for `virDomainSetMetadata`
    /// (type ELEMENT, key [`META_PREFIX`], uri [`META_NS`]).
    pub fn to_element_xml(&self) -> String {
        let mut out = format!("<{META_PREFIX}:{META_ELEMENT} xmlns:{META_PREFIX}=\"{META_NS}\"");
        for (name, value) in self.attributes() {
            out.push_str(&format!(" {name}=\"{}\"", escape_attr(&value)));
        }
        out.push_str("/>");
        out
    }

    /// The element as `virDomainSetMetadata` wants it: unprefixed and without a namespace
    /// declaration, because libvirt puts it into [`META_NS`] under the key it is given and
    /// fails ("failed to create a new XML namespace") when the element declares one itself.
    pub fn to_libvirt_xml(&self) -> String {
        let mut out = format!("<{META_ELEMENT}");
        for (name, value) in self.attributes() {
            out.push_str(&format!(" {name}=\"{}\"", escape_attr(&value)));
        }
        out.push_str("/>");
        out
    }

    /// Parses what `virDomainGetMetadata` returns for our namespace URI: libvirt hands the
    /// element back unprefixed and without a namespace declaration (the URI was the query), so
    /// an undeclared `<member>` is put into [`META_NS`] before parsing.
    pub fn from_libvirt_xml(s: &str) -> Result<Self, XmlError> {
        let trimmed = s.trim_start();
        let bare = format!("<{META_ELEMENT}");
        match trimmed.strip_prefix(bare.as_str()) {
            Some(rest) if !trimmed.contains("xmlns") && rest.starts_with([' ', '/', '>']) => {
                Self::from_element_xml(&format!("<{META_ELEMENT} xmlns=\"{META_NS}\"{rest}"))
            }
            _ => Self::from_element_xml(s),
        }
    }

    /// Parses the element as `virDomainGetMetadata` returns it; any prefix is accepted as long
    /// as the namespace is [`META_NS`].
    pub fn from_element_xml(s: &str) -> Result<Self, XmlError> {
        if s.len() > META_XML_MAX {
            return Err(XmlError::TooLarge {
                what: "understudy metadata element",
                len: s.len(),
                limit: META_XML_MAX,
            });
        }
        let mut xot = Xot::new();
        let doc = xot.parse(s).map_err(|source| XmlError::Parse {
            offset: source.span().start,
            source,
        })?;
        let root = xot.document_element(doc).map_err(XmlError::Tree)?;
        Self::from_node(&xot, root)
    }

    /// Reads the record from an element already in a tree.
    pub(super) fn from_node(xot: &Xot, node: Node) -> Result<Self, XmlError> {
        match tree::element_name(xot, node) {
            Some((META_ELEMENT, META_NS)) => {}
            _ => {
                return Err(XmlError::NotMemberElement {
                    found: tree::start_tag(xot, node),
                })
            }
        }
        let get = |attribute: &'static str| {
            tree::attr(xot, node, attribute).ok_or(XmlError::MissingMetaAttribute { attribute })
        };
        let service = get("service")?.to_string();
        let class = get("class")?.to_string();
        let role_s = get("role")?;
        let role = Role::parse(role_s).ok_or_else(|| XmlError::InvalidMetaValue {
            attribute: "role",
            value: clip(role_s, 64),
            expected: "primary, shadow or retired",
        })?;
        let generation_s = get("generation")?;
        let generation = generation_s
            .parse()
            .map_err(|source| XmlError::InvalidNumber {
                what: "understudy metadata generation".to_string(),
                value: clip(generation_s, 40),
                source,
            })?;
        let state_s = get("state")?;
        let state = MemberState::parse(state_s).ok_or_else(|| XmlError::InvalidMetaValue {
            attribute: "state",
            value: clip(state_s, 64),
            expected: "booting, paused, promoting, active, failed, fenced or stopped",
        })?;
        let journal = tree::attr(xot, node, "journal").map(str::to_string);
        let meta = UnderstudyMeta {
            service,
            class,
            role,
            generation,
            state,
            journal,
        };
        meta.validate()?;
        Ok(meta)
    }

    /// Builds the element, unattached, inside `xot`, declaring its own prefix.
    pub(super) fn build_node(&self, xot: &mut Xot) -> Node {
        let ns = xot.add_namespace(META_NS);
        let prefix = xot.add_prefix(META_PREFIX);
        let name = xot.add_name_ns(META_ELEMENT, ns);
        let el = xot.new_element(name);
        xot.namespaces_mut(el).insert(prefix, ns);
        for (attribute, value) in self.attributes() {
            tree::set_attr(xot, el, attribute, &sanitize(&value));
        }
        el
    }
}
