//! The flash runtime on calibrated fixtures: `flash` is bit-identical to
//! `predicted` (any window, cache size and thread count), `naive` equals
//! `dense`, flash reads less than naive, the byte counts agree with the kernel's,
//! and a budget below the minimum is refused with exit 2 and the number.

mod common;
use common::{fixtures, nmse};

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use flashpack::pack::{convert, ConvertOptions};
use flashpack::predictor::calibrate::CalibrationOptions;
use flashpack::predictor::pipeline::CalibrationPlan;
use flashpack::predictor::train::TrainOptions;
use flashpack::runtime::flash::io::IoEngine;
use flashpack::runtime::flash::{open_flash, FlashOptions, FlashRuntime};
use flashpack::runtime::sparse::FfnMode;
use flashpack::runtime::{open_model, with_threads, ActiveSet, Logits, Model};

/// Counts heap allocations made by the current thread while it is counting.
struct CountingAlloc;

thread_local! {
    static COUNTING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static ALLOCATIONS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

// SAFETY: forwards to the system allocator; the bookkeeping touches only
// const-initialised thread-locals (no allocation, no reentrancy).
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if COUNTING.with(|c| c.get()) {
            ALLOCATIONS.with(|a| a.set(a.get() + 1));
        }
        std::alloc::System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        std::alloc::System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, size: usize) -> *mut u8 {
        if COUNTING.with(|c| c.get()) {
            ALLOCATIONS.with(|a| a.set(a.get() + 1));
        }
        std::alloc::System.realloc(ptr, layout, size)
    }
}

#[global_allocator]
static ALLOCATOR: CountingAlloc = CountingAlloc;

/// A calibrated packed file of a fixture, made once per test binary.
fn calibrated(name: &'static str) -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    static FILES: OnceLock<std::sync::Mutex<Vec<(&'static str, &'static Path)>>> = OnceLock::new();
    // Under target/: a real disk even where /tmp is tmpfs, so direct I/O is tried.
    let dir = DIR.get_or_init(|| {
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
        std::fs::create_dir_all(&base).unwrap();
        tempfile::tempdir_in(base).unwrap()
    });
    let files = FILES.get_or_init(Default::default);
    let mut files = files.lock().unwrap();
    if let Some((_, p)) = files.iter().find(|(n, _)| *n == name) {
        return p;
    }
    let out: &'static Path = Box::leak(
        dir.path()
            .join(format!("{name}.flashpack"))
            .into_boxed_path(),
    );
    let options = ConvertOptions {
        calibration: Some(CalibrationPlan {
            files: vec![fixtures().join("text/train.txt")],
            calibrate: CalibrationOptions {
                max_tokens: 4096,
                ..CalibrationOptions::default()
            },
            train: TrainOptions::default(),
        }),
        ..ConvertOptions::default()
    };
    convert(
        &fixtures().join("models").join(name),
        out,
        &options,
        flashpack::progress::SILENT,
    )
    .unwrap();
    files.push((name, out));
    out
}

fn token_ids(model: &Path) -> Vec<u32> {
    let loaded = open_model(model).unwrap();
    let text = std::fs::read_to_string(fixtures().join("text/heldout.txt")).unwrap();
    loaded.tokenizer.encode(&text).unwrap()[..48].to_vec()
}

/// Logits of a prefill of 20 tokens (a batch) then single-token steps.
fn logits(model: &Model, ids: &[u32]) -> Vec<f32> {
    common::prefill_then_decode(model, ids, 20)
}

fn flash(path: &Path, opts: FlashOptions) -> (Model, FlashRuntime) {
    let (loaded, rt) = open_flash(path, &opts).unwrap();
    (loaded.model, rt)
}

/// A prefill batch reads each needed bundle once for all its tokens (the
/// union of their sets fits the cache), where token by token window 0 reads
/// a bundle again for every token that needs it. The batch's logits are the
/// bits of the same batch in DRAM (`predicted`: the same selections).
#[test]
fn a_batch_reads_each_needed_bundle_once_with_the_same_logits() {
    for name in ["opt-relu", "llama-relu-gqa"] {
        let path = calibrated(name);
        let ids = token_ids(path);
        let mut predicted = open_model(path).unwrap();
        predicted.set_ffn_mode(FfnMode::Predicted).unwrap();
        let mut cache = predicted.model.new_cache();
        let want = predicted
            .model
            .forward(&mut cache, &ids, Logits::All, None)
            .unwrap();
        let opts = || FlashOptions {
            window: 0,
            ..FlashOptions::default()
        };
        let (batched, rt_batch) = flash(path, opts());
        let mut cache = batched.new_cache();
        let got = batched
            .forward(&mut cache, &ids, Logits::All, None)
            .unwrap();
        assert!(
            got == want,
            "{name}: the flash batch differs from predicted (NMSE {:.3e})",
            nmse(&got, &want)
        );
        let (single, rt_single) = flash(path, opts());
        let mut cache = single.new_cache();
        for &id in &ids {
            single
                .forward(&mut cache, &[id], Logits::Last, None)
                .unwrap();
        }
        let (b, s) = (rt_batch.report(), rt_single.report());
        let layers = batched.layers.len() as u64;
        let width = batched.layers[0].ffn.width() as u64;
        assert!(
            b.bundles_loaded <= layers * width,
            "{name}: {} bundles for {layers} x {width}",
            b.bundles_loaded
        );
        assert!(
            b.bundles_loaded < s.bundles_loaded && b.bytes_read < s.bytes_read,
            "{name}: batch {} bundles / {} bytes, token by token {} / {}",
            b.bundles_loaded,
            b.bytes_read,
            s.bundles_loaded,
            s.bytes_read
        );
        assert_eq!(
            b.neurons_chosen_per_token, s.neurons_chosen_per_token,
            "{name}: the same selections"
        );
        println!(
            "{name}: {} tokens: batch {} bundles, token by token {}",
            ids.len(),
            b.bundles_loaded,
            s.bundles_loaded
        );
    }
}

