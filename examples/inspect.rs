//! Describes a checkpoint directory or a flashpack file: architecture, sizes,
//! parameter counts, dtypes and, for a packed file, its layout:
//!
//! ```sh
//! cargo run --release --example inspect [MODEL]
//! ```
//!
//! MODEL defaults to the fixture `fixtures/models/llama-silu`. Prints the
//! report as JSON (the object `flashpack inspect --json` prints), then a line
//! read from the typed report.

use std::path::PathBuf;
use std::process::ExitCode;

use flashpack::inspect;

fn main() -> ExitCode {
    let model: PathBuf = std::env::args().nth(1).map_or_else(
        || concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/models/llama-silu").into(),
        PathBuf::from,
    );
    let report = match inspect(&model) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(e.exit_class().code() as u8);
        }
    };
    println!(
        "{}",
        serde_json::to_string_pretty(&report).expect("a report serializes")
    );
    let s = &report.summary;
    eprintln!(
        "{}: {} layers, hidden {}, FFN {} neurons, {} parameters ({} in the FFN){}",
        s.architecture,
        s.num_layers,
        s.hidden_size,
        s.ffn_width,
        s.params_total,
        s.params_ffn,
        match &report.packed {
            Some(p) => format!(", packed: {} FFN bytes on flash", p.ffn_bytes),
            None => String::new(),
        }
    );
    ExitCode::SUCCESS
}
