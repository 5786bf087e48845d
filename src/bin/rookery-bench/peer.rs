//! The bench's clients: [`Bench`] (the server to reach, the run's names and clock) and
//! [`Peer`] (one connection with its request ids), the request/reply round trip built from
//! the protocol's typed [`Request`], and helpers to run many peers at once in one task.
//! Calls only `rookery::client` and the network; records nothing for the checker.

use rookery::checker::StoredMessage;
use rookery::client::{Backoff, ClientError, ConnectOptions, Connection, Connector, Incoming};
use rookery::ids::Seq;
use rookery::protocol::{Request, RoomKind, RoomName, Username};
use rookery::secret::Secret;
use std::cell::RefCell;
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// The password of every bench user.
const PASSWORD: &str = "bench-password";

pub struct Bench {
    /// The nodes' URLs; connections go to them in turn.
    urls: Vec<String>,
    next_url: std::cell::Cell<usize>,
    options: ConnectOptions,
    /// One connector per source address, built once (TLS set-up is costly).
    connectors: RefCell<HashMap<Option<IpAddr>, Connector>>,
    /// Makes this run's user and room names unique.
    run: String,
    /// The clock that message bodies carry their send time on.
    epoch: Instant,
}

/// A connected client that records what the checker needs.
pub struct Peer {
    pub name: String,
    pub conn: Connection,
    next_id: u64,
    pub token: Option<Secret>,
}

impl Bench {
    /// `urls`: one URL, or several separated by commas (the nodes of a cluster).
    pub fn new(urls: &str, insecure: bool) -> Bench {
        Bench {
            urls: urls
                .split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .map(String::from)
                .collect(),
            next_url: std::cell::Cell::new(0),
            options: ConnectOptions {
                insecure,
                timeout: Some(Duration::from_secs(30)),
                ..ConnectOptions::default()
            },
            connectors: RefCell::new(HashMap::new()),
            run: format!("{:x}", uuid::Uuid::new_v4().as_u128() & 0xffff_ffff),
            epoch: Instant::now(),
        }
    }

    pub async fn connect(&self, name: &str, local: Option<IpAddr>) -> Result<Peer, ClientError> {
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
            conn: connector.connect(self.next_url()).await?,
            next_id: 0,
            token: None,
        })
    }

    /// The URL of the next connection: the nodes in turn.
    fn next_url(&self) -> &str {
        let i = self.next_url.get();
        self.next_url.set(i.wrapping_add(1));
        self.urls
            .get(i % self.urls.len().max(1))
            .map_or("", String::as_str)
    }

    /// Connects, retrying for up to a minute with jittered exponential backoff, as a real
    /// client does when a busy server drops its connection attempt.
    pub async fn connect_retrying(&self, name: &str) -> Result<Peer, String> {
        let give_up = Instant::now() + Duration::from_secs(60);
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(3));
        loop {
            match self.connect(name, None).await {
                Ok(peer) => return Ok(peer),
                Err(e) if Instant::now() >= give_up => return Err(e.to_string()),
                Err(_) => tokio::time::sleep(backoff.next_wait()).await,
            }
        }
    }

    /// How many of the run's TLS handshakes resumed an earlier session.
    pub fn tls_resumed(&self) -> u64 {
        self.connectors
            .borrow()
            .values()
            .map(Connector::tls_resumed)
            .sum()
    }

    /// The name of this run's user `i`.
    pub fn username(&self, i: usize) -> Result<Username, String> {
        let name = format!("b{}u{i}", self.run);
        Username::parse(name.as_str()).map_err(|e| format!("{name}: {e}"))
    }

    /// The name of this run's room `i`.
    pub fn room(&self, i: usize) -> Result<RoomName, String> {
        let name = format!("b{}r{i}", self.run);
        RoomName::parse(name.as_str()).map_err(|e| format!("{name}: {e}"))
    }

    /// Logging in as this run's user `i`.
    pub fn login_request(&self, i: usize) -> Result<Request, String> {
        Ok(Request::Login {
            username: self.username(i)?,
            password: Secret::new(PASSWORD),
        })
    }

    /// A new user, registered and logged in.
    pub async fn login(&self, i: usize) -> Result<Peer, String> {
        // A connection the server closes before its login is through (it waited too long for
        // a password check and hit the authentication timeout) starts over on a new one.
        let give_up = Instant::now() + Duration::from_secs(120);
        loop {
            match self.try_login(i).await {
                Err(e) if e.contains("closed") && Instant::now() < give_up => continue,
                done => return done,
            }
        }
    }

    async fn try_login(&self, i: usize) -> Result<Peer, String> {
        let username = self.username(i)?;
        let mut peer = self.connect_retrying(username.as_str()).await?;
        let register = Request::Register {
            username: username.clone(),
            password: Secret::new(PASSWORD),
        };
        match peer.call_retrying(&register).await {
            // Registered on an earlier try.
            Err(e) if e.contains("\"conflict\"") => {}
            other => {
                other?;
            }
        }
        let login = Request::Login {
            username,
            password: Secret::new(PASSWORD),
        };
        let reply = peer.call_retrying(&login).await?;
        peer.token = reply["token"].as_str().map(Secret::new);
        Ok(peer)
    }

    /// A body carrying its send time, padded to `bytes`.
    pub fn body(&self, bytes: usize) -> String {
        self.body_due(bytes, Instant::now())
    }

    /// A body carrying the time its send was due, padded to `bytes`.
    pub fn body_due(&self, bytes: usize, due: Instant) -> String {
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

    /// How long ago the message with `body` was sent (or due).
    pub fn latency_since(&self, body: &str) -> Option<Duration> {
        self.sent_at(body)
            .map(|sent| self.epoch.elapsed().saturating_sub(sent))
    }
}

