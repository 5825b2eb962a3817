//! SiLU models choose neurons by the product criterion (issue 12): the scores
//! against an independent f64 reference; calibrated files record one product
//! threshold per layer whose sparsities average to the model-wide target, and
//! the oracle meets it on held-out text; greedy allocation measures less output
//! error than uniform; rule 20; files calibrated with the gate criterion still
//! read and run as before.

mod common;
use common::fixtures;

use std::path::{Path, PathBuf};

use flashpack::format::layout::Preamble;
use flashpack::format::{FormatError, PackedFile};
use flashpack::input::config::Activation;
use flashpack::pack::{convert, ConvertOptions};
use flashpack::predictor::calibrate::CalibrationOptions;
use flashpack::predictor::pipeline::CalibrationPlan;
use flashpack::predictor::thresholds::Allocation;
use flashpack::predictor::train::{RankChoice, TrainOptions};
use flashpack::runtime::ffn::{Criterion, DenseFfn, Ffn, FfnWeights};
use flashpack::runtime::open_model;
use flashpack::runtime::perplexity::perplexity;
use flashpack::runtime::sparse::FfnMode;
use flashpack::runtime::weights::{Linear, Matrix, Storage};
use flashpack::Error;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

fn calibrated(dir: &Path, allocation: Allocation) -> PathBuf {
    let out = dir.join(format!("llama-silu-{allocation:?}.flashpack"));
    let options = ConvertOptions {
        calibration: Some(CalibrationPlan {
            files: vec![fixtures().join("text/train.txt")],
            calibrate: CalibrationOptions {
                max_tokens: 4096,
                allocation,
                ..CalibrationOptions::default()
            },
            train: TrainOptions {
                rank: RankChoice::Fixed(8),
                ..TrainOptions::default()
            },
        }),
        ..ConvertOptions::default()
    };
    convert(
        &fixtures().join("models/llama-silu"),
        &out,
        &options,
        flashpack::progress::SILENT,
    )
    .unwrap();
    out
}

fn heldout_ids(tok: &flashpack::input::TextTokenizer) -> Vec<u32> {
    tok.encode(&std::fs::read_to_string(fixtures().join("text/heldout.txt")).unwrap())
        .unwrap()
}

/// Perplexity on the held-out text and the fraction of neurons computed.
fn oracle_run(path: &Path) -> (f64, f64) {
    let mut m = open_model(path).unwrap();
    let ids = heldout_ids(&m.tokenizer);
    let counter = m.set_ffn_mode(FfnMode::Oracle).unwrap().unwrap();
    let ppl = perplexity(&m.model, &ids, 256).unwrap().perplexity;
    (ppl, counter.active_fraction())
}

/// Deterministic pseudo-random values in [-scale, scale).
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32 * scale
        })
        .collect()
}

#[test]
fn product_scores_equal_silu_gate_times_up_computed_independently() {
    let (hidden, width, n) = (48, 40, 3);
    let linear = |seed| Linear {
        weight: Matrix::new(
            width,
            hidden,
            Storage::F32(values(width * hidden, seed, 0.3)),
        )
        .unwrap(),
        bias: None,
    };
    let down = Linear {
        weight: Matrix::new(hidden, width, Storage::F32(values(width * hidden, 3, 0.3))).unwrap(),
        bias: None,
    };
    let ffn = DenseFfn {
        weights: FfnWeights::Gated {
            gate: linear(1),
            up: linear(2),
            down,
        },
        activation: Activation::Silu,
    };
    let x = values(n * hidden, 4, 1.0);
    let (gate, up) = (
        values(width * hidden, 1, 0.3),
        values(width * hidden, 2, 0.3),
    );
    let product = ffn.selection_scores(&x, n, Criterion::Product).unwrap();
    let gated = ffn.selection_scores(&x, n, Criterion::Gate).unwrap();
    for t in 0..n {
        for j in 0..width {
            let dot = |w: &[f32]| -> f64 {
                (0..hidden)
                    .map(|k| w[j * hidden + k] as f64 * x[t * hidden + k] as f64)
                    .sum()
            };
            let (g, u) = (dot(&gate), dot(&up));
            let silu = g / (1.0 + (-g).exp());
            let (p, s) = (product[t * width + j] as f64, gated[t * width + j] as f64);
            assert!(
                (p - silu * u).abs() <= 1e-5 * (1.0 + (silu * u).abs()),
                "product {p} vs {}",
                silu * u
            );
            assert!(
                (s - silu).abs() <= 1e-5 * (1.0 + silu.abs()),
                "gate {s} vs {silu}"
            );
        }
    }
}

