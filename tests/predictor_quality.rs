//! Calibration, predictors and the sparse FFN modes on the transformers-trained
//! fixtures: oracle computes exactly the fired neurons and equals dense; the
//! hot-first neuron order changes nothing; predicted mode keeps perplexity and
//! stays sparse; calibrated packing is reproducible across thread counts.

mod common;
use common::{fixtures, nmse};

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use flashpack::input::Checkpoint;
use flashpack::pack::{convert, ConvertOptions};
use flashpack::predictor::calibrate::{calibrate, words, CalibrationOptions};
use flashpack::predictor::pipeline::CalibrationPlan;
use flashpack::predictor::train::{LowRankPredictor, TrainOptions};
use flashpack::runtime::ffn::Fired;
use flashpack::runtime::perplexity::perplexity;
use flashpack::runtime::sparse::{FfnMode, SparsityData};
use flashpack::runtime::{open_model, Logits, Model, Observer};

fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

const CALIB_TOKENS: usize = 8192;

/// A calibrated packed file of a fixture, made once per test binary.
fn calibrated(name: &'static str) -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    static FILES: OnceLock<std::sync::Mutex<Vec<(&'static str, &'static Path)>>> = OnceLock::new();
    let dir = DIR.get_or_init(|| tempfile::tempdir().unwrap());
    let files = FILES.get_or_init(Default::default);
    let mut files = files.lock().unwrap();
    if let Some((_, p)) = files.iter().find(|(n, _)| *n == name) {
        return p;
    }
    let out: &'static Path = Box::leak(
        dir.path()
            .join(format!("{name}.flashpack"))
            .into_boxed_path(),
    );
    let options = ConvertOptions {
        calibration: Some(CalibrationPlan {
            files: vec![fixtures().join("text/train.txt")],
            calibrate: CalibrationOptions {
                max_tokens: CALIB_TOKENS,
                ..CalibrationOptions::default()
            },
            train: TrainOptions::default(),
        }),
        ..ConvertOptions::default()
    };
    convert(&model_dir(name), out, &options, flashpack::progress::SILENT).unwrap();
    files.push((name, out));
    out
}

fn heldout_ids(tok: &flashpack::input::TextTokenizer) -> Vec<u32> {
    tok.encode(&std::fs::read_to_string(fixtures().join("text/heldout.txt")).unwrap())
        .unwrap()
}

/// Counts neurons that fire in a dense pass.
struct FiredCount(u64);

impl Observer for FiredCount {
    fn ffn(&mut self, _: usize, _: &[f32], _: usize, fired: &Fired) {
        self.0 += fired.per_token.iter().map(|s| s.len() as u64).sum::<u64>();
    }
}

fn logits_all(model: &Model, ids: &[u32], observer: Option<&mut dyn Observer>) -> Vec<f32> {
    model
        .forward(&mut model.new_cache(), ids, Logits::All, observer)
        .unwrap()
}

#[test]
fn oracle_computes_exactly_the_fired_neurons_and_equals_dense_on_relu_models() {
    for name in ["opt-relu", "llama-relu-gqa"] {
        let dense = open_model(&model_dir(name)).unwrap();
        let ids = &heldout_ids(&dense.tokenizer)[..200];
        let mut fired = FiredCount(0);
        let reference = logits_all(&dense.model, ids, Some(&mut fired));
        let mut oracle = open_model(&model_dir(name)).unwrap();
        let counter = oracle.set_ffn_mode(FfnMode::Oracle).unwrap().unwrap();
        let got = logits_all(&oracle.model, ids, None);
        let computed = counter.computed.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(
            computed, fired.0,
            "{name}: computed neurons must be exactly the fired ones"
        );
        let e = nmse(&got, &reference);
        println!(
            "{name}: oracle computes {:.1}% of neurons, NMSE vs dense {e:.3e}",
            100.0 * counter.active_fraction()
        );
        assert!(e < 1e-8, "{name}: {e}");
    }
}

