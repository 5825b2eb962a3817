//! Writing flashpack files: neuron bundling, streamed and chunked sections, the
//! atomic output, `convert` which puts them together, and `retrain` which
//! replaces the predictors of an existing file; and reading them back as their
//! users do: `verify` (hashes, rules, weights and logits against the source)
//! and `inspect` (what a checkpoint or packed file holds).

#[allow(missing_docs)]
pub mod bundle;
#[allow(missing_docs)]
pub mod convert;
pub mod inspect;
#[allow(missing_docs)]
pub mod output;
#[allow(missing_docs)]
pub mod quantize;
#[allow(missing_docs)]
pub mod retrain;
#[allow(missing_docs)]
pub mod section;
pub mod verify;

pub use convert::{convert, ConvertOptions, ConvertSummary, TargetDType};
pub use inspect::{inspect, InspectReport};
pub use verify::{verify, VerifyOptions, VerifyReport};
