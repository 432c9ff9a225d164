//! Losing a host (issue 11): a daemon on each lab host, direct heartbeats between them, fence
//! devices (`scripts/fence_lab`, standing for IPMI) or none (lease-only self-fencing), class
//! probes of the service from every host (a host cut off the switch). A primary on h1 with its
//! shadow on another host (`placement = "other-host"`), a ledger guest where data matters.
//!
//! Each test leaves the lab as it found it: a host powered off is powered on again, a cut
//! network joined again, stopped services started (also when the test fails).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::crosshost::{clear_prefix, owner, state_of, wait_served_by};
use super::*;
use crate::common::{
    domain_uuid, guest_xml, holders, http_get, ledger, page_uuid, report_recovery, wait_for,
    DaemonProc, Writer, DATA_CLASS,
};
use understudy::capture::sniff::PacketSocket;

const SHADOW_WAIT: Duration = Duration::from_secs(300);

/// The timings of a host-loss daemon.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub lease_ttl_s: u64,
    pub keepalive_ms: u64,
    pub heartbeat_ms: u64,
    pub suspect_ms: u64,
    pub margin_ms: u64,
    /// Bound on each etcd call (below the TTL).
    pub op_timeout_ms: u64,
}

/// The tests': lease TTL 3 s, keepalives every 750 ms, heartbeats every 100 ms, suspect after
/// 500 ms, promotion 1 s after a lease expired (self-fencing 500 ms before it can), etcd calls
/// bounded to 1 s.
pub const TEST_TIMING: Timing = Timing {
    lease_ttl_s: 3,
    keepalive_ms: 750,
    heartbeat_ms: 100,
    suspect_ms: 500,
    margin_ms: 1000,
    op_timeout_ms: 1000,
};

/// A daemon on `host` protecting `pattern` with one shadow on another host
/// (`placement = "other-host"`), its records under `prefix`; with `fence`, every host's fence
/// device is `scripts/fence_lab -n <host>`. `tag` names its directory.
pub fn hostloss_daemon(
    cluster: &Cluster,
    host: &str,
    tag: &str,
    pattern: &str,
    prefix: &str,
    fence: bool,
    t: &Timing,
) -> DaemonProc {
    let extra = Extra {
        fence,
        ..Extra::default()
    };
    hostloss_daemon_with(cluster, host, tag, pattern, prefix, &extra, t)
}

/// What a host-loss daemon is given besides its timings.
#[derive(Debug, Clone, Copy, Default)]
pub struct Extra<'a> {
    /// Every host's fence device is `scripts/fence_lab -n <host>`.
    pub fence: bool,
    /// Keys of the protected class (TOML lines, no table).
    pub class: &'a str,
    /// The class probes the service at this address's port 80 (`[class.default.probe]`).
    pub probe: Option<&'a str>,
}

/// [`hostloss_daemon`] with a class of its own and a probe.
pub fn hostloss_daemon_with(
    cluster: &Cluster,
    host: &str,
    tag: &str,
    pattern: &str,
    prefix: &str,
    x: &Extra,
    t: &Timing,
) -> DaemonProc {
    // Its own member first: the client talks to one member at a time, and a daemon talking
    // to the lost host's member would first wait out a keepalive's timeout.
    let mut order = cluster.hosts();
    order.sort_by_key(|h| *h != host);
    let endpoints: Vec<String> = order
        .iter()
        .map(|h| format!("\"{}\"", cluster.host(h, "ETCD_ENDPOINT")))
        .collect();
    let mut extra = format!(
        "{}placement = \"other-host\"\n\n[cluster]\nendpoints = [{}]\nhost = \"{host}\"\nkey_prefix = \"{prefix}\"\n\
         libvirt_uri = \"{}\"\nlease_ttl_s = {}\nkeepalive_interval_ms = {}\nheartbeat_interval_ms = {}\n\
         suspect_after_ms = {}\nself_fence_guard_ms = 500\npromote_margin_ms = {}\nop_timeout_ms = {}\n",
        x.class,
        endpoints.join(", "),
        cluster.libvirt_uri(host),
        t.lease_ttl_s,
        t.keepalive_ms,
        t.heartbeat_ms,
        t.suspect_ms,
        t.margin_ms,
        t.op_timeout_ms,
    );
    if x.fence {
        extra.push_str("\n[cluster.fence]\n");
        for h in cluster.hosts() {
            extra.push_str(&format!(
                "{h} = [\"{}\", \"-n\", \"{h}\"]\n",
                repo().join("scripts/fence_lab").display()
            ));
        }
    }
    if let Some(ip) = x.probe {
        extra.push_str(&format!(
            "\n[class.default.probe]\nkind = \"http\"\naddress = \"{ip}:80\"\ninterval_ms = 200\ntimeout_ms = 150\n"
        ));
    }
    DaemonProc::start_on_host(host, &format!("{tag}-{host}"), pattern, 1, &extra)
}

/// Puts the lab back when dropped: powers `off` hosts on, joins cut networks again, starts
/// stopped etcd members.
#[derive(Default)]
pub struct Restore {
    pub powered_off: Vec<String>,
    pub cut: Vec<(String, String)>,
    pub etcd_stopped: Vec<String>,
}

