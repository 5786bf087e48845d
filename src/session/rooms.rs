//! Requests about rooms: `rooms`, `create_room`, `join`, `leave`, and [`ask_room`], the one way
//! a session reaches a room by name. A join holds the room's events from its start until its
//! reply is written ([`Then::Release`]).

use actix::prelude::*;

use super::requests::{Answer, Step, Then};
use super::shell::Session;
use super::socket::WsContext;
use crate::actors::directory::{CreateRoomFor, Directory, ListRoomsFor, OpenRoom};
use crate::actors::room::{Join, Joined, Leave, Room};
use crate::error::{Error, Forbidden, RoomError};
use crate::ids::Seq;
use crate::protocol::{CreatedRoom, JoinedRoom, Reply, RoomKind, RoomListing, RoomName, Username};
use crate::store::models::{RoomSummary, UserRecord};

impl Session {
    pub(super) fn rooms(&mut self, user: UserRecord) -> Step {
        let request = self.services.directory.send(ListRoomsFor { user });
        let work = async move { Ok::<_, Error>(request.await??) };
        Step::later(work.into_actor(self).map(
            |result: Result<Vec<RoomSummary>, Error>, session, _| {
                let rooms = result?
                    .into_iter()
                    .map(|r| RoomListing {
                        joined: session.joins.is_joined(&r.name),
                        name: r.name,
                        kind: r.kind,
                        last_seq: r.last_seq,
                    })
                    .collect();
                Ok(Reply::Rooms { rooms })
            },
        ))
    }

    pub(super) fn create_room(
        &mut self,
        owner: UserRecord,
        room: RoomName,
        kind: RoomKind,
        members: Vec<Username>,
    ) -> Step {
        let request = self.services.directory.send(CreateRoomFor {
            name: room,
            kind,
            owner,
            members,
        });
        let work = async move {
            let room = request.await??;
            Ok(Reply::Created {
                room: CreatedRoom {
                    name: room.name,
                    kind: room.kind,
                    owner: room.owner,
                },
            })
        };
        Step::later(work.into_actor(self))
    }

    pub(super) fn join(
        &mut self,
        user: UserRecord,
        room: RoomName,
        after: Option<Seq>,
        ctx: &mut WsContext,
    ) -> Step {
        let join = Join {
            session: self.id,
            user,
            deliver: ctx.address().recipient(),
            after,
            replaces: None,
        };
        // Joining one more room counts against users.max_joined_rooms; joining again does not.
        let joined = (!self.joins.is_joined(room.as_str())).then(|| self.joins.joined_count());
        self.joins.begin(&room);
        let directory = self.services.directory.clone();
        let name = room.clone();
        let work = async move { ask_room_to_join(&directory, &name, joined, join).await };
        Step::answer_later(
            work.into_actor(self)
                .map(move |result, session, _| session.joined(room, result)),
        )
    }

    fn joined(&mut self, room: RoomName, result: Result<(Addr<Room>, Joined), Error>) -> Answer {
        let result = match result {
            Ok((addr, joined)) => {
                let covered = joined.missed.is_some().then_some(joined.last_seq);
                if self.joins.answered(&room, Some((addr, covered))) {
                    Ok(join_reply(joined))
                } else {
                    Err(RoomError::Forbidden(Forbidden::NotMember).into())
                }
            }
            Err(e) => {
                self.joins.answered(&room, None);
                Err(e)
            }
        };
        Answer {
            result,
            then: Then::Release(vec![room]),
        }
    }

    pub(super) fn leave(&mut self, room: RoomName) -> Step {
        if let Some(addr) = self.joins.leave(&room) {
            addr.do_send(Leave { session: self.id });
        }
        Step::done(Reply::Done {})
    }
}

fn join_reply(joined: Joined) -> Reply {
    let truncated = joined.missed.is_some().then_some(joined.truncated);
    Reply::Joined {
        room: JoinedRoom {
            name: joined.name,
            kind: joined.kind,
            last_seq: joined.last_seq,
        },
        missed: joined.missed,
        truncated,
    }
}

/// Sends `msg` to room `name`, looking it up through the directory. A room that stopped
/// between the lookup and the send is looked up once more.
pub(super) async fn ask_room<M, R>(
    directory: &Addr<Directory>,
    name: &RoomName,
    msg: M,
) -> Result<(Addr<Room>, R), Error>
where
    M: Message<Result = Result<R, RoomError>> + Clone + Send + 'static,
    R: Send + 'static,
    Room: Handler<M>,
{
    ask_room_to_join(directory, name, None, msg).await
}

/// Like [`ask_room`], for a session that has `joined` rooms when it joins one more.
pub(super) async fn ask_room_to_join<M, R>(
    directory: &Addr<Directory>,
    name: &RoomName,
    joined: Option<usize>,
    msg: M,
) -> Result<(Addr<Room>, R), Error>
where
    M: Message<Result = Result<R, RoomError>> + Clone + Send + 'static,
    R: Send + 'static,
    Room: Handler<M>,
{
    let mut retried = false;
    loop {
        let open = OpenRoom {
            name: name.clone(),
            joined,
        };
        let room = directory.send(open).await??;
        match room.send(msg.clone()).await {
            Ok(result) => return Ok((room, result?)),
            Err(MailboxError::Closed) if !retried => retried = true,
            Err(e) => return Err(e.into()),
        }
    }
}
