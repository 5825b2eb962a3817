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
    /// The Hugging Face class (`LlamaForCausalLM`, ...).
    pub architecture: String,
    /// Transformer layers.
    pub num_layers: usize,
    /// Width of the residual stream (d_model).
    pub hidden_size: usize,
    /// Neurons per FFN layer (for a mixture of experts: of its dense layers).
    pub ffn_width: usize,
    /// The FFN activation (`relu`, `silu`, `gelu_pytorch_tanh`, ...).
    pub activation: String,
    /// FATReLU's threshold (`hidden_act_param`): a gate below it is zeroed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub activation_threshold: Option<f32>,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (fewer than `num_heads` with grouped-query attention).
    pub num_kv_heads: usize,
    /// Dimension of each head.
    pub head_dim: usize,
    /// Rows of the embedding (and of the output projection).
    pub vocab_size: usize,
    /// The longest context the runtime uses: `max_position_embeddings`, or
    /// the sliding window where one is configured.
    pub max_context: usize,
    /// Whether the output projection is the token embedding.
    pub tie_word_embeddings: bool,
    /// All parameters the architecture uses.
    pub params_total: u64,
    /// Token (and learned position) embeddings and an untied output projection.
    pub params_embeddings: u64,
    /// Attention projections and their biases.
    pub params_attention: u64,
    /// FFN weights: what flashpack leaves on flash.
    pub params_ffn: u64,
    /// The rest: norms, OPT's input and output projections, MoE routers.
    pub params_other: u64,
    /// Parameters per stored dtype (`"f32"`, `"f16"`, `"bf16"`), over the tensors used.
    pub params_by_dtype: BTreeMap<String, u64>,
    /// The dtype `config.json` declares (`dtype` or `torch_dtype`).
    pub declared_dtype: Option<String>,
    /// The weight files' names (the packed file's own for a packed file).
    pub weight_files: Vec<String>,
    /// Whether the weights are split over shards with an index.
    pub sharded: bool,
    /// Bytes of the weight files (the packed file itself for a packed file).
    #[serde(rename = "file_bytes")]
    pub bytes_on_disk: u64,
    /// Tensors in the files that the architecture does not use.
    pub unused_tensors: Vec<String>,
    /// A mixture-of-experts model's experts (absent for dense models).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub experts: Option<ExpertsSummary>,
}

/// The experts of a mixture-of-experts model, as `inspect` shows them.
#[derive(Debug, Clone, Serialize)]
pub struct ExpertsSummary {
    /// Experts per sparse layer.
    pub count: usize,
    /// Experts the router chooses per token.
    pub per_token: usize,
    /// Neurons of each expert.
    pub expert_width: usize,
    /// Whether the chosen experts' probabilities are renormalised.
    pub norm_topk_prob: bool,
    /// Qwen2-MoE's shared expert's neurons.
    pub shared_expert_width: Option<usize>,
    /// The layers whose FFN is the mixture (the others are dense, `ffn_width`).
    pub sparse_layers: Vec<usize>,
    /// FFN parameters one token uses: its chosen experts' and the shared
    /// expert's in the sparse layers, the dense layers' whole FFN.
    pub params_ffn_active: u64,
}

impl CheckpointSummary {
    /// The summary of an opened checkpoint directory.
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
        let experts = cfg.moe.as_ref().map(|m| {
            let gated = |width: usize| 3 * (cfg.hidden_size * width) as u64;
            let sparse: Vec<usize> = (0..cfg.num_layers)
                .filter(|&i| m.sparse_layers[i])
                .collect();
            let per_sparse =
                m.top_k as u64 * gated(m.expert_width) + m.shared_expert_width.map_or(0, gated);
            ExpertsSummary {
                count: m.num_experts,
                per_token: m.top_k,
                expert_width: m.expert_width,
                norm_topk_prob: m.norm_topk_prob,
                shared_expert_width: m.shared_expert_width,
                params_ffn_active: sparse.len() as u64 * per_sparse
                    + (cfg.num_layers - sparse.len()) as u64 * gated(cfg.ffn_width),
                sparse_layers: sparse,
            }
        });
        CheckpointSummary {
            architecture: cfg.architecture.hf_name().to_string(),
            num_layers: cfg.num_layers,
            hidden_size: cfg.hidden_size,
            ffn_width: cfg.ffn_width,
            activation: cfg.activation.name().to_string(),
            activation_threshold: match cfg.activation {
                crate::input::config::Activation::FatRelu { threshold } => Some(threshold),
                _ => None,
            },
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
            experts,
        }
    }
}
