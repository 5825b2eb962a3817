//! Mixture-of-experts models from flash (issue 14 step 3): `--ffn naive` and
//! `--ffn flash` on packed MoE files compute exactly what the same packed
//! model computes in DRAM (`--ffn dense`), read only the chosen experts'
//! bundles (naive: exactly the bytes those experts occupy, rounded to the
//! read alignment), and report experts and bytes per token.

mod common;
use common::{fixtures, nmse};

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use flashpack::format::PackedFile;
use flashpack::runtime::flash::{open_flash, FlashOptions, FlashReport};
use flashpack::runtime::moe::RoutingLog;
use flashpack::runtime::sparse::FfnMode;
use flashpack::runtime::{open_model, with_threads, Logits, Model};

const MODELS: [&str; 4] = [
    "mixtral-tiny",
    "qwen2moe-tiny",
    "qwen3moe-tiny",
    "qwen3moe-trained",
];

/// Each fixture packed once (default options), under target/ so that direct
/// I/O is tried on a real disk.
fn packed(name: &str) -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
        std::fs::create_dir_all(&base).unwrap();
        tempfile::tempdir_in(base).unwrap()
    });
    let out = dir.path().join(format!("{name}.flashpack"));
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _g = LOCK.lock().unwrap();
    if !out.exists() {
        let src = fixtures().join("models").join(name);
        let (code, json) = common::flashpack_json(&[
            "convert",
            src.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{name}: {json}");
    }
    out
}

fn token_ids(path: &Path, count: usize) -> Vec<u32> {
    let loaded = open_model(path).unwrap();
    let text = std::fs::read_to_string(fixtures().join("text/heldout.txt")).unwrap();
    loaded.tokenizer.encode(&text).unwrap()[..count].to_vec()
}

/// Logits of every token fed one at a time (decode steps).
fn decode_logits(model: &Model, ids: &[u32]) -> Vec<f32> {
    let mut cache = model.new_cache();
    let mut all = Vec::new();
    for &id in ids {
        all.extend(
            model
                .forward(&mut cache, &[id], Logits::Last, None)
                .unwrap(),
        );
    }
    all
}

/// Logits of a prefill of `prefill` tokens (a batch), then decode steps.
fn prefill_logits(model: &Model, ids: &[u32], prefill: usize) -> Vec<f32> {
    let mut cache = model.new_cache();
    let mut all = model
        .forward(&mut cache, &ids[..prefill], Logits::All, None)
        .unwrap();
    for &id in &ids[prefill..] {
        all.extend(
            model
                .forward(&mut cache, &[id], Logits::Last, None)
                .unwrap(),
        );
    }
    all
}

fn routes(model: &Model, ids: &[u32]) -> RoutingLog {
    let mut cache = model.new_cache();
    let mut r = RoutingLog::default();
    for &id in ids {
        model
            .forward(&mut cache, &[id], Logits::Last, Some(&mut r))
            .unwrap();
    }
    r
}

fn open(path: &Path, opts: FlashOptions) -> (Model, flashpack::runtime::flash::FlashRuntime) {
    let (loaded, rt) = open_flash(path, &opts).unwrap();
    (loaded.model, rt)
}

/// (mode, window, cache rows, DRAM budget, compute threads, I/O threads)
type Case = (FfnMode, usize, Option<usize>, Option<u64>, usize, usize);

#[test]
fn naive_and_flash_decode_is_bit_identical_to_the_packed_model_in_dram() {
    for name in MODELS {
        let path = packed(name);
        let ids = token_ids(&path, 40);
        let dense = open_model(&path).unwrap();
        let want = decode_logits(&dense.model, &ids);
        let want_prefill = prefill_logits(&dense.model, &ids, 16);
        let file = PackedFile::open(&path).unwrap();
        let moe = file.config.moe.clone().unwrap();
        let expert_rows = moe.expert_width;
        // (mode, window, cache rows, budget, compute threads, I/O threads)
        let cases: [Case; 6] = [
            (FfnMode::Naive, 4, None, None, 1, 2),
            (FfnMode::Flash, 4, None, None, 2, 3),
            (FfnMode::Flash, 0, None, None, 1, 1),
            // Rows for less than one expert: the scratch path for the rest.
            (FfnMode::Flash, 1, Some(expert_rows / 2 + 1), None, 2, 1),
            // Rows for one expert per layer: experts evicted every step.
            (FfnMode::Flash, 4, Some(expert_rows), None, 1, 4),
            // Budget to spare: every expert stays once read.
            (FfnMode::Flash, 4, None, Some(1 << 30), 1, 2),
        ];
        for (mode, window, capacity, dram_budget, threads, io_threads) in cases {
            let opts = FlashOptions {
                mode,
                window,
                capacity,
                dram_budget,
                io_threads,
                ..FlashOptions::default()
            };
            let (model, rt) = open(&path, opts.clone());
            let got = with_threads(Some(threads), || decode_logits(&model, &ids)).unwrap();
            assert!(
                got == want,
                "{name} {mode:?} window {window} capacity {capacity:?}: differs from dense (NMSE {:.3e})",
                nmse(&got, &want)
            );
            let r = rt.report();
            let e = r.experts.clone().expect("a MoE report");
            let sparse = moe.sparse_layers.iter().filter(|&&s| s).count();
            assert_eq!(r.tokens, ids.len() as u64, "{name}");
            assert_eq!(
                e.chosen_per_token,
                (moe.top_k * sparse) as f64,
                "{name}: top-k experts per sparse layer"
            );
            assert!(r.bytes_read > 0 && r.read_ops > 0, "{name}");
            match (mode, capacity, dram_budget, window) {
                (FfnMode::Naive, ..) => {
                    assert_eq!(
                        e.read_per_token, e.chosen_per_token,
                        "{name}: naive reads every chosen expert"
                    );
                    assert_eq!(r.window_hit_rate, 0.0);
                }
                (_, Some(c), ..) if c < expert_rows => {
                    assert!(r.bundles_overflowed > 0, "{name}: the scratch path ran");
                    assert_eq!(
                        e.read_per_token, e.chosen_per_token,
                        "{name}: no expert fits"
                    );
                }
                (_, _, _, 0) => {
                    assert_eq!(r.window_hit_rate, 0.0, "{name}: window 0 keeps nothing");
                    assert_eq!(e.read_per_token, e.chosen_per_token);
                }
                (_, None, Some(_), _) => {
                    // Each expert read at most once over the run.
                    let experts = file.manifest.experts.len() as u64;
                    // Dense FFN layers are read once too (they fit).
                    let dense_rows: u64 = file.manifest.ffn_layers.iter().map(|l| l.neurons).sum();
                    let loaded_experts = (r.bundles_loaded - dense_rows) / expert_rows as u64;
                    assert_eq!((r.bundles_loaded - dense_rows) % expert_rows as u64, 0);
                    assert!(
                        loaded_experts <= experts,
                        "{name}: {loaded_experts} > {experts}"
                    );
                    assert!(
                        r.window_hit_rate > 0.5,
                        "{name}: hit rate {}",
                        r.window_hit_rate
                    );
                    assert_eq!(r.bundles_evicted, 0, "{name}");
                }
                _ => {
                    assert!(
                        e.read_per_token < e.chosen_per_token,
                        "{name}: the cache saved reads ({e:?})"
                    );
                }
            }
            println!(
                "{name} {mode:?} window {window} cap {capacity:?} budget {dram_budget:?}: {:.0} B/token, experts read {:.2} of {:.2} per token, hit {:.3}",
                r.bytes_read_per_token, e.read_per_token, e.chosen_per_token, r.window_hit_rate
            );

            // A prefill batch: the experts' rows are computed token by token
            // (the DRAM model batches them through GEMMs), so the bar is the
            // dense naive bar of tests/runtime_flash.rs, not bit identity.
            let (model, _) = open(&path, opts);
            let got = prefill_logits(&model, &ids, 16);
            let err = nmse(&got, &want_prefill);
            assert!(err < 1e-10, "{name} {mode:?}: prefill NMSE {err:.3e}");
        }
    }
}

/// Bytes a naive read of each bundle set takes: its bundles rounded out to
/// the read alignment (sections start aligned).
fn naive_bytes(file: &PackedFile, neurons: u64, stride: u64) -> u64 {
    let align = file.manifest.alignment.max(512);
    (neurons * stride).div_ceil(align) * align
}

#[test]
fn naive_reads_exactly_what_the_chosen_experts_occupy() {
    for name in MODELS {
        let path = packed(name);
        let ids = token_ids(&path, 24);
        let dense = open_model(&path).unwrap();
        let routes = routes(&dense.model, &ids);
        let file = PackedFile::open(&path).unwrap();
        let m = &file.manifest;
        let dense_layers: u64 = m
            .ffn_layers
            .iter()
            .map(|l| naive_bytes(&file, l.neurons, l.bundle_bytes))
            .sum();
        let mut want = dense_layers * ids.len() as u64;
        for (layer, tokens) in &routes.layers {
            for chosen in tokens {
                for &e in chosen {
                    let entry = m
                        .experts
                        .iter()
                        .find(|x| x.layer == *layer as u64 && x.expert == e as u64)
                        .expect("expert entry");
                    want += naive_bytes(&file, entry.neurons, entry.bundle_bytes);
                }
            }
        }
        for verify_reads in [true, false] {
            let (model, rt) = open(
                &path,
                FlashOptions {
                    mode: FfnMode::Naive,
                    verify_reads,
                    ..FlashOptions::default()
                },
            );
            decode_logits(&model, &ids);
            let r: FlashReport = rt.report();
            assert_eq!(
                r.bytes_read, want,
                "{name} (verify {verify_reads}): naive reads the chosen experts and the dense layers, nothing else"
            );
            println!(
                "{name}: naive {} B/token = chosen experts + dense layers",
                r.bytes_read_per_token
            );
        }
    }
}

#[test]
fn a_damaged_expert_byte_stops_the_run_naming_its_section() {
    let path = packed("qwen3moe-trained");
    let file = PackedFile::open(&path).unwrap();
    let ids = token_ids(&path, 16);
    let dense = open_model(&path).unwrap();
    let routes = routes(&dense.model, &ids[..1]);
    // An expert the first token chooses in the first sparse layer.
    let (&layer, tokens) = routes.layers.iter().next().unwrap();
    let expert = tokens[0][0];
    let section = format!("ffn.{layer}.expert.{expert}");
    let s = file.section(&section).unwrap().clone();
    let dir = tempfile::tempdir_in(Path::new(env!("CARGO_MANIFEST_DIR")).join("target")).unwrap();
    let bad = dir.path().join("bad.flashpack");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[(s.offset + 7) as usize] ^= 0x40;
    std::fs::write(&bad, &bytes).unwrap();
    for mode in [FfnMode::Naive, FfnMode::Flash] {
        let (model, _) = open(
            &bad,
            FlashOptions {
                mode,
                ..FlashOptions::default()
            },
        );
        let mut cache = model.new_cache();
        let err = model
            .forward(&mut cache, &ids[..1], Logits::Last, None)
            .expect_err("a damaged chunk is never computed with")
            .to_string();
        assert!(err.contains(&section), "{mode:?}: {err}");
    }
}

#[test]
fn cli_runs_and_benches_a_moe_file_reporting_experts_per_token() {
    let path = packed("qwen3moe-trained");
    let p = path.to_str().unwrap();
    for mode in ["naive", "flash"] {
        let (code, out) =
            common::flashpack_json(&["run", p, "-p", "The king", "-n", "8", "--ffn", mode]);
        assert_eq!(code, 0, "{out}");
        let e = &out["flash"]["experts"];
        assert_eq!(e["chosen_per_token"], 4.0, "2 sparse layers x top-2: {out}");
        let read = e["read_per_token"].as_f64().unwrap();
        assert!(read > 0.0 && read <= 4.0, "{out}");
        assert!(e["routing_ms"].as_f64().unwrap() >= 0.0);
        assert!(out["read_bytes"].as_u64().unwrap() > 0);
    }
    let (code, out) = common::flashpack_json(&["bench", p, "--decode-tokens", "12"]);
    assert_eq!(code, 0, "{out}");
    let rows = out["flash_modes"].as_array().expect("flash_modes");
    let names: Vec<&str> = rows.iter().map(|r| r["mode"].as_str().unwrap()).collect();
    assert!(
        names.contains(&"naive") && names.contains(&"dense (in DRAM)"),
        "{names:?}"
    );
    for r in rows.iter().filter(|r| r["io_mode"].is_string()) {
        let e = &r["experts"];
        assert_eq!(e["chosen_per_token"], 4.0, "{r}");
        assert!(e["routing_ms_per_token"].as_f64().is_some(), "{r}");
        assert!(r["window_hit_rate"].as_f64().is_some());
    }
}

#[test]
fn oracle_flash_on_a_moe_file_is_refused_by_name() {
    let path = packed("mixtral-tiny");
    let err = open_flash(
        &path,
        &FlashOptions {
            mode: FfnMode::OracleFlash,
            ..FlashOptions::default()
        },
    )
    .err()
    .expect("refused")
    .to_string();
    assert!(
        err.contains("mixture-of-experts") && err.contains("oracle-flash"),
        "{err}"
    );
}

/// `calibrate` of a MoE checkpoint counts each expert's choices over the
/// held-out text in 256-token windows, as the fixture generator counted them
/// with transformers (`routing_counts` of the references): equal counts.
#[test]
fn calibration_routing_counts_equal_transformers() {
    let text = fixtures().join("text/heldout.txt");
    for name in MODELS {
        let (reference, _) = common::reference("moe", name);
        let src = fixtures().join("models").join(name);
        let (code, out) = common::flashpack_json(&[
            "calibrate",
            src.to_str().unwrap(),
            "--calib",
            text.to_str().unwrap(),
            "--calib-tokens",
            "1000000",
        ]);
        assert_eq!(code, 0, "{name}: {out}");
        let want = reference["routing_counts"].as_object().expect("counts");
        let layers = out["routing"]["layers"].as_array().expect("routing layers");
        assert_eq!(layers.len(), want.len(), "{name}: {out}");
        for l in layers {
            let layer = l["layer"].as_u64().unwrap().to_string();
            let got: Vec<u64> = serde_json::from_value(l["counts"].clone()).unwrap();
            let want: Vec<u64> = serde_json::from_value(want[&layer].clone()).unwrap();
            assert_eq!(got, want, "{name} layer {layer}");
        }
        println!(
            "{name}: routing counts equal transformers' over {} tokens",
            out["calibration_tokens"]
        );
    }
}

/// The trained fixture packed with `convert --calib`: routing statistics in
/// the file (R34 holds), shown by `inspect`, equal to `calibrate`'s.
fn calibrated_moe() -> &'static Path {
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    FILE.get_or_init(|| {
        let out = packed("qwen3moe-trained").with_file_name("qwen3moe-trained-calib.flashpack");
        let src = fixtures().join("models/qwen3moe-trained");
        let train = fixtures().join("text/train.txt");
        let (code, json) = common::flashpack_json(&[
            "convert",
            src.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--calib",
            train.to_str().unwrap(),
            "--calib-tokens",
            "4096",
        ]);
        assert_eq!(code, 0, "{json}");
        out
    })
}

