//! Training one layer's low-rank sparsity predictor (PAPER.md section 1; issue 5,
//! "Predictors").
//!
//! The predictor maps the FFN input `x` (d_model) to one logit per FFN neuron:
//! `logits = (x · A) · B + bias`, with `A` d x r, `B` r x ffn and no nonlinearity in
//! between (the paper's figure), plus a per-neuron bias (the paper does not say; a
//! bias costs `ffn` numbers and lets a neuron's base rate be learnt without spending
//! rank on it). Neuron `j` is predicted active when `logit_j >= threshold`.
//!
//! Training, all hand-written:
//! - Held-out split: tokens are cut into blocks of consecutive tokens (at most
//!   [`MAX_HOLDOUT_BLOCK`], fewer for small sets so that about 16 or more blocks
//!   are held out) and the last block of every `round(1 / holdout_fraction)` is
//!   held out. Blocks rather than single tokens, because neighbouring tokens of
//!   one text are alike and would leak; spread over the whole set rather than its
//!   tail, because the tail is one document.
//! - Inputs are standardised per feature (mean and standard deviation of the
//!   training split) while training; the standardisation is folded back into `A`
//!   and `bias` at the end, so the stored predictor consumes raw FFN inputs.
//! - Loss: balanced binary cross-entropy with one positive weight per *layer*,
//!   `w = #negatives / #positives` over the training split (clamped to
//!   [`POS_WEIGHT_RANGE`]). Per-layer rather than per-neuron on purpose: a single
//!   layer-wide weight shifts every neuron's log-odds by the same constant, so the
//!   logits still rank (token, neuron) pairs by their probability of firing, which
//!   is what one global threshold over pooled recall needs. Per-neuron weights would
//!   shift each neuron's logits by its own constant and make a global threshold
//!   waste predictions on rare neurons.
//! - Mini-batch AdamW (decoupled weight decay on `A` and `B`, not on the bias)
//!   with a cosine learning-rate decay over `max_epochs` (down to a tenth),
//!   deterministic initialisation and shuffling from the seed (ChaCha8), early
//!   stopping after `patience` epochs without a held-out loss at least
//!   `MIN_IMPROVEMENT` (0.1%) below the last such improvement, keeping the
//!   best-on-held-out weights.
//! - The kept weights are rounded to f16-representable values (the packed file
//!   stores them as f16), and the threshold and all metrics are computed with
//!   [`LowRankPredictor::logits`] on those rounded weights: the reported recall is
//!   what the runtime will see.
//! - Threshold: the highest logit threshold whose recall, pooled over all held-out
//!   tokens, reaches `target_recall` ([`threshold_for_recall`]). The held-out set
//!   also chose the epoch, so the metrics are slightly optimistic.
//!
//! Determinism: same inputs and seed give bit-identical predictors whatever the
//! rayon thread count. Every parallel loop splits its work into fixed-size blocks
//! (of tokens, neurons or features) that do not depend on the thread count; each
//! output element is computed inside one block with a fixed summation order, and
//! per-block partial sums (the loss) are added in block order. Products go through
//! `matrixmultiply::sgemm`, single-threaded per block, so no `k` is ever split. The
//! loss kernel has an AVX2 build chosen at run time that performs the same IEEE
//! operations in the same order, hence the same bits.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::Serialize;

use crate::error::{Error, Result};

/// Largest block of consecutive tokens held out (or kept) together.
pub const MAX_HOLDOUT_BLOCK: usize = 64;
/// Clamp on the layer's positive-class weight, so a layer where almost nothing (or
/// almost everything) fires does not blow up the gradient scale.
pub const POS_WEIGHT_RANGE: (f64, f64) = (1e-4, 1e4);
/// Relative drop in held-out loss that counts as progress for early stopping.
const MIN_IMPROVEMENT: f64 = 1e-3;
/// Tokens per parallel block in batched products. Fixed: it decides summation
/// order. Large, because each block's product repacks the whole of `B`.
const ROW_BLOCK: usize = 128;
/// Neurons per parallel block for the gradient of `B` and the bias.
const NEURON_BLOCK: usize = 64;
/// Input features per parallel block for the gradient of `A`.
const FEATURE_BLOCK: usize = 16;
/// Tokens per parallel block when computing held-out logits one token at a time.
const EVAL_BLOCK: usize = 64;
const ADAM_BETA1: f32 = 0.9;
const ADAM_BETA2: f32 = 0.999;
const ADAM_EPS: f32 = 1e-8;
/// Largest finite f16; weights are clamped to it before rounding to f16.
const F16_MAX: f32 = 65504.0;

/// One layer's calibration data: FFN inputs and which neurons fired.
#[derive(Debug, Clone, Copy)]
pub struct TrainingSet<'a> {
    /// `n x d`, row-major: the exact vector the FFN consumes, per token.
    pub inputs: &'a [f32],
    /// `n x words` with `words = ffn.div_ceil(64)`: bit `j % 64` of word `j / 64` of
    /// token `t`'s row is set when neuron `j` fired. Bits at positions `>= ffn` are
    /// ignored.
    pub fired: &'a [u64],
    pub n: usize,
    pub d: usize,
    pub ffn: usize,
}

