//! What the host knows about the guest kernel's memory, from its System.map,
//! and the state it rewrites in every fork.
//!
//! Every fork starts with the template's memory, including the kernel's
//! random-number state. Before a fork runs, the host writes fresh entropy
//! straight into that state, so `getrandom`, `/dev/urandom` and everything
//! built on them differ between forks without a guest system call.
//!
//! The layouts below are those of Linux 6.1's drivers/char/random.c, the
//! kernel zeroboot builds (guest/kernel). A change of kernel version must
//! recheck them; [`KernelSymbols::check`] catches the obvious mismatches.

use serde::{Deserialize, Serialize};

use crate::guest_clock::{self, ClockError};
use crate::memory::{GuestRam, MemoryError};

/// `__START_KERNEL_map`: with KASLR off the kernel image is mapped here,
/// so a kernel symbol's guest-physical address is its address minus this.
pub const KERNEL_MAP_BASE: u64 = 0xffff_ffff_8000_0000;

/// `static struct { u8 key[32]; unsigned long birth; unsigned long generation; spinlock_t lock; } base_crng`.
const BASE_CRNG_KEY: u64 = 0;
const BASE_CRNG_KEY_LEN: usize = 32;
const BASE_CRNG_GENERATION: u64 = 40;
/// `input_pool.hash` is a `struct blake2s_state` whose first member is `u32 h[8]`.
const INPUT_POOL_HASH_H: u64 = 0;
const INPUT_POOL_HASH_H_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum SymbolError {
    #[error("System.map has no symbol {0}")]
    Missing(&'static str),
    #[error("symbol {name} at {addr:#x} is outside the kernel image mapping")]
    NotInImage { name: &'static str, addr: u64 },
    #[error("the guest kernel's base_crng looks wrong (generation {0}); System.map may not match the kernel")]
    Implausible(u64),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("guest clock: {0}")]
    Clock(#[from] ClockError),
}

/// Guest-physical addresses of the kernel state the host rewrites.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelSymbols {
    pub base_crng: u64,
    pub input_pool: u64,
    /// `_vdso_data`: the clock data the vDSO reads (see [`guest_clock`]).
    pub vdso_data: u64,
    /// `zeroboot_clock_rebased` (guest/kernel/patches/0006).
    pub clock_rebased: u64,
}

fn lookup(map: &str, name: &'static str) -> Result<u64, SymbolError> {
    let addr = map
        .lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            let addr = parts.next()?;
            let _kind = parts.next()?;
            (parts.next()? == name).then(|| u64::from_str_radix(addr, 16).ok())?
        })
        .next()
        .ok_or(SymbolError::Missing(name))?;
    addr.checked_sub(KERNEL_MAP_BASE)
        .filter(|&p| p < (1 << 30))
        .ok_or(SymbolError::NotInImage { name, addr })
}

impl KernelSymbols {
    pub fn from_system_map(map: &str) -> Result<Self, SymbolError> {
        Ok(Self {
            base_crng: lookup(map, "base_crng")?,
            input_pool: lookup(map, "input_pool")?,
            vdso_data: lookup(map, "__vvar_page")? + guest_clock::VDSO_DATA_IN_VVAR,
            clock_rebased: lookup(map, "zeroboot_clock_rebased")?,
        })
    }

    fn generation(&self, ram: &GuestRam) -> Result<u64, SymbolError> {
        let bytes = ram.slice(self.base_crng + BASE_CRNG_GENERATION, 8)?;
        let mut word = [0u8; 8];
        word.copy_from_slice(bytes);
        Ok(u64::from_le_bytes(word))
    }

    /// Checks, on a booted guest, that the symbols point at what we expect:
    /// an initialised CRNG has a small non-zero generation.
    pub fn check(&self, ram: &GuestRam) -> Result<(), SymbolError> {
        let generation = self.generation(ram)?;
        if generation == 0 || generation > (1 << 20) {
            return Err(SymbolError::Implausible(generation));
        }
        guest_clock::check(&self.vdso(ram)?)?;
        Ok(())
    }

    fn vdso(&self, ram: &GuestRam) -> Result<[u8; guest_clock::VDSO_DATA_LEN], SymbolError> {
        let mut data = [0u8; guest_clock::VDSO_DATA_LEN];
        data.copy_from_slice(ram.slice(self.vdso_data, guest_clock::VDSO_DATA_LEN)?);
        Ok(data)
    }

