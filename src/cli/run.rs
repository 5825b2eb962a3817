//! `flashpack run <MODEL> --prompt TEXT`: generate text, streamed to stdout.

use std::path::{Path, PathBuf};

use clap::Args;

use crate::cli::Output;
use crate::runtime::generate::GenerateOptions;
use crate::runtime::sampling::{SamplingDefaults, SamplingParams};
use crate::runtime::session::{GenerationReport, IoSummary};
use crate::runtime::sparse::FfnMode;
use crate::runtime::{Session, SessionOptions};

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
    /// What keeps the reads in flight: `uring` (one io_uring, every read of a
    /// batch submitted at once), `threads` (a pool, one blocking read per
    /// thread), or `auto`: uring where the kernel allows it (containers often
    /// forbid it), else threads. The report says which ran. [default: auto]
    #[arg(long, value_enum)]
    pub io_engine: Option<crate::runtime::flash::io::IoEngine>,
    /// Read wanted bundles at most this many bundles apart in one operation
    /// [default: 1].
    #[arg(long)]
    pub coalesce_gap: Option<usize>,
    /// DRAM budget for `--ffn flash|naive`: bytes, `512MiB`, `1.5GB`, or a
    /// percentage of the packed file such as `50%`. Below the minimum the
    /// command stops with exit 2 and says the minimum. [default: none: each
    /// layer's cache holds what the last --window tokens used]
    #[arg(long)]
    pub dram_budget: Option<String>,
    /// Do not check FFN chunks. By default (`--ffn naive|flash|oracle-flash`)
    /// each FFN chunk's sha256 is checked the first time the run uses it, in
    /// the bytes just read and before any of them is used: a file damaged
    /// after packing stops the run with exit 1 naming section and chunk
    /// instead of giving wrong output. Each chunk is hashed once per run, from
    /// the reads themselves (flash reads the rest of a chunk on its first
    /// use; naive reads nothing more). Cost at 2 GiB of FFN: naive hashes it
    /// once, ~1.5 s of CPU on the first token; flash window 4 reads 4% more
    /// bytes over 128 tokens (BENCHMARKS.md).
    #[arg(long = "no-verify-reads", action = clap::ArgAction::SetFalse)]
    pub verify_reads: bool,
    /// What `--ffn predicted` and `flash` choose neurons with: `int8` or
    /// `int4` copies of gate and up by `|act(g) * u|` (SiLU and GeGLU files
    /// calibrated by the product criterion; flash reads the file's copies,
    /// format section 10, and holds them in DRAM within --dram-budget;
    /// predicted builds them at load when the file has none), the file's
    /// `trained` predictors, or `auto`: for SiLU and GeGLU (gelu,
    /// gelu_pytorch_tanh) product files the file's copies (int8 built at load
    /// in predicted when it has none), for ReLU files the trained predictors.
    #[arg(long, value_enum, default_value = "auto")]
    pub selector: crate::runtime::sparse::Selector,
}

impl FlashArgs {
    /// The session's options for `mode` (the flags left out take the
    /// library's defaults).
    pub fn session_options(
        &self,
        mode: FfnMode,
        context: usize,
        threads: Option<usize>,
    ) -> SessionOptions {
        SessionOptions {
            ffn: Some(mode),
            dram_budget: self.dram_budget.clone(),
            window: self.window,
            io_threads: self.io_threads,
            io_engine: self.io_engine,
            coalesce_gap: self.coalesce_gap,
            verify_reads: self.verify_reads,
            selector: self.selector,
            context,
            threads,
        }
    }

