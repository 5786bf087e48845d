//! The Room actor: one per active room. It is the room's lock: it holds the joined sessions,
//! the room's policy and a ring buffer of the newest messages; it sends each message to the
//! store and, only after the commit, acks the sender and broadcasts the `message` event in seq
//! order, serialized once and shared by every recipient. Calls: the store (via
//! [`StoreHandle`]), [`PresenceHandle`], the directory (when idle), sessions (via [`Deliver`]).
//!
//! Messages:
//! - [`Join`] (Session): add a session; replies the room's name, kind and last delivered seq.
//! - [`Leave`] (Session, also on session stop): remove a session.
//! - [`Post`] (Session, `send`): queue; posts are stored in batches, one batch at a time, then
//!   broadcast in order; replies the seq and time after commit.
//! - [`ReadHistory`] (Session): a page, from the ring buffer when it reaches, else the store.
//! - [`Who`] (Session): the users joined, from presence.
//! - [`Typing`] (Session): tell the other joined sessions.
//! - [`TryStop`] (Directory): stop if still idle; replies whether it stopped.
//!
//! Sends [`Deliver`] to sessions and [`RoomIdle`] to the directory.

use actix::prelude::*;
use bytestring::ByteString;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::actors::db::{LoadHistory, StoreBatch};
use crate::actors::presence::{PresenceHandle, RoomEntered, RoomExited, WhoIsIn};
use crate::actors::session::SessionId;
use crate::error::{RoomError, StoreError};
use crate::protocol::{format_time, Event, MessageView, RoomKind, Seq, UserId, MAX_HISTORY_LIMIT};
use crate::store::models::{HistoryPage, RoomRecord, RoomState, UserRecord};
use crate::store::NewPost;
use tokio::sync::oneshot;

/// What a room sends a session.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub enum Deliver {
    /// An event frame to write as is; the bytes are shared with every other recipient.
    Frame { frame: ByteString },
    /// The session fell too far behind in `room` and was removed from it.
    Evicted { room: String },
}

/// Room → Directory: no session has been joined for the idle period.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct RoomIdle {
    pub name: String,
}

/// The store operations a room needs; a test can put a fake behind them.
#[derive(Clone)]
pub struct StoreHandle {
    pub store: Recipient<StoreBatch>,
    pub history: Recipient<LoadHistory>,
}

/// Room settings from config that are not stored per room.
#[derive(Debug, Clone)]
pub struct RoomSettings {
    pub history_limit: usize,
    pub max_body_bytes: usize,
    pub idle_stop: Duration,
}

/// The policy a room enforces: a value it holds and can swap.
#[derive(Debug, Clone)]
pub struct RoomPolicy {
    pub kind: RoomKind,
    pub members: HashSet<UserId>,
    pub history_limit: usize,
    pub max_body_bytes: usize,
}

impl RoomPolicy {
    fn admits(&self, user: UserId) -> bool {
        self.kind == RoomKind::Public || self.members.contains(&user)
    }
}

/// Session → Room: join. Replies the room's state; `Forbidden` if the user is not on the whitelist.
#[derive(Clone, Message)]
#[rtype(result = "Result<JoinedRoom, RoomError>")]
pub struct Join {
    pub session: SessionId,
    pub user: UserRecord,
    pub deliver: Recipient<Deliver>,
}

#[derive(Debug, Clone)]
pub struct JoinedRoom {
    pub name: String,
    pub kind: RoomKind,
    pub last_seq: Seq,
}

/// Session → Room: leave (also sent when a session stops).
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct Leave {
    pub session: SessionId,
}

/// Session → Room: `send`. Replies after the commit; never broadcast when the store fails.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Ack, RoomError>")]
pub struct Post {
    pub session: SessionId,
    pub user: UserRecord,
    pub body: Arc<str>,
    pub client_msg_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub seq: Seq,
    pub sent_at: String,
}

/// Session → Room: `history`. Messages with seq < `before`, at most `limit`, ascending.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<HistoryPage, RoomError>")]
pub struct ReadHistory {
    pub user: UserId,
    pub before: Option<Seq>,
    pub limit: Option<u32>,
}

/// Session → Room: `who`.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Vec<String>, RoomError>")]
pub struct Who {
    pub user: UserId,
}

/// Session → Room: `typing`.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<(), RoomError>")]
pub struct Typing {
    pub session: SessionId,
}

