//! The dense runtime against transformers' reference outputs in
//! `fixtures/reference/*.json`: final-position logit NMSE, greedy continuations,
//! held-out perplexity, and thread-count independence.
//!
//! `FLASHPACK_FIXTURES` overrides the fixtures directory (default `fixtures/`).

use std::path::PathBuf;

use flashpack::input::Checkpoint;
use flashpack::runtime::generate::{generate, GenerateOptions};
use flashpack::runtime::perplexity::perplexity;
use flashpack::runtime::sampling::SamplingParams;
use flashpack::runtime::{with_threads, Logits, Model};
use serde_json::Value;

/// Tolerances from the issues: NMSE of final logits, relative perplexity error,
/// and the top-2 margin under which a greedy step counts as a tie.
const MAX_NMSE: f64 = 1e-6;
const MAX_PPL_REL: f64 = 1e-3;
const TIE_MARGIN: f64 = 1e-3;

fn fixtures() -> PathBuf {
    match std::env::var_os("FLASHPACK_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures"),
    }
}

struct Reference {
    name: String,
    json: Value,
    ckpt: Checkpoint,
}

/// Every reference file with its checkpoint; fails when there are none.
fn references() -> Vec<Reference> {
    let dir = fixtures().join("reference");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no reference files in {}", dir.display());
    paths
        .into_iter()
        .map(|p| {
            let json: Value = serde_json::from_slice(&std::fs::read(&p).expect("read reference"))
                .expect("reference JSON");
            let model_dir = fixtures().join(json["model_dir"].as_str().expect("model_dir"));
            let ckpt = Checkpoint::open(&model_dir)
                .unwrap_or_else(|e| panic!("{}: {e}", model_dir.display()));
            Reference {
                name: json["model"].as_str().expect("model").to_string(),
                json,
                ckpt,
            }
        })
        .collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("id array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("float array")
        .iter()
        .map(|x| x.as_f64().expect("float"))
        .collect()
}

/// sum((x - r)^2) / sum(r^2), r the reference.
fn nmse(x: &[f32], r: &[f64]) -> f64 {
    assert_eq!(x.len(), r.len());
    let num: f64 = x.iter().zip(r).map(|(&a, &b)| (a as f64 - b).powi(2)).sum();
    let den: f64 = r.iter().map(|b| b * b).sum();
    num / den
}

#[test]
fn final_logits_and_greedy_continuations_match_transformers() {
    let mut failures = Vec::new();
    for r in references() {
        let model = Model::from_checkpoint(&r.ckpt).expect("load model");
        let tok = r.ckpt.tokenizer().expect("tokenizer");
        for (pi, p) in r.json["prompts"]
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
                "{} prompt {pi}: tokenization differs",
                r.name
            );
            let mut cache = model.new_cache();
            let logits = model
                .forward(&mut cache, &prompt, Logits::Last, None)
                .expect("forward");
            let e = nmse(&logits, &floats(&p["final_logits"]));
            println!(
                "{} prompt {pi} ({} ids): final-logit NMSE {e:.3e}",
                r.name,
                prompt.len()
            );
            if e.is_nan() || e >= MAX_NMSE {
                failures.push(format!("{} prompt {pi}: NMSE {e:.3e}", r.name));
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
            let tie = margins
                .iter()
                .position(|&m| m < TIE_MARGIN)
                .unwrap_or(want.len());
            let n = tie.min(want.len());
            let agree = got.generated_ids.len() >= n && got.generated_ids[..n] == want[..n];
            println!(
                "{} prompt {pi}: greedy agrees on the first {n} steps (first near tie at step {tie})",
                r.name
            );
            if !agree {
                failures.push(format!(
                    "{} prompt {pi}: greedy {:?} vs reference {:?} (compare {n} steps)",
                    r.name, got.generated_ids, want
                ));
            }
        }
    }
    assert!(failures.is_empty(), "mismatches:\n{}", failures.join("\n"));
}

