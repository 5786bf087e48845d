//! The Session actor shell. It feeds frames and timer ticks into the frame guard and the
//! phase, hands parsed requests to the request path ([`super::requests`]), delivers room
//! events through the joins, and writes what they return; when the connection ends it tells
//! the others what [`farewell`] says. Round trips to other actors are spawned, never waited
//! on, so the socket keeps flowing.
//!
//! Messages handled: [`Deliver`] (Room): write an event frame, write `kicked` and forget the
//! room when kicked, or close 1013 when evicted;
//! [`Drain`] (Gate): finish, then close 1001; [`Yield`] (Directory): hand the rooms over to a
//! `resume` on another connection.

use actix::prelude::*;
use bytestring::ByteString;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use super::guard::{FrameGuard, Inbound, Piece};
use super::hearing::{Heard, Hearing};
use super::joins::Joins;
use super::phase::{farewell, Ending, Farewell, Phase};
use super::pipeline::Pipeline;
use super::socket::{self, Close, OutboundMeter, WsContext};
use super::{Services, SessionSettings};
use crate::actors::directory::{OpenRoom, Park, TokenRevoked, Untrack, Yield};
use crate::actors::gate::{Drain, Register, Unregister};
use crate::actors::presence::SessionClosed;
use crate::actors::room::{Deliver, Detach, Leave, Room};
use crate::ids::{Seq, SessionId};
use crate::metrics::{Held, METRICS};
use crate::protocol::{
    error_frame, parse_request, ErrorCode, Event, Incoming, RequestId, RoomName,
};

/// Where a connection comes from.
#[derive(Debug, Clone)]
pub struct Peer {
    /// For the log.
    pub addr: String,
    /// For the per-IP limits.
    pub ip: Option<IpAddr>,
}

pub struct Session {
    pub(super) id: SessionId,
    pub(super) peer: Peer,
    pub(super) phase: Phase,
    pub(super) guard: FrameGuard,
    pub(super) pipeline: Pipeline<Incoming>,
    pub(super) joins: Joins<Addr<Room>>,
    outbound: OutboundMeter,
    hearing: Hearing,
    pub(super) services: Arc<Services>,
    pub(super) settings: Arc<SessionSettings>,
    _open: Held,
    /// Counts the connection as authenticated from its login or resume on.
    pub(super) authenticated: Option<Held>,
}

impl Session {
    pub fn new(
        id: SessionId,
        peer: Peer,
        outbound: OutboundMeter,
        services: Arc<Services>,
        settings: Arc<SessionSettings>,
    ) -> Self {
        let now = Instant::now();
        Session {
            id,
            peer,
            phase: Phase::Anonymous,
            guard: FrameGuard::new(settings.guard.clone(), now),
            pipeline: Pipeline::new(settings.max_waiting_requests, settings.max_waiting_bytes),
            joins: Joins::default(),
            outbound,
            hearing: Hearing::new(now),
            services,
            settings,
            _open: Held::new(&METRICS.connections_open),
            authenticated: None,
        }
    }

    // ------------------------------------------------------------ frames, from the transport

    /// Any frame arrived (pongs included): the client is alive.
    pub fn on_activity(&mut self) {
        self.hearing.frame(Instant::now());
    }

    pub fn on_text(&mut self, text: &str, ctx: &mut WsContext) {
        let inbound = self.guard.text(text);
        self.inbound(inbound, ctx);
    }

    pub fn on_binary(&mut self, ctx: &mut WsContext) {
        let inbound = self.guard.binary();
        self.inbound(inbound, ctx);
    }

    pub fn on_fragment(&mut self, piece: Piece, data: &[u8], ctx: &mut WsContext) {
        let inbound = self.guard.fragment(piece, data);
        self.inbound(inbound, ctx);
    }

    pub fn on_ping(&mut self, data: &[u8], ctx: &mut WsContext) {
        socket::pong(ctx, &self.outbound, data);
        self.check_backlog(ctx);
    }

    /// The client's close frame: answer it and leave the rooms at once.
    pub fn on_client_close(&mut self, reason: Option<socket::CloseReason>, ctx: &mut WsContext) {
        self.phase.close(Ending::Clean, "client closed");
        socket::echo_close(ctx, reason);
    }

    /// A frame over the size limit (the codec refused it).
    pub fn on_oversized_frame(&mut self, ctx: &mut WsContext) {
        self.shut(
            ctx,
            Ending::Dropped,
            "frame over the size limit",
            Close::TooBig,
            "frame too large",
        );
    }

