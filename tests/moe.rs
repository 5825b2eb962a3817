//! Mixture-of-experts models (issue 14): Mixtral, Qwen2-MoE (shared expert and
//! its sigmoid gate, a dense `mlp_only_layers` layer) and Qwen3-MoE (top-k
//! renormalised, `decoder_sparse_step`, `mlp_only_layers`), random and
//! trained, against transformers' references in `fixtures/reference/moe/`
//! (`fixtures/make_fixtures_moe.py`): final-position logits of five prompts,
//! KV-cached greedy continuations, held-out perplexity, and each token's chosen
//! experts on a 162-id prompt; config defaults and refusals; packing (spec
//! 4.1: a section per expert), verify against the checkpoint, and the packed
//! file computed in DRAM.

mod common;

use flashpack::input::config::Architecture;
use flashpack::runtime::moe::RoutingLog;
use flashpack::runtime::{Logits, Model};
use serde_json::Value;

/// Issue 14's bars, as for the dense families: logit NMSE, relative
/// perplexity error (greedy ids up to the first near tie,
/// `common::TIE_MARGIN`); and the gap between the k-th and (k+1)-th routing probabilities
/// under which a routing choice may resolve either way in another summation
/// order.
const MAX_NMSE: f64 = 1e-6;
const MAX_PPL_REL: f64 = 1e-5;
const ROUTING_TIE: f64 = 1e-5;

/// Logits, greedy ids, perplexity and routing of one model against its reference.
fn check(name: &str, arch: Architecture) {
    let (json, ckpt) = common::reference("moe", name);
    assert_eq!(ckpt.config.architecture, arch);
    assert_eq!(json["architecture"].as_str(), Some(arch.hf_name()));
    let moe = ckpt
        .config
        .moe
        .as_ref()
        .expect("a mixture-of-experts config");
    let sparse: Vec<u64> = (0..moe.sparse_layers.len() as u64)
        .filter(|&i| moe.sparse_layers[i as usize])
        .collect();
    assert_eq!(
        serde_json::json!(sparse),
        json["moe_layers"],
        "{name}: which layers are sparse"
    );
    let model = Model::from_checkpoint(&ckpt).expect("load");
    let tok = ckpt.tokenizer().expect("tokenizer");
    let mut failures = Vec::new();
    for (pi, p) in json["prompts"]
        .as_array()
        .expect("prompts")
        .iter()
        .enumerate()
    {
        let prompt = common::ids(&p["ids"]);
        assert_eq!(
            tok.encode(p["text"].as_str().expect("text"))
                .expect("encode"),
            prompt,
            "{name} prompt {pi}: tokenization"
        );
        let mut log = RoutingLog::default();
        let logits = model
            .forward(
                &mut model.new_cache(),
                &prompt,
                Logits::Last,
                Some(&mut log),
            )
            .expect("forward");
        let e = common::nmse_f64(&logits, &common::floats(&p["final_logits"]));
        println!("{name} prompt {pi} ({} ids): NMSE {e:.3e}", prompt.len());
        if e.is_nan() || e > MAX_NMSE {
            failures.push(format!("prompt {pi}: NMSE {e:.3e}"));
        }
        if pi == 3 {
            // Each token's experts as transformers chose them, top-k order included.
            for (layer, want) in json["routing"].as_object().expect("routing") {
                let layer: usize = layer.parse().expect("layer");
                let got = &log.layers[&layer];
                let gaps = common::floats(&want["gaps"]);
                let want = want["experts"].as_array().expect("experts");
                assert_eq!(got.len(), want.len(), "{name} layer {layer}: tokens");
                let mut compared = 0;
                for (t, (g, w)) in got.iter().zip(want).enumerate() {
                    if gaps[t] < ROUTING_TIE {
                        continue;
                    }
                    compared += 1;
                    if *g != common::ids(w) {
                        failures.push(format!(
                            "layer {layer} token {t}: experts {g:?}, transformers {:?}",
                            common::ids(w)
                        ));
                    }
                }
                println!(
                    "{name} layer {layer}: routing of {compared} of {} tokens identical",
                    got.len()
                );
                assert!(compared > got.len() * 9 / 10);
            }
        }
        failures.extend(common::greedy_mismatch(
            &model,
            &prompt,
            p,
            &format!("{name} prompt {pi}"),
        ));
    }
    failures.extend(common::perplexity_mismatch(
        &model,
        &tok,
        &json,
        MAX_PPL_REL,
        name,
    ));
    assert!(failures.is_empty(), "{name}:\n{}", failures.join("\n"));
}

