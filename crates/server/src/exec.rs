//! One-shot executions: `/v1/exec` (JSON or Server-Sent Events) and
//! `/v1/exec/batch`, each in a new sandbox. They accept what the public
//! zeroboot clients send (`code`, `language`, `timeout_seconds`) and return
//! their fields plus ours (`timed_out`, `truncated`, `template`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde::{Deserialize, Serialize};
use tokio::sync::OwnedSemaphorePermit;
use utoipa::ToSchema;
use zeroboot_protocol::{Chunk, Context};

use crate::error::{ApiError, ErrorBody};
use crate::served::Served;
use crate::state::AppState;

fn python() -> String {
    "python".into()
}

pub(crate) fn thirty() -> f64 {
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
    /// What the code may reach over the network (default: the template's
    /// policy, and without one nothing).
    #[serde(default)]
    pub network: Option<crate::network::NetworkRequest>,
    #[serde(flatten)]
    pub context: RunContext,
}

/// Where code runs, what environment it sees and who it runs as: for one
/// run, for every call of a session (and its forks), or for one call of a
/// session, over the session's. The guest puts back what a call changed.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct RunContext {
    /// Environment variables. Names are a letter or `_` followed by
    /// letters, digits and `_`.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (default `/home/user`). One that does not exist
    /// fails the run with exit code 1 and says so on stderr.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Who the code runs as: `user` (uid 1000, home /home/user; the
    /// default) or `root`.
    #[serde(default)]
    pub user: Option<String>,
}

impl RunContext {
    /// As the guest gets it.
    pub fn to_guest(&self) -> Context {
        Context {
            cwd: self.cwd.clone(),
            env: self.env.clone(),
            user: self.user.clone(),
        }
    }
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
            network: None,
            context: RunContext::default(),
        }
    }

    /// Its working directory, user and environment, as the guest gets them.
    pub fn context(&self) -> Context {
        self.context.to_guest()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct ExecResponse {
    pub id: String,
    /// As text: bytes that are not UTF-8 become U+FFFD here, and the exact
    /// bytes are in `stdout_base64`.
    pub stdout: String,
    pub stderr: String,
    /// The stream's exact bytes, base64, only where they are not valid
    /// UTF-8 (binary output, `sys.stdout.buffer`, a `Buffer`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout_base64: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr_base64: Option<String>,
    pub exit_code: i32,
    pub fork_time_ms: f64,
    pub exec_time_ms: f64,
    pub total_time_ms: f64,
    pub timed_out: bool,
    /// stdout, stderr or results were cut at the output limit.
    pub truncated: bool,
    pub template: String,
    /// Rich results, as Jupyter gives them (Python: the value of the last
    /// expression, then what the code displayed and the matplotlib figures
    /// it left open); empty in the other runtimes.
    #[serde(default)]
    pub results: Vec<RichResult>,
}

/// One rich result: `execute_result` (the value of the code's last
/// expression) or `display_data` (`display(x)`, a figure), with its
/// representations by MIME type: `text/plain` always, `text/html`,
/// `image/png` (base64), `application/json`, ... where the object has them;
/// or `error` (`name`, `value`, `traceback`), for code run as a notebook
/// cell (the E2B code interpreter's).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct RichResult {
    #[serde(rename = "type")]
    pub kind: String,
    #[schema(value_type = Object)]
    pub data: serde_json::Map<String, serde_json::Value>,
}

impl RichResult {
    /// The results in what the guest sent (one JSON object a line); a line
    /// that is not a result, which only a broken or hostile guest sends, is
    /// left out.
    pub fn parse_lines(bytes: &[u8]) -> Vec<Self> {
        bytes
            .split(|&b| b == b'\n')
            .filter_map(|line| serde_json::from_slice::<Self>(line).ok())
            .filter(|r| matches!(r.kind.as_str(), "execute_result" | "display_data" | "error"))
            .collect()
    }
}

/// Rich results as a stream delivers them: JSON lines, which a chunk may
/// cut; each whole line comes out once.
#[derive(Debug, Default)]
pub(crate) struct ResultLines {
    partial: Vec<u8>,
}

