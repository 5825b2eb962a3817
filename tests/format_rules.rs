//! One test per numbered MUST rule of formats/flashpack-v1.md: each builds a real
//! packed file, breaks exactly that rule, and checks the reader reports that rule
//! (and never panics). Test names carry the rule number.

use std::path::{Path, PathBuf};

use flashpack::format::integrity::check_integrity;
use flashpack::format::layout::{Preamble, PREAMBLE_BYTES};
use flashpack::format::{FormatError, PackedFile};
use flashpack::pack::{convert, ConvertOptions};
use flashpack::Error;
use serde_json::Value;
use sha2::{Digest, Sha256};

const MODEL: &str = "opt-relu";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/models")
        .join(name)
}

/// A freshly converted file in a temporary directory.
fn packed(zstd_level: i32) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model.flashpack");
    let options = ConvertOptions {
        zstd_level,
        ..ConvertOptions::default()
    };
    convert(&fixture(MODEL), &out, &options, flashpack::progress::SILENT).unwrap();
    (tmp, out)
}

/// A copy of the calibrated micro-llama file of `fixtures/broken/` (with a
/// predictor section, predictors and calibration statistics).
fn calibrated() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("calibrated.flashpack");
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/broken/base.flashpack");
    std::fs::copy(base, &out).unwrap();
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

/// Replaces the manifest with an edited one, fixing up the preamble so that only
/// the edit is wrong.
fn rewrite_manifest(path: &Path, edit: impl FnOnce(&mut Value)) {
    let bytes = std::fs::read(path).unwrap();
    let mut p = preamble(&bytes);
    let mut m: Value = serde_json::from_slice(&bytes[p.manifest_offset as usize..]).unwrap();
    edit(&mut m);
    let new = serde_json::to_vec(&m).unwrap();
    write_manifest_bytes(path, &bytes[..p.manifest_offset as usize], &mut p, &new);
}

fn write_manifest_bytes(path: &Path, body: &[u8], p: &mut Preamble, manifest: &[u8]) {
    p.manifest_length = manifest.len() as u64;
    p.manifest_sha256 = Sha256::digest(manifest).into();
    let mut out = body.to_vec();
    out[..PREAMBLE_BYTES as usize].copy_from_slice(&p.to_bytes());
    out.extend_from_slice(manifest);
    std::fs::write(path, out).unwrap();
}

fn patch(path: &Path, offset: u64, new: &[u8]) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[offset as usize..offset as usize + new.len()].copy_from_slice(new);
    std::fs::write(path, bytes).unwrap();
}

/// The rule `PackedFile::open` reports.
fn open_error(path: &Path) -> FormatError {
    match PackedFile::open(path) {
        Err(Error::Format { source, .. }) => source,
        Err(other) => panic!("expected a format error, got {other}"),
        Ok(_) => panic!("file was accepted"),
    }
}

/// The rules a full integrity check reports on a file that opens.
fn integrity_failures(path: &Path) -> Vec<FormatError> {
    let file = PackedFile::open(path).unwrap_or_else(|e| panic!("should open: {e}"));
    check_integrity(&file).unwrap().failures
}

fn section<'a>(m: &'a Value, name: &str) -> &'a Value {
    m["sections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap()
}

fn section_index(m: &Value, name: &str) -> usize {
    m["sections"]
        .as_array()
        .unwrap()
        .iter()
        .position(|s| s["name"] == name)
        .unwrap()
}

fn hex_sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[test]
fn a_fresh_file_passes_every_rule() {
    let (_t, path) = packed(3);
    assert!(integrity_failures(&path).is_empty());
}

#[test]
fn rule_01_bad_magic() {
    let (_t, path) = packed(3);
    patch(&path, 0, b"GGUF");
    assert_eq!(open_error(&path).rule(), 1);
    std::fs::write(&path, b"FLASH").unwrap();
    assert_eq!(
        open_error(&path).rule(),
        1,
        "a file shorter than the preamble"
    );
}

#[test]
fn rule_02_unknown_version_has_its_own_error() {
    let (_t, path) = packed(3);
    patch(&path, 8, &2u32.to_le_bytes());
    let err = open_error(&path);
    assert_eq!(
        err,
        FormatError::UnsupportedVersion {
            found: 2,
            supported: 1
        }
    );
    assert!(err.to_string().contains("version 2"));
}

#[test]
fn rule_03_reserved_flags() {
    let (_t, path) = packed(3);
    patch(&path, 12, &1u32.to_le_bytes());
    assert_eq!(open_error(&path).rule(), 3);
}

