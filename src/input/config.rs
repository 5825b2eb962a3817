//! `config.json` of a Hugging Face checkpoint: the file as it is on disk
//! ([`RawConfig`]), validated once into the model description the rest of
//! flashpack trusts ([`ModelConfig`]).
//!
//! Semantics follow transformers' `configuration_opt.py`, `configuration_llama.py`,
//! `configuration_mistral.py` and `configuration_qwen2.py`, including their defaults
//! for keys a file leaves out. Keys we do not use are ignored.

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
}

/// The model families flashpack runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Opt,
    Llama,
    Mistral,
    Qwen2,
}

impl Architecture {
    /// The `architectures[0]` name in `config.json`.
    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::Opt => "OPTForCausalLM",
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
        }
    }

    /// Llama, Mistral and Qwen2 share one layer structure: RMSNorm, RoPE, GQA, gated FFN.
    pub fn is_llama_family(self) -> bool {
        !matches!(self, Architecture::Opt)
    }
}

const SUPPORTED_ARCHITECTURES: &str =
    "OPTForCausalLM, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM";

/// The FFN's activation function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Relu,
    Silu,
}

impl Activation {
    pub fn name(self) -> &'static str {
        match self {
            Activation::Relu => "relu",
            Activation::Silu => "silu",
        }
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
            _ => v.llama_family(raw, architecture),
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

        let act_name = raw.hidden_act.as_deref().unwrap_or("silu");
        let activation = match act_name {
            "relu" => Activation::Relu,
            "silu" | "swish" => Activation::Silu,
            other => {
                return Err(self.unsupported(
                    "hidden_act",
                    format!("{other:?}"),
                    "supported activations are relu and silu",
                ))
            }
        };
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
