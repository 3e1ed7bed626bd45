//! E2B's control plane: create, connect (and resume), list, get, set the
//! timeout of, pause and kill sandboxes. Authenticated like `/v1/*` (E2B's
//! SDKs send the key as `X-API-KEY`); errors in E2B's shape,
//! `{"code": <status>, "message"}`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::rejection::JsonRejection;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use zeroboot_protocol::Context;

use super::{rfc3339, E2bError, ENVD_VERSION};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::network::NetworkRequest;
use crate::paused::PausedRecord;
use crate::served::Served;
use crate::sessions::{Session, SessionOptions};
use crate::state::AppState;

/// E2B's default sandbox timeout, in seconds.
const DEFAULT_TIMEOUT: f64 = 300.0;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct NewSandbox {
    #[serde(rename = "templateID")]
    template_id: String,
    timeout: Option<f64>,
    metadata: Option<BTreeMap<String, String>>,
    env_vars: Option<BTreeMap<String, String>>,
    /// E2B's default is true (snake case in E2B's API too).
    #[serde(rename = "allow_internet_access")]
    allow_internet_access: Option<bool>,
    network: Option<E2bNetwork>,
}

/// E2B's `SandboxNetworkConfig`, the parts that map onto a policy.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct E2bNetwork {
    #[serde(default)]
    allow_out: Vec<String>,
    #[serde(default)]
    deny_out: Vec<String>,
}

impl NewSandbox {
    /// Our policy for E2B's settings. E2B's sandboxes reach the internet
    /// unless told not to; `denyOut` takes CIDRs out of that, and
    /// `allowOut` puts destinations back, which here means: with all of
    /// IPv4 denied (or no internet), only `allowOut`; otherwise everything
    /// but `denyOut` (a deny entry then wins over an allow entry, as in our
    /// own API). A server without networking gives none unless asked
    /// explicitly.
    fn network(&self, state: &AppState) -> Option<NetworkRequest> {
        let network = self.network.as_ref();
        let explicit = network.is_some() || self.allow_internet_access.is_some();
        if !explicit && !state.network.enabled {
            return None;
        }
        let allow_out = network.map(|n| n.allow_out.clone()).unwrap_or_default();
        let deny_out = network.map(|n| n.deny_out.clone()).unwrap_or_default();
        let closed = self.allow_internet_access == Some(false) || deny_out.iter().any(|d| d == "0.0.0.0/0");
        if closed {
            return (!allow_out.is_empty()).then_some(NetworkRequest {
                allow: allow_out,
                deny: Vec::new(),
            });
        }
        Some(NetworkRequest {
            allow: vec!["*".to_string()],
            deny: deny_out,
        })
    }
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct Timeout {
    timeout: Option<f64>,
}

/// What create and connect answer.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Created {
    #[serde(rename = "templateID")]
    template_id: String,
    alias: String,
    #[serde(rename = "sandboxID")]
    sandbox_id: String,
    #[serde(rename = "clientID")]
    client_id: &'static str,
    envd_version: &'static str,
    envd_access_token: String,
    traffic_access_token: String,
    domain: Option<String>,
}

/// A sandbox in a listing or by itself.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Listed {
    #[serde(rename = "templateID")]
    template_id: String,
    alias: String,
    #[serde(rename = "sandboxID")]
    sandbox_id: String,
    #[serde(rename = "clientID")]
    client_id: &'static str,
    started_at: String,
    end_at: String,
    cpu_count: u32,
    #[serde(rename = "memoryMB")]
    memory_mb: u64,
    #[serde(rename = "diskSizeMB")]
    disk_size_mb: u64,
    state: &'static str,
    envd_version: &'static str,
    metadata: BTreeMap<String, String>,
}

/// The served template an E2B template name means: `base` is the first
/// Python template served (bash and Python), `code-interpreter-v1` the
/// `code-interpreter` template; any served template by its own name.
fn template(state: &AppState, name: &str) -> Option<Arc<Served>> {
    let name = name.split(':').next().unwrap_or(name);
    let wanted = match name {
        "base" => state.resolve("python", None).ok()?.name.clone(),
        "code-interpreter-v1" | "code-interpreter" => "code-interpreter".to_string(),
        other => other.to_string(),
    };
    state.templates.get(&wanted).cloned()
}

