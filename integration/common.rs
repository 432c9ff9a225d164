//! Shared helpers for tests against the real lab: libvirtd in the `understudy-lab` network
//! namespace, guests built by `make images`, and the real `understudy` binary.
//!
//! These tests must run inside the lab namespace (`make test` does that). Outside it they
//! fail with a message saying so: a test that silently skips would prove nothing.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use understudy::domain_xml::DomainXml;
use understudy::libvirt::{EventLoop, Hypervisor};

pub const URI: &str = "qemu:///system";

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Panics with a clear message unless we run inside the lab.
pub fn require_lab() {
    let ns = Command::new("ip")
        .args(["netns", "identify", &std::process::id().to_string()])
        .output();
    let inside = ns
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "understudy-lab")
        .unwrap_or(false);
    assert!(
        inside,
        "integration tests need the lab: run them with `make test` (inside the understudy-lab namespace)"
    );
    assert!(
        repo().join("build/guest/initramfs.cpio.gz").exists(),
        "the lab guest image is missing: run `make images`"
    );
}

pub fn hypervisor() -> Hypervisor {
    let events = EventLoop::start().expect("libvirt event loop");
    Hypervisor::open(&events, URI, 5, 3).expect("connect to the lab libvirtd")
}

/// Domain XML of a lab guest from the lab's own script.
pub fn guest_xml(name: &str, ip_prefix: &str, extra: &[&str]) -> String {
    // The guest's console log goes to build/lab/; libvirt does not create the directory.
    std::fs::create_dir_all(repo().join("build/lab")).unwrap();
    let out = Command::new(repo().join("scripts/lab-guest.sh"))
        .arg("xml")
        .arg(name)
        .arg(ip_prefix)
        .args(extra)
        .output()
        .expect("run scripts/lab-guest.sh");
    assert!(
        out.status.success(),
        "lab-guest.sh xml failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Removes every domain whose name starts with `prefix` (guest and its shadows), and its
/// overlay files, when dropped — also when the test fails.
pub struct Cleanup {
    pub prefixes: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        // Never panic here: a panic while unwinding aborts the whole test binary.
        let Ok(events) = EventLoop::start() else {
            return;
        };
        let Ok(hv) = Hypervisor::open(&events, URI, 5, 3) else {
            return;
        };
        if let Ok(list) = hv.list() {
            for d in list {
                if self
                    .prefixes
                    .iter()
                    .any(|p| d.name == *p || d.name.starts_with(&format!("{p}-shadow-")))
                {
                    let _ = hv.destroy(&d.name);
                    let _ = hv.undefine(&d.name);
                }
            }
        }
    }
}

/// Defines and starts a lab guest; returns its name.
pub fn start_guest(hv: &Hypervisor, name: &str, ip_prefix: &str, extra: &[&str]) -> String {
    let xml = guest_xml(name, ip_prefix, extra);
    let n = hv.define(&xml).expect("define guest");
    hv.start(&n, false).expect("start guest");
    n
}

/// Polls `f` until it returns Some or `limit` passes.
pub fn wait_for<T>(what: &str, limit: Duration, f: impl FnMut() -> Option<T>) -> T {
    wait_for_every(what, limit, Duration::from_millis(200), f)
}

/// [`wait_for`], polling every `every`: recovery times are measured with a short period.
pub fn wait_for_every<T>(
    what: &str,
    limit: Duration,
    every: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(every);
    }
}

/// Poll period when a recovery is timed.
pub const RECOVERY_POLL: Duration = Duration::from_millis(20);

/// Reports how long a service took to recover from an injected fault, as one line that
/// `scripts/soak-faults.sh` collects (run the tests with `--nocapture` to see it):
/// `understudy-recovery test=<test> fault=<fault> client_ms=<ms> daemon_outage_ms=<ms|->`.
/// `client` is measured by the test as a client sees it (from the fault to the service
/// answering again, to within [`RECOVERY_POLL`]); `daemon_outage_ms` is the daemon's own
/// estimate from its failover record, when the recovery was a failover.
pub fn report_recovery(test: &str, fault: &str, client: Duration, daemon_outage_ms: Option<f64>) {
    let daemon = daemon_outage_ms.map_or("-".to_string(), |ms| format!("{ms:.1}"));
    eprintln!(
        "understudy-recovery test={test} fault={fault} client_ms={} daemon_outage_ms={daemon}",
        client.as_millis()
    );
}

