//! The identifiers every layer shares: sessions, users, rooms and seqs. Plain values with no
//! behaviour beyond ordering and formatting; this module imports nothing of the crate, so that
//! any module may use it without an import running back up the layers.

use serde::Serialize;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// One connection within this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

/// Hands out session ids, one per connection, starting at 1. Cloned handles share the count.
#[derive(Debug, Clone, Default)]
pub struct SessionIds(Arc<AtomicU64>);

impl SessionIds {
    pub fn next(&self) -> SessionId {
        SessionId(self.0.fetch_add(1, Ordering::Relaxed) + 1)
    }
}

/// Database id of a user; a string on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(pub i64);

impl Serialize for UserId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for UserId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        text.parse().map(UserId).map_err(serde::de::Error::custom)
    }
}

/// Database id of a room; never on the wire (rooms are named).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomId(pub i64);

/// Position of a message in its room: 1, 2, 3, ... without gaps. A JSON number on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize)]
#[serde(transparent)]
pub struct Seq(pub i64);

impl Seq {
    pub fn next(self) -> Seq {
        Seq(self.0 + 1)
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_are_unique_across_clones() {
        let ids = SessionIds::default();
        let other = ids.clone();
        assert_eq!(ids.next(), SessionId(1));
        assert_eq!(other.next(), SessionId(2));
        assert_eq!(ids.next(), SessionId(3));
    }

    #[test]
    fn wire_forms() {
        assert_eq!(serde_json::to_string(&UserId(7)).ok(), Some("\"7\"".into()));
        assert_eq!(serde_json::to_string(&Seq(7)).ok(), Some("7".into()));
    }
}
