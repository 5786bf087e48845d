//! rookery-bench: a load tool that speaks docs/protocol.md through `rookery::client`, like any
//! client, against a running server. Each scenario is bounded in count and time, ends with the
//! history checker's verdict, prints a table and, with `--json FILE`, machine-readable results.
//! See docs/performance.md for the server setup and the commands behind the published figures.

mod echo_server;

use clap::{Args, Parser, Subcommand};
use hdrhistogram::Histogram;
use rookery::checker::{History, StoredMessage};
use rookery::client::{request, ClientError, ConnectOptions, Connection, Connector, Incoming};
use rookery::ids::Seq;
use serde_json::{json, Value};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::process::ExitCode;
use std::rc::Rc;
use std::time::{Duration, Instant};

#[derive(Debug, Parser)]
#[command(
    name = "rookery-bench",
    about = "Load and fault scenarios against a Rookery server"
)]
struct Cli {
    /// The server's WebSocket URL.
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
    #[arg(long, default_value_t = 200)]
    concurrency: usize,
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

type Shared<T> = Rc<RefCell<T>>;

fn shared<T>(value: T) -> Shared<T> {
    Rc::new(RefCell::new(value))
}

/// Microseconds from 1 µs to 10 minutes, 3 significant digits.
#[allow(clippy::expect_used)] // constant bounds that hdrhistogram accepts
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// A fraction in [0, 1) fixed by `name`, spreading members over their send interval.
fn phase(name: &str) -> f64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    name.hash(&mut hasher);
    (hasher.finish() % 1_000_000) as f64 / 1_000_000.0
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

fn summary(h: &Histogram<u64>) -> Value {
    let ms = |v: u64| (v as f64) / 1000.0;
    json!({
        "count": h.len(),
        "p50_ms": ms(h.value_at_quantile(0.50)),
        "p90_ms": ms(h.value_at_quantile(0.90)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "p999_ms": ms(h.value_at_quantile(0.999)),
        "max_ms": ms(h.max()),
    })
}

/// What one run measured.
#[derive(Default)]
struct Report {
    figures: BTreeMap<String, Value>,
    verdict: Option<rookery::checker::Verdict>,
}

impl Report {
    fn set(&mut self, key: &str, value: impl Into<Value>) {
        self.figures.insert(key.to_string(), value.into());
    }
}

struct Bench {
    url: String,
    options: ConnectOptions,
    /// One connector per source address, built once (TLS set-up is costly).
    connectors: RefCell<HashMap<Option<IpAddr>, Connector>>,
    run: String,
    epoch: Instant,
}

/// A connected client that records what the checker needs.
struct Peer {
    name: String,
    conn: Connection,
    next_id: u64,
    token: Option<String>,
}

impl Bench {
    async fn connect(&self, name: &str, local: Option<IpAddr>) -> Result<Peer, ClientError> {
        let connector = self.connectors.borrow().get(&local).cloned();
        let connector = match connector {
            Some(c) => c,
            None => {
                let mut options = self.options.clone();
                options.local_address = local;
                let c = Connector::new(&options)?;
                self.connectors.borrow_mut().insert(local, c.clone());
                c
            }
        };
        Ok(Peer {
            name: name.to_string(),
            conn: connector.connect(&self.url).await?,
            next_id: 0,
            token: None,
        })
    }

    fn user(&self, i: usize) -> String {
        format!("b{}u{i}", self.run)
    }

    fn room(&self, i: usize) -> String {
        format!("b{}r{i}", self.run)
    }

    /// A new user, registered and logged in.
    async fn login(&self, i: usize) -> Result<Peer, String> {
        let name = self.user(i);
        let mut peer = self.connect(&name, None).await.map_err(|e| e.to_string())?;
        let credentials = json!({"username": name, "password": "bench-password"});
        peer.call_retrying("register", credentials.clone()).await?;
        let reply = peer.call_retrying("login", credentials).await?;
        peer.token = reply["token"].as_str().map(str::to_string);
        Ok(peer)
    }

    /// A body carrying its send time, padded to `bytes`.
    fn body(&self, bytes: usize) -> String {
        self.body_due(bytes, Instant::now())
    }

    /// A body carrying the time its send was due, padded to `bytes`.
    fn body_due(&self, bytes: usize, due: Instant) -> String {
        let stamp = due
            .saturating_duration_since(self.epoch)
            .as_micros()
            .to_string();
        let pad = bytes.saturating_sub(stamp.len() + 1);
        format!("{stamp} {}", "x".repeat(pad))
    }

    fn sent_at(&self, body: &str) -> Option<Duration> {
        let micros: u64 = body.split(' ').next()?.parse().ok()?;
        Some(Duration::from_micros(micros))
    }

    fn latency_since(&self, body: &str) -> Option<Duration> {
        self.sent_at(body)
            .map(|sent| self.epoch.elapsed().saturating_sub(sent))
    }
}

impl Peer {
    fn id(&mut self) -> String {
        self.next_id += 1;
        format!("{}-{}", self.name, self.next_id)
    }

    /// Like `call`, but waits and retries while the server answers `rate_limited` (as a
    /// well-behaved client does when the server's bcrypt queue is full), for up to a minute.
    async fn call_retrying(&mut self, kind: &str, fields: Value) -> Result<Value, String> {
        let give_up = Instant::now() + Duration::from_secs(60);
        loop {
            match self.call(kind, fields.clone()).await {
                Err(e) if e.contains("\"rate_limited\"") && Instant::now() < give_up => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => return other,
            }
        }
    }

    /// Sends a request and waits for its reply, dropping events; Err for an error reply.
    async fn call(&mut self, kind: &str, fields: Value) -> Result<Value, String> {
        let id = self.id();
        self.conn
            .send_json(&request(&id, kind, fields))
            .await
            .map_err(|e| e.to_string())?;
        loop {
            match self.conn.next().await.map_err(|e| e.to_string())? {
                Incoming::Reply { id: got, frame } if got == id => {
                    return if frame["type"] == "ok" {
                        Ok(frame)
                    } else {
                        Err(format!("{kind}: {frame}"))
                    };
                }
                _ => {}
            }
        }
    }
}

/// Runs `count` futures made by `make`, at most `limit` at a time, collecting results in order.
/// Joins peer `i` to `room_of(i)`, one after the other; from its join on, each must receive
/// every message of its room (recorded for the checker, with the seq it joined at).
async fn join_each(
    peers: &mut [Peer],
    meter: &Shared<Meter>,
    room_of: impl Fn(usize) -> String,
) -> Result<(), String> {
    for (i, peer) in peers.iter_mut().enumerate() {
        let room = room_of(i);
        let reply = peer.call("join", json!({"room": room})).await?;
        let last = Seq(reply["room"]["last_seq"].as_i64().unwrap_or(0));
        let mut m = meter.borrow_mut();
        m.history.covers(&peer.name, &room, last, None);
        m.last_seq.insert((peer.name.clone(), room), last.0);
    }
    Ok(())
}

/// Reads and drops what set-up left queued on every connection (`joined` events: a room that
/// M members join one by one sends about M²/2 of them) until each has been quiet for a moment,
/// so that the measurement does not start behind a backlog.
async fn settle(peers: &mut [Peer]) {
    let quiet = Duration::from_millis(300);
    all(peers
        .iter_mut()
        .map(|peer| async move { while peer.conn.recv_within(quiet).await.is_ok() {} }))
    .await;
}

/// Runs `futures` together in this task, outside tokio's cooperative budget. One task polls
/// thousands of connections here; with the budget, once it was spent every further socket
/// read answered Pending and re-woke itself, and the task spun through all its connections
/// without reading them (so pongs went out late and the server cut the connections).
async fn all<F: std::future::Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    tokio::task::unconstrained(futures_util::future::join_all(futures)).await
}

async fn bounded<T, F, Fut>(count: usize, limit: usize, make: F) -> Vec<T>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    use futures_util::stream::{self, StreamExt};
    stream::iter((0..count).map(make))
        .buffered(limit.max(1))
        .collect()
        .await
}

