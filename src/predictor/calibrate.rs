//! Calibration: run the dense model over calibration text and record, per layer,
//! the exact vector each FFN consumes (to an on-disk activation store, f16) and
//! which neurons fire, then derive what packing and the runtime need: per-neuron
//! firing frequency (the hot-first order), the largest number of distinct neurons
//! fired within any K consecutive tokens (K = 1, 2, 4, 8: the window cache's size),
//! and for SiLU models a magnitude threshold per layer that defines "fired".
//!
//! Firing, ReLU FFNs: the neuron's output is exactly 0 or not, as the runtime's own
//! FFN reports it. SiLU: `|silu(gate . x) * (up . x)| > threshold` (the product
//! criterion; `|silu(gate . x)|` under the gate criterion of older files), the
//! thresholds reaching the model-wide target sparsity on sampled calibration
//! tokens, allocated across layers as [`crate::predictor::thresholds`] says.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::input::config::Activation;
use crate::input::tensors::{FfnNames, ModelNames};
use crate::input::TextTokenizer;
use crate::predictor::thresholds::{allocate, layer_curve, Allocation, SparsityCurve};
use crate::progress::{Phase, Progress};
use crate::runtime::ffn::{Criterion, DenseFfn, Ffn, FfnWeights, Fired};
use crate::runtime::weights::TensorSource;
use crate::runtime::{Logits, Model, Observer};

/// Window lengths whose distinct-neuron maxima are recorded.
pub const WINDOW_SIZES: [usize; 4] = [1, 2, 4, 8];
/// Tokens whose activation magnitudes set a SiLU threshold: enough for a stable
/// quantile, few enough that `tokens x width` floats stay small.
const THRESHOLD_SAMPLE_TOKENS: usize = 1024;

/// How calibration runs. `Default`: up to 16,384 tokens in passes of 256,
/// SiLU thresholds zeroing half the activations, the same share in every
/// layer, compared with the neuron's value (the product criterion).
#[derive(Debug, Clone)]
pub struct CalibrationOptions {
    /// Stop after this many tokens.
    pub max_tokens: usize,
    /// Tokens per forward pass (each from an empty KV cache).
    pub ctx: usize,
    /// SiLU models: model-wide fraction of neuron activations the thresholds
    /// should zero.
    pub target_sparsity: f64,
    /// SiLU models: how the target is shared among layers.
    pub allocation: Allocation,
    /// SiLU models: what the thresholds (new or fixed) are compared with.
    pub criterion: Criterion,
    /// Keep the activation store (inputs and firing masks) in this directory
    /// instead of a temporary one that is removed.
    pub keep_trace: Option<PathBuf>,
    /// SiLU models: use these per-layer thresholds instead of calibrating new
    /// ones (re-measuring a file's predictors against its own definition of
    /// "fired"). `None` entries, or an empty list, calibrate.
    pub fixed_silu_thresholds: Vec<Option<f32>>,
}

impl Default for CalibrationOptions {
    fn default() -> Self {
        CalibrationOptions {
            max_tokens: 16384,
            ctx: 256,
            target_sparsity: 0.5,
            // Measured better than greedy at 0.3-0.5 on SmolLM2-135M (BENCHMARKS.md).
            allocation: Allocation::Uniform,
            criterion: Criterion::Product,
            keep_trace: None,
            fixed_silu_thresholds: Vec::new(),
        }
    }
}

/// What calibration learned about one layer.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LayerStats {
    /// Tokens on which each neuron (checkpoint index) fired.
    #[serde(skip)]
    pub frequency: Vec<u32>,
    /// Most distinct neurons fired within any K consecutive tokens, K in [`WINDOW_SIZES`].
    pub window_max: [usize; 4],
    /// Mean fraction of neurons firing per token.
    pub mean_active_fraction: f64,
    /// SiLU, gate criterion: `|silu(gate . x)|` at or below this counts as not fired.
    pub silu_threshold: Option<f32>,
    /// SiLU, product criterion: `|silu(gate . x) * (up . x)|` at or below this
    /// counts as not fired.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub product_threshold: Option<f32>,
    /// SiLU with new thresholds: the fraction of this layer's activations they
    /// skip on the sampled tokens (its share of the model-wide target).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer_sparsity: Option<f64>,
}

/// The calibration result, backed by the on-disk activation store.
pub struct Calibration {
    pub tokens: usize,
    /// Token count of each forward pass (window), in order.
    pub windows: Vec<usize>,
    pub layers: Vec<LayerStats>,
    pub hidden: usize,
    pub width: usize,
    /// SiLU models with new thresholds: each layer's sparsity curve, from which
    /// thresholds for any other target follow ([`Calibration::thresholds_for`]).
    pub curves: Vec<SparsityCurve>,
    store: Store,
}

