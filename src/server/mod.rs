//! `flashpack serve`: an OpenAI-compatible HTTP server for one model.
//!
//! Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (both with
//! server-sent events under `"stream": true`: `data: {...}` chunks, then
//! `data: [DONE]`), `GET /v1/models`, `GET /health`.
//!
//! The model lives on one worker thread (opened there, so it never crosses
//! threads); requests wait in a bounded queue and run one at a time, on that
//! thread and its rayon pool, never on the async runtime, which only parses
//! requests and writes answers. Every bad request gets a 4xx answer with
//! OpenAI's error object; a request that panics the worker gets a 500 and the
//! worker goes on with the next one. A client that goes away mid-stream stops
//! its generation.

pub mod api;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::input::TextTokenizer;
use crate::runtime::chat::{ChatEncoder, Message};
use crate::runtime::generate::{generate_text, GenerateOptions, StopReason};
use crate::runtime::sampling::SamplingDefaults;
use crate::runtime::Model;
use api::{ApiError, Params, PromptInput};

/// A model ready to serve, built on the worker thread.
pub struct Backend {
    pub model: Model,
    pub tokenizer: TextTokenizer,
    /// The chat template, or why there is none (chat requests then get 400).
    pub chat: std::result::Result<ChatEncoder, String>,
    /// Generation stops at these (EOS ids, the template's end-of-turn token).
    pub stop_ids: Vec<u32>,
    /// Positions one request may use, prompt and generated.
    pub context: usize,
    /// Worker threads for the model's compute (`None`: one per core).
    pub threads: Option<usize>,
    /// Whatever must live as long as the model (the flash runtime).
    pub keep_alive: Vec<Box<dyn std::any::Any>>,
}

/// How to serve.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub host: String,
    /// 0 picks a free port.
    pub port: u16,
    /// The name `/v1/models` lists and requests may give as `model`.
    pub model_name: String,
    /// Larger request bodies get 413.
    pub max_body_bytes: usize,
    /// Requests waiting beyond the one running; more get 503.
    pub queue: usize,
    /// Sampling for the fields a request leaves out ([`api::server_defaults`]).
    pub sampling_defaults: SamplingDefaults,
}

/// The parts of a [`Backend`] that requests use (shared with the rayon pool).
struct Serving {
    model: Model,
    tokenizer: TextTokenizer,
    chat: std::result::Result<ChatEncoder, String>,
    stop_ids: Vec<u32>,
    context: usize,
}

/// What a request asks the worker for.
enum Prompt {
    Completion(PromptInput),
    Chat(Vec<Message>),
}

struct Job {
    prompt: Prompt,
    params: Params,
    events: mpsc::UnboundedSender<Event>,
}

/// What the worker tells the request's handler.
#[derive(Debug)]
enum Event {
    /// The prompt was accepted: generation begins.
    Started,
    /// Final text (never part of a stop string).
    Text(String),
    Finished {
        text: String,
        prompt_tokens: usize,
        completion_tokens: usize,
        stop_reason: StopReason,
    },
    Failed(ApiError),
}

/// The requests admitted (running or waiting) and the way to the worker. A
/// count decides admission, not the channel's capacity: a rendezvous channel
/// would refuse a request that arrives while the idle worker is between two
/// jobs, and `--queue 0` must still admit one request whenever none runs.
struct JobQueue {
    sender: std::sync::mpsc::Sender<Job>,
    admitted: Arc<AtomicUsize>,
    /// The one running plus `--queue` waiting.
    limit: usize,
}

enum Refused {
    Full,
    WorkerGone,
}

impl JobQueue {
    fn submit(&self, job: Job) -> Result<(), Refused> {
        self.admitted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.limit).then_some(n + 1)
            })
            .map_err(|_| Refused::Full)?;
        self.sender.send(job).map_err(|_| {
            self.admitted.fetch_sub(1, Ordering::AcqRel);
            Refused::WorkerGone
        })
    }
}

