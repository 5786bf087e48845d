//! A cluster of nodes on a real Redis: two server instances with their own node ids on one
//! database, each test under its own `redis.prefix`. Messages, presence, typing and kicks
//! cross; a SIGKILLed node (the real binary) leaves presence within the TTL; a node cut off
//! from Redis serves its own clients and catches up when Redis is back. Also `/readyz`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use rookery::checker::History;
use rookery::config::Config;
use rookery::ids::Seq;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};
use support::*;

const REDIS: &str = "redis://127.0.0.1:6379";

/// Two nodes, `n1` and `n2`, of one cluster under a fresh prefix, on one database and data
/// directory (so one message key); `change` applies to both configs.
async fn two_nodes(redis: [&str; 2], change: impl Fn(&mut Config)) -> (TestServer, TestServer) {
    let db = Rc::new(TestDb::new());
    let data = Rc::new(TempDir::new());
    let prefix = unique_prefix();
    let mut nodes = Vec::new();
    for (i, redis) in redis.into_iter().enumerate() {
        let mut config = test_config(&db, &data);
        join_cluster(&mut config, redis, &prefix, &format!("n{}", i + 1));
        change(&mut config);
        nodes.push(TestServer::start_on(db.clone(), data.clone(), config).await);
    }
    let second = nodes.pop().unwrap();
    let first = nodes.pop().unwrap();
    (first, second)
}

