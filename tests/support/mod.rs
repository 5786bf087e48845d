//! Test support: a Postgres database per test (dropped afterwards), the real server started
//! in-process on an ephemeral port, and a WebSocket client that speaks the protocol.
#![allow(dead_code)]

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
use rookery::client::{ClientError, ConnectOptions, Connection as WsConnection};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::net::TcpListener;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use rookery::config::Config;
use rookery::error::StartError;
use rookery::protocol::Request;
use rookery::secret::Secret;
use rookery::server::Stop;

pub const ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
pub const WAIT: Duration = Duration::from_secs(10);

/// A database created for one test and dropped when the test ends.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub fn new() -> TestDb {
        let admin = std::env::var("ROOKERY_TEST_ADMIN_URL").unwrap_or_else(|_| ADMIN_URL.into());
        let name = format!("rookery_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = PgConnection::establish(&admin).expect("connect to the postgres database");
        conn.batch_execute(&format!("CREATE DATABASE {name}"))
            .expect("create test database");
        let mut url = url::Url::parse(&admin).unwrap();
        url.set_path(&format!("/{name}"));
        TestDb {
            name,
            url: url.to_string(),
        }
    }

    pub fn conn(&self) -> PgConnection {
        PgConnection::establish(&self.url).expect("connect to test database")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin = std::env::var("ROOKERY_TEST_ADMIN_URL").unwrap_or_else(|_| ADMIN_URL.into());
        if let Ok(mut conn) = PgConnection::establish(&admin) {
            let _ = conn.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        }
    }
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        let dir =
            std::env::temp_dir().join(format!("rookery-test-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The room policy every test server starts with: the defaults, but a send rate no test
/// bursts past (the rate has tests of its own).
pub const TEST_POLICY: &str =
    "[defaults]\nrate = { messages = 100000, per_seconds = 1, burst = 100000 }\n";

/// Writes `policy` as the room policy file of a server whose data directory is `data_dir`.
pub fn write_policy(config: &mut Config, data_dir: &TempDir, policy: &str) -> PathBuf {
    let path = data_dir.0.join("rooms.toml");
    std::fs::write(&path, policy).unwrap();
    config.rooms.policy_file = path.clone();
    path
}

/// The configuration tests start from: plain ws, low bcrypt cost, small pools.
pub fn test_config(db: &TestDb, data_dir: &TempDir) -> Config {
    let mut config = Config::from_toml("").unwrap();
    write_policy(&mut config, data_dir, TEST_POLICY);
    config.data_dir = data_dir.0.clone();
    config.server.bind = "127.0.0.1:0".into();
    config.metrics.bind = "127.0.0.1:0".into();
    config.server.workers = 1;
    config.server.shutdown_timeout_ms = 1000;
    config.tls.enabled = false;
    config.database.url = Secret::new(db.url.clone());
    config.database.executors = 2;
    config.database.bcrypt_cost = 4;
    // Tests that burst set no limit of their own; the limits have tests of their own.
    config.session.requests_per_second = 100_000;
    config.session.request_burst = 100_000;
    let unlimited = rookery::config::RateConfig {
        count: 100_000,
        per_seconds: 1,
        burst: 100_000,
    };
    config.auth.registrations_per_ip = unlimited;
    config.session.sends_per_user = unlimited;
    config.session.typing_per_user = unlimited;
    if let Ok(redis) = std::env::var("ROOKERY_TEST_REDIS") {
        // The suite against a one-node cluster (CI runs it both ways).
        join_cluster(&mut config, &redis, &unique_prefix(), "");
    }
    config
}

/// A Redis key prefix no other test uses.
pub fn unique_prefix() -> String {
    format!("rookery-test-{}", uuid::Uuid::new_v4().simple())
}

/// Makes `config` a node of the cluster on `redis` under `prefix`, with quick heartbeats.
pub fn join_cluster(config: &mut Config, redis: &str, prefix: &str, node_id: &str) {
    config.redis.url = Secret::new(redis);
    config.redis.prefix = prefix.into();
    config.cluster.node_id = node_id.into();
    config.cluster.heartbeat_ms = 200;
    config.cluster.node_ttl_ms = 1000;
}

/// The real server, in this process, on an ephemeral port, stopped through the same shutdown
/// future `main` gives it.
pub struct TestServer {
    pub addr: std::net::SocketAddr,
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub tls: bool,
    pub config: Config,
    /// Shared by the nodes of a cluster test.
    pub data_dir: Rc<TempDir>,
    pub db: Rc<TestDb>,
    stop: std::cell::RefCell<Option<tokio::sync::oneshot::Sender<Stop>>>,
    serving: std::cell::RefCell<Option<tokio::task::JoinHandle<Result<(), StartError>>>>,
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(change: impl FnOnce(&mut Config)) -> TestServer {
        Self::start_with_policy(TEST_POLICY, change).await
    }

    /// A server whose room policy file holds `policy` (see [`TEST_POLICY`] for a rate that
    /// no test bursts past).
    pub async fn start_with_policy(policy: &str, change: impl FnOnce(&mut Config)) -> TestServer {
        let db = TestDb::new();
        let data_dir = TempDir::new();
        let mut config = test_config(&db, &data_dir);
        write_policy(&mut config, &data_dir, policy);
        change(&mut config);
        Self::start_on(db, data_dir, config).await
    }

    /// Rewrites the room policy file (the server reloads it when it changes on disk).
    pub fn write_policy(&self, policy: &str) {
        std::fs::write(&self.config.rooms.policy_file, policy).unwrap();
    }

    pub async fn start_on(
        db: impl Into<Rc<TestDb>>,
        data_dir: impl Into<Rc<TempDir>>,
        config: Config,
    ) -> TestServer {
        let (db, data_dir) = (db.into(), data_dir.into());
        let _ = env_logger::builder().is_test(true).try_init();
        let tls = config.tls.enabled;
        let prepared = rookery::server::prepare(config.clone()).expect("prepare server");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let running = rookery::server::start(prepared, listener).expect("start server");
        let metrics_addr = running.metrics_addr();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let serving =
            actix_rt::spawn(running.run_until(async move { stopped.await.unwrap_or(Stop::Now) }));
        TestServer {
            addr,
            metrics_addr,
            tls,
            config,
            data_dir,
            db,
            stop: Some(stop).into(),
            serving: Some(serving).into(),
        }
    }

    pub fn ws_url(&self) -> String {
        let scheme = if self.tls { "wss" } else { "ws" };
        format!("{scheme}://127.0.0.1:{}/ws", self.addr.port())
    }

    pub fn http_url(&self, path: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}{path}", self.addr.port())
    }

    pub async fn connect(&self) -> Client {
        Client::connect(self).await
    }

    /// A connected client, registered and logged in as `username` (password "password-1").
    pub async fn user(&self, username: &str) -> Client {
        let mut client = self.connect().await;
        client.register(username).await;
        client.login(username).await;
        client
    }

    /// Stops the server as `how` says and waits until it has.
    async fn stop_with(&self, how: Stop) {
        if let Some(stop) = self.stop.borrow_mut().take() {
            let _ = stop.send(how);
        }
        let serving = self.serving.borrow_mut().take();
        if let Some(serving) = serving {
            serving.await.unwrap().expect("the server stops cleanly");
        }
    }

    /// What SIGTERM does: drain every session, then stop.
    pub async fn shutdown_gracefully(&self) {
        self.stop_with(Stop::Graceful).await;
    }

    /// Users `names` (registered, logged in), a public `room` created by the first, and every
    /// one of them joined to it, in order.
    pub async fn public_room<const N: usize>(&self, room: &str, names: [&str; N]) -> [Client; N] {
        let mut clients = Vec::with_capacity(N);
        for name in names {
            clients.push(self.user(name).await);
        }
        clients[0].create_room(room, "public", &[]).await;
        for client in &mut clients {
            client.join(room).await;
        }
        match clients.try_into() {
            Ok(clients) => clients,
            Err(_) => unreachable!("one client per name"),
        }
    }

    pub async fn stop(self) {
        self.stop_with(Stop::Now).await;
    }

    /// Stops this server at once (as a crash would) and starts a new one on the same database
    /// and data directory.
    pub async fn restart(self) -> TestServer {
        self.stop_with(Stop::Now).await;
        Self::start_on(self.db, self.data_dir, self.config).await
    }

    /// Every stored message of `room`, for the history checker, read straight from Postgres.
    pub fn stored(&self, room: &str) -> Vec<rookery::checker::StoredMessage> {
        stored_messages(&self.db, room)
    }
}

/// Every stored message of `room` in `db`, for the history checker.
pub fn stored_messages(db: &TestDb, room: &str) -> Vec<rookery::checker::StoredMessage> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        seq: i64,
        #[diesel(sql_type = diesel::sql_types::Text)]
        username: String,
        #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
        client_msg_id: Option<String>,
    }
    diesel::sql_query(
        "SELECT m.seq, u.username, m.client_msg_id FROM messages m JOIN users u ON u.id = m.sender_id \
         JOIN rooms r ON r.id = m.room_id WHERE r.name = $1 ORDER BY m.seq",
    )
    .bind::<diesel::sql_types::Text, _>(room)
    .load::<Row>(&mut db.conn())
    .unwrap()
    .into_iter()
    .map(|r| rookery::checker::StoredMessage {
        seq: rookery::ids::Seq(r.seq),
        from: r.username,
        client_msg_id: r.client_msg_id,
    })
    .collect()
}