#[test]
fn heldout_perplexity_matches_transformers() {
    let mut failures = Vec::new();
    for r in references() {
        let p = &r.json["perplexity"];
        let text_path = fixtures().join(p["text_file"].as_str().expect("text_file"));
        let text = std::fs::read_to_string(&text_path).expect("held-out text");
        let ctx = p["ctx"].as_u64().expect("ctx") as usize;
        let want = p["perplexity"].as_f64().expect("perplexity");
        let model = Model::from_checkpoint(&r.ckpt).expect("load model");
        let ids = r
            .ckpt
            .tokenizer()
            .expect("tokenizer")
            .encode(&text)
            .expect("encode");
        let got = perplexity(&model, &ids, ctx).expect("perplexity");
        let rel = (got.perplexity - want).abs() / want;
        println!(
            "{}: perplexity {:.4} vs transformers {want:.4} (rel {rel:.2e}; {} tokens, {:.2}s)",
            r.name, got.perplexity, got.tokens_scored, got.seconds
        );
        assert_eq!(
            got.tokens_scored as u64,
            p["tokens_scored"].as_u64().expect("tokens_scored"),
            "{}: tokens scored",
            r.name
        );
        if rel.is_nan() || rel >= MAX_PPL_REL {
            failures.push(format!("{}: rel error {rel:.2e}", r.name));
        }
    }
    assert!(
        failures.is_empty(),
        "perplexity off:\n{}",
        failures.join("\n")
    );
}

#[test]
fn logits_are_identical_for_one_and_two_threads() {
    for r in references() {
        let model = Model::from_checkpoint(&r.ckpt).expect("load model");
        let prompt = ids(&r.json["prompts"][0]["ids"]);
        let run = |threads| {
            with_threads(Some(threads), || {
                let mut cache = model.new_cache();
                // A prefill (GEMM path) and two decode steps (matvec path).
                let mut all = model
                    .forward(&mut cache, &prompt, Logits::All, None)
                    .expect("prefill");
                for t in [3u32, 5] {
                    all.extend(
                        model
                            .forward(&mut cache, &[t], Logits::Last, None)
                            .expect("decode"),
                    );
                }
                all
            })
            .expect("pool")
        };
        let (one, two) = (run(1), run(2));
        assert!(
            one.iter()
                .zip(&two)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{}: logits differ between 1 and 2 threads",
            r.name
        );
    }
}

#[test]
fn a_seed_reproduces_sampled_output() {
    let r = references().into_iter().next().expect("a reference");
    let model = Model::from_checkpoint(&r.ckpt).expect("load model");
    let prompt = ids(&r.json["prompts"][0]["ids"]);
    let sample = |seed| {
        let opts = GenerateOptions {
            max_new_tokens: 24,
            sampling: SamplingParams {
                temperature: 1.0,
                top_k: Some(50),
                top_p: Some(0.95),
                seed,
                ..SamplingParams::default()
            },
            stop_ids: Vec::new(),
            ..GenerateOptions::default()
        };
        generate(&model, &prompt, &opts, |_| Ok(()))
            .expect("generate")
            .generated_ids
    };
    let a = sample(7);
    assert_eq!(a, sample(7), "{}: same seed, different output", r.name);
    assert_ne!(
        a,
        sample(8),
        "{}: different seeds gave the same 24 tokens",
        r.name
    );
}

/// Counts FFN zeros per layer, as the fixture script's activation hook does.
struct ZeroCounter {
    zeros: Vec<usize>,
    total: Vec<usize>,
}

impl flashpack::runtime::Observer for ZeroCounter {
    fn ffn(&mut self, layer: usize, _input: &[f32], n: usize, fired: &flashpack::runtime::Fired) {
        let count: usize = fired.per_token.iter().map(Vec::len).sum();
        self.zeros[layer] += n * fired.width - count;
        self.total[layer] += n * fired.width;
    }
}

