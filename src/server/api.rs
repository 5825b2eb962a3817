//! The OpenAI API's request fields as this server reads them, and its JSON
//! error object: `{"error": {"message", "type", "param", "code"}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

use crate::runtime::chat::Message;
use crate::runtime::generate::StopReason;
use crate::runtime::sampling::{SamplingDefaults, SamplingParams};

/// The most tokens one request may ask for (the context bounds it further).
pub const MAX_TOKENS_CAP: u64 = 1 << 20;

/// Tokens a `/v1/completions` request generates when it leaves out
/// `max_tokens`, as OpenAI's completions API does.
pub const COMPLETIONS_DEFAULT_MAX_TOKENS: usize = 16;
/// The most stop strings one request may give (OpenAI's limit is 4).
pub const MAX_STOP_STRINGS: usize = 16;

/// An error answer: an HTTP status and OpenAI's error object.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: Option<&'static str>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code: None,
        }
    }

    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    /// The `{"error": {...}}` object.
    pub fn body(&self) -> Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        json_response(self.status, &self.body())
    }
}

/// A JSON body with its content type.
pub fn json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// What a completion request asks for, beyond its prompt.
#[derive(Debug, Clone)]
pub struct Params {
    /// `None`: until EOS or the context is full.
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub echo: bool,
}

/// The request body as a JSON object.
pub fn parse_body(bytes: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::invalid(format!("the request body is not valid JSON: {e}"), None))?;
    match value {
        Value::Object(map) => Ok(map),
        _ => Err(ApiError::invalid(
            "the request body must be a JSON object",
            None,
        )),
    }
}

/// A field that is absent or null.
fn given<'a>(body: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    body.get(key).filter(|v| !v.is_null())
}

fn number(
    body: &Map<String, Value>,
    key: &'static str,
    range: impl Fn(f64) -> bool,
    rule: &str,
) -> Result<Option<f32>, ApiError> {
    match given(body, key) {
        None => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if x.is_finite() && range(x) => Ok(Some(x as f32)),
            _ => Err(ApiError::invalid(
                format!("'{key}' must be a number {rule} (got {v})"),
                Some(key),
            )),
        },
    }
}

fn integer(
    body: &Map<String, Value>,
    key: &'static str,
    min: u64,
    max: u64,
) -> Result<Option<u64>, ApiError> {
    match given(body, key) {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
            _ => Err(ApiError::invalid(
                format!("'{key}' must be an integer from {min} to {max} (got {v})"),
                Some(key),
            )),
        },
    }
}

fn boolean(body: &Map<String, Value>, key: &'static str) -> Result<bool, ApiError> {
    match given(body, key) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(ApiError::invalid(
            format!("'{key}' must be true or false (got {v})"),
            Some(key),
        )),
    }
}

/// Options this server does not implement: accepted at their neutral value,
/// refused otherwise (rather than silently ignored).
fn unsupported(body: &Map<String, Value>) -> Result<(), ApiError> {
    for key in ["presence_penalty", "frequency_penalty"] {
        if let Some(v) = given(body, key) {
            if v.as_f64() != Some(0.0) {
                return Err(
                    ApiError::invalid(format!("'{key}' is not supported (only 0)"), None)
                        .with_code("unsupported_parameter"),
                );
            }
        }
    }
    for key in ["n", "best_of"] {
        if let Some(v) = given(body, key) {
            if v.as_u64() != Some(1) {
                return Err(ApiError::invalid(
                    format!("'{key}' must be 1: one completion per request"),
                    None,
                )
                .with_code("unsupported_parameter"));
            }
        }
    }
    for key in [
        "logprobs",
        "top_logprobs",
        "suffix",
        "tools",
        "functions",
        "logit_bias",
    ] {
        if let Some(v) = given(body, key) {
            if v != &Value::Bool(false) {
                return Err(ApiError::invalid(format!("'{key}' is not supported"), None)
                    .with_code("unsupported_parameter"));
            }
        }
    }
    Ok(())
}

/// The sampling a request gets for the fields it leaves out: the model's
/// `generation_config.json` when that samples (`do_sample`), else OpenAI's
/// defaults (temperature 1, no top-k, top-p or min-p).
pub fn server_defaults(generation: SamplingDefaults) -> SamplingDefaults {
    if generation.temperature > 0.0 {
        generation
    } else {
        SamplingDefaults {
            temperature: 1.0,
            repetition_penalty: generation.repetition_penalty,
            ..SamplingDefaults::default()
        }
    }
}

