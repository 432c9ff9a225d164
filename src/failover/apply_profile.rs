//! The `apply_profile` step of a promotion: size the promoted shadow and bring its configuration
//! in line with what the service's profile expects, once traffic already flows to it.
//!
//! It runs after the outage is over (after `announce` and the role metadata), so it can never
//! lengthen it, and nothing in it fails the promotion: each outcome is a note in the failover
//! record (and a log line). What it does:
//!
//! 1. vCPUs and balloon target from the profile's plan, clamped to the maxima the shadow was
//!    created with (read from its live XML), and never below [`MEM_FLOOR_KIB`]. The plan's
//!    memory is what the guest *uses*; the balloon target adds a free reserve and what the
//!    balloon holds beyond the guest's own total (see [`balloon_target`]).
//! 2. Configuration files the primary last had (collected through its guest agent, at most
//!    [`MAX_CONFIG_FILE_BYTES`] each) are written into the shadow with `guest-file-write` when
//!    the shadow's copy differs (or is missing).
//! 3. The profile's TCP dependencies are checked with a connection attempt from the host's
//!    network namespace; unreachable ones are reported (UDP peers cannot be checked this way).
//!
//! The inputs are computed by the daemon before the promotion starts ([`ProfileApply`]), so the
//! pipeline holds no profile state.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::domain_xml::DomainXml;
use crate::libvirt::LibvirtAgent;
use crate::libvirt::{DomainStats, Hypervisor, LibvirtError};
use crate::monitor::agent::{AgentError, AgentOptions, AgentTransport, GuestAgent};
use crate::monitor::collector::{ConfigFileContent, MAX_CONFIG_FILE_BYTES};
use crate::monitor::configtrack::fnv1a64;
use crate::profile::manager::{PlanSummary, MEM_FLOOR_KIB};
use crate::profile::{Dependency, Proto};

/// Most dependencies checked at one promotion (the most recently seen ones).
pub const MAX_DEPENDENCY_CHECKS: usize = 32;

/// What the daemon hands the pipeline for one promotion.
#[derive(Debug, Clone)]
pub struct ProfileApply {
    /// The stored profile version the inputs come from (`None`: not stored yet).
    pub version: Option<u64>,
    /// vCPU and memory sizing; `None` while the profile is too young to size a shadow.
    pub resources: Option<PlanSummary>,
    /// Configuration files of the primary, as last collected.
    pub config_files: Vec<ConfigFileContent>,
    /// The profile's network dependencies.
    pub dependencies: Vec<Dependency>,
    /// Guest agent timeouts and reply bounds for configuration delivery.
    pub agent: AgentOptions,
    /// Time allowed to one dependency's connection attempt.
    pub dependency_timeout: Duration,
}

/// Why part of the step did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The shadow's live XML could not be read or parsed, so its maxima are unknown.
    #[error("cannot read the maxima of '{domain}' from its live XML")]
    Maxima {
        /// The shadow.
        domain: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// libvirt refused a resize.
    #[error("resizing '{domain}' failed")]
    Resize {
        /// The shadow.
        domain: String,
        /// Why.
        #[source]
        source: LibvirtError,
    },
    /// A configuration file could not be delivered.
    #[error("configuration file {path} not delivered to '{domain}'")]
    Config {
        /// The shadow.
        domain: String,
        /// The guest path.
        path: String,
        /// Why.
        #[source]
        source: AgentError,
    },
    /// A dependency did not accept a connection.
    #[error("dependency {key} is not reachable from this host")]
    Unreachable {
        /// `tcp://addr:port`.
        key: String,
        /// Why (refused, timed out, no route...).
        #[source]
        source: std::io::Error,
    },
}

/// Memory a guest keeps free on top of its planned use: the kernel's reserves and page cache for
/// the programs it runs. Measured on the lab guest (192 MiB, 33 MiB in use): ballooned down to
/// 14 MiB free it kept serving; at 6 MiB free its guest agent was killed.
pub const GUEST_FREE_RESERVE_KIB: u64 = 64 * 1024;

/// A balloon size for a planned use, and how it was derived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalloonTarget {
    /// Balloon size to set, KiB (before clamping to the shadow's limits).
    pub kib: u64,
    /// What the balloon holds beyond the guest's MemTotal, KiB, when it could be measured.
    pub overhead_kib: Option<u64>,
}

