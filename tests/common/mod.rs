//! Helpers shared by the integration tests (each test binary includes this
//! module with `mod common;` and uses what it needs).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The committed fixtures: checkpoints by transformers, their references, texts.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Normalised mean squared error of `x` against the reference `r`:
/// sum((x - r)^2) / sum(r^2), in f64.
pub fn nmse(x: &[f32], r: &[f32]) -> f64 {
    assert_eq!(x.len(), r.len(), "nmse of vectors of different lengths");
    let num: f64 = x
        .iter()
        .zip(r)
        .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
        .sum();
    let den: f64 = r.iter().map(|&b| (b as f64).powi(2)).sum();
    num / den
}

/// A copy of the micro fixture whose context is a million positions: greedy
/// generation from it does not reach its end-of-sequence token, so a run with a
/// large token limit goes on for minutes (attention grows with every token),
/// long enough to interrupt it or to send other requests meanwhile.
pub fn endless_model() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("models/micro-llama");
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    let config_path = dir.path().join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    config["max_position_embeddings"] = 1_000_000.into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    dir
}

/// The top-2 margin under which a reference's greedy step counts as a near tie
/// (the runtime may then pick either token): greedy ids are compared up to the
/// first such step.
pub const TIE_MARGIN: f64 = 1e-3;

/// A transformers reference `fixtures/reference/<group>/<name>.json` and the
/// checkpoint it was computed from.
pub fn reference(group: &str, name: &str) -> (serde_json::Value, flashpack::input::Checkpoint) {
    let path = fixtures()
        .join("reference")
        .join(group)
        .join(format!("{name}.json"));
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("reference")).expect("reference JSON");
    let dir = fixtures().join(json["model_dir"].as_str().expect("model_dir"));
    let ckpt = flashpack::input::Checkpoint::open(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    (json, ckpt)
}

/// A JSON array of token ids.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// A JSON array of numbers.
pub fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .expect("floats")
        .iter()
        .map(|x| x.as_f64().expect("float"))
        .collect()
}

/// [`nmse`] against a reference kept in f64.
pub fn nmse_f64(x: &[f32], r: &[f64]) -> f64 {
    assert_eq!(x.len(), r.len());
    let num: f64 = x.iter().zip(r).map(|(&a, &b)| (a as f64 - b).powi(2)).sum();
    num / r.iter().map(|b| b * b).sum::<f64>()
}

/// Greedy generation from `prompt` against a reference prompt entry's
/// `greedy_ids`, compared up to its first near tie: `None` when equal, else
/// what differs.
pub fn greedy_mismatch(
    model: &flashpack::runtime::Model,
    prompt: &[u32],
    p: &serde_json::Value,
    label: &str,
) -> Option<String> {
    use flashpack::runtime::generate::{generate, GenerateOptions};
    let want = ids(&p["greedy_ids"]);
    let margins = floats(&p["greedy_top2_margins"]);
    let opts = GenerateOptions {
        max_new_tokens: want.len(),
        ..GenerateOptions::default()
    };
    let got = generate(model, prompt, &opts, |_| Ok(())).expect("generate");
    let n = margins
        .iter()
        .position(|&m| m < TIE_MARGIN)
        .unwrap_or(want.len());
    println!("{label}: greedy compared on {n} of {} steps", want.len());
    (got.generated_ids.len() < n || got.generated_ids[..n] != want[..n]).then(|| {
        format!(
            "{label}: greedy {:?} vs {:?} ({n} steps)",
            got.generated_ids, want
        )
    })
}

/// Perplexity of the reference's text (its `perplexity` entry: file, window,
/// tokens scored, value) against transformers': the token count must be equal;
/// `None` when the relative error is at most `max_rel`, else the error.
pub fn perplexity_mismatch(
    model: &flashpack::runtime::Model,
    tokenizer: &flashpack::input::TextTokenizer,
    reference: &serde_json::Value,
    max_rel: f64,
    label: &str,
) -> Option<String> {
    let p = &reference["perplexity"];
    let text = std::fs::read_to_string(fixtures().join(p["text_file"].as_str().expect("file")))
        .expect("text");
    let ctx = p["ctx"].as_u64().expect("ctx") as usize;
    let ids = tokenizer.encode(&text).expect("encode");
    let got = flashpack::runtime::perplexity::perplexity(model, &ids, ctx).expect("perplexity");
    let want = p["perplexity"].as_f64().expect("perplexity");
    let rel = (got.perplexity - want).abs() / want;
    println!(
        "{label}: perplexity {:.6} vs {want:.6} (rel {rel:.2e}, {} tokens)",
        got.perplexity, got.tokens_scored
    );
    assert_eq!(
        got.tokens_scored as u64,
        p["tokens_scored"].as_u64().expect("tokens"),
        "{label}"
    );
    (rel.is_nan() || rel > max_rel).then(|| format!("{label}: perplexity rel error {rel:.2e}"))
}

/// `flashpack ARGS... --json`: the exit code and the one JSON object on stdout
/// (a panic on stderr fails the test).
pub fn flashpack_json(args: &[&str]) -> (i32, serde_json::Value) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flashpack"))
        .args(args)
        .arg("--json")
        .output()
        .expect("run flashpack");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{args:?}: stdout is not JSON ({e}): {}\n{stderr}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    (out.status.code().expect("exit code"), json)
}

/// Checks `fixtures/reference/<group>/<name>.json` against the model flashpack
/// loads from its checkpoint, which must be of `arch`: every prompt's
/// tokenization and final logits (NMSE at most `max_nmse`), its greedy ids up
/// to the first near tie, and the held-out perplexity (relative error at most
/// `max_ppl_rel`); panics listing every failure. Returns the checkpoint.
pub fn matches_transformers(
    group: &str,
    name: &str,
    arch: flashpack::input::config::Architecture,
    max_nmse: f64,
    max_ppl_rel: f64,
) -> flashpack::input::Checkpoint {
    use flashpack::runtime::{Logits, Model};
    let (json, ckpt) = reference(group, name);
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
        let e = nmse_f64(&logits, &floats(&p["final_logits"]));
        println!("{name} prompt {pi} ({} ids): NMSE {e:.3e}", prompt.len());
        if e.is_nan() || e > max_nmse {
            failures.push(format!("prompt {pi}: NMSE {e:.3e}"));
        }
        failures.extend(greedy_mismatch(
            &model,
            &prompt,
            p,
            &format!("{name} prompt {pi}"),
        ));
    }
    failures.extend(perplexity_mismatch(&model, &tok, &json, max_ppl_rel, name));
    assert!(failures.is_empty(), "{name}:\n{}", failures.join("\n"));
    ckpt
}

/// Logits of `ids[..prefill]` computed as one batch, then of each later id
/// as a single decode step: the prefill and the decode paths in one vector.
pub fn prefill_then_decode(
    model: &flashpack::runtime::Model,
    ids: &[u32],
    prefill: usize,
) -> Vec<f32> {
    use flashpack::runtime::Logits;
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
