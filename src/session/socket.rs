//! The session's one window onto its WebSocket: the context type actix makes a WebSocket
//! actor run in, the close codes the server uses, and the few writes a session makes, each
//! counted by the [`OutboundMeter`]. The transport starts the session and reads frames; only
//! this file of the session names actix-web-actors.

use actix::ActorContext;
use actix_web_actors::ws;
use bytestring::ByteString;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::Session;
use crate::metrics::METRICS;

pub use ws::CloseReason;

/// The context a Session runs in.
pub type WsContext = ws::WebsocketContext<Session>;

/// Close codes the server uses (RFC 6455 section 7.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// 1000: logout, a timed-out peer, or a session taken over by a resume.
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
#[derive(Debug, Clone, Default)]
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

    /// The connection took `bytes` to write (called by the transport's response body).
    pub fn taken(&self, bytes: usize) {
        self.taken.fetch_add(bytes, Ordering::Relaxed);
    }

    fn queued(&self, payload: usize) {
        self.queued.fetch_add(wire_len(payload), Ordering::Relaxed);
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

pub fn send_text(ctx: &mut WsContext, meter: &OutboundMeter, frame: ByteString) {
    meter.queued(frame.len());
    ctx.text(frame);
}

pub fn ping(ctx: &mut WsContext, meter: &OutboundMeter) {
    meter.queued(0);
    ctx.ping(b"");
}

pub fn pong(ctx: &mut WsContext, meter: &OutboundMeter, data: &[u8]) {
    meter.queued(data.len());
    ctx.pong(data);
}

/// Sends a close frame and stops the session.
pub fn close(ctx: &mut WsContext, close: Close, reason: &str) {
    let code = u16::from(close.code()).to_string();
    METRICS.closes.with_label_values(&[code.as_str()]).inc();
    ctx.close(Some(ws::CloseReason {
        code: close.code(),
        description: Some(reason.to_string()),
    }));
    ctx.stop();
}

/// Answers the client's close frame and stops the session.
pub fn echo_close(ctx: &mut WsContext, reason: Option<ws::CloseReason>) {
    ctx.close(reason);
    ctx.stop();
}

pub fn set_mailbox_capacity(ctx: &mut WsContext, capacity: usize) {
    ctx.set_mailbox_capacity(capacity);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backlog_is_what_was_queued_and_not_taken() {
        let meter = OutboundMeter::default();
        meter.queued(100);
        meter.queued(200);
        assert_eq!(meter.backlog(), 306);
        meter.taken(300);
        assert_eq!(meter.backlog(), 6);
        meter.taken(100);
        assert_eq!(meter.backlog(), 0);
    }
}
