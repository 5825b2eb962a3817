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
mod chat;
mod convert;
mod eval;
mod inspect;
mod predictors;
mod progress;
mod run;
mod serve;
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
                  each token needs (the \"LLM in a flash\" technique). FFN activations \
                  (config.json's hidden_act): relu, silu (swish), gelu, gelu_pytorch_tanh, \
                  and those of sparse checkpoints: ProSparse's fatrelu with \
                  hidden_act_param (SparseLlamaForCausalLM) and Bamboo / TurboSparse-Mistral's \
                  dReLU (BambooForCausalLM, relu on gate and up).",
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
    /// Chat with the model through its chat template, one user turn per line of input.
    Chat(chat::ChatArgs),
    /// An OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions).
    Serve(serve::ServeArgs),
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

/// A check that ran and failed (exit 1). `report`: the command's result object
/// (e.g. `verify`'s failure list); under `--json` its fields are printed beside
/// `error` and `exit_code` in the one error object.
#[derive(Debug)]
pub struct CheckFailed {
    pub message: String,
    pub report: Option<serde_json::Value>,
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
            write_stdout(&format!("{line}\n"));
        }
    }

    /// Prints the command's JSON result (only under `--json`).
    pub fn json_result<T: serde::Serialize>(&self, value: &T) -> anyhow::Result<()> {
        if self.json {
            print_json(&serde_json::to_value(value)?);
        }
        Ok(())
    }
}

/// Writes to stdout and flushes. A reader that closed the pipe (`| head`) has
/// stopped reading, which is a normal way to end: temporary files are removed
/// and the program exits quietly with 0 instead of failing or panicking.
pub(crate) fn write_stdout(text: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush());
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => exit_quietly(),
        Err(e) => {
            // Nowhere left to report on stdout; stderr still works.
            eprintln!("error: writing to stdout: {e}");
            crate::cleanup::remove_all();
            std::process::exit(ExitClass::Environment.code());
        }
    }
}

/// Ends the program after the reader of stdout went away.
fn exit_quietly() -> ! {
    crate::cleanup::remove_all();
    std::process::exit(0)
}

/// Every JSON object goes through here, success or error: one object, pretty
/// printed, on stdout.
fn print_json(value: &serde_json::Value) {
    let text = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
    write_stdout(&format!("{text}\n"));
}

/// The error object of `--json`: `error` and `exit_code`, plus the fields of a
/// failed check's report.
fn error_object(message: &str, code: i32, report: Option<&serde_json::Value>) -> serde_json::Value {
    let mut object = serde_json::Map::new();
    if let Some(serde_json::Value::Object(fields)) = report {
        object.extend(fields.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    object.insert("error".into(), message.into());
    object.insert("exit_code".into(), code.into());
    serde_json::Value::Object(object)
}

/// Whether `--json` was on the command line, for the exits that come before or
/// outside parsing (usage errors, an interrupt). Arguments after `--` are values.
fn json_requested() -> bool {
    std::env::args_os()
        .skip(1)
        .take_while(|a| a != "--")
        .any(|a| a == "--json")
}

/// What the command has done so far, said when it is interrupted.
type InterruptSummary = Box<dyn Fn() -> String + Send>;
static INTERRUPT_SUMMARY: std::sync::Mutex<Option<InterruptSummary>> = std::sync::Mutex::new(None);

/// Sets what an interrupt (Ctrl-C) reports besides exiting with 130, e.g. how
/// many tokens were generated.
pub(crate) fn set_interrupt_summary(summary: impl Fn() -> String + Send + 'static) {
    if let Ok(mut s) = INTERRUPT_SUMMARY.lock() {
        *s = Some(Box::new(summary));
    }
}

/// Exit code of an interrupt (SIGINT/SIGTERM), as shells report 128 + SIGINT.
pub const INTERRUPTED_EXIT: i32 = 130;

/// Runs the CLI and returns the documented exit code.
pub fn main() -> ExitCode {
    let json = json_requested();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return clap_exit(e, json),
    };
    let out = Output { json: cli.json };
    // A signal skips destructors: remove temporary outputs and calibration data
    // ourselves, then exit as a shell expects after SIGINT.
    let _ = ctrlc::set_handler(move || {
        crate::cleanup::remove_all();
        let summary = INTERRUPT_SUMMARY
            .try_lock()
            .ok()
            .and_then(|s| s.as_ref().map(|f| f()));
        let message = match &summary {
            Some(s) => format!("interrupted: {s}"),
            None => "interrupted".to_string(),
        };
        eprintln!("{message}; temporary files removed");
        if json {
            print_json(&error_object(&message, INTERRUPTED_EXIT, None));
        }
        std::process::exit(INTERRUPTED_EXIT);
    });
    let result = match &cli.command {
        Command::Inspect(args) => inspect::run(args, &out),
        Command::Run(args) => run::run(args, &out),
        Command::Chat(args) => chat::run(args, &out),
        Command::Serve(args) => serve::run(args, &out),
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
            if out.json {
                let report = err
                    .downcast_ref::<CheckFailed>()
                    .and_then(|c| c.report.as_ref());
                print_json(&error_object(&message, code, report));
            }
            ExitCode::from(code as u8)
        }
    }
}

/// Help, version and usage errors from the argument parser. Without `--json`
/// clap prints them itself; with it, help and version are a JSON object too and
/// a usage error is the error object (exit 2), its text also on stderr.
fn clap_exit(e: clap::Error, json: bool) -> ExitCode {
    use clap::error::ErrorKind;
    let code = e.exit_code().clamp(0, 255);
    if !json {
        let _ = e.print();
        return ExitCode::from(code as u8);
    }
    let text = e.render().to_string();
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            if code == 0 =>
        {
            print_json(&serde_json::json!({ "help": text }));
        }
        ErrorKind::DisplayVersion => {
            print_json(&serde_json::json!({ "version": text.trim() }));
        }
        _ => {
            eprint!("{text}");
            // The first line says what is wrong ("error: unexpected argument ...").
            let message = text
                .lines()
                .next()
                .unwrap_or("invalid usage")
                .trim_start_matches("error: ")
                .to_string();
            print_json(&error_object(&message, code, None));
        }
    }
    ExitCode::from(code as u8)
}

/// The error message: the library's errors already name their cause in their
/// own text, so their source chain is not appended again.
fn describe(err: &anyhow::Error) -> String {
    match err.downcast_ref::<Error>() {
        Some(Error::InvalidOption { option, problem }) => format!("{} {problem}", flag_of(option)),
        Some(e) => e.to_string(),
        None => format!("{err:#}"),
    }
}

/// The flag of a library option (`dram_budget` is `--dram-budget`).
fn flag_of(option: &str) -> String {
    match option {
        "verify_reads" => "--no-verify-reads".to_string(),
        "context" => "--ctx".to_string(),
        "alignment" => "--align".to_string(),
        "repetition_penalty" => "--repeat-penalty".to_string(),
        o => format!("--{}", o.replace('_', "-")),
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
