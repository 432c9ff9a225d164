use std::fs;

use super::*;

/// A configuration fixture written into its own temporary directory.
struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Fixture {
    fn new(text: &str) -> Self {
        Self::bytes(text.as_bytes())
    }

    fn bytes(content: &[u8]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("understudy.toml");
        fs::write(&path, content).expect("write fixture");
        Self { _dir: dir, path }
    }

    fn load(&self) -> Result<Config, ConfigError> {
        Config::load(&self.path)
    }

    /// The rendered error of loading this fixture, which must fail.
    fn error_text(&self) -> String {
        match self.load() {
            Ok(config) => panic!("expected an error, got {config:#?}"),
            Err(e) => e.to_string(),
        }
    }

    /// The problems of this fixture, which must be valid TOML but an invalid configuration.
    fn problems(&self) -> Vec<Problem> {
        match self.load() {
            Err(ConfigError::Invalid { path, problems }) => {
                assert_eq!(path, self.path);
                problems
            }
            other => panic!("expected ConfigError::Invalid, got {other:?}"),
        }
    }

    /// `<path>:<line>: <key>: ` as it starts a problem line of the rendered error.
    fn at(&self, line: usize, key: &str) -> String {
        format!("{}:{line}: {key}: ", self.path.display())
    }
}

fn shipped(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("configs")
        .join(name)
}

#[test]
fn lab_config_parses() {
    let config = Config::load(&shipped("lab.toml")).expect("configs/lab.toml is valid");
    assert_eq!(config.daemon.libvirt_uri, "qemu:///system");
    assert_eq!(config.daemon.accel, Accel::Tcg);
    assert_eq!(config.daemon.state_dir, Path::new("build/lab/state"));
    assert_eq!(
        config.daemon.control_socket,
        Path::new("build/lab/understudy.sock")
    );
    assert_eq!(
        config.daemon.metrics_listen,
        "127.0.0.1:9464".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(
        config.profile.repository,
        Path::new("build/lab/profile-repo")
    );

    let (name, class) = config.class_for("web1").expect("web1 is protected");
    assert_eq!(name, "default");
    assert_eq!(class.shadows, 1);
    assert_eq!(
        (
            class.heartbeat_interval_ms,
            class.heartbeat_timeout_ms,
            class.heartbeat_misses
        ),
        (250, 200, 3)
    );
    assert!(class.config_files.contains(&PathBuf::from("/proc/cmdline")));

    let (name, class) = config.class_for("db1").expect("db1 is protected");
    assert_eq!(name, "db");
    let probe = class.probe.as_ref().expect("db has a probe");
    assert_eq!(
        probe.check,
        ProbeCheck::Http {
            path: "/".to_owned()
        }
    );
    assert_eq!(config.class_for("other"), None);
}

#[test]
fn example_config_parses() {
    let config =
        Config::load(&shipped("understudy.toml")).expect("configs/understudy.toml is valid");
    // The example documents the defaults of everything outside the classes.
    assert_eq!(config.daemon, DaemonConfig::default());
    assert_eq!(config.monitor, MonitorConfig::default());
    assert_eq!(config.profile, ProfileConfig::default());
    let (name, db) = config.class_for("db-main").expect("db-main is protected");
    assert_eq!(name, "db");
    assert_eq!(db.shadows, 2);
    assert_eq!(db.probe.as_ref().map(|p| &p.check), Some(&ProbeCheck::Tcp));
    assert_eq!(config.class_for("web-1").map(|(n, _)| n), Some("default"));
    let pooled = &config.class["pooled"];
    assert_eq!(pooled.shadows, 0);
    assert_eq!(
        pooled.pool.as_ref().map(|p| p.primaries_per_shadow),
        Some(4)
    );
}

#[test]
fn packaged_config_is_the_defaults_and_protects_nothing() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/understudy.toml");
    let config = Config::load(&path).expect("packaging/understudy.toml is valid");
    // /etc/understudy/understudy.toml as installed: the paths the systemd unit provides.
    assert_eq!(config.daemon, DaemonConfig::default());
    assert_eq!(config.profile, ProfileConfig::default());
    assert!(config.protect.is_empty());
}

