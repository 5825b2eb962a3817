//! `convert`: a Hugging Face checkpoint directory to a flashpack file, streamed
//! tensor by tensor from the memory-mapped checkpoint (memory: a few chunk batches
//! plus one layer's FFN), written atomically and deterministically.
//!
//! File order: preamble (written last), `tokenizer.json`, the dense section, one
//! FFN section per layer, the manifest.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::format::layout::*;
use crate::format::quant_policy::{part_of_tensor, policy_type};
use crate::input::tensors::FfnNames;
use crate::input::{Checkpoint, TensorRef};
use crate::pack::bundle::{build_layer_bundles, convert_range, LayerFfn};
use crate::pack::output::{finish_packed_file, AtomicOutput, InputPath};
use crate::pack::section::SectionWriter;
use crate::predictor::pipeline::{calibrate_and_train, CalibrationPlan, Trained};
use crate::predictor::train::{LowRankPredictor, PredictorMetrics};

/// Which dtype the packed weights take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetDType {
    /// Each tensor as stored in the checkpoint (an FFN layer takes its up projection's).
    Keep,
    /// Every floating-point tensor in this dtype (f32, f16 or bf16; the
    /// conversion rounds to nearest even). Block-quantized parts follow
    /// [`ConvertOptions::quant`] instead.
    To(DType),
}

impl TargetDType {
    /// The name `convert --dtype` takes and reports: `keep`, `f32`, `f16`, `bf16`.
    pub fn name(self) -> &'static str {
        match self {
            TargetDType::Keep => "keep",
            TargetDType::To(d) => d.name(),
        }
    }

    fn resolve(self, stored: DType) -> DType {
        match self {
            TargetDType::Keep => stored,
            TargetDType::To(d) => d,
        }
    }
}

/// How [`convert`] packs a checkpoint. `Default` keeps the checkpoint's
/// dtypes, zstd level 3, 4 KiB alignment, no calibration (so no predictors:
/// the file runs `dense` and `naive`, not `flash`), no block
/// quantization, and selector copies where they apply.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// The dtype of the packed weights (default [`TargetDType::Keep`]).
    pub dtype: TargetDType,
    /// zstd level for the dense and file sections (1-22; 0 stores them uncompressed).
    pub zstd_level: i32,
    /// Alignment of every section in bytes (a power of two, 512 B to 1 MiB;
    /// default 4096, the page and the usual flash block, so that direct I/O
    /// reads whole bundles).
    pub alignment: u64,
    /// Calibrate on text and train predictors (hot-first neuron order, predictor
    /// section); `None` packs the checkpoint's neuron order without predictors.
    pub calibration: Option<CalibrationPlan>,
    /// Format section 9: the block type of each part (`convert --quant`); all
    /// null packs floating point only.
    pub quant: QuantPolicy,
    /// Format section 10: the low-precision selector copies of gate and up
    /// (`convert --selector`).
    pub selector: SelectorCopies,
}

/// Which selector copies (format section 10) `convert` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum SelectorCopies {
    /// `int4` for a SiLU or GeGLU (GELU-gated) model with a gated FFN
    /// calibrated with `--calib` (whose product thresholds the selector
    /// compares with), none otherwise (the ReLU family fires exactly and keeps
    /// its trained predictors).
    Auto,
    /// No copies.
    None,
    /// Int8 copies (one f32 scale per row): 0.33 of the FFN's f16 bytes.
    Int8,
    /// Int4 copies (blocks of 32, f16 scales): 0.19 of the FFN's f16 bytes.
    Int4,
}

impl SelectorCopies {
    /// What this choice writes for `config`, calibrated or not; an explicit
    /// type for a model without a gated FFN is refused.
    pub fn resolve(
        self,
        config: &crate::input::config::ModelConfig,
        names: &crate::input::tensors::ModelNames,
        calibrated: bool,
    ) -> Result<Option<crate::runtime::lowbit::LowBits>> {
        use crate::runtime::lowbit::LowBits;
        let gated = config.moe.is_none()
            && names
                .layers
                .iter()
                .all(|l| matches!(l.ffn, FfnNames::Gated { .. }));
        // Activations chosen by the product threshold (`|act(g) * u|`): SiLU
        // and GELU (GeGLU), both with a negative lobe (issue 12: the
        // selector copies choose about as many neurons as the exact
        // criterion, the trained predictors 95% of them on both).
        let silu = matches!(
            config.activation,
            crate::input::config::Activation::Silu
                | crate::input::config::Activation::Gelu
                | crate::input::config::Activation::GeluTanh
        );
        match self {
            SelectorCopies::None => Ok(None),
            SelectorCopies::Auto => Ok((gated && silu && calibrated).then_some(LowBits::Int4)),
            SelectorCopies::Int8 | SelectorCopies::Int4 if !gated => {
                Err(Error::InvalidOption {
                    option: "selector",
                    problem: format!(
                        "copies need a gated FFN (gate, up, down) in every layer, and {} has none; convert without selector copies (none)",
                        config.architecture.hf_name()
                    ),
                })
            }
            SelectorCopies::Int8 => Ok(Some(LowBits::Int8)),
            SelectorCopies::Int4 => Ok(Some(LowBits::Int4)),
        }
    }
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            dtype: TargetDType::Keep,
            zstd_level: 3,
            alignment: 4096,
            calibration: None,
            quant: QuantPolicy::default(),
            selector: SelectorCopies::Auto,
        }
    }
}

