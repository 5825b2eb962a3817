//! Opens a model and generates text after a prompt, streaming it to stdout:
//!
//! ```sh
//! cargo run --release --example generate [MODEL] [PROMPT] [MAX_NEW_TOKENS]
//! ```
//!
//! MODEL is a Hugging Face checkpoint directory or a flashpack file (default:
//! the repository's fixture `fixtures/models/llama-silu`, a tiny Llama trained
//! on `fixtures/text/train.txt`); PROMPT defaults to "KING HENRY.",
//! MAX_NEW_TOKENS to 32. Decoding is greedy, so a run prints what
//! `flashpack run MODEL -p PROMPT -n 32 --temperature 0` prints. A packed file
//! with predictors opens in the `flash` mode (its FFN read from disk); the
//! timings and bytes read go to stderr.

use std::io::Write;
use std::process::ExitCode;

use flashpack::{SamplingParams, Session, SessionOptions};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let model = args.next().unwrap_or_else(|| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/models/llama-silu").into()
    });
    let prompt = args.next().unwrap_or_else(|| "KING HENRY.".into());
    let max_new_tokens = match args.next().map(|n| n.parse::<usize>()) {
        None => 32,
        Some(Ok(n)) => n,
        Some(Err(e)) => {
            eprintln!("error: MAX_NEW_TOKENS: {e}");
            return ExitCode::from(2);
        }
    };
    match generate(&model, &prompt, max_new_tokens) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The message names the file or option; the exit class says
            // whose fault it was (2: the input, 3: the environment).
            eprintln!("error: {e}");
            ExitCode::from(e.exit_class().code() as u8)
        }
    }
}

fn generate(model: &str, prompt: &str, max_new_tokens: usize) -> flashpack::Result<()> {
    // Default options: the exact model in DRAM for a checkpoint directory,
    // `flash` for a packed file with predictors.
    let session = Session::open(model, &SessionOptions::default())?;
    let prompt_ids = session.tokenizer().encode(prompt)?;
    // Stops at the model's EOS ids and within its context.
    let options = session.generate_options(max_new_tokens, SamplingParams::default());
    let report = session.generate(&prompt_ids, &options, |piece| {
        // Each piece is final text (whole characters), printed as it comes.
        print!("{piece}");
        std::io::stdout().flush().ok();
        Ok(())
    })?;
    println!();
    let (tokens, why) = (report.generated_tokens, report.stop_reason);
    eprintln!("{tokens} tokens, stopped by {why:?}");
    // What the run read from flash (0 in the in-DRAM modes) and its speed.
    eprintln!(
        "mode {}: {} bytes read, {:.1} tokens/s",
        report.ffn.name(),
        report.io.read_bytes,
        report.decode_tokens_per_s
    );
    Ok(())
}
