//! The command line: `serve`, `migrate`, `check-config`. Parses arguments, loads the config
//! and calls [`crate::server`]; prints only what the operator asked for.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::Config;
use crate::error::StartError;
use crate::reload::PolicySource;

#[derive(Debug, Parser)]
#[command(name = "rookery", version, about = "Rookery: a real-time chat server")]
pub struct Cli {
    /// A TOML file layered over config/default.toml (environment variables override both).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server until SIGINT or SIGTERM.
    Serve,
    /// Create the database if missing and apply pending migrations, then exit.
    Migrate,
    /// Validate the configuration and the room policy file; print every problem with its key
    /// and place, exit non-zero if any.
    CheckConfig,
    /// Add a new message key (the next id) to the key file; restart to seal with it.
    RotateKey,
}

pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::CheckConfig => check_config(cli.config.as_deref()),
        Command::Serve => report(
            Config::load(cli.config.as_deref())
                .map_err(StartError::from)
                .and_then(crate::server::serve),
        ),
        Command::RotateKey => report(
            Config::load(cli.config.as_deref())
                .map_err(StartError::from)
                .and_then(|config| {
                    let key_file = config.key_file();
                    Ok(crate::crypto::add_key(&config.key_source(&key_file))?)
                })
                .map(|(id, path)| {
                    println!(
                        "added message key {id} to {}; restart the server to seal new messages with it",
                        path.display()
                    )
                }),
        ),
        Command::Migrate => report(
            Config::load(cli.config.as_deref())
                .map_err(StartError::from)
                .and_then(|config| crate::server::migrate(&config))
                .map(|n| log::info!("applied {n} migration(s)")),
        ),
    }
}

fn report(result: Result<(), StartError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            eprintln!("rookery: {e}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(file: Option<&std::path::Path>) -> ExitCode {
    let config = match Config::load(file) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("configuration is invalid:");
            for problem in e.problems() {
                eprintln!("  {problem}");
            }
            return ExitCode::FAILURE;
        }
    };
    let policies = match PolicySource::of(&config).load() {
        Ok(policies) => policies,
        Err(problems) => {
            eprintln!(
                "room policy file {} is invalid:",
                config.rooms.policy_file.display()
            );
            for problem in problems {
                eprintln!("  {problem}");
            }
            return ExitCode::FAILURE;
        }
    };
    println!("configuration is valid");
    println!("  database: {}", redact_url(config.database.url.expose()));
    println!(
        "  listen: {} ({})",
        config.server.bind,
        if config.tls.enabled {
            "wss"
        } else {
            "plain ws"
        }
    );
    println!(
        "  room policies: {} ({} room(s) defined)",
        config.rooms.policy_file.display(),
        policies.rooms.len()
    );
    ExitCode::SUCCESS
}

/// The URL without its password.
fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            parsed.to_string()
        }
        Err(_) => "(unparseable)".into(),
    }
}
