//! The exec vocabulary: what a sandbox is asked to run ([`Request`]), the
//! output it sends while running ([`Chunk`]), what it answers
//! ([`Outcome`]), and how a guest can fail a request ([`GuestFault`]).
//!
//! One set of types from the mailbox to the HTTP API: the engine
//! (`Machine::exec`), the worker frames (`zeroboot-sandbox`) and the server
//! all use these unchanged, so a field added here reaches every layer.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{ProtocolError, DEFAULT_OUTPUT_LIMIT};

/// What the host asks the agent to run. How long the host waits for the
/// answer is not part of it: the guest never sees a deadline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub code: Vec<u8>,
    pub stdin: Vec<u8>,
    /// Cap on each of stdout and stderr; beyond it output is dropped and the
    /// stream is marked truncated.
    pub output_limit: u32,
    /// Send output while the code runs (see [`crate::REQUEST_STREAM`]), not
    /// only at the end.
    pub stream: bool,
}

impl Request {
    /// A request with the default output limit, not streamed.
    pub fn new(code: impl Into<Vec<u8>>, stdin: impl Into<Vec<u8>>) -> Self {
        Self {
            code: code.into(),
            stdin: stdin.into(),
            output_limit: DEFAULT_OUTPUT_LIMIT,
            stream: false,
        }
    }
}

/// Output that arrived while the code runs (a streamed request only).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// What the agent answered: the whole of the output, capped per stream.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub exit_code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
}

/// Why a guest did not answer a request: its code's doing (or a hostile
/// guest's), never the host's. A sandbox that faulted cannot take another
/// request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum GuestFault {
    #[error("the guest did not finish within {0:?}")]
    Timeout(Duration),
    #[error("the guest reset itself (kernel panic or reboot); see the console log")]
    Reset,
    #[error("the guest triple-faulted at rip {rip:#x}")]
    TripleFault { rip: u64 },
    /// The guest wrote something the protocol does not allow into the
    /// mailbox or the doorbell.
    #[error("the guest broke the mailbox protocol: {0}")]
    Protocol(ProtocolError),
}

impl GuestFault {
    /// The timeout, if the guest ran out of time.
    pub fn timed_out(&self) -> bool {
        matches!(self, Self::Timeout(_))
    }
}
