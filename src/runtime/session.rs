//! One way to open a model: a [`Session`] opens a Hugging Face checkpoint
//! directory or a flashpack file for any FFN mode ([`FfnMode`]) with its
//! options ([`SessionOptions`]), and then generates, scores text and returns
//! logits. Every command (`run`, `eval`, `chat`, `serve`, `bench`) and the
//! Python package open models through it, so a mode means the same thing
//! everywhere and the rules about which options apply live in one place.
//!
//! Errors name the option they are about by its field name here
//! ([`Error::InvalidOption`]); the command line shows the matching flag.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::format::PackedFile;
use crate::input::TextTokenizer;
use crate::runtime::flash::io::IoEngine;
use crate::runtime::flash::{self, FlashOptions, FlashReport, FlashRuntime};
use crate::runtime::generate::{generate_text, GenerateOptions, StopReason, TextGeneration};
use crate::runtime::open::{open_model, LoadedModel, ModelSource};
use crate::runtime::perplexity::perplexity_with_progress;
use crate::runtime::sampling::SamplingParams;
use crate::runtime::sparse::{FfnMode, NeuronCounter, Selector, SparsityData};
use crate::runtime::{with_threads, Logits, Model};

/// How to open a model. `Default` is the exact model in DRAM for a checkpoint
/// directory or an uncalibrated file, and `flash` with the window cache for a
/// packed file with predictors or selector copies (what flashpack is for).
///
/// The options after `ffn` apply only to the modes that read the FFN from
/// disk (`naive`, `flash`, `oracle-flash`); giving one to an in-DRAM mode is an
/// error rather than silently ignored.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Which FFN neurons to compute and where their weights are; `None`: see
    /// [`Session::default_mode`].
    pub ffn: Option<FfnMode>,
    /// DRAM the disk modes may use: bytes (`1000000`), a size (`512MiB`,
    /// `1.5GB`) or a share of the packed file (`50%`). `None`: each layer's
    /// cache holds what the last `window` tokens used on calibration text.
    pub dram_budget: Option<String>,
    /// Tokens before the current one whose neurons stay cached (`flash`,
    /// `oracle-flash`); `None`: 4.
    pub window: Option<usize>,
    /// Reads in flight; `None`: [`flash::DEFAULT_IO_THREADS`].
    pub io_threads: Option<usize>,
    /// What keeps the reads in flight; `None`: [`IoEngine::Auto`].
    pub io_engine: Option<IoEngine>,
    /// Wanted bundles at most this many apart are read in one operation;
    /// `None`: 1.
    pub coalesce_gap: Option<usize>,
    /// Check each FFN chunk's sha256 the first time the run uses it (default
    /// on): a file damaged after packing stops the run instead of giving
    /// wrong output.
    pub verify_reads: bool,
    /// What `predicted` and `flash` choose neurons with.
    pub selector: Selector,
    /// Most positions the KV cache will hold, counted in the DRAM budget of
    /// the disk modes.
    pub context: usize,
    /// Worker threads for the session's work (`None`: one per core). Results
    /// do not depend on it.
    pub threads: Option<usize>,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            ffn: None,
            dram_budget: None,
            window: None,
            io_threads: None,
            io_engine: None,
            coalesce_gap: None,
            verify_reads: true,
            selector: Selector::Auto,
            context: FlashOptions::default().context,
            threads: None,
        }
    }
}

impl SessionOptions {
    /// The disk-only options that were given (their field names).
    fn disk_only_given(&self) -> Vec<&'static str> {
        [
            ("window", self.window.is_some()),
            ("io_threads", self.io_threads.is_some()),
            ("io_engine", self.io_engine.is_some()),
            ("coalesce_gap", self.coalesce_gap.is_some()),
            ("dram_budget", self.dram_budget.is_some()),
            ("verify_reads", !self.verify_reads),
        ]
        .into_iter()
        .filter_map(|(name, given)| given.then_some(name))
        .collect()
    }
}

/// A model opened for one FFN mode, ready to generate and score.
pub struct Session {
    path: PathBuf,
    mode: FfnMode,
    loaded: LoadedModel,
    counter: Option<Arc<NeuronCounter>>,
    flash: Option<FlashRuntime>,
    threads: Option<usize>,
    load_ms: f64,
}

