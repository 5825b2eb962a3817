//! [`FlashFfn`]: one layer's FFN with its bundles on disk.
//!
//! - `flash`: per token the predictor picks neurons (ascending packed indices);
//!   neurons used in the last `window` tokens stay in the layer's
//!   [`BundleCache`]; only missing bundles are read, coalesced into runs; those
//!   that left the window are evicted. Exactly the chosen neurons are computed,
//!   summed in ascending neuron order with [`ColumnAccumulator`], so the output
//!   is bit-identical to the in-DRAM `predicted` mode.
//! - `naive`: the whole FFN section is read for every token in large reads and
//!   every neuron computed (the paper's baseline).
//!
//! A batch of tokens (a prompt's prefill, an `eval` window) in `flash` mode
//! reads the union of its tokens' neurons once, then computes the tokens in
//! parallel, each with its own set summed in the same ascending order as
//! alone: the same bits as token by token, with one read per needed bundle
//! per batch instead of one per window miss (see `FlashFfn::flash_batch`).
//! `naive` goes token by token (the paper's baseline reads everything).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::format::layout::BundlePart;
use crate::input::config::Activation;
use crate::runtime::ffn::{neuron_value, ActiveSet, Criterion, Ffn, Fired};
use crate::runtime::flash::cache::BundleCache;
use crate::runtime::flash::io::{FlashReader, ReadOp, Staging};
use crate::runtime::flash::verify::{ChunkVerifier, VerifyCounters};
use crate::runtime::kernels::{dot_weights, dot_weights2, ColumnAccumulator, Weights};
use crate::runtime::predictor::LowRankPredictor;
use crate::runtime::sparse::NeuronCounter;

/// Where a layer's bundles are and how they are laid out.
#[derive(Debug, Clone)]
pub struct LayerSpec {
    pub layer: usize,
    /// File offset of bundle 0.
    pub offset: u64,
    pub neurons: usize,
    pub hidden: usize,
    pub dtype: DType,
    pub parts: Vec<BundlePart>,
    /// Bytes per bundle.
    pub stride: usize,
    /// Raw bytes per chunk of the section (whole bundles, rule 13): naive
    /// reads whole chunks, so that first-use verification hashes what it read.
    pub chunk_bytes: usize,
}

impl LayerSpec {
    fn part_index(&self, part: BundlePart) -> Option<usize> {
        self.parts.iter().position(|p| *p == part)
    }
}

/// Counters over a run, summed over layers (relaxed atomics: statistics only).
#[derive(Debug, Default)]
pub struct FlashStats {
    /// (layer, token) evaluations.
    pub evaluations: AtomicU64,
    /// Neurons chosen over those evaluations.
    pub needed: AtomicU64,
    /// Chosen neurons that were already resident.
    pub hits: AtomicU64,
    /// Bundles read into the cache or its scratch area.
    pub loaded: AtomicU64,
    /// Bundles evicted.
    pub evicted: AtomicU64,
    /// Bundles that did not fit the cache and went through scratch.
    pub overflow: AtomicU64,
    pub ns_predict: AtomicU64,
    pub ns_io: AtomicU64,
    pub ns_memory: AtomicU64,
    pub ns_compute: AtomicU64,
    /// First-use verification of FFN chunks.
    pub verify: VerifyCounters,
    /// FFN neurons computed (as the in-DRAM sparse modes count them).
    pub neurons: Arc<NeuronCounter>,
}

fn add_ns(c: &AtomicU64, since: Instant) -> Instant {
    let now = Instant::now();
    c.fetch_add((now - since).as_nanos() as u64, Ordering::Relaxed);
    now
}

/// Buffers shared by every layer (layers run one after another): staging for
/// reads, the down-projection accumulator, predictor scratch, index lists.
pub struct Workspace {
    staging: Staging,
    acc: ColumnAccumulator,
    scratch: Vec<f32>,
    logits: Vec<f32>,
    set: Vec<u32>,
    missing: Vec<u32>,
    ops: Vec<ReadOp>,
    op_ranges: Vec<(usize, usize)>,
    /// File bytes each read's bundles span (without widening for verification).
    wanted: Vec<(u64, u64)>,
    /// Batches only (allocated on the first): each token's chosen neurons,
    /// and membership of the batch's union by neuron.
    batch_sets: Vec<Vec<u32>>,
    in_union: Vec<bool>,
    /// One down-projection accumulator per compute thread for batches.
    batch_accs: Vec<ColumnAccumulator>,
    /// The low-precision selector's quantized input and neuron values.
    select: crate::runtime::lowbit::SelectScratch,
}

