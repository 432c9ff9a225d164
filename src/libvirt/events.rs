//! libvirt's event loop on a dedicated thread, domain lifecycle / agent-lifecycle / connection
//! close callbacks turned into [`DomainEvent`]s on a tokio channel, and bulk domain stats.

use std::ffi::CStr;
use std::os::raw::{c_char, c_int, c_void};
use std::sync::OnceLock;

use tokio::sync::mpsc::UnboundedSender;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::sys;

use super::{DomainStats, LibvirtError};

/// What happened to a domain, from libvirt's lifecycle event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LifecycleEvent {
    /// Defined or its definition updated.
    Defined,
    /// Undefined.
    Undefined,
    /// Started (booted, restored, ...).
    Started,
    /// Paused.
    Suspended,
    /// Resumed.
    Resumed,
    /// Stopped after a clean guest shutdown.
    StoppedShutdown,
    /// Stopped by an explicit destroy.
    StoppedDestroyed,
    /// Stopped because the guest or QEMU crashed.
    StoppedCrashed,
    /// Stopped because QEMU failed (died unexpectedly, e.g. SIGKILL).
    StoppedFailed,
    /// Stopped for another reason (migrated, saved, snapshot).
    StoppedOther,
    /// The guest panicked / crashed but the domain is kept (on_crash=preserve).
    Crashed,
    /// Anything else libvirt reports (shutdown in progress, pm suspend, ...).
    Other(i32, i32),
}

impl LifecycleEvent {
    fn from_raw(event: c_int, detail: c_int) -> Self {
        match event as sys::virDomainEventType {
            sys::VIR_DOMAIN_EVENT_DEFINED => LifecycleEvent::Defined,
            sys::VIR_DOMAIN_EVENT_UNDEFINED => LifecycleEvent::Undefined,
            sys::VIR_DOMAIN_EVENT_STARTED => LifecycleEvent::Started,
            sys::VIR_DOMAIN_EVENT_SUSPENDED => LifecycleEvent::Suspended,
            sys::VIR_DOMAIN_EVENT_RESUMED => LifecycleEvent::Resumed,
            sys::VIR_DOMAIN_EVENT_STOPPED => match detail as sys::virDomainEventStoppedDetailType {
                sys::VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN => LifecycleEvent::StoppedShutdown,
                sys::VIR_DOMAIN_EVENT_STOPPED_DESTROYED => LifecycleEvent::StoppedDestroyed,
                sys::VIR_DOMAIN_EVENT_STOPPED_CRASHED => LifecycleEvent::StoppedCrashed,
                sys::VIR_DOMAIN_EVENT_STOPPED_FAILED => LifecycleEvent::StoppedFailed,
                _ => LifecycleEvent::StoppedOther,
            },
            sys::VIR_DOMAIN_EVENT_CRASHED => LifecycleEvent::Crashed,
            _ => LifecycleEvent::Other(event, detail),
        }
    }

    /// True for the events that mean the domain's QEMU went away without anyone asking.
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            LifecycleEvent::StoppedCrashed
                | LifecycleEvent::StoppedFailed
                | LifecycleEvent::Crashed
        )
    }
}

/// Whether the guest agent is connected, from libvirt's agent-lifecycle event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentState {
    /// The agent opened its channel.
    Connected,
    /// The agent closed its channel (agent died, guest rebooting, ...).
    Disconnected,
}

/// An event from libvirt, delivered on the subscriber's channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainEvent {
    /// A domain lifecycle change.
    Lifecycle {
        /// Domain name.
        domain: String,
        /// What happened.
        event: LifecycleEvent,
    },
    /// The guest agent connected or disconnected.
    Agent {
        /// Domain name.
        domain: String,
        /// New state.
        state: AgentState,
    },
    /// The connection to libvirtd closed (daemon restarted, keepalive lost).
    ConnectionClosed {
        /// libvirt's reason code, as text.
        reason: &'static str,
    },
}

/// libvirt's default event loop, running on its own thread for the life of the process.
/// libvirt allows one registration per process, so this is a process-wide singleton.
#[derive(Debug, Clone, Copy)]
pub struct EventLoop {
    _private: (),
}

static EVENT_LOOP: OnceLock<Result<(), String>> = OnceLock::new();

