//! The Directory: maps room names to running [`Room`] actors, starting a room on first use
//! (loading it through the DB executor) and stopping it when it reports idle. Concurrent
//! lookups of a room that is loading or stopping wait for that to finish, so there is never
//! more than one actor per room. A name found missing is remembered for a moment
//! ([`REMEMBER_MISSING`]), so that a flood of look-ups of rooms that do not exist costs no
//! database reads; creating a room (here, or its direct room through [`OpenDirectFor`]) or a
//! reload forgets it. Calls: the DB executor ([`LoadRoom`], [`ListRooms`], [`CreateRoom`],
//! [`OpenDirect`], [`PurgeExpired`], [`RevokedSince`]) and rooms ([`TryStop`]).
//!
//! It also keeps the sessions whose connection dropped, by token, so that a `resume` within the
//! grace can take their place in their rooms.
//!
//! It holds the room policies of the policy file, builds each room's policy from them when it
//! starts the room, and hands a reloaded file to the running rooms.
//!
//! Messages:
//! - [`OpenRoom`] (Session): the room's actor; `NotFound` when no such room exists.
//! - [`ListRoomsFor`] / [`CreateRoomFor`] (Session): `rooms` and `create_room`, with the
//!   policy's part (the file's rooms that list the user; the user's room limit).
//! - [`OpenDirectFor`] (Session): `dm`, the direct room of two users, created on first use.
//! - [`ApplyPolicies`] (server, on reload): the new policies, to every running room.
//! - [`RoomIdle`] (Room): ask it to stop, and forget it if it does.
//! - [`Park`] (Session, when its connection drops): remember its rooms for the grace.
//! - [`Reclaim`] (Session, `resume`): the parked session of a token and its rooms, once; a
//!   session still live with that token is asked to [`Yield`] first.
//! - [`Track`] / [`Untrack`] (Session): which live sessions hold which token.
//! - [`Revoked`] (Session, after `logout` revoked its token): every other session using the
//!   token is told [`TokenRevoked`] and closes; a parked one is forgotten. Tokens revoked
//!   elsewhere (an operator's `rookery user disable`, a logout on another node) are found by
//!   asking the database ([`RevokedSince`]) every `auth.revocation_check_ms`.

use actix::prelude::*;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

use crate::actors::db::{
    CreateRoom, ListRooms, LoadRoom, OpenDirect, PurgeExpired, RevokedSince, TokenHash,
};
use crate::actors::presence::PresenceHandle;
use crate::actors::room::{
    Room, RoomIdle, RoomPolicy, RoomSettings, SetPolicy, StoreHandle, TryStop,
};
use crate::error::{Forbidden, RoomError, StoreError};
use crate::ids::SessionId;
use crate::policy::Policies;
use crate::protocol::{username_key, RoomKind, RoomName, Username};
use crate::store::models::{RoomRecord, RoomState, RoomSummary, UserRecord};
use chrono::{DateTime, Utc};
use std::sync::Arc;

/// How far before the previous check a check for revoked tokens looks: longer than a
/// revoking transaction may take to commit after it read the clock.
const REVOCATION_LOOK_BACK: chrono::TimeDelta = chrono::TimeDelta::seconds(30);

/// How long a room name found missing answers without a database look-up.
pub const REMEMBER_MISSING: Duration = Duration::from_secs(2);

/// Most names remembered missing; beyond, the ones that are no longer fresh are forgotten.
const MAX_REMEMBERED_MISSING: usize = 10_000;

/// Session → Directory: find or start the actor of room `name`. A session about to join it
/// says how many rooms it has joined (`joined`), and is refused beyond `users.max_joined_rooms`.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Addr<Room>, RoomError>")]
pub struct OpenRoom {
    pub name: RoomName,
    pub joined: Option<usize>,
}

/// Session → Directory: `rooms`: the rooms `user` may see.
#[derive(Debug, Message)]
#[rtype(result = "Result<Vec<RoomSummary>, StoreError>")]
pub struct ListRoomsFor {
    pub user: UserRecord,
}

/// Session → Directory: `create_room`, within the user's room limit.
#[derive(Debug, Message)]
#[rtype(result = "Result<RoomRecord, StoreError>")]
pub struct CreateRoomFor {
    pub name: RoomName,
    pub kind: RoomKind,
    pub owner: UserRecord,
    pub members: Vec<Username>,
}

/// Session → Directory: `dm`: the direct room of `me` and `other`, created on first use.
#[derive(Debug, Message)]
#[rtype(result = "Result<RoomRecord, StoreError>")]
pub struct OpenDirectFor {
    pub me: UserRecord,
    pub other: Username,
}

