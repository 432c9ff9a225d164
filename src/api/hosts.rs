//! The answer to `understudy hosts`: every host of the cluster with its liveness, drain state,
//! capacity, and the primaries and shadows on it; and its text rendering.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::cluster::liveness::PeerView;
use crate::cluster::{HostCapacity, HostState, Mode, ShadowStatus};

/// Answer to [`super::protocol::Request::Hosts`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostsReport {
    /// The host that answered.
    pub this_host: String,
    /// How that host stands with etcd.
    pub mode: Mode,
    /// Milliseconds since the last acknowledged keepalive was sent (with a lease).
    pub last_keepalive_ms_ago: Option<u64>,
    /// The lease's time to live in milliseconds (in a cluster).
    pub lease_ttl_ms: Option<u64>,
    /// Every host, by name.
    pub hosts: Vec<HostEntry>,
    /// The other hosts' direct heartbeats as the answering host hears them: when each was
    /// last heard, its etcd mode as its beats say, whether it is suspect.
    #[serde(default)]
    pub peers: Vec<PeerView>,
    /// The answering host fenced itself (its lease could not be renewed) and has not renewed
    /// it since.
    #[serde(default)]
    pub self_fenced: bool,
    /// Why the cluster's records (hosts, owners, shadows) are missing from this answer: etcd
    /// could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub records_error: Option<String>,
}

/// One host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostEntry {
    /// Its name.
    pub name: String,
    /// It registered (false: only named by a record, e.g. an owner on a host that never
    /// registered under this prefix).
    pub known: bool,
    /// Its lease is alive.
    pub alive: bool,
    /// Active or draining.
    pub state: HostState,
    /// Where its libvirtd is reached.
    pub libvirt_uri: String,
    /// Memory and CPUs when it last wrote its facts.
    pub capacity: Option<HostCapacity>,
    /// When it last wrote its facts (Unix ms).
    pub updated_unix_ms: u64,
    /// Its daemon's version.
    pub version: String,
    /// Services whose owner record names it.
    pub primaries: Vec<HostPrimary>,
    /// Shadows registered on it.
    pub shadows: Vec<HostShadow>,
}

impl HostEntry {
    /// A host named by a record but never registered.
    pub fn unknown(name: &str) -> Self {
        HostEntry {
            name: name.to_string(),
            known: false,
            alive: false,
            state: HostState::Active,
            libvirt_uri: String::new(),
            capacity: None,
            updated_unix_ms: 0,
            version: String::new(),
            primaries: Vec::new(),
            shadows: Vec::new(),
        }
    }
}

/// A primary on a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostPrimary {
    /// The service.
    pub service: String,
    /// The domain serving it.
    pub domain: String,
    /// Its owner generation.
    pub generation: u64,
}

/// A shadow on a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostShadow {
    /// The service.
    pub service: String,
    /// The shadow's domain.
    pub shadow: String,
    /// Provisioning or ready.
    pub status: ShadowStatus,
}