/// Waits until `client`'s `who` of `room` lists exactly `users`.
async fn wait_for_who(client: &mut Client, room: &str, users: &[&str]) {
    let deadline = Instant::now() + WAIT;
    loop {
        let reply = client.ok(req::who(room)).await;
        if reply["online"] == json!(users) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "who stayed {reply}, not {users:?}"
        );
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads until `client` has the acks of its `sent` sends and every seq up to `last` as a
/// `message` event; records both. The acks' ids are `k{i}`, their client_msg_ids too.
async fn read_stream(
    client: &mut Client,
    name: &str,
    room: &str,
    sent: usize,
    last: i64,
    history: &mut History,
) -> Vec<i64> {
    let mut acks = 0;
    let mut seqs = Vec::new();
    while acks < sent || seqs.last().copied().unwrap_or(0) < last {
        let frame = client.read().await.unwrap();
        match frame["type"].as_str() {
            Some("ok") => {
                let key = frame["id"].as_str().unwrap().to_string();
                record_ack(history, name, room, &key, &frame);
                acks += 1;
            }
            Some("message") => {
                let seq = frame["seq"].as_i64().unwrap();
                history.received(name, room, Seq(seq));
                seqs.push(seq);
            }
            Some("error") => panic!("{name}: {frame}"),
            _ => {}
        }
    }
    seqs
}

async fn send_many(
    client: &mut Client,
    name: &str,
    room: &str,
    count: usize,
    history: &mut History,
) {
    for i in 0..count {
        let key = format!("{name}-{i}");
        history.sent(name, name, room, &key);
        client
            .send_request(
                &key,
                &req::send_keyed(room, format!("{name} {i}"), key.as_str()),
            )
            .await;
    }
}

#[actix_rt::test]
async fn users_on_two_nodes_see_one_chat() {
    let (n1, n2) = two_nodes([REDIS, REDIS], |_| {}).await;
    let mut ann = n1.user("ann").await;
    let mut bob = n2.user("bob").await;
    ann.create_room("general", "public", &[]).await;
    ann.join("general").await;
    let joined = bob.ok(req::join("general")).await;
    assert_eq!(joined["room"]["last_seq"], 0);
    // Bob's first session anywhere joins: ann, on the other node, hears it.
    let event = ann.next_event_of("joined").await;
    assert_eq!(event["user"], "bob");
    wait_for_who(&mut bob, "general", &["ann", "bob"]).await;
    wait_for_who(&mut ann, "general", &["ann", "bob"]).await;

    // Concurrent sends from both nodes: one order, the same seqs, nothing lost or doubled.
    let per_user = 150;
    let total = 2 * per_user as i64;
    let mut history = History::new();
    history.covers("ann", "general", Seq(0), None);
    history.covers("bob", "general", Seq(0), None);
    send_many(&mut ann, "ann", "general", per_user, &mut history).await;
    send_many(&mut bob, "bob", "general", per_user, &mut history).await;
    let ann_seqs = read_stream(&mut ann, "ann", "general", per_user, total, &mut history).await;
    let bob_seqs = read_stream(&mut bob, "bob", "general", per_user, total, &mut history).await;
    assert_eq!(ann_seqs, (1..=total).collect::<Vec<_>>());
    assert_eq!(bob_seqs, ann_seqs);
    let stored = BTreeMap::from([("general".to_string(), n1.stored("general"))]);
    let verdict = history.verdict(&stored);
    assert!(verdict.is_clean(), "{verdict}");
    assert_eq!(verdict.acked, 2 * per_user);

    // Typing crosses.
    ann.ok(req::typing("general")).await;
    assert_eq!(bob.next_event_of("typing").await["user"], "ann");

    // A second session of ann, on node 2, is no new join; its leave is no leave either.
    let mut ann2 = n2.connect().await;
    ann2.login("ann").await;
    ann2.ok(req::join("general")).await;
    ann2.ok(req::leave("general")).await;
    ann2.close().await;
    // Carol joins and leaves on node 2: ann, on node 1, hears both, once.
    let mut carol = n2.user("carol").await;
    carol.ok(req::join("general")).await;
    let joined = ann.next_event_of("joined").await;
    assert_eq!(
        joined["user"], "carol",
        "ann's second session made a join: {joined}"
    );
    wait_for_who(&mut ann, "general", &["ann", "bob", "carol"]).await;
    carol.ok(req::leave("general")).await;
    let left = ann.next_event_of("left").await;
    assert_eq!(
        left["user"], "carol",
        "ann's second session made a leave: {left}"
    );
    wait_for_who(&mut ann, "general", &["ann", "bob"]).await;
    let flaps: Vec<Value> = bob
        .take_events()
        .into_iter()
        .filter(|e| (e["type"] == "joined" || e["type"] == "left") && e["user"] == "ann")
        .collect();
    assert!(flaps.is_empty(), "bob saw ann flap: {flaps:?}");

    // A revoke on node 1 kicks the member's session on node 2.
    ann.create_room("secret", "private", &["bob"]).await;
    ann.join("secret").await;
    bob.ok(req::join("secret")).await;
    ann.ok(req::send("secret", "for bob")).await;
    assert_eq!(bob.next_event_of("message").await["body"], "for bob");
    ann.ok(req::revoke("secret", "bob")).await;
    let kicked = bob.next_event_of("kicked").await;
    assert_eq!(kicked["room"], "secret");
    assert_eq!(kicked["reason"], "revoked");
    bob.err(req::send("secret", "still here?"), "forbidden")
        .await;
    // An invite on node 1 admits the user on node 2 again.
    ann.ok(req::invite("secret", "bob")).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let reply = bob.call(req::join("secret")).await;
        if reply["type"] == "ok" {
            break;
        }
        assert!(Instant::now() < deadline, "bob stayed refused: {reply}");
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }
}

