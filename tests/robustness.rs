//! Untrusted and damaged input, interrupted and failing work: random and mutated
//! bytes into every reader (each outcome `Ok` or a typed error, never a panic),
//! a full disk, a killed or interrupted convert, and concurrent converts.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use flashpack::format::integrity::check_integrity;
use flashpack::format::PackedFile;
use flashpack::input::config::{ModelConfig, RawConfig};
use flashpack::input::Checkpoint;
use flashpack::pack::{convert, ConvertOptions};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/models")
        .join(name)
}

/// Names of the temporary output files left in `dir`.
fn temporaries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect()
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_flashpack"))
}

/// A valid packed file of the smallest fixture, as bytes.
fn packed_bytes() -> &'static [u8] {
    static BYTES: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BYTES.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("m.flashpack");
        let options = ConvertOptions {
            alignment: 512,
            ..ConvertOptions::default()
        };
        convert(
            &fixture("opt-postln-proj"),
            &out,
            &options,
            flashpack::progress::SILENT,
        )
        .unwrap();
        std::fs::read(out).unwrap()
    })
}

fn config() -> Config {
    Config {
        cases: 64,
        rng_seed: RngSeed::Fixed(0xf1a5_4a11),
        failure_persistence: None,
        ..Config::default()
    }
}

/// Opens (and, if that works, fully checks) `bytes` as a packed file.
fn read_packed(bytes: &[u8]) {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("x.flashpack");
    std::fs::write(&path, bytes).unwrap();
    if let Ok(file) = PackedFile::open(&path) {
        let _ = check_integrity(&file);
        let _ = flashpack::runtime::open_model(&path);
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn random_bytes_never_panic_the_packed_reader(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        read_packed(&bytes);
    }

    #[test]
    fn mutated_packed_files_are_rejected_or_read_without_panic(
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut bytes = packed_bytes().to_vec();
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len()));
        }
        read_packed(&bytes);
    }

    #[test]
    fn mutated_safetensors_never_panic_the_checkpoint_reader(
        flips in prop::collection::vec((0usize..2048, any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        for e in std::fs::read_dir(fixture("opt-postln-proj")).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
        let path = dir.join("model.safetensors");
        let mut bytes = std::fs::read(&path).unwrap();
        // Damage the header region, where lengths and offsets live.
        for (at, value) in flips {
            let i = at % bytes.len();
            bytes[i] = value;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len()));
        }
        std::fs::write(&path, bytes).unwrap();
        if let Ok(ckpt) = Checkpoint::open(dir) {
            let _ = flashpack::runtime::Model::from_checkpoint(&ckpt);
        }
    }

    #[test]
    fn random_configs_validate_or_fail_cleanly(
        arch in prop::sample::select(vec!["OPTForCausalLM", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"]),
        sizes in prop::collection::vec(prop_oneof![Just(0u64), 1u64..64, Just(1u64 << 40), Just(u64::MAX)], 8),
        act in prop::sample::select(vec!["relu", "silu", "gelu", ""]),
    ) {
        let value = serde_json::json!({
            "architectures": [arch], "vocab_size": sizes[0], "hidden_size": sizes[1],
            "intermediate_size": sizes[2], "ffn_dim": sizes[2], "num_hidden_layers": sizes[3],
            "num_attention_heads": sizes[4], "num_key_value_heads": sizes[5],
            "max_position_embeddings": sizes[6], "head_dim": sizes[7], "hidden_act": act,
        });
        if let Ok(raw) = serde_json::from_value::<RawConfig>(value) {
            if let Ok(cfg) = ModelConfig::from_raw(&raw, Path::new("config.json")) {
                // A config that validates must describe a model we can lay out.
                prop_assert!(cfg.hidden_size > 0 && cfg.num_layers > 0 && cfg.num_heads % cfg.num_kv_heads == 0);
                let specs = flashpack::input::ModelNames::for_config(&cfg).specs();
                prop_assert!(!specs.is_empty());
            }
        }
    }
}

#[test]
fn a_full_disk_fails_with_exit_3_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m.flashpack");
    // A file-size limit stands in for a full disk: with SIGXFSZ ignored, writes
    // past it fail with EFBIG, as they fail with ENOSPC on a full filesystem.
    let script = format!(
        "trap '' XFSZ; ulimit -f 256; exec {} convert {} -o {}",
        env!("CARGO_BIN_EXE_flashpack"),
        fixture("opt-relu").display(),
        out.display()
    );
    let o = Command::new("sh").arg("-c").arg(script).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("error:"), "{stderr}");
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "nothing may remain: {left:?}");
}

