//! FFN modes that compute only some neurons, with all weights in DRAM:
//! - `oracle`: exactly the neurons that fire (ReLU: non-zero activation; SiLU:
//!   `|silu(gate . x) * (up . x)|` above the layer's calibrated threshold, or
//!   `|silu(gate . x)|` for files calibrated before that criterion) and no others;
//! - `predicted`: exactly the neurons the layer's selector picks: the trained
//!   low-rank predictor, or (SiLU files calibrated by the product criterion) a
//!   low-precision copy of the gate and up projections ([`crate::runtime::lowbit`]).
//!   In `oracle` and `predicted` the chosen neurons are then computed exactly.
//!
//! Both wrap the layer's FFN and hand it per-token active sets, so the model's
//! forward pass is unchanged. Each counts the neurons it computed, so callers
//! can report (and tests can check) how sparse the run was.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::runtime::ffn::{neuron_value, ActiveSet, Criterion, DenseFfn, Ffn, FfnWeights, Fired};
use crate::runtime::kernels;
use crate::runtime::lowbit::{LowBitSelector, LowBits, QuantMatrix, SelectScratch};
use crate::runtime::model::Layer;
use crate::runtime::predictor::LowRankPredictor;
use crate::runtime::weights::Storage;
use crate::runtime::Model;

/// Which neurons the FFN computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum FfnMode {
    /// Every neuron: the exact model.
    Dense,
    /// Exactly the neurons that fire (the best any predictor could do).
    Oracle,
    /// The neurons the packed file's predictors choose.
    Predicted,
    /// Every neuron, the whole FFN read from disk for every token (the
    /// paper's baseline).
    Naive,
    /// The predictors' neurons read from disk through the window cache
    /// (bit-identical to `predicted --selector trained`).
    Flash,
    /// The neurons that fire (known from an in-DRAM copy, not counted) read
    /// from disk through the window cache: the lower bound on flash reads.
    OracleFlash,
}

impl FfnMode {
    /// The mode as users write it (`flashpack run --ffn NAME`).
    pub fn name(self) -> &'static str {
        match self {
            FfnMode::Dense => "dense",
            FfnMode::Oracle => "oracle",
            FfnMode::Predicted => "predicted",
            FfnMode::Naive => "naive",
            FfnMode::Flash => "flash",
            FfnMode::OracleFlash => "oracle-flash",
        }
    }

    /// Whether the FFN is read from disk (opened with `runtime::flash::open_flash`).
    pub fn on_disk(self) -> bool {
        matches!(self, FfnMode::Naive | FfnMode::Flash | FfnMode::OracleFlash)
    }
}

/// Neurons computed over a run, summed over layers and tokens.
#[derive(Debug, Default)]
pub struct NeuronCounter {
    /// (layer, token) pairs evaluated.
    pub evaluations: AtomicU64,
    /// Neurons computed over those evaluations.
    pub computed: AtomicU64,
    /// Neurons the layers have over those evaluations (the dense count).
    pub total: AtomicU64,
    /// With [`SparsityData::measure_selector`]: neurons the exact product
    /// criterion selects, and those of them the selector also chose.
    pub exact: AtomicU64,
    pub exact_chosen: AtomicU64,
    /// DRAM bytes of the low-precision selectors.
    pub selector_bytes: AtomicU64,
    /// Wall time of the in-DRAM sparse FFN, summed over layers and tokens
    /// (ns): choosing the neurons, computing the chosen ones' gate and up
    /// rows, adding their down columns.
    pub select_ns: AtomicU64,
    pub rows_ns: AtomicU64,
    pub down_ns: AtomicU64,
}

impl NeuronCounter {
    /// Fraction of neurons computed (1.0 when dense).
    pub fn active_fraction(&self) -> f64 {
        let total = self.total.load(Ordering::Relaxed);
        if total == 0 {
            return 1.0;
        }
        self.computed.load(Ordering::Relaxed) as f64 / total as f64
    }

