//! Hot paths: request parsing, event serialization (once per message, shared by every
//! recipient), AES-256-GCM of a 200-byte body, and a Room actor fanning one message out to
//! 1,000 sessions in process. Run with `cargo bench`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use actix::prelude::*;
use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rookery::actors::db::{ChangeMember, LoadHistory, ReserveSeqs, StoreBatch};
use rookery::actors::presence::{Presence, PresenceHandle};
use rookery::actors::room::{Deliver, Join, Post, Room, RoomPolicy, RoomSettings, StoreHandle};
use rookery::crypto::{Binding, Keyring};
use rookery::error::StoreError;
use rookery::ids::{RoomId, Seq, SessionId, UserId};
use rookery::policy::Policies;
use rookery::protocol::{parse_request, Event, MessageView, RoomKind};
use rookery::store::models::{
    HistoryPage, Outcome, RoomOrigin, RoomRecord, RoomState, Stored, UserRecord,
};
use std::collections::HashSet;

fn parsing(c: &mut Criterion) {
    let frame = r#"{"id":"6f1c2b9e-3d4a-4c1b-9a57-1f0e2d3c4b5a","type":"send","room":"general","body":"hello, this is a short chat message of a typical size","client_msg_id":"c-42"}"#;
    c.bench_function("parse send request", |b| {
        b.iter(|| parse_request(black_box(frame)).unwrap())
    });
}

fn view() -> MessageView {
    MessageView {
        room: "general".into(),
        seq: Seq(123_456),
        from: "ann".into(),
        body: Some("x".repeat(200)),
        sent_at: "2026-11-26T09:54:36.392Z".into(),
        client_msg_id: Some("c-42".into()),
        error: None,
    }
}

fn serialization(c: &mut Criterion) {
    let view = view();
    c.bench_function("serialize message event (once per message)", |b| {
        b.iter(|| Event::Message(black_box(&view)).to_frame())
    });
}

fn crypto(c: &mut Criterion) {
    let keys = Keyring::new([(1, [7u8; 32])]).unwrap();
    let body = vec![b'x'; 200];
    let at = Binding {
        room: RoomId(1),
        seq: Seq(1),
        sender: UserId(1),
        sent_at_micros: 1_700_000_000_000_000,
    };
    let sealed = keys.seal(&at, &body).unwrap();
    c.bench_function("AES-256-GCM seal 200 bytes", |b| {
        b.iter(|| keys.seal(&at, black_box(&body)).unwrap())
    });
    c.bench_function("AES-256-GCM open 200 bytes", |b| {
        b.iter(|| keys.open(&at, black_box(&sealed)).unwrap())
    });
}

/// Commits at once, numbering like the real store.
struct InstantStore {
    last: i64,
}

impl Actor for InstantStore {
    type Context = Context<Self>;
}

impl Handler<StoreBatch> for InstantStore {
    type Result = Result<Vec<Outcome>, StoreError>;
    fn handle(&mut self, msg: StoreBatch, _: &mut Context<Self>) -> Self::Result {
        Ok(msg
            .posts
            .iter()
            .map(|_| {
                self.last += 1;
                Ok(Stored {
                    seq: Seq(self.last),
                    sent_at: chrono::Utc::now(),
                    duplicate: false,
                })
            })
            .collect())
    }
}

impl Handler<LoadHistory> for InstantStore {
    type Result = Result<HistoryPage, StoreError>;
    fn handle(&mut self, _: LoadHistory, _: &mut Context<Self>) -> Self::Result {
        Ok(HistoryPage::default())
    }
}

/// The fan-out bench's room stores its messages: neither members nor seqs are asked for.
impl Handler<ChangeMember> for InstantStore {
    type Result = Result<UserRecord, StoreError>;
    fn handle(&mut self, _: ChangeMember, _: &mut Context<Self>) -> Self::Result {
        Err(StoreError::NotFound)
    }
}

impl Handler<ReserveSeqs> for InstantStore {
    type Result = Result<Seq, StoreError>;
    fn handle(&mut self, msg: ReserveSeqs, _: &mut Context<Self>) -> Self::Result {
        self.last += msg.count;
        Ok(Seq(self.last))
    }
}

/// Counts deliveries and wakes the bench when a whole fan-out has arrived.
struct Counter {
    delivered: Arc<AtomicUsize>,
}

impl Actor for Counter {
    type Context = Context<Self>;
}

impl Handler<Deliver> for Counter {
    type Result = ();
    fn handle(&mut self, _: Deliver, _: &mut Context<Self>) {
        self.delivered.fetch_add(1, Ordering::Relaxed);
    }
}

fn fanout(c: &mut Criterion) {
    const MEMBERS: usize = 1000;
    let system = actix::System::new();
    let delivered = Arc::new(AtomicUsize::new(0));
    let (room, sender) = system.block_on(async {
        let store = InstantStore { last: 0 }.start();
        let handle = StoreHandle {
            store: store.clone().recipient(),
            history: store.clone().recipient(),
            members: store.clone().recipient(),
            seqs: store.recipient(),
        };
        let state = RoomState {
            record: RoomRecord {
                id: RoomId(1),
                name: "general".into(),
                kind: RoomKind::Public,
                owner: None,
                last_seq: Seq(0),
                origin: RoomOrigin::User,
                closed: false,
            },
            members: Vec::new(),
            recent: Vec::new(),
        };
        let settings = RoomSettings {
            idle_stop: Duration::from_secs(3600),
            store_timeout: Duration::from_secs(10),
            resume_grace: Duration::from_secs(30),
            max_missed_bytes: 1 << 20,
            cluster: None,
        };
        let presence = PresenceHandle::of(&Presence::default().start());
        let unlimited =
            "[defaults]\nrate = { messages = 1000000, per_seconds = 1, burst = 1000000 }\n";
        let policies = Policies::parse(unlimited, "bench").unwrap();
        let policy = RoomPolicy::of(&state.record, HashSet::new(), &policies);
        let room = Room::new(state, policy, &settings, handle, presence, None).start();
        // Two arbiters hold the sessions, as the HTTP workers would.
        let arbiters: Vec<Arbiter> = (0..2).map(|_| Arbiter::new()).collect();
        for i in 0..MEMBERS {
            let delivered = delivered.clone();
            let counter =
                Counter::start_in_arbiter(&arbiters[i % arbiters.len()].handle(), move |_| {
                    Counter { delivered }
                });
            room.send(Join {
                session: SessionId(i as u64),
                user: UserRecord {
                    id: UserId(i as i64),
                    username: format!("u{i}"),
                },
                deliver: counter.recipient(),
                after: None,
                replaces: None,
            })
            .await
            .unwrap()
            .unwrap();
        }
        let sender = UserRecord {
            id: UserId(0),
            username: "u0".into(),
        };
        (room, sender)
    });
    let body: Arc<str> = "x".repeat(64).into();
    c.bench_function("fan out one message to 1,000 sessions", |b| {
        b.iter_custom(|iterations| {
            system.block_on(async {
                let started = Instant::now();
                for _ in 0..iterations {
                    let target = delivered.load(Ordering::Relaxed) + MEMBERS;
                    room.send(Post {
                        session: SessionId(0),
                        user: sender.clone(),
                        body: body.clone(),
                        client_msg_id: None,
                    })
                    .await
                    .unwrap()
                    .unwrap();
                    while delivered.load(Ordering::Relaxed) < target {
                        actix_rt::task::yield_now().await;
                    }
                }
                started.elapsed()
            })
        })
    });
}

criterion_group!(benches, parsing, serialization, crypto, fanout);
criterion_main!(benches);
