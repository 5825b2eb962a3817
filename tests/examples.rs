//! The programs of `examples/`, run as a user runs them (on the fixtures,
//! with their defaults where that is what their header promises), their
//! output checked against the command line doing the same thing: the curated
//! API the examples use must give what `flashpack run`, `eval`, `verify` and
//! `inspect` give.
//!
//! `cargo test` builds the examples beside the tests, but `cargo test --test
//! examples` does not, so the test builds them first with the cargo that runs
//! it (into the same target directory and profile: nothing to do after a
//! full `cargo test`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::{fixtures, flashpack_json};
use serde_json::Value;

/// The directory holding the example binaries, built once per test run.
fn examples_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // This test is target/<profile>/deps/examples-<hash>; the examples go
        // to target/<profile>/examples/.
        let exe = std::env::current_exe().expect("the test's path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>/deps");
        let target_dir = profile_dir.parent().expect("target/");
        let mut cargo = Command::new(env!("CARGO"));
        cargo
            .args([
                "build",
                "--locked",
                "--offline",
                "--examples",
                "--manifest-path",
            ])
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
            .arg("--target-dir")
            .arg(target_dir);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cargo.arg("--release");
        }
        let out = cargo.output().expect("run cargo");
        assert!(
            out.status.success(),
            "cargo build --examples failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        profile_dir.join("examples")
    })
}

/// Runs example `name` with `args`: exit code, stdout, stderr (a panic fails).
fn example(name: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(examples_dir().join(name))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run example {name}: {e}"));
    let stdout = String::from_utf8(out.stdout).expect("UTF-8 stdout");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{name}: {stderr}");
    (out.status.code().expect("exit code"), stdout, stderr)
}

fn json(name: &str, stdout: &str) -> Value {
    serde_json::from_str(stdout)
        .unwrap_or_else(|e| panic!("{name}: stdout is not JSON ({e}): {stdout}"))
}

fn fixture(path: &str) -> String {
    fixtures().join(path).to_str().unwrap().to_string()
}

/// `num_hidden_layers` and `vocab_size` of a fixture's config.json.
fn config(model: &str) -> (u64, u64) {
    let c: Value =
        serde_json::from_slice(&std::fs::read(fixtures().join(model).join("config.json")).unwrap())
            .unwrap();
    (
        c["num_hidden_layers"].as_u64().unwrap(),
        c["vocab_size"].as_u64().unwrap(),
    )
}

#[test]
fn generate_and_logits_agree_with_run() {
    let model = fixture("models/llama-silu");
    // The examples' defaults: this model, this prompt, 32 tokens, greedy.
    let (code, run) = flashpack_json(&[
        "run",
        &model,
        "-p",
        "KING HENRY.",
        "-n",
        "32",
        "--temperature",
        "0",
    ]);
    assert_eq!(code, 0, "{run}");
    let text = run["text"].as_str().unwrap();
    assert!(!text.trim().is_empty(), "the fixture generates text: {run}");

    let (code, stdout, stderr) = example("generate", &[]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout, format!("{text}\n"), "generate prints run's text");
    assert!(stderr.contains("mode dense: 0 bytes read"), "{stderr}");

    let (code, stdout, stderr) = example("logits", &[]);
    assert_eq!(code, 0, "{stderr}");
    let (_, vocab) = config("models/llama-silu");
    let positions = run["prompt_tokens"].as_u64().unwrap();
    assert!(
        stdout.contains(&format!(
            "logits: {positions} positions x {vocab} vocabulary"
        )),
        "{stdout}"
    );
    // The last row's first maximum is greedy's first token.
    let first = run["generated_ids"][0].as_u64().unwrap();
    assert!(
        stdout.contains(&format!("next token id: {first}\n")),
        "{stdout}"
    );
}

#[test]
fn evaluate_agrees_with_eval() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("text.txt");
    let heldout = std::fs::read_to_string(fixtures().join("text/heldout.txt")).unwrap();
    std::fs::write(
        &text,
        heldout.lines().take(80).collect::<Vec<_>>().join("\n"),
    )
    .unwrap();
    let model = fixture("models/llama-silu");
    let text = text.to_str().unwrap();
    let (code, stdout, stderr) = example("evaluate", &[&model, text, "64"]);
    assert_eq!(code, 0, "{stderr}");
    let ours = json("evaluate", &stdout);
    let (code, eval) = flashpack_json(&["eval", &model, "--text", text, "--ctx", "64"]);
    assert_eq!(code, 0, "{eval}");
    for key in ["tokens_scored", "windows", "ctx"] {
        assert_eq!(ours[key], eval[key], "{key}");
    }
    assert!(ours["tokens_scored"].as_u64().unwrap() > 64, "{ours}");
    let (a, b) = (
        ours["perplexity"].as_f64().unwrap(),
        eval["perplexity"].as_f64().unwrap(),
    );
    assert!(a.is_finite() && a > 1.0, "{ours}");
    assert!((a - b).abs() <= 1e-9 * b, "evaluate {a} vs eval {b}");
}

