//! `--fork-memory`: how forks back their guest memory
//! (`vmm::ForkMemoryPolicy`).

use zeroboot_vmm::{ForkMemory, ForkMemoryPolicy};

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ForkMemoryArg {
    /// adaptive where KVM shadow-pages guest memory (no EPT or NPT, e.g.
    /// kvm_pvm), else shared-pages.
    Auto,
    /// Copy-on-write in 4 KiB pages; the pages of the template's write set
    /// that every probe wrote (a print's, 112 KiB for python) copied ahead.
    SharedPages,
    /// Each 2 MiB range the template's write set touches copied whole into
    /// a private 2 MiB page before the fork runs: far fewer first-touch
    /// exits under shadow paging, at 2 MiB per range and fork (about 45 MiB
    /// for python).
    PrivateWrittenRanges,
    /// private-written-ranges for VMs the pool prepares while it keeps up
    /// with requests, shared-pages for VMs made while requests wait (less
    /// CPU per fork under sustained load).
    Adaptive,
}

impl ForkMemoryArg {
    pub fn resolve(self) -> ForkMemoryPolicy {
        match self {
            Self::Auto => ForkMemoryPolicy::for_this_host(),
            Self::SharedPages => ForkMemoryPolicy::Fixed(ForkMemory::SharedPages),
            Self::PrivateWrittenRanges => ForkMemoryPolicy::Fixed(ForkMemory::PrivateWrittenRanges),
            Self::Adaptive => ForkMemoryPolicy::Adaptive,
        }
    }
}
