//! The generation loop (prefill, then one decode step per token), the
//! incremental detokenizer that streams text as it is generated, and
//! [`generate_text`], which joins them with stop strings: what `run`, `chat`
//! and the server call.

use std::time::Instant;

use crate::error::{Error, Result};
use crate::input::TextTokenizer;
use crate::runtime::attention::KvCache;
use crate::runtime::model::{Logits, Model};
use crate::runtime::sampling::{Sampler, SamplingParams};

/// What to generate. `Default` generates nothing (`max_new_tokens` 0) and
/// stops at no id: start from [`Session::generate_options`](crate::Session::generate_options),
/// which fills in the model's EOS ids and context.
#[derive(Debug, Clone, Default)]
pub struct GenerateOptions {
    /// Most tokens to generate after the prompt (an EOS that ends generation
    /// counts). 0 computes the prompt only (its logits with `keep_logits`).
    pub max_new_tokens: usize,
    /// How each token is chosen from the logits (default greedy).
    pub sampling: SamplingParams,
    /// Generation stops after emitting any of these (the EOS ids).
    pub stop_ids: Vec<u32>,
    /// Generation stops when the text contains any of these; the text ends
    /// before it ([`generate_text`] only).
    pub stop_strings: Vec<String>,
    /// Positions the KV cache may hold (prompt and generated), at most the
    /// model's context; 0 is the model's context.
    pub context: usize,
    /// Counts the tokens generated as they are chosen, for whoever watches
    /// from another thread (the interrupt summary).
    pub progress: Option<std::sync::Arc<std::sync::atomic::AtomicUsize>>,
    /// Keep the logits of every position computed ([`Generation::logits`]):
    /// each prompt position, then each generated token fed back. The prompt is
    /// computed as it always is; only its other rows are kept too.
    pub keep_logits: bool,
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// A token of [`GenerateOptions::stop_ids`] was generated (it is kept in
    /// the ids; it adds no text).
    Eos,
    /// [`GenerateOptions::max_new_tokens`] tokens were generated.
    MaxNewTokens,
    /// The context is full (the model's, or the one asked for).
    Context,
    /// The text reached one of the stop strings.
    StopString,
}

impl StopReason {
    /// Why, in words, for the human summary.
    pub fn describe(self) -> &'static str {
        match self {
            StopReason::Eos => "end of sequence",
            StopReason::MaxNewTokens => "token limit",
            StopReason::Context => "context full",
            StopReason::StopString => "stop string",
        }
    }
}

/// Whether generation goes on after a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Generate the next token (unless a limit or a stop id ends it).
    Continue,
    /// End now, with [`StopReason::StopString`].
    Stop,
}

/// The result of [`generate`], with timings.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Generation {
    /// The generated ids, an EOS that ended generation included.
    pub generated_ids: Vec<u32>,
    /// Why generation stopped.
    pub stop_reason: StopReason,
    /// Wall time of the prompt's forward pass, in milliseconds.
    pub prefill_ms: f64,
    /// Decode steps run (the first generated token comes from the prefill).
    pub decode_steps: usize,
    /// Wall time from the first token chosen to the end, in milliseconds
    /// (sampling, callbacks and every decode step).
    pub decode_ms: f64,
    /// With [`GenerateOptions::keep_logits`]: `rows x vocab` logits, one row
    /// per position computed (the prompt's positions after those reused, then
    /// one per decode step); row `p + i` (p = prompt positions) chose the
    /// generated token `i + 1`, row `p - 1` the first.
    #[serde(skip)]
    pub logits: Vec<f32>,
}

impl Generation {
    /// Decode steps per second of `decode_ms` (0 when nothing was decoded).
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
    generate_until(model, prompt, opts, |id| {
        on_token(id).map(|()| Flow::Continue)
    })
}

/// [`generate`] whose callback may stop generation (the stop reason is then
/// [`StopReason::StopString`]).
pub fn generate_until(
    model: &Model,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_token: impl FnMut(u32) -> Result<Flow>,
) -> Result<Generation> {
    generate_until_in(model, &mut model.new_cache(), 0, prompt, opts, on_token)
}

