//! Writing flashpack files: neuron bundling, streamed and chunked sections, the
//! atomic output, `convert` which puts them together, and `retrain` which
//! replaces the predictors of an existing file.

pub mod bundle;
pub mod convert;
pub mod output;
pub mod quantize;
pub mod retrain;
pub mod section;

pub use convert::{convert, ConvertOptions, ConvertSummary, TargetDType};
