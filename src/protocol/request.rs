//! Requests: the typed [`Request`] a client sends, its derived [`RequestKind`], and
//! [`parse_request`], which reads one text frame in three steps: the envelope (`id`, `type`),
//! so that the id survives a bad body; the request's shape, with names still plain strings
//! ([`Unchecked`]); then its names and ranges, in the order the contract reports them, which
//! turns it into a [`Request`]. The client side serializes the same type ([`RequestFrame`]).
//! Also the one place where seq values are read. Pure data and functions: no state, no actor.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use std::str::FromStr;
use strum::{EnumDiscriminants, IntoStaticStr, VariantArray};

use super::names::{NameError, RoomName, Username};
use super::{ErrorCode, RequestId, RoomKind};
use crate::ids::Seq;
use crate::secret::Secret;

/// Longest request id accepted; longer ids are refused so a client cannot make us echo megabytes.
pub const MAX_ID_LEN: usize = 128;
/// Longest `client_msg_id` accepted.
pub const MAX_CLIENT_MSG_ID_LEN: usize = 128;
/// Most members a `create_room` may name at once.
pub const MAX_MEMBERS_PER_REQUEST: usize = 1000;
/// Largest `limit` of a `history` page.
pub const MAX_HISTORY_LIMIT: u32 = 100;
/// Longest token a `resume` may carry.
pub const MAX_TOKEN_LEN: usize = 128;

/// A client request, tagged by "type". Unknown fields are ignored for forward compatibility.
/// [`RequestKind`] is derived from it: one variant per request type, named as on the wire.
/// With its defaults, `R` and `U` are [`RoomName`] and [`Username`], whose deserialization
/// enforces their rules; [`Unchecked`] holds the names as read.
#[derive(Debug, Clone, Serialize, Deserialize, EnumDiscriminants)]
#[serde(tag = "type", rename_all = "snake_case")]
#[strum_discriminants(
    name(RequestKind),
    derive(Hash, IntoStaticStr, strum::EnumString, VariantArray),
    strum(serialize_all = "snake_case")
)]
pub enum Request<R = RoomName, U = Username> {
    Register {
        username: U,
        password: Secret,
    },
    Login {
        username: U,
        password: Secret,
    },
    Resume {
        token: Secret,
    },
    Logout {},
    Ping {},
    Rooms {},
    CreateRoom {
        room: R,
        kind: RoomKind,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        members: Vec<U>,
    },
    Join {
        room: R,
        #[serde(
            default,
            deserialize_with = "de_opt_seq",
            skip_serializing_if = "Option::is_none"
        )]
        after: Option<Seq>,
    },
    Leave {
        room: R,
    },
    #[serde(rename = "send")]
    #[strum_discriminants(strum(serialize = "send"))]
    Post {
        room: R,
        body: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_msg_id: Option<String>,
    },
    History {
        room: R,
        #[serde(
            default,
            deserialize_with = "de_opt_seq",
            skip_serializing_if = "Option::is_none"
        )]
        before: Option<Seq>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    Who {
        room: R,
    },
    Typing {
        room: R,
    },
    Invite {
        room: R,
        user: U,
    },
    Revoke {
        room: R,
        user: U,
    },
    Dm {
        user: U,
    },
}

/// A request as read, before its names are checked.
pub type Unchecked = Request<String, String>;

impl RequestKind {
    /// The type's name on the wire.
    pub fn name(self) -> &'static str {
        self.into()
    }

    /// Requests served before authentication.
    pub fn allowed_anonymous(self) -> bool {
        matches!(
            self,
            RequestKind::Register | RequestKind::Login | RequestKind::Resume | RequestKind::Ping
        )
    }

    /// Whether the request changes the connection's state (who it is, which rooms it joined),
    /// so that requests after it must see its effect.
    pub fn changes_session(self) -> bool {
        !matches!(
            self,
            RequestKind::Ping
                | RequestKind::Post
                | RequestKind::History
                | RequestKind::Who
                | RequestKind::Typing
        )
    }
}

impl<R, U> Request<R, U> {
    pub fn kind(&self) -> RequestKind {
        RequestKind::from(self)
    }
}

