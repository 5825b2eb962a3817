//! `flashpack bench`: prefill and decode speed on fixture checkpoints and on a
//! random-weight TinyLlama-sized model, per thread count, beside the machine's
//! streaming read bandwidth measured in the same run.

use std::path::PathBuf;

use clap::Args;

use crate::cli::Output;
use crate::input::Checkpoint;
use crate::runtime::bench::{measure_speed, stream_read_gb_per_s, synthetic_model, SpeedResult};
use crate::runtime::{with_threads, Model};

#[derive(Debug, Args)]
#[command(after_help = "Example (the command behind BENCHMARKS.md):\n  \
    flashpack bench --model fixtures/models/opt-relu --threads 1,2 --json")]
pub struct BenchArgs {
    /// Checkpoint directories to measure (in addition to the synthetic model).
    #[arg(long = "model")]
    pub models: Vec<PathBuf>,
    /// Skip the synthetic random-weight model.
    #[arg(long)]
    pub no_synthetic: bool,
    /// Layers of the synthetic model (hidden 2048, FFN 5632, f16).
    #[arg(long, default_value_t = 16)]
    pub synthetic_layers: usize,
    /// Thread counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub threads: Vec<usize>,
    /// Prompt length of the prefill measurement.
    #[arg(long, default_value_t = 128)]
    pub prefill_tokens: usize,
    /// Decode steps measured after the prefill.
    #[arg(long, default_value_t = 32)]
    pub decode_tokens: usize,
    /// Rounds of decode steps; the fastest round is reported.
    #[arg(long, default_value_t = 3)]
    pub decode_reps: usize,
    /// Buffer size of the streaming-read bandwidth measurement, MiB.
    #[arg(long, default_value_t = 1024)]
    pub bandwidth_mib: usize,
}

#[derive(serde::Serialize)]
struct Row {
    model: String,
    threads: usize,
    stream_read_gb_per_s: f64,
    /// Decode weight bandwidth as a fraction of the streaming read bandwidth.
    decode_bandwidth_fraction: f64,
    #[serde(flatten)]
    speed: SpeedResult,
}

#[derive(serde::Serialize)]
struct BenchReport {
    results: Vec<Row>,
}

pub fn run(args: &BenchArgs, out: &Output) -> anyhow::Result<()> {
    let mut models: Vec<(String, Model)> = Vec::new();
    for dir in &args.models {
        let ckpt = Checkpoint::open(dir)?;
        models.push((dir.display().to_string(), Model::from_checkpoint(&ckpt)?));
    }
    if !args.no_synthetic {
        eprintln!(
            "building the synthetic model ({} layers, hidden 2048, FFN 5632, f16) ...",
            args.synthetic_layers
        );
        models.push((
            format!("synthetic-{}l-2048-5632-f16", args.synthetic_layers),
            synthetic_model(args.synthetic_layers)?,
        ));
    }
    let mut rows = Vec::new();
    for &threads in &args.threads {
        for (name, model) in &models {
            let (bw, speed) = with_threads(Some(threads), || {
                // An untimed warm-up pass faults in pages and warms caches.
                measure_speed(model, args.prefill_tokens.min(16), 2, 1)?;
                let speed = measure_speed(
                    model,
                    args.prefill_tokens,
                    args.decode_tokens,
                    args.decode_reps,
                )?;
                // Measured right after the decode, on the same pool, so both
                // numbers see the same machine state.
                let bw = stream_read_gb_per_s(args.bandwidth_mib << 20, 5);
                Ok::<_, crate::Error>((bw, speed))
            })??;
            let frac = speed.decode_weight_gb_per_s / bw;
            out.human(format_args!(
                "{name} threads {threads}: prefill {:.1} tok/s, decode {:.2} tok/s, weights {:.1} MB/token -> {:.2} GB/s = {:.0}% of streaming read {bw:.2} GB/s",
                speed.prefill_tokens_per_s,
                speed.decode_tokens_per_s,
                speed.decode_weight_bytes as f64 / 1e6,
                speed.decode_weight_gb_per_s,
                frac * 100.0
            ));
            rows.push(Row {
                model: name.clone(),
                threads,
                stream_read_gb_per_s: bw,
                decode_bandwidth_fraction: frac,
                speed,
            });
        }
    }
    out.json_result(&BenchReport { results: rows })
}
