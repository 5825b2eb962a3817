//! `flashpack run` as practitioners use it: prompts from files and stdin,
//! llama.cpp's short flags, prompts that begin with `-`, stop strings, the
//! repetition penalty against transformers, sampling defaults from
//! `generation_config.json`, the echoed prompt, `--ctx`, and models named by
//! Hub repo id in a local Hugging Face cache.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

fn fixture(rel: &str) -> String {
    common::fixtures().join(rel).display().to_string()
}

/// Runs the binary with `stdin` fed in; returns (exit code, stdout, stderr).
fn flashpack_with(args: &[&str], stdin: &str, env: &[(&str, &Path)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flashpack"));
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Only the cache a test names.
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_HOME");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn run_json(args: &[&str]) -> Value {
    let mut all = vec!["run"];
    all.extend_from_slice(args);
    all.push("--json");
    let (code, stdout, stderr) = flashpack_with(&all, "", &[]);
    assert_eq!(code, 0, "{args:?}: {stderr}");
    serde_json::from_str(&stdout).unwrap()
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

#[test]
fn prompts_come_from_a_file_stdin_or_a_flag_alike() {
    let model = fixture("models/opt-relu");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("prompt.txt");
    std::fs::write(&file, "KING HENRY.").unwrap();
    let by_flag = run_json(&[&model, "--prompt", "KING HENRY.", "-n", "12"]);
    let by_file = run_json(&["-m", &model, "-f", file.to_str().unwrap(), "-n", "12"]);
    let (code, stdout, stderr) = flashpack_with(
        &["run", &model, "-f", "-", "-n", "12", "--json"],
        "KING HENRY.",
        &[],
    );
    assert_eq!(code, 0, "{stderr}");
    let by_stdin: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(by_flag["generated_ids"].as_array().unwrap().len(), 12);
    for other in [&by_file, &by_stdin] {
        assert_eq!(other["prompt_ids"], by_flag["prompt_ids"]);
        assert_eq!(other["generated_ids"], by_flag["generated_ids"]);
    }
    // A prompt that begins with `-` needs no `=`; short -p, -t and -c work.
    let dash = run_json(&[&model, "-p", "-- KING", "-n", "3", "-t", "1", "-c", "64"]);
    assert!(dash["prompt_tokens"].as_u64().unwrap() > 1);
    assert_eq!(dash["threads"], 1);
    assert_eq!(dash["ctx"], 64);
    // Both a prompt and a prompt file, or neither: a usage error.
    let (code, _, _) = flashpack_with(&["run", &model, "-p", "x", "-f", "-"], "", &[]);
    assert_eq!(code, 2);
    let (code, _, _) = flashpack_with(&["run", &model], "", &[]);
    assert_eq!(code, 2);
}

#[test]
fn the_prompt_is_echoed_unless_asked_not_to_and_text_ends_with_a_newline() {
    let model = fixture("models/opt-relu");
    let (code, shown, _) =
        flashpack_with(&["run", &model, "-p", "KING HENRY.", "-n", "8"], "", &[]);
    assert_eq!(code, 0);
    let (_, hidden, stderr) = flashpack_with(
        &[
            "run",
            &model,
            "-p",
            "KING HENRY.",
            "-n",
            "8",
            "--no-display-prompt",
        ],
        "",
        &[],
    );
    assert!(shown.starts_with("KING HENRY."), "{shown:?}");
    assert_eq!(shown, format!("KING HENRY.{hidden}"));
    assert!(hidden.ends_with('\n'));
    assert!(stderr.contains("stopped: token limit"), "{stderr}");
    assert!(
        stderr.contains("ms/token") && stderr.contains("load"),
        "{stderr}"
    );
}

#[test]
fn a_stop_string_ends_the_text_before_it() {
    let model = fixture("models/opt-relu");
    let free = run_json(&[&model, "-p", "KING HENRY.", "-n", "40"]);
    let text = free["text"].as_str().unwrap().to_string();
    // A stop string from the middle of the unconstrained greedy text.
    let words: Vec<&str> = text.split_whitespace().filter(|w| w.len() >= 3).collect();
    let stop = words[words.len() / 2].to_string();
    let at = text.find(&stop).unwrap();
    let stopped = run_json(&[&model, "-p", "KING HENRY.", "-n", "40", "--stop", &stop]);
    assert_eq!(stopped["stop_reason"], "stop_string");
    assert_eq!(stopped["text"].as_str().unwrap(), &text[..at]);
    // Streamed output holds back nothing that is not a stop string and prints
    // no part of the stop string.
    let (_, stdout, _) = flashpack_with(
        &[
            "run",
            &model,
            "-p",
            "KING HENRY.",
            "-n",
            "40",
            "--stop",
            &stop,
            "--no-display-prompt",
        ],
        "",
        &[],
    );
    assert_eq!(stdout, format!("{}\n", &text[..at]));
    // A stop string that never appears changes nothing.
    let never = run_json(&[
        &model,
        "-p",
        "KING HENRY.",
        "-n",
        "40",
        "--stop",
        "\u{1F600}zz",
    ]);
    assert_eq!(never["generated_ids"], free["generated_ids"]);
}

#[test]
fn the_repetition_penalty_matches_transformers() {
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixtures().join("generation/repetition_penalty.json"))
            .unwrap(),
    )
    .unwrap();
    for case in reference["cases"].as_array().unwrap() {
        let model = fixture(&format!("models/{}", case["model"].as_str().unwrap()));
        let penalty = case["repetition_penalty"].as_f64().unwrap().to_string();
        let want = ids(&case["greedy_ids"]);
        let got = run_json(&[
            &model,
            "-p",
            case["prompt"].as_str().unwrap(),
            "-n",
            &want.len().to_string(),
            "--repeat-penalty",
            &penalty,
        ]);
        assert_eq!(got["prompt_ids"], case["prompt_ids"]);
        // Compare up to the first near-tie (margin < 1e-3), as the fixture
        // references do.
        let margins: Vec<f64> = case["top2_margins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_f64().unwrap())
            .collect();
        let upto = margins
            .iter()
            .position(|&m| m < 1e-3)
            .map_or(want.len(), |i| i + 1);
        assert_eq!(
            &ids(&got["generated_ids"])[..upto],
            &want[..upto],
            "{}",
            case["model"]
        );
        // And the penalty changed the text (so the comparison means something).
        let plain = run_json(&[
            &model,
            "-p",
            case["prompt"].as_str().unwrap(),
            "-n",
            &want.len().to_string(),
        ]);
        assert_ne!(plain["generated_ids"], got["generated_ids"]);
    }
}

/// A copy of a fixture checkpoint with its own generation_config.json.
fn with_generation_config(config: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = common::fixtures().join("models/opt-relu");
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        std::os::unix::fs::symlink(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    std::fs::remove_file(dir.path().join("generation_config.json")).unwrap();
    std::fs::write(dir.path().join("generation_config.json"), config).unwrap();
    dir
}

#[test]
fn sampling_defaults_come_from_generation_config_as_in_transformers() {
    let sampling = with_generation_config(
        r#"{"bos_token_id": 0, "eos_token_id": 1, "do_sample": true, "temperature": 0.6, "top_p": 0.9, "repetition_penalty": 1.3}"#,
    );
    let m = sampling.path().to_str().unwrap();
    let v = run_json(&[m, "-p", "KING", "-n", "4", "--seed", "5"]);
    assert!((v["temperature"].as_f64().unwrap() - 0.6).abs() < 1e-6);
    assert_eq!(v["top_k"], 50, "transformers' default top_k when sampling");
    assert!((v["top_p"].as_f64().unwrap() - 0.9).abs() < 1e-6);
    assert!((v["repetition_penalty"].as_f64().unwrap() - 1.3).abs() < 1e-6);
    // The command line wins over the file.
    let v = run_json(&[
        m,
        "-p",
        "KING",
        "-n",
        "4",
        "--temperature",
        "0",
        "--repeat-penalty",
        "1",
    ]);
    assert_eq!(v["temperature"], 0.0);
    assert_eq!(v["repetition_penalty"], 1.0);
    // Without do_sample the model decodes greedily whatever its temperature.
    let greedy = with_generation_config(r#"{"eos_token_id": 1, "temperature": 0.6}"#);
    let v = run_json(&[greedy.path().to_str().unwrap(), "-p", "KING", "-n", "4"]);
    assert_eq!(v["temperature"], 0.0);
    assert_eq!(v["top_k"], Value::Null);
}

#[test]
fn ctx_caps_the_context() {
    let model = fixture("models/opt-relu");
    let v = run_json(&[&model, "-p", "KING HENRY.", "-n", "50", "-c", "10"]);
    assert_eq!(v["stop_reason"], "context");
    assert_eq!(
        v["prompt_tokens"].as_u64().unwrap() + v["generated_tokens"].as_u64().unwrap(),
        10 + 1,
        "the last token is chosen from the full context's logits"
    );
    let (code, _, stderr) = flashpack_with(
        &["run", &model, "-p", "KING HENRY. KING HENRY.", "-c", "3"],
        "",
        &[],
    );
    assert_eq!(code, 2, "{stderr}");
}

#[test]
fn a_hub_repo_id_resolves_in_the_local_cache() {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--fixture-org--opt-relu");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    // As huggingface_hub lays it out: snapshot entries are links to blobs.
    for entry in std::fs::read_dir(common::fixtures().join("models/opt-relu")).unwrap() {
        let entry = entry.unwrap();
        std::os::unix::fs::symlink(entry.path(), snapshot.join(entry.file_name())).unwrap();
    }
    let env = [("HF_HUB_CACHE", cache.path())];
    let args = [
        "run",
        "fixture-org/opt-relu",
        "-p",
        "KING HENRY.",
        "-n",
        "6",
        "--json",
    ];
    let (code, stdout, stderr) = flashpack_with(&args, "", &env);
    assert_eq!(code, 0, "{stderr}");
    let by_id: Value = serde_json::from_str(&stdout).unwrap();
    let by_path = run_json(&[&fixture("models/opt-relu"), "-p", "KING HENRY.", "-n", "6"]);
    assert_eq!(by_id["generated_ids"], by_path["generated_ids"]);
    assert_eq!(by_id["model_path"], snapshot.display().to_string());
    // The other commands that take a model name it the same way.
    let out = tempfile::tempdir().unwrap();
    let packed = out.path().join("m.flashpack");
    for args in [
        vec!["inspect", "fixture-org/opt-relu"],
        vec![
            "eval",
            "fixture-org/opt-relu",
            "--text",
            &fixture("text/heldout.txt"),
            "--ctx",
            "64",
        ],
        vec![
            "convert",
            "fixture-org/opt-relu",
            "-o",
            packed.to_str().unwrap(),
        ],
    ] {
        let (code, _, stderr) = flashpack_with(&args, "", &env);
        assert_eq!(code, 0, "{args:?}: {stderr}");
    }
    // HF_HOME/hub is the cache when HF_HUB_CACHE is not set.
    let home = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(cache.path(), home.path().join("hub")).unwrap();
    let (code, _, stderr) = flashpack_with(&args, "", &[("HF_HOME", home.path())]);
    assert_eq!(code, 0, "{stderr}");
    // Not cached: exit 2, naming where it looked; nothing downloaded.
    let (code, stdout, _) = flashpack_with(
        &["run", "fixture-org/absent", "-p", "x", "--json"],
        "",
        &env,
    );
    assert_eq!(code, 2);
    let err: Value = serde_json::from_str(&stdout).unwrap();
    let message = err["error"].as_str().unwrap();
    assert!(
        message.contains(
            &cache
                .path()
                .join("models--fixture-org--absent")
                .display()
                .to_string()
        ),
        "{message}"
    );
}

#[test]
fn run_chat_renders_the_prompt_through_the_models_template_as_transformers_does() {
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixtures().join("chat/reference.json")).unwrap(),
    )
    .unwrap();
    let model = fixture("chat/llama-silu-chat");
    let mut checked = 0;
    for case in reference["cases"].as_array().unwrap() {
        let messages = case["messages"].as_array().unwrap();
        if case["tokenizer"] != "llama-silu-chat"
            || messages.len() != 1
            || messages[0]["role"] != "user"
            || case["add_generation_prompt"] != true
        {
            continue;
        }
        let prompt = messages[0]["content"].as_str().unwrap();
        let v = run_json(&[&model, "--chat", "-p", prompt, "-n", "4"]);
        assert_eq!(v["prompt_ids"], case["ids"], "{prompt:?}");
        checked += 1;
    }
    assert!(checked >= 2, "reference cases for run --chat: {checked}");
    // Without a template: a clear error, exit 2.
    let (code, _, stderr) = flashpack_with(
        &["run", &fixture("models/opt-relu"), "--chat", "-p", "hi"],
        "",
        &[],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("template"), "{stderr}");
}

#[test]
fn a_chat_template_jinja_file_travels_into_the_packed_file() {
    // A checkpoint as transformers 5 saves it: the template in
    // chat_template.jinja, not in tokenizer_config.json.
    let chat = common::fixtures().join("chat/llama-silu-chat");
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    std::fs::create_dir(&ckpt).unwrap();
    for name in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
    ] {
        std::os::unix::fs::symlink(chat.join(name), ckpt.join(name)).unwrap();
    }
    let mut config: Value =
        serde_json::from_slice(&std::fs::read(chat.join("tokenizer_config.json")).unwrap())
            .unwrap();
    let template = config
        .as_object_mut()
        .unwrap()
        .remove("chat_template")
        .unwrap();
    std::fs::write(ckpt.join("tokenizer_config.json"), config.to_string()).unwrap();
    std::fs::write(ckpt.join("chat_template.jinja"), template.as_str().unwrap()).unwrap();
    let packed = dir.path().join("m.flashpack");
    let (code, _, stderr) = flashpack_with(
        &[
            "convert",
            ckpt.to_str().unwrap(),
            "-o",
            packed.to_str().unwrap(),
        ],
        "",
        &[],
    );
    assert_eq!(code, 0, "{stderr}");
    let prompt = "Hello, who are you?";
    let from_dir = run_json(&[
        &chat.display().to_string(),
        "--chat",
        "-p",
        prompt,
        "-n",
        "2",
    ]);
    let from_file = run_json(&[packed.to_str().unwrap(), "--chat", "-p", prompt, "-n", "2"]);
    assert_eq!(from_file["prompt_ids"], from_dir["prompt_ids"]);
    // The template file is a source: the output may not replace it.
    let (code, _, _) = flashpack_with(
        &[
            "convert",
            ckpt.to_str().unwrap(),
            "-o",
            ckpt.join("chat_template.jinja").to_str().unwrap(),
        ],
        "",
        &[],
    );
    assert_eq!(code, 2);
}

