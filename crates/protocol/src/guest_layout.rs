//! The mailbox layout as the guest agents read it, rendered for each of their
//! languages from the constants of this crate.
//!
//! The agents are Python, JavaScript and C; none can use this crate, and
//! copies kept by hand drift. The template build writes these renderings
//! next to the agents instead ([`FILES`]), so every constant has one source.

use crate::{
    files, fresh, header, Doorbell, DEFAULT_OUTPUT_LIMIT, ENTROPY_ENTRY_LEN, FLAG_MORE, FLAG_RESULTS_TRUNCATED,
    FLAG_STDERR_TRUNCATED, FLAG_STDOUT_TRUNCATED, MAGIC, MAILBOX_SIZE, MAX_ENTROPY_REGIONS, MAX_OUTPUT_LIMIT,
    REQUEST_CAPACITY, REQUEST_FILE_OP, REQUEST_FRESH_FORK, REQUEST_OFFSET, REQUEST_STREAM, RESPONSE_CAPACITY,
    RESPONSE_OFFSET, SMALL_RESPONSE_CAPACITY, SMALL_RESPONSE_OFFSET, VERSION,
};

/// How a constant is named and typed in the guests' languages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A header field's offset: `H_<name>` in Python, `ZB_H_<name>` (an
    /// `int`) in C, and `H.<name>` in JavaScript, as the agents were written.
    Header,
    /// An `int` in C: small values that the C agents mix with `int` and
    /// `size_t` arithmetic.
    Int,
    /// An `unsigned` in C: compared with, or stored into, the u32 fields.
    Unsigned,
}

/// One constant the guests need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Constant {
    /// Without the `H_` of [`Kind::Header`] and without C's `ZB_`.
    pub name: &'static str,
    pub value: u64,
    pub kind: Kind,
    /// One line, written as a comment above the constant.
    pub doc: &'static str,
}

impl Constant {
    /// The name in Python, and in C after `ZB_`.
    pub fn flat_name(&self) -> String {
        match self.kind {
            Kind::Header => format!("H_{}", self.name),
            Kind::Int | Kind::Unsigned => self.name.to_string(),
        }
    }
}

const fn header(name: &'static str, offset: usize, doc: &'static str) -> Constant {
    Constant {
        name,
        value: offset as u64,
        kind: Kind::Header,
        doc,
    }
}

const fn int(name: &'static str, value: u64, doc: &'static str) -> Constant {
    Constant {
        name,
        value,
        kind: Kind::Int,
        doc,
    }
}

const fn unsigned(name: &'static str, value: u64, doc: &'static str) -> Constant {
    Constant {
        name,
        value,
        kind: Kind::Unsigned,
        doc,
    }
}

