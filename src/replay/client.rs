//! The replay client: one connection per recorded exchange, bound to the isolated shadow's
//! bridge (`SO_BINDTODEVICE`), bounded in time and in the bytes read.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::capture::{Exchange, HttpRequest};

/// Most bytes read of one answer.
pub const MAX_ANSWER: usize = 1 << 20;

/// Where replayed requests go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The link the socket is bound to (the isolated bridge).
    pub device: String,
}

/// What a replayed request got back.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Answer {
    /// HTTP status, if an HTTP answer was read.
    pub status: Option<u16>,
    /// Body (HTTP) or every byte (stream), lossily decoded and cut to [`MAX_ANSWER`].
    pub body: String,
    /// Connect to last byte, in ms.
    pub latency_ms: f64,
    /// Why no answer was read.
    pub error: Option<String>,
}

/// Opens a TCP connection to `server` through `device` only.
pub fn connect(device: &str, server: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    // Isolated bridges carry the service bridge's IPv4 addresses only.
    let SocketAddr::V4(server) = server else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            format!("{server}: recorded IPv6 traffic is not replayed (isolated bridges carry IPv4 addresses only)"),
        ));
    };
    // SAFETY: plain socket(2) call; the result is checked before use.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a new, valid descriptor owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let name = device.as_bytes();
    // SAFETY: the pointer and length describe `name`, which lives across the call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            name.as_ptr() as *const libc::c_void,
            name.len() as u32,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: the pointer and length describe `tv`; SO_SNDTIMEO also bounds connect(2).
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    // SAFETY: sockaddr_in is plain old data; all-zero is a valid value.
    let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sin.sin_family = libc::AF_INET as u16;
    sin.sin_port = server.port().to_be();
    sin.sin_addr.s_addr = u32::from(*server.ip()).to_be();
    // SAFETY: the pointer and length describe `sin`, which lives across the call.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            &sin as *const libc::sockaddr_in as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let s = TcpStream::from(fd);
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    Ok(s)
}

/// The bytes of a recorded HTTP request as replayed: one request per connection, its length
/// from the body kept.
pub fn request_bytes(r: &HttpRequest) -> Vec<u8> {
    let body = r.body.bytes();
    let mut out = format!("{} {} HTTP/1.{}\r\n", r.method, r.target, r.version.min(1)).into_bytes();
    for (n, v) in &r.headers {
        let l = n.to_ascii_lowercase();
        if matches!(
            l.as_str(),
            "content-length" | "connection" | "keep-alive" | "transfer-encoding"
        ) {
            continue;
        }
        out.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
    }
    if !body.is_empty() || matches!(r.method.as_str(), "POST" | "PUT" | "PATCH") {
        out.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    out.extend_from_slice(&body);
    out
}

/// Replays one recorded exchange against `server` through `target`.
pub fn replay(target: &Target, server: SocketAddr, ex: &Exchange, timeout: Duration) -> Answer {
    let (bytes, http) = match ex {
        Exchange::Http { request, .. } => (request_bytes(request), true),
        Exchange::Stream { to_server, .. } => (to_server.bytes(), false),
    };
    let start = Instant::now();
    let fail = |e: std::io::Error, start: Instant| Answer {
        error: Some(e.to_string()),
        latency_ms: start.elapsed().as_secs_f64() * 1000.0,
        ..Answer::default()
    };
    let mut s = match connect(&target.device, server, timeout) {
        Ok(s) => s,
        Err(e) => return fail(e, start),
    };
    if let Err(e) = s.write_all(&bytes) {
        return fail(e, start);
    }
    if !http {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    let mut buf = Vec::new();
    if let Err(e) = (&mut s).take(MAX_ANSWER as u64).read_to_end(&mut buf) {
        if buf.is_empty() {
            return fail(e, start);
        }
    }
    let latency_ms = start.elapsed().as_secs_f64() * 1000.0;
    if !http {
        return Answer {
            status: None,
            body: String::from_utf8_lossy(&buf).into_owned(),
            latency_ms,
            error: None,
        };
    }
    let mut hs = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut hs);
    match resp.parse(&buf) {
        Ok(httparse::Status::Complete(n)) => {
            // A chunked answer is compared by its content, as the capture recorded it; one cut
            // short is kept as it came.
            let chunked = resp.headers.iter().any(|h| {
                h.name.eq_ignore_ascii_case("transfer-encoding")
                    && String::from_utf8_lossy(h.value)
                        .to_ascii_lowercase()
                        .contains("chunked")
            });
            let decoded = chunked
                .then(|| {
                    crate::capture::flow::dechunk(&buf[n..], MAX_ANSWER)
                        .ok()
                        .flatten()
                })
                .flatten();
            let body = decoded.map_or_else(|| buf[n..].to_vec(), |(data, _, _)| data);
            Answer {
                status: resp.code,
                body: String::from_utf8_lossy(&body).into_owned(),
                latency_ms,
                error: None,
            }
        }
        _ => Answer {
            status: None,
            body: String::new(),
            latency_ms,
            error: Some(format!("not an HTTP response ({} bytes)", buf.len())),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::Body;

    #[test]
    fn replayed_request_is_one_shot_with_its_length() {
        let r = HttpRequest {
            method: "POST".into(),
            target: "/append?key=a".into(),
            version: 1,
            headers: vec![
                ("Host".into(), "x".into()),
                ("Connection".into(), "keep-alive".into()),
                ("Content-Length".into(), "999".into()),
            ],
            body: Body::new(b"", 0),
        };
        let text = String::from_utf8(request_bytes(&r)).unwrap();
        assert_eq!(
            text,
            "POST /append?key=a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
    }
}
