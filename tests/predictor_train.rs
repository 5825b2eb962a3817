//! Predictor training (`flashpack::predictor::train`) on synthetic data with a planted
//! low-rank firing rule: loss, recall, precision, determinism, thresholds, rank
//! choice and input validation.

use flashpack::predictor::train::{
    threshold_for_recall, train_layer, LowRankPredictor, RankChoice, TrainOptions, TrainingSet,
};
use flashpack::Error;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Calibration-like data: `x_t = mean + scale * N(0, 1)` per feature, and neuron
/// `j` fires when `w_j . x_t + c_j > 0`, with `w = U V` of rank `planted` and `c_j`
/// giving each neuron a firing rate between about 1% and 30%.
struct Synthetic {
    inputs: Vec<f32>,
    fired: Vec<u64>,
    n: usize,
    d: usize,
    ffn: usize,
}

impl Synthetic {
    fn new(n: usize, d: usize, ffn: usize, planted: usize, seed: u64) -> Synthetic {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut normal = move || {
            // Box-Muller; u1 in (0, 1] keeps the log finite.
            let u1: f64 = 1.0 - rng.random::<f64>();
            let u2: f64 = rng.random::<f64>();
            (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
        };
        let mean: Vec<f64> = (0..d).map(|_| normal()).collect();
        let scale: Vec<f64> = (0..d).map(|i| 0.5 + (i % 5) as f64).collect();
        let u: Vec<f64> = (0..ffn * planted).map(|_| normal()).collect();
        let v: Vec<f64> = (0..planted * d).map(|_| normal()).collect();
        let mut w = vec![0.0f64; ffn * d];
        for j in 0..ffn {
            for q in 0..planted {
                for i in 0..d {
                    w[j * d + i] += u[j * planted + q] * v[q * d + i];
                }
            }
        }
        let c: Vec<f64> = (0..ffn)
            .map(|j| {
                let row = &w[j * d..(j + 1) * d];
                let centre: f64 = row.iter().zip(&mean).map(|(w, m)| w * m).sum();
                let spread: f64 = row
                    .iter()
                    .zip(&scale)
                    .map(|(w, s)| (w * s) * (w * s))
                    .sum::<f64>()
                    .sqrt();
                // z-score between 0.5 and 2.3: rates between ~1% and ~30%.
                let z = 0.5 + 1.8 * (j % 7) as f64 / 6.0;
                -centre - z * spread
            })
            .collect();
        let words = ffn.div_ceil(64);
        let mut inputs = vec![0.0f32; n * d];
        let mut fired = vec![0u64; n * words];
        for t in 0..n {
            let x: Vec<f64> = (0..d).map(|i| mean[i] + scale[i] * normal()).collect();
            for i in 0..d {
                inputs[t * d + i] = x[i] as f32;
            }
            for j in 0..ffn {
                let z: f64 = w[j * d..(j + 1) * d]
                    .iter()
                    .zip(&x)
                    .map(|(w, x)| w * x)
                    .sum();
                if z + c[j] > 0.0 {
                    fired[t * words + j / 64] |= 1 << (j % 64);
                }
            }
        }
        Synthetic {
            inputs,
            fired,
            n,
            d,
            ffn,
        }
    }

    fn set(&self) -> TrainingSet<'_> {
        TrainingSet {
            inputs: &self.inputs,
            fired: &self.fired,
            n: self.n,
            d: self.d,
            ffn: self.ffn,
        }
    }

    fn fired(&self, t: usize, j: usize) -> bool {
        let words = self.ffn.div_ceil(64);
        (self.fired[t * words + j / 64] >> (j % 64)) & 1 == 1
    }
}

fn small() -> Synthetic {
    Synthetic::new(4000, 32, 128, 4, 7)
}

