//! Block-quantized packed files (format section 9, rules R21-R26), against the
//! independent numpy reference `fixtures/quant_reference.py` wrote into
//! `fixtures/reference/quant/micro-llama-q.json`: the bytes `convert --quant`
//! writes for every tensor and bundle part, the dequantized values, and the
//! logits and perplexity transformers computes with the dequantized weights.
//! Also: each rule's error on a file that breaks only it, float files
//! unchanged, and the same bytes at any thread count.

use std::path::{Path, PathBuf};
use std::process::Command;

use flashpack::format::integrity::check_integrity;
use flashpack::format::layout::{Preamble, PREAMBLE_BYTES};
use flashpack::format::quant_policy::parse_policy;
use flashpack::format::{FormatError, PackedFile};
use flashpack::pack::{convert, ConvertOptions};
use flashpack::runtime::packed::PackedWeights;
use flashpack::runtime::{Logits, Model};
use flashpack::Error;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

mod common;

const MODEL: &str = "micro-llama-q";

fn model_dir() -> PathBuf {
    common::fixtures().join("models").join(MODEL)
}

fn reference() -> Value {
    let text =
        std::fs::read_to_string(common::fixtures().join("reference/quant/micro-llama-q.json"))
            .expect("fixtures/reference/quant/micro-llama-q.json");
    serde_json::from_str(&text).unwrap()
}

/// `micro-llama-q` converted with `--quant policy` (and `--align 512`).
fn packed(policy: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("q.flashpack");
    let options = ConvertOptions {
        alignment: 512,
        quant: parse_policy(policy).unwrap(),
        ..ConvertOptions::default()
    };
    convert(&model_dir(), &out, &options, &|_, _, _| {}).unwrap();
    (tmp, out)
}

fn preamble(bytes: &[u8]) -> Preamble {
    Preamble::from_bytes(bytes[..PREAMBLE_BYTES as usize].try_into().unwrap())
}

fn manifest(path: &Path) -> Value {
    let bytes = std::fs::read(path).unwrap();
    let p = preamble(&bytes);
    serde_json::from_slice(&bytes[p.manifest_offset as usize..]).unwrap()
}

/// Replaces the manifest with an edited one (preamble fixed up: only the edit is wrong).
fn rewrite_manifest(path: &Path, edit: impl FnOnce(&mut Value)) {
    let bytes = std::fs::read(path).unwrap();
    let mut p = preamble(&bytes);
    let mut m: Value = serde_json::from_slice(&bytes[p.manifest_offset as usize..]).unwrap();
    edit(&mut m);
    let new = serde_json::to_vec(&m).unwrap();
    p.manifest_length = new.len() as u64;
    p.manifest_sha256 = Sha256::digest(&new).into();
    let mut out = bytes[..p.manifest_offset as usize].to_vec();
    out[..PREAMBLE_BYTES as usize].copy_from_slice(&p.to_bytes());
    out.extend_from_slice(&new);
    std::fs::write(path, out).unwrap();
}

fn open_error(path: &Path) -> FormatError {
    match PackedFile::open(path) {
        Err(Error::Format { source, .. }) => source,
        Err(other) => panic!("expected a format error, got {other}"),
        Ok(_) => panic!("file was accepted"),
    }
}

