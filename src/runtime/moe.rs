//! A mixture-of-experts FFN (Mixtral, Qwen2-MoE, Qwen3-MoE) as one more
//! [`Ffn`]: a router picks each token's experts, whose gated FFNs run on the
//! tokens routed to them, weighted by the router's probabilities; Qwen2-MoE
//! adds a shared expert scaled by a sigmoid gate.
//!
//! Follows transformers' `*TopKRouter`, `*Experts` and `*SparseMoeBlock`
//! (transformers 5): router logits `W x` in the model's dtype, their softmax in
//! f32, the `top_k` largest probabilities (renormalised to sum to 1 with
//! `norm_topk_prob`), each chosen expert's output times its probability added
//! into the token's output expert by expert in ascending expert order (as
//! `index_add_` does), then the shared expert's output added. [`Router`] is
//! its own unit because the flash runtime routes from the resident router
//! before it reads any expert.

use crate::error::{Error, Result};
use crate::runtime::ffn::{ActiveSet, DenseFfn, Ffn, Fired};
use crate::runtime::kernels;
use crate::runtime::weights::Linear;

/// The router of one MoE layer.
#[derive(Debug, Clone)]
pub struct Router {
    /// `[num_experts, hidden]`, no bias.
    pub weight: Linear,
    pub top_k: usize,
    pub norm_topk_prob: bool,
}

/// Which experts each token of a batch goes to, and with what weight.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub top_k: usize,
    /// `n x top_k` expert indices, most probable first (ties: lower index first).
    pub experts: Vec<u32>,
    /// `n x top_k` weights, in the same order.
    pub weights: Vec<f32>,
}

impl Routing {
    /// Tokens of the batch.
    pub fn tokens(&self) -> usize {
        self.experts.len() / self.top_k.max(1)
    }

    /// Token `t`'s `(expert, weight)` pairs in ascending expert order: the
    /// order their outputs are summed in.
    pub fn by_expert(&self, t: usize) -> Vec<(u32, f32)> {
        let k = self.top_k;
        let mut pairs: Vec<(u32, f32)> = self.experts[t * k..(t + 1) * k]
            .iter()
            .copied()
            .zip(self.weights[t * k..(t + 1) * k].iter().copied())
            .collect();
        pairs.sort_unstable_by_key(|p| p.0);
        pairs
    }

    /// For each expert (of `num_experts`), the tokens routed to it, ascending,
    /// with their weights.
    pub fn tokens_per_expert(&self, num_experts: usize) -> Vec<Vec<(usize, f32)>> {
        let mut per = vec![Vec::new(); num_experts];
        for t in 0..self.tokens() {
            for (e, w) in self.by_expert(t) {
                per[e as usize].push((t, w));
            }
        }
        per
    }
}

impl Router {
    pub fn num_experts(&self) -> usize {
        self.weight.out_dim()
    }

    /// Routes `n` tokens (`x`: `n x hidden`).
    pub fn route(&self, x: &[f32], n: usize) -> Routing {
        self.route_with(x, n, None)
    }

    /// Routes `n` tokens to experts chosen beforehand: `chosen(t)` names token
    /// `t`'s `top_k` distinct experts (a replayed routing trace, for measuring
    /// at scale a synthetic model whose own router is random). Their weights
    /// are this router's probabilities for them, as [`Router::route`] forms
    /// them (the same logits, softmax, order and renormalisation), so when
    /// `chosen` names the router's own top-k the routing is identical to
    /// [`Router::route`]'s, bit for bit.
    pub fn route_chosen(
        &self,
        x: &[f32],
        n: usize,
        chosen: &dyn Fn(usize) -> Vec<u32>,
    ) -> Result<Routing> {
        let e = self.num_experts();
        for t in 0..n {
            let set = chosen(t);
            let mut sorted = set.clone();
            sorted.sort_unstable();
            sorted.dedup();
            if set.len() != self.top_k
                || sorted.len() != set.len()
                || sorted.last().is_some_and(|&i| i as usize >= e)
            {
                return Err(Error::InvalidArgument(format!(
                    "token {t}: a replayed routing must name {} distinct experts below {e}, got {set:?}",
                    self.top_k
                )));
            }
        }
        Ok(self.route_with(x, n, Some(chosen)))
    }

