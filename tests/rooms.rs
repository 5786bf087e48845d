//! Rooms through the real server: invite, revoke (kicked everywhere, then forbidden), direct
//! rooms, the policy file's rooms and per-user limits, retention, and live reloads of the
//! policy file while clients send, ending with the history checker's verdict.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use rookery::checker::History;
use rookery::ids::Seq;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;
use support::*;

fn names(rooms: &Value) -> Vec<String> {
    rooms["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect()
}

#[actix_rt::test]
async fn an_invited_user_sees_the_room_at_once_joins_and_gets_its_messages() {
    let server = TestServer::start().await;
    let mut ann = server.user("ann").await;
    let mut bob = server.user("bob").await;
    let mut cat = server.user("cat").await;
    ann.create_room("club", "private", &[]).await;
    bob.err(req::join("club"), "forbidden").await;
    assert!(!names(&bob.ok(req::rooms()).await).contains(&"club".into()));

    cat.err(req::invite("club", "bob"), "forbidden").await;
    ann.err(req::invite("club", "nobody"), "not_found").await;
    ann.err(req::invite("nowhere", "bob"), "not_found").await;
    ann.ok(req::invite("club", "bob")).await;
    ann.ok(req::invite("club", "bob")).await; // again: ok, nothing changes
    assert!(names(&bob.ok(req::rooms()).await).contains(&"club".into()));

    ann.join("club").await;
    bob.join("club").await;
    ann.send("club", "welcome").await;
    assert_eq!(bob.next_event_of("message").await["body"], "welcome");
    cat.err(req::join("club"), "forbidden").await;

    ann.create_room("open", "public", &[]).await;
    ann.err(req::invite("open", "bob"), "bad_request").await;
}

#[actix_rt::test]
async fn a_revoked_member_is_kicked_on_every_session_and_refused_everywhere_after() {
    let server = TestServer::start().await;
    let mut ann = server.user("ann").await;
    let mut bob = server.user("bob").await;
    let mut bob2 = server.connect().await;
    bob2.login("bob").await;
    ann.create_room("club", "private", &["bob"]).await;
    for c in [&mut ann, &mut bob, &mut bob2] {
        c.join("club").await;
    }
    ann.send("club", "before").await;
    bob.err(req::revoke("club", "ann"), "forbidden").await;
    ann.err(req::revoke("club", "ann"), "forbidden").await; // the owner stays
    ann.ok(req::revoke("club", "bob")).await;
    let kicked = json!({"type": "kicked", "room": "club", "reason": "revoked"});
    assert_eq!(bob.next_event_of("kicked").await, kicked);
    assert_eq!(bob2.next_event_of("kicked").await, kicked);
    assert_eq!(ann.next_event_of("left").await["user"], "bob");
    ann.send("club", "after").await;
    for c in [&mut bob, &mut bob2] {
        c.err(req::join("club"), "forbidden").await;
        c.err(req::history("club", None, None), "forbidden").await;
        c.err(req::send("club", "let me back"), "forbidden").await;
        c.err(req::who("club"), "forbidden").await;
        c.err(req::typing("club"), "forbidden").await;
        c.err(req::join_after("club", 0), "forbidden").await;
        c.assert_no_event("message").await;
    }
    assert!(!names(&bob.ok(req::rooms()).await).contains(&"club".into()));
    ann.ok(req::revoke("club", "bob")).await; // not a member any more: ok
}

#[actix_rt::test]
async fn a_direct_room_is_the_same_for_both_and_closed_to_a_third() {
    let server = TestServer::start().await;
    let mut ann = server.user("ann").await;
    let mut bob = server.user("bob").await;
    let mut cat = server.user("cat").await;
    let room = ann.ok(req::dm("bob")).await;
    assert_eq!(
        room["room"],
        json!({"name": "dm:ann:bob", "kind": "private"})
    );
    assert_eq!(bob.ok(req::dm("ann")).await["room"], room["room"]);
    ann.err(req::dm("ann"), "bad_request").await;
    ann.err(req::dm("nobody"), "not_found").await;
    ann.join("dm:ann:bob").await;
    bob.join("dm:ann:bob").await;
    bob.send("dm:ann:bob", "psst").await;
    assert_eq!(ann.next_event_of("message").await["body"], "psst");
    cat.err(req::join("dm:ann:bob"), "forbidden").await;
    cat.err(req::history("dm:ann:bob", None, None), "forbidden")
        .await;
    ann.err(req::invite("dm:ann:bob", "cat"), "forbidden").await;
    ann.err(req::revoke("dm:ann:bob", "bob"), "forbidden").await;
    assert!(names(&bob.ok(req::rooms()).await).contains(&"dm:ann:bob".into()));
    assert!(!names(&cat.ok(req::rooms()).await).contains(&"dm:ann:bob".into()));
}

const STAFF: &str = "[[room]]\nname = \"staff\"\nkind = \"private\"\nwhitelist = [\"ann\", \"bob\"]\nadmins = [\"ann\"]\n";

#[actix_rt::test]
async fn the_files_rooms_exist_and_their_listed_members_stay_until_the_file_changes() {
    let server = TestServer::start_with_policy(&format!("{TEST_POLICY}{STAFF}"), |_| {}).await;
    let mut ann = server.user("ann").await;
    let mut bob = server.user("bob").await;
    let mut cat = server.user("cat").await;
    assert!(names(&ann.ok(req::rooms()).await).contains(&"staff".into()));
    assert!(!names(&cat.ok(req::rooms()).await).contains(&"staff".into()));
    cat.err(req::create_room("staff", "public", &[]), "conflict")
        .await;
    ann.join("staff").await;
    bob.join("staff").await;
    let refused = ann.err(req::revoke("staff", "bob"), "forbidden").await;
    assert!(
        refused["message"].as_str().unwrap().contains("policy file"),
        "{refused}"
    );
    bob.err(req::invite("staff", "cat"), "forbidden").await; // not an admin
    ann.ok(req::invite("staff", "cat")).await;
    cat.join("staff").await;
    ann.ok(req::revoke("staff", "cat")).await; // invited, so revocable
    assert_eq!(cat.next_event_of("kicked").await["reason"], "revoked");
}

#[actix_rt::test]
async fn users_may_create_and_join_only_as_many_rooms_as_the_file_allows() {
    let policy = format!("{TEST_POLICY}[users]\nmax_created_rooms = 1\nmax_joined_rooms = 1\n");
    let server = TestServer::start_with_policy(&policy, |_| {}).await;
    let mut ann = server.user("ann").await;
    ann.create_room("first", "public", &[]).await;
    ann.err(req::create_room("second", "public", &[]), "forbidden")
        .await;
    let mut bob = server.user("bob").await;
    bob.create_room("other", "public", &[]).await;
    ann.join("first").await;
    ann.join("first").await; // the same room again does not count
    ann.err(req::join("other"), "forbidden").await;
    ann.ok(req::leave("first")).await;
    ann.join("other").await;
}

#[actix_rt::test]
async fn the_retention_job_deletes_messages_older_than_the_window() {
    let policy = format!("{TEST_POLICY}retention_days = 1\n");
    let server = TestServer::start_with_policy(&policy, |c| c.rooms.retention_sweep_ms = 200).await;
    let [mut ann] = server.public_room("general", ["ann"]).await;
    for body in ["old 1", "old 2", "new"] {
        ann.send("general", body).await;
    }
    let mut conn = server.db.conn();
    use diesel::RunQueryDsl;
    diesel::sql_query(
        "UPDATE messages SET created_at = now() - interval '2 days' WHERE seq IN (1, 2)",
    )
    .execute(&mut conn)
    .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while server.stored("general").len() > 1 {
        assert!(std::time::Instant::now() < deadline, "the old rows stay");
        actix_rt::time::sleep(Duration::from_millis(100)).await;
    }
    let kept: Vec<i64> = server.stored("general").iter().map(|m| m.seq.0).collect();
    assert_eq!(kept, [3]);
}

/// Sends `count` keyed messages from `client` into `room` without waiting for the acks.
async fn send_burst(
    client: &mut Client,
    history: &mut History,
    who: &str,
    room: &str,
    tag: &str,
    count: usize,
) -> Vec<String> {
    let mut keys = Vec::new();
    for i in 0..count {
        let key = format!("{tag}-{i}");
        history.sent(who, who, room, &key);
        client
            .send_request(
                &key,
                &req::send_keyed(room, format!("{tag} {i}"), key.as_str()),
            )
            .await;
        keys.push(key);
    }
    keys
}

/// Reads the replies to `keys`, recording each ack (or refusal) in `history`; keeps events.
async fn collect_acks(
    client: &mut Client,
    history: &mut History,
    who: &str,
    room: &str,
    keys: &[String],
) -> usize {
    let mut refused = 0;
    let replies = client.replies_to(keys).await;
    for key in keys {
        let reply = &replies[key];
        if reply["type"] == "ok" {
            record_ack(history, who, room, key, reply);
        } else {
            assert_eq!(reply["code"], "rate_limited", "{reply}");
            history.failed(who, who, room, key, "rate_limited");
            refused += 1;
        }
    }
    refused
}

/// The next `kicked` event of `client`, recording the lobby messages that came before it.
async fn next_kick(client: &mut Client, history: &mut History, who: &str) -> Value {
    loop {
        let event = client.next_event().await;
        match event["type"].as_str() {
            Some("kicked") => return event,
            Some("message") if event["room"] == "lobby" => {
                history.received(who, "lobby", Seq(event["seq"].as_i64().unwrap()))
            }
            _ => {}
        }
    }
}

/// Waits for a reload after `seen` to be applied, then until no other one follows (a change
/// and a SIGHUP may make two); returns the count of reloads applied.
async fn reloaded(server: &RealServer, seen: usize) -> usize {
    server.wait_for_log(APPLIED, seen).await;
    loop {
        let count = server.log_text().matches(APPLIED).count();
        actix_rt::time::sleep(Duration::from_millis(700)).await;
        if server.log_text().matches(APPLIED).count() == count {
            return count;
        }
    }
}

const APPLIED: &str = "applied:";

#[actix_rt::test]
async fn reloads_of_the_policy_file_apply_live_and_lose_no_message() {
    let base = format!("{TEST_POLICY}{STAFF}[[room]]\nname = \"lobby\"\nkind = \"public\"\n");
    let server = RealServer::start(&base, &[]).await;
    let mut ann = server.user("ann").await;
    let mut bob = server.user("bob").await;
    let mut cat = server.user("cat").await;
    for c in [&mut ann, &mut bob, &mut cat] {
        c.join("lobby").await;
    }
    ann.join("staff").await;
    bob.join("staff").await;
    let mut history = History::new();
    history.covers("bob", "lobby", Seq(0), None);
    let mut reloads = server.log_text().matches(APPLIED).count();

    // 1. A new private room, added while cat is sending: ann sees it at once.
    let keys = send_burst(&mut cat, &mut history, "cat", "lobby", "one", 20).await;
    let vip =
        format!("{base}[[room]]\nname = \"vip\"\nkind = \"private\"\nwhitelist = [\"ann\"]\n");
    std::fs::write(&server.policy, &vip).unwrap();
    reloads = reloaded(&server, reloads).await;
    collect_acks(&mut cat, &mut history, "cat", "lobby", &keys).await;
    assert!(names(&ann.ok(req::rooms()).await).contains(&"vip".into()));
    ann.join("vip").await;

    // 2. bob leaves the staff whitelist (applied on SIGHUP too): kicked at once.
    let keys = send_burst(&mut cat, &mut history, "cat", "lobby", "two", 20).await;
    let unlisted = vip.replace("[\"ann\", \"bob\"]", "[\"ann\"]");
    std::fs::write(&server.policy, &unlisted).unwrap();
    server.signal("HUP");
    assert_eq!(
        next_kick(&mut bob, &mut history, "bob").await,
        json!({"type": "kicked", "room": "staff", "reason": "removed from whitelist"})
    );
    reloads = reloaded(&server, reloads).await;
    collect_acks(&mut cat, &mut history, "cat", "lobby", &keys).await;
    bob.err(req::join("staff"), "forbidden").await;

    // 3. A tighter rate in the lobby: from the next message on.
    let tight = unlisted.replace(
        "name = \"lobby\"\nkind = \"public\"\n",
        "name = \"lobby\"\nkind = \"public\"\nrate = { messages = 1, per_seconds = 60, burst = 3 }\n",
    );
    std::fs::write(&server.policy, &tight).unwrap();
    reloads = reloaded(&server, reloads).await;
    let keys = send_burst(&mut cat, &mut history, "cat", "lobby", "three", 6).await;
    let refused = collect_acks(&mut cat, &mut history, "cat", "lobby", &keys).await;
    assert_eq!(refused, 3, "3 within the burst, 3 over it");

    // 4. The vip room is removed from the file: closed, its members kicked.
    let without_vip = tight.replace(
        "[[room]]\nname = \"vip\"\nkind = \"private\"\nwhitelist = [\"ann\"]\n",
        "",
    );
    std::fs::write(&server.policy, &without_vip).unwrap();
    assert_eq!(
        ann.next_event_of("kicked").await,
        json!({"type": "kicked", "room": "vip", "reason": "closed"})
    );
    reloads = reloaded(&server, reloads).await;
    ann.err(req::join("vip"), "forbidden").await;
    assert!(!names(&ann.ok(req::rooms()).await).contains(&"vip".into()));

    // 5. An invalid file changes nothing; the log says where it is wrong.
    std::fs::write(
        &server.policy,
        format!("{without_vip}[[room]]\nname = \"Bad Name\"\nkind = \"public\"\n"),
    )
    .unwrap();
    server.wait_for_log("rejected, nothing changed", 0).await;
    let log = server.log_text();
    let rejected = log.lines().find(|l| l.contains("rejected")).unwrap();
    assert!(
        rejected.contains(&format!("{}:", server.policy.display())),
        "{rejected}"
    );
    assert!(rejected.contains("room.name"), "{rejected}");
    let keys = send_burst(&mut ann, &mut history, "ann", "lobby", "five", 2).await;
    collect_acks(&mut ann, &mut history, "ann", "lobby", &keys).await;
    bob.err(req::join("staff"), "forbidden").await;
    assert_eq!(
        reloads,
        server.log_text().matches(APPLIED).count(),
        "nothing applied"
    );

    // Every acked message is stored once and reached bob once, in order.
    while let Ok(Ok(event)) = tokio::time::timeout(Duration::from_millis(500), bob.read()).await {
        if event["type"] == "message" {
            history.received("bob", "lobby", Seq(event["seq"].as_i64().unwrap()));
        }
    }
    for event in bob
        .take_events()
        .into_iter()
        .filter(|e| e["type"] == "message" && e["room"] == "lobby")
    {
        history.received("bob", "lobby", Seq(event["seq"].as_i64().unwrap()));
    }
    let stored = BTreeMap::from([("lobby".to_string(), server.stored("lobby"))]);
    let verdict = history.verdict(&stored);
    assert!(verdict.is_clean(), "{verdict}");
    assert!(verdict.acked >= 40, "{verdict}");
}

#[actix_rt::test]
async fn a_room_that_does_not_persist_writes_no_row_and_forgets_what_leaves_its_ring() {
    let policy = format!(
        "{TEST_POLICY}[[room]]\nname = \"ephemeral\"\nkind = \"public\"\npersist = false\nhistory_limit = 3\n"
    );
    let server = TestServer::start_with_policy(&policy, |_| {}).await;
    let mut ann = server.user("ann").await;
    let mut bob = server.user("bob").await;
    ann.join("ephemeral").await;
    bob.join("ephemeral").await;
    let mut seqs = Vec::new();
    for i in 0..5 {
        let ack = ann
            .ok(req::send_keyed(
                "ephemeral",
                format!("m{i}"),
                format!("k{i}"),
            ))
            .await;
        seqs.push(ack["seq"].as_i64().unwrap());
        assert_eq!(bob.next_event_of("message").await["body"], format!("m{i}"));
    }
    assert!(seqs.windows(2).all(|w| w[1] > w[0]), "{seqs:?}");
    let retry = ann.ok(req::send_keyed("ephemeral", "m4", "k4")).await;
    assert_eq!(
        retry["seq"], seqs[4],
        "a retry still in the ring gets its original seq"
    );
    assert!(
        server.stored("ephemeral").is_empty(),
        "no row, not even ciphertext"
    );
    let page = bob.ok(req::history("ephemeral", None, Some(10))).await;
    let kept: Vec<i64> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(kept, seqs[2..], "the ring's newest 3");
    assert_eq!(page["has_more"], false);
    let mut carol = server.user("carol").await;
    let joined = carol.ok(req::join_after("ephemeral", seqs[0])).await;
    assert_eq!(joined["truncated"], true, "{joined}");
    assert_eq!(joined["missed"].as_array().unwrap().len(), 3);
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
fn check_config_checks_the_policy_file_too() {
    let dir = TempDir::new();
    let file = dir.0.join("rooms.toml");
    std::fs::write(
        &file,
        "[defaults]\nhistory_limit = 0\n\n[[room]]\nname = \"staff\"\nkind = \"public\"\nwhitelist = [\"ann\"]\n\n[[room]]\nname = \"staff\"\nkind = \"private\"\n",
    )
    .unwrap();
    let path = file.to_str().unwrap();
    let out = rookery_cli(&["check-config"], &[("ROOKERY__ROOMS__POLICY_FILE", path)]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for expected in [
        format!("{path}:2:1: defaults.history_limit: must be 1..10000"),
        format!("{path}:7:1: room.staff.whitelist: a public room has no whitelist"),
        format!("{path}:10:1: room.staff: defined twice"),
    ] {
        assert!(err.contains(&expected), "missing {expected:?} in:\n{err}");
    }

    std::fs::write(&file, "[defaults]\nhistory_limit = \"many\"\n").unwrap();
    let out = rookery_cli(&["check-config"], &[("ROOKERY__ROOMS__POLICY_FILE", path)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains(&format!("{path}:2:")),
        "{err}"
    );

    let missing = dir.0.join("nowhere.toml");
    let out = rookery_cli(
        &["check-config"],
        &[("ROOKERY__ROOMS__POLICY_FILE", missing.to_str().unwrap())],
    );
    assert!(!out.status.success(), "an explicitly set file must exist");

    let ok = rookery_cli(&["check-config"], &[]);
    assert!(ok.status.success(), "{ok:?}");
    assert!(String::from_utf8_lossy(&ok.stdout).contains("room policies: config/rooms.toml"));
}
