//! The config parser on arbitrary text: it never panics, an error always
//! names the file, and what parses once parses again to the same value.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::Config;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match Config::parse("fuzz.toml", &text) {
        Ok(config) => {
            let again = Config::parse("fuzz.toml", &text)
                .unwrap_or_else(|e| panic!("parsed once, then refused: {e}"));
            assert_eq!(config, again, "the same text parsed to two configs");
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.starts_with("fuzz.toml"),
                "the error does not name the file: {msg:?}"
            );
        }
    }
});
