//! The layering check of `docs/architecture.md`: parses every `crate::`
//! path in `pccl-core/src` into edges between top-level modules and fails
//! on any import circle that is not on the list of known ones below. The
//! list may only shrink: a known circle that is gone fails the test too, so
//! the list (and the doc) stay true.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Circles that exist today and are to be removed (docs/architecture.md,
/// "Known circles"): each as its two modules, in name order.
const KNOWN_CIRCLES: &[(&str, &str)] = &[
    // The p2p readers land all-gather frames through `collectives::Landing`.
    ("collectives", "comm"),
    // `shared_state` uses the control channel; `comm` calls `run_sync`.
    ("comm", "shared_state"),
];

/// The top-level module a source file belongs to (`None` for the crate
/// root and binaries).
fn module_of(rel: &Path) -> Option<String> {
    let first = rel.components().next()?.as_os_str().to_str()?.to_owned();
    let name = first.strip_suffix(".rs").unwrap_or(&first).to_owned();
    (name != "lib" && name != "bin").then_some(name)
}

/// Every top-level module named after `crate::` in `src`: `crate::a::b`,
/// `crate::{a, b::c}` and nested groups.
fn referenced_modules(src: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = src;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level items of the group, up to its matching brace.
            let mut depth = 1;
            let mut item = String::new();
            let mut at_item_start = true;
            for ch in group.chars() {
                match ch {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => {
                        if !item.is_empty() {
                            out.insert(std::mem::take(&mut item));
                        }
                        at_item_start = true;
                        continue;
                    }
                    _ => {}
                }
                if depth == 1 && at_item_start {
                    if ch.is_alphanumeric() || ch == '_' {
                        item.push(ch);
                        continue;
                    }
                    if !item.is_empty() {
                        out.insert(std::mem::take(&mut item));
                        at_item_start = false;
                    }
                }
            }
            if !item.is_empty() {
                out.insert(item);
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut modules = BTreeSet::new();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        if let Some(m) = module_of(f.strip_prefix(&src).expect("under src")) {
            modules.insert(m);
        }
    }
    for f in &files {
        let Some(m) = module_of(f.strip_prefix(&src).expect("under src")) else {
            continue;
        };
        let text = std::fs::read_to_string(f).expect("read source");
        let targets = graph.entry(m.clone()).or_default();
        for t in referenced_modules(&text) {
            // Items re-exported at the root (`crate::Error`) are not modules.
            if t != m && modules.contains(&t) {
                targets.insert(t);
            }
        }
    }
    graph
}

/// Pairs of modules that reach each other (both ways), in name order.
fn circles(graph: &BTreeMap<String, BTreeSet<String>>) -> BTreeSet<(String, String)> {
    let reach = |from: &str| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.to_owned()];
        while let Some(m) = todo.pop() {
            for t in graph.get(&m).into_iter().flatten() {
                if seen.insert(t.clone()) {
                    todo.push(t.clone());
                }
            }
        }
        seen
    };
    let mut out = BTreeSet::new();
    for a in graph.keys() {
        for b in graph.get(a).into_iter().flatten() {
            if a < b && reach(b).contains(a) {
                out.insert((a.clone(), b.clone()));
            }
        }
    }
    out
}