#[test]
fn empty_file_gives_all_defaults() {
    let config = Fixture::new("").load().expect("empty config is valid");
    assert_eq!(config, Config::default());
    assert_eq!(config.daemon.accel, Accel::Auto);
    assert_eq!(config.daemon.log_format, LogFormat::Text);
    assert_eq!(config.daemon.keepalive_interval_s, 5);
    assert_eq!(config.monitor.history_samples, 3600);
    assert_eq!(config.profile.drift_coverage_threshold, 0.8);
    assert!(config.protect.is_empty());
    assert_eq!(config.class.keys().collect::<Vec<_>>(), vec!["default"]);
    assert_eq!(config.class["default"], ClassConfig::default());
}

#[test]
fn partial_sections_keep_defaults_for_missing_keys() {
    let config = Fixture::new(
        r#"
[daemon]
log_format = "json"

[class.default]
shadows = 2

[class.web]
heartbeat_misses = 5

[class.web.probe]
kind = "http"
address = "10.77.0.10:80"
"#,
    )
    .load()
    .expect("valid");
    assert_eq!(config.daemon.log_format, LogFormat::Json);
    assert_eq!(config.daemon.libvirt_uri, "qemu:///system");
    assert_eq!(config.class["default"].shadows, 2);
    assert_eq!(config.class["default"].heartbeat_interval_ms, 250);
    let web = &config.class["web"];
    assert_eq!(web.heartbeat_misses, 5);
    assert_eq!(web.shadows, 1);
    let probe = web.probe.as_ref().expect("probe");
    // An http probe without `path` checks "/"; interval and timeout have defaults.
    assert_eq!(
        probe.check,
        ProbeCheck::Http {
            path: "/".to_owned()
        }
    );
    assert_eq!((probe.interval_ms, probe.timeout_ms), (200, 100));
}

#[test]
fn malformed_toml_names_file_and_line() {
    let fixture = Fixture::new("[daemon]\nlibvirt_uri = \"qemu:///system\"\naccel = tcg\n");
    match fixture.load() {
        Err(ConfigError::Syntax { path, line, .. }) => {
            assert_eq!(path, fixture.path);
            assert_eq!(line, 3);
        }
        other => panic!("expected a syntax error, got {other:?}"),
    }
    let text = fixture.error_text();
    assert!(
        text.starts_with(&format!("{}:3:", fixture.path.display())),
        "{text}"
    );
}

#[test]
fn duplicate_key_is_a_syntax_error_on_its_line() {
    let fixture = Fixture::new("[class.web]\nshadows = 1\nshadows = 2\n");
    match fixture.load() {
        Err(ConfigError::Syntax { line, .. }) => assert_eq!(line, 3),
        other => panic!("expected a syntax error, got {other:?}"),
    }
}

#[test]
fn unknown_key_names_file_line_and_key() {
    let fixture = Fixture::new("[monitor]\nsample_interval_ms = 500\nsample_intervall_ms = 500\n");
    let problems = fixture.problems();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].line, 3);
    assert_eq!(problems[0].key, "monitor.sample_intervall_ms");
    let text = fixture.error_text();
    assert!(
        text.contains(&(fixture.at(3, "monitor.sample_intervall_ms") + "unknown field")),
        "{text}"
    );
}

#[test]
fn unknown_top_level_section_is_reported() {
    let fixture = Fixture::new("\n[deamon]\naccel = \"kvm\"\n");
    let text = fixture.error_text();
    assert!(
        text.contains(&(fixture.at(2, "deamon") + "unknown section `deamon`")),
        "{text}"
    );
}

