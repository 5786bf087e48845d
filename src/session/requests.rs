//! The request path of a session: a parsed request is admitted by the pipeline (or refused:
//! shutting down, over the rate, too many waiting), dispatched to its handler, and answered.
//! Then come, in this order, the steps that follow a written reply: after a `logout`, leave
//! and close; run the requests that waited for this one; release the events held for the
//! rooms a join or resume answered ([`Then`]); close if a drain is done. No timer decides any
//! of this order.

use actix::fut::LocalBoxActorFuture;
use actix::prelude::*;
use chrono::Utc;
use std::time::{Duration, Instant};

use super::phase::{Ending, Identity};
use super::pipeline::{Admission, Ordered};
use super::shell::Session;
use super::socket::{self, Close, WsContext};
use crate::actors::directory::{Track, Untrack};
use crate::actors::presence::{SessionClosed, SessionOpened};
use crate::actors::room::Leave;
use crate::error::{AuthError, Error, SessionError};
use crate::metrics::{Held, METRICS};
use crate::protocol::{
    error_frame, ok_frame, Incoming, Rejection, Reply, Request, RequestId, RoomName,
};

/// Requests that work without a login (`register`, `login`, `resume`, `ping`) running or
/// waiting at once on a connection not authenticated yet: enough for a register, a login and
/// a ping or two, too few to make an anonymous connection a lever. The others wait for the
/// login as usual: they cost nothing until its answer.
pub const MAX_ANONYMOUS_IN_FLIGHT: usize = 4;

impl Ordered for Incoming {
    fn changes_session(&self) -> bool {
        self.kind.changes_session()
    }

    fn bytes(&self) -> usize {
        self.bytes
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
    /// A join was answered: write the events held while these rooms were being joined.
    Release(Vec<RoomName>),
    /// A resume was answered: these rooms stay held for a `join {after}` that may follow.
    AwaitJoins(Vec<RoomName>),
    /// `logout` succeeded: leave every room and close.
    LogOut,
}

/// What to do with rooms once the requests that waited have run.
pub(super) enum Holds {
    Release(Vec<RoomName>),
    AwaitJoins(Vec<RoomName>),
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
        let joins_awaiting = matches!(&incoming.request,
            Ok(Request::Join { room, .. }) if self.joins.is_awaiting_join(room.as_str()));
        if !joins_awaiting {
            self.stop_awaiting(ctx);
        }
        if !self.phase.takes_requests() {
            if self.phase.is_draining() {
                self.refuse(ctx, &incoming.id, SessionError::ShuttingDown);
            }
            return;
        }
        if !self.guard.take_token(Instant::now()) {
            return self.refuse(ctx, &incoming.id, SessionError::TooManyRequests);
        }
        if self.phase.identity().is_none()
            && incoming.kind.allowed_anonymous()
            && self.pipeline.in_flight(|r| r.kind.allowed_anonymous()) >= MAX_ANONYMOUS_IN_FLIGHT
        {
            return self.refuse(ctx, &incoming.id, SessionError::TooManyAnonymous);
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
        self.answer_now(ctx, id, Err(why.into()).into());
    }

    /// A request answered at once (never one with held rooms or a logout to follow).
    fn answer_now(&mut self, ctx: &mut WsContext, id: &RequestId, answer: Answer) {
        let holds = self.answer(ctx, id, answer);
        self.end_holds(holds, ctx);
    }

    fn end_holds(&mut self, holds: Holds, ctx: &mut WsContext) {
        match holds {
            Holds::Release(rooms) => rooms.iter().for_each(|room| self.release(room, ctx)),
            Holds::AwaitJoins(rooms) => {
                let mut awaiting = false;
                for room in &rooms {
                    let join_waiting = self.join_waiting(room);
                    awaiting |= self.joins.await_join(room, join_waiting);
                }
                if awaiting {
                    // A bounded wait for the client's next request, not an ordering device: a
                    // client that sends no `join {after}` gets the rooms' events after it.
                    let wait = self.settings.resume_join_wait;
                    ctx.run_later(wait, |session, ctx| session.stop_awaiting(ctx));
                }
            }
        }
    }

    /// No `join {after}` follows the resume: write what its restored rooms held.
    fn stop_awaiting(&mut self, ctx: &mut WsContext) {
        for frame in self.joins.stop_awaiting() {
            self.write(ctx, frame);
        }
    }

    fn join_waiting(&self, room: &RoomName) -> bool {
        self.pipeline
            .is_waiting(|i| matches!(&i.request, Ok(Request::Join { room: r, .. }) if r == room))
    }

    fn run(&mut self, incoming: Incoming, ctx: &mut WsContext) {
        let Incoming {
            id, kind, request, ..
        } = incoming;
        match self.dispatch(request, kind.allowed_anonymous(), ctx) {
            Step::Now(answer) => self.answer_now(ctx, &id, answer),
            Step::Later(work) => {
                self.pipeline.started(kind.changes_session());
                ctx.spawn(work.map(move |answer, session, ctx| {
                    session.pipeline.finished();
                    let holds = session.answer(ctx, &id, answer);
                    // The requests that waited run first: a `join` of a released room then
                    // holds its events on, a `leave` drops them.
                    session.run_ready(ctx);
                    session.end_holds(holds, ctx);
                    session.close_if_drained(ctx);
                }));
            }
        }
    }

