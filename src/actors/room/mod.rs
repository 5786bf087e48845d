//! The Room actor: one per active room. It is the room's lock: it holds the joined sessions,
//! the room's policy ([`policy::RoomPolicy`], a value swapped on reload) and a ring buffer of
//! the newest messages. Posts are stored in batches, one batch at a time (so each sender keeps
//! its order); only after the commit does the room ack the senders and broadcast the `message`
//! events in seq order, each serialized once and shared by every recipient. A room whose
//! policy says `persist = false` hands out seqs from a block it reserved in the database and
//! keeps its messages in the ring buffer only. A session that vanished without a close stays
//! joined for the resume grace; a user no longer admitted is kicked. Calls: the store (via
//! [`StoreHandle`]), [`PresenceHandle`], the directory (when idle), sessions (via
//! [`Deliver`]).
//!
//! Messages:
//! - [`Join`] (Session): add (or, on resume, swap in) a session; replies the room's state and,
//!   with `after`, every message since.
//! - [`Leave`] (Session): remove a session now.
//! - [`Detach`] (Session, when its connection drops): keep the session joined for the grace.
//! - [`Post`] (Session, `send`): queue for the next batch; replies seq and time after commit,
//!   or `unavailable` when the commit did not finish within the store timeout.
//! - [`ReadHistory`] (Session): a page, from the ring buffer when it reaches, else the store.
//! - [`Who`] (Session): the users joined, from presence.
//! - [`Typing`] (Session): tell the other joined sessions.
//! - [`Invite`] / [`Revoke`] (Session): change a private room's members; a revoked member is
//!   kicked.
//! - [`SetPolicy`] (Directory, on reload): swap the policy; kick whom it no longer admits.
//! - [`TryStop`] (Directory): stop if still idle; replies whether it stopped.
//!
//! Sends [`Deliver`] to sessions and [`RoomIdle`] to the directory.

use actix::prelude::*;
use bytestring::ByteString;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

use crate::actors::cluster::{
    self, BusEvent, FromCluster, LocalPresence, Publish, RoomDown, RoomUp, WireMessage,
};
use crate::actors::db::{ChangeMember, LoadHistory, MemberChange, ReserveSeqs, StoreBatch};
use crate::actors::presence::{PresenceHandle, RoomEntered, RoomExited, WhoIsIn};
use crate::error::{Forbidden, RoomError, StoreError};
use crate::ids::{Seq, SessionId, UserId};
use crate::metrics::{Held, METRICS};
use crate::policy::Policies;
use crate::protocol::{
    format_time, username_key, Event, MessageView, RoomKind, Username, MAX_HISTORY_LIMIT,
};
use crate::store::models::{HistoryPage, Outcome, RoomOrigin, RoomRecord, RoomState, UserRecord};
use crate::store::NewPost;

pub mod policy;
pub mod seqs;
pub use policy::{RoomPolicy, SendRates};
use seqs::ReservedSeqs;

/// Most posts stored in one transaction.
const MAX_BATCH: usize = 256;

/// Why a session was removed from a room (the `reason` of its `kicked` event).
pub const KICK_REVOKED: &str = "revoked";
pub const KICK_UNLISTED: &str = "removed from whitelist";
pub const KICK_CLOSED: &str = "closed";
/// Most messages a `join` with `after` returns; older ones are paged with `history`.
pub const MAX_MISSED: usize = 1000;

/// What a room sends a session.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub enum Deliver {
    /// An event frame of `room` to write as is; the bytes are shared with every other recipient.
    Frame { room: Arc<str>, frame: ByteString },
    /// The `message` events of `room` that one delivery made ready (the messages of one
    /// commit, or of a gap filled from the store), in seq order: one mailbox message and one
    /// wake-up of the session for all of them. Shared with every other recipient.
    Messages {
        room: Arc<str>,
        frames: Arc<[(Seq, ByteString)]>,
    },
    /// The session fell too far behind in `room` and was removed from it.
    Evicted { room: String },
    /// The session's user is no longer admitted to `room`, and was removed from it.
    Kicked {
        room: Arc<str>,
        reason: &'static str,
    },
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
    pub members: Recipient<ChangeMember>,
    pub seqs: Recipient<ReserveSeqs>,
}

/// Server-wide room settings from config (a room's limits are its policy's).
#[derive(Debug, Clone)]
pub struct RoomSettings {
    pub idle_stop: Duration,
    /// How long a send waits for its commit before the sender hears `unavailable`.
    pub store_timeout: Duration,
    /// How long a session whose connection dropped stays joined.
    pub resume_grace: Duration,
    /// The most bytes of messages one `join {after}` reply carries (the newest that fit).
    pub max_missed_bytes: usize,
    /// The link to the other nodes, when this node is one of a cluster.
    pub cluster: Option<ClusterLink>,
}

/// A room's way to the other nodes of a cluster.
#[derive(Clone)]
pub struct ClusterLink(pub Addr<cluster::Cluster>);

impl std::fmt::Debug for ClusterLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterLink")
    }
}

/// In a cluster, how long a room waits for a missing seq to arrive from the node that
/// committed it before reading it from the store.
pub const CLUSTER_GAP_WAIT: Duration = Duration::from_millis(20);

/// Session → Room: join. With `after`, the reply also holds the messages with seq > after.
/// With `replaces`, the session takes the place of a detached one of the same user, silently.
#[derive(Clone, Message)]
#[rtype(result = "Result<Joined, RoomError>")]
pub struct Join {
    pub session: SessionId,
    pub user: UserRecord,
    pub deliver: Recipient<Deliver>,
    pub after: Option<Seq>,
    pub replaces: Option<SessionId>,
}

#[derive(Debug, Clone)]
pub struct Joined {
    pub name: String,
    pub kind: RoomKind,
    /// Every message up to this seq was delivered before the join took effect; every later one
    /// reaches the session as an event.
    pub last_seq: Seq,
    /// With `after`: the messages after it up to `last_seq`, ascending (the newest
    /// [`MAX_MISSED`] when there are more, with `truncated`).
    pub missed: Option<Vec<MessageView>>,
    pub truncated: bool,
}

