//! `make bench-replay`: what capture costs the primary, and how replay performs.
//!
//! On the lab's ledger guest (its traffic captured from its tap, its data disk a data disk):
//! 1. Latency a client sees, capture on and off in the same run: alternating blocks of
//!    `BENCH_REQUESTS` / 6 sequential requests (GET /, POST /append, GET /ledger in turn, a new
//!    connection each, from inside the lab), the capture switched by `understudy reload`;
//!    p50/p99/max per condition.
//! 2. A canary with a change that changes nothing (`/bin/true`): its report gives the replay's
//!    throughput (requests answered per second, both clones) and its fidelity: the share of
//!    replayed requests answered alike by the unchanged clone and the baseline after noise
//!    filtering (target >= 99%).
//! 3. A standby verification of the healthy shadow: the share answered as recorded.
//!
//! Writes build/bench/replay.json. Environment: BENCH_REQUESTS (default 3000).

#[path = "../integration/common.rs"]
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;

const NAME: &str = "bench-rep";
const IP: &str = "10.77.0.37";

const CLASS: &str = r#"disk_roles = { vdb = "data" }
promote_commands = [["/bin/us-data", "mount"]]
promote_command_timeout_ms = 15000

[class.default.capture]
enabled = CAPTURE
ports = [80]
max_per_second = 10000

[class.default.replay]
ignore = ["uuid=\\S+", "boot=\\S+", "(?m)^k[0-9]+$"]
max_requests = 500
"#;

fn request(i: usize) -> Option<f64> {
    let addr: SocketAddr = format!("{IP}:80").parse().unwrap();
    let t = Duration::from_secs(2);
    let line = match i % 3 {
        0 => "GET / HTTP/1.0\r\n\r\n".to_string(),
        1 => format!("POST /append?key=k{i} HTTP/1.0\r\n\r\n"),
        _ => "GET /ledger HTTP/1.0\r\n\r\n".to_string(),
    };
    let start = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, t).ok()?;
    s.set_read_timeout(Some(t)).ok()?;
    s.write_all(line.as_bytes()).ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    out.starts_with(b"HTTP/1.0 200")
        .then(|| start.elapsed().as_secs_f64() * 1000.0)
}

fn set_capture(d: &DaemonProc, on: bool) {
    let text = std::fs::read_to_string(&d.config).unwrap();
    let text = text.replace(
        if on {
            "enabled = false"
        } else {
            "enabled = true"
        },
        if on {
            "enabled = true"
        } else {
            "enabled = false"
        },
    );
    std::fs::write(&d.config, text).unwrap();
    let (code, out, err) = d.cli(&["reload"]);
    assert_eq!(code, 0, "reload: {out} {err}");
    let want = format!(
        "understudy_capture_running{{service=\"{NAME}\"}} {}",
        u8::from(on)
    );
    wait_for("capture switched", Duration::from_secs(30), || {
        d.metrics().lines().any(|l| l == want).then_some(())
    });
}

