//! Writing flashpack files: neuron bundling, streamed and chunked sections, the
//! atomic output, and `convert` which puts them together.

pub mod bundle;
pub mod convert;
pub mod output;
pub mod section;

pub use convert::{convert, ConvertOptions, ConvertSummary, TargetDType};
