//! E2B's sandbox daemon (port 49983): health, file upload and download,
//! and the filesystem RPCs, over the sandbox's files API (the agent's
//! native half: no code runs).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Extension, Multipart, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use zeroboot_protocol::exec::ROOT;
use zeroboot_protocol::files::{FileOp, PARENTS, RECURSIVE};

use super::connect::ConnectError;
use super::{basic_user, rfc3339, sandbox_user, E2bError, SandboxCall};
use crate::error::ApiError;
use crate::files::guest::{uid_of, GuestFiles};
use crate::files::{self, guest_path, FileInfo};
use crate::state::AppState;

/// Longest JSON body of a filesystem RPC.
const MAX_RPC_BODY: usize = 64 << 10;
/// Entries one ListDir returns, over all depths.
const MAX_LISTED: usize = 100_000;

pub(crate) async fn health() -> StatusCode {
    StatusCode::NO_CONTENT
}

#[derive(Debug, Deserialize)]
pub(crate) struct FileQuery {
    path: Option<String>,
    username: Option<String>,
}

/// The files of the call's sandbox as the user the call asks for (a
/// `username` query or a Basic authorization), else the sandbox's own.
fn files_as(state: &Arc<AppState>, call: &SandboxCall, user: Option<&str>) -> GuestFiles {
    let mut files = GuestFiles::of(state, call.0.clone());
    if user.is_some() {
        files.uid = uid_of(user);
    }
    files
}

fn user_of(query_user: Option<&String>, headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    match query_user {
        Some(user) => sandbox_user(user).map(Some),
        None => basic_user(headers),
    }
}

/// A path of E2B's: absolute, or relative to the user's home.
fn resolve(path: &str, user: Option<&str>) -> Result<String, ApiError> {
    if path.is_empty() {
        return Err(ApiError::bad_request("invalid_path", "path is empty"));
    }
    let absolute = if path.starts_with('/') {
        path.to_string()
    } else {
        let home = if user == Some(ROOT) { "/root" } else { "/home/user" };
        format!("{home}/{path}")
    };
    guest_path(&absolute)
}

pub(crate) async fn read_file(
    State(state): State<Arc<AppState>>,
    Extension(call): Extension<SandboxCall>,
    headers: HeaderMap,
    Query(query): Query<FileQuery>,
) -> Result<Response, E2bError> {
    let user = user_of(query.username.as_ref(), &headers)?;
    let path = resolve(query.path.as_deref().unwrap_or_default(), user.as_deref())?;
    let files = files_as(&state, &call, user.as_deref());
    Ok(files::read_file(files, path).await?)
}

fn written(path: &str) -> Value {
    let name = path.rsplit('/').next().unwrap_or(path);
    json!({"name": name, "path": path, "type": "file"})
}

/// Uploads: multipart (field `file`, one part per file, the filename its
/// path unless `path` is given) or a raw body to `path`.
pub(crate) async fn write_files(
    State(state): State<Arc<AppState>>,
    Extension(call): Extension<SandboxCall>,
    Query(query): Query<FileQuery>,
    request: Request,
) -> Result<Json<Vec<Value>>, E2bError> {
    let headers = request.headers().clone();
    if let Some(encoding) = headers.get(header::CONTENT_ENCODING) {
        if encoding.as_bytes() != b"identity" {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_encoding",
                format!(
                    "Content-Encoding {}: uploads are taken uncompressed",
                    String::from_utf8_lossy(encoding.as_bytes())
                ),
            )
            .into());
        }
    }
    let user = user_of(query.username.as_ref(), &headers)?;
    let files = files_as(&state, &call, user.as_deref());
    let content_type = super::connect::content_type(&headers);
    if !content_type.starts_with("multipart/form-data") {
        let path = resolve(query.path.as_deref().unwrap_or_default(), user.as_deref())?;
        let mut stream = request.into_body().into_data_stream();
        files::write_file(&files, &path, &mut stream, files::content_length(&headers)).await?;
        return Ok(Json(vec![written(&path)]));
    }
    let mut form = <Multipart as axum::extract::FromRequest<()>>::from_request(request, &())
        .await
        .map_err(|e| ApiError::bad_request("invalid_multipart", e.body_text()))?;
    let mut out = Vec::new();
    loop {
        let field = form
            .next_field()
            .await
            .map_err(|e| ApiError::bad_request("invalid_multipart", e.body_text()))?;
        let Some(mut field) = field else { break };
        let named = field.file_name().map(str::to_string);
        let target = match (&query.path, named) {
            (Some(path), _) if out.is_empty() => path.clone(),
            (_, Some(name)) => name,
            (_, None) => {
                return Err(ApiError::bad_request("invalid_multipart", "a file part without a filename or path").into())
            }
        };
        let path = resolve(&target, user.as_deref())?;
        files::write_file(&files, &path, &mut field, None).await?;
        out.push(written(&path));
    }
    if out.is_empty() {
        return Err(ApiError::bad_request("invalid_multipart", "no file in the form").into());
    }
    Ok(Json(out))
}

/// `-rw-r--r--`, as `ls -l` and envd give permissions.
fn permissions(kind: &str, mode: u32) -> String {
    let mut s = String::with_capacity(10);
    s.push(match kind {
        "dir" => 'd',
        "symlink" => 'l',
        _ => '-',
    });
    for shift in [6, 3, 0] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    s
}

