//! Requests within a room: `send`, `history`, `who`, `typing`, which leave the session as it
//! is and run side by side, each one round trip to the room; and the room's membership:
//! `invite`, `revoke` (to the room) and `dm` (to the directory).

use actix::prelude::*;

use super::requests::Step;
use super::rooms::ask_room;
use super::shell::Session;
use crate::actors::directory::OpenDirectFor;
use crate::actors::room::{Invite, Post, ReadHistory, Revoke, Room, Typing, Who};
use crate::error::{Error, Forbidden, RoomError, SessionError};
use crate::ids::{Seq, UserId};
use crate::protocol::{Rejection, Reply, RoomName, RoomRef, Username};
use crate::store::models::UserRecord;

impl Session {
    fn joined_room(&self, room: &RoomName) -> Result<Addr<Room>, Error> {
        self.joins
            .handle(room.as_str())
            .cloned()
            .ok_or(Error::Room(RoomError::Forbidden(Forbidden::NotJoined)))
    }

    pub(super) fn post(
        &mut self,
        user: UserRecord,
        room: RoomName,
        body: String,
        client_msg_id: Option<String>,
    ) -> Step {
        let addr = match self.joined_room(&room) {
            Ok(addr) => addr,
            Err(e) => return Step::fail(e),
        };
        if !self.services.sends_per_user.take(user.id) {
            return Step::fail(SessionError::UserSendRate);
        }
        let request = addr.send(Post {
            session: self.id,
            user,
            body: body.into(),
            client_msg_id,
        });
        let work = async move {
            let ack = request.await??;
            Ok(Reply::Sent {
                seq: ack.seq,
                sent_at: ack.sent_at,
            })
        };
        Step::later(work.into_actor(self))
    }

    pub(super) fn history(
        &mut self,
        user: UserRecord,
        room: RoomName,
        before: Option<Seq>,
        limit: Option<u32>,
    ) -> Step {
        let directory = self.services.directory.clone();
        let read = ReadHistory {
            user,
            before,
            limit,
        };
        let work = async move {
            let (_, page) = ask_room(&directory, &room, read).await?;
            Ok(Reply::History {
                messages: page.messages,
                has_more: page.has_more,
            })
        };
        Step::later(work.into_actor(self))
    }

    pub(super) fn who(&mut self, user: UserRecord, room: RoomName) -> Step {
        let directory = self.services.directory.clone();
        let work = async move {
            let (_, online) = ask_room(&directory, &room, Who { user }).await?;
            Ok(Reply::Online { online })
        };
        Step::later(work.into_actor(self))
    }

    pub(super) fn invite(&mut self, by: UserRecord, room: RoomName, user: Username) -> Step {
        let directory = self.services.directory.clone();
        let work = async move {
            ask_room(&directory, &room, Invite { by, user }).await?;
            Ok(Reply::Done {})
        };
        Step::later(work.into_actor(self))
    }

    pub(super) fn revoke(&mut self, by: UserRecord, room: RoomName, user: Username) -> Step {
        let directory = self.services.directory.clone();
        let work = async move {
            ask_room(&directory, &room, Revoke { by, user }).await?;
            Ok(Reply::Done {})
        };
        Step::later(work.into_actor(self))
    }

    /// The direct room of the user and `other`; with oneself, `bad_request`.
    pub(super) fn dm(&mut self, me: UserRecord, other: Username) -> Step {
        if me.username == other.as_str() {
            return Step::fail(Rejection::bad("a direct room needs another user"));
        }
        let request = self.services.directory.send(OpenDirectFor { me, other });
        let work = async move {
            let room = request.await??;
            Ok(Reply::Direct {
                room: RoomRef {
                    name: room.name,
                    kind: room.kind,
                },
            })
        };
        Step::later(work.into_actor(self))
    }

    pub(super) fn typing(&mut self, user: UserId, room: RoomName) -> Step {
        let addr = match self.joined_room(&room) {
            Ok(addr) => addr,
            Err(e) => return Step::fail(e),
        };
        if !self.services.typing_per_user.take(user) {
            return Step::fail(SessionError::UserTypingRate);
        }
        let request = addr.send(Typing { session: self.id });
        let work = async move {
            request.await??;
            Ok(Reply::Done {})
        };
        Step::later(work.into_actor(self))
    }
}
