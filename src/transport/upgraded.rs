//! Connections whose request asks for an upgrade (`Connection: upgrade`; in practice `GET
//! /ws`). The app answers such a request like any other, reading the connection's bytes as the
//! request's payload; this module writes its response and then the response body (for a
//! WebSocket, the session's frames) to the socket, and ends the connection when the body ends.
//!
//! actix-http's dispatcher would do the same with an 8 KiB read and an 8 KiB write buffer that
//! it keeps for the life of the connection. Here a read goes through a buffer on the stack and
//! the write buffer exists only while it holds bytes, so an idle WebSocket holds neither; what
//! is read goes to the session's decoder one frame at a time ([`Inbound`]). Calls nothing of
//! the crate.

use actix_codec::{AsyncRead, AsyncWrite, Encoder, Framed, ReadBuf};
use actix_http::body::{BoxBody, MessageBody};
use actix_http::error::PayloadError;
use actix_http::h1::{Codec, Message};
use actix_http::{BoxedPayloadStream, ConnectionType, Payload, Request, Response, StatusCode};
use actix_web::web::{Buf, Bytes, BytesMut};
use futures_util::Stream;
use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};
use tokio::time::{sleep, Sleep};

/// Bytes one read takes from the socket (at most a TLS record's plaintext).
const READ_CHUNK: usize = 16 * 1024;
/// Bytes of one frame held back before they are handed on in part: a frame the decoder would
/// refuse as too big still reaches it, and is refused, without being read in whole.
const HOLD_LIMIT: usize = 64 * 1024;
/// The response bytes gathered before they are written (actix-http's default).
const WRITE_HIGH_WATER: usize = 32 * 1024;

/// A connection's socket, shared by the payload (reading) and the writer.
type Shared<T> = Rc<RefCell<T>>;

/// Serves one upgrade request: `respond` is the app, called with the request whose payload is
/// the rest of the connection; its response goes to the socket until its body ends. After that
/// the socket is shut down (TLS close_notify, then FIN), waiting at most `linger` for the peer.
/// A connection the peer cuts is not an error.
pub fn serve<T, F, Fut>(
    req: Request,
    framed: Framed<T, Codec>,
    linger: Duration,
    respond: F,
) -> Upgraded<T, Fut>
where
    T: AsyncRead + AsyncWrite + Unpin + 'static,
    F: FnOnce(Request) -> Fut,
{
    let parts = framed.into_parts();
    let io: Shared<T> = Rc::new(RefCell::new(parts.io));
    let payload: BoxedPayloadStream = Box::pin(Inbound {
        io: io.clone(),
        // Copied out: the dispatcher's read buffer (8 KiB) goes with the request.
        held: BytesMut::from(&parts.read_buf[..]),
        rest_of_frame: 0,
        handed: false,
        ended: false,
    });
    let (req, _) = req.replace_payload(Payload::from(payload));
    let access = AccessLine::of(&req);
    Upgraded {
        access: Some(access),
        state: State::Answering(respond(req)),
        writer: Writer {
            io,
            codec: parts.codec,
            buf: parts.write_buf,
            body_bytes: 0,
            waited: false,
        },
        linger,
    }
}

/// An upgrade request being served. Written out as a state machine so that, for the life of a
/// WebSocket, it holds no more than the socket, the codec and the response body.
pub struct Upgraded<T, Fut> {
    /// Written when the response ends (or the connection is dropped before).
    access: Option<AccessLine>,
    state: State<Fut>,
    writer: Writer<T>,
    linger: Duration,
}

enum State<Fut> {
    /// The app works out its response.
    Answering(Fut),
    /// The response is written, then its body until the body ends.
    Writing(Option<BoxBody>),
    /// The socket is shut down, until the deadline.
    Closing(Pin<Box<Sleep>>),
}

