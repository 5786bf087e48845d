//! The Gate: who may connect and who may try a password or a token. It counts open
//! connections per IP (refusing beyond the limit), keeps the windows of failed logins per
//! username and per IP (refused without running bcrypt) and of failed resumes per IP (refused
//! without a database look-up), and a token bucket of registrations per IP. It knows every
//! live session, so that a shutdown can drain them. Calls only sessions, through [`Drain`].
//!
//! Messages:
//! - [`Admit`] (upgrade handler): may `ip` open one more connection? Counts it if so.
//! - [`Register`] / [`Unregister`] (Session, on start / stop): track it; release its IP
//!   slot.
//! - [`LoginAllowed`] / [`LoginFinished`] (Session, around `login`; the latter always, through
//!   a [`LoginAttempt`] guard).
//! - [`ResumeAllowed`] / [`ResumeFailed`] (Session, around `resume`'s token look-up; the
//!   latter through a [`ResumeAttempt`] guard).
//! - [`RegisterAllowed`] / [`RegisterFailed`] (Session, around `register`).
//! - [`Release`] (upgrade handler): a counted connection that never became a session.
//! - [`DrainAll`] (server, on SIGTERM/SIGINT): tell every session to finish and close with
//!   1001; replies when all are gone or the deadline passed.

use actix::prelude::*;
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

use crate::ids::SessionId;
use crate::protocol::{username_key, Username};
use crate::rate::{Buckets, Refill};

/// Gate → Session: finish the requests in flight, then close with 1001.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct Drain;

#[derive(Debug, Clone)]
pub struct GateSettings {
    pub max_connections_per_ip: usize,
    pub failed_logins_per_user: usize,
    pub failed_logins_per_ip: usize,
    pub failed_login_window: Duration,
    /// Failed `resume`s per IP within the same window.
    pub failed_resumes_per_ip: usize,
    /// `register`s per IP.
    pub registrations_per_ip: Refill,
    /// How often windows that have run out are forgotten.
    pub sweep_interval: Duration,
}

/// Upgrade handler → Gate: replies true (and counts the connection) when `ip` is under its limit.
#[derive(Debug, Message)]
#[rtype(result = "bool")]
pub struct Admit {
    pub ip: Option<IpAddr>,
}

/// Session → Gate, when it starts.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Register {
    pub session: SessionId,
    pub drain: Recipient<Drain>,
}

/// Session → Gate, when it stops; frees the IP slot taken by [`Admit`].
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Unregister {
    pub session: SessionId,
    pub ip: Option<IpAddr>,
}

/// Session → Gate: may this login attempt run? False while the username or the IP has too
/// many recent failures.
#[derive(Debug, Message)]
#[rtype(result = "bool")]
pub struct LoginAllowed {
    pub username: Username,
    pub ip: Option<IpAddr>,
}

/// Session → Gate: an allowed login attempt ended; `failed` when the credentials were wrong.
/// Sent by [`LoginAttempt`], whatever happens to the connection.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct LoginFinished {
    pub username: Username,
    pub ip: Option<IpAddr>,
    pub failed: bool,
}

/// A login attempt the gate allowed. It is finished in the gate exactly once: by
/// [`LoginAttempt::finish`] with its outcome, or, when the connection goes away first (the
/// future holding it is dropped), as not failed: an attempt whose answer nobody got taught
/// its sender nothing.
pub struct LoginAttempt {
    gate: Addr<Gate>,
    username: Username,
    ip: Option<IpAddr>,
    finished: bool,
}

impl LoginAttempt {
    pub fn new(gate: Addr<Gate>, username: Username, ip: Option<IpAddr>) -> Self {
        LoginAttempt {
            gate,
            username,
            ip,
            finished: false,
        }
    }

    pub fn finish(mut self, failed: bool) {
        self.finished = true;
        self.report(failed);
    }

    fn report(&self, failed: bool) {
        self.gate.do_send(LoginFinished {
            username: self.username.clone(),
            ip: self.ip,
            failed,
        });
    }
}

impl Drop for LoginAttempt {
    fn drop(&mut self) {
        if !self.finished {
            self.report(false);
        }
    }
}

/// Session → Gate: may this `resume` look its token up? False while the IP has too many
/// recent failed resumes. Attempts in flight do not count against the address (a whole office
/// behind one NAT reconnects at once); see [`ResumeAttempt`].
#[derive(Debug, Message)]
#[rtype(result = "bool")]
pub struct ResumeAllowed {
    pub ip: Option<IpAddr>,
}

/// Session → Gate: an allowed resume failed (an unknown, expired or revoked token), or was
/// abandoned before its answer.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct ResumeFailed {
    pub ip: Option<IpAddr>,
}

