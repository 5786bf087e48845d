//! Bring-up and serving: prepares the database (create, migrate), the message keys and TLS;
//! starts the DB-executor pool, Presence, the room Directory and the rest of the actors; serves
//! `GET /ws` and `GET /healthz` on a listener the caller bound (tests bind port 0) until the
//! shutdown future the caller gives resolves ([`run`]). Nothing imports this module but the
//! command line.

use actix::prelude::*;
use actix_web::{http::header, middleware, web, App, HttpResponse};
use std::future::Future;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use crate::actors::cluster::{self, CheckRedis, Cluster, ClusterSettings};
use crate::actors::committer::Committer;
use crate::actors::db::{DbExecutor, DbQueue, DbSettings};
use crate::actors::directory::{Directory, DirectorySettings, DirectoryStore};
use crate::actors::gate::{DrainAll, Gate, GateSettings};
use crate::actors::hasher::HasherHandle;
use crate::actors::presence::{Presence, PresenceHandle};
use crate::actors::room::{ClusterLink, RoomSettings, StoreHandle};
use crate::config::{ms, Config, Registration};
use crate::crypto::Keyring;
use crate::error::{ConfigError, ConfigProblem, StartError};
use crate::ids::SessionIds;
use crate::policy::Policies;
use crate::rate::SharedBuckets;
use crate::reload::{self, PolicySource};
use crate::session::guard::GuardSettings;
use crate::session::{Services, SessionSettings};
use crate::store::{self, PgPool};
use crate::transport::address::TrustedProxies;
use crate::transport::listen::{self, AccessLog, ListenSettings};
use crate::transport::ws::{self as transport, Transport};

/// Everything the server needs that takes blocking work to get.
pub struct Prepared {
    pub config: Config,
    pub pool: PgPool,
    pub keys: Arc<Keyring>,
    pub tls: Option<openssl::ssl::SslAcceptorBuilder>,
    /// The room policy file, read and checked; its rooms exist in the database.
    pub policies: Arc<Policies>,
}

/// Creates the database if missing and runs pending migrations. Blocking.
pub fn migrate(config: &Config) -> Result<usize, StartError> {
    let url = config.database.url.expose();
    store::wait_for_server(url, ms(config.database.start_retry_ms))?;
    store::ensure_database(url)?;
    let pool = store::connect_pool(
        url,
        1,
        ms(config.database.connect_timeout_ms),
        Duration::from_secs(600),
    )?;
    let mut conn = pool.get().map_err(store_unavailable)?;
    Ok(store::run_migrations(&mut conn)?)
}

/// An ack promises that the message survives a crash of Postgres: refuse to serve when
/// commits return before their WAL is flushed (`off`), or before a synchronous standby has it
/// (`local`, `remote_write`).
fn require_durable_commits(conn: &mut store::PooledConn) -> Result<(), StartError> {
    let setting = store::synchronous_commit(conn)?;
    if matches!(setting.as_str(), "on" | "remote_apply") {
        Ok(())
    } else {
        Err(StartError::NotDurable(setting))
    }
}

fn store_unavailable(e: impl std::fmt::Display) -> StartError {
    StartError::Store(crate::error::StoreError::Unavailable(e.to_string()))
}