pub fn agent(hv: &Hypervisor, name: &str, cmd: &str) -> Option<serde_json::Value> {
    hv.agent_command(name, cmd, Duration::from_secs(2), 1 << 20)
        .ok()
        .and_then(|r| serde_json::from_str(&r).ok())
}

pub fn wait_agent(hv: &Hypervisor, name: &str) {
    wait_for(
        &format!("guest agent of {name}"),
        Duration::from_secs(120),
        || agent(hv, name, r#"{"execute":"guest-ping"}"#),
    );
}

/// Runs `argv` in the guest; its exit code and output (stdout then stderr, lossy).
pub fn guest_output(hv: &Hypervisor, name: &str, path: &str, args: &[&str]) -> (i64, String) {
    let cmd = serde_json::json!({"execute": "guest-exec", "arguments": {"path": path, "arg": args, "capture-output": true}});
    let pid = agent(hv, name, &cmd.to_string()).expect("guest-exec answered")["return"]["pid"]
        .as_i64()
        .expect("guest pid");
    let st = wait_for("guest command exit", Duration::from_secs(30), || {
        let st = agent(
            hv,
            name,
            &serde_json::json!({"execute": "guest-exec-status", "arguments": {"pid": pid}})
                .to_string(),
        )?;
        (st["return"]["exited"] == true).then_some(st)
    });
    let text = |k: &str| {
        let data = understudy::monitor::base64::decode(st["return"][k].as_str().unwrap_or(""));
        String::from_utf8_lossy(&data.unwrap_or_default()).into_owned()
    };
    (
        st["return"]["exitcode"].as_i64().unwrap_or(-1),
        format!("{}{}", text("out-data"), text("err-data")),
    )
}

/// One HTTP GET of `/` with short timeouts; the body's first line.
pub fn http_get(ip: &str, timeout: Duration) -> Option<String> {
    let addr: SocketAddr = format!("{ip}:80").parse().ok()?;
    let mut s = TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.set_write_timeout(Some(timeout)).ok()?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: lab\r\n\r\n").ok()?;
    let mut buf = Vec::new();
    s.take(64 * 1024).read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf);
    let body = text.split("\r\n\r\n").nth(1)?;
    body.lines()
        .next()
        .map(|l| l.trim().to_string())
        .filter(|l| l.starts_with("understudy-lab-guest"))
}

/// The `uuid=` field of a guest page.
pub fn page_uuid(page: &str) -> String {
    page.split_whitespace()
        .find_map(|f| f.strip_prefix("uuid="))
        .unwrap_or_default()
        .to_string()
}

pub fn domain_uuid(hv: &Hypervisor, name: &str) -> String {
    hv.list()
        .unwrap()
        .into_iter()
        .find(|d| d.name == name)
        .map(|d| d.uuid)
        .unwrap_or_default()
}

/// A running `understudy run` with its own temp config, state dir and socket.
pub struct DaemonProc {
    pub child: Child,
    /// Command the daemon runs under (e.g. scripts/run-confined.sh); empty: none.
    pub wrapper: Vec<String>,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub metrics_port: u16,
}

static PORT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);

impl DaemonProc {
    /// Writes a config protecting `pattern` with `shadows` shadows and starts the daemon.
    pub fn start(tag: &str, pattern: &str, shadows: u32) -> Self {
        Self::start_with_env(tag, pattern, shadows, &[])
    }

    /// Like [`DaemonProc::start`], with extra environment for the daemon process.
    pub fn start_with_env(tag: &str, pattern: &str, shadows: u32, env: &[(&str, &str)]) -> Self {
        Self::start_wrapped(tag, pattern, shadows, "", env, |_| Vec::new())
    }

    /// Like [`DaemonProc::start_with_env`], with `class_extra` (TOML lines) appended to the
    /// class of the protected domains.
    pub fn start_configured(
        tag: &str,
        pattern: &str,
        shadows: u32,
        class_extra: &str,
        env: &[(&str, &str)],
    ) -> Self {
        Self::start_wrapped(tag, pattern, shadows, class_extra, env, |_| Vec::new())
    }

