//! `flashpack serve` answered over real HTTP on 127.0.0.1: the binary is
//! started with `--port 0`, its printed address read, and requests sent with
//! a plain HTTP client. Completions equal `flashpack run`'s greedy output, a
//! chat completion equals `flashpack chat`'s answer and, streamed chunk by
//! chunk, the non-streamed one; its prompt is the ids transformers gives for
//! the conversation; bad requests get 4xx with OpenAI's error object, and the
//! server answers after them.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_flashpack");

fn model() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/chat/llama-silu-chat")
        .display()
        .to_string()
}

/// A running server, killed when dropped.
struct Server {
    child: Child,
    url: String,
    agent: ureq::Agent,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        Server::start_model(&model(), extra, &[])
    }

    fn start_model(model: &str, extra: &[&str], env: &[(&str, &Path)]) -> Server {
        let mut child = Command::new(BIN)
            .args(["serve", model, "--port", "0", "--threads", "2"])
            .args(extra)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
            .to_string();
        assert!(url.starts_with("http://127.0.0.1:"), "{url}");
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        Server { child, url, agent }
    }

    /// POSTs `body` (sent as given) and returns the status and the parsed body.
    fn post_raw(&self, path: &str, body: &str) -> (u16, Value) {
        let mut resp = self
            .agent
            .post(&format!("{}{path}", self.url))
            .header("Content-Type", "application/json")
            .send(body)
            .unwrap();
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap();
        let value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {text:?}"));
        (status, value)
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_raw(path, &body.to_string())
    }

    fn get(&self, path: &str) -> (u16, Value) {
        let mut resp = self
            .agent
            .get(&format!("{}{path}", self.url))
            .call()
            .unwrap();
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap();
        (status, serde_json::from_str(&text).unwrap())
    }

    /// POSTs a streamed request and returns the `data:` payloads in order.
    fn stream(&self, path: &str, body: &Value) -> Vec<String> {
        let mut resp = self
            .agent
            .post(&format!("{}{path}", self.url))
            .header("Content-Type", "application/json")
            .send(body.to_string())
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        let content_type = resp.headers()["content-type"].to_str().unwrap().to_string();
        assert!(
            content_type.starts_with("text/event-stream"),
            "{content_type}"
        );
        let reader = BufReader::new(resp.body_mut().as_reader());
        reader
            .lines()
            .map(Result::unwrap)
            .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
            .collect()
    }
}

fn error_of(v: &Value) -> (&str, &str) {
    let e = &v["error"];
    (
        e["type"]
            .as_str()
            .unwrap_or_else(|| panic!("no error type: {v}")),
        e["message"].as_str().unwrap(),
    )
}

/// `flashpack run --json` on the same model: greedy text and token counts.
fn run_greedy(prompt: &str, n: usize) -> Value {
    let out = Command::new(BIN)
        .args(["run", &model(), "--prompt", prompt, "--max-new-tokens"])
        .arg(n.to_string())
        .args(["--json", "--threads", "2"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn completions_equal_run_greedy_output() {
    let server = Server::start(&[]);
    for (prompt, n) in [("ROMEO.", 24), ("KING HENRY.\nWhat", 7)] {
        let run = run_greedy(prompt, n);
        let (status, v) = server.post(
            "/v1/completions",
            &json!({"model": "llama-silu-chat", "prompt": prompt, "max_tokens": n, "temperature": 0}),
        );
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["object"], "text_completion");
        let choice = &v["choices"][0];
        assert_eq!(choice["text"], run["text"], "prompt {prompt:?}");
        assert!(!run["text"].as_str().unwrap().is_empty());
        assert_eq!(v["usage"]["prompt_tokens"], run["prompt_tokens"]);
        assert_eq!(v["usage"]["completion_tokens"], run["generated_tokens"]);
        assert_eq!(
            v["usage"]["total_tokens"].as_u64().unwrap(),
            run["prompt_tokens"].as_u64().unwrap() + run["generated_tokens"].as_u64().unwrap()
        );
        let expected_reason = if run["stop_reason"] == "eos" {
            "stop"
        } else {
            "length"
        };
        assert_eq!(choice["finish_reason"], expected_reason);
    }

    // A stop string cuts the same text before it; streamed pieces add up to it.
    let full = run_greedy("ROMEO.", 24)["text"]
        .as_str()
        .unwrap()
        .to_string();
    let stop: String = full.chars().skip(6).take(3).collect();
    let expected = &full[..full.find(&stop).unwrap()];
    let body = json!({"prompt": "ROMEO.", "max_tokens": 24, "temperature": 0, "stop": [stop]});
    let (status, v) = server.post("/v1/completions", &body);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["text"], expected);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let data = server.stream("/v1/completions", &streamed);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, expected);
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );

    // A seed reproduces a sampled completion.
    let sampled = json!({"prompt": "ROMEO.", "max_tokens": 12, "temperature": 1.0, "seed": 7});
    let a = server.post("/v1/completions", &sampled).1;
    let b = server.post("/v1/completions", &sampled).1;
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
}

