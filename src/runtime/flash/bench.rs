//! The paper's Table 2 on one packed file: the same tokens through `naive`,
//! `flash` (window 0 and the chosen window), `oracle-flash` and `dense`, each
//! opened fresh (direct reads: nothing is served from the page cache), with
//! bytes read, I/O time and total time per token; then the in-DRAM sparse
//! modes `oracle` and `predicted`. Every row also has the wall time spent in
//! the layers' FFNs per token (selection and reads included), so the sparse
//! FFN's cost against the dense one is read off one run.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::error::Result;
use crate::runtime::ffn::{ActiveSet, Criterion, Ffn, Fired};
use crate::runtime::flash::io::{ReadOp, Staging};
use crate::runtime::flash::{FlashOptions, FlashReader};
use crate::runtime::sparse::FfnMode;
use crate::runtime::weights::Linear;
use crate::runtime::{Logits, Model, Session, SessionOptions};

/// One mode's measurement.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModeRow {
    pub mode: String,
    pub io_mode: Option<&'static str>,
    pub tokens: usize,
    #[serde(rename = "read_bytes_per_token")]
    pub bytes_read_per_token: f64,
    pub read_ops_per_token: f64,
    pub mean_read_bytes: f64,
    /// Bytes read over I/O time.
    pub read_gb_per_s: f64,
    pub io_ms_per_token: f64,
    /// The rest of the paper's Table 3 split: choosing neurons, cache
    /// bookkeeping and copies, the FFN's arithmetic.
    pub predictor_ms_per_token: f64,
    pub memory_ms_per_token: f64,
    pub ffn_compute_ms_per_token: f64,
    /// Wall time inside the layers' FFNs per token: choosing neurons, reads
    /// (flash modes) and arithmetic; the same measure in every mode.
    pub ffn_ms_per_token: f64,
    /// Fraction of FFN neurons computed (1 for dense and naive).
    pub ffn_active_fraction: f64,
    /// What chose the neurons of `predicted` and `flash` (`trained`, `int8`,
    /// `int4`).
    pub selector: Option<crate::runtime::sparse::Selector>,
    pub ms_per_token: f64,
    pub window_hit_rate: f64,
    /// Whether each FFN chunk was verified on first use.
    pub verify_reads: bool,
    /// Bytes the check hashed (each used chunk once).
    pub hashed_bytes: u64,
    /// Bytes read only to complete chunks for their check (in the bytes read).
    pub verify_extra_read_bytes: u64,
    /// CPU time hashing per token, summed over the I/O threads (it overlaps
    /// reads and falls within the I/O time).
    pub verify_hash_cpu_ms_per_token: f64,
    /// The disk's own throughput for reads of this mode's mean size, as many
    /// in flight, at random aligned offsets of the same file, measured right
    /// after the mode (the physical limit for its read pattern).
    pub disk_gb_per_s_same_size: f64,
    /// `ms_per_token` of naive over this mode's.
    pub speedup_over_naive: f64,
    /// DRAM the mode planned (dense part, caches, buffers, KV cache, fixed
    /// overhead), as `run` reports it; all zero for dense.
    pub dram_plan: crate::runtime::flash::MemoryPlan,
    /// A mixture-of-experts file's disk modes: experts per token and routing
    /// time (absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub experts: Option<ExpertsRow>,
}

/// The experts' columns of a mode's row (a mixture-of-experts file).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExpertsRow {
    /// Experts the router chose per token (all sparse layers).
    pub chosen_per_token: f64,
    /// Of those, experts that needed bundles read from disk.
    pub read_per_token: f64,
    pub routing_ms_per_token: f64,
}

/// Feeds `ids` one token at a time (teacher forcing: every mode sees the same
/// tokens) and returns the wall time.
fn decode(model: &Model, ids: &[u32]) -> Result<f64> {
    let mut cache = model.new_cache();
    let t0 = Instant::now();
    for &id in ids {
        model.forward(&mut cache, &[id], Logits::Last, None)?;
    }
    Ok(t0.elapsed().as_secs_f64())
}

/// A layer's FFN with the wall time of its `forward` counted.
struct TimedFfn {
    inner: Box<dyn Ffn>,
    ns: Arc<AtomicU64>,
}

impl Ffn for TimedFfn {
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
    fn gated_projections(&self) -> Option<(&Linear, &Linear)> {
        self.inner.gated_projections()
    }
    fn as_dense(&self) -> Option<&crate::runtime::ffn::DenseFfn> {
        self.inner.as_dense()
    }
    fn selection_scores(&self, x: &[f32], n: usize, criterion: Criterion) -> Result<Vec<f32>> {
        self.inner.selection_scores(x, n, criterion)
    }
    fn forward(
        &self,
        x: &[f32],
        n: usize,
        active: ActiveSet<'_>,
        out: &mut [f32],
        fired: Option<&mut Fired>,
    ) -> Result<()> {
        let started = Instant::now();
        let r = self.inner.forward(x, n, active, out, fired);
        self.ns
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        r
    }
}

