//! `flashpack verify <FILE> [--against <HF_DIR>]`: every hash, every rule, and
//! optionally the packed weights against the checkpoint they came from. The
//! checks are the library's ([`crate::pack::verify`]); this command parses the
//! flags and reports.

use std::path::{Path, PathBuf};

use clap::Args;

use crate::cli::Output;
use crate::pack::verify::{VerifyReport, CHECK_PROMPTS};

pub use crate::cli::CheckFailed;

#[derive(Debug, Args)]
#[command(
    after_help = "Exit codes: 0 all checks hold; 1 a check failed (the failure names the section \
and chunk); 2 the file cannot be parsed or breaks a structural rule; 3 an I/O failure.\n\n\
Example:\n  flashpack verify opt-relu.flashpack --against fixtures/models/opt-relu --json"
)]
pub struct VerifyArgs {
    /// A flashpack file.
    pub file: PathBuf,
    /// The Hugging Face checkpoint it was converted from: also check that every
    /// packed weight equals the source's (after the recorded order and dtype).
    #[arg(long)]
    pub against: Option<PathBuf>,
    /// Calibration text on which to re-measure every predictor's recall.
    #[arg(long = "calib", value_name = "FILE", num_args = 1..)]
    pub calib: Vec<PathBuf>,
    /// With --calib: the recall each layer's predictor must reach on that text.
    #[arg(long, default_value_t = 0.95)]
    pub min_recall: f64,
    /// With --calib: most calibration tokens to use.
    #[arg(long, default_value_t = 4096)]
    pub calib_tokens: usize,
    /// With --against, a quantized file (format section 9): held-out text on
    /// which to compare the perplexity of the packed model with the source's
    /// (windows of 256 tokens).
    #[arg(long = "text", value_name = "FILE")]
    pub text: Option<PathBuf>,
}

pub fn run(args: &VerifyArgs, out: &Output) -> anyhow::Result<()> {
    if args.text.is_some() && args.against.is_none() {
        return Err(crate::Error::InvalidArgument(
            "--text compares perplexity with the source: it needs --against".into(),
        )
        .into());
    }
    let mut report = verify_file(
        &args.file,
        args.against.as_deref(),
        args.text.as_deref(),
        out,
    )?;
    if !args.calib.is_empty() {
        if !(args.min_recall > 0.0 && args.min_recall <= 1.0) {
            return Err(crate::Error::InvalidArgument(format!(
                "--min-recall {} must be in (0, 1]",
                args.min_recall
            ))
            .into());
        }
        crate::pack::verify::check_recall(
            &args.file,
            &mut report,
            &args.calib,
            args.min_recall,
            args.calib_tokens,
        )?;
        for m in &report.predictor_recall {
            out.human(format_args!(
                "predictor layer {}: recall {:.4} on the given text (predicted {:.1}%, truly active {:.1}%)",
                m.layer,
                m.recall,
                100.0 * m.frac_predicted,
                100.0 * m.frac_true
            ));
        }
    }
    if !report.ok {
        let message = format!(
            "{} check(s) failed: {}",
            report.failures.len(),
            report.failures.join("; ")
        );
        // Under --json the failure object carries the whole report.
        return Err(CheckFailed {
            message,
            report: Some(serde_json::to_value(&report)?),
        }
        .into());
    }
    out.json_result(&report)
}

/// Runs the library's checks of `path` (with `against`, and `text` for a
/// quantized file's perplexity) and prints what they found; failed checks are
/// in the report, errors are returned.
fn verify_file(
    path: &Path,
    against: Option<&Path>,
    text: Option<&Path>,
    out: &Output,
) -> anyhow::Result<VerifyReport> {
    let started = std::time::Instant::now();
    let report = crate::pack::verify::verify_file(path, against, text)?;
    print_report(
        &report,
        path,
        against.is_some(),
        text,
        started.elapsed(),
        out,
    );
    Ok(report)
}

/// The human lines of a report: quantization errors, perplexity and logits
/// against the source, each failure, and the summary line (`convert --verify`
/// prints them too).
pub(crate) fn print_report(
    report: &VerifyReport,
    path: &Path,
    against: bool,
    text: Option<&Path>,
    elapsed: std::time::Duration,
    out: &Output,
) {
    for e in &report.quant_errors {
        out.human(format_args!(
            "{} {}: NMSE {:.3e}",
            e.tensor, e.dtype, e.nmse
        ));
    }
    if let (Some(text), Some(source), Some(packed)) =
        (text, report.perplexity_source, report.perplexity_packed)
    {
        out.human(format_args!(
            "perplexity on {}: source {source:.4}, packed {packed:.4} ({:+.3}%)",
            text.display(),
            100.0 * (packed / source - 1.0)
        ));
    }
    if let Some(e) = report.logit_nmse {
        out.human(format_args!(
            "logits against the source: max NMSE {e:.3e} over {} prompts{}",
            CHECK_PROMPTS.len(),
            if report.logit_nmse_gated {
                String::new()
            } else if let Some(limit) = report.logit_nmse_limit {
                format!(" (quantized: limit {limit:e})")
            } else {
                " (not gated: the weights changed dtype)".into()
            }
        ));
    }
    for f in &report.failures {
        out.human(format_args!("FAIL {f}"));
    }
    out.human(format_args!(
        "{}: {} sections, {} chunks, {:.2} MiB hashed{} in {:.2}s: {}",
        path.display(),
        report.sections_checked,
        report.chunks_checked,
        report.hashed_bytes as f64 / (1024.0 * 1024.0),
        if against {
            format!(
                ", {} weights compared with the source",
                report.weights_compared
            )
        } else {
            String::new()
        },
        elapsed.as_secs_f64(),
        if report.ok { "OK" } else { "FAILED" }
    ));
}
