//! The guest agent transport over libvirt (`virDomainQemuAgentCommand`), for the typed agent
//! client of [`crate::monitor::agent`].

use std::time::Duration;

use crate::monitor::agent::{AgentTransport, AgentTransportError};

use super::{Hypervisor, LibvirtError};

/// The guest agent of one domain over libvirt.
#[derive(Clone)]
pub struct LibvirtAgent {
    /// The libvirt connection.
    pub hv: Hypervisor,
    /// The domain whose agent is asked.
    pub domain: String,
    /// Largest reply accepted, bytes.
    pub max_reply: usize,
}

impl AgentTransport for LibvirtAgent {
    fn command(&self, json: &str, timeout: Duration) -> Result<String, AgentTransportError> {
        self.hv
            .agent_command(&self.domain, json, timeout, self.max_reply)
            .map_err(|e| match e {
                // libvirt says "unresponsive" both for a silent agent and for one whose channel
                // is not connected; `agent_command` maps both to a timeout.
                LibvirtError::AgentTimeout { .. } => AgentTransportError::Timeout(timeout),
                other => AgentTransportError::Other(crate::error::report(&other)),
            })
    }
}
