//! `predictors train`: calibrate an existing packed file's model on new text and
//! replace its predictors and calibration statistics, without reconverting.
//!
//! The neuron order stays as packed (re-bundling would be a reconversion), so the
//! new predictors are trained directly on packed neuron indices. Every other
//! section is copied byte for byte, its hash checked while copying, into a new
//! file written atomically (it may replace the input).

use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::format::error::FormatError;
use crate::format::layout::*;
use crate::format::PackedFile;
use crate::pack::convert::{
    calibration_inputs, check_calibration_plan, extras_from, write_predictors, PredictorReport,
};
use crate::pack::output::{check_output_path, finish_packed_file, AtomicOutput, InputPath};
use crate::predictor::pipeline::{calibrate_and_train, CalibrationPlan};
use crate::runtime::open::{load_packed, Values};

/// What a retraining wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RetrainSummary {
    pub file_bytes: u64,
    pub calibration_tokens: u64,
    pub calibrate_ms: f64,
    pub train_ms: f64,
    pub manifest_sha256: String,
    pub predictors: Vec<PredictorReport>,
}

/// Stored bytes copied per read while copying a section.
const COPY_BLOCK: u64 = 8 << 20;

/// Retrains the predictors of the packed file `input` on `plan`'s text and writes
/// the result to `output`, or with `None` replaces `input` in place (the file a
/// symbolic link `input` points to, not the link). An `output` that names the
/// input file by another path (a symbolic or hard link) is refused, as is one that
/// is a directory or a calibration file, before anything is written.
pub fn retrain_predictors(
    input: &Path,
    output: Option<&Path>,
    plan: &CalibrationPlan,
    progress: crate::progress::Progress<'_>,
) -> Result<RetrainSummary> {
    check_calibration_plan(plan)?;
    if input.is_dir() {
        return Err(Error::WrongKind {
            path: input.to_path_buf(),
            found: "is a directory",
            expected: "a packed file",
        });
    }
    let calibration = calibration_inputs(plan);
    let in_place;
    let output = match output {
        Some(out) => {
            let mut inputs = vec![InputPath::new(input, "the input packed file")
                .with_hint("; to retrain the file in place, omit the output path (-o)")];
            inputs.extend(calibration);
            check_output_path(out, &inputs)?;
            out
        }
        None => {
            in_place = std::fs::canonicalize(input).unwrap_or_else(|_| input.to_path_buf());
            check_output_path(&in_place, &calibration)?;
            &in_place
        }
    };
    let file = PackedFile::open(input)?;
    let (weights, model, tokenizer) = load_packed(&file, Values::Dequantized)?;
    let trained = calibrate_and_train(&model, &file.names, &weights, &tokenizer, plan, progress)?;
    drop((model, weights));
    let mut extras = extras_from(trained, plan, &file.config)?;
    // Calibration ran on the packed model: its neuron indices are packed positions.
    extras.orders = (0..file.config.num_layers)
        .map(|_| (0..file.config.ffn_width as u32).collect())
        .collect();

    let m = &file.manifest;
    let alignment = m.alignment;
    let zstd = (m.provenance.options.zstd_level > 0).then_some(m.provenance.options.zstd_level);
    let mut out = AtomicOutput::create(output)?;
    out.write_all(&[0u8; PREAMBLE_BYTES as usize])?;
    let mut sections = Vec::new();
    let mut tensors: Vec<TensorEntry> = m
        .tensors
        .iter()
        .filter(|t| t.section != PREDICTOR_SECTION)
        .cloned()
        .collect();
    let mut predictor_entries = None;
    for section in m
        .sections
        .iter()
        .filter(|s| s.kind != SectionKind::Predictor)
    {
        // The spec's order: predictors come right before the first FFN section.
        if section.kind == SectionKind::Ffn && predictor_entries.is_none() {
            predictor_entries = Some(write_predictors(
                &mut out,
                &mut sections,
                &mut tensors,
                &extras.predictors,
                &extras.orders,
                zstd,
                alignment,
            )?);
        }
        out.pad_to(alignment)?;
        let offset = out.position;
        copy_section(&file, section, &mut out)?;
        sections.push(SectionEntry {
            offset,
            ..section.clone()
        });
    }
    let manifest = Manifest {
        sections,
        tensors,
        calibration: extras.calibration.clone(),
        predictors: predictor_entries.unwrap_or_default(),
        ..m.clone()
    };
    let finished = finish_packed_file(out, &manifest)?;
    Ok(RetrainSummary {
        file_bytes: finished.file_bytes,
        calibration_tokens: extras.calibration.as_ref().map_or(0, |c| c.tokens),
        calibrate_ms: extras.calibrate_ms.unwrap_or(0.0),
        train_ms: extras.train_ms.unwrap_or(0.0),
        manifest_sha256: hex::encode(finished.manifest_sha256),
        predictors: extras.reports,
    })
}

/// Copies a section's stored bytes, checking them against its hash on the way so
/// that damage in the input is not carried into a file with fresh hashes.
fn copy_section(file: &PackedFile, section: &SectionEntry, out: &mut AtomicOutput) -> Result<()> {
    let mut hasher = Sha256::new();
    let mut done = 0;
    while done < section.length {
        let n = (section.length - done).min(COPY_BLOCK);
        let block = file.read_at(section.offset + done, n)?;
        hasher.update(&block);
        out.write_all(&block)?;
        done += n;
    }
    if hex::encode(hasher.finalize()) != section.sha256 {
        return Err(Error::Format {
            path: file.path.clone(),
            source: FormatError::SectionHash {
                section: section.name.clone(),
            },
        });
    }
    Ok(())
}
