//! Row types and the plain values the store hands back. No queries here.

use chrono::{DateTime, Utc};
use diesel::prelude::*;

use crate::ids::{RoomId, Seq, UserId};
use crate::protocol::{MessageView, RoomKind};

/// A user as the rest of the server knows it (never with its password hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    pub id: UserId,
    pub username: String,
}

/// What a login checks: the user, its bcrypt hash, and whether an operator disabled it.
#[derive(Debug, Clone)]
pub struct Login {
    pub user: UserRecord,
    pub password_hash: String,
    pub disabled: bool,
}

/// Where a room comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoomOrigin {
    /// Created over the protocol; its owner manages it.
    User,
    /// Defined by the policy file; its admins manage it.
    Config,
    /// The direct room of two users; nobody manages it.
    Direct,
}

impl RoomOrigin {
    pub fn as_str(self) -> &'static str {
        match self {
            RoomOrigin::User => "user",
            RoomOrigin::Config => "config",
            RoomOrigin::Direct => "direct",
        }
    }

    /// The CHECK constraint admits only the three values.
    pub fn parse(text: &str) -> RoomOrigin {
        match text {
            "config" => RoomOrigin::Config,
            "direct" => RoomOrigin::Direct,
            _ => RoomOrigin::User,
        }
    }
}

/// A room's durable facts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomRecord {
    pub id: RoomId,
    pub name: String,
    pub kind: RoomKind,
    pub owner: Option<String>,
    pub last_seq: Seq,
    pub origin: RoomOrigin,
    /// Removed from the policy file: no joins, no sends; its history stays.
    pub closed: bool,
}

/// What a Room actor needs to start: its record, its whitelist and its newest messages.
#[derive(Debug, Clone)]
pub struct RoomState {
    pub record: RoomRecord,
    pub members: Vec<UserId>,
    pub recent: Vec<MessageView>,
}

/// One line of the `rooms` listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomSummary {
    pub name: String,
    pub kind: RoomKind,
    pub last_seq: Seq,
}

/// The outcome of storing a message. `duplicate` is set when `client_msg_id` matched an
/// earlier message of the same sender, whose seq and time are returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub seq: Seq,
    pub sent_at: DateTime<Utc>,
    pub duplicate: bool,
}

/// Why one message of a batch could not be stored while the others were (a value the
/// database refuses): the sender hears `bad_request`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The database's reason, for the log.
    pub why: String,
}

/// What became of one message of a batch.
pub type Outcome = Result<Stored, Refused>;

/// One page of history in ascending seq.
#[derive(Debug, Clone, Default)]
pub struct HistoryPage {
    pub messages: Vec<MessageView>,
    pub has_more: bool,
    /// Seqs of rows that failed to open, with the reason, for the operator's log.
    pub unreadable: Vec<(Seq, String)>,
}

#[derive(Debug, Queryable)]
pub struct MessageRow {
    pub seq: i64,
    pub client_msg_id: Option<String>,
    pub sender_id: i64,
    pub key_id: i32,
    pub aad_version: i16,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
    pub created_at: DateTime<Utc>,
    pub username: String,
}
