//! Fuzzes the packed-format reader: any bytes must give a valid file or a typed
//! error, through opening, the full integrity check and loading the model.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("x.flashpack");
    std::fs::write(&path, data).expect("write");
    if let Ok(file) = flashpack::format::PackedFile::open(&path) {
        let _ = flashpack::format::integrity::check_integrity(&file);
        let _ = flashpack::runtime::open_model(&path);
    }
});
