//! The control socket protocol: JSON lines between the `understudy` CLI and the daemon.
//!
//! A client connects, writes exactly one [`Request`] as a single JSON line, reads exactly one
//! [`Response`] line and disconnects. One request per connection keeps the server trivially
//! robust: a misbehaving client can only ever spoil its own connection.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

pub use super::hosts::{render_hosts_text, HostEntry, HostPrimary, HostShadow, HostsReport};
use crate::cluster::HostCapacity;
use crate::events::Event;
use crate::failover::record::{FailoverRecord, ShadowState};
use crate::monitor::memcost::MemoryHeld;
use crate::profile::manager::{AccuracyEntry, HistoryReport, ProfileReport, ProfileSeries};
use crate::profile::ProfileDiff;
use crate::profile::VersionSummary;

/// A command sent by the CLI. Serialized as an object tagged by `"cmd"`, e.g.
/// `{"cmd":"failover","service":"web"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Report the daemon, every service and every managed domain.
    Status,
    /// Promote a shadow of `service` now, as if the active domain had died.
    Failover {
        /// Service name from the configuration.
        service: String,
        /// With a cluster: the host whose shadow takes over (asked of the primary's host).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to_host: Option<String>,
    },
    /// With a cluster: drain `host` (its primaries move to shadows on other hosts, it gets no
    /// new shadows) or undrain it. Answered once nothing runs there any more, or at
    /// `wait_s`.
    HostDrain {
        /// The host.
        host: String,
        /// Drain (true) or undrain (false).
        drain: bool,
        /// Longest the answer waits for the host's primaries to move away, in seconds.
        #[serde(default)]
        wait_s: u64,
    },
    /// Stop protecting `service` and shut its shadows down.
    Stop {
        /// Service name from the configuration.
        service: String,
    },
    /// Start protecting `service` again.
    Start {
        /// Service name from the configuration.
        service: String,
    },
    /// Destroy and rebuild the shadows of `service` from the current active domain.
    ShadowRebuild {
        /// Service name from the configuration.
        service: String,
    },
    /// Re-initialise the shadows of `service`, optionally from the golden image.
    ShadowReinit {
        /// Service name from the configuration.
        service: String,
        /// Start from the golden image instead of the active domain's disk.
        golden: bool,
    },
    /// Show the current deployment profile of `service`.
    ProfileShow {
        /// Service name from the configuration.
        service: String,
    },
    /// List the stored profile versions of `service`.
    ProfileHistory {
        /// Service name from the configuration.
        service: String,
    },
    /// Compare two profile versions of `service`.
    ProfileDiff {
        /// Service name from the configuration.
        service: String,
        /// First version.
        a: u64,
        /// Second version.
        b: u64,
    },
    /// Make an older profile version current again (the previous one when `to` is absent).
    ProfileRollback {
        /// Service name from the configuration.
        service: String,
        /// Version to roll back to.
        to: Option<u64>,
    },
    /// Report how well profiles predicted real usage, for one service or all.
    ProfileAccuracy {
        /// Restrict the report to this service.
        service: Option<String>,
    },
    /// Re-read the configuration file.
    ReloadConfig,
    /// The recent events, oldest first; with `follow`, every later one too, as it happens.
    /// Answered with one [`Response::Event`] line per event; the stream ends when the client
    /// hangs up (follow) or after the last recent event.
    Events {
        /// Only the events of this service.
        service: Option<String>,
        /// Keep the connection open and stream new events.
        follow: bool,
    },
    /// Store the live profile of `service` as a new version, reason `manual`.
    ProfileSave {
        /// Service name from the configuration.
        service: String,
    },
    /// What `service`'s primary used and what the profile predicted, since a time.
    ProfileSeries {
        /// Service name from the configuration.
        service: String,
        /// Only observations at or after this Unix time in ms.
        since_unix_ms: u64,
    },
    /// Every host of the cluster with its state, capacity, primaries and shadows.
    Hosts,
    /// Try a change on an isolated clone of `service`'s primary and replay its recorded
    /// traffic against it and an unchanged clone. Answered at once with the new canary; its
    /// report follows (`CanaryReport`).
    CanaryStart {
        /// Service name.
        service: String,
        /// The change file's text (TOML: `[[file]]` and `[[command]]` entries).
        change: String,
    },
    /// The canary of `service`: its phase, progress and, once done, its report.
    CanaryReport {
        /// Service name.
        service: String,
    },
    /// Discard the canary of `service` (its clones and data copies).
    CanaryAbort {
        /// Service name.
        service: String,
    },
    /// Verify a standing-by shadow of `service` now (see `canary::verify`).
    ShadowVerify {
        /// Service name.
        service: String,
    },
    /// Make the canary's change part of `service`'s expected configuration and switch over to
    /// a shadow carrying it.
    CanaryPromote {
        /// Service name.
        service: String,
        /// Longest wait for a shadow carrying the change, in seconds.
        #[serde(default)]
        wait_s: u64,
    },
}