fn main() {
    require_lab();
    let total: usize = std::env::var("BENCH_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    let _cleanup = Cleanup {
        prefixes: vec![NAME.to_string()],
    };
    let d = DaemonProc::start_configured(
        "bench-replay",
        NAME,
        1,
        &CLASS.replace("CAPTURE", "true"),
        &[],
    );
    let hv = hypervisor();
    let image = d.dir.join("data.raw");
    let st = std::process::Command::new(repo().join("scripts/lab-data.sh"))
        .args(["file", image.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(st.success());
    start_guest(
        &hv,
        NAME,
        &format!("{IP}/24"),
        &["--data", image.to_str().unwrap()],
    );
    d.wait_paused_shadows(NAME, 1, Duration::from_secs(300));
    wait_for("ledger", Duration::from_secs(60), || request(2));

    // 1. Capture on and off, alternating blocks.
    let block = (total / 6).max(1);
    let (mut on, mut off) = (Vec::new(), Vec::new());
    let mut failed = 0;
    for b in 0..6 {
        let capture = b % 2 == 0;
        set_capture(&d, capture);
        for i in 0..block {
            match request(b * block + i) {
                Some(ms) if capture => on.push(ms),
                Some(ms) => off.push(ms),
                None => failed += 1,
            }
        }
    }
    set_capture(&d, true);
    // Fresh traffic for the replay, recorded.
    for i in 0..300 {
        request(100_000 + i);
    }
    std::thread::sleep(Duration::from_secs(2));
    let (on50, on99, onmax) = (
        percentile(&on, 0.5),
        percentile(&on, 0.99),
        percentile(&on, 1.0),
    );
    let (off50, off99, offmax) = (
        percentile(&off, 0.5),
        percentile(&off, 0.99),
        percentile(&off, 1.0),
    );
    println!("client latency (ms, {block} requests per block, 3 blocks each, {failed} failed):");
    println!(
        "  capture on : n={} p50 {on50:.2} p99 {on99:.2} max {onmax:.2}",
        on.len()
    );
    println!(
        "  capture off: n={} p50 {off50:.2} p99 {off99:.2} max {offmax:.2}",
        off.len()
    );

    // 2. An unchanged canary: throughput and fidelity.
    let change = d.dir.join("noop.toml");
    std::fs::write(&change, "[[command]]\nargv = [\"/bin/true\"]\n").unwrap();
    let (code, out, err) = d.cli(&[
        "canary",
        "start",
        NAME,
        "--apply",
        change.to_str().unwrap(),
        "--json",
    ]);
    let r: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out} {err}"));
    let requests = r["comparison"]["requests"].as_f64().unwrap_or(0.0);
    let differing = r["comparison"]["differing"]
        .as_array()
        .map_or(0, |a| a.len());
    let replay_ms = r["replay_ms"].as_f64().unwrap_or(f64::NAN);
    let fidelity = if requests > 0.0 {
        1.0 - differing as f64 / requests
    } else {
        f64::NAN
    };
    let throughput = 2.0 * requests / (replay_ms / 1000.0);
    println!(
        "canary with no change (exit {code}): {requests} requests replayed on two clones in {replay_ms:.0} ms: {throughput:.1} requests/s; fidelity {:.2}% ({differing} differ, {} noisy)",
        fidelity * 100.0,
        r["comparison"]["noisy"]
    );
    for x in r["comparison"]["differing"]
        .as_array()
        .into_iter()
        .flatten()
        .take(5)
    {
        println!("    {} {}", x["request"], x["what"]);
    }
    let _ = d.cli(&["canary", "abort", NAME]);

    // 3. Standby verification of the healthy shadow against the recorded answers.
    let (vcode, out, err) = d.cli(&["canary", "verify", NAME, "--json"]);
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out} {err}"));
    let (matched, vreq) = (
        v["verdict"]["matched"].as_f64().unwrap_or(0.0),
        v["verdict"]["requests"].as_f64().unwrap_or(0.0),
    );
    println!(
        "standby verification (exit {vcode}): {matched} of {vreq} answered as recorded ({:.2}%)",
        100.0 * matched / vreq.max(1.0)
    );
    // The shadow stands by throughout; a resume of it waits while its memory is written
    // (hold) and it is not promotable while it settles.
    println!(
        "  on a copy: shadow held {} ms (memory written), settled in {} ms, copy ready after {} ms, {} ms in all",
        v["hold_ms"], v["settle_ms"], v["copy_ms"], v["total_ms"]
    );

    let json = serde_json::json!({
        "requests_per_condition": block * 3,
        "failed_requests": failed,
        "capture_on_ms": {"n": on.len(), "p50": on50, "p99": on99, "max": onmax},
        "capture_off_ms": {"n": off.len(), "p50": off50, "p99": off99, "max": offmax},
        "canary_requests": requests,
        "canary_replay_ms": replay_ms,
        "replay_requests_per_s": throughput,
        "fidelity": fidelity,
        "verify_matched": matched,
        "verify_requests": vreq,
        "verify_hold_ms": v["hold_ms"],
        "verify_settle_ms": v["settle_ms"],
        "verify_copy_ms": v["copy_ms"],
        "verify_total_ms": v["total_ms"],
    });
    std::fs::create_dir_all(repo().join("build/bench")).unwrap();
    std::fs::write(
        repo().join("build/bench/replay.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
    println!("wrote build/bench/replay.json");
}