/// Directory → Room: stop now if still idle. Replies true when stopping.
#[derive(Debug, Message)]
#[rtype(result = "bool")]
pub struct TryStop;

/// Most posts stored in one transaction.
const MAX_BATCH: usize = 256;

struct Pending {
    post: Post,
    reply: oneshot::Sender<Result<Ack, RoomError>>,
}

struct Member {
    user: UserRecord,
    deliver: Recipient<Deliver>,
}

pub struct Room {
    record: RoomRecord,
    policy: RoomPolicy,
    /// Highest seq broadcast; every seq up to it has been delivered in order.
    delivered: Seq,
    /// Posts waiting for the batch in flight to commit; they go together in the next one.
    queue: VecDeque<Pending>,
    /// Whether a batch is being stored. One at a time keeps each sender's order.
    storing: bool,
    recent: VecDeque<MessageView>,
    sessions: HashMap<SessionId, Member>,
    sessions_per_user: HashMap<UserId, usize>,
    last_active: Instant,
    idle_stop: Duration,
    store: StoreHandle,
    presence: PresenceHandle,
    directory: Option<Recipient<RoomIdle>>,
}

impl Room {
    pub fn new(
        state: RoomState,
        settings: &RoomSettings,
        store: StoreHandle,
        presence: PresenceHandle,
        directory: Option<Recipient<RoomIdle>>,
    ) -> Room {
        let policy = RoomPolicy {
            kind: state.record.kind,
            members: state.members.into_iter().collect(),
            history_limit: settings.history_limit,
            max_body_bytes: settings.max_body_bytes,
        };
        let mut recent: VecDeque<MessageView> = state.recent.into();
        while recent.len() > policy.history_limit {
            recent.pop_front();
        }
        Room {
            delivered: state.record.last_seq,
            record: state.record,
            policy,
            queue: VecDeque::new(),
            storing: false,
            recent,
            sessions: HashMap::new(),
            sessions_per_user: HashMap::new(),
            last_active: Instant::now(),
            idle_stop: settings.idle_stop,
            store,
            presence,
            directory,
        }
    }

    /// Replaces the policy (config reload). Sessions no longer admitted are not removed here.
    pub fn set_policy(&mut self, policy: RoomPolicy) {
        self.policy = policy;
    }

    fn is_idle(&self) -> bool {
        self.sessions.is_empty()
            && !self.storing
            && self.queue.is_empty()
            && self.last_active.elapsed() >= self.idle_stop
    }

    /// Sends `frame` to every joined session except `except`; drops the closed and evicts the full.
    fn broadcast(&mut self, frame: &ByteString, except: Option<SessionId>) {
        let mut gone = Vec::new();
        for (id, member) in &self.sessions {
            if Some(*id) == except {
                continue;
            }
            let msg = Deliver::Frame {
                frame: frame.clone(),
            };
            match member.deliver.try_send(msg) {
                Ok(()) => {}
                Err(SendError::Closed(_)) => gone.push((*id, false)),
                Err(SendError::Full(_)) => gone.push((*id, true)),
            }
        }
        for (id, evict) in gone {
            if let Some(member) = self.remove_session(id) {
                if evict {
                    log::warn!(
                        "room {}: session {id:?} of {} fell behind and was removed",
                        self.record.name,
                        member.user.username
                    );
                    member.deliver.do_send(Deliver::Evicted {
                        room: self.record.name.clone(),
                    });
                }
            }
        }
    }

    fn remove_session(&mut self, id: SessionId) -> Option<Member> {
        let member = self.sessions.remove(&id)?;
        self.last_active = Instant::now();
        let user = member.user.id;
        let remaining = self.sessions_per_user.get_mut(&user).map(|count| {
            *count -= 1;
            *count
        });
        if remaining == Some(0) {
            self.sessions_per_user.remove(&user);
            let frame: ByteString = Event::Left {
                room: &self.record.name,
                user: &member.user.username,
            }
            .to_frame()
            .into();
            self.presence.exited.do_send(RoomExited {
                room: self.record.name.clone(),
                username: member.user.username.clone(),
            });
            self.broadcast(&frame, None);
        }
        Some(member)
    }

