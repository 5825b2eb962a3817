//! Verifying a packed file: every hash and rule of the format, optionally every
//! packed weight and the model's logits against the checkpoint it came from,
//! and each predictor's recall re-measured on text. The library computes the
//! [`VerifyReport`]; the `flashpack verify` command and the Python package only
//! report it.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::dtype::get_element;
use crate::error::{Error, Result};
use crate::format::integrity::check_integrity;
use crate::format::layout::{BundlePart, DENSE_SECTION};
use crate::format::PackedFile;
use crate::input::tensors::FfnNames;
use crate::input::Checkpoint;
use crate::runtime::open::{load_packed, Values};

/// What [`verify`] checks beyond the file's own hashes and rules.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// The Hugging Face checkpoint the file was converted from: every packed
    /// weight is compared with the source's (after the recorded order and
    /// dtype), and the logits of both through the dense runtime.
    pub against: Option<PathBuf>,
    /// With `against`, a quantized file (format section 9): held-out text on
    /// which the perplexity of the packed model is compared with the source's
    /// (windows of 256 tokens).
    pub text: Option<PathBuf>,
    /// Calibration text on which each predictor's recall is re-measured (none:
    /// recall is not measured).
    pub calib: Vec<PathBuf>,
    /// The recall each layer's predictor must reach on `calib`, in (0, 1].
    pub min_recall: f64,
    /// Most calibration tokens of `calib` to use.
    pub calib_tokens: usize,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions {
            against: None,
            text: None,
            calib: Vec::new(),
            min_recall: 0.95,
            calib_tokens: 4096,
        }
    }
}

/// The result of [`verify`]: what was checked and every check that failed.
/// Its fields are the keys of `flashpack verify --json`.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// Whether every check held (`failures` is empty).
    pub ok: bool,
    /// Sections whose hashes were checked.
    pub sections_checked: usize,
    /// Chunks whose hashes were checked.
    pub chunks_checked: usize,
    /// Bytes hashed.
    pub hashed_bytes: u64,
    /// Each failed check, naming the rule, section and chunk.
    pub failures: Vec<String>,
    /// Weights compared with the source checkpoint (0 without a source).
    pub weights_compared: u64,
    /// Compared weights that differ from the source's.
    pub weights_mismatched: u64,
    /// Largest final-position logit NMSE between the packed model and the source
    /// checkpoint over the fixed prompts (with a source only).
    pub logit_nmse: Option<f64>,
    /// Whether the NMSE was held to [`LOGIT_NMSE_LIMIT`]: only when the weights kept
    /// their dtype (a narrowing conversion changes the model by design).
    pub logit_nmse_gated: bool,
    /// Predictor recall per layer re-measured on the calibration text.
    pub predictor_recall: Vec<crate::predictor::pipeline::MeasuredRecall>,
    /// A quantized file compared with its source: the error of each block-typed
    /// tensor (FFN parts by their checkpoint names), held to `tensor_nmse_limit`.
    pub quant_errors: Vec<crate::pack::quantize::TensorQuantError>,
    /// The per-tensor NMSE limit a quantized file is held to (null for a float file).
    pub tensor_nmse_limit: Option<f64>,
    /// The logit NMSE limit a quantized file is held to (null for a float file).
    pub logit_nmse_limit: Option<f64>,
    /// The most a quantized file's perplexity ratio may exceed 1 on held-out
    /// text (null for a float file).
    pub perplexity_increase_limit: Option<f64>,
    /// With held-out text: perplexity of the source (dense).
    pub perplexity_source: Option<f64>,
    /// With held-out text: perplexity of the packed model (dense).
    pub perplexity_packed: Option<f64>,
    /// With held-out text: packed perplexity over the source's.
    pub perplexity_ratio: Option<f64>,
}

/// The packed model computes what the checkpoint computes, up to summation order.
pub const LOGIT_NMSE_LIMIT: f64 = 1e-10;

/// Prompts whose final-position logits are compared with the source's.
pub const CHECK_PROMPTS: [&str; 3] = [
    "",
    "The quick brown fox jumps over the lazy dog.",
    "Now is the winter of our discontent\nMade glorious summer by this sun of York;",
];