#[test]
fn flash_is_bit_identical_to_predicted_for_any_window_cache_and_threads() {
    for name in ["opt-relu", "llama-relu-gqa"] {
        let path = calibrated(name);
        let ids = token_ids(path);
        let mut predicted = open_model(path).unwrap();
        predicted.set_ffn_mode(FfnMode::Predicted).unwrap();
        let want = logits(&predicted.model, &ids);
        // (window, cache rows, DRAM budget, compute threads, reads in flight, engine)
        let cases = [
            (0, None, None, 1, 1, IoEngine::Threads),
            (1, None, None, 2, 2, IoEngine::Threads),
            (4, None, None, 1, 3, IoEngine::Threads),
            (4, None, None, 2, 3, IoEngine::Uring),
            // A tiny cache: most neurons go through scratch.
            (2, Some(8), None, 2, 1, IoEngine::Threads),
            (2, Some(8), None, 1, 16, IoEngine::Uring),
            // Budget to spare: the hottest neurons pinned.
            (0, None, Some(1 << 30), 1, 2, IoEngine::Threads),
        ];
        for (window, capacity, dram_budget, threads, io_threads, io_engine) in cases {
            let (model, rt) = flash(
                path,
                FlashOptions {
                    window,
                    capacity,
                    dram_budget,
                    io_threads,
                    io_engine,
                    ..FlashOptions::default()
                },
            );
            if dram_budget.is_some() {
                let pinned = &rt.plan.pinned_per_layer;
                assert!(pinned.iter().sum::<usize>() > 0, "{name}: {pinned:?}");
            }
            let got = with_threads(Some(threads), || logits(&model, &ids)).unwrap();
            let r = rt.report();
            assert!(
                got == want,
                "{name}: window {window}, capacity {capacity:?}, {threads} threads: flash differs from predicted (NMSE {:.3e})",
                nmse(&got, &want)
            );
            assert!(r.bytes_read > 0 && r.read_ops > 0);
            assert_eq!(r.io_engine, io_engine);
            if window == 0 && dram_budget.is_none() {
                // The 20-token batch reads each bundle once for all its tokens;
                // token by token, window 0 keeps nothing from one to the next.
                assert!(
                    r.window_hit_rate > 0.0,
                    "{name}: the batch shares its reads"
                );
                let (single, rt) = flash(
                    path,
                    FlashOptions {
                        window,
                        io_threads,
                        io_engine,
                        ..FlashOptions::default()
                    },
                );
                let mut cache = single.new_cache();
                for &id in &ids {
                    single
                        .forward(&mut cache, &[id], Logits::Last, None)
                        .unwrap();
                }
                assert_eq!(
                    rt.report().window_hit_rate,
                    0.0,
                    "{name}: window 0 keeps nothing"
                );
            }
            if dram_budget.is_some() {
                assert!(r.window_hit_rate > 0.0, "{name}: pinned neurons are hits");
            }
            if capacity.is_some() {
                assert!(r.bundles_overflowed > 0, "{name}: the scratch path ran");
            }
            println!(
                "{name} window {window} cap {capacity:?}: {:.0} B/token, hit {:.2}, overflow {}",
                r.bytes_read_per_token, r.window_hit_rate, r.bundles_overflowed
            );
        }
    }
}

#[test]
fn naive_equals_dense_and_reads_more_than_flash() {
    let path = calibrated("opt-relu");
    let ids = token_ids(path);
    let dense = open_model(path).unwrap();
    let want = logits(&dense.model, &ids);
    let (naive, naive_rt) = flash(
        path,
        FlashOptions {
            mode: FfnMode::Naive,
            ..FlashOptions::default()
        },
    );
    let got = logits(&naive, &ids);
    let e = nmse(&got, &want);
    assert!(e < 1e-10, "naive vs dense NMSE {e:.3e}");
    let (fl, flash_rt) = flash(path, FlashOptions::default());
    logits(&fl, &ids);
    let (n, f) = (naive_rt.report(), flash_rt.report());
    let file = flashpack::format::PackedFile::open(path).unwrap();
    let ffn_bytes: u64 = file
        .manifest
        .ffn_layers
        .iter()
        .map(|l| l.neurons * l.bundle_bytes)
        .sum();
    assert_eq!(n.tokens, ids.len() as u64);
    assert!(
        n.bytes_read >= ffn_bytes * n.tokens,
        "naive reads the whole FFN per token"
    );
    assert!(
        f.bytes_read > 0 && f.bytes_read < n.bytes_read,
        "flash {} vs naive {}",
        f.bytes_read,
        n.bytes_read
    );
    println!(
        "bytes per token: naive {:.0}, flash {:.0}; io {:?}",
        n.bytes_read_per_token, f.bytes_read_per_token, f.io_mode
    );
}

