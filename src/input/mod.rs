//! Reading a Hugging Face checkpoint directory as users have it: `config.json`,
//! safetensors weights (one file or shards with an index), `tokenizer.json` and the
//! optional generation and tokenizer configs.
//!
//! [`Checkpoint::open`] validates everything once (config values, index against
//! shards, presence, shape and dtype of every tensor the architecture needs), so
//! code downstream can trust what it gets.

pub mod config;
pub mod summary;
pub mod tensors;
pub mod tokenizer;
pub mod weights;

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
pub use config::ModelConfig;
pub use tensors::ModelNames;
pub use tokenizer::TextTokenizer;
pub use weights::{TensorRef, WeightFiles};

pub const CONFIG_FILE: &str = "config.json";

/// JSON side files (configs, index) are small; anything this large is not one, and
/// reading it whole would be a way to exhaust memory.
pub const MAX_JSON_BYTES: u64 = 64 << 20;

/// Reads and parses a small JSON file; `what` names it when it is missing.
pub(crate) fn read_json<T: DeserializeOwned>(path: &Path, what: &'static str) -> Result<T> {
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::MissingFile {
                path: path.to_path_buf(),
                what,
            })
        }
        Err(e) => return Err(Error::io(path, e)),
    };
    if meta.len() > MAX_JSON_BYTES {
        return Err(Error::InvalidConfig {
            path: path.to_path_buf(),
            message: format!(
                "{} bytes exceeds the cap of {MAX_JSON_BYTES} for a JSON side file",
                meta.len()
            ),
        });
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_slice(&bytes).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// An opened, validated checkpoint directory.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub names: ModelNames,
    pub weights: WeightFiles,
}

impl Checkpoint {
    /// Opens `dir`, reads `config.json`, maps the weights and checks that every
    /// tensor the architecture needs is present with the right shape and a readable
    /// dtype. Errors name the file or tensor at fault.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        if !dir.is_dir() {
            return Err(Error::MissingFile {
                path: dir.to_path_buf(),
                what: "checkpoint directory",
            });
        }
        let config = ModelConfig::load(&dir.join(CONFIG_FILE))?;
        let names = ModelNames::for_config(&config);
        let weights = WeightFiles::open(dir)?;
        for spec in names.specs() {
            weights.get_shaped(&spec.name, &spec.shape)?;
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            config,
            names,
            weights,
        })
    }

    /// The checkpoint's tokenizer (`tokenizer.json` is required for text in and out).
    pub fn tokenizer(&self) -> Result<TextTokenizer> {
        TextTokenizer::load(&self.dir, &self.config)
    }

    /// A tensor by name (it was validated at open if the architecture needs it).
    pub fn tensor(&self, name: &str) -> Result<TensorRef<'_>> {
        self.weights.get(name)
    }
}
