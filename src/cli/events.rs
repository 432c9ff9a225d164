//! `understudy events`: the daemon's recent events, and with `--follow` the ones that come.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use crate::api::control;
use crate::api::protocol::{Request, Response};

/// Prints events as text lines or JSON lines (one object per line, flushed at once, so a pipe
/// sees each event as it happens).
pub(super) fn events(path: &Path, service: Option<String>, follow: bool, json: bool) -> ExitCode {
    let mut failed = None;
    let stdout = std::io::stdout();
    let result = control::stream(path, &Request::Events { service, follow }, |r| {
        let mut out = stdout.lock();
        let written = match r {
            Response::Event(e) if json => serde_json::to_string(&e)
                .map_err(std::io::Error::other)
                .and_then(|l| writeln!(out, "{l}")),
            Response::Event(e) => writeln!(out, "{e}"),
            // A follower that fell behind is told so, and goes on.
            Response::Error { message, .. } if follow => {
                eprintln!("understudy: {message}");
                Ok(())
            }
            Response::Error { kind, message } => {
                failed = Some(format!("{kind:?}: {message}"));
                return false;
            }
            other => {
                failed = Some(format!("unexpected answer: {other:?}"));
                return false;
            }
        };
        // A closed pipe (`| head`) ends the stream quietly.
        written.and_then(|()| out.flush()).is_ok()
    });
    match (result, failed) {
        (Err(e), _) => {
            eprintln!("understudy: {e}");
            ExitCode::from(2)
        }
        (Ok(()), Some(why)) => {
            eprintln!("understudy: {why}");
            ExitCode::from(1)
        }
        (Ok(()), None) => ExitCode::SUCCESS,
    }
}