impl Workspace {
    /// For layers of `hidden` x `neurons`: `slots` reads of `slot_bytes` in
    /// flight; every buffer reserved up front so that tokens do not allocate.
    pub fn new(
        hidden: usize,
        neurons: usize,
        max_rank: usize,
        slots: usize,
        slot_bytes: usize,
        align: usize,
    ) -> Result<Workspace> {
        Ok(Workspace {
            staging: Staging::new(slots, slot_bytes, align)?,
            acc: ColumnAccumulator::new(hidden, neurons),
            scratch: Vec::with_capacity(max_rank),
            logits: Vec::with_capacity(neurons),
            set: Vec::with_capacity(neurons),
            missing: Vec::with_capacity(neurons),
            ops: Vec::with_capacity(slots),
            op_ranges: Vec::with_capacity(slots),
            wanted: Vec::with_capacity(slots),
            batch_sets: Vec::new(),
            in_union: Vec::new(),
            batch_accs: Vec::new(),
            select: Default::default(),
        })
    }

    /// DRAM it holds.
    pub fn size_bytes(&self, hidden: usize, neurons: usize) -> usize {
        let accumulators = 1 + self.batch_accs.len();
        self.staging.size_bytes() + accumulators * 32 * hidden * 4 + neurons * 16
    }
}

/// The part of a layer that changes per token.
pub struct LayerState {
    pub cache: BundleCache,
    /// Token (from 1) at which each neuron was last chosen; 0: never.
    last_seen: Vec<u64>,
    token: u64,
}

impl LayerState {
    pub fn new(cache: BundleCache, neurons: usize) -> LayerState {
        LayerState {
            cache,
            last_seen: vec![0; neurons],
            token: 0,
        }
    }
}

/// The oracle's chooser: an in-DRAM copy of the layer (not counted in the
/// budget or in bytes read) says which neurons fire.
pub struct Oracle {
    pub ffn: Box<dyn Ffn>,
    /// Activation magnitude above this fires (0 for ReLU).
    pub threshold: f32,
    /// What the threshold is compared with (the file's SiLU criterion).
    pub criterion: Criterion,
}

impl Oracle {
    /// The firing neurons of each token, as the in-DRAM `oracle` mode picks them.
    fn sets(&self, x: &[f32], n: usize) -> Result<Vec<Vec<u32>>> {
        let width = self.ffn.width();
        let act = self.ffn.selection_scores(x, n, self.criterion)?;
        Ok(act
            .chunks_exact(width)
            .map(|row| {
                (0..width as u32)
                    .filter(|&j| row[j as usize].abs() > self.threshold)
                    .collect()
            })
            .collect())
    }
}

/// One layer's FFN read from flash.
pub struct FlashFfn {
    pub spec: LayerSpec,
    pub activation: Activation,
    pub gate_bias: Option<Vec<f32>>,
    pub up_bias: Option<Vec<f32>>,
    pub down_bias: Option<Vec<f32>>,
    pub predictor: Option<LowRankPredictor>,
    /// When set, chooses instead of the predictor: the file's low-precision
    /// copies of gate and up (format section 10), in DRAM, by `|silu(g~) *
    /// u~|` against the layer's product threshold, exactly as the in-DRAM
    /// `predicted` mode with the same selector.
    pub lowbit: Option<crate::runtime::lowbit::LowBitSelector>,
    /// When set, chooses instead of the predictor (`--ffn oracle-flash`).
    pub oracle: Option<Oracle>,
    /// When set, chooses instead of the predictor: this layer's recorded set
    /// for the token (benchmarks at scale, see `flash::replay`).
    pub replay: Option<Arc<crate::runtime::flash::Replay>>,
    /// Tokens before the current one whose bundles stay cached (`flash`,
    /// `oracle-flash`); `None`: `naive`, the whole section read every token.
    pub window: Option<usize>,
    /// Wanted bundles this many or fewer apart are read in one operation.
    pub coalesce_gap: usize,
    pub reader: Arc<FlashReader>,
    pub workspace: Arc<Mutex<Workspace>>,
    pub state: Mutex<LayerState>,
    pub stats: Arc<FlashStats>,
    /// Checks each chunk's hash the first time it is used (the default;
    /// `None` with `--no-verify-reads`).
    pub verifier: Option<ChunkVerifier>,
}

impl FlashFfn {
    /// Neurons resident in this layer's cache now.
    pub fn resident(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .cache
            .used()
    }

    /// The read that covers the wanted bytes `start..end`: widened to whole
    /// chunks where they touch a chunk not yet verified, rounded out to the
    /// alignment.
    fn read_for(&self, start: u64, end: u64) -> ReadOp {
        match &self.verifier {
            Some(v) => self
                .reader
                .round_out(v.widen_start(start), v.widen_end(end)),
            None => self.reader.round_out(start, end),
        }
    }

