//! The selector copies of format section 10 (issue 12): `convert` writes, for
//! a calibrated SiLU model, int4 copies of gate and up equal to an independent
//! implementation of 10.1 from the checkpoint's rows in packed order; rules
//! 27-29 refuse what the section forbids; `--ffn flash` chooses with the
//! file's copies (held in DRAM, counted in the budget) and is bit-identical to
//! the in-DRAM `predicted` mode with the same selector built at load from the
//! weights, while reading fewer bytes than `naive`; retraining the predictors
//! keeps the copies.

mod common;
use common::fixtures;

use std::path::{Path, PathBuf};
use std::process::Command;

use flashpack::format::integrity::check_integrity;
use flashpack::format::layout::{SelectorType, SELECTOR_SECTION};
use flashpack::format::{FormatError, PackedFile};
use flashpack::pack::convert::SelectorCopies;
use flashpack::pack::{convert, ConvertOptions};
use flashpack::predictor::calibrate::CalibrationOptions;
use flashpack::predictor::pipeline::CalibrationPlan;
use flashpack::predictor::train::{RankChoice, TrainOptions};
use flashpack::runtime::flash::{open_flash, FlashOptions};
use flashpack::runtime::sparse::{FfnMode, Selector};
use flashpack::runtime::{open_model, Logits};
use serde_json::{json, Value};

fn plan() -> CalibrationPlan {
    CalibrationPlan {
        files: vec![fixtures().join("text/train.txt")],
        calibrate: CalibrationOptions {
            max_tokens: 2048,
            ..CalibrationOptions::default()
        },
        train: TrainOptions {
            rank: RankChoice::Fixed(4),
            ..TrainOptions::default()
        },
    }
}

/// llama-silu (SiLU, hidden 128, FFN 384, f32) converted with `selector`,
/// calibrated unless `calibrate` is false.
fn packed(dir: &Path, selector: SelectorCopies, calibrate: bool) -> PathBuf {
    let out = dir.join(format!("llama-silu-{selector:?}-{calibrate}.flashpack"));
    let options = ConvertOptions {
        calibration: calibrate.then(plan),
        selector,
        ..ConvertOptions::default()
    };
    convert(
        &fixtures().join("models/llama-silu"),
        &out,
        &options,
        flashpack::progress::SILENT,
    )
    .unwrap();
    out
}

/// Section 10.1, written again from its text: `x` padded with zeros to a
/// multiple of 32; values as u8 bytes and scales as their stored bytes.
fn reference_row(x: &[f32], kind: SelectorType) -> (Vec<u8>, Vec<u8>) {
    let p = x.len().div_ceil(32) * 32;
    let mut padded = x.to_vec();
    padded.resize(p, 0.0);
    match kind {
        SelectorType::Int8 => {
            let a = padded.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let s = if a > 0.0 { a / 127.0 } else { 1.0 };
            let q = padded
                .iter()
                // f32::round rounds halves away from zero, as 10.1 says.
                .map(|v| (v / s).round().clamp(-127.0, 127.0) as i8 as u8)
                .collect();
            (q, s.to_le_bytes().to_vec())
        }
        SelectorType::Int4 => {
            let (mut values, mut scales) = (Vec::new(), Vec::new());
            for block in padded.chunks(32) {
                let a = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let mut s = half::f16::from_f32(a / 7.0);
                if a == 0.0 || s.to_f32() == 0.0 {
                    s = half::f16::from_f32(1.0);
                }
                let q: Vec<u8> = block
                    .iter()
                    .map(|v| ((v / s.to_f32()).round().clamp(-8.0, 7.0) as i32 + 8) as u8)
                    .collect();
                values.extend((0..16).map(|k| q[k] | (q[k + 16] << 4)));
                scales.extend(s.to_le_bytes());
            }
            (values, scales)
        }
    }
}

