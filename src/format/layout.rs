//! The on-disk types of flashpack format v1: the fixed preamble and the JSON
//! manifest. Parsing and the rules that make a file valid are in `reader.rs`;
//! the normative text is `formats/flashpack-v1.md`.

use serde::{Deserialize, Serialize};

/// The first 8 bytes of every flashpack file.
pub const MAGIC: [u8; 8] = *b"FLASHPK\0";
/// The one version this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// Size of the fixed preamble at offset 0.
pub const PREAMBLE_BYTES: u64 = 64;
/// Manifests of the largest models are tens of MiB (chunk hashes); a larger one is
/// not a manifest this format produces, and would be read whole into memory.
pub const MAX_MANIFEST_BYTES: u64 = 256 << 20;
/// Direct I/O needs at least logical-block alignment (512); beyond 1 MiB the padding
/// would waste more than it helps any device.
pub const MIN_ALIGNMENT: u64 = 512;
pub const MAX_ALIGNMENT: u64 = 1 << 20;
/// Raw bytes per chunk of the dense and file sections (each chunk independently
/// compressed and hashed).
pub const DENSE_CHUNK_BYTES: u64 = 1 << 20;
/// FFN chunks hold whole bundles and at most this many bytes, or one bundle when a
/// bundle is larger: small enough that a runtime can check what it reads.
pub const FFN_CHUNK_TARGET_BYTES: u64 = 64 << 10;
/// Raw offsets of dense tensors are multiples of this, so that widening kernels can
/// read them as aligned slices once decompressed.
pub const TENSOR_ALIGN: u64 = 64;

const _: () = assert!(MAGIC.len() + 4 + 4 + 8 + 8 + 32 == PREAMBLE_BYTES as usize);

/// The fixed 64-byte preamble, little-endian:
/// magic (8) | version u32 | flags u32 | manifest_offset u64 | manifest_length u64 |
/// manifest_sha256 (32).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preamble {
    pub magic: [u8; 8],
    pub version: u32,
    pub flags: u32,
    pub manifest_offset: u64,
    pub manifest_length: u64,
    pub manifest_sha256: [u8; 32],
}

impl Preamble {
    pub fn to_bytes(&self) -> [u8; PREAMBLE_BYTES as usize] {
        let mut out = [0u8; PREAMBLE_BYTES as usize];
        out[0..8].copy_from_slice(&self.magic);
        out[8..12].copy_from_slice(&self.version.to_le_bytes());
        out[12..16].copy_from_slice(&self.flags.to_le_bytes());
        out[16..24].copy_from_slice(&self.manifest_offset.to_le_bytes());
        out[24..32].copy_from_slice(&self.manifest_length.to_le_bytes());
        out[32..64].copy_from_slice(&self.manifest_sha256);
        out
    }

    pub fn from_bytes(b: &[u8; PREAMBLE_BYTES as usize]) -> Preamble {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&b[0..8]);
        let mut manifest_sha256 = [0u8; 32];
        manifest_sha256.copy_from_slice(&b[32..64]);
        Preamble {
            magic,
            version: u32_at(8),
            flags: u32_at(12),
            manifest_offset: u64_at(16),
            manifest_length: u64_at(24),
            manifest_sha256,
        }
    }
}

/// What a section holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SectionKind {
    /// Everything but the FFN weight matrices: read whole into DRAM.
    Dense,
    /// One layer's FFN neuron bundles, read piecewise; never compressed.
    Ffn,
    /// A side file carried verbatim (`tokenizer.json`).
    File,
    /// Sparsity predictors (written once calibration exists).
    Predictor,
    /// The low-precision selector copies of the gate and up projections
    /// (section 10), in the section named `selector`.
    Selector,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    None,
    Zstd,
}

/// One independently hashed (and, for zstd sections, independently compressed)
/// piece of a section. Chunks follow each other without gaps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkEntry {
    /// Stored bytes (compressed length for zstd sections).
    pub length: u64,
    /// sha256 of the stored bytes, lowercase hex.
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SectionEntry {
    pub name: String,
    pub kind: SectionKind,
    /// Absolute file offset of the first stored byte.
    pub offset: u64,
    /// Stored bytes.
    pub length: u64,
    /// Bytes after decompression (equals `length` when not compressed).
    pub raw_length: u64,
    pub compression: Compression,
    /// Raw bytes per chunk; every chunk but the last holds exactly this many.
    pub chunk_raw_bytes: u64,
    /// sha256 of all stored bytes, lowercase hex.
    pub sha256: String,
    pub chunks: Vec<ChunkEntry>,
}

