//! Operations: the Debian package on this machine (dpkg, systemd-analyze), the service
//! manager's notifications, and Debian's Prometheus scraping a running daemon while every query
//! of the Grafana dashboard is run against it.

use std::io::{Read, Write};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;

const SHADOW_WAIT: Duration = Duration::from_secs(240);

fn run(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `dpkg` waits for no lock: retry while another apt/dpkg on this machine holds it.
fn dpkg(args: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (ok, text) = run("dpkg", args);
        if ok {
            return text;
        }
        let locked = text.contains("lock");
        assert!(
            locked && Instant::now() < deadline,
            "dpkg {args:?} failed:\n{text}"
        );
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// The package `make deb` built (the newest, if there are several).
fn built_deb() -> PathBuf {
    let dir = repo().join("target/debian");
    let mut debs: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}; run `make deb` first", dir.display()))
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .collect();
    debs.sort();
    debs.pop()
        .map(|(_, p)| p)
        .unwrap_or_else(|| panic!("no .deb in {}; run `make deb` first", dir.display()))
}

/// Every path under the system directories that names understudy (what a purge must remove).
fn understudy_paths() -> Vec<String> {
    let (_, out) = run(
        "find",
        &[
            "/usr",
            "/etc",
            "/var/lib/understudy",
            "/var/lib/systemd",
            "/var/lib/dpkg/info",
            "-name",
            "*understudy*",
        ],
    );
    let mut v: Vec<String> = out
        .lines()
        .filter(|l| l.starts_with('/'))
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

#[test]
fn package_installs_verifies_and_purges_cleanly() {
    let deb = built_deb();
    // A run killed half-way may have left the package installed.
    if run("dpkg", &["-s", "understudy"]).0 {
        dpkg(&["--purge", "understudy"]);
    }
    let before = understudy_paths();
    assert!(
        before.is_empty(),
        "understudy files before install: {before:?}"
    );

    dpkg(&["-i", deb.to_str().unwrap()]);
    let listed = dpkg(&["-L", "understudy"]);
    for path in [
        "/usr/bin/understudy",
        "/etc/understudy/understudy.toml",
        "/usr/lib/systemd/system/understudy.service",
        "/usr/share/man/man1/understudy.1.gz",
        "/usr/share/man/man1/understudy-run.1.gz",
        "/usr/share/man/man1/understudy-profile-rollback.1.gz",
        "/usr/share/man/man1/understudy-events.1.gz",
        "/usr/share/man/man1/understudy-failover-timeline.1.gz",
        "/usr/share/bash-completion/completions/understudy",
        "/usr/share/zsh/vendor-completions/_understudy",
        "/usr/share/fish/vendor_completions.d/understudy.fish",
        "/usr/share/doc/understudy/examples/understudy.toml",
        "/usr/share/understudy/grafana/understudy.json",
    ] {
        assert!(
            listed.lines().any(|l| l == path),
            "{path} not in the package:\n{listed}"
        );
        assert!(Path::new(path).is_file(), "{path} not installed");
    }
    let (_, conffiles) = run("dpkg-query", &["-W", "-f=${Conffiles}", "understudy"]);
    assert!(
        conffiles.contains("/etc/understudy/understudy.toml"),
        "not a conffile: {conffiles}"
    );
    // The installed binary runs, and validates its own configuration as shipped.
    let (ok, version) = run("/usr/bin/understudy", &["--version"]);
    assert!(ok && version.starts_with("understudy "), "{version}");
    let (ok, check) = run(
        "/usr/bin/understudy",
        &["check-config", "/etc/understudy/understudy.toml"],
    );
    assert!(ok, "the packaged configuration is rejected: {check}");
    // The man page renders.
    let (ok, man) = run("man", &["-P", "cat", "understudy-status"]);
    assert!(ok && man.contains("understudy"), "{man}");
    // Installed and enabled for boot, not started: as shipped it protects nothing.
    assert!(
        Path::new("/etc/systemd/system/multi-user.target.wants/understudy.service").exists(),
        "the unit is not enabled"
    );
    // The unit is valid for this systemd, with its binary, man pages and every setting.
    let (ok, verify) = run(
        "systemd-analyze",
        &["verify", "/usr/lib/systemd/system/understudy.service"],
    );
    assert!(ok, "systemd-analyze verify failed:\n{verify}");
    assert!(
        !verify.contains("understudy.service:"),
        "systemd-analyze verify complains:\n{verify}"
    );
    let unit = std::fs::read_to_string("/usr/lib/systemd/system/understudy.service").unwrap();
    for setting in [
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
    ] {
        assert!(unit.contains(setting), "{setting} missing from the unit");
    }

    dpkg(&["--purge", "understudy"]);
    let (installed, _) = run("dpkg", &["-s", "understudy"]);
    assert!(!installed, "still installed after purge");
    let after = understudy_paths();
    assert!(after.is_empty(), "left behind by the purge: {after:?}");
}

#[test]
fn daemon_notifies_readiness_status_and_watchdog() {
    require_lab();
    let dir = std::env::temp_dir().join(format!("understudy-it-notify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock_path = dir.join("notify.sock");
    let _ = std::fs::remove_file(&sock_path);
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    // What systemd sets for Type=notify with WatchdogSec=10s.
    let daemon = DaemonProc::start_with_env(
        "notify",
        "it-notify-none-*",
        1,
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "10000000"),
        ],
    );
    let mut messages: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline
        && messages.iter().filter(|m| m.contains("WATCHDOG=1")).count() < 2
    {
        let mut buf = [0u8; 4096];
        if let Ok(n) = sock.recv(&mut buf) {
            messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    drop(daemon);
    let ready = messages
        .iter()
        .position(|m| m.lines().any(|l| l == "READY=1"))
        .unwrap_or_else(|| panic!("no READY=1 in {messages:?}"));
    assert!(
        messages[ready].contains("STATUS=no protected services"),
        "{messages:?}"
    );
    let keepalives: Vec<&String> = messages
        .iter()
        .skip(ready + 1)
        .filter(|m| m.lines().any(|l| l == "WATCHDOG=1"))
        .collect();
    assert!(
        keepalives.len() >= 2,
        "fewer than two keep-alives after READY: {messages:?}"
    );
    assert!(
        keepalives.iter().all(|m| m.contains("STATUS=")),
        "{messages:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Debian's Prometheus, in the lab namespace, scraping one target every second.
struct Prometheus {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Prometheus {
    fn start(target_port: u16) -> Self {
        // Not understudy-it-<tag>-<pid>: that is a daemon's directory (DaemonProc).
        let dir =
            std::env::temp_dir().join(format!("understudy-prometheus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: understudy\n    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n"
            ),
        )
        .unwrap();
        let port = target_port + 1000;
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start prometheus (make deps installs Debian's prometheus)");
        Prometheus { child, port, dir }
    }

    /// Runs an instant query; the `data.result` array.
    fn query(&self, expr: &str) -> Vec<Value> {
        let body = http(
            self.port,
            &format!("/api/v1/query?query={}", percent_encode(expr)),
        )
        .unwrap_or_else(|| panic!("prometheus did not answer {expr}"));
        let v: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{expr}: not JSON ({e}): {body}"));
        assert_eq!(v["status"], "success", "{expr}: {body}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// The first sample value of a query, if any.
    fn value(&self, expr: &str) -> Option<f64> {
        self.query(expr)
            .first()
            .and_then(|r| r["value"][1].as_str().map(str::to_string))
            .and_then(|s| s.parse().ok())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- prometheus log ---\n{}", self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// GET on loopback; the body of a 200 answer (`None` if none came: not up yet, or not ready).
fn http(port: u16, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    if head.split_whitespace().nth(1) != Some("200") {
        eprintln!("GET {path}: {head}\n{body}");
        return None;
    }
    Some(body.to_string())
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every PromQL expression of the dashboard, with its panel title: panel targets and the
/// `service` variable's query.
fn dashboard_queries() -> Vec<(String, String)> {
    let path = repo().join("packaging/grafana/understudy.json");
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .expect("the dashboard is JSON");
    let mut out = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((
                p["title"].as_str().unwrap_or_default().to_string(),
                t["expr"].as_str().expect("target without expr").to_string(),
            ));
        }
    }
    for v in dash["templating"]["list"].as_array().expect("templating") {
        if v["type"] == "query" {
            out.push((
                format!("variable {}", v["name"]),
                v["definition"].as_str().unwrap().to_string(),
            ));
        }
    }
    out
}

/// Grafana's variables as Grafana would expand them for "All services, last hour".
fn expand(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m")
        .replace("$__range", "1h")
        .replace("$service", ".*")
}

/// Checks that process `pid` runs with exactly the unit's capabilities, no new privileges and
/// a read-only root.
fn assert_confined(pid: u32) {
    let unit = std::fs::read_to_string(repo().join("packaging/understudy.service")).unwrap();
    let caps = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit sets CapabilityBoundingSet");
    let mask = caps.split_whitespace().fold(0u64, |m, c| {
        let bit = match c {
            "CAP_CHOWN" => 0,
            "CAP_DAC_OVERRIDE" => 1,
            "CAP_DAC_READ_SEARCH" => 2,
            "CAP_FOWNER" => 3,
            "CAP_KILL" => 5,
            "CAP_NET_BIND_SERVICE" => 10,
            "CAP_NET_ADMIN" => 12,
            "CAP_NET_RAW" => 13,
            "CAP_SYS_PTRACE" => 19,
            "CAP_SYS_ADMIN" => 21,
            "CAP_SYS_RESOURCE" => 24,
            other => panic!("add {other} to this table"),
        };
        m | 1 << bit
    });
    // The wrapper execs the daemon in place: wait until it has.
    wait_for("the confined daemon", Duration::from_secs(10), || {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
        exe.ends_with("understudy").then_some(())
    });
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(str::trim)
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(
        u64::from_str_radix(&field("CapEff:"), 16).unwrap(),
        mask,
        "{status}"
    );
    assert_eq!(field("NoNewPrivs:"), "1", "{status}");
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mounts")).unwrap();
    let root = mounts
        .lines()
        .rfind(|l| l.split_whitespace().nth(1) == Some("/"))
        .expect("a root mount");
    assert!(
        root.split_whitespace()
            .nth(3)
            .is_some_and(|o| o.split(',').any(|f| f == "ro")),
        "root is writable: {root}"
    );
}

#[test]
fn prometheus_scrapes_the_daemon_and_every_dashboard_query_returns_data() {
    require_lab();
    let name = "it-prom1";
    let _cleanup = Cleanup {
        prefixes: vec![name.to_string()],
    };
    // The daemon runs confined as the package's unit confines it: this run proves that the
    // unit leaves it what protection and a failover need.
    let daemon = DaemonProc::start_confined("prom", name, 1);
    assert_confined(daemon.child.id());
    let prom = Prometheus::start(daemon.metrics_port);
    wait_for(
        "prometheus scraping the daemon",
        Duration::from_secs(60),
        || {
            http(prom.port, "/-/ready")?;
            (prom.value(r#"up{job="understudy"}"#)? == 1.0).then_some(())
        },
    );

    let hv = hypervisor();
    start_guest(&hv, name, "10.77.0.60/24", &[]);
    daemon.wait_paused_shadows(name, 1, SHADOW_WAIT);

    // Before the failover: its counters exist at 0 (so `increase` will see it), the paused
    // shadow's memory is counted, and the profile reports its accuracy.
    let svc = format!(r#"service="{name}""#);
    wait_for(
        "scraped zero failovers, standby memory, profile accuracy",
        Duration::from_secs(120),
        || {
            let failovers = prom.value(&format!("sum(understudy_failovers_total{{{svc}}})"))?;
            let standby = prom.value(&format!("understudy_standby_memory_bytes{{{svc}}}"))?;
            let coverage = prom.value(&format!("understudy_profile_coverage_ratio{{{svc}}}"))?;
            eprintln!("failovers {failovers}, standby {standby} B, coverage {coverage}");
            (failovers == 0.0 && standby > 16.0 * 1048576.0 && coverage.is_finite()).then_some(())
        },
    );

    let (code, out, err) = daemon.cli(&["failover", name]);
    assert_eq!(code, 0, "switchover failed: {out}{err}");
    wait_for(
        "the failover in prometheus",
        Duration::from_secs(30),
        || {
            (prom.value(&format!(
                r#"sum(understudy_failovers_total{{{svc},trigger="manual",result="ok"}})"#
            ))? == 1.0)
                .then_some(())
        },
    );

    // The exposition passes promtool's checks.
    let exposition = daemon.metrics();
    let body = exposition
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .expect("HTTP answer");
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool check metrics:\n{}{}\n--- exposition ---\n{body}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    // Every query of the dashboard returns data.
    let queries = dashboard_queries();
    assert!(queries.len() >= 20, "only {} queries", queries.len());
    let mut empty = Vec::new();
    for (panel, expr) in &queries {
        if expr.starts_with("label_values(") {
            let body = http(
                prom.port,
                &format!(
                    "/api/v1/label/service/values?match[]={}",
                    percent_encode("understudy_failovers_total")
                ),
            )
            .unwrap();
            assert!(body.contains(name), "{panel}: {body}");
            continue;
        }
        let result = prom.query(&expand(expr));
        eprintln!("{panel}: {} series", result.len());
        if result.is_empty() {
            empty.push(format!("{panel}: {expr}"));
        }
    }
    assert!(
        empty.is_empty(),
        "queries without data:\n{}",
        empty.join("\n")
    );
    // And the numbers are the run's: one failover, and a resume step that took time.
    let failovers = prom.value(&expand(&queries[0].1)).expect("failover count");
    assert!(
        (0.9..1.5).contains(&failovers),
        "{}: {failovers}",
        queries[0].0
    );
    let resume = prom
        .value(
            "sum(understudy_failover_step_seconds_sum{step=\"resume\"}) / sum(understudy_failover_step_seconds_count{step=\"resume\"})",
        )
        .expect("resume step");
    assert!(resume > 0.0, "resume took {resume} s");
}

/// `understudy events --follow --json` against `daemon`, its lines collected by a thread.
struct Follower {
    child: Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Follower {
    fn start(daemon: &DaemonProc, service: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_understudy"))
            .arg("--socket")
            .arg(&daemon.socket)
            .args(["events", service, "--follow", "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run understudy events --follow");
        let out = child.stdout.take().unwrap();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Follower { child, lines }
    }

    /// Every line so far, each parsed as JSON (a line that does not parse fails the test).
    fn events(&self) -> Vec<Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The SVG file parsed as XML: its text contents (trimmed) and how many elements of `name`.
fn svg_file(path: &Path, name: &str) -> (Vec<String>, Vec<xot::Node>, xot::Xot) {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut xot = xot::Xot::new();
    let doc = xot
        .parse(&text)
        .unwrap_or_else(|e| panic!("{} is not XML: {e}", path.display()));
    let root = xot.document_element(doc).unwrap();
    assert_eq!(xot.local_name_str(xot.element(root).unwrap().name()), "svg");
    let mut texts = Vec::new();
    let mut found = Vec::new();
    for n in xot.descendants(root) {
        if let Some(t) = xot.text_str(n) {
            if !t.trim().is_empty() {
                texts.push(t.trim().to_string());
            }
        }
        if let Some(e) = xot.element(n) {
            if xot.local_name_str(e.name()) == name {
                found.push(n);
            }
        }
    }
    (texts, found, xot)
}

fn kill_qemu(name: &str) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(qemu_pid(name)),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("SIGKILL qemu");
}

#[test]
fn events_plots_progress_and_profile_save() {
    require_lab();
    let name = "it-ops1";
    let _cleanup = Cleanup {
        prefixes: vec![name.to_string()],
    };
    let daemon = DaemonProc::start("events", name, 1);
    let follower = Follower::start(&daemon, name);
    let hv = hypervisor();
    start_guest(&hv, name, "10.77.0.61/24", &[]);
    daemon.wait_paused_shadows(name, 1, SHADOW_WAIT);
    let dir = daemon.dir.clone();

    // A first profile version at once, reason manual, listed by history.
    let history = |d: &DaemonProc| -> Vec<Value> {
        let (code, out, err) = d.cli(&["profile", "history", name, "--json"]);
        assert_eq!(code, 0, "{err}");
        let v: Value = serde_json::from_str(&out).unwrap();
        v["versions"].as_array().cloned().unwrap_or_default()
    };
    let (code, out, err) = daemon.cli(&["profile", "save", name, "--json"]);
    assert_eq!(code, 0, "profile save: {out}{err}");
    let first: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(first["reason"]["kind"], "manual", "{first}");
    let v1 = first["version"].as_u64().unwrap();
    assert!(history(&daemon)
        .iter()
        .any(|v| v["version"] == v1 && v["reason"]["kind"] == "manual"));

    // Observed use against the predicted envelope: both series per resource, every point.
    std::thread::sleep(Duration::from_secs(15));
    let plot = dir.join("profile.svg");
    let (code, out, err) = daemon.cli(&[
        "profile",
        "plot",
        name,
        "--svg",
        plot.to_str().unwrap(),
        "--since",
        "10m",
    ]);
    assert_eq!(code, 0, "profile plot: {out}{err}");
    let observations: usize = out
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .expect("the observation count");
    assert!(observations >= 10, "{out}");
    let (texts, polylines, xot) = svg_file(&plot, "polyline");
    for t in [
        "CPU: observed and predicted limit",
        "Memory: observed and predicted limit",
        "observed",
        "predicted limit",
    ] {
        assert!(texts.iter().any(|x| x == t), "no {t:?} in {texts:?}");
    }
    let points_of = |n: xot::Node| {
        xot.name("points")
            .and_then(|id| xot.get_attribute(n, id))
            .map_or(0, |v| v.split_whitespace().count())
    };
    let full = polylines
        .iter()
        .filter(|n| points_of(**n) >= observations)
        .count();
    assert!(
        full >= 2,
        "observed CPU and memory lines hold every observation: {full}"
    );

    // A second version later, then rollback to the first: stored as a new version whose
    // profile is the first one's.
    let (code, out, err) = daemon.cli(&["profile", "save", name, "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let v2: Value = serde_json::from_str(&out).unwrap();
    assert!(v2["version"].as_u64().unwrap() > v1);
    let (code, out, err) = daemon.cli(&["profile", "rollback", name, "--to", &v1.to_string()]);
    assert_eq!(code, 0, "rollback: {out}{err}");
    let versions = history(&daemon);
    let last = versions.last().unwrap();
    assert_eq!(last["reason"]["kind"], "rollback", "{versions:?}");
    assert_eq!(last["reason"]["to"], v1, "{versions:?}");
    let v3 = last["version"].as_u64().unwrap();
    let (code, out, err) = daemon.cli(&[
        "profile",
        "diff",
        name,
        &v1.to_string(),
        &v3.to_string(),
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let diff: Value = serde_json::from_str(&out).unwrap();
    let changed: Vec<&String> = diff
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, v)| v.as_array().is_some_and(|a| !a.is_empty()))
        .map(|(k, _)| k)
        .collect();
    assert!(
        changed.is_empty(),
        "v{v3} differs from v{v1} in {changed:?}: {diff}"
    );

    // A crash: the follower sees the failover, its steps in pipeline order, the fencing, the
    // outcome; every line parses as JSON.
    let primary = daemon.service(name).unwrap()["active"]
        .as_str()
        .unwrap()
        .to_string();
    kill_qemu(&primary);
    let finished = wait_for(
        "failover_finished in the event stream",
        Duration::from_secs(60),
        || {
            let ev = follower.events();
            ev.iter()
                .any(|e| e["kind"] == "failover_finished")
                .then_some(ev)
        },
    );
    let kinds: Vec<&str> = finished.iter().filter_map(|e| e["kind"].as_str()).collect();
    eprintln!("events: {kinds:?}");
    let at = |k: &str| {
        kinds
            .iter()
            .position(|x| *x == k)
            .unwrap_or_else(|| panic!("no {k} in {kinds:?}"))
    };
    assert!(at("protected") < at("shadow_ready"));
    assert!(at("shadow_ready") < at("failover_started"));
    let steps: Vec<&str> = finished
        .iter()
        .filter(|e| e["kind"] == "failover_step")
        .filter_map(|e| e["step"].as_str())
        .collect();
    let record = daemon.service(name).unwrap()["last_failover"].clone();
    let recorded: Vec<&str> = record["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(steps, recorded, "steps in the stream vs the record");
    let order = [
        "fence",
        "claim",
        "resume",
        "rewire",
        "link_up",
        "announce",
        "metadata",
        "apply_profile",
    ];
    let ranks: Vec<usize> = steps
        .iter()
        .map(|s| order.iter().position(|o| o == s).unwrap())
        .collect();
    assert!(
        ranks.windows(2).all(|w| w[0] < w[1]),
        "steps out of order: {steps:?}"
    );
    assert!(
        steps.starts_with(&["fence", "claim", "resume", "rewire"]),
        "{steps:?}"
    );
    assert!(at("failover_started") < at("failover_step"));
    assert!(at("fenced") > at("failover_step") && at("fenced") < at("failover_finished"));
    let end = finished
        .iter()
        .find(|e| e["kind"] == "failover_finished")
        .unwrap();
    assert_eq!(end["ok"], true, "{end}");
    assert_eq!(end["from"], primary.as_str());
    let seqs: Vec<u64> = finished.iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");

    // A late reader sees the recent past, the failover included.
    let (code, out, err) = daemon.cli(&["events", "--json"]);
    assert_eq!(code, 0, "{err}");
    let late: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(late
        .iter()
        .any(|e| e["kind"] == "failover_finished" && e["service"] == name));
    let (code, text, _) = daemon.cli(&["events", name]);
    assert_eq!(code, 0);
    assert!(
        text.contains("failover_step") && text.contains(" resume "),
        "{text}"
    );

    // The failover's timeline: a bar per step, each named.
    let timeline = dir.join("timeline.svg");
    let (code, out, err) = daemon.cli(&[
        "failover",
        "timeline",
        name,
        "--svg",
        timeline.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "failover timeline: {out}{err}");
    let (texts, rects, _) = svg_file(&timeline, "rect");
    assert_eq!(
        rects.len(),
        1 + recorded.len(),
        "background and one bar per step"
    );
    for s in &recorded {
        assert!(
            texts.iter().any(|t| t == s),
            "no bar label {s} in {texts:?}"
        );
    }
    assert!(
        texts.iter().any(|t| t.starts_with("restored at ")),
        "{texts:?}"
    );

    // Waiting with progress: plain lines when not a terminal, then protected again.
    daemon.wait_paused_shadows(name, 1, SHADOW_WAIT);
    let (code, out, err) = daemon.cli(&["shadow", "rebuild", name, "--wait", "--timeout", "4m"]);
    assert_eq!(code, 0, "rebuild --wait: {out}{err}");
    assert!(out.contains("new ones are being provisioned"), "{out}");
    let progress: Vec<&str> = err.lines().collect();
    assert!(progress.iter().any(|l| l.contains("booting")), "{err}");
    assert!(
        progress
            .last()
            .is_some_and(|l| l.contains(": protected; 1/1 shadows paused")),
        "{err}"
    );
    let (code, _, err) = daemon.cli(&["shadow", "rebuild", name, "--wait", "--timeout", "1s"]);
    assert_eq!(code, 3, "a wait past its timeout exits 3: {err}");
    assert!(err.contains("still not protected after 1s"), "{err}");
    // Unknown services are clear errors.
    let (code, _, err) = daemon.cli(&["profile", "save", "no-such-service"]);
    assert_eq!(code, 1);
    assert!(err.contains("no-such-service"), "{err}");
}