fn cli(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_flashpack"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn bytes_read_agree_with_proc_self_io() {
    let path = calibrated("opt-relu");
    let p = path.to_str().unwrap();
    for mode in ["flash", "naive"] {
        let out = cli(&[
            "run",
            p,
            "--prompt",
            "To be, or not to be",
            "--max-new-tokens",
            "8",
            "--ffn",
            mode,
            "--json",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let bytes = json["read_bytes"].as_u64().unwrap();
        assert!(bytes > 0 && json["read_ops"].as_u64().unwrap() > 0);
        assert!(json["peak_rss_bytes"].as_u64().unwrap() > 0);
        let io_mode = json["io_mode"].as_str().unwrap();
        let proc = json["proc_read_bytes"].as_u64();
        println!("{mode}: {bytes} bytes counted, /proc/self/io {proc:?}, {io_mode}");
        if io_mode == "direct" {
            // Direct reads all reach the device; nothing else is read while
            // generating (the dense part was read at open).
            let proc = proc.expect("/proc/self/io is readable on Linux");
            assert!(
                proc >= bytes && proc <= bytes + (1 << 20),
                "{mode}: counted {bytes}, kernel {proc}"
            );
        }
        // Buffered fallback: the kernel counts only page-cache misses, so the
        // counts can differ either way (readahead, pages cached before the
        // run); there is nothing exact to check.
    }
}

/// The byte count a refused `--dram-budget` names as the minimum.
fn stated_minimum(err: &str) -> u64 {
    err.split("minimum of ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no minimum in: {err}"))
}

#[test]
fn a_budget_below_the_minimum_is_refused_with_the_minimum() {
    let path = calibrated("opt-relu");
    let p = path.to_str().unwrap();
    let args = |budget: &str| {
        cli(&[
            "run",
            p,
            "--prompt",
            "Hello",
            "--max-new-tokens",
            "2",
            "--ffn",
            "flash",
            "--dram-budget",
            budget,
        ])
    };
    let out = args("1MiB");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let minimum = stated_minimum(&err);
    assert!(minimum > 1 << 20);
    let ok = args(&minimum.to_string());
    assert!(
        ok.status.success(),
        "the stated minimum must work: {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    // The budget holds: the run's own peak RSS (VmHWM, which exec resets),
    // and where /usr/bin/time exists, the peak its parent measures (a small
    // process: getrusage(RUSAGE_CHILDREN) here would charge the child with
    // this large test process's RSS from before exec).
    let budget = minimum.to_string();
    let run_args = [
        "run",
        p,
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "2",
        "--ffn",
        "flash",
        "--dram-budget",
        budget.as_str(),
        "--json",
    ];
    let json: serde_json::Value = serde_json::from_slice(&cli(&run_args).stdout).unwrap();
    let peak = json["peak_rss_bytes"].as_u64().unwrap();
    assert!(
        peak > 0 && peak <= minimum,
        "peak RSS {peak} over the budget {minimum}"
    );
    if Path::new("/usr/bin/time").exists() {
        let out = Command::new("/usr/bin/time")
            .args(["-f", "maxrss_kib=%M", env!("CARGO_BIN_EXE_flashpack")])
            .args(run_args)
            .output()
            .unwrap();
        assert!(out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        let kib: u64 = err
            .split("maxrss_kib=")
            .nth(1)
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| panic!("no maxrss in {err}"));
        println!(
            "peak RSS {peak} (own), {} (parent), budget {minimum}",
            kib * 1024
        );
        assert!(
            kib * 1024 <= minimum,
            "parent-measured peak {kib} KiB over {minimum}"
        );
    }
    let out = args("lots");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn oracle_flash_is_bit_identical_to_oracle_and_reads_no_more_than_flash() {
    for name in ["opt-relu", "llama-relu-gqa"] {
        let path = calibrated(name);
        let ids = token_ids(path);
        let mut oracle = open_model(path).unwrap();
        oracle.set_ffn_mode(FfnMode::Oracle).unwrap();
        let want = logits(&oracle.model, &ids);
        let (model, rt) = flash(
            path,
            FlashOptions {
                mode: FfnMode::OracleFlash,
                ..FlashOptions::default()
            },
        );
        let got = logits(&model, &ids);
        assert!(got == want, "{name}: NMSE {:.3e}", nmse(&got, &want));
        let (fl, flash_rt) = flash(path, FlashOptions::default());
        logits(&fl, &ids);
        let (o, f) = (rt.report(), flash_rt.report());
        println!(
            "{name}: bytes/token oracle {:.0}, flash {:.0}",
            o.bytes_read_per_token, f.bytes_read_per_token
        );
        assert!(o.bytes_read > 0 && o.bytes_read <= f.bytes_read);
    }
}

#[test]
fn a_decode_step_of_the_flash_ffn_does_not_allocate() {
    // One I/O thread: reads happen on this thread, where allocations are
    // counted. Sixteen: this thread hands reads to the pool and waits.
    for (io_threads, engine) in [
        (1, IoEngine::Threads),
        (16, IoEngine::Threads),
        (16, IoEngine::Uring),
    ] {
        decode_steps_do_not_allocate(io_threads, engine);
    }
}

fn decode_steps_do_not_allocate(io_threads: usize, io_engine: IoEngine) {
    let path = calibrated("opt-relu");
    let (model, rt) = flash(
        path,
        FlashOptions {
            io_threads,
            io_engine,
            window: 2,
            ..FlashOptions::default()
        },
    );
    let ffn = &model.layers[1].ffn;
    let h = ffn.hidden_size();
    let mut out = vec![0.0f32; h];
    let inputs: Vec<Vec<f32>> = (0..24)
        .map(|t| {
            (0..h)
                .map(|i| (((i * 31 + t * 17) % 97) as f32 / 24.0 - 2.0) * 0.7)
                .collect()
        })
        .collect();
    let step = |x: &[f32], out: &mut [f32]| ffn.forward(x, 1, ActiveSet::All, out, None).unwrap();
    for x in &inputs[..4] {
        step(x, &mut out); // warm-up: lazily initialised state (SIMD detection)
    }
    let loaded_before = rt.report().bundles_loaded;
    COUNTING.with(|c| c.set(true));
    for x in &inputs[4..] {
        step(x, &mut out);
    }
    COUNTING.with(|c| c.set(false));
    let allocations = ALLOCATIONS.with(|a| a.replace(0));
    let report = rt.report();
    assert!(
        report.bundles_loaded > loaded_before,
        "the counted steps read bundles"
    );
    assert!(
        report.read_ops > 20 * 2,
        "the counted steps read in batches ({} reads)",
        report.read_ops
    );
    assert_eq!(
        allocations, 0,
        "heap allocations on the per-token path ({io_threads} reads in flight, {io_engine:?})"
    );
}

/// Direct or buffered reads, through the thread pool or io_uring: the same
/// tokens from the same bytes, and the run says which it used.
#[test]
fn buffered_fallback_and_either_engine_give_the_same_tokens_and_say_so() {
    let path = calibrated("opt-relu");
    let p = path.to_str().unwrap();
    let run = |no_direct: bool, engine: &str| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_flashpack"));
        cmd.args([
            "run",
            p,
            "--prompt",
            "To be, or not to be",
            "--max-new-tokens",
            "6",
            "--ffn",
            "flash",
            "--io-engine",
            engine,
            "--json",
        ]);
        if no_direct {
            // What a file system without O_DIRECT (tmpfs) gets.
            cmd.env("FLASHPACK_NO_DIRECT_IO", "1");
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success());
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (json, String::from_utf8_lossy(&out.stderr).to_string())
    };
    let (buffered, stderr) = run(true, "threads");
    assert_eq!(buffered["io_mode"], "buffered");
    assert_eq!(buffered["flash"]["io_engine"], "threads");
    assert!(stderr.contains("buffered reads"), "{stderr}");
    for (no_direct, engine) in [(false, "threads"), (false, "uring"), (true, "uring")] {
        let (other, _) = run(no_direct, engine);
        assert_eq!(other["flash"]["io_engine"], engine);
        assert_eq!(
            other["io_mode"],
            if no_direct { "buffered" } else { "direct" }
        );
        assert_eq!(
            buffered["generated_ids"], other["generated_ids"],
            "{engine}"
        );
        assert_eq!(buffered["read_bytes"], other["read_bytes"], "{engine}");
        assert_eq!(buffered["read_ops"], other["read_ops"], "{engine}");
    }
}

#[test]
fn flash_is_the_default_for_a_packed_file_with_predictors() {
    let path = calibrated("opt-relu");
    let out = cli(&[
        "run",
        path.to_str().unwrap(),
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "2",
        "--json",
    ]);
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["ffn"], "flash");
    assert!(json["read_bytes"].as_u64().unwrap() > 0);
    let dir = fixtures().join("models/opt-relu");
    let out = cli(&[
        "run",
        dir.to_str().unwrap(),
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "2",
        "--json",
    ]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["ffn"], "dense");
}

#[test]
fn bench_compares_the_modes_on_a_packed_file() {
    let path = calibrated("opt-relu");
    // `bench FILE`: the file's table only (no synthetic dense model).
    let out = cli(&[
        "bench",
        path.to_str().unwrap(),
        "--decode-tokens",
        "6",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["results"].as_array().map(Vec::len), Some(0), "{json}");
    let rows = json["flash_modes"].as_array().unwrap();
    let modes: Vec<&str> = rows.iter().map(|r| r["mode"].as_str().unwrap()).collect();
    assert_eq!(
        modes,
        [
            "naive",
            "flash window 0",
            "flash window 4",
            "oracle-flash",
            "dense (in DRAM)",
            "oracle (in DRAM)",
            "predicted (in DRAM)"
        ]
    );
    let bytes = |i: usize| rows[i]["read_bytes_per_token"].as_f64().unwrap();
    assert!(bytes(2) > 0.0 && bytes(2) < bytes(0) && bytes(3) <= bytes(2));
    for r in rows {
        assert!(r["ms_per_token"].as_f64().unwrap() > 0.0);
        assert!(r["io_ms_per_token"].as_f64().is_some());
        assert!(r["ffn_compute_ms_per_token"].as_f64().is_some());
        // The FFNs' share of each mode's time, measured the same way in all.
        let ffn = r["ffn_ms_per_token"].as_f64().unwrap();
        assert!(
            ffn > 0.0 && ffn < r["ms_per_token"].as_f64().unwrap(),
            "{r}"
        );
    }
    // Dense computes every neuron, the sparse in-DRAM modes fewer; predicted
    // names its selector (a ReLU file: the trained predictors).
    let active = |i: usize| rows[i]["ffn_active_fraction"].as_f64().unwrap();
    assert_eq!(active(4), 1.0);
    assert!(active(5) < 1.0 && active(6) < 1.0 && active(6) >= active(5));
    assert_eq!(rows[6]["selector"], "trained");
    assert!(rows[4]["selector"].is_null());

    // A file without predictors is refused before any work, with the reason.
    let dir = tempfile::tempdir_in(path.parent().unwrap()).unwrap();
    let plain = dir.path().join("plain.flashpack");
    convert(
        &fixtures().join("models/opt-relu"),
        &plain,
        &ConvertOptions::default(),
        flashpack::progress::SILENT,
    )
    .unwrap();
    let out = cli(&["bench", plain.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(2));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        json["error"].as_str().unwrap().contains("convert --calib"),
        "{json}"
    );
}

#[test]
fn a_file_truncated_during_a_run_fails_with_an_io_error_naming_the_layer() {
    // A copy that can be damaged while it is open.
    let tmp = tempfile::tempdir_in(Path::new(env!("CARGO_MANIFEST_DIR")).join("target")).unwrap();
    let path = tmp.path().join("m.flashpack");
    std::fs::copy(calibrated("opt-relu"), &path).unwrap();
    for mode in [FfnMode::Naive, FfnMode::Flash] {
        let (model, rt) = flash(
            &path,
            FlashOptions {
                mode,
                window: 0,
                ..FlashOptions::default()
            },
        );
        let mut cache = model.new_cache();
        model
            .forward(&mut cache, &[0, 5], Logits::Last, None)
            .expect("reads while the file is whole");
        // Cut the file inside the second FFN layer's bundles.
        let cut = rt.first_ffn_offset() + 600 * 1024;
        let original = std::fs::read(&path).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(cut)
            .unwrap();
        let err = model
            .forward(&mut cache, &[7], Logits::Last, None)
            .expect_err("must not answer from a shrunk file");
        assert_eq!(err.exit_class(), flashpack::ExitClass::Environment, "{err}");
        let text = err.to_string();
        assert!(
            text.contains("of layer") && text.contains("offset"),
            "{text}"
        );
        std::fs::write(&path, original).unwrap();
    }
}

/// A copy of the calibrated opt-relu file in `dir` with ONE byte damaged in
/// section `ffn.{layer}`: in bundle `bundle`'s up row, the high byte of its
/// first weight (sign and exponent), so that the weight becomes about 500
/// times 1 or 2, large and finite. Returns the copy and the chunk holding
/// the byte.
fn one_flipped_ffn_byte(dir: &Path, layer: usize, bundle: u64) -> (PathBuf, usize) {
    let clean = calibrated("opt-relu");
    let file = flashpack::format::PackedFile::open(clean).unwrap();
    let entry = &file.manifest.ffn_layers[layer];
    let section = file.section(&entry.section).unwrap();
    assert_eq!(entry.section, format!("ffn.{layer}"));
    assert_eq!(entry.dtype.weight(), Some(flashpack::dtype::DType::F32));
    let up = entry
        .parts
        .iter()
        .position(|p| *p == flashpack::format::layout::BundlePart::Up)
        .unwrap() as u64;
    let within = bundle * entry.bundle_bytes + up * entry.hidden * 4 + 3;
    let at = (section.offset + within) as usize;
    let chunk = (within / section.chunk_raw_bytes) as usize;
    let mut bytes = std::fs::read(clean).unwrap();
    let weight = |b: &[u8]| f32::from_le_bytes(b[at - 3..at + 1].try_into().unwrap());
    let before = weight(&bytes);
    // Sign kept, exponent 136 or 137: about 2^9, a large finite weight.
    bytes[at] = (bytes[at] & 0x80) | 0x44;
    let after = weight(&bytes);
    assert!(
        after.is_finite() && after.abs() > 100.0 * before.abs(),
        "{before} -> {after}"
    );
    let path = dir.join(format!("damaged-ffn{layer}-bundle{bundle}.flashpack"));
    std::fs::write(&path, bytes).unwrap();
    (path, chunk)
}

/// `run` and `eval` on `path` (`mode`: the `--ffn` value, or the default),
/// with `extra` flags: the exit code, stdout and stderr of each.
fn run_and_eval(
    path: &Path,
    mode: Option<&str>,
    extra: &[&str],
) -> Vec<(Option<i32>, String, String)> {
    let text = path.with_extension("txt");
    std::fs::write(
        &text,
        "KING HENRY. Once more unto the breach, dear friends, once more.",
    )
    .unwrap();
    let p = path.to_str().unwrap();
    let mut run = vec![
        "run",
        p,
        "--prompt",
        "KING HENRY.",
        "--max-new-tokens",
        "8",
        "--json",
    ];
    let mut eval = vec!["eval", p, "--text", text.to_str().unwrap(), "--json"];
    for args in [&mut run, &mut eval] {
        if let Some(m) = mode {
            args.extend(["--ffn", m]);
        }
        args.extend(extra);
    }
    [run, eval]
        .iter()
        .map(|args| {
            let out = cli(args);
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).to_string(),
                String::from_utf8_lossy(&out.stderr).to_string(),
            )
        })
        .collect()
}