fn tensor_index(m: &Value, name: &str) -> usize {
    m["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .position(|t| t["name"] == name)
        .unwrap()
}

/// The bytes of every quantized tensor and bundle part, by checkpoint tensor
/// name, as rows of blocks in checkpoint row order (bundle parts: the part of
/// each bundle in turn; without calibration the order is the identity).
fn quantized_bytes(path: &Path) -> Vec<(String, Vec<u8>)> {
    let file = PackedFile::open(path).unwrap();
    let dense = file.read_section("dense").unwrap();
    let mut out = Vec::new();
    for t in &file.manifest.tensors {
        if t.dtype.quant().is_some() {
            out.push((
                t.name.clone(),
                dense[t.offset as usize..(t.offset + t.length) as usize].to_vec(),
            ));
        }
    }
    for (i, layer) in file.manifest.ffn_layers.iter().enumerate() {
        let Some(q) = layer.dtype.quant() else {
            continue;
        };
        let section = file.read_section(&layer.section).unwrap();
        let row = q.row_bytes(layer.hidden as usize).unwrap();
        let names = ["gate_proj", "up_proj", "down_proj"];
        for (k, name) in names.iter().enumerate() {
            let bytes: Vec<u8> = section
                .chunks(layer.bundle_bytes as usize)
                .flat_map(|b| b[k * row..(k + 1) * row].to_vec())
                .collect();
            out.push((format!("model.layers.{i}.mlp.{name}.weight"), bytes));
        }
    }
    out
}

/// The reference key of tensor `name` under `policy`: a `q8_0` down
/// projection is stored with its down scale (format 9.6), `q4_1` without.
fn reference_key(policy: &str, name: &str, what: &str) -> String {
    let q = if policy == "q8" { "q8_0" } else { "q4_1" };
    if q == "q8_0" && name.ends_with("down_proj.weight") {
        format!("{q}_scaled_{what}")
    } else {
        format!("{q}_{what}")
    }
}

/// The raw bytes of tensor `name` of the dense section, if the file has it.
fn dense_tensor(path: &Path, name: &str) -> Option<Vec<u8>> {
    let file = PackedFile::open(path).unwrap();
    let t = file.tensor_entry(name)?.clone();
    let dense = file.read_section("dense").unwrap();
    Some(dense[t.offset as usize..(t.offset + t.length) as usize].to_vec())
}

#[test]
fn convert_writes_the_reference_bytes_of_every_tensor_and_bundle_part() {
    let reference = reference();
    for policy in ["q8", "q4"] {
        let (_t, path) = packed(policy);
        let got = quantized_bytes(&path);
        // Tied embeddings: the embedding, 4 attention and 3 FFN matrices per layer.
        assert_eq!(got.len(), 1 + 2 * 7, "{policy}");
        for (name, bytes) in got {
            let key = reference_key(policy, &name, "sha256");
            let expected = reference["tensors"][&name][&key]
                .as_str()
                .unwrap_or_else(|| panic!("no reference {key} for {name}"));
            assert_eq!(
                hex::encode(Sha256::digest(&bytes)),
                expected,
                "{policy}: {name}"
            );
        }
        // Format 9.6: the per-channel down scales, q8_0 only.
        for layer in 0..2 {
            let scale = dense_tensor(&path, &format!("flashpack.ffn.{layer}.down_scale"));
            let name = format!("model.layers.{layer}.mlp.down_proj.weight");
            match policy {
                "q8" => assert_eq!(
                    hex::encode(Sha256::digest(
                        scale.expect("a q8_0 layer has a down scale")
                    )),
                    reference["tensors"][&name]["down_scale_sha256"]
                        .as_str()
                        .unwrap(),
                    "{name}"
                ),
                _ => assert!(scale.is_none(), "a q4_1 layer has no down scale"),
            }
        }
    }
}

#[test]
fn dequantized_values_equal_the_reference() {
    use flashpack::quant::QuantType;
    let reference = reference();
    for (policy, q) in [("q8", QuantType::Q8_0), ("q4", QuantType::Q4_1)] {
        let (_t, path) = packed(policy);
        for (name, bytes) in quantized_bytes(&path) {
            let mut values = vec![0.0f32; 32];
            q.dequantize_row(&bytes[..q.block_bytes()], &mut values);
            let key = reference_key(policy, &name, "first_block");
            let expected: Vec<f32> = reference["tensors"][&name][&key]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            assert_eq!(values, expected, "{policy}: {name}");
        }
    }
}

/// The packed model equals transformers running the dequantized weights:
/// final-position logits and held-out perplexity.
#[test]
fn the_quantized_model_computes_what_transformers_computes_with_the_dequantized_weights() {
    let reference = reference();
    for (policy, key) in [("q8", "q8_0"), ("q4", "q4_1")] {
        let (_t, path) = packed(policy);
        let file = PackedFile::open(&path).unwrap();
        let model = Model::load(
            &file.config,
            &file.names,
            &PackedWeights::read_all(&file).unwrap(),
        )
        .unwrap();
        let r = &reference["models"][key];
        let ids: Vec<u32> = r["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let expected: Vec<f32> = r["final_logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let logits = model
            .forward(&mut model.new_cache(), &ids, Logits::Last, None)
            .unwrap();
        let e = common::nmse(&logits, &expected);
        assert!(e < 1e-10, "{policy}: logit NMSE {e:e}");
        let text = std::fs::read_to_string(common::fixtures().join("text/heldout.txt")).unwrap();
        let tokenizer = flashpack::runtime::packed::packed_tokenizer(&file).unwrap();
        let held = tokenizer.encode(&text).unwrap();
        let ppl = flashpack::runtime::perplexity::perplexity(&model, &held, 256).unwrap();
        let want = r["perplexity"].as_f64().unwrap();
        assert_eq!(
            ppl.tokens_scored as u64,
            r["tokens_scored"].as_u64().unwrap()
        );
        assert!(
            (ppl.perplexity / want - 1.0).abs() < 1e-6,
            "{policy}: perplexity {} vs transformers {want}",
            ppl.perplexity
        );
    }
}

#[test]
fn a_float_file_has_no_quantization_key_and_a_quantized_one_states_its_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("f.flashpack");
    let options = ConvertOptions {
        alignment: 512,
        ..ConvertOptions::default()
    };
    convert(&model_dir(), &out, &options, &|_, _, _| {}).unwrap();
    let m = manifest(&out);
    assert!(m.get("quantization").is_none(), "float files are unchanged");
    let (_t, path) = packed("ffn=q4,attn=q8,head=q8");
    let m = manifest(&path);
    // Tied embeddings: no head of its own; embed left out: float.
    assert_eq!(
        m["quantization"],
        json!({"embed": null, "attn": "q8_0", "ffn": "q4_1", "head": null})
    );
    let embed = &m["tensors"][tensor_index(&m, "model.embed_tokens.weight")];
    assert_eq!(embed["dtype"], "f16");
    let norm = &m["tensors"][tensor_index(&m, "model.norm.weight")];
    assert_eq!(norm["dtype"], "f16", "norms stay float");
    assert_eq!(m["ffn_layers"][0]["dtype"], "q4_1");
    assert_eq!(m["ffn_layers"][0]["bundle_bytes"], 60);
    let file = PackedFile::open(&path).unwrap();
    assert!(check_integrity(&file).unwrap().failures.is_empty());
    // inspect: a q8_0 FFN's down scales (9.6) count as FFN bytes.
    let (_t, path) = packed("q8");
    let out = Command::new(env!("CARGO_BIN_EXE_flashpack"))
        .arg("inspect")
        .arg(&path)
        .arg("--json")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let packed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(packed["down_scale_layers"], 2, "{packed}");
    // 2 layers of 64 bundles of 3 q8_0 rows of 32 (34 bytes each), plus 2
    // scales of 32 f32.
    assert_eq!(
        packed["part_sizes"]["ffn_bytes"],
        2 * 64 * 3 * 34 + 2 * 32 * 4,
        "{packed}"
    );
}

/// Same bytes whatever the thread count (the CLI, 1 and 2 rayon threads).
#[test]
fn quantized_convert_is_deterministic_across_thread_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |threads: &str, name: &str| -> Vec<u8> {
        let out = tmp.path().join(name);
        let status = Command::new(env!("CARGO_BIN_EXE_flashpack"))
            .args(["convert"])
            .arg(common::fixtures().join("models/llama-silu"))
            .arg("-o")
            .arg(&out)
            // q8_0 FFN layers: the down scales (9.6) too; q4_1 attention.
            .args(["--quant", "ffn=q8,attn=q4,embed=q8", "--json"])
            .env("RAYON_NUM_THREADS", threads)
            .output()
            .unwrap();
        assert!(status.status.success(), "{status:?}");
        std::fs::read(out).unwrap()
    };
    let one = run("1", "one.flashpack");
    let two = run("2", "two.flashpack");
    assert!(one == two, "1 and 2 threads wrote different bytes");
}