/// A synthetic Llama checkpoint large enough that convert takes a while.
fn big_checkpoint(dir: &Path) {
    let cfg = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 2048, "hidden_size": 512,
        "intermediate_size": 1536, "num_hidden_layers": 8, "num_attention_heads": 8,
        "max_position_embeddings": 512, "hidden_act": "relu"
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(
        fixture("opt-relu").join("tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
    let raw: RawConfig = serde_json::from_value(cfg).unwrap();
    let config = ModelConfig::from_raw(&raw, Path::new("config.json")).unwrap();
    let specs = flashpack::input::ModelNames::for_config(&config).specs();
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = specs
        .into_iter()
        .map(|s| {
            let n: usize = s.shape.iter().product();
            let bytes = (0..n)
                .flat_map(|i| (((i * 2654435761) % 1000) as f32 / 1e4).to_le_bytes())
                .collect();
            (s.name, s.shape, bytes)
        })
        .collect();
    let views: Vec<_> = data
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    std::fs::write(
        dir.join("model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
}

#[test]
fn convert_killed_at_any_moment_leaves_the_output_path_untouched_or_complete() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("ckpt");
    std::fs::create_dir(&src).unwrap();
    big_checkpoint(&src);
    let out = tmp.path().join("m.flashpack");
    std::fs::write(&out, b"previous output").unwrap();
    for delay_ms in [5, 40, 120, 300, 700] {
        let mut child = bin()
            .args([
                "convert",
                src.to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill(); // SIGKILL
        let status = child.wait().unwrap();
        let now = std::fs::read(&out).unwrap();
        // Untouched, or complete: it finished before the kill, or was killed
        // between the rename into place and its exit (under load that window
        // is real; the status then says killed).
        if now != b"previous output" {
            let file = PackedFile::open(&out)
                .unwrap_or_else(|e| panic!("killed after {delay_ms} ms ({status}): {e}"));
            assert!(check_integrity(&file).unwrap().failures.is_empty());
            std::fs::write(&out, b"previous output").unwrap();
        }
        // A SIGKILL cannot be cleaned up after: a temporary file may remain, but
        // only under its hidden temporary name, never at the output path.
    }
    // The next convert of the same output removes what killed ones left behind.
    let ok = bin()
        .args([
            "convert",
            src.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(ok.status.success());
    let left = temporaries(tmp.path());
    assert!(left.is_empty(), "stale temporaries remain: {left:?}");
}

#[test]
fn interrupted_convert_removes_its_temporary_files() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("ckpt");
    std::fs::create_dir(&src).unwrap();
    big_checkpoint(&src);
    let out = tmp.path().join("m.flashpack");
    let mut child = bin()
        .args([
            "convert",
            src.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(60));
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(130),
        "convert should have been interrupted mid-way"
    );
    assert!(!out.exists());
    let left = temporaries(tmp.path());
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn concurrent_converts_to_one_path_never_mix() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m.flashpack");
    let children: Vec<_> = ["opt-relu", "llama-relu-gqa", "opt-relu", "llama-relu-gqa"]
        .iter()
        .map(|m| {
            bin()
                .args([
                    "convert",
                    fixture(m).to_str().unwrap(),
                    "-o",
                    out.to_str().unwrap(),
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    let file = PackedFile::open(&out).unwrap();
    assert!(check_integrity(&file).unwrap().failures.is_empty());
    let verify = bin()
        .args(["verify", out.to_str().unwrap(), "--against"])
        .arg(if file.config.architecture.is_llama_family() {
            fixture("llama-relu-gqa")
        } else {
            fixture("opt-relu")
        })
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
}
