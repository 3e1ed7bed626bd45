//! Every request and response body, each defined in the module of its
//! resource and re-exported here, where clients of the crate (the CLI, the
//! fuzz target, the tests) find them.

pub use crate::error::{ErrorBody, ErrorResponse};
pub use crate::exec::{BatchEntry, BatchRequest, BatchResponse, ExecRequest, ExecResponse, RichResult, RunContext};
pub use crate::sandboxes::{CreateSandbox, ForkSandbox, Forked, SandboxExec, SandboxList};
pub use crate::service::{Health, TemplateHealth};
pub use crate::sessions::SessionInfo;