#[test]
fn wrong_type_names_file_line_and_key() {
    let fixture = Fixture::new("[class.web]\nshadows = \"two\"\n");
    let text = fixture.error_text();
    assert!(
        text.contains(&(fixture.at(2, "class.web.shadows") + "invalid type")),
        "{text}"
    );
}

#[test]
fn bad_enum_value_lists_the_choices() {
    let fixture = Fixture::new("[daemon]\naccel = \"hvf\"\n");
    let problems = fixture.problems();
    assert_eq!(problems.len(), 1);
    assert_eq!(
        (problems[0].line, problems[0].key.as_str()),
        (2, "daemon.accel")
    );
    assert!(problems[0].message.contains("`tcg`"), "{problems:?}");
}

#[test]
fn class_placement_is_read_and_a_bad_one_lists_the_choices() {
    let config = Fixture::new("[class.web]\nshadows = 2\nplacement = \"spread\"\n")
        .load()
        .expect("spread is a placement");
    assert_eq!(
        config.class["web"].placement,
        crate::cluster::Placement::Spread
    );
    assert_eq!(
        config.class["default"].placement,
        crate::cluster::Placement::Local
    );
    let problems = Fixture::new("[class.web]\nplacement = \"anywhere\"\n").problems();
    assert_eq!(
        (problems[0].line, problems[0].key.as_str()),
        (2, "class.web.placement")
    );
    assert!(problems[0].message.contains("`other-host`"), "{problems:?}");
}

#[test]
fn out_of_range_names_file_line_key_and_range() {
    let fixture = Fixture::new("# lab\n\n[class.web]\nshadows = 12\n");
    let text = fixture.error_text();
    assert!(
        text.contains(&(fixture.at(4, "class.web.shadows") + "12 is out of range 0..=8")),
        "{text}"
    );
}

#[test]
fn negative_number_is_rejected_not_wrapped() {
    let problems = Fixture::new("[daemon]\nkeepalive_count = -1\n").problems();
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].key, "daemon.keepalive_count");
    assert_eq!(problems[0].line, 2);
}

#[test]
fn every_problem_is_collected_in_line_order() {
    let fixture = Fixture::new(
        r#"[daemon]
keepalive_interval_s = 0
metrics_listen = "0.0.0.0:9464"

[monitor]
bogus = 1

[profile]
headroom_pct = 500
drift_coverage_threshold = 0.0
keep_versions = 1

[[protect]]
match = "web*"
class = "missing"

[class.web]
shadows = 9
heartbeat_interval_ms = 100
heartbeat_timeout_ms = 100
config_files = ["etc/hostname"]
coverage_target = 1.5
"#,
    );
    let problems = fixture.problems();
    let found: Vec<_> = problems.iter().map(|p| (p.line, p.key.as_str())).collect();
    assert_eq!(
        found,
        vec![
            (2, "daemon.keepalive_interval_s"),
            (3, "daemon.metrics_listen"),
            (6, "monitor.bogus"),
            (9, "profile.headroom_pct"),
            (10, "profile.drift_coverage_threshold"),
            (11, "profile.keep_versions"),
            (15, "protect[0].class"),
            (18, "class.web.shadows"),
            (20, "class.web.heartbeat_timeout_ms"),
            (21, "class.web.config_files[0]"),
            (22, "class.web.coverage_target"),
        ]
    );
    // The rendered error has one line per problem after the summary.
    let text = fixture.error_text();
    assert_eq!(text.lines().count(), 1 + problems.len(), "{text}");
    assert!(
        text.contains(&fixture.at(3, "daemon.metrics_listen")),
        "{text}"
    );
}

#[test]
fn remote_metrics_need_explicit_permission() {
    let config =
        Fixture::new("[daemon]\nmetrics_listen = \"[::]:9464\"\nmetrics_allow_remote = true\n")
            .load()
            .expect("remote metrics allowed");
    assert!(!config.daemon.metrics_listen.ip().is_loopback());
}