#[test]
fn calibrated_product_thresholds_meet_the_model_wide_target() {
    let tmp = tempfile::tempdir().unwrap();
    for allocation in [Allocation::Uniform, Allocation::Greedy] {
        let path = calibrated(tmp.path(), allocation);
        let file = PackedFile::open(&path).unwrap();
        let cal = file.manifest.calibration.as_ref().unwrap();
        assert_eq!(cal.target_sparsity, Some(0.5));
        let mut sum = 0.0;
        for l in &cal.layers {
            assert_eq!(
                l.silu_threshold, None,
                "the gate criterion's key stays null"
            );
            assert!(l
                .product_threshold
                .is_some_and(|t| t >= 0.0 && t.is_finite()));
            let s = l.layer_sparsity.unwrap();
            if allocation == Allocation::Uniform {
                assert_eq!(s, 0.5);
            }
            sum += s;
        }
        let mean = sum / cal.layers.len() as f64;
        assert!(
            (mean - 0.5).abs() < 1e-9,
            "{allocation:?}: mean layer sparsity {mean}"
        );
        let (ppl, active) = oracle_run(&path);
        println!(
            "{allocation:?}: held-out oracle perplexity {ppl:.3}, {:.1}% of neurons",
            100.0 * active
        );
        assert!(
            (active - 0.5).abs() < 0.05,
            "{allocation:?}: held-out active fraction {active}"
        );
        // Calibration labels (what the predictors train on) fire at the same rate.
        let labelled: f64 = cal
            .layers
            .iter()
            .map(|l| l.mean_active_fraction)
            .sum::<f64>()
            / cal.layers.len() as f64;
        assert!(
            (labelled - 0.5).abs() < 0.02,
            "{allocation:?}: labels {labelled}"
        );
    }
}

#[test]
fn greedy_allocation_has_no_more_output_error_than_uniform() {
    use flashpack::predictor::thresholds::{allocate, LEVELS};
    let ckpt = flashpack::input::Checkpoint::open(&fixtures().join("models/llama-silu")).unwrap();
    let model = flashpack::runtime::Model::from_checkpoint(&ckpt).unwrap();
    let cal = flashpack::predictor::calibrate::calibrate(
        &model,
        &ckpt.names,
        &ckpt,
        &ckpt.tokenizer().unwrap(),
        &[fixtures().join("text/train.txt")],
        &CalibrationOptions {
            max_tokens: 2048,
            ..CalibrationOptions::default()
        },
        flashpack::progress::SILENT,
    )
    .unwrap();
    assert_eq!(cal.curves.len(), model.config.num_layers);
    for target in [0.3, 0.5, 0.7] {
        let error = |how| -> f64 {
            allocate(&cal.curves, target, how)
                .iter()
                .zip(&cal.curves)
                .map(|(c, curve)| {
                    curve.errors[((c.sparsity * LEVELS as f64).round() as usize).min(LEVELS - 1)]
                })
                .sum()
        };
        let (greedy, uniform) = (error(Allocation::Greedy), error(Allocation::Uniform));
        assert!(
            greedy <= uniform * (1.0 + 1e-12),
            "{target}: greedy {greedy} vs uniform {uniform}"
        );
        let thresholds = cal.thresholds_for(target, Allocation::Uniform).unwrap();
        assert_eq!(thresholds.len(), model.config.num_layers);
    }
}

// ------------------------------------------------------------------ rule 20

/// The file with its manifest replaced by `edit(manifest)`, re-hashed (rule 5 holds).
fn with_manifest(path: &Path, out: &Path, edit: impl FnOnce(&mut Value)) {
    let bytes = std::fs::read(path).unwrap();
    let mut p = Preamble::from_bytes(bytes[..64].try_into().unwrap());
    let at = p.manifest_offset as usize;
    let mut m: Value = serde_json::from_slice(&bytes[at..]).unwrap();
    edit(&mut m);
    let text = serde_json::to_vec(&m).unwrap();
    p.manifest_length = text.len() as u64;
    p.manifest_sha256 = Sha256::digest(&text).into();
    let mut new = bytes[..at].to_vec();
    new[..64].copy_from_slice(&p.to_bytes());
    new.extend_from_slice(&text);
    std::fs::write(out, new).unwrap();
}

fn open_error(path: &Path) -> FormatError {
    match PackedFile::open(path) {
        Err(Error::Format { source, .. }) => source,
        Err(other) => panic!("expected a format error, got {other}"),
        Ok(_) => panic!("file was accepted"),
    }
}

