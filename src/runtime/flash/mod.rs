//! The flash runtime: a packed model whose FFN bundles stay on disk, under a
//! DRAM budget ("LLM in a flash", `../shared/PAPER.md` sections 2-5).
//!
//! Embeddings, attention, norms, FFN biases, predictors and the KV cache are in
//! DRAM (the packed file's dense part, read as for every other mode); each
//! layer's FFN is a [`FlashFfn`] reading bundles through one [`FlashReader`].
//! The model's forward pass is the same one every mode uses.
//!
//! - [`io`]: direct-I/O reader, aligned buffers, read counters.
//! - [`cache`]: one layer's resident-bundle matrix.
//! - [`ffn`]: [`FlashFfn`] (`flash` and `naive`).
//! - [`mod@bench`]: every disk mode and dense on the same tokens (the paper's Table 2).
//!
//! By default each FFN chunk's sha256 is checked the first time a run uses it,
//! in the bytes the reader brought in ([`verify`]); a damaged chunk stops the
//! run before any of its bytes is computed with. `flashpack verify` checks the
//! whole file.

pub mod bench;
pub mod cache;
pub mod ffn;
pub mod io;
pub mod moe;
pub mod plan;
pub mod replay;
pub mod verify;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::format::layout::{Compression, DENSE_SECTION};
use crate::format::PackedFile;
use crate::input::tensors::FfnNames;
use crate::runtime::packed::{packed_tokenizer, PackedWeights};
use crate::runtime::sparse::FfnMode;
use crate::runtime::weights::TensorSource;
use crate::runtime::{LoadedModel, Model, ModelSource};

pub use cache::BundleCache;
pub use ffn::{FlashFfn, FlashStats, LayerSpec, LayerState, Oracle, Workspace};
pub use io::{peak_rss_bytes, proc_read_bytes, FlashReader, IoMode};
pub use plan::scratch_for;
pub use replay::Replay;

/// How to run a packed file from flash.
#[derive(Debug, Clone)]
pub struct FlashOptions {
    /// One of the modes that read the FFN from disk ([`FfnMode::on_disk`]):
    /// `Naive` (the whole FFN per token), `Flash` (the chosen neurons through
    /// the window cache) or `OracleFlash` (the neurons that fire, known from an
    /// in-DRAM copy: the lower bound on reads for a window).
    pub mode: FfnMode,
    /// Tokens before the current one whose neurons stay resident.
    pub window: usize,
    /// Reads in flight.
    pub io_threads: usize,
    /// What keeps them in flight: a thread each, or one io_uring.
    pub io_engine: io::IoEngine,
    /// Wanted bundles at most this many apart are read in one operation.
    pub coalesce_gap: usize,
    /// DRAM budget in bytes (`None`: size the caches from calibration only).
    pub dram_budget: Option<u64>,
    /// Most positions the KV cache will hold (counts toward the budget).
    pub context: usize,
    /// Rows of every layer's cache, overriding calibration (tests).
    pub capacity: Option<usize>,
    /// Check each FFN chunk's sha256 the first time the run uses it, before
    /// using it (default; `--no-verify-reads` turns it off).
    pub verify_reads: bool,
    /// Recorded neuron sets that choose instead of the predictor (`Flash`)
    /// or the in-DRAM copy (`Oracle`), and size the caches instead of the
    /// calibration maxima: measurements at scale (see [`replay`]).
    pub replay: Option<Arc<Replay>>,
    /// What `flash` chooses neurons with (`--selector`): with `auto`, a SiLU
    /// file's selector copies (format section 10) when it has them, its
    /// trained predictors otherwise.
    pub selector: crate::runtime::sparse::Selector,
    /// Mixture-of-experts files with routing statistics (`convert --calib`):
    /// the share of each sparse layer's cache rows given to its most often
    /// chosen experts, read at open and never evicted (0: none pinned).
    pub pin_experts_share: f64,
}

impl Default for FlashOptions {
    fn default() -> Self {
        FlashOptions {
            mode: FfnMode::Flash,
            window: 4,
            io_threads: DEFAULT_IO_THREADS,
            io_engine: io::IoEngine::Auto,
            coalesce_gap: 1,
            dram_budget: None,
            context: 2048,
            capacity: None,
            verify_reads: true,
            replay: None,
            selector: crate::runtime::sparse::Selector::Auto,
            pin_experts_share: moe::DEFAULT_PIN_SHARE,
        }
    }
}

