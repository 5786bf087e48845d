//! The WebSocket transport: the `GET /ws` upgrade (the Origin check, the per-IP admission),
//! the frame stream of a [`Session`], and the response body that meters what the socket takes
//! from it. Owns the transport's shared state ([`Transport`]). Calls the gate (to admit) and
//! the session's `on_*` methods; the session never calls back into it.

use actix::{Addr, StreamHandler};
use actix_http::ws::Item;
use actix_web::body::{BodySize, BoxBody, MessageBody};
use actix_web::http::header;
use actix_web::web::Bytes;
use actix_web::{web, HttpRequest, HttpResponse};
use actix_web_actors::ws;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use super::address::{limit_key, TrustedProxies};
use super::listen::HandshakeDone;
use crate::actors::gate::{Admit, Gate, Release};
use crate::ids::SessionIds;
use crate::session::guard::Piece;
use crate::session::socket::{OutboundMeter, WsContext};
use crate::session::{Peer, Services, Session, SessionSettings};

/// What every HTTP worker's upgrades share.
pub struct Transport {
    pub services: Arc<Services>,
    pub sessions: Arc<SessionSettings>,
    /// Browser origins allowed besides the server's own.
    pub allowed_origins: Vec<url::Origin>,
    pub trusted_proxies: TrustedProxies,
    /// Whether the listener speaks TLS (the scheme of the server's own origin).
    pub tls: bool,
    pub ids: SessionIds,
}

/// The response body of a WebSocket, counting the bytes the connection takes from it.
struct MeteredBody {
    inner: BoxBody,
    meter: OutboundMeter,
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
            self.meter.taken(bytes.len());
        }
        polled
    }
}

/// Whether a browser's Origin may open a WebSocket: the server's own origin, or one allowed by
/// config. Origins match by scheme, host and port (a missing port is the scheme's default), so
/// neither `http://` for an `https://` page nor another port of the same host passes. The
/// server's own origin is the Host it was asked for with its own scheme, or what a trusted
/// proxy says it forwarded (`Forwarded`, `X-Forwarded-Proto`, `X-Forwarded-Host`).
fn origin_allowed(req: &HttpRequest, state: &Transport) -> bool {
    let Some(origin) = req.headers().get(header::ORIGIN) else {
        return true; // not a browser
    };
    let Some(origin) = origin
        .to_str()
        .ok()
        .and_then(|o| url::Url::parse(o).ok())
        .map(|u| u.origin())
        .filter(url::Origin::is_tuple)
    else {
        return false; // unreadable, or opaque ("null")
    };
    if state.allowed_origins.contains(&origin) {
        return true;
    }
    let via_proxy = req
        .peer_addr()
        .is_some_and(|peer| state.trusted_proxies.trusts(peer.ip()));
    let info = req.connection_info();
    let (scheme, host) = if via_proxy {
        (info.scheme(), info.host())
    } else {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok());
        (if state.tls { "https" } else { "http" }, host.unwrap_or(""))
    };
    url::Url::parse(&format!("{scheme}://{host}")).is_ok_and(|own| own.origin() == origin)
}

/// The configured origins as scheme, host and port (entries that do not parse were refused
/// when the configuration was checked).
pub fn parse_origins(allowed: &[String]) -> Vec<url::Origin> {
    allowed
        .iter()
        .filter_map(|a| url::Url::parse(a).ok())
        .map(|u| u.origin())
        .filter(url::Origin::is_tuple)
        .collect()
}

/// `GET /ws`: upgrade to a WebSocket run by a new Session actor, after the Origin check
/// (403) and the per-IP connection limit (429).
pub async fn upgrade(
    req: HttpRequest,
    stream: web::Payload,
    state: web::Data<Transport>,
) -> Result<HttpResponse, actix_web::Error> {
    // Whatever follows, this connection's handshake is over.
    if let Some(handshake) = req.conn_data::<HandshakeDone>() {
        handshake.finish();
    }
    if !origin_allowed(&req, &state) {
        log::warn!(
            "refused a WebSocket from origin {:?}",
            req.headers().get(header::ORIGIN)
        );
        return Ok(
            HttpResponse::Forbidden().json(serde_json::json!({"error": "origin not allowed"}))
        );
    }
    let client = req
        .peer_addr()
        .map(|a| state.trusted_proxies.client_of(a.ip(), req.headers()));
    let ip = client.map(limit_key);
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
    let peer = match (req.peer_addr(), client) {
        (Some(direct), Some(client)) if direct.ip() != client => format!("{client} via {direct}"),
        (Some(direct), _) => direct.to_string(),
        (None, _) => "unknown".into(),
    };
    // Give the slot back if this request ends (or its client goes) before a session exists.
    let slot = AdmitSlot {
        gate: state.services.gate.clone(),
        ip,
        armed: true,
    };
    let meter = OutboundMeter::default();
    let session = Session::new(
        state.ids.next(),
        Peer { addr: peer, ip },
        meter.clone(),
        state.services.clone(),
        state.sessions.clone(),
    );
    let response = ws::WsResponseBuilder::new(session, &req, stream)
        .frame_size(state.sessions.guard.max_message_bytes)
        .start()?;
    Ok(slot
        .taken(response)
        .map_body(|_, body| BoxBody::new(MeteredBody { inner: body, meter })))
}

/// A connection slot counted by the gate. It is given back on drop unless a session took it
/// over (the session gives it back when it stops).
struct AdmitSlot {
    gate: Addr<Gate>,
    ip: Option<IpAddr>,
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
            self.gate.do_send(Release { ip: self.ip });
        }
    }
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for Session {
    fn handle(&mut self, item: Result<ws::Message, ws::ProtocolError>, ctx: &mut WsContext) {
        self.on_activity();
        let message = match item {
            Ok(message) => message,
            Err(ws::ProtocolError::Overflow) => return self.on_oversized_frame(ctx),
            Err(e) => {
                log::debug!("websocket protocol error: {e}");
                return self.on_protocol_error(ctx);
            }
        };
        match message {
            ws::Message::Text(text) => self.on_text(&text, ctx),
            ws::Message::Binary(_) => self.on_binary(ctx),
            ws::Message::Continuation(item) => {
                let (piece, data) = match item {
                    Item::FirstText(data) => (Piece::FirstText, data),
                    Item::FirstBinary(data) => (Piece::FirstBinary, data),
                    Item::Continue(data) => (Piece::Middle, data),
                    Item::Last(data) => (Piece::Last, data),
                };
                self.on_fragment(piece, &data, ctx);
            }
            ws::Message::Ping(data) => self.on_ping(&data, ctx),
            ws::Message::Pong(_) | ws::Message::Nop => {}
            ws::Message::Close(reason) => self.on_client_close(reason, ctx),
        }
    }

    fn finished(&mut self, ctx: &mut WsContext) {
        self.on_lost(ctx);
    }
}