/// Reads every stored message of `room` through `history`, for the checker.
async fn stored_history(peer: &mut Peer, room: &str) -> Result<Vec<StoredMessage>, String> {
    let mut before: Option<i64> = None;
    let mut out = Vec::new();
    loop {
        let mut fields = json!({"room": room, "limit": 100});
        if let Some(b) = before {
            fields["before"] = json!(b);
        }
        let page = peer.call("history", fields).await?;
        let messages = page["messages"].as_array().cloned().unwrap_or_default();
        for m in messages.iter().rev() {
            out.push(StoredMessage {
                seq: Seq(m["seq"].as_i64().unwrap_or(0)),
                from: m["from"].as_str().unwrap_or("").to_string(),
                client_msg_id: m["client_msg_id"].as_str().map(str::to_string),
            });
        }
        before = messages.first().and_then(|m| m["seq"].as_i64());
        if page["has_more"] != true || before.is_none() {
            break;
        }
    }
    out.reverse();
    Ok(out)
}

/// Shared measurement state of a sending scenario.
struct Meter {
    ack: Histogram<u64>,
    deliver: Histogram<u64>,
    acked: u64,
    delivered: u64,
    errors: BTreeMap<String, u64>,
    history: History,
    last_seq: HashMap<(String, String), i64>,
}

impl Meter {
    fn new() -> Self {
        Meter {
            ack: histogram(),
            deliver: histogram(),
            acked: 0,
            delivered: 0,
            errors: BTreeMap::new(),
            history: History::new(),
            last_seq: HashMap::new(),
        }
    }
}