    /// Like [`DaemonProc::start_configured`], run on a host of the three-host lab (inside its
    /// namespaces, through scripts/lab-host-exec.sh), where `qemu:///system` is that host's
    /// own libvirtd.
    pub fn start_on_host(
        host: &str,
        tag: &str,
        pattern: &str,
        shadows: u32,
        class_extra: &str,
    ) -> Self {
        Self::start_on_host_with_env(host, tag, pattern, shadows, class_extra, &[])
    }

    /// Like [`DaemonProc::start_on_host`], with extra environment for the daemon process.
    pub fn start_on_host_with_env(
        host: &str,
        tag: &str,
        pattern: &str,
        shadows: u32,
        class_extra: &str,
        env: &[(&str, &str)],
    ) -> Self {
        let host = host.to_string();
        Self::start_wrapped(tag, pattern, shadows, class_extra, env, move |_| {
            vec![
                repo()
                    .join("scripts/lab-host-exec.sh")
                    .display()
                    .to_string(),
                host,
            ]
        })
    }

    /// Like [`DaemonProc::start`], confined as packaging/understudy.service confines it
    /// (scripts/run-confined.sh): its capabilities, no new privileges, a read-only system but
    /// for the daemon's own directory.
    pub fn start_confined(tag: &str, pattern: &str, shadows: u32) -> Self {
        Self::start_wrapped(tag, pattern, shadows, "", &[], |dir| {
            vec![
                repo().join("scripts/run-confined.sh").display().to_string(),
                "--rw".to_string(),
                dir.display().to_string(),
                "--".to_string(),
            ]
        })
    }

    fn start_wrapped(
        tag: &str,
        pattern: &str,
        shadows: u32,
        class_extra: &str,
        env: &[(&str, &str)],
        wrapper: impl FnOnce(&Path) -> Vec<String>,
    ) -> Self {
        let dir = std::env::temp_dir().join(format!("understudy-it-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let port = 19464
            + PORT.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + (std::process::id() % 500) as u16;
        let config = dir.join("understudy.toml");
        let socket = dir.join("understudy.sock");
        // Exercise the page server over loopback before the shadow is paused (see
        // configs/lab.toml), unless the caller's class options bring their own warm-up.
        let warmup = if class_extra.contains("warmup_commands") {
            ""
        } else {
            "warmup_commands = [[\"/bin/busybox\", \"sh\", \"-c\", \"for i in $(seq 30); do wget -q -O /dev/null http://127.0.0.1/; done\"]]\n"
        };
        std::fs::write(
            &config,
            format!(
                r#"[daemon]
libvirt_uri = "{URI}"
accel = "tcg"
state_dir = "{state}"
control_socket = "{socket}"
metrics_listen = "127.0.0.1:{port}"
log_level = "info,understudy=debug"

# The profile tests compare sizes with the largest usage observed: they run with 20% headroom
# over the calibrated envelope, which alone aims at the class's 95% coverage, not the maximum.
[profile]
headroom_pct = 20

[[protect]]
match = "{pattern}"
class = "default"

# Heartbeat settings are the built-in defaults on purpose: the tests and benches measure them.
[class.default]
shadows = {shadows}
shadow_boot_timeout_s = 180
{warmup}{class_extra}
"#,
                state = dir.join("state").display(),
                socket = socket.display(),
            ),
        )
        .unwrap();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let wrapper = wrapper(&dir);
        let mut d = DaemonProc {
            child: spawn_daemon(&wrapper, &config, &dir.join("daemon.log"), &env),
            wrapper,
            log: dir.join("daemon.log"),
            dir,
            config,
            socket,
            metrics_port: port,
        };
        d.wait_socket();
        d
    }

    /// Kills and restarts the daemon process with the same configuration (and no extra
    /// environment).
    pub fn restart(&mut self) {
        self.restart_with_env(&[]);
    }

    /// Kills and restarts the daemon process with the same configuration and `env`.
    pub fn restart_with_env(&mut self, env: &[(&str, &str)]) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.child.wait();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.child = spawn_daemon(&self.wrapper, &self.config, &self.log, &env);
        self.wait_socket();
    }

    /// Waits until the daemon process exits by itself (e.g. a fault injection aborted it).
    pub fn wait_exited(&mut self, limit: Duration) -> std::process::ExitStatus {
        let child = &mut self.child;
        wait_for("the daemon to exit", limit, || {
            child.try_wait().ok().flatten()
        })
    }

    fn wait_socket(&mut self) {
        let sock = self.socket.clone();
        let log = self.log.clone();
        let child = &mut self.child;
        wait_for("daemon control socket", Duration::from_secs(30), || {
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "daemon exited early ({st}); log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::os::unix::net::UnixStream::connect(&sock)
                .ok()
                .map(|_| ())
        });
    }

    /// Runs a CLI command against this daemon: (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_understudy"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run understudy CLI");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn status(&self) -> serde_json::Value {
        let (code, out, err) = self.cli(&["status", "--json"]);
        assert_eq!(code, 0, "status failed: {err}");
        serde_json::from_str(&out).expect("status --json is JSON")
    }

