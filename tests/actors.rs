//! Actor-level tests: a Room actor driven directly, with fake sessions (tiny actors that
//! forward each `Deliver` to a channel) and a fake store whose commits a test can hold,
//! release or fail; and the real DB executor against Postgres.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use actix::prelude::*;
use chrono::Utc;
use serde_json::Value;
use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

use rookery::actors::db::{
    ChangeMember, DbExecutor, DbSettings, LoadHistory, PurgeExpired, ReserveSeqs, StoreBatch,
};
use rookery::actors::presence::{Presence, PresenceHandle};
use rookery::actors::room::*;
use rookery::error::{Error, Forbidden, RoomError, StoreError};
use rookery::ids::{RoomId, Seq, SessionId, UserId};
use rookery::policy::Policies;
use rookery::protocol::{ErrorCode, RoomKind};
use rookery::store::models::{
    HistoryPage, Outcome, RoomOrigin, RoomRecord, RoomState, Stored, UserRecord,
};
use support::*;

// ---------------------------------------------------------------- fakes

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Commit,
    Hold,
    Fail,
}

type Held = (
    oneshot::Sender<Result<Vec<Outcome>, StoreError>>,
    Vec<Outcome>,
);

/// A store that numbers messages like the real one, and can hold or fail commits.
struct FakeStore {
    mode: Mode,
    last_seq: i64,
    held: Vec<Held>,
    batch_sizes: Vec<usize>,
}

impl Actor for FakeStore {
    type Context = Context<Self>;
}

impl Handler<StoreBatch> for FakeStore {
    type Result = ResponseFuture<Result<Vec<Outcome>, StoreError>>;

    fn handle(&mut self, msg: StoreBatch, _: &mut Context<Self>) -> Self::Result {
        self.batch_sizes.push(msg.posts.len());
        if self.mode == Mode::Fail {
            return Box::pin(async { Err(StoreError::Unavailable("cut off".into())) });
        }
        let stored: Vec<Outcome> = msg
            .posts
            .iter()
            .map(|_| {
                self.last_seq += 1;
                Ok(Stored {
                    seq: Seq(self.last_seq),
                    sent_at: Utc::now(),
                    duplicate: false,
                })
            })
            .collect();
        if self.mode == Mode::Hold {
            let (tx, rx) = oneshot::channel();
            self.held.push((tx, stored));
            return Box::pin(async move { rx.await.unwrap() });
        }
        Box::pin(async move { Ok(stored) })
    }
}

/// Members change as asked: a user's id is the number in its name ("u7" is 7).
impl Handler<ChangeMember> for FakeStore {
    type Result = Result<UserRecord, StoreError>;
    fn handle(&mut self, msg: ChangeMember, _: &mut Context<Self>) -> Self::Result {
        let id = msg
            .user
            .as_str()
            .trim_start_matches('u')
            .parse()
            .unwrap_or(0);
        Ok(UserRecord {
            id: UserId(id),
            username: msg.user.into_string(),
        })
    }
}

/// Seqs reserved from the same counter the commits use.
impl Handler<ReserveSeqs> for FakeStore {
    type Result = Result<Seq, StoreError>;
    fn handle(&mut self, msg: ReserveSeqs, _: &mut Context<Self>) -> Self::Result {
        self.last_seq += msg.count;
        Ok(Seq(self.last_seq))
    }
}