/// Asserts that every command stopped with exit 1, naming section and chunk.
fn stopped_naming(results: &[(Option<i32>, String, String)], section: &str, chunk: usize) {
    let named = format!("section \"{section}\" chunk {chunk} ");
    for (code, stdout, stderr) in results {
        assert_eq!(*code, Some(1), "{stdout}{stderr}");
        let json: serde_json::Value = serde_json::from_str(stdout).unwrap();
        let error = json["error"].as_str().unwrap();
        assert!(error.contains(&named), "{error}");
        assert!(error.contains("sha256 mismatch"), "{error}");
    }
}

/// A flipped byte in the hottest neuron's bundle of layer 0 (the first bundle
/// in packed order, used by the first token) changed `run`'s text with exit 0
/// in the default mode, `flash`; it must stop `run` and `eval` with exit 1
/// naming the section and chunk, unless `--no-verify-reads` is given.
#[test]
fn a_damaged_ffn_byte_stops_the_default_flash_run() {
    let tmp = tempfile::tempdir_in(Path::new(env!("CARGO_MANIFEST_DIR")).join("target")).unwrap();
    let (path, chunk) = one_flipped_ffn_byte(tmp.path(), 0, 0);
    stopped_naming(&run_and_eval(&path, None, &[]), "ffn.0", chunk);
    // Opted out: the damage is used, and the run succeeds with other text.
    let unchecked = run_and_eval(&path, None, &["--no-verify-reads"]);
    let clean = run_and_eval(calibrated("opt-relu"), None, &[]);
    for ((code, stdout, stderr), (clean_code, clean_out, _)) in unchecked.iter().zip(&clean) {
        assert_eq!(*code, Some(0), "{stderr}");
        assert_eq!(*clean_code, Some(0));
        let (a, b): (serde_json::Value, serde_json::Value) = (
            serde_json::from_str(stdout).unwrap(),
            serde_json::from_str(clean_out).unwrap(),
        );
        assert_eq!(a["ffn"], "flash");
        assert_eq!(a["flash"]["verify_reads"], false);
        assert_eq!(b["flash"]["verify_reads"], true);
        // The byte matters: the damaged file's run differs from the clean one.
        let key = if a.get("perplexity").is_some() {
            "perplexity"
        } else {
            "generated_ids"
        };
        assert_ne!(a[key], b[key], "{key}");
    }
}

