//! `flashpack calibrate <MODEL> --calib FILE...`: run the dense model over
//! calibration text and report, per layer, how sparse and how correlated from
//! token to token the FFN activity is (what sizes the runtime's window cache).
//! `convert --calib` runs the same calibration and then trains predictors.

use std::path::PathBuf;

use clap::Args;

use crate::cli::Output;
use crate::predictor::calibrate::{calibrate, CalibrationOptions, LayerStats};
use crate::runtime::packed::PackedWeights;

#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  flashpack calibrate fixtures/models/opt-relu --calib fixtures/text/train.txt --keep-trace trace/"
)]
pub struct CalibrateArgs {
    /// A Hugging Face checkpoint directory or a flashpack file.
    pub model: PathBuf,
    /// Calibration text files.
    #[arg(long = "calib", value_name = "FILE", num_args = 1.., required = true)]
    pub calib: Vec<PathBuf>,
    /// Most calibration tokens to use.
    #[arg(long, default_value_t = 16384)]
    pub calib_tokens: usize,
    /// SiLU models: fraction of activations the calibrated threshold zeroes.
    #[arg(long, default_value_t = 0.5)]
    pub target_sparsity: f64,
    /// Keep the activation store (FFN inputs as f16, per-token firing bitsets) here.
    #[arg(long, value_name = "DIR")]
    pub keep_trace: Option<PathBuf>,
}

#[derive(serde::Serialize)]
struct CalibrateReport {
    model: String,
    tokens: usize,
    seconds: f64,
    tokens_per_s: f64,
    layers: Vec<LayerStats>,
    trace_dir: Option<String>,
}

pub fn run(args: &CalibrateArgs, out: &Output) -> anyhow::Result<()> {
    let opts = CalibrationOptions {
        max_tokens: args.calib_tokens,
        target_sparsity: args.target_sparsity,
        keep_trace: args.keep_trace.clone(),
        ..CalibrationOptions::default()
    };
    let started = std::time::Instant::now();
    let cal = if args.model.is_file() {
        let file = crate::format::PackedFile::open(&args.model)?;
        let weights = PackedWeights::read_all(&file)?;
        let model = crate::runtime::Model::load(&file.config, &file.names, &weights)?;
        let tokenizer = crate::runtime::packed::packed_tokenizer(&file)?;
        calibrate(
            &model,
            &file.names,
            &weights,
            &tokenizer,
            &args.calib,
            &opts,
            &|_, _| {},
        )?
    } else {
        let ckpt = crate::input::Checkpoint::open(&args.model)?;
        let model = crate::runtime::Model::from_checkpoint(&ckpt)?;
        calibrate(
            &model,
            &ckpt.names,
            &ckpt,
            &ckpt.tokenizer()?,
            &args.calib,
            &opts,
            &|_, _| {},
        )?
    };
    let seconds = started.elapsed().as_secs_f64();
    out.human(format_args!(
        "calibrated {} on {} tokens in {seconds:.1}s ({:.0} tokens/s)",
        args.model.display(),
        cal.tokens,
        cal.tokens as f64 / seconds
    ));
    out.human("  layer  active/token  window max (K = 1, 2, 4, 8)  silu threshold");
    for (i, l) in cal.layers.iter().enumerate() {
        out.human(format_args!(
            "  {i:>5}  {:>11.2}%  {:<28}  {}",
            100.0 * l.mean_active_fraction,
            format!("{:?}", l.window_max),
            l.silu_threshold
                .map_or("-".to_string(), |t| format!("{t:.4}"))
        ));
    }
    out.json_result(&CalibrateReport {
        model: args.model.display().to_string(),
        tokens: cal.tokens,
        seconds,
        tokens_per_s: cal.tokens as f64 / seconds,
        layers: cal.layers.clone(),
        trace_dir: args.keep_trace.as_ref().map(|d| d.display().to_string()),
    })
}