#[test]
fn rule_04_truncated_file_and_trailing_bytes() {
    let (_t, path) = packed(3);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
    assert_eq!(open_error(&path).rule(), 4);
    let mut longer = bytes.clone();
    longer.extend_from_slice(&[0; 7]);
    std::fs::write(&path, longer).unwrap();
    assert_eq!(open_error(&path).rule(), 4);
    // A manifest pointing past the end.
    let mut p = preamble(&bytes);
    p.manifest_offset = u64::MAX - 3;
    let mut bad = bytes.clone();
    bad[..64].copy_from_slice(&p.to_bytes());
    std::fs::write(&path, bad).unwrap();
    assert_eq!(open_error(&path).rule(), 4);
}

#[test]
fn rule_05_manifest_hash() {
    let (_t, path) = packed(3);
    let len = std::fs::metadata(&path).unwrap().len();
    patch(&path, len - 2, b"!");
    let err = open_error(&path);
    assert_eq!(err.rule(), 5);
    assert!(
        err.is_integrity(),
        "a damaged manifest is a failed check (exit 1)"
    );
}

#[test]
fn rule_06_manifest_schema() {
    let (_t, path) = packed(3);
    rewrite_manifest(&path, |m| {
        m.as_object_mut().unwrap().remove("sections");
    });
    assert_eq!(open_error(&path).rule(), 6);
    rewrite_manifest(&path, |m| *m = serde_json::json!([1, 2]));
    assert_eq!(open_error(&path).rule(), 6);
    // Keys whose value may be null must still be there.
    for key in ["generation_config", "tokenizer_config"] {
        let (_t, path) = packed(3);
        rewrite_manifest(&path, |m| {
            m.as_object_mut().unwrap().remove(key);
        });
        let e = open_error(&path);
        assert_eq!(e.rule(), 6, "{key}: {e}");
        let (_t, path) = packed(3);
        rewrite_manifest(&path, |m| m[key] = serde_json::Value::Null);
        assert!(PackedFile::open(&path).is_ok(), "{key}: null is allowed");
    }
}

#[test]
fn rule_06_nested_types() {
    type Edit = fn(&mut Value);
    let edits: [(&str, Edit); 5] = [
        ("generation_config a number", |m| {
            m["generation_config"] = 5.into()
        }),
        ("tokenizer_config a string", |m| {
            m["tokenizer_config"] = "none".into()
        }),
        ("config an array", |m| m["config"] = serde_json::json!([])),
        ("an uppercase source digest", |m| {
            let d = &mut m["provenance"]["source_files"][0]["sha256"];
            *d = d.as_str().unwrap().to_uppercase().into();
        }),
        ("a short calibration file digest", |m| {
            m["calibration"]["files"][0]["sha256"] = "abc".into()
        }),
    ];
    for (what, edit) in edits {
        let (_t, path) = calibrated();
        rewrite_manifest(&path, edit);
        let e = open_error(&path);
        assert_eq!(e.rule(), 6, "{what}: {e}");
    }
    // A number beyond binary64 is not a number this format holds.
    let (_t, path) = calibrated();
    let bytes = std::fs::read(&path).unwrap();
    let mut p = preamble(&bytes);
    let text = String::from_utf8(bytes[p.manifest_offset as usize..].to_vec()).unwrap();
    let edited = text.replacen("\"recall\":", "\"recall\":1e400,\"was\":", 1);
    assert_ne!(edited, text);
    let body = bytes[..p.manifest_offset as usize].to_vec();
    write_manifest_bytes(&path, &body, &mut p, edited.as_bytes());
    assert_eq!(open_error(&path).rule(), 6, "1e400");
}

#[test]
fn without_calibration_the_writer_writes_null_and_an_empty_array_and_absent_keys_read_the_same() {
    let (_t, path) = packed(3);
    let m = manifest(&path);
    assert_eq!(m["calibration"], Value::Null);
    assert!(m.as_object().unwrap().contains_key("calibration"));
    assert_eq!(m["predictors"], serde_json::json!([]));
    rewrite_manifest(&path, |m| {
        let m = m.as_object_mut().unwrap();
        m.remove("calibration");
        m.remove("predictors");
    });
    let file = PackedFile::open(&path).unwrap();
    assert!(file.manifest.calibration.is_none() && file.manifest.predictors.is_empty());
    // The identity order: neuron p of the file is the checkpoint's neuron p.
    let order = file.neuron_order(0).unwrap();
    assert_eq!(order, (0..order.len() as u32).collect::<Vec<_>>());
}

