//! Checks the dynamic symbol table of the `libpccl.so` that `cargo test`
//! builds alongside the test binaries (Linux only):
//!
//! - its soname is `libpccl.so` (set by build.rs);
//! - every exported symbol starts with `pccl` (SPEC section 3: "exported
//!   symbols only for the pccl* functions");
//! - every function declared `PCCL_EXPORT` in `include/pccl.h` is exported.
//!
//! Needs `nm` and `readelf` (binutils); skipped with a message without them.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

fn tool_output(tool: &str, args: &[&str], file: &PathBuf) -> Option<String> {
    let out = Command::new(tool).args(args).arg(file).output().ok()?;
    assert!(
        out.status.success(),
        "{tool} {} {} failed:\n{}",
        args.join(" "),
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `target/<profile>/deps/libpccl.so`, next to this test's executable.
fn shared_library() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("test binary has a parent directory");
    let candidates = [
        deps.join("libpccl.so"),
        deps.parent()
            .map(|p| p.join("libpccl.so"))
            .unwrap_or_default(),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| panic!("libpccl.so not found; looked at {candidates:?}"))
}

/// Names of the functions `include/pccl.h` declares with `PCCL_EXPORT`.
fn declared_functions() -> BTreeSet<String> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("include/pccl.h");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut names = BTreeSet::new();
    for decl in text.split("\nPCCL_EXPORT ").skip(1) {
        let head = decl.split('(').next().unwrap_or("");
        let name = head
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .rfind(|t| !t.is_empty())
            .unwrap_or("");
        names.insert(name.to_string());
    }
    assert!(
        names.contains("pcclInit"),
        "parsed no declarations from pccl.h"
    );
    names
}

#[test]
#[cfg_attr(
    not(target_os = "linux"),
    ignore = "ELF symbol checks run on Linux only"
)]
fn shared_library_exports_exactly_the_c_api() {
    let so = shared_library();

    let Some(dynamic) = tool_output("readelf", &["-d"], &so) else {
        println!("SKIPPED: readelf not found (install binutils)");
        return;
    };
    assert!(
        dynamic.contains("Library soname: [libpccl.so]"),
        "libpccl.so lacks soname libpccl.so:\n{dynamic}"
    );

    let Some(symbols) = tool_output("nm", &["-D", "--defined-only"], &so) else {
        println!("SKIPPED: nm not found (install binutils)");
        return;
    };
    let exported: BTreeSet<String> = symbols
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .map(|s| s.split('@').next().unwrap_or(s).to_string())
        .collect();

    let foreign: Vec<&String> = exported.iter().filter(|s| !s.starts_with("pccl")).collect();
    assert!(
        foreign.is_empty(),
        "libpccl.so exports symbols outside the pccl* namespace: {foreign:?}"
    );

    let missing: Vec<String> = declared_functions()
        .into_iter()
        .filter(|f| !exported.contains(f))
        .collect();
    assert!(
        missing.is_empty(),
        "functions declared in pccl.h but not exported by libpccl.so: {missing:?}"
    );
}
