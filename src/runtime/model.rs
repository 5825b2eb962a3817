//! The one forward pass, for every architecture the input side accepts: OPT
//! (pre-LN and post-LN, project_in/out, learned positions with offset 2) and the
//! Llama family (RMSNorm, RoPE, grouped-query attention, gated FFN).
//!
//! Follows transformers' `modeling_opt.py` and `modeling_llama.py` (eager
//! attention). A batch of tokens (prefill) goes through batched GEMMs; a single
//! token (decode) through parallel matrix-vector products. The FFN of each layer
//! is a `Box<dyn Ffn>` so that the flash runtime can swap it in.

use crate::error::{Error, Result};
use crate::input::config::{ModelConfig, OPT_POSITION_OFFSET};
use crate::input::tensors::{FfnNames, ModelNames, MoeNames, NormNames};
use crate::input::Checkpoint;
use crate::runtime::attention::{attend, Heads, KvCache};
use crate::runtime::ffn::{ActiveSet, DenseFfn, Ffn, FfnWeights, Fired};
use crate::runtime::kernels;
use crate::runtime::moe::{MoeFfn, Router};
use crate::runtime::rope::Rope;
use crate::runtime::weights::{load_linear, load_norm, Linear, Matrix, NormWeights, TensorSource};

/// One decoder layer's weights.
pub struct Layer {
    pub attn_norm: NormWeights,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub ffn_norm: NormWeights,
    pub ffn: Box<dyn Ffn>,
    /// Per-head norms of q and k (Qwen3, Gemma-3).
    pub q_norm: Option<NormWeights>,
    pub k_norm: Option<NormWeights>,
    /// Gemma-2/3: norms of the attention and FFN outputs.
    pub post_attn_norm: Option<NormWeights>,
    pub post_ffn_norm: Option<NormWeights>,
}

/// Which positions of a forward pass need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// None (filling the cache only).
    None,
    /// The last position of the batch (generation).
    Last,
    /// Every position of the batch (perplexity).
    All,
}

/// Sees intermediate values of a forward pass (calibration, sparsity statistics).
pub trait Observer {
    /// Called once per layer with the FFN input (`n x hidden`, after the norm) and
    /// the neurons that fired for each of the `n` tokens.
    fn ffn(&mut self, layer: usize, input: &[f32], n: usize, fired: &Fired);
    /// Called once per layer with the residual stream (`n x hidden`) right after
    /// the FFN's output was added to it.
    fn residual(&mut self, _layer: usize, _x: &[f32], _n: usize) {}
}

/// A dense FFN (plain or gated) with its weights read from `src`.
pub fn load_dense_ffn(
    config: &ModelConfig,
    names: &FfnNames,
    src: &dyn TensorSource,
) -> Result<DenseFfn> {
    let weights = match names {
        FfnNames::Plain { up, down } => FfnWeights::Plain {
            up: load_linear(src, up)?,
            down: load_linear(src, down)?,
        },
        FfnNames::Gated { gate, up, down } => FfnWeights::Gated {
            gate: load_linear(src, gate)?,
            up: load_linear(src, up)?,
            down: load_linear(src, down)?,
        },
        FfnNames::Moe(_) => {
            return Err(Error::InvalidArgument(
                "a mixture of experts is not one dense FFN".into(),
            ))
        }
    };
    Ok(DenseFfn {
        weights,
        activation: config.activation,
    })
}

/// A mixture of experts with every weight read from `src`.
pub fn load_moe(config: &ModelConfig, names: &MoeNames, src: &dyn TensorSource) -> Result<MoeFfn> {
    let moe = config.moe.as_ref().ok_or_else(|| {
        Error::InvalidArgument("mixture-of-experts tensors for a dense model".into())
    })?;
    let experts = names
        .experts
        .iter()
        .map(|e| load_dense_ffn(config, e, src))
        .collect::<Result<Vec<_>>>()?;
    let shared = match (&names.shared, &names.shared_gate) {
        (Some(f), Some(g)) => Some((load_dense_ffn(config, f, src)?, load_linear(src, g)?)),
        _ => None,
    };
    Ok(MoeFfn {
        router: Router {
            weight: load_linear(src, &names.router)?,
            top_k: moe.top_k,
            norm_topk_prob: moe.norm_topk_prob,
        },
        experts,
        shared,
    })
}

/// Builds layer `i`'s FFN from its tensor names (see [`Model::load_with_ffn`]).
pub type MakeFfn<'a> = dyn FnMut(usize, &FfnNames) -> Result<Box<dyn Ffn>> + 'a;