pub fn http_client() -> awc::Client {
    let mut ssl = SslConnector::builder(SslMethod::tls()).unwrap();
    ssl.set_verify(SslVerifyMode::NONE);
    awc::Client::builder()
        .connector(awc::Connector::new().openssl(ssl.build()))
        .timeout(WAIT)
        .finish()
}

pub const PASSWORD: &str = "password-1";

/// What a test can send as a request: a [`Request`] (the type the server parses; use the
/// builders in [`req`]) or, to probe what the types cannot express, raw JSON.
pub trait IntoFrame {
    fn into_frame(self) -> Value;
}

impl IntoFrame for Value {
    fn into_frame(self) -> Value {
        self
    }
}

impl IntoFrame for Request {
    fn into_frame(self) -> Value {
        serde_json::to_value(&self).unwrap()
    }
}

/// Requests built from the protocol's types, for the valid frames tests send.
pub mod req {
    use rookery::ids::Seq;
    use rookery::protocol::{Request, RoomKind, RoomName, Username};
    use rookery::secret::Secret;

    pub fn room(name: &str) -> RoomName {
        RoomName::parse(name).unwrap()
    }

    pub fn user(name: &str) -> Username {
        Username::parse(name).unwrap()
    }

    pub fn ping() -> Request {
        Request::Ping {}
    }

