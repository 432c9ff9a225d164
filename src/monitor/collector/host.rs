//! The host side of a tick: the QEMU process's cgroup counters (its pid and cgroup directories
//! cached between ticks, looked up again when QEMU restarts) and libvirt's bulk statistics.
//! Neither depends on the guest.

use std::path::PathBuf;

use super::CollectorError;
use crate::libvirt::{qemu_pid, DomainStats, Hypervisor, QEMU_RUN_DIR};
use crate::monitor::cgroup::{read_counters, CgroupCounters, CgroupLocation, CgroupReader};

/// Host-side readings of one tick.
#[derive(Debug, Default)]
pub struct HostReading {
    /// The QEMU process's cgroup counters.
    pub cgroup: Option<CgroupCounters>,
    /// libvirt's bulk statistics.
    pub stats: Option<DomainStats>,
    /// Why either is missing.
    pub errors: Vec<CollectorError>,
}

/// Caches the QEMU pid and its cgroup directories between ticks.
#[derive(Debug)]
pub(super) struct HostSource {
    reader: CgroupReader,
    run_dir: PathBuf,
    pid: Option<i32>,
    location: Option<CgroupLocation>,
}

impl HostSource {
    /// The host's cgroups and QEMU's pid files; nothing cached yet.
    pub(super) fn new() -> Self {
        HostSource {
            reader: CgroupReader::host(),
            run_dir: PathBuf::from(QEMU_RUN_DIR),
            pid: None,
            location: None,
        }
    }

    pub(super) fn read(&mut self, hv: &Hypervisor, domain: &str) -> HostReading {
        let mut errors = Vec::new();
        let cgroup = self.cgroup(domain, &mut errors);
        let stats = match hv.stats(domain) {
            Ok(s) => Some(s),
            Err(source) => {
                errors.push(CollectorError::Stats {
                    domain: domain.to_string(),
                    source,
                });
                None
            }
        };
        HostReading {
            cgroup,
            stats,
            errors,
        }
    }

    fn cgroup(&mut self, domain: &str, errors: &mut Vec<CollectorError>) -> Option<CgroupCounters> {
        let usable = |c: &CgroupCounters| c.cpu_usage_ns.is_some() || c.mem_bytes.is_some();
        if let Some(loc) = &self.location {
            match read_counters(loc) {
                Ok(c) if usable(&c) => return Some(c),
                // QEMU restarted or gone: look the process up again.
                _ => {
                    self.location = None;
                    self.pid = None;
                }
            }
        }
        let pid = match self.pid {
            Some(p) => p,
            None => match qemu_pid(&self.run_dir, domain) {
                Ok(p) => p,
                Err(source) => {
                    errors.push(CollectorError::Pid {
                        domain: domain.to_string(),
                        source,
                    });
                    return None;
                }
            },
        };
        // `qemu_pid` only returns pids above 1.
        let found = self
            .reader
            .locate(pid.unsigned_abs())
            .and_then(|loc| read_counters(&loc).map(|c| (loc, c)));
        match found {
            Ok((loc, c)) if usable(&c) => {
                self.pid = Some(pid);
                self.location = Some(loc);
                Some(c)
            }
            Ok(_) => {
                errors.push(CollectorError::CgroupEmpty {
                    domain: domain.to_string(),
                    pid,
                });
                None
            }
            Err(source) => {
                errors.push(CollectorError::Cgroup {
                    domain: domain.to_string(),
                    pid,
                    source,
                });
                None
            }
        }
    }
}
