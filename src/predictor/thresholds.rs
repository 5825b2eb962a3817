//! Per-layer magnitude thresholds for SiLU models: which neuron activations a
//! layer skips, so that the model-wide fraction skipped meets `--target-sparsity`
//! with the least damage.
//!
//! A layer's neurons are skipped when their score (`|silu(g) * u|` under the
//! product criterion) is at or below the layer's threshold. Calibration measures,
//! for every layer and every sparsity level `k / LEVELS`, the threshold that
//! skips that fraction of the layer's activations on sampled calibration tokens
//! and the error it causes: the squared norm of the FFN output's change, relative
//! to the squared norm of the residual stream it is added to (what the next
//! layers' norms see), averaged over the tokens. Two allocations use the curves:
//! - [`Allocation::Uniform`]: every layer skips the same fraction (its own
//!   quantile);
//! - [`Allocation::Greedy`]: starting from dense, repeatedly raise by one level
//!   the layer whose error grows least, until the mean level reaches the target
//!   (TEAL's greedy search, here across layers).
//!
//! On SmolLM2-135M (BENCHMARKS.md), uniform measured better held-out
//! perplexity at targets 0.3-0.5 and greedy at 0.6 and above: the curves'
//! error, local to each layer, does not see how a layer's error grows through
//! the layers after it. Uniform is the default (the targets people use).

/// Sparsity levels per unit: level `k` skips `k / LEVELS` of the activations.
pub const LEVELS: usize = 100;

/// How the model-wide target is shared among the layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum Allocation {
    /// The same fraction in every layer.
    Uniform,
    /// Least total output error (greedy across layers).
    Greedy,
}

/// One layer's thresholds and errors at levels `0 .. LEVELS`.
#[derive(Debug, Clone, PartialEq)]
pub struct SparsityCurve {
    /// `thresholds[k]`: scores at or below it are `k / LEVELS` of the sample's.
    pub thresholds: Vec<f32>,
    /// `errors[k]`: mean over sampled tokens of `|change of the FFN output|^2 /
    /// |residual|^2` when skipping at `thresholds[k]`.
    pub errors: Vec<f64>,
}

/// A layer's share of the target.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerChoice {
    pub threshold: f32,
    /// Fraction of the layer's activations skipped on the calibration sample.
    pub sparsity: f64,
}

/// Measures a layer's curve on `n` sampled tokens.
///
/// `scores` (`n x width`) are the values compared with the threshold (their
/// magnitude), `values` (`n x width`) the neuron values that reach the down
/// projection, `down_columns` (`width x hidden`) the down projection's columns,
/// and `residual_sq` (`n`) each token's squared residual norm.
pub fn layer_curve(
    scores: &[f32],
    values: &[f32],
    down_columns: &[f32],
    residual_sq: &[f32],
    width: usize,
    hidden: usize,
) -> SparsityCurve {
    let n = residual_sq.len();
    assert_eq!(scores.len(), n * width);
    assert_eq!(values.len(), n * width);
    assert_eq!(down_columns.len(), width * hidden);
    let mut sorted: Vec<f32> = scores.iter().map(|v| v.abs()).collect();
    sorted.sort_unstable_by(f32::total_cmp);
    let thresholds: Vec<f32> = (0..LEVELS)
        .map(|k| {
            let skipped = (k * sorted.len()).div_ceil(LEVELS);
            if skipped == 0 {
                0.0
            } else {
                sorted[skipped - 1]
            }
        })
        .collect();
    let mut errors = vec![0.0f64; LEVELS];
    let mut order: Vec<u32> = Vec::with_capacity(width);
    let mut delta = vec![0.0f32; hidden];
    for t in 0..n {
        let s = &scores[t * width..(t + 1) * width];
        let h = &values[t * width..(t + 1) * width];
        order.clear();
        order.extend(0..width as u32);
        order.sort_unstable_by(|&a, &b| s[a as usize].abs().total_cmp(&s[b as usize].abs()));
        delta.fill(0.0);
        let mut next = 0usize;
        let norm = f64::from(residual_sq[t]).max(f64::MIN_POSITIVE);
        for (k, &tau) in thresholds.iter().enumerate() {
            while next < width && s[order[next] as usize].abs() <= tau {
                let j = order[next] as usize;
                let c = &down_columns[j * hidden..(j + 1) * hidden];
                let v = h[j];
                for (d, w) in delta.iter_mut().zip(c) {
                    *d += v * w;
                }
                next += 1;
            }
            let sq: f64 = delta.iter().map(|&d| f64::from(d) * f64::from(d)).sum();
            errors[k] += sq / norm;
        }
    }
    if n > 0 {
        errors.iter_mut().for_each(|e| *e /= n as f64);
    }
    SparsityCurve { thresholds, errors }
}

