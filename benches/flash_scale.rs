//! Flash at scale (a measurement, not a test; issue 6, "Benchmark"): the I/O of
//! one decoded token on a multi-GiB FFN, naive versus flash, cold, with direct
//! reads from the converted file.
//!
//! 1. Writes a synthetic Llama-shaped ReLU checkpoint (hidden 2048, FFN 11008,
//!    f16, `FLASHPACK_SCALE_LAYERS` layers, default 16: 2.0 GiB of FFN),
//!    streaming, and packs it with `flashpack::pack::convert` (no calibration:
//!    checkpoint neuron order, no predictors).
//! 2. Neuron activity replays a trace kept from the trained fixture
//!    (`flashpack calibrate fixtures/models/opt-relu --calib
//!    fixtures/text/train.txt --keep-trace DIR`, run here unless
//!    `FLASHPACK_SCALE_TRACE` names such a directory): synthetic layer `l`,
//!    token `t`, neuron `j` fires iff fixture layer `l % 4`, token `t`, neuron
//!    `j % 512` fires (the fixture's sparsity, adjacency and token-to-token
//!    correlation, tiled across the width).
//! 3. Measures at the I/O layer, through the runtime's `FlashReader` (O_DIRECT,
//!    reads rounded out to the file's alignment, 4 reads in flight) after
//!    `posix_fadvise(DONTNEED)` on the whole file:
//!    - naive: every layer's whole FFN section per token, 1 MiB reads;
//!    - oracle window 0: exactly the token's fired bundles per layer, nothing
//!      kept between tokens;
//!    - flash window W: the runtime's sliding window (bundles fired in the last
//!      W tokens stay resident; only newly fired ones are read), active sets
//!      taken from the trace (a perfect predictor).
//!      Reads coalesce bundles at most one bundle apart (and bundles whose
//!      aligned blocks touch), split at 256 KiB, as the runtime does.
//!
//! No matmuls: what is timed is the reads. Run:
//! `cargo bench --bench flash_scale` (`FLASHPACK_BENCH_DIR` for the scratch
//! directory, `FLASHPACK_SCALE_TOKENS` flash tokens (default 128),
//! `FLASHPACK_SCALE_NAIVE_TOKENS` (default 4), `FLASHPACK_SCALE_WINDOW` (4)).

use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Instant;

use flashpack::format::PackedFile;
use flashpack::runtime::bench::{write_synthetic_checkpoint, SyntheticShape};
use flashpack::runtime::flash::bench::disk_gb_per_s;
use flashpack::runtime::flash::io::{ReadOp, Staging};
use flashpack::runtime::flash::FlashReader;

const HIDDEN: usize = 2048;
const FFN: usize = 11008;
const VOCAB: usize = 32000;
const THREADS: usize = 4;
const NAIVE_READ: usize = 1 << 20;
const FLASH_READ: usize = 256 << 10;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .map(|s| s.parse().expect(name))
        .unwrap_or(default)
}

