//! The `rookery` binary: logger, command line, then [`rookery::cli::run`].

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = rookery::cli::Cli::parse();
    rookery::cli::init_logging(&cli);
    rookery::cli::run(cli)
}
