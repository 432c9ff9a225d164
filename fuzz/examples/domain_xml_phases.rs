//! Where the `domain_xml` check's CPU goes, phase by phase: its parses, serializations, plan and
//! clone in the order [`understudy_fuzz::domain_xml::check`] makes them, without its assertions,
//! timed over the given inputs (`ROUNDS` times, default 5): wall time, so only on a quiet
//! machine. `FUZZ_EXAMPLES=1 FUZZ_SECONDS=1 scripts/fuzz.sh domain_xml` builds it as AFL runs
//! the target (instrumented, the same flags), into `fuzz/target/release/examples/`.
//!
//! usage: domain_xml_phases <file or directory>...

use std::path::PathBuf;
use std::time::{Duration, Instant};

use understudy::domain_xml::{
    shadow_spec, standby_boot_spec, DomainXml, InterfaceKind, UnderstudyMeta,
};
use understudy::failover::shadow::shadow_plan;
use understudy_fuzz::domain_xml::{request, UUID};

const PHASES: [&str; 7] = [
    "parse the input",
    "metadata reader (inputs that are no domain)",
    "round trip: serialize and parse (refused clones)",
    "views and interface XML",
    "plan and clone",
    "shadow: serialize and parse",
    "boot variant: make, serialize, parse if it differs",
];

fn main() {
    let mut inputs = Vec::new();
    for a in std::env::args().skip(1) {
        let p = PathBuf::from(a);
        let files: Vec<PathBuf> = if p.is_dir() {
            std::fs::read_dir(&p)
                .expect("readable directory")
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect()
        } else {
            vec![p]
        };
        for f in files {
            inputs.push(std::fs::read(&f).expect("readable input"));
        }
    }
    assert!(
        !inputs.is_empty(),
        "usage: domain_xml_phases <file or directory>..."
    );
    let rounds: u32 = std::env::var("ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    let mut spent = [Duration::ZERO; PHASES.len()];
    let started = Instant::now();
    for _ in 0..rounds {
        for data in &inputs {
            run(data, &mut spent);
        }
    }
    let total = started.elapsed().as_secs_f64();
    let per_input = |d: f64| d * 1e6 / f64::from(rounds) / inputs.len() as f64;
    println!(
        "{} inputs, {rounds} rounds: {:.1} us per input",
        inputs.len(),
        per_input(total)
    );
    for (name, d) in PHASES.iter().zip(spent) {
        let d = d.as_secs_f64();
        println!(
            "{name:45} {:8.1} us {:5.1}%",
            per_input(d),
            100.0 * d / total
        );
    }
}

/// One input, phase by phase; `spent[i]` accumulates phase `i`.
fn run(data: &[u8], spent: &mut [Duration; PHASES.len()]) {
    let mut clock = Instant::now();
    let mut lap = |phase: usize| {
        spent[phase] += clock.elapsed();
        clock = Instant::now();
    };
    let xml = String::from_utf8_lossy(data);
    let parsed = DomainXml::parse(&xml);
    lap(0);
    let Ok(dom) = parsed else {
        let _ = UnderstudyMeta::from_libvirt_xml(&xml);
        lap(1);
        return;
    };
    let _ = (dom.disks(), dom.live_interface_taps());
    for iface in dom.interfaces() {
        if let Some(mac) = &iface.mac {
            let _ = dom.interface_xml_with_link(mac, true);
        }
    }
    lap(3);
    let primary = dom.name().unwrap_or_else(|| "primary".to_string());
    let (plan, _) = shadow_plan(&dom, &request(&primary), UUID).expect("plan");
    let shadow = shadow_spec(&dom, &plan);
    lap(4);
    let Ok(shadow) = shadow else {
        // Only a refused input gets a round trip of its own.
        let again = DomainXml::parse(&dom.to_xml()).expect("round trip parses");
        let _ = (again.interfaces(), again.disks());
        lap(2);
        return;
    };
    let text = shadow.to_xml();
    let reparsed = DomainXml::parse(&text).expect("shadow parses");
    let shadow_nics = reparsed.interfaces();
    lap(5);
    let boot = standby_boot_spec(&shadow).to_xml();
    if shadow_nics
        .iter()
        .any(|n| matches!(n.kind, InterfaceKind::Bridge | InterfaceKind::Network))
    {
        let _ = DomainXml::parse(&boot).expect("boot parses").interfaces();
    }
    lap(6);
}
