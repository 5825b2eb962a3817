//! `flashpack serve <MODEL>`: an OpenAI-compatible HTTP server (see
//! [`crate::server`]).

use std::path::PathBuf;

use clap::Args;

use crate::cli::run::{default_ffn_mode, open_session, FlashArgs};
use crate::cli::Output;
use crate::runtime::chat::ChatEncoder;
use crate::runtime::sampling::SamplingDefaults;
use crate::runtime::sparse::FfnMode;
use crate::server::{Backend, ServeOptions};

#[derive(Debug, Args)]
#[command(
    after_help = "Endpoints: POST /v1/completions, POST /v1/chat/completions (\"stream\": true \
    for server-sent events), GET /v1/models, GET /health. Requests run one at a time, in order.\n\n\
    Sampling fields a request leaves out follow the model's generation_config.json when it \
    samples (do_sample), else OpenAI's defaults (temperature 1); max_tokens left out: 16 \
    tokens in /v1/completions (as OpenAI's), until the end of sequence or the context in \
    /v1/chat/completions.\n\n\
    Examples:\n  \
    flashpack serve fixtures/chat/llama-silu-chat --port 8080\n  \
    curl -s localhost:8080/v1/chat/completions -H 'Content-Type: application/json' \\\n    \
    -d '{\"messages\": [{\"role\": \"user\", \"content\": \"ROMEO.\"}], \"max_tokens\": 20}'"
)]
pub struct ServeArgs {
    /// A Hugging Face checkpoint directory, a flashpack file, or a Hub repo id
    /// (`org/name`) in the local Hugging Face cache.
    pub model: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on; 0 picks a free one (the address is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// The model's name in /v1/models and in requests' `model` field
    /// [default: the directory's or file's name].
    #[arg(long)]
    pub model_name: Option<String>,
    /// Positions one request may use, prompt and generated [default: the
    /// model's context].
    #[arg(long)]
    pub ctx: Option<usize>,
    /// Request bodies larger than this many bytes get 413.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Requests that may wait while one runs; more get 503.
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// Worker threads for the model (default: one per core).
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
struct Listening {
    model: String,
    model_name: String,
    address: String,
    url: String,
    ffn: FfnMode,
    context: usize,
    chat_template: bool,
}

/// The name a model goes by when the user gives none: its directory's or
/// file's name (without `.flashpack`).
pub(crate) fn default_model_name(path: &std::path::Path) -> String {
    let name = if path.is_file() {
        path.file_stem()
    } else {
        path.file_name()
    };
    name.map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty() && n != "." && n != "..")
        .unwrap_or_else(|| "flashpack".to_string())
}

pub fn run(args: &ServeArgs, out: &Output) -> anyhow::Result<()> {
    if args.ctx == Some(0) {
        return Err(crate::Error::InvalidArgument("--ctx must be at least 1".into()).into());
    }
    if args.threads == Some(0) {
        return Err(crate::Error::InvalidArgument("--threads must be at least 1".into()).into());
    }
    let path = crate::input::hub::resolve_model(&args.model)?;
    let ffn = default_ffn_mode(&path, args.ffn);
    // A Hub id names the model as users know it; a path by its last part.
    let model_name = args.model_name.clone().unwrap_or_else(|| {
        if path != args.model {
            args.model.display().to_string()
        } else {
            default_model_name(&path)
        }
    });
    let model = path.display().to_string();
    let generation = crate::runtime::open::generation_config(&path)?;
    let sampling_defaults = crate::server::api::server_defaults(
        SamplingDefaults::from_generation_config(generation.as_ref()),
    );
    let flash = args.flash.clone();
    let ctx = args.ctx;
    let threads = args.threads;
    // Filled in on the model thread, read once it is open.
    let info = std::sync::Arc::new(std::sync::Mutex::new((0usize, false)));
    let info_in = info.clone();
    let open = move || -> anyhow::Result<Backend> {
        let session = open_session(&path, ffn, &flash, ctx.unwrap_or(usize::MAX), threads)?;
        let chat = ChatEncoder::load(&path).map_err(|e| e.to_string());
        let mut stop_ids = session.stop_ids();
        let (loaded, flash) = session.into_parts();
        let model = loaded.model;
        let tokenizer = loaded.tokenizer;
        if let Ok(encoder) = &chat {
            stop_ids.extend(encoder.eos_token_id());
        }
        stop_ids.sort_unstable();
        stop_ids.dedup();
        let context = ctx
            .unwrap_or(model.config.max_context)
            .min(model.config.max_context);
        *info_in.lock().unwrap() = (context, chat.is_ok());
        let mut keep_alive: Vec<Box<dyn std::any::Any>> = Vec::new();
        if let Some(rt) = flash {
            keep_alive.push(Box::new(rt));
        }
        Ok(Backend {
            model,
            tokenizer,
            chat,
            stop_ids,
            context,
            threads,
            keep_alive,
        })
    };
    let options = ServeOptions {
        host: args.host.clone(),
        port: args.port,
        model_name: model_name.clone(),
        max_body_bytes: args.max_body_bytes,
        queue: args.queue,
        sampling_defaults,
    };
    let json = out.json;
    crate::server::serve(options, open, move |address| {
        let (context, chat_template) = *info.lock().unwrap();
        let listening = Listening {
            model,
            model_name: model_name.clone(),
            address: address.to_string(),
            url: format!("http://{address}"),
            ffn,
            context,
            chat_template,
        };
        if !chat_template {
            eprintln!("note: the model has no chat template: /v1/chat/completions answers 400");
        }
        eprintln!(
            "serving {} as '{model_name}' (--ffn {}, context {context}); Ctrl-C stops",
            listening.model,
            ffn.name()
        );
        if json {
            // The one JSON object of --json: printed once the server listens.
            crate::cli::write_stdout(&format!("{}\n", serde_json::to_string(&listening)?));
        } else {
            crate::cli::write_stdout(&format!("listening on {}\n", listening.url));
        }
        Ok(())
    })
}
