//! The Directory: maps room names to running [`Room`] actors, starting a room on first use
//! (loading it through the DB executor) and stopping it when it reports idle. Concurrent
//! lookups of a room that is loading or stopping wait for that to finish, so there is never
//! more than one actor per room. Calls: the DB executor ([`LoadRoom`]) and rooms ([`TryStop`]).
//!
//! It also keeps the sessions whose connection dropped, by token, so that a `resume` within the
//! grace can take their place in their rooms.
//!
//! Messages:
//! - [`OpenRoom`] (Session): the room's actor; `NotFound` when no such room exists.
//! - [`RoomIdle`] (Room): ask it to stop, and forget it if it does.
//! - [`Park`] (Session, when its connection drops): remember its rooms for the grace.
//! - [`Reclaim`] (Session, `resume`): the parked session of a token and its rooms, once; a
//!   session still live with that token is asked to [`Yield`] first.
//! - [`Track`] / [`Untrack`] (Session): which live session holds which token.

use actix::prelude::*;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

use crate::actors::db::LoadRoom;
use crate::actors::db::TokenHash;
use crate::actors::presence::PresenceHandle;
use crate::actors::room::{Room, RoomIdle, RoomSettings, StoreHandle, TryStop};
use crate::error::{RoomError, StoreError};
use crate::ids::SessionId;
use crate::protocol::RoomName;
use crate::store::models::RoomState;

/// Session → Directory: find or start the actor of room `name`.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Addr<Room>, RoomError>")]
pub struct OpenRoom {
    pub name: RoomName,
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
    parked: HashMap<TokenHash, Parked>,
    /// The live session using each token, so that a `resume` can take its place even before
    /// the server has noticed that its connection is gone.
    live: HashMap<TokenHash, (SessionId, Recipient<Yield>)>,
    /// Resumes waiting for a live session to yield and park.
    reclaiming: HashMap<TokenHash, oneshot::Sender<Option<Parked>>>,
    load: Recipient<LoadRoom>,
    store: StoreHandle,
    presence: PresenceHandle,
    settings: RoomSettings,
    /// How long a resume waits for a live session to hand over.
    handover: Duration,
}

impl Directory {
    pub fn new(
        load: Recipient<LoadRoom>,
        store: StoreHandle,
        presence: PresenceHandle,
        settings: RoomSettings,
        handover: Duration,
    ) -> Self {
        Directory {
            rooms: HashMap::new(),
            parked: HashMap::new(),
            live: HashMap::new(),
            reclaiming: HashMap::new(),
            load,
            store,
            presence,
            settings,
            handover,
        }
    }

    fn start_loading(&mut self, name: String, waiters: Vec<Waiter>, ctx: &mut Context<Self>) {
        self.rooms.insert(name.clone(), Entry::Loading(waiters));
        let request = self.load.send(LoadRoom {
            name: name.clone(),
            recent: self.settings.history_limit,
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
                let room = Room::new(
                    state,
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
            Err(e) => {
                let not_found = matches!(e, StoreError::NotFound);
                if !not_found {
                    log::warn!("room {name} could not be loaded: {e}");
                }
                for waiter in waiters {
                    let error = if not_found {
                        RoomError::NotFound
                    } else {
                        RoomError::Store(StoreError::Unavailable(e.to_string()))
                    };
                    let _ = waiter.send(Err(error));
                }
            }
        }
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
    }
}

impl Handler<Park> for Directory {
    type Result = ();

    fn handle(&mut self, msg: Park, _: &mut Context<Self>) {
        if self
            .live
            .get(&msg.token)
            .is_some_and(|(s, _)| *s == msg.session)
        {
            self.live.remove(&msg.token);
        }
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
        self.live.insert(msg.token, (msg.session, msg.yield_to));
    }
}

impl Handler<Untrack> for Directory {
    type Result = ();

    fn handle(&mut self, msg: Untrack, _: &mut Context<Self>) {
        if self
            .live
            .get(&msg.token)
            .is_some_and(|(s, _)| *s == msg.session)
        {
            self.live.remove(&msg.token);
        }
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
        let Some((_, live)) = self.live.get(&msg.token).cloned() else {
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
        let (tx, rx) = oneshot::channel();
        match self.rooms.get_mut(msg.name.as_str()) {
            Some(Entry::Ready(room)) => {
                let room = room.clone();
                return Box::pin(async move { Ok(room) });
            }
            Some(Entry::Loading(waiters) | Entry::Stopping(waiters)) => waiters.push(tx),
            None => self.start_loading(msg.name.into_string(), vec![tx], ctx),
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
