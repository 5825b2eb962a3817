//! The reference runtime: executes a model (dense for now) exactly as Hugging Face
//! transformers does.
//!
//! - [`weights`]: tensors in their stored dtype, and where they come from.
//! - [`kernels`]: deterministic matvec / GEMM / norms / activations.
//! - [`rope`], [`attention`]: positions, attention and the KV cache.
//! - [`ffn`]: the FFN component ([`ffn::Ffn`]) the flash runtime re-implements.
//! - [`model`]: the one forward pass (prefill batch and decode step).
//! - [`moe`]: the mixture-of-experts FFN (router, experts, shared expert).
//! - [`sampling`], [`generate`]: token choice and the generation loop.
//! - [`perplexity`]: the perplexity definition of the foundation issue.
//! - [`predictor`]: the trained low-rank predictor, evaluated (training: `crate::predictor`).
//! - [`sparse`]: the `oracle` and `predicted` FFN modes (chosen neurons only).
//! - [`flash`]: the FFN read from disk (`naive`, `flash`), under a DRAM budget.
//! - [`packed`], [`open`]: a flashpack file as a tensor source; loading either kind of model.
//! - [`session`]: one way to open a model for any FFN mode, generate and score ([`Session`]).
//! - [`mod@bench`]: speed and memory-bandwidth measurements, a random-weight model.

#[allow(missing_docs)]
pub mod attention;
#[allow(missing_docs)]
pub mod bench;
#[allow(missing_docs)]
pub mod chat;
#[allow(missing_docs)]
pub mod ffn;
#[allow(missing_docs)]
pub mod flash;
#[allow(missing_docs)]
pub mod generate;
#[allow(missing_docs)]
pub mod kernels;
#[allow(missing_docs)]
pub mod lowbit;
#[allow(missing_docs)]
pub mod model;
#[allow(missing_docs)]
pub mod moe;
#[allow(missing_docs)]
pub mod npy;
#[allow(missing_docs)]
pub mod open;
#[allow(missing_docs)]
pub mod packed;
#[allow(missing_docs)]
pub mod perplexity;
#[allow(missing_docs)]
pub mod predictor;
#[allow(missing_docs)]
pub mod quant;
#[allow(missing_docs)]
pub mod quant_ffn;
#[allow(missing_docs)]
pub mod rope;
#[allow(missing_docs)]
pub mod sampling;
pub mod session;
#[allow(missing_docs)]
pub mod sparse;
#[allow(missing_docs)]
pub mod weights;

pub use attention::KvCache;
pub use ffn::{ActiveSet, DenseFfn, Ffn, Fired};
pub use model::{Logits, Model, Observer};
pub use open::{open_model, LoadedModel, ModelSource};
pub use session::{Session, SessionOptions};

/// Runs `f` on a rayon pool of `threads` threads (`None`: rayon's default).
/// Results do not depend on the count; only speed does.
pub fn with_threads<T: Send>(
    threads: Option<usize>,
    f: impl FnOnce() -> T + Send,
) -> crate::Result<T> {
    match threads {
        None => Ok(f()),
        Some(0) => Err(crate::Error::InvalidOption {
            option: "threads",
            problem: "must be at least 1".into(),
        }),
        Some(n) => {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .map_err(|e| crate::Error::InvalidArgument(format!("thread pool: {e}")))?;
            Ok(pool.install(f))
        }
    }
}
