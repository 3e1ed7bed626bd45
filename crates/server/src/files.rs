//! The files API: `/v1/sandboxes/{id}/files/{*path}` writes and reads
//! files in a long-lived sandbox by running its runtime's guest code there.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Extension, Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use zeroboot_template::runtime::FILE_NOT_FOUND;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::exec::{ExecRequest, ExecResponse};
use crate::run::CallDefaults;
use crate::state::AppState;

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
        (status = 400, description = "Bad path or the guest refused", body = crate::error::ErrorResponse),
        (status = 404, description = "No such sandbox", body = crate::error::ErrorResponse),
    ),
    security(("bearer" = [])))]
pub(crate) async fn put_file(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path((id, path)): Path<(String, String)>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let path = guest_path(&path)?;
    let code = (state.sessions.get(&id, caller)?.served.runtime.files.write)(&path);
    let r = state
        .exec_in_session(
            &id,
            caller,
            file_request(code, BASE64.encode(&body)),
            CallDefaults::Agent,
        )
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
        (status = 404, description = "No such sandbox or file", body = crate::error::ErrorResponse),
    ),
    security(("bearer" = [])))]
pub(crate) async fn get_file(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path((id, path)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let path = guest_path(&path)?;
    let code = (state.sessions.get(&id, caller)?.served.runtime.files.read)(&path);
    let r = state
        .exec_in_session(&id, caller, file_request(code, String::new()), CallDefaults::Agent)
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
