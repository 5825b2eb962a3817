//! Flash at scale (a measurement, not a test; issue 6, "Benchmark"): whole
//! decoded tokens of a model whose FFN is 2 GiB, through the runtime's
//! `open_flash`, under a DRAM budget of half the packed file, against the
//! paper's naive baseline and a llama.cpp-style memory map.
//!
//! 1. A trained model's activity: the opt-relu fixture is converted with
//!    calibration on `fixtures/text/train.txt` (hot-first order, trained
//!    predictors), and `flashpack calibrate --keep-trace` records its FFN
//!    inputs and firing on the held-out text (`FLASHPACK_SCALE_TRACE` names a
//!    kept trace to reuse). `flash::replay::from_kept_trace` turns that into
//!    two replays in packed order: the neurons that fired, and the neurons the
//!    trained predictors choose for the same inputs (misses and false
//!    positives included).
//! 2. A synthetic Llama-shaped ReLU checkpoint (hidden 2048, FFN 11008, f16,
//!    `FLASHPACK_SCALE_LAYERS` layers, default 16: 2.0 GiB of FFN), written
//!    streaming and packed by `flashpack::pack::convert` (alignment 4096).
//! 3. The replays tiled to its size (layer `l` replays fixture layer `l % 4`,
//!    neuron `j` is chosen iff fixture neuron `j % 512` is) and given to the
//!    runtime in place of predictor and oracle (`FlashOptions::replay`). Each
//!    mode is opened fresh with `--dram-budget` (default 50% of the file,
//!    `FLASHPACK_SCALE_BUDGET`), after `posix_fadvise(DONTNEED)` on the file,
//!    and decodes the same token ids one at a time: attention, norms, the
//!    sparse FFN and the LM head are computed for real (synthetic weights:
//!    the numbers mean nothing, the work is the real work). Only the
//!    predictor's own matmul is skipped.
//!    - naive: every layer's whole FFN read per token in 1 MiB reads, every
//!      neuron computed;
//!    - flash window 0 and window W (`FLASHPACK_SCALE_WINDOW`, default 4): the
//!      predictors' sets through the window cache;
//!    - oracle-flash window W: the fired sets (the lower bound on bytes).
//! 4. mmap: a child process in a new memory cgroup limited to the same
//!    budget (cgroup v1 or v2, where writable) maps the file and, per token,
//!    reads every FFN weight through the page cache (dot products with the
//!    runtime's kernel, 2 threads); as many bytes as the dense part has are
//!    held in anonymous memory and read too, as llama.cpp's hot weights would
//!    be (the section is compressed here, so it is not mapped). Skipped with a reason when no
//!    cgroup can be made.
//!
//! Run: `cargo bench --bench flash_scale` (`FLASHPACK_BENCH_DIR` for the
//! 5.5 GiB of scratch, `FLASHPACK_SCALE_TOKENS` flash tokens (default 128),
//! `FLASHPACK_SCALE_NAIVE_TOKENS` naive and mmap tokens (default 4),
//! `FLASHPACK_SCALE_IO_THREADS` reads in flight, `FLASHPACK_SCALE_IO_ENGINE`
//! what keeps them in flight (`threads`, `uring`, or `both`, the default: the
//! modes through the thread pool, and flash window W once more through
//! io_uring right after it) and
//! `FLASHPACK_SCALE_COALESCE_GAP` the coalescing gap (the runtime's defaults),
//! `FLASHPACK_SCALE_VERIFY` first-use verification of FFN chunks: `on` (the
//! runtime's default), `off`, or `both` (default: naive and flash window W
//! each measured with it and, right after, without it, "verify off"),
//! `FLASHPACK_SCALE_TARGET_RECALL` the fixture predictors' `--target-recall`
//! (default 0.99, convert's) and `FLASHPACK_SCALE_RANK` their `--rank`
//! (default auto); their perplexity cost on the fixture is printed).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use common::{
    dense_stand_in, drop_cache, env_usize, join_cgroup, map_file, measure_tokens, rows_dot,
    run_in_cgroup, MmapResult,
};
use flashpack::format::PackedFile;
use flashpack::runtime::bench::{write_synthetic_checkpoint, SyntheticShape};
use flashpack::runtime::flash::bench::{measure_mode, ModeRow};
use flashpack::runtime::flash::io::IoEngine;
use flashpack::runtime::flash::replay::from_kept_trace;
use flashpack::runtime::flash::{parse_size, FlashOptions, Replay};
use flashpack::runtime::sparse::FfnMode;