    /// Broadcasts a committed message and keeps it in the ring buffer.
    fn committed(&mut self, view: MessageView) {
        if view.seq <= self.delivered {
            return;
        }
        if view.seq != self.delivered.next() {
            log::warn!(
                "room {}: seq jumped from {} to {} (written elsewhere?)",
                self.record.name,
                self.delivered,
                view.seq
            );
        }
        self.delivered = view.seq;
        let frame: ByteString = Event::Message(&view).to_frame().into();
        self.broadcast(&frame, None);
        self.recent.push_back(view);
        if self.recent.len() > self.policy.history_limit {
            self.recent.pop_front();
        }
    }

    /// Sends the queued posts as one batch unless a batch is already being stored.
    fn store_queued(&mut self, ctx: &mut Context<Self>) {
        if self.storing || self.queue.is_empty() {
            return;
        }
        let take = self.queue.len().min(MAX_BATCH);
        let batch: Vec<Pending> = self.queue.drain(..take).collect();
        let request = self.store.store.send(StoreBatch {
            room: self.record.id,
            posts: batch
                .iter()
                .map(|p| NewPost {
                    sender: p.post.user.id,
                    body: p.post.body.clone(),
                    client_msg_id: p.post.client_msg_id.clone(),
                })
                .collect(),
        });
        self.storing = true;
        ctx.spawn(request.into_actor(self).map(move |result, room, ctx| {
            room.storing = false;
            room.last_active = Instant::now();
            let outcome = match result {
                Ok(Ok(stored)) if stored.len() == batch.len() => Ok(stored),
                Ok(Ok(stored)) => Err(format!(
                    "store answered {} of {} posts",
                    stored.len(),
                    batch.len()
                )),
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match outcome {
                Ok(stored) => {
                    for (pending, stored) in batch.into_iter().zip(stored) {
                        let sent_at = format_time(stored.sent_at);
                        if !stored.duplicate {
                            let post = pending.post;
                            room.committed(MessageView {
                                room: room.record.name.clone(),
                                seq: stored.seq,
                                from: post.user.username,
                                body: Some(post.body.to_string()),
                                sent_at: sent_at.clone(),
                                client_msg_id: post.client_msg_id,
                                error: None,
                            });
                        }
                        let _ = pending.reply.send(Ok(Ack {
                            seq: stored.seq,
                            sent_at,
                        }));
                    }
                }
                Err(why) => {
                    log::warn!(
                        "room {}: storing {} message(s) failed: {why}",
                        room.record.name,
                        batch.len()
                    );
                    for pending in batch {
                        let _ = pending
                            .reply
                            .send(Err(RoomError::Store(StoreError::Unavailable(why.clone()))));
                    }
                }
            }
            room.store_queued(ctx);
        }));
    }

    /// The page from the ring buffer, when it holds every message the page needs.
    fn page_from_recent(&self, before: Option<Seq>, limit: usize) -> Option<HistoryPage> {
        let end = before
            .map(|b| b.0.saturating_sub(1))
            .unwrap_or(self.delivered.0)
            .min(self.delivered.0);
        if end < 1 {
            return Some(HistoryPage::default());
        }
        let start = (end - i64::try_from(limit).unwrap_or(i64::MAX) + 1).max(1);
        let lowest = self.recent.front()?.seq.0;
        if lowest > start {
            return None;
        }
        let messages = self
            .recent
            .iter()
            .filter(|m| (start..=end).contains(&m.seq.0))
            .cloned()
            .collect();
        Some(HistoryPage {
            messages,
            has_more: start > 1,
        })
    }
}

impl Actor for Room {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        log::debug!(
            "room {} started at seq {}",
            self.record.name,
            self.delivered
        );
        let check = (self.idle_stop / 4).clamp(Duration::from_millis(50), Duration::from_secs(15));
        ctx.run_interval(check, |room, _| {
            if room.is_idle() {
                if let Some(directory) = &room.directory {
                    directory.do_send(RoomIdle {
                        name: room.record.name.clone(),
                    });
                }
            }
        });
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        log::debug!("room {} stopped", self.record.name);
    }
}

impl Handler<Join> for Room {
    type Result = Result<JoinedRoom, RoomError>;

