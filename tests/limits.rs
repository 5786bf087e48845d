//! Limits and shutdown: connections per IP, the Origin allow-list, request rate, failed
//! logins, the bcrypt queue, slow readers, idle TCP connections, and graceful shutdown of an
//! in-process server and of a real `rookery serve` process on SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use rookery::checker::History;
use rookery::client::ClientError;
use rookery::ids::Seq;
use serde_json::json;
use std::collections::BTreeMap;
use std::io::Read;
use std::time::{Duration, Instant};
use support::*;

fn refused_with(result: Result<Client, ClientError>, status: u16) {
    match result {
        Err(ClientError::Refused(got)) => assert_eq!(got, status),
        Err(other) => panic!("expected HTTP {status}, got {other:?}"),
        Ok(_) => panic!("expected HTTP {status}, the connection was accepted"),
    }
}

#[actix_rt::test]
async fn connections_per_ip_are_limited() {
    let server = TestServer::start_with(|c| c.server.max_connections_per_ip = 2).await;
    let first = server.connect().await;
    let _second = server.connect().await;
    refused_with(Client::try_connect(&server, None).await, 429);
    first.close().await;
    // The slot is freed once the server has seen the close.
    let deadline = Instant::now() + WAIT;
    loop {
        match Client::try_connect(&server, None).await {
            Ok(mut third) => {
                third.ok(req::ping()).await;
                break;
            }
            Err(_) if Instant::now() < deadline => {
                actix_rt::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("{e:?}"),
        }
    }
}

#[actix_rt::test]
async fn foreign_origins_are_refused() {
    let server = TestServer::start_with(|c| {
        c.server.allowed_origins = vec!["https://chat.example.com".into()]
    })
    .await;
    refused_with(
        Client::try_connect(&server, Some("https://evil.example.net")).await,
        403,
    );
    let own = format!("http://127.0.0.1:{}", server.addr.port());
    Client::try_connect(&server, Some(&own))
        .await
        .unwrap()
        .ok(req::ping())
        .await;
    Client::try_connect(&server, Some("https://chat.example.com"))
        .await
        .unwrap();
    Client::try_connect(&server, Some("https://CHAT.example.com:443"))
        .await
        .unwrap();
    // Scheme, host and port must all match.
    let port = server.addr.port();
    for foreign in [
        format!("https://127.0.0.1:{port}"),
        format!("http://127.0.0.1:{}", port.wrapping_add(1)),
        format!("http://localhost:{port}"),
        "http://chat.example.com".to_string(),
        "https://chat.example.com:8443".to_string(),
        "null".to_string(),
    ] {
        refused_with(Client::try_connect(&server, Some(&foreign)).await, 403);
    }
    // Non-browser clients send no Origin.
    Client::try_connect(&server, None).await.unwrap();
}

/// Whether the server closes `socket` (nothing sent on it) within half a second.
async fn closed_by_server(socket: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut byte = [0u8; 1];
    match tokio::time::timeout(Duration::from_millis(500), socket.read(&mut byte)).await {
        Err(_) => false,
        Ok(Ok(n)) => n == 0,
        Ok(Err(_)) => true,
    }
}

/// Regression (hardening 8): one address cannot hold the server's handshake capacity with
/// connections it never completes; completed ones give their slot back, and other addresses
/// are not affected.
#[actix_rt::test]
async fn connections_stuck_in_the_handshake_are_limited_per_address() {
    stuck_in_the_handshake(false).await;
}

#[actix_rt::test]
async fn connections_stuck_in_the_tls_handshake_are_limited_per_address() {
    stuck_in_the_handshake(true).await;
}

async fn stuck_in_the_handshake(tls: bool) {
    let server = TestServer::start_with(|c| {
        c.tls.enabled = tls;
        c.server.max_handshakes_per_ip = 3;
    })
    .await;
    // Upgraded connections are through their handshake: they hold no slot.
    let mut upgraded = Vec::new();
    for _ in 0..4 {
        upgraded.push(server.connect().await);
    }
    let mut stuck = Vec::new();
    for _ in 0..3 {
        stuck.push(tokio::net::TcpStream::connect(server.addr).await.unwrap());
    }
    actix_rt::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !closed_by_server(&mut stuck[2]).await,
        "three may wait in the handshake"
    );
    let mut fourth = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    assert!(
        closed_by_server(&mut fourth).await,
        "a fourth is closed at once"
    );
    // Another address still gets in, and so does this one once its stuck connections go.
    let elsewhere = rookery::client::ConnectOptions {
        local_address: Some("127.0.0.2".parse().unwrap()),
        insecure: true,
        ..rookery::client::ConnectOptions::default()
    };
    rookery::client::Connection::connect(&server.ws_url(), &elsewhere)
        .await
        .unwrap();
    drop(stuck);
    actix_rt::time::sleep(Duration::from_millis(200)).await;
    server.connect().await.ok(req::ping()).await;
    for mut c in upgraded {
        c.ok(req::ping()).await;
    }
}

/// A connection that says, as a proxy would, that it carries `client`'s traffic.
async fn connect_forwarded(
    server: &TestServer,
    client: &str,
) -> Result<rookery::client::Connection, ClientError> {
    let options = rookery::client::ConnectOptions {
        headers: vec![("X-Forwarded-For".into(), format!("{client}, 127.0.0.1"))],
        ..rookery::client::ConnectOptions::default()
    };
    rookery::client::Connection::connect(&server.ws_url(), &options).await
}