    pub fn rooms() -> Request {
        Request::Rooms {}
    }

    pub fn logout() -> Request {
        Request::Logout {}
    }

    pub fn register(username: &str, password: impl Into<String>) -> Request {
        Request::Register {
            username: user(username),
            password: Secret::new(password),
        }
    }

    pub fn login(username: &str, password: impl Into<String>) -> Request {
        Request::Login {
            username: user(username),
            password: Secret::new(password),
        }
    }

    pub fn resume(token: impl AsRef<str>) -> Request {
        Request::Resume {
            token: Secret::new(token.as_ref()),
        }
    }

    pub fn create_room(name: &str, kind: &str, members: &[&str]) -> Request {
        Request::CreateRoom {
            room: room(name),
            kind: RoomKind::parse(kind).unwrap(),
            members: members.iter().map(|m| user(m)).collect(),
        }
    }

    pub fn join(name: &str) -> Request {
        Request::Join {
            room: room(name),
            after: None,
        }
    }

    pub fn join_after(name: &str, after: i64) -> Request {
        Request::Join {
            room: room(name),
            after: Some(Seq(after)),
        }
    }

    pub fn leave(name: &str) -> Request {
        Request::Leave { room: room(name) }
    }

    pub fn send(name: &str, body: impl Into<String>) -> Request {
        Request::Post {
            room: room(name),
            body: body.into(),
            client_msg_id: None,
        }
    }

