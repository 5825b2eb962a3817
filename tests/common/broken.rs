//! The damaged packed files of `fixtures/broken/`, derived from its valid
//! `base.flashpack`: one file per rejection rule of `formats/flashpack-v1.md`
//! (several where a rule fails in distinct ways).
//!
//! Shared by `examples/make_broken_files.rs`, which writes the files, and by
//! `tests/broken_files.rs`, which checks that this code still reproduces the
//! committed files byte for byte (`#[path]` includes, so that no other test
//! binary compiles it). Every mutation is deterministic, and re-hashes exactly
//! what must be re-hashed for the file to fail at its intended rule and no
//! earlier one: a manifest edit re-hashes the manifest (R5 holds), a rewritten
//! chunk re-hashes its chunk and section (R12, R14 hold). Byte flips that stand
//! for damage on disk are left un-hashed on purpose.

use flashpack::format::layout::{Preamble, PREAMBLE_BYTES};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Derives one damaged file from the base's bytes.
type Mutation = fn(&[u8]) -> Vec<u8>;

/// Every damaged file, `(file name, bytes)`, in rule order.
pub fn broken_files(base: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mutations: [(&str, Mutation); 32] = [
        ("r01-bad-magic", bad_magic),
        ("r01-shorter-than-preamble", shorter_than_preamble),
        ("r02-version-2", version_2),
        ("r03-reserved-flags", reserved_flags),
        ("r04-truncated", truncated),
        ("r04-trailing-bytes", trailing_bytes),
        ("r05-manifest-byte-flipped", manifest_byte_flipped),
        ("r06-missing-sections-key", missing_sections_key),
        (
            "r06-generation-config-not-object",
            generation_config_not_object,
        ),
        ("r06-uppercase-source-digest", uppercase_source_digest),
        ("r07-alignment-1000", alignment_1000),
        ("r08-misaligned-section", misaligned_section),
        ("r09-overlapping-sections", overlapping_sections),
        ("r10-hole-before-section", hole_before_section),
        ("r11-nonzero-padding", nonzero_padding),
        ("r12-section-hash", section_hash),
        ("r13-chunk-missing", chunk_missing),
        ("r13-compression-ratio", compression_ratio),
        ("r13-uppercase-chunk-digest", uppercase_chunk_digest),
        ("r13-uppercase-section-digest", uppercase_section_digest),
        ("r14-ffn-chunk-byte-flipped", ffn_chunk_byte_flipped),
        ("r14-dense-byte-flipped", dense_byte_flipped),
        ("r15-zstd-garbage", zstd_garbage),
        ("r16-missing-tokenizer", missing_tokenizer),
        ("r16-dense-wrong-kind", dense_wrong_kind),
        ("r16-predictors-wrong-kind", predictors_wrong_kind),
        ("r17-tensor-length", tensor_length),
        ("r18-missing-ffn-layer", missing_ffn_layer),
        ("r18-tensor-in-wrong-section", tensor_in_wrong_section),
        ("r18-infinite-silu-threshold", infinite_silu_threshold),
        ("r19-order-not-permutation", order_not_permutation),
        (
            "r20-product-threshold-in-one-layer",
            product_threshold_in_one_layer,
        ),
    ];
    mutations
        .iter()
        .map(|(name, mutate)| (format!("{name}.flashpack"), mutate(base)))
        .collect()
}

// ----------------------------------------------------------------- the file, parsed

fn preamble(bytes: &[u8]) -> Preamble {
    Preamble::from_bytes(bytes[..PREAMBLE_BYTES as usize].try_into().unwrap())
}

fn manifest(bytes: &[u8]) -> Value {
    let p = preamble(bytes);
    serde_json::from_slice(&bytes[p.manifest_offset as usize..]).expect("base manifest parses")
}

fn hex_sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn u64_of(v: &Value) -> u64 {
    v.as_u64().expect("an integer in the base manifest")
}

fn section_index(m: &Value, name: &str) -> usize {
    m["sections"]
        .as_array()
        .unwrap()
        .iter()
        .position(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("the base has no section {name:?}"))
}