    pub fn on_protocol_error(&mut self, ctx: &mut WsContext) {
        self.shut(
            ctx,
            Ending::Dropped,
            "websocket protocol error",
            Close::Protocol,
            "protocol error",
        );
    }

    /// The stream of frames ended without a close frame.
    pub fn on_lost(&mut self, ctx: &mut WsContext) {
        self.phase.close(Ending::Dropped, "connection lost");
        ctx.stop();
    }

    fn inbound(&mut self, inbound: Inbound<'_>, ctx: &mut WsContext) {
        match inbound {
            Inbound::Text(text) => match parse_request(&text) {
                Ok(incoming) => self.accept(incoming, ctx),
                Err(e) => self.unusable(ctx, e.id.as_ref(), &e.rejection.message),
            },
            Inbound::Unusable(why) => self.unusable(ctx, None, why),
            Inbound::TooBig => self.shut(
                ctx,
                Ending::Dropped,
                "message over the size limit",
                Close::TooBig,
                "message too large",
            ),
            Inbound::Partial => {}
        }
    }

    /// Answers a frame that could not be used; closes with 1008 when they come too often.
    fn unusable(&mut self, ctx: &mut WsContext, id: Option<&RequestId>, message: &str) {
        self.write(ctx, error_frame(id, ErrorCode::BadRequest, message).into());
        if self.guard.count_unusable(Instant::now()) {
            log::warn!(
                "session {} from {}: too many bad frames",
                self.id.0,
                self.peer.addr
            );
            self.shut(
                ctx,
                Ending::Dropped,
                "too many bad frames",
                Close::Policy,
                "too many bad frames",
            );
        }
    }

    // ------------------------------------------------------------ writing and closing

    /// Writes a frame, unless the client has stopped reading.
    pub(super) fn write(&mut self, ctx: &mut WsContext, frame: ByteString) {
        if self.check_backlog(ctx) {
            socket::send_text(ctx, &self.outbound, frame);
        }
    }

    /// An event of `room` (`seq` set for a `message`): written now, or held for the room's
    /// join under way.
    fn room_event(&mut self, ctx: &mut WsContext, room: &str, seq: Option<Seq>, frame: ByteString) {
        if let Some(frame) = self.joins.event(room, seq, frame) {
            self.write(ctx, frame);
        } else if self.joins.held_bytes() > self.settings.outbound_limit_bytes {
            // Held for a join, they would be written at once after its reply: they count like
            // unread bytes.
            self.cut_off_slow(ctx, "held events over the outbound limit");
        }
    }

    /// False (and the connection cut off with 1013; it stays joined for the grace, to resume)
    /// when the client has more unread than the limit.
    pub(super) fn check_backlog(&mut self, ctx: &mut WsContext) -> bool {
        if self.outbound.backlog() <= self.settings.outbound_limit_bytes {
            return true;
        }
        self.cut_off_slow(ctx, "slow reader");
        false
    }

    /// Closes with 1013: the client takes less than it is sent. It stays joined for the
    /// grace, to resume.
    fn cut_off_slow(&mut self, ctx: &mut WsContext, reason: &'static str) {
        if self.phase.close(Ending::Dropped, reason) {
            log::warn!(
                "session {} from {}: too slow a reader ({reason}), cut off",
                self.id.0,
                self.peer.addr
            );
            socket::close(ctx, Close::TryAgainLater, "too slow; reconnect and resume");
        }
    }

    /// Closes for `reason` (the first close wins) with `close` and `description` on the wire.
    pub(super) fn shut(
        &mut self,
        ctx: &mut WsContext,
        ending: Ending,
        reason: &'static str,
        close: Close,
        description: &str,
    ) {
        if self.phase.close(ending, reason) {
            socket::close(ctx, close, description);
        }
    }

    pub(super) fn close_if_drained(&mut self, ctx: &mut WsContext) {
        if self.phase.is_draining() && self.pipeline.is_idle() {
            self.pipeline.clear();
            let (close, text) = (Close::Away, "server shutting down");
            self.shut(ctx, Ending::Clean, text, close, text);
        }
    }

    fn heartbeat(&mut self, ctx: &mut WsContext) {
        let heard = self.hearing.tick(
            Instant::now(),
            self.settings.ping_interval,
            self.settings.client_timeout,
        );
        match heard {
            Heard::Silent => {
                let text = "heartbeat timeout";
                self.shut(ctx, Ending::Dropped, text, Close::Normal, text);
            }
            Heard::NotYetRead | Heard::Recently => socket::ping(ctx, &self.outbound),
        }
    }