/// Session → Room: leave now (also sent when a session closes cleanly).
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct Leave {
    pub session: SessionId,
}

/// Session → Room: the session's connection dropped; keep it joined for the resume grace.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct Detach {
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
    pub user: UserRecord,
    pub before: Option<Seq>,
    pub limit: Option<u32>,
}

/// Session → Room: `who`.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Vec<String>, RoomError>")]
pub struct Who {
    pub user: UserRecord,
}

/// Session → Room: `invite` (by the owner or an admin). Idempotent.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<(), RoomError>")]
pub struct Invite {
    pub by: UserRecord,
    pub user: Username,
}

/// Session → Room: `revoke` (by the owner or an admin): the user's sessions are kicked.
/// Idempotent.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<(), RoomError>")]
pub struct Revoke {
    pub by: UserRecord,
    pub user: Username,
}

/// Directory → Room, on a reload of the policy file: the room's policy under `policies`.
/// Replies the number of users kicked.
#[derive(Debug, Clone, Message)]
#[rtype(result = "usize")]
pub struct SetPolicy {
    pub policies: Arc<Policies>,
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

type AckSender = oneshot::Sender<Result<Ack, RoomError>>;

struct Pending {
    post: Post,
    reply: AckSender,
    queued_at: Instant,
    /// Whether the policy that admitted it stores messages: a reload does not change what
    /// happens to a post already accepted.
    persist: bool,
}

struct Member {
    user: UserRecord,
    deliver: Recipient<Deliver>,
    /// When the connection dropped; the member is kept until the resume grace has passed.
    detached_at: Option<Instant>,
}

/// A room passes on one `typing` event per user at most this often.
pub const TYPING_EVERY: Duration = Duration::from_secs(1);

pub struct Room {
    record: RoomRecord,
    name: Arc<str>,
    policy: RoomPolicy,
    settings: RoomSettings,
    /// Highest seq broadcast; every seq up to it has been delivered in order.
    delivered: Seq,
    /// Committed messages that wait for an earlier seq to be loaded (see `fill_gap`).
    out_of_order: BTreeMap<Seq, MessageView>,
    filling_gap: bool,
    /// A seq known to be stored (a retry's original) that must be delivered.
    gap_target: Option<Seq>,
    /// Posts queued behind the batch in flight; they go together in the next one.
    queue: VecDeque<Pending>,
    /// The replies of the batch in flight, taken by the timeout if the commit is slow.
    in_flight: Option<(u64, Vec<AckSender>)>,
    batches: u64,
    recent: VecDeque<MessageView>,
    sessions: HashMap<SessionId, Member>,
    sessions_per_user: HashMap<UserId, usize>,
    rates: SendRates,
    /// When each user's last `typing` event went out: at most one per [`TYPING_EVERY`].
    typing_sent: HashMap<UserId, Instant>,
    /// The seqs a room that does not store its messages hands out.
    seqs: ReservedSeqs,
    last_active: Instant,
    /// Who is joined on the other nodes of the cluster (empty on a single node).
    remote: cluster::view::Members,
    /// A gap fill is scheduled (in a cluster, a gap waits [`CLUSTER_GAP_WAIT`] first).
    gap_fill_scheduled: bool,
    store: StoreHandle,
    presence: PresenceHandle,
    directory: Option<Recipient<RoomIdle>>,
    _running: Held,
}

impl Room {
    pub fn new(
        state: RoomState,
        policy: RoomPolicy,
        settings: &RoomSettings,
        store: StoreHandle,
        presence: PresenceHandle,
        directory: Option<Recipient<RoomIdle>>,
    ) -> Room {
        let mut recent: VecDeque<MessageView> = state.recent.into();
        while recent.len() > policy.limits.history_limit {
            recent.pop_front();
        }
        // The ring buffer is only trusted when it ends at the room's last seq.
        if recent.back().map(|m| m.seq) != Some(state.record.last_seq) {
            recent.clear();
        }
        Room {
            delivered: state.record.last_seq,
            name: state.record.name.as_str().into(),
            record: state.record,
            policy,
            settings: settings.clone(),
            out_of_order: BTreeMap::new(),
            filling_gap: false,
            gap_target: None,
            queue: VecDeque::new(),
            in_flight: None,
            batches: 0,
            recent,
            sessions: HashMap::new(),
            sessions_per_user: HashMap::new(),
            rates: SendRates::default(),
            typing_sent: HashMap::new(),
            seqs: ReservedSeqs::default(),
            last_active: Instant::now(),
            remote: cluster::view::Members::new(),
            gap_fill_scheduled: false,
            store,
            presence,
            directory,
            _running: Held::new(&METRICS.rooms_active),
        }
    }

    /// Swaps in `policy` and kicks the users it no longer admits (from a closed room, all of
    /// them). Returns how many users were kicked.
    fn set_policy(&mut self, policy: RoomPolicy) -> usize {
        if policy.limits.persist && !self.policy.limits.persist {
            self.drop_reserved_seqs();
        }
        // What the room now is, for the next reload (a room the file took over and then
        // dropped is closed; a closed room keeps its last kind).
        self.record.kind = policy.kind;
        self.record.origin = policy.origin;
        self.record.closed = policy.closed;
        self.policy = policy;
        while self.recent.len() > self.policy.limits.history_limit {
            self.recent.pop_front();
        }
        let reason = if self.policy.closed {
            KICK_CLOSED
        } else {
            KICK_UNLISTED
        };
        let unwelcome: HashSet<UserId> = self
            .sessions
            .values()
            .filter(|m| !self.policy.admits(&m.user))
            .map(|m| m.user.id)
            .collect();
        unwelcome
            .iter()
            .for_each(|user| self.kick_user(*user, reason));
        unwelcome.len()
    }

