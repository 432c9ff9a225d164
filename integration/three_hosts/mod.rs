//! Tests on the three-host lab (`make lab-up HOSTS=3`, README "Three-host lab"): hosts h1, h2
//! and h3, each with its own libvirtd (qemu+tcp on the management network), virtlockd on the
//! shared lockspace and etcd member; a switch joining their service bridges; a test client.
//!
//! Every test of this tree runs in the test client's namespace (`understudy-client`: 10.77.0.1
//! on the switch, 10.78.0.254 on the management network), and only there:
//! `HOSTS=3 scripts/lab-run.sh scripts/lab-exec.sh cargo test --offline --test lab --
//! --test-threads=1 three_hosts::` (`make test` runs them so, after the one-host tests, which
//! skip `three_hosts::`). Put a new three-host test in a module below this one.
//!
//! The helpers here read the lab from `/run/understudy-lab/cluster.env` (written by
//! scripts/lab-cluster-up.sh) and drive its scripts: `lab-host-exec.sh` (a command on a host),
//! `lab-cut.sh` (cut a host off the management network or the switch) and `fence_lab` (power a
//! host off and on).

#![allow(dead_code)]

pub mod crosshost;
pub mod hostloss;
mod lab;
mod resilience;

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use understudy::libvirt::Hypervisor;

use crate::common::repo;

/// Where scripts/lab-cluster-up.sh describes the lab.
pub const CLUSTER_ENV: &str = "/run/understudy-lab/cluster.env";

/// The three-host lab as `cluster.env` describes it.
pub struct Cluster {
    env: BTreeMap<String, String>,
}

impl Cluster {
    /// Reads the lab; panics with a clear message unless the three-host lab is up and this test
    /// runs in its client namespace (a test that skipped would prove nothing).
    pub fn require() -> Cluster {
        let ns = Command::new("ip")
            .args(["netns", "identify", &std::process::id().to_string()])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        assert_eq!(
            ns, "understudy-client",
            "three-host tests run in the three-host lab's client namespace: \
             HOSTS=3 scripts/lab-run.sh scripts/lab-exec.sh cargo test --offline --test lab -- \
             --test-threads=1 three_hosts::"
        );
        let text = std::fs::read_to_string(CLUSTER_ENV)
            .unwrap_or_else(|e| panic!("{CLUSTER_ENV}: {e}: is the three-host lab up?"));
        let env = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let cluster = Cluster { env };
        assert_eq!(
            cluster.hosts(),
            ["h1", "h2", "h3"],
            "these tests need three hosts"
        );
        assert!(
            repo().join("build/guest/initramfs.cpio.gz").exists(),
            "the lab guest image is missing: run `make images`"
        );
        cluster
    }

    /// A value of `cluster.env`; panics when the key is missing.
    pub fn get(&self, key: &str) -> &str {
        self.env
            .get(key)
            .unwrap_or_else(|| panic!("{CLUSTER_ENV} has no {key}"))
    }

    /// A value of one host's, e.g. `host("h2", "MGMT_ADDR")` reads `H2_MGMT_ADDR`.
    pub fn host(&self, host: &str, key: &str) -> &str {
        self.get(&format!("{}_{key}", host.to_uppercase()))
    }

    pub fn hosts(&self) -> Vec<&str> {
        self.get("LAB_HOSTS").split(',').collect()
    }

    /// `qemu+tcp://<management address>/system` of a host.
    pub fn libvirt_uri(&self, host: &str) -> &str {
        self.host(host, "LIBVIRT_URI")
    }

    /// A connection to a host's libvirtd over TCP, for a few calls (no events).
    pub fn hypervisor(&self, host: &str) -> Hypervisor {
        Hypervisor::open_oneshot(self.libvirt_uri(host))
            .unwrap_or_else(|e| panic!("connect to {host}'s libvirtd: {e}"))
    }

    pub fn etcd_endpoints(&self) -> &str {
        self.get("ETCD_ENDPOINTS")
    }

    /// The shared storage's directory for guests' disks (the same path on every host).
    pub fn shared_disks(&self) -> PathBuf {
        PathBuf::from(self.get("LAB_SHARED_DISKS"))
    }

    /// The switch port behind which the switch has learned `mac`, if it has.
    pub fn switch_port_of(&self, mac: &str) -> Option<String> {
        let out = run(Command::new("ip").args([
            "netns",
            "exec",
            self.get("LAB_SWITCH_NS"),
            "bridge",
            "fdb",
            "show",
            "br",
            self.get("LAB_SWITCH_BRIDGE"),
        ]));
        assert!(out.status.success(), "bridge fdb: {}", text(&out.stderr));
        switch_port_in_fdb(&text(&out.stdout), mac)
    }

    /// The host whose etcd member leads etcd now, as the members answering say.
    pub fn etcd_leader(&self) -> Option<String> {
        self.hosts().into_iter().find_map(|h| {
            let out = run(Command::new("etcdctl").args([
                &format!("--endpoints={}", self.host(h, "ETCD_ENDPOINT")),
                "--dial-timeout=1s",
                "--command-timeout=2s",
                "endpoint",
                "status",
                "-w",
                "json",
            ]));
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            let status = &v.get(0)?["Status"];
            let me = status["header"]["member_id"].as_u64()?;
            (status["leader"].as_u64()? == me).then(|| h.to_string())
        })
    }

