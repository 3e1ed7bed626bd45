//! The router: every route, the request-id and panic layers, and the serve
//! loop with its reaper of idle sandboxes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::DefaultBodyLimit;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post, put};
use axum::{middleware, Router};

use crate::error::ApiError;
use crate::exec::{exec, exec_batch};
use crate::files::{delete_file, get_file, list_dir, list_root, make_dir, put_file, rename, stat_file};
use crate::pause::pause_sandbox;
use crate::ports::{proxy_path, proxy_root};
use crate::sandboxes::{create_sandbox, delete_sandbox, fork_sandbox, get_sandbox, list_sandboxes, sandbox_exec};
use crate::served::random_id;
use crate::service::{health, method_not_allowed, metrics, not_found};
use crate::state::AppState;
use crate::{auth, e2b, openapi};

/// Gives every response an `x-request-id` (the execution id is separate,
/// in exec results) and logs each request with it.
async fn request_id(request: axum::extract::Request, next: middleware::Next) -> Response {
    let id = random_id();
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let started = Instant::now();
    let mut response = next.run(request).await;
    tracing::info!(
        target: crate::LOG_TARGET,
        request_id = %id,
        %method,
        %path,
        status = response.status().as_u16(),
        ms = started.elapsed().as_secs_f64() * 1e3,
        "request"
    );
    if let Ok(value) = header::HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

/// Names the node that answered, in a cluster (`--node-id`).
async fn node_header(
    axum::extract::State(state): axum::extract::State<Arc<AppState>>,
    request: axum::extract::Request,
    next: middleware::Next,
) -> Response {
    let mut response = next.run(request).await;
    if let Some(value) = state.node_id().and_then(|n| header::HeaderValue::from_str(n).ok()) {
        response.headers_mut().insert("x-zeroboot-node", value);
    }
    response
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::internal("a handler panicked").into_response()
}

/// The API. Serve it with connection info (see [`serve`]): without API keys
/// only loopback clients are let in.
pub fn router(state: Arc<AppState>) -> Router {
    let authed = Router::new()
        .route("/v1/exec", post(exec))
        .route("/exec", post(exec))
        .route("/v1/exec/batch", post(exec_batch))
        .route("/v1/metrics", get(metrics))
        .route("/v1/sandboxes", post(create_sandbox).get(list_sandboxes))
        .route("/v1/sandboxes/{id}", get(get_sandbox).delete(delete_sandbox))
        .route("/v1/sandboxes/{id}/exec", post(sandbox_exec))
        .route("/v1/sandboxes/{id}/fork", post(fork_sandbox))
        .route("/v1/sandboxes/{id}/pause", post(pause_sandbox))
        .route(
            "/v1/sandboxes/{id}/files/{*path}",
            put(put_file).get(get_file).delete(delete_file),
        )
        .route("/v1/sandboxes/{id}/stat/{*path}", get(stat_file))
        .route("/v1/sandboxes/{id}/dirs", get(list_root))
        .route("/v1/sandboxes/{id}/dirs/{*path}", get(list_dir).put(make_dir))
        .route("/v1/sandboxes/{id}/rename", post(rename))
        .route("/v1/sandboxes/{id}/ports/{port}", any(proxy_root))
        .route("/v1/sandboxes/{id}/ports/{port}/", any(proxy_root))
        .route("/v1/sandboxes/{id}/ports/{port}/{*path}", any(proxy_path))
        .merge(e2b::control_routes())
        .route_layer(middleware::from_fn_with_state(state.auth().clone(), auth::require));
    let sandbox_calls = e2b::sandbox_routes(state.clone());
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/openapi.json", get(openapi::serve))
        .route("/health", get(health))
        .merge(authed)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.limits.max_body_bytes))
        // E2B's sandbox calls name their sandbox in a header, on paths of
        // their own.
        .layer(middleware::from_fn_with_state(sandbox_calls, e2b::dispatch))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panic_response))
        .layer(middleware::from_fn(request_id))
        .layer(middleware::from_fn_with_state(state.clone(), node_header))
        .with_state(state)
}

/// Serves the API on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let reaper_state = state.clone();
    let reaper = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let removed = reaper_state.sessions.reap();
            if removed > 0 {
                tracing::info!(target: crate::LOG_TARGET, "removed {removed} idle sandboxes");
            }
        }
    });
    use axum::serve::ListenerExt;
    // Streamed answers (Server-Sent Events, E2B's NDJSON and Connect
    // streams) are many small writes: with Nagle's algorithm each one after
    // the first waits for the client's delayed ACK, 40 ms, measured as a
    // second `run_code` taking 44 ms.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(target: crate::LOG_TARGET, "TCP_NODELAY: {e}");
        }
    });
    let served = axum::serve(
        listener,
        router(state).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await;
    reaper.abort();
    served
}
