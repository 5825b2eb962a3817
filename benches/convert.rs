//! Convert benchmark (a measurement, not a test): writes synthetic f16 Llama-shaped
//! checkpoints of several sizes, then for each measures, in the same run,
//! - a plain copy of the weight file (`std::fs::copy`, what `cp` does), and
//! - `flashpack convert` of the checkpoint (a child process), with its peak
//!   anonymous memory (RssAnon, polled from /proc; mapped checkpoint pages count
//!   in RSS but not in RssAnon).
//!
//! Run: `cargo bench --bench convert` (sizes in GiB: `FLASHPACK_BENCH_GIB=2,4`,
//! scratch directory: `FLASHPACK_BENCH_DIR`, default the system temp dir).
//! Both the copy and the convert read the checkpoint from the page cache (it was
//! just written); the numbers compare CPU-side costs, not a cold disk.

use std::path::Path;

use flashpack::runtime::bench::{write_synthetic_checkpoint, SyntheticShape};
use std::process::Command;
use std::time::{Duration, Instant};

const HIDDEN: usize = 2048;
const FFN: usize = 5632;
const VOCAB: usize = 32000;

fn main() {
    let sizes: Vec<f64> = std::env::var("FLASHPACK_BENCH_GIB")
        .unwrap_or_else(|_| "1,3".into())
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .expect("FLASHPACK_BENCH_GIB: comma-separated numbers")
        })
        .collect();
    let base = std::env::var_os("FLASHPACK_BENCH_DIR")
        .map(Into::into)
        .unwrap_or_else(std::env::temp_dir);
    let scratch = tempfile::tempdir_in(base).expect("scratch dir");
    println!("| checkpoint | layers | copy MB/s | convert MB/s | convert / copy | peak RssAnon MiB | output MiB |");
    println!("|---|---|---|---|---|---|---|");
    for gib in sizes {
        let dir = scratch.path().join(format!("ckpt-{gib}"));
        std::fs::create_dir(&dir).unwrap();
        let (layers, bytes) = write_checkpoint(&dir, gib);
        let copy_s = time(|| {
            std::fs::copy(dir.join("model.safetensors"), scratch.path().join("copy")).unwrap();
        });
        std::fs::remove_file(scratch.path().join("copy")).unwrap();
        let out = scratch.path().join("out.flashpack");
        let started = Instant::now();
        let mut child = Command::new(env!("CARGO_BIN_EXE_flashpack"))
            .args([
                "convert",
                dir.to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
                "--json",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut peak_kib = 0u64;
        let status = loop {
            if let Some(kib) = rss_anon_kib(child.id()) {
                peak_kib = peak_kib.max(kib);
            }
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let convert_s = started.elapsed().as_secs_f64();
        assert!(status.success(), "convert failed");
        let mut report = String::new();
        std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut report).unwrap();
        let report: serde_json::Value = serde_json::from_str(&report).unwrap();
        eprintln!(
            "  {gib} GiB: hash sources {:.0} ms, dense {:.0} ms, ffn {:.0} ms, fsync+rename {:.0} ms",
            report["hash_sources_ms"].as_f64().unwrap(),
            report["dense_ms"].as_f64().unwrap(),
            report["ffn_ms"].as_f64().unwrap(),
            report["commit_ms"].as_f64().unwrap()
        );
        let out_bytes = std::fs::metadata(&out).unwrap().len();
        std::fs::remove_file(&out).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let mb = bytes as f64 / 1e6;
        println!(
            "| {gib} GiB | {layers} | {:.0} | {:.0} | {:.2} | {:.1} | {:.0} |",
            mb / copy_s,
            mb / convert_s,
            copy_s / convert_s,
            peak_kib as f64 / 1024.0,
            out_bytes as f64 / (1024.0 * 1024.0)
        );
    }
}

fn time(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64()
}

fn rss_anon_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("RssAnon:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Writes a Llama-shaped f16 checkpoint of about `gib` GiB with pseudo-random
/// weights (streaming, see `write_synthetic_checkpoint`). Returns the layer count
/// and the weight file's size.
fn write_checkpoint(dir: &Path, gib: f64) -> (usize, u64) {
    let shape = |layers| SyntheticShape {
        hidden: HIDDEN,
        ffn: FFN,
        vocab: VOCAB,
        layers,
        heads: 16,
    };
    let per_layer = shape(1).weight_bytes() - shape(0).weight_bytes();
    let target = (gib * (1u64 << 30) as f64) as u64;
    let layers = (target.saturating_sub(shape(0).weight_bytes()) / per_layer).max(1) as usize;
    let tokenizer =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/models/opt-relu/tokenizer.json");
    let bytes =
        write_synthetic_checkpoint(dir, &shape(layers), &tokenizer).expect("synthetic checkpoint");
    (layers, bytes)
}
