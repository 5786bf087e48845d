//! What a sending scenario measures: the [`Meter`] its members share (latency histograms,
//! counts, errors and the checker's [`History`]), the member send loop that fills it by a
//! [`SendPlan`], joining members to their rooms for the checker, and the final verdict. Also
//! the histogram and latency helpers. Calls `peer` for the connections.

use hdrhistogram::Histogram;
use rookery::checker::{History, Verdict};
use rookery::client::{ClientError, Incoming};
use rookery::ids::Seq;
use rookery::protocol::{Request, RoomName};
use serde_json::{json, Value};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::peer::{stored_history, Bench, Peer};

/// State shared by the futures of one task (the bench runs every client in one task).
pub type Shared<T> = Rc<RefCell<T>>;

pub fn shared<T>(value: T) -> Shared<T> {
    Rc::new(RefCell::new(value))
}

/// Microseconds from 1 µs to 10 minutes, 3 significant digits.
#[allow(clippy::expect_used)] // constant bounds that hdrhistogram accepts
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// A fraction in [0, 1) fixed by `name`, spreading members over their send interval.
fn phase(name: &str) -> f64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    name.hash(&mut hasher);
    (hasher.finish() % 1_000_000) as f64 / 1_000_000.0
}

/// CPU seconds (user + system) used so far by process `pid` (this process when `None`), from
/// /proc; `None` where /proc cannot tell.
pub fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = pid.map_or("/proc/self/stat".to_string(), |p| format!("/proc/{p}/stat"));
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces: utime and
    // stime are the 12th and 13th of them, in clock ticks.
    let mut fields = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .skip(11);
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (ticks > 0).then(|| (utime + stime) / ticks as f64)
}

/// The CPU that the server (with its pid) and this load tool spend from now on.
pub struct CpuClock {
    server_pid: Option<u32>,
    server: Option<f64>,
    tool: Option<f64>,
}

impl CpuClock {
    pub fn start(server_pid: Option<u32>) -> CpuClock {
        CpuClock {
            server_pid,
            server: server_pid.and_then(|p| cpu_seconds(Some(p))),
            tool: cpu_seconds(None),
        }
    }

    /// Sets `server_cpu_s` and `tool_cpu_s` since the start, and each per one of `units` as
    /// `server_cpu_us_per_{unit}` and `tool_cpu_us_per_{unit}`.
    pub fn report(&self, report: &mut crate::report::Report, unit: &str, units: u64) {
        let spent = [
            (
                "server",
                self.server,
                self.server_pid.and_then(|p| cpu_seconds(Some(p))),
            ),
            ("tool", self.tool, cpu_seconds(None)),
        ];
        for (who, before, now) in spent {
            if let (Some(before), Some(now)) = (before, now) {
                let seconds = now - before;
                report.set(&format!("{who}_cpu_s"), seconds);
                if units > 0 {
                    let per = seconds * 1e6 / units as f64;
                    report.set(&format!("{who}_cpu_us_per_{unit}"), per);
                }
            }
        }
    }
}

pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

