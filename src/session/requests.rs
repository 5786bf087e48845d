//! The request path of a session: a parsed request is admitted by the pipeline (or refused:
//! shutting down, over the rate, too many waiting), dispatched to its handler, and answered;
//! then comes the step that follows the written reply ([`Then`]): releasing the events held
//! for a join, or closing after a logout. No timer decides any of this order.

use actix::fut::LocalBoxActorFuture;
use actix::prelude::*;
use std::time::Instant;

use super::phase::Identity;
use super::pipeline::{Admission, Ordered};
use super::shell::Session;
use super::socket::{self, Close, WsContext};
use crate::actors::directory::{Track, Untrack, Yield};
use crate::actors::presence::{SessionClosed, SessionOpened};
use crate::actors::room::Leave;
use crate::error::{AuthError, Error, SessionError};
use crate::protocol::{
    error_frame, ok_frame, Incoming, Rejection, Reply, Request, RequestId, RoomName,
};
use crate::store::models::UserRecord;

impl Ordered for Incoming {
    fn changes_session(&self) -> bool {
        self.kind.changes_session()
    }
}

/// A request's answer, and what follows once it is written.
pub(super) struct Answer {
    pub result: Result<Reply, Error>,
    pub then: Then,
}

/// The step after a reply is written.
pub(super) enum Then {
    Nothing,
    /// Write the events held while these rooms were being joined.
    Release(Vec<RoomName>),
    /// `logout` succeeded: leave every room and close.
    LogOut,
}

impl From<Result<Reply, Error>> for Answer {
    fn from(result: Result<Reply, Error>) -> Self {
        Answer {
            result,
            then: Then::Nothing,
        }
    }
}

/// How a handler answers: now, or when its round trips are done.
pub(super) enum Step {
    Now(Answer),
    Later(LocalBoxActorFuture<Session, Answer>),
}

impl Step {
    pub fn done(reply: Reply) -> Step {
        Step::Now(Ok(reply).into())
    }

    pub fn fail(e: impl Into<Error>) -> Step {
        Step::Now(Err(e.into()).into())
    }

    pub fn later(work: impl ActorFuture<Session, Output = Result<Reply, Error>> + 'static) -> Step {
        Step::Later(Box::pin(work.map(|result, _, _| Answer::from(result))))
    }

    pub fn answer_later(work: impl ActorFuture<Session, Output = Answer> + 'static) -> Step {
        Step::Later(Box::pin(work))
    }
}

impl Session {
    pub(super) fn accept(&mut self, incoming: Incoming, ctx: &mut WsContext) {
        if !self.phase.takes_requests() {
            if self.phase.is_draining() {
                self.refuse(ctx, &incoming.id, SessionError::ShuttingDown);
            }
            return;
        }
        if !self.guard.take_token(Instant::now()) {
            return self.refuse(ctx, &incoming.id, SessionError::TooManyRequests);
        }
        match self.pipeline.admit(incoming) {
            Admission::Run(incoming) => self.run(incoming, ctx),
            Admission::Queued => {}
            Admission::Full(incoming) => {
                self.refuse(ctx, &incoming.id, SessionError::TooManyWaiting)
            }
        }
    }

    fn refuse(&mut self, ctx: &mut WsContext, id: &RequestId, why: SessionError) {
        self.answer(ctx, id, Err(why.into()).into());
    }

    fn run(&mut self, incoming: Incoming, ctx: &mut WsContext) {
        let Incoming { id, kind, request } = incoming;
        match self.dispatch(request, kind.allowed_anonymous(), ctx) {
            Step::Now(answer) => self.answer(ctx, &id, answer),
            Step::Later(work) => {
                self.pipeline.started(kind.changes_session());
                ctx.spawn(work.map(move |answer, session, ctx| {
                    session.pipeline.finished();
                    session.answer(ctx, &id, answer);
                    session.run_ready(ctx);
                }));
            }
        }
    }

    /// Runs the waiting requests whose turn has come; then, when draining and idle, closes.
    fn run_ready(&mut self, ctx: &mut WsContext) {
        while !self.phase.is_closed() {
            let Some(next) = self.pipeline.next_ready() else {
                break;
            };
            self.run(next, ctx);
        }
        self.close_if_drained(ctx);
    }