/// Where the per-layer inputs (f16) and firing bitsets live.
enum StoreDir {
    Temp(tempfile::TempDir),
    Kept(PathBuf),
}

struct Store {
    dir: StoreDir,
}

impl Drop for Store {
    fn drop(&mut self) {
        // The TempDir removes itself; it only needs forgetting by the interrupt handler.
        if let StoreDir::Temp(t) = &self.dir {
            crate::cleanup::unregister(t.path());
        }
    }
}

impl Store {
    fn path(&self) -> &Path {
        match &self.dir {
            StoreDir::Temp(t) => t.path(),
            StoreDir::Kept(p) => p,
        }
    }
    fn inputs(&self, layer: usize) -> PathBuf {
        self.path().join(format!("layer{layer}.inputs.f16"))
    }
    fn fired(&self, layer: usize) -> PathBuf {
        self.path().join(format!("layer{layer}.fired.bits"))
    }
    fn residual(&self, layer: usize) -> PathBuf {
        self.path().join(format!("layer{layer}.residual_sq.f32"))
    }
}

/// Bitset words per token for `width` neurons.
pub fn words(width: usize) -> usize {
    width.div_ceil(64)
}

impl Calibration {
    /// One layer's FFN inputs (`tokens x hidden`) and firing bitsets
    /// (`tokens x words(width)`), in token order.
    pub fn layer_data(&self, layer: usize) -> Result<(Vec<f32>, Vec<u64>)> {
        let inputs = read_f16_file(&self.store.inputs(layer))?;
        let fired = read_u64_file(&self.store.fired(layer))?;
        if inputs.len() != self.tokens * self.hidden
            || fired.len() != self.tokens * words(self.width)
        {
            return Err(Error::InvalidArgument(format!(
                "activation store of layer {layer} is incomplete ({} inputs, {} mask words)",
                inputs.len(),
                fired.len()
            )));
        }
        Ok((inputs, fired))
    }

    /// Hot-first neuron order of a layer: by firing frequency, descending, ties by
    /// index (so the order is deterministic).
    pub fn neuron_order(&self, layer: usize) -> Vec<u32> {
        let freq = &self.layers[layer].frequency;
        let mut order: Vec<u32> = (0..freq.len() as u32).collect();
        order.sort_by(|&a, &b| freq[b as usize].cmp(&freq[a as usize]).then(a.cmp(&b)));
        order
    }

    /// SiLU models: per-layer thresholds for a model-wide `target` under
    /// `how`, from the measured curves (`None` without them).
    pub fn thresholds_for(&self, target: f64, how: Allocation) -> Option<Vec<f32>> {
        if self.curves.is_empty() {
            return None;
        }
        Some(
            allocate(&self.curves, target, how)
                .iter()
                .map(|c| c.threshold)
                .collect(),
        )
    }

    /// Where the activation store is (removed on drop unless kept).
    pub fn store_dir(&self) -> &Path {
        self.store.path()
    }
}

/// Records FFN inputs (and, for ReLU, firing masks) during forward passes.
struct Recorder {
    inputs: Vec<BufWriter<File>>,
    fired: Vec<BufWriter<File>>,
    /// SiLU: per token, the squared norm of the residual stream after the FFN.
    residual: Vec<BufWriter<File>>,
    record_fired: bool,
    width: usize,
    error: Option<Error>,
    paths: Vec<PathBuf>,
}

impl Observer for Recorder {
    fn ffn(&mut self, layer: usize, input: &[f32], n: usize, fired: &Fired) {
        if self.error.is_some() {
            return;
        }
        let bytes = crate::dtype::narrow(crate::dtype::DType::F16, input.iter().copied());
        let result = self.inputs[layer].write_all(&bytes).and_then(|_| {
            if !self.record_fired {
                return Ok(());
            }
            let w = words(self.width);
            let mut bits = vec![0u64; n * w];
            for (t, set) in fired.per_token.iter().enumerate() {
                for &j in set {
                    bits[t * w + j as usize / 64] |= 1 << (j % 64);
                }
            }
            let raw: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
            self.fired[layer].write_all(&raw)
        });
        if let Err(e) = result {
            self.error = Some(Error::io(&self.paths[layer], e));
        }
    }

