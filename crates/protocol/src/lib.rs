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
//! The guest agent (`guest/agent/agent.py`) mirrors this layout; a change here
//! must bump [`VERSION`] and change the agent in the same commit.
//!
//! The mailbox is written by an untrusted guest, so every read of guest-written
//! fields is bounds-checked and never panics.

use thiserror::Error;

/// Size of the mailbox region in guest memory.
pub const MAILBOX_SIZE: usize = 2 << 20;
/// `"ZBMB"`, written by the host at boot.
pub const MAGIC: u32 = u32::from_le_bytes(*b"ZBMB");
/// Version of this layout. The agent refuses a mailbox of another version.
pub const VERSION: u32 = 2;

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
    /// Host → guest at boot: entropy the agent credits to the kernel CRNG.
    pub const BOOT_SEED: usize = 64;
    pub const BOOT_SEED_LEN: usize = 64;
    /// Host → guest with every request: seeds for user-space generators.
    pub const REQUEST_SEED: usize = 128;
    pub const REQUEST_SEED_LEN: usize = 64;
}

/// Request payload (code, then stdin) starts here.
pub const REQUEST_OFFSET: usize = 4096;
/// Room for code plus stdin.
pub const REQUEST_CAPACITY: usize = RESPONSE_OFFSET - REQUEST_OFFSET;
/// Response payload (stdout, then stderr) starts here.
pub const RESPONSE_OFFSET: usize = 1 << 20;
/// Room for stdout plus stderr.
pub const RESPONSE_CAPACITY: usize = MAILBOX_SIZE - RESPONSE_OFFSET;

/// `RESPONSE_FLAGS` bits.
pub const FLAG_STDOUT_TRUNCATED: u32 = 1 << 0;
pub const FLAG_STDERR_TRUNCATED: u32 = 1 << 1;

/// The byte the agent stores to the doorbell says why it rang.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("mailbox is {0} bytes, expected {MAILBOX_SIZE}")]
    MailboxSize(usize),
    #[error("request of {0} bytes does not fit the mailbox ({REQUEST_CAPACITY} bytes)")]
    RequestTooLarge(usize),
    #[error("guest answered sequence {got}, expected {expected}")]
    Sequence { expected: u32, got: u32 },
    #[error("guest reported {stdout} + {stderr} output bytes, more than the {RESPONSE_CAPACITY} the mailbox holds")]
    ResponseTooLarge { stdout: u32, stderr: u32 },
}

/// What the host asks the agent to run.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub code: &'a [u8],
    pub stdin: &'a [u8],
}

/// What the agent reports back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub exit_code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
}

fn check(mailbox: &[u8]) -> Result<(), ProtocolError> {
    if mailbox.len() == MAILBOX_SIZE {
        Ok(())
    } else {
        Err(ProtocolError::MailboxSize(mailbox.len()))
    }
}

fn read_u32(mailbox: &[u8], offset: usize) -> u32 {
    let mut bytes = [0u8; 4];
    bytes.copy_from_slice(&mailbox[offset..offset + 4]);
    u32::from_le_bytes(bytes)
}