    /// Adds `evaluations` (layer, token) pairs that computed `computed` of
    /// `total` neurons (the flash runtime counts its own; no allocation).
    pub fn record(&self, evaluations: u64, computed: u64, total: u64) {
        self.evaluations.fetch_add(evaluations, Ordering::Relaxed);
        self.computed.fetch_add(computed, Ordering::Relaxed);
        self.total.fetch_add(total, Ordering::Relaxed);
    }

    /// Milliseconds of (selection, gate/up rows, down columns) so far.
    pub fn phase_ms(&self) -> (f64, f64, f64) {
        let ms = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64 / 1e6;
        (ms(&self.select_ns), ms(&self.rows_ns), ms(&self.down_ns))
    }

    fn add(&self, sets: &[Vec<u32>], width: usize) {
        let computed: usize = sets.iter().map(Vec::len).sum();
        self.record(
            sets.len() as u64,
            computed as u64,
            (sets.len() * width) as u64,
        );
    }
}

/// How a neuron is chosen.
enum Chooser {
    /// Activation magnitude above this (0 for ReLU: exactly non-zero).
    Oracle {
        threshold: f32,
        criterion: Criterion,
    },
    Predicted(LowRankPredictor),
    LowBit {
        selector: LowBitSelector,
        /// The layer's gate activation (SiLU, or GELU for GeGLU).
        activation: crate::input::config::Activation,
        /// Also compute the exact product criterion and count agreement.
        measure: bool,
    },
}

/// A layer's FFN restricted to chosen neurons.
pub struct SparseFfn {
    inner: Box<dyn Ffn>,
    chooser: Chooser,
    counter: Arc<NeuronCounter>,
    /// When the inner FFN is a [`DenseFfn`]: its down projection column by
    /// column (`[width, hidden]`, the stored dtype), so that a chosen neuron's
    /// column is contiguous, as in a bundle. Read in place of the row-major
    /// matrix, whose columns are `width` elements apart (a cache line per
    /// element), it makes the sparse FFN cost the chosen fraction of the
    /// dense one; the arithmetic, and so every bit, is the same.
    down_columns: Option<Storage>,
    /// Buffers reused from call to call (no allocation per token).
    scratch: Mutex<Scratch>,
}

/// [`SparseFfn`]'s reused buffers.
#[derive(Default)]
struct Scratch {
    select: SelectScratch,
    /// Chosen neurons of one token, ascending, and their exact values.
    chosen: Vec<u32>,
    values: Vec<f32>,
    /// Down-projection accumulators, one per slice of the output.
    accumulators: Vec<(usize, kernels::ColumnAccumulator)>,
    /// Every neuron's exact value for the one token of this call, when the
    /// oracle's selection computed them the way phase 1 would (`known_ok`).
    known: Vec<f32>,
    known_ok: bool,
}

/// Chosen neurons per parallel task of the gate/up phase.
const ROWS_CHUNK: usize = 64;

/// The rows (columns) of the chosen neuron this many places ahead are
/// prefetched while one is computed.
const PREFETCH_AHEAD: usize = 1;

/// `[rows, cols]` row-major as `[cols, rows]`.
fn transposed(s: &Storage, rows: usize, cols: usize) -> Storage {
    fn t<T: Copy>(v: &[T], rows: usize, cols: usize) -> Vec<T> {
        let mut out = Vec::with_capacity(v.len());
        for c in 0..cols {
            out.extend((0..rows).map(|r| v[r * cols + c]));
        }
        out
    }
    match s {
        Storage::F32(v) => Storage::F32(t(v, rows, cols)),
        Storage::F16(v) => Storage::F16(t(v, rows, cols)),
        Storage::BF16(v) => Storage::BF16(t(v, rows, cols)),
    }
}