fn fixed(rank: usize, seed: u64) -> TrainOptions {
    TrainOptions {
        rank: RankChoice::Fixed(rank),
        seed,
        ..TrainOptions::default()
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn same_bytes(p: &LowRankPredictor, q: &LowRankPredictor) -> bool {
    bits(&p.a) == bits(&q.a)
        && bits(&p.b) == bits(&q.b)
        && bits(&p.bias) == bits(&q.bias)
        && p.threshold.to_bits() == q.threshold.to_bits()
}

#[test]
fn training_lowers_the_loss_and_reaches_the_target_recall() {
    let data = small();
    let (pred, m) = train_layer(&data.set(), &fixed(8, 1)).unwrap();
    assert_eq!((pred.d, pred.rank, pred.ffn), (32, 8, 128));
    assert_eq!(
        (pred.a.len(), pred.b.len(), pred.bias.len()),
        (32 * 8, 8 * 128, 128)
    );
    assert!(m.heldout_loss < 0.5 * m.first_loss, "{m:?}");
    assert!(m.final_train_loss < m.first_loss, "{m:?}");
    assert!(m.recall >= 0.99, "{m:?}");
    assert!(
        m.heldout_tokens > 0 && m.heldout_tokens < data.n / 5,
        "{m:?}"
    );
    // The planted rule is linear, so a rank-8 predictor should be sharp.
    assert!(m.precision > 3.0 * m.frac_true, "{m:?}");
    assert!(m.frac_predicted <= 2.0 * m.frac_true, "{m:?}");

    // Independently, through `predict` on every token (mostly training tokens):
    // the recall is close to the target and the active lists are ascending.
    let (mut scratch, mut logits, mut active) = (Vec::new(), Vec::new(), Vec::new());
    let (mut hits, mut fired, mut predicted) = (0usize, 0usize, 0usize);
    for t in 0..data.n {
        pred.predict(
            &data.inputs[t * data.d..(t + 1) * data.d],
            &mut scratch,
            &mut logits,
            &mut active,
        );
        assert!(active.windows(2).all(|w| w[0] < w[1]));
        predicted += active.len();
        hits += active
            .iter()
            .filter(|&&j| data.fired(t, j as usize))
            .count();
        fired += (0..data.ffn).filter(|&j| data.fired(t, j)).count();
    }
    let recall = hits as f64 / fired as f64;
    assert!(recall > 0.97, "recall over all tokens {recall}");
    assert!(
        predicted <= 3 * fired,
        "{predicted} predicted, {fired} fired"
    );
}

#[test]
fn widths_that_are_not_multiples_of_the_lanes_or_words() {
    let data = Synthetic::new(1500, 13, 77, 3, 5);
    let (pred, m) = train_layer(&data.set(), &fixed(6, 3)).unwrap();
    assert_eq!(
        (pred.a.len(), pred.b.len(), pred.bias.len()),
        (13 * 6, 6 * 77, 77)
    );
    assert!(m.recall >= 0.99, "{m:?}");
    assert!(m.heldout_loss < m.first_loss, "{m:?}");
    let (mut scratch, mut logits, mut active) = (Vec::new(), Vec::new(), Vec::new());
    pred.predict(&data.inputs[..13], &mut scratch, &mut logits, &mut active);
    assert!(active.iter().all(|&j| j < 77));
}

#[test]
fn same_seed_same_bytes_with_one_or_two_threads() {
    let data = small();
    let opts = TrainOptions {
        max_epochs: 4,
        ..fixed(8, 42)
    };
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| train_layer(&data.set(), &opts).unwrap())
    };
    let (p1, m1) = run(1);
    let (p2, m2) = run(2);
    assert!(same_bytes(&p1, &p2));
    assert_eq!(m1.heldout_loss.to_bits(), m2.heldout_loss.to_bits());
    assert_eq!(m1.final_train_loss.to_bits(), m2.final_train_loss.to_bits());
    assert_eq!(m1.recall, m2.recall);
}

#[test]
fn different_seed_different_weights() {
    let data = small();
    let opts = |seed| TrainOptions {
        max_epochs: 2,
        ..fixed(4, seed)
    };
    let (p1, _) = train_layer(&data.set(), &opts(1)).unwrap();
    let (p2, _) = train_layer(&data.set(), &opts(2)).unwrap();
    assert_ne!(bits(&p1.a), bits(&p2.a));
    assert_ne!(bits(&p1.b), bits(&p2.b));
}

#[test]
fn lowest_threshold_predicts_every_neuron() {
    let data = small();
    let (mut pred, _) = train_layer(
        &data.set(),
        &TrainOptions {
            max_epochs: 1,
            ..fixed(2, 0)
        },
    )
    .unwrap();
    pred.threshold = f32::MIN;
    let (mut scratch, mut logits, mut active) = (Vec::new(), Vec::new(), Vec::new());
    for t in [0, 1, data.n - 1] {
        pred.predict(
            &data.inputs[t * data.d..(t + 1) * data.d],
            &mut scratch,
            &mut logits,
            &mut active,
        );
        assert_eq!(active, (0..data.ffn as u32).collect::<Vec<_>>());
    }
    pred.threshold = f32::NEG_INFINITY;
    pred.predict(
        &data.inputs[..data.d],
        &mut scratch,
        &mut logits,
        &mut active,
    );
    assert_eq!(active.len(), data.ffn);
}

#[test]
fn threshold_for_recall_is_the_highest_that_reaches_the_target() {
    // Two tokens, ffn = 3; fired: token 0 neurons 0 and 2, token 1 neuron 1.
    let logits = [5.0, -1.0, 1.0, 0.0, 3.0, 9.0];
    let fired = [0b101u64, 0b010];
    // Positive logits 5, 1, 3: all three need threshold 1, two of three need 3.
    assert_eq!(threshold_for_recall(&logits, &fired, 3, 1.0), 1.0);
    assert_eq!(threshold_for_recall(&logits, &fired, 3, 0.99), 1.0);
    assert_eq!(threshold_for_recall(&logits, &fired, 3, 2.0 / 3.0), 3.0);
    assert_eq!(threshold_for_recall(&logits, &fired, 3, 0.5), 3.0);
    assert_eq!(threshold_for_recall(&logits, &fired, 3, 0.3), 5.0);
    // Nothing fired: predict nothing.
    assert_eq!(threshold_for_recall(&logits, &[0, 0], 3, 0.99), f32::MAX);
}