pub fn summary(h: &Histogram<u64>) -> Value {
    let ms = |v: u64| (v as f64) / 1000.0;
    json!({
        "count": h.len(),
        "p50_ms": ms(h.value_at_quantile(0.50)),
        "p90_ms": ms(h.value_at_quantile(0.90)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "p999_ms": ms(h.value_at_quantile(0.999)),
        "max_ms": ms(h.max()),
    })
}

/// Shared measurement state of a sending scenario.
pub struct Meter {
    pub ack: Histogram<u64>,
    pub deliver: Histogram<u64>,
    pub acked: u64,
    pub delivered: u64,
    /// When the latest `message` event arrived, for rates that end with the last delivery
    /// rather than with the members' wait for more.
    pub last_delivered_at: Option<Instant>,
    pub errors: BTreeMap<String, u64>,
    pub history: History,
}

impl Meter {
    /// `member` received the `message` event `event` of `room`; its latency, when its body
    /// carries a send time.
    pub fn delivery(
        &mut self,
        bench: &Bench,
        member: &str,
        room: &str,
        event: &Value,
    ) -> Option<Duration> {
        self.delivered += 1;
        self.last_delivered_at = Some(Instant::now());
        let latency = event["body"].as_str().and_then(|b| bench.latency_since(b));
        if let Some(latency) = latency {
            let _ = self.deliver.record(micros(latency));
        }
        let seq = event["seq"].as_i64().unwrap_or(0);
        self.history.received(member, room, Seq(seq));
        latency
    }

    pub fn new() -> Self {
        Meter {
            ack: histogram(),
            deliver: histogram(),
            acked: 0,
            delivered: 0,
            last_delivered_at: None,
            errors: BTreeMap::new(),
            history: History::new(),
        }
    }
}

/// Joins peer `i` to `room_of(i)`, one after the other; from its join on, each must receive
/// every message of its room (recorded for the checker, with the seq it joined at).
pub async fn join_each(
    peers: &mut [Peer],
    meter: &Shared<Meter>,
    room_of: impl Fn(usize) -> RoomName,
) -> Result<(), String> {
    let mut tended = Instant::now();
    for i in 0..peers.len() {
        // Those joined already and those still waiting for their turn alike.
        crate::peer::tend_every(peers, &mut tended).await;
        let peer = &mut peers[i];
        let room = room_of(i);
        let reply = peer.join(&room).await?;
        let last = Seq(reply["room"]["last_seq"].as_i64().unwrap_or(0));
        let mut m = meter.borrow_mut();
        m.history.covers(&peer.name, room.as_str(), last, None);
    }
    Ok(())
}

/// The checker's verdict on what `meter` recorded, against every stored message of `rooms`
/// as `reader` reads them.
pub async fn verdict(
    reader: &mut Peer,
    rooms: impl Iterator<Item = RoomName>,
    meter: &Shared<Meter>,
) -> Result<Verdict, String> {
    let mut stored = BTreeMap::new();
    for room in rooms {
        let messages = stored_history(reader, &room).await?;
        stored.insert(room.into_string(), messages);
    }
    Ok(meter.borrow().history.verdict(&stored))
}

/// How a member sends: at most `inflight` unacknowledged, paced at `rate` per second when it is
/// above 0, until `until` or `max_sends` messages, whichever comes first.
#[derive(Clone, Copy)]
pub struct SendPlan {
    pub inflight: usize,
    pub rate: f64,
    pub body_bytes: usize,
    pub until: Instant,
    pub max_sends: u64,
}

/// A send not yet answered.
struct Unanswered {
    /// When the send was due (or made, when not paced): its ack latency counts from here.
    due: Instant,
    /// Its client_msg_id, `{member}-m{n}`.
    key: String,
}

/// One member's sending side in [`member_loop`]: its pace and its sends not yet answered, by
/// request id.
struct Sender {
    plan: SendPlan,
    interval: Option<Duration>,
    next_send: Instant,
    sent: u64,
    pending: HashMap<String, Unanswered>,
}

impl Sender {
    fn new(plan: SendPlan, member: &str) -> Sender {
        let interval = (plan.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / plan.rate));
        // Members start at spread-out phases of their interval: starting all at once would send
        // every member's message in one burst per interval and measure the burst, not the rate.
        let next_send =
            Instant::now() + interval.map_or(Duration::ZERO, |step| step.mul_f64(phase(member)));
        Sender {
            plan,
            interval,
            next_send,
            sent: 0,
            pending: HashMap::new(),
        }
    }

    /// Whether the plan still has sends to make.
    fn sending(&self) -> bool {
        Instant::now() < self.plan.until && self.sent < self.plan.max_sends
    }

    /// Sends what is due now, within the in-flight bound.
    async fn send_due(
        &mut self,
        bench: &Bench,
        peer: &mut Peer,
        room: &RoomName,
        meter: &Shared<Meter>,
    ) -> Result<(), ClientError> {
        while self.pending.len() < self.plan.inflight
            && self
                .interval
                .is_none_or(|_| Instant::now() >= self.next_send)
        {
            self.sent += 1;
            let key = format!("{}-m{}", peer.name, self.sent);
            let id = peer.id();
            // At a fixed rate latency counts from when the send was due, so a send held back
            // by the in-flight bound is not measured as fast (no coordinated omission).
            let due = if self.interval.is_some() {
                self.next_send
            } else {
                Instant::now()
            };
            let post = Request::Post {
                room: room.clone(),
                body: bench.body_due(self.plan.body_bytes, due),
                client_msg_id: Some(key.clone()),
            };
            peer.conn.send_request(&id, &post).await?;
            meter
                .borrow_mut()
                .history
                .sent(&peer.name, &peer.name, room.as_str(), &key);
            self.pending.insert(id, Unanswered { due, key });
            if let Some(step) = self.interval {
                self.next_send += step;
            }
        }
        Ok(())
    }

    /// How long to wait for the next frame.
    fn wait(&self, sending: bool, quiet: Duration) -> Duration {
        if sending {
            match self.interval {
                Some(_) if self.pending.len() < self.plan.inflight => {
                    self.next_send.saturating_duration_since(Instant::now())
                }
                _ => self.plan.until.saturating_duration_since(Instant::now()),
            }
        } else {
            quiet
        }
        .max(Duration::from_millis(1))
    }
}

