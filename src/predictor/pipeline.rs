//! Calibrate, then train one predictor per layer: what `convert --calib` and
//! `predictors train` run. The result carries everything the packed file records:
//! the hot-first neuron orders, the predictors (in checkpoint neuron order; the
//! writer permutes them) and the calibration statistics.

use std::path::PathBuf;

use crate::error::Result;
use crate::input::tensors::ModelNames;
use crate::input::TextTokenizer;
use crate::predictor::calibrate::{calibrate, Calibration, CalibrationOptions};
use crate::predictor::train::{
    train_layer, LowRankPredictor, PredictorMetrics, TrainOptions, TrainingSet,
};
use crate::progress::{Phase, Progress, SILENT};
use crate::runtime::weights::TensorSource;
use crate::runtime::Model;

/// What to calibrate on and how to train: [`ConvertOptions::calibration`](crate::ConvertOptions::calibration).
/// `Default` has no files (give at least one) and the default options.
#[derive(Debug, Clone, Default)]
pub struct CalibrationPlan {
    /// Plain UTF-8 text files, read in order, tokenized with the model's
    /// tokenizer: text like what the model will run on (its activations
    /// decide the neuron order, the thresholds and the predictors).
    pub files: Vec<PathBuf>,
    /// How much text, and how SiLU thresholds are chosen.
    pub calibrate: CalibrationOptions,
    /// How each layer's predictor is trained.
    pub train: TrainOptions,
}

pub struct Trained {
    pub calibration: Calibration,
    /// Per layer, in checkpoint neuron order.
    pub predictors: Vec<(LowRankPredictor, PredictorMetrics)>,
    /// Per layer: packed position -> checkpoint neuron, hottest first.
    pub orders: Vec<Vec<u32>>,
    pub calibrate_seconds: f64,
    pub train_seconds: Vec<f64>,
}

/// Runs calibration over `plan.files` with the dense model, then trains each
/// layer's predictor from the activation store (one layer in memory at a time).
pub fn calibrate_and_train(
    model: &Model,
    names: &ModelNames,
    weights: &dyn TensorSource,
    tokenizer: &TextTokenizer,
    plan: &CalibrationPlan,
    progress: Progress<'_>,
) -> Result<Trained> {
    let started = std::time::Instant::now();
    let calibration = calibrate(
        model,
        names,
        weights,
        tokenizer,
        &plan.files,
        &plan.calibrate,
        progress,
    )?;
    let calibrate_seconds = started.elapsed().as_secs_f64();
    let mut predictors = Vec::new();
    let mut train_seconds = Vec::new();
    progress(Phase::Training, 0, model.config.num_layers as u64);
    for layer in 0..model.config.num_layers {
        let t = std::time::Instant::now();
        let (inputs, fired) = calibration.layer_data(layer)?;
        let set = TrainingSet {
            inputs: &inputs,
            fired: &fired,
            n: calibration.tokens,
            d: calibration.hidden,
            ffn: calibration.width,
        };
        let (predictor, metrics) = train_layer(&set, &plan.train)?;
        let seconds = t.elapsed().as_secs_f64();
        progress(
            Phase::Training,
            layer as u64 + 1,
            model.config.num_layers as u64,
        );
        train_seconds.push(seconds);
        predictors.push((predictor, metrics));
    }
    let orders = (0..model.config.num_layers)
        .map(|l| calibration.neuron_order(l))
        .collect();
    Ok(Trained {
        calibration,
        predictors,
        orders,
        calibrate_seconds,
        train_seconds,
    })
}

/// A stored predictor's recall measured on new calibration text.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MeasuredRecall {
    /// The layer (from 0).
    pub layer: usize,
    /// (token, neuron) pairs predicted and fired / pairs fired.
    pub recall: f64,
    /// Pairs predicted / all pairs.
    pub frac_predicted: f64,
    /// Pairs fired / all pairs.
    pub frac_true: f64,
}

/// Calibrates on `files` and measures each layer's predictor recall over all
/// calibration tokens (recall pooled over tokens: predicted and fired / fired).
/// `predictors[l]` must index neurons as the model's FFN does.
pub fn measure_recall(
    model: &Model,
    names: &ModelNames,
    weights: &dyn TensorSource,
    tokenizer: &TextTokenizer,
    files: &[PathBuf],
    opts: &CalibrationOptions,
    predictors: &[Option<LowRankPredictor>],
) -> Result<Vec<MeasuredRecall>> {
    let cal = calibrate(model, names, weights, tokenizer, files, opts, SILENT)?;
    let w = crate::predictor::calibrate::words(cal.width);
    let mut out = Vec::new();
    for (layer, p) in predictors.iter().enumerate() {
        let Some(p) = p else { continue };
        let (inputs, fired) = cal.layer_data(layer)?;
        let (mut scratch, mut logits, mut active) = (Vec::new(), Vec::new(), Vec::new());
        let (mut hit, mut truly, mut predicted) = (0u64, 0u64, 0u64);
        for t in 0..cal.tokens {
            p.predict(
                &inputs[t * cal.hidden..(t + 1) * cal.hidden],
                &mut scratch,
                &mut logits,
                &mut active,
            );
            let row = &fired[t * w..(t + 1) * w];
            truly += row.iter().map(|x| x.count_ones() as u64).sum::<u64>();
            predicted += active.len() as u64;
            hit += active
                .iter()
                .filter(|&&j| row[j as usize / 64] >> (j % 64) & 1 == 1)
                .count() as u64;
        }
        let cells = (cal.tokens * cal.width) as f64;
        out.push(MeasuredRecall {
            layer,
            recall: if truly == 0 {
                1.0
            } else {
                hit as f64 / truly as f64
            },
            frac_predicted: predicted as f64 / cells,
            frac_true: truly as f64 / cells,
        });
    }
    Ok(out)
}