impl TrainingSet<'_> {
    /// Words per token in `fired`.
    pub fn words(&self) -> usize {
        self.ffn.div_ceil(64)
    }

    fn validate(&self) -> Result<()> {
        if self.n == 0 || self.d == 0 || self.ffn == 0 {
            return Err(invalid(format!(
                "predictor training needs at least one token, input width and neuron \
                 (got n = {}, d = {}, ffn = {})",
                self.n, self.d, self.ffn
            )));
        }
        let inputs = self.n.checked_mul(self.d);
        if inputs != Some(self.inputs.len()) {
            return Err(invalid(format!(
                "predictor training: {} input values for n = {} tokens x d = {}",
                self.inputs.len(),
                self.n,
                self.d
            )));
        }
        let fired = self.n.checked_mul(self.words());
        if fired != Some(self.fired.len()) {
            return Err(invalid(format!(
                "predictor training: {} firing-mask words for n = {} tokens x {} words \
                 (ffn = {})",
                self.fired.len(),
                self.n,
                self.words(),
                self.ffn
            )));
        }
        if let Some(i) = self.inputs.iter().position(|v| !v.is_finite()) {
            return Err(invalid(format!(
                "predictor training: input of token {} feature {} is {} (not finite)",
                i / self.d,
                i % self.d,
                self.inputs[i]
            )));
        }
        Ok(())
    }
}

/// How the rank of a layer's predictor is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RankChoice {
    /// This rank (1 ..= d).
    Fixed(usize),
    /// Train at `start`, then double (capped at `max`, itself capped at d) while the
    /// predictor, at the threshold reaching the target recall, predicts more than
    /// twice the neurons that truly fire on the held-out tokens. Each larger rank
    /// starts from the previous one's weights (new columns of `A` random, new rows
    /// of `B` zero), so it resumes rather than restarts. The first rank that meets
    /// the bound is returned; if none does, the one predicting the fewest neurons
    /// (ties: the smaller rank).
    Auto {
        /// The first rank trained.
        start: usize,
        /// The largest rank tried.
        max: usize,
    },
}

/// Training hyper-parameters. See [`TrainOptions::default`].
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOptions {
    /// The predictor's rank, fixed or searched.
    pub rank: RankChoice,
    /// Recall pooled over all held-out (token, neuron) pairs that fired, in (0, 1].
    pub target_recall: f64,
    /// Most passes over the training tokens per rank tried.
    pub max_epochs: usize,
    /// Tokens per AdamW step.
    pub batch_size: usize,
    /// Base rate; epoch `e` uses `lr * (0.1 + 0.45 * (1 + cos(pi * e / max_epochs)))`.
    pub learning_rate: f32,
    /// AdamW decoupled weight decay on `A` and `B` (not the bias).
    pub weight_decay: f32,
    /// Fraction of tokens held out, in (0, 0.5]; see the module docs for which.
    pub holdout_fraction: f64,
    /// Stop after this many epochs without a lower held-out loss (0: never stop early).
    pub patience: usize,
    /// Seed of the initial weights and the batch order: the same seed and
    /// data train the same predictor.
    pub seed: u64,
}

impl Default for TrainOptions {
    /// `Auto { start: 8, max: usize::MAX }` (the cap becomes d_model), recall 0.99,
    /// up to 30 epochs of batches of 512, AdamW lr 2e-2 and weight decay 1e-4,
    /// 10% held out, patience 3, seed 0.
    fn default() -> Self {
        TrainOptions {
            rank: RankChoice::Auto {
                start: 8,
                max: usize::MAX,
            },
            target_recall: 0.99,
            max_epochs: 30,
            batch_size: 512,
            learning_rate: 2e-2,
            weight_decay: 1e-4,
            holdout_fraction: 0.1,
            patience: 3,
            seed: 0,
        }
    }
}

impl TrainOptions {
    fn validate(&self) -> Result<()> {
        if !(self.target_recall > 0.0 && self.target_recall <= 1.0) {
            return Err(invalid(format!(
                "target recall {} is not in (0, 1]",
                self.target_recall
            )));
        }
        if !(self.holdout_fraction > 0.0 && self.holdout_fraction <= 0.5) {
            return Err(invalid(format!(
                "held-out fraction {} is not in (0, 0.5]",
                self.holdout_fraction
            )));
        }
        if self.max_epochs == 0 || self.batch_size == 0 {
            return Err(invalid(format!(
                "predictor training needs at least one epoch and a batch size of at least \
                 one (got {} epochs, batch size {})",
                self.max_epochs, self.batch_size
            )));
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(invalid(format!(
                "learning rate {} is not a positive number",
                self.learning_rate
            )));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(invalid(format!(
                "weight decay {} is not a non-negative number",
                self.weight_decay
            )));
        }
        Ok(())
    }
}

pub use crate::runtime::predictor::LowRankPredictor;

/// How a trained predictor does on the held-out tokens.
#[derive(Debug, Clone, Serialize)]
pub struct PredictorMetrics {
    pub rank: usize,
    pub threshold: f32,
    /// Held-out (token, neuron) pairs predicted and fired / pairs fired (1 if none fired).
    pub recall: f64,
    /// Pairs predicted and fired / pairs predicted (1 if none predicted).
    pub precision: f64,
    /// Pairs predicted / all held-out pairs.
    pub frac_predicted: f64,
    /// Pairs fired / all held-out pairs.
    pub frac_true: f64,
    /// Held-out loss of the initial weights (of the first rank tried). The losses are the balanced
    /// cross-entropy divided by its weight per token, so a predictor that knows
    /// nothing but the layer's balance scores about ln 2.
    pub first_loss: f64,
    /// Mean mini-batch loss of the epoch that produced the kept weights.
    pub final_train_loss: f64,
    /// Held-out loss of the kept weights (before rounding to f16).
    pub heldout_loss: f64,
    /// Epochs run at the returned rank (including those after the best, up to
    /// early stopping).
    pub epochs: usize,
    pub heldout_tokens: usize,
}