impl Peer {
    /// The next request id: `{name}-{n}`.
    pub fn id(&mut self) -> String {
        self.next_id += 1;
        format!("{}-{}", self.name, self.next_id)
    }

    /// Creates the public room `room`.
    pub async fn create_room(&mut self, room: &RoomName) -> Result<serde_json::Value, String> {
        let create = Request::CreateRoom {
            room: room.clone(),
            kind: RoomKind::Public,
            members: Vec::new(),
        };
        self.call(&create).await
    }

    /// Joins `room`, receiving its messages from now on.
    pub async fn join(&mut self, room: &RoomName) -> Result<serde_json::Value, String> {
        let join = Request::Join {
            room: room.clone(),
            after: None,
        };
        self.call(&join).await
    }

    /// Like `call`, but waits and retries while the server answers `rate_limited` (as a
    /// well-behaved client does when the server's bcrypt queue is full), for up to a minute.
    pub async fn call_retrying(&mut self, request: &Request) -> Result<serde_json::Value, String> {
        let give_up = Instant::now() + Duration::from_secs(60);
        loop {
            match self.call(request).await {
                Err(e) if e.contains("\"rate_limited\"") && Instant::now() < give_up => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => return other,
            }
        }
    }

    /// Sends a request and waits for its reply, dropping events; Err for an error reply, with
    /// the request's type and the reply's frame.
    pub async fn call(&mut self, request: &Request) -> Result<serde_json::Value, String> {
        let id = self.id();
        self.conn
            .send_request(&id, request)
            .await
            .map_err(|e| e.to_string())?;
        loop {
            match self.conn.next().await.map_err(|e| e.to_string())? {
                Incoming::Reply { id: got, frame } if got == id => {
                    return if frame["type"] == "ok" {
                        Ok(frame)
                    } else {
                        Err(format!("{}: {frame}", request.kind().name()))
                    };
                }
                _ => {}
            }
        }
    }
}

/// Reads and drops what set-up left queued on every connection (`joined` events: a room that
/// M members join one by one sends about M²/2 of them) until each has been quiet for a moment,
/// so that the measurement does not start behind a backlog.
pub async fn settle(peers: &mut [Peer]) {
    let quiet = Duration::from_millis(300);
    all(peers
        .iter_mut()
        .map(|peer| async move { while peer.conn.recv_within(quiet).await.is_ok() {} }))
    .await;
}

/// Runs `futures` together in this task.
pub async fn all<F: std::future::Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    futures_util::future::join_all(futures).await
}

/// Runs `count` futures made by `make`, at most `limit` at a time, collecting results in order.
pub async fn bounded<T, F, Fut>(count: usize, limit: usize, make: F) -> Vec<T>
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

/// How often set-up answers the pings of the connections it has already opened.
const TEND_EVERY: Duration = Duration::from_secs(2);

/// Logs in `count` new users, `limit` at a time. While the rest are set up, the connections
/// already open are tended (see [`tend`]): set-up of thousands takes longer than the server's
/// heartbeat timeout, and a connection that nobody reads never answers a ping.
pub async fn login_all(bench: &Bench, count: usize, limit: usize) -> Result<Vec<Peer>, String> {
    use futures_util::stream::{self, StreamExt};
    let mut logins = stream::iter((0..count).map(|i| bench.login(i))).buffered(limit.max(1));
    let mut peers = Vec::with_capacity(count);
    let mut tended = Instant::now();
    while let Some(peer) = logins.next().await {
        peers.push(peer?);
        if tended.elapsed() >= TEND_EVERY {
            tend(&mut peers).await;
            tended = Instant::now();
        }
    }
    Ok(peers)
}

/// Reads what has already arrived on each connection, answering pings and dropping events
/// (set-up sends no messages, so nothing the meter counts is lost).
pub async fn tend(peers: &mut [Peer]) {
    use futures_util::FutureExt;
    // Polled once each, without a timer: a zero timeout would cost every connection a turn of
    // the runtime (about a millisecond), and a pass over 8,000 of them stalled set-up for
    // longer than the server's authentication timeout.
    for peer in peers {
        while let Some(Ok(_)) = peer.conn.recv().now_or_never() {}
    }
}

/// Tends `peers` when `TEND_EVERY` has passed since `last`; for set-up loops.
pub async fn tend_every(peers: &mut [Peer], last: &mut Instant) {
    if last.elapsed() >= TEND_EVERY {
        tend(peers).await;
        *last = Instant::now();
    }
}

/// Reads every stored message of `room` through `history`, for the checker.
pub async fn stored_history(
    peer: &mut Peer,
    room: &RoomName,
) -> Result<Vec<StoredMessage>, String> {
    let mut before: Option<i64> = None;
    let mut out = Vec::new();
    loop {
        let page = Request::History {
            room: room.clone(),
            before: before.map(Seq),
            limit: Some(100),
        };
        let page = peer.call(&page).await?;
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
