//! cargo-fuzz target: the `config_from_toml` property of fuzz/checks.rs (shared with
//! tests/fuzz_corpus.rs, which replays the corpus in `cargo test`).
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::config_from_toml(data));
