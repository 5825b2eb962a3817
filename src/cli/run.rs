//! `flashpack run <MODEL> --prompt TEXT`: generate text, streamed to stdout.

use std::path::PathBuf;

use clap::Args;

use crate::cli::Output;
use crate::runtime::flash::{self, DiskMode, FlashOptions, FlashReport, FlashRuntime};
use crate::runtime::generate::{generate, GenerateOptions, TextStream};
use crate::runtime::sampling::SamplingParams;
use crate::runtime::sparse::{FfnMode, NeuronCounter};
use crate::runtime::{open_model, with_threads, LoadedModel};

/// Options of the disk-backed FFN modes (`--ffn naive|flash`), shared by `run` and `eval`.
#[derive(Debug, Clone, Args)]
pub struct FlashArgs {
    /// Tokens before the current one whose neurons stay in DRAM (`--ffn
    /// flash|oracle-flash`) [default: 4].
    #[arg(long)]
    pub window: Option<usize>,
    /// Reads in flight at once (small reads need many to reach the disk's
    /// throughput) [default: 16].
    #[arg(long)]
    pub io_threads: Option<usize>,
    /// Read wanted bundles at most this many bundles apart in one operation
    /// [default: 1].
    #[arg(long)]
    pub coalesce_gap: Option<usize>,
    /// DRAM budget for `--ffn flash|naive`: bytes, `512MiB`, `1.5GB`, or a
    /// percentage of the packed file such as `50%`. Below the minimum the
    /// command stops with exit 2 and says the minimum.
    #[arg(long)]
    pub dram_budget: Option<String>,
    /// Do not check FFN chunks. By default (`--ffn naive|flash|oracle-flash`)
    /// each FFN chunk's sha256 is checked the first time the run uses it, in
    /// the bytes just read and before any of them is used: a file damaged
    /// after packing stops the run with exit 1 naming section and chunk
    /// instead of giving wrong output. Each chunk is hashed once per run, from
    /// the reads themselves (flash reads the rest of a chunk on its first
    /// use; naive reads nothing more); see BENCHMARKS.md for the cost.
    #[arg(long = "no-verify-reads", action = clap::ArgAction::SetFalse)]
    pub verify_reads: bool,
}

impl FlashArgs {
    pub fn window(&self) -> usize {
        self.window.unwrap_or(4)
    }

    pub fn io_threads(&self) -> usize {
        self.io_threads
            .unwrap_or(crate::runtime::flash::DEFAULT_IO_THREADS)
    }

    pub fn coalesce_gap(&self) -> usize {
        self.coalesce_gap.unwrap_or(1)
    }

    /// The flags given that only the disk modes use: an in-DRAM mode refuses
    /// them rather than silently dropping them.
    fn disk_only_flags(&self) -> Vec<&'static str> {
        let given = [
            ("--window", self.window.is_some()),
            ("--io-threads", self.io_threads.is_some()),
            ("--coalesce-gap", self.coalesce_gap.is_some()),
            ("--dram-budget", self.dram_budget.is_some()),
            ("--no-verify-reads", !self.verify_reads),
        ];
        given
            .into_iter()
            .filter_map(|(flag, given)| given.then_some(flag))
            .collect()
    }
}

/// The mode as the user writes it after `--ffn`.
pub(crate) fn mode_name(mode: FfnMode) -> String {
    use clap::ValueEnum;
    mode.to_possible_value()
        .map_or_else(|| format!("{mode:?}"), |v| v.get_name().to_string())
}

/// A model opened for a mode, with whatever the mode reports.
pub(crate) struct Opened {
    pub loaded: LoadedModel,
    pub counter: Option<std::sync::Arc<NeuronCounter>>,
    pub flash: Option<FlashRuntime>,
}

/// The mode asked for, or the default: `flash` for a packed file with
/// predictors (what flashpack is for), `dense` otherwise.
pub(crate) fn default_ffn_mode(path: &std::path::Path, asked: Option<FfnMode>) -> FfnMode {
    asked.unwrap_or_else(|| {
        let has_predictors = path.is_file()
            && crate::format::PackedFile::open(path)
                .map(|f| !f.manifest.predictors.is_empty())
                .unwrap_or(false);
        if has_predictors {
            FfnMode::Flash
        } else {
            FfnMode::Dense
        }
    })
}

