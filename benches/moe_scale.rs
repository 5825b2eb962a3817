//! Mixture of experts from flash at scale (a measurement, not a test; issue
//! 14, "Scale benchmark"): whole decoded tokens of a synthetic model with
//! Qwen3-30B-A3B's per-layer shapes, through the runtime's `open_flash`,
//! under DRAM budgets of 25% and 50% of the packed file, against reading
//! every chosen expert whole, a llama.cpp-style memory map in a memory
//! cgroup of the same size, and the whole model in DRAM.
//!
//! 1. A trained MoE's routing: the `qwen3moe-trained` fixture (2 sparse
//!    layers, top-2 of 8 experts) runs in DRAM over held-out text
//!    (`flash::moe::routing_trace`) and, apart, over training text (its
//!    calibration). `flash::moe::expert_replay` stretches each trace to
//!    top-8 of 128 experts per layer (4 streams of the trace per token, a
//!    replica index from the other trained layer): how unevenly experts are
//!    chosen and how a token's experts repeat on the next tokens come from
//!    the trained model.
//! 2. A synthetic `Qwen3MoeForCausalLM` checkpoint: hidden 2048, 32 query
//!    heads and 4 KV heads of 128, every layer sparse with 128 SwiGLU experts
//!    of 768 neurons, top-8, `norm_topk_prob`, f16, vocabulary 32000 (the
//!    real 151936 would only grow the resident part), `FLASHPACK_MOE_LAYERS`
//!    layers (default 4: 4.5 GiB of experts, 9 MiB each), random weights,
//!    written streaming by `runtime::bench::write_synthetic_checkpoint_for`
//!    and packed by `flashpack::pack::convert` (alignment 4096; each
//!    expert's bundles one section, spec 4.1).
//! 3. Each mode opened fresh after `posix_fadvise(DONTNEED)` on the file
//!    decodes the same token ids one at a time, the held-out replay handed
//!    to the runtime (`FlashOptions::replay`): the router's logits are
//!    computed and the replayed experts weighted by them
//!    (`Router::route_chosen`); attention, norms, the chosen experts and
//!    the LM head are computed for real (random weights: the numbers mean
//!    nothing, the work is the real work).
//!    - naive, "(a)": every chosen expert read whole per token with direct
//!      I/O (1 MiB reads), nothing cached;
//!    - flash window W (`FLASHPACK_MOE_WINDOW`, default 4): the (expert,
//!      neuron) cache under the budget, the hottest experts of the
//!      calibration trace pinned in the default share of its rows;
//!    - all in DRAM, "(c)", where the machine has the room: flash with rows
//!      for every expert, all read at open (pinned) before the first token.
//! 4. mmap, "(b)": a child process in a new memory cgroup limited to the
//!    same budget maps the file and per token reads each chosen expert's
//!    bundles through the page cache (dot products with the runtime's
//!    kernel, as many as the expert's arithmetic), with the dense part less
//!    the embedding table held in anonymous memory and read too (attention
//!    and LM head). Skipped with a reason when no cgroup can be made.
//!
//! The MoE oracle: every neuron of a chosen SwiGLU expert is needed (no
//! neuron sparsity within experts), so it is the chosen experts' bundle
//! bytes per token, cache or no cache.
//!
//! Run: `cargo bench --bench moe_scale` (`FLASHPACK_BENCH_DIR` for the
//! scratch: twice the file while converting; `FLASHPACK_MOE_TOKENS` tokens
//! per disk mode (default 64), `FLASHPACK_MOE_MMAP_TOKENS` (default 16),
//! `FLASHPACK_MOE_BUDGETS` (default `25%,50%`), `FLASHPACK_MOE_PIN_SHARES`
//! the shares of flash's rows pinned to the hottest experts, one flash row
//! each (default the runtime's, 0.5), `FLASHPACK_MOE_DRAM`
//! (`auto`: the all-in-DRAM row where MemAvailable exceeds the file by
//! 4 GiB; `on`, `off`), `FLASHPACK_MOE_JSON` names a file for the rows as
//! JSON).

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use common::{
    dense_stand_in, drop_cache, env_usize, join_cgroup, map_file, measure_tokens, rows_dot,
    run_in_cgroup, MmapResult,
};
use flashpack::format::PackedFile;
use flashpack::runtime::bench::write_synthetic_checkpoint_for;
use flashpack::runtime::flash::bench::{measure_mode_with, ModeRow};
use flashpack::runtime::flash::moe::{
    expert_replay, pin_hottest, routing_trace, DEFAULT_PIN_SHARE,
};
use flashpack::runtime::flash::{parse_size, FlashOptions, Replay};
use flashpack::runtime::sparse::FfnMode;

