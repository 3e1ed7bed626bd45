//! Pausing a long-lived sandbox to disk and resuming it, in this server or
//! in a later one: `POST /v1/sandboxes/{id}/pause`, E2B's pause and
//! connect, and the resume that any call to a paused sandbox makes.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::paused::PausedRecord;
use crate::sessions::{Session, SessionOptions};
use crate::state::AppState;
use zeroboot_protocol::Context;

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "sandbox_not_found", format!("no sandbox {id}"))
}

impl AppState {
    /// Sandbox `id` of `caller`, resumed first if it is paused.
    pub(crate) async fn session(self: &Arc<Self>, id: &str, caller: Caller) -> Result<Arc<Session>, ApiError> {
        match self.sessions.get(id, caller) {
            Ok(session) => Ok(session),
            Err(e) if e.status == StatusCode::NOT_FOUND => match self.paused_of(id, caller)? {
                Some(_) => match self.resume(id, caller).await {
                    // Another call resumed it first: use that one.
                    Err(e) if e.code == "sandbox_exists" => self.sessions.get(id, caller),
                    resumed => resumed,
                },
                None => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    /// The record of `caller`'s paused sandbox `id`.
    pub(crate) fn paused_of(&self, id: &str, caller: Caller) -> Result<Option<PausedRecord>, ApiError> {
        let mark = self.auth().owner_mark(caller);
        Ok(self.paused.get(id)?.filter(|r| r.owner == mark))
    }

    /// `caller`'s paused sandboxes.
    pub(crate) fn paused_list(&self, caller: Caller) -> Vec<PausedRecord> {
        let mark = self.auth().owner_mark(caller);
        self.paused.list().into_iter().filter(|r| r.owner == mark).collect()
    }

    /// Writes sandbox `id` to the pause directory and ends its VM. What it
    /// saves is what the sandbox changed since its template, and its
    /// machine state.
    pub(crate) async fn pause(self: &Arc<Self>, id: &str, caller: Caller) -> Result<PausedRecord, ApiError> {
        if self.paused_of(id, caller)?.is_some() && self.sessions.get(id, caller).is_err() {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "already_paused",
                format!("sandbox {id} is already paused"),
            ));
        }
        let session = self.sessions.get(id, caller)?;
        let live = session
            .call(|sandbox| sandbox.snapshot_live())
            .await?
            .map_err(ApiError::internal)?;
        let now = SystemTime::now();
        let record = PausedRecord {
            id: session.id.clone(),
            template: session.served.name.clone(),
            template_build: session.served.build_id(),
            parent: session.parent.clone(),
            owner: self.auth().owner_mark(caller),
            ttl_seconds: session.ttl.as_secs_f64(),
            cwd: session.context.cwd.clone(),
            env: session.context.env.clone(),
            user: session.context.user.clone(),
            access_token: session.access_token.clone(),
            alias: session.alias.clone(),
            metadata: session.metadata.clone(),
            started_unix: unix(session.started),
            paused_unix: unix(now),
            timeout_left_seconds: session
                .ends()
                .map(|e| e.duration_since(now).map_or(0.0, |d| d.as_secs_f64())),
            changed_bytes: live.changed_bytes(),
            code_contexts: session.code_contexts.lock().map(|c| c.clone()).unwrap_or_default(),
            network: session.network.clone(),
        };
        let paused = self.clone();
        let saved = record.clone();
        tokio::task::spawn_blocking(move || paused.paused.save(&saved, &live))
            .await
            .map_err(ApiError::internal)??;
        // Ordering: saved first, then removed; a failed save leaves the
        // sandbox running.
        self.sessions.forget(id);
        Ok(record)
    }

    /// Makes paused sandbox `id` run again, with its id, token and state,
    /// and removes it from the pause directory.
    pub(crate) async fn resume(self: &Arc<Self>, id: &str, caller: Caller) -> Result<Arc<Session>, ApiError> {
        let record = self.paused_of(id, caller)?.ok_or_else(|| not_found(id))?;
        let served = self.templates.get(&record.template).cloned().ok_or_else(|| {
            ApiError::new(
                StatusCode::CONFLICT,
                "template_not_served",
                format!(
                    "sandbox {id} was paused from template {:?}, which this server does not serve",
                    record.template
                ),
            )
        })?;
        if served.build_id() != record.template_build {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "template_rebuilt",
                format!(
                    "sandbox {id} was paused from another build of template {:?}; it cannot resume on this one",
                    record.template
                ),
            ));
        }
        let store = self.paused.clone();
        let load_id = id.to_string();
        let live = tokio::task::spawn_blocking(move || store.memory(&load_id))
            .await
            .map_err(ApiError::internal)??;
        let _reserved = self.sessions.reserve(caller, 1, served.memory_mib())?;
        let context = Context {
            cwd: record.cwd.clone(),
            env: record.env.clone(),
            user: record.user.clone(),
        };
        let options = SessionOptions {
            parent: record.parent.clone(),
            context,
            id: Some(record.id.clone()),
            access_token: Some(record.access_token.clone()),
            started: Some(UNIX_EPOCH + Duration::from_secs_f64(record.started_unix.max(0.0))),
            alias: Some(record.alias.clone()),
            metadata: record.metadata.clone(),
            ends: record
                .timeout_left_seconds
                .map(|left| SystemTime::now() + Duration::from_secs_f64(left.max(1.0))),
            code_contexts: record.code_contexts.clone(),
            network: record.network.clone(),
        };
        let network = self.network.config_for(record.network.as_ref())?;
        let ttl = Duration::from_secs_f64(record.ttl_seconds.max(1.0));
        let session = self
            .sessions
            .start(served, caller, ttl, options, move |served| {
                served.template.fork_live(&live, network)
            })
            .await?;
        // Ordering: running first, then the saved state goes; a failed
        // start leaves it paused.
        self.paused.remove(id)?;
        Ok(session)
    }

    /// Removes a running or paused sandbox; false if there was none.
    pub(crate) fn kill(&self, id: &str, caller: Caller) -> Result<bool, ApiError> {
        let running = self.sessions.remove(id, caller).is_ok();
        let paused = match self.paused_of(id, caller) {
            Ok(Some(_)) => self.paused.remove(id)?,
            Ok(None) => false,
            // A record too damaged to name its owner can only be removed;
            // its id (96 random bits) is what the caller proves.
            Err(e) if e.code == "paused_state_damaged" => self.paused.remove(id)?,
            Err(e) => return Err(e),
        };
        Ok(running || paused)
    }
}

/// Saves a sandbox to disk and frees its VM; the next call to it resumes it.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/pause", tag = "sandboxes", params(("id" = String, Path)),
    responses(
        (status = 200, description = "Paused", body = crate::sessions::SessionInfo),
        (status = 404, description = "No such sandbox", body = crate::error::ErrorResponse),
        (status = 409, description = "Already paused", body = crate::error::ErrorResponse),
        (status = 501, description = "The server has no pause directory", body = crate::error::ErrorResponse),
    ),
    security(("bearer" = [])))]
pub(crate) async fn pause_sandbox(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<axum::Json<crate::sessions::SessionInfo>, ApiError> {
    let record = state.pause(&id, caller).await?;
    Ok(axum::Json(record.info()))
}