    /// Performs `ops` (op `k` spans the wanted bytes `wanted[k]`) and, with
    /// verification, checks every chunk they use for the first time, in the
    /// bytes read, before any is used.
    fn read_checked(
        &self,
        staging: &mut Staging,
        ops: &[ReadOp],
        wanted: &[(u64, u64)],
    ) -> Result<()> {
        if let Some(op) = ops.iter().find(|op| op.len > staging.slot_bytes) {
            return Err(Error::InvalidArgument(format!(
                "layer {}: a read of {} bytes does not fit the {}-byte read buffer",
                self.spec.layer, op.len, staging.slot_bytes
            )));
        }
        let r = match &self.verifier {
            None => self.reader.read_batch(staging, ops),
            Some(v) => {
                let counters = &self.stats.verify;
                let extra: usize = ops
                    .iter()
                    .zip(wanted)
                    .map(|(op, &(s, e))| op.len - self.reader.round_out(s, e).len)
                    .sum();
                counters
                    .extra_read_bytes
                    .fetch_add(extra as u64, Ordering::Relaxed);
                self.reader.read_batch_checked(staging, ops, &|k, data| {
                    let (s, e) = wanted[k];
                    v.check(&ops[k], data, s, e, counters)
                })
            }
        };
        r.map_err(|e| e.in_layer(self.spec.layer))
    }