const HIDDEN: usize = 2048;
const EXPERTS: usize = 128;
const TOP_K: usize = 8;
const EXPERT_WIDTH: usize = 768;
const VOCAB: usize = 32000;
const MMAP_CHILD: &str = "FLASHPACK_MOE_MMAP_CHILD";

fn main() {
    if let Some(path) = std::env::var_os(MMAP_CHILD) {
        mmap_child(Path::new(&path));
        return;
    }
    let layers = env_usize("FLASHPACK_MOE_LAYERS", 4);
    let tokens = env_usize("FLASHPACK_MOE_TOKENS", 64);
    let mmap_tokens = env_usize("FLASHPACK_MOE_MMAP_TOKENS", 16);
    let window = env_usize("FLASHPACK_MOE_WINDOW", 4);
    let budgets_text = std::env::var("FLASHPACK_MOE_BUDGETS").unwrap_or_else(|_| "25%,50%".into());
    let dram = std::env::var("FLASHPACK_MOE_DRAM").unwrap_or_else(|_| "auto".into());
    let pin_shares: Vec<f64> = std::env::var("FLASHPACK_MOE_PIN_SHARES")
        .unwrap_or_else(|_| DEFAULT_PIN_SHARE.to_string())
        .split(',')
        .map(|s| s.parse().expect("FLASHPACK_MOE_PIN_SHARES"))
        .collect();
    let base = std::env::var_os("FLASHPACK_BENCH_DIR")
        .map(Into::into)
        .unwrap_or_else(std::env::temp_dir);
    let scratch = tempfile::tempdir_in(base).expect("scratch dir");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));

    // 1. The trained fixture's routing on held-out text (the replay) and on
    // training text (the calibration counts pinning uses).
    let t0 = Instant::now();
    let fixture = root.join("fixtures/models/qwen3moe-trained");
    let loaded = flashpack::runtime::open_model(&fixture).expect("the trained MoE fixture");
    let trace_of = |name: &str, n: usize| {
        let text = std::fs::read_to_string(root.join("fixtures/text").join(name)).unwrap();
        let mut ids = loaded.tokenizer.encode(&text).expect("tokenize");
        ids.truncate(n);
        routing_trace(&loaded.model, &ids, 256).expect("routing trace")
    };
    let held = trace_of("heldout.txt", 4096);
    let train = trace_of("train.txt", 4096);
    let fixture_experts = loaded.model.config.moe.as_ref().unwrap().num_experts;
    drop(loaded);
    let replay = Arc::new(
        expert_replay(&held, fixture_experts, layers, EXPERTS, TOP_K, tokens).expect("replay"),
    );
    let calib = expert_replay(
        &train,
        fixture_experts,
        layers,
        EXPERTS,
        TOP_K,
        train[0].len() / (TOP_K / held[0][0].len()),
    )
    .expect("calibration replay");
    let counts: Vec<(usize, Vec<u64>)> = (0..layers)
        .map(|l| {
            let mut c = vec![0u64; EXPERTS];
            for t in 0..calib.tokens() {
                for &e in calib.set(l, t as u64) {
                    c[e as usize] += 1;
                }
            }
            (l, c)
        })
        .collect();
    let stats = routing_stats(&replay, &counts);
    eprintln!(
        "fixture routing: {} held-out and {} training tokens traced ({:.1} s); {stats}",
        held[0].len(),
        train[0].len(),
        t0.elapsed().as_secs_f64()
    );

    // 2. The synthetic model.
    let ckpt = scratch.path().join("ckpt");
    std::fs::create_dir(&ckpt).unwrap();
    let t0 = Instant::now();
    let config = serde_json::json!({
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": 6144,
        "moe_intermediate_size": EXPERT_WIDTH, "num_experts": EXPERTS,
        "num_experts_per_tok": TOP_K, "norm_topk_prob": true, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "num_hidden_layers": layers, "num_attention_heads": 32,
        "num_key_value_heads": 4, "head_dim": 128, "hidden_act": "silu",
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "attention_bias": false, "tie_word_embeddings": false, "dtype": "float16"
    });
    let ckpt_bytes = write_synthetic_checkpoint_for(
        &ckpt,
        config,
        &root.join("fixtures/models/opt-relu/tokenizer.json"),
    )
    .expect("synthetic checkpoint");
    eprintln!(
        "wrote {:.2} GiB checkpoint in {:.1} s",
        ckpt_bytes as f64 / (1u64 << 30) as f64,
        t0.elapsed().as_secs_f64()
    );
    let packed = scratch.path().join("moe-scale.flashpack");
    let t0 = Instant::now();
    flashpack::pack::convert(
        &ckpt,
        &packed,
        &flashpack::pack::ConvertOptions::default(),
        flashpack::progress::SILENT,
    )
    .expect("convert");
    std::fs::remove_dir_all(&ckpt).unwrap();
    eprintln!("converted in {:.1} s", t0.elapsed().as_secs_f64());
    let file_len = std::fs::metadata(&packed).unwrap().len();
    let (expert_bytes, expert_on_disk, dense_bytes) = {
        let file = PackedFile::open(&packed).expect("open packed");
        let e = &file.manifest.experts[0].bundles();
        let section = file.section(&e.section).unwrap();
        let dense = file
            .section(flashpack::format::layout::DENSE_SECTION)
            .map_or(0, |s| s.length);
        (e.neurons * e.bundle_bytes, section.length, dense)
    };
    // The MoE oracle: the chosen experts' needed neurons, all of them.
    let oracle_bytes = (layers * TOP_K) as f64 * expert_bytes as f64;
    eprintln!(
        "packed {:.2} GiB: {layers} layers x {EXPERTS} experts of {:.2} MiB ({:.2} MiB on disk), dense section {:.0} MiB; oracle {:.1} MiB/token",
        file_len as f64 / (1u64 << 30) as f64,
        expert_bytes as f64 / (1u64 << 20) as f64,
        expert_on_disk as f64 / (1u64 << 20) as f64,
        dense_bytes as f64 / (1u64 << 20) as f64,
        oracle_bytes / (1u64 << 20) as f64
    );
    let replay_file = scratch.path().join("replay.json");
    std::fs::write(
        &replay_file,
        serde_json::to_string(
            &(0..layers)
                .map(|l| {
                    (0..replay.tokens())
                        .map(|t| replay.set(l, t as u64).to_vec())
                        .collect::<Vec<_>>()
                })
                .collect::<Vec<_>>(),
        )
        .unwrap(),
    )
    .unwrap();

    // 3-4. The modes, budget by budget.
    let ids: Vec<u32> = (0..tokens)
        .map(|t| ((t * 7919 + 13) % VOCAB) as u32)
        .collect();
    let base_opts = FlashOptions {
        window,
        context: tokens,
        replay: Some(Arc::clone(&replay)),
        ..FlashOptions::default()
    };
    let mut rows: Vec<Row> = Vec::new();
    let measure =
        |name: String, opts: &FlashOptions, pin: f64, budget_label: &str| -> Option<Row> {
            drop_cache(&packed);
            let counts = &counts;
            let mut prepare = |rt: &mut flashpack::runtime::flash::FlashRuntime| {
                pin_hottest(rt, counts, pin).map(|_| ())
            };
            match measure_mode_with(&packed, &ids, opts, &name, &mut prepare) {
                Ok(row) => {
                    eprintln!("{name}: {:.1} ms/token", row.ms_per_token);
                    Some(Row::from_mode(row, budget_label, oracle_bytes))
                }
                Err(e) => {
                    eprintln!("{name}: refused: {e}");
                    None
                }
            }
        };
    for label in budgets_text.split(',') {
        let budget = parse_size(label, file_len).expect("FLASHPACK_MOE_BUDGETS");
        let opts = FlashOptions {
            dram_budget: Some(budget),
            ..base_opts.clone()
        };
        rows.extend(measure(
            format!("(a) whole chosen experts, direct I/O, budget {label}"),
            &FlashOptions {
                mode: FfnMode::Naive,
                ..opts.clone()
            },
            0.0,
            label,
        ));
        for &share in &pin_shares {
            let name = if share == DEFAULT_PIN_SHARE {
                format!("flash window {window}, budget {label}")
            } else {
                format!("flash window {window}, pin share {share}, budget {label}")
            };
            rows.extend(measure(
                name,
                &FlashOptions {
                    mode: FfnMode::Flash,
                    ..opts.clone()
                },
                share,
                label,
            ));
        }
        drop_cache(&packed);
        let tokens_text = mmap_tokens.to_string();
        match run_in_cgroup(
            budget,
            &[
                (MMAP_CHILD, packed.as_os_str()),
                ("FLASHPACK_MOE_MMAP_TOKENS", tokens_text.as_ref()),
                ("FLASHPACK_MOE_MMAP_REPLAY", replay_file.as_os_str()),
            ],
        ) {
            Ok(m) => {
                eprintln!("(b) mmap, budget {label}: {:.1} ms/token", m.ms_per_token);
                rows.push(Row::from_mmap(&m, label, budget, layers, oracle_bytes));
            }
            Err(why) => eprintln!("(b) mmap, budget {label}: skipped: {why}"),
        }
    }
    let available = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024);
    let dram_room = available > file_len + (4u64 << 30);
    if dram == "on" || (dram == "auto" && dram_room) {
        rows.extend(measure(
            "(c) all in DRAM (every expert read at open)".into(),
            &FlashOptions {
                mode: FfnMode::Flash,
                capacity: Some(EXPERTS * EXPERT_WIDTH),
                ..base_opts.clone()
            },
            1.0,
            "-",
        ));
    } else {
        eprintln!(
            "(c) all in DRAM skipped: MemAvailable {:.1} GiB, file {:.1} GiB (FLASHPACK_MOE_DRAM=on forces it)",
            available as f64 / (1u64 << 30) as f64,
            file_len as f64 / (1u64 << 30) as f64
        );
    }

    println!(
        "\nmodel {:.2} GiB packed ({layers} layers, {EXPERTS} experts of {EXPERT_WIDTH}, top-{TOP_K}, expert {:.2} MiB), {tokens} tokens per disk mode, {mmap_tokens} for mmap (first dropped); oracle {:.1} MiB/token; load average {}",
        file_len as f64 / (1u64 << 30) as f64,
        expert_bytes as f64 / (1u64 << 20) as f64,
        oracle_bytes / (1u64 << 20) as f64,
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
    );
    println!("routing replay: {stats}\n");
    println!("| mode | budget | DRAM plan MiB | experts read/token (of chosen) | bytes/token | bytes / oracle | hit rate | I/O ms | routing ms | FFN compute ms | cache ms | other ms | ms/token |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.1} of {:.1} | {:.0} | {:.3} | {} | {} | {} | {} | {} | {} | {:.1} |",
            r.mode,
            r.budget,
            r.plan_mib.map_or("-".into(), |m| format!("{m:.0}")),
            r.experts_read_per_token,
            r.experts_chosen_per_token,
            r.bytes_per_token,
            r.bytes_per_token / oracle_bytes,
            fmt3(r.hit_rate),
            fmt1(r.io_ms),
            fmt1(r.routing_ms),
            fmt1(r.ffn_compute_ms),
            fmt1(r.cache_ms),
            fmt1(r.other_ms),
            r.ms_per_token
        );
    }
    println!();
    for label in budgets_text.split(',') {
        let find = |prefix: &str| {
            rows.iter()
                .find(|r| r.budget == label && r.mode.starts_with(prefix))
                .map(|r| r.ms_per_token)
        };
        let (Some(a), b) = (find("(a)"), find("(b)")) else {
            continue;
        };
        for f in rows
            .iter()
            .filter(|r| r.budget == label && r.mode.starts_with("flash"))
        {
            println!(
                "{}: {:.2}x faster than (a) whole-expert direct reads; {}",
                f.mode,
                a / f.ms_per_token,
                b.map_or("no mmap row".into(), |b| format!(
                    "{:.2}x faster than (b) mmap in a cgroup",
                    b / f.ms_per_token
                ))
            );
        }
    }
    if let Some(path) = std::env::var_os("FLASHPACK_MOE_JSON") {
        let json = serde_json::json!({
            "file_bytes": file_len,
            "layers": layers,
            "experts": EXPERTS,
            "top_k": TOP_K,
            "expert_width": EXPERT_WIDTH,
            "expert_bytes": expert_bytes,
            "oracle_bytes_per_token": oracle_bytes,
            "tokens": tokens,
            "routing": stats,
            "loadavg": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
            "rows": rows,
        });
        std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap())
            .expect("FLASHPACK_MOE_JSON");
    }
}

