//! The service itself: health, metrics, and the answers to unknown paths
//! and methods.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::ApiError;
use crate::state::AppState;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct TemplateHealth {
    pub name: String,
    /// The runtime's canonical language (python, node, bash).
    pub language: String,
    /// Every `language` value this template serves (`javascript` too for node).
    pub languages: Vec<String>,
    /// The last VM this template prepared (for its pool or a request)
    /// came up: it can fork now. False after a failure, until one succeeds.
    pub ready: bool,
    pub memory_mib: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Health {
    /// `ok`, or `degraded` when a template is not ready.
    pub status: String,
    pub templates: Vec<TemplateHealth>,
    pub live_sandboxes: u64,
    pub max_concurrent: usize,
}

/// Templates and their readiness. Needs no key.
#[utoipa::path(get, path = "/v1/health", tag = "service",
    responses((status = 200, description = "Serving", body = Health)))]
pub(crate) async fn health(State(state): State<Arc<AppState>>) -> Json<Health> {
    let templates = state
        .templates
        .values()
        .map(|s| TemplateHealth {
            name: s.name.clone(),
            language: s.runtime.language().to_string(),
            languages: s.runtime.languages.iter().map(|l| l.to_string()).collect(),
            ready: s.template.can_fork(),
            memory_mib: s.memory_mib(),
        })
        .collect::<Vec<_>>();
    let status = if templates.iter().all(|t| t.ready) {
        "ok"
    } else {
        "degraded"
    };
    Json(Health {
        status: status.into(),
        templates,
        live_sandboxes: state.metrics.live_sandboxes.get().max(0) as u64 + state.sessions.count() as u64,
        max_concurrent: state.limits.max_concurrent,
    })
}

/// Prometheus metrics (OpenMetrics text).
#[utoipa::path(get, path = "/v1/metrics", tag = "service",
    responses((status = 200, description = "Metrics", content_type = "application/openmetrics-text", body = String)),
    security(("bearer" = [])))]
pub(crate) async fn metrics(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let text = state.metrics.render().map_err(ApiError::internal)?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

pub(crate) async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

pub(crate) async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not take that method",
    )
}
