//! What `flashpack inspect` reports about a model: shape, parameter counts by
//! group, dtypes and bytes on disk (a packed file adds its layout in the CLI).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::dtype::DType;
use crate::input::config::ModelConfig;
use crate::input::tensors::{ModelNames, ParamGroup};
use crate::input::Checkpoint;

/// A flat, serialisable description of a checkpoint.
#[derive(Debug, Clone, Serialize)]
pub struct CheckpointSummary {
    pub architecture: String,
    pub num_layers: usize,
    pub hidden_size: usize,
    pub ffn_width: usize,
    pub activation: String,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_context: usize,
    pub tie_word_embeddings: bool,
    pub params_total: u64,
    pub params_embeddings: u64,
    pub params_attention: u64,
    pub params_ffn: u64,
    pub params_other: u64,
    /// Parameters per stored dtype (`"f32"`, `"f16"`, `"bf16"`), over the tensors used.
    pub params_by_dtype: BTreeMap<String, u64>,
    pub declared_dtype: Option<String>,
    pub weight_files: Vec<String>,
    pub sharded: bool,
    /// Bytes of the weight files (the packed file itself for a packed file).
    #[serde(rename = "file_bytes")]
    pub bytes_on_disk: u64,
    /// Tensors in the files that the architecture does not use.
    pub unused_tensors: Vec<String>,
}

impl CheckpointSummary {
    pub fn of(ckpt: &Checkpoint) -> CheckpointSummary {
        let dtype_of = |name: &str| ckpt.weights.get(name).ok().map(|t| t.dtype);
        let mut s = CheckpointSummary::from_model(&ckpt.config, &ckpt.names, &dtype_of);
        // Fused tensors (Phi-3) are used through their split parts.
        let used: std::collections::HashSet<String> = ckpt
            .names
            .specs()
            .into_iter()
            .map(|s| s.name)
            .chain(ckpt.names.fused.iter().map(|f| f.name.clone()))
            .collect();
        s.weight_files = ckpt.weights.file_names().map(str::to_string).collect();
        s.sharded = ckpt.weights.index.is_some();
        s.bytes_on_disk = ckpt.weights.bytes_on_disk;
        s.unused_tensors = ckpt
            .weights
            .names()
            .filter(|n| !used.contains(*n))
            .map(str::to_string)
            .collect();
        s
    }

    /// The parts every model has, whatever holds it; `dtype_of` gives a tensor's
    /// stored dtype.
    pub fn from_model(
        cfg: &ModelConfig,
        names: &ModelNames,
        dtype_of: &dyn Fn(&str) -> Option<DType>,
    ) -> CheckpointSummary {
        let mut by_group: BTreeMap<&'static str, u64> = BTreeMap::new();
        let mut by_dtype: BTreeMap<String, u64> = BTreeMap::new();
        for spec in names.specs() {
            let numel: u64 = spec.shape.iter().map(|&d| d as u64).product();
            let group = match spec.group {
                ParamGroup::Embeddings => "embeddings",
                ParamGroup::Attention => "attention",
                ParamGroup::Ffn => "ffn",
                ParamGroup::Other => "other",
            };
            *by_group.entry(group).or_default() += numel;
            if let Some(dtype) = dtype_of(&spec.name) {
                *by_dtype.entry(dtype.name().to_string()).or_default() += numel;
            }
        }
        let group = |g: &str| by_group.get(g).copied().unwrap_or(0);
        CheckpointSummary {
            architecture: cfg.architecture.hf_name().to_string(),
            num_layers: cfg.num_layers,
            hidden_size: cfg.hidden_size,
            ffn_width: cfg.ffn_width,
            activation: cfg.activation.name().to_string(),
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            vocab_size: cfg.vocab_size,
            max_context: cfg.max_context,
            tie_word_embeddings: cfg.tie_word_embeddings,
            params_total: by_group.values().sum(),
            params_embeddings: group("embeddings"),
            params_attention: group("attention"),
            params_ffn: group("ffn"),
            params_other: group("other"),
            params_by_dtype: by_dtype,
            declared_dtype: cfg.declared_dtype.clone(),
            weight_files: Vec::new(),
            sharded: false,
            bytes_on_disk: 0,
            unused_tensors: Vec::new(),
        }
    }
}
