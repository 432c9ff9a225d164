//! Stateful services on real guests: the ledger guest's data disk changes hands at promotion
//! (file, loop block device, NBD export), libvirt's lock manager guards it, and a failed
//! hand-over leaves the disk on at most one domain while the retry policy runs.
//!
//! The ledger (images/httpd.c) answers `POST /append?key=K` only after the record is fsynced on
//! the data disk, so every key a client saw acknowledged must be on the new primary's ledger
//! after any failover.

use std::io::Read;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use understudy::domain_xml::DomainXml;
use understudy::libvirt::Hypervisor;

use crate::common::*;

const SHADOW_WAIT: Duration = Duration::from_secs(240);

/// Runs scripts/lab-data.sh; its stdout.
fn lab_data(args: &[&str]) -> String {
    let out = Command::new(repo().join("scripts/lab-data.sh"))
        .args(args)
        .output()
        .expect("run scripts/lab-data.sh");
    assert!(
        out.status.success(),
        "lab-data.sh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn signal_qemu(name: &str, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(qemu_pid(name)), sig).expect("signal qemu");
}

/// How one failover is set off.
#[derive(Debug, Clone, Copy)]
enum Fault {
    Kill,
    Hang,
    Switchover,
}

/// Sets off `fault` on the active domain while a writer appends, waits until the shadow
/// serves the ledger, and checks that every acknowledged key is there and that the data disk
/// is on exactly the new primary. Returns the new primary.
fn failover_keeps_every_key(
    daemon: &DaemonProc,
    hv: &Hypervisor,
    service: &str,
    ip: &str,
    source: &str,
    fault: Fault,
    round: usize,
) -> String {
    let svc = daemon.service(service).expect("service in status");
    let old = svc["active"].as_str().unwrap().to_string();
    let shadow = daemon.wait_paused_shadows(service, 1, SHADOW_WAIT)[0].clone();
    assert_eq!(
        holders(hv, source),
        vec![old.clone()],
        "before round {round}"
    );

    let writer = Writer::start(ip, &format!("r{round}"));
    wait_for("acknowledged appends", Duration::from_secs(20), || {
        (writer.acked() >= 20).then_some(())
    });
    let at = Instant::now();
    match fault {
        Fault::Kill => signal_qemu(&old, nix::sys::signal::Signal::SIGKILL),
        Fault::Hang => signal_qemu(&old, nix::sys::signal::Signal::SIGSTOP),
        Fault::Switchover => {
            let (code, out, err) = daemon.cli(&["failover", service]);
            assert_eq!(code, 0, "switchover: {out} {err}");
        }
    }
    let before = writer.acked();
    // Served again: appends are acknowledged again (by the shadow, which now has the disk).
    wait_for(
        "appends acknowledged again",
        Duration::from_secs(60),
        || (writer.acked() >= before + 20).then_some(()),
    );
    let acked = writer.finish();
    eprintln!(
        "round {round} ({fault:?}): {} keys acknowledged, served again within {:?}",
        acked.len(),
        at.elapsed()
    );
    let svc = wait_for("status shows the failover", Duration::from_secs(30), || {
        let s = daemon.service(service)?;
        (s["active"] == shadow.as_str() && s["last_failover"]["ok"] == true).then_some(s)
    });
    let steps: Vec<String> = svc["last_failover"]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["name"].as_str().map(str::to_string))
        .collect();
    for want in ["fence", "resume", "attach", "promote_commands", "rewire"] {
        assert!(
            steps.iter().any(|s| s == want),
            "step {want} missing: {steps:?}"
        );
    }
    eprintln!(
        "round {round} ({fault:?}) daemon steps: {}",
        svc["last_failover"]["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| format!(
                "{} {:.0} ms",
                s["name"].as_str().unwrap_or("?"),
                s["ms"].as_f64().unwrap_or(0.0)
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let metrics = daemon.metrics();
    for step in ["attach", "promote_commands"] {
        assert!(
            metrics.contains(&format!(
                "understudy_failover_step_seconds_count{{step=\"{step}\"}}"
            )),
            "no {step} step in the metrics"
        );
    }
    let order = |s: &str| steps.iter().position(|x| x == s).unwrap();
    assert!(order("attach") < order("promote_commands"));
    assert!(order("promote_commands") < order("rewire"), "{steps:?}");

    let have = ledger(ip).expect("new primary serves the ledger");
    let missing: Vec<&String> = acked.iter().filter(|k| !have.contains(k)).collect();
    assert!(
        missing.is_empty(),
        "round {round} ({fault:?}): {} acknowledged keys lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    // The disk is on the new primary alone (the old QEMU is gone).
    wait_for("old primary stopped", Duration::from_secs(30), || {
        (!hv.state(&old).map(|s| s.is_active()).unwrap_or(false)).then_some(())
    });
    assert_eq!(
        holders(hv, source),
        vec![shadow.clone()],
        "after round {round}"
    );
    // Status says the disk is a data disk kept by failovers.
    let disks = svc["disks"].as_array().expect("disks in status");
    let data = disks
        .iter()
        .find(|d| d["role"] == "data")
        .expect("a data disk in status");
    assert_eq!(data["keeps_data"], true);
    shadow
}

pub(crate) fn data_image(daemon: &DaemonProc, name: &str) -> PathBuf {
    let path = daemon.dir.join(format!("{name}-data.raw"));
    let _ = std::fs::remove_file(&path);
    PathBuf::from(lab_data(&["file", path.to_str().unwrap()]))
}

#[test]
fn ledger_keeps_every_acknowledged_key_through_crash_hang_and_switchover() {
    require_lab();
    let name = "it-led1";
    let ip = "10.77.0.61";
    let _cleanup = Cleanup {
        prefixes: vec![name.to_string(), format!("{name}x")],
    };
    let daemon = DaemonProc::start_configured("ledger", name, 1, DATA_CLASS, &[]);
    let hv = hypervisor();
    let image = data_image(&daemon, name);
    let source = image.to_str().unwrap();
    start_guest(&hv, name, &format!("{ip}/24"), &["--data", source]);
    let shadow = daemon.wait_paused_shadows(name, 1, SHADOW_WAIT)[0].clone();
    // The shadow was defined and booted without the data disk.
    assert!(!hv.xml(&shadow, true).unwrap().contains(source));
    wait_for("ledger served", Duration::from_secs(60), || ledger(ip));
    assert!(append(ip, "first"));

    // The dry run reads the definition from libvirt itself (no daemon needed) and says the
    // data disk is handed over.
    let out = Command::new(env!("CARGO_BIN_EXE_understudy"))
        .arg("--config")
        .arg(&daemon.config)
        .args(["shadow", "plan", name])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("vdb (file disk ") && text.contains("role data") && text.contains("KEEPS"),
        "{text}"
    );

    // The lock manager guards the disk of the running primary: libvirt refuses it to the
    // shadow and refuses to start a second domain on it.
    let primary = DomainXml::parse(&hv.xml(name, true).unwrap()).unwrap();
    let disk = primary.disk_xml("vdb").expect("data disk XML");
    let err = hv
        .attach_device(&shadow, &disk)
        .expect_err("lock manager must refuse the disk of a running primary");
    let why = understudy::error::report(&err);
    assert!(why.contains("Lockspace resource"), "{why}");
    let second = format!("{name}x");
    let xml = guest_xml(&second, "10.77.0.62/24", &["--data", source]);
    hv.define(&xml).unwrap();
    let err = hv
        .start(&second, false)
        .expect_err("second domain on the disk");
    let why = understudy::error::report(&err);
    assert!(why.contains("lock"), "{why}");
    let _ = hv.undefine(&second);
    assert_eq!(holders(&hv, source), [name.to_string()]);

    let mut active = name.to_string();
    for (round, fault) in [Fault::Kill, Fault::Hang, Fault::Switchover]
        .into_iter()
        .enumerate()
    {
        active = failover_keeps_every_key(&daemon, &hv, name, ip, source, fault, round + 1);
    }
    let all = ledger(ip).unwrap();
    assert_eq!(all.first().map(String::as_str), Some("first"));
    assert!(
        !daemon.log_text().contains("resource busy"),
        "a normal failover tripped the lock manager"
    );
    eprintln!("ledger holds {} records on {active}", all.len());
}

#[test]
fn block_and_nbd_data_disks_change_hands() {
    require_lab();
    let (blk, nbd) = ("it-dd-blk", "it-dd-nbd");
    let (blk_ip, nbd_ip) = ("10.77.0.63", "10.77.0.64");
    let _cleanup = Cleanup {
        prefixes: vec![blk.to_string(), nbd.to_string()],
    };
    let daemon = DaemonProc::start_configured("blocknbd", "it-dd-*", 1, DATA_CLASS, &[]);
    let hv = hypervisor();
    let loop_dev = lab_data(&["loop", daemon.dir.join("blk-data.raw").to_str().unwrap()]);
    let _unloop = Unloop(loop_dev.clone());
    let port = "10811";
    lab_data(&[
        "nbd",
        daemon.dir.join("nbd-data.raw").to_str().unwrap(),
        port,
    ]);
    let _stop_nbd = StopNbd(port);
    // The block device as a LUN on virtio-scsi (the lab's default way), the NBD export as a
    // virtio-blk disk.
    start_guest(
        &hv,
        blk,
        &format!("{blk_ip}/24"),
        &["--data-block", &loop_dev, "--data-bus", "scsi"],
    );
    start_guest(
        &hv,
        nbd,
        &format!("{nbd_ip}/24"),
        &["--data-nbd", &format!("10.77.0.1:{port}/usdata")],
    );
    for (service, ip, source) in [
        (blk, blk_ip, loop_dev.as_str()),
        (nbd, nbd_ip, "nbd:usdata"),
    ] {
        let shadow = daemon
            .wait_paused_shadows(service, 1, SHADOW_WAIT)
            .remove(0);
        wait_for("ledger served", Duration::from_secs(60), || ledger(ip));
        if service == nbd {
            nbd_second_writer_is_refused(&hv, nbd, &shadow, port, &daemon.dir.join("nbd-data.raw"));
        }
        failover_keeps_every_key(&daemon, &hv, service, ip, source, Fault::Kill, 1);
    }
}

/// libvirt's lock manager leases no network disk, so an NBD data disk has two other guards:
/// qemu-nbd serves one client (`--shared=1`, scripts/lab-data.sh), so a second writer never
/// gets the export while the primary's QEMU holds it; and understudy's attach step refuses a
/// disk that a running domain's live definition has, naming it.
fn nbd_second_writer_is_refused(
    hv: &Hypervisor,
    primary: &str,
    shadow: &str,
    port: &str,
    image: &std::path::Path,
) {
    use understudy::failover::plan::DataDisk;
    use understudy::failover::promote::{LiveSteps, PromotionSteps};

    // A second NBD client writing the export: never served while the primary is connected.
    let head = |p: &std::path::Path| {
        let mut b = vec![0u8; 512];
        std::fs::File::open(p).unwrap().read_exact(&mut b).unwrap();
        b
    };
    let before = head(image);
    let out = Command::new("timeout")
        .args([
            "5",
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 512",
            &format!("nbd://10.77.0.1:{port}/usdata"),
        ])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a second NBD writer was served: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        head(image),
        before,
        "the second writer's bytes reached the disk"
    );

    // understudy's own check, on the real domains: the shadow may not get the disk.
    let primary_xml = DomainXml::parse(&hv.xml(primary, false).unwrap()).unwrap();
    let disk = DataDisk {
        target: "vdb".into(),
        source: "nbd:usdata".into(),
        xml: primary_xml.disk_xml("vdb").expect("the NBD data disk"),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let err = rt.block_on(async {
        let net = understudy::net::Netlink::new().unwrap();
        let coord =
            understudy::cluster::LocalCoordinator::new(understudy::cluster::HostId("lab".into()));
        let leases = understudy::libvirt::LeaseHandbacks::default();
        let steps = LiveSteps::new(hv, &net, &coord, &leases);
        let p = understudy::failover::promote::Promotion {
            service: primary.to_string(),
            class: "default".into(),
            old_primary: primary.to_string(),
            old_host: None,
            old_taps: Vec::new(),
            owner_generation: None,
            shadow: understudy::failover::Shadow {
                name: shadow.to_string(),
                state: understudy::failover::ShadowState::Standby(
                    understudy::failover::record::Tier::Paused,
                ),
                taps: Vec::new(),
                data_disks: None,
            },
            shadow_generation: 1,
            trigger: understudy::failover::Trigger::Manual,
            detected_at: Instant::now(),
            profile: None,
            handover: None,
            network: understudy::config::NetworkMode::Bridged,
            identity: None,
        };
        steps.attach(&p, &[disk]).await.unwrap_err()
    });
    match &err {
        understudy::failover::FailoverError::DiskHeld { holders, .. } => {
            assert_eq!(holders, &[primary.to_string()])
        }
        other => panic!("attach of a held NBD disk: {other:?}"),
    }
    assert!(
        understudy::error::report(&err).contains(primary),
        "{}",
        understudy::error::report(&err)
    );
    assert_eq!(holders(hv, "nbd:usdata"), [primary.to_string()]);
}

#[test]
fn failed_attach_and_promote_command_are_named_and_retried_with_the_disk_on_one_domain() {
    require_lab();
    let name = "it-led2";
    let ip = "10.77.0.65";
    let _cleanup = Cleanup {
        prefixes: vec![name.to_string()],
    };
    // The second promote command fails once: it removes its marker from the data disk.
    let class = format!(
        "{DATA_CLASS}promote_commands = [[\"/bin/us-data\", \"mount\"], [\"/bin/sh\", \"-c\", \
         \"if [ -e /data/fail-once ]; then rm -f /data/fail-once; sync; echo planted failure >&2; exit 3; fi\"]]\n"
    )
    .replace(
        "promote_commands = [[\"/bin/us-data\", \"mount\"]]\n",
        "",
    );
    let daemon = DaemonProc::start_configured(
        "handoverfail",
        name,
        2,
        &class,
        &[(understudy::failover::FAULT_FAIL_ONCE_ENV, "attach")],
    );
    let hv = hypervisor();
    let image = data_image(&daemon, name);
    let source = image.to_str().unwrap();
    start_guest(&hv, name, &format!("{ip}/24"), &["--data", source]);
    daemon.wait_paused_shadows(name, 2, SHADOW_WAIT);
    wait_for("ledger served", Duration::from_secs(60), || ledger(ip));
    for k in ["k1", "k2", "k3"] {
        assert!(append(ip, k));
    }
    // Plant the marker through the guest agent.
    let touch = r#"{"execute":"guest-exec","arguments":{"path":"/bin/sh","arg":["-c","touch /data/fail-once && sync"]}}"#;
    agent(&hv, name, touch).expect("guest-exec touch");
    std::thread::sleep(Duration::from_millis(500));

    signal_qemu(name, nix::sys::signal::Signal::SIGKILL);
    // Attempt 1 fails after its attach (fault injection), attempt 2 in its promote command,
    // attempt 3 (on a freshly provisioned shadow) succeeds.
    let svc = wait_for("a promotion succeeds", SHADOW_WAIT, || {
        let s = daemon.service(name)?;
        (s["last_failover"]["ok"] == true).then_some(s)
    });
    let log = daemon.log_text();
    assert!(
        log.contains("attach: failed by fault injection"),
        "attach failure not reported"
    );
    assert!(
        log.contains("promote_commands: [\"/bin/sh\"") && log.contains("exited with 3"),
        "promote command failure not named"
    );
    assert!(log.contains("planted failure"), "its stderr is reported");
    assert!(log.contains("hand-over failed: shadow destroyed"));
    let active = svc["active"].as_str().unwrap().to_string();
    assert_ne!(active, name);
    assert_eq!(holders(&hv, source), vec![active.clone()]);
    let have = ledger(ip).expect("ledger served after the retries");
    for k in ["k1", "k2", "k3"] {
        assert!(have.iter().any(|h| h == k), "{k} lost: {have:?}");
    }
    let failed = daemon
        .metrics()
        .lines()
        .filter(|l| l.starts_with("understudy_failovers_total") && l.contains("result=\"error\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap_or(0.0))
        .sum::<f64>();
    assert!(failed >= 2.0, "failed promotions counted: {failed}");
}

/// Detaches a loop device when dropped.
struct Unloop(String);

impl Drop for Unloop {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("scripts/lab-data.sh"))
            .args(["unloop", &self.0])
            .status();
    }
}

/// Stops a lab NBD export when dropped.
struct StopNbd(&'static str);

impl Drop for StopNbd {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("scripts/lab-data.sh"))
            .args(["stop-nbd", self.0])
            .status();
    }
}

#[test]
fn emulated_tpm_primary_is_protected_and_its_shadow_follows_its_state() {
    require_lab();
    let name = "it-tpm1";
    let ip = "10.77.0.66";
    let _cleanup = Cleanup {
        prefixes: vec![name.to_string()],
    };
    let daemon = DaemonProc::start("tpm", name, 1);
    let hv = hypervisor();
    let xml = guest_xml(name, &format!("{ip}/24"), &[]).replace(
        "<memballoon",
        "<tpm model='tpm-tis'><backend type='emulator' version='2.0'/></tpm>\n    <memballoon",
    );
    hv.define(&xml).unwrap();
    hv.start(name, false).unwrap();
    let root = PathBuf::from(understudy::failover::tpm::SWTPM_STATE_DIR);
    let state = |uuid: &str| {
        std::fs::read(
            understudy::failover::tpm::state_dir(&root, uuid).join("tpm2/tpm2-00.permall"),
        )
        .ok()
    };
    let primary_uuid = domain_uuid(&hv, name);
    // swtpm_setup made the primary's endorsement key certificate for "<name>:<uuid>"; a shadow
    // given a blank TPM of its own would have one for its own name and UUID instead. (The
    // files themselves differ soon: each swtpm records its own TPM's clock and start-ups.)
    let identity = format!("{name}:{primary_uuid}");
    let has_primary_identity = |uuid: &str| {
        state(uuid).is_some_and(|b| b.windows(identity.len()).any(|w| w == identity.as_bytes()))
    };
    let shadow = daemon.wait_paused_shadows(name, 1, SHADOW_WAIT)[0].clone();
    assert!(hv.xml(&shadow, true).unwrap().contains("emulator"));
    assert!(has_primary_identity(&primary_uuid), "primary's own state");
    let shadow_uuid = domain_uuid(&hv, &shadow);
    assert!(
        has_primary_identity(&shadow_uuid),
        "the shadow runs on a blank TPM, not on a copy of the primary's"
    );
    assert!(daemon
        .log_text()
        .contains("the shadow gets the primary's state"));

    // The primary's TPM state changes (swtpm replaces its file): a shadow holding an older
    // state is replaced by one made from the new state.
    let current = daemon.wait_paused_shadows(name, 1, SHADOW_WAIT)[0].clone();
    let permall =
        understudy::failover::tpm::state_dir(&root, &primary_uuid).join("tpm2/tpm2-00.permall");
    let bytes = std::fs::read(&permall).unwrap();
    let tmp = permall.with_extension("test-rewrite");
    std::fs::write(&tmp, &bytes).unwrap();
    std::fs::rename(&tmp, &permall).unwrap();
    let replacement = wait_for("stale shadow replaced", SHADOW_WAIT, || {
        daemon
            .paused_shadows(name)
            .filter(|p| p.len() == 1 && p[0] != current)
    });
    assert!(daemon.log_text().contains("emulated TPM state changed"));
    let new_uuid = domain_uuid(&hv, &replacement[0]);
    assert!(has_primary_identity(&new_uuid));
}
