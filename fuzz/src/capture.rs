//! Captured traffic: what a primary's tap carries (frames from its clients and from a guest
//! that may be compromised) cut into HTTP exchanges or byte streams, then redacted before it is
//! stored; and the chunked body decoder.
//!
//! The input is a first byte (bit 0: HTTP or TCP streams), then records: a frame
//! (`0xff`, a little-endian u16 length, an Ethernet frame) or a segment of one of four
//! connections to the server (a flags byte: bit 0 to the server, 1 SYN, 2 FIN, 3 RST, bits
//! 4-5 the connection; a little-endian u32 sequence number; a length byte; the payload).
//! Segments reach the reassembly and the HTTP parser without the packet parser in the way.
//!
//! Properties: the table never follows more connections than its bound and forgets every one
//! once idle; every exchange's server is a captured port, its bodies keep at most the body
//! bound, its times are within the run; after redaction no configured header, query field or
//! pattern survives anywhere in an exchange, nor a JSON field's value in any body, whatever
//! its declared type. The chunked decoder keeps at most what it is asked to and never claims
//! more input than it was given.

use std::net::SocketAddr;
use std::sync::LazyLock;

use understudy::capture::flow::{dechunk, Seen, Segment};
use understudy::capture::redact::REDACTED;
use understudy::capture::{Body, Exchange, FlowLimits, FlowTable, Redactor};
use understudy::config::{CaptureConfig, CaptureProtocol};

const PORTS: [u16; 2] = [80, 8080];
const LIMITS: FlowLimits = FlowLimits {
    max_flows: 3,
    max_body: 64,
    idle_us: 5_000,
};
/// A frame record's first byte; any other starts a segment.
pub const FRAME: u8 = 0xff;
/// The fields the redactor is given.
const FIELDS: [&str; 2] = ["token", "password"];
/// The pattern it is given: no replacement can make a new match of it.
const PATTERN: &str = "sk-[0-9a-f]{6,}";

/// The redaction rules, compiled once: compiling their patterns per input cost 5 ms.
static REDACTOR: LazyLock<Redactor> = LazyLock::new(|| {
    Redactor::new(&CaptureConfig {
        redact_fields: FIELDS.map(String::from).to_vec(),
        redact_patterns: vec![PATTERN.into()],
        ..CaptureConfig::default()
    })
    .expect("valid redaction rules")
});
static PATTERN_RE: LazyLock<regex::bytes::Regex> =
    LazyLock::new(|| regex::bytes::Regex::new(PATTERN).unwrap());
/// A field's value in JSON text, the field written as configured: a string up to its closing
/// quote or the end, or a bare value.
static FIELD_RE: LazyLock<regex::bytes::Regex> = LazyLock::new(|| {
    regex::bytes::Regex::new(r#""(?i:token|password)"\s*:\s*("(?:[^"\\]|\\.)*"?|[^,}\]\s]+)"#)
        .unwrap()
});
/// Any key's value in JSON text (group 1 the key, quoted as written), the strings taken from
/// the text's start.
static KEY_RE: LazyLock<regex::bytes::Regex> = LazyLock::new(|| {
    regex::bytes::Regex::new(r#"("(?:[^"\\]|\\.)*")\s*:\s*("(?:[^"\\]|\\.)*"?|[^,}\]\s"]+)"#)
        .unwrap()
});

/// One record of the input.
enum Rec<'a> {
    Frame(&'a [u8]),
    Segment {
        conn: u8,
        to_server: bool,
        seg: Segment<'a>,
    },
}

fn next<'a>(input: &mut &'a [u8]) -> Option<Rec<'a>> {
    let (&head, rest) = input.split_first()?;
    if head == FRAME {
        let len = u16::from_le_bytes(rest.get(..2)?.try_into().ok()?) as usize;
        let frame = rest.get(2..2 + len)?;
        *input = &rest[2 + len..];
        return Some(Rec::Frame(frame));
    }
    let seq = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?);
    let len = *rest.get(4)? as usize;
    let data = rest.get(5..5 + len)?;
    *input = &rest[5 + len..];
    Some(Rec::Segment {
        conn: (head >> 4) & 3,
        to_server: head & 1 != 0,
        seg: Segment {
            seq,
            syn: head & 2 != 0,
            fin: head & 4 != 0,
            rst: head & 8 != 0,
            data,
        },
    })
}