    fn handle(&mut self, msg: Join, _: &mut Context<Self>) -> Self::Result {
        if !self.policy.admits(msg.user.id) {
            return Err(RoomError::Forbidden("this private room is not open to you"));
        }
        self.last_active = Instant::now();
        if !self.sessions.contains_key(&msg.session) {
            let count = self.sessions_per_user.entry(msg.user.id).or_default();
            *count += 1;
            if *count == 1 {
                let frame: ByteString = Event::Joined {
                    room: &self.record.name,
                    user: &msg.user.username,
                }
                .to_frame()
                .into();
                self.presence.entered.do_send(RoomEntered {
                    room: self.record.name.clone(),
                    username: msg.user.username.clone(),
                });
                self.broadcast(&frame, Some(msg.session));
            }
            self.sessions.insert(
                msg.session,
                Member {
                    user: msg.user,
                    deliver: msg.deliver,
                },
            );
        }
        Ok(JoinedRoom {
            name: self.record.name.clone(),
            kind: self.record.kind,
            last_seq: self.delivered,
        })
    }
}

impl Handler<Leave> for Room {
    type Result = ();

    fn handle(&mut self, msg: Leave, _: &mut Context<Self>) {
        self.remove_session(msg.session);
    }
}

impl Handler<Post> for Room {
    type Result = ResponseFuture<Result<Ack, RoomError>>;

    fn handle(&mut self, post: Post, ctx: &mut Context<Self>) -> Self::Result {
        let joined = self
            .sessions
            .get(&post.session)
            .is_some_and(|m| m.user.id == post.user.id);
        if !joined {
            return Box::pin(async { Err(RoomError::Forbidden("join the room first")) });
        }
        if post.body.len() > self.policy.max_body_bytes {
            let max = self.policy.max_body_bytes;
            return Box::pin(async move { Err(RoomError::TooLarge { max }) });
        }
        let (reply, answer) = oneshot::channel();
        self.queue.push_back(Pending { post, reply });
        self.store_queued(ctx);
        Box::pin(async move { answer.await.unwrap_or(Err(RoomError::Gone)) })
    }
}

impl Handler<ReadHistory> for Room {
    type Result = ResponseFuture<Result<HistoryPage, RoomError>>;

    fn handle(&mut self, msg: ReadHistory, _: &mut Context<Self>) -> Self::Result {
        if !self.policy.admits(msg.user) {
            return Box::pin(async {
                Err(RoomError::Forbidden("this private room is not open to you"))
            });
        }
        let default_limit = self.policy.history_limit.min(MAX_HISTORY_LIMIT as usize);
        let limit = msg.limit.map(|l| l as usize).unwrap_or(default_limit);
        if let Some(page) = self.page_from_recent(msg.before, limit) {
            return Box::pin(async { Ok(page) });
        }
        let before = msg
            .before
            .unwrap_or(self.delivered.next())
            .min(self.delivered.next());
        let request = self.store.history.send(LoadHistory {
            room: self.record.clone(),
            before: Some(before),
            limit,
        });
        Box::pin(async move {
            match request.await {
                Ok(result) => result.map_err(RoomError::Store),
                Err(_) => Err(RoomError::Gone),
            }
        })
    }
}

impl Handler<Who> for Room {
    type Result = ResponseFuture<Result<Vec<String>, RoomError>>;

    fn handle(&mut self, msg: Who, _: &mut Context<Self>) -> Self::Result {
        if !self.policy.admits(msg.user) {
            return Box::pin(async {
                Err(RoomError::Forbidden("this private room is not open to you"))
            });
        }
        let request = self.presence.who.send(WhoIsIn {
            room: self.record.name.clone(),
        });
        Box::pin(async move { request.await.map_err(|_| RoomError::Gone) })
    }
}

impl Handler<Typing> for Room {
    type Result = Result<(), RoomError>;

    fn handle(&mut self, msg: Typing, _: &mut Context<Self>) -> Self::Result {
        let Some(member) = self.sessions.get(&msg.session) else {
            return Err(RoomError::Forbidden("join the room first"));
        };
        let frame: ByteString = Event::Typing {
            room: &self.record.name,
            user: &member.user.username,
        }
        .to_frame()
        .into();
        self.broadcast(&frame, Some(msg.session));
        Ok(())
    }
}

impl Handler<TryStop> for Room {
    type Result = bool;

    fn handle(&mut self, _: TryStop, ctx: &mut Context<Self>) -> bool {
        let idle = self.is_idle();
        if idle {
            ctx.stop();
        }
        idle
    }
}