/// A fresh OPT file (tied, pre-LN, with biases, 4 layers) follows the choices
/// section 6 of the spec describes, so that another writer can match it: the
/// section list and chunk sizes, the dense tensors in the order of 3.2 at
/// multiples of 64, the identity order, and the manifest's formatting.
#[test]
fn the_writer_makes_the_choices_of_section_6() {
    let (_t, path) = packed(3);
    let bytes = std::fs::read(&path).unwrap();
    let p = preamble(&bytes);
    let text = std::str::from_utf8(&bytes[p.manifest_offset as usize..]).unwrap();
    let m: Value = serde_json::from_str(text).unwrap();
    let sections: Vec<(&str, &str, u64, &str)> = m["sections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap(),
                s["kind"].as_str().unwrap(),
                s["chunk_raw_bytes"].as_u64().unwrap(),
                s["compression"].as_str().unwrap(),
            )
        })
        .collect();
    // Bundles of 2 parts x 128 f32 values: 1024 bytes, 64 to a chunk.
    let ffn = |name| (name, "ffn", 65536, "none");
    assert_eq!(
        sections,
        vec![
            ("tokenizer.json", "file", 1 << 20, "zstd"),
            ("dense", "dense", 1 << 20, "zstd"),
            ffn("ffn.0"),
            ffn("ffn.1"),
            ffn("ffn.2"),
            ffn("ffn.3"),
        ]
    );
    let mut expected = vec![
        "model.decoder.embed_tokens.weight".to_string(),
        "model.decoder.embed_positions.weight".into(),
        "model.decoder.final_layer_norm.weight".into(),
        "model.decoder.final_layer_norm.bias".into(),
    ];
    for i in 0..4 {
        let l = format!("model.decoder.layers.{i}");
        for t in [
            "self_attn_layer_norm.weight",
            "self_attn_layer_norm.bias",
            "self_attn.q_proj.weight",
            "self_attn.q_proj.bias",
            "self_attn.k_proj.weight",
            "self_attn.k_proj.bias",
            "self_attn.v_proj.weight",
            "self_attn.v_proj.bias",
            "self_attn.out_proj.weight",
            "self_attn.out_proj.bias",
            "final_layer_norm.weight",
            "final_layer_norm.bias",
            "fc1.bias",
            "fc2.bias",
        ] {
            expected.push(format!("{l}.{t}"));
        }
    }
    expected.extend((0..4).map(|i| format!("flashpack.ffn.{i}.order")));
    let tensors = m["tensors"].as_array().unwrap();
    let names: Vec<&str> = tensors
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, expected);
    let mut end = 0u64;
    for t in tensors {
        let offset = t["offset"].as_u64().unwrap();
        assert_eq!(offset, end.div_ceil(64) * 64, "{}", t["name"]);
        end = offset + t["length"].as_u64().unwrap();
    }
    assert_eq!(
        section(&m, "dense")["raw_length"],
        end,
        "no trailing padding"
    );
    // The manifest: compact, keys in the spec's order, copied JSON sorted and
    // its numbers written as section 6 says.
    assert!(text.starts_with("{\"format_version\":1,\"alignment\":4096,\"config\":{\"_"));
    let keys: Vec<&str> = m.as_object().unwrap().keys().map(String::as_str).collect();
    let mut at = 0;
    for key in [
        "format_version",
        "alignment",
        "config",
        "generation_config",
        "tokenizer_config",
        "sections",
        "tensors",
        "ffn_layers",
        "provenance",
        "calibration",
        "predictors",
    ] {
        assert!(keys.contains(&key), "{key}");
        let found = text.find(&format!("\"{key}\":")).unwrap();
        assert!(found >= at, "{key} out of order");
        at = found;
    }
    assert!(!text.contains(": ") && !text.contains('\n'));
    let config = serde_json::to_string(&m["config"]).unwrap();
    assert!(text.contains(&format!("\"config\":{config},")));
    let source = std::fs::read_to_string(fixture(MODEL).join("config.json")).unwrap();
    assert!(source.contains("\"init_std\": 0.02"), "fixture changed");
    assert!(text.contains("\"init_std\":0.02,"));
    // Uncalibrated: the identity order.
    let file = PackedFile::open(&path).unwrap();
    for l in 0..4 {
        assert_eq!(
            file.neuron_order(l).unwrap(),
            (0..512).collect::<Vec<u32>>()
        );
    }

    // Calibrated: the predictor section's chunks and tensors, and a copied
    // number that is written differently from the checkpoint's text.
    let (_t, path) = calibrated();
    let m = manifest(&path);
    let s = section(&m, "predictors");
    assert_eq!(
        (&s["kind"], &s["chunk_raw_bytes"]),
        (&"predictor".into(), &(1 << 20).into())
    );
    let names: Vec<&str> = m["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["section"] == "predictors")
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    let expected: Vec<String> = (0..2)
        .flat_map(|l| ["a", "b", "bias"].map(|p| format!("flashpack.predictor.{l}.{p}")))
        .collect();
    assert_eq!(names, expected);
    let source = std::fs::read_to_string(fixture("micro-llama").join("config.json")).unwrap();
    assert!(
        source.contains("\"rms_norm_eps\": 1e-05"),
        "fixture changed"
    );
    let bytes = std::fs::read(&path).unwrap();
    let text = String::from_utf8_lossy(&bytes[preamble(&bytes).manifest_offset as usize..]);
    assert!(
        text.contains("\"rms_norm_eps\":0.00001,"),
        "1e-05 is written 0.00001"
    );
}

