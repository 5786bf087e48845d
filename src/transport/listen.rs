//! The listening side: accepts connections on a socket the caller bound, bounds the
//! handshakes in progress (in all, and per client address: [`Handshakes`]), runs TLS and
//! HTTP/1.1 and hands requests to the app. Built on actix-server and actix-http directly
//! because actix-web's `HttpServer` has no place to act between accept and TLS, where a
//! client that opens connections and never finishes their handshakes must be stopped; and
//! because actix-http's dispatcher keeps 16 KiB of buffers for each WebSocket, so a request
//! that asks for an upgrade goes to [`super::upgraded`] instead. Calls nothing of the crate but
//! those two modules of the transport.

use actix_codec::{AsyncRead, AsyncWrite, Framed};
use actix_http::body::BoxBody;
use actix_http::{h1, HttpServiceBuilder, Request, Response};
use actix_service::{map_config, IntoServiceFactory, ServiceFactoryExt};
use actix_tls::accept::openssl::{Acceptor, TlsStream};
use actix_tls::accept::TlsError;
use actix_web::body::MessageBody;
use actix_web::dev::{fn_factory, fn_service, AppConfig, Extensions, Service, ServiceFactory};
use actix_web::rt::net::TcpStream;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::address::limit_key;
use super::upgraded;

/// How the server listens.
#[derive(Debug, Clone)]
pub struct ListenSettings {
    /// Worker threads; 0 for one per core.
    pub workers: usize,
    pub max_connections_per_worker: usize,
    /// TLS handshakes in progress at once, over all workers.
    pub max_concurrent_handshakes: usize,
    /// Connections of one client address still in the TLS or HTTP handshake.
    pub max_handshakes_per_ip: usize,
    pub tls_handshake_timeout: Duration,
    pub request_timeout: Duration,
    pub disconnect_timeout: Duration,
    pub keep_alive: Duration,
    pub shutdown_timeout: Duration,
    /// Data a client leaves unacknowledged this long ends its connection (TCP_USER_TIMEOUT).
    pub unread_limit: Duration,
}

/// The connections of each client address (by [`limit_key`]) that are still in the
/// handshake: from accept until TLS is done and the first request has been answered (for a
/// WebSocket, the upgrade). Shared by all workers.
#[derive(Debug)]
pub struct Handshakes {
    per_ip: usize,
    pending: Mutex<HashMap<IpAddr, usize>>,
}

impl Handshakes {
    pub fn new(per_ip: usize) -> Arc<Handshakes> {
        Arc::new(Handshakes {
            per_ip,
            pending: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for a new connection from `ip`, or None when it has too many in the handshake.
    pub fn enter(self: &Arc<Self>, ip: IpAddr) -> Option<HandshakeSlot> {
        let ip = limit_key(ip);
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let count = pending.entry(ip).or_default();
        if *count >= self.per_ip {
            return None;
        }
        *count += 1;
        Some(HandshakeSlot {
            handshakes: self.clone(),
            ip,
        })
    }

    fn leave(&self, ip: IpAddr) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = pending.get_mut(&ip) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                pending.remove(&ip);
            }
        }
    }

    #[cfg(test)]
    fn pending(&self, ip: IpAddr) -> usize {
        let pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.get(&limit_key(ip)).copied().unwrap_or(0)
    }
}

/// One connection's place among its address's handshakes, given back when dropped.
#[derive(Debug)]
pub struct HandshakeSlot {
    handshakes: Arc<Handshakes>,
    ip: IpAddr,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.handshakes.leave(self.ip);
    }
}

/// A connection's handshake slot once TLS is done, in the connection's data: the upgrade
/// handler gives it back ([`HandshakeDone::finish`]); otherwise it goes with the connection.
pub struct HandshakeDone(Cell<Option<HandshakeSlot>>);

impl HandshakeDone {
    pub fn finish(&self) {
        drop(self.0.take());
    }
}

/// Who writes a request's access line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessLog {
    /// The app (its Logger), once the response is done: requests actix-http's dispatcher serves.
    App,
    /// The transport, when the connection ends: upgrade requests ([`upgraded`]), for which the
    /// Logger would keep its rendered line for the life of each WebSocket.
    Transport,
}

