//! Measurements for `flashpack bench`: prefill and decode speed of a model, a
//! streaming memory-read bandwidth to compare decode's weight traffic with, and
//! a random-weight model of a realistic size (no download needed).

use std::time::Instant;

use rayon::prelude::*;

use crate::error::Result;
use crate::input::config::{ModelConfig, RawConfig};
use crate::input::ModelNames;
use crate::runtime::model::{Logits, Model};
use crate::runtime::weights::{Storage, TensorSource};

/// Speed of one model on the current rayon pool.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SpeedResult {
    pub prefill_tokens: usize,
    pub prefill_ms: f64,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens: usize,
    pub decode_ms: f64,
    pub decode_tokens_per_s: f64,
    /// Weight bytes one decode step reads.
    pub decode_weight_bytes: usize,
    /// `decode_weight_bytes * decode_tokens_per_s`, GB/s (1e9 bytes).
    pub decode_weight_gb_per_s: f64,
}

/// Runs a prefill of `prefill` tokens, then `reps` rounds of `decode`
/// single-token steps, keeping the fastest round (on a shared machine the best
/// round is the one least disturbed by other processes).
pub fn measure_speed(
    model: &Model,
    prefill: usize,
    decode: usize,
    reps: usize,
) -> Result<SpeedResult> {
    let vocab = model.config.vocab_size as u32;
    // Deterministic, spread-out token ids.
    let ids: Vec<u32> = (0..prefill as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) % vocab)
        .collect();
    let mut cache = model.new_cache();
    let t0 = Instant::now();
    model.forward(&mut cache, &ids, Logits::Last, None)?;
    let prefill_ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut decode_ms = f64::INFINITY;
    for _ in 0..reps.max(1) {
        if cache.len + decode > model.config.max_context {
            cache.clear();
        }
        let t1 = Instant::now();
        for i in 0..decode as u32 {
            model.forward(&mut cache, &[(i * 7919) % vocab], Logits::Last, None)?;
        }
        decode_ms = decode_ms.min(t1.elapsed().as_secs_f64() * 1e3);
    }
    let bytes = model.decode_weight_bytes();
    let decode_tps = decode as f64 / (decode_ms / 1e3).max(1e-12);
    Ok(SpeedResult {
        prefill_tokens: prefill,
        prefill_ms,
        prefill_tokens_per_s: prefill as f64 / (prefill_ms / 1e3).max(1e-12),
        decode_tokens: decode,
        decode_ms,
        decode_tokens_per_s: decode_tps,
        decode_weight_bytes: bytes,
        decode_weight_gb_per_s: bytes as f64 * decode_tps / 1e9,
    })
}

/// Streaming read bandwidth of DRAM on the current rayon pool, GB/s (1e9 bytes):
/// the best of `reps` parallel passes summing a `bytes`-sized buffer, split into
/// per-thread contiguous chunks as the matvec splits weight rows.
pub fn stream_read_gb_per_s(bytes: usize, reps: usize) -> f64 {
    let words = (bytes / 8).max(1);
    let buf: Vec<u64> = (0..words as u64).collect();
    let chunk = 1 << 15; // 256 KiB per task, like a matvec task's rows.
    let mut best = 0.0f64;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        let sum: u64 = buf
            .par_chunks(chunk)
            .map(sum_words)
            .reduce(|| 0, u64::wrapping_add);
        let s = t.elapsed().as_secs_f64();
        std::hint::black_box(sum);
        best = best.max((words * 8) as f64 / s / 1e9);
    }
    best
}

/// Wrapping sum of a chunk, vectorised with AVX2 where the CPU has it, so that
/// the measurement is limited by memory and not by the add loop (the decode
/// kernels use AVX2 as well).
fn sum_words(c: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        #[target_feature(enable = "avx2")]
        unsafe fn sum_avx2(c: &[u64]) -> u64 {
            // Eight independent lanes let the compiler keep several vector adds in flight.
            let mut lanes = [0u64; 8];
            let mut chunks = c.chunks_exact(8);
            for ch in &mut chunks {
                for l in 0..8 {
                    lanes[l] = lanes[l].wrapping_add(ch[l]);
                }
            }
            let rest = chunks
                .remainder()
                .iter()
                .fold(0u64, |a, &b| a.wrapping_add(b));
            lanes.iter().fold(rest, |a, &b| a.wrapping_add(b))
        }
        // SAFETY: the CPU has AVX2.
        return unsafe { sum_avx2(c) };
    }
    c.iter().fold(0u64, |a, &b| a.wrapping_add(b))
}

/// A Llama-shaped config with random weights: TinyLlama-like widths (hidden 2048,
/// FFN 5632, 32 heads, 4 KV heads, vocab 32000), `layers` layers, SiLU.
pub fn synthetic_config(layers: usize) -> Result<ModelConfig> {
    let raw = RawConfig {
        architectures: Some(vec!["LlamaForCausalLM".into()]),
        vocab_size: Some(32000),
        hidden_size: Some(2048),
        intermediate_size: Some(5632),
        num_hidden_layers: Some(layers),
        num_attention_heads: Some(32),
        num_key_value_heads: Some(4),
        max_position_embeddings: Some(2048),
        hidden_act: Some("silu".into()),
        tie_word_embeddings: Some(false),
        ..RawConfig::default()
    };
    ModelConfig::from_raw(&raw, std::path::Path::new("<synthetic>"))
}

