//! zeroboot's HTTP API (axum on tokio), a thin layer over the synchronous
//! fork engine: every execution forks a new VM from a template and runs on a
//! blocking thread, never on an async worker.
//!
//! - [`api`]: request and response bodies.
//! - [`error`]: the one error shape, `{error: {code, message}}`.
//! - [`auth`]: API keys, the loopback rule without keys, per-key rate limits.
//! - [`metrics`]: Prometheus metrics.
//! - [`sessions`]: long-lived sandboxes, each on its own thread, and their forks.
//! - [`openapi`]: the OpenAPI 3 description, served at `/v1/openapi.json`.

pub mod api;
pub mod auth;
pub mod error;
pub mod metrics;
pub mod openapi;
pub mod sessions;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Extension, Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{middleware, Json, Router};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use zeroboot_protocol::{Chunk, GuestFault, Request, DEFAULT_OUTPUT_LIMIT, REQUEST_CAPACITY};
use zeroboot_sandbox::{IsolatedTemplate, Sandbox, SandboxError};
use zeroboot_template::runtime::FILE_NOT_FOUND;
use zeroboot_template::RuntimeDescriptor;

use crate::api::{
    BatchEntry, BatchRequest, BatchResponse, CreateSandbox, ErrorBody, ExecRequest, ExecResponse, ForkSandbox, Forked,
    Health, SandboxExec, SandboxList, TemplateHealth,
};
use crate::auth::{Auth, Caller};
use crate::error::ApiError;
use crate::metrics::{Memory, Metrics, Outcome};
use crate::sessions::{SessionInfo, Sessions};

/// What the server allows. Every limit answers with a clear error, never a hang.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Request bodies larger than this get 413.
    pub max_body_bytes: usize,
    /// `code` plus `stdin` larger than this get 413.
    pub max_code_bytes: usize,
    pub max_batch: usize,
    /// Sandboxes running at once; more requests wait up to `queue_wait`, then 503.
    pub max_concurrent: usize,
    pub queue_wait: Duration,
    pub max_timeout: Duration,
    /// Per-stream output cap.
    pub max_output_bytes: u32,
    /// Long-lived sandboxes per API key (or for loopback clients without keys).
    pub max_sandboxes_per_caller: usize,
    /// Guest RAM, in MiB, that one key's long-lived sandboxes may hold.
    pub max_sandbox_mib_per_caller: u64,
    pub default_sandbox_ttl: Duration,
    pub max_sandbox_ttl: Duration,
    /// Children one fork call may make.
    pub max_fork: usize,
}

impl Default for Limits {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            max_body_bytes: 2 << 20,
            max_code_bytes: REQUEST_CAPACITY,
            max_batch: 64,
            max_concurrent: 4 * cores,
            queue_wait: Duration::from_secs(10),
            max_timeout: Duration::from_secs(300),
            max_output_bytes: DEFAULT_OUTPUT_LIMIT,
            max_sandboxes_per_caller: 64,
            max_sandbox_mib_per_caller: 16 << 10,
            default_sandbox_ttl: Duration::from_secs(300),
            max_sandbox_ttl: Duration::from_secs(24 * 3600),
            max_fork: 16,
        }
    }
}

/// A template the server forks from.
pub struct Served {
    pub name: String,
    /// Its runtime: the `language` values it serves, and the guest code of
    /// the files API.
    pub runtime: &'static RuntimeDescriptor,
    pub template: IsolatedTemplate,
}

impl Served {
    /// Guest RAM of each sandbox forked from it.
    pub fn memory_mib(&self) -> u64 {
        self.template.snapshot().state.layout.ram_bytes >> 20
    }
}

pub struct AppState {
    templates: BTreeMap<String, Arc<Served>>,
    /// language → template name serving it.
    languages: BTreeMap<String, String>,
    limits: Limits,
    slots: Arc<Semaphore>,
    auth: Auth,
    metrics: Metrics,
    sessions: Sessions,
}