/// Server → Directory: a reloaded policy file, already checked and synced to the database.
/// Replies how many users the running rooms kicked.
#[derive(Debug, Message)]
#[rtype(result = "usize")]
pub struct ApplyPolicies {
    pub policies: Arc<Policies>,
}

/// The DB executor's services the directory uses.
#[derive(Clone)]
pub struct DirectoryStore {
    pub load: Recipient<LoadRoom>,
    pub list: Recipient<ListRooms>,
    pub create: Recipient<CreateRoom>,
    pub direct: Recipient<OpenDirect>,
    pub purge: Recipient<PurgeExpired>,
    pub revoked: Recipient<RevokedSince>,
}

/// Session → Directory: a session of `token` lost its connection while joined to `rooms`.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Park {
    pub token: TokenHash,
    pub session: SessionId,
    pub rooms: Vec<RoomName>,
}

/// Session → Directory: `resume` with `token`. Replies the parked session it replaces, if any
/// is still within the grace.
#[derive(Debug, Message)]
#[rtype(result = "Option<Parked>")]
pub struct Reclaim {
    pub token: TokenHash,
}

#[derive(Debug, Clone)]
pub struct Parked {
    pub session: SessionId,
    pub rooms: Vec<RoomName>,
    at: Instant,
}

/// Session → Directory: this session now holds `token` (after login or resume).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Track {
    pub token: TokenHash,
    pub session: SessionId,
    pub yield_to: Recipient<Yield>,
    pub revoked: Recipient<TokenRevoked>,
}

/// Session → Directory: `token` was revoked by `by` (its `logout`).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Revoked {
    pub token: TokenHash,
    pub by: SessionId,
}

/// Directory → Session: the token this session uses was revoked on another connection.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct TokenRevoked;

/// A live session using a token.
struct Live {
    session: SessionId,
    yield_to: Recipient<Yield>,
    revoked: Recipient<TokenRevoked>,
}

/// Session → Directory: this session ended without parking (clean close, logout).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Untrack {
    pub token: TokenHash,
    pub session: SessionId,
}

/// Directory → Session: a `resume` with your token arrived on another connection. A session
/// joined to rooms closes without leaving them and parks, so that the resume takes its place,
/// and replies true; one without rooms has nothing to hand over, stays, and replies false.
#[derive(Debug, Message)]
#[rtype(result = "bool")]
pub struct Yield;

type Waiter = oneshot::Sender<Result<Addr<Room>, RoomError>>;

enum Entry {
    Loading(Vec<Waiter>),
    Ready(Addr<Room>),
    Stopping(Vec<Waiter>),
}

pub struct Directory {
    rooms: HashMap<String, Entry>,
    /// Names a look-up found missing, and when.
    missing: HashMap<String, Instant>,
    parked: HashMap<TokenHash, Parked>,
    /// The live session using each token, so that a `resume` can take its place even before
    /// the server has noticed that its connection is gone.
    live: HashMap<TokenHash, Vec<Live>>,
    /// Resumes waiting for a live session to yield and park.
    reclaiming: HashMap<TokenHash, oneshot::Sender<Option<Parked>>>,
    db: DirectoryStore,
    store: StoreHandle,
    presence: PresenceHandle,
    settings: RoomSettings,
    policies: Arc<Policies>,
    /// How long a resume waits for a live session to hand over.
    handover: Duration,
    /// How often messages past their room's retention are deleted.
    retention_sweep: Duration,
    /// How often the database is asked for tokens revoked elsewhere.
    revocation_check: Duration,
    /// The database's clock at the last answer to that question (None before the first).
    revocations_checked: Option<DateTime<Utc>>,
    checking_revocations: bool,
}

/// How the directory is set up.
pub struct DirectorySettings {
    pub rooms: RoomSettings,
    pub handover: Duration,
    pub retention_sweep: Duration,
    pub revocation_check: Duration,
}

impl Directory {
    pub fn new(
        db: DirectoryStore,
        store: StoreHandle,
        presence: PresenceHandle,
        settings: DirectorySettings,
        policies: Arc<Policies>,
    ) -> Self {
        Directory {
            rooms: HashMap::new(),
            missing: HashMap::new(),
            parked: HashMap::new(),
            live: HashMap::new(),
            reclaiming: HashMap::new(),
            db,
            store,
            presence,
            settings: settings.rooms,
            policies,
            handover: settings.handover,
            retention_sweep: settings.retention_sweep,
            revocation_check: settings.revocation_check,
            revocations_checked: None,
            checking_revocations: false,
        }
    }

