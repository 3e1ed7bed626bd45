//! What can go wrong building, opening or listing templates.

use std::path::PathBuf;

use zeroboot_vmm::snapshot::SnapshotError;
use zeroboot_vmm::MachineError;

use crate::artifacts::ArtifactError;
use crate::cache::CacheError;

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("booting the template failed: {source}; the guest console is in {log}")]
    Boot { source: MachineError, log: PathBuf },
    #[error(transparent)]
    Machine(#[from] MachineError),
    #[error("template name {0:?} must be 1-64 characters of a-z, 0-9, '-' or '_'")]
    BadName(String),
    #[error("no template named {name:?} in {dir}; build it with `zeroboot template build --name {name}`")]
    NotFound { name: String, dir: PathBuf },
    #[error("{path}: {message}")]
    Metadata { path: PathBuf, message: String },
    #[error(
        "{path} is damaged: its checksum is {actual:#010x}, the template recorded {expected:#010x}; \
         rebuild it with `zeroboot template build --name {name}`"
    )]
    Corrupt {
        name: String,
        path: PathBuf,
        expected: u32,
        actual: u32,
    },
    #[error(transparent)]
    Seccomp(#[from] zeroboot_seccomp::SeccompError),
    #[error("the template's boot thread panicked")]
    BootPanicked,
    #[error("the new template does not serve: `{code}` exited with {exit_code}, printing:\n{output}")]
    SmokeTest {
        code: String,
        exit_code: i32,
        output: String,
    },
    #[error(transparent)]
    Spec(#[from] crate::spec::SpecError),
    #[error("template {name:?} has no memory checksum (an older zeroboot made it); rebuild it with `zeroboot template build --name {name}`")]
    Unverified { name: String },
}

impl TemplateError {
    /// The template does not exist, or an older zeroboot made it (a state
    /// format this one does not read, no checksum): `template build` makes a
    /// usable one. A damaged template is not in this list: it is refused
    /// until someone asks for a rebuild.
    pub fn needs_build(&self) -> bool {
        matches!(
            self,
            Self::NotFound { .. }
                | Self::Unverified { .. }
                | Self::Snapshot(SnapshotError::Codec {
                    source: zeroboot_vmm::snapshot::codec::CodecError::Version { .. },
                    ..
                })
        )
    }
}