/// What a finished conversion wrote: `flashpack convert --json` prints these
/// fields. Sizes are bytes in the file (after compression); times are wall
/// milliseconds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConvertSummary {
    /// The packed file written.
    pub output: PathBuf,
    /// Its total size.
    pub file_bytes: u64,
    /// The dense section (embeddings, attention, norms, head), as stored.
    pub dense_bytes: u64,
    /// The dense section before zstd: what it takes in DRAM when loaded.
    pub dense_raw_bytes: u64,
    /// All FFN sections (one per layer; never compressed, read by offset).
    pub ffn_bytes: u64,
    /// The side files carried verbatim (`tokenizer.json`, and where the
    /// checkpoint has them its tokenizer config, generation config and chat
    /// template).
    pub tokenizer_bytes: u64,
    /// Sections in the file.
    pub sections: usize,
    /// The JSON manifest at the end of the file.
    pub manifest_bytes: u64,
    /// The manifest's sha256 (lowercase hex), which the preamble records: it
    /// identifies the file's contents.
    pub manifest_sha256: String,
    /// Hashing the source files (beside the writing).
    pub hash_sources_ms: f64,
    /// Writing the dense section.
    pub dense_ms: f64,
    /// Writing the FFN sections.
    pub ffn_ms: f64,
    /// The final fsync and rename.
    pub commit_ms: f64,
    /// The selector copies written (format section 10), `None` when none.
    pub selector: Option<crate::runtime::lowbit::LowBits>,
    /// Bytes of the selector section (0 without copies).
    pub selector_bytes: u64,
    /// Tokens calibration ran on (`None` without calibration).
    pub calibration_tokens: Option<u64>,
    /// Calibration time (`None` without calibration).
    pub calibrate_ms: Option<f64>,
    /// Predictor training time, all layers (`None` without calibration).
    pub train_ms: Option<f64>,
    /// Each layer's predictor (empty without calibration and for a mixture
    /// of experts, whose router chooses).
    pub predictors: Vec<PredictorReport>,
}

/// One layer's predictor as `convert` reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PredictorReport {
    /// The layer (from 0).
    pub layer: usize,
    /// Rank of the low-rank predictor (`A` is hidden x rank, `B` rank x neurons).
    pub rank: usize,
    /// On the predictor's logit: a neuron is predicted active when its logit
    /// is at least this (chosen on held-out tokens to reach the target recall).
    pub threshold: f32,
    /// Held-out (token, neuron) pairs predicted and fired / pairs fired.
    pub recall: f64,
    /// Pairs predicted and fired / pairs predicted.
    pub precision: f64,
    /// Pairs predicted / all held-out pairs: the share of the FFN a token reads.
    pub frac_predicted: f64,
    /// Pairs fired / all held-out pairs: the layer's true density.
    pub frac_true: f64,
    /// Predictor size (f16) as a percentage of the layer's FFN weights.
    #[serde(rename = "share_of_ffn_percent")]
    pub bytes_percent_of_ffn: f64,
    /// Most distinct neurons fired within any K consecutive calibration
    /// tokens, K = 1, 2, 4, 8: what a window cache of K tokens must hold.
    pub window_max: Vec<u64>,
    /// This layer's training time.
    pub train_ms: f64,
}

/// What calibration adds to a pack: neuron orders, predictors, statistics.
pub(crate) struct PackExtras {
    pub orders: Vec<Vec<u32>>,
    pub predictors: Vec<(LowRankPredictor, PredictorMetrics)>,
    pub calibration: Option<CalibrationInfo>,
    /// A mixture-of-experts model's routing counts (spec 5.1).
    pub routing: Option<crate::format::layout::RoutingInfo>,
    pub reports: Vec<PredictorReport>,
    pub calibrate_ms: Option<f64>,
    pub train_ms: Option<f64>,
}

use crate::progress::Phase;
pub use crate::progress::Progress;

const SIDE_FILES: [&str; 4] = [
    "chat_template.jinja",
    "generation_config.json",
    "tokenizer_config.json",
    "tokenizer.json",
];

/// Where transformers 5 saves a chat template (and reads it first).
const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";

