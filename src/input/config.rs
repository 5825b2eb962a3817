//! `config.json` of a Hugging Face checkpoint: the file as it is on disk
//! ([`RawConfig`]), validated once into the model description the rest of
//! flashpack trusts ([`ModelConfig`]).
//!
//! Semantics follow transformers' `configuration_opt.py`, `configuration_llama.py`,
//! `configuration_mistral.py` and `configuration_qwen2.py` (and the classes added
//! since: Qwen3, Phi-3, Gemma-2/3, and the mixture-of-experts Mixtral, Qwen2-MoE and
//! Qwen3-MoE), including their defaults for keys a file leaves out. Keys we do not
//! use are ignored.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// Sanity caps on sizes read from `config.json`. A config is untrusted input: these
/// keep a hostile or corrupted file from making us plan absurd allocations. Each is
/// far above any released model (Llama 3.1 405B: 126 layers, hidden 16384, FFN
/// 53248, vocab 128256; Gemma: vocab 256000).
pub const MAX_LAYERS: usize = 1024;
pub const MAX_HIDDEN_SIZE: usize = 1 << 16;
pub const MAX_FFN_WIDTH: usize = 1 << 20;
pub const MAX_VOCAB_SIZE: usize = 1 << 22;
pub const MAX_HEADS: usize = 1024;
pub const MAX_HEAD_DIM: usize = 1024;
/// Context lengths of released models reach 10M tokens; a learned position table or
/// a RoPE table beyond this would not fit any device this tool is for.
pub const MAX_POSITIONS: usize = 1 << 24;

/// `config.json` exactly as transformers writes it, for every family we read.
/// Absent keys are `None` and take transformers' defaults during validation.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawConfig {
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
    pub model_type: Option<String>,
    /// transformers >= 5 writes `dtype`; older versions `torch_dtype`. Informational
    /// only: tensor dtypes are read from the weight files.
    pub dtype: Option<String>,
    pub torch_dtype: Option<String>,

    pub vocab_size: Option<usize>,
    pub hidden_size: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub num_attention_heads: Option<usize>,
    pub max_position_embeddings: Option<usize>,
    pub tie_word_embeddings: Option<bool>,
    pub bos_token_id: Option<TokenIds>,
    pub eos_token_id: Option<TokenIds>,
    pub pad_token_id: Option<TokenIds>,

    // OPT
    pub ffn_dim: Option<usize>,
    pub do_layer_norm_before: Option<bool>,
    #[serde(rename = "_remove_final_layer_norm")]
    pub remove_final_layer_norm: Option<bool>,
    pub word_embed_proj_dim: Option<usize>,
    pub activation_function: Option<String>,
    pub enable_bias: Option<bool>,
    pub layer_norm_elementwise_affine: Option<bool>,

    // Llama family
    pub intermediate_size: Option<usize>,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub hidden_act: Option<String>,
    /// ProSparse (`SparseLlamaForCausalLM`): the threshold of `hidden_act`
    /// `"fatrelu"` (its checkpoints write 0.01).
    pub hidden_act_param: Option<f64>,
    pub rms_norm_eps: Option<f64>,
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<RawRopeScaling>,
    /// transformers >= 5 folds `rope_theta` and `rope_scaling` into this one object.
    pub rope_parameters: Option<RawRopeScaling>,
    pub attention_bias: Option<bool>,
    pub mlp_bias: Option<bool>,
    pub sliding_window: Option<usize>,
    pub use_sliding_window: Option<bool>,
    pub max_window_layers: Option<usize>,
    pub layer_types: Option<Vec<String>>,
    pub pretraining_tp: Option<usize>,

    // Phi-3 (transformers 4 wrote these at the top level).
    pub partial_rotary_factor: Option<f64>,
    pub original_max_position_embeddings: Option<usize>,

    // Gemma-2 and Gemma-3. The soft-caps tell null (none) from absent (the default).
    pub hidden_activation: Option<String>,
    pub query_pre_attn_scalar: Option<f64>,
    #[serde(default, deserialize_with = "present")]
    pub attn_logit_softcapping: Option<Option<f64>>,
    #[serde(default, deserialize_with = "present")]
    pub final_logit_softcapping: Option<Option<f64>>,
    pub rope_local_base_freq: Option<f64>,
    pub sliding_window_pattern: Option<usize>,
    pub use_bidirectional_attention: Option<bool>,

    // Mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE). transformers 5 writes
    // Qwen3-MoE's expert count as `num_local_experts` (its attribute map), the
    // Hub's Qwen configs as `num_experts`: both are read.
    pub num_experts: Option<usize>,
    pub num_local_experts: Option<usize>,
    pub num_experts_per_tok: Option<usize>,
    pub moe_intermediate_size: Option<usize>,
    pub shared_expert_intermediate_size: Option<usize>,
    pub norm_topk_prob: Option<bool>,
    pub decoder_sparse_step: Option<usize>,
    pub mlp_only_layers: Option<Vec<usize>>,
    /// Qwen2-MoE's switch for the q, k and v biases (default true).
    pub qkv_bias: Option<bool>,
}

/// A key that is present: `Some(None)` when its value is null.
fn present<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<Option<f64>>, D::Error> {
    Option::<f64>::deserialize(d).map(Some)
}

/// A token id field: transformers allows an int or a list of ints (EOS especially).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawRopeScaling {
    pub rope_type: Option<String>,
    /// The key older configs used for `rope_type`.
    #[serde(rename = "type")]
    pub legacy_type: Option<String>,
    pub rope_theta: Option<f64>,
    pub factor: Option<f64>,
    pub low_freq_factor: Option<f64>,
    pub high_freq_factor: Option<f64>,
    pub original_max_position_embeddings: Option<usize>,
    /// Phi-3's `longrope` (`su`): per-frequency factors below and above
    /// `original_max_position_embeddings`, and the cos/sin scale.
    pub short_factor: Option<Vec<f64>>,
    pub long_factor: Option<Vec<f64>>,
    pub attention_factor: Option<f64>,
    pub partial_rotary_factor: Option<f64>,
    /// Gemma-3 (transformers 5): one RoPE object per layer type.
    pub full_attention: Option<Box<RawRopeScaling>>,
    pub sliding_attention: Option<Box<RawRopeScaling>>,
}

/// The model families flashpack runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Opt,
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Phi3,
    Gemma2,
    Gemma3,
    Mixtral,
    Qwen2Moe,
    Qwen3Moe,
    /// ProSparse's Llama 2 (`SparseLlamaForCausalLM`, `model_type`
    /// `"sparsellama"`, remote code): Llama with a FATReLU gate.
    SparseLlama,
    /// Bamboo and TurboSparse-Mistral (`BambooForCausalLM`, `model_type`
    /// `"bamboo"`, remote code): Mistral with a dReLU FFN.
    Bamboo,
}