/// How a member sends: at most `inflight` unacknowledged, paced at `rate` per second when it is
/// above 0, until `until` or `max_sends` messages, whichever comes first.
#[derive(Clone, Copy)]
struct SendPlan {
    inflight: usize,
    rate: f64,
    body_bytes: usize,
    until: Instant,
    max_sends: u64,
}

/// One member's send loop: sends by `plan`, then waits for its acks and keeps reading until
/// `quiet` passes without a frame; records acks, errors and deliveries.
async fn member_loop(
    bench: &Bench,
    peer: &mut Peer,
    room: &str,
    meter: &Shared<Meter>,
    plan: SendPlan,
    quiet: Duration,
) {
    let mut pending: HashMap<String, (Instant, String)> = HashMap::new();
    let interval = (plan.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / plan.rate));
    // Members start at spread-out phases of their interval: starting all at once would send
    // every member's message in one burst per interval and measure the burst, not the rate.
    let mut next_send =
        Instant::now() + interval.map_or(Duration::ZERO, |step| step.mul_f64(phase(&peer.name)));
    let mut sent = 0u64;
    let mut last_frame = Instant::now();
    loop {
        let now = Instant::now();
        let sending = now < plan.until && sent < plan.max_sends;
        while sending
            && pending.len() < plan.inflight
            && interval.is_none_or(|_| Instant::now() >= next_send)
        {
            sent += 1;
            let key = format!("{}-m{sent}", peer.name);
            let id = peer.id();
            // At a fixed rate latency counts from when the send was due, so a send held back
            // by the in-flight bound is not measured as fast (no coordinated omission).
            let due = if interval.is_some() {
                next_send
            } else {
                Instant::now()
            };
            let frame = request(
                &id,
                "send",
                json!({"room": room, "body": bench.body_due(plan.body_bytes, due), "client_msg_id": key}),
            );
            if peer.conn.send_json(&frame).await.is_err() {
                return;
            }
            meter
                .borrow_mut()
                .history
                .sent(&peer.name, &peer.name, room, &key);
            pending.insert(id, (due, key));
            if let Some(step) = interval {
                next_send += step;
            }
        }
        if !sending && pending.is_empty() && last_frame.elapsed() >= quiet {
            return;
        }
        let wait = if sending {
            match interval {
                Some(_) if pending.len() < plan.inflight => {
                    next_send.saturating_duration_since(Instant::now())
                }
                _ => plan.until.saturating_duration_since(Instant::now()),
            }
        } else {
            quiet
        }
        .max(Duration::from_millis(1));
        let frame = match peer.conn.recv_within(wait).await {
            Ok(frame) => frame,
            Err(ClientError::Timeout) => {
                if !sending && pending.is_empty() {
                    return;
                }
                if !sending && last_frame.elapsed() > Duration::from_secs(30) {
                    return;
                }
                continue;
            }
            Err(_) => return,
        };
        last_frame = Instant::now();
        let mut m = meter.borrow_mut();
        match rookery::client::classify(frame) {
            Incoming::Reply { id, frame } => {
                let Some((started, key)) = pending.remove(&id) else {
                    continue;
                };
                if frame["type"] == "ok" {
                    m.acked += 1;
                    let _ = m.ack.record(micros(started.elapsed()));
                    let seq = Seq(frame["seq"].as_i64().unwrap_or(0));
                    m.history.acked(&peer.name, &peer.name, room, &key, seq);
                } else {
                    let code = frame["code"].as_str().unwrap_or("?").to_string();
                    m.history.failed(&peer.name, &peer.name, room, &key, &code);
                    *m.errors.entry(code).or_default() += 1;
                }
            }
            Incoming::Event(event) if event["type"] == "message" => {
                m.delivered += 1;
                if let Some(latency) = event["body"].as_str().and_then(|b| bench.latency_since(b)) {
                    let _ = m.deliver.record(micros(latency));
                }
                let seq = event["seq"].as_i64().unwrap_or(0);
                m.history.received(&peer.name, room, Seq(seq));
                m.last_seq
                    .insert((peer.name.clone(), room.to_string()), seq);
            }
            Incoming::Event(_) => {}
        }
    }
}