/// Converts the checkpoint at `src` into a flashpack file at `out`.
pub fn convert(
    src: &Path,
    out: &Path,
    options: &ConvertOptions,
    progress: Progress<'_>,
) -> Result<ConvertSummary> {
    let a = options.alignment;
    if !(a.is_power_of_two() && (MIN_ALIGNMENT..=MAX_ALIGNMENT).contains(&a)) {
        return Err(Error::InvalidOption {
            option: "alignment",
            problem: format!(
                "{a} must be a power of two between {MIN_ALIGNMENT} and {MAX_ALIGNMENT}"
            ),
        });
    }
    if !(0..=22).contains(&options.zstd_level) {
        return Err(Error::InvalidOption {
            option: "zstd_level",
            problem: format!("{} must be 0-22", options.zstd_level),
        });
    }
    if let Some(plan) = &options.calibration {
        check_calibration_plan(plan)?;
    }
    let ckpt = Checkpoint::open(src)?;
    // An explicit --selector on a model without gated layers is refused before
    // any work.
    options
        .selector
        .resolve(&ckpt.config, &ckpt.names, options.calibration.is_some())?;
    // Quantized experts would be written and read, but `verify --against` does
    // not compare their blocks with the source yet: refuse rather than write a
    // file that cannot be checked.
    if ckpt.config.moe.is_some() && options.quant != QuantPolicy::default() {
        return Err(Error::InvalidOption {
            option: "quant",
            problem: format!(
                "is not supported for a mixture-of-experts model ({}) yet; convert it without quantization",
                ckpt.config.architecture.hf_name()
            ),
        });
    }
    // Refuse an output that would destroy an input, or that cannot be written,
    // before anything (a calibration trace, a temporary file) is written.
    let mut inputs = checkpoint_inputs(&ckpt);
    inputs.extend(options.calibration.iter().flat_map(calibration_inputs));
    crate::pack::output::check_output_path(out, &inputs)?;
    // Fail before writing anything if the tokenizer is unusable.
    ckpt.tokenizer()?;
    let config_json: serde_json::Value =
        crate::input::read_json(&src.join(crate::input::CONFIG_FILE), "config.json")?;
    let optional_json = |name: &'static str| -> Result<Option<serde_json::Value>> {
        let p = src.join(name);
        if p.is_file() {
            crate::input::read_json(&p, name).map(Some)
        } else {
            Ok(None)
        }
    };
    let generation_config = optional_json("generation_config.json")?;
    let tokenizer_config = with_chat_template_file(src, optional_json("tokenizer_config.json")?)?;
    let extras = match &options.calibration {
        // A mixture of experts: calibration records routing (spec 5.1) and
        // trains no predictors; neuron orders stay the checkpoint's.
        Some(plan) if ckpt.config.moe.is_some() => routing_extras(&ckpt, plan, progress)?,
        Some(plan) => calibrated_extras(&ckpt, plan, progress)?,
        None => PackExtras {
            orders: (0..ckpt.config.num_layers)
                .map(|_| (0..ckpt.config.ffn_width as u32).collect())
                .collect(),
            predictors: Vec::new(),
            calibration: None,
            routing: None,
            reports: Vec::new(),
            calibrate_ms: None,
            train_ms: None,
        },
    };
    // Hashing the sources reads every weight byte once more; it runs beside the
    // conversion, which leaves cores idle while it writes.
    std::thread::scope(|scope| {
        let hashing = scope.spawn(|| {
            let clock = std::time::Instant::now();
            hash_sources(&ckpt, progress).map(|files| (files, clock.elapsed().as_secs_f64() * 1e3))
        });
        write_pack(
            &ckpt,
            out,
            options,
            progress,
            config_json,
            generation_config,
            tokenizer_config,
            extras,
            || {
                hashing
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            },
        )
    })
}

