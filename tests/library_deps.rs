//! The library as a dependency: with `default-features = false` it must pull in none
//! of the command line's crates (argument parsing, terminal progress, signal handling,
//! the HTTP stack), so programs that embed the runtime compile only what they use.
//! `.ci/run` also builds and lints the library that way; this test checks the
//! dependency graph cargo resolves for it.

use std::collections::BTreeSet;
use std::process::Command;

/// The crates only the `cli` and `server` features may bring.
const COMMAND_LINE_CRATES: &[&str] = &["clap", "indicatif", "ctrlc", "axum", "tokio", "hyper"];

/// Names of the packages in flashpack's normal (non-dev, non-build) dependency graph.
fn normal_dependencies(default_features: bool) -> BTreeSet<String> {
    dependencies_of(None, default_features)
}

/// [`normal_dependencies`] of `package` of the workspace (the root one for `None`).
fn dependencies_of(package: Option<&str>, default_features: bool) -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(env!("CARGO_MANIFEST_DIR")).args([
        "tree",
        "--locked",
        "--offline",
        "--edges",
        "normal",
        "--prefix",
        "none",
        "--format",
        "{p}",
    ]);
    if !default_features {
        cmd.arg("--no-default-features");
    }
    if let Some(p) = package {
        cmd.args(["--package", p]);
    }
    let out = cmd.output().expect("run cargo tree");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_library_alone_pulls_in_no_command_line_crates() {
    let lib = normal_dependencies(false);
    assert!(
        lib.contains("flashpack") && lib.contains("safetensors"),
        "{lib:?}"
    );
    let found: Vec<_> = COMMAND_LINE_CRATES
        .iter()
        .filter(|c| lib.contains(**c))
        .collect();
    assert!(
        found.is_empty(),
        "the library without features depends on {found:?}"
    );
}

#[test]
fn the_default_build_has_the_command_line() {
    let all = normal_dependencies(true);
    for c in ["clap", "indicatif", "ctrlc", "axum", "tokio"] {
        assert!(all.contains(c), "default features lack {c}");
    }
}

/// The Python package (python/, a workspace member) uses the library alone:
/// its extension module carries no command-line crates either. `cargo tree`
/// reads the lock file only; nothing is built and no Python is needed.
#[test]
fn the_python_package_pulls_in_no_command_line_crates() {
    let deps = dependencies_of(Some("flashpack-python"), true);
    assert!(
        deps.contains("flashpack") && deps.contains("pyo3"),
        "{deps:?}"
    );
    let found: Vec<_> = COMMAND_LINE_CRATES
        .iter()
        .filter(|c| deps.contains(**c))
        .collect();
    assert!(found.is_empty(), "the Python package depends on {found:?}");
}