impl Drop for Restore {
    fn drop(&mut self) {
        // Never panic here: a panic while unwinding aborts the test binary.
        for (h, net) in &self.cut {
            let _ = Command::new(repo().join("scripts/lab-cut.sh"))
                .args([h.as_str(), net.as_str(), "up"])
                .status();
        }
        for h in &self.etcd_stopped {
            let _ = Command::new(repo().join("scripts/lab-host-service.sh"))
                .args([h.as_str(), "etcd", "start"])
                .status();
        }
        for h in &self.powered_off {
            let _ = Command::new(repo().join("scripts/fence_lab"))
                .args(["-o", "on", "-n", h.as_str()])
                .status();
        }
    }
}

/// One sample of the client: time since it began, uuid of the answering domain (`None`: no
/// answer).
pub type Sample = (Duration, Option<String>);

/// What an independent client on the switch saw, one [`Sample`] every ~5 ms.
pub struct Poller {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub began: Instant,
}

impl Poller {
    pub fn start(ip: &str) -> Poller {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let began = Instant::now();
        let (s, v, ip) = (stop.clone(), samples.clone(), ip.to_string());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let t = Instant::now();
                let uuid = http_get(&ip, Duration::from_millis(25)).map(|p| page_uuid(&p));
                v.lock().unwrap().push((began.elapsed(), uuid));
                if let Some(rest) = Duration::from_millis(5).checked_sub(t.elapsed()) {
                    std::thread::sleep(rest);
                }
            }
        });
        Poller {
            stop,
            samples,
            thread: Some(thread),
            began,
        }
    }

    pub fn finish(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        std::mem::take(&mut *self.samples.lock().unwrap())
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Timed records shared with a recording thread.
type Timeline<T> = Arc<Mutex<Vec<(Duration, T)>>>;

/// Continuous evidence from the switch of who answers for a MAC: a packet socket on each
/// host's uplink port (in the switch's namespace) records every frame *from* the hosts whose
/// source is the MAC, and the forwarding table is read every 50 ms.
pub struct SwitchWatch {
    stop: Arc<AtomicBool>,
    /// (time since start, port) of each frame from the MAC, per port's thread.
    frames: Timeline<String>,
    /// (time since start, port the switch forwards the MAC to).
    fdb: Timeline<Option<String>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl SwitchWatch {
    pub fn start(cluster: &Cluster, mac: &str) -> SwitchWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let frames = Arc::new(Mutex::new(Vec::new()));
        let fdb = Arc::new(Mutex::new(Vec::new()));
        let began = Instant::now();
        let want: Vec<u8> = mac
            .split(':')
            .map(|b| u8::from_str_radix(b, 16).expect("a MAC"))
            .collect();
        let ns = cluster.get("LAB_SWITCH_NS").to_string();
        let mut threads = Vec::new();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        for h in cluster.hosts() {
            let port = cluster.host(h, "SWITCH_PORT").to_string();
            let (stop, frames, want, ns, ready) = (
                stop.clone(),
                frames.clone(),
                want.clone(),
                ns.clone(),
                ready_tx.clone(),
            );
            threads.push(std::thread::spawn(move || {
                let sock = ingress_socket(&ns, &port);
                let _ = ready.send(());
                let mut buf = vec![0u8; 65_600];
                while !stop.load(Ordering::SeqCst) {
                    if let Ok(Some(n)) = sock.recv_incoming(&mut buf) {
                        if n >= 12 && buf[6..12] == want[..] {
                            frames.lock().unwrap().push((began.elapsed(), port.clone()));
                        }
                    }
                }
            }));
        }
        for _ in cluster.hosts() {
            ready_rx
                .recv_timeout(Duration::from_secs(10))
                .expect("a capture on the switch");
        }
        let (stop2, fdb2, mac, sw_ns, bridge) = (
            stop.clone(),
            fdb.clone(),
            mac.to_string(),
            ns.clone(),
            cluster.get("LAB_SWITCH_BRIDGE").to_string(),
        );
        threads.push(std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                let out = run(Command::new("ip").args([
                    "netns", "exec", &sw_ns, "bridge", "fdb", "show", "br", &bridge,
                ]));
                let port = switch_port_in_fdb(&text(&out.stdout), &mac);
                fdb2.lock().unwrap().push((began.elapsed(), port));
                std::thread::sleep(Duration::from_millis(50));
            }
        }));
        SwitchWatch {
            stop,
            frames,
            fdb,
            threads,
        }
    }

    /// Stops, and says whether the MAC came from `old_port` alone until it first came from
    /// `new_port`, and from `new_port` alone after (frames and forwarding table alike).
    pub fn verdict(mut self, old_port: &str, new_port: &str) -> SwitchVerdict {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let mut frames = std::mem::take(&mut *self.frames.lock().unwrap());
        frames.sort();
        let fdb = std::mem::take(&mut *self.fdb.lock().unwrap());
        SwitchVerdict::of(&frames, &fdb, old_port, new_port)
    }

    /// [`Self::verdict`], asserted: frames seen on both ports, and at no moment did two
    /// domains answer for the MAC.
    pub fn finish(self, old_port: &str, new_port: &str) {
        let v = self.verdict(old_port, new_port);
        assert!(v.frames_new > 0, "no frame from the MAC on {new_port}");
        assert!(
            v.frames_old > 0,
            "no frame from the MAC on {old_port} before"
        );
        assert!(
            v.fdb_moved_at.is_some(),
            "the switch never forwarded the MAC to the new port"
        );
        assert!(
            v.two_copies.is_empty(),
            "two domains answered: {:?}",
            v.two_copies
        );
        eprintln!("{v}");
    }
}

