//! Trusting what the user gave: an output path never destroys an input (the
//! checkpoint's files, the packed file being retrained, the calibration text),
//! whatever path, symbolic link or hard link names it; and errors name the path
//! the user typed and what was expected there. Every case runs the CLI on copies
//! of fixtures in a temporary directory and checks `--json`'s error object.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use sha2::{Digest, Sha256};

const MICRO: &str = "micro-llama";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// A temporary directory holding a copy of the micro checkpoint at `micro/` and a
/// short calibration text at `calib.txt`.
fn workspace() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("micro");
    std::fs::create_dir(&dir).unwrap();
    for entry in std::fs::read_dir(fixtures().join("models").join(MICRO)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    let text = std::fs::read(fixtures().join("text/train.txt")).unwrap();
    std::fs::write(tmp.path().join("calib.txt"), &text[..4000]).unwrap();
    (tmp, dir)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

struct Outcome {
    code: i32,
    /// `--json`'s one object on stdout.
    json: Value,
    stderr: String,
}

impl Outcome {
    /// The error message of a failed command (from the JSON object).
    fn error(&self) -> &str {
        self.json["error"].as_str().unwrap_or("")
    }
}

/// Runs `flashpack ARGS --json`.
fn flashpack(args: &[&str]) -> Outcome {
    let out = Command::new(env!("CARGO_BIN_EXE_flashpack"))
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let json = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {stdout}\n{stderr}"));
    Outcome {
        code: out.status.code().expect("exited, not killed by a signal"),
        json,
        stderr,
    }
}

/// Asserts exit 2 with `{"error": ..., "exit_code": 2}` on stdout, the message
/// mentioning every needle; returns the message.
fn assert_refused(out: &Outcome, needles: &[&str]) -> String {
    assert_eq!(out.code, 2, "{}\n{}", out.json, out.stderr);
    assert_eq!(out.json["exit_code"], 2, "{}", out.json);
    let message = out.error().to_string();
    for needle in needles {
        assert!(
            message.contains(needle),
            "error should mention {needle:?}: {message}"
        );
    }
    message
}

/// Every file under `dir` (recursively, links not followed) with its type and the
/// sha256 of its content: what must not change when a command is refused.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&path).unwrap();
            files.insert(path, format!("symlink to {}", target.display()));
        } else if meta.is_dir() {
            files.insert(path.clone(), "directory".into());
            files.extend(snapshot(&path));
        } else {
            let bytes = std::fs::read(&path).unwrap();
            files.insert(path, hex::encode(Sha256::digest(&bytes)));
        }
    }
    files
}

/// A packed file of the micro checkpoint at `root/NAME`, with or without predictors.
fn packed(root: &Path, name: &str, calibrated: bool) -> PathBuf {
    let out = root.join(name);
    let src = root.join("micro");
    let mut args = vec!["convert", s(&src), "-o", s(&out)];
    let calib = root.join("calib.txt");
    if calibrated {
        args.extend(["--calib", s(&calib), "--calib-tokens", "256"]);
    }
    let done = flashpack(&args);
    assert_eq!(done.code, 0, "{}\n{}", done.json, done.stderr);
    out
}

fn retrain(root: &Path, input: &Path, output: Option<&Path>) -> Outcome {
    let calib = root.join("calib.txt");
    let mut args = vec!["predictors", "train", s(input)];
    if let Some(o) = output {
        args.extend(["-o", s(o)]);
    }
    args.extend(["--calib", s(&calib), "--calib-tokens", "256"]);
    flashpack(&args)
}

// ------------------------------------------------ convert never writes over its input

#[test]
fn convert_refuses_an_output_that_is_a_source_file() {
    let (tmp, dir) = workspace();
    let before = snapshot(tmp.path());
    for name in [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        let target = dir.join(name);
        let out = flashpack(&["convert", s(&dir), "-o", s(&target)]);
        assert_refused(&out, &[s(&target), "refusing"]);
        assert_eq!(snapshot(tmp.path()), before, "-o {name} changed the files");
    }
    // A new name beside the sources is not one of them: it is written.
    let target = dir.join("micro.flashpack");
    let out = flashpack(&["convert", s(&dir), "-o", s(&target)]);
    assert_eq!(out.code, 0, "{}\n{}", out.json, out.stderr);
    let mut after = snapshot(tmp.path());
    assert!(after.remove(&target).is_some());
    assert_eq!(after, before);
}

