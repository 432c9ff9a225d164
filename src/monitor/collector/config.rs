//! The guest's configuration items (the class's files and commands, and the guest OS): their
//! latest content, the snapshot of their hashes for the profile, the changes between two reads,
//! and the whole files offered to a promoted shadow.

use std::collections::BTreeMap;

use super::{Collector, CollectorError, MAX_CONFIG_ITEMS};
use crate::monitor::configtrack::{self, ConfigSnapshot, ConfigSource};

/// The latest content of one tracked guest file, for delivery to a promoted shadow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigFileContent {
    /// Absolute guest path.
    pub path: String,
    /// The whole file (files larger than the bound are never offered).
    pub content: Vec<u8>,
    /// FNV-1a 64 of `content`.
    pub hash: u64,
}

/// One tracked configuration item: its last content (bounded) and whether that was cut.
#[derive(Debug, Clone)]
pub(super) struct TrackedContent {
    pub(super) content: Vec<u8>,
    pub(super) truncated: bool,
}

impl Collector {
    /// The latest complete content of every tracked guest file (cut files are left out: they
    /// cannot be delivered whole).
    pub fn config_files(&self) -> Vec<ConfigFileContent> {
        self.contents
            .iter()
            .filter(|(_, c)| !c.truncated)
            .filter_map(|(source, c)| match source {
                ConfigSource::File(path) => Some(ConfigFileContent {
                    path: path.clone(),
                    hash: configtrack::fnv1a64(&c.content),
                    content: c.content.clone(),
                }),
                ConfigSource::Command(_) | ConfigSource::GuestOs => None,
            })
            .collect()
    }

    /// Applies a configuration round; returns whether anything changed.
    pub(super) fn update_config(
        &mut self,
        items: BTreeMap<ConfigSource, Option<TrackedContent>>,
        errors: &mut Vec<CollectorError>,
    ) -> bool {
        let mut contents = std::mem::take(&mut self.contents);
        for (source, content) in items {
            match content {
                Some(c) => {
                    contents.insert(source, c);
                }
                None => {
                    contents.remove(&source);
                }
            }
        }
        let mut snapshot = ConfigSnapshot::new(MAX_CONFIG_ITEMS);
        let mut kept = BTreeMap::new();
        for (source, c) in contents {
            match snapshot.record(source.clone(), &c.content, 0) {
                Ok(()) => {
                    kept.insert(source, c);
                }
                Err(source) => errors.push(CollectorError::Config {
                    domain: self.domain.clone(),
                    source,
                }),
            }
        }
        self.contents = kept;
        let changed = match &self.config {
            Some(old) => {
                let change = configtrack::diff(old, &snapshot);
                if !change.is_empty() {
                    let names = |items: &[configtrack::ConfigItem]| {
                        items
                            .iter()
                            .map(|i| i.source.to_string())
                            .collect::<Vec<_>>()
                    };
                    tracing::info!(
                        service = %self.service,
                        domain = %self.domain,
                        added = ?names(&change.added),
                        removed = ?names(&change.removed),
                        changed = ?change.changed.iter().map(|c| c.new.source.to_string()).collect::<Vec<_>>(),
                        "guest configuration changed"
                    );
                }
                !change.is_empty()
            }
            None => false,
        };
        self.config = Some(snapshot);
        changed
    }

    /// Item name -> content hash, as the profile records configuration.
    pub(super) fn config_hashes(&self) -> BTreeMap<String, String> {
        self.config
            .iter()
            .flat_map(|s| s.items())
            .map(|i| (config_item_name(&i.source), format!("{:016x}", i.hash)))
            .collect()
    }
}

/// The profile's name of a configuration item: `file:<path>` or `cmd:<argv joined by spaces>`.
pub fn config_item_name(source: &ConfigSource) -> String {
    match source {
        ConfigSource::File(p) => format!("file:{p}"),
        ConfigSource::Command(argv) => format!("cmd:{}", argv.join(" ")),
        ConfigSource::GuestOs => "os".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::agent::GuestAgent;
    use crate::monitor::collector::test_support::*;

    #[test]
    fn guest_os_is_a_configuration_item() {
        let fake = healthy_agent();
        let mut s = settings();
        s.config_every = 1;
        let agent = GuestAgent::new(&fake, s.agent.clone());
        let (mut c, _) = Collector::new("web", "web-dom", s, None);
        c.tick(host(0, 1, None), &agent, T0, 1_000);
        let t = c.tick(host(1, 1, None), &agent, T0 + 1_000, 2_000);
        assert!(!t.config_changed);
        let expected = "id=debian\nversion-id=12\nkernel-release=6.1.0-28-amd64\nkernel-version=#1 SMP\nmachine=x86_64\n";
        assert_eq!(
            t.observation.unwrap().config["os"],
            format!("{:016x}", configtrack::fnv1a64(expected.as_bytes()))
        );
        // The OS is configuration to compare, not a file to deliver at promotion.
        assert!(c.config_files().iter().all(|f| f.path.starts_with('/')));
        fake.always("guest-get-osinfo", Ok(osinfo("6.1.0-29-amd64")));
        let t = c.tick(host(2, 1, None), &agent, T0 + 2_000, 3_000);
        assert!(
            t.config_changed,
            "a kernel upgrade is a configuration change"
        );
    }

    #[test]
    fn config_is_reread_on_schedule_and_changes_are_noticed() {
        let fake = healthy_agent();
        let mut s = settings();
        s.config_every = 3;
        let agent = GuestAgent::new(&fake, s.agent.clone());
        let (mut c, _) = Collector::new("web", "web-dom", s, None);
        c.tick(host(0, 1, None), &agent, T0, 1_000);
        fake.clear_sent();
        c.tick(host(1, 1, None), &agent, T0 + 1_000, 2_000);
        assert!(
            !fake.sent().iter().any(|c| c.contains("app.conf")),
            "config read outside its round"
        );
        fake.file("/etc/app.conf", b"workers = 8\n");
        let t = c.tick(host(2, 1, None), &agent, T0 + 2_000, 3_000);
        assert!(t.config_changed);
        assert_eq!(c.config_files()[0].content, b"workers = 8\n");
        assert_eq!(
            t.observation.unwrap().config["file:/etc/app.conf"],
            format!("{:016x}", configtrack::fnv1a64(b"workers = 8\n"))
        );
    }
}
