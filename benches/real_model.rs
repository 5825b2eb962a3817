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
//! layer's FFN evaluated for one token at a time (token by token through all
//! layers, as decoding reads them) on FFN inputs recorded in a dense pass
//! (`FLASHPACK_REAL_TIMING_TOKENS`, default 64), selection included.
//! `FLASHPACK_REAL_TOKENS` caps the held-out tokens (default: all);
//! `FLASHPACK_REAL_MODES` (for example `dense,oracle,int8`) picks the modes;
//! `FLASHPACK_REAL_PPL=0` skips the quality table; `FLASHPACK_REAL_ROUNDS`
//! (default 3) timing rounds, all modes in turn in each, the best reported
//! with its split into selection, gate/up rows and down columns (wall
//! clock), and beside it the best CPU time of the timing thread: with
//! `RAYON_NUM_THREADS=1` all the work runs on that thread, so on a shared,
//! oversubscribed machine the CPU time leaves out the time the scheduler gave
//! to other processes, which the wall time counts.

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
    let rounds: usize = env("FLASHPACK_REAL_ROUNDS").map_or(3, |v| v.parse().expect("a number"));
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
    let all = [
        ("dense", Config::Dense),
        ("oracle", Config::Oracle),
        ("int8", Config::Predicted(Selector::Int8)),
        ("int4", Config::Predicted(Selector::Int4)),
        ("trained", Config::Predicted(Selector::Trained)),
    ];
    // `FLASHPACK_REAL_MODES=dense,oracle,int8` measures only those (dense
    // first: the ratios are to it).
    let wanted = env("FLASHPACK_REAL_MODES");
    let configs: Vec<Config> = all
        .iter()
        .filter(|(name, _)| {
            wanted
                .as_deref()
                .is_none_or(|w| w.split(',').any(|m| m.trim() == *name))
        })
        .map(|(_, c)| *c)
        .collect();
    let name = |config: Config| match config {
        Config::Dense => ("dense", "-".to_string()),
        Config::Oracle => ("oracle", "exact".to_string()),
        Config::Predicted(s) => ("predicted", format!("{s:?}").to_lowercase()),
    };
    if env("FLASHPACK_REAL_PPL").as_deref() != Some("0") {
        println!("| mode | selector | perplexity | neurons computed | recall vs exact product | chosen / exact | selector DRAM bytes | selector / FFN f16 bytes |");
        println!("|---|---|---|---|---|---|---|---|");
        for &config in &configs {
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
            let (mode, selector) = name(config);
            let f = |v: Option<f64>, d: usize| v.map_or("-".to_string(), |v| format!("{v:.d$}"));
            println!(
                "| {mode} | {selector} | {:.4} | {:.1}% | {} | {} | {} | {} |",
                r.perplexity,
                100.0 * active,
                f(recall, 4),
                f(over, 3),
                if bytes > 0 {
                    bytes.to_string()
                } else {
                    "-".into()
                },
                if bytes > 0 {
                    format!("{:.3}", bytes as f64 / (ffn_bytes / 2) as f64)
                } else {
                    "-".into()
                },
            );
        }
    }
    // Timing, without the agreement measurement: every mode open at once and
    // timed in turn within each round, so that a busy moment of the machine
    // falls on all of them alike; the best round of each is reported, with
    // its split into selection, gate/up rows and down columns.
    let models: Vec<_> = configs.iter().map(|&c| open(&path, c, false)).collect();
    let hidden = models[0].0.model.config.hidden_size;
    let tokens = inputs.0[0].len() as f64;
    let threads = rayon::current_num_threads();
    // The timing runs inside a pool of its own, so that with one thread every
    // FFN (the dense matvecs' rayon tasks included) runs on this one thread,
    // whose CPU time then excludes the time this shared machine gave to
    // other processes (wall time does not).
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("a thread pool");
    // Per mode: best wall ms/token and its split, best CPU ms/token.
    let mut best = vec![(f64::INFINITY, None, f64::INFINITY); models.len()];
    pool.install(|| {
        let mut out = vec![0.0f32; hidden];
        for _round in 0..rounds {
            for ((m, timed), best) in models.iter().zip(best.iter_mut()) {
                let before = timed.as_ref().map(|c| c.phase_ms());
                let cpu0 = thread_cpu_ms();
                let started = Instant::now();
                // Token by token through all layers, as decoding goes: each
                // layer's weights come back from DRAM for every token (a layer
                // at a time for all tokens would keep its weights in cache).
                for t in 0..inputs.0[0].len() {
                    for (layer, xs) in m.model.layers.iter().zip(&inputs.0) {
                        layer
                            .ffn
                            .forward(&xs[t], 1, ActiveSet::All, &mut out, None)
                            .expect("FFN");
                    }
                }
                let ms = started.elapsed().as_secs_f64() * 1e3 / tokens;
                let cpu = (thread_cpu_ms() - cpu0) / tokens;
                best.2 = best.2.min(cpu);
                if ms < best.0 {
                    let split = timed.as_ref().zip(before).map(|(c, b)| {
                        let a = c.phase_ms();
                        (
                            (a.0 - b.0) / tokens,
                            (a.1 - b.1) / tokens,
                            (a.2 - b.2) / tokens,
                        )
                    });
                    best.0 = ms;
                    best.1 = split;
                }
            }
        }
    });
    let cpu_note = if threads == 1 {
        "CPU ms/token is this thread's CPU time (all the work ran on it)"
    } else {
        "CPU ms/token is the calling thread's only: read the wall time"
    };
    println!(
        "\nFFN time per token ({threads} threads, best of {rounds} rounds; {cpu_note})\n| mode | selector | FFN wall ms/token | vs dense | FFN CPU ms/token | vs dense | neurons computed | selection ms | gate/up rows ms | down columns ms |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    let dense = configs
        .iter()
        .position(|c| matches!(c, Config::Dense))
        .map(|i| (best[i].0, best[i].2));
    for ((&config, (_, timed)), (ms, split, cpu)) in configs.iter().zip(&models).zip(&best) {
        let (mode, selector) = name(config);
        let (sel, rows, down) = match split {
            Some((a, b, c)) => (format!("{a:.2}"), format!("{b:.2}"), format!("{c:.2}")),
            None => ("-".into(), "-".into(), "-".into()),
        };
        println!(
            "| {mode} | {selector} | {ms:.2} | {} | {cpu:.2} | {} | {:.1}% | {sel} | {rows} | {down} |",
            dense.map_or("-".into(), |d| format!("{:.2}x", ms / d.0)),
            dense.map_or("-".into(), |d| format!("{:.2}x", cpu / d.1)),
            100.0 * timed.as_ref().map_or(1.0, |c| c.active_fraction()),
        );
    }
}

/// CPU time of the calling thread, in milliseconds.
fn thread_cpu_ms() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills the struct it is given.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return f64::NAN;
    }
    ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 / 1e6
}
