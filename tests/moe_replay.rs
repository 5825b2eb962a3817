//! Replayed routing on a packed MoE file (what the scale benchmark,
//! `benches/moe_scale.rs`, gives a synthetic model whose router is random):
//! the runtime follows the replayed experts, weights them with its own
//! router's probabilities, and computes exactly what the packed model in DRAM
//! computes when the replay names the router's own choices; naive and flash
//! agree bit for bit on any replay; pinning every expert before the first
//! token leaves nothing to read.

mod common;
use common::fixtures;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use flashpack::format::PackedFile;
use flashpack::runtime::flash::moe::{expert_replay, pin_hottest, routing_trace};
use flashpack::runtime::flash::{open_flash, FlashOptions, Replay};
use flashpack::runtime::moe::RoutingLog;
use flashpack::runtime::sparse::FfnMode;
use flashpack::runtime::{open_model, Logits, Model};

const NAME: &str = "qwen3moe-trained";

/// The trained fixture packed once, under target/ (direct I/O on a real disk).
fn packed() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, path) = DIR.get_or_init(|| {
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
        std::fs::create_dir_all(&base).unwrap();
        let dir = tempfile::tempdir_in(base).unwrap();
        let out = dir.path().join(format!("{NAME}.flashpack"));
        let src = fixtures().join("models").join(NAME);
        let (code, json) = common::flashpack_json(&[
            "convert",
            src.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{json}");
        (dir, out)
    });
    path
}

fn token_ids(count: usize) -> Vec<u32> {
    let loaded = open_model(packed()).unwrap();
    let text = std::fs::read_to_string(fixtures().join("text/heldout.txt")).unwrap();
    loaded.tokenizer.encode(&text).unwrap()[..count].to_vec()
}

fn decode(model: &Model, ids: &[u32]) -> (Vec<f32>, RoutingLog) {
    let mut cache = model.new_cache();
    let mut routes = RoutingLog::default();
    let mut all = Vec::new();
    for &id in ids {
        all.extend(
            model
                .forward(&mut cache, &[id], Logits::Last, Some(&mut routes))
                .unwrap(),
        );
    }
    (all, routes)
}

fn replay_of(routes: &RoutingLog, experts: usize) -> Arc<Replay> {
    let sets = routes
        .layers
        .values()
        .map(|tokens| {
            tokens
                .iter()
                .map(|chosen| {
                    let mut s = chosen.clone();
                    s.sort_unstable();
                    s
                })
                .collect()
        })
        .collect();
    Arc::new(Replay::new(sets, experts).unwrap())
}

fn sorted(sets: &[Vec<u32>]) -> Vec<Vec<u32>> {
    sets.iter()
        .map(|s| {
            let mut s = s.clone();
            s.sort_unstable();
            s
        })
        .collect()
}

#[test]
fn a_replay_of_the_routers_own_choices_is_bit_identical_to_dram() {
    let ids = token_ids(32);
    let dense = open_model(packed()).unwrap();
    let (want, routes) = decode(&dense.model, &ids);
    let file = PackedFile::open(packed()).unwrap();
    let moe = file.config.moe.clone().unwrap();
    let replay = replay_of(&routes, moe.num_experts);
    for (mode, capacity) in [
        (FfnMode::Naive, None),
        (FfnMode::Flash, None),
        // Rows for one expert per layer: evictions every step.
        (FfnMode::Flash, Some(moe.expert_width)),
    ] {
        let opts = FlashOptions {
            mode,
            capacity,
            replay: Some(Arc::clone(&replay)),
            ..FlashOptions::default()
        };
        let (loaded, _rt) = open_flash(packed(), &opts).unwrap();
        let (got, got_routes) = decode(&loaded.model, &ids);
        assert!(
            got.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{mode:?} capacity {capacity:?}: a replay of the router's own choices computes what DRAM computes, bit for bit"
        );
        // Most probable first, as the router orders them.
        assert_eq!(got_routes.layers, routes.layers, "{mode:?}");
    }
}

#[test]
fn a_replayed_routing_is_followed_and_naive_equals_flash() {
    let ids = token_ids(24);
    let dense = open_model(packed()).unwrap();
    let (dram, routes) = decode(&dense.model, &ids);
    let file = PackedFile::open(packed()).unwrap();
    let moe = file.config.moe.clone().unwrap();
    let e = moe.num_experts as u32;
    // Every chosen expert moved to the next one: other experts than the
    // router's, still distinct.
    let mut moved = RoutingLog::default();
    for (l, tokens) in &routes.layers {
        moved.layers.insert(
            *l,
            tokens
                .iter()
                .map(|c| c.iter().map(|&x| (x + 1) % e).collect())
                .collect(),
        );
    }
    let replay = replay_of(&moved, moe.num_experts);
    let mut outputs = Vec::new();
    for (mode, window) in [
        (FfnMode::Naive, 4),
        (FfnMode::Flash, 4),
        (FfnMode::Flash, 0),
    ] {
        let opts = FlashOptions {
            mode,
            window,
            replay: Some(Arc::clone(&replay)),
            ..FlashOptions::default()
        };
        let (loaded, rt) = open_flash(packed(), &opts).unwrap();
        let (got, got_routes) = decode(&loaded.model, &ids);
        for (l, tokens) in &moved.layers {
            assert_eq!(
                sorted(&got_routes.layers[l]),
                sorted(tokens),
                "{mode:?} layer {l}: the replayed experts are the ones computed"
            );
        }
        let report = rt.report();
        let experts = report.experts.unwrap();
        assert_eq!(
            experts.chosen_per_token,
            (moe.top_k * routes.layers.len()) as f64
        );
        outputs.push((mode, window, got));
    }
    let (_, _, naive) = &outputs[0];
    assert!(
        naive.iter().zip(&dram).any(|(a, b)| a != b),
        "other experts give other logits"
    );
    for (mode, window, got) in &outputs[1..] {
        assert!(
            got.iter()
                .zip(naive)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{mode:?} window {window} equals naive on the same replay, bit for bit"
        );
    }
}

#[test]
fn a_replay_that_is_not_a_routing_trace_is_refused() {
    let file = PackedFile::open(packed()).unwrap();
    let moe = file.config.moe.clone().unwrap();
    let sparse = 2;
    let wrong_width = Replay::new(vec![vec![vec![0, 1]]; sparse], moe.num_experts + 1).unwrap();
    let wrong_k = Replay::new(vec![vec![vec![0, 1, 2]]; sparse], moe.num_experts).unwrap();
    let wrong_layers = Replay::new(vec![vec![vec![0, 1]]; sparse + 1], moe.num_experts).unwrap();
    for r in [wrong_width, wrong_k, wrong_layers] {
        let opts = FlashOptions {
            mode: FfnMode::Flash,
            replay: Some(Arc::new(r)),
            ..FlashOptions::default()
        };
        let err = open_flash(packed(), &opts)
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("routing trace"), "{err}");
    }
}