    /// The flags given that only the disk modes use: an in-DRAM mode refuses
    /// them rather than silently dropping them.
    fn disk_only_flags(&self) -> Vec<&'static str> {
        let given = [
            ("--window", self.window.is_some()),
            ("--io-threads", self.io_threads.is_some()),
            ("--io-engine", self.io_engine.is_some()),
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

/// The mode asked for, or the default ([`Session::default_mode`]).
pub(crate) fn default_ffn_mode(path: &std::path::Path, asked: Option<FfnMode>) -> FfnMode {
    asked.unwrap_or_else(|| Session::default_mode(path))
}

/// Opens `path` for `mode` as a [`Session`]: in DRAM, or with the FFN on disk.
/// Flags that only the disk modes use are refused here, by their names, before
/// the library sees them.
pub(crate) fn open_session(
    path: &std::path::Path,
    mode: FfnMode,
    args: &FlashArgs,
    context: usize,
    threads: Option<usize>,
) -> anyhow::Result<Session> {
    if !mode.on_disk() {
        let ignored = args.disk_only_flags();
        if !ignored.is_empty() {
            return Err(crate::Error::InvalidArgument(format!(
                "{} only apply when the FFN is read from disk (--ffn naive|flash|oracle-flash), \
                 and this run's mode is --ffn {}{}",
                ignored.join(", "),
                mode.name(),
                if path.is_file() {
                    ""
                } else {
                    " (a checkpoint directory runs in DRAM; convert it with --calib for flash)"
                }
            ))
            .into());
        }
    }
    Ok(Session::open(
        path,
        &args.session_options(mode, context, threads),
    )?)
}

/// Prints the I/O summary's human lines on stderr (nothing in DRAM modes
/// where the OS does not tell the peak memory).
pub(crate) fn print_io(io: &IoSummary) {
    let text = io.human();
    if !text.is_empty() {
        eprintln!("{text}");
    }
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    flashpack run fixtures/models/opt-relu -p 'To be, or not to be'\n  \
    flashpack run fixtures/models/llama-silu -p 'ROMEO.' --temperature 0.8 --top-p 0.95 --seed 1 --json\n  \
    flashpack run -m opt-relu.flashpack -f prompt.txt -n 64 --stop 'KING'\n  \
    echo 'To be' | flashpack run HuggingFaceTB/SmolLM2-135M-Instruct -f -   (a Hub id in the local HF cache)")]
pub struct RunArgs {
    /// A Hugging Face checkpoint directory, a flashpack file, or a Hub repo id
    /// (`org/name`) already in the local Hugging Face cache (nothing is
    /// downloaded).
    #[arg(value_name = "MODEL", required_unless_present = "model_flag")]
    pub model: Option<PathBuf>,
    /// The model, as a flag (as llama.cpp's `-m`).
    #[arg(
        short = 'm',
        long = "model",
        value_name = "MODEL",
        conflicts_with = "model"
    )]
    pub model_flag: Option<PathBuf>,
    /// The text to continue (tokenized with the model's tokenizer, BOS
    /// included); may begin with `-`.
    #[arg(
        short = 'p',
        long,
        allow_hyphen_values = true,
        required_unless_present = "file"
    )]
    pub prompt: Option<String>,
    /// Read the prompt from FILE (`-` for stdin) instead of --prompt.
    #[arg(short = 'f', long, value_name = "FILE", conflicts_with = "prompt")]
    pub file: Option<PathBuf>,
    /// Most tokens to generate; generation also stops at an EOS id, a --stop
    /// string or the context's end.
    #[arg(short = 'n', long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Positions of the context (prompt and generated tokens) [default: the
    /// model's]; the KV cache is sized for it.
    #[arg(short = 'c', long)]
    pub ctx: Option<usize>,
    /// Stop when the text contains STR (not printed); repeat for several.
    #[arg(long = "stop", value_name = "STR", allow_hyphen_values = true)]
    pub stop: Vec<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Do not print the prompt before the generated text.
    #[arg(long)]
    pub no_display_prompt: bool,
    /// Send the prompt as one user message through the model's chat template
    /// (`chat_template` of tokenizer_config.json or chat_template.jinja), as
    /// transformers' `apply_chat_template(add_generation_prompt=True)` does;
    /// the template's end-of-turn token also stops generation.
    #[arg(long)]
    pub chat: bool,
    /// Write the logits the run computes to FILE, a NumPy `.npy` of f32 with
    /// shape [rows, vocab]: one row per prompt position, then one per generated
    /// token fed back (row P-1+i chose generated token i, P = prompt tokens).
    /// To check a converted model against your own reference; `-n 0` gives the
    /// prompt's rows only. The generated tokens are those of a run without it.
    #[arg(long, value_name = "FILE")]
    pub logits_out: Option<PathBuf>,
    /// Worker threads [default: one per core]. Output does not depend on it.
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// Which FFN neurons to compute and where their weights are: all in DRAM
    /// (`dense`, the exact model), exactly those that fire (`oracle`), those the
    /// packed file's predictors choose (`predicted`); read from disk: the whole
    /// FFN every token (`naive`), the predicted neurons through the window cache
    /// (`flash`, bit-identical to `predicted --selector trained`), the firing ones (`oracle-flash`).
    /// Default: `flash` for a packed file with predictors, `dense` otherwise.
    #[arg(long, value_enum)]
    pub ffn: Option<FfnMode>,
    #[command(flatten)]
    pub flash: FlashArgs,
}

impl RunArgs {
    /// The model as named (positional or `-m`).
    fn model_name(&self) -> &std::path::Path {
        self.model
            .as_deref()
            .or(self.model_flag.as_deref())
            .expect("clap requires one of them")
    }
}

