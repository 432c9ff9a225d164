//! Range and cross-field checks on a deserialized [`Config`], each violation a [`Problem`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Display;
use std::ops::RangeInclusive;
use std::path::Path;

use super::document::{Document, KeyPath};
use super::{
    ClassConfig, ClusterConfig, Config, DaemonConfig, MonitorConfig, ProbeCheck, ProbeConfig,
    Problem, ProfileConfig, ProtectRule, RepositoryBackend,
};

/// Longest path a Unix socket can be bound at (`sun_path` is 108 bytes with the NUL).
const MAX_SOCKET_PATH_BYTES: usize = 107;

/// Appends every problem of `config` to `problems`. `declared_classes` are the class names
/// present in the file (plus the built-in default), whether or not they deserialized.
pub(super) fn check(
    config: &Config,
    doc: &Document<'_>,
    declared_classes: &BTreeSet<String>,
    problems: &mut Vec<Problem>,
) {
    let mut checker = Checker { doc, problems };
    let root = KeyPath::root();
    checker.daemon(&config.daemon, &root.key("daemon"));
    checker.monitor(&config.monitor, &root.key("monitor"));
    checker.profile(&config.profile, &root.key("profile"));
    checker.protect(&config.protect, &root.key("protect"), declared_classes);
    checker.classes(&config.class, &root.key("class"));
    if let Some(cluster) = &config.cluster {
        checker.cluster(cluster, &root.key("cluster"));
    } else if config.profile.repository_backend == RepositoryBackend::Etcd {
        checker.fail(
            &root.key("profile").key("repository_backend"),
            "\"etcd\" needs a [cluster] table (its endpoints and key prefix)".to_owned(),
        );
    }
}

