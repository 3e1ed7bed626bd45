//! The state file container: a fixed header, then the bincode-encoded
//! [`MachineState`]. A snapshot is untrusted input: the magic, version, length
//! and CRC are checked before a byte of the payload is decoded, and decoding is
//! bounded.
//!
//! ```text
//! 0   8  magic "ZBSNAP\0\0"
//! 8   4  format version (LE)
//! 12  4  CRC32 of the payload (LE)
//! 16  8  payload length (LE)
//! 24  …  payload
//! ```

use bincode::Options;

use super::state::MachineState;

pub const MAGIC: [u8; 8] = *b"ZBSNAP\0\0";
pub const FORMAT_VERSION: u32 = 5;
pub const HEADER_LEN: usize = 24;
/// A real state is tens of KiB; anything near this is not ours.
pub const MAX_PAYLOAD: u64 = 4 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("file is {0} bytes, shorter than the {HEADER_LEN}-byte header: truncated or not a zeroboot snapshot")]
    TooShort(usize),
    #[error("not a zeroboot snapshot (bad magic)")]
    BadMagic,
    #[error("snapshot format version {found}, this zeroboot reads version {FORMAT_VERSION}: rebuild the template")]
    Version { found: u32 },
    #[error("payload claims {0} bytes, more than the {MAX_PAYLOAD}-byte limit")]
    TooLarge(u64),
    #[error("payload is {actual} bytes but the header says {expected}: truncated")]
    Truncated { expected: u64, actual: u64 },
    #[error("checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): the file is corrupt")]
    Checksum { stored: u32, computed: u32 },
    #[error("cannot decode the state: {0}")]
    Decode(String),
    #[error("cannot encode the state: {0}")]
    Encode(String),
}

fn options() -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .reject_trailing_bytes()
        .with_limit(MAX_PAYLOAD)
}

pub fn encode(state: &MachineState) -> Result<Vec<u8>, CodecError> {
    let payload = options()
        .serialize(state)
        .map_err(|e| CodecError::Encode(e.to_string()))?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

pub fn decode(bytes: &[u8]) -> Result<MachineState, CodecError> {
    if bytes.len() < HEADER_LEN {
        return Err(CodecError::TooShort(bytes.len()));
    }
    if bytes[..8] != MAGIC {
        return Err(CodecError::BadMagic);
    }
    let word = |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let version = word(8);
    if version != FORMAT_VERSION {
        return Err(CodecError::Version { found: version });
    }
    let stored = word(12);
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[16..24]);
    let expected = u64::from_le_bytes(len);
    if expected > MAX_PAYLOAD {
        return Err(CodecError::TooLarge(expected));
    }
    let payload = &bytes[HEADER_LEN..];
    if payload.len() as u64 != expected {
        return Err(CodecError::Truncated {
            expected,
            actual: payload.len() as u64,
        });
    }
    let computed = crc32fast::hash(payload);
    if computed != stored {
        return Err(CodecError::Checksum { stored, computed });
    }
    options()
        .deserialize(payload)
        .map_err(|e| CodecError::Decode(e.to_string()))
}
