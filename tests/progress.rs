//! Progress of long work: the library reports each phase of `convert` (tokens
//! calibrated of those the text gives, layers of thresholds, statistics and
//! training, weight bytes written, source bytes hashed) with totals that match
//! what was done, and the command line draws those phases, and `eval`'s scoring,
//! on a terminal (a pseudo-terminal made by util-linux `script`) and nothing
//! when stderr is a pipe.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use flashpack::format::PackedFile;
use flashpack::pack::convert::{convert, ConvertOptions};
use flashpack::predictor::calibrate::CalibrationOptions;
use flashpack::predictor::pipeline::CalibrationPlan;
use flashpack::predictor::train::TrainOptions;
use flashpack::progress::Phase;

const BIN: &str = env!("CARGO_BIN_EXE_flashpack");

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Converts `model` with calibration on the training text, recording every
/// progress report in order.
/// The calibration text is the first 4,000 bytes of the training text (a few
/// hundred tokens), so that training on all of it is quick.
fn convert_recording(model: &str, calib_tokens: usize) -> (Vec<(Phase, u64, u64)>, PathBuf) {
    let dir = tempfile::tempdir().unwrap().keep();
    let out = dir.join("model.flashpack");
    let text = std::fs::read_to_string(fixtures().join("text/train.txt")).unwrap();
    let cut = (0..=4000)
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap();
    let calib = dir.join("calib.txt");
    std::fs::write(&calib, &text[..cut]).unwrap();
    let options = ConvertOptions {
        calibration: Some(CalibrationPlan {
            files: vec![calib],
            calibrate: CalibrationOptions {
                max_tokens: calib_tokens,
                ..CalibrationOptions::default()
            },
            train: TrainOptions::default(),
        }),
        ..ConvertOptions::default()
    };
    let events = Mutex::new(Vec::new());
    let record = |phase: Phase, done: u64, total: u64| {
        events.lock().unwrap().push((phase, done, total));
    };
    convert(
        &fixtures().join("models").join(model),
        &out,
        &options,
        &record,
    )
    .unwrap();
    (events.into_inner().unwrap(), out)
}

/// Per phase: the index of its first report, the largest `done`, and its totals.
fn by_phase(events: &[(Phase, u64, u64)]) -> HashMap<Phase, (usize, u64, Vec<u64>)> {
    let mut phases: HashMap<Phase, (usize, u64, Vec<u64>)> = HashMap::new();
    for (i, &(phase, done, total)) in events.iter().enumerate() {
        let entry = phases.entry(phase).or_insert((i, 0, Vec::new()));
        entry.1 = entry.1.max(done);
        if !entry.2.contains(&total) {
            entry.2.push(total);
        }
        assert!(done <= total, "{phase:?}: {done} of {total}");
    }
    phases
}

#[test]
fn convert_reports_each_phase_with_totals_that_match_the_work() {
    for (model, gated) in [("llama-silu", true), ("opt-relu", false)] {
        // A limit above what the text gives: the total must be the text's tokens.
        let (events, out) = convert_recording(model, 100_000);
        let phases = by_phase(&events);
        let file = PackedFile::open(&out).unwrap();
        let manifest = &file.manifest;
        let layers = file.config.num_layers as u64;
        let tokens = manifest.calibration.as_ref().unwrap().tokens;
        assert!(tokens > 300 && tokens < 100_000, "{model}: {tokens} tokens");

        let (first_cal, done, totals) = &phases[&Phase::Calibrating];
        assert_eq!(
            (*done, totals.as_slice()),
            (tokens, &[tokens][..]),
            "{model}"
        );
        // Tokens are reported as they are done, not all at once.
        let calibrating: Vec<u64> = events
            .iter()
            .filter(|e| e.0 == Phase::Calibrating)
            .map(|e| e.1)
            .collect();
        assert!(calibrating.len() > 1, "{model}: {calibrating:?}");
        assert!(
            calibrating.windows(2).all(|w| w[0] < w[1]),
            "{calibrating:?}"
        );

        let mut order = vec![*first_cal];
        let layer_phases: &[Phase] = if gated {
            &[Phase::Thresholds, Phase::Statistics, Phase::Training]
        } else {
            // ReLU: firing is exact, no thresholds to choose.
            assert!(!phases.contains_key(&Phase::Thresholds), "{model}");
            &[Phase::Statistics, Phase::Training]
        };
        for phase in layer_phases {
            let (first, done, totals) = &phases[phase];
            assert_eq!(
                (*done, totals.as_slice()),
                (layers, &[layers][..]),
                "{phase:?}"
            );
            order.push(*first);
        }
        let (first_write, written, totals) = &phases[&Phase::Writing];
        assert_eq!(totals.len(), 1);
        assert_eq!(*written, totals[0], "{model}: writing ends at its total");
        assert!(*written > 0);
        order.push(*first_write);
        assert!(
            order.windows(2).all(|w| w[0] < w[1]),
            "{model}: phases out of order: {order:?}"
        );

        // Hashing counts the bytes of the files the manifest records.
        let source_bytes: u64 = manifest
            .provenance
            .source_files
            .iter()
            .map(|f| f.bytes)
            .sum();
        let (_, hashed, totals) = &phases[&Phase::Hashing];
        assert_eq!(
            (*hashed, totals.as_slice()),
            (source_bytes, &[source_bytes][..])
        );
        // The tensors written are the checkpoint's weights: every byte counted once.
        let weight_bytes: u64 = std::fs::read_dir(fixtures().join("models").join(model))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .map(|p| {
                let bytes = std::fs::read(&p).unwrap();
                let header = u64::from_le_bytes(bytes[..8].try_into().unwrap());
                bytes.len() as u64 - 8 - header
            })
            .sum();
        assert_eq!(*written, weight_bytes, "{model}");
    }
}

