//! What the nodes of a cluster say to each other on the bus channel: one JSON object per
//! publication, naming the node that sent it. Unknown kinds are ignored, so a newer node can
//! talk to an older one during a rolling upgrade.

use serde::{Deserialize, Serialize};

use crate::ids::{Seq, UserId};
use crate::protocol::MessageView;

/// One publication: who sent it and what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub node: String,
    /// The sending process: two processes given the same node id tell each other apart.
    #[serde(default)]
    pub instance: Option<u64>,
    #[serde(flatten)]
    pub event: BusEvent,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum BusEvent {
    /// A message committed (or, `persist = false`, handed a seq) on the sending node.
    Message {
        room: String,
        persist: bool,
        message: WireMessage,
    },
    /// `typing` by a user joined on the sending node (already limited there).
    Typing { room: String, user: String },
    /// A user's first session on the sending node joined `room` (`present`), or its last one
    /// left. `version` counts the sending node's presence changes.
    Presence {
        version: u64,
        room: String,
        user: UserId,
        username: String,
        present: bool,
    },
    /// A private room's member list changed (`invite`, `revoke`): a revoked user is kicked
    /// on every node.
    Member {
        room: String,
        user: UserId,
        added: bool,
    },
    /// The sending node reloaded the room policy file: every node re-reads its own.
    Reload,
    /// The sending node's link to Redis came back: publications may have been lost, so every
    /// room reads its newest seq from the store and fills what it missed.
    Resync,
    /// Sent with every heartbeat: a subscription that hears nothing, not even its own node's
    /// beats, is dead and is opened again.
    Beat,
    #[serde(other)]
    Unknown,
}

/// A `message` event as it crosses: the fields of [`MessageView`] a delivered message has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireMessage {
    pub seq: i64,
    pub from: String,
    pub body: String,
    pub sent_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_msg_id: Option<String>,
}

impl WireMessage {
    pub fn of(view: &MessageView) -> WireMessage {
        WireMessage {
            seq: view.seq.0,
            from: view.from.clone(),
            body: view.body.clone().unwrap_or_default(),
            sent_at: view.sent_at.clone(),
            client_msg_id: view.client_msg_id.clone(),
        }
    }

    pub fn into_view(self, room: &str) -> MessageView {
        MessageView {
            room: room.to_string(),
            seq: Seq(self.seq),
            from: self.from,
            body: Some(self.body),
            sent_at: self.sent_at,
            client_msg_id: self.client_msg_id,
            error: None,
        }
    }
}

pub fn encode(node: &str, instance: u64, event: &BusEvent) -> String {
    #[derive(Serialize)]
    struct Out<'a> {
        node: &'a str,
        instance: u64,
        #[serde(flatten)]
        event: &'a BusEvent,
    }
    serde_json::to_string(&Out {
        node,
        instance,
        event,
    })
    .unwrap_or_default()
}

pub fn decode(payload: &[u8]) -> Result<Envelope, serde_json::Error> {
    serde_json::from_slice(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_cross_as_they_were_sent() {
        let events = [
            BusEvent::Message {
                room: "general".into(),
                persist: true,
                message: WireMessage {
                    seq: 7,
                    from: "ann".into(),
                    body: "hi \"there\"".into(),
                    sent_at: "2026-12-02T10:00:00.000Z".into(),
                    client_msg_id: Some("c-1".into()),
                },
            },
            BusEvent::Typing {
                room: "general".into(),
                user: "ann".into(),
            },
            BusEvent::Presence {
                version: 3,
                room: "general".into(),
                user: UserId(9),
                username: "Ann".into(),
                present: false,
            },
            BusEvent::Member {
                room: "secret".into(),
                user: UserId(2),
                added: false,
            },
            BusEvent::Reload,
            BusEvent::Resync,
            BusEvent::Beat,
        ];
        for event in events {
            let text = encode("node-1", 7, &event);
            let back = decode(text.as_bytes()).expect("decodes");
            assert_eq!(
                back,
                Envelope {
                    node: "node-1".into(),
                    instance: Some(7),
                    event
                }
            );
        }
    }

    #[test]
    fn unknown_kinds_are_ignored_and_garbage_refused() {
        let later = decode(br#"{"node":"n2","t":"read_marker","room":"x","seq":3}"#).unwrap();
        assert_eq!(later.event, BusEvent::Unknown);
        assert!(decode(b"not json").is_err());
        assert!(decode(br#"{"t":"beat"}"#).is_err());
    }
}