struct AppState {
    jobs: JobQueue,
    model_name: String,
    created: u64,
    next_id: AtomicU64,
    sampling_defaults: SamplingDefaults,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Opens the model on its worker thread (`open` runs there) and answers
/// requests until the process ends. `on_listening` is called with the bound
/// address once the model is loaded and the socket listens.
pub fn serve(
    options: ServeOptions,
    open: impl FnOnce() -> anyhow::Result<Backend> + Send + 'static,
    on_listening: impl FnOnce(SocketAddr) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let jobs = start_worker(open, options.queue)?;
    let listener =
        std::net::TcpListener::bind((options.host.as_str(), options.port)).map_err(|e| {
            anyhow::Error::new(e).context(format!("listening on {}:{}", options.host, options.port))
        })?;
    listener.set_nonblocking(true)?;
    let address = listener.local_addr()?;
    let state = Arc::new(AppState {
        jobs,
        model_name: options.model_name.clone(),
        created: unix_now(),
        next_id: AtomicU64::new(1),
        sampling_defaults: options.sampling_defaults,
    });
    let app = router(state, options.max_body_bytes);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        on_listening(address)?;
        axum::serve(listener, app).await?;
        Ok(())
    })
}

fn router(state: Arc<AppState>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model_by_id))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

/// Starts the worker thread, waits until the model is open, and returns the
/// queue's sending end.
fn start_worker(
    open: impl FnOnce() -> anyhow::Result<Backend> + Send + 'static,
    queue: usize,
) -> anyhow::Result<JobQueue> {
    let (job_tx, job_rx) = std::sync::mpsc::channel::<Job>();
    let admitted = Arc::new(AtomicUsize::new(0));
    let done = admitted.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
    std::thread::Builder::new()
        .name("flashpack-model".into())
        .spawn(move || {
            let backend = match open() {
                Ok(b) => b,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let pool = {
                let mut builder = rayon::ThreadPoolBuilder::new();
                if let Some(n) = backend.threads {
                    builder = builder.num_threads(n);
                }
                match builder.build() {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow::anyhow!("thread pool: {e}")));
                        return;
                    }
                }
            };
            let Backend {
                model,
                tokenizer,
                chat,
                stop_ids,
                context,
                threads: _,
                keep_alive: _keep_alive,
            } = backend;
            let serving = Serving {
                model,
                tokenizer,
                chat,
                stop_ids,
                context,
            };
            let _ = ready_tx.send(Ok(()));
            while let Ok(job) = job_rx.recv() {
                let events = job.events.clone();
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    pool.install(|| run_job(&serving, job))
                }));
                if ran.is_err() {
                    let _ = events.send(Event::Failed(ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "server_error",
                        "internal error while generating (a bug: the server goes on)",
                    )));
                }
                done.fetch_sub(1, Ordering::AcqRel);
            }
        })?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(JobQueue {
            sender: job_tx,
            admitted,
            limit: queue.saturating_add(1),
        }),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(anyhow::anyhow!(
            "the model thread ended while opening the model"
        )),
    }
}