/// What the switch saw of a service's MAC moving from one port to another.
#[derive(Debug)]
pub struct SwitchVerdict {
    /// Frames from the MAC on the old port before its first frame on the new one.
    pub frames_old: usize,
    /// Frames from the MAC from its first on the new port on.
    pub frames_new: usize,
    /// The last frame on the old port before the move, and the first on the new one.
    pub last_old: Option<Duration>,
    pub first_new: Option<Duration>,
    /// Forwarding table reads, and when the MAC was first behind the new port.
    pub fdb_reads: usize,
    pub fdb_moved_at: Option<Duration>,
    /// Each frame or forwarding entry that shows two domains: the MAC from another port than
    /// the old one before the move, or than the new one after it, or the forwarding table
    /// moving back.
    pub two_copies: Vec<String>,
}

impl SwitchVerdict {
    fn of(
        frames: &[(Duration, String)],
        fdb: &[(Duration, Option<String>)],
        old_port: &str,
        new_port: &str,
    ) -> SwitchVerdict {
        let mut two_copies = Vec::new();
        let first_new = frames.iter().position(|(_, p)| p == new_port);
        let split = first_new.unwrap_or(frames.len());
        for (t, p) in &frames[..split] {
            if p != old_port {
                two_copies.push(format!("frame on {p} at {t:?}, before the move"));
            }
        }
        for (t, p) in &frames[split..] {
            if p != new_port {
                two_copies.push(format!(
                    "frame on {p} at {t:?}, after the first on {new_port}"
                ));
            }
        }
        let learned: Vec<&(Duration, Option<String>)> =
            fdb.iter().filter(|(_, p)| p.is_some()).collect();
        let moved = learned
            .iter()
            .position(|(_, p)| p.as_deref() == Some(new_port));
        let fdb_split = moved.unwrap_or(learned.len());
        for (t, p) in &learned[..fdb_split] {
            if p.as_deref() != Some(old_port) {
                two_copies.push(format!("forwarding entry {p:?} at {t:?}, before the move"));
            }
        }
        for (t, p) in &learned[fdb_split..] {
            if p.as_deref() != Some(new_port) {
                two_copies.push(format!("forwarding entry {p:?} at {t:?}: moved back"));
            }
        }
        SwitchVerdict {
            frames_old: split,
            frames_new: frames.len() - split,
            last_old: split.checked_sub(1).map(|i| frames[i].0),
            first_new: first_new.map(|i| frames[i].0),
            fdb_reads: fdb.len(),
            fdb_moved_at: moved.map(|i| learned[i].0),
            two_copies,
        }
    }
}

impl std::fmt::Display for SwitchVerdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "switch: {} frames from the MAC on the old port (last at {:?}), {} on the new one (first at {:?}); {} forwarding table reads, the MAC behind the new port from {:?}; {} signs of two domains",
            self.frames_old,
            self.last_old,
            self.frames_new,
            self.first_new,
            self.fdb_reads,
            self.fdb_moved_at,
            self.two_copies.len()
        )
    }
}

impl Drop for SwitchWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Opens, from the calling thread (which it moves into namespace `ns` for good), a packet
/// socket on `link` that waits at most 100 ms per read.
fn ingress_socket(ns: &str, link: &str) -> PacketSocket {
    let f = std::fs::File::open(format!("/run/netns/{ns}")).expect("the switch namespace");
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
    PacketSocket::open(link, Duration::from_millis(100))
        .unwrap_or_else(|e| panic!("a packet socket on {link} in {ns}: {e}"))
}

/// Checks the client's view of a move from `old` to `new`: before the first answer of `new`
/// only `old` answered, after it only `new` (never both: no two copies served); returns the
/// outage: from `from` (since the poller began) to the first answer of `new`.
pub fn single_server_outage(samples: &[Sample], old: &str, new: &str, from: Duration) -> Duration {
    let first_new = samples
        .iter()
        .position(|(_, u)| u.as_deref() == Some(new))
        .expect("the new domain never answered the client");
    for (t, u) in &samples[..first_new] {
        assert!(
            u.is_none() || u.as_deref() == Some(old),
            "at {t:?} a third domain answered: {u:?}"
        );
    }
    for (t, u) in &samples[first_new..] {
        assert_ne!(
            u.as_deref(),
            Some(old),
            "at {t:?} the old primary answered after the new one had: two copies served"
        );
    }
    let last_old_before = samples[..first_new]
        .iter()
        .rev()
        .find(|(_, u)| u.as_deref() == Some(old))
        .map_or(from, |(t, _)| *t);
    eprintln!(
        "client: old primary last answered at {last_old_before:?}, new one first at {:?} ({} samples)",
        samples[first_new].0,
        samples.len()
    );
    samples[first_new].0.saturating_sub(from)
}

