//! Routing statistics of a mixture-of-experts model (issue 14 step 4): the
//! model run over calibration text, windows of `ctx` tokens as calibration
//! runs them, counting per sparse layer how many tokens chose each expert.
//! `convert --calib` stores the counts in the packed file (spec 5.1, R34),
//! `calibrate` reports them, and the flash runtime pins the hottest experts
//! from them.

use std::collections::BTreeMap;
use std::path::PathBuf;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::format::layout::{RoutingInfo, RoutingLayer, SourceFile};
use crate::input::TextTokenizer;
use crate::progress::{Phase, Progress};
use crate::runtime::{Fired, Logits, Model, Observer};

/// Counts each sparse layer's chosen experts.
struct Counter {
    experts: usize,
    layers: BTreeMap<usize, Vec<u64>>,
}

impl Observer for Counter {
    fn ffn(&mut self, layer: usize, _input: &[f32], _n: usize, fired: &Fired) {
        if fired.routed.is_empty() {
            return;
        }
        let counts = self
            .layers
            .entry(layer)
            .or_insert_with(|| vec![0; self.experts]);
        for chosen in &fired.routed {
            for &e in chosen {
                counts[e as usize] += 1;
            }
        }
    }
}

/// Name, size and sha256 of each file, as the manifest lists sources.
pub fn source_files(paths: &[PathBuf]) -> Result<Vec<SourceFile>> {
    paths
        .iter()
        .map(|path| {
            let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
            Ok(SourceFile {
                name: path
                    .file_name()
                    .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
                bytes: bytes.len() as u64,
                sha256: hex::encode(Sha256::digest(&bytes)),
            })
        })
        .collect()
}

/// Runs `model` over the first `max_tokens` tokens of `files` (each file
/// encoded on its own, in windows of `ctx` tokens with a fresh KV cache) and
/// counts, per sparse layer, the tokens that chose each expert.
pub fn routing_statistics(
    model: &Model,
    tokenizer: &TextTokenizer,
    files: &[PathBuf],
    max_tokens: usize,
    ctx: usize,
    progress: Progress<'_>,
) -> Result<RoutingInfo> {
    let cfg = &model.config;
    let moe = cfg.moe.as_ref().ok_or_else(|| {
        Error::InvalidArgument("routing statistics need a mixture-of-experts model".into())
    })?;
    if files.is_empty() {
        return Err(Error::InvalidArgument(
            "calibration needs at least one text file".into(),
        ));
    }
    if ctx < 2 || ctx > cfg.max_context {
        return Err(Error::ContextTooLong {
            what: format!("calibration windows of {ctx}"),
            needed: ctx,
            max: cfg.max_context,
        });
    }
    let mut texts = Vec::new();
    let mut available = 0usize;
    for file in files {
        if available >= max_tokens {
            break;
        }
        let bytes = std::fs::read(file).map_err(|e| Error::io(file, e))?;
        let text = String::from_utf8(bytes)
            .map_err(|_| Error::InvalidArgument(format!("{}: not UTF-8 text", file.display())))?;
        let ids = tokenizer.encode(&text)?;
        available += ids.len();
        texts.push(ids);
    }
    let will_use = available.min(max_tokens);
    let mut counter = Counter {
        experts: moe.num_experts,
        layers: BTreeMap::new(),
    };
    let mut tokens = 0usize;
    let mut cache = model.new_cache();
    'files: for ids in &texts {
        for window in ids.chunks(ctx) {
            let take = window.len().min(max_tokens - tokens);
            if take == 0 {
                break 'files;
            }
            cache.clear();
            model.forward(
                &mut cache,
                &window[..take],
                Logits::None,
                Some(&mut counter),
            )?;
            tokens += take;
            progress(Phase::Calibrating, tokens as u64, will_use as u64);
        }
    }
    if tokens == 0 {
        return Err(Error::InvalidArgument(
            "the calibration text has no tokens".into(),
        ));
    }
    let layers = (0..cfg.num_layers)
        .filter(|&l| moe.sparse_layers[l])
        .map(|l| RoutingLayer {
            layer: l as u64,
            counts: counter
                .layers
                .remove(&l)
                .unwrap_or_else(|| vec![0; moe.num_experts]),
        })
        .collect();
    Ok(RoutingInfo {
        tokens: tokens as u64,
        files: source_files(files)?,
        layers,
    })
}