#[test]
fn convert_writes_a_file_that_verifies_inspects_and_runs_flash() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("silu.flashpack");
    let out_s = out.to_str().unwrap();
    let checkpoint = fixture("models/llama-silu");
    let (code, stdout, stderr) =
        example("convert", &[&checkpoint, out_s, &fixture("text/train.txt")]);
    assert_eq!(code, 0, "{stderr}");
    let summary = json("convert", &stdout);
    let (layers, _) = config("models/llama-silu");
    assert_eq!(summary["output"], out_s);
    assert_eq!(summary["calibration_tokens"], 2048, "{summary}");
    assert_eq!(
        summary["predictors"].as_array().unwrap().len() as u64,
        layers,
        "a predictor per layer"
    );
    assert_eq!(
        std::fs::metadata(&out).unwrap().len(),
        summary["file_bytes"].as_u64().unwrap()
    );

    let (code, stdout, stderr) = example("verify", &[out_s, &checkpoint]);
    assert_eq!(code, 0, "{stderr}");
    let report = json("verify", &stdout);
    assert_eq!(report["ok"], true, "{report}");
    assert!(report["weights_compared"].as_u64().unwrap() > 0, "{report}");

    let (code, stdout, stderr) = example("inspect", &[out_s]);
    assert_eq!(code, 0, "{stderr}");
    let (_, cli) = flashpack_json(&["inspect", out_s]);
    assert_eq!(
        json("inspect", &stdout),
        cli,
        "inspect prints inspect --json"
    );
    assert_eq!(cli["format"], "flashpack");
    assert_eq!(cli["has_predictors"], true);

    // A calibrated file opens in the flash mode by default.
    let (code, stdout, stderr) = example("generate", &[out_s, "KING", "8"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(!stdout.trim().is_empty(), "{stderr}");
    assert!(stderr.contains("mode flash: "), "{stderr}");
}

#[test]
fn verify_passes_the_base_file_and_fails_a_damaged_one() {
    let (code, stdout, stderr) = example("verify", &[]);
    assert_eq!(code, 0, "{stderr}");
    let report = json("verify", &stdout);
    assert_eq!(report["ok"], true, "{report}");
    assert!(report["weights_compared"].as_u64().unwrap() > 0, "{report}");

    let damaged = fixture("broken/r14-dense-byte-flipped.flashpack");
    let (code, stdout, stderr) = example("verify", &[&damaged, "-"]);
    assert_eq!(code, 1, "a failed check exits 1: {stderr}");
    let report = json("verify", &stdout);
    assert_eq!(report["ok"], false, "{report}");
    assert!(stderr.contains("rule 14"), "{stderr}");

    let (code, _, stderr) = example("verify", &[&fixture("text/heldout.txt"), "-"]);
    assert_eq!(code, 2, "not a flashpack file exits 2: {stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
}

#[test]
fn inspect_shows_the_fixtures_layers() {
    let (code, stdout, stderr) = example("inspect", &[]);
    assert_eq!(code, 0, "{stderr}");
    let report = json("inspect", &stdout);
    let (layers, vocab) = config("models/llama-silu");
    assert_eq!(report["num_layers"], layers, "{report}");
    assert_eq!(report["vocab_size"], vocab, "{report}");
    assert_eq!(report["format"], "hf_checkpoint");
    assert!(stderr.contains(&format!("{layers} layers")), "{stderr}");
}

/// README.md's Rust example is examples/generate.rs, shortened: each of its
/// lines is a line of the example, in the same order, so that it compiles and
/// does what the example (tested above) does.
#[test]
fn the_readme_example_is_examples_generate() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let example = std::fs::read_to_string(root.join("examples/generate.rs")).unwrap();
    let block: Vec<&str> = readme
        .split("```rust\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("README has a rust block")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert!(block.len() >= 10, "{block:?}");
    let mut lines = example.lines();
    for line in &block {
        assert!(
            lines.any(|l| l == *line),
            "README's line {line:?} is not (in this order) in examples/generate.rs"
        );
    }
}
