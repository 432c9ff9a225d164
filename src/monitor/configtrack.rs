//! Configuration tracking: content hashes and short previews of guest configuration items (files
//! read through the agent, or the output of a command), and the difference between two
//! snapshots.
//!
//! The hash is FNV-1a 64: a change detector, not a security measure (the guest owns its
//! configuration anyway, so an adversarial collision gains nothing). Previews may contain
//! secrets from the guest; callers choose the preview size (0 disables previews).

use std::collections::BTreeMap;
use std::fmt;

use thiserror::Error;

/// Errors recording configuration items.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// The snapshot already holds its maximum number of items.
    #[error("configuration snapshot is full ({max} items); {source_item} not recorded")]
    TooManyItems {
        /// Configured maximum.
        max: usize,
        /// The item that did not fit.
        source_item: ConfigSource,
    },
    /// The item source is unusable (relative path, empty argv).
    #[error("invalid configuration source {source_item}: {reason}")]
    InvalidSource {
        /// The rejected source.
        source_item: ConfigSource,
        /// Why.
        reason: &'static str,
    },
}

/// Where a configuration item comes from.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum ConfigSource {
    /// A file in the guest, by absolute path.
    File(String),
    /// The standard output of a command run in the guest (argv, no shell).
    Command(Vec<String>),
    /// The guest's operating system and kernel as its agent reports them (`guest-get-osinfo`):
    /// a kernel or distribution upgrade is a configuration change like any other.
    GuestOs,
}

impl fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigSource::File(p) => write!(f, "file {p}"),
            ConfigSource::Command(argv) => write!(f, "command {argv:?}"),
            ConfigSource::GuestOs => f.write_str("guest OS"),
        }
    }
}

impl ConfigSource {
    fn validate(&self) -> Result<(), &'static str> {
        match self {
            ConfigSource::File(p) if !p.starts_with('/') => Err("file path must be absolute"),
            ConfigSource::Command(argv) if argv.first().is_none_or(|a| a.is_empty()) => {
                Err("argv is empty")
            }
            _ => Ok(()),
        }
    }
}

/// FNV-1a, 64-bit (offset basis 0xcbf29ce484222325, prime 0x100000001b3).
pub fn fnv1a64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// One tracked item.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConfigItem {
    /// Where it comes from.
    pub source: ConfigSource,
    /// FNV-1a 64 of the full content.
    pub hash: u64,
    /// Content length in bytes.
    pub len: u64,
    /// Start of the content as text: invalid UTF-8 and control characters (other than newline
    /// and tab) replaced by U+FFFD.
    pub preview: String,
    /// Whether the preview is shorter than the content.
    pub preview_truncated: bool,
}

impl ConfigItem {
    /// Hashes `content` and keeps a preview of at most `preview_max` bytes of it.
    pub fn new(source: ConfigSource, content: &[u8], preview_max: usize) -> Self {
        let head = &content[..content.len().min(preview_max)];
        let mut preview: String = String::from_utf8_lossy(head)
            .chars()
            .map(|c| {
                if c.is_control() && c != '\n' && c != '\t' {
                    '\u{FFFD}'
                } else {
                    c
                }
            })
            .collect();
        // Lossy decoding may have grown the text (U+FFFD is 3 bytes): keep the byte bound.
        let mut end = preview.len().min(preview_max);
        while !preview.is_char_boundary(end) {
            end -= 1;
        }
        preview.truncate(end);
        ConfigItem {
            source,
            hash: fnv1a64(content),
            len: content.len() as u64,
            preview,
            preview_truncated: head.len() < content.len(),
        }
    }

    fn same_content(&self, other: &ConfigItem) -> bool {
        self.hash == other.hash && self.len == other.len
    }
}

/// Items captured at one point in time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigSnapshot {
    max_items: usize,
    items: BTreeMap<ConfigSource, ConfigItem>,
}

impl ConfigSnapshot {
    /// An empty snapshot holding at most `max_items` items.
    pub fn new(max_items: usize) -> Self {
        ConfigSnapshot {
            max_items,
            items: BTreeMap::new(),
        }
    }

    /// Records (or replaces) the content of `source`.
    pub fn record(
        &mut self,
        source: ConfigSource,
        content: &[u8],
        preview_max: usize,
    ) -> Result<(), ConfigError> {
        if let Err(reason) = source.validate() {
            return Err(ConfigError::InvalidSource {
                source_item: source,
                reason,
            });
        }
        if !self.items.contains_key(&source) && self.items.len() >= self.max_items {
            return Err(ConfigError::TooManyItems {
                max: self.max_items,
                source_item: source,
            });
        }
        self.items.insert(
            source.clone(),
            ConfigItem::new(source, content, preview_max),
        );
        Ok(())
    }

    /// The item for `source`.
    pub fn get(&self, source: &ConfigSource) -> Option<&ConfigItem> {
        self.items.get(source)
    }

