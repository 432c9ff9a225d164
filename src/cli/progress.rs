//! Progress of long operations: a spinner line on a terminal, plain lines (each state once)
//! otherwise, and waiting with a deadline for scripts.

use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::api::control;
use crate::api::protocol::{Request, Response, ServiceStatus};

/// Reports the state of an operation on stderr.
pub(super) struct Progress {
    spinner: Option<ProgressBar>,
    last: String,
    started: Instant,
}

impl Progress {
    /// A spinner when stderr is a terminal, plain lines otherwise.
    pub(super) fn new() -> Self {
        let spinner = std::io::stderr().is_terminal().then(|| {
            let pb = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            pb.set_style(
                ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            pb.enable_steady_tick(Duration::from_millis(120));
            pb
        });
        Progress {
            spinner,
            last: String::new(),
            started: Instant::now(),
        }
    }

    /// Shows `msg` as the current state.
    pub(super) fn update(&mut self, msg: &str) {
        if msg == self.last {
            return;
        }
        self.last = msg.to_string();
        match &self.spinner {
            Some(pb) => pb.set_message(msg.to_string()),
            None => eprintln!("[{:>6.1} s] {msg}", self.started.elapsed().as_secs_f64()),
        }
    }

    /// Ends with a last line.
    pub(super) fn finish(self, msg: &str) {
        if let Some(pb) = &self.spinner {
            pb.finish_and_clear();
        }
        eprintln!("[{:>6.1} s] {msg}", self.started.elapsed().as_secs_f64());
    }
}

/// How a wait ended without success.
pub(super) enum WaitError {
    /// The deadline passed first.
    Timeout(String),
    /// The service cannot get there (down, unprotectable, gone).
    Failed(String),
}

/// One line of a service's protection: its state and each shadow's.
fn describe(s: &ServiceStatus) -> String {
    let paused = s.shadows.iter().filter(|x| x.state.is_standby()).count();
    let shadows: Vec<String> = s
        .shadows
        .iter()
        .map(|x| format!("{} {}", x.name, x.state.as_str()))
        .collect();
    format!(
        "{}: {}; {paused}/{} shadows paused{}{}",
        s.name,
        s.state,
        s.shadows.len(),
        if shadows.is_empty() { "" } else { ": " },
        shadows.join(", ")
    )
}

/// Waits until `service` is protected (every shadow paused), showing progress, for at most
/// `timeout`.
pub(super) fn wait_protected(
    socket: &Path,
    service: &str,
    timeout: Duration,
    progress: &mut Progress,
) -> Result<String, WaitError> {
    let deadline = Instant::now() + timeout;
    loop {
        let status = match control::call(socket, &Request::Status, Duration::from_secs(30)) {
            Ok(Response::Status(r)) => r,
            Ok(other) => return Err(WaitError::Failed(format!("unexpected answer: {other:?}"))),
            Err(e) => return Err(WaitError::Failed(e.to_string())),
        };
        let Some(s) = status.services.iter().find(|s| s.name == service) else {
            return Err(WaitError::Failed(format!("service '{service}' is gone")));
        };
        let line = describe(s);
        if s.state == "protected" {
            return Ok(line);
        }
        if s.state.starts_with("unprotectable") || s.state.starts_with("down") {
            return Err(WaitError::Failed(line));
        }
        progress.update(&line);
        if Instant::now() >= deadline {
            return Err(WaitError::Timeout(line));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