/// [`generate_until`] in a cache that already holds the first `reused`
/// positions of `prompt` (a chat's earlier turns; `reused < prompt.len()` and
/// `cache.len == reused`): only the rest of the prompt is computed. On return
/// the cache holds the prompt and every generated token but the last.
pub fn generate_until_in(
    model: &Model,
    cache: &mut KvCache,
    reused: usize,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(u32) -> Result<Flow>,
) -> Result<Generation> {
    let max = check_prompt(model, prompt, opts, "the prompt")?;
    let mut sampler = Sampler::new(opts.sampling)?;
    let mut out = Generation {
        generated_ids: Vec::new(),
        stop_reason: StopReason::MaxNewTokens,
        prefill_ms: 0.0,
        decode_steps: 0,
        decode_ms: 0.0,
        logits: Vec::new(),
    };
    if opts.max_new_tokens == 0 && !opts.keep_logits {
        return Ok(out);
    }
    let t0 = Instant::now();
    let vocab = model.config.vocab_size;
    let mut logits = if opts.keep_logits {
        // Every row; the last equals what `Logits::Last` gives (model.rs).
        out.logits = model.forward(cache, &prompt[reused..], Logits::All, None)?;
        out.logits[out.logits.len() - vocab..].to_vec()
    } else {
        model.forward(cache, &prompt[reused..], Logits::Last, None)?
    };
    out.prefill_ms = t0.elapsed().as_secs_f64() * 1000.0;
    if opts.max_new_tokens == 0 {
        return Ok(out);
    }
    let t1 = Instant::now();
    let mut context: Vec<u32> = prompt.to_vec();
    loop {
        let next = sampler.sample_after(&logits, &context);
        context.push(next);
        out.generated_ids.push(next);
        if let Some(p) = &opts.progress {
            p.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if on_token(next)? == Flow::Stop {
            out.stop_reason = StopReason::StopString;
            break;
        }
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
        logits = model.forward(cache, &[next], Logits::Last, None)?;
        if opts.keep_logits {
            out.logits.extend_from_slice(&logits);
        }
        out.decode_steps += 1;
    }
    out.decode_ms = t1.elapsed().as_secs_f64() * 1000.0;
    Ok(out)
}

/// The context `opts` allows for `model` (its own when `opts.context` is 0),
/// after checking that `prompt` (named `what` in the error) is not empty and
/// fits in it.
pub(crate) fn check_prompt(
    model: &Model,
    prompt: &[u32],
    opts: &GenerateOptions,
    what: &str,
) -> Result<usize> {
    let max = match opts.context {
        0 => model.config.max_context,
        n => n.min(model.config.max_context),
    };
    if prompt.is_empty() {
        return Err(Error::InvalidArgument(
            "the prompt encodes to no tokens".into(),
        ));
    }
    if prompt.len() > max {
        return Err(Error::ContextTooLong {
            what: format!("{what} ({} tokens)", prompt.len()),
            needed: prompt.len(),
            max,
        });
    }
    Ok(max)
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
    /// A stream after `prompt`, whose text is never returned (only what the
    /// tokens pushed add to it).
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

/// Text generated by [`generate_text`].
#[derive(Debug, Clone)]
pub struct TextGeneration {
    /// The generated text, ending before a stop string that ended it.
    pub text: String,
    /// The ids, stop reason and timings.
    pub generation: Generation,
}

/// Generates from `prompt` and streams the text: `on_text` receives each piece
/// once it is final, that is a whole character that cannot still become part
/// of a stop string (pieces that could are held back until they cannot). The
/// text stops before the first stop string, which is neither streamed nor
/// returned; an EOS token adds no text.
pub fn generate_text(
    model: &Model,
    tokenizer: &TextTokenizer,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_text: impl FnMut(&str) -> Result<()>,
) -> Result<TextGeneration> {
    generate_text_in(
        model,
        tokenizer,
        &mut model.new_cache(),
        0,
        prompt,
        opts,
        on_text,
    )
}

/// [`generate_text`] in a cache that already holds the first `reused`
/// positions of `prompt` (see [`generate_until_in`]).
pub fn generate_text_in(
    model: &Model,
    tokenizer: &TextTokenizer,
    cache: &mut KvCache,
    reused: usize,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_text: impl FnMut(&str) -> Result<()>,
) -> Result<TextGeneration> {
    let mut stream = TextStream::new(tokenizer, prompt)?;
    let stops: Vec<&str> = opts
        .stop_strings
        .iter()
        .map(String::as_str)
        .filter(|s| !s.is_empty())
        .collect();
    // Text decoded so far, and how much of it went to `on_text`.
    let mut text = String::new();
    let mut sent = 0usize;
    let mut stopped_at: Option<usize> = None;
    let generation = generate_until_in(model, cache, reused, prompt, opts, |id| {
        if opts.stop_ids.contains(&id) {
            return Ok(Flow::Continue);
        }
        text.push_str(&stream.push(id)?);
        if let Some(at) = first_stop(&text, &stops) {
            stopped_at = Some(at);
            return Ok(Flow::Stop);
        }
        let safe = text.len() - held_back(&text, &stops);
        if safe > sent {
            on_text(&text[sent..safe])?;
            sent = safe;
        }
        Ok(Flow::Continue)
    })?;
    match stopped_at {
        Some(at) => text.truncate(at),
        None => {
            // Characters held back as incomplete (the EOS id itself was never
            // pushed, so it adds nothing).
            text.push_str(&stream.finish()?);
            if let Some(at) = first_stop(&text, &stops) {
                text.truncate(at);
            }
        }
    }
    if text.len() > sent {
        on_text(&text[sent..])?;
    }
    Ok(TextGeneration { text, generation })
}

/// Byte offset of the earliest stop string in `text`.
fn first_stop(text: &str, stops: &[&str]) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s)).min()
}

/// Length of the longest end of `text` that is a proper prefix of a stop
/// string (it may still grow into one), on a character boundary.
fn held_back(text: &str, stops: &[&str]) -> usize {
    let mut longest = 0;
    for stop in stops {
        for (i, _) in stop.char_indices().skip(1) {
            if i > longest && text.ends_with(&stop[..i]) {
                longest = i;
            }
        }
    }
    longest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_stop_string_is_held_back() {
        assert_eq!(held_back("hello wo", &["world"]), 2);
        assert_eq!(held_back("hello", &["world"]), 0);
        assert_eq!(held_back("a\n\nUs", &["\n\nUser:", "Us"]), 4);
        assert_eq!(first_stop("one STOP two STOP", &["STOP", "two"]), Some(4));
        assert_eq!(first_stop("none", &["STOP"]), None);
    }
}
