//! Template specs: what a template is built from. A spec names a runtime
//! (whose agent runs the code), extra Debian packages, extra Python wheels,
//! modules to preload before the snapshot, guest memory and environment.
//! Users write them as TOML (`zeroboot template build -f spec.toml`); the
//! built-in templates are specs too (`templates/*.toml`).
//!
//! ```toml
//! name = "pandas"
//! runtime = "python"
//! packages = ["python3-pandas"]
//! wheels = ["tabulate==0.9.0"]
//! preload = ["pandas"]
//! warmup = "pandas.DataFrame({'a': [1, 2]}).describe()"
//! memory_mib = 1024
//! [env]
//! MPLBACKEND = "Agg"
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use zeroboot_net::{NetworkPolicy, PolicyError};

use crate::runtime::Runtime;

/// The template `zeroboot` runs when none is named.
pub const DEFAULT_NAME: &str = "python";
pub const DEFAULT_MEM_MIB: u64 = 1024;
/// The disk at /home/user. Untouched blocks cost nothing: the image is
/// sparse, and a fork copies only the pages it writes.
pub const DEFAULT_DISK_MIB: u64 = 1024;
/// 0 means no disk (/home/user is then a tmpfs in guest RAM); below 64 MiB
/// ext4 has little room left for files.
pub const MIN_DISK_MIB: u64 = 64;

/// Guest RAM a fresh heap leaves to the guest kernel, the runtime itself,
/// child processes and the page cache.
pub const MIN_UNHEAPED_MIB: u64 = 192;

/// Guest RAM bounds: below 128 MiB a runtime barely boots; above 16 GiB the
/// guest's memory plus root image would not fit under the doorbell.
pub const MIN_MEM_MIB: u64 = 128;
pub const MAX_MEM_MIB: u64 = 16 << 10;
const MAX_LIST: usize = 64;
const MAX_ITEM: usize = 200;
const MAX_WARMUP: usize = 64 << 10;

/// What a template is built from. Recorded in its `template.json`, so that
/// a template an older zeroboot made can be rebuilt from the same spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateSpec {
    pub name: String,
    #[serde(default)]
    pub runtime: Runtime,
    /// Extra Debian packages (Debian 13, trixie), installed with debootstrap.
    #[serde(default)]
    pub packages: Vec<String>,
    /// Extra Python wheels from PyPI (pip requirement strings), installed
    /// into the image at build time; binary wheels only (python runtime).
    #[serde(default)]
    pub wheels: Vec<String>,
    /// Modules imported (python) or required (node) before the snapshot.
    #[serde(default)]
    pub preload: Vec<String>,
    /// Code the agent runs once before the snapshot, after the preloads,
    /// so that the paths user code will take are compiled and mapped.
    #[serde(default)]
    pub warmup: String,
    /// Guest RAM.
    #[serde(default = "default_mem_mib", rename = "memory_mib")]
    pub mem_mib: u64,
    /// The writable disk mounted at /home/user, copy-on-write per fork; 0
    /// for none. Guest RAM, root image and disk share 3 GiB of guest-
    /// physical space.
    #[serde(default = "default_disk_mib")]
    pub disk_mib: u64,
    /// Guest RAM the agent maps before the snapshot for the code's own
    /// allocations (guest/agent/native/heap.h): a fork's allocations up to
    /// this size take no guest page fault. Half of `memory_mib` when not
    /// given, for runtimes that have a fresh heap; 0 for none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heap_mib: Option<u64>,
    /// Environment of the code the agent runs.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// What its sandboxes may reach when a request brings no policy of its
    /// own (docs/network.md); none: no network. Not a build input: a
    /// change takes effect at the next `template build` without a boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkPolicy>,
}

fn default_mem_mib() -> u64 {
    DEFAULT_MEM_MIB
}

fn default_disk_mib() -> u64 {
    DEFAULT_DISK_MIB
}

