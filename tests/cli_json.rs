//! `--json` is a contract with pipelines: every command, on success and on
//! every kind of failure (usage errors from the argument parser included),
//! prints exactly one JSON object on stdout, and every key follows README.md's
//! naming convention (times `_ms`, sizes `_bytes`, counts as integers, one key
//! per concept). Also: a closed stdout ends a command quietly, never a panic.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use serde_json::Value;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_flashpack")
}

fn fixture(rel: &str) -> String {
    common::fixtures().join(rel).display().to_string()
}

/// A calibrated packed opt-relu, made once for the whole test binary.
fn calibrated() -> &'static Path {
    static FILE: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, path) = FILE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("opt-relu.flashpack");
        let (code, _, stderr) = flashpack(&[
            "convert",
            &fixture("models/opt-relu"),
            "-o",
            path.to_str().unwrap(),
            "--calib",
            &fixture("text/train.txt"),
            "--calib-tokens",
            "1024",
        ]);
        assert_eq!(code, 0, "convert failed: {stderr}");
        (dir, path)
    });
    path
}

/// The first lines of the held-out text: enough for `eval` to score windows,
/// short enough that the disk modes finish in a moment.
fn short_text() -> &'static str {
    static FILE: OnceLock<(tempfile::TempDir, String)> = OnceLock::new();
    let (_, path) = FILE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let text = std::fs::read_to_string(common::fixtures().join("text/heldout.txt")).unwrap();
        let head: String = text.lines().take(40).collect::<Vec<_>>().join("\n");
        let path = dir.path().join("short.txt");
        std::fs::write(&path, head).unwrap();
        let path = path.display().to_string();
        (dir, path)
    });
    path
}

/// Runs the binary; returns (exit code, stdout, stderr).
fn flashpack(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run flashpack");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs with `--json` and returns (exit code, the one object on stdout). Fails
/// the test unless stdout is exactly one JSON object, and unless a failure's
/// object carries `error` and the same `exit_code` the process exited with.
fn json(args: &[&str]) -> (i32, Value) {
    let mut all = args.to_vec();
    all.push("--json");
    let (code, stdout, stderr) = flashpack(&all);
    let mut values = serde_json::Deserializer::from_str(&stdout).into_iter::<Value>();
    let first = values
        .next()
        .unwrap_or_else(|| panic!("{args:?}: nothing on stdout (exit {code}); stderr: {stderr}"))
        .unwrap_or_else(|e| panic!("{args:?}: stdout is not JSON ({e}): {stdout:?}"));
    assert!(
        values.next().is_none(),
        "{args:?}: more than one JSON value on stdout: {stdout:?}"
    );
    assert!(first.is_object(), "{args:?}: not an object: {first}");
    if code != 0 {
        assert!(
            first["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{args:?}: exit {code} without an error message: {first}"
        );
        assert_eq!(
            first["exit_code"].as_i64(),
            Some(code as i64),
            "{args:?}: exit_code disagrees with the exit status: {first}"
        );
    }
    check_keys(&first, "");
    (code, first)
}

/// Words that make a key a time; such a key must carry its unit.
const TIME_WORDS: [&str; 6] = ["seconds", "secs", "time", "duration", "elapsed", "latency"];

/// Keys that name one concept under another key elsewhere (README.md's table).
const SYNONYMS: [(&str, &str); 5] = [
    ("bytes_on_disk", "file_bytes"),
    ("seconds", "elapsed_ms"),
    ("dram_plan_bytes", "dram_plan.total_bytes"),
    ("bytes_read", "read_bytes"),
    ("bytes_hashed", "hashed_bytes"),
];

/// Checks every key of `value` (recursively) against the convention, collecting
/// the path for the message.
fn check_keys(value: &Value, path: &str) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                let at = format!("{path}.{key}");
                // A map keyed by data (params_by_dtype: dtype -> count) is not a key.
                if !path.ends_with("params_by_dtype") {
                    check_key(key, v, &at, path);
                }
                check_keys(v, &at);
            }
        }
        Value::Array(items) => items.iter().for_each(|v| check_keys(v, path)),
        Value::Number(n) => {
            if let Some(i) = n.as_u64() {
                assert!(
                    i <= (1 << 53),
                    "{path}: integer {i} beyond 2^53 loses precision in JSON readers"
                );
            }
        }
        _ => {}
    }
}

