//! Choosing the next token from logits: greedy (the default), or sampling with
//! temperature, top-k and top-p from a seeded ChaCha RNG, so that a seed
//! reproduces a run on any machine and thread count.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::error::{Error, Result};

/// How to pick tokens. `temperature == 0` is greedy (top-k / top-p then unused).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (`None`: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches `p`.
    pub top_p: Option<f32>,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Checks the values a user gave.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::InvalidArgument(format!(
                "--temperature must be a finite number >= 0 (got {})",
                self.temperature
            )));
        }
        if self.top_k == Some(0) {
            return Err(Error::InvalidArgument("--top-k must be at least 1".into()));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::InvalidArgument(format!(
                    "--top-p must be in (0, 1] (got {p})"
                )));
            }
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// The index of the largest logit; the first one on ties (as `torch.argmax`).
/// NaN logits are never chosen.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best_v = v;
            best = i;
        }
    }
    best as u32
}

/// A token picker with its own RNG stream.
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha20Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Sampler> {
        params.validate()?;
        Ok(Sampler {
            params,
            rng: ChaCha20Rng::seed_from_u64(params.seed),
        })
    }

    /// Picks the next token from one position's logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = self.params;
        if p.is_greedy() {
            return argmax(logits);
        }
        // Candidates by descending logit, ties by index: a total order, so the
        // draw below is reproducible.
        let mut idx: Vec<u32> = (0..logits.len() as u32)
            .filter(|&i| !logits[i as usize].is_nan())
            .collect();
        if idx.is_empty() {
            return 0;
        }
        idx.sort_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        if let Some(k) = p.top_k {
            idx.truncate(k.max(1));
        }
        let t = p.temperature as f64;
        let max = logits[idx[0] as usize] as f64 / t;
        let mut probs: Vec<f64> = idx
            .iter()
            .map(|&i| (logits[i as usize] as f64 / t - max).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        for q in &mut probs {
            *q /= total;
        }
        if let Some(top_p) = p.top_p {
            let mut cum = 0.0;
            let mut keep = probs.len();
            for (j, q) in probs.iter().enumerate() {
                cum += q;
                if cum >= top_p as f64 {
                    keep = j + 1;
                    break;
                }
            }
            probs.truncate(keep);
            idx.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut u = self.rng.random::<f64>() * total;
        for (j, q) in probs.iter().enumerate() {
            if u < *q {
                return idx[j];
            }
            u -= q;
        }
        idx[idx.len() - 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_first_max() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: Some(1),
            top_p: None,
            seed: 7,
        })
        .unwrap();
        for _ in 0..10 {
            assert_eq!(s.sample(&[0.5, 2.0, 1.9]), 1);
        }
    }

    #[test]
    fn same_seed_same_draws() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.3).sin()).collect();
        let params = SamplingParams {
            temperature: 0.8,
            top_k: Some(20),
            top_p: Some(0.9),
            seed: 42,
        };
        let mut a = Sampler::new(params).unwrap();
        let mut b = Sampler::new(params).unwrap();
        let da: Vec<u32> = (0..20).map(|_| a.sample(&logits)).collect();
        let db: Vec<u32> = (0..20).map(|_| b.sample(&logits)).collect();
        assert_eq!(da, db);
    }
}