/// One request on the worker: encode, check, generate, stream.
fn run_job(backend: &Serving, job: Job) {
    let Job {
        prompt,
        params,
        events,
    } = job;
    let started = Instant::now();
    let send = |e: Event| events.send(e).is_ok();
    let (kind, ids) = match encode(backend, prompt) {
        Ok(v) => v,
        Err(e) => {
            send(Event::Failed(e));
            return;
        }
    };
    let max = backend.context;
    if ids.len() > max {
        send(Event::Failed(
            ApiError::invalid(
                format!(
                    "the prompt is {} tokens; this server's context holds {max}",
                    ids.len()
                ),
                Some(if kind == "chat" { "messages" } else { "prompt" }),
            )
            .with_code("context_length_exceeded"),
        ));
        return;
    }
    if ids.is_empty() {
        send(Event::Failed(ApiError::invalid(
            "the prompt encodes to no tokens",
            Some("prompt"),
        )));
        return;
    }
    if !send(Event::Started) {
        return;
    }
    let opts = GenerateOptions {
        max_new_tokens: params.max_tokens.unwrap_or(max),
        sampling: params.sampling,
        stop_ids: backend.stop_ids.clone(),
        stop_strings: params.stop.clone(),
        context: max,
        ..Default::default()
    };
    let result = generate_text(&backend.model, &backend.tokenizer, &ids, &opts, |piece| {
        if events.send(Event::Text(piece.to_string())).is_ok() {
            Ok(())
        } else {
            // The client went away: stop generating for it.
            Err(crate::Error::InvalidArgument("client disconnected".into()))
        }
    });
    match result {
        Ok(g) => {
            let n = g.generation.generated_ids.len();
            eprintln!(
                "{kind}: {} prompt tokens, {n} generated ({}), {:.0} ms",
                ids.len(),
                g.generation.stop_reason.describe(),
                started.elapsed().as_secs_f64() * 1000.0
            );
            send(Event::Finished {
                text: g.text,
                prompt_tokens: ids.len(),
                completion_tokens: n,
                stop_reason: g.generation.stop_reason,
            });
        }
        Err(_) if events.is_closed() => {
            eprintln!("{kind}: client disconnected; generation stopped")
        }
        Err(e) => {
            eprintln!("{kind}: error: {e}");
            let status = match e.exit_class() {
                crate::ExitClass::InvalidInput => StatusCode::BAD_REQUEST,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            let kind = if status == StatusCode::BAD_REQUEST {
                "invalid_request_error"
            } else {
                "server_error"
            };
            send(Event::Failed(ApiError::new(status, kind, e.to_string())));
        }
    }
}

fn encode(backend: &Serving, prompt: Prompt) -> Result<(&'static str, Vec<u32>), ApiError> {
    let invalid = |e: crate::Error, param| ApiError::invalid(e.to_string(), Some(param));
    match prompt {
        Prompt::Completion(PromptInput::Text(text)) => backend
            .tokenizer
            .encode(&text)
            .map(|ids| ("completion", ids))
            .map_err(|e| invalid(e, "prompt")),
        Prompt::Completion(PromptInput::Ids(ids)) => {
            let vocab = backend.model.config.vocab_size;
            match ids.iter().find(|&&i| i as usize >= vocab) {
                Some(bad) => Err(ApiError::invalid(
                    format!("token id {bad} is outside the vocabulary ({vocab} tokens)"),
                    Some("prompt"),
                )),
                None => Ok(("completion", ids)),
            }
        }
        Prompt::Chat(messages) => match &backend.chat {
            Ok(encoder) => encoder
                .encode(&messages, true)
                .map(|ids| ("chat", ids))
                .map_err(|e| invalid(e, "messages")),
            Err(why) => Err(ApiError::invalid(why.clone(), Some("messages"))),
        },
    }
}

// ---- handlers ----

async fn health() -> Response {
    api::json_response(StatusCode::OK, &json!({"status": "ok"}))
}

fn model_object(state: &AppState) -> Value {
    json!({
        "id": state.model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "flashpack",
    })
}

async fn models(State(state): State<Arc<AppState>>) -> Response {
    api::json_response(
        StatusCode::OK,
        &json!({"object": "list", "data": [model_object(&state)]}),
    )
}

async fn model_by_id(
    State(state): State<Arc<AppState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    if id == state.model_name {
        api::json_response(StatusCode::OK, &model_object(&state))
    } else {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!(
                "The model '{id}' does not exist; this server serves '{}'",
                state.model_name
            ),
        )
        .with_code("model_not_found")
        .into_response()
    }
}

async fn not_found(uri: axum::http::Uri) -> Response {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!(
            "no such endpoint: {} (this server has /v1/completions, /v1/chat/completions, /v1/models, /health)",
            uri.path()
        ),
    )
    .into_response()
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        format!("{method} is not allowed on {}", uri.path()),
    )
    .into_response()
}

/// The body, or the error answer for one that could not be read (413 when
/// larger than the limit).
fn body_bytes(
    body: std::result::Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        let status = rejection.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "the request body is larger than this server accepts (--max-body-bytes)".to_string()
        } else {
            rejection.body_text()
        };
        ApiError::new(status, "invalid_request_error", message)
    })
}