/// What a disk mode read, with zeros and nulls in the in-DRAM modes: the I/O
/// fields every report (`run`, `eval`, `bench`) carries.
#[derive(Debug, Clone, serde::Serialize)]
pub struct IoSummary {
    /// Bytes the flash reader read from the packed file.
    pub read_bytes: u64,
    /// Read operations it issued.
    pub read_ops: u64,
    /// How it read: `direct` (O_DIRECT) or `buffered`; `None` in DRAM.
    pub io_mode: Option<&'static str>,
    /// The process's peak resident memory (VmHWM), where the OS tells.
    pub peak_rss_bytes: Option<u64>,
    /// `read_bytes` of /proc/self/io over the measured part of the run.
    pub proc_read_bytes: Option<u64>,
    /// The flash runtime's full report (disk modes only).
    pub flash: Option<FlashReport>,
}

impl IoSummary {
    /// The summary of `rt` now, with the OS's count of bytes read.
    pub fn new(rt: Option<&FlashRuntime>, proc_read_bytes: Option<u64>) -> IoSummary {
        let report = rt.map(FlashRuntime::report);
        IoSummary {
            read_bytes: report.as_ref().map_or(0, |r| r.bytes_read),
            read_ops: report.as_ref().map_or(0, |r| r.read_ops),
            io_mode: report.as_ref().map(|r| r.io_mode.as_str()),
            peak_rss_bytes: flash::peak_rss_bytes(),
            proc_read_bytes,
            flash: report,
        }
    }

    /// Human lines (for stderr): the flash report and the peak memory.
    pub fn human(&self) -> String {
        let mut lines = Vec::new();
        if let Some(r) = &self.flash {
            lines.push(r.human());
        }
        if let Some(p) = self.peak_rss_bytes {
            lines.push(format!(
                "peak resident memory {:.1} MiB",
                p as f64 / (1u64 << 20) as f64
            ));
        }
        lines.join("\n")
    }
}

/// One generation: the ids and text, why it stopped, its timings, the
/// sampling it used and what it read. `flashpack run --json` prints these
/// fields (and names the model beside them).
#[derive(Debug, Clone, serde::Serialize)]
pub struct GenerationReport {
    /// The prompt as token ids (BOS included where the tokenizer adds it).
    pub prompt_ids: Vec<u32>,
    /// The generated ids, an EOS that ended generation included.
    pub generated_ids: Vec<u32>,
    /// The generated text, ending before a stop string that ended it.
    pub text: String,
    /// Why generation stopped.
    pub stop_reason: StopReason,
    /// `prompt_ids.len()`.
    pub prompt_tokens: usize,
    /// `generated_ids.len()`.
    pub generated_tokens: usize,
    /// Time to open the model.
    pub load_ms: f64,
    /// Time to compute the prompt.
    pub prefill_ms: f64,
    /// Prompt tokens per second of prefill.
    pub prefill_tokens_per_s: f64,
    /// Time of the decode steps.
    pub decode_ms: f64,
    /// Mean time per decode step.
    pub decode_ms_per_token: f64,
    /// Decode steps per second.
    pub decode_tokens_per_s: f64,
    /// The sampling used (0: greedy).
    pub temperature: f32,
    /// Top-k sampling, when on.
    pub top_k: Option<usize>,
    /// Nucleus sampling, when on.
    pub top_p: Option<f32>,
    /// Min-p sampling, when on.
    pub min_p: Option<f32>,
    /// Repetition penalty (1: none).
    pub repetition_penalty: f32,
    /// The sampler's seed.
    pub seed: u64,
    /// Worker threads that ran it.
    pub threads: usize,
    /// Positions the KV cache could hold.
    pub ctx: usize,
    /// The FFN mode.
    pub ffn: FfnMode,
    /// Fraction of FFN neurons computed (1.0 for dense).
    pub ffn_active_fraction: f64,
    /// What the run read.
    #[serde(flatten)]
    pub io: IoSummary,
    /// With [`GenerateOptions::keep_logits`]: `rows x vocab` logits, one row
    /// per position computed (see [`crate::runtime::generate::Generation::logits`]).
    #[serde(skip)]
    pub logits: Vec<f32>,
}