/// Element type of a tensor in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TableDType {
    F32,
    F16,
    Bf16,
    /// Neuron orders.
    U32,
    /// Raw bytes: the quantized values of a selector copy (section 10), whose
    /// entry's `type` says how to read them.
    U8,
    /// Blocks of 32 values, 8-bit (section 9).
    #[serde(rename = "q8_0")]
    Q8_0,
    /// Blocks of 32 values, 4-bit with a minimum (section 9).
    #[serde(rename = "q4_1")]
    Q4_1,
}

impl TableDType {
    /// Bytes of one element; `None` for a block type, whose elements are not
    /// whole bytes ([`TableDType::row_bytes`] sizes those).
    pub fn element_bytes(self) -> Option<u64> {
        match self {
            TableDType::F32 | TableDType::U32 => Some(4),
            TableDType::F16 | TableDType::Bf16 => Some(2),
            TableDType::U8 => Some(1),
            TableDType::Q8_0 | TableDType::Q4_1 => None,
        }
    }

    /// Bytes of a row of `cols` values: `cols` elements, or for a block type
    /// `cols / 32` blocks (`None` when `cols` is not a multiple of 32 or the
    /// product overflows).
    pub fn row_bytes(self, cols: u64) -> Option<u64> {
        match (self.element_bytes(), self.quant()) {
            (Some(size), _) => cols.checked_mul(size),
            (None, Some(q)) => cols
                .is_multiple_of(crate::quant::BLOCK as u64)
                .then(|| (cols / crate::quant::BLOCK as u64).checked_mul(q.block_bytes() as u64))
                .flatten(),
            (None, None) => None,
        }
    }

    /// Bytes of a tensor of `shape` (rows of the last dimension); `None` on
    /// overflow or, for a block type, a last dimension that is not a multiple of
    /// 32. A shape of no dimensions is one element.
    pub fn tensor_bytes(self, shape: &[u64]) -> Option<u64> {
        let (last, rows) = match shape.split_last() {
            Some((last, rows)) => (*last, rows),
            None => (1, &[][..]),
        };
        let rows = rows.iter().try_fold(1u64, |a, &d| a.checked_mul(d))?;
        rows.checked_mul(self.row_bytes(last)?)
    }

    /// The block type, for `q8_0` and `q4_1`.
    pub fn quant(self) -> Option<crate::quant::QuantType> {
        match self {
            TableDType::Q8_0 => Some(crate::quant::QuantType::Q8_0),
            TableDType::Q4_1 => Some(crate::quant::QuantType::Q4_1),
            _ => None,
        }
    }

    pub fn from_quant(q: crate::quant::QuantType) -> TableDType {
        match q {
            crate::quant::QuantType::Q8_0 => TableDType::Q8_0,
            crate::quant::QuantType::Q4_1 => TableDType::Q4_1,
        }
    }

    pub fn from_weight(d: crate::dtype::DType) -> TableDType {
        match d {
            crate::dtype::DType::F32 => TableDType::F32,
            crate::dtype::DType::F16 => TableDType::F16,
            crate::dtype::DType::BF16 => TableDType::Bf16,
        }
    }

    /// The floating-point type (`None` for `u32` and the block types).
    pub fn weight(self) -> Option<crate::dtype::DType> {
        match self {
            TableDType::F32 => Some(crate::dtype::DType::F32),
            TableDType::F16 => Some(crate::dtype::DType::F16),
            TableDType::Bf16 => Some(crate::dtype::DType::BF16),
            TableDType::U32 | TableDType::U8 | TableDType::Q8_0 | TableDType::Q4_1 => None,
        }
    }

    /// Whether the type holds weights: a floating-point or a block type.
    pub fn is_weight(self) -> bool {
        !matches!(self, TableDType::U32 | TableDType::U8)
    }

