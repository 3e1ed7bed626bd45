//! `--fork-memory`: how forks back their guest memory (`vmm::ForkMemory`).

use zeroboot_vmm::ForkMemory;

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ForkMemoryArg {
    /// private-written-ranges where KVM shadow-pages guest memory (no EPT
    /// or NPT, e.g. kvm_pvm), else shared-pages.
    Auto,
    /// Copy-on-write in 4 KiB pages; the template's write set copied ahead
    /// (about 1.5 MiB per python fork).
    SharedPages,
    /// Each 2 MiB range the template's write set touches copied whole into
    /// a private 2 MiB page before the fork runs: far fewer first-touch
    /// exits under shadow paging, at 2 MiB per range and fork (54 MiB for
    /// python).
    PrivateWrittenRanges,
}

impl ForkMemoryArg {
    pub fn resolve(self) -> ForkMemory {
        match self {
            Self::Auto => ForkMemory::for_this_host(),
            Self::SharedPages => ForkMemory::SharedPages,
            Self::PrivateWrittenRanges => ForkMemory::PrivateWrittenRanges,
        }
    }
}
