//! What every handler shares: the limits, the templates served, sandbox
//! slots and the admission of a one-shot execution.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use zeroboot_protocol::{Context, DEFAULT_OUTPUT_LIMIT, REQUEST_CAPACITY};

use crate::auth::Auth;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::paused::PausedStore;
use crate::served::Served;
use crate::sessions::Sessions;

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
    /// Long-lived sandboxes per API key (or for loopback clients without keys).
    pub max_sandboxes_per_caller: usize,
    /// Guest RAM, in MiB, that one key's long-lived sandboxes may hold.
    pub max_sandbox_mib_per_caller: u64,
    pub default_sandbox_ttl: Duration,
    pub max_sandbox_ttl: Duration,
    /// Children one fork call may make.
    pub max_fork: usize,
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
            max_sandboxes_per_caller: 64,
            max_sandbox_mib_per_caller: 16 << 10,
            default_sandbox_ttl: Duration::from_secs(300),
            max_sandbox_ttl: Duration::from_secs(24 * 3600),
            max_fork: 16,
        }
    }
}

pub struct AppState {
    pub(crate) templates: BTreeMap<String, Arc<Served>>,
    /// language → template name serving it.
    languages: BTreeMap<String, String>,
    pub(crate) limits: Limits,
    slots: Arc<Semaphore>,
    auth: Arc<Auth>,
    pub(crate) metrics: Metrics,
    pub(crate) sessions: Sessions,
    pub(crate) paused: PausedStore,
    node: Option<String>,
    pub(crate) network: crate::network::NetworkSettings,
}

impl AppState {
    /// The first template given for a language serves it.
    pub fn new(templates: Vec<Served>, limits: Limits, auth: Auth) -> Self {
        let mut languages = BTreeMap::new();
        let mut by_name = BTreeMap::new();
        for served in templates {
            for language in served.runtime.languages {
                languages
                    .entry(language.to_string())
                    .or_insert_with(|| served.name.clone());
            }
            by_name.insert(served.name.clone(), Arc::new(served));
        }
        Self {
            templates: by_name,
            languages,
            slots: Arc::new(Semaphore::new(limits.max_concurrent)),
            sessions: Sessions::new(
                limits.max_sandboxes_per_caller,
                limits.max_sandbox_mib_per_caller,
                limits.default_sandbox_ttl,
                limits.max_sandbox_ttl,
            ),
            limits,
            auth: Arc::new(auth),
            metrics: Metrics::default(),
            paused: PausedStore::default(),
            node: None,
            network: crate::network::NetworkSettings::default(),
        }
    }

    /// How sandboxes that ask for a network get one.
    pub fn with_network(mut self, settings: crate::network::NetworkSettings) -> Self {
        self.network = settings;
        self
    }

    /// This server's node id in a cluster (see [`crate::sessions::valid_node_id`]):
    /// new sandbox ids carry it, and every response says it in
    /// `x-zeroboot-node`.
    pub fn with_node_id(mut self, node: Option<String>) -> Self {
        self.sessions.set_node(node.clone());
        self.node = node;
        self
    }

    pub fn node_id(&self) -> Option<&str> {
        self.node.as_deref()
    }

    /// Where paused sandboxes are written (none: pausing is refused).
    pub fn with_pause_dir(mut self, dir: Option<std::path::PathBuf>) -> Self {
        self.paused = PausedStore::new(dir);
        self
    }

    pub fn auth(&self) -> &Arc<Auth> {
        &self.auth
    }

    pub(crate) fn resolve(&self, language: &str, template: Option<&String>) -> Result<Arc<Served>, ApiError> {
        let name = match template {
            Some(name) => name,
            None => self.languages.get(language).ok_or_else(|| {
                ApiError::bad_request(
                    "unsupported_language",
                    format!(
                        "language {language:?} is not available; available: {}",
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
        if template.is_none() && !served.runtime.languages.contains(&language) {
            return Err(ApiError::internal("language map out of sync"));
        }
        Ok(served.clone())
    }

    /// A context the guest can take (see [`Context::validate`]), or a 400;
    /// with `code_and_stdin` bytes beside it, within the code limit, or a
    /// 413 (the guest gets all three in the mailbox).
    pub(crate) fn validate_context(&self, context: &Context, code_and_stdin: usize) -> Result<(), ApiError> {
        context
            .validate()
            .map_err(|e| ApiError::bad_request("invalid_context", e.to_string()))?;
        self.within_code_limit("code, stdin, env and cwd", code_and_stdin + context.encode().len())
    }

    /// A 413 if `size` bytes of `what` are more than the guest takes.
    fn within_code_limit(&self, what: &str, size: usize) -> Result<(), ApiError> {
        if size > self.limits.max_code_bytes {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "code_too_large",
                format!(
                    "{what} are {size} bytes, more than the {}-byte limit",
                    self.limits.max_code_bytes
                ),
            ));
        }
        Ok(())
    }

    pub(crate) fn validate(&self, code: &str, stdin: &str, timeout_seconds: f64) -> Result<Duration, ApiError> {
        self.within_code_limit("code and stdin", code.len() + stdin.len())?;
        let max = self.limits.max_timeout.as_secs_f64();
        if !(timeout_seconds > 0.0 && timeout_seconds <= max) {
            return Err(ApiError::bad_request(
                "invalid_timeout",
                format!("timeout_seconds must be more than 0 and at most {max}"),
            ));
        }
        Ok(Duration::from_secs_f64(timeout_seconds))
    }

    pub(crate) async fn slot(&self) -> Result<OwnedSemaphorePermit, ApiError> {
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
}