    /// The file's private rooms whose whitelist lists `username`.
    fn whitelisted(&self, username: &str) -> Vec<String> {
        let username = username_key(username);
        self.policies
            .rooms
            .iter()
            .filter(|(_, r)| r.kind == RoomKind::Private && r.whitelist.contains(&username))
            .map(|(name, _)| name.to_string())
            .collect()
    }

    fn purge_expired(&self) {
        let rules = self
            .policies
            .rooms
            .iter()
            .map(|(name, r)| (name.to_string(), r.limits.retention_days))
            .collect();
        let request = self.db.purge.send(PurgeExpired {
            rules,
            default_days: self.policies.defaults.retention_days,
        });
        actix::spawn(async move {
            match request.await {
                Ok(Ok(0)) => {}
                Ok(Ok(n)) => {
                    log::info!("retention: deleted {n} message(s) past their room's retention")
                }
                Ok(Err(e)) => log::warn!("retention: deleting old messages failed: {e}"),
                Err(e) => log::warn!("retention: {e}"),
            }
        });
    }

    /// Closes the sessions of tokens revoked since the last check. Each check looks back a
    /// while before it, so that a revocation committed late is not missed; closing twice is
    /// harmless.
    fn check_revocations(&mut self, ctx: &mut Context<Self>) {
        if self.checking_revocations {
            return;
        }
        self.checking_revocations = true;
        let since = self.revocations_checked.map(|at| at - REVOCATION_LOOK_BACK);
        let request = self.db.revoked.send(RevokedSince { since });
        ctx.spawn(request.into_actor(self).map(|answer, dir, _| {
            dir.checking_revocations = false;
            match answer {
                Ok(Ok((hashes, clock))) => {
                    dir.revocations_checked = Some(clock);
                    for token in hashes {
                        dir.revoked(&token, None);
                    }
                }
                Ok(Err(e)) => log::warn!("checking for revoked tokens failed: {e}"),
                Err(e) => log::warn!("checking for revoked tokens: {e}"),
            }
        }));
    }

    /// `token` no longer authenticates: forget its parked session and close the live ones
    /// (but `by`, the session whose logout revoked it).
    fn revoked(&mut self, token: &TokenHash, by: Option<SessionId>) {
        self.parked.remove(token);
        for live in self.live.remove(token).unwrap_or_default() {
            if Some(live.session) != by {
                live.revoked.do_send(TokenRevoked);
            }
        }
    }

    fn untrack(&mut self, token: &TokenHash, session: SessionId) {
        if let Some(sessions) = self.live.get_mut(token) {
            sessions.retain(|live| live.session != session);
            if sessions.is_empty() {
                self.live.remove(token);
            }
        }
    }

    fn remember_missing(&mut self, name: String) {
        if self.missing.len() >= MAX_REMEMBERED_MISSING {
            self.missing.retain(|_, at| at.elapsed() < REMEMBER_MISSING);
        }
        if self.missing.len() < MAX_REMEMBERED_MISSING {
            self.missing.insert(name, Instant::now());
        }
    }

    fn known_missing(&self, name: &str) -> bool {
        self.missing
            .get(name)
            .is_some_and(|at| at.elapsed() < REMEMBER_MISSING)
    }

    fn start_loading(&mut self, name: String, waiters: Vec<Waiter>, ctx: &mut Context<Self>) {
        self.rooms.insert(name.clone(), Entry::Loading(waiters));
        let request = self.db.load.send(LoadRoom {
            name: name.clone(),
            recent: self.policies.limits_of(&name).history_limit,
        });
        ctx.spawn(request.into_actor(self).map(move |result, dir, ctx| {
            let result = match result {
                Ok(result) => result,
                Err(e) => Err(StoreError::Unavailable(e.to_string())),
            };
            dir.loaded(name, result, ctx);
        }));
    }

    fn loaded(
        &mut self,
        name: String,
        result: Result<RoomState, StoreError>,
        ctx: &mut Context<Self>,
    ) {
        let Some(Entry::Loading(waiters)) = self.rooms.remove(&name) else {
            return;
        };
        match result {
            Ok(state) => {
                let members = state.members.iter().copied().collect();
                let policy = RoomPolicy::of(&state.record, members, &self.policies);
                let room = Room::new(
                    state,
                    policy,
                    &self.settings,
                    self.store.clone(),
                    self.presence.clone(),
                    Some(ctx.address().recipient()),
                )
                .start();
                for waiter in waiters {
                    let _ = waiter.send(Ok(room.clone()));
                }
                self.rooms.insert(name, Entry::Ready(room));
            }
            Err(StoreError::NotFound) => {
                for waiter in waiters {
                    let _ = waiter.send(Err(missing_room(&name)));
                }
                self.remember_missing(name);
            }
            Err(e) => {
                log::warn!("room {name} could not be loaded: {e}");
                for waiter in waiters {
                    let _ = waiter.send(Err(RoomError::Store(StoreError::Unavailable(
                        e.to_string(),
                    ))));
                }
            }
        }
    }
}

