//! The service manager's view of the daemon (`Type=notify` in packaging/understudy.service):
//! `READY=1` once the daemon has bound its sockets and re-read libvirt, a one-line `STATUS=`,
//! and `WATCHDOG=1` keep-alives from the main loop, so that a loop stuck for longer than
//! `WatchdogSec` gets the daemon restarted.
//!
//! Without `$NOTIFY_SOCKET` (not started by systemd) every call does nothing. A failed send is
//! logged and never stops the daemon: the service manager is a spectator, not a dependency.

use std::collections::BTreeMap;
use std::time::Duration;

use sd_notify::NotifyState;

use crate::daemon::Service;

/// How often the daemon's main loop calls [`alive`] (its housekeeping period). A watchdog
/// shorter than twice this would fire on a healthy daemon.
pub const KEEPALIVE_PERIOD: Duration = Duration::from_secs(5);

/// Tells the service manager that start-up is complete.
pub fn ready(status: &str) {
    if let Some(wd) = sd_notify::watchdog_enabled() {
        if wd < 2 * KEEPALIVE_PERIOD {
            tracing::warn!(
                watchdog_ms = wd.as_millis() as u64,
                keepalive_ms = KEEPALIVE_PERIOD.as_millis() as u64,
                "WatchdogSec is shorter than twice the keep-alive period; a busy daemon may be restarted"
            );
        }
    }
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A keep-alive from the main loop, with the current status line.
pub fn alive(status: &str) {
    send(&[NotifyState::Watchdog, NotifyState::Status(status)]);
}

/// Tells the service manager that the daemon is shutting down on purpose.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

/// One line for `systemctl status`: services by state and shadows ready, e.g.
/// `2 services (1 protected, 1 provisioning), 3 shadows paused`.
pub fn status_line<'a>(services: impl IntoIterator<Item = &'a Service>) -> String {
    summarize(services.into_iter().map(|s| {
        let paused = s.shadows.iter().filter(|x| x.state.is_standby()).count();
        (s.state.label(), paused)
    }))
}

/// [`status_line`] from (state label, paused shadows) per service.
fn summarize<'a>(services: impl IntoIterator<Item = (&'a str, usize)>) -> String {
    let mut states: BTreeMap<&str, usize> = BTreeMap::new();
    let (mut total, mut paused) = (0usize, 0usize);
    for (state, p) in services {
        total += 1;
        paused += p;
        *states.entry(state).or_default() += 1;
    }
    if total == 0 {
        return "no protected services".to_string();
    }
    let by_state: Vec<String> = states.iter().map(|(k, n)| format!("{n} {k}")).collect();
    format!(
        "{total} service{} ({}), {paused} shadow{} paused",
        if total == 1 { "" } else { "s" },
        by_state.join(", "),
        if paused == 1 { "" } else { "s" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_line_counts_states_and_paused_shadows() {
        assert_eq!(summarize([]), "no protected services");
        assert_eq!(
            summarize([("protected", 1)]),
            "1 service (1 protected), 1 shadow paused"
        );
        assert_eq!(
            summarize([("protected", 1), ("provisioning", 1), ("down", 0)]),
            "3 services (1 down, 1 protected, 1 provisioning), 2 shadows paused"
        );
    }
}
