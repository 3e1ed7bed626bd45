//! Running a request in a sandbox, one-shot or long-lived: the logs, the
//! metrics and the mapping of guest faults to responses, shared by every
//! endpoint that runs code.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use zeroboot_protocol::{Chunk, Context, GuestFault, Request};
use zeroboot_sandbox::{Sandbox, SandboxError};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::exec::{ExecRequest, ExecResponse, RichResult};
use crate::metrics::{Memory, Outcome};
use crate::served::{random_id, Served};
use crate::sessions::Session;
use crate::state::AppState;

/// What the guest is asked: `req` under the `defaults` context.
fn guest_request(req: &ExecRequest, defaults: &Context, output_limit: u32) -> Request {
    Request {
        output_limit,
        stream: req.stream,
        context: defaults.overlaid_with(&req.context()),
        ..Request::new(req.code.as_bytes(), req.stdin.as_bytes())
    }
}

impl AppState {
    pub(crate) fn count(&self, outcome: &Result<ExecResponse, ApiError>) {
        let label = match outcome {
            Ok(r) if r.timed_out => "timeout",
            Ok(_) => "ok",
            Err(_) => "error",
        };
        self.metrics.executions.get_or_create(&Outcome { outcome: label }).inc();
    }

    pub(crate) fn run_blocking(
        &self,
        served: &Served,
        req: &ExecRequest,
        timeout: Duration,
        output_limit: u32,
        on_chunk: &mut dyn FnMut(Chunk),
    ) -> Result<ExecResponse, ApiError> {
        let started = Instant::now();
        let network = self.network.config_for(served.network(req.network.as_ref()))?;
        let mut sandbox = served.template.fork_with(network).map_err(ApiError::internal)?;
        let forked = started.elapsed();
        self.metrics.live_sandboxes.inc();
        self.metrics.spawn_seconds.observe(forked.as_secs_f64());
        self.metrics
            .forks
            .get_or_create(&Memory {
                fork_memory: sandbox.fork_memory().name(),
            })
            .inc();
        let request = guest_request(req, &Context::default(), output_limit);
        let (result, _) = self.exec_on(&mut sandbox, &served.name, req, &request, timeout, on_chunk);
        let total = started.elapsed();
        // Kills the worker process, which takes the VM down with it.
        drop(sandbox);
        self.metrics.live_sandboxes.dec();
        match &result {
            Ok(r) => tracing::info!(
                target: crate::LOG_TARGET,
                id = %r.id,
                template = %served.name,
                exit_code = r.exit_code,
                timed_out = r.timed_out,
                fork_ms = forked.as_secs_f64() * 1e3,
                total_ms = total.as_secs_f64() * 1e3,
                "execution"
            ),
            Err(e) => tracing::info!(
                target: crate::LOG_TARGET,
                template = %served.name,
                code = e.code,
                "execution failed"
            ),
        }
        self.metrics.total_seconds.observe(total.as_secs_f64());
        result.map(|mut r| {
            r.fork_time_ms = forked.as_secs_f64() * 1e3;
            r.total_time_ms = total.as_secs_f64() * 1e3;
            r
        })
    }

    /// Runs `req` in `sandbox`. The flag says whether the sandbox can take
    /// another request (not after a timeout or a crash).
    fn exec_on(
        &self,
        sandbox: &mut Sandbox,
        template: &str,
        req: &ExecRequest,
        request: &Request,
        timeout: Duration,
        on_chunk: &mut dyn FnMut(Chunk),
    ) -> (Result<ExecResponse, ApiError>, bool) {
        let started = Instant::now();
        let result = sandbox.exec_streaming(request, timeout, on_chunk);
        let ran = started.elapsed();
        self.metrics.exec_seconds.observe(ran.as_secs_f64());
        let mut response = ExecResponse {
            id: random_id(),
            stdout: String::new(),
            stderr: String::new(),
            stdout_base64: None,
            stderr_base64: None,
            exit_code: 0,
            fork_time_ms: 0.0,
            exec_time_ms: ran.as_secs_f64() * 1e3,
            total_time_ms: ran.as_secs_f64() * 1e3,
            timed_out: false,
            truncated: false,
            template: template.to_string(),
            results: Vec::new(),
        };
        match result {
            Ok(r) => {
                (response.stdout, response.stdout_base64) = text_and_bytes(&r.stdout);
                (response.stderr, response.stderr_base64) = text_and_bytes(&r.stderr);
                response.exit_code = r.exit_code;
                response.truncated = r.stdout_truncated || r.stderr_truncated || r.results_truncated;
                response.results = RichResult::parse_lines(&r.results);
                (Ok(response), true)
            }
            Err(SandboxError::Guest(GuestFault::Timeout(_))) => {
                response.timed_out = true;
                response.exit_code = 124;
                response.stderr = format!("zeroboot: timed out after {} s\n", req.timeout_seconds);
                (Ok(response), false)
            }
            Err(SandboxError::Guest(fault)) => (
                Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "sandbox_crashed",
                    format!(
                        "{fault}: the code ended its sandbox (its agent exited, the guest kernel panicked, \
                         or the mailbox was overwritten)"
                    ),
                )),
                false,
            ),
            Err(e) => (Err(ApiError::internal(e)), false),
        }
    }

    /// Runs `req` in long-lived sandbox `id`; a sandbox that timed out or
    /// crashed is removed (its guest cannot take another request).
    pub(crate) async fn exec_in_session(
        self: &Arc<Self>,
        id: &str,
        caller: Caller,
        req: ExecRequest,
    ) -> Result<ExecResponse, ApiError> {
        let session = self.session(id, caller).await?;
        self.exec_in(&session, req, Box::new(|_| {})).await
    }

    /// Runs `req` in `session`, handing each piece of output to `on_chunk`
    /// as it arrives when `req.stream` is set; a sandbox that timed out or
    /// crashed is removed.
    pub(crate) async fn exec_in(
        self: &Arc<Self>,
        session: &Arc<Session>,
        req: ExecRequest,
        mut on_chunk: Box<dyn FnMut(Chunk) + Send>,
    ) -> Result<ExecResponse, ApiError> {
        let id = session.id.as_str();
        let timeout = self.validate(&req.code, &req.stdin, req.timeout_seconds)?;
        // The session's working directory and environment, under the call's own.
        let context = session.context.clone();
        self.validate_context(&context.overlaid_with(&req.context()), req.code.len() + req.stdin.len())?;
        let permit = self.slot().await?;
        let state = self.clone();
        let template = session.served.name.clone();
        let output_limit = self.limits.max_output_bytes;
        let (outcome, usable) = session
            .call(move |machine| {
                let _permit = permit;
                let request = guest_request(&req, &context, output_limit);
                state.exec_on(machine, &template, &req, &request, timeout, &mut on_chunk)
            })
            .await?;
        if !usable {
            self.sessions.forget(id);
        }
        self.count(&outcome);
        outcome
    }
}

/// A stream as text, and its exact bytes (base64) where they are not UTF-8.
fn text_and_bytes(bytes: &[u8]) -> (String, Option<String>) {
    use base64::Engine;
    match std::str::from_utf8(bytes) {
        Ok(text) => (text.to_string(), None),
        Err(_) => (
            String::from_utf8_lossy(bytes).into_owned(),
            Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
        ),
    }
}
