//! Frames between the host and a worker process, over the worker's stdin
//! (commands) and stdout (replies): a little-endian `u32` length, then the
//! bincode encoding of a [`Command`] or [`Reply`].

use std::io::{Read, Write};

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use zeroboot_protocol::files::{FileReply, FileRequest};
use zeroboot_protocol::{Chunk, GuestFault, Outcome, Request};
use zeroboot_vmm::snapshot::{codec, CodecError};
use zeroboot_vmm::{ForkMemory, LiveSnapshot};

/// Largest frame either side accepts. The largest frames are live snapshots,
/// which hold at most a sandbox's guest RAM.
pub const MAX_FRAME: u32 = 1 << 31;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("the pipe failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the other side closed the pipe")]
    Closed,
    #[error("a frame of {0} bytes is over the {MAX_FRAME}-byte limit")]
    TooLarge(u64),
    #[error("a frame does not decode: {0}")]
    Decode(#[from] bincode::Error),
}

use zeroboot_net::NetConfig;

#[derive(Debug, Serialize, Deserialize)]
pub enum Command {
    /// Make the VM ahead of time, from the template or from a live snapshot
    /// of one of its forks. Must come first, once.
    Prepare {
        live: Option<LiveParts>,
        /// How the VM's guest memory is backed.
        fork_memory: ForkMemory,
        /// Whether Start may bring a network. A worker without one installs
        /// its (stricter) seccomp filter while it waits, outside the time
        /// a fork takes; one with a network installs it after Start, once
        /// the backend's thread is running.
        network: bool,
        /// Code the template answers (its runtime's print probe), to run in
        /// the VM and rewind before Start (vmm's `Template::prepare`);
        /// empty for none.
        probes: Vec<Vec<u8>>,
    },
    /// Finish the fork (fresh entropy, clock, timer): the sandbox exists
    /// now, reaching what `network` allows (nothing without one).
    Start {
        network: Option<NetConfig>,
    },
    Exec {
        request: Request,
        timeout: std::time::Duration,
    },
    SnapshotLive,
    Stats,
    /// A files-API operation, served by the agent's native half.
    File {
        request: FileRequest,
        timeout: std::time::Duration,
    },
    /// Bytes for the sandbox's disk at byte `offset` of it.
    WriteDisk {
        offset: u64,
        bytes: Vec<u8>,
    },
    /// Bytes `[offset, offset + len)` of the sandbox's disk.
    ReadDisk {
        offset: u64,
        len: u32,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    Prepared {
        /// What became of the probes Prepare gave.
        probes: zeroboot_vmm::fork::Probes,
    },
    Started,
    /// Output sent while the code runs (a streamed request only).
    Chunk(Chunk),
    Done(Outcome),
    Live(LiveParts),
    Stats(Stats),
    File(FileReply),
    Written,
    Bytes(Vec<u8>),
    Failed(Failure),
}

/// Why a command failed in the worker: the guest's doing, which the host
/// tells callers about differently, or anything else.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum Failure {
    Guest(GuestFault),
    Other(String),
}

/// A [`zeroboot_vmm::LiveSnapshot`] in transit: its state in the snapshot
/// codec, and its changed pages.
#[derive(Debug, Serialize, Deserialize)]
pub struct LiveParts {
    pub state: Vec<u8>,
    pub pages: Vec<(u64, Vec<u8>)>,
}

impl LiveParts {
    pub fn from_live(live: &LiveSnapshot) -> Result<Self, CodecError> {
        Ok(Self {
            state: codec::encode(live.state())?,
            pages: live.pages().to_vec(),
        })
    }