#[test]
fn rule_21_policy_must_match_the_tensors() {
    let (_t, path) = packed("q8");
    rewrite_manifest(&path, |m| m["quantization"]["attn"] = json!(null));
    assert!(matches!(open_error(&path), FormatError::QuantPolicy { .. }));
    // A block type with no policy at all.
    let (_t, path) = packed("q8");
    rewrite_manifest(&path, |m| {
        m.as_object_mut().unwrap().remove("quantization");
    });
    assert_eq!(open_error(&path).rule(), 21);
    // Tied embeddings: no head.
    let (_t, path) = packed("q8");
    rewrite_manifest(&path, |m| m["quantization"]["head"] = json!("q8_0"));
    let e = open_error(&path);
    assert!(e.to_string().contains("`head` must be null"), "{e}");
}

#[test]
fn rule_22_only_weight_matrices_may_have_a_block_type() {
    let (_t, path) = packed("q8");
    rewrite_manifest(&path, |m| {
        let i = tensor_index(m, "model.layers.0.input_layernorm.weight");
        m["tensors"][i]["dtype"] = json!("q8_0");
        m["tensors"][i]["length"] = json!(34);
    });
    assert!(matches!(
        open_error(&path),
        FormatError::QuantNotAllowed { tensor, .. } if tensor == "model.layers.0.input_layernorm.weight"
    ));
}

