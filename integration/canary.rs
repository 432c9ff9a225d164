//! Capture, isolated runs and canaries on real guests: the primary's traffic is recorded from
//! its tap (bounded, redacted before it is stored), clones run off the service network on
//! copies of the data, and a canary's answers are compared with an unchanged clone's.
//!
//! Throughout, a watcher checks what the issue requires of isolation: the service bridge never
//! forwards the service MAC to any port but the primary's tap, no tap carrying it other than
//! the primary's is on the service bridge, and the live data disk is attached to exactly one
//! running domain.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use crate::stateful::data_image;

const SHADOW_WAIT: Duration = Duration::from_secs(240);

/// One HTTP/1.0 request with extra header lines; (status, body).
fn http(ip: &str, method: &str, path: &str, headers: &str) -> Option<(u16, String)> {
    let addr: SocketAddr = format!("{ip}:80").parse().unwrap();
    let t = Duration::from_secs(2);
    let mut s = TcpStream::connect_timeout(&addr, t).ok()?;
    s.set_read_timeout(Some(t)).ok()?;
    s.write_all(format!("{method} {path} HTTP/1.0\r\nHost: {ip}\r\n{headers}\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, out.split_once("\r\n\r\n")?.1.to_string()))
}

fn store_dir(daemon: &DaemonProc, service: &str) -> PathBuf {
    daemon.dir.join("state/capture").join(service)
}

/// Bytes of every file in `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|it| {
            it.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Every byte of every file in `dir`.
fn dir_contents(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        out.extend(std::fs::read(e.path()).unwrap_or_default());
    }
    out
}

fn records(daemon: &DaemonProc, service: &str) -> Vec<understudy::capture::Record> {
    understudy::capture::store::read_records(&store_dir(daemon, service), usize::MAX).unwrap()
}

fn wait_capture(daemon: &DaemonProc, service: &str) {
    wait_for("capture running", Duration::from_secs(60), || {
        daemon
            .metrics()
            .lines()
            .any(|l| {
                l.starts_with(&format!(
                    "understudy_capture_running{{service=\"{service}\"}} 1"
                ))
            })
            .then_some(())
    });
}

/// Checks isolation every 100 ms while it lives; panics in `finish` with what it saw.
struct Watcher {
    stop: Arc<AtomicBool>,
    bad: Arc<Mutex<Vec<String>>>,
    checks: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watcher {
    fn start(mac: &str, primary_tap: &str, primary: &str, live_disk: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let bad = Arc::new(Mutex::new(Vec::new()));
        let checks = Arc::new(AtomicU64::new(0));
        let (s, b, c) = (stop.clone(), bad.clone(), checks.clone());
        let (mac, tap, primary, disk) = (
            mac.to_string(),
            primary_tap.to_string(),
            primary.to_string(),
            live_disk.to_string(),
        );
        let thread = std::thread::spawn(move || {
            let hv = hypervisor();
            while !s.load(Ordering::SeqCst) {
                let mut found = Vec::new();
                let ports = fdb_ports_of(&mac);
                if ports.iter().any(|p| *p != tap) {
                    found.push(format!("usbr0 forwards {mac} to {ports:?}"));
                }
                let on = taps_with_mac_on_bridge(&mac);
                if on.len() > 1 || on.iter().any(|x| !x.starts_with(&format!("{primary}:"))) {
                    found.push(format!("taps with {mac} on usbr0: {on:?}"));
                }
                let h = holders(&hv, &disk);
                if h != vec![primary.clone()] {
                    found.push(format!("live data disk held by {h:?}"));
                }
                if !found.is_empty() {
                    b.lock().unwrap().extend(found);
                }
                c.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Watcher {
            stop,
            bad,
            checks,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        let bad = self.bad.lock().unwrap().clone();
        assert!(bad.is_empty(), "isolation broken: {bad:?}");
        self.checks.load(Ordering::SeqCst)
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Names and states of every domain.
fn domains(hv: &understudy::libvirt::Hypervisor) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = hv
        .list()
        .unwrap()
        .into_iter()
        .map(|d| (d.name, d.state.as_str().to_string()))
        .collect();
    v.sort();
    v
}

/// Removes what a canary test of `service` made when it ends, passed or not: its domains
/// (primary, shadows, canary and baseline clones), then its isolated bridges (a failed test's
/// daemon is killed before it can abort its canary).
fn cleanup(service: &str) -> CanaryCleanup {
    CanaryCleanup {
        _domains: Cleanup {
            prefixes: vec![
                service.to_string(),
                format!("{service}-canary"),
                format!("{service}-baseline"),
            ],
        },
        bridges: ['b', 'c', 'v']
            .iter()
            .map(|r| understudy::canary::isolated::bridge_name(service, *r))
            .collect(),
    }
}

/// See [`cleanup`].
struct CanaryCleanup {
    _domains: Cleanup,
    bridges: Vec<String>,
}

impl Drop for CanaryCleanup {
    fn drop(&mut self) {
        // The domains go first (this runs before the fields drop): then no tap is on a bridge.
        let bridges = std::mem::take(&mut self.bridges);
        let domains = std::mem::replace(
            &mut self._domains,
            Cleanup {
                prefixes: Vec::new(),
            },
        );
        drop(domains);
        for b in &bridges {
            let _ = Command::new("ip").args(["link", "del", b]).output();
        }
    }
}

/// Links whose name starts with `usi` (isolated bridges).
fn isolated_bridges() -> Vec<String> {
    let out = Command::new("ip")
        .args(["-j", "link", "show"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|l| l["ifname"].as_str())
                .filter(|n| n.starts_with("usi"))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn canary_start(
    daemon: &DaemonProc,
    service: &str,
    change: &str,
) -> (i32, serde_json::Value, String) {
    let file = daemon.dir.join("change.toml");
    std::fs::write(&file, change).unwrap();
    let (code, out, err) = daemon.cli(&[
        "canary",
        "start",
        service,
        "--apply",
        file.to_str().unwrap(),
        "--json",
        "--timeout",
        "600",
    ]);
    let v = serde_json::from_str(&out).unwrap_or_else(|e| panic!("canary start: {e}: {out} {err}"));
    (code, v, err)
}

#[test]
fn capture_is_bounded_and_redacted_before_it_is_stored() {
    require_lab();
    let name = "it-cap1";
    let ip = "10.77.0.90";
    let _cleanup = cleanup(name);
    let daemon = DaemonProc::start_configured(
        "capture",
        name,
        0,
        r#"
[class.default.capture]
enabled = true
ports = [80]
max_bytes = 65536
max_per_second = 10000
max_body_bytes = 512
redact_headers = ["authorization", "x-api-key"]
redact_fields = ["token"]
redact_patterns = ["card-[0-9]{4}"]
"#,
        &[],
    );
    let hv = hypervisor();
    start_guest(&hv, name, &format!("{ip}/24"), &[]);
    wait_for("page served", Duration::from_secs(120), || {
        http_get(ip, Duration::from_secs(1))
    });
    wait_capture(&daemon, name);

    let dir = store_dir(&daemon, name);
    let mut max_seen = 0;
    let mut answered = 0;
    for i in 0..1500 {
        let r = http(
            ip,
            "GET",
            &format!("/?token=SECRETTOKEN{i}&n={i}&c=card-1234"),
            "Authorization: Bearer AUTHSECRET\r\nX-Api-Key: KEYSECRET\r\nX-Plain: visible\r\n",
        );
        answered += usize::from(r.is_some_and(|(c, _)| c == 200));
        if i % 50 == 0 {
            max_seen = max_seen.max(dir_bytes(&dir));
        }
    }
    // The capture writes every 500 ms.
    std::thread::sleep(Duration::from_secs(2));
    max_seen = max_seen.max(dir_bytes(&dir));
    eprintln!("{answered} of 1500 requests answered; store at most {max_seen} bytes");
    assert!(answered > 1000, "the guest answered only {answered}");
    assert!(max_seen <= 65_536, "store grew to {max_seen} bytes");

    let recs = records(&daemon, name);
    assert!(recs.len() > 20, "only {} records", recs.len());
    assert!(recs.len() < 1500, "nothing was dropped: {}", recs.len());
    // Oldest dropped first: what is kept is the end of the flood, in order.
    let last = recs.last().unwrap();
    let understudy::capture::Exchange::Http { request, response } = &last.exchange else {
        panic!("not HTTP: {last:?}")
    };
    assert!(request.target.contains("n=1499"), "{}", request.target);
    assert!(
        request.target.contains("token=[redacted]"),
        "{}",
        request.target
    );
    assert!(request
        .headers
        .iter()
        .any(|(n, v)| n == "X-Plain" && v == "visible"));
    let response = response.as_ref().expect("response recorded");
    assert_eq!(response.status, 200);
    assert!(
        response.body.data.starts_with("understudy-lab-guest"),
        "{response:?}"
    );
    assert!(last.latency_ms.is_some());
    assert!(recs.windows(2).all(|w| w[0].seq < w[1].seq));

    let bytes = dir_contents(&dir);
    let text = String::from_utf8_lossy(&bytes);
    for secret in ["SECRETTOKEN", "AUTHSECRET", "KEYSECRET", "card-1234"] {
        assert!(!text.contains(secret), "{secret} reached the store");
    }
    let metrics = daemon.metrics();
    assert!(
        metrics.contains(&format!(
            "understudy_capture_records{{service=\"{name}\",outcome=\"stored\"}}"
        )),
        "{metrics}"
    );
}

/// A ledger guest whose traffic is recorded: / pages, appends and ledger listings.
fn ledger_service(tag: &str, name: &str, ip: &str, extra: &str) -> (DaemonProc, PathBuf) {
    let class = format!(
        r#"{DATA_CLASS}
{extra}
[class.default.capture]
enabled = true
ports = [80]

# Per-guest identity on the page; ledger records (the list grows as clients append).
[class.default.replay]
ignore = ["uuid=\\S+", "boot=\\S+", "(?m)^k[0-9]+$"]
"#
    );
    let daemon = DaemonProc::start_configured(tag, name, 1, &class, &[]);
    let hv = hypervisor();
    let image = data_image(&daemon, name);
    start_guest(
        &hv,
        name,
        &format!("{ip}/24"),
        &["--data", image.to_str().unwrap()],
    );
    daemon.wait_paused_shadows(name, 1, SHADOW_WAIT);
    wait_for("ledger served", Duration::from_secs(60), || ledger(ip));
    wait_capture(&daemon, name);
    for i in 0..8 {
        assert!(http(ip, "GET", "/", "").is_some());
        assert_eq!(
            http(ip, "POST", &format!("/append?key=k{i}"), "").map(|r| r.0),
            Some(200)
        );
        assert!(http(ip, "GET", "/ledger", "").is_some());
    }
    wait_for("24 records stored", Duration::from_secs(10), || {
        (records(&daemon, name).len() >= 24).then_some(())
    });
    (daemon, image)
}

/// Restarts the guest's page server without its data directory: it no longer serves the
/// ledger (every path answers its page).
const BREAK_LEDGER: &str = r#"
[[command]]
argv = ["/bin/sh", "-c", "kill $(pidof us-httpd); sleep 0.3; setsid /bin/us-httpd 80 /www/index.html </dev/null >/dev/null 2>&1 &"]
"#;

/// A file nobody reads and a command that changes nothing.
const HARMLESS: &str = r#"
[[file]]
path = "/etc/canary-note"
content = "tried by a canary\n"

[[command]]
argv = ["/bin/true"]
"#;

#[test]
fn canary_reports_a_broken_path_passes_a_harmless_change_and_abort_leaves_things_as_they_were() {
    require_lab();
    let name = "it-can1";
    let ip = "10.77.0.91";
    let _cleanup = cleanup(name);
    let (daemon, image) = ledger_service("canary", name, ip, "");
    let hv = hypervisor();
    let live = image.to_str().unwrap().to_string();
    let (mac, tap) = taps(&hv, name)[0].clone();
    let primary_uuid = domain_uuid(&hv, name);
    let before = domains(&hv);
    let watcher = Watcher::start(&mac, &tap, name, &live);

    // A change that breaks the ledger paths.
    let (code, report, err) = canary_start(&daemon, name, BREAK_LEDGER);
    eprintln!("{err}");
    assert_eq!(code, 4, "differences must exit 4: {report:#}");
    assert_eq!(report["phase"], "done");
    let differing: Vec<String> = report["comparison"]["differing"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["request"].as_str().unwrap().to_string())
        .collect();
    assert!(!differing.is_empty());
    assert!(
        differing
            .iter()
            .all(|r| r.starts_with("POST /append") || r == "GET /ledger"),
        "{differing:?}"
    );
    assert!(
        differing.iter().any(|r| r == "GET /ledger"),
        "{differing:?}"
    );
    assert!(
        differing.iter().any(|r| r.starts_with("POST /append")),
        "{differing:?}"
    );
    // Without its data directory the page server answers every path with its page.
    let what = report["comparison"]["differing"][0]["what"][0]
        .as_str()
        .unwrap();
    assert!(what.contains("understudy-lab-guest"), "{what}");
    assert_eq!(
        report["isolation"]["violations"].as_array().unwrap().len(),
        0,
        "{report:#}"
    );
    assert!(report["isolation"]["checks"].as_u64().unwrap() > 2);
    // The text report names the differing requests.
    let (code, text, _) = daemon.cli(&["canary", "report", name]);
    assert_eq!(code, 0);
    assert!(
        text.contains("GET /ledger") && text.contains("verdict: Differs"),
        "{text}"
    );
    // The clones ran on their own bridges, on copies of the data.
    let canary_dom = report["canary"]["name"].as_str().unwrap().to_string();
    let copies: Vec<String> = report["canary"]["copies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect();
    assert_eq!(copies.len(), 1);
    assert_ne!(copies[0], live);
    // The paused canary holds its copy, and only the canary.
    assert_eq!(holders(&hv, &copies[0]), vec![canary_dom.clone()]);
    assert_eq!(isolated_bridges().len(), 2, "{:?}", isolated_bridges());
    // The primary still serves, and alone.
    assert_single_server(ip, &primary_uuid, &mac);
    assert!(ledger(ip).unwrap().contains(&"k7".to_string()));

    let (code, out, err) = daemon.cli(&["canary", "abort", name]);
    assert_eq!(code, 0, "{out} {err}");
    assert_eq!(domains(&hv), before);
    assert!(isolated_bridges().is_empty(), "{:?}", isolated_bridges());
    assert!(!Path::new(&copies[0]).exists());
    let (code, _, err) = daemon.cli(&["canary", "report", name]);
    assert_eq!(code, 1);
    assert!(err.contains("has no canary"), "{err}");

    // A harmless change is clean.
    let (code, report, err) = canary_start(&daemon, name, HARMLESS);
    assert_eq!(code, 0, "a harmless change must be clean: {report:#} {err}");
    assert_eq!(
        report["comparison"]["differing"].as_array().unwrap().len(),
        0
    );
    assert!(report["comparison"]["requests"].as_u64().unwrap() >= 24);
    assert_eq!(report["applied"][0]["result"], "ok");
    let (code, _, err) = daemon.cli(&["canary", "abort", name]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(domains(&hv), before);

    let checks = watcher.finish();
    eprintln!("isolation checked {checks} times");
    assert_single_server(ip, &primary_uuid, &mac);
    let events = daemon.cli(&["events", name]).1;
    for what in ["canary_started", "canary_finished", "canary_aborted"] {
        assert!(events.contains(what), "{what} missing: {events}");
    }
    let metrics = daemon.metrics();
    assert!(
        metrics.contains(&format!(
            "understudy_canary_runs_total{{service=\"{name}\",outcome=\"differs\"}} 1"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "understudy_canary_runs_total{{service=\"{name}\",outcome=\"clean\"}} 1"
        )),
        "{metrics}"
    );
}

/// Holds 64 MiB in the canary's guest for the whole run; the command returns once the memory is
/// touched (2 s: under TCG touching it takes ~0.5 s). The lab guest (192 MiB, 145 MiB to its
/// kernel's allocator, its initramfs in RAM) OOM-kills a workload of 96 MiB.
const HOLD_MEMORY: &str = r#"
[[command]]
argv = ["/bin/sh", "-c", "setsid /bin/us-workload mem 64 900 </dev/null >/dev/null 2>&1 & sleep 2"]
"#;

#[test]
fn canary_beyond_the_profile_envelope_is_a_finding() {
    require_lab();
    let name = "it-env1";
    let ip = "10.77.0.95";
    let _cleanup = cleanup(name);
    let (daemon, _image) = ledger_service("envelope", name, ip, "");
    let hv = hypervisor();
    let before = domains(&hv);
    // The profile predicts an envelope once it has its first 30 observations (1 s apart).
    let plan = wait_for("a profile plan", Duration::from_secs(120), || {
        let (code, out, _) = daemon.cli(&["profile", "show", name, "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        (code == 0 && v["plan"].is_object()).then_some(v)
    });
    let (code, report, err) = canary_start(&daemon, name, HOLD_MEMORY);
    eprintln!("{err}");
    assert_eq!(
        code, 4,
        "beyond the envelope must exit 4: {report:#} {plan:#}"
    );
    let env = &report["envelope"];
    assert_eq!(env["status"], "compared", "{report:#}");
    let mem = env["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["metric"] == "mem")
        .unwrap_or_else(|| panic!("no memory check: {env:#}"));
    let (canary, baseline, limit) = (
        mem["canary"].as_f64().unwrap(),
        mem["baseline"].as_f64().unwrap(),
        mem["limit"].as_f64().unwrap(),
    );
    assert!(canary > limit && baseline <= limit, "{mem:#}");
    // The workload holds 64 MiB; the guest gives back some page cache under the pressure.
    assert!(canary - baseline > 48.0 * 1024.0 * 1024.0, "{mem:#}");
    // The answers themselves are alike: the finding is the envelope's alone.
    assert_eq!(
        report["comparison"]["differing"].as_array().unwrap().len(),
        0,
        "{report:#}"
    );
    let (code, text, _) = daemon.cli(&["canary", "report", name]);
    assert_eq!(code, 0);
    assert!(text.contains("BEYOND IT"), "{text}");
    assert!(text.contains("): beyond the envelope"), "{text}");
    let metrics = daemon.metrics();
    let ratio = metrics
        .lines()
        .find(|l| {
            l.starts_with(&format!(
                "understudy_canary_envelope_use_ratio{{service=\"{name}\",metric=\"mem\"}}"
            ))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no envelope ratio: {metrics}"));
    assert!(ratio > 1.0, "{ratio}");
    let events = daemon.cli(&["events", name]).1;
    assert!(
        events.contains("beyond the profile's envelope: [") && events.contains("mem canary"),
        "{events}"
    );
    let (code, _, err) = daemon.cli(&["canary", "abort", name]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(domains(&hv), before);
}

/// Runs a command in a guest through its agent (fire and forget).
fn guest_run(hv: &understudy::libvirt::Hypervisor, domain: &str, script: &str) {
    let cmd = serde_json::json!({
        "execute": "guest-exec",
        "arguments": {"path": "/bin/sh", "arg": ["-c", script]}
    });
    assert!(
        agent(hv, domain, &cmd.to_string()).is_some(),
        "guest-exec in {domain}"
    );
}

/// Watches a standing-by shadow while it is verified, every 100 ms: it must stay the same
/// domain (same QEMU), paused but for the moment it runs off the network to settle after its
/// memory is written (then `switching`, not promotable), and a shadow of a protected service.
/// Returns how many checks, and how many saw it running or switching.
struct StandbyWatch {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<(u64, u64, Vec<String>)>>,
}

impl StandbyWatch {
    fn start(daemon: &DaemonProc, service: &str, shadow: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let (service, shadow) = (service.to_string(), shadow.to_string());
        let pid = qemu_pid(&shadow);
        let socket = daemon.socket.clone();
        let bin = env!("CARGO_BIN_EXE_understudy");
        let thread = std::thread::spawn(move || {
            let hv = hypervisor();
            let (mut checks, mut settling, mut bad) = (0u64, 0u64, Vec::new());
            while !s.load(Ordering::SeqCst) {
                let state = hv.state(&shadow).map(|s| s.as_str().to_string());
                match state.as_ref().ok().map(String::as_str) {
                    Some("paused") => {}
                    Some("running") => settling += 1,
                    _ => bad.push(format!("{shadow} is {state:?}")),
                }
                let now = understudy::libvirt::qemu_pid(Path::new("/run/libvirt/qemu"), &shadow);
                if now.as_ref().ok() != Some(&pid) {
                    bad.push(format!("{shadow}'s QEMU is {now:?}, was {pid}"));
                }
                let out = Command::new(bin)
                    .args(["--socket", socket.to_str().unwrap(), "status", "--json"])
                    .output()
                    .unwrap();
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
                let svc = v["services"]
                    .as_array()
                    .and_then(|a| a.iter().find(|x| x["name"] == service.as_str()).cloned())
                    .unwrap_or_default();
                let of = |st: &str| {
                    svc["shadows"].as_array().is_some_and(|a| {
                        a.iter()
                            .any(|x| x["name"] == shadow.as_str() && x["state"] == st)
                    })
                };
                if of("switching") {
                    settling += 1;
                }
                if svc["state"] != "protected" || !(of("paused") || of("switching")) {
                    bad.push(format!(
                        "service {} with shadows {}",
                        svc["state"], svc["shadows"]
                    ));
                }
                checks += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            (checks, settling, bad)
        });
        StandbyWatch {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::SeqCst);
        let (checks, settling, bad) = self.thread.take().unwrap().join().unwrap();
        assert!(
            bad.is_empty(),
            "the shadow did not stand by throughout: {bad:?}"
        );
        (checks, settling)
    }
}

impl Drop for StandbyWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn verify(daemon: &DaemonProc, service: &str) -> (i32, serde_json::Value) {
    let (code, out, err) = daemon.cli(&["canary", "verify", service, "--json"]);
    let r: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out} {err}"));
    eprintln!(
        "standby verification of {}: passed {} hold_ms {} settle_ms {} copy_ms {} total_ms {}",
        r["shadow"], r["passed"], r["hold_ms"], r["settle_ms"], r["copy_ms"], r["total_ms"]
    );
    (code, r)
}

#[test]
fn standby_verification_catches_a_broken_shadow_rebuilds_it_and_passes_a_healthy_one() {
    require_lab();
    let name = "it-ver1";
    let ip = "10.77.0.92";
    let _cleanup = cleanup(name);
    let (daemon, image) = ledger_service("verify", name, ip, "");
    let hv = hypervisor();
    let (mac, tap) = taps(&hv, name)[0].clone();
    let watcher = Watcher::start(&mac, &tap, name, image.to_str().unwrap());

    // Break the standing-by shadow's service: resumed for a moment (its tap is down and off
    // the bridge), its page server killed, paused again.
    let broken = daemon.wait_paused_shadows(name, 1, SHADOW_WAIT)[0].clone();
    hv.resume(&broken).unwrap();
    wait_agent(&hv, &broken);
    guest_run(&hv, &broken, "kill $(pidof us-httpd)");
    std::thread::sleep(Duration::from_secs(1));
    hv.suspend(&broken).unwrap();

    let (code, r) = verify(&daemon, name);
    assert_eq!(code, 4, "a broken shadow must fail: {r:#}");
    assert_eq!(r["passed"], false);
    assert_eq!(r["shadow"], broken.as_str());
    assert_eq!(r["copy"], format!("{broken}-verify"));
    assert_eq!(r["copy_ran"], true, "{r:#}");
    assert_eq!(r["verdict"]["matched"], 0, "{r:#}");
    assert!(
        r["isolation"]["violations"].as_array().unwrap().is_empty(),
        "{r:#}"
    );
    assert_eq!(r["replaced"], true, "{r:#}");
    // It was rebuilt: gone from libvirt (and its copy too), a new shadow stands by.
    let names: Vec<String> = hv.list().unwrap().into_iter().map(|d| d.name).collect();
    assert!(!names.iter().any(|d| d.starts_with(&broken)), "{names:?}");
    let healthy = daemon.wait_paused_shadows(name, 1, SHADOW_WAIT)[0].clone();
    assert_ne!(healthy, broken);
    let events = daemon.cli(&["events", name]).1;
    assert!(
        events.contains("verify_failed") && events.contains("the shadow is replaced"),
        "{events}"
    );
    // Status reports it too.
    let last = &daemon.service(name).unwrap()["last_verify"];
    assert_eq!(last["passed"], false, "{last:#}");
    assert_eq!(last["shadow"], broken.as_str());
    let text = daemon.cli(&["status"]).1;
    assert!(
        text.contains(&format!("{name} standby verification at ")) && text.contains("FAILED"),
        "{text}"
    );

    // A healthy shadow passes on its copy and stands by throughout: the same domain, never
    // on the service network (the watcher), paused but for the moment it settles.
    let pid = qemu_pid(&healthy);
    let standby = StandbyWatch::start(&daemon, name, &healthy);
    let (code, r) = verify(&daemon, name);
    let (standby_checks, settling) = standby.finish();
    assert_eq!(code, 0, "a healthy shadow must pass: {r:#}");
    assert_eq!(r["passed"], true);
    assert_eq!(r["shadow"], healthy.as_str());
    assert_eq!(r["replaced"], false);
    assert!(r["verdict"]["requests"].as_u64().unwrap() >= 24);
    assert!(r["hold_ms"].as_u64().is_some(), "{r:#}");
    assert!(r["settle_ms"].as_u64().is_some(), "{r:#}");
    assert_eq!(daemon.service(name).unwrap()["last_verify"]["passed"], true);
    assert_eq!(daemon.paused_shadows(name).unwrap(), vec![healthy.clone()]);
    assert_eq!(qemu_pid(&healthy), pid);
    assert_eq!(hv.state(&healthy).unwrap().as_str(), "paused");
    let names: Vec<String> = hv.list().unwrap().into_iter().map(|d| d.name).collect();
    assert!(
        !names.contains(&format!("{healthy}-verify")),
        "the copy is removed: {names:?}"
    );
    eprintln!("the shadow was checked {standby_checks} times while it was verified, seen settling {settling} times");

    // A failover during a verification finds the shadow standing by: the primary is killed
    // while the shadow's copy runs, the verified shadow takes over with the data.
    let copy = format!("{healthy}-verify");
    let (socket, svc) = (daemon.socket.clone(), name.to_string());
    let during = std::thread::spawn(move || {
        let out = Command::new(env!("CARGO_BIN_EXE_understudy"))
            .arg("--socket")
            .arg(&socket)
            .args(["canary", "verify", &svc, "--json"])
            .output()
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap_or_default()
    });
    wait_for("the copy runs", Duration::from_secs(120), || {
        hv.list()
            .unwrap()
            .iter()
            .any(|d| d.name == copy && d.state.as_str() == "running")
            .then_some(())
    });
    let checks = watcher.finish();
    eprintln!("isolation checked {checks} times");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(qemu_pid(name)),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let svc = wait_for("the failover", SHADOW_WAIT, || {
        let s = daemon.service(name)?;
        (s["last_failover"]["ok"] == true).then_some(s)
    });
    assert_eq!(svc["active"], healthy.as_str(), "{svc:#}");
    eprintln!("failover during the verification: {}", svc["last_failover"]);
    let r = during.join().unwrap();
    eprintln!("verification during the failover: {r}");
    assert_eq!(r["shadow"], healthy.as_str());
    assert_eq!(
        r["replaced"], false,
        "the new primary is never replaced: {r:#}"
    );
    assert_eq!(
        daemon.service(name).unwrap()["active"],
        healthy.as_str(),
        "{r:#}"
    );
    assert_eq!(holders(&hv, image.to_str().unwrap()), vec![healthy.clone()]);
    let have = ledger(ip).expect("ledger served by the verified shadow");
    for i in 0..8 {
        assert!(have.contains(&format!("k{i}")), "k{i} lost: {have:?}");
    }
    assert_single_server(ip, &domain_uuid(&hv, &healthy), &mac);

    let metrics = daemon.metrics();
    assert!(
        metrics.contains(&format!(
            "understudy_verify_runs_total{{service=\"{name}\",outcome=\"failed\"}} 1"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "understudy_verify_runs_total{{service=\"{name}\",outcome=\"passed\"}}"
        )),
        "{metrics}"
    );
}

#[test]
fn canary_promote_switches_over_and_new_shadows_carry_the_change() {
    require_lab();
    let name = "it-pro1";
    let ip = "10.77.0.93";
    let _cleanup = cleanup(name);
    let (daemon, image) = ledger_service("promote", name, ip, "");
    let hv = hypervisor();
    let (code, report, err) = canary_start(&daemon, name, HARMLESS);
    assert_eq!(code, 0, "{report:#} {err}");
    let (code, out, err) = daemon.cli(&["canary", "promote", name]);
    assert_eq!(code, 0, "promote: {out} {err}");
    let rec: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rec["ok"], true, "{rec:#}");
    let new_primary = daemon.service(name).unwrap()["active"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(new_primary, name);
    // The new primary and the new shadows carry the change.
    let has_note = |dom: &str| {
        let cmd = serde_json::json!({"execute": "guest-file-open", "arguments": {"path": "/etc/canary-note"}});
        agent(&hv, dom, &cmd.to_string()).is_some_and(|v| v.get("return").is_some())
    };
    wait_for(
        "new primary carries the change",
        Duration::from_secs(30),
        || has_note(&new_primary).then_some(()),
    );
    let shadow = daemon.wait_paused_shadows(name, 1, SHADOW_WAIT)[0].clone();
    hv.resume(&shadow).unwrap();
    wait_agent(&hv, &shadow);
    let carried = has_note(&shadow);
    hv.suspend(&shadow).unwrap();
    assert!(carried, "new shadow {shadow} lacks the promoted change");
    // The data followed: every key is on the new primary, its disk on exactly it.
    let keys = ledger(ip).expect("ledger on the new primary");
    assert!(keys.contains(&"k7".to_string()), "{keys:?}");
    assert_eq!(
        holders(&hv, image.to_str().unwrap()),
        vec![new_primary.clone()]
    );
    assert!(isolated_bridges().is_empty());
}

/// The backing file of the overlay `domain`'s disk `target` sits on.
fn disk_backing(hv: &understudy::libvirt::Hypervisor, domain: &str, target: &str) -> String {
    let xml = understudy::domain_xml::DomainXml::parse(&hv.xml(domain, false).unwrap()).unwrap();
    let disk = xml
        .disks()
        .into_iter()
        .find(|d| d.target_dev == target)
        .unwrap_or_else(|| panic!("{domain} has no disk {target}"));
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(disk.source.unwrap())
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    info["backing-filename"].as_str().unwrap_or("").to_string()
}

/// A system disk (scripts/lab-sysdisk.sh) whose site has `files` (NAME=CONTENT).
fn system_disk(path: &Path, files: &[&str]) {
    let out = Command::new(repo().join("scripts/lab-sysdisk.sh"))
        .arg(path)
        .args(files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "lab-sysdisk.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn canary_on_a_golden_image_reports_the_path_it_changes_and_promote_gives_it_to_new_shadows() {
    require_lab();
    let name = "it-gold1";
    let ip = "10.77.0.96";
    let _cleanup = cleanup(name);
    let daemon = DaemonProc::start_configured(
        "golden",
        name,
        1,
        r#"
[class.default.capture]
enabled = true
ports = [80]

[class.default.replay]
ignore = ["uuid=\\S+", "boot=\\S+"]
"#,
        &[],
    );
    let hv = hypervisor();
    // The primary's system disk, and a golden image whose site differs in one file.
    let system = daemon.dir.join("system.qcow2");
    let golden = daemon.dir.join("golden.qcow2");
    system_disk(&system, &["a=alpha", "b=bravo"]);
    system_disk(&golden, &["a=alpha", "b=bravo-golden"]);
    start_guest(
        &hv,
        name,
        &format!("{ip}/24"),
        &["--disk", system.to_str().unwrap()],
    );
    daemon.wait_paused_shadows(name, 1, SHADOW_WAIT);
    wait_for("site served", Duration::from_secs(60), || {
        http(ip, "GET", "/site/b", "").filter(|r| r.0 == 200)
    });
    wait_capture(&daemon, name);
    for _ in 0..4 {
        for path in ["/", "/site/a", "/site/b"] {
            assert_eq!(http(ip, "GET", path, "").map(|r| r.0), Some(200), "{path}");
        }
    }
    assert_eq!(http(ip, "GET", "/site/b", "").unwrap().1, "bravo\n");
    wait_for("12 records stored", Duration::from_secs(10), || {
        (records(&daemon, name).len() >= 12).then_some(())
    });
    let before = domains(&hv);

    // An image that is not there is refused before anything starts.
    let (code, out, err) = {
        let file = daemon.dir.join("missing.toml");
        std::fs::write(&file, "golden_image = \"/nonexistent/golden.qcow2\"\n").unwrap();
        daemon.cli(&["canary", "start", name, "--apply", file.to_str().unwrap()])
    };
    assert_eq!(code, 1, "{out} {err}");
    assert!(err.contains("/nonexistent/golden.qcow2"), "{err}");
    assert_eq!(domains(&hv), before);

    let change = format!("golden_image = \"{}\"\n", golden.display());
    let (code, report, err) = canary_start(&daemon, name, &change);
    eprintln!("{err}");
    assert_eq!(code, 4, "the changed path must be reported: {report:#}");
    let differing = report["comparison"]["differing"].as_array().unwrap();
    assert!(!differing.is_empty(), "{report:#}");
    for d in differing {
        assert_eq!(d["request"], "GET /site/b", "{report:#}");
        let what = d["what"][0].as_str().unwrap();
        assert!(
            what.contains("\"bravo\"") && what.contains("\"bravo-golden\""),
            "{what}"
        );
    }
    assert_eq!(
        report["applied"][0]["step"],
        format!("golden image {}", golden.display())
    );
    assert_eq!(
        report["isolation"]["violations"].as_array().unwrap().len(),
        0,
        "{report:#}"
    );
    // The canary booted from the golden image, the baseline as the shadows do.
    let canary_dom = report["canary"]["name"].as_str().unwrap();
    let baseline_dom = report["baseline"]["name"].as_str().unwrap();
    assert_eq!(
        disk_backing(&hv, canary_dom, "vda"),
        golden.to_str().unwrap()
    );
    assert_ne!(
        disk_backing(&hv, baseline_dom, "vda"),
        golden.to_str().unwrap()
    );
    // The primary serves its own site still.
    assert_eq!(http(ip, "GET", "/site/b", "").unwrap().1, "bravo\n");

    // Promoted: the shadows are rebuilt on the golden image and one of them takes over.
    let (code, out, err) = daemon.cli(&["canary", "promote", name]);
    assert_eq!(code, 0, "promote: {out} {err}");
    let new_primary = daemon.service(name).unwrap()["active"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(new_primary, name);
    assert_eq!(
        disk_backing(&hv, &new_primary, "vda"),
        golden.to_str().unwrap()
    );
    wait_for("the golden site served", Duration::from_secs(30), || {
        http(ip, "GET", "/site/b", "").filter(|r| r.1 == "bravo-golden\n")
    });
    let shadow = daemon.wait_paused_shadows(name, 1, SHADOW_WAIT)[0].clone();
    assert_eq!(disk_backing(&hv, &shadow, "vda"), golden.to_str().unwrap());
    assert!(isolated_bridges().is_empty(), "{:?}", isolated_bridges());
    let events = daemon.cli(&["events", name]).1;
    assert!(
        events.contains("canary_promoted") && events.contains("golden image"),
        "{events}"
    );
}
