//! The wire contract of docs/protocol.md: typed requests, reply and event frames, error codes,
//! name rules and the one place where seq values are parsed and formatted.
//! Pure data and functions: this module owns no state and calls no actor.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};
use std::fmt;

use crate::secret::Secret;

/// Longest request id accepted; longer ids are refused so a client cannot make us echo megabytes.
pub const MAX_ID_LEN: usize = 128;
/// Longest `client_msg_id` accepted.
pub const MAX_CLIENT_MSG_ID_LEN: usize = 128;
/// Most members a `create_room` may name at once.
pub const MAX_MEMBERS_PER_REQUEST: usize = 1000;
/// Largest `limit` of a `history` page.
pub const MAX_HISTORY_LIMIT: u32 = 100;
/// Reserved prefix of direct rooms; the name rule already excludes ':' from user-created names.
pub const DM_PREFIX: &str = "dm:";

/// Error codes of the contract, serialized in snake_case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
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

/// Database id of a user; a string on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(pub i64);

/// Database id of a room; never on the wire (rooms are named).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomId(pub i64);

/// Position of a message in its room: 1, 2, 3, ... without gaps.
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

impl Serialize for UserId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

/// Accepts a seq as a JSON number or a string of digits; both are >= 0.
fn de_opt_seq<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Seq>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Num(i64),
        Text(String),
    }
    let raw: Option<Raw> = Option::deserialize(d)?;
    let value = match raw {
        None => return Ok(None),
        Some(Raw::Num(n)) => n,
        Some(Raw::Text(t)) => t
            .parse::<i64>()
            .map_err(|_| serde::de::Error::custom("seq must be a non-negative integer"))?,
    };
    if value < 0 {
        return Err(serde::de::Error::custom(
            "seq must be a non-negative integer",
        ));
    }
    Ok(Some(Seq(value)))
}

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

/// A client request, tagged by "type". Unknown fields are ignored for forward compatibility.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    Register {
        username: String,
        password: Secret,
    },
    Login {
        username: String,
        password: Secret,
    },
    Resume {
        token: Secret,
    },
    Logout {},
    Ping {},
    Rooms {},
    CreateRoom {
        room: String,
        kind: RoomKind,
        #[serde(default)]
        members: Vec<String>,
    },
    Join {
        room: String,
        #[serde(default, deserialize_with = "de_opt_seq")]
        after: Option<Seq>,
    },
    Leave {
        room: String,
    },
    #[serde(rename = "send")]
    Post {
        room: String,
        body: String,
        #[serde(default)]
        client_msg_id: Option<String>,
    },
    History {
        room: String,
        #[serde(default, deserialize_with = "de_opt_seq")]
        before: Option<Seq>,
        #[serde(default)]
        limit: Option<u32>,
    },
    Who {
        room: String,
    },
    Typing {
        room: String,
    },
}

const REQUEST_TYPES: &[&str] = &[
    "register",
    "login",
    "resume",
    "logout",
    "ping",
    "rooms",
    "create_room",
    "join",
    "leave",
    "send",
    "history",
    "who",
    "typing",
];

/// Request types the contract names but this server does not serve yet.
const NOT_YET_SERVED: &[&str] = &["invite", "revoke", "dm"];

impl Request {
    /// Requests allowed before authentication.
    pub fn allowed_anonymous(&self) -> bool {
        matches!(
            self,
            Request::Register { .. }
                | Request::Login { .. }
                | Request::Resume { .. }
                | Request::Ping {}
        )
    }

    /// Whether the request changes the connection's state (who it is, which rooms it joined),
    /// so that requests after it must see its effect.
    pub fn changes_session(&self) -> bool {
        !matches!(
            self,
            Request::Ping {}
                | Request::Post { .. }
                | Request::History { .. }
                | Request::Who { .. }
                | Request::Typing { .. }
        )
    }