impl AppState {
    /// The first template given for a language serves it.
    pub fn new(templates: Vec<Served>, limits: Limits, auth: Auth) -> Self {
        let mut languages = BTreeMap::new();
        let mut by_name = BTreeMap::new();
        for served in templates {
            for language in served.runtime.languages {
                languages
                    .entry(language.to_string())
                    .or_insert_with(|| served.name.clone());
            }
            by_name.insert(served.name.clone(), Arc::new(served));
        }
        Self {
            templates: by_name,
            languages,
            slots: Arc::new(Semaphore::new(limits.max_concurrent)),
            sessions: Sessions::new(
                limits.max_sandboxes_per_caller,
                limits.max_sandbox_mib_per_caller,
                limits.default_sandbox_ttl,
                limits.max_sandbox_ttl,
            ),
            limits,
            auth,
            metrics: Metrics::default(),
        }
    }

    pub fn auth(&self) -> &Auth {
        &self.auth
    }

    fn resolve(&self, language: &str, template: Option<&String>) -> Result<Arc<Served>, ApiError> {
        let name = match template {
            Some(name) => name,
            None => self.languages.get(language).ok_or_else(|| {
                ApiError::bad_request(
                    "unsupported_language",
                    format!(
                        "language {language:?} is not available; available: {}",
                        self.languages.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                )
            })?,
        };
        let served = self.templates.get(name).ok_or_else(|| {
            ApiError::bad_request(
                "unknown_template",
                format!(
                    "no template {name:?}; available: {}",
                    self.templates.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            )
        })?;
        if template.is_none() && !served.runtime.languages.contains(&language) {
            return Err(ApiError::internal("language map out of sync"));
        }
        Ok(served.clone())
    }

    fn validate(&self, code: &str, stdin: &str, timeout_seconds: f64) -> Result<Duration, ApiError> {
        let size = code.len() + stdin.len();
        if size > self.limits.max_code_bytes {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "code_too_large",
                format!(
                    "code and stdin are {size} bytes, more than the {}-byte limit",
                    self.limits.max_code_bytes
                ),
            ));
        }
        let max = self.limits.max_timeout.as_secs_f64();
        if !(timeout_seconds > 0.0 && timeout_seconds <= max) {
            return Err(ApiError::bad_request(
                "invalid_timeout",
                format!("timeout_seconds must be more than 0 and at most {max}"),
            ));
        }
        Ok(Duration::from_secs_f64(timeout_seconds))
    }

