//! A real etcd (Debian's /usr/bin/etcd) for tests: one member on 127.0.0.1 with free ports and
//! a temporary data directory, which a test can stop, kill and start again on the same ports
//! and data. Needs no lab: the cluster tests run it anywhere, `make test` included.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub const ETCD: &str = "/usr/bin/etcd";

/// One etcd member.
pub struct EtcdServer {
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .expect("bind an ephemeral port")
        .local_addr()
        .unwrap()
        .port()
}

impl EtcdServer {
    /// Starts a member and waits until it serves. Panics (with its log) if it cannot.
    pub fn start() -> Self {
        assert!(
            Path::new(ETCD).exists(),
            "{ETCD} is missing: `make deps` installs etcd-server"
        );
        // A port found free may be taken before etcd binds it: try a few pairs.
        let mut last_log = String::new();
        for _ in 0..5 {
            let mut s = EtcdServer {
                dir: tempfile::Builder::new()
                    .prefix("understudy-etcd-")
                    .tempdir()
                    .expect("temporary directory"),
                client_port: free_port(),
                peer_port: free_port(),
                child: None,
            };
            if s.client_port == s.peer_port {
                continue;
            }
            match s.spawn() {
                Ok(()) => return s,
                Err(log) => last_log = log,
            }
        }
        panic!("etcd did not start; its last log:\n{last_log}");
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn spawn(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("etcd log file");
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new(ETCD)
            .args(["--name", "t0", "--data-dir"])
            .arg(self.data_dir())
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t0={peer}")])
            // Short raft timings: leases of 2 s are granted as asked (LAB-NOTES).
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            // Lets a test write an oversized value to see it refused on read.
            .args(["--max-request-bytes", "4194304"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(format!("exited with {status}\n{}", self.log()));
            }
            if self.healthy() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
        Err(format!("not healthy within 20 s\n{}", self.log()))
    }

    /// Whether `/health` answers `"health":"true"`.
    pub fn healthy(&self) -> bool {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.client_port));
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body.contains("\"health\":\"true\"")
    }

    /// Whether the process runs.
    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }

    fn signal(&mut self, sig: Signal) {
        if let Some(mut c) = self.child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), sig);
            let _ = c.wait();
        }
    }

    /// Stops it cleanly (SIGTERM) and waits.
    pub fn stop(&mut self) {
        self.signal(Signal::SIGTERM);
    }

    /// Kills it (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        self.signal(Signal::SIGKILL);
    }

    /// Starts it again on the same ports and data.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart of a running etcd");
        if let Err(log) = self.spawn() {
            panic!("etcd did not restart:\n{log}");
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}
