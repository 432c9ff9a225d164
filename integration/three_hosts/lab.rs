//! The three-host lab itself: three independent libvirt hosts reachable over the management
//! network, one etcd cluster, a switch that learns where a MAC went, a lockspace shared by the
//! hosts, cuts of a host's networks, and the fence agent.

use std::process::Command;
use std::time::Duration;

use understudy::libvirt::RunState;

use super::*;
use crate::common::{guest_xml, http_get, wait_for, wait_for_every};

/// Each host is its own libvirt host (its libvirtd answers over qemu+tcp from another host's
/// namespace with its own hostname, and has a private /run/libvirt), the etcd cluster has
/// three healthy members that agree, and a host can be cut off the switch and the management
/// network and reconnected.
#[test]
fn hosts_answer_over_tcp_etcd_has_three_members_and_cuts_isolate() {
    let cluster = Cluster::require();
    let hosts = cluster.hosts();

    for from in &hosts {
        for to in hosts.iter().filter(|h| *h != from) {
            let out = host_exec(from, &["virsh", "-c", cluster.libvirt_uri(to), "hostname"]);
            assert!(
                out.status.success(),
                "{to}'s libvirtd from {from}: {}",
                text(&out.stderr)
            );
            assert_eq!(
                text(&out.stdout).trim(),
                *to,
                "{} from {from} is not {to}'s libvirtd",
                cluster.libvirt_uri(to)
            );
        }
        let out = host_exec(from, &["findmnt", "-rn", "-o", "FSTYPE", "/run/libvirt"]);
        assert_eq!(
            text(&out.stdout).trim(),
            "tmpfs",
            "{from} has no private /run/libvirt"
        );
    }

    assert_eq!(cluster.etcd_healthy(), 3, "etcd members healthy");
    let out = run(Command::new("etcdctl").args([
        &format!("--endpoints={}", cluster.etcd_endpoints()),
        "member",
        "list",
    ]));
    let members = text(&out.stdout);
    assert_eq!(
        members.lines().filter(|l| l.contains(", started,")).count(),
        3,
        "etcd members: {members}"
    );
    // A key written through h1's member is read through h3's.
    let put = run(Command::new("etcdctl").args([
        &format!("--endpoints={}", cluster.host("h1", "ETCD_ENDPOINT")),
        "put",
        "/understudy-lab-test/key",
        "from-h1",
    ]));
    assert!(put.status.success(), "etcdctl put: {}", text(&put.stderr));
    let get = run(Command::new("etcdctl").args([
        &format!("--endpoints={}", cluster.host("h3", "ETCD_ENDPOINT")),
        "get",
        "--print-value-only",
        "/understudy-lab-test/key",
    ]));
    assert_eq!(text(&get.stdout).trim(), "from-h1");
    run(Command::new("etcdctl").args([
        &format!("--endpoints={}", cluster.etcd_endpoints()),
        "del",
        "/understudy-lab-test/key",
    ]));

    // Cuts: h2 off the switch (its service address stops answering, the management network
    // does not care), then off the management network (etcd and libvirt stop answering).
    let service = format!("{}:9", cluster.host("h2", "SERVICE_ADDR"));
    let etcd = format!("{}:2379", cluster.host("h2", "MGMT_ADDR"));
    let libvirt = format!("{}:16509", cluster.host("h2", "MGMT_ADDR"));
    let second = Duration::from_secs(1);
    assert!(reachable(&service, second), "{service} before any cut");
    assert!(reachable(&etcd, second), "{etcd} before any cut");

    lab_cut("h2", "switch", "down");
    let cut = std::panic::catch_unwind(|| {
        assert!(!reachable(&service, second), "{service} answers while cut");
        assert!(reachable(&etcd, second), "{etcd} lost with the switch cut");
    });
    lab_cut("h2", "switch", "up");
    cut.unwrap();
    wait_for("h2 back on the switch", Duration::from_secs(10), || {
        reachable(&service, second).then_some(())
    });

    lab_cut("h2", "mgmt", "down");
    let cut = std::panic::catch_unwind(|| {
        assert!(!reachable(&etcd, second), "{etcd} answers while cut");
        assert!(!reachable(&libvirt, second), "{libvirt} answers while cut");
        assert!(reachable(&service, second), "{service} lost with mgmt cut");
        assert_eq!(cluster.etcd_healthy(), 2, "etcd members healthy, h2 cut");
    });
    lab_cut("h2", "mgmt", "up");
    cut.unwrap();
    wait_for("etcd healthy again", Duration::from_secs(30), || {
        (cluster.etcd_healthy() == 3).then_some(())
    });
}