#[actix_rt::test]
async fn per_address_limits_count_the_forwarded_client_only_behind_a_trusted_proxy() {
    let behind_proxy = TestServer::start_with(|c| {
        c.server.max_connections_per_ip = 1;
        c.server.trusted_proxies = vec!["127.0.0.0/8".into()];
    })
    .await;
    let _a = connect_forwarded(&behind_proxy, "203.0.113.1")
        .await
        .unwrap();
    let _b = connect_forwarded(&behind_proxy, "203.0.113.2")
        .await
        .unwrap();
    let _v6 = connect_forwarded(&behind_proxy, "2001:db8:1:2::1")
        .await
        .unwrap();
    match connect_forwarded(&behind_proxy, "203.0.113.1").await {
        Err(ClientError::Refused(429)) => {}
        other => panic!("a second connection of one client: {:?}", other.map(|_| ())),
    }
    // Another address of the same IPv6 /64 is the same client.
    match connect_forwarded(&behind_proxy, "2001:db8:1:2:ffff::9").await {
        Err(ClientError::Refused(429)) => {}
        other => panic!("the same /64: {:?}", other.map(|_| ())),
    }

    // Without trusted proxies the header is the client's own claim and is ignored.
    let direct = TestServer::start_with(|c| c.server.max_connections_per_ip = 1).await;
    let _first = connect_forwarded(&direct, "203.0.113.1").await.unwrap();
    match connect_forwarded(&direct, "203.0.113.2").await {
        Err(ClientError::Refused(429)) => {}
        other => panic!("a forged header: {:?}", other.map(|_| ())),
    }
}

#[actix_rt::test]
async fn a_users_sends_are_limited_across_its_connections_and_rooms() {
    let server = TestServer::start_with(|c| {
        c.session.sends_per_user = rookery::config::RateConfig {
            count: 1,
            per_seconds: 3600,
            burst: 5,
        };
    })
    .await;
    let [mut first] = server.public_room("one", ["ann"]).await;
    first.create_room("two", "public", &[]).await;
    let mut second = server.connect().await;
    second.login("ann").await;
    second.join("two").await;
    for _ in 0..3 {
        first.send("one", "hi").await;
    }
    for _ in 0..2 {
        second.send("two", "hi").await;
    }
    // Each connection and each room is far below its own limits; the user is not.
    let refused = second
        .err(req::send("two", "one too many"), "rate_limited")
        .await;
    assert!(
        refused["message"].as_str().unwrap().contains("user"),
        "{refused}"
    );
    first
        .err(req::send("one", "and here"), "rate_limited")
        .await;
    // Another user is not affected, and the connections stay open.
    let [mut bob] = server.public_room("three", ["bob"]).await;
    bob.send("three", "fine").await;
    first.ok(req::ping()).await;
}

#[actix_rt::test]
async fn typing_is_limited_per_user_and_fans_out_once_a_second() {
    let server = TestServer::start_with(|c| {
        c.session.typing_per_user = rookery::config::RateConfig {
            count: 1,
            per_seconds: 3600,
            burst: 8,
        };
    })
    .await;
    let [mut ann, mut bob] = server.public_room("t", ["ann", "bob"]).await;
    let mut ann_again = server.connect().await;
    ann_again.login("ann").await;
    ann_again.join("t").await;
    for _ in 0..3 {
        ann.ok(json!({"type": "typing", "room": "t"})).await;
        ann_again.ok(json!({"type": "typing", "room": "t"})).await;
    }
    bob.assert_no_event("nothing").await;
    let typing = bob
        .take_events()
        .into_iter()
        .filter(|e| e["type"] == "typing")
        .count();
    assert_eq!(
        typing, 1,
        "six typing requests within a second fan out once"
    );
    actix_rt::time::sleep(Duration::from_millis(1100)).await;
    ann.ok(json!({"type": "typing", "room": "t"})).await;
    assert_eq!(bob.next_event_of("typing").await["user"], "ann");
    // Two more fit the burst of 8; the ninth across both connections is refused.
    ann_again.ok(json!({"type": "typing", "room": "t"})).await;
    ann.err(json!({"type": "typing", "room": "t"}), "rate_limited")
        .await;
    ann_again
        .err(json!({"type": "typing", "room": "t"}), "rate_limited")
        .await;
    bob.ok(json!({"type": "typing", "room": "t"})).await;
}

#[actix_rt::test]
async fn requests_beyond_the_rate_are_refused_and_the_connection_stays() {
    let server = TestServer::start_with(|c| {
        c.session.requests_per_second = 5;
        c.session.request_burst = 5;
    })
    .await;
    let mut c = server.connect().await;
    for i in 0..12 {
        c.send_request(&format!("p{i}"), &req::ping()).await;
    }
    let mut limited = 0;
    for _ in 0..12 {
        let reply = c.read().await.unwrap();
        if reply["code"] == "rate_limited" {
            limited += 1;
        }
    }
    assert!(limited >= 6, "only {limited} of 12 were refused");
    actix_rt::time::sleep(Duration::from_millis(1100)).await;
    c.ok(req::ping()).await;
}

