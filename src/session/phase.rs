//! The connection's phase: one enum, changed only by the transitions here. A connection is
//! anonymous until `login` or `resume`, then authenticated; a shutdown drains it (accepted
//! requests are finished, new ones refused); it ends closed, and how it closed decides what
//! happens to its rooms: a clean close leaves them at once, a dropped connection stays joined
//! for the resume grace, and one taken over by a `resume` elsewhere hands them over.
//! [`farewell`] turns the final phase and rooms into what the connection tells the others.
//! Plain data.

use super::joins::RoomsAtEnd;
use crate::actors::db::TokenHash;
use crate::protocol::RoomName;
use crate::store::models::UserRecord;
use chrono::{DateTime, Utc};

/// Who the connection is, once authenticated.
#[derive(Debug, Clone)]
pub struct Identity {
    pub user: UserRecord,
    /// The hash of the token it logged in or resumed with.
    pub token: TokenHash,
    /// When that token expires: the connection closes then.
    pub expires_at: DateTime<Utc>,
}

/// How a connection ended, as far as its rooms are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// A close frame, `logout`, or a drained shutdown: leave every room now.
    Clean,
    /// Lost, timed out or cut off: stay joined for the resume grace.
    Dropped,
    /// Taken over by a `resume` on another connection: hand the rooms over.
    Yielded,
}

#[derive(Debug)]
pub enum Phase {
    /// Connected; only `register`, `login`, `resume` and `ping` are served.
    Anonymous,
    Authenticated(Identity),
    /// Shutting down: requests accepted before are finished, new ones refused; then 1001.
    Draining(Option<Identity>),
    /// Over: a close frame was sent or the peer went. No request runs any more.
    Closed {
        identity: Option<Identity>,
        ending: Ending,
        /// For the connection's last log line.
        reason: &'static str,
    },
}

impl Phase {
    /// `login` or `resume` succeeded. Refused when the connection is already someone, or over.
    pub fn authenticate(&mut self, identity: Identity) -> Result<(), Identity> {
        match self {
            Phase::Anonymous => *self = Phase::Authenticated(identity),
            Phase::Draining(none @ None) => *none = Some(identity),
            _ => return Err(identity),
        }
        Ok(())
    }

    /// The server is shutting down.
    pub fn drain(&mut self) {
        let identity = match std::mem::replace(self, Phase::Anonymous) {
            Phase::Anonymous => None,
            Phase::Authenticated(identity) => Some(identity),
            other => {
                *self = other;
                return;
            }
        };
        *self = Phase::Draining(identity);
    }

    /// The connection closes for `reason`. The first close wins: true when this call closed it
    /// (the caller then sends the close frame).
    pub fn close(&mut self, ending: Ending, reason: &'static str) -> bool {
        let identity = match std::mem::replace(self, Phase::Anonymous) {
            Phase::Anonymous => None,
            Phase::Authenticated(identity) => Some(identity),
            Phase::Draining(identity) => identity,
            closed @ Phase::Closed { .. } => {
                *self = closed;
                return false;
            }
        };
        *self = Phase::Closed {
            identity,
            ending,
            reason,
        };
        true
    }

    /// `logout`: the connection is nobody from now on and closes cleanly. The identity it had.
    pub fn log_out(&mut self) -> Option<Identity> {
        let identity = match std::mem::replace(self, Phase::Anonymous) {
            Phase::Authenticated(identity) | Phase::Draining(Some(identity)) => Some(identity),
            other => {
                *self = other;
                None
            }
        };
        self.close(Ending::Clean, "logout");
        identity
    }

    /// Who the connection is, while it serves requests.
    pub fn identity(&self) -> Option<&Identity> {
        match self {
            Phase::Authenticated(identity) | Phase::Draining(Some(identity)) => Some(identity),
            _ => None,
        }
    }

    /// Whether a new request is taken (not during a shutdown, not once closed).
    pub fn takes_requests(&self) -> bool {
        matches!(self, Phase::Anonymous | Phase::Authenticated(_))
    }

    pub fn is_draining(&self) -> bool {
        matches!(self, Phase::Draining(_))
    }

    pub fn is_closed(&self) -> bool {
        matches!(self, Phase::Closed { .. })
    }
}

/// What an ending connection tells the others.
#[derive(Debug)]
pub struct Farewell<H> {
    /// The user it was, for presence and the log.
    pub user: Option<UserRecord>,
    /// Park the session under this token with these rooms, for a `resume` within the grace.
    pub park: Option<(TokenHash, Vec<RoomName>)>,
    /// Or forget that this session held the token.
    pub untrack: Option<TokenHash>,
    /// Rooms to keep the session in for the grace.
    pub detach: Vec<H>,
    /// Rooms to leave now.
    pub leave: Vec<H>,
    /// Rooms whose join was in flight: leave them, found by name.
    pub leave_by_name: Vec<RoomName>,
    pub reason: &'static str,
}