/// The tokenizer config to store, with the text of `chat_template.jinja` as its
/// `chat_template` when the checkpoint has that file (transformers 5 writes the
/// template there, not in tokenizer_config.json, and reads it in preference):
/// a packed file keeps the one place a reader looks for its template.
fn with_chat_template_file(
    src: &Path,
    tokenizer_config: Option<serde_json::Value>,
) -> Result<Option<serde_json::Value>> {
    let path = src.join(CHAT_TEMPLATE_FILE);
    let template = match std::fs::read(&path) {
        Ok(bytes) => String::from_utf8(bytes)
            .map_err(|_| Error::InvalidArgument(format!("{}: not UTF-8 text", path.display())))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(tokenizer_config),
        Err(e) => return Err(Error::io(&path, e)),
    };
    let mut config = match tokenizer_config {
        Some(serde_json::Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    };
    config.insert("chat_template".into(), template.into());
    Ok(Some(serde_json::Value::Object(config)))
}

/// Every file of the checkpoint that its reader opens, or would open were it
/// there (a `model.safetensors.index.json` or `generation_config.json` written
/// into the directory would change what the checkpoint is).
fn checkpoint_inputs(ckpt: &Checkpoint) -> Vec<InputPath> {
    use crate::input::{tokenizer, weights};
    let mut names: Vec<&str> = vec![
        crate::input::CONFIG_FILE,
        weights::SINGLE_FILE,
        weights::INDEX_FILE,
        tokenizer::TOKENIZER_FILE,
        tokenizer::TOKENIZER_CONFIG_FILE,
        tokenizer::GENERATION_CONFIG_FILE,
        CHAT_TEMPLATE_FILE,
    ];
    names.extend(ckpt.weights.file_names());
    names
        .into_iter()
        .map(|name| InputPath::new(ckpt.dir.join(name), "checkpoint file"))
        .collect()
}

/// The calibration text files and the trace directory of a plan, which an
/// output must not replace either.
pub(crate) fn calibration_inputs(plan: &CalibrationPlan) -> Vec<InputPath> {
    let mut inputs: Vec<InputPath> = plan
        .files
        .iter()
        .map(|f| InputPath::new(f, "calibration text"))
        .collect();
    inputs.extend(
        plan.calibrate
            .keep_trace
            .iter()
            .map(|d| InputPath::new(d, "the calibration trace directory")),
    );
    inputs
}

/// Limits of a calibration plan that can be checked before any work.
pub(crate) fn check_calibration_plan(plan: &CalibrationPlan) -> Result<()> {
    if plan.calibrate.max_tokens == 0 {
        return Err(Error::InvalidArgument(
            "calibration token limit is 0; it must be at least 1".into(),
        ));
    }
    if plan.files.is_empty() {
        return Err(Error::InvalidArgument(
            "calibration needs at least one text file".into(),
        ));
    }
    // Every calibration text is a file that is there, so that a typo is refused
    // before anything (the trace directory) is created.
    for file in &plan.files {
        let wrong = |found| Error::WrongKind {
            path: file.clone(),
            found,
            expected: "a calibration text file",
        };
        match std::fs::metadata(file) {
            Ok(meta) if meta.is_dir() => return Err(wrong("is a directory")),
            Ok(meta) if meta.is_file() && meta.len() == 0 => {
                return Err(Error::InvalidArgument(format!(
                    "calibration text {} is empty",
                    file.display()
                )))
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(wrong("does not exist"))
            }
            Err(e) => return Err(Error::io(file, e)),
        }
    }
    if let Some(dir) = &plan.calibrate.keep_trace {
        if dir.exists() && !dir.is_dir() {
            return Err(Error::WrongKind {
                path: dir.clone(),
                found: "is a file",
                expected: "a directory for the calibration trace",
            });
        }
    }
    Ok(())
}

/// Writes the packed file; `source_hashes` yields the provenance hashes (computed
/// concurrently) when the manifest needs them.
#[allow(clippy::too_many_arguments)]
fn write_pack(
    ckpt: &Checkpoint,
    out: &Path,
    options: &ConvertOptions,
    progress: Progress<'_>,
    config_json: serde_json::Value,
    generation_config: Option<serde_json::Value>,
    tokenizer_config: Option<serde_json::Value>,
    extras: PackExtras,
    source_hashes: impl FnOnce() -> Result<(Vec<SourceFile>, f64)>,
) -> Result<ConvertSummary> {
    let a = options.alignment;
    let src = &ckpt.dir;
    let zstd = (options.zstd_level > 0).then_some(options.zstd_level);
    let ms_since = |t: std::time::Instant| t.elapsed().as_secs_f64() * 1e3;

    let total_weight_bytes: u64 = ckpt
        .names
        .specs()
        .iter()
        .filter_map(|s| ckpt.tensor(&s.name).ok())
        .map(|t| t.bytes.len() as u64)
        .sum();
    let mut done = 0u64;

    let mut file = AtomicOutput::create(out)?;
    file.write_all(&[0u8; PREAMBLE_BYTES as usize])?;
    let mut sections = Vec::new();

    // tokenizer.json, carried verbatim.
    file.pad_to(a)?;
    let tokenizer_path = src.join(crate::input::tokenizer::TOKENIZER_FILE);
    let tokenizer_bytes =
        std::fs::read(&tokenizer_path).map_err(|e| Error::io(&tokenizer_path, e))?;
    let mut w = SectionWriter::new(
        &file,
        TOKENIZER_SECTION,
        SectionKind::File,
        zstd,
        DENSE_CHUNK_BYTES,
    );
    w.write(&mut file, &tokenizer_bytes)?;
    sections.push(w.finish(&mut file)?);

    // The dense section: everything but the FFN weight matrices, per-neuron FFN
    // biases in packed order, and the neuron orders.
    let orders = &extras.orders;
    let ffn_weight_names: HashSet<String> = ckpt
        .names
        .layers
        .iter()
        .flat_map(|l| l.ffn.projections().into_iter().map(|p| p.weight.clone()))
        .collect();
    // Per-neuron biases (of the up and gate projections) follow the packed order.
    let per_neuron_bias: std::collections::HashMap<String, usize> = ckpt
        .names
        .layers
        .iter()
        .enumerate()
        .flat_map(|(i, l)| {
            l.ffn
                .per_neuron_biases()
                .into_iter()
                .map(move |b| (b.clone(), i))
        })
        .collect();

    // Format section 9: the block type of each quantizable tensor. With tied
    // embeddings the output projection is the embedding: no `head` of its own.
    let mut quant = options.quant;
    if ckpt.config.tie_word_embeddings {
        quant.head = None;
    }
    let quant_parts = part_of_tensor(&ckpt.config, &ckpt.names);
    let expert_order: Vec<u32> = ckpt
        .config
        .moe
        .as_ref()
        .map_or(Vec::new(), |m| (0..m.expert_width as u32).collect());
    let dense_clock = std::time::Instant::now();
    file.pad_to(a)?;
    let mut dense = SectionWriter::new(
        &file,
        DENSE_SECTION,
        SectionKind::Dense,
        zstd,
        DENSE_CHUNK_BYTES,
    );
    let mut tensors = Vec::new();
    for spec in ckpt
        .names
        .specs()
        .iter()
        .filter(|s| !ffn_weight_names.contains(&s.name))
    {
        let t = ckpt.tensor(&spec.name)?;
        let dtype = options.dtype.resolve(t.dtype);
        dense.pad_raw(&mut file, TENSOR_ALIGN)?;
        let offset = dense.raw_position();
        if let Some(q) = quant_parts
            .get(spec.name.as_str())
            .and_then(|&part| policy_type(&quant, part))
        {
            crate::pack::quantize::quantize_matrix(&t, q, &mut |piece| {
                dense.write(&mut file, piece)
            })?;
            tensors.push(TensorEntry {
                name: spec.name.clone(),
                dtype: TableDType::from_quant(q),
                shape: t.shape.iter().map(|&d| d as u64).collect(),
                section: DENSE_SECTION.into(),
                offset,
                length: dense.raw_position() - offset,
            });
            done += t.bytes.len() as u64;
            progress(Phase::Writing, done, total_weight_bytes);
            continue;
        }
        match per_neuron_bias.get(&spec.name) {
            Some(&layer) => {
                let mut buf = vec![0u8; t.numel() * dtype.size_bytes()];
                for (p, &neuron) in orders[layer].iter().enumerate() {
                    let v = crate::dtype::get_element(t.bytes, t.dtype, neuron as usize);
                    crate::dtype::put_element(&mut buf, dtype, p, v);
                }
                dense.write(&mut file, &buf)?;
            }
            None => write_converted(&mut dense, &mut file, &t, dtype)?,
        }
        tensors.push(TensorEntry {
            name: spec.name.clone(),
            dtype: TableDType::from_weight(dtype),
            shape: t.shape.iter().map(|&d| d as u64).collect(),
            section: DENSE_SECTION.into(),
            offset,
            length: (t.numel() * dtype.size_bytes()) as u64,
        });
        done += t.bytes.len() as u64;
        progress(Phase::Writing, done, total_weight_bytes);
    }
    // Format 9.6: the per-output-channel scale of each quantized down
    // projection (when the FFN's block type has one), from the checkpoint.
    let mut down_scales: Vec<Option<Vec<f32>>> = vec![None; orders.len()];
    // The neuron orders, layer by layer: a dense FFN's, or each expert's of a
    // sparse layer (the identity: experts are not calibrated yet); a down
    // scale follows its layer's order.
    for (layer, order) in orders.iter().enumerate() {
        let named: Vec<(String, &[u32])> = match ckpt.names.layers[layer].ffn.moe() {
            Some(moe) => (0..moe.experts.len())
                .map(|e| (expert_order_tensor_name(layer, e), &expert_order[..]))
                .collect(),
            None => vec![(order_tensor_name(layer), &order[..])],
        };
        for (name, order) in named {
            dense.pad_raw(&mut file, TENSOR_ALIGN)?;
            let offset = dense.raw_position();
            let bytes: Vec<u8> = order.iter().flat_map(|v| v.to_le_bytes()).collect();
            dense.write(&mut file, &bytes)?;
            tensors.push(TensorEntry {
                name,
                dtype: TableDType::U32,
                shape: vec![order.len() as u64],
                section: DENSE_SECTION.into(),
                offset,
                length: bytes.len() as u64,
            });
        }
        let scaled = quant
            .ffn
            .filter(|&q| crate::format::quant_policy::has_down_scale(q));
        if let (Some(_), None) = (scaled, ckpt.names.layers[layer].ffn.moe()) {
            let (_, _, down) = ckpt.names.layers[layer].ffn.parts();
            let scale = crate::pack::quantize::down_scale(
                &ckpt.tensor(&down.weight)?,
                ckpt.config.hidden_size,
                ckpt.config.ffn_width,
            )?;
            dense.pad_raw(&mut file, TENSOR_ALIGN)?;
            let offset = dense.raw_position();
            let bytes: Vec<u8> = scale.iter().flat_map(|v| v.to_le_bytes()).collect();
            dense.write(&mut file, &bytes)?;
            tensors.push(TensorEntry {
                name: crate::format::layout::down_scale_tensor_name(layer),
                dtype: TableDType::from_weight(crate::dtype::DType::F32),
                shape: vec![scale.len() as u64],
                section: DENSE_SECTION.into(),
                offset,
                length: bytes.len() as u64,
            });
            down_scales[layer] = Some(scale);
        }
    }
    sections.push(dense.finish(&mut file)?);
    let predictor_entries = write_predictors(
        &mut file,
        &mut sections,
        &mut tensors,
        &extras.predictors,
        &extras.orders,
        zstd,
        a,
    )?;
    let dense_ms = ms_since(dense_clock);
    let ffn_clock = std::time::Instant::now();
    let selector_bits =
        options
            .selector
            .resolve(&ckpt.config, &ckpt.names, options.calibration.is_some())?;
    // Section 10: each layer's copies, quantized from its bundles as written.
    let mut selector_copies = Vec::new();

    // One FFN section per layer, or per expert of a sparse layer (spec 4.1):
    // fixed-stride bundles, uncompressed.
    let mut ffn_layers = Vec::new();
    let mut experts = Vec::new();
    let mut write_bundles = |file: &mut AtomicOutput,
                             sections: &mut Vec<SectionEntry>,
                             name: String,
                             ffn: &FfnNames,
                             order: &[u32],
                             neurons: usize,
                             down_scale: Option<&[f32]>|
     -> Result<FfnLayerEntry> {
        let (gate, up, down) = ffn.parts();
        let layer = LayerFfn {
            gate: gate.map(|g| ckpt.tensor(&g.weight)).transpose()?,
            up: ckpt.tensor(&up.weight)?,
            down: ckpt.tensor(&down.weight)?,
            neurons,
            hidden: ckpt.config.hidden_size,
        };
        let parts = if gate.is_some() {
            vec![BundlePart::Gate, BundlePart::Up, BundlePart::Down]
        } else {
            vec![BundlePart::Up, BundlePart::Down]
        };
        let (bundles, table_dtype, stride) = match quant.ffn {
            Some(q) => {
                let stride = crate::format::quant_policy::quantized_bundle_bytes(
                    q,
                    parts.len() as u64,
                    layer.hidden as u64,
                    a,
                )
                .ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "cannot quantize the FFN bundles: hidden size {} is not a multiple of {}",
                        layer.hidden,
                        crate::quant::BLOCK
                    ))
                })?;
                let bundles = crate::pack::quantize::build_quantized_bundles(
                    &layer,
                    order,
                    q,
                    stride as usize,
                    down_scale,
                )?;
                (bundles, TableDType::from_quant(q), stride)
            }
            None => {
                let dtype = options.dtype.resolve(layer.up.dtype);
                let bundles = build_layer_bundles(&layer, order, dtype);
                let stride = (parts.len() * layer.hidden * dtype.size_bytes()) as u64;
                (bundles, TableDType::from_weight(dtype), stride)
            }
        };
        if let (Some(bits), true) = (selector_bits, gate.is_some()) {
            let copies = crate::runtime::lowbit::copies_from_bundles(
                &bundles,
                layer.neurons,
                layer.hidden,
                table_dtype,
                stride as usize,
                bits,
            )
            .map_err(|e| {
                Error::InvalidArgument(format!(
                    "cannot write the selector copies of {name} (format section 10): {e}"
                ))
            })?;
            selector_copies.push(copies);
        }
        let chunk = FFN_CHUNK_TARGET_BYTES.max(stride) / stride * stride;
        file.pad_to(a)?;
        let mut w = SectionWriter::new(file, &name, SectionKind::Ffn, None, chunk);
        w.write(file, &bundles)?;
        sections.push(w.finish(file)?);
        done += [Some(&layer.up), Some(&layer.down), layer.gate.as_ref()]
            .iter()
            .flatten()
            .map(|t| t.bytes.len() as u64)
            .sum::<u64>();
        progress(Phase::Writing, done, total_weight_bytes);
        Ok(FfnLayerEntry {
            layer: 0,
            section: name,
            neurons: layer.neurons as u64,
            hidden: layer.hidden as u64,
            dtype: table_dtype,
            parts,
            bundle_bytes: stride,
            order_tensor: String::new(),
        })
    };
    for (i, names) in ckpt.names.layers.iter().enumerate() {
        match names.ffn.moe() {
            Some(moe) => {
                for (e, expert) in moe.experts.iter().enumerate() {
                    let b = write_bundles(
                        &mut file,
                        &mut sections,
                        expert_section_name(i, e),
                        expert,
                        &expert_order,
                        expert_order.len(),
                        None,
                    )?;
                    experts.push(ExpertEntry {
                        layer: i as u64,
                        expert: e as u64,
                        section: b.section,
                        neurons: b.neurons,
                        hidden: b.hidden,
                        dtype: b.dtype,
                        parts: b.parts,
                        bundle_bytes: b.bundle_bytes,
                        order_tensor: expert_order_tensor_name(i, e),
                    });
                }
            }
            None => {
                let b = write_bundles(
                    &mut file,
                    &mut sections,
                    ffn_section_name(i),
                    &names.ffn,
                    &orders[i],
                    ckpt.config.ffn_width,
                    down_scales[i].as_deref(),
                )?;
                ffn_layers.push(FfnLayerEntry {
                    layer: i as u64,
                    order_tensor: order_tensor_name(i),
                    ..b
                });
            }
        }
    }

    let selector_entries = write_selectors(
        &mut file,
        &mut sections,
        &mut tensors,
        selector_bits,
        &selector_copies,
        zstd,
        a,
    )?;
    let selector_bytes: u64 = selector_copies
        .iter()
        .map(|(g, u)| (g.stored_bytes() + u.stored_bytes()) as u64)
        .sum();
    let ffn_ms = ms_since(ffn_clock);
    let (source_files, hash_sources_ms) = source_hashes()?;
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        alignment: a,
        config: config_json,
        generation_config,
        tokenizer_config,
        sections,
        tensors,
        ffn_layers,
        experts,
        provenance: Provenance {
            flashpack_version: env!("CARGO_PKG_VERSION").to_string(),
            source_files,
            options: PackOptions {
                dtype: options.dtype.name().into(),
                zstd_level: options.zstd_level,
                alignment: a,
            },
        },
        calibration: extras.calibration.clone(),
        predictors: predictor_entries,
        quantization: (quant != QuantPolicy::default()).then_some(quant),
        selectors: selector_entries,
        routing: extras.routing.clone(),
    };
    let finished = finish_packed_file(file, &manifest)?;
    let (file_bytes, commit_ms) = (finished.file_bytes, finished.commit_ms);

    let section_bytes = |kind: SectionKind| {
        manifest
            .sections
            .iter()
            .filter(|s| s.kind == kind)
            .map(|s| s.length)
            .sum::<u64>()
    };
    Ok(ConvertSummary {
        output: out.to_path_buf(),
        file_bytes,
        dense_bytes: section_bytes(SectionKind::Dense),
        dense_raw_bytes: manifest
            .sections
            .iter()
            .filter(|s| s.kind == SectionKind::Dense)
            .map(|s| s.raw_length)
            .sum(),
        ffn_bytes: section_bytes(SectionKind::Ffn),
        tokenizer_bytes: section_bytes(SectionKind::File),
        sections: manifest.sections.len(),
        manifest_bytes: finished.manifest_bytes,
        manifest_sha256: hex::encode(finished.manifest_sha256),
        hash_sources_ms,
        dense_ms,
        ffn_ms,
        commit_ms,
        selector: selector_bits,
        selector_bytes,
        calibration_tokens: extras.calibration.as_ref().map(|c| c.tokens),
        calibrate_ms: extras.calibrate_ms,
        train_ms: extras.train_ms,
        predictors: extras.reports,
    })
}

