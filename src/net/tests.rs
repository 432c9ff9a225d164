//! Tests against the real kernel: each test builds its own network namespace
//! (`us-nettest-<pid>-<n>`), runs [`Netlink`] on a thread moved into it, and reads the result
//! back with `ip -j` / `bridge -j`. The host's own namespace is never touched. They need
//! root, as `make test` runs them, and fail without it.

use std::collections::{BTreeSet, HashSet};
use std::fs::File;
use std::future::Future;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sched::{setns, CloneFlags};
use serde_json::Value;

use super::{FdbEntry, FdbEntryKind, LinkChange, NetError, Netlink};

static NEXT_NS: AtomicU32 = AtomicU32::new(0);

/// Runs commands inside a named namespace (cloneable into the test thread).
#[derive(Clone)]
struct NsCmd {
    name: String,
}

impl NsCmd {
    fn run(&self, program: &str, args: &[&str]) -> String {
        let mut cmd = Command::new("ip");
        if program == "ip" {
            cmd.args(["-n", &self.name]);
        } else {
            cmd.args(["netns", "exec", &self.name, program]);
        }
        let out = cmd.args(args).output().expect("run ip");
        assert!(
            out.status.success(),
            "{program} {args:?} in {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn ip(&self, args: &[&str]) -> String {
        self.run("ip", args)
    }

    /// Creates veth `name` with peer `{name}p` (dummy links need a module this host's kernel
    /// may lack; veth is what VM taps look like anyway).
    fn veth(&self, name: &str) {
        let peer = format!("{name}p");
        self.ip(&["link", "add", name, "type", "veth", "peer", "name", &peer]);
    }

    fn ip_json(&self, args: &[&str]) -> Value {
        let mut all = vec!["-j"];
        all.extend_from_slice(args);
        let text = self.ip(&all);
        serde_json::from_str(text.trim()).unwrap_or(Value::Array(Vec::new()))
    }

    fn link(&self, name: &str) -> Value {
        self.ip_json(&["link", "show", "dev", name])[0].clone()
    }

    /// The ports of `bridge`, sorted by name.
    fn ports(&self, bridge: &str) -> Vec<String> {
        let mut names: Vec<String> = self
            .ip_json(&["link", "show", "master", bridge])
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["ifname"].as_str().unwrap().to_string())
            .collect();
        names.sort();
        names
    }

    fn is_up(&self, name: &str) -> bool {
        self.link(name)["flags"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "UP")
    }
}

/// A network namespace deleted on drop.
struct TestNetns {
    cmd: NsCmd,
}

impl TestNetns {
    /// Creates the namespace; the tests need root (as `make test` runs them).
    fn create() -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "these tests create network namespaces: run them as root"
        );
        let name = format!(
            "us-nettest-{}-{}",
            std::process::id(),
            NEXT_NS.fetch_add(1, Ordering::Relaxed)
        );
        let status = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("run ip netns add");
        assert!(status.success(), "ip netns add {name}");
        TestNetns {
            cmd: NsCmd { name },
        }
    }

    /// Runs `f` with a [`Netlink`] opened on a thread that lives in this namespace.
    fn run<F, Fut>(&self, f: F)
    where
        F: FnOnce(Netlink, NsCmd) -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        let cmd = self.cmd.clone();
        let thread = std::thread::spawn(move || {
            let ns = File::open(format!("/run/netns/{}", cmd.name)).expect("open netns file");
            setns(&ns, CloneFlags::CLONE_NEWNET).expect("setns");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let nl = Netlink::new().expect("netlink in test namespace");
                f(nl, cmd).await;
            });
        });
        if let Err(panic) = thread.join() {
            std::panic::resume_unwind(panic);
        }
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.cmd.name])
            .status();
    }
}

fn index_of(cmd: &NsCmd, name: &str) -> u32 {
    u32::try_from(cmd.link(name)["ifindex"].as_u64().unwrap()).unwrap()
}