    /// Checks the name rules and field ranges that do not depend on a room's policy.
    pub fn validate(&self) -> Result<(), Rejection> {
        match self {
            Request::Register { username, password } => {
                check_username(username)?;
                check_password(password)
            }
            Request::Login { username, password } => {
                // A username outside the rule can never match; say so without touching bcrypt.
                check_username(username)?;
                check_password_len(password)
            }
            Request::Resume { token } => {
                if token.is_empty() || token.expose().len() > 128 {
                    return Err(Rejection::bad("token must be 1..128 characters"));
                }
                Ok(())
            }
            Request::CreateRoom { room, members, .. } => {
                check_room(room)?;
                if members.len() > MAX_MEMBERS_PER_REQUEST {
                    return Err(Rejection::bad(format!(
                        "at most {MAX_MEMBERS_PER_REQUEST} members per request"
                    )));
                }
                members.iter().try_for_each(|m| check_username(m))
            }
            Request::Join { room, .. }
            | Request::Leave { room }
            | Request::Who { room }
            | Request::Typing { room } => check_room(room),
            Request::Post {
                room,
                body,
                client_msg_id,
            } => {
                check_room(room)?;
                if body.is_empty() {
                    return Err(Rejection::bad("body must not be empty"));
                }
                if let Some(id) = client_msg_id {
                    if id.is_empty() || id.len() > MAX_CLIENT_MSG_ID_LEN {
                        return Err(Rejection::bad(format!(
                            "client_msg_id must be 1..{MAX_CLIENT_MSG_ID_LEN} bytes"
                        )));
                    }
                }
                Ok(())
            }
            Request::History { room, limit, .. } => {
                check_room(room)?;
                match limit {
                    Some(n) if *n < 1 || *n > MAX_HISTORY_LIMIT => Err(Rejection::bad(format!(
                        "limit must be 1..{MAX_HISTORY_LIMIT}"
                    ))),
                    _ => Ok(()),
                }
            }
            Request::Logout {} | Request::Ping {} | Request::Rooms {} => Ok(()),
        }
    }
}

/// Why a frame or request was refused before reaching any actor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: ErrorCode,
    pub message: String,
}

impl Rejection {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Rejection {
            code,
            message: message.into(),
        }
    }

    pub fn bad(message: impl Into<String>) -> Self {
        Rejection::new(ErrorCode::BadRequest, message)
    }
}

/// A frame that could not be turned into a request. `id` is kept when the frame carried a usable one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    pub id: Option<String>,
    pub rejection: Rejection,
}

/// Parses one text frame: first the envelope (`id`, `type`) so the id survives a bad body,
/// then the typed request.
pub fn parse_request(text: &str) -> Result<(String, Request), FrameError> {
    let fail = |id: Option<String>, message: String| FrameError {
        id,
        rejection: Rejection::bad(message),
    };
    let value: Value =
        serde_json::from_str(text).map_err(|_| fail(None, "malformed JSON".into()))?;
    let Value::Object(object) = &value else {
        return Err(fail(None, "a frame must be a JSON object".into()));
    };
    let id = match object.get("id") {
        Some(Value::String(id)) if !id.is_empty() && id.chars().count() <= MAX_ID_LEN => id.clone(),
        Some(Value::String(_)) => {
            return Err(fail(None, format!("id must be 1..{MAX_ID_LEN} characters")))
        }
        Some(_) => return Err(fail(None, "id must be a string".into())),
        None => return Err(fail(None, "missing id".into())),
    };
    let kind = match object.get("type") {
        Some(Value::String(kind)) => kind.as_str(),
        Some(_) => return Err(fail(Some(id), "type must be a string".into())),
        None => return Err(fail(Some(id), "missing type".into())),
    };
    if NOT_YET_SERVED.contains(&kind) {
        return Err(fail(
            Some(id),
            format!("request type '{kind}' is not served by this server yet"),
        ));
    }
    if !REQUEST_TYPES.contains(&kind) {
        let shown: String = kind.chars().take(32).collect();
        return Err(fail(Some(id), format!("unknown request type '{shown}'")));
    }
    match serde_json::from_value::<Request>(value) {
        Ok(request) => Ok((id, request)),
        Err(e) => Err(fail(Some(id), describe_field_error(&e))),
    }
}

/// serde's messages can quote the offending value; keep only the part that names the field.
fn describe_field_error(e: &serde_json::Error) -> String {
    let text = e.to_string();
    if let Some(rest) = text.strip_prefix("missing field ") {
        return format!("missing field {}", rest.split(' ').next().unwrap_or(rest));
    }
    if text.starts_with("invalid type") {
        return "a field has the wrong type".to_string();
    }
    if text.starts_with("unknown variant") {
        return "a field has a value outside the allowed set".to_string();
    }
    if text.contains("seq must be") {
        return "seq must be a non-negative integer".to_string();
    }
    "invalid request fields".to_string()
}

pub fn check_username(name: &str) -> Result<(), Rejection> {
    let ok = (3..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Rejection::bad(
            "username must be 3..32 characters of A-Z a-z 0-9 _ . -",
        ))
    }
}

