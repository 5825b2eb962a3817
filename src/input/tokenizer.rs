//! Text to token ids and back, through the `tokenizers` crate on the checkpoint's
//! `tokenizer.json`, with the special-token settings of `tokenizer_config.json`
//! and `generation_config.json`.
//!
//! Ids must equal what `transformers.AutoTokenizer` gives with default settings.
//! `tokenizer.json`'s post-processor usually adds BOS itself; where
//! `tokenizer_config.json` sets `add_bos_token` / `add_eos_token` explicitly, that
//! wins, as transformers' Llama tokenizers rebuild their post-processor from it.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::input::config::{ModelConfig, TokenIds};

pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";
/// The largest released tokenizer.json files (256k-token vocabularies with merges)
/// are tens of MiB; it is parsed whole, so anything far larger is refused.
pub const MAX_TOKENIZER_BYTES: u64 = 256 << 20;

/// `tokenizer_config.json` fields we use. A special token is a string or an
/// `AddedToken` object with `content`.
#[derive(Debug, Default, Deserialize)]
struct RawTokenizerConfig {
    add_bos_token: Option<bool>,
    add_eos_token: Option<bool>,
    bos_token: Option<SpecialToken>,
    eos_token: Option<SpecialToken>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SpecialToken {
    Text(String),
    Added { content: String },
}

impl SpecialToken {
    fn content(&self) -> &str {
        match self {
            SpecialToken::Text(s) => s,
            SpecialToken::Added { content } => content,
        }
    }
}

/// `generation_config.json` fields we use.
#[derive(Debug, Default, Deserialize)]
struct RawGenerationConfig {
    bos_token_id: Option<TokenIds>,
    eos_token_id: Option<TokenIds>,
}

/// The special tokens a run needs, merged from config.json, generation_config.json
/// and tokenizer_config.json.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialTokens {
    /// The id prepended to a prompt, where the model has one.
    pub bos: Option<u32>,
    /// Generation stops at any of these.
    pub eos: Vec<u32>,
}

/// A checkpoint's tokenizer.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    /// `tokenizer_config.json`'s explicit choice; `None` leaves it to tokenizer.json.
    add_bos: Option<bool>,
    add_eos: Option<bool>,
    /// The BOS and EOS ids.
    pub special: SpecialTokens,
}