/// Each layer's copies in the file against [`reference_row`] of the
/// checkpoint's gate and up rows, in the file's neuron order.
fn assert_copies_match_the_checkpoint(path: &Path, kind: SelectorType) {
    let file = PackedFile::open(path).unwrap();
    let ckpt = flashpack::input::Checkpoint::open(&fixtures().join("models/llama-silu")).unwrap();
    let raw = file.read_section(SELECTOR_SECTION).unwrap();
    let bytes = |name: &str| {
        let t = file.tensor_entry(name).unwrap();
        raw[t.offset as usize..(t.offset + t.length) as usize].to_vec()
    };
    assert_eq!(file.manifest.selectors.len(), file.config.num_layers);
    let hidden = file.config.hidden_size;
    for (l, sel) in file.manifest.selectors.iter().enumerate() {
        assert_eq!((sel.layer, sel.kind), (l as u64, kind));
        let order = file.neuron_order(l).unwrap();
        // Calibration puts hot neurons first: the order is not the identity,
        // so a copy in checkpoint order would fail here.
        assert!(order.iter().enumerate().any(|(p, &i)| p as u32 != i));
        for (part, values, scales) in [
            ("gate", &sel.gate_tensor, &sel.gate_scale_tensor),
            ("up", &sel.up_tensor, &sel.up_scale_tensor),
        ] {
            let w = ckpt
                .tensor(&format!("model.layers.{l}.mlp.{part}_proj.weight"))
                .unwrap()
                .to_f32();
            let (mut want_v, mut want_s) = (Vec::new(), Vec::new());
            for &i in &order {
                let (v, s) =
                    reference_row(&w[i as usize * hidden..(i as usize + 1) * hidden], kind);
                want_v.extend(v);
                want_s.extend(s);
            }
            assert!(bytes(values) == want_v, "layer {l} {part} values");
            assert!(bytes(scales) == want_s, "layer {l} {part} scales");
        }
    }
}

#[test]
fn convert_writes_int4_copies_by_default_for_a_calibrated_silu_model_as_section_10_says() {
    let tmp = tempfile::tempdir().unwrap();
    let path = packed(tmp.path(), SelectorCopies::Auto, true);
    assert_copies_match_the_checkpoint(&path, SelectorType::Int4);
    let file = PackedFile::open(&path).unwrap();
    assert!(check_integrity(&file).unwrap().failures.is_empty());
    // The section is the last one (section 6) and of its own kind.
    let last = file.manifest.sections.last().unwrap();
    assert_eq!(last.name, SELECTOR_SECTION);
    // int4 copies of gate and up: 2 x (128 / 2 + 4 x 2) bytes per neuron of
    // each layer.
    let selector_raw: u64 = file
        .manifest
        .tensors
        .iter()
        .filter(|t| t.section == SELECTOR_SECTION)
        .map(|t| t.length)
        .sum();
    let layers = file.config.num_layers as u64;
    assert_eq!(selector_raw, layers * 2 * 384 * (64 + 8));
    // Explicit int8, and the same bytes whatever the thread count.
    let int8 = packed(tmp.path(), SelectorCopies::Int8, true);
    assert_copies_match_the_checkpoint(&int8, SelectorType::Int8);
    let again = tmp.path().join("again.flashpack");
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap()
        .install(|| {
            convert(
                &fixtures().join("models/llama-silu"),
                &again,
                &ConvertOptions {
                    calibration: Some(plan()),
                    selector: SelectorCopies::Int8,
                    ..ConvertOptions::default()
                },
                flashpack::progress::SILENT,
            )
        })
        .unwrap();
    assert!(std::fs::read(&again).unwrap() == std::fs::read(&int8).unwrap());
}

#[test]
fn none_and_uncalibrated_auto_write_no_copies_and_a_relu_model_refuses_them() {
    let tmp = tempfile::tempdir().unwrap();
    for path in [
        packed(tmp.path(), SelectorCopies::None, true),
        packed(tmp.path(), SelectorCopies::Auto, false),
    ] {
        let file = PackedFile::open(&path).unwrap();
        assert!(file.manifest.selectors.is_empty());
        assert!(file.section(SELECTOR_SECTION).is_none());
        // The key is left out, so such files are as they were before section 10.
        let text = std::fs::read(&path).unwrap();
        let manifest = &text[file.preamble.manifest_offset as usize..];
        assert!(!String::from_utf8_lossy(manifest).contains("\"selectors\""));
    }
    // opt-relu has no gate: an explicit type is refused, nothing is written.
    let out = tmp.path().join("opt.flashpack");
    let run = Command::new(env!("CARGO_BIN_EXE_flashpack"))
        .arg("convert")
        .arg(fixtures().join("models/opt-relu"))
        .arg("-o")
        .arg(&out)
        .args(["--selector", "int4"])
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(2), "{run:?}");
    assert!(String::from_utf8_lossy(&run.stderr).contains("--selector"));
    assert!(!out.exists());
}