#[test]
fn a_streamed_chat_completion_equals_the_whole_one_and_the_chat_command() {
    let server = Server::start(&[]);
    // The "user" conversation of fixtures/chat/reference.json, whose ids
    // transformers computed with this model's template.
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/chat/reference.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let case = reference["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| {
            c["tokenizer"] == "llama-silu-chat"
                && c["conversation"] == "user"
                && c["add_generation_prompt"] == true
        })
        .unwrap();
    let user = case["messages"][0]["content"].as_str().unwrap();
    let body = json!({
        "model": "llama-silu-chat",
        "messages": case["messages"],
        "max_tokens": 20,
        "temperature": 0,
    });
    let (status, whole) = server.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["object"], "chat.completion");
    let message = &whole["choices"][0]["message"];
    assert_eq!(message["role"], "assistant");
    let content = message["content"].as_str().unwrap();
    assert!(!content.is_empty());
    assert_eq!(
        whole["usage"]["prompt_tokens"].as_u64().unwrap() as usize,
        case["ids"].as_array().unwrap().len()
    );

    // Streamed, chunk by chunk.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let data = server.stream("/v1/chat/completions", &streamed);
    assert_eq!(data.last().unwrap(), "[DONE]", "{data:?}");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(chunks.len() >= 4, "{chunks:?}");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let mut text = String::new();
    let mut finish = None;
    for chunk in &chunks[..chunks.len() - 1] {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["id"], chunks[0]["id"]);
        assert!(finish.is_none(), "a chunk after the finishing one: {chunk}");
        let choice = &chunk["choices"][0];
        if let Some(piece) = choice["delta"]["content"].as_str() {
            text.push_str(piece);
        }
        if !choice["finish_reason"].is_null() {
            finish = Some(choice["finish_reason"].clone());
        }
    }
    assert_eq!(text, content);
    assert_eq!(finish.as_ref(), Some(&whole["choices"][0]["finish_reason"]));
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"], whole["usage"]);

    // `flashpack chat` gives the same answer to the same turn; a second turn
    // is rendered with the history (a longer prompt).
    let mut chat = Command::new(BIN)
        .args(["chat", &model(), "-n", "20", "--json", "--threads", "2"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    chat.stdin
        .take()
        .unwrap()
        .write_all(format!("{user}\nGo on.\n/exit\nnot read\n").as_bytes())
        .unwrap();
    let out = chat.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let turns = report["turns"].as_array().unwrap();
    assert_eq!(turns.len(), 2, "{report}");
    assert_eq!(turns[0]["assistant"], content);
    assert_eq!(turns[0]["prompt_tokens"], whole["usage"]["prompt_tokens"]);
    assert!(
        turns[1]["prompt_tokens"].as_u64().unwrap()
            > turns[0]["prompt_tokens"].as_u64().unwrap()
                + turns[0]["generated_tokens"].as_u64().unwrap() / 2
    );
    // The second turn reused the first prompt's keys and values, and answers
    // as the server does from the whole conversation computed afresh.
    assert_eq!(turns[0]["reused_tokens"], 0);
    assert!(
        turns[1]["reused_tokens"].as_u64().unwrap() >= turns[0]["prompt_tokens"].as_u64().unwrap()
    );
    let history = json!([
        {"role": "user", "content": user},
        {"role": "assistant", "content": turns[0]["assistant"]},
        {"role": "user", "content": "Go on."},
    ]);
    let (status, again) = server.post(
        "/v1/chat/completions",
        &json!({"messages": history, "max_tokens": 20, "temperature": 0}),
    );
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["usage"]["prompt_tokens"], turns[1]["prompt_tokens"]);
    assert_eq!(
        again["choices"][0]["message"]["content"],
        turns[1]["assistant"]
    );
}