impl EventLoop {
    /// Registers the default implementation (once) and starts its thread.
    pub fn start() -> Result<EventLoop, LibvirtError> {
        let result = EVENT_LOOP.get_or_init(|| {
            // libvirt prints every error to stderr by default; ours are returned and logged.
            virt::error::clear_error_callback();
            virt::event::event_register_default_impl().map_err(|e| e.to_string())?;
            std::thread::Builder::new()
                .name("libvirt-events".into())
                .spawn(|| loop {
                    if let Err(e) = virt::event::event_run_default_impl() {
                        tracing::error!(error = %e, "libvirt event loop iteration failed");
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                })
                .map_err(|e| e.to_string())?;
            Ok(())
        });
        match result {
            Ok(()) => Ok(EventLoop { _private: () }),
            Err(_) => Err(LibvirtError::Events {
                what: "register the default event loop",
                source: None,
            }),
        }
    }
}

/// The channel a callback writes to; owned by libvirt through `opaque` until `free_sink`.
struct Sink {
    tx: UnboundedSender<DomainEvent>,
}

/// Reads a domain's name inside a callback.
///
/// # Safety
/// `dom` must be a valid domain pointer for the duration of the call (libvirt guarantees this
/// inside event callbacks).
unsafe fn domain_name(dom: sys::virDomainPtr) -> String {
    // SAFETY: per the function contract `dom` is valid; the returned string is owned by the
    // domain object and only borrowed while we copy it.
    let ptr = unsafe { sys::virDomainGetName(dom) };
    if ptr.is_null() {
        return String::from("<unnamed>");
    }
    // SAFETY: libvirt returns a NUL-terminated string that lives as long as `dom`.
    unsafe { CStr::from_ptr(ptr) }
        .to_string_lossy()
        .into_owned()
}

unsafe extern "C" fn on_lifecycle(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    event: c_int,
    detail: c_int,
    opaque: *mut c_void,
) {
    // SAFETY: `opaque` is the `Box<Sink>` we registered; libvirt keeps it alive until it calls
    // `free_sink`, which happens only after the callback can no longer run.
    let sink = unsafe { &*(opaque as *const Sink) };
    // SAFETY: libvirt passes a valid domain for the duration of the callback.
    let domain = unsafe { domain_name(dom) };
    let _ = sink.tx.send(DomainEvent::Lifecycle {
        domain,
        event: LifecycleEvent::from_raw(event, detail),
    });
}

unsafe extern "C" fn on_agent_lifecycle(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    state: c_int,
    _reason: c_int,
    opaque: *mut c_void,
) {
    // SAFETY: as in `on_lifecycle`.
    let sink = unsafe { &*(opaque as *const Sink) };
    // SAFETY: libvirt passes a valid domain for the duration of the callback.
    let domain = unsafe { domain_name(dom) };
    let state = if state as sys::virConnectDomainEventAgentLifecycleState
        == sys::VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_CONNECTED
    {
        AgentState::Connected
    } else {
        AgentState::Disconnected
    };
    let _ = sink.tx.send(DomainEvent::Agent { domain, state });
}

unsafe extern "C" fn on_close(_conn: sys::virConnectPtr, reason: c_int, opaque: *mut c_void) {
    // SAFETY: as in `on_lifecycle`.
    let sink = unsafe { &*(opaque as *const Sink) };
    let reason = match reason as sys::virConnectCloseReason {
        sys::VIR_CONNECT_CLOSE_REASON_ERROR => "error",
        sys::VIR_CONNECT_CLOSE_REASON_EOF => "eof",
        sys::VIR_CONNECT_CLOSE_REASON_KEEPALIVE => "keepalive",
        sys::VIR_CONNECT_CLOSE_REASON_CLIENT => "client",
        _ => "unknown",
    };
    let _ = sink.tx.send(DomainEvent::ConnectionClosed { reason });
}

unsafe extern "C" fn free_sink(opaque: *mut c_void) {
    // SAFETY: `opaque` came from `Box::into_raw(Box<Sink>)` in `register` and libvirt calls the
    // free callback exactly once.
    drop(unsafe { Box::from_raw(opaque as *mut Sink) });
}

type FourArgCallback =
    unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, c_int, c_int, *mut c_void);

