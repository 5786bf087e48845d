//! Rookery: a real-time chat server on the actor model.
//!
//! - [`cli`]: command line (`serve`, `migrate`, `check-config`).
//! - [`config`]: the layered configuration tree and its validation.
//! - [`server`]: prepares the database, keys and TLS, starts the actors and serves HTTP until shutdown.
//! - [`transport`]: the WebSocket binding; the only place that names actix-web-actors.
//! - [`protocol`]: the wire contract of docs/protocol.md: requests, replies, events, error codes, name rules.
//! - [`actors`]: `Session` (one per connection), `Room` and its `Directory`, `Presence`, `DbExecutor`.
//! - [`store`]: plain functions over a Postgres connection; [`schema`] is diesel's table map.
//! - [`crypto`]: AES-256-GCM sealing of message bodies with rotating keys.
//! - [`tls`]: the TLS acceptor and the development self-signed certificate.
//! - [`error`]: typed errors per area and their one mapping to protocol error codes.
//! - [`secret`]: a string whose Debug never shows it.
//! - [`checker`]: the history checker of fault tests and the load tool.
//! - [`client`]: the client side of the protocol, for tests, rookery-bench and clients.

pub mod actors;
pub mod checker;
pub mod cli;
pub mod client;
pub mod config;
pub mod crypto;
pub mod error;
pub mod protocol;
pub mod schema;
pub mod secret;
pub mod server;
pub mod store;
pub mod tls;
pub mod transport;
