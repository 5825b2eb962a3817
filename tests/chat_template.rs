//! Chat templates render and tokenize as transformers'
//! `apply_chat_template(messages, add_generation_prompt=...)` does: the text
//! and the ids of every case of fixtures/chat/reference.json (made by
//! fixtures/chat/make_chat_refs.py with transformers) are compared, templates
//! that refuse a conversation refuse it here too, and a model without a
//! template is a clear error.

use std::path::{Path, PathBuf};
use std::process::Command;

use flashpack::runtime::chat::{ChatEncoder, ChatTemplate, Message};

fn chat_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/chat")
}

fn messages(case: &serde_json::Value) -> Vec<Message> {
    case["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect()
}

/// Every case of a reference file, against encoders loaded from `dir_of(tokenizer)`.
fn check_reference(file: &Path, dir_of: impl Fn(&str) -> PathBuf) -> usize {
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    let cases = reference["cases"].as_array().unwrap();
    let mut checked = 0;
    for case in cases {
        let tokenizer = case["tokenizer"].as_str().unwrap();
        let encoder = ChatEncoder::load(&dir_of(tokenizer)).unwrap();
        let add = case["add_generation_prompt"].as_bool().unwrap();
        let msgs = messages(case);
        let what = format!(
            "{tokenizer} / {} / add_generation_prompt={add}",
            case["conversation"]
        );
        if let Some(error) = case.get("error") {
            let err = encoder.encode(&msgs, add).unwrap_err().to_string();
            assert!(
                err.contains(error.as_str().unwrap()),
                "{what}: transformers raised {error}, we said {err}"
            );
        } else {
            let text = encoder.template().render(&msgs, add).unwrap();
            assert_eq!(text, case["text"].as_str().unwrap(), "{what}: text");
            let ids: Vec<u32> = case["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(encoder.encode(&msgs, add).unwrap(), ids, "{what}: ids");
        }
        checked += 1;
    }
    checked
}

#[test]
fn rendered_ids_equal_transformers_for_every_fixture_template() {
    let n = check_reference(&chat_dir().join("reference.json"), |t| chat_dir().join(t));
    // 5 tokenizer directories x 6 conversations x 2 settings of add_generation_prompt.
    assert_eq!(n, 60);
}

/// The real SmolLM2-135M-Instruct tokenizer with its real template, when the
/// checkpoint of benches/real_model/get_smollm2.py is at $FLASHPACK_SMOLLM2
/// (its tokenizer.json is 3.5 MB, so not committed; the ids are).
#[test]
fn real_smollm2_tokenizer_and_template_when_present() {
    let Some(dir) = std::env::var_os("FLASHPACK_SMOLLM2") else {
        eprintln!("FLASHPACK_SMOLLM2 not set: skipped");
        return;
    };
    let dir = PathBuf::from(dir);
    let n = check_reference(&chat_dir().join("smollm2-real.json"), |_| dir.clone());
    assert_eq!(n, 12);
}

#[test]
fn the_template_adds_bos_itself_and_tokenizing_adds_none() {
    // llama3-style writes {{ bos_token }}: exactly one BOS, not two; ChatML
    // writes none, and none is added (the fixture tokenizer's post-processor
    // would add <s> to a plain prompt).
    let msgs = [Message::new("user", "Hi")];
    let llama = ChatEncoder::load(&chat_dir().join("llama3-style")).unwrap();
    let ids = llama.encode(&msgs, true).unwrap();
    let bos = 2048; // <|begin_of_text|>, the first token added to the fixture vocabulary
    assert_eq!(ids[0], bos);
    assert_eq!(ids.iter().filter(|&&i| i == bos).count(), 1);
    let chatml = ChatEncoder::load(&chat_dir().join("smollm2-chatml")).unwrap();
    let ids = chatml.encode(&msgs, true).unwrap();
    assert!(
        !ids.contains(&0),
        "no <s> in a ChatML conversation: {ids:?}"
    );
    assert_eq!(chatml.eos_token_id(), Some(2049)); // <|im_end|>
}

#[test]
fn named_templates_use_default_and_a_file_wins_over_the_config() {
    let named = ChatTemplate::load(&chat_dir().join("llama3-style")).unwrap();
    assert!(named.source().contains("start_header_id"));
    // mistral-style keeps its template in chat_template.jinja only.
    let file = ChatTemplate::load(&chat_dir().join("mistral-style")).unwrap();
    assert!(file.source().contains("[INST]"));
    let no_default = serde_json::json!({"chat_template": [{"name": "tool_use", "template": "x"}]});
    let err = ChatTemplate::from_tokenizer_config(&no_default, Path::new("cfg"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("\"default\"") && err.contains("tool_use"),
        "{err}"
    );
    let bad = serde_json::json!({"chat_template": "{% for %}"});
    let err = ChatTemplate::from_tokenizer_config(&bad, Path::new("cfg"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("chat template of cfg"), "{err}");
}

#[test]
fn a_model_without_a_template_is_a_clear_error() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/models/llama-silu");
    let err = ChatTemplate::load(&model).unwrap_err().to_string();
    assert!(err.contains("has no chat template"), "{err}");
    // And through the CLI: exit 2 with the message.
    let out = Command::new(env!("CARGO_BIN_EXE_flashpack"))
        .args(["chat", model.to_str().unwrap(), "--json"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["error"]
        .as_str()
        .unwrap()
        .contains("has no chat template"));
}

#[test]
fn a_packed_file_carries_the_template() {
    // convert keeps tokenizer_config.json in the file's manifest: the packed
    // model renders and encodes as its checkpoint and as transformers does.
    let dir = tempfile::tempdir().unwrap();
    let packed = dir.path().join("chat.flashpack");
    let out = Command::new(env!("CARGO_BIN_EXE_flashpack"))
        .args([
            "convert",
            chat_dir().join("llama-silu-chat").to_str().unwrap(),
            "-o",
        ])
        .arg(&packed)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let n = check_reference(&chat_dir().join("reference.json"), |t| {
        if t == "llama-silu-chat" {
            packed.clone()
        } else {
            chat_dir().join(t)
        }
    });
    assert_eq!(n, 60);
}