    fn residual(&mut self, layer: usize, x: &[f32], n: usize) {
        if self.error.is_some() || self.residual.is_empty() {
            return;
        }
        let hidden = x.len() / n.max(1);
        let raw: Vec<u8> = x
            .chunks_exact(hidden)
            .flat_map(|row| {
                let sq: f64 = row.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
                (sq as f32).to_le_bytes()
            })
            .collect();
        if let Err(e) = self.residual[layer].write_all(&raw) {
            self.error = Some(Error::io(&self.paths[layer], e));
        }
    }
}

/// Runs calibration over the text files. `weights` gives the checkpoint's tensors
/// (SiLU thresholds need the gate projections).
pub fn calibrate(
    model: &Model,
    names: &ModelNames,
    weights: &dyn TensorSource,
    tokenizer: &TextTokenizer,
    files: &[PathBuf],
    opts: &CalibrationOptions,
    progress: Progress<'_>,
) -> Result<Calibration> {
    let cfg = &model.config;
    if cfg.moe.is_some() {
        return Err(Error::InvalidArgument(format!(
            "{} is a mixture-of-experts model: its calibration records routing only (convert --calib, calibrate); neuron statistics and predictors are not made for experts yet",
            cfg.architecture.hf_name()
        )));
    }
    if files.is_empty() {
        return Err(Error::InvalidArgument(
            "calibration needs at least one text file".into(),
        ));
    }
    if opts.ctx < 2 || opts.ctx > cfg.max_context {
        return Err(Error::ContextTooLong {
            what: format!("calibration windows of {}", opts.ctx),
            needed: opts.ctx,
            max: cfg.max_context,
        });
    }
    if !(0.0..1.0).contains(&opts.target_sparsity) {
        return Err(Error::InvalidOption {
            option: "target_sparsity",
            problem: format!("{} must be in [0, 1)", opts.target_sparsity),
        });
    }
    let store = match &opts.keep_trace {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            Store {
                dir: StoreDir::Kept(dir.clone()),
            }
        }
        None => Store {
            dir: StoreDir::Temp(
                tempfile::tempdir().map_err(|e| Error::io(Path::new("temporary directory"), e))?,
            ),
        },
    };
    if let StoreDir::Temp(t) = &store.dir {
        crate::cleanup::register(t.path());
    }
    let layers = cfg.num_layers;
    let open = |p: PathBuf| -> Result<BufWriter<File>> {
        File::create(&p)
            .map(BufWriter::new)
            .map_err(|e| Error::io(&p, e))
    };
    // The ReLU family (ReLU, FATReLU, dReLU) fires exactly: masks, no thresholds.
    let relu = cfg.activation.exact_zeros();
    let mut recorder = Recorder {
        inputs: (0..layers)
            .map(|l| open(store.inputs(l)))
            .collect::<Result<_>>()?,
        fired: if relu {
            (0..layers)
                .map(|l| open(store.fired(l)))
                .collect::<Result<_>>()?
        } else {
            Vec::new()
        },
        residual: if relu {
            Vec::new()
        } else {
            (0..layers)
                .map(|l| open(store.residual(l)))
                .collect::<Result<_>>()?
        },
        record_fired: relu,
        width: cfg.ffn_width,
        error: None,
        paths: (0..layers).map(|l| store.inputs(l)).collect(),
    };

    // Phase 1: forward passes over windows of the calibration text.
    // The texts are encoded first (only as many files as the token limit needs)
    // so that progress counts against the number of tokens that will be used.
    let mut texts = Vec::new();
    let mut available = 0usize;
    for file in files {
        if available >= opts.max_tokens {
            break;
        }
        let bytes = std::fs::read(file).map_err(|e| Error::io(file, e))?;
        let text = String::from_utf8(bytes)
            .map_err(|_| Error::InvalidArgument(format!("{}: not UTF-8 text", file.display())))?;
        let ids = tokenizer.encode(&text)?;
        available += ids.len();
        texts.push(ids);
    }
    let will_use = available.min(opts.max_tokens);
    let mut windows = Vec::new();
    let mut tokens = 0usize;
    let mut cache = model.new_cache();
    'files: for ids in &texts {
        for window in ids.chunks(opts.ctx) {
            let take = window.len().min(opts.max_tokens - tokens);
            if take == 0 {
                break 'files;
            }
            cache.clear();
            model.forward(
                &mut cache,
                &window[..take],
                Logits::None,
                Some(&mut recorder),
            )?;
            if let Some(e) = recorder.error.take() {
                return Err(e);
            }
            windows.push(take);
            tokens += take;
            progress(Phase::Calibrating, tokens as u64, will_use as u64);
        }
    }
    drop(texts);
    if tokens == 0 {
        return Err(Error::InvalidArgument(
            "the calibration text encodes to no tokens".into(),
        ));
    }
    for (l, w) in recorder
        .inputs
        .iter_mut()
        .chain(recorder.fired.iter_mut())
        .chain(recorder.residual.iter_mut())
        .enumerate()
    {
        w.flush()
            .map_err(|e| Error::io(&store.path().join(format!("store file {l}")), e))?;
    }
    drop(recorder);

    // Phase 2: SiLU thresholds (each layer's curve, then the allocation), and
    // the labels they give; then statistics per layer.
    let mut calibration = Calibration {
        tokens,
        windows,
        layers: Vec::new(),
        hidden: cfg.hidden_size,
        width: cfg.ffn_width,
        curves: Vec::new(),
        store,
    };
    let mut thresholds: Vec<Option<(f32, Option<f64>)>> = vec![None; layers];
    if !relu {
        let fixed = |l: usize| opts.fixed_silu_thresholds.get(l).copied().flatten();
        if (0..layers).any(|l| fixed(l).is_none()) {
            for layer in 0..layers {
                let ffn = load_gated(names, weights, layer, cfg.activation)?;
                let curve = sparsity_curve(&calibration, layer, &ffn, opts.criterion)?;
                calibration.curves.push(curve);
                progress(Phase::Thresholds, layer as u64 + 1, layers as u64);
            }
        }
        let choices = if calibration.curves.is_empty() {
            Vec::new()
        } else {
            allocate(&calibration.curves, opts.target_sparsity, opts.allocation)
        };
        for (layer, t) in thresholds.iter_mut().enumerate() {
            *t = Some(match fixed(layer) {
                Some(f) => (f, None),
                None => (choices[layer].threshold, Some(choices[layer].sparsity)),
            });
        }
    }
    for (layer, threshold) in thresholds.into_iter().enumerate() {
        if let Some((t, _)) = threshold {
            let ffn = load_gated(names, weights, layer, cfg.activation)?;
            silu_labels(&calibration, layer, &ffn, opts.criterion, t)?;
        }
        let (_, fired) = calibration.layer_data(layer)?;
        let mut stats = firing_stats(&fired, &calibration.windows, cfg.ffn_width);
        if let Some((t, sparsity)) = threshold {
            match opts.criterion {
                Criterion::Gate => stats.silu_threshold = Some(t),
                Criterion::Product => stats.product_threshold = Some(t),
            }
            stats.layer_sparsity = sparsity;
        }
        calibration.layers.push(stats);
        progress(Phase::Statistics, layer as u64 + 1, layers as u64);
    }
    Ok(calibration)
}