/// Train one layer's predictor (see the module docs). Errors on inconsistent or
/// non-finite inputs, invalid options, or too few tokens to hold some out.
pub fn train_layer(
    set: &TrainingSet,
    opts: &TrainOptions,
) -> Result<(LowRankPredictor, PredictorMetrics)> {
    set.validate()?;
    opts.validate()?;
    let ranks = rank_schedule(opts.rank, set.d)?;
    let data = Prepared::new(set, opts.holdout_fraction)?;
    let mut best: Option<(LowRankPredictor, PredictorMetrics)> = None;
    let mut grown: Option<Params> = None;
    let mut first_loss = None;
    for rank in ranks {
        let (pred, mut metrics, params) = train_rank(set, &data, opts, rank, grown.as_ref());
        // The loss before any training, at the first rank tried.
        metrics.first_loss = *first_loss.get_or_insert(metrics.first_loss);
        if metrics.frac_predicted <= 2.0 * metrics.frac_true {
            return Ok((pred, metrics));
        }
        grown = Some(params);
        let better = match &best {
            Some((_, m)) => metrics.frac_predicted < m.frac_predicted,
            None => true,
        };
        if better {
            best = Some((pred, metrics));
        }
    }
    best.ok_or_else(|| invalid("predictor training: no rank to train".to_string()))
}

/// The highest logit threshold at which the recall pooled over all (token, neuron)
/// pairs reaches `target_recall`: `logits` is `n x ffn` row-major, `fired` the
/// matching bitsets (`ffn.div_ceil(64)` words per token; missing words count as not
/// fired). Predicting `logit >= threshold` then has recall >= target. Returns
/// `f32::MAX` (predict nothing) when nothing fired.
pub fn threshold_for_recall(logits: &[f32], fired: &[u64], ffn: usize, target_recall: f64) -> f32 {
    if ffn == 0 {
        return f32::MAX;
    }
    let words = ffn.div_ceil(64);
    let mut positives: Vec<f32> = Vec::new();
    for (t, row) in logits.chunks_exact(ffn).enumerate() {
        let Some(bits) = fired.get(t * words..(t + 1) * words) else {
            break;
        };
        positives.extend(
            row.iter()
                .enumerate()
                .filter(|(j, _)| bit(bits, *j))
                .map(|(_, &z)| z),
        );
    }
    threshold_of_positives(&mut positives, target_recall)
}

/// The k-th largest positive logit, k the fewest positives whose share reaches
/// the target.
fn threshold_of_positives(positives: &mut [f32], target_recall: f64) -> f32 {
    let p = positives.len();
    if p == 0 {
        return f32::MAX;
    }
    let target = target_recall.clamp(0.0, 1.0);
    let mut k = ((target * p as f64).ceil() as usize).clamp(1, p);
    while k < p && (k as f64) / (p as f64) < target {
        k += 1;
    }
    // Descending order: index k - 1 holds the k-th largest.
    let (_, kth, _) = positives.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    *kth
}

fn invalid(message: String) -> Error {
    Error::InvalidArgument(message)
}

#[inline]
fn bit(bits: &[u64], j: usize) -> bool {
    (bits[j >> 6] >> (j & 63)) & 1 == 1
}

fn rank_schedule(choice: RankChoice, d: usize) -> Result<Vec<usize>> {
    match choice {
        RankChoice::Fixed(r) => {
            if r == 0 || r > d {
                return Err(invalid(format!(
                    "predictor rank {r} is not in 1..={d} (d_model)"
                )));
            }
            Ok(vec![r])
        }
        RankChoice::Auto { start, max } => {
            if start == 0 || max == 0 || start > max {
                return Err(invalid(format!(
                    "automatic predictor rank needs 1 <= start <= max (got start {start}, \
                     max {max})"
                )));
            }
            let max = max.min(d);
            let mut r = start.min(max);
            let mut ranks = vec![r];
            while r < max {
                r = r.saturating_mul(2).min(max);
                ranks.push(r);
            }
            Ok(ranks)
        }
    }
}

/// The set split into training and held-out tokens, the training part
/// standardised, with what the loss needs.
struct Prepared {
    d: usize,
    ffn: usize,
    words: usize,
    train_idx: Vec<usize>,
    held_idx: Vec<usize>,
    /// Standardised inputs, indexed by original token (`n x d`).
    x_std: Vec<f32>,
    mean: Vec<f64>,
    std: Vec<f64>,
    pos_weight: f32,
    /// Balanced weight per token averaged over the training split: losses are
    /// divided by `tokens * weight_per_token`.
    weight_per_token: f64,
    /// Bias initialisation: each neuron's weighted log-odds on the training split.
    bias_init: Vec<f32>,
}