fn check_key(key: &str, v: &Value, at: &str, parent: &str) {
    assert!(
        !key.is_empty()
            && key
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
        "{at}: keys are lower snake_case"
    );
    for (bad, good) in SYNONYMS {
        assert_ne!(key, bad, "{at}: this concept's key is `{good}`");
    }
    let words: Vec<&str> = key.split('_').collect();
    let is_rate = key.ends_with("_per_s") || key.contains("_per_token") || key.contains("_per_s_");
    if TIME_WORDS.iter().any(|w| words.contains(w)) || words.first() == Some(&"ms") {
        assert!(
            key.ends_with("_ms") || key.ends_with("_s") || key.contains("_ms_") || is_rate,
            "{at}: a time carries its unit at the end (_ms or _s)"
        );
    }
    if words.contains(&"bytes") {
        assert!(
            key.ends_with("_bytes") || key.contains("_bytes_per_"),
            "{at}: a size ends in _bytes"
        );
        if key.ends_with("_bytes") && !key.starts_with("mean_") {
            let integers = |v: &Value| v.is_null() || v.as_u64().is_some();
            let ok = match v {
                Value::Array(items) => items.iter().all(integers),
                Value::Object(_) => false,
                other => integers(other),
            };
            assert!(
                ok,
                "{at}: a size in bytes is a non-negative integer, got {v}"
            );
        }
    }
    for unit in ["mib", "gib", "kib", "mb", "kb"] {
        assert!(
            !words.contains(&unit),
            "{at}: sizes are in bytes (_bytes), not {unit}"
        );
    }
    if parent.ends_with("dram_plan") && v.is_number() {
        assert!(
            key.ends_with("_bytes"),
            "{at}: the DRAM plan is sizes in bytes"
        );
    }
    let counts = [
        "_tokens",
        "_ops",
        "_count",
        "_checked",
        "_compared",
        "_mismatched",
    ];
    if counts.iter().any(|c| key.ends_with(c)) || key.starts_with("num_") {
        assert!(
            v.is_null() || v.as_u64().is_some(),
            "{at}: a count is a plain integer, got {v}"
        );
    }
}

#[test]
fn every_command_prints_one_json_object_whose_keys_follow_the_convention() {
    let file = calibrated().to_str().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = |name: &str| dir.path().join(name).display().to_string();
    let model = fixture("models/opt-relu");
    let train = fixture("text/train.txt");
    let heldout = short_text().to_string();
    let moe = out("moe.flashpack");
    let (code, _, stderr) =
        flashpack(&["convert", &fixture("models/qwen3moe-trained"), "-o", &moe]);
    assert_eq!(code, 0, "convert failed: {stderr}");
    let successes: Vec<Vec<String>> = vec![
        vec!["inspect".into(), model.clone()],
        vec!["inspect".into(), file.clone()],
        vec![
            "convert".into(),
            model.clone(),
            "-o".into(),
            out("a.flashpack"),
            "--verify".into(),
        ],
        vec![
            "verify".into(),
            file.clone(),
            "--against".into(),
            model.clone(),
            "--calib".into(),
            heldout.clone(),
        ],
        vec![
            "run".into(),
            file.clone(),
            "--prompt".into(),
            "KING".into(),
            "--max-new-tokens".into(),
            "4".into(),
        ],
        vec![
            "run".into(),
            model.clone(),
            "--prompt".into(),
            "KING".into(),
            "--max-new-tokens".into(),
            "4".into(),
        ],
        vec![
            "eval".into(),
            file.clone(),
            "--text".into(),
            heldout.clone(),
        ],
        vec![
            "eval".into(),
            file.clone(),
            "--text".into(),
            heldout.clone(),
            "--ffn".into(),
            "naive".into(),
        ],
        vec![
            "calibrate".into(),
            model.clone(),
            "--calib".into(),
            train.clone(),
            "--calib-tokens".into(),
            "256".into(),
        ],
        vec![
            "predictors".into(),
            "train".into(),
            file.clone(),
            "--calib".into(),
            train.clone(),
            "--calib-tokens".into(),
            "512".into(),
            "-o".into(),
            out("b.flashpack"),
        ],
        vec!["bench".into(), file.clone()],
        // A mixture of experts read from flash: the `experts` objects.
        vec![
            "run".into(),
            moe.clone(),
            "--prompt".into(),
            "KING".into(),
            "--max-new-tokens".into(),
            "4".into(),
            "--ffn".into(),
            "flash".into(),
        ],
        vec![
            "bench".into(),
            moe.clone(),
            "--decode-tokens".into(),
            "4".into(),
        ],
        vec![
            "bench".into(),
            "--no-synthetic".into(),
            "--model".into(),
            fixture("models/micro-llama"),
            "--thread-counts".into(),
            "1".into(),
            "--decode-tokens".into(),
            "2".into(),
            "--prefill-tokens".into(),
            "4".into(),
            "--bandwidth-mib".into(),
            "8".into(),
        ],
    ];
    for args in &successes {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, value) = json(&args);
        assert_eq!(code, 0, "{args:?}: {value}");
        assert!(
            value.get("error").is_none(),
            "{args:?}: success with an error key"
        );
    }
}

#[test]
fn every_kind_of_failure_is_one_json_error_object() {
    let file = calibrated().to_str().unwrap().to_string();
    let model = fixture("models/opt-relu");
    let damaged = fixture("broken/r12-section-hash.flashpack");
    let unparsable = fixture("broken/r01-bad-magic.flashpack");
    // (arguments, expected exit code)
    let failures: Vec<(Vec<&str>, i32)> = vec![
        (vec!["run", &model], 2), // missing --prompt
        (vec!["run", &model, "--prompt", "x", "--no-such-flag"], 2), // unknown flag
        (vec!["run", &model, "--prompt", "x", "--ffn", "sparse"], 2), // bad value
        (vec!["frobnicate"], 2),  // unknown command
        (vec![], 2),              // no command
        (vec!["inspect", "/nonexistent/model"], 2), // missing input
        (
            vec!["run", &model, "--prompt", "x", "--dram-budget", "1KB"],
            2,
        ), // option the mode ignores
        (
            vec!["run", &file, "--prompt", "x", "--dram-budget", "1KB"],
            2,
        ), // below the minimum
        (vec!["verify", &damaged], 1),
        (vec!["verify", &unparsable], 2),
    ];
    for (args, expected) in failures {
        let (code, value) = json(&args);
        assert_eq!(code, expected, "{args:?}: {value}");
    }
}

