//! Decodes a snapshot state file: magic, version, CRC, length, bincode.
//! Whatever the bytes, decoding returns an error or a state, never panics
//! or allocates without bound.
//!   cargo +nightly fuzz run snapshot_state
#![no_main]

use libfuzzer_sys::fuzz_target;
use zeroboot_vmm::snapshot::codec;

fuzz_target!(|data: &[u8]| {
    let _ = codec::decode(data);
    // Also past the checksum: a valid header around arbitrary payload.
    if let Ok(payload_len) = u64::try_from(data.len()) {
        let mut framed = Vec::with_capacity(data.len() + 24);
        framed.extend_from_slice(b"ZBSNAP\0\0");
        framed.extend_from_slice(&codec::FORMAT_VERSION.to_le_bytes());
        framed.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
        framed.extend_from_slice(&payload_len.to_le_bytes());
        framed.extend_from_slice(data);
        let _ = codec::decode(&framed);
    }
});
