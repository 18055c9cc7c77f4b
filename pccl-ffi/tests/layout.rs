//! Layout agreement between the C headers (`include/*.h`) and their Rust
//! mirrors (`src/types.rs`).
//!
//! 1. `tests/c/layout.c` is compiled with the system C compiler against the
//!    headers and run; it prints one fact per line: `size T n`, `align T n`,
//!    `offset T.member n`, `fieldsize T.member n`, `value NAME n`.
//! 2. The same facts are computed here from `pccl::types` with `size_of`,
//!    `align_of`, `offset_of!` and the enumerator constants.
//! 3. The two sets must be identical: any differing value, or a fact present
//!    on one side only, fails the test with a list of every disagreement.
//! 4. The headers themselves are parsed (comments stripped; `typedef struct`
//!    / `typedef enum` bodies and numeric `#define`s), and every struct
//!    member, enumerator and numeric macro found there must appear among the
//!    C facts, so neither layout.c nor this file can silently skip a new
//!    declaration.
//!
//! The test is skipped, with a message, when no C compiler is installed
//! (`$CC`, else `cc`, else `gcc`).

use std::collections::{BTreeMap, BTreeSet};
use std::mem::{align_of, offset_of, size_of};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use pccl::types::*;

type Facts = BTreeMap<String, i128>;

fn field_size<T, F>(_: fn(&T) -> &F) -> usize {
    size_of::<F>()
}

macro_rules! ty {
    ($facts:ident, $($t:ident),+ $(,)?) => {$(
        $facts.insert(format!("size {}", stringify!($t)), size_of::<$t>() as i128);
        $facts.insert(format!("align {}", stringify!($t)), align_of::<$t>() as i128);
    )+};
}

macro_rules! fields {
    ($facts:ident, $t:ident: $($f:ident),+ $(,)?) => {$(
        $facts.insert(
            format!("offset {}.{}", stringify!($t), stringify!($f)),
            offset_of!($t, $f) as i128,
        );
        $facts.insert(
            format!("fieldsize {}.{}", stringify!($t), stringify!($f)),
            field_size(|s: &$t| &s.$f) as i128,
        );
    )+};
}

macro_rules! values {
    ($facts:ident, $($v:ident),+ $(,)?) => {$(
        $facts.insert(format!("value {}", stringify!($v)), $v as i128);
    )+};
}