    async fn slot(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        let busy = || {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                format!(
                    "all {} sandbox slots are busy; retry shortly",
                    self.limits.max_concurrent
                ),
            )
            .with_retry_after(1)
        };
        match tokio::time::timeout(self.limits.queue_wait, self.slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(busy()),
        }
    }

    /// What a one-shot execution needs before it may fork: its deadline and
    /// template (or a 4xx), then a sandbox slot (or a 503).
    async fn admit(&self, req: &ExecRequest) -> Result<(Duration, Arc<Served>, OwnedSemaphorePermit), ApiError> {
        let timeout = self.validate(&req.code, &req.stdin, req.timeout_seconds)?;
        let served = self.resolve(&req.language, req.template.as_ref())?;
        Ok((timeout, served, self.slot().await?))
    }

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
    /// events (`{"data": text}`) as the guest writes, then one `result`
    /// event (the usual response) or `error` event. Errors found before the
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
            let event = |name: &str, text: &[u8]| {
                Event::default()
                    .event(name)
                    .json_data(serde_json::json!({"data": String::from_utf8_lossy(text)}))
            };
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

    fn count(&self, outcome: &Result<ExecResponse, ApiError>) {
        let label = match outcome {
            Ok(r) if r.timed_out => "timeout",
            Ok(_) => "ok",
            Err(_) => "error",
        };
        self.metrics.executions.get_or_create(&Outcome { outcome: label }).inc();
    }

    fn run_blocking(
        &self,
        served: &Served,
        req: &ExecRequest,
        timeout: Duration,
        output_limit: u32,
        on_chunk: &mut dyn FnMut(Chunk),
    ) -> Result<ExecResponse, ApiError> {
        let started = Instant::now();
        let mut sandbox = served.template.fork().map_err(ApiError::internal)?;
        let forked = started.elapsed();
        self.metrics.live_sandboxes.inc();
        self.metrics.spawn_seconds.observe(forked.as_secs_f64());
        self.metrics
            .forks
            .get_or_create(&Memory {
                fork_memory: sandbox.fork_memory().name(),
            })
            .inc();
        let (result, _) = self.exec_on(&mut sandbox, &served.name, req, timeout, output_limit, on_chunk);
        let total = started.elapsed();
        // Kills the worker process, which takes the VM down with it.
        drop(sandbox);
        self.metrics.live_sandboxes.dec();
        match &result {
            Ok(r) => tracing::info!(
                id = %r.id,
                template = %served.name,
                exit_code = r.exit_code,
                timed_out = r.timed_out,
                fork_ms = forked.as_secs_f64() * 1e3,
                total_ms = total.as_secs_f64() * 1e3,
                "execution"
            ),
            Err(e) => tracing::info!(template = %served.name, code = e.code, "execution failed"),
        }
        self.metrics.total_seconds.observe(total.as_secs_f64());
        result.map(|mut r| {
            r.fork_time_ms = forked.as_secs_f64() * 1e3;
            r.total_time_ms = total.as_secs_f64() * 1e3;
            r
        })
    }

    /// Runs `req` in `sandbox`. The flag says whether the sandbox can take
    /// another request (not after a timeout or a crash).
    fn exec_on(
        &self,
        sandbox: &mut Sandbox,
        template: &str,
        req: &ExecRequest,
        timeout: Duration,
        output_limit: u32,
        on_chunk: &mut dyn FnMut(Chunk),
    ) -> (Result<ExecResponse, ApiError>, bool) {
        let started = Instant::now();
        let request = Request {
            output_limit,
            stream: req.stream,
            ..Request::new(req.code.as_bytes(), req.stdin.as_bytes())
        };
        let result = sandbox.exec_streaming(&request, timeout, on_chunk);
        let ran = started.elapsed();
        self.metrics.exec_seconds.observe(ran.as_secs_f64());
        let mut response = ExecResponse {
            id: execution_id(),
            stdout: String::new(),
            stderr: String::new(),
            exit_code: 0,
            fork_time_ms: 0.0,
            exec_time_ms: ran.as_secs_f64() * 1e3,
            total_time_ms: ran.as_secs_f64() * 1e3,
            timed_out: false,
            truncated: false,
            template: template.to_string(),
        };
        match result {
            Ok(r) => {
                response.stdout = String::from_utf8_lossy(&r.stdout).into_owned();
                response.stderr = String::from_utf8_lossy(&r.stderr).into_owned();
                response.exit_code = r.exit_code;
                response.truncated = r.stdout_truncated || r.stderr_truncated;
                (Ok(response), true)
            }
            Err(SandboxError::Guest(GuestFault::Timeout(_))) => {
                response.timed_out = true;
                response.exit_code = 124;
                response.stderr = format!("zeroboot: timed out after {} s\n", req.timeout_seconds);
                (Ok(response), false)
            }
            Err(SandboxError::Guest(fault)) => (
                Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "sandbox_crashed",
                    format!(
                        "{fault}: the code ended its sandbox (its agent exited, the guest kernel panicked, \
                         or the mailbox was overwritten)"
                    ),
                )),
                false,
            ),
            Err(e) => (Err(ApiError::internal(e)), false),
        }
    }

    /// Runs `req` in long-lived sandbox `id`; a sandbox that timed out or
    /// crashed is removed (its guest cannot take another request).
    async fn exec_in_session(
        self: &Arc<Self>,
        id: &str,
        caller: Caller,
        req: ExecRequest,
    ) -> Result<ExecResponse, ApiError> {
        let session = self.sessions.get(id, caller)?;
        let timeout = self.validate(&req.code, &req.stdin, req.timeout_seconds)?;
        let permit = self.slot().await?;
        let state = self.clone();
        let template = session.served.name.clone();
        let output_limit = self.limits.max_output_bytes;
        let (outcome, usable) = session
            .call(move |machine| {
                let _permit = permit;
                state.exec_on(machine, &template, &req, timeout, output_limit, &mut |_| {})
            })
            .await?;
        if !usable {
            self.sessions.forget(id);
        }
        self.count(&outcome);
        outcome
    }
}

