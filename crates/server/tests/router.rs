//! Every status code and error shape of the router, without KVM: the state
//! has no templates, so nothing here forks (tests/tests/server.rs runs a real
//! server against real guests).

// Helpers here are test code too; clippy only exempts #[test] functions.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::connect_info::MockConnectInfo;
use axum::http::{header, Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;
use zeroboot_server::auth::Auth;
use zeroboot_server::{router, AppState, Limits};

const KEY: &str = "test-key-0123456789abcdef";

fn app_with(keys: Option<Vec<String>>, limits: Limits, rate: u32, peer: [u8; 4]) -> axum::Router {
    let rate = NonZeroU32::new(rate).unwrap();
    let state = Arc::new(AppState::new(Vec::new(), limits, Auth::new(keys, rate, rate)));
    router(state).layer(MockConnectInfo(SocketAddr::from((peer, 40000))))
}

fn app() -> axum::Router {
    app_with(None, Limits::default(), 1000, [127, 0, 0, 1])
}

async fn call(app: axum::Router, request: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Value) {
    let response = app.oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, headers, body)
}

fn post(path: &str, body: Value) -> Request<Body> {
    Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

fn get(path: &str) -> Request<Body> {
    Request::builder().uri(path).body(Body::empty()).unwrap()
}

fn error_code(body: &Value) -> &str {
    body["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("not an error body: {body}"))
}

#[tokio::test]
async fn health_lists_templates() {
    for path in ["/v1/health", "/health"] {
        let (status, headers, body) = call(app(), get(path)).await;
        assert_eq!(headers["x-request-id"].len(), 24, "every response carries a request id");
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["status"], "ok");
        assert_eq!(body["templates"], json!([]));
    }
}

#[tokio::test]
async fn malformed_bodies_get_json_errors() {
    let (status, _, body) = call(app(), post("/v1/exec", json!({"language": "python"}))).await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_json")
    );
    let bad = Request::builder()
        .method(Method::POST)
        .uri("/v1/exec")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from("{not json"))
        .unwrap();
    let (status, _, body) = call(app(), bad).await;
    assert_eq!((status, error_code(&body)), (StatusCode::BAD_REQUEST, "invalid_json"));
    let untyped = Request::builder()
        .method(Method::POST)
        .uri("/v1/exec")
        .body(Body::from("{}"))
        .unwrap();
    let (status, _, body) = call(app(), untyped).await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
    );
}

#[tokio::test]
async fn oversized_bodies_and_code_are_413() {
    let limits = Limits {
        max_body_bytes: 1000,
        max_code_bytes: 100,
        ..Limits::default()
    };
    let app = || app_with(None, limits.clone(), 1000, [127, 0, 0, 1]);
    let (status, _, body) = call(app(), post("/v1/exec", json!({"code": "x".repeat(5000)}))).await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large")
    );
    let (status, _, body) = call(app(), post("/v1/exec", json!({"code": "x".repeat(500)}))).await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::PAYLOAD_TOO_LARGE, "code_too_large")
    );
}

#[tokio::test]
async fn unknown_language_template_and_bad_timeout_are_400() {
    let (status, _, body) = call(app(), post("/v1/exec", json!({"code": "1", "language": "cobol"}))).await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::BAD_REQUEST, "unsupported_language")
    );
    assert!(body["error"]["message"].as_str().unwrap().contains("available"));
    let (status, _, body) = call(app(), post("/exec", json!({"code": "1", "template": "nope"}))).await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::BAD_REQUEST, "unknown_template")
    );
    for timeout in [0.0, -1.0, 1e9] {
        let (status, _, body) = call(
            app(),
            post("/v1/exec", json!({"code": "1", "timeout_seconds": timeout})),
        )
        .await;
        assert_eq!(
            (status, error_code(&body)),
            (StatusCode::BAD_REQUEST, "invalid_timeout")
        );
    }
}

#[tokio::test]
async fn batches_are_capped_and_report_errors_per_entry() {
    let limits = Limits {
        max_batch: 2,
        ..Limits::default()
    };
    let app = || app_with(None, limits.clone(), 1000, [127, 0, 0, 1]);
    let three = json!({"executions": [{"code": "1"}, {"code": "2"}, {"code": "3"}]});
    let (status, _, body) = call(app(), post("/v1/exec/batch", three)).await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::BAD_REQUEST, "batch_too_large")
    );
    let two = json!({"executions": [{"code": "1", "language": "ruby"}, {"code": "2", "timeout_seconds": 0}]});
    let (status, _, body) = call(app(), post("/v1/exec/batch", two)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["results"][0]["error"]["code"], "unsupported_language");
    assert_eq!(body["results"][1]["error"]["code"], "invalid_timeout");
}

