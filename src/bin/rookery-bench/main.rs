//! rookery-bench: a load tool that speaks docs/protocol.md through `rookery::client`, like any
//! client, against a running server. Each scenario is bounded in count and time, ends with the
//! history checker's verdict, prints a table and, with `--json FILE`, machine-readable results.
//! See docs/performance.md for the server setup and the commands behind the published figures.
//!
//! This file owns the command line (every scenario's flags and the parameters it reports),
//! `main` and the dispatch to the scenarios. The layers import one way:
//! - `peer`: connections, logins and request/reply round trips (`Bench`, `Peer`);
//! - `meter`: what a sending scenario measures and the member send loop, over `peer`;
//! - `report`: the printed table and the JSON output;
//! - one module per scenario (`throughput`, `fanout`, `connections`, `reconnect`, `history`,
//!   `echo`), over the three above; `echo_server` is the baseline server `echo` drives, and
//!   `broadcast_server` the baseline chat server `fanout` drives over plain ws.

mod broadcast_server;
mod connections;
mod echo;
mod echo_server;
mod fanout;
mod history;
mod meter;
mod peer;
mod reconnect;
mod report;
mod throughput;

use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};
use std::process::ExitCode;

use peer::Bench;
use report::Report;

#[derive(Debug, Parser)]
#[command(
    name = "rookery-bench",
    about = "Load and fault scenarios against a Rookery server"
)]
struct Cli {
    /// The server's WebSocket URL; several, separated by commas, spread the clients over the
    /// nodes of a cluster in turn.
    #[arg(long, default_value = "wss://127.0.0.1:8443/ws", global = true)]
    url: String,
    /// Accept the server's certificate without checking it (the development certificate).
    #[arg(long, global = true)]
    insecure: bool,
    /// Also write the results as JSON to this file.
    #[arg(long, global = true)]
    json: Option<std::path::PathBuf>,
    /// The server's process id, to read its memory from /proc.
    #[arg(long, global = true)]
    server_pid: Option<u32>,
    /// Postgres URL, only to report its settings with the results.
    #[arg(long, global = true)]
    pg_url: Option<String>,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// R rooms × M members, every member sending with a bounded number of sends in flight.
    Throughput(ThroughputArgs),
    /// One room with many members and a few senders.
    Fanout(FanoutArgs),
    /// Many idle authenticated connections held with heartbeats.
    Connections(ConnectionsArgs),
    /// Joined clients drop their TCP connections at once and come back with resume + join after.
    Reconnect(ReconnectArgs),
    /// Pages of history from messages no longer in the ring buffer.
    History(HistoryArgs),
    /// Frames/s through a minimal WebSocket echo server of the same stack (a baseline).
    Echo(EchoArgs),
    /// Run that minimal echo server.
    EchoServer {
        #[arg(long, default_value = "127.0.0.1:9100")]
        bind: String,
    },
    /// Run the fan-out baseline: a plain actix broadcast chat server (ws://BIND/ws, no TLS, no
    /// storage) answering the requests `fanout` makes.
    BroadcastServer {
        #[arg(long, default_value = "127.0.0.1:9101")]
        bind: String,
    },
}

#[derive(Debug, Clone, Args)]
struct ThroughputArgs {
    #[arg(long, default_value_t = 200)]
    rooms: usize,
    #[arg(long, default_value_t = 5)]
    members: usize,
    /// Seconds of sending.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Sends in flight per connection.
    #[arg(long, default_value_t = 4)]
    inflight: usize,
    /// Messages per second per member; 0 sends as fast as acks come back.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    #[arg(long, default_value_t = 64)]
    body_bytes: usize,
}

#[derive(Debug, Clone, Args)]
struct FanoutArgs {
    #[arg(long, default_value_t = 1000)]
    members: usize,
    #[arg(long, default_value_t = 4)]
    senders: usize,
    /// Messages in all.
    #[arg(long, default_value_t = 2000)]
    messages: usize,
    /// Messages per second in all; 0 sends as fast as acks come back.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    #[arg(long, default_value_t = 4)]
    inflight: usize,
    #[arg(long, default_value_t = 64)]
    body_bytes: usize,
}

#[derive(Debug, Clone, Args)]
struct ConnectionsArgs {
    #[arg(long, default_value_t = 10_000)]
    count: usize,
    /// Seconds to hold them.
    #[arg(long, default_value_t = 30.0)]
    hold: f64,
    /// Spread connections over 127.0.0.1 .. 127.0.0.N.
    #[arg(long, default_value_t = 1)]
    source_ips: u8,
    /// Connections opened at once.
    #[arg(long, default_value_t = 200)]
    concurrency: usize,
}

#[derive(Debug, Clone, Args)]
struct ReconnectArgs {
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    #[arg(long, default_value_t = 20)]
    rooms: usize,
    #[arg(long, default_value_t = 10)]
    senders: usize,
    /// Messages per second per sender.
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Seconds of sending before the drop, and again after it.
    #[arg(long, default_value_t = 3.0)]
    phase: f64,
    /// Logins in flight at once during set-up.
    #[arg(long, default_value_t = 200)]
    concurrency: usize,
    /// Most reconnects in their TCP/TLS/upgrade handshake at once after the drop (0: no
    /// limit). All clients share this one process's thread: beyond what it can carry, each
    /// handshake of the tool's own waits so long that the server's handshake timeouts end it.
    #[arg(long, default_value_t = 0)]
    handshakes: usize,
}