    /// Items in source order.
    pub fn items(&self) -> impl Iterator<Item = &ConfigItem> {
        self.items.values()
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether there are no items.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// An item whose content changed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChangedItem {
    /// Before.
    pub old: ConfigItem,
    /// After.
    pub new: ConfigItem,
}

/// Difference between two snapshots, each list in source order.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConfigChange {
    /// Items only in the new snapshot.
    pub added: Vec<ConfigItem>,
    /// Items only in the old snapshot.
    pub removed: Vec<ConfigItem>,
    /// Items in both with different content.
    pub changed: Vec<ChangedItem>,
}

impl ConfigChange {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// What changed from `old` to `new`.
pub fn diff(old: &ConfigSnapshot, new: &ConfigSnapshot) -> ConfigChange {
    let mut change = ConfigChange::default();
    for (src, n) in &new.items {
        match old.items.get(src) {
            None => change.added.push(n.clone()),
            Some(o) if !o.same_content(n) => change.changed.push(ChangedItem {
                old: o.clone(),
                new: n.clone(),
            }),
            Some(_) => {}
        }
    }
    change.removed = old
        .items
        .iter()
        .filter(|(s, _)| !new.items.contains_key(*s))
        .map(|(_, o)| o.clone())
        .collect();
    change
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(p: &str) -> ConfigSource {
        ConfigSource::File(p.to_owned())
    }

    #[test]
    fn fnv1a64_reference_values() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn preview_is_bounded_and_sanitised() {
        let i = ConfigItem::new(file("/etc/x"), b"listen 80;\n\x1b[31mred\x00", 100);
        assert_eq!(i.preview, "listen 80;\n\u{FFFD}[31mred\u{FFFD}");
        assert!(!i.preview_truncated);
        assert_eq!(i.len, 20);
        let i = ConfigItem::new(file("/etc/x"), "héllo".as_bytes(), 2);
        // 2 bytes cut 'é' in half: the lossy replacement is 3 bytes, so nothing of it is kept.
        assert_eq!(i.preview, "h");
        assert!(i.preview.len() <= 2);
        assert!(i.preview_truncated);
        let i = ConfigItem::new(file("/etc/x"), b"secret", 0);
        assert_eq!(i.preview, "");
        assert_eq!(i.hash, fnv1a64(b"secret"));
    }

    #[test]
    fn diff_reports_added_removed_changed() {
        let mut a = ConfigSnapshot::new(10);
        a.record(file("/etc/nginx/nginx.conf"), b"worker_processes 2;", 64)
            .unwrap();
        a.record(file("/etc/hosts"), b"127.0.0.1 localhost", 64)
            .unwrap();
        a.record(
            ConfigSource::Command(vec!["/usr/bin/dpkg-query".into(), "-W".into()]),
            b"nginx 1.22",
            64,
        )
        .unwrap();
        let mut b = ConfigSnapshot::new(10);
        b.record(file("/etc/nginx/nginx.conf"), b"worker_processes 4;", 64)
            .unwrap();
        b.record(
            ConfigSource::Command(vec!["/usr/bin/dpkg-query".into(), "-W".into()]),
            b"nginx 1.22",
            64,
        )
        .unwrap();
        b.record(file("/etc/resolv.conf"), b"nameserver 10.0.0.1", 64)
            .unwrap();
        let d = diff(&a, &b);
        assert_eq!(
            d.added.iter().map(|i| &i.source).collect::<Vec<_>>(),
            [&file("/etc/resolv.conf")]
        );
        assert_eq!(
            d.removed.iter().map(|i| &i.source).collect::<Vec<_>>(),
            [&file("/etc/hosts")]
        );
        assert_eq!(d.changed.len(), 1);
        assert_eq!(d.changed[0].old.preview, "worker_processes 2;");
        assert_eq!(d.changed[0].new.preview, "worker_processes 4;");
        assert!(diff(&b, &b).is_empty());
    }

    #[test]
    fn snapshot_bounds_and_validation() {
        let mut s = ConfigSnapshot::new(1);
        s.record(file("/a"), b"1", 8).unwrap();
        s.record(file("/a"), b"2", 8).unwrap(); // replacing does not count
        assert_eq!(s.get(&file("/a")).unwrap().hash, fnv1a64(b"2"));
        assert!(matches!(
            s.record(file("/b"), b"", 8),
            Err(ConfigError::TooManyItems { max: 1, .. })
        ));
        assert!(matches!(
            s.record(file("rel"), b"", 8),
            Err(ConfigError::InvalidSource { .. })
        ));
        assert!(matches!(
            s.record(ConfigSource::Command(vec![]), b"", 8),
            Err(ConfigError::InvalidSource { .. })
        ));
        assert_eq!(s.len(), 1);
    }
}