    /// The service entry of `status --json`.
    pub fn service(&self, name: &str) -> Option<serde_json::Value> {
        self.status()["services"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == name)
            .cloned()
    }

    /// Waits until the service has `n` paused shadows; returns their names.
    pub fn wait_paused_shadows(&self, service: &str, n: usize, limit: Duration) -> Vec<String> {
        wait_for(&format!("{n} paused shadow(s) of {service}"), limit, || {
            self.paused_shadows(service).filter(|p| p.len() == n)
        })
    }

    /// The paused shadows of `service` per `status`, or `None` if the service is not listed.
    pub fn paused_shadows(&self, service: &str) -> Option<Vec<String>> {
        let s = self.service(service)?;
        Some(
            s["shadows"]
                .as_array()?
                .iter()
                .filter(|x| x["state"] == "paused")
                .filter_map(|x| x["name"].as_str().map(str::to_string))
                .collect(),
        )
    }

    /// Like [`DaemonProc::wait_paused_shadows`], checking all along (every ~50 ms, while the
    /// shadows boot) that no more than one tap carrying the service MAC `mac` sits on the bridge.
    pub fn wait_paused_shadows_watching_bridge(
        &self,
        service: &str,
        n: usize,
        limit: Duration,
        mac: &str,
    ) -> Vec<String> {
        let deadline = std::time::Instant::now() + limit;
        let mut checks = 0u32;
        loop {
            let on_bridge = taps_with_mac_on_bridge(mac);
            assert!(
                on_bridge.len() <= 1,
                "after {checks} checks, taps carrying MAC {mac} on the bridge: {on_bridge:?}"
            );
            checks += 1;
            if let Some(paused) = self.paused_shadows(service).filter(|p| p.len() == n) {
                eprintln!("bridge checked {checks} times while shadows of {service} booted");
                return paused;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {n} paused shadow(s) of {service}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The Prometheus exposition from the daemon's metrics endpoint.
    pub fn metrics(&self) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.metrics_port)).expect("metrics endpoint");
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn spawn_daemon(wrapper: &[String], config: &Path, log: &Path, env: &[(String, String)]) -> Child {
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let exe = env!("CARGO_BIN_EXE_understudy");
    let mut cmd = match wrapper.split_first() {
        Some((w, args)) => {
            let mut c = Command::new(w);
            c.args(args).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    cmd.arg("--config")
        .arg(config)
        .arg("run")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(Stdio::from(logf.try_clone().unwrap()))
        .stderr(Stdio::from(logf))
        .spawn()
        .expect("spawn understudy run")
}

impl Drop for DaemonProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- daemon log ({}) ---\n{}",
                self.log.display(),
                self.log_text()
            );
        }
    }
}

/// The QEMU pid of a running domain.
pub fn qemu_pid(name: &str) -> i32 {
    understudy::libvirt::qemu_pid(Path::new("/run/libvirt/qemu"), name).expect("qemu pid")
}

/// The (MAC, tap) pairs of a running domain.
pub fn taps(hv: &Hypervisor, name: &str) -> Vec<(String, String)> {
    let xml = hv.xml(name, false).unwrap();
    understudy::domain_xml::DomainXml::parse(&xml)
        .unwrap()
        .live_interface_taps()
}

