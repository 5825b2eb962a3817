//! Fuzzes config.json parsing and validation: any bytes give a config whose
//! tensor layout can be listed, or a typed error.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = serde_json::from_slice::<flashpack::input::config::RawConfig>(data) else {
        return;
    };
    if let Ok(cfg) =
        flashpack::input::config::ModelConfig::from_raw(&raw, std::path::Path::new("config.json"))
    {
        let _ = flashpack::input::ModelNames::for_config(&cfg).specs();
    }
});
