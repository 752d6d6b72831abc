//! cargo-fuzz target: the `path_and_route` property of fuzz/checks.rs (shared with
//! tests/fuzz_corpus.rs, which replays the corpus in `cargo test`).
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::path_and_route(data));