#[test]
fn the_parser_reads_paths_and_groups() {
    let got = referenced_modules(
        "use crate::error::{Error, Result};\nuse crate::{kernels, quant::{self, x}, wire::A};\nlet x = crate::hash::f();",
    );
    let want: BTreeSet<String> = ["error", "kernels", "quant", "wire", "hash"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(got, want);
}

#[test]
fn no_import_circle_but_the_known_ones() {
    let graph = module_graph();
    assert!(graph.contains_key("master") && graph.contains_key("collectives"));
    let found = circles(&graph);
    let known: BTreeSet<(String, String)> = KNOWN_CIRCLES
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    let new: Vec<_> = found.difference(&known).collect();
    assert!(
        new.is_empty(),
        "new import circles between top-level modules of pccl-core: {new:?}\ngraph: {graph:#?}"
    );
    let gone: Vec<_> = known.difference(&found).collect();
    assert!(
        gone.is_empty(),
        "known circles that no longer exist (remove them from KNOWN_CIRCLES and docs/architecture.md): {gone:?}"
    );
    // The master never depends on the peer side.
    let master = &graph["master"];
    for peer_side in ["comm", "collectives", "shared_state"] {
        assert!(!master.contains(peer_side), "master imports {peer_side}");
    }
}

#[test]
fn diloco_sits_on_the_public_api_only() {
    let graph = module_graph();
    let uses = graph.get("diloco").expect("diloco module");
    let allowed = ["error", "types", "quant", "hash", "comm", "shared_state"];
    let extra: Vec<_> = uses
        .iter()
        .filter(|m| !allowed.contains(&m.as_str()))
        .collect();
    assert!(
        extra.is_empty(),
        "diloco imports internal modules {extra:?}; it may use only the public API"
    );
    let users: Vec<_> = graph
        .iter()
        .filter(|(m, deps)| *m != "diloco" && deps.contains("diloco"))
        .map(|(m, _)| m)
        .collect();
    assert!(users.is_empty(), "{users:?} import diloco, the top layer");
}

/// Names only the TCP implementation in `src/net/` may use: socket types,
/// raw descriptors and socket syscalls (docs/architecture.md, "net").
const SOCKET_NAMES: &[&str] = &[
    "TcpStream",
    "TcpListener",
    "TcpSocket",
    "OwnedReadHalf",
    "OwnedWriteHalf",
    "tokio::net",
    "std::net::Tcp",
    "RawFd",
    "AsRawFd",
    "as_raw_fd",
    "SockRef",
    "socket2",
    "libc::send",
    "libc::recv",
    "libc::shutdown",
    "libc::poll",
    "libc::setsockopt",
    "libc::msghdr",
];

/// The lines of `text` that mention any of `names`, as (line number, name).
fn socket_mentions(text: &str, names: &[&str]) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        for n in names {
            if line.contains(n) {
                out.push((i + 1, n.to_string()));
            }
        }
    }
    out
}

#[test]
fn the_socket_check_finds_what_it_looks_for() {
    let text = "use tokio::net::TcpStream;\nlet fd = s.as_raw_fd();\nlet ok = 1;\nunsafe { libc::sendmsg(fd, &m, 0) };";
    let got = socket_mentions(text, SOCKET_NAMES);
    let lines: BTreeSet<usize> = got.iter().map(|(l, _)| *l).collect();
    assert_eq!(lines, BTreeSet::from([1, 2, 4]));
    assert!(got.iter().any(|(_, n)| n == "libc::send"));
}

#[test]
fn only_the_net_layer_names_sockets() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let net = src.join("net");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(
        files.iter().any(|f| f.starts_with(&net)),
        "src/net/ is missing"
    );
    let mut found = Vec::new();
    for f in files.iter().filter(|f| !f.starts_with(&net)) {
        let text = std::fs::read_to_string(f).expect("read source");
        for (line, name) in socket_mentions(&text, SOCKET_NAMES) {
            let rel = f.strip_prefix(&src).expect("under src").display();
            found.push(format!("src/{rel}:{line}: {name}"));
        }
    }
    assert!(
        found.is_empty(),
        "socket types, raw fds or socket syscalls outside src/net/ (go through the net traits):\n{}",
        found.join("\n")
    );
}

#[test]
fn the_net_layer_imports_only_the_wire_format() {
    let graph = module_graph();
    let net = graph.get("net").expect("module net");
    let allowed: BTreeSet<String> = ["wire".to_string()].into();
    let extra: Vec<_> = net.difference(&allowed).collect();
    assert!(extra.is_empty(), "net imports {extra:?}");
}
