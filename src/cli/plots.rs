//! `understudy profile plot` and `understudy failover timeline`: the data comes from the
//! daemon, the SVG is drawn here (crate::plot).

use std::path::Path;
use std::time::Duration;

use crate::api::control;
use crate::api::protocol::{Request, Response};

/// Asks the daemon, expecting the one kind of answer `pick` takes.
fn ask<T>(
    socket: &Path,
    req: &Request,
    pick: impl FnOnce(Response) -> Option<T>,
) -> Result<T, String> {
    match control::call(socket, req, Duration::from_secs(60)) {
        Ok(Response::Error { kind, message }) => Err(format!("{kind:?}: {message}")),
        Ok(r) => pick(r).ok_or_else(|| format!("unexpected answer to {}", req.name())),
        Err(e) => Err(e.to_string()),
    }
}

/// Draws `service`'s observed use against its predicted envelope over the last `period`.
pub(super) fn profile_plot(
    socket: &Path,
    service: &str,
    period: Duration,
    svg: &Path,
) -> Result<String, String> {
    let since = crate::clock::now_unix_ms().saturating_sub(period.as_millis() as u64);
    let series = ask(
        socket,
        &Request::ProfileSeries {
            service: service.to_string(),
            since_unix_ms: since,
        },
        |r| match r {
            Response::ProfileSeries(s) => Some(s),
            _ => None,
        },
    )?;
    let title = format!(
        "{service}: observed use and predicted envelope, last {}",
        humantime::format_duration(period)
    );
    let chart = crate::plot::envelope(&title, &series.points).map_err(|e| e.to_string())?;
    std::fs::write(svg, chart).map_err(|e| format!("cannot write {}: {e}", svg.display()))?;
    Ok(format!(
        "wrote {}: {} observations of {service}",
        svg.display(),
        series.points.len()
    ))
}

/// Draws the steps of `service`'s last failover.
pub(super) fn failover_timeline(
    socket: &Path,
    service: &str,
    svg: &Path,
) -> Result<String, String> {
    let status = ask(socket, &Request::Status, |r| match r {
        Response::Status(s) => Some(s),
        _ => None,
    })?;
    let s = status
        .services
        .iter()
        .find(|s| s.name == service)
        .ok_or_else(|| format!("no service named '{service}'"))?;
    let record = s.last_failover.as_ref().ok_or_else(|| {
        format!("service '{service}' has not failed over since the daemon started")
    })?;
    let title = format!(
        "{service}: {} -> {} ({}), {}",
        record.from,
        record.to,
        record.trigger,
        crate::events::format_unix_ms(record.at_unix_ms)
    );
    let chart = crate::plot::timeline(&title, record).map_err(|e| e.to_string())?;
    std::fs::write(svg, chart).map_err(|e| format!("cannot write {}: {e}", svg.display()))?;
    Ok(format!(
        "wrote {}: {} steps, outage {:.1} ms",
        svg.display(),
        record.steps.len(),
        record.outage_ms
    ))
}