impl Prepared {
    fn new(set: &TrainingSet, holdout_fraction: f64) -> Result<Prepared> {
        let (n, d, ffn, words) = (set.n, set.d, set.ffn, set.words());
        let period = ((1.0 / holdout_fraction).round() as usize).max(2);
        let block = (n / period.saturating_mul(16)).clamp(1, MAX_HOLDOUT_BLOCK);
        let (held_idx, train_idx): (Vec<usize>, Vec<usize>) =
            (0..n).partition(|&t| (t / block) % period == period - 1);
        if held_idx.is_empty() || train_idx.is_empty() {
            return Err(invalid(format!(
                "predictor training: {n} tokens are too few to hold out a fraction of \
                 {holdout_fraction} (need at least {period})"
            )));
        }

        let mut mean = vec![0.0f64; d];
        let mut sq = vec![0.0f64; d];
        for &t in &train_idx {
            for (i, &v) in set.inputs[t * d..(t + 1) * d].iter().enumerate() {
                mean[i] += v as f64;
                sq[i] += (v as f64) * (v as f64);
            }
        }
        let nt = train_idx.len() as f64;
        let mut std = vec![1.0f64; d];
        for i in 0..d {
            mean[i] /= nt;
            let var = (sq[i] / nt - mean[i] * mean[i]).max(0.0);
            // A constant feature carries nothing; leave its scale alone.
            std[i] = if var > 1e-12 { var.sqrt() } else { 1.0 };
        }
        let mut x_std = vec![0.0f32; n * d];
        x_std
            .par_chunks_mut(d * EVAL_BLOCK)
            .zip(set.inputs.par_chunks(d * EVAL_BLOCK))
            .for_each(|(out, inp)| {
                for (o_row, i_row) in out.chunks_exact_mut(d).zip(inp.chunks_exact(d)) {
                    for i in 0..d {
                        o_row[i] = ((i_row[i] as f64 - mean[i]) / std[i]) as f32;
                    }
                }
            });

        let mut count = vec![0u64; ffn];
        for &t in &train_idx {
            let bits = &set.fired[t * words..(t + 1) * words];
            for (j, c) in count.iter_mut().enumerate() {
                *c += bit(bits, j) as u64;
            }
        }
        let pos: u64 = count.iter().sum();
        let total = train_idx.len() as u64 * ffn as u64;
        let neg = total - pos;
        let pos_weight = if pos == 0 {
            1.0
        } else {
            (neg as f64 / pos as f64).clamp(POS_WEIGHT_RANGE.0, POS_WEIGHT_RANGE.1)
        };
        let weight_per_token = (pos_weight * pos as f64 + neg as f64) / nt;
        let bias_init = count
            .iter()
            .map(|&c| {
                let p = (c as f64 + 0.5) / (nt + 1.0);
                (pos_weight * p / (1.0 - p)).ln().clamp(-8.0, 8.0) as f32
            })
            .collect();
        Ok(Prepared {
            d,
            ffn,
            words,
            train_idx,
            held_idx,
            x_std,
            mean,
            std,
            pos_weight: pos_weight as f32,
            weight_per_token,
            bias_init,
        })
    }
}

/// Trainable parameters, with `B` stored transposed (`bt` is `ffn x rank`) so that
/// every batched product and every parallel block is contiguous.
#[derive(Clone)]
struct Params {
    rank: usize,
    a: Vec<f32>,
    bt: Vec<f32>,
    bias: Vec<f32>,
}

struct Adam {
    m: Vec<f32>,
    v: Vec<f32>,
}

impl Adam {
    fn new(len: usize) -> Adam {
        Adam {
            m: vec![0.0; len],
            v: vec![0.0; len],
        }
    }

    /// One AdamW step; `lr_t` already includes the bias corrections.
    fn step(&mut self, w: &mut [f32], g: &[f32], lr_t: f32, decay: f32) {
        w.par_chunks_mut(4096)
            .zip(g.par_chunks(4096))
            .zip(self.m.par_chunks_mut(4096).zip(self.v.par_chunks_mut(4096)))
            .for_each(|((w, g), (m, v))| {
                for i in 0..w.len() {
                    m[i] = ADAM_BETA1 * m[i] + (1.0 - ADAM_BETA1) * g[i];
                    v[i] = ADAM_BETA2 * v[i] + (1.0 - ADAM_BETA2) * g[i] * g[i];
                    w[i] -= lr_t * m[i] / (v[i].sqrt() + ADAM_EPS) + decay * w[i];
                }
            });
    }
}

/// Buffers of one mini-batch.
struct Batch {
    x: Vec<f32>,
    y: Vec<u64>,
    h: Vec<f32>,
    g: Vec<f32>,
    dh: Vec<f32>,
    da: Vec<f32>,
    dbt: Vec<f32>,
    dbias: Vec<f32>,
}

impl Batch {
    fn new(data: &Prepared, rank: usize, rows: usize) -> Batch {
        Batch {
            x: vec![0.0; rows * data.d],
            y: vec![0; rows * data.words],
            h: vec![0.0; rows * rank],
            g: vec![0.0; rows * data.ffn],
            dh: vec![0.0; rows * rank],
            da: vec![0.0; data.d * rank],
            dbt: vec![0.0; data.ffn * rank],
            dbias: vec![0.0; data.ffn],
        }
    }

    fn load(&mut self, data: &Prepared, fired: &[u64], tokens: &[usize]) {
        let (d, w) = (data.d, data.words);
        for (s, &t) in tokens.iter().enumerate() {
            self.x[s * d..(s + 1) * d].copy_from_slice(&data.x_std[t * d..(t + 1) * d]);
            self.y[s * w..(s + 1) * w].copy_from_slice(&fired[t * w..(t + 1) * w]);
        }
    }
}

