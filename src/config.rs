//! The configuration tree: config/default.toml (compiled in), then `--config FILE`, then
//! ROOKERY__SECTION__KEY environment variables and DATABASE_URL. [`Config::load`] reads and
//! validates it all and reports every problem at once, each with its key and where its value
//! came from (file:line:col, or the environment variable); nothing is global, so tests and a
//! later live reload build their own. Calls only [`crate::crypto::parse_key`] to check keys.

use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Value};
use figment::{Figment, Source};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::crypto::KeySource;
use crate::error::{ConfigError, ConfigProblem};
use crate::secret::Secret;

/// The checked-in defaults; every key has a value there.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Directory for generated files (development key, self-signed certificate).
    pub data_dir: PathBuf,
    pub server: ServerConfig,
    pub tls: TlsConfig,
    pub database: DatabaseConfig,
    pub session: SessionConfig,
    pub rooms: RoomsConfig,
    pub crypto: CryptoConfig,
    pub redis: RedisConfig,
    pub cluster: ClusterConfig,
    pub auth: AuthConfig,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
}

/// How the log is written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One readable line per record.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// The Prometheus endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Where `GET /metrics` is served over plain HTTP; empty: not at all.
    pub bind: String,
}

/// Whether anyone may `register`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Registration {
    Open,
    /// `register` answers `forbidden`; operators add users with `rookery user add`.
    Closed,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Failed logins per username within the window before `rate_limited`.
    pub failed_logins_per_user: usize,
    /// Failed logins per IP address within the window before `rate_limited`.
    pub failed_logins_per_ip: usize,
    /// The window for counting failed logins (and failed resumes).
    pub failed_login_window_ms: u64,
    /// Failed `resume`s per IP address within the window before `rate_limited`.
    pub failed_resumes_per_ip: usize,
    /// `register`s per IP address (a token bucket); beyond, `rate_limited`.
    pub registrations_per_ip: RateConfig,
    /// How often the windows of failed logins that have run out are forgotten.
    pub failed_login_sweep_ms: u64,
    /// Threads running bcrypt.
    pub bcrypt_threads: usize,
    /// Password checks that may wait for a bcrypt thread before `rate_limited`.
    pub bcrypt_queue: usize,
    pub registration: Registration,
    /// How often the database is asked for tokens revoked elsewhere (operator commands, a
    /// logout on another node), whose sessions are then closed.
    pub revocation_check_ms: u64,
}

/// A token bucket: `count` per `per_seconds`, up to `burst` at once.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateConfig {
    pub count: u32,
    pub per_seconds: u32,
    pub burst: u32,
}

impl RateConfig {
    pub fn refill(&self) -> crate::rate::Refill {
        crate::rate::Refill::new(self.count, self.per_seconds, self.burst)
    }