impl SparseFfn {
    /// The chosen neurons of each token computed exactly from `dense`'s
    /// weights and the column copy: what `DenseFfn::forward` computes for the
    /// same sets, bit for bit, without its strided reads of the down columns.
    /// Two phases per token, each split across threads over independent
    /// outputs (neurons, then slices of the output), so the bits do not
    /// depend on the thread count.
    #[allow(clippy::too_many_arguments)]
    fn forward_columns(
        &self,
        dense: &DenseFfn,
        columns: &Storage,
        x: &[f32],
        sets: &[Vec<u32>],
        out: &mut [f32],
        mut fired: Option<&mut Fired>,
        scratch: &mut Scratch,
    ) -> Result<()> {
        let (hidden, width) = (dense.hidden_size(), dense.width());
        let (up, down) = (dense.up(), dense.down());
        let gate = match &dense.weights {
            FfnWeights::Gated { gate, .. } => Some(gate),
            FfnWeights::Plain { .. } => None,
        };
        let columns = kernels::Weights::of(columns);
        let threads = rayon::current_num_threads();
        // Output slices for the down phase: one per thread, 16-aligned.
        let slices = if threads > 1 && hidden >= 128 {
            threads.min(hidden / 64)
        } else {
            1
        };
        let slice_len = hidden.div_ceil(slices).div_ceil(16) * 16;
        if scratch.accumulators.len() != hidden.div_ceil(slice_len)
            || scratch
                .accumulators
                .first()
                .is_none_or(|(len, _)| *len != slice_len.min(hidden))
        {
            scratch.accumulators = (0..hidden.div_ceil(slice_len))
                .map(|s| {
                    let len = slice_len.min(hidden - s * slice_len);
                    (len, kernels::ColumnAccumulator::new(len, width))
                })
                .collect();
        }
        if let Some(f) = fired.as_deref_mut() {
            f.width = width;
            f.per_token.clear();
        }
        let (mut rows_ns, mut down_ns) = (0u64, 0u64);
        for (t, set) in sets.iter().enumerate() {
            let xt = &x[t * hidden..(t + 1) * hidden];
            let started = Instant::now();
            let chosen = &mut scratch.chosen;
            chosen.clear();
            chosen.extend_from_slice(set);
            if !chosen.windows(2).all(|w| w[0] < w[1]) {
                chosen.sort_unstable();
                chosen.dedup();
            }
            if let Some(&i) = chosen.last() {
                if i as usize >= width {
                    return Err(Error::InvalidArgument(format!(
                        "active neuron {i} is outside the FFN width {width}"
                    )));
                }
            }
            let values = &mut scratch.values;
            values.resize(chosen.len(), 0.0);
            if scratch.known_ok {
                for (v, &i) in values.iter_mut().zip(chosen.iter()) {
                    *v = scratch.known[i as usize];
                }
            }
            // A chosen neuron's exact value from its gate and up rows.
            let value = |i: usize| {
                let mut u = kernels::row_dot(&up.weight, i, xt);
                if let Some(b) = &up.bias {
                    u += b[i];
                }
                let g = gate.map(|gate| {
                    let mut g = kernels::row_dot(&gate.weight, i, xt);
                    if let Some(b) = &gate.bias {
                        g += b[i];
                    }
                    g
                });
                neuron_value(dense.activation, g, u)
            };
            let prefetch_rows = |i: u32| {
                let start = i as usize * hidden;
                kernels::prefetch(kernels::Weights::of(&up.weight.data), start, hidden);
                if let Some(gate) = gate {
                    kernels::prefetch(kernels::Weights::of(&gate.weight.data), start, hidden);
                }
            };
            // Phase 1: the chosen neurons' values from their gate and up rows
            // (or, for the oracle of one token, the values it chose by).
            let compute = |ids: &[u32], vals: &mut [f32]| {
                for (k, (&i, v)) in ids.iter().zip(vals.iter_mut()).enumerate() {
                    if let Some(&next) = ids.get(k + PREFETCH_AHEAD) {
                        prefetch_rows(next);
                    }
                    *v = value(i as usize);
                }
            };
            if scratch.known_ok {
            } else if threads > 1 && chosen.len() > ROWS_CHUNK {
                chosen
                    .par_chunks(ROWS_CHUNK)
                    .zip(values.par_chunks_mut(ROWS_CHUNK))
                    .for_each(|(ids, vals)| compute(ids, vals));
            } else {
                compute(chosen, values);
            }
            let rows_done = Instant::now();
            rows_ns += (rows_done - started).as_nanos() as u64;
            // Phase 2: their down columns, ascending, each output slice by
            // one task.
            let chosen = &scratch.chosen;
            let values = &scratch.values;
            let bias = down.bias.as_deref();
            let add_slice =
                |s: usize, (_, acc): &mut (usize, kernels::ColumnAccumulator), o: &mut [f32]| {
                    let r0 = s * slice_len;
                    acc.clear();
                    for (k, (&i, &v)) in chosen.iter().zip(values).enumerate() {
                        if let Some(&next) = chosen.get(k + PREFETCH_AHEAD) {
                            kernels::prefetch(columns, next as usize * hidden + r0, o.len());
                        }
                        if v != 0.0 {
                            acc.add(i as usize, v, columns, i as usize * hidden + r0, 1);
                        }
                    }
                    acc.finish(bias.map(|b| &b[r0..r0 + o.len()]), o);
                };
            let out_t = &mut out[t * hidden..(t + 1) * hidden];
            if scratch.accumulators.len() > 1 {
                scratch
                    .accumulators
                    .par_iter_mut()
                    .zip(out_t.par_chunks_mut(slice_len))
                    .enumerate()
                    .for_each(|(s, (acc, o))| add_slice(s, acc, o));
            } else {
                add_slice(0, &mut scratch.accumulators[0], out_t);
            }
            down_ns += rows_done.elapsed().as_nanos() as u64;
            if let Some(f) = fired.as_deref_mut() {
                f.per_token.push(
                    chosen
                        .iter()
                        .zip(values)
                        .filter(|(_, v)| **v != 0.0)
                        .map(|(i, _)| *i)
                        .collect(),
                );
            }
        }
        self.counter.rows_ns.fetch_add(rows_ns, Ordering::Relaxed);
        self.counter.down_ns.fetch_add(down_ns, Ordering::Relaxed);
        Ok(())
    }
}