#[test]
fn fired_neurons_match_the_reference_sparsity() {
    let mut checked = 0;
    for r in references() {
        let Some(want) = r.json["ffn_zero_fraction_per_layer"]
            .as_array()
            .map(|_| floats(&r.json["ffn_zero_fraction_per_layer"]))
        else {
            continue;
        };
        let p = &r.json["perplexity"];
        let text = std::fs::read_to_string(fixtures().join(p["text_file"].as_str().expect("file")))
            .expect("held-out text");
        let ctx = p["ctx"].as_u64().expect("ctx") as usize;
        let model = Model::from_checkpoint(&r.ckpt).expect("load model");
        let ids = r
            .ckpt
            .tokenizer()
            .expect("tokenizer")
            .encode(&text)
            .expect("encode");
        let layers = model.layers.len();
        let mut counter = ZeroCounter {
            zeros: vec![0; layers],
            total: vec![0; layers],
        };
        flashpack::runtime::perplexity::perplexity_observed(&model, &ids, ctx, Some(&mut counter))
            .expect("perplexity");
        for (l, w) in want.iter().enumerate() {
            let got = counter.zeros[l] as f64 / counter.total[l] as f64;
            println!(
                "{} layer {l}: FFN zeros {got:.4} vs reference {w:.4}",
                r.name
            );
            // A neuron fires when act(gate) * up != 0; the reference counts
            // act(gate) == 0. They differ only where up is exactly 0 or where a
            // pre-activation within rounding of 0 flips sign.
            assert!((got - w).abs() < 2e-3, "{} layer {l}: {got} vs {w}", r.name);
        }
        checked += 1;
    }
    println!("checked the sparsity of {checked} ReLU models");
}

#[test]
fn ffn_restricted_to_its_fired_neurons_gives_the_same_output() {
    use flashpack::runtime::{ActiveSet, Fired};
    for r in references() {
        let model = Model::from_checkpoint(&r.ckpt).expect("load model");
        let ffn = &model.layers[0].ffn;
        let h = ffn.hidden_size();
        for n in [1usize, 3] {
            let x: Vec<f32> = (0..n * h)
                .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
                .collect();
            let mut dense = vec![0.0; n * h];
            let mut fired = Fired::default();
            ffn.forward(&x, n, ActiveSet::All, &mut dense, Some(&mut fired))
                .expect("dense");
            let mut sparse = vec![0.0; n * h];
            ffn.forward(
                &x,
                n,
                ActiveSet::PerToken(&fired.per_token),
                &mut sparse,
                None,
            )
            .expect("sparse");
            assert_eq!(dense, sparse, "{}: n={n}", r.name);
        }
    }
}

#[test]
fn generation_stops_at_an_eos_id() {
    let r = references().into_iter().next().expect("a reference");
    let model = Model::from_checkpoint(&r.ckpt).expect("load model");
    let prompt = ids(&r.json["prompts"][0]["ids"]);
    let want = ids(&r.json["prompts"][0]["greedy_ids"]);
    // Declare the third greedy token an EOS: generation must end right after it.
    let opts = GenerateOptions {
        max_new_tokens: 32,
        sampling: SamplingParams::default(),
        stop_ids: vec![want[2]],
        ..GenerateOptions::default()
    };
    let got = generate(&model, &prompt, &opts, |_| Ok(())).expect("generate");
    let first = want.iter().position(|&t| t == want[2]).expect("present");
    assert_eq!(got.generated_ids, want[..=first], "{}", r.name);
    assert_eq!(
        got.stop_reason,
        flashpack::runtime::generate::StopReason::Eos
    );
}

#[test]
fn streamed_text_equals_the_decoded_text_with_multibyte_characters() {
    use flashpack::runtime::generate::TextStream;
    let r = references().into_iter().next().expect("a reference");
    let tok = r.ckpt.tokenizer().expect("tokenizer");
    let prompt = tok.encode("Café").expect("encode");
    let all = tok
        .encode("Café — naïve “quotes”, ✓ 日本語 and 🙂 too")
        .expect("encode");
    // The continuation: whatever follows the prompt's ids in the longer text.
    let rest = &all[prompt.len()..];
    let mut stream = TextStream::new(&tok, &prompt).expect("stream");
    let mut streamed = String::new();
    for &id in rest {
        let piece = stream.push(id).expect("push");
        assert!(
            !piece.contains('\u{FFFD}'),
            "printed a partial character: {piece:?}"
        );
        streamed.push_str(&piece);
    }
    streamed.push_str(&stream.finish().expect("finish"));
    let whole = tok.decode(&all).expect("decode");
    let head = tok.decode(&prompt).expect("decode");
    assert_eq!(format!("{head}{streamed}"), whole);
}