#[test]
fn rule_07_alignment() {
    let (_t, path) = packed(3);
    rewrite_manifest(&path, |m| m["alignment"] = 1000.into());
    assert_eq!(open_error(&path).rule(), 7);
}

#[test]
fn rule_08_misaligned_section() {
    let (_t, path) = packed(3);
    rewrite_manifest(&path, |m| {
        let off = m["sections"][1]["offset"].as_u64().unwrap();
        m["sections"][1]["offset"] = (off + 8).into();
    });
    assert_eq!(open_error(&path).rule(), 8);
}

#[test]
fn rule_09_overlapping_sections() {
    let (_t, path) = packed(3);
    rewrite_manifest(&path, |m| {
        let first = m["sections"][0]["offset"].clone();
        m["sections"][1]["offset"] = first;
    });
    assert_eq!(open_error(&path).rule(), 9);
}

#[test]
fn rule_10_hole_between_sections() {
    let (_t, path) = packed(3);
    // Insert one alignment unit of zeros before the last section and move it (and
    // the manifest) along: everything stays aligned and hash-correct, with a hole.
    let bytes = std::fs::read(&path).unwrap();
    let mut p = preamble(&bytes);
    let mut m: Value = serde_json::from_slice(&bytes[p.manifest_offset as usize..]).unwrap();
    let align = m["alignment"].as_u64().unwrap();
    let last = m["sections"].as_array().unwrap().len() - 1;
    let at = m["sections"][last]["offset"].as_u64().unwrap();
    m["sections"][last]["offset"] = (at + align).into();
    let mut body = bytes[..at as usize].to_vec();
    body.extend(std::iter::repeat_n(0u8, align as usize));
    body.extend_from_slice(&bytes[at as usize..p.manifest_offset as usize]);
    p.manifest_offset += align;
    write_manifest_bytes(&path, &body, &mut p, &serde_json::to_vec(&m).unwrap());
    let err = open_error(&path);
    assert_eq!(err.rule(), 10, "{err}");
}

#[test]
fn rule_11_nonzero_padding() {
    let (_t, path) = packed(3);
    patch(&path, 100, &[0xAB]);
    let failures = integrity_failures(&path);
    assert_eq!(failures, vec![FormatError::NonZeroPadding { offset: 100 }]);
}

#[test]
fn rule_12_section_hash() {
    let (_t, path) = packed(3);
    rewrite_manifest(&path, |m| {
        m["sections"][2]["sha256"] = "0".repeat(64).into()
    });
    let name = manifest(&path)["sections"][2]["name"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        integrity_failures(&path),
        vec![FormatError::SectionHash { section: name }]
    );
}

#[test]
fn rule_13_chunk_table() {
    let (_t, path) = packed(3);
    rewrite_manifest(&path, |m| {
        m["sections"][2]["chunks"].as_array_mut().unwrap().pop();
    });
    assert_eq!(open_error(&path).rule(), 13);
    let (_t, path) = packed(3);
    rewrite_manifest(&path, |m| {
        let i = section_index(m, "ffn.0");
        // Chunks must be whole bundles.
        m["sections"][i]["chunk_raw_bytes"] = 1000.into();
    });
    assert_eq!(open_error(&path).rule(), 13);
    // The FFN limit applies to the declared chunk_raw_bytes, even where the
    // section is one chunk shorter than it.
    let (_t, path) = calibrated();
    rewrite_manifest(&path, |m| {
        let i = section_index(m, "ffn.0");
        let stride = m["ffn_layers"][0]["bundle_bytes"].as_u64().unwrap();
        assert_eq!(m["sections"][i]["chunks"].as_array().unwrap().len(), 1);
        let over = (65536 / stride + 1) * stride;
        m["sections"][i]["chunk_raw_bytes"] = over.into();
    });
    let e = open_error(&path);
    assert_eq!(e.rule(), 13, "{e}");
}

