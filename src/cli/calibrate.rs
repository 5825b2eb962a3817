//! `flashpack calibrate <MODEL> --calib FILE...`: run the dense model over
//! calibration text and report, per layer, how sparse and how correlated from
//! token to token the FFN activity is (what sizes the runtime's window cache).
//! `convert --calib` runs the same calibration and then trains predictors.

use std::path::PathBuf;

use clap::Args;

use crate::cli::Output;
use crate::error::Error;
use crate::predictor::calibrate::{calibrate, Calibration, CalibrationOptions, LayerStats};
use crate::predictor::thresholds::Allocation;
use crate::runtime::ffn::Criterion;
use crate::runtime::open::{load_packed, Values};
use crate::runtime::perplexity::perplexity;
use crate::runtime::sparse::{apply_ffn_mode, FfnMode, Selector, SparsityData};
use crate::runtime::Model;

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
    /// SiLU models: the same fraction in every layer (`uniform`, measured
    /// better on a real model) or shared by least output error (`greedy`).
    #[arg(long, value_enum, default_value = "uniform")]
    pub sparsity_allocation: Allocation,
    /// SiLU models: also report the perplexity of this held-out text, dense and
    /// with the oracle's thresholds at model-wide sparsity 0.3, 0.4, 0.5, 0.6, 0.7
    /// (the trade-off to choose `--target-sparsity` from).
    #[arg(long, value_name = "FILE")]
    pub heldout: Option<PathBuf>,
}

#[derive(serde::Serialize)]
struct CalibrateReport {
    model: String,
    calibration_tokens: usize,
    elapsed_ms: f64,
    tokens_per_s: f64,
    layers: Vec<LayerStats>,
    /// A mixture of experts: how often each expert was chosen per sparse
    /// layer (what `convert --calib` stores, spec 5.1).
    #[serde(skip_serializing_if = "Option::is_none")]
    routing: Option<RoutingSummary>,
    trace_dir: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    heldout: Option<Tradeoff>,
}