/// A gated layer's FFN, widened from the checkpoint's tensors.
fn load_gated(
    names: &ModelNames,
    weights: &dyn TensorSource,
    layer: usize,
    activation: Activation,
) -> Result<DenseFfn> {
    let FfnNames::Gated { gate, up, down } = &names.layers[layer].ffn else {
        return Err(Error::InvalidArgument(
            "SiLU calibration needs a gated FFN".into(),
        ));
    };
    let load = |n| crate::runtime::weights::load_linear(weights, n);
    Ok(DenseFfn {
        weights: FfnWeights::Gated {
            gate: load(gate)?,
            up: load(up)?,
            down: load(down)?,
        },
        activation,
    })
}

/// A layer's sparsity curve on up to [`THRESHOLD_SAMPLE_TOKENS`] tokens spread
/// evenly over the calibration text.
fn sparsity_curve(
    cal: &Calibration,
    layer: usize,
    ffn: &DenseFfn,
    criterion: Criterion,
) -> Result<SparsityCurve> {
    let (n, d, width) = (cal.tokens, cal.hidden, cal.width);
    let inputs = read_f16_file(&cal.store.inputs(layer))?;
    let residual = read_f32_file(&cal.store.residual(layer))?;
    if inputs.len() != n * d || residual.len() != n {
        return Err(Error::InvalidArgument(format!(
            "activation store of layer {layer} is incomplete ({} inputs, {} residual norms)",
            inputs.len(),
            residual.len()
        )));
    }
    let sample = n.min(THRESHOLD_SAMPLE_TOKENS);
    let picked: Vec<usize> = (0..sample).map(|i| i * n / sample).collect();
    let mut x = Vec::with_capacity(sample * d);
    for &t in &picked {
        x.extend_from_slice(&inputs[t * d..(t + 1) * d]);
    }
    let residual_sq: Vec<f32> = picked.iter().map(|&t| residual[t]).collect();
    let values = ffn.neurons_all(&x, sample);
    let scores = match criterion {
        Criterion::Product => None,
        Criterion::Gate => Some(ffn.selection_scores(&x, sample, criterion)?),
    };
    let FfnWeights::Gated { down, .. } = &ffn.weights else {
        unreachable!("load_gated builds a gated FFN")
    };
    // Columns of the down projection (`[hidden, width]`), one after another.
    let rows = down.weight.data.to_f32();
    let mut columns = vec![0.0f32; width * d];
    for r in 0..d {
        for j in 0..width {
            columns[j * d + r] = rows[r * width + j];
        }
    }
    Ok(layer_curve(
        scores.as_deref().unwrap_or(&values),
        &values,
        &columns,
        &residual_sq,
        width,
        d,
    ))
}

