//! The library's shape, checked: data flows one way between the modules of
//! `loopguard/src` (no import cycle), and a command module asks the engine
//! instead of naming a layer's module (`ebpf`, `nft`).
//!
//! Read from the sources: `crate::x` paths and `use crate::{x, …}` trees
//! name module `x` (doc comments and test code do not count).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in fs::read_dir(&d).expect("read src") {
            let p = entry.expect("entry").path();
            if p.is_dir() {
                todo.push(p);
            } else if p.extension().is_some_and(|e| e == "rs") {
                out.push(p);
            }
        }
    }
    out
}

/// A file's code: comments and the unit-test module left out.
fn code(path: &Path) -> String {
    let text = fs::read_to_string(path).expect("read source");
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => &text,
    };
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn ident_at(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The first segments of the paths `code` names under `root` (`crate`,
/// `loopguard`): `root::x…` and the top items of `root::{x…, y…}`.
fn named_under(code: &str, root: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let prefix = format!("{root}::");
    let mut at = 0;
    while let Some(i) = code[at..].find(&prefix) {
        let start = at + i;
        at = start + prefix.len();
        // Only a path that starts here (`xcrate::` is another word).
        if code[..start]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            continue;
        }
        let rest = &code[at..];
        if let Some(tree) = rest.strip_prefix('{') {
            // Items at depth one of the tree.
            let mut depth = 1;
            let mut item_start = true;
            for (j, c) in tree.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => item_start = true,
                    c if item_start && depth == 1 && !c.is_whitespace() => {
                        item_start = false;
                        out.insert(ident_at(&tree[j..]).to_string());
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(ident_at(rest).to_string());
        }
    }
    out
}

/// The library's top-level modules and the ones each names.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = src();
    let mut modules: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for entry in fs::read_dir(&src).expect("read src") {
        let p = entry.expect("entry").path();
        let name = p
            .file_stem()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        if ["lib", "main", "cmd"].contains(&name.as_str()) {
            continue;
        }
        let files = if p.is_dir() {
            rust_files(&p)
                .into_iter()
                .filter(|f| !f.ends_with("tests.rs"))
                .collect()
        } else {
            vec![p]
        };
        modules.insert(name, files);
    }
    let names: BTreeSet<String> = modules.keys().cloned().collect();
    modules
        .iter()
        .map(|(m, files)| {
            let deps = files
                .iter()
                .flat_map(|f| named_under(&code(f), "crate"))
                .filter(|d| d != m && names.contains(d))
                .collect();
            (m.clone(), deps)
        })
        .collect()
}

/// A cycle in `graph`, if there is one (depth-first, with an explicit
/// stack: no recursion).
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    let mut mark: BTreeMap<&str, Mark> = graph.keys().map(|k| (k.as_str(), Mark::New)).collect();
    for start in graph.keys() {
        if mark[start.as_str()] != Mark::New {
            continue;
        }
        let mut path: Vec<(&str, Vec<&str>)> = Vec::new();
        let next = |m: &str| {
            graph[m]
                .iter()
                .map(String::as_str)
                .rev()
                .collect::<Vec<_>>()
        };
        mark.insert(start, Mark::Open);
        path.push((start, next(start)));
        while let Some((node, todo)) = path.last_mut() {
            let node = *node;
            match todo.pop() {
                Some(dep) => match mark[dep] {
                    Mark::New => {
                        mark.insert(dep, Mark::Open);
                        path.push((dep, next(dep)));
                    }
                    Mark::Open => {
                        let from = path.iter().position(|(n, _)| *n == dep).unwrap_or(0);
                        let mut cycle: Vec<String> =
                            path[from..].iter().map(|(n, _)| n.to_string()).collect();
                        cycle.push(dep.to_string());
                        return Some(cycle);
                    }
                    Mark::Done => {}
                },
                None => {
                    mark.insert(node, Mark::Done);
                    path.pop();
                }
            }
        }
    }
    None
}

#[test]
fn the_library_modules_import_no_cycle() {
    let graph = module_graph();
    assert!(graph.len() > 20, "found only {} modules", graph.len());
    assert!(
        graph["engine"].contains("state") && graph["daemon"].contains("engine"),
        "the reader misses imports: {:?}",
        graph["engine"]
    );
    if let Some(cycle) = find_cycle(&graph) {
        panic!("import cycle between modules: {}", cycle.join(" -> "));
    }
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let g = |edges: &[(&str, &str)]| {
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (a, b) in edges {
            graph
                .entry(a.to_string())
                .or_default()
                .insert(b.to_string());
            graph.entry(b.to_string()).or_default();
        }
        graph
    };
    assert_eq!(
        find_cycle(&g(&[("a", "b"), ("b", "c"), ("c", "a")])),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    assert_eq!(find_cycle(&g(&[("a", "b"), ("b", "c"), ("a", "c")])), None);
    assert_eq!(
        named_under(
            "use crate::{compile::{Plan, X}, engine::{self, health::Drift},\n    state};",
            "crate"
        ),
        ["compile", "engine", "state"]
            .iter()
            .map(ToString::to_string)
            .collect()
    );
}

#[test]
fn command_modules_name_no_layer_module() {
    let layers = ["ebpf", "nft"];
    let mut offenders = Vec::new();
    for f in rust_files(&src().join("cmd")) {
        let named = named_under(&code(&f), "loopguard");
        for l in layers.iter().filter(|l| named.contains(**l)) {
            offenders.push(format!(
                "{} names loopguard::{l}",
                f.file_name().unwrap_or_default().to_string_lossy()
            ));
        }
    }
    assert!(
        offenders.is_empty(),
        "commands ask the engine, not a layer: {offenders:?}"
    );
}