impl<T, Fut> Future for Upgraded<T, Fut>
where
    T: AsyncRead + AsyncWrite + Unpin,
    Fut: Future<Output = Response<BoxBody>> + Unpin,
{
    type Output = Result<(), actix_web::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        loop {
            match &mut this.state {
                State::Answering(answer) => {
                    let response = ready!(Pin::new(answer).poll(cx));
                    if let Some(access) = &mut this.access {
                        access.status = response.status().as_u16();
                    }
                    this.state = match this.writer.start(response) {
                        Ok(body) => State::Writing(Some(body)),
                        Err(e) => {
                            log::debug!("an upgraded connection ended: {e}");
                            State::Closing(Box::pin(sleep(this.linger)))
                        }
                    };
                }
                State::Writing(body) => {
                    let written = this.writer.poll_body(cx, body);
                    if let Some(access) = &mut this.access {
                        access.bytes = this.writer.body_bytes;
                    }
                    if let Err(e) = ready!(written) {
                        log::debug!("an upgraded connection ended: {e}");
                    }
                    this.access = None;
                    this.state = State::Closing(Box::pin(sleep(this.linger)));
                }
                State::Closing(deadline) => {
                    if let Poll::Ready(shut) = this.writer.poll_shutdown(cx) {
                        if let Err(e) = shut {
                            log::debug!("an upgraded connection did not shut down cleanly: {e}");
                        }
                        return Poll::Ready(Ok(()));
                    }
                    ready!(deadline.as_mut().poll(cx));
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

/// An upgrade request's line in the access log, in the app's format (`server::ACCESS_LOG`:
/// peer, request line, status, bytes, seconds), written when dropped.
struct AccessLine {
    peer: Option<std::net::IpAddr>,
    request: String,
    started: Instant,
    status: u16,
    bytes: usize,
}

impl AccessLine {
    fn of(req: &Request) -> AccessLine {
        let uri = req.uri();
        let path = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
        AccessLine {
            peer: req.peer_addr().map(|a| a.ip()),
            request: format!("{} {path} {:?}", req.method(), req.version()),
            started: Instant::now(),
            status: 0,
            bytes: 0,
        }
    }
}

impl Drop for AccessLine {
    fn drop(&mut self) {
        let peer = self
            .peer
            .map_or_else(|| "-".to_owned(), |ip| ip.to_string());
        log::info!(
            target: "rookery::access",
            "{peer} \"{}\" {} {} {:.6}s",
            self.request,
            self.status,
            self.bytes,
            self.started.elapsed().as_secs_f64()
        );
    }
}

/// The socket's bytes as a request payload, handed on one WebSocket frame at a time: the
/// session's decoder (actix-web-actors) takes all a stream has ready before it decodes one
/// frame, and the session handles at most 16 frames per turn, so a stream that handed on all
/// it read would let a client that sends without pause grow the decoder's buffer without
/// bound. Here the next frame goes only once the decoder has asked again, and the socket is
/// read only when no whole frame is held: what a client sends waits in its own socket.
struct Inbound<T> {
    io: Shared<T>,
    /// Read and not yet handed on (at first, what came right behind the request head).
    held: BytesMut,
    /// Bytes still to come of a frame handed on in part.
    rest_of_frame: u64,
    /// A piece went out in the decoder's current call: the next poll says Pending.
    handed: bool,
    ended: bool,
}

impl<T: AsyncRead + Unpin> Inbound<T> {
    /// One read of the socket into `held`; Ready(false) at its end (or on an error: the
    /// connection is lost either way).
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        let Ok(mut io) = self.io.try_borrow_mut() else {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        };
        let mut space = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
        let mut buf = ReadBuf::uninit(&mut space);
        match ready!(Pin::new(&mut *io).poll_read(cx, &mut buf)) {
            Ok(()) if !buf.filled().is_empty() => {
                self.held.extend_from_slice(buf.filled());
                Poll::Ready(true)
            }
            Ok(()) => Poll::Ready(false),
            Err(e) => {
                log::debug!("reading an upgraded connection failed: {e}");
                Poll::Ready(false)
            }
        }
    }

    /// The next piece to hand on: a whole frame, the next part of a frame too big to hold, or
    /// at the end whatever is left.
    fn next_piece(&mut self) -> Option<Bytes> {
        if self.held.is_empty() {
            return None;
        }
        if self.rest_of_frame > 0 {
            let n = usize::try_from(self.rest_of_frame)
                .map_or(self.held.len(), |rest| rest.min(self.held.len()));
            self.rest_of_frame -= n as u64;
            return Some(self.take(n));
        }
        match frame_len(&self.held) {
            Some(len) if len <= self.held.len() as u64 => Some(self.take(len as usize)),
            Some(len) if self.held.len() >= HOLD_LIMIT || self.ended => {
                self.rest_of_frame = len - self.held.len() as u64;
                Some(self.take(self.held.len()))
            }
            None if self.ended => Some(self.take(self.held.len())),
            _ => None,
        }
    }

    fn take(&mut self, n: usize) -> Bytes {
        let piece = self.held.split_to(n).freeze();
        if self.held.is_empty() {
            // Nothing held: no allocation kept while the connection is idle.
            self.held = BytesMut::new();
        }
        piece
    }
}

impl<T: AsyncRead + Unpin> Stream for Inbound<T> {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.handed {
            this.handed = false;
            // Nothing more in this call; when nothing is held, wait for the socket.
            if this.held.is_empty() && !this.ended {
                if let Poll::Ready(false) = this.poll_read(cx) {
                    this.ended = true;
                }
            }
            if !this.held.is_empty() || this.ended {
                cx.waker().wake_by_ref();
            }
            return Poll::Pending;
        }
        loop {
            if let Some(piece) = this.next_piece() {
                this.handed = true;
                return Poll::Ready(Some(Ok(piece)));
            }
            if this.ended {
                return Poll::Ready(None);
            }
            if !ready!(this.poll_read(cx)) {
                this.ended = true;
            }
        }
    }
}

/// The length of the WebSocket frame `buf` starts with, once its header is in (RFC 6455
/// section 5.2: two bytes, an extended length of 2 or 8, a mask key of 4 if masked).
fn frame_len(buf: &[u8]) -> Option<u64> {
    let second = *buf.get(1)?;
    let (header, payload) = match second & 0x7f {
        126 => (
            4,
            u64::from(u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?)),
        ),
        127 => (10, u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?)),
        short => (2, u64::from(short)),
    };
    let head = header + if second & 0x80 != 0 { 4 } else { 0 };
    (buf.len() >= head).then(|| (head as u64).saturating_add(payload))
}