/// Why `url` is not an etcd endpoint this build can reach: `http://host:port`.
fn endpoint_problem(url: &str) -> Option<String> {
    if url.starts_with("https://") {
        return Some(format!(
            "{url:?}: https needs TLS, which this build does not include; use http:// on a \
             trusted management network"
        ));
    }
    let Some(rest) = url.strip_prefix("http://") else {
        return Some(format!("{url:?} must be http://HOST:PORT"));
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    let port = authority
        .rsplit_once(':')
        .filter(|(host, _)| !host.is_empty() && !host.contains(['/', '@', ' ']))
        .and_then(|(_, port)| port.parse::<u16>().ok())
        .filter(|p| *p != 0);
    if port.is_none() {
        return Some(format!("{url:?} must be http://HOST:PORT"));
    }
    None
}

struct Checker<'a, 'i> {
    doc: &'a Document<'i>,
    problems: &'a mut Vec<Problem>,
}

impl Checker<'_, '_> {
    fn fail(&mut self, path: &KeyPath, message: String) {
        self.problems.push(super::problem(self.doc, path, message));
    }

    fn range<T: PartialOrd + Display>(
        &mut self,
        path: &KeyPath,
        value: T,
        allowed: RangeInclusive<T>,
    ) {
        if !allowed.contains(&value) {
            let message = format!(
                "{value} is out of range {}..={}",
                allowed.start(),
                allowed.end()
            );
            self.fail(path, message);
        }
    }

    fn at_least<T: PartialOrd + Display>(&mut self, path: &KeyPath, value: T, min: T) {
        if value < min {
            self.fail(path, format!("{value} is below the minimum of {min}"));
        }
    }

    fn non_empty_path(&mut self, path: &KeyPath, value: &Path) {
        if value.as_os_str().is_empty() {
            self.fail(path, "must not be empty".to_owned());
        }
    }

    fn daemon(&mut self, daemon: &DaemonConfig, at: &KeyPath) {
        if daemon.libvirt_uri.trim().is_empty() {
            self.fail(&at.key("libvirt_uri"), "must not be empty".to_owned());
        }
        self.non_empty_path(&at.key("state_dir"), &daemon.state_dir);
        self.non_empty_path(&at.key("control_socket"), &daemon.control_socket);
        let socket_len = daemon.control_socket.as_os_str().len();
        if socket_len > MAX_SOCKET_PATH_BYTES {
            self.fail(
                &at.key("control_socket"),
                format!(
                    "path is {socket_len} bytes, longer than the {MAX_SOCKET_PATH_BYTES} a Unix \
                     socket allows"
                ),
            );
        }
        if !daemon.metrics_listen.ip().is_loopback() && !daemon.metrics_allow_remote {
            self.fail(
                &at.key("metrics_listen"),
                format!(
                    "{} is not a loopback address; set metrics_allow_remote = true to expose \
                     metrics beyond this host",
                    daemon.metrics_listen
                ),
            );
        }
        if daemon.log_level.trim().is_empty() {
            self.fail(&at.key("log_level"), "must not be empty".to_owned());
        } else if let Err(e) = super::log_filter(&daemon.log_level) {
            self.fail(&at.key("log_level"), e);
        }
        self.range(
            &at.key("keepalive_interval_s"),
            daemon.keepalive_interval_s,
            1..=60,
        );
        self.range(&at.key("keepalive_count"), daemon.keepalive_count, 1..=20);
    }

    fn monitor(&mut self, monitor: &MonitorConfig, at: &KeyPath) {
        self.range(
            &at.key("sample_interval_ms"),
            monitor.sample_interval_ms,
            100..=60_000,
        );
        self.range(
            &at.key("agent_timeout_ms"),
            monitor.agent_timeout_ms,
            50..=30_000,
        );
        // A slower agent than the sampling period would make samples pile up.
        if monitor.agent_timeout_ms > monitor.sample_interval_ms {
            self.fail(
                &at.key("agent_timeout_ms"),
                format!(
                    "{} exceeds sample_interval_ms ({})",
                    monitor.agent_timeout_ms, monitor.sample_interval_ms
                ),
            );
        }
        self.range(
            &at.key("agent_max_reply_bytes"),
            monitor.agent_max_reply_bytes,
            1024..=16 * 1024 * 1024,
        );
        self.range(
            &at.key("history_samples"),
            monitor.history_samples,
            10..=1_000_000,
        );
        self.at_least(
            &at.key("history_max_bytes"),
            monitor.history_max_bytes,
            64 * 1024,
        );
    }

    fn cluster(&mut self, cluster: &ClusterConfig, at: &KeyPath) {
        if cluster.endpoints.is_empty() {
            self.fail(
                &at.key("endpoints"),
                "must list at least one etcd endpoint (http://HOST:PORT)".to_owned(),
            );
        }
        for (i, url) in cluster.endpoints.iter().enumerate() {
            if let Some(why) = endpoint_problem(url) {
                self.fail(&at.key("endpoints").index(i), why);
            }
        }
        if let Some(host) = &cluster.host {
            if let Err(e) = crate::cluster::check_name("host", host) {
                self.fail(&at.key("host"), e.to_string());
            }
        }
        if let Err(why) = crate::cluster::etcd::keys::check_prefix(&cluster.key_prefix) {
            self.fail(
                &at.key("key_prefix"),
                format!("{:?} {why}", cluster.key_prefix),
            );
        }
        if cluster
            .libvirt_uri
            .as_ref()
            .is_some_and(|u| u.trim().is_empty())
        {
            self.fail(&at.key("libvirt_uri"), "must not be empty".to_owned());
        }
        // etcd grants no less than 1.5 election timeouts (rounded up to whole seconds): a TTL
        // of 1 s takes an election timeout of at most 666 ms; etcd grants more where it is
        // longer, and the granted TTL is the one used.
        self.range(&at.key("lease_ttl_s"), cluster.lease_ttl_s, 1..=300);
        if let Some(every) = cluster.keepalive_interval_ms {
            self.range(
                &at.key("keepalive_interval_ms"),
                every,
                50..=(cluster.lease_ttl_s * 1000 / 3).max(50),
            );
        }
        self.range(&at.key("op_timeout_ms"), cluster.op_timeout_ms, 50..=30_000);
        // 16 TiB: beyond any host, and far from overflowing when turned into KiB.
        self.range(
            &at.key("reserved_memory_mib"),
            cluster.reserved_memory_mib,
            0..=16 << 20,
        );
        self.range(
            &at.key("connect_timeout_ms"),
            cluster.connect_timeout_ms,
            50..=30_000,
        );
        let ttl_ms = cluster.lease_ttl_s * 1000;
        if cluster.heartbeat_port != 0 {
            self.range(
                &at.key("heartbeat_interval_ms"),
                cluster.heartbeat_interval_ms,
                20..=1000,
            );
            // Three lost datagrams in a row before a suspicion; decided before the lease ends.
            self.range(
                &at.key("suspect_after_ms"),
                cluster.suspect_after_ms,
                (cluster.heartbeat_interval_ms * 3)..=ttl_ms.saturating_sub(1).max(1),
            );
        }
        self.range(
            &at.key("self_fence_guard_ms"),
            cluster.self_fence_guard_ms,
            100..=ttl_ms.saturating_sub(1).max(100),
        );
        self.range(
            &at.key("promote_margin_ms"),
            cluster.promote_margin_ms,
            0..=60_000,
        );
        self.range(
            &at.key("fence_timeout_ms"),
            cluster.fence_timeout_ms,
            100..=120_000,
        );
        self.range(
            &at.key("unreachable_after_ms"),
            cluster.unreachable_after_ms,
            200..=600_000,
        );
        for (host, argv) in &cluster.fence {
            let key = at.key("fence").key(host);
            if let Err(e) = crate::cluster::check_name("host", host) {
                self.fail(&key, e.to_string());
            }
            if argv.first().is_none_or(|p| p.trim().is_empty()) {
                self.fail(
                    &key,
                    "must name a fence agent and its options, e.g. [\"/usr/sbin/fence_ipmilan\", \"--ip=...\"]".to_owned(),
                );
            }
        }
        if cluster.watchdog.is_some() {
            // Fed only while the host may keep its primaries for the whole timeout: a timeout
            // that does not fit between two keepalives and the self-fence deadline would reset
            // a healthy host.
            let room = ttl_ms
                .saturating_sub(cluster.self_fence_guard_ms)
                .saturating_sub(cluster.keepalive_interval().as_millis() as u64);
            if cluster.watchdog_timeout_s == 0 || cluster.watchdog_timeout_s * 1000 >= room {
                self.fail(
                    &at.key("watchdog_timeout_s"),
                    format!(
                        "{} s does not fit below the lease TTL less self_fence_guard_ms and the keepalive interval ({room} ms)",
                        cluster.watchdog_timeout_s
                    ),
                );
            }
        }
        // A renewal that may take the whole TTL cannot keep the lease.
        if cluster.op_timeout_ms >= cluster.lease_ttl_s * 1000 {
            self.fail(
                &at.key("op_timeout_ms"),
                format!(
                    "{} ms is not below the lease TTL ({} s)",
                    cluster.op_timeout_ms, cluster.lease_ttl_s
                ),
            );
        }
    }

    fn profile(&mut self, profile: &ProfileConfig, at: &KeyPath) {
        self.non_empty_path(&at.key("repository"), &profile.repository);
        self.range(&at.key("headroom_pct"), profile.headroom_pct, 0..=200);
        self.at_least(
            &at.key("min_samples_per_bucket"),
            profile.min_samples_per_bucket,
            1,
        );
        self.at_least(&at.key("drift_window"), profile.drift_window, 10);
        let threshold = profile.drift_coverage_threshold;
        // Written so that NaN fails too.
        if !(threshold > 0.0 && threshold <= 1.0) {
            self.fail(
                &at.key("drift_coverage_threshold"),
                format!("{threshold} is out of range: must be above 0 and at most 1"),
            );
        }
        if profile.keep_versions == 1 {
            self.fail(
                &at.key("keep_versions"),
                "1 leaves no version to roll back to: use at least 2, or 0 to keep all".to_string(),
            );
        }
    }

    fn protect(&mut self, rules: &[ProtectRule], at: &KeyPath, declared: &BTreeSet<String>) {
        let mut first_with_pattern: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, rule) in rules.iter().enumerate() {
            let rule_at = at.index(i);
            if rule.pattern.as_str().is_empty() {
                self.fail(
                    &rule_at.key("match"),
                    "empty pattern matches no domain".to_owned(),
                );
            }
            // The first matching rule wins, so a repeated pattern can never apply.
            if let Some(&first) = first_with_pattern.get(rule.pattern.as_str()) {
                let first_line = self.doc.line_for(&at.index(first));
                self.fail(
                    &rule_at.key("match"),
                    format!(
                        "pattern {:?} repeats rule {} (line {first_line}), which always matches \
                         first, so this rule never applies",
                        rule.pattern.as_str(),
                        at.index(first)
                    ),
                );
            } else {
                first_with_pattern.insert(rule.pattern.as_str(), i);
            }
            if !declared.contains(&rule.class) {
                let known: Vec<_> = declared.iter().map(|c| format!("`{c}`")).collect();
                self.fail(
                    &rule_at.key("class"),
                    format!(
                        "unknown class `{}`; define [class.{}] or use one of {}",
                        rule.class,
                        rule.class,
                        known.join(", ")
                    ),
                );
            }
        }
    }

    fn classes(&mut self, classes: &BTreeMap<String, ClassConfig>, at: &KeyPath) {
        for (name, class) in classes {
            self.class(class, &at.key(name));
        }
    }

    /// A pool stands in for the class's per-primary shadows, on this host, paused, bridged.
    fn pool(&mut self, class: &ClassConfig, pool: &super::PoolConfig, class_at: &KeyPath) {
        let at = &class_at.key("pool");
        self.range(
            &at.key("primaries_per_shadow"),
            pool.primaries_per_shadow,
            1..=64,
        );
        let t = &pool.template;
        if t.is_empty()
            || t.len() > 64
            || !t
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        {
            self.fail(
                &at.key("template"),
                format!(
                    "{t:?} is not a domain name: 1 to 64 letters, digits, '_', '-', '.' (the \
                     golden VM, defined in libvirt and never started)"
                ),
            );
        }
        let mut conflict = |key: &str, why: String| self.fail(&class_at.key(key), why);
        if class.shadows != 0 {
            conflict(
                "shadows",
                format!(
                    "{} with a pool: a pooled class keeps no shadow per primary; set shadows = 0",
                    class.shadows
                ),
            );
        }
        if class.standby_tier != crate::failover::standby::TierPolicy::Paused {
            conflict(
                "standby_tier",
                format!(
                    "{:?} with a pool: pooled shadows stand by paused",
                    class.standby_tier
                ),
            );
        }
        if class.placement != crate::cluster::Placement::Local {
            conflict(
                "placement",
                "a pool is kept on each host for its own primaries: placement must be \"local\""
                    .to_owned(),
            );
        }
        if class.network != super::NetworkMode::Bridged {
            conflict(
                "network",
                "\"routed\" with a pool: a pooled shadow gets the primary's NIC on its bridge; \
                 routed classes are not pooled"
                    .to_owned(),
            );
        }
    }

    fn class(&mut self, class: &ClassConfig, at: &KeyPath) {
        self.range(&at.key("shadows"), class.shadows, 0..=8);
        self.range(
            &at.key("adaptive_lead_s"),
            class.adaptive_lead_s,
            0..=86_400,
        );
        for [start, end] in &class.busy_hours_utc {
            if !(*start < *end && *end <= 24) {
                self.fail(
                    &at.key("busy_hours_utc"),
                    format!("[{start}, {end}] is not an hour range: need start < end <= 24"),
                );
            }
        }
        let target = class.coverage_target;
        // Written so that NaN fails too.
        if !(0.5..=0.999).contains(&target) {
            self.fail(
                &at.key("coverage_target"),
                format!("{target} is out of range: must be between 0.5 and 0.999"),
            );
        }
        self.range(
            &at.key("heartbeat_interval_ms"),
            class.heartbeat_interval_ms,
            50..=60_000,
        );
        self.range(
            &at.key("heartbeat_timeout_ms"),
            class.heartbeat_timeout_ms,
            10..=60_000,
        );
        if class.heartbeat_timeout_ms >= class.heartbeat_interval_ms {
            self.fail(
                &at.key("heartbeat_timeout_ms"),
                format!(
                    "{} must be below heartbeat_interval_ms ({}) so that each heartbeat is \
                     settled before the next",
                    class.heartbeat_timeout_ms, class.heartbeat_interval_ms
                ),
            );
        }
        self.range(&at.key("heartbeat_misses"), class.heartbeat_misses, 1..=100);
        self.range(
            &at.key("shadow_boot_timeout_s"),
            class.shadow_boot_timeout_s,
            10..=3600,
        );
        self.range(
            &at.key("promote_retry_limit"),
            class.promote_retry_limit,
            0..=100,
        );
        if let Some(image) = &class.golden_image {
            self.non_empty_path(&at.key("golden_image"), image);
        }
        if let Some(pool) = &class.pool {
            self.pool(class, pool, at);
        }

        let files_at = at.key("config_files");
        let mut seen = BTreeMap::new();
        for (i, file) in class.config_files.iter().enumerate() {
            let file_at = files_at.index(i);
            if !file.is_absolute() {
                self.fail(
                    &file_at,
                    format!(
                        "{:?} is not an absolute path (guest files are read by absolute path)",
                        file.display().to_string()
                    ),
                );
            }
            if let Some(first) = seen.insert(file, i) {
                self.fail(
                    &file_at,
                    format!(
                        "{:?} is already listed as {}",
                        file.display().to_string(),
                        files_at.index(first)
                    ),
                );
            }
        }

        let roles_at = at.key("disk_roles");
        for target in class.disk_roles.keys() {
            if !valid_disk_target(target) {
                self.fail(
                    &roles_at.key(target),
                    format!(
                        "{target:?} is not a disk target name: expected the <target dev> of a \
                         disk, e.g. \"vdb\" (1 to 32 letters, digits, '_', '-')"
                    ),
                );
            }
        }
        self.range(
            &at.key("promote_command_timeout_ms"),
            class.promote_command_timeout_ms,
            100..=600_000,
        );

        for (key, commands) in [
            ("config_commands", &class.config_commands),
            ("warmup_commands", &class.warmup_commands),
            ("promote_commands", &class.promote_commands),
        ] {
            let commands_at = at.key(key);
            for (i, argv) in commands.iter().enumerate() {
                let command_at = commands_at.index(i);
                match argv.first() {
                    None => self.fail(
                        &command_at,
                        "empty command: give at least argv[0]".to_owned(),
                    ),
                    Some(program) if !Path::new(program).is_absolute() => self.fail(
                        &command_at.index(0),
                        format!(
                            "{program:?} is not an absolute path (guest-exec does not search PATH)"
                        ),
                    ),
                    Some(_) => {}
                }
            }
        }

        if let Some(probe) = &class.probe {
            self.probe(probe, &at.key("probe"));
        }
        self.capture(&class.capture, &at.key("capture"));
        self.replay(&class.replay, &at.key("replay"));
    }

    fn capture(&mut self, c: &super::CaptureConfig, at: &KeyPath) {
        self.range(&at.key("max_bytes"), c.max_bytes, 65_536..=1 << 30);
        self.range(&at.key("max_per_second"), c.max_per_second, 1..=10_000);
        self.range(&at.key("max_body_bytes"), c.max_body_bytes, 0..=1 << 20);
        if c.ports.is_empty() || c.ports.len() > 16 {
            self.fail(&at.key("ports"), "give 1 to 16 ports".to_owned());
        }
        for (i, p) in c.ports.iter().enumerate() {
            if *p == 0 {
                self.fail(&at.key("ports").index(i), "port 0 is not a port".to_owned());
            }
        }
        self.patterns(&c.redact_patterns, &at.key("redact_patterns"));
    }

    fn replay(&mut self, r: &super::ReplayConfig, at: &KeyPath) {
        self.range(&at.key("max_requests"), r.max_requests, 1..=100_000);
        self.range(&at.key("timeout_ms"), r.timeout_ms, 10..=60_000);
        self.range(&at.key("latency_factor"), r.latency_factor, 1.0..=100.0);
        self.range(
            &at.key("latency_slack_ms"),
            r.latency_slack_ms,
            0.0..=60_000.0,
        );
        self.range(&at.key("verify_min_match"), r.verify_min_match, 0.0..=1.0);
        if r.verify_interval_s != 0 {
            self.range(
                &at.key("verify_interval_s"),
                r.verify_interval_s,
                60..=604_800,
            );
        }
        self.patterns(&r.ignore, &at.key("ignore"));
    }

    /// Each entry must be a regular expression of bounded size.
    fn patterns(&mut self, patterns: &[String], at: &KeyPath) {
        for (i, p) in patterns.iter().enumerate() {
            if let Err(e) = regex::RegexBuilder::new(p).size_limit(1 << 20).build() {
                self.fail(
                    &at.index(i),
                    format!("{p:?} is not a regular expression: {e}"),
                );
            }
        }
    }

    fn probe(&mut self, probe: &ProbeConfig, at: &KeyPath) {
        if let ProbeCheck::Http { path } = &probe.check {
            if !path.starts_with('/') {
                self.fail(&at.key("path"), format!("{path:?} must start with '/'"));
            }
        }
        if probe.address.port() == 0 {
            self.fail(&at.key("address"), format!("{} has no port", probe.address));
        }
        self.range(&at.key("interval_ms"), probe.interval_ms, 10..=60_000);
        self.range(&at.key("timeout_ms"), probe.timeout_ms, 1..=60_000);
        if probe.timeout_ms >= probe.interval_ms {
            self.fail(
                &at.key("timeout_ms"),
                format!(
                    "{} must be below interval_ms ({}) so that probes do not overlap",
                    probe.timeout_ms, probe.interval_ms
                ),
            );
        }
    }
}

/// A `<target dev>` as libvirt names disks (`vda`, `sdb`, `hdc`, `nvme0n1`...).
fn valid_disk_target(target: &str) -> bool {
    (1..=32).contains(&target.len())
        && target
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}