    pub fn send_keyed(name: &str, body: impl Into<String>, key: impl Into<String>) -> Request {
        Request::Post {
            room: room(name),
            body: body.into(),
            client_msg_id: Some(key.into()),
        }
    }

    pub fn history(name: &str, before: Option<i64>, limit: Option<u32>) -> Request {
        Request::History {
            room: room(name),
            before: before.map(Seq),
            limit,
        }
    }

    pub fn who(name: &str) -> Request {
        Request::Who { room: room(name) }
    }

    pub fn typing(name: &str) -> Request {
        Request::Typing { room: room(name) }
    }

    pub fn invite(name: &str, username: &str) -> Request {
        Request::Invite {
            room: room(name),
            user: user(username),
        }
    }

    pub fn revoke(name: &str, username: &str) -> Request {
        Request::Revoke {
            room: room(name),
            user: user(username),
        }
    }

    pub fn dm(username: &str) -> Request {
        Request::Dm {
            user: user(username),
        }
    }
}

/// A protocol client over a real WebSocket ([`rookery::client::Connection`]), with asserting
/// helpers. Events that arrive while waiting for a reply are kept, in order, for `next_event`.
pub struct Client {
    conn: WsConnection,
    events: VecDeque<Value>,
    next_id: u64,
    pub token: Option<String>,
}

/// What a read returned besides a JSON text frame.
#[derive(Debug)]
pub enum Closed {
    Code(u16),
    NoFrame,
}

impl Client {
    pub async fn connect(server: &TestServer) -> Client {
        Self::try_connect(server, None)
            .await
            .expect("websocket connect")
    }

    /// Connects, sending `origin` as the Origin header when given.
    pub async fn try_connect(
        server: &TestServer,
        origin: Option<&str>,
    ) -> Result<Client, ClientError> {
        Self::connect_url(&server.ws_url(), origin).await
    }

    pub async fn connect_url(url: &str, origin: Option<&str>) -> Result<Client, ClientError> {
        let options = ConnectOptions {
            insecure: true,
            origin: origin.map(str::to_string),
            ..ConnectOptions::default()
        };
        Ok(Client {
            conn: WsConnection::connect(url, &options).await?,
            events: VecDeque::new(),
            next_id: 0,
            token: None,
        })
    }

    pub async fn send_text(&mut self, text: &str) {
        self.conn.send_text(text.to_string()).await.unwrap();
    }

    pub async fn send_binary(&mut self, data: &[u8]) {
        self.conn.send_binary(data.to_vec()).await.unwrap();
    }

    /// The next JSON frame, answering pings; Err on close or end of stream.
    pub async fn read(&mut self) -> Result<Value, Closed> {
        match self.conn.recv_within(WAIT).await {
            Ok(frame) => Ok(frame),
            Err(ClientError::Timeout) => panic!("timed out waiting for a frame"),
            Err(ClientError::Closed(Some(code))) => Err(Closed::Code(code)),
            Err(ClientError::Closed(None)) => Err(Closed::Code(1005)),
            Err(_) => Err(Closed::NoFrame),
        }
    }

    /// Sends `request` (an id is added when missing) and returns the reply with that id.
    pub async fn call(&mut self, request: impl IntoFrame) -> Value {
        let mut request = request.into_frame();
        if request.get("id").is_none() {
            self.next_id += 1;
            request["id"] = json!(format!("req-{}", self.next_id));
        }
        let id = request["id"].clone();
        self.send_text(&request.to_string()).await;
        self.reply_to(&id).await
    }

