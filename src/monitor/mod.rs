//! Collectors and history.

pub mod agent;
mod base64;
pub mod cgroup;
