//! The templates the server forks from.

use zeroboot_sandbox::IsolatedTemplate;
use zeroboot_template::RuntimeDescriptor;

use crate::network::NetworkRequest;

/// A template the server forks from.
pub struct Served {
    pub name: String,
    /// Its runtime: the `language` values it serves, and the guest code of
    /// the files API.
    pub runtime: &'static RuntimeDescriptor,
    pub template: IsolatedTemplate,
    /// What its sandboxes may reach when a request brings no policy (the
    /// template spec's `network`); none: no network.
    pub network: Option<NetworkRequest>,
}

impl Served {
    /// The policy a sandbox of this template gets: the request's own, else
    /// the template's.
    pub(crate) fn network<'a>(&'a self, request: Option<&'a NetworkRequest>) -> Option<&'a NetworkRequest> {
        request.or(self.network.as_ref())
    }

    /// Guest RAM of each sandbox forked from it.
    pub fn memory_mib(&self) -> u64 {
        self.template.snapshot().state.layout.ram_bytes >> 20
    }

    /// Tells builds of the template apart (every build's machine state
    /// differs): a sandbox paused on one build resumes only on it.
    pub fn build_id(&self) -> u32 {
        zeroboot_vmm::snapshot::codec::encode(&self.template.snapshot().state)
            .map_or(0, |bytes| crc32fast::hash(&bytes))
    }
}

/// A random id (96 bits, hex) for an execution, a request or a sandbox, for
/// logs and clients.
pub(crate) fn random_id() -> String {
    let mut bytes = [0u8; 12];
    zeroboot_vmm::machine::fill_random(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
