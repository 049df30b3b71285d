//! The shape of src/ (README, Architecture): every file has a layer, and imports only from its
//! own layer or the layers below; and no files import each other in a circle. Read from the
//! source text: every `use crate::..`, `use super::..` and inline `crate::..` path of a file is
//! resolved to the file that defines the module it names.
// Test code (see Cargo.toml's [lints]): it fails by panicking, and opens descriptors on purpose.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod source_support;

use source_support::{code_of, files, src};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;

/// Each file's layer (paths relative to src/; a folder's files share its layer).
const LAYERS: &[(&str, u8)] = &[
    // 0: no wsloop imports but each other's.
    ("sys.rs", 0),
    ("config.rs", 0),
    ("error.rs", 0),
    ("timer_wheel.rs", 0),
    ("topics.rs", 0),
    ("memory.rs", 0),
    ("admission.rs", 0),
    ("origin.rs", 0),
    // 1: the sans-IO protocol core, and why connections end.
    ("protocol/", 1),
    ("reason.rs", 1),
    // 2: moving a connection's bytes.
    ("io/", 2),
    // 3: the application's API.
    ("app.rs", 3),
    // 4: what the loops report and share.
    ("metrics.rs", 4),
    ("ledger.rs", 4),
    ("audit.rs", 4),
    ("watchdog.rs", 4),
    // What the loops share with the Redis bridge, and the bridge's threads (it reaches the
    // loops through the ledger's inboxes, never through the loop layer).
    ("broker.rs", 4),
    ("bridge.rs", 4),
    ("bridge/", 4),
    // 5: the event loop.
    ("server/", 5),
    // 6: N loops on one port.
    ("cluster.rs", 6),
    // 7: the crate root and the binary.
    ("lib.rs", 7),
    ("main.rs", 7),
];

fn layer_of(file: &str) -> Option<u8> {
    LAYERS
        .iter()
        .find(|(p, _)| match p.strip_suffix('/') {
            Some(dir) => file.starts_with(&format!("{dir}/")),
            None => file == *p,
        })
        .map(|(_, l)| *l)
}

/// The module path of a file (`protocol/session.rs` -> ["protocol", "session"]; `server/mod.rs`
/// -> ["server"]; `lib.rs` -> []).
fn module_of(file: &str) -> Vec<String> {
    let mut parts: Vec<String> = file
        .trim_end_matches(".rs")
        .split('/')
        .map(str::to_string)
        .collect();
    if parts
        .last()
        .is_some_and(|l| l == "mod" || l == "lib" || l == "main")
    {
        parts.pop();
    }
    parts
}

/// The file defining the longest prefix of `path` that is a module, if any.
fn file_of(path: &[String], modules: &BTreeMap<Vec<String>, String>) -> Option<String> {
    (1..=path.len())
        .rev()
        .find_map(|n| modules.get(&path[..n]).cloned())
}

/// The module paths a file refers to: `crate::a::b`, and `super::a::b` resolved from its
/// module; grouped imports (`use crate::{a::b, c}`) expanded one level.
fn references(file: &str, text: &str) -> BTreeSet<Vec<String>> {
    let code = code_of(text);
    let me = module_of(file);
    // `super` of a file's module: its parent (for mod.rs, lib.rs the module itself is the
    // folder, so super is the folder's parent too).
    let parent: Vec<String> = me[..me.len().saturating_sub(1)].to_vec();
    let mut refs = BTreeSet::new();
    let bytes = code.as_bytes();
    for (start, root) in ["crate::", "super::"]
        .iter()
        .flat_map(|p| code.match_indices(p).map(move |(i, _)| (i, *p)))
    {
        if start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_') {
            continue; // part of a longer name
        }
        let rest = &code[start + root.len()..];
        let base: Vec<String> = match root {
            "crate::" => Vec::new(),
            _ => parent.clone(),
        };
        for path in expand(rest) {
            let mut full = base.clone();
            full.extend(path);
            refs.insert(full);
        }
    }
    refs
}

