//! Broken checkpoints: each is rejected with a clear error naming what is wrong,
//! exit code 2, and no panic. Each case damages a copy of a real fixture.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/models")
        .join(name)
}

/// A temporary copy of a fixture checkpoint that a test may damage.
fn copy_of(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(name);
    std::fs::create_dir(&dir).unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    (tmp, dir)
}

struct Outcome {
    code: i32,
    stderr: String,
    stdout: String,
}

fn inspect(dir: &Path, json: bool) -> Outcome {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flashpack"));
    cmd.arg("inspect").arg(dir);
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().unwrap();
    Outcome {
        code: out.status.code().expect("exited, not killed by a signal"),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
    }
}

/// Asserts exit 2, no panic, and an error message mentioning every `needle`.
fn assert_rejected(dir: &Path, needles: &[&str]) {
    let out = inspect(dir, false);
    assert!(!out.stderr.contains("panicked"), "panic: {}", out.stderr);
    assert_eq!(out.code, 2, "stderr: {}", out.stderr);
    for needle in needles {
        assert!(
            out.stderr.contains(needle),
            "error should mention {needle:?}: {}",
            out.stderr
        );
    }
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut Value)) {
    let mut value: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut value);
    std::fs::write(path, serde_json::to_string_pretty(&value).unwrap()).unwrap();
}

/// Rewrites a safetensors file's JSON header, keeping its data bytes.
fn edit_safetensors_header(path: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let mut text = serde_json::to_string(&header).unwrap();
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(path, out).unwrap();
}

fn first_shard(dir: &Path) -> (String, PathBuf) {
    let index: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let mut files: Vec<&str> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap())
        .collect();
    files.sort();
    (files[0].to_string(), dir.join(files[0]))
}

const SHARDED: &str = "llama-relu-gqa-bf16-sharded";
const SINGLE: &str = "llama-rope-linear";

#[test]
fn missing_config_is_rejected() {
    let (_tmp, dir) = copy_of(SINGLE);
    std::fs::remove_file(dir.join("config.json")).unwrap();
    assert_rejected(&dir, &["config.json", "not found"]);
}

#[test]
fn unknown_architecture_is_named() {
    let (_tmp, dir) = copy_of(SINGLE);
    edit_json(&dir.join("config.json"), |c| {
        c["architectures"] = serde_json::json!(["GPT2LMHeadModel"])
    });
    assert_rejected(&dir, &["GPT2LMHeadModel", "unsupported architecture"]);
}

#[test]
fn config_that_is_not_json_is_rejected() {
    let (_tmp, dir) = copy_of(SINGLE);
    std::fs::write(dir.join("config.json"), "{\"architectures\": [").unwrap();
    assert_rejected(&dir, &["config.json", "invalid JSON"]);
}

#[test]
fn index_naming_a_tensor_in_no_shard_is_rejected() {
    let (_tmp, dir) = copy_of(SHARDED);
    let (shard, _) = first_shard(&dir);
    edit_json(&dir.join("model.safetensors.index.json"), |i| {
        i["weight_map"]["model.layers.0.mlp.phantom.weight"] = Value::String(shard.clone());
    });
    assert_rejected(&dir, &["model.layers.0.mlp.phantom.weight", &shard]);
}

#[test]
fn index_mapping_a_tensor_to_the_wrong_shard_is_rejected() {
    let (_tmp, dir) = copy_of(SHARDED);
    let index_path = dir.join("model.safetensors.index.json");
    let index: Value =
        serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    let map = index["weight_map"].as_object().unwrap();
    let (tensor, file) = map.iter().next().unwrap();
    let other = map
        .values()
        .find(|f| *f != file)
        .expect("two shards")
        .clone();
    let tensor = tensor.clone();
    edit_json(&index_path, |i| i["weight_map"][&tensor] = other.clone());
    assert_rejected(&dir, &[&tensor]);
}

#[test]
fn shard_holding_a_tensor_the_index_does_not_name_is_rejected() {
    let (_tmp, dir) = copy_of(SHARDED);
    let index_path = dir.join("model.safetensors.index.json");
    let index: Value =
        serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    let map = index["weight_map"].as_object().unwrap();
    // A shard that keeps other tensors in the index, so it is still opened.
    let count = |f: &str| map.values().filter(|v| v.as_str() == Some(f)).count();
    let (tensor, shard) = map
        .iter()
        .map(|(t, f)| (t.clone(), f.as_str().unwrap().to_string()))
        .find(|(_, f)| count(f) >= 2)
        .expect("a shard with two tensors");
    edit_json(&index_path, |i| {
        i["weight_map"].as_object_mut().unwrap().remove(&tensor);
    });
    assert_rejected(&dir, &[&tensor, &shard, "does not map"]);
}

#[test]
fn shard_name_outside_the_directory_is_rejected() {
    let (_tmp, dir) = copy_of(SHARDED);
    edit_json(&dir.join("model.safetensors.index.json"), |i| {
        i["weight_map"]["model.norm.weight"] = Value::String("../elsewhere.safetensors".into());
    });
    assert_rejected(&dir, &["../elsewhere.safetensors"]);
}

