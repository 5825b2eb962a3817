//! Reading the Hugging Face fixture checkpoints: tensors, shapes, dtypes, values of
//! cast and sharded variants, and tokenization against transformers' reference ids.

use std::path::{Path, PathBuf};

use flashpack::dtype::DType;
use flashpack::input::config::{Activation, Architecture};
use flashpack::input::Checkpoint;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn model(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

/// Every reference file transformers wrote, with its parsed JSON.
fn references() -> Vec<(String, serde_json::Value)> {
    let mut refs: Vec<_> = std::fs::read_dir(fixtures().join("reference"))
        .expect("fixtures/reference exists")
        .map(|e| e.expect("readable dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("readable reference");
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            (name, serde_json::from_str(&text).expect("reference parses"))
        })
        .collect();
    refs.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(
        !refs.is_empty(),
        "no reference outputs in fixtures/reference"
    );
    refs
}

#[test]
fn every_fixture_opens_with_the_shapes_config_implies() {
    for (name, reference) in references() {
        let dir = fixtures().join(reference["model_dir"].as_str().expect("model_dir"));
        let ckpt = Checkpoint::open(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            ckpt.config.architecture.hf_name(),
            reference["architecture"].as_str().unwrap(),
            "{name}"
        );
        for spec in ckpt.names.specs() {
            let t = ckpt.tensor(&spec.name).unwrap();
            assert_eq!(t.shape, spec.shape.as_slice(), "{name}: {}", spec.name);
            assert_eq!(
                t.bytes.len(),
                t.numel() * t.dtype.size_bytes(),
                "{name}: {}",
                spec.name
            );
        }
    }
}

#[test]
fn reference_prompts_tokenize_to_transformers_ids() {
    for (name, reference) in references() {
        let dir = fixtures().join(reference["model_dir"].as_str().unwrap());
        let ckpt = Checkpoint::open(&dir).unwrap();
        let tokenizer = ckpt.tokenizer().unwrap();
        let prompts = reference["prompts"].as_array().expect("prompts");
        assert!(prompts.len() >= 2, "{name}: too few prompts");
        for prompt in prompts {
            let text = prompt["text"].as_str().unwrap();
            let expected: Vec<u32> = prompt["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let ids = tokenizer.encode(text).unwrap();
            assert_eq!(ids, expected, "{name}: prompt {text:?}");
            assert_eq!(Some(ids[0]), tokenizer.special.bos, "{name}: BOS first");
        }
    }
}

#[test]
fn heldout_text_tokenizes_to_the_length_transformers_scored() {
    // tokens_scored = sum over windows of (window length - 1), windows of 1 id dropped;
    // the id count is recovered from it and must match our tokenization.
    let (name, reference) = references().into_iter().next().unwrap();
    let ppl = &reference["perplexity"];
    let ctx = ppl["ctx"].as_u64().unwrap() as usize;
    let scored = ppl["tokens_scored"].as_u64().unwrap() as usize;
    let dir = fixtures().join(reference["model_dir"].as_str().unwrap());
    let text =
        std::fs::read_to_string(fixtures().join(ppl["text_file"].as_str().unwrap())).unwrap();
    let ids = Checkpoint::open(&dir)
        .unwrap()
        .tokenizer()
        .unwrap()
        .encode(&text)
        .unwrap();
    let ours: usize = ids
        .chunks(ctx)
        .filter(|w| w.len() >= 2)
        .map(|w| w.len() - 1)
        .sum();
    assert_eq!(ours, scored, "{name}: {} ids", ids.len());
}

/// Round-to-nearest-even narrowing, as torch's `.to(dtype)` does.
fn narrow(values: &[f32], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F32 => values.to_vec(),
        DType::F16 => values
            .iter()
            .map(|&v| half::f16::from_f32(v).to_f32())
            .collect(),
        DType::BF16 => values
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_f32())
            .collect(),
    }
}

/// A variant saved in another dtype must hold exactly the f32 weights, narrowed.
fn assert_cast_variant(base: &str, variant: &str, dtype: DType, sharded: bool) {
    let (b, v) = (model(base), model(variant));
    if !v.exists() {
        panic!("fixture {variant} is missing");
    }
    let base = Checkpoint::open(&b).unwrap();
    let variant = Checkpoint::open(&v).unwrap();
    assert_eq!(base.config, Checkpoint::open(&b).unwrap().config);
    assert_eq!(variant.weights.index.is_some(), sharded);
    if sharded {
        assert!(
            variant.weights.file_names().count() >= 2,
            "a sharded fixture has several shards"
        );
    }
    for spec in variant.names.specs() {
        let tv = variant.tensor(&spec.name).unwrap();
        assert_eq!(tv.dtype, dtype, "{}", spec.name);
        let expected = narrow(&base.tensor(&spec.name).unwrap().to_f32(), dtype);
        assert_eq!(
            tv.to_f32(),
            expected,
            "{} differs from the narrowed f32 weights",
            spec.name
        );
    }
}

#[test]
fn bf16_sharded_variant_holds_the_f32_weights_rounded() {
    assert_cast_variant(
        "llama-relu-gqa",
        "llama-relu-gqa-bf16-sharded",
        DType::BF16,
        true,
    );
}

#[test]
fn f16_variant_holds_the_f32_weights_rounded() {
    assert_cast_variant("opt-relu", "opt-relu-f16", DType::F16, false);
}

#[test]
fn configs_are_read_as_transformers_reads_them() {
    let opt = Checkpoint::open(&model("opt-postln-proj")).unwrap().config;
    let o = opt.opt.unwrap();
    assert!(!o.do_layer_norm_before && !o.has_final_layer_norm);
    assert_ne!(o.word_embed_proj_dim, opt.hidden_size);

    let gqa = Checkpoint::open(&model("llama-relu-gqa")).unwrap().config;
    assert_eq!(gqa.activation, Activation::Relu);
    assert!(gqa.num_kv_heads < gqa.num_heads);

    let qwen = Checkpoint::open(&model("qwen2-silu")).unwrap().config;
    assert_eq!(qwen.architecture, Architecture::Qwen2);
    assert!(qwen.qkv_bias && !qwen.o_bias);

    let llama3 = Checkpoint::open(&model("llama-rope-llama3"))
        .unwrap()
        .config;
    assert!(matches!(
        llama3.rope_scaling,
        Some(flashpack::input::config::RopeScaling::Llama3 { .. })
    ));
    assert_eq!(llama3.rope_theta, 500000.0);
}

#[test]
fn generation_config_eos_list_is_read_whole() {
    let dir = model("llama-silu");
    let raw: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("generation_config.json")).unwrap())
            .unwrap();
    let expected: Vec<u32> = match &raw["eos_token_id"] {
        serde_json::Value::Array(ids) => ids.iter().map(|v| v.as_u64().unwrap() as u32).collect(),
        other => panic!("fixture should have an EOS list, has {other}"),
    };
    assert!(expected.len() >= 2);
    let tokenizer = Checkpoint::open(&dir).unwrap().tokenizer().unwrap();
    assert_eq!(tokenizer.special.eos, expected);
}