fn tensor_index(m: &Value, name: &str) -> usize {
    m["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .position(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("the base has no tensor {name:?}"))
}

/// The bytes before the manifest with `manifest` appended, the preamble's
/// length and hash updated to it: only what `manifest` says can be wrong.
fn with_manifest_bytes(body: &[u8], manifest: &[u8]) -> Vec<u8> {
    let mut p = preamble(body);
    p.manifest_offset = body.len() as u64;
    p.manifest_length = manifest.len() as u64;
    p.manifest_sha256 = Sha256::digest(manifest).into();
    let mut out = body.to_vec();
    out[..PREAMBLE_BYTES as usize].copy_from_slice(&p.to_bytes());
    out.extend_from_slice(manifest);
    out
}

/// The base with its manifest edited (and re-hashed); every other byte kept.
fn edit_manifest(base: &[u8], edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut m = manifest(base);
    edit(&mut m);
    let body = &base[..preamble(base).manifest_offset as usize];
    with_manifest_bytes(body, &serde_json::to_vec(&m).unwrap())
}

/// The base with `f` applied to its bytes, nothing re-hashed.
fn edit_bytes(base: &[u8], f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut bytes = base.to_vec();
    f(&mut bytes);
    bytes
}

/// Replaces the stored bytes of one chunk and lays the file out again: the
/// chunk's and its section's lengths and hashes are updated, every section is
/// moved to the first aligned offset after the previous one (the chunk may
/// have changed length) and the manifest is re-hashed. Only the chunk's
/// content can then be wrong.
fn replace_chunk(base: &[u8], section: &str, chunk: usize, stored: Vec<u8>) -> Vec<u8> {
    let mut m = manifest(base);
    let align = u64_of(&m["alignment"]);
    let mut contents: Vec<Vec<u8>> = m["sections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let at = u64_of(&s["offset"]) as usize;
            base[at..at + u64_of(&s["length"]) as usize].to_vec()
        })
        .collect();
    let i = section_index(&m, section);
    let s = &mut m["sections"][i];
    let start: u64 = s["chunks"].as_array().unwrap()[..chunk]
        .iter()
        .map(|c| u64_of(&c["length"]))
        .sum();
    let old_len = u64_of(&s["chunks"][chunk]["length"]);
    let (start, end) = (start as usize, (start + old_len) as usize);
    s["chunks"][chunk]["length"] = json!(stored.len());
    s["chunks"][chunk]["sha256"] = json!(hex_sha(&stored));
    contents[i].splice(start..end, stored);
    let mut out = base[..PREAMBLE_BYTES as usize].to_vec();
    for (s, content) in m["sections"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .zip(&contents)
    {
        let offset = (out.len() as u64).div_ceil(align) * align;
        out.resize(offset as usize, 0);
        s["offset"] = json!(offset);
        s["length"] = json!(content.len());
        s["sha256"] = json!(hex_sha(content));
        out.extend_from_slice(content);
    }
    with_manifest_bytes(&out, &serde_json::to_vec(&m).unwrap())
}

/// The stored bytes of chunk `chunk` of `section`, with its raw length.
fn stored_chunk(base: &[u8], section: &str, chunk: usize) -> (Vec<u8>, usize) {
    let m = manifest(base);
    let s = &m["sections"][section_index(&m, section)];
    let chunks = s["chunks"].as_array().unwrap();
    let start = u64_of(&s["offset"])
        + chunks[..chunk]
            .iter()
            .map(|c| u64_of(&c["length"]))
            .sum::<u64>();
    let len = u64_of(&chunks[chunk]["length"]);
    let chunk_raw = u64_of(&s["chunk_raw_bytes"]);
    let raw = (u64_of(&s["raw_length"]) - chunk_raw * chunk as u64).min(chunk_raw);
    (
        base[start as usize..(start + len) as usize].to_vec(),
        raw as usize,
    )
}

// ----------------------------------------------------------------- R1-R5: the preamble

fn bad_magic(base: &[u8]) -> Vec<u8> {
    edit_bytes(base, |b| b[..4].copy_from_slice(b"GGUF"))
}

/// The first 32 bytes: the magic is intact, but a file shorter than the
/// preamble fails rule 1, not rule 4.
fn shorter_than_preamble(base: &[u8]) -> Vec<u8> {
    base[..32].to_vec()
}

fn version_2(base: &[u8]) -> Vec<u8> {
    edit_bytes(base, |b| b[8..12].copy_from_slice(&2u32.to_le_bytes()))
}

fn reserved_flags(base: &[u8]) -> Vec<u8> {
    edit_bytes(base, |b| b[12..16].copy_from_slice(&1u32.to_le_bytes()))
}

/// The last 10 bytes (of the manifest) cut off.
fn truncated(base: &[u8]) -> Vec<u8> {
    base[..base.len() - 10].to_vec()
}

fn trailing_bytes(base: &[u8]) -> Vec<u8> {
    edit_bytes(base, |b| b.extend_from_slice(&[0; 7]))
}

/// One bit of the manifest's middle byte flipped, the preamble's hash kept.
fn manifest_byte_flipped(base: &[u8]) -> Vec<u8> {
    let p = preamble(base);
    let at = (p.manifest_offset + p.manifest_length / 2) as usize;
    edit_bytes(base, |b| b[at] ^= 0x01)
}

// ----------------------------------------------------------------- R6-R10: the manifest and layout

fn missing_sections_key(base: &[u8]) -> Vec<u8> {
    edit_manifest(base, |m| {
        m.as_object_mut().unwrap().remove("sections");
    })
}

/// `generation_config` a string: the key must hold an object or null.
fn generation_config_not_object(base: &[u8]) -> Vec<u8> {
    edit_manifest(base, |m| m["generation_config"] = json!("none"))
}

/// The first provenance source file's sha256 in uppercase hex.
fn uppercase_source_digest(base: &[u8]) -> Vec<u8> {
    edit_manifest(base, |m| {
        let d = &mut m["provenance"]["source_files"][0]["sha256"];
        *d = json!(d.as_str().unwrap().to_uppercase());
    })
}

fn alignment_1000(base: &[u8]) -> Vec<u8> {
    edit_manifest(base, |m| m["alignment"] = json!(1000))
}

/// The dense section's offset moved 8 bytes on.
fn misaligned_section(base: &[u8]) -> Vec<u8> {
    edit_manifest(base, |m| {
        let i = section_index(m, "dense");
        m["sections"][i]["offset"] = json!(u64_of(&m["sections"][i]["offset"]) + 8);
    })
}

/// The dense section's offset set to the tokenizer's, which comes before it.
fn overlapping_sections(base: &[u8]) -> Vec<u8> {
    edit_manifest(base, |m| {
        let first = m["sections"][section_index(m, "tokenizer.json")]["offset"].clone();
        let i = section_index(m, "dense");
        m["sections"][i]["offset"] = first;
    })
}

/// One alignment unit of zeros inserted before the last section, which (with
/// the manifest) moves along: aligned, every hash right, and a hole.
fn hole_before_section(base: &[u8]) -> Vec<u8> {
    let mut m = manifest(base);
    let p = preamble(base);
    let align = u64_of(&m["alignment"]);
    let last = m["sections"].as_array().unwrap().len() - 1;
    let at = u64_of(&m["sections"][last]["offset"]);
    m["sections"][last]["offset"] = json!(at + align);
    let mut body = base[..at as usize].to_vec();
    body.resize(body.len() + align as usize, 0);
    body.extend_from_slice(&base[at as usize..p.manifest_offset as usize]);
    with_manifest_bytes(&body, &serde_json::to_vec(&m).unwrap())
}

// ----------------------------------------------------------------- R11-R15: integrity

/// Byte 100, in the zero padding between the preamble and the first section.
fn nonzero_padding(base: &[u8]) -> Vec<u8> {
    let first = u64_of(&manifest(base)["sections"][0]["offset"]);
    assert!(first > 101, "the base must have padding after its preamble");
    edit_bytes(base, |b| b[100] = 0xAB)
}

/// The manifest's sha256 of `ffn.0` replaced by zeros (its chunk hash still right).
fn section_hash(base: &[u8]) -> Vec<u8> {
    edit_manifest(base, |m| {
        let i = section_index(m, "ffn.0");
        m["sections"][i]["sha256"] = json!("0".repeat(64));
    })
}

/// The dense section's last chunk dropped from its chunk table.
fn chunk_missing(base: &[u8]) -> Vec<u8> {
    edit_manifest(base, |m| {
        let i = section_index(m, "dense");
        m["sections"][i]["chunks"].as_array_mut().unwrap().pop();
    })
}

/// The tokenizer section claims 2048 times its stored size once decompressed,
/// with a chunk table consistent with that claim: only the ratio cap catches it.
fn compression_ratio(base: &[u8]) -> Vec<u8> {
    edit_manifest(base, |m| {
        let i = section_index(m, "tokenizer.json");
        let s = &mut m["sections"][i];
        let len = u64_of(&s["length"]);
        let chunk_raw = u64_of(&s["chunk_raw_bytes"]);
        let raw = len * 2048;
        let n = raw.div_ceil(chunk_raw);
        let per = len / n;
        let first = s["chunks"][0].clone();
        let mut chunks = vec![first; n as usize];
        for c in chunks.iter_mut() {
            c["length"] = json!(per);
        }
        chunks[n as usize - 1]["length"] = json!(len - per * (n - 1));
        s["raw_length"] = json!(raw);
        s["chunks"] = json!(chunks);
    })
}

/// The sha256 of `ffn.0`'s one chunk in uppercase hex: the same digest, but
/// not as the format writes it (a reader comparing strings would report the
/// chunk damaged).
fn uppercase_chunk_digest(base: &[u8]) -> Vec<u8> {
    edit_manifest(base, |m| {
        let i = section_index(m, "ffn.0");
        let d = &mut m["sections"][i]["chunks"][0]["sha256"];
        *d = json!(d.as_str().unwrap().to_uppercase());
    })
}

/// The sha256 of the `dense` section in uppercase hex.
fn uppercase_section_digest(base: &[u8]) -> Vec<u8> {
    edit_manifest(base, |m| {
        let i = section_index(m, "dense");
        let d = &mut m["sections"][i]["sha256"];
        *d = json!(d.as_str().unwrap().to_uppercase());
    })
}

/// One bit flipped in bundle 1 of layer 1's FFN, as a disk would damage it:
/// the chunk and section hashes no longer match.
fn ffn_chunk_byte_flipped(base: &[u8]) -> Vec<u8> {
    let m = manifest(base);
    let ffn = &m["sections"][section_index(&m, "ffn.1")];
    let at = u64_of(&ffn["offset"]) + u64_of(&m["ffn_layers"][1]["bundle_bytes"]) + 4;
    edit_bytes(base, |b| b[at as usize] ^= 0x40)
}

/// One bit flipped in the middle of the (compressed) dense section.
fn dense_byte_flipped(base: &[u8]) -> Vec<u8> {
    let m = manifest(base);
    let dense = &m["sections"][section_index(&m, "dense")];
    let at = u64_of(&dense["offset"]) + u64_of(&dense["length"]) / 2;
    edit_bytes(base, |b| b[at as usize] ^= 0x01)
}

/// Dense chunk 0 keeps its zstd frame header, then garbage; hashes updated, so
/// that only decompression can tell.
fn zstd_garbage(base: &[u8]) -> Vec<u8> {
    let (mut stored, _) = stored_chunk(base, "dense", 0);
    for b in &mut stored[8..] {
        *b = 0x5A;
    }
    replace_chunk(base, "dense", 0, stored)
}

// ----------------------------------------------------------------- R16-R19: what the sections hold

fn missing_tokenizer(base: &[u8]) -> Vec<u8> {
    edit_manifest(base, |m| {
        let i = section_index(m, "tokenizer.json");
        m["sections"][i]["name"] = json!("vocab.json");
    })
}

/// The `dense` section declared of kind `predictor` (a kind tensors may be in,
/// so only rule 16's required kind catches it).
fn dense_wrong_kind(base: &[u8]) -> Vec<u8> {
    edit_manifest(base, |m| {
        let i = section_index(m, "dense");
        m["sections"][i]["kind"] = json!("predictor");
    })
}

/// The `predictors` section declared of kind `dense` (a kind tensors may be
/// in, and the predictor tensors are still in the section so named).
fn predictors_wrong_kind(base: &[u8]) -> Vec<u8> {
    edit_manifest(base, |m| {
        let i = section_index(m, "predictors");
        m["sections"][i]["kind"] = json!("dense");
    })
}

/// The first tensor's length 2 bytes more than its shape and dtype imply.
fn tensor_length(base: &[u8]) -> Vec<u8> {
    edit_manifest(base, |m| {
        m["tensors"][0]["length"] = json!(u64_of(&m["tensors"][0]["length"]) + 2);
    })
}

fn missing_ffn_layer(base: &[u8]) -> Vec<u8> {
    edit_manifest(base, |m| {
        m["ffn_layers"].as_array_mut().unwrap().pop();
    })
}

/// `model.norm.weight` and layer 1's predictor bias trade places: the norm
/// goes to the bias's offset in the predictor section, the bias into the
/// norm's 64-byte slot of the dense section. Every extent stays within its
/// section without overlaps (rule 17 holds), but the architecture's tensor is
/// no longer in the dense section, where the runtime reads it.
fn tensor_in_wrong_section(base: &[u8]) -> Vec<u8> {
    edit_manifest(base, |m| {
        let norm = tensor_index(m, "model.norm.weight");
        let bias = tensor_index(m, "flashpack.predictor.1.bias");
        let (norm_at, bias_at) = (
            u64_of(&m["tensors"][norm]["offset"]),
            u64_of(&m["tensors"][bias]["offset"]),
        );
        let (norm_len, bias_len) = (
            u64_of(&m["tensors"][norm]["length"]),
            u64_of(&m["tensors"][bias]["length"]),
        );
        // The dense slot ends where the next dense tensor starts.
        let slot_end = m["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["section"] == "dense" && u64_of(&t["offset"]) > norm_at)
            .map(|t| u64_of(&t["offset"]))
            .min()
            .unwrap();
        assert!(norm_len <= bias_len && norm_at + bias_len <= slot_end);
        m["tensors"][norm]["section"] = json!("predictors");
        m["tensors"][norm]["offset"] = json!(bias_at);
        m["tensors"][bias]["section"] = json!("dense");
        m["tensors"][bias]["offset"] = json!(norm_at);
    })
}

/// Layer 0's `silu_threshold` set to 1e39, beyond the binary32 range: read
/// as a 32-bit float it is infinite, and would zero every neuron.
fn infinite_silu_threshold(base: &[u8]) -> Vec<u8> {
    edit_manifest(base, |m| {
        m["calibration"]["layers"][0]["silu_threshold"] = json!(1e39);
    })
}

/// Layer 0's neuron order lists its second neuron twice (and its first never):
/// the dense chunk holding it is decompressed, edited and recompressed at the
/// base's zstd level, its hashes updated.
fn order_not_permutation(base: &[u8]) -> Vec<u8> {
    tensor_order_not_permutation(base, "flashpack.ffn.0.order")
}

/// The order tensor `name` lists its second neuron twice (its first never):
/// the dense chunk holding it decompressed, edited, recompressed and
/// re-hashed.
fn tensor_order_not_permutation(base: &[u8], name: &str) -> Vec<u8> {
    edit_tensor_bytes(base, "dense", name, |raw| {
        let second: [u8; 4] = raw[4..8].try_into().unwrap();
        raw[..4].copy_from_slice(&second);
    })
}

/// `base` with the raw bytes of tensor `name`, from its first byte to the end
/// of its chunk, changed by `edit`: the zstd chunk of `section` holding it
/// decompressed, edited, recompressed at the base's zstd level and re-hashed.
fn edit_tensor_bytes(
    base: &[u8],
    section: &str,
    name: &str,
    edit: impl FnOnce(&mut [u8]),
) -> Vec<u8> {
    let m = manifest(base);
    let sec = &m["sections"][section_index(&m, section)];
    assert_eq!(
        sec["compression"], "zstd",
        "the base's {section} section is compressed"
    );
    let tensor = &m["tensors"][tensor_index(&m, name)];
    let chunk_raw = u64_of(&sec["chunk_raw_bytes"]);
    let at = u64_of(&tensor["offset"]);
    let chunk = (at / chunk_raw) as usize;
    let within = (at % chunk_raw) as usize;
    let (stored, raw_len) = stored_chunk(base, section, chunk);
    let mut raw = zstd::bulk::decompress(&stored, raw_len).unwrap();
    edit(&mut raw[within..]);
    let level = m["provenance"]["options"]["zstd_level"].as_i64().unwrap() as i32;
    replace_chunk(
        base,
        section,
        chunk,
        zstd::bulk::compress(&raw, level).unwrap(),
    )
}

/// Layer 0 alone is switched to the product criterion (a product threshold, a
/// null gate threshold) while layer 1 keeps the gate's: the layers would select
/// neurons by different quantities.
fn product_threshold_in_one_layer(base: &[u8]) -> Vec<u8> {
    edit_manifest(base, |m| {
        let layer = &mut m["calibration"]["layers"][0];
        layer["product_threshold"] = json!(0.05);
        layer["silu_threshold"] = Value::Null;
    })
}

// ----------------------------------------------------------------- R21-R24: block types

/// The damaged files derived from the quantized base (`base-q.flashpack`:
/// micro-llama-q with `--quant ffn=q4,attn=q4,embed=q8`, so without down
/// scales: R25 and R26's files add one), in rule order.
pub fn broken_quant_files(base: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mutations: [(&str, Mutation); 7] = [
        ("r21-policy-mismatch", policy_mismatch),
        ("r22-norm-quantized", norm_quantized),
        ("r23-tensor-length", quant_tensor_length),
        ("r23-bundle-bytes", quant_bundle_bytes),
        ("r24-nan-scale", nan_scale),
        ("r25-down-scale-dtype", down_scale_dtype),
        ("r26-zero-down-scale", zero_down_scale),
    ];
    mutations
        .iter()
        .map(|(name, mutate)| (format!("{name}.flashpack"), mutate(base)))
        .collect()
}

/// The policy says `q8_0` for the FFN, whose layers are `q4_1`.
fn policy_mismatch(base: &[u8]) -> Vec<u8> {
    edit_manifest(base, |m| {
        assert_eq!(m["quantization"]["ffn"], "q4_1");
        m["quantization"]["ffn"] = json!("q8_0");
    })
}

/// `model.norm.weight` (32 values, f16: 64 bytes) declared `q8_0` of one
/// block, 34 bytes within its slot: its length fits its shape (rule 17 and
/// 23 hold), but a norm may not have a block type.
fn norm_quantized(base: &[u8]) -> Vec<u8> {
    edit_manifest(base, |m| {
        let norm = tensor_index(m, "model.norm.weight");
        assert_eq!(m["tensors"][norm]["shape"], json!([32]));
        m["tensors"][norm]["dtype"] = json!("q8_0");
        m["tensors"][norm]["length"] = json!(34);
    })
}

/// The quantized embedding's length 2 bytes more than its blocks.
fn quant_tensor_length(base: &[u8]) -> Vec<u8> {
    edit_manifest(base, |m| {
        let embed = tensor_index(m, "model.embed_tokens.weight");
        assert_eq!(m["tensors"][embed]["dtype"], "q8_0");
        m["tensors"][embed]["length"] = json!(u64_of(&m["tensors"][embed]["length"]) + 2);
    })
}

/// Layer 0's `bundle_bytes` 64 (its three 20-byte parts padded to 64), where
/// 9.3 says 60.
fn quant_bundle_bytes(base: &[u8]) -> Vec<u8> {
    edit_manifest(base, |m| {
        assert_eq!(m["ffn_layers"][0]["bundle_bytes"], 60);
        m["ffn_layers"][0]["bundle_bytes"] = json!(64);
    })
}

/// The embedding's first block scale set to a binary16 NaN (0x7E00) in the
/// dense chunk, recompressed at the base's zstd level, hashes updated.
fn nan_scale(base: &[u8]) -> Vec<u8> {
    edit_tensor_bytes(base, "dense", "model.embed_tokens.weight", |raw| {
        raw[..2].copy_from_slice(&0x7E00u16.to_le_bytes());
    })
}

/// `base` with a tensor `name` (`dtype`, `shape`, raw `bytes`) added at the
/// end of the dense section's raw bytes (the next multiple of 64, as convert
/// places tensors), listed after layer `layer`'s order tensor as convert lists
/// a down scale (format 6); the one dense chunk recompressed, hashes updated.
fn with_dense_tensor(
    base: &[u8],
    layer: usize,
    name: &str,
    dtype: &str,
    shape: &[u64],
    bytes: &[u8],
) -> Vec<u8> {
    let m = manifest(base);
    let dense = &m["sections"][section_index(&m, "dense")];
    assert_eq!(
        dense["chunks"].as_array().unwrap().len(),
        1,
        "one dense chunk"
    );
    let (stored, raw_len) = stored_chunk(base, "dense", 0);
    let mut raw = zstd::bulk::decompress(&stored, raw_len).unwrap();
    raw.resize(raw.len().div_ceil(64) * 64, 0);
    let offset = raw.len();
    raw.extend_from_slice(bytes);
    let edited = edit_manifest(base, |m| {
        let d = section_index(m, "dense");
        m["sections"][d]["raw_length"] = json!(raw.len());
        let after = tensor_index(m, &format!("flashpack.ffn.{layer}.order"));
        m["tensors"].as_array_mut().unwrap().insert(
            after + 1,
            json!({"name": name, "dtype": dtype, "shape": shape, "section": "dense",
                   "offset": offset, "length": bytes.len()}),
        );
    });
    let level = m["provenance"]["options"]["zstd_level"].as_i64().unwrap() as i32;
    replace_chunk(
        &edited,
        "dense",
        0,
        zstd::bulk::compress(&raw, level).unwrap(),
    )
}

/// A down scale (format 9.6) for layer 0 declared `f16` (32 values, 64
/// bytes): rule 25 wants `f32` of shape `[hidden]`.
fn down_scale_dtype(base: &[u8]) -> Vec<u8> {
    let ones: Vec<u8> = (0..32)
        .flat_map(|_| half::f16::from_f32(1.0).to_le_bytes())
        .collect();
    with_dense_tensor(base, 0, "flashpack.ffn.0.down_scale", "f16", &[32], &ones)
}

/// A valid-looking down scale for layer 1, `f32` of `[32]`, all ones but its
/// first value zero: rule 26 (the layer's down values would all be zero).
fn zero_down_scale(base: &[u8]) -> Vec<u8> {
    let values: Vec<u8> = (0..32)
        .flat_map(|i| if i == 0 { 0.0f32 } else { 1.0f32 }.to_le_bytes())
        .collect();
    with_dense_tensor(base, 1, "flashpack.ffn.1.down_scale", "f32", &[32], &values)
}

// ------------------------------------------------- mixture of experts (base-moe)

/// The valid base of the mixture-of-experts rules' files.
pub const MOE_BASE: &str = "base-moe.flashpack";

/// Every damaged file derived from `base-moe.flashpack` (the micro Qwen2-MoE:
/// layer 0 dense, layer 1 sparse with 4 experts), in rule order.
pub fn broken_moe_files(base: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mutations: [(&str, Mutation); 4] = [
        ("r31-expert-missing", expert_missing),
        ("r32-sparse-layer-listed", sparse_layer_listed),
        (
            "r33-expert-order-not-permutation",
            expert_order_not_permutation,
        ),
        ("r34-routing-counts-sum", routing_counts_sum),
    ];
    mutations
        .iter()
        .map(|(name, mutate)| (format!("{name}.flashpack"), mutate(base)))
        .collect()
}

/// The last expert entry (expert 3 of layer 1) removed: its section is still
/// there, but no entry describes it.
fn expert_missing(base: &[u8]) -> Vec<u8> {
    edit_manifest(base, |m| {
        m["experts"].as_array_mut().unwrap().pop();
    })
}

/// Layer 0's FFN layer entry copied for layer 1, which is sparse: a runtime
/// would look for a dense FFN that the layer does not have.
fn sparse_layer_listed(base: &[u8]) -> Vec<u8> {
    edit_manifest(base, |m| {
        let mut entry = m["ffn_layers"][0].clone();
        entry["layer"] = 1.into();
        m["ffn_layers"].as_array_mut().unwrap().push(entry);
    })
}

/// Expert 0 of layer 1 lists its second neuron twice.
fn expert_order_not_permutation(base: &[u8]) -> Vec<u8> {
    tensor_order_not_permutation(base, "flashpack.ffn.1.expert.0.order")
}

// ------------------------------------------------- selector copies (base-sel)

/// The valid base of the selector rules' files (format section 10).
pub const SELECTOR_BASE: &str = "base-sel.flashpack";

/// Every damaged file derived from `base-sel.flashpack` (micro-llama with
/// int4 selector copies, hidden 16 padded to 32), in rule order.
pub fn broken_selector_files(base: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mutations: [(&str, Mutation); 3] = [
        ("r27-selector-scale-dtype", selector_scale_dtype),
        ("r28-selector-layer-missing", selector_layer_missing),
        ("r29-selector-value-changed", selector_value_changed),
    ];
    mutations
        .iter()
        .map(|(name, mutate)| (format!("{name}.flashpack"), mutate(base)))
        .collect()
}

/// Layer 0's int4 gate scales declared `bf16` (the same two bytes each, so
/// rule 17 holds): 10.1 says `f16`.
fn selector_scale_dtype(base: &[u8]) -> Vec<u8> {
    edit_manifest(base, |m| {
        let t = tensor_index(m, "flashpack.selector.0.gate_scale");
        assert_eq!(m["tensors"][t]["dtype"], "f16");
        m["tensors"][t]["dtype"] = json!("bf16");
    })
}

/// The selector entry of layer 1 removed: its tensors are still there, but
/// the file no longer has one entry per FFN layer.
fn selector_layer_missing(base: &[u8]) -> Vec<u8> {
    edit_manifest(base, |m| {
        let entries = m["selectors"].as_array_mut().unwrap();
        assert_eq!(entries.len(), 2);
        entries.pop();
    })
}

/// The first value of layer 0's int4 gate copy (the low nibble of its first
/// byte) moved by one step, within -8..7 and not padding: the copy reads
/// (its scales, its padding) but no longer equals bundle 0 quantized. The
/// selector chunk is decompressed, edited, recompressed at the base's zstd
/// level and re-hashed.
fn selector_value_changed(base: &[u8]) -> Vec<u8> {
    edit_tensor_bytes(base, "selector", "flashpack.selector.0.gate", |raw| {
        let low = raw[0] & 15;
        let moved = if low < 15 { low + 1 } else { low - 1 };
        raw[0] = (raw[0] & 0xF0) | moved;
    })
}

/// Routing statistics whose counts for layer 1 sum to 19 over 10 tokens of
/// top-2 routing (each token chose 2 experts: the sum must be 20).
fn routing_counts_sum(base: &[u8]) -> Vec<u8> {
    edit_manifest(base, |m| {
        m["routing"] = serde_json::json!({
            "tokens": 10,
            "files": [],
            "layers": [{"layer": 1, "counts": [6, 5, 4, 4]}],
        });
    })
}
