//! Replies: the error codes of the contract and the payload of every `ok` reply, each a serde
//! type serialized once into its frame by [`ok_frame`] or [`error_frame`]. Pure data.

use serde::Serialize;

use super::event::MessageView;
use super::{ErrorCode, RequestId, RoomKind};
use crate::ids::{Seq, UserId};
use crate::metrics::METRICS;
use crate::secret::Secret;

/// A user as replies show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UserView {
    pub id: UserId,
    pub username: String,
}

/// A room a `resume` restored, with the last seq delivered in it when the resume took effect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RestoredRoom {
    pub name: String,
    pub last_seq: Seq,
}

/// One line of the `rooms` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RoomListing {
    pub name: String,
    pub kind: RoomKind,
    /// Whether this connection has joined it.
    pub joined: bool,
    pub last_seq: Seq,
}

/// The room of a `create_room` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CreatedRoom {
    pub name: String,
    pub kind: RoomKind,
    pub owner: Option<String>,
}

/// A room as the `dm` reply names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RoomRef {
    pub name: String,
    pub kind: RoomKind,
}

/// The room of a `join` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JoinedRoom {
    pub name: String,
    pub kind: RoomKind,
    pub last_seq: Seq,
}

/// The payload of an `ok` reply, by request.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Reply {
    /// `ping`, `logout`, `leave`, `typing`.
    Done {},
    Registered {
        user: UserView,
    },
    LoggedIn {
        user: UserView,
        token: Secret,
    },
    Resumed {
        user: UserView,
        rooms: Vec<RestoredRoom>,
    },
    Rooms {
        rooms: Vec<RoomListing>,
    },
    Created {
        room: CreatedRoom,
    },
    /// With `after`: `missed` and `truncated` too.
    Joined {
        room: JoinedRoom,
        #[serde(skip_serializing_if = "Option::is_none")]
        missed: Option<Vec<MessageView>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        truncated: Option<bool>,
    },
    Sent {
        seq: Seq,
        sent_at: String,
    },
    History {
        messages: Vec<MessageView>,
        has_more: bool,
    },
    Online {
        online: Vec<String>,
    },
    /// `dm`.
    Direct {
        room: RoomRef,
    },
}

#[derive(Serialize)]
struct OkFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    id: &'a RequestId,
    #[serde(flatten)]
    reply: &'a Reply,
}

#[derive(Serialize)]
struct ErrorFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    id: Option<&'a RequestId>,
    code: ErrorCode,
    message: &'a str,
}

/// `{"type":"ok","id":..., ...payload}`.
pub fn ok_frame(id: &RequestId, reply: &Reply) -> String {
    // Strings, numbers and lists of them: serializing cannot fail.
    serde_json::to_string(&OkFrame {
        kind: "ok",
        id,
        reply,
    })
    .unwrap_or_default()
}

/// `{"type":"error","id":...|null,"code":...,"message":...}`.
pub fn error_frame(id: Option<&RequestId>, code: ErrorCode, message: &str) -> String {
    let label: &'static str = code.into();
    METRICS.errors.with_label_values(&[label]).inc();
    if code == ErrorCode::RateLimited {
        METRICS.rate_limited.inc();
    }
    serde_json::to_string(&ErrorFrame {
        kind: "error",
        id,
        code,
        message,
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn id(text: &str) -> RequestId {
        RequestId::parse(text).unwrap()
    }

    fn parsed(frame: String) -> Value {
        serde_json::from_str(&frame).unwrap()
    }

    #[test]
    fn frames_have_the_contract_shape() {
        let sent = Reply::Sent {
            seq: Seq(3),
            sent_at: "2026-01-01T00:00:00.000Z".into(),
        };
        assert_eq!(
            parsed(ok_frame(&id("7"), &sent)),
            json!({"type":"ok","id":"7","seq":3,"sent_at":"2026-01-01T00:00:00.000Z"})
        );
        assert_eq!(
            parsed(ok_frame(&id("7"), &Reply::Done {})),
            json!({"type":"ok","id":"7"})
        );
        assert_eq!(
            parsed(error_frame(None, ErrorCode::TooLarge, "too big")),
            json!({"type":"error","id":null,"code":"too_large","message":"too big"})
        );
    }

    #[test]
    fn replies_name_their_fields_as_the_contract_does() {
        let user = UserView {
            id: UserId(1),
            username: "ann".into(),
        };
        let logged_in = Reply::LoggedIn {
            user: user.clone(),
            token: Secret::new("tok"),
        };
        assert_eq!(
            parsed(ok_frame(&id("2"), &logged_in)),
            json!({"type":"ok","id":"2","user":{"id":"1","username":"ann"},"token":"tok"})
        );
        let joined = Reply::Joined {
            room: JoinedRoom {
                name: "general".into(),
                kind: RoomKind::Public,
                last_seq: Seq(12),
            },
            missed: None,
            truncated: None,
        };
        assert_eq!(
            parsed(ok_frame(&id("8"), &joined)),
            json!({"type":"ok","id":"8","room":{"name":"general","kind":"public","last_seq":12}})
        );
        let listing = Reply::Rooms {
            rooms: vec![RoomListing {
                name: "staff".into(),
                kind: RoomKind::Private,
                joined: false,
                last_seq: Seq(3),
            }],
        };
        assert_eq!(
            parsed(ok_frame(&id("6"), &listing)),
            json!({"type":"ok","id":"6","rooms":[{"name":"staff","kind":"private","joined":false,"last_seq":3}]})
        );
    }
}
