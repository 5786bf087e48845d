//! The operator's view against the real server, database and binary: `/metrics`, the
//! `rookery user …` commands acting on live sessions, closed registration, and `rookery
//! verify` on a healthy and on a damaged store.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use diesel::RunQueryDsl;
use std::process::Output;
use std::time::{Duration, Instant};
use support::*;

/// Runs `rookery ARGS` against `server`'s database and data directory (its key file), with
/// `password` as ROOKERY_PASSWORD when given.
fn rookery(server: &TestServer, args: &[&str], password: Option<&str>) -> Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_rookery"));
    command
        .args(args)
        .env("DATABASE_URL", &server.db.url)
        .env("ROOKERY__DATA_DIR", &server.data_dir.0)
        .env("ROOKERY__DATABASE__BCRYPT_COST", "4")
        .env("ROOKERY__AUTH__REVOCATION_CHECK_MS", "200")
        .env_remove("ROOKERY_PASSWORD")
        .stdin(std::process::Stdio::null());
    if let Some(password) = password {
        command.env("ROOKERY_PASSWORD", password);
    }
    command.output().unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

async fn quick_revocations() -> TestServer {
    TestServer::start_with(|c| c.auth.revocation_check_ms = 200).await
}

/// Reads the connection until it closes; the close code, within a few seconds.
async fn closes_within(client: &mut Client, bound: Duration) -> u16 {
    let started = Instant::now();
    let code = client.closed().await;
    assert!(
        started.elapsed() < bound,
        "closed only after {:?}",
        started.elapsed()
    );
    code
}

#[actix_rt::test]
async fn disable_closes_live_sessions_refuses_logins_and_enable_lets_back_in() {
    let server = quick_revocations().await;
    let mut ann = server.user("ann").await;
    let token = ann.token.clone().unwrap();
    let mut bob = server.user("bob").await;

    let out = rookery(&server, &["user", "disable", "ann"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("disabled ann"), "{}", stdout(&out));
    assert_eq!(closes_within(&mut ann, Duration::from_secs(3)).await, 1008);
    // Only ann's sessions end.
    bob.ok(req::ping()).await;

    let mut again = server.connect().await;
    let e = again.err(req::login("ann", PASSWORD), "forbidden").await;
    assert!(e["message"].as_str().unwrap().contains("disabled"), "{e}");
    // A wrong password still says only that.
    again
        .err(req::login("ann", "wrong-password"), "invalid_credentials")
        .await;
    again.err(req::resume(&token), "unauthorized").await;

    let list = rookery(&server, &["user", "list"], None);
    assert!(list.status.success(), "{}", stderr(&list));
    let text = stdout(&list);
    let ann_line = text.lines().find(|l| l.starts_with("ann ")).unwrap();
    assert!(ann_line.contains("disabled"), "{text}");
    let bob_line = text.lines().find(|l| l.starts_with("bob ")).unwrap();
    assert!(bob_line.contains("active"), "{text}");
    assert!(text.contains("2 user(s)"), "{text}");

    let out = rookery(&server, &["user", "enable", "ann"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    again.login("ann").await;
}

#[actix_rt::test]
async fn revoke_tokens_and_reset_password_log_the_user_out_everywhere() {
    let server = quick_revocations().await;
    let mut phone = server.user("ann").await;
    let mut laptop = server.connect().await;
    laptop.login("ann").await;

    let out = rookery(&server, &["user", "revoke-tokens", "ann"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("revoked 2 token(s)"),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        closes_within(&mut phone, Duration::from_secs(3)).await,
        1008
    );
    assert_eq!(
        closes_within(&mut laptop, Duration::from_secs(3)).await,
        1008
    );

    let mut desk = server.connect().await;
    desk.login("ann").await;
    let out = rookery(
        &server,
        &["user", "reset-password", "ann"],
        Some("a-new-password"),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(closes_within(&mut desk, Duration::from_secs(3)).await, 1008);
    let mut fresh = server.connect().await;
    fresh
        .err(req::login("ann", PASSWORD), "invalid_credentials")
        .await;
    fresh.ok(req::login("ann", "a-new-password")).await;
}

#[actix_rt::test]
async fn user_commands_name_what_is_wrong() {
    let server = TestServer::start().await;
    let out = rookery(&server, &["user", "disable", "nobody"], None);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no user named 'nobody'"),
        "{}",
        stderr(&out)
    );
    let out = rookery(&server, &["user", "add", "ann"], Some("short"));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("at least 8"), "{}", stderr(&out));
    let out = rookery(&server, &["user", "add", "bad name!"], Some("long-enough"));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("username"), "{}", stderr(&out));
    server.user("ann").await;
    let out = rookery(&server, &["user", "add", "ANN"], Some("long-enough"));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("exists already"), "{}", stderr(&out));
    // No password and no terminal to ask on: refused, nothing created.
    let out = rookery(&server, &["user", "add", "cat"], None);
    assert!(!out.status.success());
    let list = stdout(&rookery(&server, &["user", "list"], None));
    assert!(list.contains("1 user(s)"), "{list}");
}

#[actix_rt::test]
async fn closed_registration_refuses_register_and_operators_add_users() {
    let server = TestServer::start_with(|c| {
        c.auth.registration = rookery::config::Registration::Closed;
    })
    .await;
    let mut client = server.connect().await;
    let e = client
        .err(req::register("ann", PASSWORD), "forbidden")
        .await;
    assert!(e["message"].as_str().unwrap().contains("closed"), "{e}");
    let out = rookery(&server, &["user", "add", "ann"], Some(PASSWORD));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("added user ann"));
    client.login("ann").await;
}