fn train_rank(
    set: &TrainingSet,
    data: &Prepared,
    opts: &TrainOptions,
    rank: usize,
    grow_from: Option<&Params>,
) -> (LowRankPredictor, PredictorMetrics, Params) {
    let (d, ffn) = (data.d, data.ffn);
    let mut init_rng = ChaCha8Rng::seed_from_u64(opts.seed);
    init_rng.set_stream(2 * rank as u64);
    let mut shuffle_rng = ChaCha8Rng::seed_from_u64(opts.seed);
    shuffle_rng.set_stream(2 * rank as u64 + 1);

    // A spreads standardised inputs to unit-variance ranks; B starts small so the
    // first logits are the bias (each neuron's base rate) plus a little noise.
    // Grown from a smaller rank: the old columns are kept, the new columns of A
    // are random and those of B zero, so training resumes from the same function.
    let sa = (3.0 / d as f32).sqrt();
    let sb = 0.1 * (3.0 / rank as f32).sqrt();
    let mut uniform = |s: f32| (init_rng.random::<f32>() * 2.0 - 1.0) * s;
    let mut params = match grow_from {
        None => Params {
            rank,
            a: (0..d * rank).map(|_| uniform(sa)).collect(),
            bt: (0..ffn * rank).map(|_| uniform(sb)).collect(),
            bias: data.bias_init.clone(),
        },
        Some(old) => {
            let r0 = old.rank;
            let mut a = Vec::with_capacity(d * rank);
            for row in old.a.chunks_exact(r0) {
                a.extend_from_slice(row);
                a.extend((r0..rank).map(|_| uniform(sa)));
            }
            let mut bt = Vec::with_capacity(ffn * rank);
            for row in old.bt.chunks_exact(r0) {
                bt.extend_from_slice(row);
                bt.resize(bt.len() + rank - r0, 0.0);
            }
            Params {
                rank,
                a,
                bt,
                bias: old.bias.clone(),
            }
        }
    };

    let rows = opts.batch_size.min(data.train_idx.len());
    let mut batch = Batch::new(data, rank, rows);
    let mut held_batch = Batch::new(data, rank, rows);
    let mut adam = [Adam::new(d * rank), Adam::new(ffn * rank), Adam::new(ffn)];
    let mut step = 0i32;
    // Cosine decay over the epoch budget, to a tenth of the base rate.
    let epoch_lr: Vec<f32> = (0..opts.max_epochs)
        .map(|e| {
            let c = (std::f64::consts::PI * e as f64 / opts.max_epochs as f64).cos();
            (opts.learning_rate as f64 * (0.1 + 0.45 * (1.0 + c))) as f32
        })
        .collect();

    let first_loss = heldout_loss(&params, data, set.fired, &mut held_batch);
    let mut best = (params.clone(), first_loss, f64::NAN);
    let mut since_best = 0usize;
    let mut patience_ref = first_loss;
    let mut epochs = 0usize;
    let mut order = data.train_idx.clone();
    for &lr in &epoch_lr {
        epochs += 1;
        for i in (1..order.len()).rev() {
            let k = shuffle_rng.random_range(0..=i as u64) as usize;
            order.swap(i, k);
        }
        let mut train_sum = 0.0f64;
        for tokens in order.chunks(rows) {
            batch.load(data, set.fired, tokens);
            let loss = forward_backward(&params, data, &mut batch, tokens.len());
            train_sum += loss * tokens.len() as f64;
            step += 1;
            let lr_t = lr * (1.0 - ADAM_BETA2.powi(step)).sqrt() / (1.0 - ADAM_BETA1.powi(step));
            let decay = lr * opts.weight_decay;
            adam[0].step(&mut params.a, &batch.da, lr_t, decay);
            adam[1].step(&mut params.bt, &batch.dbt, lr_t, decay);
            adam[2].step(&mut params.bias, &batch.dbias, lr_t, 0.0);
        }
        let train_loss = train_sum / order.len() as f64;
        let held = heldout_loss(&params, data, set.fired, &mut held_batch);
        // Any lower held-out loss is kept; only a clear one restarts the patience,
        // so that a long tail of tiny gains does not use up every epoch.
        if held < patience_ref * (1.0 - MIN_IMPROVEMENT) {
            patience_ref = held;
            since_best = 0;
        } else {
            since_best += 1;
        }
        if held < best.1 || best.2.is_nan() {
            best = (params.clone(), held, train_loss);
        }
        if opts.patience > 0 && since_best >= opts.patience {
            break;
        }
    }

    let (params, held_loss, train_loss) = best;
    let mut pred = fold(&params, data);
    let (threshold, metrics) = evaluate(&pred, set, data, opts.target_recall);
    pred.threshold = threshold;
    (
        pred,
        PredictorMetrics {
            rank,
            threshold,
            first_loss,
            final_train_loss: train_loss,
            heldout_loss: held_loss,
            epochs,
            heldout_tokens: data.held_idx.len(),
            ..metrics
        },
        params,
    )
}

