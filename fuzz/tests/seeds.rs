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
use understudy::cluster::{HostId, HostState, Mode};
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

#[test]
#[ignore = "regenerates committed seed files"]
fn write_cluster_seeds() {
    use understudy::cluster::etcd::keys::Keys;
    use understudy::cluster::liveness::{Beat, BEAT_VERSION};
    use understudy_fuzz::cluster::PREFIX;

    let dir = corpus("cluster");
    let beat = Beat {
        v: BEAT_VERSION,
        prefix: PREFIX.into(),
        host: "h2".into(),
        seq: 41,
        mode: Mode::Connected,
        hears: vec!["h1".into(), "h3".into()],
        answering: vec!["web1".into()],
        unreachable: vec!["db".into()],
    };
    std::fs::write(dir.join("beat.json"), beat.encode()).unwrap();
    let isolated = Beat {
        mode: Mode::Unreachable,
        hears: Vec::new(),
        answering: Vec::new(),
        unreachable: Vec::new(),
        ..beat
    };
    std::fs::write(dir.join("beat-isolated.json"), isolated.encode()).unwrap();
    // A watch event: the key, a newline, the value (the fixtures of src/cluster/etcd).
    let keys = Keys::new(PREFIX).unwrap();
    let (h1, h2) = (HostId("h1".into()), HostId("h2".into()));
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../src/cluster/etcd/fixtures");
    for (name, key) in [
        ("owner", keys.owner("web1").unwrap()),
        ("host", keys.alive(&h1).unwrap()),
        ("drain", keys.drain(&h2).unwrap()),
        ("spec", keys.spec("web1").unwrap()),
        ("failure", keys.failure("web1").unwrap()),
        ("shadow", keys.shadow("web1", &h2, "web1-shadow-3").unwrap()),
    ] {
        let value = std::fs::read(fixtures.join(format!("{name}.json"))).unwrap();
        let mut event = key.into_bytes();
        event.push(b'\n');
        event.extend_from_slice(value.trim_ascii_end());
        std::fs::write(dir.join(format!("event-{name}.txt")), event).unwrap();
    }
    let deleted = format!("{}\n", keys.shadow("web1", &h2, "web1-shadow-3").unwrap());
    std::fs::write(dir.join("event-shadow-deleted.txt"), deleted).unwrap();
    let profile = format!("{}\n{{}}", keys.profile("web1", 7).unwrap());
    std::fs::write(dir.join("event-profile.txt"), profile).unwrap();
}

#[test]
#[ignore = "regenerates committed seed files"]
fn write_capture_seeds() {
    use understudy::capture::flow::Segment;
    use understudy_fuzz::capture::{frame_record, segment_record};

    let dir = corpus("capture");
    fn seg(seq: u32, syn: bool, fin: bool, data: &[u8]) -> Segment<'_> {
        Segment {
            seq,
            syn,
            fin,
            rst: false,
            data,
        }
    }
    // One connection: handshake, `data` each way in order, then both FINs.
    let exchange = |mode: u8, to_server: &[&[u8]], to_client: &[&[u8]]| {
        let mut out = vec![mode];
        let (mut c, mut s) = (1000u32, 90_000u32);
        out.extend(segment_record(0, true, seg(c, true, false, b"")));
        out.extend(segment_record(0, false, seg(s, true, false, b"")));
        c += 1;
        s += 1;
        for d in to_server {
            out.extend(segment_record(0, true, seg(c, false, false, d)));
            c += d.len() as u32;
        }
        for d in to_client {
            out.extend(segment_record(0, false, seg(s, false, false, d)));
            s += d.len() as u32;
        }
        out.extend(segment_record(0, true, seg(c, false, true, b"")));
        out.extend(segment_record(0, false, seg(s, false, true, b"")));
        out
    };
    let seeds: [(&str, Vec<u8>); 5] = [
        (
            "http-get.bin",
            exchange(
                0,
                &[b"GET /ledger?key=k1&token=sk-00ff00ff HTTP/1.1\r\nHost: web\r\n",
                    b"Authorization: Bearer x\r\n\r\n"],
                &[b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nk1\n"],
            ),
        ),
        (
            "http-post-json-chunked.bin",
            exchange(
                0,
                &[b"POST /login HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 35\r\n\r\n{\"user\":\"al\",\"password\":\"hunter22\"}"],
                &[b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nSet-Cookie: sid=1\r\n\r\n",
                    b"4\r\nok\r\n\r\n0\r\n\r\n"],
            ),
        ),
        (
            "http-pipelined-until-close.bin",
            exchange(
                0,
                &[b"GET /a HTTP/1.1\r\n\r\nGET /b?password=x HTTP/1.1\r\n\r\n"],
                &[b"HTTP/1.1 204 No Content\r\n\r\n", b"HTTP/1.0 200 OK\r\n\r\nuntil close"],
            ),
        ),
        (
            "tcp-stream.bin",
            exchange(1, &[b"PING sk-abcdef123\r\n"], &[b"+PONG\r\n"]),
        ),
        ("chunked-only.bin", b"\x085\r\nhello\r\n0\r\nTrailer: 1\r\n\r\n".to_vec()),
    ];
    for (name, data) in seeds {
        std::fs::write(dir.join(name), data).unwrap();
    }
    // The IPv6 exchange of src/capture/fixtures, as frame records.
    let hex = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../src/capture/fixtures/ipv6-http.hex"),
    )
    .unwrap();
    let mut frames = vec![0u8];
    for line in hex
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let frame: Vec<u8> = (0..line.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&line[i..i + 2], 16).unwrap())
            .collect();
        frames.extend(frame_record(&frame));
    }
    std::fs::write(dir.join("ipv6-http-frames.bin"), frames).unwrap();
}