    /// The replies to `ids`, in whatever order they come; events are kept for `next_event`.
    pub async fn replies_to(&mut self, ids: &[String]) -> std::collections::HashMap<String, Value> {
        let mut replies = std::collections::HashMap::new();
        while replies.len() < ids.len() {
            let frame = self
                .read()
                .await
                .expect("connection closed while waiting for replies");
            match frame["id"].as_str() {
                Some(id) if ids.iter().any(|i| i == id) => {
                    replies.insert(id.to_string(), frame);
                }
                _ if frame["type"] == "ok" || frame["type"] == "error" => {
                    panic!("reply to another request: {frame}")
                }
                _ => self.events.push_back(frame),
            }
        }
        replies
    }

    pub async fn reply_to(&mut self, id: &Value) -> Value {
        loop {
            let frame = self
                .read()
                .await
                .expect("connection closed while waiting for a reply");
            if frame["type"] == "ok" || frame["type"] == "error" {
                assert_eq!(&frame["id"], id, "reply to another request: {frame}");
                return frame;
            }
            self.events.push_back(frame);
        }
    }

    /// Like `call`, but asserts the reply is ok.
    pub async fn ok(&mut self, request: impl IntoFrame) -> Value {
        let request = request.into_frame();
        let reply = self.call(request.clone()).await;
        assert_eq!(reply["type"], "ok", "{request} -> {reply}");
        reply
    }

    /// Like `call`, but asserts an error with `code`.
    pub async fn err(&mut self, request: impl IntoFrame, code: &str) -> Value {
        let request = request.into_frame();
        let reply = self.call(request.clone()).await;
        assert_eq!(reply["type"], "error", "{request} -> {reply}");
        assert_eq!(reply["code"], code, "{request} -> {reply}");
        reply
    }

    pub async fn next_event(&mut self) -> Value {
        if let Some(event) = self.events.pop_front() {
            return event;
        }
        let frame = self
            .read()
            .await
            .expect("connection closed while waiting for an event");
        assert!(frame.get("id").is_none(), "expected an event, got {frame}");
        frame
    }

    /// The next event of type `kind`, skipping others.
    pub async fn next_event_of(&mut self, kind: &str) -> Value {
        loop {
            let event = self.next_event().await;
            if event["type"] == kind {
                return event;
            }
        }
    }

    /// Asserts that no event arrives: a ping round trip proves the server sent nothing before it.
    pub async fn assert_no_event(&mut self, kind: &str) {
        self.ok(json!({"type": "ping"})).await;
        assert!(
            !self.events.iter().any(|e| e["type"] == kind),
            "unexpected {kind} event: {:?}",
            self.events
        );
    }

    /// Asserts that no `joined` or `left` event has arrived (after a ping round trip).
    pub async fn assert_no_flap(&mut self) {
        self.ok(json!({"type": "ping"})).await;
        let flaps: Vec<&Value> = self
            .events
            .iter()
            .filter(|e| e["type"] == "left" || e["type"] == "joined")
            .collect();
        assert!(flaps.is_empty(), "saw {flaps:?}");
    }

    pub fn take_events(&mut self) -> Vec<Value> {
        self.events.drain(..).collect()
    }

    /// Reads until the server closes; returns the close code.
    pub async fn closed(&mut self) -> u16 {
        loop {
            match self.read().await {
                Ok(frame) => self.events.push_back(frame),
                Err(Closed::Code(code)) => return code,
                Err(Closed::NoFrame) => return 1006,
            }
        }
    }

    pub async fn register(&mut self, username: &str) -> Value {
        self.ok(req::register(username, PASSWORD)).await
    }

    pub async fn login(&mut self, username: &str) -> Value {
        let reply = self.ok(req::login(username, PASSWORD)).await;
        self.token = reply["token"].as_str().map(str::to_string);
        reply
    }

    pub async fn create_room(&mut self, room: &str, kind: &str, members: &[&str]) -> Value {
        self.ok(req::create_room(room, kind, members)).await
    }

    pub async fn join(&mut self, room: &str) -> Value {
        self.ok(req::join(room)).await
    }

    pub async fn send(&mut self, room: &str, body: &str) -> Value {
        self.ok(req::send(room, body)).await
    }