/// The predictor section: per layer A `[hidden, rank]`, B `[rank, neurons]` and the
/// bias, f16, with B's columns and the bias permuted into packed neuron order so
/// that the predictor names packed positions directly.
pub(crate) fn write_predictors(
    file: &mut AtomicOutput,
    sections: &mut Vec<SectionEntry>,
    tensors: &mut Vec<TensorEntry>,
    predictors: &[(LowRankPredictor, PredictorMetrics)],
    orders: &[Vec<u32>],
    zstd: Option<i32>,
    alignment: u64,
) -> Result<Vec<PredictorEntry>> {
    if predictors.is_empty() {
        return Ok(Vec::new());
    }
    file.pad_to(alignment)?;
    let mut w = SectionWriter::new(
        file,
        PREDICTOR_SECTION,
        SectionKind::Predictor,
        zstd,
        DENSE_CHUNK_BYTES,
    );
    let mut entries = Vec::new();
    let f16_bytes = |values: &mut dyn Iterator<Item = f32>| {
        crate::dtype::narrow(crate::dtype::DType::F16, values)
    };
    for (layer, ((p, m), order)) in predictors.iter().zip(orders).enumerate() {
        let permuted_b =
            (0..p.rank).flat_map(|r| order.iter().map(move |&j| p.b[r * p.ffn + j as usize]));
        let permuted_bias = order.iter().map(|&j| p.bias[j as usize]);
        let parts: [(&str, Vec<u64>, Vec<u8>); 3] = [
            (
                "a",
                vec![p.d as u64, p.rank as u64],
                f16_bytes(&mut p.a.iter().copied()),
            ),
            (
                "b",
                vec![p.rank as u64, p.ffn as u64],
                f16_bytes(&mut permuted_b.into_iter()),
            ),
            (
                "bias",
                vec![p.ffn as u64],
                f16_bytes(&mut permuted_bias.into_iter()),
            ),
        ];
        for (part, shape, bytes) in parts {
            w.pad_raw(file, TENSOR_ALIGN)?;
            tensors.push(TensorEntry {
                name: predictor_tensor_name(layer, part),
                dtype: TableDType::F16,
                shape,
                section: PREDICTOR_SECTION.into(),
                offset: w.raw_position(),
                length: bytes.len() as u64,
            });
            w.write(file, &bytes)?;
        }
        entries.push(PredictorEntry {
            layer: layer as u64,
            rank: p.rank as u64,
            a_tensor: predictor_tensor_name(layer, "a"),
            b_tensor: predictor_tensor_name(layer, "b"),
            bias_tensor: predictor_tensor_name(layer, "bias"),
            threshold: p.threshold,
            recall: m.recall,
            precision: m.precision,
            frac_predicted: m.frac_predicted,
            frac_true: m.frac_true,
        });
    }
    sections.push(w.finish(file)?);
    Ok(entries)
}