impl ResultLines {
    /// The results that `bytes` completes.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<RichResult> {
        self.partial.extend_from_slice(bytes);
        match self.partial.iter().rposition(|&b| b == b'\n') {
            Some(end) => {
                let complete: Vec<u8> = self.partial.drain(..=end).collect();
                RichResult::parse_lines(&complete)
            }
            None => Vec::new(),
        }
    }
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
pub struct BatchResponse {
    pub results: Vec<BatchEntry>,
}

impl AppState {
    /// Validates, waits for a slot, then forks and runs on a blocking thread.
    pub async fn execute(self: &Arc<Self>, req: ExecRequest) -> Result<ExecResponse, ApiError> {
        let (timeout, served, permit) = self.admit(&req).await?;
        let state = self.clone();
        let output_limit = self.limits.max_output_bytes;
        let outcome = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            state.run_blocking(&served, &req, timeout, output_limit, &mut |_| {})
        })
        .await
        .map_err(ApiError::internal)?;
        self.count(&outcome);
        outcome
    }

    /// [`AppState::execute`] as Server-Sent Events: `stdout` and `stderr`
    /// events (`{"data": text}`) as the guest writes, `display` events (a
    /// [`RichResult`]) as it displays, then one `result` event (the usual
    /// response, every result included) or `error` event. Errors found before the
    /// sandbox starts are ordinary JSON errors.
    pub async fn execute_streaming(self: &Arc<Self>, mut req: ExecRequest) -> Result<Response, ApiError> {
        use axum::response::sse::{Event, KeepAlive, Sse};
        req.stream = true;
        let (timeout, served, permit) = self.admit(&req).await?;
        let state = self.clone();
        let output_limit = self.limits.max_output_bytes;
        let (tx, rx) = tokio::sync::mpsc::channel::<Event>(256);
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let event = |name: &str, bytes: &[u8]| {
                let mut data = serde_json::json!({"data": String::from_utf8_lossy(bytes)});
                if std::str::from_utf8(bytes).is_err() {
                    data["data_base64"] = BASE64.encode(bytes).into();
                }
                Event::default().event(name).json_data(data)
            };
            let mut results = ResultLines::default();
            let mut on_chunk = |chunk: Chunk| {
                // A client that went away stops reading; the code still ends
                // at its deadline and the sandbox is released.
                for (name, text) in [("stdout", &chunk.stdout), ("stderr", &chunk.stderr)] {
                    if !text.is_empty() {
                        if let Ok(e) = event(name, text) {
                            let _ = tx.blocking_send(e);
                        }
                    }
                }
                for result in results.push(&chunk.results) {
                    if let Ok(e) = Event::default().event("display").json_data(&result) {
                        let _ = tx.blocking_send(e);
                    }
                }
            };
            let outcome = state.run_blocking(&served, &req, timeout, output_limit, &mut on_chunk);
            state.count(&outcome);
            let last = match outcome {
                Ok(r) => Event::default().event("result").json_data(&r),
                Err(e) => Event::default()
                    .event("error")
                    .json_data(serde_json::json!({"error": {"code": e.code, "message": e.message}})),
            };
            if let Ok(e) = last {
                let _ = tx.blocking_send(e);
            }
        });
        let events = tokio_stream::StreamExt::map(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            Ok::<_, std::convert::Infallible>,
        );
        Ok(Sse::new(events).keep_alive(KeepAlive::default()).into_response())
    }
}

/// Forks a new sandbox from a template, runs `code` in it and returns the result.
/// With `stream: true` or `Accept: text/event-stream` the answer is Server-Sent
/// Events: `stdout`/`stderr` events (`{"data": text}`), then `result` or `error`.
#[utoipa::path(post, path = "/v1/exec", tag = "exec", request_body = ExecRequest,
    responses(
        (status = 200, description = "The code ran (whatever its exit code) or timed out", body = ExecResponse),
        (status = 400, description = "Bad language, template, timeout, env, cwd or JSON", body = crate::error::ErrorResponse),
        (status = 401, description = "No valid API key", body = crate::error::ErrorResponse),
        (status = 413, description = "Body or code too large", body = crate::error::ErrorResponse),
        (status = 422, description = "The code crashed its sandbox", body = crate::error::ErrorResponse),
        (status = 429, description = "Over the key's rate", body = crate::error::ErrorResponse),
        (status = 503, description = "Every sandbox slot stayed busy", body = crate::error::ErrorResponse),
    ),
    security(("bearer" = [])))]
