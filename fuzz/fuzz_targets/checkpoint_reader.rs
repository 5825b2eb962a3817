//! Fuzzes the checkpoint reader with arbitrary `model.safetensors` bytes beside a
//! valid config and tokenizer (from the fixtures).
#![no_main]

use libfuzzer_sys::fuzz_target;

const CONFIG: &str = include_str!("../../fixtures/models/opt-postln-proj/config.json");
const TOKENIZER: &str = include_str!("../../fixtures/models/opt-postln-proj/tokenizer.json");

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("config.json"), CONFIG).expect("write");
    std::fs::write(dir.path().join("tokenizer.json"), TOKENIZER).expect("write");
    std::fs::write(dir.path().join("model.safetensors"), data).expect("write");
    if let Ok(ckpt) = flashpack::input::Checkpoint::open(dir.path()) {
        let _ = flashpack::runtime::Model::from_checkpoint(&ckpt);
    }
});
