//! `flashpack bench`: prefill and decode speed on fixture checkpoints and on a
//! random-weight TinyLlama-sized model, per thread count, beside the machine's
//! streaming read bandwidth measured in the same run.

use std::path::PathBuf;

use clap::Args;

use crate::cli::Output;
use crate::input::Checkpoint;
use crate::runtime::bench::{measure_speed, stream_read_gb_per_s, synthetic_model, SpeedResult};
use crate::runtime::sparse::FfnMode;
use crate::runtime::{with_threads, Model};

#[derive(Debug, Args)]
#[command(after_help = "Examples (the commands behind BENCHMARKS.md):\n  \
    flashpack bench model.flashpack            the paper's Table 2: naive, flash, oracle-flash, dense;\n                                               then oracle and predicted in DRAM (FFN wall ms: sparse vs dense FFN)\n  \
    flashpack bench --model fixtures/models/opt-relu --thread-counts 1,2 --json")]
pub struct BenchArgs {
    /// Calibrated packed files: each is run through naive, flash (window 0
    /// and --window), oracle-flash, dense, and in DRAM oracle and predicted
    /// (its default selector) on the same tokens, and the dense-speed part
    /// is skipped unless --model asks for it.
    #[arg(value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Checkpoint directories to measure (in addition to the synthetic model).
    #[arg(long = "model")]
    pub models: Vec<PathBuf>,
    /// Skip the synthetic random-weight model.
    #[arg(long)]
    pub no_synthetic: bool,
    /// Layers of the synthetic model (hidden 2048, FFN 5632, f16).
    #[arg(long, default_value_t = 16)]
    pub synthetic_layers: usize,
    /// Worker-thread counts to measure the speed at, comma-separated
    /// (`--threads` of the other commands is the one count they use).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub thread_counts: Vec<usize>,
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
    /// Like FILE, beside the dense-speed part (decode steps: --decode-tokens).
    #[arg(long = "packed")]
    pub packed: Vec<PathBuf>,
    #[command(flatten)]
    pub flash: crate::cli::run::FlashArgs,
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
    /// One entry per packed file and mode (`--packed`).
    flash_modes: Vec<FlashRow>,
}

#[derive(serde::Serialize)]
struct FlashRow {
    file: String,
    #[serde(flatten)]
    row: crate::runtime::flash::bench::ModeRow,
}

/// The paper's Table 2 for each `--packed` file.
fn flash_table(args: &BenchArgs, out: &Output) -> anyhow::Result<Vec<FlashRow>> {
    use crate::runtime::flash::bench::compare_modes;
    const TEXT: &str = "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it was the season of Darkness. ";
    let mut rows = Vec::new();
    for path in args.files.iter().chain(&args.packed) {
        // The flash modes' shared options; each mode is measured with its own.
        let opts = args
            .flash
            .session_options(FfnMode::Flash, args.decode_tokens + 8, None)
            .flash_options(path, FfnMode::Flash)?;
        let packed = crate::format::PackedFile::open(path)?;
        // Said before any work: flash needs the predictors of `convert --calib`.
        if packed.manifest.predictors.is_empty() && packed.config.moe.is_none() {
            return Err(crate::Error::InvalidArgument(format!(
                "{}: bench compares flash with the other modes and needs a calibrated packed file with predictors (convert --calib)",
                path.display()
            ))
            .into());
        }
        let tokenizer = crate::runtime::packed::packed_tokenizer(&packed)?;
        let mut ids = Vec::new();
        while ids.len() < args.decode_tokens {
            ids.extend(tokenizer.encode(TEXT)?);
        }
        ids.truncate(args.decode_tokens);
        let file = path.display().to_string();
        out.human(format_args!(
            "{file}: {} tokens decoded per mode (per token: I/O, predictor, memory management and FFN compute ms as in the paper's Table 3; FFN wall: all time in the FFNs, selection and reads included, and the fraction of neurons computed)\n{:<20} {:>14} {:>10} {:>12} {:>10} {:>10} {:>8} {:>8} {:>8} {:>10} {:>12} {:>10} {:>8}",
            ids.len(),
            "mode",
            "bytes/token",
            "reads/tok",
            "read GB/s",
            "disk GB/s",
            "I/O ms/t",
            "pred ms",
            "mem ms",
            "FFN ms",
            "FFN wall ms",
            "computed",
            "ms/token",
            "speedup"
        ));
        for row in compare_modes(path, &ids, &opts)? {
            out.human(format_args!(
                "{:<20} {:>14.0} {:>10.1} {:>12.3} {:>10.3} {:>10.3} {:>8.3} {:>8.3} {:>8.3} {:>12.3} {:>9.1}% {:>10.3} {:>7.2}x{}",
                row.mode,
                row.bytes_read_per_token,
                row.read_ops_per_token,
                row.read_gb_per_s,
                row.disk_gb_per_s_same_size,
                row.io_ms_per_token,
                row.predictor_ms_per_token,
                row.memory_ms_per_token,
                row.ffn_compute_ms_per_token,
                row.ffn_ms_per_token,
                100.0 * row.ffn_active_fraction,
                row.ms_per_token,
                row.speedup_over_naive,
                row.selector
                    .map_or(String::new(), |s| format!(" (selector {s:?})").to_lowercase())
                    + &row.experts.as_ref().map_or(String::new(), |e| format!(
                        " (experts {:.2} chosen, {:.2} read per token; routing {:.3} ms/token; hit rate {:.3})",
                        e.chosen_per_token, e.read_per_token, e.routing_ms_per_token, row.window_hit_rate
                    ))
            ));
            rows.push(FlashRow {
                file: file.clone(),
                row,
            });
        }
    }
    Ok(rows)
}

pub fn run(args: &BenchArgs, out: &Output) -> anyhow::Result<()> {
    let mut models: Vec<(String, Model)> = Vec::new();
    for dir in &args.models {
        let ckpt = Checkpoint::open(dir)?;
        models.push((dir.display().to_string(), Model::from_checkpoint(&ckpt)?));
    }
    // `flashpack bench FILE` is about the file: no synthetic model unless asked.
    let files_only = !args.files.is_empty() && args.models.is_empty();
    if !args.no_synthetic && !files_only {
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
    for &threads in &args.thread_counts {
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
    let flash_modes = flash_table(args, out)?;
    out.json_result(&BenchReport {
        results: rows,
        flash_modes,
    })
}
