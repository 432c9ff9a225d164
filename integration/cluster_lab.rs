//! The daemon with a `[cluster]` table, on a real guest in the lab and a real etcd: it
//! registers its host under a lease, adopts its primary in etcd, publishes the primary's spec
//! and its shadow, claims through etcd when it fails over, keeps the owner across a restart,
//! answers `understudy hosts`, and is lost when it stops.

use std::time::{Duration, Instant};

use understudy::cluster::etcd::keys::Keys;
use understudy::cluster::{
    ClusterEvent, Coordinator, EtcdCoordinator, EtcdSettings, HostId, OwnerRecord, ShadowStatus,
};

use crate::common::*;
use crate::etcd_server::EtcdServer;

const SHADOW_WAIT: Duration = Duration::from_secs(240);
const PREFIX: &str = "/understudy/it";

fn observer(rt: &tokio::runtime::Runtime, etcd: &EtcdServer) -> EtcdCoordinator {
    let _g = rt.enter();
    EtcdCoordinator::start(EtcdSettings {
        endpoints: understudy::cluster::etcd::Endpoints {
            urls: vec![etcd.endpoint()],
            connect_timeout: Duration::from_millis(500),
            op_timeout: Duration::from_secs(1),
        },
        host: HostId("observer".into()),
        prefix: PREFIX.into(),
        lease_ttl: Duration::from_secs(2),
        keepalive_every: Duration::from_millis(500),
    })
    .unwrap()
}

/// The owner record's mod revision in etcd (it changes with every write).
fn owner_revision(rt: &tokio::runtime::Runtime, etcd: &EtcdServer, service: &str) -> i64 {
    let key = Keys::new(PREFIX).unwrap().owner(service).unwrap();
    rt.block_on(async {
        let mut c = etcd_client::Client::connect([etcd.endpoint()], None)
            .await
            .unwrap();
        c.get(key, None).await.unwrap().kvs()[0].mod_revision()
    })
}

#[test]
fn daemon_in_a_cluster_registers_claims_through_etcd_and_publishes() {
    require_lab();
    let name = "it-etcd1";
    let ip = "10.77.0.70";
    let _cleanup = Cleanup {
        prefixes: vec![name.to_string()],
    };
    let etcd = EtcdServer::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let obs = observer(&rt, &etcd);
    let mut events = obs.watch();
    let cluster = format!(
        "\n[cluster]\nendpoints = [\"{}\"]\nhost = \"lab-h1\"\nkey_prefix = \"{PREFIX}\"\nlease_ttl_s = 2\nlibvirt_uri = \"qemu+tcp://lab-h1/system\"\n",
        etcd.endpoint()
    );
    let mut daemon = DaemonProc::start_configured("etcd", name, 1, &cluster, &[]);
    let hv = hypervisor();
    start_guest(&hv, name, &format!("{ip}/24"), &[]);
    let shadow = daemon.wait_paused_shadows(name, 1, SHADOW_WAIT)[0].clone();
    let h1 = HostId("lab-h1".into());

    // Its host, its owner record, its primary's spec and its shadow are in etcd.
    let owner = wait_for(
        "owner, spec and shadow in etcd",
        Duration::from_secs(30),
        || {
            rt.block_on(async {
                let owner = obs.owner(name).await.ok()??;
                let spec = obs.spec(name).await.ok()??;
                let shadows = obs.shadows().await.ok()?;
                let ready = shadows
                    .iter()
                    .any(|s| s.shadow == shadow && s.host == h1 && s.status == ShadowStatus::Ready);
                (ready && spec.generation == owner.generation).then_some((owner, spec))
            })
        },
    );
    let (owner, spec) = owner;
    assert_eq!(
        owner,
        OwnerRecord {
            service: name.into(),
            domain: name.into(),
            host: h1.clone(),
            generation: 1
        }
    );
    assert_eq!(
        (spec.host.clone(), spec.class.as_str()),
        (h1.clone(), "default")
    );
    assert!(
        spec.xml.contains(&format!("<name>{name}</name>")),
        "{}",
        spec.xml
    );
    let hosts = rt.block_on(obs.hosts()).unwrap();
    let me = hosts
        .iter()
        .find(|h| h.facts.host == h1)
        .expect("lab-h1 registered");
    assert!(me.alive);
    assert_eq!(me.facts.libvirt_uri, "qemu+tcp://lab-h1/system");
    assert!(me.facts.capacity.is_some_and(|c| c.cpus >= 1));

    // `understudy hosts`, as JSON and as text.
    let (code, out, err) = daemon.cli(&["hosts", "--json"]);
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["this_host"], "lab-h1");
    assert_eq!(report["mode"], "connected");
    let entry = report["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == "lab-h1")
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(entry["alive"], true);
    assert_eq!(entry["primaries"][0]["domain"], name);
    assert_eq!(entry["shadows"][0]["shadow"], shadow.as_str());
    let (code, text, _) = daemon.cli(&["hosts"]);
    assert_eq!(code, 0);
    println!("understudy hosts:\n{text}");
    assert!(text.contains("host lab-h1: alive, active"), "{text}");
    assert!(text.contains(&format!("primary {name}")), "{text}");

    // A crash fails over through an etcd claim: the owner names the shadow, generation 2,
    // and the spec follows it.
    let pid = qemu_pid(name);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let moved = wait_for(
        "the owner record to name the shadow",
        Duration::from_secs(60),
        || {
            rt.block_on(obs.owner(name))
                .ok()
                .flatten()
                .filter(|o| o.domain == shadow)
        },
    );
    assert_eq!((moved.generation, &moved.host), (2, &h1));
    wait_for(
        "the spec of the new primary",
        Duration::from_secs(30),
        || {
            rt.block_on(obs.spec(name))
                .ok()
                .flatten()
                .filter(|s| s.domain == shadow && s.generation == 2)
        },
    );

    // A restarted daemon adopts what it finds and writes no owner.
    let before = owner_revision(&rt, &etcd, name);
    daemon.restart();
    daemon.wait_paused_shadows(name, 1, SHADOW_WAIT);
    assert_eq!(rt.block_on(obs.owner(name)).unwrap(), Some(moved));
    assert_eq!(
        owner_revision(&rt, &etcd, name),
        before,
        "the restart rewrote the owner"
    );

    // Stopped for good: its lease runs out and the host is lost.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    let _ = daemon.child.wait();
    let stopped = Instant::now();
    rt.block_on(async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Ok(ClusterEvent::HostLost(h))) if h == h1 => break,
                Ok(_) => {}
                Err(_) => panic!("lab-h1 never lost"),
            }
        }
    });
    println!(
        "understudy-etcd daemon killed: host lost after {:?} (lease TTL 2 s)",
        stopped.elapsed()
    );
    let hosts = rt.block_on(obs.hosts()).unwrap();
    assert!(!hosts.iter().find(|h| h.facts.host == h1).unwrap().alive);
}
