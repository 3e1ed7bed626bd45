//! The language runtimes a template's agent can serve, each described once
//! ([`RuntimeDescriptor`]): its languages, packages, agent sources and
//! native half, probes and benchmark code.
//! The template build, the server and the CLI read only the descriptor, so
//! adding a runtime is one descriptor plus its guest files (guest/agent/),
//! and a missing piece is a compile error.

mod node;
mod python;
mod shell;

use serde::{Deserialize, Serialize};

use crate::sources::SourceFile;

/// The language runtime a template's agent serves, as a spec names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    /// CPython 3 with numpy (guest/agent/agent.py).
    #[default]
    Python,
    /// Node.js (guest/agent/agent.js).
    Node,
    /// bash (guest/agent/agent.sh).
    Shell,
}

impl Runtime {
    pub const fn descriptor(self) -> &'static RuntimeDescriptor {
        match self {
            Self::Python => &python::PYTHON,
            Self::Node => &node::NODE,
            Self::Shell => &shell::SHELL,
        }
    }

    pub fn name(self) -> &'static str {
        self.descriptor().name
    }
}

/// Everything zeroboot knows about one runtime.
pub struct RuntimeDescriptor {
    /// How specs, `template ls` and the bench name it.
    pub name: &'static str,
    /// The `language` values of API requests it serves; the first is its
    /// canonical name.
    pub languages: &'static [&'static str],
    /// Debian packages every template of it has.
    pub base_packages: &'static [&'static str],
    /// The guest's init (PID 1): the agent.
    pub init: &'static str,
    /// The agent's sources, compiled into zeroboot; they name its root images.
    pub agent_sources: &'static [SourceFile],
    /// Files of `agent/` the image's `/zeroboot` gets as they are.
    pub agent_scripts: &'static [&'static str],
    /// The agent's native half, compiled from C by the root-image step.
    pub native: NativeHalf,
    /// The generated mailbox module its scripts load
    /// (`zeroboot_protocol::guest_layout::FILES`), if they read the mailbox
    /// themselves.
    pub mailbox_module: Option<&'static str>,
    /// Its `print(1+1)`: prints [`PRINT_PROBE_OUTPUT`]. A new template must
    /// answer it (the build's smoke test); `zeroboot bench` times it.
    pub print_probe: &'static str,
    /// More requests whose writes make up a template's write set (after the
    /// print probe): a fork that runs one finds those pages already copied.
    pub write_set_probes: &'static [&'static str],
    /// The code of `zeroboot bench`'s second figure.
    pub bench_code: &'static str,
    /// Code that prints the memory map of the process that runs requests
    /// (`/proc/self/maps`), for naming what a fork touched (`zeroboot pages`).
    pub self_maps: &'static str,
    /// Which names a spec may preload; None if the runtime preloads nothing.
    pub preload: Option<fn(&str) -> bool>,
    /// Whether a spec may give warm-up code.
    pub warmup: bool,
    /// Whether a spec may add Python wheels.
    pub wheels: bool,
    /// Whether the agent maps a fresh heap before the snapshot
    /// (guest/agent/native/heap.h), and so whether `heap_mib` means anything.
    pub fresh_heap: bool,
}

/// A C source under `agent/native/` and the object it becomes in `/zeroboot`.
#[derive(Debug)]
pub struct NativeHalf {
    pub source: &'static str,
    pub object: &'static str,
}

/// What every runtime's print probe prints.
pub const PRINT_PROBE_OUTPUT: &str = "2\n";

impl RuntimeDescriptor {
    /// The print probe, then the other write-set probes.
    pub fn all_write_set_probes(&self) -> Vec<&'static str> {
        std::iter::once(self.print_probe)
            .chain(self.write_set_probes.iter().copied())
            .collect()
    }

    /// The canonical language.
    pub fn language(&self) -> &'static str {
        self.languages.first().copied().unwrap_or(self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Runtime; 3] = [Runtime::Python, Runtime::Node, Runtime::Shell];

    #[test]
    fn each_descriptor_is_named_as_specs_name_its_runtime() {
        for runtime in ALL {
            let d = runtime.descriptor();
            let parsed: Runtime = serde_json::from_value(serde_json::json!(d.name)).unwrap();
            assert_eq!(parsed, runtime);
            assert!(!d.languages.is_empty() && !d.agent_sources.is_empty(), "{}", d.name);
            for script in d.agent_scripts {
                let path = format!("agent/{script}");
                assert!(d.agent_sources.iter().any(|f| f.path == path), "{}: {path}", d.name);
            }
            let native = format!("agent/native/{}", d.native.source);
            assert!(d.agent_sources.iter().any(|f| f.path == native), "{}: {native}", d.name);
        }
    }

    #[test]
    fn no_language_is_served_by_two_runtimes() {
        let mut seen = std::collections::BTreeSet::new();
        for runtime in ALL {
            for language in runtime.descriptor().languages {
                assert!(seen.insert(*language), "{language} twice");
            }
        }
    }
}