#[test]
fn everything_predicted_equals_dense() {
    let mut loaded = open_model(&model_dir("llama-relu-gqa")).unwrap();
    let ids = &heldout_ids(&loaded.tokenizer)[..64];
    let reference = logits_all(&loaded.model, ids, None);
    let cfg = loaded.model.config.clone();
    let (d, ffn, rank) = (cfg.hidden_size, cfg.ffn_width, 4);
    let predictor = LowRankPredictor {
        d,
        rank,
        ffn,
        a: (0..d * rank).map(|i| (i as f32 * 0.37).sin()).collect(),
        b: (0..rank * ffn).map(|i| (i as f32 * 0.11).cos()).collect(),
        bias: vec![0.0; ffn],
        threshold: f32::NEG_INFINITY,
    };
    loaded.sparsity = Some(SparsityData {
        predictors: vec![Some(predictor); cfg.num_layers],
        silu_thresholds: vec![None; cfg.num_layers],
        silu_criterion: flashpack::runtime::ffn::Criterion::Gate,
        selector: flashpack::runtime::sparse::Selector::Trained,
        measure_selector: false,
        copies: Vec::new(),
    });
    let counter = loaded.set_ffn_mode(FfnMode::Predicted).unwrap().unwrap();
    let got = logits_all(&loaded.model, ids, None);
    assert_eq!(counter.active_fraction(), 1.0);
    // The sparse path sums each neuron's dot product in its own order (the dense
    // prefill uses a GEMM), so equality is up to float rounding.
    let e = nmse(&got, &reference);
    println!("everything predicted vs dense: NMSE {e:.3e}");
    assert!(e < 1e-12, "{e}");
}

#[test]
fn calibration_statistics_are_consistent_with_the_firing_masks() {
    let ckpt = Checkpoint::open(&model_dir("opt-relu")).unwrap();
    let model = Model::from_checkpoint(&ckpt).unwrap();
    let tok = ckpt.tokenizer().unwrap();
    let opts = CalibrationOptions {
        max_tokens: 700,
        ctx: 256,
        ..CalibrationOptions::default()
    };
    let cal = calibrate(
        &model,
        &ckpt.names,
        &ckpt,
        &tok,
        &[fixtures().join("text/train.txt")],
        &opts,
        flashpack::progress::SILENT,
    )
    .unwrap();
    assert_eq!(cal.tokens, 700);
    assert_eq!(cal.windows, vec![256, 256, 188]);
    let w = words(cal.width);
    for (layer, stats) in cal.layers.iter().enumerate() {
        let (inputs, fired) = cal.layer_data(layer).unwrap();
        assert_eq!(inputs.len(), 700 * cal.hidden);
        let per_token: Vec<usize> = fired
            .chunks(w)
            .map(|row| row.iter().map(|x| x.count_ones() as usize).sum())
            .collect();
        assert_eq!(
            stats.window_max[0],
            *per_token.iter().max().unwrap(),
            "K = 1 is the largest single token"
        );
        assert!(
            stats.window_max.windows(2).all(|p| p[0] <= p[1]),
            "{:?}",
            stats.window_max
        );
        assert!(stats.window_max[3] <= cal.width);
        let total: u64 = stats.frequency.iter().map(|&f| f as u64).sum();
        assert_eq!(total, per_token.iter().sum::<usize>() as u64);
        let order = cal.neuron_order(layer);
        assert!(order
            .windows(2)
            .all(|p| stats.frequency[p[0] as usize] >= stats.frequency[p[1] as usize]));
    }
}

#[test]
fn hot_first_order_leaves_dense_and_oracle_unchanged() {
    let packed_path = calibrated("opt-relu");
    let file = flashpack::format::PackedFile::open(packed_path).unwrap();
    let dense_section = file.read_section("dense").unwrap();
    let order = file.tensor_entry("flashpack.ffn.1.order").unwrap();
    let first: Vec<u32> = dense_section[order.offset as usize..order.offset as usize + 16]
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_ne!(
        first,
        vec![0, 1, 2, 3],
        "calibrated order should not be the identity"
    );
    for mode in [FfnMode::Dense, FfnMode::Oracle] {
        let mut source = open_model(&model_dir("opt-relu")).unwrap();
        let mut packed = open_model(packed_path).unwrap();
        source.set_ffn_mode(mode).unwrap();
        packed.set_ffn_mode(mode).unwrap();
        let ids = &heldout_ids(&source.tokenizer)[..128];
        let e = nmse(
            &logits_all(&packed.model, ids, None),
            &logits_all(&source.model, ids, None),
        );
        println!("{mode:?}: permuted vs checkpoint order NMSE {e:.3e}");
        assert!(e < 1e-10, "{mode:?}: {e}");
    }
}

