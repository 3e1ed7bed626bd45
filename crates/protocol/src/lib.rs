//! The host↔guest wire format.
//!
//! The host and the guest agent talk through a **mailbox**: a region of guest
//! physical memory that the e820 map marks reserved, which the agent maps through
//! `/dev/mem`. The agent signals the host by storing one byte to the **doorbell**,
//! a guest-physical page with no memory behind it; the store leaves the guest as
//! an MMIO exit. The host answers by writing into the mailbox before it resumes
//! the vCPU, so neither side polls.
//!
//! Every field is little-endian at a fixed offset (see the constants below).
//! The guest agents get these constants from files that the template build
//! generates from [`guest_layout`], so they cannot drift from this crate; a
//! change to the layout must still bump [`VERSION`].
//!
//! The mailbox is written by an untrusted guest, so every read of guest-written
//! fields is bounds-checked and never panics.
//!
//! Output larger than the response area travels in chunks: the agent fills the
//! area, sets [`FLAG_MORE`] and rings [`Doorbell::Result`]; the host copies the
//! chunk out and resumes the guest, which writes the next one. Each stream is
//! capped at the request's output limit, and the host enforces that cap too.

use thiserror::Error;

pub mod exec;
pub mod files;
pub mod fresh;
pub mod guest_layout;

pub use exec::{Chunk, Context, ContextError, GuestFault, Outcome, Request};

/// Size of the mailbox region in guest memory.
pub const MAILBOX_SIZE: usize = 2 << 20;
/// `"ZBMB"`, written by the host at boot.
pub const MAGIC: u32 = u32::from_le_bytes(*b"ZBMB");
/// Version of this layout. The agent refuses a mailbox of another version.
pub const VERSION: u32 = 11;

/// Header field offsets (bytes from the start of the mailbox).
pub mod header {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 4;
    /// Host → guest: incremented for every request.
    pub const REQUEST_SEQ: usize = 8;
    pub const CODE_LEN: usize = 12;
    pub const STDIN_LEN: usize = 16;
    /// Guest → host: equals `REQUEST_SEQ` once the response is complete.
    pub const RESPONSE_SEQ: usize = 20;
    pub const EXIT_CODE: usize = 24;
    pub const STDOUT_LEN: usize = 28;
    pub const STDERR_LEN: usize = 32;
    pub const RESPONSE_FLAGS: usize = 36;
    /// Host → guest: the most bytes of stdout, and of stderr, to return.
    pub const OUTPUT_LIMIT: usize = 40;
    /// Host → guest: [`super::REQUEST_STREAM`] and future request options.
    pub const REQUEST_FLAGS: usize = 44;
    /// Host → guest: bytes of the request's [`crate::Context`] (its
    /// working directory and environment), after code and stdin; 0 for
    /// none, which an agent checks before anything else about it.
    pub const CONTEXT_LEN: usize = 48;
    /// Guest → host: bytes of rich results (see [`crate::exec::Outcome`])
    /// after stdout and stderr in this chunk; 0 for none.
    pub const RESULTS_LEN: usize = 52;
    /// Guest → host: where this chunk's payload starts:
    /// [`super::RESPONSE_OFFSET`] (or 0, which means the same), or
    /// [`super::SMALL_RESPONSE_OFFSET`] for a chunk of at most
    /// [`super::SMALL_RESPONSE_CAPACITY`] bytes.
    pub const RESPONSE_AT: usize = 56;
    /// Host → guest at boot: entropy the agent credits to the kernel CRNG.
    pub const BOOT_SEED: usize = 64;
    pub const BOOT_SEED_LEN: usize = 64;
    /// Host → guest with every request: seeds for user-space generators,
    /// which the agent uses only if it registered no [`super::EntropyRegion`]s.
    pub const REQUEST_SEED: usize = 128;
    pub const REQUEST_SEED_LEN: usize = 64;
    /// Guest → host at READY: how many [`super::EntropyRegion`]s follow.
    pub const ENTROPY_COUNT: usize = 256;
    /// Guest → host at READY: the regions, 16 bytes each (gpa u64, len u32,
    /// value u32).
    pub const ENTROPY_TABLE: usize = 264;
    /// Guest → host at READY: how many [`super::fresh::FreshRun`]s follow.
    pub const FRESH_COUNT: usize = 1024;
    /// Guest → host at READY: the runs, 16 bytes each (gpa u64, len u64).
    pub const FRESH_TABLE: usize = 1032;
}

/// Most entropy regions the agent may register.
pub const MAX_ENTROPY_REGIONS: usize = 32;
/// Bytes of one entry of [`header::ENTROPY_TABLE`].
pub const ENTROPY_ENTRY_LEN: usize = 16;
const _: () = assert!(header::ENTROPY_TABLE + MAX_ENTROPY_REGIONS * ENTROPY_ENTRY_LEN <= REQUEST_OFFSET);