async fn throughput(
    bench: &Bench,
    args: &ThroughputArgs,
    report: &mut Report,
) -> Result<(), String> {
    let total = args.rooms * args.members;
    let peers = bounded(total, 100, |i| bench.login(i)).await;
    let mut peers: Vec<Peer> = peers.into_iter().collect::<Result<_, _>>()?;
    for r in 0..args.rooms {
        peers[r * args.members]
            .call(
                "create_room",
                json!({"room": bench.room(r), "kind": "public"}),
            )
            .await?;
    }
    let meter = shared(Meter::new());
    join_each(&mut peers, &meter, |i| bench.room(i / args.members)).await?;
    settle(&mut peers).await;
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.duration);
    let loops = peers.iter_mut().enumerate().map(|(i, peer)| {
        let room = bench.room(i / args.members);
        let meter = meter.clone();
        async move {
            let plan = SendPlan {
                inflight: args.inflight,
                rate: args.rate,
                body_bytes: args.body_bytes,
                until: deadline,
                max_sends: u64::MAX,
            };
            member_loop(bench, peer, &room, &meter, plan, Duration::from_secs(2)).await
        }
    });
    all(loops).await;
    let elapsed = started
        .elapsed()
        .as_secs_f64()
        .min(args.duration.max(0.001));
    {
        let m = meter.borrow();
        report.set("acked_per_s", m.acked as f64 / elapsed);
        report.set("delivered_per_s", m.delivered as f64 / elapsed);
        report.set("acked", m.acked);
        report.set("delivered", m.delivered);
        report.set("send_to_ack", summary(&m.ack));
        report.set("send_to_deliver", summary(&m.deliver));
        report.set("errors", json!(m.errors));
    }
    report.verdict = Some(
        verdict(
            bench,
            &mut peers[0],
            (0..args.rooms).map(|r| bench.room(r)),
            &meter,
        )
        .await?,
    );
    Ok(())
}

async fn verdict(
    _bench: &Bench,
    reader: &mut Peer,
    rooms: impl Iterator<Item = String>,
    meter: &Shared<Meter>,
) -> Result<rookery::checker::Verdict, String> {
    let mut stored = BTreeMap::new();
    for room in rooms {
        let messages = stored_history(reader, &room).await?;
        stored.insert(room, messages);
    }
    Ok(meter.borrow().history.verdict(&stored))
}

async fn fanout(bench: &Bench, args: &FanoutArgs, report: &mut Report) -> Result<(), String> {
    let peers = bounded(args.members, 100, |i| bench.login(i)).await;
    let mut peers: Vec<Peer> = peers.into_iter().collect::<Result<_, _>>()?;
    let room = bench.room(0);
    peers[0]
        .call("create_room", json!({"room": room, "kind": "public"}))
        .await?;
    let meter = shared(Meter::new());
    let senders = args.senders.clamp(1, args.members);
    for (i, peer) in peers.iter_mut().enumerate() {
        let reply = peer.call("join", json!({"room": room})).await?;
        let last = Seq(reply["room"]["last_seq"].as_i64().unwrap_or(0));
        // Senders only send; the other members must receive everything.
        if i >= senders {
            meter
                .borrow_mut()
                .history
                .covers(&peer.name, &room, last, None);
        }
    }
    settle(&mut peers).await;
    // Per seq: the latest delivery time across members, for latency to the last member.
    let last_delivery: Shared<HashMap<i64, Duration>> = shared(HashMap::new());
    let per_sender = args.messages.div_ceil(senders);
    let rate = if args.rate > 0.0 {
        args.rate / senders as f64
    } else {
        0.0
    };
    let started = Instant::now();
    let (sending, listening) = peers.split_at_mut(senders);
    let send_loops = sending.iter_mut().map(|peer| {
        let meter = meter.clone();
        let room = room.clone();
        async move {
            // Senders are members too; they stop after their share of the messages.
            let plan = SendPlan {
                inflight: args.inflight,
                rate,
                body_bytes: args.body_bytes,
                until: Instant::now() + Duration::from_secs(3600),
                max_sends: per_sender as u64,
            };
            member_loop(bench, peer, &room, &meter, plan, Duration::from_secs(2)).await
        }
    });
    let expected = (per_sender * senders) as u64;
    let listen_loops = listening.iter_mut().map(|peer| {
        let meter = meter.clone();
        let last_delivery = last_delivery.clone();
        let room = room.clone();
        async move { fanout_listener(bench, peer, &room, &meter, &last_delivery, expected).await }
    });
    tokio::task::unconstrained(futures_util::future::join(
        all(send_loops),
        all(listen_loops),
    ))
    .await;
    let elapsed = started.elapsed().as_secs_f64();
    let mut to_last = histogram();
    for (_, at) in last_delivery.borrow().iter() {
        let _ = to_last.record(micros(*at));
    }
    {
        let m = meter.borrow();
        report.set("deliveries_per_s", m.delivered as f64 / elapsed);
        report.set("delivered", m.delivered);
        report.set("acked", m.acked);
        report.set("send_to_deliver", summary(&m.deliver));
        report.set("send_to_deliver_last_member", summary(&to_last));
        report.set("send_to_ack", summary(&m.ack));
        report.set("errors", json!(m.errors));
    }
    report.verdict = Some(verdict(bench, &mut peers[0], std::iter::once(room), &meter).await?);
    Ok(())
}

