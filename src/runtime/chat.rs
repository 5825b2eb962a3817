//! Chat templates: a conversation rendered with the model's own `chat_template`
//! and tokenized, as transformers'
//! `tokenizer.apply_chat_template(messages, add_generation_prompt=True)` does.
//!
//! Where the template comes from, as transformers loads it: `chat_template.jinja`
//! beside the tokenizer (what transformers 4.47 and later write), else
//! `tokenizer_config.json`'s `chat_template`, a string or a list of named
//! templates (`[{"name": "default", "template": ...}, ...]`, of which "default"
//! is used); a packed file carries the checkpoint's `tokenizer_config.json`.
//!
//! Rendering follows transformers' Jinja environment: `trim_blocks` and
//! `lstrip_blocks`, loop controls (`break`, `continue`), `raise_exception`,
//! `strftime_now`, `tojson` as Python's `json.dumps(ensure_ascii=False)`, the
//! special tokens (`bos_token`, `eos_token`, ...) as strings, `messages`,
//! `add_generation_prompt`, `tools` and `documents` (none). Python's string and
//! dict methods (`.strip()`, `.startswith()`, `.items()`, ...) come from
//! minijinja's Python compatibility layer. The rendered text is tokenized
//! without adding special tokens (transformers' `add_special_tokens=False`):
//! a template that wants BOS writes `{{ bos_token }}` itself.

use std::path::{Path, PathBuf};

use minijinja::value::{Value, ValueKind};
use minijinja::{Environment, ErrorKind};

use crate::error::{Error, Result};
use crate::format::layout::TOKENIZER_SECTION;
use crate::format::PackedFile;
use crate::input::tokenizer::{TOKENIZER_CONFIG_FILE, TOKENIZER_FILE};
use crate::input::TextTokenizer;
use crate::runtime::generate::{generate_text_in, GenerateOptions, Generation, TextGeneration};
use crate::runtime::{KvCache, Model};

/// The file transformers writes a model's (default) chat template to.
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";

