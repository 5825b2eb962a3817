//! The committed damaged packed files of `fixtures/broken/`: each is rejected
//! with the rule its README row names, by the library (`PackedFile::open`, then
//! `check_integrity`) and by `flashpack verify --json` with the documented exit
//! code; the README table and the directory list the same files; the base
//! verifies; and the generator (`tests/common/broken.rs`, the code behind
//! `examples/make_broken_files.rs`) still writes exactly the committed bytes.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use flashpack::format::integrity::check_integrity;
use flashpack::format::{FormatError, PackedFile};
use flashpack::Error;
use serde_json::Value;

mod common;

#[path = "common/broken.rs"]
mod broken;

const BASE: &str = "base.flashpack";
/// The quantized base (format section 9), from which the files of rules 21-26
/// are derived.
const BASE_Q: &str = "base-q.flashpack";

fn dir() -> PathBuf {
    common::fixtures().join("broken")
}

/// One row of the README table.
#[derive(Debug)]
struct Row {
    file: String,
    /// The rule the file breaks; `None` for the valid base.
    rule: Option<u32>,
    /// The exit code `flashpack verify` gives it.
    exit: i32,
}

/// The rows of `fixtures/broken/README.md`'s table: lines starting "| `file`".
fn readme_rows() -> Vec<Row> {
    let text = std::fs::read_to_string(dir().join("README.md")).expect("README.md");
    let rows: Vec<Row> = text
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let rule = match cells[2] {
                "-" => None,
                r => Some(
                    r.strip_prefix('R')
                        .and_then(|n| n.parse().ok())
                        .unwrap_or_else(|| panic!("rule cell {r:?} in {l:?}")),
                ),
            };
            Row {
                file: cells[1].trim_matches('`').to_string(),
                rule,
                exit: cells[3]
                    .parse()
                    .unwrap_or_else(|_| panic!("exit cell in {l:?}")),
            }
        })
        .collect();
    assert!(
        rows.len() > 20,
        "README table not found: {} rows",
        rows.len()
    );
    rows
}

fn broken_rows() -> Vec<(String, u32, i32)> {
    readme_rows()
        .into_iter()
        .filter_map(|r| r.rule.map(|rule| (r.file, rule, r.exit)))
        .collect()
}

/// What the library reports: the error `open` returns, or else every failure
/// of the full integrity check; `at_open` says which.
struct Reported {
    at_open: bool,
    failures: Vec<FormatError>,
}

fn library(path: &Path) -> Reported {
    match PackedFile::open(path) {
        Err(Error::Format { source, .. }) => Reported {
            at_open: true,
            failures: vec![source],
        },
        Err(other) => panic!("{}: not a format error: {other}", path.display()),
        Ok(file) => Reported {
            at_open: false,
            failures: check_integrity(&file)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
                .failures,
        },
    }
}

/// `flashpack verify FILE --json`: exit code and the one JSON object on stdout.
fn verify_cli(path: &Path, extra: &[&str]) -> (i32, Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_flashpack"))
        .arg("verify")
        .arg(path)
        .args(extra)
        .arg("--json")
        .output()
        .expect("run flashpack");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "{}: stdout is not one JSON object ({e}): {stdout}",
            path.display()
        )
    });
    (out.status.code().expect("exit code"), json)
}

#[test]
fn the_readme_table_and_the_directory_list_the_same_files() {
    let on_disk: BTreeSet<String> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "README.md")
        .collect();
    let rows = readme_rows();
    let in_table: BTreeSet<String> = rows.iter().map(|r| r.file.clone()).collect();
    assert_eq!(in_table.len(), rows.len(), "a file has two rows");
    assert_eq!(on_disk, in_table, "files on disk vs README rows");
    assert!(in_table.contains(BASE));
}

#[test]
fn every_numbered_rule_has_a_broken_file() {
    let rules: BTreeSet<u32> = broken_rows().iter().map(|r| r.1).collect();
    let mut want: BTreeSet<u32> = (1..=29).collect();
    want.extend(31..=34);
    assert_eq!(rules, want);
}

