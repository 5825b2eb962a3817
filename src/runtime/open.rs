//! Opening whatever model a user names: a Hugging Face checkpoint directory or a
//! flashpack file, as the same [`Model`] and tokenizer, so every command accepts both.

use std::path::Path;
use std::sync::Arc;

use crate::error::Result;
use crate::format::layout::{PREDICTOR_SECTION, SELECTOR_SECTION};
use crate::format::PackedFile;
use crate::input::{Checkpoint, TextTokenizer};
use crate::runtime::ffn::Criterion;
use crate::runtime::lowbit::{LowBits, QuantMatrix};
use crate::runtime::packed::{packed_tokenizer, PackedWeights};
use crate::runtime::predictor::LowRankPredictor;
use crate::runtime::sparse::{apply_ffn_mode, FfnMode, NeuronCounter, Selector, SparsityData};
use crate::runtime::Model;

/// Where a loaded model came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelSource {
    Checkpoint,
    Packed,
}

pub struct LoadedModel {
    pub model: Model,
    pub tokenizer: TextTokenizer,
    pub source: ModelSource,
    /// Predictors and SiLU thresholds of a calibrated packed file.
    pub sparsity: Option<SparsityData>,
}

impl LoadedModel {
    /// Switches the model's FFNs to `mode` (see [`apply_ffn_mode`]).
    pub fn set_ffn_mode(&mut self, mode: FfnMode) -> Result<Option<Arc<NeuronCounter>>> {
        apply_ffn_mode(&mut self.model, mode, self.sparsity.as_ref())
    }
}

/// How a packed file's block-quantized weights are loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Values {
    /// In their blocks, computed with the integer kernels: what running a
    /// model uses.
    AsStored,
    /// Widened to f32, exactly the file's values: what calibration,
    /// predictor training and verification use.
    Dequantized,
}

/// A packed file's whole model in DRAM: its weights (a tensor source that
/// calibration and verification read again), the model and its tokenizer.
/// The one sequence every caller that loads a packed file uses.
pub fn load_packed(
    file: &PackedFile,
    values: Values,
) -> Result<(PackedWeights<'_>, Model, TextTokenizer)> {
    let weights = match values {
        Values::AsStored => PackedWeights::read_all_quantized(file)?,
        Values::Dequantized => PackedWeights::read_all(file)?,
    };
    let model = Model::load(&file.config, &file.names, &weights)?;
    let tokenizer = packed_tokenizer(file)?;
    Ok((weights, model, tokenizer))
}

/// Loads a checkpoint directory or a packed file (all weights in DRAM).
pub fn open_model(path: &Path) -> Result<LoadedModel> {
    // A missing path or one of the wrong kind is said as such, before either
    // reader reports a file it expected inside.
    crate::input::model_path_kind(path)?;
    if path.is_file() {
        let file = PackedFile::open(path)?;
        // Block-quantized weights stay in their blocks (format section 9).
        let (_, model, tokenizer) = load_packed(&file, Values::AsStored)?;
        Ok(LoadedModel {
            model,
            tokenizer,
            source: ModelSource::Packed,
            sparsity: sparsity_data(&file)?,
        })
    } else {
        let ckpt = Checkpoint::open(path)?;
        let model = Model::from_checkpoint(&ckpt)?;
        Ok(LoadedModel {
            model,
            tokenizer: ckpt.tokenizer()?,
            source: ModelSource::Checkpoint,
            sparsity: None,
        })
    }
}

/// The predictors (f16 in the file, widened) and SiLU thresholds of a packed
/// file, or `None` when it was not calibrated.
pub(crate) fn sparsity_data(file: &PackedFile) -> Result<Option<SparsityData>> {
    let m = &file.manifest;
    if m.calibration.is_none() && m.predictors.is_empty() {
        return Ok(None);
    }
    let layers = file.config.num_layers;
    let mut predictors: Vec<Option<LowRankPredictor>> = vec![None; layers];
    if !m.predictors.is_empty() {
        let raw = file.read_section(PREDICTOR_SECTION)?;
        let values = |name: &str| -> Vec<f32> {
            let t = file
                .tensor_entry(name)
                .expect("checked at open: predictor tensors exist");
            let dtype = t.dtype.weight().expect("checked at open: floating point");
            crate::dtype::widen(
                dtype,
                &raw[t.offset as usize..(t.offset + t.length) as usize],
            )
        };
        for p in &m.predictors {
            predictors[p.layer as usize] = Some(LowRankPredictor {
                d: file.config.hidden_size,
                rank: p.rank as usize,
                ffn: file.config.ffn_width,
                a: values(&p.a_tensor),
                b: values(&p.b_tensor),
                bias: values(&p.bias_tensor),
                threshold: p.threshold,
            });
        }
    }
    // Rule 20: a file's layers use one criterion; the product thresholds are
    // the newer one.
    let product = m
        .calibration
        .as_ref()
        .is_some_and(|c| c.layers.iter().any(|l| l.product_threshold.is_some()));
    let silu_thresholds = match &m.calibration {
        Some(c) if product => c.layers.iter().map(|l| l.product_threshold).collect(),
        Some(c) => c.layers.iter().map(|l| l.silu_threshold).collect(),
        None => vec![None; layers],
    };
    let mut copies = vec![None; layers];
    if !m.selectors.is_empty() {
        let raw = file.read_section(SELECTOR_SECTION)?;
        let bytes = |name: &str| -> &[u8] {
            let t = file
                .tensor_entry(name)
                .expect("checked at open: selector tensors exist (rule 27)");
            &raw[t.offset as usize..(t.offset + t.length) as usize]
        };
        for (sel, layer) in m.selectors.iter().zip(&m.ffn_layers) {
            let bits = LowBits::from(sel.kind);
            let read = |values: &str, scales: &str| {
                QuantMatrix::from_stored(
                    layer.neurons as usize,
                    layer.hidden as usize,
                    bits,
                    bytes(values).to_vec(),
                    bytes(scales),
                )
                .map_err(|message| crate::error::Error::Format {
                    path: file.path.clone(),
                    source: crate::format::FormatError::SelectorData {
                        layer: sel.layer,
                        message: format!("{values:?}: {message}"),
                    },
                })
            };
            copies[sel.layer as usize] = Some((
                read(&sel.gate_tensor, &sel.gate_scale_tensor)?,
                read(&sel.up_tensor, &sel.up_scale_tensor)?,
            ));
        }
    }
    Ok(Some(SparsityData {
        predictors,
        silu_thresholds,
        silu_criterion: if product {
            Criterion::Product
        } else {
            Criterion::Gate
        },
        selector: Selector::Auto,
        measure_selector: false,
        copies,
    }))
}

/// The `generation_config.json` a model came with: the checkpoint's file, or
/// the copy in a packed file's manifest; `None` when it had none.
pub fn generation_config(path: &Path) -> Result<Option<serde_json::Value>> {
    if path.is_file() {
        return Ok(PackedFile::open(path)?.manifest.generation_config);
    }
    let file = path.join(crate::input::tokenizer::GENERATION_CONFIG_FILE);
    match std::fs::read(&file) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| crate::error::Error::Json { path: file, source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(crate::error::Error::io(&file, e)),
    }
}
