//! Presence: which users are connected to this node and which rooms each has joined here.
//! Rooms and sessions report to it through [`PresenceHandle`], a set of recipients. In a
//! cluster, a room adds the members the [`crate::actors::cluster::Cluster`] actor tells it
//! are joined on the other nodes.
//!
//! Messages:
//! - [`SessionOpened`] / [`SessionClosed`] (Session, after auth / on stop).
//! - [`RoomEntered`] / [`RoomExited`] (Room, on a user's first join / last leave).
//! - [`WhoIsIn`] (Room, for `who`): the usernames joined to a room, sorted.

use actix::prelude::*;
use std::collections::{BTreeMap, HashMap};

use crate::ids::UserId;

#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct SessionOpened {
    pub user: UserId,
}

#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct SessionClosed {
    pub user: UserId,
}

#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct RoomEntered {
    pub room: String,
    pub username: String,
}

#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct RoomExited {
    pub room: String,
    pub username: String,
}

#[derive(Debug, Clone, Message)]
#[rtype(result = "Vec<String>")]
pub struct WhoIsIn {
    pub room: String,
}

/// The presence interface: any actor handling these five messages can serve.
#[derive(Clone)]
pub struct PresenceHandle {
    pub opened: Recipient<SessionOpened>,
    pub closed: Recipient<SessionClosed>,
    pub entered: Recipient<RoomEntered>,
    pub exited: Recipient<RoomExited>,
    pub who: Recipient<WhoIsIn>,
}

impl PresenceHandle {
    pub fn of<A>(addr: &Addr<A>) -> Self
    where
        A: Actor<Context = Context<A>>
            + Handler<SessionOpened>
            + Handler<SessionClosed>
            + Handler<RoomEntered>
            + Handler<RoomExited>
            + Handler<WhoIsIn>,
    {
        PresenceHandle {
            opened: addr.clone().recipient(),
            closed: addr.clone().recipient(),
            entered: addr.clone().recipient(),
            exited: addr.clone().recipient(),
            who: addr.clone().recipient(),
        }
    }
}

/// In-process presence for a single node.
#[derive(Debug, Default)]
pub struct Presence {
    sessions: HashMap<UserId, usize>,
    rooms: HashMap<String, BTreeMap<String, usize>>,
}

impl Actor for Presence {
    type Context = Context<Self>;
}

impl Presence {
    pub fn online_users(&self) -> usize {
        self.sessions.len()
    }
}

impl Handler<SessionOpened> for Presence {
    type Result = ();
    fn handle(&mut self, msg: SessionOpened, _: &mut Context<Self>) {
        *self.sessions.entry(msg.user).or_default() += 1;
    }
}

impl Handler<SessionClosed> for Presence {
    type Result = ();
    fn handle(&mut self, msg: SessionClosed, _: &mut Context<Self>) {
        if let Some(count) = self.sessions.get_mut(&msg.user) {
            *count -= 1;
            if *count == 0 {
                self.sessions.remove(&msg.user);
            }
        }
    }
}

impl Handler<RoomEntered> for Presence {
    type Result = ();
    fn handle(&mut self, msg: RoomEntered, _: &mut Context<Self>) {
        *self
            .rooms
            .entry(msg.room)
            .or_default()
            .entry(msg.username)
            .or_default() += 1;
    }
}

impl Handler<RoomExited> for Presence {
    type Result = ();
    fn handle(&mut self, msg: RoomExited, _: &mut Context<Self>) {
        let Some(users) = self.rooms.get_mut(&msg.room) else {
            return;
        };
        if let Some(count) = users.get_mut(&msg.username) {
            *count -= 1;
            if *count == 0 {
                users.remove(&msg.username);
            }
        }
        if users.is_empty() {
            self.rooms.remove(&msg.room);
        }
    }
}

impl Handler<WhoIsIn> for Presence {
    type Result = MessageResult<WhoIsIn>;
    fn handle(&mut self, msg: WhoIsIn, _: &mut Context<Self>) -> Self::Result {
        MessageResult(
            self.rooms
                .get(&msg.room)
                .map(|users| users.keys().cloned().collect())
                .unwrap_or_default(),
        )
    }
}
