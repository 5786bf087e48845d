//! Which rooms a connection has joined, and the joins under way with the events held for
//! them. While a room is being joined (a `join`, or a `resume` restoring it), its live events
//! are held: they go out after the join's reply, minus the messages the reply already carried
//! in `missed`, so that each message reaches the client once and in order. The hold ends when
//! the last join of the room is answered and no other join of it waits its turn. A room a
//! `resume` restored stays held after the resume's reply until the client shows whether a
//! `join {after}` of it follows (the join takes the hold over; any other request, or the end
//! of a short wait, releases it), since a client may send that join right behind the resume
//! and the server may not have read it yet. Plain data, generic over the room handle `H` (an
//! actor address in the server, anything in tests).

use bytestring::ByteString;
use std::collections::HashMap;

use crate::ids::Seq;
use crate::protocol::RoomName;

/// An event frame held back; `seq` is set for `message` events.
#[derive(Debug)]
struct Held {
    seq: Option<Seq>,
    frame: ByteString,
}

/// The joins of one room under way, and what they hold.
#[derive(Debug, Default)]
struct Hold {
    /// Joins started and not answered yet.
    pending: usize,
    /// The newest seq an answered join's `missed` reached: held messages up to it repeat.
    covered: Option<Seq>,
    held: Vec<Held>,
    /// The bytes of `held`.
    bytes: usize,
    /// Restored by a resume, answered, and kept held for a `join {after}` that may follow.
    awaiting_join: bool,
    /// The room kicked the connection while a join was in flight: that join's answer, even a
    /// success the room gave just before the kick, does not make it joined.
    kicked: bool,
}

#[derive(Debug)]
struct Entry<H> {
    /// Set while the connection is joined to the room.
    handle: Option<H>,
    hold: Option<Hold>,
}

/// How the rooms stand when the connection ends.
#[derive(Debug, PartialEq, Eq)]
pub struct RoomsAtEnd<H> {
    /// Joined rooms, each to be left or detached through its handle.
    pub joined: Vec<(RoomName, H)>,
    /// Rooms whose only join was still in flight: the room may have added the session
    /// already, so it is told to leave, by name.
    pub joining: Vec<RoomName>,
}

#[derive(Debug)]
pub struct Joins<H> {
    rooms: HashMap<RoomName, Entry<H>>,
    /// Whether some hold may await a join after a resume (so that requests need not look).
    maybe_awaiting: bool,
    /// The bytes held in all rooms.
    held_bytes: usize,
}

impl<H> Default for Joins<H> {
    fn default() -> Self {
        Joins {
            rooms: HashMap::new(),
            maybe_awaiting: false,
            held_bytes: 0,
        }
    }
}

impl<H: Clone> Joins<H> {
    /// A join of `room` starts: its events are held from now on.
    pub fn begin(&mut self, room: &RoomName) {
        let entry = self.rooms.entry(room.clone()).or_insert(Entry {
            handle: None,
            hold: None,
        });
        let hold = entry.hold.get_or_insert_with(Hold::default);
        hold.pending += 1;
        hold.awaiting_join = false;
    }

    /// A join of `room` was answered: joined through `handle` with `missed` up to `covered`,
    /// or (None) refused, after which the connection is not joined to it. Returns whether it
    /// is joined now (not when the room kicked it while the join was in flight).
    pub fn answered(&mut self, room: &RoomName, joined: Option<(H, Option<Seq>)>) -> bool {
        let Some(entry) = self.rooms.get_mut(room) else {
            return false;
        };
        let mut kicked = false;
        if let Some(hold) = entry.hold.as_mut() {
            hold.pending = hold.pending.saturating_sub(1);
            kicked = hold.kicked;
            if hold.pending == 0 {
                hold.kicked = false;
            }
        }
        match joined {
            Some((handle, covered)) if !kicked => {
                entry.handle = Some(handle);
                if let Some(hold) = entry.hold.as_mut() {
                    hold.covered = hold.covered.max(covered);
                }
                true
            }
            _ => {
                entry.handle = None;
                false
            }
        }
    }