/// One member's send loop: sends by `plan`, then waits for its acks and keeps reading until
/// `quiet` passes without a frame; records acks, errors and deliveries.
pub async fn member_loop(
    bench: &Bench,
    peer: &mut Peer,
    room: &RoomName,
    meter: &Shared<Meter>,
    plan: SendPlan,
    quiet: Duration,
) {
    let mut sender = Sender::new(plan, &peer.name);
    let mut last_frame = Instant::now();
    loop {
        let sending = sender.sending();
        if sending && sender.send_due(bench, peer, room, meter).await.is_err() {
            return;
        }
        if !sending && sender.pending.is_empty() && last_frame.elapsed() >= quiet {
            return;
        }
        let frame = match peer.conn.recv_within(sender.wait(sending, quiet)).await {
            Ok(frame) => frame,
            Err(ClientError::Timeout) => {
                if !sending && sender.pending.is_empty() {
                    return;
                }
                if !sending && last_frame.elapsed() > Duration::from_secs(30) {
                    return;
                }
                continue;
            }
            Err(_) => return,
        };
        last_frame = Instant::now();
        record(bench, &peer.name, room.as_str(), &mut sender, meter, frame);
    }
}

/// Records one frame a member received: the reply to one of its sends, or a message.
fn record(
    bench: &Bench,
    member: &str,
    room: &str,
    sender: &mut Sender,
    meter: &Shared<Meter>,
    frame: Value,
) {
    let mut m = meter.borrow_mut();
    match rookery::client::classify(frame) {
        Incoming::Reply { id, frame } => {
            let Some(Unanswered { due, key }) = sender.pending.remove(&id) else {
                return;
            };
            if frame["type"] == "ok" {
                m.acked += 1;
                let _ = m.ack.record(micros(due.elapsed()));
                let seq = Seq(frame["seq"].as_i64().unwrap_or(0));
                m.history.acked(member, member, room, &key, seq);
            } else {
                let code = frame["code"].as_str().unwrap_or("?").to_string();
                m.history.failed(member, member, room, &key, &code);
                *m.errors.entry(code).or_default() += 1;
            }
        }
        Incoming::Event(event) if event["type"] == "message" => {
            m.delivery(bench, member, room, &event);
        }
        Incoming::Event(_) => {}
    }
}