/// Reads in flight by default. Flash reads are small (one to a few bundles),
/// and small reads reach the disk's throughput only with many in flight: at
/// the 2 GiB scale benchmark (BENCHMARKS.md) 16 instead of 4 cut flash's I/O
/// time per token by a third; the paper uses 32 threads.
pub const DEFAULT_IO_THREADS: usize = 16;

/// Fixed overhead counted in every budget: the program, its allocator, the
/// tokenizer and thread stacks. The whole `run` of the opt-relu fixture in flash
/// mode peaks at about 17 MiB (VmHWM), this overhead included.
pub const FIXED_OVERHEAD_BYTES: u64 = 24 << 20;

/// Reads at least this big in naive mode (the paper's baseline is not slowed
/// by small reads).
pub const NAIVE_READ_BYTES: usize = 1 << 20;

/// Coalesced flash reads are at most this big.
pub const FLASH_READ_BYTES: usize = 256 << 10;

/// What the flash mode holds in DRAM, in bytes.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct MemoryPlan {
    #[serde(rename = "dense_bytes")]
    pub dense: u64,
    #[serde(rename = "predictors_bytes")]
    pub predictors: u64,
    /// The low-precision selector copies (format section 10) `flash` chooses
    /// with, held in DRAM.
    #[serde(rename = "selector_bytes")]
    pub selector: u64,
    #[serde(rename = "kv_cache_bytes")]
    pub kv_cache: u64,
    #[serde(rename = "staging_bytes")]
    pub staging: u64,
    #[serde(rename = "caches_bytes")]
    pub caches: u64,
    #[serde(rename = "fixed_overhead_bytes")]
    pub fixed_overhead: u64,
    /// With the smallest caches that work (scratch only).
    #[serde(rename = "minimum_bytes")]
    pub minimum: u64,
    #[serde(rename = "total_bytes")]
    pub total: u64,
    pub capacity_per_layer: Vec<usize>,
    pub scratch_per_layer: Vec<usize>,
    /// Hottest neurons held for the whole run (budget to spare).
    pub pinned_per_layer: Vec<usize>,
    /// Bytes read at open to fill the pinned rows (not in `bytes_read`).
    #[serde(rename = "pinned_read_bytes")]
    pub pinned_bytes_read: u64,
}

/// A running flash model's shared parts, for statistics.
pub struct FlashRuntime {
    pub options: FlashOptions,
    /// What `flash` chooses neurons with (`trained`, `int8`, `int4`: the
    /// file's selector copies); `None` in the modes that do not choose or
    /// with a replay.
    pub selector: Option<crate::runtime::sparse::Selector>,
    pub reader: Arc<FlashReader>,
    pub stats: Arc<FlashStats>,
    pub plan: MemoryPlan,
    pub layers: usize,
    /// Each layer's state (resident counts).
    ffns: Vec<Arc<FlashFfn>>,
    /// A mixture-of-experts model: its sparse layers and their counters
    /// ([`moe`]); `ffns` then holds its dense FFN layers only.
    pub moe: Option<Arc<moe::MoeRuntime>>,
}