/// Per worker: the slots of connections accepted and not yet through TLS, by peer address.
type Pending = Rc<RefCell<HashMap<SocketAddr, HandshakeSlot>>>;

/// Serves `app` on `listener` (TLS when `tls` is given) until the returned server is stopped.
/// `app` is built twice per worker: for the requests actix-http's dispatcher serves, and for
/// upgrade requests, each time told who writes the access line.
pub fn serve<F, I, S, B>(
    listener: std::net::TcpListener,
    tls: Option<openssl::ssl::SslAcceptor>,
    settings: &ListenSettings,
    app: F,
) -> std::io::Result<actix_server::Server>
where
    F: Fn(AccessLog) -> I + Send + Clone + 'static,
    I: IntoServiceFactory<S, Request>,
    S: ServiceFactory<Request, Config = AppConfig> + 'static,
    S::Error: Into<actix_web::Error> + 'static,
    S::InitError: fmt::Debug,
    S::Response: Into<Response<B>> + 'static,
    <S::Service as Service<Request>>::Future: 'static,
    S::Service: 'static,
    B: MessageBody + 'static,
{
    let workers = match settings.workers {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    };
    // actix-tls counts the handshakes of each worker thread.
    actix_tls::accept::max_concurrent_tls_connect(
        settings.max_concurrent_handshakes.div_ceil(workers).max(1),
    );
    let addr = listener.local_addr()?;
    let handshakes = Handshakes::new(settings.max_handshakes_per_ip);
    let builder = actix_server::Server::build()
        .workers(workers)
        .max_concurrent_connections(settings.max_connections_per_worker)
        .shutdown_timeout(settings.shutdown_timeout.as_secs().max(1))
        .disable_signals();
    let name = format!("rookery-{addr}");
    let settings = settings.clone();
    let builder = match tls {
        Some(acceptor) => builder.listen(name, listener, move || {
            let pending = Pending::default();
            let took_over = took_over(pending.clone(), settings.unread_limit);
            let http = http_builder::<TlsStream<TcpStream>, _>(&settings, addr)
                .upgrade(upgrades(
                    app_service(&app, AccessLog::Transport),
                    settings.disconnect_timeout,
                ))
                .on_connect_ext(move |io: &TlsStream<TcpStream>, data: &mut Extensions| {
                    took_over(io, io.get_ref(), data)
                })
                .h1(app_service(&app, AccessLog::App));
            let mut tls = Acceptor::new(acceptor.clone());
            tls.set_handshake_timeout(settings.tls_handshake_timeout);
            let inner = tls
                .map_err(TlsError::into_service_error)
                .map(|io: TlsStream<TcpStream>| {
                    let peer = io.get_ref().peer_addr().ok();
                    (io, peer)
                })
                .and_then(http.map_err(TlsError::Service));
            guarded(inner, handshakes.clone(), pending)
        })?,
        None => builder.listen(name, listener, move || {
            let pending = Pending::default();
            let took_over = took_over(pending.clone(), settings.unread_limit);
            let inner = http_builder::<TcpStream, _>(&settings, addr)
                .upgrade(upgrades(
                    app_service(&app, AccessLog::Transport),
                    settings.disconnect_timeout,
                ))
                .on_connect_ext(move |io: &TcpStream, data: &mut Extensions| {
                    took_over(io, io, data)
                })
                .h1(app_service(&app, AccessLog::App))
                .tcp();
            guarded(inner, handshakes.clone(), pending)
        })?,
    };
    Ok(builder.run())
}

fn http_builder<T, S>(settings: &ListenSettings, addr: SocketAddr) -> HttpServiceBuilder<T, S>
where
    S: ServiceFactory<Request, Config = ()>,
    S::Error: Into<Response<BoxBody>> + 'static,
    S::InitError: fmt::Debug,
    <S::Service as Service<Request>>::Future: 'static,
{
    HttpServiceBuilder::default()
        .keep_alive(settings.keep_alive)
        .client_request_timeout(settings.request_timeout)
        .client_disconnect_timeout(settings.disconnect_timeout)
        .local_addr(addr)
}

