//! The generation loop (prefill, then one decode step per token) and the
//! incremental detokenizer that streams text as it is generated.

use std::time::Instant;

use crate::error::{Error, Result};
use crate::input::TextTokenizer;
use crate::runtime::model::{Logits, Model};
use crate::runtime::sampling::{Sampler, SamplingParams};

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops after emitting any of these (the EOS ids).
    pub stop_ids: Vec<u32>,
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Eos,
    MaxNewTokens,
    /// The model's context is full.
    Context,
}

/// The result of [`generate`], with timings.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Generation {
    pub generated_ids: Vec<u32>,
    pub stop_reason: StopReason,
    pub prefill_ms: f64,
    /// Decode steps run (the first generated token comes from the prefill).
    pub decode_steps: usize,
    pub decode_ms: f64,
}

impl Generation {
    pub fn decode_tokens_per_s(&self) -> f64 {
        if self.decode_ms > 0.0 {
            self.decode_steps as f64 / (self.decode_ms / 1000.0)
        } else {
            0.0
        }
    }
}

/// Generates up to `max_new_tokens` after `prompt`, calling `on_token` with each
/// new id as soon as it is chosen. A prompt longer than the model's context is
/// an error; reaching the context while generating just stops.
pub fn generate(
    model: &Model,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Generation> {
    let max = model.config.max_context;
    if prompt.is_empty() {
        return Err(Error::InvalidArgument(
            "the prompt encodes to no tokens".into(),
        ));
    }
    if prompt.len() > max {
        return Err(Error::ContextTooLong {
            what: format!("the prompt ({} tokens)", prompt.len()),
            needed: prompt.len(),
            max,
        });
    }
    let mut sampler = Sampler::new(opts.sampling)?;
    let mut cache = model.new_cache();
    let mut out = Generation {
        generated_ids: Vec::new(),
        stop_reason: StopReason::MaxNewTokens,
        prefill_ms: 0.0,
        decode_steps: 0,
        decode_ms: 0.0,
    };
    if opts.max_new_tokens == 0 {
        return Ok(out);
    }
    let t0 = Instant::now();
    let mut logits = model.forward(&mut cache, prompt, Logits::Last, None)?;
    out.prefill_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let t1 = Instant::now();
    loop {
        let next = sampler.sample(&logits);
        out.generated_ids.push(next);
        on_token(next)?;
        if opts.stop_ids.contains(&next) {
            out.stop_reason = StopReason::Eos;
            break;
        }
        if out.generated_ids.len() >= opts.max_new_tokens {
            out.stop_reason = StopReason::MaxNewTokens;
            break;
        }
        if cache.len >= max {
            out.stop_reason = StopReason::Context;
            break;
        }
        logits = model.forward(&mut cache, &[next], Logits::Last, None)?;
        out.decode_steps += 1;
    }
    out.decode_ms = t1.elapsed().as_secs_f64() * 1000.0;
    Ok(out)
}

/// Turns a growing id sequence into text increments that are safe to print.
///
/// Byte-level BPE tokens can end in the middle of a UTF-8 character, and some
/// tokenizers change how a token decodes depending on what precedes it, so each
/// step decodes the whole sequence (prompt included) and prints only what lies
/// beyond what was printed, holding back a trailing U+FFFD (an incomplete
/// character that the next token may complete).
pub struct TextStream<'a> {
    tokenizer: &'a TextTokenizer,
    ids: Vec<u32>,
    /// Byte length of the decoded text already printed (or of the prompt).
    printed: usize,
}

impl<'a> TextStream<'a> {
    pub fn new(tokenizer: &'a TextTokenizer, prompt: &[u32]) -> Result<TextStream<'a>> {
        let printed = tokenizer.decode(prompt)?.len();
        Ok(TextStream {
            tokenizer,
            ids: prompt.to_vec(),
            printed,
        })
    }

    /// Adds a token; returns the text that became final (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        Ok(self.take_new(&text))
    }

    /// The rest of the text, incomplete characters included (call at the end).
    pub fn finish(&mut self) -> Result<String> {
        let text = self.tokenizer.decode(&self.ids)?;
        Ok(self.take_new(&text))
    }

    fn take_new(&mut self, text: &str) -> String {
        if text.len() <= self.printed || !text.is_char_boundary(self.printed) {
            return String::new();
        }
        let new = text[self.printed..].to_string();
        self.printed = text.len();
        new
    }
}
