//! The actors behind the sessions. They talk only through the typed messages declared at the
//! top of each file.
//!
//! - [`directory::Directory`]: finds or starts the [`room::Room`] actor of a room name; keeps
//!   the sessions parked for a resume.
//! - [`room::Room`]: one per active room; orders, stores (via the committer) and fans out.
//! - [`presence::Presence`]: who is online and in which rooms, behind [`presence::PresenceHandle`].
//! - [`gate::Gate`]: connection and login limits, and the list of sessions to drain on shutdown.
//! - [`hasher::Hasher`]: a SyncArbiter pool for bcrypt, with a bounded queue.
//! - [`committer::Committer`]: group commit of rooms' batches into shared transactions.
//! - [`db::DbExecutor`]: a SyncArbiter pool running [`crate::store`] functions.
//! - [`cluster::Cluster`]: with `redis.url` set, the link to the other nodes: the bus,
//!   cluster-wide presence, node deaths.

pub mod cluster;
pub mod committer;
pub mod db;
pub mod directory;
pub mod gate;
pub mod hasher;
pub mod presence;
pub mod room;
