//! A fake guest agent and readings shared by the collector's tests.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{json, Value};

use super::{CollectorSettings, HostReading};
use crate::config::{ClassConfig, MonitorConfig};
use crate::libvirt::DomainStats;
use crate::monitor::agent::{AgentTransport, AgentTransportError};
use crate::monitor::cgroup::{CgroupCounters, CgroupVersion};

/// A fake agent: replies by command (and by path for file reads), records what was sent.
#[derive(Default)]
pub(super) struct FakeAgent {
    /// Reply per `execute`; a file read is looked up as `guest-file-read <path>`.
    replies: Mutex<HashMap<String, VecDeque<Result<String, AgentTransportError>>>>,
    sticky: Mutex<HashMap<String, Result<String, AgentTransportError>>>,
    /// Handle -> path of open files.
    open: Mutex<HashMap<i64, String>>,
    sent: Mutex<Vec<String>>,
}

impl FakeAgent {
    pub(super) fn always(&self, key: &str, reply: Result<String, AgentTransportError>) {
        self.sticky.lock().unwrap().insert(key.to_string(), reply);
    }
    pub(super) fn file(&self, path: &str, data: &[u8]) {
        self.always(
            &format!("guest-file-read {path}"),
            Ok(json!({"return": {"count": data.len(), "buf-b64": crate::monitor::base64::encode(data), "eof": true}}).to_string()),
        );
    }
    pub(super) fn sent(&self) -> Vec<String> {
        self.sent.lock().unwrap().clone()
    }
    pub(super) fn clear_sent(&self) {
        self.sent.lock().unwrap().clear();
    }
}