/// The special tokens transformers passes to a template (its
/// `special_tokens_map`), where `tokenizer_config.json` names them.
const SPECIAL_TOKEN_KEYS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant` (templates may accept others).
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Message {
        Message {
            role: role.to_string(),
            content: content.into(),
        }
    }
}

/// A model's chat template with the special tokens it may use.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    /// `bos_token`, `eos_token`, ... as the template sees them.
    special_tokens: Vec<(&'static str, String)>,
    /// Where the template came from, for errors.
    origin: PathBuf,
}

impl ChatTemplate {
    /// A template from its source text, with the special tokens of
    /// `tokenizer_config` (the parsed `tokenizer_config.json`, if any).
    pub fn new(
        source: impl Into<String>,
        tokenizer_config: Option<&serde_json::Value>,
        origin: &Path,
    ) -> Result<ChatTemplate> {
        let template = ChatTemplate {
            source: source.into(),
            special_tokens: special_tokens(tokenizer_config),
            origin: origin.to_path_buf(),
        };
        // Syntax errors show when the model is opened, not at the first message.
        let env = template.environment();
        env.template_from_str(&template.source)
            .map_err(|e| template.error(&e))?;
        Ok(template)
    }

    /// The template of `tokenizer_config.json`'s `chat_template` key (a string,
    /// or a list of named templates of which "default" is used); `None` when
    /// the key is absent or null.
    pub fn from_tokenizer_config(
        tokenizer_config: &serde_json::Value,
        origin: &Path,
    ) -> Result<Option<ChatTemplate>> {
        let source = match tokenizer_config.get("chat_template") {
            None | Some(serde_json::Value::Null) => return Ok(None),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(named)) => {
                let default = named
                    .iter()
                    .find(|t| t.get("name").and_then(serde_json::Value::as_str) == Some("default"));
                match default
                    .and_then(|t| t.get("template"))
                    .and_then(|t| t.as_str())
                {
                    Some(s) => s.to_string(),
                    None => {
                        let names: Vec<&str> = named
                            .iter()
                            .filter_map(|t| t.get("name").and_then(serde_json::Value::as_str))
                            .collect();
                        return Err(Error::InvalidArgument(format!(
                            "{}: chat_template is a list of named templates without one named \
                             \"default\" (names: {})",
                            origin.display(),
                            names.join(", ")
                        )));
                    }
                }
            }
            Some(other) => {
                return Err(Error::InvalidArgument(format!(
                    "{}: chat_template must be a string or a list of named templates, not {}",
                    origin.display(),
                    json_kind(other)
                )))
            }
        };
        ChatTemplate::new(source, Some(tokenizer_config), origin).map(Some)
    }

    /// The chat template of a checkpoint directory or a packed file; an error
    /// that says so when the model has none.
    pub fn load(model: &Path) -> Result<ChatTemplate> {
        if model.is_file() {
            let file = PackedFile::open(model)?;
            let config = file.manifest.tokenizer_config.as_ref();
            let found = match config {
                Some(c) => ChatTemplate::from_tokenizer_config(c, model)?,
                None => None,
            };
            return found
                .ok_or_else(|| no_template(model, "its tokenizer_config has no chat_template"));
        }
        let config_path = model.join(TOKENIZER_CONFIG_FILE);
        let config = if crate::input::file_present(&config_path)? {
            Some(crate::input::read_json(
                &config_path,
                TOKENIZER_CONFIG_FILE,
            )?)
        } else {
            None
        };
        let jinja = model.join(CHAT_TEMPLATE_FILE);
        if crate::input::file_present(&jinja)? {
            let source = std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?;
            return ChatTemplate::new(source, config.as_ref(), &jinja);
        }
        let found = match &config {
            Some(c) => ChatTemplate::from_tokenizer_config(c, &config_path)?,
            None => None,
        };
        found.ok_or_else(|| {
            no_template(
                model,
                "no chat_template.jinja, and tokenizer_config.json has no chat_template",
            )
        })
    }

    /// The template's source text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The special token `key` (`"eos_token"`, ...) as the template sees it.
    pub fn special_token(&self, key: &str) -> Option<&str> {
        self.special_tokens
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The conversation as text, as `apply_chat_template(messages,
    /// add_generation_prompt=..., tokenize=False)` gives it.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let env = self.environment();
        let template = env
            .template_from_str(&self.source)
            .map_err(|e| self.error(&e))?;
        let mut context: std::collections::BTreeMap<&str, Value> = self
            .special_tokens
            .iter()
            .map(|(k, v)| (*k, Value::from(v.as_str())))
            .collect();
        // Serialized, each message is a map in field order (role, content),
        // as Python's dicts keep it.
        context.insert("messages", Value::from(minijinja::value::Serde(messages)));
        context.insert("tools", Value::from(()));
        context.insert("documents", Value::from(()));
        context.insert("add_generation_prompt", Value::from(add_generation_prompt));
        template
            .render(Value::from(context))
            .map_err(|e| self.error(&e))
    }

    /// transformers' Jinja environment (`_compile_jinja_template`).
    fn environment(&self) -> Environment<'static> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .expect("the default delimiters are valid");
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        // A template is data from a model repository: bound its work.
        env.set_recursion_limit(100);
        env
    }

    fn error(&self, e: &minijinja::Error) -> Error {
        let mut message = e.to_string();
        if e.kind() == ErrorKind::InvalidOperation {
            if let Some(detail) = e.detail() {
                message = detail.to_string();
            }
        }
        Error::InvalidArgument(format!(
            "chat template of {}: {message}",
            self.origin.display()
        ))
    }
}

fn no_template(model: &Path, why: &str) -> Error {
    Error::InvalidArgument(format!(
        "{} has no chat template ({why}); give a plain prompt to `flashpack run` instead",
        model.display()
    ))
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "an object",
    }
}

/// The special tokens of `tokenizer_config.json` (a string or an added-token
/// object with `content`), as transformers' `special_tokens_map` has them.
fn special_tokens(config: Option<&serde_json::Value>) -> Vec<(&'static str, String)> {
    let Some(config) = config else {
        return Vec::new();
    };
    SPECIAL_TOKEN_KEYS
        .iter()
        .filter_map(|&key| {
            let value = config.get(key)?;
            let content = match value {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Object(o) => o.get("content")?.as_str()?.to_string(),
                _ => return None,
            };
            Some((key, content))
        })
        .collect()
}