/// Wraps every layer's FFN of `model` in a [`TimedFfn`]; returns their
/// shared clock (ns).
fn time_ffns(model: &mut Model) -> Arc<AtomicU64> {
    let ns = Arc::new(AtomicU64::new(0));
    for layer in &mut model.layers {
        let inner = std::mem::replace(&mut layer.ffn, Box::new(Unset));
        layer.ffn = Box::new(TimedFfn {
            inner,
            ns: Arc::clone(&ns),
        });
    }
    ns
}

/// Stands in for a layer's FFN for the moment it is being wrapped.
struct Unset;

impl Ffn for Unset {
    fn hidden_size(&self) -> usize {
        0
    }
    fn width(&self) -> usize {
        0
    }
    fn weight_bytes(&self) -> usize {
        0
    }
    fn firing_activations(&self, _: &[f32], _: usize) -> Vec<f32> {
        Vec::new()
    }
    fn forward(
        &self,
        _: &[f32],
        _: usize,
        _: ActiveSet<'_>,
        _: &mut [f32],
        _: Option<&mut Fired>,
    ) -> Result<()> {
        Err(crate::Error::InvalidArgument(
            "an FFN being replaced was called".into(),
        ))
    }
}

/// Throughput of reads of `size` bytes (rounded out to the alignment) at
/// pseudo-random aligned offsets from `from` to the end of the file, as many
/// in flight as the reader has threads; about 32 MiB or 4000 reads.
pub fn disk_gb_per_s(reader: &FlashReader, from: u64, size: usize) -> Result<f64> {
    let align = reader.align();
    let len = size.max(1).div_ceil(align) * align;
    let file_end = reader.file_len();
    if file_end <= from + len as u64 {
        return Ok(0.0);
    }
    let blocks = (file_end - from - len as u64) / align as u64;
    let slots = reader.threads();
    let mut staging = Staging::new(slots, len, align)?;
    let reads = ((32usize << 20) / len).clamp(slots, 4000);
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut ops = Vec::with_capacity(slots);
    let t0 = Instant::now();
    let mut done = 0;
    while done < reads {
        ops.clear();
        for _ in 0..slots.min(reads - done) {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let block = (state >> 11) % blocks.max(1);
            ops.push(ReadOp {
                offset: from + block * align as u64,
                len,
            });
        }
        reader.read_batch(&mut staging, &ops)?;
        done += ops.len();
    }
    let secs = t0.elapsed().as_secs_f64();
    Ok((done * len) as f64 / secs.max(1e-9) / 1e9)
}

/// Opens `path` with `opts`, feeds `ids` and measures (one row of the table).
pub fn measure_mode(path: &Path, ids: &[u32], opts: &FlashOptions, name: &str) -> Result<ModeRow> {
    measure_mode_with(path, ids, opts, name, &mut |_| Ok(()))
}

/// [`measure_mode`] with `prepare` run on the runtime after it opened and
/// before the first token (a benchmark pinning experts from its own
/// calibration counts, `flash::moe::pin_hottest`).
pub fn measure_mode_with(
    path: &Path,
    ids: &[u32],
    opts: &FlashOptions,
    name: &str,
    prepare: &mut dyn FnMut(&mut crate::runtime::flash::FlashRuntime) -> Result<()>,
) -> Result<ModeRow> {
    let n = ids.len().max(1) as f64;
    // The model and the runtime apart, so that `prepare` may change the
    // runtime (pinning updates its plan).
    let (mut loaded, rt) = Session::open_flash(path, opts)?.into_parts();
    let mut rt = rt.expect("a disk mode has a flash runtime");
    prepare(&mut rt)?;
    let ffn_ns = time_ffns(&mut loaded.model);
    let secs = decode(&loaded.model, ids)?;
    let r = rt.report();
    let io_s = r.ms_io / 1e3;
    let first = rt.first_ffn_offset();
    let disk = disk_gb_per_s(&rt.reader, first, r.mean_read_bytes as usize)?;
    Ok(ModeRow {
        mode: name.to_string(),
        io_mode: Some(r.io_mode.as_str()),
        tokens: ids.len(),
        bytes_read_per_token: r.bytes_read as f64 / n,
        read_ops_per_token: r.read_ops as f64 / n,
        mean_read_bytes: r.mean_read_bytes,
        read_gb_per_s: if io_s > 0.0 {
            r.bytes_read as f64 / io_s / 1e9
        } else {
            0.0
        },
        io_ms_per_token: r.ms_io / n,
        predictor_ms_per_token: r.ms_predictor / n,
        memory_ms_per_token: r.ms_memory / n,
        ffn_compute_ms_per_token: r.ms_compute / n,
        ffn_ms_per_token: ffn_ns.load(Ordering::Relaxed) as f64 / 1e6 / n,
        ffn_active_fraction: rt.neuron_counter().active_fraction(),
        selector: rt.selector,
        ms_per_token: secs * 1e3 / n,
        window_hit_rate: r.window_hit_rate,
        verify_reads: r.verify_reads,
        hashed_bytes: r.hashed_bytes,
        verify_extra_read_bytes: r.verify_extra_read_bytes,
        verify_hash_cpu_ms_per_token: r.verify_hash_cpu_ms / n,
        disk_gb_per_s_same_size: disk,
        speedup_over_naive: 0.0,
        dram_plan: r.dram_plan.clone(),
        experts: r.experts.as_ref().map(|e| ExpertsRow {
            chosen_per_token: e.chosen_per_token,
            read_per_token: e.read_per_token,
            routing_ms_per_token: e.routing_ms / n,
        }),
    })
}