    fn route_with(
        &self,
        x: &[f32],
        n: usize,
        chosen: Option<&dyn Fn(usize) -> Vec<u32>>,
    ) -> Routing {
        let e = self.num_experts();
        let k = self.top_k;
        let mut logits = vec![0.0f32; n * e];
        kernels::linear(&self.weight, x, n, &mut logits);
        let mut experts = Vec::with_capacity(n * k);
        let mut weights = Vec::with_capacity(n * k);
        let mut order: Vec<u32> = Vec::with_capacity(e);
        for (t, row) in logits.chunks_exact_mut(e).enumerate() {
            // softmax in f32 as torch computes it: exp(l - max) / sum.
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f32;
            for v in row.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            for v in row.iter_mut() {
                *v /= sum;
            }
            order.clear();
            match chosen {
                Some(f) => order.extend(f(t)),
                None => order.extend(0..e as u32),
            }
            // Largest first; equal probabilities keep the lower index first.
            order.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
            let top = &order[..k];
            let chosen_sum: f32 = top.iter().map(|&i| row[i as usize]).sum();
            for &i in top {
                experts.push(i);
                let p = row[i as usize];
                weights.push(if self.norm_topk_prob {
                    p / chosen_sum
                } else {
                    p
                });
            }
        }
        Routing {
            top_k: k,
            experts,
            weights,
        }
    }
}

/// Evaluates expert `e` on `m` gathered tokens: `(e, rows, m, out, fired)`
/// (see [`MoeFfn::combine`]).
pub type ExpertEval<'a> =
    dyn FnMut(usize, &[f32], usize, &mut [f32], Option<&mut Fired>) -> Result<()> + 'a;

/// A mixture-of-experts FFN with every weight in DRAM.
pub struct MoeFfn {
    pub router: Router,
    /// Each expert's gated FFN, in expert order (all the same width).
    pub experts: Vec<DenseFfn>,
    /// Qwen2-MoE: the shared expert and its gate (`[1, hidden]`).
    pub shared: Option<(DenseFfn, Linear)>,
}

impl MoeFfn {
    fn expert_width(&self) -> usize {
        self.experts.first().map_or(0, |e| e.width())
    }

    /// The mixture's output for `n` tokens routed by `routing`, each chosen
    /// expert evaluated by `expert(e, rows, m, out, fired)` on the `m` tokens
    /// routed to it (gathered, `m x hidden`): the one place the weighted sum is
    /// formed, whatever holds the experts' weights. `fired`, when given, gets
    /// each token's firing neurons as `expert * expert_width + neuron`.
    #[allow(clippy::too_many_arguments)]
    pub fn combine(
        routing: &Routing,
        num_experts: usize,
        expert_width: usize,
        hidden: usize,
        x: &[f32],
        out: &mut [f32],
        mut fired: Option<&mut Fired>,
        expert: &mut ExpertEval<'_>,
    ) -> Result<()> {
        let n = routing.tokens();
        out[..n * hidden].fill(0.0);
        if let Some(f) = fired.as_deref_mut() {
            f.width = num_experts * expert_width;
            f.per_token = vec![Vec::new(); n];
            f.routed = routing
                .experts
                .chunks_exact(routing.top_k)
                .map(<[u32]>::to_vec)
                .collect();
        }
        for (e, routed) in routing
            .tokens_per_expert(num_experts)
            .into_iter()
            .enumerate()
        {
            if routed.is_empty() {
                continue;
            }
            let m = routed.len();
            let mut rows = Vec::with_capacity(m * hidden);
            for &(t, _) in &routed {
                rows.extend_from_slice(&x[t * hidden..(t + 1) * hidden]);
            }
            let mut y = vec![0.0f32; m * hidden];
            let mut expert_fired = Fired::default();
            expert(
                e,
                &rows,
                m,
                &mut y,
                fired.is_some().then_some(&mut expert_fired),
            )?;
            for (j, &(t, w)) in routed.iter().enumerate() {
                // transformers: out[t] += y * w (index_add_ of the weighted rows).
                for (o, v) in out[t * hidden..(t + 1) * hidden]
                    .iter_mut()
                    .zip(&y[j * hidden..(j + 1) * hidden])
                {
                    *o += v * w;
                }
                if let Some(f) = fired.as_deref_mut() {
                    let base = (e * expert_width) as u32;
                    f.per_token[t].extend(expert_fired.per_token[j].iter().map(|&i| base + i));
                }
            }
        }
        // Experts were visited in ascending order, so each token's list is too.
        Ok(())
    }