/// Naive reads every chunk of every layer: a flipped byte in the middle of the
/// last layer stops `run`, `eval` and `bench FILE` (exit 1, named).
#[test]
fn a_damaged_ffn_byte_stops_a_naive_run() {
    let tmp = tempfile::tempdir_in(Path::new(env!("CARGO_MANIFEST_DIR")).join("target")).unwrap();
    let (path, chunk) = one_flipped_ffn_byte(tmp.path(), 3, 300);
    assert!(chunk > 0);
    stopped_naming(&run_and_eval(&path, Some("naive"), &[]), "ffn.3", chunk);
    for (code, _, stderr) in run_and_eval(&path, Some("naive"), &["--no-verify-reads"]) {
        assert_eq!(code, Some(0), "{stderr}");
    }
    let out = cli(&[
        "bench",
        path.to_str().unwrap(),
        "--decode-tokens",
        "2",
        "--json",
    ]);
    let result = (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    );
    stopped_naming(&[result], "ffn.3", chunk);
}

/// `oracle-flash` stops too. (It also loads an in-DRAM copy of every FFN to
/// choose from, which checks every chunk's hash at open, so it stopped before
/// run-time verification was the default and still stops without it.)
#[test]
fn a_damaged_ffn_byte_stops_an_oracle_flash_run() {
    let tmp = tempfile::tempdir_in(Path::new(env!("CARGO_MANIFEST_DIR")).join("target")).unwrap();
    let (path, chunk) = one_flipped_ffn_byte(tmp.path(), 0, 0);
    stopped_naming(
        &run_and_eval(&path, Some("oracle-flash"), &[]),
        "ffn.0",
        chunk,
    );
    stopped_naming(
        &run_and_eval(&path, Some("oracle-flash"), &["--no-verify-reads"]),
        "ffn.0",
        chunk,
    );
}