/// A segment record (for seeds).
pub fn segment_record(conn: u8, to_server: bool, flags: Segment<'_>) -> Vec<u8> {
    let head = (conn & 3) << 4
        | u8::from(to_server)
        | u8::from(flags.syn) << 1
        | u8::from(flags.fin) << 2
        | u8::from(flags.rst) << 3;
    let mut out = vec![head];
    out.extend_from_slice(&flags.seq.to_le_bytes());
    out.push(u8::try_from(flags.data.len()).expect("a segment record holds up to 255 bytes"));
    out.extend_from_slice(flags.data);
    out
}

/// A frame record (for seeds).
pub fn frame_record(frame: &[u8]) -> Vec<u8> {
    let mut out = vec![FRAME];
    out.extend_from_slice(&u16::try_from(frame.len()).unwrap().to_le_bytes());
    out.extend_from_slice(frame);
    out
}

fn client(conn: u8) -> SocketAddr {
    SocketAddr::from(([10, 77, 0, 2], 40_000 + u16::from(conn)))
}

/// Builds what every input shares (the redaction rules, the properties' patterns, the regex
/// engines' caches) by running one seed: called before AFL's fork server starts, so each run
/// does not build them again and coverage does not depend on which run came first.
pub fn prime() {
    exchanges(PRIMER);
}

/// The seed [`prime`] runs: a chunked JSON POST with fields to redact.
const PRIMER: &[u8] = include_bytes!("../corpus/capture/http-post-json-chunked.bin");

/// Runs one input.
pub fn check(data: &[u8]) {
    exchanges(data);
}

/// Runs one input; returns how many exchanges it made.
pub fn exchanges(data: &[u8]) -> usize {
    let Some((&mode, mut input)) = data.split_first() else {
        return 0;
    };
    let protocol = if mode & 1 == 0 {
        CaptureProtocol::Http
    } else {
        CaptureProtocol::Tcp
    };
    let redactor = &*REDACTOR;
    let server = SocketAddr::from(([10, 77, 0, 10], PORTS[usize::from(mode >> 1 & 1)]));
    let mut table = FlowTable::new(protocol, PORTS.to_vec(), LIMITS);
    let mut out = Vec::new();
    let start = 1_000_000u64;
    let mut now = start;
    let mut seen = 0;
    while let Some(rec) = next(&mut input) {
        now += 1_000;
        match rec {
            Rec::Frame(f) => table.frame(f, now, &mut out),
            Rec::Segment {
                conn,
                to_server,
                seg,
            } => table.segment(client(conn), server, to_server, seg, now, &mut out),
        }
        assert!(table.len() <= LIMITS.max_flows, "{} flows", table.len());
        seen += out.len();
        for x in out.drain(..) {
            exchange(x, protocol, start, now, redactor);
        }
    }
    table.expire(now + LIMITS.idle_us + 1, &mut out);
    assert!(table.is_empty(), "{} idle flows kept", table.len());
    seen += out.len();
    for x in out.drain(..) {
        exchange(x, protocol, start, now, redactor);
    }

    let keep = usize::from(mode);
    if let Ok(Some((body, dropped, used))) = dechunk(data, keep) {
        assert!(body.len() <= keep, "{} bytes kept of {keep}", body.len());
        assert!(used <= data.len(), "used {used} of {}", data.len());
        assert!(dropped == 0 || body.len() == keep, "dropped with room left");
    }
    seen
}

fn body_within(b: &Body) {
    let n = b.bytes().len();
    assert!(n <= LIMITS.max_body, "{n} body bytes kept");
}

fn exchange(seen: Seen, protocol: CaptureProtocol, start: u64, now: u64, redactor: &Redactor) {
    assert!(PORTS.contains(&seen.server.port()), "{seen:?}");
    assert!(
        seen.first_us > start && seen.first_us <= now,
        "{seen:?} at {now}"
    );
    assert!(seen.answered_us.is_none_or(|t| t > start && t <= now));
    let mut ex = seen.exchange;
    match (&ex, protocol) {
        (Exchange::Http { request, response }, CaptureProtocol::Http) => {
            body_within(&request.body);
            if let Some(r) = response {
                body_within(&r.body);
            }
        }
        (
            Exchange::Stream {
                to_server,
                to_client,
            },
            CaptureProtocol::Tcp,
        ) => {
            body_within(to_server);
            body_within(to_client);
        }
        (ex, p) => panic!("{ex:?} from a {p:?} table"),
    }
    redactor.apply(&mut ex);
    redacted(&ex);
}