#[test]
fn rule_13_digests_are_64_lowercase_hex_digits() {
    // An uppercase digest could never equal the computed one: it is refused
    // when the manifest is read, not reported later as damage (rule 12 or 14).
    for chunk in [true, false] {
        let (_t, path) = packed(3);
        rewrite_manifest(&path, |m| {
            let i = section_index(m, "ffn.0");
            let s = &mut m["sections"][i];
            let digest = if chunk {
                &mut s["chunks"][0]["sha256"]
            } else {
                &mut s["sha256"]
            };
            *digest = digest.as_str().unwrap().to_uppercase().into();
        });
        let e = open_error(&path);
        assert_eq!(e.rule(), 13, "chunk digest: {chunk}: {e}");
        assert!(e.to_string().contains("lowercase hex"), "{e}");
    }
    let (_t, path) = packed(3);
    rewrite_manifest(&path, |m| {
        let i = section_index(m, "dense");
        m["sections"][i]["sha256"] = "ab".repeat(31).into();
    });
    assert_eq!(open_error(&path).rule(), 13, "62 digits");
}

#[test]
fn rule_14_chunk_hash_names_section_and_chunk() {
    let (_t, path) = packed(3);
    let m = manifest(&path);
    let ffn = section(&m, "ffn.1");
    let chunk_len = ffn["chunks"][0]["length"].as_u64().unwrap();
    let offset = ffn["offset"].as_u64().unwrap() + chunk_len + 5; // inside chunk 1
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[offset as usize] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();
    let failures = integrity_failures(&path);
    assert!(failures.contains(&FormatError::ChunkHash {
        section: "ffn.1".into(),
        chunk: 1,
        offset: ffn["offset"].as_u64().unwrap() + chunk_len
    }));
    assert!(failures.contains(&FormatError::SectionHash {
        section: "ffn.1".into()
    }));
}

#[test]
fn rule_15_chunk_that_does_not_decompress() {
    let (_t, path) = packed(3);
    let m = manifest(&path);
    let i = section_index(&m, "dense");
    let dense = &m["sections"][i];
    let offset = dense["offset"].as_u64().unwrap();
    let len = dense["chunks"][0]["length"].as_u64().unwrap() as usize;
    // Garbage with correct hashes: only the decompression can tell.
    let mut bytes = std::fs::read(&path).unwrap();
    for b in &mut bytes[offset as usize + 8..offset as usize + len] {
        *b = 0x5A;
    }
    let chunk_sha = hex_sha(&bytes[offset as usize..offset as usize + len]);
    let total = dense["length"].as_u64().unwrap() as usize;
    let section_sha = hex_sha(&bytes[offset as usize..offset as usize + total]);
    std::fs::write(&path, bytes).unwrap();
    rewrite_manifest(&path, |m| {
        m["sections"][i]["chunks"][0]["sha256"] = chunk_sha.into();
        m["sections"][i]["sha256"] = section_sha.into();
    });
    let failures = integrity_failures(&path);
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0].rule(), 15);
}

#[test]
fn rule_16_section_table() {
    let (_t, path) = packed(3);
    rewrite_manifest(&path, |m| {
        let i = section_index(m, "tokenizer.json");
        m["sections"][i]["name"] = "vocab.json".into();
    });
    assert_eq!(open_error(&path).rule(), 16);
    let (_t, path) = packed(3);
    rewrite_manifest(&path, |m| {
        let i = section_index(m, "ffn.0");
        m["sections"][i]["compression"] = "zstd".into();
    });
    assert_eq!(open_error(&path).rule(), 16);
    let (_t, path) = packed(3);
    rewrite_manifest(&path, |m| {
        let i = section_index(m, "dense");
        // A kind tensors may lie in, so only the required kind catches it.
        m["sections"][i]["kind"] = "predictor".into();
    });
    assert_eq!(
        open_error(&path).rule(),
        16,
        "a required section of the wrong kind"
    );
}

#[test]
fn rule_16_a_predictors_section_must_be_of_kind_predictor() {
    let (_t, path) = calibrated();
    rewrite_manifest(&path, |m| {
        let i = section_index(m, "predictors");
        // A kind tensors may lie in (rule 17 holds).
        m["sections"][i]["kind"] = "dense".into();
    });
    let e = open_error(&path);
    assert_eq!(e.rule(), 16, "{e}");
    // Without predictors the section is optional.
    let (_t, path) = packed(3);
    assert!(PackedFile::open(&path)
        .unwrap()
        .section("predictors")
        .is_none());
}