/// The balloon size that leaves the guest `plan_use_kib` to use plus
/// [`GUEST_FREE_RESERVE_KIB`] free. The balloon size also covers memory the guest never reports
/// in its total (kernel image, page structures, firmware reservations: about 50 MiB of a 192 MiB
/// lab guest), measured on the shadow itself as balloon size minus the guest's MemTotal. Without
/// that measurement (no balloon statistics) the shadow may grow but is never shrunk.
pub fn balloon_target(
    plan_use_kib: u64,
    cur_kib: u64,
    stats: Option<&DomainStats>,
) -> BalloonTarget {
    let needed = plan_use_kib.saturating_add(GUEST_FREE_RESERVE_KIB);
    let measured = stats.and_then(|s| Some((s.balloon_current_kib?, s.balloon_available_kib?)));
    match measured {
        Some((size, total)) if total > 0 && total <= size => BalloonTarget {
            kib: needed.saturating_add(size - total),
            overhead_kib: Some(size - total),
        },
        _ => BalloonTarget {
            kib: needed.max(cur_kib),
            overhead_kib: None,
        },
    }
}

/// The sizing actually applied: the plan within `[1, max]` vCPUs and `[floor, max]` KiB.
pub fn clamp_plan(plan: PlanSummary, max_vcpus: u32, max_mem_kib: u64) -> PlanSummary {
    PlanSummary {
        vcpus: plan.vcpus.clamp(1, max_vcpus.max(1)),
        mem_kib: plan
            .mem_kib
            .clamp(MEM_FLOOR_KIB.min(max_mem_kib), max_mem_kib),
    }
}

/// Runs the step on the promoted `shadow`; returns the notes for the failover record.
pub async fn apply(hv: &Hypervisor, shadow: &str, p: &ProfileApply) -> Vec<String> {
    let version = p.version.map_or_else(
        || "profile (not stored yet)".to_string(),
        |v| format!("profile v{v}"),
    );
    let mut notes = Vec::new();
    let blocking = {
        let (shadow, p, version) = (shadow.to_string(), p.clone(), version.clone());
        hv.blocking("apply profile", move |hv| {
            let mut notes = Vec::new();
            match p.resources {
                Some(plan) => notes.extend(resize(hv, &shadow, plan, &version)),
                None => notes.push(super::standby::grow_back(hv, &shadow).unwrap_or_else(|| {
                    format!("{version}: too young to size the shadow; size unchanged")
                })),
            }
            if !p.config_files.is_empty() {
                let agent = GuestAgent::new(
                    LibvirtAgent {
                        hv: hv.clone(),
                        domain: shadow.clone(),
                        max_reply: p.agent.limits.max_reply_bytes,
                    },
                    p.agent.clone(),
                );
                notes.extend(deliver_config(&agent, &shadow, &p.config_files));
            }
            notes
        })
    };
    let (applied, unreachable) = tokio::join!(
        blocking,
        check_dependencies(&p.dependencies, p.dependency_timeout)
    );
    match applied {
        Ok(n) => notes.extend(n),
        Err(e) => notes.push(format!("{version}: not applied: {e}")),
    }
    notes.extend(unreachable);
    for n in &notes {
        tracing::info!(shadow, note = %n, "apply_profile");
    }
    notes
}

/// How long the sizing waits for the guest's balloon statistics. A shadow just resumed may not
/// have reported them yet; without them it could only grow. Traffic already flows here.
const BALLOON_STATS_WAIT: Duration = Duration::from_secs(2);