#[test]
fn every_expert_pinned_before_the_first_token_leaves_nothing_to_read() {
    let ids = token_ids(16);
    let dense = open_model(packed()).unwrap();
    let (want, _) = decode(&dense.model, &ids);
    let file = PackedFile::open(packed()).unwrap();
    let moe = file.config.moe.clone().unwrap();
    let opts = FlashOptions {
        mode: FfnMode::Flash,
        capacity: Some(moe.num_experts * moe.expert_width),
        ..FlashOptions::default()
    };
    let (loaded, mut rt) = open_flash(packed(), &opts).unwrap();
    let counts: Vec<(usize, Vec<u64>)> = (0..2).map(|l| (l, vec![1; moe.num_experts])).collect();
    let pinned = pin_hottest(&mut rt, &counts, 1.0).unwrap();
    assert_eq!(pinned, 2 * moe.num_experts);
    let expert_bytes: u64 = file
        .manifest
        .experts
        .iter()
        .map(|x| x.neurons * x.bundle_bytes)
        .sum();
    assert!(rt.plan.pinned_bytes_read >= expert_bytes);
    let (got, _) = decode(&loaded.model, &ids);
    assert!(got
        .iter()
        .zip(&want)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
    let r = rt.report();
    assert_eq!(r.bytes_read, 0, "every expert was in DRAM");
    assert_eq!(r.experts.unwrap().read_per_token, 0.0);
}

#[test]
fn the_trained_routing_stretches_to_top_8_of_128_keeping_its_skew() {
    let dense = open_model(&fixtures().join("models").join(NAME)).unwrap();
    let text = std::fs::read_to_string(fixtures().join("text/heldout.txt")).unwrap();
    let ids = dense.tokenizer.encode(&text).unwrap()[..1024].to_vec();
    let trace = routing_trace(&dense.model, &ids, 256).unwrap();
    assert_eq!(trace.len(), 2);
    assert!(trace
        .iter()
        .all(|l| l.len() == 1024 && l.iter().all(|c| c.len() == 2)));
    let r = expert_replay(&trace, 8, 5, 128, 8, 200).unwrap();
    assert_eq!((r.layers(), r.tokens(), r.width()), (5, 200, 128));
    let mut counts = vec![0u64; 128];
    for l in 0..5 {
        for t in 0..200 {
            let s = r.set(l, t);
            assert_eq!(s.len(), 8, "top-8, distinct (Replay checks ascending)");
            for &e in s {
                counts[e as usize] += 1;
            }
        }
    }
    // Skewed like the trained router: the hottest tenth of the experts take
    // well over a tenth of the choices.
    counts.sort_unstable_by(|a, b| b.cmp(a));
    let top: u64 = counts[..13].iter().sum();
    let all: u64 = counts.iter().sum();
    assert!(top as f64 / all as f64 > 0.2, "{counts:?}");
    // Same input, same replay.
    let again = expert_replay(&trace, 8, 5, 128, 8, 200).unwrap();
    assert!((0..5).all(|l| (0..200).all(|t| r.set(l, t) == again.set(l, t))));
    // Shapes it cannot stretch to are refused by name.
    let err = expert_replay(&trace, 8, 5, 100, 8, 10)
        .unwrap_err()
        .to_string();
    assert!(err.contains("top-8 of 100"), "{err}");
}