/// A random id for an execution, for logs and clients.
fn execution_id() -> String {
    let mut bytes = [0u8; 12];
    zeroboot_vmm::machine::fill_random(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Forks a new sandbox from a template, runs `code` in it and returns the result.
/// With `stream: true` or `Accept: text/event-stream` the answer is Server-Sent
/// Events: `stdout`/`stderr` events (`{"data": text}`), then `result` or `error`.
#[utoipa::path(post, path = "/v1/exec", tag = "exec", request_body = ExecRequest,
    responses(
        (status = 200, description = "The code ran (whatever its exit code) or timed out", body = ExecResponse),
        (status = 400, description = "Bad language, template, timeout or JSON", body = crate::api::ErrorResponse),
        (status = 401, description = "No valid API key", body = crate::api::ErrorResponse),
        (status = 413, description = "Body or code too large", body = crate::api::ErrorResponse),
        (status = 422, description = "The code crashed its sandbox", body = crate::api::ErrorResponse),
        (status = 429, description = "Over the key's rate", body = crate::api::ErrorResponse),
        (status = 503, description = "Every sandbox slot stayed busy", body = crate::api::ErrorResponse),
    ),
    security(("bearer" = [])))]
async fn exec(
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
        (status = 400, description = "Too many executions or bad JSON", body = crate::api::ErrorResponse),
    ),
    security(("bearer" = [])))]
async fn exec_batch(
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

/// Starts a long-lived sandbox forked from a template.
#[utoipa::path(post, path = "/v1/sandboxes", tag = "sandboxes", request_body = CreateSandbox,
    responses(
        (status = 201, description = "Started", body = SessionInfo),
        (status = 400, description = "Bad language, template or TTL", body = crate::api::ErrorResponse),
        (status = 429, description = "Too many sandboxes for this key", body = crate::api::ErrorResponse),
    ),
    security(("bearer" = [])))]
async fn create_sandbox(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<CreateSandbox>, JsonRejection>,
) -> Result<(StatusCode, Json<SessionInfo>), ApiError> {
    let Json(req) = body?;
    let served = state.resolve(&req.language, req.template.as_ref())?;
    let ttl = match req.ttl_seconds {
        None => state.limits.default_sandbox_ttl,
        Some(t) if t > 0.0 && t <= state.limits.max_sandbox_ttl.as_secs_f64() => Duration::from_secs_f64(t),
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_ttl",
                format!(
                    "ttl_seconds must be more than 0 and at most {}",
                    state.limits.max_sandbox_ttl.as_secs()
                ),
            ))
        }
    };
    state.sessions.reserve(caller, 1, served.memory_mib())?;
    let session = state
        .sessions
        .start(served, caller, None, ttl, |served| served.template.fork())
        .await?;
    Ok((StatusCode::CREATED, Json(session.info())))
}

/// The caller's sandboxes.
#[utoipa::path(get, path = "/v1/sandboxes", tag = "sandboxes",
    responses((status = 200, description = "Sandboxes of this key", body = SandboxList)),
    security(("bearer" = [])))]
async fn list_sandboxes(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<SandboxList>, ApiError> {
    Ok(Json(SandboxList {
        sandboxes: state.sessions.list(caller)?,
    }))
}

/// One sandbox.
#[utoipa::path(get, path = "/v1/sandboxes/{id}", tag = "sandboxes", params(("id" = String, Path)),
    responses(
        (status = 200, description = "The sandbox", body = SessionInfo),
        (status = 404, description = "No such sandbox", body = crate::api::ErrorResponse),
    ),
    security(("bearer" = [])))]
async fn get_sandbox(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<SessionInfo>, ApiError> {
    Ok(Json(state.sessions.get(&id, caller)?.info()))
}

/// Removes a sandbox and its VM.
#[utoipa::path(delete, path = "/v1/sandboxes/{id}", tag = "sandboxes", params(("id" = String, Path)),
    responses(
        (status = 204, description = "Removed"),
        (status = 404, description = "No such sandbox", body = crate::api::ErrorResponse),
    ),
    security(("bearer" = [])))]
async fn delete_sandbox(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.sessions.remove(&id, caller)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Runs code in a sandbox; its variables, imports and files stay for the next call.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/exec", tag = "sandboxes", params(("id" = String, Path)),
    request_body = SandboxExec,
    responses(
        (status = 200, description = "The code ran or timed out (a timed-out sandbox is ended)", body = ExecResponse),
        (status = 404, description = "No such sandbox", body = crate::api::ErrorResponse),
        (status = 422, description = "The code crashed the sandbox, which is ended", body = crate::api::ErrorResponse),
    ),
    security(("bearer" = [])))]
