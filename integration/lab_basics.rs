//! The ground everything stands on: a lab guest boots, libvirt's events reach us, the guest
//! agent answers, and the guest serves its page inside the lab namespace.

use std::time::Duration;

use understudy::libvirt::{DomainEvent, LifecycleEvent};

use crate::common::*;

#[test]
fn guest_boots_with_events_agent_and_http() {
    require_lab();
    let name = "it-basic";
    let _cleanup = Cleanup {
        prefixes: vec![name.to_string()],
    };
    let hv = hypervisor();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    hv.subscribe(tx).expect("subscribe to events");
    start_guest(&hv, name, "10.77.0.20/24", &[]);

    // Lifecycle: we must see this domain start.
    wait_for("Started event", Duration::from_secs(30), || loop {
        match rx.try_recv() {
            Ok(DomainEvent::Lifecycle {
                domain,
                event: LifecycleEvent::Started,
            }) if domain == name => return Some(()),
            Ok(_) => continue,
            Err(_) => return None,
        }
    });

    wait_agent(&hv, name);
    let info =
        agent(&hv, name, r#"{"execute":"guest-get-osinfo"}"#).expect("guest-get-osinfo answers");
    assert!(
        info["return"]["kernel-release"]
            .as_str()
            .is_some_and(|k| !k.is_empty()),
        "osinfo without kernel release: {info}"
    );

    let page = wait_for("HTTP page", Duration::from_secs(60), || {
        http_get("10.77.0.20", Duration::from_secs(1))
    });
    assert!(
        page.contains(&format!("host={name}")),
        "page does not name the guest: {page}"
    );
    assert_eq!(
        page_uuid(&page),
        domain_uuid(&hv, name),
        "page uuid is not the domain's"
    );

    // The agent-lifecycle event arrives too (connected) once qemu-ga opened its channel.
    let mut saw_agent = false;
    while let Ok(ev) = rx.try_recv() {
        if matches!(ev, DomainEvent::Agent { ref domain, .. } if domain == name) {
            saw_agent = true;
        }
    }
    assert!(saw_agent, "no agent-lifecycle event for {name}");

    // Bad input: an unknown domain name is a clear error.
    let e = hv.state("no-such-domain-xyz").unwrap_err();
    assert!(e.to_string().contains("no-such-domain-xyz"), "{e}");
}
