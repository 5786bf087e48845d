//! The Session actor: one per WebSocket connection. It turns each text frame into a typed
//! request, answers it with the same id, holds the user once authenticated and the rooms it
//! joined, keeps the heartbeat and closes connections that misbehave. Round trips to other
//! actors are spawned, never waited on, so the socket keeps flowing. Calls: the DB executor,
//! the directory, rooms and presence; writes frames only through [`crate::transport::ws`].
//!
//! Messages handled: [`Deliver`] (Room): write an event frame, or close 1013 when evicted.

use actix::prelude::*;
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::actors::db::{
    hash_token, CreateRoom, CreateUser, DbExecutor, FindLogin, IssueToken, ListRooms, ResumeToken,
    RevokeToken, TokenHash,
};
use crate::actors::directory::{Directory, OpenRoom, Park, Reclaim, Track, Untrack, Yield};
use crate::actors::gate::{Drain, Gate, LoginAllowed, LoginFinished, Register, Unregister};
use crate::actors::hasher::HasherHandle;
use crate::actors::presence::{PresenceHandle, SessionClosed, SessionOpened};
use crate::actors::room::{
    Deliver, Detach, Join, JoinedRoom, Leave, Post, ReadHistory, Room, Typing, Who,
};
use crate::error::StoreError;
use crate::error::{Error, RoomError};
use crate::protocol::{self, ErrorCode, Rejection, Request, Seq};
use crate::store::models::UserRecord;
use crate::transport::ws::OutboundMeter;
use crate::transport::ws::{self, Close, WsContext};
use std::net::IpAddr;

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// A room being joined: how many joins (a resume's restore, a `join`) are in flight, the
/// newest seq their replies covered, and the events held back until the last one is answered.
#[derive(Default)]
struct Joining {
    pending: usize,
    covered: Option<Seq>,
    held: Vec<(Option<Seq>, bytestring::ByteString)>,
}

/// Identifies one connection within this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId(pub u64);

/// The actors a session talks to.
#[derive(Clone)]
pub struct Services {
    pub db: Addr<DbExecutor>,
    pub directory: Addr<Directory>,
    pub presence: PresenceHandle,
    pub gate: Addr<Gate>,
    pub hasher: HasherHandle,
}

/// Per-connection limits from config.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    pub ping_interval: Duration,
    pub client_timeout: Duration,
    pub max_frame_bytes: usize,
    pub bad_frame_limit: usize,
    pub bad_frame_window: Duration,
    pub outbound_queue: usize,
    pub outbound_limit_bytes: usize,
    pub requests_per_second: u32,
    pub request_burst: u32,
}

struct AuthUser {
    record: UserRecord,
    token: Option<TokenHash>,
}

pub struct Session {
    id: SessionId,
    peer: String,
    ip: Option<IpAddr>,
    outbound: OutboundMeter,
    /// Request tokens left (a token bucket refilled at `requests_per_second`).
    tokens: f64,
    refilled_at: Instant,
    /// Set by a shutdown: no new requests; close with 1001 once the ones in flight are answered.
    draining: bool,
    services: Services,
    settings: Arc<SessionSettings>,
    user: Option<AuthUser>,
    rooms: HashMap<String, Addr<Room>>,
    last_heard: Instant,
    bad_frames: VecDeque<Instant>,
    fragments: Option<(bool, Vec<u8>)>,
    close_reason: Option<String>,
    /// Set when the connection ends by the client's close frame or logout; otherwise the
    /// session stays joined for the resume grace.
    closed_cleanly: bool,
    /// Set when a resume on another connection takes this session's place.
    yielding: bool,
    /// Rooms whose join reply has not been written yet, with the events that arrived for them
    /// meanwhile: they are written after the reply, so `missed` always comes before live events.
    joining: HashMap<String, Joining>,
    /// Requests answered asynchronously and not yet replied to.
    in_flight: usize,
    /// Whether one of them changes the session, so that later requests must wait.
    exclusive_in_flight: bool,
    waiting: VecDeque<(String, Request)>,
}

