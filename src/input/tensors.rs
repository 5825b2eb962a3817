//! Which tensors a checkpoint of each architecture holds, by role, with the shape
//! `config.json` implies for each.
//!
//! This is the one place that knows Hugging Face's tensor names. The checkpoint
//! reader checks presence and shapes against it; the runtime loads weights through
//! it, so a misnamed or misshapen tensor is reported with its full name.

use crate::input::config::{Architecture, ModelConfig, OPT_POSITION_OFFSET};

/// How a tensor's parameters are counted by `inspect`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParamGroup {
    Embeddings,
    Attention,
    Ffn,
    Other,
}

/// A tensor the architecture requires, with the shape it must have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub group: ParamGroup,
}

/// A linear layer `y = W x (+ b)` with `W` stored `[out, in]` as in PyTorch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinearNames {
    pub weight: String,
    pub bias: Option<String>,
    pub out_dim: usize,
    pub in_dim: usize,
}

/// A LayerNorm (weight and bias) or RMSNorm (weight only) over `dim` features.
/// Both names are absent for OPT's non-affine layer norms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormNames {
    pub weight: Option<String>,
    pub bias: Option<String>,
    pub dim: usize,
}

/// The FFN of one layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FfnNames {
    /// OPT: `down(act(up x))` (`fc1`, `fc2`).
    Plain { up: LinearNames, down: LinearNames },
    /// Llama family: `down(act(gate x) * (up x))`.
    Gated {
        gate: LinearNames,
        up: LinearNames,
        down: LinearNames,
    },
    /// A mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE).
    Moe(MoeNames),
}

/// The tensors of a mixture-of-experts FFN (see
/// [`crate::input::config::MoeOptions`] for what they compute).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MoeNames {
    /// `[num_experts, hidden]`, no bias (Mixtral's `block_sparse_moe.gate`,
    /// Qwen's `mlp.gate`).
    pub router: LinearNames,
    /// One gated FFN per expert, in expert order: Mixtral's `w1` (gate), `w3`
    /// (up) and `w2` (down), Qwen's `gate_proj`, `up_proj`, `down_proj`.
    pub experts: Vec<FfnNames>,
    /// Qwen2-MoE: the shared expert (a gated FFN) and its gate (`[1, hidden]`).
    pub shared: Option<Box<FfnNames>>,
    pub shared_gate: Option<LinearNames>,
}

/// The tensors of one decoder layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerNames {
    pub attn_norm: NormNames,
    pub q: LinearNames,
    pub k: LinearNames,
    pub v: LinearNames,
    pub o: LinearNames,
    pub ffn_norm: NormNames,
    pub ffn: FfnNames,
    /// Per-head RMSNorms of q and k (`[head_dim]`; Qwen3, Gemma-3).
    pub q_norm: Option<NormNames>,
    pub k_norm: Option<NormNames>,
    /// Gemma-2/3: the norm of the attention output (`post_attention_layernorm`;
    /// `ffn_norm` is then `pre_feedforward_layernorm`) and of the FFN output.
    pub post_attn_norm: Option<NormNames>,
    pub post_ffn_norm: Option<NormNames>,
}

/// A tensor stored fused in the checkpoint (Phi-3's `qkv_proj`, `gate_up_proj`)
/// and read as the row blocks the model uses: `parts` are `(name, rows)` in
/// order, each `[rows, in_dim]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FusedTensor {
    pub name: String,
    pub in_dim: usize,
    pub parts: Vec<(String, usize)>,
}

/// Every tensor of a model, by role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelNames {
    /// `[vocab, embed_dim]`.
    pub embed_tokens: String,
    /// OPT's learned positions: `[max_positions + 2, hidden]` (name, rows, width).
    pub embed_positions: Option<(String, usize, usize)>,
    /// OPT-350m style projection from the embedding width to the hidden size.
    pub project_in: Option<LinearNames>,
    pub project_out: Option<LinearNames>,
    pub final_norm: Option<NormNames>,
    /// The output projection; with tied embeddings its weight is `embed_tokens`.
    pub lm_head: LinearNames,
    pub layers: Vec<LayerNames>,
    /// Fused checkpoint tensors split at load (Phi-3); empty otherwise.
    pub fused: Vec<FusedTensor>,
}

fn linear(prefix: &str, out_dim: usize, in_dim: usize, bias: bool) -> LinearNames {
    LinearNames {
        weight: format!("{prefix}.weight"),
        bias: bias.then(|| format!("{prefix}.bias")),
        out_dim,
        in_dim,
    }
}