impl AgentTransport for FakeAgent {
    fn command(&self, json: &str, _t: Duration) -> Result<String, AgentTransportError> {
        let v: Value = serde_json::from_str(json).unwrap();
        let exec = v["execute"].as_str().unwrap().to_string();
        let key = match exec.as_str() {
            "guest-file-open" => {
                let path = v["arguments"]["path"].as_str().unwrap().to_string();
                let key = format!("guest-file-open {path}");
                self.sent.lock().unwrap().push(key.clone());
                if let Some(r) = self.sticky.lock().unwrap().get(&key) {
                    return r.clone();
                }
                let mut open = self.open.lock().unwrap();
                let h = open.len() as i64 + 1;
                open.insert(h, path);
                return Ok(json!({ "return": h }).to_string());
            }
            "guest-file-read" => {
                let h = v["arguments"]["handle"].as_i64().unwrap();
                format!("guest-file-read {}", self.open.lock().unwrap()[&h])
            }
            "guest-file-close" => {
                self.sent.lock().unwrap().push(exec);
                return Ok(r#"{"return":{}}"#.into());
            }
            _ => exec,
        };
        self.sent.lock().unwrap().push(key.clone());
        if let Some(r) = self
            .replies
            .lock()
            .unwrap()
            .get_mut(&key)
            .and_then(|q| q.pop_front())
        {
            return r;
        }
        self.sticky
            .lock()
            .unwrap()
            .get(&key)
            .cloned()
            .unwrap_or_else(|| Err(AgentTransportError::Other(format!("no reply for {key}"))))
    }
}

pub(super) fn osinfo(kernel: &str) -> String {
    json!({"return": {"id": "debian", "name": "Debian GNU/Linux", "version-id": "12",
        "kernel-release": kernel, "kernel-version": "#1 SMP", "machine": "x86_64"}})
    .to_string()
}

pub(super) fn diskstats(vda_read_sectors: u64) -> String {
    let disk = |name: &str, minor: u32, rd: u64, wr: u64| {
        json!({"name": name, "major": 253, "minor": minor,
            "stats": {"read-sectors": rd, "write-sectors": wr}})
    };
    json!({"return": [
        disk("vda", 0, vda_read_sectors, 8),
        disk("vda1", 1, vda_read_sectors, 8),
        disk("dm-0", 2, 100, 100),
        disk("loop0", 3, 100, 100),
        disk("vdb", 16, 2, 0),
    ]})
    .to_string()
}

pub(super) fn cpustats(busy_ms: u64) -> String {
    json!({"return": [
        {"type": "linux", "cpu": 0, "user": busy_ms, "nice": 0, "system": 0, "idle": 100000},
        {"type": "linux", "cpu": 1, "user": 0, "nice": 0, "system": 0, "idle": 100000},
    ]})
    .to_string()
}

const IFACES: &str = r#"{"return":[{"name":"lo","ip-addresses":[{"ip-address-type":"ipv4","ip-address":"127.0.0.1","prefix":8}],"statistics":{"rx-bytes":1,"rx-packets":1,"rx-errs":0,"rx-dropped":0,"tx-bytes":1,"tx-packets":1,"tx-errs":0,"tx-dropped":0}},{"name":"eth0","hardware-address":"52:54:00:12:34:56","ip-addresses":[{"ip-address-type":"ipv4","ip-address":"10.77.0.40","prefix":24}],"statistics":{"rx-bytes":1000,"rx-packets":10,"rx-errs":0,"rx-dropped":0,"tx-bytes":2000,"tx-packets":20,"tx-errs":0,"tx-dropped":0}}]}"#;

/// `/proc/net/tcp`: a listener on :80, an inbound connection to it, an outbound connection
/// to 10.77.0.1:5432 (established), one to 10.77.0.9:53 closing, and a loopback one.
const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n\
   1: 28004D0A:0050 01004D0A:C350 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0\n\
   2: 28004D0A:A000 01004D0A:1538 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 100 0 0 10 0\n\
   3: 28004D0A:A001 09004D0A:0035 06 00000000:00000000 00:00000000 00000000     0        0 0 1 0 100 0 0 10 0\n\
   4: 0100007F:A002 0100007F:0CEA 01 00000000:00000000 00:00000000 00000000     0        0 4 1 0 100 0 0 10 0\n";

pub(super) fn healthy_agent() -> FakeAgent {
    let a = FakeAgent::default();
    a.always("guest-get-cpustats", Ok(cpustats(1000)));
    a.always("guest-network-get-interfaces", Ok(IFACES.into()));
    a.always("guest-get-osinfo", Ok(osinfo("6.1.0-28-amd64")));
    a.file("/proc/net/tcp", TCP.as_bytes());
    a.file("/proc/net/tcp6", b"  sl  local_address\n");
    a.file("/proc/net/udp", b"  sl  local_address\n");
    a.file("/etc/app.conf", b"workers = 4\n");
    a.always(
        "guest-file-open /etc/missing.conf",
        Ok(r#"{"error":{"class":"GenericError","desc":"No such file"}}"#.into()),
    );
    a
}

pub(super) fn settings() -> CollectorSettings {
    let class = ClassConfig {
        config_files: vec!["/etc/app.conf".into(), "/etc/missing.conf".into()],
        ..ClassConfig::default()
    };
    let mut s = CollectorSettings::new(&MonitorConfig::default(), &class);
    s.agent.exec_poll_interval = Duration::from_millis(1);
    // Host memory at once for tests without balloon statistics; sockets every tick.
    s.guest_memory_grace = 0;
    s.sockets_every = 1;
    s
}

pub(super) fn host(cpu_ns: u64, mem: u64, stats: Option<DomainStats>) -> HostReading {
    HostReading {
        cgroup: Some(CgroupCounters {
            cpu_usage_ns: Some(cpu_ns),
            mem_bytes: Some(mem),
            mem_rss_bytes: None,
            mem_cache_bytes: None,
            io_read_bytes: Some(0),
            io_write_bytes: Some(0),
            version: CgroupVersion::V2,
            missing: Vec::new(),
        }),
        stats,
        errors: Vec::new(),
    }
}

pub(super) fn balloon(total_kib: u64, avail_kib: u64) -> DomainStats {
    DomainStats {
        balloon_available_kib: Some(total_kib),
        balloon_usable_kib: Some(avail_kib),
        net_rx_bytes: Some(0),
        net_tx_bytes: Some(0),
        ..DomainStats::default()
    }
}

pub(super) const T0: u64 = 1_700_000_000_000;
