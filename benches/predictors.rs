//! Predictor benchmark (a measurement, not a test): for each fixture model,
//! calibrate and train predictors (convert --calib), then report per layer the
//! predictor's held-out metrics, calibration throughput, training time per layer,
//! the predictor's time per token against the dense FFN's, and held-out perplexity
//! in dense, oracle and predicted modes.
//!
//! Run: `cargo bench --bench predictors` (models: `FLASHPACK_BENCH_MODELS=opt-relu,...`,
//! calibration tokens: `FLASHPACK_BENCH_CALIB_TOKENS`, default 8192).

use std::path::{Path, PathBuf};
use std::time::Instant;

use flashpack::pack::{convert, ConvertOptions};
use flashpack::predictor::calibrate::CalibrationOptions;
use flashpack::predictor::pipeline::CalibrationPlan;
use flashpack::predictor::train::TrainOptions;
use flashpack::runtime::ffn::ActiveSet;
use flashpack::runtime::open_model;
use flashpack::runtime::perplexity::perplexity;
use flashpack::runtime::sparse::FfnMode;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn main() {
    let models = std::env::var("FLASHPACK_BENCH_MODELS")
        .unwrap_or_else(|_| "opt-relu,llama-relu-gqa,llama-silu".into());
    let tokens: usize = std::env::var("FLASHPACK_BENCH_CALIB_TOKENS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8192);
    let tmp = tempfile::tempdir().unwrap();
    let heldout = std::fs::read_to_string(fixtures().join("text/heldout.txt")).unwrap();
    for name in models.split(',') {
        let out = tmp.path().join(format!("{name}.flashpack"));
        let options = ConvertOptions {
            calibration: Some(CalibrationPlan {
                files: vec![fixtures().join("text/train.txt")],
                calibrate: CalibrationOptions {
                    max_tokens: tokens,
                    ..CalibrationOptions::default()
                },
                train: TrainOptions::default(),
            }),
            ..ConvertOptions::default()
        };
        let summary = convert(
            &fixtures().join("models").join(name),
            &out,
            &options,
            flashpack::progress::SILENT,
        )
        .unwrap();
        let cal_s = summary.calibrate_ms.unwrap() / 1e3;
        println!("\n### {name}\n");
        println!(
            "calibration: {} tokens in {:.2} s ({:.0} tokens/s); training {:.1} s in all\n",
            summary.calibration_tokens.unwrap(),
            cal_s,
            summary.calibration_tokens.unwrap() as f64 / cal_s,
            summary.train_ms.unwrap() / 1e3
        );

        // Predictor vs FFN time for one token, per layer, on held-out inputs.
        let loaded = open_model(&out).unwrap();
        let ids = loaded.tokenizer.encode(&heldout).unwrap();
        let sparsity = loaded.sparsity.as_ref().unwrap();
        let hidden = loaded.model.config.hidden_size;
        let x: Vec<f32> = (0..hidden)
            .map(|i| ((i * 7919) % 113) as f32 / 113.0 - 0.5)
            .collect();
        let reps = 2000;
        println!("| layer | rank | threshold | recall | precision | predicted | truly active | predictor / FFN bytes | window max K=1,2,4,8 | train s | predictor us/token | dense FFN us/token | predictor / FFN time |");
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        for p in &summary.predictors {
            let predictor = sparsity.predictors[p.layer].as_ref().unwrap();
            let ffn = &loaded.model.layers[p.layer].ffn;
            let (mut scratch, mut logits, mut active) = (Vec::new(), Vec::new(), Vec::new());
            let t = Instant::now();
            for _ in 0..reps {
                predictor.predict(&x, &mut scratch, &mut logits, &mut active);
            }
            let predictor_us = t.elapsed().as_secs_f64() * 1e6 / reps as f64;
            let mut y = vec![0.0f32; hidden];
            let t = Instant::now();
            for _ in 0..reps {
                ffn.forward(&x, 1, ActiveSet::All, &mut y, None).unwrap();
            }
            let ffn_us = t.elapsed().as_secs_f64() * 1e6 / reps as f64;
            println!(
                "| {} | {} | {:.3} | {:.4} | {:.3} | {:.1}% | {:.1}% | {:.1}% | {:?} | {:.1} | {:.1} | {:.1} | {:.0}% |",
                p.layer,
                p.rank,
                p.threshold,
                p.recall,
                p.precision,
                100.0 * p.frac_predicted,
                100.0 * p.frac_true,
                p.bytes_percent_of_ffn,
                p.window_max,
                p.train_ms / 1e3,
                predictor_us,
                ffn_us,
                100.0 * predictor_us / ffn_us
            );
        }
        println!("\n| mode | held-out perplexity | FFN neurons computed |");
        println!("|---|---|---|");
        for mode in [FfnMode::Dense, FfnMode::Oracle, FfnMode::Predicted] {
            let mut m = open_model(&out).unwrap();
            let counter = m.set_ffn_mode(mode).unwrap();
            let ppl = perplexity(&m.model, &ids, 256).unwrap().perplexity;
            println!(
                "| {mode:?} | {ppl:.3} | {:.1}% |",
                100.0 * counter.map_or(1.0, |c| c.active_fraction())
            );
        }
    }
}
