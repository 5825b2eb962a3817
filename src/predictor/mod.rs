//! Sparsity predictors (PAPER.md section 1, issue 5): per layer, a low-rank map from
//! the FFN input to one logit per FFN neuron, trained by flashpack itself on
//! calibration data, with a threshold chosen for a target recall.
//!
//! - [`calibrate`]: running the dense model over calibration text: FFN inputs and
//!   firing masks to an on-disk store, firing frequencies, window maxima, SiLU
//!   thresholds.
//! - [`thresholds`]: SiLU models' per-layer thresholds for a model-wide target
//!   sparsity (uniform, or allocated across layers by output error).
//! - [`routing`]: a mixture-of-experts model's routing counts per layer and
//!   expert (what `convert --calib` stores and flash pins hot experts from).
//! - [`pipeline`]: calibrate, then train every layer (what `convert --calib` runs).
//! - [`train`]: training one layer's predictor from (FFN input, fired neurons)
//!   pairs: balanced loss, AdamW, held-out threshold and metrics, rank choice.

pub mod calibrate;
pub mod pipeline;
pub mod routing;
pub mod thresholds;
pub mod train;