impl Request {
    /// The `cmd` tag of this request, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Failover { .. } => "failover",
            Request::HostDrain { drain: true, .. } => "host_drain",
            Request::HostDrain { drain: false, .. } => "host_undrain",
            Request::Stop { .. } => "stop",
            Request::Start { .. } => "start",
            Request::ShadowRebuild { .. } => "shadow_rebuild",
            Request::ShadowReinit { .. } => "shadow_reinit",
            Request::ProfileShow { .. } => "profile_show",
            Request::ProfileHistory { .. } => "profile_history",
            Request::ProfileDiff { .. } => "profile_diff",
            Request::ProfileRollback { .. } => "profile_rollback",
            Request::ProfileAccuracy { .. } => "profile_accuracy",
            Request::ReloadConfig => "reload_config",
            Request::Events { .. } => "events",
            Request::ProfileSave { .. } => "profile_save",
            Request::ProfileSeries { .. } => "profile_series",
            Request::Hosts => "hosts",
            Request::CanaryStart { .. } => "canary_start",
            Request::CanaryReport { .. } => "canary_report",
            Request::CanaryAbort { .. } => "canary_abort",
            Request::CanaryPromote { .. } => "canary_promote",
            Request::ShadowVerify { .. } => "shadow_verify",
        }
    }
}

/// The daemon's answer: one variant per kind of answer, so a client never guesses its type.
/// Serialized adjacently tagged, e.g. `{"type":"ok","body":{"message":"..."}}` or
/// `{"type":"status","body":{...StatusReport}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "body", rename_all = "snake_case")]
pub enum Response {
    /// The command succeeded; `message` says what was done.
    Ok {
        /// Human-readable outcome.
        message: String,
    },
    /// Answer to [`Request::Status`].
    Status(StatusReport),
    /// Answer to [`Request::Failover`]: the completed switchover.
    Failover(FailoverRecord),
    /// Answer to [`Request::ProfileShow`].
    ProfileShow(Box<ProfileReport>),
    /// Answer to [`Request::ProfileHistory`].
    ProfileHistory(HistoryReport),
    /// Answer to [`Request::ProfileDiff`].
    ProfileDiff(ProfileDiff),
    /// Answer to [`Request::ProfileAccuracy`].
    ProfileAccuracy(Vec<AccuracyEntry>),
    /// Answer to [`Request::ProfileSave`]: the version stored.
    ProfileSaved(VersionSummary),
    /// Answer to [`Request::ProfileSeries`].
    ProfileSeries(ProfileSeries),
    /// One event of a [`Request::Events`] stream.
    Event(Event),
    /// Answer to [`Request::Hosts`].
    Hosts(HostsReport),
    /// Answer to the canary requests: the canary as it stands.
    Canary(Box<crate::canary::CanaryRecord>),
    /// Answer to [`Request::ShadowVerify`].
    Verify(Box<crate::canary::verify::VerifyReport>),
    /// The command was refused or failed.
    Error {
        /// Category of the failure, for scripts.
        kind: ErrorKind,
        /// What went wrong, naming the service, domain or value involved.
        message: String,
    },
}

impl Response {
    /// Shorthand for an [`Response::Error`].
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Self {
        Response::Error {
            kind,
            message: message.into(),
        }
    }

    /// Shorthand for an [`Response::Ok`].
    pub fn ok(message: impl Into<String>) -> Self {
        Response::Ok {
            message: message.into(),
        }
    }
}

/// Why a request failed, serialized snake_case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request line was not valid JSON, not a known command, or too long.
    BadRequest,
    /// The peer is not allowed to use the control socket.
    PermissionDenied,
    /// The named service, domain or profile version does not exist.
    NotFound,
    /// The command does not fit the current state (e.g. no shadow ready, already running).
    Conflict,
    /// The daemon did not finish the command in time; it may still complete.
    Timeout,
    /// The command was attempted and failed.
    Failed,
    /// The daemon itself is not able to answer (shutting down, internal fault).
    Internal,
}

impl ErrorKind {
    /// The serialized name, for display.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::PermissionDenied => "permission_denied",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Failed => "failed",
            ErrorKind::Internal => "internal",
        }
    }
}

