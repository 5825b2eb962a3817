//! `flashpack convert <HF_DIR> -o <OUT>`: checkpoint to packed file.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use crate::cli::Output;
use crate::dtype::DType;
use crate::pack::{convert, ConvertOptions, TargetDType};
use crate::predictor::calibrate::CalibrationOptions;
use crate::predictor::pipeline::CalibrationPlan;
use crate::predictor::train::{RankChoice, TrainOptions};

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
    /// Block-quantize weight matrices (format section 9): `q8` (q8_0) or `q4`
    /// (q4_1) for the embedding, attention, FFN bundles and an untied output
    /// projection, or per part: `ffn=q4,attn=q8,embed=q8,head=q8` (a part left
    /// out, or `none`, keeps --dtype). Norms, biases and predictors stay float;
    /// calibration runs on the checkpoint's own weights.
    #[arg(long, value_name = "POLICY")]
    pub quant: Option<String>,
    /// Low-precision copies of gate and up in the file (format section 10),
    /// from which `--ffn flash` and `predicted` choose neurons by
    /// `|silu(g) * u|`: `int4` (blocks of 32, f16 scales; 0.19 of the FFN's
    /// f16 bytes, held in DRAM), `int8` (0.33), `none`, or `auto`: int4 for a
    /// SiLU model with a gated FFN calibrated with --calib (measured on
    /// SmolLM2-135M, BENCHMARKS.md), none otherwise.
    #[arg(long, value_enum, default_value = "auto")]
    pub selector: crate::pack::convert::SelectorCopies,
    /// Check the written file (every hash and rule, and its weights against the
    /// checkpoint) before reporting success.
    #[arg(long)]
    pub verify: bool,
    #[command(flatten)]
    pub calib: CalibArgs,
}

/// Calibration and predictor training (shared by `convert` and `predictors train`).
#[derive(Debug, Clone, Args)]
pub struct CalibArgs {
    /// Calibration text files: run the model over them, order neurons hottest
    /// first and train one sparsity predictor per layer.
    #[arg(long = "calib", value_name = "FILE", num_args = 1..)]
    pub calib: Vec<PathBuf>,
    /// Most calibration tokens to use.
    #[arg(long, default_value_t = 16384)]
    pub calib_tokens: usize,
    /// Predictor rank for every layer, or `auto`: grow each layer's rank until it
    /// predicts at most 2x the neurons that truly fire.
    #[arg(long, default_value = "auto")]
    pub rank: String,
    /// Recall the per-layer thresholds must reach on held-out calibration tokens.
    #[arg(long, default_value_t = 0.99)]
    pub target_recall: f64,
    /// SiLU models: model-wide fraction of FFN activations the calibrated
    /// thresholds zero (by `|silu(gate . x) * (up . x)|`).
    #[arg(long, default_value_t = 0.5)]
    pub target_sparsity: f64,
    /// Seed of predictor training (same seed, same bytes, whatever the thread
    /// count), at most 2^53 - 1.
    #[arg(long, default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(..=crate::cli::run::MAX_JSON_SAFE_INTEGER))]
    pub seed: u64,
    /// Keep the calibration activation store (FFN inputs, per-token firing masks) here.
    #[arg(long, value_name = "DIR")]
    pub keep_trace: Option<PathBuf>,
    /// SiLU models: the same fraction in every layer (`uniform`, measured
    /// better on a real model) or shared by least output error (`greedy`).
    #[arg(long, value_enum, default_value = "uniform")]
    pub sparsity_allocation: crate::predictor::thresholds::Allocation,
}

