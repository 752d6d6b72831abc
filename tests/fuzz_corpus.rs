//! The fuzz targets' properties (fuzz/checks.rs) in every `cargo test`, without libFuzzer:
//! each target runs over its committed corpus (fuzz/corpus/<target>/), then over a bounded
//! number of inputs mutated from it with a small seeded PRNG. `cargo fuzz run <target>`
//! explores far more; this keeps what it found (and the corpus) from regressing.
//! `KEYGATE_FUZZ_SEED` and `KEYGATE_FUZZ_ROUNDS` vary the seed and the number of mutations.

#[path = "../fuzz/checks.rs"]
mod checks;

use std::path::Path;

/// xorshift64*: small, seeded, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Fragments that matter to the parsers under test, spliced in at random places.
const DICTIONARY: &[&[u8]] = &[
    b"/",
    b"//",
    b".",
    b"..",
    b"/./",
    b"/../",
    b"%2e",
    b"%2E",
    b"%2f",
    b"%2F",
    b"%5c",
    b"%25",
    b"%00",
    b"%",
    b";",
    b"..;",
    b"\\",
    b"?",
    b"#",
    b"\xc3\xa9",
    b"\xff",
    b"Bearer ",
    b"bearer ",
    b"=",
    b"==",
    b" ",
    b"\t",
    b"+",
    b"~",
    b"\"",
    b"[",
    b"]",
    b"{",
    b"}",
    b"\n",
    b"=\"",
    b"[[keys]]\n",
    b"[server]\n",
    b"[upstream]\n",
    b"url = ",
    b"\"30s\"",
    b"\"-1s\"",
    b"99999999999999999999",
    b"match = \"",
    b"scope = ",
    b"rpm = 0",
    b"1e308",
    b"\"\\u0000\"",
    b"'''",
    b"\"\"\"",
];

fn mutate(rng: &mut Rng, corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut input = corpus[rng.below(corpus.len())].clone();
    for _ in 0..=rng.below(4) {
        let at = rng.below(input.len() + 1);
        match rng.below(6) {
            0 if !input.is_empty() => {
                let i = rng.below(input.len());
                input[i] ^= 1 << rng.below(8);
            }
            1 => input
                .splice(
                    at..at,
                    DICTIONARY[rng.below(DICTIONARY.len())].iter().copied(),
                )
                .for_each(drop),
            2 if !input.is_empty() => {
                let end = (at + rng.below(8)).min(input.len());
                input.drain(at.min(end)..end);
            }
            3 => {
                let other = &corpus[rng.below(corpus.len())];
                let from = rng.below(other.len() + 1);
                let to = (from + rng.below(32)).min(other.len());
                input
                    .splice(at..at, other[from..to].iter().copied())
                    .for_each(drop);
            }
            4 => input.insert(at, rng.next() as u8),
            _ => {
                let i = rng.below(input.len() + 1);
                input.truncate(i);
            }
        }
    }
    input
}

fn run(target: &str, check: fn(&[u8]), rounds: usize) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut corpus: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|entry| std::fs::read(entry.unwrap().path()).unwrap())
        .collect();
    corpus.sort();
    assert!(!corpus.is_empty(), "empty corpus {}", dir.display());
    for input in &corpus {
        check(input);
    }
    let seed = std::env::var("KEYGATE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x006b_6579_6761_7465_u64);
    let rounds = std::env::var("KEYGATE_FUZZ_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(rounds);
    let mut rng = Rng(seed | 1);
    for round in 0..rounds {
        let input = mutate(&mut rng, &corpus);
        let outcome = std::panic::catch_unwind(|| check(&input));
        if let Err(cause) = outcome {
            panic!(
                "{target}: round {round} (seed {seed}) failed on {:?}: {cause:?}",
                String::from_utf8_lossy(&input)
            );
        }
    }
}

#[test]
fn bearer_token_properties() {
    run("bearer_token", checks::bearer_token, 50_000);
}

#[test]
fn path_and_route_properties() {
    run("path_and_route", checks::path_and_route, 50_000);
}

#[test]
fn config_from_toml_properties() {
    run("config_from_toml", checks::config_from_toml, 3_000);
}
