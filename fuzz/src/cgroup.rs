//! cgroup files: `/proc/<pid>/cgroup` (which decides the directories understudy reads) and the
//! v1/v2 counter files.
//!
//! The input is written as the cgroup file of a process on a fake hybrid host (v1 controllers
//! plus cgroup2 at `unified/`, counters from the fixtures), which is then located and read;
//! the counter parsers also get the input directly.
//!
//! Properties: every located directory lies inside the cgroup mount (no `..`, no absolute
//! escape), the layout reported matches the directories found; an error names the file it
//! comes from and a line of it.

use std::fs;
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;

use understudy::monitor::cgroup::{
    parse_blkio_service_bytes, parse_io_stat, parse_keyed, parse_single, read_counters,
    CgroupError, CgroupReader, CgroupVersion,
};

const V1_DOM: &str = "machine/qemu-3-web1.libvirt-qemu";
const V2_DOM: &str = "machine.slice/machine-qemu-5-db1.scope/libvirt";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../src/monitor/fixtures/cgroup")
        .join(name)
}

/// The fake host under /dev/shm (or the temp dir): built once, then shared by every process
/// (AFL forks many), each writing only its own `proc/<pid>/cgroup`.
fn host() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let root = base.join("understudy-fuzz-cgroup-host");
        if root.join("ready").exists() {
            return root;
        }
        // Built aside and renamed into place, so a concurrent process never sees half a host.
        let tmp = base.join(format!(
            "understudy-fuzz-cgroup-host.{}",
            std::process::id()
        ));
        build_host(&tmp);
        if fs::rename(&tmp, &root).is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        assert!(
            root.join("ready").exists(),
            "fake host {} not built",
            root.display()
        );
        root
    })
}

fn build_host(root: &Path) {
    let cg = root.join("sys/fs/cgroup");
    let put = |rel: String, fix: &str| {
        let dst = cg.join(rel);
        fs::create_dir_all(dst.parent().unwrap()).unwrap();
        fs::copy(fixture(fix), &dst).unwrap_or_else(|e| panic!("fixture {fix}: {e}"));
    };
    for c in [
        "cpu", "cpuacct", "cpuset", "memory", "blkio", "devices", "pids", "systemd",
    ] {
        fs::create_dir_all(cg.join(c)).unwrap();
    }
    put("unified/cgroup.controllers".into(), "empty.txt");
    put(
        format!("cpuacct/{V1_DOM}/cpuacct.usage"),
        "v1-cpuacct.usage",
    );
    put(
        format!("memory/{V1_DOM}/memory.usage_in_bytes"),
        "v1-memory.usage_in_bytes",
    );
    put(format!("memory/{V1_DOM}/memory.stat"), "v1-memory.stat");
    put(
        format!("blkio/{V1_DOM}/blkio.throttle.io_service_bytes"),
        "v1-blkio.throttle.io_service_bytes",
    );
    for (file, fix) in [
        ("cpu.stat", "v2-cpu.stat"),
        ("memory.current", "v2-memory.current"),
        ("memory.stat", "v2-memory.stat"),
        ("io.stat", "v2-io.stat"),
    ] {
        put(format!("unified/{V2_DOM}/{file}"), fix);
        put(format!("unified/{V1_DOM}/{file}"), fix);
    }
    fs::write(root.join("ready"), b"").unwrap();
}

/// Runs one input.
pub fn check(data: &[u8]) {
    let text = crate::text(data);
    let text = text.as_ref();
    check_locate(data);

    let input = Path::new("fuzz-input");
    let named = |r: Result<(), CgroupError>| {
        if let Err(e) = r {
            check_error(&e, text, input);
        }
    };
    named(parse_single(text, input).map(drop));
    for key in ["usage_usec", "total_rss", "anon", "file"] {
        named(parse_keyed(text, input, key).map(drop));
    }
    named(parse_blkio_service_bytes(text, input).map(drop));
    named(parse_io_stat(text, input).map(drop));
}

fn check_locate(data: &[u8]) {
    let root = host();
    let pid = std::process::id();
    let dir = root.join(format!("proc/{pid}"));
    fs::create_dir_all(&dir).unwrap();
    let file = dir.join("cgroup");
    fs::write(&file, data).unwrap();
    let reader = CgroupReader::new(root);
    let cg_root = root.join("sys/fs/cgroup");
    // What the reader sees: the file as a (lossy) string, as `read_bounded` reads it.
    let seen = String::from_utf8(data.to_vec()).ok();
    match reader.locate(pid) {
        Ok(loc) => {
            let dirs = [&loc.cpuacct, &loc.memory, &loc.blkio, &loc.unified];
            for d in dirs.into_iter().flatten() {
                assert!(
                    d.starts_with(&cg_root),
                    "{} is outside the cgroup mount",
                    d.display()
                );
                assert!(
                    d.components().all(|c| !matches!(c, Component::ParentDir)),
                    "{} climbs out",
                    d.display()
                );
            }
            let v1 = loc.cpuacct.is_some() || loc.memory.is_some() || loc.blkio.is_some();
            let expected = match (v1, loc.unified.is_some()) {
                (true, true) => CgroupVersion::Hybrid,
                (true, false) => CgroupVersion::V1,
                (false, true) => CgroupVersion::V2,
                (false, false) => panic!("located nothing but reported {:?}", loc.version),
            };
            assert_eq!(loc.version, expected);
            match read_counters(&loc) {
                Ok(c) => {
                    for m in &c.missing {
                        assert!(m.file.starts_with(&cg_root), "{}", m.file.display());
                    }
                }
                Err(e) => check_path_error(&e, &cg_root),
            }
        }
        Err(e) => match seen {
            Some(text) => match &e {
                // Not UTF-8 is reported as a read error of the file.
                CgroupError::NoCgroup { .. } => {}
                _ => check_error(&e, &text, &file),
            },
            None => assert!(matches!(e, CgroupError::Read { .. }), "{e}"),
        },
    }
    fs::remove_dir_all(&dir).unwrap();
}

/// An error about `text`, read from `path`, names it and a line of it.
fn check_error(e: &CgroupError, text: &str, path: &Path) {
    let msg = e.to_string();
    match e {
        CgroupError::Malformed { path: p, line, .. }
        | CgroupError::NotANumber { path: p, line, .. } => {
            assert_eq!(p, path, "{msg}");
            assert!((1..=crate::line_bound(text)).contains(line), "{msg}");
        }
        CgroupError::Overflow { path: p, .. } => assert_eq!(p, path, "{msg}"),
        CgroupError::UnsafePath {
            source_file,
            path: cg,
            ..
        } => {
            assert_eq!(source_file, path, "{msg}");
            assert!(text.contains(cg.as_str()), "{msg}");
        }
        _ => panic!(
            "unexpected error from a parser of {}: {msg}",
            path.display()
        ),
    }
    if let CgroupError::NotANumber { value, .. } = e {
        assert!(value.chars().count() <= 64, "{msg}");
    }
}

/// An error reading counters names a file under the cgroup mount.
fn check_path_error(e: &CgroupError, cg_root: &Path) {
    let path = match e {
        CgroupError::Read { path, .. }
        | CgroupError::TooLarge { path, .. }
        | CgroupError::Malformed { path, .. }
        | CgroupError::NotANumber { path, .. }
        | CgroupError::Overflow { path, .. } => path,
        _ => panic!("unexpected error reading counters: {e}"),
    };
    assert!(path.starts_with(cg_root), "{e}");
}