/// Request payload (code, then stdin, then the context) starts here: in
/// the header's page, after its tables, so that a request of up to 960
/// bytes is one page of a fork's memory for the host to write and the
/// guest to read, not two.
pub const REQUEST_OFFSET: usize = 3136;
const _: () = assert!(REQUEST_OFFSET.is_multiple_of(64));
/// Room for code, stdin and the context.
pub const REQUEST_CAPACITY: usize = RESPONSE_OFFSET - REQUEST_OFFSET;
/// Response payload (stdout, then stderr) starts here.
pub const RESPONSE_OFFSET: usize = 1 << 20;
/// Room for stdout plus stderr.
pub const RESPONSE_CAPACITY: usize = MAILBOX_SIZE - RESPONSE_OFFSET;
/// Where an agent may put a small response chunk instead: over the request,
/// which it has read by then, in the header's page, which every request
/// writes anyway. A small answer then copies no page of a fork's memory
/// beyond the header's.
pub const SMALL_RESPONSE_OFFSET: usize = REQUEST_OFFSET;
/// Room for a small chunk: the rest of the header's page.
pub const SMALL_RESPONSE_CAPACITY: usize = 4096 - SMALL_RESPONSE_OFFSET;

/// `RESPONSE_FLAGS` bits.
pub const FLAG_STDOUT_TRUNCATED: u32 = 1 << 0;
pub const FLAG_STDERR_TRUNCATED: u32 = 1 << 1;
/// This is not the last chunk of the response.
pub const FLAG_MORE: u32 = 1 << 2;
pub const FLAG_RESULTS_TRUNCATED: u32 = 1 << 3;

/// `REQUEST_FLAGS` bit: send output as it is written (a chunk, with
/// [`FLAG_MORE`], when a line completes), not only at the end.
pub const REQUEST_STREAM: u32 = 1 << 0;
/// `REQUEST_FLAGS` bit: the first request of this fork. An agent that
/// seeds user-space generators itself (from `REQUEST_SEED`) does so only
/// then, so that a seed user code sets holds for its later requests, and
/// forks still differ.
pub const REQUEST_FRESH_FORK: u32 = 1 << 1;
/// `REQUEST_FLAGS` bit: the request is a file operation ([`files`]), which
/// the agent's native half serves without running any code.
pub const REQUEST_FILE_OP: u32 = 1 << 2;

/// Default cap on each of stdout and stderr.
pub const DEFAULT_OUTPUT_LIMIT: u32 = 1 << 20;
/// The largest cap a request may ask for.
pub const MAX_OUTPUT_LIMIT: u32 = 64 << 20;

/// The byte the agent stores to the doorbell says why it rang.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[repr(u8)]
pub enum Doorbell {
    /// Booted, warmed up and waiting for the first request: take the snapshot now.
    Ready = 1,
    /// The response to the current request is in the mailbox.
    Result = 2,
}

impl Doorbell {
    pub fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(Self::Ready),
            2 => Some(Self::Result),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Error, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ProtocolError {
    #[error("mailbox is {0} bytes, expected {MAILBOX_SIZE}")]
    MailboxSize(usize),
    #[error("request of {0} bytes does not fit the mailbox ({REQUEST_CAPACITY} bytes)")]
    RequestTooLarge(usize),
    #[error("guest answered sequence {got}, expected {expected}")]
    Sequence { expected: u32, got: u32 },
    #[error(
        "guest reported {stdout} + {stderr} + {results} output bytes, more than the {RESPONSE_CAPACITY} the mailbox holds"
    )]
    ResponseTooLarge { stdout: u32, stderr: u32, results: u32 },
    #[error(
        "guest put a {len}-byte response chunk at offset {at}, which is neither {RESPONSE_OFFSET} nor, for at most {SMALL_RESPONSE_CAPACITY} bytes, {SMALL_RESPONSE_OFFSET}"
    )]
    BadResponseOffset { at: u32, len: usize },
    #[error("output limit {0} is outside 0..={MAX_OUTPUT_LIMIT}")]
    BadOutputLimit(u32),
    #[error("guest sent more than the {0}-byte output limit")]
    OutputOverLimit(u32),
    #[error("the agent's entropy table is invalid: {0}")]
    EntropyTable(String),
    #[error("the agent's fresh-memory table is invalid: {0}")]
    FreshTable(String),
    #[error("the guest rang the doorbell with unknown code {0:#x}")]
    UnknownDoorbell(u8),
    #[error("the guest rang {got:?} while the host waited for {expected:?}")]
    WrongDoorbell { expected: Doorbell, got: Doorbell },
    #[error("bad request context: {0}")]
    BadContext(String),
}

