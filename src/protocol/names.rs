//! Names with rules: [`Username`] and [`RoomName`]. A value of either type has passed its rule,
//! so code past the parser never checks a name again (parse, don't validate). Deserializing
//! one enforces the rule; serializing writes the plain string.

use serde::{Deserialize, Serialize, Serializer};
use std::borrow::Borrow;
use std::fmt;

/// Prefix of direct rooms: `dm:<user>:<user>`, the two usernames in sorted order. Other room
/// names cannot contain ':'.
pub const DM_PREFIX: &str = "dm:";

/// A name outside its rule; the message says the rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("username must be 3..32 characters of A-Z a-z 0-9 _ . -")]
    Username,
    #[error("room must be 1..64 characters of a-z 0-9 _ -")]
    Room,
    #[error("the dm: prefix is reserved for direct rooms")]
    ReservedRoom,
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $rule:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
        #[serde(try_from = "String")]
        pub struct $name(String);

        impl $name {
            pub fn parse(text: impl Into<String>) -> Result<$name, NameError> {
                let text = text.into();
                let check: fn(&str) -> Result<(), NameError> = $rule;
                check(&text)?;
                Ok($name(text))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(text: String) -> Result<$name, NameError> {
                $name::parse(text)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl From<$name> for String {
            fn from(name: $name) -> String {
                name.0
            }
        }
    };
}

name_type!(
    /// 3 to 32 characters of `A-Z a-z 0-9 _ . -`.
    Username,
    |name| {
        let ok = (3..=32).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        ok.then_some(()).ok_or(NameError::Username)
    }
);

name_type!(
    /// 1 to 64 characters of `a-z 0-9 _ -`, or a direct room's `dm:<user>:<user>`.
    RoomName,
    |name| {
        if let Some(users) = name.strip_prefix(DM_PREFIX) {
            let direct = users.split_once(':').is_some_and(|(a, b)| {
                Username::parse(a).is_ok() && Username::parse(b).is_ok() && a < b
            });
            return direct.then_some(()).ok_or(NameError::ReservedRoom);
        }
        let ok = (1..=64).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'));
        ok.then_some(()).ok_or(NameError::Room)
    }
);

impl RoomName {
    /// Whether this is the name of a direct room.
    pub fn is_direct(&self) -> bool {
        self.0.starts_with(DM_PREFIX)
    }
}

/// What two spellings of one username share: usernames are unique regardless of ASCII case
/// (`Ann` and `ann` are one account), while each keeps the spelling it registered for display.
pub fn username_key(name: &str) -> String {
    name.to_ascii_lowercase()
}

/// The name of the direct room of two users, the same whichever of them asks.
pub fn direct_room_name(a: &str, b: &str) -> RoomName {
    let (first, second) = if a <= b { (a, b) } else { (b, a) };
    RoomName(format!("{DM_PREFIX}{first}:{second}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules() {
        assert!(Username::parse("ab").is_err());
        assert!(Username::parse("a_b.c-d").is_ok());
        assert!(Username::parse("a".repeat(33)).is_err());
        assert!(Username::parse("ann smith").is_err());
        assert!(RoomName::parse("general").is_ok());
        assert_eq!(RoomName::parse("General"), Err(NameError::Room));
        assert!(RoomName::parse("").is_err());
        assert!(RoomName::parse("a".repeat(65)).is_err());
        assert!(RoomName::parse("dm:ann:bob").is_ok_and(|r| r.is_direct()));
        assert_eq!(RoomName::parse("dm:bob:ann"), Err(NameError::ReservedRoom));
        assert_eq!(RoomName::parse("dm:ann"), Err(NameError::ReservedRoom));
        assert_eq!(RoomName::parse("dm:a:bob"), Err(NameError::ReservedRoom));
        assert_eq!(
            direct_room_name("bob", "ann"),
            direct_room_name("ann", "bob")
        );
        assert_eq!(direct_room_name("bob", "ann").as_str(), "dm:ann:bob");
    }

    #[test]
    fn serde_enforces_the_rule_and_writes_the_plain_string() {
        let room: RoomName = serde_json::from_str("\"general\"").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            serde_json::to_string(&room).ok().as_deref(),
            Some("\"general\"")
        );
        let bad = serde_json::from_str::<RoomName>("\"No Caps\"").unwrap_err();
        assert!(
            bad.to_string().starts_with(&NameError::Room.to_string()),
            "{bad}"
        );
        assert!(serde_json::from_str::<Username>("\"x y\"").is_err());
    }
}
