//! End-to-end tests: the real server in-process, a real Postgres database per test, and a
//! real WebSocket client, over ws and wss.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use diesel::prelude::*;
use diesel::sql_types::Text;
use serde_json::{json, Value};
use std::time::Duration;
use support::*;

// ---------------------------------------------------------------- HTTP and TLS

#[actix_rt::test]
async fn healthz_answers_with_security_headers() {
    let server = TestServer::start().await;
    let mut res = http_client()
        .get(server.http_url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body, json!({"status": "ok"}));
    for header in [
        "x-content-type-options",
        "x-frame-options",
        "content-security-policy",
        "referrer-policy",
    ] {
        assert!(res.headers().contains_key(header), "missing {header}");
    }
    let res = http_client()
        .get(server.http_url("/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
}

fn tls_server_config(config: &mut rookery::config::Config) {
    config.tls.enabled = true;
}

#[actix_rt::test]
async fn wss_with_the_generated_certificate() {
    use std::os::unix::fs::PermissionsExt;
    let server = TestServer::start_with(tls_server_config).await;
    let cert = server.data_dir.0.join("tls/cert.pem");
    let key = server.data_dir.0.join("tls/key.pem");
    assert!(cert.exists());
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let pem = std::fs::read(&cert).unwrap();
    let x509 = openssl::x509::X509::from_pem(&pem).unwrap();
    let names: Vec<String> = x509
        .subject_alt_names()
        .unwrap()
        .iter()
        .map(|n| {
            n.dnsname()
                .map(str::to_string)
                .or_else(|| n.ipaddress().map(|ip| format!("{ip:?}")))
                .unwrap()
        })
        .collect();
    assert!(names.contains(&"localhost".to_string()), "{names:?}");

    let mut res = http_client()
        .get(server.http_url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers().contains_key("strict-transport-security"));
    assert_eq!(res.json::<Value>().await.unwrap(), json!({"status": "ok"}));

    let [mut ann, mut bob] = server.public_room("lobby", ["ann", "bob"]).await;
    let ack = ann.send("lobby", "over tls").await;
    assert_eq!(ack["seq"], 1);
    let event = bob.next_event_of("message").await;
    assert_eq!(event["body"], "over tls");
    assert_eq!(event["from"], "ann");
}

/// A client's second wss connection resumes the TLS session the server issued on its first
/// (no certificate, no signature: what makes a reconnect storm cheaper), and works as any other.
#[actix_rt::test]
async fn a_reconnect_resumes_its_tls_session() {
    use rookery::client::{ConnectOptions, Connector};
    let server = TestServer::start_with(tls_server_config).await;
    server.user("ann").await;
    let options = ConnectOptions {
        insecure: true,
        ..ConnectOptions::default()
    };
    let connector = Connector::new(&options).unwrap();
    let mut first = connector.connect(&server.ws_url()).await.unwrap();
    first
        .send_request("1", &req::login("ann", PASSWORD))
        .await
        .unwrap();
    assert_eq!(first.recv().await.unwrap()["type"], "ok");
    assert_eq!(connector.tls_resumed(), 0);
    first.abandon();
    let mut second = connector.connect(&server.ws_url()).await.unwrap();
    assert_eq!(
        connector.tls_resumed(),
        1,
        "the second handshake was a full one"
    );
    second
        .send_request("2", &req::login("ann", PASSWORD))
        .await
        .unwrap();
    let reply = second.recv().await.unwrap();
    assert_eq!(reply["type"], "ok", "{reply}");
}

/// Only TLS 1.2 and 1.3 are offered.
#[actix_rt::test]
async fn tls_refuses_old_protocol_versions() {
    use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode, SslVersion};
    let server = TestServer::start_with(tls_server_config).await;
    let port = server.addr.port();
    let outcome = actix_web::rt::task::spawn_blocking(move || {
        let handshake = |max: SslVersion| {
            let mut builder = SslConnector::builder(SslMethod::tls()).unwrap();
            builder.set_verify(SslVerifyMode::NONE);
            builder.set_security_level(0);
            builder
                .set_min_proto_version(Some(SslVersion::TLS1))
                .unwrap();
            builder.set_max_proto_version(Some(max)).unwrap();
            let stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            builder.build().connect("localhost", stream).is_ok()
        };
        (
            handshake(SslVersion::TLS1_1),
            handshake(SslVersion::TLS1_2),
            handshake(SslVersion::TLS1_3),
        )
    })
    .await
    .unwrap();
    assert_eq!(outcome, (false, true, true));
}

/// An upgrade request over plain TCP (ws), with `extra` written right behind it in the same
/// write; returns what the server sent until it closed or went quiet for a second.
async fn raw_upgrade(server: &TestServer, path: &str, extra: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        server.addr
    )
    .into_bytes();
    request.extend_from_slice(extra);
    socket.write_all(&request).await.unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    while let Ok(Ok(n)) =
        tokio::time::timeout(Duration::from_secs(1), socket.read(&mut chunk)).await
    {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&chunk[..n]);
    }
    got
}

/// A client text frame (masked, as clients must) of `text`, under 126 bytes.
fn masked_text(text: &str) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut frame = vec![0x81, 0x80 | u8::try_from(text.len()).unwrap()];
    frame.extend_from_slice(&mask);
    frame.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// A client may send its first frames in the same packet as the upgrade request: they are the