/// An allowed resume, reported to the gate whatever happens to its connection: dropped
/// unfinished (the client went away while its token was being looked up), it counts as
/// failed, so aborting cannot be used to guess without being counted.
pub struct ResumeAttempt {
    gate: Addr<Gate>,
    ip: Option<IpAddr>,
    finished: bool,
}

impl ResumeAttempt {
    pub fn new(gate: Addr<Gate>, ip: Option<IpAddr>) -> Self {
        ResumeAttempt {
            gate,
            ip,
            finished: false,
        }
    }

    /// `failed`: the token was refused (not an error of the server's).
    pub fn finish(mut self, failed: bool) {
        self.finished = true;
        if failed {
            self.gate.do_send(ResumeFailed { ip: self.ip });
        }
    }
}

impl Drop for ResumeAttempt {
    fn drop(&mut self) {
        if !self.finished {
            self.gate.do_send(ResumeFailed { ip: self.ip });
        }
    }
}

/// Session → Gate: may this `register` hash its password? False when the IP is over its
/// registration rate or has too many recent failed logins. Takes a token of the IP's bucket.
#[derive(Debug, Message)]
#[rtype(result = "bool")]
pub struct RegisterAllowed {
    pub ip: Option<IpAddr>,
}

/// Session → Gate: an allowed `register` was refused because the name is taken: it counts as
/// a failed login of the IP (guessing which names exist is guessing).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct RegisterFailed {
    pub ip: Option<IpAddr>,
}

/// Upgrade handler → Gate: give back a slot taken by [`Admit`] for a connection that never
/// became a session.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Release {
    pub ip: Option<IpAddr>,
}

/// Server → Gate: drain every session; replies when none is left or after `deadline`.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct DrainAll {
    pub deadline: Duration,
}

pub struct Gate {
    settings: GateSettings,
    per_ip: HashMap<IpAddr, usize>,
    sessions: HashMap<SessionId, Registered>,
    failures_by_user: HashMap<String, VecDeque<Instant>>,
    failures_by_ip: HashMap<IpAddr, VecDeque<Instant>>,
    /// Login attempts per username allowed and not finished yet (when each began): they count
    /// as failures until they end, so parallel attempts cannot get past the limit together;
    /// one never reported finished stops counting once the window has passed.
    attempts_by_user: HashMap<String, VecDeque<Instant>>,
    /// Resumes per IP that failed, or were allowed and have not succeeded (yet).
    resumes_by_ip: HashMap<IpAddr, VecDeque<Instant>>,
    registrations_by_ip: Buckets<IpAddr>,
    drained: Vec<oneshot::Sender<()>>,
    draining: bool,
}

struct Registered {
    drain: Recipient<Drain>,
}

impl Gate {
    pub fn new(settings: GateSettings) -> Self {
        Gate {
            settings,
            per_ip: HashMap::new(),
            sessions: HashMap::new(),
            failures_by_user: HashMap::new(),
            failures_by_ip: HashMap::new(),
            attempts_by_user: HashMap::new(),
            resumes_by_ip: HashMap::new(),
            registrations_by_ip: Buckets::default(),
            drained: Vec::new(),
            draining: false,
        }
    }

    fn release(&mut self, ip: Option<IpAddr>) {
        if let Some(ip) = ip {
            if let Some(count) = self.per_ip.get_mut(&ip) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    self.per_ip.remove(&ip);
                }
            }
        }
    }

    /// Recent failed logins (and name-taken registrations) of `ip`.
    fn failures_of(&mut self, ip: Option<IpAddr>) -> usize {
        let span = self.settings.failed_login_window;
        ip.and_then(|ip| self.failures_by_ip.get_mut(&ip))
            .map(|w| Gate::recent(w, span))
            .unwrap_or(0)
    }

    fn recent(window: &mut VecDeque<Instant>, span: Duration) -> usize {
        while window.front().is_some_and(|t| t.elapsed() > span) {
            window.pop_front();
        }
        window.len()
    }
}

impl Actor for Gate {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Forget windows that have run out, so the maps stay as small as the recent failures.
        ctx.run_interval(self.settings.sweep_interval, |gate, _| {
            let span = gate.settings.failed_login_window;
            gate.failures_by_user
                .retain(|_, w| Gate::recent(w, span) > 0);
            gate.failures_by_ip.retain(|_, w| Gate::recent(w, span) > 0);
            gate.attempts_by_user
                .retain(|_, w| Gate::recent(w, span) > 0);
            gate.resumes_by_ip.retain(|_, w| Gate::recent(w, span) > 0);
            gate.registrations_by_ip
                .forget_full(gate.settings.registrations_per_ip, Instant::now());
        });
    }
}

impl Handler<Admit> for Gate {
    type Result = bool;

    fn handle(&mut self, msg: Admit, _: &mut Context<Self>) -> bool {
        if self.draining {
            return false;
        }
        let Some(ip) = msg.ip else {
            return true;
        };
        let count = self.per_ip.entry(ip).or_default();
        if *count >= self.settings.max_connections_per_ip {
            return false;
        }
        *count += 1;
        true
    }
}

