//! Node.js: guest/agent/agent.js, its init script and its Node-API addon.

use super::{NativeHalf, RuntimeDescriptor};
use crate::sources::{guest_file, SourceFile};

pub const NODE: RuntimeDescriptor = RuntimeDescriptor {
    name: "node",
    languages: &["node", "javascript", "js"],
    base_packages: &["nodejs"],
    init: "/zeroboot/init-node",
    agent_sources: &[
        guest_file!("agent/agent.js"),
        guest_file!("agent/init-node"),
        guest_file!("agent/native/guest.h"),
        guest_file!("agent/native/files.h"),
        guest_file!("agent/native/ports.h"),
        guest_file!("agent/native/heap.h"),
        guest_file!("agent/native/zeroboot_node.c"),
    ],
    agent_scripts: &["agent.js", "init-node"],
    native: NativeHalf {
        source: "zeroboot_node.c",
        object: "zeroboot_node.node",
    },
    mailbox_module: Some(zeroboot_protocol::guest_layout::JAVASCRIPT_MODULE),
    print_probe: "console.log(1+1)",
    write_set_probes: &["console.log(Math.random(), crypto.randomBytes(8))"],
    bench_code: "console.log(crypto.randomBytes(8).toString('hex'))",
    self_maps: "process.stdout.write(fs.readFileSync('/proc/self/maps', 'utf8'))",
    preload: Some(is_module),
    warmup: true,
    wheels: false,
    fresh_heap: true,
};

/// A package name as `require` takes it (`lodash`, `@scope/pkg`,
/// `node:fs`), not a path.
fn is_module(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('.')
        && !s.starts_with('/')
        && !s.contains("..")
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"@/._-:".contains(&b))
}