    /// Sends `request` with `id` without waiting for its reply (to pipeline requests).
    pub async fn send_request(&mut self, id: &str, request: &Request) {
        self.conn.send_request(id, request).await.unwrap();
    }

    /// The closing handshake: send a close frame and wait for the server's.
    pub async fn close(mut self) {
        let _ = self.conn.send_close().await;
        let _ = self.closed().await;
    }
}

/// Records the `ok` reply to a send of `key` as acked, for `who` (client and user name alike).
pub fn record_ack(
    history: &mut rookery::checker::History,
    who: &str,
    room: &str,
    key: &str,
    reply: &Value,
) {
    let seq = reply["seq"].as_i64().expect("an ack carries a seq");
    history.acked(who, who, room, key, rookery::ids::Seq(seq));
}

/// A TCP proxy in front of Postgres (or, [`PgProxy::to`], another local port), on its own
/// thread, that a test can cut and restore.
pub struct PgProxy {
    pub port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    generation: tokio::sync::watch::Sender<u64>,
}

impl PgProxy {
    pub fn start() -> PgProxy {
        Self::to(5432)
    }

    pub fn to(upstream: u16) -> PgProxy {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (generation, watch) = tokio::sync::watch::channel(0u64);
        let is_cut = cut.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                while let Ok((mut client, _)) = listener.accept().await {
                    if is_cut.load(Ordering::SeqCst) {
                        continue; // dropped: the connection is refused at once
                    }
                    let mut watch = watch.clone();
                    let born = *watch.borrow();
                    tokio::spawn(async move {
                        let Ok(mut upstream) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                            _ = async { while watch.changed().await.is_ok() { if *watch.borrow() != born { break; } } } => {}
                        }
                    });
                }
            });
        });
        PgProxy {
            port,
            cut,
            generation,
        }
    }

    /// Drops every open connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    pub fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// `db`'s URL through this proxy.
    pub fn url(&self, db: &TestDb) -> String {
        let mut url = url::Url::parse(&db.url).unwrap();
        url.set_port(Some(self.port)).unwrap();
        url.to_string()
    }
}

/// The real `rookery` binary, serving plain ws on a free port with its own database and data
/// directory; its log goes to `log` in the data directory. Killed on drop.
pub struct RealServer {
    pub child: std::process::Child,
    pub url: String,
    /// Shared by the nodes of a cluster test.
    pub db: Rc<TestDb>,
    pub data: Rc<TempDir>,
    pub log: PathBuf,
    pub policy: PathBuf,
}

impl RealServer {
    /// Starts it with `policy` as its room policy file and `env` on top of the test settings.
    pub async fn start(policy: &str, env: &[(&str, &str)]) -> RealServer {
        Self::start_in(
            Rc::new(TestDb::new()),
            Rc::new(TempDir::new()),
            "server",
            policy,
            env,
        )
        .await
    }

