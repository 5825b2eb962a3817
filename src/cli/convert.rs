//! `flashpack convert <HF_DIR> -o <OUT>`: checkpoint to packed file.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::{Args, ValueEnum};

use crate::cli::Output;
use crate::dtype::DType;
use crate::pack::{convert, ConvertOptions, TargetDType};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DTypeArg {
    /// Each tensor as the checkpoint stores it.
    Keep,
    F32,
    F16,
    Bf16,
}

#[derive(Debug, Args)]
#[command(
    after_help = "The output is written to a temporary file beside OUT and renamed into place \
only when complete and fsynced: an interrupted convert never leaves a file at OUT.\n\n\
Example:\n  flashpack convert fixtures/models/opt-relu -o opt-relu.flashpack --verify"
)]
pub struct ConvertArgs {
    /// A Hugging Face checkpoint directory.
    pub model: PathBuf,
    /// The packed file to write.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Storage dtype of the packed weights.
    #[arg(long, value_enum, default_value = "keep")]
    pub dtype: DTypeArg,
    /// zstd level (1-22) for the sections read whole (dense weights, tokenizer);
    /// 0 stores them uncompressed.
    #[arg(long, default_value_t = 3)]
    pub zstd_level: i32,
    /// Alignment of every section in bytes (power of two, 512 to 1 MiB); 16384 suits
    /// devices with 16 KiB pages.
    #[arg(long, default_value_t = 4096)]
    pub align: u64,
    /// Check the written file (every hash and rule, and its weights against the
    /// checkpoint) before reporting success.
    #[arg(long)]
    pub verify: bool,
}

pub fn run(args: &ConvertArgs, out: &Output) -> anyhow::Result<()> {
    let options = ConvertOptions {
        dtype: match args.dtype {
            DTypeArg::Keep => TargetDType::Keep,
            DTypeArg::F32 => TargetDType::To(DType::F32),
            DTypeArg::F16 => TargetDType::To(DType::F16),
            DTypeArg::Bf16 => TargetDType::To(DType::BF16),
        },
        zstd_level: args.zstd_level,
        alignment: args.align,
    };
    let bar = if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {bytes}/{total_bytes} ({eta})",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        bar.set_message("converting");
        Some(bar)
    } else {
        None
    };
    let progress = |done: u64, total: u64| {
        if let Some(bar) = &bar {
            bar.set_length(total);
            bar.set_position(done);
        }
    };
    let started = std::time::Instant::now();
    let summary = convert(&args.model, &args.output, &options, &progress)?;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let convert_s = started.elapsed().as_secs_f64();
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    out.human(format_args!(
        "wrote {} ({:.2} MiB: dense {:.2} MiB compressed from {:.2}, ffn {:.2} MiB, {} sections) in {:.2}s",
        summary.output.display(),
        mib(summary.file_bytes),
        mib(summary.dense_bytes),
        mib(summary.dense_raw_bytes),
        mib(summary.ffn_bytes),
        summary.sections,
        convert_s
    ));
    out.human(format_args!("manifest sha256 {}", summary.manifest_sha256));
    let verified = if args.verify {
        let report = crate::cli::verify::verify_file(&args.output, Some(&args.model), out)?;
        if !report.ok {
            let message = format!(
                "{} written but verification failed: {}",
                args.output.display(),
                report.failures.join("; ")
            );
            return Err(crate::cli::CheckFailed {
                message,
                reported: false,
            }
            .into());
        }
        Some(report)
    } else {
        None
    };
    let mut json = serde_json::to_value(&summary)?;
    json["convert_seconds"] = convert_s.into();
    json["verified"] = verified.is_some().into();
    if let Some(report) = verified {
        json["verify"] = serde_json::to_value(&report)?;
    }
    out.json_result(&json)
}
