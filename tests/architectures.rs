//! Qwen3, Phi-3 (fused projections, longrope, partial rotary), Gemma-2 and
//! Gemma-3 (GeGLU, (1 + w) norms, sandwich norms, scaled embeddings, soft-caps,
//! q/k norms, local and global RoPE, true sliding-window layers) against
//! transformers' references in `fixtures/reference/arch/*.json`
//! (`fixtures/make_fixtures_arch.py`): final-position logits of five prompts
//! (2 to 300 ids; Gemma's window is 16), greedy continuations with the KV cache
//! (32 steps, past every window), and held-out perplexity in 256-token windows.

use std::path::PathBuf;

use flashpack::input::config::Architecture;
use flashpack::input::Checkpoint;
use flashpack::runtime::generate::{generate, GenerateOptions};
use flashpack::runtime::perplexity::perplexity;
use flashpack::runtime::sampling::SamplingParams;
use flashpack::runtime::{Logits, Model};
use serde_json::Value;

/// Issue 18's bars: logit NMSE, relative perplexity error; and the top-2
/// margin under which a greedy step counts as a near tie (as
/// tests/runtime_reference.rs).
const MAX_NMSE: f64 = 1e-6;
const MAX_PPL_REL: f64 = 1e-5;
const TIE_MARGIN: f64 = 1e-3;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn reference(name: &str) -> (Value, Checkpoint) {
    let path = fixtures()
        .join("reference/arch")
        .join(format!("{name}.json"));
    let json: Value =
        serde_json::from_slice(&std::fs::read(&path).expect("reference")).expect("reference JSON");
    let dir = fixtures().join(json["model_dir"].as_str().expect("model_dir"));
    let ckpt = Checkpoint::open(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    (json, ckpt)
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("floats")
        .iter()
        .map(|x| x.as_f64().expect("float"))
        .collect()
}

fn nmse(x: &[f32], r: &[f64]) -> f64 {
    assert_eq!(x.len(), r.len());
    let num: f64 = x.iter().zip(r).map(|(&a, &b)| (a as f64 - b).powi(2)).sum();
    num / r.iter().map(|b| b * b).sum::<f64>()
}

/// Logits, greedy ids and perplexity of one family against its reference.
fn check(name: &str, arch: Architecture) {
    let (json, ckpt) = reference(name);
    assert_eq!(ckpt.config.architecture, arch);
    assert_eq!(json["architecture"].as_str(), Some(arch.hf_name()));
    let model = Model::from_checkpoint(&ckpt).expect("load");
    let tok = ckpt.tokenizer().expect("tokenizer");
    let mut failures = Vec::new();
    for (pi, p) in json["prompts"]
        .as_array()
        .expect("prompts")
        .iter()
        .enumerate()
    {
        let prompt = ids(&p["ids"]);
        assert_eq!(
            tok.encode(p["text"].as_str().expect("text"))
                .expect("encode"),
            prompt,
            "{name} prompt {pi}: tokenization"
        );
        let logits = model
            .forward(&mut model.new_cache(), &prompt, Logits::Last, None)
            .expect("forward");
        let e = nmse(&logits, &floats(&p["final_logits"]));
        println!("{name} prompt {pi} ({} ids): NMSE {e:.3e}", prompt.len());
        if e.is_nan() || e > MAX_NMSE {
            failures.push(format!("prompt {pi}: NMSE {e:.3e}"));
        }
        let want = ids(&p["greedy_ids"]);
        let margins = floats(&p["greedy_top2_margins"]);
        let opts = GenerateOptions {
            max_new_tokens: want.len(),
            sampling: SamplingParams::default(),
            stop_ids: Vec::new(),
            ..GenerateOptions::default()
        };
        let got = generate(&model, &prompt, &opts, |_| Ok(())).expect("generate");
        let n = margins
            .iter()
            .position(|&m| m < TIE_MARGIN)
            .unwrap_or(want.len());
        println!(
            "{name} prompt {pi}: greedy compared on {n} of {} steps",
            want.len()
        );
        if got.generated_ids.len() < n || got.generated_ids[..n] != want[..n] {
            failures.push(format!(
                "prompt {pi}: greedy {:?} vs {:?} ({n} steps)",
                got.generated_ids, want
            ));
        }
    }
    let p = &json["perplexity"];
    let text = std::fs::read_to_string(fixtures().join(p["text_file"].as_str().expect("file")))
        .expect("text");
    let ctx = p["ctx"].as_u64().expect("ctx") as usize;
    let got = perplexity(&model, &tok.encode(&text).expect("encode"), ctx).expect("perplexity");
    let want = p["perplexity"].as_f64().expect("perplexity");
    let rel = (got.perplexity - want).abs() / want;
    println!(
        "{name}: perplexity {:.6} vs {want:.6} (rel {rel:.2e}, {} tokens)",
        got.perplexity, got.tokens_scored
    );
    assert_eq!(
        got.tokens_scored as u64,
        p["tokens_scored"].as_u64().expect("tokens")
    );
    if rel.is_nan() || rel > MAX_PPL_REL {
        failures.push(format!("perplexity rel error {rel:.2e}"));
    }
    assert!(failures.is_empty(), "{name}:\n{}", failures.join("\n"));
}

#[test]
fn qwen3_matches_transformers() {
    check("qwen3-tiny", Architecture::Qwen3);
}

#[test]
fn phi3_longrope_matches_transformers() {
    check("phi3-longrope", Architecture::Phi3);
}

#[test]
fn gemma2_matches_transformers() {
    check("gemma2-tiny", Architecture::Gemma2);
}

#[test]
fn gemma3_matches_transformers() {
    check("gemma3-tiny", Architecture::Gemma3);
}