/// Migrates, loads keys and TLS material. Blocking; call before starting the actors.
pub fn prepare(config: Config) -> Result<Prepared, StartError> {
    let applied = migrate(&config)?;
    if applied > 0 {
        log::info!("applied {applied} migration(s)");
    }
    let pool = store::connect_pool(
        config.database.url.expose(),
        u32::try_from(config.database.executors + config.database.commits_in_flight).unwrap_or(128),
        ms(config.database.connect_timeout_ms),
        ms(config.database.statement_timeout_ms),
    )?;
    let mut conn = pool.get().map_err(store_unavailable)?;
    require_durable_commits(&mut conn)?;
    let key_file = config.key_file();
    let recorded = store::recorded_keys(&mut conn)?;
    let keys = Arc::new(Keyring::load(&config.key_source(&key_file), &recorded)?);
    store::record_keys(&mut conn, &keys.verify(&recorded)?)?;
    keys.record_usage(&store::key_usage(&mut conn, &keys.ids())?);
    let policies = PolicySource::of(&config)
        .load()
        .map_err(|problems| StartError::Config(ConfigError::Invalid(problems)))?;
    let closed = store::sync_config_rooms(&mut conn, &reload::defined_rooms(&policies))?;
    drop(conn);
    log::info!(
        "room policies: {} room(s) defined by {}{}",
        policies.rooms.len(),
        config.rooms.policy_file.display(),
        if closed.is_empty() {
            String::new()
        } else {
            format!("; closed as no longer defined: {}", closed.join(", "))
        }
    );
    let tls = if config.tls.enabled {
        Some(crate::tls::acceptor(&config)?)
    } else {
        log::warn!("TLS is disabled: serving plain ws (only behind a TLS-terminating proxy)");
        None
    };
    if config.database.bcrypt_cost < 10 {
        log::warn!(
            "bcrypt cost {} is below 10: for tests only",
            config.database.bcrypt_cost
        );
    }
    Ok(Prepared {
        config,
        pool,
        keys,
        tls,
        policies: Arc::new(policies),
    })
}

/// How the shutdown future asks the server to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Stop accepting, let every session finish the requests it accepted (sends are
    /// committed, acked and delivered) and close with 1001, then stop; bounded by
    /// `server.shutdown_timeout_ms`. What SIGTERM and SIGINT do.
    Graceful,
    /// Stop at once, as a crash would (tests of recovery).
    Now,
}

/// Serves on `listener` until `shutdown` resolves, then stops as it says. Must run inside an
/// actix System.
pub async fn run(
    prepared: Prepared,
    listener: TcpListener,
    shutdown: impl Future<Output = Stop>,
) -> Result<(), StartError> {
    start(prepared, listener)?.run_until(shutdown).await
}

/// Starts the actors and the HTTP server on `listener` (the part of [`run`] that can fail at
/// once). Must run inside an actix System.
pub fn start(prepared: Prepared, listener: TcpListener) -> Result<Running, StartError> {
    let Prepared {
        config,
        pool,
        keys,
        tls,
        policies,
    } = prepared;
    // Bound before any actor starts: a start that fails with actors not yet run would have
    // them start while the runtime is being dropped.
    let metrics_listener = bind_metrics(&config.metrics.bind)?;
    let trusted_proxies = TrustedProxies::parse(&config.server.trusted_proxies).map_err(|e| {
        StartError::Config(ConfigError::Invalid(vec![ConfigProblem::new(
            "server.trusted_proxies",
            e,
        )]))
    })?;
    let triggers = reload::triggers();
    let cluster = start_cluster(&config, triggers.0.clone())?;
    let readiness = web::Data::new(Readiness {
        postgres: store::connect_pool(
            config.database.url.expose(),
            1,
            READY_TIMEOUT,
            READY_TIMEOUT,
        )?,
        cluster: cluster.clone(),
    });
    let services = start_actors(&config, pool, keys, policies.clone(), cluster.clone());
    let reloading = actix::spawn(reload::run(
        PolicySource::of(&config),
        policies,
        services.executors.clone(),
        services.directory.clone(),
        triggers,
        cluster.as_ref().map(|c| c.clone().recipient()),
    ));
    let gate = services.gate.clone();
    let transport = web::Data::new(Transport {
        services: Arc::new(services),
        sessions: Arc::new(session_settings(&config)),
        allowed_origins: transport::parse_origins(&config.server.allowed_origins),
        trusted_proxies,
        tls: tls.is_some(),
        ids: SessionIds::default(),
    });
    let tls_on = tls.is_some();
    let addr = listener.local_addr()?;
    let app = move |access_log: AccessLog| {
        App::new()
            .app_data(transport.clone())
            .app_data(readiness.clone())
            .wrap(security_headers(tls_on))
            .wrap(middleware::Condition::new(
                access_log == AccessLog::App,
                middleware::Logger::new(ACCESS_LOG).log_target("rookery::access"),
            ))
            .route("/ws", web::get().to(transport::upgrade))
            .route("/healthz", web::get().to(healthz))
            .route("/readyz", web::get().to(readyz))
            .configure(crate::webchat::routes)
    };
    let tls = tls.map(openssl::ssl::SslAcceptorBuilder::build);
    let server = listen::serve(listener, tls, &listen_settings(&config), app)?;
    let metrics = metrics_listener.map(start_metrics).transpose()?;
    log::info!(
        "listening on {}://{addr}/ws",
        if tls_on { "wss" } else { "ws" }
    );
    Ok(Running {
        server,
        metrics,
        gate,
        cluster,
        shutdown_timeout: ms(config.server.shutdown_timeout_ms),
        reloading,
    })
}