/// Statistics of a run, as reported by `run`/`eval --json`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FlashReport {
    /// `naive`, `flash` or `oracle` (`--ffn oracle-flash`).
    #[serde(serialize_with = "serialize_disk_mode")]
    pub mode: FfnMode,
    /// What flash chose neurons with (null in naive and oracle-flash).
    pub selector: Option<crate::runtime::sparse::Selector>,
    pub io_mode: IoMode,
    pub window: usize,
    pub io_threads: usize,
    pub io_engine: io::IoEngine,
    pub tokens: u64,
    #[serde(rename = "read_bytes")]
    pub bytes_read: u64,
    pub read_ops: u64,
    pub mean_read_bytes: f64,
    #[serde(rename = "read_bytes_per_token")]
    pub bytes_read_per_token: f64,
    pub window_hit_rate: f64,
    pub neurons_chosen_per_token: f64,
    pub bundles_loaded: u64,
    pub bundles_evicted: u64,
    pub bundles_overflowed: u64,
    /// Fraction of the FFN neurons computed over the run (naive: all of
    /// them; flash: the chosen ones; oracle-flash: those that fire).
    pub ffn_active_fraction: f64,
    /// Whether first-use verification of FFN chunks was on.
    pub verify_reads: bool,
    /// Chunks whose sha256 was checked (each once per run).
    pub chunks_verified: u64,
    /// Bytes hashed by those checks (from the reads themselves; chunks and
    /// bytes since open, pinned rows included).
    pub hashed_bytes: u64,
    /// Bytes read only to complete a chunk for its check, included in
    /// `bytes_read` (naive reads whole chunks: 0).
    pub verify_extra_read_bytes: u64,
    /// CPU time spent hashing, summed over the I/O threads (it overlaps reads
    /// and falls within `ms_io`).
    pub verify_hash_cpu_ms: f64,
    pub resident_per_layer: Vec<usize>,
    pub capacity_per_layer: Vec<usize>,
    #[serde(rename = "predictor_ms")]
    pub ms_predictor: f64,
    #[serde(rename = "io_ms")]
    pub ms_io: f64,
    #[serde(rename = "memory_ms")]
    pub ms_memory: f64,
    #[serde(rename = "compute_ms")]
    pub ms_compute: f64,
    pub dram_plan: MemoryPlan,
    /// A mixture-of-experts model: experts chosen and read per token, routing
    /// time, cache rows (absent for dense models).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub experts: Option<moe::ExpertsReport>,
}

impl FlashRuntime {
    /// The count of FFN neurons computed, as the in-DRAM sparse modes report
    /// it (`ffn_active_fraction`).
    pub fn neuron_counter(&self) -> Arc<crate::runtime::sparse::NeuronCounter> {
        Arc::clone(&self.stats.neurons)
    }

    /// File offset of layer 0's first bundle.
    pub fn first_ffn_offset(&self) -> u64 {
        let experts = self.moe.iter().flat_map(|m| {
            m.layers
                .iter()
                .flat_map(|l| l.experts.iter().map(|e| e.spec.offset))
        });
        self.ffns
            .iter()
            .map(|f| f.spec.offset)
            .chain(experts)
            .min()
            .unwrap_or(0)
    }

    pub fn report(&self) -> FlashReport {
        let s = &self.stats;
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        // A MoE model counts (layer, token) at its layers, not per expert.
        let evaluations = match &self.moe {
            Some(m) => get(&m.stats.layer_tokens),
            None => get(&s.evaluations),
        };
        let tokens = evaluations / self.layers.max(1) as u64;
        let bytes = get(&self.reader.counters.bytes);
        let ops = get(&self.reader.counters.ops);
        let needed = get(&s.needed);
        let ms = |c: &std::sync::atomic::AtomicU64| get(c) as f64 / 1e6;
        FlashReport {
            mode: self.options.mode,
            selector: self.selector,
            io_mode: self.reader.mode(),
            window: self.options.window,
            io_threads: self.reader.threads(),
            io_engine: self.reader.engine(),
            tokens,
            bytes_read: bytes,
            read_ops: ops,
            mean_read_bytes: bytes as f64 / ops.max(1) as f64,
            bytes_read_per_token: bytes as f64 / tokens.max(1) as f64,
            window_hit_rate: get(&s.hits) as f64 / needed.max(1) as f64,
            neurons_chosen_per_token: needed as f64 / tokens.max(1) as f64,
            bundles_loaded: get(&s.loaded),
            bundles_evicted: get(&s.evicted),
            bundles_overflowed: get(&s.overflow),
            ffn_active_fraction: s.neurons.active_fraction(),
            verify_reads: self.options.verify_reads,
            chunks_verified: get(&s.verify.chunks),
            hashed_bytes: get(&s.verify.hashed_bytes),
            verify_extra_read_bytes: get(&s.verify.extra_read_bytes),
            verify_hash_cpu_ms: ms(&s.verify.hash_cpu_ns),
            resident_per_layer: self.resident_per_layer(),
            capacity_per_layer: self.plan.capacity_per_layer.clone(),
            ms_predictor: ms(&s.ns_predict),
            ms_io: ms(&s.ns_io),
            ms_memory: ms(&s.ns_memory),
            ms_compute: ms(&s.ns_compute),
            dram_plan: self.plan.clone(),
            experts: self.moe.as_ref().map(|m| m.report()),
        }
    }