fn fmt1(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.1}"))
}

fn fmt3(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.3}"))
}

/// One row of the table (and of the JSON).
#[derive(serde::Serialize)]
struct Row {
    mode: String,
    budget: String,
    plan_mib: Option<f64>,
    experts_chosen_per_token: f64,
    experts_read_per_token: f64,
    bytes_per_token: f64,
    bytes_over_oracle: f64,
    hit_rate: Option<f64>,
    io_ms: Option<f64>,
    routing_ms: Option<f64>,
    ffn_compute_ms: Option<f64>,
    cache_ms: Option<f64>,
    other_ms: Option<f64>,
    ms_per_token: f64,
    /// The runtime's own row (disk modes).
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<ModeRow>,
}

impl Row {
    fn from_mode(r: ModeRow, budget: &str, oracle: f64) -> Row {
        let e = r.experts.clone().expect("a MoE row");
        let routing = e.routing_ms_per_token;
        Row {
            mode: r.mode.clone(),
            budget: budget.into(),
            plan_mib: Some(r.dram_plan.total as f64 / (1u64 << 20) as f64),
            experts_chosen_per_token: e.chosen_per_token,
            experts_read_per_token: e.read_per_token,
            bytes_per_token: r.bytes_read_per_token,
            bytes_over_oracle: r.bytes_read_per_token / oracle,
            hit_rate: (!r.mode.starts_with("(a)")).then_some(r.window_hit_rate),
            io_ms: Some(r.io_ms_per_token),
            routing_ms: Some(routing),
            ffn_compute_ms: Some(r.ffn_compute_ms_per_token),
            cache_ms: Some(r.memory_ms_per_token),
            other_ms: Some(
                r.ms_per_token
                    - r.io_ms_per_token
                    - routing
                    - r.ffn_compute_ms_per_token
                    - r.memory_ms_per_token,
            ),
            ms_per_token: r.ms_per_token,
            detail: Some(r),
        }
    }

