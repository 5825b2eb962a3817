//! The `run`, `eval` and `bench` commands through the built binary: JSON keys,
//! exit codes for a prompt or window longer than the model's context.
//!
//! `FLASHPACK_FIXTURES` overrides the fixtures directory (default `fixtures/`).

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn fixtures() -> PathBuf {
    match std::env::var_os("FLASHPACK_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures"),
    }
}

/// The first model that has a reference file (the test models all do).
fn a_model() -> (PathBuf, usize) {
    let dir = fixtures().join("reference");
    let mut refs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    refs.sort();
    let r: Value = serde_json::from_slice(&std::fs::read(&refs[0]).expect("read")).expect("json");
    let model = fixtures().join(r["model_dir"].as_str().expect("model_dir"));
    let cfg: Value =
        serde_json::from_slice(&std::fs::read(model.join("config.json")).expect("config.json"))
            .expect("config json");
    let positions = cfg["max_position_embeddings"].as_u64().expect("positions") as usize;
    (model, positions)
}

fn flashpack(args: &[&str]) -> (i32, Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_flashpack"))
        .args(args)
        .output()
        .expect("run flashpack");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let json = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), json, stdout)
}

#[test]
fn run_json_has_the_documented_keys() {
    let (model, _) = a_model();
    let m = model.to_str().expect("utf-8 path");
    let (code, json, stdout) = flashpack(&[
        "run",
        m,
        "--prompt",
        "To be, or not",
        "--max-new-tokens",
        "6",
        "--json",
    ]);
    assert_eq!(code, 0, "{stdout}");
    for key in [
        "prompt_ids",
        "generated_ids",
        "text",
        "prefill_ms",
        "decode_tokens_per_s",
    ] {
        assert!(json.get(key).is_some(), "run --json lacks {key}: {stdout}");
    }
    let generated = json["generated_ids"].as_array().expect("array").len();
    assert!((1..=6).contains(&generated), "{stdout}");
}

#[test]
fn run_streams_text_and_a_seed_reproduces_it() {
    let (model, _) = a_model();
    let m = model.to_str().expect("utf-8 path");
    let args = [
        "run",
        m,
        "--prompt",
        "The king",
        "--max-new-tokens",
        "12",
        "--temperature",
        "0.9",
        "--top-k",
        "40",
        "--seed",
        "11",
    ];
    let (code, _, a) = flashpack(&args);
    assert_eq!(code, 0);
    let (_, _, b) = flashpack(&args);
    assert_eq!(a, b, "same seed, different streamed text");
}

#[test]
fn eval_json_has_perplexity_and_tokens_scored() {
    let (model, _) = a_model();
    let text = fixtures().join("text/heldout.txt");
    let (code, json, stdout) = flashpack(&[
        "eval",
        model.to_str().expect("utf-8"),
        "--text",
        text.to_str().expect("utf-8"),
        "--ctx",
        "64",
        "--json",
    ]);
    assert_eq!(code, 0, "{stdout}");
    assert!(
        json["perplexity"].as_f64().is_some_and(|p| p > 1.0),
        "{stdout}"
    );
    assert!(
        json["tokens_scored"].as_u64().is_some_and(|n| n > 0),
        "{stdout}"
    );
}

#[test]
fn too_long_prompt_or_window_exits_2() {
    let (model, positions) = a_model();
    let m = model.to_str().expect("utf-8");
    let long_prompt = "word ".repeat(positions * 2);
    let (code, json, stdout) = flashpack(&["run", m, "--prompt", &long_prompt, "--json"]);
    assert_eq!(code, 2, "{stdout}");
    assert!(
        json["error"]
            .as_str()
            .is_some_and(|e| e.contains("context")),
        "{stdout}"
    );

    let text = fixtures().join("text/heldout.txt");
    let ctx = (positions + 1).to_string();
    let (code, _, stdout) = flashpack(&[
        "eval",
        m,
        "--text",
        text.to_str().expect("utf-8"),
        "--ctx",
        &ctx,
        "--json",
    ]);
    assert_eq!(code, 2, "{stdout}");
}

#[test]
fn bad_sampling_arguments_exit_2() {
    let (model, _) = a_model();
    let m = model.to_str().expect("utf-8");
    for bad in [
        &["--temperature", "-1"][..],
        &["--top-p", "1.5"][..],
        &["--top-k", "0"][..],
        &["--threads", "0"][..],
    ] {
        let mut args = vec!["run", m, "--prompt", "a", "--json"];
        args.extend_from_slice(bad);
        let (code, _, stdout) = flashpack(&args);
        assert_eq!(code, 2, "{bad:?}: {stdout}");
    }
}

#[test]
fn bench_reports_speed_and_bandwidth() {
    let (model, _) = a_model();
    let (code, json, stdout) = flashpack(&[
        "bench",
        "--model",
        model.to_str().expect("utf-8"),
        "--no-synthetic",
        "--thread-counts",
        "1",
        "--prefill-tokens",
        "8",
        "--decode-tokens",
        "2",
        "--bandwidth-mib",
        "16",
        "--json",
    ]);
    assert_eq!(code, 0, "{stdout}");
    let row = &json["results"][0];
    for key in [
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
        "stream_read_gb_per_s",
        "decode_bandwidth_fraction",
    ] {
        assert!(row[key].as_f64().is_some(), "bench lacks {key}: {stdout}");
    }
}