    /// Starts one on `db` with `data` as its data directory (nodes of one cluster share both),
    /// logging to `<data>/<name>.log`.
    pub async fn start_in(
        db: Rc<TestDb>,
        data: Rc<TempDir>,
        name: &str,
        policy: &str,
        env: &[(&str, &str)],
    ) -> RealServer {
        let policy_file = data.0.join("rooms.toml");
        std::fs::write(&policy_file, policy).unwrap();
        let log = data.0.join(format!("{name}.log"));
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_rookery"));
        command
            .arg("serve")
            .env("DATABASE_URL", &db.url)
            .env("ROOKERY__SERVER__BIND", format!("127.0.0.1:{port}"))
            .env("ROOKERY__TLS__ENABLED", "false")
            .env("ROOKERY__METRICS__BIND", "127.0.0.1:0")
            .env("ROOKERY__DATA_DIR", &data.0)
            .env("ROOKERY__DATABASE__BCRYPT_COST", "4")
            .env("ROOKERY__ROOMS__POLICY_FILE", &policy_file)
            .env("ROOKERY__SESSION__REQUESTS_PER_SECOND", "100000")
            .env("ROOKERY__SESSION__REQUEST_BURST", "100000")
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command.spawn().unwrap();
        let server = RealServer {
            child,
            url: format!("ws://127.0.0.1:{port}/ws"),
            db,
            data,
            log,
            policy: policy_file,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while Client::connect_url(&server.url, None).await.is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "the server did not start: {}",
                server.log_text()
            );
            actix_rt::time::sleep(Duration::from_millis(100)).await;
        }
        server
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log holds `needle` more than `seen` times; returns the new count.
    pub async fn wait_for_log(&self, needle: &str, seen: usize) -> usize {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let count = self.log_text().matches(needle).count();
            if count > seen {
                return count;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no new {needle:?} in the log:\n{}",
                self.log_text()
            );
            actix_rt::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn connect(&self) -> Client {
        Client::connect_url(&self.url, None).await.unwrap()
    }

    /// A connected client, registered and logged in as `username`.
    pub async fn user(&self, username: &str) -> Client {
        let mut client = self.connect().await;
        client.register(username).await;
        client.login(username).await;
        client
    }

    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Every stored message of `room`, for the history checker.
    pub fn stored(&self, room: &str) -> Vec<rookery::checker::StoredMessage> {
        stored_messages(&self.db, room)
    }
}

impl Drop for RealServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A WebSocket written by hand (over TLS when the server serves it), for what a
/// well-behaved client library will not do: stop reading with a small receive buffer, send
/// frames it was never asked for.
pub struct RawWs {
    pub stream: Box<dyn RawStream>,
}

pub trait RawStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> RawStream for T {}

impl RawWs {
    /// Connects to `server` with a receive buffer of `recv_buffer` bytes, and completes the
    /// upgrade.
    pub async fn connect(server: &TestServer, recv_buffer: u32) -> RawWs {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(recv_buffer).unwrap();
        let tcp = socket.connect(server.addr).await.unwrap();
        let mut stream: Box<dyn RawStream> = if server.tls {
            let mut ssl = SslConnector::builder(SslMethod::tls()).unwrap();
            ssl.set_verify(SslVerifyMode::NONE);
            let ssl = ssl
                .build()
                .configure()
                .unwrap()
                .into_ssl("localhost")
                .unwrap();
            let mut tls = tokio_openssl::SslStream::new(ssl, tcp).unwrap();
            std::pin::Pin::new(&mut tls).connect().await.unwrap();
            Box::new(tls)
        } else {
            Box::new(tcp)
        };
        let request = format!(
            "GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            server.addr.port()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            assert_eq!(
                stream.read(&mut byte).await.unwrap(),
                1,
                "closed during the upgrade"
            );
            head.push(byte[0]);
        }
        assert!(
            head.starts_with(b"HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        RawWs { stream }
    }

    /// Writes one masked frame (the zero mask: clients must mask, any key will do).
    pub async fn write_frame(&mut self, opcode: u8, payload: &[u8]) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        let mut frame = vec![0x80 | opcode];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
        }
        frame.extend_from_slice(&[0, 0, 0, 0]);
        frame.extend_from_slice(payload);
        self.stream.write_all(&frame).await
    }

    pub async fn send(&mut self, frame: &Value) {
        self.write_frame(0x1, frame.to_string().as_bytes())
            .await
            .unwrap();
    }

    /// Reads until `needle` has been seen in what the server sent.
    pub async fn read_until(&mut self, needle: &str) {
        use tokio::io::AsyncReadExt;
        let mut seen = Vec::new();
        let deadline = std::time::Instant::now() + WAIT;
        while !String::from_utf8_lossy(&seen).contains(needle) {
            let mut buf = [0u8; 4096];
            let n = tokio::time::timeout_at(deadline.into(), self.stream.read(&mut buf))
                .await
                .expect("timed out reading")
                .unwrap();
            assert!(n > 0, "closed before {needle}");
            seen.extend_from_slice(&buf[..n]);
        }
    }
}