    /// The name the manifest uses.
    pub fn name(self) -> &'static str {
        match self {
            TableDType::F32 => "f32",
            TableDType::F16 => "f16",
            TableDType::Bf16 => "bf16",
            TableDType::U32 => "u32",
            TableDType::U8 => "u8",
            TableDType::Q8_0 => "q8_0",
            TableDType::Q4_1 => "q4_1",
        }
    }
}

/// A tensor stored in a dense section (offsets are into the decompressed bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: TableDType,
    pub shape: Vec<u64>,
    pub section: String,
    pub offset: u64,
    pub length: u64,
}

/// One part of a neuron bundle, in bundle order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BundlePart {
    /// Row i of the gate projection (gated FFNs).
    Gate,
    /// Row i of the up projection (`fc1` in OPT).
    Up,
    /// Column i of the down projection (`fc2` in OPT).
    Down,
}

/// How one layer's FFN is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FfnLayerEntry {
    pub layer: u64,
    pub section: String,
    pub neurons: u64,
    pub hidden: u64,
    pub dtype: TableDType,
    pub parts: Vec<BundlePart>,
    /// `parts.len() * hidden * dtype size`: the fixed stride between bundles.
    pub bundle_bytes: u64,
    /// Name of the u32 tensor that maps packed position -> checkpoint neuron index.
    pub order_tensor: String,
}

/// How one expert of a mixture-of-experts layer is stored (spec 4.1, R31):
/// exactly as an FFN layer, in a section of its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpertEntry {
    pub layer: u64,
    pub expert: u64,
    pub section: String,
    pub neurons: u64,
    pub hidden: u64,
    pub dtype: TableDType,
    pub parts: Vec<BundlePart>,
    pub bundle_bytes: u64,
    pub order_tensor: String,
}

impl ExpertEntry {
    /// The expert's bundles described as an FFN layer's are (the code that
    /// reads bundles takes either).
    pub fn bundles(&self) -> FfnLayerEntry {
        FfnLayerEntry {
            layer: self.layer,
            section: self.section.clone(),
            neurons: self.neurons,
            hidden: self.hidden,
            dtype: self.dtype,
            parts: self.parts.clone(),
            bundle_bytes: self.bundle_bytes,
            order_tensor: self.order_tensor.clone(),
        }
    }
}

/// A source file the pack was made from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceFile {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

/// The options `convert` ran with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackOptions {
    /// `keep`, `f32`, `f16` or `bf16`.
    pub dtype: String,
    pub zstd_level: i32,
    pub alignment: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    pub flashpack_version: String,
    pub source_files: Vec<SourceFile>,
    pub options: PackOptions,
}

/// An `Option` field whose key must be present (its value may be null): with
/// `deserialize_with`, serde reports a missing key instead of defaulting it.
fn present<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<serde_json::Value>, D::Error> {
    Option::<serde_json::Value>::deserialize(d)
}

/// The manifest: everything needed to find and check every byte of the file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub alignment: u64,
    /// The checkpoint's `config.json`, verbatim as JSON.
    pub config: serde_json::Value,
    /// The checkpoint's `generation_config.json` (null when it had none); the
    /// key itself is required (rule 6), as serde would otherwise let it go.
    #[serde(deserialize_with = "present")]
    pub generation_config: Option<serde_json::Value>,
    /// The checkpoint's `tokenizer_config.json`, or null; the key is required.
    #[serde(deserialize_with = "present")]
    pub tokenizer_config: Option<serde_json::Value>,
    pub sections: Vec<SectionEntry>,
    pub tensors: Vec<TensorEntry>,
    pub ffn_layers: Vec<FfnLayerEntry>,
    /// Mixture-of-experts models: one entry per expert of each sparse layer,
    /// by layer then expert (spec 4.1); absent (empty) for dense models.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub experts: Vec<ExpertEntry>,
    pub provenance: Provenance,
    /// What calibration measured (absent without `--calib`).
    #[serde(default)]
    pub calibration: Option<CalibrationInfo>,
    /// One low-rank sparsity predictor per layer (empty without `--calib`).
    #[serde(default)]
    pub predictors: Vec<PredictorEntry>,
    /// Mixture-of-experts models calibrated on text: how often the router
    /// chose each expert of each sparse layer (spec 5.1, R34). Absent (and not
    /// written) otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<RoutingInfo>,
    /// Section 9: which parts are block-quantized, and to which type. Absent
    /// (and not written) in a file without block types.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<QuantPolicy>,
    /// Section 10: the low-precision selector copies, one per FFN layer; absent
    /// (and not written) in a file without them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub selectors: Vec<SelectorEntry>,
}

