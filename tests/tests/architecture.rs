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

/// What each module re-exports from its submodules (`pub use a::b::{X, Y}`
/// in module `m`: `m::X` → `m::a::b::X`), so that `crate::X` leads to the
/// file that defines `X`, not to lib.rs.
fn re_exports(modules: &BTreeMap<ModulePath, PathBuf>) -> BTreeMap<ModulePath, ModulePath> {
    let mut out = BTreeMap::new();
    for (module, file) in modules {
        let text = code(&std::fs::read_to_string(file).expect("read a source file"));
        for statement in text.split(';') {
            let Some(used) = statement.trim().strip_prefix("pub use ") else {
                continue;
            };
            if used.starts_with("crate::") || used.starts_with("super::") {
                continue;
            }
            let (prefix, names) = match used.split_once("::{") {
                Some((prefix, group)) => (prefix, group.trim_end_matches('}').split(',').collect::<Vec<_>>()),
                None => match used.rsplit_once("::") {
                    Some((prefix, name)) => (prefix, vec![name]),
                    None => continue,
                },
            };
            for name in names.iter().map(|n| n.trim()).filter(|n| !n.is_empty()) {
                let mut from = module.clone();
                from.push(name.to_string());
                let mut to = module.clone();
                to.extend(prefix.split("::").map(str::to_string));
                to.push(name.to_string());
                out.insert(from, to);
            }
        }
    }
    out
}

/// The file of the deepest module on `path` that has one, following
/// re-exports.
fn resolve<'a>(
    modules: &'a BTreeMap<ModulePath, PathBuf>,
    re_exported: &BTreeMap<ModulePath, ModulePath>,
    path: &ModulePath,
) -> Option<&'a PathBuf> {
    let mut path = path.clone();
    // Bounded: a re-export of a re-export, never a cycle of them.
    for _ in 0..8 {
        let n = (0..=path.len()).rev().find(|&n| modules.contains_key(&path[..n]))?;
        match path.get(n).and_then(|_| re_exported.get(&path[..=n])) {
            Some(target) => path = target.clone(),
            None => return modules.get(&path[..n]),
        }
    }
    None
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
    let re_exported = re_exports(&modules);
    let mut edges = BTreeMap::new();
    for file in &files {
        let this = module_of(src, file);
        let text = std::fs::read_to_string(file).expect("read a source file");
        let targets: BTreeSet<PathBuf> = named_paths(&code(&text), &this)
            .iter()
            .filter_map(|p| resolve(&modules, &re_exported, p))
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
    // The same loop through the crate root's re-export of b's item.
    std::fs::write(src.join("lib.rs"), "pub mod a;\npub mod b;\npub use b::Thing;\n").expect("write");
    std::fs::write(src.join("a/c.rs"), "use crate::Thing;\n").expect("write");
    let found = find_loop(&import_graph(&src)).expect("a loop: b → a/c → b, through lib.rs");
    assert_eq!(found.len(), 2, "{found:?}");
    std::fs::remove_dir_all(&dir).expect("clean up");
}
