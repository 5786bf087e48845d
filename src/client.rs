//! The client side of docs/protocol.md, written once: a WebSocket connection that sends
//! requests, serialized from the same [`Request`] type the server parses, and reads replies
//! and events as JSON, answering pings. rookery-cli, rookery-bench and the end-to-end tests are
//! built on it. Owns no server state; calls only the network.

use actix_codec::Framed;
use awc::ws::{self, Frame};
use awc::BoxedSocket;
use futures_util::{SinkExt, StreamExt};
use openssl::ssl::{SslConnector, SslConnectorBuilder, SslMethod, SslVerifyMode};
use openssl::x509::store::X509StoreBuilder;
use serde_json::Value;
use std::cell::OnceCell;
use std::net::IpAddr;
use std::rc::Rc;
use std::time::Duration;

use crate::client_tls::ResumingTls;
use crate::protocol::{Request, RequestFrame};

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect: {0}")]
    Connect(String),
    #[error("the server refused the upgrade with HTTP {0}")]
    Refused(u16),
    #[error("the connection closed (code {0:?})")]
    Closed(Option<u16>),
    #[error("websocket: {0}")]
    Protocol(String),
    #[error("timed out")]
    Timeout,
    #[error("the server sent a frame that is not JSON")]
    NotJson,
}

/// How to connect.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// Accept any certificate (the development self-signed one).
    pub insecure: bool,
    /// Also trust the certificates in this PEM file (a server's own cert.pem).
    pub ca_file: Option<std::path::PathBuf>,
    /// Sent as the Origin header.
    pub origin: Option<String>,
    /// Source address (e.g. 127.0.0.2), to spread many connections over several addresses.
    pub local_address: Option<IpAddr>,
    /// Largest frame accepted from the server.
    pub max_frame_bytes: Option<usize>,
    /// Connect and handshake timeout.
    pub timeout: Option<Duration>,
    /// More headers for the upgrade request (a proxy's `X-Forwarded-For`, in tests).
    pub headers: Vec<(String, String)>,
}

/// What the server sent.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// A reply (`ok` or `error`) to the request with `id`.
    Reply { id: String, frame: Value },
    /// An event (`message`, `joined`, ...), or a reply without an id.
    Event(Value),
}

/// One WebSocket connection speaking the protocol.
pub struct Connection {
    /// None once [`Connection::abandon`]ed.
    framed: Option<Framed<BoxedSocket, ws::Codec>>,
    /// The reason text of the server's close frame, once one came.
    close_reason: Option<String>,
}

/// The text frame of `request` with `id`: `{"id": id, "type": ..., ...fields}`.
pub fn request_frame(id: &str, request: &Request) -> String {
    RequestFrame { id, request }.to_text()
}

/// Opens connections with one set of options. Build it once and reuse it: setting up TLS
/// (loading the trust store) costs far more than a connection, and a `wss` connection resumes
/// the TLS session of the connector's last one to the same server.
#[derive(Clone)]
pub struct Connector {
    clients: Rc<Clients>,
    options: ConnectOptions,
}

/// Each built on first use: setting one up reads the system trust store.
#[derive(Default)]
struct Clients {
    /// For `ws` URLs.
    plain: OnceCell<awc::Client>,
    /// For `wss` URLs, through [`ResumingTls`] (so awc is given `ws` URLs and a TLS stream).
    tls: OnceCell<(awc::Client, ResumingTls)>,
}

impl Connector {
    pub fn new(options: &ConnectOptions) -> Result<Connector, ClientError> {
        Ok(Connector {
            clients: Rc::default(),
            options: options.clone(),
        })
    }

    /// How many of this connector's TLS handshakes resumed an earlier session.
    pub fn tls_resumed(&self) -> u64 {
        self.clients
            .tls
            .get()
            .map_or(0, |(_, resuming)| resuming.resumed())
    }

    fn plain_client(&self) -> awc::Client {
        self.clients
            .plain
            .get_or_init(|| http_client(&self.options, awc::Connector::new()))
            .clone()
    }

    fn tls_client(&self) -> Result<awc::Client, ClientError> {
        if let Some((client, _)) = self.clients.tls.get() {
            return Ok(client.clone());
        }
        let resuming = ResumingTls::new(ssl_connector(&self.options)?)
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        let connector = awc::Connector::new().connector(resuming.clone());
        let client = http_client(&self.options, connector);
        let _ = self.clients.tls.set((client.clone(), resuming));
        Ok(client)
    }

