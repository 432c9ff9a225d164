//! The etcd coordinator and profile repository against a real etcd (one member started by the
//! test on loopback, see `etcd_server`): concurrent claims, membership and lease expiry,
//! keepalive across an etcd restart and a revoked lease, adopt after a restart, profile
//! versions, malformed values, bounded calls. No libvirt needed.
//!
//! Figures (claim latency, time to notice a lost host, time to reconnect) are printed, never
//! asserted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, LeaseTimeToLiveOptions};
use tokio::sync::broadcast;

use understudy::cluster::etcd::{keys::Keys, Endpoints};
use understudy::cluster::{
    Claim, ClusterEvent, CoordError, Coordinator, EtcdCoordinator, EtcdProfileRepository,
    EtcdSettings, FailureReport, HostFacts, HostId, HostState, Mode, PrimarySpec, ShadowRecord,
    ShadowStatus,
};
use understudy::failover::Trigger;
use understudy::profile::{
    ModelParams, Profile, ProfileRepository, ProfileStore, ProfileVersion, Reason, RepoError,
};

use crate::etcd_server::EtcdServer;

const PREFIX: &str = "/understudy/test";
/// Guard against a hang: far longer than anything here should take.
const PATIENCE: Duration = Duration::from_secs(30);

fn endpoints(etcd: &EtcdServer) -> Endpoints {
    Endpoints {
        urls: etcd.endpoints(),
        connect_timeout: Duration::from_millis(500),
        op_timeout: Duration::from_millis(1000),
    }
}

fn settings(etcd: &EtcdServer, host: &str) -> EtcdSettings {
    EtcdSettings {
        endpoints: endpoints(etcd),
        host: HostId(host.into()),
        prefix: PREFIX.into(),
        lease_ttl: Duration::from_secs(2),
        keepalive_every: Duration::from_millis(300),
    }
}

fn start(etcd: &EtcdServer, host: &str) -> Arc<EtcdCoordinator> {
    Arc::new(EtcdCoordinator::start(settings(etcd, host)).expect("coordinator"))
}

async fn raw(etcd: &EtcdServer) -> Client {
    Client::connect([etcd.endpoint()], None)
        .await
        .expect("raw etcd client")
}

/// Polls `f` every 50 ms until it gives a value; panics naming `what` after [`PATIENCE`].
async fn until<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_mode(c: &EtcdCoordinator, mode: Mode) {
    let mut rx = c.lease();
    tokio::time::timeout(PATIENCE, rx.wait_for(|s| s.mode == mode))
        .await
        .unwrap_or_else(|_| panic!("mode {mode:?} not reached; now {:?}", *c.lease().borrow()))
        .unwrap();
}

/// The next event `pick` accepts (others skipped); panics after [`PATIENCE`].
async fn next_event<T>(
    rx: &mut broadcast::Receiver<ClusterEvent>,
    what: &str,
    mut pick: impl FnMut(ClusterEvent) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Ok(ev)) => {
                if let Some(v) = pick(ev) {
                    return v;
                }
            }
            Ok(Err(e)) => panic!("event stream failed while waiting for {what}: {e}"),
            Err(_) => panic!("no {what} event within {PATIENCE:?}"),
        }
    }
}

