//! A real etcd (Debian's /usr/bin/etcd) for tests: one member, or a cluster of several, on
//! 127.0.0.1 with free ports and temporary data directories. A test can stop, kill and start
//! again the whole of it or one member, on the same ports and data. Needs no lab: the cluster
//! tests run it anywhere, `make test` included.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub const ETCD: &str = "/usr/bin/etcd";

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

/// An etcd cluster of one or more members.
pub struct EtcdServer {
    dir: tempfile::TempDir,
    members: Vec<Member>,
}

fn free_ports(n: usize) -> Vec<u16> {
    // Held together so that no two are the same.
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind an ephemeral port"))
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

impl EtcdServer {
    /// One member, serving.
    pub fn start() -> Self {
        Self::start_cluster(1)
    }

    /// `n` members forming one cluster, every one serving. Panics (with the logs) if it
    /// cannot.
    pub fn start_cluster(n: usize) -> Self {
        assert!(
            Path::new(ETCD).exists(),
            "{ETCD} is missing: `make deps` installs etcd-server"
        );
        // A port found free may be taken before etcd binds it: try a few sets.
        let mut last_log = String::new();
        for _ in 0..5 {
            let ports = free_ports(2 * n);
            let mut s = EtcdServer {
                dir: tempfile::Builder::new()
                    .prefix("understudy-etcd-")
                    .tempdir()
                    .expect("temporary directory"),
                members: (0..n)
                    .map(|i| Member {
                        name: format!("m{i}"),
                        client_port: ports[2 * i],
                        peer_port: ports[2 * i + 1],
                        child: None,
                    })
                    .collect(),
            };
            for i in 0..n {
                s.spawn(i);
            }
            match (0..n).try_for_each(|i| s.wait_healthy(i)) {
                Ok(()) => return s,
                Err(log) => last_log = log,
            }
        }
        panic!("etcd did not start; last log:\n{last_log}");
    }

    /// `http://127.0.0.1:<port>` of member `i`.
    pub fn endpoint_of(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.members[i].client_port)
    }

    /// The first member's endpoint.
    pub fn endpoint(&self) -> String {
        self.endpoint_of(0)
    }

    /// Every member's endpoint.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len())
            .map(|i| self.endpoint_of(i))
            .collect()
    }

    fn data_dir(&self, i: usize) -> PathBuf {
        self.dir
            .path()
            .join(format!("{}.data", self.members[i].name))
    }

    fn log_path(&self, i: usize) -> PathBuf {
        self.dir
            .path()
            .join(format!("{}.log", self.members[i].name))
    }

    /// Every member's log so far.
    pub fn log(&self) -> String {
        (0..self.members.len())
            .map(|i| {
                format!(
                    "--- {} ---\n{}",
                    self.members[i].name,
                    std::fs::read_to_string(self.log_path(i)).unwrap_or_default()
                )
            })
            .collect()
    }

    fn spawn(&mut self, i: usize) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(i))
            .expect("etcd log file");
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect();
        let m = &self.members[i];
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let child = Command::new(ETCD)
            .args(["--name", &m.name, "--data-dir"])
            .arg(self.data_dir(i))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-token", "understudy-test"])
            // Short raft timings: leases of 2 s are granted as asked (LAB-NOTES).
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            // Lets a test write an oversized value to see it refused on read.
            .args(["--max-request-bytes", "4194304"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        self.members[i].child = Some(child);
    }

    fn wait_healthy(&mut self, i: usize) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let exited = self.members[i]
                .child
                .as_mut()
                .map(|c| c.try_wait().unwrap());
            if let Some(Some(status)) = exited {
                self.members[i].child = None;
                return Err(format!("member {i} exited with {status}\n{}", self.log()));
            }
            if self.healthy(i) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "member {i} not healthy within 30 s\n{}",
            self.log()
        ))
    }

    /// Whether member `i`'s `/health` answers `"health":"true"` (it has a leader).
    pub fn healthy(&self, i: usize) -> bool {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.members[i].client_port));
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(1000)));
        if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body.contains("\"health\":\"true\"")
    }

    fn signal(&mut self, i: usize, sig: Signal) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), sig);
            let _ = c.wait();
        }
    }

    /// Kills member `i` (SIGKILL), as a crash would.
    pub fn kill_member(&mut self, i: usize) {
        self.signal(i, Signal::SIGKILL);
    }

    /// Starts member `i` again on its ports and data, and waits until it serves.
    pub fn restart_member(&mut self, i: usize) {
        assert!(
            self.members[i].child.is_none(),
            "restart of a running member"
        );
        self.spawn(i);
        if let Err(log) = self.wait_healthy(i) {
            panic!("etcd member {i} did not restart:\n{log}");
        }
    }

    /// Stops every member cleanly (SIGTERM).
    pub fn stop(&mut self) {
        for i in 0..self.members.len() {
            self.signal(i, Signal::SIGTERM);
        }
    }

    /// Kills every member (SIGKILL).
    pub fn kill(&mut self) {
        for i in 0..self.members.len() {
            self.signal(i, Signal::SIGKILL);
        }
    }

    /// Starts every member again and waits until they serve.
    pub fn restart(&mut self) {
        for i in 0..self.members.len() {
            assert!(self.members[i].child.is_none(), "restart of a running etcd");
            self.spawn(i);
        }
        for i in 0..self.members.len() {
            if let Err(log) = self.wait_healthy(i) {
                panic!("etcd did not restart:\n{log}");
            }
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}