/// Full answer to [`Request::Status`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The daemon process itself.
    pub daemon: DaemonInfo,
    /// Every configured service.
    pub services: Vec<ServiceStatus>,
    /// Every domain the daemon manages (actives and shadows).
    pub domains: Vec<DomainStatus>,
    /// Failovers later judged unnecessary (the primary was healthy), since start.
    pub false_failovers: u64,
    /// Real failures that no failover answered, since start.
    pub missed_failovers: u64,
    /// The pools of pooled classes: shadows shared by a class's primaries.
    #[serde(default)]
    pub pools: Vec<PoolStatus>,
}

/// The pooled shadows of one class on this host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolStatus {
    /// The class.
    pub class: String,
    /// The pool's name (its shadows are `<name>-shadow-<n>`).
    pub name: String,
    /// Primaries one pooled shadow covers.
    pub primaries_per_shadow: u32,
    /// The services it stands in for now.
    pub covers: Vec<String>,
    /// Its shadows, with the memory each holds.
    pub shadows: Vec<ShadowStatus>,
}

/// Identity and connection state of the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonInfo {
    /// Crate version of the daemon.
    pub version: String,
    /// Daemon process id.
    pub pid: u32,
    /// When the daemon started, Unix epoch milliseconds.
    pub started_unix_ms: u64,
    /// libvirt connection URI.
    pub libvirt_uri: String,
    /// Whether the libvirt connection is currently up.
    pub connected: bool,
    /// This host's name in the cluster.
    #[serde(default)]
    pub host: String,
    /// What this host can still hold, when known.
    #[serde(default)]
    pub capacity: Option<HostCapacity>,
}

/// State of one protected service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// Service name from the configuration.
    pub name: String,
    /// Service class from the configuration.
    pub class: String,
    /// Protection state: `protected`, `degraded`, `failing_over`, `stopped`, `maintenance` or
    /// `unprotected`.
    pub state: String,
    /// Name of the domain currently serving, if any.
    pub active: Option<String>,
    /// The shadows standing by.
    pub shadows: Vec<ShadowStatus>,
    /// The most recent failover, if any happened since start.
    pub last_failover: Option<FailoverRecord>,
    /// Health summary of the active domain.
    pub health: String,
    /// Last heartbeat from the active domain, Unix epoch milliseconds.
    pub last_heartbeat_unix_ms: Option<u64>,
    /// The active domain's disks: each one's role and whether a failover keeps its data.
    #[serde(default)]
    pub disks: Vec<crate::failover::plan::DiskPlan>,
    /// Host memory the active primary holds, when it runs and could be measured.
    #[serde(default)]
    pub primary_memory: Option<MemoryHeld>,
    /// Host memory the standing-by (paused) shadows hold together, bytes.
    #[serde(default)]
    pub standby_memory_bytes: u64,
    /// That memory as a percentage of the primary's.
    #[serde(default)]
    pub standby_share_pct: Option<f64>,
    /// For an `adaptive` class: the tier wanted now and the next planned switch.
    #[serde(default)]
    pub standby_plan: Option<crate::failover::standby::TierPlan>,
    /// For a pooled class: the identity a pooled shadow would take from this primary (host
    /// name, addresses), as its guest agent last reported it.
    #[serde(default)]
    pub identity: Option<String>,
    /// The last standby verification of a shadow of this service since the daemon started
    /// (`canary verify` or the class's schedule).
    #[serde(default)]
    pub last_verify: Option<crate::canary::verify::VerifyReport>,
}

/// One shadow domain of a service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShadowStatus {
    /// Domain name of the shadow.
    pub name: String,
    /// Where the shadow is in its life cycle.
    pub state: ShadowState,
    /// Host memory it holds, when it has a QEMU process.
    #[serde(default)]
    pub memory: Option<MemoryHeld>,
    /// That memory as a percentage of the primary's.
    #[serde(default)]
    pub share_of_primary_pct: Option<f64>,
}

/// One domain managed by the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainStatus {
    /// libvirt domain name.
    pub name: String,
    /// libvirt state, e.g. `running`, `paused`, `shutoff`.
    pub state: String,
    /// Role in its service: `active` or `shadow`.
    pub role: Option<String>,
    /// Service the domain belongs to.
    pub service: Option<String>,
    /// Last heartbeat, Unix epoch milliseconds.
    pub last_heartbeat_unix_ms: Option<u64>,
    /// Health summary.
    pub health: String,
}

/// Mebibytes with one decimal, for the text status.
fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1048576.0)
}

