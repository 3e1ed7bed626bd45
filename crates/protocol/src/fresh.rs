//! The fresh-memory table: where the agent's fresh heap is (guest/agent/
//! native/heap.h). Before READY the agent maps part of guest RAM as zeroed
//! 2 MiB pages for the code's later allocations and lists them here as
//! guest-physical runs. A fork backs those runs with anonymous host memory
//! of its own rather than with the template's memory file, so that its first
//! write to each 2 MiB is one host huge page, not 512 copy-on-write faults.
//!
//! The table is written by the guest: it is checked for shape here, and the
//! host checks the addresses against guest RAM and the memory file.

use crate::{check, header, read_u32, read_u64, write_u32, ProtocolError};

/// Runs are whole 2 MiB pages.
pub const RUN_ALIGN: u64 = 2 << 20;
/// Most runs the agent may list.
pub const MAX_RUNS: usize = 128;
/// Bytes of one entry of [`header::FRESH_TABLE`]: gpa u64, len u64.
pub const ENTRY_LEN: usize = 16;
const _: () = assert!(header::FRESH_TABLE + MAX_RUNS * ENTRY_LEN <= crate::REQUEST_OFFSET);

/// Guest-physical memory the agent mapped ahead, zeroed, for the code's
/// allocations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FreshRun {
    /// 2 MiB-aligned.
    pub gpa: u64,
    /// A non-zero multiple of 2 MiB.
    pub len: u64,
}

/// Reads the agent's fresh-memory runs, checked for shape: aligned, not
/// empty, not wrapping. Overlaps and addresses are the caller's to check.
pub fn read_table(mailbox: &[u8]) -> Result<Vec<FreshRun>, ProtocolError> {
    check(mailbox)?;
    let count = read_u32(mailbox, header::FRESH_COUNT) as usize;
    if count > MAX_RUNS {
        return Err(ProtocolError::FreshTable(format!("{count} runs, at most {MAX_RUNS}")));
    }
    let mut runs = Vec::with_capacity(count);
    for i in 0..count {
        let at = header::FRESH_TABLE + i * ENTRY_LEN;
        let run = FreshRun {
            gpa: read_u64(mailbox, at),
            len: read_u64(mailbox, at + 8),
        };
        if run.len == 0
            || !run.gpa.is_multiple_of(RUN_ALIGN)
            || !run.len.is_multiple_of(RUN_ALIGN)
            || run.gpa.checked_add(run.len).is_none()
        {
            return Err(ProtocolError::FreshTable(format!(
                "run {i} at {:#x} (+{:#x}) is not whole 2 MiB pages",
                run.gpa, run.len
            )));
        }
        runs.push(run);
    }
    Ok(runs)
}

/// The guest side of [`read_table`], for tests and Rust agents.
pub fn write_table(mailbox: &mut [u8], runs: &[FreshRun]) -> Result<(), ProtocolError> {
    check(mailbox)?;
    if runs.len() > MAX_RUNS {
        return Err(ProtocolError::FreshTable(format!("{} runs", runs.len())));
    }
    write_u32(mailbox, header::FRESH_COUNT, runs.len() as u32);
    for (i, r) in runs.iter().enumerate() {
        let at = header::FRESH_TABLE + i * ENTRY_LEN;
        mailbox[at..at + 8].copy_from_slice(&r.gpa.to_le_bytes());
        mailbox[at + 8..at + 16].copy_from_slice(&r.len.to_le_bytes());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mailbox() -> Vec<u8> {
        let mut m = vec![0u8; crate::MAILBOX_SIZE];
        crate::init_mailbox(&mut m, &[0; header::BOOT_SEED_LEN]).unwrap();
        m
    }

    #[test]
    fn runs_round_trip_and_an_empty_table_is_no_runs() {
        let mut m = mailbox();
        assert_eq!(read_table(&m).unwrap(), vec![]);
        let runs = [
            FreshRun {
                gpa: 0x4000_0000,
                len: 6 << 20,
            },
            FreshRun {
                gpa: 0x20_0000,
                len: 2 << 20,
            },
        ];
        write_table(&mut m, &runs).unwrap();
        assert_eq!(read_table(&m).unwrap(), runs);
    }

    #[test]
    fn a_table_of_bad_shape_is_refused() {
        for (gpa, len) in [
            (0x1000, 2 << 20),
            (0x20_0000, 4096),
            (0x20_0000, 0),
            (u64::MAX - (2 << 20) + 1, 4 << 20),
        ] {
            let mut m = mailbox();
            write_table(&mut m, &[FreshRun { gpa, len }]).unwrap();
            assert!(
                matches!(read_table(&m), Err(ProtocolError::FreshTable(_))),
                "{gpa:#x} +{len:#x}"
            );
        }
        let mut m = mailbox();
        write_u32(&mut m, header::FRESH_COUNT, MAX_RUNS as u32 + 1);
        assert!(matches!(read_table(&m), Err(ProtocolError::FreshTable(_))));
        assert!(write_table(&mut m, &[FreshRun { gpa: 0, len: RUN_ALIGN }; MAX_RUNS + 1]).is_err());
    }
}
