//! Parses API request bodies as the server does: never a panic.
//!   cargo +nightly fuzz run api_request
#![no_main]

use libfuzzer_sys::fuzz_target;
use zeroboot_server::api::{BatchRequest, CreateSandbox, ExecRequest, ForkSandbox, SandboxExec};

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<ExecRequest>(data);
    let _ = serde_json::from_slice::<BatchRequest>(data);
    let _ = serde_json::from_slice::<CreateSandbox>(data);
    let _ = serde_json::from_slice::<SandboxExec>(data);
    let _ = serde_json::from_slice::<ForkSandbox>(data);
});
