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
pub const FORMAT_VERSION: u32 = 6;
pub const HEADER_LEN: usize = 24;
/// A real state is tens of KiB; anything near this is not ours.
pub const MAX_PAYLOAD: u64 = 4 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("file is {0} bytes, shorter than the {HEADER_LEN}-byte header: truncated or not a zeroboot snapshot")]
    TooShort(usize),
    #[error("not a zeroboot snapshot (bad magic)")]
    BadMagic,
    #[error(
        "format version {found}, this zeroboot reads version {reads}: made by another zeroboot (rebuild the template)"
    )]
    Version { found: u32, reads: u32 },
    #[error("payload claims {found} bytes, more than the {limit}-byte limit")]
    TooLarge { found: u64, limit: u64 },
    #[error("payload is {actual} bytes but the header says {expected}: truncated")]
    Truncated { expected: u64, actual: u64 },
    #[error("checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): the file is corrupt")]
    Checksum { stored: u32, computed: u32 },
    #[error("cannot decode the state: {0}")]
    Decode(String),
    #[error("cannot encode the state: {0}")]
    Encode(String),
}

fn options(limit: u64) -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .reject_trailing_bytes()
        .with_limit(limit)
}

/// A container's header and limits: the state file's, or another file in
/// the same shape (a paused sandbox's, [`super::live`]).
pub(crate) struct Container {
    pub magic: [u8; 8],
    pub version: u32,
    pub max_payload: u64,
}

pub(crate) const STATE: Container = Container {
    magic: MAGIC,
    version: FORMAT_VERSION,
    max_payload: MAX_PAYLOAD,
};

pub fn encode(state: &MachineState) -> Result<Vec<u8>, CodecError> {
    encode_in(&STATE, state)
}

pub fn decode(bytes: &[u8]) -> Result<MachineState, CodecError> {
    decode_in(&STATE, bytes)
}

pub(crate) fn encode_in<T: serde::Serialize>(container: &Container, value: &T) -> Result<Vec<u8>, CodecError> {
    let payload = options(container.max_payload)
        .serialize(value)
        .map_err(|e| CodecError::Encode(e.to_string()))?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&container.magic);
    out.extend_from_slice(&container.version.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

pub(crate) fn decode_in<T: serde::de::DeserializeOwned>(container: &Container, bytes: &[u8]) -> Result<T, CodecError> {
    if bytes.len() < HEADER_LEN {
        return Err(CodecError::TooShort(bytes.len()));
    }
    if bytes[..8] != container.magic {
        return Err(CodecError::BadMagic);
    }
    let word = |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let version = word(8);
    if version != container.version {
        return Err(CodecError::Version {
            found: version,
            reads: container.version,
        });
    }
    let stored = word(12);
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[16..24]);
    let expected = u64::from_le_bytes(len);
    if expected > container.max_payload {
        return Err(CodecError::TooLarge {
            found: expected,
            limit: container.max_payload,
        });
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
    // Nothing in the payload can claim more than the payload holds.
    options(expected)
        .deserialize(payload)
        .map_err(|e| CodecError::Decode(e.to_string()))
}
