//! The TOML configuration loader.
//!
//! Properties: a configuration that loads obeys every documented range and cross-field rule
//! (so validation cannot be bypassed), knows the default class and every class its rules name;
//! an error names the file, and points at a line of it and a key.

use std::path::Path;

use understudy::cluster::check_name;
use understudy::cluster::etcd::keys::Keys;
use understudy::config::{Config, ConfigError, RepositoryBackend, DEFAULT_CLASS};

const ORIGIN: &str = "fuzz/understudy.toml";

/// Runs one input.
pub fn check(data: &[u8]) {
    let text = crate::text(data);
    let text = text.as_ref();
    match Config::parse(text, Path::new(ORIGIN)) {
        Ok(c) => check_config(&c),
        Err(e) => check_error(text, &e),
    }
}

fn check_config(c: &Config) {
    let d = &c.daemon;
    assert!((1..=60).contains(&d.keepalive_interval_s), "{d:?}");
    assert!((1..=20).contains(&d.keepalive_count), "{d:?}");
    assert!(d.control_socket.as_os_str().len() <= 107, "{d:?}");
    assert!(
        d.metrics_allow_remote || d.metrics_listen.ip().is_loopback(),
        "{d:?}"
    );
    let m = &c.monitor;
    assert!((100..=60_000).contains(&m.sample_interval_ms), "{m:?}");
    assert!((50..=30_000).contains(&m.agent_timeout_ms), "{m:?}");
    assert!(m.agent_timeout_ms <= m.sample_interval_ms, "{m:?}");
    assert!(
        (1024..=16 << 20).contains(&m.agent_max_reply_bytes),
        "{m:?}"
    );
    assert!((10..=1_000_000).contains(&m.history_samples), "{m:?}");
    assert!(m.history_max_bytes >= 64 * 1024, "{m:?}");
    let p = &c.profile;
    assert!(
        p.headroom_pct <= 200 && p.min_samples_per_bucket >= 1,
        "{p:?}"
    );
    assert!(p.drift_window >= 10 && p.keep_versions != 1, "{p:?}");
    assert!(
        p.drift_coverage_threshold > 0.0 && p.drift_coverage_threshold <= 1.0,
        "{p:?}"
    );
    assert!(c.class.contains_key(DEFAULT_CLASS), "no default class");
    for rule in &c.protect {
        assert!(
            c.class.contains_key(&rule.class),
            "rule uses unknown class {}",
            rule.class
        );
        assert!(!rule.pattern.as_str().is_empty());
    }
    for (name, k) in &c.class {
        assert!(k.shadows <= 8, "{name}: {k:?}");
        assert!(
            (50..=60_000).contains(&k.heartbeat_interval_ms),
            "{name}: {k:?}"
        );
        assert!(
            (10..=60_000).contains(&k.heartbeat_timeout_ms),
            "{name}: {k:?}"
        );
        assert!(
            k.heartbeat_timeout_ms < k.heartbeat_interval_ms,
            "{name}: {k:?}"
        );
        assert!((1..=100).contains(&k.heartbeat_misses), "{name}: {k:?}");
        assert!(
            (10..=3600).contains(&k.shadow_boot_timeout_s),
            "{name}: {k:?}"
        );
        assert!(k.promote_retry_limit <= 100, "{name}: {k:?}");
        assert!(
            k.config_files.iter().all(|f| f.is_absolute()),
            "{name}: {k:?}"
        );
        for argv in k.config_commands.iter().chain(&k.warmup_commands) {
            assert!(
                argv.first().is_some_and(|p| p.starts_with('/')),
                "{name}: {argv:?}"
            );
        }
        if let Some(probe) = &k.probe {
            assert!(probe.address.port() != 0, "{name}: {probe:?}");
            assert!(probe.timeout_ms < probe.interval_ms, "{name}: {probe:?}");
            assert!(
                (10..=60_000).contains(&probe.interval_ms),
                "{name}: {probe:?}"
            );
        }
    }
    for name in ["web-1", "db", "x"] {
        let _ = c.class_for(name);
    }
    match &c.cluster {
        None => assert!(
            c.profile.repository_backend != RepositoryBackend::Etcd,
            "etcd profiles without [cluster]"
        ),
        Some(k) => {
            assert!(!k.endpoints.is_empty(), "{k:?}");
            assert!(
                k.endpoints.iter().all(|e| e.starts_with("http://")),
                "{k:?}"
            );
            assert!((1..=300).contains(&k.lease_ttl_s), "{k:?}");
            assert!(k.op_timeout_ms < k.lease_ttl_s * 1000, "{k:?}");
            let every = k.keepalive_interval().as_millis() as u64;
            assert!(
                (50..=(k.lease_ttl_s * 1000 / 3).max(50)).contains(&every),
                "{k:?}"
            );
            assert!((200..=600_000).contains(&k.unreachable_after_ms), "{k:?}");
            assert!(Keys::new(&k.key_prefix).is_ok(), "{k:?}");
            if let Some(h) = &k.host {
                assert!(check_name("host", h).is_ok(), "{k:?}");
            }
        }
    }
}

fn check_error(text: &str, e: &ConfigError) {
    let msg = e.to_string();
    assert!(
        msg.starts_with(ORIGIN),
        "error does not name the file: {msg}"
    );
    let lines = crate::line_bound(text);
    match e {
        ConfigError::Syntax { line, column, .. } => {
            assert!((1..=lines).contains(line), "{msg}");
            assert!(*column >= 1, "{msg}");
        }
        ConfigError::Invalid { problems, .. } => {
            assert!(!problems.is_empty(), "invalid without a problem");
            for p in problems {
                assert!((1..=lines).contains(&p.line), "{msg}");
                assert!(!p.key.is_empty() && !p.message.is_empty(), "{msg}");
            }
        }
        _ => panic!("unexpected error parsing text: {msg}"),
    }
}
