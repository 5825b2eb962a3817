//! Causal multi-head attention with grouped-query heads over a KV cache, as
//! transformers' eager attention computes it: `softmax(q . k * scale) . v`.

use rayon::prelude::*;

use crate::runtime::kernels::{axpy, dot, softmax};

/// Keys and values of one layer for every position so far, row-major
/// `[position][kv_dim]` (post-RoPE keys). A sliding-window layer keeps only the
/// positions from `first` on (at least the rows its next query can see).
#[derive(Debug, Clone, Default)]
pub struct LayerKv {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    /// The absolute position of row 0 (0 unless a sliding window dropped rows).
    pub first: usize,
}

impl LayerKv {
    /// Keeps the rows of positions before `end` (dropping any after a failed
    /// pass), then appends `n` positions' keys and values.
    pub fn append(&mut self, end: usize, k: &[f32], v: &[f32], kv_dim: usize) {
        let keep = end.saturating_sub(self.first) * kv_dim;
        self.k.truncate(keep);
        self.v.truncate(keep);
        self.k.extend_from_slice(k);
        self.v.extend_from_slice(v);
    }

    /// Drops the positions a query at `next` or later cannot see through a
    /// window of `window` positions, once there are `window` of them: the
    /// layer holds fewer than `2 * window` positions (plus a batch's), and each
    /// row is moved once on average rather than once per token.
    pub fn slide(&mut self, next: usize, window: usize, kv_dim: usize) {
        let first = (next + 1).saturating_sub(window);
        if first >= self.first + window.max(1) {
            let drop = ((first - self.first) * kv_dim).min(self.k.len());
            self.k.drain(..drop);
            self.v.drain(..drop);
            self.first = first;
        }
    }
}

/// The KV cache of a whole model for one sequence.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub layers: Vec<LayerKv>,
    /// Positions held (the same in every layer once a forward pass completes).
    pub len: usize,
}

impl KvCache {
    pub fn new(num_layers: usize) -> KvCache {
        KvCache {
            layers: vec![LayerKv::default(); num_layers],
            len: 0,
        }
    }

    /// Forgets every position (keeps the allocations).
    pub fn clear(&mut self) {
        for l in &mut self.layers {
            l.k.clear();
            l.v.clear();
            l.first = 0;
        }
        self.len = 0;
    }

    /// Bytes held.
    pub fn size_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| (l.k.len() + l.v.len()) * 4)
            .sum()
    }
}

/// Head layout of one attention layer.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies `q . k` (1 where q was pre-scaled, as OPT does).
    pub score_scale: f32,
    /// Gemma-2: scores become `cap * tanh(score / cap)`.
    pub softcap: Option<f32>,
    /// A sliding window: a query at position `p` sees positions `p - w + 1 ..= p`.
    pub window: Option<usize>,
}

/// Attention for `n` queries at positions `start..start + n` (`q`: `n x
/// num_heads*head_dim`) against the cache, whose first `start + n` positions must
/// already hold this batch's keys and values. Returns `n x num_heads*head_dim`.
/// Parallel over (query, head) pairs; each output is one fixed-order reduction.
pub fn attend(q: &[f32], n: usize, start: usize, kv: &LayerKv, h: Heads) -> Vec<f32> {
    let (hd, q_dim) = (h.head_dim, h.num_heads * h.head_dim);
    let kv_dim = h.num_kv_heads * hd;
    let group = h.num_heads / h.num_kv_heads;
    let mut out = vec![0.0f32; n * q_dim];
    out.par_chunks_mut(hd)
        .with_min_len(4)
        .enumerate()
        .for_each(|(idx, o)| {
            let (t, head) = (idx / h.num_heads, idx % h.num_heads);
            let kvh = head / group;
            let qv = &q[t * q_dim + head * hd..t * q_dim + (head + 1) * hd];
            let visible = start + t + 1;
            // Rows of the cache: position p is row p - kv.first.
            let lo = h.window.map_or(0, |w| visible.saturating_sub(w)) - kv.first;
            let rows = lo..visible - kv.first;
            let mut scores: Vec<f32> = rows
                .clone()
                .map(|p| {
                    let k = &kv.k[p * kv_dim + kvh * hd..p * kv_dim + (kvh + 1) * hd];
                    let s = dot(qv, k) * h.score_scale;
                    match h.softcap {
                        Some(cap) => (s / cap).tanh() * cap,
                        None => s,
                    }
                })
                .collect();
            softmax(&mut scores);
            for (p, &w) in rows.zip(&scores) {
                axpy(
                    o,
                    w,
                    &kv.v[p * kv_dim + kvh * hd..p * kv_dim + (kvh + 1) * hd],
                );
            }
        });
    out
}
