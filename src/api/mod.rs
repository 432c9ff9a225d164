//! Control socket protocol and Prometheus metrics.
//!
//! - [`protocol`]: the JSON-lines request/response types and the status text rendering.
//! - [`control`]: the Unix control socket server (daemon side) and client (CLI side).
//! - [`metrics`]: the metric families and the `/metrics` HTTP endpoint.
//! - [`hosts`]: the answer to `understudy hosts` and its rendering.

pub mod control;
pub mod hosts;
pub mod metrics;
pub mod protocol;

pub use control::{call, ControlError, ControlServer, RequestSender};
pub use metrics::{Metrics, MetricsError, MetricsServer};
pub use protocol::{
    render_status_text, DaemonInfo, DomainStatus, ErrorKind, Request, Response, ServiceStatus,
    ShadowStatus, StatusReport,
};