/// How a selector copy stores its values (section 10.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SelectorType {
    /// One signed byte per value, one f32 scale per row.
    Int8,
    /// Two values per byte, one f16 scale per block of 32.
    Int4,
}

impl SelectorType {
    pub fn name(self) -> &'static str {
        match self {
            SelectorType::Int8 => "int8",
            SelectorType::Int4 => "int4",
        }
    }

    /// A row of `hidden` values padded with zeros to a multiple of 32.
    pub fn padded(hidden: u64) -> Option<u64> {
        hidden.checked_add(31).map(|v| v / 32 * 32)
    }

    /// Dtype and shape of a copy's values and of its scales for a layer of
    /// `neurons` rows of `hidden` values (R27).
    pub fn shapes(self, neurons: u64, hidden: u64) -> Option<[(TableDType, Vec<u64>); 2]> {
        let p = Self::padded(hidden)?;
        Some(match self {
            SelectorType::Int8 => [
                (TableDType::U8, vec![neurons, p]),
                (TableDType::F32, vec![neurons]),
            ],
            SelectorType::Int4 => [
                (TableDType::U8, vec![neurons, p / 2]),
                (TableDType::F16, vec![neurons, p / 32]),
            ],
        })
    }
}

/// One FFN layer's selector copies (section 10): the gate and up projections'
/// rows in packed neuron order, quantized.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelectorEntry {
    pub layer: u64,
    #[serde(rename = "type")]
    pub kind: SelectorType,
    pub gate_tensor: String,
    pub gate_scale_tensor: String,
    pub up_tensor: String,
    pub up_scale_tensor: String,
}

impl SelectorEntry {
    /// The four tensors: gate values, gate scales, up values, up scales.
    pub fn tensor_names(&self) -> [&str; 4] {
        [
            &self.gate_tensor,
            &self.gate_scale_tensor,
            &self.up_tensor,
            &self.up_scale_tensor,
        ]
    }
}

/// Name of the selector section.
pub const SELECTOR_SECTION: &str = "selector";

/// `flashpack.selector.<layer>.<part>` (`gate`, `gate_scale`, `up`, `up_scale`).
pub fn selector_tensor_name(layer: usize, part: &str) -> String {
    format!("flashpack.selector.{layer}.{part}")
}

/// Section 9: the block type of each part of the model, null where the part
/// keeps its floating-point type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct QuantPolicy {
    /// The token embedding.
    #[serde(deserialize_with = "present_quant")]
    pub embed: Option<crate::quant::QuantType>,
    /// The attention projections' weights (q, k, v, o).
    #[serde(deserialize_with = "present_quant")]
    pub attn: Option<crate::quant::QuantType>,
    /// The FFN bundles.
    #[serde(deserialize_with = "present_quant")]
    pub ffn: Option<crate::quant::QuantType>,
    /// The output projection `lm_head.weight`; null with tied embeddings.
    #[serde(deserialize_with = "present_quant")]
    pub head: Option<crate::quant::QuantType>,
}

/// Like `present`: the policy's four keys are required, their values may be null.
fn present_quant<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<crate::quant::QuantType>, D::Error> {
    Option::<crate::quant::QuantType>::deserialize(d)
}

/// Calibration facts the runtime sizes itself from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationInfo {
    pub tokens: u64,
    /// The calibration text files, as the provenance lists sources.
    pub files: Vec<SourceFile>,
    /// SiLU models: the fraction of activations the thresholds zero.
    pub target_sparsity: Option<f64>,
    pub layers: Vec<LayerCalibrationEntry>,
}

/// Routing statistics of a mixture-of-experts model (spec 5.1, R34): over
/// `tokens` calibration tokens, how many chose each expert of each sparse layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutingInfo {
    pub tokens: u64,
    /// The calibration text files, as the provenance lists sources.
    pub files: Vec<SourceFile>,
    /// One entry per sparse layer, in layer order.
    pub layers: Vec<RoutingLayer>,
}