async fn sandbox_exec(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Result<Json<SandboxExec>, JsonRejection>,
) -> Result<Json<ExecResponse>, ApiError> {
    let Json(req) = body?;
    let req = ExecRequest::in_sandbox(req.code, req.timeout_seconds, req.stdin);
    Ok(Json(state.exec_in_session(&id, caller, req).await?))
}

/// Makes `count` new sandboxes that start from this sandbox's current state.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/fork", tag = "sandboxes", params(("id" = String, Path)),
    request_body = ForkSandbox,
    responses(
        (status = 201, description = "The new sandboxes", body = Forked),
        (status = 400, description = "Bad count", body = crate::api::ErrorResponse),
        (status = 404, description = "No such sandbox", body = crate::api::ErrorResponse),
        (status = 429, description = "Too many sandboxes for this key", body = crate::api::ErrorResponse),
    ),
    security(("bearer" = [])))]
async fn fork_sandbox(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Result<Json<ForkSandbox>, JsonRejection>,
) -> Result<(StatusCode, Json<Forked>), ApiError> {
    let Json(req) = body?;
    if req.count == 0 || req.count > state.limits.max_fork {
        return Err(ApiError::bad_request(
            "invalid_count",
            format!("count must be 1 to {}", state.limits.max_fork),
        ));
    }
    let parent = state.sessions.get(&id, caller)?;
    state.sessions.reserve(caller, req.count, parent.served.memory_mib())?;
    let started = Instant::now();
    let live = parent
        .call(|machine| machine.snapshot_live())
        .await?
        .map_err(ApiError::internal)?;
    let live = Arc::new(live);
    let mut sandboxes = Vec::with_capacity(req.count);
    for _ in 0..req.count {
        let live = live.clone();
        let child = state
            .sessions
            .start(
                parent.served.clone(),
                caller,
                Some(parent.id.clone()),
                parent.ttl,
                move |served| served.template.fork_live(&live),
            )
            .await?;
        sandboxes.push(child.info());
    }
    Ok((
        StatusCode::CREATED,
        Json(Forked {
            sandboxes,
            fork_time_ms: started.elapsed().as_secs_f64() * 1e3,
            parent_changed_kib: live.changed_bytes() / 1024,
        }),
    ))
}

/// A guest path from the URL: absolute, no NUL, no `..` component.
fn guest_path(path: &str) -> Result<String, ApiError> {
    let path = format!("/{}", path.trim_start_matches('/'));
    if path.contains('\0') || path.split('/').any(|c| c == "..") || path.ends_with('/') {
        return Err(ApiError::bad_request(
            "invalid_path",
            "the file path must name a file, without '..'",
        ));
    }
    Ok(path)
}

/// Writes a file in the sandbox (the body is its bytes).
#[utoipa::path(put, path = "/v1/sandboxes/{id}/files/{path}", tag = "files",
    params(("id" = String, Path), ("path" = String, Path, description = "Absolute path in the guest, without the leading /")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses(
        (status = 204, description = "Written"),
        (status = 400, description = "Bad path or the guest refused", body = crate::api::ErrorResponse),
        (status = 404, description = "No such sandbox", body = crate::api::ErrorResponse),
    ),
    security(("bearer" = [])))]
async fn put_file(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path((id, path)): Path<(String, String)>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let path = guest_path(&path)?;
    let code = (state.sessions.get(&id, caller)?.served.runtime.files.write)(&path);
    let r = state
        .exec_in_session(&id, caller, file_request(code, BASE64.encode(&body)))
        .await?;
    if r.exit_code != 0 || r.timed_out {
        return Err(file_error(&path, &r));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Reads a file from the sandbox.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/files/{path}", tag = "files",
    params(("id" = String, Path), ("path" = String, Path, description = "Absolute path in the guest, without the leading /")),
    responses(
        (status = 200, description = "The file's bytes", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 404, description = "No such sandbox or file", body = crate::api::ErrorResponse),
    ),
    security(("bearer" = [])))]