impl Handler<LoadHistory> for FakeStore {
    type Result = Result<HistoryPage, StoreError>;
    fn handle(&mut self, _: LoadHistory, _: &mut Context<Self>) -> Self::Result {
        Ok(HistoryPage::default())
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct SetMode(Mode);

impl Handler<SetMode> for FakeStore {
    type Result = ();
    fn handle(&mut self, msg: SetMode, _: &mut Context<Self>) {
        self.mode = msg.0;
    }
}

/// Commits every held batch; replies the sizes of all batches seen so far.
#[derive(Message)]
#[rtype(result = "Vec<usize>")]
struct Release;

impl Handler<Release> for FakeStore {
    type Result = MessageResult<Release>;
    fn handle(&mut self, _: Release, _: &mut Context<Self>) -> Self::Result {
        for (tx, stored) in self.held.drain(..) {
            let _ = tx.send(Ok(stored));
        }
        MessageResult(self.batch_sizes.clone())
    }
}

/// A session stand-in: forwards each delivery to a channel.
struct FakeSession {
    tx: mpsc::UnboundedSender<Deliver>,
}

impl Actor for FakeSession {
    type Context = Context<Self>;
}

impl Handler<Deliver> for FakeSession {
    type Result = ();
    fn handle(&mut self, msg: Deliver, _: &mut Context<Self>) {
        let _ = self.tx.send(msg);
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct StopSession;

impl Handler<StopSession> for FakeSession {
    type Result = ();
    fn handle(&mut self, _: StopSession, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

struct Peer {
    id: SessionId,
    user: UserRecord,
    addr: Addr<FakeSession>,
    rx: mpsc::UnboundedReceiver<Deliver>,
    /// Frames received in one delivery and not yet read.
    unread: VecDeque<Value>,
}

impl Peer {
    fn new(id: u64, user_id: i64, name: &str) -> Peer {
        let (tx, rx) = mpsc::unbounded_channel();
        Peer {
            id: SessionId(id),
            user: UserRecord {
                id: UserId(user_id),
                username: name.into(),
            },
            addr: FakeSession { tx }.start(),
            rx,
            unread: VecDeque::new(),
        }
    }

    fn join_msg(&self) -> Join {
        Join {
            session: self.id,
            user: self.user.clone(),
            deliver: self.addr.clone().recipient(),
            after: None,
            replaces: None,
        }
    }

    fn post(&self, body: &str) -> Post {
        Post {
            session: self.id,
            user: self.user.clone(),
            body: body.into(),
            client_msg_id: None,
        }
    }

    /// The next delivered frame as JSON.
    async fn frame(&mut self) -> Value {
        if self.unread.is_empty() {
            let deliver = tokio::time::timeout(WAIT, self.rx.recv())
                .await
                .unwrap()
                .unwrap();
            self.unread.extend(frames(deliver));
        }
        self.unread.pop_front().unwrap()
    }

    async fn message(&mut self) -> Value {
        loop {
            let frame = self.frame().await;
            if frame["type"] == "message" {
                return frame;
            }
        }
    }

    /// Every frame delivered so far (after letting the room run).
    async fn drain(&mut self) -> Vec<Value> {
        actix_rt::time::sleep(Duration::from_millis(50)).await;
        let mut out: Vec<Value> = self.unread.drain(..).collect();
        while let Ok(deliver) = self.rx.try_recv() {
            out.extend(frames(deliver));
        }
        out
    }
}

/// The frames of one delivery as JSON, a `kicked` as the frame the session writes for it.
fn frames(deliver: Deliver) -> Vec<Value> {
    match deliver {
        Deliver::Frame { frame, .. } => vec![serde_json::from_str(&frame).unwrap()],
        Deliver::Messages { frames, .. } => frames
            .iter()
            .map(|(_, frame)| serde_json::from_str(frame).unwrap())
            .collect(),
        Deliver::Evicted { room } => panic!("evicted from {room}"),
        Deliver::Kicked { room, reason } => {
            vec![serde_json::json!({"type": "kicked", "room": &*room, "reason": reason})]
        }
    }
}

fn room_state(kind: RoomKind, members: &[i64]) -> RoomState {
    RoomState {
        record: RoomRecord {
            id: RoomId(1),
            name: "hall".into(),
            kind,
            owner: None,
            last_seq: Seq(0),
            origin: RoomOrigin::User,
            closed: false,
        },
        members: members.iter().map(|m| UserId(*m)).collect(),
        recent: Vec::new(),
    }
}

/// The room policy of the actor tests: small bodies, no rate limit to get in the way.
const POLICY: &str = "[defaults]\nhistory_limit = 20\nmax_body_bytes = 64\nrate = { messages = 100000, per_seconds = 1, burst = 100000 }\n";

fn policy_of(state: &RoomState, text: &str) -> RoomPolicy {
    let policies = Policies::parse(text, "test").unwrap();
    RoomPolicy::of(
        &state.record,
        state.members.iter().copied().collect(),
        &policies,
    )
}

fn settings() -> RoomSettings {
    RoomSettings {
        idle_stop: Duration::from_secs(60),
        store_timeout: Duration::from_secs(5),
        resume_grace: Duration::from_millis(200),
        max_missed_bytes: 1 << 20,
        cluster: None,
    }
}

fn start_room(kind: RoomKind, members: &[i64], mode: Mode) -> (Addr<Room>, Addr<FakeStore>) {
    start_room_with(kind, members, mode, settings())
}

fn start_room_with(
    kind: RoomKind,
    members: &[i64],
    mode: Mode,
    settings: RoomSettings,
) -> (Addr<Room>, Addr<FakeStore>) {
    start_room_under(kind, members, mode, settings, POLICY)
}

fn start_room_under(
    kind: RoomKind,
    members: &[i64],
    mode: Mode,
    settings: RoomSettings,
    policy_text: &str,
) -> (Addr<Room>, Addr<FakeStore>) {
    let store = FakeStore {
        mode,
        last_seq: 0,
        held: Vec::new(),
        batch_sizes: Vec::new(),
    }
    .start();
    let handle = StoreHandle {
        store: store.clone().recipient(),
        history: store.clone().recipient(),
        members: store.clone().recipient(),
        seqs: store.clone().recipient(),
    };
    let presence = PresenceHandle::of(&Presence::default().start());
    let state = room_state(kind, members);
    let policy = policy_of(&state, policy_text);
    let room = Room::new(state, policy, &settings, handle, presence, None).start();
    (room, store)
}

// ---------------------------------------------------------------- tests

#[actix_rt::test]
async fn messages_reach_every_joined_session_in_seq_order() {
    let (room, _) = start_room(RoomKind::Public, &[], Mode::Commit);
    let mut peers: Vec<Peer> = (1..=3)
        .map(|i| Peer::new(i, i as i64, &format!("user{i}")))
        .collect();
    for peer in &peers {
        room.send(peer.join_msg()).await.unwrap().unwrap();
    }
    let sends: Vec<_> = (0..9)
        .map(|i| room.send(peers[i % 3].post(&format!("m{i}"))))
        .collect();
    let mut acked = Vec::new();
    for send in sends {
        acked.push(send.await.unwrap().unwrap().seq.0);
    }
    assert_eq!(
        acked,
        (1..=9).collect::<Vec<_>>(),
        "acks follow the order of arrival"
    );
    for peer in &mut peers {
        let mut got = Vec::new();
        for _ in 0..9 {
            let m = peer.message().await;
            got.push((
                m["seq"].as_i64().unwrap(),
                m["body"].as_str().unwrap().to_string(),
            ));
        }
        let expected: Vec<(i64, String)> =
            (0..9).map(|i| (i as i64 + 1, format!("m{i}"))).collect();
        assert_eq!(got, expected);
    }
}

#[actix_rt::test]
async fn the_ack_and_the_broadcast_wait_for_the_commit() {
    let (room, store) = start_room(RoomKind::Public, &[], Mode::Hold);
    let mut ann = Peer::new(1, 1, "ann");
    let mut bob = Peer::new(2, 2, "bob");
    room.send(ann.join_msg()).await.unwrap().unwrap();
    room.send(bob.join_msg()).await.unwrap().unwrap();
    ann.drain().await;
    let ack = room.send(ann.post("held"));
    tokio::pin!(ack);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut ack)
            .await
            .is_err(),
        "acked before commit"
    );
    assert!(bob.drain().await.is_empty(), "broadcast before commit");
    assert!(ann.drain().await.is_empty(), "broadcast before commit");

    store.send(Release).await.unwrap();
    let ack = ack.await.unwrap().unwrap();
    assert_eq!(ack.seq, Seq(1));
    assert_eq!(bob.message().await["body"], "held");
    assert_eq!(ann.message().await["body"], "held");
}

#[actix_rt::test]
async fn posts_that_arrive_during_a_commit_go_in_the_next_batch_in_order() {
    let (room, store) = start_room(RoomKind::Public, &[], Mode::Hold);
    let mut ann = Peer::new(1, 1, "ann");
    room.send(ann.join_msg()).await.unwrap().unwrap();
    let first = room.send(ann.post("a"));
    let second = room.send(ann.post("b"));
    let third = room.send(ann.post("c"));
    actix_rt::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(store.send(Release).await.unwrap(), vec![1]);
    actix_rt::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(store.send(Release).await.unwrap(), vec![1, 2]);
    let seqs = [first.await, second.await, third.await].map(|r| r.unwrap().unwrap().seq.0);
    assert_eq!(seqs, [1, 2, 3]);
    let bodies: Vec<String> = ann
        .drain()
        .await
        .into_iter()
        .map(|m| m["body"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(bodies, ["a", "b", "c"]);
}

#[actix_rt::test]
async fn each_commit_reaches_a_member_in_one_delivery_in_seq_order() {
    let (room, store) = start_room(RoomKind::Public, &[], Mode::Hold);
    let mut ann = Peer::new(1, 1, "ann");
    room.send(ann.join_msg()).await.unwrap().unwrap();
    let posts: Vec<_> = ["a", "b", "c"].map(|body| room.send(ann.post(body))).into();
    actix_rt::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(store.send(Release).await.unwrap(), vec![1]);
    actix_rt::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(store.send(Release).await.unwrap(), vec![1, 2]);
    for post in posts {
        post.await.unwrap().unwrap();
    }
    actix_rt::time::sleep(Duration::from_millis(50)).await;
    // One delivery per commit: the second batch's two messages come together, in seq order.
    let mut deliveries: Vec<Vec<i64>> = Vec::new();
    while let Ok(deliver) = ann.rx.try_recv() {
        deliveries.push(match deliver {
            Deliver::Messages { frames, .. } => frames.iter().map(|(seq, _)| seq.0).collect(),
            other => panic!("not a delivery of messages: {other:?}"),
        });
    }
    assert_eq!(deliveries, [vec![1], vec![2, 3]]);
}

#[actix_rt::test]
async fn a_failed_store_answers_unavailable_and_broadcasts_nothing() {
    let (room, store) = start_room(RoomKind::Public, &[], Mode::Fail);
    let mut ann = Peer::new(1, 1, "ann");
    let mut bob = Peer::new(2, 2, "bob");
    room.send(ann.join_msg()).await.unwrap().unwrap();
    room.send(bob.join_msg()).await.unwrap().unwrap();
    ann.drain().await;
    let err = room.send(ann.post("lost?")).await.unwrap().unwrap_err();
    assert!(matches!(err, RoomError::Store(_)), "{err:?}");
    assert_eq!(Error::from(err).to_wire().0, ErrorCode::Unavailable);
    assert!(ann.drain().await.is_empty());
    assert!(bob.drain().await.is_empty());

    // When the store recovers, the room works again and seq continues without a gap.
    store.send(SetMode(Mode::Commit)).await.unwrap();
    let ack = room.send(ann.post("works")).await.unwrap().unwrap();
    assert_eq!(ack.seq, Seq(1));
    assert_eq!(bob.message().await["seq"], 1);
}

#[actix_rt::test]
async fn leave_stops_delivery() {
    let (room, _) = start_room(RoomKind::Public, &[], Mode::Commit);
    let mut ann = Peer::new(1, 1, "ann");
    let mut bob = Peer::new(2, 2, "bob");
    room.send(ann.join_msg()).await.unwrap().unwrap();
    room.send(bob.join_msg()).await.unwrap().unwrap();
    assert_eq!(ann.frame().await["type"], "joined");
    room.send(Leave { session: bob.id }).await.unwrap();
    let left = ann.frame().await;
    assert_eq!(
        (left["type"].as_str(), left["user"].as_str()),
        (Some("left"), Some("bob"))
    );
    room.send(ann.post("bob is gone")).await.unwrap().unwrap();
    assert_eq!(ann.message().await["body"], "bob is gone");
    assert!(bob.drain().await.is_empty());
    let err = room
        .send(bob.post("not joined"))
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, RoomError::Forbidden(_)));
}

#[actix_rt::test]
async fn a_closed_session_is_dropped_after_the_resume_grace() {
    let (room, _) = start_room(RoomKind::Public, &[], Mode::Commit);
    let mut ann = Peer::new(1, 1, "ann");
    let bob = Peer::new(2, 2, "bob");
    room.send(ann.join_msg()).await.unwrap().unwrap();
    room.send(bob.join_msg()).await.unwrap().unwrap();
    bob.addr.send(StopSession).await.unwrap();
    actix_rt::time::sleep(Duration::from_millis(20)).await;
    room.send(ann.post("anyone?")).await.unwrap().unwrap();
    // Within the resume grace bob stays joined: no `left` yet.
    let frames = ann.drain().await;
    let kinds: HashSet<&str> = frames.iter().map(|f| f["type"].as_str().unwrap()).collect();
    assert!(!kinds.contains("left"), "{frames:?}");
    actix_rt::time::sleep(Duration::from_millis(300)).await;
    let frames = ann.drain().await;
    let kinds: HashSet<&str> = frames.iter().map(|f| f["type"].as_str().unwrap()).collect();
    assert!(kinds.contains("left"), "{frames:?}");
}

#[actix_rt::test]
async fn a_private_room_refuses_non_members() {
    let (room, _) = start_room(RoomKind::Private, &[1], Mode::Commit);
    let mut member = Peer::new(1, 1, "ann");
    let mut outsider = Peer::new(2, 2, "eve");
    room.send(member.join_msg()).await.unwrap().unwrap();
    let err = room.send(outsider.join_msg()).await.unwrap().unwrap_err();
    assert!(matches!(err, RoomError::Forbidden(_)));
    let err = room
        .send(ReadHistory {
            user: outsider.user.clone(),
            before: None,
            limit: None,
        })
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, RoomError::Forbidden(_)));
    let err = room
        .send(Who {
            user: outsider.user.clone(),
        })
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, RoomError::Forbidden(_)));
    room.send(member.post("secret")).await.unwrap().unwrap();
    assert_eq!(member.message().await["body"], "secret");
    assert!(outsider.drain().await.is_empty());
}