    /// Removes every session of `user`, telling each why.
    fn kick_user(&mut self, user: UserId, reason: &'static str) {
        let sessions: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, m)| m.user.id == user)
            .map(|(id, _)| *id)
            .collect();
        METRICS.kicks.with_label_values(&[reason]).inc();
        for id in sessions {
            if let Some(member) = self.remove_session(id) {
                member.deliver.do_send(Deliver::Kicked {
                    room: self.name.clone(),
                    reason,
                });
            }
        }
    }

    fn is_idle(&self) -> bool {
        self.sessions.is_empty()
            && self.in_flight.is_none()
            && self.queue.is_empty()
            && !self.filling_gap
            && self.last_active.elapsed() >= self.settings.idle_stop
    }

    fn frame(&self, event: Event<'_>) -> ByteString {
        event.to_frame().into()
    }

    /// Sends an event that is not a `message` to every attached session except `except`.
    fn broadcast(&mut self, frame: &ByteString, except: Option<SessionId>) {
        let room = self.name.clone();
        self.send_to_members(except, || Deliver::Frame {
            room: room.clone(),
            frame: frame.clone(),
        });
    }

    /// Sends `message` events, in seq order, to every attached session.
    fn broadcast_messages(&mut self, frames: Vec<(Seq, ByteString)>) {
        if frames.is_empty() {
            return;
        }
        let count = frames.len() as u64;
        let frames: Arc<[(Seq, ByteString)]> = frames.into();
        let room = self.name.clone();
        let delivered = self.send_to_members(None, || Deliver::Messages {
            room: room.clone(),
            frames: frames.clone(),
        });
        METRICS.messages_delivered.inc_by(delivered * count);
    }

    /// Sends what `make` makes to every attached session except `except`, and returns to how
    /// many. A closed session is detached (it may come back within the grace); one whose
    /// queue is full is evicted.
    fn send_to_members(&mut self, except: Option<SessionId>, make: impl Fn() -> Deliver) -> u64 {
        let mut evicted = Vec::new();
        let mut delivered = 0;
        for (id, member) in self.sessions.iter_mut() {
            if Some(*id) == except || member.detached_at.is_some() {
                continue;
            }
            match member.deliver.try_send(make()) {
                Ok(()) => delivered += 1,
                Err(SendError::Closed(_)) => member.detached_at = Some(Instant::now()),
                Err(SendError::Full(_)) => evicted.push(*id),
            }
        }
        for id in evicted {
            if let Some(member) = self.sessions.get_mut(&id) {
                log::warn!(
                    "room {}: a session of {} fell behind and was cut off",
                    self.record.name,
                    member.user.username
                );
                member.detached_at = Some(Instant::now());
                member.deliver.do_send(Deliver::Evicted {
                    room: self.record.name.clone(),
                });
            }
        }
        delivered
    }

    fn add_session(&mut self, session: SessionId, user: UserRecord, deliver: Recipient<Deliver>) {
        let count = self.sessions_per_user.entry(user.id).or_default();
        *count += 1;
        if *count == 1 {
            self.presence.entered.do_send(RoomEntered {
                room: self.record.name.clone(),
                username: user.username.clone(),
            });
            self.tell_cluster_presence(&user, true);
            // A user already joined on another node was announced there.
            if !self.remote.contains_key(&user.id) {
                let frame = self.frame(Event::Joined {
                    room: &self.record.name,
                    user: &user.username,
                });
                self.broadcast(&frame, Some(session));
            }
        }
        self.sessions.insert(
            session,
            Member {
                user,
                deliver,
                detached_at: None,
            },
        );
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
            self.presence.exited.do_send(RoomExited {
                room: self.record.name.clone(),
                username: member.user.username.clone(),
            });
            self.tell_cluster_presence(&member.user, false);
            if !self.remote.contains_key(&user) {
                let frame = self.frame(Event::Left {
                    room: &self.record.name,
                    user: &member.user.username,
                });
                self.broadcast(&frame, None);
            }
        }
        Some(member)
    }

    fn tell_cluster_presence(&self, user: &UserRecord, present: bool) {
        if let Some(cluster) = &self.settings.cluster {
            cluster.0.do_send(LocalPresence {
                room: self.record.name.clone(),
                user: user.id,
                username: user.username.clone(),
                present,
            });
        }
    }

    fn publish(&self, event: BusEvent) {
        if let Some(cluster) = &self.settings.cluster {
            cluster.0.do_send(Publish(event));
        }
    }

    fn publish_message(&self, view: &MessageView, persist: bool) {
        if self.settings.cluster.is_some() {
            self.publish(BusEvent::Message {
                room: self.record.name.clone(),
                persist,
                message: WireMessage::of(view),
            });
        }
    }

    /// The other nodes' members are now `remote`: announce who came and went there, unless
    /// they are also joined here.
    fn remote_members(&mut self, remote: cluster::view::Members) {
        let old = std::mem::replace(&mut self.remote, remote);
        let mut frames = Vec::new();
        for (id, name) in &self.remote {
            if !old.contains_key(id) && !self.sessions_per_user.contains_key(id) {
                frames.push(self.frame(Event::Joined {
                    room: &self.record.name,
                    user: name,
                }));
            }
        }
        for (id, name) in &old {
            if !self.remote.contains_key(id) && !self.sessions_per_user.contains_key(id) {
                frames.push(self.frame(Event::Left {
                    room: &self.record.name,
                    user: name,
                }));
            }
        }
        for frame in frames {
            self.broadcast(&frame, None);
        }
    }

    /// Publications may have been lost: everything up to the store's newest seq is delivered.
    fn resync(&mut self, ctx: &mut Context<Self>) {
        if !self.policy.limits.persist {
            return;
        }
        let request = self.store.history.send(LoadHistory {
            room: self.record.clone(),
            before: None,
            limit: 1,
        });
        ctx.spawn(
            request
                .into_actor(self)
                .map(|result, room, ctx| match result {
                    Ok(Ok(page)) => {
                        if let Some(newest) = page.messages.last().map(|m| m.seq) {
                            if newest > room.delivered {
                                room.fill_gap_upto(newest, ctx);
                            }
                        }
                    }
                    _ => {
                        log::warn!(
                            "room {}: could not read its newest seq; retrying",
                            room.record.name
                        );
                        ctx.run_later(Duration::from_millis(500), |room, ctx| room.resync(ctx));
                    }
                }),
        );
    }

    /// Removes the sessions whose resume grace has passed. A session whose actor is gone
    /// without having said so counts as detached from now.
    fn expire_detached(&mut self) {
        for member in self.sessions.values_mut() {
            if member.detached_at.is_none() && !member.deliver.connected() {
                member.detached_at = Some(Instant::now());
            }
        }
        let grace = self.settings.resume_grace;
        let expired: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, m)| m.detached_at.is_some_and(|t| t.elapsed() >= grace))
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.remove_session(id);
        }
    }

    /// Takes a committed message. Messages are delivered strictly in seq order: when an earlier
    /// seq is missing (a commit whose reply was lost), it is loaded from the store first.
    fn committed(&mut self, view: MessageView, ctx: &mut Context<Self>) {
        self.take_committed(view);
        self.deliver_committed(ctx);
    }

    /// Takes a committed message to deliver at the next [`Room::deliver_committed`].
    fn take_committed(&mut self, view: MessageView) {
        if view.seq > self.delivered {
            self.out_of_order.insert(view.seq, view);
        }
    }

    /// Delivers the messages taken that are next in seq order, all in one delivery; a missing
    /// seq before the others is waited for or loaded.
    fn deliver_committed(&mut self, ctx: &mut Context<Self>) {
        self.deliver_in_order();
        if self.out_of_order.is_empty() {
            return;
        }
        if self.settings.cluster.is_none() {
            self.fill_gap(ctx);
        } else if !std::mem::replace(&mut self.gap_fill_scheduled, true) {
            // The missing seq was most likely committed on another node and its publication
            // is on its way: give it a moment before reading the store.
            ctx.run_later(CLUSTER_GAP_WAIT, |room, ctx| {
                room.gap_fill_scheduled = false;
                if !room.out_of_order.is_empty() {
                    room.fill_gap(ctx);
                }
            });
        }
    }

    fn deliver_in_order(&mut self) {
        let mut frames = Vec::new();
        while let Some(view) = self.out_of_order.remove(&self.delivered.next()) {
            self.delivered = view.seq;
            frames.push((view.seq, self.frame(Event::Message(&view))));
            self.recent.push_back(view);
            if self.recent.len() > self.policy.limits.history_limit {
                self.recent.pop_front();
            }
        }
        self.broadcast_messages(frames);
    }

    /// Loads from the store, oldest first, every message between the last delivered seq and
    /// the first out-of-order one (or `gap_target`), delivering as it goes. A seq the store does not
    /// have was never committed and is skipped; a failed load is retried.
    fn fill_gap(&mut self, ctx: &mut Context<Self>) {
        if self.filling_gap {
            return;
        }
        let first_out_of_order = self.out_of_order.keys().next().map(|s| s.0).unwrap_or(0);
        let target = self.gap_target.map(|s| s.0 + 1).unwrap_or(0);
        let end = first_out_of_order.max(target);
        let from = self.delivered.next();
        if end <= from.0 {
            self.gap_target = None;
            self.deliver_in_order();
            return;
        }
        self.filling_gap = true;
        let before = Seq(end.min(from.0 + MAX_MISSED as i64));
        let request = self.store.history.send(LoadHistory {
            room: self.record.clone(),
            before: Some(before),
            limit: usize::try_from(before.0 - from.0).unwrap_or(0),
        });
        ctx.spawn(request.into_actor(self).map(move |result, room, ctx| {
            room.filling_gap = false;
            let Ok(Ok(page)) = result else {
                log::warn!("room {}: could not load a gap; retrying", room.record.name);
                ctx.run_later(Duration::from_millis(200), |room, ctx| room.fill_gap(ctx));
                return;
            };
            let found_from = page.messages.iter().any(|m| m.seq == from);
            for view in page.messages {
                if view.seq > room.delivered {
                    room.out_of_order.insert(view.seq, view);
                }
            }
            if !found_from && room.delivered.next() == from {
                log::warn!(
                    "room {}: seq {from} is not in the store; skipping it",
                    room.record.name
                );
                room.delivered = from;
                room.recent.clear();
            }
            room.deliver_in_order();
            if room.gap_target.is_some_and(|t| t <= room.delivered) {
                room.gap_target = None;
            }
            if !room.out_of_order.is_empty() || room.gap_target.is_some() {
                room.fill_gap(ctx);
            } else {
                room.serve_queue(ctx);
            }
        }));
    }

    /// Sends the queued posts to be stored as one batch, unless a batch is being stored or
    /// seqs are being reserved (the batch's seqs must come after the reserved ones).
    fn store_queued(&mut self, ctx: &mut Context<Self>) {
        if self.in_flight.is_some() || self.seqs.is_reserving() {
            return;
        }
        let take = self
            .queue
            .iter()
            .take(MAX_BATCH)
            .take_while(|pending| pending.persist)
            .count();
        if take == 0 {
            return;
        }
        let (posts, replies): (Vec<Post>, Vec<AckSender>) = self
            .queue
            .drain(..take)
            .map(|pending| (pending.post, pending.reply))
            .unzip();
        self.batches += 1;
        let batch = self.batches;
        self.in_flight = Some((batch, replies));
        let request = self.store.store.send(StoreBatch {
            room: self.record.id,
            posts: posts
                .iter()
                .map(|post| NewPost {
                    sender: post.user.id,
                    body: post.body.clone(),
                    client_msg_id: post.client_msg_id.clone(),
                })
                .collect(),
        });
        // Cancelled when the batch completes: a context polls every timer it holds on each
        // wake-up, so finished batches must not leave theirs behind.
        let deadline = ctx.run_later(self.settings.store_timeout, move |room, _| {
            if room.in_flight.as_ref().is_some_and(|(id, _)| *id == batch) {
                if let Some((_, replies)) = room.in_flight.as_mut() {
                    fail_all(std::mem::take(replies), || RoomError::CommitTimeout);
                }
            }
        });
        ctx.spawn(request.into_actor(self).map(move |result, room, ctx| {
            ctx.cancel_future(deadline);
            let replies = room.in_flight.take().map(|(_, r)| r).unwrap_or_default();
            room.last_active = Instant::now();
            let outcome = match result {
                Ok(Ok(stored)) if stored.len() == posts.len() => Ok(stored),
                Ok(Ok(stored)) => Err(format!(
                    "store answered {} of {}",
                    stored.len(),
                    posts.len()
                )),
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match outcome {
                Ok(stored) => room.batch_committed(posts, stored, replies, ctx),
                Err(why) => {
                    log::warn!(
                        "room {}: storing {} message(s) failed: {why}",
                        room.record.name,
                        posts.len()
                    );
                    fail_all(replies, || {
                        RoomError::Store(StoreError::Unavailable(why.clone()))
                    });
                }
            }
            room.serve_queue(ctx);
        }));
    }

    fn batch_committed(
        &mut self,
        posts: Vec<Post>,
        outcomes: Vec<Outcome>,
        replies: Vec<AckSender>,
        ctx: &mut Context<Self>,
    ) {
        // `replies` is empty when the timeout already answered: the messages are delivered anyway.
        let mut replies = replies.into_iter();
        for (post, outcome) in posts.into_iter().zip(outcomes) {
            let stored = match outcome {
                Ok(stored) => stored,
                Err(_) => {
                    // This message alone could not be stored; the others of the batch were.
                    if let Some(reply) = replies.next() {
                        let _ = reply.send(Err(RoomError::Unstorable));
                    }
                    continue;
                }
            };
            let sent_at = format_time(stored.sent_at);
            if let Some(reply) = replies.next() {
                let _ = reply.send(Ok(Ack {
                    seq: stored.seq,
                    sent_at: sent_at.clone(),
                }));
            }
            if stored.duplicate {
                // A retry of a message whose first commit may not have been delivered yet.
                if stored.seq > self.delivered {
                    self.fill_gap_upto(stored.seq, ctx);
                }
                continue;
            }
            let view = MessageView {
                room: self.record.name.clone(),
                seq: stored.seq,
                from: post.user.username,
                body: Some(post.body.to_string()),
                sent_at,
                client_msg_id: post.client_msg_id,
                error: None,
            };
            self.publish_message(&view, true);
            self.take_committed(view);
        }
        self.deliver_committed(ctx);
    }

    /// Makes sure everything up to `seq` is delivered, loading it from the store.
    fn fill_gap_upto(&mut self, seq: Seq, ctx: &mut Context<Self>) {
        self.gap_target = Some(self.gap_target.map_or(seq, |t| t.max(seq)));
        self.fill_gap(ctx);
    }

    /// Fails queued posts that waited longer than the store timeout (they were never sent).
    fn expire_queued(&mut self) {
        let timeout = self.settings.store_timeout;
        while self
            .queue
            .front()
            .is_some_and(|p| p.queued_at.elapsed() >= timeout)
        {
            if let Some(pending) = self.queue.pop_front() {
                let _ = pending.reply.send(Err(RoomError::StoreBusy));
            }
        }
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
            unreadable: Vec::new(),
        })
    }
}