#[test]
fn predicted_mode_keeps_perplexity_and_is_sparse_on_relu_fixtures() {
    for name in ["opt-relu", "llama-relu-gqa"] {
        let packed = calibrated(name);
        let mut ppl = Vec::new();
        let mut active = Vec::new();
        for mode in [FfnMode::Dense, FfnMode::Oracle, FfnMode::Predicted] {
            let mut loaded = open_model(packed).unwrap();
            let counter = loaded.set_ffn_mode(mode).unwrap();
            let ids = heldout_ids(&loaded.tokenizer);
            ppl.push(perplexity(&loaded.model, &ids, 256).unwrap().perplexity);
            active.push(counter.map_or(1.0, |c| c.active_fraction()));
        }
        let (dense, predicted) = (ppl[0], ppl[2]);
        let (truly, chosen) = (active[1], active[2]);
        println!(
            "{name}: perplexity dense {dense:.3} oracle {:.3} predicted {predicted:.3}; active: true {:.1}%, predicted {:.1}% ({:.2}x)",
            ppl[1],
            100.0 * truly,
            100.0 * chosen,
            chosen / truly
        );
        assert!(
            (predicted - dense).abs() / dense < 0.01,
            "{name}: predicted perplexity {predicted} vs dense {dense}"
        );
        assert!(chosen <= 0.25, "{name}: predicted {chosen} of the FFN");
        assert!(
            chosen <= 2.0 * truly,
            "{name}: predicted {chosen} vs truly active {truly}"
        );
    }
}

#[test]
fn silu_thresholds_reach_the_target_sparsity() {
    let packed = calibrated("llama-silu");
    let file = flashpack::format::PackedFile::open(packed).unwrap();
    let cal = file.manifest.calibration.as_ref().unwrap();
    assert_eq!(cal.target_sparsity, Some(0.5));
    assert!(cal
        .layers
        .iter()
        .all(|l| l.product_threshold.is_some_and(|t| t > 0.0) && l.silu_threshold.is_none()));
    let mut dense = open_model(packed).unwrap();
    let ids = heldout_ids(&dense.tokenizer);
    let dense_ppl = perplexity(&dense.model, &ids, 256).unwrap().perplexity;
    dense.set_ffn_mode(FfnMode::Oracle).unwrap();
    let mut oracle = open_model(packed).unwrap();
    let counter = oracle.set_ffn_mode(FfnMode::Oracle).unwrap().unwrap();
    let oracle_ppl = perplexity(&oracle.model, &ids, 256).unwrap().perplexity;
    let fraction = counter.active_fraction();
    println!("llama-silu: threshold keeps {:.1}% of neurons; perplexity {dense_ppl:.3} -> {oracle_ppl:.3}", 100.0 * fraction);
    assert!(
        (fraction - 0.5).abs() < 0.05,
        "held-out active fraction {fraction}"
    );
    assert!(
        oracle_ppl > dense_ppl,
        "dropping half the activations costs something"
    );
}

#[test]
fn calibrated_convert_is_reproducible_across_thread_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let mut outputs = Vec::new();
    for threads in ["1", "2"] {
        let out = tmp.path().join(format!("{threads}.flashpack"));
        let status = std::process::Command::new(env!("CARGO_BIN_EXE_flashpack"))
            .env("RAYON_NUM_THREADS", threads)
            .args([
                "convert",
                model_dir("llama-silu").to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
            ])
            .args([
                "--calib",
                fixtures().join("text/train.txt").to_str().unwrap(),
                "--calib-tokens",
                "2048",
                "--seed",
                "7",
            ])
            .output()
            .unwrap();
        assert!(
            status.status.success(),
            "{}",
            String::from_utf8_lossy(&status.stderr)
        );
        outputs.push(std::fs::read(&out).unwrap());
    }
    assert!(
        outputs[0] == outputs[1],
        "calibrated output differs between 1 and 2 threads"
    );
}