impl Architecture {
    /// The `architectures[0]` name in `config.json`.
    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::Opt => "OPTForCausalLM",
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Qwen3 => "Qwen3ForCausalLM",
            Architecture::Phi3 => "Phi3ForCausalLM",
            Architecture::Gemma2 => "Gemma2ForCausalLM",
            Architecture::Gemma3 => "Gemma3ForCausalLM",
            Architecture::Mixtral => "MixtralForCausalLM",
            Architecture::Qwen2Moe => "Qwen2MoeForCausalLM",
            Architecture::Qwen3Moe => "Qwen3MoeForCausalLM",
            Architecture::SparseLlama => "SparseLlamaForCausalLM",
            Architecture::Bamboo => "BambooForCausalLM",
        }
    }

    /// Llama, Mistral, Qwen2 and the families added to them (Qwen3, Phi-3,
    /// Gemma-2/3) share one layer structure: RMSNorm, RoPE, GQA, gated FFN.
    pub fn is_llama_family(self) -> bool {
        !matches!(self, Architecture::Opt)
    }

    /// Mixtral, Qwen2-MoE and Qwen3-MoE: some or all FFNs are a router and
    /// experts (see [`MoeOptions`]).
    pub fn is_moe(self) -> bool {
        matches!(
            self,
            Architecture::Mixtral | Architecture::Qwen2Moe | Architecture::Qwen3Moe
        )
    }
}

const SUPPORTED_ARCHITECTURES: &str = "OPTForCausalLM, LlamaForCausalLM, MistralForCausalLM, \
     Qwen2ForCausalLM, Qwen3ForCausalLM, Phi3ForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM, \
     MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM, \
     SparseLlamaForCausalLM (ProSparse), BambooForCausalLM (Bamboo, TurboSparse-Mistral)";

/// The FFN's activation function. For a gated FFN a neuron's value is
/// `act(gate . x) * (up . x)`, except dReLU's `relu(gate . x) * relu(up . x)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    Relu,
    Silu,
    /// Gemma's GeGLU gate: `gelu_pytorch_tanh`, GELU with the tanh approximation.
    GeluTanh,
    /// `gelu`: exact GELU, `x * (1 + erf(x / sqrt 2)) / 2`.
    Gelu,
    /// ProSparse's FATReLU (`"fatrelu"`, threshold `hidden_act_param`): `x`
    /// where `x >= threshold`, else 0 (its modeling code keeps `torch.ge(x, t)`).
    FatRelu {
        threshold: f32,
    },
    /// dReLU (Bamboo, TurboSparse): ReLU on both the gate and the up
    /// projection, `relu(gate . x) * relu(up . x)`.
    DRelu,
}

/// The `hidden_act` values a Llama-family config may name (what transformers'
/// `ACT2FN` maps them to), for error messages.
const SUPPORTED_ACTIVATIONS_WHY: &str = "supported: relu, silu (or swish), gelu, \
     gelu_pytorch_tanh; fatrelu with hidden_act_param for SparseLlamaForCausalLM";

/// Every activation `config.json` may name, for `--help` and errors.
pub const SUPPORTED_ACTIVATIONS: &str =
    "relu, silu (or swish), gelu, gelu_pytorch_tanh; fatrelu with hidden_act_param for \
     SparseLlamaForCausalLM; relu (dReLU) for BambooForCausalLM";

impl Activation {
    pub fn name(self) -> &'static str {
        match self {
            Activation::Relu => "relu",
            Activation::Silu => "silu",
            Activation::GeluTanh => "gelu_pytorch_tanh",
            Activation::Gelu => "gelu",
            Activation::FatRelu { .. } => "fatrelu",
            Activation::DRelu => "drelu",
        }
    }

    /// Whether a neuron's output is exactly zero only by chance, so that
    /// sparsity comes from a magnitude threshold (SiLU, GELU), not from the
    /// activation itself (the ReLU family).
    pub fn is_smooth(self) -> bool {
        !self.exact_zeros()
    }

    /// The ReLU family (ReLU, FATReLU, dReLU): a neuron that does not fire
    /// outputs exactly 0, so skipping it changes nothing, and which neurons
    /// fire is known exactly (calibration records firing masks, the oracle
    /// is exact, predictors are trained on the masks).
    pub fn exact_zeros(self) -> bool {
        matches!(
            self,
            Activation::Relu | Activation::FatRelu { .. } | Activation::DRelu
        )
    }
}

/// RoPE frequency scaling, as transformers' `ROPE_INIT_FUNCTIONS` computes it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Positions divided by `factor` (all frequencies divided by it).
    Linear { factor: f64 },
    /// Llama 3.1's wavelength-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// Phi-3's `longrope` RoPE scaling (transformers' `_compute_longrope_parameters`).
#[derive(Debug, Clone, PartialEq)]
pub struct LongRope {
    /// One factor per rotary frequency, used while a forward pass's positions
    /// stay within `original_max_position_embeddings`.
    pub short_factor: Vec<f64>,
    /// Used once they go beyond it.
    pub long_factor: Vec<f64>,
    pub original_max_position_embeddings: usize,
    /// Multiplies cos and sin.
    pub attention_factor: f64,
}

/// The RoPE of a group of layers.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeSpec {
    pub theta: f64,
    pub scaling: Option<RopeScaling>,
    pub longrope: Option<LongRope>,
    /// How many leading dimensions of each head rotate (`head_dim` unless a
    /// `partial_rotary_factor` is configured); even.
    pub rotary_dim: usize,
}