/// Installs the lifecycle and agent-lifecycle callbacks and the close callback; returns the
/// domain callback ids for deregistration.
pub(super) fn register(
    conn: &Connect,
    tx: UnboundedSender<DomainEvent>,
) -> Result<Vec<i32>, LibvirtError> {
    let mut ids = Vec::new();
    let domain_callbacks: [(sys::virDomainEventID, FourArgCallback, &'static str); 2] = [
        (
            sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE,
            on_lifecycle,
            "lifecycle callback",
        ),
        (
            sys::VIR_DOMAIN_EVENT_ID_AGENT_LIFECYCLE,
            on_agent_lifecycle,
            "agent lifecycle callback",
        ),
    ];
    for (id, cb, what) in domain_callbacks {
        let opaque = Box::into_raw(Box::new(Sink { tx: tx.clone() })) as *mut c_void;
        // SAFETY: libvirt's C API takes every domain event callback as the generic callback type
        // and calls it back with the signature the event id implies (the VIR_DOMAIN_EVENT_CALLBACK
        // cast in C); both functions have exactly the signature for their id.
        let generic: sys::virConnectDomainEventGenericCallback = Some(unsafe {
            std::mem::transmute::<
                FourArgCallback,
                unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void),
            >(cb)
        });
        // SAFETY: the connection pointer is valid; `opaque` is a leaked Box that libvirt owns
        // from here and frees through `free_sink`.
        let rc = unsafe {
            sys::virConnectDomainEventRegisterAny(
                conn.as_ptr(),
                std::ptr::null_mut(),
                id as c_int,
                generic,
                opaque,
                Some(free_sink),
            )
        };
        if rc < 0 {
            // SAFETY: registration failed, so libvirt did not take ownership of `opaque`.
            drop(unsafe { Box::from_raw(opaque as *mut Sink) });
            return Err(LibvirtError::Events {
                what,
                source: Some(virt::error::Error::last_error()),
            });
        }
        ids.push(rc);
    }
    let opaque = Box::into_raw(Box::new(Sink { tx })) as *mut c_void;
    // SAFETY: as above; libvirt owns `opaque` on success.
    let rc = unsafe {
        sys::virConnectRegisterCloseCallback(conn.as_ptr(), Some(on_close), opaque, Some(free_sink))
    };
    if rc < 0 {
        // SAFETY: registration failed, ownership stayed with us.
        drop(unsafe { Box::from_raw(opaque as *mut Sink) });
        return Err(LibvirtError::Events {
            what: "close callback",
            source: Some(virt::error::Error::last_error()),
        });
    }
    Ok(ids)
}

/// Bulk stats of one domain via virDomainListGetStats.
pub(super) fn domain_stats(
    _conn: &Connect,
    dom: &Domain,
) -> Result<DomainStats, virt::error::Error> {
    let stats_kinds = sys::VIR_DOMAIN_STATS_CPU_TOTAL
        | sys::VIR_DOMAIN_STATS_BALLOON
        | sys::VIR_DOMAIN_STATS_VCPU
        | sys::VIR_DOMAIN_STATS_INTERFACE
        | sys::VIR_DOMAIN_STATS_BLOCK;
    // SAFETY: `dom` holds a valid reference while the array is in use; the array is
    // NULL-terminated as virDomainListGetStats requires.
    let mut doms: [sys::virDomainPtr; 2] = [unsafe { dom.as_ptr() }, std::ptr::null_mut()];
    let mut records: *mut sys::virDomainStatsRecordPtr = std::ptr::null_mut();
    // SAFETY: pointers are valid; on success libvirt allocates `records`, freed below.
    let n = unsafe { sys::virDomainListGetStats(doms.as_mut_ptr(), stats_kinds, &mut records, 0) };
    if n < 0 {
        return Err(virt::error::Error::last_error());
    }
    let mut out = DomainStats::default();
    if n > 0 && !records.is_null() {
        // SAFETY: libvirt returned `n` >= 1 records; the first is valid until the list is freed.
        let rec = unsafe { &**records };
        let params: &[sys::virTypedParameter] = if rec.params.is_null() || rec.nparams <= 0 {
            &[]
        } else {
            // SAFETY: `params` points at `nparams` initialised typed parameters owned by `rec`.
            unsafe { std::slice::from_raw_parts(rec.params, rec.nparams as usize) }
        };
        for p in params {
            // SAFETY: `field` is a NUL-terminated C string inside the fixed-size array.
            let field =
                unsafe { CStr::from_ptr(p.field.as_ptr() as *const c_char) }.to_string_lossy();
            let value = typed_u64(p);
            apply_stat(&mut out, &field, value);
        }
    }
    if !records.is_null() {
        // SAFETY: `records` came from virDomainListGetStats and is freed exactly once.
        unsafe { sys::virDomainStatsRecordListFree(records) };
    }
    Ok(out)
}