/// The shadow's statistics once they include the balloon's figures, or the last ones read
/// when [`BALLOON_STATS_WAIT`] runs out.
fn balloon_stats(hv: &Hypervisor, shadow: &str) -> Option<DomainStats> {
    let deadline = std::time::Instant::now() + BALLOON_STATS_WAIT;
    loop {
        let stats = hv.stats(shadow).ok();
        let complete = stats
            .as_ref()
            .is_some_and(|s| s.balloon_current_kib.is_some() && s.balloon_available_kib.is_some());
        if complete || std::time::Instant::now() >= deadline {
            return stats;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sets vCPUs and balloon target from `plan` within the shadow's maxima.
fn resize(hv: &Hypervisor, shadow: &str, plan: PlanSummary, version: &str) -> Vec<String> {
    let maxima = hv
        .xml(shadow, false)
        .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
        .and_then(|xml| DomainXml::parse(&xml).map_err(|e| Box::new(e) as _))
        .map(|d| (d.vcpus().max, d.memory_kib().max_kib))
        .map_err(|source| ApplyError::Maxima {
            domain: shadow.to_string(),
            source,
        });
    let (max_vcpus, max_mem_kib) = match maxima {
        Ok(m) => m,
        Err(e) => {
            return vec![format!(
                "{version}: size unchanged: {}",
                crate::error::report(&e)
            )]
        }
    };
    let (cur_vcpus, cur_mem_kib) = match hv.live_resources(shadow) {
        Ok(r) => r,
        Err(source) => {
            let e = ApplyError::Resize {
                domain: shadow.to_string(),
                source,
            };
            return vec![format!(
                "{version}: size unchanged: {}",
                crate::error::report(&e)
            )];
        }
    };
    let balloon = balloon_target(
        plan.mem_kib,
        cur_mem_kib,
        balloon_stats(hv, shadow).as_ref(),
    );
    let target = clamp_plan(
        PlanSummary {
            vcpus: plan.vcpus,
            mem_kib: balloon.kib,
        },
        max_vcpus,
        max_mem_kib,
    );
    let derivation = match balloon.overhead_kib {
        Some(o) => format!(
            "planned use {} + reserve {GUEST_FREE_RESERVE_KIB} + guest overhead {o}",
            plan.mem_kib
        ),
        None => format!(
            "planned use {} + reserve {GUEST_FREE_RESERVE_KIB}; no balloon statistics, so not shrunk",
            plan.mem_kib
        ),
    };
    let mut notes = Vec::new();
    if target.vcpus != cur_vcpus {
        match hv.set_vcpus_live(shadow, target.vcpus) {
            Ok(()) => notes.push(format!(
                "{version}: vCPUs {cur_vcpus} -> {} (planned {}, shadow maximum {max_vcpus})",
                target.vcpus, plan.vcpus
            )),
            Err(source) => notes.push(format!(
                "{version}: vCPUs stay {cur_vcpus}: {}",
                crate::error::report(&ApplyError::Resize {
                    domain: shadow.to_string(),
                    source
                })
            )),
        }
    }
    if target.mem_kib != cur_mem_kib {
        match hv.set_memory_live(shadow, target.mem_kib) {
            Ok(()) => notes.push(format!(
                "{version}: memory {cur_mem_kib} -> {} KiB ({derivation}; shadow maximum {max_mem_kib})",
                target.mem_kib
            )),
            Err(source) => notes.push(format!(
                "{version}: memory stays {cur_mem_kib} KiB: {}",
                crate::error::report(&ApplyError::Resize {
                    domain: shadow.to_string(),
                    source
                })
            )),
        }
    }
    if notes.is_empty() {
        notes.push(format!(
            "{version}: size already as planned ({} vCPUs, {} KiB)",
            target.vcpus, target.mem_kib
        ));
    }
    notes
}

/// Writes each file whose copy in the guest differs from `files`; returns notes for the files
/// written or failed (files already identical need no note).
pub fn deliver_config<T: AgentTransport>(
    agent: &GuestAgent<T>,
    domain: &str,
    files: &[ConfigFileContent],
) -> Vec<String> {
    let mut notes = Vec::new();
    for f in files {
        if f.content.len() > MAX_CONFIG_FILE_BYTES || fnv1a64(&f.content) != f.hash {
            notes.push(format!(
                "configuration file {} skipped: content does not match its record",
                f.path
            ));
            continue;
        }
        let current = agent.read_file(&f.path, MAX_CONFIG_FILE_BYTES);
        if matches!(&current, Ok(g) if !g.truncated && fnv1a64(&g.data) == f.hash) {
            continue;
        }
        match agent.write_file(&f.path, &f.content, MAX_CONFIG_FILE_BYTES) {
            Ok(()) => notes.push(format!(
                "configuration file {} delivered ({} bytes, {})",
                f.path,
                f.content.len(),
                if current.is_ok() {
                    "differed"
                } else {
                    "was missing"
                }
            )),
            Err(source) => notes.push(crate::error::report(&ApplyError::Config {
                domain: domain.to_string(),
                path: f.path.clone(),
                source,
            })),
        }
    }
    notes
}

/// Tries a TCP connection to each TCP dependency (most recently seen first, at most
/// [`MAX_DEPENDENCY_CHECKS`], all at once); returns a note per unreachable one.
pub async fn check_dependencies(deps: &[Dependency], timeout: Duration) -> Vec<String> {
    let mut tcp: Vec<&Dependency> = deps.iter().filter(|d| d.proto == Proto::Tcp).collect();
    tcp.sort_by_key(|d| std::cmp::Reverse(d.last_seen_unix_ms));
    tcp.truncate(MAX_DEPENDENCY_CHECKS);
    let checks = tcp.into_iter().filter_map(|d| {
        let ip: IpAddr = d.addr.parse().ok()?;
        let addr = SocketAddr::new(ip, d.port);
        Some(async move {
            let r = match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await
            {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {} ms", timeout.as_millis()),
                )),
            };
            r.map_err(|source| ApplyError::Unreachable {
                key: format!("tcp://{addr}"),
                source,
            })
        })
    });
    let results = futures::future::join_all(checks).await;
    results
        .into_iter()
        .filter_map(Result::err)
        .map(|e| {
            tracing::warn!(error = %crate::error::report(&e), "profile dependency unreachable after promotion");
            crate::error::report(&e)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::agent::AgentTransportError;
    use serde_json::{json, Value};
    use std::collections::HashMap;
    use std::sync::Mutex;

    #[test]
    fn balloon_target_adds_reserve_and_measured_overhead() {
        // The lab guest: a 192 MiB balloon, MemTotal 141.5 MiB.
        let stats = DomainStats {
            balloon_current_kib: Some(196_608),
            balloon_available_kib: Some(144_932),
            ..DomainStats::default()
        };
        let t = balloon_target(65_536, 196_608, Some(&stats));
        assert_eq!(t.overhead_kib, Some(196_608 - 144_932));
        assert_eq!(t.kib, 65_536 + GUEST_FREE_RESERVE_KIB + 51_676);
        // Shrinks when the plan is small, grows when it is large.
        assert!(t.kib < 196_608);
        assert!(balloon_target(200_000, 196_608, Some(&stats)).kib > 196_608);
        // Without statistics: grow only.
        let blind = balloon_target(65_536, 196_608, None);
        assert_eq!((blind.kib, blind.overhead_kib), (196_608, None));
        assert_eq!(
            balloon_target(300_000, 196_608, None).kib,
            300_000 + GUEST_FREE_RESERVE_KIB
        );
        // Nonsense statistics (total above the balloon size, or zero) count as none.
        for bad in [
            (Some(100), Some(200)),
            (Some(100), Some(0)),
            (None, Some(50)),
        ] {
            let s = DomainStats {
                balloon_current_kib: bad.0,
                balloon_available_kib: bad.1,
                ..DomainStats::default()
            };
            assert_eq!(balloon_target(1, 196_608, Some(&s)).overhead_kib, None);
        }
    }

    #[test]
    fn plans_are_clamped_to_the_shadow() {
        let p = |vcpus, mem_kib| PlanSummary { vcpus, mem_kib };
        assert_eq!(clamp_plan(p(4, 1 << 20), 2, 294_912), p(2, 294_912));
        assert_eq!(clamp_plan(p(0, 1024), 2, 294_912), p(1, MEM_FLOOR_KIB));
        assert_eq!(clamp_plan(p(1, 200_000), 2, 294_912), p(1, 200_000));
        // A shadow smaller than the floor keeps its own maximum.
        assert_eq!(clamp_plan(p(1, 1024), 1, 32_768), p(1, 32_768));
    }

    /// An open guest file: path, mode, bytes written so far.
    type OpenFile = (String, String, Vec<u8>);

    /// A guest with a tiny file system: path -> content, and open handles.
    #[derive(Default)]
    struct Guest {
        files: Mutex<HashMap<String, Vec<u8>>>,
        open: Mutex<HashMap<i64, OpenFile>>,
        fail_writes: bool,
    }

    impl AgentTransport for Guest {
        fn command(&self, json: &str, _t: Duration) -> Result<String, AgentTransportError> {
            let v: Value = serde_json::from_str(json).unwrap();
            let a = &v["arguments"];
            let reply = match v["execute"].as_str().unwrap() {
                "guest-file-open" => {
                    let path = a["path"].as_str().unwrap().to_string();
                    let mode = a["mode"].as_str().unwrap().to_string();
                    if mode == "r" && !self.files.lock().unwrap().contains_key(&path) {
                        return Ok(
                            json!({"error": {"class": "GenericError", "desc": "No such file"}})
                                .to_string(),
                        );
                    }
                    let mut open = self.open.lock().unwrap();
                    let h = open.len() as i64 + 1;
                    open.insert(h, (path, mode, Vec::new()));
                    json!({ "return": h })
                }
                "guest-file-read" => {
                    let h = a["handle"].as_i64().unwrap();
                    let path = self.open.lock().unwrap()[&h].0.clone();
                    let data = self.files.lock().unwrap()[&path].clone();
                    json!({"return": {"count": data.len(), "buf-b64": crate::monitor::base64::encode(&data), "eof": true}})
                }
                "guest-file-write" => {
                    if self.fail_writes {
                        return Ok(json!({"error": {"class": "GenericError", "desc": "read-only file system"}}).to_string());
                    }
                    let h = a["handle"].as_i64().unwrap();
                    let data =
                        crate::monitor::base64::decode(a["buf-b64"].as_str().unwrap()).unwrap();
                    self.open
                        .lock()
                        .unwrap()
                        .get_mut(&h)
                        .unwrap()
                        .2
                        .extend_from_slice(&data);
                    json!({"return": {"count": data.len(), "eof": false}})
                }
                "guest-file-close" => {
                    let h = a["handle"].as_i64().unwrap();
                    let (path, mode, buf) = self.open.lock().unwrap().remove(&h).unwrap();
                    if mode == "w" {
                        self.files.lock().unwrap().insert(path, buf);
                    }
                    json!({"return": {}})
                }
                other => panic!("unexpected {other}"),
            };
            Ok(reply.to_string())
        }
    }

    fn file(path: &str, content: &[u8]) -> ConfigFileContent {
        ConfigFileContent {
            path: path.into(),
            content: content.to_vec(),
            hash: fnv1a64(content),
        }
    }

    #[test]
    fn only_differing_or_missing_files_are_written() {
        let guest = Guest::default();
        guest
            .files
            .lock()
            .unwrap()
            .insert("/etc/same".into(), b"same\n".to_vec());
        guest
            .files
            .lock()
            .unwrap()
            .insert("/etc/old".into(), b"workers = 2\n".to_vec());
        let agent = GuestAgent::new(&guest, AgentOptions::default());
        let notes = deliver_config(
            &agent,
            "web-shadow-1",
            &[
                file("/etc/same", b"same\n"),
                file("/etc/old", b"workers = 4\n"),
                file("/etc/new", b"x"),
            ],
        );
        let files = guest.files.lock().unwrap();
        assert_eq!(files["/etc/old"], b"workers = 4\n");
        assert_eq!(files["/etc/new"], b"x");
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes[0].contains("/etc/old") && notes[0].contains("differed"));
        assert!(notes[1].contains("/etc/new") && notes[1].contains("was missing"));
    }

    #[test]
    fn failed_or_inconsistent_deliveries_are_notes() {
        let guest = Guest {
            fail_writes: true,
            ..Guest::default()
        };
        let agent = GuestAgent::new(&guest, AgentOptions::default());
        let mut bad = file("/etc/a", b"abc");
        bad.hash ^= 1;
        let notes = deliver_config(&agent, "s", &[bad, file("/etc/b", b"b")]);
        assert_eq!(notes.len(), 2);
        assert!(
            notes[0].contains("does not match its record"),
            "{}",
            notes[0]
        );
        assert!(
            notes[1].contains("/etc/b") && notes[1].contains("read-only file system"),
            "{}",
            notes[1]
        );
    }

    #[tokio::test]
    async fn unreachable_tcp_dependencies_are_reported() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = listener.local_addr().unwrap().port();
        // A port that was bound and released: nothing listens there now.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let dep = |port, proto| Dependency {
            addr: "127.0.0.1".into(),
            port,
            proto,
            first_seen_unix_ms: 0,
            last_seen_unix_ms: 0,
            bytes: 0,
            count: 1,
        };
        let notes = check_dependencies(
            &[
                dep(open, Proto::Tcp),
                dep(closed, Proto::Tcp),
                dep(53, Proto::Udp),
            ],
            Duration::from_secs(2),
        )
        .await;
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(
            notes[0].contains(&format!("tcp://127.0.0.1:{closed}")),
            "{}",
            notes[0]
        );
    }
}