#[test]
fn rule_17_tensor_table() {
    let (_t, path) = packed(3);
    rewrite_manifest(&path, |m| {
        let len = m["tensors"][0]["length"].as_u64().unwrap();
        m["tensors"][0]["length"] = (len + 2).into();
    });
    assert_eq!(open_error(&path).rule(), 17);
    let (_t, path) = packed(3);
    rewrite_manifest(&path, |m| {
        let off = m["tensors"][0]["offset"].clone();
        m["tensors"][1]["offset"] = off;
    });
    assert_eq!(open_error(&path).rule(), 17, "overlapping tensors");
    // A tensor of length 0 overlaps nothing, even at an offset inside another.
    let (_t, path) = packed(3);
    rewrite_manifest(&path, |m| {
        let mut empty = m["tensors"][0].clone();
        let inside = empty["offset"].as_u64().unwrap() + 2;
        empty["name"] = "extra.empty".into();
        empty["shape"] = serde_json::json!([0]);
        empty["offset"] = inside.into();
        empty["length"] = 0.into();
        m["tensors"].as_array_mut().unwrap().push(empty);
    });
    assert!(PackedFile::open(&path).is_ok());
}

#[test]
fn rule_18_two_layers_cannot_share_a_section_or_an_order() {
    for key in ["section", "order_tensor"] {
        let (_t, path) = packed(3);
        rewrite_manifest(&path, |m| {
            let first = m["ffn_layers"][0][key].clone();
            m["ffn_layers"][1][key] = first;
        });
        let e = open_error(&path);
        assert_eq!(e.rule(), 18, "{key}: {e}");
        assert!(
            e.to_string().contains("FFN layers 0 and 1 both name"),
            "{e}"
        );
    }
}

#[test]
fn rule_18_model_consistency() {
    let (_t, path) = packed(3);
    rewrite_manifest(&path, |m| {
        m["ffn_layers"].as_array_mut().unwrap().pop();
    });
    assert_eq!(open_error(&path).rule(), 18);
    let (_t, path) = packed(3);
    rewrite_manifest(&path, |m| m["config"]["ffn_dim"] = 96.into());
    assert_eq!(open_error(&path).rule(), 18);
    let (_t, path) = packed(3);
    rewrite_manifest(&path, |m| {
        m["config"]["architectures"] = serde_json::json!(["GPTJForCausalLM"])
    });
    assert_eq!(open_error(&path).rule(), 18);
}

#[test]
fn rule_18_thresholds_are_finite_32_bit_floats_and_silu_thresholds_not_negative() {
    type Edit = fn(&mut Value);
    let edits: [(&str, Edit); 3] = [
        // Beyond the binary32 range: it rounds to infinity.
        ("silu_threshold 1e39", |m| {
            m["calibration"]["layers"][1]["silu_threshold"] = 1e39.into()
        }),
        ("silu_threshold -0.5", |m| {
            m["calibration"]["layers"][0]["silu_threshold"] = (-0.5).into()
        }),
        ("predictor threshold 1e39", |m| {
            m["predictors"][1]["threshold"] = 1e39.into()
        }),
    ];
    for (what, edit) in edits {
        let (_t, path) = calibrated();
        rewrite_manifest(&path, edit);
        let e = open_error(&path);
        assert_eq!(e.rule(), 18, "{what}: {e}");
    }
    // The largest binary32 and zero are fine.
    let (_t, path) = calibrated();
    rewrite_manifest(&path, |m| {
        m["calibration"]["layers"][0]["silu_threshold"] = 3.4028235e38.into();
        m["calibration"]["layers"][1]["silu_threshold"] = 0.0.into();
        m["predictors"][0]["threshold"] = (-3.4028235e38).into();
    });
    let file = PackedFile::open(&path).unwrap();
    let cal = file.manifest.calibration.as_ref().unwrap();
    assert_eq!(cal.layers[0].silu_threshold, Some(f32::MAX));
    assert_eq!(file.manifest.predictors[0].threshold, f32::MIN);
}

#[test]
fn rule_19_neuron_order_must_be_a_permutation() {
    // Uncompressed dense part, so the order bytes can be edited in place.
    let (_t, path) = packed(0);
    let m = manifest(&path);
    let i = section_index(&m, "dense");
    let dense = &m["sections"][i];
    let order = m["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "flashpack.ffn.0.order")
        .unwrap();
    let at = dense["offset"].as_u64().unwrap() + order["offset"].as_u64().unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    // Neuron 1 listed twice, neuron 0 never.
    bytes[at as usize..at as usize + 4].copy_from_slice(&1u32.to_le_bytes());
    let chunk_raw = dense["chunk_raw_bytes"].as_u64().unwrap();
    let chunk = ((at - dense["offset"].as_u64().unwrap()) / chunk_raw) as usize;
    let start = dense["offset"].as_u64().unwrap() as usize + chunk * chunk_raw as usize;
    let chunk_len = dense["chunks"][chunk]["length"].as_u64().unwrap() as usize;
    let chunk_sha = hex_sha(&bytes[start..start + chunk_len]);
    let s0 = dense["offset"].as_u64().unwrap() as usize;
    let section_sha = hex_sha(&bytes[s0..s0 + dense["length"].as_u64().unwrap() as usize]);
    std::fs::write(&path, bytes).unwrap();
    rewrite_manifest(&path, |m| {
        m["sections"][i]["chunks"][chunk]["sha256"] = chunk_sha.into();
        m["sections"][i]["sha256"] = section_sha.into();
    });
    let failures = integrity_failures(&path);
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0].rule(), 19);
}