/// Verifies the packed file at `path`: every hash and rule, then what
/// `options` asks for (the source checkpoint, held-out text, predictor
/// recall). Failed checks are listed in the report (`ok` false); a file that
/// cannot be parsed, breaks a structural rule or cannot be read, and invalid
/// options, are errors.
pub fn verify(path: &Path, options: &VerifyOptions) -> Result<VerifyReport> {
    check_options(options)?;
    let mut report = verify_file(path, options.against.as_deref(), options.text.as_deref())?;
    if !options.calib.is_empty() {
        check_recall(
            path,
            &mut report,
            &options.calib,
            options.min_recall,
            options.calib_tokens,
        )?;
    }
    Ok(report)
}

/// Refuses options [`verify`] cannot act on.
fn check_options(options: &VerifyOptions) -> Result<()> {
    if options.text.is_some() && options.against.is_none() {
        return Err(Error::InvalidArgument(
            "held-out text compares perplexity with the source: it needs the source checkpoint"
                .into(),
        ));
    }
    check_min_recall(options.min_recall)
}

fn check_min_recall(min_recall: f64) -> Result<()> {
    if !(min_recall > 0.0 && min_recall <= 1.0) {
        return Err(Error::InvalidArgument(format!(
            "minimum predictor recall {min_recall} must be in (0, 1]"
        )));
    }
    Ok(())
}

/// Every hash and rule of the file at `path` and, with `against`, its weights
/// and logits against that checkpoint (and, for a quantized file with
/// `text`, its perplexity): [`verify`] without the predictor recall.
pub fn verify_file(
    path: &Path,
    against: Option<&Path>,
    text: Option<&Path>,
) -> Result<VerifyReport> {
    let file = PackedFile::open(path)?;
    let integrity = check_integrity(&file)?;
    // A broken rule that is not about bytes changed after packing (rule 19)
    // is invalid input, as the rules checked at open are (exit 2).
    if let Some(f) = integrity.failures.iter().find(|f| !f.is_integrity()) {
        return Err(Error::Format {
            path: path.to_path_buf(),
            source: f.clone(),
        });
    }
    let mut failures: Vec<String> = integrity.failures.iter().map(|f| f.to_string()).collect();
    let (mut compared, mut mismatched) = (0, 0);
    let mut logit_nmse = None;
    // Format section 9: a quantized file is held to the limits of its
    // coarsest type instead of identity.
    let coarsest = file.manifest.quantization.and_then(|p| {
        use crate::quant::QuantType::{Q4_1, Q8_0};
        let types = [p.embed, p.attn, p.ffn, p.head];
        [Q4_1, Q8_0].into_iter().find(|q| types.contains(&Some(*q)))
    });
    let limits = coarsest.map(crate::pack::quantize::limits);
    let gated = file.manifest.provenance.options.dtype == "keep" && limits.is_none();
    let mut quant_errors = Vec::new();
    let mut perplexities = None;
    if let Some(dir) = against {
        if failures.is_empty() {
            let ckpt = Checkpoint::open(dir)?;
            let r = compare_weights(&file, &ckpt)?;
            compared = r.compared;
            mismatched = r.mismatched;
            failures.extend(r.failures);
            if let Some((tensor_limit, _, _)) = limits {
                quant_errors = r.quant_errors;
                for e in &quant_errors {
                    if e.blocks_differing > 0 {
                        failures.push(format!(
                            "tensor {:?}: {} blocks differ from the source quantized as the format says",
                            e.tensor, e.blocks_differing
                        ));
                    }
                    if let Some(n) = e.scales_differing.filter(|&n| n > 0) {
                        failures.push(format!(
                            "tensor {:?}: {n} values of its down scale differ from the scale the format computes from the source",
                            e.tensor
                        ));
                    }
                    if !within_limit(e.nmse, tensor_limit) {
                        failures.push(format!(
                            "tensor {:?}: quantization NMSE {:.3e} exceeds {tensor_limit:e}",
                            e.tensor, e.nmse
                        ));
                    }
                }
            }
            if failures.is_empty() {
                if let (Some(text), Some((_, _, ppl_limit))) = (text, limits) {
                    let (source, packed) = compare_perplexity(&file, &ckpt, text)?;
                    if !within_limit(packed / source - 1.0, ppl_limit) {
                        failures.push(format!(
                            "perplexity {packed:.4} exceeds the source's {source:.4} by more than {:.1}%",
                            100.0 * ppl_limit
                        ));
                    }
                    perplexities = Some((source, packed));
                }
                let e = compare_logits(&file, &ckpt)?;
                let within = e.partial_cmp(&LOGIT_NMSE_LIMIT).is_some_and(|o| o.is_le());
                if gated && !within {
                    failures.push(format!(
                        "logit NMSE {e:.3e} against the source exceeds {LOGIT_NMSE_LIMIT:e}"
                    ));
                }
                if let Some((_, logit_limit, _)) = limits {
                    if !within_limit(e, logit_limit) {
                        failures.push(format!(
                            "logit NMSE {e:.3e} of the quantized model exceeds {logit_limit:e}"
                        ));
                    }
                }
                logit_nmse = Some(e);
            }
        } else {
            failures.push(
                "weights not compared with the source: the file failed its integrity checks".into(),
            );
        }
    }
    Ok(VerifyReport {
        ok: failures.is_empty(),
        sections_checked: integrity.sections_checked,
        chunks_checked: integrity.chunks_checked,
        hashed_bytes: integrity.bytes_hashed,
        failures,
        weights_compared: compared,
        weights_mismatched: mismatched,
        logit_nmse,
        logit_nmse_gated: gated && against.is_some(),
        predictor_recall: Vec::new(),
        quant_errors,
        tensor_nmse_limit: limits.map(|l| l.0),
        logit_nmse_limit: limits.map(|l| l.1),
        perplexity_increase_limit: limits.map(|l| l.2),
        perplexity_source: perplexities.map(|p| p.0),
        perplexity_packed: perplexities.map(|p| p.1),
        perplexity_ratio: perplexities.map(|p| p.1 / p.0),
    })
}