/// A guest on h2 serves the client through the switch, which learns its MAC behind h2's
/// uplink. While it runs, its data disk cannot be attached to a domain on h3 (the shared
/// lockspace refuses the lease); once it is destroyed, it can, and after QEMU's announce-self
/// the switch forwards its MAC to h3's uplink: a shadow's takeover on another host. The guest
/// on h3 runs only from its resume to the end of the test, before it has booted.
#[test]
fn guest_moves_from_h2_to_h3_switch_relearns_and_lockspace_guards_the_disk() {
    let cluster = Cluster::require();
    let (name, moved) = ("it3-web", "it3-web-h3");
    let _cleanup = ClusterCleanup::new(&cluster, &[name, moved]);
    let data = data_disk(&cluster, "it3-web-data.raw");
    let mac = guest_mac(name);

    let h2 = cluster.hypervisor("h2");
    h2.define(&guest_xml(
        name,
        "10.77.0.70/24",
        &["--data", &data, "--data-bus", "scsi"],
    ))
    .expect("define on h2");
    h2.start(name, false).expect("start on h2");
    let page = wait_for("the guest on h2 serving", Duration::from_secs(180), || {
        http_get("10.77.0.70", Duration::from_secs(1))
    });
    assert!(page.contains(&format!("host={name}")), "{page}");
    assert_eq!(
        cluster.switch_port_of(&mac).as_deref(),
        Some(cluster.host("h2", "SWITCH_PORT")),
        "switch port of {mac}"
    );

    // Its understudy on h3: paused (no CPU), the same MAC, a SCSI controller for the disk.
    let h3 = cluster.hypervisor("h3");
    h3.define(&with_scsi_controller(&guest_xml(
        moved,
        "10.77.0.70/24",
        &["--mac", &mac],
    )))
    .expect("define on h3");
    h3.start(moved, true).expect("start paused on h3");
    assert_lockspace_refuses(h3.attach_device(moved, &data_disk_xml(&data)));

    // The guest moves as a promotion moves it: destroyed on h2, resumed on h3, given the disk
    // (libvirt refuses to resume a domain given a disk while paused), its MAC announced (QEMU
    // sends nothing for a paused domain: it would queue the announcement). The resumed guest
    // has only begun to boot: it sends nothing of its own for seconds.
    h2.destroy(name).expect("destroy on h2");
    h3.resume(moved).expect("resume on h3");
    h3.attach_device(moved, &data_disk_xml(&data))
        .expect("attach the disk on h3 once h2's domain released it");
    assert_ne!(
        cluster.switch_port_of(&mac).as_deref(),
        Some(cluster.host("h3", "SWITCH_PORT")),
        "the switch knew {mac} on h3 before any announcement"
    );
    h3.qmp(
        moved,
        r#"{"execute":"announce-self","arguments":{"initial":50,"max":550,"rounds":5,"step":100}}"#,
    )
    .expect("announce-self");
    wait_for_every(
        "the switch to learn the MAC on h3's uplink",
        Duration::from_secs(2),
        Duration::from_millis(20),
        || {
            (cluster.switch_port_of(&mac).as_deref() == Some(cluster.host("h3", "SWITCH_PORT")))
                .then_some(())
        },
    );
}