async fn fanout_listener(
    bench: &Bench,
    peer: &mut Peer,
    room: &str,
    meter: &Shared<Meter>,
    last_delivery: &Shared<HashMap<i64, Duration>>,
    expected: u64,
) {
    let mut got = 0;
    while got < expected {
        let Ok(frame) = peer.conn.recv_within(Duration::from_secs(60)).await else {
            return;
        };
        if frame["type"] != "message" {
            continue;
        }
        got += 1;
        let seq = frame["seq"].as_i64().unwrap_or(0);
        let latency = frame["body"].as_str().and_then(|b| bench.latency_since(b));
        let mut m = meter.borrow_mut();
        m.delivered += 1;
        m.history.received(&peer.name, room, Seq(seq));
        if let Some(latency) = latency {
            let _ = m.deliver.record(micros(latency));
            let mut last = last_delivery.borrow_mut();
            let entry = last.entry(seq).or_default();
            *entry = (*entry).max(latency);
        }
    }
}

fn server_rss_kib(pid: Option<u32>) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

async fn connections(
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
    let rss_before = server_rss_kib(pid);
    let started = Instant::now();
    // Each connection is read from the moment it is open (so it answers the server's pings
    // while the others are still opening); only the opening is limited in concurrency.
    let gate = std::rc::Rc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
    let opened = shared(0usize);
    let failed: Shared<BTreeMap<String, u64>> = shared(BTreeMap::new());
    let dropped = shared(0u64);
    let all_open_at: Shared<Option<Duration>> = shared(None);
    let rss_open: Shared<Option<u64>> = shared(None);
    let hold = Duration::from_secs_f64(args.hold);
    let tasks = (0..args.count).map(|i| {
        let credentials = json!({"username": bench.user(i % users), "password": "bench-password"});
        let (gate, opened, failed, dropped) = (
            gate.clone(),
            opened.clone(),
            failed.clone(),
            dropped.clone(),
        );
        let (all_open_at, rss_open) = (all_open_at.clone(), rss_open.clone());
        async move {
            let permit = gate.acquire().await;
            let ip = IpAddr::from([
                127,
                0,
                0,
                1 + (i % usize::from(args.source_ips.max(1))) as u8,
            ]);
            let peer = async {
                let mut peer = bench
                    .connect(&format!("c{i}"), Some(ip))
                    .await
                    .map_err(|e| e.to_string())?;
                peer.call_retrying("login", credentials).await?;
                Ok::<_, String>(peer)
            }
            .await;
            drop(permit);
            let mut peer = match peer {
                Ok(peer) => peer,
                Err(e) => {
                    *failed
                        .borrow_mut()
                        .entry(e.chars().take(80).collect())
                        .or_default() += 1;
                    return None;
                }
            };
            *opened.borrow_mut() += 1;
            if *opened.borrow() + failed.borrow().values().sum::<u64>() as usize == args.count {
                *all_open_at.borrow_mut() = Some(started.elapsed());
                *rss_open.borrow_mut() = server_rss_kib(pid);
            }
            // Hold it: keep reading, so it answers the server's pings, until the end.
            while all_open_at
                .borrow()
                .is_none_or(|at| started.elapsed() < at + hold)
            {
                match peer.conn.recv_within(Duration::from_secs(1)).await {
                    Ok(_) | Err(ClientError::Timeout) => {}
                    Err(_) => {
                        *dropped.borrow_mut() += 1;
                        return None;
                    }
                }
            }
            Some(peer)
        }
    });
    // The held connections stay open until the server's RSS is read.
    let held = all(tasks).await;
    let peers_len = *opened.borrow();
    let open_time = all_open_at.borrow().unwrap_or_default();
    let failed = failed.borrow().clone();
    let rss_open = *rss_open.borrow();
    let rss_end = server_rss_kib(pid);
    drop(held);
    report.set("connections", peers_len as u64);
    report.set("open_seconds", open_time.as_secs_f64());
    report.set("failed_to_open", json!(failed));
    report.set("dropped_while_held", *dropped.borrow());
    report.set("held_seconds", args.hold);
    if let (Some(before), Some(open), Some(end)) = (rss_before, rss_open, rss_end) {
        let n = peers_len.max(1) as f64;
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
    drop(owners);
    report.verdict = Some(rookery::checker::Verdict::default());
    Ok(())
}

async fn reconnect(bench: &Bench, args: &ReconnectArgs, report: &mut Report) -> Result<(), String> {
    let rooms: Vec<String> = (0..args.rooms).map(|r| bench.room(r)).collect();
    let total = args.clients + args.senders;
    let peers = bounded(total, args.concurrency, |i| bench.login(i)).await;
    let mut peers: Vec<Peer> = peers.into_iter().collect::<Result<_, _>>()?;
    for room in &rooms {
        peers[0]
            .call("create_room", json!({"room": room, "kind": "public"}))
            .await?;
    }
    let meter = shared(Meter::new());
    let room_of = |i: usize| rooms[i % rooms.len()].clone();
    join_each(&mut peers, &meter, room_of).await?;
    let (senders, clients) = peers.split_at_mut(args.senders);
    let phase = Duration::from_secs_f64(args.phase);
    let send_until = Instant::now() + phase * 2;
    let drop_at = Instant::now() + phase;
    let back_times = shared(Vec::<Duration>::new());
    let failures = shared(BTreeMap::<String, u64>::new());
    let restored_count = shared(0u64);
    let send_loops = senders.iter_mut().enumerate().map(|(i, peer)| {
        let room = room_of(i);
        let meter = meter.clone();
        async move {
            let plan = SendPlan {
                inflight: 1,
                rate: args.rate,
                body_bytes: 64,
                until: send_until,
                max_sends: u64::MAX,
            };
            member_loop(bench, peer, &room, &meter, plan, Duration::from_secs(2)).await
        }
    });
    let client_loops = clients.iter_mut().enumerate().map(|(i, peer)| {
        let room = room_of(i + args.senders);
        let meter = meter.clone();
        let back_times = back_times.clone();
        let failures = failures.clone();
        let restored_count = restored_count.clone();
        async move {
            // Listen until the drop, then cut the TCP connection without a close frame.
            listen(bench, peer, &room, &meter, drop_at).await;
            let dropped = Instant::now();
            let token = peer.token.clone().unwrap_or_default();
            let back = async {
                let fresh = bench
                    .connect(&peer.name, None)
                    .await
                    .map_err(|e| e.to_string())?;
                // Cut the old connection without a close frame, as a network loss would.
                drop(std::mem::replace(&mut peer.conn, fresh.conn));
                let reply = peer.call("resume", json!({"token": token})).await?;
                let restored = reply["rooms"].as_array().is_some_and(|r| !r.is_empty());
                let after = meter
                    .borrow()
                    .last_seq
                    .get(&(peer.name.clone(), room.clone()))
                    .copied()
                    .unwrap_or(0);
                let reply = peer
                    .call("join", json!({"room": room, "after": after}))
                    .await?;
                for m in reply["missed"].as_array().cloned().unwrap_or_default() {
                    let seq = m["seq"].as_i64().unwrap_or(0);
                    meter
                        .borrow_mut()
                        .history
                        .received(&peer.name, &room, Seq(seq));
                }
                if reply["truncated"] == true {
                    return Err("missed was truncated".to_string());
                }
                Ok::<_, String>(restored)
            };
            match back.await {
                Ok(restored) => {
                    back_times.borrow_mut().push(dropped.elapsed());
                    if restored {
                        *restored_count.borrow_mut() += 1;
                    }
                    listen(
                        bench,
                        peer,
                        &room,
                        &meter,
                        send_until + Duration::from_secs(2),
                    )
                    .await;
                }
                Err(e) => *failures.borrow_mut().entry(e).or_default() += 1,
            }
        }
    });
    tokio::task::unconstrained(futures_util::future::join(
        all(send_loops),
        all(client_loops),
    ))
    .await;
    let (all_back, back) = {
        let times = back_times.borrow();
        (
            times.iter().max().copied().unwrap_or_default(),
            times.len() as u64,
        )
    };
    report.set("clients", args.clients as u64);
    report.set("back", back);
    report.set("resumed_with_rooms", *restored_count.borrow());
    report.set("all_back_seconds", all_back.as_secs_f64());
    report.set("failures", json!(*failures.borrow()));
    {
        let m = meter.borrow();
        report.set("acked", m.acked);
        report.set("errors", json!(m.errors));
    }
    report.verdict = Some(verdict(bench, &mut peers[0], rooms.iter().cloned(), &meter).await?);
    Ok(())
}

/// Records message events until `until`.
async fn listen(bench: &Bench, peer: &mut Peer, room: &str, meter: &Shared<Meter>, until: Instant) {
    while Instant::now() < until {
        let Ok(frame) = peer
            .conn
            .recv_within(
                until
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            )
            .await
        else {
            continue;
        };
        if frame["type"] == "message" {
            let seq = frame["seq"].as_i64().unwrap_or(0);
            let mut m = meter.borrow_mut();
            m.delivered += 1;
            m.history.received(&peer.name, room, Seq(seq));
            m.last_seq
                .insert((peer.name.clone(), room.to_string()), seq);
            if let Some(latency) = frame["body"].as_str().and_then(|b| bench.latency_since(b)) {
                let _ = m.deliver.record(micros(latency));
            }
        }
    }
}

async fn history(bench: &Bench, args: &HistoryArgs, report: &mut Report) -> Result<(), String> {
    let mut writer = bench.login(0).await?;
    let room = bench.room(0);
    writer
        .call("create_room", json!({"room": room, "kind": "public"}))
        .await?;
    writer.call("join", json!({"room": room})).await?;
    // Fill the room, pipelined.
    let mut sent = 0;
    let mut acked = 0;
    while acked < args.messages {
        while sent < args.messages && sent - acked < 64 {
            sent += 1;
            let id = writer.id();
            let frame = request(
                &id,
                "send",
                json!({"room": room, "body": bench.body(200), "client_msg_id": format!("h{sent}")}),
            );
            writer
                .conn
                .send_json(&frame)
                .await
                .map_err(|e| e.to_string())?;
        }
        if let Incoming::Reply { frame, .. } =
            writer.conn.next().await.map_err(|e| e.to_string())?
        {
            if frame["type"] != "ok" {
                return Err(format!("filling the room: {frame}"));
            }
            acked += 1;
        }
    }
    let readers = bounded(args.clients, 50, |i| bench.login(i + 1)).await;
    let mut readers: Vec<Peer> = readers.into_iter().collect::<Result<_, _>>()?;
    let latency = shared(histogram());
    let pages = shared(0u64);
    let bad = shared(0u64);
    let deadline = Instant::now() + Duration::from_secs_f64(args.duration);
    let newest = args.messages as i64;
    let started = Instant::now();
    let loops = readers.iter_mut().enumerate().map(|(i, peer)| {
        let (latency, pages, bad, room) =
            (latency.clone(), pages.clone(), bad.clone(), room.clone());
        async move {
            let mut n = i as i64 * 7919;
            while Instant::now() < deadline {
                // Pages below the ring buffer: before in 51..=newest-100.
                n = (n * 48271 + 11) % 2_147_483_647;
                let span = (newest - 150).max(1);
                let before = 51 + n.rem_euclid(span);
                let asked = Instant::now();
                match peer
                    .call(
                        "history",
                        json!({"room": room, "before": before, "limit": 50}),
                    )
                    .await
                {
                    Ok(page) if page["messages"].as_array().is_some_and(|m| m.len() == 50) => {
                        let _ = latency.borrow_mut().record(micros(asked.elapsed()));
                        *pages.borrow_mut() += 1;
                    }
                    _ => *bad.borrow_mut() += 1,
                }
            }
        }
    });
    all(loops).await;
    let elapsed = started.elapsed().as_secs_f64();
    report.set("pages_per_s", *pages.borrow() as f64 / elapsed);
    report.set("pages", *pages.borrow());
    report.set("bad_pages", *bad.borrow());
    report.set("latency", summary(&latency.borrow()));
    let stored = stored_history(&mut writer, &room).await?;
    let mut checker = History::new();
    for i in 1..=args.messages {
        checker.sent("w", &writer.name, &room, &format!("h{i}"));
    }
    for m in &stored {
        if let Some(key) = &m.client_msg_id {
            checker.acked("w", &writer.name, &room, key, m.seq);
        }
    }
    report.verdict = Some(checker.verdict(&BTreeMap::from([(room, stored)])));
    Ok(())
}

async fn echo(bench: &Bench, args: &EchoArgs, report: &mut Report) -> Result<(), String> {
    let conns = bounded(args.connections, 50, |i| async move {
        bench.connect(&format!("e{i}"), None).await
    })
    .await;
    let mut conns: Vec<Peer> = conns
        .into_iter()
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let body = "x".repeat(args.body_bytes);
    let deadline = Instant::now() + Duration::from_secs_f64(args.duration);
    let frames = shared(0u64);
    let started = Instant::now();
    let loops = conns.iter_mut().map(|peer| {
        let (frames, body) = (frames.clone(), body.clone());
        async move {
            let mut pending = 0;
            loop {
                while Instant::now() < deadline && pending < args.inflight {
                    if peer
                        .conn
                        .send_text(format!("{{\"b\":\"{body}\"}}"))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    pending += 1;
                }
                if pending == 0 {
                    return;
                }
                if peer.conn.recv_within(Duration::from_secs(5)).await.is_err() {
                    return;
                }
                pending -= 1;
                *frames.borrow_mut() += 1;
            }
        }
    });
    all(loops).await;
    report.set(
        "frames_per_s",
        *frames.borrow() as f64 / started.elapsed().as_secs_f64(),
    );
    report.set("frames", *frames.borrow());
    Ok(())
}

fn machine(pg_url: Option<&str>) -> Value {
    let memory_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    });
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mut out = json!({"cores": cores, "memory_kib": memory_kib});
    if let Some(url) = pg_url {
        out["postgres"] = postgres_settings(url);
    }
    out
}