/// A loaded model, ready to run.
pub struct Model {
    pub config: ModelConfig,
    /// Token embeddings, or `None` when tied to `lm_head` (which then holds them).
    embed: Option<Matrix>,
    /// OPT's learned position table (`[max_positions + 2, hidden]`).
    positions: Option<Matrix>,
    project_in: Option<Linear>,
    project_out: Option<Linear>,
    final_norm: Option<NormWeights>,
    lm_head: Linear,
    pub layers: Vec<Layer>,
    rope: Option<Rope>,
    /// Gemma-3: the RoPE of the sliding-window layers.
    local_rope: Option<Rope>,
}

impl Model {
    /// Loads a validated checkpoint; weights keep their stored dtype.
    pub fn from_checkpoint(ckpt: &Checkpoint) -> Result<Model> {
        Model::load(&ckpt.config, &ckpt.names, ckpt)
    }

    /// Builds a model from any tensor source (a checkpoint, random weights).
    pub fn load(config: &ModelConfig, names: &ModelNames, src: &dyn TensorSource) -> Result<Model> {
        Model::load_with_ffn(config, names, src, &mut |i, ffn| match ffn {
            FfnNames::Moe(m) => Ok(Box::new(load_moe(config, m, src)?)),
            dense => match src.own_ffn(i, config)? {
                Some(own) => Ok(own),
                None => Ok(Box::new(load_dense_ffn(config, dense, src)?)),
            },
        })
    }

    /// As [`Model::load`], with each layer's FFN built by `make_ffn(layer,
    /// names)` (the flash runtime's FFNs keep their weights on disk).
    pub fn load_with_ffn(
        config: &ModelConfig,
        names: &ModelNames,
        src: &dyn TensorSource,
        make_ffn: &mut MakeFfn<'_>,
    ) -> Result<Model> {
        let lm_head = load_linear(src, &names.lm_head)?;
        let embed = if names.lm_head.weight == names.embed_tokens {
            None
        } else {
            Some(src.matrix(&names.embed_tokens, config.vocab_size, config.embed_dim())?)
        };
        let positions = match &names.embed_positions {
            Some((name, rows, dim)) => {
                Some(Matrix::new(*rows, *dim, src.tensor(name, &[*rows, *dim])?)?)
            }
            None => None,
        };
        let project_in = names
            .project_in
            .as_ref()
            .map(|l| load_linear(src, l))
            .transpose()?;
        let project_out = names
            .project_out
            .as_ref()
            .map(|l| load_linear(src, l))
            .transpose()?;
        // Gemma's RMSNorm multiplies by (1 + weight), formed in f32 as
        // transformers does: fold the 1 into the weights once.
        let plus_one = config.ext.norm_plus_one;
        let load_norm = |src: &dyn TensorSource, n: &NormNames| -> Result<NormWeights> {
            let mut norm = load_norm(src, n)?;
            if plus_one {
                for w in norm.weight.iter_mut().flatten() {
                    *w += 1.0;
                }
            }
            Ok(norm)
        };
        let optional_norm =
            |n: &Option<NormNames>| n.as_ref().map(|n| load_norm(src, n)).transpose();
        let final_norm = optional_norm(&names.final_norm)?;
        let mut layers = Vec::with_capacity(names.layers.len());
        for (i, l) in names.layers.iter().enumerate() {
            layers.push(Layer {
                attn_norm: load_norm(src, &l.attn_norm)?,
                q: load_linear(src, &l.q)?,
                k: load_linear(src, &l.k)?,
                v: load_linear(src, &l.v)?,
                o: load_linear(src, &l.o)?,
                ffn_norm: load_norm(src, &l.ffn_norm)?,
                ffn: make_ffn(i, &l.ffn)?,
                q_norm: optional_norm(&l.q_norm)?,
                k_norm: optional_norm(&l.k_norm)?,
                post_attn_norm: optional_norm(&l.post_attn_norm)?,
                post_ffn_norm: optional_norm(&l.post_ffn_norm)?,
            });
        }
        let rope = match &config.ext.rope {
            Some(spec) => Some(Rope::from_spec(spec)),
            None => config
                .architecture
                .is_llama_family()
                .then(|| Rope::new(config)),
        };
        let local_rope = config.ext.local_rope.as_ref().map(Rope::from_spec);
        Ok(Model {
            config: config.clone(),
            embed,
            positions,
            project_in,
            project_out,
            final_norm,
            lm_head,
            layers,
            rope,
            local_rope,
        })
    }