/// One sparse layer's routing counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutingLayer {
    /// The layer (from 0).
    pub layer: u64,
    /// Per expert, in expert order: calibration tokens whose top-k included it.
    pub counts: Vec<u64>,
}

impl RoutingLayer {
    /// Experts from most to least often chosen (ties: the lower index first).
    pub fn hottest_first(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.counts.len()).collect();
        order.sort_by(|&a, &b| self.counts[b].cmp(&self.counts[a]).then(a.cmp(&b)));
        order
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerCalibrationEntry {
    /// Most distinct neurons fired within any K consecutive tokens, K = 1, 2, 4, 8.
    pub window_max: Vec<u64>,
    pub mean_active_fraction: f64,
    /// SiLU: `|silu(gate . x)|` at or below this counts as not fired.
    pub silu_threshold: Option<f32>,
    /// SiLU, rule 20: `|silu(gate . x) * (up . x)|` at or below this counts as
    /// not fired (absent in files calibrated before the product criterion).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product_threshold: Option<f32>,
    /// SiLU, with `product_threshold`: the fraction of this layer's neuron
    /// activations the threshold zeroed on calibration tokens (the layer's share
    /// of the model-wide `target_sparsity`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_sparsity: Option<f64>,
}

/// A layer's predictor: `logits = (x A) B + bias` over packed neuron indices;
/// neuron p is predicted active when `logits[p] >= threshold`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictorEntry {
    pub layer: u64,
    pub rank: u64,
    /// `[hidden, rank]`, `[rank, neurons]` (columns in packed order), `[neurons]`.
    pub a_tensor: String,
    pub b_tensor: String,
    pub bias_tensor: String,
    pub threshold: f32,
    /// Held-out metrics measured when training.
    pub recall: f64,
    pub precision: f64,
    pub frac_predicted: f64,
    pub frac_true: f64,
}

/// Name of the predictor section.
pub const PREDICTOR_SECTION: &str = "predictors";

pub fn predictor_tensor_name(layer: usize, part: &str) -> String {
    format!("flashpack.predictor.{layer}.{part}")
}

/// Name of the dense section.
pub const DENSE_SECTION: &str = "dense";
/// Name of the section holding `tokenizer.json`.
pub const TOKENIZER_SECTION: &str = "tokenizer.json";

pub fn ffn_section_name(layer: usize) -> String {
    format!("ffn.{layer}")
}

/// Decodes an order tensor's little-endian u32 values (`order[p]` is the
/// checkpoint index of packed neuron `p`): the one decoder of the format's
/// orders. Trailing bytes short of a value are ignored; rule 19 (and 33)
/// checks the result with [`is_permutation`].
pub fn decode_order(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Whether the order tensor's `bytes` hold each of `0..n` exactly once.
pub fn is_permutation(bytes: &[u8], n: u64) -> bool {
    if bytes.len() as u64 != n * 4 {
        return false;
    }
    let mut seen = vec![false; n as usize];
    decode_order(bytes).into_iter().all(|v| {
        seen.get_mut(v as usize)
            .is_some_and(|s| !std::mem::replace(s, true))
    })
}

pub fn order_tensor_name(layer: usize) -> String {
    format!("flashpack.ffn.{layer}.order")
}

/// The per-output-channel scale of layer `layer`'s quantized down projection
/// (spec 9.6).
pub fn down_scale_tensor_name(layer: usize) -> String {
    format!("flashpack.ffn.{layer}.down_scale")
}

/// The layer a down-scale tensor name (spec 9.6) names, if it is one.
pub fn down_scale_layer(name: &str) -> Option<&str> {
    name.strip_prefix("flashpack.ffn.")?
        .strip_suffix(".down_scale")
}

/// The section of expert `expert` of layer `layer` (spec 4.1).
pub fn expert_section_name(layer: usize, expert: usize) -> String {
    format!("ffn.{layer}.expert.{expert}")
}

/// The neuron order tensor of expert `expert` of layer `layer`.
pub fn expert_order_tensor_name(layer: usize, expert: usize) -> String {
    format!("flashpack.ffn.{layer}.expert.{expert}.order")
}

pub fn align_up(value: u64, alignment: u64) -> Option<u64> {
    value
        .checked_add(alignment - 1)
        .map(|v| v / alignment * alignment)
}