/// The file with its manifest edited (re-hashed), as `tests/format_rules.rs`
/// does.
fn rewrite_manifest(path: &Path, edit: impl FnOnce(&mut Value)) {
    use flashpack::format::layout::{Preamble, PREAMBLE_BYTES};
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(path).unwrap();
    let mut p = Preamble::from_bytes(bytes[..PREAMBLE_BYTES as usize].try_into().unwrap());
    let body = &bytes[..p.manifest_offset as usize];
    let mut m: Value = serde_json::from_slice(&bytes[p.manifest_offset as usize..]).unwrap();
    edit(&mut m);
    let manifest = serde_json::to_vec(&m).unwrap();
    p.manifest_length = manifest.len() as u64;
    p.manifest_sha256 = Sha256::digest(&manifest).into();
    let mut out = body.to_vec();
    out[..PREAMBLE_BYTES as usize].copy_from_slice(&p.to_bytes());
    out.extend_from_slice(&manifest);
    std::fs::write(path, out).unwrap();
}

fn open_error(path: &Path) -> FormatError {
    match PackedFile::open(path) {
        Err(flashpack::Error::Format { source, .. }) => source,
        Err(e) => panic!("not a format error: {e}"),
        Ok(_) => panic!("{}: accepted", path.display()),
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

#[test]
fn rules_27_and_28_refuse_misplaced_misshapen_and_missing_copies_at_open() {
    let tmp = tempfile::tempdir().unwrap();
    let base = packed(tmp.path(), SelectorCopies::Int4, false);
    let case = |name: &str, edit: &dyn Fn(&mut Value)| -> FormatError {
        let path = tmp.path().join(name);
        std::fs::copy(&base, &path).unwrap();
        rewrite_manifest(&path, edit);
        open_error(&path)
    };
    // R27: the values of an int4 copy declared [neurons, P] (the int8 shape)
    // with a length to match: rule 17 holds, 10.1's shape does not.
    let e = case("shape.flashpack", &|m| {
        let t = tensor_index(m, "flashpack.selector.1.up");
        assert_eq!(m["tensors"][t]["shape"], json!([384, 64]));
        m["tensors"][t]["shape"] = json!([192, 128]);
    });
    assert_eq!(e.rule(), 27, "{e}");
    assert!(e.to_string().contains("flashpack.selector.1.up"), "{e}");
    // R27: the section holding them of another kind.
    let e = case("kind.flashpack", &|m| {
        let s = m["sections"]
            .as_array()
            .unwrap()
            .iter()
            .position(|s| s["name"] == "selector")
            .unwrap();
        m["sections"][s]["kind"] = json!("predictor");
    });
    assert_eq!(e.rule(), 27, "{e}");
    // R27: u8 tensors that no entry names (the entries removed).
    let e = case("u8.flashpack", &|m| {
        m.as_object_mut().unwrap().remove("selectors");
    });
    assert_eq!(e.rule(), 27, "{e}");
    assert!(e.to_string().contains("is u8"), "{e}");
    // R28: two types in one file.
    let e = case("types.flashpack", &|m| {
        m["selectors"][1]["type"] = json!("int8");
    });
    assert_eq!(e.rule(), 28, "{e}");
    // R28: the entries out of layer order.
    let e = case("order.flashpack", &|m| {
        m["selectors"].as_array_mut().unwrap().swap(0, 1);
    });
    assert_eq!(e.rule(), 28, "{e}");
    // R28: two entries naming the same tensor.
    let e = case("shared.flashpack", &|m| {
        m["selectors"][1]["gate_tensor"] = m["selectors"][0]["gate_tensor"].clone();
    });
    assert_eq!(e.rule(), 28, "{e}");
}

/// Rewrites one raw byte of the selector section (stored uncompressed with
/// `--zstd-level 0`) and its chunk and section hashes: only rule 29 can fail.
fn patch_selector_byte(path: &Path, tensor: &str, at: u64, byte: u8) {
    use sha2::{Digest, Sha256};
    let file = PackedFile::open(path).unwrap();
    let s = file.section(SELECTOR_SECTION).unwrap().clone();
    assert_eq!(s.compression, flashpack::format::layout::Compression::None);
    let t = file.tensor_entry(tensor).unwrap().clone();
    drop(file);
    let mut bytes = std::fs::read(path).unwrap();
    bytes[(s.offset + t.offset + at) as usize] = byte;
    std::fs::write(path, &bytes).unwrap();
    let section = &bytes[s.offset as usize..(s.offset + s.length) as usize];
    let chunk_raw = s.chunk_raw_bytes as usize;
    let hashes: Vec<String> = section
        .chunks(chunk_raw)
        .map(|c| hex::encode(Sha256::digest(c)))
        .collect();
    let whole = hex::encode(Sha256::digest(section));
    rewrite_manifest(path, |m| {
        let i = m["sections"]
            .as_array()
            .unwrap()
            .iter()
            .position(|x| x["name"] == "selector")
            .unwrap();
        m["sections"][i]["sha256"] = json!(whole);
        for (k, h) in hashes.iter().enumerate() {
            m["sections"][i]["chunks"][k]["sha256"] = json!(h);
        }
    });
}

#[test]
fn rule_29_is_checked_by_verify_and_by_the_runtime_that_reads_the_copies() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.flashpack");
    convert(
        &fixtures().join("models/llama-silu"),
        &base,
        &ConvertOptions {
            calibration: Some(plan()),
            selector: SelectorCopies::Int8,
            zstd_level: 0,
            ..ConvertOptions::default()
        },
        flashpack::progress::SILENT,
    )
    .unwrap();
    let failures = |path: &Path| {
        check_integrity(&PackedFile::open(path).unwrap())
            .unwrap()
            .failures
    };
    assert!(failures(&base).is_empty());
    let flash = |path: &Path| {
        open_flash(
            path,
            &FlashOptions {
                mode: FfnMode::Flash,
                ..FlashOptions::default()
            },
        )
        .map(|_| ())
    };
    flash(&base).unwrap();
    for (name, tensor, at, byte, runtime_sees_it) in [
        // A value one step off: only verify, which compares with the bundles.
        ("value", "flashpack.selector.0.up", 5u64, 0x05u8, false),
        // -128, which the SIMD kernel cannot take.
        ("minus128", "flashpack.selector.1.gate", 0, 0x80, true),
        // A zero scale (the first byte of row 0's f32 scale, the rest kept
        // would not do: all four bytes are rewritten below).
        ("scale", "flashpack.selector.0.gate_scale", 3, 0x00, true),
    ] {
        let path = tmp.path().join(format!("{name}.flashpack"));
        std::fs::copy(&base, &path).unwrap();
        if name == "scale" {
            for k in 0..4 {
                patch_selector_byte(&path, tensor, k, 0);
            }
        } else {
            let file = PackedFile::open(&path).unwrap();
            let raw = file.read_section(SELECTOR_SECTION).unwrap();
            let t = file.tensor_entry(tensor).unwrap();
            let old = raw[(t.offset + at) as usize];
            // Never the value it was.
            let new = if old == byte { byte ^ 1 } else { byte };
            drop(file);
            patch_selector_byte(&path, tensor, at, new);
        }
        let f = failures(&path);
        assert_eq!(f.len(), 1, "{name}: {f:?}");
        assert_eq!(f[0].rule(), 29, "{name}: {}", f[0]);
        match flash(&path) {
            Ok(()) => assert!(!runtime_sees_it, "{name}: flash accepted it"),
            Err(e) => {
                assert!(runtime_sees_it, "{name}: {e}");
                assert!(e.to_string().contains("rule 29:"), "{name}: {e}");
                assert_eq!(e.exit_class(), flashpack::ExitClass::InvalidInput, "{name}");
            }
        }
    }
}

/// Logits of a prefill of 16 tokens and 16 decoded one at a time.
fn logits(model: &flashpack::runtime::Model, ids: &[u32]) -> Vec<f32> {
    let mut cache = model.new_cache();
    let mut all = model
        .forward(&mut cache, &ids[..16], Logits::All, None)
        .unwrap();
    for &id in &ids[16..32] {
        all.extend(
            model
                .forward(&mut cache, &[id], Logits::Last, None)
                .unwrap(),
        );
    }
    all
}

#[test]
fn flash_chooses_with_the_files_copies_bit_identical_to_predicted_and_reads_less_than_naive() {
    let tmp = tempfile::tempdir().unwrap();
    for (kind, selector) in [
        (SelectorCopies::Int4, Selector::Int4),
        (SelectorCopies::Int8, Selector::Int8),
    ] {
        let path = packed(tmp.path(), kind, true);
        // predicted builds its selector at load from the weights (packed
        // order), not from the file's copies: equal only if R29 holds.
        let mut predicted = open_model(&path).unwrap();
        let text = std::fs::read_to_string(fixtures().join("text/heldout.txt")).unwrap();
        let ids = predicted.tokenizer.encode(&text).unwrap()[..32].to_vec();
        predicted.sparsity.as_mut().unwrap().selector = selector;
        let counter = predicted.set_ffn_mode(FfnMode::Predicted).unwrap().unwrap();
        let want = logits(&predicted.model, &ids);
        let fraction = counter.active_fraction();
        assert!(fraction > 0.3 && fraction < 0.8, "{kind:?}: {fraction}");
        let open = |mode, selector| {
            open_flash(
                &path,
                &FlashOptions {
                    mode,
                    selector,
                    ..FlashOptions::default()
                },
            )
            .unwrap()
        };
        // `auto` resolves to the file's copies; so does the explicit type.
        for s in [Selector::Auto, selector] {
            let (flash, rt) = open(FfnMode::Flash, s);
            let got = logits(&flash.model, &ids);
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{kind:?} {s:?}: flash differs from predicted"
            );
            let r = rt.report();
            assert_eq!(r.selector, Some(selector), "{kind:?}: resolved from {s:?}");
            assert_eq!(r.ffn_active_fraction, fraction, "{kind:?}");
            // The copies are in the DRAM plan, at their stored size.
            let file = PackedFile::open(&path).unwrap();
            let raw: u64 = file
                .manifest
                .tensors
                .iter()
                .filter(|t| t.section == SELECTOR_SECTION)
                .map(|t| t.length)
                .sum();
            assert_eq!(r.dram_plan.selector, raw);
            assert_eq!(r.dram_plan.predictors, 0, "the predictors are not loaded");
            if s == Selector::Auto {
                // Without the window's cache, flash reads the chosen bundles
                // only: fewer bytes than naive's whole FFN.
                let (nf, nrt) = open(FfnMode::Naive, Selector::Auto);
                logits(&nf.model, &ids);
                let naive = nrt.report().bytes_read_per_token;
                assert!(r.bytes_read_per_token < naive, "{kind:?}");
            }
        }
        // The other type is not in the file: refused, naming the cure.
        let other = if selector == Selector::Int4 {
            Selector::Int8
        } else {
            Selector::Int4
        };
        let e = open_flash(
            &path,
            &FlashOptions {
                selector: other,
                ..FlashOptions::default()
            },
        )
        .err()
        .unwrap();
        // A library error names the option; the command line shows its flag.
        assert!(
            matches!(
                &e,
                flashpack::Error::InvalidOption {
                    option: "selector",
                    ..
                }
            ),
            "{e}"
        );
        // The trained predictors still serve when asked for.
        let (_, rt) = open(FfnMode::Flash, Selector::Trained);
        assert_eq!(rt.selector, Some(Selector::Trained));
        assert_eq!(rt.plan.selector, 0);
        assert!(rt.plan.predictors > 0);
    }
}