/// Waits until `c`'s watch is established: a drain flag it sets comes back as an event.
async fn watch_ready(c: &EtcdCoordinator, rx: &mut broadcast::Receiver<ClusterEvent>) {
    let probe = HostId("watch-probe".into());
    let deadline = Instant::now() + PATIENCE;
    loop {
        assert!(Instant::now() < deadline, "the watch never delivered");
        if c.set_drain(&probe, true).await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let got = tokio::time::timeout(Duration::from_millis(500), async {
            loop {
                if let Ok(ClusterEvent::Drain { host, .. }) = rx.recv().await {
                    if host == probe {
                        return;
                    }
                }
            }
        })
        .await;
        if got.is_ok() {
            break;
        }
    }
    c.set_drain(&probe, false).await.unwrap();
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn facts(host: &str) -> HostFacts {
    HostFacts::now(
        HostId(host.into()),
        &format!("qemu+tcp://{host}.mgmt/system"),
        understudy::clock::now_unix_ms(),
    )
}

fn shadow(service: &str, name: &str) -> ShadowRecord {
    ShadowRecord {
        service: service.into(),
        shadow: name.into(),
        host: HostId("stamped-by-the-coordinator".into()),
        status: ShadowStatus::Ready,
        mem_kib: 262144,
        updated_unix_ms: understudy::clock::now_unix_ms(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_claiming_one_service_at_once_exactly_one_wins() {
    let etcd = EtcdServer::start();
    let (a, b) = (start(&etcd, "h1"), start(&etcd, "h2"));
    let first = a.adopt("web", "web").await.unwrap();
    assert_eq!((first.generation, first.host.0.as_str()), (1, "h1"));

    let rounds = 30;
    let mut wins = [0u32; 2];
    let mut contended = Vec::new();
    for (round, generation) in (0..rounds).zip(1u64..) {
        let barrier = Arc::new(tokio::sync::Barrier::new(2));
        let task = |c: Arc<EtcdCoordinator>, domain: String| {
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                let t = Instant::now();
                let r = c
                    .claim(Claim {
                        service: "web".into(),
                        domain,
                        expected: generation,
                    })
                    .await;
                (r, t.elapsed())
            })
        };
        let ta = task(a.clone(), format!("web-h1-{round}"));
        let tb = task(b.clone(), format!("web-h2-{round}"));
        let ((ra, da), (rb, db)) = (ta.await.unwrap(), tb.await.unwrap());
        contended.extend([da, db]);
        let (winner, loser, w) = match (ra, rb) {
            (Ok(w), Err(l)) => (w, l, 0),
            (Err(l), Ok(w)) => (w, l, 1),
            (ra, rb) => panic!("round {round}: not exactly one winner: {ra:?} / {rb:?}"),
        };
        wins[w] += 1;
        assert_eq!(winner.generation, generation + 1);
        match loser {
            CoordError::Conflict {
                expected, current, ..
            } => {
                assert_eq!(expected, generation);
                assert_eq!(current, winner, "the loser sees the winner's record");
            }
            other => panic!("round {round}: the loser got {other:?}, not Conflict"),
        }
        // Both hosts read the same owner.
        assert_eq!(a.owner("web").await.unwrap(), Some(winner.clone()));
        assert_eq!(b.owner("web").await.unwrap(), Some(winner));
    }
    // A stale claim (an old generation) is refused too.
    assert!(matches!(
        a.claim(Claim {
            service: "web".into(),
            domain: "late".into(),
            expected: 1
        })
        .await,
        Err(CoordError::Conflict { .. })
    ));

    // Uncontended claim latency, one host.
    let mut alone = Vec::new();
    for i in 0..100 {
        let t = Instant::now();
        a.claim(Claim {
            service: "solo".into(),
            domain: format!("solo-{i}"),
            expected: i,
        })
        .await
        .unwrap();
        alone.push(t.elapsed());
    }
    alone.sort();
    contended.sort();
    println!(
        "understudy-etcd claims: {rounds} contended rounds, wins h1={} h2={}; contended claim median {:?} p99 {:?} max {:?}; uncontended (100) median {:?} p99 {:?} max {:?}",
        wins[0],
        wins[1],
        percentile(&contended, 0.5),
        percentile(&contended, 0.99),
        contended.last().unwrap(),
        percentile(&alone, 0.5),
        percentile(&alone, 0.99),
        alone.last().unwrap(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_appears_with_its_facts_and_is_lost_when_its_keepalive_stops() {
    let etcd = EtcdServer::start();
    let observer = start(&etcd, "h2");
    let mut events = observer.watch();
    watch_ready(&observer, &mut events).await;

    let h1 = HostId("h1".into());
    let a = start(&etcd, "h1");
    wait_mode(&a, Mode::Connected).await;
    a.register(facts("h1")).await.unwrap();
    a.register_shadow(shadow("web", "web-shadow-1"))
        .await
        .unwrap();
    let up = next_event(&mut events, "HostUp h1", |e| match e {
        ClusterEvent::HostUp(f) if f.host == h1 => Some(f),
        _ => None,
    })
    .await;
    assert_eq!(up.libvirt_uri, "qemu+tcp://h1.mgmt/system");
    let hosts = observer.hosts().await.unwrap();
    let h = hosts
        .iter()
        .find(|h| h.facts.host == h1)
        .expect("h1 listed");
    assert!(h.alive);
    assert_eq!(h.state, HostState::Active);
    let cap = h.facts.capacity.expect("capacity from sysinfo");
    assert!(
        cap.cpus >= 1 && cap.mem_available_kib > 0 && cap.mem_total_kib >= cap.mem_available_kib
    );
    let shadows = observer.shadows().await.unwrap();
    assert_eq!(shadows.len(), 1);
    assert_eq!(
        (shadows[0].host.0.as_str(), shadows[0].shadow.as_str()),
        ("h1", "web-shadow-1")
    );

    // Drain is seen by every host.
    observer.set_drain(&h1, true).await.unwrap();
    let h = observer.hosts().await.unwrap();
    assert_eq!(
        h.iter().find(|h| h.facts.host == h1).unwrap().state,
        HostState::Draining
    );
    observer.set_drain(&h1, false).await.unwrap();

    // The daemon stops without revoking: its lease runs out.
    let lease = a.lease().borrow().ttl;
    let stopped = Instant::now();
    drop(a);
    next_event(&mut events, "HostLost h1", |e| match e {
        ClusterEvent::HostLost(h) if h == h1 => Some(()),
        _ => None,
    })
    .await;
    let noticed = stopped.elapsed();
    let hosts = observer.hosts().await.unwrap();
    let h = hosts
        .iter()
        .find(|h| h.facts.host == h1)
        .expect("a lost host stays listed");
    assert!(!h.alive, "{h:?}");
    assert_eq!(h.facts.libvirt_uri, "qemu+tcp://h1.mgmt/system");
    assert!(
        observer.shadows().await.unwrap().is_empty(),
        "its shadows went with its lease"
    );
    println!("understudy-etcd lost host: keepalives stopped to HostLost seen by another host: {noticed:?} (lease TTL {lease:?})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_survives_an_etcd_restart_and_a_revoked_lease() {
    let mut etcd = EtcdServer::start();
    let a = start(&etcd, "h1");
    wait_mode(&a, Mode::Connected).await;
    a.register(facts("h1")).await.unwrap();
    a.register_shadow(shadow("web", "web-shadow-1"))
        .await
        .unwrap();
    let before = *a.lease().borrow();

    // etcd dies: the mode says so and no keepalive is acknowledged meanwhile.
    etcd.kill();
    let down = Instant::now();
    wait_mode(&a, Mode::Unreachable).await;
    let noticed = down.elapsed();
    let during = *a.lease().borrow();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        a.lease().borrow().last_ack_sent,
        during.last_ack_sent,
        "nothing acknowledged while etcd is down"
    );
    // A registration made meanwhile fails, bounded, and is held for later.
    let r = tokio::time::timeout(PATIENCE, a.register_shadow(shadow("web", "web-shadow-2"))).await;
    assert!(
        matches!(
            r,
            Ok(Err(
                CoordError::Unavailable { .. } | CoordError::Timeout { .. }
            ))
        ),
        "{r:?}"
    );

    etcd.restart();
    let up = Instant::now();
    wait_mode(&a, Mode::Connected).await;
    let back = up.elapsed();
    let after = *a.lease().borrow();
    assert!(after.last_ack_sent > during.last_ack_sent);
    let hosts = a.hosts().await.unwrap();
    assert!(
        hosts.iter().any(|h| h.facts.host.0 == "h1" && h.alive),
        "{hosts:?}"
    );
    let mut names: Vec<String> = a
        .shadows()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.shadow)
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["web-shadow-1", "web-shadow-2"],
        "held keys are written again"
    );
    println!(
        "understudy-etcd restart: unreachable noticed after {noticed:?}; connected again {back:?} after etcd came back; lease {:?} -> {:?}",
        before.lease_id, after.lease_id
    );

    // The lease revoked behind its back (as if it had expired): a new one carries every key.
    let id = after.lease_id.expect("a lease");
    let mut c = raw(&etcd).await;
    c.lease_revoke(id).await.unwrap();
    let new_id = until("a new lease", || async {
        a.lease().borrow().lease_id.filter(|n| *n != id)
    })
    .await;
    wait_mode(&a, Mode::Connected).await;
    until("h1 alive again with its shadows", || async {
        let alive = a
            .hosts()
            .await
            .ok()?
            .iter()
            .any(|h| h.facts.host.0 == "h1" && h.alive);
        (alive && a.shadows().await.ok()?.len() == 2).then_some(())
    })
    .await;
    let keys = c
        .lease_time_to_live(new_id, Some(LeaseTimeToLiveOptions::new().with_keys()))
        .await
        .unwrap();
    assert_eq!(
        keys.keys().len(),
        3,
        "alive key and two shadows under the new lease"
    );

    // A shadow removed while etcd is away does not come back with the next lease.
    etcd.kill();
    wait_mode(&a, Mode::Unreachable).await;
    let _ = a.unregister_shadow("web", "web-shadow-2").await;
    etcd.restart();
    wait_mode(&a, Mode::Connected).await;
    until("only web-shadow-1 left", || async {
        let s = a.shadows().await.ok()?;
        (s.len() == 1 && s[0].shadow == "web-shadow-1").then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adopt_after_a_restart_changes_no_owner() {
    let etcd = EtcdServer::start();
    let a = start(&etcd, "h1");
    a.adopt("web", "web").await.unwrap();
    let moved = a
        .claim(Claim {
            service: "web".into(),
            domain: "web-shadow-1".into(),
            expected: 1,
        })
        .await
        .unwrap();
    let key = Keys::new(PREFIX).unwrap().owner("web").unwrap();
    let mut c = raw(&etcd).await;
    let rev = |r: etcd_client::GetResponse| r.kvs()[0].mod_revision();
    let before = rev(c.get(key.as_str(), None).await.unwrap());
    drop(a);

    // The restarted daemon finds the old primary's domain and adopts it: the record stays.
    let a2 = start(&etcd, "h1");
    assert_eq!(a2.adopt("web", "web").await.unwrap(), moved);
    // Another host adopting a domain of its own gets the record in force.
    let b = start(&etcd, "h2");
    assert_eq!(b.adopt("web", "web-elsewhere").await.unwrap(), moved);
    assert_eq!(
        rev(c.get(key.as_str(), None).await.unwrap()),
        before,
        "nothing written"
    );
    assert_eq!(b.owners().await.unwrap(), vec![moved.clone()]);

    // Release is conditional too.
    assert!(matches!(
        b.release("web", 1).await,
        Err(CoordError::Conflict { .. })
    ));
    b.release("web", 2).await.unwrap();
    assert_eq!(a2.owner("web").await.unwrap(), None);
    assert!(matches!(
        b.release("web", 2).await,
        Err(CoordError::NoRecord { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn specs_and_failure_reports_reach_the_other_host() {
    let etcd = EtcdServer::start();
    let (a, b) = (start(&etcd, "h1"), start(&etcd, "h2"));
    let mut events = b.watch();
    watch_ready(&b, &mut events).await;
    let xml = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/domain_xml/fixtures/full.xml"
    ))
    .unwrap();
    a.publish_spec(PrimarySpec {
        service: "web".into(),
        class: "default".into(),
        domain: "web".into(),
        host: HostId("ignored".into()),
        generation: 1,
        xml: xml.clone(),
        published_unix_ms: 1,
    })
    .await
    .unwrap();
    let spec = next_event(&mut events, "Spec web", |e| match e {
        ClusterEvent::Spec(s) => Some(s),
        _ => None,
    })
    .await;
    assert_eq!(
        (spec.host.0.as_str(), spec.xml.as_str()),
        ("h1", xml.as_str())
    );
    assert_eq!(b.spec("web").await.unwrap(), Some(spec.clone()));
    assert_eq!(b.specs().await.unwrap(), vec![spec]);

    a.report_failure(FailureReport {
        service: "web".into(),
        domain: "web".into(),
        host: HostId("ignored".into()),
        generation: 1,
        trigger: Trigger::Pidfd,
        at_unix_ms: 7,
        to: None,
    })
    .await
    .unwrap();
    let report = next_event(&mut events, "Failure web", |e| match e {
        ClusterEvent::Failure(r) => Some(r),
        _ => None,
    })
    .await;
    assert_eq!(
        (report.host.0.as_str(), report.trigger),
        ("h1", Trigger::Pidfd)
    );
    b.clear_failure("web").await.unwrap();
    next_event(&mut events, "FailureCleared", |e| {
        matches!(e, ClusterEvent::FailureCleared { .. }).then_some(())
    })
    .await;
    a.withdraw_spec("web").await.unwrap();
    next_event(&mut events, "SpecWithdrawn", |e| {
        matches!(e, ClusterEvent::SpecWithdrawn { .. }).then_some(())
    })
    .await;
    assert!(b.failures().await.unwrap().is_empty());
    assert_eq!(b.spec("web").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_values_are_errors_naming_their_key() {
    let etcd = EtcdServer::start();
    let a = start(&etcd, "h1");
    let mut events = a.watch();
    watch_ready(&a, &mut events).await;
    let mut c = raw(&etcd).await;
    let k = Keys::new(PREFIX).unwrap();
    let owner = k.owner("web").unwrap();
    c.put(owner.as_str(), "{\"service\":\"web\",\"domain\":", None)
        .await
        .unwrap();

    let named = |e: CoordError, key: &str| {
        let text = e.to_string();
        assert!(text.contains(key), "{text} does not name {key}");
        e
    };
    assert!(matches!(
        named(a.owner("web").await.unwrap_err(), &owner),
        CoordError::Malformed { .. }
    ));
    let claim = a
        .claim(Claim {
            service: "web".into(),
            domain: "web-shadow-1".into(),
            expected: 1,
        })
        .await
        .unwrap_err();
    assert!(matches!(named(claim, &owner), CoordError::Malformed { .. }));
    assert!(matches!(
        named(a.adopt("web", "web").await.unwrap_err(), &owner),
        CoordError::Malformed { .. }
    ));
    named(a.owners().await.unwrap_err(), &owner);
    // The record names another service than its key.
    c.put(
        owner.as_str(),
        "{\"service\":\"db\",\"domain\":\"db\",\"host\":\"h1\",\"generation\":1}",
        None,
    )
    .await
    .unwrap();
    let e = named(a.owner("web").await.unwrap_err(), &owner);
    assert!(
        e.to_string()
            .contains("the key names service 'web', the value 'db'"),
        "{e}"
    );

    let host = k.host(&HostId("h9".into())).unwrap();
    c.put(host.as_str(), vec![0xff, 0x00, 0x13], None)
        .await
        .unwrap();
    named(a.hosts().await.unwrap_err(), &host);

    let big = k.spec("big").unwrap();
    c.put(big.as_str(), vec![b' '; 2 << 20], None)
        .await
        .unwrap();
    assert!(matches!(
        named(a.spec("big").await.unwrap_err(), &big),
        CoordError::TooLarge { .. }
    ));

    let sh = k.shadow("web", &HostId("h1".into()), "s1").unwrap();
    c.put(sh.as_str(), "[]", None).await.unwrap();
    named(a.shadows().await.unwrap_err(), &sh);

    // The watch skips a bad value and goes on with the good ones.
    let failure = k.failure("web").unwrap();
    c.put(failure.as_str(), "not json", None).await.unwrap();
    a.report_failure(FailureReport {
        service: "web".into(),
        domain: "web".into(),
        host: HostId("h1".into()),
        generation: 1,
        trigger: Trigger::Lifecycle,
        at_unix_ms: 1,
        to: None,
    })
    .await
    .unwrap();
    let r = next_event(&mut events, "the valid failure report", |e| match e {
        ClusterEvent::Failure(r) => Some(r),
        _ => None,
    })
    .await;
    assert_eq!(r.trigger, Trigger::Lifecycle);
    // Keys outside the layout are not ours and are ignored.
    c.put(format!("{PREFIX}/unknown/x"), "junk", None)
        .await
        .unwrap();
    assert_eq!(a.failures().await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_bounded_when_etcd_is_down() {
    let mut etcd = EtcdServer::start();
    let a = start(&etcd, "h1");
    a.adopt("web", "web").await.unwrap();
    etcd.kill();
    for _ in 0..3 {
        let t = Instant::now();
        let r = tokio::time::timeout(PATIENCE, a.owner("web"))
            .await
            .expect("bounded");
        assert!(
            matches!(
                r,
                Err(CoordError::Unavailable { .. } | CoordError::Timeout { .. })
            ),
            "{r:?}"
        );
        let r = tokio::time::timeout(
            PATIENCE,
            a.claim(Claim {
                service: "web".into(),
                domain: "x".into(),
                expected: 1,
            }),
        )
        .await
        .expect("bounded");
        assert!(r.is_err(), "{r:?}");
        println!(
            "understudy-etcd down: owner + claim failed after {:?}",
            t.elapsed()
        );
    }
    etcd.restart();
    // The next call after etcd is back connects again by itself.
    until("etcd answering again", || async {
        a.owner("web").await.ok()
    })
    .await;
    assert_eq!(a.owner("web").await.unwrap().unwrap().generation, 1);
}

fn version(service: &str, n: u64, tag: &str) -> ProfileVersion {
    let mut profile = Profile::new(ModelParams::default()).unwrap();
    profile.expected_config.insert("f".into(), tag.into());
    ProfileVersion {
        version: n,
        created_unix_ms: n * 1000,
        reason: Reason::Scheduled,
        service: service.into(),
        profile,
    }
}

#[test]
fn profile_versions_round_trip_through_etcd() {
    let etcd = EtcdServer::start();
    let repo = EtcdProfileRepository::new(endpoints(&etcd), PREFIX).unwrap();
    assert_eq!(repo.list("svc").unwrap(), Vec::<u64>::new());
    assert_eq!(repo.pull_latest("svc").unwrap(), None);
    repo.push("svc", &version("svc", 2, "two")).unwrap();
    repo.push("svc", &version("svc", 1, "one")).unwrap();
    repo.push("svc", &version("svc", 10, "ten")).unwrap();
    assert_eq!(repo.list("svc").unwrap(), vec![1, 2, 10]);
    assert_eq!(
        repo.pull_latest("svc").unwrap(),
        Some(version("svc", 10, "ten"))
    );
    // Identical again: fine; different content under a taken number: refused.
    repo.push("svc", &version("svc", 1, "one")).unwrap();
    assert!(matches!(
        repo.push("svc", &version("svc", 1, "other")),
        Err(RepoError::VersionExists { version: 1, .. })
    ));
    assert!(matches!(
        repo.push("svc", &version("db", 3, "x")),
        Err(RepoError::ServiceMismatch { .. })
    ));
    assert!(matches!(
        repo.list("a/b"),
        Err(RepoError::InvalidService { .. })
    ));

    // A garbage value under v11 is skipped, then replaced by a push of that number.
    let key = Keys::new(PREFIX).unwrap().profile("svc", 11).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        raw(&etcd)
            .await
            .put(key.as_str(), "{\"version\": 11, \"trunc", None)
            .await
            .unwrap()
    });
    assert_eq!(repo.list("svc").unwrap(), vec![1, 2, 10]);
    assert_eq!(repo.pull_latest("svc").unwrap().unwrap().version, 10);
    repo.push("svc", &version("svc", 11, "eleven")).unwrap();
    assert_eq!(
        repo.pull_latest("svc").unwrap(),
        Some(version("svc", 11, "eleven"))
    );

    // Two hosts' stores exchange versions through it.
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (s1, s2) = (
        ProfileStore::open(d1.path()).unwrap(),
        ProfileStore::open(d2.path()).unwrap(),
    );
    let n = s1
        .commit(
            "web",
            &version("web", 0, "from-h1").profile,
            Reason::Initial,
        )
        .unwrap();
    let r1 = s1.sync(&repo).unwrap();
    assert_eq!(r1.services[0].pushed, vec![n]);
    let r2 = s2.sync_service("web", &repo).unwrap();
    assert_eq!(r2.pulled, Some(n));
    assert_eq!(
        s2.get("web", n).unwrap().profile,
        s1.get("web", n).unwrap().profile
    );

    // With etcd gone, a call fails within its bound instead of hanging.
    drop(etcd);
    assert!(matches!(repo.list("svc"), Err(RepoError::Backend { .. })));
}

/// A claim retried while etcd fails over; a retry after an answer that was lost finds its own
/// record and takes it as done.
async fn claim_until_done(c: &EtcdCoordinator, service: &str, domain: &str, expected: u64) -> u64 {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let r = c
            .claim(Claim {
                service: service.into(),
                domain: domain.into(),
                expected,
            })
            .await;
        match r {
            Ok(rec) => return rec.generation,
            Err(CoordError::Conflict { current, .. })
                if current.domain == domain && current.generation == expected + 1 =>
            {
                return current.generation
            }
            Err(CoordError::Unavailable { .. } | CoordError::Timeout { .. }) => {}
            Err(e) => panic!("claim failed: {e:?}"),
        }
        assert!(Instant::now() < deadline, "claim never went through");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_etcd_member_of_three_lost_and_back_changes_no_owner_and_keeps_the_lease() {
    let mut etcd = EtcdServer::start_cluster(3);
    let (a, obs) = (start(&etcd, "h1"), start(&etcd, "h2"));
    let mut events = obs.watch();
    watch_ready(&obs, &mut events).await;
    wait_mode(&a, Mode::Connected).await;
    a.register(facts("h1")).await.unwrap();
    let owner = a.adopt("web", "web").await.unwrap();
    let lease = a.lease().borrow().lease_id;
    let mut generation = 0;
    for i in 0..3 {
        etcd.kill_member(i);
        let down = Instant::now();
        // Claims go on through the two members left.
        generation = claim_until_done(&a, "probe", &format!("probe-{i}"), generation).await;
        let claimed = down.elapsed();
        // Longer than the lease: the host must stay alive all along.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        wait_mode(&a, Mode::Connected).await;
        let alive = until("the host list", || async { obs.hosts().await.ok() }).await;
        assert!(
            alive.iter().any(|h| h.facts.host.0 == "h1" && h.alive),
            "member {i} down: {alive:?}"
        );
        etcd.restart_member(i);
        println!("understudy-etcd member m{i} killed: a claim went through after {claimed:?}; lease kept");
    }
    assert_eq!(
        a.lease().borrow().lease_id,
        lease,
        "the same lease throughout"
    );
    let now = until("the owner", || async { obs.owner("web").await.ok() }).await;
    assert_eq!(now, Some(owner), "no change of owner");
    assert_eq!(generation, 3);
    // No moment at which another host saw h1 lost.
    while let Ok(ev) = events.try_recv() {
        assert!(
            !matches!(&ev, ClusterEvent::HostLost(h) if h.0 == "h1"),
            "h1 was seen lost while one member was down"
        );
    }
}