const HIDDEN: usize = 2048;
const FFN: usize = 11008;
const VOCAB: usize = 32000;
const MMAP_CHILD: &str = "FLASHPACK_SCALE_MMAP_CHILD";
const BUDGET_CHILD: &str = "FLASHPACK_SCALE_BUDGET_CHILD";

/// One measured mode: name, mode, window, replayed sets, tokens, whether FFN
/// chunks are verified on first use, the reader's engine.
type Run<'a> = (
    String,
    FfnMode,
    usize,
    Option<&'a Arc<Replay>>,
    usize,
    bool,
    IoEngine,
);

fn main() {
    if let Some(path) = std::env::var_os(MMAP_CHILD) {
        mmap_child(Path::new(&path));
        return;
    }
    if let Some(path) = std::env::var_os(BUDGET_CHILD) {
        budget_child(Path::new(&path));
        return;
    }
    let layers = env_usize("FLASHPACK_SCALE_LAYERS", 16);
    let tokens = env_usize("FLASHPACK_SCALE_TOKENS", 128);
    let naive_tokens = env_usize("FLASHPACK_SCALE_NAIVE_TOKENS", 4);
    let window = env_usize("FLASHPACK_SCALE_WINDOW", 4);
    let budget_text = std::env::var("FLASHPACK_SCALE_BUDGET").unwrap_or_else(|_| "50%".into());
    let base = std::env::var_os("FLASHPACK_BENCH_DIR")
        .map(Into::into)
        .unwrap_or_else(std::env::temp_dir);
    let scratch = tempfile::tempdir_in(base).expect("scratch dir");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let exe = env!("CARGO_BIN_EXE_flashpack");
    let flashpack = |args: &[&std::ffi::OsStr]| {
        let status = Command::new(exe)
            .args(args)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "flashpack {args:?} failed");
    };

    // 1. The trained fixture, its predictors and a trace on held-out text.
    let t0 = Instant::now();
    let fixture = root.join("fixtures/models/opt-relu");
    let fixture_packed = scratch.path().join("opt-relu.flashpack");
    let recall = std::env::var("FLASHPACK_SCALE_TARGET_RECALL").unwrap_or_else(|_| "0.99".into());
    let rank = std::env::var("FLASHPACK_SCALE_RANK").unwrap_or_else(|_| "auto".into());
    flashpack(&[
        "convert".as_ref(),
        fixture.as_os_str(),
        "-o".as_ref(),
        fixture_packed.as_os_str(),
        "--calib".as_ref(),
        root.join("fixtures/text/train.txt").as_os_str(),
        "--target-recall".as_ref(),
        recall.as_ref(),
        "--rank".as_ref(),
        rank.as_ref(),
    ]);
    // What those predictors cost in quality, on the fixture itself.
    let perplexity = |ffn: &str| -> f64 {
        let out = Command::new(exe)
            .arg("eval")
            .arg(&fixture_packed)
            .arg("--text")
            .arg(root.join("fixtures/text/heldout.txt"))
            .args(["--ffn", ffn, "--json"])
            .output()
            .unwrap();
        assert!(out.status.success(), "eval --ffn {ffn} failed");
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        json["perplexity"].as_f64().unwrap()
    };
    let (ppl_dense, ppl_predicted) = (perplexity("dense"), perplexity("predicted"));
    let trace_dir: PathBuf = match std::env::var_os("FLASHPACK_SCALE_TRACE") {
        Some(d) => d.into(),
        None => {
            let d = scratch.path().join("trace");
            flashpack(&[
                "calibrate".as_ref(),
                fixture.as_os_str(),
                "--calib".as_ref(),
                root.join("fixtures/text/heldout.txt").as_os_str(),
                "--keep-trace".as_ref(),
                d.as_os_str(),
            ]);
            d
        }
    };
    let (fired, predicted) =
        from_kept_trace(&trace_dir, &fixture_packed, tokens).expect("replays from the trace");
    eprintln!(
        "fixture: {} tokens of held-out trace, {:.1}% fired, predictors chose {:.1}% ({:.1} s)",
        fired.tokens(),
        fired.mean_fraction() * 100.0,
        predicted.mean_fraction() * 100.0,
        t0.elapsed().as_secs_f64()
    );

    // 2. The synthetic model.
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
        flashpack::progress::SILENT,
    )
    .expect("convert");
    eprintln!("converted in {:.1} s", t0.elapsed().as_secs_f64());
    std::fs::remove_dir_all(&ckpt).unwrap();
    let file_len = std::fs::metadata(&packed).unwrap().len();
    let ffn_bytes = {
        let file = PackedFile::open(&packed).expect("open packed");
        file.manifest
            .ffn_layers
            .iter()
            .map(|e| e.neurons * e.bundle_bytes)
            .sum::<u64>()
    };
    let budget = parse_size(&budget_text, file_len).expect("FLASHPACK_SCALE_BUDGET");

    // 3. The runtime, mode by mode.
    let fired = Arc::new(fired.tiled(layers, FFN, tokens).unwrap());
    let predicted = Arc::new(predicted.tiled(layers, FFN, tokens).unwrap());
    let tokens = fired.tokens();
    eprintln!(
        "packed {:.2} GiB, FFN {:.2} GiB; budget {budget_text} = {:.0} MiB; replay {tokens} tokens: fired {:.1}%, predicted {:.1}%",
        file_len as f64 / (1u64 << 30) as f64,
        ffn_bytes as f64 / (1u64 << 30) as f64,
        budget as f64 / (1u64 << 20) as f64,
        fired.mean_fraction() * 100.0,
        predicted.mean_fraction() * 100.0
    );
    let ids = token_ids(tokens);
    let engines = std::env::var("FLASHPACK_SCALE_IO_ENGINE").unwrap_or_else(|_| "both".into());
    assert!(
        ["threads", "uring", "both"].contains(&engines.as_str()),
        "FLASHPACK_SCALE_IO_ENGINE={engines}: threads, uring or both"
    );
    let base = FlashOptions {
        dram_budget: Some(budget),
        io_threads: env_usize(
            "FLASHPACK_SCALE_IO_THREADS",
            FlashOptions::default().io_threads,
        ),
        // `both` measures the pool first, then io_uring.
        io_engine: if engines == "uring" {
            IoEngine::Uring
        } else {
            IoEngine::Threads
        },
        coalesce_gap: env_usize(
            "FLASHPACK_SCALE_COALESCE_GAP",
            FlashOptions::default().coalesce_gap,
        ),
        context: tokens,
        ..FlashOptions::default()
    };
    let verify = std::env::var("FLASHPACK_SCALE_VERIFY").unwrap_or_else(|_| "both".into());
    let (on, off) = match verify.as_str() {
        "on" => (true, false),
        "off" => (false, true),
        "both" => (true, true),
        other => panic!("FLASHPACK_SCALE_VERIFY={other}: on, off or both"),
    };
    // Verification off is labelled; with `both`, it runs right after the
    // same mode with it (this disk's throughput drifts over minutes).
    let both = |name: String, mode, w, replay, n| -> Vec<Run> {
        let mut v = Vec::new();
        if on {
            v.push((name.clone(), mode, w, replay, n, true, base.io_engine));
        }
        if off {
            v.push((
                format!("{name}, verify off"),
                mode,
                w,
                replay,
                n,
                false,
                base.io_engine,
            ));
        }
        v
    };
    let mut runs: Vec<Run> = Vec::new();
    runs.extend(both(
        "naive".into(),
        FfnMode::Naive,
        window,
        None,
        naive_tokens,
    ));
    let label = |name: String| {
        if on {
            name
        } else {
            format!("{name}, verify off")
        }
    };
    runs.push((
        label("flash window 0".into()),
        FfnMode::Flash,
        0,
        Some(&predicted),
        tokens,
        on,
        base.io_engine,
    ));
    runs.extend(both(
        format!("flash window {window}"),
        FfnMode::Flash,
        window,
        Some(&predicted),
        tokens,
    ));
    if engines == "both" {
        // The same mode through io_uring, right after the thread pool's.
        runs.push((
            label(format!("flash window {window}, io_uring")),
            FfnMode::Flash,
            window,
            Some(&predicted),
            tokens,
            on,
            IoEngine::Uring,
        ));
    }
    runs.push((
        label(format!("oracle-flash window {window}")),
        FfnMode::OracleFlash,
        window,
        Some(&fired),
        tokens,
        on,
        base.io_engine,
    ));
    let mut rows: Vec<ModeRow> = Vec::new();
    let mut mmap = Err("not run".to_string());
    for (name, mode, w, replay, n, verify_reads, io_engine) in runs {
        if mode != FfnMode::Naive {
            // The llama.cpp-style baseline beside naive, a few seconds apart:
            // this disk's throughput drifts over minutes.
            if mmap.is_err() {
                drop_cache(&packed);
                mmap = mmap_baseline(&packed, budget, naive_tokens);
            }
        }
        drop_cache(&packed);
        let opts = FlashOptions {
            mode,
            window: w,
            replay: replay.cloned(),
            verify_reads,
            io_engine,
            ..base.clone()
        };
        match measure_mode(&packed, &ids[..n.min(ids.len())], &opts, &name) {
            Ok(row) => {
                eprintln!("{name}: {:.1} ms/token", row.ms_per_token);
                rows.push(row);
            }
            Err(e) => eprintln!("{name}: refused: {e}"),
        }
    }

    let predictor_ms = synthetic_predictor_ms(layers);
    // Flash window W once more, alone in a fresh process: its peak resident
    // memory against the budget.
    let peak = Command::new(std::env::current_exe().unwrap())
        .env(BUDGET_CHILD, &packed)
        .env("FLASHPACK_SCALE_CHILD_TRACE", &trace_dir)
        .env("FLASHPACK_SCALE_CHILD_FIXTURE", &fixture_packed)
        .env("FLASHPACK_SCALE_CHILD_BUDGET", budget.to_string())
        .env("FLASHPACK_SCALE_CHILD_LAYERS", layers.to_string())
        .env("FLASHPACK_SCALE_CHILD_WINDOW", window.to_string())
        .env("FLASHPACK_SCALE_CHILD_TOKENS", tokens.to_string())
        .env(
            "FLASHPACK_SCALE_CHILD_IO_THREADS",
            base.io_threads.to_string(),
        )
        .env("FLASHPACK_SCALE_CHILD_IO_ENGINE", base.io_engine.as_str())
        .stderr(std::process::Stdio::inherit())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok());

    let naive_ms = rows
        .iter()
        .find(|r| r.mode.starts_with("naive"))
        .map_or(f64::NAN, |r| r.ms_per_token);
    let oracle_bytes = rows
        .iter()
        .find(|r| r.mode.starts_with("oracle"))
        .map_or(f64::NAN, |r| r.bytes_read_per_token);
    println!(
        "\nmodel {:.2} GiB (FFN {:.2} GiB), budget {:.0} MiB, {} flash tokens, io_mode {}",
        file_len as f64 / (1u64 << 30) as f64,
        ffn_bytes as f64 / (1u64 << 30) as f64,
        budget as f64 / (1u64 << 20) as f64,
        tokens,
        rows.first().and_then(|r| r.io_mode).unwrap_or("-")
    );
    println!(
        "fixture predictors (opt-relu, --target-recall {recall} --rank {rank}): held-out perplexity {ppl_dense:.3} dense, {ppl_predicted:.3} predicted ({:+.2}%)",
        (ppl_predicted / ppl_dense - 1.0) * 100.0
    );
    println!(
        "predictor at this size, measured apart (rank {PREDICTOR_RANK}, random weights, {layers} layers): {predictor_ms:.1} ms/token; the replay skips it, the last columns add it to the sparse modes\n"
    );
    println!(
        "| mode | tokens | DRAM plan MiB | bytes/token | reads/token | mean read KiB | read GB/s | disk GB/s, same size | of disk | I/O ms | predictor ms | memory ms | FFN compute ms | total ms/token | speedup | bytes / oracle | + predictor ms/token | speedup | verify: hash CPU ms/token, MB hashed, MB read to complete chunks |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let with_predictor = |r: &ModeRow| {
        r.ms_per_token
            + if r.mode.starts_with("naive") {
                0.0
            } else {
                predictor_ms
            }
    };
    for r in &rows {
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.1} | {:.1} | {:.3} | {:.3} | {:.0}% | {:.1} | {:.2} | {:.1} | {:.1} | {:.1} | {:.2}x | {:.2} | {:.1} | {:.2}x | {} |",
            r.mode,
            r.tokens,
            r.dram_plan.total as f64 / (1u64 << 20) as f64,
            r.bytes_read_per_token,
            r.read_ops_per_token,
            r.mean_read_bytes / 1024.0,
            r.read_gb_per_s,
            r.disk_gb_per_s_same_size,
            r.read_gb_per_s / r.disk_gb_per_s_same_size.max(1e-9) * 100.0,
            r.io_ms_per_token,
            r.predictor_ms_per_token,
            r.memory_ms_per_token,
            r.ffn_compute_ms_per_token,
            r.ms_per_token,
            naive_ms / r.ms_per_token,
            r.bytes_read_per_token / oracle_bytes,
            with_predictor(r),
            naive_ms / with_predictor(r),
            if r.verify_reads {
                format!(
                    "{:.1}, {:.1}, {:.1}",
                    r.verify_hash_cpu_ms_per_token,
                    r.hashed_bytes as f64 / 1e6,
                    r.verify_extra_read_bytes as f64 / 1e6
                )
            } else {
                "off".into()
            }
        );
    }
    match peak {
        Some(p) => println!(
            "\nflash window {window} alone in a fresh process: peak resident memory (VmHWM) {:.0} MiB, plan {:.0} MiB, budget {:.0} MiB; the replayed sets it holds for the benchmark: {:.0} MiB",
            p["peak_rss_bytes"].as_f64().unwrap_or(0.0) / (1u64 << 20) as f64,
            p["plan_bytes"].as_f64().unwrap_or(0.0) / (1u64 << 20) as f64,
            budget as f64 / (1u64 << 20) as f64,
            p["replay_bytes"].as_f64().unwrap_or(0.0) / (1u64 << 20) as f64,
        ),
        None => println!("\nthe peak-memory child failed"),
    }
    match mmap {
        Ok(m) => println!(
            "| mmap, cgroup limit {:.0} MiB | {} | - | {:.0} | - | - | - | - | - | - | - | - | - | {:.1} | {:.2}x | {:.2} | {:.1} | {:.2}x | - |",
            budget as f64 / (1u64 << 20) as f64,
            m.tokens,
            m.read_bytes_per_token,
            m.ms_per_token,
            naive_ms / m.ms_per_token,
            m.read_bytes_per_token / oracle_bytes,
            m.ms_per_token,
            naive_ms / m.ms_per_token
        ),
        Err(why) => println!("\nmmap baseline skipped: {why}"),
    }
}