    fn dispatch(
        &mut self,
        request: Result<Request, Rejection>,
        anonymous_allowed: bool,
        ctx: &mut WsContext,
    ) -> Step {
        if self.phase.identity().is_none() && !anonymous_allowed {
            return Step::fail(AuthError::Unauthenticated);
        }
        let request = match request {
            Ok(request) => request,
            Err(rejection) => return Step::fail(rejection),
        };
        match request {
            Request::Ping {} => Step::done(Reply::Done {}),
            Request::Register { username, password } => self.register(username, password),
            Request::Login { username, password } => self.login(username, password, ctx),
            Request::Resume { token } => self.resume(token, ctx),
            Request::Logout {} => self.logout(),
            Request::Rooms {} => self.rooms(),
            Request::CreateRoom {
                room,
                kind,
                members,
            } => self.create_room(room, kind, members),
            Request::Join { room, after } => self.join(room, after, ctx),
            Request::Leave { room } => self.leave(room),
            Request::Post {
                room,
                body,
                client_msg_id,
            } => self.post(room, body, client_msg_id),
            Request::History {
                room,
                before,
                limit,
            } => self.history(room, before, limit),
            Request::Who { room } => self.who(room),
            Request::Typing { room } => self.typing(room),
        }
    }

    /// Writes the reply, then takes the step that follows it.
    fn answer(&mut self, ctx: &mut WsContext, id: &RequestId, answer: Answer) {
        let frame = match &answer.result {
            Ok(reply) => ok_frame(id, reply),
            Err(e) => {
                if e.is_server_fault() {
                    log::warn!("session {}: request failed: {e}", self.id.0);
                } else {
                    log::debug!("session {}: request refused: {e}", self.id.0);
                }
                let (code, message) = e.to_wire();
                error_frame(Some(id), code, &message)
            }
        };
        self.write(ctx, frame.into());
        match answer.then {
            Then::Nothing => {}
            Then::Release(rooms) => rooms.iter().for_each(|room| self.release(room, ctx)),
            Then::LogOut => self.log_out(ctx),
        }
    }

    /// Writes the events held for `room` once no join of it is running or waiting.
    fn release(&mut self, room: &RoomName, ctx: &mut WsContext) {
        let join_waiting = self
            .pipeline
            .is_waiting(|i| matches!(&i.request, Ok(Request::Join { room: r, .. }) if r == room));
        for frame in self.joins.release(room, join_waiting) {
            self.write(ctx, frame);
        }
    }

    pub(super) fn user(&self) -> Result<&UserRecord, Error> {
        self.phase
            .identity()
            .map(|i| &i.user)
            .ok_or(Error::Auth(AuthError::Unauthenticated))
    }

    /// `login` or `resume` succeeded: the connection is `identity` from now on.
    pub(super) fn authenticated(
        &mut self,
        identity: Identity,
        yield_to: Recipient<Yield>,
    ) -> Result<(), Error> {
        let (user, token) = (identity.user.id, identity.token.clone());
        log::info!(
            "session {} from {}: authenticated as {}",
            self.id.0,
            self.peer.addr,
            identity.user.username
        );
        self.phase
            .authenticate(identity)
            .map_err(|_| AuthError::AlreadyAuthenticated)?;
        self.services
            .presence
            .opened
            .do_send(SessionOpened { user });
        self.services.directory.do_send(Track {
            token,
            session: self.id,
            yield_to,
        });
        Ok(())
    }

    /// After a `logout` reply: leave at once, run nothing queued behind it as this user, close.
    fn log_out(&mut self, ctx: &mut WsContext) {
        if let Some(identity) = self.phase.log_out() {
            let user = identity.user.id;
            self.services
                .presence
                .closed
                .do_send(SessionClosed { user });
            self.services.directory.do_send(Untrack {
                token: identity.token,
                session: self.id,
            });
        }
        for room in self.joins.leave_all() {
            room.do_send(Leave { session: self.id });
        }
        self.pipeline.clear();
        socket::close(ctx, Close::Normal, "logged out");
    }
}