#[actix_rt::test]
async fn failed_logins_are_limited_per_username_and_per_ip() {
    let server = TestServer::start_with(|c| {
        c.auth.failed_logins_per_user = 3;
        c.auth.failed_logins_per_ip = 6;
    })
    .await;
    let mut c = server.connect().await;
    for name in ["ann", "bob", "cat"] {
        c.register(name).await;
    }
    let wrong = |name: &str| req::login(name, "wrong-password");
    for _ in 0..3 {
        c.err(wrong("ann"), "invalid_credentials").await;
    }
    // Even the right password is refused now, without checking it.
    let right = req::login("ann", PASSWORD);
    let reply = c.err(right, "rate_limited").await;
    assert!(reply["message"].as_str().unwrap().contains("failed logins"));
    // Another user from the same address still may, until the address has too many failures.
    for _ in 0..3 {
        c.err(wrong("bob"), "invalid_credentials").await;
    }
    c.err(req::login("cat", PASSWORD), "rate_limited").await;
}

#[actix_rt::test]
async fn the_bcrypt_queue_is_bounded() {
    let server = TestServer::start_with(|c| {
        c.auth.bcrypt_threads = 1;
        c.auth.bcrypt_queue = 1;
        c.database.bcrypt_cost = 10;
    })
    .await;
    let mut setup = server.connect().await;
    setup.register("ann").await;
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(server.connect().await);
    }
    for c in &mut clients {
        c.send_request("l", &req::login("ann", PASSWORD)).await;
    }
    let mut codes = Vec::new();
    for c in &mut clients {
        let reply = c.reply_to(&json!("l")).await;
        codes.push(reply["code"].as_str().unwrap_or("ok").to_string());
    }
    assert!(codes.iter().any(|c| c == "ok"), "{codes:?}");
    assert!(codes.iter().any(|c| c == "rate_limited"), "{codes:?}");
}

#[actix_rt::test]
async fn a_slow_reader_is_cut_off_and_the_others_get_everything() {
    let policy = format!("{TEST_POLICY}max_body_bytes = 8192\n");
    let server = TestServer::start_with_policy(&policy, |c| {
        c.session.max_frame_bytes = 16 * 1024;
        c.session.outbound_limit_bytes = 1024 * 1024;
    })
    .await;
    let mut ann = server.user("ann").await;
    let mut slow = server.user("slow").await;
    let mut reader = server.user("reader").await;
    ann.create_room("general", "public", &[]).await;
    for c in [&mut ann, &mut slow, &mut reader] {
        c.join("general").await;
    }
    let mut history = History::new();
    history.covers("reader", "general", Seq(0), None);
    let body = "x".repeat(8000);
    let total = 3000;
    let mut received = 0;
    let mut acked = 0;
    let started = Instant::now();
    // `slow` never reads; ann sends 24 MB in all while `reader` (and ann) keep up.
    for i in 0..total {
        let key = format!("k{i}");
        ann.send_request(&key, &req::send_keyed("general", body.as_str(), &key))
            .await;
        while let Ok(event) =
            tokio::time::timeout(Duration::ZERO, reader.next_event_of("message")).await
        {
            history.received("reader", "general", Seq(event["seq"].as_i64().unwrap()));
            received += 1;
        }
        while let Ok(frame) = tokio::time::timeout(Duration::ZERO, ann.read()).await {
            let frame = frame.unwrap();
            if frame["type"] == "ok" {
                let key = frame["id"].as_str().unwrap().to_string();
                record_ack(&mut history, "ann", "general", &key, &frame);
                acked += 1;
            }
        }
    }
    while acked < total {
        let reply = ann.read().await.unwrap();
        if reply["type"] == "ok" {
            let key = reply["id"].as_str().unwrap().to_string();
            record_ack(&mut history, "ann", "general", &key, &reply);
            acked += 1;
        }
    }
    while received < total {
        let event = reader.next_event_of("message").await;
        history.received("reader", "general", Seq(event["seq"].as_i64().unwrap()));
        received += 1;
    }
    assert!(started.elapsed() < Duration::from_secs(60));
    assert_eq!(slow.closed().await, 1013);
    let stored = BTreeMap::from([("general".to_string(), server.stored("general"))]);
    let verdict = history.verdict(&stored);
    assert!(verdict.is_clean(), "{verdict}");
}

#[actix_rt::test]
async fn a_tcp_connection_that_sends_nothing_is_dropped() {
    let server = TestServer::start_with(|c| c.server.request_timeout_ms = 300).await;
    let port = server.addr.port();
    let outcome = actix_web::rt::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let started = Instant::now();
        let mut buf = [0u8; 256];
        let read = stream.read(&mut buf);
        (
            read.map(|n| n == 0 || buf.starts_with(b"HTTP/1.1 408"))
                .unwrap_or(true),
            started.elapsed(),
        )
    })
    .await
    .unwrap();
    assert!(outcome.0, "the server kept the connection");
    assert!(outcome.1 < Duration::from_secs(3), "{:?}", outcome.1);
}