fn timeout(state: &AppState, seconds: Option<f64>) -> Result<Duration, ApiError> {
    let seconds = seconds.unwrap_or(DEFAULT_TIMEOUT);
    let max = state.limits.max_sandbox_ttl.as_secs_f64();
    if !(seconds > 0.0 && seconds <= max) {
        return Err(ApiError::bad_request(
            "invalid_timeout",
            format!("timeout must be more than 0 and at most {max} seconds"),
        ));
    }
    Ok(Duration::from_secs_f64(seconds))
}

fn created(session: &Session) -> Created {
    Created {
        template_id: session.alias.clone(),
        alias: session.alias.clone(),
        sandbox_id: session.id.clone(),
        client_id: "zeroboot",
        envd_version: ENVD_VERSION,
        envd_access_token: session.access_token.clone(),
        traffic_access_token: session.access_token.clone(),
        domain: None,
    }
}

fn disk_mb(served: &Served) -> u64 {
    served.template.snapshot().state.layout.disk_bytes >> 20
}

fn listed(session: &Session) -> Listed {
    let ends = session
        .ends()
        .unwrap_or_else(|| SystemTime::now() + session.ttl.saturating_sub(session.idle()));
    Listed {
        template_id: session.alias.clone(),
        alias: session.alias.clone(),
        sandbox_id: session.id.clone(),
        client_id: "zeroboot",
        started_at: rfc3339(session.started),
        end_at: rfc3339(ends),
        cpu_count: 1,
        memory_mb: session.served.memory_mib(),
        disk_size_mb: disk_mb(&session.served),
        state: "running",
        envd_version: ENVD_VERSION,
        metadata: session.metadata.clone(),
    }
}

fn listed_paused(state: &AppState, record: &PausedRecord) -> Listed {
    let at = |unix: f64| rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs_f64(unix.max(0.0)));
    let served = state.templates.get(&record.template);
    Listed {
        template_id: record.alias.clone(),
        alias: record.alias.clone(),
        sandbox_id: record.id.clone(),
        client_id: "zeroboot",
        started_at: at(record.started_unix),
        end_at: at(record.paused_unix),
        cpu_count: 1,
        memory_mb: served.map_or(0, |s| s.memory_mib()),
        disk_size_mb: served.map_or(0, |s| disk_mb(s)),
        state: "paused",
        envd_version: ENVD_VERSION,
        metadata: record.metadata.clone(),
    }
}

fn not_found(id: &str) -> E2bError {
    E2bError(ApiError::new(
        StatusCode::NOT_FOUND,
        "sandbox_not_found",
        format!("sandbox {id} not found"),
    ))
}