/// Perplexity of a text, with how it ran: `flashpack eval --json` prints
/// these fields.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PerplexityReport {
    /// `exp(nll_sum / tokens_scored)`.
    pub perplexity: f64,
    /// Sum of the scored tokens' negative log-likelihoods (f64).
    pub nll_sum: f64,
    /// Tokens scored (every token of a window but its first).
    pub tokens_scored: usize,
    /// Windows the text was cut into.
    pub windows: usize,
    /// Window length in tokens.
    pub ctx: usize,
    /// Time of the scoring.
    pub elapsed_ms: f64,
    /// Tokens scored per second.
    pub tokens_per_s: f64,
    /// Worker threads that ran it.
    pub threads: usize,
    /// The FFN mode.
    pub ffn: FfnMode,
    /// Fraction of FFN neurons computed (1.0 for dense).
    pub ffn_active_fraction: f64,
    /// What the run read.
    #[serde(flatten)]
    pub io: IoSummary,
}

impl Session {
    /// The mode a model opens in when none is asked for: `flash` for a packed
    /// file with trained predictors (what flashpack is for), `dense`
    /// otherwise.
    pub fn default_mode(path: &Path) -> FfnMode {
        let has_predictors = path.is_file()
            && PackedFile::open(path)
                .map(|f| !f.manifest.predictors.is_empty())
                .unwrap_or(false);
        if has_predictors {
            FfnMode::Flash
        } else {
            FfnMode::Dense
        }
    }

