//! The files API of a long-lived sandbox: upload and download, streamed and
//! binary-safe; stat, listing, mkdir, remove and rename. Served by the
//! agent's native half in every runtime, as the session's user; no code
//! runs and the session's namespace is never touched.

pub(crate) mod guest;
mod transfer;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Extension, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use zeroboot_protocol::files::{self as wire, FileOp, PARENTS, RECURSIVE};

use self::guest::GuestFiles;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::served::random_id;
use crate::state::AppState;

/// How long a failed upload's body is still read, so that its client gets
/// the error rather than a broken connection.
const DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Kernel filesystems: not files anyone uploads or downloads.
const NOT_FILES: [&str; 3] = ["/proc", "/sys", "/dev"];

/// A guest path from the URL: absolute, no NUL, no `.` or `..` component,
/// not in a kernel filesystem. A trailing `/` is dropped.
pub(crate) fn guest_path(path: &str) -> Result<String, ApiError> {
    let trimmed = path.trim_matches('/');
    let path = format!("/{trimmed}");
    if path.contains('\0')
        || trimmed
            .split('/')
            .any(|c| c == ".." || c == "." || (c.is_empty() && !trimmed.is_empty()))
    {
        return Err(ApiError::bad_request(
            "invalid_path",
            "a file path is absolute, without '.', '..' or empty components",
        ));
    }
    if NOT_FILES
        .iter()
        .any(|k| path == *k || path.starts_with(&format!("{k}/")))
    {
        return Err(ApiError::bad_request(
            "invalid_path",
            format!("{path} is in a kernel filesystem, outside the sandbox's files"),
        ));
    }
    Ok(path)
}

/// A file, directory or link in the sandbox.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct FileInfo {
    pub name: String,
    pub path: String,
    /// `file`, `dir`, `symlink` or `other`.
    #[serde(rename = "type")]
    pub kind: String,
    pub size: u64,
    /// Permission bits, e.g. 420 (0o644).
    pub mode: u32,
    /// Last modification, seconds since the epoch.
    pub modified_unix: f64,
}