#[test]
fn bad_requests_get_4xx_json_errors_and_the_server_goes_on() {
    let server = Server::start(&["--max-body-bytes", "4096", "--ctx", "64"]);
    let (status, v) = server.get("/health");
    assert_eq!((status, &v["status"]), (200, &json!("ok")));
    let (status, v) = server.get("/v1/models");
    assert_eq!(status, 200);
    assert_eq!(v["data"][0]["id"], "llama-silu-chat");

    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("/v1/completions", "{not json".into(), 400, "not valid JSON"),
        ("/v1/completions", "[1, 2]".into(), 400, "JSON object"),
        (
            "/v1/completions",
            json!({"max_tokens": 3}).to_string(),
            400,
            "'prompt' is required",
        ),
        (
            "/v1/completions",
            json!({"model": "gpt-4o", "prompt": "x"}).to_string(),
            404,
            "does not exist",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "temperature": -1}).to_string(),
            400,
            "'temperature'",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "max_tokens": "many"}).to_string(),
            400,
            "'max_tokens'",
        ),
        (
            "/v1/completions",
            json!({"prompt": [999_999]}).to_string(),
            400,
            "outside the vocabulary",
        ),
        (
            "/v1/completions",
            json!({"prompt": "ROMEO. ".repeat(100)}).to_string(),
            400,
            "context holds 64",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": []}).to_string(),
            400,
            "'messages'",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "assistant", "content": "first"}]}).to_string(),
            400,
            "roles must alternate",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "n": 3}).to_string(),
            400,
            "'n' must be 1",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x".repeat(5000)}).to_string(),
            413,
            "larger than",
        ),
        ("/v1/nothing", "{}".into(), 404, "no such endpoint"),
    ];
    for (path, body, want, says) in &cases {
        let (status, v) = server.post_raw(path, body);
        assert_eq!(status, *want, "{path} {body:.80}: {v}");
        let (kind, message) = error_of(&v);
        assert_eq!(kind, "invalid_request_error", "{v}");
        assert!(message.contains(says), "{path} {body:.80}: {message}");
    }
    let (status, v) = server.get("/v1/completions");
    assert_eq!(status, 405);
    error_of(&v);

    // Still serving.
    let (status, v) = server.get("/health");
    assert_eq!((status, &v["status"]), (200, &json!("ok")));
    let (status, v) = server.post(
        "/v1/completions",
        &json!({"prompt": "ROMEO.", "max_tokens": 4, "temperature": 0}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 4);
}

#[test]
fn concurrent_requests_queue_and_each_gets_its_own_answer() {
    let server = Server::start(&["--model-name", "tiny"]);
    let (status, v) = server.get("/v1/models/tiny");
    assert_eq!((status, &v["id"]), (200, &json!("tiny")));
    let (status, v) = server.get("/v1/models/other");
    assert_eq!(status, 404);
    error_of(&v);
    let prompts = ["ROMEO.", "JULIET.", "KING HENRY.", "First Citizen:"];
    let body = |p: &str| json!({"model": "tiny", "prompt": p, "max_tokens": 16, "temperature": 0});
    let one_by_one: Vec<Value> = prompts
        .iter()
        .map(|p| server.post("/v1/completions", &body(p)).1["choices"][0]["text"].clone())
        .collect();
    // All at once: they wait their turn and none gets another's text.
    let together: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| {
                let server = &server;
                s.spawn(move || server.post("/v1/completions", &body(p)))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                let (status, v) = h.join().unwrap();
                assert_eq!(status, 200, "{v}");
                v["choices"][0]["text"].clone()
            })
            .collect()
    });
    assert_eq!(together, one_by_one);
    assert!(one_by_one.windows(2).any(|w| w[0] != w[1]));
}

