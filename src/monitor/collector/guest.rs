//! One guest agent round: CPU times every tick, interface and disk counters when the host has
//! none, socket tables and configuration items on their schedules. The first transport failure
//! (timeout, not connected, oversized reply) ends the round; garbage in one reply only loses
//! that reply; commands the agent does not know are not asked again.

use std::collections::{BTreeMap, BTreeSet};

use super::config::TrackedContent;
use super::{Collector, CollectorError, MAX_SOCKETS_PER_TABLE, MAX_SOCKET_TABLE_BYTES};
use crate::monitor::agent::{
    AgentError, AgentTransport, CpuStats, DiskStats, ExitStatus, GuestAgent, NetInterface, OsInfo,
};
use crate::monitor::configtrack::ConfigSource;
use crate::monitor::sockets::{self, Connection};

/// What the guest agent contributed to a tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestStatus {
    /// Every command of the round answered.
    Answered,
    /// Some commands answered, others failed (see the tick's errors).
    Partial,
    /// The agent failed at once: host-only data.
    Failed,
    /// Left alone after earlier transport failures: host-only data.
    BackingOff,
}

/// What one agent round asks besides the CPU times.
#[derive(Debug, Clone, Copy)]
pub(super) struct GuestRound {
    pub(super) interfaces: bool,
    pub(super) disks: bool,
    pub(super) sockets: bool,
    pub(super) config: bool,
}

/// The guest agent's answers of one round.
#[derive(Debug, Default)]
pub(super) struct GuestReading {
    pub(super) cpustats: Option<Vec<CpuStats>>,
    pub(super) interfaces: Option<Vec<NetInterface>>,
    pub(super) disks: Option<Vec<DiskStats>>,
    /// Sockets of every table that could be read (`None` when none could).
    pub(super) connections: Option<Vec<Connection>>,
    /// New content per configuration item, when this was a configuration round. Items whose
    /// read failed transiently are absent (their previous content stays); items the guest
    /// reported missing map to `None`.
    pub(super) config: Option<BTreeMap<ConfigSource, Option<TrackedContent>>>,
    pub(super) answered: usize,
    pub(super) failed: usize,
    pub(super) transport_failed: bool,
}

/// One agent round: stops at the first transport failure (timeout, not connected, oversized),
/// records every failure, and remembers commands the agent does not know.
struct Round<'a, T: AgentTransport> {
    agent: &'a GuestAgent<T>,
    domain: &'a str,
    unsupported: &'a mut BTreeSet<String>,
    errors: &'a mut Vec<CollectorError>,
    reading: GuestReading,
}

impl<T: AgentTransport> Round<'_, T> {
    fn call<R>(
        &mut self,
        what: &str,
        f: impl FnOnce(&GuestAgent<T>) -> Result<R, AgentError>,
    ) -> Result<R, Option<AgentError>> {
        if self.reading.transport_failed || self.unsupported.contains(what) {
            return Err(None);
        }
        match f(self.agent) {
            Ok(r) => {
                self.reading.answered += 1;
                Ok(r)
            }
            Err(e) => {
                match &e {
                    AgentError::Transport { .. } => {
                        self.reading.failed += 1;
                        self.reading.transport_failed = true;
                    }
                    // An error reply still proves a working agent.
                    AgentError::Guest { class, .. } => {
                        self.reading.answered += 1;
                        if class == "CommandNotFound" {
                            tracing::info!(
                                domain = self.domain,
                                what,
                                "guest agent lacks this command; not asked again"
                            );
                            self.unsupported.insert(what.to_string());
                        }
                    }
                    _ => self.reading.failed += 1,
                }
                Err(Some(e))
            }
        }
    }

    /// Like [`Round::call`], recording the failure as an error.
    fn ask<R>(
        &mut self,
        what: &str,
        f: impl FnOnce(&GuestAgent<T>) -> Result<R, AgentError>,
    ) -> Option<R> {
        match self.call(what, f) {
            Ok(r) => Some(r),
            Err(e) => {
                if let Some(source) = e {
                    self.errors.push(CollectorError::Agent {
                        domain: self.domain.to_string(),
                        what: what.to_string(),
                        source,
                    });
                }
                None
            }
        }
    }
}

