//! The frame guard: what a connection's raw frames must be before they become requests. It
//! reassembles fragmented messages within the size limit, counts unusable frames in a sliding
//! window, and meters requests with a token bucket. Plain data: the caller passes `now` and
//! acts on what it returns; nothing here writes to a socket.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::rate::{Bucket, Refill};

/// The guard's limits, from config.
#[derive(Debug, Clone)]
pub struct GuardSettings {
    /// Largest message, whole or reassembled from fragments.
    pub max_message_bytes: usize,
    /// Unusable frames tolerated within `bad_frame_window`.
    pub bad_frame_limit: usize,
    pub bad_frame_window: Duration,
    pub requests_per_second: u32,
    pub request_burst: u32,
}

impl GuardSettings {
    fn request_refill(&self) -> Refill {
        Refill::new(self.requests_per_second, 1, self.request_burst)
    }
}

/// What a frame amounts to.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound<'a> {
    /// A complete text message, to parse as a request: the frame itself, or the message
    /// reassembled from its fragments.
    Text(Cow<'a, str>),
    /// A frame that cannot be used: answer `bad_request` (id null) with this message.
    Unusable(&'static str),
    /// The message is over the size limit: close with 1009.
    TooBig,
    /// A piece of a message still arriving.
    Partial,
}

/// Where a fragment sits in its message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    FirstText,
    FirstBinary,
    Middle,
    Last,
}

/// A message arriving in fragments.
#[derive(Debug)]
struct Fragments {
    text: bool,
    bytes: Vec<u8>,
}

#[derive(Debug)]
pub struct FrameGuard {
    settings: GuardSettings,
    fragments: Option<Fragments>,
    bad_frames: VecDeque<Instant>,
    /// Request tokens, refilled at `requests_per_second` up to the burst.
    requests: Bucket,
}

pub const BINARY_REFUSED: &str = "binary frames are not accepted; send JSON text frames";

impl FrameGuard {
    pub fn new(settings: GuardSettings, now: Instant) -> Self {
        FrameGuard {
            requests: Bucket::full(settings.request_refill(), now),
            settings,
            fragments: None,
            bad_frames: VecDeque::new(),
        }
    }

    /// A whole text frame.
    pub fn text<'a>(&mut self, text: &'a str) -> Inbound<'a> {
        if self.fragments.take().is_some() {
            return Inbound::Unusable("a new message arrived inside a fragmented one");
        }
        Inbound::Text(Cow::Borrowed(text))
    }

    /// A whole binary frame.
    pub fn binary(&self) -> Inbound<'static> {
        Inbound::Unusable(BINARY_REFUSED)
    }

    /// One fragment of a message.
    pub fn fragment(&mut self, piece: Piece, data: &[u8]) -> Inbound<'static> {
        match (piece, self.fragments.as_mut()) {
            (Piece::FirstText | Piece::FirstBinary, None) => {
                self.fragments = Some(Fragments {
                    text: piece == Piece::FirstText,
                    bytes: data.to_vec(),
                });
            }
            (Piece::Middle | Piece::Last, Some(fragments)) => {
                fragments.bytes.extend_from_slice(data)
            }
            _ => {
                self.fragments = None;
                return Inbound::Unusable("unexpected continuation frame");
            }
        }
        if self
            .fragments
            .as_ref()
            .is_some_and(|f| f.bytes.len() > self.settings.max_message_bytes)
        {
            self.fragments = None;
            return Inbound::TooBig;
        }
        if piece != Piece::Last {
            return Inbound::Partial;
        }
        match self.fragments.take() {
            Some(Fragments { text: true, bytes }) => match String::from_utf8(bytes) {
                Ok(text) => Inbound::Text(Cow::Owned(text)),
                Err(_) => Inbound::Unusable("text is not UTF-8"),
            },
            Some(Fragments { text: false, .. }) => self.binary(),
            None => Inbound::Partial,
        }
    }

    /// Counts one unusable frame; true when the window now holds more than the limit (the
    /// connection is to be closed with 1008).
    pub fn count_unusable(&mut self, now: Instant) -> bool {
        let window = self.settings.bad_frame_window;
        while self
            .bad_frames
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            self.bad_frames.pop_front();
        }
        self.bad_frames.push_back(now);
        self.bad_frames.len() > self.settings.bad_frame_limit
    }

    /// Takes one request token; false when the connection is over its rate.
    pub fn take_token(&mut self, now: Instant) -> bool {
        self.requests.take(self.settings.request_refill(), now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(now: Instant) -> FrameGuard {
        FrameGuard::new(
            GuardSettings {
                max_message_bytes: 10,
                bad_frame_limit: 2,
                bad_frame_window: Duration::from_secs(10),
                requests_per_second: 2,
                request_burst: 3,
            },
            now,
        )
    }

    #[test]
    fn fragments_are_reassembled() {
        let mut g = guard(Instant::now());
        assert_eq!(g.fragment(Piece::FirstText, b"ab"), Inbound::Partial);
        assert_eq!(g.fragment(Piece::Middle, b"cd"), Inbound::Partial);
        assert_eq!(g.fragment(Piece::Last, b"e"), Inbound::Text("abcde".into()));
        assert_eq!(g.text("next"), Inbound::Text("next".into()));
    }

    #[test]
    fn a_fragmented_message_counts_whole_against_the_limit() {
        let mut g = guard(Instant::now());
        assert_eq!(g.fragment(Piece::FirstText, b"123456"), Inbound::Partial);
        assert_eq!(g.fragment(Piece::Middle, b"78901"), Inbound::TooBig);
    }

    #[test]
    fn broken_fragment_sequences_are_unusable() {
        let mut g = guard(Instant::now());
        assert!(matches!(
            g.fragment(Piece::Middle, b"x"),
            Inbound::Unusable(_)
        ));
        g.fragment(Piece::FirstText, b"a");
        assert!(matches!(g.text("b"), Inbound::Unusable(_)));
        // The interrupted message is dropped: the next one starts afresh.
        assert_eq!(g.text("c"), Inbound::Text("c".into()));
        g.fragment(Piece::FirstText, b"\xff");
        assert_eq!(
            g.fragment(Piece::Last, b""),
            Inbound::Unusable("text is not UTF-8")
        );
        g.fragment(Piece::FirstBinary, b"\x00");
        assert_eq!(
            g.fragment(Piece::Last, b""),
            Inbound::Unusable(BINARY_REFUSED)
        );
    }

    #[test]
    fn more_unusable_frames_than_the_limit_within_the_window_close() {
        let start = Instant::now();
        let mut g = guard(start);
        assert!(!g.count_unusable(start));
        assert!(!g.count_unusable(start));
        // The first two have left the window by now.
        let later = start + Duration::from_secs(11);
        assert!(!g.count_unusable(later));
        assert!(!g.count_unusable(later));
        assert!(g.count_unusable(later));
    }

    #[test]
    fn the_request_bucket_refills_at_the_rate() {
        let start = Instant::now();
        let mut g = guard(start);
        assert!((0..3).all(|_| g.take_token(start)), "the burst");
        assert!(!g.take_token(start));
        assert!(g.take_token(start + Duration::from_millis(500)));
        assert!(!g.take_token(start + Duration::from_millis(500)));
        // Idle for long: the bucket holds at most the burst.
        let later = start + Duration::from_secs(60);
        assert_eq!((0..5).filter(|_| g.take_token(later)).count(), 3);
    }
}