#[actix_rt::test]
async fn a_body_over_the_room_limit_is_refused() {
    let (room, store) = start_room(RoomKind::Public, &[], Mode::Commit);
    let ann = Peer::new(1, 1, "ann");
    room.send(ann.join_msg()).await.unwrap().unwrap();
    let err = room
        .send(ann.post(&"x".repeat(65)))
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, RoomError::TooLarge { max: 64 }));
    assert!(
        store.send(Release).await.unwrap().is_empty(),
        "nothing reached the store"
    );
}

#[actix_rt::test]
async fn history_comes_from_the_ring_buffer() {
    let (room, _) = start_room(RoomKind::Public, &[], Mode::Commit);
    let ann = Peer::new(1, 1, "ann");
    room.send(ann.join_msg()).await.unwrap().unwrap();
    for i in 1..=5 {
        room.send(ann.post(&format!("m{i}")))
            .await
            .unwrap()
            .unwrap();
    }
    // The fake store answers every history request with an empty page: these come from memory.
    let page = room
        .send(ReadHistory {
            user: ann.user.clone(),
            before: Some(Seq(5)),
            limit: Some(2),
        })
        .await
        .unwrap()
        .unwrap();
    let seqs: Vec<i64> = page.messages.iter().map(|m| m.seq.0).collect();
    assert_eq!(seqs, [3, 4]);
    assert!(page.has_more);
}