impl Collector {
    pub(super) fn read_guest<T: AgentTransport>(
        &mut self,
        agent: &GuestAgent<T>,
        what: GuestRound,
        errors: &mut Vec<CollectorError>,
    ) -> GuestReading {
        let mut round = Round {
            agent,
            domain: &self.domain,
            unsupported: &mut self.unsupported,
            errors,
            reading: GuestReading::default(),
        };
        round.reading.cpustats = round.ask("cpustats", |a| a.cpustats());
        if what.interfaces {
            round.reading.interfaces = round.ask("interfaces", |a| a.interfaces());
        }
        if what.disks {
            round.reading.disks = round.ask("diskstats", |a| a.diskstats());
        }
        let mut connections: Option<Vec<Connection>> = None;
        let tables: &[(String, sockets::Proto)] = if what.sockets {
            &self.settings.socket_tables
        } else {
            &[]
        };
        for (path, proto) in tables {
            let what = format!("socket table {path}");
            let Some(file) = round.ask(&what, |a| a.read_file(path, MAX_SOCKET_TABLE_BYTES)) else {
                continue;
            };
            let text = String::from_utf8_lossy(&file.data);
            match sockets::parse_proc_net(&text, *proto, MAX_SOCKETS_PER_TABLE) {
                Ok(t) => connections
                    .get_or_insert_with(Vec::new)
                    .extend(t.connections),
                Err(source) => round.errors.push(CollectorError::SocketTable {
                    domain: self.domain.clone(),
                    path: path.clone(),
                    source,
                }),
            }
        }
        round.reading.connections = connections;
        if what.config {
            let mut items = BTreeMap::new();
            let max = self.settings.max_config_bytes;
            for path in &self.settings.config_files {
                let source = ConfigSource::File(path.clone());
                match round.call(&format!("config file {path}"), |a| a.read_file(path, max)) {
                    Ok(f) => {
                        items.insert(
                            source,
                            Some(TrackedContent {
                                content: f.data,
                                truncated: f.truncated,
                            }),
                        );
                    }
                    // The guest itself says no (missing, unreadable): the item is absent.
                    Err(Some(AgentError::Guest { .. })) => {
                        items.insert(source, None);
                    }
                    Err(Some(e)) => round.errors.push(CollectorError::Agent {
                        domain: self.domain.clone(),
                        what: format!("config file {path}"),
                        source: e,
                    }),
                    Err(None) => {}
                }
            }
            for argv in &self.settings.config_commands {
                let what = format!("config command {argv:?}");
                let timeout = self.settings.exec_timeout;
                if let Some(out) = round.ask(&what, |a| a.exec(argv, max, timeout)) {
                    let mut content = out.stdout.data;
                    // A failing command is a different state than its (empty) output says.
                    if out.status != ExitStatus::Code(0) {
                        content.extend_from_slice(format!("\n[{:?}]", out.status).as_bytes());
                    }
                    items.insert(
                        ConfigSource::Command(argv.clone()),
                        Some(TrackedContent {
                            content,
                            truncated: out.stdout.truncated,
                        }),
                    );
                }
            }
            if let Some(os) = round.ask("osinfo", |a| a.osinfo()) {
                items.insert(
                    ConfigSource::GuestOs,
                    Some(TrackedContent {
                        content: os_description(&os).into_bytes(),
                        truncated: false,
                    }),
                );
            }
            // Items a failed read missed keep their previous content; a round that read nothing
            // because the agent failed is retried at the next tick.
            if !round.reading.transport_failed || !items.is_empty() {
                round.reading.config = Some(items);
            }
        }
        round.reading
    }
}

