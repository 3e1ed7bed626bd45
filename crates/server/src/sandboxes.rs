//! Long-lived sandboxes: `/v1/sandboxes`, to create, list, get and remove
//! them, run code in one and fork it. The registry is [`crate::sessions`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::JsonRejection;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::exec::{ExecRequest, ExecResponse, RunContext};
use crate::sessions::{SessionInfo, SessionOptions};
use crate::state::AppState;

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
    /// What the sandbox and its forks may reach over the network (default:
    /// the template's policy, and without one nothing).
    #[serde(default)]
    pub network: Option<crate::network::NetworkRequest>,
    /// For every call in this sandbox and its forks, under a call's own.
    #[serde(flatten)]
    pub context: RunContext,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct SandboxExec {
    pub code: String,
    #[serde(default = "crate::exec::thirty")]
    pub timeout_seconds: f64,
    #[serde(default)]
    pub stdin: String,
    /// For this call, over the sandbox's.
    #[serde(flatten)]
    pub context: RunContext,
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

/// Starts a long-lived sandbox forked from a template.
#[utoipa::path(post, path = "/v1/sandboxes", tag = "sandboxes", request_body = CreateSandbox,
    responses(
        (status = 201, description = "Started", body = SessionInfo),
        (status = 400, description = "Bad language, template, TTL, env or cwd", body = crate::error::ErrorResponse),
        (status = 429, description = "Too many sandboxes for this key", body = crate::error::ErrorResponse),
    ),
    security(("bearer" = [])))]
pub(crate) async fn create_sandbox(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<CreateSandbox>, JsonRejection>,
) -> Result<(StatusCode, Json<SessionInfo>), ApiError> {
    let Json(req) = body?;
    let served = state.resolve(&req.language, req.template.as_ref())?;
    let context = req.context.to_guest();
    state.validate_context(&context, 0)?;
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
    // Held until the sandbox is registered (or failed to start).
    let policy = served.network(req.network.as_ref()).cloned();
    let network = state.network.config_for(policy.as_ref())?;
    let _reserved = state.sessions.reserve(caller, 1, served.memory_mib())?;
    let session = state
        .sessions
        .start(
            served,
            caller,
            ttl,
            SessionOptions {
                context,
                network: policy,
                ..SessionOptions::default()
            },
            |served| served.template.fork_with(network),
        )
        .await?;
    Ok((StatusCode::CREATED, Json(session.info())))
}

/// The caller's sandboxes.
#[utoipa::path(get, path = "/v1/sandboxes", tag = "sandboxes",
    responses((status = 200, description = "Sandboxes of this key", body = SandboxList)),
    security(("bearer" = [])))]
pub(crate) async fn list_sandboxes(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<SandboxList>, ApiError> {
    let mut sandboxes = state.sessions.list(caller)?;
    sandboxes.extend(state.paused_list(caller).iter().map(crate::paused::PausedRecord::info));
    sandboxes.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(Json(SandboxList { sandboxes }))
}

/// One sandbox.
#[utoipa::path(get, path = "/v1/sandboxes/{id}", tag = "sandboxes", params(("id" = String, Path)),
    responses(
        (status = 200, description = "The sandbox", body = SessionInfo),
        (status = 404, description = "No such sandbox", body = crate::error::ErrorResponse),
    ),
    security(("bearer" = [])))]
pub(crate) async fn get_sandbox(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<SessionInfo>, ApiError> {
    match state.sessions.get(&id, caller) {
        Ok(session) => Ok(Json(session.info())),
        Err(e) => match state.paused_of(&id, caller)? {
            Some(record) => Ok(Json(record.info())),
            None => Err(e),
        },
    }
}

/// Removes a sandbox and its VM, or a paused sandbox's saved state.
#[utoipa::path(delete, path = "/v1/sandboxes/{id}", tag = "sandboxes", params(("id" = String, Path)),
    responses(
        (status = 204, description = "Removed"),
        (status = 404, description = "No such sandbox", body = crate::error::ErrorResponse),
    ),
    security(("bearer" = [])))]
pub(crate) async fn delete_sandbox(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if !state.kill(&id, caller)? {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "sandbox_not_found",
            format!("no sandbox {id}"),
        ));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Runs code in a sandbox; its variables, imports and files stay for the next call.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/exec", tag = "sandboxes", params(("id" = String, Path)),
    request_body = SandboxExec,
    responses(
        (status = 200, description = "The code ran or timed out (a timed-out sandbox is ended)", body = ExecResponse),
        (status = 400, description = "Bad env or cwd, or timeout", body = crate::error::ErrorResponse),
        (status = 404, description = "No such sandbox", body = crate::error::ErrorResponse),
        (status = 422, description = "The code crashed the sandbox, which is ended", body = crate::error::ErrorResponse),
    ),
    security(("bearer" = [])))]
pub(crate) async fn sandbox_exec(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Result<Json<SandboxExec>, JsonRejection>,
) -> Result<Json<ExecResponse>, ApiError> {
    let Json(req) = body?;
    let mut exec = ExecRequest::in_sandbox(req.code, req.timeout_seconds, req.stdin);
    exec.context = req.context;
    Ok(Json(state.exec_in_session(&id, caller, exec).await?))
}

/// Makes `count` new sandboxes that start from this sandbox's current state.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/fork", tag = "sandboxes", params(("id" = String, Path)),
    request_body = ForkSandbox,
    responses(
        (status = 201, description = "The new sandboxes", body = Forked),
        (status = 400, description = "Bad count", body = crate::error::ErrorResponse),
        (status = 404, description = "No such sandbox", body = crate::error::ErrorResponse),
        (status = 429, description = "Too many sandboxes for this key", body = crate::error::ErrorResponse),
    ),
    security(("bearer" = [])))]
pub(crate) async fn fork_sandbox(
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
    let parent = state.session(&id, caller).await?;
    let _reserved = state.sessions.reserve(caller, req.count, parent.served.memory_mib())?;
    let started = Instant::now();
    let live = parent
        .call(|machine| machine.snapshot_live())
        .await?
        .map_err(ApiError::internal)?;
    let live = Arc::new(live);
    let mut sandboxes = Vec::with_capacity(req.count);
    for _ in 0..req.count {
        let live = live.clone();
        // Each child's own backend: no connection of the parent's is shared.
        let network = state.network.config_for(parent.network.as_ref())?;
        let child = state
            .sessions
            .start(
                parent.served.clone(),
                caller,
                parent.ttl,
                SessionOptions {
                    parent: Some(parent.id.clone()),
                    context: parent.context.clone(),
                    network: parent.network.clone(),
                    ..SessionOptions::default()
                },
                move |served| served.template.fork_live(&live, network),
            )
            .await;
        match child {
            Ok(child) => sandboxes.push(child.info()),
            Err(e) => {
                // All or nothing: the caller gets an error, so no child of
                // this call may stay behind, holding its quota until its TTL.
                for made in &sandboxes {
                    state.sessions.forget(&made.id);
                }
                return Err(e);
            }
        }
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