    /// An empty KV cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    /// Bytes of weights one decode step reads: every layer, the final
    /// projections and the LM head (the embedding row read is negligible).
    pub fn decode_weight_bytes(&self) -> usize {
        let mut total = self.lm_head.size_bytes();
        total += self.project_out.as_ref().map_or(0, Linear::size_bytes);
        total += self.project_in.as_ref().map_or(0, Linear::size_bytes);
        for l in &self.layers {
            total += l.q.size_bytes() + l.k.size_bytes() + l.v.size_bytes() + l.o.size_bytes();
            total += l.ffn.weight_bytes();
        }
        total
    }

    fn is_opt(&self) -> bool {
        self.config.opt.is_some()
    }

    fn norm(&self, x: &mut [f32], norm: &NormWeights) {
        let h = self.config.hidden_size;
        if self.is_opt() {
            kernels::layer_norm(x, h, norm, self.config.norm_eps);
        } else {
            kernels::rms_norm(x, h, norm, self.config.norm_eps);
        }
    }

    /// Runs `tokens` at the positions after those already in `cache`, appends
    /// their keys and values to it, and returns logits (`vocab` floats per wanted
    /// position, row-major).
    pub fn forward(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
        want: Logits,
        mut observer: Option<&mut (dyn Observer + '_)>,
    ) -> Result<Vec<f32>> {
        let cfg = &self.config;
        let n = tokens.len();
        let start = cache.len;
        if n == 0 {
            return Ok(Vec::new());
        }
        if start + n > cfg.max_context {
            return Err(Error::ContextTooLong {
                what: format!("a sequence of {} tokens", start + n),
                needed: start + n,
                max: cfg.max_context,
            });
        }
        if let Some(kv) = cache.layers.iter().find(|kv| kv.first > start) {
            // A sliding-window layer dropped positions the pass would rewind to.
            return Err(Error::InvalidArgument(format!(
                "the KV cache holds positions from {} on and cannot restart at {start}",
                kv.first
            )));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(Error::InvalidArgument(format!(
                "token id {bad} is outside the vocabulary of {}",
                cfg.vocab_size
            )));
        }
        let h = cfg.hidden_size;
        let mut x = self.embed_tokens(tokens, start);
        let q_dim = cfg.num_heads * cfg.head_dim;
        let kv_dim = cfg.kv_dim();
        let opt = cfg.opt;
        let pre_ln = opt.is_none_or(|o| o.do_layer_norm_before);
        let scale = (cfg.head_dim as f32).powf(-0.5);
        let ext = &cfg.ext;
        let heads = Heads {
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            // OPT scales q after its projection (bias included); eager Llama
            // attention scales the scores.
            score_scale: if opt.is_some() {
                1.0
            } else {
                ext.attn_scale.map_or(scale, |s| s as f32)
            },
            softcap: ext.attn_softcap.map(|c| c as f32),
            window: None,
        };
        let rope_table = self.rope.as_ref().map(|r| r.table(start, n));
        let local_table = self.local_rope.as_ref().map(|r| r.table(start, n));
        for (li, layer) in self.layers.iter().enumerate() {
            let window = ext.layer_windows.get(li).copied().flatten();
            let heads = Heads { window, ..heads };
            // Attention block.
            let mut hn = x.clone();
            if pre_ln {
                self.norm(&mut hn, &layer.attn_norm);
            }
            let mut q = vec![0.0f32; n * q_dim];
            let mut k = vec![0.0f32; n * kv_dim];
            let mut v = vec![0.0f32; n * kv_dim];
            kernels::linear(&layer.q, &hn, n, &mut q);
            kernels::linear(&layer.k, &hn, n, &mut k);
            kernels::linear(&layer.v, &hn, n, &mut v);
            if opt.is_some() {
                for e in &mut q {
                    *e *= scale;
                }
            }
            // Qwen3 and Gemma-3 norm each head of q and k before RoPE.
            if let Some(norm) = &layer.q_norm {
                kernels::rms_norm(&mut q, cfg.head_dim, norm, cfg.norm_eps);
            }
            if let Some(norm) = &layer.k_norm {
                kernels::rms_norm(&mut k, cfg.head_dim, norm, cfg.norm_eps);
            }
            let table = match (&local_table, window) {
                (Some(local), Some(_)) => Some(local),
                _ => rope_table.as_ref(),
            };
            if let Some(rope) = table {
                let hd = cfg.head_dim;
                for t in 0..n {
                    for head in q[t * q_dim..(t + 1) * q_dim].chunks_exact_mut(hd) {
                        rope.apply(head, start + t);
                    }
                    for head in k[t * kv_dim..(t + 1) * kv_dim].chunks_exact_mut(hd) {
                        rope.apply(head, start + t);
                    }
                }
            }
            let kv = &mut cache.layers[li];
            kv.append(start, &k, &v, kv_dim);
            let attn = attend(&q, n, start, kv, heads);
            if let Some(w) = window {
                // A true sliding-window cache: keep what later queries can see.
                kv.slide(start + n, w, kv_dim);
            }
            let mut o = vec![0.0f32; n * h];
            kernels::linear(&layer.o, &attn, n, &mut o);
            if let Some(norm) = &layer.post_attn_norm {
                self.norm(&mut o, norm);
            }
            for (xe, oe) in x.iter_mut().zip(&o) {
                *xe += oe;
            }
            if !pre_ln {
                self.norm(&mut x, &layer.attn_norm);
            }

            // FFN block.
            let mut hn = x.clone();
            if pre_ln {
                self.norm(&mut hn, &layer.ffn_norm);
            }
            let mut f = vec![0.0f32; n * h];
            let mut fired = Fired::default();
            let want_fired = observer.is_some();
            layer.ffn.forward(
                &hn,
                n,
                ActiveSet::All,
                &mut f,
                want_fired.then_some(&mut fired),
            )?;
            if let Some(obs) = observer.as_deref_mut() {
                obs.ffn(li, &hn, n, &fired);
            }
            if let Some(norm) = &layer.post_ffn_norm {
                self.norm(&mut f, norm);
            }
            for (xe, fe) in x.iter_mut().zip(&f) {
                *xe += fe;
            }
            if let Some(obs) = observer.as_deref_mut() {
                obs.residual(li, &x, n);
            }
            if !pre_ln {
                self.norm(&mut x, &layer.ffn_norm);
            }
        }
        cache.len = start + n;

        let rows: &mut [f32] = match want {
            Logits::None => return Ok(Vec::new()),
            Logits::Last => &mut x[(n - 1) * h..],
            Logits::All => &mut x[..],
        };
        let m = rows.len() / h;
        if let Some(norm) = &self.final_norm {
            self.norm(rows, norm);
        }
        let head = |rows: &[f32], m: usize| -> Vec<f32> {
            let projected;
            let rows: &[f32] = match &self.project_out {
                Some(p) => {
                    let mut out = vec![0.0f32; m * p.out_dim()];
                    kernels::linear(p, rows, m, &mut out);
                    projected = out;
                    &projected
                }
                None => rows,
            };
            let mut logits = vec![0.0f32; m * cfg.vocab_size];
            kernels::linear(&self.lm_head, rows, m, &mut logits);
            logits
        };
        let mut logits = head(rows, m);
        if m > 1 {
            // The batch kernels may round differently from the one-row kernel:
            // the last row is computed as `Logits::Last` computes it, so that a
            // caller that keeps every row (`run --logits-out`) samples exactly
            // what a run without it samples.
            let last = head(&rows[(m - 1) * h..], 1);
            logits[(m - 1) * cfg.vocab_size..].copy_from_slice(&last);
        }
        if let Some(cap) = cfg.ext.final_softcap {
            let cap = cap as f32;
            for l in &mut logits {
                *l = (*l / cap).tanh() * cap;
            }
        }
        Ok(logits)
    }

    /// Token embeddings (plus OPT's projection and learned positions): `n x hidden`.
    fn embed_tokens(&self, tokens: &[u32], start: usize) -> Vec<f32> {
        let cfg = &self.config;
        let table = self.embed.as_ref().unwrap_or(&self.lm_head.weight);
        let e = table.cols;
        let mut x = vec![0.0f32; tokens.len() * e];
        for (row, &t) in x.chunks_exact_mut(e).zip(tokens) {
            table.row_into(t as usize, row);
        }
        if let Some(p) = &self.project_in {
            let mut out = vec![0.0f32; tokens.len() * p.out_dim()];
            kernels::linear(p, &x, tokens.len(), &mut out);
            x = out;
        }
        if let Some(s) = cfg.ext.embed_scale {
            // Gemma: times sqrt(hidden), an f32 like the embedding rows here.
            for v in &mut x {
                *v *= s;
            }
        }
        if let Some(pos) = &self.positions {
            let h = cfg.hidden_size;
            let mut buf = vec![0.0f32; h];
            for (t, row) in x.chunks_exact_mut(h).enumerate() {
                // An unpadded sequence: position ids are 0.. and OPT adds 2.
                pos.row_into(start + t + OPT_POSITION_OFFSET, &mut buf);
                for (a, b) in row.iter_mut().zip(&buf) {
                    *a += b;
                }
            }
        }
        x
    }
}
