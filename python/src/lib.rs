//! `flashpack._native`: the Python extension module behind `import flashpack`.
//!
//! Every function is a thin layer over the Rust library: it turns keyword
//! arguments into the library's options, runs the library with the GIL
//! released (other Python threads go on while a model converts or decodes),
//! and returns the library's report as a dict with the keys the command
//! line's `--json` prints (the report is serialized by serde and read back by
//! Python's `json`, so the two cannot drift apart). Library errors become
//! the exception classes of `flashpack._errors`, one per exit class.

mod model;

use std::path::{Path, PathBuf};

use pyo3::prelude::*;

use flashpack::pack::verify::{VerifyOptions, VerifyReport};
use flashpack::{Error, ExitClass};

/// The `flashpack._errors` class for a library error's exit class.
fn class_name(class: ExitClass) -> &'static str {
    match class {
        ExitClass::CheckFailed => "CheckFailedError",
        ExitClass::InvalidInput => "InvalidInputError",
        ExitClass::Environment => "EnvironmentFailureError",
    }
}

/// A Python exception of class `name` (of `flashpack._errors`) with `message`
/// and, for a failed check, the report as a dict.
fn exception(py: Python<'_>, name: &str, message: String, report: Option<PyObject>) -> PyErr {
    let made = py
        .import("flashpack._errors")
        .and_then(|m| m.getattr(name))
        .and_then(|class| class.call1((message, report)));
    match made {
        Ok(exc) => PyErr::from_value(exc),
        Err(e) => e,
    }
}

/// A library error as the exception of its exit class.
fn raise(py: Python<'_>, err: Error) -> PyErr {
    exception(py, class_name(err.exit_class()), err.to_string(), None)
}

/// Bad keyword arguments: invalid input, as the command line's usage errors.
fn invalid(py: Python<'_>, message: impl Into<String>) -> PyErr {
    exception(py, "InvalidInputError", message.into(), None)
}

/// A serializable report as Python objects (dict, list, str, int, float,
/// bool, None) through JSON, so the keys and values are exactly the CLI's.
fn to_python(py: Python<'_>, value: &impl serde::Serialize) -> PyResult<PyObject> {
    let text = serde_json::to_string(value)
        .map_err(|e| invalid(py, format!("report not serializable: {e}")))?;
    Ok(py.import("json")?.call_method1("loads", (text,))?.unbind())
}

/// One path or a list of paths (calibration text).
#[derive(FromPyObject)]
enum Paths {
    One(PathBuf),
    Many(Vec<PathBuf>),
}

impl Paths {
    fn into_vec(self) -> Vec<PathBuf> {
        match self {
            Paths::One(p) => vec![p],
            Paths::Many(v) => v,
        }
    }
}

/// A predictor rank: a positive number or `"auto"`.
#[derive(FromPyObject)]
enum Rank {
    Fixed(i64),
    Named(String),
}

/// Calls the Python `progress(phase, done, total)` callback, if any, from
/// whichever library thread reports (taking the GIL for the call). An
/// exception it raises cannot stop the library: it is reported as Python
/// reports errors in callbacks (`sys.unraisablehook`).
fn report_progress(
    callback: Option<&PyObject>,
    phase: flashpack::progress::Phase,
    done: u64,
    total: u64,
) {
    if let Some(callback) = callback {
        Python::with_gil(|py| {
            if let Err(e) = callback.call1(py, (phase.describe(), done, total)) {
                e.write_unraisable(py, Some(callback.bind(py)));
            }
        });
    }
}

/// What [`convert`] ran into: a library error, or a written file that
/// failed its verification.
enum ConvertFailure {
    Library(Error),
    Verify(Box<VerifyReport>),
}