/// Loss of the batch in `batch.x`/`batch.y` (its first `m` rows), and its gradients
/// in `batch.da`, `batch.dbt`, `batch.dbias`.
fn forward_backward(p: &Params, data: &Prepared, batch: &mut Batch, m: usize) -> f64 {
    let (d, r, ffn) = (data.d, p.rank, data.ffn);
    let norm = (1.0 / (m as f64 * data.weight_per_token)) as f32;
    let loss_sum = forward(p, data, batch, m, Some(norm));
    let Batch {
        x,
        h,
        g,
        dh,
        da,
        dbt,
        dbias,
        ..
    } = batch;
    let (x, h, g, dh) = (&x[..m * d], &h[..m * r], &g[..m * ffn], &mut dh[..m * r]);

    // dBt (ffn x r) = G^T · H, by blocks of neurons, each summing all m tokens.
    dbt.par_chunks_mut(NEURON_BLOCK * r)
        .enumerate()
        .for_each(|(blk, out)| {
            let j0 = blk * NEURON_BLOCK;
            let cols = out.len() / r;
            gemm((cols, m, r), (&g[j0..], 1, ffn), (h, r, 1), (out, r, 1));
        });
    // dbias = column sums of G, tokens in order.
    dbias
        .par_chunks_mut(NEURON_BLOCK)
        .enumerate()
        .for_each(|(blk, out)| {
            let j0 = blk * NEURON_BLOCK;
            let cols = out.len();
            out.fill(0.0);
            for row in g.chunks_exact(ffn) {
                for (o, &v) in out.iter_mut().zip(&row[j0..j0 + cols]) {
                    *o += v;
                }
            }
        });
    // dH (m x r) = G · Bt, by blocks of tokens.
    dh.par_chunks_mut(ROW_BLOCK * r)
        .zip(g.par_chunks(ROW_BLOCK * ffn))
        .for_each(|(out, gb)| {
            gemm(
                (out.len() / r, ffn, r),
                (gb, ffn, 1),
                (&p.bt, r, 1),
                (out, r, 1),
            );
        });
    // dA (d x r) = X^T · dH, by blocks of features, each summing all m tokens.
    let dh = &*dh;
    da.par_chunks_mut(FEATURE_BLOCK * r)
        .enumerate()
        .for_each(|(blk, out)| {
            let i0 = blk * FEATURE_BLOCK;
            gemm(
                (out.len() / r, m, r),
                (&x[i0..], 1, d),
                (dh, r, 1),
                (out, r, 1),
            );
        });
    loss_sum * norm as f64
}

/// Logits of the first `m` rows of `batch.x` into `batch.g`, then the weighted
/// loss summed over them. With `grad_norm`, `batch.g` is overwritten with
/// `grad_norm * dLoss/dlogit`.
fn forward(
    p: &Params,
    data: &Prepared,
    batch: &mut Batch,
    m: usize,
    grad_norm: Option<f32>,
) -> f64 {
    let (d, r, ffn, words) = (data.d, p.rank, data.ffn, data.words);
    let w = data.pos_weight;
    let x = &batch.x[..m * d];
    let y = &batch.y[..m * words];
    let h = &mut batch.h[..m * r];
    h.par_chunks_mut(ROW_BLOCK * r)
        .zip(x.par_chunks(ROW_BLOCK * d))
        .for_each(|(hb, xb)| {
            gemm((hb.len() / r, d, r), (xb, d, 1), (&p.a, r, 1), (hb, r, 1));
        });
    let h = &*h;
    let sums: Vec<f64> = batch.g[..m * ffn]
        .par_chunks_mut(ROW_BLOCK * ffn)
        .zip(h.par_chunks(ROW_BLOCK * r))
        .zip(y.par_chunks(ROW_BLOCK * words))
        .map(|((gb, hb), yb)| {
            let rows = gb.len() / ffn;
            gemm((rows, r, ffn), (hb, r, 1), (&p.bt, 1, r), (gb, ffn, 1));
            let mut y_row = vec![0.0f32; ffn];
            let mut sum = 0.0f64;
            for (g_row, bits) in gb.chunks_exact_mut(ffn).zip(yb.chunks_exact(words)) {
                sum += loss_row(g_row, &p.bias, bits, &mut y_row, w, grad_norm) as f64;
            }
            sum
        })
        .collect();
    sums.iter().sum()
}

/// Weighted cross-entropy of one token: `z` holds the logits less the bias, `bits`
/// the labels (unpacked into `y`, `ffn` floats of scratch), `w` the positive weight. Returns the summed loss; with
/// `grad_norm`, overwrites `z` with `grad_norm * dLoss/dlogit`.
///
/// Branch-free over lanes of [`LANES`] with the hand-written [`exp_neg`] and
/// [`ln_1p_unit`], so that it vectorises (the library `exp`/`ln_1p` are calls per
/// element and made this loop the training's bottleneck). The lane sums are added
/// in a fixed order.
fn loss_row(
    z: &mut [f32],
    bias: &[f32],
    bits: &[u64],
    y: &mut [f32],
    w: f32,
    grad_norm: Option<f32>,
) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        #[target_feature(enable = "avx2")]
        unsafe fn avx2(
            z: &mut [f32],
            bias: &[f32],
            bits: &[u64],
            y: &mut [f32],
            w: f32,
            grad_norm: Option<f32>,
        ) -> f32 {
            loss_row_impl(z, bias, bits, y, w, grad_norm)
        }
        // SAFETY: the CPU has AVX2. The arithmetic is the same IEEE operations in
        // the same order (Rust never fuses a multiply and an add on its own), so
        // the result is bit-identical to the portable path.
        return unsafe { avx2(z, bias, bits, y, w, grad_norm) };
    }
    loss_row_impl(z, bias, bits, y, w, grad_norm)
}