/// Writes a response to the socket, encoded by actix-http's codec (for a 101 the body's bytes
/// go as they are).
struct Writer<T> {
    io: Shared<T>,
    codec: Codec,
    /// Encoded bytes not yet written; holds no allocation while empty.
    buf: BytesMut,
    /// The body's bytes taken so far.
    body_bytes: usize,
    /// Whether the bytes in `buf` have waited one turn of the worker for more to join them.
    waited: bool,
}

impl<T: AsyncWrite + Unpin> Writer<T> {
    /// Encodes the response's head; the body is for [`Writer::poll_body`].
    fn start(&mut self, response: Response<BoxBody>) -> io::Result<BoxBody> {
        let (mut head, body) = response.into_parts();
        if head.status() != StatusCode::SWITCHING_PROTOCOLS {
            // Refused, or not a WebSocket: answered, and the connection ends with the answer.
            head.head_mut().set_connection_type(ConnectionType::Close);
        }
        self.codec
            .encode(Message::Item((head, body.size())), &mut self.buf)?;
        Ok(body)
    }

    /// Gathers what the body has ready and writes it, until the body ends and all is written.
    fn poll_body(
        &mut self,
        cx: &mut Context<'_>,
        body: &mut Option<BoxBody>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut waiting = false;
            while let Some(open) = body.as_mut() {
                if self.buf.len() >= WRITE_HIGH_WATER {
                    break;
                }
                match Pin::new(open).poll_next(cx) {
                    Poll::Ready(Some(Ok(chunk))) => {
                        self.body_bytes += chunk.len();
                        self.codec
                            .encode(Message::Chunk(Some(chunk)), &mut self.buf)?
                    }
                    Poll::Ready(Some(Err(e))) => {
                        return Poll::Ready(Err(io::Error::other(e.to_string())))
                    }
                    Poll::Ready(None) => {
                        self.codec.encode(Message::Chunk(None), &mut self.buf)?;
                        *body = None;
                    }
                    Poll::Pending => {
                        waiting = true;
                        break;
                    }
                }
            }
            if waiting && !self.waited && !self.buf.is_empty() && self.buf.len() < WRITE_HIGH_WATER
            {
                // Let the worker's other ready tasks (the sessions of the same room, fed the
                // same messages) run first: what reaches this session meanwhile goes out in
                // the same TLS record and write, instead of one small record each.
                self.waited = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            self.waited = false;
            ready!(self.poll_write(cx))?;
            if body.is_none() {
                return Poll::Ready(Ok(()));
            }
            if waiting {
                return Poll::Pending;
            }
        }
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.io.try_borrow_mut() {
            Ok(mut io) => Pin::new(&mut *io).poll_shutdown(cx),
            Err(_) => Poll::Ready(Ok(())),
        }
    }