/// Each layer's threshold for the model-wide `target` fraction (in `[0, 1)`).
pub fn allocate(curves: &[SparsityCurve], target: f64, how: Allocation) -> Vec<LayerChoice> {
    match how {
        Allocation::Uniform => curves
            .iter()
            .map(|c| LayerChoice {
                threshold: interpolate(&c.thresholds, target),
                sparsity: target,
            })
            .collect(),
        Allocation::Greedy => {
            let mut level = vec![0usize; curves.len()];
            let steps = (target * (LEVELS * curves.len()) as f64).round() as usize;
            for _ in 0..steps {
                let best = curves
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| level[*i] + 1 < LEVELS)
                    .map(|(i, c)| (i, c.errors[level[i] + 1] - c.errors[level[i]]))
                    .min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
                match best {
                    Some((i, _)) => level[i] += 1,
                    None => break,
                }
            }
            curves
                .iter()
                .zip(level)
                .map(|(c, k)| LayerChoice {
                    threshold: c.thresholds[k],
                    sparsity: k as f64 / LEVELS as f64,
                })
                .collect()
        }
    }
}

/// The threshold at fraction `s`, linear between the levels around it.
fn interpolate(thresholds: &[f32], s: f64) -> f32 {
    let x = (s * LEVELS as f64).clamp(0.0, (thresholds.len() - 1) as f64);
    let k = x.floor() as usize;
    if k + 1 >= thresholds.len() {
        return thresholds[thresholds.len() - 1];
    }
    let f = (x - k as f64) as f32;
    thresholds[k] + f * (thresholds[k + 1] - thresholds[k])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two layers, one token each, hidden 1: neuron values equal their scores,
    /// down columns all 1, so the error of skipping is the squared sum skipped.
    fn curve_of(values: &[f32]) -> SparsityCurve {
        let width = values.len();
        layer_curve(values, values, &vec![1.0; width], &[1.0], width, 1)
    }

    #[test]
    fn thresholds_are_quantiles_and_errors_the_skipped_output() {
        let values: Vec<f32> = (1..=200).map(|i| i as f32).collect();
        let c = curve_of(&values);
        assert_eq!(c.thresholds[0], 0.0);
        assert_eq!(c.errors[0], 0.0);
        // Level 50 skips the 100 smallest: 1..=100, sum 5050.
        assert_eq!(c.thresholds[50], 100.0);
        assert_eq!(c.errors[50], 5050.0f64 * 5050.0);
        assert!(c.errors.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn greedy_takes_sparsity_where_it_costs_least() {
        // Layer 0's activations are tiny, layer 1's large: the greedy skips
        // more of layer 0 than of layer 1, and the mean meets the target.
        let small: Vec<f32> = (1..=100).map(|i| i as f32 * 1e-3).collect();
        let large: Vec<f32> = (1..=100).map(|i| i as f32).collect();
        let curves = [curve_of(&small), curve_of(&large)];
        let greedy = allocate(&curves, 0.5, Allocation::Greedy);
        let mean = (greedy[0].sparsity + greedy[1].sparsity) / 2.0;
        assert!((mean - 0.5).abs() < 1e-9, "{greedy:?}");
        assert!(greedy[0].sparsity > greedy[1].sparsity, "{greedy:?}");
        let uniform = allocate(&curves, 0.5, Allocation::Uniform);
        assert_eq!(uniform[1].threshold, 50.0);
        let error = |choice: &[LayerChoice]| -> f64 {
            choice
                .iter()
                .zip(&curves)
                .map(|(ch, c)| c.errors[(ch.sparsity * LEVELS as f64).round() as usize])
                .sum()
        };
        assert!(error(&greedy) < error(&uniform));
    }
}
