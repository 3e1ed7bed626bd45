//! The guest's vDSO clock data, and how the host re-bases it in every fork.
//!
//! A fork resumes the template's kernel seconds to days after the snapshot.
//! Its clocksource counter (the TSC) has moved on by that much, or, on a host
//! that sets the guest TSC, has not. Either way the kernel would first
//! account the gap tick by tick, which costs milliseconds per minute of gap
//! when the guest kernel is emulated, and the wall clock would be the
//! template's.
//!
//! So before a fork runs, the host rewrites the vDSO data page as if the
//! machine had been suspended at the snapshot and resumed now:
//! - the counter base (`cycle_last`) becomes the counter's current value;
//! - `CLOCK_REALTIME` (and `TAI`, `REALTIME_COARSE`) becomes the host's time;
//! - `CLOCK_MONOTONIC`, `MONOTONIC_RAW` and `BOOTTIME` continue from the
//!   snapshot, so no guest timer fires early.
//!
//! Guest user space reads the new time straight from this page, with no
//! kernel entry. Our kernel patch (guest/kernel/patches/0006) takes the same
//! values into its timekeeper on its first entry from user mode.
//!
//! The layout is `struct vdso_data[2]` of Linux 6.1 (include/vdso/datapage.h),
//! 128 bytes into the vvar page (arch/x86/include/asm/vvar.h).

use std::time::Duration;

/// Offset of `_vdso_data` in the vvar page.
pub const VDSO_DATA_IN_VVAR: u64 = 128;
/// `sizeof(struct vdso_data)` on x86-64.
const VDSO_DATA_SIZE: usize = 240;
/// Both bases: `CS_HRES_COARSE` then `CS_RAW`.
pub const VDSO_DATA_LEN: usize = 2 * VDSO_DATA_SIZE;

const SEQ: usize = 0;
const CLOCK_MODE: usize = 4;
const CYCLE_LAST: usize = 8;
const SHIFT: usize = 28;
const BASETIME: usize = 32;
/// `VDSO_CLOCKMODE_TSC` on x86.
const CLOCKMODE_TSC: u32 = 1;

const CLOCK_REALTIME: usize = 0;
const CLOCK_REALTIME_COARSE: usize = 5;
const CLOCK_TAI: usize = 11;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClockError {
    #[error("the guest's vDSO clock mode is {0}, not TSC; the template's kernel is not zeroboot's")]
    NotTsc(u32),
    #[error("the guest kernel was updating its clock when the snapshot was taken (seq {0})")]
    MidUpdate(u32),
    #[error("the guest's vDSO data has an impossible shift {0}")]
    BadShift(u32),
}

fn u32_at(data: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&data[at..at + 4]);
    u32::from_le_bytes(b)
}

fn u64_at(data: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&data[at..at + 8]);
    u64::from_le_bytes(b)
}

fn put_u64(data: &mut [u8], at: usize, value: u64) {
    data[at..at + 8].copy_from_slice(&value.to_le_bytes());
}

fn basetime(clock: usize) -> usize {
    BASETIME + clock * 16
}

/// Checks that `data` (the guest's `vdso_data[2]`) is one this module can
/// re-base: TSC clock mode, no update in progress.
pub fn check(data: &[u8; VDSO_DATA_LEN]) -> Result<(), ClockError> {
    for base in [0, VDSO_DATA_SIZE] {
        let seq = u32_at(data, base + SEQ);
        if seq % 2 == 1 {
            return Err(ClockError::MidUpdate(seq));
        }
        let shift = u32_at(data, base + SHIFT);
        if shift >= 64 {
            return Err(ClockError::BadShift(shift));
        }
    }
    match u32_at(data, CLOCK_MODE) {
        CLOCKMODE_TSC => Ok(()),
        mode => Err(ClockError::NotTsc(mode)),
    }
}