/// The selector section (format section 10), after the last FFN section: per
/// layer the gate's values and scales, then the up's (the manifest's entries
/// name them), each tensor at the next multiple of 64 raw bytes.
fn write_selectors(
    file: &mut AtomicOutput,
    sections: &mut Vec<SectionEntry>,
    tensors: &mut Vec<TensorEntry>,
    bits: Option<crate::runtime::lowbit::LowBits>,
    copies: &[(
        crate::runtime::lowbit::QuantMatrix,
        crate::runtime::lowbit::QuantMatrix,
    )],
    zstd: Option<i32>,
    alignment: u64,
) -> Result<Vec<SelectorEntry>> {
    let Some(bits) = bits.filter(|_| !copies.is_empty()) else {
        return Ok(Vec::new());
    };
    let kind = crate::format::layout::SelectorType::from(bits);
    file.pad_to(alignment)?;
    let mut w = SectionWriter::new(
        file,
        SELECTOR_SECTION,
        SectionKind::Selector,
        zstd,
        DENSE_CHUNK_BYTES,
    );
    let mut entries = Vec::new();
    for (layer, (gate, up)) in copies.iter().enumerate() {
        let [(values_dtype, values_shape), (scale_dtype, scale_shape)] = kind
            .shapes(gate.rows as u64, gate.cols as u64)
            .expect("a layer's width fits");
        for (part, m) in [("gate", gate), ("up", up)] {
            for (suffix, dtype, shape, bytes) in [
                ("", values_dtype, &values_shape, m.data.clone()),
                ("_scale", scale_dtype, &scale_shape, m.scale_bytes()),
            ] {
                w.pad_raw(file, TENSOR_ALIGN)?;
                tensors.push(TensorEntry {
                    name: selector_tensor_name(layer, &format!("{part}{suffix}")),
                    dtype,
                    shape: shape.clone(),
                    section: SELECTOR_SECTION.into(),
                    offset: w.raw_position(),
                    length: bytes.len() as u64,
                });
                w.write(file, &bytes)?;
            }
        }
        entries.push(SelectorEntry {
            layer: layer as u64,
            kind,
            gate_tensor: selector_tensor_name(layer, "gate"),
            gate_scale_tensor: selector_tensor_name(layer, "gate_scale"),
            up_tensor: selector_tensor_name(layer, "up"),
            up_scale_tensor: selector_tensor_name(layer, "up_scale"),
        });
    }
    sections.push(w.finish(file)?);
    Ok(entries)
}

