//! The `keygate` binary: parses the command line and hands over to the library.

use clap::Parser;

/// mimalloc instead of glibc's malloc: allocation and free were ~20 % of the instructions
/// of a proxied request under glibc (callgrind, PERFORMANCE.md), and glibc's per-thread
/// arenas held on to memory with thousands of requests in flight. The library and its
/// tests keep the system allocator; only the server binary opts in.
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    keygate::cli::run(keygate::cli::Cli::parse())
}