/// Opens `path` for `mode`: in DRAM, or with the FFN on disk.
pub(crate) fn open_for_mode(
    path: &std::path::Path,
    mode: FfnMode,
    args: &FlashArgs,
    context: usize,
) -> anyhow::Result<Opened> {
    if !mode.on_disk() {
        let ignored = args.disk_only_flags();
        if !ignored.is_empty() {
            return Err(crate::Error::InvalidArgument(format!(
                "{} only apply when the FFN is read from disk (--ffn naive|flash|oracle-flash), \
                 and this run's mode is --ffn {}{}",
                ignored.join(", "),
                mode_name(mode),
                if path.is_file() {
                    ""
                } else {
                    " (a checkpoint directory runs in DRAM; convert it with --calib for flash)"
                }
            ))
            .into());
        }
        let mut loaded = open_model(path)?;
        let counter = loaded.set_ffn_mode(mode)?;
        return Ok(Opened {
            loaded,
            counter,
            flash: None,
        });
    }
    if mode == FfnMode::Naive && args.window.is_some() {
        return Err(crate::Error::InvalidArgument(
            "--window applies to --ffn flash|oracle-flash; naive reads the whole FFN every token and caches nothing"
                .into(),
        )
        .into());
    }
    if !path.is_file() {
        return Err(crate::Error::InvalidArgument(format!(
            "--ffn {} needs a packed file (flashpack convert), not a checkpoint directory",
            if mode == FfnMode::Naive {
                "naive"
            } else {
                "flash"
            }
        ))
        .into());
    }
    let file_bytes = std::fs::metadata(path)
        .map_err(|e| crate::Error::io(path, e))?
        .len();
    let dram_budget = args
        .dram_budget
        .as_deref()
        .map(|b| flash::parse_size(b, file_bytes))
        .transpose()?;
    let opts = FlashOptions {
        mode: match mode {
            FfnMode::Naive => DiskMode::Naive,
            FfnMode::OracleFlash => DiskMode::Oracle,
            _ => DiskMode::Flash,
        },
        window: args.window(),
        io_threads: args.io_threads(),
        coalesce_gap: args.coalesce_gap(),
        dram_budget,
        context,
        capacity: None,
        verify_reads: args.verify_reads,
        replay: None,
    };
    let (loaded, rt) = flash::open_flash(path, &opts)?;
    Ok(Opened {
        loaded,
        // The neurons the disk modes compute, counted as the in-DRAM modes count
        // theirs: `ffn_active_fraction` means the same in every mode.
        counter: Some(rt.neuron_counter()),
        flash: Some(rt),
    })
}

/// The I/O fields every report carries (zeros and null outside disk modes).
#[derive(serde::Serialize)]
pub(crate) struct IoSummary {
    pub read_bytes: u64,
    pub read_ops: u64,
    pub io_mode: Option<&'static str>,
    pub peak_rss_bytes: Option<u64>,
    /// `read_bytes` of /proc/self/io over the measured part of the run.
    pub proc_read_bytes: Option<u64>,
    pub flash: Option<FlashReport>,
}

impl IoSummary {
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

