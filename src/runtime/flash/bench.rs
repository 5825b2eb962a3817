//! The paper's Table 2 on one packed file: the same tokens through `naive`,
//! `flash` (window 0 and the chosen window), `oracle-flash` and `dense`, each
//! opened fresh (direct reads: nothing is served from the page cache), with
//! bytes read, I/O time and total time per token.

use std::path::Path;
use std::time::Instant;

use crate::error::Result;
use crate::runtime::flash::{open_flash, DiskMode, FlashOptions};
use crate::runtime::{open_model, Logits, Model};

/// One mode's measurement.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModeRow {
    pub mode: String,
    pub io_mode: Option<&'static str>,
    pub tokens: usize,
    pub bytes_read_per_token: f64,
    pub read_ops_per_token: f64,
    pub mean_read_bytes: f64,
    /// Bytes read over I/O time.
    pub read_gb_per_s: f64,
    pub io_ms_per_token: f64,
    pub ms_per_token: f64,
    pub window_hit_rate: f64,
    /// `ms_per_token` of naive over this mode's.
    pub speedup_over_naive: f64,
}

/// Feeds `ids` one token at a time (teacher forcing: every mode sees the same
/// tokens) and returns the wall time.
fn decode(model: &Model, ids: &[u32]) -> Result<f64> {
    let mut cache = model.new_cache();
    let t0 = Instant::now();
    for &id in ids {
        model.forward(&mut cache, &[id], Logits::Last, None)?;
    }
    Ok(t0.elapsed().as_secs_f64())
}

/// Measures every mode on `ids` (`base` gives I/O threads, window, budget).
pub fn compare_modes(path: &Path, ids: &[u32], base: &FlashOptions) -> Result<Vec<ModeRow>> {
    let n = ids.len().max(1) as f64;
    let mut rows = Vec::new();
    let modes = [
        ("naive", DiskMode::Naive, base.window),
        ("flash window 0", DiskMode::Flash, 0),
        (
            if base.window == 4 {
                "flash window 4"
            } else {
                "flash"
            },
            DiskMode::Flash,
            base.window,
        ),
        ("oracle-flash", DiskMode::Oracle, base.window),
    ];
    for (name, mode, window) in modes {
        let opts = FlashOptions {
            mode,
            window,
            ..base.clone()
        };
        let (loaded, rt) = open_flash(path, &opts)?;
        let secs = decode(&loaded.model, ids)?;
        let r = rt.report();
        let io_s = r.ms_io / 1e3;
        rows.push(ModeRow {
            mode: if name == "flash" {
                format!("flash window {window}")
            } else {
                name.to_string()
            },
            io_mode: Some(r.io_mode.as_str()),
            tokens: ids.len(),
            bytes_read_per_token: r.bytes_read as f64 / n,
            read_ops_per_token: r.read_ops as f64 / n,
            mean_read_bytes: r.mean_read_bytes,
            read_gb_per_s: if io_s > 0.0 {
                r.bytes_read as f64 / io_s / 1e9
            } else {
                0.0
            },
            io_ms_per_token: r.ms_io / n,
            ms_per_token: secs * 1e3 / n,
            window_hit_rate: r.window_hit_rate,
            speedup_over_naive: 0.0,
        });
    }
    let dense = open_model(path)?;
    let secs = decode(&dense.model, ids)?;
    rows.push(ModeRow {
        mode: "dense (in DRAM)".into(),
        io_mode: None,
        tokens: ids.len(),
        bytes_read_per_token: 0.0,
        read_ops_per_token: 0.0,
        mean_read_bytes: 0.0,
        read_gb_per_s: 0.0,
        io_ms_per_token: 0.0,
        ms_per_token: secs * 1e3 / n,
        window_hit_rate: 0.0,
        speedup_over_naive: 0.0,
    });
    let naive_ms = rows[0].ms_per_token;
    for r in &mut rows {
        r.speedup_over_naive = naive_ms / r.ms_per_token.max(1e-9);
    }
    Ok(rows)
}