#[inline(always)]
fn loss_row_impl(
    z: &mut [f32],
    bias: &[f32],
    bits: &[u64],
    y: &mut [f32],
    w: f32,
    grad_norm: Option<f32>,
) -> f32 {
    for (yc, &word) in y.chunks_mut(64).zip(bits) {
        for (k, v) in yc.iter_mut().enumerate() {
            *v = ((word >> k) & 1) as u32 as f32;
        }
    }
    let y = &*y;
    let mut acc = [0.0f32; LANES];
    let n = z.len() / LANES * LANES;
    let (z_main, z_tail) = z.split_at_mut(n);
    for ((zc, bc), yc) in z_main
        .chunks_exact_mut(LANES)
        .zip(bias.chunks_exact(LANES))
        .zip(y.chunks_exact(LANES))
    {
        let mut v = [0.0f32; LANES];
        let mut yv = [0.0f32; LANES];
        for l in 0..LANES {
            v[l] = zc[l] + bc[l];
            yv[l] = yc[l];
        }
        let (loss, grad) = loss_lanes(&v, &yv, w, grad_norm.unwrap_or(0.0));
        for l in 0..LANES {
            acc[l] += loss[l];
        }
        if grad_norm.is_some() {
            zc.copy_from_slice(&grad);
        }
    }
    if !z_tail.is_empty() {
        // Padding lanes: logit 0, label 0; their loss is not added.
        let mut v = [0.0f32; LANES];
        let mut yv = [0.0f32; LANES];
        for (l, zt) in z_tail.iter().enumerate() {
            v[l] = zt + bias[n + l];
            yv[l] = y[n + l];
        }
        let (loss, grad) = loss_lanes(&v, &yv, w, grad_norm.unwrap_or(0.0));
        for l in 0..z_tail.len() {
            acc[l] += loss[l];
        }
        if grad_norm.is_some() {
            z_tail.copy_from_slice(&grad[..z_tail.len()]);
        }
    }
    let mut sum = 0.0f32;
    for a in acc {
        sum += a;
    }
    sum
}

/// Loss and `s * dLoss/dlogit` of [`LANES`] logits `v` with labels `y`.
#[inline(always)]
fn loss_lanes(v: &[f32; LANES], y: &[f32; LANES], w: f32, s: f32) -> ([f32; LANES], [f32; LANES]) {
    let mut e = [0.0f32; LANES];
    for l in 0..LANES {
        e[l] = exp_neg(v[l].abs());
    }
    let mut loss = [0.0f32; LANES];
    let mut grad = [0.0f32; LANES];
    for l in 0..LANES {
        let (v, e, y) = (v[l], e[l], y[l]);
        let inv = 1.0 / (1.0 + e);
        // softplus(v) = max(v, 0) + ln(1 + e^-|v|); softplus(-v) = softplus(v) - v.
        let sp = v.max(0.0) + ln_1p_unit(e);
        loss[l] = y * (w * (sp - v)) + (1.0 - y) * sp;
        // sigmoid(v), and sigmoid(v) - 1 = -sigmoid(-v), each without cancellation.
        let pos = v >= 0.0;
        let sig = if pos { inv } else { e * inv };
        let sig_neg = if pos { e * inv } else { inv };
        grad[l] = s * (y * (-w * sig_neg) + (1.0 - y) * sig);
    }
    (loss, grad)
}

/// Lanes of [`loss_row`]'s partial sums.
const LANES: usize = 8;

