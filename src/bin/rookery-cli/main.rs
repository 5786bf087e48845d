//! rookery-cli: a terminal client speaking docs/protocol.md through `rookery::client`.
//!
//! This file owns the command line, the password prompt, the error type and the exit status.
//! The layers import one way:
//! - `show`: how messages and events read for people;
//! - `link`: one logged-in connection making request/reply round trips (script modes);
//! - `script`: `send`, `history` and `tail`, over `link` and `show`;
//! - `chat`: the interactive client's state (commands, replies, events, reconnects) with no IO;
//! - `terminal`: the interactive client's IO: the line editor, the connection, the timers.

mod chat;
mod link;
mod script;
mod show;
mod terminal;

use clap::{Args, Parser, Subcommand};
use rookery::client::{ClientError, ConnectOptions};
use rookery::protocol::{NameError, RoomName, Username};
use rookery::secret::Secret;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "rookery-cli",
    version,
    about = "A terminal client for a Rookery chat server"
)]
struct Cli {
    #[command(flatten)]
    server: ServerArgs,
    #[command(subcommand)]
    mode: Mode,
}

/// How to reach the server and as whom: the same in every mode.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// The server's WebSocket URL.
    #[arg(long, default_value = "wss://127.0.0.1:8443/ws", global = true)]
    pub url: String,
    /// Who to log in as (the password comes from ROOKERY_PASSWORD, or is asked for).
    #[arg(long, global = true)]
    pub user: Option<String>,
    /// Accept the server's certificate without checking it (a self-signed one).
    #[arg(long, global = true)]
    pub insecure: bool,
    /// Trust the certificate(s) in this PEM file, e.g. the server's generated cert.pem.
    #[arg(long, global = true, value_name = "FILE")]
    pub ca: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Chat interactively: commands start with '/', any other line is sent to the current room.
    Connect,
    /// Send one message to a room and print its seq once the server has stored it.
    Send {
        #[arg(long)]
        room: String,
        /// The message.
        text: String,
    },
    /// Print a room's latest messages, oldest first.
    History {
        #[arg(long)]
        room: String,
        /// How many messages (fetched in pages of up to 100).
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Print `{"messages": [...], "has_more": bool}` instead of lines for people.
        #[arg(long)]
        json: bool,
    },
    /// Print a room's events as JSON lines until interrupted, reconnecting when the connection
    /// drops without missing a message.
    Tail {
        #[arg(long)]
        room: String,
    },
}

/// Why rookery-cli stopped with a failure.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The server answered a request with an error reply.
    #[error("{code}: {message}")]
    Server { code: String, message: String },
    #[error("{0}")]
    Client(#[from] ClientError),
    #[error("{0}")]
    Usage(String),
    #[error("reading the password: {0}")]
    Password(std::io::Error),
    #[error("{0}")]
    Terminal(String),
}

impl From<NameError> for CliError {
    fn from(error: NameError) -> CliError {
        CliError::Usage(error.to_string())
    }
}

impl ServerArgs {
    pub fn connect_options(&self) -> ConnectOptions {
        ConnectOptions {
            insecure: self.insecure,
            ca_file: self.ca.clone(),
            timeout: Some(CONNECT_TIMEOUT),
            ..ConnectOptions::default()
        }
    }

    /// The `--user` name, which every mode needs.
    pub fn username(&self) -> Result<Username, CliError> {
        let name = self
            .user
            .as_deref()
            .ok_or_else(|| CliError::Usage("--user NAME is required".into()))?;
        Ok(Username::parse(name)?)
    }
}

/// The longest body sent: a frame over the server's limit (`session.max_frame_bytes`, 64 KiB
/// by default) closes the connection, and a retry would only close it again. A body over the
/// room's own limit is answered `too_large`.
pub const MAX_BODY_BYTES: usize = 60 * 1024;

/// How long a connection attempt (TCP, TLS and the upgrade) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The password from ROOKERY_PASSWORD, or asked for without echo.
pub fn password(user: &Username) -> Result<Secret, CliError> {
    if let Ok(password) = std::env::var("ROOKERY_PASSWORD") {
        return Ok(Secret::new(password));
    }
    rpassword::prompt_password(format!("password for {user}: "))
        .map(Secret::new)
        .map_err(CliError::Password)
}

pub fn room(name: &str) -> Result<RoomName, CliError> {
    Ok(RoomName::parse(name)?)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = actix_rt::System::new().block_on(run(cli));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("rookery-cli: {error}");
            if error.to_string().contains("certificate verify failed") {
                eprintln!(
                    "rookery-cli: for a self-signed certificate pass --ca with the server's \
                     cert.pem (data/tls/cert.pem), or --insecure"
                );
            }
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), CliError> {
    let server = cli.server;
    match cli.mode {
        Mode::Connect => terminal::run(&server).await,
        Mode::Send { room, text } => script::send(&server, &self::room(&room)?, text).await,
        Mode::History { room, limit, json } => {
            script::history(&server, &self::room(&room)?, limit, json).await
        }
        Mode::Tail { room } => script::tail(&server, &self::room(&room)?).await,
    }
}
