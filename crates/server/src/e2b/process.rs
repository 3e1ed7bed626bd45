//! E2B's process service: `process.Process/Start` runs a command in the
//! sandbox and streams its output as Connect envelopes (start, data,
//! keepalive, end, then the end of the stream). A command runs as a call
//! of the sandbox, like code: one at a time, each to its end.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Extension, Path, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde::Deserialize;
use serde_json::json;
use zeroboot_protocol::Chunk;

use super::connect::{envelope, read_envelopes, ConnectError, FLAG_END_STREAM, STREAM_JSON};
use super::{basic_user, SandboxCall};
use crate::exec::{ExecRequest, RunContext};
use crate::state::AppState;

/// Longest Start request (the command line and its environment).
const MAX_START_BODY: usize = 1 << 20;
/// How long a command may run when the client sets no deadline.
const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// What the host adds to a command's own deadline, which the guest keeps,
/// before it gives up on the sandbox.
const HOST_GRACE: Duration = Duration::from_secs(10);
/// Longest quiet time between two envelopes: the SDKs ask for a ping every
/// 50 s (`Keepalive-Ping-Interval`).
const MAX_KEEPALIVE: Duration = Duration::from_secs(50);

/// Process ids as the SDK sees them: a command number, not a guest pid
/// (commands run one at a time and have ended before the next call).
static NEXT_PID: AtomicU32 = AtomicU32::new(1000);

