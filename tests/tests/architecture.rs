//! The code's shape, checked: no module of a crate imports, directly or
//! through others, a module that imports it back. An import loop means two
//! files that cannot be understood, changed or tested apart; this finds
//! one the day it is written. Needs no guest.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module's path inside its crate (`["fork", "pool"]`), root empty.
type ModulePath = Vec<String>;

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read a source directory") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `lib.rs` → [], `a.rs` and `a/mod.rs` → [a], `a/b.rs` → [a, b].
fn module_of(src: &Path, file: &Path) -> ModulePath {
    let relative = file.strip_prefix(src).expect("a file under src");
    let mut parts: Vec<String> = relative
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
        parts.pop();
    }
    parts
}

/// The code of a file without comments and without its test module (by
/// convention the last item, after `#[cfg(test)]`).
fn code(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap_or("");
    text.lines()
        .map(|line| line.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every module path the code names through `crate::` or `super::`,
/// including each name of a `use crate::{a, b::c}` group.
fn named_paths(code: &str, this: &ModulePath) -> Vec<ModulePath> {
    let mut out = Vec::new();
    // `super` of a.rs or a/mod.rs ([a]) is the root; of a/b.rs ([a, b]) is [a].
    let parent = this[..this.len().saturating_sub(1)].to_vec();
    for (prefix, base) in [("crate::", Vec::new()), ("super::", parent)] {
        for (at, _) in code.match_indices(prefix) {
            // Not the tail of a longer path (`super::super::x` is one path).
            let preceded_by_path = code[..at]
                .chars()
                .last()
                .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':');
            if preceded_by_path {
                continue;
            }
            let rest = &code[at + prefix.len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                for item in group[..end].split(',') {
                    out.push(path_from(&base, item.trim()));
                }
            } else {
                out.push(path_from(&base, rest));
            }
        }
    }
    out
}

fn path_from(base: &ModulePath, text: &str) -> ModulePath {
    let mut path = base.clone();
    let name_end = text
        .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(text.len());
    for name in text[..name_end].split("::").filter(|s| !s.is_empty()) {
        if name == "super" {
            path.pop();
        } else {
            path.push(name.to_string());
        }
    }
    path
}

/// The file of the deepest module on `path` that has one.
fn resolve<'a>(modules: &'a BTreeMap<ModulePath, PathBuf>, path: &ModulePath) -> Option<&'a PathBuf> {
    (0..=path.len()).rev().find_map(|n| modules.get(&path[..n]))
}

/// A loop in `edges`, as the files on it, if there is one.
fn find_loop(edges: &BTreeMap<PathBuf, BTreeSet<PathBuf>>) -> Option<Vec<PathBuf>> {
    fn visit(
        node: &PathBuf,
        edges: &BTreeMap<PathBuf, BTreeSet<PathBuf>>,
        stack: &mut Vec<PathBuf>,
        done: &mut BTreeSet<PathBuf>,
    ) -> Option<Vec<PathBuf>> {
        if let Some(at) = stack.iter().position(|n| n == node) {
            return Some(stack[at..].to_vec());
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.clone());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(found) = visit(next, edges, stack, done) {
                return Some(found);
            }
        }
        stack.pop();
        done.insert(node.clone());
        None
    }
    let mut done = BTreeSet::new();
    edges
        .keys()
        .find_map(|node| visit(node, edges, &mut Vec::new(), &mut done))
}

fn import_graph(src: &Path) -> BTreeMap<PathBuf, BTreeSet<PathBuf>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: BTreeMap<ModulePath, PathBuf> = files.iter().map(|f| (module_of(src, f), f.clone())).collect();
    let mut edges = BTreeMap::new();
    for file in &files {
        let this = module_of(src, file);
        let text = std::fs::read_to_string(file).expect("read a source file");
        let targets: BTreeSet<PathBuf> = named_paths(&code(&text), &this)
            .iter()
            .filter_map(|p| resolve(&modules, p))
            // A module naming its own submodules, or the crate root's
            // re-exports, is not an import of another concern.
            .filter(|target| *target != file && !target.ends_with("lib.rs"))
            .filter(|target| !module_of(src, target).starts_with(&this) || this.is_empty())
            .cloned()
            .collect();
        edges.insert(file.clone(), targets);
    }
    edges
}

#[test]
fn no_crate_has_an_import_loop() {
    let crates = workspace().join("crates");
    let mut checked = 0;
    for entry in std::fs::read_dir(&crates).expect("read crates/") {
        let src = entry.expect("a crate").path().join("src");
        if !src.is_dir() {
            continue;
        }
        let edges = import_graph(&src);
        assert!(edges.len() > 1 || src.join("lib.rs").exists(), "{}", src.display());
        if let Some(found) = find_loop(&edges) {
            let names: Vec<String> = found
                .iter()
                .map(|f| f.strip_prefix(&crates).unwrap_or(f).display().to_string())
                .collect();
            panic!("import loop: {} → back to the first", names.join(" → "));
        }
        checked += 1;
    }
    assert!(checked >= 6, "found {checked} crates");
}

#[test]
fn the_checker_sees_a_loop() {
    let dir = std::env::temp_dir().join(format!("zeroboot-arch-{}", std::process::id()));
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("a")).expect("temp dir");
    std::fs::write(src.join("lib.rs"), "pub mod a;\npub mod b;\n").expect("write");
    std::fs::write(src.join("a/mod.rs"), "pub mod c;\nuse crate::b::Thing;\n").expect("write");
    std::fs::write(src.join("a/c.rs"), "// use crate::b::X; in a comment\n").expect("write");
    std::fs::write(src.join("b.rs"), "use crate::{x, a::c::Other};\n").expect("write");
    assert!(find_loop(&import_graph(&src)).is_none(), "b → a/c is not a loop");
    std::fs::write(src.join("a/c.rs"), "use super::super::b::X;\n").expect("write");
    let found = find_loop(&import_graph(&src)).expect("a loop: b → a/c → b");
    assert_eq!(found.len(), 2, "{found:?}");
    std::fs::remove_dir_all(&dir).expect("clean up");
}
