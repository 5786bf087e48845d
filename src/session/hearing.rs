//! Whether a connection's client has gone silent: when frames last arrived, judged at each
//! heartbeat tick. A heartbeat timeout must mean the client was silent, not that the server
//! was too busy to read what it sent: a tick that comes late (the worker thread was behind, so
//! the client's frames may wait unread in the socket) does not close the connection; the next
//! tick on time judges. A frame is read before the tick in one run of the session, so a tick
//! on time has seen whatever arrived. Plain data; the session passes the clock.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heard {
    /// A frame arrived within the timeout.
    Recently,
    /// Nothing for longer than the timeout, but the server was behind and may not have read
    /// what came: judge again at the next tick.
    NotYetRead,
    /// Nothing arrived for longer than the timeout, and the server was keeping up.
    Silent,
}

#[derive(Debug)]
pub struct Hearing {
    last_frame: Instant,
    last_tick: Instant,
}

impl Hearing {
    pub fn new(now: Instant) -> Hearing {
        Hearing {
            last_frame: now,
            last_tick: now,
        }
    }

    /// A frame (pongs included) arrived.
    pub fn frame(&mut self, now: Instant) {
        self.last_frame = now;
    }

    /// The heartbeat ticked (every `interval`).
    pub fn tick(&mut self, now: Instant, interval: Duration, timeout: Duration) -> Heard {
        let late = now.saturating_duration_since(self.last_tick) > interval + interval / 2;
        self.last_tick = now;
        if now.saturating_duration_since(self.last_frame) <= timeout {
            Heard::Recently
        } else if late {
            Heard::NotYetRead
        } else {
            Heard::Silent
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_secs(5);
    const TIMEOUT: Duration = Duration::from_secs(15);

    fn ticks(hearing: &mut Hearing, from: Instant, secs: &[u64]) -> Vec<Heard> {
        secs.iter()
            .map(|s| hearing.tick(from + Duration::from_secs(*s), INTERVAL, TIMEOUT))
            .collect()
    }

    #[test]
    fn a_client_that_sends_nothing_is_silent_after_the_timeout() {
        let start = Instant::now();
        let mut hearing = Hearing::new(start);
        let heard = ticks(&mut hearing, start, &[5, 10, 15, 20]);
        assert_eq!(
            heard,
            [
                Heard::Recently,
                Heard::Recently,
                Heard::Recently,
                Heard::Silent
            ]
        );
    }

    #[test]
    fn frames_keep_it_alive() {
        let start = Instant::now();
        let mut hearing = Hearing::new(start);
        hearing.frame(start + Duration::from_secs(12));
        assert_eq!(
            ticks(&mut hearing, start, &[5, 10, 15, 20, 25])[4],
            Heard::Recently
        );
    }

    #[test]
    fn a_late_tick_means_the_server_was_behind() {
        let start = Instant::now();
        let mut hearing = Hearing::new(start);
        // The worker thread was busy for 12 s: this tick comes 17 s after the last.
        assert_eq!(ticks(&mut hearing, start, &[5, 22])[1], Heard::NotYetRead);
        // On time again, and still nothing: now it is silence.
        assert_eq!(ticks(&mut hearing, start, &[27])[0], Heard::Silent);
    }
}
