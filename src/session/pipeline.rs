//! The request pipeline of one connection: which request may run now and which must wait.
//! Requests run in the order they arrive as far as they depend on each other: one that
//! changes the session (login, join, ...) waits for everything before it, and everything
//! after it waits for it; the others (send, history, who, typing, ping) run side by side in
//! between. It counts the requests answered asynchronously and bounds the queue of those
//! waiting, in number and in bytes. Plain data: the caller runs what it hands back.

use std::collections::VecDeque;

/// A request as the pipeline sees it.
pub trait Ordered {
    /// Whether requests after this one must see its effect.
    fn changes_session(&self) -> bool;
    /// What it weighs while it waits (the size of its frame).
    fn bytes(&self) -> usize;
}

/// What runs now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Running {
    /// These many requests that leave the session as it is.
    Shared(usize),
    /// One request that changes the session; nothing else runs beside it.
    Exclusive,
}

/// What to do with an arriving request.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission<T> {
    /// Run it now.
    Run(T),
    /// It waits its turn; [`Pipeline::next_ready`] hands it back.
    Queued,
    /// Too many are waiting: refuse it.
    Full(T),
}

#[derive(Debug)]
pub struct Pipeline<T> {
    running: Running,
    waiting: VecDeque<T>,
    waiting_bytes: usize,
    max_waiting: usize,
    max_waiting_bytes: usize,
}

impl<T: Ordered> Pipeline<T> {
    pub fn new(max_waiting: usize, max_waiting_bytes: usize) -> Self {
        Pipeline {
            running: Running::Shared(0),
            waiting: VecDeque::new(),
            waiting_bytes: 0,
            max_waiting,
            max_waiting_bytes,
        }
    }

    fn may_start(&self, request: &T) -> bool {
        match self.running {
            Running::Exclusive => false,
            Running::Shared(n) => n == 0 || !request.changes_session(),
        }
    }

    pub fn admit(&mut self, request: T) -> Admission<T> {
        if self.waiting.is_empty() && self.may_start(&request) {
            return Admission::Run(request);
        }
        let bytes = self.waiting_bytes + request.bytes();
        if self.waiting.len() >= self.max_waiting || bytes > self.max_waiting_bytes {
            return Admission::Full(request);
        }
        self.waiting_bytes = bytes;
        self.waiting.push_back(request);
        Admission::Queued
    }

    /// A request handed out to run will be answered later: count it until [`Self::finished`].
    /// (A request answered at once is never counted.)
    pub fn started(&mut self, changes_session: bool) {
        self.running = match (self.running, changes_session) {
            (Running::Shared(0), true) => Running::Exclusive,
            (Running::Shared(n), false) => Running::Shared(n + 1),
            (running, _) => {
                debug_assert!(false, "started a request that may not start: {running:?}");
                Running::Exclusive
            }
        };
    }

    /// A counted request was answered.
    pub fn finished(&mut self) {
        self.running = match self.running {
            Running::Exclusive | Running::Shared(0 | 1) => Running::Shared(0),
            Running::Shared(n) => Running::Shared(n - 1),
        };
    }

    /// The first waiting request, once it may run.
    pub fn next_ready(&mut self) -> Option<T> {
        let front = self.waiting.front()?;
        if !self.may_start(front) {
            return None;
        }
        let next = self.waiting.pop_front()?;
        self.waiting_bytes -= next.bytes();
        Some(next)
    }

    /// Requests running, and those waiting that match.
    pub fn in_flight(&self, counts: impl Fn(&T) -> bool) -> usize {
        let running = match self.running {
            Running::Exclusive => 1,
            Running::Shared(n) => n,
        };
        running + self.waiting.iter().filter(|r| counts(r)).count()
    }

    /// Nothing is running.
    pub fn is_idle(&self) -> bool {
        self.running == Running::Shared(0)
    }

    /// Whether a waiting request matches.
    pub fn is_waiting(&self, matches: impl Fn(&T) -> bool) -> bool {
        self.waiting.iter().any(matches)
    }