impl TextTokenizer {
    /// Loads `tokenizer.json` (required) and the optional configs beside it.
    pub fn load(dir: &Path, config: &ModelConfig) -> Result<TextTokenizer> {
        let path = dir.join(TOKENIZER_FILE);
        if !crate::input::file_present(&path)? {
            return Err(Error::MissingFile {
                path,
                what: "tokenizer.json",
            });
        }
        let size = std::fs::metadata(&path)
            .map_err(|e| Error::io(&path, e))?
            .len();
        if size > MAX_TOKENIZER_BYTES {
            return Err(Error::Tokenizer {
                path,
                message: format!("{size} bytes exceeds the cap of {MAX_TOKENIZER_BYTES}"),
            });
        }
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let optional = |name: &'static str| -> Result<Option<serde_json::Value>> {
            let p = dir.join(name);
            if crate::input::file_present(&p)? {
                crate::input::read_json(&p, name).map(Some)
            } else {
                Ok(None)
            }
        };
        let tok_cfg = optional(TOKENIZER_CONFIG_FILE)?;
        let gen_cfg = optional(GENERATION_CONFIG_FILE)?;
        TextTokenizer::from_parts(&path, &bytes, tok_cfg.as_ref(), gen_cfg.as_ref(), config)
    }

    /// Builds the tokenizer from the contents of `tokenizer.json` and of the
    /// optional `tokenizer_config.json` / `generation_config.json` (as a packed
    /// file carries them). `path` names the source in errors.
    pub fn from_parts(
        path: &Path,
        tokenizer_json: &[u8],
        tokenizer_config: Option<&serde_json::Value>,
        generation_config: Option<&serde_json::Value>,
        config: &ModelConfig,
    ) -> Result<TextTokenizer> {
        let path = path.to_path_buf();
        let inner =
            tokenizers::Tokenizer::from_bytes(tokenizer_json).map_err(|e| Error::Tokenizer {
                path: path.clone(),
                message: e.to_string(),
            })?;
        fn parse<T: serde::de::DeserializeOwned + Default>(
            value: Option<&serde_json::Value>,
            path: &Path,
            name: &str,
        ) -> Result<T> {
            match value {
                None => Ok(T::default()),
                Some(v) => serde_json::from_value(v.clone()).map_err(|source| Error::Json {
                    path: path.with_file_name(name),
                    source,
                }),
            }
        }
        let tok_cfg: RawTokenizerConfig = parse(tokenizer_config, &path, TOKENIZER_CONFIG_FILE)?;
        let gen: RawGenerationConfig = parse(generation_config, &path, GENERATION_CONFIG_FILE)?;
        let gen_path = path.with_file_name(GENERATION_CONFIG_FILE);

        let token_id =
            |t: &Option<SpecialToken>| t.as_ref().and_then(|t| inner.token_to_id(t.content()));
        let bos = match &gen.bos_token_id {
            Some(ids) => ids.to_vec().first().copied(),
            None => config.bos_token_id.or_else(|| token_id(&tok_cfg.bos_token)),
        };
        let mut eos = match &gen.eos_token_id {
            Some(ids) => ids.to_vec(),
            None => config.eos_token_ids.clone(),
        };
        if eos.is_empty() {
            eos.extend(token_id(&tok_cfg.eos_token));
        }
        let vocab = inner.get_vocab_size(true);
        for id in bos.iter().chain(eos.iter()) {
            if *id as usize >= config.vocab_size.max(vocab) {
                return Err(Error::Tokenizer {
                    path: gen_path.clone(),
                    message: format!("special token id {id} is outside the vocabulary"),
                });
            }
        }
        Ok(TextTokenizer {
            inner,
            path,
            add_bos: tok_cfg.add_bos_token,
            add_eos: tok_cfg.add_eos_token,
            special: SpecialTokens { bos, eos },
        })
    }

    /// Token ids of `text` as `AutoTokenizer(text)["input_ids"]` gives them.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        if self.add_bos.is_none() && self.add_eos.is_none() {
            return self.encode_raw(text, true);
        }
        // transformers' Llama tokenizers rebuild the post-processor as
        // `[BOS] $A [EOS]` from these flags; do the same around the bare encoding.
        let mut ids = self.encode_raw(text, false)?;
        let (post_bos, post_eos) = self.post_processor_adds()?;
        if let (Some(bos), true) = (self.special.bos, self.add_bos.unwrap_or(post_bos)) {
            ids.insert(0, bos);
        }
        if let (Some(&eos), true) = (self.special.eos.first(), self.add_eos.unwrap_or(post_eos)) {
            ids.push(eos);
        }
        Ok(ids)
    }

    /// Whether tokenizer.json's post-processor adds BOS / EOS, seen on a probe text.
    fn post_processor_adds(&self) -> Result<(bool, bool)> {
        let probe = "a";
        let bare = self.encode_raw(probe, false)?;
        let full = self.encode_raw(probe, true)?;
        let bos = self
            .special
            .bos
            .is_some_and(|b| full.first() == Some(&b) && bare.first() != Some(&b));
        let eos = self
            .special
            .eos
            .first()
            .is_some_and(|e| full.last() == Some(e) && bare.last() != Some(e));
        Ok((bos, eos))
    }

    fn encode_raw(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding =
            self.inner
                .encode(text, add_special_tokens)
                .map_err(|e| Error::Tokenizer {
                    path: self.path.clone(),
                    message: e.to_string(),
                })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| Error::Tokenizer {
            path: self.path.clone(),
            message: e.to_string(),
        })
    }

    /// Ids the tokenizer knows, added tokens included (may be below the
    /// model's `vocab_size`, whose embedding rows can be padded).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
