//! Helpers shared by the integration tests (each test binary includes this
//! module with `mod common;` and uses what it needs).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The committed fixtures: checkpoints by transformers, their references, texts.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Normalised mean squared error of `x` against the reference `r`:
/// sum((x - r)^2) / sum(r^2), in f64.
pub fn nmse(x: &[f32], r: &[f32]) -> f64 {
    assert_eq!(x.len(), r.len(), "nmse of vectors of different lengths");
    let num: f64 = x
        .iter()
        .zip(r)
        .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
        .sum();
    let den: f64 = r.iter().map(|&b| (b as f64).powi(2)).sum();
    num / den
}

/// A copy of the micro fixture whose context is a million positions: greedy
/// generation from it does not reach its end-of-sequence token, so a run with a
/// large token limit goes on for minutes (attention grows with every token),
/// long enough to interrupt it or to send other requests meanwhile.
pub fn endless_model() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("models/micro-llama");
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    let config_path = dir.path().join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    config["max_position_embeddings"] = 1_000_000.into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    dir
}