#[test]
fn protect_rule_with_unknown_class() {
    let fixture = Fixture::new("[[protect]]\nmatch = \"web*\"\nclass = \"gold\"\n");
    let problems = fixture.problems();
    assert_eq!(problems.len(), 1);
    assert_eq!(
        (problems[0].line, problems[0].key.as_str()),
        (3, "protect[0].class")
    );
    assert!(
        problems[0].message.contains("unknown class `gold`"),
        "{problems:?}"
    );
}

#[test]
fn protect_rule_naming_a_broken_class_is_not_also_unknown() {
    let problems =
        Fixture::new("[[protect]]\nmatch = \"web*\"\nclass = \"web\"\n\n[class.web]\nshadow = 1\n")
            .problems();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].key, "class.web.shadow");
}

#[test]
fn bad_glob_is_reported_at_its_rule() {
    let problems =
        Fixture::new("[[protect]]\nmatch = \"web*\"\nclass = \"default\"\n\n[[protect]]\nmatch = \"db[\"\nclass = \"default\"\n")
            .problems();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(
        (problems[0].line, problems[0].key.as_str()),
        (6, "protect[1].match")
    );
    assert!(problems[0].message.contains("invalid glob"), "{problems:?}");
}

#[test]
fn missing_required_protect_key_points_at_the_rule() {
    let problems = Fixture::new("[daemon]\n\n[[protect]]\nclass = \"default\"\n").problems();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].key, "protect[0]");
    assert!(problems[0].message.contains("match"), "{problems:?}");
    assert!(problems[0].line >= 3, "{problems:?}");
}

#[test]
fn repeated_pattern_is_an_unreachable_rule() {
    let problems = Fixture::new(
        "[[protect]]\nmatch = \"web*\"\nclass = \"default\"\n[[protect]]\nmatch = \"web*\"\nclass = \"default\"\n",
    )
    .problems();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(
        (problems[0].line, problems[0].key.as_str()),
        (5, "protect[1].match")
    );
    assert!(problems[0].message.contains("line 1"), "{problems:?}");
}

#[test]
fn single_protect_table_instead_of_array() {
    let problems = Fixture::new("[protect]\nmatch = \"web*\"\nclass = \"default\"\n").problems();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!((problems[0].line, problems[0].key.as_str()), (1, "protect"));
    assert!(problems[0].message.contains("[[protect]]"), "{problems:?}");
}

#[test]
fn guest_paths_and_commands_are_checked() {
    let problems = Fixture::new(
        r#"[class.default]
config_files = ["/etc/hostname", "relative/file", "/etc/hostname"]
config_commands = [["uname", "-r"], []]
golden_image = ""
"#,
    )
    .problems();
    let found: Vec<_> = problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        found,
        vec![
            "class.default.config_files[1]",
            "class.default.config_files[2]",
            "class.default.config_commands[0][0]",
            "class.default.config_commands[1]",
            "class.default.golden_image",
        ],
        "{problems:?}"
    );
    assert!(problems[0].message.contains("not an absolute path"));
    assert!(problems[1]
        .message
        .contains("already listed as class.default.config_files[0]"));
}

#[test]
fn heartbeat_timeout_must_be_below_interval() {
    let fixture = Fixture::new("[class.default]\nheartbeat_timeout_ms = 250\n");
    let problems = fixture.problems();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(
        (problems[0].line, problems[0].key.as_str()),
        (2, "class.default.heartbeat_timeout_ms")
    );
    // One below the (default) interval is fine.
    Fixture::new("[class.default]\nheartbeat_timeout_ms = 249\n")
        .load()
        .expect("timeout below interval");
}