/// Requests a connection may have waiting behind a session-changing one.
const MAX_WAITING_REQUESTS: usize = 256;

impl Session {
    pub fn new(
        peer: String,
        ip: Option<IpAddr>,
        outbound: OutboundMeter,
        services: Services,
        settings: Arc<SessionSettings>,
    ) -> Self {
        Session {
            id: SessionId(NEXT_SESSION.fetch_add(1, Ordering::Relaxed)),
            peer,
            ip,
            outbound,
            tokens: f64::from(settings.request_burst),
            refilled_at: Instant::now(),
            draining: false,
            services,
            settings,
            user: None,
            rooms: HashMap::new(),
            last_heard: Instant::now(),
            bad_frames: VecDeque::new(),
            fragments: None,
            close_reason: None,
            closed_cleanly: false,
            yielding: false,
            joining: HashMap::new(),
            in_flight: 0,
            exclusive_in_flight: false,
            waiting: VecDeque::new(),
        }
    }

    /// Writes a frame, unless the client has stopped reading: a connection whose unread bytes
    /// pass the limit is cut off with 1013 (it stays joined for the grace, to resume).
    fn write(&mut self, ctx: &mut WsContext, frame: impl Into<bytestring::ByteString>) {
        if self.check_backlog(ctx) {
            ws::send_text(ctx, &self.outbound, frame);
        }
    }

    /// False (and the connection cut off with 1013) when the client has too much unread.
    pub fn check_backlog(&mut self, ctx: &mut WsContext) -> bool {
        if self.outbound.backlog() <= self.settings.outbound_limit_bytes {
            return true;
        }
        if self.close_reason.is_none() {
            log::warn!(
                "session {} from {}: too slow a reader, cut off",
                self.id.0,
                self.peer
            );
            self.on_close_reason("slow reader");
            ws::close(ctx, Close::TryAgainLater, "too slow; reconnect and resume");
        }
        false
    }