/// session's first requests, answered in order.
#[actix_rt::test]
async fn frames_sent_with_the_upgrade_request_are_read() {
    let server = TestServer::start_with(|c| c.tls.enabled = false).await;
    let mut frames = masked_text(r#"{"id":"a","type":"ping"}"#);
    frames.extend(masked_text(r#"{"id":"b","type":"ping"}"#));
    let got = String::from_utf8_lossy(&raw_upgrade(&server, "/ws", &frames).await).into_owned();
    assert!(got.starts_with("HTTP/1.1 101"), "{got}");
    let (a, b) = (
        got.find(r#"{"type":"ok","id":"a"}"#),
        got.find(r#"{"type":"ok","id":"b"}"#),
    );
    assert!(a.is_some() && a < b, "both answered, in order: {got}");
}

/// A request that asks for an upgrade the server does not make gets its answer, and the
/// connection ends with it.
#[actix_rt::test]
async fn an_upgrade_to_anything_but_the_websocket_is_answered_and_closed() {
    let server = TestServer::start_with(|c| c.tls.enabled = false).await;
    let got = String::from_utf8_lossy(&raw_upgrade(&server, "/healthz", b"").await).into_owned();
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(
        got.to_ascii_lowercase().contains("connection: close"),
        "{got}"
    );
    assert!(
        got.ends_with(r#"{"status":"ok"}"#),
        "the body, then the close: {got}"
    );
    let got = String::from_utf8_lossy(&raw_upgrade(&server, "/nowhere", b"").await).into_owned();
    assert!(got.starts_with("HTTP/1.1 404"), "{got}");
}

// ---------------------------------------------------------------- accounts

#[actix_rt::test]
async fn register_login_resume_logout() {
    let server = TestServer::start().await;
    let mut c = server.connect().await;
    let reply = c.register("ann").await;
    assert!(reply["user"]["id"].is_string(), "ids are strings: {reply}");
    assert_eq!(reply["user"]["username"], "ann");

    c.err(req::register("ann", PASSWORD), "conflict").await;
    c.err(
        json!({"type": "register", "username": "zo", "password": PASSWORD}),
        "bad_request",
    )
    .await;
    c.err(
        json!({"type": "register", "username": "has space", "password": PASSWORD}),
        "bad_request",
    )
    .await;
    c.err(req::register("carl", "short"), "bad_request").await;
    let long = "x".repeat(73);
    c.err(req::register("carl", long), "bad_request").await;
    c.ok(req::register("carl", "x".repeat(72))).await;

    c.err(req::login("ann", "wrong-password"), "invalid_credentials")
        .await;
    c.err(req::login("nobody", PASSWORD), "invalid_credentials")
        .await;
    // Before auth, only register, login, resume and ping are served.
    c.err(req::rooms(), "unauthorized").await;
    c.err(req::join("a"), "unauthorized").await;
    c.ok(req::ping()).await;

    let reply = c.login("ann").await;
    let token = reply["token"].as_str().unwrap().to_string();
    assert!(token.len() >= 43, "256-bit token: {token}");
    c.err(req::login("ann", PASSWORD), "bad_request").await;

    // The token is stored hashed, never as given.
    let stored: Vec<String> = {
        #[derive(QueryableByName)]
        struct Row {
            #[diesel(sql_type = Text)]
            t: String,
        }
        diesel::sql_query("SELECT encode(token_hash, 'escape') AS t FROM session_tokens")
            .load::<Row>(&mut server.db.conn())
            .unwrap()
            .into_iter()
            .map(|r| r.t)
            .collect()
    };
    assert_eq!(stored.len(), 1);
    assert!(!stored[0].contains(&token));

    let mut other = server.connect().await;
    let reply = other.ok(req::resume(&token)).await;
    assert_eq!(reply["user"]["username"], "ann");
    assert_eq!(reply["rooms"], json!([]));
    other.ok(req::rooms()).await;

    let mut third = server.connect().await;
    third.err(req::resume("not-a-token"), "unauthorized").await;
    third.err(req::resume(""), "bad_request").await;

    c.ok(req::logout()).await;
    assert_eq!(c.closed().await, 1000);
    third.err(req::resume(&token), "unauthorized").await;
}

#[actix_rt::test]
async fn expired_tokens_do_not_resume() {
    let server = TestServer::start().await;
    let c = server.user("ann").await;
    let token = c.token.clone().unwrap();
    diesel::sql_query("UPDATE session_tokens SET expires_at = now() - interval '1 second'")
        .execute(&mut server.db.conn())
        .unwrap();
    let mut other = server.connect().await;
    other.err(req::resume(&token), "unauthorized").await;
}

#[actix_rt::test]
async fn passwords_are_bcrypt_hashes() {
    let server = TestServer::start().await;
    server.user("ann").await;
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = Text)]
        password_hash: String,
    }
    let rows = diesel::sql_query("SELECT password_hash FROM users")
        .load::<Row>(&mut server.db.conn())
        .unwrap();
    assert!(rows[0].password_hash.starts_with("$2"), "bcrypt hash");
    assert!(!rows[0].password_hash.contains(PASSWORD));
}

// ---------------------------------------------------------------- rooms

#[actix_rt::test]
async fn create_and_list_rooms() {
    let server = TestServer::start().await;
    let mut ann = server.user("ann").await;
    let mut bob = server.user("bob").await;
    server.user("cat").await;

    let reply = ann.create_room("general", "public", &[]).await;
    assert_eq!(
        reply["room"],
        json!({"name": "general", "kind": "public", "owner": "ann"})
    );
    let reply = ann.create_room("staff", "private", &["cat"]).await;
    assert_eq!(
        reply["room"],
        json!({"name": "staff", "kind": "private", "owner": "ann"})
    );
    bob.create_room("bobs", "private", &[]).await;

    ann.err(req::create_room("general", "public", &[]), "conflict")
        .await;
    ann.err(
        json!({"type": "create_room", "room": "Bad Name", "kind": "public"}),
        "bad_request",
    )
    .await;
    ann.err(
        json!({"type": "create_room", "room": "dm:ann:bob", "kind": "private"}),
        "bad_request",
    )
    .await;
    ann.err(
        json!({"type": "create_room", "room": "x", "kind": "secret"}),
        "bad_request",
    )
    .await;
    let reply = ann
        .err(
            req::create_room("ghosts", "private", &["nobody"]),
            "not_found",
        )
        .await;
    assert!(reply["message"].as_str().unwrap().contains("nobody"));
    ann.err(req::join("ghosts"), "not_found").await;

    ann.join("general").await;
    let rooms = ann.ok(req::rooms()).await["rooms"].clone();
    assert_eq!(
        rooms,
        json!([
            {"name": "general", "kind": "public", "joined": true, "last_seq": 0},
            {"name": "staff", "kind": "private", "joined": false, "last_seq": 0},
        ])
    );
    let rooms = bob.ok(req::rooms()).await["rooms"].clone();
    let names: Vec<&str> = rooms
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["bobs", "general"]);
}

#[actix_rt::test]
async fn private_rooms_admit_only_members() {
    let server = TestServer::start().await;
    let mut ann = server.user("ann").await;
    let mut cat = server.user("cat").await;
    let mut eve = server.user("eve").await;
    ann.create_room("staff", "private", &["cat"]).await;
    ann.create_room("open", "public", &[]).await;

    // The creator is a member without naming itself.
    ann.join("staff").await;
    cat.join("staff").await;
    eve.err(req::join("staff"), "forbidden").await;
    eve.err(req::history("staff", None, None), "forbidden")
        .await;
    eve.err(req::who("staff"), "forbidden").await;
    eve.err(req::send("staff", "let me in"), "forbidden").await;
    eve.err(req::typing("staff"), "forbidden").await;
    eve.join("open").await;

    ann.send("staff", "members only").await;
    ann.ok(req::typing("staff")).await;
    assert_eq!(cat.next_event_of("message").await["body"], "members only");
    cat.next_event_of("typing").await;
    eve.assert_no_event("message").await;
    assert!(
        eve.take_events().iter().all(|e| e["room"] != "staff"),
        "eve saw the private room"
    );
    let history = cat.ok(req::history("staff", None, None)).await;
    assert_eq!(history["messages"].as_array().unwrap().len(), 1);
}

// ---------------------------------------------------------------- messaging

#[actix_rt::test]
async fn two_users_see_the_same_messages_in_the_same_order() {
    let server = TestServer::start().await;
    let mut ann = server.user("ann").await;
    let mut bob = server.user("bob").await;
    ann.create_room("general", "public", &[]).await;
    let joined = ann.join("general").await;
    assert_eq!(
        joined["room"],
        json!({"name": "general", "kind": "public", "last_seq": 0})
    );
    bob.join("general").await;
    let event = ann.next_event_of("joined").await;
    assert_eq!(
        event,
        json!({"type": "joined", "room": "general", "user": "bob"})
    );

    // Both send without waiting for acks, interleaved.
    for i in 0..10 {
        ann.send_request(&format!("a{i}"), &req::send("general", format!("ann {i}")))
            .await;
        bob.send_request(&format!("b{i}"), &req::send("general", format!("bob {i}")))
            .await;
    }
    let mut seen = Vec::new();
    for client in [&mut ann, &mut bob] {
        let mut acks = 0;
        let mut messages = Vec::new();
        while acks < 10 || messages.len() < 20 {
            let frame = client.read().await.unwrap();
            match frame["type"].as_str().unwrap() {
                "ok" => acks += 1,
                "message" => messages.push((
                    frame["seq"].as_i64().unwrap(),
                    frame["body"].as_str().unwrap().to_string(),
                )),
                other => panic!("unexpected {other}: {frame}"),
            }
        }
        let seqs: Vec<i64> = messages.iter().map(|m| m.0).collect();
        assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
        seen.push(messages);
    }
    assert_eq!(seen[0], seen[1]);
    for who in ["ann", "bob"] {
        let own: Vec<&String> = seen[0]
            .iter()
            .map(|m| &m.1)
            .filter(|b| b.starts_with(who))
            .collect();
        let expected: Vec<String> = (0..10).map(|i| format!("{who} {i}")).collect();
        assert_eq!(
            own,
            expected.iter().collect::<Vec<_>>(),
            "each sender's order is kept"
        );
    }
}

#[actix_rt::test]
async fn send_is_acked_with_seq_and_time_and_retries_are_idempotent() {
    let server = TestServer::start().await;
    let [mut ann, mut bob] = server.public_room("general", ["ann", "bob"]).await;

    let send = req::send_keyed("general", "once", "c-1");
    let first = ann.ok(send.clone()).await;
    assert_eq!(first["seq"], 1);
    let sent_at = first["sent_at"].as_str().unwrap();
    assert!(
        chrono::DateTime::parse_from_rfc3339(sent_at).is_ok(),
        "{sent_at}"
    );
    assert!(sent_at.ends_with('Z'));
    let event = bob.next_event_of("message").await;
    assert_eq!(
        event,
        json!({"type": "message", "room": "general", "seq": 1, "from": "ann", "body": "once", "sent_at": sent_at, "client_msg_id": "c-1"})
    );

    let again = ann.ok(send.clone()).await;
    assert_eq!(
        (&again["seq"], &again["sent_at"]),
        (&first["seq"], &first["sent_at"])
    );
    bob.assert_no_event("message").await;
    // Another sender may use the same client_msg_id.
    bob.ok(req::send_keyed("general", "mine", "c-1")).await;
    assert_eq!(count_messages(&server), 2);
}

#[actix_rt::test]
async fn send_errors() {
    let server =
        TestServer::start_with_policy(&format!("{TEST_POLICY}max_body_bytes = 100\n"), |_| {})
            .await;
    let mut ann = server.user("ann").await;
    ann.create_room("general", "public", &[]).await;
    ann.err(req::send("general", "not joined"), "forbidden")
        .await;
    ann.join("general").await;
    ann.err(req::send("general", "x".repeat(101)), "too_large")
        .await;
    ann.ok(req::send("general", "é".repeat(50))).await;
    ann.err(req::send("general", "é".repeat(51)), "too_large")
        .await;
    ann.err(req::send("general", ""), "bad_request").await;
    ann.err(
        req::send_keyed("general", "x", "c".repeat(129)),
        "bad_request",
    )
    .await;
    ann.err(req::send("nowhere", "x"), "forbidden").await;
    ann.ok(req::leave("general")).await;
    ann.err(req::send("general", "left"), "forbidden").await;
    assert_eq!(count_messages(&server), 1);
}

#[actix_rt::test]
async fn leave_stops_delivery_and_tells_the_others() {
    let server = TestServer::start().await;
    let [mut ann, mut bob] = server.public_room("general", ["ann", "bob"]).await;
    bob.ok(req::leave("general")).await;
    assert_eq!(
        ann.next_event_of("left").await,
        json!({"type": "left", "room": "general", "user": "bob"})
    );
    ann.send("general", "after bob left").await;
    bob.assert_no_event("message").await;
    // Leaving a room one is not in is harmless.
    bob.ok(req::leave("general")).await;

    // A user's second session joining sends no second `joined`; its last leaving sends `left`.
    let mut ann2 = server.connect().await;
    ann2.login("ann").await;
    bob.join("general").await;
    ann2.join("general").await;
    bob.assert_no_event("joined").await;
    ann2.close().await;
    bob.assert_no_event("left").await;
    ann.ok(req::leave("general")).await;
    assert_eq!(bob.next_event_of("left").await["user"], "ann");
}

#[actix_rt::test]
async fn who_and_typing() {
    let server = TestServer::start_with(|c| c.session.resume_grace_ms = 300).await;
    let mut ann = server.user("ann").await;
    let mut bob = server.user("bob").await;
    ann.create_room("general", "public", &[]).await;
    ann.join("general").await;
    let who = bob.ok(req::who("general")).await;
    assert_eq!(who["online"], json!(["ann"]));
    bob.join("general").await;
    let who = bob.ok(req::who("general")).await;
    assert_eq!(who["online"], json!(["ann", "bob"]));
    bob.err(req::who("missing"), "not_found").await;

    bob.ok(req::typing("general")).await;
    assert_eq!(
        ann.next_event_of("typing").await,
        json!({"type": "typing", "room": "general", "user": "bob"})
    );
    bob.assert_no_event("typing").await;

    drop(bob);
    // A dropped connection stays listed through the resume grace, then goes.
    let who = ann.ok(req::who("general")).await;
    assert_eq!(who["online"], json!(["ann", "bob"]));
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let who = ann.ok(req::who("general")).await;
        if who["online"] == json!(["ann"]) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "bob still listed: {who}"
        );
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }
}

