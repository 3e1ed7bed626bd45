//! A live snapshot on disk ([`LiveSnapshot`]: a paused sandbox): the same
//! container as the state file (magic, version, CRC32, length, bincode),
//! holding the machine state and the pages the sandbox changed since its
//! fork. Untrusted like any snapshot: checked before a byte is decoded, and
//! the pages are checked against guest RAM again when a VM is made from it.

use std::path::Path;

use super::codec::{self, CodecError, Container};
use super::{io_err, MachineState, SnapshotError};
use crate::machine::LiveSnapshot;

const LIVE: Container = Container {
    magic: *b"ZBLIVE\0\0",
    version: 1,
    // The state plus every page of the largest guest RAM a layout allows.
    max_payload: 64 << 30,
};

#[derive(serde::Serialize)]
struct Borrowed<'a> {
    state: &'a MachineState,
    pages: &'a [(u64, Vec<u8>)],
}

#[derive(serde::Deserialize)]
struct Owned {
    state: Box<MachineState>,
    pages: Vec<(u64, Vec<u8>)>,
}

pub fn encode(live: &LiveSnapshot) -> Result<Vec<u8>, CodecError> {
    codec::encode_in(
        &LIVE,
        &Borrowed {
            state: &live.state,
            pages: &live.pages,
        },
    )
}

pub fn decode(bytes: &[u8]) -> Result<LiveSnapshot, CodecError> {
    let owned: Owned = codec::decode_in(&LIVE, bytes)?;
    Ok(LiveSnapshot::from_parts(owned.state, owned.pages))
}

/// Writes `live` to `path` through a temporary file beside it and a rename:
/// a crash leaves the old file or none, never half of one.
pub fn write(path: &Path, live: &LiveSnapshot) -> Result<(), SnapshotError> {
    let bytes = encode(live).map_err(|source| SnapshotError::Codec {
        path: path.to_path_buf(),
        source,
    })?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

pub fn read(path: &Path) -> Result<LiveSnapshot, SnapshotError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    decode(&bytes).map_err(|source| SnapshotError::Codec {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> LiveSnapshot {
        LiveSnapshot::from_parts(
            Box::new(crate::snapshot::tests::sample_state()),
            vec![(0x1000, vec![7u8; 4096])],
        )
    }

    #[test]
    fn round_trips_and_refuses_damage() {
        let bytes = encode(&sample()).unwrap();
        let back = decode(&bytes).unwrap();
        assert_eq!(back.pages(), sample().pages());
        assert_eq!(
            codec::encode(back.state()).unwrap(),
            codec::encode(sample().state()).unwrap()
        );
        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(matches!(decode(&flipped), Err(CodecError::Checksum { .. })));
        assert!(matches!(
            decode(&bytes[..bytes.len() - 10]),
            Err(CodecError::Truncated { .. })
        ));
        // A template's state file is not a paused sandbox.
        let state = codec::encode(sample().state()).unwrap();
        assert!(matches!(decode(&state), Err(CodecError::BadMagic)));
    }
}