/// The events of a daemon (`events --json`), as JSON objects.
pub fn events(d: &DaemonProc) -> Vec<serde_json::Value> {
    let (code, out, err) = d.cli(&["events", "--json"]);
    assert_eq!(code, 0, "events: {err}");
    out.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The first event of `kind` whose text contains `what` (any field), if any: its Unix ms.
pub fn event_at(d: &DaemonProc, kind: &str, what: &str) -> Option<u64> {
    events(d)
        .into_iter()
        .find(|e| e["kind"] == kind && e.to_string().contains(what))
        .and_then(|e| e["at_unix_ms"].as_u64())
}

/// Every domain of the service running (not paused) on the hosts that are on.
pub fn running_members(cluster: &Cluster, name: &str, hosts: &[&str]) -> Vec<String> {
    let mut running = Vec::new();
    for h in hosts {
        for dom in cluster.hypervisor(h).list().unwrap() {
            if dom.name.starts_with(name) && dom.state == understudy::libvirt::RunState::Running {
                running.push(format!("{h}/{}", dom.name));
            }
        }
    }
    running
}

const HOSTS: [&str; 3] = ["h1", "h2", "h3"];

/// A daemon's metrics, fetched on its host (it listens on the host's loopback).
pub fn host_metrics(host: &str, d: &DaemonProc) -> String {
    let url = format!("http://127.0.0.1:{}/metrics", d.metrics_port);
    text(&host_exec(host, &["curl", "-s", "--max-time", "2", &url]).stdout)
}

/// The domain names of a service's members, for cleanup.
fn members(name: &str) -> Vec<String> {
    std::iter::once(name.to_string())
        .chain((1..8).map(|n| format!("{name}-shadow-{n}")))
        .collect()
}

/// Powers h1 on again and restarts its daemon, which must follow the new owner and leave its
/// old primary off.
fn power_h1_on_and_see_its_primary_retired(
    cluster: &Cluster,
    s: &mut Setup,
    restore: &mut Restore,
    name: &str,
) {
    let (code, _) = fence_lab(&["-o", "on", "-n", "h1"], None);
    assert_eq!(code, 0, "power h1 on");
    restore.powered_off.clear();
    s.ds[0].restart();
    let on = format!("elsewhere: on host {}", s.shadow_host);
    wait_for(
        "h1 following the new owner",
        Duration::from_secs(60),
        || (state_of(&s.ds[0], name) == on).then_some(()),
    );
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        !cluster.hypervisor("h1").state(name).unwrap().is_active(),
        "the fenced host started its old primary again"
    );
}

/// A primary on h1 protected by daemons on all three hosts, its shadow on h2 or h3: the
/// daemons, the shadow's host and name, the primary's uuid.
struct Setup {
    ds: Vec<DaemonProc>,
    shadow_host: &'static str,
    shadow: String,
    primary_uuid: String,
    shadow_uuid: String,
}

/// `data`: the guest is a ledger whose data disk (on the shared storage) changes hands.
fn setup(
    cluster: &Cluster,
    name: &str,
    ip: &str,
    prefix: &str,
    x: &Extra,
    data: Option<&str>,
) -> Setup {
    clear_prefix(cluster, prefix);
    let ds: Vec<DaemonProc> = ["h1", "h2", "h3"]
        .iter()
        .map(|h| hostloss_daemon_with(cluster, h, name, name, prefix, x, &TEST_TIMING))
        .collect();
    let h1 = cluster.hypervisor("h1");
    let guest_args: Vec<&str> = data.map(|d| vec!["--data", d]).unwrap_or_default();
    h1.define(&guest_xml(name, &format!("{ip}/24"), &guest_args))
        .expect("define on h1");
    h1.start(name, false).expect("start on h1");
    wait_for("the guest on h1 serving", Duration::from_secs(180), || {
        http_get(ip, Duration::from_secs(1))
    });
    let (shadow_host, shadow) = wait_for("a paused shadow on h2 or h3", SHADOW_WAIT, || {
        for (i, h) in [(1, "h2"), (2, "h3")] {
            if let Some(s) = ds[i].paused_shadows(name).and_then(|v| v.first().cloned()) {
                return Some((h, s));
            }
        }
        None
    });
    assert_eq!(
        owner(&ds[0], name),
        Some(("h1".to_string(), name.to_string()))
    );
    let primary_uuid = domain_uuid(&h1, name);
    let shadow_uuid = domain_uuid(&cluster.hypervisor(shadow_host), &shadow);
    // Every daemon hears every other before the fault.
    wait_for(
        "every host heard by every other",
        Duration::from_secs(20),
        || {
            ds.iter()
                .all(|d| {
                    let (code, out, _) = d.cli(&["hosts", "--json"]);
                    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
                    code == 0
                        && v["peers"].as_array().is_some_and(|p| {
                            p.len() == 2
                                && p.iter()
                                    .all(|x| x["heard_ms_ago"].as_u64().is_some_and(|ms| ms < 500))
                        })
                })
                .then_some(())
        },
    );
    Setup {
        ds,
        shadow_host,
        shadow,
        primary_uuid,
        shadow_uuid,
    }
}

fn winner(s: &Setup) -> &DaemonProc {
    &s.ds[if s.shadow_host == "h2" { 1 } else { 2 }]
}