impl Room {
    /// Serves the queue in order: posts to store go as a batch; posts of a room that does not
    /// store its messages are handed out at once from reserved seqs, once nothing stored is
    /// still on its way (a batch in flight, a gap being filled).
    fn serve_queue(&mut self, ctx: &mut Context<Self>) {
        match self.queue.front().map(|p| p.persist) {
            Some(true) => self.store_queued(ctx),
            Some(false) if self.in_flight.is_none() && !self.filling_gap => {
                self.hand_out_queued(ctx)
            }
            _ => {}
        }
    }

    /// Each queued post not to be stored gets the next reserved seq and is delivered and acked
    /// now; a retry of a message still in the ring gets its original.
    fn hand_out_queued(&mut self, ctx: &mut Context<Self>) {
        while let Some(front) = self.queue.front().filter(|p| !p.persist) {
            if let Some(ack) = self.earlier_ack(&front.post) {
                if let Some(pending) = self.queue.pop_front() {
                    let _ = pending.reply.send(Ok(ack));
                }
                continue;
            }
            let Some(seq) = self.seqs.next_after(self.delivered) else {
                break;
            };
            let Some(pending) = self.queue.pop_front() else {
                break;
            };
            let sent_at = format_time(chrono::Utc::now());
            let view = MessageView {
                room: self.record.name.clone(),
                seq,
                from: pending.post.user.username.clone(),
                body: Some(pending.post.body.to_string()),
                sent_at: sent_at.clone(),
                client_msg_id: pending.post.client_msg_id.clone(),
                error: None,
            };
            // A block reserved before the last one was used up (by an earlier run of the room)
            // leaves seqs that are skipped, never reused.
            self.delivered = Seq(self.delivered.0.max(seq.0 - 1));
            self.publish_message(&view, false);
            self.committed(view, ctx);
            let _ = pending.reply.send(Ok(Ack { seq, sent_at }));
        }
        if !self.policy.limits.persist && self.seqs.wants_more() {
            self.reserve_seqs(ctx);
        }
        // Posts accepted to be stored (before a reload) may follow.
        if self.queue.front().is_some_and(|p| p.persist) {
            self.store_queued(ctx);
        }
    }

