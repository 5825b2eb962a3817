//! `flashpack run <MODEL> --prompt TEXT`: generate text, streamed to stdout.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;

use crate::cli::Output;
use crate::runtime::generate::{generate, GenerateOptions, TextStream};
use crate::runtime::sampling::SamplingParams;
use crate::runtime::sparse::FfnMode;
use crate::runtime::{open_model, with_threads, LoadedModel};

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
    /// RNG seed for sampling (default: from the clock; reported with --json).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Worker threads (default: one per core). Output does not depend on it.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Which FFN neurons to compute: all (`dense`, the exact model), exactly those
    /// that fire (`oracle`), or those the packed file's predictors choose
    /// (`predicted`).
    #[arg(long, value_enum, default_value = "dense")]
    pub ffn: FfnMode,
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
}

pub fn run(args: &RunArgs, out: &Output) -> anyhow::Result<()> {
    let seed = args.seed.unwrap_or_else(|| {
        // Any value will do when the user did not ask for reproducibility.
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed,
    };
    sampling.validate()?;
    let mut loaded = open_model(&args.model)?;
    let counter = loaded.set_ffn_mode(args.ffn)?;
    let LoadedModel {
        model, tokenizer, ..
    } = loaded;
    let prompt_ids = tokenizer.encode(&args.prompt)?;
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
        let mut stdout = std::io::stdout().lock();
        let g = generate(&model, &prompt_ids, &opts, |id| {
            let piece = stream.push(id)?;
            if streaming && !piece.is_empty() {
                // A closed pipe (`| head`) should end the run, not panic.
                stdout
                    .write_all(piece.as_bytes())
                    .and_then(|()| stdout.flush())
                    .map_err(|e| crate::Error::io(std::path::Path::new("<stdout>"), e))?;
            }
            Ok(())
        })?;
        let rest = stream.finish()?;
        if streaming {
            let _ = writeln!(stdout, "{rest}");
        }
        Ok::<_, crate::Error>((g, rayon::current_num_threads()))
    })??;
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
        ffn: args.ffn,
        ffn_active_fraction: counter.map_or(1.0, |c| c.active_fraction()),
    })
}