    /// How many etcd members answer `endpoint health` as healthy.
    pub fn etcd_healthy(&self) -> usize {
        let out = run(Command::new("etcdctl").args([
            &format!("--endpoints={}", self.etcd_endpoints()),
            "--dial-timeout=1s",
            "--command-timeout=2s",
            "endpoint",
            "health",
        ]));
        // Healthy endpoints are reported on stdout, the others on stderr.
        let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
        all.lines().filter(|l| l.contains(" is healthy")).count()
    }
}

/// The port of `mac` in `bridge fdb show` output (dynamic entries only).
pub fn switch_port_in_fdb(fdb: &str, mac: &str) -> Option<String> {
    fdb.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        let entry_mac = words.next()?;
        if !entry_mac.eq_ignore_ascii_case(mac) || line.contains("permanent") {
            return None;
        }
        let mut words = line.split_whitespace();
        words.find(|w| *w == "dev")?;
        words.next().map(str::to_string)
    })
}

/// A formatted data disk (scripts/lab-data.sh) on the shared storage; its path.
pub fn data_disk(cluster: &Cluster, file: &str) -> String {
    let path = cluster.shared_disks().join(file);
    let path = path.to_str().unwrap().to_string();
    let out = run(Command::new(repo().join("scripts/lab-data.sh")).args(["file", &path]));
    assert!(out.status.success(), "lab-data.sh: {}", text(&out.stderr));
    path
}

/// Runs a command on a lab host (scripts/lab-host-exec.sh).
pub fn host_exec(host: &str, args: &[&str]) -> Output {
    run(Command::new(repo().join("scripts/lab-host-exec.sh"))
        .arg(host)
        .args(args))
}

/// Runs the lab's fence agent with arguments (or, with `stdin`, options on its input); its
/// exit status and stdout.
pub fn fence_lab(args: &[&str], stdin: Option<&str>) -> (i32, String) {
    use std::io::Write;
    let mut child = Command::new(repo().join("scripts/fence_lab"))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run scripts/fence_lab");
    let mut input = child.stdin.take().unwrap();
    input
        .write_all(stdin.unwrap_or("").as_bytes())
        .expect("write fence_lab's stdin");
    drop(input);
    let out = child.wait_with_output().expect("wait for fence_lab");
    eprintln!(
        "fence_lab {args:?}: {:?} {} {}",
        out.status,
        text(&out.stdout).trim(),
        text(&out.stderr).trim()
    );
    (out.status.code().unwrap_or(-1), text(&out.stdout))
}

/// Cuts a host off a network or reconnects it (scripts/lab-cut.sh): `net` is `mgmt` or
/// `switch`, `state` `down` or `up`.
pub fn lab_cut(host: &str, net: &str, state: &str) {
    let out = run(Command::new(repo().join("scripts/lab-cut.sh")).args([host, net, state]));
    assert!(
        out.status.success(),
        "lab-cut.sh {host} {net} {state}: {}",
        text(&out.stderr)
    );
}

/// Whether `addr` answers at the IP level within `timeout`: a TCP connection that is accepted
/// or refused (a closed port answers with a reset) says yes, a timeout or no route says no.
pub fn reachable(addr: &str, timeout: Duration) -> bool {
    let addr: SocketAddr = addr.parse().expect("socket address");
    match TcpStream::connect_timeout(&addr, timeout) {
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionRefused,
    }
}

/// The pids in a network namespace (`ip netns pids`).
pub fn netns_pids(ns: &str) -> Vec<u32> {
    let out = run(Command::new("ip").args(["netns", "pids", ns]));
    text(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// A lab guest's MAC as scripts/lab-guest.sh derives it from its name.
pub fn guest_mac(name: &str) -> String {
    let out = run(Command::new("sh")
        .arg("-c")
        .arg("printf '%s' \"$1\" | md5sum | sed -E 's/^(..)(..)(..).*/52:54:00:\\1:\\2:\\3/'")
        .arg("sh")
        .arg(name));
    text(&out.stdout).trim().to_string()
}

/// Destroys and undefines the named domains on every host when dropped (also when the test
/// fails); hosts that do not answer (powered off) are skipped.
pub struct ClusterCleanup {
    pub uris: Vec<String>,
    pub names: Vec<String>,
}

impl ClusterCleanup {
    pub fn new(cluster: &Cluster, names: &[&str]) -> Self {
        ClusterCleanup {
            uris: cluster
                .hosts()
                .iter()
                .map(|h| cluster.libvirt_uri(h).to_string())
                .collect(),
            names: names.iter().map(|n| n.to_string()).collect(),
        }
    }
}

impl Drop for ClusterCleanup {
    fn drop(&mut self) {
        // Never panic here: a panic while unwinding aborts the whole test binary.
        for uri in &self.uris {
            let Ok(hv) = Hypervisor::open_oneshot(uri) else {
                continue;
            };
            for name in &self.names {
                let _ = hv.destroy(name);
                let _ = hv.undefine(name);
            }
        }
    }
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("run {:?}: {e}", cmd.get_program()))
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn fdb_port_parsing() {
    let fdb = "02:75:73:00:03:01 dev up-client master swbr0 \n\
               52:54:00:a5:11:82 dev up-h2 master swbr0 \n\
               52:54:00:a5:11:83 dev up-h3 vlan 1 master swbr0 permanent\n";
    assert_eq!(
        switch_port_in_fdb(fdb, "52:54:00:A5:11:82").as_deref(),
        Some("up-h2")
    );
    assert_eq!(switch_port_in_fdb(fdb, "52:54:00:a5:11:83"), None);
    assert_eq!(switch_port_in_fdb(fdb, "52:54:00:a5:11:8"), None);
}
