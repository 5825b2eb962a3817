//! Replayed neuron activity, for measuring the flash runtime at a scale where
//! no trained model is at hand.
//!
//! A synthetic multi-GiB model has random weights, so its own activations are
//! neither sparse nor correlated from token to token the way a trained ReLU
//! model's are, and it has no trained predictors. A [`Replay`] supplies what it
//! lacks: for every layer and token, the neurons to compute, recorded from a
//! trained model's run (a trace kept by `calibrate --keep-trace`) and tiled
//! across the larger model's layers and width. Given to
//! [`FlashOptions::replay`](super::FlashOptions), it stands in for the
//! predictor (`flash`) or for the in-DRAM copy (`oracle`); everything else,
//! the cache, the reads, the sparse FFN, attention and the budget, runs as
//! for any packed file. Only the predictor's own matmul is skipped, so its
//! time is not in the measurement.
//!
//! [`from_kept_trace`] makes the two replays a benchmark wants from one trace:
//! the neurons that fired (the oracle's sets) and the neurons the packed
//! model's trained predictors choose for the same FFN inputs (flash's sets,
//! misses and false positives included), both in packed neuron order.

use std::fmt;
use std::path::Path;

use crate::error::{Error, Result};
use crate::format::PackedFile;
use crate::runtime::open::sparsity_data;

/// Per layer and token, the ascending neuron indices a run computes.
pub struct Replay {
    /// `sets[layer][token]`.
    sets: Vec<Vec<Vec<u32>>>,
    width: usize,
}

impl fmt::Debug for Replay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Replay {{ layers: {}, tokens: {}, width: {}, mean fraction: {:.4} }}",
            self.layers(),
            self.tokens(),
            self.width,
            self.mean_fraction()
        )
    }
}

impl Replay {
    /// Checks that every layer has the same positive number of tokens and
    /// that each set is strictly ascending and inside `width`.
    pub fn new(sets: Vec<Vec<Vec<u32>>>, width: usize) -> Result<Replay> {
        let tokens = sets.first().map_or(0, Vec::len);
        if tokens == 0 {
            return Err(Error::InvalidArgument(
                "a replay needs at least one layer and one token".into(),
            ));
        }
        for (l, layer) in sets.iter().enumerate() {
            if layer.len() != tokens {
                return Err(Error::InvalidArgument(format!(
                    "replay layer {l} has {} tokens, layer 0 has {tokens}",
                    layer.len()
                )));
            }
            for (t, set) in layer.iter().enumerate() {
                let ascending = set.windows(2).all(|w| w[0] < w[1]);
                if !ascending || set.last().is_some_and(|&j| j as usize >= width) {
                    return Err(Error::InvalidArgument(format!(
                        "replay layer {l} token {t}: the set must be ascending and below the width {width}"
                    )));
                }
            }
        }
        Ok(Replay { sets, width })
    }

    pub fn layers(&self) -> usize {
        self.sets.len()
    }

    pub fn tokens(&self) -> usize {
        self.sets[0].len()
    }

    pub fn width(&self) -> usize {
        self.width
    }

    /// The neurons of `layer` at a run's `evaluation`-th token (from 0); a run
    /// longer than the replay starts it over.
    pub fn set(&self, layer: usize, evaluation: u64) -> &[u32] {
        let layer = &self.sets[layer];
        &layer[(evaluation % layer.len() as u64) as usize]
    }

    /// Mean fraction of the width chosen per layer and token.
    pub fn mean_fraction(&self) -> f64 {
        let chosen: usize = self.sets.iter().flatten().map(Vec::len).sum();
        chosen as f64 / (self.layers() * self.tokens() * self.width) as f64
    }

    /// Most distinct neurons of `layer` within any `k` consecutive tokens:
    /// the cache rows a window of `k - 1` tokens needs (a count per neuron,
    /// updated as the window slides).
    pub fn window_max(&self, layer: usize, k: usize) -> usize {
        let sets = &self.sets[layer];
        let k = k.max(1);
        let mut count = vec![0u32; self.width];
        let (mut distinct, mut best) = (0usize, 0usize);
        for t in 0..sets.len() {
            for &j in &sets[t] {
                count[j as usize] += 1;
                if count[j as usize] == 1 {
                    distinct += 1;
                }
            }
            if t >= k {
                for &j in &sets[t - k] {
                    count[j as usize] -= 1;
                    if count[j as usize] == 0 {
                        distinct -= 1;
                    }
                }
            }
            best = best.max(distinct);
        }
        best
    }

    /// The replay stretched to `layers` x `width` over its first `tokens`
    /// tokens: layer `l` replays layer `l % L`, and neuron `j` is chosen iff
    /// neuron `j % W` is (`L`, `W` this replay's). Sparsity, the adjacency of
    /// chosen neurons and the token-to-token correlation are kept.
    pub fn tiled(&self, layers: usize, width: usize, tokens: usize) -> Result<Replay> {
        let tokens = tokens.clamp(1, self.tokens());
        let sets = (0..layers)
            .map(|l| {
                self.sets[l % self.layers()][..tokens]
                    .iter()
                    .map(|set| {
                        let mut out = Vec::with_capacity(set.len() * width.div_ceil(self.width));
                        for base in (0..width as u32).step_by(self.width) {
                            out.extend(
                                set.iter()
                                    .map(|&j| base + j)
                                    .take_while(|&j| (j as usize) < width),
                            );
                        }
                        out
                    })
                    .collect()
            })
            .collect();
        Replay::new(sets, width)
    }
}