#[test]
fn probe_shape_and_ranges_are_checked() {
    let problems = Fixture::new(
        "[class.db.probe]\nkind = \"tcp\"\naddress = \"10.77.0.20:5432\"\npath = \"/\"\n",
    )
    .problems();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].key.starts_with("class.db.probe"),
        "{problems:?}"
    );
    assert!(
        problems[0].message.contains("only meaningful"),
        "{problems:?}"
    );

    let problems = Fixture::new(
        "[class.db.probe]\nkind = \"http\"\naddress = \"10.77.0.20:80\"\npath = \"health\"\ninterval_ms = 100\ntimeout_ms = 100\n",
    )
    .problems();
    let found: Vec<_> = problems.iter().map(|p| (p.line, p.key.as_str())).collect();
    assert_eq!(
        found,
        vec![(4, "class.db.probe.path"), (6, "class.db.probe.timeout_ms")]
    );

    let problems =
        Fixture::new("[class.db.probe]\nkind = \"udp\"\naddress = \"10.77.0.20:53\"\n").problems();
    assert_eq!(
        (problems[0].line, problems[0].key.as_str()),
        (2, "class.db.probe.kind")
    );
}

#[test]
fn quoted_class_names_are_quoted_in_key_paths() {
    let problems = Fixture::new("[class.\"my.db\"]\nshadows = 10\n").problems();
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].key, "class.\"my.db\".shadows");
    assert_eq!(problems[0].line, 2);
}

#[test]
fn dotted_keys_are_located_too() {
    let problems = Fixture::new("class.web.shadows = 9\nmonitor.history_samples = 5\n").problems();
    let found: Vec<_> = problems.iter().map(|p| (p.line, p.key.as_str())).collect();
    assert_eq!(
        found,
        vec![(1, "class.web.shadows"), (2, "monitor.history_samples")]
    );
}

#[test]
fn invalid_log_filter_is_rejected() {
    let problems = Fixture::new("[daemon]\nlog_level = \"info,=\"\n").problems();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].key, "daemon.log_level");
    Fixture::new("[daemon]\nlog_level = \"understudy=debug,warn\"\n")
        .load()
        .expect("directives accepted");
}

#[test]
fn log_filter_field_values_are_literal_not_regexes() {
    // An invalid regex is accepted as a literal value: no pattern is compiled at all.
    crate::config::log_filter("understudy[{peer=a(}]=debug").expect("literal field value");
    // What the fuzz target found (its regex took ~1.7 s of CPU to compile): now refused at
    // once, naming the key.
    let found = include_str!("fixtures/fuzz-log-level-regex.toml");
    let problems = Fixture::new(found).problems();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].key, "daemon.log_level");
}

#[test]
fn class_for_uses_the_first_matching_rule() {
    let config = Config::parse(
        r#"
[[protect]]
match = "web-special*"
class = "special"

[[protect]]
match = "web*"
class = "default"

[[protect]]
match = "web-special-2"
class = "other"

[[protect]]
match = "db-?"
class = "other"

[class.special]
shadows = 3

[class.other]
shadows = 0
"#,
        Path::new("inline.toml"),
    )
    .expect("valid");
    let class_of = |name| config.class_for(name).map(|(class, _)| class);
    assert_eq!(class_of("web-special-1"), Some("special"));
    // An earlier, broader rule shadows a later, narrower one.
    assert_eq!(class_of("web-special-2"), Some("special"));
    assert_eq!(class_of("web1"), Some("default"));
    assert_eq!(class_of("db-1"), Some("other"));
    // Globs match the whole name.
    assert_eq!(class_of("db-12"), None);
    assert_eq!(class_of("my-web1"), None);
    assert_eq!(config.class_for("web-special-1").unwrap().1.shadows, 3);
}