async fn completions(
    State(state): State<Arc<AppState>>,
    body: std::result::Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let parsed = body_bytes(body).and_then(|bytes| {
        let body = api::parse_body(&bytes)?;
        let params = api::parse_params(
            &body,
            &state.model_name,
            clock_seed(),
            &state.sampling_defaults,
        )?;
        let prompt = api::parse_prompt(&body)?;
        Ok((params, prompt))
    });
    match parsed {
        Ok((mut params, prompt)) => {
            // OpenAI's (legacy) completions stop at 16 tokens when max_tokens is
            // left out, and clients written for it expect that; chat has no cap.
            params
                .max_tokens
                .get_or_insert(api::COMPLETIONS_DEFAULT_MAX_TOKENS);
            let echo = match (&prompt, params.echo) {
                (PromptInput::Text(t), true) => Some(t.clone()),
                _ => None,
            };
            respond(
                state,
                Prompt::Completion(prompt),
                params,
                Kind::Completion { echo },
            )
            .await
        }
        Err(e) => e.into_response(),
    }
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: std::result::Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let parsed = body_bytes(body).and_then(|bytes| {
        let body = api::parse_body(&bytes)?;
        let params = api::parse_params(
            &body,
            &state.model_name,
            clock_seed(),
            &state.sampling_defaults,
        )?;
        let messages = api::parse_messages(&body)?;
        Ok((params, messages))
    });
    match parsed {
        Ok((params, messages)) => respond(state, Prompt::Chat(messages), params, Kind::Chat).await,
        Err(e) => e.into_response(),
    }
}

// Requests that give no seed get one from the clock, below 2^53 like run's.
use crate::runtime::sampling::clock_seed;

#[derive(Debug, Clone)]
enum Kind {
    Completion { echo: Option<String> },
    Chat,
}

impl Kind {
    fn id_prefix(&self) -> &'static str {
        match self {
            Kind::Completion { .. } => "cmpl",
            Kind::Chat => "chatcmpl",
        }
    }
}

/// The fields every answer and chunk of one request shares.
struct Reply {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
}

impl Reply {
    /// A whole (non-streamed) answer.
    fn complete(
        &self,
        text: String,
        stop: StopReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    ) -> Value {
        let reason = api::finish_reason(stop);
        let (object, choice) = match &self.kind {
            Kind::Completion { echo } => (
                "text_completion",
                json!({
                    "index": 0,
                    "text": format!("{}{text}", echo.as_deref().unwrap_or("")),
                    "logprobs": null,
                    "finish_reason": reason,
                }),
            ),
            Kind::Chat => (
                "chat.completion",
                json!({
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": null,
                    "finish_reason": reason,
                }),
            ),
        };
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": api::usage(prompt_tokens, completion_tokens),
        })
    }

    /// One streamed chunk: a text piece, or (with `finish`) the last one.
    fn chunk(&self, text: Option<&str>, role: bool, finish: Option<StopReason>) -> Value {
        let reason = finish.map(api::finish_reason);
        let (object, choice) = match &self.kind {
            Kind::Completion { .. } => (
                "text_completion",
                json!({
                    "index": 0,
                    "text": text.unwrap_or(""),
                    "logprobs": null,
                    "finish_reason": reason,
                }),
            ),
            Kind::Chat => {
                let mut delta = serde_json::Map::new();
                if role {
                    delta.insert("role".into(), "assistant".into());
                }
                if let Some(t) = text {
                    delta.insert("content".into(), t.into());
                }
                (
                    "chat.completion.chunk",
                    json!({
                        "index": 0,
                        "delta": delta,
                        "logprobs": null,
                        "finish_reason": reason,
                    }),
                )
            }
        };
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        })
    }

    /// The chunk that carries only the usage (`stream_options.include_usage`).
    fn usage_chunk(&self, prompt_tokens: usize, completion_tokens: usize) -> Value {
        let object = match self.kind {
            Kind::Completion { .. } => "text_completion",
            Kind::Chat => "chat.completion.chunk",
        };
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": api::usage(prompt_tokens, completion_tokens),
        })
    }
}