#[test]
fn convert_calib_records_routing_and_inspect_shows_it() {
    let path = calibrated_moe();
    let file = PackedFile::open(path).unwrap();
    let m = &file.manifest;
    let routing = m.routing.as_ref().expect("routing statistics");
    assert_eq!(routing.tokens, 4096);
    assert_eq!(routing.files.len(), 1);
    assert!(m.predictors.is_empty() && m.calibration.is_none());
    let src = fixtures().join("models/qwen3moe-trained");
    let train = fixtures().join("text/train.txt");
    let (code, cal) = common::flashpack_json(&[
        "calibrate",
        src.to_str().unwrap(),
        "--calib",
        train.to_str().unwrap(),
        "--calib-tokens",
        "4096",
    ]);
    assert_eq!(code, 0, "{cal}");
    for (stored, reported) in routing
        .layers
        .iter()
        .zip(cal["routing"]["layers"].as_array().unwrap())
    {
        let reported: Vec<u64> = serde_json::from_value(reported["counts"].clone()).unwrap();
        assert_eq!(stored.counts, reported, "layer {}", stored.layer);
        assert_eq!(stored.counts.iter().sum::<u64>(), 4096 * 2);
    }
    let (code, info) = common::flashpack_json(&["inspect", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{info}");
    assert_eq!(info["routing"]["tokens"], 4096, "{info}");
    let shown: Vec<u64> =
        serde_json::from_value(info["routing"]["layers"][1]["counts"].clone()).unwrap();
    assert_eq!(shown, routing.layers[1].counts);
    // A calibrated MoE file has no predictors: `flash` is not its default.
    let (code, out) =
        common::flashpack_json(&["run", path.to_str().unwrap(), "-p", "The", "-n", "2"]);
    assert_eq!(code, 0, "{out}");
    assert!(out["flash"].is_null(), "{out}");
}

/// Hot experts pinned from the routing statistics: the hottest experts are
/// resident before the first token and stay; the output is unchanged; hit
/// rates with and without pinning are printed (BENCHMARKS.md).
#[test]
fn hot_experts_are_pinned_from_routing_statistics() {
    let path = calibrated_moe();
    let file = PackedFile::open(path).unwrap();
    let routing = file.manifest.routing.clone().unwrap();
    let ew = file.config.moe.as_ref().unwrap().expert_width;
    let ids = token_ids(path, 400);
    let dense = open_model(path).unwrap();
    let want = decode_logits(&dense.model, &ids[..40]);
    // Rows for 4 of the 8 experts of each layer.
    for share in [0.0, 0.25, 0.5, 0.75] {
        let opts = FlashOptions {
            capacity: Some(4 * ew),
            pin_experts_share: share,
            ..FlashOptions::default()
        };
        let (model, rt) = open(path, opts.clone());
        let pinned = (4.0 * share) as usize;
        assert_eq!(
            rt.plan.pinned_per_layer,
            vec![pinned * ew; 2],
            "share {share}"
        );
        assert_eq!(rt.plan.pinned_bytes_read > 0, pinned > 0);
        let moe = rt.moe.as_ref().unwrap();
        for (layer, counts) in moe.layers.iter().zip(&routing.layers) {
            assert_eq!(
                layer.resident_experts(),
                pinned,
                "the hottest experts, whole"
            );
            assert_eq!(layer.resident_rows(), pinned * ew);
            let _ = counts;
        }
        let got = decode_logits(&model, &ids[..40]);
        assert!(got == want, "share {share}: pinning changes no output");
        let (model, rt) = open(path, opts);
        decode_logits(&model, &ids);
        let r = rt.report();
        let e = r.experts.unwrap();
        println!(
            "pin share {share}: {pinned} of 8 experts pinned per layer, rows for 4: hit rate {:.3}, experts read {:.3} of {:.1} per token, {:.0} B/token over {} tokens",
            r.window_hit_rate, e.read_per_token, e.chosen_per_token, r.bytes_read_per_token, r.tokens
        );
    }
}

/// A prefill batch through flash with rows for every expert reads each
/// expert the batch chose once, whatever number of its tokens chose it:
/// bytes read = distinct chosen experts x their size on disk (+ dense layers).
#[test]
fn prefill_reads_each_chosen_expert_once_for_the_batch() {
    for name in MODELS {
        let path = packed(name);
        let file = PackedFile::open(&path).unwrap();
        let m = &file.manifest;
        let ids = token_ids(&path, 48);
        let (model, rt) = open(
            &path,
            FlashOptions {
                dram_budget: Some(1 << 30),
                ..FlashOptions::default()
            },
        );
        let mut routes = RoutingLog::default();
        let mut cache = model.new_cache();
        model
            .forward(&mut cache, &ids, Logits::Last, Some(&mut routes))
            .unwrap();
        let mut want: u64 = m
            .ffn_layers
            .iter()
            .map(|l| naive_bytes(&file, l.neurons, l.bundle_bytes))
            .sum();
        let mut distinct_total = 0;
        for (layer, tokens) in &routes.layers {
            assert_eq!(tokens.len(), ids.len());
            let distinct: std::collections::BTreeSet<u32> =
                tokens.iter().flatten().copied().collect();
            distinct_total += distinct.len();
            for e in distinct {
                let entry = m
                    .experts
                    .iter()
                    .find(|x| x.layer == *layer as u64 && x.expert == e as u64)
                    .unwrap();
                want += naive_bytes(&file, entry.neurons, entry.bundle_bytes);
            }
        }
        let r = rt.report();
        assert_eq!(r.bytes_read, want, "{name}");
        let e = r.experts.unwrap();
        assert_eq!(
            (e.read_per_token * ids.len() as f64).round() as usize,
            distinct_total,
            "{name}: one read per distinct expert of the batch"
        );
        println!(
            "{name}: prefill of {} tokens read {distinct_total} experts once each ({} bytes)",
            ids.len(),
            r.bytes_read
        );
    }
}

/// A budget below what the MoE plan needs is refused, naming the minimum; a
/// budget at the minimum opens, with only scratch rows, and computes the same.
#[test]
fn a_moe_budget_below_the_minimum_is_refused_and_the_minimum_runs() {
    let path = packed("qwen2moe-tiny");
    let err = open_flash(
        &path,
        &FlashOptions {
            dram_budget: Some(1000),
            ..FlashOptions::default()
        },
    )
    .err()
    .expect("refused")
    .to_string();
    assert!(err.contains("below the minimum of"), "{err}");
    let minimum: u64 = err
        .split("below the minimum of ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .expect("the minimum in bytes");
    let ids = token_ids(&path, 12);
    let dense = open_model(&path).unwrap();
    let want = decode_logits(&dense.model, &ids);
    let (model, rt) = open(
        &path,
        FlashOptions {
            dram_budget: Some(minimum),
            ..FlashOptions::default()
        },
    );
    assert!(rt.plan.total <= minimum, "{:?}", rt.plan);
    assert!(decode_logits(&model, &ids) == want);
}
