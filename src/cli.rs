//! The command line: `serve`, `migrate`, `check-config`, `rotate-key`, `user …`, `verify`. Parses arguments, loads the config
//! and calls [`crate::server`]; prints only what the operator asked for.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::{Config, LogFormat};
use crate::error::{OperatorError, StartError};
use crate::operator;
use crate::reload::PolicySource;
use std::io::Write;

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
    /// Manage users in the database (running servers notice within seconds).
    #[command(subcommand)]
    User(UserCommand),
    /// Read every stored message and check that it decrypts and that no seq is missing; print
    /// one line per problem and exit non-zero if any. Changes nothing.
    Verify {
        /// Check only this room.
        #[arg(long, value_name = "NAME")]
        room: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Every user: when created, active or disabled, how many live tokens.
    List,
    /// Create a user (asks for the password, or reads ROOKERY_PASSWORD); works with
    /// `auth.registration = "closed"`.
    Add { name: String },
    /// Refuse the user's logins and resumes and close its live sessions.
    Disable { name: String },
    /// Let a disabled user log in again.
    Enable { name: String },
    /// Set a new password (asked without echo, or ROOKERY_PASSWORD) and revoke every token.
    ResetPassword { name: String },
    /// Revoke every token of the user: its sessions close and it must log in again.
    RevokeTokens { name: String },
}

/// The logger, as `log.format` says (text when the configuration cannot be read: the command
/// reports that itself). The level follows `RUST_LOG`, default info.
pub fn init_logging(cli: &Cli) {
    let format = Config::load(cli.config.as_deref())
        .map(|c| c.log.format)
        .unwrap_or(LogFormat::Text);
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if format == LogFormat::Json {
        builder.format(|out, record| {
            let line = serde_json::json!({
                "time": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                "level": record.level().as_str(),
                "target": record.target(),
                "message": record.args().to_string(),
            });
            writeln!(out, "{line}")
        });
    }
    builder.init();
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
        Command::User(command) => operate(cli.config.as_deref(), |config| match &command {
            UserCommand::List => operator::list_users(config),
            UserCommand::Add { name } => operator::add_user(config, name),
            UserCommand::Disable { name } => operator::set_disabled(config, name, true),
            UserCommand::Enable { name } => operator::set_disabled(config, name, false),
            UserCommand::ResetPassword { name } => operator::reset_password(config, name),
            UserCommand::RevokeTokens { name } => operator::revoke_tokens(config, name),
        }),
        Command::Verify { room } => operate(cli.config.as_deref(), |config| {
            operator::verify(config, room.as_deref())
        }),
        Command::Migrate => report(
            Config::load(cli.config.as_deref())
                .map_err(StartError::from)
                .and_then(|config| crate::server::migrate(&config))
                .map(|n| log::info!("applied {n} migration(s)")),
        ),
    }
}

fn operate(
    file: Option<&std::path::Path>,
    command: impl FnOnce(&Config) -> Result<(), OperatorError>,
) -> ExitCode {
    let result = Config::load(file)
        .map_err(|e| OperatorError::Start(e.into()))
        .and_then(|config| command(&config));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rookery: {e}");
            ExitCode::FAILURE
        }
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