impl CalibArgs {
    /// The calibration plan, or `None` without `--calib`.
    pub fn plan(&self) -> anyhow::Result<Option<CalibrationPlan>> {
        if self.calib.is_empty() {
            return Ok(None);
        }
        let rank = match self.rank.as_str() {
            "auto" => TrainOptions::default().rank,
            r => match r.parse::<usize>() {
                Ok(r) if r > 0 => RankChoice::Fixed(r),
                _ => {
                    return Err(crate::Error::InvalidArgument(format!(
                        "--rank {r:?} must be a positive number or auto"
                    ))
                    .into())
                }
            },
        };
        if !(self.target_recall > 0.0 && self.target_recall <= 1.0) {
            return Err(crate::Error::InvalidArgument(format!(
                "--target-recall {} must be in (0, 1]",
                self.target_recall
            ))
            .into());
        }
        Ok(Some(CalibrationPlan {
            files: self.calib.clone(),
            calibrate: CalibrationOptions {
                max_tokens: self.calib_tokens,
                target_sparsity: self.target_sparsity,
                allocation: self.sparsity_allocation,
                keep_trace: self.keep_trace.clone(),
                ..CalibrationOptions::default()
            },
            train: TrainOptions {
                rank,
                target_recall: self.target_recall,
                seed: self.seed,
                ..TrainOptions::default()
            },
        }))
    }
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
        calibration: args.calib.plan()?,
        quant: match &args.quant {
            Some(text) => crate::format::quant_policy::parse_policy(text)
                .map_err(|e| crate::Error::InvalidArgument(format!("--quant: {e}")))?,
            None => Default::default(),
        },
        selector: args.selector,
    };
    let bars = crate::cli::progress::PhaseBars::on_terminal();
    let started = std::time::Instant::now();
    let source = crate::input::hub::resolve_model(&args.model)?;
    // On an error the bars are dropped (and cleared) before main prints it.
    let summary = convert(&source, &args.output, &options, &|phase, done, total| {
        bars.report(phase, done, total)
    })?;
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
    if let Some(bits) = summary.selector {
        out.human(format_args!(
            "selector copies: {} ({:.2} MiB, {:.3} of the FFN's bytes)",
            crate::format::layout::SelectorType::from(bits).name(),
            mib(summary.selector_bytes),
            summary.selector_bytes as f64 / summary.ffn_bytes.max(1) as f64
        ));
    }
    if let (Some(tokens), Some(cal_ms), Some(train_ms)) = (
        summary.calibration_tokens,
        summary.calibrate_ms,
        summary.train_ms,
    ) {
        out.human(format_args!(
            "calibrated on {tokens} tokens in {:.1}s ({:.0} tokens/s); predictors trained in {:.1}s",
            cal_ms / 1e3,
            tokens as f64 / (cal_ms / 1e3),
            train_ms / 1e3
        ));
        print_predictor_table(out, &summary.predictors);
    }
    let verified = if args.verify {
        let started = std::time::Instant::now();
        let report = crate::pack::verify::verify_file(&args.output, Some(&source), None)?;
        crate::cli::verify::print_report(&report, &args.output, true, None, started.elapsed(), out);
        if !report.ok {
            let message = format!(
                "{} written but verification failed: {}",
                args.output.display(),
                report.failures.join("; ")
            );
            return Err(crate::cli::CheckFailed {
                message,
                report: Some(serde_json::to_value(&report)?),
            }
            .into());
        }
        Some(report)
    } else {
        None
    };
    let mut json = serde_json::to_value(&summary)?;
    json["elapsed_ms"] = (convert_s * 1e3).into();
    json["verified"] = verified.is_some().into();
    if let Some(report) = verified {
        json["verify"] = serde_json::to_value(&report)?;
    }
    out.json_result(&json)
}

/// The per-layer predictor table `convert --calib` and `predictors train` print.
pub fn print_predictor_table(out: &Output, predictors: &[crate::pack::convert::PredictorReport]) {
    if predictors.is_empty() {
        return;
    }
    out.human("  layer  rank  threshold  recall  precision  predicted  truly active  size/FFN  window max (1,2,4,8)");
    for p in predictors {
        out.human(format_args!(
            "  {:>5}  {:>4}  {:>9.3}  {:>6.4}  {:>9.3}  {:>8.1}%  {:>11.1}%  {:>7.2}%  {:?}",
            p.layer,
            p.rank,
            p.threshold,
            p.recall,
            p.precision,
            100.0 * p.frac_predicted,
            100.0 * p.frac_true,
            p.bytes_percent_of_ffn,
            p.window_max
        ));
    }
}
