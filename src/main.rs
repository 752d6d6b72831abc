//! The `keygate` binary: parses the command line and hands over to the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    keygate::cli::run(keygate::cli::Cli::parse())
}
