//! `inspect`: what a checkpoint directory or a packed file holds (architecture,
//! sizes, parameter counts, dtypes; for a packed file its layout, quantization,
//! selector copies, routing and per-layer predictor metrics). The library builds
//! the [`InspectReport`]; `flashpack inspect` and the Python package report it.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::Result;
use crate::format::PackedFile;
use crate::input::summary::CheckpointSummary;
use crate::input::Checkpoint;

/// What [`inspect`] found. It serializes as one JSON object: the summary's
/// keys, `format` (`flashpack` or `hf_checkpoint`) and, for a packed file, the
/// layout's keys (the object `flashpack inspect --json` prints).
#[derive(Debug, Clone)]
pub struct InspectReport {
    /// The model path inspected (a Hub id resolved to its local snapshot).
    pub model: PathBuf,
    /// Architecture, sizes, parameter counts, dtypes, files.
    pub summary: CheckpointSummary,
    /// For a packed file: what its layout adds; `None` for a checkpoint.
    pub packed: Option<PackedLayout>,
}

impl InspectReport {
    /// The report as one JSON object: the summary, `format` and the layout's
    /// keys (which win over a summary key of the same name).
    pub fn to_json(&self) -> serde_json::Result<serde_json::Value> {
        let mut json = serde_json::to_value(&self.summary)?;
        json["format"] = if self.packed.is_some() {
            "flashpack"
        } else {
            "hf_checkpoint"
        }
        .into();
        if let Some(p) = &self.packed {
            if let serde_json::Value::Object(layout) = serde_json::to_value(p)? {
                for (k, v) in layout {
                    json[k] = v;
                }
            }
        }
        Ok(json)
    }
}

impl Serialize for InspectReport {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        self.to_json()
            .map_err(serde::ser::Error::custom)?
            .serialize(serializer)
    }
}

/// Inspects `model`: a Hugging Face checkpoint directory (its side files
/// checked too), a packed file, or a Hub id in the local cache.
pub fn inspect(model: &Path) -> Result<InspectReport> {
    let model = crate::input::hub::resolve_model(model)?;
    let (summary, packed) = match crate::input::model_path_kind(&model)? {
        crate::input::ModelPathKind::Packed => {
            let (s, p) = packed_summary(&model)?;
            (s, Some(p))
        }
        crate::input::ModelPathKind::Checkpoint => {
            let ckpt = Checkpoint::open(&model)?;
            ckpt.check_side_files()?;
            (CheckpointSummary::of(&ckpt), None)
        }
    };
    Ok(InspectReport {
        model,
        summary,
        packed,
    })
}

/// What a packed file adds to the model summary.
#[derive(Debug, Clone, Serialize)]
pub struct PackedLayout {
    /// The format version of the file.
    pub format_version: u32,
    /// Alignment of every section in bytes.
    pub alignment: u64,
    /// Number of sections.
    pub sections: usize,
    /// Stored (compressed) bytes of the dense section.
    pub dense_bytes: u64,
    /// Uncompressed bytes of the dense section.
    pub dense_raw_bytes: u64,
    /// Stored bytes of the FFN sections.
    pub ffn_bytes: u64,
    /// Element type of the FFN bundles (`none` without any).
    pub ffn_dtype: String,
    /// Bytes of one neuron bundle (0 without any).
    pub bundle_bytes: u64,
    /// Mixture-of-experts files: one section per expert (spec 4.1), each of
    /// `expert_bytes` (its bundles).
    #[serde(skip_serializing_if = "is_zero")]
    pub expert_sections: usize,
    /// Bytes of one expert's bundles (mixture-of-experts files).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expert_bytes: Option<u64>,
    /// Whether the file holds sparsity predictors.
    pub has_predictors: bool,
    /// SHA-256 of the manifest, hex.
    pub manifest_sha256: String,
    /// The flashpack version that wrote the file.
    pub flashpack_version: String,
    /// The dtype option the file was converted with.
    pub convert_dtype: String,
    /// The zstd level the file was converted with.
    pub zstd_level: i32,
    /// Calibration tokens, for a calibrated file.
    pub calibration_tokens: Option<u64>,
    /// A calibrated mixture of experts: how often each expert was chosen per
    /// sparse layer (spec 5.1; `files` left out).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub routing: Option<RoutingSummary>,
    /// Format section 9: the block type of each part (null for a float file).
    pub quantization: Option<crate::format::layout::QuantPolicy>,
    /// Raw bytes of each part's weights (the policy's parts, `ffn` with its
    /// down scales; `other`: norms, biases, orders, predictors and every other
    /// tensor).
    pub part_sizes: PartBytes,
    /// FFN layers whose quantized down projection has a per-channel scale
    /// (spec 9.6).
    pub down_scale_layers: usize,
    /// Format section 10: the type of the selector copies (`int8`, `int4`;
    /// null without).
    pub selector: Option<&'static str>,
    /// Raw bytes of the selector copies (what `flash` holds in DRAM for them;
    /// not in `part_sizes`).
    pub selector_bytes: u64,
    /// `selector_bytes` as a fraction of the FFN bundles' bytes.
    pub selector_share_of_ffn: f64,
    /// Per layer: predictor rank, threshold and held-out metrics, calibration maxima.
    pub layers: Vec<serde_json::Value>,
}