#[test]
fn rule_23_lengths_and_bundle_sizes() {
    let (_t, path) = packed("q4");
    rewrite_manifest(&path, |m| {
        let i = tensor_index(m, "model.layers.1.self_attn.o_proj.weight");
        m["tensors"][i]["length"] = json!(m["tensors"][i]["length"].as_u64().unwrap() - 20);
    });
    assert_eq!(open_error(&path).rule(), 23);
    let (_t, path) = packed("q4");
    rewrite_manifest(&path, |m| m["ffn_layers"][1]["bundle_bytes"] = json!(80));
    assert_eq!(open_error(&path).rule(), 23);
}

#[test]
fn rule_24_scales_must_be_finite_when_the_data_is_read() {
    // The committed broken file: the embedding's first scale is a NaN.
    let path = common::fixtures().join("broken/r24-nan-scale.flashpack");
    let file = PackedFile::open(&path).unwrap();
    let failures = check_integrity(&file).unwrap().failures;
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0].rule(), 24);
    // Loading the model refuses it too (exit 2, not a computation with NaN).
    match Model::load(
        &file.config,
        &file.names,
        &PackedWeights::read_all(&file).unwrap(),
    ) {
        Err(Error::Format { source, .. }) => assert_eq!(source.rule(), 24),
        Err(other) => panic!("expected rule 24, got {other}"),
        Ok(_) => panic!("a NaN scale was loaded"),
    }
}

#[test]
fn rule_25_a_down_scale_belongs_to_a_quantized_layer_and_is_f32_of_hidden() {
    // The committed broken file: layer 0's scale declared f16 of [32] (half
    // its length, within its slot).
    let path = common::fixtures().join("broken/r25-down-scale-dtype.flashpack");
    let e = open_error(&path);
    assert_eq!(e.rule(), 25, "{e}");
    assert!(e.to_string().contains("not f32 of shape [32]"), "{e}");
    // A scale naming a layer that does not exist.
    let (_t, path) = packed("q8");
    rewrite_manifest(&path, |m| {
        let i = tensor_index(m, "flashpack.ffn.1.down_scale");
        m["tensors"][i]["name"] = json!("flashpack.ffn.01.down_scale");
    });
    let e = open_error(&path);
    assert!(matches!(&e, FormatError::DownScale { .. }), "{e}");
    assert!(e.to_string().contains("names no FFN layer"), "{e}");
    // A scale for a float FFN layer (the attention quantized, the FFN not):
    // an entry of no bytes, which rules 17 and 18 allow.
    let (_t, path) = packed("attn=q8");
    rewrite_manifest(&path, |m| {
        m["tensors"].as_array_mut().unwrap().push(json!({
            "name": "flashpack.ffn.0.down_scale", "dtype": "f32", "shape": [0],
            "section": "dense", "offset": 0, "length": 0
        }));
    });
    let e = open_error(&path);
    assert_eq!(e.rule(), 25, "{e}");
    assert!(e.to_string().contains("not a block type"), "{e}");
}

