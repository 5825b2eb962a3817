//! flashpack: run language models larger than DRAM from flash storage.
//!
//! The technique is Apple's "LLM in a flash" (Alizadeh et al., 2023): keep
//! embeddings, attention and the KV cache in DRAM, leave the sparse FFN on flash,
//! predict which FFN neurons a token needs, and read only those, as contiguous
//! neuron bundles, through a sliding-window cache.
//!
//! The library is organised as the data flows:
//! - [`input`]: Hugging Face checkpoint directories (config, safetensors, tokenizer).
//! - [`format`]: the packed file format (spec: `formats/flashpack-v1.md`), reader and checks.
//! - [`pack`]: writing packed files (`convert`).
//! - [`runtime`]: the forward pass, KV cache, FFN and sampling.
//! - [`server`]: the OpenAI-compatible HTTP server (cargo feature `server`).
//! - [`cli`]: the `flashpack` command line, a thin layer over the library (cargo
//!   feature `cli`, on by default; `default-features = false` leaves out clap,
//!   indicatif, ctrlc and the HTTP stack).

pub mod cleanup;
#[cfg(feature = "cli")]
pub mod cli;
pub mod dtype;
pub mod error;
pub mod format;
pub mod input;
pub mod pack;
pub mod predictor;
pub mod progress;
pub mod quant;
pub mod runtime;
#[cfg(feature = "server")]
pub mod server;

pub use error::{Error, ExitClass, Result};