/// One line per HTTP request (a WebSocket's line comes when it closes): peer, request line,
/// status, bytes, seconds. Never headers, so no cookie or token. The transport writes the same
/// line for the upgrade requests it serves itself (`transport::upgraded`).
const ACCESS_LOG: &str = r#"%a "%r" %s %b %Ts"#;

/// The listener of `GET /metrics` on `bind` (empty: none).
fn bind_metrics(bind: &str) -> Result<Option<TcpListener>, StartError> {
    if bind.is_empty() {
        return Ok(None);
    }
    let listener = TcpListener::bind(bind).map_err(|e| {
        StartError::Io(std::io::Error::new(
            e.kind(),
            format!("metrics.bind {bind}: {e}"),
        ))
    })?;
    Ok(Some(listener))
}

/// `GET /metrics` over plain HTTP on `listener`, with its own one-thread server.
fn start_metrics(
    listener: TcpListener,
) -> Result<(actix_web::dev::Server, std::net::SocketAddr), StartError> {
    let addr = listener.local_addr()?;
    let server = actix_web::HttpServer::new(|| {
        App::new().route(
            "/metrics",
            web::get().to(|| async {
                HttpResponse::Ok()
                    .content_type("text/plain; version=0.0.4; charset=utf-8")
                    .body(crate::metrics::render())
            }),
        )
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(1)
    .client_request_timeout(Duration::from_secs(5))
    .listen(listener)?
    .run();
    log::info!("metrics on http://{addr}/metrics");
    Ok((server, addr))
}

/// With `redis.url` set, the link to the other nodes; `None` for a single node.
fn start_cluster(
    config: &Config,
    reload: tokio::sync::mpsc::UnboundedSender<&'static str>,
) -> Result<Option<Addr<Cluster>>, StartError> {
    if config.redis.url.is_empty() {
        return Ok(None);
    }
    let node_id = if config.cluster.node_id.is_empty() {
        let id = cluster::generated_node_id();
        log::info!("cluster.node_id is not set: this node is {id}");
        id
    } else {
        config.cluster.node_id.clone()
    };
    let settings = ClusterSettings {
        url: config.redis.url.clone(),
        prefix: config.redis.prefix.clone(),
        node_id,
        heartbeat: ms(config.cluster.heartbeat_ms),
        node_ttl: ms(config.cluster.node_ttl_ms),
    };
    let cluster = Cluster::new(settings, Some(reload)).map_err(|e| {
        StartError::Config(ConfigError::Invalid(vec![ConfigProblem::new(
            "redis.url",
            e,
        )]))
    })?;
    Ok(Some(cluster.start()))
}

/// The actors sessions talk to, started from `config`.
fn start_actors(
    config: &Config,
    pool: PgPool,
    keys: Arc<Keyring>,
    policies: Arc<Policies>,
    cluster: Option<Addr<Cluster>>,
) -> Services {
    let settings = DbSettings {
        token_ttl: Duration::from_secs(config.database.token_ttl_hours.saturating_mul(3600)),
        max_listed_rooms: config.rooms.max_listed,
    };
    let commits = config.database.commits_in_flight;
    let commit_lane = DbExecutor::start(commits, pool.clone(), keys.clone(), settings.clone());
    let executors = DbExecutor::start(config.database.executors, pool, keys, settings);
    let db = DbQueue::new(executors.clone(), config.database.max_queued).start();
    let presence = PresenceHandle::of(&Presence::default().start());
    let committer = Committer::new(
        commit_lane.clone().recipient(),
        commits,
        config.database.batch_max_messages,
        ms(config.database.batch_max_wait_ms),
    )
    .start();
    let store = StoreHandle {
        store: committer.recipient(),
        history: db.clone().recipient(),
        members: db.clone().recipient(),
        seqs: commit_lane.recipient(),
    };
    let directory = Directory::new(
        DirectoryStore {
            load: db.clone().recipient(),
            list: db.clone().recipient(),
            create: db.clone().recipient(),
            direct: db.clone().recipient(),
            purge: db.clone().recipient(),
            revoked: db.clone().recipient(),
        },
        store,
        presence.clone(),
        DirectorySettings {
            rooms: RoomSettings {
                idle_stop: ms(config.rooms.idle_stop_ms),
                store_timeout: ms(config.database.store_timeout_ms),
                resume_grace: ms(config.session.resume_grace_ms),
                // A reply never takes more than a quarter of what a client may leave unread.
                max_missed_bytes: config.session.outbound_limit_bytes / 4,
                cluster: cluster.map(ClusterLink),
            },
            handover: ms(config.session.resume_handover_ms),
            retention_sweep: ms(config.rooms.retention_sweep_ms),
            revocation_check: ms(config.auth.revocation_check_ms),
        },
        policies,
    )
    .start();
    let gate = Gate::new(GateSettings {
        max_connections_per_ip: config.server.max_connections_per_ip,
        failed_logins_per_user: config.auth.failed_logins_per_user,
        failed_logins_per_ip: config.auth.failed_logins_per_ip,
        failed_login_window: ms(config.auth.failed_login_window_ms),
        failed_resumes_per_ip: config.auth.failed_resumes_per_ip,
        registrations_per_ip: config.auth.registrations_per_ip.refill(),
        sweep_interval: ms(config.auth.failed_login_sweep_ms),
    })
    .start();
    let hasher = HasherHandle::start(
        config.auth.bcrypt_threads,
        config.database.bcrypt_cost,
        config.auth.bcrypt_queue,
    );
    Services {
        db,
        executors,
        directory,
        presence,
        gate,
        hasher,
        sends_per_user: Arc::new(SharedBuckets::new(config.session.sends_per_user.refill())),
        typing_per_user: Arc::new(SharedBuckets::new(config.session.typing_per_user.refill())),
    }
}

fn session_settings(config: &Config) -> SessionSettings {
    SessionSettings {
        ping_interval: ms(config.session.ping_interval_ms),
        client_timeout: ms(config.session.client_timeout_ms),
        outbound_queue: config.session.outbound_queue,
        outbound_limit_bytes: config.session.outbound_limit_bytes,
        auth_timeout: ms(config.session.auth_timeout_ms),
        max_waiting_requests: config.session.max_waiting_requests,
        max_waiting_bytes: config.session.max_waiting_bytes,
        resume_join_wait: ms(config.session.resume_join_wait_ms),
        registration_open: config.auth.registration == Registration::Open,
        guard: GuardSettings {
            max_message_bytes: config.session.max_frame_bytes,
            bad_frame_limit: config.session.bad_frame_limit,
            bad_frame_window: ms(config.session.bad_frame_window_ms),
            requests_per_second: config.session.requests_per_second,
            request_burst: config.session.request_burst,
        },
    }
}

fn listen_settings(config: &Config) -> ListenSettings {
    let server = &config.server;
    ListenSettings {
        workers: server.workers,
        max_connections_per_worker: server.max_connections_per_worker,
        max_concurrent_handshakes: server.max_concurrent_handshakes,
        max_handshakes_per_ip: server.max_handshakes_per_ip,
        tls_handshake_timeout: ms(server.tls_handshake_timeout_ms),
        request_timeout: ms(server.request_timeout_ms),
        disconnect_timeout: ms(server.disconnect_timeout_ms),
        keep_alive: ms(server.keep_alive_ms),
        shutdown_timeout: ms(server.shutdown_timeout_ms),
        unread_limit: ms(config.session.client_timeout_ms),
    }
}

/// Headers on every HTTP response: no sniffing, no framing, no referrer, no caching, no
/// active content; HSTS when TLS is on.
fn security_headers(tls_on: bool) -> middleware::DefaultHeaders {
    let mut headers = middleware::DefaultHeaders::new()
        .add((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .add((header::X_FRAME_OPTIONS, "DENY"))
        .add((header::REFERRER_POLICY, "no-referrer"))
        .add((
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; frame-ancestors 'none'",
        ))
        .add((header::CACHE_CONTROL, "no-store"));
    if tls_on {
        headers = headers.add((header::STRICT_TRANSPORT_SECURITY, "max-age=31536000"));
    }
    headers
}

/// A started server; [`Running::run_until`] serves until shutdown.
pub struct Running {
    server: actix_web::dev::Server,
    /// The metrics listener and its address, when `metrics.bind` is set.
    metrics: Option<(actix_web::dev::Server, std::net::SocketAddr)>,
    gate: Addr<Gate>,
    cluster: Option<Addr<Cluster>>,
    shutdown_timeout: Duration,
    /// The policy-file reloader; it ends with the server.
    reloading: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Where `GET /metrics` is served, when it is.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics.as_ref().map(|m| m.1)
    }

    /// Serves until `shutdown` resolves, then stops as it says; returns once stopped.
    pub async fn run_until(self, shutdown: impl Future<Output = Stop>) -> Result<(), StartError> {
        let handle = self.server.handle();
        // The server's future also carries out its handle's commands: keep it polled.
        let mut serving = actix::spawn(self.server);
        let metrics = self.metrics.map(|(server, _)| {
            let handle = server.handle();
            actix::spawn(server);
            handle
        });
        let _stop_metrics = StopOnDrop(metrics);
        let stop = tokio::select! {
            finished = &mut serving => {
                self.reloading.abort();
                if let Some(cluster) = &self.cluster {
                    let _ = cluster.send(cluster::Leave { graceful: false }).await;
                }
                return finished_server(finished);
            }
            stop = shutdown => stop,
        };
        match stop {
            Stop::Graceful => {
                handle.pause().await;
                let deadline = self.shutdown_timeout;
                let _ = self.gate.send(DrainAll { deadline }).await;
                handle.stop(true).await;
            }
            Stop::Now => handle.stop(false).await,
        }
        let finished = finished_server(serving.await);
        self.reloading.abort();
        if let Some(cluster) = &self.cluster {
            let graceful = stop == Stop::Graceful;
            let _ = cluster.send(cluster::Leave { graceful }).await;
        }
        finished
    }
}

/// Stops the metrics listener however serving ends.
struct StopOnDrop(Option<actix_web::dev::ServerHandle>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if let Some(handle) = self.0.take() {
            actix::spawn(async move { handle.stop(false).await });
        }
    }
}

fn finished_server(
    finished: Result<std::io::Result<()>, tokio::task::JoinError>,
) -> Result<(), StartError> {
    match finished {
        Ok(result) => Ok(result?),
        Err(e) => Err(StartError::Io(std::io::Error::other(e.to_string()))),
    }
}

async fn healthz(req: actix_web::HttpRequest) -> HttpResponse {
    if let Some(handshake) = req.conn_data::<listen::HandshakeDone>() {
        handshake.finish();
    }
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

/// How long `/readyz` waits for each of Postgres and Redis.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// What `/readyz` checks: its own one-connection pool to Postgres, and Redis through the
/// cluster actor.
struct Readiness {
    postgres: PgPool,
    cluster: Option<Addr<Cluster>>,
}

/// What a readiness check answered within [`READY_TIMEOUT`].
async fn answered<E: std::fmt::Display>(
    check: impl Future<Output = Result<Result<(), String>, E>>,
) -> Result<(), String> {
    match tokio::time::timeout(READY_TIMEOUT, check).await {
        Ok(Ok(result)) => result,
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {READY_TIMEOUT:?}")),
    }
}

/// 200 when Postgres (and Redis, when configured) answer; 503 naming what failed.
async fn readyz(req: actix_web::HttpRequest, ready: web::Data<Readiness>) -> HttpResponse {
    if let Some(handshake) = req.conn_data::<listen::HandshakeDone>() {
        handshake.finish();
    }
    let pool = ready.postgres.clone();
    let postgres = answered(web::block(move || {
        let mut conn = pool.get().map_err(|e| e.to_string())?;
        store::ping(&mut conn).map_err(|e| e.to_string())
    }));
    let redis = async {
        match &ready.cluster {
            None => None,
            Some(cluster) => Some(answered(cluster.send(CheckRedis)).await),
        }
    };
    let (postgres, redis) = futures_util::future::join(postgres, redis).await;
    // The body is public: it names what failed, the log says why.
    let mut checks = serde_json::Map::new();
    let mut failed = Vec::new();
    for (name, result) in [("postgres", Some(postgres)), ("redis", redis)] {
        let Some(result) = result else { continue };
        let value = match result {
            Ok(()) => "ok",
            Err(e) => {
                log::debug!("readiness: {name} does not answer: {e}");
                failed.push(name);
                "failed"
            }
        };
        checks.insert(name.into(), value.into());
    }
    let body = serde_json::json!({
        "status": if failed.is_empty() { "ready" } else { "unavailable" },
        "failed": failed,
        "checks": checks,
    });
    if failed.is_empty() {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

/// `rookery serve`: prepare, bind, serve until SIGINT/SIGTERM.
pub fn serve(config: Config) -> Result<(), StartError> {
    let bind = config.server.bind.clone();
    let backlog = config.server.backlog;
    let prepared = prepare(config)?;
    let listener = listen(&bind, backlog)
        .map_err(|e| StartError::Io(std::io::Error::new(e.kind(), format!("bind {bind}: {e}"))))?;
    System::new().block_on(run(prepared, listener, async {
        let signal = wait_for_signal().await;
        log::info!("{signal} received: shutting down gracefully");
        Stop::Graceful
    }))?;
    log::info!("server stopped");
    Ok(())
}

/// A listening socket on `bind` with room for `backlog` connections waiting to be accepted
/// (std's `TcpListener::bind` asks for 128).
pub fn listen(bind: &str, backlog: u32) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    use std::net::ToSocketAddrs;
    let addr = bind.to_socket_addrs()?.next().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address to bind")
    })?;
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    if let Some(cap) = somaxconn().filter(|cap| *cap < backlog) {
        log::warn!(
            "server.backlog is {backlog} but the kernel caps it at net.core.somaxconn = {cap}: \
             raise that (sysctl -w net.core.somaxconn={backlog}) to queue more connections"
        );
    }
    Ok(socket.into())
}

fn somaxconn() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()?
        .trim()
        .parse()
        .ok()
}

async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        },
        _ => {
            log::error!("cannot listen for signals; stop the server with SIGKILL");
            std::future::pending().await
        }
    }
}