    pub async fn connect(&self, url: &str) -> Result<Connection, ClientError> {
        let (client, url) = match url.strip_prefix("wss://") {
            Some(rest) => (self.tls_client()?, format!("ws://{rest}")),
            None => (self.plain_client(), url.to_string()),
        };
        let mut request = client
            .ws(url)
            .max_frame_size(self.options.max_frame_bytes.unwrap_or(1 << 22));
        if let Some(origin) = &self.options.origin {
            request = request.origin(origin.as_str());
        }
        for (name, value) in &self.options.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        let (_, framed) = request.connect().await.map_err(|e| match e {
            awc::error::WsClientError::InvalidResponseStatus(status) => {
                ClientError::Refused(status.as_u16())
            }
            other => ClientError::Connect(other.to_string()),
        })?;
        Ok(Connection {
            framed: Some(framed),
            close_reason: None,
        })
    }
}

fn ssl_connector(options: &ConnectOptions) -> Result<SslConnectorBuilder, ClientError> {
    let mut ssl =
        SslConnector::builder(SslMethod::tls()).map_err(|e| ClientError::Connect(e.to_string()))?;
    if let Some(ca_file) = &options.ca_file {
        ssl.set_ca_file(ca_file)
            .map_err(|e| ClientError::Connect(format!("reading {}: {e}", ca_file.display())))?;
    }
    if options.insecure {
        ssl.set_verify(SslVerifyMode::NONE);
        // OpenSSL still builds the chain it will not check, searching the system trust store
        // (with OpenSSL 3, a scan of its directory) on every handshake: 10,000 reconnects spent
        // half a minute of the client's CPU there. An empty store answers at once.
        let empty = X509StoreBuilder::new().map_err(|e| ClientError::Connect(e.to_string()))?;
        ssl.set_cert_store(empty.build());
    }
    Ok(ssl)
}

fn http_client<S, Io>(options: &ConnectOptions, connector: awc::Connector<S>) -> awc::Client
where
    Io: actix_rt::net::ActixStream + std::fmt::Debug + 'static,
    S: actix_service::Service<
            actix_tls::connect::ConnectInfo<awc::http::Uri>,
            Response = actix_tls::connect::Connection<awc::http::Uri, Io>,
            Error = actix_tls::connect::ConnectError,
        > + Clone
        + 'static,
{
    let timeout = options.timeout.unwrap_or(Duration::from_secs(10));
    // Covers the TCP connection and, through `ResumingTls`, its TLS handshake: a server letting
    // a reconnect storm in queues handshakes.
    let mut connector = connector.limit(0).timeout(timeout);
    if let Some(addr) = options.local_address {
        connector = connector.local_address(addr);
    }
    awc::Client::builder()
        .connector(connector)
        .timeout(timeout)
        .finish()
}

impl Connection {
    /// One connection; for many, build a [`Connector`] once.
    pub async fn connect(url: &str, options: &ConnectOptions) -> Result<Connection, ClientError> {
        Connector::new(options)?.connect(url).await
    }

    /// Drops the socket without a close frame, as a network loss would; the connection
    /// answers `Closed` from then on.
    pub fn abandon(&mut self) {
        self.framed = None;
    }

    /// The reason the server gave in its close frame ("token revoked", ...), once it closed.
    pub fn close_reason(&self) -> Option<&str> {
        self.close_reason.as_deref()
    }

    fn framed(&mut self) -> Result<&mut Framed<BoxedSocket, ws::Codec>, ClientError> {
        self.framed.as_mut().ok_or(ClientError::Closed(None))
    }

