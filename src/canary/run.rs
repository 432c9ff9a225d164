//! A canary's run: two isolated clones of the primary (one changed, one not), the recorded
//! traffic replayed against both, the answers compared; isolation checked all along.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::envelope::{self, CloneUse, ProfileEnvelope, ReplayUse};
use super::isolated::{self, IsolatedDomain, IsolatedRequest, IsolationCheck};
use super::{Canaries, CanaryError, CanaryPhase, Change, ReplayCpu, StepOutcome};
use crate::capture::{store::read_records, Record};
use crate::config::ReplayConfig;
use crate::failover::shadow::guest_exec;
use crate::libvirt::Hypervisor;
use crate::monitor::agent::ExitStatus;
use crate::monitor::collector::guest_used_bytes;
use crate::net::Netlink;
use crate::replay::{client, compare, Answer, Normalizer, ReplayError, Target};

/// How often isolation is checked while clones run.
const CHECK_EVERY: Duration = Duration::from_millis(250);
/// Longest wait for the changed service to accept connections again.
const READY_WAIT: Duration = Duration::from_secs(15);
/// How often the clones' memory is read during the replay (their balloon statistics are
/// refreshed every second, as the primary's).
const MEM_EVERY: Duration = Duration::from_millis(250);
/// How long the clones' memory is still read after the replay: a reading as it ends may predate
/// its last second (one balloon statistics period, 1 s, plus a margin).
const MEM_SETTLE: Duration = Duration::from_millis(1500);

/// What a canary run needs.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The service.
    pub service: String,
    /// The change.
    pub change: Change,
    /// The class's replay settings.
    pub replay: ReplayConfig,
    /// The service's capture store.
    pub records_dir: PathBuf,
    /// The clones' settings; `name` and `bridge` are set per clone.
    pub template: IsolatedRequest,
    /// What the service's profile predicts it needs while the canary runs (`Err`: why it
    /// predicts nothing).
    pub envelope: Result<ProfileEnvelope, String>,
}

/// Recorded traffic to replay: the last `max_requests` records.
pub fn recorded(
    dir: &std::path::Path,
    service: &str,
    max: usize,
) -> Result<Vec<Record>, CanaryError> {
    let records = read_records(dir, max)?;
    if records.is_empty() {
        return Err(ReplayError::NothingRecorded {
            service: service.to_string(),
        }
        .into());
    }
    Ok(records)
}

/// CPU time used by a process so far, in ms (utime + stime).
pub fn cpu_ms(pid: Option<i32>) -> f64 {
    let Some(pid) = pid else { return 0.0 };
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|i| f.get(*i)?.parse::<f64>().ok())
        .sum();
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks * 1000.0 / hz
}

/// Watches clones' isolation in the background until dropped.
pub struct Watch {
    found: Arc<Mutex<IsolationCheck>>,
    task: tokio::task::JoinHandle<()>,
}

impl Watch {
    /// Starts checking `doms` every [`CHECK_EVERY`].
    pub fn start(net: &Netlink, doms: Vec<IsolatedDomain>) -> Self {
        let found = Arc::new(Mutex::new(IsolationCheck::default()));
        let (f, net) = (found.clone(), net.clone());
        let task = tokio::spawn(async move {
            loop {
                for d in &doms {
                    let mut c = f.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    isolated::check(&net, d, &mut c).await;
                    *f.lock().unwrap_or_else(|e| e.into_inner()) = c;
                }
                tokio::time::sleep(CHECK_EVERY).await;
            }
        });
        Self { found, task }
    }