/// The bridge a link is enslaved to, read with `ip -j link`.
pub fn master_of(link: &str) -> Option<String> {
    let out = Command::new("ip")
        .args(["-j", "link", "show", "dev", link])
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v.get(0)?.get("master")?.as_str().map(str::to_string)
}

/// Waits for the daemon process to exit by itself (e.g. after an injected abort).
pub fn wait_exit(d: &mut DaemonProc, limit: Duration) {
    wait_for("daemon exit", limit, || {
        d.child.try_wait().ok().flatten().map(|_| ())
    });
}

/// MACs on the lab bridge and the ports they were learned on (`bridge -j fdb`).
pub fn fdb_ports_of(mac: &str) -> Vec<String> {
    let out = Command::new("bridge")
        .args(["-j", "fdb", "show", "br", "usbr0"])
        .output()
        .expect("bridge fdb");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let mut ports: Vec<String> = v
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|e| {
                    e["mac"]
                        .as_str()
                        .is_some_and(|m| m.eq_ignore_ascii_case(mac))
                })
                .filter(|e| e["state"].as_str() != Some("permanent"))
                .filter_map(|e| e["ifname"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    ports.sort();
    ports.dedup();
    ports
}

/// Asserts that exactly one guest answers on `ip` (several requests, one uuid) and that it
/// is `uuid`; and that the service MAC sits on at most one bridge port.
pub fn assert_single_server(ip: &str, uuid: &str, mac: &str) {
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        if let Some(p) = http_get(ip, Duration::from_millis(500)) {
            seen.insert(page_uuid(&p));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    assert_eq!(
        seen.len(),
        1,
        "expected exactly one server on {ip}, saw {seen:?}"
    );
    assert!(
        seen.contains(uuid),
        "{ip} is served by {seen:?}, expected {uuid}"
    );
    let ports = fdb_ports_of(mac);
    assert!(
        ports.len() <= 1,
        "MAC {mac} learned on several bridge ports: {ports:?}"
    );
    let enslaved: Vec<String> = taps_with_mac_on_bridge(mac);
    assert!(
        enslaved.len() <= 1,
        "taps carrying MAC {mac} on the bridge: {enslaved:?}"
    );
}

/// Host taps on usbr0 that belong to running domains with the given guest MAC.
pub fn taps_with_mac_on_bridge(mac: &str) -> Vec<String> {
    let hv = hypervisor();
    let mut out = Vec::new();
    for d in hv.list().unwrap_or_default() {
        if !d.state.is_active() {
            continue;
        }
        // A domain may vanish between the listing and this read (a shadow being replaced).
        let Ok(xml) = hv.xml(&d.name, false) else {
            continue;
        };
        let Ok(parsed) = understudy::domain_xml::DomainXml::parse(&xml) else {
            continue;
        };
        for (m, tap) in parsed.live_interface_taps() {
            if m.eq_ignore_ascii_case(mac) && master_of(&tap).as_deref() == Some("usbr0") {
                out.push(format!("{}:{tap}", d.name));
            }
        }
    }
    out
}

/// The `p` quantile (0..=1) of `v`, nearest rank (NaN when empty).
pub fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if s.is_empty() {
        return f64::NAN;
    }
    s[((p * (s.len() - 1) as f64).round() as usize).min(s.len() - 1)]
}

/// Median, p95 and max of `v` (NaN when empty).
pub fn stats(v: &[f64]) -> (f64, f64, f64) {
    (percentile(v, 0.5), percentile(v, 0.95), percentile(v, 1.0))
}

/// A plain SVG chart: one dot per trial, per method, on a log-scale y axis.
pub fn outage_svg(series: &[(&str, &Vec<f64>)]) -> String {
    let (w, h, left, top, bottom) = (720.0, 420.0, 70.0, 30.0, 60.0);
    let max = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .fold(10.0_f64, f64::max)
        * 1.5;
    let min = 1.0_f64;
    let y = |ms: f64| {
        top + (h - top - bottom) * (1.0 - (ms.max(min).ln() - min.ln()) / (max.ln() - min.ln()))
    };
    let colors = ["#1b9e77", "#66a61e", "#d95f02", "#7570b3"];
    let mut s = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='12'>\n<rect width='100%' height='100%' fill='white'/>\n<text x='{left}' y='18' font-size='14'>Client-observed outage per trial (ms, log scale)</text>\n"
    );
    let mut tick = 1.0;
    while tick <= max {
        let ty = y(tick);
        s += &format!("<line x1='{left}' x2='{}' y1='{ty:.1}' y2='{ty:.1}' stroke='#ddd'/><text x='{}' y='{:.1}' text-anchor='end'>{tick}</text>\n", w - 20.0, left - 6.0, ty + 4.0);
        tick *= 10.0;
    }
    let group_w = (w - left - 20.0) / series.len() as f64;
    for (gi, (label, values)) in series.iter().enumerate() {
        let gx = left + group_w * gi as f64;
        s += &format!(
            "<text x='{:.1}' y='{:.1}' text-anchor='middle'>{label} (n={})</text>\n",
            gx + group_w / 2.0,
            h - bottom + 20.0,
            values.len()
        );
        for (i, v) in values.iter().enumerate() {
            let x = gx + 10.0 + (group_w - 20.0) * (i as f64 + 0.5) / values.len().max(1) as f64;
            s += &format!("<circle cx='{x:.1}' cy='{:.1}' r='4' fill='{}'><title>{v:.1} ms</title></circle>\n", y(*v), colors[gi % colors.len()]);
        }
    }
    s + "</svg>\n"
}

