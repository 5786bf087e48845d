//! The WebSocket binding, and the only file that names actix-web-actors: the upgrade
//! handler, the frame stream of a [`Session`], and the few writes a session makes. Moving to
//! another WebSocket crate changes this file alone. Calls only `Session`'s `on_*` methods.

use actix::{ActorContext, StreamHandler};
use actix_http::ws::Item;
use actix_web::body::{BodySize, BoxBody, MessageBody};
use actix_web::http::header;
use actix_web::web::Bytes;
use actix_web::{web, HttpRequest, HttpResponse};
use actix_web_actors::ws;
use bytestring::ByteString;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::actors::gate::Admit;

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

/// Bytes a session has handed to its connection, and bytes the connection has taken from it
/// to write to the socket. Their difference is what a client has not read yet.
#[derive(Clone, Default)]
pub struct OutboundMeter {
    queued: Arc<AtomicUsize>,
    taken: Arc<AtomicUsize>,
}

impl OutboundMeter {
    pub fn backlog(&self) -> usize {
        self.queued
            .load(Ordering::Relaxed)
            .saturating_sub(self.taken.load(Ordering::Relaxed))
    }
}

/// The response body of a WebSocket, counting the bytes the connection takes from it.
struct MeteredBody {
    inner: BoxBody,
    taken: Arc<AtomicUsize>,
}

impl MessageBody for MeteredBody {
    type Error = Box<dyn std::error::Error>;

    fn size(&self) -> BodySize {
        self.inner.size()
    }

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_next(cx);
        if let Poll::Ready(Some(Ok(bytes))) = &polled {
            self.taken.fetch_add(bytes.len(), Ordering::Relaxed);
        }
        polled
    }
}

/// Whether a browser's Origin may open a WebSocket: its own origin, or one allowed by config.
fn origin_allowed(req: &HttpRequest, allowed: &[String]) -> bool {
    let Some(origin) = req.headers().get(header::ORIGIN) else {
        return true; // not a browser
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    if allowed
        .iter()
        .any(|a| a.trim_end_matches('/').eq_ignore_ascii_case(origin))
    {
        return true;
    }
    let host = req.connection_info().host().to_ascii_lowercase();
    url::Url::parse(origin)
        .ok()
        .and_then(|u| {
            let host_of_origin = u.host_str()?.to_ascii_lowercase();
            Some(match u.port() {
                Some(port) => format!("{host_of_origin}:{port}"),
                None => host_of_origin,
            })
        })
        .is_some_and(|o| o == host)
}

/// `GET /ws`: upgrade to a WebSocket run by a new Session actor, after the Origin check
/// (403) and the per-IP connection limit (429).
pub async fn upgrade(
    req: HttpRequest,
    stream: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    if !origin_allowed(&req, &state.allowed_origins) {
        log::warn!(
            "refused a WebSocket from origin {:?}",
            req.headers().get(header::ORIGIN)
        );
        return Ok(
            HttpResponse::Forbidden().json(serde_json::json!({"error": "origin not allowed"}))
        );
    }
    let ip = req.peer_addr().map(|a| a.ip());
    let admitted = state
        .services
        .gate
        .send(Admit { ip })
        .await
        .unwrap_or(false);
    if !admitted {
        log::warn!("refused a connection from {ip:?}: too many connections from this address");
        return Ok(HttpResponse::TooManyRequests()
            .json(serde_json::json!({"error": "too many connections from this address"})));
    }
    let peer = req
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|| "unknown".into());
    // Give the slot back if this request ends (or its client goes) before a session exists.
    let slot = AdmitSlot {
        gate: state.services.gate.clone(),
        ip,
        armed: true,
    };
    let meter = OutboundMeter::default();
    let session = Session::new(
        peer,
        ip,
        meter.clone(),
        state.services.clone(),
        state.sessions.clone(),
    );
    let response = ws::WsResponseBuilder::new(session, &req, stream)
        .frame_size(state.sessions.max_frame_bytes)
        .start();
    match response {
        Ok(response) => Ok(slot.taken(response).map_body(|_, body| {
            BoxBody::new(MeteredBody {
                inner: body,
                taken: meter.taken.clone(),
            })
        })),
        Err(e) => Err(e),
    }
}

/// A connection slot counted by the gate. It is given back on drop unless a session took it
/// over (the session gives it back when it stops).
struct AdmitSlot {
    gate: actix::Addr<crate::actors::gate::Gate>,
    ip: Option<std::net::IpAddr>,
    armed: bool,
}

impl AdmitSlot {
    fn taken<T>(mut self, by: T) -> T {
        self.armed = false;
        by
    }
}

impl Drop for AdmitSlot {
    fn drop(&mut self) {
        if self.armed {
            self.gate
                .do_send(crate::actors::gate::Release { ip: self.ip });
        }
    }
}

/// Bytes a frame with `payload` bytes takes on the wire (server frames are not masked).
fn wire_len(payload: usize) -> usize {
    payload
        + match payload {
            0..=125 => 2,
            126..=65535 => 4,
            _ => 10,
        }
}

pub fn send_text(ctx: &mut WsContext, meter: &OutboundMeter, frame: impl Into<ByteString>) {
    let frame = frame.into();
    meter
        .queued
        .fetch_add(wire_len(frame.len()), Ordering::Relaxed);
    ctx.text(frame);
}

pub fn ping(ctx: &mut WsContext, meter: &OutboundMeter) {
    meter.queued.fetch_add(wire_len(0), Ordering::Relaxed);
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
            ws::Message::Ping(data) => {
                self.outbound()
                    .queued
                    .fetch_add(wire_len(data.len()), Ordering::Relaxed);
                ctx.pong(&data);
                self.check_backlog(ctx);
            }
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

/// The bench's baseline: the smallest WebSocket echo server on the same stack (actix-web,
/// actix-web-actors), plain ws, no parsing and no storage.
struct Echo;

impl actix::Actor for Echo {
    type Context = ws::WebsocketContext<Echo>;
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for Echo {
    fn handle(&mut self, item: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        match item {
            Ok(ws::Message::Text(text)) => ctx.text(text),
            Ok(ws::Message::Binary(data)) => ctx.binary(data),
            Ok(ws::Message::Ping(data)) => ctx.pong(&data),
            Ok(ws::Message::Close(reason)) => {
                ctx.close(reason);
                ctx.stop();
            }
            Ok(_) => {}
            Err(_) => ctx.stop(),
        }
    }
}

async fn echo_route(
    req: HttpRequest,
    stream: web::Payload,
) -> Result<HttpResponse, actix_web::Error> {
    ws::start(Echo, &req, stream)
}

/// Runs the echo server on `bind` until interrupted.
pub fn run_echo_server(bind: &str) -> std::io::Result<()> {
    let bind = bind.to_string();
    actix::System::new().block_on(async move {
        actix_web::HttpServer::new(|| actix_web::App::new().route("/", web::get().to(echo_route)))
            .bind(bind)?
            .run()
            .await
    })
}