#[actix_rt::test]
async fn a_policy_reload_on_one_node_kicks_on_every_node() {
    let policy =
        format!("{TEST_POLICY}\n[[room]]\nname = \"staff\"\nkind = \"private\"\nwhitelist = [\"ann\", \"bob\"]\n");
    let (n1, n2) = two_nodes([REDIS, REDIS], |_| {}).await;
    let mut ann = n1.user("ann").await;
    let mut bob = n2.user("bob").await;
    // (The servers' file watchers are in place once they have served a request.)
    n1.write_policy(&policy);
    // Each node applies the file when it has read it: a moment apart.
    for client in [&mut bob, &mut ann] {
        let deadline = Instant::now() + WAIT;
        loop {
            let reply = client.call(req::join("staff")).await;
            if reply["type"] == "ok" {
                break;
            }
            assert!(Instant::now() < deadline, "staff never admitted: {reply}");
            actix_rt::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // The file loses bob; both nodes read the same file, but node 2 is told by node 1 even
    // if its own watcher were slow.
    n1.write_policy(&format!(
        "{TEST_POLICY}\n[[room]]\nname = \"staff\"\nkind = \"private\"\nwhitelist = [\"ann\"]\n"
    ));
    let kicked = bob.next_event_of("kicked").await;
    assert_eq!(kicked["room"], "staff");
    bob.err(req::join("staff"), "forbidden").await;
}

/// A node of the real binary in a cluster under `prefix`, on `db` with `data` as its data
/// directory, with quick heartbeats (TTL 1.5 s).
async fn real_node(db: &Rc<TestDb>, data: &Rc<TempDir>, prefix: &str, id: &str) -> RealServer {
    let env = [
        ("ROOKERY__REDIS__URL", REDIS),
        ("ROOKERY__REDIS__PREFIX", prefix),
        ("ROOKERY__CLUSTER__NODE_ID", id),
        ("ROOKERY__CLUSTER__HEARTBEAT_MS", "200"),
        ("ROOKERY__CLUSTER__NODE_TTL_MS", "1500"),
    ];
    RealServer::start_in(db.clone(), data.clone(), id, TEST_POLICY, &env).await
}

/// Sends `body` as `who` with client_msg_id `key`, waits for the ack and records both.
async fn send_recorded(
    client: &mut Client,
    who: &str,
    key: &str,
    body: String,
    history: &mut History,
) {
    history.sent(who, who, "general", key);
    let reply = client.ok(req::send_keyed("general", body, key)).await;
    record_ack(history, who, "general", key, &reply);
}

#[actix_rt::test]
async fn a_killed_node_leaves_presence_within_its_ttl_and_its_clients_recover_on_another() {
    let db = Rc::new(TestDb::new());
    let data = Rc::new(TempDir::new());
    let prefix = unique_prefix();
    let mut a = real_node(&db, &data, &prefix, "a").await;
    let b = real_node(&db, &data, &prefix, "b").await;
    let mut ann = a.user("ann").await;
    let mut bob = b.user("bob").await;
    ann.create_room("general", "public", &[]).await;
    ann.join("general").await;
    bob.join("general").await;
    wait_for_who(&mut bob, "general", &["ann", "bob"]).await;
    let mut history = History::new();
    history.covers("ann", "general", Seq(0), Some(Seq(10)));
    history.covers("bob", "general", Seq(0), None);
    for i in 0..10 {
        send_recorded(
            &mut ann,
            "ann",
            &format!("a{i}"),
            format!("before {i}"),
            &mut history,
        )
        .await;
    }
    let mut seen = 0;
    while seen < 10 {
        let event = bob.next_event_of("message").await;
        history.received("bob", "general", Seq(event["seq"].as_i64().unwrap()));
        seen += 1;
    }
    let mut ann_last = 0;
    while ann_last < 10 {
        let event = ann.next_event_of("message").await;
        ann_last = event["seq"].as_i64().unwrap();
        history.received("ann", "general", Seq(ann_last));
    }
    let token = ann.token.clone().unwrap();

    // SIGKILL: no goodbye, no left from node a itself.
    let killed = Instant::now();
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    let left = bob.next_event_of("left").await;
    let took = killed.elapsed();
    assert_eq!(left["user"], "ann");
    assert!(
        took < Duration::from_millis(1500 + 1000),
        "left came after {took:?}"
    );
    wait_for_who(&mut bob, "general", &["bob"]).await;

    // Bob talks while ann is away.
    for i in 0..5 {
        send_recorded(
            &mut bob,
            "bob",
            &format!("b{i}"),
            format!("meanwhile {i}"),
            &mut history,
        )
        .await;
    }
    for _ in 0..5 {
        let event = bob.next_event_of("message").await;
        history.received("bob", "general", Seq(event["seq"].as_i64().unwrap()));
    }
    // Ann's client resumes on node b with its token and recovers with join {after}.
    let mut ann = Client::connect_url(&b.url, None).await.unwrap();
    ann.ok(req::resume(&token)).await;
    let reply = ann.ok(req::join_after("general", ann_last)).await;
    history.covers("ann", "general", Seq(ann_last), None);
    for message in reply["missed"].as_array().unwrap() {
        history.received("ann", "general", Seq(message["seq"].as_i64().unwrap()));
    }
    assert_eq!(reply["missed"].as_array().unwrap().len(), 5, "{reply}");
    // Her return is a join for bob; her departure was announced exactly once.
    assert_eq!(bob.next_event_of("joined").await["user"], "ann");
    actix_rt::time::sleep(Duration::from_millis(500)).await;
    bob.ok(req::ping()).await;
    let more: Vec<Value> = bob
        .take_events()
        .into_iter()
        .filter(|e| e["type"] == "left")
        .collect();
    assert!(more.is_empty(), "a second left: {more:?}");
    let stored = BTreeMap::from([("general".to_string(), stored_messages(&db, "general"))]);
    let verdict = history.verdict(&stored);
    assert!(verdict.is_clean(), "{verdict}");
    assert_eq!(verdict.acked, 15);
    let log = std::fs::read_to_string(&b.log).unwrap();
    assert!(log.contains("node a is gone"), "{log}");
    drop(b);
}

#[actix_rt::test]
async fn a_node_cut_off_from_redis_serves_its_own_and_catches_up_after() {
    let proxy = PgProxy::to(6379);
    let cut_url = format!("redis://127.0.0.1:{}", proxy.port);
    let (n1, n2) = two_nodes([REDIS, &cut_url], |_| {}).await;
    let mut ann = n1.user("ann").await;
    let mut bob = n2.user("bob").await;
    let mut cat = n2.user("cat").await;
    ann.create_room("general", "public", &[]).await;
    for client in [&mut ann, &mut bob, &mut cat] {
        client.join("general").await;
    }
    wait_for_who(&mut ann, "general", &["ann", "bob", "cat"]).await;
    let ready = http_client()
        .get(n2.http_url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);

    proxy.cut();
    // /readyz says what failed.
    let deadline = Instant::now() + WAIT;
    let body = loop {
        let mut res = http_client()
            .get(n2.http_url("/readyz"))
            .send()
            .await
            .unwrap();
        if res.status() == 503 {
            break res.json::<Value>().await.unwrap();
        }
        assert!(Instant::now() < deadline, "/readyz stayed {}", res.status());
        actix_rt::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(body["failed"], json!(["redis"]), "{body}");
    assert_eq!(body["checks"]["postgres"], "ok", "{body}");
    // Node 2 serves its own: cat's message reaches bob.
    let reply = cat.ok(req::send("general", "local")).await;
    let local_seq = reply["seq"].as_i64().unwrap();
    let event = bob.next_event_of("message").await;
    assert_eq!(event["body"], "local");
    // Ann, on node 1, talks on; node 2 cannot hear it yet.
    let mut ann_seqs = Vec::new();
    for i in 0..5 {
        ann_seqs.push(
            ann.ok(req::send("general", format!("during {i}"))).await["seq"]
                .as_i64()
                .unwrap(),
        );
    }
    assert!(*ann_seqs.iter().min().unwrap() > local_seq);
    // The last word of the conversation, from node 2, while it cannot publish.
    let late = cat.ok(req::send("general", "late")).await["seq"]
        .as_i64()
        .unwrap();
    let last = late;

    proxy.restore();
    // Bob gets everything he missed, in order, without asking.
    let mut seqs = vec![event["seq"].as_i64().unwrap()];
    while *seqs.last().unwrap() < last {
        let event = bob.next_event_of("message").await;
        seqs.push(event["seq"].as_i64().unwrap());
    }
    let expected: Vec<i64> = (seqs[0]..=last).collect();
    assert_eq!(seqs, expected);
    // And ann gets cat's last word, though nobody has sent anything since.
    loop {
        let event = ann.next_event_of("message").await;
        if event["seq"] == late {
            assert_eq!(event["body"], "late");
            break;
        }
    }
    // And cross-node delivery is live again, both ways.
    ann.ok(req::send("general", "after")).await;
    assert_eq!(bob.next_event_of("message").await["body"], "after");
    cat.ok(req::send("general", "back")).await;
    loop {
        let event = ann.next_event_of("message").await;
        if event["body"] == "back" {
            break;
        }
    }
    // A client that reconnects to node 2 recovers the whole room with join {after}.
    let mut dan = n2.user("dan").await;
    let reply = dan.ok(req::join_after("general", 0)).await;
    let missed: Vec<i64> = reply["missed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(missed, (1..=last + 2).collect::<Vec<_>>());
    let ready = http_client()
        .get(n2.http_url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
}

#[actix_rt::test]
async fn readyz_names_postgres_when_it_is_cut_away() {
    let proxy = PgProxy::start();
    let db = TestDb::new();
    let data = TempDir::new();
    let mut config = test_config(&db, &data);
    config.database.url = rookery::secret::Secret::new(proxy.url(&db));
    let server = TestServer::start_on(db, data, config).await;
    let mut res = http_client()
        .get(server.http_url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["status"], "ready");
    assert_eq!(body["failed"], json!([]));
    proxy.cut();
    let mut res = http_client()
        .get(server.http_url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["status"], "unavailable");
    assert_eq!(body["failed"], json!(["postgres"]), "{body}");
    // Liveness is another question.
    let res = http_client()
        .get(server.http_url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    proxy.restore();
    let res = http_client()
        .get(server.http_url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

#[actix_rt::test]
async fn a_node_whose_redis_is_down_at_start_serves_alone_until_it_is_back() {
    let proxy = PgProxy::to(6379);
    proxy.cut();
    let db = TestDb::new();
    let data = TempDir::new();
    let mut config = test_config(&db, &data);
    join_cluster(
        &mut config,
        &format!("redis://127.0.0.1:{}", proxy.port),
        &unique_prefix(),
        "",
    );
    let server = TestServer::start_on(db, data, config).await;
    let [mut ann, mut bob] = server.public_room("general", ["ann", "bob"]).await;
    ann.ok(req::send("general", "alone")).await;
    assert_eq!(bob.next_event_of("message").await["body"], "alone");
    let mut res = http_client()
        .get(server.http_url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(
        res.json::<Value>().await.unwrap()["failed"],
        json!(["redis"])
    );
    proxy.restore();
    let deadline = Instant::now() + WAIT;
    while http_client()
        .get(server.http_url("/readyz"))
        .send()
        .await
        .unwrap()
        .status()
        != 200
    {
        assert!(
            Instant::now() < deadline,
            "/readyz stayed 503 after Redis came back"
        );
        actix_rt::time::sleep(Duration::from_millis(100)).await;
    }
    bob.ok(req::send("general", "together")).await;
    let bodies = [
        ann.next_event_of("message").await["body"].clone(),
        ann.next_event_of("message").await["body"].clone(),
    ];
    assert_eq!(bodies, [json!("alone"), json!("together")]);
}

#[actix_rt::test]
async fn a_node_restarted_under_its_id_replaces_what_the_others_knew_of_it() {
    let (n1, n2) = two_nodes([REDIS, REDIS], |_| {}).await;
    let mut ann = n1.user("ann").await;
    ann.create_room("general", "public", &[]).await;
    ann.join("general").await;
    let mut carol = n2.user("carol").await;
    carol.join("general").await;
    wait_for_who(&mut ann, "general", &["ann", "carol"]).await;
    // Node 2 crashes and comes straight back, as n2 again, before its key expired.
    let n2 = n2.restart().await;
    let mut dan = n2.user("dan").await;
    dan.join("general").await;
    wait_for_who(&mut ann, "general", &["ann", "dan"]).await;
    wait_for_who(&mut dan, "general", &["ann", "dan"]).await;
}