    /// Rows resident in each layer's cache now (a sparse layer's experts
    /// share one cache).
    fn resident_per_layer(&self) -> Vec<usize> {
        match &self.moe {
            None => self.ffns.iter().map(|f| f.resident()).collect(),
            Some(m) => {
                let mut rows = vec![0; self.layers];
                for f in &self.ffns {
                    rows[f.spec.layer] += f.resident();
                }
                for l in &m.layers {
                    rows[l.layer] += l.resident_rows();
                }
                rows
            }
        }
    }
}

/// The disk mode as the flash report names it (`--ffn oracle-flash` is
/// `oracle` there, as it always was).
fn serialize_disk_mode<S: serde::Serializer>(
    mode: &FfnMode,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(match mode {
        FfnMode::Naive => "naive",
        FfnMode::OracleFlash => "oracle",
        _ => "flash",
    })
}

impl FlashReport {
    /// Human lines for stderr.
    pub fn human(&self) -> String {
        let mib = |b: f64| b / (1 << 20) as f64;
        let resident: usize = self.resident_per_layer.iter().sum();
        format!(
            "flash I/O ({:?}, {} reads, window {}, {} in flight through {}): {:.2} MiB read in {} reads (mean {:.1} KiB), {:.3} MiB/token over {} tokens\n\
             window hit rate {:.1}%, {:.1} neurons chosen per token, {} resident now ({} bundles loaded, {} evicted, {} via scratch)\n\
             {:.1}% of FFN neurons computed; {}\n\
             time: predictor {:.1} ms, I/O {:.1} ms, memory management {:.1} ms, FFN compute {:.1} ms",
            self.mode,
            self.io_mode.as_str(),
            self.window,
            self.io_threads,
            self.io_engine.as_str(),
            mib(self.bytes_read as f64),
            self.read_ops,
            self.mean_read_bytes / 1024.0,
            mib(self.bytes_read_per_token),
            self.tokens,
            100.0 * self.window_hit_rate,
            self.neurons_chosen_per_token,
            resident,
            self.bundles_loaded,
            self.bundles_evicted,
            self.bundles_overflowed,
            100.0 * self.ffn_active_fraction,
            if self.verify_reads {
                format!(
                    "first use of each FFN chunk verified: {} chunks, {:.2} MiB hashed in {:.1} ms of CPU, {:.2} MiB read only to complete chunks",
                    self.chunks_verified,
                    mib(self.hashed_bytes as f64),
                    self.verify_hash_cpu_ms,
                    mib(self.verify_extra_read_bytes as f64)
                )
            } else {
                "FFN chunks not verified (--no-verify-reads)".to_string()
            },
            self.ms_predictor,
            self.ms_io,
            self.ms_memory,
            self.ms_compute
        ) + &self
            .experts
            .as_ref()
            .map(|e| {
                format!(
                    "\nexperts: {:.2} chosen per token, {:.2} read from disk per token; routing {:.1} ms",
                    e.chosen_per_token, e.read_per_token, e.routing_ms
                )
            })
            .unwrap_or_default()
    }
}

/// Parses a DRAM budget: bytes (`1000000`), units (`512MiB`, `1.5GB`, `2G`,
/// binary for `K`/`M`/`G`/`T` with or without `iB`, decimal for `kB`/`MB`/`GB`/`TB`),
/// or a percentage of `file_bytes` (`50%`).
pub fn parse_size(text: &str, file_bytes: u64) -> Result<u64> {
    let bad = || Error::InvalidOption {
        option: "dram_budget",
        problem: format!(
            "{text:?}: expected bytes, a size such as 512MiB or 1.5GB, or a percentage such as 50%"
        ),
    };
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| bad())?;
    if !value.is_finite() || value < 0.0 {
        return Err(bad());
    }
    let scale = match unit.trim() {
        "" | "B" => 1.0,
        "%" => file_bytes as f64 / 100.0,
        "k" | "kB" | "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "K" | "KiB" => 1024.0,
        "M" | "MiB" => 1024.0 * 1024.0,
        "G" | "GiB" => 1024.0 * 1024.0 * 1024.0,
        "T" | "TiB" => 1024.0f64.powi(4),
        _ => return Err(bad()),
    };
    Ok((value * scale).round() as u64)
}