/// `raise_exception(message)`: the template refuses the conversation.
fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: the local time, formatted by the C library's
/// strftime (which Python's `datetime.strftime` also uses).
fn strftime_now(format: String) -> std::result::Result<String, minijinja::Error> {
    let bad = || minijinja::Error::new(ErrorKind::InvalidOperation, "strftime_now: bad format");
    let c_format = std::ffi::CString::new(format.clone()).map_err(|_| bad())?;
    // SAFETY: time/localtime_r fill the structs we own; strftime writes at most
    // buf.len() bytes into buf and returns how many it wrote.
    unsafe {
        let now = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&now, &mut tm).is_null() {
            return Err(bad());
        }
        let mut buf = vec![0u8; 256 + format.len() * 16];
        let n = libc::strftime(buf.as_mut_ptr().cast(), buf.len(), c_format.as_ptr(), &tm);
        if n == 0 && !format.is_empty() {
            return Err(bad());
        }
        buf.truncate(n);
        String::from_utf8(buf).map_err(|_| bad())
    }
}

/// `tojson` as transformers defines it: Python's `json.dumps(x,
/// ensure_ascii=False, indent=None, separators=None, sort_keys=False)`.
fn tojson(
    value: Value,
    kwargs: minijinja::value::Kwargs,
) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.kind() {
            ValueKind::String => Some(v.as_str().unwrap_or("").to_string()),
            ValueKind::Number => Some(" ".repeat(i64::try_from(v)?.max(0) as usize)),
            _ => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be a number or a string",
                ))
            }
        },
    };
    let (item_sep, key_sep) = match separators {
        Some(s) if !s.is_none() => {
            let parts: Vec<String> = s
                .try_iter()?
                .map(|p| p.as_str().unwrap_or("").to_string())
                .collect();
            match parts.as_slice() {
                [a, b] => (a.clone(), b.clone()),
                _ => {
                    return Err(minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be two strings",
                    ))
                }
            }
        }
        // Python's defaults: ", " without indent, "," with it.
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    let dumper = PyJson {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    let mut out = String::new();
    dumper.write(&value, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

/// Python's `json.dumps` over template values.
struct PyJson {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

impl PyJson {
    fn write(
        &self,
        v: &Value,
        depth: usize,
        out: &mut String,
    ) -> std::result::Result<(), minijinja::Error> {
        match v.kind() {
            ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => out.push_str(&py_number(v)),
            ValueKind::String => self.write_str(v.as_str().unwrap_or(""), out),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                self.write_container(out, depth, '[', ']', &items, |item, d, out| {
                    self.write(item, d, out)
                })?;
            }
            ValueKind::Map => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort_by_key(|k| k.to_string());
                }
                let pairs: Vec<(Value, Value)> = keys
                    .into_iter()
                    .map(|k| {
                        let item = v.get_item(&k).unwrap_or_default();
                        (k, item)
                    })
                    .collect();
                self.write_container(out, depth, '{', '}', &pairs, |(k, item), d, out| {
                    let key = match k.as_str() {
                        Some(s) => s.to_string(),
                        None => k.to_string(),
                    };
                    self.write_str(&key, out);
                    out.push_str(&self.key_sep);
                    self.write(item, d, out)
                })?;
            }
            _ => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: {} is not JSON serializable", v.kind()),
                ))
            }
        }
        Ok(())
    }

    fn write_container<T>(
        &self,
        out: &mut String,
        depth: usize,
        open: char,
        close: char,
        items: &[T],
        mut each: impl FnMut(&T, usize, &mut String) -> std::result::Result<(), minijinja::Error>,
    ) -> std::result::Result<(), minijinja::Error> {
        out.push(open);
        if items.is_empty() {
            out.push(close);
            return Ok(());
        }
        let newline = |out: &mut String, level: usize| {
            if let Some(unit) = &self.indent {
                out.push('\n');
                for _ in 0..level {
                    out.push_str(unit);
                }
            }
        };
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                out.push_str(&self.item_sep);
            }
            newline(out, depth + 1);
            each(item, depth + 1, out)?;
        }
        newline(out, depth);
        out.push(close);
        Ok(())
    }

    fn write_str(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && (c as u32) > 0x7e) => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// A number as Python's `json.dumps` writes it: integers as they are, floats
/// as `repr(float)` (`1.0`, `1e-05`, `1.5e+16`, `Infinity`, `NaN`).
fn py_number(v: &Value) -> String {
    let text = v.to_string();
    let is_float = text.contains(['.', 'e', 'E']) || text.contains("inf") || text.contains("nan");
    if !is_float {
        return text;
    }
    let Ok(x) = f64::try_from(v.clone()) else {
        return text;
    };
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    py_float_repr(x)
}