/// The check hashes the bytes the reader brought in, not a second copy: naive
/// (whole layers in chunk-aligned reads) hashes every FFN byte once and reads
/// nothing more than without the check; flash widens a chunk's first read to
/// the whole chunk (counted in its bytes read), hashes each used chunk once,
/// and gives the same logits as without the check.
#[test]
fn verification_hashes_the_bytes_the_reads_brought_in() {
    let path = calibrated("opt-relu");
    let ids = token_ids(path);
    let file = flashpack::format::PackedFile::open(path).unwrap();
    let (mut ffn_bytes, mut ffn_chunks) = (0u64, 0u64);
    for l in &file.manifest.ffn_layers {
        let s = file.section(&l.section).unwrap();
        ffn_bytes += s.length;
        ffn_chunks += s.chunks.len() as u64;
    }
    assert!(ffn_chunks > 4, "more than one chunk per layer");
    for mode in [FfnMode::Naive, FfnMode::Flash, FfnMode::OracleFlash] {
        let run = |verify_reads: bool| {
            let (model, rt) = flash(
                path,
                FlashOptions {
                    mode,
                    verify_reads,
                    ..FlashOptions::default()
                },
            );
            (logits(&model, &ids), rt.report())
        };
        let ((on, r_on), (off, r_off)) = (run(true), run(false));
        assert!(on == off, "{mode:?}: verification changed the logits");
        assert!(r_on.verify_reads && !r_off.verify_reads);
        assert_eq!(
            (
                r_off.chunks_verified,
                r_off.hashed_bytes,
                r_off.verify_extra_read_bytes
            ),
            (0, 0, 0)
        );
        println!(
            "{mode:?}: {} of {ffn_chunks} chunks, {} of {ffn_bytes} bytes hashed; read {} with, {} without ({} to complete chunks)",
            r_on.chunks_verified, r_on.hashed_bytes, r_on.bytes_read, r_off.bytes_read, r_on.verify_extra_read_bytes
        );
        if mode == FfnMode::Naive {
            assert_eq!(r_on.chunks_verified, ffn_chunks);
            assert_eq!(r_on.hashed_bytes, ffn_bytes, "every byte hashed once");
            assert_eq!(r_on.verify_extra_read_bytes, 0);
            assert_eq!(r_on.bytes_read, r_off.bytes_read, "no read for the check");
            assert_eq!(r_on.read_ops, r_off.read_ops);
        } else {
            assert!(r_on.chunks_verified > 0 && r_on.chunks_verified <= ffn_chunks);
            // Each chunk hashed once (two reads of one batch may share one).
            assert!(r_on.hashed_bytes >= r_on.chunks_verified * 4096);
            assert!(r_on.hashed_bytes <= ffn_bytes + ffn_bytes / 8);
            // Completing chunks costs at most the FFN once over the run.
            assert!(r_on.verify_extra_read_bytes > 0);
            assert!(r_on.verify_extra_read_bytes <= ffn_bytes);
            assert!(r_on.bytes_read <= r_off.bytes_read + ffn_bytes);
        }
    }
}