// ---------------------------------------------------------------- the real DB executor

#[actix_rt::test]
async fn the_db_executor_stores_batches_once_per_client_msg_id() {
    use rookery::store::NewPost;
    let db = TestDb::new();
    let mut conn = db.conn();
    rookery::store::run_migrations(&mut conn).unwrap();
    let user = rookery::store::create_user(&mut conn, "ann", "x").unwrap();
    let room =
        rookery::store::create_room(&mut conn, "hall", RoomKind::Public, &user, &[], 10).unwrap();
    let pool =
        rookery::store::connect_pool(&db.url, 2, Duration::from_secs(2), Duration::from_secs(10))
            .unwrap();
    let keys = Arc::new(rookery::crypto::Keyring::new([(1, [7u8; 32])]).unwrap());
    let executor = DbExecutor::start(
        2,
        pool,
        keys,
        DbSettings {
            token_ttl: Duration::from_secs(60),
            max_listed_rooms: 10,
        },
    );
    let post = |body: &str, id: Option<&str>| NewPost {
        sender: user.id,
        body: body.into(),
        client_msg_id: id.map(str::to_string),
    };
    let first = executor
        .send(StoreBatch {
            room: room.id,
            posts: vec![
                post("a", Some("k1")),
                post("b", None),
                post("a again", Some("k1")),
            ],
        })
        .await
        .unwrap()
        .unwrap();
    let first: Vec<Stored> = first.into_iter().map(Result::unwrap).collect();
    let seqs: Vec<(i64, bool)> = first.iter().map(|s| (s.seq.0, s.duplicate)).collect();
    assert_eq!(seqs, [(1, false), (2, false), (1, true)]);
    let second = executor
        .send(StoreBatch {
            room: room.id,
            posts: vec![post("c", None), post("a", Some("k1"))],
        })
        .await
        .unwrap()
        .unwrap();
    let second: Vec<Stored> = second.into_iter().map(Result::unwrap).collect();
    let seqs: Vec<(i64, bool)> = second.iter().map(|s| (s.seq.0, s.duplicate)).collect();
    assert_eq!(seqs, [(3, false), (1, true)]);
    assert_eq!(second[1].sent_at, first[0].sent_at);

    let page = executor
        .send(LoadHistory {
            room: room.clone(),
            before: None,
            limit: 10,
        })
        .await
        .unwrap()
        .unwrap();
    let bodies: Vec<&str> = page
        .messages
        .iter()
        .map(|m| m.body.as_deref().unwrap())
        .collect();
    assert_eq!(bodies, ["a", "b", "c"]);
    assert!(!page.has_more);
}

/// A commit slower than the store timeout: the sender hears `unavailable` (outcome unknown),
/// and when the commit lands after all, the message is delivered once, in order.
#[actix_rt::test]
async fn a_late_commit_is_answered_unavailable_and_still_delivered_once() {
    let mut quick = settings();
    quick.store_timeout = Duration::from_millis(200);
    let (room, store) = start_room_with(RoomKind::Public, &[], Mode::Hold, quick);
    let mut ann = Peer::new(1, 1, "ann");
    let mut bob = Peer::new(2, 2, "bob");
    room.send(ann.join_msg()).await.unwrap().unwrap();
    room.send(bob.join_msg()).await.unwrap().unwrap();
    ann.drain().await;

    let err = room.send(ann.post("slow")).await.unwrap().unwrap_err();
    assert_eq!(Error::from(err).to_wire().0, ErrorCode::Unavailable);
    assert!(bob.drain().await.is_empty());
    store.send(Release).await.unwrap();
    let delivered = bob.message().await;
    assert_eq!(
        (delivered["seq"].as_i64(), delivered["body"].as_str()),
        (Some(1), Some("slow"))
    );
    store.send(SetMode(Mode::Commit)).await.unwrap();
    room.send(ann.post("next")).await.unwrap().unwrap();
    let next = bob.message().await;
    assert_eq!(next["seq"], 2);
    assert!(bob.drain().await.is_empty(), "delivered twice");
}

// ---------------------------------------------------------------- group commit

/// A DB stand-in for the committer: records the size of each combined batch and answers
/// after a short delay, so that batches gather meanwhile.
struct FakeDb {
    combined: Vec<usize>,
    fail: bool,
}

impl Actor for FakeDb {
    type Context = Context<Self>;
}

impl Handler<rookery::actors::db::StoreBatches> for FakeDb {
    type Result = ResponseFuture<Result<Vec<Vec<Outcome>>, StoreError>>;

    fn handle(
        &mut self,
        msg: rookery::actors::db::StoreBatches,
        _: &mut Context<Self>,
    ) -> Self::Result {
        self.combined.push(msg.batches.len());
        let fail = self.fail;
        Box::pin(async move {
            actix_rt::time::sleep(Duration::from_millis(30)).await;
            if fail {
                return Err(StoreError::Unavailable("disk on fire".into()));
            }
            Ok(msg
                .batches
                .iter()
                .map(|b| {
                    (1..=b.posts.len() as i64)
                        .map(|seq| {
                            Ok(Stored {
                                seq: Seq(seq),
                                sent_at: Utc::now(),
                                duplicate: false,
                            })
                        })
                        .collect()
                })
                .collect())
        })
    }
}

#[derive(Message)]
#[rtype(result = "Vec<usize>")]
struct Combined;

impl Handler<Combined> for FakeDb {
    type Result = MessageResult<Combined>;
    fn handle(&mut self, _: Combined, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.combined.clone())
    }
}

fn batch(room: i64, n: usize) -> StoreBatch {
    StoreBatch {
        room: RoomId(room),
        posts: (0..n)
            .map(|i| rookery::store::NewPost {
                sender: UserId(1),
                body: format!("m{i}").into(),
                client_msg_id: None,
            })
            .collect(),
    }
}