#[test]
fn parse_names_the_given_origin() {
    let error = Config::parse("[class.web]\nshadows = 12\n", Path::new("configs/x.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("configs/x.toml:2: class.web.shadows: 12 is out of range 0..=8"),
        "{error}"
    );
}

#[test]
fn unreadable_oversized_and_non_utf8_files() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("missing.toml");
    match Config::load(&missing) {
        Err(ConfigError::Read { path, source }) => {
            assert_eq!(path, missing);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected a read error, got {other:?}"),
    }

    let mut big = b"# ".to_vec();
    big.resize(MAX_CONFIG_BYTES as usize + 1, b'x');
    assert!(matches!(
        Fixture::bytes(&big).load(),
        Err(ConfigError::TooLarge { .. })
    ));

    assert!(matches!(
        Fixture::bytes(b"# \xff\n").load(),
        Err(ConfigError::NotUtf8 { .. })
    ));
}

#[test]
fn accel_picks_the_domain_type() {
    assert_eq!(Accel::Auto.domain_type(true), "kvm");
    assert_eq!(Accel::Auto.domain_type(false), "qemu");
    assert_eq!(Accel::Kvm.domain_type(false), "kvm");
    assert_eq!(Accel::Tcg.domain_type(true), "qemu");
}

#[test]
fn disk_roles_resolve_by_target_with_a_default() {
    let config = Fixture::new(
        r#"[class.db]
disk_roles = { vdb = "data", vdc = "system" }
default_disk_role = "data"
promote_commands = [["/bin/mount", "/dev/vdb", "/data"], ["/usr/bin/systemctl", "start", "pg"]]
promote_command_timeout_ms = 5000
"#,
    )
    .load()
    .expect("valid disk roles");
    let db = &config.class["db"];
    assert_eq!(db.disk_role("vdb"), DiskRole::Data);
    assert_eq!(db.disk_role("vdc"), DiskRole::System);
    assert_eq!(db.disk_role("vdz"), DiskRole::Data);
    assert_eq!(db.promote_commands.len(), 2);
    assert_eq!(db.promote_command_timeout(), Duration::from_millis(5000));
    // Without any key every disk is a system disk, as before roles existed.
    let default = ClassConfig::default();
    assert_eq!(default.disk_role("vda"), DiskRole::System);
    assert!(default.promote_commands.is_empty());
}

#[test]
fn disk_roles_and_promote_commands_are_checked() {
    let fixture = Fixture::new(
        r#"[class.default]
disk_roles = { "v d" = "data" }
promote_commands = [["mount", "/data"], []]
promote_command_timeout_ms = 50
"#,
    );
    let problems = fixture.problems();
    let found: Vec<_> = problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        found,
        vec![
            "class.default.disk_roles.\"v d\"",
            "class.default.promote_commands[0][0]",
            "class.default.promote_commands[1]",
            "class.default.promote_command_timeout_ms",
        ],
        "{problems:?}"
    );
    assert!(problems[0].message.contains("not a disk target name"));
    // A role that does not exist lists the two that do.
    let text = Fixture::new("[class.default]\ndisk_roles = { vdb = \"scratch\" }\n").error_text();
    assert!(text.contains("disk_roles"), "{text}");
    assert!(text.contains("system") && text.contains("data"), "{text}");
}

#[test]
fn non_ascii_log_level_is_a_problem_not_a_panic() {
    let text = include_str!("fixtures/fuzz-log-level-multibyte.toml");
    let problems = Fixture::new(text).problems();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].key, "daemon.log_level");
    assert_eq!(problems[0].line, 5);
    assert!(problems[0].message.contains("only ASCII"), "{problems:?}");
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/config/fixtures")
        .join(name)
}