    /// Drops every waiting request (the connection is ending).
    pub fn clear(&mut self) {
        self.waiting.clear();
        self.waiting_bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Eq)]
    struct R(&'static str, bool);

    impl Ordered for R {
        fn changes_session(&self) -> bool {
            self.1
        }
        fn bytes(&self) -> usize {
            self.0.len()
        }
    }

    const LOGIN: R = R("login", true);
    const JOIN: R = R("join", true);
    const SEND: R = R("send", false);
    const PING: R = R("ping", false);

    /// Admits `request`; when it may run, starts it as an asynchronous one.
    fn start(p: &mut Pipeline<R>, request: R) -> Admission<R> {
        let changes = request.changes_session();
        let admitted = p.admit(request);
        if matches!(admitted, Admission::Run(_)) {
            p.started(changes);
        }
        admitted
    }

    #[test]
    fn a_session_changing_request_runs_alone_and_in_order() {
        let mut p = Pipeline::new(10, 1000);
        assert_eq!(start(&mut p, LOGIN), Admission::Run(LOGIN));
        assert_eq!(start(&mut p, SEND), Admission::Queued);
        assert_eq!(start(&mut p, JOIN), Admission::Queued);
        assert_eq!(p.next_ready(), None, "login is still running");
        p.finished();
        assert_eq!(p.next_ready(), Some(SEND));
        p.started(false);
        assert_eq!(p.next_ready(), None, "join waits for the send before it");
        p.finished();
        assert_eq!(p.next_ready(), Some(JOIN));
        assert!(p.is_idle(), "handed out, not yet started");
    }

    #[test]
    fn requests_that_leave_the_session_alone_run_side_by_side() {
        let mut p = Pipeline::new(10, 1000);
        assert_eq!(start(&mut p, SEND), Admission::Run(SEND));
        assert_eq!(start(&mut p, PING), Admission::Run(PING));
        assert_eq!(start(&mut p, JOIN), Admission::Queued);
        assert_eq!(
            start(&mut p, SEND),
            Admission::Queued,
            "nothing overtakes the join"
        );
        p.finished();
        assert_eq!(p.next_ready(), None);
        p.finished();
        assert_eq!(p.next_ready(), Some(JOIN));
    }

    #[test]
    fn a_request_answered_at_once_holds_nothing_up() {
        let mut p = Pipeline::new(10, 1000);
        assert_eq!(p.admit(JOIN), Admission::Run(JOIN));
        assert_eq!(p.admit(LOGIN), Admission::Run(LOGIN));
        assert!(p.is_idle());
    }

    #[test]
    fn the_waiting_queue_is_bounded() {
        let mut p = Pipeline::new(2, 1000);
        start(&mut p, LOGIN);
        assert_eq!(start(&mut p, SEND), Admission::Queued);
        assert_eq!(start(&mut p, SEND), Admission::Queued);
        assert_eq!(start(&mut p, PING), Admission::Full(PING));
        assert_eq!(p.in_flight(|_| true), 3, "the login and two sends");
        assert_eq!(p.in_flight(|r| r.0 == "ping"), 1, "the login");
        assert!(p.is_waiting(|r| r.0 == "send"));
        p.clear();
        assert!(!p.is_waiting(|_| true));
    }

    #[test]
    fn the_waiting_queue_is_bounded_in_bytes() {
        let mut p = Pipeline::new(10, 9); // "send" weighs 4, "ping" 4, "join" 4
        start(&mut p, LOGIN);
        assert_eq!(start(&mut p, SEND), Admission::Queued);
        assert_eq!(start(&mut p, PING), Admission::Queued);
        assert_eq!(start(&mut p, JOIN), Admission::Full(JOIN));
        p.finished();
        assert_eq!(p.next_ready(), Some(SEND));
        assert_eq!(
            start(&mut p, JOIN),
            Admission::Queued,
            "the send's bytes are free"
        );
    }
}
