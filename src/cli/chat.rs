//! `flashpack chat <MODEL>`: a multi-turn conversation with the model's own
//! chat template, one user turn per line of standard input (a terminal or a
//! pipe), each answer streamed to stdout.

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;

use crate::cli::run::{
    default_ffn_mode, open_session, FlashArgs, SamplingArgs, MAX_JSON_SAFE_INTEGER,
};
use crate::cli::Output;
use crate::runtime::chat::{ChatEncoder, ChatSession, Message};
use crate::runtime::generate::{GenerateOptions, StopReason};
use crate::runtime::sampling::SamplingParams;
use crate::runtime::sparse::FfnMode;

#[derive(Debug, Args)]
#[command(
    after_help = "Each line of standard input is a user turn; `/reset` forgets the \
    conversation, `/exit` (or end of input) ends it. The whole conversation is rendered with \
    the model's chat template each turn (as transformers' apply_chat_template with \
    add_generation_prompt=True), and only the tokens past what the KV cache already holds from \
    earlier turns are computed; the oldest turns are dropped when it outgrows the context.\n\n\
    With sampling, turn i uses seed + i.\n\n\
    Examples:\n  \
    flashpack chat fixtures/chat/llama-silu-chat\n  \
    printf 'ROMEO.\\nGo on.\\n' | flashpack chat fixtures/chat/llama-silu-chat --max-new-tokens 20"
)]
pub struct ChatArgs {
    /// A Hugging Face checkpoint directory, a flashpack file, or a Hub repo id
    /// (`org/name`) in the local Hugging Face cache, with a chat template.
    pub model: PathBuf,
    /// A system message that starts the conversation.
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens per answer; an answer also ends at an end-of-turn token.
    #[arg(short = 'n', long, default_value_t = 256)]
    pub max_new_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Positions the conversation may use [default: the model's context].
    #[arg(long)]
    pub ctx: Option<usize>,
    /// Worker threads (default: one per core). Output does not depend on it.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Which FFN neurons to compute and where their weights are, as for `run`
    /// (default: `flash` for a packed file with predictors, `dense` otherwise).
    #[arg(long, value_enum)]
    pub ffn: Option<FfnMode>,
    #[command(flatten)]
    pub flash: FlashArgs,
}

#[derive(serde::Serialize)]
struct Turn {
    user: String,
    assistant: String,
    prompt_tokens: usize,
    generated_tokens: usize,
    stop_reason: StopReason,
    /// Turns dropped from the start of the conversation to fit the context.
    dropped_messages: usize,
    /// Prompt tokens whose keys and values came from the previous turns.
    reused_tokens: usize,
    prefill_ms: f64,
    decode_ms: f64,
    decode_tokens_per_s: f64,
}

#[derive(serde::Serialize)]
struct ChatReport {
    model: String,
    ffn: FfnMode,
    temperature: f32,
    top_k: Option<usize>,
    top_p: Option<f32>,
    min_p: Option<f32>,
    repetition_penalty: f32,
    seed: u64,
    context: usize,
    turns: Vec<Turn>,
    elapsed_ms: f64,
}

pub fn run(args: &ChatArgs, out: &Output) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let model_path = crate::input::hub::resolve_model(&args.model)?;
    let sampling = args.sampling.params(&model_path)?;
    let seed = sampling.seed;
    if args.ctx == Some(0) {
        return Err(crate::Error::InvalidArgument("--ctx must be at least 1".into()).into());
    }
    // The template first: a model without one fails before its weights load.
    let encoder = ChatEncoder::load(&model_path)?;
    let ffn = default_ffn_mode(&model_path, args.ffn);
    let session = open_session(
        &model_path,
        ffn,
        &args.flash,
        args.ctx.unwrap_or(usize::MAX),
        args.threads,
    )?;
    let mut stop_ids = session.stop_ids();
    let (loaded, _flash) = session.into_parts();
    let model = loaded.model;
    let tokenizer = loaded.tokenizer;
    let context = args
        .ctx
        .unwrap_or(model.config.max_context)
        .min(model.config.max_context);
    stop_ids.extend(encoder.eos_token_id());
    stop_ids.sort_unstable();
    stop_ids.dedup();
    let pool = {
        let mut b = rayon::ThreadPoolBuilder::new();
        if let Some(n) = args.threads {
            if n == 0 {
                return Err(
                    crate::Error::InvalidArgument("--threads must be at least 1".into()).into(),
                );
            }
            b = b.num_threads(n);
        }
        b.build()
            .map_err(|e| crate::Error::InvalidArgument(format!("thread pool: {e}")))?
    };

    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!(
            "chatting with {} (/reset forgets, /exit ends)",
            args.model.display()
        );
    }
    let system: Vec<Message> = args
        .system
        .iter()
        .map(|s| Message::new("system", s.as_str()))
        .collect();
    let mut history: Vec<Message> = system.clone();
    let mut turns: Vec<Turn> = Vec::new();
    // The KV cache carries over: a turn computes only what is new.
    let mut session = ChatSession::new(&model);
    let mut lines = std::io::stdin().lock().lines();
    loop {
        if interactive {
            eprint!("> ");
        }
        let Some(line) = lines.next() else { break };
        let line = line.map_err(|e| anyhow::Error::new(e).context("reading standard input"))?;
        let line = line.trim_end_matches('\r');
        match line.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history = system.clone();
                session.reset();
                eprintln!("(conversation forgotten)");
                continue;
            }
            _ => {}
        }
        history.push(Message::new("user", line));
        // Drop the oldest exchanges (never the system message or this turn)
        // until the conversation leaves room to answer.
        let mut dropped = 0;
        let ids = loop {
            let ids = encoder.encode(&history, true)?;
            if ids.len() < context {
                break ids;
            }
            let first = system.len();
            if history.len() - first <= 1 {
                history.pop();
                break Vec::new();
            }
            // A user turn and the answer to it.
            let n = if history.len() - first >= 3 { 2 } else { 1 };
            history.drain(first..first + n);
            dropped += n;
        };
        if ids.is_empty() {
            // Said, and the conversation goes on without this turn.
            eprintln!(
                "error: this message does not fit the context of {context} positions with the \
                 template's text around it; say something shorter"
            );
            continue;
        }
        if dropped > 0 {
            eprintln!("(dropped the {dropped} oldest messages to fit the context of {context})");
        }
        let opts = GenerateOptions {
            max_new_tokens: args.max_new_tokens,
            sampling: SamplingParams {
                seed: seed.wrapping_add(turns.len() as u64) & MAX_JSON_SAFE_INTEGER,
                ..sampling
            },
            stop_ids: stop_ids.clone(),
            stop_strings: Vec::new(),
            context,
            ..Default::default()
        };
        let streaming = !out.json;
        let generated = pool.install(|| {
            session.generate(&model, &tokenizer, &ids, &opts, |piece| {
                if streaming {
                    crate::cli::write_stdout(piece);
                }
                Ok(())
            })
        })?;
        if streaming {
            crate::cli::write_stdout("\n");
        }
        let g = &generated.generation;
        eprintln!(
            "[{} prompt tokens ({} reused), {} generated, stopped at {}, {:.1} tok/s]",
            ids.len(),
            generated.reused_tokens,
            g.generated_ids.len(),
            g.stop_reason.describe(),
            g.decode_tokens_per_s()
        );
        history.push(Message::new("assistant", generated.text.as_str()));
        turns.push(Turn {
            user: line.to_string(),
            assistant: generated.text.clone(),
            prompt_tokens: ids.len(),
            generated_tokens: g.generated_ids.len(),
            stop_reason: g.stop_reason,
            dropped_messages: dropped,
            reused_tokens: generated.reused_tokens,
            prefill_ms: g.prefill_ms,
            decode_ms: g.decode_ms,
            decode_tokens_per_s: g.decode_tokens_per_s(),
        });
    }
    out.json_result(&ChatReport {
        model: model_path.display().to_string(),
        ffn,
        temperature: sampling.temperature,
        top_k: sampling.top_k,
        top_p: sampling.top_p,
        min_p: sampling.min_p,
        repetition_penalty: sampling.repetition_penalty,
        seed,
        context,
        turns,
        elapsed_ms: t0.elapsed().as_secs_f64() * 1000.0,
    })
}