impl Unchecked {
    /// Checks names and field ranges (those that do not depend on a room's policy), in the
    /// order the contract reports them: the first fault found is the one answered.
    pub fn check(self) -> Result<Request, Rejection> {
        let room = |name: String| RoomName::parse(name).map_err(Rejection::from);
        let user = |name: String| Username::parse(name).map_err(Rejection::from);
        Ok(match self {
            Request::Register { username, password } => {
                let username = user(username)?;
                check_password(&password)?;
                Request::Register { username, password }
            }
            Request::Login { username, password } => {
                // A username outside the rule can never match; say so without touching bcrypt.
                let username = user(username)?;
                check_password_len(&password)?;
                Request::Login { username, password }
            }
            Request::Resume { token } => {
                if token.is_empty() || token.expose().len() > MAX_TOKEN_LEN {
                    return Err(Rejection::bad(format!(
                        "token must be 1..{MAX_TOKEN_LEN} characters"
                    )));
                }
                Request::Resume { token }
            }
            Request::Logout {} => Request::Logout {},
            Request::Ping {} => Request::Ping {},
            Request::Rooms {} => Request::Rooms {},
            Request::CreateRoom {
                room: name,
                kind,
                members,
            } => {
                let room = room(name)?;
                if room.is_direct() {
                    return Err(NameError::ReservedRoom.into());
                }
                if members.len() > MAX_MEMBERS_PER_REQUEST {
                    return Err(Rejection::bad(format!(
                        "at most {MAX_MEMBERS_PER_REQUEST} members per request"
                    )));
                }
                let members = members.into_iter().map(user).collect::<Result<_, _>>()?;
                Request::CreateRoom {
                    room,
                    kind,
                    members,
                }
            }
            Request::Join { room: name, after } => Request::Join {
                room: room(name)?,
                after,
            },
            Request::Leave { room: name } => Request::Leave { room: room(name)? },
            Request::Post {
                room: name,
                body,
                client_msg_id,
            } => {
                let room = room(name)?;
                check_body(&body, client_msg_id.as_deref())?;
                Request::Post {
                    room,
                    body,
                    client_msg_id,
                }
            }
            Request::History {
                room: name,
                before,
                limit,
            } => {
                let room = room(name)?;
                if limit.is_some_and(|n| !(1..=MAX_HISTORY_LIMIT).contains(&n)) {
                    return Err(Rejection::bad(format!(
                        "limit must be 1..{MAX_HISTORY_LIMIT}"
                    )));
                }
                Request::History {
                    room,
                    before,
                    limit,
                }
            }
            Request::Who { room: name } => Request::Who { room: room(name)? },
            Request::Typing { room: name } => Request::Typing { room: room(name)? },
            Request::Invite {
                room: name,
                user: u,
            } => Request::Invite {
                room: room(name)?,
                user: user(u)?,
            },
            Request::Revoke {
                room: name,
                user: u,
            } => Request::Revoke {
                room: room(name)?,
                user: user(u)?,
            },
            Request::Dm { user: u } => Request::Dm { user: user(u)? },
        })
    }
}

fn check_body(body: &str, client_msg_id: Option<&str>) -> Result<(), Rejection> {
    if body.is_empty() {
        return Err(Rejection::bad("body must not be empty"));
    }
    match client_msg_id {
        Some(id) if !is_client_msg_id(id) => Err(Rejection::bad(format!(
            "client_msg_id must be 1..{MAX_CLIENT_MSG_ID_LEN} characters of A-Z a-z 0-9 . _ : -"
        ))),
        _ => Ok(()),
    }
}

/// The form of a retry key: printable ASCII that every database column and log line takes
/// as it is.
fn is_client_msg_id(id: &str) -> bool {
    (1..=MAX_CLIENT_MSG_ID_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// A request with its id, as the client side sends it: `{"id": ..., "type": ..., ...fields}`.
#[derive(Debug, Serialize)]
pub struct RequestFrame<'a> {
    pub id: &'a str,
    #[serde(flatten)]
    pub request: &'a Request,
}

impl RequestFrame<'_> {
    pub fn to_text(&self) -> String {
        // A request holds only strings, numbers and lists of them: serializing cannot fail.
        serde_json::to_string(self).unwrap_or_default()
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
            .map_err(|_| serde::de::Error::custom(SEQ_RULE))?,
    };
    if value < 0 {
        return Err(serde::de::Error::custom(SEQ_RULE));
    }
    Ok(Some(Seq(value)))
}