/// Re-bases the guest's clock to counter value `tsc`, which the guest reads
/// at the moment the host's wall clock reads `realtime` (since the epoch).
pub fn rebase(data: &mut [u8; VDSO_DATA_LEN], tsc: u64, realtime: Duration) -> Result<(), ClockError> {
    check(data)?;
    let shift = u32_at(data, SHIFT);
    let old_real_sec = u64_at(data, basetime(CLOCK_REALTIME));
    let old_tai_sec = u64_at(data, basetime(CLOCK_TAI));
    let tai_offset = old_tai_sec.wrapping_sub(old_real_sec);
    let sec = realtime.as_secs();
    let nsec = u64::from(realtime.subsec_nanos());
    // Timestamps of the high-resolution clocks hold nanoseconds shifted left,
    // the coarse ones plain nanoseconds (kernel/time/vsyscall.c).
    put_u64(data, CYCLE_LAST, tsc);
    put_u64(data, basetime(CLOCK_REALTIME), sec);
    put_u64(data, basetime(CLOCK_REALTIME) + 8, nsec << shift);
    put_u64(data, basetime(CLOCK_TAI), sec.wrapping_add(tai_offset));
    put_u64(data, basetime(CLOCK_TAI) + 8, nsec << shift);
    put_u64(data, basetime(CLOCK_REALTIME_COARSE), sec);
    put_u64(data, basetime(CLOCK_REALTIME_COARSE) + 8, nsec);
    put_u64(data, VDSO_DATA_SIZE + CYCLE_LAST, tsc);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> [u8; VDSO_DATA_LEN] {
        let mut d = [0u8; VDSO_DATA_LEN];
        d[CLOCK_MODE..CLOCK_MODE + 4].copy_from_slice(&CLOCKMODE_TSC.to_le_bytes());
        d[SHIFT..SHIFT + 4].copy_from_slice(&24u32.to_le_bytes());
        put_u64(&mut d, CYCLE_LAST, 1000);
        put_u64(&mut d, basetime(CLOCK_REALTIME), 50);
        put_u64(&mut d, basetime(CLOCK_TAI), 87);
        put_u64(&mut d, basetime(1), 7); // CLOCK_MONOTONIC
        put_u64(&mut d, basetime(1) + 8, 3 << 24);
        put_u64(&mut d, VDSO_DATA_SIZE + CYCLE_LAST, 1000);
        d
    }

    #[test]
    fn rebase_sets_wall_clocks_and_keeps_monotonic() {
        let mut d = sample();
        rebase(&mut d, 5_000_000, Duration::new(1_800_000_000, 250)).unwrap();
        assert_eq!(u64_at(&d, CYCLE_LAST), 5_000_000);
        assert_eq!(u64_at(&d, VDSO_DATA_SIZE + CYCLE_LAST), 5_000_000);
        assert_eq!(u64_at(&d, basetime(CLOCK_REALTIME)), 1_800_000_000);
        assert_eq!(u64_at(&d, basetime(CLOCK_REALTIME) + 8), 250 << 24);
        assert_eq!(u64_at(&d, basetime(CLOCK_TAI)), 1_800_000_037, "TAI offset kept");
        assert_eq!(u64_at(&d, basetime(CLOCK_REALTIME_COARSE) + 8), 250);
        assert_eq!((u64_at(&d, basetime(1)), u64_at(&d, basetime(1) + 8)), (7, 3 << 24));
    }

    #[test]
    fn rebase_refuses_what_it_does_not_understand() {
        let mut d = sample();
        d[CLOCK_MODE] = 2; // pvclock
        assert_eq!(rebase(&mut d, 1, Duration::ZERO), Err(ClockError::NotTsc(2)));
        let mut d = sample();
        d[SEQ] = 3;
        assert_eq!(rebase(&mut d, 1, Duration::ZERO), Err(ClockError::MidUpdate(3)));
        let mut d = sample();
        d[SHIFT] = 64;
        assert_eq!(rebase(&mut d, 1, Duration::ZERO), Err(ClockError::BadShift(64)));
        assert_eq!(d, {
            let mut s = sample();
            s[SHIFT] = 64;
            s
        });
    }
}