#[test]
fn rule_20_product_thresholds() {
    let tmp = tempfile::tempdir().unwrap();
    let path = calibrated(tmp.path(), Allocation::Greedy);
    let out = tmp.path().join("edited.flashpack");
    fn layer(m: &mut Value, i: usize) -> &mut Value {
        &mut m["calibration"]["layers"][i]
    }
    type Edit = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "one layer without",
            Box::new(|m| {
                layer(m, 1)
                    .as_object_mut()
                    .unwrap()
                    .remove("product_threshold");
            }),
        ),
        (
            "negative",
            Box::new(|m| layer(m, 0)["product_threshold"] = json!(-0.5)),
        ),
        (
            "infinite as f32",
            Box::new(|m| layer(m, 2)["product_threshold"] = json!(1e39)),
        ),
        (
            "beside a gate threshold",
            Box::new(|m| layer(m, 0)["silu_threshold"] = json!(0.1)),
        ),
        (
            "sparsity above 1",
            Box::new(|m| layer(m, 3)["layer_sparsity"] = json!(1.5)),
        ),
    ];
    for (what, edit) in cases {
        with_manifest(&path, &out, |m| edit(m));
        let e = open_error(&out);
        assert_eq!(e.rule(), 20, "{what}: {e}");
    }
}

#[test]
fn a_file_calibrated_with_the_gate_criterion_still_runs_by_the_gate() {
    // A file as flashpack wrote them before issue 12: `silu_threshold` per layer,
    // no product keys. Its thresholds keep their meaning, `|silu(gate . x)|`.
    let tmp = tempfile::tempdir().unwrap();
    let path = calibrated(tmp.path(), Allocation::Uniform);
    let old = tmp.path().join("gate.flashpack");
    // The gate's median magnitude on calibration text, measured by the gate
    // criterion itself.
    let ckpt = flashpack::input::Checkpoint::open(&fixtures().join("models/llama-silu")).unwrap();
    let model = flashpack::runtime::Model::from_checkpoint(&ckpt).unwrap();
    let cal = flashpack::predictor::calibrate::calibrate(
        &model,
        &ckpt.names,
        &ckpt,
        &ckpt.tokenizer().unwrap(),
        &[fixtures().join("text/train.txt")],
        &CalibrationOptions {
            max_tokens: 2048,
            criterion: Criterion::Gate,
            allocation: Allocation::Uniform,
            ..CalibrationOptions::default()
        },
        flashpack::progress::SILENT,
    )
    .unwrap();
    let gate: Vec<f32> = cal
        .layers
        .iter()
        .map(|l| l.silu_threshold.unwrap())
        .collect();
    assert!(cal.layers.iter().all(|l| l.product_threshold.is_none()));
    with_manifest(&path, &old, |m| {
        for (i, t) in gate.iter().enumerate() {
            let l = m["calibration"]["layers"][i].as_object_mut().unwrap();
            l.remove("product_threshold");
            l.remove("layer_sparsity");
            l.insert("silu_threshold".into(), json!(t));
        }
    });
    PackedFile::open(&old).unwrap();
    // Compared with `|silu(gate . x)|`, the gate thresholds keep half the
    // neurons on held-out text; compared with the product (whose magnitudes
    // are on another scale) they would not.
    let (gate_ppl, active) = oracle_run(&old);
    assert!((active - 0.5).abs() < 0.05, "gate thresholds keep {active}");
    let (product_ppl, _) = oracle_run(&path);
    println!("llama-silu at 50%: gate criterion {gate_ppl:.3}, product {product_ppl:.3}");
}

#[test]
fn low_precision_selectors_choose_what_the_exact_product_criterion_chooses() {
    use flashpack::runtime::sparse::Selector;
    use std::sync::atomic::Ordering;
    let tmp = tempfile::tempdir().unwrap();
    let path = calibrated(tmp.path(), Allocation::Greedy);
    let (oracle_ppl, oracle_active) = oracle_run(&path);
    let ffn_f16_bytes = {
        let m = open_model(&path).unwrap();
        m.model
            .layers
            .iter()
            .map(|l| l.ffn.weight_bytes())
            .sum::<usize>()
    } / 2; // the fixture's FFN is f32
    for (selector, min_recall, max_ppl_ratio, max_bytes_share) in [
        (Selector::Int8, 0.99, 1.005, 0.35),
        (Selector::Int4, 0.95, 1.01, 0.2),
    ] {
        let mut m = open_model(&path).unwrap();
        let ids = heldout_ids(&m.tokenizer);
        let d = m.sparsity.as_mut().unwrap();
        d.selector = selector;
        d.measure_selector = true;
        let c = m.set_ffn_mode(FfnMode::Predicted).unwrap().unwrap();
        let ppl = perplexity(&m.model, &ids, 256).unwrap().perplexity;
        let exact = c.exact.load(Ordering::Relaxed) as f64;
        let recall = c.exact_chosen.load(Ordering::Relaxed) as f64 / exact;
        let chosen = c.computed.load(Ordering::Relaxed) as f64 / exact;
        let bytes = c.selector_bytes.load(Ordering::Relaxed) as f64 / ffn_f16_bytes as f64;
        println!(
            "{selector:?}: recall {recall:.4}, chosen/exact {chosen:.3}, perplexity {ppl:.3} (oracle {oracle_ppl:.3}, {:.1}% vs {:.1}%), selector {bytes:.3} of the FFN's f16 bytes",
            100.0 * c.active_fraction(),
            100.0 * oracle_active
        );
        assert!(recall >= min_recall, "{selector:?}: recall {recall}");
        assert!(
            (chosen - 1.0).abs() < 0.05,
            "{selector:?}: chosen/exact {chosen}"
        );
        assert!(
            ppl / oracle_ppl <= max_ppl_ratio,
            "{selector:?}: {ppl} vs {oracle_ppl}"
        );
        assert!(bytes <= max_bytes_share, "{selector:?}: {bytes}");
    }
}