#[test]
fn mixtral_matches_transformers() {
    check("mixtral-tiny", Architecture::Mixtral);
}

#[test]
fn qwen2_moe_with_shared_expert_matches_transformers() {
    check("qwen2moe-tiny", Architecture::Qwen2Moe);
}

#[test]
fn qwen3_moe_with_sparse_step_and_mlp_only_layers_matches_transformers() {
    check("qwen3moe-tiny", Architecture::Qwen3Moe);
}

#[test]
fn trained_qwen3_moe_matches_transformers() {
    check("qwen3moe-trained", Architecture::Qwen3Moe);
}

fn config(json: Value) -> flashpack::error::Result<flashpack::input::ModelConfig> {
    let raw: flashpack::input::config::RawConfig = serde_json::from_value(json).expect("raw");
    flashpack::input::ModelConfig::from_raw(&raw, std::path::Path::new("config.json"))
}

fn with(arch: &str, extra: Value) -> Value {
    let mut v = serde_json::json!({
        "architectures": [arch], "vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 6,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96
    });
    for (k, x) in extra.as_object().expect("object") {
        v[k] = x.clone();
    }
    v
}

#[test]
fn moe_configs_take_each_class_defaults() {
    // Mixtral: 8 experts, top-2, always renormalised, every layer sparse,
    // experts as wide as intermediate_size; eps 1e-5, theta 1e6.
    let m = config(with("MixtralForCausalLM", serde_json::json!({}))).expect("mixtral");
    let moe = m.moe.as_ref().expect("moe");
    assert_eq!((moe.num_experts, moe.top_k, moe.expert_width), (8, 2, 96));
    assert!(moe.norm_topk_prob && moe.shared_expert_width.is_none());
    assert_eq!(moe.sparse_layers, vec![true; 6]);
    assert_eq!((m.norm_eps, m.rope_theta), (1e-5, 1e6));
    assert!(!m.qkv_bias && !m.ext.qk_norm);
    // Mixtral's sliding window caps the context, as Mistral's does.
    let m = config(with(
        "MixtralForCausalLM",
        serde_json::json!({"max_position_embeddings": 256, "sliding_window": 64}),
    ))
    .expect("mixtral");
    assert_eq!(m.max_context, 64);

    // Qwen2-MoE: 60 experts, top-4, not renormalised, the shared expert of
    // 5632, biases on q/k/v from qkv_bias.
    let q2 = config(with("Qwen2MoeForCausalLM", serde_json::json!({}))).expect("qwen2moe");
    let moe = q2.moe.as_ref().expect("moe");
    assert_eq!(
        (moe.num_experts, moe.top_k, moe.expert_width),
        (60, 4, 1408)
    );
    assert_eq!(moe.shared_expert_width, Some(5632));
    assert!(!moe.norm_topk_prob && q2.qkv_bias && !q2.o_bias);
    let q2 = config(with(
        "Qwen2MoeForCausalLM",
        serde_json::json!({"qkv_bias": false, "layer_types": vec!["full_attention"; 6]}),
    ))
    .expect("qwen2moe");
    assert!(!q2.qkv_bias);

    // Qwen3-MoE: num_local_experts (what transformers 5 writes) or num_experts
    // (the Hub's configs); decoder_sparse_step and mlp_only_layers; head_dim
    // hidden / heads when absent (not Qwen3's 128); q/k norms.
    for key in ["num_experts", "num_local_experts"] {
        let q3 = config(with(
            "Qwen3MoeForCausalLM",
            serde_json::json!({key: 16, "num_experts_per_tok": 4, "moe_intermediate_size": 32,
                "norm_topk_prob": true, "decoder_sparse_step": 2, "mlp_only_layers": [3, 99]}),
        ))
        .expect("qwen3moe");
        let moe = q3.moe.as_ref().expect("moe");
        assert_eq!((moe.num_experts, moe.top_k, moe.expert_width), (16, 4, 32));
        assert!(moe.norm_topk_prob);
        assert_eq!(
            moe.sparse_layers,
            vec![false, true, false, false, false, true]
        );
        assert_eq!(q3.head_dim, 16);
        assert!(q3.ext.qk_norm);
    }
    let q3 = config(with("Qwen3MoeForCausalLM", serde_json::json!({}))).expect("qwen3moe");
    let moe = q3.moe.as_ref().expect("moe");
    assert_eq!(
        (moe.num_experts, moe.top_k, moe.expert_width),
        (128, 8, 768)
    );
    assert!(!moe.norm_topk_prob);
}

