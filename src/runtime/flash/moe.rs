//! Mixture-of-experts models from flash (issue 14 step 3): the router, the
//! shared expert and its gate stay in DRAM (the packed file's dense part);
//! each token's experts are chosen exactly from the resident router
//! ([`Router::route`], the function the in-DRAM model uses), and only the
//! chosen experts' bundles are read, with direct I/O, from their sections
//! (`ffn.<l>.expert.<e>`, spec 4.1).
//!
//! - `naive`: each chosen expert read whole for every token that chose it
//!   (one [`FlashFfn`] per expert read whole (naive): large chunk-aligned
//!   reads, every neuron computed).
//! - `flash`: one cache per sparse layer whose rows are keyed by (expert,
//!   neuron) (`expert * expert_width + neuron`): a chosen expert's resident
//!   neurons are hits, the missing ones are read (coalesced runs) into free
//!   rows, and when rows run out the experts chosen least recently are
//!   evicted (never one chosen in the current step); what still does not fit
//!   is computed straight from the read buffers, a batch of reads at a time,
//!   without a copy. `--window 0` keeps nothing between tokens.
//!
//! Every neuron of a chosen expert is computed (no neuron sparsity within
//! experts yet), summed in ascending neuron order with the expert's
//! [`ColumnAccumulator`], and the experts' outputs are weighted and summed by
//! [`MoeFfn::combine`], the in-DRAM model's own code: a decode step is
//! bit-identical to the packed model computed in DRAM (`--ffn dense`).
//!
//! Dense FFN layers of a MoE model (Qwen's `mlp_only_layers`) are read as a
//! [`FlashFfn`] whose every neuron is chosen: whole (naive) or through their
//! own cache (flash).
//!
//! # Budget policy (`--dram-budget`, decided by [`plan`])
//! What is always in DRAM: the dense part (router and shared experts
//! included), the KV cache, read buffers, fixed overhead, and per bundle set
//! its scratch rows (at most 64 per sparse layer; the dense-layer rule for
//! dense FFN layers). Beyond that, rows are *wanted* as follows: every dense
//! FFN layer whole (every token uses it) and, per sparse layer, the experts a
//! window of `W + 1` tokens can choose, `min(E, (W + 1) k)` experts of `N`
//! rows. With no budget the caches get what they want. Under a budget below
//! that, every set's rows shrink by the same factor (the rest goes through
//! scratch: more reads, the same output). Above it, the spare is split
//! equally among the sparse layers as more expert rows (up to all `E`
//! experts): a bigger LRU keeps more experts resident.
//!
//! With routing statistics in the file (`convert --calib`, spec 5.1) and a
//! sparse layer's rows too few for all its experts, a share of them
//! ([`FlashOptions::pin_experts_share`], default [`DEFAULT_PIN_SHARE`]) is
//! given to the layer's most often chosen experts, whole: read at open and
//! never evicted; the rest of the rows stay the LRU above.

//! # Replayed routing (measurements at scale)
//! A synthetic model of a real MoE's shape has a random router. Given a
//! routing trace as [`FlashOptions::replay`] (per sparse layer and token, the
//! `top_k` experts: [`expert_replay`] stretches a trained model's
//! [`routing_trace`] to the synthetic shape), each layer computes its
//! router's logits as always but sends each token to the replayed experts,
//! weighted by its router's probabilities for them
//! ([`Router::route_chosen`]); everything after routing is unchanged. A
//! replay of the router's own choices computes exactly what the model
//! computes without one. [`pin_hottest`] pins from counts the benchmark
//! supplies (the synthetic file has no routing statistics).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::format::layout::{BundlePart, Compression, FfnLayerEntry, DENSE_SECTION};
use crate::format::PackedFile;
use crate::input::config::Activation;
use crate::input::tensors::FfnNames;
use crate::runtime::ffn::{neuron_value, ActiveSet, DenseFfn, Ffn, Fired};
use crate::runtime::flash::cache::BundleCache;
use crate::runtime::flash::ffn::{FlashFfn, FlashStats, LayerSpec, LayerState, Workspace};
use crate::runtime::flash::io::{FlashReader, ReadOp, Staging};
use crate::runtime::flash::verify::ChunkVerifier;
use crate::runtime::flash::{
    plan, FlashOptions, FlashRuntime, MemoryPlan, Replay, FIXED_OVERHEAD_BYTES, NAIVE_READ_BYTES,
};
use crate::runtime::kernels::{dot_weights, ColumnAccumulator, Weights};
use crate::runtime::model::load_dense_ffn;
use crate::runtime::moe::{MoeFfn, Router};
use crate::runtime::packed::{packed_tokenizer, PackedWeights};
use crate::runtime::sparse::FfnMode;
use crate::runtime::weights::{load_linear, Linear};
use crate::runtime::{LoadedModel, Logits, Model, ModelSource};

/// Share of a sparse layer's rows pinned to its hottest experts when the
/// file has routing statistics (see the module documentation): all of them.
/// On the scale benchmark (128 experts, rows for 22 per layer at a 25%
/// budget, 81 at 50%) pinning every row gave more hits than half pinned and
/// half LRU (0.453 vs 0.402 at 25%, 0.815 vs 0.746 at 50%) and copies
/// nothing per token (misses are computed from the read buffers); on the
/// 8-expert fixture the share moved the hit rate by at most 2.5 points.
pub const DEFAULT_PIN_SHARE: f64 = 1.0;

/// Scratch rows of a sparse layer's cache (at most): enough for reads of
/// 256 KiB reads of bundles of 4 KiB and more. (Unused by the experts since
/// what does not fit is computed from the read buffers; still in the plan.)
const MOE_SCRATCH_ROWS: usize = 64;

/// Counters of a mixture-of-experts run (relaxed atomics: statistics only).
#[derive(Debug, Default)]
pub struct MoeStats {
    /// (layer, token) evaluations over every layer, dense ones included.
    pub layer_tokens: AtomicU64,
    /// (expert, token) pairs the router chose.
    pub chosen: AtomicU64,
    /// (expert, token) evaluations that read at least one bundle from disk.
    pub read: AtomicU64,
    /// Time choosing experts (router logits, softmax, top-k).
    pub ns_routing: AtomicU64,
}