/// A body, whatever its declared type, holds no configured field's value in JSON form: in
/// JSON that parses, under a key that is a field, at any depth; in text that does not, after
/// a field written as configured or a key whose escapes decode to a field.
fn json_fields(body: &Body) {
    let bytes = body.bytes();
    let redacted = format!("\"{REDACTED}\"");
    let kept = |value: &[u8]| {
        assert_eq!(
            value,
            redacted.as_bytes(),
            "a field's value kept in {:?}",
            String::from_utf8_lossy(&bytes)
        )
    };
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) {
        return json_value(&v, &bytes);
    }
    for c in FIELD_RE.captures_iter(&bytes) {
        kept(&c[1]);
    }
    for c in KEY_RE.captures_iter(&bytes) {
        if serde_json::from_slice::<String>(&c[1]).is_ok_and(|k| is_field(&k)) {
            kept(&c[2]);
        }
    }
}

/// No key of `v` that is a field holds anything but the redaction mark.
fn json_value(v: &serde_json::Value, body: &[u8]) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                if is_field(k) {
                    assert_eq!(
                        x.as_str(),
                        Some(REDACTED),
                        "field {k:?} kept in {:?}",
                        String::from_utf8_lossy(body)
                    );
                } else {
                    json_value(x, body);
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| json_value(x, body)),
        _ => {}
    }
}

/// Whether a name (percent-encoded, as a form writes it) is a configured field.
fn is_field(name: &str) -> bool {
    let name = name.replace('+', " ");
    let name = percent_encoding::percent_decode_str(&name).decode_utf8_lossy();
    FIELDS.iter().any(|f| f.eq_ignore_ascii_case(&name))
}

/// Nothing the rules name is left in `ex`.
fn redacted(ex: &Exchange) {
    let clean = |what: &str, bytes: &[u8]| {
        assert!(
            !PATTERN_RE.is_match(bytes),
            "pattern left in {what}: {:?}",
            String::from_utf8_lossy(bytes)
        );
    };
    let headers = |hs: &[(String, String)]| {
        for (n, v) in hs {
            if CaptureConfig::default()
                .redact_headers
                .iter()
                .any(|h| h.eq_ignore_ascii_case(n))
            {
                assert_eq!(v, REDACTED, "header {n} kept");
            }
            clean("a header", v.as_bytes());
        }
    };
    match ex {
        Exchange::Http { request, response } => {
            clean("the target", request.target.as_bytes());
            if let Some((_, query)) = request.target.split_once('?') {
                for kv in query.split('&') {
                    if let Some((k, v)) = kv.split_once('=') {
                        if is_field(k) {
                            assert_eq!(v, REDACTED, "query field {k} kept");
                        }
                    }
                }
            }
            headers(&request.headers);
            clean("a request body", &request.body.bytes());
            json_fields(&request.body);
            if let Some(r) = response {
                headers(&r.headers);
                clean("a response body", &r.body.bytes());
                json_fields(&r.body);
            }
        }
        Exchange::Stream {
            to_server,
            to_client,
        } => {
            clean("a stream", &to_server.bytes());
            clean("a stream", &to_client.bytes());
            json_fields(to_server);
            json_fields(to_client);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// The seeds reach the parsers: each connection seed makes its exchanges.
    #[test]
    fn every_connection_seed_makes_exchanges() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/capture");
        for (name, want) in [
            ("http-get.bin", 1),
            ("http-post-json-chunked.bin", 1),
            ("http-pipelined-until-close.bin", 2),
            ("tcp-stream.bin", 1),
            ("ipv6-http-frames.bin", 1),
        ] {
            let data = std::fs::read(dir.join(name)).unwrap();
            assert_eq!(super::exchanges(&data), want, "{name}");
        }
    }

    /// The priming input is a seed that reaches the redactor.
    #[test]
    fn priming_makes_an_exchange() {
        assert_eq!(super::exchanges(super::PRIMER), 1);
    }
}