#[test]
fn rule_26_down_scales_must_be_finite_and_positive_when_the_data_is_read() {
    // The committed broken file: layer 1's first scale value is zero.
    let path = common::fixtures().join("broken/r26-zero-down-scale.flashpack");
    let file = PackedFile::open(&path).unwrap();
    let failures = check_integrity(&file).unwrap().failures;
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0].rule(), 26);
    assert!(
        failures[0].to_string().contains("value 0 is 0"),
        "{}",
        failures[0]
    );
    match Model::load(
        &file.config,
        &file.names,
        &PackedWeights::read_all(&file).unwrap(),
    ) {
        Err(Error::Format { source, .. }) => assert_eq!(source.rule(), 26),
        Err(other) => panic!("expected rule 26, got {other}"),
        Ok(_) => panic!("a zero down scale was loaded"),
    }
}

/// A file without down scales (as written before format 9.6) still opens and
/// computes the plain blocks' values: dropping the scale tensors from a q8
/// file's table changes the model (the blocks hold scaled values), and the
/// file stays valid.
#[test]
fn a_quantized_file_without_down_scales_is_valid_and_reads_the_plain_blocks() {
    let (_t, path) = packed("q8");
    let logits = |path: &Path| {
        let file = PackedFile::open(path).unwrap();
        let model = Model::load(
            &file.config,
            &file.names,
            &PackedWeights::read_all(&file).unwrap(),
        )
        .unwrap();
        model
            .forward(&mut model.new_cache(), &[1, 2, 3], Logits::Last, None)
            .unwrap()
    };
    let with = logits(&path);
    rewrite_manifest(&path, |m| {
        m["tensors"]
            .as_array_mut()
            .unwrap()
            .retain(|t| !t["name"].as_str().unwrap().ends_with(".down_scale"));
    });
    let file = PackedFile::open(&path).unwrap();
    assert!(check_integrity(&file).unwrap().failures.is_empty());
    let without = logits(&path);
    assert!(with.iter().all(|v| v.is_finite()));
    assert!(
        common::nmse(&without, &with) > 1e-6,
        "the scale changes what the down projection computes"
    );
}

#[test]
fn convert_refuses_what_it_cannot_quantize() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.flashpack");
    // micro-llama: hidden 16, not a multiple of 32.
    let options = ConvertOptions {
        quant: parse_policy("q8").unwrap(),
        ..ConvertOptions::default()
    };
    let e = convert(
        &common::fixtures().join("models/micro-llama"),
        &out,
        &options,
        &|_, _, _| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains("not a multiple of 32"), "{e}");
    assert!(!out.exists(), "no half-written output");
}

/// `verify --against` reports the quantization error and holds it to limits.
#[test]
fn verify_against_reports_the_quantization_error() {
    verify_against("ffn=q4,attn=q8,embed=q8", 5e-2);
    // q8_0 FFN layers: the down scales compared too (format 9.6).
    verify_against("q8", 1e-3);
}