/// Converts a Hugging Face checkpoint into a flashpack file; returns the
/// report `flashpack convert --json` prints.
#[pyfunction]
#[pyo3(signature = (
    src, out, *, dtype = "keep".to_string(), zstd_level = 3, alignment = 4096, quant = None,
    selector = "auto".to_string(), calib = None, calib_tokens = 16384, rank = None,
    target_recall = 0.99, target_sparsity = 0.5, seed = 0, keep_trace = None,
    sparsity_allocation = "uniform".to_string(), verify = false, progress = None
))]
#[allow(clippy::too_many_arguments)]
fn convert(
    py: Python<'_>,
    src: PathBuf,
    out: PathBuf,
    dtype: String,
    zstd_level: i32,
    alignment: u64,
    quant: Option<String>,
    selector: String,
    calib: Option<Paths>,
    calib_tokens: usize,
    rank: Option<Rank>,
    target_recall: f64,
    target_sparsity: f64,
    seed: u64,
    keep_trace: Option<PathBuf>,
    sparsity_allocation: String,
    verify: bool,
    progress: Option<PyObject>,
) -> PyResult<PyObject> {
    // The library's options; a value that names nothing is a message.
    let parse = || -> Result<flashpack::pack::ConvertOptions, String> {
        use flashpack::dtype::DType;
        use flashpack::pack::convert::SelectorCopies;
        use flashpack::pack::TargetDType;
        use flashpack::predictor::train::{RankChoice, TrainOptions};
        let dtype = match dtype.as_str() {
            "keep" => TargetDType::Keep,
            "f32" => TargetDType::To(DType::F32),
            "f16" => TargetDType::To(DType::F16),
            "bf16" => TargetDType::To(DType::BF16),
            other => return Err(format!("dtype {other:?}: expected keep, f32, f16 or bf16")),
        };
        let selector = match selector.as_str() {
            "auto" => SelectorCopies::Auto,
            "none" => SelectorCopies::None,
            "int8" => SelectorCopies::Int8,
            "int4" => SelectorCopies::Int4,
            other => {
                return Err(format!(
                    "selector {other:?}: expected auto, none, int8 or int4"
                ))
            }
        };
        let quant = match &quant {
            Some(text) => flashpack::format::quant_policy::parse_policy(text)
                .map_err(|e| format!("quant {text:?}: {e}"))?,
            None => Default::default(),
        };
        let calibration = match calib.map(Paths::into_vec) {
            None => None,
            Some(files) => {
                let rank = match rank {
                    None => TrainOptions::default().rank,
                    Some(Rank::Named(name)) if name == "auto" => TrainOptions::default().rank,
                    Some(Rank::Fixed(r)) if r > 0 => RankChoice::Fixed(r as usize),
                    Some(Rank::Fixed(r)) => {
                        return Err(format!("rank {r} must be a positive number or \"auto\""))
                    }
                    Some(Rank::Named(name)) => {
                        return Err(format!(
                            "rank {name:?} must be a positive number or \"auto\""
                        ))
                    }
                };
                if !(target_recall > 0.0 && target_recall <= 1.0) {
                    return Err(format!("target_recall {} must be in (0, 1]", target_recall));
                }
                let allocation = match sparsity_allocation.as_str() {
                    "uniform" => flashpack::predictor::thresholds::Allocation::Uniform,
                    "greedy" => flashpack::predictor::thresholds::Allocation::Greedy,
                    other => {
                        return Err(format!(
                            "sparsity_allocation {other:?}: expected uniform or greedy"
                        ))
                    }
                };
                Some(flashpack::predictor::pipeline::CalibrationPlan {
                    files,
                    calibrate: flashpack::predictor::calibrate::CalibrationOptions {
                        max_tokens: calib_tokens,
                        target_sparsity,
                        allocation,
                        keep_trace,
                        ..Default::default()
                    },
                    train: TrainOptions {
                        rank,
                        target_recall,
                        seed,
                        ..TrainOptions::default()
                    },
                })
            }
        };
        Ok(flashpack::pack::ConvertOptions {
            dtype,
            zstd_level,
            alignment,
            calibration,
            quant,
            selector,
        })
    };
    let options = parse().map_err(|m| invalid(py, m))?;
    let result = py.allow_threads(|| {
        let started = std::time::Instant::now();
        let source = flashpack::input::hub::resolve_model(&src).map_err(ConvertFailure::Library)?;
        let summary = flashpack::pack::convert(&source, &out, &options, &|phase, done, total| {
            report_progress(progress.as_ref(), phase, done, total)
        })
        .map_err(ConvertFailure::Library)?;
        let elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
        let report = if verify {
            let report = flashpack::pack::verify::verify_file(&out, Some(&source), None)
                .map_err(ConvertFailure::Library)?;
            if !report.ok {
                return Err(ConvertFailure::Verify(Box::new(report)));
            }
            Some(report)
        } else {
            None
        };
        Ok((summary, elapsed_ms, report))
    });
    let (summary, elapsed_ms, report) = match result {
        Ok(r) => r,
        Err(ConvertFailure::Library(e)) => return Err(raise(py, e)),
        Err(ConvertFailure::Verify(report)) => {
            let message = format!(
                "{} written but verification failed: {}",
                out.display(),
                report.failures.join("; ")
            );
            return Err(exception(
                py,
                "CheckFailedError",
                message,
                Some(to_python(py, &report)?),
            ));
        }
    };
    // The keys of `flashpack convert --json`.
    let mut json = serde_json::to_value(&summary)
        .map_err(|e| invalid(py, format!("report not serializable: {e}")))?;
    json["elapsed_ms"] = elapsed_ms.into();
    json["verified"] = report.is_some().into();
    if let Some(report) = report {
        json["verify"] = serde_json::to_value(&report)
            .map_err(|e| invalid(py, format!("report not serializable: {e}")))?;
    }
    to_python(py, &json)
}

