//! Events: frames the server sends unasked (`message`, `joined`, `left`, `typing`, `kicked`),
//! the message object they and history pages carry, and the one time format of the wire.
//! Each event is serialized once and its bytes shared by every recipient. Pure data.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

use crate::ids::Seq;

/// RFC 3339 UTC with milliseconds, the one time format on the wire.
pub fn format_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// A stored message as clients see it. `body` is absent and `error` set when the row
/// could not be decrypted or authenticated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MessageView {
    pub room: String,
    pub seq: Seq,
    pub from: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    pub sent_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_msg_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'static str>,
}

impl MessageView {
    /// At most the bytes of its JSON: its strings as JSON escapes them, plus the field names
    /// and punctuation.
    pub fn wire_len(&self) -> usize {
        const FRAMING: usize = 160;
        fn escaped(text: &str) -> usize {
            text.bytes()
                .map(|b| match b {
                    b'"' | b'\\' => 2,
                    0..=0x1f => 6,
                    _ => 1,
                })
                .sum()
        }
        FRAMING
            + self.room.len()
            + self.from.len()
            + self.body.as_deref().map_or(0, escaped)
            + self.sent_at.len()
            + self.client_msg_id.as_ref().map_or(0, String::len)
    }
}

/// The `error` value of a message whose stored row failed to decrypt.
pub const UNDECRYPTABLE: &str = "undecryptable";

/// Server-initiated frames.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event<'a> {
    Message(&'a MessageView),
    Joined { room: &'a str, user: &'a str },
    Left { room: &'a str, user: &'a str },
    Typing { room: &'a str, user: &'a str },
    Kicked { room: &'a str, reason: &'a str },
}

impl Event<'_> {
    pub fn to_frame(&self) -> String {
        // Serializing plain strings and integers cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn a_message_event_is_the_message_object_with_its_type() {
        let view = MessageView {
            room: "a".into(),
            seq: Seq(1),
            from: "ann".into(),
            body: Some("hi".into()),
            sent_at: "2026-01-01T00:00:00.000Z".into(),
            client_msg_id: None,
            error: None,
        };
        let event: Value = serde_json::from_str(&Event::Message(&view).to_frame()).unwrap();
        assert_eq!(
            event,
            serde_json::json!({"type":"message","room":"a","seq":1,"from":"ann","body":"hi","sent_at":"2026-01-01T00:00:00.000Z"})
        );
    }

    #[test]
    fn wire_len_is_never_less_than_the_json() {
        for body in [
            "",
            "hi",
            "\"quoted\" \\ back",
            "\u{0}\u{1f}\n",
            &"é".repeat(50),
        ] {
            let view = MessageView {
                room: "general-purpose".into(),
                seq: Seq(i64::MAX),
                from: "a-long-user-name.x".into(),
                body: Some(body.into()),
                sent_at: "2026-01-01T00:00:00.000Z".into(),
                client_msg_id: Some("c".repeat(128)),
                error: Some("undecryptable"),
            };
            let json = serde_json::to_string(&view).unwrap();
            assert!(
                view.wire_len() >= json.len(),
                "{body:?}: {} < {}",
                view.wire_len(),
                json.len()
            );
        }
    }
}