/// Python's `repr(float)`: the shortest digits that round-trip, in fixed
/// notation when the decimal exponent is in -4..16, else `d.ddde+XX`.
fn py_float_repr(x: f64) -> String {
    let sci = format!("{x:e}"); // shortest round-trip digits, e.g. "1.5e16"
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if (-4..16).contains(&exp) {
        let fixed = format!("{x}");
        if fixed.contains('.') {
            fixed
        } else {
            format!("{fixed}.0")
        }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    }
}

/// A chat template with the tokenizer to encode what it renders: the
/// conversation's token ids as transformers'
/// `apply_chat_template(messages, add_generation_prompt=True)` gives them.
pub struct ChatEncoder {
    template: ChatTemplate,
    tokenizer: tokenizers::Tokenizer,
    path: PathBuf,
}

impl ChatEncoder {
    /// The template and tokenizer of a checkpoint directory or a packed file.
    pub fn load(model: &Path) -> Result<ChatEncoder> {
        let template = ChatTemplate::load(model)?;
        let (path, json) = if model.is_file() {
            let file = PackedFile::open(model)?;
            (
                model.join(TOKENIZER_SECTION),
                file.read_section(TOKENIZER_SECTION)?,
            )
        } else {
            let path = model.join(TOKENIZER_FILE);
            let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
            (path, bytes)
        };
        ChatEncoder::from_parts(template, &json, &path)
    }

    /// A template and the contents of `tokenizer.json` (`path` names it in errors).
    pub fn from_parts(
        template: ChatTemplate,
        tokenizer_json: &[u8],
        path: &Path,
    ) -> Result<ChatEncoder> {
        let tokenizer =
            tokenizers::Tokenizer::from_bytes(tokenizer_json).map_err(|e| Error::Tokenizer {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        Ok(ChatEncoder {
            template,
            tokenizer,
            path: path.to_path_buf(),
        })
    }

    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// The conversation rendered and tokenized (no special tokens added: the
    /// template writes those it wants).
    pub fn encode(&self, messages: &[Message], add_generation_prompt: bool) -> Result<Vec<u32>> {
        let text = self.template.render(messages, add_generation_prompt)?;
        self.encode_text(&text)
    }

    /// Token ids of already rendered text, without added special tokens.
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::Tokenizer {
                path: self.path.clone(),
                message: e.to_string(),
            })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The id of the template's `eos_token` (chat models often end a turn with
    /// a token that `generation_config.json` does not list, such as
    /// `<|im_end|>`): generation should stop there too.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.template
            .special_token("eos_token")
            .and_then(|t| self.tokenizer.token_to_id(t))
    }
}

/// A conversation's KV cache, kept from turn to turn: each turn computes only
/// the positions after the longest start its prompt shares with what the cache
/// holds (the previous prompt and answer, as far as re-rendering them gives
/// the same ids), instead of the whole conversation again.
pub struct ChatSession {
    cache: KvCache,
    /// The ids whose keys and values `cache` holds, in order.
    ids: Vec<u32>,
}

/// A turn generated by [`ChatSession::generate`].
#[derive(Debug, Clone)]
pub struct ChatTurn {
    pub text: String,
    pub generation: Generation,
    /// Prompt positions taken from the cache rather than computed.
    pub reused_tokens: usize,
}

impl ChatSession {
    pub fn new(model: &Model) -> ChatSession {
        ChatSession {
            cache: model.new_cache(),
            ids: Vec::new(),
        }
    }

    /// Forgets the cached positions.
    pub fn reset(&mut self) {
        self.cache.clear();
        self.ids.clear();
    }

    /// Generates after `prompt` as [`crate::runtime::generate::generate_text`] does without stop
    /// strings (`opts.stop_strings` must be empty): same sampling, same stop
    /// ids, the text streamed to `on_text` once final, an EOS adding no text.
    pub fn generate(
        &mut self,
        model: &Model,
        tokenizer: &TextTokenizer,
        prompt: &[u32],
        opts: &GenerateOptions,
        on_text: impl FnMut(&str) -> Result<()>,
    ) -> Result<ChatTurn> {
        let result = self.generate_inner(model, tokenizer, prompt, opts, on_text);
        if result.is_err() {
            // A pass that failed may have left the cache part-written.
            self.reset();
        }
        result
    }