/// `e^-a` for `a >= 0` (relative error about 1e-7; `a` beyond 86 gives about
/// 2^-125): `2^t` with
/// `t = -a log2(e)` split into an integer power and a fraction in [-0.5, 0.5],
/// the fraction's power by its degree-7 Taylor series.
#[inline(always)]
fn exp_neg(a: f32) -> f32 {
    // Adding 1.5 * 2^23 rounds t to an integer n (|t| <= 125) and leaves n in the
    // low mantissa bits: float-only operations, so the lanes vectorise.
    const ROUND: f32 = 12_582_912.0;
    let t = (-a * std::f32::consts::LOG2_E).max(-125.0);
    let r = t + ROUND;
    let n_bits = r.to_bits().wrapping_sub(ROUND.to_bits());
    let f = (t - (r - ROUND)) * std::f32::consts::LN_2;
    let p = 1.0
        + f * (1.0
            + f * (0.5
                + f * (1.0 / 6.0
                    + f * (1.0 / 24.0 + f * (1.0 / 120.0 + f * (1.0 / 720.0 + f / 5040.0))))));
    p * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

/// `ln(1 + e)` for `e` in [0, 1]: `2 atanh(e / (2 + e))`, the series to s^13
/// (s <= 1/3, error below 1e-7).
#[inline(always)]
fn ln_1p_unit(e: f32) -> f32 {
    let s = e / (2.0 + e);
    let s2 = s * s;
    2.0 * s
        * (1.0
            + s2 * (1.0 / 3.0
                + s2 * (1.0 / 5.0
                    + s2 * (1.0 / 7.0 + s2 * (1.0 / 9.0 + s2 * (1.0 / 11.0 + s2 / 13.0))))))
}

/// Held-out loss of `p` (standardised inputs), by batches in token order.
fn heldout_loss(p: &Params, data: &Prepared, fired: &[u64], batch: &mut Batch) -> f64 {
    let rows = batch.x.len() / data.d;
    let mut sum = 0.0f64;
    for tokens in data.held_idx.chunks(rows) {
        batch.load(data, fired, tokens);
        sum += forward(p, data, batch, tokens.len(), None);
    }
    sum / (data.held_idx.len() as f64 * data.weight_per_token)
}

/// The stored predictor: standardisation folded into `A` and the bias, `B`
/// transposed back, every weight rounded to an f16-representable value.
fn fold(p: &Params, data: &Prepared) -> LowRankPredictor {
    let (d, r, ffn) = (data.d, p.rank, data.ffn);
    let to_f16 = |v: f64| half::f16::from_f32((v as f32).clamp(-F16_MAX, F16_MAX)).to_f32();
    // logit = ((x - mean) / std) · A · B + bias = x · A' · B + bias', with
    // A' = diag(1 / std) · A and bias' = bias - (mean / std) · A · B.
    let mut a = vec![0.0f32; d * r];
    let mut shift = vec![0.0f64; r];
    for i in 0..d {
        for k in 0..r {
            let v = p.a[i * r + k] as f64;
            a[i * r + k] = to_f16(v / data.std[i]);
            shift[k] += data.mean[i] / data.std[i] * v;
        }
    }
    let mut b = vec![0.0f32; r * ffn];
    let mut bias = vec![0.0f32; ffn];
    for j in 0..ffn {
        let mut s = p.bias[j] as f64;
        for k in 0..r {
            let v = p.bt[j * r + k];
            b[k * ffn + j] = to_f16(v as f64);
            s -= shift[k] * v as f64;
        }
        bias[j] = to_f16(s);
    }
    LowRankPredictor {
        d,
        rank: r,
        ffn,
        a,
        b,
        bias,
        threshold: f32::MAX,
    }
}

/// The threshold reaching the target recall on the held-out tokens, with the
/// metrics at that threshold (loss fields left at zero).
fn evaluate(
    pred: &LowRankPredictor,
    set: &TrainingSet,
    data: &Prepared,
    target_recall: f64,
) -> (f32, PredictorMetrics) {
    let (d, ffn, words) = (data.d, data.ffn, data.words);
    let held = &data.held_idx;
    let mut logits = vec![0.0f32; held.len() * ffn];
    logits
        .par_chunks_mut(EVAL_BLOCK * ffn)
        .zip(held.par_chunks(EVAL_BLOCK))
        .for_each(|(out, tokens)| {
            let mut scratch = Vec::with_capacity(pred.rank);
            for (o, &t) in out.chunks_exact_mut(ffn).zip(tokens) {
                pred.logits(&set.inputs[t * d..(t + 1) * d], &mut scratch, o);
            }
        });
    let mut positives = Vec::new();
    for (row, &t) in logits.chunks_exact(ffn).zip(held) {
        let bits = &set.fired[t * words..(t + 1) * words];
        positives.extend((0..ffn).filter(|&j| bit(bits, j)).map(|j| row[j]));
    }
    let fired = positives.len() as u64;
    let threshold = threshold_of_positives(&mut positives, target_recall);
    let mut predicted = 0u64;
    let mut hits = 0u64;
    for (row, &t) in logits.chunks_exact(ffn).zip(held) {
        let bits = &set.fired[t * words..(t + 1) * words];
        for (j, &z) in row.iter().enumerate() {
            if z >= threshold {
                predicted += 1;
                hits += bit(bits, j) as u64;
            }
        }
    }
    let pairs = (held.len() * ffn) as f64;
    let ratio = |a: u64, b: u64| if b == 0 { 1.0 } else { a as f64 / b as f64 };
    (
        threshold,
        PredictorMetrics {
            rank: pred.rank,
            threshold,
            recall: ratio(hits, fired),
            precision: ratio(hits, predicted),
            frac_predicted: predicted as f64 / pairs,
            frac_true: fired as f64 / pairs,
            first_loss: 0.0,
            final_train_loss: 0.0,
            heldout_loss: 0.0,
            epochs: 0,
            heldout_tokens: held.len(),
        },
    )
}

/// `C = A · B` (overwriting C) for `(m, k, n)`, each operand given as
/// (slice, row stride, column stride) in elements. Single-threaded: each output
/// element's k-order is fixed by the call's shape alone.
fn gemm(
    (m, k, n): (usize, usize, usize),
    (a, rsa, csa): (&[f32], usize, usize),
    (b, rsb, csb): (&[f32], usize, usize),
    (c, rsc, csc): (&mut [f32], usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    let end = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(end(m, n, rsc, csc) < c.len(), "gemm: C out of bounds");
    if k == 0 {
        c.fill(0.0);
        return;
    }
    assert!(end(m, k, rsa, csa) < a.len(), "gemm: A out of bounds");
    assert!(end(k, n, rsb, csb) < b.len(), "gemm: B out of bounds");
    // SAFETY: the asserts above keep every element the (m, k, n) product with these
    // strides reads or writes inside its slice; `c` is borrowed mutably, so it does
    // not alias `a` or `b`.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            rsa as isize,
            csa as isize,
            b.as_ptr(),
            rsb as isize,
            csb as isize,
            0.0,
            c.as_mut_ptr(),
            rsc as isize,
            csc as isize,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_and_log_match_the_library() {
        for i in 0..=16_000 {
            let a = i as f32 * 0.005;
            let want = (-a as f64).exp();
            let got = exp_neg(a) as f64;
            // f32 rounding of a * log2(e) costs about 6e-8 * a relative.
            let tol = (4e-7 + 1e-7 * a as f64) * want;
            assert!((got - want).abs() <= tol, "exp(-{a}): {got} vs {want}");
            let e = exp_neg(a);
            let (l, lw) = (ln_1p_unit(e) as f64, (e as f64).ln_1p());
            assert!(
                (l - lw).abs() <= 1e-7 + 4e-7 * lw,
                "ln_1p({e}): {l} vs {lw}"
            );
        }
        assert!(exp_neg(1000.0) < 1e-37);
    }
}