/// The zeroing device: I/O ports through which the guest kernel has the host
/// zero pages of the sandbox's disk (guest/kernel/patches/0007, which
/// repeats these values). ext4 on DAX zeroes every block it allocates, and
/// zeroing 2 MiB with guest stores takes most of a second where guest kernel
/// mode is emulated; the host does it at memory speed.
pub mod zeroing {
    /// Read: [`MAGIC`] when the host has the device. Write: how many 4 KiB
    /// pages the next zeroing covers.
    pub const COUNT_PORT: u16 = 0x5b0;
    /// Write: the first page frame; the host zeroes the pages before the
    /// guest runs on. Read: 0 if that zeroing was done, 1 if it was refused
    /// (outside the disk).
    pub const START_PORT: u16 = 0x5b4;
    /// `"ZBZ0"`.
    pub const MAGIC: u32 = u32::from_le_bytes(*b"ZBZ0");
}

/// Guest memory that holds the state of a user-space random generator
/// (Python's `random`, numpy's global generator), registered by the agent at
/// READY. Before every request the host overwrites it, so the generators in
/// each fork and each request differ, with no work in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EntropyRegion {
    /// Guest-physical address; the region never crosses a 4 KiB page.
    pub gpa: u64,
    /// Bytes of fresh randomness to write at `gpa`, or 0 to write `value`
    /// as a little-endian u32 there instead (a generator's position), which
    /// the host does only where it differs.
    pub len: u32,
    pub value: u32,
}

impl EntropyRegion {
    /// Bytes the host writes.
    pub fn write_len(&self) -> u64 {
        if self.len == 0 {
            4
        } else {
            u64::from(self.len)
        }
    }
}

/// Reads the agent's entropy regions. Checks only the table's own shape; the
/// caller checks the addresses against guest memory.
pub fn read_entropy_table(mailbox: &[u8]) -> Result<Vec<EntropyRegion>, ProtocolError> {
    check(mailbox)?;
    let count = read_u32(mailbox, header::ENTROPY_COUNT) as usize;
    if count > MAX_ENTROPY_REGIONS {
        return Err(ProtocolError::EntropyTable(format!(
            "{count} regions, at most {MAX_ENTROPY_REGIONS}"
        )));
    }
    let mut regions = Vec::with_capacity(count);
    for i in 0..count {
        let at = header::ENTROPY_TABLE + i * ENTROPY_ENTRY_LEN;
        let region = EntropyRegion {
            gpa: read_u64(mailbox, at),
            len: read_u32(mailbox, at + 8),
            value: read_u32(mailbox, at + 12),
        };
        // In u128: the last page of the address space ends at 2^64.
        let page_end = u128::from(region.gpa | 0xfff) + 1;
        let end = u128::from(region.gpa) + u128::from(region.write_len());
        if end > page_end || end > u128::from(u64::MAX) {
            return Err(ProtocolError::EntropyTable(format!(
                "region {i} at {:#x} (+{}) crosses a page",
                region.gpa,
                region.write_len()
            )));
        }
        regions.push(region);
    }
    Ok(regions)
}

/// The guest side of [`read_entropy_table`], for tests and Rust agents.
pub fn write_entropy_table(mailbox: &mut [u8], regions: &[EntropyRegion]) -> Result<(), ProtocolError> {
    check(mailbox)?;
    if regions.len() > MAX_ENTROPY_REGIONS {
        return Err(ProtocolError::EntropyTable(format!("{} regions", regions.len())));
    }
    write_u32(mailbox, header::ENTROPY_COUNT, regions.len() as u32);
    for (i, r) in regions.iter().enumerate() {
        let at = header::ENTROPY_TABLE + i * ENTROPY_ENTRY_LEN;
        mailbox[at..at + 8].copy_from_slice(&r.gpa.to_le_bytes());
        write_u32(mailbox, at + 8, r.len);
        write_u32(mailbox, at + 12, r.value);
    }
    Ok(())
}

pub(crate) fn check(mailbox: &[u8]) -> Result<(), ProtocolError> {
    if mailbox.len() == MAILBOX_SIZE {
        Ok(())
    } else {
        Err(ProtocolError::MailboxSize(mailbox.len()))
    }
}

pub(crate) fn read_u32(mailbox: &[u8], offset: usize) -> u32 {
    let mut bytes = [0u8; 4];
    bytes.copy_from_slice(&mailbox[offset..offset + 4]);
    u32::from_le_bytes(bytes)
}