    fn from_mmap(m: &MmapResult, budget: &str, limit: u64, layers: usize, oracle: f64) -> Row {
        Row {
            mode: format!(
                "(b) mmap, cgroup limit {:.0} MiB",
                limit as f64 / (1u64 << 20) as f64
            ),
            budget: budget.into(),
            plan_mib: None,
            experts_chosen_per_token: (layers * TOP_K) as f64,
            experts_read_per_token: (layers * TOP_K) as f64,
            bytes_per_token: m.read_bytes_per_token,
            bytes_over_oracle: m.read_bytes_per_token / oracle,
            // Page-cache hits: the share of the bytes touched not read.
            hit_rate: Some(1.0 - m.read_bytes_per_token / m.touched_bytes_per_token.max(1.0)),
            io_ms: None,
            routing_ms: None,
            ffn_compute_ms: None,
            cache_ms: None,
            other_ms: None,
            ms_per_token: m.ms_per_token,
            detail: None,
        }
    }
}

/// The replay's skew and token-to-token reuse, and the calibration's.
fn routing_stats(replay: &Replay, counts: &[(usize, Vec<u64>)]) -> String {
    let (layers, tokens) = (replay.layers(), replay.tokens());
    // Share of the choices the hottest 10% of experts (calibration order) take.
    let mut hot_share = 0.0;
    let mut repeat = 0.0;
    for (l, (_, c)) in counts.iter().enumerate().take(layers) {
        let mut order: Vec<usize> = (0..c.len()).collect();
        order.sort_by_key(|&e| std::cmp::Reverse(c[e]));
        let hot: Vec<usize> = order[..EXPERTS / 10].to_vec();
        let mut n = 0usize;
        for t in 0..tokens {
            n += replay
                .set(l, t as u64)
                .iter()
                .filter(|&&e| hot.contains(&(e as usize)))
                .count();
            if t > 0 {
                let prev = replay.set(l, t as u64 - 1);
                repeat += replay
                    .set(l, t as u64)
                    .iter()
                    .filter(|e| prev.contains(e))
                    .count() as f64
                    / TOP_K as f64;
            }
        }
        hot_share += n as f64 / (tokens * TOP_K) as f64;
    }
    let distinct: f64 = (0..layers)
        .map(|l| {
            let mut seen = [false; EXPERTS];
            for t in 0..tokens {
                for &e in replay.set(l, t as u64) {
                    seen[e as usize] = true;
                }
            }
            seen.iter().filter(|&&s| s).count() as f64
        })
        .sum::<f64>()
        / layers as f64;
    format!(
        "the calibration's hottest 10% of experts take {:.1}% of the held-out choices (uniform: 10%); {:.1}% of a token's experts were chosen by the token before (uniform: {:.1}%); {distinct:.0} distinct experts per layer over {tokens} tokens",
        hot_share / layers as f64 * 100.0,
        repeat / (layers * (tokens - 1).max(1)) as f64 * 100.0,
        TOP_K as f64 / EXPERTS as f64 * 100.0
    )
}