/// A Prometheus text exposition: every sample line is `name{labels} value` with a known
/// metric name and a number; returns the samples by name-with-labels.
fn parse_exposition(text: &str) -> std::collections::HashMap<String, f64> {
    let mut typed = std::collections::HashSet::new();
    let mut samples = std::collections::HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let name = parts.next().unwrap();
            let kind = parts.next().unwrap();
            assert!(
                ["counter", "gauge", "histogram"].contains(&kind),
                "type of {name}: {kind}"
            );
            typed.insert(name.to_string());
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "{line}"
        );
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
            .unwrap_or(name);
        assert!(typed.contains(family), "sample before its TYPE: {line}");
        if let Some(labels) = series.strip_prefix(name) {
            if !labels.is_empty() {
                assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
            }
        }
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("not a number: {line}"));
        samples.insert(series.to_string(), value);
    }
    samples
}

async fn scrape(server: &TestServer) -> std::collections::HashMap<String, f64> {
    let url = format!("http://{}/metrics", server.metrics_addr.unwrap());
    let mut res = http_client().get(url).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let content_type = res.headers().get("content-type").unwrap().to_str().unwrap();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    let body = res.body().await.unwrap();
    parse_exposition(std::str::from_utf8(&body).unwrap())
}

#[actix_rt::test]
async fn metrics_move_when_messages_flow() {
    let server = TestServer::start().await;
    let before = scrape(&server).await;
    assert_eq!(before["rookery_connections_open"], 0.0);
    let [mut ann, mut bob] = server.public_room("general", ["ann", "bob"]).await;
    for i in 0..5 {
        ann.send("general", &format!("hello {i}")).await;
    }
    for _ in 0..5 {
        bob.next_event_of("message").await;
    }
    bob.err(req::send("nowhere", "x"), "forbidden").await;
    let mut stranger = server.connect().await;
    stranger
        .err(req::login("ann", "wrong-password"), "invalid_credentials")
        .await;
    let after = scrape(&server).await;
    assert_eq!(after["rookery_connections_open"], 3.0);
    assert_eq!(after["rookery_sessions_authenticated"], 2.0);
    assert_eq!(after["rookery_rooms_active"], 1.0);
    assert_eq!(after["rookery_messages_received_total"], 5.0);
    assert_eq!(after["rookery_messages_stored_total"], 5.0);
    // Each message reached both members.
    assert_eq!(after["rookery_messages_delivered_total"], 10.0);
    assert_eq!(after[r#"rookery_errors_total{code="forbidden"}"#], 1.0);
    assert_eq!(after[r#"rookery_logins_total{result="ok"}"#], 2.0);
    assert_eq!(
        after[r#"rookery_logins_total{result="invalid_credentials"}"#],
        1.0
    );
    assert!(after["rookery_commit_batch_messages_count"] >= 1.0);
    assert_eq!(after["rookery_commit_batch_messages_sum"], 5.0);
    assert!(after["rookery_store_seconds_count"] >= 1.0);
    stranger.close().await;
    ann.ok(req::logout()).await;
    assert_eq!(ann.closed().await, 1000);
    let deadline = Instant::now() + WAIT;
    loop {
        let now = scrape(&server).await;
        if now["rookery_connections_open"] == 1.0 {
            assert_eq!(now[r#"rookery_closes_total{code="1000"}"#], 1.0);
            assert_eq!(now["rookery_sessions_authenticated"], 1.0);
            break;
        }
        assert!(Instant::now() < deadline, "connections stayed {now:?}");
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }
}

fn sql(server: &TestServer, statement: &str) -> usize {
    diesel::sql_query(statement)
        .execute(&mut server.db.conn())
        .unwrap()
}

#[actix_rt::test]
async fn verify_is_clean_on_a_healthy_store_and_names_damaged_and_missing_rows() {
    let server = TestServer::start_with_policy(
        &format!(
            "{TEST_POLICY}\n[[room]]\nname = \"scratch\"\nkind = \"public\"\npersist = false\n"
        ),
        |_| {},
    )
    .await;
    let [mut ann] = server.public_room("general", ["ann"]).await;
    for i in 1..=6 {
        ann.send("general", &format!("message {i}")).await;
    }
    ann.create_room("other", "public", &[]).await;
    ann.join("other").await;
    ann.send("other", "fine").await;
    // A room that stores nothing hands out seqs that verify must not call missing.
    ann.join("scratch").await;
    ann.send("scratch", "gone with the wind").await;

    let out = rookery(&server, &["verify"], None);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("no problems"), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("7 stored message(s)"),
        "{}",
        stdout(&out)
    );

    // One row's ciphertext altered, one row deleted.
    let general = "(SELECT id FROM rooms WHERE name = 'general')";
    assert_eq!(
        sql(
            &server,
            &format!(
                "UPDATE messages SET ciphertext = set_byte(ciphertext, 0, get_byte(ciphertext, 0) # 1) \
                 WHERE room_id = {general} AND seq = 2"
            ),
        ),
        1
    );
    assert_eq!(
        sql(
            &server,
            &format!("DELETE FROM messages WHERE room_id = {general} AND seq = 4")
        ),
        1
    );
    let out = rookery(&server, &["verify"], None);
    assert!(!out.status.success());
    let report = stdout(&out);
    assert!(
        report
            .lines()
            .any(|l| l.starts_with("room general seq 2: does not decrypt")),
        "{report}"
    );
    assert!(
        report
            .lines()
            .any(|l| l.starts_with("room general seq 4: missing")),
        "{report}"
    );
    assert!(report.contains("2 problem(s)"), "{report}");
    assert!(!report.contains("room other"), "{report}");
    assert!(!report.contains("room scratch"), "{report}");
    // One room only; it changed nothing.
    let out = rookery(&server, &["verify", "--room", "other"], None);
    assert!(out.status.success(), "{}", stdout(&out));
    let out = rookery(&server, &["verify", "--room", "nowhere"], None);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no room named 'nowhere'"));
    assert_eq!(server.stored("general").len(), 5);
}

#[actix_rt::test]
async fn verify_tells_retention_from_loss() {
    let server = TestServer::start_with_policy(
        &format!(
            "{TEST_POLICY}\n[[room]]\nname = \"brief\"\nkind = \"public\"\nretention_days = 1\n"
        ),
        |c| c.rooms.retention_sweep_ms = 100,
    )
    .await;
    let mut ann = server.user("ann").await;
    ann.join("brief").await;
    for i in 1..=4 {
        ann.send("brief", &format!("message {i}")).await;
    }
    // The first two age past the retention; the sweep deletes them.
    sql(
        &server,
        "UPDATE messages SET created_at = now() - interval '3 days' \
         WHERE seq <= 2 AND room_id = (SELECT id FROM rooms WHERE name = 'brief')",
    );
    let deadline = Instant::now() + WAIT;
    while server.stored("brief").len() > 2 {
        assert!(Instant::now() < deadline, "the retention sweep did not run");
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }
    let out = rookery(&server, &["verify"], None);
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(stdout(&out).contains("no problems"), "{}", stdout(&out));
}

/// A metrics port already taken stops the start with a message naming the setting, and the
/// process ends by itself, without a panic.
#[actix_rt::test]
async fn a_busy_metrics_port_stops_the_start_with_its_setting_named() {
    let db = TestDb::new();
    let data = TempDir::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap().to_string();
    let log = data.0.join("server.log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_rookery"))
        .arg("serve")
        .env("DATABASE_URL", &db.url)
        .env("ROOKERY__SERVER__BIND", "127.0.0.1:0")
        .env("ROOKERY__TLS__ENABLED", "false")
        .env("ROOKERY__METRICS__BIND", &busy)
        .env("ROOKERY__DATA_DIR", &data.0)
        .env("RUST_BACKTRACE", "0")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("still running: {}", std::fs::read_to_string(&log).unwrap());
        }
        actix_rt::time::sleep(Duration::from_millis(100)).await;
    };
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(text.contains(&format!("metrics.bind {busy}")), "{text}");
    assert!(!text.contains("panicked"), "{text}");
    drop(taken);
}