#[test]
fn convert_refuses_a_source_file_spelt_another_way() {
    let (tmp, dir) = workspace();
    let before = snapshot(tmp.path());
    // The same file through `..` and `.`: the message names both spellings.
    let target = dir.join("../micro/./model.safetensors");
    let out = flashpack(&["convert", s(&dir), "-o", s(&target)]);
    assert_refused(&out, &[s(&target), s(&dir.join("model.safetensors"))]);
    assert_eq!(snapshot(tmp.path()), before);
}

#[test]
fn convert_refuses_an_output_that_is_a_symlink_to_a_source_file() {
    let (tmp, dir) = workspace();
    let link = tmp.path().join("out.flashpack");
    std::os::unix::fs::symlink(dir.join("model.safetensors"), &link).unwrap();
    let before = snapshot(tmp.path());
    let out = flashpack(&["convert", s(&dir), "-o", s(&link)]);
    assert_refused(
        &out,
        &[s(&link), s(&dir.join("model.safetensors")), "symbolic link"],
    );
    assert_eq!(
        snapshot(tmp.path()),
        before,
        "the link or the source changed"
    );
}

#[test]
fn convert_refuses_an_output_that_is_a_hard_link_to_a_source_file() {
    let (tmp, dir) = workspace();
    let link = tmp.path().join("out.flashpack");
    std::fs::hard_link(dir.join("tokenizer.json"), &link).unwrap();
    let before = snapshot(tmp.path());
    let out = flashpack(&["convert", s(&dir), "-o", s(&link)]);
    assert_refused(
        &out,
        &[s(&link), s(&dir.join("tokenizer.json")), "hard link"],
    );
    assert_eq!(snapshot(tmp.path()), before);
}

#[test]
fn convert_refuses_an_output_in_a_checkpoint_whose_files_are_symlinks() {
    // A Hugging Face cache: the snapshot's names are links into a blob store.
    let (tmp, dir) = workspace();
    let blobs = tmp.path().join("blobs");
    std::fs::create_dir(&blobs).unwrap();
    std::fs::rename(dir.join("model.safetensors"), blobs.join("0123abcd")).unwrap();
    std::os::unix::fs::symlink("../blobs/0123abcd", dir.join("model.safetensors")).unwrap();
    let before = snapshot(tmp.path());
    for target in [dir.join("model.safetensors"), blobs.join("0123abcd")] {
        let out = flashpack(&["convert", s(&dir), "-o", s(&target)]);
        assert_refused(&out, &[s(&target), "refusing"]);
        assert_eq!(snapshot(tmp.path()), before, "-o {}", target.display());
    }
}

#[test]
fn convert_refuses_to_write_a_file_the_checkpoint_would_then_read() {
    // The micro checkpoint has no index: writing one would change what it is.
    let (tmp, dir) = workspace();
    let before = snapshot(tmp.path());
    let target = dir.join("model.safetensors.index.json");
    let out = flashpack(&["convert", s(&dir), "-o", s(&target)]);
    assert_refused(&out, &[s(&target)]);
    assert!(!target.exists());
    assert_eq!(snapshot(tmp.path()), before);
}

#[test]
fn convert_refuses_an_output_that_is_its_calibration_text() {
    let (tmp, dir) = workspace();
    let calib = tmp.path().join("calib.txt");
    let before = snapshot(tmp.path());
    let out = flashpack(&["convert", s(&dir), "-o", s(&calib), "--calib", s(&calib)]);
    assert_refused(&out, &[s(&calib), "calibration text"]);
    assert_eq!(snapshot(tmp.path()), before);
}

#[test]
fn convert_refuses_an_output_that_is_an_existing_directory() {
    let (tmp, dir) = workspace();
    let existing = tmp.path().join("out");
    std::fs::create_dir(&existing).unwrap();
    let before = snapshot(tmp.path());
    for target in [existing.as_path(), dir.as_path()] {
        let out = flashpack(&["convert", s(&dir), "-o", s(target)]);
        let message = assert_refused(&out, &[s(target), "is a directory", "expected a file"]);
        assert!(!message.contains("os error"), "{message}");
        assert_eq!(snapshot(tmp.path()), before);
    }
}