#[test]
fn tensor_in_two_shards_is_rejected() {
    let (_tmp, dir) = copy_of(SHARDED);
    let (shard, shard_path) = first_shard(&dir);
    // A third shard that repeats one tensor of the first.
    let bytes = std::fs::read(&shard_path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (name, view) = st.tensors().into_iter().next().unwrap();
    let extra = safetensors::serialize([(name.clone(), view)], None).unwrap();
    std::fs::write(dir.join("zzz-extra.safetensors"), extra).unwrap();
    edit_json(&dir.join("model.safetensors.index.json"), |i| {
        i["weight_map"]["extra.bias"] = Value::String("zzz-extra.safetensors".into());
    });
    assert_rejected(&dir, &[&name, &shard, "zzz-extra.safetensors"]);
}

#[test]
fn wrong_tensor_shape_is_named() {
    let (_tmp, dir) = copy_of(SINGLE);
    let tensor = "model.layers.0.mlp.up_proj.weight";
    // Transposing the stored shape keeps the byte count, so only the shape is wrong.
    edit_safetensors_header(&dir.join("model.safetensors"), |h| {
        let shape = h[tensor]["shape"].as_array_mut().unwrap();
        shape.reverse();
    });
    assert_rejected(&dir, &[tensor, "shape"]);
}

#[test]
fn missing_tensor_is_named() {
    let (_tmp, dir) = copy_of(SINGLE);
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let dropped = "model.layers.1.self_attn.k_proj.weight";
    let kept: Vec<_> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != dropped)
        .collect();
    let rewritten = safetensors::serialize(kept, None).unwrap();
    std::fs::write(&path, rewritten).unwrap();
    assert_rejected(&dir, &[dropped, "missing"]);
}

#[test]
fn unsupported_dtype_is_named() {
    let (_tmp, dir) = copy_of(SINGLE);
    let tensor = "model.norm.weight";
    edit_safetensors_header(&dir.join("model.safetensors"), |h| {
        h[tensor]["dtype"] = "I32".into()
    });
    assert_rejected(&dir, &[tensor, "I32"]);
}

#[test]
fn truncated_safetensors_is_rejected() {
    let (_tmp, dir) = copy_of(SINGLE);
    let path = dir.join("model.safetensors");
    let len = std::fs::metadata(&path).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(len - 100).unwrap();
    assert_rejected(&dir, &["model.safetensors", "invalid safetensors"]);
}

#[test]
fn safetensors_shorter_than_its_length_prefix_is_rejected() {
    let (_tmp, dir) = copy_of(SINGLE);
    std::fs::write(dir.join("model.safetensors"), [1u8, 2, 3]).unwrap();
    assert_rejected(&dir, &["model.safetensors", "shorter than"]);
}

#[test]
fn header_offsets_past_the_end_are_rejected() {
    let (_tmp, dir) = copy_of(SINGLE);
    let path = dir.join("model.safetensors");
    edit_safetensors_header(&path, |h| {
        // Push the tensor that ends last further out than the file goes.
        let last = h
            .iter()
            .filter(|(k, _)| *k != "__metadata__")
            .max_by_key(|(_, v)| v["data_offsets"][1].as_u64().unwrap())
            .map(|(k, _)| k.clone())
            .unwrap();
        let end = h[&last]["data_offsets"][1].as_u64().unwrap();
        h[&last]["data_offsets"][1] = (end + 4096).into();
    });
    assert_rejected(&dir, &["model.safetensors", "invalid safetensors"]);
}

#[test]
fn header_length_beyond_the_file_is_rejected() {
    let (_tmp, dir) = copy_of(SINGLE);
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    assert_rejected(&dir, &["model.safetensors"]);
}

#[test]
fn no_weights_at_all_is_rejected() {
    let (_tmp, dir) = copy_of(SINGLE);
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    assert_rejected(&dir, &["model.safetensors"]);
}

#[test]
fn json_mode_reports_the_error_as_one_object() {
    let (_tmp, dir) = copy_of(SINGLE);
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let out = inspect(&dir, true);
    assert_eq!(out.code, 2);
    let value: Value = serde_json::from_str(out.stdout.trim()).expect("stdout is one JSON object");
    assert_eq!(value["exit_code"], 2);
    assert!(value["error"].as_str().unwrap().contains("config.json"));
}

#[test]
fn inspect_json_reports_the_model() {
    let out = inspect(&fixture(SHARDED), true);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v: Value = serde_json::from_str(&out.stdout).expect("stdout is one JSON object");
    assert_eq!(v["architecture"], "LlamaForCausalLM");
    assert_eq!(v["activation"], "relu");
    assert_eq!(v["sharded"], true);
    assert!(v["params_by_dtype"]["bf16"].as_u64().unwrap() > 0);
    let total = v["params_total"].as_u64().unwrap();
    let parts: u64 = [
        "params_embeddings",
        "params_attention",
        "params_ffn",
        "params_other",
    ]
    .iter()
    .map(|k| v[*k].as_u64().unwrap())
    .sum();
    assert_eq!(total, parts);
    let on_disk: u64 = std::fs::read_dir(fixture(SHARDED))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert_eq!(v["file_bytes"].as_u64().unwrap(), on_disk);
}