fn verify_against(policy: &str, tensor_limit: f64) {
    let (_t, path) = packed(policy);
    let out = Command::new(env!("CARGO_BIN_EXE_flashpack"))
        .arg("verify")
        .arg(&path)
        .arg("--against")
        .arg(model_dir())
        .arg("--text")
        .arg(common::fixtures().join("text/heldout.txt"))
        .arg("--json")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], true);
    let errors = v["quant_errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1 + 2 * 7);
    let reference = reference();
    for e in errors {
        let name = e["tensor"].as_str().unwrap();
        assert_eq!(e["blocks_differing"], 0, "{name}");
        let scaled = e["dtype"] == "q8_0" && name.ends_with("down_proj.weight");
        assert_eq!(
            e.get("scales_differing"),
            scaled.then_some(&json!(0)),
            "{name}"
        );
        let key = if scaled {
            "q8_0_scaled_nmse".to_string()
        } else {
            format!("{}_nmse", e["dtype"].as_str().unwrap())
        };
        let want = reference["tensors"][name][&key].as_f64().unwrap();
        let got = e["nmse"].as_f64().unwrap();
        assert!((got / want - 1.0).abs() < 1e-6, "{name}: {got} vs {want}");
    }
    assert_eq!(v["tensor_nmse_limit"], tensor_limit);
    assert!(v["perplexity_ratio"].as_f64().unwrap() > 0.9);
    assert!(v["logit_nmse"].as_f64().unwrap() > 0.0);
}

/// The model `run` and `eval` load (block-quantized weights kept in their
/// blocks, integer kernels with 8-bit activations) against the file's exact
/// model (every weight dequantized to f32): logits and held-out perplexity
/// within stated bounds (the activations' 8-bit rounding is the difference),
/// and the same bits at any thread count.
#[test]
fn the_model_kept_quantized_stays_close_to_the_dequantized_one() {
    let reference = reference();
    let text = std::fs::read_to_string(common::fixtures().join("text/heldout.txt")).unwrap();
    // (policy, logit NMSE bound, perplexity bound as a fraction): measured
    // 1.9e-5 and +2.5e-5 (q8), 1.5e-5 and +1.0e-4 (q4); bounds 10x above.
    for (policy, key, logit_bound, ppl_bound) in
        [("q8", "q8_0", 2e-4, 3e-4), ("q4", "q4_1", 2e-4, 1e-3)]
    {
        let (_t, path) = packed(policy);
        let file = PackedFile::open(&path).unwrap();
        let exact = Model::load(
            &file.config,
            &file.names,
            &PackedWeights::read_all(&file).unwrap(),
        )
        .unwrap();
        let kept = Model::load(
            &file.config,
            &file.names,
            &PackedWeights::read_all_quantized(&file).unwrap(),
        )
        .unwrap();
        assert!(
            kept.decode_weight_bytes() * 3 < exact.decode_weight_bytes(),
            "{policy}: the blocks, not f32 copies ({} vs {} bytes)",
            kept.decode_weight_bytes(),
            exact.decode_weight_bytes()
        );
        let ids: Vec<u32> = reference["models"][key]["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let logits = |m: &Model, ids: &[u32]| {
            m.forward(&mut m.new_cache(), ids, Logits::Last, None)
                .unwrap()
        };
        let want = logits(&exact, &ids);
        let got = logits(&kept, &ids);
        let e = common::nmse(&got, &want);
        eprintln!("{policy}: logit NMSE kept vs dequantized {e:e}");
        assert!(e < logit_bound && e > 0.0, "{policy}: logit NMSE {e:e}");
        // Thread count: the same bits; decode token by token: the same
        // final logits as the prefill of the whole prompt, within rounding.
        let one = flashpack::runtime::with_threads(Some(1), || logits(&kept, &ids)).unwrap();
        let three = flashpack::runtime::with_threads(Some(3), || logits(&kept, &ids)).unwrap();
        assert!(
            one == got && three == got,
            "{policy}: thread count changed the logits"
        );
        let tokenizer = flashpack::runtime::packed::packed_tokenizer(&file).unwrap();
        let held = tokenizer.encode(&text).unwrap();
        // Windows of 16 tokens: each goes through the integer kernels (longer
        // batches take the GEMM on dequantized weights, nearly exact).
        let a = flashpack::runtime::perplexity::perplexity(&exact, &held, 16).unwrap();
        let b = flashpack::runtime::perplexity::perplexity(&kept, &held, 16).unwrap();
        let rel = b.perplexity / a.perplexity - 1.0;
        eprintln!(
            "{policy}: perplexity dequantized {} kept {} ({rel:+e})",
            a.perplexity, b.perplexity
        );
        assert!(rel.abs() < ppl_bound, "{policy}: perplexity {rel:+e}");
    }
}
