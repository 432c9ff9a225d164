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