/// The app as actix-http serves it, its errors as responses.
fn app_service<F, I, S, B>(
    app: &F,
    access_log: AccessLog,
) -> impl ServiceFactory<
    Request,
    Config = (),
    Response = S::Response,
    Error = actix_web::HttpResponse,
    InitError = S::InitError,
    Service = impl Service<
        Request,
        Response = S::Response,
        Error = actix_web::HttpResponse,
        Future = impl Future<Output = Result<S::Response, actix_web::HttpResponse>> + 'static,
    > + 'static,
>
where
    F: Fn(AccessLog) -> I,
    I: IntoServiceFactory<S, Request>,
    S: ServiceFactory<Request, Config = AppConfig>,
    S::Error: Into<actix_web::Error> + 'static,
    S::Response: Into<Response<B>> + 'static,
    S::Service: 'static,
    <S::Service as Service<Request>>::Future: 'static,
{
    let app = app(access_log)
        .into_factory()
        .map_err(|e: S::Error| e.into().error_response());
    // The app reads neither the config's host nor its scheme (the Origin check works them out
    // from the request and the listener itself).
    map_config(app, |_| AppConfig::default())
}

/// The app for the requests that ask for an upgrade: each is served by [`upgraded::serve`],
/// its connection ending with the response; `linger` bounds the shutdown after it.
fn upgrades<T, A, B>(
    app: A,
    linger: Duration,
) -> impl ServiceFactory<
    (Request, Framed<T, h1::Codec>),
    Config = (),
    Response = (),
    Error = actix_web::Error,
    InitError = A::InitError,
>
where
    T: AsyncRead + AsyncWrite + Unpin + 'static,
    A: ServiceFactory<Request, Config = (), Error = actix_web::HttpResponse>,
    A::Response: Into<Response<B>> + 'static,
    A::Service: 'static,
    B: MessageBody + 'static,
{
    fn_factory(move || {
        let started = app.new_service(());
        async move {
            let service = Rc::new(started.await?);
            Ok(fn_service(
                move |(req, framed): (Request, Framed<T, h1::Codec>)| {
                    let service = service.clone();
                    // Both boxed, so that an upgraded connection keeps only what it still needs:
                    // the app's future is gone once it has answered.
                    Box::pin(upgraded::serve(req, framed, linger, |req| {
                        Box::pin(async move {
                            match service.call(req).await {
                                Ok(response) => response.into().map_into_boxed_body(),
                                Err(refused) => refused.into(),
                            }
                        })
                    }))
                },
            ))
        }
    })
}

/// Called for every new connection (TLS or plain). A client that stops reading stops the
/// connection's writes, and with them its session actor (actix runs a WebSocket actor as the
/// response body, polled only while the socket takes bytes), timers and all: no heartbeat can
/// fire. The kernel ends such a connection instead: with TCP_USER_TIMEOUT, data the client
/// leaves unacknowledged (its window closed) for `unread_limit` aborts the connection, whose
/// session then stops as for any lost connection.
fn on_connect(connection: &dyn std::any::Any, unread_limit: Duration) {
    type Tls = actix_tls::accept::openssl::TlsStream<actix_web::rt::net::TcpStream>;
    let tcp = match connection.downcast_ref::<Tls>() {
        Some(tls) => tls.get_ref(),
        None => match connection.downcast_ref::<actix_web::rt::net::TcpStream>() {
            Some(tcp) => tcp,
            None => return,
        },
    };
    if let Err(e) = socket2::SockRef::from(tcp).set_tcp_user_timeout(Some(unread_limit)) {
        log::warn!("could not bound a new connection's unread data (TCP_USER_TIMEOUT): {e}");
    }
}