/// Random f16 weights (uniform, scaled by 1/sqrt(fan-in)) and unit norms.
pub struct RandomWeights {
    pub seed: u64,
}

impl TensorSource for RandomWeights {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Storage> {
        let n: usize = shape.iter().product();
        if shape.len() == 1 {
            return Ok(Storage::F32(vec![1.0; n]));
        }
        let scale = 1.0 / (shape[shape.len() - 1] as f32).sqrt();
        let salt = name
            .bytes()
            .fold(self.seed ^ 0x9e37_79b9_7f4a_7c15, |h, b| {
                (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
            });
        let mut data = vec![half::f16::ZERO; n];
        data.par_chunks_mut(1 << 16)
            .enumerate()
            .for_each(|(ci, chunk)| {
                // splitmix64 per chunk: fast and reproducible.
                let mut s = salt ^ (ci as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                for v in chunk {
                    s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
                    let mut z = s;
                    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                    z ^= z >> 31;
                    let u = (z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
                    *v = half::f16::from_f32(u * scale);
                }
            });
        Ok(Storage::F16(data))
    }
}

/// The synthetic model of [`synthetic_config`] with [`RandomWeights`].
pub fn synthetic_model(layers: usize) -> Result<Model> {
    let config = synthetic_config(layers)?;
    let names = ModelNames::for_config(&config);
    Model::load(&config, &names, &RandomWeights { seed: 1 })
}

/// The shape of a synthetic Llama-style f16 checkpoint written by
/// [`write_synthetic_checkpoint`] (ReLU FFN, untied head, full-width KV heads).
#[derive(Debug, Clone, Copy)]
pub struct SyntheticShape {
    pub hidden: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub layers: usize,
    pub heads: usize,
}

impl SyntheticShape {
    /// f16 weight bytes of the whole model.
    pub fn weight_bytes(&self) -> u64 {
        let h = self.hidden as u64;
        let per_layer = 4 * h * h + 3 * h * self.ffn as u64 + 2 * h;
        (2 * self.vocab as u64 * h + h + self.layers as u64 * per_layer) * 2
    }
}

/// Writes a Hugging Face checkpoint directory (config.json, model.safetensors,
/// and a copy of `tokenizer_json`) with pseudo-random f16 weights of small,
/// finite values, streaming: the safetensors header is written first and the
/// data a block at a time, so multi-GiB checkpoints never sit in memory. The
/// tensor list comes from [`ModelNames`], as the reader expects it. Returns the
/// weight file's size. For benchmarks: the weights mean nothing.
pub fn write_synthetic_checkpoint(
    dir: &std::path::Path,
    shape: &SyntheticShape,
    tokenizer_json: &std::path::Path,
) -> Result<u64> {
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "vocab_size": shape.vocab, "hidden_size": shape.hidden,
        "intermediate_size": shape.ffn, "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads, "num_key_value_heads": shape.heads,
        "max_position_embeddings": 2048, "hidden_act": "relu", "rms_norm_eps": 1e-5,
        "tie_word_embeddings": false, "dtype": "float16"
    });
    write_synthetic_checkpoint_for(dir, config, tokenizer_json)
}

/// [`write_synthetic_checkpoint`] for any `config.json` the reader accepts
/// (f16; a mixture-of-experts config gets every expert's tensors): the same
/// streaming writer and weights.
pub fn write_synthetic_checkpoint_for(
    dir: &std::path::Path,
    config: serde_json::Value,
    tokenizer_json: &std::path::Path,
) -> Result<u64> {
    use std::io::Write;
    fn io(path: &std::path::Path) -> impl Fn(std::io::Error) -> crate::Error + '_ {
        move |e| crate::Error::io(path, e)
    }
    let config_path = dir.join("config.json");
    std::fs::write(&config_path, config.to_string()).map_err(io(&config_path))?;
    let tok_path = dir.join("tokenizer.json");
    std::fs::copy(tokenizer_json, &tok_path).map_err(io(&tok_path))?;
    let raw: RawConfig = serde_json::from_value(config).map_err(|source| crate::Error::Json {
        path: config_path.clone(),
        source,
    })?;
    let cfg = ModelConfig::from_raw(&raw, &config_path)?;
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for spec in ModelNames::for_config(&cfg).specs() {
        let len = spec.shape.iter().product::<usize>() * 2;
        header.insert(
            spec.name,
            serde_json::json!({"dtype": "F16", "shape": spec.shape, "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    let mut text = serde_json::Value::Object(header).to_string();
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let path = dir.join("model.safetensors");
    let file = std::fs::File::create(&path).map_err(io(&path))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    w.write_all(&(text.len() as u64).to_le_bytes())
        .map_err(io(&path))?;
    w.write_all(text.as_bytes()).map_err(io(&path))?;
    // Sign, exponent 12..15 (magnitudes 2^-3 to 1), random mantissa: no NaN or Inf.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut block = vec![0u8; 1 << 20];
    let mut left = offset;
    while left > 0 {
        for four in block.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let mut v = state;
            for half in four.chunks_exact_mut(2) {
                let bits = (v as u16 & 0x83FF) | (((0x0C + ((v >> 10) & 3)) as u16) << 10);
                half.copy_from_slice(&bits.to_le_bytes());
                v >>= 16;
            }
        }
        let n = left.min(block.len());
        w.write_all(&block[..n]).map_err(io(&path))?;
        left -= n;
    }
    w.flush().map_err(io(&path))?;
    Ok((8 + text.len() + offset) as u64)
}