#[test]
fn a_failed_verify_is_the_error_object_with_the_failure_list() {
    let (code, value) = json(&[
        "verify",
        &fixture("broken/r14-ffn-chunk-byte-flipped.flashpack"),
    ]);
    assert_eq!(code, 1);
    let failures = value["failures"]
        .as_array()
        .expect("failures listed beside the error");
    assert!(!failures.is_empty());
    assert_eq!(value["ok"], Value::Bool(false));
}

#[test]
fn help_and_version_under_json_are_objects_too() {
    let (code, value) = json(&["--version"]);
    assert_eq!(code, 0);
    assert!(value["version"]
        .as_str()
        .unwrap()
        .contains(env!("CARGO_PKG_VERSION")));
    let (code, value) = json(&["run", "--help"]);
    assert_eq!(code, 0);
    assert!(value["help"].as_str().unwrap().contains("--prompt"));
}

#[test]
fn the_clock_seed_is_exact_in_json() {
    let (code, value) = json(&[
        "run",
        &fixture("models/micro-llama"),
        "--prompt",
        "a",
        "--max-new-tokens",
        "1",
        "--temperature",
        "0.5",
    ]);
    assert_eq!(code, 0, "{value}");
    let seed = value["seed"].as_u64().expect("an integer seed");
    assert!(seed < (1 << 53), "seed {seed} does not survive a double");
    // A seed a JSON reader would round is refused up front.
    let (code, _) = json(&[
        "run",
        &fixture("models/micro-llama"),
        "--prompt",
        "a",
        "--seed",
        "18446744073709551615",
    ]);
    assert_eq!(code, 2);
}

/// Spawns the command with its stdout a pipe whose reader is closed after
/// reading `keep` bytes, and returns (exit code, stderr).
fn with_closed_stdout(args: &[&str], keep: usize) -> (i32, String) {
    let mut child = Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    if keep > 0 {
        let mut buf = vec![0u8; keep];
        let _ = stdout.read(&mut buf);
    }
    drop(stdout);
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = child.wait().unwrap();
    (status.code().unwrap_or(-1), stderr)
}

#[test]
fn a_closed_stdout_ends_every_command_quietly() {
    let file = calibrated().to_str().unwrap().to_string();
    let heldout = short_text();
    let cases: Vec<Vec<&str>> = vec![
        vec!["inspect", &file],
        vec!["inspect", &file, "--json"],
        vec!["bench", &file],
        vec!["eval", &file, "--text", heldout],
        vec!["run", &file, "--prompt", "KING", "--max-new-tokens", "200"],
        vec!["verify", &file],
        vec!["--help"],
    ];
    for args in cases {
        for keep in [0, 1] {
            let (code, stderr) = with_closed_stdout(&args, keep);
            assert!(!stderr.contains("panicked"), "{args:?}: panicked: {stderr}");
            assert_eq!(
                code, 0,
                "{args:?} (read {keep} bytes): exit {code}: {stderr}"
            );
        }
    }
}

#[test]
fn an_interrupt_under_json_is_the_error_object_with_exit_130() {
    // The synthetic speed benchmark runs for many seconds: interrupt it.
    let child = Command::new(bin())
        .args(["bench", "--json", "--thread-counts", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130));
    let value: Value = serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    assert_eq!(value["exit_code"], 130);
    assert_eq!(value["error"], "interrupted");
}

#[test]
fn ffn_active_fraction_is_the_computed_fraction_in_every_mode() {
    let file = calibrated().to_str().unwrap().to_string();
    let text = short_text();
    let fraction = |mode: &str| {
        let (code, v) = json(&["eval", &file, "--text", text, "--ffn", mode]);
        assert_eq!(code, 0, "{v}");
        v["ffn_active_fraction"].as_f64().unwrap()
    };
    let (dense, naive) = (fraction("dense"), fraction("naive"));
    let (predicted, flash) = (fraction("predicted"), fraction("flash"));
    let (oracle, oracle_flash) = (fraction("oracle"), fraction("oracle-flash"));
    assert_eq!(dense, 1.0);
    assert_eq!(naive, 1.0);
    // flash computes exactly predicted's neurons (bit-identical runs).
    assert_eq!(flash, predicted);
    assert!(
        flash < 0.5,
        "flash on a ReLU model computes a minority: {flash}"
    );
    assert_eq!(oracle_flash, oracle);
    assert!(
        oracle < flash,
        "the oracle computes fewer than the predictor: {oracle} vs {flash}"
    );
}