#[test]
fn flash_equals_predicted_with_either_selector_on_a_product_criterion_file() {
    let dir = tempfile::tempdir().unwrap();
    let packed = dir.path().join("silu.flashpack");
    let (code, _, stderr) = flashpack_with(
        &[
            "convert",
            &fixture("models/llama-silu"),
            "-o",
            packed.to_str().unwrap(),
            "--calib",
            &fixture("text/train.txt"),
            "--calib-tokens",
            "2048",
        ],
        "",
        &[],
    );
    assert_eq!(code, 0, "{stderr}");
    let text = dir.path().join("h.txt");
    let heldout = std::fs::read_to_string(common::fixtures().join("text/heldout.txt")).unwrap();
    std::fs::write(
        &text,
        heldout.lines().take(60).collect::<Vec<_>>().join("\n"),
    )
    .unwrap();
    let eval = |mode: &[&str]| {
        let mut args = vec![
            "eval",
            packed.to_str().unwrap(),
            "--text",
            text.to_str().unwrap(),
            "--json",
        ];
        args.extend_from_slice(mode);
        let (code, stdout, stderr) = flashpack_with(&args, "", &[]);
        assert_eq!(code, 0, "{mode:?}: {stderr}");
        let v: Value = serde_json::from_str(&stdout).unwrap();
        (
            v["perplexity"].as_f64().unwrap(),
            v["ffn_active_fraction"].as_f64().unwrap(),
        )
    };
    let flash = eval(&["--ffn", "flash", "--selector", "trained"]);
    let trained = eval(&["--ffn", "predicted", "--selector", "trained"]);
    assert_eq!(
        flash, trained,
        "flash computes exactly what predicted --selector trained does"
    );
    // By default (the file has int4 selector copies, format section 10) both
    // choose with int4 copies: flash with the file's, predicted with its own
    // built at load from the weights.
    let flash = eval(&["--ffn", "flash"]);
    let int4 = eval(&["--ffn", "predicted"]);
    assert_eq!(flash, eval(&["--ffn", "predicted", "--selector", "int4"]));
    assert_eq!(flash, int4, "flash computes exactly what predicted does");
    assert!(
        flash.1 < trained.1,
        "int4 copies choose fewer: {flash:?} {trained:?}"
    );
}