/// Queues the request and answers it, whole or streamed.
async fn respond(state: Arc<AppState>, prompt: Prompt, params: Params, kind: Kind) -> Response {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let stream = params.stream;
    let include_usage = params.include_usage;
    let job = Job {
        prompt,
        params,
        events: tx,
    };
    if let Err(e) = state.jobs.submit(job) {
        return match e {
            Refused::Full => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "the server is busy (its request queue is full); retry later",
            ),
            Refused::WorkerGone => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "the model thread has stopped",
            ),
        }
        .into_response();
    }
    let reply = Reply {
        id: format!(
            "{}-{}",
            kind.id_prefix(),
            state.next_id.fetch_add(1, Ordering::Relaxed)
        ),
        kind,
        created: unix_now(),
        model: state.model_name.clone(),
    };
    // Wait for the worker to accept the prompt: its errors are still 4xx.
    match rx.recv().await {
        Some(Event::Started) => {}
        Some(Event::Failed(e)) => return e.into_response(),
        _ => {
            return ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "the model thread stopped before answering",
            )
            .into_response()
        }
    }
    if !stream {
        loop {
            match rx.recv().await {
                Some(Event::Text(_)) | Some(Event::Started) => {}
                Some(Event::Finished {
                    text,
                    prompt_tokens,
                    completion_tokens,
                    stop_reason,
                }) => {
                    return api::json_response(
                        StatusCode::OK,
                        &reply.complete(text, stop_reason, prompt_tokens, completion_tokens),
                    )
                }
                Some(Event::Failed(e)) => return e.into_response(),
                None => {
                    return ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "server_error",
                        "the model thread stopped while generating",
                    )
                    .into_response()
                }
            }
        }
    }
    // Streamed: the first chunk says who speaks (chat) or echoes the prompt.
    let first = match &reply.kind {
        Kind::Chat => Some(reply.chunk(Some(""), true, None)),
        Kind::Completion { echo: Some(e) } => Some(reply.chunk(Some(e), false, None)),
        Kind::Completion { echo: None } => None,
    };
    let pending: std::collections::VecDeque<String> =
        first.into_iter().map(|v| v.to_string()).collect();
    let stream = futures_util::stream::unfold(
        (rx, reply, pending, false),
        move |(mut rx, reply, mut pending, mut done)| async move {
            loop {
                if let Some(data) = pending.pop_front() {
                    let event = SseEvent::default().data(data);
                    return Some((
                        Ok::<_, std::convert::Infallible>(event),
                        (rx, reply, pending, done),
                    ));
                }
                if done {
                    return None;
                }
                match rx.recv().await {
                    Some(Event::Text(t)) => {
                        pending.push_back(reply.chunk(Some(&t), false, None).to_string())
                    }
                    Some(Event::Started) => {}
                    Some(Event::Finished {
                        prompt_tokens,
                        completion_tokens,
                        stop_reason,
                        ..
                    }) => {
                        let last = match reply.kind {
                            Kind::Chat => reply.chunk(None, false, Some(stop_reason)),
                            Kind::Completion { .. } => {
                                reply.chunk(Some(""), false, Some(stop_reason))
                            }
                        };
                        pending.push_back(last.to_string());
                        if include_usage {
                            pending.push_back(
                                reply
                                    .usage_chunk(prompt_tokens, completion_tokens)
                                    .to_string(),
                            );
                        }
                        pending.push_back("[DONE]".to_string());
                        done = true;
                    }
                    Some(Event::Failed(e)) => {
                        pending.push_back(e.body().to_string());
                        done = true;
                    }
                    None => {
                        pending.push_back(
                            ApiError::new(
                                StatusCode::INTERNAL_SERVER_ERROR,
                                "server_error",
                                "the model thread stopped while generating",
                            )
                            .body()
                            .to_string(),
                        );
                        done = true;
                    }
                }
            }
        },
    );
    Sse::new(stream).into_response()
}
