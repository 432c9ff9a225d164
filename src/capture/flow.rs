//! TCP reassembly per connection, and the cutting of each connection's streams into HTTP
//! request/response pairs or whole byte streams. Everything here is bounded: the number of
//! connections, out-of-order data held, the bytes of a message head and of a body.

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};

use etherparse::{NetSlice, SlicedPacket, TransportSlice};

use super::{Body, Exchange, HttpRequest, HttpResponse};
use crate::config::CaptureProtocol;

/// Longest message head (request or status line and headers) parsed.
pub const MAX_HEAD: usize = 16 * 1024;
/// Most headers parsed per message.
const MAX_HEADERS: usize = 64;
/// Out-of-order segments held per direction.
const MAX_OOO_SEGMENTS: usize = 64;

/// Bounds of a [`FlowTable`].
#[derive(Debug, Clone, Copy)]
pub struct FlowLimits {
    /// Connections followed at once; new ones beyond are ignored (counted).
    pub max_flows: usize,
    /// Bytes of a body (or of one direction of a stream) kept.
    pub max_body: usize,
    /// A connection silent this long (µs) is flushed and forgotten.
    pub idle_us: u64,
}

impl Default for FlowLimits {
    fn default() -> Self {
        Self {
            max_flows: 1024,
            max_body: 16 * 1024,
            idle_us: 30_000_000,
        }
    }
}

/// A finished exchange with its connection and times (µs since the Unix epoch).
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    /// Client side.
    pub client: SocketAddr,
    /// Server side.
    pub server: SocketAddr,
    /// First request byte.
    pub first_us: u64,
    /// First response byte, if any.
    pub answered_us: Option<u64>,
    /// The exchange.
    pub exchange: Exchange,
}

/// Counters of what the table refused or could not follow.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FlowCounts {
    /// Frames that were not TCP over IPv4 or IPv6 to or from a captured port.
    pub ignored: u64,
    /// New connections ignored because the table was full.
    pub flows_refused: u64,
    /// Connections given up (a gap in the stream, unparsable or oversized head).
    pub flows_broken: u64,
}

/// One direction of a connection: the bytes in order, data that arrived early, and how much
/// of the current message's body is still to be skipped.
#[derive(Debug, Default)]
struct Side {
    next: Option<u32>,
    buf: Vec<u8>,
    ooo: BTreeMap<u32, Vec<u8>>,
    fin: bool,
    first_us: Option<u64>,
    /// Body bytes of the current message still to come and to be dropped.
    skip: u64,
    /// For a stream: bytes not kept.
    dropped: u64,
}

/// Signed distance from `b` to `a` in sequence space.
fn seq_diff(a: u32, b: u32) -> i64 {
    a.wrapping_sub(b) as i32 as i64
}

impl Side {
    /// Adds a segment; false when a gap could not be held (the connection is then given up).
    fn push(&mut self, seq: u32, syn: bool, data: &[u8], cap: usize) -> bool {
        if syn {
            self.next = Some(seq.wrapping_add(1));
            return true;
        }
        let next = *self.next.get_or_insert(seq);
        let d = seq_diff(seq, next);
        if d > 0 {
            if data.is_empty() {
                return true;
            }
            // Early data is bounded like the stream itself: by count and by bytes.
            let held: usize = self.ooo.values().map(Vec::len).sum();
            if self.ooo.len() >= MAX_OOO_SEGMENTS || held + data.len() > cap {
                return false;
            }
            self.ooo.insert(seq, data.to_vec());
            return true;
        }
        let skip = (-d) as usize;
        if skip < data.len() {
            self.append(&data[skip..], cap);
        }
        // Segments now in order.
        while let Some((&s, _)) = self.ooo.iter().next() {
            let next = self.next.unwrap_or(s);
            let d = seq_diff(s, next);
            if d > 0 {
                break;
            }
            let seg = self.ooo.remove(&s).unwrap_or_default();
            let skip = (-d) as usize;
            if skip < seg.len() {
                self.append(&seg[skip..], cap);
            }
        }
        true
    }

