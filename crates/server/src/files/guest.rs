//! One session's file operations: each a call on the sandbox's thread,
//! under a slot like any call, with the guest's errno turned into the API's
//! errors.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use zeroboot_protocol::exec::{ROOT, USER_UID};
use zeroboot_protocol::files::{FileOp, FileReply, FileRequest};
use zeroboot_sandbox::{Sandbox, SandboxError};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::sessions::Session;
use crate::state::AppState;

/// The longest one guest operation may take: a window of a transfer, or a
/// recursive remove.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(120);

pub(crate) struct GuestFiles {
    state: Arc<AppState>,
    session: Arc<Session>,
    id: String,
    /// Who the operations run as: the session's user.
    pub uid: u32,
    /// Bytes of the sandbox's disk (0 for none).
    pub disk_bytes: u64,
}

impl GuestFiles {
    pub async fn open(state: &Arc<AppState>, caller: Caller, id: &str) -> Result<Self, ApiError> {
        Ok(Self::of(state, state.session(id, caller).await?))
    }

    /// The files of `session`, as its user.
    pub fn of(state: &Arc<AppState>, session: Arc<Session>) -> Self {
        let id = session.id.clone();
        let uid = uid_of(session.context.user.as_deref());
        let disk_bytes = session.served.template.snapshot().state.layout.disk_bytes;
        Self {
            state: state.clone(),
            session,
            id,
            uid,
            disk_bytes,
        }
    }

    pub fn request(&self, op: FileOp, path: &str) -> FileRequest {
        FileRequest::new(op, self.uid, path)
    }

    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Sandbox) -> Result<T, SandboxError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let permit = self.state.slot().await?;
        let result = self
            .session
            .call(move |sandbox| {
                let _permit = permit;
                f(sandbox)
            })
            .await?;
        result.map_err(|e| {
            // The worker or its guest failed: the sandbox cannot be trusted
            // with another call.
            self.state.sessions.forget(&self.id);
            match e {
                SandboxError::Guest(fault) => ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "sandbox_crashed",
                    format!("{fault}: the sandbox failed during a file operation"),
                ),
                other => ApiError::internal(other),
            }
        })
    }

    /// Runs `request`; the guest's errno comes back in the reply.
    pub async fn try_op(&self, request: FileRequest) -> Result<FileReply, ApiError> {
        self.call(move |sandbox| sandbox.file_op(&request, OPERATION_TIMEOUT))
            .await
    }

    /// Runs `request`; a guest error becomes the API's.
    pub async fn op(&self, request: FileRequest) -> Result<Vec<u8>, ApiError> {
        let path = request.path.clone();
        let reply = self.try_op(request).await?;
        if reply.errno != 0 {
            return Err(errno_error(&path, &reply));
        }
        Ok(reply.data)
    }

    pub async fn write_disk(&self, offset: u64, bytes: Vec<u8>) -> Result<(), ApiError> {
        self.call(move |sandbox| sandbox.write_disk(offset, bytes)).await
    }

    pub async fn read_disk(&self, offset: u64, len: u32) -> Result<Vec<u8>, ApiError> {
        self.call(move |sandbox| sandbox.read_disk(offset, len)).await
    }
}

/// The uid of a sandbox's user by name (`root`; anything else is `user`).
pub(crate) fn uid_of(user: Option<&str>) -> u32 {
    if user == Some(ROOT) {
        0
    } else {
        USER_UID
    }
}

/// The API's error for the guest's `errno` on `path`.
pub(crate) fn errno_error(path: &str, reply: &FileReply) -> ApiError {
    let message = if reply.message.is_empty() {
        format!("{path}: error {}", reply.errno)
    } else {
        reply.message.clone()
    };
    let (status, code) = match reply.errno {
        libc::ENOENT | libc::ENOTDIR => (StatusCode::NOT_FOUND, "file_not_found"),
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => (StatusCode::INSUFFICIENT_STORAGE, "disk_full"),
        libc::EACCES | libc::EPERM | libc::EROFS => (StatusCode::FORBIDDEN, "permission_denied"),
        libc::EISDIR => (StatusCode::BAD_REQUEST, "is_a_directory"),
        libc::EEXIST | libc::ENOTEMPTY => (StatusCode::CONFLICT, "file_exists"),
        libc::ELOOP | libc::ENAMETOOLONG | libc::EINVAL | libc::EXDEV | libc::EBUSY => {
            (StatusCode::BAD_REQUEST, "invalid_path")
        }
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "file_error"),
    };
    ApiError::new(status, code, message)
}