async fn get_file(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path((id, path)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let path = guest_path(&path)?;
    let code = (state.sessions.get(&id, caller)?.served.runtime.files.read)(&path);
    let r = state
        .exec_in_session(&id, caller, file_request(code, String::new()))
        .await?;
    if r.exit_code != 0 || r.timed_out || r.truncated {
        return Err(file_error(&path, &r));
    }
    let bytes = BASE64
        .decode(r.stdout.trim())
        .map_err(|e| ApiError::internal(format!("the guest sent bad base64: {e}")))?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

fn file_request(code: String, stdin: String) -> ExecRequest {
    ExecRequest::in_sandbox(code, 60.0, stdin)
}

fn file_error(path: &str, r: &ExecResponse) -> ApiError {
    let last = r.stderr.lines().last().unwrap_or("").to_string();
    if r.exit_code == FILE_NOT_FOUND {
        ApiError::new(StatusCode::NOT_FOUND, "file_not_found", format!("{path}: {last}"))
    } else if r.truncated {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "file_too_large",
            format!("{path} is larger than the output limit allows"),
        )
    } else {
        ApiError::bad_request("file_error", format!("{path}: {last}"))
    }
}

/// Templates and their readiness. Needs no key.
#[utoipa::path(get, path = "/v1/health", tag = "service",
    responses((status = 200, description = "Serving", body = Health)))]
async fn health(State(state): State<Arc<AppState>>) -> Json<Health> {
    let templates = state
        .templates
        .values()
        .map(|s| TemplateHealth {
            name: s.name.clone(),
            language: s.runtime.language().to_string(),
            languages: s.runtime.languages.iter().map(|l| l.to_string()).collect(),
            ready: true,
            memory_mib: s.memory_mib(),
        })
        .collect();
    Json(Health {
        status: "ok".into(),
        templates,
        live_sandboxes: state.metrics.live_sandboxes.get().max(0) as u64 + state.sessions.count() as u64,
        max_concurrent: state.limits.max_concurrent,
    })
}

/// Prometheus metrics (OpenMetrics text).
#[utoipa::path(get, path = "/v1/metrics", tag = "service",
    responses((status = 200, description = "Metrics", content_type = "application/openmetrics-text", body = String)),
    security(("bearer" = [])))]
async fn metrics(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let text = state.metrics.render().map_err(ApiError::internal)?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not take that method",
    )
}

/// Gives every response an `x-request-id` (the execution id is separate,
/// in exec results) and logs each request with it.
async fn request_id(request: axum::extract::Request, next: middleware::Next) -> Response {
    let id = execution_id();
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let started = Instant::now();
    let mut response = next.run(request).await;
    tracing::info!(
        request_id = %id,
        %method,
        %path,
        status = response.status().as_u16(),
        ms = started.elapsed().as_secs_f64() * 1e3,
        "request"
    );
    if let Ok(value) = header::HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::internal("a handler panicked").into_response()
}

/// The API. Serve it with connection info (see [`serve`]): without API keys
/// only loopback clients are let in.
pub fn router(state: Arc<AppState>) -> Router {
    let authed = Router::new()
        .route("/v1/exec", post(exec))
        .route("/exec", post(exec))
        .route("/v1/exec/batch", post(exec_batch))
        .route("/v1/metrics", get(metrics))
        .route("/v1/sandboxes", post(create_sandbox).get(list_sandboxes))
        .route("/v1/sandboxes/{id}", get(get_sandbox).delete(delete_sandbox))
        .route("/v1/sandboxes/{id}/exec", post(sandbox_exec))
        .route("/v1/sandboxes/{id}/fork", post(fork_sandbox))
        .route("/v1/sandboxes/{id}/files/{*path}", put(put_file).get(get_file))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::require));
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/openapi.json", get(openapi::serve))
        .route("/health", get(health))
        .merge(authed)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.limits.max_body_bytes))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panic_response))
        .layer(middleware::from_fn(request_id))
        .with_state(state)
}

/// Serves the API on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let reaper_state = state.clone();
    let reaper = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let removed = reaper_state.sessions.reap();
            if removed > 0 {
                tracing::info!("removed {removed} idle sandboxes");
            }
        }
    });
    let served = axum::serve(
        listener,
        router(state).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await;
    reaper.abort();
    served
}