impl FileInfo {
    fn new(entry: wire::Entry, path: String) -> Self {
        let kind = match entry.kind {
            wire::KIND_FILE => "file",
            wire::KIND_DIR => "dir",
            wire::KIND_SYMLINK => "symlink",
            _ => "other",
        };
        Self {
            name: entry.name,
            path,
            kind: kind.into(),
            size: entry.size,
            mode: entry.mode,
            modified_unix: entry.mtime_ns as f64 / 1e9,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Listing {
    pub path: String,
    /// Sorted by name.
    pub entries: Vec<FileInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RenameRequest {
    pub from: String,
    pub to: String,
}

/// Where an upload is written before it replaces `path`: beside it, so the
/// rename is atomic and a failed upload leaves the old file as it was.
fn staging_path(path: &str) -> String {
    let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
    format!("{dir}/.{name}.zeroboot-{}", &random_id()[..12])
}

/// Writes a file in the sandbox from the request body, streamed; creates
/// its parent directories; replaces an existing file only once the whole
/// body is written.
#[utoipa::path(put, path = "/v1/sandboxes/{id}/files/{path}", tag = "files",
    params(("id" = String, Path), ("path" = String, Path, description = "Absolute path in the guest, without the leading /")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses(
        (status = 204, description = "Written"),
        (status = 400, description = "Bad path, or a directory there", body = crate::error::ErrorResponse),
        (status = 403, description = "The session's user may not write there", body = crate::error::ErrorResponse),
        (status = 404, description = "No such sandbox", body = crate::error::ErrorResponse),
        (status = 507, description = "The disk is full; nothing was changed", body = crate::error::ErrorResponse),
    ),
    security(("bearer" = [])))]
pub(crate) async fn put_file(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path((id, path)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let path = guest_path(&path)?;
    let files = GuestFiles::open(&state, caller, &id).await?;
    write_file(&files, &path, &mut body.into_data_stream(), content_length(&headers)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The body's length, when the client said it.
pub(crate) fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// Writes the bytes of `stream` to `path` through a staging file beside it,
/// which replaces `path` only once the whole body is written.
pub(crate) async fn write_file<E: std::fmt::Display>(
    files: &GuestFiles,
    path: &str,
    stream: &mut (impl tokio_stream::Stream<Item = Result<axum::body::Bytes, E>> + Unpin),
    expected: Option<u64>,
) -> Result<(), ApiError> {
    let staging = staging_path(path);
    let result = match transfer::upload(files, &staging, stream, expected).await {
        Ok(_) => {
            let mut rename = files.request(FileOp::Rename, &staging);
            rename.target = path.to_string();
            files.op(rename).await.map(|_| ())
        }
        Err(e) => Err(e),
    };
    if let Err(mut e) = result {
        let _ = files.op(files.request(FileOp::Remove, &staging)).await;
        transfer::drain(stream, DRAIN_LIMIT).await;
        // The client named `path`, not the staging file.
        e.message = e.message.replace(&staging, path);
        return Err(e);
    }
    Ok(())
}

/// Reads a file from the sandbox, streamed.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/files/{path}", tag = "files",
    params(("id" = String, Path), ("path" = String, Path, description = "Absolute path in the guest, without the leading /")),
    responses(
        (status = 200, description = "The file's bytes", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 400, description = "Bad path, or a directory", body = crate::error::ErrorResponse),
        (status = 404, description = "No such sandbox or file", body = crate::error::ErrorResponse),
    ),
    security(("bearer" = [])))]
pub(crate) async fn get_file(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path((id, path)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let path = guest_path(&path)?;
    let files = GuestFiles::open(&state, caller, &id).await?;
    read_file(files, path).await
}

/// `path`'s bytes as a streamed response.
pub(crate) async fn read_file(files: GuestFiles, path: String) -> Result<Response, ApiError> {
    let download = transfer::open_download(&files, &path).await?;
    let size = download.size;
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tokio::spawn(transfer::send_download(files, path, download, tx));
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, size.to_string()),
        ],
        body,
    )
        .into_response())
}

/// Removes a file, or a directory with everything in it.
#[utoipa::path(delete, path = "/v1/sandboxes/{id}/files/{path}", tag = "files",
    params(("id" = String, Path), ("path" = String, Path)),
    responses(
        (status = 204, description = "Removed"),
        (status = 404, description = "No such sandbox or file", body = crate::error::ErrorResponse),
    ),
    security(("bearer" = [])))]
pub(crate) async fn delete_file(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path((id, path)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let path = guest_path(&path)?;
    let files = GuestFiles::open(&state, caller, &id).await?;
    let mut remove = files.request(FileOp::Remove, &path);
    remove.flags = RECURSIVE;
    files.op(remove).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A file's or directory's metadata (a symlink's own).
#[utoipa::path(get, path = "/v1/sandboxes/{id}/stat/{path}", tag = "files",
    params(("id" = String, Path), ("path" = String, Path)),
    responses(
        (status = 200, description = "Metadata", body = FileInfo),
        (status = 404, description = "No such sandbox or file", body = crate::error::ErrorResponse),
    ),
    security(("bearer" = [])))]
pub(crate) async fn stat_file(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path((id, path)): Path<(String, String)>,
) -> Result<Json<FileInfo>, ApiError> {
    let path = guest_path(&path)?;
    let files = GuestFiles::open(&state, caller, &id).await?;
    Ok(Json(stat(&files, path).await?))
}

pub(crate) async fn stat(files: &GuestFiles, path: String) -> Result<FileInfo, ApiError> {
    let data = files.op(files.request(FileOp::Stat, &path)).await?;
    let entry = wire::decode_entries(&data)
        .map_err(ApiError::internal)?
        .pop()
        .ok_or_else(|| ApiError::internal("the guest's stat reply is empty"))?;
    Ok(FileInfo::new(entry, path))
}

/// A directory's entries.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/dirs/{path}", tag = "files",
    params(("id" = String, Path), ("path" = String, Path)),
    responses(
        (status = 200, description = "Entries, sorted by name", body = Listing),
        (status = 404, description = "No such sandbox or directory", body = crate::error::ErrorResponse),
    ),
    security(("bearer" = [])))]