/// Every constant any guest agent uses, each taken from this crate's own.
#[rustfmt::skip] // rustfmt would spread each entry over five lines
pub const LAYOUT: &[Constant] = &[
    unsigned("MAILBOX_SIZE", MAILBOX_SIZE as u64,
        "Size of the mailbox region in guest memory."),
    unsigned("MAGIC", MAGIC as u64,
        "\"ZBMB\" as a little-endian u32, written by the host at boot."),
    unsigned("VERSION", VERSION as u64,
        "Version of this layout; the agent refuses a mailbox of another."),
    header("MAGIC", header::MAGIC,
        "u32: MAGIC."),
    header("VERSION", header::VERSION,
        "u32: VERSION."),
    header("REQUEST_SEQ", header::REQUEST_SEQ,
        "u32, host to guest: incremented for every request."),
    header("CODE_LEN", header::CODE_LEN,
        "u32, host to guest: bytes of code at REQUEST_OFFSET."),
    header("STDIN_LEN", header::STDIN_LEN,
        "u32, host to guest: bytes of stdin after the code."),
    header("RESPONSE_SEQ", header::RESPONSE_SEQ,
        "u32, guest to host: REQUEST_SEQ once the chunk is written."),
    header("EXIT_CODE", header::EXIT_CODE,
        "i32, guest to host: the code's exit status."),
    header("STDOUT_LEN", header::STDOUT_LEN,
        "u32, guest to host: bytes of stdout at RESPONSE_AT."),
    header("STDERR_LEN", header::STDERR_LEN,
        "u32, guest to host: bytes of stderr after stdout."),
    header("RESPONSE_FLAGS", header::RESPONSE_FLAGS,
        "u32, guest to host: FLAG_* bits."),
    header("OUTPUT_LIMIT", header::OUTPUT_LIMIT,
        "u32, host to guest: most bytes of stdout, and of stderr, to return."),
    header("REQUEST_FLAGS", header::REQUEST_FLAGS,
        "u32, host to guest: REQUEST_STREAM."),
    header("CONTEXT_LEN", header::CONTEXT_LEN,
        "u32, host to guest: bytes of the context after code and stdin (cwd, user, then NAME=value, each NUL-terminated); 0 for none."),
    header("RESULTS_LEN", header::RESULTS_LEN,
        "u32, guest to host: bytes of rich results (JSON lines) after stderr; 0 for none."),
    header("RESPONSE_AT", header::RESPONSE_AT,
        "u32, guest to host: where the chunk starts, RESPONSE_OFFSET (or 0) or SMALL_RESPONSE_OFFSET."),
    header("BOOT_SEED", header::BOOT_SEED,
        "Host to guest at boot: entropy to credit to the kernel CRNG."),
    int("BOOT_SEED_LEN", header::BOOT_SEED_LEN as u64,
        "Bytes at H_BOOT_SEED."),
    header("REQUEST_SEED", header::REQUEST_SEED,
        "Host to guest with every request: seeds for user-space generators."),
    int("REQUEST_SEED_LEN", header::REQUEST_SEED_LEN as u64,
        "Bytes at H_REQUEST_SEED."),
    header("ENTROPY_COUNT", header::ENTROPY_COUNT,
        "u32, guest to host at READY: entries in the entropy table."),
    header("ENTROPY_TABLE", header::ENTROPY_TABLE,
        "Guest to host at READY: the entropy table."),
    int("ENTROPY_ENTRY_LEN", ENTROPY_ENTRY_LEN as u64,
        "Bytes of an entropy table entry: gpa u64, len u32, value u32."),
    unsigned("MAX_ENTROPY_REGIONS", MAX_ENTROPY_REGIONS as u64,
        "Most entries in the entropy table."),
    header("FRESH_COUNT", header::FRESH_COUNT,
        "u32, guest to host at READY: runs in the fresh-memory table."),
    header("FRESH_TABLE", header::FRESH_TABLE,
        "Guest to host at READY: the fresh-memory table (crates/protocol/src/fresh.rs)."),
    int("FRESH_ENTRY_LEN", fresh::ENTRY_LEN as u64,
        "Bytes of a fresh-memory entry: gpa u64, len u64."),
    unsigned("MAX_FRESH_RUNS", fresh::MAX_RUNS as u64,
        "Most entries in the fresh-memory table."),
    unsigned("REQUEST_OFFSET", REQUEST_OFFSET as u64,
        "The request's code, then its stdin, start here."),
    unsigned("REQUEST_CAPACITY", REQUEST_CAPACITY as u64,
        "Room for code plus stdin."),
    unsigned("RESPONSE_OFFSET", RESPONSE_OFFSET as u64,
        "A response chunk's stdout, then its stderr, start here."),
    unsigned("RESPONSE_CAPACITY", RESPONSE_CAPACITY as u64,
        "Room for stdout, stderr and results in one chunk."),
    unsigned("SMALL_RESPONSE_OFFSET", SMALL_RESPONSE_OFFSET as u64,
        "A chunk of at most SMALL_RESPONSE_CAPACITY bytes may start here instead, over the request read."),
    unsigned("SMALL_RESPONSE_CAPACITY", SMALL_RESPONSE_CAPACITY as u64,
        "Room for a chunk at SMALL_RESPONSE_OFFSET: the rest of the header's page."),
    unsigned("FLAG_STDOUT_TRUNCATED", FLAG_STDOUT_TRUNCATED as u64,
        "RESPONSE_FLAGS: stdout was cut at the limit."),
    unsigned("FLAG_STDERR_TRUNCATED", FLAG_STDERR_TRUNCATED as u64,
        "RESPONSE_FLAGS: stderr was cut at the limit."),
    unsigned("FLAG_MORE", FLAG_MORE as u64,
        "RESPONSE_FLAGS: more chunks of this response follow."),
    unsigned("FLAG_RESULTS_TRUNCATED", FLAG_RESULTS_TRUNCATED as u64,
        "RESPONSE_FLAGS: results were cut at the limit."),
    unsigned("REQUEST_STREAM", REQUEST_STREAM as u64,
        "REQUEST_FLAGS: send output as it is written."),
    unsigned("REQUEST_FRESH_FORK", REQUEST_FRESH_FORK as u64,
        "REQUEST_FLAGS: the first request of this fork; seed generators now."),
    unsigned("REQUEST_FILE_OP", REQUEST_FILE_OP as u64,
        "REQUEST_FLAGS: a file operation for the native half (crates/protocol/src/files.rs)."),
    int("FILE_REQUEST_HEADER", files::REQUEST_HEADER as u64,
        "Bytes of a file request before its paths."),
    int("FILE_ENTRY_HEADER", files::ENTRY_HEADER as u64,
        "Bytes of a file entry before its name."),
    int("FILE_EXTENT_LEN", files::EXTENT_LEN as u64,
        "Bytes of one extent of a file map."),
    unsigned("FILE_STAT", files::FileOp::Stat as u64, "File op: stat."),
    unsigned("FILE_LIST", files::FileOp::List as u64, "File op: list a directory."),
    unsigned("FILE_MAKE_DIR", files::FileOp::MakeDir as u64, "File op: mkdir."),
    unsigned("FILE_REMOVE", files::FileOp::Remove as u64, "File op: remove."),
    unsigned("FILE_RENAME", files::FileOp::Rename as u64, "File op: rename."),
    unsigned("FILE_WRITE_MAP", files::FileOp::WriteMap as u64, "File op: allocate on the disk, answer a map."),
    unsigned("FILE_READ_MAP", files::FileOp::ReadMap as u64, "File op: answer a map."),
    unsigned("FILE_SET_SIZE", files::FileOp::SetSize as u64, "File op: truncate."),
    unsigned("FILE_WRITE_DATA", files::FileOp::WriteData as u64, "File op: write the request's data."),
    unsigned("FILE_READ_DATA", files::FileOp::ReadData as u64, "File op: read into the reply."),
    unsigned("FILE_PORT_CONNECT", files::FileOp::PortConnect as u64, "Port tunnel: connect to a loopback port."),
    unsigned("FILE_PORT_EXCHANGE", files::FileOp::PortExchange as u64, "Port tunnel: send, wait, receive."),
    unsigned("FILE_PORT_CLOSE", files::FileOp::PortClose as u64, "Port tunnel: close a connection."),
    unsigned("FILE_PARENTS", files::PARENTS as u64, "File flag: create parent directories."),
    unsigned("FILE_RECURSIVE", files::RECURSIVE as u64, "File flag: remove a directory's contents."),
    unsigned("FILE_TRUNCATE", files::TRUNCATE as u64, "File flag: start the file empty."),
    int("FILE_KIND_FILE", files::KIND_FILE as u64, "Entry kind: regular file."),
    int("FILE_KIND_DIR", files::KIND_DIR as u64, "Entry kind: directory."),
    int("FILE_KIND_SYMLINK", files::KIND_SYMLINK as u64, "Entry kind: symbolic link."),
    int("FILE_KIND_OTHER", files::KIND_OTHER as u64, "Entry kind: anything else."),
    unsigned("MAX_OUTPUT_LIMIT", MAX_OUTPUT_LIMIT as u64,
        "The largest OUTPUT_LIMIT a request may ask for."),
    unsigned("DEFAULT_OUTPUT_LIMIT", DEFAULT_OUTPUT_LIMIT as u64,
        "The OUTPUT_LIMIT the host sends unless asked for another."),
    int("DOORBELL_READY", Doorbell::Ready as u8 as u64,
        "Doorbell byte: booted and warm; the host snapshots."),
    int("DOORBELL_RESULT", Doorbell::Result as u8 as u64,
        "Doorbell byte: a response chunk is in the mailbox."),
];

