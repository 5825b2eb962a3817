//! The reference runtime: executes a model (dense for now) exactly as Hugging Face
//! transformers does.