pub(crate) async fn create(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<NewSandbox>, JsonRejection>,
) -> Result<(StatusCode, Json<Created>), E2bError> {
    let Json(req) = body.map_err(ApiError::from)?;
    let served = template(&state, &req.template_id).ok_or_else(|| {
        E2bError(ApiError::new(
            StatusCode::NOT_FOUND,
            "template_not_found",
            format!(
                "template {:?} not found; available: base, code-interpreter-v1 (where served), {}",
                req.template_id,
                state.templates.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        ))
    })?;
    let lifetime = timeout(&state, req.timeout)?;
    let network_request = req.network(&state);
    let context = Context {
        env: req.env_vars.unwrap_or_default(),
        ..Context::default()
    };
    state.validate_context(&context, 0)?;
    let network = state.network.config_for(network_request.as_ref())?;
    let _reserved = state.sessions.reserve(caller, 1, served.memory_mib())?;
    let options = SessionOptions {
        context,
        network: network_request,
        alias: Some(req.template_id.clone()),
        metadata: req.metadata.unwrap_or_default(),
        ends: Some(SystemTime::now() + lifetime),
        ..SessionOptions::default()
    };
    // The idle TTL is the longest allowed: E2B's timeout is the deadline.
    let ttl = state.limits.max_sandbox_ttl;
    let session = state
        .sessions
        .start(served, caller, ttl, options, |served| {
            served.template.fork_with(network)
        })
        .await?;
    Ok((StatusCode::CREATED, Json(created(&session))))
}

/// Connects to a running sandbox (200), or resumes a paused one (201); a
/// timeout in the body sets when it ends.
pub(crate) async fn connect(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Option<Json<Timeout>>,
) -> Result<(StatusCode, Json<Created>), E2bError> {
    let wanted = body.map(|Json(t)| t.timeout).unwrap_or_default();
    let (status, session) = match state.sessions.get(&id, caller) {
        Ok(session) => (StatusCode::OK, session),
        Err(_) if state.paused_of(&id, caller)?.is_some() => (StatusCode::CREATED, state.session(&id, caller).await?),
        Err(_) => return Err(not_found(&id)),
    };
    if wanted.is_some() || session.ends().is_none() {
        session.end_after(timeout(&state, wanted)?);
    }
    Ok((status, Json(created(&session))))
}

pub(crate) async fn kill(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<StatusCode, E2bError> {
    if state.kill(&id, caller)? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(not_found(&id))
    }
}

pub(crate) async fn set_timeout(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Result<Json<Timeout>, JsonRejection>,
) -> Result<StatusCode, E2bError> {
    let Json(req) = body.map_err(ApiError::from)?;
    let after = timeout(&state, req.timeout)?;
    let session = state.sessions.get(&id, caller).map_err(|_| not_found(&id))?;
    session.end_after(after);
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn pause(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<StatusCode, E2bError> {
    // 404 for no such sandbox, 409 for one already paused.
    state.pause(&id, caller).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn info(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Listed>, E2bError> {
    if let Ok(session) = state.sessions.get(&id, caller) {
        return Ok(Json(listed(&session)));
    }
    match state.paused_of(&id, caller)? {
        Some(record) => Ok(Json(listed_paused(&state, &record))),
        None => Err(not_found(&id)),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ListQuery {
    /// `running`, `paused` or both, comma-separated.
    state: Option<String>,
    /// `k=v&k2=v2`, URL-encoded once more: sandboxes with all of them.
    metadata: Option<String>,
    limit: Option<usize>,
    next_token: Option<String>,
}

/// Parses E2B's metadata filter: `k=v` pairs joined by `&`, each part
/// percent-encoded.
fn metadata_filter(raw: &str) -> Result<Vec<(String, String)>, ApiError> {
    let bad = || ApiError::bad_request("invalid_metadata", "metadata is key=value pairs joined by '&'");
    serde_urlencoded::from_str::<Vec<(String, String)>>(raw).map_err(|_| bad())
}

/// Every sandbox of the caller in the states asked, sorted by id, a page
/// at a time: `X-Next-Token` names where the next page starts.
pub(crate) async fn list_v2(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, E2bError> {
    let Query(query) = query.map_err(|e| E2bError(ApiError::bad_request("invalid_query", e.body_text())))?;
    let states = query.state.as_deref().unwrap_or("running,paused");
    let (running, paused) = (states.contains("running"), states.contains("paused"));
    let filter = match &query.metadata {
        Some(raw) if !raw.is_empty() => metadata_filter(raw)?,
        _ => Vec::new(),
    };
    let mut all = Vec::new();
    if running {
        all.extend(state.sessions.owned_by(caller)?.iter().map(|s| listed(s)));
    }
    if paused {
        all.extend(state.paused_list(caller).iter().map(|r| listed_paused(&state, r)));
    }
    all.retain(|s| filter.iter().all(|(k, v)| s.metadata.get(k) == Some(v)));
    all.sort_by(|a, b| a.sandbox_id.cmp(&b.sandbox_id));
    if let Some(after) = &query.next_token {
        all.retain(|s| &s.sandbox_id > after);
    }
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    let more = all.len() > limit;
    all.truncate(limit);
    let mut headers = HeaderMap::new();
    if more {
        if let Some(last) = all.last() {
            if let Ok(value) = HeaderValue::from_str(&last.sandbox_id) {
                headers.insert("x-next-token", value);
            }
        }
    }
    Ok((headers, Json(all)).into_response())
}

/// The older listing: running sandboxes, one page.
pub(crate) async fn list_v1(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<Listed>>, E2bError> {
    Ok(Json(
        state.sessions.owned_by(caller)?.iter().map(|s| listed(s)).collect(),
    ))
}