/// Shutdown while clients send: every send the server accepted is committed and acked, the
/// WebSockets close with 1001, and every acked message is stored.
#[actix_rt::test]
async fn graceful_shutdown_finishes_accepted_sends_and_closes_with_1001() {
    let server = TestServer::start().await;
    let [mut ann, mut bob] = server.public_room("general", ["ann", "bob"]).await;
    for i in 0..200 {
        let key = format!("k{i}");
        ann.send_request(&key, &req::send_keyed("general", "x", &key))
            .await;
    }
    // Shut down once the server has acked some and is still working on the rest.
    let mut history = History::new();
    loop {
        let reply = ann.read().await.unwrap();
        if reply["type"] == "ok" {
            let key = reply["id"].as_str().unwrap().to_string();
            record_ack(&mut history, "ann", "general", &key, &reply);
            break;
        }
    }
    server.shutdown_gracefully().await;
    let mut code = None;
    loop {
        match ann.read().await {
            Ok(reply) if reply["type"] == "ok" => {
                let key = reply["id"].as_str().unwrap().to_string();
                record_ack(&mut history, "ann", "general", &key, &reply);
            }
            Ok(reply) if reply["type"] == "error" => {
                assert_eq!(reply["code"], "unavailable", "{reply}")
            }
            Ok(_) => {}
            Err(Closed::Code(c)) => {
                code = Some(c);
                break;
            }
            Err(Closed::NoFrame) => break,
        }
    }
    assert_eq!(code, Some(1001));
    assert_eq!(bob.closed().await, 1001);
    let stored = BTreeMap::from([("general".to_string(), server.stored("general"))]);
    let verdict = history.verdict(&stored);
    assert!(verdict.is_clean(), "{verdict}");
    assert!(verdict.acked > 0);
}

/// The real binary: SIGTERM closes WebSockets with 1001 and the process exits 0.
#[actix_rt::test]
async fn sigterm_stops_the_process_gracefully() {
    let db = TestDb::new();
    let data = TempDir::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_rookery"))
        .arg("serve")
        .env("DATABASE_URL", &db.url)
        .env("ROOKERY__SERVER__BIND", format!("127.0.0.1:{port}"))
        .env("ROOKERY__TLS__ENABLED", "false")
        .env("ROOKERY__DATA_DIR", &data.0)
        .env("ROOKERY__DATABASE__BCRYPT_COST", "4")
        .env("ROOKERY__SERVER__SHUTDOWN_TIMEOUT_MS", "5000")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(data.0.join("log")).unwrap())
        .spawn()
        .unwrap();
    let url = format!("ws://127.0.0.1:{port}/ws");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut c = loop {
        match Client::connect_url(&url, None).await {
            Ok(client) => break client,
            Err(_) if Instant::now() < deadline => {
                actix_rt::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("server did not start: {e:?}"),
        }
    };
    c.register("ann").await;
    c.login("ann").await;
    c.create_room("general", "public", &[]).await;
    c.join("general").await;
    c.send("general", "before the signal").await;
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(c.closed().await, 1001);
    let started = Instant::now();
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the process did not exit"
        );
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    };
    let log = std::fs::read_to_string(data.0.join("log")).unwrap_or_default();
    assert!(exit.success(), "{exit:?}\n{log}");
}

/// Regression (hardening 1): logins whose connections go away while bcrypt runs must not
/// leave their attempts counted: afterwards the right password still logs in.
#[actix_rt::test]
async fn aborted_logins_do_not_lock_the_account_out() {
    let server = TestServer::start_with(|c| c.database.bcrypt_cost = 10).await;
    let mut ann = server.connect().await;
    ann.register("ann").await;
    for _ in 0..5 {
        let mut c = server.connect().await;
        c.send_request("l", &req::login("ann", "wrong-password"))
            .await;
        actix_rt::time::sleep(Duration::from_millis(5)).await;
        drop(c); // gone while the password is being checked
    }
    actix_rt::time::sleep(Duration::from_millis(1500)).await;
    let mut c = server.connect().await;
    c.login("ann").await;
}

