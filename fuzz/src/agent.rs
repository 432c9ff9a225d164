//! Guest-agent replies: a compromised guest answers anything. Every reply parser gets the
//! input under small limits (so that the bounds are reachable), the base64 decoder gets it as a
//! payload, and the file helpers run against a guest whose replies are the input's lines.
//!
//! Properties: output stays within the limits (entries, string lengths, counters at most
//! `i64::MAX`, prefixes within the address family, captured output and file chunks within what
//! was asked); an error names the command and the field (a JSON path into the reply) and
//! quotes at most 64 bytes of what the guest sent; base64 round-trips.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use understudy::monitor::agent::{
    self, AgentError, AgentLimits, AgentOptions, AgentTransport, AgentTransportError, ExecStatus,
    GuestAgent,
};
use understudy::monitor::base64;

const LIMITS: AgentLimits = AgentLimits {
    max_reply_bytes: 64 * 1024,
    max_entries: 8,
    max_string_len: 64,
};
const MAX_OUTPUT: usize = 16;
const REQUESTED: usize = 32;
const COUNTER_MAX: u64 = i64::MAX as u64;

/// Runs one input.
pub fn check(data: &[u8]) {
    let text = crate::text(data);
    let text = text.as_ref();
    let l = &LIMITS;

    result(agent::parse_ping(text, l));
    result(agent::parse_file_close(text, l));
    if let Some(info) = result(agent::parse_info(text, l)) {
        short(&info.version);
        entries(info.supported_commands.len());
        info.supported_commands.iter().for_each(|c| short(&c.name));
    }
    if let Some(os) = result(agent::parse_osinfo(text, l)) {
        for s in [
            &os.id,
            &os.name,
            &os.pretty_name,
            &os.version,
            &os.version_id,
            &os.variant,
            &os.variant_id,
            &os.kernel_release,
            &os.kernel_version,
            &os.machine,
        ]
        .into_iter()
        .flatten()
        {
            short(s);
        }
    }
    if let Some(cpus) = result(agent::parse_cpustats(text, l)) {
        entries(cpus.len());
        for c in &cpus {
            let opt = [
                c.iowait_ms,
                c.irq_ms,
                c.softirq_ms,
                c.steal_ms,
                c.guest_ms,
                c.guestnice_ms,
            ];
            counters(
                [c.user_ms, c.nice_ms, c.system_ms, c.idle_ms]
                    .into_iter()
                    .chain(opt.into_iter().flatten()),
            );
            assert!(c.busy_ms() >= c.user_ms);
        }
    }
    if let Some(disks) = result(agent::parse_diskstats(text, l)) {
        entries(disks.len());
        for d in &disks {
            short(&d.name);
            counters(
                [
                    d.read_ios,
                    d.read_merges,
                    d.read_sectors,
                    d.read_ticks,
                    d.write_ios,
                    d.write_merges,
                    d.write_sectors,
                    d.write_ticks,
                    d.discard_ios,
                    d.discard_merges,
                    d.discard_sectors,
                    d.discard_ticks,
                    d.flush_ios,
                    d.flush_ticks,
                    d.ios_pgr,
                    d.total_ticks,
                    d.weight_ticks,
                ]
                .into_iter()
                .flatten(),
            );
        }
    }
    if let Some(ifaces) = result(agent::parse_interfaces(text, l)) {
        entries(ifaces.len());
        for i in &ifaces {
            short(&i.name);
            if let Some(mac) = &i.hardware_address {
                assert_eq!(mac.len(), 17, "MAC {mac:?}");
            }
            entries(i.addresses.len());
            for a in &i.addresses {
                let max = if matches!(a.addr, IpAddr::V4(_)) {
                    32
                } else {
                    128
                };
                assert!(a.prefix <= max, "prefix /{} for {}", a.prefix, a.addr);
            }
            if let Some(s) = i.statistics {
                counters([
                    s.rx_bytes,
                    s.rx_packets,
                    s.rx_errs,
                    s.rx_dropped,
                    s.tx_bytes,
                    s.tx_packets,
                    s.tx_errs,
                    s.tx_dropped,
                ]);
            }
            let _ = i.is_loopback();
        }
    }
    if let Some(pid) = result(agent::parse_exec(text, l)) {
        assert!(pid >= 0, "pid {pid}");
    }
    if let Some(ExecStatus::Exited { stdout, stderr, .. }) =
        result(agent::parse_exec_status(text, l, MAX_OUTPUT))
    {
        for out in [stdout, stderr] {
            assert!(
                out.data.len() <= MAX_OUTPUT,
                "kept {} bytes",
                out.data.len()
            );
        }
    }
    if let Some(handle) = result(agent::parse_file_open(text, l)) {
        assert!(handle >= 0, "handle {handle}");
    }
    if let Some(chunk) = result(agent::parse_file_read(text, l, REQUESTED)) {
        assert!(
            chunk.data.len() <= REQUESTED,
            "read {} bytes",
            chunk.data.len()
        );
    }
    if let Some(n) = result(agent::parse_file_write(text, l, REQUESTED)) {
        assert!(n <= REQUESTED, "wrote {n} bytes");
    }

    check_base64(text);
    check_file_helpers(text);
}