impl SparseFfn {
    fn choose(&self, x: &[f32], n: usize, scratch: &mut Scratch) -> Result<Vec<Vec<u32>>> {
        let (hidden, width) = (self.inner.hidden_size(), self.inner.width());
        scratch.known_ok = false;
        Ok(match &self.chooser {
            Chooser::Oracle {
                threshold,
                criterion,
            } => {
                let act = self.inner.selection_scores(x, n, *criterion)?;
                let sets = act
                    .chunks_exact(width)
                    .map(|row| {
                        (0..width as u32)
                            .filter(|&j| row[j as usize].abs() > *threshold)
                            .collect()
                    })
                    .collect();
                // For one token the scores are the neurons' values computed
                // row by row (`matvec`: one `row_dot` per neuron, then the
                // bias, then the activation), as phase 1 computes them, when
                // they are values at all: the product criterion, or a plain
                // FFN. Phase 1 then reuses them; the bits are the same.
                let values =
                    *criterion == Criterion::Product || self.inner.gated_projections().is_none();
                if n == 1 && values {
                    scratch.known = act;
                    scratch.known_ok = true;
                }
                sets
            }
            Chooser::LowBit {
                selector,
                activation,
                measure,
            } => {
                let sets: Vec<Vec<u32>> = x
                    .chunks_exact(hidden)
                    .map(|xt| {
                        let mut active = Vec::new();
                        selector.select_as(*activation, xt, &mut scratch.select, &mut active);
                        active
                    })
                    .collect();
                if *measure {
                    let exact = self.inner.selection_scores(x, n, Criterion::Product)?;
                    let (mut all, mut hit) = (0u64, 0u64);
                    for (row, set) in exact.chunks_exact(width).zip(&sets) {
                        let above = |j: usize| row[j].abs() > selector.threshold;
                        all += (0..width).filter(|&j| above(j)).count() as u64;
                        hit += set.iter().filter(|&&j| above(j as usize)).count() as u64;
                    }
                    self.counter.exact.fetch_add(all, Ordering::Relaxed);
                    self.counter.exact_chosen.fetch_add(hit, Ordering::Relaxed);
                }
                sets
            }
            Chooser::Predicted(p) => {
                let (mut scratch, mut logits) = (Vec::new(), Vec::new());
                x.chunks_exact(hidden)
                    .map(|xt| {
                        let mut active = Vec::new();
                        p.predict(xt, &mut scratch, &mut logits, &mut active);
                        active
                    })
                    .collect()
            }
        })
    }
}