/// Calibrates on the plan's text with the dense model, trains the predictors, and
/// turns the result into what the writer records.
fn calibrated_extras(
    ckpt: &Checkpoint,
    plan: &CalibrationPlan,
    progress: Progress<'_>,
) -> Result<PackExtras> {
    let model = crate::runtime::Model::from_checkpoint(ckpt)?;
    let tokenizer = ckpt.tokenizer()?;
    let trained = calibrate_and_train(&model, &ckpt.names, ckpt, &tokenizer, plan, progress)?;
    drop(model);
    extras_from(trained, plan, &ckpt.config)
}

/// A mixture-of-experts model's calibration: its routing counts over the
/// plan's text (no predictors, identity neuron orders).
fn routing_extras(
    ckpt: &Checkpoint,
    plan: &CalibrationPlan,
    progress: Progress<'_>,
) -> Result<PackExtras> {
    let started = std::time::Instant::now();
    let model = crate::runtime::Model::from_checkpoint(ckpt)?;
    let tokenizer = ckpt.tokenizer()?;
    let routing = crate::predictor::routing::routing_statistics(
        &model,
        &tokenizer,
        &plan.files,
        plan.calibrate.max_tokens,
        plan.calibrate.ctx,
        progress,
    )?;
    Ok(PackExtras {
        orders: (0..ckpt.config.num_layers)
            .map(|_| (0..ckpt.config.ffn_width as u32).collect())
            .collect(),
        predictors: Vec::new(),
        calibration: None,
        routing: Some(routing),
        reports: Vec::new(),
        calibrate_ms: Some(started.elapsed().as_secs_f64() * 1e3),
        train_ms: None,
    })
}