#[test]
fn cluster_table_is_read_with_its_defaults() {
    let config = Config::load(&fixture("cluster.toml")).expect("cluster.toml is valid");
    let c = config.cluster.expect("[cluster]");
    assert_eq!(c.endpoints.len(), 3);
    assert_eq!(c.host.as_deref(), Some("h1"));
    assert_eq!(c.key_prefix, "/understudy/lab");
    assert_eq!(c.lease_ttl(), Duration::from_secs(3));
    assert_eq!(c.keepalive_interval(), Duration::from_millis(500));
    assert_eq!(c.reserved_memory_mib, 2048);
    assert_eq!(config.profile.repository_backend, RepositoryBackend::Etcd);

    // Only the endpoints are required; the keepalive defaults to a quarter of the TTL.
    let c = Fixture::new("[cluster]\nendpoints = [\"http://127.0.0.1:2379\"]\n")
        .load()
        .unwrap()
        .cluster
        .unwrap();
    assert_eq!(
        (c.key_prefix.as_str(), c.lease_ttl_s, c.keepalive_interval()),
        ("/understudy/default", 5, Duration::from_millis(1250))
    );
    assert_eq!(c.reserved_memory_mib, 0, "no memory kept out of placement");
    assert_eq!(Config::default().cluster, None, "single host without it");
}

#[test]
fn cluster_problems_name_file_line_and_key() {
    let path = fixture("cluster-invalid.toml");
    let text = Config::load(&path).unwrap_err().to_string();
    let p = path.display();
    for want in [
        format!("{p}:5: cluster.endpoints[0]: \"https://10.78.0.1:2379\": https needs TLS"),
        format!("{p}:5: cluster.endpoints[1]: \"10.78.0.2:2379\" must be http://HOST:PORT"),
        format!("{p}:5: cluster.endpoints[2]: \"http://:2379\" must be http://HOST:PORT"),
        format!("{p}:5: cluster.endpoints[3]: \"http://h:0\" must be http://HOST:PORT"),
        format!("{p}:6: cluster.host: invalid host name \"h/1\": contains '/'"),
        format!("{p}:7: cluster.key_prefix: \"understudy/lab/\" must start with '/'"),
        format!("{p}:8: cluster.libvirt_uri: must not be empty"),
        format!("{p}:9: cluster.lease_ttl_s: 0 is out of range 1..=300"),
        format!("{p}:10: cluster.keepalive_interval_ms: 900 is out of range 50..=50"),
        format!("{p}:11: cluster.op_timeout_ms: 5000 ms is not below the lease TTL (0 s)"),
        format!("{p}:12: cluster.connect_timeout_ms: 10 is out of range 50..=30000"),
        format!("{p}:13: cluster.reserved_memory_mib: 99999999999 is out of range 0..=16777216"),
    ] {
        assert!(text.contains(&want), "{want:?} missing from:\n{text}");
    }
    // etcd profiles without a cluster.
    let f = Fixture::new("[profile]\nrepository_backend = \"etcd\"\n");
    assert!(
        f.error_text()
            .contains(&f.at(2, "profile.repository_backend")),
        "{}",
        f.error_text()
    );
    let f = Fixture::new("[cluster]\n");
    assert!(f
        .error_text()
        .contains("cluster.endpoints: must list at least one"));
    let f = Fixture::new("[cluster]\nendpoints = [\"http://a:1\"]\nwho = 1\n");
    assert!(
        f.error_text().contains("unknown field `who`"),
        "{}",
        f.error_text()
    );
}

#[test]
fn capture_and_replay_settings_are_checked() {
    let problems = Fixture::new(
        "[class.web.capture]\nenabled = true\nports = [0]\nmax_bytes = 10\nredact_patterns = [\"(\"]\n[class.web.replay]\nignore = [\"[\"]\nverify_interval_s = 5\n",
    )
    .problems();
    let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
    for key in [
        "class.web.capture.ports[0]",
        "class.web.capture.max_bytes",
        "class.web.capture.redact_patterns[0]",
        "class.web.replay.ignore[0]",
        "class.web.replay.verify_interval_s",
    ] {
        assert!(keys.contains(&key), "{key} not in {problems:?}");
    }
    let cfg =
        Fixture::new("[class.web.capture]\nenabled = true\nprotocol = \"tcp\"\nports = [6379]\n")
            .load()
            .unwrap();
    let c = &cfg.class["web"].capture;
    assert!(c.enabled);
    assert_eq!(c.protocol, CaptureProtocol::Tcp);
    assert!(
        !cfg.class["default"].capture.enabled,
        "capture is off by default"
    );
}