pub fn run(args: &CalibrateArgs, out: &Output) -> anyhow::Result<()> {
    if args.calib_tokens == 0 {
        return Err(
            Error::InvalidArgument("--calib-tokens must be at least 1 (it is 0)".into()).into(),
        );
    }
    let opts = CalibrationOptions {
        max_tokens: args.calib_tokens,
        target_sparsity: args.target_sparsity,
        allocation: args.sparsity_allocation,
        keep_trace: args.keep_trace.clone(),
        ..CalibrationOptions::default()
    };
    let heldout_text = match &args.heldout {
        Some(p) => Some(
            String::from_utf8(std::fs::read(p).map_err(|e| Error::io(p, e))?)
                .map_err(|_| Error::InvalidArgument(format!("{}: not UTF-8 text", p.display())))?,
        ),
        None => None,
    };
    let bars = crate::cli::progress::PhaseBars::on_terminal();
    let started = std::time::Instant::now();
    if let Some(loaded) = moe_model(&args.model)? {
        return routing_report(args, out, loaded, &bars, started);
    }
    let (cal, heldout) = if args.model.is_file() {
        let file = crate::format::PackedFile::open(&args.model)?;
        let (weights, model, tokenizer) = load_packed(&file, Values::Dequantized)?;
        let load = || crate::runtime::Model::load(&file.config, &file.names, &weights);
        let cal = calibrate(
            &model,
            &file.names,
            &weights,
            &tokenizer,
            &args.calib,
            &opts,
            &|phase, done, total| bars.report(phase, done, total),
        )?;
        let heldout = match &heldout_text {
            Some(text) => {
                let ids = tokenizer.encode(text)?;
                drop(model);
                Some(tradeoff(&load, &cal, &ids, args, out)?)
            }
            None => None,
        };
        (cal, heldout)
    } else {
        let ckpt = crate::input::Checkpoint::open(&args.model)?;
        let load = || crate::runtime::Model::from_checkpoint(&ckpt);
        let model = load()?;
        let tokenizer = ckpt.tokenizer()?;
        let cal = calibrate(
            &model,
            &ckpt.names,
            &ckpt,
            &tokenizer,
            &args.calib,
            &opts,
            &|phase, done, total| bars.report(phase, done, total),
        )?;
        let heldout = match &heldout_text {
            Some(text) => {
                let ids = tokenizer.encode(text)?;
                drop(model);
                Some(tradeoff(&load, &cal, &ids, args, out)?)
            }
            None => None,
        };
        (cal, heldout)
    };
    let seconds = started.elapsed().as_secs_f64();
    out.human(format_args!(
        "calibrated {} on {} tokens in {seconds:.1}s ({:.0} tokens/s)",
        args.model.display(),
        cal.tokens,
        cal.tokens as f64 / seconds
    ));
    out.human("  layer  active/token  window max (K = 1, 2, 4, 8)  threshold");
    for (i, l) in cal.layers.iter().enumerate() {
        out.human(format_args!(
            "  {i:>5}  {:>11.2}%  {:<28}  {}",
            100.0 * l.mean_active_fraction,
            format!("{:?}", l.window_max),
            match (l.product_threshold, l.silu_threshold) {
                (Some(t), _) => format!("|silu(g)*u| > {t:.5}"),
                (None, Some(t)) => format!("|silu(g)| > {t:.4}"),
                (None, None) => "-".to_string(),
            }
        ));
    }
    if let Some(h) = &heldout {
        out.human(format_args!(
            "held-out perplexity ({} tokens, {:?} allocation): dense {:.4}",
            h.tokens_scored, h.allocation, h.dense_perplexity
        ));
        for p in &h.points {
            out.human(format_args!(
                "  sparsity {:.2}: perplexity {:.4} ({:+.2}% vs dense), neurons computed {:.1}%",
                p.target_sparsity,
                p.perplexity,
                100.0 * (p.perplexity / h.dense_perplexity - 1.0),
                100.0 * p.active_fraction
            ));
        }
    }
    out.json_result(&CalibrateReport {
        model: args.model.display().to_string(),
        calibration_tokens: cal.tokens,
        elapsed_ms: seconds * 1e3,
        tokens_per_s: cal.tokens as f64 / seconds,
        layers: cal.layers.clone(),
        routing: None,
        trace_dir: args.keep_trace.as_ref().map(|d| d.display().to_string()),
        heldout,
    })
}

#[derive(serde::Serialize)]
struct RoutingSummary {
    tokens: u64,
    layers: Vec<crate::format::layout::RoutingLayer>,
}

/// A mixture-of-experts model with its tokenizer, or `None` for a dense model.
fn moe_model(
    path: &std::path::Path,
) -> anyhow::Result<Option<(Model, crate::input::TextTokenizer)>> {
    if path.is_file() {
        let file = crate::format::PackedFile::open(path)?;
        if file.config.moe.is_none() {
            return Ok(None);
        }
        let (_, model, tokenizer) = load_packed(&file, Values::Dequantized)?;
        Ok(Some((model, tokenizer)))
    } else {
        let ckpt = crate::input::Checkpoint::open(path)?;
        if ckpt.config.moe.is_none() {
            return Ok(None);
        }
        Ok(Some((Model::from_checkpoint(&ckpt)?, ckpt.tokenizer()?)))
    }
}