/// Turns a calibration and its trained predictors into what the writer records.
pub(crate) fn extras_from(
    trained: Trained,
    plan: &CalibrationPlan,
    config: &crate::input::ModelConfig,
) -> Result<PackExtras> {
    let cal = &trained.calibration;
    let files = plan
        .files
        .iter()
        .map(|path| {
            let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
            Ok(SourceFile {
                name: path
                    .file_name()
                    .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
                bytes: bytes.len() as u64,
                sha256: hex::encode(Sha256::digest(&bytes)),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let silu = config.activation == crate::input::config::Activation::Silu;
    let info = CalibrationInfo {
        tokens: cal.tokens as u64,
        files,
        target_sparsity: silu.then_some(plan.calibrate.target_sparsity),
        layers: cal
            .layers
            .iter()
            .map(|l| LayerCalibrationEntry {
                window_max: l.window_max.iter().map(|&w| w as u64).collect(),
                mean_active_fraction: l.mean_active_fraction,
                silu_threshold: l.silu_threshold,
                product_threshold: l.product_threshold,
                layer_sparsity: l.layer_sparsity,
            })
            .collect(),
    };
    let parts = if config.architecture.is_llama_family() {
        3
    } else {
        2
    };
    let ffn_params = (parts * config.hidden_size * config.ffn_width) as f64;
    let reports = trained
        .predictors
        .iter()
        .enumerate()
        .map(|(layer, (p, m))| PredictorReport {
            layer,
            rank: m.rank,
            threshold: p.threshold,
            recall: m.recall,
            precision: m.precision,
            frac_predicted: m.frac_predicted,
            frac_true: m.frac_true,
            bytes_percent_of_ffn: 100.0 * (p.size_bytes_f16() as f64 / 2.0) / ffn_params,
            window_max: info.layers[layer].window_max.clone(),
            train_ms: trained.train_seconds[layer] * 1e3,
        })
        .collect();
    Ok(PackExtras {
        orders: trained.orders,
        predictors: trained.predictors,
        calibration: Some(info),
        routing: None,
        reports,
        calibrate_ms: Some(trained.calibrate_seconds * 1e3),
        train_ms: Some(trained.train_seconds.iter().sum::<f64>() * 1e3),
    })
}

/// Streams a tensor into the section in the target dtype, a bounded piece at a time.
fn write_converted(
    w: &mut SectionWriter,
    out: &mut AtomicOutput,
    t: &TensorRef<'_>,
    dtype: DType,
) -> Result<()> {
    const PIECE: usize = 1 << 20;
    let n = t.numel();
    let mut buf = Vec::new();
    let mut start = 0;
    while start < n {
        let count = PIECE.min(n - start);
        buf.resize(count * dtype.size_bytes(), 0);
        convert_range(t, start, count, dtype, &mut buf);
        w.write(out, &buf)?;
        start += count;
    }
    Ok(())
}

/// sha256 of every file the pack is made from, by name, in parallel.
fn hash_sources(ckpt: &Checkpoint, progress: Progress<'_>) -> Result<Vec<SourceFile>> {
    let mut names: Vec<String> = vec![crate::input::CONFIG_FILE.to_string()];
    names.extend(
        SIDE_FILES
            .iter()
            .filter(|n| ckpt.dir.join(n).is_file())
            .map(|n| n.to_string()),
    );
    if ckpt.weights.index.is_some() {
        names.push(crate::input::weights::INDEX_FILE.to_string());
    }
    names.extend(ckpt.weights.file_names().map(str::to_string));
    names.sort();
    // Sizes first, so that progress counts against the whole.
    let total: u64 = names
        .iter()
        .map(|name| std::fs::metadata(ckpt.dir.join(name)).map_or(0, |m| m.len()))
        .sum();
    let hashed = std::sync::atomic::AtomicU64::new(0);
    progress(Phase::Hashing, 0, total);
    names
        .par_iter()
        .map(|name| {
            let path = ckpt.dir.join(name);
            let mut f = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; HASH_PIECE_BYTES];
            let mut bytes = 0u64;
            loop {
                let n = match std::io::Read::read(&mut f, &mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(Error::io(&path, e)),
                };
                hasher.update(&buf[..n]);
                bytes += n as u64;
                let done = hashed.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                // A file that grew while hashed would pass the total: cap it.
                progress(Phase::Hashing, (done + n as u64).min(total), total);
            }
            Ok(SourceFile {
                name: name.clone(),
                bytes,
                sha256: hex::encode(hasher.finalize()),
            })
        })
        .collect()
}

/// Bytes read (and reported) at a time while hashing a source file.
const HASH_PIECE_BYTES: usize = 4 << 20;