/// What a connection's `on_connect` does once TLS is done: bound how long it may leave data
/// unread, and move its handshake slot from `pending` into its data (see [`HandshakeDone`]).
fn took_over(
    pending: Pending,
    unread_limit: Duration,
) -> impl Fn(&dyn std::any::Any, &TcpStream, &mut Extensions) + Clone {
    move |io, tcp, data| {
        on_connect(io, unread_limit);
        let slot = tcp
            .peer_addr()
            .ok()
            .and_then(|peer| pending.borrow_mut().remove(&peer));
        data.insert(HandshakeDone(Cell::new(slot)));
    }
}

/// `inner` behind the handshake bound of each client address: a connection over it is
/// closed at once; one under it holds a slot until `on_connect` takes it over (TLS done), or
/// until it ends. Every connection is set TCP_NODELAY (the builder's `tcp_nodelay` is applied
/// by actix-http's combined HTTP/1+2 service only, not by the HTTP/1 one served here).
fn guarded<T>(
    inner: T,
    handshakes: Arc<Handshakes>,
    pending: Pending,
) -> impl ServiceFactory<TcpStream, Config = (), Response = (), Error = T::Error, InitError = T::InitError>
where
    T: ServiceFactory<TcpStream, Config = (), Response = ()>,
    T::Service: 'static,
    T::Future: 'static,
{
    fn_factory(move || {
        let started = inner.new_service(());
        let handshakes = handshakes.clone();
        let pending = pending.clone();
        async move {
            let service = Rc::new(started.await?);
            Ok(fn_service(move |io: TcpStream| {
                // Small frames must not wait for Nagle's algorithm (40 ms with delayed ACKs).
                if let Err(e) = io.set_nodelay(true) {
                    log::debug!("TCP_NODELAY not set on a connection: {e}");
                }
                let service = service.clone();
                let pending = pending.clone();
                let peer = io.peer_addr().ok();
                let admitted = match peer {
                    Some(peer) => match handshakes.enter(peer.ip()) {
                        Some(slot) => {
                            pending.borrow_mut().insert(peer, slot);
                            true
                        }
                        None => false,
                    },
                    None => true,
                };
                async move {
                    if !admitted {
                        log::debug!("closed a connection from {peer:?}: too many in the handshake");
                        return Ok(());
                    }
                    let served = service.call(io).await;
                    if let Some(peer) = peer {
                        pending.borrow_mut().remove(&peer);
                    }
                    served
                }
            }))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[actix_web::test]
    async fn every_connection_is_set_nodelay() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (seen, nodelay) = tokio::sync::oneshot::channel();
        let seen = Rc::new(Cell::new(Some(seen)));
        let inner = fn_factory(move || {
            let seen = seen.clone();
            async move {
                Ok::<_, ()>(fn_service(move |io: TcpStream| {
                    if let Some(seen) = seen.take() {
                        let _ = seen.send(io.nodelay().unwrap());
                    }
                    async { Ok::<(), ()>(()) }
                }))
            }
        });
        let service = guarded(inner, Handshakes::new(4), Pending::default())
            .new_service(())
            .await
            .unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        accepted.set_nonblocking(true).unwrap();
        let accepted = TcpStream::from_std(accepted).unwrap();
        assert!(!accepted.nodelay().unwrap(), "the kernel's default");
        service.call(accepted).await.unwrap();
        assert!(nodelay.await.unwrap(), "the service sees TCP_NODELAY set");
    }

    #[test]
    fn each_address_has_its_handshake_slots() {
        let handshakes = Handshakes::new(2);
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let first = handshakes.enter(a).unwrap();
        let second = handshakes.enter(a).unwrap();
        assert!(handshakes.enter(a).is_none());
        assert!(
            handshakes.enter(b).is_some(),
            "another address is not affected"
        );
        drop(first);
        let done = HandshakeDone(Cell::new(Some(handshakes.enter(a).unwrap())));
        assert_eq!(handshakes.pending(a), 2);
        done.finish();
        drop(second);
        assert_eq!(handshakes.pending(a), 0);
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        let _x = handshakes.enter(v6).unwrap();
        let _y = handshakes.enter("2001:db8::2".parse().unwrap()).unwrap();
        assert!(
            handshakes.enter("2001:db8::3".parse().unwrap()).is_none(),
            "one /64"
        );
    }
}