#[test]
fn a_token_limit_below_the_text_is_the_calibration_total() {
    let (events, _) = convert_recording("micro-llama", 200);
    let phases = by_phase(&events);
    let (_, done, totals) = &phases[&Phase::Calibrating];
    assert_eq!((*done, totals.as_slice()), (200, &[200u64][..]));
}

/// Runs `args` with stdout, stdin and stderr on a pseudo-terminal; returns the
/// transcript with carriage returns as newlines and escape sequences removed.
fn on_terminal(args: &[&str]) -> String {
    let quoted: Vec<String> = std::iter::once(BIN)
        .chain(args.iter().copied())
        .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
        .collect();
    let out = Command::new("script")
        .args(["-qefc", &quoted.join(" "), "/dev/null"])
        .env("COLUMNS", "160")
        .output()
        .expect("util-linux `script` makes the pseudo-terminal for this test");
    assert!(out.status.success(), "{args:?}: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "\n");
    let mut plain = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte.
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        plain.push(c);
    }
    plain
}

#[test]
fn convert_on_a_terminal_names_each_phase_and_a_pipe_gets_none() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.flashpack");
    let model = fixtures().join("models/llama-silu");
    let text = fixtures().join("text/train.txt");
    let args = [
        "convert",
        model.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--calib",
        text.to_str().unwrap(),
        "--calib-tokens",
        "2048",
    ];
    let shown = on_terminal(&args);
    for line in [
        "calibrating [",
        "2048/2048 tokens",
        "choosing thresholds [",
        "neuron statistics [",
        "training predictors [",
        "layer 4/4, done in",
        "writing [",
        "hashing sources [",
    ] {
        assert!(shown.contains(line), "no {line:?} in:\n{shown}");
    }
    assert!(shown.contains("wrote "), "{shown}");

    std::fs::remove_file(&out).unwrap();
    let piped = Command::new(BIN).args(args).output().unwrap();
    assert!(piped.status.success());
    let stderr = String::from_utf8_lossy(&piped.stderr);
    assert!(
        !stderr.contains('['),
        "progress drawn into a pipe:\n{stderr}"
    );
    assert!(!stderr.contains("calibrating ["), "{stderr}");
}

#[test]
fn eval_on_a_terminal_shows_its_scoring_and_ends_with_the_result() {
    let model = fixtures().join("models/llama-silu");
    let text = fixtures().join("text/heldout.txt");
    let shown = on_terminal(&[
        "eval",
        model.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--ctx",
        "64",
    ]);
    let bar = shown
        .lines()
        .find(|l| l.starts_with("scoring [") && l.contains(" tokens"))
        .unwrap_or_else(|| panic!("no scoring bar in:\n{shown}"));
    // "scoring [===] pos/len tokens ...": the length is the text's token count.
    let counts = bar.split("] ").nth(1).unwrap().split(' ').next().unwrap();
    let (_, len) = counts.split_once('/').unwrap();
    let piped = Command::new(BIN)
        .args([
            "eval",
            model.to_str().unwrap(),
            "--text",
            text.to_str().unwrap(),
        ])
        .args(["--ctx", "64", "--json"])
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&piped.stdout).unwrap();
    // Every token of the text is fed; the first of each window is not scored.
    let fed = json["tokens_scored"].as_u64().unwrap() + json["windows"].as_u64().unwrap();
    assert_eq!(len, fed.to_string(), "bar length vs tokens: {json}");
    assert!(shown.contains("perplexity"), "{shown}");
    assert!(
        !String::from_utf8_lossy(&piped.stderr).contains("scoring ["),
        "a bar drawn into a pipe"
    );
}
