//! Request and response bodies. `/v1/exec` and `/v1/exec/batch` accept what
//! the public zeroboot clients send (`code`, `language`, `timeout_seconds`)
//! and return their fields plus ours (`timed_out`, `truncated`, `template`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use crate::sessions::SessionInfo;

fn python() -> String {
    "python".into()
}

fn thirty() -> f64 {
    30.0
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ExecRequest {
    pub code: String,
    /// `python`, `node` (or `javascript`, `js`) or `bash` (or `shell`,
    /// `sh`): the first template of that runtime the server was given runs
    /// the code. An unknown one is a 400 listing those available.
    #[serde(default = "python")]
    pub language: String,
    #[serde(default = "thirty")]
    pub timeout_seconds: f64,
    /// Standard input for the code.
    #[serde(default)]
    pub stdin: String,
    /// A template by name, instead of the one serving `language` (which is
    /// then not consulted).
    #[serde(default)]
    pub template: Option<String>,
    /// Answer with Server-Sent Events while the code runs (as does
    /// `Accept: text/event-stream`).
    #[serde(default)]
    pub stream: bool,
}

impl ExecRequest {
    /// A request for a long-lived sandbox, which already has its template.
    pub fn in_sandbox(code: String, timeout_seconds: f64, stdin: String) -> Self {
        Self {
            code,
            language: String::new(),
            timeout_seconds,
            stdin,
            template: None,
            stream: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct ExecResponse {
    pub id: String,
    pub stdout: String,
    pub stderr: String,
    pub exit_code: i32,
    pub fork_time_ms: f64,
    pub exec_time_ms: f64,
    pub total_time_ms: f64,
    pub timed_out: bool,
    /// stdout or stderr was cut at the output limit.
    pub truncated: bool,
    pub template: String,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct BatchRequest {
    pub executions: Vec<ExecRequest>,
}

/// One batch entry: a result, or the error that request alone got.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(untagged)]
pub enum BatchEntry {
    Ok(ExecResponse),
    Err { error: ErrorBody },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct BatchResponse {
    pub results: Vec<BatchEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct TemplateHealth {
    pub name: String,
    /// The runtime's canonical language (python, node, bash).
    pub language: String,
    /// Every `language` value this template serves (`javascript` too for node).
    pub languages: Vec<String>,
    pub ready: bool,
    pub memory_mib: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Health {
    pub status: String,
    pub templates: Vec<TemplateHealth>,
    pub live_sandboxes: u64,
    pub max_concurrent: usize,
}

/// Every error: `{"error": {"code", "message"}}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct ErrorResponse {
    pub error: ErrorBody,
}

fn default_language() -> String {
    "python".into()
}

fn one() -> usize {
    1
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct CreateSandbox {
    /// As in `ExecRequest`: picks the template by runtime.
    #[serde(default = "default_language")]
    pub language: String,
    #[serde(default)]
    pub template: Option<String>,
    /// Idle seconds after which the sandbox is removed (default 300).
    #[serde(default)]
    pub ttl_seconds: Option<f64>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct SandboxExec {
    pub code: String,
    #[serde(default = "thirty")]
    pub timeout_seconds: f64,
    #[serde(default)]
    pub stdin: String,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ForkSandbox {
    /// New sandboxes to make (1 to 16).
    #[serde(default = "one")]
    pub count: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct SandboxList {
    pub sandboxes: Vec<SessionInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Forked {
    pub sandboxes: Vec<SessionInfo>,
    /// Capture of the parent plus every child's VM.
    pub fork_time_ms: f64,
    /// Guest memory the parent had changed since its own fork, copied into each child.
    pub parent_changed_kib: u64,
}
