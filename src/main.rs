//! The `rookery` binary: logger, command line, then [`rookery::cli::run`].

use clap::Parser;

fn main() -> std::process::ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    rookery::cli::run(rookery::cli::Cli::parse())
}