/// Checks an error's message and returns the value on success.
fn result<T>(r: Result<T, AgentError>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            check_error(&e);
            None
        }
    }
}

fn check_error(e: &AgentError) {
    let msg = e.to_string();
    assert!(msg.contains("guest-"), "error names no command: {msg}");
    let field = match e {
        AgentError::Shape { field, .. }
        | AgentError::MissingField { field, .. }
        | AgentError::NegativeNumber { field, .. }
        | AgentError::NumberOutOfRange { field, .. }
        | AgentError::TooManyEntries { field, .. }
        | AgentError::StringTooLong { field, .. }
        | AgentError::InvalidValue { field, .. }
        | AgentError::Base64 { field, .. } => field,
        _ => return,
    };
    assert!(
        ["return", "error", "<reply>"]
            .iter()
            .any(|p| field.starts_with(p)),
        "field {field:?} is not a path into the reply"
    );
    assert!(
        msg.contains(field.as_str()),
        "message does not name {field}: {msg}"
    );
    match e {
        AgentError::InvalidValue { value, .. } => assert!(value.len() <= 64, "{msg}"),
        AgentError::TooManyEntries { count, max, .. } => assert!(count > max, "{msg}"),
        AgentError::StringTooLong { len, max, .. } => assert!(len > max, "{msg}"),
        _ => {}
    }
}

fn short(s: &str) {
    assert!(
        s.len() <= LIMITS.max_string_len,
        "string of {} bytes kept",
        s.len()
    );
}

fn entries(n: usize) {
    assert!(n <= LIMITS.max_entries, "{n} entries kept");
}

fn counters(values: impl IntoIterator<Item = u64>) {
    for v in values {
        assert!(v <= COUNTER_MAX, "counter {v} above i64::MAX");
    }
}

fn check_base64(text: &str) {
    match base64::decode(text) {
        Ok(bytes) => {
            assert!(
                bytes.len() <= text.len() / 4 * 3,
                "{} bytes from {}",
                bytes.len(),
                text.len()
            );
            // Strict decoding accepts only canonical text: what it decodes encodes back to it.
            assert_eq!(base64::encode(&bytes), text, "base64 round trip");
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

/// A guest that answers each command with the next line of the input, then hangs up.
struct Scripted(Mutex<VecDeque<String>>);

impl AgentTransport for Scripted {
    fn command(&self, _json: &str, _timeout: Duration) -> Result<String, AgentTransportError> {
        self.0
            .lock()
            .unwrap()
            .pop_front()
            .ok_or(AgentTransportError::NotConnected)
    }
}

fn check_file_helpers(text: &str) {
    let options = AgentOptions {
        limits: LIMITS,
        command_timeout: Duration::from_millis(10),
        exec_poll_interval: Duration::ZERO,
        file_chunk_bytes: 8,
    };
    let script = || Scripted(Mutex::new(text.lines().map(str::to_owned).collect()));
    let guest = GuestAgent::new(script(), options.clone());
    match guest.read_file("/etc/fuzz", REQUESTED) {
        Ok(f) => assert!(
            f.data.len() <= REQUESTED,
            "read_file kept {} bytes",
            f.data.len()
        ),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    let guest = GuestAgent::new(script(), options.clone());
    if let Err(e) = guest.write_file("/etc/fuzz", b"0123456789abcdefghij", REQUESTED) {
        assert!(!e.to_string().is_empty());
    }
    let guest = GuestAgent::new(script(), options);
    let argv = ["/bin/true".to_string()];
    match guest.exec(&argv, MAX_OUTPUT, Duration::from_millis(50)) {
        Ok(out) => {
            assert!(out.stdout.data.len() <= MAX_OUTPUT && out.stderr.data.len() <= MAX_OUTPUT)
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}