pub(crate) fn read_u64(mailbox: &[u8], offset: usize) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&mailbox[offset..offset + 8]);
    u64::from_le_bytes(bytes)
}

pub(crate) fn write_u32(mailbox: &mut [u8], offset: usize, value: u32) {
    mailbox[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
}

/// Bytes at the start of the mailbox that say which protocol wrote it.
pub const HEADER_ID_LEN: usize = header::VERSION + 4;

/// The magic and version [`init_mailbox`] wrote, read from the mailbox's
/// first [`HEADER_ID_LEN`] bytes.
pub fn header_id(start: &[u8; HEADER_ID_LEN]) -> (u32, u32) {
    (read_u32(start, header::MAGIC), read_u32(start, header::VERSION))
}

/// Prepares a fresh mailbox at boot: header and the boot entropy.
pub fn init_mailbox(mailbox: &mut [u8], seed: &[u8; header::BOOT_SEED_LEN]) -> Result<(), ProtocolError> {
    check(mailbox)?;
    mailbox[..REQUEST_OFFSET].fill(0);
    write_u32(mailbox, header::MAGIC, MAGIC);
    write_u32(mailbox, header::VERSION, VERSION);
    mailbox[header::BOOT_SEED..header::BOOT_SEED + header::BOOT_SEED_LEN].copy_from_slice(seed);
    Ok(())
}

/// Writes `request` and returns its sequence number, which the response must echo.
pub fn write_request(
    mailbox: &mut [u8],
    request: &Request,
    seed: &[u8; header::REQUEST_SEED_LEN],
    fresh_fork: bool,
) -> Result<u32, ProtocolError> {
    check(mailbox)?;
    request
        .context
        .validate()
        .map_err(|e| ProtocolError::BadContext(e.to_string()))?;
    let context = request.context.encode();
    let total = request
        .code
        .len()
        .saturating_add(request.stdin.len())
        .saturating_add(context.len());
    if total > REQUEST_CAPACITY {
        return Err(ProtocolError::RequestTooLarge(total));
    }
    if request.output_limit > MAX_OUTPUT_LIMIT {
        return Err(ProtocolError::BadOutputLimit(request.output_limit));
    }
    // Lengths fit in u32: all are below REQUEST_CAPACITY.
    let code_len = request.code.len() as u32;
    let stdin_len = request.stdin.len() as u32;
    let code_at = REQUEST_OFFSET;
    let stdin_at = code_at + request.code.len();
    let context_at = stdin_at + request.stdin.len();
    mailbox[code_at..stdin_at].copy_from_slice(&request.code);
    mailbox[stdin_at..context_at].copy_from_slice(&request.stdin);
    mailbox[context_at..context_at + context.len()].copy_from_slice(&context);
    write_u32(mailbox, header::CONTEXT_LEN, context.len() as u32);
    mailbox[header::REQUEST_SEED..header::REQUEST_SEED + header::REQUEST_SEED_LEN].copy_from_slice(seed);
    let seq = read_u32(mailbox, header::REQUEST_SEQ).wrapping_add(1);
    write_u32(mailbox, header::CODE_LEN, code_len);
    write_u32(mailbox, header::STDIN_LEN, stdin_len);
    write_u32(mailbox, header::OUTPUT_LIMIT, request.output_limit);
    let flags = if request.stream { REQUEST_STREAM } else { 0 } | if fresh_fork { REQUEST_FRESH_FORK } else { 0 };
    write_u32(mailbox, header::REQUEST_FLAGS, flags);
    write_u32(mailbox, header::REQUEST_SEQ, seq);
    Ok(seq)
}

/// Writes a file operation and returns its sequence number.
pub fn write_file_request(mailbox: &mut [u8], request: &files::FileRequest) -> Result<u32, ProtocolError> {
    check(mailbox)?;
    let code = request.encode();
    let total = code.len().saturating_add(request.data.len());
    if total > REQUEST_CAPACITY {
        return Err(ProtocolError::RequestTooLarge(total));
    }
    let stdin_at = REQUEST_OFFSET + code.len();
    mailbox[REQUEST_OFFSET..stdin_at].copy_from_slice(&code);
    mailbox[stdin_at..stdin_at + request.data.len()].copy_from_slice(&request.data);
    write_u32(mailbox, header::CONTEXT_LEN, 0);
    let seq = read_u32(mailbox, header::REQUEST_SEQ).wrapping_add(1);
    // Lengths fit in u32: both are below REQUEST_CAPACITY.
    write_u32(mailbox, header::CODE_LEN, code.len() as u32);
    write_u32(mailbox, header::STDIN_LEN, request.data.len() as u32);
    write_u32(mailbox, header::OUTPUT_LIMIT, 0);
    write_u32(mailbox, header::REQUEST_FLAGS, REQUEST_FILE_OP);
    write_u32(mailbox, header::REQUEST_SEQ, seq);
    Ok(seq)
}

/// One doorbell's worth of a response: a view into the mailbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponsePart<'a> {
    pub exit_code: i32,
    pub stdout: &'a [u8],
    pub stderr: &'a [u8],
    /// Rich results, as JSON lines (see [`Outcome::results`]).
    pub results: &'a [u8],
    pub flags: u32,
}