    /// The room removed the connection (`kicked`): not joined any more, nothing held is for
    /// the client, and a join in flight does not make it joined.
    pub fn kick(&mut self, room: &RoomName) {
        self.leave(room);
        if let Some(hold) = self.rooms.get_mut(room).and_then(|e| e.hold.as_mut()) {
            hold.kicked = hold.pending > 0;
        }
    }

    /// Called once a join's reply is written: when no join of `room` is in flight and none
    /// waits its turn (`join_waiting`), ends the hold and returns the events to write now,
    /// without the messages a reply already covered. A room left or refused meanwhile gets
    /// nothing.
    pub fn release(&mut self, room: &RoomName, join_waiting: bool) -> Vec<ByteString> {
        let Some(entry) = self.rooms.get_mut(room) else {
            return Vec::new();
        };
        if join_waiting || entry.hold.as_ref().is_some_and(|h| h.pending > 0) {
            return Vec::new();
        }
        let hold = entry.hold.take().unwrap_or_default();
        self.held_bytes -= hold.bytes;
        let frames = if entry.handle.is_some() {
            hold.held
                .into_iter()
                .filter(|h| !matches!((h.seq, hold.covered), (Some(seq), Some(c)) if seq <= c))
                .map(|h| h.frame)
                .collect()
        } else {
            Vec::new()
        };
        self.forget_if_empty(room);
        frames
    }

    /// Called once a resume's reply is written, for a room it restored: like [`Self::release`],
    /// except that a hold which would end now waits for the client's next request instead (see
    /// [`Self::stop_awaiting`]). True when the room awaits a join.
    pub fn await_join(&mut self, room: &RoomName, join_waiting: bool) -> bool {
        let Some(hold) = self.rooms.get_mut(room).and_then(|e| e.hold.as_mut()) else {
            return false;
        };
        if join_waiting || hold.pending > 0 {
            return false;
        }
        hold.awaiting_join = true;
        self.maybe_awaiting = true;
        true
    }

    /// Whether `room` is held for a join that may follow a resume.
    pub fn is_awaiting_join(&self, room: &str) -> bool {
        self.rooms
            .get(room)
            .and_then(|e| e.hold.as_ref())
            .is_some_and(|h| h.awaiting_join)
    }

    /// No `join {after}` follows the resume (another request came, or the wait ended): ends
    /// the holds that awaited one and returns their events to write now.
    pub fn stop_awaiting(&mut self) -> Vec<ByteString> {
        if !std::mem::take(&mut self.maybe_awaiting) {
            return Vec::new();
        }
        let awaiting: Vec<RoomName> = self
            .rooms
            .iter()
            .filter(|(_, e)| e.hold.as_ref().is_some_and(|h| h.awaiting_join))
            .map(|(name, _)| name.clone())
            .collect();
        awaiting
            .iter()
            .flat_map(|room| self.release(room, false))
            .collect()
    }

    /// An event of `room` arrived: held while the room is being joined, returned to be written
    /// now when it is joined, dropped otherwise (in flight after a `leave`).
    pub fn event(&mut self, room: &str, seq: Option<Seq>, frame: ByteString) -> Option<ByteString> {
        let entry = self.rooms.get_mut(room)?;
        match entry.hold.as_mut() {
            Some(hold) => {
                hold.bytes += frame.len();
                self.held_bytes += frame.len();
                hold.held.push(Held { seq, frame });
                None
            }
            None => entry.handle.is_some().then_some(frame),
        }
    }

    /// `leave`: the connection is no longer joined. Events held for an answered join are from
    /// before the leave and are dropped, even if the room is joined again before they would
    /// have been written. Returns the handle to tell the room.
    pub fn leave(&mut self, room: &RoomName) -> Option<H> {
        let entry = self.rooms.get_mut(room)?;
        let handle = entry.handle.take();
        if let Some(hold) = entry.hold.as_mut() {
            hold.held.clear();
            self.held_bytes -= std::mem::take(&mut hold.bytes);
            hold.covered = None;
        }
        self.forget_if_empty(room);
        handle
    }