    /// Takes one request token; false when the connection is over its rate.
    fn take_token(&mut self) -> bool {
        let now = Instant::now();
        let rate = f64::from(self.settings.requests_per_second);
        let elapsed = now.duration_since(self.refilled_at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(f64::from(self.settings.request_burst));
        self.refilled_at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn logged_out(&mut self) {
        if let Some(user) = self.user.take() {
            self.services.presence.closed.do_send(SessionClosed {
                user: user.record.id,
            });
        }
        for (_, room) in self.rooms.drain() {
            room.do_send(Leave { session: self.id });
        }
        self.waiting.clear();
    }

    /// The client sent a close frame: leave rooms at once.
    pub fn on_client_close(&mut self) {
        self.closed_cleanly = true;
        self.on_close_reason("client closed");
    }

    fn start_joining(&mut self, room: &str) {
        self.joining.entry(room.to_string()).or_default().pending += 1;
    }

    fn join_is_waiting(&self, room: &str) -> bool {
        self.waiting
            .iter()
            .any(|(_, request)| matches!(request, Request::Join { room: r, .. } if r == room))
    }

    /// Ends one join of `room`. When none is left running or waiting its turn, writes the
    /// events held back meanwhile, except messages a join reply already covered (seq <=
    /// `covered`): each message reaches the client once, in order. A `join {after}` read right
    /// behind a `resume` thus holds the room's events until its own reply.
    fn finish_joining(&mut self, room: &str, covered: Option<Seq>, ctx: &mut WsContext) {
        let join_waiting = self.join_is_waiting(room);
        let Some(joining) = self.joining.get_mut(room) else {
            return;
        };
        joining.pending = joining.pending.saturating_sub(1);
        joining.covered = joining.covered.max(covered);
        if joining.pending > 0 || join_waiting {
            return;
        }
        let Some(joining) = self.joining.remove(room) else {
            return;
        };
        let joined = self.rooms.contains_key(room);
        for (seq, frame) in joining.held {
            let repeat =
                matches!((seq, joining.covered), (Some(seq), Some(covered)) if seq <= covered);
            if joined && !repeat {
                self.write(ctx, frame);
            }
        }
    }

    pub fn outbound(&self) -> &OutboundMeter {
        &self.outbound
    }

    pub fn on_activity(&mut self) {
        self.last_heard = Instant::now();
    }

    /// Remembers why the connection is closing, for the close log line (first reason wins).
    pub fn on_close_reason(&mut self, reason: &str) {
        if self.close_reason.is_none() {
            self.close_reason = Some(reason.to_string());
        }
    }

    pub fn on_text(&mut self, text: &str, ctx: &mut WsContext) {
        if self.fragments.is_some() {
            self.fragments = None;
            self.bad_frame(ctx, None, "a new message arrived inside a fragmented one");
            return;
        }
        match protocol::parse_request(text) {
            Ok((id, request)) => self.accept(id, request, ctx),
            Err(e) => self.bad_frame(ctx, e.id.as_deref(), &e.rejection.message),
        }
    }

    pub fn on_binary(&mut self, ctx: &mut WsContext) {
        self.bad_frame(
            ctx,
            None,
            "binary frames are not accepted; send JSON text frames",
        );
    }

    /// A piece of a fragmented message: `first_text` is Some on the first piece.
    pub fn on_fragment(
        &mut self,
        first_text: Option<bool>,
        data: &[u8],
        last: bool,
        ctx: &mut WsContext,
    ) {
        match (first_text, self.fragments.as_mut()) {
            (Some(is_text), None) => self.fragments = Some((is_text, data.to_vec())),
            (None, Some((_, buffer))) => buffer.extend_from_slice(data),
            _ => {
                self.fragments = None;
                return self.bad_frame(ctx, None, "unexpected continuation frame");
            }
        }
        if self
            .fragments
            .as_ref()
            .is_some_and(|(_, b)| b.len() > self.settings.max_frame_bytes)
        {
            self.on_close_reason("message over the size limit");
            return ws::close(ctx, Close::TooBig, "message too large");
        }
        if last {
            if let Some((is_text, buffer)) = self.fragments.take() {
                match (is_text, String::from_utf8(buffer)) {
                    (true, Ok(text)) => self.on_text(&text, ctx),
                    (true, Err(_)) => self.bad_frame(ctx, None, "text is not UTF-8"),
                    (false, _) => self.on_binary(ctx),
                }
            }
        }
    }

    /// Answers a frame that could not be used; closes with 1008 when they come too often.
    fn bad_frame(&mut self, ctx: &mut WsContext, id: Option<&str>, message: &str) {
        let now = Instant::now();
        while self
            .bad_frames
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.settings.bad_frame_window)
        {
            self.bad_frames.pop_front();
        }
        self.bad_frames.push_back(now);
        self.write(
            ctx,
            protocol::error_frame(id, ErrorCode::BadRequest, message),
        );
        if self.bad_frames.len() > self.settings.bad_frame_limit {
            log::warn!(
                "session {} from {}: too many bad frames",
                self.id.0,
                self.peer
            );
            self.on_close_reason("too many bad frames");
            ws::close(ctx, Close::Policy, "too many bad frames");
        }
    }

    fn reply(&mut self, ctx: &mut WsContext, id: &str, result: Result<Value, Error>) {
        let frame = match result {
            Ok(payload) => protocol::ok_frame(id, payload),
            Err(e) => {
                if e.is_server_fault() {
                    log::warn!("session {}: request failed: {e}", self.id.0);
                } else {
                    log::debug!("session {}: request refused: {e}", self.id.0);
                }
                let (code, message) = e.to_wire();
                protocol::error_frame(Some(id), code, &message)
            }
        };
        self.write(ctx, frame);
    }

    /// Runs `work`, then writes its reply; `work` may change the session in its `map`.
    fn respond<F>(&mut self, ctx: &mut WsContext, id: String, work: F)
    where
        F: ActorFuture<Session, Output = Result<Value, Error>> + 'static,
    {
        self.in_flight += 1;
        ctx.spawn(work.map(move |result, session, ctx| {
            session.reply(ctx, &id, result);
            session.in_flight -= 1;
            if session.in_flight == 0 {
                session.exclusive_in_flight = false;
            }
            session.run_waiting(ctx);
            session.close_if_drained(ctx);
        }));
    }

    /// Requests run in the order they arrive as far as they depend on each other: one that
    /// changes the session (login, join, ...) waits for everything before it, and everything
    /// after it waits for it. Sends, reads and pings pipeline freely in between.
    fn accept(&mut self, id: String, request: Request, ctx: &mut WsContext) {
        if self.draining {
            let rejection = Rejection::new(ErrorCode::Unavailable, "the server is shutting down");
            return self.reply(ctx, &id, Err(rejection.into()));
        }
        if !self.take_token() {
            let rejection = Rejection::new(ErrorCode::RateLimited, "too many requests; slow down");
            return self.reply(ctx, &id, Err(rejection.into()));
        }
        let must_wait = !self.waiting.is_empty()
            || self.exclusive_in_flight
            || (request.changes_session() && self.in_flight > 0);
        if !must_wait {
            return self.run(id, request, ctx);
        }
        if self.waiting.len() >= MAX_WAITING_REQUESTS {
            let rejection = Rejection::new(
                ErrorCode::RateLimited,
                "too many requests waiting; slow down",
            );
            return self.reply(ctx, &id, Err(rejection.into()));
        }
        self.waiting.push_back((id, request));
    }

    fn run(&mut self, id: String, request: Request, ctx: &mut WsContext) {
        let changes_session = request.changes_session();
        let before = self.in_flight;
        self.dispatch(id, request, ctx);
        // Answered later: what comes after waits for it.
        if changes_session && self.in_flight > before {
            self.exclusive_in_flight = true;
        }
    }

    fn close_if_drained(&mut self, ctx: &mut WsContext) {
        if self.draining && self.in_flight == 0 {
            self.waiting.clear();
            self.closed_cleanly = true;
            self.on_close_reason("server shutting down");
            ws::close(ctx, Close::Away, "server shutting down");
        }
    }

    fn run_waiting(&mut self, ctx: &mut WsContext) {
        while let Some((_, front)) = self.waiting.front() {
            if self.exclusive_in_flight || (front.changes_session() && self.in_flight > 0) {
                return;
            }
            if let Some((id, request)) = self.waiting.pop_front() {
                self.run(id, request, ctx);
            }
        }
    }

    fn user(&self) -> Result<&UserRecord, Error> {
        self.user
            .as_ref()
            .map(|u| &u.record)
            .ok_or(Error::Unauthenticated)
    }

    fn joined_room(&self, room: &str) -> Result<Addr<Room>, Error> {
        self.rooms
            .get(room)
            .cloned()
            .ok_or(Error::Room(RoomError::Forbidden("join the room first")))
    }

    fn dispatch(&mut self, id: String, request: Request, ctx: &mut WsContext) {
        if self.user.is_none() && !request.allowed_anonymous() {
            return self.reply(ctx, &id, Err(Error::Unauthenticated));
        }
        if let Err(rejection) = request.validate() {
            return self.reply(ctx, &id, Err(rejection.into()));
        }
        match request {
            Request::Ping {} => self.reply(ctx, &id, Ok(json!({}))),
            Request::Register { username, password } => {
                let hasher = self.services.hasher.clone();
                let db = self.services.db.clone();
                let work = async move {
                    let password_hash = hasher.hash(password).await?;
                    let user = db
                        .send(CreateUser {
                            username,
                            password_hash,
                        })
                        .await??;
                    Ok(json!({ "user": user_json(&user) }))
                };
                self.respond(ctx, id, work.into_actor(self));
            }
            Request::Login { username, password } => {
                if self.user.is_some() {
                    return self.reply(ctx, &id, Err(already_authenticated()));
                }
                let (gate, db, hasher, ip) = (
                    self.services.gate.clone(),
                    self.services.db.clone(),
                    self.services.hasher.clone(),
                    self.ip,
                );
                let work = async move {
                    let allowed = gate
                        .send(LoginAllowed {
                            username: username.clone(),
                            ip,
                        })
                        .await?;
                    if !allowed {
                        return Err(Rejection::new(
                            ErrorCode::RateLimited,
                            "too many failed logins; wait and retry",
                        )
                        .into());
                    }
                    let attempt = async {
                        let found = db
                            .send(FindLogin {
                                username: username.clone(),
                            })
                            .await??;
                        let (user, hash) = match found {
                            Some((user, hash)) => (Some(user), Some(hash)),
                            None => (None, None),
                        };
                        let verified = hasher.verify(password, hash).await?;
                        let user = user
                            .filter(|_| verified)
                            .ok_or(Error::Store(StoreError::InvalidCredentials))?;
                        let token = db.send(IssueToken { user: user.id }).await??;
                        Ok::<_, Error>((user, token))
                    }
                    .await;
                    let failed =
                        matches!(attempt, Err(Error::Store(StoreError::InvalidCredentials)));
                    gate.do_send(LoginFinished {
                        username,
                        ip,
                        failed,
                    });
                    attempt
                };
                let work = work
                    .into_actor(self)
                    .map(|result: Result<_, Error>, session, ctx| {
                        let (user, token) = result?;
                        let payload =
                            json!({ "user": user_json(&user), "token": token.token.expose() });
                        session.authenticated(user, token.hash, ctx.address().recipient())?;
                        Ok(payload)
                    });
                self.respond(ctx, id, work);
            }
            Request::Resume { token } => {
                if self.user.is_some() {
                    return self.reply(ctx, &id, Err(already_authenticated()));
                }
                let hash = hash_token(token.expose());
                let db = self.services.db.clone();
                let directory = self.services.directory.clone();
                let session = self.id;
                let deliver = ctx.address().recipient::<Deliver>();
                let token_hash = hash.clone();
                let lookup = async move {
                    let user = db
                        .send(ResumeToken {
                            hash: token_hash.clone(),
                        })
                        .await??;
                    let parked = directory.send(Reclaim { token: token_hash }).await?;
                    Ok::<_, Error>((user, parked))
                };
                let restore = lookup.into_actor(self).then(move |result, act, ctx| {
                    let yield_to = ctx.address().recipient();
                    let prepared = result.and_then(|(user, parked)| {
                        act.authenticated(user.clone(), hash, yield_to)?;
                        let rooms = parked.map(|p| (p.session, p.rooms));
                        if let Some((_, names)) = &rooms {
                            names.iter().for_each(|name| act.start_joining(name));
                        }
                        Ok((user, rooms))
                    });
                    let directory = act.services.directory.clone();
                    async move {
                        let (user, rooms) = prepared?;
                        let mut restored = Vec::new();
                        if let Some((old, names)) = rooms {
                            for name in names {
                                let join = Join {
                                    session,
                                    user: user.clone(),
                                    deliver: deliver.clone(),
                                    after: None,
                                    replaces: Some(old),
                                };
                                // A room that went away (or refuses now) is simply not restored.
                                restored.push((
                                    name.clone(),
                                    ask_room(&directory, &name, join).await.ok(),
                                ));
                            }
                        }
                        Ok::<_, Error>((user, restored))
                    }
                    .into_actor(act)
                });
                let work = restore.map(|result, session, ctx| {
                    let (user, restored) = result?;
                    let mut rooms = Vec::new();
                    let mut names = Vec::new();
                    for (name, outcome) in restored {
                        if let Some((addr, joined)) = outcome {
                            rooms.push(json!({"name": joined.name, "last_seq": joined.last_seq}));
                            session.rooms.insert(joined.name, addr);
                        }
                        names.push(name);
                    }
                    // Events held while restoring go out right after the reply.
                    ctx.run_later(Duration::ZERO, move |session, ctx| {
                        for name in names {
                            session.finish_joining(&name, None, ctx);
                        }
                    });
                    Ok(json!({ "user": user_json(&user), "rooms": rooms }))
                });
                self.respond(ctx, id, work);
            }
            Request::Logout {} => {
                let token = self.user.as_ref().and_then(|u| u.token.clone());
                let db = self.services.db.clone();
                let work = async move {
                    if let Some(hash) = token {
                        db.send(RevokeToken { hash }).await??;
                    }
                    Ok(json!({}))
                };
                let work =
                    work.into_actor(self)
                        .map(|result: Result<Value, Error>, session, ctx| {
                            if result.is_ok() {
                                // Leave at once, and let nothing queued after it run as this user.
                                session.closed_cleanly = true;
                                session.logged_out();
                                session.on_close_reason("logout");
                                ctx.run_later(Duration::ZERO, |_, ctx| {
                                    ws::close(ctx, Close::Normal, "logged out")
                                });
                            }
                            result
                        });
                self.respond(ctx, id, work);
            }
            Request::Rooms {} => {
                let user = self.user().map(|u| u.id);
                let request = user.map(|user| self.services.db.send(ListRooms { user }));
                let work = async move { Ok(request?.await??) };
                let work =
                    work.into_actor(self)
                        .map(|result: Result<Vec<_>, Error>, session, _| {
                            let rooms: Vec<Value> = result?
                                .into_iter()
                                .map(|r| {
                                    json!({
                                        "name": r.name,
                                        "kind": r.kind,
                                        "joined": session.rooms.contains_key(&r.name),
                                        "last_seq": r.last_seq,
                                    })
                                })
                                .collect();
                            Ok(json!({ "rooms": rooms }))
                        });
                self.respond(ctx, id, work);
            }
            Request::CreateRoom {
                room,
                kind,
                members,
            } => {
                let owner = match self.user() {
                    Ok(user) => user.clone(),
                    Err(e) => return self.reply(ctx, &id, Err(e)),
                };
                let request = self.services.db.send(CreateRoom {
                    name: room,
                    kind,
                    owner,
                    members,
                });
                let work = async move {
                    let room = request.await??;
                    Ok(
                        json!({ "room": { "name": room.name, "kind": room.kind, "owner": room.owner } }),
                    )
                };
                self.respond(ctx, id, work.into_actor(self));
            }
            Request::Join { room, after } => {
                let Ok(user) = self.user().cloned() else {
                    return self.reply(ctx, &id, Err(Error::Unauthenticated));
                };
                let join = Join {
                    session: self.id,
                    user,
                    deliver: ctx.address().recipient(),
                    after,
                    replaces: None,
                };
                self.start_joining(&room);
                let directory = self.services.directory.clone();
                let name = room.clone();
                let work = async move { ask_room(&directory, &room, join).await };
                let work = work.into_actor(self).map(move |result, session, ctx| {
                    let mut covered = None;
                    let reply = match result {
                        Ok((addr, joined)) => {
                            session.rooms.insert(joined.name.clone(), addr);
                            covered = joined.missed.is_some().then_some(joined.last_seq);
                            Ok(join_json(joined))
                        }
                        Err(e) => {
                            session.rooms.remove(&name);
                            Err(e)
                        }
                    };
                    ctx.run_later(Duration::ZERO, move |session, ctx| {
                        session.finish_joining(&name, covered, ctx)
                    });
                    reply
                });
                self.respond(ctx, id, work);
            }
            Request::Leave { room } => {
                if let Some(addr) = self.rooms.remove(&room) {
                    addr.do_send(Leave { session: self.id });
                }
                // Events held for an answered join are from before the leave: not for the
                // client any more, even if it joins again before they would have been written.
                if let Some(joining) = self.joining.get_mut(&room) {
                    joining.held.clear();
                    joining.covered = None;
                }
                self.reply(ctx, &id, Ok(json!({})));
            }
            Request::Post {
                room,
                body,
                client_msg_id,
            } => {
                let addr = match (self.joined_room(&room), self.user()) {
                    (Ok(addr), Ok(user)) => (addr, user.clone()),
                    (Err(e), _) | (_, Err(e)) => return self.reply(ctx, &id, Err(e)),
                };
                let (addr, user) = addr;
                let request = addr.send(Post {
                    session: self.id,
                    user,
                    body: body.into(),
                    client_msg_id,
                });
                let work = async move {
                    let ack = request.await??;
                    Ok(json!({ "seq": ack.seq, "sent_at": ack.sent_at }))
                };
                self.respond(ctx, id, work.into_actor(self));
            }
            Request::History {
                room,
                before,
                limit,
            } => {
                let Ok(user) = self.user().map(|u| u.id) else {
                    return self.reply(ctx, &id, Err(Error::Unauthenticated));
                };
                let directory = self.services.directory.clone();
                let work = async move {
                    let (_, page) = ask_room(
                        &directory,
                        &room,
                        ReadHistory {
                            user,
                            before,
                            limit,
                        },
                    )
                    .await?;
                    Ok(json!({ "messages": page.messages, "has_more": page.has_more }))
                };
                self.respond(ctx, id, work.into_actor(self));
            }
            Request::Who { room } => {
                let Ok(user) = self.user().map(|u| u.id) else {
                    return self.reply(ctx, &id, Err(Error::Unauthenticated));
                };
                let directory = self.services.directory.clone();
                let work = async move {
                    let (_, online) = ask_room(&directory, &room, Who { user }).await?;
                    Ok(json!({ "online": online }))
                };
                self.respond(ctx, id, work.into_actor(self));
            }
            Request::Typing { room } => {
                let addr = match self.joined_room(&room) {
                    Ok(addr) => addr,
                    Err(e) => return self.reply(ctx, &id, Err(e)),
                };
                let request = addr.send(Typing { session: self.id });
                let work = async move {
                    request.await??;
                    Ok(json!({}))
                };
                self.respond(ctx, id, work.into_actor(self));
            }
        }
    }

    fn authenticated(
        &mut self,
        user: UserRecord,
        token: TokenHash,
        yield_to: Recipient<Yield>,
    ) -> Result<(), Error> {
        if self.user.is_some() {
            return Err(already_authenticated());
        }
        log::info!(
            "session {} from {}: authenticated as {}",
            self.id.0,
            self.peer,
            user.username
        );
        self.services
            .presence
            .opened
            .do_send(SessionOpened { user: user.id });
        self.services.directory.do_send(Track {
            token: token.clone(),
            session: self.id,
            yield_to,
        });
        self.user = Some(AuthUser {
            record: user,
            token: Some(token),
        });
        Ok(())
    }
}

fn already_authenticated() -> Error {
    Rejection::bad("this connection is already authenticated").into()
}

fn join_json(joined: JoinedRoom) -> Value {
    let mut reply = json!({
        "room": { "name": joined.name, "kind": joined.kind, "last_seq": joined.last_seq }
    });
    if let Some(missed) = joined.missed {
        reply["missed"] = json!(missed);
        reply["truncated"] = json!(joined.truncated);
    }
    reply
}

fn user_json(user: &UserRecord) -> Value {
    json!({ "id": user.id, "username": user.username })
}

/// Sends `msg` to room `name`, looking it up through the directory. A room that stopped
/// between the lookup and the send is looked up once more.
async fn ask_room<M, R>(
    directory: &Addr<Directory>,
    name: &str,
    msg: M,
) -> Result<(Addr<Room>, R), Error>
where
    M: Message<Result = Result<R, RoomError>> + Clone + Send + 'static,
    R: Send + 'static,
    Room: Handler<M>,
{
    let mut retried = false;
    loop {
        let room = directory
            .send(OpenRoom {
                name: name.to_string(),
            })
            .await??;
        match room.send(msg.clone()).await {
            Ok(result) => return Ok((room, result?)),
            Err(MailboxError::Closed) if !retried => retried = true,
            Err(e) => return Err(e.into()),
        }
    }
}

impl Actor for Session {
    type Context = WsContext;

