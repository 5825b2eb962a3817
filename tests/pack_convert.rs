//! `convert` and `verify` end to end through the binary: round trips of every
//! fixture, byte-identical output across runs and thread counts, damage located
//! to its section and chunk, and failed conversions that leave nothing behind.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/models")
}

struct Outcome {
    code: i32,
    json: Value,
    stderr: String,
}

fn flashpack(args: &[&str], threads: Option<&str>) -> Outcome {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flashpack"));
    cmd.args(args).arg("--json");
    if let Some(t) = threads {
        cmd.env("RAYON_NUM_THREADS", t);
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{stderr}");
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON object ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    Outcome {
        code: out.status.code().expect("not killed"),
        json,
        stderr,
    }
}

/// `flashpack convert SRC -o OUT EXTRA... --json`.
fn convert(src: &str, out: &str, extra: &[&str], threads: Option<&str>) -> Outcome {
    let args: Vec<&str> = ["convert", src, "-o", out]
        .iter()
        .chain(extra)
        .copied()
        .collect();
    flashpack(&args, threads)
}

fn every_fixture() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixtures())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    dirs.sort();
    assert!(!dirs.is_empty());
    dirs
}

#[test]
fn every_fixture_round_trips_through_convert_and_verify() {
    let tmp = tempfile::tempdir().unwrap();
    for dir in every_fixture() {
        let out = tmp.path().join(format!(
            "{}.flashpack",
            dir.file_name().unwrap().to_string_lossy()
        ));
        let r = convert(
            dir.to_str().unwrap(),
            out.to_str().unwrap(),
            &["--verify"],
            None,
        );
        assert_eq!(r.code, 0, "{}: {}", dir.display(), r.stderr);
        assert_eq!(r.json["verified"], true);
        assert_eq!(r.json["verify"]["weights_mismatched"], 0);
        assert!(r.json["verify"]["weights_compared"].as_u64().unwrap() > 0);
        assert_eq!(r.json["verify"]["logit_nmse_gated"], true);
        let nmse = r.json["verify"]["logit_nmse"].as_f64().unwrap();
        println!(
            "{}: logit NMSE against the source {nmse:.3e}",
            dir.display()
        );
        assert!(nmse < 1e-10, "{}: {nmse}", dir.display());
        assert_eq!(
            r.json["file_bytes"].as_u64().unwrap(),
            std::fs::metadata(&out).unwrap().len()
        );
    }
}

#[test]
fn dtype_conversion_rounds_as_torch_does() {
    // verify --against compares each packed value with the source value narrowed
    // to the packed dtype, so this checks every converted weight.
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures().join("opt-relu");
    for dtype in ["f16", "bf16"] {
        let out = tmp.path().join(format!("{dtype}.flashpack"));
        let r = convert(
            src.to_str().unwrap(),
            out.to_str().unwrap(),
            &["--dtype", dtype],
            None,
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
        let v = flashpack(
            &[
                "verify",
                out.to_str().unwrap(),
                "--against",
                src.to_str().unwrap(),
            ],
            None,
        );
        assert_eq!(v.code, 0, "{}", v.stderr);
        assert!(r.json["ffn_bytes"].as_u64().unwrap() > 0);
    }
}

#[test]
fn output_is_byte_identical_across_runs_and_thread_counts() {
    let tmp = tempfile::tempdir().unwrap();
    for src in ["opt-relu", "llama-relu-gqa-bf16-sharded"] {
        let src = fixtures().join(src);
        let mut outputs = Vec::new();
        for (i, threads) in ["1", "2", "2"].iter().enumerate() {
            let out = tmp.path().join(format!("run{i}.flashpack"));
            let r = convert(
                src.to_str().unwrap(),
                out.to_str().unwrap(),
                &[],
                Some(threads),
            );
            assert_eq!(r.code, 0, "{}", r.stderr);
            outputs.push(std::fs::read(&out).unwrap());
        }
        assert!(
            outputs.windows(2).all(|w| w[0] == w[1]),
            "{} differs between runs",
            src.display()
        );
    }
}

#[test]
fn a_flipped_byte_is_located_to_its_section_and_chunk() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m.flashpack");
    let src = fixtures().join("opt-relu");
    assert_eq!(
        convert(src.to_str().unwrap(), out.to_str().unwrap(), &[], None).code,
        0
    );
    let pristine = std::fs::read(&out).unwrap();
    let manifest_offset = u64::from_le_bytes(pristine[16..24].try_into().unwrap()) as usize;
    let manifest: Value = serde_json::from_slice(&pristine[manifest_offset..]).unwrap();
    for section in manifest["sections"].as_array().unwrap() {
        let name = section["name"].as_str().unwrap();
        let chunks = section["chunks"].as_array().unwrap();
        // A byte in the middle of the last chunk.
        let before: u64 = chunks[..chunks.len() - 1]
            .iter()
            .map(|c| c["length"].as_u64().unwrap())
            .sum();
        let at = section["offset"].as_u64().unwrap()
            + before
            + chunks.last().unwrap()["length"].as_u64().unwrap() / 2;
        let mut damaged = pristine.clone();
        damaged[at as usize] ^= 0x01;
        std::fs::write(&out, &damaged).unwrap();
        let r = flashpack(&["verify", out.to_str().unwrap()], None);
        assert_eq!(r.code, 1, "{name}: {}", r.stderr);
        let failures: Vec<&str> = r.json["failures"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap())
            .collect();
        let expected = format!("section {name:?} chunk {}", chunks.len() - 1);
        assert!(
            failures.iter().any(|f| f.contains(&expected)),
            "{name}: {failures:?}"
        );
    }
    // The manifest itself.
    let mut damaged = pristine.clone();
    damaged[manifest_offset + 10] ^= 0x01;
    std::fs::write(&out, &damaged).unwrap();
    let r = flashpack(&["verify", out.to_str().unwrap()], None);
    assert_eq!(r.code, 1);
    assert!(r.json["error"]
        .as_str()
        .unwrap()
        .contains("manifest sha256"));
}

