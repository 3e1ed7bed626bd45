//! The OpenAPI 3 description of the API, generated from the handlers and
//! types (utoipa) and served at `/v1/openapi.json`. The SDKs follow it.

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::api::{
    BatchEntry, BatchRequest, BatchResponse, CreateSandbox, ErrorBody, ErrorResponse, ExecRequest, ExecResponse,
    ForkSandbox, Forked, Health, SandboxExec, SandboxList, SessionInfo, TemplateHealth,
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
        crate::exec, crate::exec_batch, crate::health, crate::metrics,
        crate::create_sandbox, crate::list_sandboxes, crate::get_sandbox, crate::delete_sandbox,
        crate::sandbox_exec, crate::fork_sandbox, crate::put_file, crate::get_file,
    ),
    components(schemas(
        ExecRequest, ExecResponse, BatchRequest, BatchResponse, BatchEntry, ErrorBody, ErrorResponse,
        Health, TemplateHealth, CreateSandbox, SandboxExec, ForkSandbox, SandboxList, Forked, SessionInfo,
    )),
    modifiers(&BearerKeys),
)]
pub struct ApiDoc;

pub async fn serve() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