#[derive(Debug, Deserialize)]
struct StartRequest {
    process: ProcessConfig,
    #[serde(default)]
    pty: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct ProcessConfig {
    cmd: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    envs: BTreeMap<String, String>,
    #[serde(default)]
    cwd: Option<String>,
}

pub(crate) async fn process(
    State(state): State<Arc<AppState>>,
    Extension(call): Extension<SandboxCall>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match method.as_str() {
        "Start" => match start(state, call, &headers, body).await {
            Ok(response) => response,
            Err(e) => e.into_response(),
        },
        "List" => match super::envd::unary_body(&headers, body).await {
            Ok(_) => Json(json!({"processes": []})).into_response(),
            Err(e) => e.into_response(),
        },
        "SendSignal" | "SendInput" | "CloseStdin" | "Update" | "Connect" | "StreamInput" => ConnectError::new(
            "not_found",
            "no process is running: zeroboot runs each command to its end within its Start call",
        )
        .into_response(),
        other => ConnectError::new(
            "unimplemented",
            format!("process.Process/{other} is not supported by zeroboot"),
        )
        .into_response(),
    }
}

/// `'word'`, for bash.
fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// The code that runs `argv` in the sandbox's runtime, within `limit`, as
/// a child of the agent (whose capture hands its output back), with exit
/// status 124 for a timeout, 127 for a command not found, and 128 + N for
/// signal N.
fn command_code(runtime: &str, argv: &[String], limit: Duration) -> Result<String, ConnectError> {
    let argv_json = serde_json::to_string(argv).map_err(|e| ConnectError::invalid(e.to_string()))?;
    match runtime {
        // In a namespace of its own, so nothing is left in the sandbox's.
        "python" => {
            let script = "import subprocess, sys\n\
                try:\n    r = subprocess.call(ARGV, stdin=subprocess.DEVNULL, timeout=LIMIT)\n\
                except subprocess.TimeoutExpired:\n    print(f'command timed out after {LIMIT} s', file=sys.stderr)\n    r = 124\n\
                except OSError as e:\n    print(f'{ARGV[0]}: {e.strerror}', file=sys.stderr)\n    r = 127\n\
                sys.exit(r if r >= 0 else 128 - r)\n";
            Ok(format!(
                "exec({}, {{\"ARGV\": {argv_json}, \"LIMIT\": {}}})",
                serde_json::to_string(script).map_err(|e| ConnectError::invalid(e.to_string()))?,
                limit.as_secs_f64()
            ))
        }
        "shell" => {
            let words: Vec<String> = argv.iter().map(|w| shell_quote(w)).collect();
            Ok(format!(
                "timeout {} {} </dev/null",
                limit.as_secs_f64(),
                words.join(" ")
            ))
        }
        other => Err(ConnectError::new(
            "unimplemented",
            format!("commands are not supported in {other} sandboxes; use a base or code-interpreter sandbox"),
        )),
    }
}

fn event(value: serde_json::Value) -> Bytes {
    Bytes::from(envelope(0, value.to_string().as_bytes()))
}

async fn start(
    state: Arc<AppState>,
    call: SandboxCall,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ConnectError> {
    let content_type = super::connect::content_type(headers);
    if !content_type.starts_with(STREAM_JSON) {
        return Err(ConnectError::unsupported_codec(content_type, STREAM_JSON));
    }
    let bytes = axum::body::to_bytes(body, MAX_START_BODY)
        .await
        .map_err(|_| ConnectError::new("resource_exhausted", format!("request over {MAX_START_BODY} bytes")))?;
    let envelopes = read_envelopes(&bytes, MAX_START_BODY).map_err(|e| ConnectError::invalid(e.to_string()))?;
    let [only] = envelopes.as_slice() else {
        return Err(ConnectError::invalid(format!(
            "a Start request is one envelope, not {}",
            envelopes.len()
        )));
    };
    if only.flags != 0 {
        return Err(ConnectError::invalid(
            "a Start request's envelope is a message, not an end of stream",
        ));
    }
    let req: StartRequest =
        serde_json::from_slice(only.message).map_err(|e| ConnectError::invalid(format!("Start request: {e}")))?;
    if req.pty.is_some() {
        return Err(ConnectError::new(
            "unimplemented",
            "terminals (pty) are not supported by zeroboot",
        ));
    }
    let limit = headers
        .get("connect-timeout-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(DEFAULT_COMMAND_TIMEOUT, Duration::from_millis)
        .min(state.limits.max_timeout.saturating_sub(HOST_GRACE))
        .max(Duration::from_millis(1));
    let keepalive = headers
        .get("keepalive-ping-interval")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(MAX_KEEPALIVE, Duration::from_secs)
        .clamp(Duration::from_secs(1), MAX_KEEPALIVE);
    let mut argv = vec![req.process.cmd];
    argv.extend(req.process.args);
    let session = call.0;
    let code = command_code(session.served.runtime.name, &argv, limit)?;
    let mut exec = ExecRequest::in_sandbox(code, (limit + HOST_GRACE).as_secs_f64(), String::new());
    exec.stream = true;
    exec.context = RunContext {
        env: req.process.envs,
        cwd: req.process.cwd.filter(|c| !c.is_empty()),
        user: basic_user(headers)?,
    };
    state.validate_context(&exec.context(), exec.code.len())?;
    let pid = NEXT_PID.fetch_add(1, Ordering::Relaxed);

    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    let (body_tx, body_rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::convert::Infallible>>(64);
    let _ = body_tx.send(Ok(event(json!({"event": {"start": {"pid": pid}}})))).await;
    let on_chunk_tx = tx.clone();
    let on_chunk = Box::new(move |chunk: Chunk| {
        for (name, bytes) in [("stdout", &chunk.stdout), ("stderr", &chunk.stderr)] {
            if !bytes.is_empty() {
                let _ = on_chunk_tx.blocking_send(event(json!({"event": {"data": {name: BASE64.encode(bytes)}}})));
            }
        }
    });
    tokio::spawn(async move {
        let outcome = state.exec_in(&session, exec, on_chunk).await;
        let last = match outcome {
            Ok(r) if r.timed_out => ConnectError::new(
                "deadline_exceeded",
                "the command outran its deadline; the sandbox was ended",
            )
            .end_of_stream(),
            Ok(r) => {
                let end = json!({"event": {"end": {
                    "exitCode": r.exit_code,
                    "exited": true,
                    "status": format!("exit status {}", r.exit_code),
                }}});
                let mut bytes = envelope(0, end.to_string().as_bytes());
                bytes.extend(envelope(FLAG_END_STREAM, b"{}"));
                bytes
            }
            Err(e) => ConnectError::from(e).end_of_stream(),
        };
        let _ = tx.send(Bytes::from(last)).await;
    });
    // Forwards what the command writes, with a keepalive event whenever it
    // has been quiet for the interval the client asked.
    tokio::spawn(async move {
        loop {
            match tokio::time::timeout(keepalive, rx.recv()).await {
                Ok(Some(bytes)) => {
                    if body_tx.send(Ok(bytes)).await.is_err() {
                        break;
                    }
                }
                // Both senders are gone: the command's task has sent the end.
                Ok(None) => break,
                Err(_) => {
                    if body_tx
                        .send(Ok(event(json!({"event": {"keepalive": {}}}))))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(body_rx);
    Ok(([(header::CONTENT_TYPE, STREAM_JSON)], Body::from_stream(stream)).into_response())
}
