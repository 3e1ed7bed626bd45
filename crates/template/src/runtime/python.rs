//! CPython 3 with numpy: guest/agent/agent.py and its native half.

use super::{NativeHalf, RuntimeDescriptor};
use crate::sources::{guest_file, SourceFile};

pub const PYTHON: RuntimeDescriptor = RuntimeDescriptor {
    name: "python",
    languages: &["python", "python3"],
    base_packages: &["python3", "python3-numpy"],
    init: "/zeroboot/agent.py",
    agent_sources: &[
        guest_file!("agent/agent.py"),
        guest_file!("agent/native/guest.h"),
        guest_file!("agent/native/files.h"),
        guest_file!("agent/native/ports.h"),
        guest_file!("agent/native/heap.h"),
        guest_file!("agent/native/fork_objects.h"),
        guest_file!("agent/native/python_api.h"),
        guest_file!("agent/native/captures.h"),
        guest_file!("agent/native/exec_path.h"),
        guest_file!("agent/native/zeroboot_python.c"),
    ],
    agent_scripts: &["agent.py"],
    native: NativeHalf {
        source: "zeroboot_python.c",
        object: "zeroboot_python.so",
    },
    mailbox_module: Some(zeroboot_protocol::guest_layout::PYTHON_MODULE),
    print_probe: "print(1+1)",
    write_set_probes: &[NUMPY],
    bench_code: NUMPY,
    self_maps: "print(open('/proc/self/maps').read(), end='')",
    preload: Some(is_module),
    warmup: true,
    wheels: true,
    fresh_heap: true,
};

const NUMPY: &str = "import numpy; print(numpy.random.rand(3))";

/// A dotted module name: identifiers only, nothing a Python statement
/// could hide in.
fn is_module(s: &str) -> bool {
    s.split('.').all(|part| {
        part.bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
            && part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    })
}