    fn problem(&self) -> Option<String> {
        (self.count == 0 || self.per_seconds == 0 || self.burst == 0)
            .then(|| "count, per_seconds and burst must be at least 1".to_string())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Listen address.
    pub bind: String,
    /// HTTP worker threads; 0 means one per core.
    pub workers: usize,
    /// Most open connections per worker.
    pub max_connections_per_worker: usize,
    /// Connections the kernel may queue for accept (the listen backlog; capped by the
    /// kernel's `net.core.somaxconn`).
    pub backlog: u32,
    /// TLS handshakes in progress at once across the workers; further connections wait in
    /// the backlog.
    pub max_concurrent_handshakes: usize,
    /// Connections of one client address still in the TLS or HTTP handshake; more are closed
    /// at once.
    pub max_handshakes_per_ip: usize,
    /// Time to receive request headers.
    pub request_timeout_ms: u64,
    /// Time to complete a TLS handshake.
    pub tls_handshake_timeout_ms: u64,
    /// Time to finish closing a connection.
    pub disconnect_timeout_ms: u64,
    /// HTTP keep-alive.
    pub keep_alive_ms: u64,
    /// Graceful shutdown budget.
    pub shutdown_timeout_ms: u64,
    /// Most open connections from one IP address.
    pub max_connections_per_ip: usize,
    /// Origins (scheme://host[:port]) allowed to open a WebSocket from a browser, besides the
    /// server's own; requests without an Origin header (non-browser clients) are allowed.
    pub allowed_origins: Vec<String>,
    /// Proxies (CIDRs or addresses) whose `Forwarded` / `X-Forwarded-For` client address is
    /// believed; from anyone else those headers are ignored.
    pub trusted_proxies: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Serve wss/https.
    pub enabled: bool,
    /// PEM certificate chain; empty for the generated development certificate.
    pub cert: PathBuf,
    /// PEM private key; empty for the generated development key.
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// PostgreSQL URL (may hold a password, hence a Secret).
    pub url: Secret,
    /// Read-lane DB-executor threads (every request but message commits), one connection each.
    pub executors: usize,
    /// Requests queued or running on the read lane at most; beyond, `rate_limited`.
    pub max_queued: usize,
    /// Longest wait for a connection.
    pub connect_timeout_ms: u64,
    /// How long start-up retries a database that does not answer (0: try once).
    pub start_retry_ms: u64,
    /// bcrypt cost for new hashes.
    pub bcrypt_cost: u32,
    /// Session token lifetime.
    pub token_ttl_hours: u64,
    /// Longest wait for a message's commit before the sender hears `unavailable`.
    pub store_timeout_ms: u64,
    /// Postgres cancels any statement of the server's after this long.
    pub statement_timeout_ms: u64,
    /// Group commit: message-storing transactions run at once before messages gather; also
    /// the commit lane's threads and connections.
    pub commits_in_flight: usize,
    /// Group commit: most messages gathered into one transaction while commits are running.
    pub batch_max_messages: usize,
    /// Group commit: longest a gathered batch waits for a busy executor before it is queued.
    pub batch_max_wait_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionConfig {
    /// Server ping interval.
    pub ping_interval_ms: u64,
    /// Silence after which a connection is closed.
    pub client_timeout_ms: u64,
    /// A connection that has not authenticated this long after opening is closed.
    pub auth_timeout_ms: u64,
    /// Largest accepted frame.
    pub max_frame_bytes: usize,
    /// Bad frames tolerated within the window before closing with 1008.
    pub bad_frame_limit: usize,
    /// Window for counting bad frames.
    pub bad_frame_window_ms: u64,
    /// Deliveries (an event, or the messages of one commit of a room) queued per session
    /// before it is cut off as a slow reader.
    pub outbound_queue: usize,
    /// How long a session whose connection dropped stays joined, waiting for a `resume`.
    pub resume_grace_ms: u64,
    /// How long a `resume` waits for a session that still looks alive to hand its rooms over.
    pub resume_handover_ms: u64,
    /// How long the rooms a `resume` restored hold their events after its reply, for a
    /// `join {after}` the client may have sent right behind it (any other request ends it).
    pub resume_join_wait_ms: u64,
    /// Requests that may wait behind a session-changing one before `rate_limited`.
    pub max_waiting_requests: usize,
    /// The bytes of those requests at most; beyond, `rate_limited`.
    pub max_waiting_bytes: usize,
    /// Sustained requests per second per connection; beyond the burst, `rate_limited`.
    pub requests_per_second: u32,
    /// Requests a connection may send at once before the rate applies.
    pub request_burst: u32,
    /// `send`s per user across all of its connections and rooms; beyond, `rate_limited`.
    pub sends_per_user: RateConfig,
    /// `typing`s per user across all of its connections and rooms; beyond, `rate_limited`.
    pub typing_per_user: RateConfig,
    /// Bytes written to a connection but not yet taken by the socket before the connection
    /// is cut off as a slow reader (close 1013).
    pub outbound_limit_bytes: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoomsConfig {
    /// The admins' room policies (limits, config rooms); relative to the working directory.
    /// When it is not set and the default file is missing, every room gets the built-in
    /// defaults; a file that was set must exist.
    pub policy_file: PathBuf,
    /// Whether `policy_file` was set (by a file or the environment), not left at its default.
    #[serde(skip)]
    pub policy_file_set: bool,
    /// Idle time before a room actor stops.
    pub idle_stop_ms: u64,
    /// Most rooms listed by `rooms`.
    pub max_listed: usize,
    /// How often messages past their room's `retention_days` are deleted.
    pub retention_sweep_ms: u64,
}

/// The default of `rooms.policy_file`: a missing file there means "defaults only".
pub const DEFAULT_POLICY_FILE: &str = "config/rooms.toml";

/// Keys that moved from the main config to the policy file's `[defaults]`.
const MOVED_TO_POLICY: [&str; 2] = ["history_limit", "max_body_bytes"];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CryptoConfig {
    /// Key id -> base64 of 32 bytes.
    pub keys: BTreeMap<String, Secret>,
    /// Extra key file; empty for <data_dir>/message-keys.
    pub key_file: PathBuf,
    /// Warn when one key has sealed this many messages (the safe bound is 2^32).
    pub warn_after_messages: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// Redis URL; empty runs a single node in-process.
    pub url: Secret,
    /// Prefix of every key and channel, so that deployments and tests can share one Redis.
    pub prefix: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's name in the cluster; empty: generated at start (and logged).
    pub node_id: String,
    /// How often a node writes its heartbeat (and its presence) to Redis.
    pub heartbeat_ms: u64,
    /// A node whose heartbeat is older than this is dead.
    pub node_ttl_ms: u64,
}

impl Config {
    /// Defaults, then `file` (which must exist when given), then the environment.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut figment = Figment::new().merge(Toml::string(DEFAULT_TOML));
        if let Some(path) = file {
            figment = figment.merge(Toml::file_exact(path));
        }
        Self::from_figment(&figment.merge(Self::env()))
    }

    /// Defaults with `overlay` (TOML text) on top; no file and no environment. For tests.
    pub fn from_toml(overlay: &str) -> Result<Config, ConfigError> {
        Self::from_figment(
            &Figment::new()
                .merge(Toml::string(DEFAULT_TOML))
                .merge(Toml::string(overlay)),
        )
    }

    fn env() -> Figment {
        Figment::new()
            .merge(Env::prefixed("ROOKERY__").split("__"))
            .merge(
                Env::raw()
                    .only(&["DATABASE_URL"])
                    .map(|_| "database.url".into()),
            )
    }

    /// Reads every layer, then deserializes and validates, collecting every problem: a value
    /// of the wrong type or an unknown key is noted and replaced by its default (or dropped),
    /// and deserializing goes on, so one mistake does not hide the next.
    fn from_figment(figment: &Figment) -> Result<Config, ConfigError> {
        let unreadable = |e: figment::Error| {
            let problems = e
                .into_iter()
                .map(|e| ConfigProblem {
                    key: e.path.join("."),
                    problem: e.kind.to_string(),
                    origin: e
                        .metadata
                        .as_ref()
                        .and_then(|m| m.source.as_ref())
                        .map(|s| s.to_string()),
                })
                .collect();
            ConfigError::Invalid(problems)
        };
        let mut merged: Dict = figment.extract().map_err(unreadable)?;
        let defaults: Dict = Figment::from(Toml::string(DEFAULT_TOML))
            .extract()
            .map_err(unreadable)?;
        let mut problems = moved_keys(&mut merged);
        let config = loop {
            match Figment::from(Serialized::defaults(&merged)).extract::<Config>() {
                Ok(config) => break config,
                Err(e) if problems.len() < 100 => {
                    let (key, problem) = match &e.kind {
                        figment::error::Kind::UnknownField(field, _) => {
                            let mut path = e.path.clone();
                            if path.last() != Some(field) {
                                path.push(field.clone());
                            }
                            (path, "unknown key".to_string())
                        }
                        kind => (e.path.clone(), kind.to_string()),
                    };
                    if !replace_with_default(&mut merged, &defaults, &key) {
                        return Err(ConfigError::Invalid(vec![ConfigProblem::new(
                            &key.join("."),
                            problem,
                        )]));
                    }
                    problems.push(ConfigProblem::new(&key.join("."), problem));
                }
                Err(e) => return Err(unreadable(e)),
            }
        };
        let mut config = config;
        config.rooms.policy_file_set = figment
            .find_metadata("rooms.policy_file")
            .is_some_and(|m| !matches!(m.source, Some(Source::Code(_))));
        let reported: Vec<String> = problems.iter().map(|p| p.key.clone()).collect();
        problems.extend(
            config
                .problems()
                .into_iter()
                .filter(|p| !reported.contains(&p.key)),
        );
        if problems.is_empty() {
            return Ok(config);
        }
        for problem in &mut problems {
            problem.origin = origin_of(figment, &problem.key);
        }
        Err(ConfigError::Invalid(problems))
    }

    /// Every problem of the values found, each naming its key.
    pub fn problems(&self) -> Vec<ConfigProblem> {
        let mut out = Vec::new();
        let mut bad = |key: &str, problem: String| out.push(ConfigProblem::new(key, problem));
        self.server_problems(&mut bad);
        self.session_problems(&mut bad);
        self.auth_and_tls_problems(&mut bad);
        self.storage_problems(&mut bad);
        out
    }

    /// Problems of the listeners and the connections' timeouts.
    fn server_problems(&self, bad: &mut impl FnMut(&str, String)) {
        if self.server.bind.parse::<SocketAddr>().is_err() {
            bad(
                "server.bind",
                format!("'{}' is not an ip:port address", self.server.bind),
            );
        }
        if !self.metrics.bind.is_empty() && self.metrics.bind.parse::<SocketAddr>().is_err() {
            bad(
                "metrics.bind",
                format!(
                    "'{}' is not an ip:port address (empty turns metrics off)",
                    self.metrics.bind
                ),
            );
        }
        if self.server.max_connections_per_worker == 0 {
            bad(
                "server.max_connections_per_worker",
                "must be at least 1".into(),
            );
        }
        for (key, ms) in [
            ("server.request_timeout_ms", self.server.request_timeout_ms),
            (
                "server.tls_handshake_timeout_ms",
                self.server.tls_handshake_timeout_ms,
            ),
            (
                "server.disconnect_timeout_ms",
                self.server.disconnect_timeout_ms,
            ),
            ("session.ping_interval_ms", self.session.ping_interval_ms),
            (
                "session.resume_handover_ms",
                self.session.resume_handover_ms,
            ),
            (
                "auth.failed_login_sweep_ms",
                self.auth.failed_login_sweep_ms,
            ),
            ("session.client_timeout_ms", self.session.client_timeout_ms),
            ("session.auth_timeout_ms", self.session.auth_timeout_ms),
            (
                "session.bad_frame_window_ms",
                self.session.bad_frame_window_ms,
            ),
            (
                "database.connect_timeout_ms",
                self.database.connect_timeout_ms,
            ),
            ("auth.revocation_check_ms", self.auth.revocation_check_ms),
        ] {
            if ms == 0 {
                bad(key, "a timeout must be greater than 0".into());
            }
        }
    }

    /// Problems of per-connection limits.
    fn session_problems(&self, bad: &mut impl FnMut(&str, String)) {
        if self.session.client_timeout_ms <= self.session.ping_interval_ms {
            bad(
                "session.client_timeout_ms",
                "must be longer than session.ping_interval_ms".into(),
            );
        }
        if self.session.max_frame_bytes < 1024 {
            bad("session.max_frame_bytes", "must be at least 1024".into());
        }
        if self.server.backlog == 0 || self.server.backlog > i32::MAX as u32 {
            bad("server.backlog", "must be between 1 and 2147483647".into());
        }
        if self.server.max_concurrent_handshakes == 0 {
            bad(
                "server.max_concurrent_handshakes",
                "must be at least 1".into(),
            );
        }
        if self.server.max_connections_per_ip == 0 {
            bad("server.max_connections_per_ip", "must be at least 1".into());
        }
        for proxy in &self.server.trusted_proxies {
            if proxy.parse::<ipnet::IpNet>().is_err() && proxy.parse::<std::net::IpAddr>().is_err()
            {
                bad(
                    "server.trusted_proxies",
                    format!("'{proxy}' is not a CIDR like 10.0.0.0/8 or an address"),
                );
            }
        }
        for origin in &self.server.allowed_origins {
            if url::Url::parse(origin)
                .map(|u| u.host().is_none())
                .unwrap_or(true)
            {
                bad(
                    "server.allowed_origins",
                    format!("'{origin}' is not an origin like https://chat.example.com"),
                );
            }
        }
        if self.session.requests_per_second == 0 || self.session.request_burst == 0 {
            bad(
                "session.requests_per_second",
                "the rate and the burst must be at least 1".into(),
            );
        }
        if self.session.outbound_limit_bytes < self.session.max_frame_bytes {
            bad(
                "session.outbound_limit_bytes",
                "must be at least session.max_frame_bytes".into(),
            );
        }
        if self.session.max_waiting_bytes < self.session.max_frame_bytes {
            bad(
                "session.max_waiting_bytes",
                "must be at least session.max_frame_bytes".into(),
            );
        }
    }

    /// Problems of logins, hashing and TLS.
    fn auth_and_tls_problems(&self, bad: &mut impl FnMut(&str, String)) {
        if self.auth.failed_logins_per_user == 0 || self.auth.failed_logins_per_ip == 0 {
            bad(
                "auth.failed_logins_per_user",
                "limits must be at least 1".into(),
            );
        }
        if let Some(problem) = self.session.sends_per_user.problem() {
            bad("session.sends_per_user", problem);
        }
        if let Some(problem) = self.session.typing_per_user.problem() {
            bad("session.typing_per_user", problem);
        }
        if let Some(problem) = self.auth.registrations_per_ip.problem() {
            bad("auth.registrations_per_ip", problem);
        }
        if self.auth.failed_resumes_per_ip == 0 {
            bad("auth.failed_resumes_per_ip", "must be at least 1".into());
        }
        if self.auth.bcrypt_threads == 0 || self.auth.bcrypt_threads > 64 {
            bad("auth.bcrypt_threads", "must be 1..64".into());
        }
        if self.auth.bcrypt_queue == 0 {
            bad("auth.bcrypt_queue", "must be at least 1".into());
        }
        if self.session.max_waiting_requests == 0 {
            bad("session.max_waiting_requests", "must be at least 1".into());
        }
        if self.session.outbound_queue == 0 {
            bad("session.outbound_queue", "must be at least 1".into());
        }
        if self.tls.enabled
            && (self.tls.cert.as_os_str().is_empty() != self.tls.key.as_os_str().is_empty())
        {
            bad(
                "tls.cert",
                "set both tls.cert and tls.key, or neither".into(),
            );
        }
    }

    /// Problems of the database, rooms, keys and Redis.
    fn storage_problems(&self, bad: &mut impl FnMut(&str, String)) {
        if let Err(e) = url::Url::parse(self.database.url.expose()) {
            bad("database.url", format!("not a URL: {e}"));
        } else if database_name(self.database.url.expose()).is_none() {
            bad(
                "database.url",
                "must name a database, e.g. postgres://host/rookery".into(),
            );
        }
        if self.database.batch_max_messages == 0 || self.database.batch_max_messages > 5000 {
            bad("database.batch_max_messages", "must be 1..5000".into());
        }
        if self.database.executors == 0 || self.database.executors > 64 {
            bad("database.executors", "must be 1..64".into());
        }
        if self.database.commits_in_flight == 0 || self.database.commits_in_flight > 64 {
            bad("database.commits_in_flight", "must be 1..64".into());
        }
        if self.database.max_queued == 0 {
            bad("database.max_queued", "must be at least 1".into());
        }
        if !(4..=31).contains(&self.database.bcrypt_cost) {
            bad("database.bcrypt_cost", "must be 4..31".into());
        }
        if self.database.token_ttl_hours == 0 || self.database.token_ttl_hours > 87_600 {
            bad(
                "database.token_ttl_hours",
                "must be 1..87600 (ten years)".into(),
            );
        }
        if self.rooms.max_listed == 0 {
            bad("rooms.max_listed", "must be at least 1".into());
        }
        if self.rooms.retention_sweep_ms == 0 {
            bad("rooms.retention_sweep_ms", "must be greater than 0".into());
        }
        for (id, key) in &self.crypto.keys {
            if let Err(e) = crate::crypto::parse_key(id, key.expose()) {
                bad(&format!("crypto.keys.{id}"), e.to_string());
            }
        }
        if !self.redis.url.is_empty() {
            match url::Url::parse(self.redis.url.expose()) {
                Ok(url) if url.scheme() == "redis" => {}
                Ok(url) if url.scheme() == "rediss" => bad(
                    "redis.url",
                    "rediss:// (TLS to Redis) is not supported yet: use redis:// on a private network (docs/cluster.md)".into(),
                ),
                Ok(_) => bad("redis.url", "must start with redis://".into()),
                Err(_) => bad("redis.url", "not a URL".into()),
            }
        }
        let name_chars = |s: &str| {
            s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        if self.redis.prefix.is_empty()
            || self.redis.prefix.len() > 64
            || !name_chars(&self.redis.prefix)
        {
            bad(
                "redis.prefix",
                "must be 1..64 of letters, digits, '-', '_', '.'".into(),
            );
        }
        if self.cluster.node_id.len() > 64 || !name_chars(&self.cluster.node_id) {
            bad(
                "cluster.node_id",
                "must be at most 64 of letters, digits, '-', '_', '.' (empty: generated)".into(),
            );
        }
        if self.cluster.heartbeat_ms < 50 {
            bad("cluster.heartbeat_ms", "must be at least 50".into());
        }
        if self.cluster.node_ttl_ms < 2 * self.cluster.heartbeat_ms {
            bad(
                "cluster.node_ttl_ms",
                "must be at least twice cluster.heartbeat_ms (a node must miss two heartbeats to count as dead)".into(),
            );
        }
    }

    pub fn key_file(&self) -> PathBuf {
        if self.crypto.key_file.as_os_str().is_empty() {
            self.data_dir.join("message-keys")
        } else {
            self.crypto.key_file.clone()
        }
    }

    /// Where the message keys come from (`key_file` is [`Config::key_file`]).
    pub fn key_source<'a>(&'a self, key_file: &'a Path) -> KeySource<'a> {
        KeySource {
            configured: &self.crypto.keys,
            key_file,
            warn_after_messages: self.crypto.warn_after_messages,
        }
    }
}

/// Takes out the keys that moved to the policy file, each with a problem saying where to.
fn moved_keys(merged: &mut Dict) -> Vec<ConfigProblem> {
    let Some(Value::Dict(_, rooms)) = merged.get_mut("rooms") else {
        return Vec::new();
    };
    MOVED_TO_POLICY
        .iter()
        .filter(|key| rooms.remove(**key).is_some())
        .map(|key| {
            ConfigProblem::new(
                &format!("rooms.{key}"),
                format!(
                    "moved to the room policy file: set `{key}` under [defaults] in the file \
                     rooms.policy_file names (config/rooms.toml by default)"
                ),
            )
        })
        .collect()
}

/// Puts the default value at `key` of `dict` (or removes the key when it has no default);
/// false when `key` names nothing that can be replaced.
fn replace_with_default(dict: &mut Dict, defaults: &Dict, key: &[String]) -> bool {
    let Some((last, parents)) = key.split_last() else {
        return false;
    };
    let mut target = dict;
    let mut default = Some(defaults);
    for part in parents {
        default = default.and_then(|d| match d.get(part) {
            Some(Value::Dict(_, inner)) => Some(inner),
            _ => None,
        });
        match target.get_mut(part) {
            Some(Value::Dict(_, inner)) => target = inner,
            _ => return false,
        }
    }
    match default.and_then(|d| d.get(last)) {
        Some(value) => target.insert(last.clone(), value.clone()).is_some(),
        None => target.remove(last).is_some(),
    }
}

/// Where the value of `key` was set: "FILE:LINE:COL" for a file, the variable's name for the
/// environment; None for the compiled-in defaults.
fn origin_of(figment: &Figment, key: &str) -> Option<String> {
    let metadata = figment.find_metadata(key)?;
    match &metadata.source {
        Some(Source::File(path)) => {
            let located = std::fs::read_to_string(path)
                .ok()
                .and_then(|text| locate_key(&text, key));
            Some(match located {
                Some((line, col)) => format!("{}:{line}:{col}", path.display()),
                None => path.display().to_string(),
            })
        }
        Some(Source::Code(_)) => None,
        _ if metadata.name.contains("ROOKERY__") => Some(format!(
            "ROOKERY__{}",
            key.replace('.', "__").to_ascii_uppercase()
        )),
        _ if metadata.name.contains("environment") => Some("DATABASE_URL".into()),
        _ => None,
    }
}

/// The line and column (from 1) of `key` (dotted) in TOML `text`.
pub fn locate_key(text: &str, key: &str) -> Option<(usize, usize)> {
    let table = toml::de::DeTable::parse(text).ok()?;
    let mut current = table.get_ref();
    let mut span = None;
    for part in key.split('.') {
        let (name, value) = current.get_key_value(part)?;
        span = Some(name.span());
        match value.get_ref() {
            toml::de::DeValue::Table(inner) => current = inner,
            _ => break,
        }
    }
    span.map(|span| line_col(text, span.start))
}

/// Line and column (from 1, in characters) of byte `offset` of `text`.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// The database named by a Postgres URL, if any.
pub fn database_name(url: &str) -> Option<String> {
    let parsed = url::Url::parse(url).ok()?;
    let name = parsed.path().trim_start_matches('/');
    (!name.is_empty()).then(|| name.to_string())
}

pub fn ms(value: u64) -> Duration {
    Duration::from_millis(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_and_validate() {
        let config = Config::from_toml("").unwrap();
        assert_eq!(config.rooms.policy_file, PathBuf::from(DEFAULT_POLICY_FILE));
        assert_eq!(config.session.max_frame_bytes, 65536);
        assert_eq!(config.session.ping_interval_ms, 5000);
        assert_eq!(config.session.client_timeout_ms, 15000);
        assert!(config.tls.enabled);
        assert_eq!(
            database_name(config.database.url.expose()).as_deref(),
            Some("rookery")
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = Config::from_toml("[session]\nping_intervall_ms = 5").unwrap_err();
        assert!(err.to_string().contains("ping_intervall_ms"), "{err}");
    }

    #[test]
    fn wrong_types_name_the_key() {
        let err = Config::from_toml("[session]\nping_interval_ms = \"soon\"").unwrap_err();
        assert!(err.to_string().contains("ping_interval_ms"), "{err}");
    }

    #[test]
    fn invalid_values_name_the_key() {
        let err = Config::from_toml("[session]\nclient_timeout_ms = 10\nping_interval_ms = 20")
            .unwrap_err();
        assert!(
            err.to_string().starts_with("session.client_timeout_ms"),
            "{err}"
        );
        let err = Config::from_toml("[crypto.keys]\n1 = \"c2hvcnQ=\"").unwrap_err();
        assert!(err.to_string().starts_with("crypto.keys.1"), "{err}");
        let err = Config::from_toml("[server]\nbind = \"nowhere\"").unwrap_err();
        assert!(err.to_string().starts_with("server.bind"), "{err}");
        let err = Config::from_toml("[database]\ncommits_in_flight = 0").unwrap_err();
        assert!(
            err.to_string().starts_with("database.commits_in_flight"),
            "{err}"
        );
    }

    #[test]
    fn cluster_settings_are_checked() {
        let config = Config::from_toml("").unwrap();
        assert!(config.redis.url.is_empty());
        assert_eq!(config.redis.prefix, "rookery");
        assert_eq!(config.cluster.node_id, "");
        assert_eq!(config.cluster.heartbeat_ms, 5000);
        assert_eq!(config.cluster.node_ttl_ms, 15000);
        let ok = Config::from_toml("[redis]\nurl = \"redis://:pw@10.0.0.5:6379/2\"\nprefix = \"chat-eu.1\"\n[cluster]\nnode_id = \"n_1\"").unwrap();
        assert_eq!(ok.cluster.node_id, "n_1");
        for (toml, key, says) in [
            (
                "[redis]\nurl = \"rediss://h:6380\"",
                "redis.url",
                "not supported",
            ),
            ("[redis]\nurl = \"http://h\"", "redis.url", "redis://"),
            ("[redis]\nurl = \"no url\"", "redis.url", "not a URL"),
            ("[redis]\nprefix = \"\"", "redis.prefix", "1..64"),
            ("[redis]\nprefix = \"a b\"", "redis.prefix", "letters"),
            ("[cluster]\nnode_id = \"n:1\"", "cluster.node_id", "letters"),
            (
                "[cluster]\nheartbeat_ms = 10",
                "cluster.heartbeat_ms",
                "at least 50",
            ),
            (
                "[cluster]\nheartbeat_ms = 1000\nnode_ttl_ms = 1500",
                "cluster.node_ttl_ms",
                "twice",
            ),
        ] {
            let err = Config::from_toml(toml).unwrap_err().to_string();
            assert!(err.starts_with(key) && err.contains(says), "{toml}: {err}");
            assert!(!err.contains("pw"), "{err}");
        }
    }

    #[test]
    fn every_problem_is_reported_with_where_it_was_set() {
        let dir = std::env::temp_dir().join(format!("rookery-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("three.toml");
        std::fs::write(
            &file,
            "[session]\nping_interval_ms = \"often\"\n\n[rooms]\nidle_stop_mss = 3\n\n[server]\nbind = \"nowhere\"\n",
        )
        .unwrap();
        let err = Config::load(Some(&file)).unwrap_err();
        let shown: Vec<String> = err.problems().iter().map(ToString::to_string).collect();
        std::fs::remove_dir_all(&dir).unwrap();
        let at = |line: usize, key: &str| {
            shown
                .iter()
                .any(|p| p.starts_with(&format!("{}:{line}:1: {key}:", file.display())))
        };
        assert_eq!(shown.len(), 3, "{shown:#?}");
        assert!(at(2, "session.ping_interval_ms"), "{shown:#?}");
        assert!(at(5, "rooms.idle_stop_mss"), "{shown:#?}");
        assert!(at(8, "server.bind"), "{shown:#?}");
    }

    #[test]
    fn locations_count_lines_and_characters_from_one() {
        let text = "a = 1\n[b]\n  c = 2\n";
        assert_eq!(locate_key(text, "a"), Some((1, 1)));
        assert_eq!(locate_key(text, "b.c"), Some((3, 3)));
        assert_eq!(locate_key(text, "b.d"), None);
    }

    #[test]
    fn the_keys_that_moved_to_the_policy_file_say_where() {
        let err = Config::from_toml("[rooms]\nhistory_limit = 5\nmax_body_bytes = 10").unwrap_err();
        let shown = err.to_string();
        assert!(
            shown.contains("rooms.history_limit: moved to the room policy file"),
            "{shown}"
        );
        assert!(shown.contains("rooms.max_body_bytes: moved"), "{shown}");
    }

    #[test]
    fn secrets_do_not_print() {
        let config =
            Config::from_toml("[database]\nurl = \"postgres://u:pw-do-not-print@h/db\"").unwrap();
        assert!(!format!("{config:?}").contains("pw-do-not-print"));
    }
}
