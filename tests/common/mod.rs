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