/// `ffn_active_fraction` is the fraction of FFN neurons computed: all of
/// them in naive, the predicted ones in flash (bit-identical to `predicted`,
/// so exactly its fraction), the firing ones in oracle-flash; it was 1.0 for
/// every disk mode.
#[test]
fn ffn_active_fraction_counts_the_neurons_each_disk_mode_computes() {
    let path = calibrated("opt-relu");
    let ids = token_ids(path);
    let in_dram = |mode: FfnMode| {
        let mut m = open_model(path).unwrap();
        let counter = m.set_ffn_mode(mode).unwrap().unwrap();
        logits(&m.model, &ids);
        counter.active_fraction()
    };
    let on_disk = |mode: FfnMode| {
        let (model, rt) = flash(
            path,
            FlashOptions {
                mode,
                ..FlashOptions::default()
            },
        );
        logits(&model, &ids);
        let r = rt.report();
        assert_eq!(r.ffn_active_fraction, rt.neuron_counter().active_fraction());
        r.ffn_active_fraction
    };
    let (predicted, oracle) = (in_dram(FfnMode::Predicted), in_dram(FfnMode::Oracle));
    assert!(predicted > 0.0 && predicted < 0.5, "{predicted}");
    assert!(oracle > 0.0 && oracle < predicted, "{oracle}");
    assert_eq!(on_disk(FfnMode::Flash), predicted);
    assert_eq!(on_disk(FfnMode::OracleFlash), oracle);
    assert_eq!(on_disk(FfnMode::Naive), 1.0);
    // Reported by `run --json` with the flash statistics.
    let out = cli(&[
        "run",
        path.to_str().unwrap(),
        "--prompt",
        "KING HENRY.",
        "--max-new-tokens",
        "4",
        "--json",
    ]);
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let f = json["flash"]["ffn_active_fraction"].as_f64().unwrap();
    assert!(f > 0.0 && f < 0.5, "{json}");
}