/// The baseline itself: joins the cgroup, holds the dense part (less the
/// embedding table) in anonymous memory, maps the file, and per token reads
/// the dense bytes and each chosen expert's section through the map with a
/// dot product per weight row.
fn mmap_child(path: &Path) {
    join_cgroup();
    let tokens = env_usize("FLASHPACK_MOE_MMAP_TOKENS", 16);
    let replay: Vec<Vec<Vec<u32>>> = serde_json::from_slice(
        &std::fs::read(std::env::var_os("FLASHPACK_MOE_MMAP_REPLAY").expect("replay file"))
            .unwrap(),
    )
    .expect("replay json");
    let file = PackedFile::open(path).expect("open packed");
    let dense = dense_stand_in(&file, true);
    // sections[layer][expert] = (offset, bundle bytes).
    let layers = replay.len();
    let mut sections = vec![vec![(0usize, 0usize); EXPERTS]; layers];
    for entry in &file.manifest.experts {
        let b = entry.bundles();
        let s = file.section(&b.section).expect("section");
        sections[entry.layer as usize][entry.expert as usize] =
            (s.offset as usize, (b.neurons * b.bundle_bytes) as usize);
    }
    let map = map_file(path);
    let x: Vec<f32> = (0..HIDDEN)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 500.0)
        .collect();
    let result = measure_tokens(tokens, &mut |t| {
        let mut sum = rows_dot(&dense, &x);
        let mut touched = 0u64;
        for (l, layer) in replay.iter().enumerate() {
            for &e in &layer[t % layer.len()] {
                let (off, len) = sections[l][e as usize];
                sum += rows_dot(&map[off..off + len], &x);
                touched += len as u64;
            }
        }
        (sum, touched)
    });
    println!("{}", serde_json::to_string(&result).unwrap());
}