#[test]
fn rule_13_compression_ratio_is_capped() {
    let (_t, path) = packed(3);
    rewrite_manifest(&path, |m| {
        let i = section_index(m, "tokenizer.json");
        let len = m["sections"][i]["length"].as_u64().unwrap();
        let chunk = m["sections"][i]["chunk_raw_bytes"].as_u64().unwrap();
        // Claim a huge raw size with a consistent chunk count.
        let raw = len * 2048;
        m["sections"][i]["raw_length"] = raw.into();
        let n = raw.div_ceil(chunk) as usize;
        let first = m["sections"][i]["chunks"][0].clone();
        let mut chunks = vec![first; n];
        let per = len / n as u64;
        for c in chunks.iter_mut() {
            c["length"] = per.into();
        }
        chunks[n - 1]["length"] = (len - per * (n as u64 - 1)).into();
        m["sections"][i]["chunks"] = chunks.into();
    });
    let err = open_error(&path);
    assert_eq!(err.rule(), 13, "{err}");
    assert!(err.to_string().contains("compression ratio"), "{err}");
}

/// A freshly converted mixture-of-experts file (Qwen2-MoE: layers 0 and 2
/// sparse with 6 experts each, layer 1 dense; uncompressed dense part).
fn packed_moe() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("moe.flashpack");
    let options = ConvertOptions {
        zstd_level: 0,
        ..ConvertOptions::default()
    };
    convert(&fixture("qwen2moe-tiny"), &out, &options, &|_, _, _| {}).unwrap();
    (tmp, out)
}

#[test]
fn rule_31_one_expert_entry_per_expert_of_each_sparse_layer() {
    let (_t, path) = packed_moe();
    PackedFile::open(&path).unwrap();
    type Edit = fn(&mut Value);
    let edits: [(&str, Edit); 7] = [
        ("an expert missing", |m| {
            m["experts"].as_array_mut().unwrap().pop();
        }),
        ("two experts swapped", |m| {
            m["experts"].as_array_mut().unwrap().swap(0, 1);
        }),
        ("the wrong width", |m| {
            m["experts"][3]["neurons"] = 23.into()
        }),
        ("the wrong parts", |m| {
            m["experts"][3]["parts"] = serde_json::json!(["up", "down"])
        }),
        ("a dense section", |m| {
            m["experts"][3]["section"] = "dense".into()
        }),
        ("two experts share an order", |m| {
            let first = m["experts"][0]["order_tensor"].clone();
            m["experts"][1]["order_tensor"] = first;
        }),
        // Experts have no block types in this version (spec 4.1).
        ("a block type", |m| m["experts"][3]["dtype"] = "q4_1".into()),
    ];
    for (what, edit) in edits {
        let (_t, path) = packed_moe();
        rewrite_manifest(&path, edit);
        let e = open_error(&path);
        assert_eq!(e.rule(), 31, "{what}: {e}");
    }
    // A dense model with an expert entry.
    let (_t, moe) = packed_moe();
    let expert = manifest(&moe)["experts"][0].clone();
    let (_t, path) = packed(3);
    rewrite_manifest(&path, |m| m["experts"] = serde_json::json!([expert]));
    let e = open_error(&path);
    assert_eq!(e.rule(), 31, "{e}");
    assert!(e.to_string().contains("without experts"), "{e}");
}

#[test]
fn rule_32_ffn_layers_of_a_moe_model_are_its_dense_layers() {
    type Edit = fn(&mut Value);
    let edits: [(&str, Edit); 2] = [
        ("the dense layer missing", |m| {
            m["ffn_layers"].as_array_mut().unwrap().clear();
        }),
        ("a sparse layer listed", |m| {
            let mut sparse = m["ffn_layers"][0].clone();
            sparse["layer"] = 2.into();
            m["ffn_layers"].as_array_mut().unwrap().push(sparse);
        }),
    ];
    for (what, edit) in edits {
        let (_t, path) = packed_moe();
        rewrite_manifest(&path, edit);
        let e = open_error(&path);
        assert_eq!(e.rule(), 32, "{what}: {e}");
    }
}

