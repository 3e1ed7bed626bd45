//! The E2B-compatible API: E2B's own SDKs (`e2b`, `e2b-code-interpreter`,
//! Python and JavaScript), unmodified, drive `zeroboot serve` when
//! `E2B_API_URL` and `E2B_SANDBOX_URL` both name it. docs/e2b.md says what
//! is supported.
//!
//! - `control`: the control plane (`/sandboxes`, `/v2/sandboxes`), behind
//!   the API keys like `/v1/*`.
//! - Sandbox calls carry `E2b-Sandbox-Id` (and `E2b-Sandbox-Port`) instead
//!   of a host name; [`dispatch`] sends them to the sandbox routes, which
//!   take the sandbox's access token instead of an API key: `envd` (files,
//!   filesystem RPCs, health), `process` (commands) and `interpreter`
//!   (`/execute`, contexts).
//! - [`connect`]: the Connect protocol's envelopes and errors.

pub mod connect;
mod control;
mod envd;
mod interpreter;
mod process;

use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{middleware, Router};
use subtle::ConstantTimeEq;
use tower::ServiceExt;

use zeroboot_protocol::exec::{ROOT, USER};

use crate::error::ApiError;
use crate::sessions::Session;
use crate::state::AppState;

/// The header that names the sandbox of a sandbox call.
pub const SANDBOX_ID_HEADER: &str = "e2b-sandbox-id";
/// The sandbox daemon version we answer as. The SDKs gate features on it:
/// from 0.4.0 they no longer force the user `user`, and from 0.5.7 they
/// may upload a raw body; we serve both.
pub const ENVD_VERSION: &str = "0.5.7";

/// An error in E2B's shape: `{"code": <HTTP status>, "message"}`.
#[derive(Debug)]
pub struct E2bError(pub ApiError);

impl From<ApiError> for E2bError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl IntoResponse for E2bError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"code": self.0.status.as_u16(), "message": self.0.message});
        let mut response = (self.0.status, axum::Json(body)).into_response();
        if let Some(seconds) = self.0.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(seconds));
        }
        response
    }
}

/// RFC 3339, UTC, to the second, as E2B's listings give times.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t)
        .replace_nanosecond(0)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The control plane's routes, to be put behind the API keys.
pub(crate) fn control_routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/sandboxes", post(control::create).get(control::list_v1))
        .route("/v2/sandboxes", post(control::create).get(control::list_v2))
        .route("/sandboxes/{id}", get(control::info).delete(control::kill))
        .route("/v2/sandboxes/{id}", get(control::info))
        .route("/sandboxes/{id}/timeout", post(control::set_timeout))
        .route("/sandboxes/{id}/pause", post(control::pause))
        .route("/sandboxes/{id}/resume", post(control::connect))
        .route("/v2/sandboxes/{id}/connect", post(control::connect))
}

/// The sandbox calls' routes, each behind the sandbox's access token.
pub(crate) fn sandbox_routes(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(envd::health))
        .route(
            "/files",
            get(envd::read_file)
                .post(envd::write_files)
                // Uploads stream into the guest at any size.
                .layer(DefaultBodyLimit::disable()),
        )
        .route("/filesystem.Filesystem/{method}", post(envd::filesystem))
        .route("/process.Process/{method}", post(process::process))
        .route("/execute", post(interpreter::execute))
        .route(
            "/contexts",
            post(interpreter::create_context).get(interpreter::list_contexts),
        )
        .route("/contexts/{id}", delete(interpreter::delete_context))
        .route("/contexts/{id}/restart", post(interpreter::restart_context))
        .fallback(sandbox_not_found_route)
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .with_state(state)
}

async fn sandbox_not_found_route(request: Request) -> Response {
    let message = format!("{} is not a sandbox call this server serves", request.uri().path());
    error_for(
        request.uri().path(),
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message),
    )
}

/// A call's error in the shape its path's client reads: Connect's for the
/// RPCs, E2B's for the rest.
fn error_for(path: &str, e: ApiError) -> Response {
    if path.starts_with("/filesystem.") || path.starts_with("/process.") {
        connect::ConnectError::from(e).into_response()
    } else {
        E2bError(e).into_response()
    }
}

/// Middleware on the whole router: a request naming a sandbox in
/// `E2b-Sandbox-Id` is a sandbox call and goes to `sandbox` instead.
pub(crate) async fn dispatch(State(sandbox): State<Router>, request: Request, next: Next) -> Response {
    if request.headers().contains_key(SANDBOX_ID_HEADER) {
        match sandbox.oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        }
    } else {
        next.run(request).await
    }
}

/// The sandbox a call names, once its token matches; its owner's rate
/// limit applies.
#[derive(Clone)]
pub(crate) struct SandboxCall(pub Arc<Session>);

fn token(headers: &HeaderMap) -> Option<&[u8]> {
    ["x-access-token", "e2b-traffic-access-token"]
        .iter()
        .find_map(|name| headers.get(*name))
        .map(|v| v.as_bytes())
}

async fn authenticate(State(state): State<Arc<AppState>>, mut request: Request, next: Next) -> Response {
    let path = request.uri().path().to_string();
    let headers = request.headers();
    let id = headers
        .get(SANDBOX_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let Some(session) = state.sessions.get_unchecked(&id) else {
        let message = if state.paused.get(&id).ok().flatten().is_some() {
            format!("sandbox {id} is paused: connect to it (Sandbox.connect) to resume it")
        } else {
            format!("sandbox {id} not found")
        };
        return error_for(
            &path,
            ApiError::new(StatusCode::NOT_FOUND, "sandbox_not_found", message),
        );
    };
    // Its envd and traffic tokens are the one token: whichever header came
    // is compared with it, in constant time.
    let presented = token(headers).unwrap_or_default();
    if !bool::from(session.access_token.as_bytes().ct_eq(presented)) {
        let e = ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send the sandbox's access token (envdAccessToken) as X-Access-Token",
        );
        return error_for(&path, e);
    }
    if let Err(e) = state.auth().admit(session.owner) {
        return error_for(&path, e);
    }
    request.extensions_mut().insert(SandboxCall(session));
    next.run(request).await
}

/// The user a call asks for: E2B's SDKs send `Authorization: Basic
/// base64("<user>:")`; none is the sandbox's own.
pub(crate) fn basic_user(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    use base64::Engine;
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let bad = || {
        ApiError::bad_request(
            "invalid_user",
            "Authorization must be Basic base64(\"user:\") or Basic base64(\"root:\")",
        )
    };
    let encoded = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Basic "))
        .ok_or_else(bad)?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| bad())?;
    let text = String::from_utf8(decoded).map_err(|_| bad())?;
    match text.split(':').next().unwrap_or_default() {
        "" => Ok(None),
        user => sandbox_user(user).map(Some),
    }
}

/// `name` if it is one of a sandbox's users (`user`, `root`), else a 400.
pub(crate) fn sandbox_user(name: &str) -> Result<String, ApiError> {
    if name == USER || name == ROOT {
        Ok(name.to_string())
    } else {
        Err(ApiError::bad_request(
            "invalid_user",
            format!("user {name:?} does not exist in a sandbox: {USER} or {ROOT}"),
        ))
    }
}