#[test]
fn json_mode_prints_one_object_with_the_address() {
    let mut child = Command::new(BIN)
        .args(["serve", &model(), "--port", "0", "--json", "--threads", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let info: Value = serde_json::from_str(&line).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(info["model_name"], "llama-silu-chat");
    assert_eq!(info["chat_template"], true);
    assert_eq!(info["context"], 512);
    let url = info["url"].as_str().unwrap();
    assert_eq!(url, format!("http://{}", info["address"].as_str().unwrap()));
}

#[test]
fn a_hub_repo_id_in_the_local_cache_is_served_under_its_id() {
    // A Hugging Face cache as huggingface_hub lays it out, its snapshot
    // linking the fixture's files.
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--test-org--tiny-chat");
    let snapshot = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    for entry in std::fs::read_dir(model()).unwrap() {
        let entry = entry.unwrap();
        let target = std::fs::canonicalize(entry.path()).unwrap();
        std::os::unix::fs::symlink(target, snapshot.join(entry.file_name())).unwrap();
    }
    let server = Server::start_model("test-org/tiny-chat", &[], &[("HF_HUB_CACHE", cache.path())]);
    let (status, v) = server.get("/v1/models");
    assert_eq!(status, 200);
    assert_eq!(v["data"][0]["id"], "test-org/tiny-chat");
    let (status, v) = server.post(
        "/v1/chat/completions",
        &json!({"model": "test-org/tiny-chat", "messages": [{"role": "user", "content": "ROMEO."}], "max_tokens": 5, "temperature": 0}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 5);
}

/// One streamed request that would run for hours holds the only slot (`--queue
/// 0`): another request is answered 503 with OpenAI's error object, at once.
/// When the streaming client goes away, its generation stops and the next
/// request is served.
#[test]
fn a_full_queue_answers_503_and_a_client_that_leaves_frees_the_model() {
    use std::io::Read;
    let model = common::endless_model();
    let server = Server::start_model(model.path().to_str().unwrap(), &["--queue", "0"], &[]);
    let addr = server.url.strip_prefix("http://").unwrap().to_string();
    let body =
        json!({"prompt": "Hello there", "max_tokens": 1_000_000, "temperature": 0, "stream": true})
            .to_string();
    let mut long = std::net::TcpStream::connect(&addr).unwrap();
    // A stalled stream fails the test instead of hanging it.
    long.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    write!(
        long,
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // Wait for generated chunks: the model is busy with this request.
    let mut seen = String::new();
    let mut buf = [0u8; 1024];
    while seen.matches("data: ").count() < 3 {
        let n = long.read(&mut buf).unwrap();
        assert!(n > 0, "the stream ended: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        // The one slot is free when the server has just started: admitted.
        assert!(
            seen.len() < 12 || seen.starts_with("HTTP/1.1 200"),
            "{seen}"
        );
    }
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");

    let short = json!({"prompt": "Hello", "max_tokens": 2, "temperature": 0});
    let (status, v) = server.post("/v1/completions", &short);
    assert_eq!(status, 503, "{v}");
    let (kind, message) = error_of(&v);
    assert_eq!(kind, "server_error");
    assert!(message.contains("busy"), "{message}");

    drop(long);
    // The disconnect is noticed at the next token the server sends; the request
    // that was refused is then served. Without the stop the model would stay
    // busy for hours and every try would get 503.
    let started = std::time::Instant::now();
    loop {
        let (status, v) = server.post("/v1/completions", &short);
        if status == 200 {
            assert_eq!(v["usage"]["completion_tokens"], 2, "{v}");
            break;
        }
        assert_eq!(status, 503, "{v}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "the model stayed busy after its client left"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// `max_tokens` left out of a completion: 16 tokens, as OpenAI's completions.
#[test]
fn a_completion_without_max_tokens_stops_at_16() {
    let model = common::endless_model();
    let server = Server::start_model(model.path().to_str().unwrap(), &[], &[]);
    let (status, v) = server.post(
        "/v1/completions",
        &json!({"prompt": "Hello there", "temperature": 0}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 16, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
}
