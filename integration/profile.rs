//! Profiles on real guests: the collector learns a workload and its dependencies, a promotion
//! sizes and configures the promoted shadow from the profile, and `shadow reinit --golden`
//! rebuilds shadows on the class's golden image.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use understudy::libvirt::Hypervisor;

use crate::common::*;

const SHADOW_WAIT: Duration = Duration::from_secs(240);

/// Starts the daemon, then restarts it with `extra` appended to its configuration (the file
/// ends inside `[class.default]`, so bare keys land in the class).
fn daemon_with(tag: &str, pattern: &str, shadows: u32, extra: &str) -> DaemonProc {
    let mut d = DaemonProc::start(tag, pattern, shadows);
    let mut cfg = std::fs::read_to_string(&d.config).unwrap();
    cfg.push_str(extra);
    std::fs::write(&d.config, cfg).unwrap();
    d.restart();
    d
}

/// Starts `argv` in the guest without waiting for it.
fn guest_spawn(hv: &Hypervisor, name: &str, path: &str, args: &[&str]) {
    let cmd = json!({"execute": "guest-exec", "arguments": {"path": path, "arg": args}});
    let r = agent(hv, name, &cmd.to_string()).expect("guest-exec answered");
    assert!(r["return"]["pid"].is_i64(), "guest-exec failed: {r}");
}

/// Runs `argv` in the guest and returns its exit code.
fn guest_run(hv: &Hypervisor, name: &str, path: &str, args: &[&str]) -> i64 {
    let cmd = json!({"execute": "guest-exec", "arguments": {"path": path, "arg": args, "capture-output": true}});
    let pid = agent(hv, name, &cmd.to_string()).expect("guest-exec answered")["return"]["pid"]
        .as_i64()
        .expect("guest pid");
    wait_for("guest command exit", Duration::from_secs(30), || {
        let st = agent(
            hv,
            name,
            &json!({"execute": "guest-exec-status", "arguments": {"pid": pid}}).to_string(),
        )?;
        (st["return"]["exited"] == true).then(|| st["return"]["exitcode"].as_i64().unwrap_or(-1))
    })
}

fn show(daemon: &DaemonProc, service: &str) -> Option<Value> {
    let (code, out, _) = daemon.cli(&["profile", "show", service, "--json"]);
    (code == 0)
        .then(|| serde_json::from_str(&out).ok())
        .flatten()
}