impl ResponsePart<'_> {
    /// More parts of this response follow.
    pub fn more(&self) -> bool {
        self.flags & FLAG_MORE != 0
    }

    /// Its output, copied out of the mailbox.
    pub fn chunk(&self) -> Chunk {
        Chunk {
            stdout: self.stdout.to_vec(),
            stderr: self.stderr.to_vec(),
            results: self.results.to_vec(),
        }
    }
}

impl Outcome {
    /// Appends `chunk`, refusing a guest that sends more than `limit` bytes on
    /// either stream (it was told the limit in the request).
    pub fn append(&mut self, chunk: &ResponsePart<'_>, limit: u32) -> Result<(), ProtocolError> {
        let limit_bytes = limit as usize;
        if self.stdout.len() + chunk.stdout.len() > limit_bytes
            || self.stderr.len() + chunk.stderr.len() > limit_bytes
            || self.results.len() + chunk.results.len() > limit_bytes
        {
            return Err(ProtocolError::OutputOverLimit(limit));
        }
        self.stdout.extend_from_slice(chunk.stdout);
        self.stderr.extend_from_slice(chunk.stderr);
        self.results.extend_from_slice(chunk.results);
        self.exit_code = chunk.exit_code;
        self.stdout_truncated |= chunk.flags & FLAG_STDOUT_TRUNCATED != 0;
        self.stderr_truncated |= chunk.flags & FLAG_STDERR_TRUNCATED != 0;
        self.results_truncated |= chunk.flags & FLAG_RESULTS_TRUNCATED != 0;
        Ok(())
    }
}

/// Reads the chunk of the response to request `seq` that is in the mailbox.
/// Never trusts the guest's lengths.
pub fn read_chunk(mailbox: &[u8], seq: u32) -> Result<ResponsePart<'_>, ProtocolError> {
    check(mailbox)?;
    let got = read_u32(mailbox, header::RESPONSE_SEQ);
    if got != seq {
        return Err(ProtocolError::Sequence { expected: seq, got });
    }
    let stdout_len = read_u32(mailbox, header::STDOUT_LEN);
    let stderr_len = read_u32(mailbox, header::STDERR_LEN);
    let results_len = read_u32(mailbox, header::RESULTS_LEN);
    let total = stdout_len as usize + stderr_len as usize + results_len as usize;
    if total > RESPONSE_CAPACITY {
        return Err(ProtocolError::ResponseTooLarge {
            stdout: stdout_len,
            stderr: stderr_len,
            results: results_len,
        });
    }
    let at = match read_u32(mailbox, header::RESPONSE_AT) {
        0 => RESPONSE_OFFSET,
        at if at as usize == RESPONSE_OFFSET => RESPONSE_OFFSET,
        at if at as usize == SMALL_RESPONSE_OFFSET && total <= SMALL_RESPONSE_CAPACITY => SMALL_RESPONSE_OFFSET,
        at => return Err(ProtocolError::BadResponseOffset { at, len: total }),
    };
    let out_end = at + stdout_len as usize;
    let err_end = out_end + stderr_len as usize;
    let results_end = err_end + results_len as usize;
    Ok(ResponsePart {
        exit_code: read_u32(mailbox, header::EXIT_CODE) as i32,
        stdout: &mailbox[at..out_end],
        stderr: &mailbox[out_end..err_end],
        results: &mailbox[err_end..results_end],
        flags: read_u32(mailbox, header::RESPONSE_FLAGS),
    })
}