    /// The room stores its messages (again): the reserved seqs are dropped; the database's
    /// seqs continue after them, so delivery does too.
    fn drop_reserved_seqs(&mut self) {
        if let Some(last) = self.seqs.drop_all() {
            self.delivered = self.delivered.max(last);
        }
    }

    /// The ack of a message of the same sender and client_msg_id still in the ring.
    fn earlier_ack(&self, post: &Post) -> Option<Ack> {
        let key = post.client_msg_id.as_deref()?;
        self.recent
            .iter()
            .find(|m| m.from == post.user.username && m.client_msg_id.as_deref() == Some(key))
            .map(|m| Ack {
                seq: m.seq,
                sent_at: m.sent_at.clone(),
            })
    }

    /// Reserves the next block of seqs in the database (one request at a time; retried).
    fn reserve_seqs(&mut self, ctx: &mut Context<Self>) {
        self.seqs.reserving();
        let request = self.store.seqs.send(ReserveSeqs {
            room: self.record.id,
            count: seqs::BLOCK,
        });
        ctx.spawn(request.into_actor(self).map(|result, room, ctx| {
            match result {
                Ok(Ok(last)) => {
                    room.seqs.reserved(last);
                    if room.policy.limits.persist {
                        // A reload made the room store its messages meanwhile.
                        room.drop_reserved_seqs();
                    }
                    room.serve_queue(ctx);
                }
                failed => {
                    room.seqs.failed();
                    log::warn!(
                        "room {}: reserving seqs failed: {failed:?}",
                        room.record.name
                    );
                    ctx.run_later(Duration::from_millis(200), |room, ctx| {
                        room.serve_queue(ctx)
                    });
                }
            }
        }));
    }