impl ModelNames {
    pub fn for_config(cfg: &ModelConfig) -> ModelNames {
        match cfg.architecture {
            Architecture::Opt => opt_names(cfg),
            _ => llama_names(cfg),
        }
    }

    /// Every tensor that must be present, with its shape and parameter group.
    pub fn specs(&self) -> Vec<TensorSpec> {
        let mut specs = Vec::new();
        let add_linear = |specs: &mut Vec<TensorSpec>, l: &LinearNames, group| {
            specs.push(TensorSpec {
                name: l.weight.clone(),
                shape: vec![l.out_dim, l.in_dim],
                group,
            });
            if let Some(b) = &l.bias {
                specs.push(TensorSpec {
                    name: b.clone(),
                    shape: vec![l.out_dim],
                    group,
                });
            }
        };
        let add_norm = |specs: &mut Vec<TensorSpec>, n: &NormNames| {
            for name in n.weight.iter().chain(n.bias.iter()) {
                specs.push(TensorSpec {
                    name: name.clone(),
                    shape: vec![n.dim],
                    group: ParamGroup::Other,
                });
            }
        };
        // The lm_head spec tells the embedding's shape, tied or not.
        specs.push(TensorSpec {
            name: self.embed_tokens.clone(),
            shape: vec![self.lm_head.out_dim, self.lm_head.in_dim],
            group: ParamGroup::Embeddings,
        });
        if let Some((name, rows, dim)) = &self.embed_positions {
            specs.push(TensorSpec {
                name: name.clone(),
                shape: vec![*rows, *dim],
                group: ParamGroup::Embeddings,
            });
        }
        if self.lm_head.weight != self.embed_tokens {
            add_linear(&mut specs, &self.lm_head, ParamGroup::Embeddings);
        }
        for l in self.project_in.iter().chain(self.project_out.iter()) {
            add_linear(&mut specs, l, ParamGroup::Other);
        }
        if let Some(n) = &self.final_norm {
            add_norm(&mut specs, n);
        }
        for layer in &self.layers {
            add_norm(&mut specs, &layer.attn_norm);
            for l in [&layer.q, &layer.k, &layer.v, &layer.o] {
                add_linear(&mut specs, l, ParamGroup::Attention);
            }
            for n in [&layer.q_norm, &layer.k_norm, &layer.post_attn_norm]
                .into_iter()
                .flatten()
            {
                add_norm(&mut specs, n);
            }
            add_norm(&mut specs, &layer.ffn_norm);
            if let Some(n) = &layer.post_ffn_norm {
                add_norm(&mut specs, n);
            }
            match &layer.ffn {
                FfnNames::Moe(moe) => {
                    // The router and the shared expert's gate are counted as
                    // "other": what a runtime keeps resident beside attention.
                    add_linear(&mut specs, &moe.router, ParamGroup::Other);
                    for l in moe.experts.iter().chain(moe.shared.as_deref()) {
                        for p in l.projections() {
                            add_linear(&mut specs, p, ParamGroup::Ffn);
                        }
                    }
                    if let Some(g) = &moe.shared_gate {
                        add_linear(&mut specs, g, ParamGroup::Other);
                    }
                }
                ffn => {
                    for p in ffn.projections() {
                        add_linear(&mut specs, p, ParamGroup::Ffn);
                    }
                }
            }
        }
        specs
    }
}

/// Tensor names of `OPTForCausalLM` (transformers' `modeling_opt.py`).
fn opt_names(cfg: &ModelConfig) -> ModelNames {
    let opt = cfg.opt.expect("OPT config carries OPT options");
    let h = cfg.hidden_size;
    let proj = opt.word_embed_proj_dim;
    let norm = |prefix: String, dim| NormNames {
        weight: opt.layer_norm_affine.then(|| format!("{prefix}.weight")),
        bias: opt.layer_norm_affine.then(|| format!("{prefix}.bias")),
        dim,
    };
    let layers = (0..cfg.num_layers)
        .map(|i| {
            let p = format!("model.decoder.layers.{i}");
            LayerNames {
                attn_norm: norm(format!("{p}.self_attn_layer_norm"), h),
                q: linear(&format!("{p}.self_attn.q_proj"), h, h, cfg.qkv_bias),
                k: linear(&format!("{p}.self_attn.k_proj"), h, h, cfg.qkv_bias),
                v: linear(&format!("{p}.self_attn.v_proj"), h, h, cfg.qkv_bias),
                o: linear(&format!("{p}.self_attn.out_proj"), h, h, cfg.o_bias),
                ffn_norm: norm(format!("{p}.final_layer_norm"), h),
                ffn: FfnNames::Plain {
                    up: linear(&format!("{p}.fc1"), cfg.ffn_width, h, cfg.ffn_bias),
                    down: linear(&format!("{p}.fc2"), h, cfg.ffn_width, cfg.ffn_bias),
                },
                q_norm: None,
                k_norm: None,
                post_attn_norm: None,
                post_ffn_norm: None,
            }
        })
        .collect();
    let embed_tokens = "model.decoder.embed_tokens.weight".to_string();
    let projected = proj != h;
    ModelNames {
        embed_tokens: embed_tokens.clone(),
        embed_positions: Some((
            "model.decoder.embed_positions.weight".to_string(),
            cfg.max_position_embeddings + OPT_POSITION_OFFSET,
            h,
        )),
        project_in: projected.then(|| linear("model.decoder.project_in", h, proj, false)),
        project_out: projected.then(|| linear("model.decoder.project_out", proj, h, false)),
        final_norm: opt
            .has_final_layer_norm
            .then(|| norm("model.decoder.final_layer_norm".into(), h)),
        lm_head: LinearNames {
            weight: if cfg.tie_word_embeddings {
                embed_tokens
            } else {
                "lm_head.weight".into()
            },
            bias: None,
            out_dim: cfg.vocab_size,
            in_dim: proj,
        },
        layers,
        fused: Vec::new(),
    }
}