#[tokio::test]
async fn unknown_paths_and_methods_get_json_errors() {
    let (status, _, body) = call(app(), get("/v2/whatever")).await;
    assert_eq!((status, error_code(&body)), (StatusCode::NOT_FOUND, "not_found"));
    let (status, _, body) = call(app(), get("/v1/exec")).await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
    );
}

#[tokio::test]
async fn without_keys_only_loopback_is_served() {
    let remote = app_with(None, Limits::default(), 1000, [192, 168, 1, 9]);
    let (status, _, body) = call(remote, get("/v1/metrics")).await;
    assert_eq!((status, error_code(&body)), (StatusCode::FORBIDDEN, "forbidden"));
    let (status, _, _) = call(app(), get("/v1/metrics")).await;
    assert_eq!(status, StatusCode::OK);
    // Health stays open for load balancers.
    let remote = app_with(None, Limits::default(), 1000, [192, 168, 1, 9]);
    assert_eq!(call(remote, get("/v1/health")).await.0, StatusCode::OK);
}

#[tokio::test]
async fn keys_are_required_when_configured() {
    let app = || app_with(Some(vec![KEY.into()]), Limits::default(), 1000, [10, 0, 0, 1]);
    let (status, headers, body) = call(app(), get("/v1/metrics")).await;
    assert_eq!((status, error_code(&body)), (StatusCode::UNAUTHORIZED, "unauthorized"));
    assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer");
    let wrong = Request::builder()
        .uri("/v1/metrics")
        .header(header::AUTHORIZATION, format!("Bearer {KEY}x"))
        .body(Body::empty())
        .unwrap();
    assert_eq!(call(app(), wrong).await.0, StatusCode::UNAUTHORIZED);
    let right = Request::builder()
        .uri("/v1/metrics")
        .header(header::AUTHORIZATION, format!("Bearer {KEY}"))
        .body(Body::empty())
        .unwrap();
    let response = app().oneshot(right).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let text = response.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&text).contains("zeroboot_live_sandboxes"));
}

#[tokio::test]
async fn a_caller_over_its_rate_gets_429_with_retry_after() {
    let app = app_with(None, Limits::default(), 1, [127, 0, 0, 1]);
    assert_eq!(call(app.clone(), get("/v1/metrics")).await.0, StatusCode::OK);
    let (status, headers, body) = call(app, get("/v1/metrics")).await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::TOO_MANY_REQUESTS, "rate_limited")
    );
    assert_eq!(headers[header::RETRY_AFTER], "1");
}

#[test]
fn key_files_are_checked() {
    let dir = std::env::temp_dir().join(format!("zeroboot-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good");
    std::fs::write(&good, format!("# ops\n{KEY}\n\n{KEY}2 # ci\n")).unwrap();
    assert_eq!(
        Auth::read_keys(&good).unwrap(),
        vec![KEY.to_string(), format!("{KEY}2")]
    );
    let short = dir.join("short");
    std::fs::write(&short, "abc\n").unwrap();
    assert!(Auth::read_keys(&short).unwrap_err().to_string().contains("line 1"));
    let empty = dir.join("empty");
    std::fs::write(&empty, "# nothing\n").unwrap();
    assert!(Auth::read_keys(&empty).unwrap_err().to_string().contains("no API keys"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn openapi_describes_every_endpoint() {
    let remote = app_with(Some(vec![KEY.into()]), Limits::default(), 1000, [10, 0, 0, 1]);
    let (status, _, spec) = call(remote, get("/v1/openapi.json")).await;
    assert_eq!(status, StatusCode::OK, "the description needs no key");
    assert!(spec["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/v1/exec",
        "/v1/exec/batch",
        "/v1/health",
        "/v1/metrics",
        "/v1/sandboxes",
        "/v1/sandboxes/{id}",
        "/v1/sandboxes/{id}/exec",
        "/v1/sandboxes/{id}/fork",
        "/v1/sandboxes/{id}/files/{path}",
    ] {
        assert!(spec["paths"][path].is_object(), "{path} missing");
    }
    assert_eq!(spec["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    assert!(spec["components"]["schemas"]["ExecResponse"]["properties"]["timed_out"].is_object());
}