impl Handler<Register> for Gate {
    type Result = ();

    fn handle(&mut self, msg: Register, _: &mut Context<Self>) {
        if self.draining {
            msg.drain.do_send(Drain);
        }
        let registered = Registered { drain: msg.drain };
        self.sessions.insert(msg.session, registered);
    }
}

impl Handler<Unregister> for Gate {
    type Result = ();

    fn handle(&mut self, msg: Unregister, _: &mut Context<Self>) {
        self.sessions.remove(&msg.session);
        self.release(msg.ip);
        if self.sessions.is_empty() {
            for done in self.drained.drain(..) {
                let _ = done.send(());
            }
        }
    }
}

impl Handler<Release> for Gate {
    type Result = ();

    fn handle(&mut self, msg: Release, _: &mut Context<Self>) {
        self.release(msg.ip);
    }
}

impl Handler<LoginAllowed> for Gate {
    type Result = bool;

    fn handle(&mut self, msg: LoginAllowed, _: &mut Context<Self>) -> bool {
        let span = self.settings.failed_login_window;
        let user = username_key(msg.username.as_str());
        let by_user = self
            .failures_by_user
            .get_mut(&user)
            .map(|w| Gate::recent(w, span))
            .unwrap_or(0)
            + self
                .attempts_by_user
                .get_mut(&user)
                .map(|w| Gate::recent(w, span))
                .unwrap_or(0);
        // Attempts in flight count against a username (so a parallel burst cannot guess more
        // often than the limit), but not against an address, where many users may log in at once.
        let by_ip = self.failures_of(msg.ip);
        let allowed = by_user < self.settings.failed_logins_per_user
            && by_ip < self.settings.failed_logins_per_ip;
        if allowed {
            self.attempts_by_user
                .entry(user)
                .or_default()
                .push_back(Instant::now());
        }
        allowed
    }
}

impl Handler<LoginFinished> for Gate {
    type Result = ();

    fn handle(&mut self, msg: LoginFinished, _: &mut Context<Self>) {
        let user = username_key(msg.username.as_str());
        if let Some(attempts) = self.attempts_by_user.get_mut(&user) {
            attempts.pop_front();
            if attempts.is_empty() {
                self.attempts_by_user.remove(&user);
            }
        }
        if msg.failed {
            let now = Instant::now();
            self.failures_by_user
                .entry(user)
                .or_default()
                .push_back(now);
            count_failure(&mut self.failures_by_ip, msg.ip);
        }
    }
}

impl Handler<ResumeAllowed> for Gate {
    type Result = bool;

    fn handle(&mut self, msg: ResumeAllowed, _: &mut Context<Self>) -> bool {
        let Some(ip) = msg.ip else {
            return true;
        };
        let span = self.settings.failed_login_window;
        self.resumes_by_ip
            .get_mut(&ip)
            .is_none_or(|window| Gate::recent(window, span) < self.settings.failed_resumes_per_ip)
    }
}

impl Handler<ResumeFailed> for Gate {
    type Result = ();

    fn handle(&mut self, msg: ResumeFailed, _: &mut Context<Self>) {
        count_failure(&mut self.resumes_by_ip, msg.ip);
    }
}

impl Handler<RegisterAllowed> for Gate {
    type Result = bool;

    fn handle(&mut self, msg: RegisterAllowed, _: &mut Context<Self>) -> bool {
        if self.failures_of(msg.ip) >= self.settings.failed_logins_per_ip {
            return false;
        }
        let Some(ip) = msg.ip else {
            return true;
        };
        self.registrations_by_ip
            .take(ip, self.settings.registrations_per_ip, Instant::now())
    }
}

impl Handler<RegisterFailed> for Gate {
    type Result = ();

    fn handle(&mut self, msg: RegisterFailed, _: &mut Context<Self>) {
        count_failure(&mut self.failures_by_ip, msg.ip);
    }
}

/// Adds a failure now to the window of `ip`.
fn count_failure(windows: &mut HashMap<IpAddr, VecDeque<Instant>>, ip: Option<IpAddr>) {
    if let Some(ip) = ip {
        windows.entry(ip).or_default().push_back(Instant::now());
    }
}

impl Handler<DrainAll> for Gate {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, msg: DrainAll, _: &mut Context<Self>) -> Self::Result {
        self.draining = true;
        log::info!("draining {} session(s)", self.sessions.len());
        for session in self.sessions.values() {
            session.drain.do_send(Drain);
        }
        if self.sessions.is_empty() {
            return Box::pin(async {});
        }
        let (done, finished) = oneshot::channel();
        self.drained.push(done);
        Box::pin(async move {
            let _ = tokio::time::timeout(msg.deadline, finished).await;
        })
    }
}