/// Verifies a flashpack file: every hash and rule; with `against`, its
/// weights and logits against that checkpoint; with `calib`, each predictor's
/// recall. Returns the report `flashpack verify --json` prints; a failed check
/// raises `CheckFailedError` carrying it, unless `check` is false.
#[pyfunction]
#[pyo3(signature = (
    path, against = None, *, text = None, calib = None, min_recall = 0.95,
    calib_tokens = 4096, check = true
))]
#[allow(clippy::too_many_arguments)]
fn verify(
    py: Python<'_>,
    path: PathBuf,
    against: Option<PathBuf>,
    text: Option<PathBuf>,
    calib: Option<Paths>,
    min_recall: f64,
    calib_tokens: usize,
    check: bool,
) -> PyResult<PyObject> {
    let options = VerifyOptions {
        against,
        text,
        calib: calib.map(Paths::into_vec).unwrap_or_default(),
        min_recall,
        calib_tokens,
    };
    let report = py
        .allow_threads(|| flashpack::pack::verify(&path, &options))
        .map_err(|e| raise(py, e))?;
    if check && !report.ok {
        let message = format!(
            "{} check(s) failed: {}",
            report.failures.len(),
            report.failures.join("; ")
        );
        return Err(exception(
            py,
            "CheckFailedError",
            message,
            Some(to_python(py, &report)?),
        ));
    }
    to_python(py, &report)
}

/// What a checkpoint directory or flashpack file holds: the report
/// `flashpack inspect --json` prints.
#[pyfunction]
fn inspect(py: Python<'_>, path: PathBuf) -> PyResult<PyObject> {
    let report = py
        .allow_threads(|| flashpack::pack::inspect(Path::new(&path)))
        .map_err(|e| raise(py, e))?;
    to_python(py, &report)
}

/// The extension module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(convert, m)?)?;
    m.add_function(wrap_pyfunction!(verify, m)?)?;
    m.add_function(wrap_pyfunction!(inspect, m)?)?;
    m.add_function(wrap_pyfunction!(model::open, m)?)?;
    m.add_class::<model::Model>()?;
    m.add_class::<model::Stream>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
