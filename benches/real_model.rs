//! The sparse FFN modes of a calibrated packed file of a real model (issue 12;
//! `benches/real_model/` makes SmolLM2-135M and its texts):
//!
//! ```sh
//! FLASHPACK_REAL_FILE=/root/smol/smol.flashpack FLASHPACK_REAL_TEXT=/root/smol/out/heldout.txt \
//!     cargo bench --bench real_model
//! ```
//!
//! For dense, `oracle` (the file's exact criterion) and `predicted` with each
//! selector (the trained predictors; int8 and int4 copies of gate and up): the
//! held-out perplexity (windows of 256 tokens), the fraction of FFN neurons
//! computed, for the low-precision selectors their recall against the exact
//! product criterion and their DRAM bytes; then the FFN time per token: every
//! layer's FFN evaluated for one token at a time on FFN inputs recorded in a
//! dense pass (`FLASHPACK_REAL_TIMING_TOKENS`, default 64), selection included.
//! `FLASHPACK_REAL_TOKENS` caps the held-out tokens (default: all).

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

use flashpack::runtime::ffn::{ActiveSet, Fired};
use flashpack::runtime::perplexity::perplexity;
use flashpack::runtime::sparse::{FfnMode, Selector};
use flashpack::runtime::{open_model, LoadedModel, Logits, Observer};

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Records every layer's FFN input, one token at a time.
struct Inputs(Vec<Vec<Vec<f32>>>);

impl Observer for Inputs {
    fn ffn(&mut self, layer: usize, input: &[f32], n: usize, _: &Fired) {
        let hidden = input.len() / n;
        for row in input.chunks_exact(hidden) {
            self.0[layer].push(row.to_vec());
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Config {
    Dense,
    Oracle,
    Predicted(Selector),
}

fn open(
    path: &Path,
    config: Config,
    measure: bool,
) -> (
    LoadedModel,
    Option<std::sync::Arc<flashpack::runtime::sparse::NeuronCounter>>,
) {
    let mut m = open_model(path).expect("open the packed file");
    let counter = match config {
        Config::Dense => None,
        Config::Oracle => m.set_ffn_mode(FfnMode::Oracle).expect("oracle"),
        Config::Predicted(s) => {
            let d = m.sparsity.as_mut().expect("a calibrated file");
            d.selector = s;
            d.measure_selector = measure;
            m.set_ffn_mode(FfnMode::Predicted).expect("predicted")
        }
    };
    (m, counter)
}

fn main() {
    let (Some(file), Some(text)) = (env("FLASHPACK_REAL_FILE"), env("FLASHPACK_REAL_TEXT")) else {
        eprintln!("real_model: set FLASHPACK_REAL_FILE and FLASHPACK_REAL_TEXT (see the file's header); skipped");
        return;
    };
    let path = PathBuf::from(file);
    let timing_tokens: usize =
        env("FLASHPACK_REAL_TIMING_TOKENS").map_or(64, |v| v.parse().expect("a number"));
    let dense = open(&path, Config::Dense, false).0;
    let mut ids = dense
        .tokenizer
        .encode(&std::fs::read_to_string(&text).expect("the held-out text"))
        .expect("tokenize");
    // FFN inputs of the first timing tokens, from a dense pass.
    let layers = dense.model.layers.len();
    let mut inputs = Inputs(vec![Vec::new(); layers]);
    dense
        .model
        .forward(
            &mut dense.model.new_cache(),
            &ids[..timing_tokens.min(ids.len())],
            Logits::None,
            Some(&mut inputs),
        )
        .expect("dense pass");
    // The perplexity's tokens (the timing's were taken above, whatever the cap).
    if let Some(cap) = env("FLASHPACK_REAL_TOKENS") {
        ids.truncate(cap.parse().expect("a number"));
    }
    let ffn_bytes: usize = dense
        .model
        .layers
        .iter()
        .map(|l| l.ffn.weight_bytes())
        .sum();
    drop(dense);
    println!(
        "{} held-out tokens, FFN {} MiB (f32 as loaded), timing on {} tokens",
        ids.len(),
        ffn_bytes >> 20,
        inputs.0[0].len()
    );
    println!("| mode | selector | perplexity | neurons computed | recall vs exact product | chosen / exact | selector DRAM bytes | selector / FFN f16 bytes | FFN ms/token (neurons computed) |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let configs = [
        Config::Dense,
        Config::Oracle,
        Config::Predicted(Selector::Int8),
        Config::Predicted(Selector::Int4),
        Config::Predicted(Selector::Trained),
    ];
    let mut dense_ms = None;
    for config in configs {
        let (m, counter) = open(&path, config, true);
        let r = perplexity(&m.model, &ids, 256).expect("perplexity");
        let (active, recall, over, bytes) = match &counter {
            None => (1.0, None, None, 0),
            Some(c) => {
                let exact = c.exact.load(Ordering::Relaxed);
                let chosen = c.exact_chosen.load(Ordering::Relaxed);
                let computed = c.computed.load(Ordering::Relaxed);
                (
                    c.active_fraction(),
                    (exact > 0).then(|| chosen as f64 / exact as f64),
                    (exact > 0).then(|| computed as f64 / exact as f64),
                    c.selector_bytes.load(Ordering::Relaxed),
                )
            }
        };
        drop(m);
        // Timing, without the agreement measurement.
        let (m, timed) = open(&path, config, false);
        let hidden = m.model.config.hidden_size;
        let mut out = vec![0.0f32; hidden];
        let mut best = f64::INFINITY;
        for _round in 0..3 {
            let started = Instant::now();
            for (layer, xs) in m.model.layers.iter().zip(&inputs.0) {
                for x in xs {
                    layer
                        .ffn
                        .forward(x, 1, ActiveSet::All, &mut out, None)
                        .expect("FFN");
                }
            }
            best = best.min(started.elapsed().as_secs_f64() * 1e3 / inputs.0[0].len() as f64);
        }
        if matches!(config, Config::Dense) {
            dense_ms = Some(best);
        }
        // The fraction computed in the timed runs (the timing tokens').
        let timed_fraction = timed.map_or(1.0, |c| c.active_fraction());
        let (mode, selector) = match config {
            Config::Dense => ("dense", "-".to_string()),
            Config::Oracle => ("oracle", "exact".to_string()),
            Config::Predicted(s) => ("predicted", format!("{s:?}").to_lowercase()),
        };
        let f = |v: Option<f64>, d: usize| v.map_or("-".to_string(), |v| format!("{v:.d$}"));
        println!(
            "| {mode} | {selector} | {:.4} | {:.1}% | {} | {} | {} | {} | {best:.2} ({:.2}x dense at {:.1}%) |",
            r.perplexity,
            100.0 * active,
            f(recall, 4),
            f(over, 3),
            if bytes > 0 { bytes.to_string() } else { "-".into() },
            if bytes > 0 { format!("{:.3}", bytes as f64 / (ffn_bytes / 2) as f64) } else { "-".into() },
            best / dense_ms.unwrap_or(best),
            100.0 * timed_fraction
        );
    }
}