    fn part<'b>(&self, bundle: &'b [u8], k: usize) -> Result<Weights<'b>> {
        let len = self.spec.hidden * self.spec.dtype.size_bytes();
        Weights::from_le_bytes(self.spec.dtype, &bundle[k * len..(k + 1) * len]).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "layer {}: bundle bytes not aligned to their dtype",
                self.spec.layer
            ))
        })
    }

    /// The value of neuron `i` and its down column, from its bundle.
    #[inline]
    fn neuron<'b>(&self, i: usize, bundle: &'b [u8], x: &[f32]) -> Result<(f32, Weights<'b>)> {
        let spec = &self.spec;
        let up_k = spec.part_index(BundlePart::Up).unwrap_or(0);
        let down_k = spec.parts.len() - 1;
        let mut u = dot_weights(self.part(bundle, up_k)?, x);
        if let Some(b) = &self.up_bias {
            u += b[i];
        }
        let g = match spec.part_index(BundlePart::Gate) {
            None => None,
            Some(k) => {
                let mut g = dot_weights(self.part(bundle, k)?, x);
                if let Some(b) = &self.gate_bias {
                    g += b[i];
                }
                Some(g)
            }
        };
        Ok((
            neuron_value(self.activation, g, u),
            self.part(bundle, down_k)?,
        ))
    }

    /// [`Self::neuron`] for two tokens, each value bit-identical to its own
    /// call; the bundle's rows are read once.
    #[inline]
    fn neuron2<'b>(
        &self,
        i: usize,
        bundle: &'b [u8],
        xs: [&[f32]; 2],
    ) -> Result<([f32; 2], Weights<'b>)> {
        let spec = &self.spec;
        let up_k = spec.part_index(BundlePart::Up).unwrap_or(0);
        let down_k = spec.parts.len() - 1;
        let mut u = dot_weights2(self.part(bundle, up_k)?, xs);
        if let Some(b) = &self.up_bias {
            u = [u[0] + b[i], u[1] + b[i]];
        }
        let g = match spec.part_index(BundlePart::Gate) {
            None => None,
            Some(k) => {
                let mut g = dot_weights2(self.part(bundle, k)?, xs);
                if let Some(b) = &self.gate_bias {
                    g = [g[0] + b[i], g[1] + b[i]];
                }
                Some(g)
            }
        };
        let value = |k: usize| neuron_value(self.activation, g.map(|g| g[k]), u[k]);
        Ok(([value(0), value(1)], self.part(bundle, down_k)?))
    }

    /// Reads the `count` hottest neurons (packed order `0..count`) into the
    /// cache and keeps them there for good.
    pub fn pin_hottest(&self, count: usize) -> Result<()> {
        if count == 0 {
            return Ok(());
        }
        let mut ws = self.workspace.lock().unwrap_or_else(|e| e.into_inner());
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut list = std::mem::take(&mut ws.missing);
        list.clear();
        for i in 0..count.min(self.spec.neurons) as u32 {
            if st.cache.insert(i).is_some() {
                list.push(i);
            }
        }
        let r = self.read_into_rows(&mut ws, &mut st.cache, &list);
        st.cache.pin_all();
        ws.missing = list;
        r
    }

    /// Reads the bundles of `neurons` (ascending, each with a row in the
    /// cache) into their rows.
    fn read_into_rows(
        &self,
        ws: &mut Workspace,
        cache: &mut BundleCache,
        neurons: &[u32],
    ) -> Result<()> {
        let spec = &self.spec;
        let stride = spec.stride as u64;
        let Workspace {
            staging,
            ops,
            op_ranges,
            wanted,
            ..
        } = ws;
        let mut i = 0;
        while i < neurons.len() {
            let t0 = Instant::now();
            ops.clear();
            op_ranges.clear();
            wanted.clear();
            while ops.len() < staging.slots && i < neurons.len() {
                let first = neurons[i] as u64;
                let start = spec.offset + first * stride;
                let mut j = i + 1;
                while j < neurons.len() {
                    let gap = (neurons[j] - neurons[j - 1] - 1) as usize;
                    let end = spec.offset + (neurons[j] as u64 + 1) * stride;
                    // Bundles whose aligned blocks touch the run's read (or
                    // the whole chunk it reads to verify it) cost no extra
                    // bytes: one read instead of two (or of the same block
                    // twice).
                    let run_end = spec.offset + (neurons[j - 1] as u64 + 1) * stride;
                    let next = self.reader.round_out(end - stride, end);
                    let touching = next.offset <= self.read_for(start, run_end).end();
                    if (gap > self.coalesce_gap && !touching)
                        || self.read_for(start, end).len > staging.slot_bytes
                    {
                        break;
                    }
                    j += 1;
                }
                let end = spec.offset + (neurons[j - 1] as u64 + 1) * stride;
                ops.push(self.read_for(start, end));
                op_ranges.push((i, j));
                wanted.push((start, end));
                i = j;
            }
            let t1 = add_ns(&self.stats.ns_memory, t0);
            self.read_checked(staging, ops, wanted)?;
            let t2 = add_ns(&self.stats.ns_io, t1);
            for (k, (&op, &(a, b))) in ops.iter().zip(op_ranges.iter()).enumerate() {
                let slot = staging.slot(k);
                for &p in &neurons[a..b] {
                    let at = (spec.offset + p as u64 * stride - op.offset) as usize;
                    let row = cache.row_of(p).expect("rows assigned before reading");
                    cache
                        .row_mut(row)
                        .copy_from_slice(&slot[at..at + spec.stride]);
                }
            }
            add_ns(&self.stats.ns_memory, t2);
        }
        self.stats
            .loaded
            .fetch_add(neurons.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Adds the neurons `set` (ascending, each with a row) to the sum.
    fn compute(
        &self,
        acc: &mut ColumnAccumulator,
        cache: &BundleCache,
        set: &[u32],
        x: &[f32],
        fired: Option<&mut Vec<u32>>,
    ) -> Result<()> {
        let t0 = Instant::now();
        let r = self.accumulate(acc, cache, set, x, fired);
        add_ns(&self.stats.ns_compute, t0);
        r
    }

    /// [`Self::compute`] without the timing (batches time their parallel
    /// section as a whole).
    fn accumulate(
        &self,
        acc: &mut ColumnAccumulator,
        cache: &BundleCache,
        set: &[u32],
        x: &[f32],
        mut fired: Option<&mut Vec<u32>>,
    ) -> Result<()> {
        for &i in set {
            let row = cache.row_of(i).expect("chosen neurons are in DRAM");
            let (v, down) = self.neuron(i as usize, cache.row(row), x)?;
            if v != 0.0 {
                acc.add(i as usize, v, down, 0, 1);
                if let Some(f) = fired.as_deref_mut() {
                    f.push(i);
                }
            }
        }
        Ok(())
    }

    /// [`Self::accumulate`] for two tokens: each token's neurons in ascending
    /// order into its own accumulator, the values of a neuron both use
    /// computed from one read of its rows (bit-identical to two calls).
    fn accumulate2(
        &self,
        accs: [&mut ColumnAccumulator; 2],
        cache: &BundleCache,
        sets: [&[u32]; 2],
        xs: [&[f32]; 2],
        mut fired: Option<[&mut Vec<u32>; 2]>,
    ) -> Result<()> {
        let [acc0, acc1] = accs;
        let (mut p, mut q) = (0, 0);
        let mut add = |k: usize, acc: &mut ColumnAccumulator, i: u32, v: f32, down: Weights<'_>| {
            if v != 0.0 {
                acc.add(i as usize, v, down, 0, 1);
                if let Some(f) = fired.as_mut() {
                    f[k].push(i);
                }
            }
        };
        while p < sets[0].len() || q < sets[1].len() {
            let a = sets[0].get(p).copied().unwrap_or(u32::MAX);
            let b = sets[1].get(q).copied().unwrap_or(u32::MAX);
            let i = a.min(b);
            let row = cache.row(cache.row_of(i).expect("chosen neurons are in DRAM"));
            if a == b {
                let (v, down) = self.neuron2(i as usize, row, xs)?;
                add(0, acc0, i, v[0], down);
                add(1, acc1, i, v[1], down);
                p += 1;
                q += 1;
            } else if a < b {
                let (v, down) = self.neuron(i as usize, row, xs[0])?;
                add(0, acc0, i, v, down);
                p += 1;
            } else {
                let (v, down) = self.neuron(i as usize, row, xs[1])?;
                add(1, acc1, i, v, down);
                q += 1;
            }
        }
        Ok(())
    }

    /// Tokens `x` (`n` of them, `n > 1`) in `flash` mode. Every token's
    /// neurons are chosen first (as token by token, the replay indexed by the
    /// token's position). Then, group by group of consecutive tokens whose
    /// neurons fit the cache together: the window bookkeeping advances as it
    /// would token by token, what the group does not use and the window no
    /// longer holds leaves, the group's missing bundles are read once (coalesced
    /// as always), and its tokens are computed in parallel, each from its own
    /// set in ascending order with its own accumulator: bit-identical to the
    /// token-by-token path. A token whose set alone exceeds the cache goes
    /// through that path (scratch rows).
    #[allow(clippy::too_many_arguments)]
    fn flash_batch(
        &self,
        ws: &mut Workspace,
        st: &mut LayerState,
        window: usize,
        x: &[f32],
        n: usize,
        active: ActiveSet<'_>,
        out: &mut [f32],
        mut fired: Option<&mut Fired>,
    ) -> Result<()> {
        let (h, width) = (self.spec.hidden, self.spec.neurons);
        let mut sets = std::mem::take(&mut ws.batch_sets);
        sets.resize_with(n, Vec::new);
        let mut in_union = std::mem::take(&mut ws.in_union);
        in_union.clear();
        in_union.resize(width, false);
        let result = (|| {
            for (t, set) in sets.iter_mut().enumerate().take(n) {
                let given = match active {
                    ActiveSet::All => None,
                    ActiveSet::PerToken(sets) => Some(sets[t].as_slice()),
                };
                self.choose(ws, &x[t * h..(t + 1) * h], given, st.token + t as u64)?;
                set.clear();
                set.extend_from_slice(&ws.set);
            }
            // Rows the union may occupy: all but the pinned ones (pinned
            // neurons are resident for good and take no new row).
            let room = st.cache.capacity() - st.cache.pinned();
            let pinned =
                |cache: &BundleCache, i: u32| cache.row_of(i).is_some_and(|r| r < cache.pinned());
            let mut a = 0;
            while a < n {
                // The longest run of tokens from `a` whose union fits.
                let mut union: Vec<u32> = Vec::new();
                let mut b = a;
                while b < n {
                    let new: Vec<u32> = sets[b]
                        .iter()
                        .copied()
                        .filter(|&i| !in_union[i as usize] && !pinned(&st.cache, i))
                        .collect();
                    if union.len() + new.len() > room {
                        break;
                    }
                    for &i in &new {
                        in_union[i as usize] = true;
                    }
                    union.extend(new);
                    b += 1;
                }
                if b == a {
                    // One token's neurons exceed the cache: token by token.
                    ws.set.clear();
                    ws.set.extend_from_slice(&sets[a]);
                    let f = fired.as_deref_mut().map(|f| &mut f.per_token[a]);
                    self.flash_token(
                        ws,
                        st,
                        window,
                        &x[a * h..(a + 1) * h],
                        &mut out[a * h..(a + 1) * h],
                        f,
                    )?;
                    self.count_token(sets[a].len());
                    a += 1;
                    continue;
                }
                union.sort_unstable();
                let r = self.flash_group(
                    ws,
                    st,
                    window,
                    &sets[a..b],
                    &union,
                    &in_union,
                    x,
                    a,
                    out,
                    fired.as_deref_mut(),
                );
                for &i in &union {
                    in_union[i as usize] = false;
                }
                r?;
                for set in &sets[a..b] {
                    self.count_token(set.len());
                }
                a = b;
            }
            Ok(())
        })();
        ws.batch_sets = sets;
        ws.in_union = in_union;
        result
    }

    /// One group of a batch (see [`Self::flash_batch`]): tokens `first..` with
    /// `sets`, whose unpinned neurons `union` (ascending, marked in `in_union`)
    /// fit the cache together.
    #[allow(clippy::too_many_arguments)]
    fn flash_group(
        &self,
        ws: &mut Workspace,
        st: &mut LayerState,
        window: usize,
        sets: &[Vec<u32>],
        union: &[u32],
        in_union: &[bool],
        x: &[f32],
        first: usize,
        out: &mut [f32],
        fired: Option<&mut Fired>,
    ) -> Result<()> {
        use rayon::prelude::*;
        let (h, width) = (self.spec.hidden, self.spec.neurons);
        let t0 = Instant::now();
        for set in sets {
            st.token += 1;
            for &i in set {
                st.last_seen[i as usize] = st.token;
            }
        }
        // What the next token's window keeps, and what this group uses, stays;
        // if that leaves too few rows, only what this group uses.
        let (t, last_seen) = (st.token + 1, &st.last_seen);
        let mut evicted = st
            .cache
            .retain(|i| in_union[i as usize] || last_seen[i as usize] + window as u64 >= t);
        ws.missing.clear();
        ws.missing.extend(
            union
                .iter()
                .copied()
                .filter(|&i| st.cache.row_of(i).is_none()),
        );
        if ws.missing.len() > st.cache.free() {
            evicted += st.cache.retain(|i| in_union[i as usize]);
        }
        for &i in &ws.missing {
            st.cache.insert(i).expect("the union fits the cache");
        }
        add_ns(&self.stats.ns_memory, t0);
        let missing = std::mem::take(&mut ws.missing);
        let result = (|| {
            self.read_into_rows(ws, &mut st.cache, &missing)?;
            let t1 = Instant::now();
            let cache = &st.cache;
            let bias = self.down_bias.as_deref();
            // One contiguous run of tokens per compute thread, each run with
            // its own accumulator (the plan counts one per thread).
            let len = sets.len();
            let groups = rayon::current_num_threads().clamp(1, len);
            let per = len.div_ceil(groups);
            let groups = len.div_ceil(per);
            while ws.batch_accs.len() < 2 * groups {
                ws.batch_accs.push(ColumnAccumulator::new(h, width));
            }
            let mut fired_groups: Vec<Option<&mut [Vec<u32>]>> = match fired {
                Some(f) => f.per_token[first..first + len]
                    .chunks_mut(per)
                    .map(Some)
                    .collect(),
                None => (0..groups).map(|_| None).collect(),
            };
            let r = ws.batch_accs[..2 * groups]
                .par_chunks_mut(2)
                .zip(out[first * h..(first + len) * h].par_chunks_mut(per * h))
                .zip(fired_groups.par_iter_mut())
                .enumerate()
                .try_for_each(|(g, ((accs, outs), fired))| {
                    // Two tokens at a time: the neurons both use are read once
                    // for both.
                    let [acc0, acc1] = accs else {
                        unreachable!("chunks of two accumulators")
                    };
                    for (j, ot) in outs.chunks_mut(2 * h).enumerate() {
                        let k = g * per + 2 * j;
                        let t = first + k;
                        let mut f = fired.as_deref_mut().map(|f| &mut f[2 * j..]);
                        acc0.clear();
                        if ot.len() == h {
                            let f0 = f.as_deref_mut().map(|f| &mut f[0]);
                            self.accumulate(acc0, cache, &sets[k], &x[t * h..(t + 1) * h], f0)?;
                            acc0.finish(bias, ot);
                            continue;
                        }
                        acc1.clear();
                        let xs = [&x[t * h..(t + 1) * h], &x[(t + 1) * h..(t + 2) * h]];
                        let fs = f.map(|f| {
                            let (a, b) = f.split_at_mut(1);
                            [&mut a[0], &mut b[0]]
                        });
                        self.accumulate2([acc0, acc1], cache, [&sets[k], &sets[k + 1]], xs, fs)?;
                        let (o0, o1) = ot.split_at_mut(h);
                        acc0.finish(bias, o0);
                        acc1.finish(bias, o1);
                    }
                    Ok::<(), Error>(())
                });
            add_ns(&self.stats.ns_compute, t1);
            r
        })();
        let needed: usize = sets.iter().map(Vec::len).sum();
        let s = &self.stats;
        s.needed.fetch_add(needed as u64, Ordering::Relaxed);
        s.hits.fetch_add(
            (needed - missing.len().min(needed)) as u64,
            Ordering::Relaxed,
        );
        s.evicted.fetch_add(evicted as u64, Ordering::Relaxed);
        if result.is_err() {
            // Rows inserted for this group may not have been filled.
            st.cache.retain(|_| false);
        }
        ws.missing = missing;
        result
    }

    /// Counts one token's evaluation of this layer (`computed` neurons).
    fn count_token(&self, computed: usize) {
        self.stats.evaluations.fetch_add(1, Ordering::Relaxed);
        self.stats
            .neurons
            .record(1, computed as u64, self.spec.neurons as u64);
    }

    /// One token through the window cache: `ws.set` holds the chosen neurons.
    fn flash_token(
        &self,
        ws: &mut Workspace,
        st: &mut LayerState,
        window: usize,
        x: &[f32],
        out: &mut [f32],
        mut fired: Option<&mut Vec<u32>>,
    ) -> Result<()> {
        let t0 = Instant::now();
        st.token += 1;
        let t = st.token;
        let set = std::mem::take(&mut ws.set);
        // Keep the neurons chosen in the last `window` tokens (before this one).
        let last_seen = &st.last_seen;
        let mut evicted = st
            .cache
            .retain(|n| last_seen[n as usize] + window as u64 >= t);
        for &i in &set {
            st.last_seen[i as usize] = t;
        }
        let last_seen = &st.last_seen;
        ws.missing.clear();
        ws.missing.extend(
            set.iter()
                .copied()
                .filter(|&i| st.cache.row_of(i).is_none()),
        );
        let hits = set.len() - ws.missing.len();
        // Over capacity (a budget below the window's need): the oldest window
        // members make room for this token's, one token's worth at a time,
        // so that the rest of the window stays resident for the next tokens.
        let mut gone_up_to = t.saturating_sub(window as u64 + 1);
        while ws.missing.len() > st.cache.free() && gone_up_to + 1 < t {
            gone_up_to += 1;
            evicted += st.cache.retain(|n| last_seen[n as usize] > gone_up_to);
        }
        let fit = ws.missing.len().min(st.cache.free());
        for &i in &ws.missing[..fit] {
            st.cache.insert(i);
        }
        add_ns(&self.stats.ns_memory, t0);
        let missing = std::mem::take(&mut ws.missing);
        let result = (|| {
            self.read_into_rows(ws, &mut st.cache, &missing[..fit])?;
            ws.acc.clear();
            // The rest goes through scratch, in ascending chunks; the sum
            // still visits neurons in ascending order.
            let mut done = 0;
            let scratch = st.cache.scratch_rows();
            for chunk in missing[fit..].chunks(scratch.max(1)) {
                if scratch == 0 {
                    return Err(Error::InvalidArgument(format!(
                        "layer {}: no scratch rows for neurons beyond the cache",
                        self.spec.layer
                    )));
                }
                for (k, &i) in chunk.iter().enumerate() {
                    st.cache.place_scratch(i, k);
                }
                self.read_into_rows(ws, &mut st.cache, chunk)?;
                let last = *chunk.last().expect("chunks are not empty");
                let upto = done + set[done..].partition_point(|&i| i <= last);
                self.compute(
                    &mut ws.acc,
                    &st.cache,
                    &set[done..upto],
                    x,
                    fired.as_deref_mut(),
                )?;
                st.cache.clear_scratch(chunk.len());
                done = upto;
            }
            self.compute(
                &mut ws.acc,
                &st.cache,
                &set[done..],
                x,
                fired.as_deref_mut(),
            )?;
            ws.acc.finish(self.down_bias.as_deref(), out);
            Ok(())
        })();
        let s = &self.stats;
        s.overflow
            .fetch_add((missing.len() - fit) as u64, Ordering::Relaxed);
        s.needed.fetch_add(set.len() as u64, Ordering::Relaxed);
        s.hits.fetch_add(hits as u64, Ordering::Relaxed);
        s.evicted.fetch_add(evicted as u64, Ordering::Relaxed);
        if result.is_err() {
            // Rows inserted for this token may not have been filled: forget
            // everything not pinned rather than compute from them later.
            st.cache.clear_scratch(st.cache.scratch_rows());
            st.cache.retain(|_| false);
        }
        ws.missing = missing;
        ws.set = set;
        result
    }

    /// One token with the whole section read and every neuron computed.
    fn naive_token(
        &self,
        ws: &mut Workspace,
        only: Option<&[u32]>,
        x: &[f32],
        out: &mut [f32],
        mut fired: Option<&mut Vec<u32>>,
    ) -> Result<()> {
        let spec = &self.spec;
        let stride = spec.stride;
        let align = self.reader.align();
        // Whole bundles per read, as many as a slot holds, in whole chunks
        // (chunks hold whole bundles, rule 13): each chunk lies in one read,
        // so first-use verification hashes what was read, nothing more.
        let per_read = ((ws.staging.slot_bytes - align) / stride).max(1);
        let per_chunk = (spec.chunk_bytes / stride).max(1);
        let per_read = if per_read >= per_chunk {
            per_read / per_chunk * per_chunk
        } else {
            per_read
        };
        ws.acc.clear();
        let mut p = 0;
        while p < spec.neurons {
            let t0 = Instant::now();
            ws.ops.clear();
            ws.op_ranges.clear();
            ws.wanted.clear();
            while ws.ops.len() < ws.staging.slots && p < spec.neurons {
                let q = (p + per_read).min(spec.neurons);
                let (start, end) = (
                    spec.offset + (p * stride) as u64,
                    spec.offset + (q * stride) as u64,
                );
                ws.ops.push(self.read_for(start, end));
                ws.op_ranges.push((p, q));
                ws.wanted.push((start, end));
                p = q;
            }
            self.read_checked(&mut ws.staging, &ws.ops, &ws.wanted)?;
            let t1 = add_ns(&self.stats.ns_io, t0);
            for (k, (&op, &(a, b))) in ws.ops.iter().zip(ws.op_ranges.iter()).enumerate() {
                let slot = ws.staging.slot(k);
                for i in a..b {
                    if let Some(only) = only {
                        if only.binary_search(&(i as u32)).is_err() {
                            continue;
                        }
                    }
                    let at = (spec.offset + (i * stride) as u64 - op.offset) as usize;
                    let (v, down) = self.neuron(i, &slot[at..at + stride], x)?;
                    if v != 0.0 {
                        ws.acc.add(i, v, down, 0, 1);
                        if let Some(f) = fired.as_deref_mut() {
                            f.push(i as u32);
                        }
                    }
                }
            }
            add_ns(&self.stats.ns_compute, t1);
        }
        ws.acc.finish(self.down_bias.as_deref(), out);
        let s = &self.stats;
        s.needed.fetch_add(spec.neurons as u64, Ordering::Relaxed);
        s.loaded.fetch_add(spec.neurons as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Fills `ws.set` with this token's neurons: the caller's set (sorted), or
    /// the predictor's.
    fn choose(
        &self,
        ws: &mut Workspace,
        x: &[f32],
        given: Option<&[u32]>,
        token: u64,
    ) -> Result<()> {
        let replayed = match (&self.replay, given) {
            (Some(r), None) => Some(r.set(self.spec.layer, token)),
            _ => None,
        };
        match given.or(replayed) {
            Some(set) => {
                ws.set.clear();
                ws.set.extend_from_slice(set);
                if !ws.set.windows(2).all(|w| w[0] < w[1]) {
                    ws.set.sort_unstable();
                    ws.set.dedup();
                }
                if let Some(&bad) = ws.set.last().filter(|&&i| i as usize >= self.spec.neurons) {
                    return Err(Error::InvalidArgument(format!(
                        "active neuron {bad} is outside the FFN width {}",
                        self.spec.neurons
                    )));
                }
            }
            None if self.lowbit.is_some() => {
                let selector = self.lowbit.as_ref().expect("matched");
                let t0 = Instant::now();
                selector.select_as(self.activation, x, &mut ws.select, &mut ws.set);
                add_ns(&self.stats.ns_predict, t0);
            }
            None => {
                let p = self
                    .predictor
                    .as_ref()
                    .ok_or_else(|| Error::InvalidOption {
                        option: "ffn",
                        problem: format!("flash needs a predictor for layer {}", self.spec.layer),
                    })?;
                let t0 = Instant::now();
                p.predict(x, &mut ws.scratch, &mut ws.logits, &mut ws.set);
                add_ns(&self.stats.ns_predict, t0);
            }
        }
        Ok(())
    }
}

impl Ffn for FlashFfn {
    fn hidden_size(&self) -> usize {
        self.spec.hidden
    }

    fn width(&self) -> usize {
        self.spec.neurons
    }

    fn weight_bytes(&self) -> usize {
        self.spec.neurons * self.spec.stride
    }

    fn firing_activations(&self, x: &[f32], n: usize) -> Vec<f32> {
        // Not on the flash path (oracle modes use an in-DRAM copy): computed
        // from a full scan, gate part only for gated FFNs.
        let (h, w) = (self.spec.hidden, self.spec.neurons);
        let mut acts = vec![0.0f32; n * w];
        let mut ws = self.workspace.lock().unwrap_or_else(|e| e.into_inner());
        let stride = self.spec.stride;
        // Part 0 decides firing: the gate of a gated FFN, the up row otherwise.
        let bias = if self.spec.part_index(BundlePart::Gate).is_some() {
            &self.gate_bias
        } else {
            &self.up_bias
        };
        for p in 0..w {
            let wanted = (
                self.spec.offset + (p * stride) as u64,
                self.spec.offset + ((p + 1) * stride) as u64,
            );
            let op = self.read_for(wanted.0, wanted.1);
            // A bundle that cannot be read or verified is left out (this
            // interface cannot fail); it is never used unverified.
            if self
                .read_checked(&mut ws.staging, &[op], &[wanted])
                .is_err()
            {
                continue;
            }
            let at = (self.spec.offset + (p * stride) as u64 - op.offset) as usize;
            let bundle = &ws.staging.slot(0)[at..at + stride];
            for t in 0..n {
                let xt = &x[t * h..(t + 1) * h];
                let Ok(part) = self.part(bundle, 0) else {
                    continue;
                };
                let mut v = dot_weights(part, xt);
                if let Some(b) = bias {
                    v += b[p];
                }
                acts[t * w + p] = neuron_value(self.activation, None, v);
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
        mut fired: Option<&mut Fired>,
    ) -> Result<()> {
        let h = self.spec.hidden;
        let oracle_sets;
        let active = match (&self.oracle, active) {
            (Some(o), ActiveSet::All) => {
                let t0 = Instant::now();
                oracle_sets = o.sets(x, n)?;
                add_ns(&self.stats.ns_predict, t0);
                ActiveSet::PerToken(&oracle_sets)
            }
            (_, a) => a,
        };
        if let ActiveSet::PerToken(sets) = active {
            if sets.len() != n {
                return Err(Error::InvalidArgument(format!(
                    "active sets for {} tokens given for a batch of {n}",
                    sets.len()
                )));
            }
        }
        if let Some(f) = fired.as_deref_mut() {
            f.width = self.spec.neurons;
            f.per_token = vec![Vec::new(); n];
        }
        let mut ws = self.workspace.lock().unwrap_or_else(|e| e.into_inner());
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let (Some(window), true) = (self.window, n > 1) {
            return self.flash_batch(&mut ws, &mut st, window, x, n, active, out, fired);
        }
        for t in 0..n {
            let xt = &x[t * h..(t + 1) * h];
            let ot = &mut out[t * h..(t + 1) * h];
            let f = fired.as_deref_mut().map(|f| &mut f.per_token[t]);
            let computed = match (self.window, active) {
                (None, ActiveSet::All) => {
                    self.naive_token(&mut ws, None, xt, ot, f)?;
                    self.spec.neurons
                }
                (None, ActiveSet::PerToken(sets)) => {
                    // Still the whole section read; only the given neurons summed.
                    self.choose(&mut ws, xt, Some(&sets[t]), st.token)?;
                    let set = std::mem::take(&mut ws.set);
                    let r = self.naive_token(&mut ws, Some(&set), xt, ot, f);
                    let computed = set.len();
                    ws.set = set;
                    r?;
                    computed
                }
                (Some(window), active) => {
                    let given = match active {
                        ActiveSet::All => None,
                        ActiveSet::PerToken(sets) => Some(sets[t].as_slice()),
                    };
                    self.choose(&mut ws, xt, given, st.token)?;
                    self.flash_token(&mut ws, &mut st, window, xt, ot, f)?;
                    ws.set.len()
                }
            };
            self.count_token(computed);
        }
        Ok(())
    }
}