/// Rows a window of `tokens` consecutive tokens needed on calibration text,
/// from the maxima at K = 1, 2, 4, 8 (linear in between, proportional beyond).
pub fn window_rows(window_max: &[u64], tokens: usize) -> f64 {
    let points = [1usize, 2, 4, 8];
    let wm: Vec<f64> = window_max.iter().map(|&v| v as f64).collect();
    if wm.len() < 4 {
        return 0.0;
    }
    let k = tokens.max(1);
    if k >= 8 {
        return wm[3] * k as f64 / 8.0;
    }
    let j = points.iter().rposition(|&p| p <= k).unwrap_or(0);
    if points[j] == k {
        return wm[j];
    }
    let (k0, k1) = (points[j] as f64, points[j + 1] as f64);
    wm[j] + (wm[j + 1] - wm[j]) * (k as f64 - k0) / (k1 - k0)
}

/// Opens a packed file for `naive` or `flash` execution: the dense part in
/// DRAM, the FFN on disk. Refuses (an error naming the minimum) when the
/// budget is below what the mode needs.
pub fn open_flash(path: &Path, opts: &FlashOptions) -> Result<(LoadedModel, FlashRuntime)> {
    if !opts.mode.on_disk() {
        return Err(Error::InvalidArgument(format!(
            "the {:?} mode keeps the FFN in DRAM; open it with runtime::open_model or a Session",
            opts.mode
        )));
    }
    let file = PackedFile::open(path)?;
    if file.config.moe.is_some() {
        return moe::open_flash_moe(file, opts);
    }
    let m = &file.manifest;
    let cfg = &file.config;
    let align = (m.alignment as usize).max(512);
    let (hidden, neurons) = (cfg.hidden_size, cfg.ffn_width);
    let layers = cfg.num_layers;
    let mut specs = Vec::with_capacity(layers);
    for entry in &m.ffn_layers {
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
                "{}: the FFN bundles are {} (format section 9), which the flash modes do not \
                 read yet; use the dense, oracle or predicted mode",
                path.display(),
                entry.dtype.name()
            ))
        })?;
        specs.push(LayerSpec {
            layer: entry.layer as usize,
            offset: section.offset,
            neurons: entry.neurons as usize,
            hidden: entry.hidden as usize,
            dtype,
            parts: entry.parts.clone(),
            stride: entry.bundle_bytes as usize,
            chunk_bytes: section.chunk_raw_bytes as usize,
        });
    }
    let stride_max = specs.iter().map(|s| s.stride).max().unwrap_or(0);
    let round = |b: usize| b.div_ceil(align) * align;
    let slot_bytes = match opts.mode {
        FfnMode::Naive => round(NAIVE_READ_BYTES.max(stride_max)) + align,
        _ => round(FLASH_READ_BYTES.max(stride_max)) + align,
    };
    let mut sparsity = crate::runtime::open::sparsity_data(&file)?;
    if let Some(d) = sparsity.as_mut() {
        d.selector = opts.selector;
    }

    // What stays in DRAM whatever the cache size.
    let mut plan = MemoryPlan {
        fixed_overhead: FIXED_OVERHEAD_BYTES,
        ..MemoryPlan::default()
    };
    for t in &m.tensors {
        if t.section == DENSE_SECTION {
            let numel: u64 = t.shape.iter().product();
            // Vectors (norms, biases) are widened to f32 at load.
            plan.dense += if t.shape.len() == 1 {
                numel * 4
            } else {
                t.length
            };
        }
    }
    if let Some(r) = &opts.replay {
        if r.layers() != layers || r.width() != neurons {
            return Err(Error::InvalidArgument(format!(
                "the replay has {} layers of {} neurons; the model has {layers} of {neurons}",
                r.layers(),
                r.width()
            )));
        }
    }
    // `flash` chooses with the file's selector copies (format section 10) or
    // its trained predictors, as `predicted` with the same --selector does.
    // `auto` takes the copies only where they apply (a SiLU or GeGLU file
    // calibrated by the product criterion that has them); elsewhere, as
    // before them, the trained predictors (flash cannot build copies: it has
    // no gate and up in DRAM).
    let magnitude =
        crate::runtime::sparse::chooses_by_magnitude(file.config.activation, sparsity.as_ref());
    let chooser = match (&sparsity, opts.mode, &opts.replay) {
        (Some(d), FfnMode::Flash, None) => match d.selector {
            crate::runtime::sparse::Selector::Auto
                if magnitude
                    && d.silu_criterion == crate::runtime::ffn::Criterion::Product
                    && d.copies_bits().is_some() =>
            {
                d.resolved_selector()
            }
            crate::runtime::sparse::Selector::Auto => crate::runtime::sparse::Selector::Trained,
            explicit => explicit,
        },
        _ => crate::runtime::sparse::Selector::Trained,
    };
    let low_bits = match chooser {
        crate::runtime::sparse::Selector::Int8 => Some(crate::runtime::lowbit::LowBits::Int8),
        crate::runtime::sparse::Selector::Int4 => Some(crate::runtime::lowbit::LowBits::Int4),
        _ => None,
    };
    if let Some(bits) = low_bits {
        let d = sparsity
            .as_ref()
            .expect("a low-bit selector resolves from the file's data");
        let name = crate::format::layout::SelectorType::from(bits).name();
        if !magnitude || d.silu_criterion != crate::runtime::ffn::Criterion::Product {
            return Err(Error::InvalidOption {
                option: "selector",
                problem: format!(
                    "{name} compares |act(g) * u| with the product thresholds of a SiLU or GeGLU file calibrated by this flashpack (converted with calibration text)"
                ),
            });
        }
        if d.copies_bits() != Some(bits) {
            return Err(Error::InvalidOption {
                option: "selector",
                problem: format!(
                    "{name} in the flash mode reads the file's {name} selector copies, and {} has {}; convert with {name} selector copies, or use the predicted mode (which builds them in DRAM)",
                    path.display(),
                    d.copies_bits().map_or("none".to_string(), |b| {
                        format!("{} copies", crate::format::layout::SelectorType::from(b).name())
                    })
                ),
            });
        }
        for (g, u) in d.copies.iter().flatten() {
            plan.selector += (g.stored_bytes() + u.stored_bytes()) as u64;
        }
    } else if opts.mode == FfnMode::Flash && opts.replay.is_none() {
        let data = sparsity.as_ref();
        for (i, _) in specs.iter().enumerate() {
            let p = data
                .and_then(|d| d.predictors.get(i).and_then(Option::as_ref))
                .ok_or_else(|| {
                    Error::InvalidOption {
                        option: "ffn",
                        problem: format!(
                            "flash needs a packed file with predictors (converted with calibration text); layer {i} has none"
                        ),
                    }
                })?;
            plan.predictors += ((p.a.len() + p.b.len() + p.bias.len()) * 4) as u64;
        }
    }
    let kv_dim = cfg.num_kv_heads * cfg.head_dim;
    plan.kv_cache = (layers * 2 * opts.context.min(cfg.max_context) * kv_dim * 4) as u64;
    // Read slots, the down-projection accumulator (32 lanes of `hidden`) of
    // single tokens and two per compute thread for batches, index lists.
    let accumulators = 1 + 2 * rayon::current_num_threads();
    plan.staging = (opts.io_threads.max(1) * slot_bytes
        + accumulators * 32 * hidden * 4
        + neurons * 16) as u64;

    // Cache rows per layer: the window's calibration maximum, scaled by how
    // many more neurons the predictor picks than fire, plus 10% headroom.
    let mut sets = Vec::with_capacity(layers);
    for (i, spec) in specs.iter().enumerate() {
        let wm = m
            .calibration
            .as_ref()
            .and_then(|c| c.layers.get(i))
            .map(|l| l.window_max.clone())
            .unwrap_or_default();
        let over = m
            .predictors
            .iter()
            .filter(|_| opts.mode == FfnMode::Flash && low_bits.is_none())
            .find(|p| p.layer as usize == i)
            .map(|p| {
                if p.frac_true > 0.0 {
                    (p.frac_predicted / p.frac_true).max(1.0)
                } else {
                    1.0
                }
            })
            .unwrap_or(1.0);
        let want = match &opts.replay {
            Some(r) => (r.window_max(i, opts.window + 1) as f64 * 1.1).ceil() as usize,
            None => (window_rows(&wm, opts.window + 1) * over * 1.1).ceil() as usize,
        };
        sets.push(plan::BundleSet {
            kind: plan::SetKind::Neurons,
            stride: spec.stride,
            keys: spec.neurons,
            want,
        });
    }
    plan = plan::plan(&plan::PlanRequest {
        resident: plan,
        sets,
        caching: opts.mode != FfnMode::Naive,
        budget: opts.dram_budget,
        capacity: opts.capacity,
        mode: opts.mode.name(),
    })?;
    let fixed = plan.dense
        + plan.predictors
        + plan.selector
        + plan.kv_cache
        + plan.staging
        + plan.fixed_overhead;
    let want_rows = plan.capacity_per_layer.clone();
    let scratch_rows = plan.scratch_per_layer.clone();
    let pinned = plan.pinned_per_layer.clone();

    let probe = specs
        .first()
        .map_or(0, |s| s.offset / align as u64 * align as u64);
    let reader = Arc::new(FlashReader::open_with(
        path,
        align,
        probe,
        opts.io_threads,
        opts.io_engine,
    )?);
    let workspace = Arc::new(Mutex::new(Workspace::new(
        hidden,
        neurons,
        m.predictors
            .iter()
            .map(|p| p.rank as usize)
            .max()
            .unwrap_or(0),
        opts.io_threads.max(1),
        slot_bytes,
        align,
    )?));
    let stats = Arc::new(FlashStats::default());
    let weights = PackedWeights::read_dense(&file)?;
    let window = (opts.mode != FfnMode::Naive).then_some(opts.window);
    // The oracle's in-DRAM copy of every FFN (outside the budget by definition).
    let mut oracles: Vec<Option<Oracle>> = Vec::new();
    if opts.mode == FfnMode::OracleFlash && opts.replay.is_none() {
        let silu = magnitude;
        let full = Model::load(&file.config, &file.names, &PackedWeights::read_all(&file)?)?;
        for (i, layer) in full.layers.into_iter().enumerate() {
            let threshold = if silu {
                sparsity
                    .as_ref()
                    .and_then(|d| d.silu_thresholds.get(i).copied().flatten())
                    .ok_or_else(|| {
                        Error::InvalidOption {
                            option: "ffn",
                            problem: "oracle-flash on a SiLU or GeGLU model needs the calibrated thresholds of a packed file converted with calibration text".into(),
                        }
                    })?
            } else {
                0.0
            };
            oracles.push(Some(Oracle {
                ffn: layer.ffn,
                threshold,
                criterion: match (silu, &sparsity) {
                    (true, Some(d)) => d.silu_criterion,
                    // dReLU: a neuron fires where gate and up are both positive.
                    _ if file.config.activation == crate::input::config::Activation::DRelu => {
                        crate::runtime::ffn::Criterion::Product
                    }
                    _ => crate::runtime::ffn::Criterion::Gate,
                },
            }));
        }
    }
    let mut ffns: Vec<Arc<FlashFfn>> = Vec::new();
    let mut caches_bytes = 0u64;
    let model = Model::load_with_ffn(&file.config, &file.names, &weights, &mut |i, names| {
        let spec = specs[i].clone();
        let load_bias = |name: &Option<String>, len: usize| -> Result<Option<Vec<f32>>> {
            match name {
                Some(n) => Ok(Some(weights.tensor(n, &[len])?.to_f32())),
                None => Ok(None),
            }
        };
        let (gate_bias, up_bias, down_bias) = match names {
            FfnNames::Plain { up, down } => (
                None,
                load_bias(&up.bias, spec.neurons)?,
                load_bias(&down.bias, spec.hidden)?,
            ),
            FfnNames::Gated { gate, up, down } => (
                load_bias(&gate.bias, spec.neurons)?,
                load_bias(&up.bias, spec.neurons)?,
                load_bias(&down.bias, spec.hidden)?,
            ),
            FfnNames::Moe(_) => {
                return Err(Error::InvalidArgument(
                    "a packed file does not hold mixture-of-experts layers".into(),
                ))
            }
        };
        let predictor = sparsity
            .as_mut()
            .and_then(|d| d.predictors.get_mut(i).and_then(Option::take));
        let lowbit = match low_bits {
            Some(_) => {
                let d = sparsity.as_mut().expect("checked above");
                let (gate, up) = d.copies.get_mut(i).and_then(Option::take).ok_or_else(|| {
                    Error::InvalidArgument(format!("layer {i} has no selector copies"))
                })?;
                let threshold = d.silu_thresholds.get(i).copied().flatten().ok_or_else(|| {
                    Error::InvalidArgument(format!("layer {i} has no product threshold"))
                })?;
                Some(crate::runtime::lowbit::LowBitSelector {
                    gate,
                    up,
                    gate_bias: gate_bias.clone(),
                    up_bias: up_bias.clone(),
                    threshold,
                })
            }
            None => None,
        };
        let cache = BundleCache::new(spec.neurons, spec.stride, want_rows[i], scratch_rows[i])?;
        caches_bytes += cache.size_bytes() as u64;
        let state = Mutex::new(LayerState::new(cache, spec.neurons));
        let ffn = Arc::new(FlashFfn {
            spec,
            activation: file.config.activation,
            gate_bias,
            up_bias,
            down_bias,
            predictor: if opts.mode == FfnMode::Flash && lowbit.is_none() {
                predictor
            } else {
                None
            },
            lowbit,
            oracle: oracles.get_mut(i).and_then(Option::take),
            replay: opts.replay.clone(),
            window,
            coalesce_gap: opts.coalesce_gap,
            reader: Arc::clone(&reader),
            workspace: Arc::clone(&workspace),
            state,
            stats: Arc::clone(&stats),
            verifier: if opts.verify_reads {
                let entry = &file.manifest.ffn_layers[i];
                let section = file
                    .section(&entry.section)
                    .expect("checked at open: FFN sections exist");
                Some(verify::ChunkVerifier::new(path, section)?)
            } else {
                None
            },
        });
        ffns.push(Arc::clone(&ffn));
        Ok(Box::new(Shared(ffn)))
    })?;
    plan.caches = caches_bytes;
    plan.total = fixed + caches_bytes;
    for (ffn, &count) in ffns.iter().zip(&pinned) {
        ffn.pin_hottest(count)?;
    }
    // What the run reads is counted from here.
    plan.pinned_bytes_read = reader.counters.bytes.swap(0, Ordering::Relaxed);
    reader.counters.ops.store(0, Ordering::Relaxed);
    stats.loaded.store(0, Ordering::Relaxed);
    // Chunks checked while pinning stay checked and counted; the bytes read
    // to complete them are in `pinned_bytes_read`, not the run's.
    stats.verify.extra_read_bytes.store(0, Ordering::Relaxed);
    for c in [&stats.ns_io, &stats.ns_memory] {
        c.store(0, Ordering::Relaxed);
    }
    let loaded = LoadedModel {
        model,
        tokenizer: packed_tokenizer(&file)?,
        source: ModelSource::Packed,
        sparsity,
    };
    Ok((
        loaded,
        FlashRuntime {
            options: opts.clone(),
            selector: (opts.mode == FfnMode::Flash && opts.replay.is_none()).then_some(chooser),
            reader,
            stats,
            plan,
            layers,
            ffns,
            moe: None,
        },
    ))
}