/// Flash window W with the predicted replay under the budget, in a process of
/// its own, so that its peak resident memory is its own: prints
/// `{peak_rss_bytes, plan_bytes, replay_bytes}`.
fn budget_child(packed: &Path) {
    let var = |name: &str| std::env::var(name).expect(name);
    let num = |name: &str| var(name).parse::<usize>().expect(name);
    let (tokens, layers) = (
        num("FLASHPACK_SCALE_CHILD_TOKENS"),
        num("FLASHPACK_SCALE_CHILD_LAYERS"),
    );
    let (_, predicted) = from_kept_trace(
        Path::new(&var("FLASHPACK_SCALE_CHILD_TRACE")),
        Path::new(&var("FLASHPACK_SCALE_CHILD_FIXTURE")),
        tokens,
    )
    .expect("replay");
    let predicted = predicted.tiled(layers, FFN, tokens).unwrap();
    let replay_bytes: usize = (0..layers)
        .map(|l| {
            (0..predicted.tokens())
                .map(|t| predicted.set(l, t as u64).len() * 4 + 24)
                .sum::<usize>()
        })
        .sum();
    let opts = FlashOptions {
        mode: FfnMode::Flash,
        window: num("FLASHPACK_SCALE_CHILD_WINDOW"),
        io_threads: num("FLASHPACK_SCALE_CHILD_IO_THREADS"),
        io_engine: if var("FLASHPACK_SCALE_CHILD_IO_ENGINE") == "uring" {
            IoEngine::Uring
        } else {
            IoEngine::Threads
        },
        dram_budget: Some(num("FLASHPACK_SCALE_CHILD_BUDGET") as u64),
        context: tokens,
        replay: Some(Arc::new(predicted)),
        ..FlashOptions::default()
    };
    let (loaded, rt) = flashpack::runtime::flash::open_flash(packed, &opts).expect("open");
    let mut cache = loaded.model.new_cache();
    for id in token_ids(tokens) {
        loaded
            .model
            .forward(&mut cache, &[id], flashpack::runtime::Logits::Last, None)
            .expect("decode");
    }
    println!(
        "{}",
        serde_json::json!({
            "peak_rss_bytes": flashpack::runtime::flash::peak_rss_bytes().unwrap_or(0),
            "plan_bytes": rt.plan.total,
            "replay_bytes": replay_bytes,
        })
    );
}