    /// What was found so far.
    pub fn found(&self) -> IsolationCheck {
        self.found.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The guest memory in use of `domain`, from its balloon statistics.
async fn guest_mem(hv: &Hypervisor, domain: &str) -> Option<u64> {
    let name = domain.to_string();
    let stats = hv
        .run("read isolated clone stats", move |hv| hv.stats(&name))
        .await
        .ok()?;
    guest_used_bytes(&stats)
}

/// The largest memory reading of each clone, sampled in the background until dropped.
struct MemPeaks {
    peaks: Arc<Mutex<Vec<Option<u64>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl MemPeaks {
    fn start(hv: &Hypervisor, domains: Vec<String>) -> Self {
        let peaks = Arc::new(Mutex::new(vec![None; domains.len()]));
        let (p, hv) = (peaks.clone(), hv.clone());
        let task = tokio::spawn(async move {
            loop {
                for (i, d) in domains.iter().enumerate() {
                    if let Some(v) = guest_mem(&hv, d).await {
                        let mut p = p.lock().unwrap_or_else(|e| e.into_inner());
                        p[i] = p[i].max(Some(v));
                    }
                }
                tokio::time::sleep(MEM_EVERY).await;
            }
        });
        Self { peaks, task }
    }

    /// The peaks, after the readings of one more statistics period and a last reading of each
    /// of `domains` (the same, in order).
    async fn finish(self, hv: &Hypervisor, domains: &[&str]) -> Vec<Option<u64>> {
        tokio::time::sleep(MEM_SETTLE).await;
        self.task.abort();
        let mut out = self.peaks.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for (i, d) in domains.iter().enumerate() {
            out[i] = out[i].max(guest_mem(hv, d).await);
        }
        out
    }
}

impl Drop for MemPeaks {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn aborted(book: &Canaries, service: &str) -> bool {
    book.get(service)
        .is_none_or(|r| r.phase == CanaryPhase::Aborting)
}

fn progress(book: &Canaries, service: &str, phase: Option<CanaryPhase>, line: &str) {
    tracing::info!(%service, "canary: {line}");
    book.update(service, |r| {
        if let Some(p) = phase {
            if r.phase != CanaryPhase::Aborting {
                r.phase = p;
            }
        }
        r.progress = line.to_string();
    });
}

/// Waits until something accepts connections on `server` through `device`.
async fn wait_ready(device: &str, server: SocketAddr) -> bool {
    let deadline = tokio::time::Instant::now() + READY_WAIT;
    loop {
        let (d, s) = (device.to_string(), server);
        let ok = tokio::task::spawn_blocking(move || {
            client::connect(&d, s, Duration::from_millis(500)).is_ok()
        })
        .await
        .unwrap_or(false);
        if ok {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Applies `change` in `domain` through its agent; each step's outcome, stopping at the first
/// failure (Err names it).
pub async fn apply_change(
    hv: &Hypervisor,
    domain: &str,
    change: &Change,
    max_reply: usize,
) -> (Vec<StepOutcome>, Result<(), CanaryError>) {
    let mut out = Vec::new();
    for ((argv, timeout_ms), step) in change.steps().into_iter().zip(change.step_names()) {
        let r = guest_exec(
            hv,
            domain,
            &argv,
            Duration::from_millis(timeout_ms),
            Duration::from_millis(50),
            max_reply,
        )
        .await;
        let failed = match r {
            Ok(o) if o.status == ExitStatus::Code(0) => None,
            Ok(o) => Some(format!(
                "{:?}: {}",
                o.status,
                crate::failover::shadow::clip_tail(&String::from_utf8_lossy(&o.stderr.data), 512)
            )),
            Err(e) => Some(crate::error::report(&e)),
        };
        out.push(StepOutcome {
            step: step.clone(),
            result: failed.clone().unwrap_or_else(|| "ok".into()),
        });
        if let Some(detail) = failed {
            return (
                out,
                Err(CanaryError::Command {
                    domain: domain.to_string(),
                    argv,
                    detail,
                }),
            );
        }
    }
    (out, Ok(()))
}

/// Replays `records` against each target in turn, request by request (so both clones see
/// the same sequence of writes); `each` is told how many are done.
pub fn replay_all(
    records: &[Record],
    targets: &[Target],
    timeout: Duration,
    mut each: impl FnMut(usize),
) -> Vec<Vec<Answer>> {
    let mut out = vec![Vec::with_capacity(records.len()); targets.len()];
    for (i, r) in records.iter().enumerate() {
        for (t, answers) in targets.iter().zip(out.iter_mut()) {
            answers.push(client::replay(t, r.server, &r.exchange, timeout));
        }
        each(i + 1);
    }
    out
}

/// Runs a canary to its report (phase `done`) or failure; its clones stay paused until
/// promote or abort. On failure or abort they are removed.
pub async fn run_canary(hv: &Hypervisor, net: &Netlink, book: Arc<Canaries>, plan: Plan) {
    let service = plan.service.clone();
    let mut made: Vec<IsolatedDomain> = Vec::new();
    let result = steps(hv, net, &book, &plan, &mut made).await;
    if aborted(&book, &service) {
        for d in &made {
            isolated::teardown(hv, net, d, &plan.template.state_dir).await;
        }
        book.remove(&service);
        tracing::info!(%service, "canary aborted");
        return;
    }
    if let Err(e) = result {
        let why = crate::error::report(&e);
        tracing::warn!(%service, error = %why, "canary failed");
        for d in &made {
            isolated::teardown(hv, net, d, &plan.template.state_dir).await;
        }
        book.update(&service, |r| {
            r.phase = CanaryPhase::Failed;
            r.error = Some(why);
            r.finished_unix_ms = Some(crate::clock::now_unix_ms());
            r.progress = "failed".into();
        });
    }
}

async fn steps(
    hv: &Hypervisor,
    net: &Netlink,
    book: &Arc<Canaries>,
    plan: &Plan,
    made: &mut Vec<IsolatedDomain>,
) -> Result<(), CanaryError> {
    let service = &plan.service;
    let records = recorded(&plan.records_dir, service, plan.replay.max_requests)?;
    let norm = Normalizer::new(&plan.replay.ignore)?;
    progress(
        book,
        service,
        None,
        "starting the baseline and canary clones",
    );
    let mk = |suffix: &str, role: char| IsolatedRequest {
        name: format!("{service}-{suffix}"),
        bridge: isolated::bridge_name(service, role),
        ..plan.template.clone()
    };
    let (b, mut c) = (mk("baseline", 'b'), mk("canary", 'c'));
    // A golden image is applied at boot: the canary's system disk is an overlay of it.
    if let Some(image) = &plan.change.golden_image {
        c.disks = c.disks.booting_from(image.clone());
    }
    let (rb, rc) = tokio::join!(isolated::start(hv, net, &b), isolated::start(hv, net, &c));
    made.extend([&rb, &rc].into_iter().flatten().cloned());
    let (baseline, canary) = (rb?, rc?);
    book.update(service, |r| {
        r.baseline = Some(baseline.clone());
        r.canary = Some(canary.clone());
    });
    let watch = Watch::start(net, vec![baseline.clone(), canary.clone()]);
    if aborted(book, service) {
        return Ok(());
    }
    progress(
        book,
        service,
        Some(CanaryPhase::Applying),
        "applying the change to the canary",
    );
    let (applied, ok) = apply_change(
        hv,
        &canary.name,
        &plan.change,
        plan.template.agent_max_reply,
    )
    .await;
    let booted = plan.change.golden_image.iter().map(|g| StepOutcome {
        step: format!("golden image {}", g.display()),
        result: "ok (the canary booted from it)".into(),
    });
    book.update(service, |r| r.applied = booted.chain(applied).collect());
    ok?;
    let server = records[0].server;
    for d in [&baseline, &canary] {
        if !wait_ready(&d.bridge, server).await {
            tracing::warn!(%service, domain = %d.name, %server, "nothing accepts connections after the change; replaying anyway");
        }
    }
    if aborted(book, service) {
        return Ok(());
    }
    let n = records.len();
    progress(
        book,
        service,
        Some(CanaryPhase::Replaying),
        &format!("replaying {n} recorded requests"),
    );
    let targets = vec![
        Target {
            device: baseline.bridge.clone(),
        },
        Target {
            device: canary.bridge.clone(),
        },
    ];
    let cpu0 = (cpu_ms(baseline.qemu_pid), cpu_ms(canary.qemu_pid));
    let mem = MemPeaks::start(hv, vec![baseline.name.clone(), canary.name.clone()]);
    let replay_start = std::time::Instant::now();
    let (bk, svc, timeout) = (
        book.clone(),
        service.clone(),
        Duration::from_millis(plan.replay.timeout_ms),
    );
    let recs = records.clone();
    let answers = tokio::task::spawn_blocking(move || {
        replay_all(&recs, &targets, timeout, |done| {
            if done % 20 == 0 || done == n {
                bk.update(&svc, |r| {
                    r.progress = format!("replayed {done} of {n} requests")
                });
            }
        })
    })
    .await
    .map_err(|e| CanaryError::Io {
        what: "run the replay".into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let replay_ms = replay_start.elapsed().as_secs_f64() * 1000.0;
    let cpu = ReplayCpu {
        baseline_ms: cpu_ms(baseline.qemu_pid) - cpu0.0,
        canary_ms: cpu_ms(canary.qemu_pid) - cpu0.1,
    };
    let mem = mem.finish(hv, &[&baseline.name, &canary.name]).await;
    let used = ReplayUse {
        baseline: CloneUse {
            cpu_ms: cpu.baseline_ms,
            mem_bytes: mem[0],
        },
        canary: CloneUse {
            cpu_ms: cpu.canary_ms,
            mem_bytes: mem[1],
        },
        recorded_span_ms: envelope::recorded_span_ms(&records),
        replay_ms,
    };
    let env = envelope::compare(plan.envelope.clone(), used);
    let cmp = compare::compare_canary(&records, &answers[0], &answers[1], &norm, &plan.replay);
    // Paused until promote or abort: they hold memory, not CPU.
    for d in [&baseline, &canary] {
        let name = d.name.clone();
        let _ = hv
            .run("pause isolated clone", move |hv| hv.suspend(&name))
            .await;
    }
    let mut iso = watch.found();
    for d in [&baseline, &canary] {
        isolated::check(net, d, &mut iso).await;
    }
    drop(watch);
    let verdict = cmp.verdict();
    let beyond: Vec<&str> = env.findings().iter().map(|c| c.metric.as_str()).collect();
    let line = format!(
        "report ready: {:?}, {} of {} requests differ beyond the noise ({} noisy){}",
        verdict,
        cmp.differing.len(),
        cmp.requests,
        cmp.noisy,
        if beyond.is_empty() {
            String::new()
        } else {
            format!("; beyond the profile's envelope: {}", beyond.join(", "))
        }
    );
    book.update(service, |r| {
        if r.phase != CanaryPhase::Aborting {
            r.phase = CanaryPhase::Done;
        }
        r.costlier = cpu.canary_ms > plan.replay.latency_factor * cpu.baseline_ms + 100.0;
        r.comparison = Some(cmp);
        r.cpu = Some(cpu);
        r.envelope = Some(env);
        r.replay_ms = Some(replay_ms);
        r.isolation = iso;
        r.finished_unix_ms = Some(crate::clock::now_unix_ms());
        r.progress = line.clone();
    });
    tracing::info!(%service, "canary: {line}");
    Ok(())
}