#[actix_rt::test]
async fn the_committer_gathers_rooms_into_one_transaction_while_the_executor_is_busy() {
    use rookery::actors::committer::Committer;
    let db = FakeDb {
        combined: Vec::new(),
        fail: false,
    }
    .start();
    let committer = Committer::new(db.clone().recipient(), 1, 256, Duration::from_secs(5)).start();
    let first = committer.send(batch(1, 1));
    actix_rt::time::sleep(Duration::from_millis(5)).await;
    // The only executor is busy with room 1: these gather.
    let rest: Vec<_> = (2..=5).map(|room| committer.send(batch(room, 2))).collect();
    assert_eq!(first.await.unwrap().unwrap().len(), 1);
    for reply in rest {
        assert_eq!(reply.await.unwrap().unwrap().len(), 2);
    }
    assert_eq!(db.send(Combined).await.unwrap(), vec![1, 4]);
}

#[actix_rt::test]
async fn a_failed_combined_batch_fails_each_of_its_rooms() {
    use rookery::actors::committer::Committer;
    let db = FakeDb {
        combined: Vec::new(),
        fail: true,
    }
    .start();
    let committer = Committer::new(db.clone().recipient(), 1, 256, Duration::from_secs(5)).start();
    let replies: Vec<_> = (1..=3).map(|room| committer.send(batch(room, 1))).collect();
    for reply in replies {
        let err = reply.await.unwrap().unwrap_err();
        assert_eq!(Error::from(err).to_wire().0, ErrorCode::Unavailable);
    }
}

