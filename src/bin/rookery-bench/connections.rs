//! The connections scenario: many idle authenticated connections opened and held with
//! heartbeats, measuring how long opening takes, how many fail or drop, and the server's memory
//! per connection (read from /proc with `--server-pid`). Calls `peer`.

use rookery::checker::Verdict;
use rookery::client::ClientError;
use rookery::protocol::Request;
use serde_json::json;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

use crate::peer::{all, bounded, Bench, Peer};
use crate::report::Report;
use crate::ConnectionsArgs;

pub async fn run(
    bench: &Bench,
    args: &ConnectionsArgs,
    pid: Option<u32>,
    report: &mut Report,
) -> Result<(), String> {
    // Every connection logs in (a session of its own; a shared token would make each `resume`
    // take over the one before) as one of a few users, like users with many devices. Few
    // enough to register quickly, enough that the per-user limit on parallel logins does not
    // serialize the opening.
    let users = args.count.clamp(1, 200);
    let owners = bounded(users, 100, |i| bench.login(i)).await;
    let owners: Vec<Peer> = owners.into_iter().collect::<Result<_, _>>()?;
    let logins: Vec<Request> = (0..users)
        .map(|i| bench.login_request(i))
        .collect::<Result<_, _>>()?;
    let rss_before = server_rss_kib(pid);
    let holding = Holding {
        bench,
        args,
        pid,
        started: Instant::now(),
        hold: Duration::from_secs_f64(args.hold),
        gate: Semaphore::new(args.concurrency.max(1)),
        tally: RefCell::new(Tally::default()),
    };
    let tasks = (0..args.count).map(|i| holding.hold_one(i, &logins[i % users]));
    // The held connections stay open until the server's RSS is read.
    let held = all(tasks).await;
    let rss_end = server_rss_kib(pid);
    drop(held);
    set_figures(report, args, &holding.tally.borrow(), rss_before, rss_end);
    drop(owners);
    report.verdict = Some(Verdict::default());
    Ok(())
}

fn server_rss_kib(pid: Option<u32>) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// What the connections counted together.
#[derive(Default)]
struct Tally {
    opened: usize,
    /// Connections that could not open or log in, by the first 80 characters of the error.
    failed: BTreeMap<String, u64>,
    dropped: u64,
    /// When every connection had opened or failed, since the start.
    all_open_at: Option<Duration>,
    /// The server's RSS at that moment.
    rss_open: Option<u64>,
}

/// What every connection's task shares. Each connection is read from the moment it is open (so
/// it answers the server's pings while the others are still opening); only the opening is
/// limited in concurrency, by `gate`.
struct Holding<'a> {
    bench: &'a Bench,
    args: &'a ConnectionsArgs,
    pid: Option<u32>,
    started: Instant,
    hold: Duration,
    gate: Semaphore,
    tally: RefCell<Tally>,
}

impl Holding<'_> {
    /// Opens connection `i`, logs it in with `login` and holds it until the hold ends; None if
    /// it failed to open or dropped.
    async fn hold_one(&self, i: usize, login: &Request) -> Option<Peer> {
        let permit = self.gate.acquire().await;
        let ip = IpAddr::from([
            127,
            0,
            0,
            1 + (i % usize::from(self.args.source_ips.max(1))) as u8,
        ]);
        let peer = async {
            let mut peer = self
                .bench
                .connect(&format!("c{i}"), Some(ip))
                .await
                .map_err(|e| e.to_string())?;
            peer.call_retrying(login).await?;
            Ok::<_, String>(peer)
        }
        .await;
        drop(permit);
        let mut peer = match peer {
            Ok(peer) => peer,
            Err(e) => {
                *self
                    .tally
                    .borrow_mut()
                    .failed
                    .entry(e.chars().take(80).collect())
                    .or_default() += 1;
                self.settled();
                return None;
            }
        };
        self.opened();
        // Hold it: keep reading, so it answers the server's pings, until the end.
        while self
            .tally
            .borrow()
            .all_open_at
            .is_none_or(|at| self.started.elapsed() < at + self.hold)
        {
            match peer.conn.recv_within(Duration::from_secs(1)).await {
                Ok(_) | Err(ClientError::Timeout) => {}
                Err(_) => {
                    self.tally.borrow_mut().dropped += 1;
                    return None;
                }
            }
        }
        Some(peer)
    }

    /// Counts one more open connection.
    fn opened(&self) {
        self.tally.borrow_mut().opened += 1;
        self.settled();
    }

    /// Once every connection has opened or failed (the last may be either), notes the time
    /// and the server's RSS; the hold runs from then.
    fn settled(&self) {
        let mut tally = self.tally.borrow_mut();
        if tally.opened + tally.failed.values().sum::<u64>() as usize == self.args.count {
            tally.all_open_at = Some(self.started.elapsed());
            tally.rss_open = server_rss_kib(self.pid);
        }
    }
}

fn set_figures(
    report: &mut Report,
    args: &ConnectionsArgs,
    tally: &Tally,
    rss_before: Option<u64>,
    rss_end: Option<u64>,
) {
    report.set("connections", tally.opened as u64);
    report.set(
        "open_seconds",
        tally.all_open_at.unwrap_or_default().as_secs_f64(),
    );
    report.set("failed_to_open", json!(tally.failed));
    report.set("dropped_while_held", tally.dropped);
    report.set("held_seconds", args.hold);
    if let (Some(before), Some(open), Some(end)) = (rss_before, tally.rss_open, rss_end) {
        let n = tally.opened.max(1) as f64;
        report.set("server_rss_before_kib", before);
        report.set("server_rss_open_kib", open);
        report.set("server_rss_end_kib", end);
        // The figure is taken at the end of the hold, when the connections have been idle;
        // right after opening, the allocator has not yet given back the handshakes' memory.
        report.set(
            "server_rss_per_connection_kib",
            (end.saturating_sub(before)) as f64 / n,
        );
        report.set(
            "server_rss_per_connection_at_open_kib",
            (open.saturating_sub(before)) as f64 / n,
        );
    }
}