/// The paths at the start of `rest` (after `crate::` or `super::`): `a::b::C` gives
/// ["a", "b", "C"]; `{a::b, c}` gives both.
fn expand(rest: &str) -> Vec<Vec<String>> {
    let ident = |s: &str| -> Vec<String> {
        s.split("::")
            .map(|p| {
                p.trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect::<String>()
            })
            .take_while(|p| !p.is_empty())
            .collect()
    };
    if let Some(group) = rest.strip_prefix('{') {
        let end = group.find('}').unwrap_or(group.len());
        return group[..end]
            .split(',')
            .map(|item| ident(item.trim()))
            .filter(|p| !p.is_empty())
            .collect();
    }
    // `a::b::{C, D}`: the prefix names the module.
    let end = rest
        .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(rest.len());
    vec![ident(&rest[..end])]
}

/// file -> the files it imports from (itself excluded).
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let files = files();
    let modules: BTreeMap<Vec<String>, String> =
        files.iter().map(|f| (module_of(f), f.clone())).collect();
    files
        .iter()
        .map(|f| {
            let text = fs::read_to_string(src().join(f)).expect("read file");
            // Unit tests (`#[cfg(test)] mod tests`) may use anything; they are not the shape.
            let text = match text.find("#[cfg(test)]\nmod ") {
                Some(i) => &text[..i],
                None => &text[..],
            };
            let deps = references(f, text)
                .iter()
                .filter_map(|p| file_of(p, &modules))
                .filter(|d| d != f)
                .collect();
            (f.clone(), deps)
        })
        .collect()
}

#[test]
fn every_file_has_a_layer() {
    let missing: Vec<String> = files()
        .into_iter()
        .filter(|f| layer_of(f).is_none())
        .collect();
    assert!(
        missing.is_empty(),
        "files with no layer (add them to LAYERS in tests/layers.rs and to README's table): {missing:?}"
    );
}

#[test]
fn files_import_only_from_their_layer_or_below() {
    let mut wrong = Vec::new();
    for (file, deps) in graph() {
        let Some(mine) = layer_of(&file) else {
            continue;
        };
        for dep in deps {
            if let Some(theirs) = layer_of(&dep) {
                if theirs > mine {
                    wrong.push(format!(
                        "{file} (layer {mine}) imports {dep} (layer {theirs})"
                    ));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "imports from a layer above: {wrong:#?}");
}

#[test]
fn no_files_import_each_other_in_a_circle() {
    let graph = graph();
    // Depth-first search for a back edge; report the circle found.
    fn visit(
        f: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(f.to_string(), 1);
        stack.push(f.to_string());
        for d in graph.get(f).into_iter().flatten() {
            match state.get(d.as_str()).copied().unwrap_or(0) {
                0 => {
                    if let Some(c) = visit(d, graph, state, stack) {
                        return Some(c);
                    }
                }
                1 => {
                    let at = stack.iter().position(|s| s == d).unwrap();
                    let mut circle = stack[at..].to_vec();
                    circle.push(d.clone());
                    return Some(circle);
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(f.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for f in graph.keys() {
        if state.get(f).copied().unwrap_or(0) == 0 {
            if let Some(circle) = visit(f, &graph, &mut state, &mut Vec::new()) {
                panic!(
                    "files import each other in a circle: {}",
                    circle.join(" -> ")
                );
            }
        }
    }
}

/// The reader itself: it sees the paths of each kind of import.
#[test]
fn the_reader_resolves_imports() {
    let text = "use crate::protocol::session::{Event, Head};\nuse super::core::Core;\n\
                use crate::{app::Handler, reason};\nfn f() { crate::metrics::status_index(1); }\n\
                // use crate::cluster::Cluster;\nconst S: &str = \"crate::ledger::Ledger\";\n";
    let refs = references("server/ws.rs", text);
    let names: BTreeSet<String> = refs.iter().map(|p| p.join("::")).collect();
    for want in [
        "protocol::session",
        "server::core::Core",
        "app::Handler",
        "reason",
        "metrics::status_index",
    ] {
        assert!(
            names.iter().any(|n| n.starts_with(want)),
            "{want} not found in {names:?}"
        );
    }
    assert!(!names
        .iter()
        .any(|n| n.starts_with("cluster") || n.starts_with("ledger")));
    let graph = graph();
    assert!(graph["server/ws.rs"].contains("server/core.rs"));
    assert!(graph["cluster.rs"].contains("server/mod.rs"));
}