#[test]
fn a_pool_is_read_with_its_template_and_ratio() {
    let config = Fixture::new(
        "[class.web]\nshadows = 0\n\n[class.web.pool]\nprimaries_per_shadow = 4\ntemplate = \"web-golden\"\n",
    )
    .load()
    .expect("a pooled class is valid");
    assert_eq!(
        config.class["web"].pool,
        Some(PoolConfig {
            primaries_per_shadow: 4,
            template: "web-golden".into()
        })
    );
    assert_eq!(config.class["default"].pool, None);
}

#[test]
fn a_pool_refuses_what_it_cannot_stand_in_for() {
    let problems = Fixture::new(
        "[class.web]\nstandby_tier = \"saved\"\nnetwork = \"routed\"\n\n[class.web.pool]\nprimaries_per_shadow = 0\ntemplate = \"a b\"\n",
    )
    .problems();
    let mut found: Vec<_> = problems.iter().map(|p| p.key.as_str()).collect();
    found.sort_unstable();
    assert_eq!(
        found,
        [
            "class.web.network",
            "class.web.pool.primaries_per_shadow",
            "class.web.pool.template",
            "class.web.shadows",
            "class.web.standby_tier",
        ],
        "{problems:?}"
    );
    let text = |key: &str| {
        problems
            .iter()
            .find(|p| p.key == key)
            .map(|p| p.message.clone())
            .unwrap()
    };
    assert!(text("class.web.shadows").contains("set shadows = 0"));
    assert!(text("class.web.standby_tier").contains("stand by paused"));
    assert!(text("class.web.pool.template").contains("not a domain name"));
    let unknown = Fixture::new("[class.web.pool]\nratio = 4\n").error_text();
    assert!(unknown.contains("class.web.pool"), "{unknown}");
}

#[test]
fn host_loss_keys_have_defaults_and_bounds() {
    let c = Fixture::new(
        "[cluster]\nendpoints = [\"http://a:1\"]\n[cluster.fence]\nh2 = [\"/usr/sbin/fence_lab\", \"-n\", \"h2\"]\n",
    )
    .load()
    .unwrap()
    .cluster
    .unwrap();
    assert_eq!(c.heartbeat_port, 7946);
    assert_eq!(c.heartbeat_interval(), Duration::from_millis(100));
    assert_eq!(c.suspect_after(), Duration::from_millis(500));
    assert_eq!(c.self_fence_guard(), Duration::from_millis(500));
    assert_eq!(c.promote_margin(), Duration::from_secs(1));
    assert_eq!(c.unreachable_after(), Duration::from_secs(2));
    assert_eq!(c.fence["h2"], ["/usr/sbin/fence_lab", "-n", "h2"]);
    assert_eq!(c.watchdog, None);

    let f = Fixture::new(
        "[cluster]\nendpoints = [\"http://a:1\"]\nlease_ttl_s = 2\nheartbeat_interval_ms = 200\nsuspect_after_ms = 400\nself_fence_guard_ms = 2000\nunreachable_after_ms = 100\nwatchdog = \"/dev/watchdog\"\nwatchdog_timeout_s = 1\n[cluster.fence]\nh2 = []\n\"h/3\" = [\"fence_x\"]\n",
    );
    let text = f.error_text();
    for want in [
        "cluster.suspect_after_ms: 400 is out of range 600..=1999",
        "cluster.self_fence_guard_ms: 2000 is out of range 100..=1999",
        "cluster.unreachable_after_ms: 100 is out of range 200..=600000",
        "cluster.fence.h2: must name a fence agent",
        "invalid host name \"h/3\"",
        "cluster.watchdog_timeout_s: 1 s does not fit",
    ] {
        assert!(text.contains(want), "{want:?} missing from:\n{text}");
    }
}