/// A trace kept by `calibrate --keep-trace` on the held-out text, replayed:
/// the fired sets drive `oracle-flash` to the same logits as the in-DRAM
/// oracle on the same tokens (so the trace is read in the packed file's
/// neuron order), the predicted sets are what a trained predictor picks
/// (recall as calibrated), and the runtime computes exactly the replayed sets.
#[test]
fn a_replayed_trace_chooses_the_recorded_neurons() {
    use flashpack::runtime::flash::replay::from_kept_trace;
    use std::sync::Arc;
    let path = calibrated("opt-relu");
    let ids = token_ids(path);
    let trace = tempfile::tempdir_in(path.parent().unwrap()).unwrap();
    let out = cli(&[
        "calibrate",
        fixtures().join("models/opt-relu").to_str().unwrap(),
        "--calib",
        fixtures().join("text/heldout.txt").to_str().unwrap(),
        "--calib-tokens",
        "256",
        "--keep-trace",
        trace.path().to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (fired, predicted) = from_kept_trace(trace.path(), path, ids.len()).unwrap();
    assert_eq!((fired.layers(), fired.tokens()), (4, ids.len()));

    // The fired sets are the oracle's: same logits as the in-DRAM oracle.
    let mut oracle = open_model(path).unwrap();
    oracle.set_ffn_mode(FfnMode::Oracle).unwrap();
    let want = logits(&oracle.model, &ids);
    let fired = Arc::new(fired);
    let (model, rt) = flash(
        path,
        FlashOptions {
            mode: FfnMode::OracleFlash,
            replay: Some(Arc::clone(&fired)),
            ..FlashOptions::default()
        },
    );
    let got = logits(&model, &ids);
    let e = nmse(&got, &want);
    assert!(
        e < 1e-9,
        "replayed fired sets: NMSE {e:.3e} against the oracle"
    );
    // Exactly the replayed neurons were computed.
    let replayed: usize = (0..fired.layers())
        .flat_map(|l| (0..ids.len()).map(move |t| (l, t)))
        .map(|(l, t)| fired.set(l, t as u64).len())
        .sum();
    let needed = rt.stats.needed.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(needed as usize, replayed);

    // The predicted sets cover what fired as a calibrated predictor does.
    let (mut hit, mut total) = (0usize, 0usize);
    for l in 0..fired.layers() {
        for t in 0..ids.len() as u64 {
            let p = predicted.set(l, t);
            total += fired.set(l, t).len();
            hit += fired
                .set(l, t)
                .iter()
                .filter(|j| p.binary_search(j).is_ok())
                .count();
        }
    }
    let recall = hit as f64 / total as f64;
    println!(
        "replay: fired {:.3}, predicted {:.3}, recall {recall:.3}",
        fired.mean_fraction(),
        predicted.mean_fraction()
    );
    assert!(recall > 0.9, "recall of the replayed predictions {recall}");
    assert!(predicted.mean_fraction() > fired.mean_fraction());

    // A replay of another shape is refused.
    let wrong = Arc::new(fired.tiled(3, 512, 4).unwrap());
    let err = open_flash(
        path,
        &FlashOptions {
            replay: Some(wrong),
            ..FlashOptions::default()
        },
    )
    .err()
    .expect("a replay of 3 layers on a 4-layer model");
    assert!(err.to_string().contains("replay has 3 layers"), "{err}");
}

/// A model whose dense part dominates (embeddings, LM head and attention of a
/// hidden-2048 Llama: 50 MiB) stays within the budget it is given: loading
/// reads the dense section a chunk at a time into the model, never the whole
/// section beside it (which peaked at about twice the plan). Naive mode: no
/// predictors needed, the same loading path as flash.
#[test]
fn a_dense_heavy_model_loads_within_the_budget() {
    use flashpack::runtime::bench::{write_synthetic_checkpoint, SyntheticShape};
    let dir = tempfile::tempdir_in(calibrated("opt-relu").parent().unwrap()).unwrap();
    let ckpt = dir.path().join("ckpt");
    std::fs::create_dir(&ckpt).unwrap();
    let shape = SyntheticShape {
        hidden: 2048,
        ffn: 256,
        vocab: 2048,
        layers: 1,
        heads: 16,
    };
    let tokenizer = fixtures().join("models/opt-relu/tokenizer.json");
    write_synthetic_checkpoint(&ckpt, &shape, &tokenizer).unwrap();
    let packed = dir.path().join("dense-heavy.flashpack");
    convert(
        &ckpt,
        &packed,
        &ConvertOptions::default(),
        flashpack::progress::SILENT,
    )
    .unwrap();
    let run = |budget: &str| {
        cli(&[
            "run",
            packed.to_str().unwrap(),
            "--prompt",
            "Hello",
            "--max-new-tokens",
            "2",
            "--ffn",
            "naive",
            "--dram-budget",
            budget,
            "--json",
        ])
    };
    let out = run("1MiB");
    assert_eq!(out.status.code(), Some(2));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let err = json["error"].as_str().unwrap();
    let minimum = stated_minimum(err);
    assert!(minimum > 50 << 20, "the dense part is counted: {minimum}");
    let out = run(&minimum.to_string());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let peak = json["peak_rss_bytes"].as_u64().unwrap();
    println!("peak RSS {peak}, budget {minimum}");
    assert!(
        peak > 0 && peak <= minimum,
        "peak RSS {peak} over the budget {minimum}"
    );
}
