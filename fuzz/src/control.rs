//! The control socket: the daemon's request decoder (what any local client may send), and the
//! CLI's response decoder and status renderer (what comes back from the socket).
//!
//! Properties: a request that decodes encodes back to itself; anything else is refused with a
//! message saying what was wrong (the `bad_request` answer); a response that decodes round-trips, a status
//! report renders as text at any clock, and a hosts report renders every host.

use understudy::api::control::{decode_request, MAX_REQUEST_BYTES};
use understudy::api::protocol::{render_hosts_text, render_status_text_at, Response};

/// Runs one input.
pub fn check(data: &[u8]) {
    // What the server reads: up to the first newline, at most one byte past the limit.
    let end = data
        .iter()
        .position(|&b| b == b'\n')
        .map_or(data.len(), |i| i + 1)
        .min(MAX_REQUEST_BYTES + 1);
    match decode_request(&data[..end]) {
        Ok(req) => {
            let mut line = serde_json::to_vec(&req).expect("a request encodes");
            line.push(b'\n');
            let back = decode_request(&line).expect("an encoded request decodes");
            assert_eq!(back, req, "request round trip");
        }
        Err(message) => {
            assert!(
                message.starts_with("malformed request: ")
                    || message.starts_with("request line exceeds"),
                "refusal does not say what is wrong: {message}"
            );
        }
    }

    if let Ok(resp) = serde_json::from_slice::<Response>(data) {
        let text = serde_json::to_vec(&resp).expect("a response encodes");
        let back: Response = serde_json::from_slice(&text).expect("an encoded response decodes");
        assert_eq!(back, resp, "response round trip");
        if let Response::Status(report) = &resp {
            for now in [0, 1_764_590_000_000, u64::MAX] {
                let out = render_status_text_at(report, now);
                assert!(!out.is_empty());
            }
        }
        if let Response::Hosts(report) = &resp {
            let out = render_hosts_text(report);
            for h in &report.hosts {
                assert!(out.contains(&format!("host {}: ", h.name)), "{out}");
            }
        }
    }
}