/// The experts' part of a run's report (`flash.experts` in `--json`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExpertsReport {
    /// Experts the router chose per token, summed over the sparse layers.
    pub chosen_per_token: f64,
    /// Of those, experts that needed at least one bundle read from disk
    /// (naive: all of them; flash: those not wholly resident).
    pub read_per_token: f64,
    /// Time spent routing, over the run.
    pub routing_ms: f64,
    /// Per layer: rows of its cache (sparse layers: (expert, neuron) rows
    /// shared by its experts; dense layers: neurons).
    pub capacity_rows_per_layer: Vec<usize>,
    /// Per sparse layer (in layer order): experts wholly resident now.
    pub resident_experts_per_layer: Vec<usize>,
}

/// What [`FlashRuntime`] keeps of a mixture-of-experts run.
pub struct MoeRuntime {
    pub stats: Arc<MoeStats>,
    /// The sparse layers' FFNs, in layer order.
    pub layers: Vec<Arc<FlashMoe>>,
    /// Rows of each layer's cache.
    pub capacity_per_layer: Vec<usize>,
}

impl MoeRuntime {
    pub fn report(&self) -> ExpertsReport {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let s = &self.stats;
        let layers = self.capacity_per_layer.len().max(1) as u64;
        let tokens = (get(&s.layer_tokens) / layers).max(1) as f64;
        ExpertsReport {
            chosen_per_token: get(&s.chosen) as f64 / tokens,
            read_per_token: get(&s.read) as f64 / tokens,
            routing_ms: get(&s.ns_routing) as f64 / 1e6,
            capacity_rows_per_layer: self.capacity_per_layer.clone(),
            resident_experts_per_layer: self.layers.iter().map(|l| l.resident_experts()).collect(),
        }
    }

    /// Neurons resident in each sparse layer's cache now (layer, rows).
    pub fn resident(&self) -> Vec<(usize, usize)> {
        self.layers
            .iter()
            .map(|l| (l.layer, l.lock_state().cache.used()))
            .collect()
    }
}

fn add_ns(c: &AtomicU64, since: Instant) -> Instant {
    let now = Instant::now();
    c.fetch_add((now - since).as_nanos() as u64, Ordering::Relaxed);
    now
}

/// One expert's bundles on disk.
pub struct ExpertBundles {
    pub spec: LayerSpec,
    /// First-use chunk checks of its section (`None` with `--no-verify-reads`).
    pub verifier: Option<ChunkVerifier>,
}

/// Buffers the flash experts of every layer share (layers run one after
/// another).
pub struct MoeWork {
    staging: Staging,
    acc: ColumnAccumulator,
    missing: Vec<u32>,
    ops: Vec<ReadOp>,
    op_ranges: Vec<(usize, usize)>,
    wanted: Vec<(u64, u64)>,
}

impl MoeWork {
    fn new(hidden: usize, expert_width: usize, staging: Staging) -> MoeWork {
        MoeWork {
            acc: ColumnAccumulator::new(hidden, expert_width),
            missing: Vec::with_capacity(expert_width),
            ops: Vec::with_capacity(staging.slots),
            op_ranges: Vec::with_capacity(staging.slots),
            wanted: Vec::with_capacity(staging.slots),
            staging,
        }
    }
}

/// A sparse layer's (expert, neuron) cache.
struct MoeState {
    cache: BundleCache,
    /// Step (from 1) at which each expert was last chosen; 0: never.
    last_used: Vec<u64>,
    /// Resident rows of each expert.
    resident: Vec<usize>,
    /// Experts pinned at open (never evicted).
    pinned: Vec<bool>,
    /// Forward calls so far (a decode token, or a prefill batch).
    step: u64,
}

/// How a sparse layer gets its experts.
enum ExpertMode {
    /// Each chosen expert read whole per token.
    Naive(Vec<Arc<FlashFfn>>),
    /// Through the layer's (expert, neuron) cache.
    Flash {
        work: Arc<Mutex<MoeWork>>,
        state: Mutex<MoeState>,
        /// `--window 0`: nothing kept between steps.
        keep: bool,
    },
}

/// One sparse layer's mixture of experts with its experts on disk.
pub struct FlashMoe {
    pub layer: usize,
    pub router: Router,
    pub shared: Option<(DenseFfn, Linear)>,
    pub activation: Activation,
    pub experts: Vec<ExpertBundles>,
    hidden: usize,
    expert_width: usize,
    mode: ExpertMode,
    reader: Arc<FlashReader>,
    stats: Arc<FlashStats>,
    moe_stats: Arc<MoeStats>,
    /// A replayed routing trace and this layer's index among the sparse
    /// layers: the experts each token goes to (see [`expert_replay`]).
    replay: Option<(Arc<Replay>, usize)>,
    /// Tokens routed so far (the replay's position).
    evaluations: AtomicU64,
}