/// `value <= limit`, false for a NaN value.
fn within_limit(value: f64, limit: f64) -> bool {
    value.partial_cmp(&limit).is_some_and(|o| o.is_le())
}

/// Narrows a source value to the packed dtype and compares bit patterns (so NaN
/// equals NaN, and -0 differs from +0).
fn same(packed: f32, source: f32, dtype: crate::dtype::DType) -> bool {
    let mut a = [0u8; 4];
    let mut b = [0u8; 4];
    crate::dtype::put_element(&mut a, dtype, 0, packed);
    crate::dtype::put_element(&mut b, dtype, 0, source);
    a == b
}

/// What [`compare_weights`] found.
#[derive(Debug, Clone, Default)]
pub struct WeightComparison {
    /// Weights compared with the source.
    pub compared: u64,
    /// Compared weights that differ.
    pub mismatched: u64,
    /// Each tensor or section that differs, and each set of bundles that could
    /// not be compared.
    pub failures: Vec<String>,
    /// The quantization error of each block-typed tensor (empty for a float file).
    pub quant_errors: Vec<crate::pack::quantize::TensorQuantError>,
}

/// Every packed weight against the source: dense tensors element by element,
/// per-neuron biases and bundles through the recorded neuron order; block-typed
/// tensors by their quantization error.
pub fn compare_weights(file: &PackedFile, ckpt: &Checkpoint) -> Result<WeightComparison> {
    let mut failures = Vec::new();
    let (mut compared, mut mismatched) = (0u64, 0u64);
    if file.config != ckpt.config {
        failures.push("the packed model config differs from the checkpoint's".to_string());
        return Ok(WeightComparison {
            failures,
            ..Default::default()
        });
    }
    let dense = file.read_section(DENSE_SECTION)?;
    let order_of = |tensor: &str| -> Vec<usize> {
        let entry = file.tensor_entry(tensor).expect("checked at open");
        crate::format::layout::decode_order(
            &dense[entry.offset as usize..(entry.offset + entry.length) as usize],
        )
        .into_iter()
        .map(|v| v as usize)
        .collect()
    };
    // Every stored set of bundles with the checkpoint FFN it holds: the FFN
    // layers', then the experts' (spec 4.1).
    let mut bundle_sets: Vec<(crate::format::layout::FfnLayerEntry, &FfnNames)> = file
        .manifest
        .ffn_layers
        .iter()
        .map(|l| (l.clone(), &ckpt.names.layers[l.layer as usize].ffn))
        .collect();
    for e in &file.manifest.experts {
        let Some(moe) = ckpt.names.layers[e.layer as usize].ffn.moe() else {
            failures.push(format!("expert {} of dense layer {}", e.expert, e.layer));
            return Ok(WeightComparison {
                compared,
                mismatched,
                failures,
                quant_errors: Vec::new(),
            });
        };
        bundle_sets.push((e.bundles(), &moe.experts[e.expert as usize]));
    }
    let orders: Vec<Vec<usize>> = bundle_sets
        .iter()
        .map(|(l, _)| order_of(&l.order_tensor))
        .collect();
    let layer_orders: std::collections::HashMap<usize, &[usize]> = file
        .manifest
        .ffn_layers
        .iter()
        .zip(&orders)
        .map(|(l, o)| (l.layer as usize, o.as_slice()))
        .collect();
    let mut per_neuron = std::collections::HashMap::new();
    for (i, l) in ckpt.names.layers.iter().enumerate() {
        for b in l.ffn.per_neuron_biases() {
            per_neuron.insert(b.clone(), i);
        }
    }
    // Predictor tensors are made by flashpack, not copied: only the dense part
    // has a source to compare with. A down scale (spec 9.6) is compared with
    // its down projection's quantization error.
    for entry in file.manifest.tensors.iter().filter(|t| {
        t.section == DENSE_SECTION && crate::format::layout::down_scale_layer(&t.name).is_none()
    }) {
        let Some(dtype) = entry.dtype.weight() else {
            continue;
        };
        let src = ckpt.tensor(&entry.name)?;
        let bytes = &dense[entry.offset as usize..(entry.offset + entry.length) as usize];
        // Per-neuron biases are stored in packed order.
        let order = per_neuron
            .get(&entry.name)
            .and_then(|layer| layer_orders.get(layer).copied());
        let source_index = |p: usize| order.map_or(p, |o| o[p]);
        let bad = (0..src.numel())
            .filter(|&p| {
                !same(
                    get_element(bytes, dtype, p),
                    get_element(src.bytes, src.dtype, source_index(p)),
                    dtype,
                )
            })
            .count() as u64;
        compared += src.numel() as u64;
        if bad > 0 {
            mismatched += bad;
            failures.push(format!(
                "tensor {:?}: {bad} values differ from the source",
                entry.name
            ));
        }
    }
    // Block-typed tensors and FFN layers are compared by their quantization error.
    let quant_errors = crate::pack::quantize::quantization_errors(file, ckpt, &dense, &orders)?;
    let dense_sets = file.manifest.ffn_layers.len();
    for (i, (layer, ffn)) in bundle_sets.iter().enumerate() {
        let Some(dtype) = layer.dtype.weight() else {
            // A quantized expert: no writer of this version makes one, and its
            // blocks are not compared, which must not pass as verified.
            if i >= dense_sets {
                failures.push(format!(
                    "section {:?}: {} expert bundles are not compared by this version",
                    layer.section,
                    layer.dtype.name()
                ));
            }
            continue;
        };
        let section = file.read_section(&layer.section)?;
        let h = layer.hidden as usize;
        let n = layer.neurons as usize;
        let (gate, up, down) = ffn.parts();
        let gate = gate.map(|g| ckpt.tensor(&g.weight)).transpose()?;
        let up = ckpt.tensor(&up.weight)?;
        let down = ckpt.tensor(&down.weight)?;
        let mut bad = 0u64;
        for (p, &neuron) in orders[i].iter().enumerate() {
            let bundle =
                &section[p * layer.bundle_bytes as usize..(p + 1) * layer.bundle_bytes as usize];
            for (k, part) in layer.parts.iter().enumerate() {
                for j in 0..h {
                    let source = match part {
                        BundlePart::Gate => gate
                            .as_ref()
                            .map(|g| get_element(g.bytes, g.dtype, neuron * h + j)),
                        BundlePart::Up => Some(get_element(up.bytes, up.dtype, neuron * h + j)),
                        BundlePart::Down => {
                            Some(get_element(down.bytes, down.dtype, j * n + neuron))
                        }
                    };
                    let packed = get_element(bundle, dtype, k * h + j);
                    if !source.is_some_and(|s| same(packed, s, dtype)) {
                        bad += 1;
                    }
                }
            }
        }
        compared += (n * h * layer.parts.len()) as u64;
        if bad > 0 {
            mismatched += bad;
            failures.push(format!(
                "section {:?}: {bad} bundle values differ from the source",
                layer.section
            ));
        }
    }
    Ok(WeightComparison {
        compared,
        mismatched,
        failures,
        quant_errors,
    })
}