    /// Tells the others how this connection ended.
    fn say_farewell(&self, farewell: Farewell<Addr<Room>>) {
        let session = self.id;
        let directory = &self.services.directory;
        if let Some(token) = farewell.untrack {
            directory.do_send(Untrack { token, session });
        }
        farewell
            .detach
            .iter()
            .for_each(|room| room.do_send(Detach { session }));
        farewell
            .leave
            .iter()
            .for_each(|room| room.do_send(Leave { session }));
        for name in farewell.leave_by_name {
            let directory = directory.clone();
            actix::spawn(async move {
                if let Ok(Ok(room)) = directory.send(OpenRoom { name, joined: None }).await {
                    room.do_send(Leave { session });
                }
            });
        }
        if let Some((token, rooms)) = farewell.park {
            directory.do_send(Park {
                token,
                session,
                rooms,
            });
        }
        let user = farewell.user.as_ref().map_or("-", |u| u.username.as_str());
        log::info!(
            "session {} from {}: connection closed (user {user}): {}",
            session.0,
            self.peer.addr,
            farewell.reason
        );
        if let Some(user) = farewell.user {
            self.services
                .presence
                .closed
                .do_send(SessionClosed { user: user.id });
        }
    }
}

impl Actor for Session {
    type Context = WsContext;

    fn started(&mut self, ctx: &mut WsContext) {
        log::info!(
            "session {} from {}: connection open",
            self.id.0,
            self.peer.addr
        );
        self.services.gate.do_send(Register {
            session: self.id,
            drain: ctx.address().recipient(),
        });
        socket::set_mailbox_capacity(ctx, self.settings.outbound_queue);
        ctx.run_interval(self.settings.ping_interval, Session::heartbeat);
        ctx.run_later(self.settings.auth_timeout, |session, ctx| {
            if matches!(session.phase, Phase::Anonymous | Phase::Draining(None)) {
                let text = "authentication timeout";
                session.shut(ctx, Ending::Clean, text, Close::Policy, text);
            }
        });
    }

    fn stopping(&mut self, _: &mut WsContext) -> Running {
        self.services.gate.do_send(Unregister {
            session: self.id,
            ip: self.peer.ip,
        });
        self.revoke_for_waiting_logout();
        let phase = std::mem::replace(&mut self.phase, Phase::Anonymous);
        let rooms = self.joins.end();
        self.say_farewell(farewell(phase, rooms));
        Running::Stop
    }
}

impl Handler<Deliver> for Session {
    type Result = ();

    fn handle(&mut self, msg: Deliver, ctx: &mut WsContext) {
        match msg {
            Deliver::Frame { room, frame } => self.room_event(ctx, &room, None, frame),
            Deliver::Messages { room, frames } => {
                for (seq, frame) in frames.iter() {
                    self.room_event(ctx, &room, Some(*seq), frame.clone());
                }
            }
            Deliver::Kicked { room, reason } => {
                if let Ok(name) = RoomName::parse(&*room) {
                    self.joins.kick(&name);
                }
                let frame = Event::Kicked {
                    room: &room,
                    reason,
                }
                .to_frame();
                self.write(ctx, frame.into());
            }
            Deliver::Evicted { .. } => self.cut_off_slow(ctx, "outbound queue full"),
        }
    }
}

impl Handler<Drain> for Session {
    type Result = ();

    fn handle(&mut self, _: Drain, ctx: &mut WsContext) {
        self.phase.drain();
        self.close_if_drained(ctx);
    }
}

impl Handler<TokenRevoked> for Session {
    type Result = ();

    /// The token was revoked by a `logout` on another connection: this one ends as well.
    fn handle(&mut self, _: TokenRevoked, ctx: &mut WsContext) {
        let text = "token revoked";
        self.shut(ctx, Ending::Clean, text, Close::Policy, text);
    }
}

impl Handler<Yield> for Session {
    type Result = bool;

    /// A `resume` with this session's token arrived elsewhere: a session joined to rooms
    /// closes without leaving them and parks them for it (true); one in no room stays (false).
    fn handle(&mut self, _: Yield, ctx: &mut WsContext) -> bool {
        if !self.joins.any_joined() {
            return false;
        }
        if self.phase.close(
            Ending::Yielded,
            "taken over by a resume on another connection",
        ) {
            socket::close(ctx, Close::Normal, "resumed on another connection");
            return true;
        }
        matches!(
            self.phase,
            Phase::Closed {
                ending: Ending::Dropped | Ending::Yielded,
                ..
            }
        )
    }
}
