//! Paused sandboxes on disk: what a sandbox had changed since its template
//! (a [`LiveSnapshot`]: machine state and changed guest pages, disk
//! included) and what the server knew of it, one directory each under the
//! server's pause directory. They outlive the server: a restarted server
//! lists them and resumes them on request.
//!
//! ```text
//! <dir>/<id>/sandbox.json   PausedRecord
//! <dir>/<id>/memory.zblive  the live snapshot (vmm::snapshot::live)
//! ```
//! A pause is written in `<dir>/.staging-<id>` and renamed into place, so a
//! crash leaves a whole paused sandbox or none.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use zeroboot_vmm::snapshot::{live, SnapshotError};
use zeroboot_vmm::LiveSnapshot;

use crate::error::ApiError;
use crate::sessions::{CodeContext, SessionInfo};

const RECORD: &str = "sandbox.json";
const MEMORY: &str = "memory.zblive";

/// What the server keeps of a paused sandbox besides its memory.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PausedRecord {
    pub id: String,
    /// The served template it was forked from, by name...
    pub template: String,
    /// ...and by build: a template rebuilt since cannot resume it.
    pub template_build: u32,
    /// The sandbox it was forked from, if it was.
    #[serde(default)]
    pub parent: Option<String>,
    /// Its owner's key, hashed ([`crate::auth::Auth::owner_mark`]): key
    /// indices change when the key file does.
    pub owner: String,
    pub ttl_seconds: f64,
    pub cwd: Option<String>,
    pub env: BTreeMap<String, String>,
    pub user: Option<String>,
    pub access_token: String,
    pub alias: String,
    pub metadata: BTreeMap<String, String>,
    pub started_unix: f64,
    pub paused_unix: f64,
    /// What was left of its E2B timeout when it was paused.
    pub timeout_left_seconds: Option<f64>,
    /// Guest memory it had changed, in bytes (the size of what was saved).
    pub changed_bytes: u64,
    #[serde(default)]
    pub code_contexts: BTreeMap<String, CodeContext>,
    /// What it may reach once resumed (absent in records without a network).
    #[serde(default)]
    pub network: Option<crate::network::NetworkRequest>,
}

impl PausedRecord {
    /// How `/v1/sandboxes` shows it.
    pub fn info(&self) -> SessionInfo {
        SessionInfo {
            id: self.id.clone(),
            template: self.template.clone(),
            parent: self.parent.clone(),
            ttl_seconds: self.ttl_seconds,
            idle_seconds: 0.0,
            state: "paused".into(),
        }
    }
}

/// The pause directory, or none (pausing is then refused).
#[derive(Debug, Clone, Default)]
pub struct PausedStore {
    dir: Option<PathBuf>,
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> ApiError {
    ApiError::internal(format!("{what} {}: {e}", path.display()))
}

/// A sandbox id names a directory: nothing but what our ids are made of.
fn plain_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl PausedStore {
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self { dir }
    }

    fn dir(&self) -> Result<&Path, ApiError> {
        self.dir.as_deref().ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_IMPLEMENTED,
                "pause_disabled",
                "this server has no pause directory (zeroboot serve --pause-dir)",
            )
        })
    }

    /// Writes a paused sandbox, replacing one of the same id.
    pub fn save(&self, record: &PausedRecord, live: &LiveSnapshot) -> Result<(), ApiError> {
        let dir = self.dir()?;
        if !plain_id(&record.id) {
            return Err(ApiError::internal("a sandbox id that cannot name a directory"));
        }
        // Only the server's user may read them: they hold the sandbox's
        // memory and its access token.
        let private = || {
            let mut builder = std::fs::DirBuilder::new();
            std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
            builder
        };
        private()
            .recursive(true)
            .create(dir)
            .map_err(|e| io_error("creating", dir, e))?;
        let staging = dir.join(format!(".staging-{}", record.id));
        let _ = std::fs::remove_dir_all(&staging);
        private()
            .create(&staging)
            .map_err(|e| io_error("creating", &staging, e))?;
        let written = (|| {
            live::write(&staging.join(MEMORY), live).map_err(ApiError::internal)?;
            let json = serde_json::to_vec_pretty(record).map_err(ApiError::internal)?;
            let path = staging.join(RECORD);
            std::fs::write(&path, json).map_err(|e| io_error("writing", &path, e))?;
            let target = dir.join(&record.id);
            let _ = std::fs::remove_dir_all(&target);
            std::fs::rename(&staging, &target).map_err(|e| io_error("renaming", &staging, e))
        })();
        if written.is_err() {
            let _ = std::fs::remove_dir_all(&staging);
        }
        written
    }

    /// Every paused sandbox whose record reads; damaged ones are logged and
    /// left for [`PausedStore::load`] to refuse by name.
    pub fn list(&self) -> Vec<PausedRecord> {
        let Some(dir) = &self.dir else {
            return Vec::new();
        };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut out: Vec<PausedRecord> = entries
            .flatten()
            .filter(|e| e.file_name().to_str().is_some_and(plain_id))
            .filter_map(|e| match self.record(&e.path()) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!("paused sandbox skipped: {}", e.message);
                    None
                }
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    fn record(&self, at: &Path) -> Result<PausedRecord, ApiError> {
        let path = at.join(RECORD);
        let bytes = std::fs::read(&path).map_err(|e| io_error("reading", &path, e))?;
        serde_json::from_slice(&bytes).map_err(|e| damaged(at, &e.to_string()))
    }

    /// The record of paused sandbox `id`, if there is one.
    pub fn get(&self, id: &str) -> Result<Option<PausedRecord>, ApiError> {
        let Some(dir) = &self.dir else {
            return Ok(None);
        };
        if !plain_id(id) || !dir.join(id).is_dir() {
            return Ok(None);
        }
        self.record(&dir.join(id)).map(Some)
    }

    /// Its memory, checked (magic, version, length, CRC) before it is decoded.
    pub fn memory(&self, id: &str) -> Result<LiveSnapshot, ApiError> {
        let at = self.dir()?.join(id);
        live::read(&at.join(MEMORY)).map_err(|e| match e {
            SnapshotError::Codec { source, .. } => damaged(&at, &source.to_string()),
            SnapshotError::Io { source, .. } => damaged(&at, &format!("its memory file cannot be read ({source})")),
            other => damaged(&at, &other.to_string()),
        })
    }

    pub fn remove(&self, id: &str) -> Result<bool, ApiError> {
        let Some(dir) = &self.dir else {
            return Ok(false);
        };
        if !plain_id(id) {
            return Ok(false);
        }
        let at = dir.join(id);
        match std::fs::remove_dir_all(&at) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_error("removing", &at, e)),
        }
    }
}

fn damaged(at: &Path, why: &str) -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "paused_state_damaged",
        format!(
            "the saved state of paused sandbox {} is damaged and cannot be resumed: {why}",
            at.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ),
    )
}