fn check_password_len(password: &Secret) -> Result<(), Rejection> {
    if password.expose().len() > 72 {
        return Err(Rejection::bad(
            "password must be at most 72 bytes (bcrypt's limit; it is never truncated)",
        ));
    }
    Ok(())
}

pub fn check_password(password: &Secret) -> Result<(), Rejection> {
    if password.expose().len() < 8 {
        return Err(Rejection::bad("password must be at least 8 bytes"));
    }
    check_password_len(password)
}

pub fn check_room(name: &str) -> Result<(), Rejection> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'));
    if ok {
        Ok(())
    } else if name.starts_with(DM_PREFIX) {
        Err(Rejection::bad(
            "the dm: prefix is reserved for direct rooms",
        ))
    } else {
        Err(Rejection::bad(
            "room must be 1..64 characters of a-z 0-9 _ -",
        ))
    }
}

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

/// The `error` value of a message whose stored row failed to decrypt.
pub const UNDECRYPTABLE: &str = "undecryptable";

/// Server-initiated frames. Each is serialized once and the bytes shared by all recipients.
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

/// `{"type":"ok","id":..., ...payload}`. A payload that is not an object adds nothing.
pub fn ok_frame(id: &str, payload: Value) -> String {
    let mut object = Map::new();
    object.insert("type".into(), Value::from("ok"));
    object.insert("id".into(), Value::from(id));
    if let Value::Object(fields) = payload {
        object.extend(fields);
    }
    Value::Object(object).to_string()
}

