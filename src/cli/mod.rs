//! The `flashpack` command line: argument parsing, output conventions and exit
//! codes. Each subcommand is a small file that calls the library.
//!
//! Conventions every command follows:
//! - `--json`: stdout is exactly one JSON object (also on failure: `error` and
//!   `exit_code`); human output and progress go to stderr.
//! - Exit codes: 0 success, 1 a check failed, 2 bad usage or invalid input,
//!   3 an I/O or environment failure.

mod bench;
mod calibrate;
mod convert;
mod eval;
mod inspect;
mod predictors;
mod run;
mod verify;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::error::{Error, ExitClass};

const AFTER_HELP: &str = "\
Exit codes:
  0  success
  1  a check failed (verify, a quality gate)
  2  bad usage or invalid input (a file that does not parse or breaks a rule)
  3  an I/O or environment failure (disk full, permission, read error)";

#[derive(Debug, Parser)]
#[command(
    name = "flashpack",
    version,
    about = "Run language models larger than DRAM from flash storage",
    long_about = "flashpack reads Hugging Face checkpoints (OPT and the Llama family), \
                  and runs them with the FFN weights on flash, reading only the neurons \
                  each token needs (the \"LLM in a flash\" technique).",
    after_help = AFTER_HELP
)]
pub struct Cli {
    /// Print exactly one JSON object on stdout (human output goes to stderr).
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Describe a Hugging Face checkpoint: architecture, sizes, parameter counts, dtypes.
    Inspect(inspect::InspectArgs),
    /// Generate text from a prompt, streamed to stdout.
    Run(run::RunArgs),
    /// Perplexity of a text file.
    Eval(eval::EvalArgs),
    /// Prefill / decode speed and memory bandwidth (a measurement, not a test).
    Bench(bench::BenchArgs),
    /// Convert a Hugging Face checkpoint into a flashpack file.
    Convert(convert::ConvertArgs),
    /// Check a flashpack file: every hash and rule, optionally its weights against the source.
    Verify(verify::VerifyArgs),
    /// Run the model over calibration text and report per-layer FFN sparsity.
    Calibrate(calibrate::CalibrateArgs),
    /// Sparsity predictors of a packed file (`predictors train`).
    Predictors(predictors::PredictorsArgs),
}

/// A check that ran and failed (exit 1). `reported`: the command already printed
/// its JSON result, so no error object follows it.
#[derive(Debug)]
pub struct CheckFailed {
    pub message: String,
    pub reported: bool,
}

impl std::fmt::Display for CheckFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CheckFailed {}

/// Output destination shared by commands: human text or one JSON object.
pub struct Output {
    pub json: bool,
}

impl Output {
    /// Prints a human line: to stdout normally, to stderr under `--json`.
    pub fn human(&self, line: impl std::fmt::Display) {
        if self.json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    }

    /// Prints the command's JSON result (only under `--json`).
    pub fn json_result<T: serde::Serialize>(&self, value: &T) -> anyhow::Result<()> {
        if self.json {
            println!("{}", serde_json::to_string_pretty(value)?);
        }
        Ok(())
    }
}

/// Runs the CLI and returns the documented exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // clap prints help/version (exit 0) and usage errors (exit 2) itself.
            let _ = e.print();
            return ExitCode::from(e.exit_code().clamp(0, 255) as u8);
        }
    };
    let out = Output { json: cli.json };
    // A signal skips destructors: remove temporary outputs and calibration data
    // ourselves, then exit as a shell expects after SIGINT.
    let _ = ctrlc::set_handler(|| {
        crate::cleanup::remove_all();
        eprintln!("interrupted: temporary files removed");
        std::process::exit(130);
    });
    let result = match &cli.command {
        Command::Inspect(args) => inspect::run(args, &out),
        Command::Run(args) => run::run(args, &out),
        Command::Eval(args) => eval::run(args, &out),
        Command::Bench(args) => bench::run(args, &out),
        Command::Convert(args) => convert::run(args, &out),
        Command::Verify(args) => verify::run(args, &out),
        Command::Predictors(args) => predictors::run(args, &out),
        Command::Calibrate(args) => calibrate::run(args, &out),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let code = exit_code_of(&err);
            let message = describe(&err);
            eprintln!("error: {message}");
            let reported = err
                .downcast_ref::<CheckFailed>()
                .is_some_and(|c| c.reported);
            if out.json && !reported {
                let object = serde_json::json!({ "error": message, "exit_code": code });
                println!("{object}");
            }
            ExitCode::from(code as u8)
        }
    }
}

/// The error message: the library's errors already name their cause in their
/// own text, so their source chain is not appended again.
fn describe(err: &anyhow::Error) -> String {
    match err.downcast_ref::<Error>() {
        Some(e) => e.to_string(),
        None => format!("{err:#}"),
    }
}

/// Maps an error to its exit code: the library's own classification where the error
/// came from the library, 3 for raw I/O, 2 for anything else (usage).
fn exit_code_of(err: &anyhow::Error) -> i32 {
    for cause in err.chain() {
        if cause.downcast_ref::<CheckFailed>().is_some() {
            return ExitClass::CheckFailed.code();
        }
        if let Some(e) = cause.downcast_ref::<Error>() {
            return e.exit_class().code();
        }
        if cause.downcast_ref::<std::io::Error>().is_some() {
            return ExitClass::Environment.code();
        }
    }
    ExitClass::InvalidInput.code()
}