const SEQ_RULE: &str = "seq must be a non-negative integer";

/// Why a request was refused before reaching any actor: always `bad_request`, with a message
/// for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: ErrorCode,
    pub message: String,
}

impl Rejection {
    pub fn bad(message: impl Into<String>) -> Self {
        Rejection {
            code: ErrorCode::BadRequest,
            message: message.into(),
        }
    }
}

impl From<NameError> for Rejection {
    fn from(e: NameError) -> Self {
        Rejection::bad(e.to_string())
    }
}

/// A frame the server could read as a request: its id and type, and the request itself, or
/// why its fields were refused (a name or value outside the rules). The caller decides, from
/// the type and the connection's state, which answer comes first.
#[derive(Debug)]
pub struct Incoming {
    pub id: RequestId,
    pub kind: RequestKind,
    pub request: Result<Request, Rejection>,
    /// The size of the frame it came in.
    pub bytes: usize,
}

/// A frame that could not be turned into a request (it counts against the bad-frame window).
/// `id` is kept when the frame carried a usable one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    pub id: Option<RequestId>,
    pub rejection: Rejection,
}

/// Parses one text frame: the envelope first, then the typed request.
pub fn parse_request(text: &str) -> Result<Incoming, FrameError> {
    let fail = |id: Option<RequestId>, message: String| FrameError {
        id,
        rejection: Rejection::bad(message),
    };
    let value: Value =
        serde_json::from_str(text).map_err(|_| fail(readable_id(text), "malformed JSON".into()))?;
    let Value::Object(object) = &value else {
        return Err(fail(None, "a frame must be a JSON object".into()));
    };
    let id = match object.get("id") {
        Some(Value::String(id)) => RequestId::parse(id.as_str())
            .ok_or_else(|| fail(None, format!("id must be 1..{MAX_ID_LEN} characters")))?,
        Some(_) => return Err(fail(None, "id must be a string".into())),
        None => return Err(fail(None, "missing id".into())),
    };
    let kind = match object.get("type") {
        Some(Value::String(kind)) => kind.as_str(),
        Some(_) => return Err(fail(Some(id), "type must be a string".into())),
        None => return Err(fail(Some(id), "missing type".into())),
    };
    let Ok(kind) = RequestKind::from_str(kind) else {
        let shown: String = kind.chars().take(32).collect();
        return Err(fail(Some(id), format!("unknown request type '{shown}'")));
    };
    match serde_json::from_value::<Unchecked>(value) {
        Ok(request) => Ok(Incoming {
            id,
            kind,
            request: request.check(),
            bytes: text.len(),
        }),
        Err(e) => Err(fail(Some(id), describe_field_error(&e))),
    }
}