    /// Runs the waiting requests whose turn has come.
    fn run_ready(&mut self, ctx: &mut WsContext) {
        while !self.phase.is_closed() {
            let Some(next) = self.pipeline.next_ready() else {
                break;
            };
            self.run(next, ctx);
        }
    }

    /// Hands the request to its handler; before that, a request that needs a login is refused
    /// on an anonymous connection, whatever its fields, then one with a field outside the rules.
    fn dispatch(
        &mut self,
        request: Result<Request, Rejection>,
        anonymous_allowed: bool,
        ctx: &mut WsContext,
    ) -> Step {
        let user = self.phase.identity().map(|i| i.user.clone());
        if user.is_none() && !anonymous_allowed {
            return Step::fail(AuthError::Unauthenticated);
        }
        let request = match request {
            Ok(request) => request,
            Err(rejection) => return Step::fail(rejection),
        };
        match (request, user) {
            (Request::Ping {}, _) => Step::done(Reply::Done {}),
            (Request::Register { username, password }, _) => self.register(username, password),
            (Request::Login { username, password }, _) => self.login(username, password),
            (Request::Resume { token }, _) => self.resume(token, ctx),
            (_, None) => Step::fail(AuthError::Unauthenticated),
            (Request::Logout {}, Some(_)) => self.logout(),
            (Request::Rooms {}, Some(user)) => self.rooms(user),
            (
                Request::CreateRoom {
                    room,
                    kind,
                    members,
                },
                Some(user),
            ) => self.create_room(user, room, kind, members),
            (Request::Join { room, after }, Some(user)) => self.join(user, room, after, ctx),
            (Request::Leave { room }, Some(_)) => self.leave(room),
            (
                Request::Post {
                    room,
                    body,
                    client_msg_id,
                },
                Some(user),
            ) => self.post(user, room, body, client_msg_id),
            (
                Request::History {
                    room,
                    before,
                    limit,
                },
                Some(user),
            ) => self.history(user, room, before, limit),
            (Request::Who { room }, Some(user)) => self.who(user, room),
            (Request::Typing { room }, Some(user)) => self.typing(user.id, room),
            (Request::Invite { room, user: u }, Some(user)) => self.invite(user, room, u),
            (Request::Revoke { room, user: u }, Some(user)) => self.revoke(user, room, u),
            (Request::Dm { user: other }, Some(user)) => self.dm(user, other),
        }
    }

    /// Writes the reply; after a `logout`, leaves and closes. Returns what to do with the
    /// rooms held for a join or resume once the waiting requests have run.
    fn answer(&mut self, ctx: &mut WsContext, id: &RequestId, answer: Answer) -> Holds {
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
            Then::Nothing => Holds::Release(Vec::new()),
            Then::Release(rooms) => Holds::Release(rooms),
            Then::AwaitJoins(rooms) => Holds::AwaitJoins(rooms),
            Then::LogOut => {
                self.logged_out(ctx);
                Holds::Release(Vec::new())
            }
        }
    }

    /// Writes the events held for `room` once no join of it is running or waiting.
    fn release(&mut self, room: &RoomName, ctx: &mut WsContext) {
        let join_waiting = self.join_waiting(room);
        for frame in self.joins.release(room, join_waiting) {
            self.write(ctx, frame);
        }
    }

    /// `login` or `resume` succeeded: the connection is `identity` from now on.
    pub(super) fn authenticated(
        &mut self,
        identity: Identity,
        ctx: &mut WsContext,
    ) -> Result<(), Error> {
        let (user, token) = (identity.user.id, identity.token.clone());
        let lifetime = (identity.expires_at - Utc::now())
            .to_std()
            .unwrap_or(Duration::ZERO);
        log::info!(
            "session {} from {}: authenticated as {}",
            self.id.0,
            self.peer.addr,
            identity.user.username
        );
        self.phase
            .authenticate(identity)
            .map_err(|_| AuthError::AlreadyAuthenticated)?;
        self.authenticated = Some(Held::new(&METRICS.sessions_authenticated));
        self.services
            .presence
            .opened
            .do_send(SessionOpened { user });
        self.services.directory.do_send(Track {
            token,
            session: self.id,
            yield_to: ctx.address().recipient(),
            revoked: ctx.address().recipient(),
        });
        // The token's end is the session's: it is not asked again, so the timer keeps it.
        ctx.run_later(lifetime, |session, ctx| {
            let text = "token expired";
            session.shut(ctx, Ending::Clean, text, Close::Policy, text);
        });
        Ok(())
    }

    /// After a `logout` reply: leave at once, run nothing queued behind it as this user, close
    /// (unless writing the reply already closed the connection).
    fn logged_out(&mut self, ctx: &mut WsContext) {
        if self.phase.is_closed() {
            return;
        }
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