impl FlashMoe {
    fn lock_state(&self) -> std::sync::MutexGuard<'_, MoeState> {
        match &self.mode {
            ExpertMode::Flash { state, .. } => state.lock().unwrap_or_else(|e| e.into_inner()),
            ExpertMode::Naive(_) => unreachable!("naive layers have no cache"),
        }
    }

    /// Experts wholly resident in the cache now (0 in naive mode).
    pub fn resident_experts(&self) -> usize {
        match &self.mode {
            ExpertMode::Naive(_) => 0,
            ExpertMode::Flash { state, .. } => {
                let st = state.lock().unwrap_or_else(|e| e.into_inner());
                st.resident
                    .iter()
                    .filter(|&&r| r == self.expert_width)
                    .count()
            }
        }
    }

    /// Rows resident now.
    pub fn resident_rows(&self) -> usize {
        match &self.mode {
            ExpertMode::Naive(_) => 0,
            ExpertMode::Flash { .. } => self.lock_state().cache.used(),
        }
    }

    /// Reads experts `hot` whole into the cache and keeps them for the run
    /// (before any token; experts that do not fit are left out).
    pub fn pin_experts(&self, hot: &[usize]) -> Result<usize> {
        let ExpertMode::Flash { work, state, .. } = &self.mode else {
            return Ok(0);
        };
        let mut work = work.lock().unwrap_or_else(|e| e.into_inner());
        let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
        let n = self.expert_width;
        let mut pinned = 0;
        for &e in hot {
            if st.cache.free() < n || st.pinned[e] {
                continue;
            }
            let keys: Vec<u32> = (0..n).map(|i| (e * n + i) as u32).collect();
            for &k in &keys {
                st.cache.insert(k);
            }
            st.resident[e] = n;
            st.pinned[e] = true;
            self.read_into_rows(&mut work, &mut st.cache, e, &keys)?;
            pinned += 1;
        }
        st.cache.pin_all();
        Ok(pinned)
    }

    /// The read covering wanted bytes `start..end` of expert `e`: widened to
    /// whole chunks not yet verified, rounded out to the alignment.
    fn read_for(&self, e: usize, start: u64, end: u64) -> ReadOp {
        match &self.experts[e].verifier {
            Some(v) => self
                .reader
                .round_out(v.widen_start(start), v.widen_end(end)),
            None => self.reader.round_out(start, end),
        }
    }

    /// Reads the bundles of `keys` (ascending, all of expert `e`, each with a
    /// row in the cache) into their rows, checking unverified chunks first.
    fn read_into_rows(
        &self,
        work: &mut MoeWork,
        cache: &mut BundleCache,
        e: usize,
        keys: &[u32],
    ) -> Result<()> {
        let stride = self.experts[e].spec.stride;
        let mut i = 0;
        while i < keys.len() {
            let n = self.stage(work, e, &keys[i..])?;
            let t0 = Instant::now();
            for k in 0..work.ops.len() {
                let (a, b) = work.op_ranges[k];
                for key in &keys[i + a..i + b] {
                    let from = self.staged_at(work, e, k, *key);
                    let row = cache.row_of(*key).expect("rows assigned before reading");
                    cache
                        .row_mut(row)
                        .copy_from_slice(&work.staging.slot(k)[from..from + stride]);
                }
            }
            add_ns(&self.stats.ns_memory, t0);
            i += n;
        }
        Ok(())
    }

    /// Where `key`'s bundle starts in read buffer `k` after [`Self::stage`].
    fn staged_at(&self, work: &MoeWork, e: usize, k: usize, key: u32) -> usize {
        let spec = &self.experts[e].spec;
        let at = spec.offset + (key as usize - e * self.expert_width) as u64 * spec.stride as u64;
        (at - work.ops[k].offset) as usize
    }

    /// Reads the bundles of the first of `keys` (ascending, all of expert
    /// `e`) that one batch of reads holds into the read buffers, checking
    /// unverified chunks first: consecutive neurons in one read, as many as a
    /// buffer holds. Returns how many keys were read; read `k` holds keys
    /// `op_ranges[k]` (indices into `keys`).
    fn stage(&self, work: &mut MoeWork, e: usize, keys: &[u32]) -> Result<usize> {
        let spec = &self.experts[e].spec;
        let n = self.expert_width as u32;
        let base = e as u32 * n;
        let stride = spec.stride as u64;
        let at = |k: u32| spec.offset + (k - base) as u64 * stride;
        let MoeWork {
            staging,
            ops,
            op_ranges,
            wanted,
            ..
        } = work;
        let t0 = Instant::now();
        ops.clear();
        op_ranges.clear();
        wanted.clear();
        let mut i = 0;
        while ops.len() < staging.slots && i < keys.len() {
            let start = at(keys[i]);
            let mut j = i + 1;
            // Consecutive neurons, as many as one read buffer holds.
            while j < keys.len()
                && keys[j] == keys[j - 1] + 1
                && self.read_for(e, start, at(keys[j]) + stride).len <= staging.slot_bytes
            {
                j += 1;
            }
            let end = at(keys[j - 1]) + stride;
            ops.push(self.read_for(e, start, end));
            op_ranges.push((i, j));
            wanted.push((start, end));
            i = j;
        }
        let t1 = add_ns(&self.stats.ns_memory, t0);
        if let Some(op) = ops.iter().find(|op| op.len > staging.slot_bytes) {
            return Err(Error::InvalidArgument(format!(
                "layer {}: a read of {} bytes does not fit the {}-byte read buffer",
                self.layer, op.len, staging.slot_bytes
            )));
        }
        let r = match &self.experts[e].verifier {
            None => self.reader.read_batch(staging, ops),
            Some(v) => {
                let counters = &self.stats.verify;
                let extra: usize = ops
                    .iter()
                    .zip(wanted.iter())
                    .map(|(op, &(s, e))| op.len - self.reader.round_out(s, e).len)
                    .sum();
                counters
                    .extra_read_bytes
                    .fetch_add(extra as u64, Ordering::Relaxed);
                let (ops, wanted) = (&*ops, &*wanted);
                self.reader.read_batch_checked(staging, ops, &|k, data| {
                    let (s, e) = wanted[k];
                    v.check(&ops[k], data, s, e, counters)
                })
            }
        };
        r.map_err(|err| err.in_layer(self.layer))?;
        add_ns(&self.stats.ns_io, t1);
        self.stats.loaded.fetch_add(i as u64, Ordering::Relaxed);
        Ok(i)
    }

    /// Part `k` of a bundle as weights.
    fn part<'b>(&self, spec: &LayerSpec, bundle: &'b [u8], k: usize) -> Result<Weights<'b>> {
        let len = spec.hidden * spec.dtype.size_bytes();
        Weights::from_le_bytes(spec.dtype, &bundle[k * len..(k + 1) * len]).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "layer {}: bundle bytes not aligned to their dtype",
                self.layer
            ))
        })
    }

    /// Adds expert `e`'s neurons `keys` (ascending, each with a row) to the sum.
    fn compute(
        &self,
        acc: &mut ColumnAccumulator,
        cache: &BundleCache,
        e: usize,
        keys: &[u32],
        x: &[f32],
        fired: Option<&mut Vec<u32>>,
    ) -> Result<()> {
        self.compute_from(acc, e, keys, x, fired, &|key| {
            cache.row(cache.row_of(key).expect("chosen neurons are in DRAM"))
        })
    }

    /// Adds expert `e`'s neurons `keys` (ascending) to the sum, each bundle
    /// where `bundle` finds it (a cache row, or a read buffer).
    fn compute_from<'b>(
        &self,
        acc: &mut ColumnAccumulator,
        e: usize,
        keys: &[u32],
        x: &[f32],
        mut fired: Option<&mut Vec<u32>>,
        bundle: &dyn Fn(u32) -> &'b [u8],
    ) -> Result<()> {
        let t0 = Instant::now();
        let spec = &self.experts[e].spec;
        let base = (e * self.expert_width) as u32;
        let gate_k = spec.parts.iter().position(|p| *p == BundlePart::Gate);
        let up_k = spec
            .parts
            .iter()
            .position(|p| *p == BundlePart::Up)
            .unwrap_or(0);
        let down_k = spec.parts.len() - 1;
        for &key in keys {
            let i = key - base;
            let bundle = bundle(key);
            let u = dot_weights(self.part(spec, bundle, up_k)?, x);
            let g = match gate_k {
                Some(k) => Some(dot_weights(self.part(spec, bundle, k)?, x)),
                None => None,
            };
            let v = neuron_value(self.activation, g, u);
            if v != 0.0 {
                acc.add(i as usize, v, self.part(spec, bundle, down_k)?, 0, 1);
                if let Some(f) = fired.as_deref_mut() {
                    f.push(i);
                }
            }
        }
        add_ns(&self.stats.ns_compute, t0);
        Ok(())
    }

    /// Expert `e` on one token through the cache; returns whether it read
    /// anything from disk.
    fn flash_expert(
        &self,
        work: &mut MoeWork,
        st: &mut MoeState,
        e: usize,
        x: &[f32],
        out: &mut [f32],
        mut fired: Option<&mut Vec<u32>>,
    ) -> Result<bool> {
        let t0 = Instant::now();
        let n = self.expert_width;
        let base = (e * n) as u32;
        st.last_used[e] = st.step;
        let mut missing = std::mem::take(&mut work.missing);
        missing.clear();
        missing.extend((base..base + n as u32).filter(|&k| st.cache.row_of(k).is_none()));
        let hits = n - missing.len();
        // Room: the experts chosen least recently leave first, whole; never
        // one chosen in this step, never a pinned one.
        let mut evicted = 0;
        while missing.len() > st.cache.free() {
            let victim = (0..st.resident.len())
                .filter(|&v| st.resident[v] > 0 && st.last_used[v] < st.step && !st.pinned[v])
                .min_by_key(|&v| (st.last_used[v], v));
            let Some(v) = victim else { break };
            let (lo, hi) = ((v * n) as u32, ((v + 1) * n) as u32);
            evicted += st.cache.retain(|k| k < lo || k >= hi);
            st.resident[v] = 0;
        }
        let fit = missing.len().min(st.cache.free());
        for &k in &missing[..fit] {
            st.cache.insert(k);
        }
        st.resident[e] += fit;
        add_ns(&self.stats.ns_memory, t0);
        let result = (|| {
            self.read_into_rows(work, &mut st.cache, e, &missing[..fit])?;
            let mut acc = std::mem::replace(&mut work.acc, ColumnAccumulator::new(0, 0));
            acc.clear();
            // The rest is computed straight from the read buffers, a batch
            // of reads at a time (nothing copied: these bundles are not
            // kept); the sum still visits neurons in ascending order.
            let mut done = base;
            let mut rest = &missing[fit..];
            let streamed = (|| {
                while !rest.is_empty() {
                    let got = self.stage(work, e, rest)?;
                    let (piece, tail) = rest.split_at(got);
                    let last = *piece.last().expect("a batch reads at least one bundle");
                    let keys: Vec<u32> = (done..=last).collect();
                    let (cache, w) = (&st.cache, &*work);
                    let stride = self.experts[e].spec.stride;
                    self.compute_from(&mut acc, e, &keys, x, fired.as_deref_mut(), &|key| {
                        if let Some(row) = cache.row_of(key) {
                            return cache.row(row);
                        }
                        let p = piece.partition_point(|&k| k < key);
                        let k = w.op_ranges.partition_point(|&(_, b)| b <= p);
                        let from = self.staged_at(w, e, k, key);
                        &w.staging.slot(k)[from..from + stride]
                    })?;
                    done = last + 1;
                    rest = tail;
                }
                let keys: Vec<u32> = (done..base + n as u32).collect();
                self.compute(&mut acc, &st.cache, e, &keys, x, fired.as_deref_mut())?;
                acc.finish(None, out);
                Ok(())
            })();
            work.acc = acc;
            streamed
        })();
        let s = &self.stats;
        s.overflow
            .fetch_add((missing.len() - fit) as u64, Ordering::Relaxed);
        s.needed.fetch_add(n as u64, Ordering::Relaxed);
        s.hits.fetch_add(hits as u64, Ordering::Relaxed);
        s.evicted.fetch_add(evicted as u64, Ordering::Relaxed);
        s.neurons.record(1, n as u64, n as u64);
        let read = !missing.is_empty();
        if result.is_err() {
            // Rows inserted for this token may not have been filled: forget
            // everything not pinned rather than compute from them later.
            st.cache.clear_scratch(st.cache.scratch_rows());
            st.cache.retain(|_| false);
            for (r, p) in st.resident.iter_mut().zip(&st.pinned) {
                if !p {
                    *r = 0;
                }
            }
        }
        work.missing = missing;
        result.map(|()| read)
    }
}