/// The routing counts of a packed file, as `inspect` reports them.
#[derive(Debug, Clone, Serialize)]
pub struct RoutingSummary {
    /// Calibration tokens the counts come from.
    pub tokens: u64,
    /// Per sparse layer, how often each expert was chosen.
    pub layers: Vec<crate::format::layout::RoutingLayer>,
}

/// Raw bytes per part of the model, as `inspect` reports them.
#[derive(Debug, Clone, Serialize, Default)]
pub struct PartBytes {
    /// The token embedding.
    pub embed_bytes: u64,
    /// Attention weights.
    pub attn_bytes: u64,
    /// FFN weights (bundles and down scales).
    pub ffn_bytes: u64,
    /// An untied output projection.
    pub head_bytes: u64,
    /// Norms, biases, orders, predictors and every other tensor.
    pub other_bytes: u64,
}

/// Raw bytes of the selector copies' tensors.
fn selector_bytes(file: &PackedFile) -> u64 {
    file.manifest
        .tensors
        .iter()
        .filter(|t| t.section == crate::format::layout::SELECTOR_SECTION)
        .map(|t| t.length)
        .sum()
}

fn part_bytes(file: &PackedFile) -> PartBytes {
    use crate::format::quant_policy::{part_of_tensor, QuantPart};
    let parts = part_of_tensor(&file.config, &file.names);
    let mut b = PartBytes::default();
    for t in &file.manifest.tensors {
        // The selector copies are reported on their own (`selector_bytes`).
        if t.section == crate::format::layout::SELECTOR_SECTION {
            continue;
        }
        let slot = match parts.get(t.name.as_str()) {
            Some(QuantPart::Embed) => &mut b.embed_bytes,
            Some(QuantPart::Attn) => &mut b.attn_bytes,
            Some(QuantPart::Head) => &mut b.head_bytes,
            // A quantized down projection's scale (spec 9.6) is part of the FFN.
            None if crate::format::layout::down_scale_layer(&t.name).is_some() => &mut b.ffn_bytes,
            Some(QuantPart::Ffn) | None => &mut b.other_bytes,
        };
        *slot += t.length;
    }
    b.ffn_bytes += file
        .manifest
        .ffn_layers
        .iter()
        .map(|l| l.neurons * l.bundle_bytes)
        .chain(
            file.manifest
                .experts
                .iter()
                .map(|e| e.neurons * e.bundle_bytes),
        )
        .sum::<u64>();
    b
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// The summary of the packed file at `path` and what its layout adds.
fn packed_summary(path: &Path) -> Result<(CheckpointSummary, PackedLayout)> {
    use crate::format::layout::SectionKind;
    let file = PackedFile::open(path)?;
    let m = &file.manifest;
    let ffn_dtype = |name: &str| {
        let layer = file
            .names
            .layers
            .iter()
            .position(|l| l.ffn.projections().iter().any(|p| p.weight == name))?
            as u64;
        // A dense layer's bundles, or (a sparse layer) its experts'.
        m.ffn_layers
            .iter()
            .find(|l| l.layer == layer)
            .map(|l| l.dtype)
            .or_else(|| m.experts.iter().find(|e| e.layer == layer).map(|e| e.dtype))?
            .weight()
    };
    let dtype_of = |name: &str| {
        file.tensor_entry(name)
            .and_then(|t| t.dtype.weight())
            .or_else(|| ffn_dtype(name))
    };
    let mut s = CheckpointSummary::from_model(&file.config, &file.names, &dtype_of);
    s.bytes_on_disk = file.file_length;
    s.weight_files = vec![path.display().to_string()];
    let bytes = |kind: SectionKind| {
        m.sections
            .iter()
            .filter(|x| x.kind == kind)
            .map(|x| x.length)
            .sum::<u64>()
    };
    let layout = PackedLayout {
        format_version: m.format_version,
        alignment: m.alignment,
        sections: m.sections.len(),
        dense_bytes: bytes(SectionKind::Dense),
        dense_raw_bytes: m
            .sections
            .iter()
            .filter(|x| x.kind == SectionKind::Dense)
            .map(|x| x.raw_length)
            .sum(),
        ffn_bytes: bytes(SectionKind::Ffn),
        ffn_dtype: m
            .ffn_layers
            .first()
            .map(|l| l.dtype)
            .or_else(|| m.experts.first().map(|e| e.dtype))
            .map_or("none", |d| d.name())
            .into(),
        bundle_bytes: m
            .ffn_layers
            .first()
            .map(|l| l.bundle_bytes)
            .or_else(|| m.experts.first().map(|e| e.bundle_bytes))
            .unwrap_or(0),
        expert_sections: m.experts.len(),
        expert_bytes: m.experts.first().map(|e| e.neurons * e.bundle_bytes),
        has_predictors: m.sections.iter().any(|x| x.kind == SectionKind::Predictor),
        manifest_sha256: hex::encode(file.preamble.manifest_sha256),
        flashpack_version: m.provenance.flashpack_version.clone(),
        convert_dtype: m.provenance.options.dtype.clone(),
        zstd_level: m.provenance.options.zstd_level,
        calibration_tokens: m.calibration.as_ref().map(|c| c.tokens),
        routing: m.routing.as_ref().map(|r| RoutingSummary {
            tokens: r.tokens,
            layers: r.layers.clone(),
        }),
        quantization: m.quantization,
        part_sizes: part_bytes(&file),
        down_scale_layers: m
            .tensors
            .iter()
            .filter(|t| crate::format::layout::down_scale_layer(&t.name).is_some())
            .count(),
        selector: m.selectors.first().map(|s| s.kind.name()),
        selector_bytes: selector_bytes(&file),
        selector_share_of_ffn: selector_bytes(&file) as f64
            / part_bytes(&file).ffn_bytes.max(1) as f64,
        layers: (0..file.config.num_layers)
            .map(|i| {
                let mut layer = serde_json::json!({ "layer": i });
                if let Some(p) = m.predictors.iter().find(|p| p.layer == i as u64) {
                    layer["rank"] = p.rank.into();
                    layer["threshold"] = p.threshold.into();
                    layer["recall"] = p.recall.into();
                    layer["precision"] = p.precision.into();
                    layer["frac_predicted"] = p.frac_predicted.into();
                    layer["frac_true"] = p.frac_true.into();
                }
                if let Some(c) = m.calibration.as_ref().and_then(|c| c.layers.get(i)) {
                    layer["window_max"] = c.window_max.clone().into();
                    layer["mean_active_fraction"] = c.mean_active_fraction.into();
                    layer["silu_threshold"] = c.silu_threshold.into();
                    if let Some(t) = c.product_threshold {
                        layer["product_threshold"] = t.into();
                    }
                    if let Some(s) = c.layer_sparsity {
                        layer["layer_sparsity"] = s.into();
                    }
                }
                layer
            })
            .collect(),
    };
    Ok((s, layout))
}