fn main() {
    let layers = env_usize("FLASHPACK_SCALE_LAYERS", 16);
    let tokens = env_usize("FLASHPACK_SCALE_TOKENS", 128);
    let naive_tokens = env_usize("FLASHPACK_SCALE_NAIVE_TOKENS", 4);
    let window = env_usize("FLASHPACK_SCALE_WINDOW", 4);
    let base = std::env::var_os("FLASHPACK_BENCH_DIR")
        .map(Into::into)
        .unwrap_or_else(std::env::temp_dir);
    let scratch = tempfile::tempdir_in(base).expect("scratch dir");

    let trace_dir: PathBuf = match std::env::var_os("FLASHPACK_SCALE_TRACE") {
        Some(d) => d.into(),
        None => {
            let d = scratch.path().join("trace");
            let root = Path::new(env!("CARGO_MANIFEST_DIR"));
            let status = Command::new(env!("CARGO_BIN_EXE_flashpack"))
                .arg("calibrate")
                .arg(root.join("fixtures/models/opt-relu"))
                .arg("--calib")
                .arg(root.join("fixtures/text/train.txt"))
                .arg("--keep-trace")
                .arg(&d)
                .stdout(std::process::Stdio::null())
                .status()
                .unwrap();
            assert!(status.success(), "calibrate --keep-trace failed");
            d
        }
    };

    let ckpt = scratch.path().join("ckpt");
    std::fs::create_dir(&ckpt).unwrap();
    let t0 = Instant::now();
    let ckpt_bytes = write_checkpoint(&ckpt, layers);
    eprintln!(
        "wrote {:.2} GiB checkpoint in {:.1} s",
        ckpt_bytes as f64 / (1u64 << 30) as f64,
        t0.elapsed().as_secs_f64()
    );
    let packed = scratch.path().join("scale.flashpack");
    let t0 = Instant::now();
    flashpack::pack::convert(
        &ckpt,
        &packed,
        &flashpack::pack::ConvertOptions::default(),
        &|_, _| {},
    )
    .expect("convert");
    eprintln!("converted in {:.1} s", t0.elapsed().as_secs_f64());
    std::fs::remove_dir_all(&ckpt).unwrap();

    let file = PackedFile::open(&packed).expect("open packed");
    let align = (file.manifest.alignment as usize).max(512);
    let mut specs = Vec::new(); // (offset, neurons, stride)
    for e in &file.manifest.ffn_layers {
        let s = file.section(&e.section).expect("ffn section");
        specs.push((s.offset, e.neurons as usize, e.bundle_bytes as usize));
    }
    let file_len = file.file_length;
    drop(file);
    let stride = specs[0].2;
    let ffn_bytes: u64 = specs.iter().map(|s| (s.1 * s.2) as u64).sum();
    let first = specs.iter().map(|s| s.0).min().unwrap();

    // Trace: per fixture layer, per token, the fired bits.
    let mut fixture: Vec<Vec<Vec<u64>>> = Vec::new();
    let fixture_ffn = 512usize;
    let words = fixture_ffn.div_ceil(64);
    while let Ok(raw) = std::fs::read(trace_dir.join(format!("layer{}.fired.bits", fixture.len())))
    {
        let toks: Vec<Vec<u64>> = raw
            .chunks_exact(words * 8)
            .map(|c| {
                c.chunks_exact(8)
                    .map(|w| u64::from_le_bytes(w.try_into().unwrap()))
                    .collect()
            })
            .collect();
        fixture.push(toks);
    }
    assert!(!fixture.is_empty(), "no layer0.fired.bits in {trace_dir:?}");
    let trace_tokens = fixture[0].len();
    let tokens = tokens.min(trace_tokens);
    // active[t][l] = sorted fired neurons of synthetic layer l at token t.
    let active: Vec<Vec<Vec<u32>>> = (0..tokens)
        .map(|t| {
            (0..specs.len())
                .map(|l| {
                    let bits = &fixture[l % fixture.len()][t];
                    (0..specs[l].1 as u32)
                        .filter(|&j| {
                            let f = j as usize % fixture_ffn;
                            bits[f / 64] >> (f % 64) & 1 == 1
                        })
                        .collect()
                })
                .collect()
        })
        .collect();
    let fired: usize = active.iter().flatten().map(Vec::len).sum();
    let density = fired as f64 / (tokens * specs.iter().map(|s| s.1).sum::<usize>()) as f64;

    // Window maxima: the cache capacity flash needs per layer.
    let cap_rows: usize = (0..specs.len())
        .map(|l| {
            (0..tokens)
                .map(|t| {
                    let mut u: Vec<u32> = active[t.saturating_sub(window)..=t]
                        .iter()
                        .flat_map(|a| a[l].iter().copied())
                        .collect();
                    u.sort_unstable();
                    u.dedup();
                    u.len()
                })
                .max()
                .unwrap_or(0)
        })
        .sum();
    let cache_bytes = (cap_rows * stride) as u64;

    eprintln!(
        "packed {:.2} GiB, FFN {:.2} GiB in {} layers x {} bundles of {} B, alignment {}; trace {} tokens, density {:.1}%",
        file_len as f64 / (1u64 << 30) as f64,
        ffn_bytes as f64 / (1u64 << 30) as f64,
        specs.len(),
        specs[0].1,
        stride,
        align,
        trace_tokens,
        density * 100.0
    );
    eprintln!(
        "flash window {window} cache (window maxima): {:.0} MiB = {:.1}% of the FFN; with the dense part ({:.0} MiB): {:.1}% of the model (budget 50% = {:.0} MiB)",
        cache_bytes as f64 / (1u64 << 20) as f64,
        cache_bytes as f64 / ffn_bytes as f64 * 100.0,
        (file_len - ffn_bytes) as f64 / (1u64 << 20) as f64,
        (cache_bytes + file_len - ffn_bytes) as f64 / file_len as f64 * 100.0,
        file_len as f64 / 2.0 / (1u64 << 20) as f64
    );

    let reader = FlashReader::open(&packed, align, first, THREADS).expect("reader");
    eprintln!("io mode: {}", reader.mode().as_str());
    let mut rows: Vec<Row> = Vec::new();

    // Naive.
    drop_cache(&packed);
    let mut staging = Staging::new(THREADS, NAIVE_READ, align).unwrap();
    let (b0, o0) = counters(&reader);
    let mut io_s = 0.0;
    for _ in 0..naive_tokens {
        for &(off, n, st) in &specs {
            let end = off + (n * st) as u64;
            let mut ops = Vec::new();
            let mut at = off;
            while at < end {
                let len = ((end - at) as usize).min(NAIVE_READ).div_ceil(align) * align;
                ops.push(ReadOp { offset: at, len });
                at += len as u64;
            }
            io_s += run_ops(&reader, &mut staging, &ops);
        }
    }
    rows.push(row("naive", naive_tokens, &reader, b0, o0, io_s, first));

    // Oracle window 0 and flash window W.
    for (name, w) in [
        ("oracle window 0".to_string(), None),
        (format!("flash window {window}"), Some(window)),
    ] {
        drop_cache(&packed);
        let mut staging = Staging::new(THREADS, FLASH_READ + align, align).unwrap();
        let mut resident: Vec<Vec<bool>> = specs.iter().map(|s| vec![false; s.1]).collect();
        let (b0, o0) = counters(&reader);
        let mut io_s = 0.0;
        for t in 0..tokens {
            for (l, &(off, _, st)) in specs.iter().enumerate() {
                let want: Vec<u32> = active[t][l]
                    .iter()
                    .copied()
                    .filter(|&j| !resident[l][j as usize])
                    .collect();
                let ops = coalesce(&want, off, st, align);
                io_s += run_ops(&reader, &mut staging, &ops);
                if let Some(w) = w {
                    let r = &mut resident[l];
                    r.iter_mut().for_each(|x| *x = false);
                    for a in &active[t.saturating_sub(w)..=t] {
                        for &j in &a[l] {
                            r[j as usize] = true;
                        }
                    }
                }
            }
        }
        rows.push(row(&name, tokens, &reader, b0, o0, io_s, first));
    }

    let naive_ms = rows[0].io_ms;
    let oracle_bytes = rows[1].bytes;
    println!(
        "| mode | tokens | bytes/token | reads/token | mean read KiB | I/O ms/token | read GB/s | disk GB/s, same size | of disk | speedup | bytes / oracle |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {:.0} | {:.1} | {:.1} | {:.2} | {:.3} | {:.3} | {:.0}% | {:.2}x | {:.2} |",
            r.name,
            r.tokens,
            r.bytes,
            r.ops,
            r.mean / 1024.0,
            r.io_ms,
            r.gbps,
            r.disk,
            r.gbps / r.disk.max(1e-9) * 100.0,
            naive_ms / r.io_ms.max(1e-9),
            r.bytes / oracle_bytes.max(1.0)
        );
    }
}

