//! Perplexity of a text under a model:
//!
//! ```sh
//! cargo run --release --example evaluate [MODEL] [TEXT_FILE] [CTX]
//! ```
//!
//! MODEL is a checkpoint directory or a flashpack file (default: the fixture
//! `fixtures/models/llama-silu`), TEXT_FILE a UTF-8 text (default: the held-out
//! fixture text `fixtures/text/heldout.txt`), CTX the window in tokens
//! (default 128): the text is cut into windows of CTX tokens, each scored from
//! an empty KV cache, as `flashpack eval MODEL --text TEXT_FILE --ctx CTX`
//! does. Prints the report as JSON (the keys of `flashpack eval --json`).

use std::process::ExitCode;

use flashpack::{Error, Session, SessionOptions};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let model = args.next().unwrap_or_else(|| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/models/llama-silu").into()
    });
    let text = args.next().unwrap_or_else(|| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/text/heldout.txt").into()
    });
    let ctx = match args.next().map(|n| n.parse::<usize>()) {
        None => 128,
        Some(Ok(n)) => n,
        Some(Err(e)) => {
            eprintln!("error: CTX: {e}");
            return ExitCode::from(2);
        }
    };
    match evaluate(&model, &text, ctx) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_class().code() as u8)
        }
    }
}

fn evaluate(model: &str, text_file: &str, ctx: usize) -> flashpack::Result<()> {
    let text = std::fs::read_to_string(text_file).map_err(|e| Error::Io {
        path: text_file.into(),
        source: e,
    })?;
    let session = Session::open(model, &SessionOptions::default())?;
    let report = session.perplexity_of_text(&text, ctx)?;
    eprintln!(
        "perplexity {:.4} over {} tokens ({} windows of {ctx})",
        report.perplexity, report.tokens_scored, report.windows
    );
    println!(
        "{}",
        serde_json::to_string_pretty(&report).expect("a report serializes")
    );
    Ok(())
}