// --------------------------------------------- predictors train never writes over its input

#[test]
fn predictors_train_refuses_an_output_that_is_its_input_through_a_symlink() {
    let (tmp, _dir) = workspace();
    let input = packed(tmp.path(), "model.flashpack", false);
    let link = tmp.path().join("link.flashpack");
    std::os::unix::fs::symlink("model.flashpack", &link).unwrap();
    let before = snapshot(tmp.path());
    let out = retrain(tmp.path(), &input, Some(&link));
    assert_refused(&out, &[s(&link), s(&input), "omit"]);
    assert_eq!(snapshot(tmp.path()), before);
}

#[test]
fn predictors_train_refuses_an_output_that_is_its_input_through_a_hard_link() {
    let (tmp, _dir) = workspace();
    let input = packed(tmp.path(), "model.flashpack", false);
    let link = tmp.path().join("other-name.flashpack");
    std::fs::hard_link(&input, &link).unwrap();
    let before = snapshot(tmp.path());
    let out = retrain(tmp.path(), &input, Some(&link));
    assert_refused(&out, &[s(&link), s(&input), "hard link", "omit"]);
    assert_eq!(snapshot(tmp.path()), before);
}

#[test]
fn predictors_train_refuses_an_output_that_is_its_calibration_text() {
    let (tmp, _dir) = workspace();
    let input = packed(tmp.path(), "model.flashpack", false);
    let calib = tmp.path().join("calib.txt");
    let before = snapshot(tmp.path());
    let out = retrain(tmp.path(), &input, Some(&calib));
    let message = assert_refused(&out, &[s(&calib), "calibration text"]);
    assert!(
        !message.contains("in place"),
        "advice for another case: {message}"
    );
    assert_eq!(snapshot(tmp.path()), before);
}

#[test]
fn predictors_train_refuses_an_output_that_is_an_existing_directory() {
    let (tmp, _dir) = workspace();
    let input = packed(tmp.path(), "model.flashpack", false);
    let existing = tmp.path().join("out");
    std::fs::create_dir(&existing).unwrap();
    let before = snapshot(tmp.path());
    let out = retrain(tmp.path(), &input, Some(&existing));
    assert_refused(&out, &[s(&existing), "is a directory", "expected a file"]);
    assert_eq!(snapshot(tmp.path()), before);
}

#[test]
fn predictors_train_in_place_through_a_symlink_rewrites_the_file_it_points_to() {
    let (tmp, _dir) = workspace();
    let input = packed(tmp.path(), "model.flashpack", false);
    let link = tmp.path().join("link.flashpack");
    std::os::unix::fs::symlink("model.flashpack", &link).unwrap();
    let out = retrain(tmp.path(), &link, None);
    assert_eq!(out.code, 0, "{}\n{}", out.json, out.stderr);
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink(),
        "the link was replaced by a file"
    );
    let inspected = flashpack(&["inspect", s(&input)]);
    assert_eq!(inspected.code, 0, "{}", inspected.json);
    assert_eq!(inspected.json["has_predictors"], true, "{}", inspected.json);
}

// ----------------------------------------------------- errors name what the user gave

#[test]
fn a_missing_output_directory_is_named() {
    let (tmp, dir) = workspace();
    let missing = tmp.path().join("no/such");
    let target = missing.join("x.flashpack");
    let out = flashpack(&["convert", s(&dir), "-o", s(&target)]);
    let message = assert_refused(&out, &["output directory", s(&missing), "does not exist"]);
    assert!(
        !message.contains(".x.flashpack.tmp-"),
        "names a temporary file: {message}"
    );

    let input = packed(tmp.path(), "model.flashpack", false);
    let before = snapshot(tmp.path());
    let out = retrain(tmp.path(), &input, Some(&target));
    let message = assert_refused(&out, &["output directory", s(&missing), "does not exist"]);
    assert!(
        !message.contains(".x.flashpack.tmp-"),
        "names a temporary file: {message}"
    );
    assert_eq!(snapshot(tmp.path()), before);
}

