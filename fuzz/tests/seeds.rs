//! Writes the seed corpus of the targets whose input the tree has no fixture file for (profile
//! versions, control requests and responses), from the crate's own types so the seeds stay
//! valid. Run with `cargo test --manifest-path fuzz/Cargo.toml --test seeds -- --ignored` after
//! a format change; the files are committed under `fuzz/corpus/`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use understudy::api::protocol::{
    DaemonInfo, DomainStatus, ErrorKind, HostEntry, HostPrimary, HostShadow, HostsReport, Request,
    Response, ServiceStatus, ShadowStatus, StatusReport,
};
use understudy::cluster::{HostState, Mode};
use understudy::failover::{FailoverRecord, ShadowState, StepTiming, Trigger};
use understudy::profile::learner::{Learner, LearnerParams};
use understudy::profile::{Observation, PeerUse, ProfileVersion, Proto, Reason};

fn corpus(target: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
#[ignore = "regenerates committed seed files"]
fn write_profile_seeds() {
    let dir = corpus("profile");
    let mut learner = Learner::new(LearnerParams::default()).unwrap();
    let version = |profile, reason| ProfileVersion {
        version: 3,
        created_unix_ms: 1_764_590_000_000,
        reason,
        service: "web".to_string(),
        profile,
    };
    let empty = version(learner.profile().clone(), Reason::Initial);
    std::fs::write(dir.join("empty.json"), serde_json::to_vec(&empty).unwrap()).unwrap();
    // Three hours of one sample a minute, with a peer and a config item.
    let start = 1_764_590_000_000u64;
    for i in 0..180u64 {
        let obs = Observation {
            ts_unix_ms: start + i * 60_000,
            cpu_cores: 0.2 + (i % 7) as f64 * 0.05,
            mem_bytes: 200 << 20,
            disk_bytes_per_s: 4096.0 * (i % 3) as f64,
            net_bytes_per_s: 1500.0,
            config: BTreeMap::from([("file:/etc/app.conf".to_string(), "1f2e".to_string())]),
            peers: vec![PeerUse {
                addr: "10.77.0.9".to_string(),
                port: 5432,
                proto: Proto::Tcp,
                bytes: 900,
            }],
        };
        learner.observe(&obs);
    }
    let learned = version(
        learner.profile().clone(),
        Reason::Drift {
            detail: "cpu above envelope".to_string(),
        },
    );
    std::fs::write(
        dir.join("learned.json"),
        serde_json::to_vec(&learned).unwrap(),
    )
    .unwrap();
}

#[test]
#[ignore = "regenerates committed seed files"]
fn write_control_seeds() {
    let dir = corpus("control");
    let s = || "web".to_string();
    let requests = [
        Request::Status,
        Request::Failover {
            service: s(),
            to_host: None,
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
            a: 1,
            b: 2,
        },
        Request::ProfileRollback {
            service: s(),
            to: Some(1),
        },
        Request::ProfileAccuracy { service: None },
        Request::ReloadConfig,
        Request::Hosts,
    ];
    for r in &requests {
        let mut line = serde_json::to_vec(r).unwrap();
        line.push(b'\n');
        std::fs::write(dir.join(format!("request-{}.json", r.name())), line).unwrap();
    }
    let responses = [
        Response::ok("failover of web started"),
        Response::error(ErrorKind::NotFound, "no service named db"),
        Response::Status(status()),
        Response::Failover(status().services[0].last_failover.clone().unwrap()),
        Response::Hosts(hosts()),
    ];
    for (i, r) in responses.iter().enumerate() {
        std::fs::write(
            dir.join(format!("response-{i}.json")),
            serde_json::to_vec(r).unwrap(),
        )
        .unwrap();
    }
}

fn hosts() -> HostsReport {
    let mut h1 = HostEntry::unknown("h1");
    h1.known = true;
    h1.alive = true;
    h1.libvirt_uri = "qemu+tcp://h1/system".into();
    h1.primaries.push(HostPrimary {
        service: "web".into(),
        domain: "web".into(),
        generation: 2,
    });
    let mut h2 = HostEntry::unknown("h2");
    h2.known = true;
    h2.state = HostState::Draining;
    h2.shadows.push(HostShadow {
        service: "web".into(),
        shadow: "web-shadow-3".into(),
        status: understudy::cluster::ShadowStatus::Ready,
    });
    HostsReport {
        this_host: "h1".into(),
        mode: Mode::Connected,
        last_keepalive_ms_ago: Some(250),
        lease_ttl_ms: Some(5000),
        hosts: vec![h1, h2],
        peers: Vec::new(),
        self_fenced: false,
        records_error: None,
    }
}

fn status() -> StatusReport {
    StatusReport {
        daemon: DaemonInfo {
            version: "0.1.0".into(),
            pid: 4242,
            started_unix_ms: 1_000_000,
            libvirt_uri: "qemu:///system".into(),
            connected: true,
            host: "h1".into(),
            capacity: None,
        },
        services: vec![ServiceStatus {
            name: "web".into(),
            class: "stateless".into(),
            state: "protected".into(),
            active: Some("web-a".into()),
            shadows: vec![ShadowStatus {
                name: "web-s1".into(),
                state: ShadowState::Standby(understudy::failover::record::Tier::Paused),
                memory: None,
                share_of_primary_pct: None,
            }],
            primary_memory: None,
            standby_memory_bytes: 0,
            standby_share_pct: None,
            standby_plan: None,
            identity: None,
            last_verify: None,
            last_failover: Some(FailoverRecord {
                at_unix_ms: 1_500_000,
                from: "web-old".into(),
                to: "web-a".into(),
                trigger: Trigger::Pidfd,
                outage_ms: 42.5,
                steps: vec![StepTiming {
                    name: "fence".into(),
                    ms: 1.25,
                    start_ms: Some(0.5),
                }],
                ok: true,
                error: None,
                notes: vec!["profile v3: vCPUs 1 -> 2".into()],
            }),
            health: "ok".into(),
            last_heartbeat_unix_ms: Some(1_599_000),
            disks: vec![understudy::failover::plan::DiskPlan {
                target: "sdb".into(),
                kind: "file".into(),
                device: "disk".into(),
                source: Some("/d/web-data.raw".into()),
                role: Some(understudy::config::DiskRole::Data),
                handling: understudy::failover::plan::DiskHandling::HandedOver,
                keeps_data: Some(true),
                overlay_base: None,
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
        pools: Vec::new(),
    }
}
