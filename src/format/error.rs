//! One error variant per numbered MUST rule of `formats/flashpack-v1.md`.
//!
//! Structural rules (the file cannot be parsed or is inconsistent) are invalid
//! input, exit 2; integrity rules (a hash or a decompression does not match what
//! the manifest promises: the file was damaged after packing) are a failed check,
//! exit 1.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("rule 1: not a flashpack file (magic bytes {found:02x?})")]
    BadMagic { found: Vec<u8> },

    #[error(
        "rule 2: unsupported format version {found} (this flashpack reads version {supported})"
    )]
    UnsupportedVersion { found: u32, supported: u32 },

    #[error("rule 3: reserved preamble flags are {found:#x}, must be 0")]
    ReservedFlags { found: u32 },

    #[error("rule 4: manifest at {offset}+{length} does not end exactly at the end of the {file_length}-byte file (or exceeds {cap} bytes)")]
    ManifestPlacement {
        offset: u64,
        length: u64,
        file_length: u64,
        cap: u64,
    },

    #[error("rule 5: manifest sha256 does not match the preamble")]
    ManifestHash,

    #[error("rule 6: manifest is not valid: {message}")]
    ManifestSchema { message: String },

    #[error("rule 7: alignment {found} is not a power of two between {min} and {max}")]
    Alignment { found: u64, min: u64, max: u64 },

    #[error("rule 8: section {section:?} at offset {offset} is not aligned to {alignment}")]
    SectionMisaligned {
        section: String,
        offset: u64,
        alignment: u64,
    },

    #[error("rule 9: section {section:?} overlaps the region before it (starts at {offset}, previous ends at {previous_end})")]
    SectionOverlap {
        section: String,
        offset: u64,
        previous_end: u64,
    },

    #[error(
        "rule 10: gap before {what} (starts at {offset}, expected {expected}): the file has a hole"
    )]
    Hole {
        what: String,
        offset: u64,
        expected: u64,
    },

    #[error("rule 11: padding byte at offset {offset} is not zero")]
    NonZeroPadding { offset: u64 },

    #[error("rule 12: section {section:?} sha256 mismatch")]
    SectionHash { section: String },

    #[error("rule 13: chunk table of section {section:?} is invalid: {message}")]
    ChunkTable { section: String, message: String },

    #[error("rule 14: section {section:?} chunk {chunk} (file offset {offset}) sha256 mismatch")]
    ChunkHash {
        section: String,
        chunk: usize,
        offset: u64,
    },

    #[error("rule 15: section {section:?} chunk {chunk} does not decompress to its {raw_length} bytes: {message}")]
    Decompress {
        section: String,
        chunk: usize,
        raw_length: u64,
        message: String,
    },

    #[error("rule 16: section table is invalid: {message}")]
    SectionTable { message: String },

    #[error("rule 17: tensor {tensor:?} is invalid: {message}")]
    TensorTable { tensor: String, message: String },

    #[error("rule 18: the manifest does not describe a valid model: {message}")]
    Model { message: String },

    #[error("rule 19: neuron order of layer {layer} is not a permutation of 0..{neurons}")]
    NeuronOrder { layer: u64, neurons: u64 },

    #[error("rule 20: calibration of layer {layer}: {message}")]
    ProductThreshold { layer: u64, message: String },

    #[error("rule 21: the quantization policy does not match the tensors: {message}")]
    QuantPolicy { message: String },

    #[error("rule 22: tensor {tensor:?} is {dtype}, a block type only the weight matrices of section 9 may have")]
    QuantNotAllowed { tensor: String, dtype: String },

    #[error("rule 23: {what}: {message}")]
    QuantLayout { what: String, message: String },

    #[error("rule 24: {what}: {message}")]
    QuantData { what: String, message: String },

    #[error("rule 25: down scale {tensor:?}: {message}")]
    DownScale { tensor: String, message: String },

    #[error("rule 26: down scale {tensor:?}: {message}")]
    DownScaleData { tensor: String, message: String },
    #[error("rule 27: selector copy of layer {layer}: {message}")]
    SelectorLayout { layer: u64, message: String },

    #[error("rule 28: selector copies: {message}")]
    SelectorLayers { message: String },

    #[error("rule 29: selector copy of layer {layer}: {message}")]
    SelectorData { layer: u64, message: String },

    #[error("rule 31: experts: {message}")]
    Experts { message: String },

    #[error("rule 32: FFN layers of a mixture-of-experts model: {message}")]
    MoeFfnLayers { message: String },

    #[error("rule 33: neuron order of expert {expert} of layer {layer} is not a permutation of 0..{neurons}")]
    ExpertNeuronOrder {
        layer: u64,
        expert: u64,
        neurons: u64,
    },

    #[error("rule 34: routing statistics: {message}")]
    Routing { message: String },
}

impl FormatError {
    /// The rule number in `formats/flashpack-v1.md`.
    pub fn rule(&self) -> u32 {
        use FormatError::*;
        match self {
            BadMagic { .. } => 1,
            UnsupportedVersion { .. } => 2,
            ReservedFlags { .. } => 3,
            ManifestPlacement { .. } => 4,
            ManifestHash => 5,
            ManifestSchema { .. } => 6,
            Alignment { .. } => 7,
            SectionMisaligned { .. } => 8,
            SectionOverlap { .. } => 9,
            Hole { .. } => 10,
            NonZeroPadding { .. } => 11,
            SectionHash { .. } => 12,
            ChunkTable { .. } => 13,
            ChunkHash { .. } => 14,
            Decompress { .. } => 15,
            SectionTable { .. } => 16,
            TensorTable { .. } => 17,
            Model { .. } => 18,
            NeuronOrder { .. } => 19,
            ProductThreshold { .. } => 20,
            QuantPolicy { .. } => 21,
            QuantNotAllowed { .. } => 22,
            QuantLayout { .. } => 23,
            QuantData { .. } => 24,
            DownScale { .. } => 25,
            DownScaleData { .. } => 26,
            SelectorLayout { .. } => 27,
            SelectorLayers { .. } => 28,
            SelectorData { .. } => 29,
            Experts { .. } => 31,
            MoeFfnLayers { .. } => 32,
            ExpertNeuronOrder { .. } => 33,
            Routing { .. } => 34,
        }
    }

    /// Whether the error means bytes changed after packing (a failed integrity
    /// check, exit 1) rather than a file that does not follow the format (exit 2).
    pub fn is_integrity(&self) -> bool {
        matches!(
            self,
            FormatError::ManifestHash
                | FormatError::SectionHash { .. }
                | FormatError::ChunkHash { .. }
                | FormatError::Decompress { .. }
                | FormatError::NonZeroPadding { .. }
        )
    }
}