/// The guest side of [`read_chunk`], used by tests and by Rust agents: a
/// chunk that fits goes to [`SMALL_RESPONSE_OFFSET`], over the request.
pub fn write_chunk(mailbox: &mut [u8], seq: u32, chunk: &ResponsePart<'_>) -> Result<(), ProtocolError> {
    check(mailbox)?;
    let total = chunk.stdout.len() + chunk.stderr.len() + chunk.results.len();
    if total > RESPONSE_CAPACITY {
        return Err(ProtocolError::ResponseTooLarge {
            stdout: chunk.stdout.len() as u32,
            stderr: chunk.stderr.len() as u32,
            results: chunk.results.len() as u32,
        });
    }
    let at = if total <= SMALL_RESPONSE_CAPACITY {
        SMALL_RESPONSE_OFFSET
    } else {
        RESPONSE_OFFSET
    };
    let out_end = at + chunk.stdout.len();
    let err_end = out_end + chunk.stderr.len();
    mailbox[at..out_end].copy_from_slice(chunk.stdout);
    mailbox[out_end..err_end].copy_from_slice(chunk.stderr);
    mailbox[err_end..err_end + chunk.results.len()].copy_from_slice(chunk.results);
    write_u32(mailbox, header::EXIT_CODE, chunk.exit_code as u32);
    write_u32(mailbox, header::STDOUT_LEN, chunk.stdout.len() as u32);
    write_u32(mailbox, header::STDERR_LEN, chunk.stderr.len() as u32);
    write_u32(mailbox, header::RESULTS_LEN, chunk.results.len() as u32);
    write_u32(mailbox, header::RESPONSE_FLAGS, chunk.flags);
    write_u32(mailbox, header::RESPONSE_AT, at as u32);
    write_u32(mailbox, header::RESPONSE_SEQ, seq);
    Ok(())
}