#[actix_rt::test]
async fn history_pages_backwards_from_memory_and_database() {
    // A ring buffer of 5 so that older pages come from the database.
    let server =
        TestServer::start_with_policy(&format!("{TEST_POLICY}history_limit = 5\n"), |_| {}).await;
    let mut ann = server.user("ann").await;
    ann.create_room("general", "public", &[]).await;
    ann.join("general").await;
    for i in 1..=12 {
        ann.send("general", &format!("m{i}")).await;
    }
    let bodies = |page: &Value| -> Vec<String> {
        page["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["body"].as_str().unwrap().to_string())
            .collect()
    };
    let page = ann.ok(req::history("general", None, None)).await;
    assert_eq!(
        bodies(&page),
        ["m8", "m9", "m10", "m11", "m12"],
        "default limit is history_limit"
    );
    assert_eq!(page["has_more"], true);
    let page = ann.ok(req::history("general", None, Some(3))).await;
    assert_eq!(bodies(&page), ["m10", "m11", "m12"]);
    let page = ann.ok(req::history("general", Some(10), Some(4))).await;
    assert_eq!(bodies(&page), ["m6", "m7", "m8", "m9"]);
    assert_eq!(page["has_more"], true);
    let page = ann.ok(req::history("general", Some(3), Some(100))).await;
    assert_eq!(bodies(&page), ["m1", "m2"]);
    assert_eq!(page["has_more"], false);
    let first = &page["messages"][0];
    assert_eq!(first["seq"], 1);
    assert_eq!(first["from"], "ann");
    assert_eq!(first["room"], "general");
    let page = ann.ok(req::history("general", Some(1), None)).await;
    assert_eq!(page["messages"], json!([]));
    assert_eq!(page["has_more"], false);

    // A reader that never joined may read a public room's history.
    let mut bob = server.user("bob").await;
    let page = bob.ok(req::history("general", None, Some(100))).await;
    assert_eq!(page["messages"].as_array().unwrap().len(), 12);

    ann.err(
        json!({"type": "history", "room": "general", "limit": 0}),
        "bad_request",
    )
    .await;
    ann.err(
        json!({"type": "history", "room": "general", "limit": 101}),
        "bad_request",
    )
    .await;
    ann.err(
        json!({"type": "history", "room": "general", "before": -1}),
        "bad_request",
    )
    .await;
    ann.err(req::history("nowhere", None, None), "not_found")
        .await;
}

#[actix_rt::test]
async fn rooms_stop_when_idle_and_restart_with_their_history() {
    let server = TestServer::start_with(|c| c.rooms.idle_stop_ms = 100).await;
    let mut ann = server.user("ann").await;
    ann.create_room("general", "public", &[]).await;
    ann.join("general").await;
    ann.send("general", "before the stop").await;
    ann.ok(req::leave("general")).await;
    actix_rt::time::sleep(Duration::from_millis(500)).await;
    let joined = ann.join("general").await;
    assert_eq!(joined["room"]["last_seq"], 1);
    assert_eq!(ann.send("general", "after").await["seq"], 2);
    let page = ann.ok(req::history("general", None, None)).await;
    assert_eq!(page["messages"][0]["body"], "before the stop");
}

// ---------------------------------------------------------------- encryption at rest

fn count_messages(server: &TestServer) -> i64 {
    use diesel::dsl::count_star;
    rookery::schema::messages::table
        .select(count_star())
        .first(&mut server.db.conn())
        .unwrap()
}

#[actix_rt::test]
async fn no_column_holds_a_body_in_plaintext() {
    let server = TestServer::start().await;
    let mut ann = server.user("ann").await;
    ann.create_room("general", "public", &[]).await;
    ann.join("general").await;
    let body = "the-unmistakable-plaintext-canary-7f3a";
    ann.send("general", body).await;
    ann.ok(req::send_keyed("general", body, "x1")).await;

    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = Text)]
        t: String,
    }
    let mut conn = server.db.conn();
    let tables = diesel::sql_query(
        "SELECT table_name AS t FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .load::<Row>(&mut conn)
    .unwrap();
    assert!(tables.iter().any(|t| t.t == "messages"));
    let hex: String = body.bytes().map(|b| format!("{b:02x}")).collect();
    let mut rows_seen = 0;
    for table in tables {
        // Every column as text; bytea renders as hex, so look for both forms.
        let rows = diesel::sql_query(format!("SELECT t::text AS t FROM \"{}\" t", table.t))
            .load::<Row>(&mut conn)
            .unwrap();
        for row in rows {
            rows_seen += 1;
            assert!(!row.t.contains(body), "{}: {}", table.t, row.t);
            assert!(!row.t.contains(&hex), "{}: {}", table.t, row.t);
        }
    }
    assert!(rows_seen > 3);
    let page = ann.ok(req::history("general", None, None)).await;
    assert_eq!(page["messages"][0]["body"], body);
}