/// `{"type":"error","id":...|null,"code":...,"message":...}`.
pub fn error_frame(id: Option<&str>, code: ErrorCode, message: &str) -> String {
    serde_json::json!({"type": "error", "id": id, "code": code, "message": message}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_err(text: &str) -> FrameError {
        match parse_request(text) {
            Err(e) => e,
            Ok((_, r)) => panic!("expected an error, parsed {r:?}"),
        }
    }

    #[test]
    fn parses_every_request_type() {
        let frames = [
            r#"{"id":"1","type":"register","username":"ann","password":"password1"}"#,
            r#"{"id":"1","type":"login","username":"ann","password":"password1"}"#,
            r#"{"id":"1","type":"resume","token":"abc"}"#,
            r#"{"id":"1","type":"logout"}"#,
            r#"{"id":"1","type":"ping"}"#,
            r#"{"id":"1","type":"rooms"}"#,
            r#"{"id":"1","type":"create_room","room":"a","kind":"private","members":["bob"]}"#,
            r#"{"id":"1","type":"join","room":"a","after":"7"}"#,
            r#"{"id":"1","type":"leave","room":"a"}"#,
            r#"{"id":"1","type":"send","room":"a","body":"hi","client_msg_id":"c1"}"#,
            r#"{"id":"1","type":"history","room":"a","before":10,"limit":5}"#,
            r#"{"id":"1","type":"who","room":"a"}"#,
            r#"{"id":"1","type":"typing","room":"a"}"#,
        ];
        for frame in frames {
            let (id, request) = parse_request(frame).unwrap_or_else(|e| panic!("{frame}: {e:?}"));
            assert_eq!(id, "1");
            request
                .validate()
                .unwrap_or_else(|e| panic!("{frame}: {e:?}"));
        }
        let (_, join) = parse_request(r#"{"id":"x","type":"join","room":"a","after":7}"#).unwrap();
        assert!(matches!(
            join,
            Request::Join {
                after: Some(Seq(7)),
                ..
            }
        ));
    }

    #[test]
    fn keeps_the_id_of_a_bad_body() {
        let e = parse_err(r#"{"id":"42","type":"send","room":"a"}"#);
        assert_eq!(e.id.as_deref(), Some("42"));
        assert_eq!(e.rejection.code, ErrorCode::BadRequest);
        assert_eq!(e.rejection.message, "missing field `body`");
        let e = parse_err(r#"{"id":"42","type":"send","room":"a","body":5}"#);
        assert_eq!(e.id.as_deref(), Some("42"));
        let e = parse_err(r#"{"id":"42","type":"fly"}"#);
        assert_eq!(e.id.as_deref(), Some("42"));
        assert!(e.rejection.message.contains("unknown request type"));
    }

    #[test]
    fn frames_without_a_usable_id_answer_with_null() {
        for text in [
            "not json",
            "[1,2]",
            r#"{"type":"ping"}"#,
            r#"{"id":5,"type":"ping"}"#,
            "",
        ] {
            assert_eq!(parse_err(text).id, None, "{text}");
        }
        let long = format!(r#"{{"id":"{}","type":"ping"}}"#, "x".repeat(MAX_ID_LEN + 1));
        assert_eq!(parse_err(&long).id, None);
    }

    #[test]
    fn wrong_types_do_not_echo_the_value() {
        let e = parse_err(r#"{"id":"1","type":"login","username":"ann","password":12345678}"#);
        assert!(!e.rejection.message.contains("12345678"));
    }

    #[test]
    fn name_rules() {
        assert!(check_username("ab").is_err());
        assert!(check_username("a_b.c-d").is_ok());
        assert!(check_username(&"a".repeat(33)).is_err());
        assert!(check_username("ann smith").is_err());
        assert!(check_room("general").is_ok());
        assert!(check_room("General").is_err());
        assert!(check_room("").is_err());
        assert!(check_room(&"a".repeat(65)).is_err());
        assert!(check_room("dm:ann:bob")
            .unwrap_err()
            .message
            .contains("reserved"));
        assert!(check_password(&Secret::new("short")).is_err());
        assert!(check_password(&Secret::new("x".repeat(72))).is_ok());
        assert!(check_password(&Secret::new("x".repeat(73))).is_err());
    }

    #[test]
    fn request_ranges() {
        let (_, r) = parse_request(r#"{"id":"1","type":"history","room":"a","limit":0}"#).unwrap();
        assert!(r.validate().is_err());
        let (_, r) = parse_request(r#"{"id":"1","type":"send","room":"a","body":""}"#).unwrap();
        assert!(r.validate().is_err());
        assert!(parse_request(r#"{"id":"1","type":"join","room":"a","after":-1}"#).is_err());
        assert!(
            parse_request(r#"{"id":"1","type":"create_room","room":"a","kind":"secret"}"#).is_err()
        );
    }

    #[test]
    fn frames_have_the_contract_shape() {
        let ok: Value =
            serde_json::from_str(&ok_frame("7", serde_json::json!({"seq": 3}))).unwrap();
        assert_eq!(ok, serde_json::json!({"type":"ok","id":"7","seq":3}));
        let err: Value =
            serde_json::from_str(&error_frame(None, ErrorCode::TooLarge, "too big")).unwrap();
        assert_eq!(
            err,
            serde_json::json!({"type":"error","id":null,"code":"too_large","message":"too big"})
        );
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

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        fn json_value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                any::<f64>().prop_map(|f| serde_json::Number::from_f64(f)
                    .map(Value::Number)
                    .unwrap_or(Value::Null)),
                ".{0,40}".prop_map(Value::from),
            ];
            leaf.prop_recursive(4, 64, 8, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::from),
                    proptest::collection::btree_map(".{0,12}", inner, 0..8)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        /// Objects that look like requests: a known or unknown type, and fields drawn from the
        /// contract's names with arbitrary values.
        fn request_like() -> impl Strategy<Value = Value> {
            let kinds = prop_oneof![
                proptest::sample::select(REQUEST_TYPES.to_vec()).prop_map(Value::from),
                json_value(),
            ];
            let field = proptest::sample::select(vec![
                "id",
                "username",
                "password",
                "token",
                "room",
                "kind",
                "members",
                "after",
                "body",
                "client_msg_id",
                "before",
                "limit",
                "user",
            ]);
            (
                kinds,
                proptest::collection::btree_map(field, json_value(), 0..6),
            )
                .prop_map(|(kind, fields)| {
                    let mut object: Map<String, Value> = fields
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v))
                        .collect();
                    object.insert("type".into(), kind);
                    object.entry("id").or_insert(Value::from("x"));
                    Value::Object(object)
                })
        }

        fn check(text: &str) {
            match parse_request(text) {
                Ok((id, request)) => {
                    assert!(!id.is_empty());
                    let _ = request.validate();
                    let _ = request.changes_session();
                }
                Err(e) => {
                    assert_eq!(e.rejection.code, ErrorCode::BadRequest);
                    assert!(!e.rejection.message.is_empty());
                    let frame: Value = serde_json::from_str(&error_frame(
                        e.id.as_deref(),
                        e.rejection.code,
                        &e.rejection.message,
                    ))
                    .unwrap();
                    assert_eq!(frame["type"], "error");
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

            #[test]
            fn arbitrary_text_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
                check(&String::from_utf8_lossy(&bytes));
            }

            #[test]
            fn arbitrary_json_never_panics(value in json_value()) {
                check(&value.to_string());
            }

            #[test]
            fn request_shaped_json_never_panics(value in request_like()) {
                check(&value.to_string());
            }
        }
    }
}