// The agents read and write some neighbouring fields with one struct call
// (agent.py: "<II" at H_MAGIC, "<III" at H_REQUEST_SEQ, "<II" at
// H_OUTPUT_LIMIT, "<QII" per entropy entry), so moving one of them apart
// must fail here rather than in a guest.
const _: () = assert!(header::VERSION == header::MAGIC + 4);
const _: () = assert!(header::CODE_LEN == header::REQUEST_SEQ + 4 && header::STDIN_LEN == header::CODE_LEN + 4);
const _: () = assert!(header::REQUEST_FLAGS == header::OUTPUT_LIMIT + 4);
const _: () = assert!(ENTROPY_ENTRY_LEN == 8 + 4 + 4);
const _: () = assert!(fresh::ENTRY_LEN == 8 + 8);

/// The first line of every rendering.
const NOTICE: &str = "Generated by zeroboot from crates/protocol (zeroboot_protocol::guest_layout): do not edit.";

pub const PYTHON_MODULE: &str = "zeroboot_mailbox.py";
pub const JAVASCRIPT_MODULE: &str = "zeroboot_mailbox.js";
pub const C_HEADER: &str = "zeroboot_mailbox.h";

/// Renders one file's contents.
pub type Render = fn() -> String;

/// Every rendering, by the file name the agents load it from.
pub const FILES: &[(&str, Render)] = &[
    (PYTHON_MODULE, python_module),
    (JAVASCRIPT_MODULE, javascript_module),
    (C_HEADER, c_header),
];