/// The memory lines of one service: its primary's and each shadow's, with shares; its last
/// standby verification.
fn render_standby_cost(out: &mut String, s: &ServiceStatus) {
    if let Some(v) = &s.last_verify {
        let _ = writeln!(
            out,
            "\n{} standby verification at {}: {} {}",
            s.name,
            crate::events::format_unix_ms(v.at_unix_ms),
            v.shadow,
            v.describe()
        );
    }
    if let Some(p) = &s.standby_plan {
        let next = match (p.next_switch_unix_ms, p.next_tier) {
            (Some(at), Some(t)) => format!(
                "next switch to {} at {}",
                t.as_str(),
                crate::events::format_unix_ms(at)
            ),
            _ => "no switch planned within a day".to_string(),
        };
        let _ = writeln!(
            out,
            "\n{} adaptive standby: {} now; {next}",
            s.name,
            p.tier.as_str()
        );
    }
    if s.primary_memory.is_none() && s.shadows.iter().all(|x| x.memory.is_none()) {
        return;
    }
    let figures = |m: &MemoryHeld| {
        format!(
            "cgroup {}, rss {}, pss {}, private {}",
            m.cgroup_bytes.map_or_else(|| "-".to_string(), mib),
            mib(m.rss_bytes),
            m.pss_bytes.map_or_else(|| "-".to_string(), mib),
            m.private_bytes.map_or_else(|| "-".to_string(), mib)
        )
    };
    let pct = |p: Option<f64>| p.map_or_else(|| "-".to_string(), |p| format!("{p:.1}%"));
    let _ = writeln!(
        out,
        "\n{} memory: standing by {} = {} of the primary's",
        s.name,
        mib(s.standby_memory_bytes),
        pct(s.standby_share_pct)
    );
    if let (Some(m), Some(active)) = (&s.primary_memory, &s.active) {
        let _ = writeln!(out, "  {active} (primary): {}", figures(m));
    }
    for x in &s.shadows {
        if let Some(m) = &x.memory {
            let _ = writeln!(
                out,
                "  {} ({}): {} = {}",
                x.name,
                x.state.as_str(),
                figures(m),
                pct(x.share_of_primary_pct)
            );
        }
    }
}

/// A pool: what it covers, its shadows and their memory, and each covered primary's identity.
fn render_pool(out: &mut String, p: &PoolStatus, services: &[ServiceStatus]) {
    let shadows: Vec<String> = p
        .shadows
        .iter()
        .map(|x| match &x.memory {
            Some(m) => format!("{} ({}, {})", x.name, x.state.as_str(), mib(m.held_bytes())),
            None => format!("{} ({})", x.name, x.state.as_str()),
        })
        .collect();
    let _ = writeln!(
        out,
        "\npool {} (class {}, one shadow per {} primaries): covers {}; shadows {}",
        p.name,
        p.class,
        p.primaries_per_shadow,
        if p.covers.is_empty() {
            "nothing".to_string()
        } else {
            p.covers.join(", ")
        },
        if shadows.is_empty() {
            "none".to_string()
        } else {
            shadows.join(", ")
        }
    );
    for s in services.iter().filter(|s| p.covers.contains(&s.name)) {
        let _ = writeln!(
            out,
            "  {} identity: {}",
            s.name,
            s.identity.as_deref().unwrap_or("not read yet")
        );
    }
}

/// Renders `report` as an operator-friendly text table, with ages relative to the current time.
pub fn render_status_text(report: &StatusReport) -> String {
    let now_ms = crate::clock::now_unix_ms();
    render_status_text_at(report, now_ms)
}