    /// The live snapshot again; its state is decoded with the snapshot
    /// codec's checks, and forking from it checks the pages.
    pub fn into_live(self) -> Result<LiveSnapshot, CodecError> {
        Ok(LiveSnapshot::from_parts(
            Box::new(codec::decode(&self.state)?),
            self.pages,
        ))
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stats {
    /// Guest memory the sandbox holds its own copy of.
    pub private_bytes: u64,
    /// Guest memory the host maps with 2 MiB pages.
    pub huge_mapped_bytes: u64,
    /// VM exits so far.
    pub exits: u64,
}

pub fn write_frame(out: &mut impl Write, message: &impl Serialize) -> Result<(), WireError> {
    let body = bincode::serialize(message)?;
    let len = u32::try_from(body.len())
        .ok()
        .filter(|&n| n <= MAX_FRAME)
        .ok_or(WireError::TooLarge(body.len() as u64))?;
    out.write_all(&len.to_le_bytes())?;
    out.write_all(&body)?;
    out.flush()?;
    Ok(())
}

/// Reads one frame; [`WireError::Closed`] on end of input before it starts.
pub fn read_frame<T: DeserializeOwned>(input: &mut impl Read) -> Result<T, WireError> {
    let mut len = [0u8; 4];
    match input.read_exact(&mut len) {
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(WireError::Closed),
        other => other?,
    }
    let len = frame_len(len)?;
    // Grown as bytes arrive, not allocated from the claimed length.
    let mut body = Vec::new();
    input.take(len as u64).read_to_end(&mut body)?;
    if body.len() != len {
        return Err(WireError::Io(std::io::ErrorKind::UnexpectedEof.into()));
    }
    decode(&body)
}

/// The body length a frame's 4-byte header announces, within [`MAX_FRAME`].
pub fn frame_len(header: [u8; 4]) -> Result<usize, WireError> {
    let len = u32::from_le_bytes(header);
    if len > MAX_FRAME {
        return Err(WireError::TooLarge(len.into()));
    }
    Ok(len as usize)
}

pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, WireError> {
    use bincode::Options;
    // The same limits as `bincode::deserialize`, plus a cap on what a
    // length prefix inside the frame may make it allocate.
    Ok(bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .allow_trailing_bytes()
        .with_limit(u64::from(MAX_FRAME))
        .deserialize(body)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_bad_ones_are_errors() {
        let mut buf = Vec::new();
        let request = Request {
            output_limit: 7,
            stream: true,
            ..Request::new("print(1)", "")
        };
        let cmd = Command::Exec {
            request: request.clone(),
            timeout: std::time::Duration::from_millis(5),
        };
        write_frame(&mut buf, &cmd).unwrap();
        let fault = Failure::Guest(GuestFault::Timeout(std::time::Duration::from_millis(3)));
        write_frame(&mut buf, &Reply::Failed(fault.clone())).unwrap();
        let mut input = &buf[..];
        assert!(matches!(
            read_frame::<Command>(&mut input).unwrap(),
            Command::Exec { request: r, .. } if r == request
        ));
        assert!(matches!(
            read_frame::<Reply>(&mut input).unwrap(),
            Reply::Failed(f) if f == fault
        ));
        assert!(matches!(read_frame::<Reply>(&mut input), Err(WireError::Closed)));
        // A context, present or not, survives the trip (bincode has no
        // field names: a skipped field would shift every later one).
        let mut buf = Vec::new();
        let with_context = Request {
            context: zeroboot_protocol::Context {
                cwd: Some("/tmp".into()),
                env: [("A".to_string(), "1".to_string())].into(),
                user: Some("root".into()),
            },
            ..request.clone()
        };
        for r in [&request, &with_context] {
            let cmd = Command::Exec {
                request: r.clone(),
                timeout: std::time::Duration::from_millis(5),
            };
            write_frame(&mut buf, &cmd).unwrap();
        }
        let mut input = &buf[..];
        for r in [&request, &with_context] {
            assert!(matches!(
                read_frame::<Command>(&mut input).unwrap(),
                Command::Exec { request: got, .. } if &got == r
            ));
        }
        // A length over the cap, a truncated body, and garbage.
        assert!(matches!(
            read_frame::<Reply>(&mut &u32::MAX.to_le_bytes()[..]),
            Err(WireError::TooLarge(_))
        ));
        assert!(matches!(
            read_frame::<Reply>(&mut &[9, 0, 0, 0, 1][..]),
            Err(WireError::Io(_))
        ));
        let garbage = [4u8, 0, 0, 0, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            read_frame::<Reply>(&mut &garbage[..]),
            Err(WireError::Decode(_))
        ));
    }
}