fn postgres_settings(url: &str) -> Value {
    use diesel::prelude::*;
    #[derive(QueryableByName)]
    struct Setting {
        #[diesel(sql_type = diesel::sql_types::Text)]
        name: String,
        #[diesel(sql_type = diesel::sql_types::Text)]
        setting: String,
    }
    let Ok(mut conn) = diesel::PgConnection::establish(url) else {
        return json!("unreachable");
    };
    let rows = diesel::sql_query(
        "SELECT name, setting FROM pg_settings WHERE name IN ('server_version', 'synchronous_commit', \
         'fsync', 'shared_buffers', 'max_connections', 'wal_level', 'commit_delay')",
    )
    .load::<Setting>(&mut conn)
    .unwrap_or_default();
    Value::Object(
        rows.into_iter()
            .map(|r| (r.name, Value::from(r.setting)))
            .collect(),
    )
}

fn print_table(scenario: &str, params: &Value, report: &Report) {
    println!("scenario  {scenario}");
    println!("params    {params}");
    for (key, value) in &report.figures {
        match value {
            Value::Number(n) => match n.as_f64() {
                Some(f) if f.fract() != 0.0 => println!("{key:<34} {f:>14.1}"),
                _ => println!("{key:<34} {n:>14}"),
            },
            Value::Object(o) if o.contains_key("p99_ms") => println!(
                "{key:<34} p50 {:>7.2} p90 {:>7.2} p99 {:>7.2} p99.9 {:>7.2} max {:>8.2} ms (n={})",
                o["p50_ms"].as_f64().unwrap_or(0.0),
                o["p90_ms"].as_f64().unwrap_or(0.0),
                o["p99_ms"].as_f64().unwrap_or(0.0),
                o["p999_ms"].as_f64().unwrap_or(0.0),
                o["max_ms"].as_f64().unwrap_or(0.0),
                o["count"]
            ),
            other => println!("{key:<34} {other}"),
        }
    }
    match &report.verdict {
        Some(v) => println!(
            "verdict   {}",
            if v.is_clean() {
                format!("clean ({v})")
            } else {
                format!("NOT CLEAN: {v}")
            }
        ),
        None => println!("verdict   (not applicable)"),
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    if let Scenario::EchoServer { bind } = &cli.scenario {
        return match echo_server::run(bind) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("rookery-bench: echo server: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let bench = Bench {
        url: cli.url.clone(),
        options: ConnectOptions {
            insecure: cli.insecure,
            timeout: Some(Duration::from_secs(30)),
            ..ConnectOptions::default()
        },
        connectors: RefCell::new(HashMap::new()),
        run: format!("{:x}", uuid::Uuid::new_v4().as_u128() & 0xffff_ffff),
        epoch: Instant::now(),
    };
    let system = actix::System::new();
    let (name, params, outcome) = system.block_on(async {
        let mut report = Report::default();
        let (name, params, result) = match &cli.scenario {
            Scenario::Throughput(a) => ("throughput", json!({"rooms": a.rooms, "members": a.members, "duration_s": a.duration, "inflight": a.inflight, "rate_per_member": a.rate, "body_bytes": a.body_bytes}), throughput(&bench, a, &mut report).await),
            Scenario::Fanout(a) => ("fanout", json!({"members": a.members, "senders": a.senders, "messages": a.messages, "rate": a.rate, "inflight": a.inflight, "body_bytes": a.body_bytes}), fanout(&bench, a, &mut report).await),
            Scenario::Connections(a) => ("connections", json!({"count": a.count, "hold_s": a.hold, "source_ips": a.source_ips}), connections(&bench, a, cli.server_pid, &mut report).await),
            Scenario::Reconnect(a) => ("reconnect", json!({"clients": a.clients, "rooms": a.rooms, "senders": a.senders, "rate_per_sender": a.rate, "phase_s": a.phase}), reconnect(&bench, a, &mut report).await),
            Scenario::History(a) => ("history", json!({"messages": a.messages, "clients": a.clients, "duration_s": a.duration}), history(&bench, a, &mut report).await),
            Scenario::Echo(a) => ("echo", json!({"connections": a.connections, "inflight": a.inflight, "duration_s": a.duration, "body_bytes": a.body_bytes}), echo(&bench, a, &mut report).await),
            Scenario::EchoServer { .. } => ("echo-server", json!({}), Ok(())),
        };
        (name, params, result.map(|()| report))
    });
    let report = match outcome {
        Ok(report) => report,
        Err(e) => {
            eprintln!("rookery-bench: {name}: {e}");
            return ExitCode::FAILURE;
        }
    };
    print_table(name, &params, &report);
    if let Some(path) = &cli.json {
        let out = json!({
            "scenario": name,
            "parameters": params,
            "figures": report.figures,
            "verdict": report.verdict.as_ref().map(|v| json!({
                "clean": v.is_clean(), "acked": v.acked, "delivered": v.delivered,
                "lost": v.lost.len(), "duplicated": v.duplicated.len(), "reordered": v.reordered.len(),
                "gaps": v.gaps.len(), "phantom": v.phantom.len(),
            })),
            "machine": machine(cli.pg_url.as_deref()),
        });
        if let Err(e) = std::fs::write(path, format!("{out:#}\n")) {
            eprintln!("rookery-bench: writing {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    match &report.verdict {
        Some(v) if !v.is_clean() => ExitCode::FAILURE,
        _ => ExitCode::SUCCESS,
    }
}