/// Regression (hardening 2): a send the database could not store must fail alone. A retry key
/// with U+0000, or a string that is not text, is refused with its id; the sender's sends around
/// it and other users' sends are acked, stored once and delivered; a body may hold U+0000.
#[actix_rt::test]
async fn a_poisoned_send_fails_alone() {
    let server = TestServer::start().await;
    let [mut ann, mut bob] = server.public_room("general", ["ann", "bob"]).await;
    let [mut carl] = server.public_room("other", ["carl"]).await;
    let send = |id: &str, body: &str, key: &str| {
        json!({"id": id, "type": "send", "room": "general", "body": body, "client_msg_id": key})
            .to_string()
    };
    ann.send_text(&send("s1", "first", "k1")).await;
    ann.send_text(&send("s2", "poison", "k\u{0}2")).await;
    ann.send_text(r#"{"id":"s3","type":"send","room":"general","body":"\ud800"}"#)
        .await;
    ann.send_text(&send("s4", "nul\u{0}inside", "k4")).await;
    carl.send_text(
        &json!({"id": "c1", "type": "send", "room": "other", "body": "elsewhere"}).to_string(),
    )
    .await;
    let ids = ["s1", "s2", "s3", "s4"].map(String::from);
    let replies = ann.replies_to(&ids).await;
    assert_eq!(replies["s1"]["seq"], 1, "{}", replies["s1"]);
    for bad in ["s2", "s3"] {
        assert_eq!(replies[bad]["type"], "error", "{}", replies[bad]);
        assert_eq!(replies[bad]["code"], "bad_request");
    }
    assert_eq!(replies["s4"]["seq"], 2, "{}", replies["s4"]);
    assert_eq!(
        carl.replies_to(&["c1".to_string()]).await["c1"]["type"],
        "ok"
    );

    assert_eq!(bob.next_event_of("message").await["body"], "first");
    assert_eq!(bob.next_event_of("message").await["body"], "nul\u{0}inside");
    let keys: Vec<Option<String>> = server
        .stored("general")
        .into_iter()
        .map(|m| m.client_msg_id)
        .collect();
    assert_eq!(keys, [Some("k1".to_string()), Some("k4".to_string())]);
    let page = bob.ok(req::history("general", None, None)).await;
    assert_eq!(page["messages"][1]["body"], "nul\u{0}inside");
}

/// Clients on a thread of their own (the test's thread runs the server's actors) that keep
/// requests outstanding as fast as the server answers them.
struct Flood {
    ready: std::sync::mpsc::Receiver<()>,
    start: std::sync::mpsc::Sender<Instant>,
    thread: std::thread::JoinHandle<BTreeMap<String, u64>>,
}

impl Flood {
    /// One client per entry of `logins` (logged in as it, and joined to `join`, when given),
    /// each with `in_flight` requests `frame(client, n)` outstanding once started.
    fn prepare(
        url: String,
        logins: Vec<Option<String>>,
        join: Option<&'static str>,
        in_flight: u64,
        frame: fn(usize, u64) -> String,
    ) -> Flood {
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let (start, start_rx) = std::sync::mpsc::channel::<Instant>();
        let thread = std::thread::spawn(move || {
            actix_rt::System::new().block_on(async move {
                let mut clients = Vec::new();
                for login in logins {
                    let mut c = Client::connect_url(&url, None).await.unwrap();
                    if let Some(user) = login {
                        c.login(&user).await;
                    }
                    if let Some(room) = join {
                        c.join(room).await;
                    }
                    clients.push(c);
                }
                ready_tx.send(()).unwrap();
                let until = start_rx.recv().unwrap();
                let floods: Vec<_> = clients
                    .into_iter()
                    .enumerate()
                    .map(|(i, c)| actix_rt::spawn(flood_one(c, i, in_flight, frame, until)))
                    .collect();
                let mut outcomes = BTreeMap::new();
                for flood in floods {
                    for (outcome, n) in flood.await.unwrap() {
                        *outcomes.entry(outcome).or_default() += n;
                    }
                }
                outcomes
            })
        });
        Flood {
            ready,
            start,
            thread,
        }
    }

    /// Starts the flood, once every client is set up, for `length`; returns its end.
    async fn start(&self, length: Duration) -> Instant {
        while self.ready.try_recv().is_err() {
            assert!(!self.thread.is_finished(), "the flood could not be set up");
            actix_rt::time::sleep(Duration::from_millis(20)).await;
        }
        let until = Instant::now() + length;
        self.start.send(until).unwrap();
        until
    }

    /// How many replies of each kind ("ok", or the error code) the flood got.
    async fn outcomes(self) -> BTreeMap<String, u64> {
        while !self.thread.is_finished() {
            actix_rt::time::sleep(Duration::from_millis(20)).await;
        }
        self.thread.join().unwrap()
    }
}

async fn flood_one(
    mut c: Client,
    client: usize,
    in_flight: u64,
    frame: fn(usize, u64) -> String,
    until: Instant,
) -> BTreeMap<String, u64> {
    let mut outcomes = BTreeMap::new();
    for n in 0..in_flight {
        c.send_text(&frame(client, n)).await;
    }
    let mut n = in_flight;
    while Instant::now() < until {
        let reply = c.read().await.unwrap();
        let outcome = match (reply["type"].as_str(), reply["code"].as_str()) {
            (Some("ok"), _) => "ok",
            (Some("error"), Some(code)) => code,
            _ => continue,
        };
        *outcomes.entry(outcome.to_string()).or_default() += 1;
        n += 1;
        c.send_text(&frame(client, n)).await;
    }
    outcomes
}

/// Regression (hardening 3): a flood of history reads does not delay commits, and the reads
/// beyond the read queue's bound are refused `rate_limited` at once.
#[actix_rt::test]
async fn commits_keep_their_pace_under_a_read_flood() {
    let server = TestServer::start_with(|c| {
        c.database.executors = 1;
        c.database.commits_in_flight = 1;
        c.database.max_queued = 16;
        c.database.store_timeout_ms = 1000;
    })
    .await;
    let [mut ann] = server.public_room("big", ["ann"]).await;
    let ids: Vec<String> = (0..100).map(|i| format!("fill{i}")).collect();
    for id in &ids {
        ann.send_request(id, &req::send("big", "x".repeat(400)))
            .await;
    }
    ann.replies_to(&ids).await;
    for i in 0..16 {
        server.connect().await.register(&format!("reader{i}")).await;
    }

    let readers = (0..16).map(|i| Some(format!("reader{i}"))).collect();
    let flood = Flood::prepare(server.ws_url(), readers, Some("big"), 64, |_, n| {
        json!({"id": format!("h{n}"), "type": "history", "room": "big", "limit": 100}).to_string()
    });
    let until = flood.start(Duration::from_secs(3)).await;
    actix_rt::time::sleep(Duration::from_millis(300)).await;
    let mut waits = Vec::new();
    let mut n = 0;
    while Instant::now() + Duration::from_millis(300) < until {
        n += 1;
        let sent = Instant::now();
        let reply = ann.call(req::send("big", format!("paced {n}"))).await;
        assert_eq!(reply["type"], "ok", "{reply}");
        waits.push(sent.elapsed());
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }
    let outcomes = flood.outcomes().await;
    let (pages, busy) = (outcomes.get("ok"), outcomes.get("rate_limited"));
    waits.sort();
    let p99 = waits[(waits.len() * 99 / 100).min(waits.len() - 1)];
    assert!(
        p99 < Duration::from_millis(1000),
        "p99 ack {p99:?} of {n} sends"
    );
    assert!(
        busy.is_some(),
        "the read queue refused nothing: {outcomes:?}"
    );
    assert!(pages.is_some(), "no read got through: {outcomes:?}");
    assert_eq!(outcomes.len(), 2, "{outcomes:?}");
}

/// Regression (hardening 3): guessing tokens costs a database read each, so failed resumes
/// are limited per address like failed logins; an attempt whose connection went away counts
/// as failed, a successful one does not count.
#[actix_rt::test]
async fn failed_resumes_are_limited_per_address() {
    let server = TestServer::start_with(|c| c.auth.failed_resumes_per_ip = 3).await;
    let token = server.user("ann").await.token.unwrap();
    for _ in 0..5 {
        server.connect().await.ok(req::resume(&token)).await;
    }
    for _ in 0..2 {
        let mut c = server.connect().await;
        c.send_request("r", &req::resume("guessed-and-gone")).await;
        actix_rt::time::sleep(Duration::from_millis(20)).await;
        drop(c); // its answer never read
    }
    let mut c = server.connect().await;
    c.err(req::resume("guessed"), "unauthorized").await;
    let refused = c.err(req::resume("guessed-again"), "rate_limited").await;
    assert!(
        refused["message"].as_str().unwrap().contains("resumes"),
        "{refused}"
    );
    // The limit is the address's: even the right token waits for the window.
    server
        .connect()
        .await
        .err(req::resume(&token), "rate_limited")
        .await;
}

/// A crowd behind one address (an office's NAT after a network blip) resumes at once: resumes
/// in flight are not failures, so all of them succeed however low the failure limit.
#[actix_rt::test]
async fn a_crowd_behind_one_address_resumes_at_once() {
    let server = TestServer::start_with(|c| c.auth.failed_resumes_per_ip = 2).await;
    let mut tokens = Vec::new();
    for i in 0..12 {
        tokens.push(server.user(&format!("user{i}")).await.token.unwrap());
    }
    let mut crowd = Vec::new();
    for _ in &tokens {
        crowd.push(server.connect().await);
    }
    for (c, token) in crowd.iter_mut().zip(&tokens) {
        c.send_request("r", &req::resume(token)).await;
    }
    for c in &mut crowd {
        let reply = c.reply_to(&json!("r")).await;
        assert_eq!(reply["type"], "ok", "{reply}");
    }
}

/// Regression (hardening 4): registrations are limited per address by a token bucket, and a
/// registration refused because the name is taken counts as a failed login of the address.
#[actix_rt::test]
async fn registrations_are_limited_per_address() {
    use rookery::config::RateConfig;
    let server = TestServer::start_with(|c| {
        c.auth.registrations_per_ip = RateConfig {
            count: 1,
            per_seconds: 3600,
            burst: 4,
        };
        c.auth.failed_logins_per_ip = 2;
    })
    .await;
    let mut c = server.connect().await;
    for name in ["ann", "bob"] {
        c.register(name).await;
    }
    for _ in 0..2 {
        c.err(req::register("ann", PASSWORD), "conflict").await;
    }
    // Two names found taken: the address's failed-login window is full.
    let refused = c.err(req::register("cat", PASSWORD), "rate_limited").await;
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("registrations"),
        "{refused}"
    );
    c.err(req::login("bob", PASSWORD), "rate_limited").await;

    let other = TestServer::start_with(|c| {
        c.auth.registrations_per_ip = RateConfig {
            count: 1,
            per_seconds: 3600,
            burst: 3,
        }
    })
    .await;
    let mut c = other.connect().await;
    for name in ["ann", "bob", "cat"] {
        c.register(name).await;
    }
    c.err(req::register("dan", PASSWORD), "rate_limited").await;
    c.login("ann").await;
}