/// An entry as envd's `EntryInfo` (protobuf JSON: int64 as a string, enums
/// by name). Owner and group are the sandbox's users by the path: the
/// files API does not report them.
fn entry_info(info: &FileInfo) -> Value {
    let kind = match info.kind.as_str() {
        "dir" => "FILE_TYPE_DIRECTORY",
        "symlink" => "FILE_TYPE_SYMLINK",
        "file" => "FILE_TYPE_FILE",
        _ => "FILE_TYPE_UNSPECIFIED",
    };
    let owner = if info.path.starts_with("/home/user") || info.path.starts_with("/tmp") {
        "user"
    } else {
        "root"
    };
    let modified = std::time::UNIX_EPOCH + std::time::Duration::from_secs_f64(info.modified_unix.max(0.0));
    json!({
        "name": info.name,
        "path": info.path,
        "type": kind,
        "size": info.size.to_string(),
        "mode": info.mode,
        "permissions": permissions(&info.kind, info.mode),
        "owner": owner,
        "group": owner,
        "modifiedTime": rfc3339(modified),
    })
}

/// A field of an RPC's JSON body, by its camelCase or snake_case name.
fn field<'a>(body: &'a Value, camel: &str, snake: &str) -> Option<&'a Value> {
    body.get(camel).or_else(|| body.get(snake))
}

fn string_field(body: &Value, camel: &str, snake: &str) -> Result<String, ConnectError> {
    field(body, camel, snake)
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| ConnectError::invalid(format!("{camel} is required (a string)")))
}

/// Reads a unary Connect request's JSON body, refusing other codecs.
pub(crate) async fn unary_body(headers: &HeaderMap, body: Body) -> Result<Value, ConnectError> {
    let content_type = super::connect::content_type(headers);
    if !content_type.starts_with("application/json") {
        return Err(ConnectError::unsupported_codec(content_type, "application/json"));
    }
    let bytes = axum::body::to_bytes(body, MAX_RPC_BODY)
        .await
        .map_err(|_| ConnectError::new("resource_exhausted", format!("request over {MAX_RPC_BODY} bytes")))?;
    if bytes.is_empty() {
        return Ok(json!({}));
    }
    let value: Value =
        serde_json::from_slice(&bytes).map_err(|e| ConnectError::invalid(format!("request body is not JSON: {e}")))?;
    if !value.is_object() {
        return Err(ConnectError::invalid("request body is not a JSON object"));
    }
    Ok(value)
}

/// `filesystem.Filesystem/<method>`: ListDir, Stat, MakeDir, Remove, Move.
pub(crate) async fn filesystem(
    State(state): State<Arc<AppState>>,
    Extension(call): Extension<SandboxCall>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let body = unary_body(&headers, body).await?;
        let user = basic_user(&headers)?;
        let files = files_as(&state, &call, user.as_deref());
        let path = |camel: &str, snake: &str| -> Result<String, ConnectError> {
            Ok(resolve(&string_field(&body, camel, snake)?, user.as_deref())?)
        };
        match method.as_str() {
            "Stat" => {
                let info = files::stat(&files, path("path", "path")?).await?;
                Ok(json!({"entry": entry_info(&info)}))
            }
            "ListDir" => {
                let root = path("path", "path")?;
                let depth = field(&body, "depth", "depth")
                    .and_then(Value::as_u64)
                    .unwrap_or(1)
                    .max(1);
                let mut entries = Vec::new();
                list_into(&files, &root, depth, &mut entries).await?;
                Ok(json!({"entries": entries}))
            }
            "MakeDir" => {
                let dir = path("path", "path")?;
                if files::stat(&files, dir.clone()).await.is_ok() {
                    return Err(ConnectError::new("already_exists", format!("{dir} already exists")));
                }
                let mut mkdir = files.request(FileOp::MakeDir, &dir);
                mkdir.flags = PARENTS;
                files.op(mkdir).await?;
                let info = files::stat(&files, dir).await?;
                Ok(json!({"entry": entry_info(&info)}))
            }
            "Remove" => {
                let target = path("path", "path")?;
                let mut remove = files.request(FileOp::Remove, &target);
                remove.flags = RECURSIVE;
                files.op(remove).await?;
                Ok(json!({}))
            }
            "Move" => {
                let from = path("source", "source")?;
                let to = path("destination", "destination")?;
                let mut rename = files.request(FileOp::Rename, &from);
                rename.target = to.clone();
                rename.flags = PARENTS;
                files.op(rename).await?;
                let info = files::stat(&files, to).await?;
                Ok(json!({"entry": entry_info(&info)}))
            }
            other => Err(ConnectError::new(
                "unimplemented",
                format!("filesystem.Filesystem/{other} is not supported by zeroboot"),
            )),
        }
    }
    .await;
    match result {
        Ok(value) => Json(value).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Lists `dir` and, below `depth` 1, its subdirectories, into `out`.
async fn list_into(files: &GuestFiles, dir: &str, depth: u64, out: &mut Vec<Value>) -> Result<(), ConnectError> {
    let mut pending = vec![(dir.to_string(), depth)];
    while let Some((dir, depth)) = pending.pop() {
        for info in files::list(files, &dir).await? {
            if out.len() >= MAX_LISTED {
                return Err(ConnectError::new(
                    "resource_exhausted",
                    format!("more than {MAX_LISTED} entries; list with a smaller depth"),
                ));
            }
            if info.kind == "dir" && depth > 1 {
                pending.push((info.path.clone(), depth - 1));
            }
            out.push(entry_info(&info));
        }
    }
    Ok(())
}
