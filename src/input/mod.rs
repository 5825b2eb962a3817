//! Reading a Hugging Face checkpoint directory as users have it: `config.json`,
//! safetensors weights (one file or shards with an index), `tokenizer.json` and the
//! optional generation and tokenizer configs.
//!
//! [`Checkpoint::open`] validates everything once (config values, index against
//! shards, presence, shape and dtype of every tensor the architecture needs), so
//! code downstream can trust what it gets.

pub mod config;
pub mod hub;
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

/// Whether a file the reader may use is there: `Ok(false)` when nothing is at
/// `path`; something other than a file there (a directory, a device) is an error
/// that says a file was expected, rather than being taken for a missing file.
pub(crate) fn file_present(path: &Path) -> Result<bool> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => Ok(true),
        Ok(meta) => Err(Error::WrongKind {
            path: path.to_path_buf(),
            found: if meta.is_dir() {
                "is a directory"
            } else {
                "is not a regular file"
            },
            expected: "a file",
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// What a checkpoint path must be, as errors say it.
const CHECKPOINT_DIR: &str =
    "a checkpoint directory (config.json, model.safetensors, tokenizer.json)";

/// What a model path names, for the commands that take either kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelPathKind {
    /// A directory: opened as a Hugging Face checkpoint.
    Checkpoint,
    /// A file: opened as a flashpack file.
    Packed,
}

/// Whether `path` is a checkpoint directory or a packed file, for commands that
/// take either; a path that is neither is an error that says what was expected.
pub fn model_path_kind(path: &Path) -> Result<ModelPathKind> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => Ok(ModelPathKind::Checkpoint),
        Ok(meta) if meta.is_file() => Ok(ModelPathKind::Packed),
        Ok(_) => Err(Error::WrongKind {
            path: path.to_path_buf(),
            found: "is neither a file nor a directory",
            expected: "a checkpoint directory or a packed file",
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::WrongKind {
            path: path.to_path_buf(),
            found: "does not exist",
            expected: "a checkpoint directory or a packed file",
        }),
        Err(e) => Err(Error::io(path, e)),
    }
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
        if dir.is_file() {
            return Err(Error::WrongKind {
                path: dir.to_path_buf(),
                found: "is a file",
                expected: CHECKPOINT_DIR,
            });
        }
        if !dir.is_dir() {
            return Err(Error::MissingFile {
                path: dir.to_path_buf(),
                what: "checkpoint directory",
            });
        }
        let config = ModelConfig::load(&dir.join(CONFIG_FILE))?;
        let names = ModelNames::for_config(&config);
        let mut weights = WeightFiles::open(dir)?;
        for fused in &names.fused {
            weights.add_row_split(fused)?;
        }
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

    /// Checks the files beside the weights that [`Checkpoint::open`] does not read:
    /// `tokenizer.json` (required) loads through the tokenizers crate, and
    /// `tokenizer_config.json` and `generation_config.json`, where present, parse
    /// and give valid special tokens. Errors name the file.
    pub fn check_side_files(&self) -> Result<()> {
        self.tokenizer().map(drop)
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