    /// A history page of a room that does not store its messages: what the ring still holds.
    fn page_from_ring_only(&self, before: Option<Seq>, limit: usize) -> HistoryPage {
        let end = before.map_or(self.delivered, |b| Seq(b.0 - 1));
        let mut messages: Vec<MessageView> = self
            .recent
            .iter()
            .rev()
            .filter(|m| m.seq <= end)
            .take(limit)
            .cloned()
            .collect();
        messages.reverse();
        HistoryPage {
            messages,
            has_more: false,
            unreadable: Vec::new(),
        }
    }

    /// The messages after `after`, for a join: from the ring when it reaches back far enough
    /// (or the room keeps nothing else), else None (they are loaded from the store).
    fn missed_from_ring(&self, after: Seq, limit: usize) -> Option<(Vec<MessageView>, bool)> {
        let last = self.delivered;
        if let Some(page) = self.page_from_recent(Some(last.next()), limit) {
            return Some((page.messages, false));
        }
        if self.policy.limits.persist {
            return None;
        }
        // Only the ring holds messages: the newest `limit` of those after `after`.
        let newer: Vec<&MessageView> = self.recent.iter().filter(|m| m.seq > after).collect();
        let skip = newer.len().saturating_sub(limit);
        let reaches = self.recent.front().is_some_and(|m| m.seq.0 <= after.0 + 1);
        let messages = newer.into_iter().skip(skip).cloned().collect();
        Some((messages, skip > 0 || !reaches))
    }
}

/// The newest of `messages` (ascending) whose frames fit in `max_bytes` together (at least
/// the newest one), and whether older ones were left out.
fn newest_within(mut messages: Vec<MessageView>, max_bytes: usize) -> (Vec<MessageView>, bool) {
    let mut total = 0;
    let keep = messages
        .iter()
        .rev()
        .take_while(|m| {
            total += m.wire_len();
            total <= max_bytes
        })
        .count()
        .max(1)
        .min(messages.len());
    let cut = messages.len() - keep;
    messages.drain(..cut);
    (messages, cut > 0)
}

fn fail_all(replies: Vec<AckSender>, why: impl Fn() -> RoomError) {
    for reply in replies {
        let _ = reply.send(Err(why()));
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
        if let Some(cluster) = &self.settings.cluster {
            // No join is served before the room knows who is joined on the other nodes (a
            // user there is no new join here, and nobody is announced twice).
            let up = cluster.0.send(RoomUp {
                name: self.record.name.clone(),
                room: ctx.address().recipient(),
            });
            ctx.wait(up.into_actor(self).map(|members, room, _| {
                if let Ok(members) = members {
                    room.remote = members;
                }
            }));
            // A message committed on another node between this room's load and its
            // registration is in the store.
            self.resync(ctx);
        }
        let check =
            (self.settings.idle_stop / 4).clamp(Duration::from_millis(50), Duration::from_secs(15));
        ctx.run_interval(check, |room, _| {
            if room.is_idle() {
                if let Some(directory) = &room.directory {
                    directory.do_send(RoomIdle {
                        name: room.record.name.clone(),
                    });
                }
            }
        });
        let sweep = (self.settings.store_timeout.min(self.settings.resume_grace) / 4)
            .clamp(Duration::from_millis(20), Duration::from_secs(1));
        ctx.run_interval(sweep, |room, _| {
            room.expire_queued();
            room.expire_detached();
            room.rates
                .forget_full(room.policy.limits.rate.refill(), Instant::now());
        });
    }

    fn stopped(&mut self, ctx: &mut Context<Self>) {
        log::debug!("room {} stopped", self.record.name);
        if let Some(cluster) = &self.settings.cluster {
            cluster.0.do_send(RoomDown {
                name: self.record.name.clone(),
                room: ctx.address().recipient(),
            });
        }
    }
}

impl Handler<Join> for Room {
    type Result = ResponseActFuture<Self, Result<Joined, RoomError>>;

