//! All libvirt FFI lives here: the connection, libvirt's event loop and its callbacks, guest
//! agent and QEMU monitor commands, the pidfd watch on a domain's QEMU process, and the hold on
//! its virtlockd connection that hands its disk leases back at its reap.
//!
//! Every call into libvirt blocks; async code reaches this module through
//! `tokio::task::spawn_blocking` (see [`Hypervisor::run`]).

mod agent;
mod events;
mod lease;
mod process;
pub mod saveimage;

pub use agent::LibvirtAgent;

pub use events::{AgentState, DomainEvent, EventLoop, LifecycleEvent};
pub use lease::{lock_connections, reaped, HandbackReport, LeaseHandbacks};
pub use process::{
    is_qemu_of, kill_qemu, qemu_pid, rss_bytes, status_files, vcpu_sched, ProcessExit, QemuProcess,
    VcpuSched, QEMU_RUN_DIR,
};

use std::sync::{Arc, Mutex};
use std::time::Duration;

use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::ErrorNumber;
use virt::sys;

/// Errors of the libvirt glue.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    /// Opening the connection to libvirtd failed (daemon not running, wrong URI, no access).
    #[error("cannot connect to libvirt at {uri}")]
    Connect {
        /// The URI we tried.
        uri: String,
        /// libvirt's own error.
        #[source]
        source: virt::error::Error,
    },
    /// The named domain does not exist on this host.
    #[error("no domain named '{name}'")]
    NoSuchDomain {
        /// The name we looked up.
        name: String,
    },
    /// A libvirt call on a domain failed.
    #[error("libvirt {op} on domain '{domain}' failed")]
    Domain {
        /// The operation (e.g. "resume").
        op: &'static str,
        /// The domain it was applied to.
        domain: String,
        /// libvirt's own error.
        #[source]
        source: virt::error::Error,
    },
    /// A libvirt call on the connection failed.
    #[error("libvirt {op} failed")]
    Connection {
        /// The operation (e.g. "list domains").
        op: &'static str,
        /// libvirt's own error.
        #[source]
        source: virt::error::Error,
    },
    /// The guest agent did not answer within the deadline.
    #[error("guest agent of '{domain}' did not answer '{command}' within {timeout_ms} ms")]
    AgentTimeout {
        /// The domain whose agent was asked.
        domain: String,
        /// The agent command ("execute" value).
        command: String,
        /// The deadline.
        timeout_ms: u64,
    },
    /// The guest agent answered with more bytes than we accept from an untrusted guest.
    #[error("guest agent of '{domain}' answered '{command}' with {len} bytes, more than the {max} allowed")]
    AgentReplyTooLarge {
        /// The domain whose agent answered.
        domain: String,
        /// The agent command.
        command: String,
        /// Reply length.
        len: usize,
        /// Our bound.
        max: usize,
    },
    /// The blocking worker thread that ran the call panicked or was cancelled.
    #[error("libvirt worker for {op} did not finish")]
    Worker {
        /// The operation.
        op: &'static str,
        /// The join error.
        #[source]
        source: tokio::task::JoinError,
    },
    /// The event loop could not be registered or a callback could not be installed.
    #[error("libvirt event setup failed: {what}")]
    Events {
        /// What we tried to set up.
        what: &'static str,
        /// libvirt's own error, where it gave one.
        #[source]
        source: Option<virt::error::Error>,
    },
    /// Reading a QEMU pid file or opening a pidfd failed.
    #[error("cannot watch the QEMU process of '{domain}'")]
    Process {
        /// The domain.
        domain: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// A domain's run state as libvirt reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// Running.
    Running,
    /// Paused by us or an operator (or for I/O error).
    Paused,
    /// Shut off (defined, not running).
    Shutoff,
    /// Crashed (only with on_crash=preserve).
    Crashed,
    /// Blocked on a resource.
    Blocked,
    /// Shutting down.
    Shutdown,
    /// Suspended by guest power management.
    Pmsuspended,
    /// libvirt does not know.
    Unknown,
}