/// The id of a frame that is JSON in form but holds a string that is not text (a lone
/// surrogate escape such as `"\ud800"`): reading only the id skips over the other values.
fn readable_id(text: &str) -> Option<RequestId> {
    #[derive(Deserialize)]
    struct IdOnly {
        id: Value,
    }
    match serde_json::from_str::<IdOnly>(text).ok()?.id {
        Value::String(id) => RequestId::parse(id),
        _ => None,
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
    if text.contains(SEQ_RULE) {
        return SEQ_RULE.to_string();
    }
    "invalid request fields".to_string()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_err(text: &str) -> FrameError {
        match parse_request(text) {
            Err(e) => e,
            Ok(r) => panic!("expected an error, parsed {r:?}"),
        }
    }

    fn parse_ok(text: &str) -> (RequestId, Request) {
        let incoming = parse_request(text).unwrap_or_else(|e| panic!("{text}: {e:?}"));
        let request = incoming.request.unwrap_or_else(|e| panic!("{text}: {e:?}"));
        (incoming.id, request)
    }

    const EVERY_TYPE: [&str; 16] = [
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
        r#"{"id":"1","type":"invite","room":"a","user":"bob"}"#,
        r#"{"id":"1","type":"revoke","room":"a","user":"bob"}"#,
        r#"{"id":"1","type":"dm","user":"bob"}"#,
    ];

    #[test]
    fn parses_every_request_type() {
        for frame in EVERY_TYPE {
            let (id, _) = parse_ok(frame);
            assert_eq!(id.as_str(), "1");
        }
        let (_, join) = parse_ok(r#"{"id":"x","type":"join","room":"a","after":7}"#);
        assert!(matches!(
            join,
            Request::Join {
                after: Some(Seq(7)),
                ..
            }
        ));
    }

    #[test]
    fn the_kinds_are_the_wire_types_of_the_requests() {
        assert_eq!(RequestKind::VARIANTS.len(), EVERY_TYPE.len());
        for frame in EVERY_TYPE {
            let (_, request) = parse_ok(frame);
            let wire: Value = serde_json::from_str(frame).unwrap();
            assert_eq!(request.kind().name(), wire["type"], "{frame}");
        }
    }

    #[test]
    fn a_serialized_request_parses_back_to_itself() {
        for frame in EVERY_TYPE {
            let (id, request) = parse_ok(frame);
            let text = RequestFrame {
                id: id.as_str(),
                request: &request,
            }
            .to_text();
            let (_, again) = parse_ok(&text);
            assert_eq!(format!("{again:?}"), format!("{request:?}"), "{text}");
            let sent: Value = serde_json::from_str(&text).unwrap();
            let original: Value = serde_json::from_str(frame).unwrap();
            assert_eq!(sent["type"], original["type"], "{text}");
        }
    }

    #[test]
    fn keeps_the_id_of_a_bad_body() {
        let e = parse_err(r#"{"id":"42","type":"send","room":"a"}"#);
        assert_eq!(e.id.as_ref().map(RequestId::as_str), Some("42"));
        assert_eq!(e.rejection.code, ErrorCode::BadRequest);
        assert_eq!(e.rejection.message, "missing field `body`");
        let e = parse_err(r#"{"id":"42","type":"send","room":"a","body":5}"#);
        assert_eq!(e.id.as_ref().map(RequestId::as_str), Some("42"));
        let e = parse_err(r#"{"id":"42","type":"fly"}"#);
        assert_eq!(e.id.as_ref().map(RequestId::as_str), Some("42"));
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
    fn a_string_that_is_not_text_is_answered_with_the_readable_id() {
        let e = parse_err(r#"{"id":"7","type":"send","room":"a","body":"\ud800"}"#);
        assert_eq!(e.id.as_ref().map(RequestId::as_str), Some("7"));
        assert_eq!(e.rejection.message, "malformed JSON");
        // The id itself unreadable, or the frame cut short: nothing to answer with.
        assert_eq!(parse_err(r#"{"id":"\ud800","type":"ping"}"#).id, None);
        assert_eq!(parse_err(r#"{"id":"7","type":"send","body":"#).id, None);
    }

    #[test]
    fn client_msg_ids_are_printable_ascii_of_a_bounded_length() {
        let send = |key: &str| {
            let frame = serde_json::json!({"id": "1", "type": "send", "room": "a", "body": "hi",
                "client_msg_id": key});
            parse_request(&frame.to_string()).unwrap().request
        };
        for good in ["c-17", "a.b_c:d-E9", &"k".repeat(MAX_CLIENT_MSG_ID_LEN)] {
            assert!(send(good).is_ok(), "{good}");
        }
        let long = "k".repeat(MAX_CLIENT_MSG_ID_LEN + 1);
        for bad in ["", "a\u{0}b", "a b", "ключ", "a/b", long.as_str()] {
            let refused = send(bad).unwrap_err();
            assert_eq!(refused.code, ErrorCode::BadRequest, "{bad:?}");
            assert!(
                refused.message.starts_with("client_msg_id must be"),
                "{bad:?}"
            );
        }
        // A body may hold any character, U+0000 included: it is stored sealed, as bytes.
        let frame = serde_json::json!({"id": "1", "type": "send", "room": "a", "body": "a\u{0}b"});
        assert!(parse_request(&frame.to_string()).unwrap().request.is_ok());
    }

    #[test]
    fn wrong_types_do_not_echo_the_value() {
        let e = parse_err(r#"{"id":"1","type":"login","username":"ann","password":12345678}"#);
        assert!(!e.rejection.message.contains("12345678"));
    }

    #[test]
    fn name_rules() {
        let check_username = |name: &str| Username::parse(name).map_err(Rejection::from);
        let check_room = |name: &str| RoomName::parse(name).map_err(Rejection::from);
        assert!(check_username("ab").is_err());
        assert!(check_username("a_b.c-d").is_ok());
        assert!(check_username(&"a".repeat(33)).is_err());
        assert!(check_username("ann smith").is_err());
        assert!(check_room("general").is_ok());
        assert!(check_room("General").is_err());
        assert!(check_room("").is_err());
        assert!(check_room(&"a".repeat(65)).is_err());
        assert!(check_room("dm:bob:ann")
            .unwrap_err()
            .message
            .contains("reserved"));
        assert!(check_password(&Secret::new("short")).is_err());
        assert!(check_password(&Secret::new("x".repeat(72))).is_ok());
        assert!(check_password(&Secret::new("x".repeat(73))).is_err());
    }

    #[test]
    fn names_outside_their_rules_are_readable_requests_refused_with_the_rule() {
        let incoming = parse_request(r#"{"id":"9","type":"join","room":"No Caps"}"#).unwrap();
        assert_eq!(incoming.kind, RequestKind::Join);
        assert_eq!(
            incoming.request.unwrap_err().message,
            "room must be 1..64 characters of a-z 0-9 _ -"
        );
        let incoming = parse_request(
            r#"{"id":"9","type":"create_room","room":"a","kind":"public","members":["x y"]}"#,
        )
        .unwrap();
        assert!(incoming
            .request
            .unwrap_err()
            .message
            .starts_with("username"));
    }

    #[test]
    fn a_malformed_field_is_reported_before_a_name_outside_its_rule() {
        // Missing `body`: an unusable frame, whatever the room's name.
        let e = parse_err(r#"{"id":"1","type":"send","room":"General"}"#);
        assert_eq!(e.rejection.message, "missing field `body`");
        let e = parse_err(r#"{"id":"1","type":"join","room":"General","after":-1}"#);
        assert_eq!(e.rejection.message, "seq must be a non-negative integer");
        // A readable request: the room's rule comes before the member count and the members.
        let members: Vec<String> = (0..1001).map(|i| format!("u{i:03}")).collect();
        let frame = serde_json::json!({"id": "1", "type": "create_room", "kind": "public",
            "members": members, "room": "Bad"});
        let refused = parse_request(&frame.to_string())
            .unwrap()
            .request
            .unwrap_err();
        assert!(refused.message.starts_with("room must be"), "{refused:?}");
        let frame = serde_json::json!({"id": "1", "type": "create_room", "kind": "public",
            "members": members, "room": "ok"});
        let refused = parse_request(&frame.to_string())
            .unwrap()
            .request
            .unwrap_err();
        assert!(refused.message.starts_with("at most 1000"), "{refused:?}");
    }

    #[test]
    fn request_ranges() {
        let refused = |text: &str| parse_request(text).unwrap().request.is_err();
        assert!(refused(
            r#"{"id":"1","type":"history","room":"a","limit":0}"#
        ));
        assert!(refused(r#"{"id":"1","type":"send","room":"a","body":""}"#));
        assert!(parse_request(r#"{"id":"1","type":"join","room":"a","after":-1}"#).is_err());
        assert!(
            parse_request(r#"{"id":"1","type":"create_room","room":"a","kind":"secret"}"#).is_err()
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
                proptest::sample::select(
                    RequestKind::VARIANTS
                        .iter()
                        .map(|k| k.name())
                        .collect::<Vec<_>>()
                )
                .prop_map(Value::from),
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
                    let mut object: serde_json::Map<String, Value> = fields
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
                Ok(incoming) => {
                    assert!(!incoming.id.as_str().is_empty());
                    let _ = incoming.kind.changes_session();
                    if let Ok(request) = &incoming.request {
                        assert_eq!(request.kind(), incoming.kind);
                    }
                }
                Err(e) => {
                    assert_eq!(e.rejection.code, ErrorCode::BadRequest);
                    assert!(!e.rejection.message.is_empty());
                    let frame: Value = serde_json::from_str(&crate::protocol::error_frame(
                        e.id.as_ref(),
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