/// `zeroboot_mailbox.py`, for agent.py.
pub fn python_module() -> String {
    let mut out = format!("# {NOTICE}\n\"\"\"The zeroboot host<->guest mailbox layout, version {VERSION}.\"\"\"\n");
    for c in LAYOUT {
        out += &format!("\n# {}\n{} = {}\n", c.doc, c.flat_name(), c.value);
    }
    out
}

/// `zeroboot_mailbox.js`, a CommonJS module for agent.js. Header offsets are
/// grouped in an object `H`, which is how agent.js names them.
pub fn javascript_module() -> String {
    let entry = |c: &Constant, indent: &str| format!("{indent}// {}\n{indent}{}: {},\n", c.doc, c.name, c.value);
    let mut out = format!(
        "// {NOTICE}\n// The zeroboot host<->guest mailbox layout, version {VERSION}.\n\
         'use strict';\n\nmodule.exports = {{\n"
    );
    for c in LAYOUT.iter().filter(|c| c.kind != Kind::Header) {
        out += &entry(c, "  ");
    }
    out += "  // Header field offsets, in bytes from the start of the mailbox.\n  H: {\n";
    for c in LAYOUT.iter().filter(|c| c.kind == Kind::Header) {
        out += &entry(c, "    ");
    }
    out += "  },\n};\n";
    out
}