/// `calibrate` of a mixture of experts: its routing counts (what `convert
/// --calib` stores; no neuron statistics in this version).
fn routing_report(
    args: &CalibrateArgs,
    out: &Output,
    (model, tokenizer): (Model, crate::input::TextTokenizer),
    bars: &crate::cli::progress::PhaseBars,
    started: std::time::Instant,
) -> anyhow::Result<()> {
    if args.keep_trace.is_some() || args.heldout.is_some() {
        return Err(Error::InvalidArgument(
            "a mixture-of-experts model's calibration records routing only: --keep-trace and --heldout do not apply".into(),
        )
        .into());
    }
    let routing = crate::predictor::routing::routing_statistics(
        &model,
        &tokenizer,
        &args.calib,
        args.calib_tokens,
        CalibrationOptions::default()
            .ctx
            .min(model.config.max_context),
        &|phase, done, total| bars.report(phase, done, total),
    )?;
    let seconds = started.elapsed().as_secs_f64();
    out.human(format_args!(
        "routed {} on {} tokens in {seconds:.1}s ({:.0} tokens/s); share of each sparse layer's choices, hottest first:",
        args.model.display(),
        routing.tokens,
        routing.tokens as f64 / seconds
    ));
    for l in &routing.layers {
        let total = l.counts.iter().sum::<u64>().max(1) as f64;
        let shares: Vec<String> = l
            .hottest_first()
            .iter()
            .map(|&e| format!("{e}:{:.1}%", 100.0 * l.counts[e] as f64 / total))
            .collect();
        out.human(format_args!("  layer {:>3}: {}", l.layer, shares.join(" ")));
    }
    out.json_result(&CalibrateReport {
        model: args.model.display().to_string(),
        calibration_tokens: routing.tokens as usize,
        elapsed_ms: seconds * 1e3,
        tokens_per_s: routing.tokens as f64 / seconds,
        layers: Vec::new(),
        routing: Some(RoutingSummary {
            tokens: routing.tokens,
            layers: routing.layers,
        }),
        trace_dir: None,
        heldout: None,
    })
}

/// Model-wide sparsity levels of the held-out trade-off.
const TRADEOFF_SPARSITY: [f64; 5] = [0.3, 0.4, 0.5, 0.6, 0.7];

/// Held-out perplexity, dense and at each sparsity of [`TRADEOFF_SPARSITY`].
#[derive(serde::Serialize)]
struct Tradeoff {
    allocation: Allocation,
    tokens_scored: usize,
    dense_perplexity: f64,
    points: Vec<TradeoffPoint>,
}

#[derive(serde::Serialize)]
struct TradeoffPoint {
    target_sparsity: f64,
    perplexity: f64,
    /// Fraction of FFN neurons computed on the held-out text.
    active_fraction: f64,
}

fn tradeoff(
    load: &dyn Fn() -> crate::Result<Model>,
    cal: &Calibration,
    ids: &[u32],
    args: &CalibrateArgs,
    out: &Output,
) -> anyhow::Result<Tradeoff> {
    if cal.curves.is_empty() {
        return Err(Error::InvalidArgument(
            "--heldout reports the sparsity trade-off of SiLU models; this model has none to choose"
                .into(),
        )
        .into());
    }
    let ctx = 256.min(load()?.config.max_context);
    let dense = perplexity(&load()?, ids, ctx)?;
    out.human(format_args!(
        "held-out dense perplexity {:.4}",
        dense.perplexity
    ));
    let mut points = Vec::new();
    for s in TRADEOFF_SPARSITY {
        let thresholds = cal
            .thresholds_for(s, args.sparsity_allocation)
            .expect("curves checked above");
        let mut model = load()?;
        let data = SparsityData {
            predictors: vec![None; thresholds.len()],
            silu_thresholds: thresholds.into_iter().map(Some).collect(),
            silu_criterion: Criterion::Product,
            selector: Selector::Trained,
            measure_selector: false,
            copies: Vec::new(),
        };
        let counter = apply_ffn_mode(&mut model, FfnMode::Oracle, Some(&data))?
            .expect("oracle counts neurons");
        let r = perplexity(&model, ids, ctx)?;
        out.human(format_args!(
            "held-out perplexity at sparsity {s:.2}: {:.4}",
            r.perplexity
        ));
        points.push(TradeoffPoint {
            target_sparsity: s,
            perplexity: r.perplexity,
            active_fraction: counter.active_fraction(),
        });
    }
    Ok(Tradeoff {
        allocation: args.sparsity_allocation,
        tokens_scored: dense.tokens_scored,
        dense_perplexity: dense.perplexity,
        points,
    })
}