#[test]
fn moe_configs_that_cannot_run_are_refused_by_name() {
    let refused = [
        (
            "Qwen3MoeForCausalLM",
            serde_json::json!({"decoder_sparse_step": 0}),
            "decoder_sparse_step",
        ),
        (
            "Qwen3MoeForCausalLM",
            serde_json::json!({"num_experts": 4, "num_experts_per_tok": 5}),
            "num_experts_per_tok",
        ),
        (
            "MixtralForCausalLM",
            serde_json::json!({"num_local_experts": 0}),
            "num_experts",
        ),
        (
            "Qwen2MoeForCausalLM",
            serde_json::json!({"use_sliding_window": true, "sliding_window": 16}),
            "use_sliding_window",
        ),
        (
            "Qwen3MoeForCausalLM",
            serde_json::json!({"use_sliding_window": true, "sliding_window": 16}),
            "use_sliding_window",
        ),
        (
            "Qwen2MoeForCausalLM",
            serde_json::json!({"shared_expert_intermediate_size": 0}),
            "shared_expert_intermediate_size",
        ),
    ];
    for (arch, extra, needle) in refused {
        let err = config(with(arch, extra.clone())).expect_err(&format!("{arch} {extra}"));
        let msg = err.to_string();
        assert!(msg.contains(needle), "{arch} {extra}: {msg}");
    }
}