/// Renders `report` as text with ages computed against `now_unix_ms` (deterministic for tests).
pub fn render_status_text_at(report: &StatusReport, now_unix_ms: u64) -> String {
    let mut out = String::new();
    let d = &report.daemon;
    let _ = writeln!(
        out,
        "understudy {} (pid {}), up {}, libvirt {} {}",
        d.version,
        d.pid,
        format_age(now_unix_ms.saturating_sub(d.started_unix_ms)),
        d.libvirt_uri,
        if d.connected {
            "connected"
        } else {
            "DISCONNECTED"
        },
    );
    if let Some(c) = &d.capacity {
        let _ = writeln!(
            out,
            "host {}: {:.1} of {:.1} GiB memory available, {} CPUs",
            d.host,
            c.mem_available_kib as f64 / 1048576.0,
            c.mem_total_kib as f64 / 1048576.0,
            c.cpus
        );
    }
    let _ = writeln!(
        out,
        "false failovers: {}, missed failovers: {}",
        report.false_failovers, report.missed_failovers
    );

    out.push('\n');
    if report.services.is_empty() {
        out.push_str("no services configured\n");
    } else {
        let mut rows = vec![[
            "SERVICE",
            "CLASS",
            "STATE",
            "HEALTH",
            "ACTIVE",
            "HEARTBEAT",
            "SHADOWS",
        ]
        .map(String::from)
        .to_vec()];
        for s in &report.services {
            let shadows = if s.shadows.is_empty() {
                "-".to_string()
            } else {
                s.shadows
                    .iter()
                    .map(|sh| format!("{} ({})", sh.name, sh.state.as_str()))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            rows.push(vec![
                s.name.clone(),
                s.class.clone(),
                s.state.clone(),
                s.health.clone(),
                s.active.clone().unwrap_or_else(|| "-".into()),
                heartbeat_age(s.last_heartbeat_unix_ms, now_unix_ms),
                shadows,
            ]);
        }
        out.push_str(&render_table(&rows));

        for s in &report.services {
            if s.disks.is_empty() {
                continue;
            }
            let _ = writeln!(out, "\n{} disks:", s.name);
            for disk in &s.disks {
                let keeps = match disk.keeps_data {
                    Some(true) => "a failover KEEPS its data",
                    Some(false) => "a failover LOSES its writes",
                    None => "not written",
                };
                let _ = writeln!(
                    out,
                    "  {} {} ({} {}): {}",
                    disk.target,
                    disk.role.map_or("-", |r| r.as_str()),
                    disk.kind,
                    disk.source.as_deref().unwrap_or("no source"),
                    keeps
                );
            }
        }

        for s in &report.services {
            render_standby_cost(&mut out, s);
        }

        for p in &report.pools {
            render_pool(&mut out, p, &report.services);
        }

        for s in &report.services {
            let Some(f) = &s.last_failover else { continue };
            let _ = write!(
                out,
                "\n{}: last failover {} ago, {} -> {} by {}, ",
                s.name,
                format_age(now_unix_ms.saturating_sub(f.at_unix_ms)),
                f.from,
                f.to,
                f.trigger,
            );
            if f.ok {
                out.push_str("ok");
            } else {
                let _ = write!(
                    out,
                    "FAILED: {}",
                    f.error.as_deref().unwrap_or("unknown error")
                );
            }
            let _ = writeln!(out, ", outage {:.1} ms", f.outage_ms);
            if !f.steps.is_empty() {
                let steps = f
                    .steps
                    .iter()
                    .map(|st| format!("{} {:.1} ms", st.name, st.ms))
                    .collect::<Vec<_>>()
                    .join(", ");
                let _ = writeln!(out, "  steps: {steps}");
            }
            for n in &f.notes {
                let _ = writeln!(out, "  note: {n}");
            }
        }
    }

    out.push('\n');
    if report.domains.is_empty() {
        out.push_str("no managed domains\n");
    } else {
        let mut rows = vec![
            ["DOMAIN", "STATE", "ROLE", "SERVICE", "HEARTBEAT", "HEALTH"]
                .map(String::from)
                .to_vec(),
        ];
        for dom in &report.domains {
            rows.push(vec![
                dom.name.clone(),
                dom.state.clone(),
                dom.role.clone().unwrap_or_else(|| "-".into()),
                dom.service.clone().unwrap_or_else(|| "-".into()),
                heartbeat_age(dom.last_heartbeat_unix_ms, now_unix_ms),
                dom.health.clone(),
            ]);
        }
        out.push_str(&render_table(&rows));
    }
    out
}

fn heartbeat_age(last: Option<u64>, now_unix_ms: u64) -> String {
    match last {
        Some(ms) => format!("{} ago", format_age(now_unix_ms.saturating_sub(ms))),
        None => "never".to_string(),
    }
}

/// Compact human duration: `850ms`, `12.3s`, `4m05s`, `3h12m`, `2d04h`.
fn format_age(ms: u64) -> String {
    let s = ms / 1000;
    if ms < 1000 {
        format!("{ms}ms")
    } else if s < 60 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else if s < 86_400 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600)
    }
}