/// Ctrl-C in the middle of a generation: exit 130, and the summary says how many
/// tokens were generated and at what speed, after the text streamed so far.
#[test]
fn an_interrupted_run_reports_how_far_it_got() {
    use std::io::Read;
    let model = common::endless_model();
    let prompt = "Hello there";
    let mut child = Command::new(env!("CARGO_BIN_EXE_flashpack"))
        .args(["run", model.path().to_str().unwrap(), "-p", prompt])
        .args(["-n", "1000000", "--threads", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until generated text streams after the echoed prompt.
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while seen.len() < prompt.len() + 40 {
        let n = stdout.read(&mut buf).unwrap();
        assert!(n > 0, "the run ended before it was interrupted");
        seen.extend_from_slice(&buf[..n]);
    }
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(String::from_utf8_lossy(&seen).starts_with(prompt));
    // "interrupted: N tokens generated in T ms (X ms/token, load L ms)"
    let line = stderr
        .lines()
        .find(|l| l.starts_with("interrupted: "))
        .unwrap_or_else(|| panic!("no summary in {stderr:?}"));
    let n: usize = line["interrupted: ".len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("{line}"));
    assert!(
        line.contains(" tokens generated in ") && line.contains(" ms/token"),
        "{line}"
    );
    // At least the tokens whose text was seen before the signal; the text is
    // ordinary bytes of the micro tokenizer (one or a few per token).
    assert!(n >= 1, "{line}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Reads a `.npy` of f32 as (shape, values), checking the header's fields.
fn read_npy(path: &Path) -> ((usize, usize), Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
    let len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + len]).unwrap();
    assert!(header.contains("'descr': '<f4'") && header.contains("'fortran_order': False"));
    let shape = header
        .split("'shape': (")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap();
    let dims: Vec<usize> = shape
        .split(',')
        .map(|d| d.trim().parse().unwrap())
        .collect();
    let values: Vec<f32> = bytes[10 + len..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(values.len(), dims[0] * dims[1]);
    ((dims[0], dims[1]), values)
}

/// `--logits-out`: the prompt's last row equals transformers' final logits,
/// every later row's argmax is the greedy token it chose, the generated ids
/// are those of a run without it, and `-n 0` keeps the prompt's rows.
#[test]
fn logits_out_writes_every_computed_row_against_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let npy = dir.path().join("logits.npy");
    for name in ["llama-silu", "opt-relu", "qwen2-silu"] {
        let reference: Value = serde_json::from_slice(
            &std::fs::read(common::fixtures().join(format!("reference/{name}.json"))).unwrap(),
        )
        .unwrap();
        let model = fixture(&format!("models/{name}"));
        for prompt in reference["prompts"].as_array().unwrap().iter().take(3) {
            let text = prompt["text"].as_str().unwrap();
            let want_ids: Vec<u64> = prompt["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect();
            let n = 5;
            let base = [
                "run",
                model.as_str(),
                "-p",
                text,
                "--temperature",
                "0",
                "--json",
            ];
            let (code, stdout, stderr) = flashpack_with(&base, "", &[]);
            assert_eq!(code, 0, "{stderr}");
            let plain: Value = serde_json::from_str(&stdout).unwrap();
            let mut args = base.to_vec();
            args.extend(["-n", "5", "--logits-out", npy.to_str().unwrap()]);
            let (code, stdout, stderr) = flashpack_with(&args, "", &[]);
            assert_eq!(code, 0, "{stderr}");
            let json: Value = serde_json::from_str(&stdout).unwrap();
            let ids: Vec<u64> = json["prompt_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect();
            assert_eq!(ids, want_ids, "{name} {text:?}");
            let generated: Vec<u64> = json["generated_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect();
            assert_eq!(generated.len(), n, "{json}");
            let plain_ids = &plain["generated_ids"].as_array().unwrap()[..n];
            assert_eq!(
                json["generated_ids"].as_array().unwrap(),
                plain_ids,
                "{name}"
            );

            let ((rows, vocab), logits) = read_npy(&npy);
            let p = ids.len();
            assert_eq!(rows, p + n - 1, "{name}");
            assert_eq!(json["logits_rows"], rows, "{json}");
            let final_ref: Vec<f32> = prompt["final_logits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            assert_eq!(final_ref.len(), vocab);
            let last_prompt_row = &logits[(p - 1) * vocab..p * vocab];
            let nmse = common::nmse(last_prompt_row, &final_ref);
            assert!(nmse <= 1e-6, "{name} {text:?}: NMSE {nmse}");
            for (i, &id) in generated.iter().enumerate() {
                let row = &logits[(p - 1 + i) * vocab..(p + i) * vocab];
                let argmax = (0..vocab)
                    .max_by(|&a, &b| row[a].total_cmp(&row[b]).then(b.cmp(&a)))
                    .unwrap();
                assert_eq!(argmax as u64, id, "{name}: row {} chose {id}", p - 1 + i);
            }
        }
        // -n 0: the prompt's rows only.
        let text = reference["prompts"][1]["text"].as_str().unwrap();
        let (code, _, stderr) = flashpack_with(
            &[
                "run",
                &model,
                "-p",
                text,
                "-n",
                "0",
                "--logits-out",
                npy.to_str().unwrap(),
            ],
            "",
            &[],
        );
        assert_eq!(code, 0, "{stderr}");
        let ((rows, _), _) = read_npy(&npy);
        assert_eq!(
            rows,
            reference["prompts"][1]["ids"].as_array().unwrap().len()
        );
    }
}

/// `--logits-out` never replaces the model: a packed file, a file of a
/// checkpoint directory (or any new name in it), checked before loading.
#[test]
fn logits_out_refuses_to_replace_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let packed = common::fixtures().join("broken/base.flashpack");
    let copy = dir.path().join("m.flashpack");
    std::fs::copy(&packed, &copy).unwrap();
    let before = std::fs::read(&copy).unwrap();
    let model_dir = fixture("models/micro-llama");
    let weights = format!("{model_dir}/model.safetensors");
    let new_in_dir = format!("{model_dir}/logits.npy");
    for (model, out) in [
        (copy.to_str().unwrap(), copy.to_str().unwrap()),
        (model_dir.as_str(), weights.as_str()),
        (model_dir.as_str(), new_in_dir.as_str()),
    ] {
        let (code, stdout, _) = flashpack_with(
            &["run", model, "-p", "a", "--logits-out", out, "--json"],
            "",
            &[],
        );
        assert_eq!(code, 2, "{model} -> {out}: {stdout}");
        let json: Value = serde_json::from_str(&stdout).unwrap();
        assert!(json["error"].as_str().unwrap().contains(out), "{json}");
    }
    assert_eq!(std::fs::read(&copy).unwrap(), before);
    assert!(!Path::new(&new_in_dir).exists());
}