#[test]
fn links_enslave_release_up_down() {
    let ns = TestNetns::create();
    ns.cmd.ip(&["link", "add", "usbr0", "type", "bridge"]);
    ns.cmd
        .ip(&["link", "add", "va", "type", "veth", "peer", "name", "vb"]);
    ns.cmd.veth("d0");

    ns.run(|nl, cmd| async move {
        assert_eq!(
            nl.link_index("usbr0").await.unwrap(),
            index_of(&cmd, "usbr0")
        );
        match nl.link_index("nope").await {
            Err(NetError::NoSuchLink { name }) => assert_eq!(name, "nope"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            nl.link_index("bad/name").await,
            Err(NetError::InvalidLinkName { .. })
        ));

        // Enslave, and read it back both ways.
        nl.set_master("va", "usbr0").await.unwrap();
        assert_eq!(cmd.link("va")["master"], "usbr0");
        assert_eq!(nl.master_of("va").await.unwrap().as_deref(), Some("usbr0"));
        assert_eq!(nl.master_of("vb").await.unwrap(), None);

        assert_eq!(cmd.ports("usbr0"), ["va"]);
        assert!(!cmd.is_up("va"));

        nl.set_up("va").await.unwrap();
        assert!(cmd.is_up("va"));
        nl.set_down("va").await.unwrap();
        assert!(!cmd.is_up("va"));

        nl.enslave_and_up("d0", "usbr0").await.unwrap();
        assert_eq!(cmd.link("d0")["master"], "usbr0");
        assert!(cmd.is_up("d0"));
        assert_eq!(cmd.ports("usbr0"), ["d0", "va"]);

        nl.set_nomaster("va").await.unwrap();
        assert!(cmd.link("va").get("master").is_none());
        assert_eq!(nl.master_of("va").await.unwrap(), None);
        // Releasing a free link is a no-op, not an error.
        nl.set_nomaster("va").await.unwrap();
        assert_eq!(cmd.ports("usbr0"), ["d0"]);
        assert!(cmd.is_up("d0"));

        // Missing links are named in the error, whichever side is missing.
        for result in [
            nl.set_master("va", "nope").await,
            nl.set_master("nope", "usbr0").await,
            nl.enslave_and_up("nope", "usbr0").await,
            nl.set_up("nope").await,
            nl.set_down("nope").await,
            nl.set_nomaster("nope").await,
        ] {
            match result {
                Err(NetError::NoSuchLink { name }) => assert_eq!(name, "nope"),
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(
            nl.bridge_fdb("nope").await,
            Err(NetError::NoSuchLink { .. })
        ));
        assert!(matches!(
            nl.master_of("nope").await,
            Err(NetError::NoSuchLink { .. })
        ));

        // A veth cannot be a master: the kernel's refusal is chained as the source.
        match nl.set_master("va", "vb").await {
            Err(e @ NetError::LinkChange { .. }) => {
                let NetError::LinkChange { link, change, .. } = &e else {
                    unreachable!()
                };
                assert_eq!(link, "va");
                assert_eq!(
                    *change,
                    LinkChange::SetMaster {
                        bridge: "vb".into()
                    }
                );
                assert!(std::error::Error::source(&e).is_some());
                assert_eq!(e.to_string(), "cannot enslave to vb link va");
            }
            other => panic!("{other:?}"),
        }
        assert!(cmd.link("va").get("master").is_none());
    });
}

#[test]
fn bridge_fdb_lists_forwarding_entries_per_port() {
    let ns = TestNetns::create();
    let c = &ns.cmd;
    c.ip(&["link", "add", "usbr0", "type", "bridge"]);
    c.ip(&["link", "add", "usbr1", "type", "bridge"]);
    c.ip(&["link", "add", "va", "type", "veth", "peer", "name", "vb"]);
    c.veth("d0");
    c.veth("d1");
    for (port, bridge) in [("va", "usbr0"), ("d0", "usbr0"), ("d1", "usbr1")] {
        c.ip(&["link", "set", port, "master", bridge]);
    }
    for link in ["usbr0", "usbr1", "va", "vb", "d0", "d0p", "d1", "d1p"] {
        c.ip(&["link", "set", link, "up"]);
    }
    for (mac, port) in [
        ("52:54:00:aa:bb:01", "va"),
        ("52:54:00:aa:bb:02", "d0"),
        ("52:54:00:aa:bb:03", "d1"),
    ] {
        c.run(
            "bridge",
            &["fdb", "add", mac, "dev", port, "master", "static"],
        );
    }

    // An address behind va, to make vb send a frame into the bridge.
    c.ip(&["addr", "add", "10.88.0.1/24", "dev", "vb"]);

    ns.run(|nl, cmd| async move {
        let fdb = nl.bridge_fdb("usbr0").await.unwrap();
        let entry = |mac: &str, port: &str| FdbEntry {
            mac: mac.into(),
            port: port.into(),
            kind: FdbEntryKind::Static,
        };
        assert!(fdb.contains(&entry("52:54:00:aa:bb:01", "va")), "{fdb:?}");
        assert!(fdb.contains(&entry("52:54:00:aa:bb:02", "d0")), "{fdb:?}");
        // Another bridge's entries stay out.
        // (The whole MAC: a learned veth MAC is random and may end in :03 too.)
        assert!(!fdb.iter().any(|e| e.mac == "52:54:00:aa:bb:03"), "{fdb:?}");
        // Neither the ports' own multicast filters nor their local addresses are stations.
        let own: HashSet<String> = ["va", "d0", "usbr0"]
            .iter()
            .map(|l| cmd.link(l)["address"].as_str().unwrap().to_string())
            .collect();
        for e in &fdb {
            assert!(
                !e.mac.starts_with("33:33") && !e.mac.starts_with("01:00:5e"),
                "{e:?}"
            );
            assert!(!own.contains(&e.mac), "{e:?}");
            assert!(e.port == "va" || e.port == "d0", "{e:?}");
        }
        // No MAC on two ports.
        let macs: HashSet<&str> = fdb.iter().map(|e| e.mac.as_str()).collect();
        assert_eq!(macs.len(), fdb.len(), "{fdb:?}");

        // Same static entries as `bridge fdb show br usbr0` reports.
        let shown: Value = serde_json::from_str(
            cmd.run("bridge", &["-j", "fdb", "show", "br", "usbr0"])
                .trim(),
        )
        .unwrap();
        let expected: BTreeSet<(String, String)> = shown
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["state"] == "static")
            .map(|e| {
                (
                    e["mac"].as_str().unwrap().to_string(),
                    e["ifname"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let ours: BTreeSet<(String, String)> = fdb
            .iter()
            .filter(|e| e.kind == FdbEntryKind::Static)
            .map(|e| (e.mac.clone(), e.port.clone()))
            .collect();
        assert_eq!(ours, expected);

        // A frame sent from behind va (vb's ARP request) is learned on va.
        let vb_mac = cmd.link("vb")["address"].as_str().unwrap().to_string();
        let learned = FdbEntry {
            mac: vb_mac,
            port: "va".into(),
            kind: FdbEntryKind::Learned,
        };
        let socket = std::net::UdpSocket::bind("10.88.0.1:0").unwrap();
        socket.send_to(b"hello", "10.88.0.2:9").unwrap();
        let mut seen = false;
        for _ in 0..250 {
            if nl.bridge_fdb("usbr0").await.unwrap().contains(&learned) {
                seen = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(seen, "{learned:?} never learned");

        assert!(matches!(
            nl.bridge_fdb("nope").await,
            Err(NetError::NoSuchLink { .. })
        ));
    });
}

#[test]
fn host_routes_move_between_taps_with_their_addresses() {
    let ns = TestNetns::create();
    for link in ["d0", "d1", "d2"] {
        ns.cmd.veth(link);
    }
    for link in ["d0", "d0p", "d1", "d1p"] {
        ns.cmd.ip(&["link", "set", link, "up"]);
    }
    // A routed VM on d0: the host's address on the tap (the guest's gateway), the /32 route to
    // the guest, and routes that are not its host routes.
    ns.cmd.ip(&["addr", "add", "10.77.5.1/32", "dev", "d0"]);
    ns.cmd.ip(&["route", "add", "10.77.5.10/32", "dev", "d0"]);
    ns.cmd.ip(&["route", "add", "10.77.6.0/24", "dev", "d0"]);
    ns.cmd.ip(&["route", "add", "10.77.7.7/32", "dev", "d1"]);

    ns.run(|nl, cmd| async move {
        let dest = Ipv4Addr::new(10, 77, 5, 10);
        let host_routes = |cmd: &NsCmd| -> Vec<(String, String)> {
            cmd.ip_json(&["-4", "route", "show", "table", "main"])
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| r["dst"] == "10.77.5.10")
                .map(|r| {
                    (
                        r["dst"].as_str().unwrap().to_string(),
                        r["dev"].as_str().unwrap().to_string(),
                    )
                })
                .collect()
        };
        assert_eq!(nl.host_routes_via("d0").await.unwrap(), [dest]);
        assert_eq!(
            nl.host_routes_via("d1").await.unwrap(),
            [Ipv4Addr::new(10, 77, 7, 7)]
        );
        assert!(nl.host_routes_via("d0p").await.unwrap().is_empty());
        assert_eq!(
            nl.ipv4_addresses("d0").await.unwrap(),
            [(Ipv4Addr::new(10, 77, 5, 1), 32)]
        );
        assert!(nl.ipv4_addresses("d1").await.unwrap().is_empty());

        // The shadow's tap gets the address, then the route: it moves, it is not duplicated.
        nl.ensure_ipv4_address("d1", Ipv4Addr::new(10, 77, 5, 1), 32)
            .await
            .unwrap();
        nl.ensure_ipv4_address("d1", Ipv4Addr::new(10, 77, 5, 1), 32)
            .await
            .unwrap();
        assert_eq!(
            nl.ipv4_addresses("d1").await.unwrap(),
            [(Ipv4Addr::new(10, 77, 5, 1), 32)]
        );
        nl.replace_host_route(dest, "d1").await.unwrap();
        assert_eq!(
            host_routes(&cmd),
            [("10.77.5.10".to_string(), "d1".to_string())]
        );
        assert!(nl.host_routes_via("d0").await.unwrap().is_empty());
        nl.replace_host_route(dest, "d1").await.unwrap();
        assert_eq!(host_routes(&cmd).len(), 1);

        match nl.replace_host_route(dest, "nope").await {
            Err(NetError::NoSuchLink { name }) => assert_eq!(name, "nope"),
            other => panic!("{other:?}"),
        }
        // The kernel refuses a route through a down device; the route stays where it was.
        match nl.replace_host_route(dest, "d2").await {
            Err(e @ NetError::RouteReplace { .. }) => {
                assert!(std::error::Error::source(&e).is_some());
                assert_eq!(e.to_string(), "cannot route 10.77.5.10/32 via d2");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            host_routes(&cmd),
            [("10.77.5.10".to_string(), "d1".to_string())]
        );
    });
}

#[test]
fn namespace_is_isolated_from_the_host() {
    let ns = TestNetns::create();
    ns.cmd.veth("usonly0");
    ns.run(|nl, _| async move {
        // Visible inside the namespace...
        nl.link_index("usonly0").await.unwrap();
    });
    // ...and not from the host's namespace.
    let out = Command::new("ip")
        .args(["link", "show", "dev", "usonly0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}