/// The facts as `src/types.rs` sees them.
fn rust_facts() -> Facts {
    let mut f = Facts::new();

    // ccoip.h
    values!(
        f,
        CCOIP_PROTOCOL_PORT_MASTER,
        CCOIP_PROTOCOL_PORT_SHARED_STATE,
        CCOIP_PROTOCOL_PORT_P2P,
        CCOIP_PROTOCOL_PORT_BANDWIDTH_BENCHMARK,
    );

    // ccoip_inet.h
    ty!(f, ccoip_inet_protocol_t);
    values!(f, inetIPv4, inetIPv6);
    ty!(
        f,
        ccoip_ipv4_address_t,
        ccoip_ipv6_address_t,
        ccoip_inet_address_t,
        ccoip_socket_address_t,
    );
    fields!(f, ccoip_ipv4_address_t: data);
    fields!(f, ccoip_ipv6_address_t: data);
    fields!(f, ccoip_inet_address_t: protocol, ipv4, ipv6);
    fields!(f, ccoip_socket_address_t: inet, port);

    // pccl.h: enumerations
    ty!(
        f,
        pcclResult_t,
        pcclDataType_t,
        pcclDeviceType_t,
        pcclRedOp_t,
        pcclAttribute_t,
        pcclSharedStateSyncStrategy_t,
        pcclDistributionHint_t,
        pcclQuantizationAlgorithm_t,
        pcclLogLevel_t,
        pcclAlgorithm_t,
    );
    values!(
        f,
        pcclSuccess,
        pcclNotInitialized,
        pcclInternalError,
        pcclInvalidArgument,
        pcclInvalidUsage,
        pcclTooFewPeers,
        pcclMasterConnectionFailed,
        pcclRankConnectionFailed,
        pcclRankConnectionLost,
        pcclNoSharedStateAvailable,
        pcclPendingAsyncOps,
        pcclUpdateTopologyFailed,
        pcclTopologyOptimizationFailed,
    );
    values!(
        f,
        pcclUint8,
        pcclInt8,
        pcclInt16,
        pcclUint16,
        pcclUint32,
        pcclInt32,
        pcclUint64,
        pcclInt64,
        pcclFloat16,
        pcclBFloat16,
        pcclFloat,
        pcclDouble,
    );
    values!(f, pcclDeviceCpu, pcclDeviceCuda);
    values!(f, pcclSum, pcclAvg, pcclProd, pcclMax, pcclMin);
    values!(
        f,
        PCCL_ATTRIBUTE_GLOBAL_WORLD_SIZE,
        PCCL_ATTRIBUTE_PEER_GROUP_WORLD_SIZE,
        PCCL_ATTRIBUTE_NUM_DISTINCT_PEER_GROUPS,
        PCCL_ATTRIBUTE_LARGEST_PEER_GROUP_WORLD_SIZE,
    );
    values!(
        f,
        PCCL_SHARED_STATE_SYNC_STRATEGY_ENFORCE_POPULAR,
        PCCL_SHARED_STATE_SYNC_STRATEGY_RECEIVE_ONLY,
        PCCL_SHARED_STATE_SYNC_STRATEGY_SEND_ONLY,
    );
    values!(
        f,
        pcclDistributionNone,
        pcclDistributionNormal,
        pcclDistributionUniform,
    );
    values!(f, pcclQuantNone, pcclQuantMinMax, pcclQuantZeroPointScale);
    values!(
        f,
        pcclLogOff,
        pcclLogError,
        pcclLogWarn,
        pcclLogInfo,
        pcclLogDebug,
        pcclLogTrace,
    );
    values!(
        f,
        pcclAlgorithmAuto,
        pcclAlgorithmRing,
        pcclAlgorithmDirect,
        pcclAlgorithmRelay
    );

    // pccl.h: structures
    ty!(
        f,
        pcclCommCreateParams_t,
        pcclReduceInfo_t,
        pcclReduceOperandDescriptor_t,
        pcclQuantizationOptions_t,
        pcclReduceDescriptor_t,
        pcclReduceOpDescriptor_t,
        pcclAsyncReduceOp_t,
        pcclCollectiveInfo_t,
        pcclRankUuid_t,
        pcclTensorInfo_t,
        pcclSharedState_t,
        pcclSharedStateSyncInfo_t,
        pcclBuildInfo_t,
    );
    f.insert(
        "size pcclReduceSingleDescriptor_t".into(),
        size_of::<pcclReduceSingleDescriptor_t>() as i128,
    );
    fields!(f, pcclCommCreateParams_t: master_address, peer_group, p2p_connection_pool_size);
    fields!(f, pcclReduceInfo_t: local_world_size, tx_bytes, rx_bytes);
    fields!(f, pcclReduceOperandDescriptor_t: datatype, distribution_hint);
    fields!(f, pcclQuantizationOptions_t: quantized_datatype, algorithm);
    fields!(
        f,
        pcclReduceDescriptor_t: count,
        op,
        tag,
        src_descriptor,
        quantization_options,
    );
    fields!(f, pcclReduceOpDescriptor_t: sendbuf, recvbuf, descriptor);
    fields!(f, pcclAsyncReduceOp_t: comm, tag);
    fields!(
        f,
        pcclCollectiveInfo_t: world_size,
        rank,
        tx_bytes,
        rx_bytes,
        algorithm,
    );
    fields!(f, pcclRankUuid_t: data);
    fields!(
        f,
        pcclTensorInfo_t: name,
        data,
        count,
        datatype,
        device_type,
        allow_content_inequality,
    );
    fields!(f, pcclSharedState_t: revision, count, infos);
    fields!(f, pcclSharedStateSyncInfo_t: tx_bytes, rx_bytes);
    fields!(f, pcclBuildInfo_t: has_cuda_support);

    f
}

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn find_c_compiler() -> Option<String> {
    let candidates = std::env::var("CC")
        .ok()
        .into_iter()
        .chain(["cc".to_string(), "gcc".to_string()]);
    for cc in candidates {
        let ok = Command::new(&cc)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            return Some(cc);
        }
    }
    None
}