    /// Adds the shared expert's output, times `sigmoid(gate . x)`, to `out`.
    pub fn add_shared(
        shared: &(DenseFfn, Linear),
        x: &[f32],
        n: usize,
        out: &mut [f32],
    ) -> Result<()> {
        let (ffn, gate) = shared;
        let hidden = ffn.hidden_size();
        let mut y = vec![0.0f32; n * hidden];
        ffn.forward(x, n, ActiveSet::All, &mut y, None)?;
        let mut g = vec![0.0f32; n];
        kernels::linear(gate, x, n, &mut g);
        for t in 0..n {
            let s = 1.0 / (1.0 + (-g[t]).exp());
            for (o, v) in out[t * hidden..(t + 1) * hidden]
                .iter_mut()
                .zip(&y[t * hidden..(t + 1) * hidden])
            {
                *o += s * v;
            }
        }
        Ok(())
    }
}

impl Ffn for MoeFfn {
    fn hidden_size(&self) -> usize {
        self.router.weight.in_dim()
    }

    /// The routed neurons: every expert's, numbered `expert * expert_width + i`.
    fn width(&self) -> usize {
        self.experts.len() * self.expert_width()
    }

    /// What one token reads: the router, its `top_k` experts and the shared
    /// expert with its gate.
    fn weight_bytes(&self) -> usize {
        let expert = self.experts.first().map_or(0, |e| e.weight_bytes());
        self.router.weight.size_bytes()
            + self.router.top_k * expert
            + self
                .shared
                .as_ref()
                .map_or(0, |(f, g)| f.weight_bytes() + g.size_bytes())
    }

    /// The chosen experts' `act(gate . x)` in their slots, 0 for the neurons
    /// of experts a token is not routed to.
    fn firing_activations(&self, x: &[f32], n: usize) -> Vec<f32> {
        let (hidden, width, ew) = (self.hidden_size(), self.width(), self.expert_width());
        let routing = self.router.route(x, n);
        let mut acts = vec![0.0f32; n * width];
        for t in 0..n {
            for (e, _) in routing.by_expert(t) {
                let e = e as usize;
                let a = self.experts[e].firing_activations(&x[t * hidden..(t + 1) * hidden], 1);
                acts[t * width + e * ew..t * width + (e + 1) * ew].copy_from_slice(&a);
            }
        }
        acts
    }

    fn forward(
        &self,
        x: &[f32],
        n: usize,
        active: ActiveSet<'_>,
        out: &mut [f32],
        fired: Option<&mut Fired>,
    ) -> Result<()> {
        if let ActiveSet::PerToken(_) = active {
            return Err(Error::InvalidArgument(
                "neuron sets within experts are not supported: a mixture-of-experts layer computes every neuron of its chosen experts".into(),
            ));
        }
        let routing = self.router.route(x, n);
        MoeFfn::combine(
            &routing,
            self.experts.len(),
            self.expert_width(),
            self.hidden_size(),
            x,
            out,
            fired,
            &mut |e, rows, m, y, f| self.experts[e].forward(rows, m, ActiveSet::All, y, f),
        )?;
        if let Some(shared) = &self.shared {
            MoeFfn::add_shared(shared, x, n, out)?;
        }
        Ok(())
    }
}

/// Each sparse layer's chosen experts, token by token, as the model runs (an
/// [`crate::runtime::Observer`]): routing statistics, replayed traces and the
/// tests that compare routing across modes all record it this way.
#[derive(Debug, Default, Clone)]
pub struct RoutingLog {
    /// Layer index to one list of chosen experts per token, in token order.
    pub layers: std::collections::BTreeMap<usize, Vec<Vec<u32>>>,
}

impl crate::runtime::Observer for RoutingLog {
    fn ffn(&mut self, layer: usize, _input: &[f32], _n: usize, fired: &Fired) {
        if !fired.routed.is_empty() {
            self.layers
                .entry(layer)
                .or_default()
                .extend(fired.routed.iter().cloned());
        }
    }
}