pub(crate) async fn exec(
    State(state): State<Arc<AppState>>,
    headers: axum::http::HeaderMap,
    body: Result<Json<ExecRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body?;
    let accepts_events = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    if req.stream || accepts_events {
        return state.execute_streaming(req).await;
    }
    Ok(Json(state.execute(req).await?).into_response())
}

/// Runs several executions in parallel, each in its own new sandbox.
#[utoipa::path(post, path = "/v1/exec/batch", tag = "exec", request_body = BatchRequest,
    responses(
        (status = 200, description = "One entry per execution: a result or that execution's error", body = BatchResponse),
        (status = 400, description = "Too many executions or bad JSON", body = crate::error::ErrorResponse),
    ),
    security(("bearer" = [])))]
pub(crate) async fn exec_batch(
    State(state): State<Arc<AppState>>,
    body: Result<Json<BatchRequest>, JsonRejection>,
) -> Result<Json<BatchResponse>, ApiError> {
    let Json(batch) = body?;
    if batch.executions.len() > state.limits.max_batch {
        return Err(ApiError::bad_request(
            "batch_too_large",
            format!(
                "{} executions, at most {} in one batch",
                batch.executions.len(),
                state.limits.max_batch
            ),
        ));
    }
    let tasks: Vec<_> = batch
        .executions
        .into_iter()
        .map(|req| {
            let state = state.clone();
            tokio::spawn(async move { state.execute(req).await })
        })
        .collect();
    let mut results = Vec::with_capacity(tasks.len());
    for task in tasks {
        let entry = match task.await.map_err(ApiError::internal).and_then(|r| r) {
            Ok(r) => BatchEntry::Ok(r),
            Err(e) => BatchEntry::Err {
                error: ErrorBody {
                    code: e.code.to_string(),
                    message: e.message,
                },
            },
        };
        results.push(entry);
    }
    Ok(Json(BatchResponse { results }))
}

impl AppState {
    /// What a one-shot execution needs before it may fork: its deadline and
    /// template (or a 4xx), then a sandbox slot (or a 503).
    async fn admit(&self, req: &ExecRequest) -> Result<(Duration, Arc<Served>, OwnedSemaphorePermit), ApiError> {
        let timeout = self.validate(&req.code, &req.stdin, req.timeout_seconds)?;
        self.validate_context(&req.context(), req.code.len() + req.stdin.len())?;
        let served = self.resolve(&req.language, req.template.as_ref())?;
        self.network.config_for(served.network(req.network.as_ref()))?;
        Ok((timeout, served, self.slot().await?))
    }
}

#[cfg(test)]
mod tests {
    use super::RichResult;

    #[test]
    fn results_are_read_line_by_line_and_garbage_is_left_out() {
        let lines = b"{\"type\": \"execute_result\", \"data\": {\"text/plain\": \"42\"}}\n\
            not json\n\
            {\"type\": \"rm -rf\", \"data\": {}}\n\
            {\"type\": \"display_data\"}\n\
            \xff\xfe\n\
            {\"type\": \"display_data\", \"data\": {\"image/png\": \"iVBO\", \"text/plain\": \"<Figure>\"}}";
        let results = RichResult::parse_lines(lines);
        let kinds: Vec<&str> = results.iter().map(|r| r.kind.as_str()).collect();
        assert_eq!(kinds, ["execute_result", "display_data"]);
        assert_eq!(results[0].data["text/plain"], "42");
        assert_eq!(results[1].data["image/png"], "iVBO");
        assert!(RichResult::parse_lines(b"").is_empty());
    }

    #[test]
    fn a_result_cut_between_chunks_comes_out_once_whole() {
        let mut lines = super::ResultLines::default();
        assert!(lines.push(b"{\"type\": \"display_data\", \"da").is_empty());
        let whole = lines.push(b"ta\": {\"text/plain\": \"1\"}}\n{\"type\": ");
        assert_eq!(whole.len(), 1);
        assert_eq!(whole[0].data["text/plain"], "1");
        assert!(lines.push(b"").is_empty());
    }
}