impl Default for TemplateSpec {
    fn default() -> Self {
        Self::for_runtime(DEFAULT_NAME, Runtime::Python)
    }
}

/// The specs `zeroboot` knows by name, from `templates/`.
const BUILTIN: &[(&str, &str)] = &[
    ("python", include_str!("../../../templates/python.toml")),
    ("node", include_str!("../../../templates/node.toml")),
    ("bash", include_str!("../../../templates/bash.toml")),
    (
        "code-interpreter",
        include_str!("../../../templates/code-interpreter.toml"),
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("{0}")]
    Toml(String),
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error(transparent)]
    Network(#[from] PolicyError),
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

impl TemplateSpec {
    /// A spec with nothing but the runtime's base.
    pub fn for_runtime(name: &str, runtime: Runtime) -> Self {
        Self {
            name: name.into(),
            runtime,
            packages: Vec::new(),
            wheels: Vec::new(),
            preload: Vec::new(),
            warmup: String::new(),
            mem_mib: DEFAULT_MEM_MIB,
            disk_mib: DEFAULT_DISK_MIB,
            heap_mib: None,
            env: BTreeMap::new(),
            network: None,
        }
    }

    /// The built-in spec called `name` (python, node, bash), if there is one.
    pub fn builtin(name: &str) -> Option<Self> {
        let (_, text) = BUILTIN.iter().find(|(n, _)| *n == name)?;
        Self::from_toml(text).ok()
    }

    pub fn builtin_names() -> impl Iterator<Item = &'static str> {
        BUILTIN.iter().map(|(n, _)| *n)
    }

    /// Parses and checks a spec.
    pub fn from_toml(text: &str) -> Result<Self, SpecError> {
        let spec: Self = toml::from_str(text).map_err(|e| SpecError::Toml(e.to_string()))?;
        spec.validate()?;
        Ok(spec)
    }

    /// Checks every field, so that nothing in a spec reaches a shell, apt,
    /// pip or the guest's environment unchecked.
    pub fn validate(&self) -> Result<(), SpecError> {
        if !is_valid_name(&self.name) {
            return Err(invalid(
                "name",
                format!("{:?} must be 1-64 characters of a-z, 0-9, '-' or '_'", self.name),
            ));
        }
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&self.mem_mib) {
            return Err(invalid(
                "memory_mib",
                format!("{} is outside {MIN_MEM_MIB}..={MAX_MEM_MIB}", self.mem_mib),
            ));
        }
        if self.disk_mib != 0 && !(MIN_DISK_MIB..=MAX_MEM_MIB).contains(&self.disk_mib) {
            return Err(invalid(
                "disk_mib",
                format!("{} is neither 0 nor in {MIN_DISK_MIB}..={MAX_MEM_MIB}", self.disk_mib),
            ));
        }
        if let Some(heap) = self.heap_mib.filter(|&h| h > 0) {
            if !self.runtime.descriptor().fresh_heap {
                return Err(invalid(
                    "heap_mib",
                    format!("the {} runtime has no fresh heap", self.runtime.descriptor().name),
                ));
            }
            if heap.saturating_add(MIN_UNHEAPED_MIB) > self.mem_mib {
                return Err(invalid(
                    "heap_mib",
                    format!(
                        "{heap} leaves less than {MIN_UNHEAPED_MIB} of memory_mib = {} to the rest of the guest",
                        self.mem_mib
                    ),
                ));
            }
        }
        if let Some(network) = &self.network {
            network.validate()?;
        }
        check_list("packages", &self.packages, is_debian_package)?;
        check_list("wheels", &self.wheels, is_requirement)?;
        let runtime = self.runtime.descriptor();
        if !self.wheels.is_empty() && !runtime.wheels {
            return Err(invalid(
                "wheels",
                format!("Python wheels need runtime = \"python\", not {:?}", runtime.name),
            ));
        }
        match runtime.preload {
            Some(is_module) => check_list("preload", &self.preload, is_module)?,
            None if !self.preload.is_empty() => {
                return Err(invalid(
                    "preload",
                    format!("the {} runtime has nothing to preload", runtime.name),
                ))
            }
            None => {}
        }
        if self.warmup.len() > MAX_WARMUP {
            return Err(invalid("warmup", format!("longer than {MAX_WARMUP} bytes")));
        }
        if !runtime.warmup && !self.warmup.is_empty() {
            return Err(invalid(
                "warmup",
                format!("the {} runtime has nothing to warm up", runtime.name),
            ));
        }
        if self.env.len() > MAX_LIST {
            return Err(invalid("env", format!("more than {MAX_LIST} variables")));
        }
        for (key, value) in &self.env {
            let ok_key = key.len() <= 128
                && key.bytes().next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
                && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !ok_key {
                return Err(invalid(format!("env.{key}"), "names are letters, digits and _"));
            }
            if value.len() > 4096 || value.contains('\0') {
                return Err(invalid(
                    format!("env.{key}"),
                    "values are at most 4096 bytes, without NUL",
                ));
            }
        }
        Ok(())
    }

    /// Every package debootstrap installs, base first, without repeats.
    pub fn all_packages(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for p in self.runtime.descriptor().base_packages.iter().map(|s| s.to_string()) {
            if !out.contains(&p) {
                out.push(p);
            }
        }
        if !self.wheels.is_empty() && !out.iter().any(|p| p == "python3-pip") {
            out.push("python3-pip".into());
        }
        for p in &self.packages {
            if !out.contains(p) {
                out.push(p.clone());
            }
        }
        out
    }

    /// MiB of fresh heap the agent maps (see `heap_mib`), in whole 2 MiB pages.
    pub fn fresh_heap_mib(&self) -> u64 {
        if !self.runtime.descriptor().fresh_heap {
            return 0;
        }
        let mib = self.heap_mib.unwrap_or(self.mem_mib / 2);
        mib.min(self.mem_mib.saturating_sub(MIN_UNHEAPED_MIB)) / 2 * 2
    }

    /// What the agent reads from `/zeroboot/config.json`.
    pub fn agent_config(&self) -> serde_json::Value {
        serde_json::json!({
            "runtime": self.runtime.name(),
            "heap_mib": self.fresh_heap_mib(),
            "preload": self.preload,
            "warmup": self.warmup,
            "env": self.env,
        })
    }

    /// The environment as `export` lines for the shell agent.
    pub fn env_script(&self) -> String {
        self.env
            .iter()
            .map(|(k, v)| format!("export {k}='{}'\n", v.replace('\'', r"'\''")))
            .collect()
    }
}

