//! The protocol client's TLS ([`crate::client`] only): connections that resume the TLS session
//! the server issued on an earlier connection, as browsers and mobile TLS stacks do on
//! reconnect. A resumed handshake skips the certificate and its signature, about half of a full
//! handshake's CPU on both sides, which is what a reconnect storm is made of. awc's own TLS
//! layer cannot hand a saved session to a new connection, so this one takes the place of awc's
//! TCP connector and awc sees a plain stream. Calls only the network.

use actix_rt::net::{ActixStream, Ready};
use actix_service::Service;
use actix_tls::connect::{
    ConnectError, ConnectInfo, Connection as TcpConnection, Connector, ConnectorService,
};
use awc::http::Uri;
use futures_util::future::LocalBoxFuture;
use openssl::ex_data::Index;
use openssl::ssl::{Ssl, SslConnector, SslConnectorBuilder, SslSession, SslSessionCacheMode};
use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_openssl::SslStream;

/// The latest session each server (`host:port`) issued, and how many handshakes resumed one.
/// Sessions are kept encoded: OpenSSL marks a connection's session object not resumable when
/// the connection ends without a TLS close, which is how a dropped connection ends.
#[derive(Default)]
struct Sessions {
    by_server: Mutex<HashMap<String, Vec<u8>>>,
    resumed: AtomicU64,
}

/// Where a connection keeps the name of its server, for the new-session callback. One index for
/// the process: OpenSSL never frees them.
fn server_key() -> Result<Index<Ssl, String>, openssl::error::ErrorStack> {
    static KEY: OnceLock<Result<Index<Ssl, String>, openssl::error::ErrorStack>> = OnceLock::new();
    KEY.get_or_init(Ssl::new_ex_index).clone()
}

/// TCP, then TLS offering the server's saved session.
#[derive(Clone)]
pub struct ResumingTls {
    tcp: ConnectorService,
    tls: SslConnector,
    sessions: Arc<Sessions>,
    server_key: Index<Ssl, String>,
}

impl ResumingTls {
    /// Keeps the sessions that connections of `builder` are issued.
    pub fn new(
        mut builder: SslConnectorBuilder,
    ) -> Result<ResumingTls, openssl::error::ErrorStack> {
        let sessions = Arc::new(Sessions::default());
        let server_key = server_key()?;
        builder.set_session_cache_mode(SslSessionCacheMode::CLIENT);
        // As on the server (`tls::acceptor`): one socket read per burst instead of three per record.
        builder.set_read_ahead(true);
        let kept = Arc::downgrade(&sessions);
        // TLS 1.3 tickets arrive after the handshake; each replaces the server's last one.
        builder.set_new_session_callback(move |ssl, session| {
            let (Some(sessions), Some(server)) = (kept.upgrade(), ssl.ex_data(server_key)) else {
                return;
            };
            let Ok(encoded) = session.to_der() else {
                return;
            };
            if let Ok(mut by_server) = sessions.by_server.lock() {
                by_server.insert(server.clone(), encoded);
            };
        });
        Ok(ResumingTls {
            tcp: Connector::default().service(),
            tls: builder.build(),
            sessions,
            server_key,
        })
    }

    /// Handshakes so far that resumed a saved session.
    pub fn resumed(&self) -> u64 {
        self.sessions.resumed.load(Ordering::Relaxed)
    }

    async fn handshake(self, stream: TcpStream, host: String, port: u16) -> io::Result<TlsIo> {
        let server = format!("{host}:{port}");
        let mut ssl = self
            .tls
            .configure()
            .map_err(io::Error::other)?
            .into_ssl(&host)
            .map_err(io::Error::other)?;
        let saved = self
            .sessions
            .by_server
            .lock()
            .ok()
            .and_then(|by_server| by_server.get(&server).cloned())
            .and_then(|encoded| SslSession::from_der(&encoded).ok());
        if let Some(session) = saved {
            // SAFETY: every saved session was issued to a connection of this same context
            // (`self.tls`), which is what `SSL_set_session` requires.
            unsafe { ssl.set_session(&session) }.map_err(io::Error::other)?;
        }
        ssl.set_ex_data(self.server_key, server);
        let mut stream = SslStream::new(ssl, stream).map_err(io::Error::other)?;
        Pin::new(&mut stream)
            .connect()
            .await
            .map_err(|e| io::Error::other(e.to_string()))?;
        if stream.ssl().session_reused() {
            self.sessions.resumed.fetch_add(1, Ordering::Relaxed);
        }
        Ok(TlsIo(stream))
    }
}

impl Service<ConnectInfo<Uri>> for ResumingTls {
    type Response = TcpConnection<Uri, TlsIo>;
    type Error = ConnectError;
    type Future = LocalBoxFuture<'static, Result<Self::Response, ConnectError>>;

    actix_service::always_ready!();

    fn call(&self, info: ConnectInfo<Uri>) -> Self::Future {
        let this = self.clone();
        let (host, port) = (info.hostname().to_string(), info.port());
        let tcp = self.tcp.call(info);
        Box::pin(async move {
            let (stream, uri) = tcp.await?.into_parts();
            // A request must not wait for the ACK of the one before (Nagle's algorithm).
            stream.set_nodelay(true).map_err(ConnectError::Io)?;
            let io = this
                .handshake(stream, host, port)
                .await
                .map_err(ConnectError::Io)?;
            Ok(TcpConnection::new(uri, io))
        })
    }
}

/// A client TLS stream as awc takes a connection's stream.
#[derive(Debug)]
pub struct TlsIo(SslStream<TcpStream>);

impl AsyncRead for TlsIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl ActixStream for TlsIo {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<Ready>> {
        ActixStream::poll_read_ready(self.0.get_ref(), cx)
    }

    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<Ready>> {
        ActixStream::poll_write_ready(self.0.get_ref(), cx)
    }
}
