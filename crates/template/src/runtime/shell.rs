//! bash: guest/agent/agent.sh and its loadable builtin.

use super::{NativeHalf, RuntimeDescriptor};
use crate::sources::{guest_file, SourceFile};

pub const SHELL: RuntimeDescriptor = RuntimeDescriptor {
    name: "shell",
    languages: &["bash", "shell", "sh"],
    // minbase has bash and coreutils; these make it a usable shell.
    base_packages: &["procps", "less", "file"],
    init: "/zeroboot/agent.sh",
    agent_sources: &[
        guest_file!("agent/agent.sh"),
        guest_file!("agent/native/guest.h"),
        guest_file!("agent/native/files.h"),
        guest_file!("agent/native/ports.h"),
        guest_file!("agent/native/zeroboot_bash.c"),
    ],
    agent_scripts: &["agent.sh"],
    native: NativeHalf {
        source: "zeroboot_bash.c",
        object: "zeroboot_bash.so",
    },
    // agent.sh leaves the mailbox to its builtin, which has the C header.
    mailbox_module: None,
    print_probe: "echo $((1+1))",
    write_set_probes: &[],
    bench_code: "ls /",
    // Requests run in a subshell; $BASHPID is the one that ran this.
    // Read by the subshell itself: it runs as `user` with saved uid 0, so
    // another process of that user (a `cat`) may not read its maps.
    self_maps: "while IFS= read -r line; do printf '%s\\n' \"$line\"; done </proc/$BASHPID/maps",
    preload: None,
    warmup: false,
    wheels: false,
    fresh_heap: false,
};