/// The token ids every mode decodes (any ids do: the weights are random;
/// the same ones for every mode).
fn token_ids(n: usize) -> Vec<u32> {
    (0..n).map(|t| ((t * 7919 + 13) % VOCAB) as u32).collect()
}

/// Rank of the stand-in predictor: the trainer's starting point for real
/// models (hidden / 16).
const PREDICTOR_RANK: usize = HIDDEN / 16;

/// Milliseconds per token of `layers` low-rank predictors of this model's
/// size (random weights: the cost does not depend on them), over 32 tokens.
fn synthetic_predictor_ms(layers: usize) -> f64 {
    use flashpack::predictor::train::LowRankPredictor;
    let r = PREDICTOR_RANK;
    let value = |i: usize| ((i * 2654435761) % 1000) as f32 / 1000.0 - 0.5;
    let p = LowRankPredictor {
        d: HIDDEN,
        rank: r,
        ffn: FFN,
        a: (0..HIDDEN * r).map(value).collect(),
        b: (0..r * FFN).map(|i| value(i + 7)).collect(),
        bias: vec![-1.0; FFN],
        threshold: 0.0,
    };
    let x: Vec<f32> = (0..HIDDEN).map(|i| value(i + 3)).collect();
    let (mut scratch, mut logits, mut set) = (Vec::new(), Vec::new(), Vec::new());
    let tokens = 32;
    let t0 = Instant::now();
    // One per layer, as the runtime holds them: 16 x 6.7 MB do not stay in
    // the CPU's caches.
    let all = vec![p; layers];
    for _ in 0..tokens {
        for p in &all {
            p.predict(&x, &mut scratch, &mut logits, &mut set);
        }
    }
    t0.elapsed().as_secs_f64() * 1e3 / tokens as f64
}

