//! The session: one per WebSocket connection. [`Session`] is the actor shell ([`shell`]);
//! it only wires messages, frames and ticks to the plain parts, each of which owns one
//! concern and is tested on its own:
//!
//! - [`guard`]: frames before they are requests (fragments, the bad-frame window, the
//!   request rate);
//! - [`pipeline`]: the order in which requests run, and the bounded queue of waiting ones;
//! - [`joins`]: the rooms joined, and the events held while a room is being joined;
//! - [`phase`]: anonymous, authenticated, draining or closed, and what a closing connection
//!   tells the others.
//!
//! [`requests`] is the path of a request from admission to the step after its reply; each
//! request is handled by one small function, by group: [`auth`], [`rooms`], [`messages`].
//! [`socket`] is the only part that names the WebSocket library.
//!
//! Calls: the DB executor, the directory, rooms, presence, the gate and the hasher, through
//! [`Services`]. Never imports the transport: the transport starts the session and feeds it.

mod auth;
pub mod guard;
mod hearing;
pub mod joins;
mod messages;
pub mod phase;
pub mod pipeline;
mod requests;
mod rooms;
mod shell;
pub mod socket;

pub use shell::{Peer, Session};

use actix::Addr;
use std::sync::Arc;
use std::time::Duration;

use crate::actors::db::{DbExecutor, DbQueue};
use crate::actors::directory::Directory;
use crate::actors::gate::Gate;
use crate::actors::hasher::HasherHandle;
use crate::actors::presence::PresenceHandle;
use crate::ids::UserId;
use crate::rate::SharedBuckets;

/// The actors a session talks to.
#[derive(Clone)]
pub struct Services {
    /// The read lane, bounded: a request may be refused `Busy`.
    pub db: Addr<DbQueue>,
    /// The read lane's executors themselves, for what must not be refused (revocation).
    pub executors: Addr<DbExecutor>,
    pub directory: Addr<Directory>,
    pub presence: PresenceHandle,
    pub gate: Addr<Gate>,
    pub hasher: HasherHandle,
    /// A user's sends across all of its sessions.
    pub sends_per_user: Arc<SharedBuckets<UserId>>,
    /// A user's typing requests across all of its sessions.
    pub typing_per_user: Arc<SharedBuckets<UserId>>,
}

/// Per-connection limits from config.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    pub ping_interval: Duration,
    pub client_timeout: Duration,
    pub outbound_queue: usize,
    pub outbound_limit_bytes: usize,
    /// A connection not authenticated this long after it opened is closed (1008).
    pub auth_timeout: Duration,
    pub max_waiting_requests: usize,
    /// The bytes of those requests at most.
    pub max_waiting_bytes: usize,
    /// How long a resume's restored rooms stay held for a `join {after}` that may follow.
    pub resume_join_wait: Duration,
    /// Whether `register` is open to anyone.
    pub registration_open: bool,
    pub guard: guard::GuardSettings,
}