pub(crate) async fn list_dir(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path((id, path)): Path<(String, String)>,
) -> Result<Json<Listing>, ApiError> {
    listing(&state, caller, &id, &path).await
}

/// The root directory's entries.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/dirs", tag = "files",
    params(("id" = String, Path)),
    responses(
        (status = 200, description = "Entries of /, sorted by name", body = Listing),
        (status = 404, description = "No such sandbox", body = crate::error::ErrorResponse),
    ),
    security(("bearer" = [])))]
pub(crate) async fn list_root(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Listing>, ApiError> {
    listing(&state, caller, &id, "/").await
}

async fn listing(state: &Arc<AppState>, caller: Caller, id: &str, path: &str) -> Result<Json<Listing>, ApiError> {
    let path = guest_path(path)?;
    let files = GuestFiles::open(state, caller, id).await?;
    let entries = list(&files, &path).await?;
    Ok(Json(Listing { path, entries }))
}

/// The entries of directory `path`, sorted by name.
pub(crate) async fn list(files: &GuestFiles, path: &str) -> Result<Vec<FileInfo>, ApiError> {
    let mut entries: Vec<FileInfo> = transfer::list(files, path)
        .await?
        .into_iter()
        .map(|e| {
            let child = format!("{}/{}", path.trim_end_matches('/'), e.name);
            FileInfo::new(e, child)
        })
        .collect();
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(entries)
}

/// Makes a directory and its parents; an existing one is fine.
#[utoipa::path(put, path = "/v1/sandboxes/{id}/dirs/{path}", tag = "files",
    params(("id" = String, Path), ("path" = String, Path)),
    responses(
        (status = 204, description = "The directory exists"),
        (status = 409, description = "A file is in the way", body = crate::error::ErrorResponse),
    ),
    security(("bearer" = [])))]
pub(crate) async fn make_dir(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path((id, path)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let path = guest_path(&path)?;
    let files = GuestFiles::open(&state, caller, &id).await?;
    let mut mkdir = files.request(FileOp::MakeDir, &path);
    mkdir.flags = PARENTS;
    let reply = files.try_op(mkdir).await?;
    match reply.errno {
        0 => Ok(StatusCode::NO_CONTENT),
        libc::ENOTDIR | libc::EEXIST => Err(ApiError::new(
            StatusCode::CONFLICT,
            "file_exists",
            format!("{path}: a file that is not a directory is in the way"),
        )),
        _ => Err(guest::errno_error(&path, &reply)),
    }
}

/// Moves a file or directory, creating the target's parents; replaces a
/// file at the target.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/rename", tag = "files",
    params(("id" = String, Path)),
    request_body = RenameRequest,
    responses(
        (status = 204, description = "Moved"),
        (status = 404, description = "No such sandbox or file", body = crate::error::ErrorResponse),
    ),
    security(("bearer" = [])))]
pub(crate) async fn rename(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Json(req): Json<RenameRequest>,
) -> Result<StatusCode, ApiError> {
    let from = guest_path(&req.from)?;
    let to = guest_path(&req.to)?;
    let files = GuestFiles::open(&state, caller, &id).await?;
    let mut rename = files.request(FileOp::Rename, &from);
    rename.target = to;
    rename.flags = PARENTS;
    files.op(rename).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_absolute_and_plain() {
        assert_eq!(guest_path("home/user/a.txt").unwrap(), "/home/user/a.txt");
        assert_eq!(guest_path("/home/user/dir/").unwrap(), "/home/user/dir");
        assert_eq!(guest_path("").unwrap(), "/");
        for bad in [
            "home/../etc",
            "a/./b",
            "a//b",
            "a\0b",
            "proc/self/mem",
            "dev",
            "sys/kernel",
        ] {
            assert!(guest_path(bad).is_err(), "{bad:?}");
        }
        assert!(guest_path("home/user/devices").is_ok());
        let staged = staging_path("/home/user/a.txt");
        assert!(staged.starts_with("/home/user/.a.txt.zeroboot-"), "{staged}");
    }
}