/// Regression (hardening 4): a flood of registrations (from addresses the bucket lets through)
/// leaves the password hasher room for logins: a normal login keeps succeeding.
#[actix_rt::test]
async fn logins_succeed_during_a_registration_flood() {
    use rookery::config::RateConfig;
    let server = TestServer::start_with(|c| {
        c.database.bcrypt_cost = 8;
        c.auth.bcrypt_threads = 2;
        c.auth.bcrypt_queue = 16;
        c.auth.registrations_per_ip = RateConfig {
            count: 100_000,
            per_seconds: 1,
            burst: 100_000,
        };
    })
    .await;
    server.connect().await.register("ann").await;
    // `register` changes the session: each connection runs one at a time.
    let flood = Flood::prepare(server.ws_url(), vec![None; 40], None, 2, |client, n| {
        json!({"id": format!("r{n}"), "type": "register", "username": format!("f{client}x{n}"),
            "password": "flood-password"})
        .to_string()
    });
    let until = flood.start(Duration::from_secs(3)).await;
    actix_rt::time::sleep(Duration::from_millis(300)).await;
    let mut logins = 0;
    while Instant::now() + Duration::from_millis(300) < until {
        let mut c = server.connect().await;
        let reply = c.call(req::login("ann", PASSWORD)).await;
        assert_eq!(reply["type"], "ok", "login {logins}: {reply}");
        logins += 1;
    }
    let outcomes = flood.outcomes().await;
    assert!(outcomes.get("ok").is_some_and(|n| *n > 10), "{outcomes:?}");
    assert!(logins >= 3, "{logins} logins in the flood");
}