/// h1 powered off through its fence agent (a cut power cord) while a client appends to the
/// ledger guest it runs: the other hosts find it silent with its libvirtd unreachable, fence
/// it through its device (already off: the device says so), and the shadow on another host
/// takes over the data disk on the shared storage and serves the same address; a client on
/// the switch sees the old primary, a gap, then only the new one, and every record the writer
/// saw acknowledged is in the new primary's ledger. Then h1 comes back, its daemon restarts,
/// and its old primary stays retired: shut off, the service followed on the other host.
#[test]
fn a_host_powered_off_is_fenced_and_its_service_served_from_a_shadow_elsewhere() {
    let cluster = Cluster::require();
    let (name, ip) = ("hl1-web", "10.77.0.91");
    let prefix = "/understudy/it-hl1";
    let names = members(name);
    let _cleanup = ClusterCleanup::new(
        &cluster,
        &names.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let mut restore = Restore::default();
    let data = data_disk(&cluster, "hl1-web-data.raw");
    let x = Extra {
        fence: true,
        class: DATA_CLASS,
        probe: Some(ip),
    };
    let mut s = setup(&cluster, name, ip, prefix, &x, Some(&data));
    wait_for("the ledger served", Duration::from_secs(60), || ledger(ip));
    assert_eq!(holders(&cluster.hypervisor("h1"), &data), [name]);

    let writer = Writer::start(ip, "hl1");
    wait_for("acknowledged appends", Duration::from_secs(30), || {
        (writer.acked() >= 20).then_some(())
    });
    let poller = Poller::start(ip);
    std::thread::sleep(Duration::from_millis(300));
    let off_at = poller.began.elapsed();
    restore.powered_off.push("h1".into());
    let (code, _) = fence_lab(&["-o", "off", "-n", "h1"], None);
    assert_eq!(code, 0, "power h1 off");
    let before = writer.acked();
    wait_served_by(ip, &s.shadow_uuid, "the shadow serving");
    wait_for(
        "appends acknowledged again",
        Duration::from_secs(60),
        || (writer.acked() >= before + 20).then_some(()),
    );
    let acked = writer.finish();
    let samples = poller.finish();
    let outage = single_server_outage(&samples, &s.primary_uuid, &s.shadow_uuid, off_at);
    report_recovery(
        "a_host_powered_off_is_fenced_and_its_service_served_from_a_shadow_elsewhere",
        "host-poweroff-fence-device",
        outage,
        None,
    );

    let have = ledger(ip).expect("the new primary serves the ledger");
    let lost: Vec<&String> = acked.iter().filter(|k| !have.contains(k)).collect();
    eprintln!(
        "{} records acknowledged, {} in the new primary's ledger, {} lost",
        acked.len(),
        have.len(),
        lost.len()
    );
    assert!(
        lost.is_empty(),
        "{} acknowledged records lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    let shadow_hv = cluster.hypervisor(s.shadow_host);
    assert_eq!(holders(&shadow_hv, &data), [s.shadow.clone()]);

    let w = winner(&s);
    assert_eq!(
        owner(w, name),
        Some((s.shadow_host.to_string(), s.shadow.clone()))
    );
    assert!(
        event_at(w, "host_fenced", "fence_device").is_some(),
        "no host_fenced event on {}: {:?}",
        s.shadow_host,
        events(w)
    );
    assert!(
        event_at(w, "failover_started", "host_lost").is_some(),
        "no host_lost failover"
    );
    // The promoted shadow alone runs: a replacement shadow placed meanwhile boots off the
    // bridge (it answers for nothing) and pauses once warm, so it is waited for.
    let want = [format!("{}/{}", s.shadow_host, s.shadow)];
    wait_for(
        "only the promoted shadow running on h2 and h3",
        Duration::from_secs(240),
        || (running_members(&cluster, name, &["h2", "h3"]) == want).then_some(()),
    );
    assert_eq!(
        cluster.switch_port_of(&guest_mac(name)).as_deref(),
        Some(cluster.host(s.shadow_host, "SWITCH_PORT"))
    );

    // h1 comes back; its daemon starts again and finds its primary retired.
    power_h1_on_and_see_its_primary_retired(&cluster, &mut s, &mut restore, name);
    assert_eq!(
        owner(&s.ds[0], name),
        Some((s.shadow_host.to_string(), s.shadow.clone()))
    );
    wait_served_by(ip, &s.shadow_uuid, "the shadow still serving");
    assert_eq!(holders(&shadow_hv, &data), [s.shadow.clone()]);
}

/// h1 cut off the switch only: its daemon, its heartbeats and its lease are fine, and its
/// guest still answers on h1's own bridge, but no client reaches it. h2 and h3 probe the
/// service (the class probe) and find it unreachable; each says so in its heartbeats, and h1
/// says its own probe reaches it: the host holding the shadow powers h1 off through its fence
/// device, then promotes the shadow (trigger `host_unreachable`). The client sees the old
/// primary, a gap, then only the new one. Joined and powered on again, h1 leaves its old
/// primary off.
#[test]
fn a_host_cut_from_the_switch_is_detected_by_the_probe_fenced_and_its_service_moved() {
    let cluster = Cluster::require();
    let (name, ip) = ("hl5-web", "10.77.0.95");
    let prefix = "/understudy/it-hl5";
    let names = members(name);
    let _cleanup = ClusterCleanup::new(
        &cluster,
        &names.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let mut restore = Restore::default();
    let x = Extra {
        fence: true,
        probe: Some(ip),
        ..Extra::default()
    };
    let mut s = setup(&cluster, name, ip, prefix, &x, None);

    let poller = Poller::start(ip);
    std::thread::sleep(Duration::from_millis(300));
    let cut_at = poller.began.elapsed();
    restore.cut.push(("h1".into(), "switch".into()));
    restore.powered_off.push("h1".into());
    lab_cut("h1", "switch", "down");
    // Cut off the switch, the guest still answers on h1's own bridge.
    let local = host_exec(
        "h1",
        &["curl", "-s", "--max-time", "2", &format!("http://{ip}/")],
    );
    assert!(
        text(&local.stdout).contains(&s.primary_uuid),
        "the primary does not answer on h1's bridge: {}",
        text(&local.stderr)
    );
    wait_served_by(ip, &s.shadow_uuid, "the shadow serving");
    std::thread::sleep(Duration::from_millis(300));
    let samples = poller.finish();
    let outage = single_server_outage(&samples, &s.primary_uuid, &s.shadow_uuid, cut_at);
    report_recovery(
        "a_host_cut_from_the_switch_is_detected_by_the_probe_fenced_and_its_service_moved",
        "switch-cut-fence-device",
        outage,
        None,
    );

    let w = winner(&s);
    assert!(
        event_at(w, "host_fenced", "cut off the switch").is_some(),
        "no host_fenced event for the cut on {}: {:?}",
        s.shadow_host,
        events(w)
    );
    assert!(
        event_at(w, "failover_started", "host_unreachable").is_some(),
        "no host_unreachable failover on {}: {:?}",
        s.shadow_host,
        events(w)
    );
    assert_eq!(
        fence_lab(&["-o", "status", "-n", "h1"], None).0,
        2,
        "h1 is not powered off"
    );
    assert_eq!(
        owner(w, name),
        Some((s.shadow_host.to_string(), s.shadow.clone()))
    );
    // The promoted shadow alone runs (a replacement shadow boots off the bridge first).
    let want = [format!("{}/{}", s.shadow_host, s.shadow)];
    wait_for(
        "only the promoted shadow running on h2 and h3",
        Duration::from_secs(240),
        || (running_members(&cluster, name, &["h2", "h3"]) == want).then_some(()),
    );
    assert_eq!(
        cluster.switch_port_of(&guest_mac(name)).as_deref(),
        Some(cluster.host(s.shadow_host, "SWITCH_PORT"))
    );
    // The other host saw the same and, without a shadow, judged nothing.
    let other = &s.ds[if s.shadow_host == "h2" { 2 } else { 1 }];
    assert!(
        !events(other)
            .iter()
            .any(|e| e["kind"] == "host_fenced" || e["kind"] == "failover_started"),
        "{:?}",
        events(other)
    );

    // Joined again and powered on: h1's daemon follows the new owner, its old primary off.
    lab_cut("h1", "switch", "up");
    restore.cut.clear();
    power_h1_on_and_see_its_primary_retired(&cluster, &mut s, &mut restore, name);
    wait_served_by(ip, &s.shadow_uuid, "the shadow still serving");
}

/// h1 cut off the management network (etcd and its peers), no fence device: h1 keeps serving
/// on the switch until it can no longer renew its lease, then destroys its primary before the
/// lease can expire; the others promote only after the lease expired (plus the margin). The
/// client never sees both; h1's self-fencing comes before the promotion's start. Joined again,
/// h1 follows the new owner and never restarts its old primary.
#[test]
fn a_host_cut_from_management_fences_itself_before_the_others_promote() {
    let cluster = Cluster::require();
    let (name, ip) = ("hl2-web", "10.77.0.92");
    let prefix = "/understudy/it-hl2";
    let names = members(name);
    let _cleanup = ClusterCleanup::new(
        &cluster,
        &names.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let mut restore = Restore::default();
    let s = setup(&cluster, name, ip, prefix, &Extra::default(), None);

    let switch = SwitchWatch::start(&cluster, &guest_mac(name));
    let poller = Poller::start(ip);
    std::thread::sleep(Duration::from_millis(300));
    let cut_at = poller.began.elapsed();
    restore.cut.push(("h1".into(), "mgmt".into()));
    lab_cut("h1", "mgmt", "down");
    wait_for("h1 self-fenced", Duration::from_secs(30), || {
        let (_, out, _) = s.ds[0].cli(&["hosts", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        (v["self_fenced"] == true).then_some(())
    });
    wait_served_by(ip, &s.shadow_uuid, "the shadow serving");
    std::thread::sleep(Duration::from_millis(300));
    let samples = poller.finish();
    let outage = single_server_outage(&samples, &s.primary_uuid, &s.shadow_uuid, cut_at);
    report_recovery(
        "a_host_cut_from_management_fences_itself_before_the_others_promote",
        "management-cut-lease-only",
        outage,
        None,
    );
    switch.finish(
        cluster.host("h1", "SWITCH_PORT"),
        cluster.host(s.shadow_host, "SWITCH_PORT"),
    );

    let fenced_at = event_at(&s.ds[0], "fenced", "self-fenced").expect("h1's self-fence event");
    let w = winner(&s);
    let promoted_at =
        event_at(w, "failover_started", "host_lost").expect("the winner's host_lost failover");
    eprintln!(
        "h1 self-fenced {} ms before {} started promoting",
        promoted_at.saturating_sub(fenced_at),
        s.shadow_host
    );
    assert!(
        fenced_at < promoted_at,
        "h1 self-fenced at {fenced_at}, {} began promoting at {promoted_at}",
        s.shadow_host
    );
    assert!(event_at(w, "host_fenced", "lease_expired").is_some());
    // No fence device, and the lease expired: nobody powered h1 off.
    assert_eq!(fence_lab(&["-o", "status", "-n", "h1"], None).0, 0);
    assert!(
        !host_exec("h1", &["virsh", "-c", "qemu:///system", "domstate", name])
            .stdout
            .starts_with(b"running")
    );
    // The promoted shadow alone runs: a replacement shadow placed meanwhile boots off the
    // bridge (it answers for nothing) and pauses once warm, so it is waited for.
    let want = [format!("{}/{}", s.shadow_host, s.shadow)];
    wait_for(
        "only the promoted shadow running on h2 and h3",
        Duration::from_secs(240),
        || (running_members(&cluster, name, &["h2", "h3"]) == want).then_some(()),
    );
    assert_eq!(
        cluster.switch_port_of(&guest_mac(name)).as_deref(),
        Some(cluster.host(s.shadow_host, "SWITCH_PORT"))
    );

    // Joined again: h1 renews, follows the new owner, and leaves its old primary off.
    lab_cut("h1", "mgmt", "up");
    restore.cut.clear();
    let on = format!("elsewhere: on host {}", s.shadow_host);
    wait_for(
        "h1 following the new owner",
        Duration::from_secs(60),
        || (state_of(&s.ds[0], name) == on).then_some(()),
    );
    wait_for("h1 no longer self-fenced", Duration::from_secs(30), || {
        let (_, out, _) = s.ds[0].cli(&["hosts", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        (v["self_fenced"] == false && v["mode"] == "connected").then_some(())
    });
    std::thread::sleep(Duration::from_secs(5));
    assert!(!cluster.hypervisor("h1").state(name).unwrap().is_active());
    wait_served_by(ip, &s.shadow_uuid, "the shadow still serving");
}

/// Neither a dead daemon nor a restarted libvirtd makes a host lost: with fence devices for
/// every host, h1's daemon is killed for longer than its lease (its libvirtd answers, its VM
/// runs: no fencing, no failover), started again; then h1's libvirtd is restarted (its daemon
/// keeps beating: nothing happens either). The client is served by the primary throughout.
#[test]
fn a_killed_daemon_or_a_restarted_libvirtd_is_not_a_lost_host() {
    let cluster = Cluster::require();
    let (name, ip) = ("hl3-web", "10.77.0.93");
    let prefix = "/understudy/it-hl3";
    let names = members(name);
    let _cleanup = ClusterCleanup::new(
        &cluster,
        &names.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    // Every host probes the service too: a silent daemon's host is not one cut off the switch.
    let x = Extra {
        fence: true,
        probe: Some(ip),
        ..Extra::default()
    };
    let mut s = setup(&cluster, name, ip, prefix, &x, None);

    let poller = Poller::start(ip);
    // The daemon on h1 dies for 3 TTLs.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(s.ds[0].child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill h1's daemon");
    let _ = s.ds[0].child.wait();
    std::thread::sleep(Duration::from_secs(9));
    let h1_lost = wait_for("h1's lease gone", Duration::from_secs(10), || {
        let (_, out, _) = s.ds[1].cli(&["hosts", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        v["hosts"]
            .as_array()?
            .iter()
            .find(|h| h["name"] == "h1")
            .map(|h| h["alive"] == false)
    });
    assert!(h1_lost, "h1's lease outlived its daemon");
    s.ds[0].restart();
    wait_for(
        "h1's daemon protecting again",
        Duration::from_secs(60),
        || state_of(&s.ds[0], name).starts_with("pro").then_some(()),
    );
    // libvirtd restarted under h1's running daemon.
    let out = run(Command::new(repo().join("scripts/lab-host-service.sh"))
        .args(["h1", "libvirtd", "restart"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    std::thread::sleep(Duration::from_secs(8));
    let samples = poller.finish();

    assert_eq!(
        fence_lab(&["-o", "status", "-n", "h1"], None).0,
        0,
        "h1 was fenced"
    );
    assert_eq!(
        owner(&s.ds[1], name),
        Some(("h1".to_string(), name.to_string()))
    );
    for (i, d) in s.ds.iter().enumerate() {
        let ev = events(d);
        assert!(
            !ev.iter()
                .any(|e| e["kind"] == "host_fenced" || e["kind"] == "failover_started"),
            "h{}: {ev:?}",
            i + 1
        );
    }
    assert!(
        std::fs::read_to_string(&s.ds[1].log)
            .unwrap_or_default()
            .contains("its libvirtd answers")
            || std::fs::read_to_string(&s.ds[2].log)
                .unwrap_or_default()
                .contains("its libvirtd answers"),
        "no survivor saw h1's libvirtd answer"
    );
    // The client was served by the primary throughout (short gaps while libvirtd restarted
    // are the client's own timeouts, never another domain).
    assert!(samples
        .iter()
        .all(|(_, u)| u.is_none() || u.as_deref() == Some(s.primary_uuid.as_str())));
    let served = samples.iter().filter(|(_, u)| u.is_some()).count();
    assert!(
        served * 10 >= samples.len() * 9,
        "served {served} of {}",
        samples.len()
    );
    assert_eq!(
        running_members(&cluster, name, &["h1", "h2", "h3"]),
        [format!("h1/{name}")]
    );
}

/// etcd loses its quorum for 60 s (the members of h2 and h3 stopped): every host still hears
/// the others, so none fences itself and none promotes; the primary serves throughout, each
/// host says it is out of touch with etcd (status of peers, metrics); afterwards every host is
/// connected again and nothing moved.
#[test]
fn an_etcd_quorum_loss_stops_no_vm_and_promotes_nothing() {
    let cluster = Cluster::require();
    let (name, ip) = ("hl4-web", "10.77.0.94");
    let prefix = "/understudy/it-hl4";
    let names = members(name);
    let _cleanup = ClusterCleanup::new(
        &cluster,
        &names.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let mut restore = Restore::default();
    let x = Extra {
        fence: true,
        ..Extra::default()
    };
    let s = setup(&cluster, name, ip, prefix, &x, None);

    let poller = Poller::start(ip);
    for h in ["h2", "h3"] {
        restore.etcd_stopped.push(h.into());
        let out =
            run(Command::new(repo().join("scripts/lab-host-service.sh")).args([h, "etcd", "stop"]));
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let began = Instant::now();
    wait_for(
        "every host out of touch with etcd",
        Duration::from_secs(20),
        || {
            HOSTS
                .iter()
                .zip(&s.ds)
                .all(|(h, d)| {
                    host_metrics(h, d)
                        .contains("understudy_cluster_mode{state=\"etcd_unreachable\"} 1")
                })
                .then_some(())
        },
    );
    let (_, out, _) = s.ds[0].cli(&["hosts"]);
    eprintln!("{out}");
    // A peer's mode is what its last beat said: h1's view trails the peers' own metrics by up
    // to a beat's age plus a heartbeat period, so it is waited for, not read once.
    let v = wait_for(
        "h1 hearing both peers out of touch with etcd",
        Duration::from_secs(5),
        || {
            let (_, out, _) = s.ds[0].cli(&["hosts", "--json"]);
            let v: serde_json::Value = serde_json::from_str(&out).expect("hosts --json");
            let peers = v["peers"].as_array().expect("peers");
            assert_eq!(peers.len(), 2, "{peers:?}");
            assert!(peers.iter().all(|p| p["suspect"] == false), "{peers:?}");
            peers
                .iter()
                .all(|p| p["mode"] == "unreachable")
                .then_some(v)
        },
    );
    assert_eq!(v["mode"], "unreachable");
    assert_eq!(v["self_fenced"], false);
    std::thread::sleep(Duration::from_secs(60).saturating_sub(began.elapsed()));
    for h in ["h2", "h3"] {
        let out = run(
            Command::new(repo().join("scripts/lab-host-service.sh")).args([h, "etcd", "start"])
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    restore.etcd_stopped.clear();
    wait_for(
        "every host connected again",
        Duration::from_secs(60),
        || {
            HOSTS
                .iter()
                .zip(&s.ds)
                .all(|(h, d)| {
                    host_metrics(h, d).contains("understudy_cluster_mode{state=\"connected\"} 1")
                })
                .then_some(())
        },
    );
    std::thread::sleep(Duration::from_secs(5));
    let samples = poller.finish();
    assert!(
        samples
            .iter()
            .all(|(_, u)| u.is_none() || u.as_deref() == Some(s.primary_uuid.as_str())),
        "another domain answered"
    );
    let served = samples.iter().filter(|(_, u)| u.is_some()).count();
    assert!(
        served * 10 >= samples.len() * 9,
        "served {served} of {}",
        samples.len()
    );
    for (i, d) in s.ds.iter().enumerate() {
        let ev = events(d);
        assert!(
            !ev.iter().any(|e| e["kind"] == "host_fenced"
                || e["kind"] == "failover_started"
                || (e["kind"] == "fenced")),
            "h{}: {ev:?}",
            i + 1
        );
    }
    assert_eq!(
        owner(&s.ds[1], name),
        Some(("h1".to_string(), name.to_string()))
    );
    assert_eq!(
        running_members(&cluster, name, &["h1", "h2", "h3"]),
        [format!("h1/{name}")]
    );
    // Normal work resumed: the shadow is still registered ready.
    assert_eq!(
        winner(&s).paused_shadows(name).unwrap(),
        std::slice::from_ref(&s.shadow)
    );
}

#[test]
fn a_switch_verdict_names_every_sign_of_two_domains() {
    let ms = Duration::from_millis;
    let f = |t, p: &str| (ms(t), p.to_string());
    let e = |t, p: Option<&str>| (ms(t), p.map(str::to_string));
    // A clean move: old port, then the new one only.
    let clean = SwitchVerdict::of(
        &[f(10, "p1"), f(20, "p1"), f(900, "p2"), f(910, "p2")],
        &[e(0, Some("p1")), e(50, None), e(950, Some("p2"))],
        "p1",
        "p2",
    );
    assert!(clean.two_copies.is_empty(), "{:?}", clean.two_copies);
    assert_eq!((clean.frames_old, clean.frames_new), (2, 2));
    assert_eq!(
        (clean.last_old, clean.first_new),
        (Some(ms(20)), Some(ms(900)))
    );
    assert_eq!(clean.fdb_moved_at, Some(ms(950)));
    // The old port after the move, a third port before it, the table moving back.
    let bad = SwitchVerdict::of(
        &[f(10, "p3"), f(20, "p1"), f(900, "p2"), f(905, "p1")],
        &[e(0, Some("p1")), e(950, Some("p2")), e(1000, Some("p1"))],
        "p1",
        "p2",
    );
    assert_eq!(bad.two_copies.len(), 3, "{:?}", bad.two_copies);
    assert!(bad.two_copies[0].contains("p3"));
    assert!(bad.two_copies[1].contains("after the first on p2"));
    assert!(bad.two_copies[2].contains("moved back"));
    // Nothing on the new port: no move, no two copies.
    let none = SwitchVerdict::of(&[f(10, "p1")], &[], "p1", "p2");
    assert_eq!(
        (none.frames_old, none.frames_new, none.first_new),
        (1, 0, None)
    );
    assert!(none.two_copies.is_empty());
}