/// An FFN layer ([`FlashFfn`], [`moe::FlashMoe`]) that the model owns while
/// the runtime also keeps a handle to it (for statistics).
pub(crate) struct Shared<T>(pub(crate) Arc<T>);

impl<T: crate::runtime::Ffn> crate::runtime::Ffn for Shared<T> {
    fn hidden_size(&self) -> usize {
        self.0.hidden_size()
    }
    fn width(&self) -> usize {
        self.0.width()
    }
    fn weight_bytes(&self) -> usize {
        self.0.weight_bytes()
    }
    fn firing_activations(&self, x: &[f32], n: usize) -> Vec<f32> {
        self.0.firing_activations(x, n)
    }
    fn forward(
        &self,
        x: &[f32],
        n: usize,
        active: crate::runtime::ActiveSet<'_>,
        out: &mut [f32],
        fired: Option<&mut crate::runtime::Fired>,
    ) -> Result<()> {
        self.0.forward(x, n, active, out, fired)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512MiB", 0).unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5GB", 0).unwrap(), 1_500_000_000);
        assert_eq!(parse_size("50%", 1000).unwrap(), 500);
        assert_eq!(parse_size("4096", 0).unwrap(), 4096);
        assert_eq!(parse_size("2G", 0).unwrap(), 2 << 30);
        assert!(parse_size("lots", 0).is_err());
        assert!(parse_size("5 parsecs", 0).is_err());
    }

    #[test]
    fn window_rows_interpolate() {
        let wm = [10, 16, 24, 40];
        assert_eq!(window_rows(&wm, 1), 10.0);
        assert_eq!(window_rows(&wm, 3), 20.0);
        assert_eq!(window_rows(&wm, 5), 28.0);
        assert_eq!(window_rows(&wm, 16), 80.0);
    }
}
