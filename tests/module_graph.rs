//! The library's top-level modules import one another without cycles (issue 16; house rule "no import cycles").
//!
//! A module is a file `src/X.rs` or a folder `src/X/` (`cli/`, `main.rs` and `lib.rs` are the binary and the crate
//! root, not modules of the graph). An edge X → Y is a `crate::Y` path anywhere in X's code outside comments and
//! test modules (`#[cfg(test)]` items: tests may reach upward). The strongly connected components of that graph
//! (Tarjan) must all be single modules.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `text` without comments and without the items under a `#[cfg(test)]` / `#[cfg(all(test, …))]` attribute
/// (a brace-balanced skip, so a test module's body is dropped whole), and the names of the test-only modules it
/// declares in files of their own (`#[cfg(test)] mod testutil;`).
fn code_only(text: &str) -> (String, Vec<String>) {
    let mut out = String::new();
    let mut test_files = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let code = line.split("//").next().unwrap_or("");
        let trimmed = code.trim_start();
        if trimmed.starts_with("#[cfg(test)]") || trimmed.starts_with("#[cfg(all(test") {
            // Skip the attributed item: up to its matching close brace, or its `;`.
            let mut depth = 0i64;
            let mut opened = false;
            for l in lines.by_ref() {
                let c = l.split("//").next().unwrap_or("");
                for ch in c.chars() {
                    match ch {
                        '{' => {
                            depth += 1;
                            opened = true;
                        }
                        '}' => depth -= 1,
                        _ => {}
                    }
                }
                if !opened && c.trim_end().ends_with(';') {
                    let item = c.trim().trim_start_matches("pub(crate) ").trim_start_matches("pub ");
                    if let Some(name) = item.strip_prefix("mod ").and_then(|r| r.strip_suffix(';')) {
                        test_files.push(name.trim().to_string());
                    }
                    break;
                }
                if opened && depth <= 0 {
                    break;
                }
            }
            continue;
        }
        out.push_str(code);
        out.push('\n');
    }
    (out, test_files)
}

/// The module graph of `src/`: module → the modules it names with `crate::`.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut modules = BTreeSet::new();
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        let is_module = if path.is_dir() {
            name != "cli"
        } else {
            path.extension().is_some_and(|e| e == "rs") && name != "lib" && name != "main"
        };
        if is_module {
            modules.insert(name);
        }
    }
    let mut graph: BTreeMap<String, BTreeSet<String>> = modules.iter().map(|m| (m.clone(), BTreeSet::new())).collect();
    let mut files = Vec::new();
    rust_files(src, &mut files);
    // Files that only tests compile (declared under `#[cfg(test)]` by a file of the same folder).
    let mut test_only = BTreeSet::new();
    for file in &files {
        let dir = file.parent().unwrap();
        for name in code_only(&std::fs::read_to_string(file).unwrap()).1 {
            test_only.insert(dir.join(format!("{name}.rs")));
            test_only.insert(dir.join(&name).join("mod.rs"));
        }
    }
    for file in files.iter().filter(|f| !test_only.contains(*f)) {
        let rel = file.strip_prefix(src).unwrap();
        let first = rel.components().next().unwrap().as_os_str().to_string_lossy().to_string();
        let module = first.strip_suffix(".rs").unwrap_or(&first).to_string();
        if !modules.contains(&module) {
            continue;
        }
        let (code, _) = code_only(&std::fs::read_to_string(file).unwrap());
        for (i, _) in code.match_indices("crate::") {
            let rest = &code[i + "crate::".len()..];
            let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if name != module && modules.contains(&name) {
                graph.get_mut(&module).unwrap().insert(name);
            }
        }
    }
    graph
}

/// Tarjan's strongly connected components with more than one module.
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct State<'a> {
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in &s.graph[v] {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if s.on_stack.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.out.push(component);
            }
        }
    }
    let mut s = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.out
}

#[test]
fn the_checker_finds_a_cycle_and_skips_tests_and_comments() {
    let (code, test_files) = code_only(
        "use crate::a::X; // crate::c\n#[cfg(test)]\nmod tests {\n    use crate::b;\n}\nfn f() { crate::d::g() }\n\
         #[cfg(all(test, feature = \"cuda\"))]\npub(crate) mod gpu_tests;\n",
    );
    assert_eq!(test_files, ["gpu_tests"]);
    assert!(code.contains("crate::a") && code.contains("crate::d"), "{code}");
    assert!(!code.contains("crate::b") && !code.contains("crate::c"), "{code}");
    let edge = |a: &str, b: &[&str]| (a.to_string(), b.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>());
    let graph: BTreeMap<_, _> = [edge("a", &["b"]), edge("b", &["c"]), edge("c", &["a"]), edge("d", &["a"])].into();
    assert_eq!(cycles(&graph), vec![vec!["a".to_string(), "b".to_string(), "c".to_string()]]);
}

#[test]
fn modules_import_each_other_without_cycles() {
    let graph = module_graph(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    // The layering this test protects (a sample, so that a broken scan does not pass vacuously).
    assert!(graph["peft_model"].contains("adapter") && graph["peft_model"].contains("model"), "{graph:?}");
    assert!(graph["model"].contains("linear") && graph["linear"].contains("adapter"), "{graph:?}");
    let found = cycles(&graph);
    assert!(found.is_empty(), "modules that import each other (a cycle each): {found:?}");
}
