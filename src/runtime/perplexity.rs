//! Perplexity as the foundation issue defines it, once for every caller: the
//! ids cut into consecutive windows `ids[s..s + ctx]`, each run from an empty KV
//! cache, every token of a window but the first scored, a last window of at
//! least 2 ids included; `exp(sum of NLL in f64 / tokens scored)`.

use std::time::Instant;

use crate::error::{Error, Result};
use crate::runtime::model::{Logits, Model, Observer};

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct PerplexityResult {
    pub perplexity: f64,
    pub nll_sum: f64,
    pub tokens_scored: usize,
    pub windows: usize,
    pub ctx: usize,
    pub seconds: f64,
}

/// Negative log-likelihood of `target` under `logits`, in f64.
pub fn nll(logits: &[f32], target: u32) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
    max + sum.ln() - logits[target as usize] as f64
}

/// Perplexity of `ids` with windows of `ctx` tokens.
pub fn perplexity(model: &Model, ids: &[u32], ctx: usize) -> Result<PerplexityResult> {
    perplexity_observed(model, ids, ctx, None)
}

/// [`perplexity`], with an observer that sees every window's forward pass
/// (FFN sparsity statistics, calibration data).
pub fn perplexity_observed(
    model: &Model,
    ids: &[u32],
    ctx: usize,
    observer: Option<&mut (dyn Observer + '_)>,
) -> Result<PerplexityResult> {
    perplexity_inner(model, ids, ctx, observer, &|_, _| {})
}

/// [`perplexity`], calling `progress(tokens_done, tokens_total)` after each
/// window (for a progress bar).
pub fn perplexity_with_progress(
    model: &Model,
    ids: &[u32],
    ctx: usize,
    progress: &dyn Fn(usize, usize),
) -> Result<PerplexityResult> {
    perplexity_inner(model, ids, ctx, None, progress)
}

fn perplexity_inner(
    model: &Model,
    ids: &[u32],
    ctx: usize,
    mut observer: Option<&mut (dyn Observer + '_)>,
    progress: &dyn Fn(usize, usize),
) -> Result<PerplexityResult> {
    let max = model.config.max_context;
    if ctx > max {
        return Err(Error::ContextTooLong {
            what: format!("an evaluation window of {ctx} tokens"),
            needed: ctx,
            max,
        });
    }
    if ctx < 2 {
        return Err(Error::InvalidOption {
            option: "ctx",
            problem: format!("must be at least 2 (got {ctx})"),
        });
    }
    let started = Instant::now();
    let vocab = model.config.vocab_size;
    let mut cache = model.new_cache();
    let (mut nll_sum, mut scored, mut windows) = (0.0f64, 0usize, 0usize);
    for window in ids.chunks(ctx) {
        if window.len() < 2 {
            continue;
        }
        cache.clear();
        let logits = model.forward(&mut cache, window, Logits::All, observer.as_deref_mut())?;
        for (i, &target) in window[1..].iter().enumerate() {
            nll_sum += nll(&logits[i * vocab..(i + 1) * vocab], target);
        }
        scored += window.len() - 1;
        windows += 1;
        progress(windows * ctx, ids.len());
    }
    if scored == 0 {
        return Err(Error::InvalidArgument(
            "the text has fewer than 2 tokens: nothing to score".into(),
        ));
    }
    Ok(PerplexityResult {
        perplexity: (nll_sum / scored as f64).exp(),
        nll_sum,
        tokens_scored: scored,
        windows,
        ctx,
        seconds: started.elapsed().as_secs_f64(),
    })
}