/// inspect shows the experts; run and eval work from the checkpoint (eval's
/// perplexity is transformers'); convert with calibration or block types
/// refuses what it cannot calibrate or quantize yet, writing nothing.
#[test]
fn cli_inspects_runs_and_evaluates_a_moe_checkpoint() {
    let (json, _) = common::reference("moe", "qwen2moe-tiny");
    let src = common::fixtures().join("models/qwen2moe-tiny");
    let src = src.to_str().expect("utf-8");
    let (code, info) = common::flashpack_json(&["inspect", src]);
    assert_eq!(code, 0, "{info}");
    let e = &info["experts"];
    assert_eq!(e["count"], 6, "{info}");
    assert_eq!(e["per_token"], 2);
    assert_eq!(e["expert_width"], 24);
    assert_eq!(e["shared_expert_width"], 40);
    assert_eq!(e["sparse_layers"], serde_json::json!([0, 2]));
    // 2 sparse layers of 2 experts of 24 and the shared 40, 1 dense of 64; 3 x 32 each.
    assert_eq!(e["params_ffn_active"], 3 * 32 * (2 * (2 * 24 + 40) + 64));
    assert_eq!(info["unused_tensors"], serde_json::json!([]));

    let text = common::fixtures().join("text/heldout.txt");
    let (code, out) =
        common::flashpack_json(&["eval", src, "--text", text.to_str().expect("utf-8")]);
    assert_eq!(code, 0, "{out}");
    let want = json["perplexity"]["perplexity"].as_f64().expect("ppl");
    let got = out["perplexity"].as_f64().expect("ppl");
    assert!((got - want).abs() / want <= MAX_PPL_REL, "{got} vs {want}");

    let (code, out) = common::flashpack_json(&["run", src, "-p", "KING HENRY.", "-n", "8"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(out["generated_tokens"], 8, "{out}");

    // Calibration of a mixture of experts records routing (spec 5.1):
    // convert --calib writes the counts, and no predictors.
    let dir = tempfile::tempdir().expect("tempdir");
    let packed = dir.path().join("x.flashpack");
    let train = common::fixtures().join("text/train.txt");
    let (code, out) = common::flashpack_json(&[
        "convert",
        src,
        "-o",
        packed.to_str().expect("utf-8"),
        "--calib",
        train.to_str().expect("utf-8"),
        "--calib-tokens",
        "512",
    ]);
    assert_eq!(code, 0, "{out}");
    let file = flashpack::format::PackedFile::open(&packed).expect("open");
    let routing = file.manifest.routing.as_ref().expect("routing");
    assert_eq!(routing.tokens, 512);
    let layers: Vec<u64> = routing.layers.iter().map(|l| l.layer).collect();
    assert_eq!(layers, vec![0, 2], "the sparse layers");
    assert!(file.manifest.predictors.is_empty());
    std::fs::remove_file(&packed).expect("remove");

    // Experts have no block types yet (spec 4.1): convert --quant refuses,
    // writing nothing.
    for quant in ["q8", "ffn=q4", "attn=q8"] {
        let (code, out) = common::flashpack_json(&[
            "convert",
            src,
            "-o",
            packed.to_str().expect("utf-8"),
            "--quant",
            quant,
        ]);
        assert_eq!(code, 2, "{quant}: {out}");
        let error = out["error"].as_str().expect("error");
        assert!(
            error.contains("mixture-of-experts") && error.contains("--quant"),
            "{quant}: {out}"
        );
        assert!(!packed.exists(), "{quant}");
    }
}

/// Spec 4.1: convert packs each expert as its own section of bundles, the
/// router and shared expert in the dense part; verify --against finds every
/// packed weight equal to the source and the logits equal; inspect shows the
/// expert sections; the packed file computed dense is transformers' model
/// (perplexity within 1e-5), and so is it with the experts read from the
/// file (`--ffn naive` and `flash`); `oracle-flash` refuses with exit 2.
#[test]
fn moe_checkpoints_pack_verify_and_evaluate_from_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = common::fixtures().join("text/heldout.txt");
    let text = text.to_str().expect("utf-8");
    for name in [
        "mixtral-tiny",
        "qwen2moe-tiny",
        "qwen3moe-tiny",
        "qwen3moe-trained",
    ] {
        let (json, ckpt) = common::reference("moe", name);
        let moe = ckpt.config.moe.clone().expect("moe");
        let src = common::fixtures().join("models").join(name);
        let src = src.to_str().expect("utf-8");
        let packed = dir.path().join(format!("{name}.flashpack"));
        let packed = packed.to_str().expect("utf-8");
        let (code, out) = common::flashpack_json(&["convert", src, "-o", packed]);
        assert_eq!(code, 0, "{name}: {out}");

        let file = flashpack::format::PackedFile::open(std::path::Path::new(packed)).expect("open");
        let m = &file.manifest;
        let sparse: Vec<usize> = (0..ckpt.config.num_layers)
            .filter(|&l| moe.sparse_layers[l])
            .collect();
        assert_eq!(m.experts.len(), sparse.len() * moe.num_experts, "{name}");
        let dense_layers: Vec<u64> = (0..ckpt.config.num_layers as u64)
            .filter(|&l| !moe.sparse_layers[l as usize])
            .collect();
        assert_eq!(
            m.ffn_layers.iter().map(|l| l.layer).collect::<Vec<_>>(),
            dense_layers,
            "{name}"
        );
        for e in &m.experts {
            let s = file.section(&e.section).expect("expert section");
            assert_eq!(
                e.section,
                format!("ffn.{}.expert.{}", e.layer, e.expert),
                "{name}"
            );
            assert_eq!(s.raw_length, e.neurons * e.bundle_bytes);
            assert_eq!(
                s.offset % m.alignment,
                0,
                "{name}: expert sections start aligned"
            );
            assert_eq!(e.neurons as usize, moe.expert_width);
        }
        // The router is resident: in the dense table, not in any bundle.
        let router = match ckpt.config.architecture {
            Architecture::Mixtral => {
                format!("model.layers.{}.block_sparse_moe.gate.weight", sparse[0])
            }
            _ => format!("model.layers.{}.mlp.gate.weight", sparse[0]),
        };
        assert!(file.tensor_entry(&router).is_some(), "{name}: {router}");
        if moe.shared_expert_width.is_some() {
            for t in ["shared_expert.up_proj.weight", "shared_expert_gate.weight"] {
                let t = format!("model.layers.{}.mlp.{t}", sparse[0]);
                assert!(file.tensor_entry(&t).is_some(), "{name}: {t}");
            }
        }

        let (code, out) = common::flashpack_json(&["verify", packed, "--against", src]);
        assert_eq!(code, 0, "{name}: verify {out}");
        assert_eq!(out["ok"], true, "{out}");
        assert_eq!(out["weights_mismatched"], 0, "{out}");
        assert!(out["weights_compared"].as_u64().expect("compared") > 0);

        let (code, info) = common::flashpack_json(&["inspect", packed]);
        assert_eq!(code, 0, "{info}");
        assert_eq!(info["expert_sections"], m.experts.len(), "{info}");
        assert_eq!(info["experts"]["count"], moe.num_experts, "{info}");
        assert_eq!(
            info["expert_bytes"],
            m.experts[0].neurons * m.experts[0].bundle_bytes,
            "{info}"
        );

        let (code, out) =
            common::flashpack_json(&["eval", packed, "--text", text, "--ffn", "dense"]);
        assert_eq!(code, 0, "{name}: {out}");
        let want = json["perplexity"]["perplexity"].as_f64().expect("ppl");
        let got = out["perplexity"].as_f64().expect("ppl");
        let rel = (got - want).abs() / want;
        println!(
            "{name}: packed dense perplexity {got:.6} vs transformers {want:.6} (rel {rel:.2e})"
        );
        assert!(rel <= MAX_PPL_REL, "{name}: {got} vs {want}");

        // The experts read from the file (tests/moe_flash.rs checks them bit
        // for bit against the packed model in DRAM).
        for mode in ["naive", "flash"] {
            let (code, out) =
                common::flashpack_json(&["eval", packed, "--text", text, "--ffn", mode]);
            assert_eq!(code, 0, "{name} {mode}: {out}");
            let from_disk = out["perplexity"].as_f64().expect("ppl");
            let rel = (from_disk - want).abs() / want;
            assert!(rel <= MAX_PPL_REL, "{name} {mode}: {from_disk} vs {want}");
            assert!(out["read_bytes"].as_u64().expect("read_bytes") > 0, "{out}");
        }
        let (code, out) =
            common::flashpack_json(&["eval", packed, "--text", text, "--ffn", "oracle-flash"]);
        assert_eq!(code, 2, "{name}: {out}");
        assert!(
            out["error"]
                .as_str()
                .expect("error")
                .contains("mixture-of-experts"),
            "{out}"
        );
    }
}