/// A gated FFN of `width` neurons under `prefix` (`{prefix}.gate_proj`, ...);
/// Mixtral's experts name the same projections `w1`, `w3` and `w2`.
fn gated(prefix: &str, names: [&str; 3], width: usize, h: usize, bias: bool) -> FfnNames {
    let [gate, up, down] = names;
    FfnNames::Gated {
        gate: linear(&format!("{prefix}.{gate}"), width, h, bias),
        up: linear(&format!("{prefix}.{up}"), width, h, bias),
        down: linear(&format!("{prefix}.{down}"), h, width, bias),
    }
}

const LLAMA_MLP: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];
const MIXTRAL_EXPERT: [&str; 3] = ["w1", "w3", "w2"];

/// Layer `i`'s FFN: the Llama family's gated MLP, or the mixture of experts of
/// the MoE classes (as transformers' `save_pretrained` writes it: one tensor
/// per expert and projection).
fn llama_ffn(cfg: &ModelConfig, i: usize) -> FfnNames {
    let h = cfg.hidden_size;
    let p = format!("model.layers.{i}");
    let Some(moe) = cfg.moe.as_ref().filter(|m| m.sparse_layers[i]) else {
        return gated(
            &format!("{p}.mlp"),
            LLAMA_MLP,
            cfg.ffn_width,
            h,
            cfg.ffn_bias,
        );
    };
    let (block, projections) = if cfg.architecture == Architecture::Mixtral {
        (format!("{p}.block_sparse_moe"), MIXTRAL_EXPERT)
    } else {
        (format!("{p}.mlp"), LLAMA_MLP)
    };
    let experts = (0..moe.num_experts)
        .map(|e| {
            gated(
                &format!("{block}.experts.{e}"),
                projections,
                moe.expert_width,
                h,
                false,
            )
        })
        .collect();
    MoeNames {
        router: linear(&format!("{block}.gate"), moe.num_experts, h, false),
        experts,
        shared: moe.shared_expert_width.map(|w| {
            Box::new(gated(
                &format!("{block}.shared_expert"),
                LLAMA_MLP,
                w,
                h,
                false,
            ))
        }),
        shared_gate: moe
            .shared_expert_width
            .map(|_| linear(&format!("{block}.shared_expert_gate"), 1, h, false)),
    }
    .into()
}

impl From<MoeNames> for FfnNames {
    fn from(m: MoeNames) -> FfnNames {
        FfnNames::Moe(m)
    }
}