/// A template name: it names a directory, so 1-64 characters of a-z, 0-9,
/// '-' and '_'.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn check_list(field: &str, items: &[String], ok: fn(&str) -> bool) -> Result<(), SpecError> {
    if items.len() > MAX_LIST {
        return Err(invalid(field, format!("more than {MAX_LIST} entries")));
    }
    for item in items {
        if item.len() > MAX_ITEM || !ok(item) {
            return Err(invalid(field, format!("{item:?} is not a valid entry")));
        }
    }
    Ok(())
}

/// Debian policy 5.6.1: lower case letters, digits, + - . ; starts alphanumeric.
fn is_debian_package(s: &str) -> bool {
    s.len() >= 2
        && s.bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b))
}

/// A pip requirement such as `tabulate==0.9.0` or `requests[socks]>=2`:
/// never an option (`-r file`, `--index-url`), a path or a URL.
fn is_requirement(s: &str) -> bool {
    s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-[],<>=!~ ".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_parse() {
        for name in TemplateSpec::builtin_names() {
            let spec = TemplateSpec::builtin(name).unwrap();
            assert_eq!(spec.name, name);
        }
        assert_eq!(TemplateSpec::builtin("python").unwrap(), TemplateSpec::default());
        assert_eq!(TemplateSpec::builtin("node").unwrap().runtime, Runtime::Node);
        assert_eq!(TemplateSpec::builtin("bash").unwrap().runtime, Runtime::Shell);
        assert!(TemplateSpec::builtin("nope").is_none());
    }

    #[test]
    fn full_spec() {
        let spec = TemplateSpec::from_toml(
            r#"
            name = "pandas"
            runtime = "python"
            packages = ["python3-pandas", "python3-numpy"]
            wheels = ["tabulate==0.9.0"]
            preload = ["pandas", "os.path"]
            memory_mib = 1024
            [env]
            MPLBACKEND = "Agg"
            "#,
        )
        .unwrap();
        assert_eq!(spec.mem_mib, 1024);
        assert_eq!(
            spec.all_packages(),
            ["python3", "python3-numpy", "python3-pip", "python3-pandas"]
        );
        assert_eq!(spec.env_script(), "export MPLBACKEND='Agg'\n");
    }

    #[test]
    fn bad_specs_are_refused_with_the_field() {
        for (text, field) in [
            ("name = \"../x\"", "name"),
            ("name = \"a\"\nmemory_mib = 64", "memory_mib"),
            ("name = \"a\"\ndisk_mib = 10", "disk_mib"),
            ("name = \"a\"\nmemory_mib = 512\nheap_mib = 400", "heap_mib"),
            ("name = \"a\"\nruntime = \"shell\"\nheap_mib = 64", "heap_mib"),
            ("name = \"a\"\npackages = [\"--allow-unauthenticated\"]", "packages"),
            ("name = \"a\"\npackages = [\"Foo\"]", "packages"),
            ("name = \"a\"\nwheels = [\"-r /etc/passwd\"]", "wheels"),
            ("name = \"a\"\nwheels = [\"https://x/y.whl\"]", "wheels"),
            ("name = \"a\"\nruntime = \"node\"\nwheels = [\"x\"]", "wheels"),
            ("name = \"a\"\npreload = [\"os; import x\"]", "preload"),
            ("name = \"a\"\nruntime = \"node\"\npreload = [\"../x\"]", "preload"),
            ("name = \"a\"\nruntime = \"shell\"\npreload = [\"x\"]", "preload"),
            ("name = \"a\"\n[env]\n\"A B\" = \"x\"", "env"),
            ("name = \"a\"\n[network]\nallow = [\"10.0.0.0/33\"]", "network.allow[0]"),
            (
                "name = \"a\"\n[network]\ndeny = [\"ok.test\", \"::1\"]",
                "network.deny[1]",
            ),
        ] {
            let err = TemplateSpec::from_toml(text).unwrap_err().to_string();
            assert!(err.starts_with(field), "{text:?}: {err}");
        }
        for text in [
            "name = \"a\"\nruntime = \"ruby\"",
            "name = \"a\"\ncolour = 1",
            "runtime = \"node\"",
            "name = \"a\"\n[network]\nallowed = []",
        ] {
            assert!(
                matches!(TemplateSpec::from_toml(text), Err(SpecError::Toml(_))),
                "{text}"
            );
        }
    }

    #[test]
    fn a_network_policy_is_kept() {
        let spec = TemplateSpec::from_toml("name = \"a\"\n[network]\nallow = [\"*.example.com\"]").unwrap();
        assert_eq!(spec.network.unwrap().allow, ["*.example.com"]);
        assert_eq!(TemplateSpec::default().network, None);
    }

    #[test]
    fn env_script_quotes() {
        let mut spec = TemplateSpec::for_runtime("a", Runtime::Shell);
        spec.env.insert("X".into(), "it's $(rm -rf /)".into());
        assert_eq!(spec.env_script(), "export X='it'\\''s $(rm -rf /)'\n");
    }
}