/// Perplexity of the source and of the packed model (both dense, in DRAM) on
/// the text of the file `text`, windows of 256 tokens: `(source, packed)`.
pub fn compare_perplexity(file: &PackedFile, ckpt: &Checkpoint, text: &Path) -> Result<(f64, f64)> {
    use crate::runtime::Model;
    let content = std::fs::read_to_string(text).map_err(|e| Error::io(text, e))?;
    let ids = ckpt.tokenizer()?.encode(&content)?;
    let source = Model::from_checkpoint(ckpt)?;
    let a = crate::runtime::perplexity::perplexity(&source, &ids, 256)?.perplexity;
    drop(source);
    let (_, packed, _) = load_packed(file, Values::Dequantized)?;
    let b = crate::runtime::perplexity::perplexity(&packed, &ids, 256)?.perplexity;
    Ok((a, b))
}

/// Largest final-position logit NMSE between the packed model (all bundles in DRAM)
/// and the checkpoint, through the one dense runtime, over [`CHECK_PROMPTS`].
pub fn compare_logits(file: &PackedFile, ckpt: &Checkpoint) -> Result<f64> {
    use crate::runtime::{Logits, Model};
    let source = Model::from_checkpoint(ckpt)?;
    let (_, packed, _) = load_packed(file, Values::Dequantized)?;
    let tokenizer = ckpt.tokenizer()?;
    let mut worst = 0.0f64;
    for text in CHECK_PROMPTS {
        let ids = tokenizer.encode(text)?;
        if ids.is_empty() || ids.len() > source.config.max_context {
            continue;
        }
        let r = source.forward(&mut source.new_cache(), &ids, Logits::Last, None)?;
        let x = packed.forward(&mut packed.new_cache(), &ids, Logits::Last, None)?;
        let num: f64 = x
            .iter()
            .zip(&r)
            .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
            .sum();
        let den: f64 = r.iter().map(|&b| (b as f64).powi(2)).sum();
        let e = num / den;
        worst = if e.is_nan() { e } else { worst.max(e) };
    }
    Ok(worst)
}