/// Tensor names of `LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`,
/// and of the families that add to them: `Qwen3ForCausalLM` (q/k norms),
/// `Phi3ForCausalLM` (q/k/v and gate/up split from its fused tensors at load, so
/// named as Llama's), `Gemma2ForCausalLM` and `Gemma3ForCausalLM` (four norms per
/// layer; Gemma-3 q/k norms).
fn llama_names(cfg: &ModelConfig) -> ModelNames {
    let ext = &cfg.ext;
    let head_norm = |name: String| NormNames {
        weight: Some(name),
        bias: None,
        dim: cfg.head_dim,
    };
    let h = cfg.hidden_size;
    let q_dim = cfg.num_heads * cfg.head_dim;
    let kv = cfg.kv_dim();
    let rms = |name: String| NormNames {
        weight: Some(name),
        bias: None,
        dim: h,
    };
    let layers = (0..cfg.num_layers)
        .map(|i| {
            let p = format!("model.layers.{i}");
            LayerNames {
                attn_norm: rms(format!("{p}.input_layernorm.weight")),
                q: linear(&format!("{p}.self_attn.q_proj"), q_dim, h, cfg.qkv_bias),
                k: linear(&format!("{p}.self_attn.k_proj"), kv, h, cfg.qkv_bias),
                v: linear(&format!("{p}.self_attn.v_proj"), kv, h, cfg.qkv_bias),
                o: linear(&format!("{p}.self_attn.o_proj"), h, q_dim, cfg.o_bias),
                ffn_norm: rms(if ext.sandwich_norms {
                    format!("{p}.pre_feedforward_layernorm.weight")
                } else {
                    format!("{p}.post_attention_layernorm.weight")
                }),
                ffn: llama_ffn(cfg, i),
                q_norm: ext
                    .qk_norm
                    .then(|| head_norm(format!("{p}.self_attn.q_norm.weight"))),
                k_norm: ext
                    .qk_norm
                    .then(|| head_norm(format!("{p}.self_attn.k_norm.weight"))),
                post_attn_norm: ext
                    .sandwich_norms
                    .then(|| rms(format!("{p}.post_attention_layernorm.weight"))),
                post_ffn_norm: ext
                    .sandwich_norms
                    .then(|| rms(format!("{p}.post_feedforward_layernorm.weight"))),
            }
        })
        .collect();
    let fused = if ext.fused_projections {
        (0..cfg.num_layers)
            .flat_map(|i| {
                let p = format!("model.layers.{i}");
                [
                    FusedTensor {
                        name: format!("{p}.self_attn.qkv_proj.weight"),
                        in_dim: h,
                        parts: vec![
                            (format!("{p}.self_attn.q_proj.weight"), q_dim),
                            (format!("{p}.self_attn.k_proj.weight"), kv),
                            (format!("{p}.self_attn.v_proj.weight"), kv),
                        ],
                    },
                    FusedTensor {
                        name: format!("{p}.mlp.gate_up_proj.weight"),
                        in_dim: h,
                        parts: vec![
                            (format!("{p}.mlp.gate_proj.weight"), cfg.ffn_width),
                            (format!("{p}.mlp.up_proj.weight"), cfg.ffn_width),
                        ],
                    },
                ]
            })
            .collect()
    } else {
        Vec::new()
    };
    let embed_tokens = "model.embed_tokens.weight".to_string();
    ModelNames {
        embed_tokens: embed_tokens.clone(),
        embed_positions: None,
        project_in: None,
        project_out: None,
        final_norm: Some(rms("model.norm.weight".into())),
        lm_head: LinearNames {
            weight: if cfg.tie_word_embeddings {
                embed_tokens
            } else {
                "lm_head.weight".into()
            },
            bias: None,
            out_dim: cfg.vocab_size,
            in_dim: h,
        },
        layers,
        fused,
    }
}

impl FfnNames {
    /// The projections stored as bundles, in bundle order: gate (gated FFNs
    /// only), up, down. A mixture's are its experts', expert by expert; its
    /// router and shared expert are dense tensors (spec 4.1).
    pub fn projections(&self) -> Vec<&LinearNames> {
        match self {
            FfnNames::Plain { up, down } => vec![up, down],
            FfnNames::Gated { gate, up, down } => vec![gate, up, down],
            FfnNames::Moe(m) => m.experts.iter().flat_map(FfnNames::projections).collect(),
        }
    }

    /// The mixture's tensors, when this is one.
    pub fn moe(&self) -> Option<&MoeNames> {
        match self {
            FfnNames::Moe(m) => Some(m),
            _ => None,
        }
    }

    /// Biases with one value per neuron (of the gate and up projections, where the
    /// config has them); the down projection's bias is per output feature.
    pub fn per_neuron_biases(&self) -> Vec<&String> {
        let (gate, up, _) = self.parts();
        gate.into_iter()
            .chain([up])
            .filter_map(|l| l.bias.as_ref())
            .collect()
    }

    /// `(gate, up, down)`; `gate` is `None` for a plain FFN. A mixture has
    /// no single set: its first expert's (callers that pack or compare one
    /// FFN per layer refuse mixtures before they get here).
    pub fn parts(&self) -> (Option<&LinearNames>, &LinearNames, &LinearNames) {
        match self {
            FfnNames::Plain { up, down } => (None, up, down),
            FfnNames::Gated { gate, up, down } => (Some(gate), up, down),
            FfnNames::Moe(m) => m.experts[0].parts(),
        }
    }
}