/// The unsigned value of a numeric typed parameter.
fn typed_u64(p: &sys::virTypedParameter) -> Option<u64> {
    // SAFETY: the union member read is the one `type_` says libvirt wrote.
    unsafe {
        match p.type_ as sys::virTypedParameterType {
            sys::VIR_TYPED_PARAM_UINT => Some(p.value.ui as u64),
            sys::VIR_TYPED_PARAM_ULLONG => Some(p.value.ul),
            sys::VIR_TYPED_PARAM_INT => u64::try_from(p.value.i).ok(),
            sys::VIR_TYPED_PARAM_LLONG => u64::try_from(p.value.l).ok(),
            _ => None,
        }
    }
}

/// Folds one stats field into the summary (sums per-device counters).
fn apply_stat(out: &mut DomainStats, field: &str, value: Option<u64>) {
    let Some(v) = value else { return };
    let add = |slot: &mut Option<u64>| *slot = Some(slot.unwrap_or(0).saturating_add(v));
    match field {
        "cpu.time" => out.cpu_time_ns = Some(v),
        "balloon.current" => out.balloon_current_kib = Some(v),
        "balloon.maximum" => out.balloon_max_kib = Some(v),
        "balloon.rss" => out.balloon_rss_kib = Some(v),
        "balloon.available" => out.balloon_available_kib = Some(v),
        "balloon.usable" => out.balloon_usable_kib = Some(v),
        "balloon.last-update" => out.balloon_last_update_s = Some(v),
        "vcpu.current" => out.vcpu_current = u32::try_from(v).ok(),
        f if f.starts_with("block.") && f.ends_with(".rd.bytes") => add(&mut out.block_rd_bytes),
        f if f.starts_with("block.") && f.ends_with(".wr.bytes") => add(&mut out.block_wr_bytes),
        f if f.starts_with("net.") && f.ends_with(".rx.bytes") => add(&mut out.net_rx_bytes),
        f if f.starts_with("net.") && f.ends_with(".tx.bytes") => add(&mut out.net_tx_bytes),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stopped_details_map_to_failures_only_when_unexpected() {
        let stopped = sys::VIR_DOMAIN_EVENT_STOPPED as c_int;
        assert_eq!(
            LifecycleEvent::from_raw(stopped, sys::VIR_DOMAIN_EVENT_STOPPED_FAILED as c_int),
            LifecycleEvent::StoppedFailed
        );
        assert!(LifecycleEvent::StoppedFailed.is_failure());
        assert!(LifecycleEvent::StoppedCrashed.is_failure());
        assert!(!LifecycleEvent::from_raw(
            stopped,
            sys::VIR_DOMAIN_EVENT_STOPPED_DESTROYED as c_int
        )
        .is_failure());
        assert!(!LifecycleEvent::StoppedShutdown.is_failure());
    }

    #[test]
    fn stats_fields_sum_per_device_counters() {
        let mut s = DomainStats::default();
        apply_stat(&mut s, "net.0.rx.bytes", Some(10));
        apply_stat(&mut s, "net.1.rx.bytes", Some(5));
        apply_stat(&mut s, "block.0.wr.bytes", Some(7));
        apply_stat(&mut s, "cpu.time", Some(99));
        apply_stat(&mut s, "net.count", Some(2));
        apply_stat(&mut s, "balloon.last-update", Some(1_764_000_000));
        assert_eq!(s.net_rx_bytes, Some(15));
        assert_eq!(s.block_wr_bytes, Some(7));
        assert_eq!(s.cpu_time_ns, Some(99));
        assert_eq!(s.balloon_last_update_s, Some(1_764_000_000));
    }
}