#[test]
fn sparse_modes_read_down_columns_contiguously_and_compute_the_same_bits() {
    // `oracle` and `predicted` compute the chosen neurons from a column copy of
    // the down projection; the FFN given the same sets explicitly computes them
    // from the row-major matrix (`DenseFfn`'s own sparse path): equal bits.
    use flashpack::runtime::ffn::{ActiveSet, Fired};
    use flashpack::runtime::sparse::Selector;
    let tmp = tempfile::tempdir().unwrap();
    let path = calibrated(tmp.path(), Allocation::Greedy);
    for (mode, selector) in [
        (FfnMode::Oracle, Selector::Auto),
        (FfnMode::Predicted, Selector::Int8),
        (FfnMode::Predicted, Selector::Trained),
    ] {
        let mut m = open_model(&path).unwrap();
        m.sparsity.as_mut().unwrap().selector = selector;
        m.set_ffn_mode(mode).unwrap();
        let hidden = m.model.config.hidden_size;
        let n = 3;
        let x = values(n * hidden, 9, 2.0);
        for (l, layer) in m.model.layers.iter().enumerate() {
            let (mut chosen, mut given) = (vec![0.0f32; n * hidden], vec![0.0f32; n * hidden]);
            let mut fired = Fired::default();
            layer
                .ffn
                .forward(&x, n, ActiveSet::All, &mut chosen, Some(&mut fired))
                .unwrap();
            let count: usize = fired.per_token.iter().map(Vec::len).sum();
            assert!(
                count > 0 && count < n * fired.width,
                "{mode:?} layer {l}: {count}"
            );
            layer
                .ffn
                .forward(
                    &x,
                    n,
                    ActiveSet::PerToken(&fired.per_token),
                    &mut given,
                    None,
                )
                .unwrap();
            let same = chosen
                .iter()
                .zip(&given)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{mode:?} {selector:?} layer {l}");
        }
    }
}

#[test]
fn oracle_flash_chooses_by_the_product_criterion_as_the_in_dram_oracle_does() {
    use flashpack::runtime::flash::{open_flash, FlashOptions};
    use flashpack::runtime::Logits;
    let tmp = tempfile::tempdir().unwrap();
    let path = calibrated(tmp.path(), Allocation::Greedy);
    let mut oracle = open_model(&path).unwrap();
    let ids: Vec<u32> = heldout_ids(&oracle.tokenizer)[..40].to_vec();
    let counter = oracle.set_ffn_mode(FfnMode::Oracle).unwrap().unwrap();
    let run = |model: &flashpack::runtime::Model| -> Vec<f32> {
        let mut cache = model.new_cache();
        let mut all = model
            .forward(&mut cache, &ids[..20], Logits::All, None)
            .unwrap();
        for &id in &ids[20..] {
            all.extend(
                model
                    .forward(&mut cache, &[id], Logits::Last, None)
                    .unwrap(),
            );
        }
        all
    };
    let want = run(&oracle.model);
    let fraction = counter.active_fraction();
    assert!(
        fraction > 0.3 && fraction < 0.7,
        "oracle computed {fraction}"
    );
    let (loaded, _rt) = open_flash(
        &path,
        &FlashOptions {
            mode: FfnMode::OracleFlash,
            ..FlashOptions::default()
        },
    )
    .unwrap();
    let got = run(&loaded.model);
    assert!(
        got.iter()
            .zip(&want)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "oracle-flash differs from the in-DRAM oracle"
    );
}