#[actix_rt::test]
async fn store_batches_commits_rooms_together_and_never_duplicates_on_retry() {
    use rookery::store::{store_batches, NewPost};
    let db = TestDb::new();
    let mut conn = db.conn();
    rookery::store::run_migrations(&mut conn).unwrap();
    let user = rookery::store::create_user(&mut conn, "ann", "x").unwrap();
    let a = rookery::store::create_room(&mut conn, "a", RoomKind::Public, &user, &[], 10).unwrap();
    let b = rookery::store::create_room(&mut conn, "b", RoomKind::Public, &user, &[], 10).unwrap();
    let keys = rookery::crypto::Keyring::new([(1, [9u8; 32])]).unwrap();
    let posts = |prefix: &str, n: usize| -> Vec<NewPost> {
        (0..n)
            .map(|i| NewPost {
                sender: user.id,
                body: format!("{prefix}{i}").into(),
                client_msg_id: Some(format!("{prefix}{i}")),
            })
            .collect()
    };
    let (pa, pb) = (posts("a", 3), posts("b", 2));
    let first = store_batches(&mut conn, &keys, &[(a.id, &pa), (b.id, &pb)]).unwrap();
    let seqs = |r: &Vec<Outcome>| {
        r.iter()
            .map(|s| s.as_ref().map(|s| (s.seq.0, s.duplicate)).unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(seqs(&first[0]), [(1, false), (2, false), (3, false)]);
    assert_eq!(seqs(&first[1]), [(1, false), (2, false)]);

    // The same batches again (a retry after a lost reply): all duplicates, nothing stored.
    let again = store_batches(&mut conn, &keys, &[(a.id, &pa), (b.id, &pb)]).unwrap();
    assert_eq!(seqs(&again[0]), [(1, true), (2, true), (3, true)]);
    assert_eq!(seqs(&again[1]), [(1, true), (2, true)]);

    // A combined batch with a room that does not exist fails as a whole: room a gets nothing
    // and its counter does not move, so the next seq has no gap.
    let more = posts("c", 2);
    let missing = RoomId(999_999);
    assert!(store_batches(&mut conn, &keys, &[(a.id, &more), (missing, &more)]).is_err());
    let next = store_batches(&mut conn, &keys, &[(a.id, &more)]).unwrap();
    assert_eq!(seqs(&next[0]), [(4, false), (5, false)]);
    let unkeyed = [NewPost {
        sender: user.id,
        body: "no retry key".into(),
        client_msg_id: None,
    }];
    let last = store_batches(&mut conn, &keys, &[(a.id, &unkeyed)]).unwrap();
    assert_eq!(seqs(&last[0]), [(6, false)]);

    // Read back: every stored body opens under its room and seq, keys are kept as sent.
    let page = rookery::store::load_messages(&mut conn, &keys, &a, None, 10).unwrap();
    let rows: Vec<(i64, Option<&str>, Option<&str>)> = page
        .messages
        .iter()
        .map(|m| (m.seq.0, m.body.as_deref(), m.client_msg_id.as_deref()))
        .collect();
    assert_eq!(
        rows,
        [
            (1, Some("a0"), Some("a0")),
            (2, Some("a1"), Some("a1")),
            (3, Some("a2"), Some("a2")),
            (4, Some("c0"), Some("c0")),
            (5, Some("c1"), Some("c1")),
            (6, Some("no retry key"), None),
        ]
    );
    use diesel::dsl::count_star;
    use diesel::prelude::*;
    let stored: i64 = rookery::schema::messages::table
        .select(count_star())
        .first(&mut conn)
        .unwrap();
    assert_eq!(stored, 8);

    // In one batch: a key stored before, a new key used twice, no key, in two rooms at once.
    let post = |body: &str, key: Option<&str>| NewPost {
        sender: user.id,
        body: body.into(),
        client_msg_id: key.map(str::to_string),
    };
    let mixed = [
        post("a0 again", Some("a0")),
        post("d0", Some("d0")),
        post("d0 again", Some("d0")),
        post("e", None),
    ];
    let other = [post("b1 again", Some("b1")), post("f", Some("f0"))];
    let both = store_batches(&mut conn, &keys, &[(a.id, &mixed), (b.id, &other)]).unwrap();
    assert_eq!(
        seqs(&both[0]),
        [(1, true), (7, false), (7, true), (8, false)]
    );
    assert_eq!(seqs(&both[1]), [(2, true), (3, false)]);
    let stored: i64 = rookery::schema::messages::table
        .select(count_star())
        .first(&mut conn)
        .unwrap();
    assert_eq!(stored, 11);
}

/// A value Postgres refuses (U+0000 in a text column) fails only its own message: the other
/// messages of the combined batch, in its room and in others, are stored once, in order.
#[actix_rt::test]
async fn a_message_the_database_refuses_fails_alone() {
    use rookery::store::{store_batches, NewPost};
    let db = TestDb::new();
    let mut conn = db.conn();
    rookery::store::run_migrations(&mut conn).unwrap();
    let user = rookery::store::create_user(&mut conn, "ann", "x").unwrap();
    let a = rookery::store::create_room(&mut conn, "a", RoomKind::Public, &user, &[], 10).unwrap();
    let b = rookery::store::create_room(&mut conn, "b", RoomKind::Public, &user, &[], 10).unwrap();
    let keys = rookery::crypto::Keyring::new([(1, [9u8; 32])]).unwrap();
    let post = |key: &str| NewPost {
        sender: user.id,
        body: format!("body of {key}").into(),
        client_msg_id: Some(key.to_string()),
    };
    let pa = [post("a1"), post("poi\u{0}son"), post("a2")];
    let pb = [post("b1"), post("b2")];
    let outcomes = store_batches(&mut conn, &keys, &[(a.id, &pa), (b.id, &pb)]).unwrap();
    let seqs = |r: &Vec<Outcome>| {
        r.iter()
            .map(|o| o.as_ref().ok().map(|s| s.seq.0))
            .collect::<Vec<_>>()
    };
    assert_eq!(seqs(&outcomes[0]), [Some(1), None, Some(2)]);
    assert_eq!(seqs(&outcomes[1]), [Some(1), Some(2)]);
    assert!(outcomes[0][1].as_ref().unwrap_err().why.contains("0x00"));

    // Retrying the good ones finds them stored: each exists once.
    let again = store_batches(&mut conn, &keys, &[(a.id, &pa[..1]), (b.id, &pb)]).unwrap();
    assert!(again
        .iter()
        .flatten()
        .all(|o| o.as_ref().unwrap().duplicate));
    let page = rookery::store::load_messages(&mut conn, &keys, &a, None, 10).unwrap();
    let keys_stored: Vec<Option<&str>> = page
        .messages
        .iter()
        .map(|m| m.client_msg_id.as_deref())
        .collect();
    assert_eq!(keys_stored, [Some("a1"), Some("a2")]);
}

// ---------------------------------------------------------------- room policies

const NO_RATE: &str = "rate = { messages = 100000, per_seconds = 1, burst = 100000 }";

fn start_room_with_policy(
    kind: RoomKind,
    members: &[i64],
    policy: &str,
) -> (Addr<Room>, Addr<FakeStore>) {
    start_room_under(kind, members, Mode::Commit, settings(), policy)
}

/// The frames of kind `kind` a peer has been sent so far (the others are dropped).
async fn frames_of(peer: &mut Peer, kind: &str) -> Vec<Value> {
    peer.drain()
        .await
        .into_iter()
        .filter(|frame| frame["type"] == kind)
        .collect()
}

#[actix_rt::test]
async fn a_config_room_admits_its_whitelist_and_a_reload_that_drops_a_name_kicks_it() {
    let file = format!(
        "[defaults]\n{NO_RATE}\n[[room]]\nname = \"hall\"\nkind = \"private\"\nwhitelist = [\"ann\", \"bob\"]\n"
    );
    let (room, _) = start_room_with_policy(RoomKind::Private, &[], &file);
    let mut ann = Peer::new(1, 1, "ann");
    let mut bob = Peer::new(2, 2, "bob");
    let eve = Peer::new(3, 3, "eve");
    room.send(ann.join_msg()).await.unwrap().unwrap();
    room.send(bob.join_msg()).await.unwrap().unwrap();
    let err = room.send(eve.join_msg()).await.unwrap().unwrap_err();
    assert!(
        matches!(err, RoomError::Forbidden(Forbidden::NotMember)),
        "{err:?}"
    );

    let reloaded = file.replace("[\"ann\", \"bob\"]", "[\"ann\"]");
    let policies = Arc::new(Policies::parse(&reloaded, "test").unwrap());
    assert_eq!(room.send(SetPolicy { policies }).await.unwrap(), 1);
    assert_eq!(
        frames_of(&mut bob, "kicked").await,
        [serde_json::json!({"type": "kicked", "room": "hall", "reason": "removed from whitelist"})]
    );
    room.send(ann.post("after the kick"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ann.message().await["body"], "after the kick");
    assert!(
        frames_of(&mut bob, "message").await.is_empty(),
        "no event after the kick"
    );
    let err = room
        .send(bob.post("still here?"))
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(err, RoomError::Forbidden(Forbidden::NotJoined)),
        "{err:?}"
    );
    let err = room.send(bob.join_msg()).await.unwrap().unwrap_err();
    assert!(
        matches!(err, RoomError::Forbidden(Forbidden::NotMember)),
        "{err:?}"
    );
}

#[actix_rt::test]
async fn a_read_only_room_takes_messages_from_its_admins_only() {
    let file = format!(
        "[defaults]\n{NO_RATE}\n[[room]]\nname = \"hall\"\nkind = \"public\"\nread_only = true\nadmins = [\"ann\"]\n"
    );
    let (room, _) = start_room_with_policy(RoomKind::Public, &[], &file);
    let mut ann = Peer::new(1, 1, "ann");
    let bob = Peer::new(2, 2, "bob");
    room.send(ann.join_msg()).await.unwrap().unwrap();
    room.send(bob.join_msg()).await.unwrap().unwrap();
    let err = room.send(bob.post("may I?")).await.unwrap().unwrap_err();
    assert!(
        matches!(err, RoomError::Forbidden(Forbidden::ReadOnly)),
        "{err:?}"
    );
    room.send(ann.post("news")).await.unwrap().unwrap();
    assert_eq!(ann.message().await["body"], "news");
}

#[actix_rt::test]
async fn a_sender_over_the_room_rate_is_refused_then_allowed_again() {
    let file = "[defaults]\nrate = { messages = 5, per_seconds = 1, burst = 2 }\n";
    let (room, _) = start_room_with_policy(RoomKind::Public, &[], file);
    let ann = Peer::new(1, 1, "ann");
    let bob = Peer::new(2, 2, "bob");
    room.send(ann.join_msg()).await.unwrap().unwrap();
    room.send(bob.join_msg()).await.unwrap().unwrap();
    room.send(ann.post("1")).await.unwrap().unwrap();
    room.send(ann.post("2")).await.unwrap().unwrap();
    let err = room.send(ann.post("3")).await.unwrap().unwrap_err();
    assert!(matches!(err, RoomError::RateLimited), "{err:?}");
    room.send(bob.post("mine")).await.unwrap().unwrap();
    actix_rt::time::sleep(Duration::from_millis(250)).await;
    room.send(ann.post("later")).await.unwrap().unwrap();
}

#[actix_rt::test]
async fn a_full_room_refuses_one_more_user_but_not_another_session_of_a_member() {
    let file = format!("[defaults]\n{NO_RATE}\nmax_members = 1\n");
    let (room, _) = start_room_with_policy(RoomKind::Public, &[], &file);
    let ann = Peer::new(1, 1, "ann");
    let ann_again = Peer::new(2, 1, "ann");
    let bob = Peer::new(3, 2, "bob");
    room.send(ann.join_msg()).await.unwrap().unwrap();
    room.send(ann_again.join_msg()).await.unwrap().unwrap();
    let err = room.send(bob.join_msg()).await.unwrap().unwrap_err();
    assert!(
        matches!(err, RoomError::Forbidden(Forbidden::Full)),
        "{err:?}"
    );
    assert_eq!(Error::Room(err).to_wire().1, "room is full");
}

#[actix_rt::test]
async fn a_room_that_does_not_persist_delivers_from_reserved_seqs_and_keeps_only_its_ring() {
    let file = format!("[defaults]\n{NO_RATE}\npersist = false\nhistory_limit = 3\n");
    let (room, store) = start_room_with_policy(RoomKind::Public, &[], &file);
    let mut ann = Peer::new(1, 1, "ann");
    room.send(ann.join_msg()).await.unwrap().unwrap();
    let mut seqs = Vec::new();
    for i in 0..5 {
        let ack = room
            .send(ann.post(&format!("m{i}")))
            .await
            .unwrap()
            .unwrap();
        seqs.push(ack.seq.0);
        assert_eq!(ann.message().await["seq"], ack.seq.0);
    }
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    assert!(
        store.send(Release).await.unwrap().is_empty(),
        "nothing was stored"
    );
    let page = room
        .send(ReadHistory {
            user: ann.user.clone(),
            before: None,
            limit: Some(10),
        })
        .await
        .unwrap()
        .unwrap();
    let kept: Vec<i64> = page.messages.iter().map(|m| m.seq.0).collect();
    assert_eq!(kept, seqs[2..], "the ring holds the newest 3");
    assert!(!page.has_more);
    let mut late = ann.join_msg();
    late.session = SessionId(9);
    late.after = Some(Seq(seqs[0]));
    let joined = room.send(late).await.unwrap().unwrap();
    let missed: Vec<i64> = joined.missed.unwrap().iter().map(|m| m.seq.0).collect();
    assert_eq!(missed, seqs[2..]);
    assert!(joined.truncated, "what rolled out of the ring is gone");
}

#[actix_rt::test]
async fn a_reload_that_stops_then_resumes_storing_keeps_seqs_increasing_and_delivers_all() {
    let stored = format!("[defaults]\n{NO_RATE}\n");
    let in_memory = format!("[defaults]\n{NO_RATE}\npersist = false\n");
    let (room, store) = start_room_with_policy(RoomKind::Public, &[], &stored);
    let mut ann = Peer::new(1, 1, "ann");
    room.send(ann.join_msg()).await.unwrap().unwrap();
    let reload = |text: &str| SetPolicy {
        policies: Arc::new(Policies::parse(text, "test").unwrap()),
    };
    let mut acked = Vec::new();
    for (round, policy) in [&stored, &in_memory, &stored, &in_memory]
        .into_iter()
        .enumerate()
    {
        room.send(reload(policy)).await.unwrap();
        // Posts accepted before and after the flip, without waiting for each other.
        let pending: Vec<_> = (0..3)
            .map(|i| room.send(ann.post(&format!("r{round} m{i}"))))
            .collect();
        for request in pending {
            acked.push(request.await.unwrap().unwrap().seq.0);
        }
    }
    let mut delivered = Vec::new();
    while delivered.len() < acked.len() {
        delivered.push(ann.message().await["seq"].as_i64().unwrap());
    }
    assert!(acked.windows(2).all(|w| w[1] > w[0]), "acks: {acked:?}");
    assert_eq!(
        delivered, acked,
        "every message delivered once, in seq order"
    );
    let batches = store.send(Release).await.unwrap();
    assert_eq!(
        batches.iter().sum::<usize>(),
        6,
        "the stored rounds only: {batches:?}"
    );
}

/// The real DB executor on a fresh database, with `ann` and her public room `hall`.
async fn executor_with_a_room() -> (TestDb, Addr<DbExecutor>, UserRecord, RoomRecord) {
    let db = TestDb::new();
    let mut conn = db.conn();
    rookery::store::run_migrations(&mut conn).unwrap();
    let user = rookery::store::create_user(&mut conn, "ann", "x").unwrap();
    let room =
        rookery::store::create_room(&mut conn, "hall", RoomKind::Public, &user, &[], 10).unwrap();
    let pool =
        rookery::store::connect_pool(&db.url, 2, Duration::from_secs(2), Duration::from_secs(10))
            .unwrap();
    let keys = Arc::new(rookery::crypto::Keyring::new([(1, [7u8; 32])]).unwrap());
    let settings = DbSettings {
        token_ttl: Duration::from_secs(60),
        max_listed_rooms: 10,
    };
    (db, DbExecutor::start(1, pool, keys, settings), user, room)
}

#[actix_rt::test]
async fn the_retention_job_deletes_only_messages_past_their_rooms_window() {
    use diesel::RunQueryDsl;
    use rookery::store::NewPost;
    let (db, executor, user, room) = executor_with_a_room().await;
    let posts = (0..3)
        .map(|i| NewPost {
            sender: user.id,
            body: format!("m{i}").into(),
            client_msg_id: None,
        })
        .collect();
    executor
        .send(StoreBatch {
            room: room.id,
            posts,
        })
        .await
        .unwrap()
        .unwrap();
    diesel::sql_query("UPDATE messages SET created_at = now() - interval '3 days' WHERE seq = 1")
        .execute(&mut db.conn())
        .unwrap();
    let purge = |rules: Vec<(String, u32)>, default_days| PurgeExpired {
        rules,
        default_days,
    };
    // The room has a rule of its own (keep for ever) that beats the default of 1 day.
    let kept = executor
        .send(purge(vec![("hall".into(), 0)], 1))
        .await
        .unwrap();
    assert_eq!(kept.unwrap(), 0);
    let deleted = executor.send(purge(vec![], 2)).await.unwrap().unwrap();
    assert_eq!(deleted, 1, "only the message older than 2 days");
    let left: Vec<i64> = stored_messages(&db, "hall")
        .iter()
        .map(|m| m.seq.0)
        .collect();
    assert_eq!(left, [2, 3]);
}

#[actix_rt::test]
async fn the_db_executor_refuses_a_room_beyond_its_owners_limit() {
    use rookery::actors::db::CreateRoom;
    use rookery::protocol::RoomName;
    let (_db, executor, user, _) = executor_with_a_room().await;
    let create = |name: &str| CreateRoom {
        name: RoomName::parse(name).unwrap(),
        kind: RoomKind::Public,
        owner: user.clone(),
        members: Vec::new(),
        max_owned: 2,
    };
    executor.send(create("second")).await.unwrap().unwrap();
    let err = executor.send(create("third")).await.unwrap().unwrap_err();
    assert!(
        matches!(err, StoreError::TooManyRooms { max: 2 }),
        "{err:?}"
    );
}

/// A directory over `executor`, loading rooms through `load`.
fn start_directory(
    executor: &Addr<DbExecutor>,
    load: Recipient<rookery::actors::db::LoadRoom>,
    policy: &str,
) -> Addr<rookery::actors::directory::Directory> {
    use rookery::actors::directory::*;
    let presence = PresenceHandle::of(&Presence::default().start());
    Directory::new(
        DirectoryStore {
            load,
            list: executor.clone().recipient(),
            create: executor.clone().recipient(),
            direct: executor.clone().recipient(),
            purge: executor.clone().recipient(),
            revoked: executor.clone().recipient(),
        },
        StoreHandle {
            store: executor.clone().recipient(),
            history: executor.clone().recipient(),
            members: executor.clone().recipient(),
            seqs: executor.clone().recipient(),
        },
        presence,
        DirectorySettings {
            rooms: settings(),
            handover: Duration::from_secs(1),
            retention_sweep: Duration::from_secs(3600),
            revocation_check: Duration::from_secs(3600),
        },
        Arc::new(Policies::parse(policy, "test").unwrap()),
    )
    .start()
}

/// Forwards room look-ups to the executor, counting them.
struct CountedLoads {
    executor: Addr<DbExecutor>,
    count: usize,
}

impl Actor for CountedLoads {
    type Context = Context<Self>;
}

impl Handler<rookery::actors::db::LoadRoom> for CountedLoads {
    type Result = ResponseFuture<Result<RoomState, StoreError>>;
    fn handle(
        &mut self,
        msg: rookery::actors::db::LoadRoom,
        _: &mut Context<Self>,
    ) -> Self::Result {
        self.count += 1;
        let request = self.executor.send(msg);
        Box::pin(async move { request.await.unwrap() })
    }
}

#[derive(Message)]
#[rtype(result = "usize")]
struct LoadsSoFar;

impl Handler<LoadsSoFar> for CountedLoads {
    type Result = usize;
    fn handle(&mut self, _: LoadsSoFar, _: &mut Context<Self>) -> usize {
        self.count
    }
}

/// Look-ups of a room that does not exist reach the database once in a while, not each time;
/// creating the room (or a direct room) makes it found at once.
#[actix_rt::test]
async fn the_directory_remembers_missing_rooms_until_one_is_created() {
    use rookery::actors::directory::*;
    use rookery::protocol::{RoomName, Username};
    let (db, executor, user, _) = executor_with_a_room().await;
    let loads = CountedLoads {
        executor: executor.clone(),
        count: 0,
    }
    .start();
    let directory = start_directory(&executor, loads.clone().recipient(), "");
    let open = |name: &str| OpenRoom {
        name: RoomName::parse(name).unwrap(),
        joined: None,
    };
    for _ in 0..20 {
        let err = directory.send(open("nowhere")).await.unwrap().unwrap_err();
        assert!(matches!(err, RoomError::NotFound), "{err:?}");
    }
    assert_eq!(loads.send(LoadsSoFar).await.unwrap(), 1);
    directory
        .send(CreateRoomFor {
            name: RoomName::parse("nowhere").unwrap(),
            kind: RoomKind::Public,
            owner: user.clone(),
            members: Vec::new(),
        })
        .await
        .unwrap()
        .unwrap();
    assert!(directory.send(open("nowhere")).await.unwrap().is_ok());

    let bob = rookery::store::create_user(&mut db.conn(), "bob", "x").unwrap();
    let direct = "dm:ann:bob";
    let err = directory.send(open(direct)).await.unwrap().unwrap_err();
    assert!(
        matches!(err, RoomError::Forbidden(Forbidden::NotMember)),
        "{err:?}"
    );
    let room = directory
        .send(OpenDirectFor {
            me: user,
            other: Username::parse(bob.username).unwrap(),
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(room.name, direct);
    assert!(directory.send(open(direct)).await.unwrap().is_ok());
    // Once the moment has passed, a look-up asks the database again.
    let before = loads.send(LoadsSoFar).await.unwrap();
    directory
        .send(open("elsewhere"))
        .await
        .unwrap()
        .unwrap_err();
    actix_rt::time::sleep(REMEMBER_MISSING + Duration::from_millis(100)).await;
    directory
        .send(open("elsewhere"))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(loads.send(LoadsSoFar).await.unwrap(), before + 2);
}

/// The read lane holds at most its limit: a request beyond it is refused `Busy` at once,
/// and one after the queue has drained goes through.
#[actix_rt::test]
async fn the_read_queue_sheds_requests_beyond_its_limit() {
    use rookery::actors::db::{DbQueue, LoadHistory};
    let (_db, executor, _, room) = executor_with_a_room().await;
    let queue = DbQueue::new(executor, 1).start();
    let read = || LoadHistory {
        room: room.clone(),
        before: None,
        limit: 10,
    };
    // Both are in the queue's mailbox before either is handled.
    let first = queue.send(read());
    let second = queue.send(read());
    let err = second.await.unwrap().unwrap_err();
    assert!(first.await.unwrap().is_ok());
    assert!(matches!(err, StoreError::Busy), "{err:?}");
    assert_eq!(Error::from(err).to_wire().0, ErrorCode::RateLimited);
    assert!(queue.send(read()).await.unwrap().is_ok());
}

#[actix_rt::test]
async fn the_directory_refuses_a_join_beyond_the_users_joined_room_limit() {
    use rookery::actors::directory::*;
    use rookery::protocol::RoomName;
    let (_db, executor, _, _) = executor_with_a_room().await;
    let directory = start_directory(
        &executor,
        executor.clone().recipient(),
        "[users]\nmax_joined_rooms = 2\n",
    );
    let open = |joined| OpenRoom {
        name: RoomName::parse("hall").unwrap(),
        joined,
    };
    assert!(directory.send(open(Some(1))).await.unwrap().is_ok());
    assert!(
        directory.send(open(None)).await.unwrap().is_ok(),
        "not a join"
    );
    let err = directory.send(open(Some(2))).await.unwrap().unwrap_err();
    assert!(
        matches!(err, RoomError::Forbidden(Forbidden::TooManyJoined)),
        "{err:?}"
    );
}
