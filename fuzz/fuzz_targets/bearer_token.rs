//! cargo-fuzz target: the `bearer_token` property of fuzz/checks.rs (shared with
//! tests/fuzz_corpus.rs, which replays the corpus in `cargo test`).
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::bearer_token(data));