impl Ffn for SparseFfn {
    fn hidden_size(&self) -> usize {
        self.inner.hidden_size()
    }

    fn width(&self) -> usize {
        self.inner.width()
    }

    fn weight_bytes(&self) -> usize {
        self.inner.weight_bytes()
    }

    fn firing_activations(&self, x: &[f32], n: usize) -> Vec<f32> {
        self.inner.firing_activations(x, n)
    }

    fn forward(
        &self,
        x: &[f32],
        n: usize,
        active: ActiveSet<'_>,
        out: &mut [f32],
        fired: Option<&mut Fired>,
    ) -> Result<()> {
        match active {
            // A caller's explicit sets win (tests, experiments).
            ActiveSet::PerToken(_) => self.inner.forward(x, n, active, out, fired),
            ActiveSet::All => {
                // A second caller at the same time (none today) gets fresh buffers.
                let mut own = None;
                let mut guard = self.scratch.try_lock().ok();
                let scratch = match guard.as_deref_mut() {
                    Some(s) => s,
                    None => own.insert(Scratch::default()),
                };
                let started = Instant::now();
                let sets = self.choose(x, n, scratch)?;
                self.counter
                    .select_ns
                    .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
                self.counter.add(&sets, self.inner.width());
                match (&self.down_columns, self.inner.as_dense()) {
                    (Some(columns), Some(dense)) => {
                        self.forward_columns(dense, columns, x, &sets, out, fired, scratch)
                    }
                    _ => self
                        .inner
                        .forward(x, n, ActiveSet::PerToken(&sets), out, fired),
                }
            }
        }
    }
}

/// What a mode needs beyond the model: predictors (packed neuron order, as the
/// model's FFN when loaded from the same packed file) and SiLU thresholds.
pub struct SparsityData {
    pub predictors: Vec<Option<LowRankPredictor>>,
    pub silu_thresholds: Vec<Option<f32>>,
    /// What the SiLU thresholds are compared with.
    pub silu_criterion: Criterion,
    /// What `predicted` chooses neurons with.
    pub selector: Selector,
    /// Low-precision selectors also compute the exact criterion and count
    /// agreement (recall), at the cost of a dense gate and up per token.
    pub measure_selector: bool,
    /// The file's selector copies (format section 10), per layer (gate, up),
    /// in packed neuron order; empty when it has none.
    pub copies: Vec<Option<(QuantMatrix, QuantMatrix)>>,
}

impl SparsityData {
    /// The type of the file's selector copies, if it has them.
    pub fn copies_bits(&self) -> Option<LowBits> {
        self.copies.iter().flatten().next().map(|(g, _)| g.bits)
    }

    /// The selector `selector` stands for with this file.
    pub fn resolved_selector(&self) -> Selector {
        self.selector
            .resolve(self.silu_criterion, self.copies_bits())
    }
}

/// What `predicted` (and `flash`) choose neurons with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum Selector {
    /// For SiLU files calibrated by the product criterion: the type of the
    /// file's selector copies (format section 10), or `int8` without them
    /// (built at load); the trained predictors otherwise.
    Auto,
    /// The file's trained low-rank predictors.
    Trained,
    /// Int8 copies of gate and up (one scale per row), product criterion.
    Int8,
    /// Int4 copies of gate and up (blocks of 32, f16 scales), product criterion.
    Int4,
}