#[test]
fn auto_rank_grows_until_at_most_twice_the_true_active() {
    let data = small();
    let opts = TrainOptions {
        rank: RankChoice::Auto { start: 1, max: 64 },
        max_epochs: 15,
        ..TrainOptions::default()
    };
    let (pred, m) = train_layer(&data.set(), &opts).unwrap();
    assert!(
        [1, 2, 4, 8, 16, 32].contains(&pred.rank),
        "rank {}",
        pred.rank
    );
    assert_eq!(m.rank, pred.rank);
    assert!(m.frac_predicted <= 2.0 * m.frac_true, "{m:?}");
    assert!(m.recall >= 0.99, "{m:?}");
    assert_eq!(
        pred.size_bytes_f16(),
        (32 * pred.rank + pred.rank * 128 + 128) * 2
    );
}

#[test]
fn bad_inputs_are_errors() {
    let data = small();
    let ok = data.set();
    let opts = fixed(4, 0);
    let invalid = |set: TrainingSet, opts: &TrainOptions| {
        matches!(train_layer(&set, opts), Err(Error::InvalidArgument(_)))
    };
    assert!(invalid(
        TrainingSet {
            n: 0,
            inputs: &[],
            fired: &[],
            ..ok
        },
        &opts
    ));
    assert!(invalid(TrainingSet { n: ok.n - 1, ..ok }, &opts));
    assert!(invalid(TrainingSet { d: 31, ..ok }, &opts));
    assert!(invalid(TrainingSet { ffn: 200, ..ok }, &opts));
    assert!(invalid(
        TrainingSet {
            fired: &data.fired[2..],
            ..ok
        },
        &opts
    ));
    let mut nan = data.inputs.clone();
    nan[77] = f32::NAN;
    assert!(invalid(TrainingSet { inputs: &nan, ..ok }, &opts));
    // Too few tokens to hold any out.
    let one = TrainingSet {
        inputs: &data.inputs[..32],
        fired: &data.fired[..2],
        n: 1,
        ..ok
    };
    assert!(invalid(one, &opts));
    for bad in [
        fixed(0, 0),
        fixed(33, 0),
        TrainOptions {
            rank: RankChoice::Auto { start: 8, max: 4 },
            ..opts.clone()
        },
        TrainOptions {
            target_recall: 0.0,
            ..opts.clone()
        },
        TrainOptions {
            target_recall: 1.5,
            ..opts.clone()
        },
        TrainOptions {
            holdout_fraction: 0.0,
            ..opts.clone()
        },
        TrainOptions {
            holdout_fraction: 0.9,
            ..opts.clone()
        },
        TrainOptions {
            batch_size: 0,
            ..opts.clone()
        },
        TrainOptions {
            max_epochs: 0,
            ..opts.clone()
        },
        TrainOptions {
            learning_rate: f32::NAN,
            ..opts.clone()
        },
        TrainOptions {
            weight_decay: -1.0,
            ..opts.clone()
        },
    ] {
        assert!(invalid(ok, &bad), "{bad:?} accepted");
    }
}

/// Fixture-sized layer (d = 128, ffn = 512, 20k tokens): prints the training time.
/// `cargo test --test predictor_train -- --ignored --nocapture`; knobs (for tuning):
/// `PRED_RANKS=32,128,auto`, `PRED_TARGET`, `PRED_LR`, `PRED_BATCH`.
#[test]
#[ignore]
fn fixture_sized_training_time() {
    let data = Synthetic::new(20_000, 128, 512, 48, 3);
    for rank in std::env::var("PRED_RANKS")
        .map(|s| {
            s.split(",")
                .map(|r| match r {
                    "auto" => TrainOptions::default().rank,
                    r => RankChoice::Fixed(r.parse().unwrap()),
                })
                .collect::<Vec<_>>()
        })
        .unwrap_or(vec![
            RankChoice::Fixed(32),
            RankChoice::Fixed(128),
            TrainOptions::default().rank,
        ])
    {
        let start = std::time::Instant::now();
        let defaults = TrainOptions::default();
        let env = |name: &str| std::env::var(name).ok();
        let opts = TrainOptions {
            rank,
            target_recall: env("PRED_TARGET")
                .map_or(defaults.target_recall, |v| v.parse().unwrap()),
            batch_size: env("PRED_BATCH").map_or(defaults.batch_size, |v| v.parse().unwrap()),
            learning_rate: env("PRED_LR").map_or(defaults.learning_rate, |v| v.parse().unwrap()),
            ..defaults
        };
        let (_, m) = train_layer(&data.set(), &opts).unwrap();
        println!("{rank:?}: {:.2} s, {m:?}", start.elapsed().as_secs_f64());
    }
}
