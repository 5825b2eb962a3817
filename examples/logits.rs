//! Computes a model's logits for a prompt, for checking a converted model
//! against your own reference:
//!
//! ```sh
//! cargo run --release --example logits [MODEL] [PROMPT]
//! ```
//!
//! MODEL is a checkpoint directory or a flashpack file (default: the fixture
//! `fixtures/models/llama-silu`), PROMPT defaults to "KING HENRY.". Prints the
//! shape (one row per prompt position, one column per vocabulary entry), the
//! first logits of the last row and the id they rank first: the token greedy
//! generation would choose next.

use std::process::ExitCode;

use flashpack::{Session, SessionOptions};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let model = args.next().unwrap_or_else(|| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/models/llama-silu").into()
    });
    let prompt = args.next().unwrap_or_else(|| "KING HENRY.".into());
    match logits(&model, &prompt) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_class().code() as u8)
        }
    }
}

fn logits(model: &str, prompt: &str) -> flashpack::Result<()> {
    let session = Session::open(model, &SessionOptions::default())?;
    let ids = session.tokenizer().encode(prompt)?;
    // Every position of `ids` computed as one prompt from an empty KV cache:
    // `ids.len() x vocab` values, row-major.
    let logits = session.logits(&ids)?;
    let vocab = logits.len() / ids.len();
    println!("logits: {} positions x {vocab} vocabulary", ids.len());
    let last = &logits[logits.len() - vocab..];
    let shown: Vec<String> = last.iter().take(5).map(|v| format!("{v:.4}")).collect();
    println!("last row starts: [{}, ...]", shown.join(", "));
    // The first maximum, as greedy decoding takes it.
    let next = last
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 {
                (i, v)
            } else {
                best
            }
        })
        .0;
    println!("next token id: {next}");
    Ok(())
}