#[test]
fn an_output_directory_where_no_file_can_be_created_is_named() {
    // procfs exists but refuses new files: the error names the directory the
    // user gave and does not claim it is missing.
    let (_tmp, dir) = workspace();
    let out = flashpack(&["convert", s(&dir), "-o", "/proc/x.flashpack"]);
    assert_eq!(out.code, 3, "{}", out.json);
    assert_eq!(out.json["exit_code"], 3, "{}", out.json);
    let message = out.error();
    assert!(message.contains("output directory /proc"), "{message}");
    assert!(
        !message.contains(".tmp-"),
        "names a temporary file: {message}"
    );
    assert!(!message.contains("does not exist"), "{message}");
}

#[test]
fn an_output_path_ending_in_a_slash_is_refused_as_a_directory() {
    let (tmp, dir) = workspace();
    let before = snapshot(tmp.path());
    let target = format!("{}/", s(&tmp.path().join("new")));
    let out = flashpack(&["convert", s(&dir), "-o", &target]);
    let message = assert_refused(&out, &[&target, "ends in '/'"]);
    assert!(!message.contains("os error"), "{message}");
    assert_eq!(snapshot(tmp.path()), before);
}

#[test]
fn an_output_directory_that_is_a_file_is_named() {
    let (tmp, dir) = workspace();
    let file = tmp.path().join("calib.txt");
    let target = file.join("x.flashpack");
    let out = flashpack(&["convert", s(&dir), "-o", s(&target)]);
    let message = assert_refused(&out, &["output directory", s(&file)]);
    assert!(
        !message.contains(".x.flashpack.tmp-"),
        "names a temporary file: {message}"
    );
}

#[test]
fn a_checkpoint_path_that_is_a_file_says_a_directory_was_expected() {
    let (tmp, dir) = workspace();
    let config = dir.join("config.json");
    let out = flashpack(&[
        "convert",
        s(&config),
        "-o",
        s(&tmp.path().join("x.flashpack")),
    ]);
    let message = assert_refused(&out, &[s(&config), "is a file", "checkpoint directory"]);
    assert!(!message.contains("not found"), "{message}");
}

#[test]
fn inspect_of_a_missing_path_says_what_was_expected() {
    let (tmp, _dir) = workspace();
    let missing = tmp.path().join("nope");
    let out = flashpack(&["inspect", s(&missing)]);
    assert_refused(
        &out,
        &[
            s(&missing),
            "does not exist",
            "checkpoint directory or a packed file",
        ],
    );
}

#[test]
fn a_calibration_path_that_is_a_directory_says_a_file_was_expected() {
    let (tmp, dir) = workspace();
    let calib_dir = tmp.path().join("texts");
    std::fs::create_dir(&calib_dir).unwrap();
    let out = flashpack(&[
        "convert",
        s(&dir),
        "-o",
        s(&tmp.path().join("x.flashpack")),
        "--calib",
        s(&calib_dir),
    ]);
    assert_refused(
        &out,
        &[
            s(&calib_dir),
            "is a directory",
            "expected a calibration text file",
        ],
    );
    assert!(!tmp.path().join("x.flashpack").exists());
}

#[test]
fn a_missing_calibration_file_is_named_before_the_trace_directory_is_created() {
    let (tmp, dir) = workspace();
    let missing = tmp.path().join("nope.txt");
    let trace = tmp.path().join("trace");
    let out = flashpack(&[
        "convert",
        s(&dir),
        "-o",
        s(&tmp.path().join("x.flashpack")),
        "--calib",
        s(&missing),
        "--keep-trace",
        s(&trace),
    ]);
    assert_refused(&out, &[s(&missing), "does not exist"]);
    assert!(!trace.exists(), "the trace directory was created");
}

#[test]
fn an_empty_calibration_text_is_named() {
    let (tmp, dir) = workspace();
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let out = flashpack(&[
        "convert",
        s(&dir),
        "-o",
        s(&tmp.path().join("x.flashpack")),
        "--calib",
        s(&empty),
    ]);
    assert_refused(&out, &[s(&empty), "is empty"]);
}

#[test]
fn a_trace_directory_that_is_a_file_is_refused_as_such() {
    let (tmp, dir) = workspace();
    let calib = tmp.path().join("calib.txt");
    let before = snapshot(tmp.path());
    let out = flashpack(&[
        "convert",
        s(&dir),
        "-o",
        s(&tmp.path().join("x.flashpack")),
        "--calib",
        s(&calib),
        "--keep-trace",
        s(&calib),
    ]);
    assert_refused(&out, &[s(&calib), "is a file", "expected a directory"]);
    assert_eq!(snapshot(tmp.path()), before);
}

