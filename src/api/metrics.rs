//! Prometheus metrics: the registry of every family the daemon exports, and a minimal
//! HTTP/1.1 endpoint serving `GET /metrics` in OpenMetrics text format.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets_range, Histogram};
use prometheus_client::registry::Registry;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use crate::failover::record::{ShadowState, StepTiming, Trigger};

/// Content type of the exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of the classic text exposition, for clients that do not ask for OpenMetrics
/// (curl, `promtool check metrics`).
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Largest accepted HTTP request head; a scrape request is a few hundred bytes.
const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// Whole-connection budget, so a stalled scraper cannot hold a task forever.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the metrics endpoint.
#[derive(Debug, Error)]
pub enum MetricsError {
    /// The listening socket could not be bound.
    #[error("cannot bind metrics endpoint on {addr}")]
    Bind {
        /// Requested address.
        addr: SocketAddr,
        /// Underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The bound address could not be read back.
    #[error("cannot read the local address of the metrics endpoint")]
    LocalAddr(#[source] std::io::Error),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailoverLabels {
    service: String,
    trigger: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabels {
    step: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MemberMemoryLabels {
    service: String,
    domain: String,
    /// `primary`, or the shadow's state.
    role: String,
    /// `cgroup`, `cgroup_anon`, `rss` or `pss`.
    measure: String,
}

/// What standing by costs one service, as [`Metrics::set_standby_cost`] exports it.
#[derive(Debug, Clone)]
pub struct StandbyCost {
    /// The service.
    pub service: String,
    /// Host memory its standing-by shadows hold together.
    pub standby_bytes: u64,
    /// That as a fraction of the primary's (`None`: the primary's is unknown).
    pub standby_share: Option<f64>,
    /// Each measured member: domain, role (`primary` or the shadow's state), figures.
    pub members: Vec<(String, &'static str, crate::monitor::memcost::MemoryHeld)>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DriftLabels {
    service: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProfileMetricLabels {
    service: String,
    metric: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostFenceLabels {
    host: String,
    how: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CollectorLabels {
    service: String,
    source: String,
}

type RatioGauge = Gauge<f64, AtomicU64>;
type SecondsCounter = Counter<f64, AtomicU64>;

/// Buckets from 1 ms to 10 s, exponential (factor ≈ 2.15, 13 buckets): failover steps range
/// from sub-millisecond netlink calls to multi-second fencing. Bounds are rounded to three
/// significant digits so the `le` labels read `0.00215`, not `0.002154434690031884`.
fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets_range(0.001, 10.0, 13).map(round_3_significant))
}

fn round_3_significant(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return v;
    }
    let scale = 10f64.powi(2 - v.log10().floor() as i32);
    (v * scale).round() / scale
}

/// Every metric family the daemon exports, registered in one [`Registry`].
///
/// Families are cheap to update concurrently; share the struct as `Arc<Metrics>`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    failovers: Family<FailoverLabels, Counter>,
    failover_steps: Family<StepLabels, Histogram, fn() -> Histogram>,
    failover_outage: Histogram,
    shadows: Family<StateLabels, Gauge>,
    services: Family<StateLabels, Gauge>,
    heartbeat_failures: Family<ServiceLabels, Counter>,
    false_failovers: Family<ServiceLabels, Counter>,
    missed_failovers: Family<ServiceLabels, Counter>,
    foreign_mac_ports: Family<ServiceLabels, Counter>,
    drift_events: Family<DriftLabels, Counter>,
    profile_coverage: Family<ProfileMetricLabels, RatioGauge>,
    profile_underprediction: Family<ProfileMetricLabels, RatioGauge>,
    profile_waste: Family<ProfileMetricLabels, RatioGauge>,
    collector_errors: Family<CollectorLabels, Counter>,
    collector_cpu: Family<ServiceLabels, SecondsCounter>,
    libvirt_reconnects: Counter,
    detections: Family<SourceLabels, Counter>,
    standby_memory: Family<ServiceLabels, Gauge>,
    standby_share: Family<ServiceLabels, RatioGauge>,
    member_memory: Family<MemberMemoryLabels, Gauge>,
    /// Series of the three standby families exported last round, so members and services that
    /// are gone lose theirs.
    standby_series: std::sync::Mutex<(Vec<ServiceLabels>, Vec<MemberMemoryLabels>)>,
    cluster_mode: Family<StateLabels, Gauge>,
    host_fences: Family<HostFenceLabels, Counter>,
    self_fences: Family<ResultLabels, Counter>,
    capture_running: Family<ServiceLabels, Gauge>,
    capture_records: Family<OutcomeLabels, Gauge>,
    capture_store_bytes: Family<ServiceLabels, Gauge>,
    canary_runs: Family<OutcomeLabels, Counter>,
    canary_differing: Family<ServiceLabels, Gauge>,
    canary_fidelity: Family<ServiceLabels, RatioGauge>,
    canary_envelope: Family<ProfileMetricLabels, RatioGauge>,
    verify_runs: Family<OutcomeLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    service: String,
    outcome: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers all families under the `understudy_` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("understudy");
        let failovers = Family::default();
        let failover_steps = Family::new_with_constructor(seconds_histogram as fn() -> Histogram);
        let failover_outage = seconds_histogram();
        let shadows = Family::default();
        let services = Family::default();
        let heartbeat_failures = Family::default();
        let false_failovers = Family::default();
        let missed_failovers = Family::default();
        let foreign_mac_ports = Family::default();
        let drift_events = Family::default();
        let profile_coverage = Family::default();
        let profile_underprediction = Family::default();
        let profile_waste = Family::default();
        let collector_errors = Family::default();
        let collector_cpu = Family::default();
        let libvirt_reconnects = Counter::default();
        let cluster_mode = Family::<StateLabels, Gauge>::default();
        let host_fences = Family::<HostFenceLabels, Counter>::default();
        let self_fences = Family::<ResultLabels, Counter>::default();
        for result in ["ok", "error"] {
            drop(self_fences.get_or_create(&ResultLabels {
                result: result.to_string(),
            }));
        }
        let detections = Family::default();
        let standby_memory = Family::default();
        let standby_share = Family::default();
        let member_memory = Family::default();
        let capture_running = Family::default();
        let capture_records = Family::default();
        let capture_store_bytes = Family::default();
        let canary_runs = Family::default();
        let canary_differing = Family::default();
        let canary_fidelity = Family::default();
        let canary_envelope = Family::default();
        let verify_runs = Family::default();
        // Series that exist before their first event start at 0, so that `increase()` and
        // `rate()` see the first failover of a step or trigger (a series born at 1 shows none).
        for step in crate::failover::promote::STEPS {
            drop(failover_steps.get_or_create(&StepLabels {
                step: step.to_string(),
            }));
        }
        for t in Trigger::ALL {
            drop(detections.get_or_create(&SourceLabels {
                source: t.label().to_string(),
            }));
        }
        // Counters get their `_total` suffix from the encoder.
        registry.register(
            "failovers",
            "Failovers by service, trigger and result (ok|error)",
            Family::clone(&failovers),
        );
        registry.register(
            "failover_step_seconds",
            "Duration of each failover pipeline step",
            failover_steps.clone(),
        );
        registry.register(
            "failover_outage_seconds",
            "Estimated outage per failover, from failure detection to traffic restored",
            failover_outage.clone(),
        );
        registry.register(
            "shadows",
            "Shadow domains by state",
            Family::clone(&shadows),
        );
        registry.register(
            "services",
            "Protected services by state",
            Family::clone(&services),
        );
        registry.register(
            "heartbeat_failures",
            "Missed or failed heartbeats of active domains",
            Family::clone(&heartbeat_failures),
        );
        registry.register(
            "false_failovers",
            "Failovers later judged unnecessary",
            Family::clone(&false_failovers),
        );
        registry.register(
            "missed_failovers",
            "Failures of an active domain that no failover answered",
            Family::clone(&missed_failovers),
        );
        registry.register(
            "foreign_mac_ports",
            "Times a bridge port other than the active primary's tap carried the service MAC",
            Family::clone(&foreign_mac_ports),
        );
        registry.register(
            "drift_events",
            "Detected drift between a service's profile and its observed behaviour",
            Family::clone(&drift_events),
        );
        registry.register(
            "profile_coverage_ratio",
            "Fraction of observed samples within the profile's prediction",
            Family::clone(&profile_coverage),
        );
        registry.register(
            "profile_underprediction_ratio",
            "Fraction of observed samples above the profile's prediction",
            Family::clone(&profile_underprediction),
        );
        registry.register(
            "profile_waste_ratio",
            "Fraction of predicted resources left unused",
            Family::clone(&profile_waste),
        );
        registry.register(
            "collector_errors",
            "Failed metric collections by service and source",
            Family::clone(&collector_errors),
        );
        registry.register(
            "collector_cpu_seconds",
            "CPU time the collector of each service spent collecting and learning (its work on \
             the blocking thread; the cost of monitoring)",
            Family::clone(&collector_cpu),
        );
        registry.register(
            "libvirt_reconnects",
            "Reconnections to libvirt",
            libvirt_reconnects.clone(),
        );
        registry.register(
            "detection",
            "Failure detections by source (pidfd|lifecycle|heartbeat|manual)",
            Family::clone(&detections),
        );
        registry.register(
            "cluster_mode",
            "How this host stands with etcd: 1 for the current state (standalone|starting|connected|etcd_unreachable)",
            Family::clone(&cluster_mode),
        );
        registry.register(
            "host_fences",
            "Other hosts found lost and made safe by this host, by host, how \
             (fence_device|lease_expired) and result (ok|error)",
            Family::clone(&host_fences),
        );
        registry.register(
            "self_fences",
            "Times this host destroyed its own primaries because it could not renew its lease \
             and heard no peer, by result (ok|error: a QEMU not confirmed killed)",
            Family::clone(&self_fences),
        );
        registry.register_with_unit(
            "standby_memory",
            "Host memory each service's paused shadows hold (their cgroups' charge, else their \
             QEMU processes' PSS): what standing by costs",
            prometheus_client::registry::Unit::Bytes,
            Family::clone(&standby_memory),
        );
        registry.register(
            "standby_memory_share_ratio",
            "Host memory of each service's paused shadows as a fraction of its primary's",
            Family::clone(&standby_share),
        );
        registry.register_with_unit(
            "member_memory",
            "Host memory each primary and shadow holds, by measure: cgroup (its cgroup's \
             charge), cgroup_anon, rss, pss and private (of its QEMU process; private is what \
             the host gets back when it goes)",
            prometheus_client::registry::Unit::Bytes,
            Family::clone(&member_memory),
        );
        registry.register(
            "capture_running",
            "1 while the service's primary traffic is being captured",
            Family::clone(&capture_running),
        );
        registry.register(
            "capture_records",
            "Captured records since the capture started, by outcome (stored|rate_dropped|oversize|broken_connections|refused_connections)",
            Family::clone(&capture_records),
        );
        registry.register_with_unit(
            "capture_store",
            "Bytes in the service's capture store",
            prometheus_client::registry::Unit::Bytes,
            Family::clone(&capture_store_bytes),
        );
        registry.register(
            "canary_runs",
            "Canaries by service and outcome (started|clean|differs|failed|aborted|promoted)",
            Family::clone(&canary_runs),
        );
        registry.register(
            "canary_differing_requests",
            "Requests whose answers differed beyond the noise in the service's last canary",
            Family::clone(&canary_differing),
        );
        registry.register(
            "canary_fidelity_ratio",
            "Share of replayed requests answered alike by the last canary and its baseline",
            Family::clone(&canary_fidelity),
        );
        registry.register(
            "canary_envelope_use_ratio",
            "The last canary's use of a resource (cpu|mem) as a share of the limit of the service profile's envelope (above 1: beyond it)",
            Family::clone(&canary_envelope),
        );
        registry.register(
            "verify_runs",
            "Standby verifications by service and outcome (passed|failed)",
            Family::clone(&verify_runs),
        );
        Metrics {
            verify_runs,
            capture_running,
            capture_records,
            capture_store_bytes,
            canary_runs,
            canary_differing,
            canary_fidelity,
            canary_envelope,
            registry,
            failovers,
            failover_steps,
            failover_outage,
            shadows,
            services,
            heartbeat_failures,
            false_failovers,
            missed_failovers,
            foreign_mac_ports,
            drift_events,
            profile_coverage,
            profile_underprediction,
            profile_waste,
            collector_errors,
            collector_cpu,
            libvirt_reconnects,
            cluster_mode,
            host_fences,
            self_fences,
            detections,
            standby_memory,
            standby_share,
            member_memory,
            standby_series: Default::default(),
        }
    }

    /// Creates `service`'s per-service counters at 0 (see [`Metrics::new`] for why); cheap
    /// to call again.
    pub fn initialize_service(&self, service: &str) {
        for t in Trigger::ALL {
            for result in ["ok", "error"] {
                drop(self.failovers.get_or_create(&FailoverLabels {
                    service: service.to_string(),
                    trigger: t.label().to_string(),
                    result: result.to_string(),
                }));
            }
        }
        for kind in crate::profile::manager::DRIFT_LABELS {
            drop(self.drift_events.get_or_create(&DriftLabels {
                service: service.to_string(),
                kind: kind.to_string(),
            }));
        }
        let labels = service_labels(service);
        // Each returns a read guard on its family; created is all that matters here.
        drop(self.heartbeat_failures.get_or_create(&labels));
        drop(self.false_failovers.get_or_create(&labels));
        drop(self.missed_failovers.get_or_create(&labels));
    }

    /// Sets what standing by costs every current service; services and members absent now
    /// lose their series.
    pub fn set_standby_cost(&self, costs: Vec<StandbyCost>) {
        let mut exported = self
            .standby_series
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let (mut services, mut members) = (Vec::new(), Vec::new());
        let gauge = |bytes: u64| i64::try_from(bytes).unwrap_or(i64::MAX);
        for c in costs {
            let labels = service_labels(&c.service);
            self.standby_memory
                .get_or_create(&labels)
                .set(gauge(c.standby_bytes));
            match c.standby_share {
                Some(r) => {
                    self.standby_share.get_or_create(&labels).set(r);
                }
                None => {
                    self.standby_share.remove(&labels);
                }
            }
            services.push(labels);
            for (domain, role, m) in c.members {
                let figures = [
                    ("cgroup", m.cgroup_bytes),
                    ("cgroup_anon", m.cgroup_anon_bytes),
                    ("rss", Some(m.rss_bytes)),
                    ("pss", m.pss_bytes),
                    ("private", m.private_bytes),
                ];
                for (measure, value) in figures {
                    let Some(v) = value else { continue };
                    let l = MemberMemoryLabels {
                        service: c.service.clone(),
                        domain: domain.clone(),
                        role: role.to_string(),
                        measure: measure.to_string(),
                    };
                    self.member_memory.get_or_create(&l).set(gauge(v));
                    members.push(l);
                }
            }
        }
        for gone in exported.0.iter().filter(|l| !services.contains(l)) {
            self.standby_memory.remove(gone);
            self.standby_share.remove(gone);
        }
        for gone in exported.1.iter().filter(|l| !members.contains(l)) {
            self.member_memory.remove(gone);
        }
        *exported = (services, members);
    }

    /// Records one failover: the counter, each step's duration and the outage estimate.
    pub fn record_failover(
        &self,
        service: &str,
        trigger: Trigger,
        ok: bool,
        steps: &[StepTiming],
        outage_ms: f64,
    ) {
        self.failovers
            .get_or_create(&FailoverLabels {
                service: service.to_string(),
                trigger: trigger.label().to_string(),
                result: if ok { "ok" } else { "error" }.to_string(),
            })
            .inc();
        for step in steps {
            self.failover_steps
                .get_or_create(&StepLabels {
                    step: step.name.clone(),
                })
                .observe(ms_to_seconds(step.ms));
        }
        self.failover_outage.observe(ms_to_seconds(outage_ms));
    }

    /// Sets the cluster mode gauge: 1 for `mode`, 0 for every other (each exported from the
    /// first call).
    pub fn set_cluster_mode(&self, mode: crate::cluster::Mode) {
        for m in crate::cluster::Mode::ALL {
            self.cluster_mode
                .get_or_create(&StateLabels {
                    state: m.label().to_string(),
                })
                .set(i64::from(m == mode));
        }
    }

    /// Sets the shadow gauge from the states of all current shadows; every state is exported,
    /// zero included, so a state that empties out drops to 0 instead of going stale.
    pub fn set_shadow_states(&self, states: impl IntoIterator<Item = ShadowState>) {
        let mut counts = [0i64; ShadowState::ALL.len()];
        for s in states {
            if let Some(i) = ShadowState::ALL
                .iter()
                .position(|x| x.as_str() == s.as_str())
            {
                counts[i] += 1;
            }
        }
        for (state, count) in ShadowState::ALL.iter().zip(counts) {
            self.shadows
                .get_or_create(&StateLabels {
                    state: state.as_str().to_string(),
                })
                .set(count);
        }
    }

    /// Sets the service gauge from the states of all services; states previously exported
    /// but absent now are set to 0.
    pub fn set_service_states<'a>(&self, states: impl IntoIterator<Item = &'a str>) {
        let mut counts: std::collections::BTreeMap<&str, i64> = Default::default();
        for s in states {
            *counts.entry(s).or_default() += 1;
        }
        // Known states absent now drop to 0 rather than keep a stale count; no label ever
        // disappears between scrapes.
        for state in KNOWN_SERVICE_STATES {
            if !counts.contains_key(state) {
                self.services
                    .get_or_create(&StateLabels {
                        state: state.to_string(),
                    })
                    .set(0);
            }
        }
        for (state, count) in counts {
            self.services
                .get_or_create(&StateLabels {
                    state: state.to_string(),
                })
                .set(count);
        }
    }

    /// Counts a failed heartbeat of `service`'s active domain.
    pub fn inc_heartbeat_failure(&self, service: &str) {
        self.heartbeat_failures
            .get_or_create(&service_labels(service))
            .inc();
    }

    /// Counts a failover of `service` judged unnecessary.
    pub fn inc_false_failover(&self, service: &str) {
        self.false_failovers
            .get_or_create(&service_labels(service))
            .inc();
    }

    /// Counts a bridge port other than `service`'s active tap seen carrying its MAC.
    pub fn inc_foreign_mac_port(&self, service: &str) {
        self.foreign_mac_ports
            .get_or_create(&service_labels(service))
            .inc();
    }

    /// Counts a failure of `service` that no failover answered.
    pub fn inc_missed_failover(&self, service: &str) {
        self.missed_failovers
            .get_or_create(&service_labels(service))
            .inc();
    }

    /// Counts a drift event of `kind` for `service`.
    pub fn inc_drift_event(&self, service: &str, kind: &str) {
        self.drift_events
            .get_or_create(&DriftLabels {
                service: service.to_string(),
                kind: kind.to_string(),
            })
            .inc();
    }

    /// Sets the accuracy ratios of `service`'s profile for one `metric` (e.g. `cpu`, `memory`).
    pub fn set_profile_accuracy(
        &self,
        service: &str,
        metric: &str,
        coverage: f64,
        underprediction: f64,
        waste: f64,
    ) {
        let labels = ProfileMetricLabels {
            service: service.to_string(),
            metric: metric.to_string(),
        };
        self.profile_coverage.get_or_create(&labels).set(coverage);
        self.profile_underprediction
            .get_or_create(&labels)
            .set(underprediction);
        self.profile_waste.get_or_create(&labels).set(waste);
    }

    /// Counts a failed collection from `source` (e.g. `cgroup`, `libvirt`, `agent`).
    pub fn inc_collector_error(&self, service: &str, source: &str) {
        self.collector_errors
            .get_or_create(&CollectorLabels {
                service: service.to_string(),
                source: source.to_string(),
            })
            .inc();
    }

    /// Adds CPU time spent by the collector of `service`.
    pub fn add_collector_cpu(&self, service: &str, seconds: f64) {
        if seconds.is_finite() && seconds > 0.0 {
            self.collector_cpu
                .get_or_create(&service_labels(service))
                .inc_by(seconds);
        }
    }

    /// Marks the service's capture as running or not.
    pub fn set_capture_running(&self, service: &str, running: bool) {
        self.capture_running
            .get_or_create(&service_labels(service))
            .set(i64::from(running));
    }

    /// Exports a capture's counters.
    pub fn set_capture_stats(&self, service: &str, s: &crate::capture::CaptureStats) {
        for (outcome, v) in [
            ("stored", s.stored),
            ("rate_dropped", s.rate_dropped),
            ("oversize", s.oversize),
            ("broken_connections", s.broken),
            ("refused_connections", s.refused),
        ] {
            self.capture_records
                .get_or_create(&OutcomeLabels {
                    service: service.to_string(),
                    outcome: outcome.to_string(),
                })
                .set(i64::try_from(v).unwrap_or(i64::MAX));
        }
        self.capture_store_bytes
            .get_or_create(&service_labels(service))
            .set(i64::try_from(s.store_bytes).unwrap_or(i64::MAX));
    }

    /// Counts a canary outcome.
    pub fn inc_canary(&self, service: &str, outcome: &str) {
        self.canary_runs
            .get_or_create(&OutcomeLabels {
                service: service.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// Counts a standby verification's outcome.
    pub fn inc_verify(&self, service: &str, outcome: &str) {
        self.verify_runs
            .get_or_create(&OutcomeLabels {
                service: service.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// Exports a finished canary's comparison.
    pub fn set_canary_result(&self, service: &str, c: &crate::replay::Comparison) {
        let l = service_labels(service);
        self.canary_differing
            .get_or_create(&l)
            .set(c.differing.len() as i64);
        self.canary_fidelity.get_or_create(&l).set(c.fidelity());
    }

    /// Exports a finished canary's use of each resource against the profile's envelope.
    pub fn set_canary_envelope(&self, service: &str, e: &crate::canary::EnvelopeReport) {
        if let crate::canary::EnvelopeReport::Compared { checks, .. } = e {
            for c in checks {
                if let Some(v) = c.canary {
                    self.canary_envelope
                        .get_or_create(&ProfileMetricLabels {
                            service: service.to_string(),
                            metric: c.metric.clone(),
                        })
                        .set(v / c.limit);
                }
            }
        }
    }

    /// Counts a reconnection to libvirt.
    pub fn inc_libvirt_reconnect(&self) {
        self.libvirt_reconnects.inc();
    }

    /// Counts another host made safe by this one (`how`: `fence_device`, `lease_expired`).
    pub fn inc_host_fence(&self, host: &str, how: &str, ok: bool) {
        self.host_fences
            .get_or_create(&HostFenceLabels {
                host: host.to_string(),
                how: how.to_string(),
                result: if ok { "ok" } else { "error" }.to_string(),
            })
            .inc();
    }

    /// Counts this host fencing itself.
    pub fn inc_self_fence(&self, ok: bool) {
        self.self_fences
            .get_or_create(&ResultLabels {
                result: if ok { "ok" } else { "error" }.to_string(),
            })
            .inc();
    }

    /// Counts a failure detection by `source` (`pidfd`, `lifecycle`, `heartbeat`, `manual`).
    pub fn inc_detection(&self, source: Trigger) {
        self.detections
            .get_or_create(&SourceLabels {
                source: source.label().to_string(),
            })
            .inc();
    }

    /// The classic Prometheus text format (0.0.4) of the same families: a counter's HELP and
    /// TYPE name its `_total` samples, and there is no `# UNIT` or `# EOF`.
    pub fn encode_text(&self) -> String {
        openmetrics_to_text(&self.encode())
    }

    /// The OpenMetrics text exposition of every family, ending with `# EOF`.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; an error would only come from a broken
        // EncodeLabelSet, which the derive rules out.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            warn!(error = %e, "metrics encoding failed");
        }
        out
    }
}

/// Rewrites the OpenMetrics exposition that prometheus-client writes as text format 0.0.4.
fn openmetrics_to_text(om: &str) -> String {
    let counters: std::collections::HashSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let (name, rest) = line.strip_prefix(prefix)?.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {rest}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// Whether a request head asks for OpenMetrics (Prometheus does; curl does not).
fn wants_openmetrics(head: &[u8]) -> bool {
    String::from_utf8_lossy(head).lines().any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("accept") && v.contains("application/openmetrics-text")
        })
    })
}

/// Service states always exported by [`Metrics::set_service_states`], zero when unused: the
/// labels of the daemon's service states (a daemon test checks they match).
pub const KNOWN_SERVICE_STATES: [&str; 8] = [
    "provisioning",
    "protected",
    "failing_over",
    "down",
    "stopped",
    "unprotectable",
    "elsewhere",
    "handing_over",
];

fn service_labels(service: &str) -> ServiceLabels {
    ServiceLabels {
        service: service.to_string(),
    }
}

fn ms_to_seconds(ms: f64) -> f64 {
    if ms.is_finite() && ms > 0.0 {
        ms / 1000.0
    } else {
        0.0
    }
}

/// A bound metrics endpoint.
#[derive(Debug)]
pub struct MetricsServer {
    listener: TcpListener,
}

impl MetricsServer {
    /// Binds the endpoint on `addr` (port 0 picks a free port).
    pub async fn bind(addr: SocketAddr) -> Result<Self, MetricsError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| MetricsError::Bind { addr, source })?;
        Ok(MetricsServer { listener })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> Result<SocketAddr, MetricsError> {
        self.listener.local_addr().map_err(MetricsError::LocalAddr)
    }

    /// Serves scrapes forever; one task per connection, one request per connection.
    pub async fn serve(self, metrics: Arc<Metrics>) {
        if let Ok(addr) = self.listener.local_addr() {
            info!(%addr, "metrics endpoint listening");
        }
        loop {
            match self.listener.accept().await {
                Ok((stream, peer)) => {
                    let metrics = Arc::clone(&metrics);
                    tokio::spawn(async move {
                        if tokio::time::timeout(CONNECTION_TIMEOUT, handle_http(stream, &metrics))
                            .await
                            .is_err()
                        {
                            debug!(%peer, "metrics connection timed out");
                        }
                    });
                }
                Err(e) => {
                    warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// Outcome of parsing a request head.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    NotFound,
    MethodNotAllowed,
    BadRequest,
    TooLarge,
}

/// Routes a request from its head bytes (everything up to the blank line, or less).
fn route(head: &[u8], complete: bool) -> Route {
    if !complete {
        return if head.len() >= MAX_REQUEST_HEAD {
            Route::TooLarge
        } else {
            Route::BadRequest
        };
    }
    let Ok(text) = std::str::from_utf8(head) else {
        return Route::BadRequest;
    };
    let request_line = text.lines().next().unwrap_or("");
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest;
    };
    if !version.starts_with("HTTP/1.") {
        return Route::BadRequest;
    }
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => Route::Metrics,
        (_, "/metrics") => Route::MethodNotAllowed,
        _ => Route::NotFound,
    }
}

async fn handle_http(mut stream: TcpStream, metrics: &Metrics) {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let complete = loop {
        if let Some(end) = find_head_end(&head) {
            head.truncate(end);
            break true;
        }
        if head.len() >= MAX_REQUEST_HEAD {
            break false;
        }
        match stream.read(&mut buf).await {
            Ok(0) => break false,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) => {
                debug!(error = %e, "metrics request read failed");
                return;
            }
        }
    };
    if !complete && head.is_empty() {
        return; // connected and left without a word
    }
    let (status, content_type, body) = match route(&head, complete) {
        Route::Metrics if wants_openmetrics(&head) => ("200 OK", CONTENT_TYPE, metrics.encode()),
        Route::Metrics => ("200 OK", TEXT_CONTENT_TYPE, metrics.encode_text()),
        Route::NotFound => ("404 Not Found", "text/plain", "not found\n".to_string()),
        Route::MethodNotAllowed => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_string(),
        ),
        Route::BadRequest => ("400 Bad Request", "text/plain", "bad request\n".to_string()),
        Route::TooLarge => (
            "431 Request Header Fields Too Large",
            "text/plain",
            "request too large\n".to_string(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if let Err(e) = stream.write_all(response.as_bytes()).await {
        debug!(error = %e, "metrics response write failed");
        return;
    }
    let _ = stream.shutdown().await;
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").or_else(|| {
        // Be lenient with bare-LF clients (e.g. hand-typed requests).
        buf.windows(2).position(|w| w == b"\n\n")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(name: &str, ms: f64) -> StepTiming {
        StepTiming {
            name: name.to_string(),
            ms,
            start_ms: None,
        }
    }

    #[test]
    fn encode_contains_every_family_after_recording() {
        let m = Metrics::new();
        m.record_failover(
            "web",
            Trigger::Pidfd,
            true,
            &[step("fence", 2.0), step("resume", 4.0)],
            25.0,
        );
        m.record_failover("web", Trigger::Heartbeat, false, &[], 5000.0);
        m.set_shadow_states([
            ShadowState::PAUSED,
            ShadowState::PAUSED,
            ShadowState::Booting,
        ]);
        m.set_service_states(["protected", "provisioning", "protected"]);
        m.set_standby_cost(vec![
            cost("web", 200 << 20, Some(0.5), &["web", "web-shadow-1"]),
            cost("db", 1, None, &[]),
        ]);
        m.inc_heartbeat_failure("web");
        m.inc_false_failover("web");
        m.inc_missed_failover("db");
        m.inc_foreign_mac_port("web");
        m.inc_drift_event("web", "memory");
        m.set_profile_accuracy("web", "cpu", 0.95, 0.03, 0.25);
        m.inc_collector_error("web", "agent");
        m.add_collector_cpu("web", 0.5);
        m.add_collector_cpu("web", f64::NAN);
        m.inc_libvirt_reconnect();
        m.inc_detection(Trigger::Pidfd);
        m.set_cluster_mode(crate::cluster::Mode::Unreachable);
        let text = m.encode();

        for line in [
            r#"understudy_failovers_total{service="web",trigger="pidfd",result="ok"} 1"#,
            r#"understudy_failovers_total{service="web",trigger="heartbeat",result="error"} 1"#,
            r#"understudy_failover_step_seconds_count{step="fence"} 1"#,
            r#"understudy_failover_step_seconds_sum{step="resume"} 0.004"#,
            "understudy_failover_outage_seconds_count 2",
            r#"understudy_shadows{state="paused"} 2"#,
            r#"understudy_shadows{state="booting"} 1"#,
            r#"understudy_shadows{state="failed"} 0"#,
            r#"understudy_services{state="protected"} 2"#,
            r#"understudy_services{state="provisioning"} 1"#,
            r#"understudy_services{state="unprotectable"} 0"#,
            r#"understudy_standby_memory_bytes{service="web"} 209715200"#,
            r#"understudy_standby_memory_bytes{service="db"} 1"#,
            r#"understudy_standby_memory_share_ratio{service="web"} 0.5"#,
            r#"understudy_member_memory_bytes{service="web",domain="web",role="primary",measure="cgroup"} 3"#,
            r#"understudy_member_memory_bytes{service="web",domain="web-shadow-1",role="paused",measure="pss"} 1"#,
            r#"understudy_heartbeat_failures_total{service="web"} 1"#,
            r#"understudy_false_failovers_total{service="web"} 1"#,
            r#"understudy_missed_failovers_total{service="db"} 1"#,
            r#"understudy_foreign_mac_ports_total{service="web"} 1"#,
            r#"understudy_drift_events_total{service="web",kind="memory"} 1"#,
            r#"understudy_profile_coverage_ratio{service="web",metric="cpu"} 0.95"#,
            r#"understudy_profile_underprediction_ratio{service="web",metric="cpu"} 0.03"#,
            r#"understudy_profile_waste_ratio{service="web",metric="cpu"} 0.25"#,
            r#"understudy_collector_errors_total{service="web",source="agent"} 1"#,
            r#"understudy_collector_cpu_seconds_total{service="web"} 0.5"#,
            "understudy_libvirt_reconnects_total 1",
            r#"understudy_detection_total{source="pidfd"} 1"#,
            r#"understudy_cluster_mode{state="etcd_unreachable"} 1"#,
            r#"understudy_cluster_mode{state="connected"} 0"#,
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
        assert!(text.contains("# TYPE understudy_failover_step_seconds histogram"));
        // Cumulative buckets: 25 ms and 5 s are both under 10 s, neither under 1 ms.
        assert!(
            text.contains(r#"understudy_failover_outage_seconds_bucket{le="0.0464"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"understudy_failover_outage_seconds_bucket{le="0.001"} 0"#),
            "{text}"
        );
        assert!(
            text.contains(r#"understudy_failover_outage_seconds_bucket{le="10.0"} 2"#),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn bucket_bounds_are_readable() {
        let text = {
            let m = Metrics::new();
            m.record_failover("s", Trigger::Manual, true, &[], 1.0);
            m.encode()
        };
        let les: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("understudy_failover_outage_seconds_bucket"))
            .filter_map(|l| l.split('"').nth(1))
            .collect();
        assert_eq!(
            les,
            [
                "0.001", "0.00215", "0.00464", "0.01", "0.0215", "0.0464", "0.1", "0.215", "0.464",
                "1.0", "2.15", "4.64", "10.0", "+Inf"
            ]
        );
    }

    #[test]
    fn emptied_states_drop_to_zero() {
        let m = Metrics::new();
        m.set_shadow_states([ShadowState::Promoting]);
        m.set_shadow_states([]);
        m.set_service_states(["weird_state"]);
        m.set_service_states(["stopped"]);
        let text = m.encode();
        assert!(
            text.contains(r#"understudy_shadows{state="promoting"} 0"#),
            "{text}"
        );
        assert!(
            text.contains(r#"understudy_services{state="stopped"} 1"#),
            "{text}"
        );
        // Unknown states set once stay exported; they are not in the zeroing list.
        assert!(
            text.contains(r#"understudy_services{state="weird_state"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn series_exist_at_zero_before_their_first_event() {
        let m = Metrics::new();
        m.initialize_service("web");
        let text = m.encode();
        for line in [
            r#"understudy_failover_step_seconds_count{step="resume"} 0"#,
            r#"understudy_detection_total{source="heartbeat"} 0"#,
            r#"understudy_failovers_total{service="web",trigger="pidfd",result="ok"} 0"#,
            r#"understudy_failovers_total{service="web",trigger="manual",result="error"} 0"#,
            r#"understudy_drift_events_total{service="web",kind="level_shift"} 0"#,
            r#"understudy_heartbeat_failures_total{service="web"} 0"#,
            r#"understudy_false_failovers_total{service="web"} 0"#,
            r#"understudy_missed_failovers_total{service="web"} 0"#,
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
    }

    /// A service's cost: its first member the primary, the others paused shadows.
    fn cost(service: &str, bytes: u64, share: Option<f64>, members: &[&str]) -> StandbyCost {
        let figures = crate::monitor::memcost::MemoryHeld {
            cgroup_bytes: Some(3),
            cgroup_anon_bytes: None,
            rss_bytes: 2,
            pss_bytes: Some(1),
            private_bytes: Some(1),
        };
        StandbyCost {
            service: service.into(),
            standby_bytes: bytes,
            standby_share: share,
            members: members
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    (
                        d.to_string(),
                        if i == 0 { "primary" } else { "paused" },
                        figures,
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn standby_memory_of_a_removed_service_disappears() {
        let m = Metrics::new();
        m.set_standby_cost(vec![
            cost("web", 5, Some(0.1), &["web", "web-shadow-1"]),
            cost("db", 7, Some(0.2), &["db", "db-shadow-1"]),
        ]);
        m.set_standby_cost(vec![cost("web", 6, Some(0.1), &["web"])]);
        let text = m.encode();
        assert!(!text.contains("web-shadow-1"), "{text}");
        assert!(
            text.contains(r#"understudy_member_memory_bytes{service="web",domain="web",role="primary",measure="rss"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"understudy_standby_memory_bytes{service="web"} 6"#),
            "{text}"
        );
        assert!(!text.contains(r#"service="db""#), "{text}");
        assert!(
            text.contains("# UNIT understudy_standby_memory_bytes bytes"),
            "{text}"
        );
    }

    #[test]
    fn text_format_names_counters_by_their_samples() {
        let m = Metrics::new();
        m.record_failover("web", Trigger::Pidfd, true, &[step("fence", 1.0)], 20.0);
        m.set_standby_cost(vec![cost("web", 1, None, &[])]);
        let text = m.encode_text();
        for line in [
            "# HELP understudy_failovers_total Failovers by service, trigger and result (ok|error).",
            "# TYPE understudy_failovers_total counter",
            r#"understudy_failovers_total{service="web",trigger="pidfd",result="ok"} 1"#,
            "# TYPE understudy_failover_step_seconds histogram",
            "# TYPE understudy_standby_memory_bytes gauge",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
        assert!(wants_openmetrics(
            b"GET /metrics HTTP/1.1\r\naccept: application/openmetrics-text; version=1.0.0\r\n"
        ));
        assert!(!wants_openmetrics(
            b"GET /metrics HTTP/1.1\r\nAccept: */*\r\n"
        ));
    }

    #[test]
    fn routing() {
        assert_eq!(
            route(b"GET /metrics HTTP/1.1\r\nHost: x", true),
            Route::Metrics
        );
        assert_eq!(route(b"GET /metrics?x=1 HTTP/1.0", true), Route::Metrics);
        assert_eq!(route(b"GET / HTTP/1.1", true), Route::NotFound);
        assert_eq!(
            route(b"POST /metrics HTTP/1.1", true),
            Route::MethodNotAllowed
        );
        assert_eq!(route(b"GET /metrics", true), Route::BadRequest);
        assert_eq!(route(b"GET /metrics SPDY/3", true), Route::BadRequest);
        assert_eq!(route(b"\xff\xfe", true), Route::BadRequest);
        assert_eq!(route(&[b'a'; MAX_REQUEST_HEAD], false), Route::TooLarge);
        assert_eq!(route(b"GET /metr", false), Route::BadRequest);
    }

    async fn http(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        // The server may reset after answering a request it did not read fully; keep what
        // arrived before the reset.
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        String::from_utf8(out).unwrap()
    }

    #[tokio::test]
    async fn http_endpoint_serves_metrics_and_404() {
        let metrics = Arc::new(Metrics::new());
        metrics.inc_detection(Trigger::Lifecycle);
        let server = MetricsServer::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = server.local_addr().unwrap();
        let task = tokio::spawn(server.serve(Arc::clone(&metrics)));

        let resp = http(
            addr,
            b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n\r\n",
        )
        .await;
        assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");
        assert!(resp.contains(&format!("Content-Type: {CONTENT_TYPE}\r\n")));
        let (head, body) = resp.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert!(body.contains(r#"understudy_detection_total{source="lifecycle"} 1"#));
        assert!(body.ends_with("# EOF\n"));

        let resp = http(addr, b"GET /other HTTP/1.1\r\n\r\n").await;
        assert!(resp.starts_with("HTTP/1.1 404 Not Found\r\n"), "{resp}");

        let mut huge = b"GET /metrics HTTP/1.1\r\nX-Pad: ".to_vec();
        huge.resize(MAX_REQUEST_HEAD + 100, b'a');
        let resp = http(addr, &huge).await;
        assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");

        // Without OpenMetrics in Accept: the classic text format.
        let resp = http(addr, b"GET /metrics HTTP/1.0\r\n\r\n").await;
        assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");
        assert!(resp.contains(&format!("Content-Type: {TEXT_CONTENT_TYPE}\r\n")));
        assert!(
            resp.contains("# TYPE understudy_detection_total counter\n"),
            "{resp}"
        );
        assert!(!resp.contains("# EOF"), "{resp}");
        task.abort();
    }
}