    fn handle(&mut self, msg: Join, _: &mut Context<Self>) -> Self::Result {
        if let Some(why) = self.policy.refuses(&msg.user) {
            return Box::pin(fut::ready(Err(RoomError::Forbidden(why))));
        }
        let new_user = !self.sessions_per_user.contains_key(&msg.user.id);
        if new_user && self.sessions_per_user.len() >= self.policy.limits.max_members {
            return Box::pin(fut::ready(Err(RoomError::Forbidden(Forbidden::Full))));
        }
        self.last_active = Instant::now();
        let replaced = msg.replaces.filter(|old| {
            self.sessions
                .get(old)
                .is_some_and(|m| m.user.id == msg.user.id)
        });
        if msg.replaces.is_some() && replaced.is_none() {
            // The session to take over has already left (its grace passed): nothing to restore.
            return Box::pin(fut::ready(Err(RoomError::Forbidden(
                Forbidden::SessionGone,
            ))));
        }
        let session = msg.session;
        match replaced {
            Some(old) => {
                self.sessions.remove(&old);
                self.sessions.insert(
                    msg.session,
                    Member {
                        user: msg.user,
                        deliver: msg.deliver,
                        detached_at: None,
                    },
                );
            }
            None if self.sessions.contains_key(&msg.session) => {}
            None => self.add_session(msg.session, msg.user, msg.deliver),
        }
        let last_seq = self.delivered;
        let mut joined = Joined {
            name: self.record.name.clone(),
            kind: self.policy.kind,
            last_seq,
            missed: None,
            truncated: false,
        };
        let Some(after) = msg.after else {
            return Box::pin(fut::ready(Ok(joined)));
        };
        let wanted = usize::try_from(last_seq.0 - after.0.min(last_seq.0)).unwrap_or(0);
        joined.truncated = wanted > MAX_MISSED;
        let limit = wanted.min(MAX_MISSED);
        if limit == 0 {
            joined.missed = Some(Vec::new());
            return Box::pin(fut::ready(Ok(joined)));
        }
        let max_bytes = self.settings.max_missed_bytes;
        if let Some((missed, older_gone)) = self.missed_from_ring(after, limit) {
            let (missed, cut) = newest_within(missed, max_bytes);
            joined.missed = Some(missed);
            joined.truncated |= older_gone || cut;
            return Box::pin(fut::ready(Ok(joined)));
        }
        let request = self.store.history.send(LoadHistory {
            room: self.record.clone(),
            before: Some(last_seq.next()),
            limit,
        });
        Box::pin(request.into_actor(self).map(move |result, room, _| {
            match result {
                Ok(Ok(page)) => {
                    let (missed, cut) = newest_within(page.messages, max_bytes);
                    joined.missed = Some(missed);
                    joined.truncated |= cut;
                    Ok(joined)
                }
                // The join fails as a whole: the session is not left half-joined.
                failed => {
                    room.remove_session(session);
                    Err(match failed {
                        Ok(Err(e)) => RoomError::Store(e),
                        _ => RoomError::Gone,
                    })
                }
            }
        }))
    }
}

impl Handler<Leave> for Room {
    type Result = ();

    fn handle(&mut self, msg: Leave, _: &mut Context<Self>) {
        self.remove_session(msg.session);
    }
}

impl Handler<Detach> for Room {
    type Result = ();

    fn handle(&mut self, msg: Detach, _: &mut Context<Self>) {
        if let Some(member) = self.sessions.get_mut(&msg.session) {
            member.detached_at.get_or_insert_with(Instant::now);
        }
    }
}

impl Handler<Post> for Room {
    type Result = ResponseFuture<Result<Ack, RoomError>>;

    fn handle(&mut self, post: Post, ctx: &mut Context<Self>) -> Self::Result {
        if let Err(e) = self.admit_post(&post) {
            return Box::pin(async move { Err(e) });
        }
        METRICS.messages_received.inc();
        let (reply, answer) = oneshot::channel();
        self.queue.push_back(Pending {
            post,
            reply,
            queued_at: Instant::now(),
            persist: self.policy.limits.persist,
        });
        self.serve_queue(ctx);
        Box::pin(async move { answer.await.unwrap_or(Err(RoomError::Gone)) })
    }
}

impl Room {
    /// Whether a post may go in: sent by a joined session, allowed to send here, within the
    /// room's body size and the sender's rate.
    fn admit_post(&mut self, post: &Post) -> Result<(), RoomError> {
        let joined = self
            .sessions
            .get(&post.session)
            .is_some_and(|m| m.user.id == post.user.id);
        if !joined {
            return Err(RoomError::Forbidden(Forbidden::NotJoined));
        }
        self.policy.may_send(&post.user)?;
        let max = self.policy.limits.max_body_bytes;
        if post.body.len() > max {
            return Err(RoomError::TooLarge { max });
        }
        if !self.rates.take(
            post.user.id,
            self.policy.limits.rate.refill(),
            Instant::now(),
        ) {
            return Err(RoomError::RateLimited);
        }
        Ok(())
    }
}

impl Handler<ReadHistory> for Room {
    type Result = ResponseFuture<Result<HistoryPage, RoomError>>;

    fn handle(&mut self, msg: ReadHistory, _: &mut Context<Self>) -> Self::Result {
        if !self.policy.may_read(&msg.user) {
            return Box::pin(async { Err(RoomError::Forbidden(Forbidden::NotMember)) });
        }
        let default_limit = self
            .policy
            .limits
            .history_limit
            .min(MAX_HISTORY_LIMIT as usize);
        let limit = msg.limit.map(|l| l as usize).unwrap_or(default_limit);
        if let Some(page) = self.page_from_recent(msg.before, limit) {
            return Box::pin(async { Ok(page) });
        }
        if !self.policy.limits.persist {
            let page = self.page_from_ring_only(msg.before, limit);
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
            request
                .await
                .map_err(|_| RoomError::Gone)?
                .map_err(RoomError::Store)
        })
    }
}

impl Handler<Who> for Room {
    type Result = ResponseFuture<Result<Vec<String>, RoomError>>;

    fn handle(&mut self, msg: Who, _: &mut Context<Self>) -> Self::Result {
        if let Some(why) = self.policy.refuses(&msg.user) {
            return Box::pin(async move { Err(RoomError::Forbidden(why)) });
        }
        let request = self.presence.who.send(WhoIsIn {
            room: self.record.name.clone(),
        });
        let remote: Vec<String> = self.remote.values().cloned().collect();
        Box::pin(async move {
            let mut users = request.await.map_err(|_| RoomError::Gone)?;
            if !remote.is_empty() {
                users.extend(remote);
                users.sort();
                users.dedup();
            }
            Ok(users)
        })
    }
}

impl Handler<Typing> for Room {
    type Result = Result<(), RoomError>;

    fn handle(&mut self, msg: Typing, _: &mut Context<Self>) -> Self::Result {
        let Some(member) = self.sessions.get(&msg.session) else {
            return Err(RoomError::Forbidden(Forbidden::NotJoined));
        };
        // Typing is a hint: more than one event per user per second only costs every member
        // a frame, so the rest are accepted and not passed on.
        let now = Instant::now();
        let user = member.user.id;
        if self
            .typing_sent
            .get(&user)
            .is_some_and(|at| now.saturating_duration_since(*at) < TYPING_EVERY)
        {
            return Ok(());
        }
        if self.typing_sent.len() >= self.sessions_per_user.len() + 64 {
            self.typing_sent
                .retain(|_, at| now.saturating_duration_since(*at) < TYPING_EVERY);
        }
        self.typing_sent.insert(user, now);
        let username = member.user.username.clone();
        let frame = self.frame(Event::Typing {
            room: &self.record.name,
            user: &username,
        });
        self.broadcast(&frame, Some(msg.session));
        self.publish(BusEvent::Typing {
            room: self.record.name.clone(),
            user: username,
        });
        Ok(())
    }
}