/// The farewell of a connection that ends in `phase` with `rooms`. A session parks (stays in
/// its rooms for the grace) when it had a token and either yielded to a resume or was dropped
/// while joined to a room.
pub fn farewell<H>(phase: Phase, rooms: RoomsAtEnd<H>) -> Farewell<H> {
    let (identity, ending, reason) = match phase {
        Phase::Closed {
            identity,
            ending,
            reason,
        } => (identity, ending, reason),
        // Stopped without a close of its own (the server stopped).
        Phase::Anonymous | Phase::Draining(None) => (None, Ending::Dropped, "server closed"),
        Phase::Authenticated(identity) | Phase::Draining(Some(identity)) => {
            (Some(identity), Ending::Dropped, "server closed")
        }
    };
    let parks = match ending {
        Ending::Clean => false,
        Ending::Yielded => true,
        Ending::Dropped => !rooms.joined.is_empty(),
    };
    let (names, handles): (Vec<RoomName>, Vec<H>) = rooms.joined.into_iter().unzip();
    let (user, token) = match identity {
        Some(identity) => (Some(identity.user), Some(identity.token)),
        None => (None, None),
    };
    let (park, untrack, detach, leave) = match token {
        Some(token) if parks => (Some((token, names)), None, handles, Vec::new()),
        token => (None, token, Vec::new(), handles),
    };
    Farewell {
        user,
        park,
        untrack,
        detach,
        leave,
        leave_by_name: rooms.joining,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::UserId;

    fn ann() -> Identity {
        Identity {
            user: UserRecord {
                id: UserId(1),
                username: "ann".into(),
            },
            token: TokenHash([7; 32]),
            expires_at: chrono::DateTime::<chrono::Utc>::MAX_UTC,
        }
    }

    fn rooms(joined: &[(&str, u8)], joining: &[&str]) -> RoomsAtEnd<u8> {
        let name = |n: &str| RoomName::parse(n).unwrap();
        RoomsAtEnd {
            joined: joined.iter().map(|(n, h)| (name(n), *h)).collect(),
            joining: joining.iter().map(|n| name(n)).collect(),
        }
    }

    #[test]
    fn authentication_happens_once() {
        let mut phase = Phase::Anonymous;
        assert!(phase.authenticate(ann()).is_ok());
        assert!(phase.authenticate(ann()).is_err());
        assert_eq!(phase.identity().map(|i| i.user.id), Some(UserId(1)));
    }

    #[test]
    fn a_drain_keeps_who_the_connection_is_and_refuses_new_requests() {
        let mut phase = Phase::Anonymous;
        phase.drain();
        assert!(!phase.takes_requests());
        assert!(
            phase.authenticate(ann()).is_ok(),
            "a login accepted before the drain"
        );
        assert!(phase.identity().is_some());
        assert!(phase.close(Ending::Clean, "server shutting down"));
        assert!(
            !phase.close(Ending::Dropped, "connection lost"),
            "the first close wins"
        );
        assert!(matches!(
            phase,
            Phase::Closed {
                ending: Ending::Clean,
                reason: "server shutting down",
                ..
            }
        ));
    }

    #[test]
    fn a_dropped_session_in_rooms_parks_them() {
        let mut phase = Phase::Authenticated(ann());
        phase.close(Ending::Dropped, "heartbeat timeout");
        let f = farewell(phase, rooms(&[("a", 1), ("b", 2)], &["c"]));
        let (token, names) = f.park.unwrap();
        assert_eq!(token, TokenHash([7; 32]));
        assert_eq!(
            names.iter().map(RoomName::as_str).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!((f.detach, f.leave), (vec![1, 2], vec![]));
        assert_eq!(f.leave_by_name.len(), 1, "a join in flight is left");
        assert!(f.untrack.is_none());
        assert_eq!(f.reason, "heartbeat timeout");
    }

    #[test]
    fn a_dropped_session_in_no_room_and_a_clean_close_leave() {
        for (ending, joined) in [(Ending::Dropped, vec![]), (Ending::Clean, vec![("a", 1)])] {
            let mut phase = Phase::Authenticated(ann());
            phase.close(ending, "x");
            let f = farewell(phase, rooms(&joined, &[]));
            assert!(f.park.is_none());
            assert!(f.untrack.is_some());
            assert_eq!(f.leave.len(), joined.len());
            assert!(f.detach.is_empty());
        }
    }

    #[test]
    fn a_yielded_session_parks_and_a_logged_out_one_is_nobody() {
        let mut phase = Phase::Authenticated(ann());
        phase.close(Ending::Yielded, "taken over");
        assert!(farewell(phase, rooms(&[("a", 1)], &[])).park.is_some());

        let mut phase = Phase::Authenticated(ann());
        assert!(phase.log_out().is_some());
        assert!(phase.is_closed());
        let f = farewell(phase, rooms(&[], &[]));
        assert!(f.user.is_none() && f.park.is_none() && f.untrack.is_none());
        assert_eq!(f.reason, "logout");
    }
}
