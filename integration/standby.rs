//! What standing by costs, and the ways to make it cheaper, on real guests.

use std::time::Duration;

use serde_json::Value;

use crate::common::*;

const SHADOW_WAIT: Duration = Duration::from_secs(240);

/// The memory cgroup charge of a QEMU process, read the way an operator would: the `memory`
/// line of /proc/<pid>/cgroup (minus libvirt's per-thread child), then that cgroup's
/// memory.usage_in_bytes (v1) or memory.current (v2).
fn cgroup_charge(pid: i32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let (root, path) = text
        .lines()
        .find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, ctrl, path) = (parts.next()?, parts.next()?, parts.next()?);
            ctrl.split(',')
                .any(|c| c == "memory")
                .then(|| ("/sys/fs/cgroup/memory", path.to_string()))
        })
        .or_else(|| {
            text.lines()
                .find_map(|l| l.strip_prefix("0::"))
                .map(|p| ("/sys/fs/cgroup", p.to_string()))
        })
        .expect("a memory cgroup line");
    let path = path.trim_end_matches("/emulator");
    let dir = format!("{root}{path}");
    let file = ["memory.usage_in_bytes", "memory.current"]
        .iter()
        .map(|f| format!("{dir}/{f}"))
        .find(|f| std::path::Path::new(f).exists())
        .unwrap_or_else(|| panic!("no memory counter in {dir}"));
    std::fs::read_to_string(&file)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// VmRSS of a process, bytes.
fn vm_rss(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .expect("VmRSS");
    kb * 1024
}

fn close(what: &str, reported: u64, measured: u64, tolerance: f64) {
    let diff = reported.abs_diff(measured) as f64;
    assert!(
        diff <= (measured as f64 * tolerance).max(1024.0 * 1024.0),
        "{what}: status says {reported}, measured {measured}"
    );
}

