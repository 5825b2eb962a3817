//! Verifies a flashpack file: every hash and rule of the format and, given
//! the checkpoint it came from, every packed weight and the logits against it:
//!
//! ```sh
//! cargo run --release --example verify [PACKED] [CHECKPOINT]
//! ```
//!
//! Defaults: `fixtures/broken/base.flashpack` (the valid base of the damaged
//! files there) against `fixtures/models/micro-llama`, which it was converted
//! from; give `-` as CHECKPOINT to check the file alone. As `flashpack verify
//! PACKED --against CHECKPOINT --json`: prints the report as JSON and exits
//! with 1 when a check failed (try `fixtures/broken/r14-dense-byte-flipped.flashpack`),
//! 2 for input that is not a flashpack file, 3 when the environment failed.

use std::path::PathBuf;
use std::process::ExitCode;

use flashpack::{verify, ExitClass, VerifyOptions};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let packed: PathBuf = args.next().map_or_else(
        || {
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/fixtures/broken/base.flashpack"
            )
            .into()
        },
        PathBuf::from,
    );
    let against = match args.next() {
        None => Some(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/models/micro-llama").into()),
        Some(dash) if dash == "-" => None,
        Some(path) => Some(PathBuf::from(path)),
    };
    let options = VerifyOptions {
        against,
        ..VerifyOptions::default()
    };
    match verify(&packed, &options) {
        // A damaged chunk or a weight that differs is a failed check in the
        // report, not an error.
        Ok(report) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&report).expect("a report serializes")
            );
            if report.ok {
                ExitCode::SUCCESS
            } else {
                for failure in &report.failures {
                    eprintln!("failed: {failure}");
                }
                ExitCode::from(ExitClass::CheckFailed.code() as u8)
            }
        }
        // A file that does not parse or breaks a structural rule.
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_class().code() as u8)
        }
    }
}