    /// Leaves every room (`logout`): the handles to tell.
    pub fn leave_all(&mut self) -> Vec<H> {
        self.held_bytes = 0;
        self.rooms.drain().filter_map(|(_, e)| e.handle).collect()
    }

    /// The bytes of the events held for joins under way, in all rooms.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    pub fn handle(&self, room: &str) -> Option<&H> {
        self.rooms.get(room)?.handle.as_ref()
    }

    pub fn is_joined(&self, room: &str) -> bool {
        self.handle(room).is_some()
    }

    pub fn any_joined(&self) -> bool {
        self.rooms.values().any(|e| e.handle.is_some())
    }

    /// How many rooms the connection has joined.
    pub fn joined_count(&self) -> usize {
        self.rooms.values().filter(|e| e.handle.is_some()).count()
    }

    /// The connection ends: each room once, through its handle when joined.
    pub fn end(&mut self) -> RoomsAtEnd<H> {
        let mut end = RoomsAtEnd {
            joined: Vec::new(),
            joining: Vec::new(),
        };
        self.held_bytes = 0;
        for (name, entry) in self.rooms.drain() {
            match (entry.handle, entry.hold) {
                (Some(handle), _) => end.joined.push((name, handle)),
                (None, Some(hold)) if hold.pending > 0 => end.joining.push(name),
                (None, _) => {}
            }
        }
        end.joined.sort_by(|a, b| a.0.cmp(&b.0));
        end.joining.sort();
        end
    }

    fn forget_if_empty(&mut self, room: &RoomName) {
        if self
            .rooms
            .get(room)
            .is_some_and(|e| e.handle.is_none() && e.hold.is_none())
        {
            self.rooms.remove(room);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(name: &str) -> RoomName {
        RoomName::parse(name).unwrap()
    }

    fn message(seq: i64) -> (Option<Seq>, ByteString) {
        (Some(Seq(seq)), ByteString::from(format!("m{seq}")))
    }

    fn deliver(
        joins: &mut Joins<u8>,
        name: &str,
        seqs: std::ops::RangeInclusive<i64>,
    ) -> Vec<String> {
        seqs.filter_map(|seq| {
            let (seq, frame) = message(seq);
            joins.event(name, seq, frame)
        })
        .map(|f| f.to_string())
        .collect()
    }

    fn frames(written: Vec<ByteString>) -> Vec<String> {
        written.into_iter().map(|f| f.to_string()).collect()
    }

    #[test]
    fn the_bytes_held_are_counted_until_released_left_or_ended() {
        let (a, b, mut joins) = (room("a"), room("b"), Joins::default());
        joins.begin(&a);
        joins.begin(&b);
        deliver(&mut joins, "a", 1..=3); // "m1".."m3": 2 bytes each
        deliver(&mut joins, "b", 10..=11); // 3 bytes each
        assert_eq!(joins.held_bytes(), 12);
        joins.answered(&a, Some((1, None)));
        assert_eq!(joins.release(&a, false).len(), 3);
        assert_eq!(joins.held_bytes(), 6);
        assert!(deliver(&mut joins, "a", 4..=4).len() == 1, "live, not held");
        joins.leave(&b);
        assert_eq!(joins.held_bytes(), 0);
        joins.begin(&b);
        deliver(&mut joins, "b", 12..=12);
        joins.end();
        assert_eq!(joins.held_bytes(), 0);
    }

    #[test]
    fn events_wait_for_the_join_reply_and_skip_what_it_covered() {
        let (a, mut joins) = (room("a"), Joins::default());
        joins.begin(&a);
        assert!(deliver(&mut joins, "a", 5..=7).is_empty(), "held");
        joins.answered(&a, Some((1, Some(Seq(6)))));
        assert_eq!(frames(joins.release(&a, false)), ["m7"]);
        assert_eq!(deliver(&mut joins, "a", 8..=8), ["m8"], "live once joined");
    }

    #[test]
    fn events_of_rooms_not_joined_are_dropped() {
        let mut joins: Joins<u8> = Joins::default();
        assert!(deliver(&mut joins, "a", 1..=2).is_empty());
        let a = room("a");
        joins.begin(&a);
        deliver(&mut joins, "a", 1..=2);
        joins.answered(&a, None);
        assert!(
            joins.release(&a, false).is_empty(),
            "a refused join writes nothing"
        );
        assert!(!joins.is_joined("a"));
    }

    /// Race: `join {after}` pipelined right behind a `resume` during a stream. The resume's
    /// restore and the join overlap; the restore's answer must not release the events, or they
    /// go out before the join's reply and repeat what its `missed` holds. Fix: the hold counts
    /// the joins in flight and the last one releases it.
    #[test]
    fn race_a_join_after_overlapping_a_resume_restore_holds_until_its_own_reply() {
        let (a, mut joins) = (room("a"), Joins::default());
        joins.begin(&a); // the resume restores a
        assert!(deliver(&mut joins, "a", 10..=11).is_empty());
        joins.begin(&a); // the join {after: 9} has started too
        joins.answered(&a, Some((1, None))); // the restore is answered...
        assert!(
            joins.release(&a, false).is_empty(),
            "...but the join is still in flight"
        );
        assert!(deliver(&mut joins, "a", 12..=13).is_empty());
        joins.answered(&a, Some((1, Some(Seq(12))))); // missed = 10, 11, 12
        assert_eq!(frames(joins.release(&a, false)), ["m13"]);
    }

    /// Race: a drop right after a join's reply, before its held events are written. The room
    /// is joined and must only be detached (the grace kept), not also told to leave as a room
    /// whose join was in flight. Fix: a joined room ends through its handle only.
    #[test]
    fn race_a_drop_right_after_the_join_reply_ends_the_room_once_through_its_handle() {
        let (a, mut joins) = (room("a"), Joins::default());
        joins.begin(&a);
        deliver(&mut joins, "a", 1..=1);
        joins.answered(&a, Some((7, None))); // reply written, release not yet run
        assert_eq!(
            joins.end(),
            RoomsAtEnd {
                joined: vec![(a, 7)],
                joining: vec![],
            }
        );
    }

    /// Race: a `join` queued behind a `resume` that restores the room. When the resume's reply
    /// is written the join has not started; releasing then would write live events before the
    /// join's reply. Fix: the release waits while a join of the room waits its turn.
    #[test]
    fn race_a_join_queued_behind_a_resume_restore_keeps_the_events_held() {
        let (a, mut joins) = (room("a"), Joins::default());
        joins.begin(&a);
        deliver(&mut joins, "a", 4..=5);
        joins.answered(&a, Some((1, None)));
        assert!(
            joins.release(&a, true).is_empty(),
            "the join waits its turn"
        );
        assert!(deliver(&mut joins, "a", 6..=6).is_empty());
        joins.begin(&a);
        joins.answered(&a, Some((1, Some(Seq(5)))));
        assert_eq!(frames(joins.release(&a, false)), ["m6"]);
    }

    /// Race: `leave` while events are held for an answered join (another join of the room
    /// still pending), then a new join: the held events are from before the leave and must
    /// not reach the client after the new join's reply. Fix: `leave` drops them.
    #[test]
    fn race_leave_drops_the_events_held_for_an_answered_join() {
        let (a, mut joins) = (room("a"), Joins::default());
        joins.begin(&a);
        joins.answered(&a, Some((1, None)));
        assert!(deliver(&mut joins, "a", 1..=2).is_empty());
        assert!(joins.release(&a, true).is_empty(), "a join is queued");
        assert_eq!(joins.leave(&a), Some(1));
        joins.begin(&a); // the queued join runs now
        joins.answered(&a, Some((1, None)));
        assert!(
            joins.release(&a, false).is_empty(),
            "nothing from before the leave"
        );
        assert_eq!(deliver(&mut joins, "a", 3..=3), ["m3"]);
    }

    /// Race: a resume restores two rooms and a join of each is queued behind it; the join of
    /// the first runs for longer than a timer tick. The second room's events must stay held
    /// until its own join's reply, however long the first join takes. Fix: the release waits
    /// for the queued join of its own room, whoever finishes first.
    #[test]
    fn race_a_slow_join_of_one_room_does_not_release_the_other_rooms_events() {
        let (a, b, mut joins) = (room("a"), room("b"), Joins::default());
        joins.begin(&a);
        joins.begin(&b);
        joins.answered(&a, Some((1, None)));
        joins.answered(&b, Some((2, None)));
        // The resume's reply is written; joins of a and b are queued behind it.
        assert!(joins.release(&a, true).is_empty());
        assert!(joins.release(&b, true).is_empty());
        joins.begin(&a); // the join of a starts, and takes long
        assert!(deliver(&mut joins, "b", 1..=3).is_empty());
        assert!(deliver(&mut joins, "a", 1..=1).is_empty());
        joins.answered(&a, Some((1, Some(Seq(1)))));
        assert!(
            joins.release(&a, false).is_empty(),
            "a's missed covered seq 1"
        );
        assert!(
            joins.release(&b, true).is_empty(),
            "b's join is still queued"
        );
        assert!(deliver(&mut joins, "b", 4..=4).is_empty());
        joins.begin(&b);
        joins.answered(&b, Some((2, Some(Seq(3)))));
        assert_eq!(frames(joins.release(&b, false)), ["m4"]);
    }

    /// A resume's restored room stays held after its reply until the client's next request
    /// says whether a `join {after}` of it follows: a join takes the hold over, anything else
    /// (or the end of the wait) releases it.
    #[test]
    fn a_restored_room_awaits_a_join_that_may_follow_the_resume() {
        let (a, b, mut joins) = (room("a"), room("b"), Joins::default());
        joins.begin(&a);
        joins.begin(&b);
        joins.answered(&a, Some((1, None)));
        joins.answered(&b, Some((2, None)));
        assert!(joins.await_join(&a, false));
        assert!(joins.await_join(&b, false));
        assert!(
            deliver(&mut joins, "a", 1..=3).is_empty(),
            "held after the reply"
        );
        assert!(deliver(&mut joins, "b", 1..=1).is_empty());
        // The join of a arrives: it takes a's hold over.
        joins.begin(&a);
        assert!(!joins.is_awaiting_join("a") && joins.is_awaiting_join("b"));
        // Then any other request: b's wait ends, a stays held for its join.
        assert_eq!(frames(joins.stop_awaiting()), ["m1"]);
        assert!(deliver(&mut joins, "a", 4..=4).is_empty());
        joins.answered(&a, Some((1, Some(Seq(3)))));
        assert_eq!(frames(joins.release(&a, false)), ["m4"]);
    }

    /// Race: the room answers a join, then kicks the connection, and the kick arrives first.
    /// The join's success must not leave the connection thinking it is joined.
    #[test]
    fn race_a_kick_that_overtakes_the_join_reply_leaves_the_room_not_joined() {
        let (a, mut joins) = (room("a"), Joins::default());
        joins.begin(&a);
        joins.kick(&a);
        assert!(!joins.answered(&a, Some((1, None))), "refused");
        assert!(!joins.is_joined("a"));
        assert!(joins.release(&a, false).is_empty());
        assert!(deliver(&mut joins, "a", 1..=1).is_empty());
        // A later join (re-invited) works again.
        joins.begin(&a);
        assert!(joins.answered(&a, Some((1, None))));
        assert!(joins.is_joined("a"));
    }

    #[test]
    fn a_room_whose_only_join_is_in_flight_is_left_by_name_at_the_end() {
        let (a, b, mut joins) = (room("a"), room("b"), Joins::default());
        joins.begin(&a);
        joins.begin(&b);
        joins.answered(&b, Some((2, None)));
        joins.release(&b, false);
        assert_eq!(
            joins.end(),
            RoomsAtEnd {
                joined: vec![(b, 2)],
                joining: vec![a],
            }
        );
    }
}