/// Runs [`mmap_child`] in a fresh memory cgroup limited to `budget` bytes.
fn mmap_baseline(packed: &Path, budget: u64, tokens: usize) -> Result<MmapResult, String> {
    let tokens = tokens.to_string();
    run_in_cgroup(
        budget,
        &[
            (MMAP_CHILD, packed.as_os_str()),
            ("FLASHPACK_SCALE_MMAP_TOKENS", tokens.as_ref()),
        ],
    )
}

/// The baseline itself: joins the cgroup, holds the dense part in anonymous
/// memory, maps the file, and per token computes a dot product of every
/// weight row (dense part and FFN) with a vector, as a dense forward would.
fn mmap_child(path: &Path) {
    join_cgroup();
    let tokens = env_usize("FLASHPACK_SCALE_MMAP_TOKENS", 4);
    let file = PackedFile::open(path).expect("open packed");
    let dense = dense_stand_in(&file, false);
    let ffn: Vec<(usize, usize)> = file
        .manifest
        .ffn_layers
        .iter()
        .map(|e| {
            let s = file.section(&e.section).expect("section");
            (s.offset as usize, s.length as usize)
        })
        .collect();
    let map = map_file(path);
    let x: Vec<f32> = (0..HIDDEN)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 500.0)
        .collect();
    let result = measure_tokens(tokens, &mut |_| {
        let mut sum = rows_dot(&dense, &x);
        let mut touched = 0;
        for &(off, len) in &ffn {
            sum += rows_dot(&map[off..off + len], &x);
            touched += len as u64;
        }
        (sum, touched)
    });
    println!("{}", serde_json::to_string(&result).unwrap());
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