#[test]
fn the_budget_counts_the_copies() {
    let tmp = tempfile::tempdir().unwrap();
    let path = packed(tmp.path(), SelectorCopies::Int8, true);
    let plan = |selector| {
        open_flash(
            &path,
            &FlashOptions {
                selector,
                ..FlashOptions::default()
            },
        )
        .unwrap()
        .1
        .plan
    };
    let with = plan(Selector::Auto);
    let trained = plan(Selector::Trained);
    assert!(with.selector > 0);
    assert_eq!(
        with.minimum - with.selector,
        trained.minimum - trained.predictors
    );
    // A budget one byte below the minimum is refused and names the copies.
    let e = open_flash(
        &path,
        &FlashOptions {
            dram_budget: Some(with.minimum - 1),
            ..FlashOptions::default()
        },
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("selector copies"), "{e}");
}

#[test]
fn retraining_the_predictors_keeps_the_copies() {
    let tmp = tempfile::tempdir().unwrap();
    let path = packed(tmp.path(), SelectorCopies::Int4, true);
    let out = tmp.path().join("retrained.flashpack");
    flashpack::pack::retrain::retrain_predictors(
        &path,
        Some(&out),
        &plan(),
        flashpack::progress::SILENT,
    )
    .unwrap();
    let file = PackedFile::open(&out).unwrap();
    assert!(check_integrity(&file).unwrap().failures.is_empty());
    let before = PackedFile::open(&path).unwrap();
    assert_eq!(file.manifest.selectors, before.manifest.selectors);
    assert!(
        file.read_section(SELECTOR_SECTION).unwrap()
            == before.read_section(SELECTOR_SECTION).unwrap()
    );
    assert_copies_match_the_checkpoint(&out, SelectorType::Int4);
}