#[test]
fn verify_and_eval_of_a_directory_say_a_file_was_expected() {
    let (tmp, dir) = workspace();
    let out = flashpack(&["verify", s(&dir)]);
    assert_refused(&out, &[s(&dir), "is a directory, expected a file"]);
    let texts = tmp.path().join("texts");
    std::fs::create_dir(&texts).unwrap();
    let out = flashpack(&["eval", s(&dir), "--text", s(&texts)]);
    assert_refused(&out, &[s(&texts), "is a directory, expected a file"]);
}

#[test]
fn a_calibration_token_limit_of_zero_is_refused_as_such() {
    let (tmp, dir) = workspace();
    let calib = tmp.path().join("calib.txt");
    let target = tmp.path().join("x.flashpack");
    let out = flashpack(&[
        "convert",
        s(&dir),
        "-o",
        s(&target),
        "--calib",
        s(&calib),
        "--calib-tokens",
        "0",
    ]);
    let message = assert_refused(&out, &["token limit is 0", "at least 1"]);
    assert!(!message.contains("no tokens"), "blames the text: {message}");
    assert!(!target.exists());

    let input = packed(tmp.path(), "model.flashpack", false);
    let out = flashpack(&[
        "predictors",
        "train",
        s(&input),
        "--calib",
        s(&calib),
        "--calib-tokens",
        "0",
    ]);
    assert_refused(&out, &["token limit is 0", "at least 1"]);
}

// ------------------------------------------------- inspect checks every file it reads

/// Damages one side file of a fresh copy and expects inspect to refuse it, naming
/// the file.
fn assert_inspect_rejects(file: &str, content: &str) {
    let (_tmp, dir) = workspace();
    let path = dir.join(file);
    std::fs::write(&path, content).unwrap();
    let out = flashpack(&["inspect", s(&dir)]);
    assert_refused(&out, &[s(&path)]);
}

#[test]
fn inspect_rejects_a_tokenizer_that_is_not_json() {
    assert_inspect_rejects("tokenizer.json", "{\"version\": \"1.0\", \"model\": ");
}

#[test]
fn inspect_rejects_a_tokenizer_the_tokenizers_crate_cannot_load() {
    assert_inspect_rejects("tokenizer.json", "{\"version\": \"1.0\"}");
}

#[test]
fn inspect_rejects_a_tokenizer_config_that_is_not_json() {
    assert_inspect_rejects("tokenizer_config.json", "{\"add_bos_token\": tru");
}

#[test]
fn inspect_rejects_a_generation_config_that_is_not_json() {
    assert_inspect_rejects("generation_config.json", "not json at all");
}

#[test]
fn inspect_rejects_a_generation_config_with_an_eos_outside_the_vocabulary() {
    assert_inspect_rejects("generation_config.json", "{\"eos_token_id\": 100000}");
}

/// Replaces one file of a fresh copy of `fixture` by an empty directory and
/// expects inspect to say a file was expected there.
fn assert_inspect_rejects_a_directory(fixture: &str, file: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(fixture);
    std::fs::create_dir(&dir).unwrap();
    for entry in std::fs::read_dir(fixtures().join("models").join(fixture)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    let path = dir.join(file);
    if path.exists() {
        std::fs::remove_file(&path).unwrap();
    }
    std::fs::create_dir(&path).unwrap();
    let out = flashpack(&["inspect", s(&dir)]);
    let message = assert_refused(&out, &[s(&path), "is a directory", "expected a"]);
    assert!(!message.contains("not found"), "{message}");
    assert!(!message.contains("os error"), "{message}");
}

#[test]
fn inspect_says_a_file_was_expected_where_a_checkpoint_holds_a_directory() {
    for file in [
        "tokenizer.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer_config.json",
        "model.safetensors.index.json",
    ] {
        assert_inspect_rejects_a_directory(MICRO, file);
    }
    assert_inspect_rejects_a_directory(
        "llama-relu-gqa-bf16-sharded",
        "model-00002-of-00004.safetensors",
    );
}