    async fn send_message(&mut self, message: ws::Message) -> Result<(), ClientError> {
        self.framed()?
            .send(message)
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))
    }

    pub async fn send_text(&mut self, text: String) -> Result<(), ClientError> {
        self.send_message(ws::Message::Text(text.into())).await
    }

    /// Sends `request` with `id`; the reply carries the same id.
    pub async fn send_request(&mut self, id: &str, request: &Request) -> Result<(), ClientError> {
        self.send_text(request_frame(id, request)).await
    }

    /// Sends any JSON as a frame (for probing the server with what the types cannot express).
    pub async fn send_json(&mut self, frame: &Value) -> Result<(), ClientError> {
        self.send_text(frame.to_string()).await
    }

    pub async fn send_binary(&mut self, data: Vec<u8>) -> Result<(), ClientError> {
        self.send_message(ws::Message::Binary(data.into())).await
    }

    /// Starts the closing handshake.
    pub async fn send_close(&mut self) -> Result<(), ClientError> {
        self.send_message(ws::Message::Close(None)).await
    }

    /// The next JSON frame from the server, answering pings on the way. A close frame is
    /// `ClientError::Closed` with its code.
    pub async fn recv(&mut self) -> Result<Value, ClientError> {
        loop {
            let framed = self.framed()?;
            match framed.next().await {
                Some(Ok(Frame::Text(bytes))) => {
                    return serde_json::from_slice(&bytes).map_err(|_| ClientError::NotJson)
                }
                Some(Ok(Frame::Ping(data))) => {
                    let _ = framed.send(ws::Message::Pong(data)).await;
                }
                Some(Ok(Frame::Close(reason))) => {
                    let code = reason.as_ref().map(|r| u16::from(r.code));
                    self.close_reason = reason.and_then(|r| r.description);
                    return Err(ClientError::Closed(code));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(ClientError::Protocol(e.to_string())),
                None => return Err(ClientError::Closed(None)),
            }
        }
    }

    /// Like `recv`, sorted into replies and events.
    pub async fn next(&mut self) -> Result<Incoming, ClientError> {
        let frame = self.recv().await?;
        Ok(classify(frame))
    }

    /// Like `recv`, but gives up after `limit`.
    pub async fn recv_within(&mut self, limit: Duration) -> Result<Value, ClientError> {
        tokio::time::timeout(limit, self.recv())
            .await
            .map_err(|_| ClientError::Timeout)?
    }
}

/// How long to wait before each retry of a reconnect: exponential from `base` up to `cap`,
/// with full jitter (a random wait between zero and the step), so that thousands of clients
/// dropped at once do not come back in one wave and again in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The wait before the next retry.
    pub fn next_wait(&mut self) -> Duration {
        let step = self
            .base
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        let mut random = [0u8; 8];
        if openssl::rand::rand_bytes(&mut random).is_err() {
            return step;
        }
        let fraction = (u64::from_le_bytes(random) >> 11) as f64 / (1u64 << 53) as f64;
        step.mul_f64(fraction)
    }
}

/// Sorts a frame into a reply (it has a string id and type ok/error) or an event.
pub fn classify(frame: Value) -> Incoming {
    let is_reply = matches!(frame["type"].as_str(), Some("ok" | "error"));
    match (is_reply, frame["id"].as_str()) {
        (true, Some(id)) => Incoming::Reply {
            id: id.to_string(),
            frame,
        },
        _ => Incoming::Event(frame),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::RoomName;
    use serde_json::json;

    #[test]
    fn waits_grow_to_the_cap_and_are_spread() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let waits: Vec<Duration> = (0..12).map(|_| backoff.next_wait()).collect();
        for (i, wait) in waits.iter().enumerate() {
            let step = Duration::from_millis(100 << i.min(5)).min(Duration::from_secs(2));
            assert!(*wait <= step, "{i}: {wait:?} over {step:?}");
        }
        let distinct: std::collections::HashSet<Duration> = waits.into_iter().collect();
        assert!(distinct.len() > 6, "jittered: {distinct:?}");
    }

    #[test]
    fn requests_and_classification() {
        let send = Request::Post {
            room: RoomName::parse("a").unwrap(),
            body: "hi".into(),
            client_msg_id: None,
        };
        let frame: Value = serde_json::from_str(&request_frame("7", &send)).unwrap();
        assert_eq!(
            frame,
            json!({"id": "7", "type": "send", "room": "a", "body": "hi"})
        );
        assert!(matches!(
            classify(json!({"type": "ok", "id": "7"})),
            Incoming::Reply { .. }
        ));
        assert!(matches!(
            classify(json!({"type": "error", "id": null})),
            Incoming::Event(_)
        ));
        assert!(matches!(
            classify(json!({"type": "message", "seq": 1})),
            Incoming::Event(_)
        ));
    }
}
