//! Choosing the next token from logits: greedy (the default), or sampling with
//! temperature, top-k, top-p and min-p from a seeded ChaCha RNG, so that a seed
//! reproduces a run on any machine and thread count; a repetition penalty as
//! transformers applies it (before greedy or sampling).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::error::{Error, Result};

/// How to pick tokens. `temperature == 0` is greedy (top-k, top-p and min-p
/// then unused); `Default` is greedy with no repetition penalty. The filters
/// apply in the order top-k, min-p, top-p, after the temperature.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// Logits are divided by it before the softmax; 0 (the default) takes the
    /// most likely token, higher values flatten the distribution. Finite, >= 0.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (`None`: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches `p`.
    pub top_p: Option<f32>,
    /// Keep only tokens whose probability is at least `min_p` times the most
    /// likely token's.
    pub min_p: Option<f32>,
    /// Divide the positive logits (multiply the negative ones) of every token
    /// already in the context by this (transformers'
    /// `RepetitionPenaltyLogitsProcessor`); 1 is none.
    pub repetition_penalty: f32,
    /// Seed of the ChaCha20 stream the draws come from: the same seed, model
    /// and prompt give the same tokens on any machine and thread count
    /// (unused when greedy).
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            min_p: None,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Checks the values a user gave.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::InvalidOption {
                option: "temperature",
                problem: format!("must be a finite number >= 0 (got {})", self.temperature),
            });
        }
        if self.top_k == Some(0) {
            return Err(Error::InvalidOption {
                option: "top_k",
                problem: "must be at least 1".into(),
            });
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::InvalidOption {
                    option: "top_p",
                    problem: format!("must be in (0, 1] (got {p})"),
                });
            }
        }
        if let Some(p) = self.min_p {
            if !(0.0..=1.0).contains(&p) {
                return Err(Error::InvalidOption {
                    option: "min_p",
                    problem: format!("must be in [0, 1] (got {p})"),
                });
            }
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(Error::InvalidOption {
                option: "repetition_penalty",
                problem: format!(
                    "must be a finite number > 0 (got {})",
                    self.repetition_penalty
                ),
            });
        }
        Ok(())
    }

    /// Whether tokens are chosen by argmax (`temperature == 0`).
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// Sampling defaults a model ships in its `generation_config.json`, read as
/// transformers' `generate` reads them: sampling only when `do_sample` is true
/// (then `temperature` 1, `top_k` 50 and `top_p` 1 unless given), greedy
/// otherwise; `repetition_penalty` applies either way. Values that do not
/// parse as numbers are ignored (the file is the model author's, not the user's).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingDefaults {
    /// [`SamplingParams::temperature`]: 0 unless `do_sample`.
    pub temperature: f32,
    /// [`SamplingParams::top_k`] (`top_k` 0 in the file is none).
    pub top_k: Option<usize>,
    /// [`SamplingParams::top_p`] (1 in the file is none).
    pub top_p: Option<f32>,
    /// [`SamplingParams::min_p`].
    pub min_p: Option<f32>,
    /// [`SamplingParams::repetition_penalty`] (1 when absent).
    pub repetition_penalty: f32,
}

impl Default for SamplingDefaults {
    fn default() -> Self {
        SamplingDefaults {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            min_p: None,
            repetition_penalty: 1.0,
        }
    }
}

impl SamplingDefaults {
    /// The defaults of a parsed `generation_config.json` (`None`: the model
    /// ships none, which is greedy).
    pub fn from_generation_config(config: Option<&serde_json::Value>) -> SamplingDefaults {
        let Some(c) = config else {
            return SamplingDefaults::default();
        };
        let num = |key: &str| c.get(key).and_then(serde_json::Value::as_f64);
        let repetition_penalty = num("repetition_penalty")
            .filter(|p| p.is_finite() && *p > 0.0)
            .map_or(1.0, |p| p as f32);
        let do_sample = c.get("do_sample").and_then(serde_json::Value::as_bool) == Some(true);
        if !do_sample {
            return SamplingDefaults {
                repetition_penalty,
                ..SamplingDefaults::default()
            };
        }
        let temperature = num("temperature").filter(|t| t.is_finite() && *t >= 0.0);
        SamplingDefaults {
            temperature: temperature.map_or(1.0, |t| t as f32),
            // top_k 0 means "no top-k" in transformers.
            top_k: match c.get("top_k").map(|v| v.as_u64()) {
                None => Some(50),
                Some(Some(0)) | Some(None) => None,
                Some(Some(k)) => Some(k as usize),
            },
            top_p: num("top_p")
                .filter(|p| *p > 0.0 && *p < 1.0)
                .map(|p| p as f32),
            min_p: num("min_p")
                .filter(|p| *p > 0.0 && *p <= 1.0)
                .map(|p| p as f32),
            repetition_penalty,
        }
    }
}