    /// Appends in-order bytes, dropping what a body being skipped or a full buffer cannot keep.
    fn append(&mut self, mut data: &[u8], cap: usize) {
        self.next = self.next.map(|n| n.wrapping_add(data.len() as u32));
        if self.skip > 0 {
            let n = (self.skip as usize).min(data.len());
            self.skip -= n as u64;
            data = &data[n..];
        }
        let room = cap.saturating_sub(self.buf.len());
        let keep = data.len().min(room);
        self.buf.extend_from_slice(&data[..keep]);
        self.dropped += (data.len() - keep) as u64;
    }
}

/// A connection being followed.
#[derive(Debug, Default)]
struct Flow {
    to_server: Side,
    to_client: Side,
    /// Requests seen, waiting for their responses: (request, first byte µs).
    pending: VecDeque<(HttpRequest, u64)>,
    /// The response being read until the connection closes (no length given).
    until_close: Option<(u16, Vec<(String, String)>)>,
    last_us: u64,
    broken: bool,
}

/// Every connection being followed, keyed by (client, server).
#[derive(Debug)]
pub struct FlowTable {
    protocol: CaptureProtocol,
    ports: Vec<u16>,
    limits: FlowLimits,
    flows: BTreeMap<(SocketAddr, SocketAddr), Flow>,
    /// What was refused or given up.
    pub counts: FlowCounts,
}

impl FlowTable {
    /// A table for connections whose server side uses one of `ports`.
    pub fn new(protocol: CaptureProtocol, ports: Vec<u16>, limits: FlowLimits) -> Self {
        Self {
            protocol,
            ports,
            limits,
            flows: BTreeMap::new(),
            counts: FlowCounts::default(),
        }
    }

    /// Connections followed now.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// Whether no connection is followed.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Takes one Ethernet frame seen at `now_us`; appends finished exchanges to `out`.
    pub fn frame(&mut self, frame: &[u8], now_us: u64, out: &mut Vec<Seen>) {
        let Ok(p) = SlicedPacket::from_ethernet(frame) else {
            self.counts.ignored += 1;
            return;
        };
        // IPv6 extension headers are walked by etherparse: the TCP segment is found after them.
        let (src, dst): (IpAddr, IpAddr) = match &p.net {
            Some(NetSlice::Ipv4(ip)) => (
                ip.header().source_addr().into(),
                ip.header().destination_addr().into(),
            ),
            Some(NetSlice::Ipv6(ip)) => (
                ip.header().source_addr().into(),
                ip.header().destination_addr().into(),
            ),
            _ => {
                self.counts.ignored += 1;
                return;
            }
        };
        let Some(TransportSlice::Tcp(tcp)) = &p.transport else {
            self.counts.ignored += 1;
            return;
        };
        let src = SocketAddr::new(src, tcp.source_port());
        let dst = SocketAddr::new(dst, tcp.destination_port());
        let (client, server, to_server) = if self.ports.contains(&dst.port()) {
            (src, dst, true)
        } else if self.ports.contains(&src.port()) {
            (dst, src, false)
        } else {
            self.counts.ignored += 1;
            return;
        };
        self.segment(
            client,
            server,
            to_server,
            Segment {
                seq: tcp.sequence_number(),
                syn: tcp.syn(),
                fin: tcp.fin(),
                rst: tcp.rst(),
                data: tcp.payload(),
            },
            now_us,
            out,
        );
    }