/// fence_lab: status (arguments and stdin), off kills every process of the host at once (QEMU
/// included, so its disk lease goes and another host can take the disk; libvirtd and etcd stop
/// answering), on brings libvirtd and the etcd member back with the host's persistent state.
/// Both domains stay paused: a disk attached to a paused domain holds its lease all the same.
#[test]
fn fence_lab_powers_a_host_off_and_on() {
    let cluster = Cluster::require();
    let (name, taker) = ("it3-fenced", "it3-fenced-h2");
    let _cleanup = ClusterCleanup::new(&cluster, &[name, taker]);
    let data = data_disk(&cluster, "it3-fenced-data.raw");

    assert_eq!(fence_lab(&["-o", "monitor"], None).0, 0, "monitor");
    let (code, list) = fence_lab(&["-o", "list"], None);
    assert_eq!((code, list.as_str()), (0, "h1,h1\nh2,h2\nh3,h3\n"));
    assert_eq!(
        fence_lab(&["-o", "status", "-n", "h3"], None),
        (0, "Status: ON\n".to_string())
    );
    assert_eq!(
        fence_lab(&[], Some("# fence_lab options\naction=status\nport=h3\n")),
        (0, "Status: ON\n".to_string())
    );
    assert_eq!(
        fence_lab(&["-o", "status", "-n", "h7"], None).0,
        1,
        "status of an unknown host"
    );

    // A domain on h3 holding the disk's lease, and one on h2 that wants it.
    let h3 = cluster.hypervisor("h3");
    h3.define(&with_scsi_controller(&guest_xml(
        name,
        "10.77.0.72/24",
        &[],
    )))
    .expect("define on h3");
    h3.start(name, true).expect("start on h3");
    h3.attach_device(name, &data_disk_xml(&data))
        .expect("attach the disk on h3");
    drop(h3);
    let h2 = cluster.hypervisor("h2");
    h2.define(&with_scsi_controller(&guest_xml(
        taker,
        "10.77.0.73/24",
        &[],
    )))
    .expect("define on h2");
    h2.start(taker, true).expect("start on h2");
    assert_lockspace_refuses(h2.attach_device(taker, &data_disk_xml(&data)));
    let ns = cluster.host("h3", "NETNS");
    let qemu_running = |pids: &[u32]| {
        pids.iter().any(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .is_ok_and(|c| c.starts_with("qemu-system"))
        })
    };
    assert!(qemu_running(&netns_pids(ns)), "no QEMU in {ns}");

    assert_eq!(
        fence_lab(&["-o", "off", "-n", "h3"], None),
        (0, "Success: Powered OFF\n".to_string())
    );
    assert_eq!(netns_pids(ns), Vec::<u32>::new(), "processes left in {ns}");
    assert_eq!(
        fence_lab(&["--action=status", "--plug=h3"], None),
        (2, "Status: OFF\n".to_string())
    );
    assert_eq!(
        fence_lab(&["-o", "off", "-n", "h3"], None).0,
        0,
        "off when off"
    );
    let libvirt = format!("{}:16509", cluster.host("h3", "MGMT_ADDR"));
    assert!(
        !reachable(&libvirt, Duration::from_secs(1)),
        "h3's libvirtd answers while off"
    );
    assert_eq!(cluster.etcd_healthy(), 2, "etcd members healthy, h3 off");
    // The dead QEMU's disk lease went with the host: h2 may take the disk.
    h2.attach_device(taker, &data_disk_xml(&data))
        .expect("h2 takes the disk of the powered-off host's domain");

    assert_eq!(
        fence_lab(&["-o", "on", "-n", "h3"], None),
        (0, "Success: Powered ON\n".to_string())
    );
    assert_eq!(fence_lab(&["-o", "status", "-n", "h3"], None).0, 0);
    let h3 = cluster.hypervisor("h3");
    assert_eq!(
        h3.state(name).expect("the domain's definition survived"),
        RunState::Shutoff,
        "a domain came back running after a power cut"
    );
    wait_for("etcd healthy again", Duration::from_secs(30), || {
        (cluster.etcd_healthy() == 3).then_some(())
    });
}

/// The data disk as a LUN on the domain's virtio-scsi controller, as lab-guest.sh --data-bus
/// scsi gives it.
fn data_disk_xml(path: &str) -> String {
    format!(
        "<disk type='file' device='disk'><driver name='qemu' type='raw'/>\
         <source file='{path}'/><target dev='sdb' bus='scsi'/><serial>usdata</serial></disk>"
    )
}

fn with_scsi_controller(xml: &str) -> String {
    xml.replace(
        "</devices>",
        "  <controller type='scsi' index='0' model='virtio-scsi'/>\n  </devices>",
    )
}

/// libvirt refused a disk because the shared lockspace holds its lease for another domain
/// (virtlockd, possibly another host's), not for any other reason.
fn assert_lockspace_refuses(result: Result<(), understudy::libvirt::LibvirtError>) {
    let err = result.expect_err("a disk that another host's domain holds was attached");
    let msg = understudy::error::report(&err);
    assert!(
        msg.contains("resource busy") && msg.contains("Lockspace resource"),
        "refused, but not by the lockspace: {msg}"
    );
}