impl Selector {
    /// The selector `Auto` stands for, given the file's criterion and the
    /// type of its selector copies.
    pub fn resolve(self, criterion: Criterion, copies: Option<LowBits>) -> Selector {
        match (self, criterion) {
            (Selector::Auto, Criterion::Product) => match copies {
                Some(LowBits::Int4) => Selector::Int4,
                _ => Selector::Int8,
            },
            (Selector::Auto, Criterion::Gate) => Selector::Trained,
            (s, _) => s,
        }
    }
}

/// Whether a model's neurons are chosen by a threshold on their magnitude
/// (`|act(g) * u|` or `|act(g)|`): SiLU, and GeGLU (GELU has SiLU's negative
/// lobe) when the file holds product thresholds for every layer (older GeGLU
/// files: every non-zero gate, as ReLU). The in-DRAM and the flash modes ask
/// this one question.
pub fn chooses_by_magnitude(
    activation: crate::input::config::Activation,
    data: Option<&SparsityData>,
) -> bool {
    use crate::input::config::Activation;
    activation == Activation::Silu
        || (matches!(activation, Activation::Gelu | Activation::GeluTanh)
            && data.is_some_and(|d| {
                d.silu_criterion == Criterion::Product
                    && d.silu_thresholds.iter().all(Option::is_some)
            }))
}

