//! What this host can still hold: memory and CPUs, read with `sysinfo`. Shadows are placed
//! only where they fit (a paused shadow holds its memory), and status shows it.

use serde::{Deserialize, Serialize};

/// Memory and CPUs of this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCapacity {
    /// Physical memory, KiB.
    pub mem_total_kib: u64,
    /// Memory available to new processes without swapping (the kernel's MemAvailable), KiB.
    pub mem_available_kib: u64,
    /// Logical CPUs.
    pub cpus: u32,
}

/// Memory kept free for the host itself when placing a shadow, KiB (512 MiB).
pub const HOST_RESERVE_KIB: u64 = 512 * 1024;

impl HostCapacity {
    /// Reads this host's capacity now; `None` where the platform does not tell.
    pub fn read() -> Option<Self> {
        let mut sys = sysinfo::System::new().ok()?;
        sys.refresh_memory();
        sys.refresh_cpu_list(sysinfo::CpuRefreshKind::nothing());
        Some(HostCapacity {
            mem_total_kib: sys.total_memory() / 1024,
            mem_available_kib: sys.available_memory() / 1024,
            cpus: u32::try_from(sys.cpus().len()).unwrap_or(u32::MAX),
        })
    }

    /// The same host with `kib` of its available memory kept out of placement
    /// (`[cluster] reserved_memory_mib`).
    pub fn reserving(self, kib: u64) -> Self {
        HostCapacity {
            mem_available_kib: self.mem_available_kib.saturating_sub(kib),
            ..self
        }
    }

    /// Whether a domain of `mem_kib` fits and leaves [`HOST_RESERVE_KIB`] free.
    pub fn fits(&self, mem_kib: u64) -> bool {
        self.mem_available_kib >= mem_kib.saturating_add(HOST_RESERVE_KIB)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_host_has_memory_and_cpus() {
        let c = HostCapacity::read().expect("Linux tells its capacity");
        assert!(
            c.mem_total_kib > 0 && c.mem_available_kib <= c.mem_total_kib,
            "{c:?}"
        );
        assert!(c.cpus >= 1);
    }

    #[test]
    fn a_domain_fits_only_with_the_reserve_left() {
        let c = HostCapacity {
            mem_total_kib: 4 << 20,
            mem_available_kib: 1 << 20,
            cpus: 2,
        };
        assert!(c.fits(512 * 1024));
        assert!(!c.fits(512 * 1024 + 1));
        // Memory kept out of placement counts as used.
        assert!(!c.reserving(1).fits(512 * 1024));
        assert_eq!(c.reserving(u64::MAX).mem_available_kib, 0);
        assert_eq!(c.reserving(0), c);
    }
}
