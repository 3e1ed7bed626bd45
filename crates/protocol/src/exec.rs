//! The exec vocabulary: what a sandbox is asked to run ([`Request`]), the
//! output it sends while running ([`Chunk`]), what it answers
//! ([`Outcome`]), and how a guest can fail a request ([`GuestFault`]).
//!
//! One set of types from the mailbox to the HTTP API: the engine
//! (`Machine::exec`), the worker frames (`zeroboot-sandbox`) and the server
//! all use these unchanged, so a field added here reaches every layer.

use std::collections::BTreeMap;
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
    /// Working directory and environment for this request only.
    #[serde(default)]
    pub context: Context,
}

/// Where the code of one request runs and what environment it sees, over
/// the sandbox's own; the agent puts back what it changed when the request
/// ends. Empty (the default) costs the guest nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Context {
    // No `skip_serializing_if`: the worker frames are bincode, which has
    // no field names to skip by.
    /// Working directory; `None` keeps the sandbox's current one.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Environment variables to set.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Who the code runs as: [`USER`] (the default) or [`ROOT`].
    #[serde(default)]
    pub user: Option<String>,
}

/// The unprivileged user code runs as unless a request asks for root
/// (`user`, uid 1000, home /home/user), as in E2B's sandboxes.
pub const USER: &str = "user";
/// [`USER`]'s uid and gid (the agents' `USER_UID`, `ZB_USER_UID`).
pub const USER_UID: u32 = 1000;
/// The guest's root.
pub const ROOT: &str = "root";

/// Why a [`Context`] cannot be sent to a guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ContextError {
    #[error("environment variable name {0:?} is not a letter or _ followed by letters, digits and _")]
    EnvName(String),
    #[error("environment variable {0} has a NUL byte in its value")]
    EnvValue(String),
    #[error("cwd is empty or has a NUL byte")]
    Cwd,
    #[error("user {0:?} is neither \"user\" nor \"root\"")]
    User(String),
}

impl Context {
    pub fn is_empty(&self) -> bool {
        self.cwd.is_none() && self.env.is_empty() && self.user.is_none()
    }

    /// The names a shell can export, values and a path a C string can hold.
    pub fn validate(&self) -> Result<(), ContextError> {
        if let Some(cwd) = &self.cwd {
            if cwd.is_empty() || cwd.contains('\0') {
                return Err(ContextError::Cwd);
            }
        }
        if let Some(user) = &self.user {
            if user != USER && user != ROOT {
                return Err(ContextError::User(user.clone()));
            }
        }
        for (name, value) in &self.env {
            let mut chars = name.chars();
            let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
            if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(ContextError::EnvName(name.clone()));
            }
            if value.contains('\0') {
                return Err(ContextError::EnvValue(name.clone()));
            }
        }
        Ok(())
    }

    /// `other`'s working directory and variables over this one's.
    pub fn overlaid_with(&self, other: &Context) -> Context {
        let mut env = self.env.clone();
        env.extend(other.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        Context {
            cwd: other.cwd.clone().or_else(|| self.cwd.clone()),
            env,
            user: other.user.clone().or_else(|| self.user.clone()),
        }
    }

    /// The mailbox encoding (see [`crate::header::CONTEXT_LEN`]): nothing
    /// for an empty context, else NUL-terminated records: the working
    /// directory (empty: unchanged), the user (empty: the sandbox's
    /// default), then one `NAME=value` per variable.
    pub fn encode(&self) -> Vec<u8> {
        if self.is_empty() {
            return Vec::new();
        }
        let mut out = Vec::new();
        out.extend_from_slice(self.cwd.as_deref().unwrap_or("").as_bytes());
        out.push(0);
        out.extend_from_slice(self.user.as_deref().unwrap_or("").as_bytes());
        out.push(0);
        for (name, value) in &self.env {
            out.extend_from_slice(name.as_bytes());
            out.push(b'=');
            out.extend_from_slice(value.as_bytes());
            out.push(0);
        }
        out
    }

    /// The inverse of [`Context::encode`], for tests and Rust agents.
    pub fn decode(bytes: &[u8]) -> Result<Self, ProtocolError> {
        let bad = |why: &str| ProtocolError::BadContext(why.to_string());
        if bytes.is_empty() {
            return Ok(Self::default());
        }
        let body = bytes.strip_suffix(&[0]).ok_or_else(|| bad("does not end with NUL"))?;
        let mut records = body.split(|&b| b == 0);
        let text = |r: &[u8]| String::from_utf8(r.to_vec()).map_err(|_| bad("not UTF-8"));
        let cwd = records.next().map(text).transpose()?.filter(|c| !c.is_empty());
        let user = records.next().ok_or_else(|| bad("no user record")).and_then(text)?;
        let user = Some(user).filter(|u| !u.is_empty());
        let mut env = BTreeMap::new();
        for record in records {
            let record = text(record)?;
            let (name, value) = record.split_once('=').ok_or_else(|| bad("a variable without ="))?;
            env.insert(name.to_string(), value.to_string());
        }
        let context = Self { cwd, env, user };
        context
            .validate()
            .map_err(|e| ProtocolError::BadContext(e.to_string()))?;
        Ok(context)
    }
}

impl Request {
    /// A request with the default output limit, not streamed.
    pub fn new(code: impl Into<Vec<u8>>, stdin: impl Into<Vec<u8>>) -> Self {
        Self {
            code: code.into(),
            stdin: stdin.into(),
            output_limit: DEFAULT_OUTPUT_LIMIT,
            stream: false,
            context: Context::default(),
        }
    }
}

/// Output that arrived while the code runs (a streamed request only).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Rich results displayed since the last chunk (see [`Outcome::results`]).
    pub results: Vec<u8>,
}

/// What the agent answered: the whole of the output, capped per stream.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub exit_code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Rich results, as Jupyter gives them: one JSON object a line,
    /// `{"type": "execute_result" | "display_data", "data": {MIME type:
    /// value}}`, images base64. The value of the code's last expression and
    /// whatever it displayed (Python; other runtimes send none). Written by
    /// the guest: whoever parses it must expect anything.
    pub results: Vec<u8>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    /// Results past the output limit were dropped.
    pub results_truncated: bool,
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