struct Row {
    name: String,
    tokens: usize,
    bytes: f64,
    ops: f64,
    mean: f64,
    io_ms: f64,
    gbps: f64,
    disk: f64,
}

fn counters(r: &FlashReader) -> (u64, u64) {
    (
        r.counters.bytes.load(Ordering::Relaxed),
        r.counters.ops.load(Ordering::Relaxed),
    )
}

fn row(name: &str, tokens: usize, r: &FlashReader, b0: u64, o0: u64, io_s: f64, first: u64) -> Row {
    let (b1, o1) = counters(r);
    let (bytes, ops) = ((b1 - b0) as f64, (o1 - o0) as f64);
    let mean = bytes / ops.max(1.0);
    let disk = disk_gb_per_s(r, first, mean as usize).unwrap();
    let n = tokens.max(1) as f64;
    eprintln!("{name}: done");
    Row {
        name: name.to_string(),
        tokens,
        bytes: bytes / n,
        ops: ops / n,
        mean,
        io_ms: io_s * 1e3 / n,
        gbps: bytes / io_s.max(1e-9) / 1e9,
        disk,
    }
}

/// Runs `ops` `THREADS` at a time; returns the seconds spent.
fn run_ops(reader: &FlashReader, staging: &mut Staging, ops: &[ReadOp]) -> f64 {
    let t = Instant::now();
    for batch in ops.chunks(staging.slots) {
        reader.read_batch(staging, batch).expect("read");
    }
    t.elapsed().as_secs_f64()
}

/// Reads for the sorted bundles `want` of a layer at `off` with stride `st`:
/// runs at most one bundle apart (or whose aligned blocks touch) merge, the
/// merged ranges are rounded out to `align` and split at `FLASH_READ`.
fn coalesce(want: &[u32], off: u64, st: usize, align: usize) -> Vec<ReadOp> {
    let a = align as u64;
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut prev: Option<u32> = None;
    for &j in want {
        let s = (off + j as u64 * st as u64) / a * a;
        let e = (off + (j as u64 + 1) * st as u64).div_ceil(a) * a;
        match (ranges.last_mut(), prev) {
            (Some(last), Some(p)) if j <= p + 2 || s <= last.1 => last.1 = last.1.max(e),
            _ => ranges.push((s, e)),
        }
        prev = Some(j);
    }
    let mut ops = Vec::new();
    for (mut s, e) in ranges {
        while s < e {
            let len = ((e - s) as usize).min(FLASH_READ);
            ops.push(ReadOp { offset: s, len });
            s += len as u64;
        }
    }
    ops
}

fn drop_cache(path: &Path) {
    let f = std::fs::File::open(path).unwrap();
    f.sync_all().ok();
    // SAFETY: a valid open descriptor; advice only.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0, "posix_fadvise(DONTNEED)");
}

/// Writes a Llama-shaped ReLU f16 checkpoint with `layers` layers and
/// pseudo-random weights, streaming. Returns the weight file's size.
fn write_checkpoint(dir: &Path, layers: usize) -> u64 {
    let shape = SyntheticShape {
        hidden: HIDDEN,
        ffn: FFN,
        vocab: VOCAB,
        layers,
        heads: 16,
    };
    let tokenizer =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/models/opt-relu/tokenizer.json");
    write_synthetic_checkpoint(dir, &shape, &tokenizer).expect("synthetic checkpoint")
}
