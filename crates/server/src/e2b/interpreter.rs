//! E2B's code interpreter (port 49999): `/execute` runs code as a notebook
//! cell and streams newline-delimited JSON events (stdout, stderr, rich
//! results, an error with its traceback, the end), and `/contexts` makes
//! namespaces of their own. A cell runs through the Python agent's
//! `run_cell`, in the sandbox's namespace or a context's.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::rejection::JsonRejection;
use axum::extract::{Extension, Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use zeroboot_protocol::Chunk;

use super::{E2bError, SandboxCall};
use crate::error::ApiError;
use crate::exec::{ExecRequest, ResultLines, RichResult, RunContext};
use crate::sessions::{CodeContext, Session};
use crate::state::AppState;

const HOME: &str = "/home/user";

#[derive(Debug, Deserialize)]
pub(crate) struct ExecuteRequest {
    code: String,
    #[serde(default)]
    context_id: Option<String>,
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    env_vars: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct NewContext {
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    cwd: Option<String>,
}

fn python_only(session: &Session, language: Option<&str>) -> Result<(), ApiError> {
    if session.served.runtime.name != "python" {
        return Err(ApiError::bad_request(
            "unsupported_language",
            format!(
                "this sandbox's template ({}) does not run Python: use code-interpreter-v1 or base",
                session.served.name
            ),
        ));
    }
    match language {
        None | Some("python") | Some("python3") => Ok(()),
        Some(other) => Err(ApiError::bad_request(
            "unsupported_language",
            format!("language {other:?} is not available: zeroboot's code interpreter runs python"),
        )),
    }
}

fn context_not_found(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "context_not_found",
        format!("context {id} not found"),
    )
}

/// The Python line that runs `code` through the agent's `run_cell`.
fn cell_code(code: &str, context: Option<&str>) -> Result<String, ApiError> {
    // A JSON string is a Python string literal: serde_json escapes only
    // quotes, backslashes and control characters, all as Python reads them.
    let literal = |s: &str| serde_json::to_string(s).map_err(ApiError::internal);
    let context = match context {
        Some(id) => literal(id)?,
        None => "None".to_string(),
    };
    Ok(format!(
        "__import__(\"sys\").modules[\"__main__\"].run_cell({}, {context})",
        literal(code)?
    ))
}

fn line(value: Value) -> Bytes {
    let mut bytes = value.to_string().into_bytes();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

fn now_ns() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

/// MIME types and the fields E2B's result events carry them in.
const RESULT_FIELDS: [(&str, &str); 10] = [
    ("text/plain", "text"),
    ("text/html", "html"),
    ("text/markdown", "markdown"),
    ("image/svg+xml", "svg"),
    ("image/png", "png"),
    ("image/jpeg", "jpeg"),
    ("application/pdf", "pdf"),
    ("text/latex", "latex"),
    ("application/json", "json"),
    ("application/javascript", "javascript"),
];

/// A result line of the agent's as E2B's event.
fn result_event(result: &RichResult) -> Value {
    if result.kind == "error" {
        let text = |k: &str| {
            result
                .data
                .get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        return json!({"type": "error", "name": text("name"), "value": text("value"), "traceback": text("traceback")});
    }
    let mut event = Map::new();
    event.insert("type".into(), "result".into());
    event.insert("is_main_result".into(), (result.kind == "execute_result").into());
    let mut extra = Map::new();
    for (mime, value) in &result.data {
        match RESULT_FIELDS.iter().find(|(m, _)| m == mime) {
            Some((_, field)) => {
                event.insert((*field).into(), value.clone());
            }
            None => {
                extra.insert(mime.clone(), value.clone());
            }
        }
    }
    if !extra.is_empty() {
        event.insert("extra".into(), Value::Object(extra));
    }
    Value::Object(event)
}

pub(crate) async fn execute(
    State(state): State<Arc<AppState>>,
    Extension(call): Extension<SandboxCall>,
    body: Result<Json<ExecuteRequest>, JsonRejection>,
) -> Result<Response, E2bError> {
    let Json(req) = body.map_err(ApiError::from)?;
    let session = call.0;
    python_only(&session, req.language.as_deref())?;
    let cwd = match &req.context_id {
        Some(id) => {
            let contexts = session
                .code_contexts
                .lock()
                .map_err(|_| ApiError::internal("contexts lock poisoned"))?;
            Some(contexts.get(id).ok_or_else(|| context_not_found(id))?.cwd.clone())
        }
        None => None,
    };
    let code = cell_code(&req.code, req.context_id.as_deref())?;
    let mut exec = ExecRequest::in_sandbox(code, state.limits.max_timeout.as_secs_f64(), String::new());
    exec.stream = true;
    exec.context = RunContext {
        env: req.env_vars.unwrap_or_default(),
        cwd,
        user: None,
    };
    state.validate_context(&exec.context(), exec.code.len())?;
    let count = session.executions.fetch_add(1, Ordering::Relaxed) + 1;

    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::convert::Infallible>>(64);
    let _ = tx
        .send(Ok(line(
            json!({"type": "number_of_executions", "execution_count": count}),
        )))
        .await;
    let chunk_tx = tx.clone();
    let mut results = ResultLines::default();
    let on_chunk = Box::new(move |chunk: Chunk| {
        for (name, bytes) in [("stdout", &chunk.stdout), ("stderr", &chunk.stderr)] {
            if !bytes.is_empty() {
                let text = String::from_utf8_lossy(bytes);
                let _ = chunk_tx.blocking_send(Ok(line(json!({"type": name, "text": text, "timestamp": now_ns()}))));
            }
        }
        for result in results.push(&chunk.results) {
            let _ = chunk_tx.blocking_send(Ok(line(result_event(&result))));
        }
    });
    tokio::spawn(async move {
        match state.exec_in(&session, exec, on_chunk).await {
            Ok(r) if r.timed_out => {
                let value = format!(
                    "the code ran past the {} s limit; the sandbox was ended",
                    state.limits.max_timeout.as_secs()
                );
                let _ = tx
                    .send(Ok(line(
                        json!({"type": "error", "name": "TimeoutError", "value": value, "traceback": ""}),
                    )))
                    .await;
            }
            Ok(_) => {}
            Err(e) => {
                let _ = tx
                    .send(Ok(line(
                        json!({"type": "error", "name": "SandboxError", "value": e.message, "traceback": ""}),
                    )))
                    .await;
            }
        }
        let _ = tx.send(Ok(line(json!({"type": "end_of_execution"})))).await;
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}

pub(crate) async fn create_context(
    Extension(call): Extension<SandboxCall>,
    body: Result<Json<NewContext>, JsonRejection>,
) -> Result<Json<CodeContext>, E2bError> {
    let Json(req) = body.map_err(ApiError::from)?;
    let session = call.0;
    python_only(&session, req.language.as_deref())?;
    let context = CodeContext {
        id: format!("ctx_{}", &crate::served::random_id()[..16]),
        language: "python".into(),
        cwd: req.cwd.filter(|c| !c.is_empty()).unwrap_or_else(|| HOME.into()),
    };
    session
        .code_contexts
        .lock()
        .map_err(|_| ApiError::internal("contexts lock poisoned"))?
        .insert(context.id.clone(), context.clone());
    Ok(Json(context))
}

pub(crate) async fn list_contexts(Extension(call): Extension<SandboxCall>) -> Result<Json<Vec<CodeContext>>, E2bError> {
    let contexts = call
        .0
        .code_contexts
        .lock()
        .map_err(|_| ApiError::internal("contexts lock poisoned"))?
        .values()
        .cloned()
        .collect();
    Ok(Json(contexts))
}

/// Empties context `id`'s namespace in the guest.
async fn clear(state: &Arc<AppState>, session: &Arc<Session>, id: &str) -> Result<(), ApiError> {
    let literal = serde_json::to_string(id).map_err(ApiError::internal)?;
    // In a list, so that the line's value is None and nothing is displayed.
    let code = format!("[__import__(\"sys\").modules[\"__main__\"].CELL_CONTEXTS.pop({literal}, None)].clear()");
    let exec = ExecRequest::in_sandbox(code, 30.0, String::new());
    let outcome = state.exec_in(session, exec, Box::new(|_| {})).await?;
    if outcome.exit_code != 0 {
        return Err(ApiError::internal(format!("clearing a context: {}", outcome.stderr)));
    }
    Ok(())
}

fn known(session: &Session, id: &str) -> Result<(), ApiError> {
    let contexts = session
        .code_contexts
        .lock()
        .map_err(|_| ApiError::internal("contexts lock poisoned"))?;
    if contexts.contains_key(id) {
        Ok(())
    } else {
        Err(context_not_found(id))
    }
}

pub(crate) async fn delete_context(
    State(state): State<Arc<AppState>>,
    Extension(call): Extension<SandboxCall>,
    Path(id): Path<String>,
) -> Result<StatusCode, E2bError> {
    known(&call.0, &id)?;
    clear(&state, &call.0, &id).await?;
    if let Ok(mut contexts) = call.0.code_contexts.lock() {
        contexts.remove(&id);
    }
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn restart_context(
    State(state): State<Arc<AppState>>,
    Extension(call): Extension<SandboxCall>,
    Path(id): Path<String>,
) -> Result<StatusCode, E2bError> {
    known(&call.0, &id)?;
    clear(&state, &call.0, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cell_is_one_python_line_with_its_code_as_a_literal() {
        let code = cell_code("print(\"a\\nb\")\nx = '''q'''", Some("ctx_1")).unwrap();
        assert_eq!(code.lines().count(), 1);
        assert!(code.ends_with(", \"ctx_1\")"), "{code}");
        assert!(cell_code("1", None).unwrap().ends_with("run_cell(\"1\", None)"));
    }

    #[test]
    fn results_and_errors_become_e2b_events() {
        let lines = b"{\"type\": \"execute_result\", \"data\": {\"text/plain\": \"2\", \"text/html\": \"<b>2</b>\", \"application/x-thing\": 1}}\n\
            {\"type\": \"error\", \"data\": {\"name\": \"NameError\", \"value\": \"x\", \"traceback\": \"T\"}}\n";
        let results = RichResult::parse_lines(lines);
        let main = result_event(&results[0]);
        assert_eq!(main["type"], "result");
        assert_eq!(main["is_main_result"], true);
        assert_eq!(
            (main["text"].as_str(), main["html"].as_str()),
            (Some("2"), Some("<b>2</b>"))
        );
        assert_eq!(main["extra"]["application/x-thing"], 1);
        let error = result_event(&results[1]);
        assert_eq!(
            (error["type"].as_str(), error["name"].as_str()),
            (Some("error"), Some("NameError"))
        );
    }
}