fn shadow_entry(svc: &Value, name: &str) -> Value {
    svc["shadows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("{name} not in {svc}"))
}

fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn cost_figures_in_status_match_the_cgroups() {
    require_lab();
    let name = "it-cost1";
    let ip = "10.77.0.70";
    let _cleanup = Cleanup {
        prefixes: vec![name.to_string()],
    };
    let daemon = DaemonProc::start("cost", name, 1);
    let hv = hypervisor();
    start_guest(&hv, name, &format!("{ip}/24"), &[]);
    let shadow = daemon.wait_paused_shadows(name, 1, SHADOW_WAIT).remove(0);

    let svc = daemon.service(name).expect("service in status");
    let s = shadow_entry(&svc, &shadow);
    let m = &s["memory"];
    let (spid, ppid) = (qemu_pid(&shadow), qemu_pid(name));
    // A paused shadow's memory holds still: status and the cgroup agree closely.
    close(
        "paused shadow's cgroup charge",
        m["cgroup_bytes"].as_u64().expect("cgroup_bytes"),
        cgroup_charge(spid),
        0.02,
    );
    close(
        "paused shadow's RSS",
        m["rss_bytes"].as_u64().unwrap(),
        vm_rss(spid),
        0.02,
    );
    let (rss, pss) = (
        m["rss_bytes"].as_u64().unwrap(),
        m["pss_bytes"].as_u64().unwrap(),
    );
    assert!(pss > 0 && pss <= rss, "PSS {pss} must be within RSS {rss}");
    // Private: the shadow's own pages, as smaps_rollup counts them.
    let rollup = std::fs::read_to_string(format!("/proc/{spid}/smaps_rollup")).unwrap();
    let kib = |key: &str| -> u64 {
        rollup
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key} in\n{rollup}"))
    };
    close(
        "paused shadow's private memory",
        m["private_bytes"].as_u64().expect("private_bytes"),
        (kib("Private_Clean:") + kib("Private_Dirty:")) * 1024,
        0.02,
    );
    // The primary runs: its figures move a little between two reads.
    let p = &svc["primary_memory"];
    close(
        "primary's cgroup charge",
        p["cgroup_bytes"].as_u64().expect("primary cgroup_bytes"),
        cgroup_charge(ppid),
        0.10,
    );
    close(
        "primary's RSS",
        p["rss_bytes"].as_u64().unwrap(),
        vm_rss(ppid),
        0.10,
    );
    // The shares are the figures' own ratio.
    let share = s["share_of_primary_pct"].as_f64().expect("share");
    let want = m["cgroup_bytes"].as_f64().unwrap() * 100.0 / p["cgroup_bytes"].as_f64().unwrap();
    assert!(
        (share - want).abs() < 0.1,
        "share {share}%, figures say {want}%"
    );
    assert_eq!(svc["standby_memory_bytes"], m["cgroup_bytes"]);
    assert_eq!(svc["standby_share_pct"], s["share_of_primary_pct"]);
    eprintln!(
        "primary: cgroup {} rss {} pss {}; paused shadow: cgroup {} rss {} pss {} ({share}%)",
        p["cgroup_bytes"], p["rss_bytes"], p["pss_bytes"], m["cgroup_bytes"], rss, pss
    );

    // The metrics carry the same figures.
    let text = daemon.metrics();
    let exported = metric(
        &text,
        &format!(
            r#"understudy_member_memory_bytes{{service="{name}",domain="{shadow}",role="paused",measure="cgroup"}}"#
        ),
    )
    .unwrap_or_else(|| panic!("no shadow cgroup series in\n{text}"));
    close(
        "exported shadow cgroup charge",
        exported as u64,
        cgroup_charge(spid),
        0.02,
    );
    let standby = metric(
        &text,
        &format!(r#"understudy_standby_memory_bytes{{service="{name}"}}"#),
    )
    .expect("standby_memory_bytes series");
    close(
        "exported standby memory",
        standby as u64,
        cgroup_charge(spid),
        0.02,
    );
    assert!(
        metric(
            &text,
            &format!(r#"understudy_standby_memory_share_ratio{{service="{name}"}}"#)
        )
        .is_some_and(|r| r > 0.0 && r < 2.0),
        "{text}"
    );

    // The text status says it too.
    let (code, out, err) = daemon.cli(&["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("{name} memory: standing by")),
        "{out}"
    );
}

/// The shadow's live balloon size, KiB.
fn live_kib(hv: &understudy::libvirt::Hypervisor, name: &str) -> u64 {
    hv.live_resources(name).expect("live resources").1
}

#[test]
fn shrunk_paused_shadow_is_promoted_grown_back_and_serves() {
    require_lab();
    let name = "it-shrink1";
    let ip = "10.77.0.71";
    let _cleanup = Cleanup {
        prefixes: vec![name.to_string()],
    };
    let daemon = DaemonProc::start_configured(
        "shrink",
        name,
        1,
        "standby_shrink = true\nfree_page_reporting = true\nstandby_reclaim = true",
        &[],
    );
    let hv = hypervisor();
    start_guest(&hv, name, &format!("{ip}/24"), &[]);
    let shadow = daemon.wait_paused_shadows(name, 1, SHADOW_WAIT).remove(0);
    let shadow_uuid = domain_uuid(&hv, &shadow);

    // Shrunk before it was paused, with free page reporting on its balloon.
    let full = live_kib(&hv, name);
    let standing = live_kib(&hv, &shadow);
    assert!(
        standing < full,
        "the paused shadow was not shrunk: {standing} KiB, primary {full} KiB"
    );
    let xml = hv.xml(&shadow, false).unwrap();
    assert!(
        xml.contains("freePageReporting='on'") || xml.contains("freePageReporting=\"on\""),
        "{xml}"
    );
    let log = daemon.log_text();
    for step in [
        "guest page cache dropped and free memory compacted before standing by",
        "shadow ballooned down before standing by",
        "freed pages reported to the host before standing by",
    ] {
        assert!(log.contains(step), "no '{step}' in the log:\n{log}");
    }
    let svc = daemon.service(name).unwrap();
    eprintln!(
        "standing by at {standing} of {full} KiB; shadow {} / primary {} (share {}%)",
        shadow_entry(&svc, &shadow)["memory"],
        svc["primary_memory"],
        svc["standby_share_pct"]
    );

    wait_for("primary page", Duration::from_secs(60), || {
        http_get(ip, Duration::from_secs(1))
    });
    let pid = qemu_pid(name);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // The promoted shadow serves, and is grown back to the size it was defined with.
    wait_for(
        "the promoted shadow's page",
        Duration::from_secs(30),
        || http_get(ip, Duration::from_millis(200)).filter(|p| page_uuid(p) == shadow_uuid),
    );
    let svc = wait_for("status shows the failover", Duration::from_secs(60), || {
        let s = daemon.service(name)?;
        (s["active"] == shadow.as_str() && s["last_failover"]["ok"] == true).then_some(s)
    });
    let notes = svc["last_failover"]["notes"].to_string();
    assert!(notes.contains("standby shrink undone"), "{notes}");
    let grown = wait_for("balloon grown back", Duration::from_secs(30), || {
        let k = live_kib(&hv, &shadow);
        (k + 2048 >= full).then_some(k)
    });
    eprintln!("promoted: {standing} KiB -> {grown} KiB; notes {notes}");
    for _ in 0..5 {
        let page = http_get(ip, Duration::from_secs(1)).expect("promoted shadow serves");
        assert_eq!(page_uuid(&page), shadow_uuid);
    }
}

/// A shadow of `tier` stands by shut off, holding no memory, and is promoted when its primary's
/// QEMU is killed: it wakes (restored or booted), serves with the primary's address, and the
/// failover record has the `wake` step.
fn shut_off_tier_is_promoted(tier: &str, name: &str, ip: &str) {
    require_lab();
    let _cleanup = Cleanup {
        prefixes: vec![name.to_string()],
    };
    let daemon = DaemonProc::start_configured(
        &format!("tier-{tier}"),
        name,
        1,
        &format!("standby_tier = \"{tier}\""),
        &[],
    );
    let hv = hypervisor();
    start_guest(&hv, name, &format!("{ip}/24"), &[]);
    let shadow = wait_for(&format!("a {tier} shadow"), SHADOW_WAIT, || {
        let svc = daemon.service(name)?;
        svc["shadows"]
            .as_array()?
            .iter()
            .find(|s| s["state"] == tier)
            .and_then(|s| s["name"].as_str().map(str::to_string))
    });
    assert_eq!(
        hv.state(&shadow).unwrap(),
        understudy::libvirt::RunState::Shutoff,
        "a {tier} shadow stands by shut off"
    );
    let svc = daemon.service(name).unwrap();
    assert_eq!(svc["state"], "protected", "{svc}");
    assert_eq!(svc["standby_memory_bytes"], 0, "{svc}");
    assert!(shadow_entry(&svc, &shadow)["memory"].is_null(), "{svc}");
    let shadow_uuid = domain_uuid(&hv, &shadow);

    wait_for("primary page", Duration::from_secs(60), || {
        http_get(ip, Duration::from_secs(1))
    });
    let killed = std::time::Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(qemu_pid(name)),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_for_every(
        &format!("the woken {tier} shadow's page"),
        Duration::from_secs(180),
        Duration::from_millis(20),
        || http_get(ip, Duration::from_millis(200)).filter(|p| page_uuid(p) == shadow_uuid),
    );
    eprintln!("{tier}: served again {:?} after SIGKILL", killed.elapsed());
    let svc = wait_for("status shows the failover", Duration::from_secs(60), || {
        let s = daemon.service(name)?;
        (s["active"] == shadow.as_str() && s["last_failover"]["ok"] == true).then_some(s)
    });
    let steps: Vec<&str> = svc["last_failover"]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert!(steps.contains(&"wake"), "{steps:?}");
    eprintln!("{tier}: steps {}", svc["last_failover"]["steps"]);
    // One server for the address: the woken shadow.
    for _ in 0..5 {
        let page = http_get(ip, Duration::from_secs(1)).expect("woken shadow serves");
        assert_eq!(page_uuid(&page), shadow_uuid);
    }
}

#[test]
fn saved_tier_shadow_is_restored_and_promoted() {
    shut_off_tier_is_promoted("saved", "it-saved1", "10.77.0.72");
}

#[test]
fn cold_tier_shadow_is_booted_and_promoted() {
    shut_off_tier_is_promoted("cold", "it-cold1", "10.77.0.73");
}

/// The state of the one shadow of `name` in status, with its name, once it is `state`.
fn wait_shadow_state(d: &DaemonProc, name: &str, state: &str, limit: Duration) -> String {
    wait_for(&format!("a {state} shadow of {name}"), limit, || {
        d.service(name)?["shadows"]
            .as_array()?
            .iter()
            .find(|s| s["state"] == state)
            .and_then(|s| s["name"].as_str().map(str::to_string))
    })
}

#[test]
fn adaptive_tier_switches_between_paused_and_saved_on_the_driven_clock() {
    require_lab();
    let name = "it-adapt1";
    let ip = "10.77.0.75";
    let _cleanup = Cleanup {
        prefixes: vec![name.to_string()],
    };
    const HOUR: u64 = 3_600_000;
    let day = 20_500 * 24 * HOUR; // a midnight, UTC
    let clock = std::env::temp_dir().join(format!("understudy-it-clock-{}", std::process::id()));
    let set_clock = |t: u64| std::fs::write(&clock, t.to_string()).unwrap();
    set_clock(day);
    let daemon = DaemonProc::start_configured(
        "adaptive",
        name,
        1,
        "standby_tier = \"adaptive\"\nbusy_hours_utc = [[10, 12]]\nadaptive_lead_s = 600",
        &[("UNDERSTUDY_PROFILE_CLOCK_FILE", clock.to_str().unwrap())],
    );
    let hv = hypervisor();
    start_guest(&hv, name, &format!("{ip}/24"), &[]);

    // Midnight is idle: the shadow is made saved, and the plan says when it will be paused.
    let shadow = wait_shadow_state(&daemon, name, "saved", SHADOW_WAIT);
    let plan = &daemon.service(name).unwrap()["standby_plan"];
    assert_eq!(plan["tier"], "saved", "{plan}");
    assert_eq!(plan["next_tier"], "paused", "{plan}");
    assert_eq!(
        plan["next_switch_unix_ms"],
        day + 10 * HOUR - 600_000,
        "{plan}"
    );
    let (_, text, _) = daemon.cli(&["status"]);
    assert!(
        text.contains("adaptive standby: saved now; next switch to paused at"),
        "{text}"
    );

    // Ten minutes before the busy hours it is restored and paused, off the bridge.
    set_clock(day + 10 * HOUR - 5 * 60_000);
    let s = wait_shadow_state(&daemon, name, "paused", Duration::from_secs(120));
    assert_eq!(s, shadow, "the same shadow switches");
    assert_eq!(
        hv.state(&shadow).unwrap(),
        understudy::libvirt::RunState::Paused
    );
    for (_, tap) in taps(&hv, &shadow) {
        assert_eq!(
            master_of(&tap),
            None,
            "a paused shadow's tap is on a bridge"
        );
    }
    let plan = &daemon.service(name).unwrap()["standby_plan"];
    assert_eq!(plan["tier"], "paused", "{plan}");
    assert_eq!(plan["next_switch_unix_ms"], day + 12 * HOUR, "{plan}");

    // When the busy hours end it is saved again.
    set_clock(day + 12 * HOUR);
    wait_shadow_state(&daemon, name, "saved", Duration::from_secs(120));
    assert_eq!(
        hv.state(&shadow).unwrap(),
        understudy::libvirt::RunState::Shutoff
    );
    assert_eq!(daemon.service(name).unwrap()["state"], "protected");
    let _ = std::fs::remove_file(&clock);
}