/// Reads a trace kept by `flashpack calibrate --keep-trace` (per layer, the
/// FFN inputs as f16 and the firing bitsets in checkpoint neuron order) of
/// the model `packed` was converted from, and returns `(fired, predicted)`
/// over its first `max_tokens` tokens, in `packed`'s neuron order: the
/// neurons that fired, and those `packed`'s predictors choose for the same
/// inputs.
pub fn from_kept_trace(trace: &Path, packed: &Path, max_tokens: usize) -> Result<(Replay, Replay)> {
    let file = PackedFile::open(packed)?;
    let (hidden, width) = (file.config.hidden_size, file.config.ffn_width);
    let words = width.div_ceil(64);
    let data = sparsity_data(&file)?;
    let (mut fired, mut predicted) = (Vec::new(), Vec::new());
    for l in 0..file.manifest.ffn_layers.len() {
        let predictor = data
            .as_ref()
            .and_then(|d| d.predictors.get(l).and_then(Option::as_ref))
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "{}: layer {l} has no predictor (convert it with calibration text)",
                    packed.display()
                ))
            })?;
        // order[p] = the checkpoint index of packed neuron p.
        let order = file.neuron_order(l)?;
        let read = |name: String| {
            let path = trace.join(name);
            std::fs::read(&path).map_err(|e| Error::io(&path, e))
        };
        let bits = read(format!("layer{l}.fired.bits"))?;
        let inputs = read(format!("layer{l}.inputs.f16"))?;
        let tokens = bits.len() / (words * 8);
        if tokens == 0 || bits.len() != tokens * words * 8 || inputs.len() != tokens * hidden * 2 {
            return Err(Error::InvalidArgument(format!(
                "{}: layer {l}'s trace does not match the model (hidden {hidden}, FFN width {width}): {} input bytes, {} bitset bytes",
                trace.display(),
                inputs.len(),
                bits.len()
            )));
        }
        let tokens = tokens.min(max_tokens.max(1));
        let (mut f_sets, mut p_sets) = (Vec::with_capacity(tokens), Vec::with_capacity(tokens));
        let (mut x, mut scratch, mut logits) = (vec![0f32; hidden], Vec::new(), Vec::new());
        for t in 0..tokens {
            let row = &bits[t * words * 8..(t + 1) * words * 8];
            let bit = |j: usize| row[j / 8] >> (j % 8) & 1 == 1;
            f_sets.push(
                (0..width)
                    .filter(|&p| bit(order[p] as usize))
                    .map(|p| p as u32)
                    .collect(),
            );
            for (d, b) in x.iter_mut().zip(inputs[t * hidden * 2..].chunks_exact(2)) {
                *d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
            let mut set = Vec::new();
            predictor.predict(&x, &mut scratch, &mut logits, &mut set);
            p_sets.push(set);
        }
        fired.push(f_sets);
        predicted.push(p_sets);
    }
    Ok((Replay::new(fired, width)?, Replay::new(predicted, width)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replay(sets: &[&[u32]], width: usize) -> Replay {
        Replay::new(vec![sets.iter().map(|s| s.to_vec()).collect()], width).unwrap()
    }

    #[test]
    fn window_max_counts_distinct_neurons_of_consecutive_tokens() {
        let r = replay(&[&[0, 1], &[1, 2], &[5], &[1]], 8);
        assert_eq!(r.window_max(0, 1), 2);
        // Pairs: {0,1,2}, {1,2,5}, {1,5}.
        assert_eq!(r.window_max(0, 2), 3);
        // Triples: {0,1,2,5}, {1,2,5}.
        assert_eq!(r.window_max(0, 3), 4);
        assert_eq!(r.window_max(0, 10), 4);
    }

    #[test]
    fn tiling_repeats_layers_and_neurons() {
        let r = Replay::new(vec![vec![vec![1, 3]], vec![vec![0]]], 4).unwrap();
        let t = r.tiled(3, 10, 1).unwrap();
        assert_eq!(t.set(0, 0), &[1, 3, 5, 7, 9]);
        assert_eq!(t.set(1, 0), &[0, 4, 8]);
        assert_eq!(t.set(2, 0), &[1, 3, 5, 7, 9]);
        // A run longer than the replay starts over.
        assert_eq!(t.set(1, 5), &[0, 4, 8]);
    }

    #[test]
    fn rejects_unsorted_or_out_of_range_sets() {
        assert!(Replay::new(vec![vec![vec![2, 1]]], 4).is_err());
        assert!(Replay::new(vec![vec![vec![4]]], 4).is_err());
        assert!(Replay::new(vec![vec![vec![0]], vec![]], 4).is_err());
        assert!(Replay::new(vec![], 4).is_err());
    }
}
