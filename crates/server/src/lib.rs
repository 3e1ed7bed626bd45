//! zeroboot's HTTP API (axum on tokio), a thin layer over the synchronous
//! fork engine: every execution forks a new VM from a template and runs on a
//! blocking thread, never on an async worker.
//!
//! - [`api`]: request and response bodies.
//! - [`error`]: the one error shape, `{error: {code, message}}`.
//! - [`auth`]: API keys, the loopback rule without keys, per-key rate limits.
//! - [`metrics`]: Prometheus metrics.

pub mod api;
pub mod auth;
pub mod error;
pub mod metrics;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{middleware, Json, Router};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use zeroboot_protocol::{Request, DEFAULT_OUTPUT_LIMIT, REQUEST_CAPACITY};
use zeroboot_vmm::{MachineError, Template};

use crate::api::{
    BatchEntry, BatchRequest, BatchResponse, ErrorBody, ExecRequest, ExecResponse, Health, TemplateHealth,
};
use crate::auth::Auth;
use crate::error::ApiError;
use crate::metrics::{Metrics, Outcome};

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
        }
    }
}

/// A template the server forks from.
pub struct Served {
    pub name: String,
    /// The language its agent runs (`python`).
    pub language: String,
    pub template: Template,
}

pub struct AppState {
    templates: BTreeMap<String, Arc<Served>>,
    /// language → template name serving it.
    languages: BTreeMap<String, String>,
    limits: Limits,
    slots: Arc<Semaphore>,
    auth: Auth,
    metrics: Metrics,
}

impl AppState {
    /// The first template given for a language serves it.
    pub fn new(templates: Vec<Served>, limits: Limits, auth: Auth) -> Self {
        let mut languages = BTreeMap::new();
        let mut by_name = BTreeMap::new();
        for served in templates {
            languages
                .entry(served.language.clone())
                .or_insert_with(|| served.name.clone());
            by_name.insert(served.name.clone(), Arc::new(served));
        }
        Self {
            templates: by_name,
            languages,
            slots: Arc::new(Semaphore::new(limits.max_concurrent)),
            limits,
            auth,
            metrics: Metrics::default(),
        }
    }

    pub fn auth(&self) -> &Auth {
        &self.auth
    }

    fn resolve(&self, req: &ExecRequest) -> Result<Arc<Served>, ApiError> {
        let name = match &req.template {
            Some(name) => name,
            None => self.languages.get(&req.language).ok_or_else(|| {
                ApiError::bad_request(
                    "unsupported_language",
                    format!(
                        "language {:?} is not available; available: {}",
                        req.language,
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
        if served.language != req.language && req.template.is_none() {
            return Err(ApiError::internal("language map out of sync"));
        }
        Ok(served.clone())
    }

    fn validate(&self, req: &ExecRequest) -> Result<Duration, ApiError> {
        let size = req.code.len() + req.stdin.len();
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
        if !(req.timeout_seconds > 0.0 && req.timeout_seconds <= max) {
            return Err(ApiError::bad_request(
                "invalid_timeout",
                format!("timeout_seconds must be more than 0 and at most {max}"),
            ));
        }
        Ok(Duration::from_secs_f64(req.timeout_seconds))
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

    /// Validates, waits for a slot, then forks and runs on a blocking thread.
    pub async fn execute(self: &Arc<Self>, req: ExecRequest) -> Result<ExecResponse, ApiError> {
        let timeout = self.validate(&req)?;
        let served = self.resolve(&req)?;
        let permit = self.slot().await?;
        let state = self.clone();
        let output_limit = self.limits.max_output_bytes;
        let outcome = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            state.run_blocking(&served, &req, timeout, output_limit)
        })
        .await
        .map_err(ApiError::internal)?;
        let label = match &outcome {
            Ok(r) if r.timed_out => "timeout",
            Ok(_) => "ok",
            Err(_) => "error",
        };
        self.metrics.executions.get_or_create(&Outcome { outcome: label }).inc();
        outcome
    }

    fn run_blocking(
        &self,
        served: &Served,
        req: &ExecRequest,
        timeout: Duration,
        output_limit: u32,
    ) -> Result<ExecResponse, ApiError> {
        let started = Instant::now();
        let mut machine = served
            .template
            .fork(Box::new(std::io::sink()))
            .map_err(ApiError::internal)?;
        let forked = started.elapsed();
        self.metrics.live_sandboxes.inc();
        self.metrics.spawn_seconds.observe(forked.as_secs_f64());
        let request = Request {
            code: req.code.as_bytes(),
            stdin: req.stdin.as_bytes(),
            output_limit,
        };
        let result = machine.exec(request, timeout);
        drop(machine);
        self.metrics.live_sandboxes.dec();
        let total = started.elapsed();
        let ran = total.saturating_sub(forked);
        self.metrics.exec_seconds.observe(ran.as_secs_f64());
        self.metrics.total_seconds.observe(total.as_secs_f64());
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let mut response = ExecResponse {
            id: execution_id(),
            stdout: String::new(),
            stderr: String::new(),
            exit_code: 0,
            fork_time_ms: ms(forked),
            exec_time_ms: ms(ran),
            total_time_ms: ms(total),
            timed_out: false,
            truncated: false,
            template: served.name.clone(),
        };
        match result {
            Ok(r) => {
                response.stdout = String::from_utf8_lossy(&r.stdout).into_owned();
                response.stderr = String::from_utf8_lossy(&r.stderr).into_owned();
                response.exit_code = r.exit_code;
                response.truncated = r.stdout_truncated || r.stderr_truncated;
            }
            Err(MachineError::Timeout(_)) => {
                response.timed_out = true;
                response.exit_code = 124;
                response.stderr = format!("zeroboot: timed out after {} s\n", req.timeout_seconds);
            }
            Err(e @ (MachineError::GuestReset | MachineError::TripleFault { .. })) => {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "sandbox_crashed",
                    format!("{e}: the code ended its sandbox (its agent exited or the guest kernel panicked)"),
                ));
            }
            Err(e) => return Err(ApiError::internal(e)),
        }
        Ok(response)
    }
}

/// A random id for an execution, for logs and clients.
fn execution_id() -> String {
    let mut bytes = [0u8; 12];
    zeroboot_vmm::machine::fill_random(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn exec(
    State(state): State<Arc<AppState>>,
    body: Result<Json<ExecRequest>, JsonRejection>,
) -> Result<Json<ExecResponse>, ApiError> {
    let Json(req) = body?;
    Ok(Json(state.execute(req).await?))
}

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

async fn health(State(state): State<Arc<AppState>>) -> Json<Health> {
    let templates = state
        .templates
        .values()
        .map(|s| TemplateHealth {
            name: s.name.clone(),
            language: s.language.clone(),
            ready: true,
            memory_mib: s.template.snapshot().state.layout.ram_bytes >> 20,
        })
        .collect();
    Json(Health {
        status: "ok".into(),
        templates,
        live_sandboxes: state.metrics.live_sandboxes.get().max(0) as u64,
        max_concurrent: state.limits.max_concurrent,
    })
}

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
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::require));
    Router::new()
        .route("/v1/health", get(health))
        .route("/health", get(health))
        .merge(authed)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.limits.max_body_bytes))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panic_response))
        .with_state(state)
}

/// Serves the API on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router(state).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}
