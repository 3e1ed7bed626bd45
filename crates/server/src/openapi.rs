//! The OpenAPI 3 description of the API, generated from the handlers and
//! types (utoipa) and served at `/v1/openapi.json`. The SDKs follow it.

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::api::{
    BatchEntry, BatchRequest, BatchResponse, CreateSandbox, ErrorBody, ErrorResponse, ExecRequest, ExecResponse,
    ForkSandbox, Forked, Health, RichResult, RunContext, SandboxExec, SandboxList, SessionInfo, TemplateHealth,
};

struct BearerKeys;

impl Modify for BearerKeys {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "zeroboot", description = "Run code in a new KVM virtual machine per execution, forked from a warmed-up template."),
    paths(
        crate::exec::exec, crate::exec::exec_batch, crate::service::health, crate::service::metrics,
        crate::sandboxes::create_sandbox, crate::sandboxes::list_sandboxes, crate::sandboxes::get_sandbox,
        crate::sandboxes::delete_sandbox, crate::sandboxes::sandbox_exec, crate::sandboxes::fork_sandbox, crate::pause::pause_sandbox,
        crate::files::put_file, crate::files::get_file, crate::files::delete_file, crate::files::stat_file,
        crate::files::list_dir, crate::files::list_root, crate::files::make_dir, crate::files::rename, crate::ports::proxy_path,
    ),
    components(schemas(
        ExecRequest, ExecResponse, RichResult, RunContext, BatchRequest, BatchResponse, BatchEntry, ErrorBody, ErrorResponse,
        Health, TemplateHealth, CreateSandbox, SandboxExec, ForkSandbox, SandboxList, Forked, SessionInfo,
    )),
    modifiers(&BearerKeys),
)]
pub struct ApiDoc;

pub async fn serve() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