/// The facts printed by tests/c/layout.c, compiled and run once per test
/// binary; `None` when no C compiler is installed.
fn c_facts() -> Option<&'static Facts> {
    static FACTS: OnceLock<Option<Facts>> = OnceLock::new();
    FACTS
        .get_or_init(|| find_c_compiler().map(|cc| compile_and_run_probe(&cc)))
        .as_ref()
}

fn compile_and_run_probe(cc: &str) -> Facts {
    let dir = crate_dir();
    let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join("pccl_layout_probe");
    let out = Command::new(cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic", "-I"])
        .arg(dir.join("include"))
        .arg(dir.join("tests/c/layout.c"))
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("failed to spawn the C compiler");
    assert!(
        out.status.success(),
        "compiling tests/c/layout.c failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&exe)
        .output()
        .expect("failed to run layout probe");
    assert!(
        run.status.success(),
        "layout probe exited with {}",
        run.status
    );
    let text = String::from_utf8(run.stdout).expect("layout probe printed non-UTF-8");

    let mut facts = Facts::new();
    for line in text.lines() {
        let (key, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("malformed probe line {line:?}"));
        let value: i128 = value
            .parse()
            .unwrap_or_else(|_| panic!("malformed number in probe line {line:?}"));
        assert!(
            facts.insert(key.to_string(), value).is_none(),
            "duplicate probe fact {key:?}"
        );
    }
    facts
}

/// Removes `/* ... */` and `// ...` comments.
fn strip_comments(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    loop {
        let block = rest.find("/*");
        let line = rest.find("//");
        let block_first = match (block, line) {
            (Some(b), Some(l)) => b < l,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if let (true, Some(b)) = (block_first, block) {
            out.push_str(&rest[..b]);
            let end = rest[b + 2..]
                .find("*/")
                .expect("unterminated block comment in header");
            out.push(' ');
            rest = &rest[b + 2 + end + 2..];
        } else if let Some(l) = line {
            out.push_str(&rest[..l]);
            rest = rest[l..].find('\n').map_or("", |nl| &rest[l + nl..]);
        } else {
            out.push_str(rest);
            return out;
        }
    }
}

fn last_identifier(decl: &str) -> Option<&str> {
    let decl = decl.split('[').next().unwrap_or(decl);
    decl.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .rfind(|t| !t.is_empty())
}

/// Facts a header declares and layout.c must therefore print.
fn declared_facts(header: &str) -> BTreeSet<String> {
    let src = strip_comments(header);
    let mut want = BTreeSet::new();

    for line in src.lines() {
        let mut toks = line.split_whitespace();
        if toks.next() == Some("#define") {
            if let (Some(name), Some(value)) = (toks.next(), toks.next()) {
                if value.parse::<i64>().is_ok() {
                    want.insert(format!("value {name}"));
                }
            }
        }
    }

    let mut rest = src.as_str();
    while let Some(pos) = rest.find("typedef") {
        rest = &rest[pos + "typedef".len()..];
        let kind = rest.split_whitespace().next().unwrap_or("");
        if kind != "struct" && kind != "enum" {
            continue;
        }
        let (Some(open), Some(semi)) = (rest.find('{'), rest.find(';')) else {
            continue;
        };
        if semi < open {
            continue; // opaque: typedef struct X Y;
        }
        let close = open + rest[open..].find('}').expect("unbalanced braces in header");
        let body = &rest[open + 1..close];
        let after = &rest[close + 1..];
        let name_end = after.find(';').expect("typedef without ';'");
        let name = after[..name_end].trim().to_string();
        want.insert(format!("size {name}"));
        if kind == "enum" {
            for item in body.split(',') {
                let ident = item.split('=').next().unwrap_or("").trim();
                if !ident.is_empty() {
                    want.insert(format!("value {ident}"));
                }
            }
        } else {
            for member in body.split(';') {
                if let Some(ident) = last_identifier(member) {
                    want.insert(format!("offset {name}.{ident}"));
                }
            }
        }
        rest = &after[name_end..];
    }
    want
}

fn describe_differences(c: &Facts, rust: &Facts) -> Vec<String> {
    let mut problems = Vec::new();
    for (k, cv) in c {
        match rust.get(k) {
            None => problems.push(format!("{k}: C says {cv}, missing from types.rs facts")),
            Some(rv) if rv != cv => problems.push(format!("{k}: C says {cv}, Rust says {rv}")),
            Some(_) => {}
        }
    }
    for (k, rv) in rust {
        if !c.contains_key(k) {
            problems.push(format!(
                "{k}: Rust says {rv}, not printed by tests/c/layout.c"
            ));
        }
    }
    problems
}

#[test]
fn header_and_rust_layouts_agree() {
    let Some(c) = c_facts() else {
        println!("SKIPPED header_and_rust_layouts_agree: no C compiler (set CC or install gcc)");
        return;
    };
    let rust = rust_facts();
    let problems = describe_differences(c, &rust);
    assert!(
        problems.is_empty(),
        "C headers and src/types.rs disagree ({} problems):\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
    // Sanity: the probe really printed something of every kind.
    for kind in ["size ", "align ", "offset ", "fieldsize ", "value "] {
        assert!(c.keys().any(|k| k.starts_with(kind)), "no {kind}facts");
    }
}

#[test]
fn layout_probe_covers_every_header_declaration() {
    let Some(c) = c_facts() else {
        println!("SKIPPED layout_probe_covers_every_header_declaration: no C compiler");
        return;
    };
    let mut missing = Vec::new();
    for header in ["ccoip.h", "ccoip_inet.h", "pccl.h"] {
        let path = crate_dir().join("include").join(header);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let declared = declared_facts(&text);
        assert!(!declared.is_empty(), "parsed nothing from {header}");
        for fact in declared {
            if !c.contains_key(&fact) {
                missing.push(format!("{header}: {fact}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "declared in the headers but not checked by tests/c/layout.c:\n  {}",
        missing.join("\n  ")
    );
}

#[test]
fn header_parser_sees_what_it_should() {
    let src = "/* c */ #define X 5\n#define G\ntypedef enum e_t { a = 0, b = 1 } e_t;\n\
               typedef struct o_t o_t;\n\
               typedef struct s_t { int x; // y;\n uint8_t data[4]; } s_t;";
    let got = declared_facts(src);
    let want: BTreeSet<String> = [
        "value X",
        "size e_t",
        "value a",
        "value b",
        "size s_t",
        "offset s_t.x",
        "offset s_t.data",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(got, want);
}

#[test]
fn differences_are_reported() {
    let c: Facts = [("size a".to_string(), 4), ("size b".to_string(), 8)].into();
    let r: Facts = [("size a".to_string(), 4), ("size b".to_string(), 4)].into();
    assert_eq!(describe_differences(&c, &r).len(), 1);
    let r2: Facts = [("size a".to_string(), 4), ("size c".to_string(), 8)].into();
    assert_eq!(describe_differences(&c, &r2).len(), 2);
}