/// Polls `profile show` every 2 s until `ready` accepts the report; on timeout the panic shows
/// the last report.
fn wait_report(
    daemon: &DaemonProc,
    service: &str,
    what: &str,
    limit: Duration,
    ready: impl Fn(&Value) -> bool,
    diagnose: impl Fn() -> String,
) -> Value {
    let deadline = std::time::Instant::now() + limit;
    let mut last = None;
    loop {
        if let Some(r) = show(daemon, service) {
            if ready(&r) {
                return r;
            }
            last = Some(r);
        }
        if std::time::Instant::now() >= deadline {
            panic!(
                "timed out after {limit:?} waiting for {what}; last report: {}\n{}",
                last.map(|r| serde_json::to_string_pretty(&r).unwrap_or_default())
                    .unwrap_or_else(|| "none".into()),
                diagnose()
            );
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// A peer for the guest's requests: answers each after holding the connection `hold`, so the
/// guest's socket table shows it between two samples.
struct SlowServer {
    port: u16,
    stop: Arc<AtomicBool>,
    served: Arc<std::sync::atomic::AtomicU64>,
}

impl SlowServer {
    fn start(hold: Duration) -> Self {
        let listener = TcpListener::bind("10.77.0.1:0").expect("bind on the lab bridge address");
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (s, n) = (stop.clone(), served.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        let n = n.clone();
                        std::thread::spawn(move || {
                            let _ = conn.set_nonblocking(false);
                            let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                            let mut buf = [0u8; 1024];
                            let _ = conn.read(&mut buf);
                            std::thread::sleep(hold);
                            let _ = conn.write_all(b"HTTP/1.0 200 OK\r\n\r\nok\n");
                            n.fetch_add(1, Ordering::Relaxed);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        SlowServer { port, stop, served }
    }
}

impl Drop for SlowServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

// Was flaky (about 1 run in 3): the collector ticked at a fixed phase, so the guest's request
// every second was seen at every socket round or at none. Collector ticks are jittered now.
#[test]
fn profile_learns_the_workload_and_its_dependencies() {
    require_lab();
    let name = "it-prof1";
    let _cleanup = Cleanup {
        prefixes: vec![name.to_string()],
    };
    // shadows = 0: the service is only watched, which is all a profile needs.
    let daemon = DaemonProc::start("profile", name, 0);
    let server = SlowServer::start(Duration::from_millis(700));
    let hv = hypervisor();
    start_guest(&hv, name, "10.77.0.41/24", &[]);
    wait_agent(&hv, name);

    let port = server.port.to_string();
    guest_spawn(
        &hv,
        name,
        "/bin/us-workload",
        &["pattern", "50", "48", "150"],
    );
    guest_spawn(
        &hv,
        name,
        "/bin/us-workload",
        &["connect", "10.77.0.1", &port, "1", "150"],
    );
    // The guest must reach the peer at all, or the test below proves nothing.
    let reached = (0..30).any(|_| {
        std::thread::sleep(Duration::from_secs(1));
        server.served.load(Ordering::Relaxed) > 0
    });
    if !reached {
        let (code, out) = guest_output(
            &hv,
            name,
            "/bin/us-workload",
            &["connect", "10.77.0.1", &port, "1", "2"],
        );
        let (_, net) = guest_output(
            &hv,
            name,
            "/bin/sh",
            &["-c", "ip addr; ip route; netstat -tn"],
        );
        panic!("the guest never reached 10.77.0.1:{port}; a one-shot connect exited {code}: {out}\n{net}");
    }
    let key = format!("tcp://10.77.0.1:{port}");
    let report = wait_report(
        &daemon,
        name,
        "a profile with 45 observations naming the peer",
        Duration::from_secs(180),
        |r| r["observations"].as_u64().unwrap_or(0) >= 45 && r["dependencies"].get(&key).is_some(),
        || {
            let (_, tcp) = guest_output(&hv, name, "/bin/cat", &["/proc/net/tcp"]);
            let (_, ps) = guest_output(&hv, name, "/bin/ps", &[]);
            format!(
                "requests served: {}\nguest /proc/net/tcp:\n{tcp}\nguest processes:\n{ps}",
                server.served.load(Ordering::Relaxed)
            )
        },
    );
    eprintln!(
        "profile of {name}: {}",
        serde_json::to_string_pretty(&report).unwrap()
    );
    assert!(
        server.served.load(Ordering::Relaxed) > 0,
        "the guest never reached the test's peer"
    );
    assert_eq!(report["live"], true);
    // The guest's OS and kernel (guest-get-osinfo) are part of its expected configuration.
    assert!(
        report["expected_config"].get("os").is_some(),
        "no guest OS item in {}",
        report["expected_config"]
    );
    let observed = &report["observed"];
    let envelope = &report["prediction"]["envelopes"];
    let cpu_mean = observed["cpu_cores"]["mean"].as_f64().unwrap();
    let mem_max = observed["mem_bytes"]["max"].as_f64().unwrap();
    // The 50% duty workload shows as guest CPU, and the 48 MiB it holds as guest memory.
    assert!(
        cpu_mean > 0.2,
        "observed CPU {cpu_mean} misses the workload"
    );
    assert!(mem_max > 48.0 * 1048576.0, "observed memory {mem_max}");
    // The envelope covers what was observed.
    let cpu_limit = envelope["cpu"]["limit"].as_f64().unwrap();
    let mem_limit = envelope["mem"]["limit"].as_f64().unwrap();
    assert!(
        cpu_limit >= cpu_mean,
        "cpu limit {cpu_limit} below observed mean {cpu_mean}"
    );
    assert!(
        mem_limit >= mem_max,
        "memory limit {mem_limit} below observed max {mem_max}"
    );
    let plan = &report["plan"];
    assert!(plan["vcpus"].as_u64().unwrap() >= 1, "{plan}");
    assert!(
        plan["mem_kib"].as_f64().unwrap() * 1024.0 >= mem_max,
        "{plan}"
    );
    // How well it predicted, live.
    let acc = &report["accuracy"]["metrics"];
    let mem_coverage = acc["mem"]["coverage"].as_f64().unwrap();
    assert!(mem_coverage >= 0.8, "memory coverage {mem_coverage}");

    // The text forms work too.
    let (code, text, err) = daemon.cli(&["profile", "show", name]);
    assert_eq!(code, 0, "{err}");
    assert!(text.contains(&key), "{text}");
    let (code, text, err) = daemon.cli(&["profile", "accuracy"]);
    assert_eq!(code, 0, "{err}");
    assert!(text.contains(name), "{text}");
    let (code, _, err) = daemon.cli(&["profile", "history", name]);
    assert_eq!(code, 0, "{err}");
    // Unknown services and versions are clear errors.
    let (code, _, err) = daemon.cli(&["profile", "show", "no-such-service"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("no profile for service 'no-such-service'"),
        "{err}"
    );
    let (code, _, err) = daemon.cli(&["profile", "diff", name, "1", "99"]);
    assert_eq!(code, 1);
    assert!(err.contains("no version"), "{err}");
}

#[test]
fn promotion_applies_the_profile_and_golden_reinit_uses_the_golden_image() {
    require_lab();
    let name = "it-prof2";
    let ip = "10.77.0.42";
    let _cleanup = Cleanup {
        prefixes: vec![name.to_string()],
    };
    let dir = std::env::temp_dir().join(format!("understudy-it-profapply-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let golden = dir.join("golden.qcow2");
    let image = dir.join("it-prof2.qcow2");
    for img in [&golden, &image] {
        let st = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(img)
            .arg("32M")
            .status()
            .unwrap();
        assert!(st.success());
    }
    let daemon = daemon_with(
        "profapply",
        name,
        1,
        &format!(
            "config_files = [\"/etc/us-app.conf\"]\ngolden_image = \"{}\"\n",
            golden.display()
        ),
    );
    let hv = hypervisor();
    start_guest(
        &hv,
        name,
        &format!("{ip}/24"),
        &["--disk", image.to_str().unwrap()],
    );
    let shadow = daemon.wait_paused_shadows(name, 1, SHADOW_WAIT).remove(0);
    let before = hv.live_resources(&shadow).unwrap();
    // One vCPU like its primary (of two possible); its memory is whatever the balloon reached.
    assert_eq!(before.0, 1, "lab shadows start with their primary's vCPUs");

    // A configuration file the shadow (booted earlier, from the same image) does not have.
    wait_agent(&hv, name);
    let token = format!("token-{}", std::process::id());
    assert_eq!(
        guest_run(
            &hv,
            name,
            "/bin/sh",
            &[
                "-c",
                &format!("echo 'workers = 4 {token}' > /etc/us-app.conf")
            ]
        ),
        0
    );
    // A busy primary: a full vCPU and 64 MiB.
    guest_spawn(
        &hv,
        name,
        "/bin/us-workload",
        &["pattern", "100", "64", "300"],
    );
    let report = wait_report(
        &daemon,
        name,
        "a mature profile that tracks the configuration file",
        Duration::from_secs(180),
        |r| {
            r["plan"].is_object()
                && r["observations"].as_u64().unwrap_or(0) >= 40
                && r["expected_config"].get("file:/etc/us-app.conf").is_some()
        },
        String::new,
    );
    eprintln!(
        "profile before the switchover: plan {} observed {}",
        report["plan"], report["observed"]
    );

    let (code, out, err) = daemon.cli(&["failover", name]);
    assert_eq!(code, 0, "{out}{err}");
    let record: Value = serde_json::from_str(&out).expect("failover record");
    eprintln!(
        "failover record: {}",
        serde_json::to_string_pretty(&record).unwrap()
    );
    assert_eq!(record["to"], shadow.as_str());
    let steps: Vec<&str> = record["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    let announce = steps.iter().position(|s| *s == "announce").unwrap();
    let apply = steps
        .iter()
        .position(|s| *s == "apply_profile")
        .expect("apply_profile step");
    assert!(
        apply > announce,
        "apply_profile ran before traffic was restored: {steps:?}"
    );
    let notes: Vec<String> = record["notes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n.as_str().map(str::to_string))
        .collect();
    // The plan applied, as the pipeline reported it ("memory A -> B KiB").
    let mem_target: u64 = notes
        .iter()
        .find_map(|n| {
            let rest = n.split("memory ").nth(1)?;
            rest.split(" -> ").nth(1)?.split(' ').next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no memory change in {notes:?}"));
    let vcpus_target: u32 = notes
        .iter()
        .find_map(|n| {
            let rest = n.split("vCPUs ").nth(1)?;
            rest.split(" -> ").nth(1)?.split(' ').next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no vCPU change in {notes:?}"));
    // A fully busy vCPU plus headroom needs two; the shadow was made with room for two.
    assert_eq!(vcpus_target, 2, "{notes:?}");
    assert_ne!(mem_target, before.1, "{notes:?}");
    let live = wait_for(
        "the promoted shadow at the profile's size",
        Duration::from_secs(60),
        || {
            let r = hv.live_resources(&shadow).ok()?;
            (r == (vcpus_target, mem_target)).then_some(r)
        },
    );
    eprintln!("promoted shadow: {live:?} (was {before:?})");
    assert!(
        notes
            .iter()
            .any(|n| n.contains("/etc/us-app.conf") && n.contains("delivered")),
        "{notes:?}"
    );
    wait_agent(&hv, &shadow);
    assert_eq!(
        guest_run(
            &hv,
            &shadow,
            "/bin/grep",
            &["-q", &token, "/etc/us-app.conf"]
        ),
        0,
        "configuration file not delivered to the promoted shadow"
    );
    // status shows the notes too.
    let (_, text, _) = daemon.cli(&["status"]);
    assert!(text.contains("note: profile"), "{text}");

    // shadow reinit --golden: new shadows whose system disk sits on the golden image.
    let (code, out, err) = daemon.cli(&["shadow", "reinit", name, "--golden"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("golden image"), "{out}");
    let golden_shadow = daemon.wait_paused_shadows(name, 1, SHADOW_WAIT).remove(0);
    let xml =
        understudy::domain_xml::DomainXml::parse(&hv.xml(&golden_shadow, true).unwrap()).unwrap();
    let overlay = xml
        .disks()
        .into_iter()
        .find(|d| d.target_dev == "vda")
        .and_then(|d| d.source)
        .expect("golden shadow has vda");
    let info = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json", &overlay])
        .output()
        .unwrap();
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(
        info["backing-filename"].as_str(),
        golden.to_str(),
        "overlay of {golden_shadow} is not on the golden image"
    );
    // Without a golden image in the class, --golden is a clear error.
    let (code, _, err) = daemon.cli(&["shadow", "reinit", "no-such-service", "--golden"]);
    assert_eq!(code, 1);
    assert!(err.contains("no service named"), "{err}");
}