// ---- the ledger guest (images/httpd.c): a stateful service on a data disk ----

/// The lab class settings that hand the ledger's disk over (as configs/lab.toml does).
pub const DATA_CLASS: &str = r#"disk_roles = { vdb = "data", sdb = "data" }
promote_commands = [["/bin/us-data", "mount"]]
promote_command_timeout_ms = 15000
"#;

/// One HTTP/1.0 request; the status code and body, or None if nobody answered in time.
fn http(ip: &str, method: &str, path: &str, timeout: Duration) -> Option<(u16, String)> {
    let addr: SocketAddr = format!("{ip}:80").parse().unwrap();
    let mut s = TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.set_write_timeout(Some(timeout)).ok()?;
    s.write_all(format!("{method} {path} HTTP/1.0\r\nHost: {ip}\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((code, body))
}

pub fn append(ip: &str, key: &str) -> bool {
    matches!(
        http(
            ip,
            "POST",
            &format!("/append?key={key}"),
            Duration::from_millis(500)
        ),
        Some((200, _))
    )
}

pub fn ledger(ip: &str) -> Option<Vec<String>> {
    match http(ip, "GET", "/ledger", Duration::from_secs(2))? {
        (200, body) => Some(body.lines().map(str::to_string).collect()),
        _ => None,
    }
}

/// A client appending a new key every 10 ms, keeping the acknowledged ones.
pub struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    pub fn start(ip: &str, prefix: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let (s, a, ip, prefix) = (
            stop.clone(),
            acked.clone(),
            ip.to_string(),
            prefix.to_string(),
        );
        let thread = std::thread::spawn(move || {
            let mut n = 0u64;
            while !s.load(Ordering::SeqCst) {
                let key = format!("{prefix}-{n}");
                n += 1;
                if append(&ip, &key) {
                    a.lock().unwrap().push(key);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Writer {
            stop,
            acked,
            thread: Some(thread),
        }
    }

    pub fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    pub fn finish(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.acked.lock().unwrap().clone()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Running domains whose live definition has a disk on `source` (a path, or an NBD export's
/// `nbd:<name>`).
pub fn holders(hv: &Hypervisor, source: &str) -> Vec<String> {
    let mut out = Vec::new();
    for d in hv.list().unwrap() {
        if !d.state.is_active() {
            continue;
        }
        let Ok(xml) = hv.xml(&d.name, false) else {
            continue;
        };
        let dom = DomainXml::parse(&xml).unwrap();
        if dom
            .disks()
            .iter()
            .any(|disk| disk.source.as_deref() == Some(source))
        {
            out.push(d.name);
        }
    }
    out
}