/// The `guest-get-osinfo` fields that identify a system, one `key=value` line each (absent
/// fields left out), as the configuration item's content.
fn os_description(os: &OsInfo) -> String {
    [
        ("id", &os.id),
        ("version-id", &os.version_id),
        ("variant-id", &os.variant_id),
        ("kernel-release", &os.kernel_release),
        ("kernel-version", &os.kernel_version),
        ("machine", &os.machine),
    ]
    .iter()
    .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v}\n")))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::libvirt::DomainStats;
    use crate::monitor::agent::AgentTransportError;
    use crate::monitor::collector::test_support::*;
    use crate::monitor::collector::MAX_AGENT_BACKOFF_TICKS;
    use std::time::Duration;

    #[test]
    fn sockets_are_read_on_their_own_schedule_and_interfaces_only_without_host_counters() {
        let fake = healthy_agent();
        let mut s = settings();
        s.sockets_every = 3;
        let agent = GuestAgent::new(&fake, s.agent.clone());
        let (mut c, _) = Collector::new("web", "web-dom", s, None);
        let stats = || {
            Some(DomainStats {
                net_rx_bytes: Some(0),
                net_tx_bytes: Some(0),
                ..balloon(196_608, 96_608)
            })
        };
        let mut socket_ticks = Vec::new();
        for i in 1..=7u64 {
            fake.clear_sent();
            let t = c.tick(host(i, 1, stats()), &agent, T0 + i * 1000, i * 1000);
            let sent = fake.sent();
            if sent.iter().any(|c| c.contains("/proc/net/tcp")) {
                socket_ticks.push(i);
                if i > 1 {
                    assert!(!t.observation.unwrap().peers.is_empty());
                }
            } else if let Some(o) = t.observation {
                assert!(o.peers.is_empty(), "peers without a socket round");
            }
            assert!(
                !sent.contains(&"guest-network-get-interfaces".to_string()),
                "libvirt has the tap counters; the guest's are not needed"
            );
        }
        assert_eq!(socket_ticks, [1, 4, 7]);
        // Without host counters the guest's interfaces are asked.
        fake.clear_sent();
        c.tick(host(8, 1, None), &agent, T0 + 8000, 8000);
        assert!(fake
            .sent()
            .contains(&"guest-network-get-interfaces".to_string()));
    }

    #[test]
    fn hung_agent_degrades_to_host_only_and_backs_off() {
        let fake = FakeAgent::default();
        fake.always(
            "guest-get-cpustats",
            Err(AgentTransportError::Timeout(Duration::from_secs(1))),
        );
        let agent = GuestAgent::new(&fake, settings().agent);
        let (mut c, _) = Collector::new("web", "web-dom", settings(), None);
        let t = c.tick(host(0, 1 << 30, None), &agent, T0, 1_000);
        assert_eq!(t.guest, GuestStatus::Failed);
        // One timeout ends the round: nothing else was asked.
        assert_eq!(fake.sent(), ["guest-get-cpustats"]);
        assert_eq!(t.errors.len(), 1);
        assert_eq!(t.errors[0].source_label(), "agent");
        fake.clear_sent();
        let t = c.tick(
            host(1_000_000_000, 1 << 30, None),
            &agent,
            T0 + 1_000,
            2_000,
        );
        assert_eq!(t.guest, GuestStatus::BackingOff);
        assert!(fake.sent().is_empty(), "agent asked while backing off");
        // Host-only data still makes a sample and an observation.
        let o = t.observation.unwrap();
        assert!((o.cpu_cores - 1.0).abs() < 1e-9);
        assert_eq!(o.mem_bytes, 1 << 30, "cgroup memory without balloon stats");
        assert!(o.peers.is_empty() && o.config.is_empty());
        // The pause doubles with every failed round, up to the cap.
        let mut asked_at = Vec::new();
        for i in 2..80u64 {
            fake.clear_sent();
            c.tick(host(i, 1, None), &agent, T0 + i * 1000, 1_000 + i * 1000);
            if !fake.sent().is_empty() {
                asked_at.push(i + 1);
            }
        }
        let gaps: Vec<u64> = asked_at.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(gaps[..4], [4, 8, 16, 32]);
        assert!(gaps.iter().all(|g| *g <= MAX_AGENT_BACKOFF_TICKS));
    }

    #[test]
    fn garbage_and_oversized_replies_lose_only_their_part() {
        let fake = healthy_agent();
        fake.always("guest-get-cpustats", Ok("{not json".into()));
        fake.always(
            "guest-network-get-interfaces",
            Ok(format!(
                r#"{{"return":[{}]}}"#,
                vec![r#"{"name":"x"}"#; 300].join(",")
            )),
        );
        fake.file("/proc/net/tcp", b"garbage line\n");
        let agent = GuestAgent::new(&fake, settings().agent);
        let (mut c, _) = Collector::new("web", "web-dom", settings(), None);
        c.tick(host(0, 1 << 20, None), &agent, T0, 1_000);
        let t = c.tick(host(500_000_000, 1 << 20, None), &agent, T0 + 1_000, 2_000);
        let labels: Vec<&str> = t.errors.iter().map(|e| e.source_label()).collect();
        assert!(
            labels.contains(&"agent") && labels.contains(&"sockets"),
            "{labels:?}"
        );
        assert_eq!(t.guest, GuestStatus::Partial);
        // Host CPU stands in for the guest's.
        assert!((t.observation.unwrap().cpu_cores - 0.5).abs() < 1e-9);
        // An oversized transport reply is a transport failure: host-only, back off.
        let fake = FakeAgent::default();
        fake.always(
            "guest-get-cpustats",
            Err(AgentTransportError::Other(
                "reply of 20000000 bytes, more than 1048576".into(),
            )),
        );
        let agent = GuestAgent::new(&fake, settings().agent);
        let (mut c, _) = Collector::new("web", "web-dom", settings(), None);
        let t = c.tick(host(0, 1, None), &agent, T0, 1_000);
        assert_eq!(t.guest, GuestStatus::Failed);
        let t = c.tick(host(1, 1, None), &agent, T0 + 1_000, 2_000);
        assert_eq!(t.guest, GuestStatus::BackingOff);
    }

    #[test]
    fn unknown_commands_are_not_asked_again() {
        let fake = healthy_agent();
        fake.always(
            "guest-get-cpustats",
            Ok(r#"{"error":{"class":"CommandNotFound","desc":"no"}}"#.into()),
        );
        let agent = GuestAgent::new(&fake, settings().agent);
        let (mut c, _) = Collector::new("web", "web-dom", settings(), None);
        c.tick(host(0, 1, None), &agent, T0, 1_000);
        fake.clear_sent();
        let t = c.tick(host(1, 1, None), &agent, T0 + 1_000, 2_000);
        assert!(!fake.sent().contains(&"guest-get-cpustats".to_string()));
        assert!(fake
            .sent()
            .contains(&"guest-network-get-interfaces".to_string()));
        assert_eq!(t.guest, GuestStatus::Answered);
    }
}
