//! The WebSocket binding, and the only file that names actix-web-actors: the upgrade
//! handler, the frame stream of a [`Session`], and the few writes a session makes. Moving to
//! another WebSocket crate changes this file alone. Calls only `Session`'s `on_*` methods.

use actix::{ActorContext, StreamHandler};
use actix_http::ws::Item;
use actix_web::{web, HttpRequest, HttpResponse};
use actix_web_actors::ws;
use bytestring::ByteString;

use crate::actors::session::Session;
use crate::server::AppState;

/// The context a Session runs in.
pub type WsContext = ws::WebsocketContext<Session>;

/// Close codes the server uses (RFC 6455 section 7.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// 1000: logout, or a timed-out peer.
    Normal,
    /// 1001: the server is going away.
    Away,
    /// 1002: the peer broke the WebSocket protocol.
    Protocol,
    /// 1008: the peer keeps sending garbage.
    Policy,
    /// 1009: a frame or message over the size limit.
    TooBig,
    /// 1013: the peer reads too slowly; it may come back.
    TryAgainLater,
}

impl Close {
    fn code(self) -> ws::CloseCode {
        match self {
            Close::Normal => ws::CloseCode::Normal,
            Close::Away => ws::CloseCode::Away,
            Close::Protocol => ws::CloseCode::Protocol,
            Close::Policy => ws::CloseCode::Policy,
            Close::TooBig => ws::CloseCode::Size,
            Close::TryAgainLater => ws::CloseCode::Again,
        }
    }
}

/// `GET /ws`: upgrade to a WebSocket run by a new Session actor.
pub async fn upgrade(
    req: HttpRequest,
    stream: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    let peer = req
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|| "unknown".into());
    let session = Session::new(peer, state.services.clone(), state.sessions.clone());
    ws::WsResponseBuilder::new(session, &req, stream)
        .frame_size(state.sessions.max_frame_bytes)
        .start()
}

pub fn send_text(ctx: &mut WsContext, frame: impl Into<ByteString>) {
    ctx.text(frame);
}

pub fn ping(ctx: &mut WsContext) {
    ctx.ping(b"");
}

/// Sends a close frame and stops the session.
pub fn close(ctx: &mut WsContext, close: Close, reason: &str) {
    ctx.close(Some(ws::CloseReason {
        code: close.code(),
        description: Some(reason.to_string()),
    }));
    ctx.stop();
}

pub fn set_mailbox_capacity(ctx: &mut WsContext, capacity: usize) {
    ctx.set_mailbox_capacity(capacity);
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for Session {
    fn handle(&mut self, item: Result<ws::Message, ws::ProtocolError>, ctx: &mut WsContext) {
        self.on_activity();
        let message = match item {
            Ok(message) => message,
            Err(ws::ProtocolError::Overflow) => {
                self.on_close_reason("frame over the size limit");
                return close(ctx, Close::TooBig, "frame too large");
            }
            Err(e) => {
                self.on_close_reason("websocket protocol error");
                log::debug!("websocket protocol error: {e}");
                return close(ctx, Close::Protocol, "protocol error");
            }
        };
        match message {
            ws::Message::Text(text) => self.on_text(&text, ctx),
            ws::Message::Binary(_) => self.on_binary(ctx),
            ws::Message::Continuation(item) => {
                let (first_text, data, last) = match item {
                    Item::FirstText(data) => (Some(true), data, false),
                    Item::FirstBinary(data) => (Some(false), data, false),
                    Item::Continue(data) => (None, data, false),
                    Item::Last(data) => (None, data, true),
                };
                self.on_fragment(first_text, &data, last, ctx);
            }
            ws::Message::Ping(data) => ctx.pong(&data),
            ws::Message::Pong(_) | ws::Message::Nop => {}
            ws::Message::Close(reason) => {
                self.on_client_close();
                ctx.close(reason);
                ctx.stop();
            }
        }
    }

    fn finished(&mut self, ctx: &mut WsContext) {
        self.on_close_reason("connection lost");
        ctx.stop();
    }
}
