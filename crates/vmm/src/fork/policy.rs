//! How a fork's guest memory is backed, chosen per fork: by a fixed mode,
//! or by the demand its [`super::ReadyPool`] saw when it was made.

use super::pool::Demand;

/// How a fork's guest memory is backed, beyond the copy-on-write mapping
/// of the template's memory file that every fork starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ForkMemory {
    /// The pages every write-set probe wrote are copied ahead, 4 KiB each
    /// (a print's: 112 KiB for python); everything else stays shared until
    /// written.
    SharedPages,
    /// Every 2 MiB range that holds a page of the write set becomes a
    /// private 2 MiB page with a copy of the range, before the fork runs.
    /// Under shadow paging, where each first touch of a page is a VM exit,
    /// KVM then maps each such range with one exit instead of one per page
    /// touched; it costs 2 MiB of memory per range and fork (about 45 MiB
    /// for python) and the copy (docs/guest-kernel.md).
    PrivateWrittenRanges,
}

impl ForkMemory {
    /// [`ForkMemory::PrivateWrittenRanges`] where KVM shadow-pages guest
    /// memory (neither EPT nor NPT is on, e.g. `kvm_pvm`), whose first
    /// touches are expensive; [`ForkMemory::SharedPages`] otherwise.
    /// Read from sysfs once per process.
    pub fn for_this_host() -> Self {
        static HOST: std::sync::OnceLock<ForkMemory> = std::sync::OnceLock::new();
        *HOST.get_or_init(|| {
            let on = |path: &str| {
                std::fs::read_to_string(path)
                    .map(|v| matches!(v.trim(), "Y" | "1"))
                    .unwrap_or(false)
            };
            if on("/sys/module/kvm_intel/parameters/ept") || on("/sys/module/kvm_amd/parameters/npt") {
                Self::SharedPages
            } else {
                Self::PrivateWrittenRanges
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::SharedPages => "shared-pages",
            Self::PrivateWrittenRanges => "private-written-ranges",
        }
    }
}

/// Which [`ForkMemory`] a fork gets, where forks are prepared ahead by a
/// pool ([`super::ReadyPool`]) or made on demand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForkMemoryPolicy {
    /// Every fork gets this one.
    Fixed(ForkMemory),
    /// [`ForkMemory::PrivateWrittenRanges`] for a VM prepared while the
    /// pool keeps up with requests: its copy is paid before any request
    /// arrives, and its first exec is several times faster.
    /// [`ForkMemory::SharedPages`] for a VM made while requests wait (none
    /// was ready, or recently one was not): its preparation is on a
    /// request's clock or competes with running ones, and preparation plus
    /// first exec cost less CPU in all, which is what throughput under load
    /// is made of.
    Adaptive,
}

impl ForkMemoryPolicy {
    /// [`ForkMemoryPolicy::Adaptive`] where [`ForkMemory::for_this_host`]
    /// is `PrivateWrittenRanges`, else that mode, fixed.
    pub fn for_this_host() -> Self {
        match ForkMemory::for_this_host() {
            ForkMemory::PrivateWrittenRanges => Self::Adaptive,
            fixed => Self::Fixed(fixed),
        }
    }

    /// The mode for a VM made under `demand`.
    pub fn for_fork(self, demand: Demand) -> ForkMemory {
        match (self, demand) {
            (Self::Fixed(mode), _) => mode,
            (Self::Adaptive, Demand::KeptUp) => ForkMemory::PrivateWrittenRanges,
            (Self::Adaptive, Demand::Behind) => ForkMemory::SharedPages,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Fixed(mode) => mode.name(),
            Self::Adaptive => "adaptive",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adaptive_fork_memory_copies_ranges_only_for_vms_made_ahead() {
        use Demand::{Behind, KeptUp};
        let adaptive = ForkMemoryPolicy::Adaptive;
        assert_eq!(adaptive.for_fork(KeptUp), ForkMemory::PrivateWrittenRanges);
        assert_eq!(adaptive.for_fork(Behind), ForkMemory::SharedPages);
        for mode in [ForkMemory::SharedPages, ForkMemory::PrivateWrittenRanges] {
            let fixed = ForkMemoryPolicy::Fixed(mode);
            assert_eq!((fixed.for_fork(KeptUp), fixed.for_fork(Behind)), (mode, mode));
        }
    }
}