    /// Moves the guest's clock to now: the guest's TSC reads `tsc` when the
    /// host's wall clock reads `realtime`. The guest must not run between
    /// the two readings and this call.
    pub fn rebase_clock(&self, ram: &mut GuestRam, tsc: u64, realtime: std::time::Duration) -> Result<(), SymbolError> {
        let mut data = self.vdso(ram)?;
        guest_clock::rebase(&mut data, tsc, realtime)?;
        ram.slice_mut(self.vdso_data, guest_clock::VDSO_DATA_LEN)?
            .copy_from_slice(&data);
        ram.slice_mut(self.clock_rebased, 4)?
            .copy_from_slice(&1u32.to_le_bytes());
        Ok(())
    }

    /// Gives the guest kernel's CRNG fresh keys: a new base key with a new
    /// generation (so the per-CPU CRNG re-derives its key on next use), and
    /// a new input-pool chaining value (so a later reseed also differs).
    pub fn reseed(&self, ram: &mut GuestRam, fresh: &[u8; 64]) -> Result<(), SymbolError> {
        let generation = self.generation(ram)?.wrapping_add(1);
        ram.slice_mut(self.base_crng + BASE_CRNG_KEY, BASE_CRNG_KEY_LEN)?
            .copy_from_slice(&fresh[..BASE_CRNG_KEY_LEN]);
        ram.slice_mut(self.base_crng + BASE_CRNG_GENERATION, 8)?
            .copy_from_slice(&generation.to_le_bytes());
        ram.slice_mut(self.input_pool + INPUT_POOL_HASH_H, INPUT_POOL_HASH_H_LEN)?
            .copy_from_slice(&fresh[BASE_CRNG_KEY_LEN..]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &str = "ffffffff81000000 T _text\nffffffff81ababa0 d input_pool\nffffffff81b9df80 b base_crng\n\
        ffffffff81ad4000 D __vvar_page\nffffffff81b9e000 B zeroboot_clock_rebased\n";

    #[test]
    fn symbols_become_physical_addresses() {
        let s = KernelSymbols::from_system_map(MAP).unwrap();
        assert_eq!(s.base_crng, 0x1b9_df80);
        assert_eq!(s.input_pool, 0x1ab_aba0);
        assert_eq!(s.vdso_data, 0x1ad_4080);
        assert_eq!(s.clock_rebased, 0x1b9_e000);
        assert!(matches!(
            KernelSymbols::from_system_map("ffffffff81000000 T _text\n"),
            Err(SymbolError::Missing("base_crng"))
        ));
        assert!(matches!(
            KernelSymbols::from_system_map("0000000000001000 b base_crng\n"),
            Err(SymbolError::NotInImage { .. })
        ));
    }

    #[test]
    fn reseed_rewrites_key_generation_and_pool() {
        let mut ram = GuestRam::anonymous(32 << 20).unwrap();
        let s = KernelSymbols::from_system_map(MAP).unwrap();
        ram.slice_mut(s.base_crng + BASE_CRNG_GENERATION, 8)
            .unwrap()
            .copy_from_slice(&3u64.to_le_bytes());
        // vdso_data[0].clock_mode = VDSO_CLOCKMODE_TSC
        ram.slice_mut(s.vdso_data + 4, 4)
            .unwrap()
            .copy_from_slice(&1u32.to_le_bytes());
        s.check(&ram).unwrap();
        let fresh: [u8; 64] = std::array::from_fn(|i| i as u8 + 1);
        s.reseed(&mut ram, &fresh).unwrap();
        assert_eq!(ram.slice(s.base_crng, 32).unwrap(), &fresh[..32]);
        assert_eq!(s.generation(&ram).unwrap(), 4);
        assert_eq!(ram.slice(s.input_pool, 32).unwrap(), &fresh[32..]);
        let zero = GuestRam::anonymous(32 << 20).unwrap();
        assert!(matches!(s.check(&zero), Err(SymbolError::Implausible(0))));
    }

    #[test]
    fn rebase_clock_writes_the_vdso_data_and_raises_the_flag() {
        let mut ram = GuestRam::anonymous(32 << 20).unwrap();
        let s = KernelSymbols::from_system_map(MAP).unwrap();
        ram.slice_mut(s.vdso_data + 4, 4)
            .unwrap()
            .copy_from_slice(&1u32.to_le_bytes());
        s.rebase_clock(&mut ram, 0x1234_5678, std::time::Duration::from_secs(1_800_000_000))
            .unwrap();
        assert_eq!(ram.slice(s.vdso_data + 8, 8).unwrap(), &0x1234_5678u64.to_le_bytes());
        assert_eq!(ram.slice(s.vdso_data + 32, 8).unwrap(), &1_800_000_000u64.to_le_bytes());
        assert_eq!(ram.slice(s.clock_rebased, 4).unwrap(), &1u32.to_le_bytes());
    }
}