impl RunState {
    fn from_raw(state: sys::virDomainState) -> Self {
        match state {
            sys::VIR_DOMAIN_RUNNING => RunState::Running,
            sys::VIR_DOMAIN_PAUSED => RunState::Paused,
            sys::VIR_DOMAIN_SHUTOFF => RunState::Shutoff,
            sys::VIR_DOMAIN_CRASHED => RunState::Crashed,
            sys::VIR_DOMAIN_BLOCKED => RunState::Blocked,
            sys::VIR_DOMAIN_SHUTDOWN => RunState::Shutdown,
            sys::VIR_DOMAIN_PMSUSPENDED => RunState::Pmsuspended,
            _ => RunState::Unknown,
        }
    }

    /// True when a QEMU process exists for the domain.
    pub fn is_active(self) -> bool {
        !matches!(
            self,
            RunState::Shutoff | RunState::Crashed | RunState::Unknown
        )
    }

    /// Lowercase name, as shown by `status`.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Shutoff => "shutoff",
            RunState::Crashed => "crashed",
            RunState::Blocked => "blocked",
            RunState::Shutdown => "shutdown",
            RunState::Pmsuspended => "pmsuspended",
            RunState::Unknown => "unknown",
        }
    }
}

/// One domain as seen in a listing.
#[derive(Debug, Clone)]
pub struct DomainSummary {
    /// Domain name.
    pub name: String,
    /// Domain UUID.
    pub uuid: String,
    /// Current run state.
    pub state: RunState,
    /// Whether the domain is persistent (defined) rather than transient.
    pub persistent: bool,
}

/// Bulk statistics of one domain (the subset understudy uses), from virConnectGetAllDomainStats.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DomainStats {
    /// Sum of vCPU time in nanoseconds (`cpu.time`).
    pub cpu_time_ns: Option<u64>,
    /// Current balloon size in KiB (`balloon.current`).
    pub balloon_current_kib: Option<u64>,
    /// Balloon maximum in KiB (`balloon.maximum`).
    pub balloon_max_kib: Option<u64>,
    /// Guest-reported RSS in KiB (`balloon.rss`).
    pub balloon_rss_kib: Option<u64>,
    /// Memory the guest sees, KiB (`balloon.available`: the guest's MemTotal).
    pub balloon_available_kib: Option<u64>,
    /// Memory the guest could give up without swapping, KiB (`balloon.usable`: the guest's
    /// MemAvailable).
    pub balloon_usable_kib: Option<u64>,
    /// When QEMU last received the guest's balloon statistics, seconds since the epoch
    /// (`balloon.last-update`): the figures above are as old as this.
    pub balloon_last_update_s: Option<u64>,
    /// Current vCPU count (`vcpu.current`).
    pub vcpu_current: Option<u32>,
    /// Block bytes read, summed over disks.
    pub block_rd_bytes: Option<u64>,
    /// Block bytes written, summed over disks.
    pub block_wr_bytes: Option<u64>,
    /// Network bytes received, summed over interfaces.
    pub net_rx_bytes: Option<u64>,
    /// Network bytes sent, summed over interfaces.
    pub net_tx_bytes: Option<u64>,
}

/// The host's libvirt, through one connection. Cheap to clone.
#[derive(Clone)]
pub struct Hypervisor {
    inner: Arc<Inner>,
}

struct Inner {
    conn: Connect,
    uri: String,
    /// Callback ids to deregister on drop.
    callbacks: Mutex<Vec<i32>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let ids = std::mem::take(&mut *self.callbacks.lock().unwrap_or_else(|e| e.into_inner()));
        for id in ids {
            // SAFETY: the connection pointer is valid for the life of `self.conn`; `id` was
            // returned by virConnectDomainEventRegisterAny on this connection.
            unsafe {
                sys::virConnectDomainEventDeregisterAny(self.conn.as_ptr(), id);
            }
        }
        // Dropping `conn` closes our reference.
    }
}

const AGENT_MIN_TIMEOUT_S: i32 = 1;

impl Hypervisor {
    /// Opens `uri` with libvirt keepalive (`interval` seconds, `count` misses). The
    /// [`EventLoop`] must be running first: keepalive and events depend on it.
    pub fn open(
        _events: &EventLoop,
        uri: &str,
        keepalive_interval_s: u32,
        keepalive_count: u32,
    ) -> Result<Self, LibvirtError> {
        let conn = Connect::open(Some(uri)).map_err(|source| LibvirtError::Connect {
            uri: uri.to_string(),
            source,
        })?;
        conn.set_keep_alive(keepalive_interval_s as i32, keepalive_count)
            .map_err(|source| LibvirtError::Connection {
                op: "set keepalive",
                source,
            })?;
        Ok(Hypervisor {
            inner: Arc::new(Inner {
                conn,
                uri: uri.to_string(),
                callbacks: Mutex::new(Vec::new()),
            }),
        })
    }