#[actix_rt::test]
async fn a_tampered_row_is_reported_not_served() {
    // Ring buffer of 1, so history of older messages is read and decrypted from the database.
    let server =
        TestServer::start_with_policy(&format!("{TEST_POLICY}history_limit = 1\n"), |_| {}).await;
    let mut ann = server.user("ann").await;
    ann.create_room("general", "public", &[]).await;
    ann.join("general").await;
    for body in ["first", "second", "third"] {
        ann.send("general", body).await;
    }
    diesel::sql_query(
        "UPDATE messages SET ciphertext = set_byte(ciphertext, 0, get_byte(ciphertext, 0) # 1) WHERE seq = 2",
    )
    .execute(&mut server.db.conn())
    .unwrap();
    let page = ann.ok(req::history("general", Some(3), Some(10))).await;
    let messages = page["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0]["body"], "first");
    assert_eq!(messages[1]["seq"], 2);
    assert!(messages[1].get("body").is_none(), "{}", messages[1]);
    assert_eq!(messages[1]["error"], "undecryptable");

    // A row moved to another seq fails too: the ciphertext is bound to its room and seq.
    diesel::sql_query("UPDATE messages SET seq = 0 WHERE seq = 1")
        .execute(&mut server.db.conn())
        .unwrap();
    let page = ann.ok(req::history("general", Some(2), Some(5))).await;
    assert_eq!(page["messages"][0]["seq"], 0);
    assert_eq!(page["messages"][0]["error"], "undecryptable");
}

// ---------------------------------------------------------------- bad input

#[actix_rt::test]
async fn bad_frames_get_errors_and_the_connection_stays_open() {
    let server = TestServer::start().await;
    let mut c = server.connect().await;
    let cases: [(&str, Value); 9] = [
        ("not json", Value::Null),
        ("[1,2,3]", Value::Null),
        (r#"{"type":"ping"}"#, Value::Null),
        (r#"{"id":7,"type":"ping"}"#, Value::Null),
        (r#"{"id":"a","type":"fly"}"#, json!("a")),
        (r#"{"id":"b"}"#, json!("b")),
        (
            r#"{"id":"c","type":"register","username":"ann"}"#,
            json!("c"),
        ),
        (
            r#"{"id":"d","type":"register","username":"ann","password":12345678}"#,
            json!("d"),
        ),
        (r#"{"id":"e","type":"invite","room":"a"}"#, json!("e")),
    ];
    for (text, id) in cases {
        c.send_text(text).await;
        let reply = c.read().await.unwrap();
        assert_eq!(reply["type"], "error", "{text}");
        assert_eq!(reply["code"], "bad_request", "{text}");
        assert_eq!(reply["id"], id, "{text}");
        assert!(reply["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    c.send_binary(b"\x00\x01").await;
    let reply = c.read().await.unwrap();
    assert_eq!(
        (reply["code"].as_str(), &reply["id"]),
        (Some("bad_request"), &Value::Null)
    );
    c.ok(req::ping()).await;
    c.register("ann").await;
}

#[actix_rt::test]
async fn a_client_that_keeps_sending_garbage_is_closed_with_1008() {
    let server = TestServer::start().await;
    let mut c = server.connect().await;
    for _ in 0..21 {
        c.send_text("garbage").await;
    }
    assert_eq!(c.closed().await, 1008);
    let errors = c
        .take_events()
        .iter()
        .filter(|f| f["code"] == "bad_request")
        .count();
    assert_eq!(errors, 21);
}

#[actix_rt::test]
async fn an_oversized_frame_closes_with_1009() {
    let server = TestServer::start_with(|c| c.session.max_frame_bytes = 8192).await;
    let mut c = server.connect().await;
    c.send_text(&format!(
        r#"{{"id":"1","type":"ping","pad":"{}"}}"#,
        "x".repeat(8000)
    ))
    .await;
    c.read().await.unwrap();
    c.send_text(&"x".repeat(9000)).await;
    assert_eq!(c.closed().await, 1009);
}

#[actix_rt::test]
async fn a_silent_client_is_closed_after_the_heartbeat_timeout() {
    let server = TestServer::start_with(|c| {
        c.session.ping_interval_ms = 100;
        c.session.client_timeout_ms = 300;
    })
    .await;
    let mut silent = server.connect().await;
    let mut lively = server.connect().await;
    // `lively` keeps talking; `silent` neither sends nor reads, so it never answers a ping.
    for _ in 0..8 {
        lively.ok(req::ping()).await;
        actix_rt::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(silent.closed().await, 1000);
    lively.ok(req::ping()).await;
}

// ---------------------------------------------------------------- migrations and CLI

#[actix_rt::test]
async fn migrations_go_down_and_up_again() {
    let db = TestDb::new();
    let mut conn = db.conn();
    let all = rookery::store::migration_count();
    assert!(all >= 2, "{all}");
    assert_eq!(rookery::store::run_migrations(&mut conn).unwrap(), all);
    assert_eq!(rookery::store::run_migrations(&mut conn).unwrap(), 0);
    assert_eq!(
        rookery::store::revert_all_migrations(&mut conn).unwrap(),
        all
    );
    assert_eq!(rookery::store::run_migrations(&mut conn).unwrap(), all);
}

#[actix_rt::test]
async fn usernames_are_one_account_whatever_their_case() {
    let server = TestServer::start().await;
    let mut ann = server.connect().await;
    ann.register("Ann").await;
    let mut other = server.connect().await;
    other.err(req::register("ann", PASSWORD), "conflict").await;
    other.err(req::register("ANN", PASSWORD), "conflict").await;
    // Login accepts any case; the account keeps the spelling it registered.
    let reply = other.ok(req::login("aNN", PASSWORD)).await;
    assert_eq!(reply["user"]["username"], "Ann", "{reply}");
    ann.login("ann").await;
    ann.create_room("lobby", "public", &[]).await;
    ann.join("lobby").await;
    let sent = ann.send("lobby", "hi").await;
    other.join("lobby").await;
    let page = other
        .ok(json!({"type": "history", "room": "lobby", "limit": 5}))
        .await;
    let from: Vec<&Value> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["from"])
        .collect();
    assert_eq!(from, vec!["Ann"], "{page} after {sent}");
}

#[actix_rt::test]
async fn the_case_migration_names_existing_duplicates_and_refuses() {
    use diesel::connection::SimpleConnection;
    use diesel_migrations::MigrationHarness;
    let db = TestDb::new();
    let mut conn = db.conn();
    let all = rookery::store::run_migrations(&mut conn).unwrap();
    // Back to before the case migration (2026-12-02-000001) and those after it.
    let mut reverted = 0;
    while conn
        .applied_migrations()
        .unwrap()
        .iter()
        .any(|v| v.to_string().replace(['-', '_'], "").as_str() >= "20261202000001")
    {
        conn.revert_last_migration(rookery::store::MIGRATIONS)
            .unwrap();
        reverted += 1;
    }
    assert!(reverted >= 1 && reverted < all);
    conn.batch_execute(
        "INSERT INTO users (username, password_hash) VALUES \
         ('Ann', 'x'), ('ann', 'x'), ('bob', 'x'), ('BOB', 'x'), ('carl', 'x')",
    )
    .unwrap();
    let refused = rookery::store::run_migrations(&mut conn)
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("Ann, ann") && refused.contains("bob, BOB") && !refused.contains("carl"),
        "{refused}"
    );
    conn.batch_execute(
        "UPDATE users SET username = 'ann2' WHERE username = 'ann'; \
                        DELETE FROM users WHERE username = 'BOB'",
    )
    .unwrap();
    assert_eq!(rookery::store::run_migrations(&mut conn).unwrap(), reverted);
}

/// Why `prepare` refused to start, as the operator reads it.
fn start_refusal(config: rookery::config::Config) -> String {
    match rookery::server::prepare(config) {
        Ok(_) => panic!("the server started"),
        Err(e) => e.to_string(),
    }
}

#[actix_rt::test]
async fn the_server_refuses_to_start_when_commits_are_not_durable() {
    use diesel::connection::SimpleConnection;
    let db = TestDb::new();
    let data = TempDir::new();
    let config = test_config(&db, &data);
    rookery::server::migrate(&config).unwrap();
    let mut conn = db.conn();
    let set = |conn: &mut PgConnection, value: &str| {
        let sql = format!(
            "ALTER DATABASE \"{}\" SET synchronous_commit = {value}",
            db.name
        );
        conn.batch_execute(&sql).unwrap();
    };
    set(&mut conn, "off");
    let refused = start_refusal(config.clone());
    assert!(refused.contains("synchronous_commit = off"), "{refused}");
    set(&mut conn, "local");
    assert!(start_refusal(config.clone()).contains("synchronous_commit = local"));
    set(&mut conn, "remote_apply");
    assert!(rookery::server::prepare(config).is_ok());
}

#[actix_rt::test]
async fn a_lost_or_different_message_key_stops_the_start() {
    let server = TestServer::start().await;
    let [mut ann] = server.public_room("keys", ["ann"]).await;
    ann.send("keys", "sealed with key 1").await;
    server.shutdown_gracefully().await;
    let key_file = server.config.key_file();
    let original = std::fs::read(&key_file).unwrap();

    std::fs::remove_file(&key_file).unwrap();
    let refused = start_refusal(server.config.clone());
    assert!(
        refused.contains("[1]") && refused.contains(&key_file.display().to_string()),
        "{refused}"
    );
    assert!(!key_file.exists(), "no new key was generated in its place");

    // Another key under the same id is refused for its check value.
    let other = format!("1 {}\n", base64_of(&[9u8; 32]));
    std::fs::write(&key_file, other).unwrap();
    let refused = start_refusal(server.config.clone());
    assert!(refused.contains("key 1 is not the key"), "{refused}");

    std::fs::write(&key_file, original).unwrap();
    assert!(rookery::server::prepare(server.config.clone()).is_ok());
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[actix_rt::test]
async fn a_message_moved_to_another_sender_or_time_in_the_database_fails_to_open() {
    use diesel::connection::SimpleConnection;
    let server = TestServer::start().await;
    let [mut ann, _bob] = server.public_room("bound", ["ann", "bob"]).await;
    for body in ["one", "two", "three"] {
        ann.send("bound", body).await;
    }
    server.db.conn().batch_execute(
        "UPDATE messages SET sender_id = (SELECT id FROM users WHERE username = 'bob') WHERE seq = 1; \
         UPDATE messages SET created_at = created_at - interval '1 hour' WHERE seq = 2",
    )
    .unwrap();
    let server = server.restart().await;
    let mut reader = server.connect().await;
    reader.login("ann").await;
    reader.join("bound").await;
    let page = reader
        .ok(json!({"type": "history", "room": "bound", "limit": 10}))
        .await;
    let messages = page["messages"].as_array().unwrap();
    let opened: Vec<(&Value, &Value)> =
        messages.iter().map(|m| (&m["body"], &m["error"])).collect();
    assert_eq!(
        opened,
        vec![
            (&Value::Null, &json!("undecryptable")),
            (&Value::Null, &json!("undecryptable")),
            (&json!("three"), &Value::Null),
        ],
        "{page}"
    );
}

#[actix_rt::test]
async fn the_server_creates_a_missing_database() {
    let db = TestDb::new();
    let mut url = url::Url::parse(&db.url).unwrap();
    let name = format!("{}_new", db.name);
    url.set_path(&format!("/{name}"));
    let data = TempDir::new();
    let mut config = test_config(&db, &data);
    config.database.url = rookery::secret::Secret::new(url.to_string());
    let applied = rookery::server::migrate(&config).unwrap();
    assert_eq!(applied, rookery::store::migration_count());
    let _cleanup = TestDb {
        name,
        url: url.to_string(),
    };
}

fn rookery_cli(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_rookery"));
    cmd.args(args).env_remove("DATABASE_URL");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[test]
fn check_config_says_what_is_wrong_and_where() {
    let dir = TempDir::new();
    let ok = rookery_cli(&["check-config"], &[]);
    assert!(ok.status.success(), "{ok:?}");

    let file = dir.0.join("bad.toml");
    std::fs::write(&file, "[session]\nping_interval_ms = \"often\"\n").unwrap();
    let out = rookery_cli(&["check-config", "--config", file.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("session.ping_interval_ms") && err.contains("bad.toml"),
        "{err}"
    );

    std::fs::write(&file, "[rooms]\nhistory_limitt = 3\n").unwrap();
    let out = rookery_cli(&["check-config", "--config", file.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("history_limitt"));

    let out = rookery_cli(
        &["check-config"],
        &[("ROOKERY__SERVER__BIND", "not-an-address")],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("server.bind"));

    let out = rookery_cli(
        &["check-config", "--config", "/nonexistent/rookery.toml"],
        &[],
    );
    assert!(!out.status.success());

    let out = rookery_cli(
        &["check-config"],
        &[("DATABASE_URL", "postgres://u:hunter2@db/chat")],
    );
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("db/chat") && !text.contains("hunter2"),
        "{text}"
    );
}

#[test]
fn check_config_prints_every_problem_at_once_with_its_place() {
    let dir = TempDir::new();
    let file = dir.0.join("three.toml");
    std::fs::write(
        &file,
        "[session]\nping_interval_ms = \"often\"\n\n[rooms]\nidle_stop_mss = 3\n\n[database]\nexecutors = 0\n",
    )
    .unwrap();
    let out = rookery_cli(
        &["check-config", "--config", file.to_str().unwrap()],
        &[("ROOKERY__SERVER__BIND", "not-an-address")],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let path = file.display().to_string();
    for expected in [
        format!("{path}:2:1: session.ping_interval_ms:"),
        format!("{path}:5:1: rooms.idle_stop_mss: unknown key"),
        format!("{path}:8:1: database.executors: must be 1..64"),
        "server.bind: 'not-an-address' is not an ip:port address".to_string(),
        "ROOKERY__SERVER__BIND".to_string(),
    ] {
        assert!(err.contains(&expected), "missing {expected:?} in:\n{err}");
    }
}

/// A client may send requests without waiting for replies: each one sees the effect of the
/// session-changing requests before it (regression: login raced register).
#[actix_rt::test]
async fn pipelined_requests_take_effect_in_order() {
    let server = TestServer::start().await;
    let mut c = server.connect().await;
    let frames = [
        ("1", req::register("ann", PASSWORD)),
        ("2", req::login("ann", PASSWORD)),
        ("3", req::create_room("general", "public", &[])),
        ("4", req::join("general")),
        ("5", req::send("general", "one")),
        ("6", req::send("general", "two")),
        ("7", req::leave("general")),
        ("8", req::send("general", "after leaving")),
    ];
    for (id, request) in &frames {
        c.send_request(id, request).await;
    }
    let mut replies = std::collections::BTreeMap::new();
    while replies.len() < frames.len() {
        let frame = c.read().await.unwrap();
        if let Some(id) = frame["id"].as_str() {
            replies.insert(id.to_string(), frame);
        }
    }
    for id in ["1", "2", "3", "4", "5", "6", "7"] {
        assert_eq!(replies[id]["type"], "ok", "{id}: {}", replies[id]);
    }
    assert_eq!(
        (replies["5"]["seq"].as_i64(), replies["6"]["seq"].as_i64()),
        (Some(1), Some(2))
    );
    assert_eq!(replies["8"]["code"], "forbidden");
}

#[actix_rt::test]
async fn a_rotated_key_seals_new_messages_and_old_ones_still_open() {
    let server =
        TestServer::start_with_policy(&format!("{TEST_POLICY}history_limit = 1\n"), |_| {}).await;
    let mut ann = server.user("ann").await;
    ann.create_room("general", "public", &[]).await;
    ann.join("general").await;
    ann.send("general", "sealed with key 1").await;
    drop(ann);

    let data_dir = server.data_dir.0.to_str().unwrap().to_string();
    let out = rookery_cli(&["rotate-key"], &[("ROOKERY__DATA_DIR", &data_dir)]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("added message key 2"));

    let server = server.restart().await;
    let mut ann = server.connect().await;
    ann.login("ann").await;
    ann.join("general").await;
    ann.send("general", "sealed with key 2").await;
    let page = ann.ok(req::history("general", None, Some(10))).await;
    let bodies: Vec<&str> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"].as_str().unwrap())
        .collect();
    assert_eq!(bodies, ["sealed with key 1", "sealed with key 2"]);
    let key_ids: Vec<i32> = rookery::schema::messages::table
        .select(rookery::schema::messages::key_id)
        .order(rookery::schema::messages::seq)
        .load(&mut server.db.conn())
        .unwrap();
    assert_eq!(key_ids, [1, 2]);
}

/// Logout leaves every room at once (no resume grace) and nothing queued after it runs.
#[actix_rt::test]
async fn logout_leaves_rooms_at_once() {
    let server = TestServer::start_with(|c| c.session.resume_grace_ms = 60_000).await;
    let [mut ann, mut bob] = server.public_room("general", ["ann", "bob"]).await;
    ann.send_request("out", &req::logout()).await;
    ann.send_request("late", &req::send("general", "after logout"))
        .await;
    assert_eq!(bob.next_event_of("left").await["user"], "ann");
    let mut late = None;
    loop {
        match ann.read().await {
            Ok(frame) if frame["id"] == "late" => late = Some(frame),
            Ok(_) => {}
            Err(Closed::Code(code)) => {
                assert_eq!(code, 1000);
                break;
            }
            Err(Closed::NoFrame) => break,
        }
    }
    if let Some(late) = late {
        assert_eq!(late["type"], "error", "{late}");
    }
    bob.assert_no_event("message").await;
    assert_eq!(count_messages(&server), 0);
}

/// Joining a room again with `after` returns what was missed, and no message twice.
#[actix_rt::test]
async fn rejoining_with_after_repeats_nothing() {
    let server = TestServer::start().await;
    let [mut ann, mut bob] = server.public_room("general", ["ann", "bob"]).await;
    for i in 0..30 {
        ann.send_request(&format!("s{i}"), &req::send("general", format!("m{i}")))
            .await;
        if i == 10 {
            bob.send_request("again", &req::join_after("general", 0))
                .await;
        }
    }
    let mut seqs: Vec<i64> = Vec::new();
    let mut replied = false;
    while seqs.last() != Some(&30) {
        let frame = bob.read().await.unwrap();
        if frame["id"] == "again" {
            // Everything up to last_seq is in `missed` (bob asked from 0); then live events.
            replied = true;
            seqs = frame["missed"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["seq"].as_i64().unwrap())
                .collect();
        } else if replied && frame["type"] == "message" {
            seqs.push(frame["seq"].as_i64().unwrap());
        }
    }
    assert_eq!(seqs, (1..=30).collect::<Vec<_>>());
}