#[test]
fn the_base_verifies_and_matches_its_checkpoint() {
    let base = dir().join(BASE);
    let reported = library(&base);
    assert!(!reported.at_open && reported.failures.is_empty());
    let row = readme_rows().into_iter().find(|r| r.file == BASE).unwrap();
    assert_eq!((row.rule, row.exit), (None, 0));
    let checkpoint = common::fixtures().join("models/micro-llama");
    let (code, json) = verify_cli(&base, &["--against", checkpoint.to_str().unwrap()]);
    assert_eq!(code, 0, "{json}");
    assert_eq!(json["ok"], true);
    assert!(json["weights_compared"].as_u64().unwrap() > 0);
    assert_eq!(json["weights_mismatched"], 0);
    // The mixture-of-experts base, with its expert sections.
    let base = dir().join(broken::MOE_BASE);
    let reported = library(&base);
    assert!(!reported.at_open && reported.failures.is_empty());
    let row = readme_rows()
        .into_iter()
        .find(|r| r.file == broken::MOE_BASE)
        .unwrap();
    assert_eq!((row.rule, row.exit), (None, 0));
    assert_eq!(PackedFile::open(&base).unwrap().manifest.experts.len(), 4);
    let checkpoint = common::fixtures().join("models/micro-qwen2moe");
    let (code, json) = verify_cli(&base, &["--against", checkpoint.to_str().unwrap()]);
    assert_eq!(code, 0, "{json}");
    assert_eq!(json["weights_mismatched"], 0);
}

#[test]
fn the_quantized_base_verifies_against_its_checkpoint() {
    let base = dir().join(BASE_Q);
    let reported = library(&base);
    assert!(!reported.at_open && reported.failures.is_empty());
    let row = readme_rows()
        .into_iter()
        .find(|r| r.file == BASE_Q)
        .unwrap();
    assert_eq!((row.rule, row.exit), (None, 0));
    let checkpoint = common::fixtures().join("models/micro-llama-q");
    let (code, json) = verify_cli(&base, &["--against", checkpoint.to_str().unwrap()]);
    assert_eq!(code, 0, "{json}");
    assert_eq!(json["ok"], true);
    let errors = json["quant_errors"].as_array().unwrap();
    assert_eq!(errors.len(), 15, "{json}");
    assert!(errors.iter().all(|e| e["blocks_differing"] == 0));
}

#[test]
fn each_broken_file_fails_its_rule_in_the_library() {
    for (file, rule, _) in broken_rows() {
        let r = library(&dir().join(&file));
        let first = r
            .failures
            .first()
            .unwrap_or_else(|| panic!("{file}: accepted"));
        assert_eq!(first.rule(), rule, "{file}: {first}");
        // Rules 11, 12, 14, 15, 19, 24, 26, 29 and 33 need the section bytes: the file
        // must get past open and fail the full check; every other rule fails at open.
        let needs_bytes = [11, 12, 14, 15, 19, 24, 26, 29, 33].contains(&rule);
        assert_eq!(
            !r.at_open, needs_bytes,
            "{file}: found at open: {}",
            r.at_open
        );
        // Nothing else is wrong, except the section hash a flipped byte also breaks.
        for f in &r.failures[1..] {
            assert!(rule == 14 && f.rule() == 12, "{file}: also {f}");
        }
    }
}

#[test]
fn each_broken_file_fails_its_rule_in_the_cli_with_its_exit_code() {
    for (file, rule, exit) in broken_rows() {
        let path = dir().join(&file);
        // The documented code: 1 for a failed check (a hash or padding found
        // wrong: bytes changed after packing), 2 for a file that breaks a
        // structural rule (at open, or rule 19 found by the full check).
        let r = library(&path);
        let expected = if !r.failures[0].is_integrity() { 2 } else { 1 };
        assert_eq!(exit, expected, "{file}: README exit column");
        let (code, json) = verify_cli(&path, &[]);
        assert_eq!(code, exit, "{file}: {json}");
        let named = format!("rule {rule}:");
        if r.at_open || !r.failures[0].is_integrity() {
            assert!(
                json["error"].as_str().unwrap().contains(&named),
                "{file}: {json}"
            );
            assert_eq!(json["exit_code"], exit, "{file}");
        } else {
            assert_eq!(json["ok"], false, "{file}");
            let first = json["failures"][0].as_str().unwrap();
            assert!(first.starts_with(&named), "{file}: {json}");
        }
    }
}

#[test]
fn a_flipped_ffn_byte_names_its_section_and_chunk() {
    let path = dir().join("r14-ffn-chunk-byte-flipped.flashpack");
    let offset = PackedFile::open(&path)
        .unwrap()
        .section("ffn.1")
        .unwrap()
        .offset;
    let expected = vec![
        FormatError::ChunkHash {
            section: "ffn.1".into(),
            chunk: 0,
            offset,
        },
        FormatError::SectionHash {
            section: "ffn.1".into(),
        },
    ];
    assert_eq!(library(&path).failures, expected);
    let (_, json) = verify_cli(&path, &[]);
    let first = json["failures"][0].as_str().unwrap();
    assert!(first.contains("\"ffn.1\" chunk 0"), "{first}");
}

#[test]
fn a_flipped_dense_byte_names_its_section_and_chunk() {
    let path = dir().join("r14-dense-byte-flipped.flashpack");
    let offset = PackedFile::open(&path)
        .unwrap()
        .section("dense")
        .unwrap()
        .offset;
    let expected = vec![
        FormatError::ChunkHash {
            section: "dense".into(),
            chunk: 0,
            offset,
        },
        FormatError::SectionHash {
            section: "dense".into(),
        },
    ];
    assert_eq!(library(&path).failures, expected);
}