/// Left-aligned columns separated by two spaces; the last column is not padded.
fn render_table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0usize; cols];
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let pad = widths[i] - cell.chars().count();
                line.push_str(cell);
                line.extend(std::iter::repeat_n(' ', pad + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failover::StepTiming;
    use serde_json::{json, Value};

    fn all_requests() -> Vec<Request> {
        let s = || "web".to_string();
        vec![
            Request::Status,
            Request::Failover {
                service: s(),
                to_host: None,
            },
            Request::Failover {
                service: s(),
                to_host: Some("h2".into()),
            },
            Request::HostDrain {
                host: "h1".into(),
                drain: true,
                wait_s: 300,
            },
            Request::Stop { service: s() },
            Request::Start { service: s() },
            Request::ShadowRebuild { service: s() },
            Request::ShadowReinit {
                service: s(),
                golden: true,
            },
            Request::ProfileShow { service: s() },
            Request::ProfileHistory { service: s() },
            Request::ProfileDiff {
                service: s(),
                a: 3,
                b: 7,
            },
            Request::ProfileRollback {
                service: s(),
                to: Some(2),
            },
            Request::ProfileRollback {
                service: s(),
                to: None,
            },
            Request::ProfileAccuracy { service: None },
            Request::ProfileAccuracy { service: Some(s()) },
            Request::ReloadConfig,
        ]
    }

    #[test]
    fn every_request_round_trips_and_is_tagged_by_cmd() {
        for req in all_requests() {
            let line = serde_json::to_string(&req).unwrap();
            assert!(!line.contains('\n'), "{line}");
            let v: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(v["cmd"], req.name(), "{line}");
            let back: Request = serde_json::from_str(&line).unwrap();
            assert_eq!(back, req);
        }
    }

    #[test]
    fn request_wire_format_is_stable() {
        assert_eq!(
            serde_json::to_value(Request::Status).unwrap(),
            json!({"cmd": "status"})
        );
        assert_eq!(
            serde_json::to_value(Request::ShadowReinit {
                service: "db".into(),
                golden: false
            })
            .unwrap(),
            json!({"cmd": "shadow_reinit", "service": "db", "golden": false})
        );
        let r: Request =
            serde_json::from_str(r#"{"cmd":"profile_diff","service":"db","a":1,"b":2}"#).unwrap();
        assert_eq!(
            r,
            Request::ProfileDiff {
                service: "db".into(),
                a: 1,
                b: 2
            }
        );
        let r: Request = serde_json::from_str(r#"{"cmd":"reload_config"}"#).unwrap();
        assert_eq!(r, Request::ReloadConfig);
    }

    #[test]
    fn malformed_requests_are_rejected() {
        for bad in [
            r#"{"cmd":"explode"}"#,
            r#"{"cmd":"failover"}"#,
            r#"{"cmd":"failover","service":7}"#,
            r#"{"cmd":"profile_diff","service":"x","a":-1,"b":2}"#,
            r#"{"service":"x"}"#,
            r#"{"cmd":"failover","service":"x","force":true}"#,
            "[]",
            "",
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }

    fn sample_report() -> StatusReport {
        StatusReport {
            daemon: DaemonInfo {
                version: "0.1.0".into(),
                pid: 4242,
                started_unix_ms: 1_000_000,
                libvirt_uri: "qemu:///system".into(),
                connected: true,
                host: "h1".into(),
                capacity: Some(HostCapacity {
                    mem_total_kib: 24 << 20,
                    mem_available_kib: 12 << 20,
                    cpus: 2,
                }),
            },
            services: vec![ServiceStatus {
                name: "web".into(),
                class: "stateless".into(),
                state: "protected".into(),
                active: Some("web-a".into()),
                shadows: vec![
                    ShadowStatus {
                        name: "web-s1".into(),
                        state: ShadowState::PAUSED,
                        memory: Some(MemoryHeld {
                            cgroup_bytes: Some(64 << 20),
                            cgroup_anon_bytes: Some(60 << 20),
                            rss_bytes: 70 << 20,
                            pss_bytes: Some(66 << 20),
                            private_bytes: Some(60 << 20),
                        }),
                        share_of_primary_pct: Some(25.0),
                    },
                    ShadowStatus {
                        name: "web-s2".into(),
                        state: ShadowState::Booting,
                        memory: None,
                        share_of_primary_pct: None,
                    },
                ],
                last_failover: Some(FailoverRecord {
                    at_unix_ms: 1_500_000,
                    from: "web-old".into(),
                    to: "web-a".into(),
                    trigger: crate::failover::Trigger::Pidfd,
                    outage_ms: 42.5,
                    steps: vec![
                        StepTiming {
                            name: "fence".into(),
                            ms: 1.25,
                            start_ms: Some(0.5),
                        },
                        StepTiming {
                            name: "resume".into(),
                            ms: 3.5,
                            start_ms: None,
                        },
                    ],
                    ok: true,
                    error: None,
                    notes: vec!["profile v3: vCPUs 1 -> 2".into()],
                }),
                health: "ok".into(),
                last_heartbeat_unix_ms: Some(1_599_000),
                disks: vec![crate::failover::plan::DiskPlan {
                    target: "vdb".into(),
                    kind: "file".into(),
                    device: "disk".into(),
                    source: Some("/d/web-data.raw".into()),
                    role: Some(crate::config::DiskRole::Data),
                    handling: crate::failover::plan::DiskHandling::HandedOver,
                    keeps_data: Some(true),
                    overlay_base: None,
                }],
                primary_memory: Some(MemoryHeld {
                    cgroup_bytes: Some(256 << 20),
                    cgroup_anon_bytes: Some(200 << 20),
                    rss_bytes: 240 << 20,
                    pss_bytes: Some(230 << 20),
                    private_bytes: Some(200 << 20),
                }),
                standby_memory_bytes: 64 << 20,
                standby_share_pct: Some(25.0),
                standby_plan: None,
                identity: Some("host name web-a, 10.77.0.10/24 on 52:54:00:12:34:56".into()),
                last_verify: None,
            }],
            pools: vec![PoolStatus {
                class: "stateless".into(),
                name: "stateless-pool".into(),
                primaries_per_shadow: 4,
                covers: vec!["web".into()],
                shadows: vec![ShadowStatus {
                    name: "stateless-pool-shadow-2".into(),
                    state: ShadowState::PAUSED,
                    memory: Some(MemoryHeld {
                        cgroup_bytes: Some(48 << 20),
                        cgroup_anon_bytes: None,
                        rss_bytes: 50 << 20,
                        pss_bytes: None,
                        private_bytes: None,
                    }),
                    share_of_primary_pct: None,
                }],
            }],
            domains: vec![DomainStatus {
                name: "web-a".into(),
                state: "running".into(),
                role: Some("active".into()),
                service: Some("web".into()),
                last_heartbeat_unix_ms: Some(1_599_000),
                health: "ok".into(),
            }],
            false_failovers: 1,
            missed_failovers: 0,
        }
    }

    #[test]
    fn status_json_has_the_documented_field_names() {
        let resp = Response::Status(sample_report());
        let v = serde_json::to_value(&resp).unwrap();
        assert_eq!(v["type"], "status");
        let r = &v["body"];
        for key in [
            "version",
            "pid",
            "started_unix_ms",
            "libvirt_uri",
            "connected",
        ] {
            assert!(r["daemon"].get(key).is_some(), "daemon.{key}");
        }
        assert_eq!(r["false_failovers"], 1);
        assert_eq!(r["missed_failovers"], 0);
        let s = &r["services"][0];
        let mut keys: Vec<&str> = s.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "active",
                "class",
                "disks",
                "health",
                "identity",
                "last_failover",
                "last_heartbeat_unix_ms",
                "last_verify",
                "name",
                "primary_memory",
                "shadows",
                "standby_memory_bytes",
                "standby_plan",
                "standby_share_pct",
                "state"
            ]
        );
        assert_eq!(s["name"], "web");
        assert_eq!(s["active"], "web-a");
        assert_eq!(s["shadows"][0]["name"], "web-s1");
        assert_eq!(s["shadows"][0]["state"], "paused");
        assert_eq!(s["shadows"][1]["state"], "booting");
        assert_eq!(s["shadows"][0]["memory"]["cgroup_bytes"], 64 << 20);
        assert_eq!(s["shadows"][0]["memory"]["pss_bytes"], 66 << 20);
        assert_eq!(s["shadows"][0]["share_of_primary_pct"], 25.0);
        assert_eq!(s["primary_memory"]["rss_bytes"], 240 << 20);
        assert_eq!(s["standby_share_pct"], 25.0);
        assert_eq!(s["disks"][0]["target"], "vdb");
        assert_eq!(s["disks"][0]["role"], "data");
        assert_eq!(s["disks"][0]["keeps_data"], true);
        let f = &s["last_failover"];
        assert_eq!(f["outage_ms"], 42.5);
        assert_eq!(f["steps"][0]["name"], "fence");
        assert_eq!(f["steps"][0]["ms"], 1.25);
        for key in ["at_unix_ms", "from", "to", "trigger", "ok", "error"] {
            assert!(f.get(key).is_some(), "last_failover.{key}");
        }
        let d = &r["domains"][0];
        for key in [
            "name",
            "state",
            "role",
            "service",
            "last_heartbeat_unix_ms",
            "health",
        ] {
            assert!(d.get(key).is_some(), "domains[].{key}");
        }
        assert_eq!(r["pools"][0]["covers"][0], "web");
        assert_eq!(r["pools"][0]["shadows"][0]["state"], "paused");
        let back: Response = serde_json::from_value(v).unwrap();
        assert_eq!(back, resp);
    }

    #[test]
    fn status_text_shows_each_pool_what_it_covers_and_the_identities_it_would_take() {
        let text = render_status_text_at(&sample_report(), 1_600_000);
        assert!(
            text.contains(
                "pool stateless-pool (class stateless, one shadow per 4 primaries): covers web; \
                 shadows stateless-pool-shadow-2 (paused, 48.0 MiB)"
            ),
            "{text}"
        );
        assert!(
            text.contains("  web identity: host name web-a, 10.77.0.10/24 on 52:54:00:12:34:56"),
            "{text}"
        );
    }

    #[test]
    fn shadow_states_serialize_lowercase() {
        for (state, name) in [
            (ShadowState::Booting, "booting"),
            (ShadowState::PAUSED, "paused"),
            (ShadowState::Promoting, "promoting"),
            (ShadowState::Failed, "failed"),
        ] {
            assert_eq!(serde_json::to_value(state).unwrap(), json!(name));
            assert_eq!(state.as_str(), name);
        }
        assert!(serde_json::from_value::<ShadowState>(json!("Paused")).is_err());
    }

    #[test]
    fn other_responses_round_trip() {
        for resp in [
            Response::ok("failed over web to web-s1"),
            Response::ProfileAccuracy(Vec::new()),
            Response::Failover(sample_report().services[0].last_failover.clone().unwrap()),
            Response::error(ErrorKind::NotFound, "no service named \"x\""),
        ] {
            let line = serde_json::to_string(&resp).unwrap();
            let back: Response = serde_json::from_str(&line).unwrap();
            assert_eq!(back, resp);
        }
        assert_eq!(
            serde_json::to_value(Response::error(ErrorKind::BadRequest, "m")).unwrap(),
            json!({"type": "error", "body": {"kind": "bad_request", "message": "m"}})
        );
    }

    #[test]
    fn text_rendering_shows_services_shadows_steps_and_domains() {
        let text = render_status_text_at(&sample_report(), 1_600_000);
        assert!(
            text.contains("understudy 0.1.0 (pid 4242), up 10m00s"),
            "{text}"
        );
        assert!(text.contains("qemu:///system connected"), "{text}");
        assert!(
            text.contains("host h1: 12.0 of 24.0 GiB memory available, 2 CPUs"),
            "{text}"
        );
        let header = text.lines().find(|l| l.starts_with("SERVICE")).unwrap();
        assert!(header.contains("ACTIVE"));
        assert!(
            text.contains(
                "web disks:\n  vdb data (file /d/web-data.raw): a failover KEEPS its data"
            ),
            "{text}"
        );
        let row = text.lines().find(|l| l.starts_with("web ")).unwrap();
        assert!(row.contains("web-a"), "{row}");
        assert!(row.contains("web-s1 (paused), web-s2 (booting)"), "{row}");
        assert!(row.contains("1.0s ago"), "{row}");
        assert!(
            text.contains(
                "web: last failover 1m40s ago, web-old -> web-a by pidfd, ok, outage 42.5 ms"
            ),
            "{text}"
        );
        assert!(
            text.contains("steps: fence 1.2 ms, resume 3.5 ms"),
            "{text}"
        );
        assert!(text.contains("  note: profile v3: vCPUs 1 -> 2"), "{text}");
        assert!(
            text.contains("web memory: standing by 64.0 MiB = 25.0% of the primary's\n  web-a (primary): cgroup 256.0 MiB, rss 240.0 MiB, pss 230.0 MiB, private 200.0 MiB\n  web-s1 (paused): cgroup 64.0 MiB, rss 70.0 MiB, pss 66.0 MiB, private 60.0 MiB = 25.0%\n"),
            "{text}"
        );
        let dom = text.lines().find(|l| l.starts_with("web-a")).unwrap();
        assert!(dom.contains("running") && dom.contains("active"), "{dom}");
        // Columns line up: ACTIVE starts at the same offset in header and row.
        assert_eq!(header.find("ACTIVE"), row.find("web-a"));
    }

    #[test]
    fn text_rendering_handles_empty_and_failed() {
        let mut r = sample_report();
        r.daemon.connected = false;
        r.services[0].shadows.clear();
        r.services[0].active = None;
        r.services[0].last_heartbeat_unix_ms = None;
        if let Some(f) = r.services[0].last_failover.as_mut() {
            f.ok = false;
            f.error = Some("no paused shadow".into());
        }
        let text = render_status_text_at(&r, 0);
        assert!(text.contains("DISCONNECTED"));
        assert!(text.contains("FAILED: no paused shadow"), "{text}");
        assert!(text.contains("never"));
        r.services.clear();
        r.domains.clear();
        let text = render_status_text_at(&r, 0);
        assert!(text.contains("no services configured"));
        assert!(text.contains("no managed domains"));
    }

    #[test]
    fn ages_are_compact() {
        assert_eq!(format_age(5), "5ms");
        assert_eq!(format_age(12_340), "12.3s");
        assert_eq!(format_age(245_000), "4m05s");
        assert_eq!(format_age(3 * 3_600_000 + 12 * 60_000), "3h12m");
        assert_eq!(format_age(2 * 86_400_000 + 4 * 3_600_000), "2d04h");
    }
}