/// `report` as text, one block per host.
pub fn render_hosts_text(report: &HostsReport) -> String {
    let mut out = String::new();
    let _ = write!(out, "{} ({}", report.this_host, report.mode.label());
    if let (Some(ago), Some(ttl)) = (report.last_keepalive_ms_ago, report.lease_ttl_ms) {
        let _ = write!(
            out,
            ", last keepalive {ago} ms ago, lease TTL {} s",
            ttl / 1000
        );
    }
    out.push_str(")\n");
    if report.self_fenced {
        out.push_str("SELF-FENCED: its lease could not be renewed; its primaries were destroyed\n");
    }
    if let Some(e) = &report.records_error {
        let _ = writeln!(out, "cluster records unreadable: {e}");
        for p in &report.peers {
            let _ = write!(out, "\nhost {}", p.host);
            match p.heard_ms_ago {
                Some(ago) => {
                    let _ = write!(out, ": heartbeat {ago} ms ago");
                }
                None => out.push_str(": no heartbeat heard"),
            }
            if let Some(m) = p.mode {
                let _ = write!(out, ", {}", m.label());
            }
            if p.suspect {
                out.push_str(", SUSPECT");
            }
            out.push('\n');
        }
    }
    for h in &report.hosts {
        let live = match (h.known, h.alive) {
            (false, _) => "unregistered",
            (true, true) => "alive",
            (true, false) => "LOST",
        };
        let state = match h.state {
            HostState::Active => "active",
            HostState::Draining => "draining",
        };
        let _ = write!(out, "\nhost {}: {live}, {state}", h.name);
        if let Some(c) = &h.capacity {
            let _ = write!(
                out,
                ", {:.1} of {:.1} GiB free, {} CPUs",
                c.mem_available_kib as f64 / 1048576.0,
                c.mem_total_kib as f64 / 1048576.0,
                c.cpus
            );
        }
        if !h.libvirt_uri.is_empty() {
            let _ = write!(out, ", {}", h.libvirt_uri);
        }
        if let Some(p) = report.peers.iter().find(|p| p.host == h.name) {
            match p.heard_ms_ago {
                Some(ago) => {
                    let _ = write!(out, "; heartbeat {ago} ms ago");
                }
                None => out.push_str("; no heartbeat heard"),
            }
            if let Some(m) = p.mode {
                let _ = write!(out, ", {}", m.label());
            }
            if p.suspect {
                out.push_str(", SUSPECT");
            }
        }
        out.push('\n');
        if h.primaries.is_empty() && h.shadows.is_empty() {
            out.push_str("  (nothing)\n");
        }
        for p in &h.primaries {
            let _ = writeln!(
                out,
                "  primary {:<20} {} (generation {})",
                p.service, p.domain, p.generation
            );
        }
        for s in &h.shadows {
            let status = match s.status {
                ShadowStatus::Ready => "ready",
                ShadowStatus::Provisioning => "provisioning",
            };
            let _ = writeln!(out, "  shadow  {:<20} {} ({status})", s.service, s.shadow);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_host_is_rendered_with_its_members() {
        let mut h1 = HostEntry::unknown("h1");
        h1.known = true;
        h1.alive = true;
        h1.libvirt_uri = "qemu+tcp://10.78.0.1/system".into();
        h1.capacity = Some(HostCapacity {
            mem_total_kib: 8 << 20,
            mem_available_kib: 4 << 20,
            cpus: 2,
        });
        h1.primaries.push(HostPrimary {
            service: "web1".into(),
            domain: "web1".into(),
            generation: 3,
        });
        let mut h2 = HostEntry::unknown("h2");
        h2.known = true;
        h2.state = HostState::Draining;
        h2.shadows.push(HostShadow {
            service: "web1".into(),
            shadow: "web1-shadow-4".into(),
            status: ShadowStatus::Ready,
        });
        let r = HostsReport {
            this_host: "h1".into(),
            mode: Mode::Connected,
            last_keepalive_ms_ago: Some(120),
            lease_ttl_ms: Some(5000),
            hosts: vec![h1, h2, HostEntry::unknown("h9")],
            peers: vec![PeerView {
                host: "h2".into(),
                heard_ms_ago: Some(1200),
                mode: Some(Mode::Unreachable),
                suspect: true,
            }],
            self_fenced: false,
            records_error: None,
        };
        let text = render_hosts_text(&r);
        for want in [
            "h1 (connected, last keepalive 120 ms ago, lease TTL 5 s)",
            "host h1: alive, active, 4.0 of 8.0 GiB free, 2 CPUs, qemu+tcp://10.78.0.1/system",
            "primary web1",
            "web1 (generation 3)",
            "host h2: LOST, draining; heartbeat 1200 ms ago, etcd_unreachable, SUSPECT",
            "shadow  web1",
            "web1-shadow-4 (ready)",
            "host h9: unregistered, active",
            "(nothing)",
        ] {
            assert!(text.contains(want), "{want:?} missing from:\n{text}");
        }
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<HostsReport>(&json).unwrap(), r);
        assert!(json.contains("\"mode\":\"connected\""), "{json}");

        // etcd away: the mode and the heartbeats are still answered.
        let away = HostsReport {
            mode: Mode::Unreachable,
            hosts: Vec::new(),
            self_fenced: true,
            records_error: Some("coordination backend unavailable during hosts".into()),
            ..r
        };
        let text = render_hosts_text(&away);
        for want in [
            "h1 (etcd_unreachable",
            "SELF-FENCED",
            "cluster records unreadable: coordination backend unavailable",
            "host h2: heartbeat 1200 ms ago, etcd_unreachable, SUSPECT",
        ] {
            assert!(text.contains(want), "{want:?} missing from:\n{text}");
        }
    }
}