/// Switches every layer of `model` to `mode`; returns the counter of computed
/// neurons (`None` for dense).
pub fn apply_ffn_mode(
    model: &mut Model,
    mode: FfnMode,
    data: Option<&SparsityData>,
) -> Result<Option<Arc<NeuronCounter>>> {
    if mode == FfnMode::Dense {
        return Ok(None);
    }
    use crate::input::config::Activation;
    let activation = model.config.activation;
    let drelu = activation == Activation::DRelu;
    // Layers chosen by a threshold on the neuron's magnitude: SiLU, and
    // GeGLU (GELU has SiLU's negative lobe) when the file holds product
    // thresholds for it (older GeGLU files: every non-zero gate, as before).
    let silu = chooses_by_magnitude(activation, data);
    let counter = Arc::new(NeuronCounter::default());
    let layers = std::mem::take(&mut model.layers);
    let mut wrapped = Vec::with_capacity(layers.len());
    for (i, layer) in layers.into_iter().enumerate() {
        let chooser = match mode {
            FfnMode::Dense => unreachable!("handled above"),
            FfnMode::Naive | FfnMode::Flash | FfnMode::OracleFlash => {
                return Err(Error::InvalidOption {
                    option: "ffn",
                    problem: format!(
                        "{} reads the FFN from disk: open the packed file with a Session (or runtime::flash::open_flash)",
                        mode.name()
                    ),
                })
            }
            FfnMode::Oracle => {
                let threshold = match (silu, data.and_then(|d| d.silu_thresholds.get(i).copied().flatten())) {
                    (false, _) => 0.0,
                    (true, Some(t)) => t,
                    (true, None) => {
                        return Err(Error::InvalidOption {
                            option: "ffn",
                            problem: "oracle on a SiLU model needs the calibrated thresholds of a packed file converted with calibration text".into(),
                        })
                    }
                };
                let criterion = match (silu, data) {
                    (true, Some(d)) => d.silu_criterion,
                    // dReLU fires only where both gate and up are positive:
                    // the neuron's value, not its gate, says which.
                    _ if drelu => Criterion::Product,
                    _ => Criterion::Gate,
                };
                Chooser::Oracle {
                    threshold,
                    criterion,
                }
            }
            FfnMode::Predicted
                if silu
                    && data.is_some_and(|d| {
                        matches!(
                            d.resolved_selector(),
                            Selector::Int8 | Selector::Int4
                        )
                    }) =>
            {
                let d = data.expect("checked by the guard");
                let bits = match d.resolved_selector() {
                    Selector::Int4 => LowBits::Int4,
                    _ => LowBits::Int8,
                };
                let threshold = match (d.silu_criterion, d.silu_thresholds.get(i).copied().flatten()) {
                    (Criterion::Product, Some(t)) => t,
                    _ => {
                        return Err(Error::InvalidOption {
                            option: "selector",
                            problem: "a low-precision selector needs the product thresholds of a file calibrated by this flashpack (converted with calibration text)".into(),
                        })
                    }
                };
                let (gate, up) = layer.ffn.gated_projections().ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "layer {i}: a low-precision selector needs the gate and up projections in DRAM"
                    ))
                })?;
                let selector = LowBitSelector {
                    gate: QuantMatrix::quantize(&gate.weight, bits),
                    up: QuantMatrix::quantize(&up.weight, bits),
                    gate_bias: gate.bias.clone(),
                    up_bias: up.bias.clone(),
                    threshold,
                };
                counter
                    .selector_bytes
                    .fetch_add(selector.stored_bytes() as u64, Ordering::Relaxed);
                Chooser::LowBit {
                    selector,
                    activation,
                    measure: d.measure_selector,
                }
            }
            FfnMode::Predicted => {
                let p = data.and_then(|d| d.predictors.get(i).cloned().flatten()).ok_or_else(|| {
                    Error::InvalidOption {
                        option: "ffn",
                        problem: format!(
                            "predicted needs a packed file with predictors (converted with calibration text); layer {i} has none"
                        ),
                    }
                })?;
                if p.d != layer.ffn.hidden_size() || p.ffn != layer.ffn.width() {
                    return Err(Error::InvalidArgument(format!(
                        "predictor of layer {i} does not fit the layer"
                    )));
                }
                Chooser::Predicted(p)
            }
        };
        let counter = Arc::clone(&counter);
        let down_columns = layer.ffn.as_dense().map(|d| {
            let down = &d.down().weight;
            transposed(&down.data, down.rows, down.cols)
        });
        wrapped.push(Layer {
            ffn: Box::new(SparseFfn {
                inner: layer.ffn,
                chooser,
                counter,
                down_columns,
                scratch: Mutex::new(Scratch::default()),
            }),
            ..layer
        });
    }
    model.layers = wrapped;
    Ok(Some(counter))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::config::Activation;
    use crate::runtime::weights::{Linear, Matrix};

    fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    fn linear(rows: usize, cols: usize, seed: u64, bias: bool) -> Linear {
        Linear {
            weight: Matrix::new(
                rows,
                cols,
                Storage::F32(values(rows * cols, seed, 1.0 / (cols as f32).sqrt())),
            )
            .unwrap(),
            bias: bias.then(|| values(rows, seed + 100, 0.1)),
        }
    }

    /// Wide enough that both phases split across threads (several chunks of
    /// chosen neurons, two or more output slices).
    fn ffn() -> DenseFfn {
        let (hidden, width) = (256, 700);
        DenseFfn {
            weights: FfnWeights::Gated {
                gate: linear(width, hidden, 1, true),
                up: linear(width, hidden, 2, false),
                down: linear(hidden, width, 3, true),
            },
            activation: Activation::Silu,
        }
    }

    fn sparse(dense: DenseFfn, chooser: Chooser) -> SparseFfn {
        let down = &dense.down().weight;
        let down_columns = Some(transposed(&down.data, down.rows, down.cols));
        SparseFfn {
            inner: Box::new(dense),
            chooser,
            counter: Arc::new(NeuronCounter::default()),
            down_columns,
            scratch: Mutex::new(Scratch::default()),
        }
    }

    #[test]
    fn sparse_forward_is_the_same_for_any_thread_count_and_equals_the_reference() {
        let dense = ffn();
        let (hidden, width) = (dense.hidden_size(), dense.width());
        // A threshold that keeps about half the neurons of a typical token.
        let probe = dense.neurons_all(&values(hidden, 7, 1.0), 1);
        let mut mags: Vec<f32> = probe.iter().map(|v| v.abs()).collect();
        mags.sort_by(f32::total_cmp);
        let threshold = mags[width / 2];
        let (gate, up) = dense.gated_projections().unwrap();
        let low_bit = |bits| Chooser::LowBit {
            selector: LowBitSelector {
                gate: QuantMatrix::quantize(&gate.weight, bits),
                up: QuantMatrix::quantize(&up.weight, bits),
                gate_bias: gate.bias.clone(),
                up_bias: up.bias.clone(),
                threshold,
            },
            activation: Activation::Silu,
            measure: false,
        };
        let choosers = [
            (
                "oracle",
                Chooser::Oracle {
                    threshold,
                    criterion: Criterion::Product,
                },
            ),
            ("int8", low_bit(LowBits::Int8)),
            ("int4", low_bit(LowBits::Int4)),
        ];
        for (name, chooser) in choosers {
            let ffn = sparse(dense.clone(), chooser);
            // One token (the oracle reuses its selection's values) and a batch.
            for n in [1usize, 3] {
                let x = values(n * hidden, 11 + n as u64, 1.0);
                let mut runs = Vec::new();
                for threads in [1, 2, 3] {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    let mut out = vec![0.0f32; n * hidden];
                    let mut fired = Fired::default();
                    pool.install(|| ffn.forward(&x, n, ActiveSet::All, &mut out, Some(&mut fired)))
                        .unwrap();
                    runs.push((out, fired));
                }
                let (out, fired) = &runs[0];
                let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                for (threads, (o, f)) in [1, 2, 3].iter().zip(&runs) {
                    assert_eq!(bits(o), bits(out), "{name} n {n} threads {threads}");
                    assert_eq!(f, fired, "{name} n {n} threads {threads}");
                }
                let chosen: usize = fired.per_token.iter().map(Vec::len).sum();
                assert!(
                    chosen > n * width / 4 && chosen < n * width * 3 / 4,
                    "{name}: {chosen} of {}",
                    n * width
                );
                // The dense FFN's own sparse path (row-major down) on the same sets.
                let mut given = vec![0.0f32; n * hidden];
                dense
                    .forward(
                        &x,
                        n,
                        ActiveSet::PerToken(&fired.per_token),
                        &mut given,
                        None,
                    )
                    .unwrap();
                assert_eq!(bits(&given), bits(out), "{name} n {n}: vs DenseFfn");
                // And an f64 reference of the same neurons.
                let w = |l: &Linear| l.weight.data.to_f32();
                let FfnWeights::Gated { gate, up, down } = &dense.weights else {
                    unreachable!("built gated above")
                };
                let (gw, uw, dw) = (w(gate), w(up), w(down));
                for (t, set) in fired.per_token.iter().enumerate() {
                    let xt = &x[t * hidden..(t + 1) * hidden];
                    let dot = |m: &[f32], r: usize| -> f64 {
                        (0..hidden)
                            .map(|k| m[r * hidden + k] as f64 * xt[k] as f64)
                            .sum()
                    };
                    let h: Vec<(usize, f64)> = set
                        .iter()
                        .map(|&i| {
                            let i = i as usize;
                            let g = dot(&gw, i) + gate.bias.as_ref().unwrap()[i] as f64;
                            (i, g / (1.0 + (-g).exp()) * dot(&uw, i))
                        })
                        .collect();
                    for r in 0..hidden {
                        let terms = h.iter().map(|&(i, v)| dw[r * width + i] as f64 * v);
                        let exact: f64 =
                            terms.clone().sum::<f64>() + down.bias.as_ref().unwrap()[r] as f64;
                        let size: f64 = terms.map(f64::abs).sum::<f64>() + 1.0;
                        let got = out[t * hidden + r] as f64;
                        assert!(
                            (got - exact).abs() <= 1e-5 * size,
                            "{name} token {t} output {r}: {got} vs {exact}"
                        );
                    }
                }
            }
        }
    }
}