#[test]
fn inspect_lists_predictor_layers() {
    let packed = calibrated("opt-relu");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flashpack"))
        .args(["inspect", packed.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let layers = v["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 4);
    for l in layers {
        for key in ["rank", "threshold", "recall", "precision"] {
            assert!(l[key].is_number(), "{key} in {l}");
        }
        assert!(l["recall"].as_f64().unwrap() >= 0.99 - 1e-9);
    }
    assert_eq!(v["calibration_tokens"], CALIB_TOKENS as u64);
}

fn flashpack_json(args: &[&str]) -> (i32, serde_json::Value) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flashpack"))
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {stderr}"));
    (out.status.code().unwrap(), json)
}

#[test]
fn predictors_train_adds_predictors_to_an_uncalibrated_file_and_verify_rechecks_recall() {
    let tmp = tempfile::tempdir().unwrap();
    let plain = tmp.path().join("plain.flashpack");
    let trained = tmp.path().join("trained.flashpack");
    let src = model_dir("llama-silu");
    let text = fixtures().join("text/train.txt");
    let heldout = fixtures().join("text/heldout.txt");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    assert_eq!(
        flashpack_json(&["convert", &s(&src), "-o", &s(&plain)]).0,
        0
    );
    // Without predictors, a recall check has nothing to check: a failed check.
    assert_eq!(
        flashpack_json(&["verify", &s(&plain), "--calib", &s(&heldout)]).0,
        1
    );
    let (code, summary) = flashpack_json(&[
        "predictors",
        "train",
        &s(&plain),
        "-o",
        &s(&trained),
        "--calib",
        &s(&text),
        "--calib-tokens",
        "2048",
    ]);
    assert_eq!(code, 0);
    assert_eq!(summary["predictors"].as_array().unwrap().len(), 4);
    // Everything else is as converted: weights and logits still match the source.
    let (code, report) = flashpack_json(&[
        "verify",
        &s(&trained),
        "--against",
        &s(&src),
        "--calib",
        &s(&heldout),
    ]);
    assert_eq!(code, 0, "{report}");
    let recalls = report["predictor_recall"].as_array().unwrap();
    assert_eq!(recalls.len(), 4);
    assert!(
        recalls
            .iter()
            .all(|r| r["recall"].as_f64().unwrap() >= 0.95),
        "{recalls:?}"
    );
    // An impossible recall bar is a failed check, exit 1.
    let (code, _) = flashpack_json(&[
        "verify",
        &s(&trained),
        "--calib",
        &s(&heldout),
        "--min-recall",
        "1.0",
    ]);
    assert_eq!(code, 1);
    // Predicted mode runs from the retrained file.
    let (code, eval) = flashpack_json(&[
        "eval",
        &s(&trained),
        "--text",
        &s(&heldout),
        "--ffn",
        "predicted",
    ]);
    assert_eq!(code, 0);
    assert!(eval["ffn_active_fraction"].as_f64().unwrap() < 1.0);
}

#[test]
fn calibrate_command_keeps_the_trace_it_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let trace = tmp.path().join("trace");
    let (code, report) = flashpack_json(&[
        "calibrate",
        model_dir("opt-relu").to_str().unwrap(),
        "--calib",
        fixtures().join("text/train.txt").to_str().unwrap(),
        "--calib-tokens",
        "512",
        "--keep-trace",
        trace.to_str().unwrap(),
    ]);
    assert_eq!(code, 0);
    assert_eq!(report["calibration_tokens"], 512);
    let layers = report["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 4);
    for layer in 0..4 {
        let bits = std::fs::metadata(trace.join(format!("layer{layer}.fired.bits")))
            .unwrap()
            .len();
        assert_eq!(bits, 512 * 8 * 8, "512 tokens x 512 neurons as bits");
        let inputs = std::fs::metadata(trace.join(format!("layer{layer}.inputs.f16")))
            .unwrap()
            .len();
        assert_eq!(inputs, 512 * 128 * 2);
    }
}