/// Measures every mode on `ids` (`base` gives I/O threads, window, budget).
pub fn compare_modes(path: &Path, ids: &[u32], base: &FlashOptions) -> Result<Vec<ModeRow>> {
    let n = ids.len().max(1) as f64;
    let mut rows = Vec::new();
    let modes = [
        ("naive", FfnMode::Naive, base.window),
        ("flash window 0", FfnMode::Flash, 0),
        (
            if base.window == 4 {
                "flash window 4"
            } else {
                "flash"
            },
            FfnMode::Flash,
            base.window,
        ),
        ("oracle-flash", FfnMode::OracleFlash, base.window),
    ];
    // A mixture-of-experts file has no predictors: no oracle modes, and
    // `predicted` does not apply.
    let moe = crate::format::PackedFile::open(path)?.config.moe.is_some();
    for (name, mode, window) in modes {
        if moe && mode == FfnMode::OracleFlash {
            continue;
        }
        let opts = FlashOptions {
            mode,
            window,
            ..base.clone()
        };
        let name = if name == "flash" {
            format!("flash window {window}")
        } else {
            name.to_string()
        };
        rows.push(measure_mode(path, ids, &opts, &name)?);
    }
    // The in-DRAM modes: dense, then the sparse modes computed from DRAM.
    let dram_modes: &[FfnMode] = if moe {
        &[FfnMode::Dense]
    } else {
        &[FfnMode::Dense, FfnMode::Oracle, FfnMode::Predicted]
    };
    for &mode in dram_modes {
        let options = SessionOptions {
            ffn: Some(mode),
            selector: base.selector,
            ..SessionOptions::default()
        };
        let mut session = Session::open(path, &options)?;
        let selector = match (mode, session.sparsity()) {
            (FfnMode::Predicted, Some(d)) => Some(d.resolved_selector()),
            _ => None,
        };
        let ffn_ns = time_ffns(session.model_mut());
        let secs = decode(session.model(), ids)?;
        let name = match mode {
            FfnMode::Dense => "dense (in DRAM)".to_string(),
            FfnMode::Oracle => "oracle (in DRAM)".to_string(),
            _ => "predicted (in DRAM)".to_string(),
        };
        rows.push(ModeRow {
            mode: name,
            io_mode: None,
            tokens: ids.len(),
            bytes_read_per_token: 0.0,
            read_ops_per_token: 0.0,
            mean_read_bytes: 0.0,
            read_gb_per_s: 0.0,
            io_ms_per_token: 0.0,
            predictor_ms_per_token: 0.0,
            memory_ms_per_token: 0.0,
            ffn_compute_ms_per_token: 0.0,
            ffn_ms_per_token: ffn_ns.load(Ordering::Relaxed) as f64 / 1e6 / n,
            ffn_active_fraction: session.ffn_active_fraction(),
            selector,
            ms_per_token: secs * 1e3 / n,
            window_hit_rate: 0.0,
            verify_reads: false,
            hashed_bytes: 0,
            verify_extra_read_bytes: 0,
            verify_hash_cpu_ms_per_token: 0.0,
            disk_gb_per_s_same_size: 0.0,
            speedup_over_naive: 0.0,
            dram_plan: Default::default(),
            experts: None,
        });
    }
    let naive_ms = rows[0].ms_per_token;
    for r in &mut rows {
        r.speedup_over_naive = naive_ms / r.ms_per_token.max(1e-9);
    }
    Ok(rows)
}