fn write_u32(mailbox: &mut [u8], offset: usize, value: u32) {
    mailbox[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
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
    request: Request<'_>,
    seed: &[u8; header::REQUEST_SEED_LEN],
) -> Result<u32, ProtocolError> {
    check(mailbox)?;
    let total = request.code.len().saturating_add(request.stdin.len());
    if total > REQUEST_CAPACITY {
        return Err(ProtocolError::RequestTooLarge(total));
    }
    // Lengths fit in u32: both are below REQUEST_CAPACITY.
    let code_len = request.code.len() as u32;
    let stdin_len = request.stdin.len() as u32;
    let code_at = REQUEST_OFFSET;
    let stdin_at = code_at + request.code.len();
    mailbox[code_at..stdin_at].copy_from_slice(request.code);
    mailbox[stdin_at..stdin_at + request.stdin.len()].copy_from_slice(request.stdin);
    mailbox[header::REQUEST_SEED..header::REQUEST_SEED + header::REQUEST_SEED_LEN].copy_from_slice(seed);
    let seq = read_u32(mailbox, header::REQUEST_SEQ).wrapping_add(1);
    write_u32(mailbox, header::CODE_LEN, code_len);
    write_u32(mailbox, header::STDIN_LEN, stdin_len);
    write_u32(mailbox, header::REQUEST_SEQ, seq);
    Ok(seq)
}

/// Reads the response to request `seq`. Never trusts the guest's lengths.
pub fn read_response(mailbox: &[u8], seq: u32) -> Result<Response, ProtocolError> {
    check(mailbox)?;
    let got = read_u32(mailbox, header::RESPONSE_SEQ);
    if got != seq {
        return Err(ProtocolError::Sequence { expected: seq, got });
    }
    let stdout_len = read_u32(mailbox, header::STDOUT_LEN);
    let stderr_len = read_u32(mailbox, header::STDERR_LEN);
    let total = stdout_len as usize + stderr_len as usize;
    if total > RESPONSE_CAPACITY {
        return Err(ProtocolError::ResponseTooLarge {
            stdout: stdout_len,
            stderr: stderr_len,
        });
    }
    let out_end = RESPONSE_OFFSET + stdout_len as usize;
    let err_end = out_end + stderr_len as usize;
    let flags = read_u32(mailbox, header::RESPONSE_FLAGS);
    Ok(Response {
        exit_code: read_u32(mailbox, header::EXIT_CODE) as i32,
        stdout: mailbox[RESPONSE_OFFSET..out_end].to_vec(),
        stderr: mailbox[out_end..err_end].to_vec(),
        stdout_truncated: flags & FLAG_STDOUT_TRUNCATED != 0,
        stderr_truncated: flags & FLAG_STDERR_TRUNCATED != 0,
    })
}

/// The guest side of [`read_response`], used by tests and by Rust agents.
pub fn write_response(mailbox: &mut [u8], seq: u32, response: &Response) -> Result<(), ProtocolError> {
    check(mailbox)?;
    let total = response.stdout.len() + response.stderr.len();
    if total > RESPONSE_CAPACITY {
        return Err(ProtocolError::ResponseTooLarge {
            stdout: response.stdout.len() as u32,
            stderr: response.stderr.len() as u32,
        });
    }
    let out_end = RESPONSE_OFFSET + response.stdout.len();
    mailbox[RESPONSE_OFFSET..out_end].copy_from_slice(&response.stdout);
    mailbox[out_end..out_end + response.stderr.len()].copy_from_slice(&response.stderr);
    let mut flags = 0;
    if response.stdout_truncated {
        flags |= FLAG_STDOUT_TRUNCATED;
    }
    if response.stderr_truncated {
        flags |= FLAG_STDERR_TRUNCATED;
    }
    write_u32(mailbox, header::EXIT_CODE, response.exit_code as u32);
    write_u32(mailbox, header::STDOUT_LEN, response.stdout.len() as u32);
    write_u32(mailbox, header::STDERR_LEN, response.stderr.len() as u32);
    write_u32(mailbox, header::RESPONSE_FLAGS, flags);
    write_u32(mailbox, header::RESPONSE_SEQ, seq);
    Ok(())
}

/// Reads the request the host wrote (the guest side of [`write_request`]).
pub fn read_request(mailbox: &[u8]) -> Result<(u32, Vec<u8>, Vec<u8>), ProtocolError> {
    check(mailbox)?;
    let code_len = read_u32(mailbox, header::CODE_LEN) as usize;
    let stdin_len = read_u32(mailbox, header::STDIN_LEN) as usize;
    if code_len.saturating_add(stdin_len) > REQUEST_CAPACITY {
        return Err(ProtocolError::RequestTooLarge(code_len.saturating_add(stdin_len)));
    }
    let code_end = REQUEST_OFFSET + code_len;
    Ok((
        read_u32(mailbox, header::REQUEST_SEQ),
        mailbox[REQUEST_OFFSET..code_end].to_vec(),
        mailbox[code_end..code_end + stdin_len].to_vec(),
    ))
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
        let seq = write_request(
            &mut m,
            Request {
                code: b"print(1)",
                stdin: b"in",
            },
            &SEED,
        )
        .unwrap();
        assert_eq!(seq, 1);
        let (got_seq, code, stdin) = read_request(&m).unwrap();
        assert_eq!(
            (got_seq, code.as_slice(), stdin.as_slice()),
            (1, &b"print(1)"[..], &b"in"[..])
        );
        let seq2 = write_request(
            &mut m,
            Request { code: b"x", stdin: b"" },
            &[0; header::REQUEST_SEED_LEN],
        )
        .unwrap();
        assert_eq!(seq2, 2);
    }

    #[test]
    fn response_round_trip() {
        let mut m = mailbox();
        let resp = Response {
            exit_code: -3,
            stdout: b"out".to_vec(),
            stderr: b"err".to_vec(),
            stdout_truncated: true,
            stderr_truncated: false,
        };
        write_response(&mut m, 9, &resp).unwrap();
        assert_eq!(read_response(&m, 9).unwrap(), resp);
    }

    #[test]
    fn stale_response_is_rejected() {
        let m = mailbox();
        assert_eq!(
            read_response(&m, 1),
            Err(ProtocolError::Sequence { expected: 1, got: 0 })
        );
    }

    #[test]
    fn hostile_lengths_are_rejected_without_panic() {
        let mut m = mailbox();
        write_u32(&mut m, header::RESPONSE_SEQ, 5);
        write_u32(&mut m, header::STDOUT_LEN, u32::MAX);
        write_u32(&mut m, header::STDERR_LEN, u32::MAX);
        assert!(matches!(
            read_response(&m, 5),
            Err(ProtocolError::ResponseTooLarge { .. })
        ));
        write_u32(&mut m, header::CODE_LEN, u32::MAX);
        assert!(read_request(&m).is_err());
    }

    #[test]
    fn oversized_request_is_refused() {
        let mut m = mailbox();
        let big = vec![b'x'; REQUEST_CAPACITY + 1];
        assert_eq!(
            write_request(
                &mut m,
                Request { code: &big, stdin: b"" },
                &[0; header::REQUEST_SEED_LEN]
            ),
            Err(ProtocolError::RequestTooLarge(REQUEST_CAPACITY + 1))
        );
        assert!(matches!(
            write_request(
                &mut m[..10],
                Request { code: b"", stdin: b"" },
                &[0; header::REQUEST_SEED_LEN]
            ),
            Err(ProtocolError::MailboxSize(10))
        ));
    }

    #[test]
    fn doorbell_bytes() {
        assert_eq!(Doorbell::from_byte(1), Some(Doorbell::Ready));
        assert_eq!(Doorbell::from_byte(2), Some(Doorbell::Result));
        assert_eq!(Doorbell::from_byte(0xff), None);
    }
}