impl Ffn for FlashMoe {
    fn hidden_size(&self) -> usize {
        self.hidden
    }

    /// The routed neurons: every expert's, numbered `expert * expert_width + i`.
    fn width(&self) -> usize {
        self.experts.len() * self.expert_width
    }

    /// What one token reads: its `top_k` experts.
    fn weight_bytes(&self) -> usize {
        self.router.top_k * self.expert_width * self.experts.first().map_or(0, |e| e.spec.stride)
    }

    fn firing_activations(&self, _x: &[f32], n: usize) -> Vec<f32> {
        // Not on any path of the disk modes (oracle modes refuse MoE files).
        vec![0.0; n * self.width()]
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
        let ms = &self.moe_stats;
        let t0 = Instant::now();
        let routing = match &self.replay {
            Some((replay, l)) => {
                let first = self.evaluations.fetch_add(n as u64, Ordering::Relaxed);
                self.router
                    .route_chosen(x, n, &|t| replay.set(*l, first + t as u64).to_vec())?
            }
            None => self.router.route(x, n),
        };
        add_ns(&ms.ns_routing, t0);
        ms.layer_tokens.fetch_add(n as u64, Ordering::Relaxed);
        ms.chosen
            .fetch_add(routing.experts.len() as u64, Ordering::Relaxed);
        let (h, width) = (self.hidden, self.expert_width);
        match &self.mode {
            ExpertMode::Naive(ffns) => MoeFfn::combine(
                &routing,
                self.experts.len(),
                width,
                h,
                x,
                out,
                fired,
                &mut |e, rows, m, y, f| {
                    ms.read.fetch_add(m as u64, Ordering::Relaxed);
                    ffns[e].forward(rows, m, ActiveSet::All, y, f)
                },
            )?,
            ExpertMode::Flash { work, state, keep } => {
                let mut work = work.lock().unwrap_or_else(|e| e.into_inner());
                let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
                st.step += 1;
                if !keep {
                    let evicted = st.cache.retain(|_| false);
                    self.stats
                        .evicted
                        .fetch_add(evicted as u64, Ordering::Relaxed);
                    let MoeState {
                        resident, pinned, ..
                    } = &mut *st;
                    for (r, p) in resident.iter_mut().zip(pinned.iter()) {
                        if !p {
                            *r = 0;
                        }
                    }
                }
                MoeFfn::combine(
                    &routing,
                    self.experts.len(),
                    width,
                    h,
                    x,
                    out,
                    fired,
                    &mut |e, rows, m, y, mut f| {
                        if let Some(f) = f.as_deref_mut() {
                            f.width = width;
                            f.per_token = vec![Vec::new(); m];
                        }
                        for j in 0..m {
                            let read = self.flash_expert(
                                &mut work,
                                &mut st,
                                e,
                                &rows[j * h..(j + 1) * h],
                                &mut y[j * h..(j + 1) * h],
                                f.as_deref_mut().map(|f| &mut f.per_token[j]),
                            )?;
                            if read {
                                ms.read.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Ok(())
                    },
                )?
            }
        }
        if let Some(shared) = &self.shared {
            let t0 = Instant::now();
            MoeFfn::add_shared(shared, x, n, out)?;
            add_ns(&self.stats.ns_compute, t0);
        }
        Ok(())
    }
}

/// A dense FFN layer of a MoE model: every neuron chosen, read whole (naive)
/// or through the layer's own cache (flash).
struct DenseLayer {
    ffn: Arc<FlashFfn>,
    /// Each token's neurons (all of them), when the experts are cached (flash).
    all: Vec<u32>,
    moe_stats: Arc<MoeStats>,
}

impl Ffn for DenseLayer {
    fn hidden_size(&self) -> usize {
        self.ffn.hidden_size()
    }
    fn width(&self) -> usize {
        self.ffn.width()
    }
    fn weight_bytes(&self) -> usize {
        self.ffn.weight_bytes()
    }
    fn firing_activations(&self, x: &[f32], n: usize) -> Vec<f32> {
        self.ffn.firing_activations(x, n)
    }
    fn forward(
        &self,
        x: &[f32],
        n: usize,
        _active: ActiveSet<'_>,
        out: &mut [f32],
        fired: Option<&mut Fired>,
    ) -> Result<()> {
        self.moe_stats
            .layer_tokens
            .fetch_add(n as u64, Ordering::Relaxed);
        match self.ffn.window {
            None => self.ffn.forward(x, n, ActiveSet::All, out, fired),
            Some(_) => {
                let sets = vec![self.all.clone(); n];
                self.ffn
                    .forward(x, n, ActiveSet::PerToken(&sets), out, fired)
            }
        }
    }
}

/// A bundle set's layout from its manifest entry, refusing what flash reads
/// cannot take (compressed sections, block-quantized bundles).
fn spec_of(file: &PackedFile, entry: &FfnLayerEntry) -> Result<LayerSpec> {
    let path = &file.path;
    let section = file
        .section(&entry.section)
        .ok_or_else(|| Error::InvalidArgument(format!("no section {}", entry.section)))?;
    if section.compression != Compression::None {
        return Err(Error::InvalidArgument(format!(
            "{}: section {} is compressed; flash reads need uncompressed FFN sections",
            path.display(),
            entry.section
        )));
    }
    let dtype: DType = entry.dtype.weight().ok_or_else(|| {
        Error::InvalidArgument(format!(
            "{}: the FFN bundles are {} (format section 9), which the flash modes do not read yet; use the dense mode",
            path.display(),
            entry.dtype.name()
        ))
    })?;
    Ok(LayerSpec {
        layer: entry.layer as usize,
        offset: section.offset,
        neurons: entry.neurons as usize,
        hidden: entry.hidden as usize,
        dtype,
        parts: entry.parts.clone(),
        stride: entry.bundle_bytes as usize,
        chunk_bytes: section.chunk_raw_bytes as usize,
    })
}

fn verifier_for(
    file: &PackedFile,
    entry: &FfnLayerEntry,
    on: bool,
) -> Result<Option<ChunkVerifier>> {
    if !on {
        return Ok(None);
    }
    let section = file
        .section(&entry.section)
        .ok_or_else(|| Error::InvalidArgument(format!("no section {}", entry.section)))?;
    Ok(Some(ChunkVerifier::new(&file.path, section)?))
}

/// Opens a packed mixture-of-experts file for `naive` or `flash` (see the
/// module documentation for the budget policy).
pub fn open_flash_moe(
    file: PackedFile,
    opts: &FlashOptions,
) -> Result<(LoadedModel, FlashRuntime)> {
    let path = file.path.clone();
    let cfg = &file.config;
    let moe = cfg
        .moe
        .as_ref()
        .expect("open_flash_moe is called for MoE files");
    if opts.mode == FfnMode::OracleFlash {
        return Err(Error::InvalidOption {
            option: "ffn",
            problem: format!(
                "oracle-flash does not read experts, and {} is a mixture-of-experts model; use naive or flash",
                cfg.architecture.hf_name()
            ),
        });
    }
    let m = &file.manifest;
    let align = (m.alignment as usize).max(512);
    let layers = cfg.num_layers;
    let hidden = cfg.hidden_size;
    let (num_experts, top_k, ew) = (moe.num_experts, moe.top_k, moe.expert_width);
    // A replay of a MoE model is a routing trace: per sparse layer and token,
    // the experts chosen (measurements at scale, see [`expert_replay`]).
    let sparse_layers = (0..layers)
        .filter(|&l| moe.sparse_layers.get(l).copied().unwrap_or(false))
        .count();
    if let Some(r) = &opts.replay {
        let sizes_ok =
            (0..r.layers()).all(|l| (0..r.tokens() as u64).all(|t| r.set(l, t).len() == top_k));
        if r.width() != num_experts || r.layers() != sparse_layers || !sizes_ok {
            return Err(Error::InvalidArgument(format!(
                "a replay of a mixture-of-experts model is a routing trace: {sparse_layers} sparse layers of {top_k} experts of {num_experts} per token; this one has {} layers, width {}",
                r.layers(),
                r.width()
            )));
        }
    }

    // Bundle sets: dense layers by layer, experts by (layer, expert).
    let mut dense_specs: Vec<Option<(LayerSpec, FfnLayerEntry)>> = vec![None; layers];
    for entry in &m.ffn_layers {
        let l = entry.layer as usize;
        if l < layers {
            dense_specs[l] = Some((spec_of(&file, entry)?, entry.clone()));
        }
    }
    let mut expert_specs: Vec<Vec<(LayerSpec, FfnLayerEntry)>> = vec![Vec::new(); layers];
    for entry in &m.experts {
        let b = entry.bundles();
        let l = entry.layer as usize;
        if l < layers {
            expert_specs[l].push((spec_of(&file, &b)?, b));
        }
    }
    for l in 0..layers {
        let ok = if moe.sparse_layers.get(l).copied().unwrap_or(false) {
            expert_specs[l].len() == num_experts
        } else {
            dense_specs[l].is_some()
        };
        if !ok {
            return Err(Error::InvalidArgument(format!(
                "{}: layer {l}'s FFN bundles are not all in the manifest",
                path.display()
            )));
        }
    }
    let stride_max = dense_specs
        .iter()
        .flatten()
        .map(|s| s.0.stride)
        .chain(expert_specs.iter().flatten().map(|s| s.0.stride))
        .max()
        .unwrap_or(0);
    let round = |b: usize| b.div_ceil(align) * align;
    // Reads of up to 1 MiB in both modes: what flash reads of an expert is
    // mostly the whole expert or long runs of it (an expert evicted whole
    // comes back whole), and on this class of disk 1 MiB reads move more
    // bytes per second than 256 KiB ones (BENCHMARKS.md, MoE at scale).
    let slot_bytes = round(NAIVE_READ_BYTES.max(stride_max)) + align;
    let slots = opts.io_threads.max(1);

    let mut plan = MemoryPlan {
        fixed_overhead: FIXED_OVERHEAD_BYTES,
        ..MemoryPlan::default()
    };
    for t in &m.tensors {
        if t.section == DENSE_SECTION {
            let numel: u64 = t.shape.iter().product();
            plan.dense += if t.shape.len() == 1 {
                numel * 4
            } else {
                t.length
            };
        }
    }
    let kv_dim = cfg.num_kv_heads * cfg.head_dim;
    plan.kv_cache = (layers * 2 * opts.context.min(cfg.max_context) * kv_dim * 4) as u64;
    let has_dense = dense_specs.iter().any(Option::is_some);
    let has_sparse = expert_specs.iter().any(|e| !e.is_empty());
    // Read buffers and accumulators: one set for the dense layers, one for
    // the experts (their widths differ).
    let buffers = |neurons: usize| (slots * slot_bytes + 32 * hidden * 4 + neurons * 16) as u64;
    plan.staging = if has_dense { buffers(cfg.ffn_width) } else { 0 }
        + if has_sparse { buffers(ew) } else { 0 };

    // Rows each bundle set wants (see the module's budget policy).
    let experts_wanted = if opts.window == 0 {
        top_k
    } else {
        ((opts.window + 1) * top_k).min(num_experts)
    };
    let sets: Vec<plan::BundleSet> = (0..layers)
        .map(|l| match &dense_specs[l] {
            Some((spec, _)) => plan::BundleSet {
                kind: plan::SetKind::MoeDense,
                stride: spec.stride,
                keys: spec.neurons,
                want: spec.neurons,
            },
            None => plan::BundleSet {
                kind: plan::SetKind::Experts {
                    scratch: MOE_SCRATCH_ROWS.min(ew),
                },
                stride: expert_specs[l][0].0.stride,
                keys: num_experts * ew,
                want: experts_wanted * ew,
            },
        })
        .collect();
    let flash = opts.mode == FfnMode::Flash;
    plan = plan::plan(&plan::PlanRequest {
        resident: plan,
        sets,
        caching: flash,
        budget: opts.dram_budget,
        capacity: opts.capacity,
        mode: opts.mode.name(),
    })?;
    let fixed = plan.dense + plan.kv_cache + plan.staging + plan.fixed_overhead;
    let want = plan.capacity_per_layer.clone();
    let scratch = plan.scratch_per_layer.clone();

    let first_offset = dense_specs
        .iter()
        .flatten()
        .map(|s| s.0.offset)
        .chain(expert_specs.iter().flatten().map(|s| s.0.offset))
        .min()
        .unwrap_or(0);
    let probe = first_offset / align as u64 * align as u64;
    let reader = Arc::new(FlashReader::open(&path, align, probe, opts.io_threads)?);
    let stats = Arc::new(FlashStats::default());
    let moe_stats = Arc::new(MoeStats::default());
    let window = (opts.mode != FfnMode::Naive).then_some(opts.window);
    let dense_ws = if has_dense {
        Some(Arc::new(Mutex::new(Workspace::new(
            hidden,
            cfg.ffn_width,
            0,
            slots,
            slot_bytes,
            align,
        )?)))
    } else {
        None
    };
    // Naive experts use FlashFfn's workspace; flash experts the MoE one.
    let expert_ws = if has_sparse && !flash {
        Some(Arc::new(Mutex::new(Workspace::new(
            hidden, ew, 0, slots, slot_bytes, align,
        )?)))
    } else {
        None
    };
    let moe_work = if has_sparse && flash {
        Some(Arc::new(Mutex::new(MoeWork::new(
            hidden,
            ew,
            Staging::new(slots, slot_bytes, align)?,
        ))))
    } else {
        None
    };
    let weights = PackedWeights::read_dense(&file)?;
    let mut ffns: Vec<Arc<FlashFfn>> = Vec::new();
    let mut moe_layers: Vec<Arc<FlashMoe>> = Vec::new();
    let mut caches_bytes = 0u64;
    let verify = opts.verify_reads;
    let new_flash_ffn = |spec: LayerSpec,
                         entry: &FfnLayerEntry,
                         ws: &Arc<Mutex<Workspace>>,
                         rows: usize,
                         sc: usize|
     -> Result<Arc<FlashFfn>> {
        let cache = BundleCache::new(spec.neurons, spec.stride, rows, sc)?;
        let neurons = spec.neurons;
        Ok(Arc::new(FlashFfn {
            spec,
            activation: cfg.activation,
            gate_bias: None,
            up_bias: None,
            down_bias: None,
            predictor: None,
            lowbit: None,
            oracle: None,
            replay: None,
            window,
            coalesce_gap: opts.coalesce_gap,
            reader: Arc::clone(&reader),
            workspace: Arc::clone(ws),
            state: Mutex::new(LayerState::new(cache, neurons)),
            stats: Arc::clone(&stats),
            verifier: verifier_for(&file, entry, verify)?,
        }))
    };
    let model = Model::load_with_ffn(cfg, &file.names, &weights, &mut |i, names| match names {
        FfnNames::Moe(names) => {
            let shared = match (&names.shared, &names.shared_gate) {
                (Some(f), Some(g)) => {
                    Some((load_dense_ffn(cfg, f, &weights)?, load_linear(&weights, g)?))
                }
                _ => None,
            };
            let router = Router {
                weight: load_linear(&weights, &names.router)?,
                top_k,
                norm_topk_prob: moe.norm_topk_prob,
            };
            let mut experts = Vec::with_capacity(num_experts);
            let mut naive = Vec::new();
            for (spec, entry) in &expert_specs[i] {
                if let Some(ws) = &expert_ws {
                    naive.push(new_flash_ffn(spec.clone(), entry, ws, 0, 0)?);
                }
                experts.push(ExpertBundles {
                    spec: spec.clone(),
                    verifier: verifier_for(&file, entry, verify)?,
                });
            }
            let mode = match &moe_work {
                Some(work) => {
                    let cache = BundleCache::new(
                        num_experts * ew,
                        expert_specs[i][0].0.stride,
                        want[i],
                        scratch[i],
                    )?;
                    caches_bytes += cache.size_bytes() as u64;
                    ExpertMode::Flash {
                        work: Arc::clone(work),
                        state: Mutex::new(MoeState {
                            cache,
                            last_used: vec![0; num_experts],
                            resident: vec![0; num_experts],
                            pinned: vec![false; num_experts],
                            step: 0,
                        }),
                        keep: opts.window > 0,
                    }
                }
                None => ExpertMode::Naive(naive),
            };
            let layer = Arc::new(FlashMoe {
                layer: i,
                router,
                shared,
                activation: cfg.activation,
                experts,
                hidden,
                expert_width: ew,
                mode,
                reader: Arc::clone(&reader),
                stats: Arc::clone(&stats),
                moe_stats: Arc::clone(&moe_stats),
                replay: opts
                    .replay
                    .as_ref()
                    .map(|r| (Arc::clone(r), moe_layers.len())),
                evaluations: AtomicU64::new(0),
            });
            moe_layers.push(Arc::clone(&layer));
            Ok(Box::new(super::Shared(layer)) as Box<dyn Ffn>)
        }
        _ => {
            let (spec, entry) = dense_specs[i]
                .clone()
                .ok_or_else(|| Error::InvalidArgument(format!("layer {i} has no FFN bundles")))?;
            let ws = dense_ws.as_ref().expect("dense layers have a workspace");
            let neurons = spec.neurons;
            let ffn = new_flash_ffn(spec, &entry, ws, want[i], scratch[i])?;
            caches_bytes += ffn
                .state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .cache
                .size_bytes() as u64;
            ffns.push(Arc::clone(&ffn));
            Ok(Box::new(DenseLayer {
                ffn,
                all: (0..neurons as u32).collect(),
                moe_stats: Arc::clone(&moe_stats),
            }) as Box<dyn Ffn>)
        }
    })?;
    plan.caches = caches_bytes;
    plan.total = fixed + caches_bytes;
    let mut rt = FlashRuntime {
        // Experts are chosen by the router, not a neuron selector.
        selector: None,
        options: opts.clone(),
        reader,
        stats,
        plan,
        layers,
        ffns,
        moe: Some(Arc::new(MoeRuntime {
            stats: moe_stats,
            layers: moe_layers,
            capacity_per_layer: want,
        })),
    };
    // Hot experts pinned from the routing statistics: whole experts, most
    // often chosen first, in a share of the layer's rows (only where the
    // cache cannot hold every expert anyway).
    let counts: Vec<(usize, Vec<u64>)> = m
        .routing
        .iter()
        .flat_map(|r| &r.layers)
        .filter(|r| {
            rt.plan
                .capacity_per_layer
                .get(r.layer as usize)
                .is_some_and(|&rows| rows < num_experts * ew)
        })
        .map(|r| (r.layer as usize, r.counts.clone()))
        .collect();
    pin_hottest(&mut rt, &counts, opts.pin_experts_share)?;
    let loaded = LoadedModel {
        model,
        tokenizer: packed_tokenizer(&file)?,
        source: ModelSource::Packed,
        sparsity: None,
    };
    Ok((loaded, rt))
}

/// Pins each sparse layer's most often chosen experts (`counts`: per layer
/// index, calibration counts per expert), whole, in `share` of the layer's
/// rows (flash mode; `share` 1 with rows for every expert: the whole model
/// in DRAM before the first token); the reads at open are
/// counted in the plan (`pinned_read_bytes`), not in the run's bytes. Called
/// by [`open_flash_moe`] with the file's routing statistics (spec 5.1), and
/// by benchmarks whose synthetic file has none, with counts from the
/// calibration part of their trace. Returns the experts pinned.
pub fn pin_hottest(
    rt: &mut FlashRuntime,
    counts: &[(usize, Vec<u64>)],
    share: f64,
) -> Result<usize> {
    let layers = match &rt.moe {
        Some(moe) if rt.options.mode == FfnMode::Flash => moe.layers.clone(),
        _ => Vec::new(),
    };
    let mut total = 0;
    for layer in &layers {
        let l = layer.layer;
        let ew = layer.expert_width;
        let rows = rt.plan.capacity_per_layer[l];
        let Some((_, c)) = counts.iter().find(|(i, _)| *i == l) else {
            continue;
        };
        let hot = crate::format::layout::RoutingLayer {
            layer: l as u64,
            counts: c.clone(),
        }
        .hottest_first();
        let room = ((rows as f64 * share.clamp(0.0, 1.0)) as usize) / ew;
        let pinned = layer.pin_experts(&hot[..room.min(hot.len())])?;
        rt.plan.pinned_per_layer[l] = pinned * ew;
        total += pinned;
    }
    let (reader, stats) = (&rt.reader, &rt.stats);
    rt.plan.pinned_bytes_read += reader.counters.bytes.swap(0, Ordering::Relaxed);
    reader.counters.ops.store(0, Ordering::Relaxed);
    stats.loaded.store(0, Ordering::Relaxed);
    stats.verify.extra_read_bytes.store(0, Ordering::Relaxed);
    for c in [&stats.ns_io, &stats.ns_memory] {
        c.store(0, Ordering::Relaxed);
    }
    Ok(total)
}

/// A mixture-of-experts model's routing over `ids` (windows of `ctx` tokens,
/// each with a fresh KV cache, as calibration runs them): per sparse layer in
/// layer order, per token, the chosen experts (most probable first).
pub fn routing_trace(model: &Model, ids: &[u32], ctx: usize) -> Result<Vec<Vec<Vec<u32>>>> {
    if model.config.moe.is_none() {
        return Err(Error::InvalidArgument(
            "a routing trace needs a mixture-of-experts model".into(),
        ));
    }
    let mut rec = crate::runtime::moe::RoutingLog::default();
    for window in ids.chunks(ctx.max(1)) {
        let mut cache = model.new_cache();
        model.forward(&mut cache, window, Logits::None, Some(&mut rec))?;
    }
    Ok(rec.layers.into_values().collect())
}

/// A routing trace of a small model (`trace[layer][token]`: its `k0` chosen
/// experts of `e0`) stretched to `layers` sparse layers of `experts` experts,
/// `top_k` per token, over `tokens` tokens: the replay a benchmark gives a
/// synthetic model of a real MoE's shape, whose own router is random.
///
/// As [`Replay::tiled`] does for neurons, it keeps what the small model's
/// routing has: how unevenly experts are chosen and how a token's experts
/// repeat on the next tokens. The `top_k / k0` groups of a token's experts
/// come from as many streams, disjoint stretches of the trace read token by
/// token (layer `l` starts `l / layers` of the way into each, and follows
/// trace layer `l % L`); group `g`'s experts `a` become
/// `(g * R + r) * e0 + a`, where the replica `r < R = experts / (e0 * top_k /
/// k0)` is the first expert that trace layer `(l + 1) % L` chose at the same
/// token, mod `R`. A token's experts are therefore distinct, every expert
/// can be chosen, and each expert's share is the product of two trained
/// layers' shares.
pub fn expert_replay(
    trace: &[Vec<Vec<u32>>],
    e0: usize,
    layers: usize,
    experts: usize,
    top_k: usize,
    tokens: usize,
) -> Result<Replay> {
    let k0 = trace.first().and_then(|l| l.first()).map_or(0, Vec::len);
    let avail = trace.iter().map(Vec::len).min().unwrap_or(0);
    if k0 == 0 || avail == 0 || e0 == 0 {
        return Err(Error::InvalidArgument("an empty routing trace".into()));
    }
    if !top_k.is_multiple_of(k0) || !experts.is_multiple_of(e0 * (top_k / k0)) {
        return Err(Error::InvalidArgument(format!(
            "a trace of top-{k0} of {e0} experts stretches to top-k a multiple of {k0} and experts a multiple of {e0} x top-k / {k0}; not top-{top_k} of {experts}"
        )));
    }
    let groups = top_k / k0;
    let replicas = experts / (e0 * groups);
    let seg = avail / groups;
    if seg == 0 {
        return Err(Error::InvalidArgument(format!(
            "a routing trace of {avail} tokens is too short for {groups} streams"
        )));
    }
    let l0 = trace.len();
    let sets = (0..layers)
        .map(|l| {
            (0..tokens)
                .map(|t| {
                    let mut set = Vec::with_capacity(top_k);
                    for g in 0..groups {
                        let u = g * seg + (l * (seg / layers.max(1)) + t) % seg;
                        let r = trace[(l + 1) % l0][u][0] as usize % replicas;
                        for &a in &trace[l % l0][u] {
                            set.push(((g * replicas + r) * e0 + a as usize) as u32);
                        }
                    }
                    set.sort_unstable();
                    set
                })
                .collect()
        })
        .collect();
    Replay::new(sets, experts)
}