    fn started(&mut self, ctx: &mut WsContext) {
        log::info!("session {} from {}: connection open", self.id.0, self.peer);
        self.services.gate.do_send(Register {
            session: self.id,
            drain: ctx.address().recipient(),
        });
        ws::set_mailbox_capacity(ctx, self.settings.outbound_queue);
        ctx.run_interval(self.settings.ping_interval, |session, ctx| {
            if session.last_heard.elapsed() > session.settings.client_timeout {
                session.on_close_reason("heartbeat timeout");
                ws::close(ctx, Close::Normal, "heartbeat timeout");
            } else {
                ws::ping(ctx, &session.outbound);
            }
        });
    }

    fn stopping(&mut self, _: &mut WsContext) -> Running {
        self.services.gate.do_send(Unregister {
            session: self.id,
            ip: self.ip,
        });
        let token = self.user.as_ref().and_then(|u| u.token.clone());
        let park =
            (self.yielding || (!self.closed_cleanly && !self.rooms.is_empty())) && token.is_some();
        if let (false, Some(token)) = (park, token.clone()) {
            self.services.directory.do_send(Untrack {
                token,
                session: self.id,
            });
        }
        let mut names = Vec::new();
        for (name, room) in self.rooms.drain() {
            if park {
                room.do_send(Detach { session: self.id });
            } else {
                room.do_send(Leave { session: self.id });
            }
            names.push(name);
        }
        // Rooms whose join was still in flight: the room may have added this session already.
        // A room whose join was answered but whose held events were not written yet is joined,
        // and was detached or left above.
        for (name, _) in self.joining.drain() {
            if names.contains(&name) {
                continue;
            }
            let directory = self.services.directory.clone();
            let session = self.id;
            actix::spawn(async move {
                if let Ok(Ok(room)) = directory.send(OpenRoom { name }).await {
                    room.do_send(Leave { session });
                }
            });
        }
        if let (true, Some(token)) = (park, token) {
            self.services.directory.do_send(Park {
                token,
                session: self.id,
                rooms: names,
            });
        }
        let user = self
            .user
            .as_ref()
            .map(|u| u.record.username.as_str())
            .unwrap_or("-");
        log::info!(
            "session {} from {}: connection closed (user {user}): {}",
            self.id.0,
            self.peer,
            self.close_reason.as_deref().unwrap_or("server closed")
        );
        if let Some(user) = &self.user {
            self.services.presence.closed.do_send(SessionClosed {
                user: user.record.id,
            });
        }
        Running::Stop
    }
}

impl Handler<Deliver> for Session {
    type Result = ();

    fn handle(&mut self, msg: Deliver, ctx: &mut WsContext) {
        match msg {
            Deliver::Frame { room, seq, frame } => match self.joining.get_mut(&*room) {
                Some(joining) => joining.held.push((seq, frame)),
                // Frames still in flight after a `leave` are not for this client any more.
                None if self.rooms.contains_key(&*room) => self.write(ctx, frame),
                None => {}
            },
            Deliver::Evicted { .. } => {
                self.on_close_reason("outbound queue full");
                ws::close(ctx, Close::TryAgainLater, "too slow; reconnect and resume");
            }
        }
    }
}

impl Handler<Drain> for Session {
    type Result = ();

    fn handle(&mut self, _: Drain, ctx: &mut WsContext) {
        self.draining = true;
        self.close_if_drained(ctx);
    }
}

impl Handler<Yield> for Session {
    type Result = bool;

    fn handle(&mut self, _: Yield, ctx: &mut WsContext) -> bool {
        if self.rooms.is_empty() {
            return false;
        }
        self.yielding = true;
        self.closed_cleanly = false;
        self.on_close_reason("taken over by a resume on another connection");
        ws::close(ctx, Close::Normal, "resumed on another connection");
        true
    }
}
