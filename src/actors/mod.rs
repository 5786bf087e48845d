//! The actors. They talk only through the typed messages declared at the top of each file.
//!
//! - [`session::Session`]: one per WebSocket connection; parses requests, answers by id.
//! - [`directory::Directory`]: finds or starts the [`room::Room`] actor of a room name.
//! - [`room::Room`]: one per active room; orders, stores (via the DB executor) and fans out.
//! - [`presence::Presence`]: who is online and in which rooms, behind [`presence::PresenceHandle`].
//! - [`committer::Committer`]: group commit of rooms' batches into shared transactions.
//! - [`db::DbExecutor`]: a SyncArbiter pool running [`crate::store`] functions.
//! - [`hasher::Hasher`]: a SyncArbiter pool for bcrypt, with a bounded queue.
//! - [`gate::Gate`]: connection and login limits, and the list of sessions to drain on shutdown.

pub mod committer;
pub mod db;
pub mod directory;
pub mod gate;
pub mod hasher;
pub mod presence;
pub mod room;
pub mod session;
