//! Property: for random small checkpoints (OPT or Llama family, random options,
//! stored dtypes and convert options), write-then-read returns what was written:
//! the packed file passes every rule and hash, and every tensor read back equals
//! the source narrowed to the packed dtype. Fixed seed and case count.

use std::path::Path;

use flashpack::dtype::DType;
use flashpack::format::integrity::check_integrity;
use flashpack::format::PackedFile;
use flashpack::input::config::{ModelConfig, RawConfig};
use flashpack::input::ModelNames;
use flashpack::pack::{convert, ConvertOptions, TargetDType};
use flashpack::runtime::packed::PackedWeights;
use flashpack::runtime::weights::TensorSource;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use serde_json::json;

#[derive(Debug, Clone)]
struct Case {
    llama: bool,
    hidden_heads: (usize, usize),
    kv_divisor: usize,
    layers: usize,
    ffn: usize,
    flags: [bool; 3],
    stored: u8,
    target: u8,
    align_shift: u32,
    zstd: i32,
    seed: u64,
}

fn case() -> impl Strategy<Value = Case> {
    (
        any::<bool>(),
        prop::sample::select(vec![(8usize, 2usize), (16, 4), (32, 4), (24, 2)]),
        prop::sample::select(vec![1usize, 2]),
        1usize..4,
        prop::sample::select(vec![4usize, 12, 40, 96]),
        any::<[bool; 3]>(),
        0u8..3,
        0u8..4,
        9u32..15,
        prop::sample::select(vec![0i32, 1, 3]),
        any::<u64>(),
    )
        .prop_map(
            |(
                llama,
                hidden_heads,
                kv_divisor,
                layers,
                ffn,
                flags,
                stored,
                target,
                align_shift,
                zstd,
                seed,
            )| Case {
                llama,
                hidden_heads,
                kv_divisor,
                layers,
                ffn,
                flags,
                stored,
                target,
                align_shift,
                zstd,
                seed,
            },
        )
}

fn dtype(i: u8) -> DType {
    [DType::F32, DType::F16, DType::BF16][i as usize % 3]
}

fn config_json(c: &Case) -> serde_json::Value {
    let (hidden, heads) = c.hidden_heads;
    let [a, b, tie] = c.flags;
    if c.llama {
        json!({"architectures": ["LlamaForCausalLM"], "vocab_size": 2048, "hidden_size": hidden,
               "intermediate_size": c.ffn, "num_hidden_layers": c.layers, "num_attention_heads": heads,
               "num_key_value_heads": heads / c.kv_divisor, "max_position_embeddings": 32,
               "hidden_act": if a { "relu" } else { "silu" }, "attention_bias": b, "mlp_bias": a,
               "tie_word_embeddings": tie})
    } else {
        json!({"architectures": ["OPTForCausalLM"], "vocab_size": 2048, "hidden_size": hidden,
               "ffn_dim": c.ffn, "num_hidden_layers": c.layers, "num_attention_heads": heads,
               "max_position_embeddings": 32, "do_layer_norm_before": a, "enable_bias": b,
               "word_embed_proj_dim": if tie { hidden } else { hidden / 2 }})
    }
}

/// Deterministic pseudo-random floats (xorshift), some of them exact zeros.
fn values(seed: &mut u64, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            if seed.is_multiple_of(11) {
                0.0
            } else {
                ((*seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.0
            }
        })
        .collect()
}

fn encode(values: &[f32], d: DType) -> Vec<u8> {
    match d {
        DType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F16 => values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
        DType::BF16 => values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect(),
    }
}

fn narrow(v: f32, d: DType) -> f32 {
    match d {
        DType::F32 => v,
        DType::F16 => half::f16::from_f32(v).to_f32(),
        DType::BF16 => half::bf16::from_f32(v).to_f32(),
    }
}

/// A tensor written to the checkpoint: name, shape, values.
type Written = (String, Vec<usize>, Vec<f32>);

fn write_checkpoint(dir: &Path, c: &Case) -> (ModelConfig, Vec<Written>) {
    let cfg_json = config_json(c);
    std::fs::write(dir.join("config.json"), cfg_json.to_string()).unwrap();
    let fixture_tok =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/models/opt-relu/tokenizer.json");
    std::fs::copy(fixture_tok, dir.join("tokenizer.json")).unwrap();
    let raw: RawConfig = serde_json::from_value(cfg_json).unwrap();
    let cfg = ModelConfig::from_raw(&raw, Path::new("config.json")).unwrap();
    let stored = dtype(c.stored);
    let mut seed = c.seed | 1;
    let tensors: Vec<Written> = ModelNames::for_config(&cfg)
        .specs()
        .into_iter()
        .map(|s| {
            let n = s.shape.iter().product();
            // What the checkpoint really holds: values representable in its dtype.
            let v: Vec<f32> = values(&mut seed, n)
                .into_iter()
                .map(|x| narrow(x, stored))
                .collect();
            (s.name, s.shape, v)
        })
        .collect();
    let st_dtype = match stored {
        DType::F32 => safetensors::Dtype::F32,
        DType::F16 => safetensors::Dtype::F16,
        DType::BF16 => safetensors::Dtype::BF16,
    };
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, v)| (n.clone(), s.clone(), encode(v, stored)))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(st_dtype, s.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(
        dir.join("model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    (cfg, tensors)
}

proptest! {
    #![proptest_config(Config { cases: 24, rng_seed: RngSeed::Fixed(0x5eed_f1a5), failure_persistence: None, ..Config::default() })]

    #[test]
    fn write_then_read_returns_what_was_written(c in case()) {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("ckpt");
        std::fs::create_dir(&src).unwrap();
        let (cfg, tensors) = write_checkpoint(&src, &c);
        let target = match c.target { 0 => TargetDType::Keep, t => TargetDType::To(dtype(t - 1)) };
        let options = ConvertOptions { dtype: target, zstd_level: c.zstd, alignment: 1 << c.align_shift, calibration: None, quant: Default::default(), selector: flashpack::pack::convert::SelectorCopies::Auto };
        let out = tmp.path().join("m.flashpack");
        convert(&src, &out, &options, flashpack::progress::SILENT).unwrap();

        let file = PackedFile::open(&out).unwrap();
        prop_assert_eq!(&file.config, &cfg);
        prop_assert!(check_integrity(&file).unwrap().failures.is_empty());
        let weights = PackedWeights::read_all(&file).unwrap();
        let packed_dtype = match target { TargetDType::Keep => dtype(c.stored), TargetDType::To(d) => d };
        for (name, shape, v) in &tensors {
            let got = weights.tensor(name, shape).unwrap();
            prop_assert_eq!(got.dtype(), packed_dtype, "{}", name);
            let expected: Vec<f32> = v.iter().map(|&x| narrow(x, packed_dtype)).collect();
            prop_assert_eq!(got.to_f32(), expected, "{}", name);
        }
    }
}
