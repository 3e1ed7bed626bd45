//! zeroboot's HTTP API (axum on tokio), a thin layer over the synchronous
//! fork engine: every execution forks a new VM from a template and runs on a
//! blocking thread, never on an async worker.
//!
//! One module per resource, with its handlers and bodies:
//! - `exec`: `/v1/exec` (JSON or Server-Sent Events) and `/v1/exec/batch`.
//! - `sandboxes`: long-lived sandboxes (`/v1/sandboxes`), their exec and fork.
//! - `files`: files in a long-lived sandbox.
//! - `service`: health, metrics, unknown paths and methods.
//!
//! And what they share:
//! - `state`: [`Limits`], [`AppState`], template lookup, validation, slots.
//! - `served`: the [`Served`] templates, and random ids.
//! - `run`: running a request in a sandbox, with its logs and metrics.
//! - `router`: the routes, request ids, panics, and [`serve`].
//! - [`api`]: every request and response body, re-exported in one place.
//! - [`error`]: the one error shape, `{error: {code, message}}`.
//! - [`auth`]: API keys, the loopback rule without keys, per-key rate limits.
//! - [`metrics`]: Prometheus metrics.
//! - [`sessions`]: long-lived sandboxes, each on its own thread, and their forks.
//! - `pause`, [`paused`]: pausing a sandbox to disk and resuming it.
//! - `e2b`: the E2B-compatible API, for E2B's own SDKs.
//! - [`openapi`]: the OpenAPI 3 description, served at `/v1/openapi.json`.

pub mod api;
pub mod auth;
pub mod e2b;
pub mod error;
mod exec;
mod files;
pub mod metrics;
pub mod network;
pub mod openapi;
mod pause;
pub mod paused;
mod ports;
mod router;
mod run;
mod sandboxes;
mod served;
mod service;
pub mod sessions;
mod state;

pub use router::{router, serve};
pub use served::Served;
pub use state::{AppState, Limits};

/// The target of the request and execution logs, which were logged from
/// the crate root before it was split: log lines (and their JSON `target`)
/// stay as they were.
const LOG_TARGET: &str = "zeroboot_server";