/// The largest integer every JSON reader holds exactly (2^53 - 1).
pub const MAX_JSON_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// A seed from the clock, for runs that ask for none. Any value will do; it is
/// kept below 2^53 so that JSON readers that hold numbers as doubles (most)
/// read back the exact seed to reproduce the run with.
pub fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        & MAX_JSON_SAFE_INTEGER
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
    /// Scratch for penalised logits (reused: no allocation per token).
    penalised: Vec<f32>,
}

impl Sampler {
    /// A sampler for `params`, its RNG seeded with `params.seed`; invalid
    /// values (see [`SamplingParams::validate`]) are refused.
    pub fn new(params: SamplingParams) -> Result<Sampler> {
        params.validate()?;
        Ok(Sampler {
            params,
            rng: ChaCha20Rng::seed_from_u64(params.seed),
            penalised: Vec::new(),
        })
    }

    /// Picks the next token from one position's logits, `context` being every
    /// id before it (prompt and generated) for the repetition penalty.
    pub fn sample_after(&mut self, logits: &[f32], context: &[u32]) -> u32 {
        let penalty = self.params.repetition_penalty;
        if penalty == 1.0 {
            return self.sample(logits);
        }
        let mut penalised = std::mem::take(&mut self.penalised);
        penalised.clear();
        penalised.extend_from_slice(logits);
        for &id in context {
            // Each distinct id once, as transformers' gather/scatter does.
            if let Some(v) = penalised.get_mut(id as usize) {
                let original = logits[id as usize];
                *v = if original > 0.0 {
                    original / penalty
                } else {
                    original * penalty
                };
            }
        }
        let next = self.sample(&penalised);
        self.penalised = penalised;
        next
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
        if let Some(min_p) = p.min_p {
            // probs[0] is the most likely token's: candidates are sorted.
            let floor = probs[0] * min_p as f64;
            let keep = probs.iter().take_while(|&&q| q >= floor).count().max(1);
            probs.truncate(keep);
            idx.truncate(keep);
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
            ..SamplingParams::default()
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
            ..SamplingParams::default()
        };
        let mut a = Sampler::new(params).unwrap();
        let mut b = Sampler::new(params).unwrap();
        let da: Vec<u32> = (0..20).map(|_| a.sample(&logits)).collect();
        let db: Vec<u32> = (0..20).map(|_| b.sample(&logits)).collect();
        assert_eq!(da, db);
    }

    #[test]
    fn min_p_keeps_tokens_near_the_best() {
        // Probabilities after softmax at t=1: about 0.66, 0.24, 0.09, 0.01.
        let logits = [2.0f32, 1.0, 0.0, -2.0];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            min_p: Some(0.3),
            seed: 3,
            ..SamplingParams::default()
        })
        .unwrap();
        let drawn: std::collections::BTreeSet<u32> = (0..400).map(|_| s.sample(&logits)).collect();
        // 0.24 / 0.66 = 0.37 >= 0.3 survives; 0.09 / 0.66 = 0.14 does not.
        assert_eq!(drawn.into_iter().collect::<Vec<_>>(), vec![0, 1]);
    }

    #[test]
    fn repetition_penalty_follows_transformers() {
        // Token 0 leads; once penalised (2.0 / 1.5 = 1.33 < 1.5) token 1 wins;
        // a negative logit is multiplied, never raised.
        let logits = [2.0f32, 1.5, -1.0];
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 1.5,
            ..SamplingParams::default()
        })
        .unwrap();
        assert_eq!(s.sample_after(&logits, &[]), 0);
        assert_eq!(s.sample_after(&logits, &[0]), 1);
        assert_eq!(s.sample_after(&logits, &[0, 1, 0]), 0);
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 0.5,
            ..SamplingParams::default()
        })
        .unwrap();
        // A penalty below 1 favours repeats: -1.0 * 0.5 = -0.5, still last.
        assert_eq!(s.sample_after(&logits, &[2]), 0);
    }

    #[test]
    fn generation_config_defaults_follow_transformers() {
        let none = SamplingDefaults::from_generation_config(None);
        assert_eq!(none, SamplingDefaults::default());
        // Without do_sample, transformers decodes greedily whatever the temperature.
        let greedy =
            serde_json::json!({"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1});
        let d = SamplingDefaults::from_generation_config(Some(&greedy));
        assert_eq!(d.temperature, 0.0);
        assert_eq!(d.top_p, None);
        assert!((d.repetition_penalty - 1.1).abs() < 1e-6);
        let sample = serde_json::json!({"do_sample": true, "temperature": 0.6, "top_p": 0.9});
        let d = SamplingDefaults::from_generation_config(Some(&sample));
        assert!((d.temperature - 0.6).abs() < 1e-6);
        assert_eq!(d.top_k, Some(50), "transformers' default top_k");
        assert_eq!(d.top_p, Some(0.9));
        let d = SamplingDefaults::from_generation_config(Some(
            &serde_json::json!({"do_sample": true, "top_k": 0}),
        ));
        assert_eq!((d.temperature, d.top_k), (1.0, None));
    }
}
