//! Converts a Hugging Face checkpoint into a flashpack file, calibrating on
//! text so that the file carries predictors and runs in the `flash` mode:
//!
//! ```sh
//! cargo run --release --example convert [CHECKPOINT] [OUT] [CALIBRATION_TEXT]
//! ```
//!
//! Defaults: the fixture `fixtures/models/llama-silu`, a file in a temporary
//! directory removed at the end (give OUT to keep it), and the fixture text
//! `fixtures/text/train.txt` (its first 2,048 tokens). As
//! `flashpack convert CHECKPOINT -o OUT --calib TEXT --calib-tokens 2048`.
//! Progress goes to stderr; the summary is printed as JSON (the keys of
//! `flashpack convert --json`).

use std::path::PathBuf;
use std::process::ExitCode;

use flashpack::{convert, CalibrationOptions, CalibrationPlan, ConvertOptions, Phase};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let checkpoint: PathBuf = args.next().map_or_else(
        || concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/models/llama-silu").into(),
        PathBuf::from,
    );
    let out = args.next().map(PathBuf::from);
    let text: PathBuf = args.next().map_or_else(
        || concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/text/train.txt").into(),
        PathBuf::from,
    );
    // Without OUT, write into a temporary directory that is removed on exit.
    let temp = match out {
        Some(_) => None,
        None => match tempfile::tempdir() {
            Ok(dir) => Some(dir),
            Err(e) => {
                eprintln!("error: a temporary directory: {e}");
                return ExitCode::from(3);
            }
        },
    };
    let out = out.unwrap_or_else(|| temp.as_ref().unwrap().path().join("model.flashpack"));
    match run(&checkpoint, &out, text) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_class().code() as u8)
        }
    }
}

fn run(
    checkpoint: &std::path::Path,
    out: &std::path::Path,
    text: PathBuf,
) -> flashpack::Result<()> {
    let options = ConvertOptions {
        // Calibration decides the hot-first neuron order, the SiLU thresholds
        // and the predictors the flash mode reads by.
        calibration: Some(CalibrationPlan {
            files: vec![text],
            calibrate: CalibrationOptions {
                max_tokens: 2048,
                ..CalibrationOptions::default()
            },
            ..CalibrationPlan::default()
        }),
        // Keep the checkpoint's dtypes, no block quantization, zstd level 3.
        ..ConvertOptions::default()
    };
    // Called from several threads with each phase's progress; a phase ends
    // with done == total.
    let progress = |phase: Phase, done: u64, total: u64| {
        if done == total {
            let unit = format!("{:?}", phase.unit()).to_lowercase();
            eprintln!("{}: {total} {unit} done", phase.describe());
        }
    };
    let summary = convert(checkpoint, out, &options, &progress)?;
    eprintln!(
        "wrote {} ({} bytes, {} predictors)",
        summary.output.display(),
        summary.file_bytes,
        summary.predictors.len()
    );
    println!(
        "{}",
        serde_json::to_string_pretty(&summary).expect("a summary serializes")
    );
    Ok(())
}
