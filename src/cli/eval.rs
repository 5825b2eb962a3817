//! `flashpack eval <MODEL> --text FILE`: perplexity of a text file, as the
//! foundation issue defines it (see `runtime::perplexity`).

use std::path::PathBuf;

use clap::Args;

use crate::cli::run::{default_ffn_mode, open_session, print_io, FlashArgs};
use crate::cli::Output;
use crate::error::Error;
use crate::runtime::session::PerplexityReport;
use crate::runtime::sparse::FfnMode;

#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  flashpack eval fixtures/models/opt-relu --text fixtures/text/heldout.txt --json"
)]
pub struct EvalArgs {
    /// A Hugging Face checkpoint directory or a flashpack file.
    pub model: PathBuf,
    /// A UTF-8 text file to score.
    #[arg(long)]
    pub text: PathBuf,
    /// Window length in tokens; each window starts from an empty KV cache.
    #[arg(long, default_value_t = 256)]
    pub ctx: usize,
    /// Worker threads (default: one per core). Results do not depend on it.
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
struct EvalReport {
    model: String,
    text_file: String,
    #[serde(flatten)]
    result: PerplexityReport,
}

pub fn run(args: &EvalArgs, out: &Output) -> anyhow::Result<()> {
    let bytes = std::fs::read(&args.text).map_err(|e| Error::io(&args.text, e))?;
    let text = String::from_utf8(bytes)
        .map_err(|_| Error::InvalidArgument(format!("{}: not UTF-8 text", args.text.display())))?;
    let model_path = crate::input::hub::resolve_model(&args.model)?;
    let ffn = default_ffn_mode(&model_path, args.ffn);
    let session = open_session(&model_path, ffn, &args.flash, args.ctx, args.threads)?;
    let ids = session.tokenizer().encode(&text)?;
    // A progress bar on a terminal only: pipes and logs get the summary.
    let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
        let bar = indicatif::ProgressBar::new(ids.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "scoring [{bar:40}] {pos}/{len} tokens ({per_sec}, {eta})",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        bar
    });
    let progress = |done: usize, total: usize| {
        if let Some(bar) = &bar {
            bar.set_position(done.min(total) as u64);
        }
    };
    let r = session.perplexity(&ids, args.ctx, &progress)?;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    print_io(&r.io);
    out.human(format_args!(
        "perplexity {:.4} over {} tokens ({} windows of up to {}), {:.2} s",
        r.perplexity,
        r.tokens_scored,
        r.windows,
        r.ctx,
        r.elapsed_ms / 1e3
    ));
    out.json_result(&EvalReport {
        model: args.model.display().to_string(),
        text_file: args.text.display().to_string(),
        result: r,
    })
}