#[test]
fn the_exact_errors_of_the_files_found_by_the_full_check() {
    let failures = |name: &str| library(&dir().join(name)).failures;
    assert_eq!(
        failures("r11-nonzero-padding.flashpack"),
        vec![FormatError::NonZeroPadding { offset: 100 }]
    );
    assert_eq!(
        failures("r12-section-hash.flashpack"),
        vec![FormatError::SectionHash {
            section: "ffn.0".into()
        }]
    );
    assert!(matches!(
        failures("r15-zstd-garbage.flashpack").as_slice(),
        [FormatError::Decompress { section, chunk: 0, .. }] if section == "dense"
    ));
    assert_eq!(
        failures("r19-order-not-permutation.flashpack"),
        vec![FormatError::NeuronOrder {
            layer: 0,
            neurons: 32
        }]
    );
    assert_eq!(
        failures("r02-version-2.flashpack"),
        vec![FormatError::UnsupportedVersion {
            found: 2,
            supported: 1
        }]
    );
}

#[test]
fn tensors_and_required_sections_in_the_wrong_place_are_rejected() {
    // Both were accepted once: `verify` passed them, and `run` panicked on the
    // first (the runtime read model.norm.weight and a predictor bias from the
    // wrong section's bytes).
    let message = |name: &str| library(&dir().join(name)).failures[0].to_string();
    let m = message("r18-tensor-in-wrong-section.flashpack");
    assert!(
        m.contains("\"model.norm.weight\" is in section \"predictors\""),
        "{m}"
    );
    let m = message("r16-dense-wrong-kind.flashpack");
    assert!(m.contains("\"dense\" is of kind predictor"), "{m}");
}

#[test]
fn the_generator_reproduces_the_committed_files() {
    let base = std::fs::read(dir().join(BASE)).unwrap();
    let mut generated = broken::broken_files(&base);
    generated.extend(broken::broken_quant_files(
        &std::fs::read(dir().join(BASE_Q)).unwrap(),
    ));
    let moe = std::fs::read(dir().join(broken::MOE_BASE)).unwrap();
    generated.extend(broken::broken_moe_files(&moe));
    let sel = std::fs::read(dir().join(broken::SELECTOR_BASE)).unwrap();
    generated.extend(broken::broken_selector_files(&sel));
    let names: BTreeSet<String> = generated.iter().map(|(n, _)| n.clone()).collect();
    let listed: BTreeSet<String> = broken_rows().into_iter().map(|r| r.0).collect();
    assert_eq!(names, listed, "generated files vs README rows");
    for (name, bytes) in generated {
        let committed = std::fs::read(dir().join(&name)).unwrap();
        assert!(
            committed == bytes,
            "{name} differs from what the generator writes now; run \
             `cargo run --example make_broken_files -- fixtures/broken/base.flashpack fixtures/broken \
             fixtures/broken/base-q.flashpack`"
        );
    }
}

#[test]
fn the_files_stay_small() {
    let mut total = 0;
    for e in std::fs::read_dir(dir()).unwrap() {
        let e = e.unwrap();
        let len = e.metadata().unwrap().len();
        assert!(len <= 24 << 10, "{:?}: {len} bytes", e.file_name());
        total += len;
    }
    // Each file stays under 24 KiB; the directory grows by a base and its
    // files per format section (the selector's base and R27-R29 took it past
    // 1 MiB: 1.03 MiB then).
    assert!(total < 5 << 18, "{total} bytes in fixtures/broken");
}

/// Rule 19 needs the dense bytes, which opening a file does not read: the
/// runtime checks it when it loads them, so `run` refuses a neuron order that
/// is not a permutation (exit 2) where it used to compute with it.
#[test]
fn run_checks_the_neuron_order_when_it_loads_the_dense_part() {
    let run = |name: &str, ffn: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_flashpack"))
            .arg("run")
            .arg(dir().join(name))
            .args([
                "--ffn",
                ffn,
                "--prompt",
                "the",
                "--max-new-tokens",
                "2",
                "--json",
            ])
            .output()
            .unwrap();
        let json: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        (out.status.code(), json)
    };
    for ffn in ["dense", "flash"] {
        let (code, json) = run("base.flashpack", ffn);
        assert_eq!(code, Some(0), "base, --ffn {ffn}: {json}");
        let (code, json) = run("r19-order-not-permutation.flashpack", ffn);
        assert_eq!(code, Some(2), "--ffn {ffn}: {json}");
        let error = json["error"].as_str().unwrap_or_default();
        assert!(error.contains("rule 19:"), "--ffn {ffn}: {json}");
    }
}