    /// Takes one TCP segment of the connection (client, server).
    pub fn segment(
        &mut self,
        client: SocketAddr,
        server: SocketAddr,
        to_server: bool,
        seg: Segment<'_>,
        now_us: u64,
        out: &mut Vec<Seen>,
    ) {
        let key = (client, server);
        if !self.flows.contains_key(&key) {
            // Only a new connection's first segments start a flow: a connection joined in the
            // middle cannot be cut into messages.
            let starts = (seg.syn && to_server) || self.protocol == CaptureProtocol::Tcp;
            if !starts || seg.rst {
                return;
            }
            if self.flows.len() >= self.limits.max_flows {
                self.counts.flows_refused += 1;
                return;
            }
            self.flows.insert(key, Flow::default());
        }
        let cap = self.cap();
        let Some(flow) = self.flows.get_mut(&key) else {
            return;
        };
        flow.last_us = now_us;
        let side = if to_server {
            &mut flow.to_server
        } else {
            &mut flow.to_client
        };
        if !seg.data.is_empty() && side.first_us.is_none() {
            side.first_us = Some(now_us);
        }
        if !flow.broken && !side.push(seg.seq, seg.syn, seg.data, cap) {
            flow.broken = true;
            self.counts.flows_broken += 1;
        }
        if seg.fin {
            side.fin = true;
        }
        let done = seg.rst || (flow.to_server.fin && flow.to_client.fin);
        if !flow.broken && self.protocol == CaptureProtocol::Http {
            if let Err(()) = http_progress(flow, self.limits.max_body, client, server, out) {
                flow.broken = true;
                self.counts.flows_broken += 1;
            }
        }
        if done {
            self.finish(key, out);
        }
    }

    /// Flushes and forgets connections idle since before `now_us - idle`.
    pub fn expire(&mut self, now_us: u64, out: &mut Vec<Seen>) {
        let idle = self.limits.idle_us;
        let old: Vec<_> = self
            .flows
            .iter()
            .filter(|(_, f)| now_us.saturating_sub(f.last_us) > idle)
            .map(|(k, _)| *k)
            .collect();
        for k in old {
            self.finish(k, out);
        }
    }

    /// Buffer bound of one direction: a head and a body.
    fn cap(&self) -> usize {
        match self.protocol {
            CaptureProtocol::Http => MAX_HEAD + self.limits.max_body,
            CaptureProtocol::Tcp => self.limits.max_body,
        }
    }

    fn finish(&mut self, key: (SocketAddr, SocketAddr), out: &mut Vec<Seen>) {
        let Some(mut flow) = self.flows.remove(&key) else {
            return;
        };
        let (client, server) = key;
        if flow.broken {
            return;
        }
        match self.protocol {
            CaptureProtocol::Http => {
                // A response read until the close ends now.
                if let Some((status, headers)) = flow.until_close.take() {
                    let s = &mut flow.to_client;
                    let keep = s.buf.len().min(self.limits.max_body);
                    let extra = (s.buf.len() - keep) as u64;
                    let body = Body::new(&s.buf[..keep], s.dropped + extra);
                    if let Some((request, first)) = flow.pending.pop_front() {
                        out.push(Seen {
                            client,
                            server,
                            first_us: first,
                            answered_us: s.first_us,
                            exchange: Exchange::Http {
                                request,
                                response: Some(HttpResponse {
                                    status,
                                    headers,
                                    body,
                                }),
                            },
                        });
                    }
                }
                for (request, first) in flow.pending.drain(..) {
                    out.push(Seen {
                        client,
                        server,
                        first_us: first,
                        answered_us: None,
                        exchange: Exchange::Http {
                            request,
                            response: None,
                        },
                    });
                }
            }
            CaptureProtocol::Tcp => {
                let (a, b) = (&flow.to_server, &flow.to_client);
                let Some(first) = a.first_us else {
                    return;
                };
                out.push(Seen {
                    client,
                    server,
                    first_us: first,
                    answered_us: b.first_us,
                    exchange: Exchange::Stream {
                        to_server: Body::new(&a.buf, a.dropped),
                        to_client: Body::new(&b.buf, b.dropped),
                    },
                });
            }
        }
    }
}

/// One TCP segment's fields that matter here.
#[derive(Debug, Clone, Copy)]
pub struct Segment<'a> {
    /// Sequence number.
    pub seq: u32,
    /// SYN flag.
    pub syn: bool,
    /// FIN flag.
    pub fin: bool,
    /// RST flag.
    pub rst: bool,
    /// Payload.
    pub data: &'a [u8],
}