/// What the architectures after Qwen2 add to the Llama family's layer (all
/// off for OPT, Llama, Mistral and Qwen2, which stay exactly as they were).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ArchOptions {
    /// Per-head RMSNorm of q and k before RoPE (Qwen3, Gemma-3).
    pub qk_norm: bool,
    /// Gemma's RMSNorm multiplies by `1 + weight` (computed in f32).
    pub norm_plus_one: bool,
    /// Gemma-2/3: the attention output is normed (`post_attention_layernorm`)
    /// before the residual add; the FFN has `pre_feedforward_layernorm` and
    /// `post_feedforward_layernorm`.
    pub sandwich_norms: bool,
    /// Gemma: token embeddings times `sqrt(hidden_size)`, rounded to f32 as
    /// transformers' f32 buffer is (our runtime computes in f32).
    pub embed_scale: Option<f32>,
    /// Attention score scale when it is not `head_dim^-0.5` (Gemma:
    /// `query_pre_attn_scalar^-0.5`).
    pub attn_scale: Option<f64>,
    /// Gemma-2: scores become `cap * tanh(score / cap)` before the mask.
    pub attn_softcap: Option<f64>,
    /// Gemma-2: logits become `cap * tanh(logit / cap)`.
    pub final_softcap: Option<f64>,
    /// Per layer, `Some(w)` where the layer attends to the last `w` positions
    /// only (a true sliding window: the KV cache keeps `w - 1` positions). Empty
    /// for the families whose window caps the context instead.
    pub layer_windows: Vec<Option<usize>>,
    /// The RoPE of every layer, unless `local_rope` applies.
    pub rope: Option<RopeSpec>,
    /// Gemma-3: the RoPE of the sliding-window layers.
    pub local_rope: Option<RopeSpec>,
    /// Phi-3: `qkv_proj` and `gate_up_proj` are stored fused and split at load.
    pub fused_projections: bool,
}

/// A mixture-of-experts FFN (transformers' `*SparseMoeBlock`): a router
/// (`[num_experts, hidden]`, no bias) scores the experts of each token, the
/// softmax of those scores (in f32) picks the `top_k` most probable, whose
/// probabilities (renormalised to sum to 1 with `norm_topk_prob`) weight the
/// chosen experts' gated FFN outputs; Qwen2-MoE adds a shared expert, always
/// computed, times `sigmoid(shared_expert_gate . x)`.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeOptions {
    pub num_experts: usize,
    /// Experts chosen per token (`num_experts_per_tok`), at most `num_experts`.
    pub top_k: usize,
    /// Neurons of each expert (`moe_intermediate_size`; Mixtral's `intermediate_size`).
    pub expert_width: usize,
    /// Whether the chosen probabilities are renormalised (Mixtral: always).
    pub norm_topk_prob: bool,
    /// Qwen2-MoE: the shared expert's width (`shared_expert_intermediate_size`).
    pub shared_expert_width: Option<usize>,
    /// Per layer: whether its FFN is the mixture (otherwise a dense gated FFN
    /// of `ffn_width` neurons, Qwen's `mlp_only_layers` and `decoder_sparse_step`).
    pub sparse_layers: Vec<bool>,
}

/// Caps on the expert counts read from a config (Qwen3-235B: 128 experts, 8 per
/// token; DeepSeek-V3: 256).
pub const MAX_EXPERTS: usize = 1 << 12;

/// Options only OPT has.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OptOptions {
    /// Pre-LN (true, OPT-350m excepted) or post-LN.
    pub do_layer_norm_before: bool,
    /// Whether `model.decoder.final_layer_norm` exists (pre-LN and not removed).
    pub has_final_layer_norm: bool,
    /// Width of the token embeddings; differs from the hidden size in OPT-350m,
    /// which then has `project_in` / `project_out`.
    pub word_embed_proj_dim: usize,
    /// Whether the layer norms have weight and bias.
    pub layer_norm_affine: bool,
}

/// OPT's learned positions are stored with this many extra leading rows
/// (`OPTLearnedPositionalEmbedding.offset` in transformers).
pub const OPT_POSITION_OFFSET: usize = 2;

/// A validated model description: everything the reader and the runtime need,
/// with transformers' defaults filled in. Build it with [`ModelConfig::from_raw`].
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// FFN width: OPT's `ffn_dim`, Llama's `intermediate_size`.
    pub ffn_width: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    /// The longest context the runtime may use. Equals `max_position_embeddings`
    /// unless a sliding window is configured: within the window, sliding-window
    /// attention equals full attention, so capping the context keeps us exact.
    pub max_context: usize,
    pub activation: Activation,
    /// LayerNorm (OPT) or RMSNorm (Llama family) epsilon.
    pub norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub tie_word_embeddings: bool,
    /// Biases on q, k and v projections (Qwen2 always; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the attention output projection.
    pub o_bias: bool,
    /// Biases on the FFN projections.
    pub ffn_bias: bool,
    pub opt: Option<OptOptions>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// The dtype config.json declares (informational; tensors carry their own).
    pub declared_dtype: Option<String>,
    /// Qwen3, Phi-3, Gemma-2/3 options (default for the other families).
    pub ext: ArchOptions,
    /// The mixture-of-experts architectures' FFNs (`None` for dense models).
    pub moe: Option<MoeOptions>,
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn load(path: &Path) -> Result<ModelConfig> {
        let raw: RawConfig = crate::input::read_json(path, "config.json")?;
        ModelConfig::from_raw(&raw, path)
    }

    /// Validates a parsed config. `path` is only used in error messages.
    pub fn from_raw(raw: &RawConfig, path: &Path) -> Result<ModelConfig> {
        let v = Validator { path };
        let arch_name = match raw.architectures.as_deref() {
            Some([name]) => name.clone(),
            Some([]) | None => {
                return Err(
                    v.invalid("`architectures` is missing; expected one of the supported names")
                )
            }
            Some(many) => {
                return Err(v.invalid(&format!("`architectures` lists several: {many:?}")))
            }
        };
        let architecture = match arch_name.as_str() {
            "OPTForCausalLM" => Architecture::Opt,
            "LlamaForCausalLM" => Architecture::Llama,
            "MistralForCausalLM" => Architecture::Mistral,
            "Qwen2ForCausalLM" => Architecture::Qwen2,
            "Qwen3ForCausalLM" => Architecture::Qwen3,
            "Phi3ForCausalLM" => Architecture::Phi3,
            "Gemma2ForCausalLM" => Architecture::Gemma2,
            "Gemma3ForCausalLM" => Architecture::Gemma3,
            "MixtralForCausalLM" => Architecture::Mixtral,
            "Qwen2MoeForCausalLM" => Architecture::Qwen2Moe,
            "Qwen3MoeForCausalLM" => Architecture::Qwen3Moe,
            "SparseLlamaForCausalLM" => Architecture::SparseLlama,
            "BambooForCausalLM" => Architecture::Bamboo,
            _ => {
                return Err(Error::UnsupportedArchitecture {
                    path: path.to_path_buf(),
                    name: arch_name,
                    supported: SUPPORTED_ARCHITECTURES,
                })
            }
        };
        match architecture {
            Architecture::Opt => v.opt(raw),
            Architecture::Llama | Architecture::Mistral | Architecture::Qwen2 => {
                v.llama_family(raw, architecture)
            }
            Architecture::Mixtral | Architecture::Qwen2Moe | Architecture::Qwen3Moe => {
                v.moe_family(raw, architecture)
            }
            Architecture::SparseLlama | Architecture::Bamboo => {
                v.sparse_checkpoint(raw, architecture)
            }
            _ => v.newer_family(raw, architecture),
        }
    }

    /// Width of the key and value projections (grouped-query attention).
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// The width of the token embedding rows (differs from hidden size in OPT-350m).
    pub fn embed_dim(&self) -> usize {
        self.opt.map_or(self.hidden_size, |o| o.word_embed_proj_dim)
    }
}