#[test]
fn rule_33_expert_order_must_be_a_permutation() {
    let (_t, path) = packed_moe();
    let m = manifest(&path);
    let i = section_index(&m, "dense");
    let dense = &m["sections"][i];
    let order = m["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "flashpack.ffn.2.expert.5.order")
        .unwrap();
    let at = dense["offset"].as_u64().unwrap() + order["offset"].as_u64().unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[at as usize..at as usize + 4].copy_from_slice(&1u32.to_le_bytes());
    let chunk_raw = dense["chunk_raw_bytes"].as_u64().unwrap();
    let chunk = ((at - dense["offset"].as_u64().unwrap()) / chunk_raw) as usize;
    let start = dense["offset"].as_u64().unwrap() as usize + chunk * chunk_raw as usize;
    let chunk_len = dense["chunks"][chunk]["length"].as_u64().unwrap() as usize;
    let chunk_sha = hex_sha(&bytes[start..start + chunk_len]);
    let s0 = dense["offset"].as_u64().unwrap() as usize;
    let section_sha = hex_sha(&bytes[s0..s0 + dense["length"].as_u64().unwrap() as usize]);
    std::fs::write(&path, bytes).unwrap();
    rewrite_manifest(&path, |m| {
        m["sections"][i]["chunks"][chunk]["sha256"] = chunk_sha.into();
        m["sections"][i]["sha256"] = section_sha.into();
    });
    let failures = integrity_failures(&path);
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0].rule(), 33);
    assert!(
        failures[0].to_string().contains("expert 5 of layer 2"),
        "{}",
        failures[0]
    );
}

/// Valid routing statistics for `packed_moe()` (layers 0 and 2 sparse, 6
/// experts, top-2): 10 tokens, 20 choices per layer.
fn routing(m: &mut Value) {
    m["routing"] = serde_json::json!({
        "tokens": 10,
        "files": [],
        "layers": [
            {"layer": 0, "counts": [4, 4, 3, 3, 3, 3]},
            {"layer": 2, "counts": [10, 0, 0, 0, 5, 5]},
        ],
    });
}

#[test]
fn rule_34_routing_statistics_count_each_sparse_layers_choices() {
    let (_t, path) = packed_moe();
    rewrite_manifest(&path, routing);
    let file = PackedFile::open(&path).expect("valid routing statistics");
    let r = file.manifest.routing.as_ref().expect("read back");
    assert_eq!(r.layers[1].counts, vec![10, 0, 0, 0, 5, 5]);
    assert_eq!(r.layers[1].hottest_first(), vec![0, 4, 5, 1, 2, 3]);
    type Edit = fn(&mut Value);
    let edits: [(&str, &str, Edit); 5] = [
        ("a sparse layer missing", "sparse layers", |m| {
            m["routing"]["layers"].as_array_mut().unwrap().pop();
        }),
        ("the dense layer listed", "sparse layers", |m| {
            m["routing"]["layers"][1]["layer"] = 1.into();
        }),
        ("a count missing", "5 counts for 6 experts", |m| {
            m["routing"]["layers"][0]["counts"]
                .as_array_mut()
                .unwrap()
                .pop();
        }),
        (
            "counts that do not sum to tokens x top_k",
            "sum to 21",
            |m| {
                m["routing"]["layers"][0]["counts"][0] = 5.into();
            },
        ),
        (
            "an expert chosen more often than there are tokens",
            "11 times",
            |m| {
                m["routing"]["layers"][1]["counts"] = serde_json::json!([11, 0, 0, 0, 4, 5]);
            },
        ),
    ];
    for (what, says, edit) in edits {
        let (_t, path) = packed_moe();
        rewrite_manifest(&path, |m| {
            routing(m);
            edit(m);
        });
        let e = open_error(&path);
        assert_eq!(e.rule(), 34, "{what}: {e}");
        assert!(e.to_string().contains(says), "{what}: {e}");
    }
    // A file digest of the wrong form is rule 6's, as for calibration files.
    let (_t, path) = packed_moe();
    rewrite_manifest(&path, |m| {
        routing(m);
        m["routing"]["files"] = serde_json::json!([{"name": "t.txt", "bytes": 1, "sha256": "ABC"}]);
    });
    assert_eq!(open_error(&path).rule(), 6);
    // A dense model with routing statistics.
    let (_t, path) = packed(3);
    rewrite_manifest(&path, |m| {
        m["routing"] = serde_json::json!({"tokens": 1, "files": [], "layers": []});
    });
    let e = open_error(&path);
    assert_eq!(e.rule(), 34, "{e}");
    assert!(e.to_string().contains("without experts"), "{e}");
}