/// The fields every completion request shares. `model`: the name this server
/// answers to (a request may leave `model` out); `defaults`: the sampling of
/// the fields left out (see [`server_defaults`]).
pub fn parse_params(
    body: &Map<String, Value>,
    model: &str,
    default_seed: u64,
    defaults: &SamplingDefaults,
) -> Result<Params, ApiError> {
    match given(body, "model") {
        None => {}
        Some(Value::String(name)) if name == model => {}
        Some(Value::String(name)) => {
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                message: format!("The model '{name}' does not exist; this server serves '{model}'"),
                kind: "invalid_request_error",
                param: Some("model"),
                code: Some("model_not_found"),
            })
        }
        Some(v) => {
            return Err(ApiError::invalid(
                format!("'model' must be a string (got {v})"),
                Some("model"),
            ))
        }
    }
    unsupported(body)?;
    let max_tokens = match integer(body, "max_completion_tokens", 0, MAX_TOKENS_CAP)? {
        Some(n) => Some(n),
        None => integer(body, "max_tokens", 0, MAX_TOKENS_CAP)?,
    };
    let temperature = number(
        body,
        "temperature",
        |x| (0.0..=2.0).contains(&x),
        "from 0 to 2",
    )?;
    let top_p = number(body, "top_p", |x| x > 0.0 && x <= 1.0, "in (0, 1]")?;
    let min_p = number(body, "min_p", |x| (0.0..=1.0).contains(&x), "from 0 to 1")?;
    let repetition_penalty = match number(body, "repetition_penalty", |x| x > 0.0, "above 0")? {
        Some(p) => Some(p),
        None => number(body, "repeat_penalty", |x| x > 0.0, "above 0")?,
    };
    let top_k = integer(body, "top_k", 0, u32::MAX as u64)?;
    let seed = integer(body, "seed", 0, (1 << 53) - 1)?;
    let stop = match given(body, "stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if items.len() <= MAX_STOP_STRINGS => items
            .iter()
            .map(|s| s.as_str().map(str::to_string))
            .collect::<Option<Vec<String>>>()
            .ok_or_else(|| {
                ApiError::invalid("'stop' must be a string or a list of strings", Some("stop"))
            })?,
        Some(_) => {
            return Err(ApiError::invalid(
                format!("'stop' must be a string or a list of at most {MAX_STOP_STRINGS} strings"),
                Some("stop"),
            ))
        }
    };
    let include_usage = match given(body, "stream_options") {
        None => false,
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(ApiError::invalid(
                    "'stream_options.include_usage' must be true or false",
                    Some("stream_options"),
                ))
            }
        },
        Some(_) => {
            return Err(ApiError::invalid(
                "'stream_options' must be an object",
                Some("stream_options"),
            ))
        }
    };
    let sampling = SamplingParams {
        temperature: temperature.unwrap_or(defaults.temperature),
        // top_k 0, top_p 1 and min_p 0 given explicitly mean no limit.
        top_k: match top_k {
            Some(k) => (k > 0).then_some(k as usize),
            None => defaults.top_k,
        },
        top_p: match top_p {
            Some(p) => (p < 1.0).then_some(p),
            None => defaults.top_p,
        },
        min_p: match min_p {
            Some(p) => (p > 0.0).then_some(p),
            None => defaults.min_p,
        },
        repetition_penalty: repetition_penalty.unwrap_or(defaults.repetition_penalty),
        seed: seed.unwrap_or(default_seed),
    };
    sampling
        .validate()
        .map_err(|e| ApiError::invalid(e.to_string(), None))?;
    Ok(Params {
        max_tokens: max_tokens.map(|n| n as usize),
        sampling,
        stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
        stream: boolean(body, "stream")?,
        include_usage,
        echo: boolean(body, "echo")?,
    })
}

/// A completion's prompt: text (tokenized with BOS, as `flashpack run` does)
/// or token ids.
#[derive(Debug, Clone)]
pub enum PromptInput {
    Text(String),
    Ids(Vec<u32>),
}

/// `prompt`: a string, a list of one string, a list of token ids, or a list
/// of one such list.
pub fn parse_prompt(body: &Map<String, Value>) -> Result<PromptInput, ApiError> {
    let bad = || {
        ApiError::invalid(
            "'prompt' must be a string or a list of token ids (one prompt per request)",
            Some("prompt"),
        )
    };
    let ids = |items: &[Value]| -> Result<Vec<u32>, ApiError> {
        items
            .iter()
            .map(|v| {
                v.as_u64()
                    .filter(|&i| i <= u32::MAX as u64)
                    .map(|i| i as u32)
            })
            .collect::<Option<Vec<u32>>>()
            .ok_or_else(bad)
    };
    match body.get("prompt") {
        None | Some(Value::Null) => Err(ApiError::invalid("'prompt' is required", Some("prompt"))),
        Some(Value::String(s)) => Ok(PromptInput::Text(s.clone())),
        Some(Value::Array(items)) => match items.as_slice() {
            [Value::String(s)] => Ok(PromptInput::Text(s.clone())),
            [Value::Array(inner)] => Ok(PromptInput::Ids(ids(inner)?)),
            [] => Err(bad()),
            items if items.iter().all(Value::is_number) => Ok(PromptInput::Ids(ids(items)?)),
            _ => Err(bad()),
        },
        Some(_) => Err(bad()),
    }
}