    /// Opens `uri` for a few one-shot calls from a command-line tool: no keepalive and no
    /// events, so no [`EventLoop`] is needed.
    pub fn open_oneshot(uri: &str) -> Result<Self, LibvirtError> {
        let conn = Connect::open(Some(uri)).map_err(|source| LibvirtError::Connect {
            uri: uri.to_string(),
            source,
        })?;
        Ok(Hypervisor {
            inner: Arc::new(Inner {
                conn,
                uri: uri.to_string(),
                callbacks: Mutex::new(Vec::new()),
            }),
        })
    }

    /// The URI this connection was opened with.
    pub fn uri(&self) -> &str {
        &self.inner.uri
    }

    /// True while libvirtd answers on this connection.
    pub fn is_alive(&self) -> bool {
        self.inner.conn.is_alive().unwrap_or(false)
    }

    /// Runs a blocking libvirt closure on tokio's blocking pool.
    pub async fn run<T, F>(&self, op: &'static str, f: F) -> Result<T, LibvirtError>
    where
        T: Send + 'static,
        F: FnOnce(&Hypervisor) -> Result<T, LibvirtError> + Send + 'static,
    {
        let hv = self.clone();
        tokio::task::spawn_blocking(move || f(&hv))
            .await
            .map_err(|source| LibvirtError::Worker { op, source })?
    }

    /// Runs any blocking closure (e.g. one mixing libvirt calls with other work and its own
    /// error type) on tokio's blocking pool; only a lost worker is a [`LibvirtError`] here.
    pub async fn blocking<T, F>(&self, op: &'static str, f: F) -> Result<T, LibvirtError>
    where
        T: Send + 'static,
        F: FnOnce(&Hypervisor) -> T + Send + 'static,
    {
        let hv = self.clone();
        tokio::task::spawn_blocking(move || f(&hv))
            .await
            .map_err(|source| LibvirtError::Worker { op, source })
    }

    /// Subscribes to lifecycle, agent-lifecycle and connection-close events; they arrive on
    /// `sink` until this connection is dropped.
    pub fn subscribe(
        &self,
        sink: tokio::sync::mpsc::UnboundedSender<DomainEvent>,
    ) -> Result<(), LibvirtError> {
        let ids = events::register(&self.inner.conn, sink)?;
        self.inner
            .callbacks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(ids);
        Ok(())
    }

    /// Looks a domain up by name.
    pub fn lookup(&self, name: &str) -> Result<Domain, LibvirtError> {
        self.inner
            .conn
            .lookup_domain_by_name(name)
            .map_err(|source| {
                if source.code().is(ErrorNumber::NoDomain) {
                    LibvirtError::NoSuchDomain {
                        name: name.to_string(),
                    }
                } else {
                    LibvirtError::Domain {
                        op: "lookup",
                        domain: name.to_string(),
                        source,
                    }
                }
            })
    }

    /// Lists every domain, running or defined.
    pub fn list(&self) -> Result<Vec<DomainSummary>, LibvirtError> {
        let doms =
            self.inner
                .conn
                .list_all_domains(0)
                .map_err(|source| LibvirtError::Connection {
                    op: "list domains",
                    source,
                })?;
        let mut out = Vec::with_capacity(doms.len());
        for d in doms {
            // A domain may vanish between listing and asking: skip it rather than fail.
            let Ok(name) = d.name() else { continue };
            let Some(state) = raw_state(&d) else { continue };
            out.push(DomainSummary {
                uuid: d.uuid_string().unwrap_or_default(),
                state,
                persistent: d.is_persistent().unwrap_or(false),
                name,
            });
        }
        Ok(out)
    }

    /// The run state of a domain.
    pub fn state(&self, name: &str) -> Result<RunState, LibvirtError> {
        let d = self.lookup(name)?;
        raw_state(&d).ok_or_else(|| dom_err("get state", name, last_error()))
    }

    /// The domain XML: live (`inactive == false`) or the persistent definition.
    pub fn xml(&self, name: &str, inactive: bool) -> Result<String, LibvirtError> {
        let d = self.lookup(name)?;
        let flags = if inactive {
            sys::VIR_DOMAIN_XML_INACTIVE
        } else {
            0
        };
        d.xml_desc(flags)
            .map_err(|source| dom_err("dumpxml", name, source))
    }

    /// Defines (persistently) a domain from XML; returns its name.
    pub fn define(&self, xml: &str) -> Result<String, LibvirtError> {
        let d =
            self.inner
                .conn
                .define_domain_xml(xml)
                .map_err(|source| LibvirtError::Connection {
                    op: "define domain",
                    source,
                })?;
        d.name().map_err(|source| LibvirtError::Connection {
            op: "read defined domain name",
            source,
        })
    }

    /// Starts a defined domain, optionally paused from the first instruction.
    pub fn start(&self, name: &str, paused: bool) -> Result<(), LibvirtError> {
        let d = self.lookup(name)?;
        let flags = if paused {
            sys::VIR_DOMAIN_START_PAUSED
        } else {
            0
        };
        d.create_with_flags(flags)
            .map_err(|source| dom_err("start", name, source))
    }

    /// Pauses a running domain.
    pub fn suspend(&self, name: &str) -> Result<(), LibvirtError> {
        let d = self.lookup(name)?;
        d.suspend()
            .map_err(|source| dom_err("suspend", name, source))
    }

    /// Resumes a paused domain.
    pub fn resume(&self, name: &str) -> Result<(), LibvirtError> {
        let d = self.lookup(name)?;
        d.resume().map_err(|source| dom_err("resume", name, source))
    }

    /// Hard-stops a domain (kills its QEMU). Succeeds if it is already off.
    pub fn destroy(&self, name: &str) -> Result<(), LibvirtError> {
        let d = self.lookup(name)?;
        match d.destroy() {
            Ok(()) => Ok(()),
            Err(e) if e.code().is(ErrorNumber::OperationInvalid) => Ok(()),
            Err(source) => Err(dom_err("destroy", name, source)),
        }
    }

    /// Saves a running domain's memory to libvirt's managed-save file and stops it; the next
    /// start restores from it.
    pub fn managed_save(&self, name: &str) -> Result<(), LibvirtError> {
        let d = self.lookup(name)?;
        d.managed_save(0)
            .map_err(|source| dom_err("managed save", name, source))
    }

    /// Writes a running domain's memory to `file` (an external memory snapshot, without
    /// snapshot metadata) and leaves it as it was: same QEMU, paused if it was paused. Its disks
    /// (`disk_targets`) are not snapshotted: a paused guest writes nothing to them. While the
    /// memory is written libvirt holds the domain's job: a resume waits until it is done.
    pub fn snapshot_memory(
        &self,
        name: &str,
        file: &str,
        disk_targets: &[String],
    ) -> Result<(), LibvirtError> {
        let d = self.lookup(name)?;
        let esc = |s: &str| {
            s.replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('\'', "&apos;")
        };
        let disks: String = disk_targets
            .iter()
            .map(|t| format!("<disk name='{}' snapshot='no'/>", esc(t)))
            .collect();
        let xml = format!(
            "<domainsnapshot><memory snapshot='external' file='{}'/><disks>{disks}</disks></domainsnapshot>",
            esc(file)
        );
        d.create_snapshot_xml(&xml, sys::VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA)
            .map(|_| ())
            .map_err(|source| dom_err("memory snapshot", name, source))
    }

    /// Restores a domain, paused, from a save image (its own XML names it; see
    /// [`saveimage`]). The domain is transient: destroying it removes it.
    pub fn restore_paused(&self, file: &str) -> Result<(), LibvirtError> {
        self.inner
            .conn
            .restore_domain_flags(file, None, sys::VIR_DOMAIN_SAVE_PAUSED)
            .map_err(|source| LibvirtError::Connection {
                op: "restore a saved domain",
                source,
            })
    }

    /// Removes a domain's definition (and managed save). Must be shut off first.
    pub fn undefine(&self, name: &str) -> Result<(), LibvirtError> {
        let d = self.lookup(name)?;
        d.undefine_flags(sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | sys::VIR_DOMAIN_UNDEFINE_NVRAM)
            .map_err(|source| dom_err("undefine", name, source))
    }

    /// Writes our metadata element into the live and (if persistent) the persistent definition.
    pub fn set_metadata(
        &self,
        name: &str,
        element_xml: &str,
        prefix: &str,
        ns_uri: &str,
    ) -> Result<(), LibvirtError> {
        let d = self.lookup(name)?;
        let active = d.is_active().unwrap_or(false);
        let persistent = d.is_persistent().unwrap_or(false);
        let mut flags = 0;
        if active {
            flags |= sys::VIR_DOMAIN_AFFECT_LIVE;
        }
        if persistent {
            flags |= sys::VIR_DOMAIN_AFFECT_CONFIG;
        }
        d.set_metadata(
            sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
            Some(element_xml),
            Some(prefix),
            Some(ns_uri),
            flags,
        )
        .map_err(|source| dom_err("set metadata", name, source))
    }

    /// Reads our metadata element; `None` when the domain has none.
    pub fn metadata(&self, name: &str, ns_uri: &str) -> Result<Option<String>, LibvirtError> {
        let d = self.lookup(name)?;
        match d.metadata(sys::VIR_DOMAIN_METADATA_ELEMENT as i32, Some(ns_uri), 0) {
            Ok(xml) => Ok(Some(xml)),
            Err(e) if e.code().is(ErrorNumber::NoDomainMetadata) => Ok(None),
            Err(source) => Err(dom_err("get metadata", name, source)),
        }
    }

    /// Sends one guest-agent command. The reply is rejected when larger than `max_reply`
    /// bytes: the guest is untrusted. libvirt's own timeout has one-second granularity, so
    /// the sub-second deadline is enforced by the caller's async timeout as well.
    pub fn agent_command(
        &self,
        name: &str,
        json: &str,
        timeout: Duration,
        max_reply: usize,
    ) -> Result<String, LibvirtError> {
        let d = self.lookup(name)?;
        let secs = timeout.as_secs_f64().ceil().max(AGENT_MIN_TIMEOUT_S as f64) as i32;
        let reply = d.qemu_agent_command(json, secs, 0).map_err(|source| {
            if source.code().is(ErrorNumber::AgentUnresponsive)
                || source.code().is(ErrorNumber::OperationTimeout)
            {
                LibvirtError::AgentTimeout {
                    domain: name.to_string(),
                    command: command_name(json),
                    timeout_ms: timeout.as_millis() as u64,
                }
            } else {
                dom_err("guest agent command", name, source)
            }
        })?;
        if reply.len() > max_reply {
            return Err(LibvirtError::AgentReplyTooLarge {
                domain: name.to_string(),
                command: command_name(json),
                len: reply.len(),
                max: max_reply,
            });
        }
        Ok(reply)
    }

    /// Sends one QMP command to the domain's QEMU monitor (e.g. `announce-self`).
    pub fn qmp(&self, name: &str, json: &str) -> Result<String, LibvirtError> {
        let d = self.lookup(name)?;
        d.qemu_monitor_command(json, 0)
            .map_err(|source| dom_err("QMP command", name, source))
    }

    /// Updates a device (e.g. an `<interface>` with a new link state) in the live domain only
    /// (`config == false`) or in the persistent definition only (`config == true`).
    pub fn update_device(
        &self,
        name: &str,
        device_xml: &str,
        config: bool,
    ) -> Result<(), LibvirtError> {
        let d = self.lookup(name)?;
        let flags = if config {
            sys::VIR_DOMAIN_AFFECT_CONFIG
        } else {
            sys::VIR_DOMAIN_AFFECT_LIVE
        };
        d.update_device_flags(device_xml, flags)
            .map_err(|source| dom_err("update device", name, source))
    }

    /// Attaches a device to the running domain only (its definition, if any, is left as it
    /// is: an isolated clone's data copies, or a transient verification copy's).
    pub fn attach_device_live(&self, name: &str, device_xml: &str) -> Result<(), LibvirtError> {
        let d = self.lookup(name)?;
        d.attach_device_flags(device_xml, sys::VIR_DOMAIN_AFFECT_LIVE)
            .map_err(|source| dom_err("attach device", name, source))
    }

    /// Attaches a device (e.g. a `<disk>`) to the running domain and to its persistent
    /// definition.
    pub fn attach_device(&self, name: &str, device_xml: &str) -> Result<(), LibvirtError> {
        let d = self.lookup(name)?;
        d.attach_device_flags(
            device_xml,
            sys::VIR_DOMAIN_AFFECT_LIVE | sys::VIR_DOMAIN_AFFECT_CONFIG,
        )
        .map_err(|source| dom_err("attach device", name, source))
    }

    /// Whether the domain has a persistent definition (is not transient).
    pub fn is_persistent(&self, name: &str) -> Result<bool, LibvirtError> {
        self.lookup(name)?
            .is_persistent()
            .map_err(|source| dom_err("read persistence", name, source))
    }

    /// The Linux bridge of a libvirt virtual network (`<network><bridge name=>`).
    pub fn network_bridge(&self, network: &str) -> Result<String, LibvirtError> {
        self.inner
            .conn
            .lookup_network_by_name(network)
            .and_then(|n| n.bridge_name())
            .map_err(|source| LibvirtError::Connection {
                op: "read network bridge",
                source,
            })
    }

    /// Sets the live vCPU count (within the domain's maximum).
    pub fn set_vcpus_live(&self, name: &str, vcpus: u32) -> Result<(), LibvirtError> {
        let d = self.lookup(name)?;
        d.set_vcpus_flags(vcpus, sys::VIR_DOMAIN_AFFECT_LIVE)
            .map_err(|source| dom_err("set vcpus", name, source))
    }

    /// Sets the live balloon target in KiB (within the domain's maximum memory).
    pub fn set_memory_live(&self, name: &str, kib: u64) -> Result<(), LibvirtError> {
        let d = self.lookup(name)?;
        d.set_memory_flags(kib, sys::VIR_DOMAIN_AFFECT_LIVE)
            .map_err(|source| dom_err("set memory", name, source))
    }

    /// Live vCPU count and current memory (KiB) as libvirt reports them.
    pub fn live_resources(&self, name: &str) -> Result<(u32, u64), LibvirtError> {
        let d = self.lookup(name)?;
        let vcpus = d
            .vcpus_flags(sys::VIR_DOMAIN_AFFECT_LIVE)
            .map_err(|source| dom_err("get vcpus", name, source))?;
        let info = d
            .info()
            .map_err(|source| dom_err("get info", name, source))?;
        Ok((vcpus, info.memory))
    }

    /// Bulk statistics of one running domain.
    pub fn stats(&self, name: &str) -> Result<DomainStats, LibvirtError> {
        let d = self.lookup(name)?;
        events::domain_stats(&self.inner.conn, &d)
            .map_err(|source| dom_err("get stats", name, source))
    }
}

/// The run state of a domain, read directly (the wrapper's enum drops unknown values).
fn raw_state(d: &Domain) -> Option<RunState> {
    let mut state: std::os::raw::c_int = -1;
    let mut reason: std::os::raw::c_int = -1;
    // SAFETY: `d` holds a valid domain reference for the duration of the call; both out
    // pointers point at live stack integers.
    let rc = unsafe { sys::virDomainGetState(d.as_ptr(), &mut state, &mut reason, 0) };
    (rc == 0).then(|| RunState::from_raw(state as sys::virDomainState))
}

/// libvirt's last error on this thread, for calls whose wrapper gives none.
fn last_error() -> virt::error::Error {
    virt::error::Error::last_error()
}

fn dom_err(op: &'static str, domain: &str, source: virt::error::Error) -> LibvirtError {
    LibvirtError::Domain {
        op,
        domain: domain.to_string(),
        source,
    }
}

/// The "execute" member of an agent command, for error messages.
fn command_name(json: &str) -> String {
    serde_json::from_str::<serde_json::Value>(json)
        .ok()
        .and_then(|v| {
            v.get("execute")
                .and_then(|e| e.as_str())
                .map(str::to_string)
        })
        .unwrap_or_else(|| "<unparsed>".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_name_reads_execute_or_says_unparsed() {
        assert_eq!(command_name(r#"{"execute":"guest-ping"}"#), "guest-ping");
        assert_eq!(command_name("nonsense"), "<unparsed>");
    }

    #[test]
    fn run_state_activity() {
        assert!(RunState::Paused.is_active());
        assert!(!RunState::Shutoff.is_active());
    }
}
