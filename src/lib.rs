//! flashpack: run language models larger than DRAM from flash storage.
//!
//! The technique is Apple's "LLM in a flash" (Alizadeh et al., 2023): keep
//! embeddings, attention and the KV cache in DRAM, leave the sparse FFN on flash,
//! predict which FFN neurons a token needs, and read only those, as contiguous
//! neuron bundles, through a sliding-window cache.
//!
//! The library is organised as the data flows:
//! - [`input`]: Hugging Face checkpoint directories (config, safetensors, tokenizer).
//! - [`mod@format`]: the packed file format (spec: `formats/flashpack-v1.md`), reader and checks.
//! - [`pack`]: writing packed files (`convert`), checking and describing them.
//! - [`predictor`]: calibration and predictor training.
//! - [`runtime`]: the forward pass, KV cache, FFN and sampling.
//! - `server`: the OpenAI-compatible HTTP server (cargo feature `server`).
//! - `cli`: the `flashpack` command line, a thin layer over the library (cargo
//!   feature `cli`, on by default; `default-features = false` leaves out clap,
//!   indicatif, ctrlc and the HTTP stack).
//!
//! # The API
//!
//! The types a program needs are re-exported here, each documented:
//! - open a model and run it: [`Session`] with [`SessionOptions`] ([`FfnMode`],
//!   [`Selector`], [`IoEngine`]); generate with [`GenerateOptions`] and
//!   [`SamplingParams`] into a [`GenerationReport`] (ending with a
//!   [`StopReason`]); evaluate into a [`PerplexityReport`]; [`Session::logits`]
//!   for your own checks; what the disk modes read is an [`IoSummary`];
//! - [`convert()`] a checkpoint with [`ConvertOptions`] ([`TargetDType`] and
//!   [`DType`], block quantization as a [`QuantPolicy`] of [`QuantType`]s,
//!   [`SelectorCopies`], calibration as a [`CalibrationPlan`] of
//!   [`CalibrationOptions`] and [`TrainOptions`]) into a [`ConvertSummary`],
//!   reporting its [`Progress`] by [`Phase`] (or [`progress::SILENT`]);
//! - [`verify()`] a packed file with [`VerifyOptions`] into a [`VerifyReport`];
//! - [`inspect()`] a checkpoint or packed file into an [`InspectReport`];
//! - every failure is an [`Error`], whose [`ExitClass`] says whether a check
//!   failed, the input was invalid or the environment failed.
//!
//! `examples/` has a program for each (`generate`, `logits`, `evaluate`,
//! `convert`, `verify`, `inspect`), running on the repository's fixtures:
//! `cargo run --release --example generate`. The modules below are the
//! library's internals, public for the command line, the benchmarks and the
//! tests; the surface above is the one kept stable and documented item by item
//! (`missing_docs` is denied for it; the modules still allowed to miss docs,
//! `runtime::sparse` and `runtime::flash`, hold re-exported types that are
//! documented in full).

#![deny(missing_docs)]

#[allow(missing_docs)]
pub mod cleanup;
#[cfg(feature = "cli")]
#[allow(missing_docs)]
pub mod cli;
pub mod dtype;
pub mod error;
#[allow(missing_docs)]
pub mod format;
#[allow(missing_docs)]
pub mod input;
pub mod pack;
#[allow(missing_docs)]
pub mod predictor;
pub mod progress;
pub mod quant;
pub mod runtime;
#[cfg(feature = "server")]
#[allow(missing_docs)]
pub mod server;

pub use dtype::DType;
pub use error::{Error, ExitClass, Result};
pub use format::layout::QuantPolicy;
pub use pack::convert::SelectorCopies;
pub use pack::{
    convert, inspect, verify, ConvertOptions, ConvertSummary, InspectReport, TargetDType,
    VerifyOptions, VerifyReport,
};
pub use predictor::calibrate::CalibrationOptions;
pub use predictor::pipeline::CalibrationPlan;
pub use predictor::train::TrainOptions;
pub use progress::{Phase, Progress};
pub use quant::QuantType;
pub use runtime::flash::io::IoEngine;
pub use runtime::generate::{GenerateOptions, StopReason};
pub use runtime::sampling::SamplingParams;
pub use runtime::session::{
    GenerationReport, IoSummary, PerplexityReport, Session, SessionOptions,
};
pub use runtime::sparse::{FfnMode, Selector};