fn headers_of(h: &[httparse::Header<'_>]) -> Vec<(String, String)> {
    h.iter()
        .map(|h| {
            (
                h.name.to_string(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect()
}

/// `Content-Length` if given (an unparsable one is an error), and whether the body is chunked.
fn body_framing(headers: &[(String, String)]) -> Result<(Option<u64>, bool), ()> {
    let mut len = None;
    let mut chunked = false;
    for (n, v) in headers {
        if n.eq_ignore_ascii_case("content-length") {
            len = Some(v.trim().parse::<u64>().map_err(|_| ())?);
        } else if n.eq_ignore_ascii_case("transfer-encoding")
            && v.to_ascii_lowercase().contains("chunked")
        {
            chunked = true;
        }
    }
    Ok((len, chunked))
}

/// A chunked body that does not follow RFC 9112's grammar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed chunked body")]
pub struct BadChunk;

/// Decodes the chunked body at the front of `buf` (RFC 9112 7.1: chunks, the last chunk, the
/// trailer section): `Some((data, dropped, used))` once it is complete, with at most `keep`
/// bytes of data and how many more there were, and the encoded bytes it took; `None` while
/// it is incomplete; `Err` when it is malformed.
pub fn dechunk(buf: &[u8], keep: usize) -> Result<Option<(Vec<u8>, u64, usize)>, BadChunk> {
    let (mut data, mut dropped, mut pos) = (Vec::new(), 0u64, 0usize);
    loop {
        let (n, size) = match httparse::parse_chunk_size(&buf[pos..]).map_err(|_| BadChunk)? {
            httparse::Status::Complete(x) => x,
            httparse::Status::Partial => return Ok(None),
        };
        pos += n;
        if size == 0 {
            break;
        }
        let rest = (buf.len() - pos) as u64;
        if rest < size.saturating_add(2) {
            return Ok(None);
        }
        let size = size as usize;
        let chunk = &buf[pos..pos + size];
        let room = keep.saturating_sub(data.len()).min(size);
        data.extend_from_slice(&chunk[..room]);
        dropped += (size - room) as u64;
        if &buf[pos + size..pos + size + 2] != b"\r\n" {
            return Err(BadChunk);
        }
        pos += size + 2;
    }
    // Trailer fields, each a line, up to an empty line.
    loop {
        let Some(end) = buf[pos..].windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        pos += end + 2;
        if end == 0 {
            return Ok(Some((data, dropped, pos)));
        }
    }
}

/// Takes a chunked body off the front of `side.buf` (after a head of `head` bytes) once all of
/// it is there. A message larger than the buffer (`side.dropped`) cannot be followed.
fn take_chunked(side: &mut Side, head: usize, max_body: usize) -> Result<Option<Body>, ()> {
    match dechunk(&side.buf[head..], max_body).map_err(|_| ())? {
        Some((data, dropped, used)) => {
            side.buf.drain(..head + used);
            Ok(Some(Body::new(&data, dropped)))
        }
        None if side.dropped > 0 => Err(()),
        None => Ok(None),
    }
}

/// Takes a body of `len` bytes off the front of `side.buf` once the bytes kept of it are
/// there; the rest of the body is skipped as it arrives. None while it is incomplete.
fn take_body(side: &mut Side, head: usize, len: u64, max_body: usize) -> Option<Body> {
    let keep = (len as usize).min(max_body);
    let have_all = side.buf.len() >= head + keep;
    if !have_all {
        return None;
    }
    let body = side.buf[head..head + keep].to_vec();
    side.buf.drain(..head + keep);
    let rest = len - keep as u64;
    // Bytes of the dropped part already buffered go first.
    let buffered = (rest as usize).min(side.buf.len());
    side.buf.drain(..buffered);
    side.skip = rest - buffered as u64;
    Some(Body::new(&body, rest))
}

/// Cuts complete requests and responses off the connection's streams and pairs them.
/// `Err` when the connection cannot be followed (not HTTP, a head over [`MAX_HEAD`], a chunked
/// message larger than the buffer).
fn http_progress(
    flow: &mut Flow,
    max_body: usize,
    client: SocketAddr,
    server: SocketAddr,
    out: &mut Vec<Seen>,
) -> Result<(), ()> {
    // Bytes left in a buffer after a message was taken came in no later than the segment
    // being handled: they start the next message (pipelining, or two in one segment).
    let now = flow.last_us;
    // Requests.
    loop {
        let s = &mut flow.to_server;
        if s.skip > 0 || s.buf.is_empty() {
            break;
        }
        let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut hs);
        let head = match req.parse(&s.buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if s.buf.len() < MAX_HEAD => break,
            _ => return Err(()),
        };
        let headers = headers_of(req.headers);
        let (method, target, version) = (
            req.method.unwrap_or("").to_string(),
            req.path.unwrap_or("").to_string(),
            req.version.unwrap_or(0),
        );
        let (len, chunked) = body_framing(&headers)?;
        let first = s.first_us.unwrap_or(now);
        let body = if chunked {
            take_chunked(s, head, max_body)?
        } else {
            take_body(s, head, len.unwrap_or(0), max_body)
        };
        let Some(body) = body else {
            break;
        };
        s.first_us = (!s.buf.is_empty()).then_some(now);
        flow.pending.push_back((
            HttpRequest {
                method,
                target,
                version,
                headers,
                body,
            },
            first,
        ));
    }
    // Responses.
    loop {
        if flow.until_close.is_some() {
            break;
        }
        let s = &mut flow.to_client;
        if s.skip > 0 || s.buf.is_empty() {
            break;
        }
        let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut hs);
        let head = match resp.parse(&s.buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if s.buf.len() < MAX_HEAD => break,
            _ => return Err(()),
        };
        let status = resp.code.unwrap_or(0);
        let headers = headers_of(resp.headers);
        let (len, chunked) = body_framing(&headers)?;
        let head_request = flow
            .pending
            .front()
            .is_some_and(|(r, _)| r.method.eq_ignore_ascii_case("HEAD"));
        let no_body = head_request || status < 200 || status == 204 || status == 304;
        let len = match (no_body, len) {
            (true, _) => Some(0),
            // Transfer-Encoding overrides Content-Length (RFC 9112 6.3).
            (false, _) if chunked => None,
            (false, Some(n)) => Some(n),
            (false, None) => {
                // Read until the connection closes.
                s.buf.drain(..head);
                s.dropped = 0;
                flow.until_close = Some((status, headers));
                break;
            }
        };
        let answered = s.first_us;
        let body = match len {
            Some(len) => take_body(s, head, len, max_body),
            None => take_chunked(s, head, max_body)?,
        };
        let Some(body) = body else {
            break;
        };
        s.first_us = (!s.buf.is_empty()).then_some(now);
        if (100..200).contains(&status) {
            continue;
        }
        let Some((request, first)) = flow.pending.pop_front() else {
            // A response to nothing seen: not a conversation this table understands.
            return Err(());
        };
        out.push(Seen {
            client,
            server,
            first_us: first,
            answered_us: answered,
            exchange: Exchange::Http {
                request,
                response: Some(HttpResponse {
                    status,
                    headers,
                    body,
                }),
            },
        });
    }
    Ok(())
}

/// The unspecified address, for tests and placeholders.
pub const ANY: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    struct Conn {
        c: SocketAddr,
        s: SocketAddr,
        cseq: u32,
        sseq: u32,
    }

    impl Conn {
        fn new(t: &mut FlowTable, out: &mut Vec<Seen>) -> Self {
            let c = Conn {
                c: addr("10.0.0.1:40000"),
                s: addr("10.0.0.10:80"),
                cseq: 1000,
                sseq: 90_000,
            };
            c.raw(t, true, c.cseq, true, false, b"", out);
            c.raw(t, false, c.sseq, true, false, b"", out);
            c
        }
        #[allow(clippy::too_many_arguments)]
        fn raw(
            &self,
            t: &mut FlowTable,
            to_server: bool,
            seq: u32,
            syn: bool,
            fin: bool,
            data: &[u8],
            out: &mut Vec<Seen>,
        ) {
            t.segment(
                self.c,
                self.s,
                to_server,
                Segment {
                    seq,
                    syn,
                    fin,
                    rst: false,
                    data,
                },
                5,
                out,
            );
        }
        fn send(&mut self, t: &mut FlowTable, to_server: bool, data: &[u8], out: &mut Vec<Seen>) {
            let seq = if to_server {
                &mut self.cseq
            } else {
                &mut self.sseq
            };
            let s = seq.wrapping_add(1);
            *seq = seq.wrapping_add(data.len() as u32);
            self.raw(t, to_server, s, false, false, data, out);
        }
    }

    fn table(max_body: usize) -> FlowTable {
        FlowTable::new(
            CaptureProtocol::Http,
            vec![80],
            FlowLimits {
                max_body,
                ..FlowLimits::default()
            },
        )
    }

    /// The frames of `fixtures/ipv6-http.hex` (built byte by byte, not with etherparse).
    fn hex_frames(text: &str) -> Vec<Vec<u8>> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                (0..l.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&l[i..i + 2], 16).unwrap())
                    .collect()
            })
            .collect()
    }

    #[test]
    fn http_over_ipv6_is_captured_behind_extension_headers() {
        let mut t = table(1024);
        let mut out = Vec::new();
        for f in hex_frames(include_str!("fixtures/ipv6-http.hex")) {
            t.frame(&f, 7, &mut out);
        }
        assert_eq!(t.counts.ignored, 0, "{:?}", t.counts);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0].client, addr("[fd00:77::2]:40000"));
        assert_eq!(out[0].server, addr("[fd00:77::a]:80"));
        let Exchange::Http { request, response } = &out[0].exchange else {
            panic!()
        };
        assert_eq!(
            (request.method.as_str(), request.target.as_str()),
            ("GET", "/ledger?key=k1")
        );
        let r = response.as_ref().unwrap();
        assert_eq!((r.status, r.body.data.as_str()), (200, "k1\n"));
        // Stored and read back with its IPv6 addresses.
        let rec = crate::capture::Record {
            seq: 1,
            at_unix_ms: 0,
            client: out[0].client,
            server: out[0].server,
            latency_ms: None,
            exchange: out[0].exchange.clone(),
        };
        let json = serde_json::to_string(&rec).unwrap();
        assert!(json.contains("\"[fd00:77::2]:40000\""), "{json}");
        assert_eq!(
            serde_json::from_str::<crate::capture::Record>(&json).unwrap(),
            rec
        );
    }

    #[test]
    fn request_and_response_in_pieces_are_paired() {
        let mut t = table(1024);
        let mut out = Vec::new();
        let mut c = Conn::new(&mut t, &mut out);
        c.send(
            &mut t,
            true,
            b"POST /append?key=a HTTP/1.0\r\nHost: x\r\n",
            &mut out,
        );
        c.send(&mut t, true, b"Content-Length: 3\r\n\r\nab", &mut out);
        assert!(out.is_empty());
        c.send(&mut t, true, b"c", &mut out);
        c.send(
            &mut t,
            false,
            b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nok a\n",
            &mut out,
        );
        assert_eq!(out.len(), 1);
        let Exchange::Http { request, response } = &out[0].exchange else {
            panic!()
        };
        assert_eq!(request.method, "POST");
        assert_eq!(request.target, "/append?key=a");
        assert_eq!(request.body.data, "abc");
        let r = response.as_ref().unwrap();
        assert_eq!((r.status, r.body.data.as_str()), (200, "ok a\n"));
    }

    #[test]
    fn pipelined_messages_in_one_segment_have_that_segment_time() {
        // Found by the capture fuzz target: the second request had time 0.
        let mut t = table(1024);
        let mut out = Vec::new();
        let (c, s) = (addr("10.0.0.1:40000"), addr("10.0.0.10:80"));
        let seg = |seq, syn, data| Segment {
            seq,
            syn,
            fin: false,
            rst: false,
            data,
        };
        t.segment(c, s, true, seg(1000, true, b""), 10, &mut out);
        t.segment(c, s, false, seg(9000, true, b""), 11, &mut out);
        let requests: &[u8] = b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n";
        t.segment(c, s, true, seg(1001, false, requests), 20, &mut out);
        let responses: &[u8] =
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\naHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb";
        t.segment(c, s, false, seg(9001, false, responses), 30, &mut out);
        assert_eq!(out.len(), 2, "{out:?}");
        for x in &out {
            assert_eq!((x.first_us, x.answered_us), (20, Some(30)), "{x:?}");
        }
    }

    #[test]
    fn chunked_requests_and_responses_are_decoded_in_pieces() {
        let mut t = table(1024);
        let mut out = Vec::new();
        let mut c = Conn::new(&mut t, &mut out);
        c.send(
            &mut t,
            true,
            b"POST /append HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab",
            &mut out,
        );
        c.send(&mut t, true, b"c\r\n2;ext=1\r\nde\r\n0\r\n", &mut out);
        c.send(&mut t, true, b"X-Trailer: t\r\n\r\n", &mut out);
        c.send(
            &mut t,
            false,
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 99\r\n\r\n5\r\nok a\n\r\n",
            &mut out,
        );
        assert!(out.is_empty(), "{out:?}");
        c.send(&mut t, false, b"0\r\n\r\n", &mut out);
        assert_eq!(out.len(), 1, "{out:?}");
        let Exchange::Http { request, response } = &out[0].exchange else {
            panic!()
        };
        assert_eq!(request.body.data, "abcde");
        let r = response.as_ref().unwrap();
        assert_eq!((r.status, r.body.data.as_str()), (200, "ok a\n"));
    }

    #[test]
    fn chunked_bodies_are_bounded_and_malformed_ones_break_the_connection() {
        // Data beyond what is kept is counted as dropped.
        let (data, dropped, used) = dechunk(b"4\r\nabcd\r\n3\r\nefg\r\n0\r\n\r\nNEXT", 5)
            .unwrap()
            .unwrap();
        assert_eq!((data.as_slice(), dropped, used), (&b"abcde"[..], 2, 22));
        assert_eq!(dechunk(b"4\r\nab", 16), Ok(None));
        assert_eq!(dechunk(b"fffffff\r\nab", 16), Ok(None));
        assert_eq!(dechunk(b"4\r\nabcdXY0\r\n\r\n", 16), Err(BadChunk));
        assert_eq!(dechunk(b"zz\r\n", 16), Err(BadChunk));
        // A chunked message larger than the buffer cannot be followed.
        let mut t = table(8);
        let mut out = Vec::new();
        let mut c = Conn::new(&mut t, &mut out);
        c.send(
            &mut t,
            true,
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            &mut out,
        );
        let big = format!("{:x}\r\n{}\r\n", MAX_HEAD, "a".repeat(MAX_HEAD));
        c.send(&mut t, true, big.as_bytes(), &mut out);
        c.send(&mut t, true, b"0\r\n\r\n", &mut out);
        assert!(out.is_empty());
        assert_eq!(t.counts.flows_broken, 1);
    }

    #[test]
    fn out_of_order_and_retransmitted_segments_reassemble() {
        let mut t = table(1024);
        let mut out = Vec::new();
        let c = Conn::new(&mut t, &mut out);
        let req = b"GET /ledger HTTP/1.0\r\n\r\n";
        let (a, b) = req.split_at(10);
        c.raw(&mut t, true, c.cseq + 1 + 10, false, false, b, &mut out);
        c.raw(&mut t, true, c.cseq + 1, false, false, a, &mut out);
        c.raw(&mut t, true, c.cseq + 1, false, false, a, &mut out);
        let resp = b"HTTP/1.0 200 OK\r\n\r\nline1\nline2\n";
        c.raw(&mut t, false, c.sseq + 1, false, true, resp, &mut out);
        c.raw(
            &mut t,
            true,
            c.cseq + 1 + req.len() as u32,
            false,
            true,
            b"",
            &mut out,
        );
        assert_eq!(out.len(), 1, "{out:?}");
        let Exchange::Http { request, response } = &out[0].exchange else {
            panic!()
        };
        assert_eq!(request.target, "/ledger");
        assert_eq!(response.as_ref().unwrap().body.data, "line1\nline2\n");
        assert!(t.is_empty());
    }

    #[test]
    fn large_bodies_are_cut_and_the_rest_skipped() {
        let mut t = table(4);
        let mut out = Vec::new();
        let mut c = Conn::new(&mut t, &mut out);
        c.send(
            &mut t,
            true,
            b"GET / HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n",
            &mut out,
        );
        c.send(
            &mut t,
            false,
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123",
            &mut out,
        );
        c.send(
            &mut t,
            false,
            b"456789HTTP/1.1 404 N\r\nContent-Length: 0\r\n\r\n",
            &mut out,
        );
        assert_eq!(out.len(), 2, "{out:?}");
        let Exchange::Http { response, .. } = &out[0].exchange else {
            panic!()
        };
        let r = response.as_ref().unwrap();
        assert_eq!((r.body.data.as_str(), r.body.truncated), ("0123", 6));
        let Exchange::Http { request, response } = &out[1].exchange else {
            panic!()
        };
        assert_eq!(request.target, "/b");
        assert_eq!(response.as_ref().unwrap().status, 404);
    }

    #[test]
    fn garbage_breaks_only_its_connection_and_the_table_is_bounded() {
        let mut t = FlowTable::new(
            CaptureProtocol::Http,
            vec![80],
            FlowLimits {
                max_flows: 2,
                ..FlowLimits::default()
            },
        );
        let mut out = Vec::new();
        let mut c = Conn::new(&mut t, &mut out);
        c.send(&mut t, true, &[0xff; 20_000], &mut out);
        assert_eq!(t.counts.flows_broken, 1);
        for port in 1..10u16 {
            t.segment(
                addr(&format!("10.0.0.2:{port}")),
                addr("10.0.0.10:80"),
                true,
                Segment {
                    seq: 1,
                    syn: true,
                    fin: false,
                    rst: false,
                    data: b"",
                },
                1,
                &mut out,
            );
        }
        assert_eq!(t.len(), 2);
        assert_eq!(t.counts.flows_refused, 8);
        t.expire(100_000_000, &mut out);
        assert!(t.is_empty());
        assert!(out.is_empty());
        // Random frames never panic.
        let mut rng = crate::rng::SplitMix64::new(7);
        for _ in 0..2000 {
            let n = (rng.next_u64() % 200) as usize;
            let f: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
            t.frame(&f, 1, &mut out);
        }
    }

    #[test]
    fn tcp_streams_are_kept_per_connection() {
        let mut t = FlowTable::new(
            CaptureProtocol::Tcp,
            vec![6379],
            FlowLimits {
                max_body: 8,
                ..FlowLimits::default()
            },
        );
        let mut out = Vec::new();
        let (c, s) = (addr("10.0.0.1:5000"), addr("10.0.0.10:6379"));
        let seg = |seq, fin, data: &'static [u8]| Segment {
            seq,
            syn: false,
            fin,
            rst: false,
            data,
        };
        t.segment(c, s, true, seg(1, false, b"PING\r\n"), 1, &mut out);
        t.segment(
            c,
            s,
            false,
            seg(50, false, b"+PONG\r\n and more"),
            2,
            &mut out,
        );
        t.segment(c, s, true, seg(7, true, b""), 3, &mut out);
        t.segment(c, s, false, seg(67, true, b""), 4, &mut out);
        assert_eq!(out.len(), 1);
        let Exchange::Stream {
            to_server,
            to_client,
        } = &out[0].exchange
        else {
            panic!()
        };
        assert_eq!(to_server.data, "PING\r\n");
        assert_eq!(
            (to_client.data.as_str(), to_client.truncated),
            ("+PONG\r\n ", 8)
        );
    }
}