/// The tokens of `tokens` that the database holds as revoked.
fn revoked_count(db: &TestDb, tokens: &[String]) -> usize {
    use diesel::prelude::*;
    use rookery::schema::session_tokens::dsl::*;
    let hashes: Vec<Vec<u8>> = tokens
        .iter()
        .map(|t| rookery::actors::db::hash_token(t).0.to_vec())
        .collect();
    session_tokens
        .filter(token_hash.eq_any(hashes))
        .filter(revoked_at.is_not_null())
        .count()
        .get_result::<i64>(&mut db.conn())
        .unwrap() as usize
}

/// Regression (hardening 5): `logout` followed at once by a close frame revokes the token,
/// whether the logout was running or still waiting behind a join when the close came.
#[actix_rt::test]
async fn a_logout_cut_short_by_a_close_still_revokes() {
    let server = TestServer::start().await;
    server.public_room("general", ["ann"]).await;
    let mut tokens = Vec::new();
    for i in 0..10 {
        let mut c = server.connect().await;
        let token = c.login("ann").await["token"].as_str().unwrap().to_string();
        if i % 2 == 1 {
            c.send_request("j", &req::join("general")).await;
        }
        c.send_request("out", &req::logout()).await;
        c.close().await;
        tokens.push(token);
    }
    // Revocation is a database write of its own: under a loaded CI box it may take seconds.
    let deadline = Instant::now() + Duration::from_secs(10);
    while revoked_count(&server.db, &tokens) < tokens.len() && Instant::now() < deadline {
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(revoked_count(&server.db, &tokens), tokens.len());
    for token in &tokens {
        server
            .connect()
            .await
            .err(req::resume(token), "unauthorized")
            .await;
    }
}

/// Regression (hardening 5): a revoked token ends every live session using it (1008), and
/// one whose token expires is closed when it does.
#[actix_rt::test]
async fn revoked_and_expired_tokens_end_their_sessions() {
    let server = TestServer::start().await;
    let mut ann = server.user("ann").await;
    let token = ann.token.clone().unwrap();
    let mut others = Vec::new();
    for _ in 0..2 {
        let mut c = server.connect().await;
        c.ok(req::resume(&token)).await;
        others.push(c);
    }
    ann.ok(req::logout()).await;
    for mut other in others {
        assert_eq!(other.closed().await, 1008);
    }

    let bob = server.user("bob").await;
    let token = bob.token.clone().unwrap();
    bob.close().await;
    {
        use diesel::prelude::*;
        use rookery::schema::session_tokens::dsl::*;
        let soon = chrono::Utc::now() + chrono::TimeDelta::milliseconds(1500);
        diesel::update(
            session_tokens
                .filter(token_hash.eq(rookery::actors::db::hash_token(&token).0.to_vec())),
        )
        .set(expires_at.eq(soon))
        .execute(&mut server.db.conn())
        .unwrap();
    }
    let mut c = server.connect().await;
    c.ok(req::resume(&token)).await;
    let resumed = Instant::now();
    assert_eq!(c.closed().await, 1008);
    assert!(
        resumed.elapsed() < Duration::from_secs(3),
        "{:?}",
        resumed.elapsed()
    );
}

/// Regression (hardening 6): a client that stops reading its socket in a busy room (while
/// still sending pongs) is cut off within the heartbeat timeout, even though nothing can be
/// written to it any more: its session leaves the room.
#[actix_rt::test]
async fn a_reader_that_stops_reading_is_cut_off() {
    reader_that_stops_reading_is_cut_off(false).await;
}

#[actix_rt::test]
async fn a_reader_that_stops_reading_over_tls_is_cut_off() {
    reader_that_stops_reading_is_cut_off(true).await;
}

async fn reader_that_stops_reading_is_cut_off(tls: bool) {
    let policy = format!("{TEST_POLICY}max_body_bytes = 8192\n");
    let server = TestServer::start_with_policy(&policy, |c| {
        c.tls.enabled = tls;
        c.session.max_frame_bytes = 16 * 1024;
        c.session.ping_interval_ms = 500;
        c.session.client_timeout_ms = 2000;
        c.session.resume_grace_ms = 200;
    })
    .await;
    let [mut ann] = server.public_room("busy", ["ann"]).await;
    let mut slow = RawWs::connect(&server, 4096).await;
    slow.send(&json!({"id": "r", "type": "register", "username": "slow", "password": PASSWORD}))
        .await;
    slow.send(&json!({"id": "l", "type": "login", "username": "slow", "password": PASSWORD}))
        .await;
    slow.send(&json!({"id": "j", "type": "join", "room": "busy"}))
        .await;
    slow.read_until(r#""id":"j""#).await;
    let online = |reply: &serde_json::Value| {
        reply["online"]
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u == "slow")
    };
    assert!(online(&ann.ok(req::who("busy")).await));

    // From now on `slow` reads nothing, and sends a pong every half second.
    let pongs = actix_rt::spawn(async move {
        loop {
            if slow.write_frame(0xA, b"").await.is_err() {
                return;
            }
            actix_rt::time::sleep(Duration::from_millis(500)).await;
        }
    });
    let body = "x".repeat(8000);
    let started = Instant::now();
    let mut cut_off = None;
    for batch in 0..60 {
        let ids: Vec<String> = (0..50).map(|i| format!("b{batch}-{i}")).collect();
        for id in &ids {
            ann.send_request(id, &req::send("busy", body.as_str()))
                .await;
        }
        ann.replies_to(&ids).await;
        if !online(&ann.ok(req::who("busy")).await) {
            cut_off = Some(started.elapsed());
            break;
        }
        actix_rt::time::sleep(Duration::from_millis(100)).await;
    }
    pongs.abort();
    let cut_off = cut_off.expect("the reader that stopped reading is still in the room");
    assert!(
        cut_off < Duration::from_secs(6),
        "cut off after {cut_off:?}"
    );
}

/// Hardening 6: what waits behind a session-changing request is bounded in bytes, not only in
/// number: beyond `session.max_waiting_bytes` a request is answered `rate_limited`.
#[actix_rt::test]
async fn requests_waiting_behind_a_login_are_bounded_in_bytes() {
    let policy = format!("{TEST_POLICY}max_body_bytes = 60000\n");
    let server = TestServer::start_with_policy(&policy, |c| {
        c.session.max_waiting_bytes = 200_000;
        c.database.bcrypt_cost = 10; // the login runs long enough for all to queue behind it
    })
    .await;
    server.public_room("general", ["ann"]).await;
    server.connect().await.register("cat").await;
    let mut cat = server.connect().await;
    cat.send_request("l", &req::login("cat", PASSWORD)).await;
    cat.send_request("j", &req::join("general")).await;
    let sends: Vec<String> = (0..6).map(|i| format!("s{i}")).collect();
    for id in &sends {
        cat.send_request(id, &req::send("general", "x".repeat(50_000)))
            .await;
    }
    let mut all = sends.clone();
    all.extend(["l".to_string(), "j".to_string()]);
    let replies = cat.replies_to(&all).await;
    let codes: Vec<&str> = sends
        .iter()
        .map(|id| replies[id]["code"].as_str().unwrap_or("ok"))
        .collect();
    // The join and three sends of 50 kB fit in 200 kB; the fourth does not.
    assert_eq!(
        codes,
        [
            "ok",
            "ok",
            "ok",
            "rate_limited",
            "rate_limited",
            "rate_limited"
        ]
    );
    assert_eq!(replies["j"]["type"], "ok");
}

/// Hardening 6: one `join {after}` reply carries at most a quarter of
/// `session.outbound_limit_bytes` of messages: the newest that fit, with `truncated`.
#[actix_rt::test]
async fn a_join_after_reply_is_bounded_in_bytes() {
    let policy = format!("{TEST_POLICY}max_body_bytes = 8000\n");
    let server = TestServer::start_with_policy(&policy, |c| {
        c.session.outbound_limit_bytes = 256 * 1024;
    })
    .await;
    let [mut ann] = server.public_room("general", ["ann"]).await;
    // Not joined while the messages go out: joined, the 320 KB of them would reach bob live
    // and could cut him off as a slow reader (1013) before he reads.
    let mut bob = server.user("bob").await;
    // One at a time, reading each echo: 40 unread echoes of 8 KB would be more than ann's own
    // outbound limit allows (1013).
    for _ in 0..40 {
        ann.ok(req::send("general", "x".repeat(8000))).await;
        ann.take_events();
    }
    let reply = bob.ok(req::join_after("general", 0)).await;
    let missed = reply["missed"].as_array().unwrap();
    let bytes = serde_json::to_string(missed).unwrap().len();
    assert!(bytes <= 64 * 1024, "{bytes} bytes");
    assert!(missed.len() >= 7, "{} messages", missed.len());
    assert_eq!(reply["truncated"], true);
    assert_eq!(missed.last().unwrap()["seq"], 40, "the newest");
}

/// Regression (hardening 7): a connection that does not authenticate within
/// `session.auth_timeout_ms` is closed with 1008, even while it answers pings; one that did
/// stays open.
#[actix_rt::test]
async fn connections_that_never_authenticate_are_closed() {
    let server = TestServer::start_with(|c| {
        c.session.auth_timeout_ms = 600;
        c.session.ping_interval_ms = 100;
        c.session.client_timeout_ms = 5000;
    })
    .await;
    server.connect().await.register("ann").await;
    let mut idle = server.connect().await;
    let mut authed = server.connect().await;
    authed.login("ann").await;
    let opened = Instant::now();
    idle.ok(req::ping()).await;
    assert_eq!(idle.closed().await, 1008);
    assert!(
        opened.elapsed() < Duration::from_secs(3),
        "{:?}",
        opened.elapsed()
    );
    actix_rt::time::sleep(Duration::from_millis(300)).await;
    authed.ok(req::ping()).await;
}

/// Regression (hardening 7): before authentication only a few requests may be in flight.
#[actix_rt::test]
async fn an_anonymous_connection_has_only_a_few_requests_in_flight() {
    let server = TestServer::start_with(|c| c.database.bcrypt_cost = 10).await;
    server.connect().await.register("ann").await;
    let mut c = server.connect().await;
    let ids: Vec<String> = (0..6).map(|i| format!("l{i}")).collect();
    for id in &ids {
        c.send_request(id, &req::login("ann", "wrong-password"))
            .await;
    }
    let replies = c.replies_to(&ids).await;
    let codes: Vec<&str> = ids
        .iter()
        .map(|id| replies[id]["code"].as_str().unwrap())
        .collect();
    assert_eq!(
        codes,
        [
            "invalid_credentials",
            "invalid_credentials",
            "invalid_credentials",
            "invalid_credentials",
            "rate_limited",
            "rate_limited"
        ]
    );
}