struct Validator<'a> {
    path: &'a Path,
}

impl Validator<'_> {
    fn invalid(&self, message: &str) -> Error {
        Error::InvalidConfig {
            path: self.path.to_path_buf(),
            message: message.to_string(),
        }
    }

    fn unsupported(&self, option: &'static str, value: String, why: &'static str) -> Error {
        Error::UnsupportedOption {
            path: self.path.to_path_buf(),
            option,
            value,
            why,
        }
    }

    /// A required size: present, non-zero and at most `cap`.
    fn size(&self, value: Option<usize>, key: &str, cap: usize) -> Result<usize> {
        match value {
            None => Err(self.invalid(&format!("`{key}` is missing"))),
            Some(0) => Err(self.invalid(&format!("`{key}` is 0"))),
            Some(n) if n > cap => {
                Err(self.invalid(&format!("`{key}` = {n} exceeds the cap {cap}")))
            }
            Some(n) => Ok(n),
        }
    }

    fn single_id(&self, ids: &Option<TokenIds>, key: &str) -> Result<Option<u32>> {
        match ids {
            None => Ok(None),
            Some(TokenIds::One(id)) => Ok(Some(*id)),
            Some(TokenIds::Many(list)) if list.len() == 1 => Ok(Some(list[0])),
            Some(TokenIds::Many(list)) if list.is_empty() => Ok(None),
            Some(TokenIds::Many(_)) => Err(self.invalid(&format!("`{key}` must be a single id"))),
        }
    }

    fn common_ids(
        &self,
        raw: &RawConfig,
        vocab: usize,
    ) -> Result<(Option<u32>, Vec<u32>, Option<u32>)> {
        let bos = self.single_id(&raw.bos_token_id, "bos_token_id")?;
        let eos = raw
            .eos_token_id
            .as_ref()
            .map(TokenIds::to_vec)
            .unwrap_or_default();
        let pad = self.single_id(&raw.pad_token_id, "pad_token_id")?;
        for (key, id) in bos
            .iter()
            .map(|id| ("bos_token_id", id))
            .chain(eos.iter().map(|id| ("eos_token_id", id)))
            .chain(pad.iter().map(|id| ("pad_token_id", id)))
        {
            if *id as usize >= vocab {
                return Err(self.invalid(&format!(
                    "`{key}` {id} is outside the vocabulary of {vocab}"
                )));
            }
        }
        Ok((bos, eos, pad))
    }

    fn positions(&self, raw: &RawConfig) -> Result<usize> {
        self.size(
            raw.max_position_embeddings,
            "max_position_embeddings",
            MAX_POSITIONS,
        )
    }

    fn opt(&self, raw: &RawConfig) -> Result<ModelConfig> {
        let vocab_size = self.size(raw.vocab_size, "vocab_size", MAX_VOCAB_SIZE)?;
        let hidden_size = self.size(raw.hidden_size, "hidden_size", MAX_HIDDEN_SIZE)?;
        let ffn_width = self.size(raw.ffn_dim, "ffn_dim", MAX_FFN_WIDTH)?;
        let num_layers = self.size(raw.num_hidden_layers, "num_hidden_layers", MAX_LAYERS)?;
        let num_heads = self.size(raw.num_attention_heads, "num_attention_heads", MAX_HEADS)?;
        let max_position_embeddings = self.positions(raw)?;
        if hidden_size % num_heads != 0 {
            return Err(self.invalid(&format!(
                "hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads}"
            )));
        }
        let head_dim = hidden_size / num_heads;
        if head_dim > MAX_HEAD_DIM {
            return Err(self.invalid(&format!(
                "head dimension {head_dim} exceeds the cap {MAX_HEAD_DIM}"
            )));
        }
        let activation = match raw.activation_function.as_deref().unwrap_or("relu") {
            "relu" => Activation::Relu,
            other => {
                return Err(self.unsupported(
                    "activation_function",
                    format!("{other:?}"),
                    "OPT is supported with relu, the activation of every released OPT",
                ))
            }
        };
        let word_embed_proj_dim = match raw.word_embed_proj_dim {
            None => hidden_size,
            some => self.size(some, "word_embed_proj_dim", MAX_HIDDEN_SIZE)?,
        };
        let do_layer_norm_before = raw.do_layer_norm_before.unwrap_or(true);
        let remove_final = raw.remove_final_layer_norm.unwrap_or(false);
        let enable_bias = raw.enable_bias.unwrap_or(true);
        let (bos_token_id, eos_token_ids, pad_token_id) = self.common_ids(raw, vocab_size)?;
        Ok(ModelConfig {
            architecture: Architecture::Opt,
            vocab_size,
            hidden_size,
            ffn_width,
            num_layers,
            num_heads,
            num_kv_heads: num_heads,
            head_dim,
            max_position_embeddings,
            max_context: max_position_embeddings,
            activation,
            // OPT builds its LayerNorms with PyTorch's default epsilon.
            norm_eps: 1e-5,
            rope_theta: 0.0,
            rope_scaling: None,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(true),
            qkv_bias: enable_bias,
            o_bias: enable_bias,
            ffn_bias: enable_bias,
            opt: Some(OptOptions {
                do_layer_norm_before,
                has_final_layer_norm: do_layer_norm_before && !remove_final,
                word_embed_proj_dim,
                layer_norm_affine: raw.layer_norm_elementwise_affine.unwrap_or(true),
            }),
            bos_token_id,
            eos_token_ids,
            pad_token_id,
            declared_dtype: raw.dtype.clone().or_else(|| raw.torch_dtype.clone()),
            ext: ArchOptions::default(),
            moe: None,
        })
    }

    fn llama_family(&self, raw: &RawConfig, architecture: Architecture) -> Result<ModelConfig> {
        let vocab_size = self.size(raw.vocab_size, "vocab_size", MAX_VOCAB_SIZE)?;
        let hidden_size = self.size(raw.hidden_size, "hidden_size", MAX_HIDDEN_SIZE)?;
        let ffn_width = self.size(raw.intermediate_size, "intermediate_size", MAX_FFN_WIDTH)?;
        let num_layers = self.size(raw.num_hidden_layers, "num_hidden_layers", MAX_LAYERS)?;
        let num_heads = self.size(raw.num_attention_heads, "num_attention_heads", MAX_HEADS)?;
        let num_kv_heads = match raw.num_key_value_heads {
            None => num_heads,
            some => self.size(some, "num_key_value_heads", MAX_HEADS)?,
        };
        if num_heads % num_kv_heads != 0 {
            return Err(self.invalid(&format!(
                "num_attention_heads {num_heads} is not divisible by num_key_value_heads {num_kv_heads}"
            )));
        }
        let head_dim = match raw.head_dim {
            Some(d) => self.size(Some(d), "head_dim", MAX_HEAD_DIM)?,
            None => {
                if hidden_size % num_heads != 0 {
                    return Err(self.invalid(&format!(
                        "hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads}"
                    )));
                }
                hidden_size / num_heads
            }
        };
        if head_dim > MAX_HEAD_DIM {
            return Err(self.invalid(&format!(
                "head dimension {head_dim} exceeds the cap {MAX_HEAD_DIM}"
            )));
        }
        if head_dim % 2 != 0 {
            return Err(self.invalid(&format!(
                "head dimension {head_dim} is odd; RoPE needs pairs"
            )));
        }
        let max_position_embeddings = self.positions(raw)?;

        let activation = self.activation(raw.hidden_act.as_deref().unwrap_or("silu"))?;
        if let Some(tp) = raw.pretraining_tp {
            if tp > 1 {
                // transformers then splits every projection into slices summed in a
                // different order; the weights are the same, only float rounding differs.
                eprintln!(
                    "note: pretraining_tp = {tp} is ignored (it only changes summation order)"
                );
            }
        }

        let norm_eps = raw.rms_norm_eps.unwrap_or(1e-6);
        if !(norm_eps.is_finite() && norm_eps >= 0.0) {
            return Err(self.invalid(&format!(
                "rms_norm_eps {norm_eps} is not a finite non-negative number"
            )));
        }
        let (rope_theta, rope_scaling) = self.rope(raw)?;
        let max_context =
            self.sliding_window_context(raw, architecture, max_position_embeddings)?;

        let attention_bias = raw.attention_bias.unwrap_or(false);
        // Qwen2 hard-codes biases on q, k, v (and none on o).
        let qkv_bias = architecture == Architecture::Qwen2 || attention_bias;
        let o_bias = architecture != Architecture::Qwen2 && attention_bias;
        let (bos_token_id, eos_token_ids, pad_token_id) = self.common_ids(raw, vocab_size)?;
        Ok(ModelConfig {
            architecture,
            vocab_size,
            hidden_size,
            ffn_width,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            max_position_embeddings,
            max_context,
            activation,
            norm_eps,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            o_bias,
            ffn_bias: raw.mlp_bias.unwrap_or(false),
            opt: None,
            bos_token_id,
            eos_token_ids,
            pad_token_id,
            declared_dtype: raw.dtype.clone().or_else(|| raw.torch_dtype.clone()),
            ext: ArchOptions::default(),
            moe: None,
        })
    }

    /// Mixtral, Qwen2-MoE and Qwen3-MoE: the attention of the dense class each
    /// extends (Mistral, Qwen2 with `qkv_bias`, Qwen3 with q/k norms), each
    /// class's defaults, and the experts ([`MoeOptions`]).
    fn moe_family(&self, raw: &RawConfig, architecture: Architecture) -> Result<ModelConfig> {
        use Architecture::{Mixtral, Qwen2Moe, Qwen3Moe};
        let mut base = raw.clone();
        // transformers' class defaults for keys a file leaves out.
        let (positions, eps, theta, width) = match architecture {
            Mixtral => (4096 * 32, 1e-5, 1_000_000.0, 14336),
            Qwen2Moe => (32_768, 1e-6, 10_000.0, 5632),
            _ => (32_768, 1e-6, 10_000.0, 6144),
        };
        base.max_position_embeddings = raw.max_position_embeddings.or(Some(positions));
        base.rms_norm_eps = raw.rms_norm_eps.or(Some(eps));
        base.intermediate_size = raw.intermediate_size.or(Some(width));
        if raw.rope_parameters.is_none() && raw.rope_scaling.is_none() {
            base.rope_theta = raw.rope_theta.or(Some(theta));
        }
        // Qwen's sliding windows (per layer from max_window_layers, or on every
        // layer) are not implemented for the MoE classes; released checkpoints
        // (Qwen1.5-MoE, Qwen3-30B-A3B) do not use them.
        if architecture != Mixtral && raw.use_sliding_window == Some(true) {
            return Err(self.unsupported(
                "use_sliding_window",
                "true".into(),
                "Qwen2-MoE and Qwen3-MoE are supported with full attention",
            ));
        }
        base.sliding_window = if architecture == Mixtral {
            raw.sliding_window
        } else {
            None
        };
        let attention = match architecture {
            Mixtral => Architecture::Mistral,
            _ => Architecture::Llama,
        };
        let mut cfg = self.llama_family(&base, attention)?;
        cfg.architecture = architecture;
        match architecture {
            Qwen2Moe => {
                cfg.qkv_bias = raw.qkv_bias.unwrap_or(true);
                cfg.o_bias = false;
            }
            Qwen3Moe => {
                let bias = raw.attention_bias.unwrap_or(false);
                cfg.qkv_bias = bias;
                cfg.o_bias = bias;
                cfg.ext.qk_norm = true;
            }
            _ => {}
        }
        // Experts have no biases in any of the three classes.
        cfg.ffn_bias = false;

        let experts = match architecture {
            Mixtral => raw.num_local_experts.or(raw.num_experts).or(Some(8)),
            Qwen2Moe => raw.num_experts.or(raw.num_local_experts).or(Some(60)),
            _ => raw.num_experts.or(raw.num_local_experts).or(Some(128)),
        };
        let num_experts = self.size(experts, "num_experts", MAX_EXPERTS)?;
        let top_k = self.size(
            raw.num_experts_per_tok.or(Some(match architecture {
                Mixtral => 2,
                Qwen2Moe => 4,
                _ => 8,
            })),
            "num_experts_per_tok",
            num_experts,
        )?;
        let expert_width = match architecture {
            Mixtral => cfg.ffn_width,
            Qwen2Moe => self.size(
                raw.moe_intermediate_size.or(Some(1408)),
                "moe_intermediate_size",
                MAX_FFN_WIDTH,
            )?,
            _ => self.size(
                raw.moe_intermediate_size.or(Some(768)),
                "moe_intermediate_size",
                MAX_FFN_WIDTH,
            )?,
        };
        let shared_expert_width = match architecture {
            Qwen2Moe => Some(self.size(
                raw.shared_expert_intermediate_size.or(Some(5632)),
                "shared_expert_intermediate_size",
                MAX_FFN_WIDTH,
            )?),
            _ => None,
        };
        let layers = cfg.num_layers;
        let sparse_layers = match architecture {
            Mixtral => vec![true; layers],
            _ => {
                let step = raw.decoder_sparse_step.unwrap_or(1);
                if step == 0 {
                    return Err(self.invalid("`decoder_sparse_step` is 0"));
                }
                // transformers tests membership only: indices past the last
                // layer name no layer.
                let dense = raw.mlp_only_layers.clone().unwrap_or_default();
                (0..layers)
                    .map(|i| !dense.contains(&i) && (i + 1) % step == 0)
                    .collect()
            }
        };
        cfg.moe = Some(MoeOptions {
            num_experts,
            top_k,
            expert_width,
            norm_topk_prob: architecture == Mixtral || raw.norm_topk_prob.unwrap_or(false),
            shared_expert_width,
            sparse_layers,
        });
        Ok(cfg)
    }

    /// Qwen3, Phi-3, Gemma-2 and Gemma-3: the Llama family's validation with
    /// each class's defaults, then what each adds (see [`ArchOptions`]).
    fn newer_family(&self, raw: &RawConfig, architecture: Architecture) -> Result<ModelConfig> {
        use Architecture::{Gemma2, Gemma3, Phi3, Qwen3};
        let gemma = matches!(architecture, Gemma2 | Gemma3);
        // transformers' class defaults for keys a file leaves out.
        let mut base = raw.clone();
        let (head_dim, positions, eps, tie) = match architecture {
            Qwen3 => (Some(128), 32_768, 1e-6, false),
            Phi3 => (None, 4096, 1e-5, false),
            Gemma2 => (Some(256), 8192, 1e-6, true),
            _ => (Some(256), 131_072, 1e-6, true),
        };
        base.head_dim = raw.head_dim.or(head_dim);
        base.max_position_embeddings = raw.max_position_embeddings.or(Some(positions));
        base.rms_norm_eps = raw.rms_norm_eps.or(Some(eps));
        base.tie_word_embeddings = raw.tie_word_embeddings.or(Some(tie));
        // What the Llama validation must not see: read below, per class.
        base.hidden_act = Some("silu".into());
        base.rope_parameters = None;
        base.rope_scaling = None;
        base.rope_theta = None;
        base.layer_types = None;
        base.sliding_window = None;
        let mut cfg = self.llama_family(&base, Architecture::Llama)?;
        cfg.architecture = architecture;
        cfg.max_context = cfg.max_position_embeddings;

        let act_name = if gemma {
            raw.hidden_activation
                .as_deref()
                .or(raw.hidden_act.as_deref())
                .unwrap_or("gelu_pytorch_tanh")
        } else {
            raw.hidden_act.as_deref().unwrap_or("silu")
        };
        cfg.activation = match act_name {
            "gelu_pytorch_tanh" if gemma => Activation::GeluTanh,
            other if !gemma => self.activation(other)?,
            other => {
                return Err(self.unsupported(
                    "hidden_activation",
                    format!("{other:?}"),
                    "Gemma is supported with gelu_pytorch_tanh",
                ))
            }
        };
        // Phi-3 has no biases; Qwen3 and Gemma put `attention_bias` on q, k, v and o.
        let bias = architecture != Phi3 && raw.attention_bias.unwrap_or(false);
        cfg.qkv_bias = bias;
        cfg.o_bias = bias;
        cfg.ffn_bias = false;

        let mut ext = ArchOptions {
            qk_norm: matches!(architecture, Qwen3 | Gemma3),
            norm_plus_one: gemma,
            sandwich_norms: gemma,
            fused_projections: architecture == Phi3,
            ..ArchOptions::default()
        };
        if gemma {
            if raw.use_bidirectional_attention == Some(true) {
                return Err(self.unsupported(
                    "use_bidirectional_attention",
                    "true".into(),
                    "only causal attention is supported",
                ));
            }
            ext.embed_scale = Some((cfg.hidden_size as f64).sqrt() as f32);
            let scalar = raw.query_pre_attn_scalar.unwrap_or(256.0);
            if !(scalar.is_finite() && scalar > 0.0) {
                return Err(self.invalid(&format!(
                    "query_pre_attn_scalar {scalar} must be a finite positive number"
                )));
            }
            ext.attn_scale = Some(scalar.powf(-0.5));
            if architecture == Gemma2 {
                ext.attn_softcap = self.softcap(raw.attn_logit_softcapping, 50.0)?;
                ext.final_softcap = self.softcap(raw.final_logit_softcapping, 30.0)?;
            } else {
                ext.attn_softcap = self.softcap(raw.attn_logit_softcapping, f64::NAN)?;
                ext.final_softcap = self.softcap(raw.final_logit_softcapping, f64::NAN)?;
            }
        }

        // Which layers slide, and over how many positions.
        let layers = cfg.num_layers;
        let window = match architecture {
            Qwen3 if raw.use_sliding_window == Some(true) => raw.sliding_window,
            Qwen3 => None,
            Phi3 => raw.sliding_window,
            _ => raw.sliding_window.or(Some(4096)),
        };
        if window == Some(0) {
            return Err(self.invalid("`sliding_window` is 0"));
        }
        let sliding: Vec<bool> = match &raw.layer_types {
            Some(types) => {
                if types.len() != layers {
                    return Err(self.invalid(&format!(
                        "`layer_types` has {} entries for {layers} layers",
                        types.len()
                    )));
                }
                types
                    .iter()
                    .map(|t| match t.as_str() {
                        "full_attention" => Ok(false),
                        "sliding_attention" => Ok(true),
                        other => Err(self.unsupported(
                            "layer_types",
                            format!("{other:?}"),
                            "layer types are full_attention and sliding_attention",
                        )),
                    })
                    .collect::<Result<_>>()?
            }
            None => (0..layers)
                .map(|i| match architecture {
                    Qwen3 => i >= raw.max_window_layers.unwrap_or(28),
                    Phi3 => true,
                    Gemma2 => (i + 1) % 2 != 0,
                    _ => (i + 1) % raw.sliding_window_pattern.unwrap_or(6).max(1) != 0,
                })
                .collect(),
        };
        ext.layer_windows = sliding
            .iter()
            .map(|&s| if s { window } else { None })
            .collect();

        // RoPE: one object, or (Gemma-3) one per layer type.
        let params = raw.rope_parameters.as_ref().or(raw.rope_scaling.as_ref());
        let (global, local) = if architecture == Gemma3 {
            let nested =
                params.filter(|p| p.full_attention.is_some() || p.sliding_attention.is_some());
            let (full, slide) = match nested {
                Some(p) => (
                    p.full_attention.as_deref().cloned(),
                    p.sliding_attention.as_deref().cloned(),
                ),
                None => (params.cloned(), None),
            };
            let global = self.rope_spec(
                full.as_ref(),
                raw.rope_theta.unwrap_or(1_000_000.0),
                raw,
                &cfg,
            )?;
            let local = self.rope_spec(
                slide.as_ref(),
                raw.rope_local_base_freq.unwrap_or(10_000.0),
                raw,
                &cfg,
            )?;
            (global, Some(local))
        } else {
            let global = self.rope_spec(params, raw.rope_theta.unwrap_or(10_000.0), raw, &cfg)?;
            (global, None)
        };
        cfg.rope_theta = global.theta;
        cfg.rope_scaling = global.scaling;
        ext.rope = Some(global);
        ext.local_rope = local;
        cfg.ext = ext;
        Ok(cfg)
    }

    /// A soft-cap: absent takes `default` (NaN: none), null is none.
    fn softcap(&self, value: Option<Option<f64>>, default: f64) -> Result<Option<f64>> {
        let cap = match value {
            None => (!default.is_nan()).then_some(default),
            Some(v) => v,
        };
        match cap {
            Some(c) if !(c.is_finite() && c > 0.0) => Err(self.invalid(&format!(
                "logit soft-capping {c} must be a finite positive number"
            ))),
            other => Ok(other),
        }
    }

    /// One RoPE object of the newer families, with `theta` when it has none;
    /// adds Phi-3's `longrope` (`su`, and `yarn` which Phi-3 maps to it) and
    /// partial rotary to the types [`Validator::rope`] reads.
    fn rope_spec(
        &self,
        params: Option<&RawRopeScaling>,
        theta: f64,
        raw: &RawConfig,
        cfg: &ModelConfig,
    ) -> Result<RopeSpec> {
        let phi3 = cfg.architecture == Architecture::Phi3;
        // Only Phi-3's RoPE reads partial_rotary_factor (Qwen3's and Gemma's
        // rotate the whole head whatever the config says).
        let partial = params
            .and_then(|p| p.partial_rotary_factor)
            .or(raw.partial_rotary_factor)
            .filter(|_| phi3)
            .unwrap_or(1.0);
        if !(partial.is_finite() && partial > 0.0 && partial <= 1.0) {
            return Err(self.invalid(&format!(
                "partial_rotary_factor {partial} must be in (0, 1]"
            )));
        }
        // transformers: int(head_dim * partial_rotary_factor).
        let rotary_dim = (cfg.head_dim as f64 * partial) as usize;
        if rotary_dim < 2 || !rotary_dim.is_multiple_of(2) {
            return Err(self.invalid(&format!(
                "{rotary_dim} rotary dimensions (head_dim {} times partial_rotary_factor {partial}) must be even and at least 2",
                cfg.head_dim
            )));
        }
        let kind = params
            .and_then(|p| p.rope_type.as_deref().or(p.legacy_type.as_deref()))
            .unwrap_or("default");
        if phi3 && !matches!(kind, "default" | "longrope" | "su" | "yarn") {
            return Err(self.unsupported(
                "rope_type",
                format!("{kind:?}"),
                "Phi-3's RoPE is default or longrope (su, yarn)",
            ));
        }
        if phi3 && kind != "default" {
            let p = params.expect("a rope type comes from a rope object");
            let theta = p.rope_theta.or(raw.rope_theta).unwrap_or(theta);
            if !(theta.is_finite() && theta > 1.0) {
                return Err(self.invalid(&format!(
                    "rope_theta {theta} must be a finite number above 1"
                )));
            }
            let original = self.size(
                p.original_max_position_embeddings
                    .or(raw.original_max_position_embeddings)
                    .or(Some(4096)),
                "original_max_position_embeddings",
                MAX_POSITIONS,
            )?;
            let factors = |f: &Option<Vec<f64>>, key: &str| -> Result<Vec<f64>> {
                match f {
                    Some(v)
                        if v.len() == rotary_dim / 2
                            && v.iter().all(|x| x.is_finite() && *x > 0.0) =>
                    {
                        Ok(v.clone())
                    }
                    Some(v) => Err(self.invalid(&format!(
                        "longrope `{key}` must hold {} positive numbers (got {})",
                        rotary_dim / 2,
                        v.len()
                    ))),
                    None => Err(self.invalid(&format!("longrope rope scaling has no `{key}`"))),
                }
            };
            let factor = p
                .factor
                .unwrap_or(cfg.max_position_embeddings as f64 / original as f64);
            let attention_factor = match p.attention_factor {
                Some(a) if a.is_finite() && a > 0.0 => a,
                Some(a) => {
                    return Err(self.invalid(&format!(
                        "longrope attention_factor {a} must be a finite positive number"
                    )))
                }
                None if factor <= 1.0 => 1.0,
                None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
            };
            return Ok(RopeSpec {
                theta,
                scaling: None,
                longrope: Some(LongRope {
                    short_factor: factors(&p.short_factor, "short_factor")?,
                    long_factor: factors(&p.long_factor, "long_factor")?,
                    original_max_position_embeddings: original,
                    attention_factor,
                }),
                rotary_dim,
            });
        }
        let probe = RawConfig {
            rope_parameters: params.cloned(),
            rope_theta: Some(theta),
            ..RawConfig::default()
        };
        let (theta, scaling) = self.rope(&probe)?;
        Ok(RopeSpec {
            theta,
            scaling,
            longrope: None,
            rotary_dim,
        })
    }

    fn rope(&self, raw: &RawConfig) -> Result<(f64, Option<RopeScaling>)> {
        // transformers 5 writes `rope_parameters` (with rope_theta inside); 4.x writes
        // a top-level `rope_theta` and an optional `rope_scaling`.
        let params = raw.rope_parameters.as_ref().or(raw.rope_scaling.as_ref());
        let theta = params
            .and_then(|p| p.rope_theta)
            .or(raw.rope_theta)
            .unwrap_or(10_000.0);
        if !(theta.is_finite() && theta > 1.0) {
            return Err(self.invalid(&format!(
                "rope_theta {theta} must be a finite number above 1"
            )));
        }
        let Some(p) = params else {
            return Ok((theta, None));
        };
        let kind = p
            .rope_type
            .as_deref()
            .or(p.legacy_type.as_deref())
            .unwrap_or("default");
        let factor = |p: &RawRopeScaling| -> Result<f64> {
            match p.factor {
                Some(f) if f.is_finite() && f >= 1.0 => Ok(f),
                Some(f) => Err(self.invalid(&format!("rope scaling factor {f} must be >= 1"))),
                None => Err(self.invalid("rope scaling has no `factor`")),
            }
        };
        let scaling = match kind {
            "default" => None,
            "linear" => Some(RopeScaling::Linear { factor: factor(p)? }),
            "llama3" => {
                let low = p
                    .low_freq_factor
                    .ok_or_else(|| self.invalid("llama3 rope scaling has no `low_freq_factor`"))?;
                let high = p
                    .high_freq_factor
                    .ok_or_else(|| self.invalid("llama3 rope scaling has no `high_freq_factor`"))?;
                if !(low.is_finite() && high.is_finite() && low > 0.0 && high > low) {
                    return Err(self.invalid(&format!(
                        "llama3 rope scaling needs 0 < low_freq_factor < high_freq_factor (got {low}, {high})"
                    )));
                }
                let original = self.size(
                    p.original_max_position_embeddings,
                    "rope_scaling.original_max_position_embeddings",
                    MAX_POSITIONS,
                )?;
                Some(RopeScaling::Llama3 {
                    factor: factor(p)?,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max_position_embeddings: original,
                })
            }
            other => {
                return Err(self.unsupported(
                    "rope_type",
                    format!("{other:?}"),
                    "supported RoPE scalings are default, linear and llama3",
                ))
            }
        };
        Ok((theta, scaling))
    }

    /// Sliding-window attention equals full attention while the context is no longer
    /// than the window, so a window smaller than the position table caps the context.
    /// `hidden_act` of the classes whose MLP is transformers'
    /// `ACT2FN[hidden_act]` on the gate (Llama, Mistral, Qwen2/3, Phi-3 and
    /// the mixtures of experts): the names implemented here.
    fn activation(&self, name: &str) -> Result<Activation> {
        match name {
            "relu" => Ok(Activation::Relu),
            "silu" | "swish" => Ok(Activation::Silu),
            "gelu" => Ok(Activation::Gelu),
            "gelu_pytorch_tanh" => Ok(Activation::GeluTanh),
            other => Err(self.unsupported(
                "hidden_act",
                format!("{other:?}"),
                SUPPORTED_ACTIVATIONS_WHY,
            )),
        }
    }

    /// Sparse checkpoints published with their own modeling code
    /// (`trust_remote_code`), read by what that code computes (formats/
    /// flashpack-v1.md 3.1): ProSparse's `SparseLlamaForCausalLM` is Llama
    /// with `hidden_act` `"fatrelu"` and its threshold `hidden_act_param`;
    /// Bamboo's `BambooForCausalLM` (TurboSparse-Mistral) is Mistral whose
    /// MLP applies `hidden_act` (`"relu"`) to both the gate and the up
    /// projection (dReLU). Other models that reuse these class names run
    /// other code, so `model_type` must be the one these checkpoints write.
    fn sparse_checkpoint(
        &self,
        raw: &RawConfig,
        architecture: Architecture,
    ) -> Result<ModelConfig> {
        let (model_type, layers, why) = match architecture {
            Architecture::SparseLlama => (
                "sparsellama",
                Architecture::Llama,
                "SparseLlamaForCausalLM is read as ProSparse's (model_type \"sparsellama\"); \
                 other models of that class name run different code",
            ),
            _ => (
                "bamboo",
                Architecture::Mistral,
                "BambooForCausalLM is read as Bamboo's and TurboSparse-Mistral's \
                 (model_type \"bamboo\")",
            ),
        };
        if raw.model_type.as_deref() != Some(model_type) {
            return Err(self.unsupported(
                "model_type",
                format!("{:?}", raw.model_type.as_deref().unwrap_or("(absent)")),
                why,
            ));
        }
        let name = raw.hidden_act.as_deref().unwrap_or("silu");
        let activation = match (architecture, name) {
            (Architecture::SparseLlama, "fatrelu") => {
                let threshold = match raw.hidden_act_param {
                    None => {
                        return Err(self.invalid(
                            "`hidden_act` \"fatrelu\" needs its threshold `hidden_act_param`",
                        ))
                    }
                    // The runtime computes in f32; beyond its range is no threshold.
                    Some(t) if !(t.is_finite() && (t as f32).is_finite()) => {
                        return Err(
                            self.invalid(&format!("`hidden_act_param` {t} is not a finite number"))
                        )
                    }
                    Some(t) => t as f32,
                };
                Activation::FatRelu { threshold }
            }
            (Architecture::SparseLlama, other) => self.activation(other)?,
            (_, "relu") => Activation::DRelu,
            (_, other) => {
                return Err(self.unsupported(
                    "hidden_act",
                    format!("{other:?}"),
                    "BambooForCausalLM is supported with relu (dReLU), as its checkpoints are",
                ))
            }
        };
        let mut base = raw.clone();
        base.hidden_act = Some("silu".into());
        let mut cfg = self.llama_family(&base, layers)?;
        cfg.architecture = architecture;
        cfg.activation = activation;
        Ok(cfg)
    }

    fn sliding_window_context(
        &self,
        raw: &RawConfig,
        architecture: Architecture,
        max_positions: usize,
    ) -> Result<usize> {
        let window = match architecture {
            Architecture::Mistral => raw.sliding_window,
            // Qwen2 applies its window only with use_sliding_window, and only to
            // layers from max_window_layers on.
            Architecture::Qwen2 if raw.use_sliding_window == Some(true) => {
                let from = raw.max_window_layers.unwrap_or(0);
                let layers = raw.num_hidden_layers.unwrap_or(0);
                if from < layers {
                    raw.sliding_window
                } else {
                    None
                }
            }
            _ => {
                if let Some(types) = &raw.layer_types {
                    if types.iter().any(|t| t != "full_attention") {
                        return Err(self.unsupported(
                            "layer_types",
                            format!("{types:?}"),
                            "only full attention is supported",
                        ));
                    }
                }
                None
            }
        };
        match window {
            Some(0) => Err(self.invalid("`sliding_window` is 0")),
            Some(w) if w < max_positions => Ok(w),
            _ => Ok(max_positions),
        }
    }
}
