//! Rookery: a real-time chat server on the actor model. The layers, each importing only the
//! ones below it:
//!
//! - [`cli`] and [`server`]: the command line; bring-up, serving and shutdown; [`reload`]:
//!   live reload of the room policy file; [`operator`]: the operator's commands against the
//!   database (users, `verify`).
//! - [`transport`]: the WebSocket upgrade and frame stream; starts and feeds sessions;
//!   [`webchat`]: the built-in web chat's page, served beside it.
//! - [`session`]: one per connection: the actor shell and its plain parts (frame guard,
//!   request pipeline, room joins, phase).
//! - [`actors`]: `Room` and its `Directory`, `Presence`, `Gate`, `Hasher`, `Committer`, and
//!   the `DbExecutor` pool.
//! - [`store`]: plain functions over a Postgres connection; [`schema`] is diesel's table map.
//! - [`crypto`]: AES-256-GCM sealing of message bodies with rotating keys; [`tls`]: the TLS
//!   acceptor and the development certificate.
//! - [`protocol`]: the wire contract of docs/protocol.md: requests, replies, events, names.
//! - [`error`]: typed errors per area and their one mapping to protocol error codes.
//! - [`config`]: the layered configuration tree, read and checked all at once; [`policy`]:
//!   the admins' room policy file, read and checked all at once.
//! - [`ids`]: the identifiers every layer shares; [`secret`]: a string Debug never shows;
//!   [`rate`]: token buckets per key; [`metrics`]: the Prometheus figures every layer updates.
//!
//! With the `cli` feature (rookery-cli; never the server): [`client`], the client side of the
//! protocol (its TLS in `client_tls`). With `tools` (tests and rookery-bench) also [`checker`],
//! the history checker of fault and load runs.

pub mod actors;
#[cfg(feature = "tools")]
pub mod checker;
pub mod cli;
#[cfg(feature = "cli")]
pub mod client;
#[cfg(feature = "cli")]
mod client_tls;
pub mod config;
pub mod crypto;
pub mod error;
pub mod ids;
pub mod metrics;
pub mod operator;
pub mod policy;
pub mod protocol;
pub mod rate;
pub mod reload;
pub mod schema;
pub mod secret;
pub mod server;
pub mod session;
pub mod store;
pub mod tls;
pub mod transport;
pub mod webchat;