/// The answer for a room that does not exist. Whether two users have a direct room is nobody
/// else's business: one that does not exist answers as one the asker is not a member of.
fn missing_room(name: &str) -> RoomError {
    if name.starts_with(crate::protocol::DM_PREFIX) {
        RoomError::Forbidden(Forbidden::NotMember)
    } else {
        RoomError::NotFound
    }
}

impl Actor for Directory {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let grace = self.settings.resume_grace;
        ctx.run_interval(
            grace.clamp(Duration::from_millis(50), Duration::from_secs(10)),
            move |dir, _| {
                dir.parked.retain(|_, p| p.at.elapsed() < grace);
            },
        );
        ctx.run_interval(self.retention_sweep, |dir, _| dir.purge_expired());
        self.check_revocations(ctx);
        ctx.run_interval(self.revocation_check, |dir, ctx| dir.check_revocations(ctx));
    }
}

impl Handler<Park> for Directory {
    type Result = ();

    fn handle(&mut self, msg: Park, _: &mut Context<Self>) {
        self.untrack(&msg.token, msg.session);
        let parked = Parked {
            session: msg.session,
            rooms: msg.rooms,
            at: Instant::now(),
        };
        match self.reclaiming.remove(&msg.token) {
            Some(waiting) => {
                if let Err(Some(parked)) = waiting.send(Some(parked)) {
                    // The resume gave up meanwhile: keep it for a later one.
                    self.parked.insert(msg.token, parked);
                }
            }
            None => {
                self.parked.insert(msg.token, parked);
            }
        }
    }
}

impl Handler<Track> for Directory {
    type Result = ();

    fn handle(&mut self, msg: Track, _: &mut Context<Self>) {
        self.live.entry(msg.token).or_default().push(Live {
            session: msg.session,
            yield_to: msg.yield_to,
            revoked: msg.revoked,
        });
    }
}

impl Handler<Revoked> for Directory {
    type Result = ();

    fn handle(&mut self, msg: Revoked, _: &mut Context<Self>) {
        self.revoked(&msg.token, Some(msg.by));
    }
}

impl Handler<Untrack> for Directory {
    type Result = ();

    fn handle(&mut self, msg: Untrack, _: &mut Context<Self>) {
        self.untrack(&msg.token, msg.session);
    }
}

impl Handler<Reclaim> for Directory {
    type Result = ResponseFuture<Option<Parked>>;

    fn handle(&mut self, msg: Reclaim, _: &mut Context<Self>) -> Self::Result {
        let grace = self.settings.resume_grace;
        if let Some(parked) = self
            .parked
            .remove(&msg.token)
            .filter(|p| p.at.elapsed() < grace)
        {
            return Box::pin(async move { Some(parked) });
        }
        // A session with this token may still be live (its connection lost but not noticed
        // yet): ask it to hand over, and wait for it to park.
        // The newest session of the token: the one a lost connection would have left behind.
        let Some(live) = self
            .live
            .get(&msg.token)
            .and_then(|sessions| sessions.last())
            .map(|live| live.yield_to.clone())
        else {
            return Box::pin(async { None });
        };
        let (tx, rx) = oneshot::channel();
        self.reclaiming.insert(msg.token.clone(), tx);
        let asked = live.send(Yield);
        let handover = self.handover;
        Box::pin(async move {
            if !matches!(asked.await, Ok(true)) {
                return None;
            }
            tokio::time::timeout(handover, rx)
                .await
                .ok()
                .and_then(Result::ok)
                .flatten()
        })
    }
}

impl Handler<OpenRoom> for Directory {
    type Result = ResponseFuture<Result<Addr<Room>, RoomError>>;