impl Handler<Invite> for Room {
    type Result = ResponseActFuture<Self, Result<(), RoomError>>;

    fn handle(&mut self, msg: Invite, _: &mut Context<Self>) -> Self::Result {
        if let Err(e) = self.policy.check_manager(&msg.by) {
            return Box::pin(fut::ready(Err(e)));
        }
        if self
            .policy
            .whitelist
            .contains(&username_key(msg.user.as_str()))
        {
            return Box::pin(fut::ready(Ok(())));
        }
        let cap = self
            .policy
            .limits
            .max_members
            .saturating_sub(self.policy.whitelist.len());
        let request = self.store.members.send(ChangeMember {
            room: self.record.id,
            user: msg.user,
            change: MemberChange::Add { cap },
        });
        Box::pin(request.into_actor(self).map(|result, room, _| {
            let user = result.map_err(|_| RoomError::Gone)??;
            room.policy.members.insert(user.id);
            room.publish(BusEvent::Member {
                room: room.record.name.clone(),
                user: user.id,
                added: true,
            });
            Ok(())
        }))
    }
}

impl Handler<Revoke> for Room {
    type Result = ResponseActFuture<Self, Result<(), RoomError>>;

    fn handle(&mut self, msg: Revoke, _: &mut Context<Self>) -> Self::Result {
        if let Err(e) = self.policy.check_manager(&msg.by) {
            return Box::pin(fut::ready(Err(e)));
        }
        if self
            .policy
            .whitelist
            .contains(&username_key(msg.user.as_str()))
        {
            return Box::pin(fut::ready(Err(RoomError::Forbidden(
                Forbidden::ListedInFile,
            ))));
        }
        let owner = self
            .policy
            .owner
            .as_deref()
            .is_some_and(|owner| owner.eq_ignore_ascii_case(msg.user.as_str()));
        if owner && self.policy.origin == RoomOrigin::User {
            return Box::pin(fut::ready(Err(RoomError::Forbidden(Forbidden::Owner))));
        }
        let request = self.store.members.send(ChangeMember {
            room: self.record.id,
            user: msg.user,
            change: MemberChange::Remove,
        });
        Box::pin(request.into_actor(self).map(|result, room, _| {
            let user = result.map_err(|_| RoomError::Gone)??;
            room.policy.members.remove(&user.id);
            if !room.policy.admits(&user) {
                room.kick_user(user.id, KICK_REVOKED);
            }
            room.publish(BusEvent::Member {
                room: room.record.name.clone(),
                user: user.id,
                added: false,
            });
            Ok(())
        }))
    }
}

impl Handler<SetPolicy> for Room {
    type Result = usize;

    fn handle(&mut self, msg: SetPolicy, ctx: &mut Context<Self>) -> usize {
        let policy = RoomPolicy::of(&self.record, self.policy.members.clone(), &msg.policies);
        if policy == self.policy {
            return 0;
        }
        let kicked = self.set_policy(policy);
        self.serve_queue(ctx);
        kicked
    }
}

impl Handler<FromCluster> for Room {
    type Result = ();

    fn handle(&mut self, msg: FromCluster, ctx: &mut Context<Self>) {
        match msg {
            FromCluster::Message { message, persist } => {
                let view = message.into_view(&self.record.name);
                // Not activity: a room without members here stops when idle, however busy
                // it is elsewhere.
                if persist && self.policy.limits.persist {
                    self.committed(view, ctx);
                } else {
                    // Seqs of a room that stores nothing are reserved per node in blocks:
                    // another node's messages are passed on as they come.
                    let frame = self.frame(Event::Message(&view));
                    self.broadcast_messages(vec![(view.seq, frame)]);
                }
            }
            FromCluster::Typing { user } => {
                let frame = self.frame(Event::Typing {
                    room: &self.record.name,
                    user: &user,
                });
                self.broadcast(&frame, None);
            }
            FromCluster::Members(remote) => self.remote_members(remote),
            FromCluster::Member { user, added } => {
                if added {
                    self.policy.members.insert(user);
                } else {
                    self.policy.members.remove(&user);
                    let refused = self
                        .sessions
                        .values()
                        .find(|m| m.user.id == user)
                        .is_some_and(|m| !self.policy.admits(&m.user));
                    if refused {
                        self.kick_user(user, KICK_REVOKED);
                    }
                }
            }
            FromCluster::Resync => self.resync(ctx),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn view(seq: i64, body: &str) -> MessageView {
        MessageView {
            room: "a".into(),
            seq: Seq(seq),
            from: "ann".into(),
            body: Some(body.into()),
            sent_at: "2026-01-01T00:00:00.000Z".into(),
            client_msg_id: None,
            error: None,
        }
    }

    #[test]
    fn a_join_reply_keeps_the_newest_messages_that_fit() {
        let messages: Vec<MessageView> = (1..=10).map(|seq| view(seq, &"x".repeat(100))).collect();
        let one = messages[0].wire_len();
        let seqs = |(kept, cut): (Vec<MessageView>, bool)| {
            (kept.iter().map(|m| m.seq.0).collect::<Vec<_>>(), cut)
        };
        assert_eq!(
            seqs(newest_within(messages.clone(), one * 3)),
            (vec![8, 9, 10], true)
        );
        assert_eq!(
            seqs(newest_within(messages.clone(), one * 10)),
            ((1..=10).collect(), false)
        );
        assert_eq!(
            seqs(newest_within(messages, 1)),
            (vec![10], true),
            "the newest, always"
        );
        assert_eq!(seqs(newest_within(Vec::new(), 1)), (vec![], false));
    }
}
