//! Turning a profile into the sizing of a shadow at a given time.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::learner::{Dependency, Profile};
use super::model::Envelope;

/// Host-side bounds on a shadow's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceLimits {
    /// Most vCPUs a shadow may get (a hard cap: it wins over `vcpu_min`).
    pub vcpu_max: u32,
    /// Most memory a shadow may get, KiB (a hard cap: it wins over `mem_min_kib`).
    pub mem_max_kib: u64,
    /// Fewest vCPUs (at least 1 is always planned).
    pub vcpu_min: u32,
    /// Least memory, KiB.
    pub mem_min_kib: u64,
}

impl Default for ResourceLimits {
    fn default() -> Self {
        ResourceLimits {
            vcpu_max: 64,
            mem_max_kib: 256 * 1024 * 1024,
            vcpu_min: 1,
            mem_min_kib: 256 * 1024,
        }
    }
}

/// What a shadow should look like at a given time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResourcePlan {
    /// vCPUs: the CPU limit rounded up, clamped to the limits.
    pub vcpus: u32,
    /// Memory, KiB: the memory limit rounded up to a whole MiB, clamped to the limits.
    pub mem_kib: u64,
    /// The CPU envelope the plan was made from.
    pub cpu: Envelope,
    /// The memory envelope the plan was made from.
    pub mem: Envelope,
    /// Configuration the shadow is expected to carry.
    pub expected_config: BTreeMap<String, String>,
    /// Endpoints the shadow is expected to reach.
    pub expected_deps: Vec<Dependency>,
}

/// Sizes a shadow for `at_unix_ms` from `profile`. A non-finite prediction (never produced by the
/// model, but a plan must not depend on that) plans the maximum.
pub fn resource_plan(profile: &Profile, at_unix_ms: u64, limits: ResourceLimits) -> ResourcePlan {
    let prediction = profile.model.predict(at_unix_ms);
    let cpu = prediction.envelopes.cpu;
    let mem = prediction.envelopes.mem;

    let vcpu_max = limits.vcpu_max.max(1);
    let vcpu_min = limits.vcpu_min.clamp(1, vcpu_max);
    let vcpus = if cpu.limit.is_finite() {
        // Saturating float-to-int cast; clamped right after.
        (cpu.limit.max(0.0).ceil() as u32).clamp(vcpu_min, vcpu_max)
    } else {
        vcpu_max
    };

    let mem_min = limits.mem_min_kib.min(limits.mem_max_kib);
    let mem_kib = if mem.limit.is_finite() {
        let kib = (mem.limit.max(0.0) / 1024.0).ceil() as u64;
        kib.div_ceil(1024)
            .saturating_mul(1024)
            .clamp(mem_min, limits.mem_max_kib)
    } else {
        limits.mem_max_kib
    };

    ResourcePlan {
        vcpus,
        mem_kib,
        cpu,
        mem,
        expected_config: profile.expected_config.clone(),
        expected_deps: profile.dependencies.values().cloned().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::model::ModelParams;
    use crate::profile::synthetic::TRACE_START_UNIX_MS;
    use crate::profile::{Observation, PeerUse, Proto};

    const MIB: u64 = 1024 * 1024;

    /// A profile that learned two flat hours: `cpu` cores and `mem_mib` MiB.
    fn profile(cpu: f64, mem_mib: u64) -> Profile {
        let mut p = Profile::new(ModelParams {
            headroom: 0.1,
            ..ModelParams::default()
        })
        .unwrap();
        for i in 0..120 {
            p.model.observe(&Observation {
                ts_unix_ms: TRACE_START_UNIX_MS + i * 60_000,
                cpu_cores: cpu,
                mem_bytes: mem_mib * MIB,
                disk_bytes_per_s: 0.0,
                net_bytes_per_s: 0.0,
                config: Default::default(),
                peers: vec![PeerUse {
                    addr: "10.0.0.9".into(),
                    port: 53,
                    proto: Proto::Udp,
                    bytes: 1,
                }],
            });
        }
        p.expected_config.insert("a".into(), "h".into());
        p
    }

    fn limits(vcpu_min: u32, vcpu_max: u32, mem_min_mib: u64, mem_max_mib: u64) -> ResourceLimits {
        ResourceLimits {
            vcpu_max,
            mem_max_kib: mem_max_mib * 1024,
            vcpu_min,
            mem_min_kib: mem_min_mib * 1024,
        }
    }

    #[test]
    fn rounds_up_and_clamps() {
        let at = TRACE_START_UNIX_MS + 2 * 3_600_000;
        // 2.3 cores x 1.1 headroom = 2.53 -> 3 vCPUs; 1000 MiB x 1.1 = 1100 MiB.
        let plan = resource_plan(&profile(2.3, 1000), at, limits(1, 16, 256, 65536));
        assert_eq!(plan.vcpus, 3);
        assert_eq!(plan.mem_kib, 1100 * 1024);
        assert_eq!(plan.expected_config["a"], "h");

        // 999 MiB x 1.1 = 1098.9 MiB -> rounded up to 1099 MiB.
        let plan = resource_plan(&profile(2.3, 999), at, limits(1, 16, 256, 65536));
        assert_eq!(plan.mem_kib, 1099 * 1024);

        // Caps.
        let plan = resource_plan(&profile(30.0, 100_000), at, limits(1, 8, 256, 32768));
        assert_eq!((plan.vcpus, plan.mem_kib), (8, 32768 * 1024));

        // Floors, and at least one vCPU even if the minimum says 0.
        let plan = resource_plan(&profile(0.01, 10), at, limits(0, 8, 512, 32768));
        assert_eq!((plan.vcpus, plan.mem_kib), (1, 512 * 1024));
        let plan = resource_plan(&profile(0.01, 10), at, limits(2, 8, 512, 32768));
        assert_eq!(plan.vcpus, 2);

        // A minimum above the maximum: the maximum (the host's hard cap) wins.
        let plan = resource_plan(&profile(0.01, 10), at, limits(12, 8, 4096, 2048));
        assert_eq!((plan.vcpus, plan.mem_kib), (8, 2048 * 1024));
    }

    #[test]
    fn empty_profile_plans_the_minimum() {
        let p = Profile::new(ModelParams::default()).unwrap();
        let plan = resource_plan(&p, TRACE_START_UNIX_MS, ResourceLimits::default());
        assert_eq!(plan.vcpus, 1);
        assert_eq!(plan.mem_kib, ResourceLimits::default().mem_min_kib);
        assert!(plan.expected_deps.is_empty());
    }
}