/// The prompt: `--prompt`, or the contents of `-f FILE` (`-` is stdin).
fn read_prompt(args: &RunArgs) -> anyhow::Result<String> {
    if let Some(p) = &args.prompt {
        return Ok(p.clone());
    }
    let path = args
        .file
        .as_deref()
        .expect("clap requires --prompt or --file");
    let bytes = if path == std::path::Path::new("-") {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)
            .map_err(|e| crate::Error::io(std::path::Path::new("<stdin>"), e))?;
        buf
    } else {
        if path.is_dir() {
            return Err(crate::Error::InvalidArgument(format!(
                "{}: is a directory; -f takes a text file (or - for stdin)",
                path.display()
            ))
            .into());
        }
        std::fs::read(path).map_err(|e| crate::Error::io(path, e))?
    };
    String::from_utf8(bytes).map_err(|_| {
        crate::Error::InvalidArgument(format!("{}: the prompt is not UTF-8 text", path.display()))
            .into()
    })
}

#[derive(serde::Serialize)]
struct RunReport {
    model: String,
    /// The directory or file the model name resolved to.
    model_path: String,
    #[serde(flatten)]
    generation: GenerationReport,
    /// Options given that this run does not use (also printed on stderr).
    warnings: Vec<String>,
    /// `--logits-out`: the file written and its rows.
    logits_file: Option<String>,
    logits_rows: Option<usize>,
}

/// Sampling options that greedy decoding (`--temperature 0`) does not use:
/// said, not silently dropped.
fn sampling_warnings(args: &RunArgs, sampling: &SamplingParams) -> Vec<String> {
    let unused: Vec<&str> = [
        ("--top-k", args.sampling.top_k.is_some()),
        ("--top-p", args.sampling.top_p.is_some()),
        ("--min-p", args.sampling.min_p.is_some()),
        ("--seed", args.sampling.seed.is_some()),
    ]
    .into_iter()
    .filter_map(|(flag, given)| given.then_some(flag))
    .collect();
    if sampling.is_greedy() && !unused.is_empty() {
        vec![format!(
            "{} have no effect with greedy decoding (temperature 0)",
            unused.join(", ")
        )]
    } else {
        Vec::new()
    }
}

pub(crate) use crate::runtime::sampling::MAX_JSON_SAFE_INTEGER;

