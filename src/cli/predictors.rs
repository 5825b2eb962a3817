//! `flashpack predictors train <FILE> --calib ...`: retrain the sparsity
//! predictors of a packed file on new calibration text, without reconverting.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::cli::convert::CalibArgs;
use crate::cli::Output;
use crate::pack::retrain::retrain_predictors;

#[derive(Debug, Args)]
pub struct PredictorsArgs {
    #[command(subcommand)]
    pub command: PredictorsCommand,
}

#[derive(Debug, Subcommand)]
pub enum PredictorsCommand {
    /// Calibrate on text and replace the file's predictors and calibration statistics.
    #[command(
        after_help = "The neuron order stays as packed; every other section is copied \
byte for byte (its hash checked on the way). The result replaces FILE atomically unless -o \
names another file.\n\nExample:\n  flashpack predictors train model.flashpack --calib more-text.txt --rank 64"
    )]
    Train(TrainArgs),
}

#[derive(Debug, Args)]
#[command(mut_arg("calib", |a| a.required(true)))]
pub struct TrainArgs {
    /// A flashpack file.
    pub file: PathBuf,
    /// Write the result here instead of replacing FILE.
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    #[command(flatten)]
    pub calib: CalibArgs,
}

pub fn run(args: &PredictorsArgs, out: &Output) -> anyhow::Result<()> {
    let PredictorsCommand::Train(args) = &args.command;
    let Some(plan) = args.calib.plan()? else {
        return Err(
            crate::Error::InvalidArgument("predictors train needs --calib FILE...".into()).into(),
        );
    };
    let bars = crate::cli::progress::PhaseBars::on_terminal();
    let summary = retrain_predictors(
        &args.file,
        args.output.as_deref(),
        &plan,
        &|phase, done, total| bars.report(phase, done, total),
    )?;
    let output = args.output.as_ref().unwrap_or(&args.file);
    out.human(format_args!(
        "wrote {} ({} bytes): calibrated on {} tokens in {:.1}s, trained in {:.1}s",
        output.display(),
        summary.file_bytes,
        summary.calibration_tokens,
        summary.calibrate_ms / 1e3,
        summary.train_ms / 1e3
    ));
    crate::cli::convert::print_predictor_table(out, &summary.predictors);
    out.json_result(&summary)
}
