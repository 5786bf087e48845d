//! The Directory: maps room names to running [`Room`] actors, starting a room on first use
//! (loading it through the DB executor) and stopping it when it reports idle. Concurrent
//! lookups of a room that is loading or stopping wait for that to finish, so there is never
//! more than one actor per room. Calls: the DB executor ([`LoadRoom`]) and rooms ([`TryStop`]).
//!
//! Messages:
//! - [`OpenRoom`] (Session): the room's actor; `NotFound` when no such room exists.
//! - [`RoomIdle`] (Room): ask it to stop, and forget it if it does.

use actix::prelude::*;
use std::collections::HashMap;
use tokio::sync::oneshot;

use crate::actors::db::LoadRoom;
use crate::actors::presence::PresenceHandle;
use crate::actors::room::{Room, RoomIdle, RoomSettings, StoreHandle, TryStop};
use crate::error::{RoomError, StoreError};
use crate::store::models::RoomState;

/// Session → Directory: find or start the actor of room `name`.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Addr<Room>, RoomError>")]
pub struct OpenRoom {
    pub name: String,
}

type Waiter = oneshot::Sender<Result<Addr<Room>, RoomError>>;

enum Entry {
    Loading(Vec<Waiter>),
    Ready(Addr<Room>),
    Stopping(Vec<Waiter>),
}

pub struct Directory {
    rooms: HashMap<String, Entry>,
    load: Recipient<LoadRoom>,
    store: StoreHandle,
    presence: PresenceHandle,
    settings: RoomSettings,
}

impl Directory {
    pub fn new(
        load: Recipient<LoadRoom>,
        store: StoreHandle,
        presence: PresenceHandle,
        settings: RoomSettings,
    ) -> Self {
        Directory {
            rooms: HashMap::new(),
            load,
            store,
            presence,
            settings,
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
}

impl Handler<OpenRoom> for Directory {
    type Result = ResponseFuture<Result<Addr<Room>, RoomError>>;

    fn handle(&mut self, msg: OpenRoom, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        match self.rooms.get_mut(&msg.name) {
            Some(Entry::Ready(room)) => {
                let room = room.clone();
                return Box::pin(async move { Ok(room) });
            }
            Some(Entry::Loading(waiters) | Entry::Stopping(waiters)) => waiters.push(tx),
            None => self.start_loading(msg.name, vec![tx], ctx),
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