/// Re-measures each predictor's recall of the file at `path` on the text of
/// `calib` (at most `calib_tokens` tokens, through the packed model, so labels
/// and predictions use packed neuron indices), adds it to `report` and fails
/// each layer below `min_recall`. A report that already failed is not
/// measured (a failure says so).
pub fn check_recall(
    path: &Path,
    report: &mut VerifyReport,
    calib: &[PathBuf],
    min_recall: f64,
    calib_tokens: usize,
) -> Result<()> {
    check_min_recall(min_recall)?;
    if !report.ok {
        report
            .failures
            .push("predictor recall not measured: the file failed its other checks".into());
        return Ok(());
    }
    // One read of the file: the weights serve both the model and the SiLU
    // gate projections that labelling needs.
    let file = PackedFile::open(path)?;
    let (weights, model, tokenizer) = load_packed(&file, Values::Dequantized)?;
    let Some(sparsity) = crate::runtime::open::sparsity_data(&file)? else {
        report
            .failures
            .push("recall asked for on calibration text, but the file has no predictors".into());
        report.ok = false;
        return Ok(());
    };
    let opts = crate::predictor::calibrate::CalibrationOptions {
        max_tokens: calib_tokens,
        fixed_silu_thresholds: sparsity.silu_thresholds.to_vec(),
        criterion: sparsity.silu_criterion,
        ..Default::default()
    };
    // SiLU labels must use the thresholds stored in the file, not new ones: the
    // measured recall is then against the file's own definition of "fired".
    let measured = crate::predictor::pipeline::measure_recall(
        &model,
        &file.names,
        &weights,
        &tokenizer,
        calib,
        &opts,
        &sparsity.predictors,
    )?;
    for m in &measured {
        if m.recall < min_recall {
            report.failures.push(format!(
                "predictor of layer {}: recall {:.4} below the minimum {min_recall}",
                m.layer, m.recall
            ));
        }
    }
    report.ok = report.failures.is_empty();
    report.predictor_recall = measured;
    Ok(())
}
