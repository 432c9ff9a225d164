//! understudy: keeps a warm, paused shadow VM ready for every protected libvirt domain and
//! promotes it in milliseconds when the primary dies or hangs.
//!
//! Layout (one module per concern):
//! - [`config`]: the TOML configuration, parsed and validated.
//! - [`libvirt`]: all libvirt FFI: connection, event loop, guest agent, QEMU process watch.
//! - [`domain_xml`]: a libvirt domain XML tree that round-trips, and the shadow clone of a spec.
//! - [`monitor`]: collectors (cgroups, libvirt stats, guest agent), heartbeat, sample history.
//! - [`profile`]: predictive deployment profiles: model, versions, repository, accuracy.
//! - [`events`]: the journal of what the daemon does, for `understudy events`.
//! - [`failover`]: shadows, crash detection, fencing and the promotion pipeline.
//! - [`cluster`]: who owns a service and who may promote which shadow (the coordination seam).
//! - [`net`]: bridge and route rewiring over rtnetlink.
//! - [`api`]: the control socket protocol and Prometheus metrics.
//! - [`daemon`]: the long-running orchestrator that ties them together.
//! - [`plot`]: SVG charts (plotters).
//! - [`probe`]: an external client's view of a service (who answers, and the gaps).
//! - [`cli`]: the `understudy` command line.
//! - [`systemd`]: readiness, status and watchdog notifications to the service manager.
//! - [`rng`]: the seeded pseudo-random generator (tick jitter, synthetic traces).
//! - [`error`], [`clock`]: one-line error reports, wall-clock time.

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod api;
pub mod canary;
pub mod capture;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod domain_xml;
pub mod error;
pub mod events;
pub mod failover;
pub mod libvirt;
pub mod monitor;
pub mod net;
pub mod plot;
pub mod probe;
pub mod profile;
pub mod replay;
pub mod rng;
pub mod state;
pub mod systemd;