/// Writes the layer's firing bitsets: the neurons whose score under `criterion`
/// is above `threshold`, for every calibration token.
fn silu_labels(
    cal: &Calibration,
    layer: usize,
    ffn: &DenseFfn,
    criterion: Criterion,
    threshold: f32,
) -> Result<()> {
    let inputs = read_f16_file(&cal.store.inputs(layer))?;
    let (n, d, width) = (cal.tokens, cal.hidden, cal.width);
    let w = words(width);
    let mut out = BufWriter::new(
        File::create(cal.store.fired(layer)).map_err(|e| Error::io(&cal.store.fired(layer), e))?,
    );
    // Bounded memory: a block of tokens at a time.
    for start in (0..n).step_by(256) {
        let rows = (n - start).min(256);
        let a = ffn.selection_scores(&inputs[start * d..(start + rows) * d], rows, criterion)?;
        let mut bits = vec![0u64; rows * w];
        for t in 0..rows {
            for (j, &v) in a[t * width..(t + 1) * width].iter().enumerate() {
                if v.abs() > threshold {
                    bits[t * w + j / 64] |= 1 << (j % 64);
                }
            }
        }
        let raw: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        out.write_all(&raw)
            .map_err(|e| Error::io(&cal.store.fired(layer), e))?;
    }
    out.flush()
        .map_err(|e| Error::io(&cal.store.fired(layer), e))?;
    Ok(())
}

/// Firing frequency per neuron and the window maxima, from a layer's bitsets.
/// Windows never span two forward passes (each starts from an empty cache).
pub fn firing_stats(fired: &[u64], windows: &[usize], width: usize) -> LayerStats {
    let w = words(width);
    let mut frequency = vec![0u32; width];
    let mut window_max = [0usize; 4];
    let mut total_fired = 0u64;
    let tokens: usize = windows.iter().sum();
    let neurons_of = |t: usize| {
        let row = &fired[t * w..(t + 1) * w];
        row.iter().enumerate().flat_map(|(k, &word)| {
            let mut bits = word;
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let b = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                Some(k * 64 + b)
            })
        })
    };
    for t in 0..tokens {
        for j in neurons_of(t) {
            frequency[j] += 1;
            total_fired += 1;
        }
    }
    // Sliding windows: counts of each neuron within the last K tokens.
    for (slot, &k) in WINDOW_SIZES.iter().enumerate() {
        let mut count = vec![0u32; width];
        let mut distinct = 0usize;
        let mut best = 0usize;
        let mut start = 0usize;
        for &len in windows {
            for t in start..start + len {
                for j in neurons_of(t) {
                    count[j] += 1;
                    if count[j] == 1 {
                        distinct += 1;
                    }
                }
                if t >= start + k {
                    for j in neurons_of(t - k) {
                        count[j] -= 1;
                        if count[j] == 0 {
                            distinct -= 1;
                        }
                    }
                }
                best = best.max(distinct);
            }
            // Reset between forward passes.
            count.iter_mut().for_each(|c| *c = 0);
            distinct = 0;
            start += len;
        }
        window_max[slot] = best;
    }
    LayerStats {
        frequency,
        window_max,
        mean_active_fraction: if tokens == 0 {
            0.0
        } else {
            total_fired as f64 / (tokens * width) as f64
        },
        silu_threshold: None,
        product_threshold: None,
        layer_sparsity: None,
    }
}

fn read_f16_file(path: &Path) -> Result<Vec<f32>> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| Error::io(path, e))?;
    Ok(bytes
        .chunks_exact(2)
        .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
        .collect())
}

fn read_f32_file(path: &Path) -> Result<Vec<f32>> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| Error::io(path, e))?;
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
        .collect())
}

fn read_u64_file(path: &Path) -> Result<Vec<u64>> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| Error::io(path, e))?;
    Ok(bytes
        .chunks_exact(8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .collect())
}