/// Reads the request the host wrote, and its sequence number (the guest
/// side of [`write_request`]).
pub fn read_request(mailbox: &[u8]) -> Result<(u32, Request), ProtocolError> {
    check(mailbox)?;
    let code_len = read_u32(mailbox, header::CODE_LEN) as usize;
    let stdin_len = read_u32(mailbox, header::STDIN_LEN) as usize;
    let context_len = read_u32(mailbox, header::CONTEXT_LEN) as usize;
    let total = code_len.saturating_add(stdin_len).saturating_add(context_len);
    if total > REQUEST_CAPACITY {
        return Err(ProtocolError::RequestTooLarge(total));
    }
    let output_limit = read_u32(mailbox, header::OUTPUT_LIMIT);
    if output_limit > MAX_OUTPUT_LIMIT {
        return Err(ProtocolError::BadOutputLimit(output_limit));
    }
    let code_end = REQUEST_OFFSET + code_len;
    let request = Request {
        code: mailbox[REQUEST_OFFSET..code_end].to_vec(),
        stdin: mailbox[code_end..code_end + stdin_len].to_vec(),
        output_limit,
        stream: read_u32(mailbox, header::REQUEST_FLAGS) & REQUEST_STREAM != 0,
        context: Context::decode(&mailbox[code_end + stdin_len..code_end + stdin_len + context_len])?,
    };
    Ok((read_u32(mailbox, header::REQUEST_SEQ), request))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: [u8; header::REQUEST_SEED_LEN] = [0; header::REQUEST_SEED_LEN];

    fn mailbox() -> Vec<u8> {
        let mut m = vec![0u8; MAILBOX_SIZE];
        init_mailbox(&mut m, &[7; header::BOOT_SEED_LEN]).unwrap();
        m
    }

    #[test]
    fn request_round_trip() {
        let mut m = mailbox();
        let request = Request {
            code: b"print(1)".to_vec(),
            stdin: b"in".to_vec(),
            output_limit: 77,
            stream: true,
            context: Context {
                cwd: Some("/home/user".into()),
                env: [("A".to_string(), "1=2".to_string()), ("_B".to_string(), String::new())].into(),
                user: Some(exec::ROOT.into()),
            },
        };
        let seq = write_request(&mut m, &request, &SEED, false).unwrap();
        assert_eq!(seq, 1);
        assert_eq!(read_u32(&m, header::CONTEXT_LEN), 26);
        assert_eq!(
            &m[REQUEST_OFFSET + 10..REQUEST_OFFSET + 36],
            b"/home/user\0root\0A=1=2\0_B=\0"
        );
        assert_eq!(read_request(&m).unwrap(), (1, request));
        assert_eq!(read_u32(&m, header::REQUEST_FLAGS), REQUEST_STREAM);
        let seq2 = write_request(&mut m, &Request::new("x", ""), &SEED, true).unwrap();
        assert_eq!(seq2, 2);
        assert_eq!(read_u32(&m, header::REQUEST_FLAGS), REQUEST_FRESH_FORK);
        assert_eq!(read_request(&m).unwrap().1.output_limit, DEFAULT_OUTPUT_LIMIT); // No context costs the guest nothing but reading a zero.
        let plain = Request::new("print(1)", "");
        write_request(&mut m, &plain, &SEED, false).unwrap();
        assert_eq!(read_u32(&m, header::CONTEXT_LEN), 0);
        assert_eq!(read_request(&m).unwrap().1, plain);
    }

    #[test]
    fn chunks_assemble_into_a_response() {
        let mut m = mailbox();
        let mut response = Outcome::default();
        let first = ResponsePart {
            exit_code: 0,
            stdout: b"out",
            stderr: b"",
            results: b"{\"type\": \"display_data\"}\n",
            flags: FLAG_MORE,
        };
        write_chunk(&mut m, 9, &first).unwrap();
        let chunk = read_chunk(&m, 9).unwrap();
        assert_eq!(chunk, first);
        assert!(chunk.more());
        response.append(&chunk, 30).unwrap();
        let last = ResponsePart {
            exit_code: -3,
            stdout: b"put",
            stderr: b"err",
            results: b"",
            flags: FLAG_STDOUT_TRUNCATED,
        };
        write_chunk(&mut m, 9, &last).unwrap();
        let chunk = read_chunk(&m, 9).unwrap();
        assert!(!chunk.more());
        response.append(&chunk, 30).unwrap();
        assert_eq!(
            response,
            Outcome {
                exit_code: -3,
                stdout: b"output".to_vec(),
                stderr: b"err".to_vec(),
                results: b"{\"type\": \"display_data\"}\n".to_vec(),
                stdout_truncated: true,
                stderr_truncated: false,
                results_truncated: false,
            }
        );
        // A guest that ignores the limit is refused.
        assert_eq!(response.append(&chunk, 8), Err(ProtocolError::OutputOverLimit(8)));
    }

    #[test]
    fn a_small_chunk_is_read_over_the_request_and_a_large_one_from_the_response_area() {
        let mut m = mailbox();
        let small = [b'a'; SMALL_RESPONSE_CAPACITY - 2];
        let chunk = ResponsePart {
            exit_code: 0,
            stdout: &small,
            stderr: b"e",
            results: b"r",
            flags: 0,
        };
        write_chunk(&mut m, 3, &chunk).unwrap();
        assert_eq!(read_u32(&m, header::RESPONSE_AT) as usize, SMALL_RESPONSE_OFFSET);
        assert!(
            m[RESPONSE_OFFSET..].iter().all(|&b| b == 0),
            "the response area is untouched"
        );
        assert_eq!(read_chunk(&m, 3).unwrap(), chunk);
        let large = [b'b'; SMALL_RESPONSE_CAPACITY + 1];
        let chunk = ResponsePart {
            stdout: &large,
            ..chunk
        };
        write_chunk(&mut m, 4, &chunk).unwrap();
        assert_eq!(read_u32(&m, header::RESPONSE_AT) as usize, RESPONSE_OFFSET);
        assert_eq!(read_chunk(&m, 4).unwrap(), chunk);
        // 0, as an agent that never writes the field leaves it, is the response area.
        write_u32(&mut m, header::RESPONSE_AT, 0);
        assert_eq!(read_chunk(&m, 4).unwrap(), chunk);
        // A large chunk over the request, or any other offset, is refused.
        write_u32(&mut m, header::RESPONSE_AT, SMALL_RESPONSE_OFFSET as u32);
        assert_eq!(
            read_chunk(&m, 4),
            Err(ProtocolError::BadResponseOffset {
                at: SMALL_RESPONSE_OFFSET as u32,
                len: SMALL_RESPONSE_CAPACITY + 3
            })
        );
        for at in [
            1,
            64,
            SMALL_RESPONSE_OFFSET as u32 + 8,
            RESPONSE_OFFSET as u32 - 1,
            u32::MAX,
        ] {
            write_u32(&mut m, header::RESPONSE_AT, at);
            assert!(matches!(
                read_chunk(&m, 4),
                Err(ProtocolError::BadResponseOffset { .. })
            ));
        }
    }

    #[test]
    fn stale_response_is_rejected() {
        let m = mailbox();
        assert_eq!(read_chunk(&m, 1), Err(ProtocolError::Sequence { expected: 1, got: 0 }));
    }

    #[test]
    fn hostile_lengths_are_rejected_without_panic() {
        let mut m = mailbox();
        write_u32(&mut m, header::RESPONSE_SEQ, 5);
        write_u32(&mut m, header::STDOUT_LEN, u32::MAX);
        write_u32(&mut m, header::STDERR_LEN, u32::MAX);
        assert!(matches!(read_chunk(&m, 5), Err(ProtocolError::ResponseTooLarge { .. })));
        write_u32(&mut m, header::STDOUT_LEN, RESPONSE_CAPACITY as u32);
        write_u32(&mut m, header::STDERR_LEN, 1);
        assert!(matches!(read_chunk(&m, 5), Err(ProtocolError::ResponseTooLarge { .. })));
        write_u32(&mut m, header::STDERR_LEN, 0);
        write_u32(&mut m, header::RESULTS_LEN, u32::MAX);
        assert!(matches!(read_chunk(&m, 5), Err(ProtocolError::ResponseTooLarge { .. })));
        write_u32(&mut m, header::CODE_LEN, u32::MAX);
        assert!(read_request(&m).is_err());
    }

    #[test]
    fn oversized_request_is_refused() {
        let mut m = mailbox();
        let big = vec![b'x'; REQUEST_CAPACITY + 1];
        assert_eq!(
            write_request(&mut m, &Request::new(big, ""), &SEED, false),
            Err(ProtocolError::RequestTooLarge(REQUEST_CAPACITY + 1))
        );
        assert!(matches!(
            write_request(&mut m[..10], &Request::new("", ""), &SEED, false),
            Err(ProtocolError::MailboxSize(10))
        ));
        let huge_limit = Request {
            output_limit: MAX_OUTPUT_LIMIT + 1,
            ..Request::new("", "")
        };
        assert_eq!(
            write_request(&mut m, &huge_limit, &SEED, false),
            Err(ProtocolError::BadOutputLimit(MAX_OUTPUT_LIMIT + 1))
        );
    }

    /// The decoders on random header values (the fuzz target in fuzz/ does
    /// this coverage-guided); lengths near the limits are favoured.
    #[test]
    fn random_headers_never_panic() {
        let mut m = mailbox();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let interesting = [
            0,
            1,
            u32::MAX,
            RESPONSE_CAPACITY as u32,
            RESPONSE_CAPACITY as u32 + 1,
            SMALL_RESPONSE_OFFSET as u32,
            SMALL_RESPONSE_CAPACITY as u32 + 1,
            RESPONSE_OFFSET as u32,
            1 << 31,
        ];
        for _ in 0..20_000 {
            for field in [
                header::CODE_LEN,
                header::STDIN_LEN,
                header::OUTPUT_LIMIT,
                header::STDOUT_LEN,
                header::STDERR_LEN,
                header::RESPONSE_FLAGS,
                header::RESPONSE_AT,
                header::RESPONSE_SEQ,
            ] {
                let r = next();
                let value = if r % 3 == 0 {
                    interesting[(r >> 8) as usize % interesting.len()]
                } else {
                    (r >> 16) as u32 % (2 * RESPONSE_CAPACITY as u32)
                };
                write_u32(&mut m, field, value);
            }
            if let Ok(chunk) = read_chunk(&m, read_u32(&m, header::RESPONSE_SEQ)) {
                assert!(chunk.stdout.len() + chunk.stderr.len() <= RESPONSE_CAPACITY);
                let _ = Outcome::default().append(&chunk, DEFAULT_OUTPUT_LIMIT);
            }
            if let Ok((_, request)) = read_request(&m) {
                assert!(request.code.len() + request.stdin.len() <= REQUEST_CAPACITY);
                assert!(request.output_limit <= MAX_OUTPUT_LIMIT);
            }
        }
    }

    #[test]
    fn entropy_table_round_trip_and_limits() {
        let mut m = mailbox();
        assert_eq!(read_entropy_table(&m).unwrap(), vec![]);
        let regions = [
            EntropyRegion {
                gpa: 0x10_0014,
                len: 2496,
                value: 0,
            },
            EntropyRegion {
                gpa: 0x10_0010,
                len: 0,
                value: 624,
            },
        ];
        write_entropy_table(&mut m, &regions).unwrap();
        assert_eq!(read_entropy_table(&m).unwrap(), regions);
        // Crossing a page boundary, or too many regions, is refused.
        let crossing = [EntropyRegion {
            gpa: 0x10_0ffe,
            len: 0,
            value: 1,
        }];
        write_entropy_table(&mut m, &crossing).unwrap();
        assert!(matches!(read_entropy_table(&m), Err(ProtocolError::EntropyTable(_))));
        write_u32(&mut m, header::ENTROPY_COUNT, u32::MAX);
        assert!(matches!(read_entropy_table(&m), Err(ProtocolError::EntropyTable(_))));
        // Found by fuzz/mailbox: a region in the last page of the address
        // space passed the page check through saturating arithmetic.
        let top = [EntropyRegion {
            gpa: 0xffff_ffff_ffff_f000,
            len: 4096,
            value: 0,
        }];
        write_entropy_table(&mut m, &top).unwrap();
        assert!(matches!(read_entropy_table(&m), Err(ProtocolError::EntropyTable(_))));
    }

    #[test]
    fn doorbell_bytes() {
        assert_eq!(Doorbell::from_byte(1), Some(Doorbell::Ready));
        assert_eq!(Doorbell::from_byte(2), Some(Doorbell::Result));
        assert_eq!(Doorbell::from_byte(0xff), None);
    }
}