    /// Writes all of `buf` and flushes; then lets its allocation go.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Ok(mut io) = self.io.try_borrow_mut() else {
            return Poll::Ready(Err(io::Error::other("the socket is busy reading")));
        };
        while !self.buf.is_empty() {
            match ready!(Pin::new(&mut *io).poll_write(cx, &self.buf))? {
                0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                n => self.buf.advance(n),
            }
        }
        self.buf = BytesMut::new();
        Pin::new(&mut *io).poll_flush(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(payload_len: usize) -> Vec<u8> {
        let mut frame = vec![0x81];
        match payload_len {
            0..=125 => frame.push(0x80 | payload_len as u8),
            126..=65535 => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(payload_len as u16).to_be_bytes());
            }
            _ => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(payload_len as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&[1, 2, 3, 4]);
        frame.resize(frame.len() + payload_len, b'x');
        frame
    }

    #[test]
    fn a_frame_is_as_long_as_its_header_says_once_the_header_is_in() {
        assert_eq!(frame_len(&masked(5)), Some(2 + 4 + 5));
        assert_eq!(frame_len(&masked(300)), Some(4 + 4 + 300));
        assert_eq!(frame_len(&masked(70_000)), Some(10 + 4 + 70_000));
        assert_eq!(frame_len(&[0x81, 0x05]), Some(2 + 5), "unmasked");
        assert_eq!(frame_len(&[0x81]), None);
        assert_eq!(
            frame_len(&masked(300)[..5]),
            None,
            "extended length in, mask key not"
        );
        let huge = [
            0x82, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4,
        ];
        assert_eq!(frame_len(&huge), Some(u64::MAX), "saturates");
    }

    fn inbound(early: &[u8]) -> (Inbound<tokio::io::DuplexStream>, tokio::io::DuplexStream) {
        let (io, peer) = tokio::io::duplex(256 * 1024);
        let inbound = Inbound {
            io: Rc::new(RefCell::new(io)),
            held: BytesMut::from(early),
            rest_of_frame: 0,
            handed: false,
            ended: false,
        };
        (inbound, peer)
    }

    fn poll(inbound: &mut Inbound<tokio::io::DuplexStream>) -> Poll<Option<usize>> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        Pin::new(inbound)
            .poll_next(&mut cx)
            .map(|piece| piece.map(|p| p.map_or(0, |b| b.len())))
    }

    /// The decoder is handed one frame per call, whatever the socket holds.
    #[actix_rt::test]
    async fn frames_are_handed_on_one_per_call_of_the_decoder() {
        let mut early = masked(3);
        early.extend(masked(200));
        early.extend(&masked(10)[..4]);
        let (mut inbound, mut peer) = inbound(&early);
        assert_eq!(poll(&mut inbound), Poll::Ready(Some(9)));
        assert_eq!(
            poll(&mut inbound),
            Poll::Pending,
            "the decoder's loop ends here"
        );
        assert_eq!(poll(&mut inbound), Poll::Ready(Some(208)));
        assert_eq!(poll(&mut inbound), Poll::Pending);
        assert_eq!(
            poll(&mut inbound),
            Poll::Pending,
            "the third frame is not in whole"
        );
        use tokio::io::AsyncWriteExt;
        peer.write_all(&masked(10)[4..]).await.unwrap();
        peer.write_all(&masked(1)).await.unwrap();
        drop(peer);
        assert_eq!(poll(&mut inbound), Poll::Ready(Some(16)));
        assert_eq!(poll(&mut inbound), Poll::Pending);
        assert_eq!(poll(&mut inbound), Poll::Ready(Some(7)));
        assert_eq!(poll(&mut inbound), Poll::Pending);
        assert_eq!(poll(&mut inbound), Poll::Ready(None));
    }

    /// A frame longer than what is held back goes on in parts, so the decoder sees (and
    /// refuses) a frame over its size limit without the frame being read in whole.
    #[actix_rt::test]
    async fn a_frame_too_big_to_hold_goes_on_in_parts() {
        let (mut inbound, mut peer) = inbound(&masked(1 << 30)[..14]);
        use tokio::io::AsyncWriteExt;
        let mut sent = 0;
        let mut handed = 0;
        while handed == 0 {
            peer.write_all(&[b'x'; 16 * 1024]).await.unwrap();
            sent += 16 * 1024;
            if let Poll::Ready(Some(n)) = poll(&mut inbound) {
                handed = n;
            }
            assert!(sent <= 2 * HOLD_LIMIT, "held back without bound");
        }
        assert!(handed >= HOLD_LIMIT);
        assert_eq!(poll(&mut inbound), Poll::Pending);
        peer.write_all(b"yyyy").await.unwrap();
        assert_eq!(
            poll(&mut inbound),
            Poll::Ready(Some(4)),
            "the rest goes as it comes"
        );
    }

    /// What each WebSocket keeps for its life besides its session: the app's future is boxed
    /// and gone once answered, and no buffer is held inline.
    #[actix_rt::test]
    async fn an_upgraded_connection_holds_little() {
        let (io, _peer) = tokio::io::duplex(64);
        let serving = serve(
            Request::new(),
            Framed::new(io, Codec::default()),
            Duration::from_secs(1),
            |_req| Box::pin(async { Response::ok().map_into_boxed_body() }),
        );
        let size = std::mem::size_of_val(&serving);
        assert!(size <= 256, "{size} bytes");
    }
}