/// `zeroboot_mailbox.h`, included by the agents' native halves (guest.h).
pub fn c_header() -> String {
    let mut out = format!(
        "/* {NOTICE} */\n/* The zeroboot host<->guest mailbox layout, version {VERSION}. */\n\
         #ifndef ZEROBOOT_MAILBOX_H\n#define ZEROBOOT_MAILBOX_H\n"
    );
    for c in LAYOUT {
        let suffix = if c.kind == Kind::Unsigned { "u" } else { "" };
        out += &format!("\n/* {} */\n#define ZB_{} {}{suffix}\n", c.doc, c.flat_name(), c.value);
    }
    out += "\n#endif /* ZEROBOOT_MAILBOX_H */\n";
    out
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::{Path, PathBuf};
    use std::process::Command;

    use serde_json::{json, Value};

    use super::*;

    /// A fresh directory for one test's files.
    fn scratch(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("zeroboot-layout-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Runs `program args` and returns its stdout as JSON.
    fn run_json(program: &str, args: &[&str]) -> Value {
        let out = Command::new(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{program} failed ({}): {stderr}", out.status);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{program} printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    fn flat_names() -> Value {
        LAYOUT.iter().map(|c| (c.flat_name(), json!(c.value))).collect()
    }

    #[test]
    fn names_are_unique_and_values_exact_in_every_language() {
        let names: BTreeSet<String> = LAYOUT.iter().map(Constant::flat_name).collect();
        assert_eq!(names.len(), LAYOUT.len(), "a name is in the table twice");
        for c in LAYOUT {
            // JavaScript numbers are doubles; a C `int` is 32 bits.
            assert!(c.value < 1 << 53, "{} does not fit a JavaScript number", c.name);
            assert!(
                c.kind == Kind::Unsigned || c.value <= i32::MAX as u64,
                "{} is no C int",
                c.name
            );
            assert!(
                !c.doc.contains('\n') && !c.doc.contains("*/"),
                "{}'s doc breaks a comment",
                c.name
            );
        }
        for (name, render) in FILES {
            assert!(
                render().lines().next().unwrap().contains(NOTICE),
                "{name} starts without the notice"
            );
        }
    }

    #[test]
    fn python_module_has_every_value() {
        let dir = scratch("python");
        std::fs::write(dir.join(PYTHON_MODULE), python_module()).unwrap();
        let script = "import json, sys; sys.path.insert(0, sys.argv[1]); import zeroboot_mailbox as m; \
                      print(json.dumps({k: v for k, v in vars(m).items() if not k.startswith('_')}))";
        let got = run_json("python3", &["-I", "-B", "-c", script, dir.to_str().unwrap()]);
        assert_eq!(got, flat_names());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn javascript_module_has_every_value() {
        let dir = scratch("javascript");
        let path = dir.join(JAVASCRIPT_MODULE);
        std::fs::write(&path, javascript_module()).unwrap();
        let got = run_json(
            "node",
            &[
                "-e",
                "console.log(JSON.stringify(require(process.argv[1])))",
                path.to_str().unwrap(),
            ],
        );
        let mut want: BTreeMap<String, Value> = BTreeMap::new();
        let mut h = serde_json::Map::new();
        for c in LAYOUT {
            match c.kind {
                Kind::Header => {
                    h.insert(c.name.into(), json!(c.value));
                }
                Kind::Int | Kind::Unsigned => {
                    want.insert(c.name.into(), json!(c.value));
                }
            }
        }
        want.insert("H".into(), Value::Object(h));
        assert_eq!(got, json!(want));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn c_header_has_every_value_with_its_signedness() {
        let dir = scratch("c");
        std::fs::write(dir.join(C_HEADER), c_header()).unwrap();
        // Prints every table entry as the compiler sees it, and fails to
        // compile if one is signed where the table says unsigned or back.
        let mut program = format!("#include <stdio.h>\n#include \"{C_HEADER}\"\n#include \"{C_HEADER}\"\n");
        for c in LAYOUT {
            let name = format!("ZB_{}", c.flat_name());
            let unsigned = c.kind == Kind::Unsigned;
            program += &format!(
                "_Static_assert(_Generic(({name}), unsigned: 1, unsigned long: 1, unsigned long long: 1, \
                 default: 0) == {}, \"{name} signedness\");\n",
                u8::from(unsigned)
            );
        }
        program += "int main(void)\n{\n    printf(\"{\");\n";
        for (i, c) in LAYOUT.iter().enumerate() {
            let name = format!("ZB_{}", c.flat_name());
            let comma = if i == 0 { "" } else { ", " };
            program += &format!("    printf(\"{comma}\\\"{name}\\\": %llu\", (unsigned long long)({name}));\n");
        }
        program += "    printf(\"}\\n\");\n    return 0;\n}\n";
        std::fs::write(dir.join("main.c"), program).unwrap();
        let binary = dir.join("main");
        let cc = Command::new("cc")
            .args(["-std=gnu11", "-Wall", "-Wextra", "-Werror", "-o"])
            .args([&binary, &dir.join("main.c")])
            .output()
            .unwrap();
        assert!(cc.status.success(), "cc: {}", String::from_utf8_lossy(&cc.stderr));
        let got = run_json(binary.to_str().unwrap(), &[]);
        let want: Value = LAYOUT
            .iter()
            .map(|c| (format!("ZB_{}", c.flat_name()), json!(c.value)))
            .collect();
        assert_eq!(got, want);
        // And the header defines nothing else of the layout.
        let macros = Command::new("cc")
            .args(["-dM", "-E"])
            .arg(dir.join(C_HEADER))
            .output()
            .unwrap();
        assert!(
            macros.status.success(),
            "cc -E: {}",
            String::from_utf8_lossy(&macros.stderr)
        );
        let defined: BTreeSet<String> = String::from_utf8_lossy(&macros.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("#define ZB_"))
            .filter_map(|l| l.split_whitespace().next())
            .map(|name| format!("ZB_{name}"))
            .collect();
        let want: BTreeSet<String> = want.as_object().unwrap().keys().cloned().collect();
        assert_eq!(defined, want);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Whether `line` assigns `name` in Python or shell: a target of a
    /// (possibly tuple) assignment, or a `NAME=` word.
    fn script_assigns(line: &str, name: &str) -> bool {
        let code = line.split('#').next().unwrap_or("");
        if code
            .split_whitespace()
            .any(|word| word.starts_with(&format!("{name}=")))
        {
            return true;
        }
        let Some(eq) = assignment(code) else {
            return false;
        };
        code[..eq]
            .split(',')
            .map(|target| target.split(':').next().unwrap_or("").trim())
            .any(|target| target == name)
    }

    /// The byte index of the first `=` that is an assignment, not part of a
    /// comparison, in `code`.
    fn assignment(code: &str) -> Option<usize> {
        let bytes = code.as_bytes();
        (0..bytes.len()).find(|&i| {
            bytes[i] == b'='
                && bytes.get(i + 1) != Some(&b'=')
                && bytes.get(i + 1) != Some(&b'>')
                && (i == 0 || !b"=!<>".contains(&bytes[i - 1]))
        })
    }

    /// Whether `line` defines `name` in JavaScript: a declaration or
    /// assignment, or an object key (but not `cond ? NAME : other`).
    fn javascript_defines(line: &str, name: &str) -> bool {
        let code = line.split("//").next().unwrap_or("");
        let is_ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b == b'.';
        let mut from = 0;
        while let Some(found) = code[from..].find(name) {
            let (start, end) = (from + found, from + found + name.len());
            from = end;
            let bytes = code.as_bytes();
            if (start > 0 && is_ident(bytes[start - 1])) || bytes.get(end).is_some_and(|&b| is_ident(b)) {
                continue;
            }
            let after = code[end..].trim_start();
            let defines = (after.starts_with(':') || (after.starts_with('=') && assignment(after) == Some(0)))
                && !code[..start].trim_end().ends_with('?');
            if defines {
                return true;
            }
        }
        false
    }

    fn c_defines(line: &str, name: &str) -> bool {
        let Some(directive) = line.trim_start().strip_prefix('#') else {
            return false;
        };
        let mut words = directive.split_whitespace();
        words.next() == Some("define")
            && words
                .next()
                .is_some_and(|macro_name| macro_name.split('(').next() == Some(format!("ZB_{name}").as_str()))
    }

    fn agent_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/agent")
    }

    #[test]
    fn no_agent_keeps_its_own_copy() {
        let dir = agent_dir();
        let mut files = vec![dir.join("agent.py"), dir.join("agent.js"), dir.join("agent.sh")];
        let mut native: Vec<PathBuf> = std::fs::read_dir(dir.join("native"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "c" || x == "h"))
            .collect();
        native.sort();
        assert!(native.len() >= 4, "native sources missing: {native:?}");
        files.extend(native);
        let mut copies = Vec::new();
        for path in &files {
            let text = std::fs::read_to_string(path).unwrap();
            let ext = path.extension().and_then(|x| x.to_str()).unwrap_or("");
            for (number, line) in text.lines().enumerate() {
                for c in LAYOUT {
                    let flat = c.flat_name();
                    let defines = match ext {
                        "py" => script_assigns(line, &flat),
                        "sh" => script_assigns(line, &flat) || script_assigns(line, &format!("ZB_{flat}")),
                        "js" => {
                            javascript_defines(line, &flat)
                                || (c.kind == Kind::Header && javascript_defines(line, c.name))
                        }
                        _ => c_defines(line, &flat),
                    };
                    if defines {
                        copies.push(format!("{}:{}: {}", path.display(), number + 1, line.trim()));
                    }
                }
            }
        }
        copies.dedup();
        assert!(
            copies.is_empty(),
            "hand-written layout constants:\n{}",
            copies.join("\n")
        );
        // And each loads the generated file instead.
        let read = |p: &str| std::fs::read_to_string(dir.join(p)).unwrap();
        assert!(read("agent.py").contains("from zeroboot_mailbox import"));
        assert!(read("agent.js").contains(&format!("require(path.join(__dirname, '{JAVASCRIPT_MODULE}'))")));
        assert!(read("native/guest.h").contains(&format!("#include \"{C_HEADER}\"")));
    }

    #[test]
    fn the_copy_detectors_see_copies() {
        assert!(script_assigns("MAILBOX_SIZE = 2 << 20", "MAILBOX_SIZE"));
        assert!(script_assigns(
            "H_MAGIC, H_VERSION, H_REQUEST_SEQ = 0, 4, 8",
            "H_VERSION"
        ));
        assert!(script_assigns("readonly ZB_VERSION=5", "ZB_VERSION"));
        assert!(!script_assigns("if (magic, version) != (MAGIC, VERSION):", "VERSION"));
        assert!(!script_assigns(
            "mailbox[H_BOOT_SEED : H_BOOT_SEED + BOOT_SEED_LEN] = b",
            "H_BOOT_SEED"
        ));
        assert!(!script_assigns("limit = min(x, MAX_OUTPUT_LIMIT)", "MAX_OUTPUT_LIMIT"));
        assert!(javascript_defines("const FLAG_MORE = 4;", "FLAG_MORE"));
        assert!(javascript_defines(
            "  MAGIC: 0, VERSION: 4, REQUEST_SEQ: 8,",
            "REQUEST_SEQ"
        ));
        assert!(javascript_defines("module.exports = { MAGIC: 1 }", "MAGIC"));
        assert!(!javascript_defines(
            "if (magic !== MAGIC || version !== VERSION) {",
            "MAGIC"
        ));
        assert!(!javascript_defines("x(i % 2 ? REQUEST_STREAM : 0)", "REQUEST_STREAM"));
        assert!(!javascript_defines("const { MAGIC, H } = require('x');", "MAGIC"));
        assert!(!javascript_defines("v.setUint32(H.MAGIC, 1)", "MAGIC"));
        assert!(c_defines("#define ZB_MAGIC 0x424d425au", "MAGIC"));
        assert!(c_defines("  #  define ZB_FLAG_MORE 4u", "FLAG_MORE"));
        assert!(!c_defines("#define ZB_MAGICAL 1", "MAGIC"));
        assert!(!c_defines("if (magic != ZB_MAGIC)", "MAGIC"));
    }
}
