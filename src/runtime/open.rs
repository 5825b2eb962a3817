//! Opening whatever model a user names: a Hugging Face checkpoint directory or a
//! flashpack file, as the same [`Model`] and tokenizer, so every command accepts both.

use std::path::Path;

use crate::error::Result;
use crate::format::PackedFile;
use crate::input::{Checkpoint, TextTokenizer};
use crate::runtime::packed::{packed_tokenizer, PackedWeights};
use crate::runtime::Model;

/// Where a loaded model came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelSource {
    Checkpoint,
    Packed,
}

pub struct LoadedModel {
    pub model: Model,
    pub tokenizer: TextTokenizer,
    pub source: ModelSource,
}

/// Loads a checkpoint directory or a packed file (all weights in DRAM).
pub fn open_model(path: &Path) -> Result<LoadedModel> {
    if path.is_file() {
        let file = PackedFile::open(path)?;
        let weights = PackedWeights::read_all(&file)?;
        let model = Model::load(&file.config, &file.names, &weights)?;
        Ok(LoadedModel {
            model,
            tokenizer: packed_tokenizer(&file)?,
            source: ModelSource::Packed,
        })
    } else {
        let ckpt = Checkpoint::open(path)?;
        let model = Model::from_checkpoint(&ckpt)?;
        Ok(LoadedModel {
            model,
            tokenizer: ckpt.tokenizer()?,
            source: ModelSource::Checkpoint,
        })
    }
}