    fn handle(&mut self, msg: OpenRoom, ctx: &mut Context<Self>) -> Self::Result {
        if msg
            .joined
            .is_some_and(|n| n >= self.policies.users.max_joined_rooms)
        {
            return Box::pin(async { Err(RoomError::Forbidden(Forbidden::TooManyJoined)) });
        }
        let (tx, rx) = oneshot::channel();
        match self.rooms.get_mut(msg.name.as_str()) {
            Some(Entry::Ready(room)) => {
                let room = room.clone();
                return Box::pin(async move { Ok(room) });
            }
            Some(Entry::Loading(waiters) | Entry::Stopping(waiters)) => waiters.push(tx),
            None => {
                if self.known_missing(msg.name.as_str()) {
                    let error = missing_room(msg.name.as_str());
                    return Box::pin(async move { Err(error) });
                }
                self.start_loading(msg.name.into_string(), vec![tx], ctx)
            }
        }
        Box::pin(async move { rx.await.unwrap_or(Err(RoomError::Gone)) })
    }
}

impl Handler<RoomIdle> for Directory {
    type Result = ();

    fn handle(&mut self, msg: RoomIdle, ctx: &mut Context<Self>) {
        let Some(Entry::Ready(room)) = self.rooms.remove(&msg.name) else {
            return;
        };
        self.rooms
            .insert(msg.name.clone(), Entry::Stopping(Vec::new()));
        let request = room.send(TryStop);
        ctx.spawn(request.into_actor(self).map(move |stopped, dir, ctx| {
            let waiters = match dir.rooms.remove(&msg.name) {
                Some(Entry::Stopping(waiters)) => waiters,
                _ => Vec::new(),
            };
            // A mailbox error means the room is already gone: treat it as stopped.
            if stopped.unwrap_or(true) {
                if !waiters.is_empty() {
                    dir.start_loading(msg.name, waiters, ctx);
                }
            } else {
                for waiter in waiters {
                    let _ = waiter.send(Ok(room.clone()));
                }
                dir.rooms.insert(msg.name, Entry::Ready(room));
            }
        }));
    }
}

impl Handler<ListRoomsFor> for Directory {
    type Result = ResponseFuture<Result<Vec<RoomSummary>, StoreError>>;

    fn handle(&mut self, msg: ListRoomsFor, _: &mut Context<Self>) -> Self::Result {
        let request = self.db.list.send(ListRooms {
            user: msg.user.id,
            whitelisted: self.whitelisted(&msg.user.username),
        });
        Box::pin(async move {
            request
                .await
                .map_err(|e| StoreError::Unavailable(e.to_string()))?
        })
    }
}

impl Handler<CreateRoomFor> for Directory {
    type Result = ResponseActFuture<Self, Result<RoomRecord, StoreError>>;

    fn handle(&mut self, msg: CreateRoomFor, _: &mut Context<Self>) -> Self::Result {
        if self.policies.rooms.contains_key(msg.name.as_str()) {
            return Box::pin(fut::ready(Err(StoreError::Conflict("room"))));
        }
        let request = self.db.create.send(CreateRoom {
            name: msg.name,
            kind: msg.kind,
            owner: msg.owner,
            members: msg.members,
            max_owned: self.policies.users.max_created_rooms,
        });
        Box::pin(request.into_actor(self).map(Directory::created))
    }
}

impl Handler<OpenDirectFor> for Directory {
    type Result = ResponseActFuture<Self, Result<RoomRecord, StoreError>>;

    fn handle(&mut self, msg: OpenDirectFor, _: &mut Context<Self>) -> Self::Result {
        let request = self.db.direct.send(OpenDirect {
            me: msg.me,
            other: msg.other,
        });
        Box::pin(request.into_actor(self).map(Directory::created))
    }
}

impl Directory {
    /// A room now exists: a look-up of its name must not answer from [`Self::missing`].
    fn created(
        sent: Result<Result<RoomRecord, StoreError>, MailboxError>,
        dir: &mut Directory,
        _: &mut Context<Directory>,
    ) -> Result<RoomRecord, StoreError> {
        let record = sent.map_err(|e| StoreError::Unavailable(e.to_string()))??;
        dir.missing.remove(record.name.as_str());
        Ok(record)
    }
}

impl Handler<ApplyPolicies> for Directory {
    type Result = ResponseFuture<usize>;

    fn handle(&mut self, msg: ApplyPolicies, _: &mut Context<Self>) -> Self::Result {
        self.policies = msg.policies.clone();
        self.missing.clear();
        let requests: Vec<_> = self
            .rooms
            .values()
            .filter_map(|entry| match entry {
                Entry::Ready(room) => Some(room.send(SetPolicy {
                    policies: msg.policies.clone(),
                })),
                _ => None,
            })
            .collect();
        Box::pin(async move {
            let mut kicked = 0;
            for request in requests {
                // A room that stopped meanwhile starts again under the new policies.
                kicked += request.await.unwrap_or(0);
            }
            kicked
        })
    }
}