#[test]
fn unparseable_files_exit_2_with_the_rule() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("x.flashpack");
    std::fs::write(
        &path,
        b"not a flashpack file at all, just some text of more than sixty-four bytes",
    )
    .unwrap();
    let r = flashpack(&["verify", path.to_str().unwrap()], None);
    assert_eq!(r.code, 2);
    assert!(r.json["error"].as_str().unwrap().contains("rule 1"));
}

#[test]
fn failed_convert_leaves_the_previous_output_and_no_temporary_file() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m.flashpack");
    std::fs::write(&out, b"previous output").unwrap();
    // A checkpoint whose weights are truncated.
    let src = tmp.path().join("broken");
    std::fs::create_dir(&src).unwrap();
    for e in std::fs::read_dir(fixtures().join("opt-relu")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), src.join(e.file_name())).unwrap();
    }
    let weights = src.join("model.safetensors");
    let len = std::fs::metadata(&weights).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&weights)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let r = convert(src.to_str().unwrap(), out.to_str().unwrap(), &[], None);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert_eq!(std::fs::read(&out).unwrap(), b"previous output");
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn bad_convert_options_are_usage_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m.flashpack");
    let src = fixtures().join("opt-relu");
    let r = convert(
        src.to_str().unwrap(),
        out.to_str().unwrap(),
        &["--align", "3000"],
        None,
    );
    assert_eq!(r.code, 2);
    assert!(r.json["error"].as_str().unwrap().contains("--align"));
    assert!(!out.exists());
}

#[test]
fn inspect_describes_a_packed_file_as_it_does_its_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m.flashpack");
    let src = fixtures().join("opt-relu");
    assert_eq!(
        convert(
            src.to_str().unwrap(),
            out.to_str().unwrap(),
            &["--dtype", "bf16"],
            None
        )
        .code,
        0
    );
    let packed = flashpack(&["inspect", out.to_str().unwrap()], None);
    let source = flashpack(&["inspect", src.to_str().unwrap()], None);
    assert_eq!(packed.code, 0, "{}", packed.stderr);
    assert_eq!(packed.json["format"], "flashpack");
    assert_eq!(source.json["format"], "hf_checkpoint");
    for key in [
        "architecture",
        "num_layers",
        "hidden_size",
        "ffn_width",
        "activation",
        "params_total",
        "params_ffn",
    ] {
        assert_eq!(packed.json[key], source.json[key], "{key}");
    }
    assert_eq!(
        packed.json["params_by_dtype"]["bf16"],
        source.json["params_total"]
    );
    assert_eq!(
        packed.json["file_bytes"].as_u64().unwrap(),
        std::fs::metadata(&out).unwrap().len()
    );
    assert_eq!(packed.json["ffn_dtype"], "bf16");
}