    /// Opens `path` (a checkpoint directory or a packed file) for
    /// `options.ffn`: all in DRAM, or with the FFN on disk under the DRAM
    /// budget. Refuses options the mode does not use and a budget below the
    /// mode's minimum (the error states it).
    pub fn open(path: impl AsRef<Path>, options: &SessionOptions) -> Result<Session> {
        let path = path.as_ref();
        let started = Instant::now();
        let mode = options.ffn.unwrap_or_else(|| Session::default_mode(path));
        let (loaded, counter, flash) = if mode.on_disk() {
            let (loaded, rt) = flash::open_flash(path, &options.flash_options(path, mode)?)?;
            // The neurons the disk modes compute, counted as the in-DRAM modes
            // count theirs: `ffn_active_fraction` means the same in every mode.
            (loaded, Some(rt.neuron_counter()), Some(rt))
        } else {
            let given = options.disk_only_given();
            if !given.is_empty() {
                return Err(Error::InvalidOption {
                    option: given[0],
                    problem: format!(
                        "{} only apply when the FFN is read from disk (modes naive, flash, \
                         oracle-flash), and this session's mode is {}{}",
                        given.join(", "),
                        mode.name(),
                        if path.is_file() {
                            ""
                        } else {
                            " (a checkpoint directory runs in DRAM; convert it with calibration for flash)"
                        }
                    ),
                });
            }
            let mut loaded = open_model(path)?;
            if let Some(d) = loaded.sparsity.as_mut() {
                d.selector = options.selector;
            }
            let counter = loaded.set_ffn_mode(mode)?;
            (loaded, counter, None)
        };
        Ok(Session {
            path: path.to_path_buf(),
            mode,
            loaded,
            counter,
            flash,
            threads: options.threads,
            load_ms: started.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// Opens a packed file for a disk mode with every flash option, those
    /// [`SessionOptions`] does not offer included (a replayed neuron trace,
    /// fixed cache rows, pinned experts): benchmarks and tests at scale.
    pub fn open_flash(path: impl AsRef<Path>, options: &FlashOptions) -> Result<Session> {
        let path = path.as_ref();
        let started = Instant::now();
        let (loaded, rt) = flash::open_flash(path, options)?;
        Ok(Session {
            path: path.to_path_buf(),
            mode: options.mode,
            loaded,
            counter: Some(rt.neuron_counter()),
            flash: Some(rt),
            threads: None,
            load_ms: started.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// The checkpoint directory or packed file opened.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The FFN mode the session runs.
    pub fn mode(&self) -> FfnMode {
        self.mode
    }

    /// The model (its forward pass, config, KV caches).
    pub fn model(&self) -> &Model {
        &self.loaded.model
    }

    /// The model, to wrap or replace its layers (benchmarks time the FFNs).
    pub fn model_mut(&mut self) -> &mut Model {
        &mut self.loaded.model
    }

    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.loaded.tokenizer
    }

    /// Whether a checkpoint directory or a packed file was opened.
    pub fn source(&self) -> ModelSource {
        self.loaded.source
    }

    /// A calibrated packed file's predictors, thresholds and selector copies.
    pub fn sparsity(&self) -> Option<&SparsityData> {
        self.loaded.sparsity.as_ref()
    }

    /// The flash runtime of a disk mode (its statistics and DRAM plan).
    pub fn flash(&self) -> Option<&FlashRuntime> {
        self.flash.as_ref()
    }

    /// Time [`Session::open`] took.
    pub fn load_ms(&self) -> f64 {
        self.load_ms
    }

    /// Fraction of FFN neurons computed since open (1.0 for dense).
    pub fn ffn_active_fraction(&self) -> f64 {
        self.counter.as_ref().map_or(1.0, |c| c.active_fraction())
    }

    /// The session's parts, for callers that keep the model and the flash
    /// runtime apart (the chat loop, the server).
    pub fn into_parts(self) -> (LoadedModel, Option<FlashRuntime>) {
        (self.loaded, self.flash)
    }

    /// Runs `f` on the session's worker threads; returns what it returned and
    /// how many threads there were.
    pub fn with_threads<T: Send>(
        &self,
        f: impl FnOnce() -> Result<T> + Send,
    ) -> Result<(T, usize)> {
        with_threads(self.threads, || {
            f().map(|v| (v, rayon::current_num_threads()))
        })?
    }

    /// The ids that end generation: the model's EOS ids and the tokenizer's,
    /// sorted, without duplicates.
    pub fn stop_ids(&self) -> Vec<u32> {
        let mut ids = self.loaded.model.config.eos_token_ids.clone();
        ids.extend(self.loaded.tokenizer.special.eos.iter().copied());
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Generation options for `max_new_tokens` with `sampling`: stopping at
    /// the model's EOS ids, within the model's context, no stop strings.
    pub fn generate_options(
        &self,
        max_new_tokens: usize,
        sampling: SamplingParams,
    ) -> GenerateOptions {
        GenerateOptions {
            max_new_tokens,
            sampling,
            stop_ids: self.stop_ids(),
            context: self.loaded.model.config.max_context,
            ..GenerateOptions::default()
        }
    }

    /// Generates after `prompt_ids`, handing each piece of text to `on_text`
    /// as soon as it is final (see [`generate_text`]).
    pub fn generate(
        &self,
        prompt_ids: &[u32],
        options: &GenerateOptions,
        on_text: impl FnMut(&str) -> Result<()> + Send,
    ) -> Result<GenerationReport> {
        let proc_before = flash::proc_read_bytes();
        let model = &self.loaded.model;
        let (result, threads) = self.with_threads(|| {
            generate_text(model, &self.loaded.tokenizer, prompt_ids, options, on_text)
        })?;
        let TextGeneration {
            text,
            mut generation,
        } = result;
        let proc_read = proc_before
            .zip(flash::proc_read_bytes())
            .map(|(a, b)| b - a);
        let prefill_tokens_per_s = if generation.prefill_ms > 0.0 {
            prompt_ids.len() as f64 / (generation.prefill_ms / 1000.0)
        } else {
            0.0
        };
        let decode_ms_per_token = if generation.decode_steps > 0 {
            generation.decode_ms / generation.decode_steps as f64
        } else {
            0.0
        };
        let s = &options.sampling;
        let ctx = if options.context == 0 {
            model.config.max_context
        } else {
            options.context.min(model.config.max_context)
        };
        Ok(GenerationReport {
            prompt_ids: prompt_ids.to_vec(),
            prompt_tokens: prompt_ids.len(),
            generated_tokens: generation.generated_ids.len(),
            decode_tokens_per_s: generation.decode_tokens_per_s(),
            generated_ids: std::mem::take(&mut generation.generated_ids),
            text,
            stop_reason: generation.stop_reason,
            load_ms: self.load_ms,
            prefill_ms: generation.prefill_ms,
            prefill_tokens_per_s,
            decode_ms: generation.decode_ms,
            decode_ms_per_token,
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            min_p: s.min_p,
            repetition_penalty: s.repetition_penalty,
            seed: s.seed,
            threads,
            ctx,
            ffn: self.mode,
            ffn_active_fraction: self.ffn_active_fraction(),
            io: IoSummary::new(self.flash.as_ref(), proc_read),
            logits: std::mem::take(&mut generation.logits),
        })
    }

    /// The logits of every position of `ids` computed as one prompt from an
    /// empty KV cache: `ids.len() x vocab` values, row-major.
    pub fn logits(&self, ids: &[u32]) -> Result<Vec<f32>> {
        if ids.is_empty() {
            return Err(Error::InvalidArgument(
                "logits of an empty sequence: give at least one token id".into(),
            ));
        }
        let model = &self.loaded.model;
        let vocab = model.config.vocab_size;
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::InvalidArgument(format!(
                "token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        let (logits, _) = self.with_threads(|| {
            let mut cache = model.new_cache();
            model.forward(&mut cache, ids, Logits::All, None)
        })?;
        Ok(logits)
    }

    /// Perplexity of `ids` in windows of `ctx` tokens (see
    /// [`crate::runtime::perplexity`]), calling `progress(done, total)` after
    /// each window.
    pub fn perplexity(
        &self,
        ids: &[u32],
        ctx: usize,
        progress: &(dyn Fn(usize, usize) + Sync),
    ) -> Result<PerplexityReport> {
        let proc_before = flash::proc_read_bytes();
        let model = &self.loaded.model;
        let (r, threads) =
            self.with_threads(|| perplexity_with_progress(model, ids, ctx, progress))?;
        let proc_read = proc_before
            .zip(flash::proc_read_bytes())
            .map(|(a, b)| b - a);
        Ok(PerplexityReport {
            perplexity: r.perplexity,
            nll_sum: r.nll_sum,
            tokens_scored: r.tokens_scored,
            windows: r.windows,
            ctx: r.ctx,
            elapsed_ms: r.seconds * 1e3,
            tokens_per_s: r.tokens_scored as f64 / r.seconds.max(1e-9),
            threads,
            ffn: self.mode,
            ffn_active_fraction: self.ffn_active_fraction(),
            io: IoSummary::new(self.flash.as_ref(), proc_read),
        })
    }

    /// Perplexity of `text` (tokenized with the model's tokenizer) in windows
    /// of `ctx` tokens.
    pub fn perplexity_of_text(&self, text: &str, ctx: usize) -> Result<PerplexityReport> {
        let ids = self.loaded.tokenizer.encode(text)?;
        self.perplexity(&ids, ctx, &|_, _| {})
    }
}

impl SessionOptions {
    /// The flash runtime's options these give for the disk mode `mode` on
    /// the packed file `path` (the budget's share resolved against its
    /// size), checked as [`Session::open`] checks them.
    pub fn flash_options(&self, path: &Path, mode: FfnMode) -> Result<FlashOptions> {
        if mode != FfnMode::Flash && self.selector != Selector::Auto {
            return Err(Error::InvalidOption {
            option: "selector",
            problem: format!(
                "the selector chooses the neurons of the predicted and flash modes; the {} mode does not choose",
                mode.name()
            ),
        });
        }
        if mode == FfnMode::Naive && self.window.is_some() {
            return Err(Error::InvalidOption {
            option: "window",
            problem: "the window applies to the flash and oracle-flash modes; naive reads the whole FFN every token and caches nothing".into(),
        });
        }
        if !path.is_file() {
            return Err(Error::InvalidOption {
                option: "ffn",
                problem: format!(
                "the {} mode needs a packed file (flashpack convert), not a checkpoint directory",
                mode.name()
            ),
            });
        }
        let file_bytes = std::fs::metadata(path)
            .map_err(|e| Error::io(path, e))?
            .len();
        let dram_budget = self
            .dram_budget
            .as_deref()
            .map(|b| flash::parse_size(b, file_bytes))
            .transpose()?;
        let defaults = FlashOptions::default();
        Ok(FlashOptions {
            mode,
            window: self.window.unwrap_or(defaults.window),
            io_threads: self.io_threads.unwrap_or(defaults.io_threads),
            io_engine: self.io_engine.unwrap_or(defaults.io_engine),
            coalesce_gap: self.coalesce_gap.unwrap_or(defaults.coalesce_gap),
            dram_budget,
            context: self.context,
            verify_reads: self.verify_reads,
            selector: self.selector,
            ..defaults
        })
    }
}
