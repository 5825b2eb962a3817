//! Progress of long library work (convert, calibration, predictor training): the
//! phase that is running and how far it has got, for a caller to show. The
//! library only reports; the command line draws bars on a terminal.

/// A phase of converting or calibrating, in the order they run (hashing the
/// sources runs beside writing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    /// Forward passes over the calibration text: tokens done of the tokens that
    /// will be used (the text's, capped by the token limit).
    Calibrating,
    /// Per-layer sparsity curves from which SiLU/GeGLU thresholds are chosen:
    /// layers done of all layers.
    Thresholds,
    /// Per-layer firing labels and statistics: layers done of all layers.
    Statistics,
    /// One predictor per layer: layers done of all layers.
    Training,
    /// The packed file's sections: weight bytes written of all weight bytes
    /// (or, when retraining, stored bytes copied of all stored bytes).
    Writing,
    /// SHA-256 of the source files for the manifest: bytes hashed of all.
    Hashing,
}

/// What a phase counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Tokens of calibration text.
    Tokens,
    /// Model layers.
    Layers,
    /// Bytes (written, copied or hashed).
    Bytes,
}

impl Phase {
    /// A short name for a progress line.
    pub fn describe(self) -> &'static str {
        match self {
            Phase::Calibrating => "calibrating",
            Phase::Thresholds => "choosing thresholds",
            Phase::Statistics => "neuron statistics",
            Phase::Training => "training predictors",
            Phase::Writing => "writing",
            Phase::Hashing => "hashing sources",
        }
    }

    /// What `done` and `total` count.
    pub fn unit(self) -> Unit {
        match self {
            Phase::Calibrating => Unit::Tokens,
            Phase::Thresholds | Phase::Statistics | Phase::Training => Unit::Layers,
            Phase::Writing | Phase::Hashing => Unit::Bytes,
        }
    }
}

/// Called with a phase, the work done in it so far and its total. A phase's
/// calls reach `done == total` when it ends. `Hashing` runs beside `Writing` and
/// is reported from several threads, so its `done` values may arrive slightly
/// out of order (keep the largest).
pub type Progress<'a> = &'a (dyn Fn(Phase, u64, u64) + Sync);

/// A progress callback that shows nothing.
pub const SILENT: Progress<'static> = &|_, _, _| {};