    fn generate_inner(
        &mut self,
        model: &Model,
        tokenizer: &TextTokenizer,
        prompt: &[u32],
        opts: &GenerateOptions,
        on_text: impl FnMut(&str) -> Result<()>,
    ) -> Result<ChatTurn> {
        if !opts.stop_strings.is_empty() {
            return Err(Error::InvalidArgument(
                "ChatSession::generate takes no stop strings".into(),
            ));
        }
        crate::runtime::generate::check_prompt(model, prompt, opts, "the conversation")?;
        // A sliding-window layer has dropped old rows: start over.
        let slid = self.cache.layers.iter().any(|l| l.first > 0);
        let common = if slid {
            0
        } else {
            self.ids
                .iter()
                .zip(prompt)
                .take_while(|(a, b)| a == b)
                .count()
        };
        // At least the last prompt token is computed: its logits come next.
        let keep = common.min(prompt.len() - 1).min(self.cache.len);
        if keep == 0 {
            self.reset();
        } else {
            // Rows past `keep` are overwritten by the next pass.
            self.cache.len = keep;
            self.ids.truncate(keep);
        }
        let TextGeneration { text, generation } = generate_text_in(
            model,
            tokenizer,
            &mut self.cache,
            keep,
            prompt,
            opts,
            on_text,
        )?;
        // The cache holds the prompt and every generated token but the last.
        self.ids = prompt.to_vec();
        self.ids.extend_from_slice(&generation.generated_ids);
        self.ids.truncate(self.cache.len);
        Ok(ChatTurn {
            text,
            generation,
            reused_tokens: keep,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(source: &str, messages: &[Message], add: bool) -> Result<String> {
        let config = serde_json::json!({"bos_token": "<s>", "eos_token": "</s>"});
        ChatTemplate::new(source, Some(&config), Path::new("test"))?.render(messages, add)
    }

    #[test]
    fn python_float_repr() {
        assert_eq!(py_float_repr(1.0), "1.0");
        assert_eq!(py_float_repr(0.5), "0.5");
        assert_eq!(py_float_repr(1e-5), "1e-05");
        assert_eq!(py_float_repr(0.0001), "0.0001");
        assert_eq!(py_float_repr(1.5e16), "1.5e+16");
        assert_eq!(py_float_repr(1e15), "1000000000000000.0");
        assert_eq!(py_float_repr(-2.25), "-2.25");
    }

    #[test]
    fn tojson_is_python_json_dumps() {
        let out = render(
            "{{ {'a': [1, 2.5, none, true], 'b': 'x\"é\\n'} | tojson }}|{{ [] | tojson }}|{{ {'k': 1} | tojson(indent=2) }}",
            &[],
            false,
        )
        .unwrap();
        assert_eq!(
            out,
            "{\"a\": [1, 2.5, null, true], \"b\": \"x\\\"é\\n\"}|[]|{\n  \"k\": 1\n}"
        );
    }

    #[test]
    fn raise_exception_is_an_error_with_its_message() {
        let err = render(
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}",
            &[Message::new("assistant", "hi")],
            false,
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("Conversation roles must alternate"),
            "{err}"
        );
    }

    #[test]
    fn strftime_now_and_the_none_values_transformers_passes() {
        let out = render(
            "{{ strftime_now('%Y-%m-%d') }}|{{ tools is none }}|{{ documents is defined }}|{{ bos_token }}",
            &[],
            false,
        )
        .unwrap();
        let (date, rest) = out.split_once('|').unwrap();
        // Booleans print as Python prints them.
        assert_eq!(rest, "True|True|<s>");
        let parts: Vec<&str> = date.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [4, 2, 2],
            "{date}"
        );
        assert!(
            date.chars().all(|c| c.is_ascii_digit() || c == '-'),
            "{date}"
        );
        assert!(parts[0] >= "2024", "{date}");
    }

    #[test]
    fn blocks_trim_and_loops_break() {
        let out = render(
            "{% for m in messages %}\n  {% if loop.index > 1 %}{% break %}{% endif %}\n{{ m.content | trim }}\n{% endfor %}",
            &[Message::new("user", " a "), Message::new("user", "b")],
            false,
        )
        .unwrap();
        assert_eq!(out, "a\n");
    }
}