    pub fn print_human(&self) {
        if let Some(r) = &self.flash {
            eprintln!("{}", r.human());
        }
        if let Some(p) = self.peak_rss_bytes {
            eprintln!(
                "peak resident memory {:.1} MiB",
                p as f64 / (1u64 << 20) as f64
            );
        }
    }
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    flashpack run fixtures/models/opt-relu --prompt 'To be, or not to be'\n  \
    flashpack run fixtures/models/llama-silu --prompt 'ROMEO.' --temperature 0.8 --top-p 0.95 --seed 1 --json")]
pub struct RunArgs {
    /// A Hugging Face checkpoint directory or a flashpack file.
    pub model: PathBuf,
    /// The text to continue (tokenized with the model's tokenizer, BOS included).
    #[arg(long)]
    pub prompt: String,
    /// Most tokens to generate; generation also stops at any EOS id.
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 (the default) is greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Sample only among the K most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Sample only among the most likely tokens whose probability reaches P.
    #[arg(long)]
    pub top_p: Option<f32>,
    /// RNG seed for sampling, at most 2^53 - 1 (default: from the clock;
    /// reported with --json).
    #[arg(long, value_parser = clap::value_parser!(u64).range(..=MAX_JSON_SAFE_INTEGER))]
    pub seed: Option<u64>,
    /// Worker threads (default: one per core). Output does not depend on it.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Which FFN neurons to compute and where their weights are: all in DRAM
    /// (`dense`, the exact model), exactly those that fire (`oracle`), those the
    /// packed file's predictors choose (`predicted`); read from disk: the whole
    /// FFN every token (`naive`), the predicted neurons through the window cache
    /// (`flash`, bit-identical to `predicted`), the firing ones (`oracle-flash`).
    /// Default: `flash` for a packed file with predictors, `dense` otherwise.
    #[arg(long, value_enum)]
    pub ffn: Option<FfnMode>,
    #[command(flatten)]
    pub flash: FlashArgs,
}

#[derive(serde::Serialize)]
struct RunReport {
    model: String,
    prompt_ids: Vec<u32>,
    generated_ids: Vec<u32>,
    text: String,
    stop_reason: crate::runtime::generate::StopReason,
    prompt_tokens: usize,
    generated_tokens: usize,
    prefill_ms: f64,
    prefill_tokens_per_s: f64,
    decode_ms: f64,
    decode_tokens_per_s: f64,
    temperature: f32,
    top_k: Option<usize>,
    top_p: Option<f32>,
    seed: u64,
    threads: usize,
    ffn: FfnMode,
    /// Fraction of FFN neurons computed (1.0 for dense).
    ffn_active_fraction: f64,
    /// Options given that this run does not use (also printed on stderr).
    warnings: Vec<String>,
    #[serde(flatten)]
    io: IoSummary,
}

/// Sampling options that greedy decoding (`--temperature 0`) does not use:
/// said, not silently dropped.
fn sampling_warnings(args: &RunArgs) -> Vec<String> {
    let unused: Vec<&str> = [
        ("--top-k", args.top_k.is_some()),
        ("--top-p", args.top_p.is_some()),
        ("--seed", args.seed.is_some()),
    ]
    .into_iter()
    .filter_map(|(flag, given)| given.then_some(flag))
    .collect();
    if args.temperature == 0.0 && !unused.is_empty() {
        vec![format!(
            "{} have no effect with greedy decoding (--temperature 0, the default)",
            unused.join(", ")
        )]
    } else {
        Vec::new()
    }
}

/// The largest integer every JSON reader holds exactly (2^53 - 1).
pub(crate) const MAX_JSON_SAFE_INTEGER: u64 = (1 << 53) - 1;

pub fn run(args: &RunArgs, out: &Output) -> anyhow::Result<()> {
    let seed = args.seed.unwrap_or_else(|| {
        // Any value will do when the user did not ask for reproducibility; kept
        // below 2^53 so that JSON readers that hold numbers as doubles (most)
        // read back the exact seed to reproduce the run with.
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            & MAX_JSON_SAFE_INTEGER
    });
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed,
    };
    sampling.validate()?;
    let warnings = sampling_warnings(args);
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    let context = args.prompt.len() + args.max_new_tokens + 16;
    let ffn = default_ffn_mode(&args.model, args.ffn);
    let Opened {
        loaded,
        counter,
        flash,
    } = open_for_mode(&args.model, ffn, &args.flash, context)?;
    let LoadedModel {
        model, tokenizer, ..
    } = loaded;
    let prompt_ids = tokenizer.encode(&args.prompt)?;
    let proc_before = flash::proc_read_bytes();
    let mut stop_ids = model.config.eos_token_ids.clone();
    stop_ids.extend(tokenizer.special.eos.iter().copied());
    stop_ids.sort_unstable();
    stop_ids.dedup();
    let opts = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        sampling,
        stop_ids,
    };
    let streaming = !out.json;
    let (generation, threads) = with_threads(args.threads, || {
        let mut stream = TextStream::new(&tokenizer, &prompt_ids)?;
        let g = generate(&model, &prompt_ids, &opts, |id| {
            let piece = stream.push(id)?;
            if streaming && !piece.is_empty() {
                // A closed pipe (`| head`) ends the run quietly.
                crate::cli::write_stdout(&piece);
            }
            Ok(())
        })?;
        let rest = stream.finish()?;
        if streaming {
            crate::cli::write_stdout(&format!("{rest}\n"));
        }
        Ok::<_, crate::Error>((g, rayon::current_num_threads()))
    })??;
    let proc_read = proc_before
        .zip(flash::proc_read_bytes())
        .map(|(a, b)| b - a);
    let io = IoSummary::new(flash.as_ref(), proc_read);
    io.print_human();
    let text = tokenizer.decode(&generation.generated_ids)?;
    let prefill_tps = if generation.prefill_ms > 0.0 {
        prompt_ids.len() as f64 / (generation.prefill_ms / 1000.0)
    } else {
        0.0
    };
    eprintln!(
        "prefill {} tokens in {:.1} ms ({:.1} tok/s); {} tokens generated, decode {:.2} tok/s ({} threads)",
        prompt_ids.len(),
        generation.prefill_ms,
        prefill_tps,
        generation.generated_ids.len(),
        generation.decode_tokens_per_s(),
        threads
    );
    out.json_result(&RunReport {
        model: args.model.display().to_string(),
        prompt_tokens: prompt_ids.len(),
        generated_tokens: generation.generated_ids.len(),
        prompt_ids,
        text,
        stop_reason: generation.stop_reason,
        prefill_ms: generation.prefill_ms,
        prefill_tokens_per_s: prefill_tps,
        decode_ms: generation.decode_ms,
        decode_tokens_per_s: generation.decode_tokens_per_s(),
        generated_ids: generation.generated_ids,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed,
        threads,
        ffn,
        ffn_active_fraction: counter.map_or(1.0, |c| c.active_fraction()),
        warnings,
        io,
    })
}
