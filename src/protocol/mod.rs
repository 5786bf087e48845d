//! The wire contract of docs/protocol.md: [`request`] (what clients send, and the parser),
//! [`reply`] (the `ok` payloads and the frames of replies), [`event`] (what the server sends
//! unasked) and [`names`] (usernames and room names, checked by their types); here, the few
//! words they all use. Pure data and functions: nothing here owns state or calls an actor.

use serde::{Deserialize, Serialize};
use std::fmt;

pub mod event;
pub mod names;
pub mod reply;
pub mod request;

pub use event::*;
pub use names::*;
pub use reply::*;
pub use request::*;

/// Error codes of the contract, serialized in snake_case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, strum::IntoStaticStr)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    InvalidCredentials,
    Forbidden,
    NotFound,
    Conflict,
    TooLarge,
    RateLimited,
    Unavailable,
    Internal,
}

/// The id a client gave its request: 1 to [`MAX_ID_LEN`] characters, echoed in the reply.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct RequestId(String);

impl RequestId {
    pub fn parse(id: impl Into<String>) -> Option<RequestId> {
        let id = id.into();
        (!id.is_empty() && id.chars().count() <= MAX_ID_LEN).then_some(RequestId(id))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Room kinds of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoomKind {
    Public,
    Private,
}

impl RoomKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RoomKind::Public => "public",
            RoomKind::Private => "private",
        }
    }

    pub fn parse(text: &str) -> Option<RoomKind> {
        match text {
            "public" => Some(RoomKind::Public),
            "private" => Some(RoomKind::Private),
            _ => None,
        }
    }
}