/// `messages`: a non-empty list of `{role, content}`; content is a string,
/// null, or a list of text parts. The `developer` role is the system's.
pub fn parse_messages(body: &Map<String, Value>) -> Result<Vec<Message>, ApiError> {
    let bad = |what: String| ApiError::invalid(what, Some("messages"));
    let items = match body.get("messages") {
        None | Some(Value::Null) => return Err(bad("'messages' is required".into())),
        Some(Value::Array(items)) if !items.is_empty() => items,
        Some(_) => return Err(bad("'messages' must be a non-empty list".into())),
    };
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("messages[{i}] needs a string 'role'")))?;
            let content = match m.get("content") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for part in parts {
                        match (
                            part.get("type").and_then(Value::as_str),
                            part.get("text").and_then(Value::as_str),
                        ) {
                            (Some("text"), Some(t)) => text.push_str(t),
                            _ => {
                                return Err(bad(format!(
                                    "messages[{i}].content: only text parts are supported"
                                )))
                            }
                        }
                    }
                    text
                }
                Some(_) => {
                    return Err(bad(format!(
                        "messages[{i}].content must be a string or a list of text parts"
                    )))
                }
            };
            let role = if role == "developer" { "system" } else { role };
            Ok(Message::new(role, content))
        })
        .collect()
}

/// OpenAI's `finish_reason`.
pub fn finish_reason(reason: StopReason) -> &'static str {
    match reason {
        StopReason::Eos | StopReason::StopString => "stop",
        StopReason::MaxNewTokens | StopReason::Context => "length",
    }
}

pub fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn parse_params(b: &Map<String, Value>, model: &str, seed: u64) -> Result<Params, ApiError> {
        super::parse_params(
            b,
            model,
            seed,
            &server_defaults(SamplingDefaults::default()),
        )
    }

    #[test]
    fn left_out_fields_follow_generation_config_when_it_samples() {
        let sampling = SamplingDefaults::from_generation_config(Some(
            &json!({"do_sample": true, "temperature": 0.6, "top_p": 0.9}),
        ));
        let d = server_defaults(sampling);
        let p = super::parse_params(&body(json!({})), "m", 1, &d).unwrap();
        assert_eq!((p.sampling.temperature, p.sampling.top_p), (0.6, Some(0.9)));
        let p =
            super::parse_params(&body(json!({"temperature": 0, "top_p": 1})), "m", 1, &d).unwrap();
        assert_eq!((p.sampling.temperature, p.sampling.top_p), (0.0, None));
        // A config that does not sample leaves OpenAI's temperature 1.
        let d = server_defaults(SamplingDefaults::from_generation_config(Some(&json!({}))));
        let p = super::parse_params(&body(json!({})), "m", 1, &d).unwrap();
        assert_eq!((p.sampling.temperature, p.sampling.top_k), (1.0, None));
    }

    #[test]
    fn params_are_checked_and_named() {
        let p = parse_params(
            &body(
                json!({"model": "m", "max_tokens": 5, "temperature": 0, "stop": "\n", "seed": 3}),
            ),
            "m",
            9,
        )
        .unwrap();
        assert_eq!(p.max_tokens, Some(5));
        assert_eq!(p.sampling.temperature, 0.0);
        assert_eq!(p.sampling.seed, 3);
        assert_eq!(p.stop, vec!["\n".to_string()]);
        let p = parse_params(&body(json!({})), "m", 9).unwrap();
        assert_eq!(
            (p.sampling.temperature, p.sampling.seed, p.max_tokens),
            (1.0, 9, None)
        );
        for (bad, param) in [
            (json!({"temperature": -1}), "temperature"),
            (json!({"temperature": "hot"}), "temperature"),
            (json!({"top_p": 0}), "top_p"),
            (json!({"max_tokens": -3}), "max_tokens"),
            (json!({"max_tokens": 1.5}), "max_tokens"),
            (json!({"stop": [1]}), "stop"),
            (json!({"seed": -1}), "seed"),
        ] {
            let e = parse_params(&body(bad.clone()), "m", 0).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad}");
            assert_eq!(e.param, Some(param), "{bad}");
        }
        let e = parse_params(&body(json!({"model": "gpt-4"})), "m", 0).unwrap_err();
        assert_eq!(
            (e.status, e.code),
            (StatusCode::NOT_FOUND, Some("model_not_found"))
        );
        let e = parse_params(&body(json!({"n": 2})), "m", 0).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn prompts_and_messages() {
        assert!(
            matches!(parse_prompt(&body(json!({"prompt": ["a"]}))), Ok(PromptInput::Text(s)) if s == "a")
        );
        assert!(
            matches!(parse_prompt(&body(json!({"prompt": [1, 2]}))), Ok(PromptInput::Ids(v)) if v == [1, 2])
        );
        assert!(parse_prompt(&body(json!({"prompt": ["a", "b"]}))).is_err());
        assert!(parse_prompt(&body(json!({}))).is_err());
        let m = parse_messages(&body(json!({"messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
        ]})))
        .unwrap();
        assert_eq!(
            m,
            vec![
                Message::new("system", "be brief"),
                Message::new("user", "ab")
            ]
        );
        assert!(parse_messages(&body(json!({"messages": []}))).is_err());
        assert!(parse_messages(&body(json!({"messages": [{"content": "x"}]}))).is_err());
    }
}
