//! The runtime reading packed files: a model loaded from a flashpack file (all
//! bundles in DRAM) gives the checkpoint's logits and greedy continuations, and
//! the CLI's run and eval accept packed files.

mod common;
use common::{fixtures, nmse};

use std::path::PathBuf;

use flashpack::pack::{convert, ConvertOptions};
use flashpack::runtime::{open_model, KvCache, Logits, ModelSource};

/// Greedy continuation of `prompt` for `steps` tokens.
fn greedy(model: &flashpack::runtime::Model, prompt: &[u32], steps: usize) -> Vec<u32> {
    let mut cache: KvCache = model.new_cache();
    let mut logits = model
        .forward(&mut cache, prompt, Logits::Last, None)
        .unwrap();
    let mut out = Vec::new();
    for _ in 0..steps {
        let next = flashpack::runtime::sampling::argmax(&logits);
        out.push(next);
        logits = model
            .forward(&mut cache, &[next], Logits::Last, None)
            .unwrap();
    }
    out
}

#[test]
fn packed_models_match_their_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let mut models: Vec<PathBuf> = std::fs::read_dir(fixtures().join("models"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    models.sort();
    let prompts = [
        "",
        "To be, or not to be",
        "KING HENRY.\nOnce more unto the breach, dear friends, once more;",
    ];
    for dir in models {
        let out = tmp.path().join("m.flashpack");
        convert(
            &dir,
            &out,
            &ConvertOptions::default(),
            flashpack::progress::SILENT,
        )
        .unwrap();
        let source = open_model(&dir).unwrap();
        let packed = open_model(&out).unwrap();
        assert_eq!(packed.source, ModelSource::Packed);
        for text in prompts {
            let ids = source.tokenizer.encode(text).unwrap();
            assert_eq!(
                packed.tokenizer.encode(text).unwrap(),
                ids,
                "{}: tokenizer",
                dir.display()
            );
            let a = source
                .model
                .forward(&mut source.model.new_cache(), &ids, Logits::Last, None)
                .unwrap();
            let b = packed
                .model
                .forward(&mut packed.model.new_cache(), &ids, Logits::Last, None)
                .unwrap();
            let e = nmse(&b, &a);
            println!(
                "{}: prompt {:?}: logit NMSE {e:.3e}",
                dir.file_name().unwrap().to_string_lossy(),
                text
            );
            assert!(e < 1e-10, "{}: NMSE {e}", dir.display());
            assert_eq!(
                greedy(&packed.model, &ids, 16),
                greedy(&source.model, &ids, 16),
                "{}",
                dir.display()
            );
        }
        assert_eq!(packed.tokenizer.special, source.tokenizer.special);
    }
}

#[test]
fn run_and_eval_accept_a_packed_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixtures().join("models/opt-relu");
    let out = tmp.path().join("m.flashpack");
    convert(
        &dir,
        &out,
        &ConvertOptions::default(),
        flashpack::progress::SILENT,
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_flashpack");
    let json = |args: &[&str]| -> serde_json::Value {
        let o = std::process::Command::new(bin)
            .args(args)
            .arg("--json")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let prompt = ["--prompt", "To be, or not to be", "--max-new-tokens", "12"];
    let from_dir = json(&[&["run", dir.to_str().unwrap()][..], &prompt[..]].concat());
    let from_pack = json(&[&["run", out.to_str().unwrap()][..], &prompt[..]].concat());
    assert_eq!(from_dir["generated_ids"], from_pack["generated_ids"]);
    let text = fixtures().join("text/heldout.txt");
    let eval_dir = json(&[
        "eval",
        dir.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
    ]);
    let eval_pack = json(&[
        "eval",
        out.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
    ]);
    assert_eq!(eval_dir["tokens_scored"], eval_pack["tokens_scored"]);
    let (a, b) = (
        eval_dir["perplexity"].as_f64().unwrap(),
        eval_pack["perplexity"].as_f64().unwrap(),
    );
    assert!((a - b).abs() / a < 1e-9, "{a} vs {b}");
}