/// Sampling options shared by `run` and `chat`. Each one left out comes from
/// the model's `generation_config.json` as transformers reads it, else is off.
#[derive(Debug, Clone, Args)]
pub struct SamplingArgs {
    /// Sampling temperature; 0 is greedy decoding [default: the model's
    /// generation_config.json when it samples (do_sample), else 0].
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Sample only among the K most likely tokens [default: the model's
    /// generation_config.json when it samples].
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Sample only among the most likely tokens whose probabilities add up to
    /// P, in (0, 1] [default: the model's, else all].
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Sample only among tokens at least P times as likely as the most likely
    /// one, in [0, 1] [default: the model's, else off].
    #[arg(long)]
    pub min_p: Option<f32>,
    /// Repetition penalty (transformers' semantics: > 1 discourages tokens
    /// already in the context) [default: the model's, else 1 = off].
    #[arg(long)]
    pub repeat_penalty: Option<f32>,
    /// RNG seed for sampling, at most 2^53 - 1 (default: from the clock;
    /// reported with --json).
    #[arg(long, value_parser = clap::value_parser!(u64).range(..=MAX_JSON_SAFE_INTEGER))]
    pub seed: Option<u64>,
}

impl SamplingArgs {
    /// The sampling parameters for the model at `model_path`, validated.
    pub(crate) fn params(&self, model_path: &std::path::Path) -> anyhow::Result<SamplingParams> {
        let defaults = SamplingDefaults::from_generation_config(
            crate::runtime::open::generation_config(model_path)?.as_ref(),
        );
        let seed = self
            .seed
            .unwrap_or_else(crate::runtime::sampling::clock_seed);
        let params = SamplingParams {
            temperature: self.temperature.unwrap_or(defaults.temperature),
            top_k: self.top_k.or(defaults.top_k),
            top_p: self.top_p.or(defaults.top_p),
            min_p: self.min_p.or(defaults.min_p),
            repetition_penalty: self.repeat_penalty.unwrap_or(defaults.repetition_penalty),
            seed,
        };
        params.validate()?;
        Ok(params)
    }
}

pub fn run(args: &RunArgs, out: &Output) -> anyhow::Result<()> {
    let model_path = crate::input::hub::resolve_model(args.model_name())?;
    let prompt = read_prompt(args)?;
    let sampling = args.sampling.params(&model_path)?;
    let warnings = sampling_warnings(args, &sampling);
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    if let Some(path) = &args.logits_out {
        check_logits_out(path, &model_path, args.file.as_deref())?;
    }
    let ffn = default_ffn_mode(&model_path, args.ffn);
    // Enough KV cache for the prompt (a byte is at least a token's worth) and
    // the tokens asked for, unless --ctx says otherwise.
    let context = args.ctx.unwrap_or(prompt.len() + args.max_new_tokens + 16);
    if args.ctx == Some(0) {
        return Err(crate::Error::InvalidArgument("--ctx must be at least 1".into()).into());
    }
    let session = open_session(&model_path, ffn, &args.flash, context, args.threads)?;
    let load_ms = session.load_ms();
    let mut stop_ids = session.stop_ids();
    let prompt_ids = if args.chat {
        let chat = crate::runtime::chat::ChatEncoder::load(&model_path)?;
        stop_ids.extend(chat.eos_token_id());
        chat.encode(
            &[crate::runtime::chat::Message::new("user", prompt.as_str())],
            true,
        )?
    } else {
        session.tokenizer().encode(&prompt)?
    };
    stop_ids.sort_unstable();
    stop_ids.dedup();
    let max_context = session.model().config.max_context;
    let ctx = args.ctx.unwrap_or(max_context).min(max_context);
    let opts = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        sampling,
        stop_ids,
        stop_strings: args.stop.clone(),
        context: ctx,
        progress: Some(Default::default()),
        keep_logits: args.logits_out.is_some(),
    };
    let streaming = !out.json;
    if streaming && !args.no_display_prompt {
        crate::cli::write_stdout(&prompt);
    }
    // Ctrl-C prints how far generation got (the handler runs on its own thread).
    let progress = opts.progress.clone().expect("set above");
    let started = std::time::Instant::now();
    crate::cli::set_interrupt_summary(move || {
        let n = progress.load(std::sync::atomic::Ordering::Relaxed);
        let ms = started.elapsed().as_secs_f64() * 1e3;
        format!(
            "{n} tokens generated in {ms:.0} ms ({:.1} ms/token, load {load_ms:.0} ms)",
            ms / n.max(1) as f64
        )
    });
    let mut generation = session.generate(&prompt_ids, &opts, |piece| {
        if streaming {
            // A closed pipe (`| head`) ends the run quietly.
            crate::cli::write_stdout(piece);
        }
        Ok(())
    })?;
    if streaming {
        // The text ends with a newline before the statistics.
        crate::cli::write_stdout("\n");
    }
    let logits_rows = match &args.logits_out {
        Some(path) => {
            let vocab = session.model().config.vocab_size;
            let rows = generation.logits.len() / vocab;
            crate::runtime::npy::write_f32_matrix(path, &generation.logits, rows, vocab)?;
            generation.logits = Vec::new();
            eprintln!(
                "logits: {rows} x {vocab} (f32) written to {}",
                path.display()
            );
            Some(rows)
        }
        None => None,
    };
    print_io(&generation.io);
    let g = &generation;
    eprintln!(
        "stopped: {}; load {:.0} ms; prefill {} tokens in {:.1} ms ({:.1} tok/s); {} tokens generated, decode {:.2} ms/token ({:.2} tok/s, {} threads)",
        g.stop_reason.describe(),
        load_ms,
        g.prompt_tokens,
        g.prefill_ms,
        g.prefill_tokens_per_s,
        g.generated_tokens,
        g.decode_ms_per_token,
        g.decode_tokens_per_s,
        g.threads
    );
    out.json_result(&RunReport {
        model: args.model_name().display().to_string(),
        model_path: model_path.display().to_string(),
        generation,
        warnings,
        logits_file: args.logits_out.as_ref().map(|p| p.display().to_string()),
        logits_rows,
    })
}

/// `--logits-out` must not replace the model or the prompt file under any
/// name, and must be writable: checked before the model is loaded.
fn check_logits_out(
    path: &Path,
    model_path: &Path,
    prompt_file: Option<&Path>,
) -> anyhow::Result<()> {
    use crate::pack::output::{check_output_path, InputPath};
    let mut inputs = Vec::new();
    if model_path.is_dir() {
        // Every file of the checkpoint directory, and any name in it.
        let entries = std::fs::read_dir(model_path).map_err(|e| crate::Error::io(model_path, e))?;
        for entry in entries.flatten() {
            inputs.push(InputPath::new(entry.path(), "a file of the model"));
        }
        let parent = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if let (Ok(a), Ok(b)) = (
            std::fs::canonicalize(parent),
            std::fs::canonicalize(model_path),
        ) {
            if a == b {
                return Err(crate::Error::InvalidArgument(format!(
                    "--logits-out {} is inside the model directory {}; write it elsewhere",
                    path.display(),
                    model_path.display()
                ))
                .into());
            }
        }
    } else {
        inputs.push(InputPath::new(model_path, "the model file"));
    }
    if let Some(f) = prompt_file.filter(|f| *f != Path::new("-")) {
        inputs.push(InputPath::new(f, "the prompt file"));
    }
    check_output_path(path, &inputs)?;
    Ok(())
}