#[derive(Debug, Clone, Args)]
struct HistoryArgs {
    /// Messages stored before reading.
    #[arg(long, default_value_t = 5000)]
    messages: usize,
    #[arg(long, default_value_t = 20)]
    clients: usize,
    /// Seconds of reading.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
}

#[derive(Debug, Clone, Args)]
struct EchoArgs {
    #[arg(long, default_value_t = 50)]
    connections: usize,
    #[arg(long, default_value_t = 16)]
    inflight: usize,
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    #[arg(long, default_value_t = 64)]
    body_bytes: usize,
}

// The parameters each scenario reports with its results, keys in this order: the table's
// `params` line and the JSON's "parameters".

impl ThroughputArgs {
    fn params(&self) -> Value {
        json!({"rooms": self.rooms, "members": self.members, "duration_s": self.duration,
            "inflight": self.inflight, "rate_per_member": self.rate, "body_bytes": self.body_bytes})
    }
}

impl FanoutArgs {
    fn params(&self) -> Value {
        json!({"members": self.members, "senders": self.senders, "messages": self.messages,
            "rate": self.rate, "inflight": self.inflight, "body_bytes": self.body_bytes})
    }
}

impl ConnectionsArgs {
    fn params(&self) -> Value {
        json!({"count": self.count, "hold_s": self.hold, "source_ips": self.source_ips})
    }
}

impl ReconnectArgs {
    fn params(&self) -> Value {
        json!({"clients": self.clients, "rooms": self.rooms, "senders": self.senders,
            "rate_per_sender": self.rate, "phase_s": self.phase,
            "handshakes": self.handshakes})
    }
}

impl HistoryArgs {
    fn params(&self) -> Value {
        json!({"messages": self.messages, "clients": self.clients, "duration_s": self.duration})
    }
}

impl EchoArgs {
    fn params(&self) -> Value {
        json!({"connections": self.connections, "inflight": self.inflight,
            "duration_s": self.duration, "body_bytes": self.body_bytes})
    }
}

/// Runs the chosen scenario: its name, its parameters and what it measured.
async fn dispatch(cli: &Cli, bench: &Bench) -> (&'static str, Value, Result<Report, String>) {
    let mut report = Report::default();
    let (name, params, result) = match &cli.scenario {
        Scenario::Throughput(a) => (
            "throughput",
            a.params(),
            throughput::run(bench, a, cli.server_pid, &mut report).await,
        ),
        Scenario::Fanout(a) => (
            "fanout",
            a.params(),
            fanout::run(bench, a, cli.server_pid, &mut report).await,
        ),
        Scenario::Connections(a) => (
            "connections",
            a.params(),
            connections::run(bench, a, cli.server_pid, &mut report).await,
        ),
        Scenario::Reconnect(a) => (
            "reconnect",
            a.params(),
            reconnect::run(bench, a, &mut report).await,
        ),
        Scenario::History(a) => (
            "history",
            a.params(),
            history::run(bench, a, &mut report).await,
        ),
        Scenario::Echo(a) => ("echo", a.params(), echo::run(bench, a, &mut report).await),
        Scenario::EchoServer { .. } | Scenario::BroadcastServer { .. } => {
            ("server", json!({}), Ok(()))
        }
    };
    (name, params, result.map(|()| report))
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let baseline = match &cli.scenario {
        Scenario::EchoServer { bind } => Some(("echo server", echo_server::run(bind))),
        Scenario::BroadcastServer { bind } => {
            Some(("broadcast server", broadcast_server::run(bind)))
        }
        _ => None,
    };
    if let Some((name, outcome)) = baseline {
        return match outcome {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("rookery-bench: {name}: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let bench = Bench::new(&cli.url, cli.insecure);
    let system = actix::System::new();
    // Every client of a run is polled from this one task, so it runs outside tokio's
    // cooperative budget: with the budget, once 128 socket operations were spent every further
    // read answered Pending and re-woke the task, which then spun through its connections
    // without reading them (pongs went out late and the server rightly cut the connections).
    let run = tokio::task::unconstrained(dispatch(&cli, &bench));
    let (name, params, outcome) = system.block_on(run);
    let report = match outcome {
        Ok(report) => report,
        Err(e) => {
            eprintln!("rookery-bench: {name}: {e}");
            return ExitCode::FAILURE;
        }
    };
    report::print_table(name, &params, &report);
    if let Some(path) = &cli.json {
        if let Err(e) = report::write_json(path, name, &params, &report, cli.pg_url.as_deref()) {
            eprintln!("rookery-bench: writing {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    match &report.verdict {
        Some(v) if !v.is_clean() => ExitCode::FAILURE,
        _ => ExitCode::SUCCESS,
    }
}
